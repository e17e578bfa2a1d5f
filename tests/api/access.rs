//! Who may call what: bearer keys, scopes, app and merchant bounds,
//! ReportInvalidToken spacing and the audit trail, all through gRPC.

use std::time::Duration;

use douyin_tokend::proto::douyin::goodlife::v1::AuditAfterSaleOrderRequest;
use douyin_tokend::proto::douyin::goodlife::v1::WatchAfterSaleEventsRequest;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::tokend::v1::*;
use douyin_tokend::sandbox::DOCUMENTED_ORDER_ID;
use tonic::Code;

use crate::helpers::{
    ACCOUNT_ID, CLIENT_KEY, OTHER_ACCOUNT_ID, OTHER_CLIENT_KEY, TestApp, after_sale_request,
};

fn by_merchant(account_id: &str) -> GetAccessTokenRequest {
    GetAccessTokenRequest {
        selector: Some(get_access_token_request::Selector::AccountId(
            account_id.to_owned(),
        )),
    }
}

fn by_app(client_key: &str) -> GetAccessTokenRequest {
    GetAccessTokenRequest {
        selector: Some(get_access_token_request::Selector::ClientKey(
            client_key.to_owned(),
        )),
    }
}

/// The status code of each RPC family for one key: lookup, refund decision,
/// hand-out, report, admin, event watch.
async fn codes_for(app: &TestApp, api_key: &str, current_token: &str) -> [Code; 6] {
    let code = |result: Result<(), tonic::Status>| {
        result.map_or_else(|status| status.code(), |()| Code::Ok)
    };
    let lookup = app
        .after_sale_client_with(api_key)
        .get_after_sale_order_detail(after_sale_request(ACCOUNT_ID, "order-1"))
        .await;
    // A rejection of a refund only the sandbox knows of: the first client
    // allowed to decide gets it applied, the others never reach Douyin.
    let decision = app
        .after_sale_client_with(api_key)
        .audit_after_sale_order(AuditAfterSaleOrderRequest {
            account_id: ACCOUNT_ID.to_owned(),
            order_id: "order-1".to_owned(),
            certificate_id: "certificate-1".to_owned(),
            audit_status: false,
            reject_reason: "already used in store".to_owned(),
            resend_after_unknown_outcome: false,
        })
        .await;
    let handout = app
        .token_client_with(api_key)
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await;
    let report = app
        .token_client_with(api_key)
        .report_invalid_token(ReportInvalidTokenRequest {
            selector: Some(report_invalid_token_request::Selector::AccountId(
                ACCOUNT_ID.to_owned(),
            )),
            access_token: current_token.to_owned(),
        })
        .await;
    let admin = app
        .admin_client_with(api_key)
        .list_apps(ListAppsRequest {})
        .await;
    let watch = app
        .after_sale_client_with(api_key)
        .watch_after_sale_events(WatchAfterSaleEventsRequest::default())
        .await;
    [
        code(lookup.map(drop)),
        code(decision.map(drop)),
        code(handout.map(drop)),
        code(report.map(drop)),
        code(admin.map(drop)),
        code(watch.map(drop)),
    ]
}

#[tokio::test]
async fn each_scope_opens_exactly_its_own_calls() {
    let app =
        TestApp::spawn_with(|config, _| config.refresh.report_min_interval = Duration::ZERO).await;
    app.register_default().await;
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap().access_token;
    let (ok, denied) = (Code::Ok, Code::PermissionDenied);
    let cases = [
        (
            "aftersale.read",
            [ok, denied, denied, denied, denied, denied],
        ),
        (
            "aftersale.audit",
            [denied, ok, denied, denied, denied, denied],
        ),
        ("token.read", [denied, denied, ok, denied, denied, denied]),
        ("token.report", [denied, denied, denied, ok, denied, denied]),
        ("admin", [denied, denied, denied, denied, ok, denied]),
        (
            "aftersale.events",
            [denied, denied, denied, denied, denied, ok],
        ),
    ];
    for (scope, expected) in cases {
        let key = app
            .create_client(&format!("only-{scope}"), &[scope], &[], &[])
            .await;
        let current = app.access_token_for(ACCOUNT_ID).await.unwrap().access_token;
        assert_eq!(
            codes_for(&app, &key, &current).await,
            expected,
            "scope {scope}"
        );
    }
    assert!(!token.is_empty());
    assert_eq!(
        app.sandbox.state().stats().audit_calls,
        1,
        "only the client with aftersale.audit reached Douyin's audit"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_unknown_key_is_unauthenticated_and_health_needs_none() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let mut anonymous = AfterSaleServiceClient::new(app.channel());
    let status = anonymous
        .get_after_sale_order_detail(after_sale_request(ACCOUNT_ID, "o"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization: Bearer"),
        "{}",
        status.message()
    );
    let status = app
        .token_client_with("dtk_not_a_key_the_daemon_knows")
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains("dtk_not_a_key"),
        "the key is not echoed: {}",
        status.message()
    );

    // AdminService's health does not depend on token availability, so the
    // answer is SERVING whatever the sweep has done by now.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tokend.v1.AdminService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.stop().await;
}

#[tokio::test]
async fn merchant_and_app_bounds_are_enforced() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.register_other_app().await;
    let merchant_bound = app
        .create_client(
            "shop-a",
            &["aftersale.read", "token.read"],
            &[],
            &[ACCOUNT_ID],
        )
        .await;
    let app_bound = app
        .create_client("app-x", &["token.read"], &[CLIENT_KEY], &[])
        .await;

    let mut lookups = app.after_sale_client_with(&merchant_bound);
    lookups
        .get_after_sale_order_detail(after_sale_request(ACCOUNT_ID, DOCUMENTED_ORDER_ID))
        .await
        .unwrap();
    let status = lookups
        .get_after_sale_order_detail(after_sale_request(OTHER_ACCOUNT_ID, DOCUMENTED_ORDER_ID))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains(OTHER_ACCOUNT_ID),
        "{}",
        status.message()
    );
    let mut tokens = app.token_client_with(&merchant_bound);
    tokens
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await
        .unwrap();
    assert_eq!(
        tokens
            .get_access_token(by_merchant(OTHER_ACCOUNT_ID))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        tokens
            .get_access_token(by_app(CLIENT_KEY))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "a merchant-bound client cannot ask by app"
    );

    let mut tokens = app.token_client_with(&app_bound);
    tokens.get_access_token(by_app(CLIENT_KEY)).await.unwrap();
    tokens
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await
        .unwrap();
    let status = tokens
        .get_access_token(by_app(OTHER_CLIENT_KEY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains(OTHER_CLIENT_KEY),
        "the refusal names the app by its client key: {}",
        status.message()
    );
    assert_eq!(
        tokens
            .get_access_token(by_merchant(OTHER_ACCOUNT_ID))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_invalid_reports_causes_one_refresh() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let reporter = app
        .create_client("reporter", &["token.report"], &[], &[])
        .await;
    let rejected = app.access_token_for(ACCOUNT_ID).await.unwrap();
    let report = |token: String| ReportInvalidTokenRequest {
        selector: Some(report_invalid_token_request::Selector::AccountId(
            ACCOUNT_ID.to_owned(),
        )),
        access_token: token,
    };

    let burst: Vec<_> = (0..20)
        .map(|_| {
            let mut client = app.token_client_with(&reporter);
            let request = report(rejected.access_token.clone());
            tokio::spawn(async move {
                client
                    .report_invalid_token(request)
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for report in burst {
        answers.push(report.await.unwrap().unwrap());
    }

    assert_eq!(
        app.sandbox.state().stats().token_calls,
        2,
        "one fetch at first, one refresh for the whole burst"
    );
    assert!(
        answers
            .iter()
            .all(|answer| answer.generation == rejected.generation + 1
                && answer.access_token != rejected.access_token)
    );
    // The new token reported at once: spaced, nothing fetched.
    let new_token = answers[0].access_token.clone();
    let spaced = app
        .token_client_with(&reporter)
        .report_invalid_token(report(new_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spaced.access_token, new_token);
    assert_eq!(app.sandbox.state().stats().token_calls, 2);
    // Past the spacing, a report of the current token refreshes again.
    app.advance(Duration::from_secs(31));
    let refreshed = app
        .token_client_with(&reporter)
        .report_invalid_token(report(new_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(refreshed.access_token, new_token);
    assert_eq!(app.sandbox.state().stats().token_calls, 3);
    app.stop().await;
}

#[tokio::test]
async fn the_audit_trail_records_fetches_handouts_reports_and_forced_refreshes_without_tokens() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let reader = app
        .create_client("reader", &["token.read", "token.report"], &[], &[])
        .await;
    let mut tokens = app.token_client_with(&reader);
    let first = tokens
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..4 {
        tokens
            .get_access_token(by_merchant(ACCOUNT_ID))
            .await
            .unwrap();
    }
    tokens
        .report_invalid_token(ReportInvalidTokenRequest {
            selector: Some(report_invalid_token_request::Selector::AccountId(
                ACCOUNT_ID.to_owned(),
            )),
            access_token: first.access_token.clone(),
        })
        .await
        .unwrap();
    app.force_refresh().await.unwrap();

    let entries = app.audit_entries().await;
    let lines: Vec<(String, String, String, i64)> = entries
        .iter()
        .rev()
        .map(|entry| {
            (
                entry.client.clone(),
                entry.action.clone(),
                entry.reason.clone(),
                entry.count,
            )
        })
        .collect();
    let expected = [
        ("test-admin", "app_added", "app added", 1),
        (
            "test-admin",
            "merchant_added",
            "merchant 7100000000000000001",
            1,
        ),
        (
            "test-admin",
            "client_created",
            "client \"reader\" with scopes token.read,token.report",
            1,
        ),
        ("daemon", "token_fetch", "reactive", 1),
        ("reader", "token_handout", "GetAccessToken", 5),
        ("daemon", "token_fetch", "reactive", 1),
        ("reader", "invalid_report", "refreshed", 1),
        ("daemon", "token_fetch", "forced", 1),
        ("test-admin", "forced_refresh", "refreshed", 1),
    ];
    let expected: Vec<(String, String, String, i64)> = expected
        .iter()
        .map(|(client, action, reason, count)| {
            (
                (*client).to_owned(),
                (*action).to_owned(),
                (*reason).to_owned(),
                *count,
            )
        })
        .collect();
    assert_eq!(lines, expected);
    let printed = format!(
        "{entries:?} {:?}",
        entries
            .iter()
            .map(|entry| (&entry.app, &entry.token_fingerprint))
            .collect::<Vec<_>>()
    );
    assert!(!printed.contains(&first.access_token), "{printed}");
    // Every line about an app names it by client key; creating a client concerns none.
    assert!(entries.iter().all(|entry| {
        entry.app == CLIENT_KEY || (entry.action == "client_created" && entry.app.is_empty())
    }));

    // Pruning removes what is past retention, and only that.
    app.advance(Duration::from_secs(91 * 24 * 3600));
    app.token_client()
        .get_access_token(by_merchant(ACCOUNT_ID))
        .await
        .unwrap();
    let pruned = app
        .app
        .audit
        .prune(Duration::from_secs(90 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(pruned, 9);
    let left = app.audit_entries().await;
    assert_eq!(left.len(), 2, "the new fetch and hand-out stay: {left:?}");
    app.stop().await;
}
