//! `GET /goodlife/v1/akte/after_sale/order_detail/get/`: asks for an after-sale
//! order's details and decodes Douyin's JSON straight into the mirrored proto
//! messages, keeping the raw body for callers who want unknown fields too.

use std::time::Duration;

use super::DouyinClient;
use super::envelope::{Decoded, decode_goodlife_answer};
use crate::domain::{AccessToken, AfterSaleQuery};
use crate::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailResponse;

pub(crate) use super::envelope::LookupFailure;

pub const PATH: &str = "/goodlife/v1/akte/after_sale/order_detail/get/";

/// The `endpoint` label of after-sale calls.
const ENDPOINT_LABEL: &str = "after_sale";

/// A successful answer: the decoded response and the body it came from.
pub(crate) type AfterSaleAnswer = Decoded<GetAfterSaleOrderDetailResponse>;

crate::douyin::envelope::goodlife_response!(GetAfterSaleOrderDetailResponse);

impl DouyinClient {
    /// One upstream call; `deadline` (the caller's remaining time) bounds its timeout.
    pub(crate) async fn get_after_sale_order_detail(
        &self,
        access_token: &AccessToken,
        query: &AfterSaleQuery,
        deadline: Option<Duration>,
    ) -> Result<AfterSaleAnswer, LookupFailure> {
        let mut parameters = vec![
            ("account_id", query.account_id.as_str()),
            ("order_id", query.order_id.as_str()),
        ];
        if let Some(certificate_id) = &query.certificate_id {
            parameters.push(("certificate_id", certificate_id.as_str()));
        }
        let request = self.goodlife_get(PATH, access_token, &parameters);
        self.call_goodlife(request, deadline, ENDPOINT_LABEL)
            .await
            .map_err(|failure| failure.failure)
    }
}

/// Decodes one answer of the after-sale detail API (see `envelope`).
pub fn decode_after_sale_answer(
    status: u16,
    body: &[u8],
    content_type: &str,
    header_logid: String,
) -> Result<AfterSaleAnswer, LookupFailure> {
    decode_goodlife_answer(
        status,
        &bytes::Bytes::copy_from_slice(body),
        content_type,
        header_logid,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::douyin::{DouyinError, TransportError};

    fn decode(status: u16, body: &str) -> Result<AfterSaleAnswer, LookupFailure> {
        decode_after_sale_answer(
            status,
            body.as_bytes(),
            "application/json",
            "HDR".to_owned(),
        )
    }

    #[test]
    fn error_codes_are_read_from_data_then_extra() {
        let from_data = decode(
            200,
            r#"{"extra":{"logid":"L1","error_code":2119002,"sub_error_code":7},"data":{"error_code":2190008,"description":"expired"}}"#,
        )
        .unwrap_err();
        let LookupFailure::Douyin(error) = from_data else {
            panic!("{from_data:?}")
        };
        assert_eq!(
            (error.code, error.sub_code, error.logid.as_str()),
            (2190008, 7, "L1")
        );
        let from_extra = decode(
            200,
            r#"{"extra":{"error_code":2119003,"description":"slow"},"data":{}}"#,
        )
        .unwrap_err();
        let LookupFailure::Douyin(error) = from_extra else {
            panic!("{from_extra:?}")
        };
        assert_eq!(
            (error.code, error.description.as_str(), error.logid.as_str()),
            (2119003, "slow", "HDR")
        );
    }

    #[test]
    fn nulls_and_unknown_fields_are_tolerated() {
        let answer = decode(
            200,
            r#"{"extra":{"logid":null,"now":5},"data":{"error_code":0,"cursor":null,"brand_new_field":{"x":1},
               "after_sale_order_list":[{"order_id":"o1","merchant_account_id":9147462244456248000,"reason":null}]}}"#,
        )
        .unwrap();
        let data = answer.response.data.as_ref().unwrap();
        assert_eq!(
            data.after_sale_order_list[0].merchant_account_id,
            9147462244456248000
        );
        assert!(answer.raw_json().contains("brand_new_field"));
    }

    #[test]
    fn the_fast_path_answers_exactly_as_the_general_one() {
        let documented = crate::sandbox::DOCUMENTED_EXAMPLE;
        let fast = decode(200, documented).unwrap();
        let general = super::super::envelope::decode_in_general::<GetAfterSaleOrderDetailResponse>(
            200,
            &bytes::Bytes::from_static(documented.as_bytes()),
            "application/json",
            "HDR".to_owned(),
        )
        .unwrap();
        assert_eq!(fast.response, general.response);
        assert_eq!(fast.raw_json(), general.raw_json());
        // An empty array would fill a struct positionally; it is not an answer.
        assert!(decode(200, "[]").is_err());
        assert!(decode(200, "  []").is_err());
    }

    #[test]
    fn html_truncated_and_mistyped_bodies_are_malformed() {
        for (status, body) in [
            (200, "<!DOCTYPE html><html>gateway</html>"),
            (
                200,
                r#"{"extra":{"logid":"L"},"data":{"after_sale_order_list":[{"order_id":"#,
            ),
            (
                200,
                r#"{"data":{"after_sale_order_list":[{"status":"one"}]}}"#,
            ),
            (200, r#"[1,2,3]"#),
            (200, ""),
        ] {
            let error = decode(status, body).unwrap_err();
            assert!(
                matches!(
                    error,
                    LookupFailure::Transport(TransportError::MalformedBody { .. })
                ),
                "{body}: {error:?}"
            );
        }
        let error = decode(502, "<html>bad gateway</html>").unwrap_err();
        assert_eq!(
            error,
            LookupFailure::Transport(TransportError::HttpStatus {
                status: 502,
                logid: "HDR".to_owned()
            })
        );
    }

    #[test]
    fn only_the_documented_success_shape_is_an_answer() {
        for body in [
            "{}",
            r#"{"extra":{"logid":"L","error_code":0}}"#,
            r#"{"extra":{"logid":"L"},"data":null}"#,
            r#"{"data":[]}"#,
            r#"{"data":"ok"}"#,
            r#"{"err_no":0,"err_msg":"","log_id":"G"}"#,
            "[]",
            "1",
            r#""text""#,
            "null",
        ] {
            let error = decode(200, body).unwrap_err();
            assert!(
                matches!(
                    error,
                    LookupFailure::Transport(TransportError::MalformedBody { .. })
                ),
                "{body}: {error:?}"
            );
        }
    }

    #[test]
    fn the_newer_gateways_envelope_is_an_error_with_its_log_id() {
        let error = decode(
            200,
            r#"{"err_no":28001008,"err_msg":"access_token过期","log_id":"20261201GW"}"#,
        )
        .unwrap_err();
        assert_eq!(
            error,
            LookupFailure::Douyin(DouyinError {
                code: 28001008,
                description: "access_token过期".to_owned(),
                sub_code: 0,
                sub_description: String::new(),
                logid: "20261201GW".to_owned(),
            })
        );
        // Also when it comes with a data object, and with a non-200 status.
        let with_data =
            decode(200, r#"{"err_no":28003018,"err_msg":"slow","data":{}}"#).unwrap_err();
        assert!(matches!(
            with_data,
            LookupFailure::Douyin(DouyinError { code: 28003018, .. })
        ));
        let on_500 =
            decode(500, r#"{"err_no":28001005,"err_msg":"busy","log_id":"X"}"#).unwrap_err();
        assert!(matches!(
            on_500,
            LookupFailure::Douyin(DouyinError { code: 28001005, .. })
        ));
    }

    #[test]
    fn a_code_only_in_data_and_an_extra_without_a_code_are_read_right() {
        let only_in_data =
            decode(200, r#"{"data":{"error_code":2119005,"description":"no"}}"#).unwrap_err();
        assert!(matches!(
            only_in_data,
            LookupFailure::Douyin(DouyinError { code: 2119005, .. })
        ));
        let extra_without_code = decode(
            200,
            r#"{"extra":{"logid":"L","now":1},"data":{"after_sale_order_list":[{"order_id":"o"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            extra_without_code
                .response
                .data
                .unwrap()
                .after_sale_order_list[0]
                .order_id,
            "o"
        );
    }
}
