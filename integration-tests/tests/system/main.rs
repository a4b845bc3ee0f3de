//! Integration tests: the real system (redis-server, coordinator, node agents
//! as processes) driven over HTTP, as users drive it. One test binary; each
//! test starts its own cluster on free ports.
//!
//! Timing: nothing here asserts a duration. Waits poll until a condition holds,
//! with deadlines generous enough for a busy 2-core machine.

mod auth;
mod bad_input;
mod cache_api;
mod cachectl;
mod cluster;
mod credentials;
mod dashboard;
mod deploy_files;
mod encryption;
mod faults;
mod features;
mod invalidation;
mod malformed;
mod openapi;
mod operations;
mod pg_source;
mod resp;
mod sentinel;
mod stats;
mod tls;

use std::time::{Duration, Instant};

use integration_tests::{Cluster, ClusterOptions, Service};
use reqwest::{Client, Response};
use serde_json::Value;

/// How long an invalidation may take to reach every agent before a test fails.
pub const PROPAGATION_DEADLINE: Duration = Duration::from_secs(10);

/// A cluster plus an HTTP client.
pub struct TestCluster {
    /// The processes.
    pub cluster: Cluster,
    /// HTTP client.
    pub http: Client,
}

impl TestCluster {
    /// Starts a cluster with `agents` agents and the given extra coordinator TOML.
    pub async fn start(agents: usize, coordinator_toml: &str) -> TestCluster {
        let options = ClusterOptions { agents, coordinator_toml: coordinator_toml.into(), ..ClusterOptions::default() };
        TestCluster::with(options).await
    }

    /// Starts a cluster with full options.
    pub async fn with(options: ClusterOptions) -> TestCluster {
        let cluster = Cluster::start(options).await.unwrap_or_else(|e| panic!("cluster failed to start: {e:#}"));
        TestCluster { cluster, http: test_client() }
    }

    /// Agent `i`.
    pub fn agent(&self, i: usize) -> &Service {
        self.cluster.agent(i)
    }

    /// `PUT /v1/cache/{tenant}/{key}{query}` on agent `i`.
    pub async fn put(&self, i: usize, tenant: &str, key: &str, query: &str, body: &str) -> Response {
        self.http
            .put(self.agent(i).url(&format!("/v1/cache/{tenant}/{}{query}", encode(key))))
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT failed: {e}"))
    }

    /// PUT that must succeed.
    pub async fn put_ok(&self, i: usize, tenant: &str, key: &str, query: &str, body: &str) {
        let resp = self.put(i, tenant, key, query, body).await;
        let status = resp.status().as_u16();
        assert_eq!(status, 204, "PUT {tenant}/{key}{query}: {}", resp.text().await.unwrap_or_default());
    }

    /// `GET /v1/cache/{tenant}/{key}` on agent `i`.
    pub async fn get(&self, i: usize, tenant: &str, key: &str) -> Response {
        self.http
            .get(self.agent(i).url(&format!("/v1/cache/{tenant}/{}", encode(key))))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET failed: {e}"))
    }

    /// (status, X-Cache, body) of a GET.
    pub async fn read(&self, i: usize, tenant: &str, key: &str) -> (u16, String, String) {
        let resp = self.get(i, tenant, key).await;
        let status = resp.status().as_u16();
        let layer = header(&resp, "x-cache");
        (status, layer, resp.text().await.unwrap_or_default())
    }

    /// Reads `key` through every agent until each answers 200 from L1. (An
    /// agent starved of CPU for longer than its staleness bound answers from
    /// L2 until its next heartbeat proves it in sync again, so this polls.)
    pub async fn warm(&self, tenant: &str, key: &str) {
        for i in 0..self.cluster.agents.len() {
            let (status, _, _) = self.read(i, tenant, key).await;
            assert_eq!(status, 200, "{tenant}/{key} via agent {i}");
            let deadline = Instant::now() + PROPAGATION_DEADLINE;
            let mut last = self.read(i, tenant, key).await;
            while !(last.0 == 200 && last.1 == "L1") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                last = self.read(i, tenant, key).await;
            }
            let from_l1 = last.0 == 200 && last.1 == "L1";
            assert!(from_l1, "{tenant}/{key} via agent {i} never came from L1: {last:?}");
        }
    }

    /// POSTs JSON to the coordinator; returns status and body.
    pub async fn coordinator_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_to(&self.cluster.coordinator.url(path), body).await
    }

    /// POSTs JSON to any URL (a second coordinator, say); returns status and body.
    pub async fn post_to(&self, url: &str, body: Value) -> (u16, Value) {
        let resp = self.http.post(url).json(&body).send().await.unwrap_or_else(|e| panic!("POST {url} failed: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POST /v1/events that must succeed; returns the answer.
    pub async fn event(&self, body: Value) -> Value {
        let (status, answer) = self.coordinator_post("/v1/events", body).await;
        assert_eq!(status, 200, "event: {answer}");
        answer
    }

    /// POST /v1/invalidate that must succeed; returns the answer.
    pub async fn invalidate(&self, body: Value) -> Value {
        let (status, answer) = self.coordinator_post("/v1/invalidate", body).await;
        assert_eq!(status, 200, "invalidate: {answer}");
        answer
    }

    /// GET JSON from a service.
    pub async fn get_json(&self, service: &Service, path: &str) -> (u16, Value) {
        let resp = self.http.get(service.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until every agent has applied `seq` of `tenant`'s partition (from its `/v1/status`).
    pub async fn wait_applied(&self, tenant: &str, seq: u64) {
        let p = usize::from(partition_of(tenant));
        for agent in &self.cluster.agents {
            let deadline = Instant::now() + PROPAGATION_DEADLINE;
            loop {
                let (_, status) = self.get_json(agent, "/v1/status").await;
                if status["partitions"][p]["applied_seq"].as_u64().unwrap_or(0) >= seq {
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not apply seq {seq}: {status}", agent.proc.name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Asserts the key is gone (404) through every agent, after waiting for `seq`.
    pub async fn assert_gone_everywhere(&self, seq: u64, tenant: &str, key: &str) {
        self.wait_applied(tenant, seq).await;
        for i in 0..self.cluster.agents.len() {
            let (status, layer, body) = self.read(i, tenant, key).await;
            assert_eq!(status, 404, "{tenant}/{key} still served by agent {i} from {layer}: {body}");
        }
    }

    /// Asserts the key is still served by every agent.
    pub async fn assert_kept_everywhere(&self, tenant: &str, key: &str) {
        for i in 0..self.cluster.agents.len() {
            let (status, _, _) = self.read(i, tenant, key).await;
            assert_eq!(status, 200, "{tenant}/{key} wrongly invalidated on agent {i}");
        }
    }
}

/// A coordinator and agents on a Redis the test started itself (a cluster,
/// or one watched by sentinels), reached by `redis_url`.
pub struct Deployed {
    /// Agents, in order.
    pub agents: Vec<Service>,
    /// The coordinator.
    pub coordinator: Service,
    /// HTTP client.
    pub http: Client,
}

impl Deployed {
    /// Starts a coordinator (with `coordinator_toml`) and `agents` agents on
    /// `redis_url`, logs in `dir`, and waits until all are ready.
    pub async fn start(dir: &std::path::Path, redis_url: &str, agents: usize, coordinator_toml: &str) -> Deployed {
        Deployed::start_with(dir, redis_url, agents, coordinator_toml, "").await
    }

    /// [`Deployed::start`], with `agent_toml` in every agent's config.
    pub async fn start_with(
        dir: &std::path::Path,
        redis_url: &str,
        agents: usize,
        coordinator_toml: &str,
        agent_toml: &str,
    ) -> Deployed {
        use integration_tests::{free_port, start_agent, start_coordinator, wait_ready};
        let coordinator = start_coordinator(dir, redis_url, free_port(), coordinator_toml).expect("coordinator");
        let mut started = Vec::new();
        for i in 1..=agents {
            started.push(start_agent(dir, redis_url, free_port(), &format!("agent-{i}"), agent_toml).expect("agent"));
        }
        let http = test_client();
        wait_ready(&http, &coordinator).await.unwrap_or_else(|e| panic!("{e:#}"));
        for agent in &started {
            wait_ready(&http, agent).await.unwrap_or_else(|e| panic!("{e:#}"));
        }
        Deployed { agents: started, coordinator, http }
    }

    /// A PUT through agent `i` that must succeed.
    pub async fn put(&self, i: usize, tenant: &str, key: &str, body: &str) {
        let url = self.agents[i].url(&format!("/v1/cache/{tenant}/{key}"));
        let resp = self.http.put(url).body(body.to_string()).send().await.expect("PUT");
        assert_eq!(resp.status(), 204, "PUT {tenant}/{key}: {}", resp.text().await.unwrap_or_default());
    }

    /// (status, X-Cache, body) of a GET through agent `i`; status 0 if it failed.
    pub async fn read(&self, i: usize, tenant: &str, key: &str) -> (u16, String, String) {
        let url = self.agents[i].url(&format!("/v1/cache/{tenant}/{key}"));
        match self.http.get(url).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let layer = header(&resp, "x-cache");
                (status, layer, resp.text().await.unwrap_or_default())
            }
            Err(e) => (0, String::new(), e.to_string()),
        }
    }

    /// Reads through every agent until each answers from L1.
    pub async fn warm(&self, tenant: &str, key: &str) {
        for i in 0..self.agents.len() {
            let ok = wait_until(PROPAGATION_DEADLINE, || async { self.read(i, tenant, key).await.1 == "L1" }).await;
            assert!(ok, "{tenant}/{key} never came from agent {i}'s L1: {:?}", self.read(i, tenant, key).await);
        }
    }

    /// POSTs JSON to the coordinator; returns status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self.http.post(self.coordinator.url(path)).json(&body).send().await.expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Agent `i`'s `/v1/status` (null if it did not answer).
    pub async fn status(&self, i: usize) -> Value {
        match self.http.get(self.agents[i].url("/v1/status")).send().await {
            Ok(resp) => resp.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

/// A `[[tokens]]` table for a process's config: `tenants` and `scopes` are
/// TOML lists; only the secret's SHA-256 is written.
pub fn token_toml(name: &str, secret: &str, tenants: &str, scopes: &str) -> String {
    format!(
        "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\ntenants = {tenants}\nscopes = {scopes}\n\n",
        shared::auth::sha256_hex(secret)
    )
}

/// The HTTP client of the tests: idle connections are dropped before the
/// services' keep-alive (5 s) closes them, so that a request never races a
/// closing connection on a slow machine.
pub fn test_client() -> Client {
    Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("HTTP client: {e}"))
}

/// Percent-encodes a key for a URL path, keeping `/` and `:` readable.
pub fn encode(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response header as a string (empty when absent).
pub fn header(resp: &Response, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `service`'s `/readyz` gives `reason` for not being ready,
/// and checks the process did not exit meanwhile (it keeps retrying).
pub async fn assert_not_ready_because(http: &Client, service: &mut Service, reason: &str) {
    let url = service.url("/readyz");
    let said = || async {
        let body: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        body["reason"].as_str().map(str::to_string)
    };
    let found = wait_until(PROPAGATION_DEADLINE, || async { said().await.as_deref() == Some(reason) }).await;
    assert!(
        found,
        "{}: readyz said {:?}, not {reason}; log:\n{}",
        service.proc.name,
        said().await,
        service.proc.log_tail()
    );
    assert!(service.proc.try_status().is_none(), "{} exited instead of retrying", service.proc.name);
}

/// The seq of a coordinator answer that touched one partition.
pub fn seq(answer: &Value) -> u64 {
    answer["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {answer}"))
}

/// The seq an answer gives for `tenant`'s partition.
pub fn seq_of(answer: &Value, tenant: &str) -> u64 {
    let p = u64::from(partition_of(tenant));
    let positions = answer["positions"].as_array().unwrap_or_else(|| panic!("no positions in {answer}"));
    let at = positions.iter().find(|pos| pos["partition"].as_u64() == Some(p));
    at.and_then(|pos| pos["seq"].as_u64()).unwrap_or_else(|| panic!("no position for {tenant} in {answer}"))
}

/// The partition a tenant lives in (the services run with the default layout).
pub fn partition_of(tenant: &str) -> u16 {
    shared::schema::Layout::default().of(tenant).index
}

/// The Redis key of an entry.
pub fn entry_key(tenant: &str, key: &str) -> String {
    shared::schema::Layout::default().of(tenant).value(tenant, key)
}
