//! Composition root: builds every part in order (config secrets → store →
//! config sync → token state → registry → lookup) and runs the gRPC server
//! with the refresh schedule, stopping them in the reverse order. The only
//! module that knows all the others.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::douyin::DouyinClient;
use crate::grpc::{self, GrpcDependencies};
use crate::lookup::LookupService;
use crate::registry::Registry;
use crate::store::Store;
use crate::token::TokenManager;
use crate::token::scheduler::SweepSchedule;

/// The daemon's parts, built and connected. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub clock: SharedClock,
    pub store: Store,
    pub tokens: TokenManager,
    pub registry: Registry,
    pub lookup: LookupService,
}

impl App {
    /// Opens the database, syncs the config's apps and merchants into it and
    /// loads every stored token. Fetches nothing.
    pub async fn start(config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let apps = config.resolve_apps(
            |name| std::env::var(name).ok(),
            credentials_directory.as_deref(),
        )?;
        let merchants = config.resolve_merchants()?;
        let store = Store::open(&config.database).await?;
        Registry::sync_config(&store, &apps, &merchants, clock.now_unix_ms())
            .await
            .context("cannot sync the config's apps and merchants into the database")?;
        let douyin = DouyinClient::new(&config.douyin).context("cannot build the HTTP client")?;
        let tokens = TokenManager::load(
            store.clone(),
            douyin.clone(),
            clock.clone(),
            &config.refresh,
        )
        .await?;
        let registry = Registry::load(store.clone(), tokens.clone(), clock.clone()).await?;
        let lookup = LookupService::new(registry.clone(), tokens.clone(), douyin, &config.lookup);
        Ok(Self {
            config: Arc::new(config),
            clock,
            store,
            tokens,
            registry,
            lookup,
        })
    }

    /// Serves gRPC on `listener` and runs the refresh schedule until `shutdown`
    /// completes; then health turns NOT_SERVING, the listener closes, in-flight
    /// calls get `shutdown_grace` to finish, and the schedule stops.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let schedule = if self.config.refresh.sweep == "off" {
            None
        } else {
            let schedule = SweepSchedule::start(self.tokens.clone(), &self.config.refresh.sweep)
                .await
                .context("cannot start the refresh schedule")?;
            // Apps without a valid token get one now rather than at the first tick.
            let tokens = self.tokens.clone();
            tokio::spawn(async move { tokens.sweep().await });
            Some(schedule)
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        let shutdown_begun = CancellationToken::new();
        let signal_shutdown = shutdown_begun.clone();
        let server_shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: no new calls accepted");
            signal_shutdown.cancel();
        };
        let dependencies = GrpcDependencies {
            lookup: self.lookup.clone(),
            registry: self.registry.clone(),
            tokens: self.tokens.clone(),
            clock: self.clock.clone(),
        };
        tracing::info!(address = %listener.local_addr()?, "serving gRPC");
        let grace = self.config.shutdown_grace;
        let served = tokio::select! {
            served = grpc::serve(dependencies, listener, health, health_service, server_shutdown) => served.context("the gRPC server failed"),
            () = async { shutdown_begun.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_s = grace.as_secs(), "in-flight calls did not finish within the grace period; dropping them");
                Ok(())
            }
        };
        if let Some(schedule) = schedule {
            schedule.stop().await;
        }
        served
    }

    /// Closes the database pool; call after `serve` returned.
    pub async fn close(&self) {
        self.store.close().await;
    }
}
