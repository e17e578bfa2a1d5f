//! Gives every call one request id, which keys the call's `rpc` span and comes
//! back to the caller in the response's `x-request-id`, on success and error.
//!
//! The id is the caller's `x-request-id` when `telemetry` finds it usable,
//! else a fresh one. The span is opened here rather than in tonic's
//! `trace_fn`, because tonic calls `trace_fn` *before* any layer added with
//! `Server::builder().layer(..)` sees the request (tonic 0.14, `Svc::call` in
//! `transport/server/mod.rs`), and `trace_fn` gets the request only by shared
//! reference: a fresh id chosen there could not reach the response, and one
//! chosen here could not reach a span opened there.
//!
//! Known gap: when tonic itself ends a call at the caller's `grpc-timeout`
//! (its `GrpcTimeout` sits outside every layer), its CANCELLED response is
//! built outside this layer and carries no `x-request-id`. The caller's own
//! deadline has passed by then, so it has normally stopped listening.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::telemetry::{self, RequestId};

/// The metadata key callers send their request id in and get the call's back in.
pub(crate) const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Adds [`RequestIdService`] around the router.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// Chooses the call's request id, runs the call in its `rpc` span and puts
/// the id on the response headers.
#[derive(Clone, Debug)]
pub(crate) struct RequestIdService<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for RequestIdService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let caller_request_id = request
            .headers()
            .get(&REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok());
        let request_id = RequestId::for_call(caller_request_id);
        let mut header_value = HeaderValue::from_str(request_id.as_str())
            .expect("a usable request id is printable ASCII, always a valid header value");
        // Every id is new, so HPACK indexing would only churn the connection's
        // header table: marked sensitive, it is sent as a never-indexed literal.
        header_value.set_sensitive(true);
        // Written back so that whatever reads the metadata further in sees the
        // call's id, not a malformed one the caller sent.
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, header_value.clone());
        let span = telemetry::rpc_span(request.uri().path(), &request_id);
        // The interceptor (authentication) runs inside `call`, not in the
        // future: it belongs in the span too.
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let mut response = response.await?;
                // An error `Status` is a response too (trailers-only, status
                // in the headers), so this covers failed calls as well.
                response
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, header_value);
                Ok(response)
            }
            .instrument(span),
        )
    }
}
