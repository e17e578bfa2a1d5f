//! `POST /oauth/client_token/`: fetches an app's client_token and classifies
//! every way that can fail.

use std::time::Duration;

use serde::Deserialize;

use super::{
    DouyinClient, TransportError, codes, describe_unparseable, read_answer, transport_error,
};
use crate::domain::{AccessToken, ClientKey, ClientSecret};

/// A token as Douyin handed it out.
#[derive(Debug, Clone)]
pub(crate) struct FetchedToken {
    pub(crate) access_token: AccessToken,
    pub(crate) expires_in: Duration,
}

/// Why no token came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenFetchError {
    /// Douyin refused with an error code inside the HTTP 200 body.
    #[error("Douyin's token endpoint refused with error {code}{}{}", describe(.description), super::logid_suffix(.logid))]
    Refused {
        code: i64,
        description: String,
        logid: String,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// `stable_client_token` keeps answering the token that just expired by
    /// our count (Douyin's expiry came a moment later): asked again shortly.
    #[error("stable_client_token keeps answering the token that just expired")]
    StaleRepeat,
}

fn describe(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(" ({description})")
    }
}

impl TokenFetchError {
    /// Why the fetch failed, as the `cause` label of `token_fetch_failures_total`.
    pub(crate) fn cause_label(&self) -> &'static str {
        match self {
            Self::Refused { .. } if self.is_permanent() => "credentials_refused",
            Self::Refused { .. } if self.is_rate_limited() => "rate_limited",
            Self::Refused { .. } => "refused",
            Self::Transport(transport) => transport.cause_label(),
            Self::StaleRepeat => "stale_repeat",
        }
    }

    /// Permanent failures (bad key or secret) must not be retried on a timer.
    pub(crate) fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused { code, .. } if codes::token_code_is_permanent(*code))
    }

    /// Douyin said we fetch too often (10020): the budget must slow down.
    pub(crate) fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Refused { code, .. } if codes::token_code_is_rate_limited(*code))
    }
}

#[derive(Debug, Deserialize)]
struct TokenEnvelope {
    data: Option<TokenData>,
    /// The newer open-API gateway's envelope: `{"err_no", "err_msg", "log_id"}`.
    #[serde(default)]
    err_no: Option<i64>,
    #[serde(default)]
    err_msg: Option<String>,
    #[serde(default)]
    log_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenData {
    access_token: Option<String>,
    description: Option<String>,
    error_code: Option<i64>,
    expires_in: Option<ExpiresIn>,
}

/// Douyin documents a number; sibling endpoints send a numeric string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Seconds(u64),
    Text(String),
}

/// No real token lives longer than a day; a bigger value is a garbled answer.
const LONGEST_PLAUSIBLE_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The `endpoint` label of token endpoint calls (`client_token` and
/// `stable_client_token` alike: one budget, one series).
const ENDPOINT_LABEL: &str = "client_token";

impl DouyinClient {
    /// One call to the token endpoint, counted by the code Douyin answered.
    pub(crate) async fn fetch_client_token(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
    ) -> Result<FetchedToken, TokenFetchError> {
        let fetched = self.request_client_token(client_key, client_secret).await;
        let code_label = match &fetched {
            Ok(_) => codes::metric_label(0),
            Err(TokenFetchError::Refused { code, .. }) => codes::metric_label(*code),
            Err(TokenFetchError::Transport(_)) => super::TRANSPORT_CODE_LABEL.into(),
            // Only the token manager concludes this, from successful answers.
            Err(TokenFetchError::StaleRepeat) => codes::metric_label(0),
        };
        self.metrics
            .record_upstream_call(ENDPOINT_LABEL, code_label);
        fetched
    }

    async fn request_client_token(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
    ) -> Result<FetchedToken, TokenFetchError> {
        let timeout = self.timeout_within(None);
        let body = serde_json::json!({
            "client_key": client_key.expose(),
            "client_secret": client_secret.expose(),
            "grant_type": "client_credential",
        });
        let response = self
            .http
            .post(self.url(self.token_endpoint.path()))
            .timeout(timeout)
            .json(&body)
            .send()
            .await
            .map_err(|error| transport_error(&error, timeout))?;
        read_answer(response, timeout, |status, body, content_type, logid| {
            parse_token_answer(status, body, content_type, logid)
        })
        .await
    }
}

/// Decodes the token endpoint's answer; public within the crate for tests.
pub(crate) fn parse_token_answer(
    status: u16,
    body: &[u8],
    content_type: &str,
    logid: String,
) -> Result<FetchedToken, TokenFetchError> {
    let envelope: TokenEnvelope = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        Err(_) if status != 200 => {
            return Err(TransportError::HttpStatus { status, logid }.into());
        }
        Err(error) => {
            return Err(TransportError::MalformedBody {
                detail: describe_unparseable(body, content_type, &error),
                logid,
            }
            .into());
        }
    };
    if let Some(code) = envelope.err_no.filter(|code| *code != 0) {
        return Err(TokenFetchError::Refused {
            code,
            description: envelope.err_msg.unwrap_or_default(),
            logid: envelope.log_id.filter(|id| !id.is_empty()).unwrap_or(logid),
        });
    }
    let data = envelope.data.unwrap_or_default();
    let error_code = data.error_code.unwrap_or(0);
    if error_code != 0 {
        return Err(TokenFetchError::Refused {
            code: error_code,
            description: data.description.unwrap_or_default(),
            logid,
        });
    }
    if status != 200 {
        return Err(TransportError::HttpStatus { status, logid }.into());
    }
    let malformed = |detail: &str| TransportError::MalformedBody {
        detail: detail.to_owned(),
        logid: logid.clone(),
    };
    let access_token = data
        .access_token
        .filter(|token| !token.is_empty())
        .ok_or_else(|| malformed("no access_token in a success answer"))?;
    let seconds = match data.expires_in {
        Some(ExpiresIn::Seconds(seconds)) => seconds,
        Some(ExpiresIn::Text(text)) => text
            .trim()
            .parse()
            .map_err(|_| malformed("expires_in is neither a number nor a numeric string"))?,
        None => return Err(malformed("no expires_in in a success answer").into()),
    };
    let expires_in = Duration::from_secs(seconds);
    if expires_in.is_zero() || expires_in > LONGEST_PLAUSIBLE_LIFETIME {
        return Err(malformed("expires_in is zero or longer than a day").into());
    }
    Ok(FetchedToken {
        access_token: AccessToken::new(access_token),
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Result<FetchedToken, TokenFetchError> {
        parse_token_answer(
            status,
            body.as_bytes(),
            "application/json",
            "LOG1".to_owned(),
        )
    }

    #[test]
    fn expires_in_is_accepted_as_number_and_as_string() {
        let as_number = parse(
            200,
            r#"{"data":{"access_token":"clt.a","description":"","error_code":0,"expires_in":7200},"message":"success"}"#,
        )
        .unwrap();
        assert_eq!(as_number.expires_in, Duration::from_secs(7200));
        let as_string = parse(
            200,
            r#"{"data":{"access_token":"clt.b","error_code":0,"expires_in":"3600"},"message":"success"}"#,
        )
        .unwrap();
        assert_eq!(as_string.expires_in, Duration::from_secs(3600));
        assert_eq!(as_string.access_token.expose(), "clt.b");
    }

    #[test]
    fn refusals_are_classified() {
        let bad_secret = parse(
            200,
            r#"{"data":{"error_code":10013,"description":"bad"},"message":"error"}"#,
        )
        .unwrap_err();
        assert!(bad_secret.is_permanent());
        assert!(bad_secret.to_string().contains("10013"));
        let rate_limited =
            parse(200, r#"{"data":{"error_code":10020,"description":"slow"}}"#).unwrap_err();
        assert!(!rate_limited.is_permanent());
        assert!(rate_limited.is_rate_limited());
    }

    #[test]
    fn the_newer_gateways_envelope_is_a_refusal_with_its_log_id() {
        let refused = parse(
            200,
            r#"{"err_no":28001007,"err_msg":"参数不合法","log_id":"GW1"}"#,
        )
        .unwrap_err();
        assert_eq!(
            refused,
            TokenFetchError::Refused {
                code: 28001007,
                description: "参数不合法".to_owned(),
                logid: "GW1".to_owned(),
            }
        );
        // err_no 0 without data is no token.
        assert!(matches!(
            parse(200, r#"{"err_no":0,"log_id":"GW2"}"#).unwrap_err(),
            TokenFetchError::Transport(_)
        ));
    }

    #[test]
    fn garbage_is_a_transient_malformed_body() {
        for (status, body) in [
            (200, "<html><body>502 Bad Gateway</body></html>"),
            (
                200,
                r#"{"data":{"access_token":"clt.x","error_code":0,"expires"#,
            ),
            (
                200,
                r#"{"data":{"access_token":"","error_code":0,"expires_in":7200}}"#,
            ),
            (
                200,
                r#"{"data":{"access_token":"clt.x","error_code":0,"expires_in":"soon"}}"#,
            ),
            (
                200,
                r#"{"data":{"access_token":"clt.x","error_code":0,"expires_in":0}}"#,
            ),
            (502, "<html>bad gateway</html>"),
        ] {
            let error = parse(status, body).unwrap_err();
            assert!(!error.is_permanent(), "{body}");
            assert!(
                matches!(error, TokenFetchError::Transport(_)),
                "{body}: {error:?}"
            );
        }
    }
}
