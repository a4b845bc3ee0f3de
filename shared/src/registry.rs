//! The node registry: agents' heartbeats and the coordinators'
//! `node_dead_after_ms` in the control slot, and agents' acknowledgements in
//! each partition's slot. Everything is stamped with Redis's own clock, so
//! that every process compares times on one clock (the registry's: one slot,
//! one node).
//!
//! The heartbeat ([`beat`]) records the node and its report; the agent then
//! reads the head of every partition's log (`l2::head`). An agent that sees
//! its applied seq at a head it read has proof of being in sync with that
//! partition as of the moment it sent the heartbeat; see `node_agent::sync`.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::protocol::{NodeReport, Position};
use crate::schema::{self, Partition};
use crate::script::with_prelude;

/// What a heartbeat learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The smallest `node_dead_after_ms` announced by a coordinator.
    pub dead_after_ms: Option<u64>,
    /// Redis's clock (the registry's node), in Unix milliseconds.
    pub redis_time_ms: u64,
    /// The registry's epoch.
    pub epoch: String,
}

/// The heartbeat script (`lua/beat.lua`).
pub(crate) static BEAT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/beat.lua")));

/// Records a heartbeat; see [`Beat`].
pub async fn beat(conn: &mut impl ConnectionLike, report: &NodeReport) -> RedisResult<Beat> {
    let json = serde_json::to_string(report)
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "cannot encode the report", e.to_string())))?;
    let (dead_after_ms, redis_time_ms, epoch): (Option<u64>, u64, String) = BEAT
        .key(schema::NODES)
        .key(schema::node(&report.node_id))
        .key(schema::COORDINATORS)
        .key(schema::CONTROL_EPOCH)
        .key(schema::CONTROL_EPOCH_BORN)
        .arg(&report.node_id)
        .arg(json)
        .arg(24 * 3600 * 1000)
        .arg(crate::l2::new_epoch_id())
        .invoke_async(conn)
        .await?;
    Ok(Beat { dead_after_ms, redis_time_ms, epoch })
}

/// A coordinator announces its `node_dead_after_ms`; agents keep their
/// staleness bound below the smallest one announced. Also makes sure the
/// registry has an epoch.
pub async fn announce_dead_after(conn: &mut impl ConnectionLike, origin: &str, ms: u64) -> RedisResult<()> {
    ensure_registry_epoch(conn).await?;
    redis::cmd("HSET").arg(schema::COORDINATORS).arg(origin).arg(ms).query_async(conn).await
}

/// The registry's epoch, created (born now) if Redis lost the registry.
async fn ensure_registry_epoch(conn: &mut impl ConnectionLike) -> RedisResult<String> {
    crate::script::ENSURE_EPOCH
        .key(schema::CONTROL_EPOCH)
        .key(schema::CONTROL_EPOCH_BORN)
        .arg(crate::l2::new_epoch_id())
        .invoke_async(conn)
        .await
}

/// An agent's acknowledgement: it has applied everything of a partition up to
/// a position (the message there, by its nonce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The acknowledging node.
    pub node_id: String,
    /// Where it stands in the partition.
    pub position: Position,
}

impl Ack {
    /// Parses an ack channel message, `"{epoch} {seq} {nonce} {node_id}"`,
    /// of `partition`.
    pub fn decode(partition: u16, payload: &str) -> Option<Ack> {
        let mut parts = payload.splitn(4, ' ');
        let (epoch, seq, nonce, node_id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let position = Position { partition, epoch: epoch.into(), seq: seq.parse().ok()?, nonce: decode_nonce(nonce) };
        Some(Ack { node_id: node_id.to_string(), position })
    }

    /// Parses a stored value, `"{epoch} {seq} {nonce}"`.
    pub fn decode_stored(partition: u16, node_id: &str, value: &str) -> Option<Ack> {
        let mut parts = value.splitn(3, ' ');
        let (epoch, seq, nonce) = (parts.next()?, parts.next()?, parts.next()?);
        let position = Position { partition, epoch: epoch.into(), seq: seq.parse().ok()?, nonce: decode_nonce(nonce) };
        Some(Ack { node_id: node_id.to_string(), position })
    }

    fn stored(&self) -> String {
        let p = &self.position;
        format!("{} {} {}", p.epoch, p.seq, encode_nonce(&p.nonce))
    }
}

/// An unknown nonce travels as `-` (fields are separated by spaces).
fn encode_nonce(nonce: &str) -> &str {
    if nonce.is_empty() {
        "-"
    } else {
        nonce
    }
}

fn decode_nonce(nonce: &str) -> String {
    if nonce == "-" {
        String::new()
    } else {
        nonce.to_string()
    }
}

/// Records an acknowledgement in its partition (for the cluster view, the
/// barriers' periodic reads and late-starting coordinators) and, with
/// `publish`, publishes it (for a `wait=all` barrier in progress, which then
/// hears of it within a round trip): one round trip, in the partition's slot.
pub async fn acknowledge(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    ack: &Ack,
    sharded: bool,
    publish: bool,
) -> RedisResult<()> {
    let stored = ack.stored();
    let mut pipe = redis::pipe();
    pipe.hset(partition.acks(), &ack.node_id, &stored).ignore();
    if publish {
        pipe.cmd(if sharded { "SPUBLISH" } else { "PUBLISH" })
            .arg(partition.ack_channel())
            .arg(format!("{stored} {}", ack.node_id))
            .ignore();
    }
    pipe.query_async(conn).await
}

/// Every acknowledgement stored in a partition.
pub async fn acknowledgements(conn: &mut impl ConnectionLike, partition: &Partition) -> RedisResult<Vec<Ack>> {
    let stored: Vec<(String, String)> = redis::cmd("HGETALL").arg(partition.acks()).query_async(conn).await?;
    Ok(stored.iter().filter_map(|(node, value)| Ack::decode_stored(partition.index, node, value)).collect())
}

/// Removes a node from the registry (clean shutdown).
pub async fn deregister(conn: &mut impl ConnectionLike, node_id: &str) -> RedisResult<()> {
    redis::pipe().zrem(schema::NODES, node_id).ignore().del(schema::node(node_id)).ignore().query_async(conn).await
}

/// A registered node: its last report, and when Redis received its last heartbeat.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The report (`None` when it could not be read: it is then listed by id only).
    pub report: Option<NodeReport>,
    /// Its id.
    pub node_id: String,
    /// Redis time of the last heartbeat (Unix ms).
    pub last_beat_ms: u64,
}

/// What the registry holds: Redis's time, the registry's epoch and its birth,
/// and every registered node.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Redis's time (the registry's node), Unix ms.
    pub now_ms: u64,
    /// When the registry's epoch began, if it has one.
    pub born_ms: Option<u64>,
    /// The nodes, by heartbeat order.
    pub nodes: Vec<Registered>,
}

/// Reads the registry (nodes silent for longer than `forget_after_ms` are
/// removed first); with `reports`, each node's last report too. A registry
/// without an epoch was lost (Redis restarted empty): it gets one, born now,
/// so that it is known to be complete only `node_dead_after_ms` from now.
pub async fn nodes(conn: &mut impl ConnectionLike, forget_after_ms: u64, reports: bool) -> RedisResult<Registry> {
    ensure_registry_epoch(conn).await?;
    // TIME rides behind a read of the control slot, so that on a cluster it
    // is the registry's node's clock, the one heartbeats are stamped with.
    let (born, (secs, micros)): (Option<u64>, (u64, u64)) =
        redis::pipe().get(schema::CONTROL_EPOCH_BORN).cmd("TIME").query_async(conn).await?;
    let now = secs * 1000 + micros / 1000;
    let (ids,): (Vec<(String, f64)>,) = redis::pipe()
        .zrembyscore(schema::NODES, "-inf", now.saturating_sub(forget_after_ms))
        .ignore()
        .zrange_withscores(schema::NODES, 0, -1)
        .query_async(conn)
        .await?;
    let mut found: Vec<Option<String>> = vec![None; ids.len()];
    if reports && !ids.is_empty() {
        let mut cmd = redis::cmd("MGET");
        for (id, _) in &ids {
            cmd.arg(schema::node(id));
        }
        found = cmd.query_async(conn).await?;
    }
    let nodes = ids
        .into_iter()
        .zip(found)
        .map(|((node_id, score), report)| Registered {
            report: report.and_then(|r| serde_json::from_str(&r).ok()),
            node_id,
            last_beat_ms: score as u64,
        })
        .collect();
    Ok(Registry { now_ms: now, born_ms: born, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip_and_refuse_garbage() {
        let ack = Ack::decode(3, "e1 42 n42 node-a b").expect("valid ack");
        let position = Position { partition: 3, epoch: "e1".into(), seq: 42, nonce: "n42".into() };
        assert_eq!(ack, Ack { node_id: "node-a b".into(), position: position.clone() });
        assert_eq!(Ack::decode_stored(3, "node-a b", &ack.stored()), Some(ack));
        let unknown = Ack::decode(0, "e1 0 - n").expect("an unknown nonce");
        assert_eq!(unknown.position.nonce, "");
        assert_eq!(unknown.stored(), "e1 0 -");
        assert_eq!(Ack::decode(0, "e1 x n node"), None);
        assert_eq!(Ack::decode(0, "e1 5 n"), None);
        assert_eq!(Ack::decode_stored(0, "n", "7"), None);
    }
}
