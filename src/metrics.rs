//! Prometheus metrics: the families the daemon records into ([`Metrics`]), the
//! readings taken at scrape time ([`ScrapeTimeCollector`]), and the HTTP
//! listener (`metrics_listen`, off by default) that serves `/metrics` in the
//! Prometheus text format.
//!
//! No global: the composition root (`app`) owns one `prometheus_client`
//! [`Registry`] per daemon, registers a [`Metrics`] in it and hands clones of
//! it to the modules that record (the token manager, the Douyin client, the
//! gRPC layer). A test that starts a daemon gets that daemon's registry, so
//! daemons sharing a test binary never add to each other's counters.
//!
//! This module knows nothing above `domain`: the label values come from the
//! modules that own the events (a refresh reason, a fetch failure's cause, a
//! Douyin code checked against the code table, a gRPC status), and token
//! gauges are read at scrape time from plain [`AppTokenReading`]s that `app`
//! builds from the token manager's status, so they are never stale.
//!
//! Label cardinality is bounded: apps appear by client_key
//! (at most [`MAX_APP_LABELS`] of them, later ones as `other`), Douyin codes
//! only from the set the daemon knows (`douyin::codes` labels the rest
//! `other`), everything else from fixed lists.

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::domain::ClientKey;

/// At most this many distinct app labels on counters; apps beyond it share
/// `app="other"`. Counters remember every label they ever saw (removed apps
/// too), so without a cap the page would only grow.
pub(crate) const MAX_APP_LABELS: usize = 256;
const OTHER: &str = "other";

/// Every series name starts with this (and an underscore).
const SERIES_PREFIX: &str = "douyin_tokend";

/// Latency buckets in seconds: from a cached-token lookup to Douyin's 10 s timeout.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A new, empty registry that names every series `douyin_tokend_…`; one per
/// daemon, owned by `app`.
pub(crate) fn new_registry() -> Registry {
    Registry::with_prefix(SERIES_PREFIX)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenRefreshLabels {
    app: String,
    reason: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenFetchFailureLabels {
    app: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamCallLabels {
    endpoint: &'static str,
    code: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcCodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<Labels> = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Handles to the families the daemon records into. Cheap to clone; clones
/// record into the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    app_labels: AppLabels,
    token_refreshes: Family<TokenRefreshLabels, Counter>,
    token_fetch_failures: Family<TokenFetchFailureLabels, Counter>,
    token_fetch_duration: HistogramFamily<ResultLabel>,
    token_requests_coalesced: Family<AppLabel, Counter>,
    upstream_calls: Family<UpstreamCallLabels, Counter>,
    lookup_duration: HistogramFamily<GrpcCodeLabel>,
    lookup_queue_depth: Gauge,
    unauthenticated_calls: Family<ReasonLabel, Counter>,
    webhook_notifications: Family<OutcomeLabel, Counter>,
    cluster_daemons: Gauge,
    cluster_link_up: Gauge,
}

impl Metrics {
    /// Families in no registry: what they record is never served. For
    /// benchmarks and unit tests that build parts without a daemon.
    pub fn unregistered() -> Self {
        Self {
            app_labels: AppLabels::default(),
            token_refreshes: Family::default(),
            token_fetch_failures: Family::default(),
            token_fetch_duration: Family::new_with_constructor(latency_histogram),
            token_requests_coalesced: Family::default(),
            upstream_calls: Family::default(),
            lookup_duration: Family::new_with_constructor(latency_histogram),
            lookup_queue_depth: Gauge::default(),
            unauthenticated_calls: Family::default(),
            webhook_notifications: Family::default(),
            cluster_daemons: Gauge::default(),
            cluster_link_up: Gauge::default(),
        }
    }

    /// New families, registered in `registry` with the running version's
    /// `build_info`. (The registry adds `_total` to counters and a period to
    /// each help text.)
    pub(crate) fn register_in(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register(
            "build",
            "The running version",
            Info::new(VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register(
            "token_refreshes",
            "Token fetches by app, reason (startup, scheduled, reactive, forced) and result",
            metrics.token_refreshes.clone(),
        );
        registry.register(
            "token_fetch_failures",
            "Failed token fetches by app and cause (credentials_refused, rate_limited, refused, timeout, connect, http_status, malformed_body, stale_repeat)",
            metrics.token_fetch_failures.clone(),
        );
        registry.register(
            "token_fetch_duration_seconds",
            "Latency of token fetches by result",
            metrics.token_fetch_duration.clone(),
        );
        registry.register(
            "token_requests_coalesced",
            "Callers that joined a token fetch already in flight for their app instead of starting one",
            metrics.token_requests_coalesced.clone(),
        );
        registry.register(
            "upstream_calls",
            "Calls to Douyin by endpoint and answered code (0 = success, transport = no usable answer, other = a code the daemon does not know)",
            metrics.upstream_calls.clone(),
        );
        registry.register(
            "lookup_duration_seconds",
            "Latency of after-sale lookups over gRPC, by gRPC status code",
            metrics.lookup_duration.clone(),
        );
        registry.register(
            "lookup_queue_depth",
            "After-sale lookups accepted and not yet answered (waiting for a token or for Douyin)",
            metrics.lookup_queue_depth.clone(),
        );
        registry.register(
            "unauthenticated_calls",
            "Calls refused before any handler for a missing or unknown API key, by reason",
            metrics.unauthenticated_calls.clone(),
        );
        registry.register(
            "webhook_notifications",
            "Requests to the webhook by outcome (stored, duplicate, url_check, other_event, malformed, too_large, slow_body, missing_msg_id, missing_signature, unknown_app, bad_signature, busy, store_failed)",
            metrics.webhook_notifications.clone(),
        );
        registry.register(
            "cluster_daemons",
            "Daemons alive on the shared PostgreSQL database by their heartbeats, this one included; each paces Douyin calls at this share of the rate (0 on SQLite)",
            metrics.cluster_daemons.clone(),
        );
        registry.register(
            "cluster_link_up",
            "1 while this daemon listens to the shared database for the other daemons' changes, 0 while it reconnects (or on SQLite)",
            metrics.cluster_link_up.clone(),
        );
        metrics
    }

    /// One token fetch finished after `elapsed`: `reason_label` says why it
    /// ran, `failure_cause_label` why it failed (`None`: it succeeded).
    pub(crate) fn record_token_fetch(
        &self,
        client_key: &ClientKey,
        reason_label: &'static str,
        failure_cause_label: Option<&'static str>,
        elapsed: Duration,
    ) {
        let app = self.app_labels.label_of(client_key);
        let result = if failure_cause_label.is_some() {
            "failure"
        } else {
            "success"
        };
        self.token_fetch_duration
            .get_or_create(&ResultLabel { result })
            .observe(elapsed.as_secs_f64());
        if let Some(cause) = failure_cause_label {
            self.token_fetch_failures
                .get_or_create(&TokenFetchFailureLabels {
                    app: app.clone(),
                    cause,
                })
                .inc();
        }
        self.token_refreshes
            .get_or_create(&TokenRefreshLabels {
                app,
                reason: reason_label,
                result,
            })
            .inc();
    }

    /// A caller found a token fetch for its app in flight and waits for it
    /// instead of starting another.
    pub(crate) fn record_token_request_coalesced(&self, client_key: &ClientKey) {
        let app = self.app_labels.label_of(client_key);
        self.token_requests_coalesced
            .get_or_create(&AppLabel { app })
            .inc();
    }

    /// One HTTP call to Douyin's `endpoint_label` answered `code_label` (the
    /// caller keeps it to `0`, a known code, `other` or `transport`).
    pub(crate) fn record_upstream_call(
        &self,
        endpoint_label: &'static str,
        code_label: Cow<'static, str>,
    ) {
        self.upstream_calls
            .get_or_create(&UpstreamCallLabels {
                endpoint: endpoint_label,
                code: code_label,
            })
            .inc();
    }

    /// A call was refused for its API key (`missing_key` or `unknown_key`).
    pub(crate) fn record_unauthenticated_call(&self, reason_label: &'static str) {
        self.unauthenticated_calls
            .get_or_create(&ReasonLabel {
                reason: reason_label,
            })
            .inc();
    }

    /// One request to the webhook ended with `outcome_label` (the webhook's
    /// `NotificationOutcome::metric_label`).
    pub(crate) fn record_webhook_notification(&self, outcome_label: &'static str) {
        self.webhook_notifications
            .get_or_create(&OutcomeLabel {
                outcome: outcome_label,
            })
            .inc();
    }

    /// One after-sale lookup over gRPC answered with `grpc_code_label` after `elapsed`.
    /// The living daemons the last heartbeat counted.
    pub(crate) fn record_cluster_daemons(&self, daemons: u32) {
        self.cluster_daemons.set(i64::from(daemons));
    }

    pub(crate) fn record_cluster_link_up(&self, up: bool) {
        self.cluster_link_up.set(i64::from(up));
    }

    pub(crate) fn record_lookup(&self, grpc_code_label: &'static str, elapsed: Duration) {
        self.lookup_duration
            .get_or_create(&GrpcCodeLabel {
                code: grpc_code_label,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a lookup as queued until the returned guard drops: accepted over
    /// gRPC and not yet answered (waiting for a token or for Douyin).
    pub(crate) fn lookup_queued(&self) -> QueuedLookup {
        self.lookup_queue_depth.inc();
        QueuedLookup {
            queue_depth: self.lookup_queue_depth.clone(),
        }
    }
}

/// A lookup counted in `lookup_queue_depth` while this lives; a drop (an
/// answer, or a caller that went away) takes it out again.
pub(crate) struct QueuedLookup {
    queue_depth: Gauge,
}

impl Drop for QueuedLookup {
    fn drop(&mut self) {
        self.queue_depth.dec();
    }
}

/// The apps (client keys) that have their own label, shared by every clone of
/// one [`Metrics`].
#[derive(Clone, Debug, Default)]
struct AppLabels {
    labelled_apps: Arc<Mutex<HashSet<String>>>,
}

impl AppLabels {
    /// The app's label: its client key while under the cap, else "other".
    fn label_of(&self, client_key: &ClientKey) -> String {
        let label = client_key.to_string();
        // A set of strings stays consistent whatever panicked while holding it.
        let mut labelled_apps = self.labelled_apps.lock();
        if labelled_apps.contains(&label) {
            return label;
        }
        if labelled_apps.len() < MAX_APP_LABELS {
            labelled_apps.insert(label.clone());
            return label;
        }
        OTHER.to_owned()
    }
}

// === read at scrape time ===

/// One app's token, as the token gauges show it.
#[derive(Debug, Clone)]
pub(crate) struct AppTokenReading {
    pub(crate) client_key: ClientKey,
    /// One of valid, expired, invalidated, missing, failed.
    pub(crate) state_label: &'static str,
    pub(crate) generation: i64,
    /// Negative once expired; `None` without a token.
    pub(crate) expires_in_seconds: Option<i64>,
    /// `None` without a token.
    pub(crate) age_seconds: Option<i64>,
    pub(crate) consecutive_failures: u32,
    /// Token endpoint calls left of Douyin's per-app budget, as counted by the daemon.
    pub(crate) douyin_budget_remaining: u64,
}

/// Gauges and counters kept by other modules, read at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScrapeTimeReadings {
    pub(crate) app_tokens: Vec<AppTokenReading>,
    /// Token endpoint calls left in the daemon's own budget (all apps).
    pub(crate) token_budget_global_remaining: u64,
    /// Lookups served by an identical lookup already in flight.
    pub(crate) lookups_coalesced: u64,
    /// Retries after transient upstream failures.
    pub(crate) lookup_retries: u64,
    /// Lookups refused because the app's next turn came too late.
    pub(crate) lookups_not_admitted: u64,
    pub(crate) lookup_cache_hits: u64,
}

/// Reads [`ScrapeTimeReadings`] on every scrape and encodes them; registered
/// by `app`, whose closure asks the token manager and the lookup service.
pub(crate) struct ScrapeTimeCollector {
    read: Box<dyn Fn() -> ScrapeTimeReadings + Send + Sync>,
}

impl ScrapeTimeCollector {
    pub(crate) fn new(read: impl Fn() -> ScrapeTimeReadings + Send + Sync + 'static) -> Self {
        Self {
            read: Box::new(read),
        }
    }
}

impl std::fmt::Debug for ScrapeTimeCollector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ScrapeTimeCollector")
    }
}

/// One gauge family with an `app` label, a sample per app that has a value.
fn encode_app_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    app_tokens: &[AppTokenReading],
    value_of: impl Fn(&AppTokenReading) -> Option<i64>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for reading in app_tokens {
        if let Some(value) = value_of(reading) {
            let labels = AppLabel {
                app: reading.client_key.to_string(),
            };
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for ScrapeTimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let readings = (self.read)();
        // Token gauges are labelled by every registered app's client key,
        // without the counters' cap: they list only apps registered now, and
        // two apps sharing "other" would make two samples of one series.
        let app_tokens = &readings.app_tokens;
        encode_app_gauge(
            &mut encoder,
            "token_expires_in_seconds",
            "Seconds until the app's current token expires (negative once expired); absent without a token.",
            app_tokens,
            |reading| reading.expires_in_seconds,
        )?;
        encode_app_gauge(
            &mut encoder,
            "token_age_seconds",
            "Seconds since the app's current token was fetched; absent without a token.",
            app_tokens,
            |reading| reading.age_seconds,
        )?;
        encode_app_gauge(
            &mut encoder,
            "token_generation",
            "Generation of the app's token: grows by one with every fetch.",
            app_tokens,
            |reading| Some(reading.generation),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "token_state",
                "1 for the app's token state (valid, expired, invalidated, missing, failed).",
                None,
                MetricType::Gauge,
            )?;
            for reading in app_tokens {
                let app_label = reading.client_key.to_string();
                let labels = [("app", app_label.as_str()), ("state", reading.state_label)];
                ConstGauge::new(1_i64).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_app_gauge(
            &mut encoder,
            "token_consecutive_failures",
            "Token fetches that failed in a row for the app.",
            app_tokens,
            |reading| Some(i64::from(reading.consecutive_failures)),
        )?;
        encode_app_gauge(
            &mut encoder,
            "token_budget_remaining",
            "Token endpoint calls left for the app in Douyin's budget (500 per 5 minutes), counted by the daemon.",
            app_tokens,
            |reading| Some(i64::try_from(reading.douyin_budget_remaining).unwrap_or(i64::MAX)),
        )?;
        ConstGauge::new(readings.token_budget_global_remaining).encode(encoder.encode_descriptor(
            "token_budget_global_remaining",
            "Token endpoint calls left in the daemon's budget across all apps (refresh.budget per refresh.budget_window).",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, value) in [
            (
                "lookups_coalesced",
                "Lookups answered by an identical lookup already in flight.",
                readings.lookups_coalesced,
            ),
            (
                "lookup_retries",
                "Retries of lookups after transient upstream failures.",
                readings.lookup_retries,
            ),
            (
                "lookups_not_admitted",
                "Lookups refused at once because the app's next turn would come too late for their deadline.",
                readings.lookups_not_admitted,
            ),
            (
                "lookup_cache_hits",
                "Lookups answered from the response cache.",
                readings.lookup_cache_hits,
            ),
        ] {
            // Counters: the encoder adds `_total` to the name.
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

// === the text format and the listener ===

/// The Prometheus text exposition (version 0.0.4) of everything in
/// `registry`. Writing into a String cannot fail, so an error is a collector's.
pub(crate) fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut page = String::with_capacity(8 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut page, registry)?;
    Ok(page)
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(registry);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    match render(&registry) {
        Ok(page) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            page,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "cannot encode the metrics".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_key(index: usize) -> ClientKey {
        ClientKey::parse(&format!("awkey{index:08}")).unwrap()
    }

    #[test]
    fn app_labels_stop_growing_at_the_cap() {
        let labels = AppLabels::default();
        for index in 0..MAX_APP_LABELS + 10 {
            let key = client_key(index);
            let label = labels.label_of(&key);
            if index < MAX_APP_LABELS {
                assert_eq!(label, key.to_string());
            } else {
                assert_eq!(label, "other");
            }
        }
        assert_eq!(labels.label_of(&client_key(0)), client_key(0).to_string());
    }

    #[test]
    fn histograms_are_cumulative_with_the_family_labels_before_le() {
        let mut registry = new_registry();
        let metrics = Metrics::register_in(&mut registry);
        metrics.record_lookup("OK", Duration::from_millis(30));
        metrics.record_lookup("OK", Duration::from_secs(3));
        let page = render(&registry).unwrap();
        let series = "douyin_tokend_lookup_duration_seconds";
        for expected in [
            format!("# TYPE {series} histogram\n"),
            format!("{series}_bucket{{code=\"OK\",le=\"0.025\"}} 0\n"),
            format!("{series}_bucket{{code=\"OK\",le=\"0.05\"}} 1\n"),
            format!("{series}_bucket{{code=\"OK\",le=\"2.5\"}} 1\n"),
            format!("{series}_bucket{{code=\"OK\",le=\"5\"}} 2\n"),
            format!("{series}_bucket{{code=\"OK\",le=\"+Inf\"}} 2\n"),
            format!("{series}_count{{code=\"OK\"}} 2\n"),
        ] {
            assert!(page.contains(&expected), "{expected} in {page}");
        }
    }

    #[test]
    fn counters_keep_the_documented_total_names_and_types() {
        let mut registry = new_registry();
        let metrics = Metrics::register_in(&mut registry);
        let key = client_key(1);
        metrics.record_token_fetch(&key, "forced", Some("timeout"), Duration::from_millis(5));
        metrics.record_upstream_call("client_token", Cow::Borrowed("transport"));
        let page = render(&registry).unwrap();
        let app = key.to_string();
        for expected in [
            "# TYPE douyin_tokend_token_refreshes_total counter\n".to_owned(),
            format!(
                "douyin_tokend_token_refreshes_total{{app=\"{app}\",reason=\"forced\",result=\"failure\"}} 1\n"
            ),
            format!(
                "douyin_tokend_token_fetch_failures_total{{app=\"{app}\",cause=\"timeout\"}} 1\n"
            ),
            "douyin_tokend_upstream_calls_total{endpoint=\"client_token\",code=\"transport\"} 1\n"
                .to_owned(),
            "# TYPE douyin_tokend_build_info gauge\n".to_owned(),
            format!(
                "douyin_tokend_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            ),
            "douyin_tokend_lookup_queue_depth 0\n".to_owned(),
        ] {
            assert!(page.contains(&expected), "{expected} in {page}");
        }
        assert!(!page.contains("# EOF"), "{page}");
    }

    #[test]
    fn scrape_time_readings_become_gauges_and_counters() {
        let mut registry = new_registry();
        let key = client_key(2);
        registry.register_collector(Box::new(ScrapeTimeCollector::new(move || {
            ScrapeTimeReadings {
                app_tokens: vec![AppTokenReading {
                    client_key: key.clone(),
                    state_label: "valid",
                    generation: 3,
                    expires_in_seconds: Some(7000),
                    age_seconds: None,
                    consecutive_failures: 0,
                    douyin_budget_remaining: 499,
                }],
                token_budget_global_remaining: 12,
                lookup_retries: 4,
                ..ScrapeTimeReadings::default()
            }
        })));
        let page = render(&registry).unwrap();
        let app = client_key(2).to_string();
        for expected in [
            format!("douyin_tokend_token_expires_in_seconds{{app=\"{app}\"}} 7000\n"),
            format!("douyin_tokend_token_generation{{app=\"{app}\"}} 3\n"),
            format!("douyin_tokend_token_state{{app=\"{app}\",state=\"valid\"}} 1\n"),
            format!("douyin_tokend_token_budget_remaining{{app=\"{app}\"}} 499\n"),
            "douyin_tokend_token_budget_global_remaining 12\n".to_owned(),
            "# TYPE douyin_tokend_lookup_retries_total counter\n".to_owned(),
            "douyin_tokend_lookup_retries_total 4\n".to_owned(),
        ] {
            assert!(page.contains(&expected), "{expected} in {page}");
        }
        assert!(!page.contains("token_age_seconds{"), "{page}");
    }

    #[test]
    fn two_registries_do_not_share_counts() {
        let mut first_registry = new_registry();
        let mut second_registry = new_registry();
        let first = Metrics::register_in(&mut first_registry);
        let _second = Metrics::register_in(&mut second_registry);
        first.record_lookup("OK", Duration::from_millis(1));
        assert!(
            render(&first_registry)
                .unwrap()
                .contains("lookup_duration_seconds_count{code=\"OK\"} 1")
        );
        assert!(
            !render(&second_registry)
                .unwrap()
                .contains("lookup_duration_seconds_count")
        );
    }
}
