//! Keeping L1 in sync with the invalidation log: the subscriber that applies
//! every broadcast message to L1 in seq order, and the heartbeat that reports
//! this node and checks the log head.
//!
//! The L1 side of the invalidation path, from a message arriving to an entry
//! disappearing, is [`on_message`] → [`apply_in_order`] → [`apply`] →
//! [`crate::l1::L1::apply`].
//!
//! Order and gaps: messages carry a contiguous seq within an epoch. A message
//! whose seq is not the next one means some were missed: they are replayed from
//! the log, or L1 is flushed when the log no longer holds them. A new epoch
//! means Redis lost its data: L1 is flushed. After every (re)subscription the
//! agent compares its applied seq with the log head and catches up the same way.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use shared::invalidation::read_log;
use shared::protocol::{now_ms, InvalidationMessage, NodeReport};
use shared::service::Backoff;
use shared::{l2, registry, schema};

use crate::agent::Agent;

/// Starts the subscriber and the heartbeat; both stop when `shutdown` is cancelled.
pub fn spawn(agent: &Agent, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(subscribe_loop(agent.clone(), shutdown.clone())),
        tokio::spawn(heartbeat_loop(agent.clone(), shutdown.clone())),
        tokio::spawn(acknowledge_loop(agent.clone(), shutdown)),
    ]
}

/// Subscribes, catches up, applies messages; on any loss, starts over with backoff.
async fn subscribe_loop(agent: Agent, shutdown: CancellationToken) {
    let sync = &agent.inner().sync;
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        match subscribe_and_apply(&agent, &shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "invalidation subscription lost; reconnecting"),
        }
        sync.subscribed.store(false, Ordering::Release);
        sync.subscription.fetch_add(1, Ordering::AcqRel);
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One subscription's life. Returns `Ok` only on shutdown.
async fn subscribe_and_apply(agent: &Agent, shutdown: &CancellationToken, backoff: &mut Backoff) -> anyhow::Result<()> {
    let inner = agent.inner();
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), inner.redis.get_async_pubsub()).await??;
    pubsub.subscribe(schema::CHANNEL).await?;
    inner.sync.subscription.fetch_add(1, Ordering::AcqRel);
    inner.sync.subscribed.store(true, Ordering::Release);
    // Subscribed first, then read the head: nothing logged can fall between the two.
    catch_up(agent).await?;
    backoff.reset();
    inner.sync.report_now.notify_one();
    info!(applied_seq = inner.sync.applied_seq.load(Ordering::Acquire), "subscribed to invalidations");

    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = messages.next() => match msg {
                Some(msg) => on_message(agent, msg.get_payload_bytes()).await?,
                None => anyhow::bail!("the subscription connection closed"),
            },
            // The heartbeat saw the log move on without us (a quiet channel
            // after lost messages) or a new epoch.
            _ = inner.sync.catch_up_now.notified() => catch_up(agent).await?,
        }
    }
}

/// Brings L1 up to the log head: after (re)subscribing, and whenever the
/// heartbeat finds the head ahead. Ends by asking for a heartbeat, which
/// proves the sync.
async fn catch_up(agent: &Agent) -> anyhow::Result<()> {
    let inner = agent.inner();
    let mut conn = inner.pool.get().await?;
    // Newly (re)connected: Redis may have restarted without our scripts.
    shared::invalidation::load_scripts(&mut conn).await?;
    let (epoch, head) = l2::head(&mut conn).await?;
    let known = lock(&inner.sync.epoch).clone();
    if known.is_empty() {
        // First contact: L1 holds nothing yet, so it is in sync at the head.
        info!(%epoch, head, "joined the invalidation log");
        adopt(agent, epoch, head);
    } else if known != epoch {
        flush(agent, "Redis lost its data (new epoch)");
        adopt(agent, epoch, head);
    } else {
        let applied = inner.sync.applied_seq.load(Ordering::Acquire);
        if head > applied {
            inner.metrics.gaps.inc();
            replay_or_flush(agent, &mut conn, applied + 1, head, &epoch).await?;
        }
    }
    // The proof of sync comes from the heartbeat this asks for, not from
    // here: a proof is only ever as recent as a heartbeat that Redis has
    // recorded, so that a node the coordinators consider dead (no heartbeat
    // for node_dead_after_ms) has run out of proof first.
    inner.sync.report_now.notify_one();
    Ok(())
}

/// Handles one broadcast payload.
async fn on_message(agent: &Agent, payload: &[u8]) -> anyhow::Result<()> {
    match InvalidationMessage::decode(payload) {
        Ok(msg) => apply_in_order(agent, msg).await,
        Err(e) => {
            // It may have invalidated anything: nothing in L1 can be proven fresh.
            agent.inner().metrics.gaps.inc();
            flush(agent, &format!("unreadable invalidation message: {e}"));
            Ok(())
        }
    }
}

/// Applies a message after any it should follow: replays a gap first, flushes
/// on a new epoch, and ignores what was applied already.
async fn apply_in_order(agent: &Agent, msg: InvalidationMessage) -> anyhow::Result<()> {
    let inner = agent.inner();
    let known = lock(&inner.sync.epoch).clone();
    if msg.epoch != known {
        flush(agent, "Redis lost its data (new epoch)");
        adopt(agent, msg.epoch.clone(), msg.seq.saturating_sub(1));
    }
    let applied = inner.sync.applied_seq.load(Ordering::Acquire);
    if msg.seq <= applied {
        return Ok(());
    }
    if msg.seq > applied + 1 {
        inner.metrics.gaps.inc();
        let mut conn = inner.pool.get().await?;
        replay_or_flush(agent, &mut conn, applied + 1, msg.seq - 1, &msg.epoch).await?;
    }
    apply(agent, &msg);
    Ok(())
}

/// Replays `from..=to` from the log, or flushes L1 when the log lost some of them.
async fn replay_or_flush(
    agent: &Agent,
    conn: &mut deadpool_redis::Connection,
    from: u64,
    to: u64,
    epoch: &str,
) -> anyhow::Result<()> {
    let inner = agent.inner();
    match read_log(conn, from, to).await? {
        Some(messages) if messages.iter().all(|m| m.epoch == epoch) => {
            info!(from, to, "replaying missed invalidations from the log");
            for msg in &messages {
                apply(agent, msg);
                inner.metrics.replayed.inc();
            }
        }
        _ => {
            flush(agent, &format!("missed invalidations {from}..={to} are no longer in the log"));
            adopt(agent, epoch.to_string(), to);
        }
    }
    Ok(())
}

/// Applies one message to L1 and records it as applied.
fn apply(agent: &Agent, msg: &InvalidationMessage) {
    let inner = agent.inner();
    let mut dropped = 0;
    for selector in &msg.invalidations {
        dropped += inner.l1.apply(selector);
    }
    inner.sync.applied_seq.fetch_max(msg.seq, Ordering::AcqRel);
    inner.sync.applied.notify_one();
    prove_pending(agent, msg.seq);
    inner.metrics.applied.inc();
    inner.metrics.applied_seq.set(i64::try_from(msg.seq).unwrap_or(i64::MAX));
    let lag_ms = now_ms().saturating_sub(msg.ts_ms);
    inner.metrics.propagation_lag.observe(lag_ms as f64 / 1000.0);
    debug!(seq = msg.seq, dropped, lag_ms, "applied invalidation");
}

/// Completes a heartbeat's proof of sync once L1 has applied the head it read
/// (on the subscription it was sent on).
fn prove_pending(agent: &Agent, applied: u64) {
    let sync = &agent.inner().sync;
    let mut pending = lock(&sync.pending_proof);
    if let Some((sent_at, head, subscription)) = *pending {
        if subscription != sync.subscription.load(Ordering::Acquire) {
            *pending = None;
        } else if applied >= head {
            *pending = None;
            sync.prove(sent_at);
        }
    }
}

/// Drops all of L1.
fn flush(agent: &Agent, why: &str) {
    warn!(reason = why, "flushing L1");
    agent.inner().l1.flush();
    agent.inner().metrics.flushes.inc();
}

/// Records that L1 is in sync with `epoch` up to `seq`.
fn adopt(agent: &Agent, epoch: String, seq: u64) {
    let sync = &agent.inner().sync;
    *lock(&sync.epoch) = epoch;
    sync.applied_seq.store(seq, Ordering::Release);
    sync.applied.notify_one();
    agent.inner().metrics.applied_seq.set(i64::try_from(seq).unwrap_or(i64::MAX));
}

/// Acknowledges this node's applied seq as soon as it moves (stored in
/// `dcc:acks` and published on `dcc:acked`), so that a coordinator holding a
/// `wait=all` request hears of it within a round trip rather than a heartbeat.
/// Bursts coalesce: while one write is in flight, later applies only leave the
/// notification set, and the next write carries the newest seq.
async fn acknowledge_loop(agent: Agent, shutdown: CancellationToken) {
    let inner = agent.inner();
    let mut acked: Option<(String, u64)> = None;
    // A connection of its own, kept open: an ack is one round trip, with no
    // pool checkout (whose liveness check would be a second one).
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        tokio::select! {
            _ = inner.sync.applied.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let epoch = lock(&inner.sync.epoch).clone();
        let seq = inner.sync.applied_seq.load(Ordering::Acquire);
        if epoch.is_empty() || acked.as_ref().is_some_and(|(e, s)| *e == epoch && *s == seq) {
            continue;
        }
        let ack = registry::Ack { node_id: inner.node_id.clone(), epoch, seq };
        if connection.is_none() {
            let config = shared::service::connection_config();
            connection = inner.redis.get_multiplexed_async_connection_with_config(&config).await.ok();
        }
        let written = match connection.as_mut() {
            Some(conn) => registry::acknowledge(conn, &ack).await.is_ok(),
            None => false,
        };
        if written {
            acked = Some((ack.epoch, ack.seq));
        } else {
            // Redis is away: reconnect and try again shortly rather than at the next apply.
            connection = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            inner.sync.applied.notify_one();
        }
    }
}

/// Reports this node to Redis, proves it is in sync, and notices when it is
/// not: a log head that stays ahead of the applied seq for a whole heartbeat
/// (messages lost on a quiet channel) or a new epoch triggers a catch-up.
async fn heartbeat_loop(agent: Agent, shutdown: CancellationToken) {
    let inner = agent.inner();
    let mut ticker = tokio::time::interval(Duration::from_millis(inner.settings.heartbeat_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The head seen one beat ago: everything in it must be applied by now.
    let mut previous_head = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = inner.sync.report_now.notified() => {}
            _ = shutdown.cancelled() => {
                deregister(&agent).await;
                return;
            }
        }
        inner.l1.maintain();
        let sent_at = Instant::now();
        let subscription = inner.sync.subscription.load(Ordering::Acquire);
        match beat(&agent).await {
            Ok(beat) => {
                inner.sync.redis_ok.store(true, Ordering::Release);
                adjust_bound(&agent, beat.dead_after_ms);
                let known = lock(&inner.sync.epoch).clone();
                let applied = inner.sync.applied_seq.load(Ordering::Acquire);
                // Subscribed before the beat was sent, and still on that subscription.
                let subscribed = inner.sync.subscribed.load(Ordering::Acquire)
                    && inner.sync.subscription.load(Ordering::Acquire) == subscription;
                let same_epoch = beat.epoch.as_deref() == Some(known.as_str());
                if subscribed && same_epoch && applied >= beat.head {
                    inner.sync.prove(sent_at);
                } else if subscribed && same_epoch {
                    // Messages up to the head are probably in flight: the
                    // subscriber proves sync as of `sent_at` once it has applied them.
                    *lock(&inner.sync.pending_proof) = Some((sent_at, beat.head, subscription));
                    prove_pending(&agent, inner.sync.applied_seq.load(Ordering::Acquire));
                    // Still behind what the previous beat saw: messages were lost.
                    if applied < previous_head.min(beat.head) {
                        debug!(applied, head = beat.head, "behind the log head; catching up");
                        inner.sync.catch_up_now.notify_one();
                    }
                } else if subscribed {
                    debug!(epoch = ?beat.epoch, "the log has a new epoch; catching up");
                    inner.sync.catch_up_now.notify_one();
                }
                previous_head = beat.head;
            }
            Err(e) => {
                if inner.sync.redis_ok.swap(false, Ordering::AcqRel) {
                    warn!(error = %e, "heartbeat failed: Redis unreachable");
                }
            }
        }
        inner.metrics.ready.set(i64::from(agent.readiness().is_ok()));
    }
}

/// Keeps the staleness bound below the coordinators' `node_dead_after_ms`, so
/// that a node the coordinators stop waiting for has stopped trusting its L1
/// first (with a margin of a tenth for clock-rate differences).
fn adjust_bound(agent: &Agent, dead_after_ms: Option<u64>) {
    let inner = agent.inner();
    let configured = inner.settings.staleness_bound_ms;
    // No announcement (Redis restarted, no coordinator yet): keep the bound
    // in force rather than raise it.
    let Some(dead_after) = dead_after_ms else {
        return;
    };
    let bound = configured.min(dead_after - dead_after / 10);
    let previous = inner.sync.bound_ms.swap(bound, Ordering::AcqRel);
    if bound == previous {
        return;
    }
    if bound < configured {
        warn!(
            configured_ms = configured,
            in_force_ms = bound,
            node_dead_after_ms = dead_after,
            "staleness_bound_ms must stay below the coordinators' node_dead_after_ms: lowering it; \
             raise node_dead_after_ms or lower staleness_bound_ms to silence this"
        );
    } else {
        info!(staleness_bound_ms = bound, "staleness bound restored to its configured value");
    }
    if bound < 2 * inner.settings.heartbeat_interval_ms {
        warn!(
            staleness_bound_ms = bound,
            heartbeat_interval_ms = inner.settings.heartbeat_interval_ms,
            "the staleness bound in force is under two heartbeats: L1 will often be bypassed; \
             lower heartbeat_interval_ms or raise the coordinators' node_dead_after_ms"
        );
    }
}

/// Writes this node's report; returns what the heartbeat learned.
async fn beat(agent: &Agent) -> anyhow::Result<registry::Beat> {
    let inner = agent.inner();
    let status = agent.status();
    let report = NodeReport {
        node_id: inner.node_id.clone(),
        addr: inner.addr.clone(),
        ready: status.ready,
        epoch: status.epoch,
        applied_seq: status.applied_seq,
        l1_entries: status.l1.entries,
        l1_bytes: status.l1.bytes,
        hit_ratio: status.l1.hit_ratio,
        staleness_bound_ms: status.staleness_bound_ms,
        ts_ms: now_ms(),
    };
    let mut conn = tokio::time::timeout(Duration::from_secs(2), inner.pool.get()).await??;
    Ok(registry::beat(&mut conn, &report).await?)
}

/// Removes this node from the registry on a clean shutdown, so that nobody waits for it.
async fn deregister(agent: &Agent) {
    let inner = agent.inner();
    if let Ok(mut conn) = inner.pool.get().await {
        if let Err(e) = registry::deregister(&mut conn, &inner.node_id).await {
            warn!(error = %e, "could not deregister this node");
        }
    }
}

/// Locks a std mutex, recovering from poisoning (the data is a plain value).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
