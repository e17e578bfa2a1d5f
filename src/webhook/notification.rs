//! What Douyin posts to the webhook (生活服务消息推送, 抖音码退款申请通知):
//! the headers, the signature (hex SHA-1 of the app's client secret followed
//! by the raw body), the envelope, and the refund request's `content`, a JSON
//! *string* holding an object, decoded straight into `AfterSaleEvent`.

use serde::Deserialize;
use serde_json::Value;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::domain::{AccountId, ClientSecret};
use crate::proto::douyin::goodlife::v1::AfterSaleEvent;

/// Douyin's id of a push; the same for the same entity and action, so repeats
/// are recognised by it.
pub const MSG_ID_HEADER: &str = "msg-id";
pub const SIGNATURE_HEADER: &str = "x-douyin-signature";
/// The event of a refund request after verification (抖音码退款申请通知).
pub const REFUND_REQUEST_EVENT: &str = "life_hermes_akte_after_sale_audit";
/// The console's check of a new callback URL: unsigned (`client_key` is
/// empty), answered by echoing `content.challenge`.
pub const URL_CHECK_EVENT: &str = "verify_webhook";
/// Longest Msg-Id kept; Douyin's are short ids.
pub(crate) const MAX_MSG_ID_LENGTH: usize = 128;

/// Why a body is not a notification the daemon can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Malformed(pub(crate) String);

/// The envelope every push shares.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) event: String,
    #[serde(default)]
    pub(crate) client_key: String,
    /// A JSON string for notifications; an object or a string in the URL check.
    #[serde(default)]
    pub(crate) content: Value,
}

/// What went wrong in a JSON text, without quoting it: serde's messages can
/// hold pieces of the body, which must not reach the log.
fn where_json_failed(error: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {}, column {}",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// Reads the envelope: a JSON object with a string `event` and `client_key`.
pub(crate) fn read_envelope(body: &[u8]) -> Result<Envelope, Malformed> {
    serde_json::from_slice::<Envelope>(body).map_err(|error| {
        Malformed(format!(
            "not a notification envelope ({})",
            where_json_failed(&error)
        ))
    })
}

/// The URL check's challenge, whether its content is an object or a JSON
/// string (Douyin's pages show both).
pub(crate) fn url_check_challenge(envelope: &Envelope) -> Result<Value, Malformed> {
    let content = match &envelope.content {
        Value::String(text) => serde_json::from_str(text).map_err(|error| {
            Malformed(format!(
                "content is not JSON ({})",
                where_json_failed(&error)
            ))
        })?,
        other => other.clone(),
    };
    content
        .get("challenge")
        .filter(|challenge| challenge.is_number() || challenge.is_string())
        .cloned()
        .ok_or_else(|| Malformed("a verify_webhook without content.challenge".to_owned()))
}

/// The signature Douyin sends for `body`: lowercase hex SHA-1 of the secret
/// followed by the raw body bytes.
fn expected_signature(secret: &ClientSecret, body: &[u8]) -> [u8; 40] {
    let mut hasher = Sha1::new();
    hasher.update(secret.expose().as_bytes());
    hasher.update(body);
    let mut hex_digits = [0u8; 40];
    hex::encode_to_slice(hasher.finalize(), &mut hex_digits)
        .expect("a SHA-1 digest is 20 bytes, 40 hex digits");
    hex_digits
}

/// Whether `presented` (the header, hex in either case) signs `body` with
/// `secret`. Compared in constant time over the raw bytes as received.
pub(crate) fn signature_matches(secret: &ClientSecret, body: &[u8], presented: &[u8]) -> bool {
    let presented = presented.to_ascii_lowercase();
    bool::from(
        expected_signature(secret, body)
            .as_slice()
            .ct_eq(&presented),
    )
}

/// A usable Msg-Id: present, bounded, printable ASCII.
pub(crate) fn usable_msg_id(header: Option<&[u8]>) -> Option<String> {
    let text = std::str::from_utf8(header?).ok()?.trim();
    let usable = !text.is_empty()
        && text.len() <= MAX_MSG_ID_LENGTH
        && text.bytes().all(|byte| byte.is_ascii_graphic());
    usable.then(|| text.to_owned())
}

/// Decodes a refund request's `content`: a JSON string holding an object with
/// the documented fields (integers as integers, `apply_reason` an object);
/// `account_id` and `order_id` are required. Unknown fields are ignored, as
/// Douyin adds fields. Only the content fields of the event are filled.
pub(crate) fn decode_refund_request(content: &Value) -> Result<AfterSaleEvent, Malformed> {
    let Value::String(text) = content else {
        return Err(Malformed(
            "content must be a JSON string holding the refund request".to_owned(),
        ));
    };
    let object: Value = serde_json::from_str(text).map_err(|error| {
        Malformed(format!(
            "content is not JSON ({})",
            where_json_failed(&error)
        ))
    })?;
    if !object.is_object() {
        return Err(Malformed("content must hold a JSON object".to_owned()));
    }
    let decoded = AfterSaleEvent::deserialize(&object).map_err(|error| {
        Malformed(format!(
            "content does not match the documented fields ({:?} error)",
            error.classify()
        ))
    })?;
    let content_only = AfterSaleEvent {
        account_id: decoded.account_id,
        order_id: decoded.order_id,
        certificate_id: decoded.certificate_id,
        refund_amount: decoded.refund_amount,
        refund_time: decoded.refund_time,
        apply_reason: decoded.apply_reason,
        ..AfterSaleEvent::default()
    };
    AccountId::parse(&content_only.account_id)
        .map_err(|_| Malformed("content.account_id is not a usable account id".to_owned()))?;
    if content_only.order_id.is_empty() {
        return Err(Malformed("content.order_id is empty".to_owned()));
    }
    Ok(content_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClientSecret {
        ClientSecret::parse("test-secret-0001").unwrap()
    }

    #[test]
    fn the_signature_is_sha1_of_the_secret_then_the_raw_body() {
        // Computed apart from this code: sha1(b"test-secret-0001" + body).
        let body =
            br#"{"event":"verify_webhook","client_key":"abc","content":{"challenge":12345}}"#;
        let expected = "e90bc2230d450e9321e5b3aeccf51d330b0bef28";
        assert_eq!(&expected_signature(&secret(), body), expected.as_bytes());
        assert!(signature_matches(&secret(), body, expected.as_bytes()));
        assert!(signature_matches(
            &secret(),
            body,
            expected.to_uppercase().as_bytes()
        ));
        assert!(!signature_matches(
            &secret(),
            body,
            &expected.as_bytes()[..39]
        ));
        assert!(!signature_matches(
            &secret(),
            &body[1..],
            expected.as_bytes()
        ));
        assert!(!signature_matches(
            &ClientSecret::parse("other").unwrap(),
            body,
            expected.as_bytes()
        ));
    }

    #[test]
    fn the_documented_content_decodes_and_anything_else_is_malformed() {
        let content = Value::String(
            r#"{"account_id":"7100000000000000001","order_id":"o-1","certificate_id":"c-1",
                "refund_amount":1990,"refund_time":1767225600,"new_field":true,
                "apply_reason":{"code":[102,103],"reason_items":[{"code":102,"msg":"没看清"}],"additional_msg":"x"}}"#
                .to_owned(),
        );
        let event = decode_refund_request(&content).unwrap();
        assert_eq!(event.account_id, "7100000000000000001");
        assert_eq!(event.refund_amount, 1990);
        let reason = event.apply_reason.unwrap();
        assert_eq!(reason.code, [102, 103]);
        assert_eq!(reason.reason_items[0].msg, "没看清");
        let malformed = [
            Value::Null,
            serde_json::json!({"account_id": "1", "order_id": "o"}),
            Value::String("[1,2]".to_owned()),
            Value::String("{not json".to_owned()),
            Value::String(r#"{"account_id":"1","order_id":"o","refund_amount":"12"}"#.to_owned()),
            Value::String(r#"{"account_id":"1","order_id":"o","refund_amount":1.5}"#.to_owned()),
            Value::String(r#"{"account_id":"1","order_id":"o","apply_reason":[[1]]}"#.to_owned()),
            Value::String(r#"{"order_id":"o"}"#.to_owned()),
            Value::String(r#"{"account_id":"1"}"#.to_owned()),
        ];
        for content in malformed {
            assert!(decode_refund_request(&content).is_err(), "{content}");
        }
    }

    #[test]
    fn the_url_check_echoes_its_challenge_in_either_form() {
        for body in [
            r#"{"event":"verify_webhook","client_key":"","content":{"challenge":12345}}"#,
            r#"{"event":"verify_webhook","client_key":"","content":"{\"challenge\":12345}"}"#,
        ] {
            let envelope = read_envelope(body.as_bytes()).unwrap();
            assert_eq!(url_check_challenge(&envelope).unwrap(), 12345);
        }
        assert!(read_envelope(b"[]").is_err());
        assert!(read_envelope(br#"{"client_key":"a"}"#).is_err());
    }

    #[test]
    fn msg_ids_are_bounded_printable_text() {
        assert_eq!(usable_msg_id(Some(b"abc-1")), Some("abc-1".to_owned()));
        assert_eq!(usable_msg_id(None), None);
        assert_eq!(usable_msg_id(Some(b"")), None);
        assert_eq!(usable_msg_id(Some(b"a b")), None);
        assert_eq!(usable_msg_id(Some(&[b'x'; 129])), None);
    }
}
