//! The `wait=all` barrier: answer only when every live agent has applied an
//! invalidation, or give up with the names of those that have not.
//!
//! Agents acknowledge each applied seq by publishing on [`schema::ACK_CHANNEL`]
//! (and storing it in [`schema::ACKS`]). [`listen`] keeps the newest
//! acknowledgement of every node on the [`AckBoard`]; [`wait_for_all`] checks
//! the live nodes against it after every change. Liveness comes from the
//! registry (heartbeats stamped with Redis time) and is re-read every
//! [`LIVENESS_REFRESH`], so a node that falls silent stops being awaited once
//! it is `node_dead_after_ms` old. That is safe because an agent's staleness
//! bound is kept below `node_dead_after_ms` (see `node_agent::sync`): by the
//! time it is no longer awaited it has stopped answering from L1.
//!
//! The same reasoning covers nodes the registry does not list at all: when
//! Redis loses its data (a new epoch) the registry starts empty, so a barrier
//! in an epoch younger than `node_dead_after_ms` waits for the epoch to age
//! (see [`cluster::ClusterView::settles_in_ms`]): an agent that has not
//! re-registered by then has stopped trusting its L1 too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use shared::registry::{self, Ack};
use shared::schema;
use shared::service::Backoff;

use crate::cluster::{self, ClusterView, NodeView};

/// How often a waiting barrier re-reads which nodes are live (and their
/// stored acknowledgements, in case the ack subscription is down).
pub const LIVENESS_REFRESH: Duration = Duration::from_millis(100);

/// The newest acknowledgement of every node, and a signal for each change.
pub struct AckBoard {
    latest: Mutex<HashMap<String, Ack>>,
    changed: watch::Sender<u64>,
}

impl Default for AckBoard {
    fn default() -> Self {
        AckBoard { latest: Mutex::new(HashMap::new()), changed: watch::channel(0).0 }
    }
}

impl AckBoard {
    /// Records an acknowledgement: within one epoch only a higher seq counts;
    /// a different epoch replaces the old one (the node followed Redis into a new one).
    pub fn record(&self, ack: Ack) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let newer = match latest.get(&ack.node_id) {
            Some(old) => old.epoch != ack.epoch || old.seq < ack.seq,
            None => true,
        };
        if newer {
            latest.insert(ack.node_id.clone(), ack);
            drop(latest);
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Whether `node_id` has acknowledged `seq` of `epoch`, or follows
    /// `current_epoch`, a newer one (joining it flushed its L1).
    pub fn covers(&self, node_id: &str, epoch: &str, seq: u64, current_epoch: &str) -> bool {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest
            .get(node_id)
            .is_some_and(|a| (a.epoch == epoch && a.seq >= seq) || (current_epoch != epoch && a.epoch == current_epoch))
    }
}

/// Follows the acknowledgement channel for as long as the coordinator runs,
/// reconnecting with backoff. After each subscription it reads the stored
/// acknowledgements, so that none published while it was away is missed.
pub async fn listen(redis: redis::Client, pool: deadpool_redis::Pool, board: &AckBoard, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let followed = async {
            let mut pubsub = tokio::time::timeout(Duration::from_secs(2), redis.get_async_pubsub()).await??;
            pubsub.subscribe(schema::ACK_CHANNEL).await?;
            let mut conn = pool.get().await?;
            for ack in registry::acknowledgements(&mut conn).await? {
                board.record(ack);
            }
            drop(conn);
            backoff.reset();
            info!("following agents' acknowledgements");
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                match msg.get_payload::<String>().ok().as_deref().and_then(Ack::decode) {
                    Some(ack) => board.record(ack),
                    None => warn!("ignoring an unreadable acknowledgement"),
                }
            }
            anyhow::Ok(())
        };
        tokio::select! {
            result = followed => match result {
                Ok(()) => warn!("acknowledgement subscription closed; reconnecting"),
                Err(e) => warn!(error = %e, "acknowledgement subscription failed; reconnecting"),
            },
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The cluster view that every waiting barrier shares, so that a thousand
/// concurrent `wait=all` requests cost one registry read per
/// [`LIVENESS_REFRESH`], not a thousand.
#[derive(Default)]
pub struct Liveness {
    /// The newest view, with the moment its read began.
    latest: Mutex<Option<(Instant, Arc<ClusterView>)>>,
    /// Held by the one waiter that reads a new view; the others then use it.
    reading: tokio::sync::Mutex<()>,
}

impl Liveness {
    /// A view whose read began at or after `since`: the newest one if it
    /// qualifies, otherwise a new read.
    pub async fn view_since(
        &self,
        pool: &deadpool_redis::Pool,
        node_dead_after_ms: u64,
        since: Instant,
    ) -> anyhow::Result<Arc<ClusterView>> {
        if let Some(view) = self.cached(since) {
            return Ok(view);
        }
        let _reading = self.reading.lock().await;
        if let Some(view) = self.cached(since) {
            return Ok(view);
        }
        let began = Instant::now();
        let mut conn = pool.get().await?;
        let view = Arc::new(cluster::liveness(&mut conn, node_dead_after_ms).await?);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((began, view.clone()));
        Ok(view)
    }

    fn cached(&self, since: Instant) -> Option<Arc<ClusterView>> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.as_ref().filter(|(began, _)| *began >= since).map(|(_, view)| view.clone())
    }
}

/// How a barrier ended.
#[derive(Debug)]
pub enum Barrier {
    /// Every live node applied the invalidation.
    Passed {
        /// How many nodes were live at the end.
        live: usize,
    },
    /// The timeout ran out first.
    TimedOut {
        /// How many nodes were live at the end.
        live: usize,
        /// Live nodes that had not applied it, by id.
        lagging: Vec<String>,
        /// The epoch is younger than `node_dead_after_ms`: nodes that have
        /// not re-registered since Redis lost its data could not be ruled out.
        settling: bool,
    },
}

/// Waits until every live node has applied `seq` of `epoch`, or `timeout`.
/// Call it after `seq` was logged: liveness is judged only on registry reads
/// that began after that, because a node counted dead before the invalidation
/// existed could have come back and proved itself in sync without it.
pub async fn wait_for_all(
    pool: &deadpool_redis::Pool,
    board: &AckBoard,
    liveness: &Liveness,
    node_dead_after_ms: u64,
    epoch: &str,
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<Barrier> {
    let called = Instant::now();
    let deadline = called + timeout;
    let mut changes = board.changed.subscribe();
    loop {
        // Who is live now (as of a read at most one refresh old, and begun
        // after the call), and what the registry already knows they applied.
        let since = Instant::now().checked_sub(LIVENESS_REFRESH).map_or(called, |t| t.max(called));
        let view = liveness.view_since(pool, node_dead_after_ms, since).await?;
        let covered_by_view = |n: &NodeView| {
            if view.epoch == epoch {
                n.in_epoch && n.applied_seq >= seq
            } else {
                n.in_epoch
            }
        };
        let live: Vec<&NodeView> = view.live().collect();
        let refresh_at = Instant::now() + LIVENESS_REFRESH;
        loop {
            changes.borrow_and_update();
            let lagging: Vec<String> = live
                .iter()
                .filter(|n| !covered_by_view(n) && !board.covers(&n.node_id, epoch, seq, &view.epoch))
                .map(|n| n.node_id.clone())
                .collect();
            // Right after Redis lost its data, an agent missing from the new
            // registry may still answer from L1: wait until it cannot.
            let settling = view.settles_in_ms > 0;
            if lagging.is_empty() && !settling {
                return Ok(Barrier::Passed { live: live.len() });
            }
            if Instant::now() >= deadline {
                return Ok(Barrier::TimedOut { live: live.len(), lagging, settling });
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The board is gone (shutting down): fall back to polling.
                        tokio::time::sleep_until(refresh_at.min(deadline)).await;
                        break;
                    }
                }
                _ = tokio::time::sleep_until(refresh_at.min(deadline)) => {
                    if Instant::now() >= refresh_at {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(node: &str, epoch: &str, seq: u64) -> Ack {
        Ack { node_id: node.into(), epoch: epoch.into(), seq }
    }

    #[test]
    fn the_board_keeps_the_newest_ack_per_node() {
        let board = AckBoard::default();
        board.record(ack("a", "e1", 5));
        board.record(ack("a", "e1", 3));
        assert!(board.covers("a", "e1", 5, "e1"));
        assert!(!board.covers("a", "e1", 6, "e1"));
        assert!(!board.covers("b", "e1", 1, "e1"));
    }

    #[test]
    fn a_node_in_a_newer_epoch_covers_an_older_invalidation() {
        let board = AckBoard::default();
        board.record(ack("a", "e1", 5));
        board.record(ack("a", "e2", 1));
        // Redis restarted (e2): the node flushed when it joined e2.
        assert!(board.covers("a", "e1", 9, "e2"));
        // But an ack in e2 says nothing about e1 while e1 is still current.
        assert!(!board.covers("a", "e1", 9, "e1"));
    }
}
