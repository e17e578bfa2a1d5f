//! `grpc.health.v1` statuses: the overall status ("") and the services that
//! hand out tokens follow whether any app can be given a token right now;
//! AdminService serves whenever the daemon runs (it is how an operator fixes a
//! refused secret). Everything turns NOT_SERVING, for good, when shutdown begins,
//! and every open `Watch` then ends (see [`HealthEndingAtShutdown`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService, WatchStream};

use super::SERVICE_NAMES;
use crate::token::TokenManager;

/// The services whose status follows token availability, besides the overall "".
pub(crate) const TOKEN_DEPENDENT_SERVICES: [&str; 3] = [
    "",
    "douyin.goodlife.v1.AfterSaleService",
    "tokend.v1.TokenService",
];
/// Serves whenever the daemon runs.
pub(crate) const ADMIN_SERVICE: &str = "tokend.v1.AdminService";

/// How often token availability is re-checked: tokens expire with time alone,
/// with no event to wake on.
pub(crate) const AVAILABILITY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes statuses to the health service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct HealthPublisher {
    reporter: HealthReporter,
    /// The last published token availability; None once shutdown began, after
    /// which nothing may turn a service back to SERVING.
    published: Arc<Mutex<Option<Option<bool>>>>,
}

impl HealthPublisher {
    pub(crate) fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            published: Arc::new(Mutex::new(Some(None))),
        }
    }

    /// Publishes whether tokens can be handed out; does nothing once stopping.
    pub(crate) async fn publish_token_availability(&self, available: bool) {
        let mut published = self.published.lock().await;
        let Some(last) = published.as_mut() else {
            return;
        };
        if *last == Some(available) {
            return;
        }
        if last.is_none() {
            self.reporter
                .set_service_status(ADMIN_SERVICE, ServingStatus::Serving)
                .await;
        } else if available {
            tracing::info!("a token can be handed out again: health SERVING");
        } else {
            tracing::warn!("no app can be given a token right now: health NOT_SERVING");
        }
        let status = if available {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in TOKEN_DEPENDENT_SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
        *last = Some(available);
    }

    /// Turns every service NOT_SERVING for good: shutdown began.
    pub(crate) async fn publish_stopping(&self) {
        let mut published = self.published.lock().await;
        *published = None;
        for service in ["", SERVICE_NAMES[0], SERVICE_NAMES[1], SERVICE_NAMES[2]] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
}

/// The `grpc.health.v1.Health` service callers see: tonic-health's, except
/// that a `Watch` ends (status OK) right after it has told its caller
/// NOT_SERVING once shutdown began. tonic-health's watches never end, and a
/// graceful stop waits for every open call: a load balancer watching health
/// would hold each stop for the whole `shutdown_grace`.
pub(crate) struct HealthEndingAtShutdown {
    inner: HealthService,
    stopping: CancellationToken,
}

impl HealthEndingAtShutdown {
    /// Serves the statuses `reporter` publishes; `stopping` is cancelled when
    /// shutdown begins, before [`HealthPublisher::publish_stopping`].
    pub(crate) fn new(reporter: HealthReporter, stopping: CancellationToken) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
            stopping,
        }
    }
}

#[tonic::async_trait]
impl Health for HealthEndingAtShutdown {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchEndingAtShutdown;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stopping = self.stopping.clone();
        Ok(self
            .inner
            .watch(request)
            .await?
            .map(|statuses| WatchEndingAtShutdown {
                statuses,
                stopping,
                told_not_serving_at_shutdown: false,
            }))
    }
}

/// One caller's `Watch`: the statuses as tonic-health streams them, ended
/// after the first NOT_SERVING it yields once `stopping` is cancelled (every
/// watcher gets one then: the publisher sets NOT_SERVING after cancelling, and
/// a watch yields every status set, changed or not).
pub(crate) struct WatchEndingAtShutdown {
    statuses: WatchStream,
    stopping: CancellationToken,
    told_not_serving_at_shutdown: bool,
}

impl futures::Stream for WatchEndingAtShutdown {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.told_not_serving_at_shutdown {
            return Poll::Ready(None);
        }
        let next = Pin::new(&mut this.statuses).poll_next(context);
        if let Poll::Ready(Some(Ok(response))) = &next
            && response.status == WireServingStatus::NotServing as i32
            && this.stopping.is_cancelled()
        {
            this.told_not_serving_at_shutdown = true;
        }
        next
    }
}

/// Keeps token availability published until `stop` is cancelled: after every
/// completed sweep and every [`AVAILABILITY_CHECK_INTERVAL`].
pub(crate) async fn keep_token_availability_published(
    publisher: HealthPublisher,
    tokens: TokenManager,
    stop: CancellationToken,
) {
    let mut heartbeat = Some(tokens.sweep_heartbeat());
    let mut checks = tokio::time::interval(AVAILABILITY_CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = checks.tick() => {}
            beat = next_sweep(heartbeat.as_mut()) => {
                if !beat {
                    // The token manager is gone; the interval goes on alone.
                    heartbeat = None;
                }
            }
        }
        publisher
            .publish_token_availability(tokens.any_token_servable())
            .await;
    }
}

/// True after the next completed sweep, false when no sweep can come; never
/// completes without a heartbeat.
async fn next_sweep(heartbeat: Option<&mut tokio::sync::watch::Receiver<u64>>) -> bool {
    match heartbeat {
        Some(heartbeat) => heartbeat.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
