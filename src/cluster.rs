//! This daemon's link to the others sharing its PostgreSQL database: it
//! listens for their notifications (a new or invalidated token, a registry
//! change, committed after-sale events) and re-reads what changed; after any
//! reconnect it re-reads everything, since notifications sent while it was
//! away are lost. It also beats the heartbeat that tells each daemon how
//! many share an app's Douyin rate. Losing the database loses none of the
//! tokens held: the link reconnects with backoff while they keep serving.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::after_sale_events::AfterSaleEvents;
use crate::config::CLUSTER_RECONNECT_FIRST;
use crate::lookup::LookupService;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{CLUSTER_CHANNEL, ClusterMessage, Store};
use crate::token::TokenManager;

/// How often the heartbeat is written (and the living daemons counted).
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A daemon whose heartbeat is older than this no longer counts as alive.
const ALIVE_WITHIN: Duration = Duration::from_secs(3);

/// What the link keeps up to date.
#[derive(Clone)]
pub(crate) struct ClusterParts {
    pub(crate) store: Store,
    pub(crate) tokens: TokenManager,
    pub(crate) registry: Registry,
    pub(crate) events: AfterSaleEvents,
    pub(crate) lookup: LookupService,
    pub(crate) metrics: Metrics,
}

/// Runs the link until `stopping`; then leaves the living. Never fails: a
/// lost database is waited out, reconnect delays doubling from
/// [`CLUSTER_RECONNECT_FIRST`] up to `reconnect_backoff_max`
/// (`cluster.reconnect_backoff_max`).
pub(crate) async fn run(
    parts: ClusterParts,
    reconnect_backoff_max: Duration,
    stopping: CancellationToken,
) -> anyhow::Result<()> {
    let Some(instance) = parts.tokens.cluster_instance().map(str::to_owned) else {
        return Ok(());
    };
    let mut reconnect_delay = CLUSTER_RECONNECT_FIRST;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'connection: loop {
        let listener = tokio::select! {
            () = stopping.cancelled() => break 'connection,
            listener = listen(&parts.store) => listener,
        };
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = reconnect_delay.as_millis() as u64, "cannot listen to the database for other daemons' changes; serving the tokens held and trying again");
                tokio::select! {
                    () = stopping.cancelled() => break 'connection,
                    () = tokio::time::sleep(reconnect_delay) => {}
                }
                reconnect_delay = (reconnect_delay * 2).min(reconnect_backoff_max);
                continue 'connection;
            }
        };
        // Whatever changed while no one listened.
        if let Err(error) = reread_everything(&parts).await {
            tracing::warn!(%error, retry_in_ms = reconnect_delay.as_millis() as u64, "cannot re-read what changed while the link was down; trying again");
            tokio::select! {
                () = stopping.cancelled() => break 'connection,
                () = tokio::time::sleep(reconnect_delay) => {}
            }
            reconnect_delay = (reconnect_delay * 2).min(reconnect_backoff_max);
            continue 'connection;
        }
        reconnect_delay = CLUSTER_RECONNECT_FIRST;
        parts.metrics.record_cluster_link_up(true);
        loop {
            tokio::select! {
                () = stopping.cancelled() => break 'connection,
                _ = heartbeat.tick() => beat(&parts, &instance).await,
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => {
                        match ClusterMessage::parse(notification.payload()) {
                            Some(message) => apply(&parts, message).await,
                            None => tracing::warn!("ignored a notification this daemon does not understand"),
                        }
                    }
                    Ok(None) | Err(_) => {
                        parts.metrics.record_cluster_link_up(false);
                        tracing::warn!("lost the database connection that listens for other daemons' changes; reconnecting");
                        continue 'connection;
                    }
                },
            }
        }
    }
    if let Some(cluster) = parts.store.cluster()
        && let Err(error) = cluster.leave(&instance).await
    {
        tracing::warn!(%error, "cannot leave the cluster cleanly; the others notice when the heartbeat ages");
    }
    Ok(())
}

/// Joins the living before this daemon serves: writes its first heartbeat,
/// paces at its share, then waits one heartbeat interval (and a little), by
/// which time every other daemon counted it too. Without the wait, a joining
/// daemon and the others would pace as if it were not there for up to a
/// second and together exceed the app's rate.
pub(crate) async fn join(parts: &ClusterParts) {
    let Some(instance) = parts.tokens.cluster_instance() else {
        return;
    };
    beat(parts, instance).await;
    tokio::time::sleep(HEARTBEAT_INTERVAL + HEARTBEAT_INTERVAL / 4).await;
}

async fn listen(store: &Store) -> Result<PgListener, sqlx::Error> {
    let pool = store
        .postgres_pool()
        .ok_or_else(|| sqlx::Error::Configuration("not a PostgreSQL store".into()))?;
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CLUSTER_CHANNEL).await?;
    Ok(listener)
}

async fn apply(parts: &ClusterParts, message: ClusterMessage) {
    match message {
        ClusterMessage::Token(client_key) => parts.tokens.reread_from_store(&client_key).await,
        ClusterMessage::Registry => {
            if let Err(error) = parts.registry.reread_from_store().await {
                tracing::warn!(%error, "cannot re-read apps, merchants and clients another daemon changed");
            }
        }
        ClusterMessage::Events(sequence) => parts.events.observe_committed(sequence),
    }
}

/// Re-reads tokens, the registry and the latest event. An error (a pooled
/// connection that died with the server, say) fails the whole re-read, and
/// the link reconnects and tries again: a notification missed while away
/// must not stay missed.
async fn reread_everything(parts: &ClusterParts) -> Result<(), crate::store::StoreError> {
    parts.tokens.reread_all_from_store().await?;
    parts.registry.reread_from_store().await?;
    let latest = parts.store.after_sale_events().latest_sequence().await?;
    parts.events.observe_committed(latest);
    Ok(())
}

/// Writes the heartbeat and re-divides the apps' rates by the living daemons.
async fn beat(parts: &ClusterParts, instance: &str) {
    let Some(cluster) = parts.store.cluster() else {
        return;
    };
    // Kept as long as any rule counts them: the budget window, Douyin's.
    let forget_fetches_after_ms = parts
        .tokens
        .budget_window_ms()
        .max(crate::clock::duration_ms(Duration::from_secs(600)));
    match cluster
        .heartbeat(
            instance,
            crate::clock::duration_ms(ALIVE_WITHIN),
            forget_fetches_after_ms,
        )
        .await
    {
        Ok(alive) => {
            parts.lookup.set_cluster_share(alive);
            parts.metrics.record_cluster_daemons(alive);
        }
        Err(error) => tracing::warn!(%error, "cannot write the heartbeat to the database"),
    }
}
