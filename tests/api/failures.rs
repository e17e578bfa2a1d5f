//! Upstream garbage — HTML error pages, truncated JSON, HTTP 500 — becomes a
//! clear UNAVAILABLE, and the daemon keeps serving afterwards.

use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{ACCOUNT_ID, TestApp};

#[tokio::test]
async fn upstream_garbage_is_unavailable_with_a_clear_message_and_the_daemon_keeps_serving() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    let cases = [
        (Fault::HtmlPage(502), "HTTP 502"),
        (Fault::HtmlPage(200), "an HTML page"),
        (Fault::TruncatedJson, "not the expected JSON"),
        (Fault::HttpStatus(500), "HTTP 500"),
    ];
    for (fault, expected) in cases {
        app.advance(std::time::Duration::from_secs(1));
        app.sandbox.state().push_lookup_faults([fault.clone()]);
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
    }
    app.advance(std::time::Duration::from_secs(1));
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn douyin_codes_map_to_their_grpc_status_with_error_info() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let table = [
        (2119001, Code::InvalidArgument),
        (2100005, Code::InvalidArgument),
        (2119005, Code::PermissionDenied),
        (2190004, Code::PermissionDenied),
        (2119008, Code::PermissionDenied),
        (2119003, Code::ResourceExhausted),
        (2119002, Code::Unavailable),
        (2100004, Code::Unavailable),
        (2100001, Code::Unavailable),
        (3000001, Code::Unavailable),
        (4000001, Code::FailedPrecondition),
        (5000001, Code::FailedPrecondition),
        (2119010, Code::Unimplemented),
    ];
    for (douyin_code, grpc_code) in table {
        app.advance(std::time::Duration::from_secs(1));
        app.sandbox
            .state()
            .push_lookup_faults([Fault::ErrorCode(douyin_code)]);
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        assert_eq!(status.code(), grpc_code, "Douyin {douyin_code}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason, info.domain.as_str()),
            (douyin_code.to_string(), "open.douyin.com")
        );
        assert!(
            info.metadata["logid"].starts_with("SANDBOX"),
            "{douyin_code}"
        );
        assert!(status.message().contains(&douyin_code.to_string()));
    }
    app.stop().await;
}
