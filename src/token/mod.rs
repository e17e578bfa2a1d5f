//! Token lifecycle: one owner per app (`client_key`) holding its current
//! client_token, single-flight fetches owned by the daemon rather than by any
//! caller's future, proactive refresh through the sweep, backoff after
//! failures, and compare-and-invalidate when Douyin rejects a token.

pub(crate) mod budget;
mod cluster;
pub(crate) mod policy;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use subtle::ConstantTimeEq;

use crate::audit::{AuditAction, AuditLog, DAEMON};
use crate::clock::{SharedClock, duration_ms};
use crate::config::Config;
use crate::domain::{AccessToken, ClientKey, ClientSecret};
use crate::douyin::DouyinClient;
use crate::douyin::token_endpoint::{FetchedToken, TokenFetchError};
use crate::metrics::{AppTokenReading, Metrics};
use crate::store::{FetchFailure, NewToken, Store, StoreError};

pub(crate) use budget::{FetchPriority, TokenBudget};
use cluster::ClusterMembership;
use cluster::ClusterTurn;
pub(crate) use policy::RefreshPolicy;

/// The token an app holds right now, as handed to a caller.
#[derive(Debug, Clone)]
pub struct TokenLease {
    pub(crate) client_key: ClientKey,
    pub(crate) access_token: AccessToken,
    pub(crate) generation: i64,
    pub(crate) expires_at_ms: i64,
}

/// Why no token can be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("{client_key} is not registered in the daemon")]
    UnknownApp { client_key: ClientKey },
    #[error(
        "Douyin refuses the credentials of {client_key} ({cause}); fix the app's client_secret \
         with `douyin-tokend app add` — until then the daemon does not ask Douyin again before {retry_in_seconds} s have passed"
    )]
    CredentialsRefused {
        client_key: ClientKey,
        cause: String,
        douyin_code: Option<i64>,
        retry_in_seconds: i64,
    },
    #[error(
        "no valid token for {client_key} right now ({cause}); the next try is in {retry_in_seconds} s"
    )]
    FetchFailing {
        client_key: ClientKey,
        cause: String,
        douyin_code: Option<i64>,
        retry_in_seconds: i64,
    },
    #[error(
        "no valid token for {client_key}, and the token endpoint budget is spent (Douyin allows 500 fetches per 5 minutes); the next fetch is possible in {retry_in_seconds} s"
    )]
    BudgetExhausted {
        client_key: ClientKey,
        retry_in_seconds: i64,
    },
    #[error("the token fetched for {client_key} could not be stored, so it is not used: {message}")]
    StoreFailed {
        client_key: ClientKey,
        message: String,
    },
    #[error("the token fetch for {client_key} stopped unexpectedly")]
    FetchAborted { client_key: ClientKey },
    #[error(
        "no valid token for {client_key}, and the database cannot be reached to take the cluster's fetch lease ({message}); no daemon fetches a token without it"
    )]
    DatabaseUnavailable {
        client_key: ClientKey,
        message: String,
    },
}

/// Why a token is being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshReason {
    /// A caller needs a token and none is valid.
    Demand,
    /// The sweep found the refresh window reached, or no token held.
    Scheduled,
    /// An operator asked for it.
    Forced,
}

impl RefreshReason {
    /// Why a fetch ran, in one word shared by the "fetching client_token" log
    /// line, the `token_refreshes_total` label and the audit trail: scheduled
    /// fetches before the first sweep completed are the start-up's.
    pub(crate) fn label(self, before_first_sweep: bool) -> &'static str {
        match self {
            Self::Scheduled if before_first_sweep => "startup",
            Self::Scheduled => "scheduled",
            // A caller needed a token and none was valid: after a rejection, an
            // expiry or a failed proactive refresh.
            Self::Demand => "reactive",
            Self::Forced => "forced",
        }
    }
}

/// What a ReportInvalidToken did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReportOutcome {
    /// The reported token was current: it was dropped and a new one fetched.
    Refreshed,
    /// The reported token was already replaced; nothing changed.
    NotCurrent,
    /// The token was current, but a report refreshed this app moments ago.
    Spaced,
}

impl ReportOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Refreshed => "refreshed",
            Self::NotCurrent => "not current: already replaced",
            Self::Spaced => "spaced: refreshed moments ago",
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub apps: usize,
    pub due: usize,
    pub refreshed: usize,
    pub failed: usize,
    /// Due, but left for a later sweep because the token budget is spent.
    pub deferred: usize,
}

/// A snapshot of one app's token state for operators; holds no secret.
#[derive(Debug, Clone)]
pub struct TokenStatusView {
    pub(crate) client_key: ClientKey,
    pub state: &'static str,
    pub(crate) generation: i64,
    pub(crate) expires_at_ms: Option<i64>,
    pub(crate) fetched_at_ms: Option<i64>,
    pub(crate) refresh_at_ms: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_at_ms: Option<i64>,
    pub(crate) consecutive_failures: u32,
    /// Token endpoint calls left of Douyin's per-app budget
    /// ([`DOUYIN_TOKEN_CALLS_PER_WINDOW`]), as counted by the daemon.
    pub(crate) douyin_budget_remaining: u64,
}

impl TokenStatusView {
    /// The view as the token gauges show it at `now_ms`.
    pub(crate) fn metric_reading(&self, now_ms: i64) -> AppTokenReading {
        AppTokenReading {
            client_key: self.client_key.clone(),
            state_label: self.state,
            generation: self.generation,
            expires_in_seconds: self
                .expires_at_ms
                .map(|expires_at_ms| (expires_at_ms - now_ms) / 1000),
            age_seconds: self
                .fetched_at_ms
                .map(|fetched_at_ms| (now_ms - fetched_at_ms) / 1000),
            consecutive_failures: self.consecutive_failures,
            douyin_budget_remaining: self.douyin_budget_remaining,
        }
    }
}

/// Douyin's budget for the token endpoint: this many calls per app per
/// [`DOUYIN_TOKEN_CALL_WINDOW`]. The daemon counts its own calls against it for
/// operators; the budget it enforces is `refresh.budget` (see [`budget`]).
pub(crate) const DOUYIN_TOKEN_CALLS_PER_WINDOW: u64 = 500;
pub(crate) const DOUYIN_TOKEN_CALL_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(300);

/// How often a stable token that just expired may be answered again before
/// the fetch counts as failed, and the pause between those asks.
const STALE_REPEAT_RETRIES: u32 = 3;
const STALE_REPEAT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

type SharedFetch = Shared<BoxFuture<'static, Result<TokenLease, TokenError>>>;

#[derive(Debug, Clone)]
struct HeldToken {
    access_token: AccessToken,
    generation: i64,
    fetched_at_ms: i64,
    expires_at_ms: i64,
}

#[derive(Debug, Clone)]
struct Failure {
    /// Douyin's error code, when Douyin answered with one.
    douyin_code: Option<i64>,
    message: String,
    at_ms: i64,
    permanent: bool,
    consecutive: u32,
    retry_at_ms: i64,
    /// The shared database could not give the fetch lease (no Douyin call was made).
    database_unavailable: bool,
}

struct AppState {
    secret: ClientSecret,
    current: Option<HeldToken>,
    /// The highest generation ever fetched for this app.
    generation: i64,
    refresh_at_ms: Option<i64>,
    failure: Option<Failure>,
    /// Douyin rejected the last token and no new one arrived yet.
    invalidated: bool,
    inflight: Option<SharedFetch>,
    removed: bool,
    /// When a ReportInvalidToken last caused a refresh (they are spaced).
    last_report_refresh_ms: Option<i64>,
    /// Start times (clock ms) of this app's token endpoint calls within
    /// [`DOUYIN_TOKEN_CALL_WINDOW`], oldest first.
    token_endpoint_calls: VecDeque<i64>,
}

impl AppState {
    /// The count a failure now would carry: one more than the last, or 1.
    fn next_consecutive_failure(&self) -> u32 {
        self.failure
            .as_ref()
            .map_or(0, |failure| failure.consecutive)
            .saturating_add(1)
    }

    /// An app with no token, no failure and no history.
    fn new(secret: ClientSecret) -> Self {
        Self {
            secret,
            current: None,
            generation: 0,
            refresh_at_ms: None,
            failure: None,
            invalidated: false,
            inflight: None,
            removed: false,
            last_report_refresh_ms: None,
            token_endpoint_calls: VecDeque::new(),
        }
    }
}

struct AppSlot {
    client_key: ClientKey,
    state: Mutex<AppState>,
    /// Signalled when another daemon changed the app's stored token (or
    /// ended its fetch lease), for a fetch waiting on that daemon's.
    changed: tokio::sync::Notify,
}

impl AppSlot {
    fn new(client_key: ClientKey, state: AppState) -> Arc<Self> {
        Arc::new(Self {
            client_key,
            state: Mutex::new(state),
            changed: tokio::sync::Notify::new(),
        })
    }
}

struct Inner {
    store: Store,
    douyin: DouyinClient,
    clock: SharedClock,
    policy: RefreshPolicy,
    budget: TokenBudget,
    /// Caps token fetches in flight across all apps.
    fetch_slots: Semaphore,
    max_concurrent_fetches: usize,
    apps: RwLock<HashMap<ClientKey, Arc<AppSlot>>>,
    sweeps_completed: watch::Sender<u64>,
    audit: AuditLog,
    report_min_interval_ms: i64,
    metrics: Metrics,
    /// Fetch tasks run here, so shutdown waits for them before the pool closes.
    tasks: TaskTracker,
    /// Set when the store is shared with other daemons (PostgreSQL).
    cluster: Option<ClusterMembership>,
}

/// Owns every app's token. Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

enum Acquire {
    Ready(TokenLease),
    Wait(SharedFetch),
    Refuse(TokenError),
    /// A scheduled refresh the budget cannot afford now.
    Deferred,
}

/// Notes a token endpoint call starting at `now_ms` and forgets the calls
/// that left Douyin's window, so the list stays at most one window long.
fn count_token_endpoint_call(calls: &mut VecDeque<i64>, now_ms: i64) {
    let window_start_ms = now_ms - duration_ms(DOUYIN_TOKEN_CALL_WINDOW);
    while calls.front().is_some_and(|at_ms| *at_ms <= window_start_ms) {
        calls.pop_front();
    }
    calls.push_back(now_ms);
}

/// The app's token endpoint calls within Douyin's window ending at `now_ms`.
fn token_endpoint_calls_within_window(calls: &VecDeque<i64>, now_ms: i64) -> u64 {
    let window_start_ms = now_ms - duration_ms(DOUYIN_TOKEN_CALL_WINDOW);
    let within = calls
        .iter()
        .filter(|at_ms| **at_ms > window_start_ms)
        .count();
    u64::try_from(within).unwrap_or(u64::MAX)
}

impl TokenManager {
    /// Loads every app and its stored token. Valid stored tokens are used as
    /// they are: a restart fetches nothing for them. Reads `[refresh]`, and
    /// `[cluster]` when the store is shared.
    pub async fn load(
        store: Store,
        douyin: DouyinClient,
        clock: SharedClock,
        config: &Config,
        audit: AuditLog,
        metrics: Metrics,
        tasks: TaskTracker,
    ) -> Result<Self, StoreError> {
        // A shared database makes this daemon one of a cluster.
        let cluster = store
            .is_shared()
            .then(|| ClusterMembership::new(config.cluster_settings().fetch_lease));
        let config = &config.refresh;
        let policy = if douyin.uses_stable_tokens() {
            RefreshPolicy::from(config).for_stable_tokens()
        } else {
            RefreshPolicy::from(config)
        };
        let secrets: HashMap<ClientKey, ClientSecret> = store
            .apps()
            .list()
            .await?
            .into_iter()
            .map(|app| (app.client_key, app.client_secret))
            .collect();
        let now_ms = clock.now_unix_ms();
        let mut rng = rand::rng();
        let mut apps = HashMap::new();
        for (client_key, record) in store.tokens().load_all().await? {
            let Some(secret) = secrets.get(&client_key).cloned() else {
                continue;
            };
            let current = match (
                record.access_token,
                record.fetched_at_ms,
                record.expires_at_ms,
            ) {
                (Some(access_token), Some(fetched_at_ms), Some(expires_at_ms))
                    if record.invalidated_at_ms.is_none()
                        && policy.is_servable(expires_at_ms, now_ms) =>
                {
                    Some(HeldToken {
                        access_token,
                        generation: record.generation,
                        fetched_at_ms,
                        expires_at_ms,
                    })
                }
                _ => None,
            };
            let refresh_at_ms = current.as_ref().map(|held| {
                policy.draw_refresh_at(held.fetched_at_ms, held.expires_at_ms, &mut rng)
            });
            let failure = record.last_error.map(|message| {
                let at_ms = record.last_error_at_ms.unwrap_or(now_ms);
                let consecutive = u32::try_from(record.consecutive_failures).unwrap_or(u32::MAX);
                // Permanent failures keep their cooldown across restarts; a
                // transient one may be retried at once.
                let retry_at_ms = if record.last_error_permanent {
                    at_ms + duration_ms(policy.permanent_failure_cooldown)
                } else {
                    now_ms
                };
                Failure {
                    douyin_code: None,
                    message,
                    at_ms,
                    permanent: record.last_error_permanent,
                    consecutive,
                    retry_at_ms,
                    database_unavailable: false,
                }
            });
            let state = AppState {
                invalidated: record.invalidated_at_ms.is_some(),
                current,
                generation: record.generation,
                refresh_at_ms,
                failure,
                ..AppState::new(secret)
            };
            apps.insert(client_key.clone(), AppSlot::new(client_key, state));
        }
        tracing::info!(
            apps = apps.len(),
            valid_tokens = apps
                .values()
                .filter(|slot| slot.state.lock().current.is_some())
                .count(),
            "token state loaded"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                douyin,
                clock,
                policy,
                budget: TokenBudget::new(config),
                fetch_slots: Semaphore::new(config.max_concurrent_fetches),
                max_concurrent_fetches: config.max_concurrent_fetches,
                apps: RwLock::new(apps),
                sweeps_completed: watch::channel(0).0,
                audit,
                report_min_interval_ms: duration_ms(config.report_min_interval),
                metrics,
                tasks,
                cluster,
            }),
        })
    }

    /// This daemon's name in the cluster, when it is in one.
    pub(crate) fn cluster_instance(&self) -> Option<&str> {
        self.inner
            .cluster
            .as_ref()
            .map(|membership| membership.instance.as_str())
    }

    fn slot(&self, client_key: &ClientKey) -> Option<Arc<AppSlot>> {
        let apps = self.inner.apps.read();
        apps.get(client_key).cloned()
    }

    fn registered_slot(&self, client_key: &ClientKey) -> Result<Arc<AppSlot>, TokenError> {
        self.slot(client_key).ok_or_else(|| TokenError::UnknownApp {
            client_key: client_key.clone(),
        })
    }

    fn now_ms(&self) -> i64 {
        self.inner.clock.now_unix_ms()
    }

    /// The app's current token. Returns at once while a valid token is held;
    /// otherwise joins (or starts) the one fetch in flight for the app. The
    /// fetch runs on its own task: a caller that gives up cancels nothing.
    pub async fn token_for_app(&self, client_key: &ClientKey) -> Result<TokenLease, TokenError> {
        self.acquire_and_wait(&self.registered_slot(client_key)?, RefreshReason::Demand)
            .await
    }

    /// Fetches a new token now, whatever the schedule, backoff or cooldown say
    /// (joining a fetch already in flight).
    pub(crate) async fn force_refresh(
        &self,
        client_key: &ClientKey,
    ) -> Result<TokenLease, TokenError> {
        self.acquire_and_wait(&self.registered_slot(client_key)?, RefreshReason::Forced)
            .await
    }

    async fn acquire_and_wait(
        &self,
        slot: &Arc<AppSlot>,
        reason: RefreshReason,
    ) -> Result<TokenLease, TokenError> {
        match self.acquire(slot, reason) {
            Acquire::Ready(lease) => Ok(lease),
            Acquire::Wait(fetch) => fetch.await,
            Acquire::Refuse(error) => Err(error),
            Acquire::Deferred => Err(TokenError::BudgetExhausted {
                client_key: slot.client_key.clone(),
                retry_in_seconds: 1,
            }),
        }
    }

    fn acquire(&self, slot: &Arc<AppSlot>, reason: RefreshReason) -> Acquire {
        let now_ms = self.now_ms();
        let mut state = slot.state.lock();
        if reason == RefreshReason::Demand
            && let Some(held) = &state.current
            && self.inner.policy.is_servable(held.expires_at_ms, now_ms)
        {
            return Acquire::Ready(lease_of(&slot.client_key, held));
        }
        if let Some(fetch) = &state.inflight {
            self.inner
                .metrics
                .record_token_request_coalesced(&slot.client_key);
            return Acquire::Wait(fetch.clone());
        }
        if reason != RefreshReason::Forced
            && let Some(failure) = &state.failure
            && now_ms < failure.retry_at_ms
        {
            // A short negative cache: a dead endpoint or a bad secret costs
            // callers nothing until the next try is due.
            return Acquire::Refuse(failure_error(&slot.client_key, failure, now_ms));
        }
        if reason == RefreshReason::Scheduled && self.due(&state, now_ms).is_none() {
            return match &state.current {
                Some(held) => Acquire::Ready(lease_of(&slot.client_key, held)),
                None => Acquire::Refuse(TokenError::FetchAborted {
                    client_key: slot.client_key.clone(),
                }),
            };
        }
        let priority = match reason {
            RefreshReason::Scheduled => FetchPriority::Scheduled,
            RefreshReason::Demand | RefreshReason::Forced => FetchPriority::Urgent,
        };
        if let Err(wait) = self.inner.budget.try_spend(priority, now_ms) {
            return match priority {
                FetchPriority::Scheduled => Acquire::Deferred,
                FetchPriority::Urgent => {
                    tracing::warn!(app = %slot.client_key, wait_s = wait.as_secs(), "token endpoint budget spent; refusing an urgent fetch");
                    Acquire::Refuse(TokenError::BudgetExhausted {
                        client_key: slot.client_key.clone(),
                        retry_in_seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX).max(1),
                    })
                }
            };
        }
        Acquire::Wait(self.start_fetch(slot, &mut state, reason, now_ms))
    }

    /// Starts the single fetch of this app; the caller holds the slot lock, so
    /// nobody else can start a second one.
    fn start_fetch(
        &self,
        slot: &Arc<AppSlot>,
        state: &mut AppState,
        reason: RefreshReason,
        now_ms: i64,
    ) -> SharedFetch {
        let manager = self.clone();
        let task_slot = Arc::clone(slot);
        let secret = state.secret.clone();
        let generation = state.generation + 1;
        let client_key = slot.client_key.clone();
        // In the span of whoever caused the fetch (a lookup's RPC span, so its
        // request id is on the fetch's log lines; the sweep has none).
        let task = self.inner.tasks.spawn(
            async move {
                manager
                    .run_fetch(task_slot, secret, generation, reason, now_ms)
                    .await
            }
            .instrument(tracing::Span::current()),
        );
        let fetch = async move {
            match task.await {
                Ok(result) => result,
                Err(_) => Err(TokenError::FetchAborted { client_key }),
            }
        }
        .boxed()
        .shared();
        state.inflight = Some(fetch.clone());
        fetch
    }

    async fn run_fetch(
        &self,
        slot: Arc<AppSlot>,
        secret: ClientSecret,
        generation: i64,
        reason: RefreshReason,
        started_at_ms: i64,
    ) -> Result<TokenLease, TokenError> {
        let client_key = &slot.client_key;
        let generation = match self.take_cluster_turn(&slot, reason, generation).await {
            ClusterTurn::Fetch { generation } => generation,
            ClusterTurn::Answered(answer) => {
                slot.state.lock().inflight = None;
                return answer;
            }
        };
        let reason = reason.label(*self.inner.sweeps_completed.borrow() == 0);
        tracing::info!(app = %client_key, reason, generation, "fetching client_token");
        let fetch_started = tokio::time::Instant::now();
        let fetched = {
            // The semaphore is never closed, so acquiring cannot fail.
            let _slot = self.inner.fetch_slots.acquire().await;
            self.fetch_past_stale_repeats(&slot, &secret).await
        };
        self.inner.metrics.record_token_fetch(
            client_key,
            reason,
            fetched.as_ref().err().map(TokenFetchError::cause_label),
            fetch_started.elapsed(),
        );
        let now_ms = self.now_ms();
        if let Err(error) = &fetched
            && error.is_rate_limited()
        {
            tracing::warn!(app = %client_key, "Douyin says the token endpoint is called too often (10020); pausing scheduled refreshes");
            self.inner.budget.douyin_rate_limited(now_ms);
        }
        match fetched {
            Ok(fetched)
                if self
                    .held_token_servable(&slot, &fetched.access_token)
                    .is_some() =>
            {
                // stable_client_token answered the token already held: the same
                // generation, and its expiry stays the one counted from the
                // first fetch (a repeat's expires_in is not documented).
                self.end_cluster_lease(client_key).await;
                let mut state = slot.state.lock();
                state.failure = None;
                state.inflight = None;
                let held = state.current.as_ref().expect(
                    "held_token_servable saw the current token, and only fetches change it",
                );
                let lease = lease_of(client_key, held);
                drop(state);
                tracing::info!(app = %client_key, generation = lease.generation, "stable_client_token answered the token already held; nothing changes");
                Ok(lease)
            }
            Ok(fetched) => {
                // Expiry counts from when the fetch started, not when it ended.
                let held = HeldToken {
                    access_token: fetched.access_token,
                    generation,
                    fetched_at_ms: started_at_ms,
                    expires_at_ms: started_at_ms + duration_ms(fetched.expires_in),
                };
                // Committed before anyone uses it: waiters are released only below.
                let saved = self.save_fetched(client_key, &held).await;
                if let Ok(false) = saved {
                    // Fenced out: another daemon took the lease over and
                    // stored a newer token; that one is the app's.
                    tracing::warn!(app = %client_key, generation, "another daemon stored this app's token while this fetch ran past its lease; using the stored one");
                    slot.state.lock().inflight = None;
                    self.reread_from_store(client_key).await;
                    let state = slot.state.lock();
                    return state
                        .current
                        .as_ref()
                        .map(|held| lease_of(client_key, held))
                        .ok_or_else(|| TokenError::StoreFailed {
                            client_key: client_key.clone(),
                            message: "another daemon's fetch replaced this one".to_owned(),
                        });
                }
                if let Err(error) = saved {
                    tracing::error!(app = %client_key, %error, "fetched token not stored; it will not be used");
                    let mut state = slot.state.lock();
                    state.inflight = None;
                    return Err(TokenError::StoreFailed {
                        client_key: client_key.clone(),
                        message: error.to_string(),
                    });
                }
                let refresh_at_ms = self.inner.policy.draw_refresh_at(
                    held.fetched_at_ms,
                    held.expires_at_ms,
                    &mut rand::rng(),
                );
                let lease = lease_of(client_key, &held);
                let mut state = slot.state.lock();
                tracing::info!(
                    app = %client_key,
                    token = %held.access_token,
                    generation,
                    expires_in_s = (held.expires_at_ms - now_ms) / 1000,
                    refresh_in_s = (refresh_at_ms - now_ms) / 1000,
                    "client_token fetched"
                );
                state.generation = state.generation.max(generation);
                state.current = Some(held);
                state.refresh_at_ms = Some(refresh_at_ms);
                state.failure = None;
                state.invalidated = false;
                state.inflight = None;
                drop(state);
                self.inner.audit.record(
                    DAEMON,
                    AuditAction::TokenFetch,
                    client_key,
                    reason,
                    Some(&lease.access_token),
                );
                Ok(lease)
            }
            Err(cause) => {
                let (failure, error) = {
                    let mut state = slot.state.lock();
                    let consecutive = state.next_consecutive_failure();
                    let permanent = cause.is_permanent();
                    let delay = if permanent {
                        self.inner.policy.permanent_failure_cooldown
                    } else {
                        self.inner.policy.backoff(consecutive, &mut rand::rng())
                    };
                    let failure = Failure {
                        message: cause.to_string(),
                        douyin_code: match &cause {
                            TokenFetchError::Refused { code, .. } => Some(*code),
                            TokenFetchError::Transport(_) | TokenFetchError::StaleRepeat => None,
                        },
                        at_ms: now_ms,
                        permanent,
                        consecutive,
                        retry_at_ms: now_ms + duration_ms(delay),
                        database_unavailable: false,
                    };
                    let error = failure_error(client_key, &failure, now_ms);
                    state.failure = Some(failure.clone());
                    state.inflight = None;
                    (failure, error)
                };
                self.end_cluster_lease(client_key).await;
                if failure.permanent {
                    tracing::error!(app = %client_key, error = %failure.message, "Douyin refuses this app's credentials; not retrying until the cooldown ends or the secret changes");
                } else {
                    tracing::warn!(app = %client_key, error = %failure.message, consecutive = failure.consecutive, retry_in_ms = failure.retry_at_ms - now_ms, "client_token fetch failed; keeping the current token and backing off");
                }
                let recorded = self
                    .inner
                    .store
                    .tokens()
                    .record_fetch_failure(&FetchFailure {
                        client_key,
                        message: &failure.message,
                        at_ms: failure.at_ms,
                        permanent: failure.permanent,
                        consecutive_failures: i64::from(failure.consecutive),
                    })
                    .await;
                if let Err(store_error) = recorded {
                    tracing::error!(app = %client_key, error = %store_error, "cannot record the fetch failure");
                }
                self.inner.audit.record(
                    DAEMON,
                    AuditAction::TokenFetch,
                    client_key,
                    &format!("{reason} (failed: {})", failure.message),
                    None,
                );
                Err(error)
            }
        }
    }

    /// Commits a fetched token: in a cluster through the fenced write (false:
    /// fenced out), else as the one owner of the database.
    async fn save_fetched(
        &self,
        client_key: &ClientKey,
        held: &HeldToken,
    ) -> Result<bool, StoreError> {
        match (&self.inner.cluster, self.inner.store.cluster()) {
            (Some(membership), Some(cluster)) => {
                cluster
                    .commit_fetched(
                        &membership.instance,
                        client_key,
                        &held.access_token,
                        held.generation,
                        held.fetched_at_ms,
                        held.expires_at_ms,
                    )
                    .await
            }
            _ => self
                .inner
                .store
                .tokens()
                .save_fetched(&NewToken {
                    client_key,
                    access_token: &held.access_token,
                    generation: held.generation,
                    fetched_at_ms: held.fetched_at_ms,
                    expires_at_ms: held.expires_at_ms,
                })
                .await
                .map(|()| true),
        }
    }

    /// Gives up this daemon's fetch lease after a fetch that stored nothing,
    /// so another daemon waiting for it tries at once.
    async fn end_cluster_lease(&self, client_key: &ClientKey) {
        if let (Some(membership), Some(cluster)) = (&self.inner.cluster, self.inner.store.cluster())
            && let Err(error) = cluster.end_lease(&membership.instance, client_key).await
        {
            tracing::warn!(app = %client_key, %error, "cannot end the fetch lease; it ends by itself");
        }
    }

    /// Fetches from Douyin. With stable tokens, an answer repeating the token
    /// we hold as expired means Douyin's expiry has not quite come (ours counts
    /// from when our fetch started): ask again shortly, a few times, each
    /// within the token budget, so waiters get the successor in about one
    /// round trip more.
    async fn fetch_past_stale_repeats(
        &self,
        slot: &AppSlot,
        secret: &ClientSecret,
    ) -> Result<FetchedToken, TokenFetchError> {
        let mut repeats = 0;
        loop {
            count_token_endpoint_call(&mut slot.state.lock().token_endpoint_calls, self.now_ms());
            let fetched = self
                .inner
                .douyin
                .fetch_client_token(&slot.client_key, secret)
                .await;
            let stale = self.inner.policy.stable_tokens
                && matches!(&fetched, Ok(token) if self.held_token_servable(slot, &token.access_token) == Some(false));
            if !stale {
                return fetched;
            }
            repeats += 1;
            if repeats > STALE_REPEAT_RETRIES
                || self
                    .inner
                    .budget
                    .try_spend(FetchPriority::Urgent, self.now_ms())
                    .is_err()
            {
                return Err(TokenFetchError::StaleRepeat);
            }
            tokio::time::sleep(STALE_REPEAT_PAUSE).await;
        }
    }

    /// When `token` is the app's current token: whether it is still servable.
    /// None when the app holds another token or none.
    fn held_token_servable(&self, slot: &AppSlot, token: &AccessToken) -> Option<bool> {
        let now_ms = self.now_ms();
        slot.state
            .lock()
            .current
            .as_ref()
            .filter(|held| held.access_token == *token)
            .map(|held| self.inner.policy.is_servable(held.expires_at_ms, now_ms))
    }

    /// Compare-and-invalidate: forgets the app's token only if it is still the
    /// generation the caller used, so a burst of failures with one stale token
    /// causes one refresh, and a token fetched meanwhile is never thrown away.
    /// Returns true when this call invalidated it.
    pub(crate) async fn invalidate_if_current(
        &self,
        client_key: &ClientKey,
        generation: i64,
    ) -> bool {
        let Some(slot) = self.slot(client_key) else {
            return false;
        };
        {
            let mut state = slot.state.lock();
            match &state.current {
                Some(held) if held.generation == generation => {
                    state.current = None;
                    state.refresh_at_ms = None;
                    state.invalidated = true;
                }
                _ => return false,
            }
        }
        tracing::warn!(
            app = %client_key,
            generation,
            "Douyin rejected the current token; refreshing. If this repeats, something else is fetching tokens with this app's key"
        );
        if let Err(error) = self
            .inner
            .store
            .tokens()
            .mark_invalidated(client_key, generation, self.now_ms())
            .await
        {
            tracing::error!(app = %client_key, %error, "cannot record the invalidation");
        }
        true
    }

    /// The passive-refresh hook: another service says Douyin rejected
    /// `reported_token`. Only if it is still the current token, and no report
    /// refreshed this app within `report_min_interval`, is it dropped and a new
    /// one fetched. Answers the token to use now and what the report did.
    pub(crate) async fn report_invalid(
        &self,
        client_key: &ClientKey,
        reported_token: &str,
    ) -> Result<(TokenLease, ReportOutcome), TokenError> {
        let slot = self.registered_slot(client_key)?;
        let now_ms = self.now_ms();
        let (outcome, generation) = {
            let mut state = slot.state.lock();
            let current_generation = state
                .current
                .as_ref()
                .filter(|held| {
                    bool::from(
                        held.access_token
                            .expose()
                            .as_bytes()
                            .ct_eq(reported_token.as_bytes()),
                    )
                })
                .map(|held| held.generation);
            match current_generation {
                None => (ReportOutcome::NotCurrent, None),
                Some(_)
                    if state
                        .last_report_refresh_ms
                        .is_some_and(|last| now_ms - last < self.inner.report_min_interval_ms) =>
                {
                    (ReportOutcome::Spaced, None)
                }
                Some(generation) => {
                    state.last_report_refresh_ms = Some(now_ms);
                    (ReportOutcome::Refreshed, Some(generation))
                }
            }
        };
        if let Some(generation) = generation {
            self.invalidate_if_current(client_key, generation).await;
        }
        let lease = self.acquire_and_wait(&slot, RefreshReason::Demand).await?;
        Ok((lease, outcome))
    }

    /// Why the app needs a fetch now, if it does.
    fn due(&self, state: &AppState, now_ms: i64) -> Option<RefreshReason> {
        if state.removed || state.inflight.is_some() {
            return None;
        }
        if let Some(failure) = &state.failure
            && now_ms < failure.retry_at_ms
        {
            return None;
        }
        match &state.current {
            Some(held) if self.inner.policy.is_servable(held.expires_at_ms, now_ms) => {
                let refresh_at_ms = state.refresh_at_ms.unwrap_or(held.fetched_at_ms);
                (now_ms >= refresh_at_ms).then_some(RefreshReason::Scheduled)
            }
            _ => Some(RefreshReason::Scheduled),
        }
    }

    /// One pass of the proactive refresher: fetches for every app whose refresh
    /// time has come or that holds no valid token (and is not backing off),
    /// a bounded number at a time. The scheduler only triggers this; tests call it.
    pub async fn sweep(&self) -> SweepReport {
        let now_ms = self.now_ms();
        let slots: Vec<Arc<AppSlot>> = {
            let apps = self.inner.apps.read();
            apps.values().cloned().collect()
        };
        let mut report = SweepReport {
            apps: slots.len(),
            ..SweepReport::default()
        };
        // Closest to expiry first (no token at all first of all), so a tight
        // budget goes where it matters most.
        let mut due: Vec<(i64, Arc<AppSlot>)> = slots
            .into_iter()
            .filter_map(|slot| {
                let state = slot.state.lock();
                self.due(&state, now_ms)?;
                let urgency = state
                    .current
                    .as_ref()
                    .map_or(i64::MIN, |held| held.expires_at_ms);
                drop(state);
                Some((urgency, slot))
            })
            .collect();
        due.sort_by_key(|(urgency, _)| *urgency);
        report.due = due.len();
        let outcomes: Vec<SweepOutcome> = stream::iter(due)
            .map(|(_, slot)| async move {
                match self.acquire(&slot, RefreshReason::Scheduled) {
                    Acquire::Wait(fetch) => match fetch.await {
                        Ok(_) => SweepOutcome::Refreshed,
                        Err(_) => SweepOutcome::Failed,
                    },
                    Acquire::Ready(_) => SweepOutcome::NothingToDo,
                    Acquire::Deferred => SweepOutcome::Deferred,
                    Acquire::Refuse(_) => SweepOutcome::Failed,
                }
            })
            .buffer_unordered(self.inner.max_concurrent_fetches)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome {
                SweepOutcome::Refreshed => report.refreshed += 1,
                SweepOutcome::Failed => report.failed += 1,
                SweepOutcome::Deferred => report.deferred += 1,
                SweepOutcome::NothingToDo => {}
            }
        }
        self.inner.sweeps_completed.send_modify(|count| *count += 1);
        if report.due > 0 {
            tracing::info!(
                apps = report.apps,
                due = report.due,
                refreshed = report.refreshed,
                failed = report.failed,
                deferred = report.deferred,
                "refresh sweep"
            );
        }
        report
    }

    /// The token endpoint budget's window (`refresh.budget_window`).
    pub(crate) fn budget_window_ms(&self) -> i64 {
        self.inner.budget.window_ms()
    }

    /// Token endpoint calls still allowed in the current budget window.
    pub(crate) fn budget_remaining(&self) -> usize {
        self.inner.budget.remaining(self.now_ms())
    }

    /// Counts completed sweeps: the heartbeat that shows the scheduler is alive.
    pub fn sweep_heartbeat(&self) -> watch::Receiver<u64> {
        self.inner.sweeps_completed.subscribe()
    }

    /// Registers a new app or a new secret. A new secret clears a failure so the
    /// next demand or sweep tries again at once.
    pub(crate) fn app_put(&self, client_key: &ClientKey, secret: ClientSecret) {
        let mut apps = self.inner.apps.write();
        match apps.get(client_key) {
            Some(slot) => {
                let mut state = slot.state.lock();
                if state.secret != secret {
                    state.secret = secret;
                    state.failure = None;
                }
            }
            None => {
                apps.insert(
                    client_key.clone(),
                    AppSlot::new(client_key.clone(), AppState::new(secret)),
                );
            }
        }
    }

    /// The secret of a registered app, for checking the signature of a
    /// notification Douyin pushed for it (the webhook).
    pub(crate) fn app_secret(&self, client_key: &ClientKey) -> Option<ClientSecret> {
        let apps = self.inner.apps.read();
        let slot = apps.get(client_key)?;
        Some(slot.state.lock().secret.clone())
    }

    pub(crate) fn app_removed(&self, client_key: &ClientKey) {
        let mut apps = self.inner.apps.write();
        if let Some(slot) = apps.remove(client_key) {
            let mut state = slot.state.lock();
            state.removed = true;
            state.current = None;
        }
    }

    /// Every app's token state, sorted by fingerprint; no secret included.
    pub fn status(&self) -> Vec<TokenStatusView> {
        let now_ms = self.now_ms();
        let apps = self.inner.apps.read();
        let mut views: Vec<TokenStatusView> =
            apps.values()
                .map(|slot| {
                    let state = slot.state.lock();
                    let servable = state.current.as_ref().is_some_and(|held| {
                        self.inner.policy.is_servable(held.expires_at_ms, now_ms)
                    });
                    let label = match (&state.failure, servable, &state.current) {
                        (Some(failure), false, _) if failure.permanent => "failed",
                        (_, true, _) => "valid",
                        (_, false, Some(_)) => "expired",
                        _ if state.invalidated => "invalidated",
                        _ => "missing",
                    };
                    TokenStatusView {
                        client_key: slot.client_key.clone(),
                        state: label,
                        generation: state
                            .current
                            .as_ref()
                            .map_or(state.generation, |held| held.generation),
                        expires_at_ms: state.current.as_ref().map(|held| held.expires_at_ms),
                        fetched_at_ms: state.current.as_ref().map(|held| held.fetched_at_ms),
                        refresh_at_ms: state.refresh_at_ms,
                        last_error: state
                            .failure
                            .as_ref()
                            .map(|failure| failure.message.clone()),
                        last_error_at_ms: state.failure.as_ref().map(|failure| failure.at_ms),
                        consecutive_failures: state
                            .failure
                            .as_ref()
                            .map_or(0, |failure| failure.consecutive),
                        douyin_budget_remaining: DOUYIN_TOKEN_CALLS_PER_WINDOW.saturating_sub(
                            token_endpoint_calls_within_window(&state.token_endpoint_calls, now_ms),
                        ),
                    }
                })
                .collect();
        views.sort_by(|first, second| first.client_key.cmp(&second.client_key));
        views
    }

    /// True when at least one app holds a valid token (or no app is registered).
    pub(crate) fn any_token_servable(&self) -> bool {
        let now_ms = self.now_ms();
        let apps = self.inner.apps.read();
        apps.is_empty()
            || apps.values().any(|slot| {
                slot.state
                    .lock()
                    .current
                    .as_ref()
                    .is_some_and(|held| self.inner.policy.is_servable(held.expires_at_ms, now_ms))
            })
    }
}

enum SweepOutcome {
    Refreshed,
    Failed,
    Deferred,
    NothingToDo,
}

fn lease_of(client_key: &ClientKey, held: &HeldToken) -> TokenLease {
    TokenLease {
        client_key: client_key.clone(),
        access_token: held.access_token.clone(),
        generation: held.generation,
        expires_at_ms: held.expires_at_ms,
    }
}

fn failure_error(client_key: &ClientKey, failure: &Failure, now_ms: i64) -> TokenError {
    let retry_in_seconds = ((failure.retry_at_ms - now_ms).max(0) + 999) / 1000;
    if failure.database_unavailable {
        return TokenError::DatabaseUnavailable {
            client_key: client_key.clone(),
            message: failure.message.clone(),
        };
    }
    if failure.permanent {
        TokenError::CredentialsRefused {
            client_key: client_key.clone(),
            cause: failure.message.clone(),
            douyin_code: failure.douyin_code,
            retry_in_seconds,
        }
    } else {
        TokenError::FetchFailing {
            client_key: client_key.clone(),
            cause: failure.message.clone(),
            douyin_code: failure.douyin_code,
            retry_in_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn douyins_window_forgets_token_endpoint_calls_older_than_five_minutes() {
        let mut calls = VecDeque::new();
        for at_ms in [0, 100_000, 299_999] {
            count_token_endpoint_call(&mut calls, at_ms);
        }
        assert_eq!(token_endpoint_calls_within_window(&calls, 299_999), 3);
        // At 300 s the call made at 0 s has left the window.
        assert_eq!(token_endpoint_calls_within_window(&calls, 300_000), 2);
        count_token_endpoint_call(&mut calls, 300_000);
        assert_eq!(calls, [100_000, 299_999, 300_000]);
        assert_eq!(token_endpoint_calls_within_window(&calls, 600_000), 0);
    }
}
