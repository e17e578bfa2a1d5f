//! `douyin-tokend demo`: the daemon's main job end to end with no credentials
//! and no network — a sandbox Douyin on loopback, the daemon on a throwaway
//! database, a merchant registered over AdminService, a lookup over gRPC, and
//! a restart that reuses the stored token.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::app::App;
use crate::cli::{
    BearerAuth, MerchantCommand, admin_client, format_token_table, run_merchant_command,
};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ClientEntry, Config};
use crate::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest;
use crate::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use crate::proto::tokend::v1::{
    GetAccessTokenRequest, ListTokenStatusRequest, PutAppRequest, get_access_token_request,
    token_service_client::TokenServiceClient,
};
use crate::sandbox::{DOCUMENTED_ORDER_ID, Sandbox, SandboxConfig};

const DEMO_CLIENT_KEY: &str = "awdemo0000000001";
const DEMO_CLIENT_SECRET: &str = "demo-secret-known-only-to-the-sandbox";
const DEMO_ACCOUNT_ID: &str = "7000000000000000001";

struct RunningDaemon {
    app: App,
    address: String,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_daemon(config: Config, clock: SharedClock) -> anyhow::Result<RunningDaemon> {
    let app = App::start(config, clock).await?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let serving = app.clone();
    let stopped = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move { serving.serve(listener, stopped).await });
    Ok(RunningDaemon {
        app,
        address,
        stop,
        task,
    })
}

impl RunningDaemon {
    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.address.clone())?
            .connect()
            .await?)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        self.app.close().await;
        Ok(())
    }
}

/// Runs the demo, writing its report to `out`.
pub async fn run(out: &mut impl Write) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let sandbox = Sandbox::start(clock.clone(), SandboxConfig::default())
        .await
        .context("cannot start the sandbox")?;
    sandbox.state().add_app(DEMO_CLIENT_KEY, DEMO_CLIENT_SECRET);
    sandbox
        .state()
        .authorize_merchant(DEMO_ACCOUNT_ID, DEMO_CLIENT_KEY);
    let directory = tempfile::tempdir().context("cannot create a temporary directory")?;
    // The demo's own API client, with every scope; only its key's hash is configured.
    let api_key = crate::access::generate_api_key();
    let mut config = Config {
        database: directory.path().join("demo.db"),
        ..Config::default()
    };
    config.douyin.base_url = sandbox.base_url();
    config
        .clients
        .push(ClientEntry::with_every_scope("demo", &api_key));
    writeln!(out, "sandbox Douyin listening on {}", sandbox.base_url())?;

    let daemon = start_daemon(config.clone(), clock.clone()).await?;
    writeln!(
        out,
        "douyin-tokend serving gRPC on {} (database {})",
        daemon.address,
        config.database.display()
    )?;

    let mut admin = admin_client(&daemon.address, &Default::default(), &api_key).await?;
    admin
        .put_app(PutAppRequest {
            client_key: DEMO_CLIENT_KEY.to_owned(),
            client_secret: DEMO_CLIENT_SECRET.to_owned(),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!("registering the demo app failed: {}", status.message())
        })?;
    let added = run_merchant_command(
        &mut admin,
        &MerchantCommand::Add {
            account_id: DEMO_ACCOUNT_ID.to_owned(),
            client_key: DEMO_CLIENT_KEY.to_owned(),
        },
    )
    .await?;
    write!(
        out,
        "registered demo app and merchant {DEMO_ACCOUNT_ID}: {added}"
    )?;

    let mut after_sale = AfterSaleServiceClient::with_interceptor(
        daemon.channel().await?,
        BearerAuth::new(&api_key)?,
    );
    let response = after_sale
        .get_after_sale_order_detail(GetAfterSaleOrderDetailRequest {
            account_id: DEMO_ACCOUNT_ID.to_owned(),
            order_id: DOCUMENTED_ORDER_ID.to_owned(),
            certificate_id: None,
            include_raw_json: false,
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the lookup failed: {:?}: {}",
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    writeln!(
        out,
        "\nGetAfterSaleOrderDetail(account_id={DEMO_ACCOUNT_ID}, order_id={DOCUMENTED_ORDER_ID}) answered:"
    )?;
    writeln!(out, "{}", serde_json::to_string_pretty(&response)?)?;

    let tokens = admin
        .list_token_status(ListTokenStatusRequest {})
        .await?
        .into_inner()
        .tokens;
    writeln!(out, "\ntoken status:\n{}", format_token_table(&tokens))?;
    let fetched_before_restart = sandbox.state().stats().tokens_issued_total();
    daemon.stop().await?;

    let daemon = start_daemon(config, clock).await?;
    let mut token_service =
        TokenServiceClient::with_interceptor(daemon.channel().await?, BearerAuth::new(&api_key)?);
    let lease = token_service
        .get_access_token(GetAccessTokenRequest {
            selector: Some(get_access_token_request::Selector::AccountId(
                DEMO_ACCOUNT_ID.to_owned(),
            )),
        })
        .await
        .map_err(|status| anyhow::anyhow!("GetAccessToken failed: {}", status.message()))?
        .into_inner();
    let fetched_after_restart =
        sandbox.state().stats().tokens_issued_total() - fetched_before_restart;
    writeln!(
        out,
        "after a restart: GetAccessToken answered generation {} expiring in {} s; tokens fetched from Douyin by the restart: {}",
        lease.generation, lease.expires_in_seconds, fetched_after_restart
    )?;
    daemon.stop().await?;
    sandbox.stop().await;
    Ok(())
}
