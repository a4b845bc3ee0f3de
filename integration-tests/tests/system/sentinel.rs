//! The system under Sentinel (a primary, a replica, three sentinels, started
//! here): invalidations wait for the replica, and a failover to a replica
//! that lagged never undoes an answered invalidation; the fork it causes is
//! found and the partition moves to a new epoch.

use std::time::Duration;

use integration_tests::redis_cluster::Sentinels;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::{partition_of, wait_until, Deployed, PROPAGATION_DEADLINE};

/// Long enough for a failover and reconnections on a busy machine.
const FAILOVER: Duration = Duration::from_secs(60);

/// A coordinator and agents on a primary watched by sentinels.
struct Watched {
    d: Deployed,
    redis: Sentinels,
    dir: tempfile::TempDir,
}

impl Watched {
    async fn start(agents: usize) -> Watched {
        let mut dir = tempfile::Builder::new().prefix("dcc-sentinel-").tempdir().expect("temp dir");
        dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let redis = Sentinels::start(dir.path()).await.unwrap_or_else(|e| panic!("Sentinel: {e:#}"));
        // One replica required, whether or not it is connected right now.
        let settings = "node_dead_after_ms = 4000\nmin_replicas = 1\nreplica_timeout_ms = 500\n";
        let d = Deployed::start(dir.path(), &redis.url(), agents, settings).await;
        Watched { d, redis, dir }
    }

    async fn invalidate(&self, query: &str, key: &str) -> (u16, Value) {
        self.d.post(&format!("/v1/invalidate{query}"), json!({"tenant": "acme", "keys": [key]})).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sentinel_a_failover_to_a_lagging_replica_keeps_answered_invalidations_and_finds_the_fork() {
    let mut t = Watched::start(2).await;
    let p = usize::from(partition_of("acme"));

    // With the replica connected, an invalidation is answered once it holds it.
    t.d.put(0, "acme", "kept", "old").await;
    t.d.put(0, "acme", "lost", "old").await;
    t.d.warm("acme", "kept").await;
    t.d.warm("acme", "lost").await;
    let (status, answered) = t.invalidate("?wait=all", "kept").await;
    assert_eq!(status, 200, "{answered}");

    // The replica stops, and its link is cut (a stopped replica would still
    // find in its socket what the primary sent meanwhile): the next
    // invalidation is logged and applied by the agents, but not replicated:
    // 503 not_replicated.
    let primary = t.redis.primary_port().await.expect("primary");
    let replica = t.redis.data.iter().find(|n| n.port != primary).expect("replica").port;
    t.redis.node(replica).expect("replica").proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let mut conn = t.redis.node(primary).expect("primary").connection().await.expect("primary");
    let _: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica").query_async(&mut conn).await.expect("CLIENT KILL");
    let (status, unreplicated) = t.invalidate("", "lost").await;
    assert_eq!((status, unreplicated["error"].as_str()), (503, Some("not_replicated")), "{unreplicated}");
    let lost_seq = unreplicated["seq"].as_u64().expect("a not_replicated answer gives its seq");
    for i in 0..2 {
        let applied = wait_until(PROPAGATION_DEADLINE, || async {
            t.d.status(i).await["partitions"][p]["applied_seq"].as_u64().unwrap_or(0) >= lost_seq
        })
        .await;
        assert!(applied, "agent {i} did not apply the unreplicated invalidation");
    }
    let old_epoch = unreplicated["epoch"].as_str().unwrap_or_default().to_string();

    // The primary dies; the replica comes back and the sentinels promote it.
    t.redis.node_mut(primary).expect("primary").proc.kill();
    t.redis.node(replica).expect("replica").proc.signal(Signal::SIGCONT).expect("SIGCONT");
    let promoted = wait_until(FAILOVER, || async { t.redis.primary_port().await.is_ok_and(|p| p == replica) }).await;
    assert!(promoted, "the sentinels did not promote the replica");

    // Every agent leaves the forked history: its partition is in a new epoch.
    for i in 0..2 {
        let moved = wait_until(FAILOVER, || async {
            let s = t.d.status(i).await;
            let epoch = s["partitions"][p]["epoch"].as_str().unwrap_or_default().to_string();
            !epoch.is_empty() && epoch != old_epoch && s["ready"] == true
        })
        .await;
        assert!(moved, "agent {i} still follows the forked epoch: {}", t.d.status(i).await);
    }
    let mut forks = 0;
    for i in 0..2 {
        forks += t.d.status(i).await["invalidations"]["forks_detected"].as_u64().unwrap_or(0);
    }
    let metrics =
        t.d.http.get(t.d.coordinator.url("/metrics")).send().await.expect("metrics").text().await.unwrap_or_default();
    let coordinator_forks = metrics
        .lines()
        .find(|l| l.starts_with("dcc_log_forks_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(forks >= 1 || coordinator_forks >= 1.0, "nobody detected the fork");

    // The invalidation answered 200 stays in force; the entry whose
    // invalidation was lost is not served from the old epoch either.
    for i in 0..2 {
        let (status, layer, body) = t.d.read(i, "acme", "kept").await;
        assert_eq!(status, 404, "agent {i} served {body} from {layer}: an answered invalidation was undone");
        let (status, layer, body) = t.d.read(i, "acme", "lost").await;
        assert_eq!(status, 404, "agent {i} served {body} from {layer}, an entry of the forked epoch");
    }

    // With no replica left, min_replicas = 1 cannot be met: an invalidation
    // is done, logged and applied, but answered 503 not_replicated.
    t.d.put(0, "acme", "alone", "old").await;
    t.d.warm("acme", "alone").await;
    let (status, answer) = t.invalidate("", "alone").await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("not_replicated")), "{answer}");
    for i in 0..2 {
        let gone = wait_until(PROPAGATION_DEADLINE, || async { t.d.read(i, "acme", "alone").await.0 == 404 }).await;
        assert!(gone, "agent {i} did not apply an unreplicated invalidation");
    }

    // The lost node is replaced: later invalidations are answered, and reach every agent.
    t.redis.add_replica(t.dir.path(), replica).await.expect("a new replica");
    t.d.put(0, "acme", "after", "old").await;
    t.d.warm("acme", "after").await;
    let ok = wait_until(FAILOVER, || async { t.invalidate("?wait=all&timeout_ms=5000", "after").await.0 == 200 }).await;
    assert!(ok, "invalidations after the failover were not confirmed");
    for i in 0..2 {
        assert_eq!(t.d.read(i, "acme", "after").await.0, 404, "agent {i} after the failover");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_require_a_password_are_reached_with_redis_sentinel_password() {
    let mut dir = tempfile::Builder::new().prefix("dcc-sentinel-auth-").tempdir().expect("temp dir");
    dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
    let password = "sentinel-secret";
    let redis = Sentinels::start_with(dir.path(), Some(password)).await.unwrap_or_else(|e| panic!("Sentinel: {e:#}"));

    // The sentinels refuse a client that does not give it.
    let port = redis.sentinels[0].0;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("a sentinel");
    let refused: redis::RedisResult<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(integration_tests::redis_cluster::MASTER_NAME)
        .query_async(&mut conn)
        .await;
    assert!(refused.is_err(), "the sentinels answered without their password: {refused:?}");

    // With `redis_sentinel_password`, both processes find the primary and work as ever.
    let access = format!("redis_sentinel_password = \"{password}\"\n");
    let d = Deployed::start_with(dir.path(), &redis.url(), 1, &access, &access).await;
    d.put(0, "acme", "k", "old").await;
    d.warm("acme", "k").await;
    let (status, answer) = d.post("/v1/invalidate?wait=all", json!({"tenant": "acme", "keys": ["k"]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"]["acked"], 1, "{answer}");
    assert_eq!(d.read(0, "acme", "k").await.0, 404);
}
