//! The periodic jobs (the token refresh sweep, audit pruning) on
//! tokio-cron-scheduler. The scheduler only triggers plain async functions
//! that tests call directly; stopping cancels every job, so none starts after
//! [`Schedules::stop`] even if the scheduler ticks once more.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

type JobFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A job: a six-field cron (seconds first, UTC) and the work it triggers.
pub struct ScheduledJob {
    pub cron: String,
    pub work: Arc<dyn Fn() -> JobFuture + Send + Sync>,
}

impl ScheduledJob {
    pub fn new<F, Fut>(cron: &str, work: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            cron: cron.to_owned(),
            work: Arc::new(move || Box::pin(work())),
        }
    }
}

pub struct Schedules {
    scheduler: JobScheduler,
    cancelled: CancellationToken,
}

impl Schedules {
    pub async fn start(jobs: Vec<ScheduledJob>) -> Result<Self, JobSchedulerError> {
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

    pub async fn stop(mut self) {
        self.cancelled.cancel();
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "the scheduler did not shut down cleanly");
        }
    }
}
