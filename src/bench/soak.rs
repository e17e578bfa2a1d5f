//! The soak: steady lookups and token requests over many token lifetimes, with
//! transient faults and tokens invalidated behind the daemon's back, judged
//! by what callers saw (no token errors), what Douyin saw (no 2119003) and how
//! many tokens the daemon fetched compared with the fewest its refresh window
//! allows. [`run_simulated`] drives it on a manual clock shared by the daemon
//! and the sandbox, one simulated second per step, so ten simulated minutes
//! take well under a minute and nothing sleeps; tests/api/accelerated.rs runs it
//! in the test suite and `douyin-bench soak --simulated` prints it. The real-time
//! soak against the spawned binary lives in the bench binary and shares the
//! accounting here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::fleet::{Fleet, order_id, teach_orders};
use super::measure::ProcessSample;
use crate::app::App;
use crate::clock::{Clock, ManualClock, SharedClock};
use crate::config::{Config, DatabaseSetting};
use crate::douyin::codes;
use crate::grpc::status::TOKEND_DOMAIN;
use crate::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest;
use crate::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use crate::proto::tokend::v1::GetAccessTokenRequest;
use crate::proto::tokend::v1::get_access_token_request::Selector;
use crate::proto::tokend::v1::token_service_client::TokenServiceClient;
use crate::sandbox::{Fault, Sandbox, SandboxConfig, SandboxStats};
use crate::store::Store;

/// The shape of a soak run.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    pub apps: usize,
    pub lookups_per_app_per_second: usize,
    pub token_requests_per_app_per_second: usize,
    pub duration: Duration,
    pub token_lifetime: Duration,
    pub grace: Duration,
    /// Share of lookups Douyin answers with the transient busy code 2119002.
    pub lookup_fault_fraction: f64,
    /// Every this often, one app's token is superseded by two tokens fetched
    /// with its key behind the daemon's back.
    pub invalidation_every: Duration,
    /// Every `invalidation_every`, midway between two invalidations, the
    /// token endpoint answers its next call with HTTP 500. Midway, so that the
    /// call it hits is a scheduled refresh: a failed refresh must cost callers
    /// nothing. (A failed *demand* fetch, with callers waiting for an app that
    /// holds no token, fails those callers with UNAVAILABLE and a RetryInfo by
    /// design: the negative cache. The soak does not provoke that case.)
    pub token_faults: bool,
    /// The refresh window, before expiry. Narrow, so that any wasted fetch
    /// shows against the minimum, and ending 3 s before the token stops being
    /// servable (5 s before expiry), so that a failed refresh has room for a
    /// retry (1 s backoff, a sweep every second that may tick half a second
    /// late). With a window ending 6 s before expiry, a refresh failing at its
    /// very end left callers facing the 1 s negative cache with no servable
    /// token: one token error in a 10-minute run.
    pub refresh_window_start: Duration,
    pub refresh_window_end: Duration,
}

impl Default for SoakPlan {
    /// The issue's soak: 30 s tokens with 5 s grace, 5 % transient faults, a
    /// few invalidations; ten minutes.
    fn default() -> Self {
        Self {
            apps: 8,
            lookups_per_app_per_second: 5,
            token_requests_per_app_per_second: 1,
            duration: Duration::from_secs(600),
            token_lifetime: Duration::from_secs(30),
            grace: Duration::from_secs(5),
            lookup_fault_fraction: 0.05,
            invalidation_every: Duration::from_secs(75),
            token_faults: true,
            refresh_window_start: Duration::from_secs(9),
            refresh_window_end: Duration::from_secs(8),
        }
    }
}

impl SoakPlan {
    /// The sandbox as the soak needs it: short tokens, Douyin's 10 QPS per
    /// app, busy answers at the fault fraction.
    pub fn sandbox_config(&self) -> SandboxConfig {
        SandboxConfig {
            token_lifetime: self.token_lifetime,
            grace: self.grace,
            lookup_qps: 10,
            busy_fraction: self.lookup_fault_fraction,
            ..SandboxConfig::default()
        }
    }

    /// The daemon's refresh settings scaled to the short tokens: the window
    /// just before expiry, no minimum interval beyond a second, quick backoff.
    pub fn adjust_daemon_config(&self, config: &mut Config) {
        config.refresh.window_start = self.refresh_window_start;
        config.refresh.window_end = self.refresh_window_end;
        config.refresh.min_interval = Duration::from_secs(1);
        config.refresh.backoff_initial = Duration::from_secs(1);
        config.refresh.backoff_max = Duration::from_secs(4);
    }

    /// The app whose token is invalidated at the `index`-th invalidation.
    pub fn invalidated_app(&self, index: usize) -> usize {
        (index * 3 + 1) % self.apps
    }
}

/// What a soak saw.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub duration_seconds: f64,
    pub real_seconds: f64,
    pub lookups: u64,
    pub lookups_ok: u64,
    pub token_requests: u64,
    /// Failures callers saw that are about the token (fetch failing, budget,
    /// credentials, a rejected token reaching the caller). Target 0.
    pub token_errors: u64,
    /// The first few token errors' messages, to say what went wrong.
    pub token_error_samples: Vec<String>,
    /// Other failures callers saw, by gRPC code and reason.
    pub other_errors: BTreeMap<String, u64>,
    /// 2119003 answers by the sandbox. Target 0.
    pub too_many_requests: u64,
    /// Lookups the sandbox refused for their token (expected after each
    /// invalidation: the daemon learns of it this way).
    pub token_rejections: u64,
    /// Tokens issued to the daemon (out-of-band ones excluded).
    pub token_fetches: u64,
    /// Token endpoint calls, failed ones included.
    pub token_calls: u64,
    pub minimum_fetches: u64,
    pub invalidations: u64,
    pub lookup_faults_injected: u64,
    pub token_faults_injected: u64,
    /// (seconds into the run, resident KiB) of the measured process.
    pub resident_kib: Vec<(u64, u64)>,
}

impl SoakReport {
    /// Fetches above the minimum, as a fraction of the minimum.
    pub fn excess_fetch_fraction(&self) -> f64 {
        if self.minimum_fetches == 0 {
            return 0.0;
        }
        (self.token_fetches as f64 - self.minimum_fetches as f64) / self.minimum_fetches as f64
    }

    /// Growth of resident memory from the first sample after warm-up (a
    /// fifth of the run) to the last, in KiB.
    pub fn resident_growth_kib(&self) -> i64 {
        let warm = self.resident_kib.len() / 5;
        match (self.resident_kib.get(warm), self.resident_kib.last()) {
            (Some((_, first)), Some((_, last))) => *last as i64 - *first as i64,
            _ => 0,
        }
    }

    pub fn record_status(&mut self, status: &tonic::Status) {
        if is_token_error(status) {
            self.token_errors += 1;
            if self.token_error_samples.len() < 5 {
                self.token_error_samples
                    .push(format!("{:?}: {}", status.code(), status.message()));
            }
        } else {
            let reason = status
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_default();
            *self
                .other_errors
                .entry(format!("{:?} {reason}", status.code()))
                .or_default() += 1;
        }
    }

    /// Fills the sandbox-side counts from its stats.
    pub fn take_sandbox_stats(&mut self, stats: &SandboxStats, out_of_band: u64) {
        self.too_many_requests = stats.lookups_answered_with(codes::TOO_MANY_REQUESTS);
        self.token_rejections = stats.token_rejections();
        self.token_fetches = stats.tokens_issued_total().saturating_sub(out_of_band);
        self.token_calls = stats.token_calls;
        self.lookup_faults_injected = stats.lookups_answered_with(codes::SYSTEM_BUSY);
    }
}

/// Whether a caller's failure is about the token rather than the lookup.
pub(crate) fn is_token_error(status: &tonic::Status) -> bool {
    let Some(info) = status.get_details_error_info() else {
        return status.message().contains("token");
    };
    (info.domain == TOKEND_DOMAIN
        && (info.reason.starts_with("TOKEN_") || info.reason == "CREDENTIALS_REFUSED"))
        || info
            .reason
            .parse::<i64>()
            .ok()
            .and_then(codes::known)
            .is_some_and(|known| {
                known.class == codes::CodeClass::TokenRejected
                    || known.envelope == codes::Envelope::TokenEndpoint
            })
}

/// The fewest token fetches a daemon with this refresh window can make: each
/// app fetches at the start and after every invalidation, and a token serves
/// at most `lifetime - window_end` (the window's last moment) before its
/// successor must be fetched, so a stretch of `d` seconds between
/// invalidations needs `ceil(d / (lifetime - window_end))` fetches.
/// `invalidated_at` holds, per app, the seconds into the run at which its
/// token was invalidated. A refresh that fails and succeeds on a retry shifts
/// the app's later refreshes, so a run with faults may end a fetch or two
/// below this fault-free minimum; above it is waste.
pub fn minimum_fetches(
    duration: Duration,
    lifetime: Duration,
    window_end: Duration,
    invalidated_at: &[Vec<f64>],
) -> u64 {
    let longest_use = lifetime.saturating_sub(window_end).as_secs_f64().max(1.0);
    let end = duration.as_secs_f64();
    invalidated_at
        .iter()
        .map(|times| {
            let mut starts = vec![0.0];
            starts.extend(times.iter().copied().filter(|at| *at > 0.0 && *at < end));
            starts.push(end);
            starts
                .windows(2)
                .map(|segment| ((segment[1] - segment[0]) / longest_use).ceil() as u64)
                .sum::<u64>()
        })
        .sum()
}

/// Runs the soak in-process on a manual clock: per simulated second, every
/// app's lookups and token requests go out over gRPC and are awaited, then
/// the refresh sweep runs, then the clock moves on by a second. The daemon's
/// real-time pacing is set out of the way because the sandbox counts its
/// 10 QPS on the manual clock: at most `lookups_per_app_per_second` (keep it
/// below 10) reach the sandbox per app per simulated second unless the daemon
/// sends duplicates or retries too much, which then shows as 2119003.
pub async fn run_simulated(plan: &SoakPlan) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    let clock = ManualClock::starting_at(1_767_225_600_000);
    let shared_clock: SharedClock = clock.clone();
    let sandbox = Sandbox::start(shared_clock.clone(), plan.sandbox_config())
        .await
        .context("cannot start the sandbox")?;
    let fleet = Fleet::new(plan.apps, plan.apps);
    fleet.teach_sandbox(sandbox.state());
    let orders = plan.lookups_per_app_per_second * plan.apps;
    teach_orders(sandbox.state(), orders);

    let directory = tempfile::tempdir()?;
    let database = directory.path().join("soak.db");
    let mut config = Config {
        database: DatabaseSetting::Sqlite(database.clone()),
        ..Config::default()
    };
    config.douyin.base_url = sandbox.base_url();
    config.clients.push(crate::bench::bench_client());
    config.refresh.sweep = None;
    config
        .lookup
        .set_rate_per_second(crate::domain::DouyinApi::AfterSaleOrderDetail, 1_000);
    // Retry backoff runs in real time: at the default 100 ms a step with one
    // busy answer would wait ~50 ms for its retry, most of the run's time.
    config.lookup.retry_backoff_initial = Duration::from_millis(2);
    config.lookup.retry_backoff_max = Duration::from_millis(10);
    plan.adjust_daemon_config(&mut config);
    let store = Store::open(&database, &crate::bench::master_key_beside(&database))
        .await?
        .0;
    fleet.store_in(&store, clock.now_unix_ms()).await?;
    store.close().await;

    let app = App::start(config, shared_clock).await?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let serving = app.clone();
    let stopped = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move { serving.serve(listener, stopped).await });
    let channel = Channel::from_shared(address)?.connect().await?;

    let mut report = SoakReport::default();
    let seconds = plan.duration.as_secs();
    let invalidation_every = plan.invalidation_every.as_secs().max(1);
    let token_fault_offset = invalidation_every / 2;
    let mut invalidated_at: Vec<Vec<f64>> = vec![Vec::new(); plan.apps];
    let mut out_of_band = 0;
    for second in 0..seconds {
        if second > 0 && second % invalidation_every == 0 {
            let victim = plan.invalidated_app(report.invalidations as usize);
            // Two fresh tokens leave the daemon's token beyond the newest two:
            // dead at once, grace or not.
            for _ in 0..2 {
                sandbox
                    .state()
                    .issue_token_out_of_band(&fleet.client_key(victim));
                out_of_band += 1;
            }
            invalidated_at[victim].push(second as f64);
            report.invalidations += 1;
        }
        if plan.token_faults && second % invalidation_every == token_fault_offset {
            sandbox.state().push_token_faults([Fault::HttpStatus(500)]);
            report.token_faults_injected += 1;
        }
        one_simulated_second(plan, &fleet, &channel, &mut report).await;
        app.tokens.sweep().await;
        if second % 10 == 0 {
            let resident = ProcessSample::read_own().map_or(0, |sample| sample.resident_kib);
            report.resident_kib.push((second, resident));
        }
        clock.advance(Duration::from_secs(1));
    }

    report.take_sandbox_stats(&sandbox.state().stats(), out_of_band);
    report.minimum_fetches = minimum_fetches(
        plan.duration,
        plan.token_lifetime,
        plan.refresh_window_end,
        &invalidated_at,
    );
    report.duration_seconds = plan.duration.as_secs_f64();
    report.real_seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    server.await??;
    app.close().await;
    sandbox.stop().await;
    Ok(report)
}

/// One simulated second of load, awaited in full before the clock moves.
async fn one_simulated_second(
    plan: &SoakPlan,
    fleet: &Fleet,
    channel: &Channel,
    report: &mut SoakReport,
) {
    let mut lookups = Vec::new();
    let mut token_requests = Vec::new();
    for app in 0..plan.apps {
        let account_id = fleet.account_id(fleet.merchant_of_app(app));
        for index in 0..plan.lookups_per_app_per_second {
            let mut client = AfterSaleServiceClient::with_interceptor(
                channel.clone(),
                crate::bench::bench_auth(),
            );
            let request = GetAfterSaleOrderDetailRequest {
                account_id: account_id.clone(),
                order_id: order_id(app * plan.lookups_per_app_per_second + index),
                certificate_id: None,
                include_raw_json: false,
            };
            lookups.push(tokio::spawn(async move {
                client.get_after_sale_order_detail(request).await
            }));
        }
        for _ in 0..plan.token_requests_per_app_per_second {
            let mut client =
                TokenServiceClient::with_interceptor(channel.clone(), crate::bench::bench_auth());
            let request = GetAccessTokenRequest {
                selector: Some(Selector::AccountId(account_id.clone())),
            };
            token_requests.push(tokio::spawn(async move {
                client.get_access_token(request).await
            }));
        }
    }
    for lookup in lookups {
        report.lookups += 1;
        match lookup.await {
            Ok(Ok(_)) => report.lookups_ok += 1,
            Ok(Err(status)) => report.record_status(&status),
            Err(join_error) => {
                report.record_status(&tonic::Status::internal(join_error.to_string()))
            }
        }
    }
    for request in token_requests {
        report.token_requests += 1;
        match request.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => report.record_status(&status),
            Err(join_error) => {
                report.record_status(&tonic::Status::internal(join_error.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_counts_a_fetch_per_usable_lifetime_and_per_invalidation() {
        let minute = Duration::from_secs(60);
        let lifetime = Duration::from_secs(30);
        let window_end = Duration::from_secs(6);
        // 60 s, at most 24 s per token: fetches at 0, 24 and 48.
        assert_eq!(minimum_fetches(minute, lifetime, window_end, &[vec![]]), 3);
        // 48 s: fetches at 0 and 24 cover it.
        assert_eq!(
            minimum_fetches(Duration::from_secs(48), lifetime, window_end, &[vec![]]),
            2
        );
        // An invalidation at 30 s: 0, 24, then 30 and 54.
        assert_eq!(
            minimum_fetches(minute, lifetime, window_end, &[vec![30.0], vec![]]),
            4 + 3
        );
    }
}
