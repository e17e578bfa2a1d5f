//! The token endpoint budget: at most `budget` fetches across all apps per
//! window (Douyin allows 500 per 5 minutes), with a reserve that only urgent
//! fetches may use, scheduled fetches spread evenly over the window, and a
//! pause of scheduled refreshes after Douyin says 10020.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::Duration;

use crate::clock::duration_ms;
use crate::config::RefreshConfig;
use crate::pace::Gcra;

/// How much a fetch matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchPriority {
    /// A proactive refresh: may wait for the next sweep.
    Scheduled,
    /// Someone needs the token now (a caller waiting, a rejected token, an operator).
    Urgent,
}

/// Scheduled fetches may come this many at once before the even pace applies,
/// so that a small fleet gets all its tokens in the first sweep.
const SCHEDULED_BURST: usize = 32;

#[derive(Debug)]
pub(crate) struct TokenBudget {
    limit: usize,
    reserve: usize,
    window_ms: i64,
    pause_ms: i64,
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// Start times of the fetches inside the current window, oldest first.
    spent_at_ms: VecDeque<i64>,
    scheduled_paused_until_ms: i64,
    /// The even pace of scheduled fetches: the window over their share of it,
    /// `SCHEDULED_BURST` at once. Without it a large fleet spent the whole
    /// window's share in the first sweep of every window: 450 fetches in one
    /// 15 s sweep, then none for five minutes.
    scheduled_pace: Gcra,
}

impl TokenBudget {
    pub(crate) fn new(config: &RefreshConfig) -> Self {
        let scheduled_share = config.budget.saturating_sub(config.budget_reserve).max(1);
        let window_ms = duration_ms(config.budget_window);
        Self {
            limit: config.budget,
            reserve: config.budget_reserve,
            window_ms,
            pause_ms: duration_ms(config.rate_limited_pause),
            state: Mutex::new(BudgetState {
                spent_at_ms: VecDeque::new(),
                scheduled_paused_until_ms: 0,
                scheduled_pace: Gcra::new(
                    config.budget_window / u32::try_from(scheduled_share).unwrap_or(u32::MAX),
                    SCHEDULED_BURST.min(scheduled_share),
                ),
            }),
        }
    }

    fn forget_old(&self, state: &mut BudgetState, now_ms: i64) {
        while state
            .spent_at_ms
            .front()
            .is_some_and(|at| *at <= now_ms - self.window_ms)
        {
            state.spent_at_ms.pop_front();
        }
    }

    /// Spends one fetch, or says when one may be spent again.
    pub(crate) fn try_spend(&self, priority: FetchPriority, now_ms: i64) -> Result<(), Duration> {
        let mut state = self.state.lock();
        self.forget_old(&mut state, now_ms);
        if priority == FetchPriority::Scheduled && now_ms < state.scheduled_paused_until_ms {
            return Err(Duration::from_millis(
                (state.scheduled_paused_until_ms - now_ms) as u64,
            ));
        }
        let allowed = match priority {
            FetchPriority::Scheduled => self.limit - self.reserve,
            FetchPriority::Urgent => self.limit,
        };
        if state.spent_at_ms.len() >= allowed {
            // The window frees a slot when the oldest of the last `allowed` fetches ages out.
            let freeing = state.spent_at_ms[state.spent_at_ms.len() - allowed];
            return Err(Duration::from_millis(
                (freeing + self.window_ms - now_ms).max(1) as u64,
            ));
        }
        if priority == FetchPriority::Scheduled {
            state
                .scheduled_pace
                .take_now(now_ms.saturating_mul(1000))
                .map_err(|wait_us| {
                    Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))
                        .max(Duration::from_millis(1))
                })?;
        }
        state.spent_at_ms.push_back(now_ms);
        Ok(())
    }

    /// Douyin said we fetch too often: hold scheduled refreshes back for a while.
    pub(crate) fn douyin_rate_limited(&self, now_ms: i64) {
        self.state.lock().scheduled_paused_until_ms = now_ms + self.pause_ms;
    }

    /// Fetches still allowed in the current window (urgent ones included).
    /// Fetches allowed per window, the reserve and the window: a cluster
    /// counts the same budget in its database.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn reserve(&self) -> usize {
        self.reserve
    }

    pub(crate) fn window_ms(&self) -> i64 {
        self.window_ms
    }

    pub(crate) fn remaining(&self, now_ms: i64) -> usize {
        let mut state = self.state.lock();
        self.forget_old(&mut state, now_ms);
        self.limit.saturating_sub(state.spent_at_ms.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize, reserve: usize) -> TokenBudget {
        TokenBudget::new(&RefreshConfig {
            budget: limit,
            budget_reserve: reserve,
            ..RefreshConfig::default()
        })
    }

    #[test]
    fn scheduled_fetches_leave_the_reserve_to_urgent_ones() {
        let budget = budget(5, 2);
        for _ in 0..3 {
            budget.try_spend(FetchPriority::Scheduled, 0).unwrap();
        }
        assert!(budget.try_spend(FetchPriority::Scheduled, 0).is_err());
        budget.try_spend(FetchPriority::Urgent, 0).unwrap();
        budget.try_spend(FetchPriority::Urgent, 0).unwrap();
        let wait = budget.try_spend(FetchPriority::Urgent, 1_000).unwrap_err();
        assert_eq!(wait, Duration::from_millis(299_000));
        assert_eq!(budget.remaining(1_000), 0);
    }

    #[test]
    fn the_window_slides() {
        let budget = budget(2, 0);
        budget.try_spend(FetchPriority::Scheduled, 0).unwrap();
        budget.try_spend(FetchPriority::Scheduled, 100_000).unwrap();
        assert!(budget.try_spend(FetchPriority::Scheduled, 299_999).is_err());
        budget.try_spend(FetchPriority::Scheduled, 300_000).unwrap();
        assert_eq!(budget.remaining(300_000), 0);
        assert_eq!(budget.remaining(400_000), 1);
    }

    #[test]
    fn scheduled_fetches_are_spread_evenly_over_the_window_after_a_small_burst() {
        // Douyin's budget: 450 scheduled fetches per 5 minutes, one per 667 ms.
        let budget = budget(500, 50);
        let spent_at = |now_ms: i64| {
            (0..1000)
                .take_while(|_| budget.try_spend(FetchPriority::Scheduled, now_ms).is_ok())
                .count()
        };
        assert_eq!(
            spent_at(0),
            SCHEDULED_BURST,
            "a small fleet is served at once"
        );
        assert_eq!(spent_at(15_000), 22, "then 15 s of the even pace");
        assert_eq!(spent_at(30_000), 23);
        // Urgent fetches are not held to the pace.
        budget.try_spend(FetchPriority::Urgent, 30_000).unwrap();
        // Over a whole window the pace and the reserve together keep to the budget.
        let mut spent = SCHEDULED_BURST + 22 + 23 + 1;
        for second in 31..300 {
            spent += spent_at(second * 1000);
        }
        assert!(spent <= 500, "{spent}");
        assert!(
            spent >= 440,
            "the pace leaves the scheduled share usable: {spent}"
        );
    }

    #[test]
    fn rate_limiting_by_douyin_pauses_scheduled_fetches_only() {
        let budget = budget(10, 1);
        budget.douyin_rate_limited(0);
        assert_eq!(
            budget.try_spend(FetchPriority::Scheduled, 1_000),
            Err(Duration::from_secs(59))
        );
        budget.try_spend(FetchPriority::Urgent, 1_000).unwrap();
        budget.try_spend(FetchPriority::Scheduled, 60_000).unwrap();
    }
}
