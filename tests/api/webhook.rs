//! The webhook and the event stream through the real path: signed
//! notifications posted over HTTP (and HTTPS) by the sandbox, stored in SQLite, streamed
//! over gRPC by WatchAfterSaleEvents, and the real binary killed right after
//! acknowledging one.

use std::collections::HashSet;
use std::time::Duration;

use douyin_tokend::cli::AuthenticatedChannel;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::douyin::goodlife::v1::{AfterSaleEvent, WatchAfterSaleEventsRequest};
use douyin_tokend::proto::tokend::v1::{CreateClientRequest, PutMerchantRequest};
use douyin_tokend::sandbox::notifications::{
    NotificationSender, RefundRequestContent, Signing, douyin_signature, refund_request_body,
};
use futures::StreamExt;
use tonic::Code;
use tonic::codec::Streaming;

use crate::daemon_process::{
    DaemonProcess, DaemonSettings, PATIENCE, admin_key, real_time_sandbox,
};
use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET, TestApp};
use crate::transport::TestPki;

/// Header names and values of one post.
type Headers = Vec<(&'static str, String)>;

const OTHER_ACCOUNT_ID: &str = "7100000000000000002";
/// Upper bound for the events a test waits for (nothing here sleeps).
const EVENT_PATIENCE: Duration = Duration::from_secs(60);
/// `webhook.retention`'s default, and a time past it.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const PAST_RETENTION: Duration = Duration::from_secs(31 * 24 * 3600);

async fn app_with_webhook(adjust: impl FnOnce(&mut douyin_tokend::config::Config)) -> TestApp {
    let app = TestApp::spawn_with(|config, _| {
        config.webhook.listen = Some("127.0.0.1:0".parse().unwrap());
        adjust(config);
    })
    .await;
    app.register_default().await;
    app
}

async fn send(
    sender: &NotificationSender,
    msg_id: &str,
    account_id: &str,
    signing: Signing,
) -> u16 {
    sender
        .send_refund_request(
            CLIENT_KEY,
            CLIENT_SECRET,
            msg_id,
            &RefundRequestContent::example(account_id, &format!("order-{msg_id}")),
            signing,
        )
        .await
        .unwrap()
}

async fn watch(
    client: &mut AfterSaleServiceClient<AuthenticatedChannel>,
    after_sequence: i64,
    account_ids: &[&str],
) -> Result<Streaming<AfterSaleEvent>, tonic::Status> {
    client
        .watch_after_sale_events(WatchAfterSaleEventsRequest {
            after_sequence,
            account_ids: account_ids.iter().map(|id| (*id).to_owned()).collect(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next `count` events of a stream, within `EVENT_PATIENCE`.
async fn take(stream: &mut Streaming<AfterSaleEvent>, count: usize) -> Vec<AfterSaleEvent> {
    let mut events = Vec::with_capacity(count);
    tokio::time::timeout(EVENT_PATIENCE, async {
        while events.len() < count {
            events.push(
                stream
                    .next()
                    .await
                    .expect("the stream ended")
                    .expect("an event"),
            );
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {count} events within {EVENT_PATIENCE:?}",
            events.len()
        )
    });
    events
}

/// Stores `old`, lets them age past the retention, stores `new`, prunes;
/// returns how many were pruned.
async fn store_age_and_prune(app: &TestApp, old: &[&str], new: &str) -> u64 {
    let sender = app.webhook_sender();
    for msg_id in old {
        assert_eq!(
            send(&sender, msg_id, ACCOUNT_ID, Signing::Correct).await,
            200
        );
    }
    app.advance(PAST_RETENTION);
    assert_eq!(send(&sender, new, ACCOUNT_ID, Signing::Correct).await, 200);
    app.app.events.prune(RETENTION).await.unwrap()
}

fn assert_strictly_increasing(events: &[AfterSaleEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "sequence {} then {}",
            pair[0].sequence,
            pair[1].sequence
        );
    }
}

#[tokio::test]
async fn a_thousand_notifications_with_repeats_and_forgeries_reach_two_watchers_once_each_in_order()
{
    let app = app_with_webhook(|_| {}).await;
    // 1,000 posts: every 20th (from the 5th) forged, every 10th a repeat of
    // the post before it; the rest, 850, are new.
    let plan: Vec<(String, Signing)> = (0..1000)
        .map(|index| match index {
            index if index % 20 == 4 => (format!("forged-{index}"), Signing::WrongSecret),
            index if index % 10 == 9 => (format!("msg-{}", index - 1), Signing::Correct),
            index => (format!("msg-{index}"), Signing::Correct),
        })
        .collect();
    let expected: HashSet<String> = plan
        .iter()
        .filter(|(_, signing)| *signing == Signing::Correct)
        .map(|(msg_id, _)| msg_id.clone())
        .collect();
    assert_eq!(expected.len(), 850);

    let mut steady = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    let mut interrupted = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    let steady_watcher = tokio::spawn(async move {
        let events = take(&mut steady, 850).await;
        (events, steady)
    });
    let resuming_client = app.after_sale_client();
    let interrupted_watcher = tokio::spawn(async move {
        let mut resuming_client = resuming_client;
        let mut events = take(&mut interrupted, 400).await;
        // Hang up midway and come back from the last sequence seen.
        drop(interrupted);
        let last = events.last().unwrap().sequence;
        let mut resumed = watch(&mut resuming_client, last, &[]).await.unwrap();
        events.extend(take(&mut resumed, 450).await);
        events
    });

    let sender = app.webhook_sender();
    let statuses: Vec<(Signing, u16)> = futures::stream::iter(plan)
        .map(|(msg_id, signing)| {
            let sender = sender.clone();
            async move { (signing, send(&sender, &msg_id, ACCOUNT_ID, signing).await) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (signing, status) in &statuses {
        let expected_status = if *signing == Signing::Correct {
            200
        } else {
            401
        };
        assert_eq!(*status, expected_status, "{signing:?}");
    }

    let (steady_events, mut steady) = steady_watcher.await.unwrap();
    let interrupted_events = interrupted_watcher.await.unwrap();
    for events in [&steady_events, &interrupted_events] {
        assert_strictly_increasing(events);
        let msg_ids: HashSet<String> = events.iter().map(|event| event.msg_id.clone()).collect();
        assert_eq!(msg_ids.len(), 850, "each stored event exactly once");
        assert_eq!(msg_ids, expected);
    }
    let sequences = |events: &[AfterSaleEvent]| -> Vec<i64> {
        events.iter().map(|event| event.sequence).collect()
    };
    assert_eq!(sequences(&steady_events), sequences(&interrupted_events));
    let first = &steady_events[0];
    assert_eq!(first.client_key, CLIENT_KEY);
    assert_eq!(first.account_id, ACCOUNT_ID);
    assert_eq!(first.order_id, format!("order-{}", first.msg_id));
    assert_eq!(first.refund_amount, 1990);
    assert_eq!(first.apply_reason.as_ref().unwrap().code, [102]);
    assert!(
        first.raw_json.contains("\"content\":\"{"),
        "the body as received"
    );
    // Nothing else was stored: the next event is the next one sent.
    assert_eq!(
        send(&sender, "sentinel", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let next = take(&mut steady, 1).await;
    assert_eq!(next[0].msg_id, "sentinel");
    app.stop().await;
}

#[tokio::test]
async fn over_https_a_signed_notification_is_stored_and_streamed_and_plain_http_is_not_served() {
    let pki = TestPki::new();
    let tls = pki.server_tls(false);
    let app = app_with_webhook(|config| config.webhook.tls = Some(tls)).await;
    let https_url = app.webhook_url();
    assert!(https_url.starts_with("https://127.0.0.1:"), "{https_url}");

    // Neither plain HTTP nor a sender that does not trust the certificate gets through.
    let plain_http = NotificationSender::new(https_url.replacen("https://", "http://", 1));
    let untrusting = NotificationSender::new(https_url.clone());
    for (sender, case) in [(&plain_http, "plain HTTP"), (&untrusting, "untrusted CA")] {
        let refused = sender
            .send_refund_request(
                CLIENT_KEY,
                CLIENT_SECRET,
                case,
                &RefundRequestContent::example(ACCOUNT_ID, "order-refused"),
                Signing::Correct,
            )
            .await;
        assert!(refused.is_err(), "{case}: {refused:?}");
    }

    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    let sender = app.webhook_sender_trusting(&pki.ca_pem);
    assert_eq!(
        send(&sender, "over-tls", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let events = take(&mut stream, 1).await;
    assert_eq!(events[0].msg_id, "over-tls", "nothing refused was stored");
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[0].order_id, "order-over-tls");
    assert_eq!(events[0].refund_amount, 1990);
    // And the next one after it: the listener keeps serving over TLS.
    assert_eq!(
        send(&sender, "over-tls-again", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    assert_eq!(take(&mut stream, 1).await[0].msg_id, "over-tls-again");
    app.stop().await;
}

#[tokio::test]
async fn refused_notifications_store_nothing_and_are_counted() {
    let app = app_with_webhook(|config| {
        config.webhook.max_body_bytes = 1024;
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let sender = app.webhook_sender();
    let content = RefundRequestContent::example(ACCOUNT_ID, "order-1");
    let body = refund_request_body(CLIENT_KEY, &content);
    let signed = |body: &str| douyin_signature(CLIENT_SECRET, body.as_bytes());
    let headers = |msg_id: &str, signature: Option<String>| {
        let mut headers = vec![("Msg-Id", msg_id.to_owned())];
        headers.extend(signature.map(|signature| ("X-Douyin-Signature", signature)));
        headers
    };
    let unknown_app_body = refund_request_body("awunknownapp00001", &content);
    let content_as_object = serde_json::json!({
        "event": "life_hermes_akte_after_sale_audit",
        "client_key": CLIENT_KEY,
        "content": { "account_id": ACCOUNT_ID, "order_id": "o" },
    })
    .to_string();
    let oversized = refund_request_body(
        CLIENT_KEY,
        &RefundRequestContent {
            certificate_id: "c".repeat(2000),
            ..content.clone()
        },
    );
    let cases: Vec<(&str, Headers, String, u16)> = vec![
        (
            "unknown app",
            headers("m1", Some(signed(&unknown_app_body))),
            unknown_app_body.clone(),
            401,
        ),
        (
            "wrong signature",
            headers("m2", Some(douyin_signature("guess", body.as_bytes()))),
            body.clone(),
            401,
        ),
        ("no signature", headers("m3", None), body.clone(), 401),
        (
            "no Msg-Id",
            vec![("X-Douyin-Signature", signed(&body))],
            body.clone(),
            400,
        ),
        (
            "not JSON",
            headers("m4", Some(signed("{oops"))),
            "{oops".to_owned(),
            400,
        ),
        (
            "content not a string",
            headers("m5", Some(signed(&content_as_object))),
            content_as_object.clone(),
            400,
        ),
        (
            "over the bound",
            headers("m6", Some(signed(&oversized))),
            oversized.clone(),
            400,
        ),
    ];
    for (case, headers, body, expected) in cases {
        let (status, _) = sender.post(&headers, body.into_bytes()).await.unwrap();
        assert_eq!(status, expected, "{case}");
    }
    assert_eq!(
        send(&sender, "good", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    let stored = take(&mut stream, 1).await;
    assert_eq!(stored[0].msg_id, "good", "nothing refused was stored");
    assert_eq!(stored[0].sequence, 1);

    let page = crate::metrics::scrape(&app).await;
    for (outcome, count) in [
        ("unknown_app", 1),
        ("bad_signature", 1),
        ("missing_signature", 1),
        ("missing_msg_id", 1),
        ("malformed", 2),
        ("too_large", 1),
        ("stored", 1),
    ] {
        let series =
            format!("douyin_tokend_webhook_notifications_total{{outcome=\"{outcome}\"}} {count}");
        assert!(page.contains(&series), "{series} in\n{page}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_console_url_check_gets_its_challenge_back_and_nothing_is_stored() {
    let app = app_with_webhook(|_| {}).await;
    let sender = app.webhook_sender();
    for body in [
        r#"{"event":"verify_webhook","client_key":"","content":{"challenge":12345}}"#,
        r#"{"event":"verify_webhook","client_key":"","content":"{\"challenge\":12345}"}"#,
    ] {
        let (status, answer) = sender.post(&[], body.as_bytes().to_vec()).await.unwrap();
        assert_eq!(status, 200);
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer, serde_json::json!({ "challenge": 12345 }));
    }
    assert_eq!(
        send(&sender, "first", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    assert_eq!(take(&mut stream, 1).await[0].sequence, 1);
    app.stop().await;
}

#[tokio::test]
async fn watchers_see_only_the_merchants_they_may_and_need_the_scope() {
    let app = app_with_webhook(|_| {}).await;
    app.admin_client()
        .put_merchant(PutMerchantRequest {
            account_id: OTHER_ACCOUNT_ID.to_owned(),
            client_key: CLIENT_KEY.to_owned(),
        })
        .await
        .unwrap();
    let create = |name: &str, scope: &str, merchants: &[&str]| CreateClientRequest {
        name: name.to_owned(),
        scopes: vec![scope.to_owned()],
        apps: Vec::new(),
        merchants: merchants.iter().map(|id| (*id).to_owned()).collect(),
    };
    let mut admin = app.admin_client();
    let bounded_key = admin
        .create_client(create("bounded", "aftersale.events", &[ACCOUNT_ID]))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let reader_key = admin
        .create_client(create("reader", "aftersale.read", &[]))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let sender = app.webhook_sender();
    for (msg_id, account_id) in [
        ("a1", ACCOUNT_ID),
        ("b1", OTHER_ACCOUNT_ID),
        ("a2", ACCOUNT_ID),
        ("b2", OTHER_ACCOUNT_ID),
    ] {
        assert_eq!(
            send(&sender, msg_id, account_id, Signing::Correct).await,
            200
        );
    }

    let mut bounded = app.after_sale_client_with(&bounded_key);
    let mut own = watch(&mut bounded, 0, &[]).await.unwrap();
    let seen: Vec<String> = take(&mut own, 2)
        .await
        .into_iter()
        .map(|event| event.msg_id)
        .collect();
    assert_eq!(seen, ["a1", "a2"]);
    let status = watch(&mut bounded, 0, &[OTHER_ACCOUNT_ID])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = watch(&mut bounded, 0, &["bad id"]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = watch(&mut app.after_sale_client_with(&reader_key), 0, &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let mut chosen = watch(&mut app.after_sale_client(), 0, &[OTHER_ACCOUNT_ID])
        .await
        .unwrap();
    let seen: Vec<String> = take(&mut chosen, 2)
        .await
        .into_iter()
        .map(|event| event.msg_id)
        .collect();
    assert_eq!(seen, ["b1", "b2"]);
    // The bounded watcher's next event is its merchant's next one.
    assert_eq!(
        send(&sender, "b3", OTHER_ACCOUNT_ID, Signing::Correct).await,
        200
    );
    assert_eq!(send(&sender, "a3", ACCOUNT_ID, Signing::Correct).await, 200);
    assert_eq!(take(&mut own, 1).await[0].msg_id, "a3");
    app.stop().await;
}

#[tokio::test]
async fn events_past_retention_are_pruned_and_their_sequences_never_come_back() {
    let app = app_with_webhook(|_| {}).await;
    assert_eq!(
        store_age_and_prune(&app, &["old-1", "old-2"], "new-1").await,
        2
    );
    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    let kept = take(&mut stream, 1).await;
    assert_eq!((kept[0].msg_id.as_str(), kept[0].sequence), ("new-1", 3));

    // Even with every event pruned, a new one gets a sequence never used.
    app.advance(PAST_RETENTION);
    assert_eq!(app.app.events.prune(RETENTION).await.unwrap(), 1);
    let app = app.restart().await;
    let sender = app.webhook_sender();
    // A repeat of a pruned Msg-Id is new again: Douyin's repeats come within days.
    assert_eq!(
        send(&sender, "new-1", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    assert_eq!(take(&mut stream, 1).await[0].sequence, 4);
    app.stop().await;
}

#[tokio::test]
async fn a_watcher_resuming_after_pruned_events_gets_out_of_range_naming_the_gap_and_can_resume_past_it()
 {
    use tonic_types::StatusExt;
    let app = app_with_webhook(|_| {}).await;
    // A watcher saw old-1 (sequence 1) and went away for longer than the retention.
    assert_eq!(
        store_age_and_prune(&app, &["old-1", "old-2", "old-3"], "new-1").await,
        3
    );

    let assert_gap_reported = |status: tonic::Status| {
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "AFTER_SALE_EVENTS_PRUNED");
        assert_eq!(info.domain, "douyin-tokend");
        assert_eq!(info.metadata["after_sequence"], "1");
        assert_eq!(info.metadata["pruned_through"], "3");
        assert!(
            status.message().contains("after_sequence = 3"),
            "says how to resume: {status:?}"
        );
    };
    assert_gap_reported(
        watch(&mut app.after_sale_client(), 1, &[])
            .await
            .unwrap_err(),
    );

    // Resuming after pruned_through accepts the gap: the next kept event, nothing else.
    let mut resumed = watch(&mut app.after_sale_client(), 3, &[]).await.unwrap();
    assert_eq!(
        take(&mut resumed, 1).await[0].msg_id,
        "new-1",
        "the first kept event after the gap"
    );
    // 0 (from the oldest kept) and a kept sequence are no gap.
    let mut from_oldest = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    assert_eq!(take(&mut from_oldest, 1).await[0].sequence, 4);
    assert!(watch(&mut app.after_sale_client(), 4, &[]).await.is_ok());
    drop((resumed, from_oldest));

    // The daemon remembers what it pruned across a restart.
    let app = app.restart().await;
    assert_gap_reported(
        watch(&mut app.after_sale_client(), 1, &[])
            .await
            .unwrap_err(),
    );
    app.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_at_once_with_where_to_resume() {
    let app = app_with_webhook(|config| config.shutdown_grace = Duration::from_secs(30)).await;
    assert_eq!(
        send(&app.webhook_sender(), "only", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let mut stream = watch(&mut app.after_sale_client(), 0, &[]).await.unwrap();
    assert_eq!(take(&mut stream, 1).await[0].msg_id, "only");
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(app.stop());
    let ended = tokio::time::timeout(EVENT_PATIENCE, stream.next())
        .await
        .expect("the stream ends");
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("after_sequence = 1"),
        "{status:?}"
    );
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an open stream held shutdown for {:?} (grace 30 s)",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_notification_acknowledged_right_before_sigkill_is_there_after_restart() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let process = DaemonProcess::start(
        "[webhook]\nlisten = \"127.0.0.1:0\"\n",
        DaemonSettings::new(sandbox.base_url()),
    )
    .await;
    let webhook = process.webhook_address.expect("the webhook is on");
    let sender = NotificationSender::new(format!("http://{webhook}/douyin/webhook"));
    assert_eq!(
        send(&sender, "acked-then-killed", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let process = process.restart_after_sigkill().await;
    let mut client = AfterSaleServiceClient::with_interceptor(process.channel(), admin_key());
    let mut stream = tokio::time::timeout(PATIENCE, watch(&mut client, 0, &[]))
        .await
        .unwrap()
        .unwrap();
    let events = take(&mut stream, 1).await;
    assert_eq!(events[0].msg_id, "acked-then-killed");
    assert_eq!(events[0].order_id, "order-acked-then-killed");
    sandbox.stop().await;
}

#[tokio::test]
async fn events_tail_prints_one_json_line_per_event_as_they_come() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = app_with_webhook(|_| {}).await;
    let sender = app.webhook_sender();
    assert_eq!(
        send(&sender, "before", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let mut tail = tokio::process::Command::new(crate::daemon_process::BINARY)
        .args([
            "events",
            "--daemon",
            &app.address.to_string(),
            "tail",
            "--json",
        ])
        .env("DOUYIN_TOKEND_API_KEY", crate::helpers::ADMIN_API_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        let line = tokio::time::timeout(EVENT_PATIENCE, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("tail still runs");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let first = next_line().await;
    assert_eq!(first["msg_id"], "before");
    assert_eq!(first["sequence"], 1);
    assert!(first.get("client_key").is_none(), "{first}");
    assert_eq!(first["app"], CLIENT_KEY, "{first}");
    assert_eq!(
        send(&sender, "after", ACCOUNT_ID, Signing::Correct).await,
        200
    );
    let second = next_line().await;
    assert_eq!(
        (second["msg_id"].as_str(), second["sequence"].as_i64()),
        (Some("after"), Some(2))
    );
    // The daemon's shutdown ends the stream: tail fails, telling the operator
    // the flag to resume with.
    app.stop().await;
    let ended = tokio::time::timeout(EVENT_PATIENCE, tail.wait_with_output())
        .await
        .expect("tail ends with the stream")
        .unwrap();
    assert!(!ended.status.success());
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(
        stderr.contains("resume with `douyin-tokend events tail --after 2`"),
        "{stderr}"
    );
}
