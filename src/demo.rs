//! `douyin-tokend demo`: the daemon's main job end to end with no credentials
//! and no network — a sandbox Douyin on loopback, the daemon on a throwaway
//! database, a merchant registered over AdminService, a lookup over gRPC, a
//! restart that reuses the stored token, and then the after-sale chapter: a
//! signed refund-request notification reaches the webhook, a watcher prints
//! it, the order is looked up, approved (and the approval repeated, answered
//! from the record), and the merchant's refunds are listed.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::app::{App, ServeOptions};
use crate::cli::{
    BearerAuth, MerchantCommand, admin_client, event_text_line, format_token_table,
    run_merchant_command,
};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ClientEntry, Config, DatabaseSetting};
use crate::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use crate::proto::douyin::goodlife::v1::{
    AfterSaleOrder, AuditAfterSaleOrderRequest, AuditAfterSaleOrderResponse,
    GetAfterSaleOrderDetailRequest, ListAfterSaleOrdersRequest, WatchAfterSaleEventsRequest,
};
use crate::proto::tokend::v1::{
    GetAccessTokenRequest, ListTokenStatusRequest, PutAppRequest, get_access_token_request,
    token_service_client::TokenServiceClient,
};
use crate::sandbox::notifications::{NotificationSender, RefundRequestContent, Signing};
use crate::sandbox::{DOCUMENTED_ORDER_ID, Sandbox, SandboxConfig};

const DEMO_CLIENT_KEY: &str = "awdemo0000000001";
const DEMO_CLIENT_SECRET: &str = "demo-secret-known-only-to-the-sandbox";
const DEMO_ACCOUNT_ID: &str = "7000000000000000001";
/// The Msg-Id of the demo's one refund-request notification.
const DEMO_MSG_ID: &str = "demo-refund-request-1";
/// How long the demo waits for the watcher to see the notification; it is
/// there within milliseconds, so running out means something is broken.
const EVENT_PATIENCE: Duration = Duration::from_secs(30);

struct RunningDaemon {
    app: App,
    address: String,
    /// The webhook's URL, when the config turns the webhook on.
    webhook_url: Option<String>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_daemon(config: Config, clock: SharedClock) -> anyhow::Result<RunningDaemon> {
    let webhook_listener = match config.webhook.listen {
        Some(address) => Some(TcpListener::bind(address).await?),
        None => None,
    };
    let webhook_url = match &webhook_listener {
        Some(listener) => Some(format!(
            "http://{}{}",
            listener.local_addr()?,
            config.webhook.path
        )),
        None => None,
    };
    let app = App::start(config, clock).await?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let serving = app.clone();
    let stopped = stop.clone().cancelled_owned();
    let options = ServeOptions {
        webhook_listener,
        ..ServeOptions::default()
    };
    let task = tokio::spawn(async move { serving.serve_with(listener, options, stopped).await });
    Ok(RunningDaemon {
        app,
        address,
        webhook_url,
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
        database: DatabaseSetting::Sqlite(directory.path().join("demo.db")),
        ..Config::default()
    };
    config.douyin.base_url = sandbox.base_url();
    // The webhook on a free loopback port: the sandbox posts to it as Douyin would.
    config.webhook.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config
        .clients
        .push(ClientEntry::with_every_scope("demo", &api_key));
    writeln!(out, "sandbox Douyin listening on {}", sandbox.base_url())?;

    let daemon = start_daemon(config.clone(), clock.clone()).await?;
    writeln!(
        out,
        "douyin-tokend serving gRPC on {} (database {})",
        daemon.address, config.database
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
        .map_err(call_failed("GetAfterSaleOrderDetail"))?
        .into_inner();
    writeln!(
        out,
        "\nGetAfterSaleOrderDetail(account_id={DEMO_ACCOUNT_ID}, order_id={DOCUMENTED_ORDER_ID}) answered:"
    )?;
    writeln!(out, "{}", serde_json::to_string_pretty(&response)?)?;
    // The customer of the chapter below asks for a refund of this order's coupon.
    let certificate_id = response
        .data
        .as_ref()
        .and_then(|data| data.after_sale_order_list.first())
        .and_then(|order| order.refund_info_list.first())
        .map(|refund| refund.certificate_id.clone())
        .context("the documented order has no coupon to refund")?;

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
        .map_err(call_failed("GetAccessToken"))?
        .into_inner();
    let fetched_after_restart =
        sandbox.state().stats().tokens_issued_total() - fetched_before_restart;
    writeln!(
        out,
        "after a restart: GetAccessToken answered generation {} expiring in {} s; tokens fetched from Douyin by the restart: {}",
        lease.generation, lease.expires_in_seconds, fetched_after_restart
    )?;
    show_the_after_sale_chapter(out, &daemon, &sandbox, &api_key, &certificate_id).await?;
    daemon.stop().await?;
    sandbox.stop().await;
    Ok(())
}

/// Hears, looks, decides, reconciles: the four calls of the after-sale
/// chapter against the running daemon, every number read from the answers.
async fn show_the_after_sale_chapter(
    out: &mut impl Write,
    daemon: &RunningDaemon,
    sandbox: &Sandbox,
    api_key: &str,
    certificate_id: &str,
) -> anyhow::Result<()> {
    let webhook_url = daemon
        .webhook_url
        .clone()
        .context("the demo daemon runs without its webhook")?;
    writeln!(out, "\nthe after-sale chapter (webhook on {webhook_url}):")?;
    let mut after_sale = AfterSaleServiceClient::with_interceptor(
        daemon.channel().await?,
        BearerAuth::new(api_key)?,
    );

    // Hear: a watcher first, so the notification is seen as it arrives.
    let mut watcher = after_sale
        .watch_after_sale_events(WatchAfterSaleEventsRequest {
            after_sequence: 0,
            account_ids: vec![DEMO_ACCOUNT_ID.to_owned()],
        })
        .await
        .map_err(call_failed("WatchAfterSaleEvents"))?
        .into_inner();
    writeln!(
        out,
        "watcher: WatchAfterSaleEvents(after_sequence=0, account_ids=[{DEMO_ACCOUNT_ID}]) open"
    )?;
    let refund_request = RefundRequestContent {
        certificate_id: certificate_id.to_owned(),
        ..RefundRequestContent::example(DEMO_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
    };
    // Douyin lists a refund from the moment the customer asks for it.
    sandbox.state().add_refund_request(&refund_request);
    let answered = NotificationSender::new(webhook_url)
        .send_refund_request(
            DEMO_CLIENT_KEY,
            DEMO_CLIENT_SECRET,
            DEMO_MSG_ID,
            &refund_request,
            Signing::Correct,
        )
        .await
        .context("the sandbox could not post the notification")?;
    writeln!(
        out,
        "sandbox Douyin: a customer asks for a refund; signed notification (Msg-Id {DEMO_MSG_ID}) posted to the webhook, which answered HTTP {answered}"
    )?;
    let event = tokio::time::timeout(EVENT_PATIENCE, watcher.message())
        .await
        .context("the watcher saw no event")?
        .map_err(call_failed("the event stream"))?
        .context("the event stream ended")?;
    drop(watcher);
    writeln!(out, "watcher received event {}", event_text_line(&event))?;
    let reasons: Vec<String> = event
        .apply_reason
        .iter()
        .flat_map(|reason| &reason.reason_items)
        .map(|item| format!("{} {}", item.code, item.msg))
        .collect();
    writeln!(
        out,
        "  decoded: account_id={} order_id={} certificate_id={} refund_amount={} refund_time={} reasons=[{}]",
        event.account_id,
        event.order_id,
        event.certificate_id,
        event.refund_amount,
        event.refund_time,
        reasons.join("; ")
    )?;

    // Look: the order the event names.
    let detail = after_sale
        .get_after_sale_order_detail(GetAfterSaleOrderDetailRequest {
            account_id: event.account_id.clone(),
            order_id: event.order_id.clone(),
            certificate_id: Some(event.certificate_id.clone()),
            include_raw_json: false,
        })
        .await
        .map_err(call_failed("GetAfterSaleOrderDetail"))?
        .into_inner();
    let orders = detail
        .data
        .map(|data| data.after_sale_order_list)
        .unwrap_or_default();
    writeln!(
        out,
        "GetAfterSaleOrderDetail(order_id={}, certificate_id={}): {} after-sale order(s):{}",
        event.order_id,
        event.certificate_id,
        orders.len(),
        describe_orders(&orders)
    )?;

    // Decide: approve, then the same approval again, answered from the record.
    let approval = AuditAfterSaleOrderRequest {
        account_id: event.account_id.clone(),
        order_id: event.order_id.clone(),
        certificate_id: event.certificate_id.clone(),
        audit_status: true,
        reject_reason: String::new(),
        ..Default::default()
    };
    for attempt in ["approve", "approve again"] {
        let answer = after_sale
            .audit_after_sale_order(approval.clone())
            .await
            .map_err(call_failed("AuditAfterSaleOrder"))?
            .into_inner();
        writeln!(
            out,
            "AuditAfterSaleOrder({attempt}): {}; audit calls the sandbox Douyin received so far: {}",
            describe_audit(&answer),
            sandbox.state().stats().audit_calls
        )?;
    }

    // Reconcile: the merchant's refunds as Douyin lists them now.
    let page = after_sale
        .list_after_sale_orders(ListAfterSaleOrdersRequest {
            account_id: DEMO_ACCOUNT_ID.to_owned(),
            page_size: 20,
            cursor: "0".to_owned(),
            ..Default::default()
        })
        .await
        .map_err(call_failed("ListAfterSaleOrders"))?
        .into_inner();
    let listed = page
        .data
        .map(|data| data.after_sale_order_list)
        .unwrap_or_default();
    writeln!(
        out,
        "ListAfterSaleOrders(account_id={DEMO_ACCOUNT_ID}): {} refund(s):{}",
        listed.len(),
        describe_orders(&listed)
    )?;
    Ok(())
}

/// Turns a failed call's status into the demo's error, naming the call.
fn call_failed(call: &'static str) -> impl Fn(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{call} failed: {:?}: {}", status.code(), status.message())
}

fn describe_audit(answer: &AuditAfterSaleOrderResponse) -> String {
    let (error_code, description) = answer
        .data
        .as_ref()
        .map(|data| (data.error_code, data.description.as_str()))
        .unwrap_or((-1, "no data"));
    let logid = answer
        .extra
        .as_ref()
        .map(|extra| extra.logid.as_str())
        .unwrap_or_default();
    format!(
        "error_code {error_code}{}, logid {logid}, replayed {}",
        if description.is_empty() {
            String::new()
        } else {
            format!(" ({description})")
        },
        answer.replayed
    )
}

/// One line per after-sale order: its ids and each refund's coupon and status.
fn describe_orders(orders: &[AfterSaleOrder]) -> String {
    orders
        .iter()
        .map(|order| {
            let refunds: Vec<String> = order
                .refund_info_list
                .iter()
                .map(|refund| {
                    format!(
                        "certificate_id={} refund_status={}",
                        refund.certificate_id, refund.refund_status
                    )
                })
                .collect();
            format!(
                "\n  after_sale_id={} order_id={} refund_amount={} {}",
                order.after_sale_id,
                order.order_id,
                order.refund_amount,
                refunds.join(", ")
            )
        })
        .collect()
}
