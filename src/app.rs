//! Composition root: builds every part in order (config secrets → store →
//! config sync → token state → registry → lookup) and runs the gRPC server
//! with the refresh schedule, stopping them in the reverse order. The only
//! module that knows all the others.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::after_sale_events::AfterSaleEvents;
use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, Declarations};
use crate::douyin::DouyinClient;
use crate::grpc::health::{self, HealthPublisher};
use crate::grpc::{self, GrpcDependencies};
use crate::lifecycle::Components;
use crate::lookup::LookupService;
use crate::lookup::refund_audit::DecisionBook;
use crate::metrics::{self, Metrics, ScrapeTimeCollector, ScrapeTimeReadings};
use crate::registry::Registry;
use crate::reload::{self, Reloader};
use crate::schedule::{ScheduledJob, Schedules};
use crate::store::{MasterKeyOutcome, Store};
use crate::systemd_notify::{self, SystemdNotifier, WatchdogFeed};
use crate::token::TokenManager;
use crate::transport::{Listener, server_tls, webhook_tls};
use crate::webhook::{self, WebhookReceiver};

/// How long the components get to stop after the gRPC server drained.
const COMPONENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`App::serve_with`] runs besides gRPC; the default runs nothing more.
#[derive(Default)]
pub struct ServeOptions {
    /// Serves Prometheus metrics; the caller binds it from `metrics_listen`.
    pub metrics_listener: Option<TcpListener>,
    /// Receives Douyin's notifications; the caller binds it from `webhook.listen`.
    pub webhook_listener: Option<TcpListener>,
    /// systemd's notify socket: READY, RELOADING, STOPPING and the watchdog.
    pub notifier: SystemdNotifier,
    /// Each item asks to re-read apps, merchants and API clients from
    /// `config_path` (SIGHUP).
    pub reload_requests: Option<BoxStream<'static, ()>>,
    /// The file reloads re-read (SIGHUP, AdminService.ReloadConfig); None:
    /// defaults and environment, as at start.
    pub config_path: Option<PathBuf>,
    /// Where to write a key that may only reload the configuration, made
    /// afresh at each start (`$RUNTIME_DIRECTORY/reload.key` under systemd):
    /// the unit's `ExecReload=douyin-tokend reload` reads it, so
    /// `systemctl reload` works without an operator's key in the service.
    pub reload_key_file: Option<PathBuf>,
}

/// The daemon's parts, built and connected. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub(crate) clock: SharedClock,
    pub(crate) store: Store,
    pub tokens: TokenManager,
    pub(crate) registry: Registry,
    pub lookup: LookupService,
    pub audit: AuditLog,
    /// The refund-request notifications the webhook stored.
    pub events: AfterSaleEvents,
    /// Handles to the metric families, as the recording modules hold them.
    pub(crate) metrics: Metrics,
    /// This daemon's metrics and scrape-time readings, served on `metrics_listen`.
    pub(crate) metrics_registry: Arc<prometheus_client::registry::Registry>,
    /// Work started on tasks of its own (the first sweep, token fetches,
    /// lookup flights): `close` waits for it before the pool closes.
    tasks: TaskTracker,
}

impl App {
    /// Opens the database, syncs the config's apps and merchants into it and
    /// loads every stored token. Fetches nothing.
    pub async fn start(config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        let declarations = resolve_declarations(&config)?;
        let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        config.check_master_key_file(credentials_directory.as_deref())?;
        let master_key_path = config.master_key_path(credentials_directory.as_deref())?;
        let database = config.database_location(credentials_directory.as_deref())?;
        let (store, key_outcome) = Store::open_location(&database, &master_key_path).await?;
        if let MasterKeyOutcome::Created(path) = key_outcome {
            tracing::warn!(
                path = %path.display(),
                "created a new master key (mode 0600) for a new database; back it up: without it the stored secrets cannot be read"
            );
        }
        Registry::sync_config(&store, &declarations, clock.now_unix_ms())
            .await
            .context("cannot sync the config's apps, merchants and clients into the database")?;
        let mut metrics_registry = metrics::new_registry();
        let metrics = Metrics::register_in(&mut metrics_registry);
        let douyin = DouyinClient::new(&config.douyin, metrics.clone())
            .context("cannot build the HTTP client")?;
        let audit = AuditLog::start(store.clone(), clock.clone());
        let events = AfterSaleEvents::start(store.clone(), clock.clone())
            .await
            .context("cannot start the after-sale event log")?;
        let tasks = TaskTracker::new();
        let tokens = TokenManager::load(
            store.clone(),
            douyin.clone(),
            clock.clone(),
            &config,
            audit.clone(),
            metrics.clone(),
            tasks.clone(),
        )
        .await?;
        let registry = Registry::load(store.clone(), tokens.clone(), clock.clone()).await?;
        let registered_apps: std::collections::HashSet<crate::domain::ClientKey> = registry
            .list_apps()
            .await?
            .into_iter()
            .map(|app| app.client_key)
            .collect();
        for key in config
            .lookup
            .per_app_rates_for_unknown_apps(|client_key| registered_apps.contains(client_key))
        {
            tracing::warn!(
                config_key = %key,
                "a per-app rate names an app that is neither declared nor registered; it applies only once that app is registered"
            );
        }
        let lookup = LookupService::new(
            registry.clone(),
            tokens.clone(),
            douyin,
            &config.lookup,
            tasks.clone(),
            DecisionBook::new(store.clone(), audit.clone(), clock.clone()),
        );
        metrics_registry.register_collector(Box::new(scrape_time_collector(
            tokens.clone(),
            lookup.clone(),
            clock.clone(),
        )));
        Ok(Self {
            tasks,
            config: Arc::new(config),
            clock,
            store,
            tokens,
            registry,
            lookup,
            audit,
            events,
            metrics,
            metrics_registry: Arc::new(metrics_registry),
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
        self.serve_with(listener, ServeOptions::default(), shutdown)
            .await
    }

    /// [`App::serve`] with the service extras: the metrics listener, systemd
    /// notifications and watchdog, and configuration reloads. The order:
    ///
    /// 1. start the refresh schedule (and a first sweep), publish health, start
    ///    the components, then tell systemd READY (the listeners are bound by
    ///    the caller, so calls already queue);
    /// 2. run until `shutdown` completes or a component ends (a failure);
    /// 3. STOPPING: health NOT_SERVING, stop accepting, give in-flight calls
    ///    `shutdown_grace`, stop the components and the schedule.
    ///
    /// Returns an error when a component failed, so the process exits non-zero.
    pub async fn serve_with(
        &self,
        listener: impl Into<Listener>,
        options: ServeOptions,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let ServeOptions {
            metrics_listener,
            webhook_listener,
            notifier,
            reload_requests,
            config_path,
            reload_key_file,
        } = options;
        let listener = listener.into();
        let tls = self.config.tls.as_ref().map(server_tls).transpose()?;
        let webhook_tls = self
            .config
            .webhook
            .tls
            .as_ref()
            .map(webhook_tls)
            .transpose()?;
        let grpc_address = listener.describe();
        let sweeping = self.config.refresh.sweep.is_some();
        let schedule = Schedules::start(self.scheduled_jobs())
            .await
            .context("cannot start the scheduled jobs")?;
        if sweeping {
            // Apps without a valid token get one now rather than at the first tick.
            let tokens = self.tokens.clone();
            self.tasks.spawn(async move { tokens.sweep().await });
        }

        let reporter = tonic_health::server::HealthReporter::new();
        let stopping = CancellationToken::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            health::HealthEndingAtShutdown::new(reporter.clone(), stopping.clone()),
        );
        let health = HealthPublisher::new(reporter);
        health
            .publish_token_availability(self.tokens.any_token_servable())
            .await;
        let mut components = Components::new();
        components.spawn(
            "health publisher",
            health::keep_token_availability_published(
                health.clone(),
                self.tokens.clone(),
                stopping.clone(),
            )
            .map(Ok),
        );
        let mut status = format!(
            "serving gRPC on {grpc_address}{}",
            if tls.is_some() { " (TLS)" } else { "" }
        );
        if let Some(metrics_listener) = metrics_listener {
            let metrics_address = metrics_listener.local_addr()?;
            status.push_str(&format!(", metrics on http://{metrics_address}/metrics"));
            components.spawn(
                "metrics listener",
                metrics::serve(
                    metrics_listener,
                    self.metrics_registry.clone(),
                    stopping.clone().cancelled_owned(),
                )
                .map(|served| served.context("cannot serve metrics")),
            );
        }
        if self.store.is_shared() {
            let parts = crate::cluster::ClusterParts {
                store: self.store.clone(),
                tokens: self.tokens.clone(),
                registry: self.registry.clone(),
                events: self.events.clone(),
                lookup: self.lookup.clone(),
                metrics: self.metrics.clone(),
            };
            crate::cluster::join(&parts).await;
            components.spawn(
                "cluster link",
                crate::cluster::run(
                    parts,
                    self.config.cluster_settings().reconnect_backoff_max,
                    stopping.clone(),
                ),
            );
        }
        if let Some(webhook_listener) = webhook_listener {
            let webhook_address = webhook_listener.local_addr()?;
            let scheme = if webhook_tls.is_some() {
                "https"
            } else {
                "http"
            };
            let path = self.config.webhook.path.clone();
            status.push_str(&format!(", webhook on {scheme}://{webhook_address}{path}"));
            let tokens = self.tokens.clone();
            let receiver = WebhookReceiver::new(
                self.events.clone(),
                Arc::new(move |client_key| tokens.app_secret(client_key)),
                self.metrics.clone(),
                self.config.webhook.max_body_bytes,
            );
            let stopping = stopping.clone();
            components.spawn("webhook listener", async move {
                webhook::serve(webhook_listener, webhook_tls, &path, receiver, stopping)
                    .await
                    .context("cannot serve the webhook")
            });
        }
        if let Some(timeout) = notifier.watchdog_timeout() {
            let feed = if sweeping {
                WatchdogFeed::SweepHeartbeat(self.tokens.sweep_heartbeat())
            } else {
                tracing::warn!(
                    "the refresh sweep is off: the systemd watchdog only sees that the process runs"
                );
                WatchdogFeed::RuntimeOnly
            };
            components.spawn(
                "watchdog pinger",
                systemd_notify::run_watchdog(notifier.clone(), timeout, feed, stopping.clone())
                    .map(Ok),
            );
        }
        let reloader = Reloader::new(
            self.registry.clone(),
            self.audit.clone(),
            config_path,
            notifier.clone(),
            status.clone(),
        );
        if let Some(reload_requests) = reload_requests {
            components.spawn(
                "reload handler",
                handle_reload_signals(reloader.clone(), reload_requests, stopping.clone()),
            );
        }
        if let Some(path) = &reload_key_file {
            // Without the key, `systemctl reload` fails (truthfully) and
            // SIGHUP still reloads: not a reason to refuse to serve.
            if let Err(error) = self.write_reload_key(path).await {
                tracing::warn!(
                    error = %format!("{error:#}"),
                    "no reload key: `douyin-tokend reload` needs an API key with the admin or config.reload scope; SIGHUP still reloads"
                );
            }
        }

        let grpc_shutdown = {
            let stopping = stopping.clone();
            let health = health.clone();
            let notifier = notifier.clone();
            async move {
                stopping.cancelled().await;
                // Tell load balancers first, then stop accepting (tonic closes
                // the listener as soon as this future completes).
                health.publish_stopping().await;
                notifier.stopping("stopping: finishing in-flight calls");
            }
        };
        let dependencies = GrpcDependencies {
            lookup: self.lookup.clone(),
            registry: self.registry.clone(),
            tokens: self.tokens.clone(),
            clock: self.clock.clone(),
            audit: self.audit.clone(),
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            reloader,
            stopping: stopping.clone(),
        };
        let mut grpc = std::pin::pin!(grpc::serve(
            dependencies,
            listener,
            tls,
            health_service,
            grpc_shutdown
        ));
        tracing::info!(address = %grpc_address, "serving gRPC");
        notifier.ready(&status);

        let mut grpc_ended = false;
        let mut failure = tokio::select! {
            () = shutdown => None,
            served = &mut grpc => {
                grpc_ended = true;
                Some(match served {
                    Ok(()) => anyhow!("the gRPC server stopped unexpectedly"),
                    Err(error) => anyhow::Error::new(error).context("the gRPC server failed"),
                })
            }
            failure = components.first_failure() => Some(failure),
        };
        match &failure {
            None => tracing::info!("shutting down: health NOT_SERVING, no new calls accepted"),
            Some(error) => {
                tracing::error!(error = %format!("{error:#}"), "a component failed; shutting down")
            }
        }
        stopping.cancel();
        if grpc_ended {
            notifier.stopping("stopping after a failure");
        } else {
            let grace = self.config.shutdown_grace;
            match tokio::time::timeout(grace, &mut grpc).await {
                Ok(Ok(())) => tracing::info!("in-flight calls finished"),
                Ok(Err(error)) => {
                    failure.get_or_insert(
                        anyhow::Error::new(error).context("the gRPC server failed while stopping"),
                    );
                }
                Err(_) => tracing::warn!(
                    grace_s = grace.as_secs(),
                    "in-flight calls did not finish within the grace period; dropping them"
                ),
            }
        }
        components.wait_for_all(COMPONENT_STOP_TIMEOUT).await;
        schedule.stop().await;
        if let Some(path) = &reload_key_file {
            // The key dies with this process; a stale file would only mislead.
            let _ = std::fs::remove_file(path);
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The periodic jobs: the refresh sweep (unless "off"), and pruning of the
    /// audit trail and of after-sale events on the same schedule.
    fn scheduled_jobs(&self) -> Vec<ScheduledJob> {
        let mut jobs = Vec::new();
        if let Some(sweep) = &self.config.refresh.sweep {
            let tokens = self.tokens.clone();
            jobs.push(ScheduledJob::new(sweep, move || {
                let tokens = tokens.clone();
                async move {
                    tokens.sweep().await;
                }
            }));
        }
        // One pruning job for both: the audit trail and the after-sale events
        // are kept on the same schedule, each for its own retention.
        let (audit, events) = (self.audit.clone(), self.events.clone());
        let (audit_retention, event_retention) =
            (self.config.audit.retention, self.config.webhook.retention);
        jobs.push(ScheduledJob::new(&self.config.audit.prune, move || {
            let (audit, events) = (audit.clone(), events.clone());
            async move {
                let audit_pruned = audit.prune(audit_retention).await;
                let events_pruned = events.prune(event_retention).await;
                for (what, pruned) in [
                    ("the audit trail", audit_pruned),
                    ("after-sale events", events_pruned),
                ] {
                    if let Err(error) = pruned {
                        tracing::error!(%error, what, "pruning failed; will try at the next tick");
                    }
                }
            }
        }));
        jobs
    }

    /// Makes a key that may only reload the configuration (scope
    /// `config.reload`), lets it call, and writes it to `path` readable by
    /// the daemon's user alone (mode 0600; root reads it too).
    async fn write_reload_key(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = crate::access::generate_api_key();
        let client = crate::access::ApiClient::declare(
            reload::RELOAD_KEY_CLIENT,
            crate::access::KeyHash::of_key(&key),
            [crate::access::Scope::ConfigReload].into(),
            None,
            None,
        )?;
        // A file left by an earlier run holds a key nobody accepts any more.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(
                    anyhow::Error::new(error).context(format!("cannot replace {}", path.display()))
                );
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(format!("{key}\n").as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.registry
            .admit_internal_client(client)
            .await
            .context("cannot admit the reload key")?;
        tracing::info!(path = %path.display(), "reload key written for `douyin-tokend reload`");
        Ok(())
    }

    /// Waits (up to `COMPONENT_STOP_TIMEOUT`) for the work still running on
    /// its own tasks (a sweep, token fetches, lookup flights) so a token
    /// fetched during shutdown is still stored, then writes the last audit
    /// lines, ends the event writer and closes the database. Call after `serve` returned.
    pub async fn close(&self) {
        self.tasks.close();
        if tokio::time::timeout(COMPONENT_STOP_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                "work still running after the stop timeout is dropped; the database closes under it"
            );
        }
        self.audit.stop().await;
        self.events.stop().await;
        self.store.close().await;
    }
}

/// Turns each SIGHUP into a reload, until shutdown; a stream that ends
/// early is a failure (signals could no longer arrive).
async fn handle_reload_signals(
    reloader: Reloader,
    mut reload_requests: BoxStream<'static, ()>,
    stopping: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = stopping.cancelled() => return Ok(()),
            request = reload_requests.next() => {
                if request.is_none() {
                    return Err(anyhow!("reload requests can no longer arrive"));
                }
            }
        }
        // The reloader logs, audits and tells systemd; a signal has nobody
        // else to answer.
        let _ = reloader.reload(reload::SIGNAL).await;
    }
}

/// Reads the token gauges and the lookup counters on every scrape, so they
/// are never stale and nobody has to push them.
fn scrape_time_collector(
    tokens: TokenManager,
    lookup: LookupService,
    clock: SharedClock,
) -> ScrapeTimeCollector {
    ScrapeTimeCollector::new(move || {
        let now_ms = clock.now_unix_ms();
        let counters = lookup.counters();
        let read = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        ScrapeTimeReadings {
            app_tokens: tokens
                .status()
                .iter()
                .map(|view| view.metric_reading(now_ms))
                .collect(),
            token_budget_global_remaining: u64::try_from(tokens.budget_remaining())
                .unwrap_or(u64::MAX),
            lookups_coalesced: read(&counters.coalesced),
            lookup_retries: read(&counters.retries),
            lookups_not_admitted: read(&counters.not_admitted),
            lookup_cache_hits: read(&counters.cache_hits),
        }
    })
}

/// Refuses a refresh sweep that ticks too rarely to feed systemd's watchdog
/// (`WATCHDOG_USEC`, as systemd sets it from the unit's `WatchdogSec=`): the
/// pinger pings only while a sweep completed within that time, so such a
/// sweep would get the service killed over and over. Without a watchdog
/// there is nothing to feed.
pub fn check_watchdog_feed(
    config: &Config,
    watchdog_usec: Option<&str>,
) -> Result<(), ConfigError> {
    let Some(watchdog) = systemd_notify::watchdog_timeout_in(watchdog_usec) else {
        return Ok(());
    };
    let Some(sweep) = &config.refresh.sweep else {
        return Ok(());
    };
    // The scheduler may tick up to ~0.5 s late.
    let slack = Duration::from_millis(500);
    let gap = sweep.longest_gap();
    if gap + slack >= watchdog {
        return Err(ConfigError::Invalid {
            key: "refresh.sweep".to_owned(),
            message: format!(
                "\"{sweep}\" ticks up to {} s apart, but the systemd watchdog (WATCHDOG_USEC, {} s) needs a completed sweep more often than that; sweep at least every {} s, or raise WatchdogSec",
                gap.as_secs(),
                watchdog.as_secs(),
                watchdog.saturating_sub(slack).as_secs() / 2
            ),
        });
    }
    Ok(())
}

/// Proves the `[tls]` and `[webhook.tls]` files (certificates and key parse, the key belongs to
/// the certificate, the client CA parses), naming the config key when one
/// cannot serve: check-config and serve reject the same files, before
/// anything is created on disk.
pub fn check_tls_files(config: &Config) -> Result<(), ConfigError> {
    let refused = |error: crate::transport::TlsFileError| ConfigError::Invalid {
        key: error.key,
        message: error.message,
    };
    if let Some(tls) = &config.tls {
        server_tls(tls).map_err(refused)?;
    }
    if let Some(tls) = &config.webhook.tls {
        webhook_tls(tls).map_err(refused)?;
    }
    Ok(())
}

/// The config's apps with their secrets read (from `$CREDENTIALS_DIRECTORY`
/// under systemd), its merchants and its API clients.
fn resolve_declarations(config: &Config) -> Result<Declarations, ConfigError> {
    let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    config.resolve_declarations(
        |name| std::env::var(name).ok(),
        credentials_directory.as_deref(),
    )
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
/// The old key file's owner, group and mode, which the new key takes over so
/// the service user can still read it (run as root, a plain write would leave
/// `root:root 0600` and the next start would fail with Permission denied).
struct KeyFileOwnership {
    uid: u32,
    gid: u32,
    mode: u32,
}

impl KeyFileOwnership {
    /// Reads the key file's ownership and refuses when the database's owner
    /// (the service user, who created it) could not read a key with it.
    fn of(key_file: &Path, database: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::metadata(key_file)
            .with_context(|| format!("cannot read the ownership of {}", key_file.display()))?;
        let ownership = Self {
            uid: key.uid(),
            gid: key.gid(),
            mode: key.mode() & 0o777,
        };
        if let Ok(database) = std::fs::metadata(database) {
            let service_uid = database.uid();
            let readable = service_uid == 0
                || (service_uid == ownership.uid && ownership.mode & 0o400 != 0)
                || (database.gid() == ownership.gid && ownership.mode & 0o040 != 0)
                || ownership.mode & 0o004 != 0;
            if !readable {
                anyhow::bail!(
                    "{} ({}:{} mode {:04o}) is not readable by uid {service_uid}, which owns the database; a key written like it would stop the next start. Fix its owner or mode first (e.g. chown {service_uid} {}); nothing was changed",
                    key_file.display(),
                    ownership.uid,
                    ownership.gid,
                    ownership.mode,
                    key_file.display()
                );
            }
        }
        Ok(ownership)
    }

    fn apply_to(&self, file: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(file, Some(self.uid), Some(self.gid)).with_context(|| {
            format!(
                "cannot give {} the old key's owner {}:{}",
                file.display(),
                self.uid,
                self.gid
            )
        })?;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(self.mode))
            .with_context(|| format!("cannot give {} the old key's mode", file.display()))
    }
}

/// `client bootstrap`: creates the first admin client (scope `admin` only)
/// in the database and returns its key for stdout. Refused when an admin
/// client exists already, so it cannot be used to mint keys on a running
/// cluster; a running daemon sees the new client through the store's
/// registry notification.
pub async fn bootstrap_admin_client(
    config: &Config,
    name: &str,
) -> anyhow::Result<crate::cli::CommandOutput> {
    let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    config.check_master_key_file(credentials_directory.as_deref())?;
    let key_file = config.master_key_path(credentials_directory.as_deref())?;
    let location = config.database_location(credentials_directory.as_deref())?;
    let (store, _) = Store::open_location(&location, &key_file).await?;
    let outcome = create_first_admin(
        &store,
        name,
        crate::clock::Clock::now_unix_ms(&crate::clock::SystemClock),
    )
    .await;
    store.close().await;
    outcome
}

async fn create_first_admin(
    store: &Store,
    name: &str,
    now_ms: i64,
) -> anyhow::Result<crate::cli::CommandOutput> {
    let admin = crate::access::Scope::Admin.as_str();
    if let Some(existing) = store
        .clients()
        .list()
        .await?
        .into_iter()
        .find(|client| client.scopes.iter().any(|scope| scope == admin))
    {
        anyhow::bail!(
            "an admin client exists already ({}); create more with `douyin-tokend client create` — nothing was changed",
            existing.name
        );
    }
    let key = crate::access::generate_api_key();
    let declared = crate::access::ApiClient::declare(
        name,
        crate::access::KeyHash::of_key(&key),
        [crate::access::Scope::Admin].into(),
        None,
        None,
    )?;
    let record = crate::store::ClientRecord {
        name: declared.name.clone(),
        key_sha256: declared.key_hash.to_hex(),
        scopes: vec![admin.to_owned()],
        apps: None,
        merchants: None,
        source: crate::store::Source::Admin,
    };
    if !store.clients().create(&record, now_ms).await? {
        anyhow::bail!(
            "a client named {} exists already — nothing was changed",
            record.name
        );
    }
    Ok(crate::cli::CommandOutput {
        stdout: format!("{key}\n"),
        stderr: format!(
            "created the admin client {}; the API key above is shown once and stored only as its SHA-256\n",
            record.name
        ),
    })
}

pub async fn rotate_master_key(config: &Config) -> anyhow::Result<KeyRotation> {
    // A SQLite file's lock proves no daemon is using it; a shared PostgreSQL
    // database has no such proof yet, and a daemon still running on the old
    // key while the rows are re-sealed under the new one would fail.
    let Some(database) = config.sqlite_path() else {
        anyhow::bail!(
            "rotate-master-key works on a SQLite database only for now: with PostgreSQL every daemon sharing the database must be stopped first, and nothing here can check that yet; nothing was changed"
        );
    };
    let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let key_file = config.master_key_path(credentials_directory.as_deref())?;
    if !key_file.exists() {
        anyhow::bail!("no master key at {}; nothing to rotate", key_file.display());
    }
    config.check_master_key_file(credentials_directory.as_deref())?;
    let ownership = KeyFileOwnership::of(&key_file, database)?;
    let (mut store, _) = Store::open(database, &key_file).await?;
    let staged = PathBuf::from(format!("{}.new", key_file.display()));
    if staged.exists() {
        std::fs::remove_file(&staged)
            .with_context(|| format!("cannot remove the stale {}", staged.display()))?;
    }
    let new_key = crate::sealing::MasterKey::generate();
    new_key.write_new(&staged).context(
        "cannot write the new key beside the old one; if the key is a systemd credential, rotate with --config naming a master_key_file at the credential's writable source",
    )?;
    ownership.apply_to(&staged)?;
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
