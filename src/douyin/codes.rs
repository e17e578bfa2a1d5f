//! Douyin's error codes and what each one means for the daemon: retry, refresh
//! the token, blame the caller, or give up. The only place that knows the numbers.

use std::fmt;

/// What the daemon does about a non-zero `error_code` from the goodlife gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// The access token was refused (invalid or expired): compare-and-invalidate,
    /// refresh, retry the request once.
    TokenRejected,
    /// Busy, rate limited, unknown or documented as retryable: back off and retry.
    Transient,
    /// The request's parameters are wrong: the caller must change them.
    InvalidArgument,
    /// The app lacks the capability, the merchant has not authorised the app, or
    /// the platform denied access: configuration on Douyin's side must change.
    PermissionDenied,
    /// The API was taken offline.
    Offline,
    /// Any other business error: permanent, reported with its code.
    Business,
}

pub const TOKEN_INVALID: i64 = 2190002;
pub const TOKEN_EXPIRED: i64 = 2190008;
pub const TOKEN_EXPIRED_NEW_GATEWAY: i64 = 28001008;
pub const APP_LACKS_CAPABILITY: i64 = 2190004;
pub const INVALID_PARAMETER: i64 = 2119001;
pub const INVALID_PARAMETER_ALT: i64 = 2100005;
pub const SYSTEM_BUSY: i64 = 2119002;
pub const SYSTEM_BUSY_ALT: i64 = 2100004;
pub const TOO_MANY_REQUESTS: i64 = 2119003;
pub const MERCHANT_NOT_AUTHORISED: i64 = 2119005;
pub const PLATFORM_DENIED: i64 = 2119008;
pub const API_OFFLINE: i64 = 2119010;
pub const UNKNOWN_ERROR: i64 = 2100001;
pub const RETRYABLE_BUSINESS_ERROR: i64 = 3000001;

/// Token endpoint codes.
pub const TOKEN_PARAMETER_ERROR: i64 = 10002;
pub const TOKEN_UNKNOWN_CLIENT_KEY: i64 = 10003;
pub const TOKEN_BAD_CREDENTIALS: i64 = 10013;
pub const TOKEN_RATE_LIMITED: i64 = 10020;

/// Classifies a goodlife gateway code (never zero).
pub fn classify_gateway_code(code: i64) -> CodeClass {
    match code {
        TOKEN_INVALID | TOKEN_EXPIRED | TOKEN_EXPIRED_NEW_GATEWAY => CodeClass::TokenRejected,
        SYSTEM_BUSY
        | SYSTEM_BUSY_ALT
        | TOO_MANY_REQUESTS
        | UNKNOWN_ERROR
        | RETRYABLE_BUSINESS_ERROR => CodeClass::Transient,
        INVALID_PARAMETER | INVALID_PARAMETER_ALT => CodeClass::InvalidArgument,
        APP_LACKS_CAPABILITY | MERCHANT_NOT_AUTHORISED | PLATFORM_DENIED => {
            CodeClass::PermissionDenied
        }
        API_OFFLINE => CodeClass::Offline,
        _ => CodeClass::Business,
    }
}

/// True for token endpoint codes that no retry can fix: the key or secret is
/// wrong, so the daemon stops and alerts instead of hammering the endpoint.
/// Everything else (10020 rate limiting, codes we do not know) is retried with backoff.
pub fn token_code_is_permanent(code: i64) -> bool {
    matches!(
        code,
        TOKEN_PARAMETER_ERROR | TOKEN_UNKNOWN_CLIENT_KEY | TOKEN_BAD_CREDENTIALS
    )
}

/// A non-zero error code answered by Douyin, with what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DouyinError {
    pub code: i64,
    pub description: String,
    pub sub_code: i64,
    pub sub_description: String,
    pub logid: String,
}

impl DouyinError {
    pub fn class(&self) -> CodeClass {
        classify_gateway_code(self.code)
    }
}

impl fmt::Display for DouyinError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Douyin error {}", self.code)?;
        if !self.description.is_empty() {
            write!(formatter, " ({})", self.description)?;
        }
        if self.sub_code != 0 {
            write!(formatter, ", sub code {}", self.sub_code)?;
            if !self.sub_description.is_empty() {
                write!(formatter, " ({})", self.sub_description)?;
            }
        }
        if !self.logid.is_empty() {
            write!(formatter, ", logid {}", self.logid)?;
        }
        Ok(())
    }
}

impl std::error::Error for DouyinError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_has_its_class() {
        let table = [
            (2190002, CodeClass::TokenRejected),
            (2190008, CodeClass::TokenRejected),
            (28001008, CodeClass::TokenRejected),
            (2190004, CodeClass::PermissionDenied),
            (2119001, CodeClass::InvalidArgument),
            (2100005, CodeClass::InvalidArgument),
            (2119002, CodeClass::Transient),
            (2100004, CodeClass::Transient),
            (2119003, CodeClass::Transient),
            (2119005, CodeClass::PermissionDenied),
            (2119008, CodeClass::PermissionDenied),
            (2119010, CodeClass::Offline),
            (2100001, CodeClass::Transient),
            (3000001, CodeClass::Transient),
            (4000001, CodeClass::Business),
            (4000002, CodeClass::Business),
            (5000001, CodeClass::Business),
        ];
        for (code, class) in table {
            assert_eq!(classify_gateway_code(code), class, "code {code}");
        }
        assert!(token_code_is_permanent(10013));
        assert!(token_code_is_permanent(10003));
        assert!(token_code_is_permanent(10002));
        assert!(!token_code_is_permanent(10020));
    }
}
