//! The `merchants` table: which app (`client_key`) serves each merchant
//! (`account_id`). A merchant goes with its app (ON DELETE CASCADE).

use super::backend::{Transaction, on_backend};
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
        let mut transaction = self.store.pool.begin("begin put_merchant").await?;
        if !apps::exists(&mut transaction, client_key).await? {
            return Ok(None);
        }
        let existed = on_backend!(&mut transaction, transaction => sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM merchants WHERE account_id = $1)",
        )
        .bind(account_id.as_str())
        .fetch_one(&mut **transaction)
        .await)
        .map_err(query_error("look up a merchant"))?;
        on_backend!(&mut transaction, transaction => sqlx::query(
            "INSERT INTO merchants (account_id, client_key, source, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (account_id) DO UPDATE
             SET client_key = excluded.client_key, source = excluded.source",
        )
        .bind(account_id.as_str())
        .bind(client_key.expose())
        .bind(source.as_str())
        .bind(now_ms)
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("store a merchant"))?;
        transaction.commit("commit put_merchant").await?;
        self.store.announce_registry_change().await;
        Ok(Some(!existed))
    }

    /// Removes a merchant; returns false when there was no such merchant.
    pub(crate) async fn remove(&self, account_id: &AccountId) -> Result<bool, StoreError> {
        let removed = on_backend!(&self.store.pool, pool => sqlx::query(
            "DELETE FROM merchants WHERE account_id = $1",
        )
        .bind(account_id.as_str())
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(query_error("remove a merchant"))?;
        self.store.announce_registry_change().await;
        Ok(removed > 0)
    }

    /// The merchant's app and where it was declared, or None when there is
    /// no such merchant: what the registry checks before a change.
    pub(crate) async fn find(
        &self,
        account_id: &AccountId,
    ) -> Result<Option<MerchantRecord>, StoreError> {
        let row = on_backend!(&self.store.pool, pool => sqlx::query_as::<_, MerchantRow>(
            "SELECT account_id, client_key, source FROM merchants WHERE account_id = $1",
        )
        .bind(account_id.as_str())
        .fetch_optional(pool)
        .await)
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
        let convert = |row: MerchantRow| {
            Ok(MerchantRecord {
                account_id: AccountId::parse(&row.account_id)
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                client_key: parse_client_key(&row.client_key)?,
                source: Source::parse(&row.source)?,
            })
        };
        on_backend!(&self.store.pool, pool => {
            let rows = sqlx::query_as::<_, MerchantRow>(
                "SELECT account_id, client_key, source FROM merchants ORDER BY account_id",
            )
            .fetch(pool);
            collect_rows(rows, "list merchants", &convert).await
        })
    }
}

/// How many merchants an app serves, inside a caller's transaction.
pub(super) async fn count_for_app(
    transaction: &mut Transaction,
    client_key: &ClientKey,
) -> Result<i64, StoreError> {
    on_backend!(transaction, transaction => sqlx::query_scalar(
        "SELECT COUNT(*) FROM merchants WHERE client_key = $1",
    )
    .bind(client_key.expose())
    .fetch_one(&mut **transaction)
    .await)
    .map_err(query_error("count an app's merchants"))
}

/// The config-sync part for merchants, inside `Store::sync_config`'s
/// transaction (after the apps): stores every configured merchant (source
/// `config`) and removes config-sourced merchants the file no longer declares.
pub(super) async fn replace_configured(
    transaction: &mut Transaction,
    merchants: &[(AccountId, ClientKey)],
    now_ms: i64,
) -> Result<(), StoreError> {
    for (account_id, client_key) in merchants {
        on_backend!(&mut *transaction, transaction => sqlx::query(
            "INSERT INTO merchants (account_id, client_key, source, created_at)
             VALUES ($1, $2, 'config', $3)
             ON CONFLICT (account_id) DO UPDATE
             SET client_key = excluded.client_key, source = 'config'",
        )
        .bind(account_id.as_str())
        .bind(client_key.expose())
        .bind(now_ms)
        .execute(&mut **transaction)
        .await
        .map(drop))
        .map_err(query_error("sync a configured merchant"))?;
    }
    let configured: std::collections::HashSet<&str> = merchants
        .iter()
        .map(|(account, _)| account.as_str())
        .collect();
    let stored = super::config_sourced_keys(
        transaction,
        "SELECT account_id FROM merchants WHERE source = 'config'",
    )
    .await?;
    for stale in stored {
        if !configured.contains(stale.as_str()) {
            on_backend!(&mut *transaction, transaction => sqlx::query(
                "DELETE FROM merchants WHERE account_id = $1 AND source = 'config'",
            )
            .bind(&stale)
            .execute(&mut **transaction)
            .await
            .map(drop))
            .map_err(query_error("remove merchants no longer configured"))?;
        }
    }
    Ok(())
}
