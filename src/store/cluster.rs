//! What daemons sharing one PostgreSQL database agree on through it: who
//! fetches an app's next token (a lease on its `tokens` row, taken in a row
//! lock, ended by the fenced write of the token or by its end time), the
//! token endpoint calls of the whole cluster (`token_fetches`: the budget
//! and the two-tokens-in-the-grace rule), the living daemons (`instances`,
//! by heartbeat) and the notifications that tell every daemon to re-read.
//! Times here are the database's clock, so daemons on hosts whose clocks
//! disagree still agree on when a lease ends. PostgreSQL only.

use sqlx::{PgPool, Postgres};

use super::tokens::{TokenRecord, TokenRow, token_binding};
use super::{Store, StoreError, query_error};
use crate::domain::{AccessToken, ClientKey};

/// The channel every daemon listens on; see [`ClusterMessage`].
pub(crate) const CLUSTER_CHANNEL: &str = "douyin_tokend";

/// The database's clock in Unix milliseconds, as SQL.
const DATABASE_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// How a daemon may go on with an app's token fetch.
#[derive(Debug)]
pub(crate) enum FetchTurn {
    /// This daemon holds the lease: fetch, and store the token as `generation`.
    Granted { generation: i64 },
    /// Another daemon stored a newer token than this one knows: use it.
    Adopt(TokenRecord),
    /// Another daemon is fetching; its lease ends in `lease_ends_in_ms`.
    HeldElsewhere { lease_ends_in_ms: i64 },
    /// The cluster spent the token endpoint budget: the next call in `retry_in_ms`.
    BudgetSpent { retry_in_ms: i64 },
    /// A scheduled fetch that would be this app's third token inside Douyin's
    /// grace (only the newest two stay valid): it waits `retry_in_ms`.
    TooSoon { retry_in_ms: i64 },
}

/// What a daemon asks for when it wants to fetch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchRequest<'a> {
    pub(crate) client_key: &'a ClientKey,
    pub(crate) instance: &'a str,
    /// The newest generation this daemon knows for the app.
    pub(crate) known_generation: i64,
    /// Whether the current token may be used meanwhile (a scheduled refresh);
    /// urgent fetches may use the budget's reserve and ignore the grace rule.
    pub(crate) scheduled: bool,
    pub(crate) lease_ms: i64,
    pub(crate) budget: i64,
    pub(crate) budget_reserve: i64,
    pub(crate) budget_window_ms: i64,
    /// Douyin keeps the newest two tokens; one replaced stays valid this long
    /// (Douyin's grace, or the token's lifetime when that is shorter: a
    /// token past its expiry has nothing left to lose to a third fetch).
    pub(crate) grace_ms: i64,
}

/// A message on [`CLUSTER_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterMessage {
    /// An app's token row changed (a new token, an invalidation, a failure).
    Token(ClientKey),
    /// Apps, merchants or API clients changed.
    Registry,
    /// After-sale events were committed, up to this sequence.
    Events(i64),
}

impl ClusterMessage {
    pub(crate) fn to_payload(&self) -> String {
        match self {
            Self::Token(client_key) => format!("token {}", client_key.expose()),
            Self::Registry => "registry".to_owned(),
            Self::Events(sequence) => format!("events {sequence}"),
        }
    }

    pub(crate) fn parse(payload: &str) -> Option<Self> {
        match payload.split_once(' ') {
            Some(("token", client_key)) => ClientKey::parse(client_key).ok().map(Self::Token),
            Some(("events", sequence)) => sequence.parse().ok().map(Self::Events),
            None if payload == "registry" => Some(Self::Registry),
            _ => None,
        }
    }
}

/// The cluster's queries; from `Store::cluster` (PostgreSQL only).
pub(crate) struct ClusterTable<'store> {
    pub(super) store: &'store Store,
    pub(super) pool: &'store PgPool,
}

#[derive(sqlx::FromRow)]
struct LeaseRow {
    generation: i64,
    has_token: bool,
    invalidated: bool,
    lease_holder: Option<String>,
    lease_until: Option<i64>,
    now_ms: i64,
}

impl ClusterTable<'_> {
    /// Decides, in one transaction holding the app's row lock, whether this
    /// daemon fetches the app's next token: a newer stored token is adopted,
    /// a living lease of another daemon is waited for, the cluster's budget
    /// and the grace rule are counted from `token_fetches`; a granted fetch
    /// takes the lease and is counted before the call leaves.
    pub(crate) async fn begin_fetch(
        &self,
        request: &FetchRequest<'_>,
    ) -> Result<FetchTurn, StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin a fetch turn"))?;
        let row: Option<LeaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT generation, access_token IS NOT NULL AS has_token,
                    invalidated_at IS NOT NULL AS invalidated,
                    fetch_lease_holder AS lease_holder, fetch_lease_until AS lease_until,
                    {DATABASE_NOW_MS} AS now_ms
             FROM tokens WHERE client_key = $1 FOR UPDATE"
        )))
        .bind(request.client_key.expose())
        .fetch_optional(&mut *transaction)
        .await
        .map_err(query_error("lock an app's token row"))?;
        let Some(row) = row else {
            return Err(StoreError::Corrupt(format!(
                "{} has no token row",
                request.client_key
            )));
        };
        if row.generation > request.known_generation && row.has_token && !row.invalidated {
            let record = self
                .read_token(&mut transaction, request.client_key)
                .await?;
            transaction
                .rollback()
                .await
                .map_err(query_error("end a fetch turn"))?;
            return Ok(FetchTurn::Adopt(record));
        }
        let now_ms = row.now_ms;
        if let (Some(holder), Some(until)) = (&row.lease_holder, row.lease_until)
            && holder != request.instance
            && until > now_ms
        {
            return Ok(FetchTurn::HeldElsewhere {
                lease_ends_in_ms: until - now_ms,
            });
        }
        let (spent, oldest_in_window): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(started_at) FROM token_fetches WHERE started_at > $1",
        )
        .bind(now_ms - request.budget_window_ms)
        .fetch_one(&mut *transaction)
        .await
        .map_err(query_error("count the cluster's token fetches"))?;
        let allowed = if request.scheduled {
            request.budget - request.budget_reserve
        } else {
            request.budget
        };
        if spent >= allowed {
            let frees_at = oldest_in_window.unwrap_or(now_ms) + request.budget_window_ms;
            return Ok(FetchTurn::BudgetSpent {
                retry_in_ms: (frees_at - now_ms).max(1),
            });
        }
        if request.scheduled {
            let recent: Vec<i64> = sqlx::query_scalar(
                "SELECT started_at FROM token_fetches
                 WHERE client_key = $1 AND started_at > $2 ORDER BY started_at",
            )
            .bind(request.client_key.expose())
            .bind(now_ms - request.grace_ms)
            .fetch_all(&mut *transaction)
            .await
            .map_err(query_error("count an app's recent token fetches"))?;
            if recent.len() >= 2 {
                return Ok(FetchTurn::TooSoon {
                    retry_in_ms: (recent[0] + request.grace_ms - now_ms).max(1),
                });
            }
        }
        sqlx::query(
            "UPDATE tokens SET fetch_lease_holder = $2, fetch_lease_until = $3
             WHERE client_key = $1",
        )
        .bind(request.client_key.expose())
        .bind(request.instance)
        .bind(now_ms + request.lease_ms)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("take an app's fetch lease"))?;
        sqlx::query(
            "INSERT INTO token_fetches (client_key, started_at, instance) VALUES ($1, $2, $3)",
        )
        .bind(request.client_key.expose())
        .bind(now_ms)
        .bind(request.instance)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("count a token fetch"))?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit a fetch turn"))?;
        Ok(FetchTurn::Granted {
            generation: row.generation + 1,
        })
    }

    async fn read_token(
        &self,
        transaction: &mut sqlx::Transaction<'static, Postgres>,
        client_key: &ClientKey,
    ) -> Result<TokenRecord, StoreError> {
        let row: TokenRow = sqlx::query_as(
            "SELECT client_key, access_token, generation, fetched_at, expires_at, invalidated_at,
                    last_error, last_error_at, last_error_permanent, consecutive_failures
             FROM tokens WHERE client_key = $1",
        )
        .bind(client_key.expose())
        .fetch_one(&mut **transaction)
        .await
        .map_err(query_error("read an app's token"))?;
        Ok(self.store.tokens().record_of(row)?.1)
    }

    /// Stores a fetched token only if this daemon still holds the app's lease
    /// and the token is exactly the next generation, ends the lease and tells
    /// every daemon, all in one transaction. False: fenced out (another
    /// daemon took the lease over after it ended, or stored a newer token);
    /// the token is not used.
    pub(crate) async fn commit_fetched(
        &self,
        instance: &str,
        client_key: &ClientKey,
        access_token: &AccessToken,
        generation: i64,
        fetched_at_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let sealed = self
            .store
            .master_key
            .seal(&token_binding(client_key), access_token.expose());
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin storing a fetched token"))?;
        let stored = sqlx::query(
            "UPDATE tokens SET access_token = $3, generation = $4, fetched_at = $5, expires_at = $6,
                    invalidated_at = NULL, last_error = NULL, last_error_at = NULL,
                    last_error_permanent = 0, consecutive_failures = 0,
                    fetch_lease_holder = NULL, fetch_lease_until = NULL
             WHERE client_key = $1 AND fetch_lease_holder = $2 AND generation = $4 - 1",
        )
        .bind(client_key.expose())
        .bind(instance)
        .bind(&sealed)
        .bind(generation)
        .bind(fetched_at_ms)
        .bind(expires_at_ms)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("store a fetched token"))?
        .rows_affected()
            > 0;
        if stored {
            notify(&mut transaction, &ClusterMessage::Token(client_key.clone())).await?;
        }
        transaction
            .commit()
            .await
            .map_err(query_error("commit a fetched token"))?;
        Ok(stored)
    }

    /// Ends this daemon's lease without a token (the fetch failed) and tells
    /// the others, so one waiting for it tries at once.
    pub(crate) async fn end_lease(
        &self,
        instance: &str,
        client_key: &ClientKey,
    ) -> Result<(), StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin ending a fetch lease"))?;
        sqlx::query(
            "UPDATE tokens SET fetch_lease_holder = NULL, fetch_lease_until = NULL
             WHERE client_key = $1 AND fetch_lease_holder = $2",
        )
        .bind(client_key.expose())
        .bind(instance)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("end a fetch lease"))?;
        notify(&mut transaction, &ClusterMessage::Token(client_key.clone())).await?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit ending a fetch lease"))?;
        Ok(())
    }

    /// Records this daemon's heartbeat and answers how many daemons are alive
    /// (their heartbeat within `alive_within_ms`, this one included); forgets
    /// token endpoint calls older than `forget_fetches_before_ms` ago.
    pub(crate) async fn heartbeat(
        &self,
        instance: &str,
        alive_within_ms: i64,
        forget_fetches_older_than_ms: i64,
    ) -> Result<u32, StoreError> {
        let alive: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH beat AS (
                 INSERT INTO instances (instance, started_at, heartbeat_at)
                 VALUES ($1, {DATABASE_NOW_MS}, {DATABASE_NOW_MS})
                 ON CONFLICT (instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
             )
             SELECT COUNT(*) + 1 FROM instances
             WHERE instance <> $1 AND heartbeat_at > {DATABASE_NOW_MS} - $2"
        )))
        .bind(instance)
        .bind(alive_within_ms)
        .fetch_one(self.pool)
        .await
        .map_err(query_error("record a heartbeat"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM token_fetches WHERE started_at < {DATABASE_NOW_MS} - $1"
        )))
        .bind(forget_fetches_older_than_ms)
        .execute(self.pool)
        .await
        .map_err(query_error("forget old token fetches"))?;
        Ok(u32::try_from(alive).unwrap_or(u32::MAX).max(1))
    }

    /// Removes this daemon from the living (at shutdown), so the others take
    /// its share of the rate at once rather than after its heartbeat ages.
    pub(crate) async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM instances WHERE instance = $1")
            .bind(instance)
            .execute(self.pool)
            .await
            .map_err(query_error("leave the cluster"))?;
        Ok(())
    }

    /// Tells every daemon (this one too) about a change.
    pub(crate) async fn announce(&self, message: &ClusterMessage) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CLUSTER_CHANNEL)
            .bind(message.to_payload())
            .execute(self.pool)
            .await
            .map_err(query_error("notify the cluster"))?;
        Ok(())
    }
}

/// Queues a notification inside `transaction`: PostgreSQL delivers it at the
/// commit, so no daemon hears of a change it cannot read yet.
async fn notify(
    transaction: &mut sqlx::Transaction<'static, Postgres>,
    message: &ClusterMessage,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CLUSTER_CHANNEL)
        .bind(message.to_payload())
        .execute(&mut **transaction)
        .await
        .map_err(query_error("notify the cluster"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::postgres_server::PostgresServer;
    use crate::domain::ClientSecret;
    use crate::store::{DatabaseLocation, PostgresDatabase, Source};

    async fn shared_store() -> (PostgresServer, tempfile::TempDir, Store) {
        let postgres = PostgresServer::start().await.unwrap();
        postgres.create_database("tokend").await.unwrap();
        let directory = tempfile::tempdir().unwrap();
        let location = DatabaseLocation::Postgres(PostgresDatabase {
            url: postgres.url("tokend"),
            password: None,
        });
        let (store, _) = Store::open_location(&location, &directory.path().join("master.key"))
            .await
            .unwrap();
        store
            .apps()
            .put(
                &app(),
                &ClientSecret::parse("secret").unwrap(),
                Source::Admin,
                1,
            )
            .await
            .unwrap();
        (postgres, directory, store)
    }

    fn app() -> ClientKey {
        ClientKey::parse("app-one").unwrap()
    }

    fn request<'a>(client_key: &'a ClientKey, instance: &'a str, known: i64) -> FetchRequest<'a> {
        FetchRequest {
            client_key,
            instance,
            known_generation: known,
            scheduled: false,
            lease_ms: 60_000,
            budget: 500,
            budget_reserve: 50,
            budget_window_ms: 300_000,
            grace_ms: 300_000,
        }
    }

    #[tokio::test]
    async fn one_daemon_fetches_the_other_waits_then_adopts_and_stale_writes_are_fenced() {
        let (_postgres, _directory, store) = shared_store().await;
        let cluster = store.cluster().unwrap();
        let key = app();
        let turn = cluster.begin_fetch(&request(&key, "a", 0)).await.unwrap();
        assert!(
            matches!(turn, FetchTurn::Granted { generation: 1 }),
            "{turn:?}"
        );
        let turn = cluster.begin_fetch(&request(&key, "b", 0)).await.unwrap();
        assert!(
            matches!(turn, FetchTurn::HeldElsewhere { lease_ends_in_ms } if lease_ends_in_ms > 0),
            "{turn:?}"
        );
        let token = AccessToken::new("clt.one".to_owned());
        // Not the next generation, or not the lease holder: refused.
        assert!(
            !cluster
                .commit_fetched("a", &key, &token, 2, 1, 2)
                .await
                .unwrap()
        );
        assert!(
            !cluster
                .commit_fetched("b", &key, &token, 1, 1, 2)
                .await
                .unwrap()
        );
        assert!(
            cluster
                .commit_fetched("a", &key, &token, 1, 1_000, 7_201_000)
                .await
                .unwrap()
        );
        // The lease ended with the write: a daemon that knows generation 0 adopts.
        match cluster.begin_fetch(&request(&key, "b", 0)).await.unwrap() {
            FetchTurn::Adopt(record) => {
                assert_eq!(record.generation, 1);
                assert_eq!(record.access_token.unwrap().expose(), "clt.one");
            }
            other => panic!("expected an adoption, got {other:?}"),
        }
        // One that knows it fetches the next generation.
        let turn = cluster.begin_fetch(&request(&key, "b", 1)).await.unwrap();
        assert!(
            matches!(turn, FetchTurn::Granted { generation: 2 }),
            "{turn:?}"
        );
    }

    #[tokio::test]
    async fn a_lease_past_its_end_is_taken_over_and_the_late_write_is_fenced() {
        let (_postgres, _directory, store) = shared_store().await;
        let cluster = store.cluster().unwrap();
        let key = app();
        let short_lease = FetchRequest {
            lease_ms: 0,
            ..request(&key, "dead", 0)
        };
        assert!(matches!(
            cluster.begin_fetch(&short_lease).await.unwrap(),
            FetchTurn::Granted { generation: 1 }
        ));
        // The holder's lease has ended (it died): another daemon takes over.
        assert!(matches!(
            cluster
                .begin_fetch(&request(&key, "alive", 0))
                .await
                .unwrap(),
            FetchTurn::Granted { generation: 1 }
        ));
        let token = AccessToken::new("clt.late".to_owned());
        assert!(
            !cluster
                .commit_fetched("dead", &key, &token, 1, 1, 2)
                .await
                .unwrap(),
            "the replaced holder's write is fenced"
        );
        let token = AccessToken::new("clt.alive".to_owned());
        assert!(
            cluster
                .commit_fetched("alive", &key, &token, 1, 1, 2)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn the_cluster_counts_the_budget_and_keeps_scheduled_fetches_to_two_per_grace() {
        let (_postgres, _directory, store) = shared_store().await;
        let cluster = store.cluster().unwrap();
        let key = app();
        let scheduled = |instance| FetchRequest {
            scheduled: true,
            lease_ms: 0,
            ..request(&key, instance, 0)
        };
        for instance in ["a", "b"] {
            assert!(matches!(
                cluster.begin_fetch(&scheduled(instance)).await.unwrap(),
                FetchTurn::Granted { .. }
            ));
        }
        assert!(matches!(
            cluster.begin_fetch(&scheduled("c")).await.unwrap(),
            FetchTurn::TooSoon { retry_in_ms } if retry_in_ms > 0
        ));
        // Urgent fetches are not held by the grace rule, but by the budget.
        let tight = FetchRequest {
            budget: 3,
            budget_reserve: 0,
            lease_ms: 0,
            ..request(&key, "d", 0)
        };
        assert!(matches!(
            cluster.begin_fetch(&tight).await.unwrap(),
            FetchTurn::Granted { .. }
        ));
        assert!(matches!(
            cluster.begin_fetch(&tight).await.unwrap(),
            FetchTurn::BudgetSpent { retry_in_ms } if retry_in_ms > 0
        ));
        assert_eq!(cluster.heartbeat("a", 3_000, 600_000).await.unwrap(), 1);
        assert_eq!(cluster.heartbeat("b", 3_000, 600_000).await.unwrap(), 2);
        cluster.leave("b").await.unwrap();
        assert_eq!(cluster.heartbeat("a", 3_000, 600_000).await.unwrap(), 1);
    }
}
