//! The token manager's side of a cluster (daemons sharing one PostgreSQL
//! database): before calling Douyin a daemon takes the app's fetch turn from
//! the database (`store::ClusterTable::begin_fetch`), adopts a token another
//! daemon stored instead of fetching its own, waits for another daemon's
//! fetch rather than racing it (and uses the token it brought), and stores
//! its token only through the fenced write. Notifications from other daemons
//! arrive through `reread_from_store`.

use std::sync::Arc;
use std::time::Duration;

use super::{AppSlot, HeldToken, RefreshReason, TokenError, TokenLease, TokenManager, lease_of};
use crate::clock::duration_ms;
use crate::domain::ClientKey;
use crate::store::{FetchRequest, FetchTurn, TokenRecord};

/// Douyin keeps the newest two tokens: one replaced stays valid this long.
const DOUYIN_GRACE: Duration = Duration::from_secs(300);

/// This daemon's membership of the cluster.
#[derive(Debug, Clone)]
pub(crate) struct ClusterMembership {
    /// Unique per process start, so a restarted daemon never holds its old lease.
    pub(crate) instance: String,
    /// How long a fetch lease holds (`cluster.fetch_lease`): past it, another
    /// daemon may take over the fetch of a daemon that died holding it.
    pub(crate) lease: Duration,
}

impl ClusterMembership {
    /// A membership with a new instance name (host name, process id and 64 random bits).
    pub(crate) fn new(lease: Duration) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned());
        Self {
            instance: format!(
                "{host}/{}/{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ),
            lease,
        }
    }
}

/// What the cluster said about a fetch this daemon was about to make.
pub(super) enum ClusterTurn {
    /// Fetch, and store the token as this generation.
    Fetch { generation: i64 },
    /// No fetch: this is the answer for the waiters.
    Answered(Result<TokenLease, TokenError>),
}

impl TokenManager {
    /// Takes this app's fetch turn from the database, waiting while another
    /// daemon holds it. Returns at once with `Fetch` outside a cluster.
    pub(super) async fn take_cluster_turn(
        &self,
        slot: &Arc<AppSlot>,
        reason: RefreshReason,
        local_generation: i64,
    ) -> ClusterTurn {
        let Some(membership) = &self.inner.cluster else {
            return ClusterTurn::Fetch {
                generation: local_generation,
            };
        };
        let Some(cluster) = self.inner.store.cluster() else {
            return ClusterTurn::Fetch {
                generation: local_generation,
            };
        };
        loop {
            // Armed before the database is asked, so a notification that
            // arrives in between is not missed.
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now_ms = self.now_ms();
            let (known_generation, servable_held) = {
                let state = slot.state.lock();
                let servable_held = state
                    .current
                    .as_ref()
                    .filter(|held| self.inner.policy.is_servable(held.expires_at_ms, now_ms))
                    .cloned();
                (state.generation, servable_held)
            };
            // A token newer than any this daemon knew when the fetch was asked
            // for arrived meanwhile (another daemon's fetch, which this one
            // may have waited for): that token answers this fetch. Without
            // this, each daemon that waited took the next turn and fetched
            // again, one new token per waiting daemon within milliseconds,
            // each killing the one before it at Douyin.
            if let Some(held) = &servable_held
                && held.generation >= local_generation
            {
                return ClusterTurn::Answered(Ok(lease_of(&slot.client_key, held)));
            }
            // Only a refresh whose current token still serves may wait (the
            // grace rule, the budget's reserve): once it no longer serves,
            // callers need the fetch now, whatever started it.
            let scheduled = reason == RefreshReason::Scheduled && servable_held.is_some();
            // The grace rule protects the oldest of Douyin's two valid tokens
            // from a third fetch; a token past its lifetime needs no
            // protection, so fetches older than the lifetime are not counted
            // (with Douyin's two-hour tokens this is the five-minute grace).
            let grace = servable_held
                .as_ref()
                .map_or(duration_ms(DOUYIN_GRACE), |held| {
                    duration_ms(DOUYIN_GRACE).min(held.expires_at_ms - held.fetched_at_ms)
                });
            let request = FetchRequest {
                client_key: &slot.client_key,
                instance: &membership.instance,
                known_generation,
                scheduled,
                lease_ms: duration_ms(membership.lease),
                budget: i64::try_from(self.inner.budget.limit()).unwrap_or(i64::MAX),
                budget_reserve: i64::try_from(self.inner.budget.reserve()).unwrap_or(0),
                budget_window_ms: self.inner.budget.window_ms(),
                grace_ms: grace,
            };
            match cluster.begin_fetch(&request).await {
                Ok(FetchTurn::Granted { generation }) => {
                    return ClusterTurn::Fetch { generation };
                }
                Ok(FetchTurn::Adopt(record)) => {
                    if let Some(lease) = self.apply_stored(slot, record) {
                        tracing::info!(app = %slot.client_key, generation = lease.generation, "another daemon fetched this app's token; using it");
                        return ClusterTurn::Answered(Ok(lease));
                    }
                    // Newer but not servable: now known, so the next turn may fetch.
                }
                Ok(FetchTurn::HeldElsewhere { lease_ends_in_ms }) => {
                    let lease_end =
                        Duration::from_millis(u64::try_from(lease_ends_in_ms).unwrap_or(0));
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep(lease_end) => {}
                    }
                }
                Ok(FetchTurn::BudgetSpent { retry_in_ms }) => {
                    tracing::warn!(app = %slot.client_key, retry_in_ms, "the cluster spent the token endpoint budget; not fetching");
                    return ClusterTurn::Answered(Err(TokenError::BudgetExhausted {
                        client_key: slot.client_key.clone(),
                        retry_in_seconds: (retry_in_ms + 999) / 1000,
                    }));
                }
                Ok(FetchTurn::TooSoon { retry_in_ms }) => {
                    // Only scheduled refreshes wait: the current token serves meanwhile.
                    let current = slot
                        .state
                        .lock()
                        .current
                        .as_ref()
                        .map(|held| lease_of(&slot.client_key, held));
                    return ClusterTurn::Answered(current.ok_or(TokenError::BudgetExhausted {
                        client_key: slot.client_key.clone(),
                        retry_in_seconds: (retry_in_ms + 999) / 1000,
                    }));
                }
                Err(error) => {
                    return ClusterTurn::Answered(Err(self.database_unavailable(slot, &error)));
                }
            }
        }
    }

    /// Remembers that the database could not give the lease, backing off as
    /// after a failed fetch: callers meanwhile get the cached answer at once
    /// instead of each waiting for a connection that will not come.
    fn database_unavailable(&self, slot: &AppSlot, error: &crate::store::StoreError) -> TokenError {
        let now_ms = self.now_ms();
        let mut state = slot.state.lock();
        let consecutive = state.next_consecutive_failure();
        let delay = self.inner.policy.backoff(consecutive, &mut rand::rng());
        let message = error.to_string();
        if consecutive == 1 {
            tracing::error!(app = %slot.client_key, error = %message, "cannot take the fetch lease from the database; not fetching without it");
        } else {
            tracing::warn!(app = %slot.client_key, error = %message, consecutive, "the database still cannot give the fetch lease");
        }
        state.failure = Some(super::Failure {
            douyin_code: None,
            message: message.clone(),
            at_ms: now_ms,
            permanent: false,
            consecutive,
            retry_at_ms: now_ms + duration_ms(delay),
            database_unavailable: true,
        });
        TokenError::DatabaseUnavailable {
            client_key: slot.client_key.clone(),
            message,
        }
    }

    /// Makes a stored row this daemon's view of the app, when it is news: a
    /// newer servable token replaces the held one; an invalidation of the held
    /// generation drops it. Wakes this daemon's fetch waiting on another's.
    /// Returns the token to use when the row holds one that is servable.
    pub(super) fn apply_stored(&self, slot: &AppSlot, record: TokenRecord) -> Option<TokenLease> {
        let now_ms = self.now_ms();
        let lease = {
            let mut state = slot.state.lock();
            state.generation = state.generation.max(record.generation);
            let held_generation = state.current.as_ref().map(|held| held.generation);
            if record.invalidated_at_ms.is_some() {
                if held_generation == Some(record.generation) {
                    tracing::warn!(app = %slot.client_key, generation = record.generation, "another daemon saw Douyin reject this token; dropping it");
                    state.current = None;
                    state.refresh_at_ms = None;
                    state.invalidated = true;
                }
                None
            } else {
                match (
                    record.access_token,
                    record.fetched_at_ms,
                    record.expires_at_ms,
                ) {
                    (Some(access_token), Some(fetched_at_ms), Some(expires_at_ms))
                        if held_generation.is_none_or(|held| held < record.generation)
                            && self.inner.policy.is_servable(expires_at_ms, now_ms) =>
                    {
                        let held = HeldToken {
                            access_token,
                            generation: record.generation,
                            fetched_at_ms,
                            expires_at_ms,
                        };
                        state.refresh_at_ms = Some(self.inner.policy.draw_refresh_at(
                            fetched_at_ms,
                            expires_at_ms,
                            &mut rand::rng(),
                        ));
                        state.failure = None;
                        state.invalidated = false;
                        let lease = lease_of(&slot.client_key, &held);
                        state.current = Some(held);
                        Some(lease)
                    }
                    _ => state
                        .current
                        .as_ref()
                        .filter(|held| held.generation == record.generation)
                        .map(|held| lease_of(&slot.client_key, held)),
                }
            }
        };
        slot.changed.notify_waiters();
        lease
    }

    /// Another daemon changed this app's token row: read it and take what is new.
    pub(crate) async fn reread_from_store(&self, client_key: &ClientKey) {
        let Some(slot) = self.slot(client_key) else {
            return;
        };
        match self.inner.store.tokens().load_one(client_key).await {
            Ok(Some(record)) => {
                self.apply_stored(&slot, record);
            }
            Ok(None) => slot.changed.notify_waiters(),
            Err(error) => {
                tracing::warn!(app = %client_key, %error, "cannot re-read a token another daemon changed");
                slot.changed.notify_waiters();
            }
        }
    }

    /// Re-reads every app's token row: after the listener reconnected, since
    /// notifications sent while it was away are lost.
    pub(crate) async fn reread_all_from_store(&self) -> Result<(), crate::store::StoreError> {
        let records = self.inner.store.tokens().load_all().await?;
        for (client_key, record) in records {
            if let Some(slot) = self.slot(&client_key) {
                // The database answers again: an app backing off because it
                // did not may fetch at once.
                let mut state = slot.state.lock();
                if state
                    .failure
                    .as_ref()
                    .is_some_and(|failure| failure.database_unavailable)
                {
                    state.failure = None;
                }
                drop(state);
                self.apply_stored(&slot, record);
            }
        }
        Ok(())
    }
}
