//! The `after_sale_events` table: refund-request notifications the webhook
//! acknowledged, in the order they were stored. One writer connection of its
//! own (`AfterSaleEventWriter`, synchronous=FULL) commits them in groups;
//! readers page through them by sequence. Pruning removes a prefix of the
//! sequence and records its end in `meta`, so a reader can tell "pruned"
//! from "never there".

use sqlx::Connection as _;

use super::backend::{Backend, Connection, Transaction, on_backend};
use super::{Store, StoreError, collect_rows, query_error};

/// A notification to store. Holds no secret: the signature is not kept (see
/// the migration), and the client key is stored as plainly as in `apps`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct AfterSaleEventRecord {
    pub(crate) client_key: String,
    pub(crate) msg_id: String,
    pub(crate) event: String,
    pub(crate) account_id: String,
    pub(crate) received_at_ms: i64,
    /// The body byte for byte.
    pub(crate) raw_json: String,
}

/// A stored notification and its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredAfterSaleEvent {
    pub(crate) sequence: i64,
    pub(crate) record: AfterSaleEventRecord,
}

#[derive(sqlx::FromRow)]
struct StoredRow {
    sequence: i64,
    #[sqlx(flatten)]
    record: AfterSaleEventRecord,
}

/// The queries on `after_sale_events`; from `Store::after_sale_events`.
pub(crate) struct AfterSaleEventTable<'store> {
    pub(super) store: &'store Store,
}

impl AfterSaleEventTable<'_> {
    /// A connection of its own for the one writer, taken out of the pool and
    /// set to `synchronous = FULL`: a notification acknowledged to Douyin must
    /// survive a power loss too, not only a crash of the process (the pool's
    /// NORMAL), since Douyin will not send it again. Group commits pay the
    /// extra fsync once per group.
    pub(crate) async fn open_writer(&self) -> Result<AfterSaleEventWriter, StoreError> {
        Ok(AfterSaleEventWriter {
            connection: Some(open_writer_connection(self.store).await?),
            store: self.store.clone(),
        })
    }

    /// The highest sequence stored, 0 when there is none.
    pub(crate) async fn latest_sequence(&self) -> Result<i64, StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query_scalar(
            "SELECT COALESCE(MAX(sequence), 0) FROM after_sale_events",
        )
        .fetch_one(pool)
        .await)
        .map_err(query_error("read the latest event sequence"))
    }

    /// The highest sequence pruning ever removed, 0 when none was: every
    /// event up to it is gone (see `prune`).
    pub(crate) async fn pruned_through(&self) -> Result<i64, StoreError> {
        let mut snapshot = self
            .store
            .pool
            .begin("read how far events were pruned")
            .await?;
        let pruned_through = read_pruned_through(&mut snapshot).await?;
        snapshot
            .rollback("end reading how far events were pruned")
            .await?;
        Ok(pruned_through)
    }

    /// Up to `limit` events with a sequence above `after_sequence`, in
    /// sequence order, and how far events were pruned, both from one snapshot:
    /// a page that lacks events because they were pruned always comes with
    /// the mark that says so.
    pub(crate) async fn list_after_with_pruned_through(
        &self,
        after_sequence: i64,
        limit: i64,
    ) -> Result<(Vec<StoredAfterSaleEvent>, i64), StoreError> {
        let mut snapshot = self
            .store
            .pool
            .begin("begin reading after-sale events")
            .await?;
        if let Backend::Postgres(transaction) = &mut snapshot {
            // One snapshot for both reads (PostgreSQL's default takes one per statement).
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut **transaction)
                .await
                .map_err(query_error("begin reading after-sale events"))?;
        }
        let pruned_through = read_pruned_through(&mut snapshot).await?;
        let convert = |row: StoredRow| {
            Ok(StoredAfterSaleEvent {
                sequence: row.sequence,
                record: row.record,
            })
        };
        let page = on_backend!(&mut snapshot, transaction => {
            let rows = sqlx::query_as::<_, StoredRow>(
                "SELECT sequence, client_key, msg_id, event, account_id,
                        received_at AS received_at_ms, raw_json
                 FROM after_sale_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
            )
            .bind(after_sequence)
            .bind(limit)
            .fetch(&mut **transaction);
            collect_rows(rows, "list after-sale events", &convert).await
        })?;
        // Read only: nothing to commit, and ending it releases the snapshot.
        snapshot.rollback("end reading after-sale events").await?;
        Ok((page, pruned_through))
    }

    /// Deletes the events received before `before_ms`, and every event with a
    /// lower sequence than one of them (received within the same few
    /// milliseconds, committed in a different order), so what is gone is
    /// always a prefix of the sequence: everything up to the recorded
    /// `pruned_through`, which a watcher resuming below it is told about.
    /// Returns how many were deleted. Their sequences are not handed out
    /// again (AUTOINCREMENT).
    pub(crate) async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut transaction = self
            .store
            .pool
            .begin("begin pruning after-sale events")
            .await?;
        let newest_expired: Option<i64> =
            on_backend!(&mut transaction, transaction => sqlx::query_scalar(
            "SELECT MAX(sequence) FROM after_sale_events WHERE received_at < $1",
        )
        .bind(before_ms)
        .fetch_one(&mut **transaction)
        .await)
            .map_err(query_error("find the after-sale events to prune"))?;
        let Some(pruned_through) = newest_expired else {
            return Ok(0);
        };
        let pruned = on_backend!(&mut transaction, transaction => sqlx::query(
            "DELETE FROM after_sale_events WHERE sequence <= $1",
        )
        .bind(pruned_through)
        .execute(&mut **transaction)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("prune after-sale events"))?;
        // Text, as every meta value; it only grows, since everything below
        // the previous mark is already gone.
        on_backend!(&mut transaction, transaction => sqlx::query(
            "INSERT INTO meta (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(PRUNED_THROUGH_META)
        .bind(pruned_through.to_string())
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("record how far events were pruned"))?;
        transaction
            .commit("commit pruning after-sale events")
            .await?;
        Ok(pruned)
    }
}

/// The `meta` row holding the highest pruned sequence.
const PRUNED_THROUGH_META: &str = "after_sale_events.pruned_through";

async fn read_pruned_through(transaction: &mut Transaction) -> Result<i64, StoreError> {
    let value: Option<String> = on_backend!(transaction, transaction => sqlx::query_scalar(
        "SELECT value FROM meta WHERE name = $1",
    )
    .bind(PRUNED_THROUGH_META)
    .fetch_optional(&mut **transaction)
    .await)
    .map_err(query_error("read how far events were pruned"))?;
    value.map_or(Ok(0), |value| {
        value.parse().map_err(|_| {
            StoreError::Corrupt(format!(
                "meta {PRUNED_THROUGH_META} is not a sequence: {value:?}"
            ))
        })
    })
}

/// A connection of the writer's own, out of the pool (see `open_writer`).
async fn open_writer_connection(store: &Store) -> Result<Connection, StoreError> {
    Ok(match &store.pool {
        Backend::Sqlite(pool) => {
            let mut connection = pool
                .acquire()
                .await
                .map_err(query_error("open the event writer's connection"))?
                .detach();
            sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut connection)
                .await
                .map_err(query_error("make the event writer's commits durable"))?;
            Backend::Sqlite(connection)
        }
        // PostgreSQL's commits are durable as they are (synchronous_commit on).
        Backend::Postgres(pool) => Backend::Postgres(
            pool.acquire()
                .await
                .map_err(query_error("open the event writer's connection"))?
                .detach(),
        ),
    })
}

/// The one connection that inserts events (see `open_writer`).
pub(crate) struct AfterSaleEventWriter {
    /// None after a failed group: the next group opens a new connection, so
    /// a database that restarted (PostgreSQL) does not leave the writer on a
    /// dead one for good.
    connection: Option<Connection>,
    store: Store,
}

/// The advisory lock PostgreSQL writers take for a group: sequences are drawn
/// and committed by one writer at a time across every daemon, so a watcher
/// reading `sequence > cursor` never passes one still uncommitted.
const EVENT_WRITER_LOCK: i64 = 0x646f_7579_696e_0001;

impl AfterSaleEventWriter {
    /// Inserts `records` in one transaction, committed before this returns.
    /// Each gets its new sequence, or `None` when its app already has an event
    /// with its Msg-Id (a repeated push), also within the group.
    pub(crate) async fn insert_group(
        &mut self,
        records: &[&AfterSaleEventRecord],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => open_writer_connection(&self.store).await?,
        };
        let inserted = Self::insert_group_on(&mut connection, records).await;
        if inserted.is_ok() {
            self.connection = Some(connection);
        }
        inserted
    }

    async fn insert_group_on(
        connection: &mut Connection,
        records: &[&AfterSaleEventRecord],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let postgres = matches!(connection, Backend::Postgres(_));
        on_backend!(connection, connection => {
            let mut transaction = connection
                .begin()
                .await
                .map_err(query_error("begin storing events"))?;
            if postgres {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(EVENT_WRITER_LOCK)
                    .execute(&mut *transaction)
                    .await
                    .map_err(query_error("take the event writers' lock"))?;
            }
            let mut sequences = Vec::with_capacity(records.len());
            for record in records {
                let sequence: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO after_sale_events
                         (client_key, msg_id, event, account_id, received_at, raw_json)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (client_key, msg_id) DO NOTHING
                     RETURNING sequence",
                )
                .bind(&record.client_key)
                .bind(&record.msg_id)
                .bind(&record.event)
                .bind(&record.account_id)
                .bind(record.received_at_ms)
                .bind(&record.raw_json)
                .fetch_optional(&mut *transaction)
                .await
                .map_err(query_error("store an event"))?;
                sequences.push(sequence);
            }
            if postgres && let Some(latest) = sequences.iter().flatten().max() {
                // Delivered at the commit: watchers on every daemon wake.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(super::CLUSTER_CHANNEL)
                    .bind(super::ClusterMessage::Events(*latest).to_payload())
                    .execute(&mut *transaction)
                    .await
                    .map_err(query_error("tell the other daemons about stored events"))?;
            }
            transaction
                .commit()
                .await
                .map_err(query_error("commit stored events"))?;
            Ok(sequences)
        })
    }

    /// Closes the connection (before the pool closes, at shutdown).
    pub(crate) async fn close(self) {
        if let Some(connection) = self.connection {
            on_backend!(connection, connection => {
                let _ = connection.close().await;
            });
        }
    }
}
