//! `DaemonProcess`: the real `douyin-tokend serve` binary as systemd runs it,
//! with a config file, a fake `NOTIFY_SOCKET` the test reads, and a Douyin on
//! loopback (the sandbox on the real clock, or a `GatedUpstream` that holds
//! lookups until the test lets them go). Logs go to a file in the process's
//! own directory; the process is killed if a test drops it still running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use douyin_tokend::bench::daemon_process::DaemonLaunch;
use douyin_tokend::clock::SystemClock;
use douyin_tokend::douyin::after_sale::PATH as AFTER_SALE_PATH;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::douyin::goodlife::v1::{
    GetAfterSaleOrderDetailRequest, GetAfterSaleOrderDetailResponse,
};
use douyin_tokend::sandbox::{DOCUMENTED_EXAMPLE, Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::helpers::{ACCOUNT_ID, ADMIN_API_KEY, CLIENT_KEY, CLIENT_SECRET};

/// Upper bound for anything a test waits for: a debug build starting, a
/// datagram, an exit. Generous because two cores run the tests in parallel.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// The environment variable the daemon reads the app's secret from.
pub const SECRET_VARIABLE: &str = "TEST_APP_SECRET";

pub const BINARY: &str = env!("CARGO_BIN_EXE_douyin-tokend");

/// What to start the daemon with.
pub struct DaemonSettings {
    /// The `[[apps]]` / `[[merchants]]` part and anything else; `listen` is 127.0.0.1:0.
    pub config_body: String,
    pub douyin_base_url: String,
    pub app_secret: String,
    /// `WATCHDOG_USEC` as systemd would set it.
    pub watchdog: Option<Duration>,
    pub extra_arguments: Vec<String>,
    /// Variables as systemd would set them (e.g. `RUNTIME_DIRECTORY`).
    pub extra_environment: Vec<(String, String)>,
}

impl DaemonSettings {
    /// The default app and merchant, secret from the environment.
    pub fn new(douyin_base_url: String) -> Self {
        Self {
            config_body: app_and_merchants(&[ACCOUNT_ID]),
            douyin_base_url,
            app_secret: CLIENT_SECRET.to_owned(),
            watchdog: None,
            extra_arguments: Vec::new(),
            extra_environment: Vec::new(),
        }
    }

    /// Like `new`, with `--log-format json`.
    pub fn with_json_logs(douyin_base_url: String) -> Self {
        Self {
            extra_arguments: vec!["--log-format".to_owned(), "json".to_owned()],
            ..Self::new(douyin_base_url)
        }
    }
}

/// Calls as the test's admin client.
pub fn admin_key() -> douyin_tokend::cli::BearerAuth {
    douyin_tokend::cli::BearerAuth::new(ADMIN_API_KEY).unwrap()
}

/// The config lines declaring the test's admin client (every scope), the
/// default app and these merchants of it.
pub fn app_and_merchants(account_ids: &[&str]) -> String {
    let mut text = format!(
        "[[clients]]\nname = \"test-admin\"\nkey_sha256 = \"{}\"\nscopes = [\"admin\", \"aftersale.read\", \"aftersale.events\", \"token.read\", \"token.report\"]\n\
         [[apps]]\nclient_key = \"{CLIENT_KEY}\"\nclient_secret_env = \"{SECRET_VARIABLE}\"\n",
        douyin_tokend::access::KeyHash::of_key(ADMIN_API_KEY).to_hex()
    );
    for account_id in account_ids {
        text.push_str(&format!(
            "[[merchants]]\naccount_id = \"{account_id}\"\nclient_key = \"{CLIENT_KEY}\"\n"
        ));
    }
    text
}

pub struct DaemonProcess {
    process: douyin_tokend::bench::daemon_process::DaemonProcess,
    pub grpc_address: SocketAddr,
    pub metrics_address: Option<SocketAddr>,
    pub webhook_address: Option<SocketAddr>,
    pub config_path: PathBuf,
    /// How it was started, to start it again on the same database.
    launch: DaemonLaunch,
    _directory: tempfile::TempDir,
}

impl DaemonProcess {
    /// Starts the daemon with `config_head` (top-level keys and tables that
    /// must precede the apps) and waits for READY=1.
    pub async fn start(config_head: &str, settings: DaemonSettings) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let config_path = directory.path().join("config.toml");
        let database = directory.path().join("tokend.db");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\n{config_head}\n{}",
                database.display(),
                settings.config_body
            ),
        )
        .unwrap();
        let mut environment = vec![
            (
                "DOUYIN_TOKEND_DOUYIN_BASE_URL".to_owned(),
                settings.douyin_base_url.clone(),
            ),
            (SECRET_VARIABLE.to_owned(), settings.app_secret.clone()),
            (
                "RUST_LOG".to_owned(),
                "info,douyin_tokend=debug,tokio_cron_scheduler=warn".to_owned(),
            ),
        ];
        environment.extend(settings.extra_environment.iter().cloned());
        if let Some(watchdog) = settings.watchdog {
            environment.push(("WATCHDOG_USEC".to_owned(), watchdog.as_micros().to_string()));
        }
        let launch = DaemonLaunch {
            binary: BINARY.into(),
            config_path: config_path.clone(),
            notify_path: directory.path().join("notify"),
            log_path: directory.path().join("daemon.log"),
            arguments: settings.extra_arguments.clone(),
            environment,
            patience: PATIENCE,
        };
        Self::launch(config_path, launch, directory).await
    }

    async fn launch(
        config_path: PathBuf,
        launch: DaemonLaunch,
        directory: tempfile::TempDir,
    ) -> Self {
        let process = launch_or_panic(&launch).await;
        Self {
            grpc_address: process.grpc_address,
            metrics_address: process.metrics_address,
            webhook_address: process.webhook_address,
            process,
            config_path,
            launch,
            _directory: directory,
        }
    }

    /// SIGKILL (no shutdown at all), then the same binary, config and database
    /// again, up to READY=1. Ports are new (the config asks for port 0).
    pub async fn restart_after_sigkill(mut self) -> Self {
        self.send_signal("KILL");
        self.exit_within(PATIENCE).await;
        let Self {
            process,
            config_path,
            launch,
            _directory,
            ..
        } = self;
        drop(process);
        // The notify socket of the killed process is still on disk.
        let _ = std::fs::remove_file(&launch.notify_path);
        Self::launch(config_path, launch, _directory).await
    }

    /// The next datagram on the notify socket, within [`PATIENCE`].
    pub async fn next_notification(&self) -> String {
        self.notification_within(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no notification within {PATIENCE:?}\n{}", self.logs()))
    }

    /// The next datagram, or None when none arrives within `within`.
    pub async fn notification_within(&self, within: Duration) -> Option<String> {
        self.process.notification_within(within).await
    }

    /// Skips datagrams until one starting with `prefix` arrives.
    pub async fn wait_for_notification(&self, prefix: &str) -> String {
        loop {
            let message = self.next_notification().await;
            if message.starts_with(prefix) {
                return message;
            }
        }
    }

    pub fn send_signal(&self, signal: &str) {
        self.process.send_signal(signal).unwrap();
    }

    /// Waits for the process to exit, within `within`.
    pub async fn exit_within(&mut self, within: Duration) -> ExitStatus {
        match self.process.exit_within(within).await {
            Some(status) => status,
            None => panic!("the daemon did not exit within {within:?}\n{}", self.logs()),
        }
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The last JSON log line with this message (the daemon ran with JSON logs).
    pub fn json_log_line(&self, message: &str) -> serde_json::Value {
        let logs = self.logs();
        logs.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .rfind(|line| line["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no JSON log line {message:?}:\n{logs}"))
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.process.grpc_url())
            .unwrap()
            .connect_lazy()
    }

    pub fn write_config(&self, config_head: &str, config_body: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let preamble: String = text
            .lines()
            .take(2)
            .map(|line| format!("{line}\n"))
            .collect();
        std::fs::write(
            &self.config_path,
            format!("{preamble}{config_head}\n{config_body}"),
        )
        .unwrap();
    }
}

async fn launch_or_panic(
    launch: &DaemonLaunch,
) -> douyin_tokend::bench::daemon_process::DaemonProcess {
    match douyin_tokend::bench::daemon_process::DaemonProcess::start(launch).await {
        Ok(process) => process,
        Err(error) => panic!(
            "{error:#}\n{}",
            std::fs::read_to_string(&launch.log_path).unwrap_or_default()
        ),
    }
}

/// The sandbox Douyin on the real clock, knowing the default app and `merchants`.
pub async fn real_time_sandbox(merchants: &[&str]) -> Sandbox {
    let sandbox = Sandbox::start(Arc::new(SystemClock), SandboxConfig::default())
        .await
        .unwrap();
    sandbox.state().add_app(CLIENT_KEY, CLIENT_SECRET);
    for account_id in merchants {
        sandbox.state().authorize_merchant(account_id, CLIENT_KEY);
    }
    sandbox
}

pub async fn lookup(
    channel: Channel,
    account_id: &str,
    order_id: &str,
) -> Result<GetAfterSaleOrderDetailResponse, tonic::Status> {
    AfterSaleServiceClient::with_interceptor(channel, admin_key())
        .get_after_sale_order_detail(GetAfterSaleOrderDetailRequest {
            account_id: account_id.to_owned(),
            order_id: order_id.to_owned(),
            certificate_id: None,
            include_raw_json: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A Douyin that hands out a token and answers lookups with the documented
/// example, but holds each lookup until the test releases it, announcing its
/// arrival first: the test knows a call is in flight without sleeping.
pub struct GatedUpstream {
    pub base_url: String,
    arrivals: mpsc::UnboundedReceiver<()>,
    released: Arc<watch::Sender<bool>>,
}

impl GatedUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let released = Arc::new(watch::channel(false).0);
        let gate = Arc::clone(&released);
        let router = Router::new()
            .route(
                "/oauth/client_token/",
                post(|| async {
                    axum::Json(serde_json::json!({
                        "data": {"access_token": "clt.gated0000000000000000000000000000000000", "description": "", "error_code": 0, "expires_in": 7200},
                        "message": "success"
                    }))
                }),
            )
            .route(
                AFTER_SALE_PATH,
                get(move || {
                    let arrived = arrived.clone();
                    let mut gate = gate.subscribe();
                    async move {
                        let _ = arrived.send(());
                        let _ = gate.wait_for(|released| *released).await;
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            DOCUMENTED_EXAMPLE,
                        )
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            base_url,
            arrivals,
            released,
        }
    }

    /// Waits until a lookup reached the upstream and is being held.
    pub async fn lookup_arrived(&mut self) {
        tokio::time::timeout(PATIENCE, self.arrivals.recv())
            .await
            .expect("a lookup reaches the upstream")
            .unwrap();
    }

    /// Lets every held lookup, and every later one, answer.
    pub fn release_lookups(&self) {
        self.released.send_replace(true);
    }
}
