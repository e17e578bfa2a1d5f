//! The admin commands as a script runs them: the real binary against a
//! running daemon, `--json` parsed as JSON, a refusal from the daemon printed
//! as its one sentence without gRPC's code names, a daemon that cannot be
//! reached as one line naming its address, and each command's help offering
//! only the flags it uses.

use std::process::Output;

use crate::daemon_process::BINARY;
use crate::helpers::{ACCOUNT_ID, ADMIN_API_KEY, CLIENT_KEY, OTHER_CLIENT_KEY, TestApp};

/// sysexits' EX_UNAVAILABLE, the CLI's exit code for a daemon it cannot reach.
const EXIT_DAEMON_UNREACHABLE: i32 = 69;

/// Runs `douyin-tokend <command> <subcommand...> --daemon <address>` as the
/// test's admin client.
async fn run_admin_command(app: &TestApp, command: &str, subcommand: &[&str]) -> Output {
    run_against(&app.address.to_string(), command, subcommand).await
}

/// Runs `douyin-tokend <command> <subcommand...> --daemon <address>` with the
/// admin key and none of the caller's own daemon settings.
async fn run_against(address: &str, command: &str, subcommand: &[&str]) -> Output {
    tokio::process::Command::new(BINARY)
        .arg(command)
        .args(subcommand)
        .args(["--daemon", address])
        .env("DOUYIN_TOKEND_API_KEY", ADMIN_API_KEY)
        .env_remove("DOUYIN_TOKEND_API_KEY_FILE")
        .env_remove("DOUYIN_TOKEND_TLS_CA_FILE")
        .output()
        .await
        .unwrap()
}

/// `douyin-tokend <arguments...> --help`, its stdout.
async fn help_of(arguments: &[&str]) -> String {
    let output = tokio::process::Command::new(BINARY)
        .args(arguments)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// A loopback address nothing listens on: a port the kernel handed out and
/// took back.
fn closed_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    address.to_string()
}

/// The stderr of a failed command, asserted to be one line with no cause
/// chain from tonic or hyper in it.
fn the_one_error_line(output: &Output) -> String {
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for chain_words in [
        "transport error",
        "Caused by",
        "error trying to connect",
        "tcp connect error",
        "os error",
    ] {
        assert!(!stderr.contains(chain_words), "{chain_words} in {stderr}");
    }
    stderr.trim_end().to_owned()
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

#[tokio::test]
async fn app_list_json_is_an_array_holding_the_registered_app() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let listed = stdout_json(&run_admin_command(&app, "app", &["list", "--json"]).await);

    let apps = listed.as_array().expect("an array");
    assert_eq!(apps.len(), 1, "{listed}");
    assert_eq!(apps[0]["client_key"], CLIENT_KEY, "{listed}");
    assert_eq!(apps[0]["merchant_count"], 1, "{listed}");
    assert_eq!(apps[0]["source"], "admin", "{listed}");
}

#[tokio::test]
async fn client_create_json_holds_the_key_with_its_name_and_scopes() {
    let app = TestApp::spawn().await;

    let created = stdout_json(
        &run_admin_command(
            &app,
            "client",
            &["create", "reader", "--scope", "token.read", "--json"],
        )
        .await,
    );

    assert_eq!(created["name"], "reader", "{created}");
    assert_eq!(
        created["scopes"],
        serde_json::json!(["token.read"]),
        "{created}"
    );
    let api_key = created["api_key"].as_str().expect("a key");
    assert!(api_key.starts_with("dtk_"), "{created}");
    let listed = stdout_json(&run_admin_command(&app, "client", &["list", "--json"]).await);
    let names: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|client| client["name"].as_str())
        .collect();
    assert!(names.contains(&"reader"), "{listed}");
    let mut sorted_names = names.clone();
    sorted_names.sort_unstable();
    assert_eq!(names, sorted_names, "clients are listed by name");
}

#[tokio::test]
async fn a_refusal_from_the_daemon_prints_its_one_sentence_without_grpc_code_names() {
    let app = TestApp::spawn().await;

    let output = run_admin_command(
        &app,
        "merchant",
        &["add", ACCOUNT_ID, "--client-key", OTHER_CLIENT_KEY],
    )
    .await;

    assert!(!output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains(OTHER_CLIENT_KEY), "{stderr}");
    for code_words in ["status:", "Code", "NotFound", "FailedPrecondition"] {
        assert!(!stderr.contains(code_words), "{code_words} in {stderr}");
    }
}

#[tokio::test]
async fn client_list_shows_bounds_as_plain_ids_not_rust_debug() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let created = run_admin_command(
        &app,
        "client",
        &[
            "create",
            "bounded",
            "--scope",
            "token.read",
            "--app",
            CLIENT_KEY,
        ],
    )
    .await;
    assert!(created.status.success(), "{created:?}");

    let listed = run_admin_command(&app, "client", &["list"]).await;
    let table = String::from_utf8_lossy(&listed.stdout);
    let line = table
        .lines()
        .find(|line| line.starts_with("bounded"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.ends_with(&format!("apps {CLIENT_KEY} merchants every")),
        "{line}"
    );
    assert!(!line.contains('[') && !line.contains('"'), "{line}");
}

#[tokio::test]
async fn sandbox_help_offers_no_daemon_connection_flags() {
    let help = help_of(&["sandbox"]).await;

    for daemon_words in ["TLS", "tls", "api-key", "API key", "--daemon", "--config"] {
        assert!(!help.contains(daemon_words), "{daemon_words} in {help}");
    }
    assert!(help.contains("--listen"), "{help}");
}

#[tokio::test]
async fn a_daemon_command_s_help_offers_the_connection_flags_with_their_variables() {
    for command in [&["token", "list"][..], &["client", "create"], &["reload"]] {
        let help = help_of(command).await;

        for flag in [
            "--daemon",
            "--config",
            "--api-key-file",
            "--tls-ca-file",
            "--tls-cert-file",
            "--tls-key-file",
            "--tls-domain",
            "DOUYIN_TOKEND_ADDRESS",
            "DOUYIN_TOKEND_API_KEY",
            "DOUYIN_TOKEND_TLS_CA_FILE",
        ] {
            assert!(help.contains(flag), "{command:?}: no {flag} in {help}");
        }
    }
}

#[tokio::test]
async fn a_closed_port_is_one_line_naming_the_address_and_exit_69() {
    let address = closed_loopback_address();

    let output = run_against(&address, "token", &["list"]).await;

    let line = the_one_error_line(&output);
    assert!(
        line.starts_with(&format!("error: cannot reach the daemon at {address}: ")),
        "{line}"
    );
    assert!(line.contains("connection refused"), "{line}");
    assert!(line.contains("douyin-tokend serve"), "{line}");
    assert!(line.contains("DOUYIN_TOKEND_ADDRESS"), "{line}");
    assert_eq!(output.status.code(), Some(EXIT_DAEMON_UNREACHABLE));
}

#[tokio::test]
async fn tls_to_a_plaintext_daemon_is_one_line_pointing_at_the_ca_flag() {
    let app = TestApp::spawn().await;
    let pki = crate::transport::TestPki::new();
    let directory = tempfile::tempdir().unwrap();
    let ca_file = directory.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    let output = run_against(
        &app.address.to_string(),
        "client",
        &["list", "--tls-ca-file", ca_file.to_str().unwrap()],
    )
    .await;

    let line = the_one_error_line(&output);
    assert!(
        line.contains(&format!("cannot reach the daemon at {}", app.address)),
        "{line}"
    );
    assert!(line.contains("--tls-ca-file"), "{line}");
    assert_eq!(output.status.code(), Some(EXIT_DAEMON_UNREACHABLE));
    app.stop().await;
}

#[tokio::test]
async fn no_api_key_is_one_line_naming_the_variable_and_the_flag() {
    let output = tokio::process::Command::new(BINARY)
        .args(["app", "list", "--daemon", &closed_loopback_address()])
        .env_remove("DOUYIN_TOKEND_API_KEY")
        .env_remove("DOUYIN_TOKEND_API_KEY_FILE")
        .output()
        .await
        .unwrap();

    let line = the_one_error_line(&output);
    assert!(line.contains("DOUYIN_TOKEND_API_KEY"), "{line}");
    assert!(line.contains("--api-key-file"), "{line}");
    assert_eq!(output.status.code(), Some(1));
}

#[tokio::test]
async fn flags_written_before_the_command_as_they_once_were_still_work_where_they_apply() {
    // `--config F serve` and `--api-key-file K app list` were the documented
    // forms while these flags were global: scripts and drop-ins keep working.
    let app = TestApp::spawn().await;
    let directory = tempfile::tempdir().unwrap();
    let key_file = directory.path().join("admin.key");
    std::fs::write(&key_file, ADMIN_API_KEY).unwrap();
    let listed = tokio::process::Command::new(BINARY)
        .arg("--api-key-file")
        .arg(&key_file)
        .args([
            "app",
            "list",
            "--daemon",
            &app.address.to_string(),
            "--json",
        ])
        .env_remove("DOUYIN_TOKEND_API_KEY")
        .env_remove("DOUYIN_TOKEND_API_KEY_FILE")
        .output()
        .await
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    assert!(stdout_json(&listed).is_array(), "{listed:?}");

    let config = directory.path().join("config.toml");
    std::fs::write(&config, "listen = \"nowhere\"\n").unwrap();
    let checked = tokio::process::Command::new(BINARY)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env_remove("DOUYIN_TOKEND_CONFIG")
        .output()
        .await
        .unwrap();
    assert_eq!(
        checked.status.code(),
        Some(64),
        "the file was read: {checked:?}"
    );

    // Before a command that takes no such flag: refused, not ignored.
    let refused = tokio::process::Command::new(BINARY)
        .args(["--tls-ca-file", "/nowhere/ca.pem", "sandbox"])
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--tls-ca-file does not apply to this command"),
        "{stderr}"
    );
    assert!(!help_of(&[]).await.contains("--tls-ca-file"));
}
