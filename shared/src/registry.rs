//! The node registry: agents' heartbeats and acknowledgements, and the
//! coordinators' `node_dead_after_ms`, all stamped with Redis's own clock so
//! that every process compares times on one clock.
//!
//! The heartbeat is one script: it records the node (score = Redis time) and
//! its report, and returns the log head, the epoch, the smallest
//! `node_dead_after_ms` any coordinator announced, and Redis's time. An agent
//! that sees its applied seq at the head it read has proof of being in sync as
//! of the moment it sent the heartbeat; see `node_agent::sync`.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::protocol::NodeReport;
use crate::schema;

/// What a heartbeat learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Last seq in the log.
    pub head: u64,
    /// The epoch, if Redis has one.
    pub epoch: Option<String>,
    /// The smallest `node_dead_after_ms` announced by a coordinator.
    pub dead_after_ms: Option<u64>,
    /// Redis's clock, in Unix milliseconds.
    pub redis_time_ms: u64,
}

static BEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS: nodes zset, node report, seq, epoch, coordinators hash
-- ARGV: node id, report JSON, report TTL ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local dead_after = false
local announced = redis.call('HVALS', KEYS[5])
for _, v in ipairs(announced) do
  local n = tonumber(v)
  if n and (not dead_after or n < dead_after) then dead_after = n end
end
return {tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('GET', KEYS[4]), dead_after, now}",
    )
});

/// Records a heartbeat; see [`Beat`].
pub async fn beat(conn: &mut impl ConnectionLike, report: &NodeReport) -> RedisResult<Beat> {
    let json = serde_json::to_string(report).unwrap_or_else(|_| "{}".into());
    let (head, epoch, dead_after_ms, redis_time_ms): (u64, Option<String>, Option<u64>, u64) = BEAT
        .key(schema::NODES)
        .key(schema::node(&report.node_id))
        .key(schema::SEQ)
        .key(schema::EPOCH)
        .key(schema::COORDINATORS)
        .arg(&report.node_id)
        .arg(json)
        .arg(24 * 3600 * 1000)
        .invoke_async(conn)
        .await?;
    Ok(Beat { head, epoch, dead_after_ms, redis_time_ms })
}

/// A coordinator announces its `node_dead_after_ms`; agents keep their
/// staleness bound below the smallest one announced.
pub async fn announce_dead_after(conn: &mut impl ConnectionLike, origin: &str, ms: u64) -> RedisResult<()> {
    redis::cmd("HSET").arg(schema::COORDINATORS).arg(origin).arg(ms).query_async(conn).await
}

/// An agent's acknowledgement: it has applied everything up to `seq` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The acknowledging node.
    pub node_id: String,
    /// The epoch of the log it follows.
    pub epoch: String,
    /// The highest seq it applied.
    pub seq: u64,
}

impl Ack {
    /// Parses an [`schema::ACK_CHANNEL`] message, `"{epoch} {seq} {node_id}"`.
    pub fn decode(payload: &str) -> Option<Ack> {
        let mut parts = payload.splitn(3, ' ');
        let (epoch, seq, node_id) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Ack { node_id: node_id.to_string(), epoch: epoch.to_string(), seq: seq.parse().ok()? })
    }

    /// Parses a [`schema::ACKS`] hash value, `"{epoch} {seq}"`.
    fn decode_stored(node_id: &str, value: &str) -> Option<Ack> {
        let (epoch, seq) = value.split_once(' ')?;
        Some(Ack { node_id: node_id.to_string(), epoch: epoch.to_string(), seq: seq.parse().ok()? })
    }
}

/// Records an acknowledgement (for the cluster view and late-starting
/// coordinators) and publishes it (for `wait=all` barriers in progress).
pub async fn acknowledge(conn: &mut impl ConnectionLike, ack: &Ack) -> RedisResult<()> {
    redis::pipe()
        .hset(schema::ACKS, &ack.node_id, format!("{} {}", ack.epoch, ack.seq))
        .ignore()
        .publish(schema::ACK_CHANNEL, format!("{} {} {}", ack.epoch, ack.seq, ack.node_id))
        .ignore()
        .query_async(conn)
        .await
}

/// Every stored acknowledgement.
pub async fn acknowledgements(conn: &mut impl ConnectionLike) -> RedisResult<Vec<Ack>> {
    let stored: Vec<(String, String)> = redis::cmd("HGETALL").arg(schema::ACKS).query_async(conn).await?;
    Ok(stored.iter().filter_map(|(node, value)| Ack::decode_stored(node, value)).collect())
}

/// Removes a node from the registry (clean shutdown).
pub async fn deregister(conn: &mut impl ConnectionLike, node_id: &str) -> RedisResult<()> {
    redis::pipe()
        .zrem(schema::NODES, node_id)
        .ignore()
        .del(schema::node(node_id))
        .ignore()
        .hdel(schema::ACKS, node_id)
        .ignore()
        .query_async(conn)
        .await
}

/// A registered node: its last report, when Redis received its last
/// heartbeat, and its last acknowledgement.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The report.
    pub report: NodeReport,
    /// Redis time of the last heartbeat (Unix ms).
    pub last_beat_ms: u64,
    /// Its last acknowledgement, if any.
    pub ack: Option<Ack>,
}

/// Every registered node and Redis's current time; nodes silent for longer
/// than `forget_after_ms` are removed from the registry first.
pub async fn nodes(conn: &mut impl ConnectionLike, forget_after_ms: u64) -> RedisResult<(u64, Vec<Registered>)> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let now = secs * 1000 + micros / 1000;
    let (ids,): (Vec<(String, f64)>,) = redis::pipe()
        .zrembyscore(schema::NODES, "-inf", now.saturating_sub(forget_after_ms))
        .ignore()
        .zrange_withscores(schema::NODES, 0, -1)
        .query_async(conn)
        .await?;
    if ids.is_empty() {
        return Ok((now, Vec::new()));
    }
    let mut pipe = redis::pipe();
    pipe.cmd("MGET");
    for (id, _) in &ids {
        pipe.arg(schema::node(id));
    }
    pipe.cmd("HMGET").arg(schema::ACKS);
    for (id, _) in &ids {
        pipe.arg(id);
    }
    let (reports, acks): (Vec<Option<String>>, Vec<Option<String>>) = pipe.query_async(conn).await?;
    let nodes = ids
        .into_iter()
        .zip(reports.into_iter().zip(acks))
        .filter_map(|((id, score), (report, ack))| {
            let report: NodeReport = serde_json::from_str(&report?).ok()?;
            let ack = ack.and_then(|value| Ack::decode_stored(&id, &value));
            Some(Registered { report, last_beat_ms: score as u64, ack })
        })
        .collect();
    Ok((now, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip_and_refuse_garbage() {
        let ack = Ack::decode("e1 42 node-a b").expect("valid ack");
        assert_eq!(ack, Ack { node_id: "node-a b".into(), epoch: "e1".into(), seq: 42 });
        assert_eq!(Ack::decode_stored("n", "e1 7"), Some(Ack { node_id: "n".into(), epoch: "e1".into(), seq: 7 }));
        assert_eq!(Ack::decode("e1 x node"), None);
        assert_eq!(Ack::decode("e1 5"), None);
        assert_eq!(Ack::decode_stored("n", "7"), None);
    }
}
