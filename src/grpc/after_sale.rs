//! `douyin.goodlife.v1.AfterSaleService`: checks the caller's scope and bounds,
//! validates the request at the edge, hands it to the lookup use case, and
//! records its latency and Douyin's logid.

use tonic::{Request, Response, Status};

use tokio::time::Instant;

use super::{caller, code_label, deadline_of, status};
use crate::access::Scope;
use crate::domain::AfterSaleQuery;
use crate::douyin::TransportError;
use crate::douyin::after_sale::LookupFailure;
use crate::lookup::{LookupError, LookupService};
use crate::metrics::Metrics;
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleService;
use crate::proto::douyin::goodlife::v1::{
    GetAfterSaleOrderDetailRequest, GetAfterSaleOrderDetailResponse, WatchAfterSaleEventsRequest,
};
use crate::registry::Registry;
use crate::telemetry;

pub(crate) struct AfterSaleGrpc {
    pub(crate) lookup: LookupService,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    pub(crate) events: crate::after_sale_events::AfterSaleEvents,
    /// Cancelled at shutdown: event streams end then, not at the grace's end.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

#[tonic::async_trait]
impl AfterSaleService for AfterSaleGrpc {
    type WatchAfterSaleEventsStream = super::after_sale_events::AfterSaleEventStream;

    async fn watch_after_sale_events(
        &self,
        request: Request<WatchAfterSaleEventsRequest>,
    ) -> Result<Response<Self::WatchAfterSaleEventsStream>, Status> {
        super::after_sale_events::watch(&self.events, &self.stopping, request)
    }

    async fn get_after_sale_order_detail(
        &self,
        request: Request<GetAfterSaleOrderDetailRequest>,
    ) -> Result<Response<GetAfterSaleOrderDetailResponse>, Status> {
        let _queued = self.metrics.lookup_queued();
        let started = Instant::now();
        let answer = self.answer(request).await;
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        let elapsed = started.elapsed();
        self.metrics.record_lookup(code_label(code), elapsed);
        let elapsed_ms = elapsed.as_millis();
        match &answer {
            Ok(_) => tracing::debug!(elapsed_ms, "after-sale lookup answered"),
            Err(status) => {
                tracing::info!(
                    code = code_label(code),
                    elapsed_ms,
                    reason = status.message(),
                    "after-sale lookup failed"
                )
            }
        }
        answer
    }
}

impl AfterSaleGrpc {
    async fn answer(
        &self,
        request: Request<GetAfterSaleOrderDetailRequest>,
    ) -> Result<Response<GetAfterSaleOrderDetailResponse>, Status> {
        let client = caller(&request)?;
        client
            .require(Scope::AfterSaleRead)
            .map_err(|error| status::access_status(&error))?;
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let query = AfterSaleQuery::parse(
            &request.account_id,
            &request.order_id,
            request.certificate_id.as_deref(),
        )
        .map_err(|error| status::invalid_argument(&error))?;
        let app = self
            .registry
            .app_for_merchant(&query.account_id)
            .map_err(|error| status::registry_status(&error))?;
        client
            .require_merchant(&query.account_id, &app)
            .map_err(|error| status::access_status(&error))?;
        telemetry::record_merchant(&query.account_id);
        let answer = self
            .lookup
            .after_sale_order_detail(&query, deadline)
            .await
            .inspect_err(|error| telemetry::record_logid(logid_of(error)))
            .map_err(|error| status::lookup_status(&error))?;
        let mut response = answer.response;
        if let Some(extra) = &response.extra {
            telemetry::record_logid(&extra.logid);
        }
        if request.include_raw_json {
            response.raw_json = answer.raw_body;
        }
        Ok(Response::new(response))
    }
}

/// Douyin's logid of a failed upstream answer, or "" when there was none.
fn logid_of(error: &LookupError) -> &str {
    match error {
        LookupError::Upstream(LookupFailure::Douyin(error)) => &error.logid,
        LookupError::Upstream(LookupFailure::Transport(
            TransportError::HttpStatus { logid, .. } | TransportError::MalformedBody { logid, .. },
        )) => logid,
        _ => "",
    }
}
