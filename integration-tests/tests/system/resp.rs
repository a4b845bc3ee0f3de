//! The agent's Redis protocol port (`resp_bind`), driven by real Redis
//! clients: the `redis` crate's async client (RESP2 and RESP3), `redis-cli`
//! and `redis-benchmark`. The port serves the agent's own cache, so what it
//! answers must follow every invalidation the HTTP API's answers follow.

use std::process::Command;

use integration_tests::{free_port, which, ClusterOptions};
use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Value as RedisValue};
use serde_json::json;

use crate::{token_toml, wait_until, TestCluster, PROPAGATION_DEADLINE};

/// A one-agent cluster whose agent serves the Redis protocol on a free port;
/// `extra` goes after `resp_bind` in the agent's config.
async fn cluster_with_port(extra: &str) -> (TestCluster, u16) {
    let port = free_port();
    let agent_toml = format!("resp_bind = \"127.0.0.1:{port}\"\n{extra}");
    let t = TestCluster::with(ClusterOptions { agents: 1, agent_toml, ..ClusterOptions::default() }).await;
    (t, port)
}

async fn connect(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn get(con: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// The error a command answers (it must answer one).
async fn error_of(con: &mut MultiplexedConnection, cmd: &mut redis::Cmd) -> String {
    let answer: RedisResult<RedisValue> = cmd.query_async(con).await;
    match answer {
        Err(e) => e.to_string(),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test]
async fn a_redis_client_gets_the_agents_cache_and_its_coherence() {
    let (t, port) = cluster_with_port("resp_default_tenant = \"acme\"\n").await;
    let mut con = connect(&format!("redis://127.0.0.1:{port}")).await;

    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap_or_default();
    assert_eq!(pong, "PONG");
    assert_eq!(get(&mut con, "supplier:1").await, None, "nothing is cached yet");

    // SET through the port is a PUT of the default tenant: HTTP sees it.
    let ok: String =
        redis::cmd("SET").arg("supplier:1").arg("v1").arg("EX").arg(60).query_async(&mut con).await.unwrap_or_default();
    assert_eq!(ok, "OK");
    assert_eq!(get(&mut con, "supplier:1").await.as_deref(), Some("v1"));
    let (status, _, body) = t.read(0, "acme", "supplier:1").await;
    assert_eq!((status, body.as_str()), (200, "v1"), "the HTTP API serves what SET stored");

    let values: Vec<Option<String>> =
        redis::cmd("MGET").arg("supplier:1").arg("supplier:2").query_async(&mut con).await.unwrap_or_default();
    assert_eq!(values, vec![Some("v1".to_string()), None]);
    let exists: i64 =
        redis::cmd("EXISTS").arg("supplier:1").arg("supplier:2").query_async(&mut con).await.unwrap_or(-9);
    assert_eq!(exists, 1);
    let ttl: i64 = redis::cmd("TTL").arg("supplier:1").query_async(&mut con).await.unwrap_or(-9);
    assert!((1..=60).contains(&ttl), "TTL {ttl}");
    let pttl: i64 = redis::cmd("PTTL").arg("supplier:1").query_async(&mut con).await.unwrap_or(-9);
    assert!((1..=60_000).contains(&pttl), "PTTL {pttl}");
    let missing: i64 = redis::cmd("TTL").arg("supplier:2").query_async(&mut con).await.unwrap_or(-9);
    assert_eq!(missing, -2);

    // NX and XX as in Redis.
    let nx: Option<String> =
        redis::cmd("SET").arg("supplier:1").arg("other").arg("NX").query_async(&mut con).await.unwrap_or_default();
    assert_eq!(nx, None, "NX does not overwrite a cached key");
    let xx: Option<String> =
        redis::cmd("SET").arg("supplier:3").arg("other").arg("XX").query_async(&mut con).await.unwrap_or_default();
    assert_eq!(xx, None, "XX does not create a key");
    assert_eq!(get(&mut con, "supplier:3").await, None);

    // An invalidation by the coordinator reaches what the port serves.
    t.put_ok(0, "acme", "supplier:4", "?tags=suppliers", "tagged").await;
    assert_eq!(get(&mut con, "supplier:4").await.as_deref(), Some("tagged"));
    let (status, body) = t.coordinator_post("/v1/invalidate", json!({"tenant": "acme", "tags": ["suppliers"]})).await;
    assert_eq!(status, 200, "{body}");
    let gone = wait_until(PROPAGATION_DEADLINE, || {
        let mut con = con.clone();
        async move { get(&mut con, "supplier:4").await.is_none() }
    })
    .await;
    assert!(gone, "the tag's invalidation never reached the port's answers");

    // A fill that raced an invalidation is refused: GET misses (the port
    // keeps the fill token), the key is invalidated, then the SET of what was
    // read before the invalidation must not be stored.
    assert_eq!(get(&mut con, "supplier:5").await, None);
    let (status, body) = t.coordinator_post("/v1/invalidate", json!({"tenant": "acme", "keys": ["supplier:5"]})).await;
    assert_eq!(status, 200, "{body}");
    let refused = error_of(&mut con, redis::cmd("SET").arg("supplier:5").arg("stale")).await;
    assert!(refused.contains("stale_fill"), "{refused}");
    assert_eq!(get(&mut con, "supplier:5").await, None, "the stale value was not stored");
    // The next miss gives a fresh token, and that fill is stored.
    assert_eq!(get(&mut con, "supplier:5").await, None);
    let ok: String = redis::cmd("SET").arg("supplier:5").arg("fresh").query_async(&mut con).await.unwrap_or_default();
    assert_eq!(ok, "OK");

    // DEL is an invalidation: gone from the HTTP API too.
    let deleted: i64 = redis::cmd("DEL").arg("supplier:1").arg("supplier:9").query_async(&mut con).await.unwrap_or(-9);
    assert_eq!(deleted, 1, "one of the two keys was cached");
    let (status, _, _) = t.read(0, "acme", "supplier:1").await;
    assert_eq!(status, 404);

    // Errors are Redis errors, and the connection goes on.
    let unknown = error_of(&mut con, redis::cmd("FLUSHALL").arg("ASYNC")).await;
    assert!(unknown.contains("unknown command"), "{unknown}");
    let select = error_of(&mut con, redis::cmd("SELECT").arg(1)).await;
    assert!(select.contains("out of range"), "{select}");
    let syntax = error_of(&mut con, redis::cmd("SET").arg("k").arg("v").arg("NX").arg("XX")).await;
    assert!(syntax.contains("syntax error"), "{syntax}");
    let bad_key = error_of(&mut con, redis::cmd("GET").arg("bad\nkey")).await;
    assert!(bad_key.contains("invalid_key"), "{bad_key}");
    assert_eq!(get(&mut con, "supplier:5").await.as_deref(), Some("fresh"));

    // RESP3 (HELLO 3): the same cache, nil as RESP3's null.
    let mut con3 = connect(&format!("redis://127.0.0.1:{port}/?protocol=resp3")).await;
    assert_eq!(get(&mut con3, "supplier:5").await.as_deref(), Some("fresh"));
    assert_eq!(get(&mut con3, "supplier:404").await, None);

    // The agent counts what the port served.
    let metrics = t.http.get(t.agent(0).url("/metrics")).send().await.unwrap_or_else(|e| panic!("{e}"));
    let text = metrics.text().await.unwrap_or_default();
    assert!(text.contains("dcc_resp_commands_total{command=\"get\"}"), "no RESP counters in /metrics");
}

#[tokio::test]
async fn the_port_takes_the_tenant_from_auth_and_checks_the_token() {
    let tokens = token_toml("acme-app", "acme-secret", "[\"acme\"]", "[\"read\", \"write\", \"invalidate\"]");
    let (_t, port) = cluster_with_port(&tokens).await;

    // No AUTH: refused as Redis refuses.
    let mut anonymous = connect(&format!("redis://127.0.0.1:{port}")).await;
    let refused = error_of(&mut anonymous, redis::cmd("GET").arg("k")).await;
    assert!(refused.contains("NOAUTH"), "{refused}");

    // A wrong secret: the client cannot connect (it sends AUTH on connect).
    let client = redis::Client::open(format!("redis://acme:wrong@127.0.0.1:{port}")).unwrap_or_else(|e| panic!("{e}"));
    let wrong = client.get_multiplexed_async_connection().await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(wrong.contains("WRONGPASS") || wrong.to_lowercase().contains("password"), "{wrong:?}");

    // The user name is the tenant; the token must cover it.
    let mut acme = connect(&format!("redis://acme:acme-secret@127.0.0.1:{port}")).await;
    let ok: String = redis::cmd("SET").arg("k").arg("mine").query_async(&mut acme).await.unwrap_or_default();
    assert_eq!(ok, "OK");
    assert_eq!(get(&mut acme, "k").await.as_deref(), Some("mine"));
    let mut globex = connect(&format!("redis://globex:acme-secret@127.0.0.1:{port}")).await;
    let forbidden = error_of(&mut globex, redis::cmd("GET").arg("k")).await;
    assert!(forbidden.to_lowercase().contains("noperm") && forbidden.contains("globex"), "{forbidden}");
}

#[tokio::test]
async fn redis_cli_and_redis_benchmark_work_against_the_port() {
    let (Some(cli), Some(benchmark)) = (which("redis-cli"), which("redis-benchmark")) else {
        panic!("redis-cli and redis-benchmark are missing: run make test (it installs redis-tools)");
    };
    let (t, port) = cluster_with_port("resp_default_tenant = \"bench\"\n").await;
    let cli_run = |args: &[&str]| {
        let out = Command::new(&cli)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli_run(&["SET", "greeting", "hello", "EX", "30"]), "OK");
    assert_eq!(cli_run(&["GET", "greeting"]), "hello");
    assert_eq!(cli_run(&["EXISTS", "greeting"]), "1");
    let (status, _, body) = t.read(0, "bench", "greeting").await;
    assert_eq!((status, body.as_str()), (200, "hello"));

    // redis-benchmark's own GET and SET tests: every request answered.
    let out = Command::new(&benchmark)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set,get", "-n", "2000", "-c", "4", "-q"])
        .output()
        .unwrap_or_else(|e| panic!("redis-benchmark: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stdout} {stderr}");
    assert!(stdout.contains("SET:") && stdout.contains("GET:"), "redis-benchmark printed: {stdout} {stderr}");
    assert!(!stdout.contains("Error") && !stderr.contains("Error from server"), "{stdout} {stderr}");
    // What it stored is in the agent's cache (`key:__rand_int__` is `key:000000000000` with -n and no -r).
    assert_eq!(cli_run(&["EXISTS", "key:__rand_int__"]), "1");
}
