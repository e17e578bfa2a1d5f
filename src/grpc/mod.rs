//! The gRPC front: builds the tonic server with the daemon's services, health
//! and reflection, and serves it on a listener the caller bound, each call in
//! a span of its own (see `telemetry`). The only module that knows tonic.

mod admin;
mod after_sale;
pub mod health;
pub mod status;
mod token;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::clock::SharedClock;
use crate::lookup::LookupService;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleServiceServer;
use crate::proto::tokend::v1::admin_service_server::AdminServiceServer;
use crate::proto::tokend::v1::token_service_server::TokenServiceServer;
use crate::registry::Registry;
use crate::token::TokenManager;

/// What the gRPC services need from the rest of the daemon.
#[derive(Clone)]
pub struct GrpcDependencies {
    pub lookup: LookupService,
    pub registry: Registry,
    pub tokens: TokenManager,
    pub clock: SharedClock,
}

/// The service names health is reported for, besides the overall "".
pub const SERVICE_NAMES: [&str; 3] = [
    "douyin.goodlife.v1.AfterSaleService",
    "tokend.v1.TokenService",
    "tokend.v1.AdminService",
];

/// Serves until `shutdown` completes, then stops accepting and lets in-flight
/// calls finish. Health statuses are the caller's (see [`health`]): it turns
/// them NOT_SERVING before `shutdown` completes.
pub async fn serve(
    dependencies: GrpcDependencies,
    listener: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    // Small request/response messages: Nagle's algorithm would add ~40 ms to each.
    Server::builder()
        .trace_fn(rpc_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AfterSaleServiceServer::new(after_sale::AfterSaleGrpc {
            lookup: dependencies.lookup.clone(),
        }))
        .add_service(TokenServiceServer::new(token::TokenGrpc {
            registry: dependencies.registry.clone(),
            tokens: dependencies.tokens.clone(),
            clock: dependencies.clock.clone(),
        }))
        .add_service(AdminServiceServer::new(admin::AdminGrpc {
            registry: dependencies.registry,
            tokens: dependencies.tokens,
            clock: dependencies.clock,
        }))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// The span each call runs in, keyed by the caller's `x-request-id` if it sent one.
fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let caller_request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok());
    crate::telemetry::rpc_span(request.uri().path(), caller_request_id)
}

/// A gRPC code as a metric label.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The caller's deadline, from the `grpc-timeout` header.
fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let header = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(header).map(|timeout| Instant::now() + timeout)
}

/// Parses gRPC's `TimeoutValue TimeoutUnit` (at most 8 digits, then H M S m u n).
fn parse_grpc_timeout(header: &str) -> Option<Duration> {
    if header.len() < 2 || header.len() > 9 {
        return None;
    }
    let (digits, unit) = header.split_at(header.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
