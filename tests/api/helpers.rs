//! `TestApp`: a daemon on a free loopback port with a throwaway database, a
//! sandbox Douyin and a manual clock, plus one helper per RPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use douyin_tokend::app::{App, ServeOptions};
use douyin_tokend::cli::{AuthenticatedChannel, BearerAuth};
use douyin_tokend::clock::{Clock, ManualClock, SharedClock, SystemClock};
use douyin_tokend::config::{ClientEntry, Config, DatabaseSetting};
use douyin_tokend::domain::DouyinApi;
use douyin_tokend::lookup::LookupCounters;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::douyin::goodlife::v1::{
    GetAfterSaleOrderDetailRequest, GetAfterSaleOrderDetailResponse,
};
use douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient;
use douyin_tokend::proto::tokend::v1::get_access_token_request::Selector;
use douyin_tokend::proto::tokend::v1::token_service_client::TokenServiceClient;
use douyin_tokend::proto::tokend::v1::*;
use douyin_tokend::sandbox::{Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

pub const CLIENT_KEY: &str = "awtestkey00000001";
pub const CLIENT_SECRET: &str = "test-secret-0001";
pub const ACCOUNT_ID: &str = "7100000000000000001";
/// A second app and its merchant, for tests of what apps share or not.
pub const OTHER_CLIENT_KEY: &str = "awotherapp0000002";
pub const OTHER_ACCOUNT_ID: &str = "7100000000000000002";
/// The key of the test's admin client (every scope), configured by hash only.
pub const ADMIN_API_KEY: &str = "dtk_test_admin_key_00000000000000000000000000000000";
pub const START_UNIX_MS: i64 = 1_767_225_600_000;

/// A plain lookup request: no certificate, no raw JSON.
/// Unix milliseconds that follow tokio's clock, so they stand still or jump
/// with it when a test pauses time.
struct TokioClock {
    start_unix_ms: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    fn starting_at(start_unix_ms: i64) -> Self {
        Self {
            start_unix_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_unix_ms(&self) -> i64 {
        let elapsed_ms = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_unix_ms.saturating_add(elapsed_ms)
    }
}

/// Waits until `condition` holds, re-checking each time the runtime has run
/// other tasks: for state the daemon changes without telling anyone (its
/// counters). Gives up after 10 s of real time, naming what it waited for.
pub async fn until(what: &str, condition: impl Fn() -> bool) {
    let waiting = async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .is_err()
    {
        panic!("gave up waiting until {what}");
    }
}

pub fn after_sale_request(account_id: &str, order_id: &str) -> GetAfterSaleOrderDetailRequest {
    GetAfterSaleOrderDetailRequest {
        account_id: account_id.to_owned(),
        order_id: order_id.to_owned(),
        certificate_id: None,
        include_raw_json: false,
    }
}

pub struct TestApp {
    /// Moves the daemon's and the sandbox's time, unless the app runs in real time.
    pub clock: Arc<ManualClock>,
    /// What the daemon and the sandbox read: the manual clock, or the system clock.
    shared_clock: SharedClock,
    pub sandbox: Sandbox,
    pub app: App,
    pub config: Config,
    /// Where `/metrics` is served, when the config asked for `metrics_listen`.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Where the webhook listens, when the config asked for `webhook.listen`.
    pub webhook_address: Option<std::net::SocketAddr>,
    channel: Channel,
    /// Where the daemon listens (plain TCP on loopback).
    pub address: std::net::SocketAddr,
    stop: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    _directory: Arc<tempfile::TempDir>,
}

impl TestApp {
    /// A daemon with default settings, the sweep off (tests call it), and a
    /// sandbox that knows the default app and merchant; nothing registered in
    /// the daemon yet.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_, _| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config, &mut SandboxConfig)) -> Self {
        let clock = ManualClock::starting_at(START_UNIX_MS);
        Self::spawn_on_clock(clock.clone(), clock, adjust).await
    }

    /// Like `spawn_with`, but the daemon and the sandbox read the system clock:
    /// for the tests of pacing in real time (rate limits).
    pub async fn spawn_real_time(adjust: impl FnOnce(&mut Config, &mut SandboxConfig)) -> Self {
        Self::spawn_on_clock(
            ManualClock::starting_at(START_UNIX_MS),
            Arc::new(SystemClock),
            adjust,
        )
        .await
    }

    /// Like `spawn_with`, but the sandbox reads tokio's clock: for the pacing
    /// tests, which pause tokio time once the daemon is up and tokens are held,
    /// so the daemon's pacing and the sandbox's one-second window share one
    /// simulated clock and nothing waits in real time.
    pub async fn spawn_on_tokio_time(adjust: impl FnOnce(&mut Config, &mut SandboxConfig)) -> Self {
        Self::spawn_on_clock(
            ManualClock::starting_at(START_UNIX_MS),
            Arc::new(TokioClock::starting_at(START_UNIX_MS)),
            adjust,
        )
        .await
    }

    async fn spawn_on_clock(
        clock: Arc<ManualClock>,
        shared_clock: SharedClock,
        adjust: impl FnOnce(&mut Config, &mut SandboxConfig),
    ) -> Self {
        let mut sandbox_config = SandboxConfig::default();
        let directory = Arc::new(tempfile::tempdir().unwrap());
        let mut config = Config {
            database: DatabaseSetting::Sqlite(directory.path().join("tokend.db")),
            ..Config::default()
        };
        config.refresh.sweep = None;
        config
            .clients
            .push(ClientEntry::with_every_scope("test-admin", ADMIN_API_KEY));
        // The sandbox clock is manual; pacing in real time would only slow the
        // tests down. The rate-limit tests set their own pace.
        config
            .lookup
            .set_rate_per_second(DouyinApi::AfterSaleOrderDetail, 10_000);
        config.lookup.retry_backoff_initial = Duration::from_millis(2);
        config.lookup.retry_backoff_max = Duration::from_millis(10);
        adjust(&mut config, &mut sandbox_config);
        let sandbox = Sandbox::start(shared_clock.clone(), sandbox_config)
            .await
            .unwrap();
        sandbox.state().add_app(CLIENT_KEY, CLIENT_SECRET);
        sandbox.state().authorize_merchant(ACCOUNT_ID, CLIENT_KEY);
        config.douyin.base_url = sandbox.base_url();
        StoppedApp {
            clock,
            shared_clock,
            sandbox,
            config,
            directory,
        }
        .start()
        .await
        .map_err(|(error, _)| error)
        .unwrap()
    }

    async fn serve(
        clock: Arc<ManualClock>,
        shared_clock: SharedClock,
        sandbox: Sandbox,
        config: Config,
        directory: Arc<tempfile::TempDir>,
        app: App,
    ) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let serving = app.clone();
        let stopped = stop.clone().cancelled_owned();
        // The configured metrics address only says "on"; tests take a free port.
        let metrics_listener = match config.metrics_listen {
            Some(_) => Some(TcpListener::bind(("127.0.0.1", 0)).await.unwrap()),
            None => None,
        };
        let metrics_address = metrics_listener
            .as_ref()
            .map(|listener| listener.local_addr().unwrap());
        // Likewise for the webhook.
        let webhook_listener = match config.webhook.listen {
            Some(_) => Some(TcpListener::bind(("127.0.0.1", 0)).await.unwrap()),
            None => None,
        };
        let webhook_address = webhook_listener
            .as_ref()
            .map(|listener| listener.local_addr().unwrap());
        let options = ServeOptions {
            metrics_listener,
            webhook_listener,
            ..ServeOptions::default()
        };
        let server =
            tokio::spawn(async move { serving.serve_with(listener, options, stopped).await });
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        Self {
            clock,
            shared_clock,
            sandbox,
            app,
            config,
            metrics_address,
            webhook_address,
            channel,
            address,
            stop,
            server,
            _directory: directory,
        }
    }

    /// Stops the daemon and starts a new one on the same database, clock and sandbox.
    pub async fn restart(self) -> Self {
        self.stop_daemon()
            .await
            .start()
            .await
            .map_err(|(error, _)| error)
            .unwrap()
    }

    /// Stops the daemon only; the sandbox, clock and database stay for a later start.
    pub async fn stop_daemon(self) -> StoppedApp {
        let Self {
            clock,
            shared_clock,
            sandbox,
            app,
            config,
            stop,
            server,
            _directory,
            ..
        } = self;
        stop.cancel();
        server.await.unwrap().unwrap();
        app.close().await;
        StoppedApp {
            clock,
            shared_clock,
            sandbox,
            config,
            directory: _directory,
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
        self.app.close().await;
        self.sandbox.stop().await;
    }

    /// The connection to the daemon every client helper shares (no API key).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The webhook's URL: https when `webhook.tls` is set (the config must turn it on).
    pub fn webhook_url(&self) -> String {
        let address = self.webhook_address.expect("the webhook is on");
        let scheme = if self.config.webhook.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{address}{}", self.config.webhook.path)
    }

    /// Posts notifications to this daemon's webhook.
    pub fn webhook_sender(&self) -> douyin_tokend::sandbox::notifications::NotificationSender {
        douyin_tokend::sandbox::notifications::NotificationSender::new(self.webhook_url())
    }

    /// Posts notifications to this daemon's https webhook, trusting `ca_pem`.
    pub fn webhook_sender_trusting(
        &self,
        ca_pem: &[u8],
    ) -> douyin_tokend::sandbox::notifications::NotificationSender {
        douyin_tokend::sandbox::notifications::NotificationSender::trusting(
            self.webhook_url(),
            Some(ca_pem),
        )
    }

    /// Clients authenticated as the test's admin (every scope).
    pub fn after_sale_client(&self) -> AfterSaleServiceClient<AuthenticatedChannel> {
        self.after_sale_client_with(ADMIN_API_KEY)
    }

    pub fn token_client(&self) -> TokenServiceClient<AuthenticatedChannel> {
        self.token_client_with(ADMIN_API_KEY)
    }

    pub fn admin_client(&self) -> AdminServiceClient<AuthenticatedChannel> {
        self.admin_client_with(ADMIN_API_KEY)
    }

    pub fn after_sale_client_with(
        &self,
        api_key: &str,
    ) -> AfterSaleServiceClient<AuthenticatedChannel> {
        AfterSaleServiceClient::with_interceptor(
            self.channel.clone(),
            BearerAuth::new(api_key).unwrap(),
        )
    }

    pub fn token_client_with(&self, api_key: &str) -> TokenServiceClient<AuthenticatedChannel> {
        TokenServiceClient::with_interceptor(
            self.channel.clone(),
            BearerAuth::new(api_key).unwrap(),
        )
    }

    pub fn admin_client_with(&self, api_key: &str) -> AdminServiceClient<AuthenticatedChannel> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerAuth::new(api_key).unwrap(),
        )
    }

    /// Registers an app and one merchant of it in the daemon over AdminService.
    pub async fn register(&self, client_key: &str, client_secret: &str, account_id: &str) {
        register_app_and_merchant(
            &mut self.admin_client(),
            client_key,
            client_secret,
            account_id,
        )
        .await;
    }

    /// Makes the second app and its merchant known to the sandbox and
    /// registers them in the daemon.
    pub async fn register_other_app(&self) {
        self.sandbox
            .state()
            .add_app(OTHER_CLIENT_KEY, "other-secret");
        self.sandbox
            .state()
            .authorize_merchant(OTHER_ACCOUNT_ID, OTHER_CLIENT_KEY);
        self.register(OTHER_CLIENT_KEY, "other-secret", OTHER_ACCOUNT_ID)
            .await;
    }

    /// Registers the sandbox's default app and merchant.
    pub async fn register_default(&self) {
        self.register(CLIENT_KEY, CLIENT_SECRET, ACCOUNT_ID).await;
    }

    /// A counter of the daemon's lookup path, e.g. `app.lookup_counter(|c| &c.retries)`.
    pub fn lookup_counter(&self, pick: impl Fn(&LookupCounters) -> &AtomicU64) -> u64 {
        pick(self.app.lookup.counters()).load(Ordering::Relaxed)
    }

    pub async fn lookup(
        &self,
        account_id: &str,
        order_id: &str,
    ) -> Result<GetAfterSaleOrderDetailResponse, Status> {
        self.lookup_with(after_sale_request(account_id, order_id))
            .await
    }

    pub async fn lookup_with(
        &self,
        request: GetAfterSaleOrderDetailRequest,
    ) -> Result<GetAfterSaleOrderDetailResponse, Status> {
        self.after_sale_client()
            .get_after_sale_order_detail(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// `count` lookups at once, of orders `{prefix}-0`, `{prefix}-1`, … (distinct,
    /// so coalescing does not merge them), each on a client of its own.
    pub async fn concurrent_lookups(
        &self,
        count: usize,
        prefix: &str,
    ) -> Vec<Result<tonic::Response<GetAfterSaleOrderDetailResponse>, Status>> {
        let lookups: Vec<_> = (0..count)
            .map(|index| {
                let mut client = self.after_sale_client();
                let order_id = format!("{prefix}-{index}");
                tokio::spawn(async move {
                    client
                        .get_after_sale_order_detail(after_sale_request(ACCOUNT_ID, &order_id))
                        .await
                })
            })
            .collect();
        let mut results = Vec::with_capacity(count);
        for lookup in lookups {
            results.push(lookup.await.expect("the lookup task did not panic"));
        }
        results
    }

    /// A plain lookup with a gRPC deadline of `timeout`.
    pub async fn lookup_within(
        &self,
        account_id: &str,
        order_id: &str,
        timeout: Duration,
    ) -> Result<GetAfterSaleOrderDetailResponse, Status> {
        let mut request = tonic::Request::new(after_sale_request(account_id, order_id));
        request.set_timeout(timeout);
        self.after_sale_client()
            .get_after_sale_order_detail(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// AdminService.RefreshToken for the default app, as the test's admin.
    pub async fn force_refresh(&self) -> Result<RefreshTokenResponse, Status> {
        self.admin_client()
            .refresh_token(RefreshTokenRequest {
                client_key: CLIENT_KEY.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn access_token_for(
        &self,
        account_id: &str,
    ) -> Result<GetAccessTokenResponse, Status> {
        self.token_client()
            .get_access_token(GetAccessTokenRequest {
                selector: Some(Selector::AccountId(account_id.to_owned())),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates an API client as the test's admin and returns its key.
    pub async fn create_client(
        &self,
        name: &str,
        scopes: &[&str],
        apps: &[&str],
        merchants: &[&str],
    ) -> String {
        let to_strings = |items: &[&str]| items.iter().map(|item| (*item).to_owned()).collect();
        self.admin_client()
            .create_client(CreateClientRequest {
                name: name.to_owned(),
                scopes: to_strings(scopes),
                apps: to_strings(apps),
                merchants: to_strings(merchants),
            })
            .await
            .unwrap()
            .into_inner()
            .api_key
    }

    /// The audit trail, newest first (up to 100 lines).
    pub async fn audit_entries(&self) -> Vec<AuditEntry> {
        self.admin_client()
            .list_audit(ListAuditRequest {
                since_unix_ms: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    pub async fn token_status(&self) -> Vec<TokenStatus> {
        self.admin_client()
            .list_token_status(ListTokenStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .tokens
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// A daemon stopped by `TestApp::stop_daemon`, with everything it needs to start again.
pub struct StoppedApp {
    pub clock: Arc<ManualClock>,
    shared_clock: SharedClock,
    pub sandbox: Sandbox,
    pub config: Config,
    directory: Arc<tempfile::TempDir>,
}

impl StoppedApp {
    /// Starts the daemon again; the error is `App::start`'s, for tests of failed start-ups.
    pub async fn start(self) -> Result<TestApp, (anyhow::Error, StoppedApp)> {
        match App::start(self.config.clone(), self.shared_clock.clone()).await {
            Ok(app) => Ok(TestApp::serve(
                self.clock,
                self.shared_clock,
                self.sandbox,
                self.config,
                self.directory,
                app,
            )
            .await),
            Err(error) => Err((error, self)),
        }
    }

    /// The files the daemon keeps on disk: database, WAL, shared memory.
    pub fn database_files(&self) -> Vec<std::path::PathBuf> {
        let database = self
            .config
            .sqlite_path()
            .expect("the test daemons keep a SQLite file")
            .display()
            .to_string();
        [
            database.clone(),
            format!("{database}-wal"),
            format!("{database}-shm"),
        ]
        .into_iter()
        .map(std::path::PathBuf::from)
        .filter(|path| path.exists())
        .collect()
    }
}

/// Registers an app and one merchant of it through `admin` (any daemon's
/// AdminService: in-process or a spawned one).
pub async fn register_app_and_merchant(
    admin: &mut AdminServiceClient<AuthenticatedChannel>,
    client_key: &str,
    client_secret: &str,
    account_id: &str,
) {
    admin
        .put_app(PutAppRequest {
            client_key: client_key.to_owned(),
            client_secret: client_secret.to_owned(),
        })
        .await
        .unwrap();
    admin
        .put_merchant(PutMerchantRequest {
            account_id: account_id.to_owned(),
            client_key: client_key.to_owned(),
        })
        .await
        .unwrap();
}
