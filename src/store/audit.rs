//! The `audit` table: who did what with which app and token. Apps appear by
//! client key, tokens as fingerprints only; identical hand-outs arrive already counted.

use super::backend::on_backend;
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
        let mut transaction = self.store.pool.begin("begin audit append").await?;
        for record in records {
            on_backend!(&mut transaction, transaction => sqlx::query(
                "INSERT INTO audit (at, client, action, app, reason, token_fingerprint, count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(record.at_ms)
            .bind(&record.client)
            .bind(&record.action)
            .bind(&record.app)
            .bind(&record.reason)
            .bind(&record.token_fingerprint)
            .bind(record.count)
            .execute(&mut **transaction)
            .await
            .map(drop))
            .map_err(query_error("append to the audit trail"))?;
        }
        transaction.commit("commit audit append").await?;
        Ok(())
    }

    /// The newest audit lines at or after `since_ms`, newest first.
    pub(crate) async fn list(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query_as::<_, AuditRecord>(
            "SELECT at AS at_ms, client, action, app, reason, token_fingerprint, count FROM audit
             WHERE at >= $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(since_ms)
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(query_error("list the audit trail"))
    }

    /// Deletes audit lines older than `before_ms`; returns how many.
    pub(crate) async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query("DELETE FROM audit WHERE at < $1")
            .bind(before_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .map_err(query_error("prune the audit trail"))
    }
}
