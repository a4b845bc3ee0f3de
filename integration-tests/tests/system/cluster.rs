//! The system on a real Redis Cluster (3 masters, 3 replicas, started here):
//! partitions spread over the masters, invalidations crossing shards with
//! `wait=all`, a slot migration under load, and a master killed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use integration_tests::redis_cluster::RedisCluster;
use serde_json::{json, Value};

use crate::{partition_of, wait_until, Deployed};

/// A coordinator and agents on a Redis Cluster.
struct Sharded {
    d: Deployed,
    redis: RedisCluster,
    _dir: tempfile::TempDir,
}

impl Sharded {
    async fn start(agents: usize) -> Sharded {
        let mut dir = tempfile::Builder::new().prefix("dcc-sharded-").tempdir().expect("temp dir");
        // DCC_KEEP_LOGS keeps the processes' logs for a look afterwards.
        dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let redis = RedisCluster::start(dir.path(), 3, 1).await.unwrap_or_else(|e| panic!("Redis Cluster: {e:#}"));
        let d = Deployed::start(dir.path(), &redis.url(), agents, "node_dead_after_ms = 4000\n").await;
        Sharded { d, redis, _dir: dir }
    }
}

/// Tenants, one per partition in `partitions`, by partition.
fn tenants_in(partitions: &HashSet<u16>) -> HashMap<u16, String> {
    let mut found = HashMap::new();
    for i in 0.. {
        let tenant = format!("t{i}");
        let p = partition_of(&tenant);
        if partitions.contains(&p) {
            found.entry(p).or_insert(tenant);
        }
        if found.len() == partitions.len() {
            return found;
        }
    }
    unreachable!()
}

/// The partition's hash-tag slot.
fn slot_of(partition: u16) -> u16 {
    shared::schema::slot(&shared::schema::Layout::default().get(partition).seq())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_tenants_spread_over_every_master_and_wait_all_crosses_shards() {
    let t = Sharded::start(2).await;
    let all: HashSet<u16> = (0..16).collect();
    let tenants = tenants_in(&all);
    for tenant in tenants.values() {
        t.d.put(0, tenant, "k", "v").await;
    }
    // Every master holds entries: the partitions spread over the shards.
    let masters: Vec<u16> =
        t.redis.topology().await.expect("topology").iter().filter(|n| n.master).map(|n| n.port).collect();
    assert_eq!(masters.len(), 3);
    let mut serving = HashSet::new();
    for p in 0..16u16 {
        serving.insert(t.redis.master_of(slot_of(p)).await.expect("master").port);
    }
    assert_eq!(serving.len(), 3, "the 16 partitions sit on every master");
    for port in &masters {
        let node = t.redis.nodes.iter().find(|n| n.port == *port).expect("node");
        let mut conn = node.connection().await.expect("connect");
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE");
        assert!(keys > 0, "master {port} holds nothing");
    }

    // One invalidation naming tenants of partitions on every master.
    let named: Vec<&String> = tenants.values().collect();
    for tenant in &named {
        t.d.warm(tenant, "k").await;
    }
    let batch: Vec<Value> =
        named.iter().map(|tenant| json!({"tenant": tenant, "entity": "x", "keys": ["k"]})).collect();
    let (status, answer) = t.d.post("/v1/events?wait=all", Value::Array(batch)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["positions"].as_array().map(Vec::len), Some(16), "{answer}");
    assert_eq!(answer["nodes"], json!({"live": 2, "acked": 2}), "{answer}");
    for tenant in &named {
        for i in 0..2 {
            let (status, layer, body) = t.d.read(i, tenant, "k").await;
            assert_eq!(status, 404, "{tenant}/k still served by agent {i} from {layer} after wait=all: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_slot_migration_and_a_killed_master_do_not_stop_invalidations() {
    let mut t = Sharded::start(2).await;
    // A tenant in partition 0, whose slot is among the lowest of the first master's.
    let tenant = tenants_in(&HashSet::from([0]))[&0].clone();
    let slot = slot_of(0);
    let source = t.redis.master_of(slot).await.expect("master");
    let nodes = t.redis.topology().await.expect("topology");
    let target = nodes.iter().find(|n| n.master && n.id != source.id).expect("another master").clone();

    // Move the lowest slots of the partition's master, its slot among them,
    // with redis-cli, while invalidations of the tenant keep coming.
    let lowest = source.slots.iter().map(|(lo, _)| *lo).min().unwrap_or(0);
    let count = (slot - lowest + 1).max(1);
    let cli = integration_tests::which("redis-cli").expect("redis-cli");
    let reshard = tokio::process::Command::new(cli)
        .args(["--cluster", "reshard", &format!("127.0.0.1:{}", source.port)])
        .args(["--cluster-from", &source.id, "--cluster-to", &target.id])
        .args(["--cluster-slots", &count.to_string(), "--cluster-yes"])
        .output();
    let load = async {
        let mut answered = 0;
        for n in 0..20 {
            let (status, _) =
                t.d.post("/v1/invalidate", json!({"tenant": tenant, "keys": [format!("load:{n}")]})).await;
            answered += usize::from(status == 200);
        }
        answered
    };
    let (out, answered) = tokio::join!(reshard, load);
    let out = out.expect("redis-cli --cluster reshard");
    assert!(out.status.success(), "reshard failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(answered > 0, "no invalidation was answered during the migration");
    assert_eq!(t.redis.master_of(slot).await.expect("master").id, target.id, "the partition's slot moved");

    // After the move, an invalidation of the tenant reaches every agent.
    t.d.put(0, &tenant, "moved", "old").await;
    t.d.warm(&tenant, "moved").await;
    let (status, answer) = t.d.post("/v1/invalidate?wait=all", json!({"tenant": tenant, "keys": ["moved"]})).await;
    assert_eq!(status, 200, "{answer}");
    for i in 0..2 {
        assert_eq!(t.d.read(i, &tenant, "moved").await.0, 404, "agent {i} after the slot moved");
    }

    // Kill the master now serving the partition: its replica takes over.
    t.d.put(0, &tenant, "failover", "old").await;
    t.d.warm(&tenant, "failover").await;
    let (status, answer) = t.d.post("/v1/invalidate?wait=all", json!({"tenant": tenant, "keys": ["failover"]})).await;
    assert_eq!(status, 200, "{answer}");
    let master = t.redis.master_of(slot).await.expect("master");
    t.redis.node(master.port).expect("the master's process").proc.kill();
    let promoted = wait_until(Duration::from_secs(60), || async {
        t.redis.master_of(slot).await.is_ok_and(|m| m.port != master.port)
    })
    .await;
    assert!(promoted, "no replica took the partition's slot over");

    // The invalidation answered before the kill stays in force, and new
    // ones reach every agent once they are back in sync.
    for i in 0..2 {
        let (status, layer, body) = t.d.read(i, &tenant, "failover").await;
        assert_ne!((status, body.as_str()), (200, "old"), "agent {i} served the invalidated value from {layer}");
    }
    // A value written just before an agent finds that the failover forked
    // the partition's log was written under the old epoch, and reads as a
    // miss from then on: as an app would, write it again until it is cached.
    let cached = wait_until(Duration::from_secs(60), || async {
        t.d.put(0, &tenant, "after", "old").await;
        for i in 0..2 {
            let in_l1 = wait_until(Duration::from_secs(5), || async { t.d.read(i, &tenant, "after").await.1 == "L1" });
            if !in_l1.await {
                return false;
            }
        }
        true
    })
    .await;
    assert!(cached, "after the failover, the value was never cached in every agent's L1");
    let ok = wait_until(Duration::from_secs(60), || async {
        t.d.post("/v1/invalidate?wait=all&timeout_ms=5000", json!({"tenant": tenant, "keys": ["after"]})).await.0 == 200
    })
    .await;
    assert!(ok, "invalidations after the failover were not confirmed");
    for i in 0..2 {
        assert_eq!(t.d.read(i, &tenant, "after").await.0, 404, "agent {i} after the failover");
    }
}
