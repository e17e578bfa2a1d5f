//! The one mapping from every failure to a gRPC status: the code a client can
//! branch on, a message a person can act on, and `google.rpc.ErrorInfo`
//! carrying Douyin's code and logid.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::access::AccessDenied;
use crate::after_sale_events::WatchEnded;
use crate::douyin::after_sale::LookupFailure;
use crate::douyin::{CodeClass, DouyinError, TransportError, codes};
use crate::lookup::refund_audit::AuditError;
use crate::lookup::{LookupError, NotAdmitted};
use crate::registry::RegistryError;
use crate::store::StoreError;
use crate::token::TokenError;

/// ErrorInfo domain of errors that carry a Douyin code.
pub(crate) const DOUYIN_DOMAIN: &str = "open.douyin.com";
/// ErrorInfo domain of the daemon's own errors.
pub(crate) const TOKEND_DOMAIN: &str = "douyin-tokend";

fn status(
    code: Code,
    message: String,
    reason: &str,
    domain: &str,
    metadata: HashMap<String, String>,
    retry_after: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, domain, metadata);
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}

/// Douyin's code in Douyin's domain when it gave one, else the daemon's own reason.
fn reason_and_domain(douyin_code: Option<i64>, own_reason: &str) -> (String, &'static str) {
    match douyin_code {
        Some(code) => (code.to_string(), DOUYIN_DOMAIN),
        None => (own_reason.to_owned(), TOKEND_DOMAIN),
    }
}

/// A request refused at the edge, before anything was asked of Douyin.
pub(crate) fn invalid_argument(error: &impl std::fmt::Display) -> Status {
    status(
        Code::InvalidArgument,
        error.to_string(),
        "INVALID_ARGUMENT",
        TOKEND_DOMAIN,
        HashMap::new(),
        None,
    )
}

pub(crate) fn lookup_status(error: &LookupError) -> Status {
    match error {
        LookupError::Registry(error) => registry_status(error),
        LookupError::Token(error) => token_status(error),
        LookupError::Upstream(LookupFailure::Douyin(error)) => douyin_status(error),
        LookupError::Upstream(LookupFailure::Transport(error)) => transport_status(error),
        LookupError::NotAdmitted(NotAdmitted::Busy { retry_after }) => status(
            Code::ResourceExhausted,
            format!(
                "{error}; retry after the delay in RetryInfo, or give the request a longer deadline"
            ),
            "RATE_LIMITED",
            TOKEND_DOMAIN,
            HashMap::new(),
            Some(*retry_after),
        ),
        LookupError::NotAdmitted(NotAdmitted::DeadlineTooShort { minimum }) => status(
            Code::DeadlineExceeded,
            error.to_string(),
            "DEADLINE_TOO_SHORT",
            TOKEND_DOMAIN,
            HashMap::from([(
                "minimum_deadline_ms".to_owned(),
                minimum.as_millis().to_string(),
            )]),
            None,
        ),
        LookupError::DeadlineExceeded { .. }
        | LookupError::DeadlineExceededWaitingForToken
        | LookupError::DeadlinePassedWhileShared => status(
            Code::DeadlineExceeded,
            error.to_string(),
            "DEADLINE_EXCEEDED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        LookupError::Aborted => status(
            Code::Internal,
            error.to_string(),
            "LOOKUP_ABORTED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
    }
}

/// A refund decision's failure. The daemon's own reasons tell a caller what
/// the record says: AUDIT_DECISION_CONFLICT (another decision is recorded),
/// AUDIT_OUTCOME_UNKNOWN (it may have been applied; check before resending),
/// AUDIT_IN_FLIGHT (an identical one is being sent).
pub(crate) fn audit_status(error: &AuditError) -> Status {
    match error {
        AuditError::Lookup(error) => lookup_status(error),
        AuditError::Conflict {
            recorded,
            state,
            client,
        } => status(
            Code::FailedPrecondition,
            error.to_string(),
            "AUDIT_DECISION_CONFLICT",
            TOKEND_DOMAIN,
            HashMap::from([
                ("recorded_decision".to_owned(), recorded.clone()),
                ("recorded_state".to_owned(), (*state).to_owned()),
                ("recorded_by".to_owned(), client.clone()),
            ]),
            None,
        ),
        AuditError::OutcomeUnknown {
            first_time,
            decision,
            logid,
            ..
        } => status(
            // The call that sent it: Douyin did not answer usably (UNAVAILABLE),
            // but no RetryInfo, since a blind retry is what must not happen.
            // Later repeats: the record must be resolved first.
            if *first_time {
                Code::Unavailable
            } else {
                Code::FailedPrecondition
            },
            error.to_string(),
            "AUDIT_OUTCOME_UNKNOWN",
            TOKEND_DOMAIN,
            HashMap::from([
                ("decision".to_owned(), (*decision).to_owned()),
                ("logid".to_owned(), logid.clone()),
            ]),
            None,
        ),
        AuditError::InFlight => status(
            Code::Aborted,
            error.to_string(),
            "AUDIT_IN_FLIGHT",
            TOKEND_DOMAIN,
            HashMap::new(),
            Some(Duration::from_secs(1)),
        ),
        AuditError::Store(store_error) => store_failed(store_error),
        AuditError::Aborted => status(
            Code::Internal,
            error.to_string(),
            "AUDIT_ABORTED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
    }
}

pub(crate) fn access_status(error: &AccessDenied) -> Status {
    let (code, reason) = match error {
        AccessDenied::MissingKey => (Code::Unauthenticated, "API_KEY_MISSING"),
        AccessDenied::UnknownKey => (Code::Unauthenticated, "API_KEY_UNKNOWN"),
        AccessDenied::MissingScope { .. } => (Code::PermissionDenied, "SCOPE_MISSING"),
        AccessDenied::OutOfBounds { .. } => (Code::PermissionDenied, "OUT_OF_BOUNDS"),
    };
    status(
        code,
        error.to_string(),
        reason,
        TOKEND_DOMAIN,
        HashMap::new(),
        None,
    )
}

pub(crate) fn registry_status(error: &RegistryError) -> Status {
    match error {
        RegistryError::ClientExists { .. } => status(
            Code::AlreadyExists,
            error.to_string(),
            "CLIENT_EXISTS",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::UnknownClient { .. } => status(
            Code::NotFound,
            error.to_string(),
            "CLIENT_NOT_FOUND",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::InvalidClient(_) => status(
            Code::InvalidArgument,
            error.to_string(),
            "INVALID_ARGUMENT",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::UnknownMerchant { .. } => status(
            Code::NotFound,
            error.to_string(),
            "MERCHANT_NOT_REGISTERED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::UnknownApp { .. } => status(
            Code::NotFound,
            error.to_string(),
            "APP_NOT_REGISTERED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::DeclaredInConfig { .. } => status(
            Code::FailedPrecondition,
            error.to_string(),
            "DECLARED_IN_CONFIG",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::AppServesMerchants { merchants, .. } => status(
            Code::FailedPrecondition,
            error.to_string(),
            "APP_SERVES_MERCHANTS",
            TOKEND_DOMAIN,
            HashMap::from([("merchants".to_owned(), merchants.to_string())]),
            None,
        ),
        RegistryError::LastAdminClient { .. } => status(
            Code::FailedPrecondition,
            error.to_string(),
            "LAST_ADMIN_CLIENT",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        RegistryError::Store(store_error) => store_failed(store_error),
    }
}

/// A configuration reload that changed nothing: the reason (the config key
/// at fault, or the database failure) is the operator's to fix.
pub(crate) fn reload_failed(reason: &str) -> Status {
    status(
        Code::FailedPrecondition,
        format!("configuration not reloaded: {reason}"),
        "RELOAD_FAILED",
        TOKEND_DOMAIN,
        HashMap::new(),
        None,
    )
}

/// A database failure: logged here in full, shown to the caller without
/// SQLite's words.
/// Why an event watch ended or was refused: shutdown (UNAVAILABLE, resume
/// later), pruned events the watcher would miss (OUT_OF_RANGE with where to
/// resume), or the database.
pub(crate) fn watch_status(ended: &WatchEnded) -> Status {
    match ended {
        WatchEnded::ShuttingDown { last_sequence } => status(
            Code::Unavailable,
            ended.to_string(),
            "SHUTTING_DOWN",
            TOKEND_DOMAIN,
            HashMap::from([("last_sequence".to_owned(), last_sequence.to_string())]),
            None,
        ),
        WatchEnded::Pruned {
            after_sequence,
            pruned_through,
        } => status(
            Code::OutOfRange,
            ended.to_string(),
            "AFTER_SALE_EVENTS_PRUNED",
            TOKEND_DOMAIN,
            HashMap::from([
                ("after_sequence".to_owned(), after_sequence.to_string()),
                ("pruned_through".to_owned(), pruned_through.to_string()),
            ]),
            None,
        ),
        WatchEnded::Store(error) => store_failed(error),
    }
}

fn store_failed(error: &StoreError) -> Status {
    tracing::error!(%error, "database failure");
    status(
        Code::Internal,
        "the daemon's database failed; see its log".to_owned(),
        "STORE_FAILED",
        TOKEND_DOMAIN,
        HashMap::new(),
        None,
    )
}

pub(crate) fn token_status(error: &TokenError) -> Status {
    let message = error.to_string();
    match error {
        TokenError::UnknownApp { .. } => status(
            Code::NotFound,
            message,
            "APP_NOT_REGISTERED",
            TOKEND_DOMAIN,
            HashMap::new(),
            None,
        ),
        TokenError::CredentialsRefused {
            douyin_code,
            retry_in_seconds,
            ..
        } => {
            let (reason, domain) = reason_and_domain(*douyin_code, "CREDENTIALS_REFUSED");
            let metadata =
                HashMap::from([("retry_in_seconds".to_owned(), retry_in_seconds.to_string())]);
            status(
                Code::FailedPrecondition,
                message,
                &reason,
                domain,
                metadata,
                None,
            )
        }
        TokenError::FetchFailing {
            douyin_code,
            retry_in_seconds,
            ..
        } => {
            let (reason, domain) = reason_and_domain(*douyin_code, "TOKEN_FETCH_FAILING");
            let delay = Duration::from_secs(u64::try_from(*retry_in_seconds).unwrap_or(1).max(1));
            status(
                Code::Unavailable,
                message,
                &reason,
                domain,
                HashMap::new(),
                Some(delay),
            )
        }
        TokenError::BudgetExhausted {
            retry_in_seconds, ..
        } => {
            let delay = Duration::from_secs(u64::try_from(*retry_in_seconds).unwrap_or(1).max(1));
            status(
                Code::Unavailable,
                message,
                "TOKEN_BUDGET_EXHAUSTED",
                TOKEND_DOMAIN,
                HashMap::new(),
                Some(delay),
            )
        }
        TokenError::DatabaseUnavailable { .. } => status(
            Code::Unavailable,
            message,
            "DATABASE_UNAVAILABLE",
            TOKEND_DOMAIN,
            HashMap::new(),
            Some(Duration::from_secs(1)),
        ),
        TokenError::StoreFailed { .. } | TokenError::FetchAborted { .. } => status(
            Code::Unavailable,
            message,
            "TOKEN_NOT_AVAILABLE",
            TOKEND_DOMAIN,
            HashMap::new(),
            Some(Duration::from_secs(1)),
        ),
    }
}

/// The gRPC code a caller hears for a Douyin code of `class` that reached it
/// (after retries, where the class is retried).
pub(crate) fn code_for_class(class: CodeClass) -> Code {
    match class {
        CodeClass::InvalidArgument => Code::InvalidArgument,
        CodeClass::PermissionDenied => Code::PermissionDenied,
        CodeClass::Offline => Code::Unimplemented,
        CodeClass::Business => Code::FailedPrecondition,
        CodeClass::RateLimited => Code::ResourceExhausted,
        CodeClass::Transient | CodeClass::TokenRejected => Code::Unavailable,
    }
}

pub(crate) fn douyin_status(error: &DouyinError) -> Status {
    let code = code_for_class(error.class());
    let hint = match error.class() {
        CodeClass::InvalidArgument => {
            "check the request's parameters (account_id, order_id, certificate_id)"
        }
        CodeClass::PermissionDenied if error.code == codes::MERCHANT_NOT_AUTHORISED => {
            "the merchant must authorise this app in the merchant back office, and the app accept it"
        }
        CodeClass::PermissionDenied => {
            "the app needs this capability or access granted on the Douyin open platform"
        }
        CodeClass::Offline => "Douyin has taken this API offline",
        CodeClass::Business => "Douyin refused the request; the description says why",
        CodeClass::Transient => "Douyin is busy; retry later",
        CodeClass::RateLimited => "Douyin says this app calls too often; retry later",
        CodeClass::TokenRejected => "Douyin rejected a freshly refreshed token; retry later",
    };
    let mut metadata = HashMap::from([
        ("logid".to_owned(), error.logid.clone()),
        ("description".to_owned(), error.description.clone()),
    ]);
    if error.sub_code != 0 {
        metadata.insert("sub_code".to_owned(), error.sub_code.to_string());
        metadata.insert("sub_description".to_owned(), error.sub_description.clone());
    }
    let retry_after = matches!(code, Code::Unavailable | Code::ResourceExhausted)
        .then_some(Duration::from_secs(1));
    status(
        code,
        format!("{error}: {hint}"),
        &error.code.to_string(),
        DOUYIN_DOMAIN,
        metadata,
        retry_after,
    )
}

pub(crate) fn transport_status(error: &TransportError) -> Status {
    let (reason, logid) = match error {
        TransportError::Timeout { .. } => ("UPSTREAM_TIMEOUT", ""),
        TransportError::Connect { .. } => ("UPSTREAM_UNREACHABLE", ""),
        TransportError::HttpStatus { logid, .. } => ("UPSTREAM_HTTP_STATUS", logid.as_str()),
        TransportError::MalformedBody { logid, .. } => ("UPSTREAM_MALFORMED_BODY", logid.as_str()),
    };
    let metadata = HashMap::from([("logid".to_owned(), logid.to_owned())]);
    status(
        Code::Unavailable,
        format!("{error}; retry later"),
        reason,
        TOKEND_DOMAIN,
        metadata,
        Some(Duration::from_secs(1)),
    )
}

/// README's table of Douyin codes, written from `codes::TABLE` and the
/// mapping above; a test keeps README's copy equal to it.
#[cfg(test)]
fn douyin_code_table_markdown() -> String {
    use crate::douyin::codes::{Envelope, TABLE};

    let mut table = String::from(
        "| code | answered by | meaning | class | what the daemon does | the caller sees |\n\
         |---|---|---|---|---|---|\n",
    );
    for known in TABLE {
        let class = match known.class {
            CodeClass::TokenRejected => "token rejected",
            CodeClass::Transient => "transient",
            CodeClass::RateLimited => "rate limited",
            CodeClass::InvalidArgument => "invalid argument",
            CodeClass::PermissionDenied => "permission denied",
            CodeClass::Offline => "offline",
            CodeClass::Business => "business",
        };
        let envelope = match known.envelope {
            Envelope::Goodlife => "goodlife",
            Envelope::OpenApiGateway => "open-API gateway",
            Envelope::TokenEndpoint => "token endpoint",
        };
        let documented = if known.class_documented {
            "documented"
        } else {
            "inferred"
        };
        let (daemon, caller) = if known.envelope == Envelope::TokenEndpoint {
            if codes::token_code_is_permanent(known.code) {
                (
                    "stops fetching for the app until the cooldown ends or the secret changes",
                    "FAILED_PRECONDITION".to_owned(),
                )
            } else {
                (
                    "backs off; scheduled refreshes pause",
                    "UNAVAILABLE + RetryInfo while no valid token is held".to_owned(),
                )
            }
        } else {
            let daemon = match known.class {
                CodeClass::TokenRejected => "compare-and-invalidate, refresh, retry once",
                CodeClass::Transient | CodeClass::RateLimited => {
                    "retries with backoff, `lookup.max_tries` in all"
                }
                _ => "does not retry",
            };
            let caller = if known.class == CodeClass::TokenRejected {
                "nothing, unless a fresh token is rejected too: UNAVAILABLE".to_owned()
            } else {
                let code = code_for_class(known.class);
                let retry = matches!(code, Code::Unavailable | Code::ResourceExhausted);
                format!(
                    "{}{}",
                    super::code_label(code),
                    if retry { " + RetryInfo" } else { "" }
                )
            };
            (daemon, caller)
        };
        table.push_str(&format!(
            "| {} | {envelope} | {} | {class} ({documented}) | {daemon} | {caller} |\n",
            known.code, known.meaning,
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str =
        "<!-- douyin-codes:begin (written by grpc::status::douyin_code_table_markdown) -->\n";
    const END: &str = "<!-- douyin-codes:end -->";

    #[test]
    fn readmes_table_of_douyin_codes_is_the_code_tables() {
        let readme = include_str!("../../README.md");
        let written = douyin_code_table_markdown();
        let begin = readme.find(BEGIN).expect("README has the begin marker") + BEGIN.len();
        let end = readme.find(END).expect("README has the end marker");
        assert_eq!(
            &readme[begin..end],
            written,
            "README's table is out of date; put this between the markers:\n{written}"
        );
    }
}
