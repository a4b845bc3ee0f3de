//! The features cache users expect (contract v2, section 4): miss leases
//! against herds; stale-if-error; TTL tiers and the jitter of default TTLs, seen through
//! `X-Cache-TTL`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::ClusterOptions;
use nix::sys::signal::Signal;
use serde_json::json;

use crate::{header, wait_until, TestCluster};

/// A cluster whose agents have these lease settings (on one redis-server,
/// which the tests read the lease from).
async fn leased(agents: usize, lease_ms: u64, lease_wait_ms: u64) -> TestCluster {
    TestCluster::with(ClusterOptions {
        agents,
        agent_toml: format!("lease_ms = {lease_ms}\nlease_wait_ms = {lease_wait_ms}\n"),
        redis: Some("single"),
        ..ClusterOptions::default()
    })
    .await
}

/// Whether an agent waits on the key's lease (it marks the lease waited for).
async fn someone_waits(t: &TestCluster, tenant: &str, key: &str) -> bool {
    let lease = shared::schema::Layout::default().of(tenant).lease(tenant, key);
    let mut conn = t.cluster.redis().connection().await.expect("redis");
    let waited: Option<String> = redis::cmd("HGET").arg(&lease).arg("w").query_async(&mut conn).await.expect("HGET");
    waited.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_on_three_agents_make_one_load() {
    // Waits long enough that a starved machine still sees the one load
    // through; the lease outlives the slowest load.
    let t = Arc::new(leased(3, 30_000, 20_000).await);
    let loads = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..100 {
        let (t, loads) = (t.clone(), loads.clone());
        callers.push(tokio::spawn(async move {
            let resp = t.get(i % 3, "acme", "cold").await;
            match resp.status().as_u16() {
                200 => resp.text().await.unwrap_or_default(),
                404 => {
                    // This caller loads from "the database", slowly, and fills.
                    loads.fetch_add(1, Ordering::SeqCst);
                    let token = header(&resp, "x-cache-fill-token");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    t.put_ok(i % 3, "acme", "cold", &format!("?fill_token={token}"), "loaded once").await;
                    "loaded once".to_string()
                }
                other => panic!("GET answered {other}"),
            }
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.expect("caller"), "loaded once", "every caller ends with the value");
    }
    let loads = loads.load(Ordering::SeqCst);
    assert!((1..=2).contains(&loads), "100 concurrent misses over 3 agents made {loads} loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_that_never_fills_blocks_the_key_only_for_lease_ms() {
    let t = leased(2, 1500, 30_000).await;
    let first = t.get(0, "acme", "orphan").await;
    assert_eq!(first.status().as_u16(), 404);
    let orphaned = header(&first, "x-cache-fill-token");
    // The holder never fills. A miss on the other agent waits for the lease
    // to lapse, then gets a token of its own.
    let started = Instant::now();
    let second = t.get(1, "acme", "orphan").await;
    let waited = started.elapsed();
    assert_eq!(second.status().as_u16(), 404);
    let own = header(&second, "x-cache-fill-token");
    assert!(!own.is_empty() && own != orphaned, "a token of its own: {own} vs {orphaned}");
    assert!(waited >= Duration::from_millis(1000), "it waited for the lease (1500 ms), not {waited:?}");
    t.put_ok(1, "acme", "orphan", &format!("?fill_token={own}"), "filled late").await;
    assert_eq!(t.read(0, "acme", "orphan").await.2, "filled late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_lease_refuses_the_old_fill_and_its_waiters_never_see_it() {
    let t = Arc::new(leased(2, 30_000, 30_000).await);
    let first = t.get(0, "acme", "supplier:42").await;
    assert_eq!(first.status().as_u16(), 404);
    let old_token = header(&first, "x-cache-fill-token");
    let waiter = {
        let t = t.clone();
        tokio::spawn(async move {
            let resp = t.get(1, "acme", "supplier:42").await;
            let status = resp.status().as_u16();
            let token = header(&resp, "x-cache-fill-token");
            (status, token, resp.text().await.unwrap_or_default())
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || someone_waits(&t, "acme", "supplier:42")).await,
        "the second miss waits on the lease"
    );
    // The database changes; the holder's load read the old row.
    let (status, answer) =
        t.coordinator_post("/v1/invalidate?wait=all", json!({"tenant": "acme", "keys": ["supplier:42"]})).await;
    assert_eq!(status, 200, "{answer}");
    let refused = t.put(0, "acme", "supplier:42", &format!("?fill_token={old_token}"), "old row").await;
    assert_eq!(refused.status().as_u16(), 409, "the fill from before the invalidation is refused");
    let (status, token, body) = waiter.await.expect("waiter");
    assert_eq!(status, 404, "the waiter gets a fresh miss, not the old value: {body}");
    assert!(!token.is_empty() && token != old_token, "with a token of its own");
    t.put_ok(1, "acme", "supplier:42", &format!("?fill_token={token}"), "new row").await;
    assert_eq!(t.read(0, "acme", "supplier:42").await.2, "new row");

    // Both show in the tenant's figures, cluster-wide.
    let counted = wait_until(Duration::from_secs(30), || async {
        let (_, stats) = t.get_json(&t.cluster.coordinator, "/v1/stats?tenant=acme").await;
        let acme = &stats["tenants"][0];
        acme["lease_waits"].as_u64() >= Some(1) && acme["stale_fills"].as_u64() >= Some(1)
    })
    .await;
    assert!(counted, "/v1/stats counts the lease wait and the refused fill of acme");
}

/// Tiers: acme's sessions, everyone's sessions, reports; 20% jitter.
const TIERS: &str = "ttl_jitter = 0.2\n\
    [[ttl]]\npattern = \"session:*\"\ntenant = \"acme\"\ndefault_secs = 100\nmax_secs = 200\n\
    [[ttl]]\npattern = \"session:*\"\ndefault_secs = 1000\n\
    [[ttl]]\npattern = \"report:*\"\ndefault_secs = 5000\nmax_secs = 6000\n";

/// The `X-Cache-TTL` agent `i` answers for a key (which must be cached).
async fn ttl_left(t: &TestCluster, i: usize, tenant: &str, key: &str) -> u64 {
    let resp = t.get(i, tenant, key).await;
    assert_eq!(resp.status().as_u16(), 200, "GET {tenant}/{key}");
    header(&resp, "x-cache-ttl").parse().unwrap_or_else(|_| panic!("X-Cache-TTL of {tenant}/{key}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_tiers_give_each_pattern_its_default_and_maximum_with_jitter() {
    let t =
        TestCluster::with(ClusterOptions { agents: 2, agent_toml: TIERS.into(), ..ClusterOptions::default() }).await;

    // The first matching table decides; the jitter only shortens (by up to
    // 20%); the seconds a slow machine takes between PUT and GET are allowed for.
    t.put_ok(0, "acme", "session:1", "", "s").await;
    let acme = ttl_left(&t, 0, "acme", "session:1").await;
    assert!((60..=100).contains(&acme), "acme's session tier (100 s, 20% jitter): {acme}");
    t.put_ok(0, "globex", "session:1", "", "s").await;
    let globex = ttl_left(&t, 0, "globex", "session:1").await;
    assert!((760..=1000).contains(&globex), "everyone's session tier (1000 s): {globex}");
    t.put_ok(0, "acme", "other", "", "o").await;
    let other = ttl_left(&t, 0, "acme", "other").await;
    assert!((200..=300).contains(&other), "no tier: default_ttl_secs (300 s): {other}");

    // An explicit ttl is kept exactly, up to the tier's maximum.
    let refused = t.put(0, "acme", "session:2", "?ttl=201", "s").await;
    assert_eq!(refused.status().as_u16(), 400);
    let body: serde_json::Value = refused.json().await.expect("JSON error");
    assert_eq!(body["error"], "invalid_ttl", "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("200"), "{body}");
    t.put_ok(0, "acme", "session:2", "?ttl=200", "s").await;
    let asked = ttl_left(&t, 0, "acme", "session:2").await;
    assert!((180..=200).contains(&asked), "asked 200 s, no jitter: {asked}");
    t.put_ok(0, "globex", "session:2", "?ttl=5000", "s").await;

    // Entries written together get TTLs spread over the jitter's window,
    // and another agent reads the same TTL from L2.
    let mut seen = HashSet::new();
    for i in 0..40 {
        let key = format!("report:{i}");
        t.put_ok(0, "acme", &key, "", "r").await;
        let left = ttl_left(&t, 0, "acme", &key).await;
        assert!((3900..=5000).contains(&left), "report tier (5000 s, 20% jitter): {left}");
        seen.insert(left / 10);
    }
    assert!(seen.len() >= 10, "40 reports written together expire apart: {} distinct 10 s slots", seen.len());
    let here = ttl_left(&t, 0, "acme", "report:0").await;
    let there = ttl_left(&t, 1, "acme", "report:0").await;
    assert!(here.abs_diff(there) <= 30, "the TTL travels with the entry: {here} vs {there}");
}

/// A GET with a `Cache-Control` request header: (status, X-Cache, Age, body).
async fn get_with(t: &TestCluster, key: &str, cache_control: &str) -> (u16, String, String, String) {
    let resp = t
        .http
        .get(t.agent(0).url(&format!("/v1/cache/acme/{key}")))
        .header("cache-control", cache_control)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"));
    let status = resp.status().as_u16();
    let (layer, age) = (header(&resp, "x-cache"), header(&resp, "age"));
    (status, layer, age, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_l1_past_its_bound_only_when_asked_and_never_an_invalidated_entry() {
    let mut t = TestCluster::with(ClusterOptions {
        agents: 1,
        agent_toml: "staleness_bound_ms = 1000\nheartbeat_interval_ms = 200\n".into(),
        redis: Some("single"),
        ..ClusterOptions::default()
    })
    .await;
    t.put_ok(0, "acme", "kept", "?ttl=600", "kept value").await;
    t.put_ok(0, "acme", "dropped", "?ttl=600", "old value").await;
    t.warm("acme", "kept").await;
    t.warm("acme", "dropped").await;
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["dropped"]})).await;
    t.assert_gone_everywhere(crate::seq(&answer), "acme", "dropped").await;

    // Redis stops answering. Past the staleness bound L1 cannot be proven
    // fresh: without the header, a 503.
    t.cluster.redis().proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let unavailable =
        wait_until(Duration::from_secs(60), || async { t.get(0, "acme", "kept").await.status() == 503 }).await;
    assert!(unavailable, "the agent kept answering from L1 past its bound with Redis stopped");

    // With it, L1 answers, marked STALE and with its age.
    let (status, layer, age, body) = get_with(&t, "kept", "max-age=0, stale-if-error=600").await;
    assert_eq!((status, layer.as_str(), body.as_str()), (200, "STALE", "kept value"));
    assert!(age.parse::<u64>().is_ok_and(|a| a <= 600), "Age: {age:?}");
    // Never an entry whose invalidation the agent applied.
    let (status, layer, _, body) = get_with(&t, "dropped", "stale-if-error=600").await;
    assert_eq!(status, 503, "the invalidated entry was served {layer}: {body}");
    // Nor past the window the caller accepts: the proof ran out already.
    assert_eq!(get_with(&t, "kept", "stale-if-error=0").await.0, 503);

    // Redis gone for good: the same.
    t.cluster.redis_mut().proc.kill();
    let (status, layer, _, body) = get_with(&t, "kept", "stale-if-error=600").await;
    assert_eq!((status, layer.as_str(), body.as_str()), (200, "STALE", "kept value"));
    assert_eq!(t.get(0, "acme", "kept").await.status(), 503);
    let (status, _, _, _) = get_with(&t, "dropped", "stale-if-error=600").await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_refresh_hands_one_hit_per_agent_a_token_past_refresh_ahead() {
    // An entry of 30 s is due 1 s after it is written (refresh_ahead 0.01
    // leaves a lead of 29 whole seconds).
    let t = Arc::new(
        TestCluster::with(ClusterOptions {
            agents: 2,
            agent_toml: "refresh_ahead = 0.01\nlease_ms = 30000\n".into(),
            ..ClusterOptions::default()
        })
        .await,
    );
    t.put_ok(0, "acme", "hot", "?ttl=30", "v1").await;
    t.warm("acme", "hot").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Concurrent hits on each agent: exactly one gets the hint and a token.
    let hits = async |agent: usize| {
        let mut calls = Vec::new();
        for _ in 0..20 {
            let t = t.clone();
            calls.push(tokio::spawn(async move {
                let resp = t.get(agent, "acme", "hot").await;
                assert_eq!(resp.status().as_u16(), 200);
                (header(&resp, "x-cache-refresh"), header(&resp, "x-cache-fill-token"))
            }));
        }
        let mut hinted = Vec::new();
        for call in calls {
            let (refresh, token) = call.await.expect("hit");
            if refresh == "1" {
                assert!(!token.is_empty(), "the hint carries a fill token");
                hinted.push(token);
            } else {
                assert!(token.is_empty(), "a hit without the hint carries no token");
            }
        }
        hinted
    };
    let first = hits(0).await;
    assert_eq!(first.len(), 1, "one hint among 20 concurrent hits on agent 0: {first:?}");
    assert_eq!(hits(1).await.len(), 1, "and one on agent 1");
    assert_eq!(hits(0).await.len(), 0, "no second hint within lease_ms without a fill");

    // The refresher's PUT with the token replaces the entry (in L2 and in
    // that agent's L1; each agent refreshes its own copy on its own hint).
    t.put_ok(0, "acme", "hot", &format!("?ttl=30&fill_token={}", first[0]), "v2").await;
    assert_eq!(t.read(0, "acme", "hot").await, (200, "L1".to_string(), "v2".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_warms_its_l1_with_the_clusters_hot_keys_before_it_is_ready() {
    let t = TestCluster::with(ClusterOptions { agents: 2, ..ClusterOptions::default() }).await;
    let keys: Vec<String> = (0..200).map(|i| format!("hot:{i}")).collect();
    for key in &keys {
        t.put_ok(0, "acme", key, "?ttl=3600", &format!("value of {key}")).await;
    }
    // 1000 reads of the 200 keys through the two agents.
    for round in 0..5 {
        for key in &keys {
            let (status, _, _) = t.read(if round < 2 { 0 } else { 1 }, "acme", key).await;
            assert_eq!(status, 200);
        }
    }
    // The agents report their hits every 2 s.
    let mut conn = redis::Client::open(t.cluster.redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let reported = wait_until(Duration::from_secs(30), || {
        let mut conn = conn.clone();
        async move {
            let n: u64 = redis::cmd("ZCARD").arg(shared::schema::HOT).query_async(&mut conn).await.unwrap_or(0);
            n >= 200
        }
    })
    .await;
    assert!(reported, "the hot set never held the 200 keys");
    let _: () = redis::cmd("PING").query_async(&mut conn).await.expect("PING");

    // A third agent, started now: ready once warmed, and most of its first
    // reads are L1 hits.
    let port = integration_tests::free_port();
    let third = integration_tests::start_agent(t.cluster.dir.path(), &t.cluster.redis_url(), port, "agent-late", "")
        .expect("start");
    integration_tests::wait_ready(&t.http, &third).await.expect("ready");
    let mut from_l1 = 0;
    for key in &keys {
        let resp = t.http.get(third.url(&format!("/v1/cache/acme/{key}"))).send().await.expect("GET");
        assert_eq!(resp.status().as_u16(), 200);
        if header(&resp, "x-cache") == "L1" {
            from_l1 += 1;
        }
    }
    assert!(from_l1 >= 160, "{from_l1} of 200 first reads were L1 hits (at least 80% wanted)");
}
