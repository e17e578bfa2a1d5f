//! Traffic discipline: the daemon paces each app below Douyin's 10 QPS, fails
//! fast what cannot be served in time, and keeps the token endpoint within
//! its budget.

use std::time::Duration;

use douyin_tokend::domain::DouyinApi;
use douyin_tokend::sandbox::Fault;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{ACCOUNT_ID, OTHER_ACCOUNT_ID, TestApp, after_sale_request};

/// On paused tokio time: the daemon's pacing and the sandbox's one-second
/// window read the same simulated clock, about 2.5 simulated seconds of load
/// that take no real time. Time is paused only once both apps hold tokens,
/// because SQLite works on threads of its own, and a paused clock would jump
/// ahead while the runtime waits for them.
#[tokio::test]
async fn three_times_the_allowed_rate_never_trips_douyins_limit_and_the_excess_fails_fast() {
    let app = TestApp::spawn_on_tokio_time(|config, _| {
        config
            .lookup
            .set_rate_per_second(DouyinApi::AfterSaleOrderDetail, 10)
    })
    .await;
    app.register_default().await;
    app.register_other_app().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.access_token_for(OTHER_ACCOUNT_ID).await.unwrap();
    tokio::time::pause();

    let mut pace = tokio::time::interval(Duration::from_millis(33));
    let mut busy_app = Vec::new();
    let mut quiet_app = Vec::new();
    for index in 0..75 {
        pace.tick().await;
        let mut client = app.after_sale_client();
        let lookup = |account_id: &str, order_id: String| {
            let mut request = tonic::Request::new(after_sale_request(account_id, &order_id));
            request.set_timeout(Duration::from_millis(600));
            request
        };
        let request = lookup(ACCOUNT_ID, format!("busy-{index}"));
        busy_app.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = client.get_after_sale_order_detail(request).await;
            (result, started.elapsed())
        }));
        if index % 6 == 0 {
            let mut client = app.after_sale_client();
            let request = lookup(OTHER_ACCOUNT_ID, format!("quiet-{index}"));
            quiet_app.push(tokio::spawn(async move {
                client.get_after_sale_order_detail(request).await
            }));
        }
    }

    let mut served = 0;
    let mut refused = 0;
    for outcome in busy_app {
        let (result, elapsed) = outcome.await.unwrap();
        match result {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                assert!(status.get_details_retry_info().is_some());
                assert!(
                    elapsed < Duration::from_millis(150),
                    "refused only after {elapsed:?}"
                );
                refused += 1;
            }
        }
    }
    for outcome in quiet_app {
        outcome.await.unwrap().expect("the other app is unaffected");
    }
    tokio::time::resume();
    let stats = app.sandbox.state().stats();
    assert_eq!(
        stats.lookups_answered_with(2119003),
        0,
        "Douyin never saw too many requests"
    );
    // About 2.5 s at one turn per 110 ms, plus the queue's head start.
    assert!((18..=30).contains(&served), "served {served}");
    assert!(refused >= 40, "refused {refused}");
    app.stop().await;
}

#[tokio::test]
async fn the_token_budget_holds_when_many_apps_come_due_at_once() {
    let app = TestApp::spawn_with(|config, _| {
        config.refresh.budget = 20;
        config.refresh.budget_reserve = 5;
    })
    .await;
    for index in 0..30 {
        let client_key = format!("awbulkapp{index:04}");
        let account_id = format!("7400000000000000{index:03}");
        app.sandbox.state().add_app(&client_key, "bulk-secret");
        app.sandbox
            .state()
            .authorize_merchant(&account_id, &client_key);
        app.register(&client_key, "bulk-secret", &account_id).await;
    }

    let first = app.app.tokens.sweep().await;
    assert_eq!((first.due, first.refreshed, first.deferred), (30, 15, 15));
    assert_eq!(app.sandbox.state().stats().token_calls, 15);

    // A caller waiting for an app without a token may use the reserve.
    let statuses = app.token_status().await;
    let waiting = statuses
        .iter()
        .position(|status| status.state == "missing")
        .unwrap();
    let account_id = format!(
        "7400000000000000{:03}",
        statuses[waiting].client_key[9..].parse::<u32>().unwrap()
    );
    app.lookup(&account_id, "order-1").await.unwrap();
    assert_eq!(app.sandbox.state().stats().token_calls, 16);

    app.advance(Duration::from_secs(60));
    let within_window = app.app.tokens.sweep().await;
    assert_eq!((within_window.refreshed, within_window.deferred), (0, 14));
    app.advance(Duration::from_secs(240));
    let next_window = app.app.tokens.sweep().await;
    assert_eq!((next_window.refreshed, next_window.deferred), (14, 0));
    assert_eq!(app.sandbox.state().stats().token_calls, 30);
    assert_eq!(app.sandbox.state().stats().token_refusals.get(&10020), None);
    app.stop().await;
}

#[tokio::test]
async fn douyin_answering_10020_pauses_scheduled_refreshes_but_keeps_the_token() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let original = app.access_token_for(ACCOUNT_ID).await.unwrap();
    app.advance(Duration::from_secs(7200 - 15 * 60));
    app.sandbox
        .state()
        .push_token_faults([Fault::ErrorCode(10020)]);

    assert_eq!(app.app.tokens.sweep().await.failed, 1);
    app.advance(Duration::from_secs(10));
    let paused = app.app.tokens.sweep().await;
    assert_eq!((paused.due, paused.deferred), (1, 1));
    assert_eq!(app.sandbox.state().stats().token_calls, 2);
    assert_eq!(
        app.access_token_for(ACCOUNT_ID).await.unwrap().access_token,
        original.access_token
    );

    app.advance(Duration::from_secs(60));
    assert_eq!(app.app.tokens.sweep().await.refreshed, 1);
    assert_eq!(app.sandbox.state().stats().token_calls, 3);
    app.stop().await;
}

/// Real time, like the test above: the sandbox's one-second window and the
/// daemon's pacing both run on the system clock. About 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_holds_while_a_cold_apps_token_is_slow_to_arrive() {
    let app = TestApp::spawn_real_time(|config, sandbox| {
        config
            .lookup
            .set_rate_per_second(DouyinApi::AfterSaleOrderDetail, 20);
        config.lookup.default_deadline = Duration::from_secs(8);
        sandbox.lookup_qps = 20;
    })
    .await;
    app.register_default().await;
    app.sandbox
        .state()
        .push_token_faults([Fault::Delay(Duration::from_millis(800))]);

    for result in app.concurrent_lookups(40, "cold").await {
        result.unwrap();
    }
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.token_calls, 1);
    assert_eq!(stats.lookup_window_overruns, 0);
    assert_eq!(stats.lookups_answered_with(2119003), 0);
    assert_eq!(stats.lookups, 40);
    app.stop().await;
}

#[tokio::test]
async fn a_caller_joining_a_lookup_started_under_a_shorter_deadline_gets_its_own_outcome() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, "warm-up").await.unwrap();
    // Douyin answers the first call after 700 ms: too late for the impatient
    // caller's 400 ms, in time for the patient one's 5 s.
    app.sandbox
        .state()
        .push_lookup_faults([Fault::Delay(Duration::from_millis(700))]);
    let ask = |timeout: Duration| {
        let mut client = app.after_sale_client();
        let mut request = tonic::Request::new(after_sale_request(ACCOUNT_ID, "shared-order"));
        request.set_timeout(timeout);
        tokio::spawn(async move { client.get_after_sale_order_detail(request).await })
    };
    let impatient = ask(Duration::from_millis(400));
    let patient = ask(Duration::from_secs(5));

    let impatient = impatient.await.unwrap().unwrap_err();
    assert_eq!(
        impatient.code(),
        Code::DeadlineExceeded,
        "{}",
        impatient.message()
    );
    patient.await.unwrap().unwrap();
    assert_eq!(
        app.lookup_counter(|counters| &counters.coalesced),
        1,
        "the two callers shared one lookup"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_deadline_shorter_than_the_upstream_reserve_is_deadline_exceeded_naming_the_minimum() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    let status = app
        .lookup_within(ACCOUNT_ID, "too-quick", Duration::from_millis(150))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(status.message().contains("200 ms"), "{}", status.message());
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "DEADLINE_TOO_SHORT");
    assert_eq!(info.metadata["minimum_deadline_ms"], "200");
    assert!(status.get_details_retry_info().is_none());
    assert_eq!(app.sandbox.state().stats().lookups, 0);
    app.stop().await;
}
