//! AdminService and TokenService over gRPC: apps, merchants, token status,
//! forced refresh, what happens to merchants when their app goes, the guards
//! on destructive commands, and the audit trail of admin changes.

use douyin_tokend::domain::{AccountId, ClientKey};
use douyin_tokend::proto::tokend::v1::*;
use tonic::Code;

use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET, OTHER_CLIENT_KEY, TestApp};

#[tokio::test]
async fn apps_and_merchants_are_added_listed_moved_and_removed() {
    let app = TestApp::spawn().await;
    let mut admin = app.admin_client();
    let created = admin
        .put_app(PutAppRequest {
            client_key: CLIENT_KEY.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let replaced = admin
        .put_app(PutAppRequest {
            client_key: CLIENT_KEY.to_owned(),
            client_secret: "rotated".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!replaced.created);
    admin
        .put_app(PutAppRequest {
            client_key: "awsecondapp".to_owned(),
            client_secret: "s2".to_owned(),
        })
        .await
        .unwrap();
    for account in ["100", "200"] {
        admin
            .put_merchant(PutMerchantRequest {
                account_id: account.to_owned(),
                client_key: CLIENT_KEY.to_owned(),
            })
            .await
            .unwrap();
    }
    let moved = admin
        .put_merchant(PutMerchantRequest {
            account_id: "200".to_owned(),
            client_key: "awsecondapp".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!moved.created);

    let apps = admin
        .list_apps(ListAppsRequest {})
        .await
        .unwrap()
        .into_inner()
        .apps;
    let summary: Vec<(String, String, i64)> = apps
        .into_iter()
        .map(|app| (app.client_key, app.source, app.merchant_count))
        .collect();
    assert_eq!(
        summary,
        [
            ("awsecondapp".to_owned(), "admin".to_owned(), 1),
            (CLIENT_KEY.to_owned(), "admin".to_owned(), 1)
        ]
    );
    // An app with merchants stays unless they go with it.
    let refused = admin
        .remove_app(RemoveAppRequest {
            client_key: "awsecondapp".to_owned(),
            cascade: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("1 merchant(s)") && refused.message().contains("--cascade"),
        "{}",
        refused.message()
    );
    let of_second = admin
        .list_merchants(ListMerchantsRequest {
            client_key: "awsecondapp".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .merchants;
    assert_eq!(of_second.len(), 1, "the refused removal left the merchant");
    assert_eq!(of_second[0].account_id, "200");

    let removed = admin
        .remove_app(RemoveAppRequest {
            client_key: "awsecondapp".to_owned(),
            cascade: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.merchants_removed, 1);
    assert_eq!(
        app.access_token_for("200").await.unwrap_err().code(),
        Code::NotFound
    );
    admin
        .remove_merchant(RemoveMerchantRequest {
            account_id: "100".to_owned(),
        })
        .await
        .unwrap();
    let status = admin
        .remove_merchant(RemoveMerchantRequest {
            account_id: "100".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .put_merchant(PutMerchantRequest {
            account_id: "300".to_owned(),
            client_key: "awnosuchapp".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("app add"), "{}", status.message());
    app.stop().await;
}

#[tokio::test]
async fn get_access_token_answers_by_merchant_or_by_app_with_expiry_and_generation() {
    let app = TestApp::spawn().await;
    app.register_default().await;

    let by_merchant = app.access_token_for(ACCOUNT_ID).await.unwrap();
    let by_app = app
        .token_client()
        .get_access_token(GetAccessTokenRequest {
            selector: Some(get_access_token_request::Selector::ClientKey(
                CLIENT_KEY.to_owned(),
            )),
        })
        .await
        .unwrap()
        .into_inner();

    assert!(by_merchant.access_token.starts_with("clt."));
    assert_eq!(by_merchant.access_token, by_app.access_token);
    assert_eq!(by_merchant.client_key, CLIENT_KEY);
    assert_eq!(
        (by_merchant.generation, by_merchant.expires_in_seconds),
        (1, 7200)
    );
    assert_eq!(
        app.sandbox.state().judge_token(&by_app.access_token),
        douyin_tokend::sandbox::TokenVerdict::Valid
    );
    let missing = app
        .token_client()
        .get_access_token(GetAccessTokenRequest { selector: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    app.stop().await;
}

#[tokio::test]
async fn a_forced_refresh_fetches_a_new_generation_and_status_reports_it() {
    let app = TestApp::spawn().await;
    app.register_default().await;
    let before = app.access_token_for(ACCOUNT_ID).await.unwrap();

    let refreshed = app.force_refresh().await.unwrap();

    assert_eq!(refreshed.generation, before.generation + 1);
    let status = app.token_status().await;
    assert_eq!(status.len(), 1);
    let token = &status[0];
    assert_eq!(
        (
            token.state.as_str(),
            token.generation,
            token.expires_in_seconds
        ),
        ("valid", 2, 7200)
    );
    assert!(token.refresh_at_unix_ms > token.last_refresh_unix_ms);
    assert!(token.last_error.is_empty());
    // The previous token still works during the grace period.
    assert_eq!(
        app.sandbox.state().judge_token(&before.access_token),
        douyin_tokend::sandbox::TokenVerdict::Valid
    );
    let unknown = app
        .admin_client()
        .refresh_token(RefreshTokenRequest {
            client_key: "awnosuchapp".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test]
async fn apps_and_merchants_from_the_config_file_are_synced_at_start_up() {
    let secret_directory = tempfile::tempdir().unwrap();
    let secret_file = secret_directory.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();
    let app = TestApp::spawn_with(|config, _| {
        declare_default_app_and_merchant(config, &secret_file);
    })
    .await;

    app.lookup(ACCOUNT_ID, douyin_tokend::sandbox::DOCUMENTED_ORDER_ID)
        .await
        .unwrap();

    let apps = app
        .admin_client()
        .list_apps(ListAppsRequest {})
        .await
        .unwrap()
        .into_inner()
        .apps;
    assert_eq!(
        (apps[0].source.as_str(), apps[0].merchant_count),
        ("config", 1)
    );
    app.stop().await;
}

/// The config's app and merchant of the default app, its secret in a file.
fn declare_default_app_and_merchant(
    config: &mut douyin_tokend::config::Config,
    secret_file: &std::path::Path,
) {
    config.apps.push(douyin_tokend::config::AppEntry {
        client_key: ClientKey::parse(CLIENT_KEY).unwrap(),
        client_secret_file: Some(secret_file.to_path_buf()),
        client_secret_env: None,
    });
    config.merchants.push(douyin_tokend::config::MerchantEntry {
        account_id: AccountId::parse(ACCOUNT_ID).unwrap(),
        client_key: ClientKey::parse(CLIENT_KEY).unwrap(),
    });
}

#[tokio::test]
async fn what_the_config_file_declares_is_refused_over_admin_service_with_a_pointer_to_the_file() {
    let secret_directory = tempfile::tempdir().unwrap();
    let secret_file = secret_directory.path().join("secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let app = TestApp::spawn_with(|config, _| {
        declare_default_app_and_merchant(config, &secret_file);
    })
    .await;
    let token = app.access_token_for(ACCOUNT_ID).await.unwrap();
    let mut admin = app.admin_client();

    let refusals = [
        admin
            .put_app(PutAppRequest {
                client_key: CLIENT_KEY.to_owned(),
                client_secret: "another-secret".to_owned(),
            })
            .await
            .map(drop),
        admin
            .remove_app(RemoveAppRequest {
                client_key: CLIENT_KEY.to_owned(),
                cascade: true,
            })
            .await
            .map(drop),
        admin
            .remove_merchant(RemoveMerchantRequest {
                account_id: ACCOUNT_ID.to_owned(),
            })
            .await
            .map(drop),
        admin
            .remove_client(RemoveClientRequest {
                name: "test-admin".to_owned(),
            })
            .await
            .map(drop),
    ];
    for refused in refusals {
        let status = refused.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status
                .message()
                .contains("declared in the config file; edit the file"),
            "{}",
            status.message()
        );
    }
    // Moving the config's merchant to an app added over AdminService is a change too.
    admin
        .put_app(PutAppRequest {
            client_key: "awsecondapp".to_owned(),
            client_secret: "s2".to_owned(),
        })
        .await
        .unwrap();
    let moved = admin
        .put_merchant(PutMerchantRequest {
            account_id: ACCOUNT_ID.to_owned(),
            client_key: "awsecondapp".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Code::FailedPrecondition);
    assert!(
        moved.message().contains(&format!("merchant {ACCOUNT_ID}")),
        "{}",
        moved.message()
    );

    // Nothing changed: same token, same generation; a new merchant of the
    // config's app is the operator's to add.
    let after = app.access_token_for(ACCOUNT_ID).await.unwrap();
    assert_eq!(
        (after.access_token, after.generation, after.client_key),
        (token.access_token, token.generation, CLIENT_KEY.to_owned())
    );
    admin
        .put_merchant(PutMerchantRequest {
            account_id: "300".to_owned(),
            client_key: CLIENT_KEY.to_owned(),
        })
        .await
        .expect("an admin merchant of a config app is allowed");
    app.stop().await;
}

/// A client with one scope and no bounds, to create as some other admin than the test's.
fn unbound_client(name: &str, scope: &str) -> CreateClientRequest {
    CreateClientRequest {
        name: name.to_owned(),
        scopes: vec![scope.to_owned()],
        apps: Vec::new(),
        merchants: Vec::new(),
    }
}

#[tokio::test]
async fn the_last_client_with_the_admin_scope_cannot_be_removed() {
    let app = TestApp::spawn().await;
    let ops_key = app.create_client("ops", &["admin"], &[], &[]).await;
    // The config's admin client goes from the file: "ops" is the only admin left.
    let mut stopped = app.stop_daemon().await;
    stopped.config.clients.clear();
    let app = stopped.start().await.map_err(|(error, _)| error).unwrap();
    let mut ops = app.admin_client_with(&ops_key);

    let refused = ops
        .remove_client(RemoveClientRequest {
            name: "ops".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("last one with the admin scope"),
        "{}",
        refused.message()
    );
    // With a second admin, the first may go.
    ops.create_client(unbound_client("ops-2", "admin"))
        .await
        .unwrap();
    ops.remove_client(RemoveClientRequest {
        name: "ops".to_owned(),
    })
    .await
    .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn every_admin_change_is_in_the_audit_trail_with_the_calling_client() {
    let app = TestApp::spawn().await;
    let ops_key = app.create_client("ops", &["admin"], &[], &[]).await;
    let mut ops = app.admin_client_with(&ops_key);
    for secret in [CLIENT_SECRET, "rotated"] {
        ops.put_app(PutAppRequest {
            client_key: CLIENT_KEY.to_owned(),
            client_secret: secret.to_owned(),
        })
        .await
        .unwrap();
    }
    ops.put_app(PutAppRequest {
        client_key: OTHER_CLIENT_KEY.to_owned(),
        client_secret: "other".to_owned(),
    })
    .await
    .unwrap();
    for client_key in [CLIENT_KEY, OTHER_CLIENT_KEY] {
        ops.put_merchant(PutMerchantRequest {
            account_id: ACCOUNT_ID.to_owned(),
            client_key: client_key.to_owned(),
        })
        .await
        .unwrap();
    }
    ops.remove_merchant(RemoveMerchantRequest {
        account_id: ACCOUNT_ID.to_owned(),
    })
    .await
    .unwrap();
    ops.remove_app(RemoveAppRequest {
        client_key: OTHER_CLIENT_KEY.to_owned(),
        cascade: false,
    })
    .await
    .unwrap();
    ops.create_client(unbound_client("reader", "aftersale.read"))
        .await
        .unwrap();
    ops.remove_client(RemoveClientRequest {
        name: "reader".to_owned(),
    })
    .await
    .unwrap();

    let mut entries = app.audit_entries().await;
    // Newest first; the order they were made in is easier to read.
    entries.reverse();
    let app_named = |key: &str| key.to_owned();
    let trail: Vec<(String, String, String)> = entries
        .into_iter()
        .map(|entry| (entry.client, entry.action, entry.app))
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("test-admin", "client_created", String::new()),
        ("ops", "app_added", app_named(CLIENT_KEY)),
        ("ops", "app_secret_replaced", app_named(CLIENT_KEY)),
        ("ops", "app_added", app_named(OTHER_CLIENT_KEY)),
        ("ops", "merchant_added", app_named(CLIENT_KEY)),
        ("ops", "merchant_moved", app_named(OTHER_CLIENT_KEY)),
        ("ops", "merchant_removed", app_named(OTHER_CLIENT_KEY)),
        ("ops", "app_removed", app_named(OTHER_CLIENT_KEY)),
        ("ops", "client_created", String::new()),
        ("ops", "client_removed", String::new()),
    ]
    .into_iter()
    .map(|(client, action, app)| (client.to_owned(), action.to_owned(), app))
    .collect();
    assert_eq!(trail, expected);
    app.stop().await;
}

/// A client_key is an identifier: an error about an app names the key the
/// operator typed, so the mistake is visible (not a fingerprint to decode).
#[tokio::test]
async fn a_merchant_for_an_unknown_app_is_refused_naming_that_client_key() {
    let app = TestApp::spawn().await;
    let status = app
        .admin_client()
        .put_merchant(PutMerchantRequest {
            account_id: ACCOUNT_ID.to_owned(),
            client_key: "awnotthere".to_owned(),
        })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("awnotthere is not registered"),
        "{}",
        status.message()
    );
    app.stop().await;
}
