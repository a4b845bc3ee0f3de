//! The `wait=all` barrier: answer only when every live agent has applied an
//! invalidation (in every partition it touched), or give up with the names of
//! those that have not.
//!
//! Agents acknowledge each applied position by publishing on their
//! partition's ack channel (and storing it in the partition's acks).
//! [`listen`] keeps the newest acknowledgement of every node and partition on
//! the [`AckBoard`]; [`wait_for_all`] checks the live nodes against it after
//! every change. Liveness comes from the registry (heartbeats stamped with
//! Redis time) and is re-read every [`LIVENESS_REFRESH`], so a node that
//! falls silent stops being awaited once it is `node_dead_after_ms` old. That
//! is safe because an agent's staleness bound is kept below
//! `node_dead_after_ms` (see `node_agent::sync`): by the time it is no longer
//! awaited it has stopped answering from L1.
//!
//! The same reasoning covers nodes the registry does not list at all: when
//! Redis loses the registry (a new registry epoch) it starts empty, so a
//! barrier in a registry younger than `node_dead_after_ms` waits for it to
//! age (see [`ClusterView::settles_in_ms`]): an agent that has not
//! re-registered by then has stopped trusting its L1 too.
//!
//! What "a node has applied a position" means is decided in one place,
//! [`AckBoard::has_applied`], for the barrier and for the informational counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use shared::protocol::Position;
use shared::registry::{self, Ack};
use shared::schema::Layout;
use shared::service::Backoff;
use shared::store::{Conn, Delivery, Store};

use crate::cluster::{self, ClusterView, NodeView};

/// How often a waiting barrier re-reads which nodes are live (and their
/// stored acknowledgements, in case the ack subscription is down).
pub const LIVENESS_REFRESH: Duration = Duration::from_millis(100);

/// The newest acknowledgement of every node in every partition, and a signal
/// for each change.
pub struct AckBoard {
    latest: Mutex<HashMap<(String, u16), Ack>>,
    changed: watch::Sender<u64>,
}

impl Default for AckBoard {
    fn default() -> Self {
        AckBoard { latest: Mutex::default(), changed: watch::channel(0).0 }
    }
}

/// What one barrier (or one count) read of the logs: whether a partition's
/// log held a nonce at a seq. Kept for one call only: a failover can fork a
/// log, and what held before may not hold after (for a later target; for the
/// call's own targets, which were replicated before it began, it still does).
/// It takes a connection only when a fact must be read.
#[derive(Default)]
pub struct LogFacts {
    known: HashMap<(u16, String, u64, String), bool>,
    conn: Option<Conn>,
}

/// Locks a std mutex, recovering from poisoning (the data is a plain value).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an acknowledgement says of a position, before any log is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// Applied.
    Yes,
    /// Not (yet) applied.
    No,
    /// Applied if the partition's log holds this nonce at this seq: the node
    /// applied a later message (or one whose nonce the target does not know);
    /// only if that message is in the current history does it cover the target.
    IfLogHolds(u64, String),
}

/// The one rule: does `ack` cover `target`, in a partition whose epoch is now `current`?
pub fn coverage(ack: Option<&Ack>, target: &Position, current: &str) -> Coverage {
    let Some(ack) = ack else { return Coverage::No };
    let at = &ack.position;
    if at.epoch == target.epoch {
        if at.seq < target.seq {
            Coverage::No
        } else if at.seq == target.seq && !target.nonce.is_empty() && at.nonce == target.nonce {
            Coverage::Yes
        } else if at.seq == target.seq && !target.nonce.is_empty() && !at.nonce.is_empty() {
            // The same seq, another message: another history.
            Coverage::No
        } else {
            Coverage::IfLogHolds(at.seq, at.nonce.clone())
        }
    } else if at.epoch == current && current != target.epoch {
        // The node follows a newer epoch of the partition: joining it
        // flushed the partition's tenants from its L1.
        Coverage::Yes
    } else {
        Coverage::No
    }
}

impl AckBoard {
    /// Records an acknowledgement: within one epoch only a higher seq counts;
    /// a different epoch replaces the old one (the node followed the
    /// partition into a new one).
    pub fn record(&self, ack: Ack) {
        let mut latest = lock(&self.latest);
        let key = (ack.node_id.clone(), ack.position.partition);
        let newer = match latest.get(&key) {
            Some(old) => old.position.epoch != ack.position.epoch || old.position.seq < ack.position.seq,
            None => true,
        };
        if newer {
            latest.insert(key, ack);
            drop(latest);
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// The newest acknowledgement of a node in a partition.
    pub fn get(&self, node_id: &str, partition: u16) -> Option<Ack> {
        lock(&self.latest).get(&(node_id.to_string(), partition)).cloned()
    }

    /// Whether `node_id` has applied `target`, its partition's epoch being
    /// `current` now (see [`coverage`]); reads the log when the node's
    /// acknowledgement is of a later message, once per such message and `facts`.
    pub async fn has_applied(
        &self,
        store: &Store,
        layout: &Layout,
        facts: &mut LogFacts,
        node_id: &str,
        target: &Position,
        current: &str,
    ) -> redis::RedisResult<bool> {
        match coverage(self.get(node_id, target.partition).as_ref(), target, current) {
            Coverage::Yes => Ok(true),
            Coverage::No => Ok(false),
            Coverage::IfLogHolds(seq, nonce) => {
                let fact = (target.partition, target.epoch.clone(), seq, nonce.clone());
                if let Some(known) = facts.known.get(&fact) {
                    return Ok(*known);
                }
                let conn = match &mut facts.conn {
                    Some(conn) => conn,
                    none => none.insert(store.get().await?),
                };
                let found = shared::invalidation::nonce_at(conn, layout.get(target.partition), seq).await?;
                // An unknown nonce (an agent that adopted the head without one)
                // counts when the log holds the seq at all.
                let holds = found.is_some_and(|n| nonce.is_empty() || n == nonce);
                facts.known.insert(fact, holds);
                Ok(holds)
            }
        }
    }

    /// Whether `node` has applied every one of `targets`, as of `view`.
    pub async fn has_applied_all(
        &self,
        store: &Store,
        layout: &Layout,
        facts: &mut LogFacts,
        view: &ClusterView,
        node: &NodeView,
        targets: &[Position],
    ) -> redis::RedisResult<bool> {
        for target in targets {
            let current = view.epoch_of(target.partition);
            if !self.has_applied(store, layout, facts, &node.node_id, target, current).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Follows every partition's acknowledgement channel for as long as the
/// coordinator runs, reconnecting with backoff. After each subscription it
/// reads the stored acknowledgements, so that none published while it was
/// away is missed.
pub async fn listen(store: Store, layout: Layout, board: &AckBoard, shutdown: CancellationToken) {
    let channels: Vec<String> = layout.all().iter().map(|p| p.ack_channel()).collect();
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let followed = async {
            let mut subscription = store.subscribe(&channels).await?;
            let mut conn = store.get().await?;
            for partition in layout.all() {
                for ack in registry::acknowledgements(&mut conn, partition).await? {
                    board.record(ack);
                }
            }
            drop(conn);
            backoff.reset();
            info!("following agents' acknowledgements");
            while let Some(delivery) = subscription.next().await? {
                match delivery {
                    Delivery::Message { channel, payload } => {
                        let partition = channels.iter().position(|c| *c == channel);
                        let payload = String::from_utf8(payload).ok();
                        match partition.zip(payload).and_then(|(p, payload)| Ack::decode(p as u16, &payload)) {
                            Some(ack) => board.record(ack),
                            None => warn!("ignoring an unreadable acknowledgement"),
                        }
                    }
                    // Acknowledgements may have been missed meanwhile: read the stored ones.
                    Delivery::Resubscribed(channel) => {
                        if let Some(p) = channels.iter().position(|c| *c == channel) {
                            let mut conn = store.get().await?;
                            for ack in registry::acknowledgements(&mut conn, layout.get(p as u16)).await? {
                                board.record(ack);
                            }
                        }
                    }
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
    /// qualifies, otherwise a new read (which also records the stored
    /// acknowledgements on `board`).
    pub async fn view_since(
        &self,
        store: &Store,
        layout: &Layout,
        board: &AckBoard,
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
        let conn = store.get().await?;
        let view = Arc::new(cluster::view(&conn.shared(), layout, board, node_dead_after_ms, false).await?);
        *lock(&self.latest) = Some((began, view.clone()));
        Ok(view)
    }

    fn cached(&self, since: Instant) -> Option<Arc<ClusterView>> {
        let latest = lock(&self.latest);
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
        /// The registry is younger than `node_dead_after_ms`: nodes that have
        /// not re-registered since Redis lost it could not be ruled out.
        settling: bool,
    },
}

/// What a barrier needs: where to read, and what to read against.
pub struct Waiting<'a> {
    /// Redis.
    pub store: &'a Store,
    /// The partitions.
    pub layout: &'a Layout,
    /// Acknowledgements.
    pub board: &'a AckBoard,
    /// The shared view.
    pub liveness: &'a Liveness,
    /// When a silent node stops being awaited.
    pub node_dead_after_ms: u64,
}

/// Waits until every live node has applied every one of `targets`, or
/// `timeout`. Call it after they were logged: liveness is judged only on
/// registry reads that began after that, because a node counted dead before
/// the invalidation existed could have come back and proved itself in sync
/// without it.
pub async fn wait_for_all(w: &Waiting<'_>, targets: &[Position], timeout: Duration) -> anyhow::Result<Barrier> {
    let called = Instant::now();
    let deadline = called + timeout;
    let mut changes = w.board.changed.subscribe();
    let mut facts = LogFacts::default();
    loop {
        // Who is live now (as of a read at most one refresh old, and begun
        // after the call), and what the registry already knows they applied.
        let since = Instant::now().checked_sub(LIVENESS_REFRESH).map_or(called, |t| t.max(called));
        let view = w.liveness.view_since(w.store, w.layout, w.board, w.node_dead_after_ms, since).await?;
        let live: Vec<&NodeView> = view.live().collect();
        let refresh_at = Instant::now() + LIVENESS_REFRESH;
        loop {
            changes.borrow_and_update();
            let mut lagging = Vec::new();
            for node in &live {
                if !w.board.has_applied_all(w.store, w.layout, &mut facts, &view, node, targets).await? {
                    lagging.push(node.node_id.clone());
                }
            }
            // Not held while waiting for the next change.
            facts.conn = None;
            // Right after Redis lost the registry, an agent missing from it
            // may still answer from L1: wait until it cannot.
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

    fn at(epoch: &str, seq: u64, nonce: &str) -> Position {
        Position { partition: 0, epoch: epoch.into(), seq, nonce: nonce.into() }
    }

    fn ack(node: &str, position: Position) -> Ack {
        Ack { node_id: node.into(), position }
    }

    #[test]
    fn the_board_keeps_the_newest_ack_per_node_and_partition() {
        let board = AckBoard::default();
        board.record(ack("a", at("e1", 5, "n5")));
        board.record(ack("a", at("e1", 3, "n3")));
        assert_eq!(board.get("a", 0).map(|a| a.position.seq), Some(5));
        board.record(ack("a", Position { partition: 1, ..at("e1", 1, "m1") }));
        assert_eq!(board.get("a", 0).map(|a| a.position.seq), Some(5), "partitions are kept apart");
        assert!(board.get("b", 0).is_none());
    }

    #[test]
    fn an_ack_covers_its_own_message_and_needs_the_log_for_later_ones() {
        let a = ack("a", at("e1", 5, "n5"));
        assert_eq!(coverage(Some(&a), &at("e1", 5, "n5"), "e1"), Coverage::Yes);
        assert_eq!(coverage(Some(&a), &at("e1", 6, "n6"), "e1"), Coverage::No);
        assert_eq!(coverage(Some(&a), &at("e1", 4, "n4"), "e1"), Coverage::IfLogHolds(5, "n5".into()));
        // The same seq, another message: the node applied another history.
        assert_eq!(coverage(Some(&a), &at("e1", 5, "other"), "e1"), Coverage::No);
        // A duplicate's position has no nonce: the log tells.
        assert_eq!(coverage(Some(&a), &at("e1", 5, ""), "e1"), Coverage::IfLogHolds(5, "n5".into()));
        assert_eq!(coverage(None, &at("e1", 1, "n1"), "e1"), Coverage::No);
    }

    #[test]
    fn a_node_in_a_newer_epoch_covers_an_older_invalidation() {
        let a = ack("a", at("e2", 1, "m1"));
        // The partition moved to e2: the node flushed when it joined e2.
        assert_eq!(coverage(Some(&a), &at("e1", 9, "n9"), "e2"), Coverage::Yes);
        // But an ack in e2 says nothing about e1 while e1 is still current.
        assert_eq!(coverage(Some(&a), &at("e1", 9, "n9"), "e1"), Coverage::No);
    }
}
