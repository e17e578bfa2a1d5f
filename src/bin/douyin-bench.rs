//! `douyin-bench`: reproducible benchmarks and the soak of douyin-tokend. Each
//! scenario starts a sandbox Douyin in this process, spawns the real
//! `douyin-tokend serve` next to this binary (so the daemon's CPU and memory
//! are read from its own `/proc` entry, apart from the load generator's),
//! drives gRPC load over several connections, and prints a table with the
//! numbers and the machine. BENCHMARKS.md records the commands and results.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/douyin-bench overhead|throughput|tokens|scale|soak|all
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use douyin_tokend::app::App;
use douyin_tokend::bench::fleet::{Fleet, order_id, teach_orders};
use douyin_tokend::bench::measure::{
    Latencies, LatencySummary, Machine, ProcessSample, Table, format_ms, load_average,
};
use douyin_tokend::bench::soak::{self, SoakPlan, SoakReport};
use douyin_tokend::clock::{Clock, ManualClock, SharedClock, SystemClock};
use douyin_tokend::config::Config;
use douyin_tokend::domain::{AccessToken, ClientKey};
use douyin_tokend::douyin::after_sale::{PATH as AFTER_SALE_PATH, decode_after_sale_answer};
use douyin_tokend::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::tokend::v1::GetAccessTokenRequest;
use douyin_tokend::proto::tokend::v1::get_access_token_request::Selector;
use douyin_tokend::proto::tokend::v1::token_service_client::TokenServiceClient;
use douyin_tokend::sandbox::{Fault, Sandbox, SandboxConfig};
use douyin_tokend::store::{NewToken, Store};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Parser)]
#[command(
    name = "douyin-bench",
    about = "Benchmarks and soak of douyin-tokend against the sandbox Douyin, on loopback"
)]
struct Cli {
    /// The daemon binary to spawn (default: douyin-tokend next to this binary;
    /// build both with `cargo build --release --bins`).
    #[arg(long, global = true)]
    daemon_binary: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// 1. The same lookups at a fixed rate, straight to the sandbox over HTTP
    ///    and through the daemon over gRPC, interleaved; percentiles of both.
    Overhead(OverheadArgs),
    /// 2. Maximum sustained lookups/s with enough apps that pacing is not the
    ///    limit, and the daemon's CPU time per lookup.
    Throughput(ThroughputArgs),
    /// 3. GetAccessToken requests/s and latency.
    Tokens(TokensArgs),
    /// 4. 10,000 apps and 100,000 merchants: time to ready, resident memory,
    ///    and the token fetch rate over the first simulated hours.
    Scale(ScaleArgs),
    /// 5. Short tokens, steady load, faults and invalidations for minutes;
    ///    token errors, 2119003, fetches against the minimum, memory over time.
    Soak(SoakArgs),
    /// Every scenario with its default (short) settings, one after another.
    All,
}

#[derive(Debug, Clone, clap::Args)]
struct OverheadArgs {
    /// Lookups per second on each path.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Apps the lookups are spread over (the daemon paces each at 10/s).
    #[arg(long, default_value_t = 200)]
    apps: usize,
    /// gRPC connections to the daemon.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

impl Default for OverheadArgs {
    fn default() -> Self {
        Self {
            rate: 1000,
            seconds: 10,
            warmup_seconds: 2,
            apps: 200,
            connections: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct ThroughputArgs {
    /// Apps: at Douyin's 10 QPS each, 2,000 apps allow about 18,000 lookups/s.
    #[arg(long, default_value_t = 2000)]
    apps: usize,
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Lookups in flight, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

impl Default for ThroughputArgs {
    fn default() -> Self {
        Self {
            apps: 2000,
            seconds: 8,
            concurrency: vec![64, 256],
            connections: 8,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct TokensArgs {
    #[arg(long, default_value_t = 100)]
    apps: usize,
    #[arg(long, default_value_t = 1000)]
    merchants: usize,
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Requests in flight, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

impl Default for TokensArgs {
    fn default() -> Self {
        Self {
            apps: 100,
            merchants: 1000,
            seconds: 8,
            concurrency: vec![8, 32],
            connections: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct ScaleArgs {
    #[arg(long, default_value_t = 10_000)]
    apps: usize,
    #[arg(long, default_value_t = 100_000)]
    merchants: usize,
    /// Simulated hours of the token fetch schedule (manual clock, 15 s sweeps).
    #[arg(long, default_value_t = 4)]
    simulated_hours: u64,
}

impl Default for ScaleArgs {
    fn default() -> Self {
        Self {
            apps: 10_000,
            merchants: 100_000,
            simulated_hours: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct SoakArgs {
    /// Real-time minutes against the spawned daemon.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Overrides --minutes, for quick tries.
    #[arg(long)]
    seconds: Option<u64>,
    #[arg(long, default_value_t = 20)]
    apps: usize,
    /// Lookups per app per second (Douyin allows 10).
    #[arg(long, default_value_t = 5)]
    lookups_per_app: usize,
    /// Run the manual-clock form of tests/soak.rs instead (ten simulated minutes).
    #[arg(long)]
    simulated: bool,
}

impl Default for SoakArgs {
    fn default() -> Self {
        Self {
            minutes: 10,
            seconds: None,
            apps: 20,
            lookups_per_app: 5,
            simulated: false,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // reqwest is built without a default TLS provider (see douyin::DouyinClient).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let daemon_binary = match cli.daemon_binary.clone() {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .join("douyin-tokend"),
    };
    warn_if_daemon_binary_is_stale(&daemon_binary);
    runtime.block_on(async move {
        let bench = Bench { daemon_binary };
        match cli.scenario {
            Scenario::Overhead(arguments) => bench.overhead(&arguments).await,
            Scenario::Throughput(arguments) => bench.throughput(&arguments).await,
            Scenario::Tokens(arguments) => bench.tokens(&arguments).await,
            Scenario::Scale(arguments) => bench.scale(&arguments).await,
            Scenario::Soak(arguments) => bench.soak(&arguments).await,
            Scenario::All => {
                bench.overhead(&OverheadArgs::default()).await?;
                bench.throughput(&ThroughputArgs::default()).await?;
                bench.tokens(&TokensArgs::default()).await?;
                bench.scale(&ScaleArgs::default()).await?;
                bench.soak(&SoakArgs::default()).await
            }
        }
    })
}

struct Bench {
    daemon_binary: PathBuf,
}

/// `cargo run --bin douyin-bench` rebuilds only the bench: a daemon binary
/// older than the bench may predate a change to the daemon's code, and the
/// numbers would then describe the old code.
fn warn_if_daemon_binary_is_stale(daemon_binary: &Path) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|metadata| metadata.modified());
    let (Ok(bench), Ok(daemon)) = (
        std::env::current_exe().and_then(|path| modified(&path)),
        modified(daemon_binary),
    ) else {
        return;
    };
    if daemon < bench {
        eprintln!(
            "warning: {} is older than this bench binary; if the daemon's code changed, rebuild both with `cargo build --release --bins`",
            daemon_binary.display()
        );
    }
}

fn heading(title: &str) {
    println!("\n## {title}\n");
    println!("machine: {}", Machine::describe());
}

fn footer(started: Instant) {
    println!(
        "\nfinished in {:.1} s; load average now {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

// === the spawned daemon ===

/// Settings written into the spawned daemon's config file.
#[derive(Debug, Clone)]
struct DaemonSettings {
    sweep: String,
    /// Extra `[refresh]` lines.
    refresh: String,
    /// Extra `[lookup]` lines.
    lookup: String,
    log_filter: String,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            sweep: "*/15 * * * * *".to_owned(),
            refresh: String::new(),
            lookup: String::new(),
            log_filter: "info,tokio_cron_scheduler=warn,sqlx=warn".to_owned(),
        }
    }
}

/// `douyin-tokend serve` in a child process, on a database the bench filled.
struct SpawnedDaemon {
    child: Child,
    address: String,
    log_path: PathBuf,
}

impl SpawnedDaemon {
    /// Spawns the daemon and waits until its health check answers SERVING;
    /// returns it with the time from spawn to ready.
    async fn start(
        binary: &Path,
        directory: &Path,
        database: &Path,
        sandbox_url: &str,
        settings: &DaemonSettings,
    ) -> anyhow::Result<(Self, Duration)> {
        if !binary.exists() {
            bail!(
                "{} does not exist; build it with `cargo build --release --bins`",
                binary.display()
            );
        }
        // The daemon binds the port itself; take a free one and release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config_path = directory.join("bench-daemon.toml");
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"{}\"\nshutdown_grace = \"1s\"\n\n\
             [douyin]\nbase_url = \"{sandbox_url}\"\n\n\
             [refresh]\nsweep = \"{}\"\n{}\n\n[lookup]\n{}\n\n{}",
            database.display(),
            settings.sweep,
            settings.refresh,
            settings.lookup,
            douyin_tokend::bench::bench_client_toml(),
        );
        std::fs::write(&config_path, config)?;
        let log_path = directory.join("bench-daemon.log");
        let log = std::fs::File::create(&log_path)?;
        let started = Instant::now();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env("RUST_LOG", &settings.log_filter)
            .env_remove("DOUYIN_TOKEND_LISTEN")
            .env_remove("DOUYIN_TOKEND_DATABASE")
            .env_remove("DOUYIN_TOKEND_DOUYIN_BASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut daemon = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            log_path,
        };
        let deadline = started + Duration::from_secs(60);
        loop {
            if daemon.is_serving().await {
                return Ok((daemon, started.elapsed()));
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "the daemon exited with {status} before it was ready; its log: {}",
                    daemon.log_path.display()
                );
            }
            if Instant::now() > deadline {
                daemon.kill();
                bail!("the daemon was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn is_serving(&self) -> bool {
        let Ok(endpoint) = Channel::from_shared(self.address.clone()) else {
            return false;
        };
        let Ok(channel) = endpoint.connect().await else {
            return false;
        };
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|response| response.into_inner().status == 1)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sample(&self) -> ProcessSample {
        ProcessSample::read(self.pid()).unwrap_or_default()
    }

    /// `connections` separate HTTP/2 connections, so load spreads like many clients.
    async fn channels(&self, connections: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            channels.push(
                Channel::from_shared(self.address.clone())?
                    .tcp_nodelay(true)
                    // Bounds every call on the bench's side without telling the
                    // daemon (no grpc-timeout header), so the daemon applies its
                    // own default deadline as it would for most callers.
                    .timeout(CALL_BOUND)
                    .connect()
                    .await?,
            );
        }
        Ok(channels)
    }

    /// Warning and error lines in the daemon's log.
    /// The daemon's warning and error lines, counted by level and message
    /// (fields such as the app left out), e.g. `WARN client_token fetch failed…`.
    fn log_problems(&self) -> BTreeMap<String, usize> {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let mut problems = BTreeMap::new();
        for line in log.lines() {
            let plain = strip_colour_codes(line);
            let Some(level) = ["WARN", "ERROR"]
                .into_iter()
                .find(|level| plain.split_whitespace().nth(1) == Some(*level))
            else {
                continue;
            };
            // `<time> <LEVEL> <target>: <message> <field>=<value> …`
            let message: Vec<&str> = plain
                .split_whitespace()
                .skip(3)
                .take_while(|word| !word.contains('='))
                .collect();
            *problems
                .entry(format!("{level} {}", message.join(" ")))
                .or_default() += 1;
        }
        problems
    }

    /// Ends the child (by its pid, SIGKILL: the database is thrown away).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A sandbox, a fleet taught to it and stored in a fresh database, and
/// optionally a token stored for every app (as a daemon that has been running
/// would have), so that the benchmark does not start by spending the token
/// budget.
struct Setup {
    sandbox: Sandbox,
    fleet: Fleet,
    directory: tempfile::TempDir,
    database: PathBuf,
}

const ORDERS: usize = 1000;

/// No single call of the load generator waits longer than this, so every
/// scenario ends by itself even if the daemon or the sandbox hangs.
const CALL_BOUND: Duration = Duration::from_secs(30);

/// A database holding a fleet, filled once and copied for every start.
struct FilledDatabase {
    _directory: tempfile::TempDir,
    database: PathBuf,
    seconds: f64,
}

async fn fill_database(fleet: Fleet) -> anyhow::Result<FilledDatabase> {
    let directory = tempfile::tempdir()?;
    let database = directory.path().join("template.db");
    let store = Store::open(
        &database,
        &douyin_tokend::bench::master_key_beside(&database),
    )
    .await?
    .0;
    let populated = fleet.store_in(&store, SystemClock.now_unix_ms()).await?;
    // Closing checkpoints the WAL into the file, so a copy of the file is whole.
    store.close().await;
    Ok(FilledDatabase {
        _directory: directory,
        database,
        seconds: populated.seconds,
    })
}

async fn set_up(
    fleet: Fleet,
    sandbox_config: SandboxConfig,
    clock: SharedClock,
    store_tokens: bool,
) -> anyhow::Result<Setup> {
    let filled = fill_database(fleet).await?;
    set_up_from(&filled, fleet, sandbox_config, clock, store_tokens).await
}

async fn set_up_from(
    filled: &FilledDatabase,
    fleet: Fleet,
    sandbox_config: SandboxConfig,
    clock: SharedClock,
    store_tokens: bool,
) -> anyhow::Result<Setup> {
    let sandbox = Sandbox::start(clock.clone(), sandbox_config).await?;
    fleet.teach_sandbox(sandbox.state());
    teach_orders(sandbox.state(), ORDERS);
    let directory = tempfile::tempdir()?;
    let database = directory.path().join("bench.db");
    std::fs::copy(&filled.database, &database)?;
    std::fs::copy(
        douyin_tokend::bench::master_key_beside(&filled.database),
        douyin_tokend::bench::master_key_beside(&database),
    )?;
    let store = Store::open(
        &database,
        &douyin_tokend::bench::master_key_beside(&database),
    )
    .await?
    .0;
    let now_ms = clock.now_unix_ms();
    if store_tokens {
        let lifetime_ms = 7_200_000;
        for app in 0..fleet.apps {
            let client_key = ClientKey::parse(&fleet.client_key(app))?;
            let token = sandbox
                .state()
                .issue_token_out_of_band(&fleet.client_key(app))
                .context("the sandbox knows every bench app")?;
            store
                .save_fetched_token(&NewToken {
                    client_key: &client_key,
                    access_token: &AccessToken::new(token),
                    generation: 1,
                    fetched_at_ms: now_ms,
                    expires_at_ms: now_ms + lifetime_ms,
                })
                .await?;
        }
    }
    store.close().await;
    Ok(Setup {
        sandbox,
        fleet,
        directory,
        database,
    })
}

impl Setup {
    async fn spawn(
        &self,
        binary: &Path,
        settings: &DaemonSettings,
    ) -> anyhow::Result<(SpawnedDaemon, Duration)> {
        SpawnedDaemon::start(
            binary,
            self.directory.path(),
            &self.database,
            &self.sandbox.base_url(),
            settings,
        )
        .await
    }

    fn lookup_request(&self, index: usize) -> GetAfterSaleOrderDetailRequest {
        GetAfterSaleOrderDetailRequest {
            account_id: self.fleet.account_id(index % self.fleet.merchants),
            order_id: order_id(index % ORDERS),
            certificate_id: None,
            include_raw_json: false,
        }
    }
}

/// Outcomes of many calls: latencies of the successes, failures by kind.
#[derive(Debug, Default)]
struct Outcomes {
    latencies: Latencies,
    failures: BTreeMap<String, u64>,
}

impl Outcomes {
    fn record(&mut self, latency: Duration, failure: Option<String>) {
        match failure {
            None => self.latencies.record(latency),
            Some(kind) => *self.failures.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Outcomes) {
        self.latencies.extend(other.latencies);
        for (kind, count) in other.failures {
            *self.failures.entry(kind).or_default() += count;
        }
    }

    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn describe_failures(&self) -> String {
        if self.failures.is_empty() {
            return "none".to_owned();
        }
        self.failures
            .iter()
            .map(|(kind, count)| format!("{count} × {kind}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn status_kind(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
        .chars()
        .take(120)
        .collect()
}

fn latency_cells(summary: &LatencySummary) -> Vec<String> {
    vec![
        format_ms(summary.p50_us),
        format_ms(summary.p90_us),
        format_ms(summary.p99_us),
        format_ms(summary.p999_us),
        format_ms(summary.max_us),
    ]
}

// === scenario 1: overhead ===

impl Bench {
    async fn overhead(&self, arguments: &OverheadArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading(&format!(
            "Overhead: {} lookups/s on each path, straight to the sandbox and through the daemon, interleaved",
            arguments.rate
        ));
        // No per-app limit at the sandbox: the direct path is not paced, and
        // both paths share the apps. The daemon still paces each app at 10/s;
        // the lookups go round-robin over the apps, 5/s each at 1,000/s.
        let sandbox_config = SandboxConfig {
            lookup_qps: 0,
            ..SandboxConfig::default()
        };
        let fleet = Fleet::new(arguments.apps, arguments.apps);
        let setup = set_up(fleet, sandbox_config, Arc::new(SystemClock), true).await?;
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = daemon.channels(arguments.connections).await?;
        // The direct path holds the daemon's own tokens, as a service that
        // asks TokenService and then calls Douyin itself would.
        let mut tokens = Vec::with_capacity(setup.fleet.apps);
        for app in 0..setup.fleet.apps {
            let response = TokenServiceClient::with_interceptor(
                channels[0].clone(),
                douyin_tokend::bench::bench_auth(),
            )
            .get_access_token(GetAccessTokenRequest {
                selector: Some(Selector::ClientKey(setup.fleet.client_key(app))),
            })
            .await?
            .into_inner();
            tokens.push(response.access_token);
        }
        let tokens = Arc::new(tokens);
        let http = reqwest::Client::builder()
            .timeout(CALL_BOUND)
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        let direct_url = format!("{}{AFTER_SALE_PATH}", setup.sandbox.base_url());

        let interval_between = Duration::from_secs_f64(1.0 / f64::from(arguments.rate.max(1)));
        let total = arguments.rate as usize
            * usize::try_from(arguments.seconds + arguments.warmup_seconds)?;
        let warmup = arguments.rate as usize * usize::try_from(arguments.warmup_seconds)?;
        let mut ticker = tokio::time::interval(interval_between);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut direct_calls = Vec::with_capacity(total);
        let mut daemon_calls = Vec::with_capacity(total);
        let mut cpu_at_measure_start = None;
        let mut measure_started = Instant::now();
        for index in 0..total {
            ticker.tick().await;
            if index == warmup {
                cpu_at_measure_start = Some(daemon.sample());
                measure_started = Instant::now();
            }
            let request = setup.lookup_request(index);
            let app = setup.fleet.app_of_merchant(index % setup.fleet.merchants);
            let token = tokens[app].clone();
            let client = http.clone();
            let url = direct_url.clone();
            let direct_request = request.clone();
            let direct = async move {
                let begun = Instant::now();
                let failure = call_sandbox_directly(&client, &url, &token, &direct_request)
                    .await
                    .err();
                (begun.elapsed(), failure)
            };
            let mut grpc = AfterSaleServiceClient::with_interceptor(
                channels[index % channels.len()].clone(),
                douyin_tokend::bench::bench_auth(),
            );
            let through_daemon = async move {
                let begun = Instant::now();
                let failure = grpc
                    .get_after_sale_order_detail(request)
                    .await
                    .err()
                    .map(|status| status_kind(&status));
                (begun.elapsed(), failure)
            };
            // Alternate which path goes first, so neither always queues behind the other.
            if index % 2 == 0 {
                direct_calls.push(tokio::spawn(direct));
                daemon_calls.push(tokio::spawn(through_daemon));
            } else {
                daemon_calls.push(tokio::spawn(through_daemon));
                direct_calls.push(tokio::spawn(direct));
            }
        }
        let mut direct = Outcomes::default();
        let mut through_daemon = Outcomes::default();
        for (index, call) in direct_calls.into_iter().enumerate() {
            let (latency, failure) = call.await?;
            if index >= warmup {
                direct.record(latency, failure);
            }
        }
        for (index, call) in daemon_calls.into_iter().enumerate() {
            let (latency, failure) = call.await?;
            if index >= warmup {
                through_daemon.record(latency, failure);
            }
        }
        let measured_seconds = measure_started.elapsed().as_secs_f64();
        let cpu = daemon
            .sample()
            .cpu
            .saturating_sub(cpu_at_measure_start.unwrap_or_default().cpu);
        let direct_summary = direct.latencies.summary();
        let daemon_summary = through_daemon.latencies.summary();

        let mut table = Table::new(&[
            "path", "ok", "failed", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
        ]);
        for (name, outcomes, summary) in [
            ("sandbox over HTTP, token in hand", &direct, &direct_summary),
            ("daemon over gRPC", &through_daemon, &daemon_summary),
        ] {
            let mut cells = vec![
                name.to_owned(),
                summary.count.to_string(),
                outcomes.failed().to_string(),
            ];
            cells.extend(latency_cells(summary));
            table.row(cells);
        }
        let added = |through: u64, straight: u64| format_ms(through.saturating_sub(straight));
        table.row(vec![
            "daemon adds".to_owned(),
            String::new(),
            String::new(),
            added(daemon_summary.p50_us, direct_summary.p50_us),
            added(daemon_summary.p90_us, direct_summary.p90_us),
            added(daemon_summary.p99_us, direct_summary.p99_us),
            added(daemon_summary.p999_us, direct_summary.p999_us),
            String::new(),
        ]);
        let ratio = |through: u64, straight: u64| {
            format!("{:.2}×", through as f64 / straight.max(1) as f64)
        };
        table.row(vec![
            "ratio".to_owned(),
            String::new(),
            String::new(),
            ratio(daemon_summary.p50_us, direct_summary.p50_us),
            ratio(daemon_summary.p90_us, direct_summary.p90_us),
            ratio(daemon_summary.p99_us, direct_summary.p99_us),
            ratio(daemon_summary.p999_us, direct_summary.p999_us),
            String::new(),
        ]);
        println!(
            "{} apps, {} s measured after {} s warm-up, {} gRPC connections, sandbox without delay or QPS limit\n",
            setup.fleet.apps, arguments.seconds, arguments.warmup_seconds, arguments.connections
        );
        print!("{table}");
        println!(
            "\ndaemon CPU: {:.1} µs per lookup ({:.0} % of one core); failures: direct {}; daemon {}",
            cpu.as_secs_f64() * 1e6 / daemon_summary.count.max(1) as f64,
            cpu.as_secs_f64() / measured_seconds * 100.0,
            direct.describe_failures(),
            through_daemon.describe_failures()
        );
        let p50_added = daemon_summary.p50_us.saturating_sub(direct_summary.p50_us);
        let p99_added = daemon_summary.p99_us.saturating_sub(direct_summary.p99_us);
        println!(
            "targets: adds ≤ 0.3 ms at p50: {}; ≤ 1 ms at p99: {}",
            verdict(p50_added <= 300),
            verdict(p99_added <= 1000)
        );
        footer(started);
        Ok(())
    }
}

/// Drops ANSI colour sequences (`ESC [ … m`), which the daemon's log has when
/// tracing decides to colour it.
fn strip_colour_codes(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut characters = line.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            for inner in characters.by_ref() {
                if inner == 'm' {
                    break;
                }
            }
        } else {
            plain.push(character);
        }
    }
    plain
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// What a service holding a token would do: one GET, the body read, the
/// JSON decoded into the same messages the daemon answers with.
async fn call_sandbox_directly(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    request: &GetAfterSaleOrderDetailRequest,
) -> Result<(), String> {
    let response = client
        .get(url)
        .header("access-token", token)
        .query(&[
            ("account_id", request.account_id.as_str()),
            ("order_id", request.order_id.as_str()),
        ])
        .send()
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|error| format!("HTTP body: {error}"))?;
    decode_after_sale_answer(status, &body, "application/json", String::new())
        .map(|_| ())
        .map_err(|failure| failure.to_string())
}

// === scenarios 2 and 3: closed-loop throughput ===

/// Runs `concurrency` closed-loop callers for `seconds`, each calling `call`
/// with a global sequence number until time is up; returns the outcomes and
/// the wall time.
async fn closed_loop<F, Fut>(
    concurrency: usize,
    seconds: u64,
    call: F,
) -> anyhow::Result<(Outcomes, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let call = Arc::new(call);
    let sequence = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let call = Arc::clone(&call);
        let sequence = Arc::clone(&sequence);
        let stop = Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let mut outcomes = Outcomes::default();
            while !stop.load(Ordering::Relaxed) {
                let index = sequence.fetch_add(1, Ordering::Relaxed);
                let begun = Instant::now();
                let failure = call(index).await;
                outcomes.record(begun.elapsed(), failure);
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Outcomes::default();
    for worker in workers {
        outcomes.merge(worker.await?);
    }
    Ok((outcomes, started.elapsed()))
}

impl Bench {
    async fn throughput(&self, arguments: &ThroughputArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading("Throughput: closed-loop lookups through the daemon, many apps");
        // Douyin's own 10 QPS per app stays on at the sandbox; enough apps
        // that the limit is not what stops the daemon.
        let fleet = Fleet::new(arguments.apps, arguments.apps);
        let setup =
            Arc::new(set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?);
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = Arc::new(daemon.channels(arguments.connections).await?);
        println!(
            "{} apps (pacing allows {:.0} lookups/s), sandbox at 10 QPS per app and no delay, {} gRPC connections, {} s per level\n",
            arguments.apps,
            arguments.apps as f64 * 10.0 / 1.1,
            arguments.connections,
            arguments.seconds
        );
        let mut table = Table::new(&[
            "in flight",
            "lookups/s",
            "failed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "daemon CPU µs/lookup",
            "daemon CPU %",
        ]);
        let mut best = 0.0_f64;
        let mut failures = Vec::new();
        for concurrency in &arguments.concurrency {
            let before = daemon.sample();
            let call_setup = Arc::clone(&setup);
            let call_channels = Arc::clone(&channels);
            let (outcomes, elapsed) = closed_loop(*concurrency, arguments.seconds, move |index| {
                let request = call_setup.lookup_request(index);
                let mut client = AfterSaleServiceClient::with_interceptor(
                    call_channels[index % call_channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                async move {
                    client
                        .get_after_sale_order_detail(request)
                        .await
                        .err()
                        .map(|status| status_kind(&status))
                }
            })
            .await?;
            let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
            let summary = outcomes.latencies.summary();
            let rate = summary.count as f64 / elapsed.as_secs_f64();
            if outcomes.failed() == 0 {
                best = best.max(rate);
            }
            let mut cells = vec![
                concurrency.to_string(),
                format!("{rate:.0}"),
                outcomes.failed().to_string(),
            ];
            cells.extend(latency_cells(&summary));
            cells.push(format!(
                "{:.1}",
                cpu.as_secs_f64() * 1e6 / summary.count.max(1) as f64
            ));
            cells.push(format!(
                "{:.0}",
                cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0
            ));
            table.row(cells);
            failures.push(outcomes.describe_failures());
        }
        print!("{table}");
        let stats = setup.sandbox.state().stats();
        println!(
            "\nfailures per level: {}\nsandbox: {} lookups, 2119003 answered {} times; daemon's warnings and errors: {:?}; daemon RSS {} KiB",
            failures.join(" | "),
            stats.lookups,
            stats.lookups_answered_with(2_119_003),
            daemon.log_problems(),
            daemon.sample().resident_kib
        );
        println!(
            "target ≥ 10,000 lookups/s sustained without failures: {} ({best:.0}/s)",
            verdict(best >= 10_000.0)
        );
        footer(started);
        Ok(())
    }

    async fn tokens(&self, arguments: &TokensArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading("Token hand-out: closed-loop GetAccessToken by account_id");
        let fleet = Fleet::new(arguments.apps, arguments.merchants);
        let setup =
            Arc::new(set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?);
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = Arc::new(daemon.channels(arguments.connections).await?);
        println!(
            "{} apps, {} merchants, {} gRPC connections, {} s per level\n",
            arguments.apps, arguments.merchants, arguments.connections, arguments.seconds
        );
        let mut table = Table::new(&[
            "in flight",
            "requests/s",
            "failed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "daemon CPU µs/request",
            "daemon CPU %",
        ]);
        let mut met = false;
        for concurrency in &arguments.concurrency {
            let before = daemon.sample();
            let call_setup = Arc::clone(&setup);
            let call_channels = Arc::clone(&channels);
            let (outcomes, elapsed) = closed_loop(*concurrency, arguments.seconds, move |index| {
                let account_id = call_setup
                    .fleet
                    .account_id(index % call_setup.fleet.merchants);
                let mut client = TokenServiceClient::with_interceptor(
                    call_channels[index % call_channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                async move {
                    client
                        .get_access_token(GetAccessTokenRequest {
                            selector: Some(Selector::AccountId(account_id)),
                        })
                        .await
                        .err()
                        .map(|status| status_kind(&status))
                }
            })
            .await?;
            let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
            let summary = outcomes.latencies.summary();
            let rate = summary.count as f64 / elapsed.as_secs_f64();
            met |= rate >= 30_000.0 && summary.p99_us < 1000 && outcomes.failed() == 0;
            let mut cells = vec![
                concurrency.to_string(),
                format!("{rate:.0}"),
                outcomes.failed().to_string(),
            ];
            cells.extend(latency_cells(&summary));
            cells.push(format!(
                "{:.1}",
                cpu.as_secs_f64() * 1e6 / summary.count.max(1) as f64
            ));
            cells.push(format!(
                "{:.0}",
                cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0
            ));
            table.row(cells);
        }
        print!("{table}");
        println!(
            "\ntokens fetched from the sandbox during the run: {} (stored tokens were loaded at start)",
            setup.sandbox.state().stats().tokens_issued_total() - setup.fleet.apps as u64
        );
        println!(
            "target ≥ 30,000 requests/s with p99 < 1 ms at one level: {}",
            verdict(met)
        );
        footer(started);
        Ok(())
    }
}

// === scenario 4: scale ===

impl Bench {
    async fn scale(&self, arguments: &ScaleArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading(&format!(
            "Scale: {} apps and {} merchants",
            arguments.apps, arguments.merchants
        ));
        let fleet = Fleet::new(arguments.apps, arguments.merchants);

        // Start-up and memory, from the spawned binary: first without stored
        // tokens (a new installation), then with a valid token stored for
        // every app (every restart after that).
        let mut table = Table::new(&[
            "start",
            "ready after ms",
            "RSS at ready MiB",
            "RSS after 10 s MiB",
            "peak RSS MiB",
            "token fetches in first 10 s",
        ]);
        let mut ready_times = Vec::new();
        let mut peak_rss_kib = 0;
        let filled = fill_database(fleet).await?;
        println!(
            "database filled through the store in {:.1} s ({} apps, {} merchants, source admin)",
            filled.seconds, fleet.apps, fleet.merchants
        );
        for store_tokens in [false, true] {
            let setup = set_up_from(
                &filled,
                fleet,
                SandboxConfig::default(),
                Arc::new(SystemClock),
                store_tokens,
            )
            .await?;
            let issued_before = setup.sandbox.state().stats().tokens_issued_total();
            let (daemon, ready_after) = setup
                .spawn(&self.daemon_binary, &DaemonSettings::default())
                .await?;
            let at_ready = daemon.sample();
            tokio::time::sleep(Duration::from_secs(10)).await;
            let later = daemon.sample();
            let fetched = setup.sandbox.state().stats().tokens_issued_total() - issued_before;
            peak_rss_kib = peak_rss_kib.max(later.peak_resident_kib);
            ready_times.push(ready_after);
            table.row(vec![
                if store_tokens {
                    "restart, every token stored".to_owned()
                } else {
                    "first start, no tokens".to_owned()
                },
                format!("{:.0}", ready_after.as_secs_f64() * 1000.0),
                mib(at_ready.resident_kib),
                mib(later.resident_kib),
                mib(later.peak_resident_kib),
                fetched.to_string(),
            ]);
        }
        print!("\n{table}");
        println!(
            "targets: ready < 2 s: {}; resident memory < 64 MB: {}",
            verdict(
                ready_times
                    .iter()
                    .all(|ready| *ready < Duration::from_secs(2))
            ),
            verdict(peak_rss_kib * 1024 < 64 * 1000 * 1000)
        );

        println!(
            "\nToken fetch schedule over {} simulated hours (in-process daemon, manual clock shared with the sandbox, a sweep every simulated 15 s as the default cron does; 2-hour tokens; budget 500 per 5 min with 50 kept for urgent fetches):\n",
            arguments.simulated_hours
        );
        self.simulated_fetch_schedule(&filled, fleet, arguments.simulated_hours)
            .await?;
        footer(started);
        Ok(())
    }

    async fn simulated_fetch_schedule(
        &self,
        filled: &FilledDatabase,
        fleet: Fleet,
        hours: u64,
    ) -> anyhow::Result<()> {
        let clock = ManualClock::starting_at(1_767_225_600_000);
        let shared_clock: SharedClock = clock.clone();
        let setup = set_up_from(
            filled,
            fleet,
            SandboxConfig::default(),
            shared_clock.clone(),
            false,
        )
        .await?;
        let mut config = Config {
            database: setup.database.clone(),
            ..Config::default()
        };
        config.clients.push(douyin_tokend::bench::bench_client());
        config.douyin.base_url = setup.sandbox.base_url();
        config.refresh.sweep = None;
        let app = App::start(config, shared_clock).await?;
        let step = Duration::from_secs(15);
        let steps = usize::try_from(hours * 3600 / 15)?;
        let mut fetched_per_step = Vec::with_capacity(steps);
        let mut first_time_all_held = None;
        let mut lapsed_after_coverage = 0;
        let mut issued_before = 0;
        let real_started = Instant::now();
        for index in 0..steps {
            app.tokens.sweep().await;
            let issued = setup.sandbox.state().stats().tokens_issued_total();
            fetched_per_step.push(issued - issued_before);
            issued_before = issued;
            let without_token = app
                .tokens
                .status()
                .iter()
                .filter(|status| status.state != "valid")
                .count();
            if first_time_all_held.is_none() && without_token == 0 {
                first_time_all_held = Some(index as f64 * 15.0 / 60.0);
            } else if first_time_all_held.is_some() {
                // Once every app held a token, none may lapse for want of budget.
                lapsed_after_coverage = lapsed_after_coverage.max(without_token);
            }
            clock.advance(step);
        }
        let stats = setup.sandbox.state().stats();
        app.close().await;
        // Every sliding 5-minute window (20 steps) of the schedule.
        let window_sums: Vec<u64> = fetched_per_step
            .windows(20)
            .map(|window| window.iter().sum())
            .collect();
        let mut table = Table::new(&["simulated 5-minute window", "fetches", "largest 15 s step"]);
        for (window, steps) in fetched_per_step.chunks(20).enumerate() {
            table.row(vec![
                format!("{:>3}–{:>3} min", window * 5, window * 5 + 5),
                steps.iter().sum::<u64>().to_string(),
                steps.iter().max().copied().unwrap_or(0).to_string(),
            ]);
        }
        print!("{table}");
        let busiest_window = window_sums.iter().max().copied().unwrap_or(0);
        let busiest_step = fetched_per_step.iter().max().copied().unwrap_or(0);
        let mut summary = String::new();
        writeln!(
            summary,
            "\ntotal fetches {}; busiest sliding 5-minute window {}; busiest 15 s step {} (first step: {}); 10020 answers {}; every app held a valid token after {}, and afterwards at most {} apps at once held none; {:.1} s of real time",
            stats.tokens_issued_total(),
            busiest_window,
            busiest_step,
            fetched_per_step.first().copied().unwrap_or(0),
            stats.token_refusals.get(&10020).copied().unwrap_or(0),
            first_time_all_held.map_or_else(
                || "never within the run".to_owned(),
                |minutes| format!("{minutes:.1} simulated minutes")
            ),
            lapsed_after_coverage,
            real_started.elapsed().as_secs_f64()
        )?;
        // Evenly spread: no 15 s step holds more than twice its even share of the budget.
        let even_share = 450.0 / 20.0;
        writeln!(
            summary,
            "targets: never above 500 per 5 min: {}; evenly spread, no burst at start-up (no 15 s step above twice the even share of {even_share:.1}): {}",
            verdict(busiest_window <= 500),
            verdict(busiest_step as f64 <= 2.0 * even_share)
        )?;
        print!("{summary}");
        setup.sandbox.stop().await;
        Ok(())
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

// === scenario 5: soak ===

impl Bench {
    async fn soak(&self, arguments: &SoakArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        if arguments.simulated {
            heading("Soak, simulated: ten minutes on a manual clock (the form tests/soak.rs runs)");
            let plan = SoakPlan::default();
            let report = soak::run_simulated(&plan).await?;
            print_soak_report(
                &plan,
                &report,
                "this process (the in-process daemon, the sandbox and the load together)",
            );
            footer(started);
            return Ok(());
        }
        let duration = Duration::from_secs(arguments.seconds.unwrap_or(arguments.minutes * 60));
        let plan = SoakPlan {
            apps: arguments.apps,
            lookups_per_app_per_second: arguments.lookups_per_app,
            duration,
            ..SoakPlan::default()
        };
        heading(&format!(
            "Soak: {} s of real time, {} apps × {} lookups/s and {} GetAccessToken/s each, {} s tokens with {} s grace",
            duration.as_secs(),
            plan.apps,
            plan.lookups_per_app_per_second,
            plan.token_requests_per_app_per_second,
            plan.token_lifetime.as_secs(),
            plan.grace.as_secs()
        ));
        let clock: SharedClock = Arc::new(SystemClock);
        let fleet = Fleet::new(plan.apps, plan.apps);
        let setup = set_up(fleet, plan.sandbox_config(), clock, false).await?;
        let mut settings = DaemonSettings {
            // Every second, so the short refresh window is never missed.
            sweep: "* * * * * *".to_owned(),
            ..DaemonSettings::default()
        };
        let mut config = Config::default();
        plan.adjust_daemon_config(&mut config);
        settings.refresh = format!(
            "window_start = \"{}s\"\nwindow_end = \"{}s\"\nmin_interval = \"{}s\"\nbackoff_initial = \"{}s\"\nbackoff_max = \"{}s\"",
            config.refresh.window_start.as_secs(),
            config.refresh.window_end.as_secs(),
            config.refresh.min_interval.as_secs(),
            config.refresh.backoff_initial.as_secs(),
            config.refresh.backoff_max.as_secs()
        );
        let (daemon, _) = setup.spawn(&self.daemon_binary, &settings).await?;
        let channels = daemon.channels(4).await?;
        let soak_started = Instant::now();

        let lookups_per_second = plan.apps * plan.lookups_per_app_per_second;
        let tokens_per_second = plan.apps * plan.token_requests_per_app_per_second;
        let tick = Duration::from_millis(10);
        let ticks = usize::try_from(duration.as_millis() / tick.as_millis())?;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut lookup_index = 0_usize;
        let mut token_index = 0_usize;
        let mut calls = Vec::new();
        let mut report = SoakReport::default();
        let mut invalidated_at = vec![Vec::new(); plan.apps];
        let mut out_of_band = 0;
        let mut next_invalidation = plan.invalidation_every;
        let mut next_token_fault = plan.invalidation_every / 2;
        let mut cpu_samples = Vec::new();
        for tick_number in 0..ticks {
            ticker.tick().await;
            let elapsed = soak_started.elapsed();
            // Spread each second's calls evenly over its 100 ticks.
            let lookups_due = (tick_number + 1) * lookups_per_second / 100;
            while lookup_index < lookups_due {
                let app = lookup_index % plan.apps;
                let request = GetAfterSaleOrderDetailRequest {
                    account_id: setup.fleet.account_id(setup.fleet.merchant_of_app(app)),
                    order_id: order_id(lookup_index % ORDERS),
                    certificate_id: None,
                    include_raw_json: false,
                };
                let mut client = AfterSaleServiceClient::with_interceptor(
                    channels[lookup_index % channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                calls.push(tokio::spawn(async move {
                    (
                        true,
                        client.get_after_sale_order_detail(request).await.err(),
                    )
                }));
                lookup_index += 1;
            }
            let tokens_due = (tick_number + 1) * tokens_per_second / 100;
            while token_index < tokens_due {
                let app = token_index % plan.apps;
                let request = GetAccessTokenRequest {
                    selector: Some(Selector::AccountId(
                        setup.fleet.account_id(setup.fleet.merchant_of_app(app)),
                    )),
                };
                let mut client = TokenServiceClient::with_interceptor(
                    channels[token_index % channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                calls.push(tokio::spawn(async move {
                    (false, client.get_access_token(request).await.err())
                }));
                token_index += 1;
            }
            if elapsed >= next_invalidation {
                let victim = plan.invalidated_app(report.invalidations as usize);
                for _ in 0..2 {
                    setup
                        .sandbox
                        .state()
                        .issue_token_out_of_band(&setup.fleet.client_key(victim));
                    out_of_band += 1;
                }
                invalidated_at[victim].push(elapsed.as_secs_f64());
                report.invalidations += 1;
                next_invalidation += plan.invalidation_every;
            }
            if plan.token_faults && elapsed >= next_token_fault {
                setup
                    .sandbox
                    .state()
                    .push_token_faults([Fault::HttpStatus(500)]);
                report.token_faults_injected += 1;
                next_token_fault += plan.invalidation_every;
            }
            if tick_number % 1000 == 0 {
                let sample = daemon.sample();
                report
                    .resident_kib
                    .push((elapsed.as_secs(), sample.resident_kib));
                cpu_samples.push((elapsed.as_secs(), sample.cpu));
            }
            // Collect finished calls as we go, so memory here stays flat too.
            if calls.len() > 4096 {
                collect_finished(&mut calls, &mut report, false).await;
            }
        }
        collect_finished(&mut calls, &mut report, true).await;
        let final_sample = daemon.sample();
        report
            .resident_kib
            .push((soak_started.elapsed().as_secs(), final_sample.resident_kib));
        report.take_sandbox_stats(&setup.sandbox.state().stats(), out_of_band);
        report.minimum_fetches = soak::minimum_fetches(
            plan.duration,
            plan.token_lifetime,
            plan.refresh_window_end,
            &invalidated_at,
        );
        report.duration_seconds = plan.duration.as_secs_f64();
        report.real_seconds = soak_started.elapsed().as_secs_f64();
        print_soak_report(&plan, &report, "the spawned daemon");
        println!(
            "daemon CPU {:.1} s over the run ({:.1} % of one core)\ndaemon's warnings and errors: {:#?}",
            final_sample.cpu.as_secs_f64(),
            final_sample.cpu.as_secs_f64() / report.real_seconds * 100.0,
            daemon.log_problems()
        );
        footer(started);
        Ok(())
    }
}

type SoakCall = tokio::task::JoinHandle<(bool, Option<tonic::Status>)>;

/// Takes the finished calls' outcomes into the report (all of them when `wait_for_all`).
async fn collect_finished(calls: &mut Vec<SoakCall>, report: &mut SoakReport, wait_for_all: bool) {
    let mut pending = Vec::with_capacity(calls.len());
    for call in calls.drain(..) {
        if !wait_for_all && !call.is_finished() {
            pending.push(call);
            continue;
        }
        let (is_lookup, failure) = match call.await {
            Ok(outcome) => outcome,
            Err(join_error) => (true, Some(tonic::Status::internal(join_error.to_string()))),
        };
        if is_lookup {
            report.lookups += 1;
            if failure.is_none() {
                report.lookups_ok += 1;
            }
        } else {
            report.token_requests += 1;
        }
        if let Some(status) = failure {
            report.record_status(&status);
        }
    }
    *calls = pending;
}

fn print_soak_report(plan: &SoakPlan, report: &SoakReport, measured: &str) {
    let mut table = Table::new(&["measure", "value", "target"]);
    let rows = [
        (
            "lookups (ok / sent)",
            format!("{} / {}", report.lookups_ok, report.lookups),
            String::new(),
        ),
        (
            "GetAccessToken requests",
            report.token_requests.to_string(),
            String::new(),
        ),
        (
            "token errors seen by callers",
            report.token_errors.to_string(),
            format!("0: {}", verdict(report.token_errors == 0)),
        ),
        (
            "other failures seen by callers",
            format!("{:?}", report.other_errors),
            "transient faults that failed all 3 tries".to_owned(),
        ),
        (
            "2119003 answered by the sandbox",
            report.too_many_requests.to_string(),
            format!("0: {}", verdict(report.too_many_requests == 0)),
        ),
        (
            "token fetches / minimum needed",
            format!(
                "{} / {} ({:+.1} %)",
                report.token_fetches,
                report.minimum_fetches,
                report.excess_fetch_fraction() * 100.0
            ),
            format!(
                "within 5 %: {}",
                verdict(report.excess_fetch_fraction() <= 0.05)
            ),
        ),
        (
            "token endpoint calls (failed ones included)",
            report.token_calls.to_string(),
            String::new(),
        ),
        (
            "faults injected: busy lookups / token endpoint 500s / invalidations",
            format!(
                "{} / {} / {}",
                report.lookup_faults_injected, report.token_faults_injected, report.invalidations
            ),
            format!("{:.0} % of lookups", plan.lookup_fault_fraction * 100.0),
        ),
        (
            "lookups refused for their token (how the daemon learns of an invalidation)",
            report.token_rejections.to_string(),
            String::new(),
        ),
        (
            "resident memory growth after warm-up",
            format!("{} KiB", report.resident_growth_kib()),
            "flat".to_owned(),
        ),
    ];
    for (measure, value, target) in rows {
        table.row(vec![measure.to_owned(), value, target]);
    }
    print!("\n{table}");
    let samples: Vec<String> = report
        .resident_kib
        .iter()
        .map(|(second, kib)| format!("{second}s:{}", mib(*kib)))
        .collect();
    println!(
        "\nresident memory of {measured} (MiB): {}",
        samples.join(" ")
    );
    if !report.token_error_samples.is_empty() {
        println!("token errors, first few: {:#?}", report.token_error_samples);
    }
    println!(
        "clock seconds simulated / real: {:.1} / {:.1}",
        report.duration_seconds, report.real_seconds
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped_from_log_lines() {
        let line = "\u{1b}[2m2026-11-25T20:26:28.211706Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mdouyin_tokend::token\u{1b}[0m\u{1b}[2m:\u{1b}[0m client_token fetch failed; backing off \u{1b}[3mapp\u{1b}[0m\u{1b}[2m=\u{1b}[0mapp:c6b95411";
        assert_eq!(
            strip_colour_codes(line),
            "2026-11-25T20:26:28.211706Z  WARN douyin_tokend::token: client_token fetch failed; backing off app=app:c6b95411"
        );
    }
}
