//! Douyin's error codes and what each one means for the daemon: retry, refresh
//! the token, blame the caller, or give up. `TABLE` is the only list of the
//! numbers: classification, the gRPC status mapping (`grpc::status`), the
//! metric label set and README's error table all read it.

use std::borrow::Cow;
use std::fmt;

/// What the daemon does about a non-zero error code from Douyin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// The access token was refused (invalid or expired): compare-and-invalidate,
    /// refresh, retry the request once.
    TokenRejected,
    /// Busy, unknown or documented as retryable: back off and retry within `max_tries`.
    Transient,
    /// Douyin says the app calls too often: back off and retry within
    /// `max_tries`; the caller hears RESOURCE_EXHAUSTED if it persists.
    RateLimited,
    /// The request's parameters are wrong: the caller must change them.
    InvalidArgument,
    /// The app lacks the capability, the merchant has not authorised the app, the
    /// platform denied access, or the app's key or secret is refused:
    /// configuration must change.
    PermissionDenied,
    /// The API was taken offline.
    Offline,
    /// Any other business error: permanent, reported with its code.
    Business,
}

impl CodeClass {
    /// Whether another try of the same request may succeed.
    pub(crate) fn is_retryable(self) -> bool {
        matches!(self, Self::Transient | Self::RateLimited)
    }
}

/// Which of Douyin's answers a code comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// The goodlife gateway: `data.error_code` and `extra.error_code`.
    Goodlife,
    /// The newer open-API gateway: `{"err_no", "err_msg", "log_id"}`.
    OpenApiGateway,
    /// `POST /oauth/client_token/` (and `stable_client_token`): `data.error_code`.
    TokenEndpoint,
}

/// One code Douyin answers, as the daemon understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownCode {
    pub code: i64,
    pub envelope: Envelope,
    pub class: CodeClass,
    /// What Douyin's page says, in English (the page's words in the comment beside it).
    pub(crate) meaning: &'static str,
    /// True when the class follows from Douyin's own words; false when it is
    /// inferred (the page names the code but not what a client should do, or
    /// the code was seen in SDKs and answers rather than on a page).
    pub(crate) class_documented: bool,
}

// Pages, under https://developer.open-douyin.com/docs/resource/zh-CN/ (titles as shown there;
// the detail page is kept in shared/seeds):
// [detail]  local-life/develop/OpenAPI/general-capabilities/groupon-refund/after-sale-order-detail
//           售后单详情查询, section 错误码 (code, 错误码描述, 排查建议)
// [status]  dop/develop/openapi/status-code, 状态码排查工具: the open-API gateway's
//           err_no table (covers life services) and the older goodlife table
// [trade]   mini-app/develop/server/trade-system/self-operated-trading/error-code, 错误码和返回码
// [minigame] mini-game/develop/server/log-in/check-session-key (names 28001003)
// [token]   local-life/develop/preparation/client_token, 生成 client-token (10020 in its notes)
// [stable]  dop/develop/openapi/account-permission/generate-stable-client-token
// [audit]   local-life/develop/OpenAPI/general-capabilities/groupon-refund/system-code-refund-audit
// "documented" below means the page's own advice (重试, 更换参数, …) gives the class;
// "inferred" means the page names the code but gives no advice, or no page names it.
const fn code(
    code: i64,
    envelope: Envelope,
    class: CodeClass,
    meaning: &'static str,
    class_documented: bool,
) -> KnownCode {
    KnownCode {
        code,
        envelope,
        class,
        meaning,
        class_documented,
    }
}

use CodeClass::*;
use Envelope::*;

pub(crate) const TOKEN_INVALID: i64 = 2190002;
pub(crate) const TOKEN_EXPIRED: i64 = 2190008;
pub(crate) const GATEWAY_TOKEN_INVALID: i64 = 28001003;
pub(crate) const GATEWAY_TOKEN_EXPIRED: i64 = 28001008;
pub(crate) const INVALID_PARAMETER: i64 = 2119001;
pub(crate) const SYSTEM_BUSY: i64 = 2119002;
pub(crate) const TOO_MANY_REQUESTS: i64 = 2119003;
pub(crate) const MERCHANT_NOT_AUTHORISED: i64 = 2119005;
pub(crate) const TOKEN_PARAMETER_ERROR: i64 = 10002;
pub(crate) const TOKEN_UNKNOWN_CLIENT_KEY: i64 = 10003;
pub(crate) const TOKEN_BAD_CREDENTIALS: i64 = 10013;
pub(crate) const TOKEN_RATE_LIMITED: i64 = 10020;
/// Assumed answer to a second audit of one refund (see its entry in `TABLE`).
pub const REFUND_ALREADY_AUDITED: i64 = 2191005;
/// The sub code that comes with it: 订单状态不正确 (see its entry in `TABLE`).
pub const REFUND_ALREADY_AUDITED_SUB_CODE: i64 = 20001;

/// Every code the daemon knows. A code not listed is `Business` (permanent).
pub const TABLE: &[KnownCode] = &[
    // [detail] 2190002 "access_token无效", 排查建议 "调用接口重新生成access_token".
    code(
        TOKEN_INVALID,
        Goodlife,
        TokenRejected,
        "access_token invalid",
        true,
    ),
    // [detail] 2190008 "access_token过期,请刷新或重新授权", 排查建议 "规范token刷新机制,
    // 检查是否有测试环境在同步刷新token".
    code(
        TOKEN_EXPIRED,
        Goodlife,
        TokenRejected,
        "access_token expired",
        true,
    ),
    // [detail] 2190004 "应用未获得该能力, 请去https://open.douyin.com/申请".
    code(
        2190004,
        Goodlife,
        PermissionDenied,
        "the app lacks this API's capability",
        true,
    ),
    // [detail] 2119001 "参数不合法", 排查建议 "更换参数".
    code(
        INVALID_PARAMETER,
        Goodlife,
        InvalidArgument,
        "invalid parameter",
        true,
    ),
    // [detail] 2100005 "参数不合法", 排查建议 "更换参数".
    code(
        2100005,
        Goodlife,
        InvalidArgument,
        "invalid parameter",
        true,
    ),
    // [detail] 2119002 "系统繁忙,请稍候再试", 排查建议 "重试".
    code(SYSTEM_BUSY, Goodlife, Transient, "system busy", true),
    // [detail] 2100004 "系统繁忙,此时请开发者稍候再试", 排查建议 "重试接口,重试3次仍报错联系…".
    code(2100004, Goodlife, Transient, "system busy", true),
    // [detail] 2100001 "未知错误", 排查建议 "重试接口,重试3次仍报错联系抖音生活服务技术支持".
    code(2100001, Goodlife, Transient, "unknown error", true),
    // [detail] 2119003 "请求太过频繁,请稍后再试", 排查建议 "重试".
    code(
        TOO_MANY_REQUESTS,
        Goodlife,
        RateLimited,
        "too many requests",
        true,
    ),
    // [detail] 2119005 "应用未获商家授权", 排查建议 "联系合作商家在商家后台发起授权,并在服务商后台同意授权".
    code(
        MERCHANT_NOT_AUTHORISED,
        Goodlife,
        PermissionDenied,
        "the merchant has not authorised the app",
        true,
    ),
    // On no official page found (kept from earlier SDK reading): access denied
    // by platform control. Class inferred.
    code(
        2119008,
        Goodlife,
        PermissionDenied,
        "access denied by platform control",
        false,
    ),
    // On no official page found (kept from earlier SDK reading): the API was
    // taken offline. Class inferred.
    code(
        2119010,
        Goodlife,
        Offline,
        "the API was taken offline",
        false,
    ),
    // [detail] 3000001 "根据实际业务错误返回", 排查建议 "对照接口文档规范参数并重试" (fix
    // the parameters and retry), listed again as "以实际错误信息为准". Class inferred:
    // retried within max_tries, as Douyin's "重试" suggests; a parameter fault
    // then surfaces with its code after the last try.
    code(
        3000001,
        Goodlife,
        Transient,
        "business error; fix the parameters and retry",
        false,
    ),
    // [detail] 4000001 "根据实际业务错误返回", 排查建议 "补充参数" (add the missing parameter).
    code(
        4000001,
        Goodlife,
        InvalidArgument,
        "business error: a parameter is missing",
        true,
    ),
    // [detail] 4000002 "根据实际业务错误返回", 排查建议 "对照接口文档规范参数并重试"
    // (make the parameters follow the API's rules). Class inferred from the advice.
    code(
        4000002,
        Goodlife,
        InvalidArgument,
        "business error: a parameter does not follow the API's rules",
        false,
    ),
    // [detail] 5000001 listed twice: "根据实际业务错误返回 / 联系抖音处理" and
    // "服务器打瞌睡了,请稍后再试。" (the server dozed off, try again later): retried
    // within max_tries. Class inferred from the second entry.
    code(
        5000001,
        Goodlife,
        Transient,
        "the server dozed off, try again later",
        false,
    ),
    // [trade] 2191005 "逆向交易类错误" (reverse-trade, i.e. refund, error), no advice
    // given; its sub codes there include 20001 "订单状态不正确" (the order's state
    // does not allow the operation). Class inferred: permanent for this request.
    // ASSUMED, not found on any page: this is the code Douyin answers a second
    // audit of the same order and certificate with ([audit], 抖音码核销后退款审批,
    // lists no error table in its stored copy; the official Go SDK's answer has a
    // `reentry` flag but no code). The sandbox answers a second audit with it.
    code(
        REFUND_ALREADY_AUDITED,
        Goodlife,
        Business,
        "reverse-trade (refund) error, e.g. the refund was already audited",
        false,
    ),
    // [minigame] 28001003 "access_token 无效" (not in [status]'s table). A token
    // rejection; class from the meaning.
    code(
        GATEWAY_TOKEN_INVALID,
        OpenApiGateway,
        TokenRejected,
        "access_token invalid",
        true,
    ),
    // [status] 28001005 "系统繁忙", advice "请求重试" (retry).
    code(28001005, OpenApiGateway, Transient, "system busy", true),
    // [status] 28001006 "网络调用错误,请重试" (network call error, retry).
    code(
        28001006,
        OpenApiGateway,
        Transient,
        "network call error, retry",
        true,
    ),
    // [status] 28001007 "参数不合法" (invalid parameter).
    code(
        28001007,
        OpenApiGateway,
        InvalidArgument,
        "invalid parameter",
        true,
    ),
    // [status] 28001008 "access_token过期", advice: generate a new one.
    code(
        GATEWAY_TOKEN_EXPIRED,
        OpenApiGateway,
        TokenRejected,
        "access_token expired",
        true,
    ),
    // [status] 28001014 "应用未授权任何能力" (the app has no capability granted),
    // no advice given. Class inferred.
    code(
        28001014,
        OpenApiGateway,
        PermissionDenied,
        "the app has no capability granted",
        false,
    ),
    // [status] 28001016 "当前应用已被封禁或下线" (the app is banned or offline),
    // advice: contact the platform. Class inferred: nothing but Douyin can fix it.
    code(
        28001016,
        OpenApiGateway,
        PermissionDenied,
        "the app is banned or taken offline",
        false,
    ),
    // [status] 28001018 "应用未获得该能力" (the app lacks this capability), no
    // advice given. Class inferred.
    code(
        28001018,
        OpenApiGateway,
        PermissionDenied,
        "the app lacks this capability",
        false,
    ),
    // [status] 28003017 "quota 已用完" (the call quota is used up), no advice
    // given. Class inferred; the quota's window is not stated.
    code(
        28003017,
        OpenApiGateway,
        RateLimited,
        "the call quota is used up",
        false,
    ),
    // [status] 28003018 "请求频率过高" (request rate too high), advice: slow down.
    code(
        28003018,
        OpenApiGateway,
        RateLimited,
        "request rate too high",
        true,
    ),
    // [token] [stable] 10002 "参数错误" (parameter error): permanent, stop and alert.
    code(
        TOKEN_PARAMETER_ERROR,
        TokenEndpoint,
        InvalidArgument,
        "parameter error",
        true,
    ),
    // [token] [stable] 10003 "client_key不存在" (no such client_key): permanent,
    // class inferred (no retry can create the key).
    code(
        TOKEN_UNKNOWN_CLIENT_KEY,
        TokenEndpoint,
        PermissionDenied,
        "client_key does not exist",
        false,
    ),
    // [token] [stable] 10013 "client_key或client_secret错误": permanent, class
    // inferred (no retry can fix the secret).
    code(
        TOKEN_BAD_CREDENTIALS,
        TokenEndpoint,
        PermissionDenied,
        "client_key or client_secret wrong",
        false,
    ),
    // [token] 10020: more than 500 token calls in 5 minutes (in the page's
    // notes, not its error table): back off. (On renew_refresh_token the same
    // number means something else; codes are read per endpoint.)
    code(
        TOKEN_RATE_LIMITED,
        TokenEndpoint,
        RateLimited,
        "more than 500 token calls in 5 minutes",
        true,
    ),
];

/// The table's entry for `code`, if the daemon knows it.
pub(crate) fn known(code: i64) -> Option<&'static KnownCode> {
    TABLE.iter().find(|known| known.code == code)
}

/// A Douyin code as a metric label: itself for success (0) and for the codes
/// in [`TABLE`], else "other", so codes Douyin invents cannot grow the label set.
pub fn metric_label(code: i64) -> Cow<'static, str> {
    if code == 0 {
        Cow::Borrowed("0")
    } else if known(code).is_some() {
        Cow::Owned(code.to_string())
    } else {
        Cow::Borrowed("other")
    }
}

/// Classifies a gateway code (never zero) from either envelope.
pub(crate) fn classify_gateway_code(code: i64) -> CodeClass {
    match known(code) {
        Some(known) if known.envelope != TokenEndpoint => known.class,
        _ => Business,
    }
}

/// True for token endpoint codes that no retry can fix: the key or secret is
/// wrong, so the daemon stops and alerts instead of hammering the endpoint.
/// Everything else (10020 rate limiting, codes we do not know) is retried with backoff.
pub(crate) fn token_code_is_permanent(code: i64) -> bool {
    known(code).is_some_and(|known| {
        known.envelope == TokenEndpoint && matches!(known.class, InvalidArgument | PermissionDenied)
    })
}

/// True for the token endpoint's "too many token calls" answer.
pub(crate) fn token_code_is_rate_limited(code: i64) -> bool {
    known(code).is_some_and(|known| known.envelope == TokenEndpoint && known.class == RateLimited)
}

/// A non-zero error code answered by Douyin, with what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DouyinError {
    pub(crate) code: i64,
    pub(crate) description: String,
    pub(crate) sub_code: i64,
    pub(crate) sub_description: String,
    pub(crate) logid: String,
}

impl DouyinError {
    pub(crate) fn class(&self) -> CodeClass {
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
    fn unknown_codes_share_one_metric_label() {
        assert_eq!(metric_label(0), "0");
        assert_eq!(metric_label(2119005), "2119005");
        assert_eq!(metric_label(10013), "10013");
        assert_eq!(metric_label(4000003), "other");
        assert_eq!(metric_label(-1), "other");
    }

    #[test]
    fn every_code_the_issue_names_has_its_class() {
        let expected = [
            (2190002, TokenRejected),
            (2190008, TokenRejected),
            (28001003, TokenRejected),
            (28001008, TokenRejected),
            (2190004, PermissionDenied),
            (2119001, InvalidArgument),
            (2100005, InvalidArgument),
            (4000001, InvalidArgument),
            (4000002, InvalidArgument),
            (28001007, InvalidArgument),
            (2119002, Transient),
            (2100004, Transient),
            (2100001, Transient),
            (3000001, Transient),
            (5000001, Transient),
            (28001005, Transient),
            (28001006, Transient),
            (2119003, RateLimited),
            (28003017, RateLimited),
            (28003018, RateLimited),
            (2119005, PermissionDenied),
            (2119008, PermissionDenied),
            (28001014, PermissionDenied),
            (28001016, PermissionDenied),
            (28001018, PermissionDenied),
            (2119010, Offline),
            (2191005, Business),
            (4000003, Business),
        ];
        for (code, class) in expected {
            assert_eq!(classify_gateway_code(code), class, "code {code}");
        }
        assert!(token_code_is_permanent(10013));
        assert!(token_code_is_permanent(10003));
        assert!(token_code_is_permanent(10002));
        assert!(!token_code_is_permanent(10020));
        assert!(token_code_is_rate_limited(10020));
        // A token endpoint code is not a gateway answer.
        assert_eq!(classify_gateway_code(10013), Business);
    }

    #[test]
    fn the_table_lists_each_code_once() {
        let mut codes: Vec<i64> = TABLE.iter().map(|known| known.code).collect();
        codes.sort_unstable();
        let before = codes.len();
        codes.dedup();
        assert_eq!(before, codes.len());
    }
}
