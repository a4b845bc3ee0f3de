//! The cluster as the coordinator sees it: the nodes (from their heartbeats in
//! the registry), each partition's log head and what every node acknowledged
//! of it, and Redis's own health.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use redis::RedisResult;
use serde::Serialize;

use shared::l2;
use shared::protocol::epochs_fingerprint;
use shared::registry::{self, Registered};
use shared::schema::Layout;
use shared::store::SharedConn;

use crate::barrier::AckBoard;

/// Registry entries silent this many times `node_dead_after_ms` are forgotten.
pub const FORGET_AFTER_DEAD_PERIODS: u64 = 60;

/// One node's state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    /// Node id.
    pub node_id: String,
    /// Its cache API address.
    pub addr: String,
    /// `synced`, `lagging`, `unsynced` or `dead`.
    pub status: &'static str,
    /// Sum over the partitions of the highest seq it acknowledged (in their current epochs).
    pub applied_seq: u64,
    /// How many logged invalidations it has not applied yet, over all partitions.
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
    /// Partitions it cannot prove in sync (from its last report), or whose
    /// current epoch it has not acknowledged.
    pub unsynced_partitions: Vec<u16>,
}

/// One partition's log head.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionHead {
    /// Its index.
    pub partition: u16,
    /// Its epoch.
    pub epoch: String,
    /// Its last seq.
    pub seq: u64,
}

/// The log heads and every known node.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// One partition's epoch, or a fingerprint of all of them.
    pub epoch: String,
    /// Sum of the partitions' last seqs: invalidations logged in their current epochs.
    pub seq: u64,
    /// Each partition's head (empty epochs where its shard did not answer).
    pub partitions: Vec<PartitionHead>,
    /// Nodes by id.
    pub nodes: Vec<NodeView>,
    /// How long until the registry is sure to list every live node: a new
    /// registry epoch means Redis lost the registry, and a node that has not
    /// re-registered yet may still trust its L1 until a full
    /// `node_dead_after_ms` after the registry began. 0 once that has passed.
    #[serde(skip)]
    pub settles_in_ms: u64,
}

impl ClusterView {
    /// Nodes heard from within `node_dead_after_ms`.
    pub fn live(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.iter().filter(|n| n.status != "dead")
    }

    /// The current epoch of a partition (empty if unknown).
    pub fn epoch_of(&self, partition: u16) -> &str {
        self.partitions.get(usize::from(partition)).map_or("", |h| h.epoch.as_str())
    }
}

/// Reads the registry, every partition's head and stored acknowledgements
/// (recorded on `board`), and with `reports` every node's last report.
/// Per-partition reads run concurrently on one multiplexed connection.
pub async fn view(
    conn: &SharedConn,
    layout: &Layout,
    board: &AckBoard,
    node_dead_after_ms: u64,
    reports: bool,
) -> RedisResult<ClusterView> {
    let forget = node_dead_after_ms.saturating_mul(FORGET_AFTER_DEAD_PERIODS);
    let registry = registry::nodes(&mut conn.clone(), forget, reports).await?;
    let reads = layout.all().iter().map(|partition| {
        let mut conn = conn.clone();
        async move {
            let head = l2::head(&mut conn, partition).await?;
            let acks = registry::acknowledgements(&mut conn, partition).await?;
            RedisResult::Ok((head, acks))
        }
    });
    let mut partitions = Vec::with_capacity(usize::from(layout.count()));
    for (index, read) in futures_util::future::join_all(reads).await.into_iter().enumerate() {
        let (head, acks) = read?;
        for ack in acks {
            board.record(ack);
        }
        partitions.push(PartitionHead { partition: index as u16, epoch: head.epoch, seq: head.seq });
    }
    let settles_in_ms = registry.born_ms.map_or(0, |born| (born + node_dead_after_ms).saturating_sub(registry.now_ms));
    let mut nodes = BTreeMap::new();
    for Registered { report, node_id, last_beat_ms } in registry.nodes {
        let last_seen_ms = registry.now_ms.saturating_sub(last_beat_ms);
        let mut applied_seq = 0;
        let mut lag = 0;
        let mut unsynced: Vec<u16> = report.as_ref().map(|r| r.unsynced.clone()).unwrap_or_default();
        for head in &partitions {
            let ack = board.get(&node_id, head.partition).filter(|a| a.position.epoch == head.epoch);
            match ack {
                Some(ack) => {
                    applied_seq += ack.position.seq;
                    lag += head.seq.saturating_sub(ack.position.seq);
                }
                None => {
                    lag += head.seq;
                    if !unsynced.contains(&head.partition) {
                        unsynced.push(head.partition);
                    }
                }
            }
        }
        unsynced.sort_unstable();
        let ready = report.as_ref().is_none_or(|r| r.ready);
        let status = status(last_seen_ms > node_dead_after_ms, ready && unsynced.is_empty(), lag);
        let report = report.unwrap_or_default();
        nodes.insert(
            node_id.clone(),
            NodeView {
                node_id,
                addr: report.addr,
                status,
                applied_seq,
                lag,
                last_seen_ms,
                l1_entries: report.l1_entries,
                l1_bytes: report.l1_bytes,
                hit_ratio: report.hit_ratio,
                ready,
                staleness_bound_ms: report.staleness_bound_ms,
                unsynced_partitions: unsynced,
            },
        );
    }
    Ok(ClusterView {
        epoch: epochs_fingerprint(partitions.iter().map(|p| p.epoch.as_str())),
        seq: partitions.iter().map(|p| p.seq).sum(),
        partitions,
        nodes: nodes.into_values().collect(),
        settles_in_ms,
    })
}

/// A node's status: `dead` when silent too long, `unsynced` when not ready or
/// not in sync with some partition, `lagging` when behind a head, else `synced`.
fn status(silent: bool, synced: bool, lag: u64) -> &'static str {
    if silent {
        "dead"
    } else if !synced {
        "unsynced"
    } else if lag > 0 {
        "lagging"
    } else {
        "synced"
    }
}

/// Redis's own health, from `INFO` of the node holding the registry (on a
/// cluster, `INFO` rides behind a read of the control slot, so it is that
/// node's, not every node's).
pub async fn redis_info(conn: &mut impl ConnectionLike) -> RedisResult<serde_json::Value> {
    let (_, info): (redis::Value, String) =
        redis::pipe().exists(shared::schema::NODES).cmd("INFO").query_async(conn).await?;
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
