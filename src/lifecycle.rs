//! Supervision of the daemon's background components (health publisher,
//! metrics listener, watchdog pinger, reload handler): each runs on a task of
//! its own until shutdown, and one that ends before shutdown, by returning or
//! by panicking, is a failure that stops the daemon with a non-zero exit.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tokio::task::JoinSet;

/// The running components.
#[derive(Default)]
pub(crate) struct Components {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Components {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Runs `component` until it ends; it must watch for shutdown itself.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        component: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.tasks.spawn(async move { (name, component.await) });
    }

    /// Completes when the first component ends, with why that is a failure;
    /// never completes while none ends (or when there are none).
    pub(crate) async fn first_failure(&mut self) -> anyhow::Error {
        match self.tasks.join_next().await {
            Some(Ok((name, Ok(())))) => anyhow!("the {name} stopped unexpectedly"),
            Some(Ok((name, Err(error)))) => error.context(format!("the {name} failed")),
            Some(Err(join_error)) if join_error.is_panic() => {
                anyhow!("a component panicked: {join_error}")
            }
            Some(Err(join_error)) => anyhow!("a component was cancelled: {join_error}"),
            None => std::future::pending().await,
        }
    }

    /// Waits up to `within` for every component to end after shutdown began,
    /// then aborts the rest. Failures during shutdown are logged, not returned:
    /// the daemon is stopping anyway.
    pub(crate) async fn wait_for_all(mut self, within: Duration) {
        let drained = tokio::time::timeout(within, async {
            while let Some(ended) = self.tasks.join_next().await {
                match ended {
                    Ok((name, Err(error))) => {
                        tracing::warn!(component = name, error = %format!("{error:#}"), "component failed while stopping");
                    }
                    Err(join_error) if join_error.is_panic() => {
                        tracing::warn!(%join_error, "component panicked while stopping");
                    }
                    _ => {}
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                within_s = within.as_secs(),
                "components still running after shutdown; aborting them"
            );
            self.tasks.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_component_that_returns_panics_or_fails_before_shutdown_is_a_failure() {
        let mut components = Components::new();
        components.spawn("quitter", async { Ok(()) });
        let failure = components.first_failure().await;
        assert_eq!(failure.to_string(), "the quitter stopped unexpectedly");

        components.spawn("failer", async { Err(anyhow!("port gone")) });
        let failure = components.first_failure().await;
        assert_eq!(format!("{failure:#}"), "the failer failed: port gone");

        components.spawn("panicker", async { panic!("boom") });
        let failure = components.first_failure().await;
        assert!(failure.to_string().contains("panicked"), "{failure}");
    }

    #[tokio::test(start_paused = true)]
    async fn components_that_ignore_shutdown_are_aborted_after_the_wait() {
        /// Notes that the future holding it was dropped, i.e. aborted.
        struct DroppedFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for DroppedFlag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let aborted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DroppedFlag(std::sync::Arc::clone(&aborted));
        let mut components = Components::new();
        components.spawn("stubborn", async move {
            let _flag = flag;
            std::future::pending().await
        });
        components.spawn("prompt", async { Ok(()) });
        let started = tokio::time::Instant::now();
        components.wait_for_all(Duration::from_secs(5)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "it waited the full time"
        );
        assert!(
            aborted.load(std::sync::atomic::Ordering::SeqCst),
            "the stubborn component was aborted"
        );
    }
}
