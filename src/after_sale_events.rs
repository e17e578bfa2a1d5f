//! The durable log of refund-request notifications: one writer task commits
//! the webhook's inserts in groups (each caller answered only after the
//! commit that holds its event), publishes the latest committed sequence, and
//! serves watchers that replay from the store and then follow that sequence,
//! re-reading the store, so a slow watcher never misses or repeats an event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::domain::{AccountId, ClientKey};
use crate::proto::douyin::goodlife::v1::AfterSaleEvent;
use crate::store::{
    AfterSaleEventRecord, AfterSaleEventWriter, Store, StoreError, StoredAfterSaleEvent,
};
use crate::webhook::notification;

/// Most events committed in one transaction; more wait for the next one.
const MAX_GROUP: usize = 512;
/// Inserts waiting for the writer; the webhook's own concurrency bound keeps
/// it from filling, and a full queue makes senders wait, never fail.
const QUEUE_CAPACITY: usize = 4096;
/// Events a watcher reads from the store at a time.
const WATCH_PAGE: i64 = 256;

/// A verified notification to store.
#[derive(Debug, Clone)]
pub(crate) struct NewAfterSaleEvent {
    pub(crate) client_key: ClientKey,
    pub(crate) msg_id: String,
    pub(crate) event: String,
    pub(crate) account_id: AccountId,
    pub(crate) raw_json: String,
}

/// What storing a notification did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Committed under this sequence.
    Stored { sequence: i64 },
    /// Its app already has an event with this Msg-Id: nothing new stored.
    Duplicate,
}

/// The group holding the event could not be committed (logged by the writer).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the after-sale event could not be stored")]
pub(crate) struct AppendFailed;

/// Why a watch ended (or never began) while the caller was still listening.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchEnded {
    #[error("the daemon is shutting down; resume with after_sequence = {last_sequence}")]
    ShuttingDown { last_sequence: i64 },
    /// Events the watcher had not seen were removed by pruning (older than
    /// `webhook.retention`): it would miss them. Resuming after
    /// `pruned_through` accepts the gap.
    #[error(
        "the events after sequence {after_sequence} up to {pruned_through} were pruned (older than webhook.retention) and cannot be sent; to go on without them, resume with after_sequence = {pruned_through}"
    )]
    Pruned {
        after_sequence: i64,
        pruned_through: i64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum WriterCommand {
    Append(
        AfterSaleEventRecord,
        oneshot::Sender<Result<Appended, AppendFailed>>,
    ),
    /// Finish the group in hand, close the connection, answer, end.
    Stop(oneshot::Sender<()>),
}

/// The event log. Cheap to clone; clones share the writer.
#[derive(Clone)]
pub struct AfterSaleEvents {
    sender: mpsc::Sender<WriterCommand>,
    committed: watch::Receiver<i64>,
    /// The latest committed sequence, advanced by this daemon's writer and,
    /// on a shared database, by other daemons' commits.
    committed_sender: Arc<watch::Sender<i64>>,
    store: Store,
    clock: SharedClock,
}

impl AfterSaleEvents {
    /// Opens the writer's connection and starts the writer task.
    pub(crate) async fn start(store: Store, clock: SharedClock) -> Result<Self, StoreError> {
        let latest = store.after_sale_events().latest_sequence().await?;
        let writer = store.after_sale_events().open_writer().await?;
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let (committed_sender, committed) = watch::channel(latest);
        let committed_sender = Arc::new(committed_sender);
        tokio::spawn(write_in_groups(
            writer,
            receiver,
            Arc::clone(&committed_sender),
        ));
        Ok(Self {
            sender,
            committed,
            committed_sender,
            store,
            clock,
        })
    }

    /// Stores a verified notification; returns once it is committed (or known
    /// to be a repeat). Dropping the future does not cancel the insert.
    pub(crate) async fn append(&self, event: NewAfterSaleEvent) -> Result<Appended, AppendFailed> {
        let record = AfterSaleEventRecord {
            client_key: event.client_key.expose().to_owned(),
            msg_id: event.msg_id,
            event: event.event,
            account_id: event.account_id.as_str().to_owned(),
            received_at_ms: self.clock.now_unix_ms(),
            raw_json: event.raw_json,
        };
        let (answer, answered) = oneshot::channel();
        self.sender
            .send(WriterCommand::Append(record, answer))
            .await
            .map_err(|_| AppendFailed)?;
        answered.await.map_err(|_| AppendFailed)?
    }

    /// Another daemon committed events up to `sequence`: watchers here read them.
    pub(crate) fn observe_committed(&self, sequence: i64) {
        advance_committed(&self.committed_sender, sequence);
    }

    /// Writes the group in hand and ends the writer; watchers see the end.
    /// Call before the store closes.
    pub(crate) async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.sender.send(WriterCommand::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }

    /// Deletes events older than `retention`. The scheduler triggers this; tests call it.
    pub async fn prune(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_unix_ms() - crate::clock::duration_ms(retention);
        let pruned = self.store.after_sale_events().prune(cutoff).await?;
        if pruned > 0 {
            tracing::info!(pruned, "after-sale events past retention removed");
        }
        Ok(pruned)
    }

    /// The events after `after_sequence` that `visible` lets through, stored
    /// ones first and then new ones as they are committed, in sequence order,
    /// until the caller drops the stream, `stopping` is cancelled or the
    /// writer ends. The stream reads the store a page at a time, as fast as
    /// its consumer takes events: nothing queues up for a slow watcher, and
    /// it cannot lag behind a channel and lose events.
    ///
    /// Never silently past a gap: when events after `after_sequence` were
    /// already pruned this refuses with `WatchEnded::Pruned`, and a stream
    /// whose next events are pruned before it reads them ends with it.
    /// `after_sequence` 0 asks for the oldest kept, so pruning before its
    /// first event is no gap.
    pub(crate) async fn watch(
        &self,
        after_sequence: i64,
        visible: impl Fn(&AfterSaleEvent) -> bool + Send + Sync + 'static,
        stopping: CancellationToken,
    ) -> Result<BoxStream<'static, Result<AfterSaleEvent, WatchEnded>>, WatchEnded> {
        let from_oldest_kept = after_sequence == 0;
        let pruned_through = self.store.after_sale_events().pruned_through().await?;
        if !from_oldest_kept && pruned_through > after_sequence {
            return Err(WatchEnded::Pruned {
                after_sequence,
                pruned_through,
            });
        }
        let watcher = Watcher {
            store: self.store.clone(),
            committed: self.committed.clone(),
            cursor: after_sequence,
            from_oldest_kept,
            ready: VecDeque::new(),
            visible: Box::new(visible),
            stopping,
            ended: false,
        };
        Ok(stream::unfold(watcher, |mut watcher| async move {
            let next = watcher.next().await?;
            Some((next, watcher))
        })
        .boxed())
    }
}

struct Watcher {
    store: Store,
    committed: watch::Receiver<i64>,
    /// Every event up to here was delivered or filtered out.
    cursor: i64,
    /// Asked for the oldest kept and has read no event yet: pruning moves
    /// its start instead of making a gap.
    from_oldest_kept: bool,
    ready: VecDeque<AfterSaleEvent>,
    visible: Box<dyn Fn(&AfterSaleEvent) -> bool + Send + Sync>,
    stopping: CancellationToken,
    ended: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<AfterSaleEvent, WatchEnded>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.stopping.is_cancelled() {
                return Some(Err(self.end_for_shutdown()));
            }
            // Marked seen before reading, so a commit after this read wakes
            // `changed` below: no commit falls between reading and waiting.
            let latest = *self.committed.borrow_and_update();
            if latest > self.cursor {
                if let Err(ended) = self.read_page(latest).await {
                    self.ended = true;
                    return Some(Err(ended));
                }
                continue;
            }
            tokio::select! {
                changed = self.committed.changed() => {
                    if changed.is_err() {
                        return Some(Err(self.end_for_shutdown()));
                    }
                }
                () = self.stopping.cancelled() => {}
            }
        }
    }

    /// Reads the next page after the cursor, with how far events were pruned
    /// in the same snapshot: pruned events it had not read end the watch
    /// (`Pruned`) unless it is still looking for the oldest kept. An empty
    /// page moves the cursor to `latest` so the loop cannot spin.
    async fn read_page(&mut self, latest: i64) -> Result<(), WatchEnded> {
        let (page, pruned_through) = self
            .store
            .after_sale_events()
            .list_after_with_pruned_through(self.cursor, WATCH_PAGE)
            .await?;
        if pruned_through > self.cursor {
            if !self.from_oldest_kept {
                return Err(WatchEnded::Pruned {
                    after_sequence: self.cursor,
                    pruned_through,
                });
            }
            self.cursor = pruned_through;
        }
        if page.is_empty() {
            self.cursor = self.cursor.max(latest);
        } else {
            self.from_oldest_kept = false;
        }
        for stored in page {
            self.cursor = stored.sequence;
            let event = event_from_stored(stored)?;
            if (self.visible)(&event) {
                self.ready.push_back(event);
            }
        }
        Ok(())
    }

    fn end_for_shutdown(&mut self) -> WatchEnded {
        self.ended = true;
        WatchEnded::ShuttingDown {
            last_sequence: self.cursor,
        }
    }
}

/// A stored notification as the stream carries it: the envelope's fields, the
/// content decoded again from the body (the one copy kept), the raw body.
fn event_from_stored(stored: StoredAfterSaleEvent) -> Result<AfterSaleEvent, StoreError> {
    let corrupt = |error: notification::Malformed| {
        StoreError::Corrupt(format!(
            "after-sale event {} does not decode: {error}",
            stored.sequence
        ))
    };
    let envelope =
        notification::read_envelope(stored.record.raw_json.as_bytes()).map_err(corrupt)?;
    let content = notification::decode_refund_request(&envelope.content).map_err(corrupt)?;
    let record = stored.record;
    Ok(AfterSaleEvent {
        sequence: stored.sequence,
        msg_id: record.msg_id,
        event: record.event,
        client_key: record.client_key,
        received_at_unix_ms: record.received_at_ms,
        raw_json: record.raw_json,
        ..content
    })
}

/// Moves the latest committed sequence forward, never back: commits of
/// several daemons are heard in any order.
fn advance_committed(committed: &watch::Sender<i64>, sequence: i64) {
    committed.send_if_modified(|latest| {
        let newer = sequence > *latest;
        if newer {
            *latest = sequence;
        }
        newer
    });
}

/// The writer: takes every insert waiting (up to `MAX_GROUP`), commits them in
/// one transaction, answers each, publishes the new latest sequence. Inserts
/// arriving during a commit form the next group, so a burst costs one fsync
/// per group, not one per notification, with no added wait when it is quiet.
async fn write_in_groups(
    mut writer: AfterSaleEventWriter,
    mut receiver: mpsc::Receiver<WriterCommand>,
    committed: Arc<watch::Sender<i64>>,
) {
    let mut group: Vec<(
        AfterSaleEventRecord,
        oneshot::Sender<Result<Appended, AppendFailed>>,
    )> = Vec::with_capacity(MAX_GROUP);
    loop {
        let mut stop = None;
        match receiver.recv().await {
            Some(WriterCommand::Append(record, answer)) => group.push((record, answer)),
            Some(WriterCommand::Stop(done)) => stop = Some(done),
            None => break,
        }
        while stop.is_none() && group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(WriterCommand::Append(record, answer)) => group.push((record, answer)),
                Ok(WriterCommand::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            let records: Vec<&AfterSaleEventRecord> =
                group.iter().map(|(record, _)| record).collect();
            match writer.insert_group(&records).await {
                Ok(sequences) => {
                    if let Some(latest) = sequences.iter().flatten().max() {
                        advance_committed(&committed, *latest);
                    }
                    for ((_, answer), sequence) in group.drain(..).zip(sequences) {
                        let appended = match sequence {
                            Some(sequence) => Appended::Stored { sequence },
                            None => Appended::Duplicate,
                        };
                        let _ = answer.send(Ok(appended));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, events = group.len(), "cannot store after-sale events; the webhook answers 500 and Douyin pushes them again");
                    for (_, answer) in group.drain(..) {
                        let _ = answer.send(Err(AppendFailed));
                    }
                }
            }
        }
        if let Some(done) = stop {
            writer.close().await;
            let _ = done.send(());
            return;
        }
    }
    writer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::sandbox::notifications::{RefundRequestContent, refund_request_body};

    const CLIENT_KEY: &str = "awtestkey00000001";
    const ACCOUNT_ID: &str = "7100000000000000001";
    const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
    const START_MS: i64 = 1_767_225_600_000;

    fn refund_request(msg_id: &str) -> NewAfterSaleEvent {
        NewAfterSaleEvent {
            client_key: ClientKey::parse(CLIENT_KEY).unwrap(),
            msg_id: msg_id.to_owned(),
            event: notification::REFUND_REQUEST_EVENT.to_owned(),
            account_id: AccountId::parse(ACCOUNT_ID).unwrap(),
            raw_json: refund_request_body(
                CLIENT_KEY,
                &RefundRequestContent::example(ACCOUNT_ID, &format!("order-{msg_id}")),
            ),
        }
    }

    async fn append(events: &AfterSaleEvents, msg_id: &str) -> i64 {
        match events.append(refund_request(msg_id)).await.unwrap() {
            Appended::Stored { sequence } => sequence,
            Appended::Duplicate => panic!("{msg_id} is new"),
        }
    }

    /// The stream is polled only here, so it reads the store exactly when
    /// the test asks for the next event: pruning can be put between reads.
    #[tokio::test]
    async fn a_stream_whose_unread_events_are_pruned_ends_saying_so_instead_of_skipping_them() {
        let (_directory, store) = crate::store::temporary_store().await;
        let clock = ManualClock::starting_at(START_MS);
        let events = AfterSaleEvents::start(store, clock.clone()).await.unwrap();
        append(&events, "seen").await;
        let mut stream = events
            .watch(0, |_| true, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().msg_id, "seen");
        let unread = append(&events, "unread").await;
        clock.advance(RETENTION + Duration::from_secs(1));
        append(&events, "kept").await;
        assert_eq!(events.prune(RETENTION).await.unwrap(), 2);

        let ended = stream.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                ended,
                WatchEnded::Pruned { after_sequence: 1, pruned_through } if pruned_through == unread
            ),
            "{ended:?}"
        );
        assert!(stream.next().await.is_none(), "the stream ends there");

        // From the oldest kept, pruning is no gap: it starts at "kept".
        let mut from_oldest = events
            .watch(0, |_| true, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(from_oldest.next().await.unwrap().unwrap().msg_id, "kept");
        events.stop().await;
    }

    #[tokio::test]
    async fn pruning_removes_a_prefix_of_the_sequence_even_when_times_are_out_of_order() {
        let (_directory, store) = crate::store::temporary_store().await;
        let mut writer = store.after_sale_events().open_writer().await.unwrap();
        // Committed in this order, but the first one's clock reading is the
        // later one (two webhook requests racing to the writer).
        for (msg_id, received_at_ms) in [("read-later", START_MS + 5), ("read-earlier", START_MS)] {
            let event = refund_request(msg_id);
            let record = AfterSaleEventRecord {
                client_key: CLIENT_KEY.to_owned(),
                msg_id: event.msg_id,
                event: event.event,
                account_id: ACCOUNT_ID.to_owned(),
                received_at_ms,
                raw_json: event.raw_json,
            };
            writer.insert_group(&[&record]).await.unwrap();
        }
        writer.close().await;
        // Only "read-earlier" (sequence 2) is before the cutoff; "read-later"
        // (sequence 1) goes with it, so what is gone is everything up to 2.
        let table = store.after_sale_events();
        assert_eq!(table.prune(START_MS + 1).await.unwrap(), 2);
        assert_eq!(table.pruned_through().await.unwrap(), 2);
        let (kept, pruned_through) = table.list_after_with_pruned_through(0, 10).await.unwrap();
        assert_eq!((kept.len(), pruned_through), (0, 2));
        // Nothing more to prune: the mark stays.
        assert_eq!(table.prune(START_MS + 1).await.unwrap(), 0);
        assert_eq!(table.pruned_through().await.unwrap(), 2);
    }
}
