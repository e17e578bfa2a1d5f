//! The periodic jobs (the token refresh sweep, audit pruning) on
//! tokio-cron-scheduler. The scheduler only triggers plain async functions
//! that tests call directly; stopping cancels every job, so none starts after
//! [`Schedules::stop`] even if the scheduler ticks once more.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

type JobFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A cron expression the scheduler accepts: six fields, seconds first, UTC.
///
/// Checked when the config loads, with the very parser tokio-cron-scheduler
/// 0.15 runs in `Job::new_async` (croner, seconds required, day of month and
/// day of week both honoured), so `check-config` refuses exactly what the
/// scheduler would refuse at start: a schedule that only the scheduler
/// rejects would pass the check and then stop `serve` with exit 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule(String);

impl CronSchedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_or_else(text, "")
    }

    /// Like [`Self::parse`], with the error naming what else the setting
    /// takes (`or "off"`).
    pub(crate) fn parse_or_else(text: &str, alternative: &str) -> Result<Self, String> {
        Self::parser()
            .parse(text)
            .map_err(|error| {
                format!(
                    "{text:?} is not a six-field cron (seconds first, e.g. \"*/15 * * * * *\"){alternative}: {error}"
                )
            })?;
        Ok(Self(text.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The longest wait for the next tick, from any moment: found by walking
    /// two days of ticks from a fixed start (a sparser cron shows its first
    /// gap, which is longer than any watchdog).
    pub(crate) fn longest_gap(&self) -> std::time::Duration {
        let cron = Self::parser()
            .parse(&self.0)
            .expect("checked when the schedule was parsed");
        // 2026-01-01T00:00:00Z: any fixed start will do.
        let start = chrono::DateTime::from_timestamp(1_767_225_600, 0).expect("a valid instant");
        let horizon = start + chrono::TimeDelta::days(2);
        let mut previous = start;
        let mut longest = chrono::TimeDelta::zero();
        // Step by hand: croner 3.0.1's `iter_after` skips every other tick
        // of an every-second cron.
        while let Ok(tick) = cron.find_next_occurrence(&previous, false) {
            longest = longest.max(tick - previous);
            previous = tick;
            if tick > horizon {
                break;
            }
        }
        longest.to_std().unwrap_or_default()
    }

    fn parser() -> CronParser {
        CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
    }
}

impl std::fmt::Display for CronSchedule {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for CronSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A job: when it runs and the work it triggers.
pub(crate) struct ScheduledJob {
    pub(crate) cron: CronSchedule,
    pub(crate) work: Arc<dyn Fn() -> JobFuture + Send + Sync>,
}

impl ScheduledJob {
    pub(crate) fn new<F, Fut>(cron: &CronSchedule, work: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            cron: cron.clone(),
            work: Arc::new(move || Box::pin(work())),
        }
    }
}

pub(crate) struct Schedules {
    scheduler: JobScheduler,
    cancelled: CancellationToken,
}

impl Schedules {
    pub(crate) async fn start(jobs: Vec<ScheduledJob>) -> Result<Self, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        let cancelled = CancellationToken::new();
        for job in jobs {
            let job_cancelled = cancelled.clone();
            let work = job.work;
            let job = Job::new_async(job.cron.as_str(), move |_id, _scheduler| {
                let cancelled = job_cancelled.clone();
                let run = work();
                Box::pin(async move {
                    if cancelled.is_cancelled() {
                        return;
                    }
                    tokio::select! {
                        () = run => {}
                        () = cancelled.cancelled() => {}
                    }
                })
            })?;
            scheduler.add(job).await?;
        }
        scheduler.start().await?;
        Ok(Self {
            scheduler,
            cancelled,
        })
    }

    pub(crate) async fn stop(mut self) {
        self.cancelled.cancel();
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "the scheduler did not shut down cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_parses_exactly_when_the_scheduler_takes_it() {
        let cases = [
            ("*/15 * * * * *", true),
            ("0 17 * * * *", true),
            ("0 0 0 1 1 *", true),
            ("0 */2 * * * MON-FRI", true),
            ("a b c d e f", false),
            ("99 * * * * *", false),
            ("x y z 1 2 3", false),
            ("*/5 * * * *", false),
            ("", false),
        ];
        for (text, valid) in cases {
            assert_eq!(CronSchedule::parse(text).is_ok(), valid, "{text:?}");
            let scheduler_takes_it =
                Job::new_async(text, |_id, _scheduler| Box::pin(async {})).is_ok();
            assert_eq!(scheduler_takes_it, valid, "the scheduler on {text:?}");
        }
        let error = CronSchedule::parse("99 * * * * *").unwrap_err();
        assert!(
            error.starts_with("\"99 * * * * *\" is not a six-field cron"),
            "{error}"
        );
    }

    #[test]
    fn the_longest_gap_is_the_widest_wait_between_ticks() {
        let gap = |text: &str| CronSchedule::parse(text).unwrap().longest_gap().as_secs();
        assert_eq!(gap("* * * * * *"), 1);
        assert_eq!(gap("*/15 * * * * *"), 15);
        assert_eq!(gap("0 */2 * * * *"), 120);
        assert_eq!(gap("0,10 * * * * *"), 50);
        assert!(gap("0 0 0 1 1 *") > 2 * 86_400);
    }
}
