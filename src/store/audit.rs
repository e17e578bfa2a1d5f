//! The `audit` table: who did what with which app and token. Apps appear by
//! client key, tokens as fingerprints only; identical hand-outs arrive already counted.

use super::{Store, StoreError, query_error};

/// One line of the audit trail. Apps and tokens appear as fingerprints.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct AuditRecord {
    pub(crate) at_ms: i64,
    pub(crate) client: String,
    pub(crate) action: String,
    pub(crate) app: String,
    pub(crate) reason: String,
    pub(crate) token_fingerprint: String,
    pub(crate) count: i64,
}

/// The queries on `audit`; from `Store::audit`.
pub(crate) struct AuditTable<'store> {
    pub(super) store: &'store Store,
}

impl AuditTable<'_> {
    /// Appends audit lines in one transaction.
    pub(crate) async fn append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let mut transaction = self
            .store
            .pool
            .begin()
            .await
            .map_err(query_error("begin audit append"))?;
        for record in records {
            sqlx::query(
                "INSERT INTO audit (at, client, action, app, reason, token_fingerprint, count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(record.at_ms)
            .bind(&record.client)
            .bind(&record.action)
            .bind(&record.app)
            .bind(&record.reason)
            .bind(&record.token_fingerprint)
            .bind(record.count)
            .execute(&mut *transaction)
            .await
            .map_err(query_error("append to the audit trail"))?;
        }
        transaction
            .commit()
            .await
            .map_err(query_error("commit audit append"))?;
        Ok(())
    }

    /// The newest audit lines at or after `since_ms`, newest first.
    pub(crate) async fn list(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query_as::<_, AuditRecord>(
            "SELECT at AS at_ms, client, action, app, reason, token_fingerprint, count FROM audit
             WHERE at >= ?1 ORDER BY at DESC, id DESC LIMIT ?2",
        )
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.store.pool)
        .await
        .map_err(query_error("list the audit trail"))
    }

    /// Deletes audit lines older than `before_ms`; returns how many.
    pub(crate) async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM audit WHERE at < ?")
            .bind(before_ms)
            .execute(&self.store.pool)
            .await
            .map_err(query_error("prune the audit trail"))?
            .rows_affected())
    }
}
