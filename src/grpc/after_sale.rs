//! `douyin.goodlife.v1.AfterSaleService`: validates the request at the edge,
//! hands it to the lookup use case, and records its latency and Douyin's logid.

use tonic::{Request, Response, Status};

use tokio::time::Instant;

use super::{code_label, deadline_of, status};
use crate::domain::AfterSaleQuery;
use crate::douyin::TransportError;
use crate::douyin::after_sale::LookupFailure;
use crate::lookup::{LookupError, LookupService};
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleService;
use crate::proto::douyin::goodlife::v1::{
    GetAfterSaleOrderDetailRequest, GetAfterSaleOrderDetailResponse,
};
use crate::{metrics, telemetry};

pub struct AfterSaleGrpc {
    pub lookup: LookupService,
}

#[tonic::async_trait]
impl AfterSaleService for AfterSaleGrpc {
    async fn get_after_sale_order_detail(
        &self,
        request: Request<GetAfterSaleOrderDetailRequest>,
    ) -> Result<Response<GetAfterSaleOrderDetailResponse>, Status> {
        let _queued = metrics::LookupInFlight::enter();
        let started = Instant::now();
        let answer = self.answer(request).await;
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        let elapsed = started.elapsed();
        metrics::record_lookup(code_label(code), elapsed);
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
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let query = AfterSaleQuery::parse(
            &request.account_id,
            &request.order_id,
            request.certificate_id.as_deref(),
        )
        .map_err(|error| status::invalid_argument(&error))?;
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
