//! Secrets stay secret: across success and failure paths, no token, client
//! secret, API key or master key appears in any log line, error message or
//! Debug output. (A client_key is an identifier and may appear.)
//! A test binary of its own: it installs the process-wide log subscriber, which
//! tests sharing a process would race for (tracing caches per call site
//! whether anyone listens).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex};

use douyin_tokend::proto::douyin::goodlife::v1::WatchAfterSaleEventsRequest;
use douyin_tokend::proto::tokend::v1::*;
use douyin_tokend::sandbox::notifications::{RefundRequestContent, Signing};
use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};

/// The order id of the notifications sent: no log line may quote a body.
const BODY_MARKER: &str = "order-body-never-logged";

use helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET, TestApp};

#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_token_or_client_key_reaches_logs_errors_or_debug_output() {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let mut visible = String::new();

    let app = TestApp::spawn_with(|config, _| {
        config.webhook.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    // A bad secret first (failure path), then the right one.
    app.register(CLIENT_KEY, "wrong-secret-value", ACCOUNT_ID)
        .await;
    let refused = app
        .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();
    visible.push_str(&format!("{refused:?} {}", refused.message()));
    app.register_default().await;
    let response = app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    visible.push_str(&format!("{response:?}"));
    let lease = app.access_token_for(ACCOUNT_ID).await.unwrap();
    visible.push_str(&format!("{lease:?}"));
    // Token rejected behind our back, upstream garbage, failed refreshes.
    app.sandbox.state().issue_token_out_of_band(CLIENT_KEY);
    app.sandbox.state().issue_token_out_of_band(CLIENT_KEY);
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    app.advance(std::time::Duration::from_secs(1));
    app.sandbox.state().push_lookup_faults([
        Fault::HtmlPage(502),
        Fault::DropConnection,
        Fault::HttpStatus(503),
        Fault::ErrorCode(2119005),
    ]);
    for _ in 0..2 {
        let status = app
            .lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap_err();
        visible.push_str(&format!("{status:?} {}", status.message()));
    }
    app.sandbox
        .state()
        .push_token_faults([Fault::HttpStatus(500)]);
    let forced = app
        .admin_client()
        .refresh_token(RefreshTokenRequest {
            client_key: CLIENT_KEY.to_owned(),
        })
        .await
        .unwrap_err();
    visible.push_str(&format!("{forced:?} {}", forced.message()));
    let status = app.token_status().await;
    visible.push_str(&format!("{status:?}"));
    let put = PutAppRequest {
        client_key: CLIENT_KEY.to_owned(),
        client_secret: CLIENT_SECRET.to_owned(),
    };
    visible.push_str(&format!("{put:?}"));
    let lease_final = app.access_token_for(ACCOUNT_ID).await.unwrap();
    // API clients: creation, a wrong key, a report, the audit trail.
    let created = app
        .admin_client()
        .create_client(CreateClientRequest {
            name: "reporter".to_owned(),
            scopes: vec!["token.report".to_owned()],
            apps: vec![],
            merchants: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    visible.push_str(&format!("{created:?}"));
    let wrong_key = app
        .token_client_with("dtk_wrong_key_never_issued")
        .get_access_token(GetAccessTokenRequest {
            selector: Some(get_access_token_request::Selector::AccountId(
                ACCOUNT_ID.to_owned(),
            )),
        })
        .await
        .unwrap_err();
    visible.push_str(&format!("{wrong_key:?} {}", wrong_key.message()));
    // Past the backoff of the failed forced refresh above.
    app.advance(std::time::Duration::from_secs(10));
    let reported = app
        .token_client_with(&created.api_key)
        .report_invalid_token(ReportInvalidTokenRequest {
            selector: Some(report_invalid_token_request::Selector::AccountId(
                ACCOUNT_ID.to_owned(),
            )),
            access_token: lease_final.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    visible.push_str(&format!("{reported:?}"));
    let audit = app
        .admin_client()
        .list_audit(ListAuditRequest {
            since_unix_ms: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    visible.push_str(&format!(
        "{audit:?} {:?}",
        audit
            .entries
            .iter()
            .map(|entry| (&entry.app, &entry.reason))
            .collect::<Vec<_>>()
    ));
    // The webhook: a forged notification (refused, logged), a valid one,
    // and the event as a watcher gets it.
    let sender = app.webhook_sender();
    let content = RefundRequestContent::example(ACCOUNT_ID, BODY_MARKER);
    for (msg_id, signing, expected) in [
        ("forged", Signing::WrongSecret, 401),
        ("valid", Signing::Correct, 200),
    ] {
        let status = sender
            .send_refund_request(CLIENT_KEY, CLIENT_SECRET, msg_id, &content, signing)
            .await
            .unwrap();
        assert_eq!(status, expected);
    }
    let mut events = app
        .after_sale_client()
        .watch_after_sale_events(WatchAfterSaleEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let event = events.message().await.unwrap().unwrap();
    assert_eq!(event.client_key, CLIENT_KEY, "the contract carries it");
    visible.push_str(&format!("{event:?}"));
    drop(events);
    let master_key = std::fs::read_to_string(app.config.master_key_path(None).unwrap()).unwrap();
    app.stop().await;

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("client_token fetched"),
        "the capture works: {logged}"
    );
    assert!(
        logged.contains("Douyin rejected"),
        "the failure paths ran: {logged}"
    );
    assert!(
        logged.contains("refused a webhook request") && logged.contains("bad_signature"),
        "the forged notification was logged: {logged}"
    );
    assert!(
        !logged.contains(BODY_MARKER),
        "a notification body reached the log:\n{logged}"
    );
    let everything = format!("{logged}\n{visible}");
    for secret in [
        CLIENT_SECRET,
        "wrong-secret-value",
        &lease.access_token,
        &lease_final.access_token,
        &reported.access_token,
        &created.api_key,
        helpers::ADMIN_API_KEY,
        "dtk_wrong_key_never_issued",
        master_key.trim(),
    ] {
        assert!(
            !everything.contains(secret),
            "{secret:?} leaked:\n{everything}"
        );
    }
    assert!(
        !everything.contains("clt."),
        "a token leaked:\n{everything}"
    );
}
