//! Riding out Douyin's bad minutes: retries by class, upstream garbage, slow
//! answers, and one gRPC status (with ErrorInfo) for every kind of failure.

use std::time::Duration;

use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{ACCOUNT_ID, TestApp, after_sale_request, until};

#[tokio::test]
async fn upstream_garbage_is_unavailable_with_a_clear_message_and_the_daemon_keeps_serving() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    // (fault, how often Douyin is asked: retried classes three times, others once, expected message)
    let cases = [
        (Fault::HtmlPage(502), 3, "HTTP 502"),
        (Fault::HttpStatus(500), 3, "HTTP 500"),
        (Fault::DropConnection, 3, "connection broke"),
        (Fault::HtmlPage(200), 1, "an HTML page"),
        (Fault::TruncatedJson, 1, "not the expected JSON"),
    ];
    for (fault, calls, expected) in cases {
        app.advance(Duration::from_secs(1));
        app.sandbox
            .state()
            .push_lookup_faults(std::iter::repeat_n(fault.clone(), calls));
        let before = app.sandbox.state().stats().lookups;
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}");
        assert!(
            status.message().contains(expected),
            "{fault:?}: {}",
            status.message()
        );
        assert!(
            status.get_details_error_info().is_some(),
            "{fault:?} carries ErrorInfo"
        );
        assert_eq!(
            app.sandbox.state().stats().lookups - before,
            calls as u64,
            "{fault:?}"
        );
    }
    app.advance(Duration::from_secs(1));
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    app.stop().await;
}

/// How Douyin answers with a code, the code, the caller's status, upstream calls made.
type DouyinAnswerRow = (fn(i64) -> Fault, i64, Code, usize);

#[tokio::test]
async fn every_douyin_code_maps_to_its_grpc_status_with_error_info_and_retries_only_transient_ones()
{
    let app = TestApp::spawn().await;
    app.register_default().await;
    // (the answer Douyin gives, its code, gRPC status, upstream calls made). The
    // contract, written out: the code table must agree with it, not the reverse.
    let goodlife = Fault::ErrorCode;
    let in_data_only = Fault::CodeInDataOnly;
    let gateway = Fault::GatewayEnvelope;
    let table: [DouyinAnswerRow; 24] = [
        (goodlife, 2119001, Code::InvalidArgument, 1),
        (goodlife, 2100005, Code::InvalidArgument, 1),
        (goodlife, 4000001, Code::InvalidArgument, 1),
        (in_data_only, 4000002, Code::InvalidArgument, 1),
        (goodlife, 2119005, Code::PermissionDenied, 1),
        (in_data_only, 2190004, Code::PermissionDenied, 1),
        (goodlife, 2119008, Code::PermissionDenied, 1),
        (goodlife, 2119003, Code::ResourceExhausted, 3),
        (goodlife, 2119002, Code::Unavailable, 3),
        (in_data_only, 2100004, Code::Unavailable, 3),
        (goodlife, 2100001, Code::Unavailable, 3),
        (goodlife, 3000001, Code::Unavailable, 3),
        (goodlife, 5000001, Code::Unavailable, 3),
        (goodlife, 2119010, Code::Unimplemented, 1),
        (goodlife, 2191005, Code::FailedPrecondition, 1),
        (goodlife, 4000003, Code::FailedPrecondition, 1),
        (gateway, 28001005, Code::Unavailable, 3),
        (gateway, 28001006, Code::Unavailable, 3),
        (gateway, 28001007, Code::InvalidArgument, 1),
        (gateway, 28001014, Code::PermissionDenied, 1),
        (gateway, 28001016, Code::PermissionDenied, 1),
        (gateway, 28001018, Code::PermissionDenied, 1),
        (gateway, 28003017, Code::ResourceExhausted, 3),
        (gateway, 28003018, Code::ResourceExhausted, 3),
    ];
    for known in douyin_tokend::douyin::codes::TABLE {
        let rejection = known.class == douyin_tokend::douyin::CodeClass::TokenRejected;
        let token_endpoint =
            known.envelope == douyin_tokend::douyin::codes::Envelope::TokenEndpoint;
        assert!(
            rejection || token_endpoint || table.iter().any(|row| row.1 == known.code),
            "code {} of the code table has no row here",
            known.code
        );
    }
    for (answer, douyin_code, grpc_code, calls) in table {
        app.advance(Duration::from_secs(1));
        let fault = answer(douyin_code);
        app.sandbox
            .state()
            .push_lookup_faults(std::iter::repeat_n(fault.clone(), calls));
        let before = app.sandbox.state().stats().lookups;
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        assert_eq!(status.code(), grpc_code, "{fault:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason, info.domain.as_str()),
            (douyin_code.to_string(), "open.douyin.com")
        );
        if !matches!(fault, Fault::CodeInDataOnly(_)) {
            assert!(info.metadata["logid"].starts_with("SANDBOX"), "{fault:?}");
        }
        assert!(status.message().contains(&douyin_code.to_string()));
        assert_eq!(
            app.sandbox.state().stats().lookups - before,
            calls as u64,
            "{fault:?}"
        );
        if matches!(grpc_code, Code::Unavailable | Code::ResourceExhausted) {
            assert!(
                status.get_details_retry_info().is_some(),
                "{fault:?} carries RetryInfo"
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn answers_without_the_success_shape_are_failures_never_empty_answers() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    for body in [
        "{}",
        r#"{"extra":{"logid":"L","now":1,"error_code":0}}"#,
        r#"{"extra":{"logid":"L"},"data":null}"#,
        r#"{"data":[]}"#,
        r#"{"err_no":0,"err_msg":"","log_id":"G"}"#,
        "[]",
        "7",
        r#""ok""#,
    ] {
        app.advance(Duration::from_secs(1));
        app.sandbox
            .state()
            .push_lookup_faults([Fault::Body(body.to_owned())]);
        let before = app.sandbox.state().stats().lookups;
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{body}");
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "UPSTREAM_MALFORMED_BODY",
            "{body}"
        );
        assert_eq!(app.sandbox.state().stats().lookups - before, 1, "{body}");
    }
    // A success whose extra carries no error_code is still a success.
    app.advance(Duration::from_secs(1));
    app.sandbox.state().push_lookup_faults([Fault::Body(
        r#"{"extra":{"logid":"L2","now":5},"data":{"after_sale_order_list":[{"order_id":"o-9"}]}}"#
            .to_owned(),
    )]);
    let answer = app.lookup(ACCOUNT_ID, "o-9").await.unwrap();
    assert_eq!(
        answer.data.unwrap().after_sale_order_list[0].order_id,
        "o-9"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_token_rejection_in_the_newer_gateways_envelope_refreshes_and_retries_once() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    for code in [28001003, 28001008] {
        app.advance(Duration::from_secs(1));
        let before = app.sandbox.state().stats();
        app.sandbox
            .state()
            .push_lookup_faults([Fault::GatewayEnvelope(code)]);
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
        let after = app.sandbox.state().stats();
        assert_eq!(after.lookups - before.lookups, 2, "{code}: one retry");
        assert_eq!(
            after.token_calls - before.token_calls,
            1,
            "{code}: one refresh"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn transient_failures_followed_by_success_reach_the_caller_as_success() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.sandbox
        .state()
        .push_lookup_faults([Fault::ErrorCode(2119002), Fault::HtmlPage(502)]);

    let response = app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();

    assert_eq!(response.data.unwrap().after_sale_order_list.len(), 1);
    assert_eq!(app.sandbox.state().stats().lookups, 3);
    assert_eq!(app.lookup_counter(|counters| &counters.retries), 2);
    app.stop().await;
}

#[tokio::test]
async fn with_thirty_percent_busy_answers_every_caller_still_succeeds() {
    let app = TestApp::spawn_with(|_, sandbox| {
        sandbox.busy_fraction = 0.3;
        sandbox.lookup_qps = 0;
    })
    .await;
    app.register_default().await;

    for index in 0..60 {
        app.lookup(ACCOUNT_ID, &format!("order-{index}"))
            .await
            .unwrap();
    }

    let stats = app.sandbox.state().stats();
    let busy = stats.lookups_answered_with(2119002);
    assert_eq!(stats.lookups_answered_with(0), 60);
    assert!(
        busy >= 25,
        "the sandbox answered busy {busy} times out of {}",
        stats.lookups
    );
    assert_eq!(app.lookup_counter(|counters| &counters.retries), busy);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_slower_than_the_deadline_is_deadline_exceeded_and_the_daemon_keeps_serving() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    app.sandbox
        .state()
        .push_lookup_faults([Fault::Delay(Duration::from_millis(700))]);

    let status = app
        .lookup_within(ACCOUNT_ID, "slow-order", Duration::from_millis(300))
        .await
        .unwrap_err();

    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    app.advance(Duration::from_secs(1));
    app.lookup(ACCOUNT_ID, "next-order").await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_concurrent_lookups_make_one_upstream_call() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    // The first call is held at the sandbox until all 49 others have joined it.
    let gate = app.sandbox.state().gate_lookups();

    let lookups: Vec<_> = (0..50)
        .map(|_| {
            let mut client = app.after_sale_client();
            tokio::spawn(async move {
                client
                    .get_after_sale_order_detail(after_sale_request(
                        ACCOUNT_ID,
                        DOCUMENTED_ORDER_ID,
                    ))
                    .await
            })
        })
        .collect();
    gate.arrived(1).await;
    until("49 callers joined the flight in progress", || {
        app.lookup_counter(|counters| &counters.coalesced) == 49
    })
    .await;
    gate.release();
    for lookup in lookups {
        let response = lookup.await.unwrap().unwrap().into_inner();
        assert_eq!(
            response.data.unwrap().after_sale_order_list[0].order_id,
            DOCUMENTED_ORDER_ID
        );
    }

    assert_eq!(app.sandbox.state().stats().lookups, 1);
    assert_eq!(app.lookup_counter(|counters| &counters.coalesced), 49);
    app.stop().await;
}

#[tokio::test]
async fn the_optional_response_cache_serves_repeats_from_memory() {
    let app =
        TestApp::spawn_with(|config, _| config.lookup.cache_ttl = Duration::from_secs(30)).await;
    app.register_default().await;

    for _ in 0..5 {
        app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    }

    assert_eq!(app.sandbox.state().stats().lookups, 1);
    assert_eq!(app.lookup_counter(|counters| &counters.cache_hits), 4);
    app.stop().await;
}

#[tokio::test]
async fn an_app_unknown_to_douyin_is_a_failed_precondition() {
    let app = TestApp::spawn().await;
    app.register("awunknowntodouyin", "whatever", "7300000000000000003")
        .await;

    let status = app
        .lookup("7300000000000000003", DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("10003"), "{}", status.message());
    assert_eq!(status.get_details_error_info().unwrap().reason, "10003");
    app.stop().await;
}
