//! How one answer of a goodlife API becomes a success or a classified failure.
//! A success has the documented shape (`data` present as an object, every
//! `error_code` zero); everything else (an error code in `data` or `extra`,
//! the newer gateway's `{"err_no", "err_msg", "log_id"}` envelope, `{}`,
//! `data: null`, a non-object, a non-200 status, a body that is not JSON) is a
//! failure, never an empty answer that reads as "no records".

use serde::de::DeserializeOwned;

use super::{DouyinError, TransportError, describe_unparseable, strip_nulls};

/// Why an upstream call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupFailure {
    #[error(transparent)]
    Douyin(#[from] DouyinError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl LookupFailure {
    /// Douyin's logid of the failed answer, or "" when there was none.
    pub(crate) fn logid(&self) -> &str {
        match self {
            Self::Douyin(error) => &error.logid,
            Self::Transport(
                TransportError::HttpStatus { logid, .. }
                | TransportError::MalformedBody { logid, .. },
            ) => logid,
            Self::Transport(_) => "",
        }
    }
}

/// A goodlife response message mirrored from Douyin's JSON: what the strict
/// success check needs to see of it.
pub(crate) trait GoodlifeResponse: DeserializeOwned {
    /// True when the answer carried a `data` object.
    fn has_data(&self) -> bool;
    /// `data.error_code` and `extra.error_code` (0 when absent).
    fn error_codes(&self) -> (i64, i64);
}

/// Implements [`GoodlifeResponse`] for a mirrored response message with
/// optional `data` and `extra` messages that both carry `error_code`.
macro_rules! goodlife_response {
    ($response:ty) => {
        impl $crate::douyin::envelope::GoodlifeResponse for $response {
            fn has_data(&self) -> bool {
                self.data.is_some()
            }

            fn error_codes(&self) -> (i64, i64) {
                (
                    self.data.as_ref().map_or(0, |data| data.error_code),
                    self.extra.as_ref().map_or(0, |extra| extra.error_code),
                )
            }
        }
    };
}
pub(crate) use goodlife_response;

/// A successful answer: the decoded response and the body it came from.
#[derive(Debug, Clone)]
pub struct Decoded<T> {
    pub response: T,
    /// The body as received, shared with the HTTP client's buffer: most
    /// callers never ask for it, so it is turned into text only on demand.
    raw_body: bytes::Bytes,
}

impl<T> Decoded<T> {
    /// The body Douyin sent, as text (it decoded as JSON, so it is UTF-8).
    pub(crate) fn raw_json(&self) -> String {
        String::from_utf8_lossy(&self.raw_body).into_owned()
    }
}

/// Decodes one answer. Error codes are read from the newer gateway's `err_no`,
/// then `data`, then `extra`, as Douyin documents.
pub(crate) fn decode_goodlife_answer<T: GoodlifeResponse>(
    status: u16,
    body: &bytes::Bytes,
    content_type: &str,
    header_logid: String,
) -> Result<Decoded<T>, LookupFailure> {
    // The common case, a well-formed success, decodes straight into the
    // messages, skipping the `Value` tree, the null stripping and the
    // conversion (the documented example: 9.1 µs → 4.1 µs, benches/hot_paths.rs).
    // Anything else takes the general path below, which decides field by field.
    if status == 200
        && body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(response) = serde_json::from_slice::<T>(body)
        && response.has_data()
        && response.error_codes() == (0, 0)
        // The newer gateway's envelope has no `data`; but a body carrying both
        // `data` and a non-zero `err_no` must still be judged in full.
        && !contains_err_no(body)
    {
        return Ok(Decoded {
            response,
            raw_body: body.clone(),
        });
    }
    decode_in_general(status, body, content_type, header_logid)
}

/// A cheap check for the `err_no` key, so the fast path stays fast.
fn contains_err_no(body: &[u8]) -> bool {
    body.windows(8).any(|window| window == b"\"err_no\"")
}

/// Decodes any answer through a `Value`, so nulls, stray types and error
/// envelopes are judged field by field.
pub(super) fn decode_in_general<T: GoodlifeResponse>(
    status: u16,
    body: &bytes::Bytes,
    content_type: &str,
    header_logid: String,
) -> Result<Decoded<T>, LookupFailure> {
    let mut document: serde_json::Value = match serde_json::from_slice(body) {
        Ok(document) => document,
        Err(_) if status != 200 => {
            return Err(TransportError::HttpStatus {
                status,
                logid: header_logid,
            }
            .into());
        }
        Err(error) => {
            return Err(TransportError::MalformedBody {
                detail: describe_unparseable(body, content_type, &error),
                logid: header_logid,
            }
            .into());
        }
    };
    strip_nulls(&mut document);
    if !document.is_object() {
        let detail = if status == 200 {
            "the body is JSON but not an object"
        } else {
            "the error body is JSON but not an object"
        };
        return Err(TransportError::MalformedBody {
            detail: detail.to_owned(),
            logid: header_logid,
        }
        .into());
    }
    if let Some(error) = error_in(&document, &header_logid) {
        return Err(error.into());
    }
    let logid = logid_in(&document).unwrap_or(header_logid);
    if status != 200 {
        return Err(TransportError::HttpStatus { status, logid }.into());
    }
    if !document
        .get("data")
        .is_some_and(serde_json::Value::is_object)
    {
        let detail = if document.get("data").is_some() {
            "the answer's data is not an object"
        } else {
            "the answer has no data and no error code"
        };
        return Err(TransportError::MalformedBody {
            detail: detail.to_owned(),
            logid,
        }
        .into());
    }
    let response: T =
        serde_json::from_value(document).map_err(|error| TransportError::MalformedBody {
            detail: format!("a field has the wrong type: {error}"),
            logid: logid.clone(),
        })?;
    Ok(Decoded {
        response,
        raw_body: body.clone(),
    })
}

/// Douyin's error in an answer, if it carries one: the newer gateway's
/// `err_no`, else `data.error_code`, else `extra.error_code`.
fn error_in(document: &serde_json::Value, header_logid: &str) -> Option<DouyinError> {
    let integer_at = |pointer: &str| {
        document
            .pointer(pointer)
            .and_then(serde_json::Value::as_i64)
    };
    let text_at = |pointer: &str| {
        document
            .pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let logid = logid_in(document).unwrap_or_else(|| header_logid.to_owned());
    let gateway_code = integer_at("/err_no").unwrap_or(0);
    if gateway_code != 0 {
        return Some(DouyinError {
            code: gateway_code,
            description: text_at("/err_msg"),
            sub_code: 0,
            sub_description: String::new(),
            logid,
        });
    }
    let data_code = integer_at("/data/error_code").unwrap_or(0);
    let extra_code = integer_at("/extra/error_code").unwrap_or(0);
    if data_code == 0 && extra_code == 0 {
        return None;
    }
    let (code, description) = if data_code != 0 {
        (data_code, text_at("/data/description"))
    } else {
        (extra_code, text_at("/extra/description"))
    };
    let description = if description.is_empty() {
        text_at("/extra/description")
    } else {
        description
    };
    Some(DouyinError {
        code,
        description,
        sub_code: integer_at("/extra/sub_error_code").unwrap_or(0),
        sub_description: text_at("/extra/sub_description"),
        logid,
    })
}

/// The logid an answer names: `extra.logid`, or the newer gateway's `log_id`.
fn logid_in(document: &serde_json::Value) -> Option<String> {
    ["/extra/logid", "/log_id"]
        .iter()
        .filter_map(|pointer| document.pointer(pointer)?.as_str())
        .find(|logid| !logid.is_empty())
        .map(str::to_owned)
}
