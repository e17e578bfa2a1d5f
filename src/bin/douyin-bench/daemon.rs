//! The spawned daemon and the set-up it serves: a sandbox, a fleet stored in a fresh
//! database (tokens included, as a daemon that has been running would have), and
//! how calls' outcomes are counted.

use super::*;

/// Settings written into the spawned daemon's config file.
#[derive(Debug, Clone)]
pub(crate) struct DaemonSettings {
    pub(crate) sweep: String,
    /// Extra `[refresh]` lines.
    pub(crate) refresh: String,
    /// Extra `[lookup]` lines.
    pub(crate) lookup: String,
    pub(crate) log_filter: String,
    /// More tables, written after everything else (e.g. `[webhook]`).
    pub(crate) extra_tables: String,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            sweep: "*/15 * * * * *".to_owned(),
            refresh: String::new(),
            lookup: String::new(),
            log_filter: "info,tokio_cron_scheduler=warn,sqlx=warn".to_owned(),
            extra_tables: String::new(),
        }
    }
}

/// `douyin-tokend serve` in a child process, on a database the bench filled.
pub(crate) struct SpawnedDaemon {
    pub(crate) process: DaemonProcess,
    pub(crate) address: String,
}

/// Where a spawned daemon keeps its state.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DaemonDatabase<'a> {
    /// A SQLite file the bench filled, with its master key beside it (where
    /// the daemon looks by default); the bench's API client is declared in
    /// the config file.
    Sqlite(&'a Path),
    /// A PostgreSQL database shared with other daemons. Their config files
    /// may declare no clients, so the bench's API client is stored in the
    /// database (`douyin_tokend::bench::store_bench_client`), and every
    /// daemon names the one master key file.
    Postgres {
        url: &'a str,
        master_key_file: &'a Path,
    },
}

impl DaemonDatabase<'_> {
    /// The config file's `database` line, and `master_key_file` when it is needed.
    fn config_lines(self) -> String {
        match self {
            Self::Sqlite(path) => format!("database = \"{}\"\n", path.display()),
            Self::Postgres {
                url,
                master_key_file,
            } => format!(
                "database = \"{url}\"\nmaster_key_file = \"{}\"\n",
                master_key_file.display()
            ),
        }
    }

    /// The `[[clients]]` tables the config file declares.
    fn client_tables(self) -> String {
        match self {
            Self::Sqlite(_) => douyin_tokend::bench::bench_client_toml(),
            Self::Postgres { .. } => String::new(),
        }
    }
}

impl SpawnedDaemon {
    /// Spawns the daemon on a port of its choosing and waits for its READY=1;
    /// returns it with the time from spawn to ready. Its config file, notify
    /// socket and log are `<name>.toml`, `<name>.notify` and `<name>.log` in
    /// `directory`, so several daemons can share one directory.
    pub(crate) async fn start(
        binary: &Path,
        directory: &Path,
        name: &str,
        database: DaemonDatabase<'_>,
        sandbox_url: &str,
        settings: &DaemonSettings,
    ) -> anyhow::Result<(Self, Duration)> {
        let config_path = directory.join(format!("{name}.toml"));
        let config = format!(
            "listen = \"127.0.0.1:0\"\n{}shutdown_grace = \"1s\"\n\n\
             [douyin]\nbase_url = \"{sandbox_url}\"\n\n\
             [refresh]\nsweep = \"{}\"\n{}\n\n[lookup]\n{}\n\n{}\n{}",
            database.config_lines(),
            settings.sweep,
            settings.refresh,
            settings.lookup,
            database.client_tables(),
            settings.extra_tables,
        );
        std::fs::write(&config_path, config)?;
        let notify_path = directory.join(format!("{name}.notify"));
        // A daemon spawned before under this name (the scale scenario starts
        // several) left its socket.
        let _ = std::fs::remove_file(&notify_path);
        let launch = DaemonLaunch {
            binary: binary.to_owned(),
            config_path,
            notify_path,
            log_path: directory.join(format!("{name}.log")),
            arguments: Vec::new(),
            environment: vec![("RUST_LOG".to_owned(), settings.log_filter.clone())],
            patience: Duration::from_secs(60),
        };
        let started = Instant::now();
        let process = DaemonProcess::start(&launch).await?;
        let ready_after = started.elapsed();
        let address = process.grpc_url();
        Ok((Self { process, address }, ready_after))
    }

    /// SIGTERM, then up to 10 s for the daemon's own shutdown (it is killed
    /// when dropped still running), so the next measurement does not share
    /// the cores with it.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.process.send_signal("TERM")?;
        if self
            .process
            .exit_within(Duration::from_secs(10))
            .await
            .is_none()
        {
            anyhow::bail!("the daemon did not stop within 10 s of SIGTERM");
        }
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid().unwrap_or_default()
    }

    pub(crate) fn sample(&self) -> ProcessSample {
        ProcessSample::read(self.pid()).unwrap_or_default()
    }

    /// `connections` separate HTTP/2 connections, so load spreads like many clients.
    pub(crate) async fn channels(&self, connections: usize) -> anyhow::Result<Vec<Channel>> {
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
    pub(crate) fn log_problems(&self) -> BTreeMap<String, usize> {
        let log = self.process.logs();
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
}

/// A sandbox, a fleet taught to it and stored in a fresh database, and
/// optionally a token stored for every app (as a daemon that has been running
/// would have), so that the benchmark does not start by spending the token
/// budget.
pub(crate) struct Setup {
    pub(crate) sandbox: Sandbox,
    pub(crate) fleet: Fleet,
    pub(crate) directory: tempfile::TempDir,
    pub(crate) database: PathBuf,
    /// The tokens stored in the database at set-up (none unless asked for).
    pub(crate) tokens: FleetTokens,
}

pub(crate) const ORDERS: usize = 1000;

/// No single call of the load generator waits longer than this, so every
/// scenario ends by itself even if the daemon or the sandbox hangs.
pub(crate) const CALL_BOUND: Duration = Duration::from_secs(30);

/// A database holding a fleet, filled once and copied for every start.
pub(crate) struct FilledDatabase {
    pub(crate) _directory: tempfile::TempDir,
    pub(crate) database: PathBuf,
    pub(crate) seconds: f64,
}

pub(crate) async fn fill_database(fleet: Fleet) -> anyhow::Result<FilledDatabase> {
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

pub(crate) async fn set_up(
    fleet: Fleet,
    sandbox_config: SandboxConfig,
    clock: SharedClock,
    store_tokens: bool,
) -> anyhow::Result<Setup> {
    let filled = fill_database(fleet).await?;
    set_up_from(&filled, fleet, sandbox_config, clock, store_tokens).await
}

pub(crate) async fn set_up_from(
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
    let tokens = if store_tokens {
        let tokens = FleetTokens::issue(sandbox.state(), fleet, clock.now_unix_ms())?;
        tokens.store_in(&store, fleet).await?;
        tokens
    } else {
        FleetTokens::default()
    };
    store.close().await;
    Ok(Setup {
        sandbox,
        fleet,
        directory,
        database,
        tokens,
    })
}

/// A token the sandbox issued for every app of the fleet at set-up, as a
/// daemon that has been running would hold them. Kept, so a second database
/// (the cluster's) can hold the same tokens: fetching others would make
/// these the older of two, which Douyin stops accepting after its grace.
#[derive(Debug, Clone, Default)]
pub(crate) struct FleetTokens {
    /// App `i`'s token at index `i`; empty when none were issued.
    pub(crate) tokens: Vec<AccessToken>,
    pub(crate) fetched_at_ms: i64,
}

/// The sandbox's default token lifetime, which the stored expiry repeats.
const FLEET_TOKEN_LIFETIME_MS: i64 = 7_200_000;

impl FleetTokens {
    pub(crate) fn issue(
        sandbox: &SandboxState,
        fleet: Fleet,
        fetched_at_ms: i64,
    ) -> anyhow::Result<Self> {
        let tokens = (0..fleet.apps)
            .map(|app| {
                sandbox
                    .issue_token_out_of_band(&fleet.client_key(app))
                    .map(AccessToken::new)
                    .context("the sandbox knows every bench app")
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            tokens,
            fetched_at_ms,
        })
    }

    /// Stores every app's token as generation 1.
    pub(crate) async fn store_in(&self, store: &Store, fleet: Fleet) -> anyhow::Result<()> {
        for (app, access_token) in self.tokens.iter().enumerate() {
            store
                .tokens()
                .save_fetched(&NewToken {
                    client_key: &ClientKey::parse(&fleet.client_key(app))?,
                    access_token,
                    generation: 1,
                    fetched_at_ms: self.fetched_at_ms,
                    expires_at_ms: self.fetched_at_ms + FLEET_TOKEN_LIFETIME_MS,
                })
                .await?;
        }
        Ok(())
    }
}

impl Setup {
    pub(crate) async fn spawn(
        &self,
        binary: &Path,
        settings: &DaemonSettings,
    ) -> anyhow::Result<(SpawnedDaemon, Duration)> {
        SpawnedDaemon::start(
            binary,
            self.directory.path(),
            "bench-daemon",
            DaemonDatabase::Sqlite(&self.database),
            &self.sandbox.base_url(),
            settings,
        )
        .await
    }

    pub(crate) fn lookup_request(&self, index: usize) -> GetAfterSaleOrderDetailRequest {
        lookup_request(self.fleet, index)
    }
}

/// Lookup number `index`: merchant `index` and order `index`, each modulo
/// how many there are, so consecutive lookups spread over apps and orders.
pub(crate) fn lookup_request(fleet: Fleet, index: usize) -> GetAfterSaleOrderDetailRequest {
    GetAfterSaleOrderDetailRequest {
        account_id: fleet.account_id(index % fleet.merchants),
        order_id: order_id(index % ORDERS),
        certificate_id: None,
        include_raw_json: false,
    }
}

/// Outcomes of many calls: latencies of the successes, failures by kind.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    pub(crate) latencies: Latencies,
    pub(crate) failures: BTreeMap<String, u64>,
}

impl Outcomes {
    pub(crate) fn record(&mut self, latency: Duration, failure: Option<String>) {
        match failure {
            None => self.latencies.record(latency),
            Some(kind) => *self.failures.entry(kind).or_default() += 1,
        }
    }

    pub(crate) fn merge(&mut self, other: Outcomes) {
        self.latencies.extend(other.latencies);
        for (kind, count) in other.failures {
            *self.failures.entry(kind).or_default() += count;
        }
    }

    pub(crate) fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub(crate) fn describe_failures(&self) -> String {
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

pub(crate) fn status_kind(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
        .chars()
        .take(120)
        .collect()
}

pub(crate) fn latency_cells(summary: &LatencySummary) -> Vec<String> {
    vec![
        format_ms(summary.p50_us),
        format_ms(summary.p90_us),
        format_ms(summary.p99_us),
        format_ms(summary.p999_us),
        format_ms(summary.max_us),
    ]
}
