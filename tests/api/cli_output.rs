//! The admin commands as a script runs them: the real binary against a
//! running daemon, `--json` parsed as JSON, a refusal from the daemon printed
//! as its one sentence without gRPC's code names, and each command's help
//! offering only the flags it uses.

use std::process::Output;

use crate::daemon_process::BINARY;
use crate::helpers::{ACCOUNT_ID, ADMIN_API_KEY, CLIENT_KEY, OTHER_CLIENT_KEY, TestApp};

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
