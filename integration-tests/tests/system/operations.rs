//! Operating the system: start-up checks, health and status, metrics, Redis
//! outages, graceful shutdown, configuration layers, idempotent events and
//! repair after missed messages.

use std::path::Path;
use std::time::Duration;

use integration_tests::{bin_path, free_port, start_agent, start_coordinator, wait_status, Proc, Redis, Service};
use reqwest::Client;
use serde_json::{json, Value};

use crate::{header, seq, TestCluster};

/// How long a state change that involves reconnect backoff (up to 5 s) may take.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);

/// A client that gives up rather than hang: a hang is a failure too.
fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_else(|e| panic!("HTTP client: {e}"))
}

/// GETs `url`; returns status and JSON body (`Null` if not JSON).
async fn get_json(http: &Client, url: &str) -> (u16, Value) {
    let resp = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// GETs `url`; returns status and body text.
async fn get_text(http: &Client, url: &str) -> (u16, String) {
    let resp = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Asserts a JSON error answer with `status` and `code`.
fn assert_error(what: &str, (status, body): &(u16, Value), expected_status: u16, code: &str) {
    assert_eq!(*status, expected_status, "{what}: {body}");
    assert_eq!(body["error"], code, "{what}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message in {body}");
}

/// Polls `check` until it says done or `timeout` passes; returns whether it
/// finished and the last value seen (for the failure message).
async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> (bool, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, T)>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (done, value) = check().await;
        if done || std::time::Instant::now() > deadline {
            return (done, value);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The coordinator's `/v1/cluster/health`.
async fn health(t: &TestCluster) -> Value {
    let (status, body) = t.get_json(&t.cluster.coordinator, "/v1/cluster/health").await;
    assert_eq!(status, 200, "cluster health: {body}");
    body
}

/// The entry for `node_id` in a cluster health answer.
fn node<'a>(health: &'a Value, node_id: &str) -> Option<&'a Value> {
    health["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["node_id"] == node_id))
}

/// Writes a file in `dir`.
fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the exposition has at least one sample of `name` (labelled or not,
/// or a histogram's `_bucket`/`_sum`/`_count`).
fn has_samples(text: &str, name: &str) -> bool {
    text.lines().filter(|l| !l.starts_with('#')).any(|l| {
        l.strip_prefix(name).is_some_and(|rest| {
            rest.starts_with(' ')
                || rest.starts_with('{')
                || ["_bucket", "_sum", "_count"].iter().any(|s| rest.starts_with(s))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_cycle_is_refused_at_start_up_naming_the_cycle() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let redis = Redis::start(dir.path()).await.unwrap_or_else(|e| panic!("redis: {e:#}"));
    let config = write(
        dir.path(),
        "coordinator.toml",
        &format!(
            r#"bind = "127.0.0.1:{port}"
redis_url = "{url}"

[[rules]]
entity = "a"
tags = ["as"]
dependents = ["b"]

[[rules]]
entity = "b"
tags = ["bs"]
dependents = ["c"]

[[rules]]
entity = "c"
tags = ["cs"]
dependents = ["a"]
"#,
            port = free_port(),
            url = redis.url()
        ),
    );
    let mut proc = Proc::spawn(
        "coordinator",
        &bin_path("coordinator"),
        &["--config".into(), config.display().to_string()],
        &[],
        dir.path().join("coordinator.log"),
    )
    .unwrap_or_else(|e| panic!("spawning the coordinator: {e:#}"));
    let status = proc.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}: {}", proc.log_tail()));
    let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
    assert!(!status.success(), "a coordinator with a rule cycle started (exit {status}): {log}");
    let named = ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"].iter().any(|c| log.contains(c));
    assert!(named, "the refusal does not name the cycle: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_health_lists_every_node_and_notices_a_dead_one() {
    let mut t = TestCluster::start(3, "node_dead_after_ms = 2000").await;
    let ids = ["agent-1", "agent-2", "agent-3"];
    let (all_synced, last) = poll(RECOVERY_DEADLINE, || async {
        let h = health(&t).await;
        (h["status"] == "ok" && ids.iter().all(|id| node(&h, id).is_some_and(|n| n["status"] == "synced")), h)
    })
    .await;
    assert!(all_synced, "not every node became synced: {last}");

    let h = &last;
    assert!(h["seq"].is_u64(), "seq is a number: {h}");
    assert!(h["redis"]["version"].is_string(), "redis.version is a string: {h}");
    assert!(h["redis"]["keyspace_hits"].is_number(), "redis.keyspace_hits is a number: {h}");
    assert!(h["coordinator"].is_object(), "coordinator section: {h}");
    assert_eq!(h["nodes"].as_array().map(Vec::len), Some(3), "exactly the three agents: {h}");
    for (i, id) in ids.iter().enumerate() {
        let n = node(h, id).unwrap_or_else(|| panic!("{id} missing: {h}"));
        for field in ["applied_seq", "lag", "last_seen_ms", "l1_entries", "l1_bytes"] {
            assert!(n[field].is_u64(), "{id}.{field} is a whole number: {n}");
        }
        assert!(n["hit_ratio"].is_number(), "{id}.hit_ratio is a number: {n}");
        assert_eq!(n["addr"], t.agent(i).addr.as_str(), "{id}.addr: {n}");
        assert_eq!(n["lag"], 0, "a synced node has no lag: {n}");
    }

    // A node killed without a word is reported dead, and the cluster degraded.
    t.cluster.agents[2].proc.kill();
    let (dead, last) = poll(RECOVERY_DEADLINE, || async {
        let h = health(&t).await;
        (h["status"] == "degraded" && node(&h, "agent-3").is_some_and(|n| n["status"] == "dead"), h)
    })
    .await;
    assert!(dead, "the killed agent was not reported dead with the cluster degraded: {last}");
    assert!(node(&last, "agent-1").is_some(), "a live node vanished: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_reports_its_state_and_counters() {
    let t = TestCluster::start(2, "").await;
    let status = |i: usize| {
        let t = &t;
        async move {
            let (code, body) = t.get_json(t.agent(i), "/v1/status").await;
            assert_eq!(code, 200, "status of agent {i}: {body}");
            body
        }
    };
    let before = status(1).await;
    assert_eq!(before["node_id"], "agent-2");
    assert_eq!(before["ready"], true, "{before}");
    assert!(before["epoch"].as_str().is_some_and(|e| !e.is_empty()), "epoch: {before}");
    assert!(before["applied_seq"].is_u64(), "applied_seq: {before}");
    for field in ["entries", "bytes", "capacity", "hits", "misses", "evictions"] {
        assert!(before["l1"][field].is_u64(), "l1.{field}: {before}");
    }
    for field in ["hits", "misses", "errors"] {
        assert!(before["l2"][field].is_u64(), "l2.{field}: {before}");
    }
    for field in ["applied", "replayed", "gaps_detected", "full_flushes"] {
        assert!(before["invalidations"][field].is_u64(), "invalidations.{field}: {before}");
    }
    assert_eq!(before["l1"]["capacity"], 256 * 1024 * 1024, "default l1_max_bytes: {before}");
    let n = |v: &Value, path: &[&str]| -> u64 {
        let mut cur = v;
        for p in path {
            cur = &cur[*p];
        }
        cur.as_u64().unwrap_or_else(|| panic!("{} is not a number in {v}", path.join(".")))
    };

    // A PUT through agent 0, then reads through agent 1: a miss on L1 and a hit
    // on L2, then two L1 hits; a key nobody stored misses both layers.
    t.put_ok(0, "acme", "status:k", "", "some bytes").await;
    assert_eq!(t.read(1, "acme", "status:k").await.1, "L2");
    assert_eq!(t.read(1, "acme", "status:k").await.1, "L1");
    assert_eq!(t.read(1, "acme", "status:k").await.1, "L1");
    assert_eq!(t.read(1, "acme", "status:missing").await.0, 404);
    let after = status(1).await;
    assert_eq!(n(&after, &["l1", "hits"]) - n(&before, &["l1", "hits"]), 2, "l1.hits: {before} -> {after}");
    assert_eq!(n(&after, &["l1", "misses"]) - n(&before, &["l1", "misses"]), 2, "l1.misses: {before} -> {after}");
    assert_eq!(n(&after, &["l2", "hits"]) - n(&before, &["l2", "hits"]), 1, "l2.hits: {before} -> {after}");
    assert_eq!(n(&after, &["l2", "misses"]) - n(&before, &["l2", "misses"]), 1, "l2.misses: {before} -> {after}");
    assert_eq!(n(&after, &["l2", "errors"]), 0, "l2.errors: {after}");
    assert_eq!(n(&after, &["l1", "entries"]), n(&before, &["l1", "entries"]) + 1, "l1.entries: {after}");
    assert!(n(&after, &["l1", "bytes"]) >= n(&before, &["l1", "bytes"]) + 10, "l1.bytes counts the value: {after}");
    let writer = status(0).await;
    assert!(n(&writer, &["l1", "entries"]) >= 1, "the writer holds its PUT in L1: {writer}");

    // An invalidation is applied and counted, and drops the entry.
    let answer = t.event(json!({"tenant": "acme", "entity": "x", "keys": ["status:k"]})).await;
    t.wait_applied("acme", seq(&answer)).await;
    let invalidated = status(1).await;
    assert!(n(&invalidated, &["applied_seq"]) >= seq(&answer), "applied_seq: {invalidated}");
    assert!(
        n(&invalidated, &["invalidations", "applied"]) > n(&before, &["invalidations", "applied"]),
        "invalidations.applied: {before} -> {invalidated}"
    );
    assert_eq!(n(&invalidated, &["l1", "entries"]), n(&before, &["l1", "entries"]), "l1.entries: {invalidated}");
    assert_eq!(invalidated["ready"], true, "{invalidated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_endpoint_shows_the_loaded_rules_and_graph() {
    let rules = r#"
[[rules]]
entity = "supplier"
tags = ["supplier:{id}", "suppliers"]
patterns = ["suppliers:list:*"]
dependents = ["supplier_payment", "purchase_order"]

[[rules]]
entity = "supplier_payment"
tags = ["supplier_payments"]
dependents = ["ledger"]
"#;
    let t = TestCluster::start(1, rules).await;
    let (status, body) = t.get_json(&t.cluster.coordinator, "/v1/rules").await;
    assert_eq!(status, 200, "{body}");
    let loaded = body["rules"].as_array().unwrap_or_else(|| panic!("rules is a list: {body}"));
    assert_eq!(loaded.len(), 2, "two rules loaded: {body}");
    let supplier = loaded.iter().find(|r| r["entity"] == "supplier").unwrap_or_else(|| panic!("supplier: {body}"));
    assert_eq!(supplier["tags"], json!(["supplier:{id}", "suppliers"]), "{supplier}");
    assert_eq!(supplier["patterns"], json!(["suppliers:list:*"]), "{supplier}");
    assert_eq!(supplier["dependents"], json!(["supplier_payment", "purchase_order"]), "{supplier}");
    let edges = body["graph"]["edges"].as_array().unwrap_or_else(|| panic!("graph.edges is a list: {body}"));
    let mut pairs: Vec<(String, String)> = edges
        .iter()
        .map(|e| (e["from"].as_str().unwrap_or("?").into(), e["to"].as_str().unwrap_or("?").into()))
        .collect();
    pairs.sort();
    let expected = [("supplier", "purchase_order"), ("supplier", "supplier_payment"), ("supplier_payment", "ledger")];
    let mut expected: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    expected.sort();
    assert_eq!(pairs, expected, "graph edges: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints() {
    let t = TestCluster::start(1, "").await;
    let http = client();
    for service in [t.agent(0), &t.cluster.coordinator] {
        let name = &service.proc.name;
        assert_eq!(get_json(&http, &service.url("/healthz")).await.0, 200, "{name} /healthz");
        assert_eq!(get_json(&http, &service.url("/readyz")).await.0, 200, "{name} /readyz");
    }

    // Traffic that makes every metric show up: a PUT, an L1 hit, an event applied.
    t.put_ok(0, "acme", "metrics:k", "", "v").await;
    assert_eq!(t.read(0, "acme", "metrics:k").await.1, "L1");
    let answer = t.event(json!({"tenant": "acme", "entity": "x", "keys": ["metrics:k"]})).await;
    t.wait_applied("acme", seq(&answer)).await;

    let resp = http.get(t.agent(0).url("/metrics")).send().await.expect("agent /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        header(&resp, "content-type").starts_with("text/plain"),
        "Prometheus text: {:?}",
        header(&resp, "content-type")
    );
    let text = resp.text().await.expect("agent metrics text");
    for name in [
        "dcc_cache_hits_total",
        "dcc_l1_bytes",
        "dcc_l1_entries",
        "dcc_l1_evictions_total",
        "dcc_invalidations_applied_total",
        "dcc_propagation_lag_seconds",
        "dcc_http_request_duration_seconds",
    ] {
        assert!(has_samples(&text, name), "agent /metrics lacks {name}:\n{text}");
    }
    assert!(sample(&text, "dcc_invalidations_applied_total").is_some_and(|v| v >= 1.0), "applied count:\n{text}");
    assert!(sample(&text, "dcc_propagation_lag_seconds_count").is_some_and(|v| v >= 1.0), "lag count:\n{text}");
    assert!(text.contains("dcc_cache_hits_total{layer=\"l1\"}"), "L1 hits by layer:\n{text}");

    let (status, text) = get_text(&http, &t.cluster.coordinator.url("/metrics")).await;
    assert_eq!(status, 200);
    for name in ["dcc_events_total", "dcc_http_request_duration_seconds"] {
        assert!(has_samples(&text, name), "coordinator /metrics lacks {name}:\n{text}");
    }
    assert!(sample(&text, "dcc_events_total").is_some_and(|v| v >= 1.0), "events counted:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_start_without_redis_and_become_ready_when_it_appears() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let redis_port = free_port();
    let url = format!("redis://127.0.0.1:{redis_port}");
    let agent = start_agent(dir.path(), &url, free_port(), "agent-1", "").expect("agent starts");
    let coordinator = start_coordinator(dir.path(), &url, free_port(), "").expect("coordinator starts");
    let http = client();
    for service in [&agent, &coordinator] {
        wait_status(&http, service, "/healthz", 200, RECOVERY_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{} without Redis: {e:#}", service.proc.name));
        let readyz = get_json(&http, &service.url("/readyz")).await;
        assert_error(&format!("{} /readyz without Redis", service.proc.name), &readyz, 503, "not_ready");
    }
    let read = get_json(&http, &agent.url("/v1/cache/acme/some-key")).await;
    assert_error("agent GET without Redis", &read, 503, "unavailable");
    let resp = http.put(agent.url("/v1/cache/acme/some-key")).body("v").send().await.expect("PUT without Redis");
    assert_eq!(resp.status().as_u16(), 503, "PUT without Redis");
    let (status, body) = {
        let resp = http
            .post(coordinator.url("/v1/events"))
            .json(&json!({"tenant": "acme", "entity": "x"}))
            .send()
            .await
            .expect("event without Redis");
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_error("event without Redis", &(status, body), 503, "unavailable");

    // Redis appears on that port: both become ready by themselves.
    let _redis = Redis::start_on(dir.path(), redis_port).await.unwrap_or_else(|e| panic!("redis: {e:#}"));
    for service in [&agent, &coordinator] {
        wait_status(&http, service, "/readyz", 200, RECOVERY_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{} after Redis appeared: {e:#}", service.proc.name));
    }
    let resp = http
        .put(agent.url("/v1/cache/acme/some-key"))
        .header("content-type", "text/plain")
        .body("now stored")
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 204, "PUT once Redis is up");
    let (status, body) = get_text(&http, &agent.url("/v1/cache/acme/some-key")).await;
    assert_eq!((status, body.as_str()), (200, "now stored"));
    let resp = http
        .post(coordinator.url("/v1/events"))
        .json(&json!({"tenant": "acme", "entity": "x", "keys": ["some-key"]}))
        .send()
        .await
        .expect("event");
    assert_eq!(resp.status().as_u16(), 200, "event once Redis is up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_makes_agents_unready_and_misses_answer_503_quickly() {
    let mut t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "held", "", "v").await;
    t.cluster.redis_mut().proc.kill();
    let http = client();
    for i in 0..2 {
        let agent = t.agent(i);
        wait_status(&http, agent, "/readyz", 503, RECOVERY_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("agent {i} still ready without Redis: {e:#}"));
        let readyz = get_json(&http, &agent.url("/readyz")).await;
        assert_error(&format!("agent {i} /readyz without Redis"), &readyz, 503, "not_ready");
        // A key not in L1 needs Redis: a JSON 503, not a hang (the client times out after 10 s).
        let read = get_json(&http, &agent.url("/v1/cache/acme/not-in-l1")).await;
        assert_error(&format!("agent {i} GET of a key not in L1"), &read, 503, "unavailable");
        // Agent 1 never held "held" in L1, so it cannot answer for it either.
        if i == 1 {
            let read = get_json(&http, &agent.url("/v1/cache/acme/held")).await;
            assert_error("agent 1 GET of a key only in L2", &read, 503, "unavailable");
        }
    }
    wait_status(&http, &t.cluster.coordinator, "/readyz", 503, RECOVERY_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("coordinator still ready without Redis: {e:#}"));
    let resp = http
        .post(t.cluster.coordinator.url("/v1/events"))
        .json(&json!({"tenant": "acme", "entity": "x"}))
        .send()
        .await
        .expect("event without Redis (no hang)");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_error("event without Redis", &(status, body), 503, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_the_agent_deregisters() {
    let mut t = TestCluster::start(2, "").await;
    let (both_listed, h) = poll(RECOVERY_DEADLINE, || async {
        let h = health(&t).await;
        (node(&h, "agent-1").is_some() && node(&h, "agent-2").is_some(), h)
    })
    .await;
    assert!(both_listed, "both agents listed: {h}");

    let status = t.cluster.agents[1].proc.terminate().unwrap_or_else(|e| panic!("agent-2 on SIGTERM: {e:#}"));
    assert!(status.success(), "agent-2 exit on SIGTERM: {status}; log:\n{}", t.agent(1).proc.log_tail());
    // It deregistered: gone from the nodes at once, not merely dead later.
    let (gone, last) = poll(Duration::from_secs(10), || async {
        let h = health(&t).await;
        (node(&h, "agent-2").is_none(), h)
    })
    .await;
    assert!(gone, "agent-2 is still listed after a clean shutdown: {last}");
    assert!(node(&last, "agent-1").is_some(), "agent-1 is still listed: {last}");

    let status = t.cluster.coordinator.proc.terminate().unwrap_or_else(|e| panic!("coordinator on SIGTERM: {e:#}"));
    assert!(status.success(), "coordinator exit on SIGTERM: {status}; log:\n{}", t.cluster.coordinator.proc.log_tail());
    // SIGINT works as well.
    t.cluster.agents[0].proc.signal(nix::sys::signal::Signal::SIGINT).expect("SIGINT to agent-1");
    let status = t.cluster.agents[0]
        .proc
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("agent-1 on SIGINT: {e:#}"));
    assert!(status.success(), "agent-1 exit on SIGINT: {status}");
}

/// Starts an agent binary with explicit args and env, and waits for `/healthz`.
async fn spawn_agent(dir: &Path, name: &str, args: &[String], env: &[(&str, String)], port: u16) -> Service {
    let proc = Proc::spawn(name, &bin_path("node-agent"), args, env, dir.join(format!("{name}.log")))
        .unwrap_or_else(|e| panic!("spawning {name}: {e:#}"));
    let service = Service { proc, addr: format!("127.0.0.1:{port}"), config: dir.join("agent.toml") };
    wait_status(&client(), &service, "/healthz", 200, RECOVERY_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{name} did not start: {e:#}"));
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_environment_beats_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let redis = Redis::start(dir.path()).await.unwrap_or_else(|e| panic!("redis: {e:#}"));
    let http = client();
    let file_port = free_port();
    let config = write(
        dir.path(),
        "agent.toml",
        &format!("bind = \"127.0.0.1:{file_port}\"\nredis_url = \"{}\"\nnode_id = \"from-file\"\n", redis.url()),
    );
    let config_arg = || vec!["--config".to_string(), config.display().to_string()];

    // The file alone.
    let agent = spawn_agent(dir.path(), "file", &config_arg(), &[], file_port).await;
    assert_eq!(get_json(&http, &agent.url("/v1/status")).await.1["node_id"], "from-file");
    drop(agent);

    // The environment beats the file (node id and bind address alike).
    let env_port = free_port();
    let env = [("DCC_AGENT_NODE_ID", "from-env".to_string()), ("DCC_AGENT_BIND", format!("127.0.0.1:{env_port}"))];
    let agent = spawn_agent(dir.path(), "env", &config_arg(), &env, env_port).await;
    assert_eq!(get_json(&http, &agent.url("/v1/status")).await.1["node_id"], "from-env");
    drop(agent);

    // A flag beats both.
    let flag_port = free_port();
    let mut args = config_arg();
    args.extend(["--node-id", "from-flag", "--bind", &format!("127.0.0.1:{flag_port}")].map(String::from));
    let agent = spawn_agent(dir.path(), "flag", &args, &env, flag_port).await;
    let (_, status) = get_json(&http, &agent.url("/v1/status")).await;
    assert_eq!(status["node_id"], "from-flag", "{status}");
    wait_status(&http, &agent, "/readyz", 200, RECOVERY_DEADLINE).await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// Waits for a "listening" line in `log` and returns the port it names.
async fn logged_port(proc: &Proc) -> u16 {
    let (_, port) = poll(RECOVERY_DEADLINE, || async {
        let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
        let port = log.lines().filter(|l| l.contains("listening")).find_map(|l| {
            let rest = &l[l.find("127.0.0.1:")? + "127.0.0.1:".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u16>().ok().filter(|p| *p != 0)
        });
        (port.is_some(), port)
    })
    .await;
    port.unwrap_or_else(|| panic!("{} logged no listening address with a port:\n{}", proc.name, proc.log_tail()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_port_zero_logs_the_chosen_address() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let redis = Redis::start(dir.path()).await.unwrap_or_else(|e| panic!("redis: {e:#}"));
    let http = client();
    for (binary, extra) in [("node-agent", vec!["--node-id", "zero"]), ("coordinator", vec![])] {
        let mut args: Vec<String> =
            ["--bind", "127.0.0.1:0", "--redis-url", &redis.url()].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(binary, &bin_path(binary), &args, &[], dir.path().join(format!("{binary}.log")))
            .unwrap_or_else(|e| panic!("spawning {binary}: {e:#}"));
        let port = logged_port(&proc).await;
        // The logged address is the real one.
        let service = Service { proc, addr: format!("127.0.0.1:{port}"), config: dir.path().join("none.toml") };
        wait_status(&http, &service, "/readyz", 200, RECOVERY_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{binary} on its logged port {port}: {e:#}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_makes_a_retry_a_duplicate_not_a_second_invalidation() {
    let t = TestCluster::start(2, "").await;
    let event = json!({"tenant": "acme", "entity": "supplier", "id": "9", "event_id": "order-9-update-1"});
    t.put_ok(0, "acme", "idem:k", "?tags=supplier:9", "v1").await;
    let first = t.event(event.clone()).await;
    assert_ne!(first["duplicate"], true, "the first delivery is not a duplicate: {first}");
    t.assert_gone_everywhere(seq(&first), "acme", "idem:k").await;

    // The key is stored again; a retry of the same event must not drop it.
    t.put_ok(0, "acme", "idem:k", "?tags=supplier:9", "v2").await;
    let second = t.event(event.clone()).await;
    assert_eq!(second["seq"], first["seq"], "a retry answers with the same seq: {first} / {second}");
    assert_eq!(second["duplicate"], true, "a retry is flagged as a duplicate: {second}");
    assert_eq!(health(&t).await["seq"], first["seq"], "a retry logged a new invalidation");
    // Agent 1 reads it from L2 (so L2 kept it), agent 0 from L1.
    assert_eq!(t.read(1, "acme", "idem:k").await, (200, "L2".into(), "v2".into()), "L2 after the retry");
    assert_eq!(t.read(0, "acme", "idem:k").await, (200, "L1".into(), "v2".into()), "L1 after the retry");

    // The same event_id in another tenant is another event.
    let other =
        t.event(json!({"tenant": "globex", "entity": "supplier", "id": "9", "event_id": "order-9-update-1"})).await;
    assert_ne!(other["duplicate"], true, "event ids are per tenant: {other}");
    assert_ne!(other["positions"], first["positions"], "{other}");
    // A new event_id is a new event.
    let mut fresh = event;
    fresh["event_id"] = json!("order-9-update-2");
    let third = t.event(fresh).await;
    assert_ne!(third["duplicate"], true, "{third}");
    t.assert_gone_everywhere(seq(&third), "acme", "idem:k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_repair_missed_invalidations_after_losing_their_subscription() {
    let t = TestCluster::start(2, "").await;
    let mut redis = t.cluster.redis().connection().await.expect("a Redis connection");
    let http = client();
    for round in 0..3 {
        let key = format!("repair:{round}");
        t.put_ok(0, "acme", &key, "", "old").await;
        t.warm("acme", &key).await;

        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut redis)
            .await
            .expect("CLIENT KILL TYPE pubsub");
        let answer = t.invalidate(json!({"tenant": "acme", "keys": [key]})).await;
        assert!(killed >= 2, "round {round}: both agents' subscriptions were killed ({killed})");

        for i in 0..2 {
            let agent = t.agent(i);
            let (gone, last) = poll(RECOVERY_DEADLINE, || async {
                let read = t.read(i, "acme", &key).await;
                (read.0 == 404, read)
            })
            .await;
            assert!(gone, "round {round}: agent {i} still serves {key} after seq {}: {last:?}", seq(&answer));
            // Once it is ready again (trusting its L1), the key stays gone.
            wait_status(&http, agent, "/readyz", 200, RECOVERY_DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("round {round}: agent {i} not ready again: {e:#}"));
            let (status, layer, body) = t.read(i, "acme", &key).await;
            assert_eq!(status, 404, "round {round}: agent {i} serves {key} from {layer} once ready: {body}");
        }
        t.wait_applied("acme", seq(&answer)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_explorer_pages_through_a_tenants_keys_once_each() {
    let t = TestCluster::start(1, "").await;
    // 250 keys (past the size where Redis keeps the index as one small
    // listpack that one ZSCAN returns whole), one with tags, and keys that
    // must not be listed: another tenant's, and one the pattern excludes.
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..250 {
        let key = format!("item:{i}");
        let query = if i == 7 { "?tags=red,blue&ttl=600" } else { "" };
        t.put_ok(0, "acme", &key, query, &"x".repeat(i % 10 + 1)).await;
        expected.insert(key);
    }
    t.put_ok(0, "acme", "other:1", "", "v").await;
    t.put_ok(0, "globex", "item:1", "", "v").await;

    let url = |query: &str| t.cluster.coordinator.url(&format!("/v1/keys/acme{query}"));
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            None => "?pattern=item:*&limit=40".to_string(),
            Some(c) => format!("?pattern=item:*&limit=40&cursor={c}"),
        };
        let (status, page) = get_json(&t.http, &url(&query)).await;
        assert_eq!(status, 200, "{page}");
        let keys = page["keys"].as_array().unwrap_or_else(|| panic!("no keys in {page}"));
        assert!(keys.len() <= 40, "a page over its limit: {}", keys.len());
        for k in keys {
            let key = k["key"].as_str().unwrap_or_else(|| panic!("no key in {k}")).to_string();
            if key == "item:7" {
                assert_eq!(k["tags"], json!(["red", "blue"]), "{k}");
                assert_eq!(k["bytes"], 8, "{k}");
                let ttl = k["ttl_secs"].as_u64().unwrap_or(0);
                assert!(ttl > 500 && ttl <= 600, "{k}");
            }
            listed.push(key);
        }
        pages += 1;
        assert!(pages < 100, "the cursor never ends");
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(page["cursor"].is_null(), "{page}");
                break;
            }
        }
    }
    let unique: std::collections::BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "a key was listed twice");
    assert_eq!(unique, expected, "the pages did not list exactly the tenant's item:* keys");
    assert!(pages >= 7, "250 keys in pages of 40 took {pages} pages");

    // Without a pattern: every key of the tenant, the other one too.
    let (status, page) = get_json(&t.http, &url("?limit=1000")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["keys"].as_array().map(Vec::len), Some(251), "{page}");
    // An invalidated key is no longer listed.
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["item:7"]})).await;
    assert!(seq(&answer) > 0);
    let (_, page) = get_json(&t.http, &url("?pattern=item:7")).await;
    assert_eq!(page["keys"], json!([]), "{page}");

    // Bad input: a JSON 400 each.
    for query in ["?cursor=nonsense", "?cursor=1.2.3", "?limit=0", "?limit=1001", "?pattern=a[b", "?bogus=1"] {
        let (status, body) = get_json(&t.http, &url(query)).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("invalid_")), "{query}: {body}");
    }
    for path in ["/v1/keys/a%20b", "/v1/keys/%FF"] {
        let (status, body) = get_json(&t.http, &t.cluster.coordinator.url(path)).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid_tenant")), "{path}: {body}");
    }
}
