//! Token lifecycle through the real path: restarts, accelerated lifetimes,
//! invalidation behind the daemon's back, bad secrets and failing fetches.

use std::time::Duration;

use douyin_tokend::config::TokenEndpoint;
use douyin_tokend::proto::tokend::v1::GetAccessTokenRequest;
use douyin_tokend::proto::tokend::v1::get_access_token_request::Selector;
use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use douyin_tokend::schedule::CronSchedule;
use tonic::Code;

use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET, TestApp, after_sale_request};

#[tokio::test]
async fn a_restart_with_a_valid_stored_token_fetches_nothing() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let before = app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.advance(Duration::from_secs(600));

    let app = app.restart().await;
    app.app.tokens.sweep().await;
    let after = app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();

    assert_eq!(app.sandbox.state().stats().token_calls, 1);
    assert_eq!(after.access_token, before.access_token);
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.expires_at_unix_ms, before.expires_at_unix_ms);
    app.stop().await;
}

#[tokio::test]
async fn a_token_fetch_still_running_at_shutdown_is_stored_before_the_database_closes() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let gate = app.sandbox.state().gate_token_endpoint();
    // A caller starts the fetch, then goes away: the fetch runs on without it.
    let mut client = app.token_client();
    let caller = tokio::spawn(async move {
        client
            .get_access_token(GetAccessTokenRequest {
                selector: Some(Selector::AccountId(ACCOUNT_ID.to_owned())),
            })
            .await
    });
    gate.arrived(1).await;
    caller.abort();

    let stopped = app.stop_daemon();
    tokio::pin!(stopped);
    // Shutdown waits for the fetch instead of closing the database under it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut stopped)
            .await
            .is_err(),
        "the daemon stopped while a token fetch was still running"
    );
    gate.release();
    let app = stopped
        .await
        .start()
        .await
        .map_err(|(error, _)| error)
        .unwrap();
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(token.generation, 1);
    assert_eq!(
        app.sandbox.state().stats().token_calls,
        1,
        "the token fetched during shutdown was stored and reused"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_restart_after_expiry_fetches_a_new_token_instead_of_serving_the_old_one() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let before = app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.advance(Duration::from_secs(7200));

    let app = app.restart().await;
    let after = app.access_token_for(ACCOUNT_ID).await.unwrap();

    assert_ne!(after.access_token, before.access_token);
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(app.sandbox.state().stats().token_calls, 2);
    app.stop().await;
}

#[tokio::test]
async fn over_many_accelerated_lifetimes_callers_see_no_token_error_and_each_window_costs_one_fetch()
 {
    let lifetime = Duration::from_secs(20);
    let app = TestApp::spawn_with(|config, sandbox| {
        sandbox.token_lifetime = lifetime;
        sandbox.grace = Duration::from_secs(5);
        config.refresh.window_start = Duration::from_secs(8);
        config.refresh.window_end = Duration::from_secs(6);
        config.refresh.min_interval = Duration::from_secs(5);
    })
    .await;
    app.register_default().await;

    let lifetimes = 30;
    let mut generations_seen = Vec::new();
    for _second in 0..(lifetimes * 20) {
        app.app.tokens.sweep().await;
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
        generations_seen.push(app.access_token_for(ACCOUNT_ID).await.unwrap().generation);
        app.advance(Duration::from_secs(1));
    }

    let stats = app.sandbox.state().stats();
    assert_eq!(
        stats.token_rejections(),
        0,
        "the sandbox never saw a dead token"
    );
    // Refreshing 6–8 s before a 20 s expiry means one fetch every 12–14 s.
    let fetched = stats.tokens_issued_for(CLIENT_KEY);
    let seconds = (lifetimes * 20) as u64;
    assert!(
        fetched >= seconds / 14 && fetched <= seconds / 12 + 1,
        "{fetched} fetches in {seconds} s"
    );
    assert_eq!(*generations_seen.last().unwrap() as u64, fetched);
    app.stop().await;
}

#[tokio::test]
async fn with_stable_tokens_each_lifetime_costs_one_fetch_at_expiry_and_callers_see_no_gap() {
    let lifetime = Duration::from_secs(20);
    let app = TestApp::spawn_with(|config, sandbox| {
        config.douyin.token_endpoint = TokenEndpoint::StableClientToken;
        sandbox.token_lifetime = lifetime;
        config.refresh.window_start = Duration::from_secs(8);
        config.refresh.window_end = Duration::from_secs(6);
        config.refresh.min_interval = Duration::from_secs(5);
    })
    .await;
    app.register_default().await;

    let first = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(first.generation, 1);
    // Inside what would be client_token's refresh window, and in the last
    // second: the sweep fetches nothing, callers keep the same token.
    for second in 1..20 {
        app.advance(Duration::from_secs(1));
        assert_eq!(app.app.tokens.sweep().await.due, 0, "second {second}");
        let held = app.access_token_for(ACCOUNT_ID).await.unwrap();
        assert_eq!(held.access_token, first.access_token, "second {second}");
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    }
    assert_eq!(app.sandbox.state().stats().token_calls, 1);
    // A forced fetch before expiry gets the same token back: same generation.
    let forced = app.force_refresh().await.unwrap();
    assert_eq!(forced.generation, 1);
    assert_eq!(app.sandbox.state().stats().tokens_issued_for(CLIENT_KEY), 1);

    // At expiry the first caller's one fetch brings the successor.
    app.advance(Duration::from_secs(1));
    let calls_before = app.sandbox.state().stats().token_calls;
    let second = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(second.generation, 2);
    assert_eq!(app.sandbox.state().stats().token_calls, calls_before + 1);

    // Many lifetimes on: one fetch per lifetime, never a rejected token.
    for _second in 0..(10 * 20) {
        app.app.tokens.sweep().await;
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
        app.advance(Duration::from_secs(1));
    }
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.token_rejections(), 0);
    // Tokens at 0 s and 20 s, then at 40, 60, …, 200 s within the 200 s run.
    assert_eq!(stats.tokens_issued_for(CLIENT_KEY), 11);
    app.stop().await;
}

#[tokio::test]
async fn a_token_killed_behind_the_daemons_back_is_replaced_once_and_the_caller_still_succeeds() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let first = app.access_token_for(ACCOUNT_ID).await.unwrap();
    // Someone else fetches twice with our key: our token is now third-newest.
    app.sandbox
        .state()
        .issue_token_out_of_band(CLIENT_KEY)
        .unwrap();
    app.sandbox
        .state()
        .issue_token_out_of_band(CLIENT_KEY)
        .unwrap();

    let response = app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();

    assert_eq!(response.data.unwrap().after_sale_order_list.len(), 1);
    let stats = app.sandbox.state().stats();
    assert_eq!(
        stats.token_rejections(),
        1,
        "one rejected call, then success"
    );
    assert_eq!(stats.token_calls, 2, "exactly one refresh");
    let now = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(now.generation, first.generation + 1);
    let status = app.token_status().await;
    assert_eq!(status[0].state, "valid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_with_the_same_dead_token_cause_one_refresh() {
    let app = TestApp::spawn_with(|_, sandbox| sandbox.lookup_qps = 0).await;
    app.register_default().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.sandbox
        .state()
        .issue_token_out_of_band(CLIENT_KEY)
        .unwrap();
    app.sandbox
        .state()
        .issue_token_out_of_band(CLIENT_KEY)
        .unwrap();

    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let client = app.after_sale_client();
            tokio::spawn(async move {
                let mut client = client;
                client
                    .get_after_sale_order_detail(after_sale_request(
                        ACCOUNT_ID,
                        DOCUMENTED_ORDER_ID,
                    ))
                    .await
            })
        })
        .collect();
    for lookup in lookups {
        lookup.await.unwrap().unwrap();
    }

    assert_eq!(
        app.sandbox.state().stats().token_calls,
        2,
        "one initial fetch, one refresh"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_secret_is_a_failed_precondition_and_the_token_endpoint_is_not_hammered() {
    let app = TestApp::spawn().await;
    app.register(CLIENT_KEY, "not-the-secret", ACCOUNT_ID).await;

    for _ in 0..25 {
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("10013"), "{}", status.message());
        assert!(
            status.message().contains("client_secret"),
            "{}",
            status.message()
        );
        app.app.tokens.sweep().await;
        app.advance(Duration::from_secs(10));
    }

    assert_eq!(
        app.sandbox.state().stats().token_calls,
        1,
        "one try per cooldown"
    );
    let status = app.token_status().await;
    assert_eq!(status[0].state, "failed");
    assert!(status[0].last_error.contains("10013"));

    // Fixing the secret retries at once.
    app.register(CLIENT_KEY, CLIENT_SECRET, ACCOUNT_ID).await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    assert_eq!(app.token_status().await[0].state, "valid");
    app.stop().await;
}

#[tokio::test]
async fn a_failing_refresh_keeps_serving_the_valid_token_and_backs_off() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let original = app.access_token_for(ACCOUNT_ID).await.unwrap();
    // Into the refresh window (25–15 min before expiry).
    app.advance(Duration::from_secs(7200 - 15 * 60));
    app.sandbox.state().push_token_faults([
        Fault::HttpStatus(500),
        Fault::HtmlPage(502),
        Fault::TruncatedJson,
    ]);

    let first = app.app.tokens.sweep().await;
    assert_eq!((first.due, first.failed), (1, 1));
    let during = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(
        during.access_token, original.access_token,
        "a failed refresh never displaces a valid token"
    );
    let status = &app.token_status().await[0];
    assert_eq!(
        (status.state.as_str(), status.consecutive_failures),
        ("valid", 1)
    );
    assert!(
        status.last_error.contains("HTTP 500"),
        "{}",
        status.last_error
    );

    // Backing off: an immediate sweep does not call again.
    assert_eq!(app.app.tokens.sweep().await.due, 0);
    assert_eq!(app.sandbox.state().stats().token_calls, 2);
    for _ in 0..3 {
        app.advance(Duration::from_secs(10));
        app.app.tokens.sweep().await;
    }
    let renewed = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_ne!(renewed.access_token, original.access_token);
    assert_eq!(renewed.generation, original.generation + 1);
    assert_eq!(
        app.sandbox.state().stats().token_calls,
        5,
        "three failures, then success"
    );
    assert!(app.token_status().await[0].last_error.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_sweep_fetches_for_apps_without_a_token_before_anyone_asks() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    assert_eq!(app.token_status().await[0].state, "missing");

    let report = app.app.tokens.sweep().await;

    assert_eq!((report.apps, report.due, report.refreshed), (1, 1, 1));
    assert_eq!(app.token_status().await[0].state, "valid");
    assert_eq!(
        app.app.tokens.sweep().await.due,
        0,
        "nothing due right after"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_schedule_triggers_the_sweep() {
    let app = TestApp::spawn_with(|config, _| {
        config.refresh.sweep = CronSchedule::parse("* * * * * *").ok()
    })
    .await;
    app.register_default().await;
    let mut heartbeat = app.app.tokens.sweep_heartbeat();
    let start = *heartbeat.borrow_and_update();

    // Waits for the scheduler's event, bounded so a broken schedule fails.
    tokio::time::timeout(
        Duration::from_secs(10),
        heartbeat.wait_for(|count| *count >= start + 2),
    )
    .await
    .expect("the scheduler fired twice within 10 s")
    .unwrap();

    assert_eq!(app.token_status().await[0].state, "valid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_does_not_cancel_the_token_fetch() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let gate = app.sandbox.state().gate_token_endpoint();
    let mut client = app.token_client();
    let impatient = tokio::spawn(async move {
        client
            .get_access_token(GetAccessTokenRequest {
                selector: Some(Selector::AccountId(ACCOUNT_ID.to_owned())),
            })
            .await
    });
    // The fetch is at Douyin; the caller hangs up (its stream is reset).
    gate.arrived(1).await;
    impatient.abort();
    gate.release();

    // The fetch went on: the next caller joins it (or finds its result) instead of fetching again.
    let lease = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(lease.generation, 1);
    assert_eq!(app.sandbox.state().stats().token_calls, 1);
    app.stop().await;
}
