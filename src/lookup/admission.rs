//! Admission to Douyin's APIs, by rate group (app and Douyin API, or the
//! whole developer and Douyin API for an API Douyin counts per developer): a GCRA
//! schedule at the group's rate and a cap on calls in flight. A request is
//! admitted only if its turn comes early enough to leave its deadline room for
//! the call itself; a request that cannot make it is refused at once, never
//! queued to die. Callers take their turn only when they can send at once
//! (token in hand), so every turn is a call that leaves on time.
//!
//! Hand-written rather than `governor`: it needs reservations (a caller's place
//! in the schedule is known before it waits, so it can be refused up front),
//! which governor does not offer.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::LookupConfig;
use crate::domain::{ClientKey, DouyinApi, RateScope};
use crate::pace::Gcra;

/// Requests are spaced 10 % wider than the rate implies, so that network jitter
/// between admission here and arrival at Douyin never puts one request too many
/// into any one-second window.
const JITTER_HEADROOM: f64 = 1.1;

/// A lookup may go to Douyin while this is held.
#[derive(Debug)]
pub(crate) struct Admitted {
    _in_flight: OwnedSemaphorePermit,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotAdmitted {
    /// The group's next free turn (or in-flight slot) comes too late for the
    /// request's deadline: rate limiting, worth a retry after `retry_after`.
    #[error("too many calls for this app: the next free slot is {} ms away, beyond the request's deadline", .retry_after.as_millis())]
    Busy { retry_after: Duration },
    /// The deadline leaves less than `upstream_time_reserve` even with no
    /// queue at all: no retry with the same deadline can succeed.
    #[error("the request's deadline leaves less than the {} ms the daemon reserves for Douyin's answer; give it a deadline of at least that", .minimum.as_millis())]
    DeadlineTooShort { minimum: Duration },
}

/// Whose calls one rate group counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum GroupOwner {
    App(ClientKey),
    /// Every app together: Douyin counts some APIs per developer account.
    Developer,
}

/// A rate group: one app's (or the developer's) calls to one Douyin API.
type GroupKey = (GroupOwner, DouyinApi);

pub(crate) struct Admission {
    config: LookupConfig,
    gates: Mutex<HashMap<GroupKey, Arc<AppGate>>>,
    /// How many daemons share each group's rate (those alive on one
    /// PostgreSQL database; 1 alone): each paces at its share.
    cluster_share: std::sync::atomic::AtomicU32,
}

/// The spacing of turns for `rate` per second split `share` ways.
fn spacing(rate: u32, share: u32) -> Duration {
    Duration::from_secs_f64(JITTER_HEADROOM * f64::from(share.max(1)) / f64::from(rate))
}

struct AppGate {
    /// The group's rate for the whole cluster, per second.
    rate: u32,
    /// Burst 1: turns one spacing apart. Times are µs since `epoch`.
    schedule: Mutex<Gcra>,
    epoch: Instant,
    in_flight: Arc<Semaphore>,
}

impl AppGate {
    fn micros_since_epoch(&self, at: Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(i64::MAX)
    }
}

impl Admission {
    pub(crate) fn new(config: &LookupConfig) -> Self {
        Self {
            config: config.clone(),
            gates: Mutex::new(HashMap::new()),
            cluster_share: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// Paces every group at `1 / daemons` of its rate from now on.
    pub(crate) fn set_cluster_share(&self, daemons: u32) {
        let daemons = daemons.max(1);
        let before = self
            .cluster_share
            .swap(daemons, std::sync::atomic::Ordering::Relaxed);
        if before == daemons {
            return;
        }
        tracing::info!(
            daemons,
            "daemons sharing the database changed; each paces Douyin calls at its share of the rate"
        );
        for gate in self.gates.lock().values() {
            gate.schedule
                .lock()
                .set_spacing(spacing(gate.rate, daemons));
        }
    }

    fn gate(&self, client_key: &ClientKey, api: DouyinApi) -> Arc<AppGate> {
        let mut gates = self.gates.lock();
        let owner = match api.rate_scope() {
            RateScope::PerApp => GroupOwner::App(client_key.clone()),
            RateScope::PerDeveloper => GroupOwner::Developer,
        };
        let key = (owner, api);
        if let Some(gate) = gates.get(&key) {
            return Arc::clone(gate);
        }
        // A per-developer group has no per-app override (config refuses one),
        // so the rate read for the first app to call is the group's.
        let rate = self.config.rate_per_second(api, client_key).get();
        let share = self
            .cluster_share
            .load(std::sync::atomic::Ordering::Relaxed);
        let gate = Arc::new(AppGate {
            rate,
            schedule: Mutex::new(Gcra::new(spacing(rate, share), 1)),
            epoch: Instant::now(),
            in_flight: Arc::new(Semaphore::new(self.config.max_concurrent_per_app)),
        });
        gates.insert(key, Arc::clone(&gate));
        gate
    }

    /// Waits for the group's next turn and a free in-flight slot, as long as
    /// both come while `deadline` still leaves `upstream_time_reserve` for the call.
    pub(crate) async fn admit(
        &self,
        client_key: &ClientKey,
        api: DouyinApi,
        deadline: Instant,
    ) -> Result<Admitted, NotAdmitted> {
        let reserve = self.config.upstream_time_reserve;
        let latest = deadline.checked_sub(reserve).unwrap_or(deadline);
        let now = Instant::now();
        if latest < now {
            return Err(NotAdmitted::DeadlineTooShort { minimum: reserve });
        }
        let gate = self.gate(client_key, api);
        let turn = {
            let mut schedule = gate.schedule.lock();
            let turn_us = schedule
                .reserve(
                    gate.micros_since_epoch(now),
                    gate.micros_since_epoch(latest),
                )
                .map_err(|wait_us| NotAdmitted::Busy {
                    retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
                })?;
            gate.epoch + Duration::from_micros(u64::try_from(turn_us).unwrap_or(0))
        };
        // Only a turn in the future is worth a timer: tokio's timer rounds up to
        // the next millisecond tick, so even an elapsed deadline would cost
        // every lookup up to a millisecond of waiting for that tick.
        if turn > now {
            tokio::time::sleep_until(turn).await;
        }
        let permit = tokio::time::timeout_at(latest, Arc::clone(&gate.in_flight).acquire_owned())
            .await
            .map_err(|_| NotAdmitted::Busy {
                retry_after: Duration::from_millis(100),
            })?
            .expect("the in-flight semaphore is never closed");
        Ok(Admitted { _in_flight: permit })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    const DETAIL: DouyinApi = DouyinApi::AfterSaleOrderDetail;

    fn admission(rate: u32, max_in_flight: usize) -> Admission {
        let mut config = LookupConfig {
            max_concurrent_per_app: max_in_flight,
            upstream_time_reserve: Duration::from_millis(200),
            ..LookupConfig::default()
        };
        config.set_rate_per_second(DETAIL, rate);
        Admission::new(&config)
    }

    #[tokio::test(start_paused = true)]
    async fn turns_are_spaced_so_no_second_holds_more_than_the_rate() {
        let admission = admission(10, 100);
        let app = ClientKey::parse("app").unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut admitted_at = Vec::new();
        for _ in 0..30 {
            let _admitted = admission.admit(&app, DETAIL, deadline).await.unwrap();
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
            admission.admit(&app, DETAIL, deadline).await.unwrap();
        }
        let refused = admission.admit(&app, DETAIL, deadline).await.unwrap_err();
        assert!(
            matches!(refused, NotAdmitted::Busy { retry_after } if retry_after > Duration::ZERO),
            "{refused:?}"
        );
        // Another app has its own schedule.
        admission
            .admit(&ClientKey::parse("other").unwrap(), DETAIL, deadline)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_developer_api_paces_every_app_together_and_apart_from_per_app_apis() {
        const LIST: DouyinApi = DouyinApi::AfterSaleOrderList;
        let mut config = LookupConfig::default();
        config.set_rate_per_second(LIST, 10);
        config.set_rate_per_second(DETAIL, 10);
        let admission = Admission::new(&config);
        let apps = [
            ClientKey::parse("app-a").unwrap(),
            ClientKey::parse("app-b").unwrap(),
        ];
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        for round in 0..4 {
            let _admitted = admission
                .admit(&apps[round % 2], LIST, deadline)
                .await
                .unwrap();
        }
        // Four list turns across two apps: one spacing (110 ms) apart, as one group.
        assert_eq!(Instant::now() - start, Duration::from_millis(330));
        // The detail API's per-app groups are untouched by the list's pace.
        let before = Instant::now();
        admission.admit(&apps[0], DETAIL, deadline).await.unwrap();
        admission.admit(&apps[1], DETAIL, deadline).await.unwrap();
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn per_app_rates_override_the_default() {
        let mut config = LookupConfig::default();
        config
            .rates
            .entry(DETAIL)
            .or_default()
            .per_app
            .insert(ClientKey::parse("slow").unwrap(), NonZeroU32::MIN);
        let admission = Admission::new(&config);
        let slow = ClientKey::parse("slow").unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        admission.admit(&slow, DETAIL, deadline).await.unwrap();
        admission.admit(&slow, DETAIL, deadline).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_cap_holds_and_frees() {
        let admission = admission(1000, 2);
        let app = ClientKey::parse("app").unwrap();
        let deadline = Instant::now() + Duration::from_millis(400);
        let first = admission.admit(&app, DETAIL, deadline).await.unwrap();
        let _second = admission.admit(&app, DETAIL, deadline).await.unwrap();
        assert!(
            admission.admit(&app, DETAIL, deadline).await.is_err(),
            "no slot before the deadline"
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_millis(400);
        admission.admit(&app, DETAIL, deadline).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_the_reserve_is_not_rate_limiting() {
        let admission = admission(10, 100);
        let app = ClientKey::parse("idle").unwrap();
        let refused = admission
            .admit(&app, DETAIL, Instant::now() + Duration::from_millis(150))
            .await
            .unwrap_err();
        assert_eq!(
            refused,
            NotAdmitted::DeadlineTooShort {
                minimum: Duration::from_millis(200)
            }
        );
        // The refusal took no turn: the next caller goes at once.
        let start = Instant::now();
        admission
            .admit(&app, DETAIL, start + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(Instant::now(), start);
    }
}
