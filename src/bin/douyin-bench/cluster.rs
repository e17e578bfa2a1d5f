//! Scenario 7, several daemons on one PostgreSQL database (issue 12): lookups
//! and token hand-outs at saturation through one daemon on SQLite and through
//! the cluster (same fleet, same sandbox, the load spread over the daemons);
//! how long a refreshed token takes to be served by every other daemon; and
//! how long the cluster takes to serve a refreshed token when the daemon
//! holding the fetch lease is killed mid-fetch.

use super::*;

use douyin_tokend::bench::postgres_server::PostgresServer;
use douyin_tokend::cli::BearerAuth;
use douyin_tokend::proto::tokend::v1::RefreshTokenRequest;
use douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient;
use douyin_tokend::store::{DatabaseLocation, PostgresDatabase};
use tonic::service::interceptor::InterceptedService;

use crate::throughput::{Load, pacing_cap, run_level};

type TokenClient = TokenServiceClient<InterceptedService<Channel, BearerAuth>>;
type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// How long one measured wait (a refresh served everywhere, a fetch reaching
/// the sandbox, a killed daemon's exit) may take before the scenario gives
/// up: far above every target, so it only ends a run that hangs.
const PATIENCE: Duration = Duration::from_secs(60);

/// Between two GetAccessToken calls of a poller. The poll is the measurement,
/// so this is its resolution: fine against the 1 s and 10 s targets, and
/// coarse enough that the pollers leave the two cores to the daemons.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The app whose token the propagation and failover parts refresh.
const REFRESHED_APP: usize = 0;

impl Bench {
    pub(crate) async fn cluster(&self, arguments: &ClusterArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading("Cluster: daemons sharing one PostgreSQL database");
        anyhow::ensure!(
            arguments.daemons >= 2,
            "--daemons {}: a cluster needs at least two",
            arguments.daemons
        );
        // Enough apps that neither the sandbox's 10 QPS per app nor the
        // daemons' pacing is what stops them, as in the throughput scenario.
        // Each of n daemons paces an app at 1/n of its rate, so the cap is the
        // same for one daemon and for the cluster.
        let fleet = Fleet::new(arguments.apps, arguments.apps);
        let setup = set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?;
        let shared = SharedDatabase::create(&setup).await?;
        println!(
            "{} apps and merchants (pacing allows {:.0} lookups/s, to one daemon and to the cluster alike), \
             sandbox at 10 QPS per app and no delay, {} gRPC connections in all, {} s per level; \
             the PostgreSQL database filled through the store in {:.1} s",
            arguments.apps,
            pacing_cap(arguments.apps),
            arguments.connections,
            arguments.seconds,
            shared.fill_seconds
        );

        let mut comparison = Comparison::new(arguments, fleet);
        let issued_before = setup.sandbox.state().stats().tokens_issued_total();
        let (single, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        comparison
            .measure("1 on SQLite", &[&single], arguments.connections)
            .await?;
        let single_problems = single.log_problems();
        single.stop().await?;

        let mut cluster = Cluster {
            binary: &self.daemon_binary,
            setup: &setup,
            database: &shared,
            daemons: Vec::new(),
            started: 0,
        };
        for _ in 0..arguments.daemons {
            let daemon = cluster.start_daemon().await?;
            cluster.daemons.push(daemon);
        }
        let cluster_label = format!("{} on PostgreSQL", arguments.daemons);
        let members: Vec<&SpawnedDaemon> = cluster.daemons.iter().collect();
        comparison
            .measure(
                &cluster_label,
                &members,
                arguments.connections.div_ceil(arguments.daemons),
            )
            .await?;
        let cluster_problems: Vec<_> = members.iter().map(|daemon| daemon.log_problems()).collect();
        comparison.print();
        let stats = setup.sandbox.state().stats();
        println!(
            "sandbox: {} lookups, 2119003 answered {} times, {} tokens fetched during the runs (stored tokens were loaded at start)\n\
             warnings and errors: SQLite daemon {single_problems:?}; cluster daemons {cluster_problems:?}",
            stats.lookups,
            stats.lookups_answered_with(2_119_003),
            stats.tokens_issued_total() - issued_before,
        );

        cluster.propagation(arguments.refreshes).await?;
        cluster.failover(arguments.failovers).await?;
        footer(started);
        Ok(())
    }
}

/// Part 1: the same closed-loop levels through one daemon and through the
/// cluster, one table for lookups and one for hand-outs.
struct Comparison<'a> {
    arguments: &'a ClusterArgs,
    fleet: Fleet,
    lookups: Table,
    hand_outs: Table,
    failures: Vec<String>,
}

impl<'a> Comparison<'a> {
    fn new(arguments: &'a ClusterArgs, fleet: Fleet) -> Self {
        let table = |load: Load| {
            let mut header = vec!["daemons"];
            header.extend(load.level_header());
            Table::new(&header)
        };
        Self {
            arguments,
            fleet,
            lookups: table(Load::Lookups),
            hand_outs: table(Load::HandOuts),
            failures: Vec::new(),
        }
    }

    /// Runs every lookup level, then every hand-out level, through `daemons`
    /// with `connections_each` connections to each (calls alternate between
    /// them); a row per level, labelled `label`.
    async fn measure(
        &mut self,
        label: &str,
        daemons: &[&SpawnedDaemon],
        connections_each: usize,
    ) -> anyhow::Result<()> {
        // Interleaved (a, b, a, b, …): consecutive channels lead to
        // different daemons, and every app's calls take every channel in turn.
        let mut channels = Vec::new();
        for _ in 0..connections_each.max(1) {
            for daemon in daemons {
                channels.extend(daemon.channels(1).await?);
            }
        }
        let channels = Arc::new(channels);
        for (load, levels) in [
            (Load::Lookups, &self.arguments.concurrency),
            (Load::HandOuts, &self.arguments.token_concurrency),
        ] {
            for concurrency in levels {
                let level = run_level(
                    load,
                    self.fleet,
                    &channels,
                    daemons,
                    *concurrency,
                    self.arguments.seconds,
                )
                .await?;
                let mut cells = vec![label.to_owned()];
                cells.extend(level.cells());
                match load {
                    Load::Lookups => self.lookups.row(cells),
                    Load::HandOuts => self.hand_outs.row(cells),
                }
                if level.outcomes.failed() > 0 {
                    self.failures.push(format!(
                        "{label}, {load:?} at {concurrency} in flight: {}",
                        level.outcomes.describe_failures()
                    ));
                }
            }
        }
        Ok(())
    }

    fn print(&self) {
        println!("\n### Lookups at saturation (CPU: every daemon of the row together)\n");
        print!("{}", self.lookups);
        println!("\n### Token hand-outs (GetAccessToken by account_id) at saturation\n");
        print!("{}", self.hand_outs);
        println!(
            "\nfailures: {}",
            if self.failures.is_empty() {
                "none".to_owned()
            } else {
                self.failures.join(" | ")
            }
        );
    }
}

/// A private PostgreSQL server holding the same fleet and the same tokens as
/// the SQLite database of the set-up, the bench's API client, and the master
/// key file every daemon of the cluster names.
struct SharedDatabase {
    /// Stops the server and removes its files when dropped.
    _server: PostgresServer,
    url: String,
    master_key_file: PathBuf,
    /// How long writing the fleet through the store took.
    fill_seconds: f64,
}

impl SharedDatabase {
    async fn create(setup: &Setup) -> anyhow::Result<Self> {
        let server = PostgresServer::start().await?;
        server.create_database("tokend").await?;
        let url = server.url("tokend");
        let master_key_file = setup.directory.path().join("cluster-master.key");
        let location = DatabaseLocation::Postgres(PostgresDatabase {
            url: url.clone(),
            password: None,
        });
        let (store, _) = Store::open_location(&location, &master_key_file).await?;
        let now_ms = SystemClock.now_unix_ms();
        let populated = setup.fleet.store_in(&store, now_ms).await?;
        douyin_tokend::bench::store_bench_client(&store, now_ms).await?;
        // The very tokens the SQLite daemon held: new ones would make those
        // the older of two, which Douyin stops accepting after its grace.
        setup.tokens.store_in(&store, setup.fleet).await?;
        store.close().await;
        Ok(Self {
            _server: server,
            url,
            master_key_file,
            fill_seconds: populated.seconds,
        })
    }
}

/// The running daemons of the cluster, and how to start another.
struct Cluster<'a> {
    binary: &'a Path,
    setup: &'a Setup,
    database: &'a SharedDatabase,
    daemons: Vec<SpawnedDaemon>,
    /// Daemons started so far: each gets a name (and log) of its own, so a
    /// killed daemon's log stays beside its replacement's.
    started: usize,
}

/// The new token as one daemon first served it.
struct Served {
    at: Instant,
    generation: i64,
    /// GetAccessToken calls that failed while the poller waited.
    failed_calls: u64,
}

impl Cluster<'_> {
    /// Starts one more daemon on the shared database, up to READY=1 (which,
    /// in a cluster, comes after the others have counted it).
    async fn start_daemon(&mut self) -> anyhow::Result<SpawnedDaemon> {
        self.started += 1;
        let name = format!("cluster-daemon-{}", self.started);
        let started = SpawnedDaemon::start(
            self.binary,
            self.setup.directory.path(),
            &name,
            DaemonDatabase::Postgres {
                url: &self.database.url,
                master_key_file: &self.database.master_key_file,
            },
            &self.setup.sandbox.base_url(),
            &DaemonSettings::default(),
        )
        .await;
        // The log is in a directory removed with the set-up: quote it here.
        started.map(|(daemon, _)| daemon).with_context(|| {
            let log = self.setup.directory.path().join(format!("{name}.log"));
            format!(
                "{name} did not start; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
    }

    fn account_id(&self) -> String {
        self.setup
            .fleet
            .account_id(self.setup.fleet.merchant_of_app(REFRESHED_APP))
    }

    fn refresh_request(&self) -> tonic::Request<RefreshTokenRequest> {
        let mut request = tonic::Request::new(RefreshTokenRequest {
            client_key: self.setup.fleet.client_key(REFRESHED_APP),
        });
        // Told to the daemon, so a refresh that waits for another daemon's
        // lease is not cut short by the daemon's default deadline.
        request.set_timeout(CALL_BOUND);
        request
    }

    /// Part 2: forces a refresh through each daemon in turn, `refreshes`
    /// times, and measures until every other daemon serves the new token.
    async fn propagation(&self, refreshes: usize) -> anyhow::Result<()> {
        println!(
            "\n### Token propagation: a forced refresh (AdminService RefreshToken) through one daemon → every other daemon serves it\n"
        );
        let account_id = self.account_id();
        let mut token_clients = Vec::new();
        let mut admin_clients = Vec::new();
        for daemon in &self.daemons {
            token_clients.push(token_client(daemon).await?);
            admin_clients.push(admin_client(daemon).await?);
        }
        let mut round_trips = Latencies::default();
        let mut at_most = Latencies::default();
        let mut at_least = Latencies::default();
        let mut failed_calls = 0;
        for round in 0..refreshes {
            let refresher = round % self.daemons.len();
            let previous = generation_served(&mut token_clients[refresher], &account_id).await?;
            // Polling from before the refresh is sent, so no change is missed.
            let pollers: Vec<_> = (0..self.daemons.len())
                .filter(|daemon| *daemon != refresher)
                .map(|daemon| {
                    tokio::spawn(served_after(
                        token_clients[daemon].clone(),
                        account_id.clone(),
                        previous,
                    ))
                })
                .collect();
            let sent = Instant::now();
            let refreshed = admin_clients[refresher]
                .refresh_token(self.refresh_request())
                .await
                .map_err(|status| anyhow::anyhow!("RefreshToken: {}", status_kind(&status)))?
                .into_inner();
            let answered = Instant::now();
            let mut served_everywhere = answered;
            for poller in pollers {
                let served = poller.await??;
                anyhow::ensure!(
                    served.generation >= refreshed.generation,
                    "a daemon served generation {} after generation {} was stored",
                    served.generation,
                    refreshed.generation
                );
                served_everywhere = served_everywhere.max(served.at);
                failed_calls += served.failed_calls;
            }
            round_trips.record(answered - sent);
            at_most.record(served_everywhere - sent);
            at_least.record(served_everywhere.saturating_duration_since(answered));
        }
        let mut table = Table::new(&[
            "measure",
            "refreshes",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ]);
        let upper = at_most.summary();
        for (measure, latencies) in [
            (
                "RefreshToken round trip (the commit is inside it)",
                &round_trips,
            ),
            (
                "commit → served by every other daemon, at most (sent → served)",
                &at_most,
            ),
            (
                "commit → served by every other daemon, at least (answered → served)",
                &at_least,
            ),
        ] {
            let summary = latencies.summary();
            let mut cells = vec![measure.to_owned(), summary.count.to_string()];
            cells.extend(latency_cells(&summary));
            table.row(cells);
        }
        print!("{table}");
        println!(
            "\n{} daemons, refreshes sent to each in turn, every other daemon polled every {} ms; \
             failed GetAccessToken calls while polling: {failed_calls}",
            self.daemons.len(),
            POLL_INTERVAL.as_millis()
        );
        println!(
            "target p99 ≤ 1 s (at most, from sending the refresh): {} ({} ms)",
            verdict(upper.count > 0 && upper.p99_us <= 1_000_000),
            format_ms(upper.p99_us)
        );
        Ok(())
    }

    /// Part 3: holds the token endpoint, forces a refresh through the oldest
    /// daemon so it takes the app's fetch lease, asks a survivor for the
    /// refresh too (it waits on that lease, as its own scheduled refresh or a
    /// waiting caller would), kills the lease holder with SIGKILL, releases
    /// the endpoint, and measures until every survivor serves a new token.
    /// A replacement daemon joins between rounds.
    async fn failover(&mut self, rounds: usize) -> anyhow::Result<()> {
        println!(
            "\n### Failover: the daemon holding the fetch lease is killed (SIGKILL) mid-fetch\n"
        );
        let account_id = self.account_id();
        let mut table = Table::new(&[
            "round",
            "killed ms after its fetch reached the sandbox",
            "kill → refreshed token served everywhere s",
            "its fetch → served everywhere s",
            "survivor's RefreshToken",
            "failed token calls on survivors",
            "tokens the sandbox issued",
        ]);
        let mut longest = Duration::ZERO;
        for round in 1..=rounds {
            let mut victim = self.daemons.remove(0);
            let mut survivor_tokens = Vec::new();
            for daemon in &self.daemons {
                survivor_tokens.push(token_client(daemon).await?);
            }
            let previous = generation_served(&mut survivor_tokens[0], &account_id).await?;
            let issued_before = self.setup.sandbox.state().stats().tokens_issued_total();

            let gate = self.setup.sandbox.state().gate_token_endpoint();
            let mut victim_admin = admin_client(&victim).await?;
            let victim_request = self.refresh_request();
            // Ends with a transport error when the victim dies.
            let victim_refresh =
                tokio::spawn(async move { victim_admin.refresh_token(victim_request).await });
            tokio::time::timeout(PATIENCE, gate.arrived(1))
                .await
                .context("the victim's forced fetch did not reach the sandbox")?;
            let fetch_arrived = Instant::now();
            let mut survivor_admin = admin_client(&self.daemons[0]).await?;
            let survivor_request = self.refresh_request();
            let survivor_refresh =
                tokio::spawn(async move { survivor_admin.refresh_token(survivor_request).await });
            victim.process.send_signal("KILL")?;
            victim
                .process
                .exit_within(PATIENCE)
                .await
                .context("the killed daemon did not exit")?;
            let killed = Instant::now();
            gate.release();

            let pollers: Vec<_> = survivor_tokens
                .into_iter()
                .map(|client| tokio::spawn(served_after(client, account_id.clone(), previous)))
                .collect();
            let mut served_everywhere = killed;
            let mut failed_calls = 0;
            for poller in pollers {
                let served = poller.await??;
                served_everywhere = served_everywhere.max(served.at);
                failed_calls += served.failed_calls;
            }
            let survivor_outcome = match survivor_refresh.await? {
                Ok(answer) => format!("generation {}", answer.into_inner().generation),
                Err(status) => status_kind(&status),
            };
            // The victim's own call died with it; its outcome says nothing.
            let _ = victim_refresh.await;
            let failover = served_everywhere - killed;
            longest = longest.max(failover);
            table.row(vec![
                round.to_string(),
                format!("{:.0}", (killed - fetch_arrived).as_secs_f64() * 1000.0),
                format!("{:.3}", failover.as_secs_f64()),
                format!("{:.3}", (served_everywhere - fetch_arrived).as_secs_f64()),
                survivor_outcome,
                failed_calls.to_string(),
                (self.setup.sandbox.state().stats().tokens_issued_total() - issued_before)
                    .to_string(),
            ]);
            drop(victim);
            if round < rounds {
                let replacement = self.start_daemon().await?;
                self.daemons.push(replacement);
            }
        }
        print!("{table}");
        println!(
            "\n{} daemons before each kill; the fetch lease lasts 8 s from when the victim took it \
             (just before its fetch reached the sandbox); the tokens the sandbox issued include the \
             victim's held call if it was answered after the release",
            self.daemons.len() + 1
        );
        println!(
            "target ≤ 10 s from the kill in every round: {} (longest {:.3} s)",
            verdict(rounds > 0 && longest <= Duration::from_secs(10)),
            longest.as_secs_f64()
        );
        Ok(())
    }
}

async fn token_client(daemon: &SpawnedDaemon) -> anyhow::Result<TokenClient> {
    Ok(TokenServiceClient::with_interceptor(
        daemon.channels(1).await?.remove(0),
        douyin_tokend::bench::bench_auth(),
    ))
}

async fn admin_client(daemon: &SpawnedDaemon) -> anyhow::Result<AdminClient> {
    Ok(AdminServiceClient::with_interceptor(
        daemon.channels(1).await?.remove(0),
        douyin_tokend::bench::bench_auth(),
    ))
}

/// The generation of the token a daemon hands out for the merchant now.
async fn generation_served(client: &mut TokenClient, account_id: &str) -> anyhow::Result<i64> {
    let answer = client
        .get_access_token(GetAccessTokenRequest {
            selector: Some(Selector::AccountId(account_id.to_owned())),
        })
        .await
        .map_err(|status| anyhow::anyhow!("GetAccessToken: {}", status_kind(&status)))?;
    Ok(answer.into_inner().generation)
}

/// Asks a daemon for the merchant's token every [`POLL_INTERVAL`] until it
/// hands out a generation above `previous`; when its answer arrived is when
/// the daemon served the new token.
async fn served_after(
    mut client: TokenClient,
    account_id: String,
    previous: i64,
) -> anyhow::Result<Served> {
    let started = Instant::now();
    let mut failed_calls = 0;
    loop {
        match generation_served(&mut client, &account_id).await {
            Ok(generation) if generation > previous => {
                return Ok(Served {
                    at: Instant::now(),
                    generation,
                    failed_calls,
                });
            }
            Ok(_) => {}
            Err(_) => failed_calls += 1,
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "the daemon served no token newer than generation {previous} within {PATIENCE:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
