//! The real binary under a fake systemd: READY only once it can serve,
//! STOPPING and a clean exit on SIGTERM with in-flight calls finishing, the
//! watchdog fed only while the sweep runs, SIGHUP reloads that drop neither
//! tokens nor connections, `douyin-tokend reload` (systemd's ExecReload=)
//! failing with the reason while STATUS keeps it, health and the
//! `healthcheck` command, JSON logs.

use std::time::{Duration, Instant};

use douyin_tokend::proto::tokend::v1::ListTokenStatusRequest;
use douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient;
use douyin_tokend::sandbox::{DOCUMENTED_ORDER_ID, Fault};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::daemon_process::{
    BINARY, DaemonProcess, DaemonSettings, GatedUpstream, PATIENCE, app_and_merchants, lookup,
    real_time_sandbox,
};
use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET};

const SECOND_ACCOUNT_ID: &str = "7100000000000000002";

async fn healthcheck_command(process: &DaemonProcess, service: &str) -> std::process::Output {
    tokio::process::Command::new(BINARY)
        .args(["healthcheck", "--daemon"])
        .arg(process.grpc_address.to_string())
        .args(["--service", service])
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_during_a_slow_lookup_lets_it_finish_and_exits_zero_within_the_grace_period() {
    let mut upstream = GatedUpstream::start().await;
    let grace = Duration::from_secs(10);
    let mut daemon = DaemonProcess::start(
        "shutdown_grace = \"10s\"",
        DaemonSettings::new(upstream.base_url.clone()),
    )
    .await;
    let channel = daemon.channel();
    let in_flight = tokio::spawn(lookup(channel, ACCOUNT_ID, DOCUMENTED_ORDER_ID));
    upstream.lookup_arrived().await;

    let signalled = Instant::now();
    daemon.send_signal("TERM");
    let stopping = daemon.wait_for_notification("STOPPING=1").await;
    assert!(stopping.contains("STATUS="), "{stopping}");
    // STOPPING comes once health is NOT_SERVING, as the listener closes: a
    // newcomer is refused, reset, or at most told NOT_SERVING.
    let newcomer = HealthClient::new(daemon.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(
        newcomer
            .as_ref()
            .map_or(true, |answer| answer.get_ref().status
                == ServingStatus::NotServing as i32),
        "a new caller was served after STOPPING: {newcomer:?}"
    );
    upstream.release_lookups();

    let answer = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .unwrap()
        .unwrap()
        .expect("the in-flight lookup completes");
    assert_eq!(
        answer.data.unwrap().after_sale_order_list.len(),
        1,
        "the documented example arrived"
    );
    let status = daemon.exit_within(grace).await;
    let stopped_after = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(stopped_after < grace, "stopped after {stopped_after:?}");
    eprintln!("SIGTERM to exit with one in-flight lookup: {stopped_after:?}");
    let logs = daemon.logs();
    assert!(logs.contains("in-flight calls finished"), "{logs}");
    assert!(logs.contains("stopped"), "{logs}");
}

#[tokio::test]
async fn a_call_still_running_when_the_grace_period_ends_is_dropped_and_the_exit_is_still_zero() {
    let mut upstream = GatedUpstream::start().await;
    let mut daemon = DaemonProcess::start(
        "shutdown_grace = \"1s\"",
        DaemonSettings::new(upstream.base_url.clone()),
    )
    .await;
    let in_flight = tokio::spawn(lookup(daemon.channel(), ACCOUNT_ID, DOCUMENTED_ORDER_ID));
    upstream.lookup_arrived().await;

    let signalled = Instant::now();
    daemon.send_signal("TERM");
    let status = daemon.exit_within(PATIENCE).await;
    let stopped_after = signalled.elapsed();

    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(
        stopped_after >= Duration::from_secs(1),
        "the call got its grace: {stopped_after:?}"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the held call ends with an error once the process is gone"
    );
    assert!(
        daemon
            .logs()
            .contains("did not finish within the grace period")
    );
    eprintln!("SIGTERM to exit with a call outliving a 1 s grace: {stopped_after:?}");
}

#[tokio::test]
async fn ready_comes_once_the_listener_is_bound_and_health_answers_serving() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon = DaemonProcess::start("", DaemonSettings::new(sandbox.base_url())).await;

    // READY=1 was the first notification (checked by start) and named the
    // bound address: a call made right away is answered.
    let mut health = HealthClient::new(daemon.channel());
    let admin = health
        .check(HealthCheckRequest {
            service: "tokend.v1.AdminService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admin.status, ServingStatus::Serving as i32);
    // Once the start-up sweep fetched a token, everything serves.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "douyin.goodlife.v1.AfterSaleService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    while watch.message().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}
    let checked = healthcheck_command(&daemon, "").await;
    assert!(checked.status.success(), "{checked:?}");
    assert_eq!(
        String::from_utf8_lossy(&checked.stdout),
        "douyin-tokend: SERVING\n"
    );

    daemon.send_signal("INT");
    daemon.wait_for_notification("STOPPING=1").await;
    // A watcher that keeps listening, as a balancer does, hears NOT_SERVING
    // and then its watch ends cleanly (status OK): it holds no call open, so
    // the stop does not wait out the shutdown grace (tonic-health's own
    // watches never end; the grace's expiry has a test of its own).
    while watch.message().await.unwrap().unwrap().status != ServingStatus::NotServing as i32 {}
    assert!(
        watch.message().await.unwrap().is_none(),
        "the watch ends with OK after NOT_SERVING"
    );
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    let unreachable = healthcheck_command(&daemon, "").await;
    assert!(!unreachable.status.success());
    sandbox.stop().await;
}

#[tokio::test]
async fn health_and_healthcheck_say_not_serving_while_no_app_can_get_a_token() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut settings = DaemonSettings::new(sandbox.base_url());
    settings.app_secret = "a-refused-secret".to_owned();
    let mut daemon = DaemonProcess::start("", settings).await;

    let overall = healthcheck_command(&daemon, "").await;
    assert_eq!(overall.status.code(), Some(1), "{overall:?}");
    assert!(
        String::from_utf8_lossy(&overall.stderr).contains("NOT_SERVING"),
        "{overall:?}"
    );
    let token_service = healthcheck_command(&daemon, "tokend.v1.TokenService").await;
    assert_eq!(token_service.status.code(), Some(1));
    // The operator can still reach AdminService to fix the secret.
    let admin = healthcheck_command(&daemon, "tokend.v1.AdminService").await;
    assert!(admin.status.success(), "{admin:?}");

    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn watchdog_pings_go_on_while_the_sweep_runs() {
    // (Pings stopping when sweeps stop completing, and resuming, is proven on
    // paused time in systemd_notify's unit tests; a sweep that ticks too
    // rarely for the watchdog is refused at start-up, see check_config.rs.)
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let watchdog = Duration::from_secs(2);
    let mut settings = DaemonSettings::new(sandbox.base_url());
    settings.watchdog = Some(watchdog);
    let mut sweeping = DaemonProcess::start("[refresh]\nsweep = \"* * * * * *\"", settings).await;
    // Sweeping every second: a ping every second, for as long as we look.
    for _ in 0..4 {
        assert_eq!(sweeping.next_notification().await, "WATCHDOG=1");
    }
    sweeping.send_signal("TERM");
    assert_eq!(sweeping.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn sighup_adds_a_merchant_without_dropping_a_token_or_a_connection() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID, SECOND_ACCOUNT_ID]).await;
    let mut daemon = DaemonProcess::start("", DaemonSettings::new(sandbox.base_url())).await;
    let channel = daemon.channel();
    // A stream opened before the reload: it must still be there after it.
    let mut health_watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    while health_watch.message().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}
    lookup(channel.clone(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap();
    let unknown = lookup(channel.clone(), SECOND_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(sandbox.state().stats().tokens_issued_for(CLIENT_KEY), 1);

    daemon.write_config("", &app_and_merchants(&[ACCOUNT_ID, SECOND_ACCOUNT_ID]));
    daemon.send_signal("HUP");
    daemon.wait_for_notification("RELOADING=1").await;
    daemon.wait_for_notification("READY=1").await;

    lookup(channel.clone(), SECOND_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .expect("the merchant added by the reload is served");
    lookup(channel.clone(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap();
    assert_eq!(
        sandbox.state().stats().tokens_issued_for(CLIENT_KEY),
        1,
        "the token survived the reload"
    );
    let tokens =
        AdminServiceClient::with_interceptor(channel.clone(), crate::daemon_process::admin_key())
            .list_token_status(ListTokenStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .tokens;
    assert_eq!(
        (tokens[0].state.as_str(), tokens[0].generation),
        ("valid", 1)
    );
    assert!(
        daemon.logs().contains("merchants_added=1"),
        "{}",
        daemon.logs()
    );

    // The pre-reload stream still delivers: the connection was never dropped.
    daemon.send_signal("TERM");
    let last = health_watch.message().await.unwrap().unwrap();
    assert_eq!(last.status, ServingStatus::NotServing as i32);
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn a_broken_config_on_sighup_keeps_the_running_apps_and_merchants() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon = DaemonProcess::start("", DaemonSettings::new(sandbox.base_url())).await;
    let channel = daemon.channel();
    lookup(channel.clone(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap();

    daemon.write_config("[refresh]\nwindow_end = \"soon\"", &app_and_merchants(&[]));
    daemon.send_signal("HUP");
    daemon.wait_for_notification("RELOADING=1").await;
    let ready = daemon.wait_for_notification("READY=1").await;
    assert!(
        ready.contains("; last reload failed: ") && ready.contains("refresh.window_end"),
        "READY=1 ends RELOADING, and STATUS keeps the failure: {ready}"
    );

    lookup(channel, ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .expect("the merchant is still served");
    let logs = daemon.logs();
    assert!(logs.contains("configuration not reloaded"), "{logs}");
    assert!(logs.contains("refresh.window_end"), "{logs}");
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

/// `douyin-tokend reload` as the unit's ExecReload= runs it: with the key the
/// daemon wrote to its runtime directory.
async fn reload_command(
    process: &DaemonProcess,
    key_file: &std::path::Path,
) -> std::process::Output {
    tokio::process::Command::new(BINARY)
        .args(["reload", "--api-key-file"])
        .arg(key_file)
        .arg("--daemon")
        .arg(process.grpc_address.to_string())
        .output()
        .await
        .unwrap()
}

/// A daemon as systemd starts it with `RuntimeDirectory=` (and, when given,
/// `LoadCredential=`): the reload key lands in the runtime directory.
async fn start_with_runtime_directory(
    sandbox: &douyin_tokend::sandbox::Sandbox,
    config_body: String,
    credentials_directory: Option<&std::path::Path>,
) -> (DaemonProcess, tempfile::TempDir) {
    let runtime_directory = tempfile::tempdir().unwrap();
    let mut settings = DaemonSettings::new(sandbox.base_url());
    settings.config_body = config_body;
    settings.extra_environment.push((
        "RUNTIME_DIRECTORY".to_owned(),
        runtime_directory.path().display().to_string(),
    ));
    if let Some(directory) = credentials_directory {
        settings.extra_environment.push((
            "CREDENTIALS_DIRECTORY".to_owned(),
            directory.display().to_string(),
        ));
    }
    (DaemonProcess::start("", settings).await, runtime_directory)
}

#[tokio::test]
async fn douyin_tokend_reload_exits_non_zero_with_the_reason_and_status_keeps_it_until_a_good_reload()
 {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = real_time_sandbox(&[ACCOUNT_ID, SECOND_ACCOUNT_ID]).await;
    let (mut daemon, runtime_directory) =
        start_with_runtime_directory(&sandbox, app_and_merchants(&[ACCOUNT_ID]), None).await;
    let key_file = runtime_directory.path().join("reload.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "only the service user reads the reload key"
    );
    // The reload key reloads and does nothing else.
    let reload_key = std::fs::read_to_string(&key_file).unwrap();
    let refused = AdminServiceClient::with_interceptor(
        daemon.channel(),
        douyin_tokend::cli::BearerAuth::new(&reload_key).unwrap(),
    )
    .list_token_status(ListTokenStatusRequest {})
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    daemon.write_config(
        "[refresh]\nwindow_end = \"soon\"",
        &app_and_merchants(&[ACCOUNT_ID, SECOND_ACCOUNT_ID]),
    );
    let failed = reload_command(&daemon, &key_file).await;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        stderr.contains("configuration not reloaded") && stderr.contains("refresh.window_end"),
        "{stderr}"
    );
    daemon.wait_for_notification("RELOADING=1").await;
    let ready = daemon.wait_for_notification("READY=1").await;
    assert!(
        ready.contains("STATUS=serving gRPC on ")
            && ready.contains("; last reload failed: ")
            && ready.contains("refresh.window_end"),
        "{ready}"
    );
    let unknown = lookup(daemon.channel(), SECOND_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "nothing was applied");

    daemon.write_config("", &app_and_merchants(&[ACCOUNT_ID, SECOND_ACCOUNT_ID]));
    let applied = reload_command(&daemon, &key_file).await;
    assert!(applied.status.success(), "{applied:?}");
    assert_eq!(
        String::from_utf8_lossy(&applied.stdout),
        "configuration reloaded: 1 merchant added\n"
    );
    daemon.wait_for_notification("RELOADING=1").await;
    let ready = daemon.wait_for_notification("READY=1").await;
    assert!(!ready.contains("last reload failed"), "{ready}");
    lookup(daemon.channel(), SECOND_ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .expect("the merchant added by the reload is served");

    let audit =
        AdminServiceClient::with_interceptor(daemon.channel(), crate::daemon_process::admin_key())
            .list_audit(douyin_tokend::proto::tokend::v1::ListAuditRequest {
                since_unix_ms: 0,
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
    let reloads: Vec<(String, String)> = audit
        .into_iter()
        .filter(|entry| entry.action == "config_reload")
        .map(|entry| (entry.client, entry.reason))
        .collect();
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert_eq!(
        reloads[0],
        (
            "reload-key".to_owned(),
            "applied: 1 merchant added".to_owned()
        )
    );
    assert!(reloads[1].1.starts_with("refused: "), "{reloads:?}");

    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    assert!(!key_file.exists(), "the key goes with the process");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_reload_says_that_systemd_credentials_are_copied_only_at_start() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("app-secret"), CLIENT_SECRET).unwrap();
    let admin_client = app_and_merchants(&[])
        .split("[[apps]]")
        .next()
        .unwrap()
        .to_owned();
    let body = format!(
        "{admin_client}[[apps]]\nclient_key = \"{CLIENT_KEY}\"\nclient_secret_file = \"app-secret\"\n"
    );
    let (mut daemon, runtime_directory) =
        start_with_runtime_directory(&sandbox, body.clone(), Some(credentials.path())).await;
    let key_file = runtime_directory.path().join("reload.key");

    let unchanged = reload_command(&daemon, &key_file).await;
    assert!(unchanged.status.success(), "{unchanged:?}");
    let stdout = String::from_utf8_lossy(&unchanged.stdout);
    assert!(
        stdout.starts_with("configuration reloaded: nothing changed\n")
            && stdout.contains("(app-secret) are unchanged")
            && stdout.contains("only when the service starts"),
        "{stdout}"
    );

    daemon.write_config(
        "",
        &format!(
            "{body}[[apps]]\nclient_key = \"awnewapp\"\nclient_secret_file = \"new-app-secret\"\n"
        ),
    );
    let unreadable = reload_command(&daemon, &key_file).await;
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert_eq!(unreadable.status.code(), Some(1), "{unreadable:?}");
    assert!(
        stderr.contains("apps[1].client_secret_file")
            && stderr.contains("only when the service starts")
            && stderr.contains("systemctl restart"),
        "{stderr}"
    );
    let logs = daemon.logs();
    assert!(logs.contains("systemctl restart"), "{logs}");
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn json_logs_carry_the_request_id_merchant_app_and_douyin_logid_of_a_call() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon =
        DaemonProcess::start("", DaemonSettings::with_json_logs(sandbox.base_url())).await;
    sandbox
        .state()
        .push_lookup_faults([Fault::ErrorCode(2119005)]);
    let mut request = tonic::Request::new(
        douyin_tokend::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest {
            account_id: ACCOUNT_ID.to_owned(),
            order_id: DOCUMENTED_ORDER_ID.to_owned(),
            certificate_id: None,
            include_raw_json: false,
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", "req-test-0001".parse().unwrap());
    let refused = douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient::with_interceptor(daemon.channel(), crate::daemon_process::admin_key())
        .get_after_sale_order_detail(request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));

    let logs = daemon.logs();
    let line = daemon.json_log_line("after-sale lookup failed");
    let span = &line["span"];
    assert_eq!(span["request_id"], "req-test-0001", "{line}");
    assert_eq!(span["merchant"], ACCOUNT_ID, "{line}");
    assert_eq!(span["app"], CLIENT_KEY, "{line}");
    assert!(
        span["logid"].as_str().unwrap().starts_with("SANDBOX"),
        "{line}"
    );
    assert_eq!(line["fields"]["code"], "PERMISSION_DENIED");
    // Numbers as numbers (a u128 field once came out as a string).
    assert!(line["fields"]["elapsed_ms"].is_u64(), "{line}");
    assert!(logs.lines().all(|line| line.starts_with('{')), "{logs}");
    for line in logs.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        for section in ["fields", "span"] {
            let Some(fields) = line[section].as_object() else {
                continue;
            };
            for (name, value) in fields {
                if name.ends_with("_ms") || name.ends_with("_count") || name == "generation" {
                    assert!(value.is_number(), "{name} in {line}");
                }
            }
        }
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn metrics_are_served_on_a_listener_of_their_own_and_are_off_by_default() {
    assert_eq!(
        crate::helpers::TestApp::spawn().await.metrics_address,
        None,
        "no metrics_listen, no metrics listener"
    );
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon = DaemonProcess::start(
        "metrics_listen = \"127.0.0.1:0\"",
        DaemonSettings::new(sandbox.base_url()),
    )
    .await;
    let metrics_address = daemon
        .metrics_address
        .expect("READY's status names the metrics address");
    assert_ne!(metrics_address, daemon.grpc_address);
    lookup(daemon.channel(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap();

    let mut stream = tokio::net::TcpStream::connect(metrics_address)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut page = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut page)
        .await
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("douyin_tokend_lookup_duration_seconds_count{code=\"OK\"} 1\n"),
        "{page}"
    );
    assert!(
        page.contains("douyin_tokend_token_generation{app=\""),
        "{page}"
    );
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn a_reload_that_would_drop_the_last_admin_client_is_refused_and_changes_nothing() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let (daemon, runtime_directory) =
        start_with_runtime_directory(&sandbox, app_and_merchants(&[ACCOUNT_ID]), None).await;
    let key_file = runtime_directory.path().join("reload.key");
    // The same app and merchant, but the file's only admin client is gone.
    let without_clients: String = app_and_merchants(&[ACCOUNT_ID])
        .split_once("[[apps]]")
        .map(|(_, apps)| format!("[[apps]]{apps}"))
        .unwrap();
    daemon.write_config("", &without_clients);
    let refused = reload_command(&daemon, &key_file).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("\"test-admin\" is the last one with the admin scope"),
        "{stderr}"
    );
    // Nothing changed: the admin key still administers.
    AdminServiceClient::with_interceptor(daemon.channel(), crate::daemon_process::admin_key())
        .list_token_status(ListTokenStatusRequest {})
        .await
        .expect("the admin client survived the refused reload");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_daemon_given_several_worker_threads_serves_and_stops_like_the_one_thread_default() {
    // Every other process test runs the default single-threaded runtime; this
    // one proves the multi-threaded one `worker_threads` selects.
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let mut daemon = DaemonProcess::start(
        "worker_threads = 2",
        DaemonSettings::new(sandbox.base_url()),
    )
    .await;
    for _ in 0..3 {
        lookup(daemon.channel(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
            .await
            .unwrap();
    }
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    sandbox.stop().await;
}

#[tokio::test]
async fn serve_warns_about_a_per_app_rate_for_an_app_registered_nowhere_and_serves() {
    let sandbox = real_time_sandbox(&[ACCOUNT_ID]).await;
    let rates = format!(
        "[lookup.rates.after_sale_order_detail]\nper_app = {{ {CLIENT_KEY} = 5, awregisterednowhere = 3 }}"
    );
    let mut daemon = DaemonProcess::start(&rates, DaemonSettings::new(sandbox.base_url())).await;
    lookup(daemon.channel(), ACCOUNT_ID, DOCUMENTED_ORDER_ID)
        .await
        .unwrap();
    daemon.send_signal("TERM");
    assert_eq!(daemon.exit_within(PATIENCE).await.code(), Some(0));
    let logs = daemon.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("a per-app rate names an app"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("lookup.rates.after_sale_order_detail.per_app.awregisterednowhere"),
        "{}",
        warnings[0]
    );
    sandbox.stop().await;
}
