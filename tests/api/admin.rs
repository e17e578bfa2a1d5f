//! AdminService and TokenService over gRPC: apps, merchants, token status,
//! forced refresh, and what happens to merchants when their app goes.

use douyin_tokend::domain::{AccountId, ClientKey};
use douyin_tokend::proto::tokend::v1::*;
use tonic::Code;

use crate::helpers::{ACCOUNT_ID, CLIENT_KEY, CLIENT_SECRET, TestApp};

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
    let of_second = admin
        .list_merchants(ListMerchantsRequest {
            client_key: "awsecondapp".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .merchants;
    assert_eq!(of_second.len(), 1);
    assert_eq!(of_second[0].account_id, "200");

    let removed = admin
        .remove_app(RemoveAppRequest {
            client_key: "awsecondapp".to_owned(),
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
        config.apps.push(douyin_tokend::config::AppEntry {
            client_key: ClientKey::parse(CLIENT_KEY).unwrap(),
            client_secret_file: Some(secret_file.clone()),
            client_secret_env: None,
        });
        config.merchants.push(douyin_tokend::config::MerchantEntry {
            account_id: AccountId::parse(ACCOUNT_ID).unwrap(),
            client_key: ClientKey::parse(CLIENT_KEY).unwrap(),
        });
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
