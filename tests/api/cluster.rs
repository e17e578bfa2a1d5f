//! Several daemon processes on one PostgreSQL database (a private server the
//! test starts) and one strict sandbox: each app's token is fetched once for
//! the whole cluster, the app's rate holds for the cluster, a daemon killed
//! while it fetches is replaced by another without callers noticing (once, and
//! three times over), losing PostgreSQL keeps held tokens serving, and refund
//! requests committed through one daemon's webhook stream from another. The
//! cluster's run over several token lifetimes lives in `accelerated`, which
//! uses the set-up and the load here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use douyin_tokend::bench::daemon_process::{DaemonLaunch, DaemonProcess};
use douyin_tokend::bench::fleet::{Fleet, order_id, teach_orders};
use douyin_tokend::bench::postgres_server::PostgresServer;
use douyin_tokend::bench::{bench_auth, store_bench_client};
use douyin_tokend::clock::{Clock, SystemClock};
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::douyin::goodlife::v1::{
    AfterSaleEvent, GetAfterSaleOrderDetailRequest, WatchAfterSaleEventsRequest,
};
use douyin_tokend::sandbox::notifications::{NotificationSender, RefundRequestContent, Signing};
use douyin_tokend::sandbox::{Sandbox, SandboxConfig};
use douyin_tokend::store::{DatabaseLocation, PostgresDatabase, Store};
use futures::StreamExt;
use tonic::transport::Channel;

use douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient;
use douyin_tokend::proto::tokend::v1::{ListTokenStatusRequest, RefreshTokenRequest};

use crate::daemon_process::{BINARY, PATIENCE};

const ORDERS: usize = 50;
/// The outage test's longest reconnect delay (`cluster.reconnect_backoff_max`,
/// 10 s by default): what the test proves of the link does not depend on how
/// long its delay grows, only on its reaching the longest and coming back
/// from there.
const OUTAGE_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long the outage test keeps PostgreSQL stopped: every link's reconnect
/// delay reaches its longest within 0.75 s (0.25 s, 0.5 s, then 1 s) and then
/// fails at it several times over; and longer than the store's 5 s wait for
/// a pooled connection, so a lookup that waited on the database anywhere
/// would have failed within the outage.
const POSTGRES_OUTAGE: Duration = Duration::from_secs(8);
/// After the database returns, each link is back within its longest delay
/// and a full re-read; this much on top of the delay bounds that.
const RECONNECT_SLACK: Duration = Duration::from_secs(5);

/// A private PostgreSQL database holding a fleet, a strict sandbox knowing
/// it, and the master key every daemon of the cluster shares.
pub(crate) struct ClusterSetup {
    postgres: PostgresServer,
    pub(crate) sandbox: Sandbox,
    fleet: Fleet,
    directory: tempfile::TempDir,
    url: String,
    master_key_file: PathBuf,
}

impl ClusterSetup {
    pub(crate) async fn new(fleet: Fleet, sandbox_config: SandboxConfig) -> Self {
        let postgres = PostgresServer::start().await.unwrap();
        postgres.create_database("tokend").await.unwrap();
        let url = postgres.url("tokend");
        let sandbox = Sandbox::start(Arc::new(SystemClock), sandbox_config)
            .await
            .unwrap();
        fleet.teach_sandbox(sandbox.state());
        teach_orders(sandbox.state(), ORDERS);
        let directory = tempfile::tempdir().unwrap();
        let master_key_file = directory.path().join("master.key");
        let location = DatabaseLocation::Postgres(PostgresDatabase {
            url: url.clone(),
            password: None,
        });
        let (store, _) = Store::open_location(&location, &master_key_file)
            .await
            .unwrap();
        let now_ms = SystemClock.now_unix_ms();
        fleet.store_in(&store, now_ms).await.unwrap();
        store_bench_client(&store, now_ms).await.unwrap();
        store.close().await;
        Self {
            postgres,
            sandbox,
            fleet,
            directory,
            url,
            master_key_file,
        }
    }

    /// Starts daemon number `index` on the shared database, up to READY=1.
    async fn spawn_daemon(&self, index: usize) -> DaemonProcess {
        self.spawn_daemon_with(index, "").await
    }

    /// Starts daemon number `index` with `extra_tables` (whole TOML tables,
    /// such as `[refresh]` or `[webhook]`) appended to its config file after
    /// the `[douyin]` table, up to READY=1.
    pub(crate) async fn spawn_daemon_with(
        &self,
        index: usize,
        extra_tables: &str,
    ) -> DaemonProcess {
        let config_path = self.directory.path().join(format!("daemon-{index}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\nmaster_key_file = \"{}\"\n\n[douyin]\nbase_url = \"{}\"\n\n{extra_tables}",
                self.url,
                self.master_key_file.display(),
                self.sandbox.base_url()
            ),
        )
        .unwrap();
        let launch = DaemonLaunch {
            binary: BINARY.into(),
            config_path,
            notify_path: self.directory.path().join(format!("notify-{index}")),
            log_path: self.directory.path().join(format!("daemon-{index}.log")),
            arguments: Vec::new(),
            environment: vec![(
                "RUST_LOG".to_owned(),
                "info,douyin_tokend=debug,tokio_cron_scheduler=warn,sqlx=warn".to_owned(),
            )],
            patience: PATIENCE,
        };
        match DaemonProcess::start(&launch).await {
            Ok(daemon) => daemon,
            Err(error) => panic!(
                "{error:#}\n{}\npostgres:\n{}",
                std::fs::read_to_string(&launch.log_path).unwrap_or_default(),
                self.postgres.logs()
            ),
        }
    }

    fn lookup(&self, index: usize) -> GetAfterSaleOrderDetailRequest {
        GetAfterSaleOrderDetailRequest {
            account_id: self.fleet.account_id(index % self.fleet.merchants),
            order_id: order_id(index % ORDERS),
            certificate_id: None,
            include_raw_json: false,
        }
    }
}

/// The channel to a daemon, connected.
async fn channel_to(daemon: &DaemonProcess) -> Channel {
    Channel::from_shared(daemon.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

type Authenticated = douyin_tokend::cli::AuthenticatedChannel;

async fn admin_of(daemon: &DaemonProcess) -> AdminServiceClient<Authenticated> {
    AdminServiceClient::with_interceptor(channel_to(daemon).await, bench_auth())
}

async fn client_of(daemon: &DaemonProcess) -> AfterSaleServiceClient<Authenticated> {
    AfterSaleServiceClient::with_interceptor(channel_to(daemon).await, bench_auth())
}

/// Sends `count` distinct lookups at once, spread round robin over the
/// merchants and, a round of merchants at a time, over the daemons: every
/// merchant's lookups (so every app's) go through each daemon in turn.
/// Returns the failures as text.
async fn lookups_at_once(
    setup: &ClusterSetup,
    daemons: &[&DaemonProcess],
    count: usize,
) -> Vec<String> {
    let mut clients = Vec::new();
    for daemon in daemons {
        clients.push(client_of(daemon).await);
    }
    let calls = (0..count).map(|index| {
        let mut client = clients[(index / setup.fleet.merchants) % clients.len()].clone();
        let mut request = tonic::Request::new(setup.lookup(index));
        request.set_timeout(Duration::from_secs(30));
        async move { client.get_after_sale_order_detail(request).await }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|answer| answer.err())
        .map(|status| format!("{:?}: {}", status.code(), status.message()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_database_fetch_each_token_once_and_keep_the_apps_rate() {
    let setup = ClusterSetup::new(
        Fleet {
            apps: 4,
            merchants: 8,
        },
        SandboxConfig::default(),
    )
    .await;
    // The daemons are told 8 per second per app, the sandbox allows Douyin's
    // 10: shared by two, the cluster sends 7.3/s (8 less the jitter headroom)
    // and an unshared pace would send 14.5/s, so a broken share overruns the
    // sandbox several times a second, while a lookup the loaded test machine
    // delays by a tenth of a second (the headroom at the full rate) does not.
    let eight_per_second = "[lookup.rates.after_sale_order_detail]\nper_second = 8\n";
    let first = setup.spawn_daemon_with(1, eight_per_second).await;
    let second = setup.spawn_daemon_with(2, eight_per_second).await;

    // 200 lookups of cold apps at once, each app's half through each daemon,
    // so both pace every app at once: six times more than the cluster's rate
    // allows per second (8 per app, 4 apps).
    let failures = tokio::time::timeout(
        PATIENCE * 2,
        lookups_at_once(&setup, &[&first, &second], 200),
    )
    .await
    .expect("the lookups end within their deadlines");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}\n{}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        first.logs(),
        second.logs()
    );
    let stats = setup.sandbox.state().stats();
    for app in 0..setup.fleet.apps {
        assert_eq!(
            stats.tokens_issued_for(&setup.fleet.client_key(app)),
            1,
            "one token per app for the whole cluster\n{}\n{}",
            first.logs(),
            second.logs()
        );
    }
    assert_eq!(
        stats.lookup_window_overruns, 0,
        "no 2119003 from the cluster"
    );
    for daemon in [&first, &second] {
        let metrics =
            crate::metrics::scrape_address(daemon.metrics_address.expect("metrics are on")).await;
        assert!(
            metrics.contains("douyin_tokend_cluster_daemons 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("douyin_tokend_cluster_link_up 1\n"),
            "{metrics}"
        );
    }
    assert_eq!(stats.token_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_while_fetching_is_replaced_within_its_lease_and_survivors_see_no_error() {
    let setup = ClusterSetup::new(
        Fleet {
            apps: 1,
            merchants: 2,
        },
        SandboxConfig::default(),
    )
    .await;
    // The token endpoint holds every call: the first daemon's start-up fetch
    // takes the app's fetch lease and stays at the sandbox.
    let gate = setup.sandbox.state().gate_token_endpoint();
    let mut fetching = setup.spawn_daemon(1).await;
    tokio::time::timeout(PATIENCE, gate.arrived(1))
        .await
        .expect("the first daemon's fetch reaches the sandbox");
    let survivor = setup.spawn_daemon(2).await;
    fetching.send_signal("KILL").unwrap();
    assert!(fetching.exit_within(PATIENCE).await.is_some());
    gate.release();

    // The survivor's callers wait for the dead daemon's lease to end, then
    // the survivor fetches: no error reaches them.
    let started = std::time::Instant::now();
    let failures = tokio::time::timeout(PATIENCE, lookups_at_once(&setup, &[&survivor], 10))
        .await
        .expect("the lookups end within their deadlines");
    let failover = started.elapsed();
    assert!(failures.is_empty(), "{failures:?}\n{}", survivor.logs());
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    let stats = setup.sandbox.state().stats();
    let issued = stats.tokens_issued_for(&setup.fleet.client_key(0));
    assert!(
        (1..=2).contains(&issued),
        "at most the dead daemon's token and the survivor's: {issued}"
    );
    assert_eq!(stats.token_rejections(), 0);
    assert!(
        survivor.logs().contains("client_token fetched"),
        "the survivor fetched the token itself\n{}",
        survivor.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_postgresql_keeps_held_tokens_serving_and_fetches_nothing_without_the_lease() {
    let mut setup = ClusterSetup::new(
        Fleet {
            apps: 1,
            merchants: 2,
        },
        SandboxConfig::default(),
    )
    .await;
    let cluster_table = format!(
        "[cluster]\nreconnect_backoff_max = \"{}ms\"\n",
        OUTAGE_RECONNECT_BACKOFF_MAX.as_millis()
    );
    let (first, second) = tokio::join!(
        setup.spawn_daemon_with(1, &cluster_table),
        setup.spawn_daemon_with(2, &cluster_table),
    );
    let failures = lookups_at_once(&setup, &[&first, &second], 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    let issued_before = setup.sandbox.state().stats().tokens_issued_total();

    setup.postgres.stop().await.unwrap();
    // The tokens held keep serving through both daemons, for the whole
    // outage (its length, not an event: the load goes on meanwhile).
    let outage_started = std::time::Instant::now();
    let load = SteadyLookups::start(setup.fleet, &[&first, &second]).await;
    tokio::time::sleep_until((outage_started + POSTGRES_OUTAGE).into()).await;
    let (sent, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} lookups failed during the outage: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        first.logs()
    );
    // A fetch needs the lease, and the lease needs the database.
    let refused = admin_of(&first)
        .await
        .refresh_token(RefreshTokenRequest {
            client_key: setup.fleet.client_key(0),
        })
        .await
        .expect_err("no fetch without the database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("database"), "{refused:?}");
    assert_eq!(
        setup.sandbox.state().stats().tokens_issued_total(),
        issued_before,
        "nothing fetched without the lease"
    );

    for daemon in [&first, &second] {
        assert_eq!(
            longest_reconnect_delay_ms(&daemon.logs()),
            Some(OUTAGE_RECONNECT_BACKOFF_MAX.as_millis()),
            "the link's reconnect delay reached its longest during the outage\n{}",
            daemon.logs()
        );
    }

    setup.postgres.start_again().await.unwrap();
    // Each daemon's link comes back by itself, within its longest backoff
    // and the re-read; polled, since the reconnect is what is timed.
    let restarted = std::time::Instant::now();
    for daemon in [&first, &second] {
        let address = daemon.metrics_address.expect("metrics are on");
        while !crate::metrics::scrape_address(address)
            .await
            .contains("douyin_tokend_cluster_link_up 1\n")
        {
            assert!(
                restarted.elapsed() < OUTAGE_RECONNECT_BACKOFF_MAX + RECONNECT_SLACK,
                "the link did not come back\n{}",
                daemon.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let refreshed = admin_of(&first)
        .await
        .refresh_token(RefreshTokenRequest {
            client_key: setup.fleet.client_key(0),
        })
        .await
        .expect("the database is back")
        .into_inner();
    // The other daemon hears of the new token through its link, re-established
    // on its own: its lookups use it, and Douyin rejects none.
    let failures = lookups_at_once(&setup, &[&second], 4).await;
    assert!(failures.is_empty(), "{failures:?}\n{}", second.logs());
    assert!(refreshed.generation >= 2);
    assert_eq!(setup.sandbox.state().stats().token_rejections(), 0);
    assert!(
        first.pid().is_some() && second.pid().is_some(),
        "no daemon crashed"
    );
}

/// The longest reconnect delay the daemon's cluster link logged (its
/// `retry_in_ms` field), if it logged any.
fn longest_reconnect_delay_ms(logs: &str) -> Option<u128> {
    logs.lines()
        .filter(|line| line.contains("douyin_tokend::cluster:"))
        .filter_map(|line| {
            let (_, after) = line.split_once("retry_in_ms=")?;
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_and_merchant_added_through_one_daemon_serve_through_the_other_within_a_second() {
    let setup = ClusterSetup::new(
        Fleet {
            apps: 2,
            merchants: 2,
        },
        SandboxConfig::default(),
    )
    .await;
    let first = setup.spawn_daemon(1).await;
    let second = setup.spawn_daemon(2).await;
    // The sandbox knows a third app and merchant the daemons do not.
    let (client_key, secret, account_id) =
        ("awcluster0000001", "cluster-secret", "7300000000000000001");
    setup.sandbox.state().add_app(client_key, secret);
    setup
        .sandbox
        .state()
        .authorize_merchant(account_id, client_key);
    crate::helpers::register_app_and_merchant(
        &mut admin_of(&first).await,
        client_key,
        secret,
        account_id,
    )
    .await;
    let written = std::time::Instant::now();
    let mut lookups = client_of(&second).await;
    // Propagation is measured, so this polls: each answer says whether the
    // second daemon knows the merchant yet.
    let propagated = loop {
        let answer = lookups
            .get_after_sale_order_detail(GetAfterSaleOrderDetailRequest {
                account_id: account_id.to_owned(),
                order_id: order_id(0),
                certificate_id: None,
                include_raw_json: false,
            })
            .await;
        match answer {
            Ok(_) => break written.elapsed(),
            Err(status)
                if status.code() == tonic::Code::NotFound && written.elapsed() < PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("{status:?}\n{}", second.logs()),
        }
    };
    assert!(
        propagated < Duration::from_secs(1),
        "the second daemon served the new merchant after {propagated:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_gets_its_first_admin_client_from_client_bootstrap_once() {
    let postgres = PostgresServer::start().await.unwrap();
    postgres.create_database("fresh").await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let config_path = directory.path().join("tokend.toml");
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\nmaster_key_file = \"{}\"\n",
            postgres.url("fresh"),
            directory.path().join("master.key").display()
        ),
    )
    .unwrap();
    let bootstrap = || {
        std::process::Command::new(BINARY)
            .args(["client", "bootstrap", "ops", "--config"])
            .arg(&config_path)
            .output()
            .unwrap()
    };
    let first = bootstrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let key = String::from_utf8(first.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("dtk_"), "the key alone on stdout: {key:?}");
    let second = bootstrap();
    assert!(!second.status.success());
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        refusal.contains("an admin client exists already (ops)"),
        "{refusal}"
    );

    let launch = DaemonLaunch {
        binary: BINARY.into(),
        config_path: config_path.clone(),
        notify_path: directory.path().join("notify"),
        log_path: directory.path().join("daemon.log"),
        arguments: Vec::new(),
        environment: Vec::new(),
        patience: PATIENCE,
    };
    let daemon = DaemonProcess::start(&launch).await.unwrap();
    let mut admin = AdminServiceClient::with_interceptor(
        channel_to(&daemon).await,
        douyin_tokend::cli::BearerAuth::new(&key).unwrap(),
    );
    let apps = admin
        .list_apps(douyin_tokend::proto::tokend::v1::ListAppsRequest::default())
        .await
        .expect("the bootstrapped key is an admin's")
        .into_inner();
    assert!(apps.apps.is_empty());
}

/// What one daemon on SQLite proves also holds on PostgreSQL: a restart
/// reuses the stored token, secrets and tokens are sealed at rest, and the
/// audit trail is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_restart_reuses_the_token_values_are_sealed_and_the_audit_is_kept() {
    let setup = ClusterSetup::new(
        Fleet {
            apps: 1,
            merchants: 1,
        },
        SandboxConfig::default(),
    )
    .await;
    let mut daemon = setup.spawn_daemon(1).await;
    let failures = lookups_at_once(&setup, &[&daemon], 3).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(setup.sandbox.state().stats().tokens_issued_total(), 1);

    let stored = setup
        .postgres
        .psql(
            "tokend",
            "SELECT t.access_token || ' ' || a.client_secret FROM tokens t JOIN apps a USING (client_key)",
        )
        .await
        .unwrap();
    for value in stored.split_whitespace() {
        assert!(value.starts_with("v1:"), "sealed at rest: {stored:?}");
    }
    let audit = admin_of(&daemon)
        .await
        .list_audit(douyin_tokend::proto::tokend::v1::ListAuditRequest {
            since_unix_ms: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit
            .entries
            .iter()
            .any(|entry| entry.action == "token_fetch"),
        "{:?}",
        audit.entries
    );

    daemon.send_signal("TERM").unwrap();
    assert!(
        daemon
            .exit_within(PATIENCE)
            .await
            .is_some_and(|status| status.success())
    );
    let restarted = setup.spawn_daemon(2).await;
    let failures = lookups_at_once(&setup, &[&restarted], 3).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        setup.sandbox.state().stats().tokens_issued_total(),
        1,
        "the restart fetched nothing\n{}",
        restarted.logs()
    );
}

/// Every daemon gets one lookup per app this often: 3 daemons × 2 per second
/// = 6 per app per second, inside Douyin's 10, so pacing stays out of the way
/// of what the runs here measure (tokens).
const STEADY_LOOKUP_SPACING: Duration = Duration::from_millis(500);

/// Each daemon's log without its DEBUG lines (one per lookup): the token
/// fetches, adoptions, sweeps and warnings that explain a failure, short
/// enough to read after a long run.
pub(crate) fn logs_above_debug(daemons: &[&DaemonProcess]) -> String {
    daemons
        .iter()
        .enumerate()
        .map(|(position, daemon)| {
            let logs = daemon.logs();
            let kept: Vec<&str> = logs
                .lines()
                .filter(|line| !line.contains(" DEBUG "))
                .collect();
            format!("--- daemon {}\n{}\n", position + 1, kept.join("\n"))
        })
        .collect()
}

/// Lookups offered at a steady pace, one per app through every daemon at
/// each tick, whatever the earlier ones are doing, until stopped: a load to
/// measure under, not a wait.
pub(crate) struct SteadyLookups {
    stop: tokio::sync::oneshot::Sender<()>,
    load: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl SteadyLookups {
    pub(crate) async fn start(fleet: Fleet, daemons: &[&DaemonProcess]) -> Self {
        let mut clients = Vec::new();
        for daemon in daemons {
            clients.push(client_of(daemon).await);
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let load =
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(STEADY_LOOKUP_SPACING);
                let mut lookups = tokio::task::JoinSet::new();
                let mut sent = 0usize;
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = ticker.tick() => {}
                    }
                    for client in &clients {
                        for app in 0..fleet.apps {
                            let mut client = client.clone();
                            let mut request = tonic::Request::new(GetAfterSaleOrderDetailRequest {
                                account_id: fleet.account_id(fleet.merchant_of_app(app)),
                                order_id: order_id(sent % ORDERS),
                                certificate_id: None,
                                include_raw_json: false,
                            });
                            request.set_timeout(Duration::from_secs(15));
                            sent += 1;
                            lookups.spawn(async move {
                                client.get_after_sale_order_detail(request).await.err().map(
                                    |status| format!("{:?}: {}", status.code(), status.message()),
                                )
                            });
                        }
                    }
                }
                let failures = lookups.join_all().await.into_iter().flatten().collect();
                (sent, failures)
            });
        Self { stop, load }
    }

    /// Stops offering, waits for the lookups under way; returns how many were
    /// sent and the failures as text.
    pub(crate) async fn stop(self) -> (usize, Vec<String>) {
        // The load task ends only after this, so it cannot have hung up.
        let _ = self.stop.send(());
        self.load.await.expect("the load task does not panic")
    }
}

/// The app's token generation as `daemon` reports it (AdminService ListTokenStatus).
async fn served_generation(daemon: &DaemonProcess, client_key: &str) -> i64 {
    admin_of(daemon)
        .await
        .list_token_status(ListTokenStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .find(|status| status.client_key == client_key)
        .map_or(0, |status| status.generation)
}

/// The fetch lease (`cluster.fetch_lease`, 8 s by default) of the test that
/// kills a lease holder three times: each round waits out what is left of
/// it, and the takeover is bounded by it. Long enough that a survivor's own
/// fetch from the local sandbox never outlives it.
const REPEATED_KILL_FETCH_LEASE: Duration = Duration::from_secs(2);
/// A takeover may take the lease and this much more: a new connection to
/// the survivor, its turn from the database, the fetch itself.
const TAKEOVER_SLACK: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetching_daemon_killed_three_times_over_leaves_the_survivors_serving_one_new_generation()
 {
    let fleet = Fleet {
        apps: 1,
        merchants: 2,
    };
    let setup = ClusterSetup::new(fleet, SandboxConfig::default()).await;
    let client_key = fleet.client_key(0);
    let cluster_table = format!(
        "[cluster]\nfetch_lease = \"{}s\"\n",
        REPEATED_KILL_FETCH_LEASE.as_secs()
    );
    let (first, second, third) = tokio::join!(
        setup.spawn_daemon_with(1, &cluster_table),
        setup.spawn_daemon_with(2, &cluster_table),
        setup.spawn_daemon_with(3, &cluster_table),
    );
    let mut daemons = vec![first, second, third];
    for round in 1..=3 {
        let generation_before = served_generation(&daemons[0], &client_key).await;
        let issued_before = setup.sandbox.state().stats().tokens_issued_for(&client_key);
        let mut victim = daemons.remove(0);
        let survivors: Vec<&DaemonProcess> = daemons.iter().collect();
        let load = SteadyLookups::start(fleet, &survivors).await;

        // The victim takes the lease for an operator's forced refresh, and
        // its call to Douyin is held at the sandbox.
        let gate = setup.sandbox.state().gate_token_endpoint();
        let mut victim_admin = admin_of(&victim).await;
        let forced_key = client_key.clone();
        let forced = tokio::spawn(async move {
            victim_admin
                .refresh_token(RefreshTokenRequest {
                    client_key: forced_key,
                })
                .await
        });
        tokio::time::timeout(PATIENCE, gate.arrived(1))
            .await
            .expect("the victim's fetch reaches the sandbox");
        victim.send_signal("KILL").unwrap();
        assert!(victim.exit_within(PATIENCE).await.is_some());
        gate.release();
        let answer = forced.await.unwrap();
        assert!(answer.is_err(), "the victim died before answering");

        // The operator's tool asks a survivor again (round robin): it waits
        // for the dead daemon's lease to end, then fetches.
        let retried = Instant::now();
        let refreshed = tokio::time::timeout(
            PATIENCE,
            admin_of(survivors[0])
                .await
                .refresh_token(RefreshTokenRequest {
                    client_key: client_key.clone(),
                }),
        )
        .await
        .expect("the survivor's refresh ends")
        .unwrap_or_else(|status| panic!("{status:?}\n{}", logs_above_debug(&survivors)))
        .into_inner();
        let takeover = retried.elapsed();
        assert!(
            refreshed.generation > generation_before,
            "round {round}: generation {} after {generation_before}",
            refreshed.generation
        );
        // Propagation is measured, so this polls, bounded: each survivor
        // reports the generation it serves.
        for survivor in &survivors {
            let mut served = served_generation(survivor, &client_key).await;
            while served != refreshed.generation && retried.elapsed() < PATIENCE {
                tokio::time::sleep(Duration::from_millis(10)).await;
                served = served_generation(survivor, &client_key).await;
            }
            assert_eq!(
                served,
                refreshed.generation,
                "round {round}: every survivor serves the new generation\n{}",
                logs_above_debug(&survivors)
            );
        }
        let (sent, failures) = load.stop().await;
        assert!(
            failures.is_empty(),
            "round {round}: {} of {sent} lookups through the survivors failed: {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            logs_above_debug(&survivors)
        );
        let issued = setup.sandbox.state().stats().tokens_issued_for(&client_key) - issued_before;
        eprintln!(
            "round {round}: takeover {takeover:?}, generation {generation_before} -> {}, {issued} token(s) issued, {sent} lookups",
            refreshed.generation
        );
        assert!(
            (1..=2).contains(&issued),
            "round {round}: at most the dead daemon's token and the survivor's, got {issued}"
        );
        assert!(
            takeover < REPEATED_KILL_FETCH_LEASE + TAKEOVER_SLACK,
            "round {round}: the survivor's refresh took {takeover:?}, for a {REPEATED_KILL_FETCH_LEASE:?} lease"
        );
        // Three daemons again for the next round: 1 to 3 at first, then 4, 5, 6.
        daemons.push(setup.spawn_daemon_with(round + 3, &cluster_table).await);
    }
    assert_eq!(
        setup.sandbox.state().stats().token_rejections(),
        0,
        "no survivor handed out a token Douyin had replaced"
    );
}

/// Waits for the stream's events up to and including the one with
/// `last_msg_id`, within [`PATIENCE`].
async fn events_through(
    stream: &mut tonic::codec::Streaming<AfterSaleEvent>,
    last_msg_id: &str,
) -> Vec<AfterSaleEvent> {
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let event = stream
                .next()
                .await
                .expect("the stream ended")
                .expect("an event");
            let last = event.msg_id == last_msg_id;
            events.push(event);
            if last {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{last_msg_id} not streamed within {PATIENCE:?}: {events:?}"));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_requests_committed_through_one_daemons_webhook_stream_from_another_once_each_in_order()
 {
    let fleet = Fleet {
        apps: 2,
        merchants: 4,
    };
    let setup = ClusterSetup::new(fleet, SandboxConfig::default()).await;
    let receiving = setup
        .spawn_daemon_with(1, "[webhook]\nlisten = \"127.0.0.1:0\"\n")
        .await;
    let watching = setup.spawn_daemon(2).await;
    let webhook_address = receiving
        .webhook_address
        .expect("the receiving daemon names its webhook in READY's STATUS");
    let sender = NotificationSender::new(format!("http://{webhook_address}/douyin/webhook"));
    let watch_request = WatchAfterSaleEventsRequest {
        after_sequence: 0,
        account_ids: Vec::new(),
    };
    // Opened before anything is committed: what follows arrives live.
    let mut remote = client_of(&watching)
        .await
        .watch_after_sale_events(watch_request.clone())
        .await
        .unwrap()
        .into_inner();
    let mut local = client_of(&receiving)
        .await
        .watch_after_sale_events(watch_request)
        .await
        .unwrap()
        .into_inner();

    // Refund requests of every merchant (each signed with its app's secret,
    // which daemon 1 knows from the database), one after the other, each
    // acknowledged before the next; every third is posted twice, as Douyin
    // repeats a notification it is not sure arrived.
    let events = 12;
    let mut expected = Vec::new();
    for index in 0..=events {
        let merchant = index % fleet.merchants;
        let app = fleet.app_of_merchant(merchant);
        let msg_id = if index == events {
            "cluster-last".to_owned()
        } else {
            format!("cluster-{index}")
        };
        let account_id = fleet.account_id(merchant);
        let content = RefundRequestContent::example(&account_id, &format!("order-{msg_id}"));
        let posts = if index % 3 == 2 { 2 } else { 1 };
        for _ in 0..posts {
            let status = sender
                .send_refund_request(
                    &fleet.client_key(app),
                    &fleet.client_secret(app),
                    &msg_id,
                    &content,
                    Signing::Correct,
                )
                .await
                .unwrap();
            assert_eq!(status, 200, "{msg_id}\n{}", receiving.logs());
        }
        expected.push((msg_id, account_id, fleet.client_key(app)));
    }

    let streamed = events_through(&mut remote, "cluster-last").await;
    let seen: Vec<(String, String, String)> = streamed
        .iter()
        .map(|event| {
            (
                event.msg_id.clone(),
                event.account_id.clone(),
                event.client_key.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        expected,
        "daemon 2 streams each event once, in commit order\n{}",
        watching.logs()
    );
    for pair in streamed.windows(2) {
        assert!(pair[0].sequence < pair[1].sequence, "{pair:?}");
    }
    let sequences = |events: &[AfterSaleEvent]| -> Vec<i64> {
        events.iter().map(|event| event.sequence).collect()
    };
    let streamed_locally = events_through(&mut local, "cluster-last").await;
    assert_eq!(
        sequences(&streamed),
        sequences(&streamed_locally),
        "both daemons stream the same sequences"
    );
}

/// The webhook's writer holds a connection of its own: after PostgreSQL
/// restarts, it must not stay on the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_requests_are_refused_while_postgresql_is_away_and_stored_again_after() {
    let fleet = Fleet {
        apps: 1,
        merchants: 1,
    };
    let mut setup = ClusterSetup::new(fleet, SandboxConfig::default()).await;
    let daemon = setup
        .spawn_daemon_with(1, "[webhook]\nlisten = \"127.0.0.1:0\"\n")
        .await;
    let sender = NotificationSender::new(format!(
        "http://{}/douyin/webhook",
        daemon.webhook_address.expect("the webhook is on")
    ));
    let post = |msg_id: &'static str| {
        let sender = &sender;
        async move {
            let content =
                RefundRequestContent::example(&fleet.account_id(0), &format!("order-{msg_id}"));
            sender
                .send_refund_request(
                    &fleet.client_key(0),
                    &fleet.client_secret(0),
                    msg_id,
                    &content,
                    Signing::Correct,
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(post("before").await, 200);
    setup.postgres.stop().await.unwrap();
    assert_eq!(
        post("during").await,
        500,
        "not acknowledged, so Douyin sends it again"
    );
    setup.postgres.start_again().await.unwrap();
    assert_eq!(post("after").await, 200, "{}", daemon.logs());
    let stored = setup
        .postgres
        .psql(
            "tokend",
            "SELECT string_agg(msg_id, ',' ORDER BY sequence) FROM after_sale_events",
        )
        .await
        .unwrap();
    assert_eq!(stored.trim(), "before,after");
}
