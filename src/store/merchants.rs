//! The `merchants` table: which app (`client_key`) serves each merchant
//! (`account_id`). A merchant goes with its app (ON DELETE CASCADE).

use sqlx::SqliteConnection;

use super::{Source, Store, StoreError, apps, collect_rows, parse_client_key, query_error};
use crate::domain::{AccountId, ClientKey};

#[derive(Debug, Clone)]
pub(crate) struct MerchantRecord {
    pub(crate) account_id: AccountId,
    pub(crate) client_key: ClientKey,
    pub(crate) source: Source,
}

/// A `merchants` row as the list query returns it, before parsing.
#[derive(sqlx::FromRow)]
struct MerchantRow {
    account_id: String,
    client_key: String,
    source: String,
}

/// The queries on `merchants`; from `Store::merchants`.
pub(crate) struct MerchantTable<'store> {
    pub(super) store: &'store Store,
}

impl MerchantTable<'_> {
    /// Adds a merchant or moves it to another app. Returns true when it is new,
    /// or None when the app does not exist.
    pub(crate) async fn put(
        &self,
        account_id: &AccountId,
        client_key: &ClientKey,
        source: Source,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let mut transaction = self
            .store
            .pool
            .begin()
            .await
            .map_err(query_error("begin put_merchant"))?;
        if !apps::exists(&mut transaction, client_key).await? {
            return Ok(None);
        }
        let existed = sqlx::query_scalar::<_, i64>("SELECT 1 FROM merchants WHERE account_id = ?")
            .bind(account_id.as_str())
            .fetch_optional(&mut *transaction)
            .await
            .map_err(query_error("look up a merchant"))?
            .is_some();
        sqlx::query(
            "INSERT INTO merchants (account_id, client_key, source, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account_id) DO UPDATE
             SET client_key = excluded.client_key, source = excluded.source",
        )
        .bind(account_id.as_str())
        .bind(client_key.expose())
        .bind(source.as_str())
        .bind(now_ms)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("store a merchant"))?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit put_merchant"))?;
        Ok(Some(!existed))
    }

    /// Removes a merchant; returns false when there was no such merchant.
    pub(crate) async fn remove(&self, account_id: &AccountId) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM merchants WHERE account_id = ?")
            .bind(account_id.as_str())
            .execute(&self.store.pool)
            .await
            .map_err(query_error("remove a merchant"))?
            .rows_affected();
        Ok(removed > 0)
    }

    /// The merchant's app and where it was declared, or None when there is
    /// no such merchant: what the registry checks before a change.
    pub(crate) async fn find(
        &self,
        account_id: &AccountId,
    ) -> Result<Option<MerchantRecord>, StoreError> {
        let row = sqlx::query_as::<_, MerchantRow>(
            "SELECT account_id, client_key, source FROM merchants WHERE account_id = ?",
        )
        .bind(account_id.as_str())
        .fetch_optional(&self.store.pool)
        .await
        .map_err(query_error("look up a merchant"))?;
        row.map(|row| {
            Ok(MerchantRecord {
                account_id: account_id.clone(),
                client_key: parse_client_key(&row.client_key)?,
                source: Source::parse(&row.source)?,
            })
        })
        .transpose()
    }

    /// Every merchant, by account id.
    pub(crate) async fn list(&self) -> Result<Vec<MerchantRecord>, StoreError> {
        let rows = sqlx::query_as::<_, MerchantRow>(
            "SELECT account_id, client_key, source FROM merchants ORDER BY account_id",
        )
        .fetch(&self.store.pool);
        collect_rows(rows, "list merchants", |row| {
            Ok(MerchantRecord {
                account_id: AccountId::parse(&row.account_id)
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                client_key: parse_client_key(&row.client_key)?,
                source: Source::parse(&row.source)?,
            })
        })
        .await
    }
}

/// How many merchants an app serves, inside a caller's transaction.
pub(super) async fn count_for_app(
    connection: &mut SqliteConnection,
    client_key: &ClientKey,
) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT COUNT(*) FROM merchants WHERE client_key = ?")
        .bind(client_key.expose())
        .fetch_one(connection)
        .await
        .map_err(query_error("count an app's merchants"))
}

/// The config-sync part for merchants, inside `Store::sync_config`'s
/// transaction (after the apps): stores every configured merchant (source
/// `config`) and removes config-sourced merchants the file no longer declares.
pub(super) async fn replace_configured(
    connection: &mut SqliteConnection,
    merchants: &[(AccountId, ClientKey)],
    now_ms: i64,
) -> Result<(), StoreError> {
    for (account_id, client_key) in merchants {
        sqlx::query(
            "INSERT INTO merchants (account_id, client_key, source, created_at)
             VALUES (?1, ?2, 'config', ?3)
             ON CONFLICT (account_id) DO UPDATE
             SET client_key = excluded.client_key, source = 'config'",
        )
        .bind(account_id.as_str())
        .bind(client_key.expose())
        .bind(now_ms)
        .execute(&mut *connection)
        .await
        .map_err(query_error("sync a configured merchant"))?;
    }
    let configured_accounts: Vec<&str> = merchants
        .iter()
        .map(|(account, _)| account.as_str())
        .collect();
    let configured_accounts = serde_json::to_string(&configured_accounts).unwrap_or_default();
    sqlx::query(
        "DELETE FROM merchants WHERE source = 'config'
         AND account_id NOT IN (SELECT value FROM json_each(?1))",
    )
    .bind(&configured_accounts)
    .execute(connection)
    .await
    .map_err(query_error("remove merchants no longer configured"))?;
    Ok(())
}
