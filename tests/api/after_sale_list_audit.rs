//! The refund list (paging, validation, the per-developer rate group beside
//! the detail's per-app one) and the refund decision (exactly once for
//! callers: replayed repeats, refused contradictions, never resent once it
//! may have reached Douyin), through gRPC, the sandbox and SQLite.

use std::collections::HashSet;
use std::time::Duration;

use douyin_tokend::domain::DouyinApi;
use douyin_tokend::proto::douyin::goodlife::v1::{
    AuditAfterSaleOrderRequest, AuditAfterSaleOrderResponse, ListAfterSaleOrdersRequest,
    ListAfterSaleOrdersResponse,
};
use douyin_tokend::sandbox::Fault;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, OTHER_ACCOUNT_ID, TestApp, after_sale_request};

/// Where the seeded refunds' creation times start (Unix seconds).
const SEEDED_FROM_S: i64 = 1_767_000_000;

fn list_request(account_id: &str, page_size: i32, cursor: &str) -> ListAfterSaleOrdersRequest {
    ListAfterSaleOrdersRequest {
        account_id: account_id.to_owned(),
        page_size,
        cursor: cursor.to_owned(),
        ..ListAfterSaleOrdersRequest::default()
    }
}

fn approval(order_id: &str, certificate_id: &str) -> AuditAfterSaleOrderRequest {
    AuditAfterSaleOrderRequest {
        account_id: ACCOUNT_ID.to_owned(),
        order_id: order_id.to_owned(),
        certificate_id: certificate_id.to_owned(),
        audit_status: true,
        reject_reason: String::new(),
        resend_after_unknown_outcome: false,
    }
}

fn rejection(order_id: &str, certificate_id: &str, reason: &str) -> AuditAfterSaleOrderRequest {
    AuditAfterSaleOrderRequest {
        audit_status: false,
        reject_reason: reason.to_owned(),
        ..approval(order_id, certificate_id)
    }
}

async fn list(
    app: &TestApp,
    request: ListAfterSaleOrdersRequest,
) -> Result<ListAfterSaleOrdersResponse, Status> {
    app.after_sale_client()
        .list_after_sale_orders(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn decide(
    app: &TestApp,
    request: AuditAfterSaleOrderRequest,
) -> Result<AuditAfterSaleOrderResponse, Status> {
    app.after_sale_client()
        .audit_after_sale_order(request)
        .await
        .map(tonic::Response::into_inner)
}

fn reason_of(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Walks every page of the merchant's refunds; returns the after-sale ids in
/// order and how many pages it took.
async fn walk_pages(app: &TestApp, template: ListAfterSaleOrdersRequest) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            app,
            ListAfterSaleOrdersRequest {
                cursor: cursor.clone(),
                ..template.clone()
            },
        )
        .await
        .unwrap();
        pages += 1;
        let data = page.data.unwrap();
        ids.extend(
            data.after_sale_order_list
                .into_iter()
                .map(|order| order.after_sale_id),
        );
        if !data.has_more {
            return (ids, pages);
        }
        cursor = data.cursor;
    }
}

#[tokio::test]
async fn paging_through_250_refunds_returns_each_exactly_once() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.sandbox
        .state()
        .seed_refund_orders(ACCOUNT_ID, 250, SEEDED_FROM_S);

    let (ids, pages) = walk_pages(&app, list_request(ACCOUNT_ID, 100, "")).await;
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 250);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        250,
        "no refund twice"
    );
    assert_eq!(ids[0], format!("AS-{ACCOUNT_ID}-00000"));
    assert_eq!(ids[249], format!("AS-{ACCOUNT_ID}-00249"));
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.list_calls, 3);
    assert_eq!(stats.last_list_query["page_size"], "100");
    assert!(!stats.last_list_query.contains_key("refund_status"));

    // Filters go upstream as given: refund status 50 is every other refund,
    // and a creation window of the first ten minutes holds refunds 0 to 10.
    let (paid, _) = walk_pages(
        &app,
        ListAfterSaleOrdersRequest {
            refund_status: Some(50),
            ..list_request(ACCOUNT_ID, 100, "0")
        },
    )
    .await;
    assert_eq!(paid.len(), 125);
    let window = list(
        &app,
        ListAfterSaleOrdersRequest {
            create_order_start_time: Some(SEEDED_FROM_S),
            create_order_end_time: Some(SEEDED_FROM_S + 600),
            include_raw_json: true,
            ..list_request(ACCOUNT_ID, 50, "0")
        },
    )
    .await
    .unwrap();
    assert_eq!(
        window.data.as_ref().unwrap().after_sale_order_list.len(),
        11
    );
    assert!(!window.data.unwrap().has_more);
    assert!(window.raw_json.contains("after_sale_order_list"));
    app.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_at_the_edge_without_asking_douyin() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let invalid_lists = [
        (list_request(ACCOUNT_ID, 0, ""), "page_size"),
        (list_request(ACCOUNT_ID, 101, ""), "page_size"),
        (
            ListAfterSaleOrdersRequest {
                create_order_start_time: Some(1),
                ..list_request(ACCOUNT_ID, 10, "")
            },
            "create_order_end_time",
        ),
        (
            ListAfterSaleOrdersRequest {
                refund_done_start_time: Some(20),
                refund_done_end_time: Some(10),
                ..list_request(ACCOUNT_ID, 10, "")
            },
            "refund_done_start_time",
        ),
        (list_request(ACCOUNT_ID, 10, "a cursor"), "cursor"),
    ];
    for (request, named) in invalid_lists {
        let status = list(&app, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(named), "{}", status.message());
    }
    let unknown = list(&app, list_request("7999999999999999999", 10, ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());

    let invalid_decisions = [
        (rejection("o-1", "c-1", "  "), "reject_reason"),
        (
            AuditAfterSaleOrderRequest {
                reject_reason: "why".to_owned(),
                ..approval("o-1", "c-1")
            },
            "reject_reason",
        ),
        (approval("o-1", ""), "certificate_id"),
        (approval("o 1", "c-1"), "order_id"),
    ];
    for (request, named) in invalid_decisions {
        let status = decide(&app, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(named), "{}", status.message());
    }
    let unknown = decide(
        &app,
        AuditAfterSaleOrderRequest {
            account_id: "7999999999999999999".to_owned(),
            ..approval("o-1", "c-1")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());
    let stats = app.sandbox.state().stats();
    assert_eq!((stats.list_calls, stats.audit_calls), (0, 0));
    app.stop().await;
}

/// Real time: the daemon's pacing and the sandbox's one-second windows both
/// run on the system clock. About 2 s of load on two apps at once: the list
/// (one group for the developer) and the detail (one group per app).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_detail_under_load_at_once_never_exceed_either_rate_group() {
    let app = TestApp::spawn_real_time(|config, sandbox| {
        config
            .lookup
            .set_rate_per_second(DouyinApi::AfterSaleOrderDetail, 10);
        config
            .lookup
            .set_rate_per_second(DouyinApi::AfterSaleOrderList, 10);
        sandbox.lookup_qps = 10;
        sandbox.list_qps_per_developer = 10;
    })
    .await;
    app.register_default().await;
    app.register_other_app().await;
    for account_id in [ACCOUNT_ID, OTHER_ACCOUNT_ID] {
        app.sandbox
            .state()
            .seed_refund_orders(account_id, 30, SEEDED_FROM_S);
        // Tokens first, so the load measures pacing, not token fetches.
        app.access_token_for(account_id).await.unwrap();
    }

    let mut pace = tokio::time::interval(Duration::from_millis(25));
    let mut calls = Vec::new();
    for index in 0..80 {
        pace.tick().await;
        let account_id = if index % 2 == 0 {
            ACCOUNT_ID
        } else {
            OTHER_ACCOUNT_ID
        };
        let mut client = app.after_sale_client();
        calls.push(tokio::spawn(async move {
            let timeout = Duration::from_millis(700);
            if index % 4 < 2 {
                let mut request = tonic::Request::new(list_request(account_id, 10, ""));
                request.set_timeout(timeout);
                (
                    "list",
                    client.list_after_sale_orders(request).await.map(drop),
                )
            } else {
                let mut request =
                    tonic::Request::new(after_sale_request(account_id, &format!("load-{index}")));
                request.set_timeout(timeout);
                (
                    "detail",
                    client.get_after_sale_order_detail(request).await.map(drop),
                )
            }
        }));
    }
    let mut served = std::collections::HashMap::<&str, u32>::new();
    for call in calls {
        let (api, result) = call.await.unwrap();
        match result {
            Ok(()) => *served.entry(api).or_default() += 1,
            Err(status) => assert_eq!(
                status.code(),
                Code::ResourceExhausted,
                "{api}: {}",
                status.message()
            ),
        }
    }
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.lists_answered_with(2119003), 0, "list: {served:?}");
    assert_eq!(stats.list_window_overruns, 0);
    assert_eq!(
        stats.lookups_answered_with(2119003),
        0,
        "detail: {served:?}"
    );
    assert_eq!(stats.lookup_window_overruns, 0);
    // The list's one group for both apps serves about half what the two
    // per-app detail groups serve together in the same ~2.5 s.
    assert!(served["list"] >= 10, "{served:?}");
    assert!(served["detail"] > served["list"], "{served:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_approval_is_answered_from_the_record_with_one_call_to_douyin() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let first = decide(&app, approval("order-a", "cert-a")).await.unwrap();
    assert!(!first.replayed);
    assert_eq!(first.data.as_ref().unwrap().error_code, 0);
    let repeat = decide(&app, approval("order-a", "cert-a")).await.unwrap();
    assert!(repeat.replayed);
    assert_eq!((repeat.extra, repeat.data), (first.extra, first.data));
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);
    assert_eq!(
        app.sandbox.state().audited(ACCOUNT_ID, "order-a", "cert-a"),
        Some(true)
    );

    // The record is on disk: a restarted daemon still answers from it.
    let app = app.restart().await;
    let after_restart = decide(&app, approval("order-a", "cert-a")).await.unwrap();
    assert!(after_restart.replayed);
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);
    assert_eq!(
        app.lookup_counter(|counters| &counters.audit_replays),
        1,
        "counted since the restart"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_rejection_after_an_approval_is_failed_precondition_naming_the_approval() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    decide(&app, approval("order-b", "cert-b")).await.unwrap();
    let status = decide(&app, rejection("order-b", "cert-b", "not eligible"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(status.message().contains("approve"), "{}", status.message());
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "AUDIT_DECISION_CONFLICT");
    assert_eq!(info.metadata["recorded_decision"], "approve");
    assert_eq!(info.metadata["recorded_by"], "test-admin");
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);
    // A different reason is a different rejection, hence a conflict too.
    decide(&app, rejection("order-c", "cert-c", "used"))
        .await
        .unwrap();
    let other_reason = decide(&app, rejection("order-c", "cert-c", "expired"))
        .await
        .unwrap_err();
    assert_eq!(other_reason.code(), Code::FailedPrecondition);
    assert_eq!(app.sandbox.state().stats().audit_calls, 2);
    app.stop().await;
}

#[tokio::test]
async fn an_answer_lost_after_sending_is_unavailable_and_the_decision_is_never_resent() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    // Douyin takes the audit and answers after 2 s, past the caller's 800 ms.
    app.sandbox
        .state()
        .push_audit_faults([Fault::Delay(Duration::from_secs(2))]);
    let mut request = tonic::Request::new(approval("order-d", "cert-d"));
    request.set_timeout(Duration::from_millis(800));
    let status = app
        .after_sale_client()
        .audit_after_sale_order(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert_eq!(reason_of(&status), "AUDIT_OUTCOME_UNKNOWN");
    assert!(
        status.message().contains("may have applied"),
        "{}",
        status.message()
    );
    assert!(
        status.get_details_retry_info().is_none(),
        "no invitation to retry blindly"
    );
    assert_eq!(
        app.sandbox.state().audited(ACCOUNT_ID, "order-d", "cert-d"),
        Some(true)
    );

    // A repeat is not sent: the operator must check first.
    let repeat = decide(&app, approval("order-d", "cert-d"))
        .await
        .unwrap_err();
    assert_eq!(
        repeat.code(),
        Code::FailedPrecondition,
        "{}",
        repeat.message()
    );
    assert_eq!(reason_of(&repeat), "AUDIT_OUTCOME_UNKNOWN");
    assert!(
        repeat.message().contains("GetAfterSaleOrderDetail"),
        "{}",
        repeat.message()
    );
    // Nor is a contradicting decision.
    let contradiction = decide(&app, rejection("order-d", "cert-d", "no"))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&contradiction), "AUDIT_DECISION_CONFLICT");
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);

    // A connection dropped after Douyin read the request: the same.
    app.sandbox
        .state()
        .push_audit_faults([Fault::DropConnection]);
    let dropped = decide(&app, approval("order-e", "cert-e"))
        .await
        .unwrap_err();
    assert_eq!(dropped.code(), Code::Unavailable, "{}", dropped.message());
    assert_eq!(reason_of(&dropped), "AUDIT_OUTCOME_UNKNOWN");
    assert_eq!(app.sandbox.state().stats().audit_calls, 2);

    // The operator checked and asks for a resend: Douyin had taken it, and
    // says so with the code for a second audit.
    let resent = decide(
        &app,
        AuditAfterSaleOrderRequest {
            resend_after_unknown_outcome: true,
            ..approval("order-d", "cert-d")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        resent.code(),
        Code::FailedPrecondition,
        "{}",
        resent.message()
    );
    assert_eq!(reason_of(&resent), "2191005");
    assert_eq!(app.sandbox.state().stats().audit_calls, 3);
    app.stop().await;
}

#[tokio::test]
async fn identical_decisions_at_once_reach_douyin_once() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.access_token_for(ACCOUNT_ID).await.unwrap();
    // The first decision is held at Douyin for a moment while the others arrive.
    app.sandbox
        .state()
        .push_audit_faults([Fault::Delay(Duration::from_millis(300))]);
    let decisions: Vec<_> = (0..5)
        .map(|_| {
            let mut client = app.after_sale_client();
            tokio::spawn(async move {
                client
                    .audit_after_sale_order(approval("order-f", "cert-f"))
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut replayed = 0;
    for decision in decisions {
        if decision.await.unwrap().unwrap().replayed {
            replayed += 1;
        }
    }
    assert_eq!(replayed, 4);
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);
    app.stop().await;
}

#[tokio::test]
async fn refusals_are_replayed_when_they_would_repeat_and_resent_when_they_might_not() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    // Invalid parameters would be refused again: the record answers.
    app.sandbox
        .state()
        .push_audit_faults([Fault::ErrorCode(2119001)]);
    for _ in 0..2 {
        let status = decide(&app, approval("order-g", "cert-g"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert_eq!(reason_of(&status), "2119001");
    }
    assert_eq!(app.sandbox.state().stats().audit_calls, 1);
    // A busy Douyin applied nothing: the repeat goes out and is applied.
    app.sandbox
        .state()
        .push_audit_faults([Fault::ErrorCode(2119002)]);
    let busy = decide(&app, approval("order-h", "cert-h"))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Unavailable, "{}", busy.message());
    assert_eq!(app.sandbox.state().stats().audit_calls, 2, "not retried");
    let applied = decide(&app, approval("order-h", "cert-h")).await.unwrap();
    assert!(!applied.replayed);
    assert_eq!(app.sandbox.state().stats().audit_calls, 3);
    // A token rejection: refreshed and sent once more, applied once.
    app.sandbox
        .state()
        .push_audit_faults([Fault::ErrorCode(2190002)]);
    let tokens_before = app.sandbox.state().stats().token_calls;
    decide(&app, rejection("order-i", "cert-i", "used"))
        .await
        .unwrap();
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.audit_calls, 5);
    assert_eq!(stats.token_calls, tokens_before + 1);
    assert_eq!(
        app.sandbox.state().audited(ACCOUNT_ID, "order-i", "cert-i"),
        Some(false)
    );
    app.stop().await;
}

#[tokio::test]
async fn every_decision_is_in_the_audit_trail_with_who_what_and_the_logid() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    decide(&app, approval("order-j", "cert-j")).await.unwrap();
    decide(&app, approval("order-j", "cert-j")).await.unwrap();
    decide(&app, rejection("order-j", "cert-j", "late"))
        .await
        .unwrap_err();
    let entries = app.audit_entries().await;
    let decisions: Vec<_> = entries
        .iter()
        .filter(|entry| entry.action == "refund_decision")
        .collect();
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    for entry in &decisions {
        assert_eq!(entry.client, "test-admin");
        assert_eq!(entry.app, CLIENT_KEY);
        assert!(
            entry.reason.contains(&format!(
                "merchant {ACCOUNT_ID} order order-j certificate cert-j"
            )),
            "{}",
            entry.reason
        );
    }
    let reasons: Vec<&str> = decisions
        .iter()
        .map(|entry| entry.reason.as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("approve: applied (logid SANDBOX")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("answered from the record")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("reject (\"late\")") && reason.contains("contradicts")),
        "{reasons:?}"
    );
    app.stop().await;
}
