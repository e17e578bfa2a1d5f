//! Pure refresh policy: when a token is usable, when its proactive refresh is
//! due, how long to back off after a failure. Functions of `now` and a random
//! source, so tests check the maths without a clock or a network.

use std::time::Duration;

use rand::Rng;

use crate::clock::duration_ms;
use crate::config::RefreshConfig;

/// A token is handed out only while it has at least this long to live, so that
/// the request carrying it reaches Douyin before it expires.
pub(crate) const SERVE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) struct RefreshPolicy {
    /// Tokens come from `stable_client_token`: Douyin answers the same token
    /// until it expires and a new one only after, so there is no early refresh
    /// to make and no successor to switch to before expiry.
    pub(crate) stable_tokens: bool,
    pub(crate) window_start: Duration,
    pub(crate) window_end: Duration,
    pub(crate) min_interval: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) permanent_failure_cooldown: Duration,
}

impl From<&RefreshConfig> for RefreshPolicy {
    fn from(config: &RefreshConfig) -> Self {
        Self {
            stable_tokens: false,
            window_start: config.window_start,
            window_end: config.window_end,
            min_interval: config.min_interval,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            permanent_failure_cooldown: config.permanent_failure_cooldown,
        }
    }
}

impl RefreshPolicy {
    /// The policy for tokens from `stable_client_token` (see `stable_tokens`).
    pub(crate) fn for_stable_tokens(mut self) -> Self {
        self.stable_tokens = true;
        self
    }

    /// Whether a token expiring at `expires_at_ms` may still be handed out:
    /// while it has `SERVE_MARGIN` to live, or, for stable tokens, until it
    /// expires, since Douyin issues no successor before then (expiry counts
    /// from when our fetch started, so Douyin's own expiry is no earlier).
    pub(crate) fn is_servable(&self, expires_at_ms: i64, now_ms: i64) -> bool {
        let margin = if self.stable_tokens {
            0
        } else {
            duration_ms(SERVE_MARGIN)
        };
        now_ms.saturating_add(margin) < expires_at_ms
    }

    /// Draws the proactive refresh time uniformly inside the window
    /// [expiry - window_start, expiry - window_end], so apps fetched together
    /// do not refresh together, and never earlier than `min_interval` after
    /// the fetch started (short-lived tokens then refresh on demand instead).
    pub(crate) fn draw_refresh_at(
        &self,
        fetched_at_ms: i64,
        expires_at_ms: i64,
        rng: &mut impl Rng,
    ) -> i64 {
        if self.stable_tokens {
            // A fetch before expiry would only get the same token back.
            return expires_at_ms;
        }
        let earliest = expires_at_ms - duration_ms(self.window_start);
        let latest = expires_at_ms - duration_ms(self.window_end);
        let drawn = if earliest < latest {
            rng.random_range(earliest..=latest)
        } else {
            latest
        };
        drawn.max(fetched_at_ms + duration_ms(self.min_interval))
    }

    /// Delay before the next try after `consecutive_failures` transient
    /// failures: exponential from `backoff_initial`, capped at `backoff_max`,
    /// with full jitter over the upper half so that failing apps spread out
    /// yet none retries at once.
    pub(crate) fn backoff(&self, consecutive_failures: u32, rng: &mut impl Rng) -> Duration {
        let exponent = consecutive_failures.saturating_sub(1).min(30);
        let ceiling = self
            .backoff_initial
            .saturating_mul(1u32 << exponent)
            .min(self.backoff_max);
        let ceiling_ms = duration_ms(ceiling).max(1);
        let floor_ms = (ceiling_ms / 2).max(duration_ms(self.backoff_initial).min(ceiling_ms));
        Duration::from_millis(rng.random_range(floor_ms..=ceiling_ms) as u64)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn policy() -> RefreshPolicy {
        RefreshPolicy::from(&RefreshConfig::default())
    }

    #[test]
    fn refresh_times_fall_inside_the_window_and_spread_out() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(7);
        let fetched_at = 1_000_000;
        let expires_at = fetched_at + 7_200_000;
        let draws: Vec<i64> = (0..1000)
            .map(|_| policy.draw_refresh_at(fetched_at, expires_at, &mut rng))
            .collect();
        let window_open = expires_at - 25 * 60_000;
        let window_close = expires_at - 15 * 60_000;
        assert!(
            draws
                .iter()
                .all(|at| (window_open..=window_close).contains(at))
        );
        let lower_half = draws
            .iter()
            .filter(|at| **at < (window_open + window_close) / 2)
            .count();
        assert!(
            (400..=600).contains(&lower_half),
            "not uniform: {lower_half} of 1000 in the lower half"
        );
    }

    #[test]
    fn refresh_never_comes_sooner_than_min_interval_after_the_fetch() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(1);
        // A 10-minute token: the window would open before the fetch even started.
        let refresh_at = policy.draw_refresh_at(0, 600_000, &mut rng);
        assert_eq!(refresh_at, 300_000);
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(3);
        for failures in 1..40 {
            let ceiling = Duration::from_secs(1)
                .saturating_mul(1 << (failures - 1).min(30))
                .min(Duration::from_secs(300));
            for _ in 0..50 {
                let delay = policy.backoff(failures, &mut rng);
                assert!(
                    delay <= ceiling && delay >= ceiling / 2,
                    "{failures}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn stable_tokens_refresh_at_expiry_and_serve_until_then() {
        let policy = policy().for_stable_tokens();
        let mut rng = StdRng::seed_from_u64(5);
        assert_eq!(policy.draw_refresh_at(0, 7_200_000, &mut rng), 7_200_000);
        assert!(policy.is_servable(10_000, 9_999));
        assert!(!policy.is_servable(10_000, 10_000));
    }

    #[test]
    fn servable_only_with_margin_before_expiry() {
        let policy = policy();
        assert!(policy.is_servable(10_000, 4_999));
        assert!(!policy.is_servable(10_000, 5_000));
        assert!(!policy.is_servable(10_000, 20_000));
    }
}
