//! `TestApp`: a daemon on a free loopback port with a throwaway database, a
//! sandbox Douyin and a manual clock, plus one helper per RPC.

use std::sync::Arc;
use std::time::Duration;

use douyin_tokend::app::{App, ServeOptions};
use douyin_tokend::clock::{ManualClock, SharedClock};
use douyin_tokend::config::Config;
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
pub const START_UNIX_MS: i64 = 1_767_225_600_000;

pub struct TestApp {
    pub clock: Arc<ManualClock>,
    pub sandbox: Sandbox,
    pub app: App,
    pub config: Config,
    /// Where `/metrics` is served, when the config asked for `metrics_listen`.
    pub metrics_address: Option<std::net::SocketAddr>,
    channel: Channel,
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
        let mut sandbox_config = SandboxConfig::default();
        let directory = Arc::new(tempfile::tempdir().unwrap());
        let mut config = Config {
            database: directory.path().join("tokend.db"),
            ..Config::default()
        };
        config.refresh.sweep = "off".to_owned();
        adjust(&mut config, &mut sandbox_config);
        let shared_clock: SharedClock = clock.clone();
        let sandbox = Sandbox::start(shared_clock, sandbox_config).await.unwrap();
        sandbox.state().add_app(CLIENT_KEY, CLIENT_SECRET);
        sandbox.state().authorize_merchant(ACCOUNT_ID, CLIENT_KEY);
        config.douyin.base_url = sandbox.base_url();
        Self::start_daemon(clock, sandbox, config, directory).await
    }

    async fn start_daemon(
        clock: Arc<ManualClock>,
        sandbox: Sandbox,
        config: Config,
        directory: Arc<tempfile::TempDir>,
    ) -> Self {
        let shared_clock: SharedClock = clock.clone();
        let app = App::start(config.clone(), shared_clock).await.unwrap();
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
        let options = ServeOptions {
            metrics_listener,
            ..ServeOptions::default()
        };
        let server =
            tokio::spawn(async move { serving.serve_with(listener, options, stopped).await });
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        Self {
            clock,
            sandbox,
            app,
            config,
            metrics_address,
            channel,
            stop,
            server,
            _directory: directory,
        }
    }

    /// Stops the daemon and starts a new one on the same database, clock and sandbox.
    pub async fn restart(self) -> Self {
        let Self {
            clock,
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
        Self::start_daemon(clock, sandbox, config, _directory).await
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
        self.app.close().await;
        self.sandbox.stop().await;
    }

    /// The connection to the daemon every client helper shares.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn after_sale_client(&self) -> AfterSaleServiceClient<Channel> {
        AfterSaleServiceClient::new(self.channel.clone())
    }

    pub fn token_client(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel.clone())
    }

    pub fn admin_client(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// Registers an app and one merchant of it in the daemon over AdminService.
    pub async fn register(&self, client_key: &str, client_secret: &str, account_id: &str) {
        let mut admin = self.admin_client();
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

    /// Registers the sandbox's default app and merchant.
    pub async fn register_default(&self) {
        self.register(CLIENT_KEY, CLIENT_SECRET, ACCOUNT_ID).await;
    }

    pub async fn lookup(
        &self,
        account_id: &str,
        order_id: &str,
    ) -> Result<GetAfterSaleOrderDetailResponse, Status> {
        self.lookup_with(GetAfterSaleOrderDetailRequest {
            account_id: account_id.to_owned(),
            order_id: order_id.to_owned(),
            certificate_id: None,
            include_raw_json: false,
        })
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
