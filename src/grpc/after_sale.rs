//! `douyin.goodlife.v1.AfterSaleService`: checks the caller's scope and bounds,
//! validates the request at the edge, and hands it to the lookup use case.

use tonic::{Request, Response, Status};

use super::{caller, deadline_of, status};
use crate::access::Scope;
use crate::domain::AfterSaleQuery;
use crate::lookup::LookupService;
use crate::proto::douyin::goodlife::v1::after_sale_service_server::AfterSaleService;
use crate::proto::douyin::goodlife::v1::{
    GetAfterSaleOrderDetailRequest, GetAfterSaleOrderDetailResponse,
};
use crate::registry::Registry;

pub struct AfterSaleGrpc {
    pub lookup: LookupService,
    pub registry: Registry,
}

#[tonic::async_trait]
impl AfterSaleService for AfterSaleGrpc {
    async fn get_after_sale_order_detail(
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
        let answer = self
            .lookup
            .after_sale_order_detail(&query, deadline)
            .await
            .map_err(|error| status::lookup_status(&error))?;
        let mut response = answer.response;
        if request.include_raw_json {
            response.raw_json = answer.raw_body;
        }
        Ok(Response::new(response))
    }
}
