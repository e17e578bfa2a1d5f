//! The sandbox as Douyin's pushing side of the webhook: builds refund-request
//! notifications the way 抖音码退款申请通知 documents them (`content` a JSON
//! string) and posts them to a daemon, signed with the app's secret as Douyin
//! signs (hex SHA-1 of the secret followed by the body), or, for tests,
//! signed wrongly or not at all. The signature is computed here on its own,
//! not with the daemon's code, so a mistake there cannot hide.

use sha1::{Digest, Sha1};

/// The content of one refund request (the documented fields).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RefundRequestContent {
    pub account_id: String,
    pub order_id: String,
    pub certificate_id: String,
    pub refund_amount: i64,
    pub refund_time: i64,
    pub apply_reason: ApplyReasonContent,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyReasonContent {
    pub code: Vec<i64>,
    pub reason_items: Vec<ReasonItemContent>,
    pub additional_msg: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReasonItemContent {
    pub code: i64,
    pub msg: String,
}

impl RefundRequestContent {
    /// A plausible request for `order_id` of `account_id`.
    pub fn example(account_id: &str, order_id: &str) -> Self {
        Self {
            account_id: account_id.to_owned(),
            order_id: order_id.to_owned(),
            certificate_id: format!("{order_id}-c1"),
            refund_amount: 1990,
            refund_time: 1_767_225_600,
            apply_reason: ApplyReasonContent {
                code: vec![102],
                reason_items: vec![ReasonItemContent {
                    code: 102,
                    msg: "没看清使用规则,要用时才发现有限制".to_owned(),
                }],
                additional_msg: String::new(),
            },
        }
    }
}

/// How a notification is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// As Douyin signs: with the app's secret.
    Correct,
    /// With a secret that is not the app's.
    WrongSecret,
    /// No `X-Douyin-Signature` header.
    Missing,
}

/// The body Douyin posts for `content`, for the app `client_key`.
pub fn refund_request_body(client_key: &str, content: &RefundRequestContent) -> String {
    serde_json::json!({
        "event": "life_hermes_akte_after_sale_audit",
        "client_key": client_key,
        "from_user_id": "",
        "to_user_id": "",
        "content": serde_json::to_string(content).expect("the content serializes"),
    })
    .to_string()
}

/// Douyin's signature of `body`: lowercase hex SHA-1 of the secret, then the body.
pub fn douyin_signature(client_secret: &str, body: &[u8]) -> String {
    let mut hasher = Sha1::new();
    hasher.update(client_secret.as_bytes());
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Posts notifications to one daemon's webhook URL.
#[derive(Clone)]
pub struct NotificationSender {
    http: reqwest::Client,
    url: String,
}

impl NotificationSender {
    /// `url`: the webhook's full URL (`http://127.0.0.1:8443/douyin/webhook`).
    pub fn new(url: impl Into<String>) -> Self {
        Self::trusting(url, None)
    }

    /// Like `new`, trusting this CA (PEM) for an https webhook.
    pub fn trusting(url: impl Into<String>, ca_pem: Option<&[u8]>) -> Self {
        crate::douyin::install_tls_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .pool_max_idle_per_host(256);
        if let Some(ca_pem) = ca_pem {
            builder = builder.add_root_certificate(
                reqwest::Certificate::from_pem(ca_pem).expect("the test CA is PEM"),
            );
        }
        Self {
            http: builder.build().expect("the sender's HTTP client builds"),
            url: url.into(),
        }
    }

    /// Posts a refund request for `client_key`, signed as `signing` says;
    /// returns the HTTP status the daemon answered.
    pub async fn send_refund_request(
        &self,
        client_key: &str,
        client_secret: &str,
        msg_id: &str,
        content: &RefundRequestContent,
        signing: Signing,
    ) -> reqwest::Result<u16> {
        let body = refund_request_body(client_key, content);
        let signature = match signing {
            Signing::Correct => Some(douyin_signature(client_secret, body.as_bytes())),
            Signing::WrongSecret => Some(douyin_signature(
                &format!("not-{client_secret}"),
                body.as_bytes(),
            )),
            Signing::Missing => None,
        };
        let mut headers = vec![("Msg-Id", msg_id.to_owned())];
        if let Some(signature) = signature {
            headers.push(("X-Douyin-Signature", signature));
        }
        self.post(&headers, body.into_bytes())
            .await
            .map(|(status, _)| status)
    }

    /// Posts `body` with `headers` (and `Content-Type: application/json`) as
    /// given; returns the status and the answer's body.
    pub async fn post(
        &self,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> reqwest::Result<(u16, String)> {
        let mut request = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }
}
