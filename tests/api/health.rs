//! grpc.health.v1 per service and reflection, in process on the manual clock:
//! token-dependent services follow whether any app can get a token,
//! AdminService serves throughout, and reflection lists every service.

use std::time::Duration;

use douyin_tokend::sandbox::DOCUMENTED_ORDER_ID;
use tonic::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::daemon_process::PATIENCE;
use crate::helpers::{ACCOUNT_ID, TestApp};

async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let message = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("a health update arrives")
        .unwrap()
        .unwrap();
    ServingStatus::try_from(message.status).unwrap()
}

async fn status_of(app: &TestApp, service: &str) -> ServingStatus {
    let answer = HealthClient::new(app.channel())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

#[tokio::test]
async fn token_services_serve_only_while_some_app_can_get_a_token_and_admin_always() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(app.channel());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "douyin.goodlife.v1.AfterSaleService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    // No app registered: nothing to be unable to serve.
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    // An app without a token (the sandbox refuses this secret).
    app.register(crate::helpers::CLIENT_KEY, "refused-secret", ACCOUNT_ID)
        .await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    assert_eq!(status_of(&app, "").await, ServingStatus::NotServing);
    assert_eq!(
        status_of(&app, "tokend.v1.TokenService").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        status_of(&app, "tokend.v1.AdminService").await,
        ServingStatus::Serving
    );

    // The right secret and a lookup: a token, so SERVING again.
    app.register_default().await;
    app.lookup(ACCOUNT_ID, DOCUMENTED_ORDER_ID).await.unwrap();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert_eq!(status_of(&app, "").await, ServingStatus::Serving);

    // Two hours later the token is dead and nothing refreshed it.
    app.advance(Duration::from_secs(2 * 3600));
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    assert_eq!(
        status_of(&app, "tokend.v1.AdminService").await,
        ServingStatus::Serving
    );
    // An open watch must not hold the stop (TestApp waits for every call).
    tokio::time::timeout(PATIENCE, app.stop())
        .await
        .expect("the stop ends although a watch is open");
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    assert!(
        watch.message().await.unwrap().is_none(),
        "at shutdown the watch says NOT_SERVING and ends with OK"
    );
}

#[tokio::test]
async fn reflection_lists_every_service_so_grpcurl_needs_no_proto_files() {
    let app = TestApp::spawn().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(app.channel())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "douyin.goodlife.v1.AfterSaleService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tokend.v1.AdminService",
            "tokend.v1.TokenService",
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_answers_older_tools_too() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let app = TestApp::spawn().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "tokend.v1.TokenService".to_owned(),
        )),
    };
    let mut answers = ServerReflectionClient::new(app.channel())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
        panic!("not a file descriptor answer: {answer:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    app.stop().await;
}
