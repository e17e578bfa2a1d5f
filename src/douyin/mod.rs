//! The HTTP client of Douyin's open platform: the only module that knows
//! upstream URLs, JSON shapes and how a response turns into a result or an error.

pub mod after_sale;
pub mod after_sale_audit;
pub mod after_sale_list;
pub mod codes;
pub mod envelope;
pub(crate) mod token_endpoint;

use std::time::Duration;

use crate::config::{DouyinConfig, TokenEndpoint};
use crate::domain::AccessToken;
use crate::metrics::Metrics;

pub use codes::{CodeClass, DouyinError};
use envelope::{Decoded, GoodlifeResponse, LookupFailure, decode_goodlife_answer};

/// A failure to get a well-formed answer from Douyin at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("Douyin did not answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("cannot reach Douyin: {detail}")]
    Connect { detail: String },
    #[error("Douyin answered HTTP {status}{}", logid_suffix(.logid))]
    HttpStatus { status: u16, logid: String },
    #[error("Douyin answered a body that is not the expected JSON ({detail}){}", logid_suffix(.logid))]
    MalformedBody { detail: String, logid: String },
}

impl TransportError {
    /// Why no usable answer came, as the `cause` label of failed token fetches.
    pub(crate) fn cause_label(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Connect { .. } => "connect",
            Self::HttpStatus { .. } => "http_status",
            Self::MalformedBody { .. } => "malformed_body",
        }
    }
}

/// The `code` label of an upstream call that got no usable answer.
const TRANSPORT_CODE_LABEL: &str = "transport";

fn logid_suffix(logid: &str) -> String {
    if logid.is_empty() {
        String::new()
    } else {
        format!(", logid {logid}")
    }
}

/// Talks to one Douyin base URL (the real one, or the sandbox in tests and the demo).
#[derive(Clone)]
pub struct DouyinClient {
    http: reqwest::Client,
    /// Parsed once: parsing a URL string on every call (with its IDNA pass)
    /// was a visible share of a lookup's CPU.
    base_url: reqwest::Url,
    token_endpoint: TokenEndpoint,
    request_timeout: Duration,
    /// Every HTTP call to Douyin is counted by endpoint and answered code.
    metrics: Metrics,
}

impl DouyinClient {
    pub fn new(config: &DouyinConfig, metrics: Metrics) -> anyhow::Result<Self> {
        install_tls_provider();
        let base_url = reqwest::Url::parse(config.base_url.trim_end_matches('/'))
            .map_err(|error| anyhow::anyhow!("douyin.base_url is not a URL: {error}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("douyin-tokend/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url,
            token_endpoint: config.token_endpoint,
            request_timeout: config.request_timeout,
            metrics,
        })
    }

    /// True when tokens come from `stable_client_token`.
    pub(crate) fn uses_stable_tokens(&self) -> bool {
        self.token_endpoint == TokenEndpoint::StableClientToken
    }

    /// `path` under the base URL (which may itself have a path, as a proxy's
    /// prefix); only the path is parsed.
    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base_url.clone();
        let full_path = format!("{}{path}", self.base_url.path().trim_end_matches('/'));
        url.set_path(&full_path);
        url
    }

    /// The HTTP timeout of one request: the configured one, shortened to the
    /// caller's remaining deadline when there is one.
    fn timeout_within(&self, deadline: Option<Duration>) -> Duration {
        match deadline {
            Some(remaining) => remaining.min(self.request_timeout),
            None => self.request_timeout,
        }
    }
}

/// Why a goodlife call produced no answer, and whether its request may have
/// reached Douyin (what a write must know before it may be sent again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallFailure {
    pub(crate) failure: LookupFailure,
    /// False only when the connection failed before the request was written:
    /// Douyin provably never saw it. A timeout, a broken connection or any
    /// answer at all means it may have.
    pub(crate) may_have_reached_douyin: bool,
}

impl DouyinClient {
    /// A goodlife GET with the app's token and these query parameters.
    fn goodlife_get<Parameters: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        access_token: &AccessToken,
        parameters: &Parameters,
    ) -> reqwest::RequestBuilder {
        self.http
            .get(self.url(path))
            .header("access-token", access_token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .query(parameters)
    }

    /// Sends one goodlife request, decodes the answer strictly (see
    /// `envelope`) and counts the call under `endpoint_label`. `deadline` (the
    /// caller's remaining time) bounds the timeout.
    async fn call_goodlife<T: GoodlifeResponse>(
        &self,
        request: reqwest::RequestBuilder,
        deadline: Option<Duration>,
        endpoint_label: &'static str,
    ) -> Result<Decoded<T>, CallFailure> {
        let timeout = self.timeout_within(deadline);
        let answer = self.send_goodlife(request, timeout).await;
        let code_label = match &answer {
            Ok(_) => codes::metric_label(0),
            Err(CallFailure {
                failure: LookupFailure::Douyin(error),
                ..
            }) => codes::metric_label(error.code),
            Err(_) => TRANSPORT_CODE_LABEL.into(),
        };
        self.metrics
            .record_upstream_call(endpoint_label, code_label);
        answer
    }

    async fn send_goodlife<T: GoodlifeResponse>(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Decoded<T>, CallFailure> {
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|error| CallFailure {
                failure: transport_error(&error, timeout).into(),
                // reqwest marks as "connect" only failures to establish the
                // connection, before anything was written to it.
                may_have_reached_douyin: !error.is_connect(),
            })?;
        read_answer(response, timeout, decode_goodlife_answer)
            .await
            .map_err(|failure| CallFailure {
                failure,
                may_have_reached_douyin: true,
            })
    }
}

/// reqwest is built without a default crypto provider (ring builds faster than
/// aws-lc); install ring once per process before the first client is built.
pub(crate) fn install_tls_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // An error means another provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Douyin's log id for an answer, from the `X-Tt-Logid` header.
/// Reads an HTTP answer whole and hands `decode` its status, body, content
/// type and `x-tt-logid`: the one reader for both endpoints.
async fn read_answer<T, E: From<TransportError>>(
    response: reqwest::Response,
    timeout: Duration,
    decode: impl FnOnce(u16, &bytes::Bytes, &str, String) -> Result<T, E>,
) -> Result<T, E> {
    let status = response.status().as_u16();
    let logid = logid_header(&response);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .bytes()
        .await
        .map_err(|error| transport_error(&error, timeout))?;
    decode(status, &body, &content_type, logid)
}

fn logid_header(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-tt-logid")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Turns a reqwest failure into a transport error that names no URL (the
/// query string carries merchant ids, and nothing here should echo requests).
fn transport_error(error: &reqwest::Error, timeout: Duration) -> TransportError {
    if error.is_timeout() {
        TransportError::Timeout {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }
    } else if error.is_connect() {
        TransportError::Connect {
            detail: "connection refused or failed".to_owned(),
        }
    } else if error.is_body() || error.is_decode() {
        TransportError::MalformedBody {
            detail: "the connection broke while the body was read".to_owned(),
            logid: String::new(),
        }
    } else {
        TransportError::Connect {
            detail: "the connection broke before a complete answer arrived".to_owned(),
        }
    }
}

/// Describes a body that is not JSON without quoting much of it.
fn describe_unparseable(body: &[u8], content_type: &str, error: &serde_json::Error) -> String {
    let looks_like_html = body
        .iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|first| *first == b'<');
    if looks_like_html {
        format!("an HTML page of {} bytes", body.len())
    } else if body.is_empty() {
        "an empty body".to_owned()
    } else {
        format!(
            "{} bytes of {} that do not parse: {error}",
            body.len(),
            if content_type.is_empty() {
                "unknown content"
            } else {
                content_type
            }
        )
    }
}

/// Removes `null` members so that absent and null fields both take their
/// defaults when decoded into the mirrored proto messages.
fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(members) => {
            members.retain(|_, member| !member.is_null());
            members.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}
