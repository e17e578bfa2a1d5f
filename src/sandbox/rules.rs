//! Douyin's rules as pure functions of the sandbox's world and the time: who
//! gets a token, which tokens are still valid, which lookups are admitted,
//! what the refund list pages hold, and which refund audits are taken.

use std::collections::{HashMap, VecDeque};

use serde::Deserialize;
use serde_json::Value;

use super::{IssuedToken, SandboxConfig, World, issue_token};
use crate::clock::duration_ms;
use crate::douyin::codes;

/// The sandbox's judgement of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    Valid,
    /// Never issued by this sandbox.
    Unknown,
    Expired,
    /// Replaced by newer tokens (beyond the two newest, or past the grace).
    Superseded,
}

#[derive(Deserialize)]
struct TokenRequest {
    client_key: Option<String>,
    client_secret: Option<String>,
    grant_type: Option<String>,
}

/// The token endpoint's decision: a token, or Douyin's code and description.
pub(super) fn grant_token(
    world: &mut World,
    body: &[u8],
    config: &SandboxConfig,
    now_ms: i64,
    stable: bool,
) -> Result<IssuedToken, (i64, &'static str)> {
    let request: TokenRequest = serde_json::from_slice(body)
        .map_err(|_| (codes::TOKEN_PARAMETER_ERROR, "参数错误: body is not JSON"))?;
    let (Some(client_key), Some(client_secret), Some("client_credential")) = (
        request.client_key,
        request.client_secret,
        request.grant_type.as_deref(),
    ) else {
        return Err((codes::TOKEN_PARAMETER_ERROR, "参数错误"));
    };
    let app = world
        .apps
        .get_mut(&client_key)
        .ok_or((codes::TOKEN_UNKNOWN_CLIENT_KEY, "client_key不存在"))?;
    if app.secret != client_secret {
        return Err((
            codes::TOKEN_BAD_CREDENTIALS,
            "client_key或client_secret错误",
        ));
    }
    let window_ms = duration_ms(config.token_budget_window);
    while app
        .token_calls_ms
        .front()
        .is_some_and(|at| *at <= now_ms - window_ms)
    {
        app.token_calls_ms.pop_front();
    }
    if app.token_calls_ms.len() >= config.token_budget {
        return Err((
            codes::TOKEN_RATE_LIMITED,
            "请求太频繁: more than the allowed token calls in the window",
        ));
    }
    app.token_calls_ms.push_back(now_ms);
    // Douyin's stable_client_token: while the newest token is valid a re-fetch
    // returns that same token; a new one is issued only after it expired
    // (unlike WeChat's stable token, which renews in the last 5 minutes).
    if stable
        && let Some(newest) = app.issued.back()
        && now_ms < newest.expires_at_ms
    {
        return Ok(newest.clone());
    }
    Ok(issue_token(world, &client_key, config, now_ms))
}

pub(super) fn judge_token(
    world: &World,
    token: &str,
    config: &SandboxConfig,
    now_ms: i64,
) -> TokenVerdict {
    let Some(owner) = world.token_owner.get(token) else {
        return TokenVerdict::Unknown;
    };
    let Some(app) = world.apps.get(owner) else {
        return TokenVerdict::Unknown;
    };
    let position_from_newest = app
        .issued
        .iter()
        .rev()
        .position(|issued| issued.value == token);
    let newest = app.issued.back();
    match (position_from_newest, newest) {
        (Some(0), Some(issued)) if now_ms < issued.expires_at_ms => TokenVerdict::Valid,
        (Some(1), Some(newest)) => {
            let issued = &app.issued[app.issued.len() - 2];
            if now_ms >= issued.expires_at_ms {
                TokenVerdict::Expired
            } else if now_ms < newest.issued_at_ms + duration_ms(config.grace) {
                TokenVerdict::Valid
            } else {
                TokenVerdict::Superseded
            }
        }
        (Some(0), Some(_)) => TokenVerdict::Expired,
        _ => TokenVerdict::Superseded,
    }
}

/// The gateway's first check on every goodlife call: the token must be
/// valid. Returns the app (client_key) that owns it.
fn check_token(
    world: &World,
    token: &str,
    config: &SandboxConfig,
    now_ms: i64,
) -> Result<String, (i64, &'static str)> {
    match judge_token(world, token, config, now_ms) {
        TokenVerdict::Valid => Ok(world.token_owner.get(token).cloned().unwrap_or_default()),
        TokenVerdict::Expired => Err((codes::TOKEN_EXPIRED, "access_token过期,请刷新或重新授权")),
        TokenVerdict::Unknown | TokenVerdict::Superseded => {
            Err((codes::TOKEN_INVALID, "access_token无效"))
        }
    }
}

/// Counts a call in a one-second window of at most `qps` calls (0 = no
/// limit); a full window is Douyin's 2119003.
fn take_window_slot(
    window: &mut VecDeque<i64>,
    qps: usize,
    now_ms: i64,
) -> Result<(), (i64, &'static str)> {
    if qps == 0 {
        return Ok(());
    }
    while window.front().is_some_and(|at| *at <= now_ms - 1000) {
        window.pop_front();
    }
    if window.len() >= qps {
        return Err((codes::TOO_MANY_REQUESTS, "请求太过频繁,请稍后再试"));
    }
    window.push_back(now_ms);
    Ok(())
}

fn merchant_authorised(
    world: &World,
    account_id: &str,
    owner: &str,
) -> Result<(), (i64, &'static str)> {
    let authorised = world
        .authorized
        .get(account_id)
        .is_some_and(|apps| apps.contains(owner));
    if authorised {
        Ok(())
    } else {
        Err((codes::MERCHANT_NOT_AUTHORISED, "应用未获商家授权"))
    }
}

/// Admits a lookup or answers Douyin's code, in the gateway's order: token,
/// rate limit, parameters, merchant authorisation.
pub(super) fn admit_lookup(
    world: &mut World,
    token: &str,
    query: &HashMap<String, String>,
    config: &SandboxConfig,
    now_ms: i64,
) -> Result<(), (i64, &'static str)> {
    let owner = check_token(world, token, config, now_ms)?;
    let app = world
        .apps
        .get_mut(&owner)
        .expect("a valid token has an owner");
    if let Err(refusal) = take_window_slot(&mut app.lookups_ms, config.lookup_qps, now_ms) {
        world.stats.lookup_window_overruns += 1;
        return Err(refusal);
    }
    let account_id = query.get("account_id").filter(|value| !value.is_empty());
    let order_id = query.get("order_id").filter(|value| !value.is_empty());
    let (Some(account_id), Some(_)) = (account_id, order_id) else {
        return Err((codes::INVALID_PARAMETER, "参数不合法"));
    };
    merchant_authorised(world, account_id, &owner)
}

/// One page of refunds as the list API answers it.
pub(super) struct RefundPage {
    pub(super) items: Vec<Value>,
    pub(super) has_more: bool,
    pub(super) cursor: String,
}

/// Answers the refund list, in the gateway's order: token, the
/// per-developer rate limit (all apps together), parameters (page_size
/// 1–100, a cursor this sandbox issued, time pairs), merchant authorisation;
/// then a page of the merchant's seeded refunds, filtered.
pub(super) fn list_refunds(
    world: &mut World,
    token: &str,
    query: &HashMap<String, String>,
    config: &SandboxConfig,
    now_ms: i64,
) -> Result<RefundPage, (i64, &'static str)> {
    let owner = check_token(world, token, config, now_ms)?;
    if let Err(refusal) = take_window_slot(
        &mut world.list_calls_ms,
        config.list_qps_per_developer,
        now_ms,
    ) {
        world.stats.list_window_overruns += 1;
        return Err(refusal);
    }
    let invalid = (codes::INVALID_PARAMETER, "参数不合法");
    let number = |name: &str| -> Result<Option<i64>, (i64, &'static str)> {
        query
            .get(name)
            .map(|value| value.parse::<i64>().map_err(|_| invalid))
            .transpose()
    };
    let page_size = number("page_size")?.ok_or(invalid)?;
    if !(1..=100).contains(&page_size) {
        return Err(invalid);
    }
    let offset: usize = match query.get("cursor").map(String::as_str) {
        None | Some("" | "0") => 0,
        Some(cursor) => cursor.parse().map_err(|_| invalid)?,
    };
    let pair = |start: &str, end: &str| -> Result<Option<(i64, i64)>, (i64, &'static str)> {
        match (number(start)?, number(end)?) {
            (None, None) => Ok(None),
            (Some(start), Some(end)) => Ok(Some((start, end))),
            _ => Err(invalid),
        }
    };
    let created = pair("create_order_start_time", "create_order_end_time")?;
    let refund_done = pair("refund_done_start_time", "refund_done_end_time")?;
    let refund_status = number("refund_status")?;
    let account_id = query
        .get("account_id")
        .filter(|value| !value.is_empty())
        .ok_or(invalid)?;
    merchant_authorised(world, account_id, &owner)?;
    let within = |item: &Value, field: &str, range: Option<(i64, i64)>| {
        range.is_none_or(|(start, end)| {
            item[field]
                .as_i64()
                .is_some_and(|value| (start..=end).contains(&value))
        })
    };
    let matching: Vec<&Value> = world
        .refund_orders
        .get(account_id)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|item| within(item, "create_time", created))
        .filter(|item| within(item, "complete_time", refund_done))
        .filter(|item| {
            refund_status.is_none_or(|status| {
                item["refund_info_list"][0]["refund_status"].as_i64() == Some(status)
            })
        })
        .collect();
    let end = (offset + usize::try_from(page_size).unwrap_or(1)).min(matching.len());
    let start = offset.min(end);
    Ok(RefundPage {
        items: matching[start..end]
            .iter()
            .map(|item| (*item).clone())
            .collect(),
        has_more: end < matching.len(),
        cursor: end.to_string(),
    })
}

#[derive(Deserialize)]
struct AuditRequest {
    account_id: Option<String>,
    order_id: Option<String>,
    certificate_id: Option<String>,
    audit_status: Option<bool>,
    reject_reason: Option<String>,
}

/// Decides a refund audit, in the gateway's order: token, parameters,
/// merchant authorisation, then once per (account, order, certificate).
/// A rejection without a reason is refused with 2119001 (assumed: Douyin's
/// sibling audit page, 审核回调, says a rejection without a reason is refused,
/// without naming the code). A second audit of the same refund, whatever its
/// decision, is answered 2191005 with sub code 20001 (assumed, see
/// `codes::REFUND_ALREADY_AUDITED`).
pub(super) fn audit_refund(
    world: &mut World,
    token: &str,
    body: &[u8],
    config: &SandboxConfig,
    now_ms: i64,
) -> Result<(), (i64, &'static str, i64)> {
    let without_sub = |(code, description): (i64, &'static str)| (code, description, 0);
    let owner = check_token(world, token, config, now_ms).map_err(without_sub)?;
    let invalid = (codes::INVALID_PARAMETER, "参数不合法", 0);
    let request: AuditRequest = serde_json::from_slice(body).map_err(|_| invalid)?;
    let (Some(account_id), Some(order_id), Some(certificate_id), Some(approve)) = (
        request.account_id.filter(|value| !value.is_empty()),
        request.order_id.filter(|value| !value.is_empty()),
        request.certificate_id.filter(|value| !value.is_empty()),
        request.audit_status,
    ) else {
        return Err(invalid);
    };
    if !approve && request.reject_reason.unwrap_or_default().trim().is_empty() {
        return Err(invalid);
    }
    merchant_authorised(world, &account_id, &owner).map_err(without_sub)?;
    let key = (account_id, order_id, certificate_id);
    if world.audits.contains_key(&key) {
        return Err((
            codes::REFUND_ALREADY_AUDITED,
            "逆向交易类错误",
            codes::REFUND_ALREADY_AUDITED_SUB_CODE,
        ));
    }
    mark_refund_audited(world, &key, approve, now_ms);
    world.audits.insert(key, approve);
    Ok(())
}

/// Refund statuses as third-party code reads Douyin's undocumented values
/// (see `RefundInfo.refund_status` in the proto): under review, reviewed
/// (approved) and rejected.
pub(super) const REFUND_UNDER_REVIEW: i64 = 10;
const REFUND_APPROVED: i64 = 20;
const REFUND_REJECTED: i64 = 25;

/// Shows a decision in the refund list, as Douyin's list shows audited
/// refunds: the refund's status and the audit time (milliseconds, as
/// third-party code reads it). Refunds not in the list are left alone.
fn mark_refund_audited(
    world: &mut World,
    (account_id, order_id, certificate_id): &(String, String, String),
    approve: bool,
    now_ms: i64,
) {
    let Some(orders) = world.refund_orders.get_mut(account_id) else {
        return;
    };
    for order in orders
        .iter_mut()
        .filter(|order| order["order_id"].as_str() == Some(order_id))
    {
        let Some(refunds) = order["refund_info_list"].as_array_mut() else {
            continue;
        };
        let mut decided = false;
        for refund in refunds
            .iter_mut()
            .filter(|refund| refund["certificate_id"].as_str() == Some(certificate_id))
        {
            refund["refund_status"] = Value::from(if approve {
                REFUND_APPROVED
            } else {
                REFUND_REJECTED
            });
            decided = true;
        }
        if decided {
            order["audit_time"] = Value::from(now_ms);
            order["update_time"] = Value::from(now_ms / 1000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::sandbox::SandboxState;

    #[test]
    fn only_the_newest_two_tokens_live_and_the_older_only_within_grace() {
        let clock = ManualClock::starting_at(0);
        let sandbox = SandboxState::new(clock.clone(), SandboxConfig::default());
        sandbox.add_app("k", "s");
        let first = sandbox.issue_token_out_of_band("k").unwrap();
        assert_eq!(sandbox.judge_token(&first), TokenVerdict::Valid);
        clock.advance(std::time::Duration::from_secs(60));
        let second = sandbox.issue_token_out_of_band("k").unwrap();
        assert_eq!(
            sandbox.judge_token(&first),
            TokenVerdict::Valid,
            "within grace"
        );
        clock.advance(std::time::Duration::from_secs(300));
        assert_eq!(
            sandbox.judge_token(&first),
            TokenVerdict::Superseded,
            "past grace"
        );
        assert_eq!(sandbox.judge_token(&second), TokenVerdict::Valid);
        let third = sandbox.issue_token_out_of_band("k").unwrap();
        let _fourth = sandbox.issue_token_out_of_band("k").unwrap();
        assert_eq!(
            sandbox.judge_token(&second),
            TokenVerdict::Superseded,
            "beyond the newest two"
        );
        assert_eq!(sandbox.judge_token(&third), TokenVerdict::Valid);
        clock.advance(std::time::Duration::from_secs(7200));
        assert_eq!(sandbox.judge_token(&third), TokenVerdict::Expired);
        assert_eq!(sandbox.judge_token("clt.never"), TokenVerdict::Unknown);
    }
}
