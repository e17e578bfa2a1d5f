//! The generic cell rate algorithm (GCRA), the one pace the daemon keeps for
//! every rate: calls per app and Douyin API (`lookup::admission`) and scheduled
//! token fetches (`token::budget`). Time is in microseconds on the caller's
//! own clock, so the caller picks tokio time or the injected clock.

use std::time::Duration;

/// A virtual schedule: one turn per `spacing`, up to `burst` at once.
#[derive(Debug, Clone)]
pub(crate) struct Gcra {
    spacing_us: i64,
    /// How far ahead of now the schedule may run before a turn must wait:
    /// `(burst - 1) * spacing`.
    tolerance_us: i64,
    /// The theoretical arrival time of the next turn (none before the first).
    next_turn_us: Option<i64>,
}

impl Gcra {
    pub(crate) fn new(spacing: Duration, burst: usize) -> Self {
        let spacing_us = i64::try_from(spacing.as_micros()).unwrap_or(i64::MAX);
        let extra = i64::try_from(burst.max(1) - 1).unwrap_or(i64::MAX);
        Self {
            spacing_us,
            tolerance_us: spacing_us.saturating_mul(extra),
            next_turn_us: None,
        }
    }

    /// Reserves the earliest turn at or after `now_us`, if it comes no later
    /// than `latest_us`, and returns it; otherwise reserves nothing and says
    /// how far away (in µs) that turn is.
    pub(crate) fn reserve(&mut self, now_us: i64, latest_us: i64) -> Result<i64, i64> {
        let next = self.next_turn_us.unwrap_or(now_us);
        let turn = now_us.max(next.saturating_sub(self.tolerance_us));
        if turn > latest_us {
            return Err(turn - now_us);
        }
        self.next_turn_us = Some(next.max(turn).saturating_add(self.spacing_us));
        Ok(turn)
    }

    /// Takes a turn now if one is free; otherwise says how long (µs) until one is.
    /// Changes the spacing (and the burst's tolerance with it) from now on;
    /// turns already reserved stay where they are.
    pub(crate) fn set_spacing(&mut self, spacing: Duration) {
        let spacing_us = i64::try_from(spacing.as_micros()).unwrap_or(i64::MAX);
        let extra = self.tolerance_us.checked_div(self.spacing_us).unwrap_or(0);
        self.spacing_us = spacing_us;
        self.tolerance_us = spacing_us.saturating_mul(extra);
    }

    pub(crate) fn take_now(&mut self, now_us: i64) -> Result<(), i64> {
        self.reserve(now_us, now_us).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_burst_turns_follow_one_spacing_apart() {
        let mut pace = Gcra::new(Duration::from_millis(100), 1);
        assert_eq!(pace.reserve(0, 1_000_000), Ok(0));
        assert_eq!(pace.reserve(0, 1_000_000), Ok(100_000));
        assert_eq!(pace.reserve(50_000, 1_000_000), Ok(200_000));
        // Too late for the caller: refused, nothing reserved.
        assert_eq!(pace.reserve(50_000, 250_000), Err(250_000));
        assert_eq!(pace.reserve(50_000, 1_000_000), Ok(300_000));
        // After a quiet spell the next turn is now.
        assert_eq!(pace.reserve(2_000_000, 2_000_000), Ok(2_000_000));
    }

    #[test]
    fn a_burst_goes_at_once_and_then_the_pace_applies() {
        let mut pace = Gcra::new(Duration::from_millis(10), 3);
        for _ in 0..3 {
            assert_eq!(pace.take_now(0), Ok(()));
        }
        assert_eq!(pace.take_now(0), Err(10_000));
        assert_eq!(pace.take_now(10_000), Ok(()));
        assert_eq!(pace.take_now(10_000), Err(10_000));
    }
}
