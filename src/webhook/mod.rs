//! The webhook receiver of Douyin's refund-request notifications (抖音码退款申请通知):
//! an HTTP/1.1 listener of its own (TLS optional), `POST <webhook.path>`.
//! Each notification's signature is checked with the secret of the app its
//! body names, over the raw bytes; a valid one is committed to the event log
//! before the 200 goes back. Senders are bounded in every way that could
//! hold the daemon: header and body read timeouts, body size, requests and
//! connections at once, connection lifetime.

pub mod notification;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::after_sale_events::{AfterSaleEvents, Appended, NewAfterSaleEvent};
use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;
use notification::{Malformed, REFUND_REQUEST_EVENT, URL_CHECK_EVENT};

/// Douyin gives up on a push after 5 s; a sender slower than this is not Douyin.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is asked to close after this, so none holds a slot for ever.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// In-flight requests finish within this after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 1024;
/// Requests being handled at once; more are answered 503 (Douyin pushes again).
const MAX_REQUESTS_IN_FLIGHT: usize = 512;
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Finds a registered app's secret; `app` gives the token manager's.
pub(crate) type AppSecrets = Arc<dyn Fn(&ClientKey) -> Option<ClientSecret> + Send + Sync>;

/// What became of one request: the answer, the metric label, the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotificationOutcome {
    Stored,
    Duplicate,
    UrlCheck,
    /// A signed push of an event other than the refund request: acknowledged, not stored.
    OtherEvent,
    Malformed,
    TooLarge,
    SlowBody,
    MissingMsgId,
    MissingSignature,
    UnknownApp,
    BadSignature,
    Busy,
    StoreFailed,
}

impl NotificationOutcome {
    /// The `outcome` label of `douyin_tokend_webhook_notifications_total`.
    pub(crate) fn metric_label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
            Self::UrlCheck => "url_check",
            Self::OtherEvent => "other_event",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::SlowBody => "slow_body",
            Self::MissingMsgId => "missing_msg_id",
            Self::MissingSignature => "missing_signature",
            Self::UnknownApp => "unknown_app",
            Self::BadSignature => "bad_signature",
            Self::Busy => "busy",
            Self::StoreFailed => "store_failed",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::Stored | Self::Duplicate | Self::UrlCheck | Self::OtherEvent => StatusCode::OK,
            Self::Malformed | Self::TooLarge | Self::MissingMsgId => StatusCode::BAD_REQUEST,
            Self::SlowBody => StatusCode::REQUEST_TIMEOUT,
            Self::MissingSignature | Self::UnknownApp | Self::BadSignature => {
                StatusCode::UNAUTHORIZED
            }
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::StoreFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The receiver's parts, shared by every request.
pub(crate) struct WebhookReceiver {
    pub(crate) events: AfterSaleEvents,
    pub(crate) secrets: AppSecrets,
    pub(crate) metrics: Metrics,
    pub(crate) max_body_bytes: usize,
    requests_in_flight: Semaphore,
    refusals: LogThrottle,
}

impl WebhookReceiver {
    pub(crate) fn new(
        events: AfterSaleEvents,
        secrets: AppSecrets,
        metrics: Metrics,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            events,
            secrets,
            metrics,
            max_body_bytes,
            requests_in_flight: Semaphore::new(MAX_REQUESTS_IN_FLIGHT),
            refusals: LogThrottle::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// Serves `POST path` on `listener` (TLS when `tls` is given) until
/// `stopping` is cancelled; then stops accepting, lets requests in flight
/// finish (up to `DRAIN_TIMEOUT`) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    path: &str,
    receiver: WebhookReceiver,
    stopping: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route(path, post(receive))
        .with_state(Arc::new(receiver));
    let connections = TaskTracker::new();
    let connection_slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            () = stopping.cancelled() => break,
            slot = connection_slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "the webhook listener cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(TokioIo::new(stream), peer, router, stopping).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(TokioIo::new(stream), peer, router, stopping).await
                        }
                        _ => tracing::debug!(%peer, "a webhook TLS handshake failed or timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One HTTP/1.1 connection, closed gracefully at shutdown or at the end of
/// its lifetime (a request in progress is answered first).
async fn serve_connection<Io>(io: Io, peer: SocketAddr, router: Router, stopping: CancellationToken)
where
    Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = stopping.cancelled() => {}
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection).await;
}

async fn receive(
    State(receiver): State<Arc<WebhookReceiver>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (outcome, answer) = match receiver.requests_in_flight.try_acquire() {
        Ok(_in_flight) => handle(&receiver, &headers, body).await,
        Err(_) => (NotificationOutcome::Busy, Answer::Empty),
    };
    receiver
        .metrics
        .record_webhook_notification(outcome.metric_label());
    note(&receiver, outcome, &answer, peer);
    match answer {
        Answer::Challenge(challenge) => (
            outcome.status(),
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "challenge": challenge }).to_string(),
        )
            .into_response(),
        _ => outcome.status().into_response(),
    }
}

/// What goes back besides the status, and what the log line may name.
enum Answer {
    Empty,
    Challenge(serde_json::Value),
    /// Refused or ignored for this app (logged by its client key).
    ForApp(ClientKey),
    StoredAs(ClientKey, i64),
    Malformed(Malformed),
}

/// Logs an outcome without the body or the client key. Refusals a sender can
/// repeat at will are throttled; stored notifications are logged at debug.
fn note(
    receiver: &WebhookReceiver,
    outcome: NotificationOutcome,
    answer: &Answer,
    peer: SocketAddr,
) {
    use NotificationOutcome::*;
    let app = match answer {
        Answer::ForApp(app) | Answer::StoredAs(app, _) => app.to_string(),
        _ => "-".to_owned(),
    };
    match outcome {
        Stored => {
            if let Answer::StoredAs(_, sequence) = answer {
                tracing::debug!(%app, sequence, "stored a refund-request notification");
            }
        }
        Duplicate => tracing::debug!(%app, "a repeated Msg-Id was acknowledged again"),
        UrlCheck => tracing::info!(%peer, "answered Douyin's webhook URL check"),
        OtherEvent => {
            tracing::info!(%app, "acknowledged a signed notification of another event; not stored")
        }
        StoreFailed => tracing::error!(%app, "a notification could not be stored; answered 500"),
        Malformed | TooLarge | SlowBody | MissingMsgId | MissingSignature | UnknownApp
        | BadSignature | Busy => {
            if let Some(unlogged_before) = receiver.refusals.admit() {
                let reason = match answer {
                    Answer::Malformed(malformed) => malformed.to_string(),
                    _ => String::new(),
                };
                tracing::warn!(
                    outcome = outcome.metric_label(),
                    %app,
                    %peer,
                    reason,
                    unlogged_before,
                    "refused a webhook request (body and client key never logged)"
                );
            }
        }
    }
}

async fn handle(
    receiver: &WebhookReceiver,
    headers: &HeaderMap,
    body: Body,
) -> (NotificationOutcome, Answer) {
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > receiver.max_body_bytes as u64) {
        return (NotificationOutcome::TooLarge, Answer::Empty);
    }
    let body: Bytes = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, receiver.max_body_bytes),
    )
    .await
    {
        Ok(Ok(body)) => body,
        // Over the bound while streaming (chunked); a broken connection hears nothing anyway.
        Ok(Err(_)) => return (NotificationOutcome::TooLarge, Answer::Empty),
        Err(_) => return (NotificationOutcome::SlowBody, Answer::Empty),
    };
    let envelope = match notification::read_envelope(&body) {
        Ok(envelope) => envelope,
        Err(malformed) => return (NotificationOutcome::Malformed, Answer::Malformed(malformed)),
    };
    if envelope.event == URL_CHECK_EVENT {
        return match notification::url_check_challenge(&envelope) {
            Ok(challenge) => (NotificationOutcome::UrlCheck, Answer::Challenge(challenge)),
            Err(malformed) => (NotificationOutcome::Malformed, Answer::Malformed(malformed)),
        };
    }
    let Some(signature) = headers.get(notification::SIGNATURE_HEADER) else {
        return (NotificationOutcome::MissingSignature, Answer::Empty);
    };
    let Ok(client_key) = ClientKey::parse(&envelope.client_key) else {
        return (NotificationOutcome::UnknownApp, Answer::Empty);
    };
    let Some(secret) = (receiver.secrets)(&client_key) else {
        return (NotificationOutcome::UnknownApp, Answer::ForApp(client_key));
    };
    if !notification::signature_matches(&secret, &body, signature.as_bytes()) {
        return (
            NotificationOutcome::BadSignature,
            Answer::ForApp(client_key),
        );
    }
    let Some(msg_id) = notification::usable_msg_id(
        headers
            .get(notification::MSG_ID_HEADER)
            .map(|value| value.as_bytes()),
    ) else {
        return (
            NotificationOutcome::MissingMsgId,
            Answer::ForApp(client_key),
        );
    };
    if envelope.event != REFUND_REQUEST_EVENT {
        return (NotificationOutcome::OtherEvent, Answer::ForApp(client_key));
    }
    let content = match notification::decode_refund_request(&envelope.content) {
        Ok(content) => content,
        Err(malformed) => return (NotificationOutcome::Malformed, Answer::Malformed(malformed)),
    };
    // Both hold after decoding (serde_json reads only UTF-8; the content's
    // account_id was checked), but a sender must never reach a panic.
    let (Ok(account_id), Ok(raw_json)) = (
        AccountId::parse(&content.account_id),
        String::from_utf8(body.to_vec()),
    ) else {
        return (
            NotificationOutcome::Malformed,
            Answer::Malformed(Malformed("not UTF-8 or no account_id".to_owned())),
        );
    };
    let appended = receiver
        .events
        .append(NewAfterSaleEvent {
            client_key: client_key.clone(),
            msg_id,
            event: envelope.event,
            account_id,
            raw_json,
        })
        .await;
    match appended {
        Ok(Appended::Stored { sequence }) => (
            NotificationOutcome::Stored,
            Answer::StoredAs(client_key, sequence),
        ),
        Ok(Appended::Duplicate) => (NotificationOutcome::Duplicate, Answer::ForApp(client_key)),
        Err(_) => (NotificationOutcome::StoreFailed, Answer::ForApp(client_key)),
    }
}
