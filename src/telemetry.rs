//! Logs: the tracing subscriber (human lines by default, JSON with
//! `--log-format json`) and the span every RPC runs in, which carries a request
//! id, the merchant, the app (its client key) and Douyin's logid once they
//! are known, so every line logged while serving a call can be traced to it.

use std::io::IsTerminal;

use tracing::Span;
use tracing::field::{Empty, display};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::domain::{AccountId, ClientKey};

/// Longest caller-supplied request id kept; longer ones are replaced.
pub(crate) const MAX_REQUEST_ID_LENGTH: usize = 64;

/// Installs the process-wide subscriber writing to stderr (journald under
/// systemd). `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a terminal: journald and log files would keep the
    // escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The id one call is known by, in its logs and in its response's
/// `x-request-id`. Only [`RequestId::for_call`] makes one, so every id in use
/// has passed `is_usable_request_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestId(String);

impl RequestId {
    /// The caller's `x-request-id` when it sent a usable one (so its own logs
    /// and ours can be joined), else a fresh one.
    pub(crate) fn for_call(caller_request_id: Option<&str>) -> Self {
        let id = caller_request_id
            .filter(|id| is_usable_request_id(id))
            .map_or_else(new_request_id, str::to_owned);
        Self(id)
    }

    /// Printable ASCII without spaces: also a valid HTTP header value.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// The span of one RPC, keyed by its request id.
pub(crate) fn rpc_span(method: &str, request_id: &RequestId) -> Span {
    tracing::info_span!(
        "rpc",
        method,
        request_id = %request_id,
        merchant = Empty,
        app = Empty,
        logid = Empty,
    )
}

/// Notes the merchant a call is about on the current RPC span.
pub(crate) fn record_merchant(account_id: &AccountId) {
    Span::current().record("merchant", display(account_id));
}

/// Notes the app (its client key, an identifier) on the current RPC span.
pub(crate) fn record_app(client_key: &ClientKey) {
    Span::current().record("app", display(client_key));
}

/// Notes Douyin's logid of the call's upstream answer on the current RPC span.
pub(crate) fn record_logid(logid: &str) {
    if !logid.is_empty() {
        Span::current().record("logid", logid);
    }
}

/// Lets one log line through per `interval` for something a remote sender can
/// repeat at will (a refused API key, a badly signed webhook), counting the
/// lines held back, so a scanner cannot flood the journal.
pub(crate) struct LogThrottle {
    interval: std::time::Duration,
    last_logged: parking_lot::Mutex<Option<tokio::time::Instant>>,
    unlogged: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    pub(crate) fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last_logged: parking_lot::Mutex::new(None),
            unlogged: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last_logged = self.last_logged.lock();
        let now = tokio::time::Instant::now();
        if last_logged.is_some_and(|at| now.duration_since(at) < self.interval) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last_logged = Some(now);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// Printable ASCII without spaces, bounded: safe to log and to index.
fn is_usable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LENGTH
        && id.bytes().all(|byte| byte.is_ascii_graphic())
}

fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_request_ids_are_kept_only_when_printable_and_short() {
        assert!(is_usable_request_id("req-42"));
        assert!(!is_usable_request_id(""));
        assert!(!is_usable_request_id("has space"));
        assert!(!is_usable_request_id("line\nbreak"));
        assert!(!is_usable_request_id(
            &"x".repeat(MAX_REQUEST_ID_LENGTH + 1)
        ));
        assert_eq!(new_request_id().len(), 16);
    }

    #[test]
    fn a_call_keeps_a_usable_caller_request_id_and_gets_a_fresh_one_otherwise() {
        assert_eq!(RequestId::for_call(Some("req-42")).as_str(), "req-42");
        let replaced = RequestId::for_call(Some("has space"));
        assert_ne!(replaced.as_str(), "has space");
        assert_eq!(replaced.as_str().len(), 16);
        assert_eq!(RequestId::for_call(None).as_str().len(), 16);
    }
}
