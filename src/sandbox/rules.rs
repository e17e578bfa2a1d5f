//! Douyin's rules as pure functions of the sandbox's world and the time: who
//! gets a token, which tokens are still valid, which lookups are admitted.

use std::collections::HashMap;

use serde::Deserialize;

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

/// Admits a lookup or answers Douyin's code, in the gateway's order: token,
/// rate limit, parameters, merchant authorisation.
pub(super) fn admit_lookup(
    world: &mut World,
    token: &str,
    query: &HashMap<String, String>,
    config: &SandboxConfig,
    now_ms: i64,
) -> Result<(), (i64, &'static str)> {
    match judge_token(world, token, config, now_ms) {
        TokenVerdict::Valid => {}
        TokenVerdict::Expired => {
            return Err((codes::TOKEN_EXPIRED, "access_token过期,请刷新或重新授权"));
        }
        TokenVerdict::Unknown | TokenVerdict::Superseded => {
            return Err((codes::TOKEN_INVALID, "access_token无效"));
        }
    }
    let owner = world.token_owner.get(token).cloned().unwrap_or_default();
    if config.lookup_qps > 0 {
        let app = world
            .apps
            .get_mut(&owner)
            .expect("a valid token has an owner");
        while app
            .lookups_ms
            .front()
            .is_some_and(|at| *at <= now_ms - 1000)
        {
            app.lookups_ms.pop_front();
        }
        if app.lookups_ms.len() >= config.lookup_qps {
            world.stats.lookup_window_overruns += 1;
            return Err((codes::TOO_MANY_REQUESTS, "请求太过频繁,请稍后再试"));
        }
        app.lookups_ms.push_back(now_ms);
    }
    let account_id = query.get("account_id").filter(|value| !value.is_empty());
    let order_id = query.get("order_id").filter(|value| !value.is_empty());
    let (Some(account_id), Some(_)) = (account_id, order_id) else {
        return Err((codes::INVALID_PARAMETER, "参数不合法"));
    };
    let authorised = world
        .authorized
        .get(account_id)
        .is_some_and(|apps| apps.contains(&owner));
    if !authorised {
        return Err((codes::MERCHANT_NOT_AUTHORISED, "应用未获商家授权"));
    }
    Ok(())
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
