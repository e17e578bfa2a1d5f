//! `POST /goodlife/v1/akte/after_sale/order/audit/` (抖音码核销后退款审批): sends
//! one refund decision. A write: the caller learns not only whether it
//! failed but whether the request may have reached Douyin, so that nothing
//! that may have been applied is ever sent again.

use std::time::Duration;

use super::envelope::{Decoded, LookupFailure, decode_goodlife_answer};
use super::{CallFailure, DouyinClient, DouyinError};
use crate::domain::{AccessToken, RefundAudit};
use crate::proto::douyin::goodlife::v1::AuditAfterSaleOrderResponse;

pub const PATH: &str = "/goodlife/v1/akte/after_sale/order/audit/";

/// The `endpoint` label of audit calls.
const ENDPOINT_LABEL: &str = "after_sale_audit";

/// A successful answer: the decoded response and the body it came from.
pub(crate) type RefundAuditAnswer = Decoded<AuditAfterSaleOrderResponse>;

super::envelope::goodlife_response!(AuditAfterSaleOrderResponse);

impl DouyinClient {
    /// Sends the decision once; never retries. `deadline` (the caller's
    /// remaining time) bounds its timeout.
    pub(crate) async fn audit_after_sale_order(
        &self,
        access_token: &AccessToken,
        audit: &RefundAudit,
        deadline: Option<Duration>,
    ) -> Result<RefundAuditAnswer, CallFailure> {
        // Every field is sent, reject_reason empty when approving, as
        // Douyin's official SDK does.
        let body = serde_json::json!({
            "account_id": audit.key.account_id.as_str(),
            "order_id": audit.key.order_id,
            "certificate_id": audit.key.certificate_id,
            "audit_status": audit.decision.approves(),
            "reject_reason": audit.decision.reject_reason(),
        });
        let request = self
            .http
            .post(self.url(PATH))
            .header("access-token", access_token.expose())
            .json(&body);
        self.call_goodlife(request, deadline, ENDPOINT_LABEL).await
    }
}

/// Douyin's refusal as the body it came in (the goodlife error envelope), so
/// that it is recorded and read back like any answer.
pub(crate) fn refusal_body(error: &DouyinError) -> String {
    serde_json::json!({
        "extra": {
            "logid": error.logid,
            "error_code": error.code,
            "description": error.description,
            "sub_error_code": error.sub_code,
            "sub_description": error.sub_description,
        },
        "data": {"error_code": error.code, "description": error.description},
    })
    .to_string()
}

/// Reads a recorded audit answer (the body Douyin sent) again: the success
/// it was, or the refusal it was, exactly as when it arrived.
pub(crate) fn decode_recorded_audit_answer(body: &str) -> Result<RefundAuditAnswer, LookupFailure> {
    decode_goodlife_answer(
        200,
        &bytes::Bytes::copy_from_slice(body.as_bytes()),
        "application/json",
        String::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_answer_reads_back_as_it_arrived() {
        let applied = decode_recorded_audit_answer(
            r#"{"extra":{"logid":"L1","error_code":0},"data":{"error_code":0,"description":"","reentry":true}}"#,
        )
        .unwrap();
        assert!(applied.response.data.unwrap().reentry);
        let refused = decode_recorded_audit_answer(
            r#"{"extra":{"logid":"L2","error_code":2191005,"description":"逆向交易类错误","sub_error_code":20001},"data":{"error_code":2191005,"description":"逆向交易类错误"}}"#,
        )
        .unwrap_err();
        let LookupFailure::Douyin(error) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(
            (error.code, error.sub_code, error.logid.as_str()),
            (2191005, 20001, "L2")
        );
        assert_eq!(
            decode_recorded_audit_answer(&refusal_body(&error)).unwrap_err(),
            LookupFailure::Douyin(error),
            "a recorded refusal reads back as the refusal it was"
        );
        // A data array is not an answer here either.
        assert!(decode_recorded_audit_answer(r#"{"data":[]}"#).is_err());
    }
}
