//! Keeping L1 in sync with every partition's invalidation log: the subscriber
//! that applies each broadcast message to L1 in seq order, the heartbeat that
//! reports this node and checks each log's head, and the acknowledger.
//!
//! The L1 side of the invalidation path, from a message arriving to an entry
//! disappearing, is [`on_message`] → [`apply_in_order`] → [`apply`] →
//! [`crate::l1::L1::apply`].
//!
//! Order, gaps and forks, per partition: messages carry a contiguous seq and
//! the nonce of the message before them. A message whose seq is not the next
//! one means some were missed: they are replayed from the log, or the
//! partition's tenants are flushed from L1 when the log no longer holds them.
//! A new epoch means the partition's data was lost: its tenants are flushed.
//! A message, or a log head, that does not continue the history applied (a
//! failover to a replica that lacked the last messages) is a fork: the
//! partition is moved to a new epoch ([`invalidation::rotate`]) and its
//! tenants flushed. After every (re)subscription the agent compares each
//! partition's applied seq with its log head and catches up the same way.
//! [`state`] holds the state and decides; this module does the I/O.

pub mod state;

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use shared::invalidation::{self, read_log};
use shared::protocol::{now_ms, InvalidationMessage, NodeReport, Position};
use shared::service::Backoff;
use shared::store::{Conn, Delivery, SharedConn};
use shared::{l2, registry};

use crate::agent::Agent;
use state::{head_disagrees, Step};

/// Starts the subscriber, the heartbeat and the acknowledger; they stop when
/// `shutdown` is cancelled.
pub fn spawn(agent: &Agent, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(subscribe_loop(agent.clone(), shutdown.clone())),
        tokio::spawn(heartbeat_loop(agent.clone(), shutdown.clone())),
        tokio::spawn(acknowledge_loop(agent.clone(), shutdown.clone())),
        tokio::spawn(crate::warm::warm_loop(agent.clone(), shutdown)),
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
        sync.on_lost();
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One subscription's life (every partition's channel on one connection).
/// Returns `Ok` only on shutdown.
async fn subscribe_and_apply(agent: &Agent, shutdown: &CancellationToken, backoff: &mut Backoff) -> anyhow::Result<()> {
    let inner = agent.inner();
    let channels: Vec<String> = inner.layout.all().iter().map(|p| p.channel()).collect();
    // The fill notices of the miss leases (see `crate::lease`) ride the same
    // subscription: one connection, in the partition's slot on a cluster.
    let fills: Vec<String> = inner.layout.all().iter().map(|p| p.fills()).collect();
    let all: Vec<String> = channels.iter().chain(&fills).cloned().collect();
    let mut subscription = inner.store.subscribe(&all).await?;
    // Subscribed first, then read the heads: nothing logged can fall between the two.
    let mut conn = inner.store.get().await?;
    // Newly (re)connected: Redis may have restarted without our scripts.
    invalidation::load_scripts(&mut conn).await?;
    for p in 0..inner.layout.count() {
        catch_up(agent, &mut conn, p).await?;
    }
    drop(conn);
    // Only now may heartbeats prove sync on this subscription (it has been
    // live since before the heads were read, so that is conservative): the
    // next heartbeat proves every partition at once, instead of those it
    // happens to find caught up while the others still are catching up.
    inner.sync.on_subscribed();
    backoff.reset();
    inner.sync.report_now.notify_one();
    info!(partitions = channels.len(), "subscribed to invalidations");

    let partition_of = |channel: &str| channels.iter().position(|c| c == channel).map(|p| p as u16);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            delivery = subscription.next() => match delivery? {
                Some(Delivery::Message { channel, payload }) => match partition_of(&channel) {
                    Some(p) => on_message(agent, p, &payload).await?,
                    None if fills.contains(&channel) => {
                        if let Some((tenant, key)) = l2::read_fill_notice(&payload) {
                            inner.waiters.wake_key(tenant, key);
                        }
                    }
                    None => warn!(channel, "a message on a channel not subscribed to"),
                },
                // A cluster slot moved, or a node's connection was re-made:
                // messages of that partition may have been missed meanwhile.
                // No proof taken before now may count, and the partition
                // catches up from its log.
                Some(Delivery::Resubscribed(channel)) if fills.contains(&channel) => {
                    // Fill notices may have been missed: waiters read again.
                    inner.waiters.wake_all();
                }
                Some(Delivery::Resubscribed(channel)) => {
                    inner.sync.on_lost();
                    if let Some(p) = partition_of(&channel) {
                        info!(partition = p, "subscription renewed; catching up");
                        let mut conn = inner.store.get().await?;
                        catch_up(agent, &mut conn, p).await?;
                    }
                    inner.sync.on_subscribed();
                }
                None => anyhow::bail!("the subscription connection closed"),
            },
            // The heartbeat saw a log move on without us (a quiet channel
            // after lost messages), a new epoch or a fork.
            _ = inner.sync.catch_up_now.notified() => {
                let mut conn = inner.store.get().await?;
                for p in inner.sync.take_catch_ups() {
                    catch_up(agent, &mut conn, p).await?;
                }
            }
        }
    }
}

/// Brings partition `p` of L1 up to its log head: after (re)subscribing, and
/// whenever the heartbeat finds the head ahead or unlike what was applied.
/// Ends by asking for a heartbeat, which proves the sync.
async fn catch_up(agent: &Agent, conn: &mut Conn, p: u16) -> anyhow::Result<()> {
    let inner = agent.inner();
    let partition = inner.layout.get(p);
    let head = l2::head(conn, partition).await?;
    let cursor = inner.sync.cursor(p);
    if cursor.epoch.is_empty() {
        // First contact: L1 holds nothing of this partition yet, so it is in
        // sync at the head.
        debug!(partition = p, epoch = %head.epoch, head = head.seq, "joined the partition's log");
        inner.sync.adopt(p, &head.epoch, head.seq, &head.nonce);
    } else if head.epoch != cursor.epoch {
        flush_partition(agent, p, "the partition's data was lost or its log forked (new epoch)");
        inner.sync.adopt(p, &head.epoch, head.seq, &head.nonce);
    } else if let Some(why) = head_disagrees(&cursor, &head.epoch, head.seq, &head.nonce) {
        fork(agent, conn, p, &head, why).await?;
    } else if head.seq > cursor.applied {
        inner.metrics.gaps.inc();
        let expected = cursor.nonce_of(cursor.applied).unwrap_or_default().to_string();
        replay_or_flush(agent, conn, p, cursor.applied + 1, head.seq, &head.epoch, &expected).await?;
    }
    // The proof of sync comes from the heartbeat this asks for, not from
    // here: a proof is only ever as recent as a heartbeat that Redis has
    // recorded, so that a node the coordinators consider dead (no heartbeat
    // for node_dead_after_ms) has run out of proof first.
    inner.sync.report_now.notify_one();
    Ok(())
}

/// Handles one broadcast payload of partition `p`.
async fn on_message(agent: &Agent, p: u16, payload: &[u8]) -> anyhow::Result<()> {
    match InvalidationMessage::decode(payload) {
        Ok(msg) if msg.p == p => {
            let seq = msg.seq;
            if let Err(e) = apply_in_order(agent, p, msg).await {
                // Redis failed while the message was being put in order (a
                // replay or a fork check): it is not applied, and it may
                // invalidate anything of the partition. The subscription
                // starts over and catches up; meanwhile none of the
                // partition's entries may be served on the strength of an
                // earlier proof.
                flush_partition(agent, p, &format!("invalidation {seq} could not be applied: {e:#}"));
                return Err(e);
            }
            Ok(())
        }
        Ok(msg) => {
            agent.inner().metrics.gaps.inc();
            flush_partition(agent, p, &format!("a message of partition {} on this partition's channel", msg.p));
            Ok(())
        }
        Err(e) => {
            // It may have invalidated anything of the partition: none of its
            // tenants' entries can be proven fresh.
            agent.inner().metrics.gaps.inc();
            flush_partition(agent, p, &format!("unreadable invalidation message: {e}"));
            Ok(())
        }
    }
}

/// Applies a message after any it should follow: replays a gap first,
/// flushes on a new epoch or a fork, and ignores what was applied already.
async fn apply_in_order(agent: &Agent, p: u16, msg: InvalidationMessage) -> anyhow::Result<()> {
    let inner = agent.inner();
    match inner.sync.next_step(p, &msg.epoch, msg.seq, &msg.nonce, &msg.prev) {
        Step::Ignore => {}
        Step::Apply => apply(agent, p, &msg),
        Step::NewEpoch => {
            flush_partition(agent, p, "the partition's data was lost or its log forked (new epoch)");
            inner.sync.adopt(p, &msg.epoch, msg.seq.saturating_sub(1), &msg.prev);
            apply(agent, p, &msg);
        }
        Step::Replay { from, to } => {
            inner.metrics.gaps.inc();
            let mut conn = inner.store.get().await?;
            let expected = inner.sync.cursor(p).nonce_of(from - 1).unwrap_or_default().to_string();
            replay_or_flush(agent, &mut conn, p, from, to, &msg.epoch, &expected).await?;
            // The replay ended where this message begins, or a fork moved on.
            if inner.sync.next_step(p, &msg.epoch, msg.seq, &msg.nonce, &msg.prev) == Step::Apply {
                apply(agent, p, &msg);
            }
        }
        Step::Fork => {
            let mut conn = inner.store.get().await?;
            let head = l2::head(&mut conn, inner.layout.get(p)).await?;
            fork(agent, &mut conn, p, &head, "a message of another history at a seq already applied").await?;
        }
    }
    Ok(())
}

/// Replays `from..=to` of partition `p` from its log, checking that each
/// message follows the one before (the first one follows `expected_prev`).
/// Flushes the partition's tenants when the log lost some of them; moves the
/// partition to a new epoch when they belong to another history.
async fn replay_or_flush(
    agent: &Agent,
    conn: &mut Conn,
    p: u16,
    from: u64,
    to: u64,
    epoch: &str,
    expected_prev: &str,
) -> anyhow::Result<()> {
    let inner = agent.inner();
    let partition = inner.layout.get(p);
    let Some(messages) = read_log(conn, partition, from, to).await?.filter(|m| m.iter().all(|m| m.epoch == epoch))
    else {
        flush_partition(agent, p, &format!("missed invalidations {from}..={to} are no longer in the log"));
        inner.sync.adopt(p, epoch, to, "");
        return Ok(());
    };
    let mut prev = expected_prev.to_string();
    for msg in &messages {
        if !prev.is_empty() && !msg.prev.is_empty() && msg.prev != prev {
            let head = l2::head(conn, partition).await?;
            return fork(agent, conn, p, &head, "the log does not continue the history applied").await;
        }
        prev = msg.nonce.clone();
    }
    info!(partition = p, from, to, "replaying missed invalidations from the log");
    for msg in &messages {
        apply(agent, p, msg);
        inner.metrics.replayed.inc();
    }
    Ok(())
}

/// Applies one message of partition `p` to L1 and records it as applied.
fn apply(agent: &Agent, p: u16, msg: &InvalidationMessage) {
    let inner = agent.inner();
    let mut dropped = 0;
    for selector in &msg.invalidations {
        dropped += inner.l1.apply(selector);
        // A miss waiting for a fill of this tenant reads again: the lease it
        // waits on may be over (see `crate::lease`).
        inner.waiters.wake_tenant(&selector.tenant);
    }
    if msg.ack {
        // Before the cursor moves, so that the acknowledgement it wakes publishes.
        inner.sync.want_ack();
    }
    inner.sync.applied(p, msg.seq, &msg.nonce);
    inner.metrics.applied.inc();
    let lag_ms = now_ms().saturating_sub(msg.ts_ms);
    inner.metrics.propagation_lag.observe(lag_ms as f64 / 1000.0);
    debug!(partition = p, seq = msg.seq, dropped, lag_ms, "applied invalidation");
}

/// The log of partition `p` does not continue what was applied (a failover
/// lost messages this agent applied): moves the partition to a new epoch
/// (unless another process already did), drops its tenants from L1, and
/// follows the new epoch from the head.
async fn fork(agent: &Agent, conn: &mut Conn, p: u16, head: &l2::Head, why: &str) -> anyhow::Result<()> {
    let inner = agent.inner();
    inner.metrics.forks.inc();
    warn!(partition = p, reason = why, "the partition's log forked; moving it to a new epoch");
    let epoch = invalidation::rotate(conn, inner.layout.get(p), &head.epoch).await?;
    flush_partition(agent, p, "the partition's log forked");
    let head = l2::head(conn, inner.layout.get(p)).await?;
    inner.sync.adopt(p, &epoch, head.seq, &head.nonce);
    Ok(())
}

/// Drops the tenants of partition `p` from L1.
fn flush_partition(agent: &Agent, p: u16, why: &str) {
    let dropped = agent.inner().l1.flush_partition(p);
    // The partition's hot keys are loaded again before the agent reports ready.
    if agent.settings().warm_keys > 0 {
        agent.inner().warm.request([p]);
    }
    warn!(partition = p, dropped, reason = why, "flushing the partition's tenants from L1");
    agent.inner().metrics.flushes.inc();
}

/// How often, at most, an agent stores its applied positions while nobody
/// waits for them (see [`acknowledge_loop`]).
pub const ACK_STORE_EVERY: Duration = Duration::from_millis(100);

/// Acknowledges each partition's applied position once it moves:
/// stored in the partition's acks (the cluster view's lag, and what a
/// barrier reads every `LIVENESS_REFRESH`), and published on its ack channel
/// only when a message asked for it (someone waits with `wait=all`), so that
/// the coordinator hears of it within a round trip then and receives nothing
/// otherwise. When nobody waits, the stored position is written at most every
/// [`ACK_STORE_EVERY`]: under a stream of invalidations an agent then costs
/// Redis a few writes a second instead of one per message. Bursts coalesce:
/// while one write is in flight (or waits its turn), later applies only leave
/// the notification set, and the next write carries the newest position of
/// every partition that moved.
async fn acknowledge_loop(agent: Agent, shutdown: CancellationToken) {
    let inner = agent.inner();
    let mut acked: Vec<Option<Position>> = vec![None; usize::from(inner.layout.count())];
    // A connection of its own, kept open: an ack is one round trip, with no
    // pool checkout (whose liveness check would be a second one).
    let mut connection: Option<(SharedConn, u64)> = None;
    let mut last_stored: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = inner.sync.applied.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        // Nobody waits: hold the write until its turn; an apply that asks
        // for an acknowledgement (wait=all) ends the wait at once.
        while let Some(due) =
            last_stored.map(|at| at + ACK_STORE_EVERY).filter(|due| *due > tokio::time::Instant::now())
        {
            if inner.sync.ack_wanted() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                _ = inner.sync.applied.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let moved: Vec<Position> = inner
            .sync
            .positions()
            .into_iter()
            .filter(|position| {
                !position.epoch.is_empty() && acked[usize::from(position.partition)].as_ref() != Some(position)
            })
            .collect();
        if moved.is_empty() {
            continue;
        }
        // Under Sentinel, a connection to an old primary is not kept.
        if connection.as_ref().is_some_and(|(_, generation)| *generation != inner.store.generation()) {
            connection = None;
        }
        if connection.is_none() {
            let generation = inner.store.generation();
            connection = inner.store.dedicated().await.ok().map(|conn| (conn, generation));
        }
        let Some((conn, _)) = connection.as_ref() else {
            // Redis is away: try again shortly rather than at the next apply.
            tokio::time::sleep(Duration::from_millis(200)).await;
            inner.sync.applied.notify_one();
            continue;
        };
        let publish = inner.sync.take_ack_wanted();
        // One round trip for all: the multiplexed connection pipelines them.
        let writes = moved.iter().map(|position| {
            let mut conn = conn.clone();
            let ack = registry::Ack { node_id: inner.node_id.clone(), position: position.clone() };
            let partition = inner.layout.get(position.partition);
            async move { registry::acknowledge(&mut conn, partition, &ack, inner.log.sharded, publish).await.is_ok() }
        });
        let written = futures_util::future::join_all(writes).await;
        last_stored = Some(tokio::time::Instant::now());
        let mut failed = false;
        for (position, ok) in moved.into_iter().zip(written) {
            if ok {
                let index = usize::from(position.partition);
                acked[index] = Some(position);
            } else {
                failed = true;
            }
        }
        if failed {
            if publish {
                inner.sync.want_ack();
            }
            connection = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            inner.sync.applied.notify_one();
        }
    }
}

/// Reports this node to Redis, proves each partition in sync, and notices
/// when one is not: a log head that stays ahead of the applied seq for a
/// whole heartbeat (messages lost on a quiet channel), a new epoch, or a head
/// unlike what was applied (a fork) triggers a catch-up of that partition.
async fn heartbeat_loop(agent: Agent, shutdown: CancellationToken) {
    let inner = agent.inner();
    let mut ticker = tokio::time::interval(Duration::from_millis(inner.settings.heartbeat_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The heads seen one beat ago: everything in them must be applied by now.
    let mut previous_heads = vec![0u64; usize::from(inner.layout.count())];
    let mut last_hot_report = Instant::now();
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
        let generation = inner.sync.generation();
        match beat(&agent).await {
            Ok((beat, heads)) => {
                if !inner.sync.set_redis_ok(true) {
                    info!("Redis is reachable");
                }
                adjust_bound(&agent, beat.dead_after_ms);
                for (p, head) in heads.into_iter().enumerate() {
                    let p = p as u16;
                    // A partition whose head could not be read (its shard is
                    // down) gets no proof: its tenants are served from L2, or not.
                    let Ok(head) = head else { continue };
                    if !inner.sync.subscribed_since(generation) {
                        continue;
                    }
                    let cursor = inner.sync.cursor(p);
                    if let Some(why) = head_disagrees(&cursor, &head.epoch, head.seq, &head.nonce) {
                        debug!(partition = p, reason = why, "the log head does not continue L1; catching up");
                        inner.sync.request_catch_up(p);
                        continue;
                    }
                    // Messages up to the head may still be in flight: the
                    // subscriber proves sync as of `sent_at` once it has applied them.
                    inner.sync.offer_proof(p, sent_at, head.seq, generation);
                    let previous = &mut previous_heads[usize::from(p)];
                    // Still behind what the previous beat saw: messages were lost.
                    if cursor.applied < (*previous).min(head.seq) {
                        debug!(partition = p, applied = cursor.applied, head = head.seq, "behind the log head");
                        inner.sync.request_catch_up(p);
                    }
                    *previous = head.seq;
                }
            }
            Err(e) => {
                let outage = shared::store::Outage::of(&format!("{e:#}"));
                inner.sync.set_outage(outage);
                if inner.sync.set_redis_ok(false) {
                    warn!(error = %e, reason = outage.reason(), "heartbeat failed: Redis did not answer");
                }
            }
        }
        if last_hot_report.elapsed() >= shared::hot::REPORT_EVERY {
            last_hot_report = Instant::now();
            report_hot(&agent).await;
        }
        inner.metrics.ready.set(i64::from(agent.readiness().is_ok()));
    }
}

/// Adds the keys this agent hit since the last report to the cluster's hot
/// set (see `crate::warm`). Counts that cannot be written are dropped: the
/// hot set is a hint.
async fn report_hot(agent: &Agent) {
    let inner = agent.inner();
    let hot = inner.usage.take_hot(HOT_REPORTED);
    if hot.is_empty() {
        return;
    }
    let written = async {
        let mut conn = inner.store.get().await?;
        shared::hot::report(&mut conn, &hot).await.map_err(anyhow::Error::from)
    };
    if let Err(e) = written.await {
        debug!(error = %e, "the hot keys could not be reported");
    }
}

/// The most keys one hot-set report carries (the agent's most hit).
const HOT_REPORTED: usize = 512;

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
    let previous = inner.sync.set_bound_ms(bound);
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

/// Each partition's head as one heartbeat read it (an error where its shard
/// did not answer).
type Heads = Vec<Result<l2::Head, redis::RedisError>>;

/// Writes this node's report, then reads every partition's head (all sent
/// after the moment the caller took as the proof's time). Returns what the
/// heartbeat learned.
async fn beat(agent: &Agent) -> anyhow::Result<(registry::Beat, Heads)> {
    let inner = agent.inner();
    let status = agent.status();
    let report = NodeReport {
        node_id: inner.node_id.clone(),
        addr: inner.addr.clone(),
        ready: status.ready,
        applied_seq: status.applied_seq,
        unsynced: status.unsynced_partitions,
        l1_entries: status.l1.entries,
        l1_bytes: status.l1.bytes,
        hit_ratio: status.l1.hit_ratio,
        staleness_bound_ms: status.staleness_bound_ms,
        ts_ms: now_ms(),
        tenants: agent.tenant_reports(),
    };
    // Under Sentinel: the heads are read from the primary the sentinels
    // name now, never from an old one that still answers.
    tokio::time::timeout(Duration::from_secs(2), inner.store.check_primary()).await??;
    let mut conn = tokio::time::timeout(Duration::from_secs(2), inner.store.get()).await??;
    let beat = registry::beat(&mut conn, &report).await?;
    if !inner.store.sharded() {
        // One server: every head in one command.
        let heads = l2::heads(&mut conn, inner.layout.all()).await?;
        return Ok((beat, heads.into_iter().map(Ok).collect()));
    }
    // A cluster: one read per partition, concurrent on one multiplexed
    // connection (one round trip per shard), so that a shard that is down
    // costs only its own partitions their proof.
    let mux = conn.shared();
    let reads = inner.layout.all().iter().map(|partition| {
        let mut mux = mux.clone();
        async move { l2::head(&mut mux, partition).await }
    });
    let heads = futures_util::future::join_all(reads).await;
    Ok((beat, heads))
}

/// Removes this node from the registry on a clean shutdown, so that nobody waits for it.
async fn deregister(agent: &Agent) {
    let inner = agent.inner();
    if let Ok(mut conn) = inner.store.get().await {
        if let Err(e) = registry::deregister(&mut conn, &inner.node_id).await {
            warn!(error = %e, "could not deregister this node");
        }
    }
}
