//! The after-sale use cases. Reads (the order detail here, the refund list in
//! `list`): find the merchant's app, take the current token, then wait for
//! the rate group's turn (rate and concurrency, deadline-aware) and ask
//! Douyin at once, retry transient failures with backoff, and on a token
//! rejection compare-and-invalidate, refresh and retry exactly once. Detail
//! lookups also coalesce identical lookups in flight; each caller gets the
//! outcome its own deadline implies, whoever started the shared call. The
//! refund decision, a write, lives in `refund_audit` and never retries blindly.

pub(crate) mod admission;
mod list;
pub(crate) mod refund_audit;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::LookupConfig;
use crate::domain::{AccessToken, AccountId, AfterSaleQuery, ClientKey, DouyinApi};
use crate::douyin::after_sale::{AfterSaleAnswer, LookupFailure};
use crate::douyin::envelope::Decoded;
use crate::douyin::{CodeClass, DouyinClient, TransportError};
use crate::registry::{Registry, RegistryError};
use crate::token::{TokenError, TokenManager};

pub(crate) use admission::{Admission, NotAdmitted};

/// Everything that can stop a lookup, mapped to a gRPC status in one place (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Upstream(#[from] LookupFailure),
    #[error(transparent)]
    NotAdmitted(#[from] NotAdmitted),
    #[error("the request's deadline passed while Douyin was still answering (after {tries} tries)")]
    DeadlineExceeded { tries: u32 },
    #[error("the request's deadline passed while the app's token was being fetched")]
    DeadlineExceededWaitingForToken,
    #[error(
        "the request's deadline passed while the lookup it shares with other callers was still running"
    )]
    DeadlinePassedWhileShared,
    #[error("the lookup stopped unexpectedly; see the daemon's log")]
    Aborted,
}

/// Counters of what the lookup path did, for tests and metrics.
#[derive(Debug, Default)]
pub struct LookupCounters {
    /// Upstream calls to the after-sale APIs (tries included).
    pub(crate) upstream_calls: AtomicU64,
    /// Retries after a transient failure.
    pub retries: AtomicU64,
    /// Callers served by a lookup another caller started.
    pub coalesced: AtomicU64,
    /// Callers served from the response cache.
    pub cache_hits: AtomicU64,
    /// Callers refused because their turn would come too late.
    pub(crate) not_admitted: AtomicU64,
    /// Lookups waiting for their turn or for Douyin right now.
    pub(crate) in_progress: AtomicU64,
    /// Refund decisions answered from the record, without asking Douyin.
    pub audit_replays: AtomicU64,
}

/// How long before the caller's deadline the daemon gives up on Douyin.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// A lookup in flight, shared by every caller that asks the same thing.
type Flight = Shared<BoxFuture<'static, Result<AfterSaleAnswer, FlightFailure>>>;

/// How a shared lookup failed, and under whose deadline.
#[derive(Debug, Clone)]
struct FlightFailure {
    error: Arc<LookupError>,
    /// The deadline the flight ran under: its starter's.
    deadline: Instant,
}

impl LookupError {
    /// True when the failure follows from the deadline the call ran under, so
    /// a caller with more time may get a different outcome.
    fn is_deadline_bound(&self) -> bool {
        matches!(
            self,
            Self::NotAdmitted(_)
                | Self::DeadlineExceeded { .. }
                | Self::DeadlineExceededWaitingForToken
                | Self::DeadlinePassedWhileShared
        )
    }
}

/// Identical lookups: same app, merchant, order and certificate.
type LookupKey = (ClientKey, AfterSaleQuery);

#[derive(Clone)]
pub struct LookupService {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    tokens: TokenManager,
    douyin: DouyinClient,
    admission: Admission,
    /// Refund decisions: the record (`store`), the trail (`audit`), and one
    /// lock per refund so that identical decisions never travel at once.
    decisions: refund_audit::DecisionBook,
    config: LookupConfig,
    in_flight: Mutex<HashMap<LookupKey, Flight>>,
    cache: Mutex<HashMap<LookupKey, (Instant, AfterSaleAnswer)>>,
    counters: LookupCounters,
    /// Lookup flights run here, so shutdown waits for them before the pool closes.
    tasks: TaskTracker,
}

impl LookupService {
    /// Paces Douyin calls at `1 / daemons` of each rate: the daemons alive
    /// on one PostgreSQL database share the app's (or developer's) rate.
    pub(crate) fn set_cluster_share(&self, daemons: u32) {
        self.inner.admission.set_cluster_share(daemons);
    }

    pub(crate) fn new(
        registry: Registry,
        tokens: TokenManager,
        douyin: DouyinClient,
        config: &LookupConfig,
        tasks: TaskTracker,
        decisions: refund_audit::DecisionBook,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                tasks,
                decisions,
                registry,
                tokens,
                douyin,
                admission: Admission::new(config),
                config: config.clone(),
                in_flight: Mutex::new(HashMap::new()),
                cache: Mutex::new(HashMap::new()),
                counters: LookupCounters::default(),
            }),
        }
    }

    pub fn counters(&self) -> &LookupCounters {
        &self.inner.counters
    }

    /// Looks up one order's after-sale details before `deadline` (the caller's,
    /// or `default_deadline` from now). Identical lookups in flight share one
    /// upstream call; the call runs on its own task and outlives impatient callers.
    pub(crate) async fn after_sale_order_detail(
        &self,
        query: &AfterSaleQuery,
        deadline: Option<Instant>,
    ) -> Result<AfterSaleAnswer, Arc<LookupError>> {
        let (client_key, deadline) = self
            .app_and_deadline(&query.account_id, deadline)
            .map_err(Arc::new)?;
        let key = (client_key, query.clone());
        if let Some(answer) = self.cached(&key) {
            self.inner
                .counters
                .cache_hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(answer);
        }
        // A caller that joined a flight started under a shorter deadline does
        // not inherit that deadline's failure: it starts (or joins) another.
        // A pass repeats only while this caller has time left and the failed
        // flight's deadline was earlier than its own, so the loop ends.
        loop {
            let flight = self.join_or_start_flight(&key, deadline);
            let failure = match tokio::time::timeout_at(deadline, flight).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(failure)) => failure,
                Err(_) => return Err(Arc::new(LookupError::DeadlinePassedWhileShared)),
            };
            let more_time_here = failure.deadline < deadline
                && Instant::now() + self.inner.config.upstream_time_reserve < deadline;
            if !(failure.error.is_deadline_bound() && more_time_here) {
                return Err(failure.error);
            }
            tracing::debug!(error = %failure.error, "the shared lookup ran out of its starter's time; trying again under this caller's deadline");
        }
    }

    /// The app serving the merchant (noted in the call's span) and the
    /// call's deadline: the caller's, or `default_deadline` from now.
    fn app_and_deadline(
        &self,
        account_id: &AccountId,
        deadline: Option<Instant>,
    ) -> Result<(ClientKey, Instant), LookupError> {
        let client_key = self.inner.registry.app_for_merchant(account_id)?;
        crate::telemetry::record_app(&client_key);
        let deadline =
            deadline.unwrap_or_else(|| Instant::now() + self.inner.config.default_deadline);
        Ok((client_key, deadline))
    }

    /// Joins the identical lookup in flight, or starts one on a task of its own
    /// (so it outlives impatient callers) in the caller's span.
    fn join_or_start_flight(&self, key: &LookupKey, deadline: Instant) -> Flight {
        let mut in_flight = self.inner.in_flight.lock();
        if let Some(flight) = in_flight.get(key) {
            self.inner
                .counters
                .coalesced
                .fetch_add(1, Ordering::Relaxed);
            return flight.clone();
        }
        let service = self.clone();
        let task_key = key.clone();
        let task = self.inner.tasks.spawn(
            async move {
                let result = service
                    .execute(&task_key.0, &task_key.1, deadline)
                    .await
                    .map_err(|error| FlightFailure {
                        error: Arc::new(error),
                        deadline,
                    });
                service.finish_flight(&task_key, &result);
                result
            }
            .instrument(tracing::Span::current()),
        );
        let flight: Flight = async move {
            match task.await {
                Ok(result) => result,
                Err(_) => Err(FlightFailure {
                    error: Arc::new(LookupError::Aborted),
                    deadline,
                }),
            }
        }
        .boxed()
        .shared();
        in_flight.insert(key.clone(), flight.clone());
        flight
    }

    fn cached(&self, key: &LookupKey) -> Option<AfterSaleAnswer> {
        if self.inner.config.cache_ttl.is_zero() {
            return None;
        }
        let cache = self.inner.cache.lock();
        cache
            .get(key)
            .filter(|(stored_at, _)| stored_at.elapsed() < self.inner.config.cache_ttl)
            .map(|(_, answer)| answer.clone())
    }

    /// Ends a flight: later callers start a new one; a success enters the cache.
    fn finish_flight(&self, key: &LookupKey, result: &Result<AfterSaleAnswer, FlightFailure>) {
        let ttl = self.inner.config.cache_ttl;
        if let Ok(answer) = result
            && !ttl.is_zero()
        {
            let mut cache = self.inner.cache.lock();
            cache.retain(|_, (stored_at, _)| stored_at.elapsed() < ttl);
            cache.insert(key.clone(), (Instant::now(), answer.clone()));
        }
        self.inner.in_flight.lock().remove(key);
    }

    async fn execute(
        &self,
        client_key: &ClientKey,
        query: &AfterSaleQuery,
        deadline: Instant,
    ) -> Result<AfterSaleAnswer, LookupError> {
        let counters = &self.inner.counters;
        counters.in_progress.fetch_add(1, Ordering::Relaxed);
        let result = self.execute_with_retries(client_key, query, deadline).await;
        counters.in_progress.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn execute_with_retries(
        &self,
        client_key: &ClientKey,
        query: &AfterSaleQuery,
        deadline: Instant,
    ) -> Result<AfterSaleAnswer, LookupError> {
        let douyin = &self.inner.douyin;
        self.read_with_retries(
            client_key,
            DouyinApi::AfterSaleOrderDetail,
            deadline,
            |access_token, remaining| async move {
                douyin
                    .get_after_sale_order_detail(&access_token, query, Some(remaining))
                    .await
            },
        )
        .await
    }

    /// One read from Douyin by the rules of every read: the token first, then
    /// the rate group's turn; transient failures retried with backoff within
    /// the deadline; a token rejection compared-and-invalidated and retried
    /// once. `call` makes one HTTP call with the token and the time left.
    async fn read_with_retries<T, Call, Answer>(
        &self,
        client_key: &ClientKey,
        api: DouyinApi,
        deadline: Instant,
        call: Call,
    ) -> Result<Decoded<T>, LookupError>
    where
        Call: Fn(AccessToken, Duration) -> Answer,
        Answer: Future<Output = Result<Decoded<T>, LookupFailure>>,
    {
        let config = &self.inner.config;
        let counters = &self.inner.counters;
        let mut tries = 0;
        let mut token_retry_used = false;
        loop {
            tries += 1;
            // The token first, then the turn: a turn taken before a slow token
            // fetch would pass unused, and every such turn would fire at once
            // when the token arrived, putting more than the rate into one of
            // Douyin's one-second windows.
            let lease =
                tokio::time::timeout_at(deadline, self.inner.tokens.token_for_app(client_key))
                    .await
                    .map_err(|_| LookupError::DeadlineExceededWaitingForToken)??;
            let admitted = self
                .inner
                .admission
                .admit(client_key, api, deadline)
                .await
                .inspect_err(|_| {
                    counters.not_admitted.fetch_add(1, Ordering::Relaxed);
                })?;
            counters.upstream_calls.fetch_add(1, Ordering::Relaxed);
            // Stop waiting for Douyin a moment before the caller's deadline, so
            // the caller hears DEADLINE_EXCEEDED from us rather than a bare cancel.
            let upstream_deadline = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline);
            let remaining = upstream_deadline.saturating_duration_since(Instant::now());
            let answer = call(lease.access_token.clone(), remaining).await;
            drop(admitted);
            let failure = match answer {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            match &failure {
                LookupFailure::Douyin(error) if error.class() == CodeClass::TokenRejected => {
                    self.inner
                        .tokens
                        .invalidate_if_current(client_key, lease.generation)
                        .await;
                    if token_retry_used {
                        tracing::error!(app = %client_key, code = error.code, logid = %error.logid, "Douyin rejected a freshly refreshed token too");
                        return Err(failure.into());
                    }
                    tracing::warn!(app = %client_key, code = error.code, logid = %error.logid, generation = lease.generation, "Douyin rejected the token; refreshing and retrying once");
                    token_retry_used = true;
                    // The token retry is not one of the transient tries.
                    tries -= 1;
                    continue;
                }
                LookupFailure::Transport(TransportError::Timeout { .. })
                    if Instant::now() >= upstream_deadline =>
                {
                    return Err(LookupError::DeadlineExceeded { tries });
                }
                _ => {}
            }
            if !is_retryable(&failure) || tries >= config.max_tries {
                return Err(failure.into());
            }
            if let LookupFailure::Douyin(error) = &failure
                && error.class() == CodeClass::RateLimited
            {
                tracing::warn!(app = %client_key, code = error.code, logid = %error.logid, api = api.name(), "Douyin says the daemon calls this API too often although it paces it; lower lookup.rates.<api> if this repeats");
            }
            let backoff = full_jitter_backoff(config, tries);
            if Instant::now() + backoff + config.upstream_time_reserve > deadline {
                return Err(failure.into());
            }
            tracing::info!(app = %client_key, api = api.name(), try_number = tries, backoff_ms = backoff.as_millis() as u64, error = %failure, "transient failure; retrying");
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
        }
    }
}

/// Douyin's transient codes, HTTP 5xx, timeouts and connection errors are
/// worth another try; a garbled body or a business error is not.
fn is_retryable(failure: &LookupFailure) -> bool {
    match failure {
        LookupFailure::Douyin(error) => error.class().is_retryable(),
        LookupFailure::Transport(TransportError::HttpStatus { status, .. }) => *status >= 500,
        LookupFailure::Transport(
            TransportError::Timeout { .. } | TransportError::Connect { .. },
        ) => true,
        LookupFailure::Transport(TransportError::MalformedBody { .. }) => false,
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial · 2^(try-1))].
fn full_jitter_backoff(config: &LookupConfig, tries: u32) -> Duration {
    let ceiling = config
        .retry_backoff_initial
        .saturating_mul(1 << tries.saturating_sub(1).min(16))
        .min(config.retry_backoff_max);
    ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
}
