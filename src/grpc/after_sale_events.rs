//! `AfterSaleService.WatchAfterSaleEvents`: checks the `aftersale.events`
//! scope and the merchants asked for against the caller's bounds, then hands
//! the caller a stream of the event log filtered to what it may see.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{caller, status};
use crate::access::{ApiClient, Scope};
use crate::after_sale_events::AfterSaleEvents;
use crate::domain::{AccountId, ClientKey};
use crate::proto::douyin::goodlife::v1::{AfterSaleEvent, WatchAfterSaleEventsRequest};

pub(crate) type AfterSaleEventStream = BoxStream<'static, Result<AfterSaleEvent, Status>>;

pub(crate) async fn watch(
    events: &AfterSaleEvents,
    stopping: &CancellationToken,
    request: Request<WatchAfterSaleEventsRequest>,
) -> Result<Response<AfterSaleEventStream>, Status> {
    let client = caller(&request)?;
    client
        .require(Scope::AfterSaleEvents)
        .map_err(|error| status::access_status(&error))?;
    let request = request.into_inner();
    if request.after_sequence < 0 {
        return Err(Status::invalid_argument(
            "after_sequence must be 0 (from the oldest kept) or a sequence seen",
        ));
    }
    let mut account_ids = BTreeSet::new();
    for account_id in &request.account_ids {
        let account_id =
            AccountId::parse(account_id).map_err(|error| status::invalid_argument(&error))?;
        client
            .require_merchant_within_bounds(&account_id)
            .map_err(|error| status::access_status(&error))?;
        account_ids.insert(account_id);
    }
    let visible = move |event: &AfterSaleEvent| visible_to(&client, &account_ids, event);
    let stream = events
        .watch(request.after_sequence, visible, stopping.clone())
        .await
        .map_err(|ended| status::watch_status(&ended))?
        .map(|item| item.map_err(|ended| status::watch_status(&ended)));
    Ok(Response::new(stream.boxed()))
}

/// Whether the event is one the caller asked for (`account_ids`, empty = all)
/// and may see (its merchant and app bounds).
fn visible_to(
    client: &Arc<ApiClient>,
    account_ids: &BTreeSet<AccountId>,
    event: &AfterSaleEvent,
) -> bool {
    let (Ok(account_id), Ok(client_key)) = (
        AccountId::parse(&event.account_id),
        ClientKey::parse(&event.client_key),
    ) else {
        return false;
    };
    (account_ids.is_empty() || account_ids.contains(&account_id))
        && client.may_see(&account_id, &client_key)
}
