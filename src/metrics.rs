//! Prometheus metrics: a process-wide sink that the token manager, the Douyin
//! client and the gRPC layer record into with one call each, a small
//! text-format encoder, and the HTTP listener (`metrics_listen`, off by
//! default) that serves `/metrics`.
//!
//! Process-wide, like the log subscriber: one daemon runs per process, and a
//! global sink keeps the recording calls one line long in the modules that
//! own the events. Token gauges are not recorded at all: they are read from
//! the token manager's status at scrape time, so they are never stale.
//!
//! Label cardinality is bounded: apps appear only as client_key fingerprints
//! (at most [`MAX_APP_LABELS`] of them, later ones as `other`), Douyin codes
//! only from the set the daemon knows (others as `other`), everything else
//! from fixed lists.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::domain::ClientKey;
use crate::douyin::after_sale::{AfterSaleAnswer, LookupFailure};
use crate::douyin::codes;
use crate::douyin::token_endpoint::TokenFetchError;
use crate::token::{RefreshReason, TokenStatusView};

/// At most this many distinct app labels; apps beyond it share `app="other"`.
pub const MAX_APP_LABELS: usize = 256;
const OTHER: &str = "other";

/// Douyin's budget for the token endpoint: 500 calls per app per 5 minutes.
pub const TOKEN_BUDGET_CALLS: u64 = 500;
pub const TOKEN_BUDGET_WINDOW: Duration = Duration::from_secs(300);

/// Latency buckets in seconds: from a cached-token lookup to Douyin's 10 s timeout.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static SINK: LazyLock<Sink> = LazyLock::new(Sink::default);

#[derive(Default)]
struct Sink {
    state: Mutex<Recorded>,
    lookups_in_flight: AtomicI64,
}

#[derive(Default)]
struct Recorded {
    app_labels: BTreeSet<String>,
    /// (app, reason, result) → count.
    refreshes: BTreeMap<(String, &'static str, &'static str), u64>,
    /// (app, cause) → count.
    fetch_failures: BTreeMap<(String, &'static str), u64>,
    /// result → token endpoint latency.
    refresh_duration: BTreeMap<&'static str, Histogram>,
    /// (endpoint, code) → count.
    upstream_calls: BTreeMap<(&'static str, String), u64>,
    /// app → callers that joined a fetch already in flight.
    coalesced: BTreeMap<String, u64>,
    /// gRPC code → after-sale lookup latency.
    lookup_duration: BTreeMap<&'static str, Histogram>,
    /// app → start times (clock ms) of token endpoint calls within the budget window.
    token_calls: BTreeMap<String, VecDeque<i64>>,
}

#[derive(Default, Clone)]
struct Histogram {
    bucket_counts: [u64; LATENCY_BUCKETS.len()],
    sum_seconds: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&mut self.bucket_counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

fn recorded() -> std::sync::MutexGuard<'static, Recorded> {
    // Counters are plain numbers: a panic elsewhere leaves them usable.
    SINK.state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Recorded {
    /// The app's label: its fingerprint while under the cap, else "other".
    fn app_label(&mut self, client_key: &ClientKey) -> String {
        let fingerprint = client_key.fingerprint();
        if self.app_labels.contains(&fingerprint) {
            return fingerprint;
        }
        if self.app_labels.len() < MAX_APP_LABELS {
            self.app_labels.insert(fingerprint.clone());
            return fingerprint;
        }
        OTHER.to_owned()
    }
}

/// A Douyin code as a label: itself when the daemon knows it, else "other".
pub fn douyin_code_label(code: i64) -> String {
    codes::metric_label(code).into_owned()
}

// === recording ===

/// One call to the token endpoint finished, started at `started_at_ms` (the
/// daemon's clock) and taking `elapsed`.
pub fn record_token_fetch(
    client_key: &ClientKey,
    reason: RefreshReason,
    before_first_sweep: bool,
    started_at_ms: i64,
    outcome: Result<(), &TokenFetchError>,
    elapsed: Duration,
) {
    let mut recorded = recorded();
    let app = recorded.app_label(client_key);
    let result = if outcome.is_ok() {
        "success"
    } else {
        "failure"
    };
    *recorded
        .refreshes
        .entry((app.clone(), reason.metric_label(before_first_sweep), result))
        .or_default() += 1;
    recorded
        .refresh_duration
        .entry(result)
        .or_default()
        .observe(elapsed);
    let code = match outcome {
        Ok(()) => "0".to_owned(),
        Err(TokenFetchError::Refused { code, .. }) => douyin_code_label(*code),
        Err(TokenFetchError::Transport(_)) => "transport".to_owned(),
        // Douyin answered with success, just with the expired token.
        Err(TokenFetchError::StaleRepeat) => "0".to_owned(),
    };
    *recorded
        .upstream_calls
        .entry(("client_token", code))
        .or_default() += 1;
    if let Err(error) = outcome {
        *recorded
            .fetch_failures
            .entry((app.clone(), error.cause_label()))
            .or_default() += 1;
    }
    let calls = recorded.token_calls.entry(app).or_default();
    calls.push_back(started_at_ms);
    prune_budget_window(calls, started_at_ms);
}

/// A caller found a fetch for its app in flight and waits for it instead of
/// starting another.
pub fn record_coalesced(client_key: &ClientKey) {
    let mut recorded = recorded();
    let app = recorded.app_label(client_key);
    *recorded.coalesced.entry(app).or_default() += 1;
}

/// One call to the after-sale endpoint finished.
pub fn record_after_sale_call(outcome: &Result<AfterSaleAnswer, LookupFailure>) {
    let code = match outcome {
        Ok(_) => "0".to_owned(),
        Err(LookupFailure::Douyin(error)) => douyin_code_label(error.code),
        Err(LookupFailure::Transport(_)) => "transport".to_owned(),
    };
    *recorded()
        .upstream_calls
        .entry(("after_sale", code))
        .or_default() += 1;
}

/// One after-sale lookup over gRPC answered with `grpc_code` after `elapsed`.
pub fn record_lookup(grpc_code: &'static str, elapsed: Duration) {
    recorded()
        .lookup_duration
        .entry(grpc_code)
        .or_default()
        .observe(elapsed);
}

/// Counts a lookup as queued from creation until drop: accepted over gRPC and
/// not yet answered (waiting for a token or for Douyin).
pub struct LookupInFlight(());

impl LookupInFlight {
    pub fn enter() -> Self {
        SINK.lookups_in_flight.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for LookupInFlight {
    fn drop(&mut self) {
        SINK.lookups_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn prune_budget_window(calls: &mut VecDeque<i64>, now_ms: i64) {
    let window_ms = i64::try_from(TOKEN_BUDGET_WINDOW.as_millis()).unwrap_or(i64::MAX);
    while calls.front().is_some_and(|at| *at <= now_ms - window_ms) {
        calls.pop_front();
    }
}

// === the text format ===

/// The Prometheus text exposition of everything recorded, plus token gauges
/// from `tokens` (the token manager's status now) at `now_ms`.
/// Gauges and counters kept by other modules, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct DaemonReadings {
    /// Token endpoint calls left in the daemon's own budget (all apps).
    pub token_budget_remaining: usize,
    /// Lookups served by an identical lookup already in flight.
    pub lookups_coalesced: u64,
    /// Retries after transient upstream failures.
    pub lookup_retries: u64,
    /// Lookups refused because the app's next turn came too late.
    pub lookups_not_admitted: u64,
    pub lookup_cache_hits: u64,
}

pub fn render(tokens: &[TokenStatusView], now_ms: i64, readings: &DaemonReadings) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let mut recorded = recorded();

    family(
        &mut out,
        "douyin_tokend_build_info",
        "gauge",
        "The running version.",
    );
    sample(
        &mut out,
        "douyin_tokend_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    let apps: Vec<(String, &TokenStatusView)> = tokens
        .iter()
        .map(|view| (view.client_key.fingerprint(), view))
        .collect();
    family(
        &mut out,
        "douyin_tokend_token_expires_in_seconds",
        "gauge",
        "Seconds until the app's current token expires (negative once expired); absent without a token.",
    );
    for (app, view) in &apps {
        if let Some(expires_at_ms) = view.expires_at_ms {
            sample(
                &mut out,
                "douyin_tokend_token_expires_in_seconds",
                &[("app", app)],
                (expires_at_ms - now_ms) / 1000,
            );
        }
    }
    family(
        &mut out,
        "douyin_tokend_token_age_seconds",
        "gauge",
        "Seconds since the app's current token was fetched; absent without a token.",
    );
    for (app, view) in &apps {
        if let Some(fetched_at_ms) = view.fetched_at_ms {
            sample(
                &mut out,
                "douyin_tokend_token_age_seconds",
                &[("app", app)],
                (now_ms - fetched_at_ms) / 1000,
            );
        }
    }
    family(
        &mut out,
        "douyin_tokend_token_generation",
        "gauge",
        "Generation of the app's token: grows by one with every fetch.",
    );
    for (app, view) in &apps {
        sample(
            &mut out,
            "douyin_tokend_token_generation",
            &[("app", app)],
            view.generation,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_state",
        "gauge",
        "1 for the app's token state (valid, expired, invalidated, missing, failed).",
    );
    for (app, view) in &apps {
        sample(
            &mut out,
            "douyin_tokend_token_state",
            &[("app", app), ("state", view.state)],
            1,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_consecutive_failures",
        "gauge",
        "Token fetches that failed in a row for the app.",
    );
    for (app, view) in &apps {
        sample(
            &mut out,
            "douyin_tokend_token_consecutive_failures",
            &[("app", app)],
            view.consecutive_failures,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_budget_remaining",
        "gauge",
        "Token endpoint calls left for the app in Douyin's budget (500 per 5 minutes), counted by the daemon.",
    );
    for (app, _) in &apps {
        let used = recorded.token_calls.get_mut(app).map_or(0, |calls| {
            prune_budget_window(calls, now_ms);
            calls.len() as u64
        });
        sample(
            &mut out,
            "douyin_tokend_token_budget_remaining",
            &[("app", app)],
            TOKEN_BUDGET_CALLS.saturating_sub(used),
        );
    }

    family(
        &mut out,
        "douyin_tokend_token_refreshes_total",
        "counter",
        "Token fetches by app, reason (startup, scheduled, reactive, forced) and result.",
    );
    for ((app, reason, result), count) in &recorded.refreshes {
        sample(
            &mut out,
            "douyin_tokend_token_refreshes_total",
            &[("app", app), ("reason", reason), ("result", result)],
            count,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_fetch_failures_total",
        "counter",
        "Failed token fetches by app and cause (credentials_refused, rate_limited, refused, timeout, connect, http_status, malformed_body).",
    );
    for ((app, cause), count) in &recorded.fetch_failures {
        sample(
            &mut out,
            "douyin_tokend_token_fetch_failures_total",
            &[("app", app), ("cause", cause)],
            count,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_fetch_duration_seconds",
        "histogram",
        "Latency of token endpoint calls by result.",
    );
    for (result, histogram) in &recorded.refresh_duration {
        histogram_samples(
            &mut out,
            "douyin_tokend_token_fetch_duration_seconds",
            ("result", result),
            histogram,
        );
    }
    family(
        &mut out,
        "douyin_tokend_token_requests_coalesced_total",
        "counter",
        "Callers that joined a token fetch already in flight for their app instead of starting one.",
    );
    for (app, count) in &recorded.coalesced {
        sample(
            &mut out,
            "douyin_tokend_token_requests_coalesced_total",
            &[("app", app)],
            count,
        );
    }

    family(
        &mut out,
        "douyin_tokend_upstream_calls_total",
        "counter",
        "Calls to Douyin by endpoint and answered code (0 = success, transport = no usable answer, other = a code the daemon does not know).",
    );
    for ((endpoint, code), count) in &recorded.upstream_calls {
        sample(
            &mut out,
            "douyin_tokend_upstream_calls_total",
            &[("endpoint", endpoint), ("code", code)],
            count,
        );
    }
    family(
        &mut out,
        "douyin_tokend_lookup_duration_seconds",
        "histogram",
        "Latency of after-sale lookups over gRPC, by gRPC status code.",
    );
    for (code, histogram) in &recorded.lookup_duration {
        histogram_samples(
            &mut out,
            "douyin_tokend_lookup_duration_seconds",
            ("code", code),
            histogram,
        );
    }
    family(
        &mut out,
        "douyin_tokend_lookup_queue_depth",
        "gauge",
        "After-sale lookups accepted and not yet answered (waiting for a token or for Douyin).",
    );
    sample(
        &mut out,
        "douyin_tokend_lookup_queue_depth",
        &[],
        SINK.lookups_in_flight.load(Ordering::Relaxed),
    );
    for (name, kind, help, value) in [
        (
            "douyin_tokend_token_budget_global_remaining",
            "gauge",
            "Token endpoint calls left in the daemon's budget across all apps (refresh.budget per refresh.budget_window).",
            readings.token_budget_remaining as u64,
        ),
        (
            "douyin_tokend_lookups_coalesced_total",
            "counter",
            "Lookups answered by an identical lookup already in flight.",
            readings.lookups_coalesced,
        ),
        (
            "douyin_tokend_lookup_retries_total",
            "counter",
            "Retries of lookups after transient upstream failures.",
            readings.lookup_retries,
        ),
        (
            "douyin_tokend_lookups_not_admitted_total",
            "counter",
            "Lookups refused at once because the app's next turn would come too late for their deadline.",
            readings.lookups_not_admitted,
        ),
        (
            "douyin_tokend_lookup_cache_hits_total",
            "counter",
            "Lookups answered from the response cache.",
            readings.lookup_cache_hits,
        ),
    ] {
        family(&mut out, name, kind, help);
        sample(&mut out, name, &[], value);
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    write_labels(out, labels);
    let _ = writeln!(out, " {value}");
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (index, (name, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label_value(value));
    }
    out.push('}');
}

fn histogram_samples(out: &mut String, name: &str, label: (&str, &str), histogram: &Histogram) {
    let bucket_name = format!("{name}_bucket");
    for (bound, count) in LATENCY_BUCKETS.iter().zip(&histogram.bucket_counts) {
        let bound = bound.to_string();
        sample(out, &bucket_name, &[label, ("le", &bound)], count);
    }
    sample(out, &bucket_name, &[label, ("le", "+Inf")], histogram.count);
    sample(out, &format!("{name}_sum"), &[label], histogram.sum_seconds);
    sample(out, &format!("{name}_count"), &[label], histogram.count);
}

/// The text format's escapes for label values: backslash, quote, newline.
fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// === the listener ===

/// Renders the page on each scrape.
pub type Renderer = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    renderer: Renderer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(renderer);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(renderer): State<Renderer>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        renderer(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_label_values_escaped() {
        let mut histogram = Histogram::default();
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(3));
        let mut out = String::new();
        histogram_samples(&mut out, "x_seconds", ("code", "a\"b\\c\nd"), &histogram);
        assert!(
            out.contains("x_seconds_bucket{code=\"a\\\"b\\\\c\\nd\",le=\"0.025\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("le=\"2.5\"} 1\n"), "{out}");
        assert!(out.contains("le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 2\n"), "{out}");
        assert!(
            out.contains("x_seconds_count{code=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{out}"
        );
    }

    #[test]
    fn app_labels_stop_growing_at_the_cap() {
        let mut recorded = Recorded::default();
        for index in 0..MAX_APP_LABELS + 10 {
            let key = ClientKey::parse(&format!("awkey{index:08}")).unwrap();
            let label = recorded.app_label(&key);
            if index < MAX_APP_LABELS {
                assert_eq!(label, key.fingerprint());
            } else {
                assert_eq!(label, "other");
            }
        }
        let first = ClientKey::parse("awkey00000000").unwrap();
        assert_eq!(recorded.app_label(&first), first.fingerprint());
    }

    #[test]
    fn the_budget_window_forgets_calls_older_than_five_minutes() {
        let mut calls: VecDeque<i64> = [0, 100_000, 299_999, 300_000].into_iter().collect();
        prune_budget_window(&mut calls, 300_000);
        assert_eq!(calls, [100_000, 299_999, 300_000]);
        prune_budget_window(&mut calls, 600_000);
        assert!(calls.is_empty());
    }
}
