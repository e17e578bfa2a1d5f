//! Prometheus metrics after real traffic (gRPC in, sandbox Douyin out, on the
//! manual clock): every family is there, and the values match what the
//! traffic did. Each daemon has its own metrics registry, so the other tests
//! running in this binary at the same time add nothing to these counters.

use std::collections::BTreeMap;
use std::time::Duration;

use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{self, ACCOUNT_ID, CLIENT_KEY, TestApp};

/// GET /metrics over plain HTTP/1.1; returns the body.
pub(crate) async fn scrape(app: &TestApp) -> String {
    scrape_address(app.metrics_address.expect("metrics are on")).await
}

/// GET /metrics from any daemon (in-process or a process of its own).
pub(crate) async fn scrape_address(address: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// Every sample on the page, by its full series name with labels.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_after_real_traffic_hold_the_expected_series_and_values() {
    let app = TestApp::spawn_with(|config, _| {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let app_label = format!("app=\"{CLIENT_KEY}\"");
    app.register_default().await;

    // Start-up: the first sweep fetches the token nobody asked for yet.
    app.app.tokens.sweep().await;
    // Three good lookups.
    for _ in 0..3 {
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    }
    // Another service fetched twice behind the daemon's back: the next lookup
    // is rejected, refreshed reactively and retried.
    app.sandbox.state().issue_token_out_of_band(CLIENT_KEY);
    app.sandbox.state().issue_token_out_of_band(CLIENT_KEY);
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    // Douyin refuses: a known code and one the daemon does not know.
    app.sandbox
        .state()
        .push_lookup_faults([Fault::ErrorCode(2119005), Fault::ErrorCode(4000003)]);
    for _ in 0..2 {
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
    }
    // Three operators force a refresh at once while the token endpoint is
    // slow: one fetch, two callers coalesced into it.
    app.sandbox
        .state()
        .push_token_faults([Fault::Delay(Duration::from_millis(500))]);
    let (first, second, third) = tokio::join!(
        app.force_refresh(),
        app.force_refresh(),
        app.force_refresh()
    );
    first.and(second).and(third).unwrap();
    // A forced refresh that fails with HTTP 500.
    app.sandbox
        .state()
        .push_token_faults([Fault::HttpStatus(500)]);
    app.force_refresh().await.unwrap_err();
    // Well inside the refresh window of the current token, a scheduled sweep.
    app.app.tokens.sweep().await;
    app.advance(Duration::from_secs(106 * 60));
    let report = app.app.tokens.sweep().await;
    assert_eq!(report.refreshed, 1);
    app.advance(Duration::from_secs(90));

    let page = scrape(&app).await;
    let samples = samples(&page);
    assert!(page.contains(&app_label), "apps are labelled by client key");
    for family in [
        "douyin_tokend_token_expires_in_seconds gauge",
        "douyin_tokend_token_age_seconds gauge",
        "douyin_tokend_token_generation gauge",
        "douyin_tokend_token_budget_remaining gauge",
        "douyin_tokend_token_refreshes_total counter",
        "douyin_tokend_token_fetch_failures_total counter",
        "douyin_tokend_token_fetch_duration_seconds histogram",
        "douyin_tokend_token_requests_coalesced_total counter",
        "douyin_tokend_upstream_calls_total counter",
        "douyin_tokend_lookup_duration_seconds histogram",
        "douyin_tokend_lookup_queue_depth gauge",
    ] {
        assert!(page.contains(&format!("# TYPE {family}\n")), "{family}");
    }

    // Token gauges agree with what AdminService reports.
    let status = &app.token_status().await[0];
    let now_ms = helpers::START_UNIX_MS + (106 * 60 + 90) * 1000;
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_expires_in_seconds{{{app_label}}}")
        ),
        ((status.expires_at_unix_ms - now_ms) / 1000) as f64
    );
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_age_seconds{{{app_label}}}")
        ),
        90.0
    );
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_generation{{{app_label}}}")
        ),
        status.generation as f64
    );
    assert_eq!(status.generation, 4, "startup, reactive, forced, scheduled");
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_state{{{app_label},state=\"valid\"}}")
        ),
        1.0
    );
    // Only the scheduled fetch lies within the last five minutes.
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_budget_remaining{{{app_label}}}")
        ),
        499.0
    );
    assert_eq!(
        value(&samples, "douyin_tokend_token_budget_global_remaining"),
        499.0
    );

    // Refreshes by reason and result, failures by cause, coalesced callers.
    for (reason, result, count) in [
        ("startup", "success", 1.0),
        ("reactive", "success", 1.0),
        ("forced", "success", 1.0),
        ("forced", "failure", 1.0),
        ("scheduled", "success", 1.0),
    ] {
        assert_eq!(
            value(
                &samples,
                &format!(
                    "douyin_tokend_token_refreshes_total{{{app_label},reason=\"{reason}\",result=\"{result}\"}}"
                )
            ),
            count,
            "{reason} {result}"
        );
    }
    assert_eq!(
        value(
            &samples,
            &format!(
                "douyin_tokend_token_fetch_failures_total{{{app_label},cause=\"http_status\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            &format!("douyin_tokend_token_requests_coalesced_total{{{app_label}}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_token_fetch_duration_seconds_count{result=\"success\"}"
        ),
        4.0
    );

    // Upstream calls by Douyin code agree with what the sandbox answered.
    let stats = app.sandbox.state().stats();
    let rejected = stats.token_rejections();
    assert_eq!(rejected, 1);
    for (code, count) in &stats.lookup_codes {
        let label = douyin_tokend::douyin::codes::metric_label(*code);
        assert_eq!(
            value(
                &samples,
                &format!(
                    "douyin_tokend_upstream_calls_total{{endpoint=\"after_sale\",code=\"{label}\"}}"
                )
            ),
            *count as f64,
            "code {code}"
        );
    }
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_upstream_calls_total{endpoint=\"after_sale\",code=\"0\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_upstream_calls_total{endpoint=\"after_sale\",code=\"other\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_upstream_calls_total{endpoint=\"client_token\",code=\"0\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_upstream_calls_total{endpoint=\"client_token\",code=\"transport\"}"
        ),
        1.0
    );

    // Lookup latency by gRPC code; nothing is queued any more.
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_lookup_duration_seconds_count{code=\"OK\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_lookup_duration_seconds_bucket{code=\"OK\",le=\"+Inf\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_lookup_duration_seconds_count{code=\"PERMISSION_DENIED\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_lookup_duration_seconds_count{code=\"FAILED_PRECONDITION\"}"
        ),
        1.0
    );
    assert_eq!(value(&samples, "douyin_tokend_lookup_queue_depth"), 0.0);
    app.stop().await;
}

#[tokio::test]
async fn calls_refused_for_their_api_key_are_counted_by_reason() {
    let app = TestApp::spawn_with(|config, _| {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let unknown_key = "dtk_not_a_key_of_this_daemon_0000000000000000000000000";
    for _ in 0..2 {
        let refused = app
            .token_client_with(unknown_key)
            .get_access_token(douyin_tokend::proto::tokend::v1::GetAccessTokenRequest {
                selector: None,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    let no_key = douyin_tokend::proto::tokend::v1::token_service_client::TokenServiceClient::new(
        app.channel(),
    )
    .get_access_token(douyin_tokend::proto::tokend::v1::GetAccessTokenRequest { selector: None })
    .await
    .unwrap_err();
    assert_eq!(no_key.code(), tonic::Code::Unauthenticated);

    let page = scrape(&app).await;
    let samples = samples(&page);
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_unauthenticated_calls_total{reason=\"unknown_key\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "douyin_tokend_unauthenticated_calls_total{reason=\"missing_key\"}"
        ),
        1.0
    );
    assert!(!page.contains(unknown_key));
    app.stop().await;
}
