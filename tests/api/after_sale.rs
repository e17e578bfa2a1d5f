//! The after-sale lookup over gRPC against the sandbox: exact round-trip of
//! the documented example, unknown fields, validation and single-flight.

use douyin_tokend::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest;
use douyin_tokend::sandbox::{DOCUMENTED_EXAMPLE, DOCUMENTED_ORDER_ID};
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, TestApp};

/// Asserts that every value in `expected` is in `actual` at the same path.
fn assert_contains_json(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            for (key, value) in expected {
                let member = actual
                    .get(key)
                    .unwrap_or_else(|| panic!("{path}.{key} is missing"));
                assert_contains_json(value, member, &format!("{path}.{key}"));
            }
        }
        (Value::Array(expected), Value::Array(actual)) => {
            assert_eq!(expected.len(), actual.len(), "{path} length");
            for (index, (expected, actual)) in expected.iter().zip(actual).enumerate() {
                assert_contains_json(expected, actual, &format!("{path}[{index}]"));
            }
        }
        _ => assert_eq!(expected, actual, "{path}"),
    }
}

#[tokio::test]
async fn the_documented_example_arrives_field_for_field_with_every_integer_exact() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let response = app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();

    let documented: Value = serde_json::from_str(DOCUMENTED_EXAMPLE).unwrap();
    let received = json!({
        "extra": serde_json::to_value(response.extra.as_ref().unwrap()).unwrap(),
        "data": serde_json::to_value(response.data.as_ref().unwrap()).unwrap(),
    });
    assert_contains_json(&documented, &received, "$");
    // The largest values, spelled out: no f64 on the way.
    let order = &response.data.as_ref().unwrap().after_sale_order_list[0];
    assert_eq!(
        order.reason.as_ref().unwrap().reason_code,
        [9_147_462_244_456_248_000]
    );
    assert_eq!(order.complete_time, 8_841_924_650_433_696_000);
    assert_eq!(order.merchant_account_id, 5_953_689_721_084_050_000);
    assert_eq!(
        order.refund_info_list[0].times_card_refund_info_list[0].serial_number,
        5_364_986_627_064_264_000
    );
    assert_eq!(
        response.extra.as_ref().unwrap().sub_error_code,
        3_260_908_459_436_991_500
    );
    assert_eq!(response.raw_json, "", "raw_json only when asked for");
    app.stop().await;
}

#[tokio::test]
async fn unknown_upstream_fields_are_ignored_and_kept_in_raw_json_when_asked() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.sandbox.state().put_order_response(
        "order-with-news",
        json!({
            "extra": {"logid": "L-NEW", "now": 1, "error_code": 0, "description": "", "brand_new_extra": true},
            "data": {
                "error_code": 0, "description": "", "has_more": false, "cursor": "",
                "surprise_top_level": {"nested": [1, 2, 3]},
                "after_sale_order_list": [{"order_id": "order-with-news", "status": 3, "unlisted_amount": 42, "audit_result": null}]
            }
        }),
    );

    let plain = app.lookup(ACCOUNT_ID, "order-with-news").await.unwrap();
    let order = &plain.data.as_ref().unwrap().after_sale_order_list[0];
    assert_eq!(
        (
            order.order_id.as_str(),
            order.status,
            order.audit_result.as_str()
        ),
        ("order-with-news", 3, "")
    );
    assert!(plain.raw_json.is_empty());

    let with_raw = app
        .lookup_with(GetAfterSaleOrderDetailRequest {
            account_id: ACCOUNT_ID.to_owned(),
            order_id: "order-with-news".to_owned(),
            certificate_id: Some("cert-1".to_owned()),
            include_raw_json: true,
        })
        .await
        .unwrap();
    let raw: Value = serde_json::from_str(&with_raw.raw_json).unwrap();
    assert_eq!(
        raw["data"]["after_sale_order_list"][0]["unlisted_amount"],
        42
    );
    assert_eq!(raw["data"]["surprise_top_level"]["nested"][2], 3);
    assert_eq!(raw["extra"]["brand_new_extra"], true);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_lookups_on_a_cold_app_cause_exactly_one_token_fetch() {
    // The lookup rate limit is another issue's business; lift it here.
    let app = TestApp::spawn_with(|_, sandbox| sandbox.lookup_qps = 0).await;
    app.register_default().await;

    // Different orders, so that lookup coalescing does not hide the token path.
    for result in app.concurrent_lookups(100, "order").await {
        result.unwrap();
    }

    let stats = app.sandbox.state().stats();
    assert_eq!(stats.tokens_issued_for(CLIENT_KEY), 1);
    assert_eq!(stats.token_calls, 1);
    assert_eq!(stats.lookups_answered_with(0), 100);
    app.stop().await;
}

#[tokio::test]
async fn an_unregistered_merchant_is_not_found_and_costs_no_upstream_call() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let status = app
        .lookup("7999999999999999999", DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("7999999999999999999"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("merchant add"),
        "{}",
        status.message()
    );
    assert_eq!(
        app.sandbox.state().stats().token_calls + app.sandbox.state().stats().lookups,
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_ids_are_invalid_arguments_and_cost_no_upstream_call() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let cases = [
        (
            ACCOUNT_ID.to_owned(),
            String::new(),
            None,
            "order_id is empty",
        ),
        (String::new(), "o1".to_owned(), None, "account_id is empty"),
        (
            ACCOUNT_ID.to_owned(),
            "x".repeat(129),
            None,
            "order_id is 129 bytes",
        ),
        (
            ACCOUNT_ID.to_owned(),
            "has space".to_owned(),
            None,
            "order_id contains",
        ),
        (
            ACCOUNT_ID.to_owned(),
            "o1".to_owned(),
            Some("\u{0}".to_owned()),
            "certificate_id contains",
        ),
    ];
    for (account_id, order_id, certificate_id, expected) in cases {
        let status = app
            .lookup_with(GetAfterSaleOrderDetailRequest {
                account_id,
                order_id,
                certificate_id,
                include_raw_json: false,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(expected),
            "{} does not say {expected}",
            status.message()
        );
    }
    let stats = app.sandbox.state().stats();
    assert_eq!(stats.token_calls + stats.lookups, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_empty_certificate_id_is_absent_and_a_blank_one_is_invalid() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let request = |certificate_id: &str| GetAfterSaleOrderDetailRequest {
        account_id: ACCOUNT_ID.to_owned(),
        order_id: DOCUMENTED_ORDER_ID.to_owned(),
        certificate_id: Some(certificate_id.to_owned()),
        include_raw_json: false,
    };
    app.lookup_with(request("")).await.unwrap();
    let sent = app.sandbox.state().stats().last_lookup_query;
    assert!(!sent.contains_key("certificate_id"), "{sent:?}");
    app.lookup_with(request("IrwGTLCKZr")).await.unwrap();
    let sent = app.sandbox.state().stats().last_lookup_query;
    assert_eq!(sent["certificate_id"], "IrwGTLCKZr");
    let lookups = app.sandbox.state().stats().lookups;
    for blank in [" ", "\t", "a\u{1}b"] {
        let status = app.lookup_with(request(blank)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{blank:?}");
        assert!(
            status.message().contains("certificate_id"),
            "{}",
            status.message()
        );
    }
    assert_eq!(app.sandbox.state().stats().lookups, lookups);
    app.stop().await;
}

#[tokio::test]
async fn douyin_business_errors_reach_the_caller_with_code_and_logid() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.sandbox
        .state()
        .authorize_merchant("7200000000000000002", "someone-else");
    app.admin_client()
        .put_merchant(douyin_tokend::proto::tokend::v1::PutMerchantRequest {
            account_id: "7200000000000000002".to_owned(),
            client_key: CLIENT_KEY.to_owned(),
        })
        .await
        .unwrap();

    let status = app
        .lookup("7200000000000000002", DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("2119005"), "{}", status.message());
    assert!(
        status.message().contains("logid SANDBOX"),
        "{}",
        status.message()
    );
    app.stop().await;
}
