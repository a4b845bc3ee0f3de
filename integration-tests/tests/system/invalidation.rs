//! Invalidation through the coordinator: propagation to every agent, the
//! default rule, tags, patterns, rules with dependents, `depends_on` chains,
//! dry runs and confirmation.

use serde_json::json;

use crate::{partition_of, seq, seq_of, TestCluster};

const RULES: &str = r#"
[[rules]]
entity = "supplier"
tags = ["supplier:{id}", "suppliers"]
patterns = ["suppliers:list:*", "supplier:{id}:*"]
dependents = ["supplier_payment", "purchase_order"]

[[rules]]
entity = "supplier_payment"
tags = ["supplier_payment:{id}", "supplier_payments"]
patterns = ["supplier_payments:list:*"]
dependents = ["ledger"]

[[rules]]
entity = "ledger"
patterns = ["ledger:*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_reaches_every_agent_and_clears_l2() {
    let t = TestCluster::start(3, "").await;
    t.put_ok(0, "acme", "invoice:7", "?tags=invoice:7", "old").await;
    t.put_ok(0, "acme", "invoice:8", "?tags=invoice:8", "other").await;
    t.warm("acme", "invoice:7").await;
    t.warm("acme", "invoice:8").await;

    // No rule for "invoice": the default rule invalidates tags `invoice` and `invoice:7`.
    let answer = t.event(json!({"tenant": "acme", "entity": "invoice", "id": "7", "op": "update"})).await;
    assert_eq!(answer["invalidated"][0]["tags"], json!(["invoice", "invoice:7"]));
    assert_eq!(answer["l2_deleted"], 1);
    assert_eq!(answer["nodes"]["live"], 3);
    t.assert_gone_everywhere(seq(&answer), "acme", "invoice:7").await;
    t.assert_kept_everywhere("acme", "invoice:8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_drop_exactly_their_members() {
    let t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "a", "?tags=red,blue", "a").await;
    t.put_ok(0, "acme", "b", "?tags=blue", "b").await;
    t.put_ok(1, "acme", "c", "?tags=green", "c").await;
    for k in ["a", "b", "c"] {
        t.warm("acme", k).await;
    }
    let answer = t.invalidate(json!({"tenant": "acme", "tags": ["blue"]})).await;
    assert_eq!(answer["l2_deleted"], 2);
    t.assert_gone_everywhere(seq(&answer), "acme", "a").await;
    t.assert_gone_everywhere(seq(&answer), "acme", "b").await;
    t.assert_kept_everywhere("acme", "c").await;

    // A tag with many members is drained in chunks (over 1000 members).
    for i in 0..1200 {
        let resp = t.put(i % 2, "acme", &format!("bulk:{i}"), "?tags=bulk", "x").await;
        assert_eq!(resp.status().as_u16(), 204);
    }
    let answer = t.invalidate(json!({"tenant": "acme", "tags": ["bulk"]})).await;
    assert_eq!(answer["l2_deleted"], 1200);
    for i in [0, 599, 1199] {
        t.assert_gone_everywhere(seq(&answer), "acme", &format!("bulk:{i}")).await;
    }
    t.assert_kept_everywhere("acme", "c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_match_keys_of_the_tenant_with_the_redis_glob_dialect() {
    let t = TestCluster::start(2, "").await;
    let keys = ["list:page1", "list:page2", "list:pageX", "listing", "other:list:page1", "a*b", "aXb"];
    for k in keys {
        t.put_ok(0, "acme", k, "", k).await;
        t.warm("acme", k).await;
    }
    let answer = t.invalidate(json!({"tenant": "acme", "patterns": ["list:page[0-9]", "a\\*b"]})).await;
    assert_eq!(answer["l2_deleted"], 3);
    for gone in ["list:page1", "list:page2", "a*b"] {
        t.assert_gone_everywhere(seq(&answer), "acme", gone).await;
    }
    for kept in ["list:pageX", "listing", "other:list:page1", "aXb"] {
        t.assert_kept_everywhere("acme", kept).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_cascade_to_dependent_entities() {
    let t = TestCluster::start(2, RULES).await;
    let entries = [
        ("supplier:42:detail", ""),
        ("supplier:43:detail", ""),
        ("suppliers:list:page1", ""),
        ("supplier_payments:list:open", ""),
        ("supplier_payment:9", "?tags=supplier_payment:9"),
        ("ledger:2026", ""),
        ("customers:list:page1", ""),
    ];
    for (k, q) in entries {
        t.put_ok(0, "acme", k, q, k).await;
        t.warm("acme", k).await;
    }
    let answer = t.event(json!({"tenant": "acme", "entity": "supplier", "id": 42, "op": "update"})).await;
    let s = seq(&answer);
    for gone in ["supplier:42:detail", "suppliers:list:page1", "supplier_payments:list:open", "ledger:2026"] {
        t.assert_gone_everywhere(s, "acme", gone).await;
    }
    // Templates with {id} of dependents are not used; other suppliers stay.
    for kept in ["supplier:43:detail", "supplier_payment:9", "customers:list:page1"] {
        t.assert_kept_everywhere("acme", kept).await;
    }
    let (status, rules) = t.get_json(&t.cluster.coordinator, "/v1/rules").await;
    assert_eq!(status, 200);
    assert_eq!(rules["rules"].as_array().map(Vec::len), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depends_on_chains_are_followed_transitively_on_every_agent() {
    let t = TestCluster::start(3, "").await;
    // report -> summary -> base; `other` depends on nothing.
    t.put_ok(0, "acme", "base", "", "b").await;
    t.put_ok(0, "acme", "summary", "?depends_on=base", "s").await;
    t.put_ok(1, "acme", "report", "?depends_on=summary,unrelated", "r").await;
    t.put_ok(1, "acme", "other", "", "o").await;
    // Agent 3 holds only the end of the chain in L1: it cannot follow the chain
    // by itself, so the coordinator's L2 walk must name the keys.
    let _ = t.read(2, "acme", "report").await;
    assert_eq!(t.read(2, "acme", "report").await.1, "L1");
    for k in ["base", "summary", "report", "other"] {
        let _ = t.read(0, "acme", k).await;
        let _ = t.read(1, "acme", k).await;
    }

    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["base"]})).await;
    let keys = answer["invalidated"][0]["keys"].as_array().cloned().unwrap_or_default();
    assert!(keys.contains(&json!("summary")) && keys.contains(&json!("report")), "cascaded keys: {answer}");
    for gone in ["base", "summary", "report"] {
        t.assert_gone_everywhere(seq(&answer), "acme", gone).await;
    }
    t.assert_kept_everywhere("acme", "other").await;

    // Without cascade only the key itself goes.
    t.put_ok(0, "acme", "base", "", "b").await;
    t.put_ok(0, "acme", "summary", "?depends_on=base", "s").await;
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["base"], "cascade": false})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "base").await;
    t.assert_kept_everywhere("acme", "summary").await;

    // A tag or pattern invalidation cascades too.
    let answer = t.invalidate(json!({"tenant": "acme", "patterns": ["summ*"]})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "summary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_cycles_between_keys_terminate() {
    let t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "x", "?depends_on=y", "x").await;
    t.put_ok(0, "acme", "y", "?depends_on=x", "y").await;
    t.warm("acme", "x").await;
    t.warm("acme", "y").await;
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["x"]})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "x").await;
    t.assert_gone_everywhere(seq(&answer), "acme", "y").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_what_would_go_and_changes_nothing() {
    let t = TestCluster::start(2, "").await;
    for i in 0..5 {
        t.put_ok(0, "acme", &format!("orders:{i}"), "?tags=orders", "o").await;
    }
    t.put_ok(0, "acme", "orders:summary", "?depends_on=orders:0", "s").await;
    t.put_ok(0, "acme", "unrelated", "", "u").await;
    t.warm("acme", "orders:1").await;

    let (status, seq_before) = t.get_json(&t.cluster.coordinator, "/v1/cluster/health").await;
    assert_eq!(status, 200);
    let answer = t.invalidate(json!({"tenant": "acme", "tags": ["orders"], "dry_run": true})).await;
    assert_eq!(answer["count"], 6, "{answer}");
    let listed: Vec<String> =
        serde_json::from_value(answer["would_delete"].clone()).expect("would_delete is a list of keys");
    assert_eq!(listed.len(), 6);
    assert!(listed.contains(&"orders:summary".to_string()), "dependents are listed: {listed:?}");
    assert!(!listed.contains(&"unrelated".to_string()));

    // Nothing was deleted, logged or broadcast.
    let (_, health) = t.get_json(&t.cluster.coordinator, "/v1/cluster/health").await;
    assert_eq!(health["seq"], seq_before["seq"]);
    t.assert_kept_everywhere("acme", "orders:1").await;
    t.assert_kept_everywhere("acme", "orders:summary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_tenant_needs_confirm() {
    let t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "one", "", "1").await;
    t.put_ok(0, "acme", "two/three", "", "2").await;
    t.warm("acme", "one").await;
    let (status, body) = t.coordinator_post("/v1/invalidate", json!({"tenant": "acme", "patterns": ["*"]})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("confirm_required")));
    t.assert_kept_everywhere("acme", "one").await;

    let answer = t.invalidate(json!({"tenant": "acme", "patterns": ["*"], "confirm": true})).await;
    assert_eq!(answer["l2_deleted"], 2);
    t.assert_gone_everywhere(seq(&answer), "acme", "one").await;
    t.assert_gone_everywhere(seq(&answer), "acme", "two/three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_events_is_one_invalidation_per_partition() {
    let t = TestCluster::start(2, RULES).await;
    t.put_ok(0, "acme", "ledger:1", "", "l").await;
    t.put_ok(0, "globex", "invoice:1", "?tags=invoice:1", "i").await;
    t.warm("acme", "ledger:1").await;
    t.warm("globex", "invoice:1").await;
    let answer = t
        .event(json!([
            {"tenant": "acme", "entity": "ledger", "op": "update"},
            {"tenant": "globex", "entity": "invoice", "id": "1", "op": "delete"}
        ]))
        .await;
    assert_eq!(answer["invalidated"].as_array().map(Vec::len), Some(2));
    let partitions = if partition_of("acme") == partition_of("globex") { 1 } else { 2 };
    assert_eq!(answer["positions"].as_array().map(Vec::len), Some(partitions), "{answer}");
    t.assert_gone_everywhere(seq_of(&answer, "acme"), "acme", "ledger:1").await;
    t.assert_gone_everywhere(seq_of(&answer, "globex"), "globex", "invoice:1").await;
}
