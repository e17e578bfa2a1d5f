//! The `clients` table: the API clients allowed to call the daemon, by the
//! SHA-256 of their key (never the key), with their scopes and bounds.

use sqlx::SqliteConnection;

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
        let inserted = sqlx::query(
            "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        )
        .bind(&client.name)
        .bind(&client.key_sha256)
        .bind(json_list(&client.scopes))
        .bind(client.apps.as_deref().map(json_list))
        .bind(client.merchants.as_deref().map(json_list))
        .bind(client.source.as_str())
        .bind(now_ms)
        .execute(&self.store.pool)
        .await
        .map_err(query_error("store a client"))?
        .rows_affected();
        Ok(inserted > 0)
    }

    /// Removes a client; returns false when there was no such client.
    pub(crate) async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM clients WHERE name = ?")
            .bind(name)
            .execute(&self.store.pool)
            .await
            .map_err(query_error("remove a client"))?
            .rows_affected();
        Ok(removed > 0)
    }

    /// Every client, by name.
    pub(crate) async fn list(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ClientRow>(
            "SELECT name, key_sha256, scopes, apps, merchants, source FROM clients ORDER BY name",
        )
        .fetch_all(&self.store.pool)
        .await
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
    connection: &mut SqliteConnection,
    clients: &[ClientRecord],
    now_ms: i64,
) -> Result<(), StoreError> {
    for client in clients {
        sqlx::query(
            "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'config', ?6)
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
        .execute(&mut *connection)
        .await
        .map_err(query_error("sync a configured client"))?;
    }
    let configured_clients: Vec<&str> = clients.iter().map(|client| client.name.as_str()).collect();
    sqlx::query(
        "DELETE FROM clients WHERE source = 'config'
         AND name NOT IN (SELECT value FROM json_each(?1))",
    )
    .bind(serde_json::to_string(&configured_clients).unwrap_or_default())
    .execute(connection)
    .await
    .map_err(query_error("remove clients no longer configured"))?;
    Ok(())
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_json_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("a stored list is not JSON: {error}")))
}
