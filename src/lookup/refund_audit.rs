//! The refund decision use case (抖音码核销后退款审批): a write, made exactly
//! once for callers. Each decision is recorded per refund (account, order,
//! certificate) in the store, the intent before the request leaves and the
//! outcome after; identical decisions never travel at once (one lock per
//! refund, held by a task of its own so a caller who hangs up cancels nothing).
//!
//! The rules, by what is recorded for the refund:
//! - nothing: the decision is sent once (token first, then the turn).
//! - applied: the same decision gets the recorded answer back, Douyin is not
//!   asked again; a different one is a conflict (FAILED_PRECONDITION).
//! - refused (Douyin answered an error code, so it applied nothing): a refusal
//!   that would come back identically (invalid argument, business error) is
//!   replayed for the same decision; any other refusal (busy, rate limited,
//!   permission, token) and any different decision may be sent again.
//! - unknown (the request may have reached Douyin and no answer came), or
//!   pending left by a daemon that stopped mid-send: never resent on its own.
//!   The same decision hears AUDIT_OUTCOME_UNKNOWN (FAILED_PRECONDITION) until
//!   an operator has checked the refund with the detail or list call and
//!   resends it with `resend_after_unknown_outcome`; a different one is a conflict.
//!
//! Once the request may have reached Douyin it is never retried; the only
//! retry is after a token rejection, which Douyin's gateway answers before the
//! decision is looked at, so nothing was applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{LookupError, LookupService};
use crate::audit::{AuditAction, AuditLog};
use crate::clock::SharedClock;
use crate::domain::{ClientKey, DouyinApi, RefundAudit, RefundDecision, RefundKey};
use crate::douyin::after_sale_audit::{
    RefundAuditAnswer, decode_recorded_audit_answer, refusal_body,
};
use crate::douyin::envelope::LookupFailure;
use crate::douyin::{CallFailure, CodeClass};
use crate::store::{DecisionAuthor, DecisionRecord, DecisionState, Store, StoreError};

/// Time kept after Douyin's answer is given up on, to record the outcome and
/// answer the caller before its deadline: a write's outcome is recorded
/// before anyone hears of it.
const AUDIT_ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// Why a decision got no answer from Douyin, mapped to a status in `grpc::status`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuditError {
    /// Unknown merchant, no token, not admitted, Douyin's refusal, or a
    /// request that provably never left: nothing was applied.
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(
        "this refund was already decided: {recorded} by client {client:?} ({state}); \
         Douyin audits a refund once, so a contradicting decision is refused"
    )]
    Conflict {
        /// The recorded decision as the caller would read it ("approve", "reject (\"…\")").
        recorded: String,
        state: &'static str,
        client: String,
    },
    #[error(
        "{}: Douyin may have applied it. The daemon does not resend it; check the refund with \
         GetAfterSaleOrderDetail or ListAfterSaleOrders, and only if it was not applied send it \
         again with resend_after_unknown_outcome",
        if *.first_time {
            format!("the {decision} was sent but no usable answer came ({cause})")
        } else {
            format!("an earlier {decision} for this refund was sent and no usable answer came")
        }
    )]
    OutcomeUnknown {
        /// True for the call that sent it; false for a later repeat.
        first_time: bool,
        decision: &'static str,
        cause: String,
        logid: String,
    },
    #[error(
        "an identical decision for this refund is being sent right now; ask again shortly to read its outcome"
    )]
    InFlight,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the decision stopped unexpectedly; see the daemon's log")]
    Aborted,
}

/// An answer for the caller: Douyin's, fresh or recorded.
#[derive(Debug)]
pub(crate) struct AuditOutcome {
    pub(crate) answer: RefundAuditAnswer,
    /// True when it is the answer recorded for an earlier identical decision.
    pub(crate) replayed: bool,
}

/// The record of decisions, the trail they are written to, and one lock per
/// refund with a decision under way.
pub(crate) struct DecisionBook {
    store: Store,
    audit: AuditLog,
    clock: SharedClock,
    locks: parking_lot::Mutex<HashMap<RefundKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl DecisionBook {
    pub(crate) fn new(store: Store, audit: AuditLog, clock: SharedClock) -> Self {
        Self {
            store,
            audit,
            clock,
            locks: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, key: &RefundKey) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.locks.lock().entry(key.clone()).or_default())
    }

    /// Drops the refund's lock once nobody holds or waits for it.
    fn release(&self, key: &RefundKey) {
        let mut locks = self.locks.lock();
        if locks
            .get(key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(key);
        }
    }
}

/// Who decides, and through which app.
struct Decider<'a> {
    client: &'a str,
    app: &'a ClientKey,
}

impl LookupService {
    /// Sends `audit` to Douyin exactly once for callers, or answers from the
    /// record (see the module's rules). `client` is the deciding API client's name.
    pub(crate) async fn audit_after_sale_order(
        &self,
        audit: RefundAudit,
        client: String,
        resend_after_unknown_outcome: bool,
        deadline: Option<Instant>,
    ) -> Result<AuditOutcome, AuditError> {
        let (client_key, deadline) = self.app_and_deadline(&audit.key.account_id, deadline)?;
        let lock = self.inner.decisions.lock_for(&audit.key);
        let service = self.clone();
        // Its own task: once the request is out, the outcome is recorded
        // whether or not the caller is still there to hear it.
        let task = self.inner.tasks.spawn(
            async move {
                let latest = deadline
                    .checked_sub(AUDIT_ANSWER_MARGIN)
                    .unwrap_or(deadline);
                let outcome =
                    match tokio::time::timeout_at(latest, Arc::clone(&lock).lock_owned()).await {
                        Err(_) => Err(AuditError::InFlight),
                        Ok(_held) => {
                            let decider = Decider {
                                client: &client,
                                app: &client_key,
                            };
                            service
                                .decide(&decider, &audit, resend_after_unknown_outcome, deadline)
                                .await
                        }
                    };
                drop(lock);
                service.inner.decisions.release(&audit.key);
                outcome
            }
            .instrument(tracing::Span::current()),
        );
        task.await.unwrap_or(Err(AuditError::Aborted))
    }

    /// Decides from the record, holding the refund's lock.
    async fn decide(
        &self,
        decider: &Decider<'_>,
        audit: &RefundAudit,
        resend_after_unknown_outcome: bool,
        deadline: Instant,
    ) -> Result<AuditOutcome, AuditError> {
        let book = &self.inner.decisions;
        let Some(recorded) = book.store.audit_decisions().get(&audit.key).await? else {
            return self.send(decider, audit, deadline).await;
        };
        let same = recorded.decision == audit.decision;
        match recorded.state {
            DecisionState::Applied if same => self.replay_applied(decider, audit, &recorded),
            DecisionState::Applied => Err(self.conflict(decider, audit, &recorded)),
            DecisionState::Refused => {
                let refusal = match decode_recorded_audit_answer(
                    recorded.answer_body.as_deref().unwrap_or_default(),
                ) {
                    Err(LookupFailure::Douyin(refusal)) => refusal,
                    _ => {
                        return Err(StoreError::Corrupt(
                            "a refused refund decision without Douyin's error".to_owned(),
                        )
                        .into());
                    }
                };
                // The same request would be refused the same way: answer it
                // from the record. Anything else may go out again, since a
                // refusal means Douyin applied nothing.
                let repeats = matches!(
                    refusal.class(),
                    CodeClass::InvalidArgument | CodeClass::Business
                );
                if same && repeats {
                    self.note_replay(
                        decider,
                        audit,
                        &format!(
                            "refused earlier with {}, answered from the record",
                            refusal.code
                        ),
                        &refusal.logid,
                    );
                    return Err(LookupError::Upstream(LookupFailure::Douyin(refusal)).into());
                }
                self.send(decider, audit, deadline).await
            }
            DecisionState::Pending | DecisionState::Unknown => {
                if recorded.state == DecisionState::Pending {
                    // Nobody else holds the lock: a pending row was left by a
                    // daemon that stopped while sending. Its outcome is unknown.
                    book.store
                        .audit_decisions()
                        .record_outcome(
                            &audit.key,
                            DecisionState::Unknown,
                            None,
                            &recorded.logid,
                            book.clock.now_unix_ms(),
                        )
                        .await?;
                }
                if !same {
                    return Err(self.conflict(decider, audit, &recorded));
                }
                if resend_after_unknown_outcome {
                    self.trail(
                        decider,
                        audit,
                        "resent after an unknown outcome, as the caller asked",
                        "",
                    );
                    return self.send(decider, audit, deadline).await;
                }
                self.trail(decider, audit, "outcome still unknown; not resent", "");
                Err(AuditError::OutcomeUnknown {
                    first_time: false,
                    decision: audit.decision.name(),
                    cause: String::new(),
                    logid: recorded.logid,
                })
            }
        }
    }

    fn replay_applied(
        &self,
        decider: &Decider<'_>,
        audit: &RefundAudit,
        recorded: &DecisionRecord,
    ) -> Result<AuditOutcome, AuditError> {
        let answer =
            decode_recorded_audit_answer(recorded.answer_body.as_deref().unwrap_or_default())
                .map_err(|_| {
                    StoreError::Corrupt(
                        "an applied refund decision without Douyin's answer".to_owned(),
                    )
                })?;
        self.note_replay(
            decider,
            audit,
            "applied earlier, answered from the record",
            &recorded.logid,
        );
        Ok(AuditOutcome {
            answer,
            replayed: true,
        })
    }

    /// Counts an answer given from the record and writes its trail line.
    fn note_replay(&self, decider: &Decider<'_>, audit: &RefundAudit, outcome: &str, logid: &str) {
        self.inner
            .counters
            .audit_replays
            .fetch_add(1, Ordering::Relaxed);
        self.trail(decider, audit, outcome, logid);
    }

    fn conflict(
        &self,
        decider: &Decider<'_>,
        audit: &RefundAudit,
        recorded: &DecisionRecord,
    ) -> AuditError {
        let recorded_text = describe(&recorded.decision);
        self.trail(
            decider,
            audit,
            &format!(
                "refused: contradicts the recorded {recorded_text} ({})",
                recorded.state.as_str()
            ),
            &recorded.logid,
        );
        AuditError::Conflict {
            recorded: recorded_text,
            state: recorded.state.as_str(),
            client: recorded.client.clone(),
        }
    }

    /// The one write: the token first, then the turn, then the intent on
    /// disk, then the request; retried only after a token rejection.
    async fn send(
        &self,
        decider: &Decider<'_>,
        audit: &RefundAudit,
        deadline: Instant,
    ) -> Result<AuditOutcome, AuditError> {
        let book = &self.inner.decisions;
        let counters = &self.inner.counters;
        let app = decider.app.to_string();
        let author = DecisionAuthor {
            client: decider.client,
            app: &app,
        };
        let mut token_retry_used = false;
        loop {
            let lease = match tokio::time::timeout_at(
                deadline,
                self.inner.tokens.token_for_app(decider.app),
            )
            .await
            {
                Err(_) => {
                    return self
                        .not_sent(decider, audit, LookupError::DeadlineExceededWaitingForToken)
                        .await;
                }
                Ok(Err(error)) => return self.not_sent(decider, audit, error.into()).await,
                Ok(Ok(lease)) => lease,
            };
            let admitted = match self
                .inner
                .admission
                .admit(decider.app, DouyinApi::AfterSaleOrderAudit, deadline)
                .await
            {
                Ok(admitted) => admitted,
                Err(refused) => {
                    counters.not_admitted.fetch_add(1, Ordering::Relaxed);
                    return self.not_sent(decider, audit, refused.into()).await;
                }
            };
            // The intent is on disk before the request leaves: a crash from
            // here on leaves a pending row, read later as an unknown outcome.
            book.store
                .audit_decisions()
                .record_intent(
                    &audit.key,
                    &audit.decision,
                    &author,
                    book.clock.now_unix_ms(),
                )
                .await?;
            counters.upstream_calls.fetch_add(1, Ordering::Relaxed);
            let upstream_deadline = deadline
                .checked_sub(AUDIT_ANSWER_MARGIN)
                .unwrap_or(deadline);
            let remaining = upstream_deadline.saturating_duration_since(Instant::now());
            let answer = self
                .inner
                .douyin
                .audit_after_sale_order(&lease.access_token, audit, Some(remaining))
                .await;
            drop(admitted);
            match answer {
                Ok(answer) => {
                    let logid = answer
                        .response
                        .extra
                        .as_ref()
                        .map(|extra| extra.logid.clone())
                        .unwrap_or_default();
                    self.record_outcome(
                        audit,
                        DecisionState::Applied,
                        Some(&answer.raw_json()),
                        &logid,
                    )
                    .await;
                    self.trail(decider, audit, "applied", &logid);
                    return Ok(AuditOutcome {
                        answer,
                        replayed: false,
                    });
                }
                Err(CallFailure {
                    failure: LookupFailure::Douyin(error),
                    ..
                }) => {
                    if error.class() == CodeClass::TokenRejected && !token_retry_used {
                        // The gateway refused the token before the decision
                        // was looked at: nothing was applied, so one retry
                        // with a fresh token cannot apply it twice.
                        self.inner
                            .tokens
                            .invalidate_if_current(decider.app, lease.generation)
                            .await;
                        tracing::warn!(app = %decider.app, code = error.code, logid = %error.logid, "Douyin rejected the token of a refund decision; refreshing and sending once more");
                        token_retry_used = true;
                        continue;
                    }
                    self.record_outcome(
                        audit,
                        DecisionState::Refused,
                        Some(&refusal_body(&error)),
                        &error.logid,
                    )
                    .await;
                    self.trail(
                        decider,
                        audit,
                        &format!("refused with {}", error.code),
                        &error.logid,
                    );
                    return Err(LookupError::Upstream(LookupFailure::Douyin(error)).into());
                }
                Err(CallFailure {
                    failure: LookupFailure::Transport(error),
                    may_have_reached_douyin: false,
                }) => {
                    return self
                        .not_sent(decider, audit, LookupError::Upstream(error.into()))
                        .await;
                }
                Err(CallFailure {
                    failure,
                    may_have_reached_douyin: true,
                }) => {
                    let logid = failure.logid().to_owned();
                    self.record_outcome(audit, DecisionState::Unknown, None, &logid)
                        .await;
                    self.trail(
                        decider,
                        audit,
                        &format!("outcome unknown: {failure}"),
                        &logid,
                    );
                    tracing::error!(app = %decider.app, merchant = %audit.key.account_id, order_id = %audit.key.order_id, error = %failure, "a refund decision may have reached Douyin but no usable answer came; it will not be resent");
                    return Err(AuditError::OutcomeUnknown {
                        first_time: true,
                        decision: audit.decision.name(),
                        cause: failure.to_string(),
                        logid,
                    });
                }
            }
        }
    }

    /// A decision that provably never reached Douyin: no intent stays on
    /// record (a later call may send it), and the caller hears why.
    async fn not_sent(
        &self,
        decider: &Decider<'_>,
        audit: &RefundAudit,
        error: LookupError,
    ) -> Result<AuditOutcome, AuditError> {
        if let Err(store_error) = self
            .inner
            .decisions
            .store
            .audit_decisions()
            .forget_intent(&audit.key)
            .await
        {
            tracing::error!(error = %store_error, "cannot remove the intent of a refund decision that was not sent; a repeat will read it as an unknown outcome");
        }
        self.trail(decider, audit, &format!("not sent: {error}"), "");
        Err(error.into())
    }

    /// Records an outcome. A failure to record leaves the intent pending,
    /// which a later call reads as an unknown outcome: never as "not sent".
    async fn record_outcome(
        &self,
        audit: &RefundAudit,
        state: DecisionState,
        answer_body: Option<&str>,
        logid: &str,
    ) {
        let book = &self.inner.decisions;
        if let Err(error) = book
            .store
            .audit_decisions()
            .record_outcome(
                &audit.key,
                state,
                answer_body,
                logid,
                book.clock.now_unix_ms(),
            )
            .await
        {
            tracing::error!(%error, state = state.as_str(), "cannot record a refund decision's outcome; a repeat will read it as unknown");
        }
    }

    /// One line of the audit trail: who, which merchant, order and
    /// certificate, approve or reject, what came of it, Douyin's logid.
    fn trail(&self, decider: &Decider<'_>, audit: &RefundAudit, outcome: &str, logid: &str) {
        let logid = if logid.is_empty() {
            String::new()
        } else {
            format!(" (logid {logid})")
        };
        let reason = format!(
            "merchant {} order {} certificate {}: {}: {outcome}{logid}",
            audit.key.account_id,
            audit.key.order_id,
            audit.key.certificate_id,
            describe(&audit.decision),
        );
        self.inner.decisions.audit.record(
            decider.client,
            AuditAction::RefundDecision,
            decider.app,
            &reason,
            None,
        );
    }
}

/// A decision as callers and the trail read it: `approve`, or `reject ("reason")`.
fn describe(decision: &RefundDecision) -> String {
    match decision {
        RefundDecision::Approve => "approve".to_owned(),
        RefundDecision::Reject { reason } => format!("reject ({reason:?})"),
    }
}
