//! `douyin-tokend check-config` on broken configs: each exits 64 with a
//! message that names the offending key; good configs exit 0 (a PostgreSQL
//! one too, and its URL opens the store).

use std::path::Path;

use douyin_tokend::bench::postgres_server::PostgresServer;
use douyin_tokend::config::Config;
use douyin_tokend::store::{DatabaseLocation, MasterKeyOutcome, Store};

use crate::daemon_process::BINARY;

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn check_config(text: &str, environment: &[(&str, &str)]) -> Checked {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::write(directory.path().join("readable-secret"), "s3cret\n").unwrap();
    // 64 bytes that are not 64 characters: once a panic (exit 101).
    std::fs::write(
        directory.path().join("non-ascii-master-key"),
        format!("{}é{}\n", "a".repeat(31), "b".repeat(31)),
    )
    .unwrap();
    let output = tokio::process::Command::new(BINARY)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", directory.path())
        .env_remove("DOUYIN_TOKEND_LISTEN")
        .env_remove("DOUYIN_TOKEND_DATABASE")
        .env_remove("DOUYIN_TOKEND_DOUYIN_BASE_URL")
        .env_remove("UNSET_SECRET_VARIABLE")
        .envs(environment.iter().copied())
        .output()
        .await
        .unwrap();
    Checked {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const APP: &str =
    "[[apps]]\nclient_key = \"awcheckkey0001\"\nclient_secret_file = \"readable-secret\"\n";
/// A PostgreSQL database nothing listens for: the refusals below come
/// before any connection.
const POSTGRES: &str = "database = \"postgres://tokend@127.0.0.1:1/tokend\"\nmaster_key_file = \"/nonexistent/master.key\"\n";

#[tokio::test]
async fn every_broken_config_exits_64_naming_its_key() {
    let cases: Vec<(String, &str)> = vec![
        ("listn = \"127.0.0.1:1\"".into(), "listn"),
        ("listen = \"nowhere\"".into(), "listen"),
        ("listen = ".into(), "listen"),
        ("shutdown_grace = \"soon\"".into(), "shutdown_grace"),
        ("worker_threads = 0".into(), "worker_threads"),
        ("worker_threads = 65".into(), "worker_threads"),
        (
            "metrics_listen = \"127.0.0.1:50051\"".into(),
            "metrics_listen",
        ),
        ("metrics_listen = 9090".into(), "metrics_listen"),
        (
            "[douyin]\nbase_url = \"ftp://example\"".into(),
            "douyin.base_url",
        ),
        (
            "[douyin]\ntoken_endpoint = \"oauth\"".into(),
            "douyin.token_endpoint",
        ),
        (
            "[douyin]\nconnect_timeout = \"0s\"".into(),
            "douyin.connect_timeout",
        ),
        (
            "[douyin]\nrequest_timeout = \"0s\"".into(),
            "douyin.request_timeout",
        ),
        (
            "[refresh]\nwindow_end = \"soon\"".into(),
            "refresh.window_end",
        ),
        ("[refresh]\nwindow_end = ".into(), "refresh.window_end"),
        (
            "[refresh]\nwindow_start = \"10m\"\nwindow_end = \"15m\"".into(),
            "refresh.window_start",
        ),
        ("[refresh]\nsweep = \"*/5 * * * *\"".into(), "refresh.sweep"),
        // Six fields, but not ones the scheduler takes: once passed here and
        // stopped `serve` with exit 1.
        ("[refresh]\nsweep = \"a b c d e f\"".into(), "refresh.sweep"),
        (
            "[refresh]\nsweep = \"99 * * * * *\"".into(),
            "refresh.sweep",
        ),
        ("[audit]\nprune = \"x y z 1 2 3\"".into(), "audit.prune"),
        ("unix_socket_mode = \"0999\"".into(), "unix_socket_mode"),
        (
            "master_key_file = \"non-ascii-master-key\"".into(),
            "master_key_file",
        ),
        (
            "[refresh]\nmax_concurrent_fetches = 0".into(),
            "refresh.max_concurrent_fetches",
        ),
        (
            "[refresh]\nmax_concurrent_fetches = \"8\"".into(),
            "refresh.max_concurrent_fetches",
        ),
        (
            "[refresh]\nbackoff_max = \"0s\"".into(),
            "refresh.backoff_max",
        ),
        (
            "[refresh]\nwindow_begin = \"1m\"".into(),
            "refresh.window_begin",
        ),
        (
            format!("{APP}[[apps]]\nclient_key = \"b\"\nclient_secret_env = \"B\"\ncolour = 1"),
            "apps[1].colour",
        ),
        (
            "[[apps]]\nclient_secret_file = \"readable-secret\"".into(),
            "apps[0].client_key",
        ),
        (
            "[[apps]]\nclient_key = \"has space\"\nclient_secret_file = \"readable-secret\"".into(),
            "apps[0].client_key",
        ),
        (format!("{APP}{APP}"), "apps[1].client_key"),
        (
            "[[apps]]\nclient_key = \"a\"".into(),
            "apps[0].client_secret_file",
        ),
        (
            "[[apps]]\nclient_key = \"a\"\nclient_secret_file = \"missing-secret\"".into(),
            "apps[0].client_secret_file",
        ),
        (
            "[[apps]]\nclient_key = \"a\"\nclient_secret_env = \"UNSET_SECRET_VARIABLE\"".into(),
            "apps[0].client_secret_env",
        ),
        (
            format!("{APP}[[merchants]]\naccount_id = \"1\"\nclient_key = \"unknown\""),
            "merchants[0].client_key",
        ),
        (
            format!("{APP}[[merchants]]\naccount_id = \"\"\nclient_key = \"awcheckkey0001\""),
            "merchants[0].account_id",
        ),
        (
            format!(
                "{APP}[[merchants]]\naccount_id = \"1\"\nclient_key = \"awcheckkey0001\"\n[[merchants]]\naccount_id = \"1\"\nclient_key = \"awcheckkey0001\""
            ),
            "merchants[1].account_id",
        ),
        (
            // 64 bytes that are not 64 characters: once a panic (exit 101).
            format!(
                "[[clients]]\nname = \"a\"\nkey_sha256 = \"{}é{}\"\nscopes = [\"admin\"]",
                "a".repeat(31),
                "b".repeat(31)
            ),
            "clients[0].key_sha256",
        ),
        (
            // Two clients with one key: whose scopes would a caller get?
            format!(
                "[[clients]]\nname = \"a\"\nkey_sha256 = \"{0}\"\nscopes = [\"admin\"]\n[[clients]]\nname = \"b\"\nkey_sha256 = \"{0}\"\nscopes = [\"token.read\"]",
                "c".repeat(64)
            ),
            "clients[1].key_sha256",
        ),
        ("listen = \"localhost\"".into(), "listen"),
        (
            "[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\""
                .into(),
            "tls.cert_file",
        ),
        (
            "[tls]\ncert_file = \"/etc/passwd\"\nkey_file = \"/etc/passwd\"".into(),
            "tls.cert_file",
        ),
        ("unix_socket_mode = 0660".into(), "unix_socket_mode"),
        ("[cluster]\nfetch_lease = \"8s\"".into(), "cluster"),
        (
            format!("{POSTGRES}[cluster]\nfetch_lease = \"500ms\""),
            "cluster.fetch_lease",
        ),
        (
            format!("{POSTGRES}[cluster]\nfetch_lease = \"soon\""),
            "cluster.fetch_lease",
        ),
        (
            format!("{POSTGRES}[cluster]\nreconnect_backoff_max = \"10m\""),
            "cluster.reconnect_backoff_max",
        ),
        (
            format!("{POSTGRES}[cluster]\nlease = \"8s\""),
            "cluster.lease",
        ),
    ];
    let checks = cases.iter().map(|(text, _)| check_config(text, &[]));
    let results = futures::future::join_all(checks).await;
    for ((text, key), checked) in cases.iter().zip(results) {
        assert_eq!(checked.code, Some(64), "{text:?}: {}", checked.stderr);
        assert!(
            checked.stderr.contains(&format!(" {key}: ")),
            "{text:?} should name {key}: {}",
            checked.stderr
        );
        assert_eq!(checked.stderr.lines().count(), 1, "{}", checked.stderr);
    }
}

#[tokio::test]
async fn good_configs_exit_zero_and_say_what_they_declare() {
    let example = check_config(include_str!("../../config.example.toml"), &[]).await;
    assert_eq!(
        example.code,
        Some(64),
        "the example's secret file is not there"
    );
    assert!(
        example
            .stderr
            .contains("apps[0].client_secret_file: cannot read")
    );

    let with_secret =
        include_str!("../../config.example.toml").replace("douyin-app-secret", "readable-secret");
    let checked = check_config(&with_secret, &[]).await;
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert_eq!(
        checked.stdout,
        "config is valid: 1 app(s) with readable secrets, 1 merchant(s), 2 API client(s)\n"
    );
    let empty = check_config("", &[]).await;
    assert_eq!(empty.code, Some(0), "{}", empty.stderr);
    let from_environment = check_config(
        "[[apps]]\nclient_key = \"a\"\nclient_secret_env = \"CHECK_SECRET\"",
        &[("CHECK_SECRET", "s3cret")],
    )
    .await;
    assert_eq!(
        from_environment.code,
        Some(0),
        "{}",
        from_environment.stderr
    );
}

#[tokio::test]
async fn serve_refuses_a_malformed_master_key_file_with_64_before_opening_the_database() {
    let directory = tempfile::tempdir().unwrap();
    let key_file = directory.path().join("master.key");
    // 64 bytes that are not 64 characters: once a panic (exit 101).
    std::fs::write(
        &key_file,
        format!("{}é{}\n", "a".repeat(31), "b".repeat(31)),
    )
    .unwrap();
    let database = directory.path().join("tokend.db");
    let config = directory.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\nmaster_key_file = \"{}\"\n",
            database.display(),
            key_file.display()
        ),
    )
    .unwrap();
    let output = tokio::process::Command::new(BINARY)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DOUYIN_TOKEND_LISTEN")
        .env_remove("DOUYIN_TOKEND_DATABASE")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("master_key_file: "), "{stderr}");
    assert!(!database.exists(), "nothing is created for a bad config");
}

#[tokio::test]
async fn a_postgres_password_file_that_cannot_be_read_fails_check_config_and_serve_alike() {
    let directory = tempfile::tempdir().unwrap();
    // Nothing listens there: the refusal must come before any connection.
    let config = directory.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"postgres://tokend@127.0.0.1:1/tokend\"\n\
             master_key_file = \"{}\"\ndatabase_password_file = \"missing-password\"\n",
            directory.path().join("master.key").display()
        ),
    )
    .unwrap();
    check_config_and_serve_refuse(
        &config,
        Some(directory.path()),
        "database_password_file: cannot read ",
    )
    .await;
    assert!(
        !directory.path().join("master.key").exists(),
        "no key is made up for a config that cannot start"
    );
}

#[tokio::test]
async fn a_cluster_setting_out_of_range_fails_check_config_and_serve_alike() {
    let directory = tempfile::tempdir().unwrap();
    // Nothing listens there: the refusal must come before any connection.
    let config = directory.path().join("config.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\n{POSTGRES}[cluster]\nfetch_lease = \"2m\"\n"),
    )
    .unwrap();
    check_config_and_serve_refuse(
        &config,
        None,
        "cluster.fetch_lease: must be between 1s and 1m",
    )
    .await;
}

#[tokio::test]
async fn a_postgres_socket_url_from_the_config_file_opens_the_store() {
    let server = PostgresServer::start().await.expect("the server starts");
    server.create_database("from_config").await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let key_file = directory.path().join("cluster-master.key");
    let config_file = directory.path().join("config.toml");
    // postgres:///<database>?host=<socket directory>&port=…&user=…: no host
    // before the path, the socket directory in the query.
    std::fs::write(
        &config_file,
        format!(
            "database = \"{}\"\nmaster_key_file = \"{}\"\n",
            server.url("from_config"),
            key_file.display()
        ),
    )
    .unwrap();
    let checked = tokio::process::Command::new(BINARY)
        .arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("DOUYIN_TOKEND_DATABASE")
        .output()
        .await
        .unwrap();
    assert_eq!(
        checked.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let config = Config::load(Some(&config_file)).unwrap();
    let location = config.database_location(None).unwrap();
    assert!(
        matches!(location, DatabaseLocation::Postgres(_)),
        "{location}"
    );
    let (store, outcome) = Store::open_location(&location, &config.master_key_path(None).unwrap())
        .await
        .expect("the store opens on the URL as the config file wrote it");
    assert_eq!(outcome, MasterKeyOutcome::Created(key_file.clone()));
    store.close().await;

    // What serve would refuse for good, check-config refuses too, with 64 so
    // systemd stops restarting: a key that does not open the sealed
    // database, a database or a role PostgreSQL does not know.
    let other_key = directory.path().join("other-master.key");
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let unknown_role = server
        .url("from_config")
        .replace(&format!("user={}", server.user()), "user=nobody_here");
    let refusals = [
        (
            server.url("from_config"),
            &other_key,
            "does not open the database",
        ),
        (
            server.url("no_such_database"),
            &key_file,
            "no_such_database",
        ),
        (unknown_role, &key_file, "nobody_here"),
    ];
    for (url, key, expected) in refusals {
        std::fs::write(
            &config_file,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"{url}\"\nmaster_key_file = \"{}\"\n",
                key.display()
            ),
        )
        .unwrap();
        check_config_and_serve_refuse(&config_file, None, expected).await;
    }
}

#[tokio::test]
async fn a_sweep_too_rare_to_feed_the_systemd_watchdog_is_refused_and_a_frequent_one_is_not() {
    let every_two_minutes = "[refresh]\nsweep = \"0 */2 * * * *\"";
    let every_fifteen_seconds = "[refresh]\nsweep = \"*/15 * * * * *\"";
    let watchdog = [("WATCHDOG_USEC", "60000000")];
    let refused = check_config(every_two_minutes, &watchdog).await;
    assert_eq!(refused.code, Some(64), "{}", refused.stderr);
    assert!(
        refused.stderr.contains(" refresh.sweep: ") && refused.stderr.contains("120 s apart"),
        "{}",
        refused.stderr
    );
    let accepted = check_config(every_fifteen_seconds, &watchdog).await;
    assert_eq!(accepted.code, Some(0), "{}", accepted.stderr);
    // Without a watchdog there is nothing to feed.
    let no_watchdog = check_config(every_two_minutes, &[]).await;
    assert_eq!(no_watchdog.code, Some(0), "{}", no_watchdog.stderr);
}

/// `KEY=$(douyin-tokend client new-key)` captures the key alone; the config
/// line with its hash goes to stderr, for the operator's eyes.
#[tokio::test]
async fn client_new_key_prints_the_key_alone_on_stdout_and_its_hash_on_stderr() {
    let output = tokio::process::Command::new(BINARY)
        .args(["client", "new-key"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let key = stdout.trim_end_matches('\n');
    assert!(
        key.starts_with("dtk_") && !key.contains(char::is_whitespace),
        "stdout holds only the key: {stdout:?}"
    );
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    assert!(
        stderr.contains(&format!("key_sha256 = \"{hash}\"")),
        "{stderr}"
    );
}

#[tokio::test]
async fn with_json_logs_a_fatal_start_up_error_is_a_json_line_with_a_numeric_exit_code() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("config.toml");
    std::fs::write(&config, "listen = \"nonsense\"\n").unwrap();
    let output = tokio::process::Command::new(BINARY)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env_remove("DOUYIN_TOKEND_LISTEN")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last_line = stderr.lines().last().expect("a line");
    let line: serde_json::Value = serde_json::from_str(last_line)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["exit_code"], 64, "a number: {line}");
    let message = line["fields"]["error"].as_str().unwrap();
    assert!(message.contains("listen: \"nonsense\""), "{line}");
}

#[tokio::test]
async fn a_per_app_rate_for_an_undeclared_app_is_a_warning_naming_the_key_not_a_refusal() {
    // Refused, it would make `app remove` of an admin-registered app a failed
    // restart later; silent, a typo in the client_key would go unnoticed.
    let rates =
        "[lookup.rates.after_sale_order_detail]\nper_app = { awcheckkey0001 = 5, awtypo = 3 }\n";
    let checked = check_config(&format!("{APP}{rates}"), &[]).await;
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    let warnings: Vec<&str> = checked
        .stderr
        .lines()
        .filter(|line| line.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", checked.stderr);
    assert!(
        warnings[0].contains("lookup.rates.after_sale_order_detail.per_app.awtypo"),
        "{}",
        warnings[0]
    );
    assert!(
        checked.stdout.contains("config is valid"),
        "{}",
        checked.stdout
    );
}

/// Runs `check-config`, then `serve`, on `config` without the daemon's
/// environment overrides (and with `credentials` as systemd's credentials
/// directory, or none), and asserts that both refuse it the same way: exit 64
/// and a message containing `expected`. Whatever serve would reject,
/// check-config must reject first.
async fn check_config_and_serve_refuse(config: &Path, credentials: Option<&Path>, expected: &str) {
    for command in ["check-config", "serve"] {
        let mut process = tokio::process::Command::new(BINARY);
        process
            .arg(command)
            .arg("--config")
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DOUYIN_TOKEND_LISTEN")
            .env_remove("DOUYIN_TOKEND_DATABASE");
        match credentials {
            Some(directory) => process.env("CREDENTIALS_DIRECTORY", directory),
            None => process.env_remove("CREDENTIALS_DIRECTORY"),
        };
        let output = process.output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{command}: {stderr}");
        assert!(stderr.contains(expected), "{command}: {stderr}");
    }
}
