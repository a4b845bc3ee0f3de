//! The features cache users expect (contract v2, section 4): TTL tiers and
//! the jitter of default TTLs, seen through `X-Cache-TTL`.

use std::collections::HashSet;

use integration_tests::ClusterOptions;

use crate::{header, TestCluster};

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
    let t = TestCluster::with(ClusterOptions { agents: 2, agent_toml: TIERS.into(), ..ClusterOptions::default() }).await;

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
