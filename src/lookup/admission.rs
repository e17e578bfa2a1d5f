//! Per-app admission to Douyin's after-sale API: a GCRA schedule at the app's
//! rate and a cap on calls in flight. A request is admitted only if its turn
//! comes early enough to leave its deadline room for the call itself; a
//! request that cannot make it is refused at once, never queued to die.
//!
//! Hand-written rather than `governor`: it needs reservations (a caller's place
//! in the schedule is known before it waits, so it can be refused up front),
//! which governor does not offer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::LookupConfig;
use crate::domain::ClientKey;

/// Requests are spaced 10 % wider than the rate implies, so that network jitter
/// between admission here and arrival at Douyin never puts one request too many
/// into any one-second window.
const JITTER_HEADROOM: f64 = 1.1;

/// A lookup may go to Douyin while this is held.
#[derive(Debug)]
pub struct Admitted {
    _in_flight: OwnedSemaphorePermit,
}

/// Why a lookup was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many lookups for this app: the next free slot is {} ms away, beyond the request's deadline", .retry_after.as_millis())]
pub struct NotAdmitted {
    pub retry_after: Duration,
}

pub struct Admission {
    default_rate: u32,
    rate_by_app: HashMap<String, u32>,
    max_in_flight: usize,
    upstream_time_reserve: Duration,
    gates: Mutex<HashMap<ClientKey, Arc<AppGate>>>,
}

struct AppGate {
    schedule: Mutex<Gcra>,
    in_flight: Arc<Semaphore>,
}

/// The generic cell rate algorithm with burst 1, as a virtual schedule:
/// `next_turn` is when the next request may go.
#[derive(Debug)]
struct Gcra {
    spacing: Duration,
    next_turn: Option<Instant>,
}

impl Gcra {
    /// Reserves the earliest turn, if it is no later than `latest`; otherwise
    /// says how far away it is and reserves nothing.
    fn reserve(&mut self, now: Instant, latest: Instant) -> Result<Instant, Duration> {
        let turn = self.next_turn.map_or(now, |next| next.max(now));
        if turn > latest {
            return Err(turn - now);
        }
        self.next_turn = Some(turn + self.spacing);
        Ok(turn)
    }
}

impl Admission {
    pub fn new(config: &LookupConfig) -> Self {
        Self {
            default_rate: config.rate_per_second,
            rate_by_app: config.app_rate_per_second.clone(),
            max_in_flight: config.max_concurrent_per_app,
            upstream_time_reserve: config.upstream_time_reserve,
            gates: Mutex::new(HashMap::new()),
        }
    }

    fn gate(&self, client_key: &ClientKey) -> Arc<AppGate> {
        let mut gates = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(gates.entry(client_key.clone()).or_insert_with(|| {
            let rate = self
                .rate_by_app
                .get(client_key.expose())
                .copied()
                .unwrap_or(self.default_rate)
                .max(1);
            Arc::new(AppGate {
                schedule: Mutex::new(Gcra {
                    spacing: Duration::from_secs_f64(JITTER_HEADROOM / f64::from(rate)),
                    next_turn: None,
                }),
                in_flight: Arc::new(Semaphore::new(self.max_in_flight)),
            })
        }))
    }

    /// Waits for the app's next turn and a free in-flight slot, as long as both
    /// come while `deadline` still leaves `upstream_time_reserve` for the call.
    pub async fn admit(
        &self,
        client_key: &ClientKey,
        deadline: Instant,
    ) -> Result<Admitted, NotAdmitted> {
        let gate = self.gate(client_key);
        let latest = deadline
            .checked_sub(self.upstream_time_reserve)
            .unwrap_or(deadline);
        let now = Instant::now();
        let turn = {
            let mut schedule = gate
                .schedule
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            schedule
                .reserve(now, latest)
                .map_err(|retry_after| NotAdmitted { retry_after })?
        };
        // Only a turn in the future is worth a timer: tokio's timer rounds up to
        // the next millisecond tick, so even an elapsed deadline would cost
        // every lookup up to a millisecond of waiting for that tick.
        if turn > now {
            tokio::time::sleep_until(turn).await;
        }
        let permit = tokio::time::timeout_at(latest, Arc::clone(&gate.in_flight).acquire_owned())
            .await
            .map_err(|_| NotAdmitted {
                retry_after: Duration::from_millis(100),
            })?
            .expect("the in-flight semaphore is never closed");
        Ok(Admitted { _in_flight: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(rate: u32, max_in_flight: usize) -> Admission {
        Admission::new(&LookupConfig {
            rate_per_second: rate,
            max_concurrent_per_app: max_in_flight,
            upstream_time_reserve: Duration::from_millis(200),
            ..LookupConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn turns_are_spaced_so_no_second_holds_more_than_the_rate() {
        let admission = admission(10, 100);
        let app = ClientKey::parse("app").unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut admitted_at = Vec::new();
        for _ in 0..30 {
            let _admitted = admission.admit(&app, deadline).await.unwrap();
            admitted_at.push(Instant::now() - start);
        }
        for window in admitted_at.windows(11) {
            assert!(
                window[10] - window[0] >= Duration::from_secs(1),
                "11 turns within a second: {window:?}"
            );
        }
        assert_eq!(admitted_at[1], Duration::from_millis(110));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_beyond_the_deadline_is_refused_at_once_and_reserves_nothing() {
        let admission = admission(10, 100);
        let app = ClientKey::parse("app").unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        // Turns at 0, 110, 220: the next (330) leaves under 200 ms of the 500 ms deadline.
        for _ in 0..3 {
            admission.admit(&app, deadline).await.unwrap();
        }
        let refused = admission.admit(&app, deadline).await.unwrap_err();
        assert!(refused.retry_after > Duration::ZERO);
        // Another app has its own schedule.
        admission
            .admit(&ClientKey::parse("other").unwrap(), deadline)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn per_app_rates_override_the_default() {
        let mut config = LookupConfig::default();
        config.app_rate_per_second.insert("slow".to_owned(), 1);
        let admission = Admission::new(&config);
        let slow = ClientKey::parse("slow").unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        admission.admit(&slow, deadline).await.unwrap();
        admission.admit(&slow, deadline).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_cap_holds_and_frees() {
        let admission = admission(1000, 2);
        let app = ClientKey::parse("app").unwrap();
        let deadline = Instant::now() + Duration::from_millis(400);
        let first = admission.admit(&app, deadline).await.unwrap();
        let _second = admission.admit(&app, deadline).await.unwrap();
        assert!(
            admission.admit(&app, deadline).await.is_err(),
            "no slot before the deadline"
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_millis(400);
        admission.admit(&app, deadline).await.unwrap();
    }
}
