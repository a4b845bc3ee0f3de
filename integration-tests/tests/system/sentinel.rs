//! The system under Sentinel (a primary, a replica, three sentinels, started
//! here): invalidations wait for the replica, and a failover to a replica
//! that lagged never undoes an answered invalidation; the fork it causes is
//! found and the partition moves to a new epoch.

use std::time::Duration;

use integration_tests::redis_cluster::Sentinels;
use integration_tests::{free_port, start_agent, start_coordinator, wait_ready, Service};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::{partition_of, test_client, wait_until, PROPAGATION_DEADLINE};

/// Long enough for a failover and reconnections on a busy machine.
const FAILOVER: Duration = Duration::from_secs(60);

struct Watched {
    agents: Vec<Service>,
    coordinator: Service,
    redis: Sentinels,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Watched {
    async fn start(agents: usize) -> Watched {
        let mut dir = tempfile::Builder::new().prefix("dcc-sentinel-").tempdir().expect("temp dir");
        dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let redis = Sentinels::start(dir.path()).await.unwrap_or_else(|e| panic!("Sentinel: {e:#}"));
        let url = redis.url();
        // One replica required, whether or not it is connected right now.
        let settings = "node_dead_after_ms = 4000\nmin_replicas = 1\nreplica_timeout_ms = 500\n";
        let coordinator = start_coordinator(dir.path(), &url, free_port(), settings).expect("coordinator");
        let mut started = Vec::new();
        for i in 1..=agents {
            started.push(start_agent(dir.path(), &url, free_port(), &format!("agent-{i}"), "").expect("agent"));
        }
        let http = test_client();
        wait_ready(&http, &coordinator).await.unwrap_or_else(|e| panic!("{e:#}"));
        for agent in &started {
            wait_ready(&http, agent).await.unwrap_or_else(|e| panic!("{e:#}"));
        }
        Watched { agents: started, coordinator, redis, http, _dir: dir }
    }

    async fn put(&self, i: usize, key: &str, body: &str) {
        let url = self.agents[i].url(&format!("/v1/cache/acme/{key}"));
        let resp = self.http.put(url).body(body.to_string()).send().await.expect("PUT");
        assert_eq!(resp.status(), 204, "PUT {key}: {}", resp.text().await.unwrap_or_default());
    }

    async fn read(&self, i: usize, key: &str) -> (u16, String, String) {
        let url = self.agents[i].url(&format!("/v1/cache/acme/{key}"));
        match self.http.get(url).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let layer = crate::header(&resp, "x-cache");
                (status, layer, resp.text().await.unwrap_or_default())
            }
            Err(e) => (0, String::new(), e.to_string()),
        }
    }

    async fn warm(&self, key: &str) {
        for i in 0..self.agents.len() {
            let ok = wait_until(PROPAGATION_DEADLINE, || async { self.read(i, key).await.1 == "L1" }).await;
            assert!(ok, "{key} never came from agent {i}'s L1: {:?}", self.read(i, key).await);
        }
    }

    async fn invalidate(&self, query: &str, key: &str) -> (u16, Value) {
        let url = self.coordinator.url(&format!("/v1/invalidate{query}"));
        let resp = self.http.post(url).json(&json!({"tenant": "acme", "keys": [key]})).send().await.expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self, i: usize) -> Value {
        let resp = self.http.get(self.agents[i].url("/v1/status")).send().await;
        match resp {
            Ok(resp) => resp.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sentinel_a_failover_to_a_lagging_replica_keeps_answered_invalidations_and_finds_the_fork() {
    let mut t = Watched::start(2).await;
    let p = usize::from(partition_of("acme"));

    // With the replica connected, an invalidation is answered once it holds it.
    t.put(0, "kept", "old").await;
    t.put(0, "lost", "old").await;
    t.warm("kept").await;
    t.warm("lost").await;
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
            t.status(i).await["partitions"][p]["applied_seq"].as_u64().unwrap_or(0) >= lost_seq
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
            let s = t.status(i).await;
            let epoch = s["partitions"][p]["epoch"].as_str().unwrap_or_default().to_string();
            !epoch.is_empty() && epoch != old_epoch && s["ready"] == true
        })
        .await;
        assert!(moved, "agent {i} still follows the forked epoch: {}", t.status(i).await);
    }
    let mut forks = 0;
    for i in 0..2 {
        forks += t.status(i).await["invalidations"]["forks_detected"].as_u64().unwrap_or(0);
    }
    let metrics =
        t.http.get(t.coordinator.url("/metrics")).send().await.expect("metrics").text().await.unwrap_or_default();
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
        let (status, layer, body) = t.read(i, "kept").await;
        assert_eq!(status, 404, "agent {i} served {body} from {layer}: an answered invalidation was undone");
        let (status, layer, body) = t.read(i, "lost").await;
        assert_eq!(status, 404, "agent {i} served {body} from {layer}, an entry of the forked epoch");
    }

    // With no replica left, min_replicas = 1 cannot be met: an invalidation
    // is done, logged and applied, but answered 503 not_replicated.
    t.put(0, "alone", "old").await;
    t.warm("alone").await;
    let (status, answer) = t.invalidate("", "alone").await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("not_replicated")), "{answer}");
    for i in 0..2 {
        let gone = wait_until(PROPAGATION_DEADLINE, || async { t.read(i, "alone").await.0 == 404 }).await;
        assert!(gone, "agent {i} did not apply an unreplicated invalidation");
    }

    // The lost node is replaced: later invalidations are answered, and reach every agent.
    t.redis.add_replica(t._dir.path(), replica).await.expect("a new replica");
    t.put(0, "after", "old").await;
    t.warm("after").await;
    let ok = wait_until(FAILOVER, || async { t.invalidate("?wait=all&timeout_ms=5000", "after").await.0 == 200 }).await;
    assert!(ok, "invalidations after the failover were not confirmed");
    for i in 0..2 {
        assert_eq!(t.read(i, "after").await.0, 404, "agent {i} after the failover");
    }
}
