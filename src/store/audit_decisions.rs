//! The `after_sale_audit_decisions` table: each refund decision sent through
//! the daemon, keyed by (account_id, order_id, certificate_id), from the
//! intent written before sending to Douyin's answer.

use super::backend::on_backend;
use super::{Store, StoreError, query_error};
use crate::domain::{RefundDecision, RefundKey};

/// Where a recorded decision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecisionState {
    /// Being sent, or the daemon stopped while it was.
    Pending,
    /// Douyin accepted it.
    Applied,
    /// Douyin answered an error code: it applied nothing.
    Refused,
    /// The request may have reached Douyin, but no answer came.
    Unknown,
}

impl DecisionState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Refused => "refused",
            Self::Unknown => "unknown",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        [Self::Pending, Self::Applied, Self::Refused, Self::Unknown]
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown decision state {text:?}")))
    }
}

/// One recorded decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecisionRecord {
    pub(crate) decision: RefundDecision,
    pub(crate) state: DecisionState,
    /// Douyin's answer body as received, for an applied or refused decision.
    pub(crate) answer_body: Option<String>,
    pub(crate) logid: String,
    /// The API client that decided.
    pub(crate) client: String,
}

#[derive(sqlx::FromRow)]
struct DecisionRow {
    approve: i64,
    reject_reason: String,
    state: String,
    answer_body: Option<String>,
    logid: String,
    client: String,
}

/// Who sends a decision, as recorded with it.
pub(crate) struct DecisionAuthor<'a> {
    /// The API client's name.
    pub(crate) client: &'a str,
    /// The app that sends it, by client key.
    pub(crate) app: &'a str,
}

/// The queries on `after_sale_audit_decisions`; from `Store::audit_decisions`.
pub(crate) struct AuditDecisionTable<'store> {
    pub(super) store: &'store Store,
}

impl AuditDecisionTable<'_> {
    pub(crate) async fn get(&self, key: &RefundKey) -> Result<Option<DecisionRecord>, StoreError> {
        let row = on_backend!(&self.store.pool, pool => sqlx::query_as::<_, DecisionRow>(
            "SELECT approve, reject_reason, state, answer_body, logid, client
             FROM after_sale_audit_decisions
             WHERE account_id = $1 AND order_id = $2 AND certificate_id = $3",
        )
        .bind(key.account_id.as_str())
        .bind(&key.order_id)
        .bind(&key.certificate_id)
        .fetch_optional(pool)
        .await)
        .map_err(query_error("read a refund decision"))?;
        row.map(|row| {
            Ok(DecisionRecord {
                decision: match row.approve {
                    1 => RefundDecision::Approve,
                    _ => RefundDecision::Reject {
                        reason: row.reject_reason,
                    },
                },
                state: DecisionState::parse(&row.state)?,
                answer_body: row.answer_body,
                logid: row.logid,
                client: row.client,
            })
        })
        .transpose()
    }

    /// Writes the intent to send `decision` (state pending), replacing what
    /// was recorded for the refund: the caller has decided that it may.
    pub(crate) async fn record_intent(
        &self,
        key: &RefundKey,
        decision: &RefundDecision,
        author: &DecisionAuthor<'_>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query(
            "INSERT INTO after_sale_audit_decisions
               (account_id, order_id, certificate_id, approve, reject_reason, state,
                answer_body, logid, client, app, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', NULL, '', $6, $7, $8, $8)
             ON CONFLICT (account_id, order_id, certificate_id) DO UPDATE
             SET approve = excluded.approve, reject_reason = excluded.reject_reason,
                 state = 'pending', answer_body = NULL, logid = '', client = excluded.client,
                 app = excluded.app, updated_at = excluded.updated_at",
        )
        .bind(key.account_id.as_str())
        .bind(&key.order_id)
        .bind(&key.certificate_id)
        .bind(i64::from(decision.approves()))
        .bind(decision.reject_reason())
        .bind(author.client)
        .bind(author.app)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(drop))
        .map_err(query_error("record a refund decision's intent"))?;
        Ok(())
    }

    /// Records how a sent decision ended.
    pub(crate) async fn record_outcome(
        &self,
        key: &RefundKey,
        state: DecisionState,
        answer_body: Option<&str>,
        logid: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query(
            "UPDATE after_sale_audit_decisions
             SET state = $4, answer_body = $5, logid = $6, updated_at = $7
             WHERE account_id = $1 AND order_id = $2 AND certificate_id = $3",
        )
        .bind(key.account_id.as_str())
        .bind(&key.order_id)
        .bind(&key.certificate_id)
        .bind(state.as_str())
        .bind(answer_body)
        .bind(logid)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(drop))
        .map_err(query_error("record a refund decision's outcome"))?;
        Ok(())
    }

    /// Removes a pending intent whose request provably never left the
    /// daemon, so nothing suggests it was sent.
    pub(crate) async fn forget_intent(&self, key: &RefundKey) -> Result<(), StoreError> {
        on_backend!(&self.store.pool, pool => sqlx::query(
            "DELETE FROM after_sale_audit_decisions
             WHERE account_id = $1 AND order_id = $2 AND certificate_id = $3 AND state = 'pending'",
        )
        .bind(key.account_id.as_str())
        .bind(&key.order_id)
        .bind(&key.certificate_id)
        .execute(pool)
        .await
        .map(drop))
        .map_err(query_error("forget a refund decision that was never sent"))?;
        Ok(())
    }
}
