//! Bad input: every kind the contract names is refused with a fitting 4xx and a
//! JSON body `{"error": code, "message": ...}`, writes nothing, and leaves the
//! system working.

use reqwest::{Method, Response};
use serde_json::{json, Value};

use crate::{seq, TestCluster};

/// Reads an error answer and checks its status, JSON shape and code.
async fn expect_error(what: &str, resp: Response, status: u16, code: &str) -> Value {
    let actual = resp.status().as_u16();
    let content_type = crate::header(&resp, "content-type");
    let text = resp.text().await.unwrap_or_else(|e| panic!("{what}: reading the body: {e}"));
    assert_eq!(actual, status, "{what}: status; body: {text}");
    assert!(content_type.starts_with("application/json"), "{what}: content type {content_type:?}; body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
    assert_eq!(body["error"], code, "{what}: error code; body: {body}");
    let message = body["message"].as_str().unwrap_or_else(|| panic!("{what}: no string message in {body}"));
    assert!(!message.trim().is_empty(), "{what}: empty message in {body}");
    body
}

/// Sends a request to agent 0 with a raw (already percent-encoded) path and query.
async fn agent_request(t: &TestCluster, method: Method, path_and_query: &str, body: Vec<u8>) -> Response {
    t.http
        .request(method.clone(), t.agent(0).url(path_and_query))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path_and_query}: {e}"))
}

/// Posts a raw body to the coordinator.
async fn coordinator_raw(t: &TestCluster, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> Response {
    t.http
        .post(t.cluster.coordinator.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// The system still does its job: a PUT+GET round trip and an event that
/// invalidates what was put.
async fn assert_still_works(t: &TestCluster, key: &str) {
    t.put_ok(0, "acme", key, "?tags=still-works", "fine").await;
    assert_eq!(t.read(0, "acme", key).await, (200, "L1".into(), "fine".into()), "round trip after bad input");
    let answer = t.event(json!({"tenant": "acme", "entity": "still-works"})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", key).await;
}

/// The last seq logged, from the coordinator's cluster health.
async fn log_head(t: &TestCluster) -> u64 {
    let (status, health) = t.get_json(&t.cluster.coordinator, "/v1/cluster/health").await;
    assert_eq!(status, 200, "cluster health: {health}");
    health["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {health}"))
}

/// `key` (put through agent 0, never read through agent 1) is still in agent
/// 0's L1 and in L2 once a later, unrelated invalidation reached every agent.
async fn assert_kept_after_a_later_invalidation(t: &TestCluster, key: &str, value: &str) {
    let unrelated = t.event(json!({"tenant": "acme", "entity": "unrelated"})).await;
    t.wait_applied("acme", seq(&unrelated)).await;
    assert_eq!(t.read(0, "acme", key).await, (200, "L1".into(), value.into()), "{key} dropped from agent 0's L1");
    assert_eq!(t.read(1, "acme", key).await, (200, "L2".into(), value.into()), "{key} deleted from L2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_bad_names_with_json_400s() {
    let t = TestCluster::start(1, "").await;
    let long_tenant = "t".repeat(65);
    let long_key = "k".repeat(1025);
    // (path after /v1/cache/, expected code). Paths are already percent-encoded.
    let cases: Vec<(String, &str)> = vec![
        ("a%20b/k".into(), "invalid_tenant"),
        (format!("{long_tenant}/k"), "invalid_tenant"),
        ("%C3%BC/k".into(), "invalid_tenant"),
        ("acme:x/k".into(), "invalid_tenant"),
        ("%FF/k".into(), "invalid_tenant"),
        ("acme/".into(), "invalid_key"),
        ("acme".into(), "invalid_key"),
        (format!("acme/{long_key}"), "invalid_key"),
        ("acme/a%0Ab".into(), "invalid_key"),
        ("acme/a%7Fb".into(), "invalid_key"),
        ("acme/a%00b".into(), "invalid_key"),
        ("acme/%FF".into(), "invalid_key"),
        ("acme/ok%C3".into(), "invalid_key"),
    ];
    for (rest, code) in &cases {
        let path = format!("/v1/cache/{rest}");
        let resp = agent_request(&t, Method::GET, &path, Vec::new()).await;
        expect_error(&format!("GET {path}"), resp, 400, code).await;
        let resp = agent_request(&t, Method::PUT, &path, b"value".to_vec()).await;
        expect_error(&format!("PUT {path}"), resp, 400, code).await;
        let resp = agent_request(&t, Method::DELETE, &path, Vec::new()).await;
        expect_error(&format!("DELETE {path}"), resp, 400, code).await;
    }
    // The longest valid names are accepted (the limits are where the contract puts them).
    let max_tenant = "t".repeat(64);
    let max_key = "k".repeat(1024);
    t.put_ok(0, &max_tenant, &max_key, "", "at the limits").await;
    assert_eq!(t.read(0, &max_tenant, &max_key).await.0, 200);
    assert_still_works(&t, "after-bad-names").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_bad_put_parameters_and_stores_nothing() {
    let t = TestCluster::start(2, "").await;
    let long_tag = "t".repeat(257);
    // (key, query, expected code). Each case uses its own key, so a partial
    // write would show as a value afterwards.
    let cases: Vec<(&str, String, &str)> = vec![
        ("ttl-zero", "?ttl=0".into(), "invalid_ttl"),
        ("ttl-abc", "?ttl=abc".into(), "invalid_ttl"),
        ("ttl-negative", "?ttl=-1".into(), "invalid_ttl"),
        ("ttl-fraction", "?ttl=1.5".into(), "invalid_ttl"),
        ("ttl-empty", "?ttl=".into(), "invalid_ttl"),
        ("tag-space", "?tags=a%20b".into(), "invalid_tag"),
        ("tag-plus-space", "?tags=a+b".into(), "invalid_tag"),
        ("tag-empty-item", "?tags=a,,b".into(), "invalid_tag"),
        ("tag-trailing-comma", "?tags=a,".into(), "invalid_tag"),
        ("tag-control", "?tags=a%0Ab".into(), "invalid_tag"),
        ("tag-too-long", format!("?tags={long_tag}"), "invalid_tag"),
        ("dep-control", "?depends_on=a%0Ab".into(), "invalid_depends_on"),
        ("dep-too-long", format!("?depends_on={}", "d".repeat(1025)), "invalid_depends_on"),
        ("dep-empty-item", "?depends_on=a,,b".into(), "invalid_depends_on"),
        ("token-garbage", "?fill_token=not-a-token".into(), "invalid_fill_token"),
        ("token-bad-parts", "?fill_token=zz.1.2".into(), "invalid_fill_token"),
        ("token-bad-seq", "?fill_token=abc.x.1".into(), "invalid_fill_token"),
        ("unknown-param", "?color=red".into(), "invalid_query"),
        ("unknown-param-typo", "?tag=a".into(), "invalid_query"),
    ];
    for (key, query, code) in &cases {
        let resp = t.put(0, "acme", key, query, "must not be stored").await;
        expect_error(&format!("PUT acme/{key}{query}"), resp, 400, code).await;
    }
    // The longest valid tag is accepted.
    t.put_ok(0, "acme", "tag-at-limit", &format!("?tags={}", "t".repeat(256)), "ok").await;

    // A body over max_value_bytes (1 MiB by default) is a 413.
    let too_big = vec![b'x'; 1024 * 1024 + 1];
    let resp = agent_request(&t, Method::PUT, "/v1/cache/acme/too-big", too_big).await;
    expect_error("PUT 1 MiB + 1", resp, 413, "payload_too_large").await;
    // Exactly the limit is fine.
    let resp = agent_request(&t, Method::PUT, "/v1/cache/acme/at-limit", vec![b'y'; 1024 * 1024]).await;
    assert_eq!(resp.status().as_u16(), 204, "a body of exactly max_value_bytes is accepted");

    // Nothing was written by any rejected PUT: not in the writer's L1, not in L2.
    for (key, query, _) in &cases {
        for i in 0..2 {
            let (status, layer, body) = t.read(i, "acme", key).await;
            assert_eq!(status, 404, "rejected PUT acme/{key}{query} left a value on agent {i} ({layer}): {body}");
        }
    }
    for i in 0..2 {
        assert_eq!(t.read(i, "acme", "too-big").await.0, 404, "rejected 413 PUT left a value on agent {i}");
    }
    assert_still_works(&t, "after-bad-params").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_are_json_errors() {
    let t = TestCluster::start(1, "").await;
    for (service, name) in [(t.agent(0), "agent"), (&t.cluster.coordinator, "coordinator")] {
        for path in ["/v1/nope", "/", "/v2/cache/acme/k", "/healthz/extra"] {
            let resp = t.http.get(service.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
            expect_error(&format!("{name} GET {path}"), resp, 404, "not_found").await;
        }
    }
    // A method the route does not take: a 404 or 405, as JSON with a code.
    let resp = t.http.patch(t.agent(0).url("/v1/cache/acme/k")).send().await.expect("PATCH reaches the agent");
    let status = resp.status().as_u16();
    assert!(status == 404 || status == 405, "PATCH on a cache key answered {status}");
    let body: Value = resp.json().await.expect("PATCH answer is JSON");
    assert!(body["error"].as_str().is_some_and(|c| !c.is_empty()), "PATCH answer has an error code: {body}");
    let resp = t.http.get(t.cluster.coordinator.url("/v1/events")).send().await.expect("GET /v1/events");
    let status = resp.status().as_u16();
    assert!(status == 404 || status == 405, "GET /v1/events answered {status}");
    let body: Value = resp.json().await.expect("GET /v1/events answer is JSON");
    assert!(body["error"].as_str().is_some_and(|c| !c.is_empty()), "GET /v1/events has an error code: {body}");
    assert_still_works(&t, "after-unknown-routes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_refuses_bad_events() {
    let t = TestCluster::start(1, "").await;
    let head = log_head(&t).await;
    let ok = json!({"tenant": "acme", "entity": "supplier", "id": "1"});
    let batch_too_large = Value::Array(vec![ok.clone(); 1001]);
    // (what, body, expected code); every body is sent as application/json.
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{\"tenant\": ".into(), "invalid_json"),
        ("plain text", "hello".into(), "invalid_json"),
        ("empty body", String::new(), "invalid_json"),
        ("empty batch", "[]".into(), "invalid_event"),
        ("a number", "42".into(), "invalid_event"),
        ("missing entity", json!({"tenant": "acme"}).to_string(), "invalid_event"),
        ("missing tenant", json!({"entity": "supplier"}).to_string(), "invalid_event"),
        ("unknown field", json!({"tenant": "acme", "entity": "supplier", "tag": ["x"]}).to_string(), "invalid_event"),
        ("tags not a list", json!({"tenant": "acme", "entity": "supplier", "tags": "x"}).to_string(), "invalid_event"),
        ("bad tenant", json!({"tenant": "a b", "entity": "supplier"}).to_string(), "invalid_tenant"),
        ("long tenant", json!({"tenant": "t".repeat(65), "entity": "supplier"}).to_string(), "invalid_tenant"),
        ("bad entity", json!({"tenant": "acme", "entity": "a b"}).to_string(), "invalid_entity"),
        ("empty entity", json!({"tenant": "acme", "entity": ""}).to_string(), "invalid_entity"),
        (
            "empty pattern",
            json!({"tenant": "acme", "entity": "supplier", "patterns": [""]}).to_string(),
            "invalid_pattern",
        ),
        (
            "malformed pattern",
            json!({"tenant": "acme", "entity": "supplier", "patterns": ["a[b"]}).to_string(),
            "invalid_pattern",
        ),
        (
            "bare star",
            json!({"tenant": "acme", "entity": "supplier", "patterns": ["*"]}).to_string(),
            "confirm_required",
        ),
        ("bad key", json!({"tenant": "acme", "entity": "supplier", "keys": ["a\nb"]}).to_string(), "invalid_key"),
        ("bad tag", json!({"tenant": "acme", "entity": "supplier", "tags": ["a b"]}).to_string(), "invalid_tag"),
        ("1001 events", batch_too_large.to_string(), "batch_too_large"),
    ];
    for (what, body, code) in &cases {
        let resp = coordinator_raw(&t, "/v1/events", "application/json", body.clone()).await;
        expect_error(&format!("event {what}"), resp, 400, code).await;
    }
    // Bad query parameters.
    for query in ["?wait=sometimes", "?bogus=1", "?timeout_ms=abc"] {
        let path = format!("/v1/events{query}");
        let resp = coordinator_raw(&t, &path, "application/json", ok.to_string()).await;
        expect_error(&format!("POST {path}"), resp, 400, "invalid_query").await;
    }
    // Nothing above was logged: the log head is where it started.
    assert_eq!(log_head(&t).await, head, "a refused event was logged");
    // 1000 events is still one batch, logged as one invalidation.
    let answer = t.event(Value::Array(vec![ok.clone(); 1000])).await;
    assert!(seq(&answer) > head, "a batch of 1000 was not logged: {answer}");
    assert_eq!(log_head(&t).await, seq(&answer), "a batch of 1000 is one invalidation");
    assert_still_works(&t, "after-bad-events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_rejects_the_whole_batch() {
    let t = TestCluster::start(2, "").await;
    // Agent 0 holds the key in L1; agent 1 has not read it, so its first read
    // afterwards shows what L2 holds.
    t.put_ok(0, "acme", "batch:kept", "?tags=supplier:7", "still here").await;
    let head = log_head(&t).await;

    // The first event alone would drop the key (by key and by tag); the second is bad.
    let bad_second = [
        ("bad tenant", json!({"tenant": "a b", "entity": "x"}), "invalid_tenant"),
        ("bad entity", json!({"tenant": "acme", "entity": "a b"}), "invalid_entity"),
        ("unknown field", json!({"tenant": "acme", "entity": "x", "tag": ["y"]}), "invalid_event"),
        ("bare star", json!({"tenant": "acme", "entity": "x", "patterns": ["*"]}), "confirm_required"),
        ("other tenant, bad key", json!({"tenant": "other", "entity": "x", "keys": [""]}), "invalid_key"),
    ];
    for (what, second, code) in bad_second {
        let batch = json!([
            {"tenant": "acme", "entity": "supplier", "id": "7", "keys": ["batch:kept"]},
            second,
        ]);
        let resp = coordinator_raw(&t, "/v1/events", "application/json", batch.to_string()).await;
        expect_error(&format!("batch with {what}"), resp, 400, code).await;
    }

    // Nothing was logged, and after a later (unrelated) invalidation has
    // reached every agent, the key is still in agent 0's L1 and in L2.
    assert_eq!(log_head(&t).await, head, "a rejected batch was logged");
    assert_kept_after_a_later_invalidation(&t, "batch:kept", "still here").await;
    assert_still_works(&t, "after-bad-batch").await;
    // And the same batch without the bad event does drop the key.
    let answer = t.event(json!([{"tenant": "acme", "entity": "supplier", "id": "7", "keys": ["batch:kept"]}])).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "batch:kept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_refuses_bad_invalidations() {
    let t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "inv:kept", "?tags=kept", "v").await;
    let head = log_head(&t).await;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("nothing", json!({"tenant": "acme"}), "nothing_to_invalidate"),
        ("empty lists", json!({"tenant": "acme", "keys": [], "tags": [], "patterns": []}), "nothing_to_invalidate"),
        ("bare star", json!({"tenant": "acme", "patterns": ["*"]}), "confirm_required"),
        (
            "bare star, confirm false",
            json!({"tenant": "acme", "patterns": ["*"], "confirm": false}),
            "confirm_required",
        ),
        ("malformed glob", json!({"tenant": "acme", "patterns": ["a[b"]}), "invalid_pattern"),
        ("empty pattern", json!({"tenant": "acme", "patterns": [""]}), "invalid_pattern"),
        ("bad key", json!({"tenant": "acme", "keys": ["a\nb"]}), "invalid_key"),
        ("empty key", json!({"tenant": "acme", "keys": [""]}), "invalid_key"),
        ("long key", json!({"tenant": "acme", "keys": ["k".repeat(1025)]}), "invalid_key"),
        ("bad tag", json!({"tenant": "acme", "tags": ["a b"]}), "invalid_tag"),
        ("tag with comma", json!({"tenant": "acme", "tags": ["a,b"]}), "invalid_tag"),
        ("long tag", json!({"tenant": "acme", "tags": ["t".repeat(257)]}), "invalid_tag"),
        ("bad tenant", json!({"tenant": "a b", "keys": ["k"]}), "invalid_tenant"),
        ("unknown field", json!({"tenant": "acme", "keys": ["inv:kept"], "bogus": 1}), "invalid_json"),
        ("missing tenant", json!({"keys": ["inv:kept"]}), "invalid_json"),
        ("keys not a list", json!({"tenant": "acme", "keys": "inv:kept"}), "invalid_json"),
        // A valid key next to a bad one: nothing happens, not even to the valid one.
        ("a bad key after a good one", json!({"tenant": "acme", "keys": ["inv:kept", "a\u{1}b"]}), "invalid_key"),
        (
            "a bad pattern after a good tag",
            json!({"tenant": "acme", "tags": ["kept"], "patterns": ["["]}),
            "invalid_pattern",
        ),
    ];
    for (what, body, code) in &cases {
        let resp = coordinator_raw(&t, "/v1/invalidate", "application/json", body.to_string()).await;
        expect_error(&format!("invalidate {what}"), resp, 400, code).await;
        // dry_run validates the same way.
        if let Value::Object(map) = body {
            let mut dry = map.clone();
            dry.insert("dry_run".into(), Value::Bool(true));
            let resp = coordinator_raw(&t, "/v1/invalidate", "application/json", Value::Object(dry).to_string()).await;
            expect_error(&format!("dry-run invalidate {what}"), resp, 400, code).await;
        }
    }
    let resp = coordinator_raw(&t, "/v1/invalidate", "application/json", "{\"tenant\": \"acme\", ").await;
    expect_error("invalidate with invalid JSON", resp, 400, "invalid_json").await;
    let resp = coordinator_raw(
        &t,
        "/v1/invalidate",
        "text/plain",
        json!({"tenant": "acme", "keys": ["inv:kept"]}).to_string(),
    )
    .await;
    expect_error("invalidate as text/plain", resp, 415, "unsupported_media_type").await;
    let resp = coordinator_raw(
        &t,
        "/v1/invalidate?wait=sometimes",
        "application/json",
        json!({"tenant": "acme", "keys": ["inv:kept"]}).to_string(),
    )
    .await;
    expect_error("invalidate ?wait=sometimes", resp, 400, "invalid_query").await;

    // Nothing was logged or deleted.
    assert_eq!(log_head(&t).await, head, "a refused invalidation was logged");
    assert_kept_after_a_later_invalidation(&t, "inv:kept", "v").await;
    assert_still_works(&t, "after-bad-invalidations").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_query_values_that_are_not_utf8_are_refused() {
    // `%FF` is not UTF-8: a tag or dependency spelled that way is bad input,
    // not the replacement character U+FFFD (which would make `%FF` and `%FE`
    // the same tag).
    let t = TestCluster::start(1, "").await;
    let cases = [
        ("utf8-tag", "?tags=%FF", ["invalid_tag", "invalid_query"]),
        ("utf8-tag-second", "?tags=ok,a%FEb", ["invalid_tag", "invalid_query"]),
        ("utf8-dep", "?depends_on=%FF", ["invalid_depends_on", "invalid_query"]),
        ("utf8-ttl", "?ttl=%FF", ["invalid_ttl", "invalid_query"]),
        ("utf8-token", "?fill_token=%FF", ["invalid_fill_token", "invalid_query"]),
    ];
    let mut failures = Vec::new();
    for (key, query, codes) in cases {
        let resp = t.put(0, "acme", key, query, "must not be stored").await;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let code_ok = codes.iter().any(|c| body["error"] == *c);
        let message_ok = body["message"].as_str().is_some_and(|m| !m.is_empty());
        if status != 400 || !code_ok || !message_ok {
            failures.push(format!("PUT acme/{key}{query}: expected 400 {codes:?}, got {status} {body}"));
        }
        let (read, _, _) = t.read(0, "acme", key).await;
        if read != 404 {
            failures.push(format!("PUT acme/{key}{query} stored a value (GET answered {read})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_still_works(&t, "after-non-utf8-query").await;
}
