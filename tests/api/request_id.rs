//! Every response carries the call's request id in `x-request-id`: the
//! caller's when it is well formed, else a fresh one, on success and on error,
//! and the same id the call's log lines carry.

use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::tokend::v1::ListTokenStatusRequest;
use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::daemon_process::{
    DaemonProcess, DaemonSettings, PATIENCE, admin_key, real_time_sandbox,
};
use crate::helpers::{ACCOUNT_ID, TestApp, after_sale_request};

const UNREGISTERED_ACCOUNT_ID: &str = "7999999999999999999";

/// The `x-request-id` a response (or an error's metadata) came back with.
fn request_id_in(metadata: &MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id in {metadata:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

fn assert_is_fresh_request_id(request_id: &str) {
    assert_eq!(request_id.len(), 16, "{request_id:?}");
    assert!(
        request_id.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{request_id:?}"
    );
}

/// Lists token status as the admin, sending `x-request-id` when given one,
/// and returns the request id the response came back with.
async fn request_id_of_a_call_sending(app: &TestApp, caller_request_id: Option<&str>) -> String {
    let mut request = tonic::Request::new(ListTokenStatusRequest {});
    if let Some(caller_request_id) = caller_request_id {
        request
            .metadata_mut()
            .insert("x-request-id", caller_request_id.parse().unwrap());
    }
    let response = app.admin_client().list_token_status(request).await.unwrap();
    request_id_in(response.metadata())
}

#[tokio::test]
async fn a_call_without_a_request_id_gets_a_fresh_one_back_and_no_two_calls_share_one() {
    let app = TestApp::spawn().await;

    let first = request_id_of_a_call_sending(&app, None).await;
    let second = request_id_of_a_call_sending(&app, None).await;

    assert_is_fresh_request_id(&first);
    assert_is_fresh_request_id(&second);
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_well_formed_caller_request_id_comes_back_unchanged() {
    let app = TestApp::spawn().await;
    let longest_kept = "r".repeat(64);

    for caller_request_id in ["req-test-0001", "a.b:c/d_e=f", longest_kept.as_str()] {
        assert_eq!(
            request_id_of_a_call_sending(&app, Some(caller_request_id)).await,
            caller_request_id
        );
    }
}

#[tokio::test]
async fn a_malformed_caller_request_id_is_replaced_by_a_fresh_one() {
    let app = TestApp::spawn().await;
    let too_long = "r".repeat(65);

    for caller_request_id in ["has space", "", too_long.as_str()] {
        let answered = request_id_of_a_call_sending(&app, Some(caller_request_id)).await;
        assert_ne!(answered, caller_request_id);
        assert_is_fresh_request_id(&answered);
    }
}

#[tokio::test]
async fn an_error_response_carries_the_request_id_too() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let refused = app
        .lookup(UNREGISTERED_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert_is_fresh_request_id(&request_id_in(refused.metadata()));

    let mut request = tonic::Request::new(after_sale_request(
        UNREGISTERED_ACCOUNT_ID,
        DOCUMENTED_ORDER_ID,
    ));
    request
        .metadata_mut()
        .insert("x-request-id", "req-refused-0001".parse().unwrap());
    let refused = app
        .after_sale_client()
        .get_after_sale_order_detail(request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert_eq!(request_id_in(refused.metadata()), "req-refused-0001");
}

#[tokio::test]
async fn a_call_refused_by_authentication_carries_a_request_id() {
    let app = TestApp::spawn().await;

    let refused = app
        .after_sale_client_with("dtk_not_a_configured_key_000000000000000000000000")
        .get_after_sale_order_detail(after_sale_request(ACCOUNT_ID, DOCUMENTED_ORDER_ID))
        .await
        .unwrap_err();

    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_is_fresh_request_id(&request_id_in(refused.metadata()));
}

#[tokio::test]
async fn health_answers_carry_a_request_id_too() {
    let app = TestApp::spawn().await;

    let answer = HealthClient::new(app.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    assert_is_fresh_request_id(&request_id_in(answer.metadata()));
}

#[tokio::test]
async fn the_fresh_request_id_a_caller_gets_back_is_the_one_the_calls_log_lines_carry() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon =
        DaemonProcess::start("", DaemonSettings::with_json_logs(sandbox.base_url())).await;

    let refused = AfterSaleServiceClient::with_interceptor(daemon.channel(), admin_key())
        .get_after_sale_order_detail(after_sale_request(
            UNREGISTERED_ACCOUNT_ID,
            DOCUMENTED_ORDER_ID,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let answered = request_id_in(refused.metadata());
    assert_is_fresh_request_id(&answered);
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));

    let line = daemon.json_log_line("after-sale lookup failed");
    assert_eq!(line["span"]["request_id"], answered.as_str(), "{line}");
    sandbox.stop().await;
}

#[tokio::test]
async fn work_done_for_a_call_on_other_tasks_logs_the_calls_request_id() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon =
        DaemonProcess::start("", DaemonSettings::with_json_logs(sandbox.base_url())).await;
    // Douyin rejects the token once: the lookup's flight task invalidates it,
    // and the token manager's fetch task refreshes it, both for this call.
    sandbox
        .state()
        .push_lookup_faults([Fault::ErrorCode(2190002)]);
    let mut request = tonic::Request::new(after_sale_request(ACCOUNT_ID, DOCUMENTED_ORDER_ID));
    request
        .metadata_mut()
        .insert("x-request-id", "trace-token-refresh-7".parse().unwrap());
    let answer = AfterSaleServiceClient::with_interceptor(daemon.channel(), admin_key())
        .get_after_sale_order_detail(request)
        .await
        .unwrap();
    assert_eq!(request_id_in(answer.metadata()), "trace-token-refresh-7");
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));

    for message in [
        "Douyin rejected the token; refreshing and retrying once",
        "fetching client_token",
        "client_token fetched",
    ] {
        let line = daemon.json_log_line(message);
        assert_eq!(
            line["span"]["request_id"], "trace-token-refresh-7",
            "{message}: {line}"
        );
    }
    sandbox.stop().await;
}
