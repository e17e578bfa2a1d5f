//! The token endpoint budget: at most `budget` fetches across all apps per
//! window (Douyin allows 500 per 5 minutes), with a reserve that only urgent
//! fetches may use, and a pause of scheduled refreshes after Douyin says 10020.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::duration_ms;
use crate::config::RefreshConfig;

/// How much a fetch matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchPriority {
    /// A proactive refresh: may wait for the next sweep.
    Scheduled,
    /// Someone needs the token now (a caller waiting, a rejected token, an operator).
    Urgent,
}

#[derive(Debug)]
pub struct TokenBudget {
    limit: usize,
    reserve: usize,
    window_ms: i64,
    pause_ms: i64,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Start times of the fetches inside the current window, oldest first.
    spent_at_ms: VecDeque<i64>,
    scheduled_paused_until_ms: i64,
}

impl TokenBudget {
    pub fn new(config: &RefreshConfig) -> Self {
        Self {
            limit: config.budget,
            reserve: config.budget_reserve,
            window_ms: duration_ms(config.budget_window),
            pause_ms: duration_ms(config.rate_limited_pause),
            state: Mutex::new(BudgetState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    pub fn try_spend(&self, priority: FetchPriority, now_ms: i64) -> Result<(), Duration> {
        let mut state = self.lock();
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
        state.spent_at_ms.push_back(now_ms);
        Ok(())
    }

    /// Douyin said we fetch too often: hold scheduled refreshes back for a while.
    pub fn douyin_rate_limited(&self, now_ms: i64) {
        self.lock().scheduled_paused_until_ms = now_ms + self.pause_ms;
    }

    /// Fetches still allowed in the current window (urgent ones included).
    pub fn remaining(&self, now_ms: i64) -> usize {
        let mut state = self.lock();
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
