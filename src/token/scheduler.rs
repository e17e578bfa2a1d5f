//! Wires the refresh sweep to tokio-cron-scheduler. The scheduler only
//! triggers [`TokenManager::sweep`]; the sweep itself is a plain function.

use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

use super::TokenManager;

/// A running sweep schedule. Stopping it cancels the job, so no sweep starts
/// after [`SweepSchedule::stop`] returns even if the scheduler ticks once more.
pub struct SweepSchedule {
    scheduler: JobScheduler,
    cancelled: CancellationToken,
}

impl SweepSchedule {
    /// Starts sweeping on `cron` (six fields, seconds first, UTC).
    pub async fn start(tokens: TokenManager, cron: &str) -> Result<Self, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        let cancelled = CancellationToken::new();
        let job_cancelled = cancelled.clone();
        let job = Job::new_async(cron, move |_id, _scheduler| {
            let tokens = tokens.clone();
            let cancelled = job_cancelled.clone();
            Box::pin(async move {
                if cancelled.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = tokens.sweep() => {}
                    () = cancelled.cancelled() => {}
                }
            })
        })?;
        scheduler.add(job).await?;
        scheduler.start().await?;
        Ok(Self {
            scheduler,
            cancelled,
        })
    }

    pub async fn stop(mut self) {
        self.cancelled.cancel();
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "the refresh scheduler did not shut down cleanly");
        }
    }
}
