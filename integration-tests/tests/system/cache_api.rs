//! The agent's cache API: L1/L2 layers, fills, content types, TTL, DELETE,
//! tenant isolation.

use serde_json::json;

use crate::{entry_key, header, seq, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_put_through_one_agent_is_read_through_the_others_from_l2_then_l1() {
    let t = TestCluster::start(3, "").await;
    t.put_ok(0, "acme", "supplier:42", "?tags=supplier:42,suppliers", "v1").await;

    // The writer holds it in L1 already.
    assert_eq!(t.read(0, "acme", "supplier:42").await, (200, "L1".into(), "v1".into()));
    for i in 1..3 {
        assert_eq!(t.read(i, "acme", "supplier:42").await, (200, "L2".into(), "v1".into()), "agent {i}, first read");
        let resp = t.get(i, "acme", "supplier:42").await;
        assert_eq!(header(&resp, "x-cache"), "L1", "agent {i}, second read");
        assert_eq!(header(&resp, "x-cache-tags"), "supplier:42,suppliers");
        assert_eq!(header(&resp, "content-type"), "text/plain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_a_json_404_with_a_fill_token() {
    let t = TestCluster::start(1, "").await;
    let resp = t.get(0, "acme", "never-stored").await;
    assert_eq!(resp.status().as_u16(), 404);
    let token = header(&resp, "x-cache-fill-token");
    assert!(!token.is_empty(), "a miss carries a fill token");
    let body: serde_json::Value = resp.json().await.expect("JSON body");
    assert_eq!(body["error"], "not_found");
    // The token is accepted back on a PUT.
    t.put_ok(0, "acme", "never-stored", &format!("?fill_token={token}"), "filled").await;
    assert_eq!(t.read(0, "acme", "never-stored").await.2, "filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_opaque_bytes_and_keep_their_content_type() {
    let t = TestCluster::start(2, "").await;
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let key = "blobs/ünïcode key:1";
    let resp = t
        .http
        .put(t.agent(0).url(&format!("/v1/cache/acme/{}", crate::encode(key))))
        .header("content-type", "application/x-custom; charset=binary")
        .body(bytes.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 204);
    for i in 0..2 {
        let resp = t.get(i, "acme", key).await;
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(header(&resp, "content-type"), "application/x-custom; charset=binary");
        assert_eq!(resp.bytes().await.expect("body").to_vec(), bytes, "agent {i}");
    }
    // A PUT without a content type reads back as octet-stream.
    let resp = t.http.put(t.agent(0).url("/v1/cache/acme/raw")).body("x").send().await.expect("PUT");
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(header(&t.get(1, "acme", "raw").await, "content-type"), "application/octet-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_from_l1_and_l2_after_their_ttl() {
    let t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "short", "?ttl=1", "soon gone").await;
    t.put_ok(0, "acme", "long", "?ttl=3600", "stays").await;
    let resp = t.get(1, "acme", "long").await;
    let ttl: u64 = header(&resp, "x-cache-ttl").parse().expect("X-Cache-TTL is a number");
    assert!((3590..=3600).contains(&ttl), "TTL left {ttl}");
    // Warm agent 1's L1 with the short entry too (it may already have expired on a slow machine).
    let _ = t.read(1, "acme", "short").await;

    let expired = crate::wait_until(std::time::Duration::from_secs(10), || async {
        t.read(0, "acme", "short").await.0 == 404 && t.read(1, "acme", "short").await.0 == 404
    })
    .await;
    assert!(expired, "an entry with ttl=1 is still served");
    let mut redis = t.cluster.redis_conn().await.expect("redis");
    let exists: bool =
        redis::cmd("EXISTS").arg(entry_key("acme", "short")).query_async(&mut redis).await.expect("EXISTS");
    assert!(!exists, "L2 entry outlived its TTL");
    assert_eq!(t.read(1, "acme", "long").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_ttl_applies_when_a_put_gives_none() {
    let t = TestCluster::start(1, "").await;
    t.put_ok(0, "acme", "k", "", "v").await;
    let ttl: u64 = header(&t.get(0, "acme", "k").await, "x-cache-ttl").parse().expect("number");
    // Less the default ttl_jitter (up to 5%, 15 s) and the seconds a slow machine takes.
    assert!((275..=300).contains(&ttl), "default_ttl_secs is 300, got {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_key_from_l2_and_every_agents_l1() {
    let t = TestCluster::start(3, "").await;
    t.put_ok(0, "acme", "doomed", "", "v").await;
    t.put_ok(0, "acme", "kept", "", "v").await;
    t.warm("acme", "doomed").await;
    t.warm("acme", "kept").await;

    let resp = t.http.delete(t.agent(1).url("/v1/cache/acme/doomed")).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 204);
    let seq: u64 = header(&resp, "x-invalidation-seq").parse().expect("seq header");
    // The deleting agent drops it at once, the others once they applied the seq.
    assert_eq!(t.read(1, "acme", "doomed").await.0, 404);
    t.assert_gone_everywhere(seq, "acme", "doomed").await;
    t.assert_kept_everywhere("acme", "kept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_or_touch_each_others_entries() {
    let t = TestCluster::start(2, "").await;
    for tenant in ["acme", "globex"] {
        t.put_ok(0, tenant, "shared:key", "?tags=common", tenant).await;
        t.warm(tenant, "shared:key").await;
    }
    assert_eq!(t.read(1, "acme", "shared:key").await.2, "acme");
    assert_eq!(t.read(1, "globex", "shared:key").await.2, "globex");
    assert_eq!(t.read(1, "initech", "shared:key").await.0, 404);

    // Key, tag, pattern and whole-tenant invalidations in acme leave globex alone.
    let answers = [
        t.invalidate(json!({"tenant": "acme", "keys": ["shared:key"]})).await,
        t.invalidate(json!({"tenant": "acme", "tags": ["common"]})).await,
        t.invalidate(json!({"tenant": "acme", "patterns": ["shared:*"]})).await,
        t.invalidate(json!({"tenant": "acme", "patterns": ["*"], "confirm": true})).await,
        t.event(json!({"tenant": "acme", "entity": "common"})).await,
    ];
    let last = answers.iter().map(seq).max().expect("answers");
    t.assert_gone_everywhere(last, "acme", "shared:key").await;
    t.assert_kept_everywhere("globex", "shared:key").await;
    let mut redis = t.cluster.redis_conn().await.expect("redis");
    let exists: bool =
        redis::cmd("EXISTS").arg(entry_key("globex", "shared:key")).query_async(&mut redis).await.expect("EXISTS");
    assert!(exists, "globex's L2 entry was touched");
}
