//! The audit trail: every token fetch, forced refresh, hand-out, invalid
//! report, refund decision, admin change (apps, merchants, clients) and
//! configuration reload, with the client that asked, written to SQLite by one background writer in batches (identical
//! hand-outs close together become one line with a count), listable, and
//! pruned after the retention period. Apps and tokens appear only as fingerprints.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::clock::SharedClock;
use crate::domain::{AccessToken, ClientKey};
use crate::store::{AuditRecord, Store, StoreError};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditAction {
    TokenFetch,
    ForcedRefresh,
    TokenHandout,
    InvalidReport,
    /// A refund decision (抖音码核销后退款审批): sent, replayed or refused.
    RefundDecision,
    AppAdded,
    AppSecretReplaced,
    AppRemoved,
    MerchantAdded,
    MerchantMoved,
    MerchantRemoved,
    ClientCreated,
    ClientRemoved,
    /// A configuration reload, applied or refused.
    ConfigReload,
}

impl AuditAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::TokenFetch => "token_fetch",
            Self::ForcedRefresh => "forced_refresh",
            Self::TokenHandout => "token_handout",
            Self::InvalidReport => "invalid_report",
            Self::RefundDecision => "refund_decision",
            Self::AppAdded => "app_added",
            Self::AppSecretReplaced => "app_secret_replaced",
            Self::AppRemoved => "app_removed",
            Self::MerchantAdded => "merchant_added",
            Self::MerchantMoved => "merchant_moved",
            Self::MerchantRemoved => "merchant_removed",
            Self::ClientCreated => "client_created",
            Self::ClientRemoved => "client_removed",
            Self::ConfigReload => "config_reload",
        }
    }
}

/// The client name used for the daemon's own actions.
pub(crate) const DAEMON: &str = "daemon";

/// How long the writer gathers lines before writing them.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Lines kept while the database cannot be written (a PostgreSQL outage):
/// past this, the oldest are dropped, with an error saying how many.
const MAX_BUFFERED: usize = 100_000;
const MAX_BATCH: usize = 1000;

enum Command {
    Record(AuditRecord),
    Flush(oneshot::Sender<()>),
    /// Write what is held, answer, and end: shutdown, before the pool closes.
    Stop(oneshot::Sender<()>),
}

/// Where audit lines go. Cheap to clone; recording never waits for the disk.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::UnboundedSender<Command>,
    clock: SharedClock,
    store: Store,
}

impl AuditLog {
    /// Starts the writer; it ends at [`AuditLog::stop`], or once every
    /// `AuditLog` is dropped, after writing what it holds.
    pub fn start(store: Store, clock: SharedClock) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(store.clone(), receiver));
        Self {
            sender,
            clock,
            store,
        }
    }

    /// Writes what the writer holds and ends it; lines recorded later are
    /// dropped. Returns once the writer is done with the database.
    pub(crate) async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.sender.send(Command::Stop(done)).is_ok() {
            let _ = stopped.await;
        }
    }

    pub(crate) fn record(
        &self,
        client: &str,
        action: AuditAction,
        app: &ClientKey,
        reason: &str,
        token: Option<&AccessToken>,
    ) {
        self.append(client, action, Some(app), reason, token);
    }

    /// An admin change or a reload: who asked, what, and the app when one is
    /// concerned (a client or a reload concerns none).
    pub(crate) fn record_change(
        &self,
        client: &str,
        action: AuditAction,
        app: Option<&ClientKey>,
        reason: &str,
    ) {
        self.append(client, action, app, reason, None);
    }

    fn append(
        &self,
        client: &str,
        action: AuditAction,
        app: Option<&ClientKey>,
        reason: &str,
        token: Option<&AccessToken>,
    ) {
        let record = AuditRecord {
            at_ms: self.clock.now_unix_ms(),
            client: client.to_owned(),
            action: action.as_str().to_owned(),
            app: app.map(ToString::to_string).unwrap_or_default(),
            reason: reason.to_owned(),
            token_fingerprint: token.map(AccessToken::fingerprint).unwrap_or_default(),
            count: 1,
        };
        // The writer outlives every sender; a send can fail only during shutdown.
        let _ = self.sender.send(Command::Record(record));
    }

    /// Waits until everything recorded so far is on disk.
    pub(crate) async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.sender.send(Command::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }

    pub(crate) async fn list(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.flush().await;
        self.store.audit().list(since_ms, limit).await
    }

    /// Deletes lines older than `retention`. The scheduler triggers this; tests call it.
    pub async fn prune(&self, retention: Duration) -> Result<u64, StoreError> {
        self.flush().await;
        let cutoff = self.clock.now_unix_ms() - crate::clock::duration_ms(retention);
        let pruned = self.store.audit().prune(cutoff).await?;
        if pruned > 0 {
            tracing::info!(pruned, "audit lines past retention removed");
        }
        Ok(pruned)
    }
}

enum WriterEvent {
    Command(Command),
    TimeToWrite,
    Closed,
}

async fn write_batches(store: Store, mut receiver: mpsc::UnboundedReceiver<Command>) {
    let mut pending: Vec<AuditRecord> = Vec::new();
    // Index of the pending hand-out line each identical hand-out adds to.
    let mut handouts: HashMap<(String, String, String), usize> = HashMap::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    // While writes fail, only the flush interval retries (not every line).
    let mut writes_failing = false;
    loop {
        let event = if pending.is_empty() {
            receiver
                .recv()
                .await
                .map_or(WriterEvent::Closed, WriterEvent::Command)
        } else {
            match tokio::time::timeout(FLUSH_INTERVAL, receiver.recv()).await {
                Ok(command) => command.map_or(WriterEvent::Closed, WriterEvent::Command),
                Err(_elapsed) => WriterEvent::TimeToWrite,
            }
        };
        let (closed, time_to_write) = match event {
            WriterEvent::Command(Command::Record(record))
                if record.action == AuditAction::TokenHandout.as_str() =>
            {
                let key = (
                    record.client.clone(),
                    record.app.clone(),
                    record.token_fingerprint.clone(),
                );
                match handouts.get(&key) {
                    Some(index) => pending[*index].count += 1,
                    None => {
                        handouts.insert(key, pending.len());
                        pending.push(record);
                    }
                }
                (false, false)
            }
            WriterEvent::Command(Command::Record(record)) => {
                pending.push(record);
                (false, false)
            }
            WriterEvent::Command(Command::Flush(done)) => {
                waiting.push(done);
                (false, true)
            }
            WriterEvent::Command(Command::Stop(done)) => {
                waiting.push(done);
                (true, true)
            }
            WriterEvent::TimeToWrite => (false, true),
            WriterEvent::Closed => (true, true),
        };
        if time_to_write || (pending.len() >= MAX_BATCH && !writes_failing) {
            if !pending.is_empty() {
                match store.audit().append(&pending).await {
                    Ok(()) => {
                        pending.clear();
                        handouts.clear();
                        writes_failing = false;
                    }
                    Err(error) if closed => {
                        tracing::error!(%error, lines = pending.len(), "cannot write the audit trail at shutdown; these lines are lost");
                    }
                    Err(error) => {
                        // Kept and written at the next flush: a database
                        // that is away for a while loses no line.
                        tracing::warn!(%error, lines = pending.len(), "cannot write the audit trail now; keeping the lines and trying again");
                        writes_failing = true;
                        if pending.len() > MAX_BUFFERED {
                            let dropped = pending.len() - MAX_BUFFERED;
                            pending.drain(..dropped);
                            handouts.clear();
                            tracing::error!(
                                dropped,
                                kept = MAX_BUFFERED,
                                "the audit buffer is full while the database is away; the oldest lines are lost"
                            );
                        }
                    }
                }
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
        if closed {
            return;
        }
    }
}
