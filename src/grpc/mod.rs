//! The gRPC front: builds the tonic server with the daemon's services, health
//! and reflection, and serves it on a listener the caller bound, each call in
//! a span of its own keyed by the request id it also answers with (see
//! `request_id` and `telemetry`). The only module that knows tonic.

mod admin;
mod after_sale;
mod after_sale_events;
pub(crate) mod health;
mod request_id;
mod small_frames;
pub(crate) mod status;
mod token;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use std::sync::Arc;

use crate::access::{AccessDenied, ApiClient, Authenticator};
use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::lookup::LookupService;
use crate::metrics::Metrics;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleServiceServer;
use crate::proto::tokend::v1::admin_service_server::AdminServiceServer;
use crate::proto::tokend::v1::token_service_server::TokenServiceServer;
use crate::registry::Registry;
use crate::token::TokenManager;
use crate::transport::Listener;

/// What the gRPC services need from the rest of the daemon.
#[derive(Clone)]
pub(crate) struct GrpcDependencies {
    pub(crate) lookup: LookupService,
    pub(crate) registry: Registry,
    pub(crate) tokens: TokenManager,
    pub(crate) clock: SharedClock,
    pub(crate) audit: AuditLog,
    pub(crate) metrics: Metrics,
    pub(crate) events: crate::after_sale_events::AfterSaleEvents,
    /// Configuration reloads, for AdminService.ReloadConfig.
    pub(crate) reloader: crate::reload::Reloader,
    /// Cancelled when shutdown starts (streams end then).
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

/// The authenticated caller, put in each request's extensions by the interceptor.
fn caller<T>(request: &tonic::Request<T>) -> Result<Arc<ApiClient>, tonic::Status> {
    request
        .extensions()
        .get::<Arc<ApiClient>>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("the request was not authenticated"))
}

/// Authenticates every call of a service by its bearer key; the scope and
/// app/merchant checks happen in each handler, which knows what is asked.
fn authenticate_with(
    authenticator: Authenticator,
    metrics: Metrics,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let refusal_log = Arc::new(RefusalLog::default());
    move |mut request: tonic::Request<()>| {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let client = authenticator.authenticate(authorization).map_err(|error| {
            let reason = match &error {
                AccessDenied::MissingKey => Some("missing_key"),
                AccessDenied::UnknownKey => Some("unknown_key"),
                AccessDenied::MissingScope { .. } | AccessDenied::OutOfBounds { .. } => None,
            };
            if let Some(reason) = reason {
                metrics.record_unauthenticated_call(reason);
                refusal_log.note(reason, request.remote_addr());
            }
            status::access_status(&error)
        })?;
        request.extensions_mut().insert(client);
        Ok(request)
    }
}

/// Logs refused API keys at most once per `REFUSAL_LOG_INTERVAL`, with the
/// peer's address and how many refusals the quiet time held, never the
/// presented key: a scanner must not be able to flood the journal.
struct RefusalLog(crate::telemetry::LogThrottle);

impl Default for RefusalLog {
    fn default() -> Self {
        Self(crate::telemetry::LogThrottle::new(REFUSAL_LOG_INTERVAL))
    }
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl RefusalLog {
    fn note(&self, reason: &'static str, peer: Option<std::net::SocketAddr>) {
        let Some(unlogged_before) = self.0.admit() else {
            return;
        };
        let peer = peer.map_or_else(|| "a Unix socket peer".to_owned(), |peer| peer.to_string());
        tracing::warn!(
            reason,
            peer = %peer,
            unlogged_before,
            "refused a call for its API key (the key is never logged)"
        );
    }
}

/// The service names health is reported for, besides the overall "".
pub(crate) const SERVICE_NAMES: [&str; 3] = [
    "douyin.goodlife.v1.AfterSaleService",
    "tokend.v1.TokenService",
    "tokend.v1.AdminService",
];

/// Serves until `shutdown` completes, then stops accepting and lets in-flight
/// calls finish. Health statuses are the caller's (see [`health`]): it turns
/// them NOT_SERVING before `shutdown` completes.
pub(crate) async fn serve(
    dependencies: GrpcDependencies,
    listener: Listener,
    tls: Option<ServerTlsConfig>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version lists both, so a listing shows every service served.
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    // v1 for current tools; v1alpha too, since grpcurl before 1.8.8, grpc_cli
    // and Python's grpcio-reflection speak only v1alpha.
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let authenticate = authenticate_with(
        dependencies.registry.authenticator().clone(),
        dependencies.metrics.clone(),
    );
    // The call's span is opened by this layer, not by `trace_fn`: see `request_id`.
    let mut builder = Server::builder()
        .layer(request_id::RequestIdLayer)
        .layer(small_frames::SmallFramesLayer);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AfterSaleServiceServer::with_interceptor(
            after_sale::AfterSaleGrpc {
                lookup: dependencies.lookup.clone(),
                registry: dependencies.registry.clone(),
                metrics: dependencies.metrics.clone(),
                events: dependencies.events.clone(),
                stopping: dependencies.stopping.clone(),
            },
            authenticate.clone(),
        ))
        .add_service(TokenServiceServer::with_interceptor(
            token::TokenGrpc {
                registry: dependencies.registry.clone(),
                tokens: dependencies.tokens.clone(),
                clock: dependencies.clock.clone(),
                audit: dependencies.audit.clone(),
            },
            authenticate.clone(),
        ))
        .add_service(AdminServiceServer::with_interceptor(
            admin::AdminGrpc {
                registry: dependencies.registry,
                tokens: dependencies.tokens,
                clock: dependencies.clock,
                audit: dependencies.audit,
                reloader: dependencies.reloader,
            },
            authenticate,
        ));
    match listener {
        // Small request/response messages: Nagle's algorithm would add ~40 ms to each.
        Listener::Tcp(listener) => {
            router
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await
        }
        Listener::Unix(listener, path) => {
            let served = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown,
                )
                .await;
            let _ = std::fs::remove_file(&path);
            served
        }
    }
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
