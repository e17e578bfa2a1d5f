//! The refund list use case (退款单列表查询): one page per call, read by the
//! same rules as a detail lookup (token first, then the turn; retries by
//! class; compare-and-invalidate on a token rejection), paced in the list
//! API's own rate group, which Douyin counts per developer. Pages are neither
//! coalesced nor cached: a cursor walk asks for each page once, and a list is
//! for reconciling, where a stale page would mislead.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{LookupError, LookupService};
use crate::domain::{DouyinApi, RefundListQuery};
use crate::douyin::after_sale_list::RefundListAnswer;

impl LookupService {
    /// Asks Douyin for one page of the merchant's refunds before `deadline`
    /// (the caller's, or `default_deadline` from now).
    pub(crate) async fn list_after_sale_orders(
        &self,
        query: &RefundListQuery,
        deadline: Option<Instant>,
    ) -> Result<RefundListAnswer, Arc<LookupError>> {
        let (client_key, deadline) = self
            .app_and_deadline(&query.account_id, deadline)
            .map_err(Arc::new)?;
        let counters = &self.inner.counters;
        let douyin = &self.inner.douyin;
        counters.in_progress.fetch_add(1, Ordering::Relaxed);
        let page = self
            .read_with_retries(
                &client_key,
                DouyinApi::AfterSaleOrderList,
                deadline,
                |access_token, remaining| async move {
                    douyin
                        .list_after_sale_orders(&access_token, query, Some(remaining))
                        .await
                },
            )
            .await;
        counters.in_progress.fetch_sub(1, Ordering::Relaxed);
        page.map_err(Arc::new)
    }
}
