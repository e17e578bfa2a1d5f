//! The `clients` table: the API clients allowed to call the daemon, by the
//! SHA-256 of their key (never the key), with their scopes and bounds.

use super::backend::{Transaction, on_backend};
use super::{Source, Store, StoreError, query_error};

/// An API client as stored: the key's SHA-256 in hex, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientRecord {
    pub(crate) name: String,
    pub(crate) key_sha256: String,
    pub(crate) scopes: Vec<String>,
    /// None: every app.
    pub(crate) apps: Option<Vec<String>>,
    /// None: every merchant.
    pub(crate) merchants: Option<Vec<String>>,
    pub(crate) source: Source,
}

/// A `clients` row as stored: the lists are JSON arrays.
#[derive(sqlx::FromRow)]
struct ClientRow {
    name: String,
    key_sha256: String,
    scopes: String,
    apps: Option<String>,
    merchants: Option<String>,
    source: String,
}

/// The queries on `clients`; from `Store::clients`.
pub(crate) struct ClientTable<'store> {
    pub(super) store: &'store Store,
}

impl ClientTable<'_> {
    /// Adds a client; returns false when one of that name exists already.
    pub(crate) async fn create(
        &self,
        client: &ClientRecord,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let inserted = on_backend!(&self.store.pool, pool => sqlx::query(
            "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&client.name)
        .bind(&client.key_sha256)
        .bind(json_list(&client.scopes))
        .bind(client.apps.as_deref().map(json_list))
        .bind(client.merchants.as_deref().map(json_list))
        .bind(client.source.as_str())
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("store a client"))?;
        self.store.announce_registry_change().await;
        Ok(inserted > 0)
    }

    /// Removes a client; returns false when there was no such client.
    pub(crate) async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let removed = on_backend!(&self.store.pool, pool => sqlx::query(
            "DELETE FROM clients WHERE name = $1",
        )
        .bind(name)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("remove a client"))?;
        self.store.announce_registry_change().await;
        Ok(removed > 0)
    }

    /// Every client, by name.
    pub(crate) async fn list(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let rows = on_backend!(&self.store.pool, pool => sqlx::query_as::<_, ClientRow>(
            "SELECT name, key_sha256, scopes, apps, merchants, source FROM clients ORDER BY name",
        )
        .fetch_all(pool)
        .await)
        .map_err(query_error("list clients"))?;
        rows.into_iter()
            .map(|row| {
                Ok(ClientRecord {
                    scopes: parse_json_list(&row.scopes)?,
                    apps: row.apps.as_deref().map(parse_json_list).transpose()?,
                    merchants: row.merchants.as_deref().map(parse_json_list).transpose()?,
                    source: Source::parse(&row.source)?,
                    name: row.name,
                    key_sha256: row.key_sha256,
                })
            })
            .collect()
    }
}

/// The config-sync part for clients, inside `Store::sync_config`'s
/// transaction: stores every configured client (source `config`) and removes
/// config-sourced clients the file no longer declares.
pub(super) async fn replace_configured(
    transaction: &mut Transaction,
    clients: &[ClientRecord],
    now_ms: i64,
) -> Result<(), StoreError> {
    for client in clients {
        on_backend!(&mut *transaction, transaction => sqlx::query(
            "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
             VALUES ($1, $2, $3, $4, $5, 'config', $6)
             ON CONFLICT (name) DO UPDATE
             SET key_sha256 = excluded.key_sha256, scopes = excluded.scopes, apps = excluded.apps,
                 merchants = excluded.merchants, source = 'config'",
        )
        .bind(&client.name)
        .bind(&client.key_sha256)
        .bind(json_list(&client.scopes))
        .bind(client.apps.as_deref().map(json_list))
        .bind(client.merchants.as_deref().map(json_list))
        .bind(now_ms)
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("sync a configured client"))?;
    }
    let stored = super::config_sourced_keys(
        transaction,
        "SELECT name FROM clients WHERE source = 'config'",
    )
    .await?;
    for stale in stored {
        if !clients.iter().any(|client| client.name == stale) {
            on_backend!(&mut *transaction, transaction => sqlx::query(
                "DELETE FROM clients WHERE name = $1 AND source = 'config'",
            )
            .bind(&stale)
            .execute(&mut **transaction)
            .await
            .map(drop))
            .map_err(query_error("remove clients no longer configured"))?;
        }
    }
    Ok(())
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_json_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("a stored list is not JSON: {error}")))
}
