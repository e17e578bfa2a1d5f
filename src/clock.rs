//! Wall-clock time as the token logic sees it: Unix milliseconds from an
//! injectable clock, so tests (and the sandbox they share it with) move time
//! by hand instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Token expiry is wall-clock time (it survives restarts in SQLite), so the
/// clock speaks Unix milliseconds rather than a monotonic `Instant`.
pub trait Clock: Send + Sync + 'static {
    fn now_unix_ms(&self) -> i64;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that only moves when told to; shared by a test, the daemon and the
/// sandbox so that all three agree on what time it is.
#[derive(Debug)]
pub struct ManualClock {
    now_unix_ms: AtomicI64,
}

impl ManualClock {
    pub fn starting_at(now_unix_ms: i64) -> Arc<Self> {
        Arc::new(Self {
            now_unix_ms: AtomicI64::new(now_unix_ms),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.now_unix_ms
            .fetch_add(duration_ms(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.now_unix_ms.load(Ordering::SeqCst)
    }
}

/// A duration in whole milliseconds, saturating instead of wrapping.
pub(crate) fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
