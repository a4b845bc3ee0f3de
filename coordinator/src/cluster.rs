//! The cluster as the coordinator sees it: the nodes (from their heartbeats in
//! Redis), the log head, and Redis's own health.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use redis::RedisResult;
use serde::Serialize;

use shared::registry::{self, Registered};
use shared::{l2, schema};

/// Registry entries silent this many times `node_dead_after_ms` are forgotten.
const FORGET_AFTER_DEAD_PERIODS: u64 = 60;

/// One node's state.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Node id.
    pub node_id: String,
    /// Its cache API address.
    pub addr: String,
    /// `synced`, `lagging`, `unsynced` or `dead`.
    pub status: &'static str,
    /// Highest seq it applied.
    pub applied_seq: u64,
    /// How many logged invalidations it has not applied yet.
    pub lag: u64,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// Entries in its L1.
    pub l1_entries: u64,
    /// Bytes in its L1.
    pub l1_bytes: u64,
    /// Its L1 hit ratio.
    pub hit_ratio: f64,
    /// Whether it reports itself ready.
    pub ready: bool,
    /// Its staleness bound.
    pub staleness_bound_ms: u64,
    /// It follows the current epoch (its `applied_seq` counts in it).
    #[serde(skip)]
    pub in_epoch: bool,
}

/// The log head and every known node.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// Current epoch.
    pub epoch: String,
    /// Last seq logged.
    pub seq: u64,
    /// Nodes by id.
    pub nodes: Vec<NodeView>,
    /// How long until the registry is sure to list every live node: a new
    /// epoch means Redis lost its data, registry included, and a node that
    /// has not re-registered yet may still trust its L1 until a full
    /// `node_dead_after_ms` after the epoch began. 0 once that has passed.
    #[serde(skip)]
    pub settles_in_ms: u64,
}

impl ClusterView {
    /// Nodes heard from within `node_dead_after_ms`.
    pub fn live(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.iter().filter(|n| n.status != "dead")
    }
}

/// Reads the registry and every node's last report and acknowledgement.
pub async fn view(conn: &mut impl ConnectionLike, node_dead_after_ms: u64) -> RedisResult<ClusterView> {
    let (now, registered) = registry::nodes(conn, node_dead_after_ms.saturating_mul(FORGET_AFTER_DEAD_PERIODS)).await?;
    let (epoch, seq) = l2::head(conn).await?;
    let born: Option<u64> = redis::cmd("GET").arg(schema::EPOCH_BORN).query_async(conn).await?;
    let settles_in_ms = settles_in_ms(born, node_dead_after_ms, now);
    let mut nodes = BTreeMap::new();
    for Registered { report: r, last_beat_ms, ack } in registered {
        let last_seen_ms = now.saturating_sub(last_beat_ms);
        // The ack moves on every applied message; the report only every heartbeat.
        let acked_seq = ack.filter(|a| a.epoch == epoch).map_or(0, |a| a.seq);
        let applied_seq = if r.epoch == epoch { r.applied_seq.max(acked_seq) } else { acked_seq };
        let in_epoch = r.epoch == epoch || acked_seq > 0;
        let lag = if in_epoch { seq.saturating_sub(applied_seq) } else { seq };
        let status = status(last_seen_ms > node_dead_after_ms, r.ready && in_epoch, lag);
        nodes.insert(
            r.node_id.clone(),
            NodeView {
                node_id: r.node_id,
                addr: r.addr,
                status,
                applied_seq,
                lag,
                last_seen_ms,
                l1_entries: r.l1_entries,
                l1_bytes: r.l1_bytes,
                hit_ratio: r.hit_ratio,
                ready: r.ready,
                staleness_bound_ms: r.staleness_bound_ms,
                in_epoch,
            },
        );
    }
    Ok(ClusterView { epoch, seq, nodes: nodes.into_values().collect(), settles_in_ms })
}

/// Who is live and what each node acknowledged, in one round trip: what
/// `wait=all` needs, without the nodes' reports. Nodes carry no address or
/// L1 figures here; `applied_seq` and `in_epoch` come from their acknowledgements.
pub async fn liveness(conn: &mut impl ConnectionLike, node_dead_after_ms: u64) -> RedisResult<ClusterView> {
    type Reply = ((u64, u64), Vec<(String, f64)>, Vec<(String, String)>, Option<String>, Option<u64>, Option<u64>);
    let ((secs, micros), beats, acks, epoch, seq, born): Reply = redis::pipe()
        .cmd("TIME")
        .zrange_withscores(schema::NODES, 0, -1)
        .hgetall(schema::ACKS)
        .get(schema::EPOCH)
        .get(schema::SEQ)
        .get(schema::EPOCH_BORN)
        .query_async(conn)
        .await?;
    let now = secs * 1000 + micros / 1000;
    let epoch = epoch.unwrap_or_default();
    let seq = seq.unwrap_or(0);
    let acks: std::collections::HashMap<String, String> = acks.into_iter().collect();
    let nodes = beats
        .into_iter()
        .map(|(node_id, beat)| {
            let last_seen_ms = now.saturating_sub(beat as u64);
            let ack = acks.get(&node_id).and_then(|v| v.split_once(' '));
            let acked_seq = ack.filter(|(e, _)| *e == epoch).and_then(|(_, s)| s.parse::<u64>().ok());
            let in_epoch = acked_seq.is_some();
            let applied_seq = acked_seq.unwrap_or(0);
            let lag = if in_epoch { seq.saturating_sub(applied_seq) } else { seq };
            let status = status(last_seen_ms > node_dead_after_ms, in_epoch, lag);
            NodeView {
                node_id,
                addr: String::new(),
                status,
                applied_seq,
                lag,
                last_seen_ms,
                l1_entries: 0,
                l1_bytes: 0,
                hit_ratio: 0.0,
                ready: status != "unsynced",
                staleness_bound_ms: 0,
                in_epoch,
            }
        })
        .collect();
    Ok(ClusterView { epoch, seq, nodes, settles_in_ms: settles_in_ms(born, node_dead_after_ms, now) })
}

/// A node's status: `dead` when silent too long, `unsynced` when not ready or
/// not in the current epoch, `lagging` when behind the head, else `synced`.
fn status(silent: bool, synced_epoch: bool, lag: u64) -> &'static str {
    if silent {
        "dead"
    } else if !synced_epoch {
        "unsynced"
    } else if lag > 0 {
        "lagging"
    } else {
        "synced"
    }
}

/// See [`ClusterView::settles_in_ms`]. A missing birth (deleted by hand)
/// leaves nothing to wait for.
fn settles_in_ms(born: Option<u64>, node_dead_after_ms: u64, now: u64) -> u64 {
    born.map_or(0, |born| (born + node_dead_after_ms).saturating_sub(now))
}

/// Redis's own health, from `INFO`.
pub async fn redis_info(conn: &mut impl ConnectionLike) -> RedisResult<serde_json::Value> {
    let info: String = redis::cmd("INFO").query_async(conn).await?;
    let fields: BTreeMap<&str, &str> =
        info.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once(':')).collect();
    let num = |k: &str| fields.get(k).and_then(|v| v.trim().parse::<u64>().ok());
    let keyspace: BTreeMap<&str, &str> =
        fields.iter().filter(|(k, _)| k.starts_with("db")).map(|(k, v)| (*k, v.trim())).collect();
    let hits = num("keyspace_hits").unwrap_or(0);
    let misses = num("keyspace_misses").unwrap_or(0);
    Ok(serde_json::json!({
        "reachable": true,
        "version": fields.get("redis_version").map(|v| v.trim()),
        "uptime_secs": num("uptime_in_seconds"),
        "used_memory_bytes": num("used_memory"),
        "used_memory_human": fields.get("used_memory_human").map(|v| v.trim()),
        "maxmemory_bytes": num("maxmemory"),
        "connected_clients": num("connected_clients"),
        "pubsub_channels": num("pubsub_channels"),
        "keyspace_hits": hits,
        "keyspace_misses": misses,
        "keyspace_hit_ratio": if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
        "evicted_keys": num("evicted_keys"),
        "keyspace": keyspace,
    }))
}
