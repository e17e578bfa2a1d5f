//! Secrets at rest: the database never holds a secret or token in plaintext,
//! a wrong or missing master key stops start-up without touching the data,
//! rotation keeps every token usable, and one database has one owner.

use douyin_tokend::sandbox::DOCUMENTED_ORDER_ID;

use crate::helpers::{ACCOUNT_ID, CLIENT_SECRET, TestApp};

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn the_database_files_hold_no_secret_or_token_in_plaintext() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap().access_token;
    let stopped = app.stop_daemon().await;

    let files = stopped.database_files();
    assert!(!files.is_empty());
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        assert!(
            !contains(&bytes, CLIENT_SECRET),
            "the secret is readable in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, &token),
            "the token is readable in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, "clt."),
            "a token is readable in {}",
            file.display()
        );
    }
    // The same bytes open with the key: the token survives the restart.
    let app = stopped.start().await.map_err(|(error, _)| error).unwrap();
    assert_eq!(
        app.access_token_for(ACCOUNT_ID).await.unwrap().access_token,
        token
    );
    assert_eq!(app.sandbox.state().stats().token_calls, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_master_key_stops_start_up_and_leaves_the_data_intact() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap().access_token;
    let stopped = app.stop_daemon().await;
    let key_file = stopped.config.master_key_path(None).unwrap();
    let right_key = std::fs::read(&key_file).unwrap();

    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
    let (error, stopped) = stopped
        .start()
        .await
        .err()
        .expect("a wrong key must stop start-up");
    let message = format!("{error:#}");
    assert!(message.contains("does not open the database"), "{message}");
    assert!(message.contains("nothing was changed"), "{message}");

    std::fs::remove_file(&key_file).unwrap();
    let (error, stopped) = stopped
        .start()
        .await
        .err()
        .expect("a missing key must stop start-up");
    assert!(format!("{error:#}").contains("is missing"), "{error:#}");
    assert!(
        !key_file.exists(),
        "no new key is made up for an existing database"
    );

    // With the right key back, everything is as it was: same token, no fetch.
    std::fs::write(&key_file, right_key).unwrap();
    let app = stopped.start().await.map_err(|(error, _)| error).unwrap();
    assert_eq!(
        app.access_token_for(ACCOUNT_ID).await.unwrap().access_token,
        token
    );
    assert_eq!(app.sandbox.state().stats().token_calls, 1);
    assert_eq!(app.token_status().await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn rotating_the_master_key_keeps_every_token_and_secret_usable() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap().access_token;
    let stopped = app.stop_daemon().await;
    let key_file = stopped.config.master_key_path(None).unwrap();
    let old_key = std::fs::read_to_string(&key_file).unwrap();

    let rotation = douyin_tokend::app::rotate_master_key(&stopped.config)
        .await
        .unwrap();

    assert_eq!(rotation.values_resealed, 2, "one secret and one token");
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_key);
    let app = stopped.start().await.map_err(|(error, _)| error).unwrap();
    assert_eq!(
        app.access_token_for(ACCOUNT_ID).await.unwrap().access_token,
        token
    );
    // The secret opens too: a forced refresh authenticates with it.
    app.force_refresh().await.unwrap();
    assert_eq!(app.sandbox.state().stats().token_calls, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_database_is_refused() {
    let app = TestApp::spawn().await;
    let clock: douyin_tokend::clock::SharedClock = app.clock.clone();

    let error = douyin_tokend::app::App::start(app.config.clone(), clock)
        .await
        .err()
        .expect("one owner per database");

    assert!(
        format!("{error:#}").contains("another douyin-tokend process is using the database"),
        "{error:#}"
    );
    app.stop().await;
}

/// The uid this test runs as (root in CI), from /proc.
fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid line")
}

#[tokio::test]
async fn rotation_keeps_the_key_files_owner_group_and_mode_and_refuses_an_unreadable_layout() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let app = TestApp::spawn().await;
    app.register_default().await;
    let stopped = app.stop_daemon().await;
    let key_file = stopped.config.master_key_path(None).unwrap();
    // The service user: nobody when the test runs as root (as CI does), else ourselves.
    let service = if current_uid() == 0 {
        65534
    } else {
        current_uid()
    };
    for file in stopped.database_files() {
        std::os::unix::fs::chown(&file, Some(service), Some(service)).unwrap();
    }
    std::os::unix::fs::chown(&key_file, Some(service), Some(service)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();

    douyin_tokend::app::rotate_master_key(&stopped.config)
        .await
        .unwrap();
    let rotated = std::fs::metadata(&key_file).unwrap();
    assert_eq!(
        (rotated.uid(), rotated.gid(), rotated.mode() & 0o777),
        (service, service, 0o640),
        "the new key has the old one's owner, group and mode"
    );

    if current_uid() == 0 {
        // A key only root can read, beside a database the service user owns:
        // refused, and the key stays as it was.
        std::os::unix::fs::chown(&key_file, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let before = std::fs::read(&key_file).unwrap();
        let error = douyin_tokend::app::rotate_master_key(&stopped.config)
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("not readable by uid 65534"),
            "{error:#}"
        );
        assert_eq!(std::fs::read(&key_file).unwrap(), before);
    }
}
