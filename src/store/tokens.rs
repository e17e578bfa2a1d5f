//! The `tokens` table: one row per app with its current token (sealed and
//! bound to the row), its generation, expiry and the last fetch failure.

use sqlx::AssertSqlSafe;

use super::backend::{Transaction, on_backend};
use super::{SealedColumn, Store, StoreError, collect_rows, parse_client_key, query_error};
use crate::domain::{AccessToken, ClientKey};

/// The stored token state of one app.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenRecord {
    pub(crate) access_token: Option<AccessToken>,
    pub(crate) generation: i64,
    pub(crate) fetched_at_ms: Option<i64>,
    pub(crate) expires_at_ms: Option<i64>,
    pub(crate) invalidated_at_ms: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_at_ms: Option<i64>,
    pub(crate) last_error_permanent: bool,
    pub(crate) consecutive_failures: i64,
}

/// A freshly fetched token, to be committed before anyone uses it.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub client_key: &'a ClientKey,
    pub access_token: &'a AccessToken,
    pub generation: i64,
    pub fetched_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A failed fetch, recorded without touching the stored (still valid) token.
#[derive(Debug, Clone)]
pub(crate) struct FetchFailure<'a> {
    pub(crate) client_key: &'a ClientKey,
    pub(crate) message: &'a str,
    pub(crate) at_ms: i64,
    pub(crate) permanent: bool,
    pub(crate) consecutive_failures: i64,
}

/// One app's row as `load_all` returns it (an app without a token row gets
/// the defaults), before unsealing.
#[derive(sqlx::FromRow)]
pub(super) struct TokenRow {
    client_key: String,
    access_token: Option<String>,
    generation: i64,
    fetched_at: Option<i64>,
    expires_at: Option<i64>,
    invalidated_at: Option<i64>,
    last_error: Option<String>,
    last_error_at: Option<i64>,
    last_error_permanent: i64,
    consecutive_failures: i64,
}

/// Every app's token row (apps without one get the defaults).
const LOAD_TOKENS: &str =
    "SELECT a.client_key, t.access_token, COALESCE(t.generation, 0) AS generation,
        t.fetched_at, t.expires_at, t.invalidated_at, t.last_error, t.last_error_at,
        COALESCE(t.last_error_permanent, 0) AS last_error_permanent,
        COALESCE(t.consecutive_failures, 0) AS consecutive_failures
 FROM apps a LEFT JOIN tokens t ON t.client_key = a.client_key";

/// What a sealed token is bound to: its column and its app.
pub(super) fn token_binding(client_key: &ClientKey) -> String {
    format!("tokens.access_token/{}", client_key.expose())
}

/// The sealed tokens, for first sealing and key rotation.
pub(super) const SEALED_TOKENS: SealedColumn = SealedColumn {
    read: "SELECT client_key, access_token FROM tokens WHERE access_token IS NOT NULL",
    write: "UPDATE tokens SET access_token = $2 WHERE client_key = $1",
    binding: token_binding,
};

/// The queries on `tokens`; from `Store::tokens`.
pub struct TokenTable<'store> {
    pub(super) store: &'store Store,
}

impl TokenTable<'_> {
    /// Every app's token row (apps without one get an empty record).
    pub(crate) async fn load_all(&self) -> Result<Vec<(ClientKey, TokenRecord)>, StoreError> {
        let convert = |row: TokenRow| self.record_of(row);
        on_backend!(&self.store.pool, pool => {
            let rows = sqlx::query_as::<_, TokenRow>(LOAD_TOKENS).fetch(pool);
            collect_rows(rows, "load tokens", &convert).await
        })
    }

    /// One app's token row, or None when the app has none (or is gone).
    pub(crate) async fn load_one(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = on_backend!(&self.store.pool, pool => sqlx::query_as::<_, TokenRow>(
            AssertSqlSafe(format!("{LOAD_TOKENS} WHERE a.client_key = $1")),
        )
        .bind(client_key.expose())
        .fetch_optional(pool)
        .await)
        .map_err(query_error("load a token"))?;
        row.map(|row| self.record_of(row).map(|(_, record)| record))
            .transpose()
    }

    /// A row unsealed and parsed.
    pub(super) fn record_of(&self, row: TokenRow) -> Result<(ClientKey, TokenRecord), StoreError> {
        let client_key = parse_client_key(&row.client_key)?;
        let access_token = match row.access_token {
            Some(sealed) => Some(AccessToken::new(
                self.store
                    .master_key
                    .open(&token_binding(&client_key), &sealed)?,
            )),
            None => None,
        };
        Ok((
            client_key,
            TokenRecord {
                access_token,
                generation: row.generation,
                fetched_at_ms: row.fetched_at,
                expires_at_ms: row.expires_at,
                invalidated_at_ms: row.invalidated_at,
                last_error: row.last_error,
                last_error_at_ms: row.last_error_at,
                last_error_permanent: row.last_error_permanent != 0,
                consecutive_failures: row.consecutive_failures,
            },
        ))
    }

    /// Commits a fetched token (and clears the error state) in one statement.
    pub async fn save_fetched(&self, token: &NewToken<'_>) -> Result<(), StoreError> {
        let sealed_token = self.store.master_key.seal(
            &token_binding(token.client_key),
            token.access_token.expose(),
        );
        on_backend!(&self.store.pool, pool => sqlx::query(
            "INSERT INTO tokens (client_key, access_token, generation, fetched_at, expires_at,
                                 invalidated_at, last_error, last_error_at, last_error_permanent,
                                 consecutive_failures)
             VALUES ($1, $2, $3, $4, $5, NULL, NULL, NULL, 0, 0)
             ON CONFLICT (client_key) DO UPDATE
             SET access_token = excluded.access_token, generation = excluded.generation,
                 fetched_at = excluded.fetched_at, expires_at = excluded.expires_at,
                 invalidated_at = NULL, last_error = NULL, last_error_at = NULL,
                 last_error_permanent = 0, consecutive_failures = 0",
        )
        .bind(token.client_key.expose())
        .bind(&sealed_token)
        .bind(token.generation)
        .bind(token.fetched_at_ms)
        .bind(token.expires_at_ms)
        .execute(pool)
        .await
        .map(drop))
        .map_err(query_error("save a fetched token"))?;
        Ok(())
    }

    /// Records a failed fetch; the stored token stays as it is.
    pub(crate) async fn record_fetch_failure(
        &self,
        failure: &FetchFailure<'_>,
    ) -> Result<(), StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query(
            "UPDATE tokens SET last_error = $2, last_error_at = $3, last_error_permanent = $4,
                               consecutive_failures = $5
             WHERE client_key = $1",
        )
        .bind(failure.client_key.expose())
        .bind(failure.message)
        .bind(failure.at_ms)
        .bind(i64::from(failure.permanent))
        .bind(failure.consecutive_failures)
        .execute(pool)
        .await
        .map(drop))
        .map_err(query_error("record a fetch failure"))?;
        Ok(())
    }

    /// Marks the app's token dead if it is still the given generation, so that
    /// a restart never loads a token Douyin has rejected.
    pub(crate) async fn mark_invalidated(
        &self,
        client_key: &ClientKey,
        generation: i64,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = on_backend!(&self.store.pool, pool => sqlx::query(
            "UPDATE tokens SET invalidated_at = $3
             WHERE client_key = $1 AND generation = $2 AND invalidated_at IS NULL",
        )
        .bind(client_key.expose())
        .bind(generation)
        .bind(at_ms)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("invalidate a token"))?;
        if changed > 0
            && let Some(cluster) = self.store.cluster()
        {
            // Every daemon drops this generation too (compare-and-invalidate is cluster-wide).
            cluster
                .announce(&super::ClusterMessage::Token(client_key.clone()))
                .await?;
        }
        Ok(changed > 0)
    }
}

/// Gives a stored (new or changed) app its token row, inside the caller's
/// transaction. A new secret deserves a new try: a permanent failure is forgotten.
pub(super) async fn prepare_row_for_a_new_secret(
    transaction: &mut Transaction,
    client_key: &ClientKey,
) -> Result<(), StoreError> {
    on_backend!(transaction, transaction => sqlx::query(
        "INSERT INTO tokens (client_key) VALUES ($1)
         ON CONFLICT (client_key) DO UPDATE SET last_error_permanent = 0",
    )
    .bind(client_key.expose())
    .execute(&mut **transaction)
    .await
    .map(drop))
    .map_err(query_error("prepare an app's token row"))?;
    Ok(())
}

/// Gives a configured app its token row if it has none, inside the config
/// sync's transaction; an existing row is left as it is.
pub(super) async fn prepare_row_if_missing(
    transaction: &mut Transaction,
    client_key: &ClientKey,
) -> Result<(), StoreError> {
    on_backend!(transaction, transaction => sqlx::query(
        "INSERT INTO tokens (client_key) VALUES ($1) ON CONFLICT (client_key) DO NOTHING",
    )
    .bind(client_key.expose())
    .execute(&mut **transaction)
    .await
    .map(drop))
    .map_err(query_error("prepare a configured app's token row"))?;
    Ok(())
}
