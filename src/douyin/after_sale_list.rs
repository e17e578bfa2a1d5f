//! `GET /goodlife/v1/akte/after_sale/order/query/` (退款单列表查询): one page of
//! a merchant's refunds, decoded straight into the mirrored proto messages.

use std::time::Duration;

use super::DouyinClient;
use super::envelope::{Decoded, LookupFailure};
use crate::domain::{AccessToken, RefundListQuery};
use crate::proto::douyin::goodlife::v1::ListAfterSaleOrdersResponse;

pub const PATH: &str = "/goodlife/v1/akte/after_sale/order/query/";

/// The `endpoint` label of refund list calls.
const ENDPOINT_LABEL: &str = "after_sale_list";

/// A successful page: the decoded response and the body it came from.
pub(crate) type RefundListAnswer = Decoded<ListAfterSaleOrdersResponse>;

super::envelope::goodlife_response!(ListAfterSaleOrdersResponse);

impl DouyinClient {
    /// One upstream call for one page; `deadline` (the caller's remaining
    /// time) bounds its timeout.
    pub(crate) async fn list_after_sale_orders(
        &self,
        access_token: &AccessToken,
        query: &RefundListQuery,
        deadline: Option<Duration>,
    ) -> Result<RefundListAnswer, LookupFailure> {
        let mut parameters = vec![
            ("account_id", query.account_id.as_str().to_owned()),
            ("page_size", query.page_size.to_string()),
            ("cursor", query.cursor.clone()),
        ];
        // Optional filters go out only when given: Douyin reads a zero as a
        // bound, not as "no filter".
        if let Some(range) = query.created {
            parameters.push(("create_order_start_time", range.start.to_string()));
            parameters.push(("create_order_end_time", range.end.to_string()));
        }
        if let Some(range) = query.refund_done {
            parameters.push(("refund_done_start_time", range.start.to_string()));
            parameters.push(("refund_done_end_time", range.end.to_string()));
        }
        if let Some(status) = query.refund_status {
            parameters.push(("refund_status", status.to_string()));
        }
        let request = self.goodlife_get(PATH, access_token, &parameters);
        self.call_goodlife(request, deadline, ENDPOINT_LABEL)
            .await
            .map_err(|failure| failure.failure)
    }
}
