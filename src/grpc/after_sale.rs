//! `douyin.goodlife.v1.AfterSaleService`: checks the caller's scope and bounds,
//! validates the request at the edge (nothing invalid reaches Douyin), hands
//! it to the lookup use cases, and records its latency and Douyin's logid.

use std::future::Future;

use tonic::{Request, Response, Status};

use tokio::time::Instant;

use super::{caller, code_label, deadline_of, status};
use crate::access::{ApiClient, Scope};
use crate::domain::{AccountId, AfterSaleQuery, RefundAudit, RefundListQuery, RefundListTimes};
use crate::lookup::refund_audit::AuditError;
use crate::lookup::{LookupError, LookupService};
use crate::metrics::Metrics;
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleService;
use crate::proto::douyin::goodlife::v1::{
    AuditAfterSaleOrderRequest, AuditAfterSaleOrderResponse, Extra, GetAfterSaleOrderDetailRequest,
    GetAfterSaleOrderDetailResponse, ListAfterSaleOrdersRequest, ListAfterSaleOrdersResponse,
    WatchAfterSaleEventsRequest,
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
        super::after_sale_events::watch(&self.events, &self.stopping, request).await
    }

    async fn get_after_sale_order_detail(
        &self,
        request: Request<GetAfterSaleOrderDetailRequest>,
    ) -> Result<Response<GetAfterSaleOrderDetailResponse>, Status> {
        let _queued = self.metrics.lookup_queued();
        let started = Instant::now();
        let answer = self.detail_answer(request).await;
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics
            .record_lookup(code_label(code), started.elapsed());
        log_outcome("after-sale lookup", started, &answer);
        answer
    }

    async fn list_after_sale_orders(
        &self,
        request: Request<ListAfterSaleOrdersRequest>,
    ) -> Result<Response<ListAfterSaleOrdersResponse>, Status> {
        let started = Instant::now();
        let answer = self.list_answer(request).await;
        log_outcome("refund list page", started, &answer);
        answer
    }

    async fn audit_after_sale_order(
        &self,
        request: Request<AuditAfterSaleOrderRequest>,
    ) -> Result<Response<AuditAfterSaleOrderResponse>, Status> {
        let started = Instant::now();
        let answer = self.audit_answer(request).await;
        log_outcome("refund decision", started, &answer);
        answer
    }
}

/// Logs how a call ended: failures at info (the message says why), successes at debug.
fn log_outcome<T>(what: &'static str, started: Instant, answer: &Result<T, Status>) {
    // u64, not the u128 of as_millis(): JSON logs write a u128 as a string.
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match answer {
        Ok(_) => tracing::debug!(elapsed_ms, "{what} answered"),
        Err(status) => tracing::info!(
            code = code_label(status.code()),
            elapsed_ms,
            reason = status.message(),
            "{what} failed"
        ),
    }
}

impl AfterSaleGrpc {
    /// The merchant must be registered (NOT_FOUND otherwise) and within the
    /// client's bounds (PERMISSION_DENIED).
    fn require_merchant(&self, client: &ApiClient, account_id: &AccountId) -> Result<(), Status> {
        let app = self
            .registry
            .app_for_merchant(account_id)
            .map_err(|error| status::registry_status(&error))?;
        client
            .require_merchant(account_id, &app)
            .map_err(|error| status::access_status(&error))?;
        telemetry::record_merchant(account_id);
        Ok(())
    }

    async fn detail_answer(
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
        self.require_merchant(&client, &query.account_id)?;
        let answer = read_outcome(self.lookup.after_sale_order_detail(&query, deadline)).await?;
        let raw_json = request.include_raw_json.then(|| answer.raw_json());
        let mut response = answer.response;
        record_extra_logid(response.extra.as_ref());
        if let Some(raw_json) = raw_json {
            response.raw_json = raw_json;
        }
        Ok(Response::new(response))
    }

    async fn list_answer(
        &self,
        request: Request<ListAfterSaleOrdersRequest>,
    ) -> Result<Response<ListAfterSaleOrdersResponse>, Status> {
        let client = caller(&request)?;
        client
            .require(Scope::AfterSaleRead)
            .map_err(|error| status::access_status(&error))?;
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let times = RefundListTimes {
            create_order_start_time: request.create_order_start_time,
            create_order_end_time: request.create_order_end_time,
            refund_done_start_time: request.refund_done_start_time,
            refund_done_end_time: request.refund_done_end_time,
        };
        let query = RefundListQuery::parse(
            &request.account_id,
            request.page_size,
            &request.cursor,
            &times,
            request.refund_status,
        )
        .map_err(|error| status::invalid_argument(&error))?;
        self.require_merchant(&client, &query.account_id)?;
        let answer = read_outcome(self.lookup.list_after_sale_orders(&query, deadline)).await?;
        let raw_json = request.include_raw_json.then(|| answer.raw_json());
        let mut response = answer.response;
        record_extra_logid(response.extra.as_ref());
        if let Some(raw_json) = raw_json {
            response.raw_json = raw_json;
        }
        Ok(Response::new(response))
    }

    async fn audit_answer(
        &self,
        request: Request<AuditAfterSaleOrderRequest>,
    ) -> Result<Response<AuditAfterSaleOrderResponse>, Status> {
        let client = caller(&request)?;
        client
            .require(Scope::AfterSaleAudit)
            .map_err(|error| status::access_status(&error))?;
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let audit = RefundAudit::parse(
            &request.account_id,
            &request.order_id,
            &request.certificate_id,
            request.audit_status,
            &request.reject_reason,
        )
        .map_err(|error| status::invalid_argument(&error))?;
        self.require_merchant(&client, &audit.key.account_id)?;
        let outcome = self
            .lookup
            .audit_after_sale_order(
                audit,
                client.name.clone(),
                request.resend_after_unknown_outcome,
                deadline,
            )
            .await
            .inspect_err(|error| telemetry::record_logid(audit_logid(error)))
            .map_err(|error| status::audit_status(&error))?;
        let mut response = outcome.answer.response;
        record_extra_logid(response.extra.as_ref());
        response.replayed = outcome.replayed;
        Ok(Response::new(response))
    }
}

/// Awaits a read, recording Douyin's logid of a failure and mapping it to a status.
async fn read_outcome<T>(
    read: impl Future<Output = Result<T, std::sync::Arc<LookupError>>>,
) -> Result<T, Status> {
    read.await
        .inspect_err(|error| telemetry::record_logid(lookup_logid(error)))
        .map_err(|error| status::lookup_status(&error))
}

fn record_extra_logid(extra: Option<&Extra>) {
    if let Some(extra) = extra {
        telemetry::record_logid(&extra.logid);
    }
}

/// Douyin's logid of a failed upstream answer, or "" when there was none.
fn lookup_logid(error: &LookupError) -> &str {
    match error {
        LookupError::Upstream(failure) => failure.logid(),
        _ => "",
    }
}

fn audit_logid(error: &AuditError) -> &str {
    match error {
        AuditError::Lookup(error) => lookup_logid(error),
        AuditError::OutcomeUnknown { logid, .. } => logid,
        _ => "",
    }
}
