//! The `apps` table: each app's `client_key` and its secret, sealed and bound
//! to the row, with where the app was declared.

use super::backend::{Transaction, on_backend};
use super::{
    SealedColumn, Source, Store, StoreError, collect_rows, merchants, parse_client_key,
    query_error, tokens,
};
use crate::domain::{ClientKey, ClientSecret};
use crate::sealing::MasterKey;

/// An app as stored, with its secret unsealed.
#[derive(Debug, Clone)]
pub(crate) struct AppRecord {
    pub(crate) client_key: ClientKey,
    pub(crate) client_secret: ClientSecret,
    pub(crate) source: Source,
    pub(crate) merchant_count: i64,
}

/// An `apps` row as the list query returns it, before unsealing and parsing.
#[derive(sqlx::FromRow)]
struct AppRow {
    client_key: String,
    client_secret: String,
    source: String,
    merchant_count: i64,
}

/// What a sealed secret is bound to: its column and its app.
fn secret_binding(client_key: &ClientKey) -> String {
    format!("apps.client_secret/{}", client_key.expose())
}

/// The sealed secrets, for first sealing and key rotation.
pub(super) const SEALED_SECRETS: SealedColumn = SealedColumn {
    read: "SELECT client_key, client_secret FROM apps",
    write: "UPDATE apps SET client_secret = $2 WHERE client_key = $1",
    binding: secret_binding,
};

/// The queries on `apps`; from `Store::apps`.
pub struct AppTable<'store> {
    pub(super) store: &'store Store,
}

impl AppTable<'_> {
    /// Adds an app or replaces its secret. Returns true when it is new.
    pub async fn put(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
        source: Source,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.store.pool.begin("begin put_app").await?;
        let existed = exists(&mut transaction, client_key).await?;
        let sealed_secret = self
            .store
            .master_key
            .seal(&secret_binding(client_key), client_secret.expose());
        on_backend!(&mut transaction, transaction => sqlx::query(
            "INSERT INTO apps (client_key, client_secret, source, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (client_key) DO UPDATE
             SET client_secret = excluded.client_secret, source = excluded.source,
                 updated_at = excluded.updated_at",
        )
        .bind(client_key.expose())
        .bind(&sealed_secret)
        .bind(source.as_str())
        .bind(now_ms)
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("store an app"))?;
        tokens::prepare_row_for_a_new_secret(&mut transaction, client_key).await?;
        transaction.commit("commit put_app").await?;
        self.store.announce_registry_change().await;
        Ok(!existed)
    }

    /// Removes an app with its merchants and token. Returns how many merchants
    /// went with it, or None when there was no such app.
    pub(crate) async fn remove(&self, client_key: &ClientKey) -> Result<Option<i64>, StoreError> {
        let mut transaction = self.store.pool.begin("begin remove_app").await?;
        let merchants = merchants::count_for_app(&mut transaction, client_key).await?;
        // The merchants and the token row go by the foreign keys' ON DELETE CASCADE.
        let removed = on_backend!(&mut transaction, transaction => sqlx::query(
            "DELETE FROM apps WHERE client_key = $1",
        )
        .bind(client_key.expose())
        .execute(&mut **transaction)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("remove an app"))?;
        transaction.commit("commit remove_app").await?;
        self.store.announce_registry_change().await;
        Ok((removed > 0).then_some(merchants))
    }

    /// Where an app was declared and how many merchants it serves, or None
    /// when there is no such app: what the registry checks before a change.
    pub(crate) async fn source_and_merchant_count(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<(Source, i64)>, StoreError> {
        let row = on_backend!(&self.store.pool, pool => sqlx::query_as::<_, (String, i64)>(
            "SELECT a.source,
                    (SELECT COUNT(*) FROM merchants m WHERE m.client_key = a.client_key)
             FROM apps a WHERE a.client_key = $1",
        )
        .bind(client_key.expose())
        .fetch_optional(pool)
        .await)
        .map_err(query_error("look up an app"))?;
        row.map(|(source, merchants)| Ok((Source::parse(&source)?, merchants)))
            .transpose()
    }

    /// Every app with its secret unsealed, by client key.
    pub(crate) async fn list(&self) -> Result<Vec<AppRecord>, StoreError> {
        let convert = |row: AppRow| {
            let client_key = parse_client_key(&row.client_key)?;
            let secret = self
                .store
                .master_key
                .open(&secret_binding(&client_key), &row.client_secret)?;
            Ok(AppRecord {
                client_secret: ClientSecret::parse(&secret)
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                client_key,
                source: Source::parse(&row.source)?,
                merchant_count: row.merchant_count,
            })
        };
        on_backend!(&self.store.pool, pool => {
            let rows = sqlx::query_as::<_, AppRow>(
                "SELECT a.client_key, a.client_secret, a.source,
                        (SELECT COUNT(*) FROM merchants m WHERE m.client_key = a.client_key)
                            AS merchant_count
                 FROM apps a ORDER BY a.client_key",
            )
            .fetch(pool);
            collect_rows(rows, "list apps", &convert).await
        })
    }
}

/// Whether the app exists, inside a caller's transaction.
pub(super) async fn exists(
    transaction: &mut Transaction,
    client_key: &ClientKey,
) -> Result<bool, StoreError> {
    on_backend!(transaction, transaction => sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM apps WHERE client_key = $1)",
    )
    .bind(client_key.expose())
    .fetch_one(&mut **transaction)
    .await)
    .map_err(query_error("look up an app"))
}

/// The config-sync part for apps, inside `Store::sync_config`'s transaction:
/// stores every configured app (source `config`, secret replaced), gives each
/// a token row, and removes config-sourced apps the file no longer declares.
pub(super) async fn replace_configured(
    transaction: &mut Transaction,
    master_key: &MasterKey,
    apps: &[(ClientKey, ClientSecret)],
    now_ms: i64,
) -> Result<(), StoreError> {
    for (client_key, client_secret) in apps {
        let sealed_secret = master_key.seal(&secret_binding(client_key), client_secret.expose());
        on_backend!(&mut *transaction, transaction => sqlx::query(
            "INSERT INTO apps (client_key, client_secret, source, created_at, updated_at)
             VALUES ($1, $2, 'config', $3, $3)
             ON CONFLICT (client_key) DO UPDATE
             SET source = 'config', updated_at = excluded.updated_at,
                 client_secret = excluded.client_secret",
        )
        .bind(client_key.expose())
        .bind(&sealed_secret)
        .bind(now_ms)
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("sync a configured app"))?;
        tokens::prepare_row_if_missing(&mut *transaction, client_key).await?;
    }
    let configured: Vec<&str> = apps.iter().map(|(key, _)| key.expose()).collect();
    for stale in super::config_sourced_keys(
        transaction,
        "SELECT client_key FROM apps WHERE source = 'config'",
    )
    .await?
    {
        if !configured.contains(&stale.as_str()) {
            on_backend!(&mut *transaction, transaction => sqlx::query(
                "DELETE FROM apps WHERE client_key = $1 AND source = 'config'",
            )
            .bind(&stale)
            .execute(&mut **transaction)
            .await
            .map(drop))
            .map_err(query_error("remove apps no longer configured"))?;
        }
    }
    Ok(())
}
