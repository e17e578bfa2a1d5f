//! Newtypes shared by every module: identifiers parsed and checked once at the
//! edge, and the secret-bearing values whose `Debug` and `Display` never show
//! the secret.

use std::fmt;
use std::num::NonZeroU32;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why an identifier given by a caller or an operator was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {length} bytes long; at most {limit} are allowed")]
    TooLong {
        field: &'static str,
        length: usize,
        limit: usize,
    },
    #[error("{field} contains a space or control character; only printable ASCII is allowed")]
    NotPrintable { field: &'static str },
}

/// Checks what every identifier sent to Douyin must satisfy: present, bounded,
/// printable ASCII without spaces (Douyin's ids are alphanumeric; anything else
/// is a caller's mistake that must not cost upstream quota).
fn check_identifier(field: &'static str, value: &str, limit: usize) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId::Empty { field });
    }
    if value.len() > limit {
        return Err(InvalidId::TooLong {
            field,
            length: value.len(),
            limit,
        });
    }
    if !value.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(InvalidId::NotPrintable { field });
    }
    Ok(())
}

/// The first 8 hex digits of a value's SHA-256: enough to tell apps and tokens
/// apart in logs and errors, useless for recovering the value.
pub(crate) fn fingerprint(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..4])
}

// === impl ClientKey ===

/// An app's `client_key`: an identifier, not a secret (Douyin puts it in
/// URLs and webhook bodies), so it prints as itself in logs, errors, CLI
/// output and metric labels; the app's secret and its tokens are what stay
/// hidden.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(String);

impl ClientKey {
    pub(crate) const MAX_LENGTH: usize = 128;

    pub fn parse(value: &str) -> Result<Self, InvalidId> {
        check_identifier("client_key", value, Self::MAX_LENGTH)?;
        Ok(Self(value.to_owned()))
    }

    /// The key itself, for the wire to Douyin and for the operator's own listings.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// Read from the config file (`[[apps]] client_key`, a client's `apps`, a
/// rate's `per_app` keys) with the same checks as at every other edge; the
/// error never repeats the key.
impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "ClientKey({:?})", self.0)
    }
}

// === impl ClientSecret ===

/// An app's `client_secret`. Only `expose` reveals it, at the one place that
/// sends it to Douyin or stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub(crate) const MAX_LENGTH: usize = 256;

    pub fn parse(value: &str) -> Result<Self, InvalidId> {
        check_identifier("client_secret", value, Self::MAX_LENGTH)?;
        Ok(Self(value.to_owned()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ClientSecret(<redacted>)")
    }
}

// === impl AccessToken ===

/// A Douyin `client_token` (`clt.…`). Prints as `token:<fingerprint>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "token:{}", self.fingerprint())
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "AccessToken({self})")
    }
}

// === impl AccountId ===

/// A merchant's root account id (`account_id`). Not a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    pub(crate) const MAX_LENGTH: usize = 64;

    pub fn parse(value: &str) -> Result<Self, InvalidId> {
        check_identifier("account_id", value, Self::MAX_LENGTH)?;
        Ok(Self(value.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Read from the config file (`[[merchants]] account_id`, a client's
/// `merchants`) with the same checks as at every other edge.
impl<'de> Deserialize<'de> for AccountId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// What a caller asks Douyin's after-sale detail API about, checked at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AfterSaleQuery {
    pub(crate) account_id: AccountId,
    pub(crate) order_id: String,
    pub(crate) certificate_id: Option<String>,
}

impl AfterSaleQuery {
    pub(crate) const MAX_ORDER_ID_LENGTH: usize = 128;

    pub(crate) fn parse(
        account_id: &str,
        order_id: &str,
        certificate_id: Option<&str>,
    ) -> Result<Self, InvalidId> {
        let account_id = AccountId::parse(account_id)?;
        check_identifier("order_id", order_id, Self::MAX_ORDER_ID_LENGTH)?;
        // Douyin's official SDK always sends the field, empty when unset: an
        // empty certificate_id means "no certificate", not a bad one.
        let certificate_id = certificate_id.filter(|certificate_id| !certificate_id.is_empty());
        if let Some(certificate_id) = certificate_id {
            check_identifier("certificate_id", certificate_id, Self::MAX_ORDER_ID_LENGTH)?;
        }
        Ok(Self {
            account_id,
            order_id: order_id.to_owned(),
            certificate_id: certificate_id.map(str::to_owned),
        })
    }
}

/// Why a request's parameters (other than its identifiers) were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidParameter {
    #[error(transparent)]
    Id(#[from] InvalidId),
    #[error("{field} is {value}; it must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{given} was given without {missing}: give both or neither")]
    HalfARange {
        given: &'static str,
        missing: &'static str,
    },
    #[error("{start} ({start_value}) is after {end} ({end_value})")]
    ReversedRange {
        start: &'static str,
        start_value: i64,
        end: &'static str,
        end_value: i64,
    },
    #[error("a rejection needs a reject_reason (audit_status false)")]
    RejectionWithoutReason,
    #[error("reject_reason is only for rejections; send it empty with audit_status true")]
    ReasonOnApproval,
    #[error("reject_reason is {length} bytes long; at most {limit} are allowed")]
    ReasonTooLong { length: usize, limit: usize },
    #[error("reject_reason contains a control character")]
    ReasonNotPrintable,
}

/// A time range filter of the refund list, in Unix seconds, both ends given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SecondsRange {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

impl SecondsRange {
    /// Both ends or neither: Douyin's page asks for the pair.
    fn parse(
        (start_field, start): (&'static str, Option<i64>),
        (end_field, end): (&'static str, Option<i64>),
    ) -> Result<Option<Self>, InvalidParameter> {
        match (start, end) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(InvalidParameter::HalfARange {
                given: start_field,
                missing: end_field,
            }),
            (None, Some(_)) => Err(InvalidParameter::HalfARange {
                given: end_field,
                missing: start_field,
            }),
            (Some(start), Some(end)) => {
                for (field, value) in [(start_field, start), (end_field, end)] {
                    if value < 0 {
                        return Err(InvalidParameter::OutOfRange {
                            field,
                            value,
                            min: 0,
                            max: i64::MAX,
                        });
                    }
                }
                if start > end {
                    return Err(InvalidParameter::ReversedRange {
                        start: start_field,
                        start_value: start,
                        end: end_field,
                        end_value: end,
                    });
                }
                Ok(Some(Self { start, end }))
            }
        }
    }
}

/// What a caller asks Douyin's refund list API for, checked at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefundListQuery {
    pub(crate) account_id: AccountId,
    pub(crate) page_size: u8,
    /// "0" for the first page, as Douyin wants it.
    pub(crate) cursor: String,
    pub(crate) created: Option<SecondsRange>,
    pub(crate) refund_done: Option<SecondsRange>,
    pub(crate) refund_status: Option<i32>,
}

/// The time filters of a list request, as the caller sent them.
pub(crate) struct RefundListTimes {
    pub(crate) create_order_start_time: Option<i64>,
    pub(crate) create_order_end_time: Option<i64>,
    pub(crate) refund_done_start_time: Option<i64>,
    pub(crate) refund_done_end_time: Option<i64>,
}

impl RefundListQuery {
    /// Douyin's bounds of `page_size` [退款单列表查询 page].
    pub(crate) const PAGE_SIZE_RANGE: std::ops::RangeInclusive<i64> = 1..=100;
    pub(crate) const MAX_CURSOR_LENGTH: usize = 256;

    pub(crate) fn parse(
        account_id: &str,
        page_size: i32,
        cursor: &str,
        times: &RefundListTimes,
        refund_status: Option<i32>,
    ) -> Result<Self, InvalidParameter> {
        let account_id = AccountId::parse(account_id)?;
        let page_size = i64::from(page_size);
        if !Self::PAGE_SIZE_RANGE.contains(&page_size) {
            return Err(InvalidParameter::OutOfRange {
                field: "page_size",
                value: page_size,
                min: *Self::PAGE_SIZE_RANGE.start(),
                max: *Self::PAGE_SIZE_RANGE.end(),
            });
        }
        let cursor = if cursor.is_empty() { "0" } else { cursor };
        check_identifier("cursor", cursor, Self::MAX_CURSOR_LENGTH)?;
        let created = SecondsRange::parse(
            ("create_order_start_time", times.create_order_start_time),
            ("create_order_end_time", times.create_order_end_time),
        )?;
        let refund_done = SecondsRange::parse(
            ("refund_done_start_time", times.refund_done_start_time),
            ("refund_done_end_time", times.refund_done_end_time),
        )?;
        Ok(Self {
            account_id,
            page_size: u8::try_from(page_size).expect("checked to be 1 to 100"),
            cursor: cursor.to_owned(),
            created,
            refund_done,
            refund_status,
        })
    }
}

/// Which refund a decision is about: the key decisions are recorded under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RefundKey {
    pub(crate) account_id: AccountId,
    pub(crate) order_id: String,
    pub(crate) certificate_id: String,
}

/// Approve, or reject with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefundDecision {
    Approve,
    Reject { reason: String },
}

impl RefundDecision {
    /// Longest reject_reason, in bytes: Douyin documents no bound; this keeps
    /// the recorded decision and the audit trail reasonable.
    pub(crate) const MAX_REASON_LENGTH: usize = 1024;

    /// Douyin's `audit_status`: true approves.
    pub(crate) fn approves(&self) -> bool {
        matches!(self, Self::Approve)
    }

    pub(crate) fn reject_reason(&self) -> &str {
        match self {
            Self::Approve => "",
            Self::Reject { reason } => reason,
        }
    }

    /// "approve" or "reject", as recorded and shown to callers.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Reject { .. } => "reject",
        }
    }
}

/// A caller's decision on one refund, checked at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefundAudit {
    pub(crate) key: RefundKey,
    pub(crate) decision: RefundDecision,
}

impl RefundAudit {
    pub(crate) fn parse(
        account_id: &str,
        order_id: &str,
        certificate_id: &str,
        approve: bool,
        reject_reason: &str,
    ) -> Result<Self, InvalidParameter> {
        let account_id = AccountId::parse(account_id)?;
        check_identifier("order_id", order_id, AfterSaleQuery::MAX_ORDER_ID_LENGTH)?;
        check_identifier(
            "certificate_id",
            certificate_id,
            AfterSaleQuery::MAX_ORDER_ID_LENGTH,
        )?;
        let decision = if approve {
            if !reject_reason.is_empty() {
                return Err(InvalidParameter::ReasonOnApproval);
            }
            RefundDecision::Approve
        } else {
            // The reason is the merchant's text (Chinese as often as not):
            // any printable character, no control characters.
            let reason = reject_reason.trim();
            if reason.is_empty() {
                return Err(InvalidParameter::RejectionWithoutReason);
            }
            if reason.len() > RefundDecision::MAX_REASON_LENGTH {
                return Err(InvalidParameter::ReasonTooLong {
                    length: reason.len(),
                    limit: RefundDecision::MAX_REASON_LENGTH,
                });
            }
            if reason.chars().any(char::is_control) {
                return Err(InvalidParameter::ReasonNotPrintable);
            }
            RefundDecision::Reject {
                reason: reason.to_owned(),
            }
        };
        Ok(Self {
            key: RefundKey {
                account_id,
                order_id: order_id.to_owned(),
                certificate_id: certificate_id.to_owned(),
            },
            decision,
        })
    }
}

/// Whose calls a rate group counts: one app's, or the whole developer's
/// (every app the daemon holds, together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    PerApp,
    PerDeveloper,
}

/// One Douyin API, as a rate group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DouyinApi {
    /// 售后单详情查询, `GET /goodlife/v1/akte/after_sale/order_detail/get/`.
    AfterSaleOrderDetail,
    /// 退款单列表查询, `GET /goodlife/v1/akte/after_sale/order/query/`.
    AfterSaleOrderList,
    /// 抖音码核销后退款审批, `POST /goodlife/v1/akte/after_sale/order/audit/`.
    AfterSaleOrderAudit,
}

impl DouyinApi {
    pub(crate) const ALL: [Self; 3] = [
        Self::AfterSaleOrderDetail,
        Self::AfterSaleOrderList,
        Self::AfterSaleOrderAudit,
    ];

    /// The name used in config (`[lookup.rates.<name>]`), logs and metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::AfterSaleOrderDetail => "after_sale_order_detail",
            Self::AfterSaleOrderList => "after_sale_order_list",
            Self::AfterSaleOrderAudit => "after_sale_order_audit",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|api| api.name() == name)
    }

    /// Whose calls Douyin counts against the rate.
    pub fn rate_scope(self) -> RateScope {
        match self {
            // 退款单列表查询: "10 QPS per developer" (开发者维度), all apps together.
            Self::AfterSaleOrderList => RateScope::PerDeveloper,
            Self::AfterSaleOrderDetail | Self::AfterSaleOrderAudit => RateScope::PerApp,
        }
    }

    /// Calls per second Douyin's page allows (per app or per developer, see
    /// `rate_scope`): the default rate.
    pub(crate) fn documented_rate_per_second(self) -> NonZeroU32 {
        let per_second = match self {
            // 售后单详情查询: "可承载最大qps 10", read per app (client_key),
            // the conservative reading of a page that does not say per what.
            Self::AfterSaleOrderDetail => 10,
            // 退款单列表查询: 10 QPS per developer (200 QPS is the API's capacity).
            Self::AfterSaleOrderList => 10,
            // 抖音码核销后退款审批: the stored page states no QPS. Chosen, not
            // documented: 5 per app, half the detail API's, since a write
            // that trips a limit cannot be retried blindly.
            Self::AfterSaleOrderAudit => 5,
        };
        NonZeroU32::new(per_second).expect("documented rates are not zero")
    }
}

/// Read from the config file by name (`[lookup.rates.<name>]`).
impl<'de> Deserialize<'de> for DouyinApi {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|api| api.name()).collect();
            serde::de::Error::custom(format!(
                "{name:?} is not a Douyin API the daemon calls (known: {})",
                known.join(", ")
            ))
        })
    }
}

impl fmt::Display for DouyinApi {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_or_display_and_client_keys_do() {
        let key = ClientKey::parse("awkey123456").unwrap();
        let secret = ClientSecret::parse("s3cr3t-value").unwrap();
        let token = AccessToken::new("clt.abcdef0123456789".to_owned());
        let printed = format!("{secret:?} {token} {token:?}");
        assert!(!printed.contains("s3cr3t-value"), "{printed}");
        assert!(!printed.contains("clt.abcdef"), "{printed}");
        assert_eq!(
            format!("{key} {key:?}"),
            "awkey123456 ClientKey(\"awkey123456\")"
        );
    }

    #[test]
    fn identifiers_are_checked_at_the_edge() {
        assert_eq!(
            AccountId::parse(""),
            Err(InvalidId::Empty {
                field: "account_id"
            })
        );
        assert!(matches!(
            AccountId::parse(&"7".repeat(65)),
            Err(InvalidId::TooLong { length: 65, .. })
        ));
        assert_eq!(
            AfterSaleQuery::parse("123", "order\u{7}", None),
            Err(InvalidId::NotPrintable { field: "order_id" })
        );
        assert!(AfterSaleQuery::parse("123", "order 1", None).is_err());
        assert_eq!(
            AfterSaleQuery::parse("123", "keXkM0H5DR", Some("")),
            AfterSaleQuery::parse("123", "keXkM0H5DR", None),
            "an empty certificate_id is an absent one"
        );
        assert!(AfterSaleQuery::parse("123", "keXkM0H5DR", Some(" ")).is_err());
        assert!(AfterSaleQuery::parse("123", "keXkM0H5DR", Some("a\tb")).is_err());
        assert!(AfterSaleQuery::parse("123", "keXkM0H5DR", Some("IrwGTLCKZr")).is_ok());
    }
}
