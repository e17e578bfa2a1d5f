//! Composition root: builds every part in order (config secrets → store →
//! config sync → token state → registry → lookup) and runs the gRPC server
//! with the refresh schedule, stopping them in the reverse order. The only
//! module that knows all the others.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::douyin::DouyinClient;
use crate::grpc::{self, GrpcDependencies};
use crate::lookup::LookupService;
use crate::registry::Registry;
use crate::schedule::{ScheduledJob, Schedules};
use crate::store::{MasterKeyOutcome, Store};
use crate::token::TokenManager;
use crate::transport::{Listener, server_tls};

/// The daemon's parts, built and connected. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub clock: SharedClock,
    pub store: Store,
    pub tokens: TokenManager,
    pub registry: Registry,
    pub lookup: LookupService,
    pub audit: AuditLog,
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
        let master_key_path = config.master_key_path(credentials_directory.as_deref());
        let (store, key_outcome) = Store::open(&config.database, &master_key_path).await?;
        if let MasterKeyOutcome::Created(path) = key_outcome {
            tracing::warn!(
                path = %path.display(),
                "created a new master key (mode 0600) for a new database; back it up: without it the stored secrets cannot be read"
            );
        }
        let clients = config.resolve_clients()?;
        Registry::sync_config(&store, &apps, &merchants, &clients, clock.now_unix_ms())
            .await
            .context("cannot sync the config's apps and merchants into the database")?;
        let douyin = DouyinClient::new(&config.douyin).context("cannot build the HTTP client")?;
        let (audit, _audit_writer) = AuditLog::start(store.clone(), clock.clone());
        let tokens = TokenManager::load(
            store.clone(),
            douyin.clone(),
            clock.clone(),
            &config.refresh,
            audit.clone(),
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
            audit,
        })
    }

    /// Serves gRPC on `listener` and runs the refresh schedule until `shutdown`
    /// completes; then health turns NOT_SERVING, the listener closes, in-flight
    /// calls get `shutdown_grace` to finish, and the schedule stops.
    pub async fn serve(
        &self,
        listener: impl Into<Listener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let listener = listener.into();
        let tls = self.config.tls.as_ref().map(server_tls).transpose()?;
        let mut jobs = Vec::new();
        if self.config.refresh.sweep != "off" {
            let tokens = self.tokens.clone();
            jobs.push(ScheduledJob::new(&self.config.refresh.sweep, move || {
                let tokens = tokens.clone();
                async move {
                    tokens.sweep().await;
                }
            }));
            // Apps without a valid token get one now rather than at the first tick.
            let tokens = self.tokens.clone();
            tokio::spawn(async move { tokens.sweep().await });
        }
        let audit = self.audit.clone();
        let retention = self.config.audit.retention;
        jobs.push(ScheduledJob::new(&self.config.audit.prune, move || {
            let audit = audit.clone();
            async move {
                if let Err(error) = audit.prune(retention).await {
                    tracing::error!(%error, "pruning the audit trail failed; will try at the next tick");
                }
            }
        }));
        let schedule = Schedules::start(jobs)
            .await
            .context("cannot start the scheduled jobs")?;
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
            audit: self.audit.clone(),
        };
        tracing::info!(address = %listener.describe(), tls = tls.is_some(), "serving gRPC");
        let grace = self.config.shutdown_grace;
        let served = tokio::select! {
            served = grpc::serve(dependencies, listener, tls, health, health_service, server_shutdown) => served.context("the gRPC server failed"),
            () = async { shutdown_begun.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_s = grace.as_secs(), "in-flight calls did not finish within the grace period; dropping them");
                Ok(())
            }
        };
        schedule.stop().await;
        served
    }

    /// Closes the database pool; call after `serve` returned.
    pub async fn close(&self) {
        self.audit.flush().await;
        self.store.close().await;
    }
}

/// What a master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotation {
    pub key_file: PathBuf,
    pub values_resealed: usize,
}

/// Re-seals every secret and token of a stopped daemon's database under a new
/// master key and replaces the key file. The new key is written beside the old
/// one first (`<file>.new`) and renamed over it only after the database
/// committed, so a crash leaves either the old pair or the new key ready to rename.
pub async fn rotate_master_key(config: &Config) -> anyhow::Result<KeyRotation> {
    let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let key_file = config.master_key_path(credentials_directory.as_deref());
    if !key_file.exists() {
        anyhow::bail!("no master key at {}; nothing to rotate", key_file.display());
    }
    let (mut store, _) = Store::open(&config.database, &key_file).await?;
    let staged = PathBuf::from(format!("{}.new", key_file.display()));
    if staged.exists() {
        std::fs::remove_file(&staged)
            .with_context(|| format!("cannot remove the stale {}", staged.display()))?;
    }
    let new_key = crate::sealing::MasterKey::generate();
    new_key.write_new(&staged).context(
        "cannot write the new key beside the old one; if the key is a systemd credential, rotate with --config naming a master_key_file at the credential's writable source",
    )?;
    let values_resealed = store.rotate_master_key(new_key).await?;
    std::fs::rename(&staged, &key_file).with_context(|| {
        format!(
            "the database is now sealed with the key in {}; move it to {} by hand",
            staged.display(),
            key_file.display()
        )
    })?;
    store.close().await;
    Ok(KeyRotation {
        key_file,
        values_resealed,
    })
}
