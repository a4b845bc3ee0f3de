//! `GET /v1/stats` on a real cluster: the per-tenant figures the agents send
//! in their heartbeats, added up over the agents; the most read keys; each
//! recommendation, brought about by a workload made for it; and tenant scopes.
//!
//! Figures reach the coordinator with the agents' next heartbeats, so every
//! check polls until the figures are there (or a generous deadline passes).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{token_toml, wait_until, TestCluster, PROPAGATION_DEADLINE};

const OPS: &str = "stats-ops-secret";
const ACME_READER: &str = "stats-acme-reader-secret";

/// How long figures may take to reach `/v1/stats` (a few heartbeats on a busy machine).
const REPORT_DEADLINE: Duration = Duration::from_secs(20);

/// `GET /v1/stats{query}` on the coordinator as `secret`: (status, body).
async fn stats(t: &TestCluster, secret: Option<&str>, query: &str) -> (StatusCode, Value) {
    let mut request = t.http.get(t.cluster.coordinator.url(&format!("/v1/stats{query}")));
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    let resp = request.send().await.unwrap_or_else(|e| panic!("GET /v1/stats: {e}"));
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The figures of `tenant` in a `/v1/stats` answer (null when absent).
fn tenant<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["tenants"].as_array().and_then(|all| all.iter().find(|t| t["tenant"] == name)).unwrap_or(&Value::Null)
}

/// The recommendations of `kind` for `tenant`.
fn recommended<'a>(stats: &'a Value, name: &str, kind: &str) -> Vec<&'a Value> {
    stats["recommendations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["tenant"] == name && r["kind"] == kind)
        .collect()
}

/// Polls `/v1/stats` (as admin, or anonymously without tokens) until `check` holds; returns the last answer.
async fn stats_until(t: &TestCluster, secret: Option<&str>, check: impl Fn(&Value) -> bool) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    let found = wait_until(REPORT_DEADLINE, || async {
        let (status, body) = stats(t, secret, "").await;
        let holds = status == StatusCode::OK && check(&body);
        *last.borrow_mut() = body;
        holds
    })
    .await;
    let last = last.into_inner();
    assert!(found, "/v1/stats never showed what was expected: {last:#}");
    last
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_add_up_over_the_agents_with_the_most_read_keys_and_tenant_scopes() {
    let tokens = [
        token_toml("ops", OPS, "[]", r#"["admin"]"#),
        token_toml("acme-reader", ACME_READER, r#"["acme"]"#, r#"["read"]"#),
    ]
    .concat();
    let t = TestCluster::with(integration_tests::ClusterOptions {
        agents: 2,
        coordinator_toml: tokens,
        ..integration_tests::ClusterOptions::default()
    })
    .await;

    // Reads through both agents; what each answered (X-Cache) is what the stats must add up to.
    t.put_ok(0, "acme", "user:1", "", "alice").await;
    t.put_ok(1, "acme", "order:7", "", "seven").await;
    t.put_ok(0, "globex", "item:1", "", "widget").await;
    let (mut l1, mut l2, mut misses) = (0u64, 0u64, 0u64);
    let mut tally = |(status, layer, _): (u16, String, String)| match (status, layer.as_str()) {
        (200, "L1") => l1 += 1,
        (200, _) => l2 += 1,
        _ => misses += 1,
    };
    for i in 0..12 {
        tally(t.read(i % 2, "acme", "user:1").await);
    }
    for i in 0..4 {
        tally(t.read(i % 2, "acme", "order:7").await);
    }
    for i in 0..2 {
        tally(t.read(i, "acme", "absent:1").await);
    }
    t.read(1, "globex", "item:1").await;
    assert_eq!(misses, 2, "only absent:1 is missing");

    let all = stats_until(&t, Some(OPS), |s| {
        let a = tenant(s, "acme");
        n(&a["l1_hits"]) + n(&a["l2_hits"]) + n(&a["misses"]) == 18 && n(&tenant(s, "globex")["l2_hits"]) == 1
    })
    .await;
    let acme = tenant(&all, "acme");
    assert_eq!((n(&acme["l1_hits"]), n(&acme["l2_hits"]), n(&acme["misses"])), (l1, l2, misses), "{acme:#}");
    assert_eq!(n(&all["nodes"]), 2, "both agents' reports are counted: {all:#}");
    assert_eq!(n(&acme["nodes"]), 2, "{acme:#}");
    let ratio = acme["hit_ratio"].as_f64().unwrap_or(-1.0);
    assert!((ratio - 16.0 / 18.0).abs() < 1e-9, "hit ratio {ratio}: {acme:#}");
    // Each agent holds what was PUT through it or read from L2 through it.
    assert!(n(&acme["entries"]) >= 2 && n(&acme["bytes"]) > 0, "{acme:#}");
    for field in ["invalidations", "fills_refused"] {
        assert!(acme[field].is_u64(), "{field}: {acme:#}");
    }
    let top: Vec<(&str, u64)> = acme["top_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| (k["key"].as_str().unwrap_or_default(), n(&k["reads"])))
        .collect();
    assert_eq!(top, [("user:1", 12), ("order:7", 4), ("absent:1", 2)], "{acme:#}");

    // A tenant-scoped token sees its tenant only; another tenant is refused by name.
    let (status, mine) = stats(&t, Some(ACME_READER), "").await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    let names: Vec<&str> =
        mine["tenants"].as_array().into_iter().flatten().filter_map(|t| t["tenant"].as_str()).collect();
    assert_eq!(names, ["acme"], "{mine:#}");
    assert!(mine["recommendations"].as_array().into_iter().flatten().all(|r| r["tenant"] == "acme"), "{mine:#}");
    let (status, only) = stats(&t, Some(ACME_READER), "?tenant=acme").await;
    assert_eq!((status, tenant(&only, "acme")["tenant"].as_str()), (StatusCode::OK, Some("acme")), "{only}");
    let (status, refused) = stats(&t, Some(ACME_READER), "?tenant=globex").await;
    assert_eq!((status, refused["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{refused}");
    let (status, filtered) = stats(&t, Some(OPS), "?tenant=globex").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(filtered["tenants"].as_array().map(Vec::len), Some(1), "{filtered}");
    // No token: 401; bad input: 400 JSON errors.
    let (status, body) = stats(&t, None, "").await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{body}");
    for query in ["?tenant=not%20a%20tenant", "?tenant=", "?bogus=1"] {
        let (status, body) = stats(&t, Some(OPS), query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["error"].is_string(), "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_tag_recommendations_follow_the_workloads_made_for_them() {
    let t = TestCluster::start(2, "").await;

    // ttl_too_short: session keys are read again only after their 1 s TTL
    // ran out, so every read misses and is filled again.
    let keys: Vec<String> = (0..5).map(|i| format!("session:{i}")).collect();
    let redis = t.cluster.redis_conn().await.expect("redis");
    for round in 0..5 {
        for key in &keys {
            let (status, layer, _) = t.read(0, "ttlco", key).await;
            assert_eq!(status, 404, "round {round}: {key} should have expired (answered from {layer})");
            t.put_ok(0, "ttlco", key, "?ttl=1", "s").await;
        }
        // L1 set each entry's expiry before its PUT answered: a second after
        // the last answer, every one has expired, in L1 and in Redis.
        let all_expired_after = Instant::now() + Duration::from_secs(1);
        let expired = wait_until(PROPAGATION_DEADLINE, || {
            let mut redis = redis.clone();
            let names: Vec<String> = keys.iter().map(|k| crate::entry_key("ttlco", k)).collect();
            async move {
                let mut held = 0u64;
                for name in names {
                    held += redis::cmd("EXISTS").arg(name).query_async::<u64>(&mut redis).await.unwrap_or(1);
                }
                held == 0 && Instant::now() >= all_expired_after
            }
        })
        .await;
        assert!(expired, "the session keys did not expire");
    }

    // tag_invalidated_too_often: every price is filled on both agents and
    // invalidated by its tag before anyone reads it from L1.
    for round in 0..6 {
        t.put_ok(0, "tagco", "price:1", "?tags=prices", "9.99").await;
        let (status, _, _) = t.read(1, "tagco", "price:1").await;
        assert_eq!(status, 200, "round {round}");
        let (status, answer) =
            t.coordinator_post("/v1/invalidate?wait=all", json!({"tenant": "tagco", "tags": ["prices"]})).await;
        assert_eq!(status, 200, "{answer}");
    }

    // A tenant cached as it should be: written once, read often.
    t.put_ok(0, "hotco", "item:1", "?ttl=600", "hot").await;
    for i in 0..30 {
        assert_eq!(t.read(i % 2, "hotco", "item:1").await.0, 200);
    }

    let all = stats_until(&t, None, |s| {
        !recommended(s, "ttlco", "ttl_too_short").is_empty()
            && !recommended(s, "tagco", "tag_invalidated_too_often").is_empty()
            && n(&tenant(s, "hotco")["l1_hits"]) + n(&tenant(s, "hotco")["l2_hits"]) == 30
    })
    .await;

    let ttl = recommended(&all, "ttlco", "ttl_too_short")[0];
    assert_eq!(ttl["prefix"], "session", "{ttl:#}");
    assert_eq!(n(&ttl["ttl_ms"]), 1000, "{ttl:#}");
    assert!(n(&ttl["typical_gap_ms"]) > 1000, "{ttl:#}");
    assert!(n(&ttl["reads"]) >= 25 && n(&ttl["hits"]) == 0, "{ttl:#}");
    assert!(ttl["message"].as_str().is_some_and(|m| m.contains("session")), "{ttl:#}");

    let tag = recommended(&all, "tagco", "tag_invalidated_too_often")[0];
    assert_eq!(tag["tag"], "prices", "{tag:#}");
    assert_eq!(n(&tag["invalidations"]), 6, "every agent applies each one; counted once: {tag:#}");
    // Six fills on agent 0 (its PUTs), and on agent 1 from L2 unless it was out of sync.
    assert!((6..=12).contains(&n(&tag["fills"])), "{tag:#}");
    assert_eq!(n(&tag["hits"]), 0, "{tag:#}");
    assert_eq!(n(&tenant(&all, "tagco")["invalidations"]), 6, "{all:#}");

    let hot: Vec<&Value> =
        all["recommendations"].as_array().into_iter().flatten().filter(|r| r["tenant"] == "hotco").collect();
    assert!(hot.is_empty(), "nothing to change for a well cached tenant: {hot:?}");
    assert!(recommended(&all, "ttlco", "tag_invalidated_too_often").is_empty(), "{all:#}");

    // Tenants stay off Prometheus labels unless the operator asks (`[metrics] tenant_labels`).
    let metrics = metrics_text(&t, 0).await;
    assert!(metrics.contains("dcc_cache_hits_total") && !metrics.contains("tenant="), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l1_that_evicts_entries_before_their_first_hit_is_too_small() {
    let t = TestCluster::with(integration_tests::ClusterOptions {
        agents: 1,
        agent_toml: "l1_max_bytes = 65536\n\n[metrics]\ntenant_labels = true\n".into(),
        ..integration_tests::ClusterOptions::default()
    })
    .await;
    // 200 values of 4 KiB through a 64 KiB L1, none read back.
    let value = "v".repeat(4096);
    for i in 0..200 {
        t.put_ok(0, "bigco", &format!("blob:{i}"), "", &value).await;
    }
    let all = stats_until(&t, None, |s| !recommended(s, "bigco", "l1_too_small").is_empty()).await;
    let r = recommended(&all, "bigco", "l1_too_small")[0];
    assert!(n(&r["evictions"]) >= 10, "{r:#}");
    assert!(n(&r["evicted_unread"]) * 2 >= n(&r["evictions"]), "{r:#}");
    let bigco = tenant(&all, "bigco");
    assert!(n(&bigco["bytes"]) <= 65536, "L1 holds no more than its capacity: {bigco:#}");
    assert!(n(&bigco["evictions"]) >= n(&r["evictions"]), "{bigco:#}");

    // Asked for, /metrics has the tenant's hits and misses with a tenant label.
    t.put_ok(0, "bigco", "small:1", "", "s").await;
    assert_eq!(t.read(0, "bigco", "small:1").await.0, 200);
    assert_eq!(t.read(0, "bigco", "absent:1").await.0, 404);
    let metrics = metrics_text(&t, 0).await;
    // From L1, or from L2 if the full L1 did not admit it.
    let hits: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("dcc_tenant_cache_hits_total{") && l.contains(r#"tenant="bigco""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(hits, 1.0, "{metrics}");
    assert!(metrics.contains(r#"dcc_tenant_cache_misses_total{tenant="bigco"} 1"#), "{metrics}");
}

/// Agent `i`'s `/metrics`.
async fn metrics_text(t: &TestCluster, i: usize) -> String {
    let resp = t.http.get(t.agent(i).url("/metrics")).send().await.unwrap_or_else(|e| panic!("/metrics: {e}"));
    resp.text().await.unwrap_or_default()
}
