//! Coherence under faults: the `wait=all` barrier, fill tokens across agents,
//! and each injected fault (a dropped subscriber, an output-buffer overflow,
//! Redis killed and restarted empty or from an old snapshot, a frozen agent, a killed coordinator,
//! two coordinators). The stale-read checker has its own test binary
//! (`tests/checker.rs`), so that it runs alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{start_coordinator, wait_ready, wait_status, ClusterOptions, Redis};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::{entry_key, header, seq, wait_until, TestCluster};

/// acme's draining set of a tag.
fn draining(tag: &str) -> String {
    shared::schema::Layout::default().of("acme").draining("acme", tag)
}

/// Long enough for reconnect backoff and a busy machine.
const RECOVERY: Duration = Duration::from_secs(30);

/// Reads a key through agent `i`, returning the status only.
async fn status_of(t: &TestCluster, i: usize, key: &str) -> u16 {
    t.read(i, "acme", key).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_all_answers_once_every_agent_has_applied_it() {
    let t = TestCluster::start(3, "").await;
    for round in 0..5 {
        let key = format!("barrier:{round}");
        t.put_ok(0, "acme", &key, "?tags=supplier:1", "old").await;
        t.warm("acme", &key).await;
        let (status, answer) =
            t.coordinator_post("/v1/events?wait=all", json!({"tenant": "acme", "entity": "supplier", "id": "1"})).await;
        assert_eq!(status, 200, "round {round}: {answer}");
        assert_eq!(answer["nodes"], json!({"live": 3, "acked": 3}), "round {round}: {answer}");
        // No polling: the 200 itself promises that no agent serves it any more.
        for i in 0..3 {
            let (status, layer, body) = t.read(i, "acme", &key).await;
            assert_eq!(status, 404, "round {round}: agent {i} served {body} from {layer} after wait=all");
        }
    }
    // The same for /v1/invalidate.
    t.put_ok(1, "acme", "barrier:direct", "", "old").await;
    t.warm("acme", "barrier:direct").await;
    let (status, answer) = t
        .coordinator_post(
            "/v1/invalidate?wait=all&timeout_ms=10000",
            json!({"tenant": "acme", "keys": ["barrier:direct"]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for i in 0..3 {
        assert_eq!(status_of(&t, i, "barrier:direct").await, 404, "agent {i}");
    }
    // A bad timeout is a 400.
    let (status, answer) =
        t.coordinator_post("/v1/events?wait=all&timeout_ms=0", json!({"tenant": "acme", "entity": "x"})).await;
    assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_query")), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_named_then_no_longer_awaited_and_never_serves_stale() {
    let t = TestCluster::start(3, "node_dead_after_ms = 3000\n").await;
    t.put_ok(0, "acme", "frozen:k", "", "old").await;
    t.warm("acme", "frozen:k").await;

    let frozen = t.agent(2);
    frozen.proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    // A short timeout: the frozen agent is still live, so it is named.
    let (status, answer) = t
        .coordinator_post("/v1/invalidate?wait=all&timeout_ms=300", json!({"tenant": "acme", "keys": ["frozen:k"]}))
        .await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["error"], "timeout", "{answer}");
    assert_eq!(answer["lagging"], json!(["agent-3"]), "{answer}");
    assert_eq!(answer["nodes"]["acked"], 2, "{answer}");
    assert!(answer["seq"].as_u64().is_some(), "a 504 still gives the seq: {answer}");

    // The default timeout outlasts node_dead_after_ms: the frozen agent
    // stops being awaited and the barrier passes without it.
    let (status, answer) =
        t.coordinator_post("/v1/invalidate?wait=all", json!({"tenant": "acme", "keys": ["frozen:k"]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"], json!({"live": 2, "acked": 2}), "{answer}");

    // Thawed, its first answer must not be the invalidated value, although
    // its L1 still held it when it froze.
    frozen.proc.signal(Signal::SIGCONT).expect("SIGCONT");
    let (status, layer, body) = t.read(2, "acme", "frozen:k").await;
    assert_eq!(status, 404, "the thawed agent served {body} from {layer}");
    t.wait_applied("acme", seq(&answer)).await;
    assert_eq!(status_of(&t, 2, "frozen:k").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_tokens_hold_across_agents_without_false_conflicts() {
    let t = TestCluster::start(2, "").await;
    // Agent 1 misses and gets a token; the coordinator invalidates the key;
    // agent 2 tries to store what was read before: refused.
    let miss = t.get(0, "acme", "token:k").await;
    assert_eq!(miss.status().as_u16(), 404);
    let token = header(&miss, "x-cache-fill-token");
    assert!(!token.is_empty(), "a miss carries a fill token");
    t.invalidate(json!({"tenant": "acme", "keys": ["token:k"]})).await;
    let resp = t.put(1, "acme", "token:k", &format!("?fill_token={token}"), "read before the write").await;
    assert_eq!(resp.status().as_u16(), 409, "{}", resp.text().await.unwrap_or_default());
    assert_eq!(status_of(&t, 1, "token:k").await, 404, "nothing was stored");
    assert_eq!(status_of(&t, 0, "token:k").await, 404, "nothing was stored");

    // The same through a tag and through a pattern.
    for (query, selector) in [
        ("?tags=sup:7", json!({"tenant": "acme", "tags": ["sup:7"]})),
        ("", json!({"tenant": "acme", "patterns": ["token:p*"]})),
    ] {
        let key = if query.is_empty() { "token:pat" } else { "token:tagged" };
        let miss = t.get(0, "acme", key).await;
        let token = header(&miss, "x-cache-fill-token");
        t.invalidate(selector.clone()).await;
        let sep = if query.is_empty() { "?" } else { "&" };
        let resp = t.put(1, "acme", key, &format!("{query}{sep}fill_token={token}"), "old").await;
        assert_eq!(resp.status().as_u16(), 409, "{selector}: {}", resp.text().await.unwrap_or_default());
    }

    // Unrelated invalidations (another key, another tag, another tenant, a
    // pattern that does not match) do not refuse the fill.
    let miss = t.get(0, "acme", "token:fresh").await;
    let token = header(&miss, "x-cache-fill-token");
    for selector in [
        json!({"tenant": "acme", "keys": ["token:other"]}),
        json!({"tenant": "acme", "tags": ["unrelated"]}),
        json!({"tenant": "globex", "keys": ["token:fresh"]}),
        json!({"tenant": "acme", "patterns": ["other:*", "token:fresh?"]}),
    ] {
        t.invalidate(selector).await;
    }
    let resp = t.put(1, "acme", "token:fresh", &format!("?tags=t1&fill_token={token}"), "fresh").await;
    assert_eq!(resp.status().as_u16(), 204, "a false conflict: {}", resp.text().await.unwrap_or_default());
    assert_eq!(t.read(0, "acme", "token:fresh").await.2, "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_dropped_by_the_output_buffer_limit_replays_what_it_missed() {
    let t = TestCluster::start(2, "").await;
    let mut redis = t.cluster.redis().connection().await.expect("Redis");
    t.put_ok(0, "acme", "overflow:k", "", "old").await;
    t.warm("acme", "overflow:k").await;

    let limit = |v: &str| redis::cmd("CONFIG").arg("SET").arg("client-output-buffer-limit").arg(v).clone();
    let _: () = limit("pubsub 16kb 0 0").query_async(&mut redis).await.expect("CONFIG SET");
    let victim = t.agent(1);
    victim.proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    // A burst of large messages while it cannot read: Redis drops it.
    let keys: Vec<String> = (0..400).map(|i| format!("burst:{i}:{}", "x".repeat(40))).collect();
    for _ in 0..40 {
        t.invalidate(json!({"tenant": "burst", "keys": keys})).await;
    }
    let last = t.invalidate(json!({"tenant": "acme", "keys": ["overflow:k"]})).await;
    // Without wait=all the promise is bounded staleness: the invalidation
    // may be served until the agent's proof of sync is older than its
    // staleness bound (2 s by default). Stay frozen past it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    victim.proc.signal(Signal::SIGCONT).expect("SIGCONT");
    let _: () = limit("pubsub 32mb 8mb 60").query_async(&mut redis).await.expect("CONFIG SET");

    // Past its bound it never answers with the old value, and it catches up by replaying.
    let (_, layer, body) = t.read(1, "acme", "overflow:k").await;
    assert_ne!(body, "old", "agent 2 served the invalidated value from {layer}");
    t.wait_applied("acme", seq(&last)).await;
    assert_eq!(status_of(&t, 1, "overflow:k").await, 404);
    let (_, status) = t.get_json(victim, "/v1/status").await;
    let inv = &status["invalidations"];
    assert!(inv["gaps_detected"].as_u64().unwrap_or(0) >= 1, "no gap was detected: {status}");
    assert!(
        inv["replayed"].as_u64().unwrap_or(0) >= 1 || inv["full_flushes"].as_u64().unwrap_or(0) >= 1,
        "nothing was replayed or flushed: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_never_lets_l1_serve_the_old_data() {
    let mut t = TestCluster::start(2, "").await;
    t.put_ok(0, "acme", "restart:k", "", "old").await;
    t.warm("acme", "restart:k").await;
    let port = t.cluster.redis().port;
    t.cluster.redis_mut().proc.kill();

    // While Redis is gone nothing can prove L1 fresh: once the staleness
    // bound runs out, agents answer 503 instead of their L1 copy.
    for i in 0..2 {
        let agent = t.agent(i);
        let unready = wait_status(&t.http, agent, "/readyz", 503, RECOVERY).await;
        unready.unwrap_or_else(|e| panic!("agent {i} still ready without Redis: {e:#}"));
        let ok = wait_until(RECOVERY, || async { status_of(&t, i, "restart:k").await == 503 }).await;
        assert!(ok, "agent {i} kept serving L1 without Redis");
    }

    // Back, empty: a new epoch. Every agent flushes; the key is gone.
    t.cluster.set_redis(Redis::start_on(t.cluster.dir.path(), port).await.expect("restart Redis"));
    for i in 0..2 {
        wait_ready(&t.http, t.agent(i)).await.unwrap_or_else(|e| panic!("agent {i}: {e:#}"));
        let (status, layer, body) = t.read(i, "acme", "restart:k").await;
        assert_eq!(status, 404, "agent {i} served {body} from {layer} after Redis came back empty");
        let (_, s) = t.get_json(t.agent(i), "/v1/status").await;
        assert!(s["invalidations"]["full_flushes"].as_u64().unwrap_or(0) >= 1, "agent {i} did not flush: {s}");
    }
    // And the system works again: the coordinator logs in the new epoch.
    wait_ready(&t.http, &t.cluster.coordinator).await.expect("coordinator ready");
    t.put_ok(0, "acme", "restart:k", "", "new").await;
    t.warm("acme", "restart:k").await;
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["restart:k"]})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "restart:k").await;
}

/// Redis restarted empty has an empty registry: an agent that has not
/// re-registered is invisible, yet may still trust its L1 for up to its
/// bound. `wait=all` must not pass before the new epoch is
/// `node_dead_after_ms` old (the stale-read checker found this hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_all_right_after_redis_lost_its_data_waits_for_agents_it_cannot_see_yet() {
    let mut t = TestCluster::start(1, "node_dead_after_ms = 10000\n").await;
    t.put_ok(0, "acme", "settle:k", "", "old").await;
    t.warm("acme", "settle:k").await;
    let port = t.cluster.redis().port;
    t.cluster.redis_mut().proc.kill();
    t.cluster.set_redis(Redis::start_on(t.cluster.dir.path(), port).await.expect("restart Redis"));
    wait_ready(&t.http, &t.cluster.coordinator).await.expect("coordinator ready");

    // Seconds into a 10 s old epoch: whether or not the agent is back in the
    // registry, the barrier cannot pass yet.
    let (status, answer) = t
        .coordinator_post("/v1/invalidate?wait=all&timeout_ms=300", json!({"tenant": "acme", "keys": ["settle:k"]}))
        .await;
    assert_eq!((status, answer["error"].as_str()), (504, Some("timeout")), "{answer}");

    // With the default timeout (node_dead_after_ms + 1 s) it passes, and
    // then the agent, back in the registry, has flushed or applied it.
    let (status, answer) =
        t.coordinator_post("/v1/invalidate?wait=all", json!({"tenant": "acme", "keys": ["settle:k"]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"], json!({"live": 1, "acked": 1}), "{answer}");
    let (status, layer, body) = t.read(0, "acme", "settle:k").await;
    assert_eq!(status, 404, "the agent served {body} from {layer} after wait=all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_invalidation_after_a_redis_restart_is_answered() {
    // The coordinator's group-commit lanes keep their Redis connections
    // between runs; one that Redis closed must not fail the next request.
    let mut t = TestCluster::start(1, "").await;
    let invalidate = json!({"tenant": "acme", "keys": ["lane:k"]});
    // Lanes take turns: a few requests leave every lane holding a connection.
    for _ in 0..4 {
        let (status, answer) = t.coordinator_post("/v1/invalidate", invalidate.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let port = t.cluster.redis().port;
    t.cluster.redis_mut().proc.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    t.cluster.set_redis(Redis::start_on(t.cluster.dir.path(), port).await.expect("restart Redis"));
    wait_ready(&t.http, &t.cluster.coordinator).await.expect("coordinator ready");
    for n in 0..4 {
        let (status, answer) = t.coordinator_post("/v1/invalidate", invalidate.clone()).await;
        assert_eq!(status, 200, "invalidation {n} after the restart failed: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_stream_is_retried_safely_with_the_same_event_ids() {
    let mut t = TestCluster::start(2, "").await;
    // 40 tagged groups of keys, one event each.
    for n in 0..40 {
        for k in 0..5 {
            t.put_ok(0, "acme", &format!("crash:{n}:{k}"), &format!("?tags=item:{n}"), "old").await;
        }
    }
    let base = t.cluster.coordinator.url("");
    let port: u16 = t.cluster.coordinator.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let http = t.http.clone();
    let sent = Arc::new(AtomicUsize::new(0));
    let progress = sent.clone();
    let stream = tokio::spawn(async move {
        let mut failed = Vec::new();
        for n in 0..40 {
            let event =
                json!({"tenant": "acme", "entity": "item", "id": n.to_string(), "event_id": format!("crash-{n}")});
            let ok = http.post(format!("{base}/v1/events")).json(&event).send().await.is_ok_and(|r| r.status() == 200);
            if !ok {
                failed.push(n);
            }
            progress.fetch_add(1, Ordering::AcqRel);
        }
        failed
    });
    // kill -9 in the middle of the stream.
    assert!(wait_until(RECOVERY, || async { sent.load(Ordering::Acquire) >= 10 }).await, "the stream stalled");
    t.cluster.coordinator.proc.kill();
    let failed = stream.await.expect("event stream");
    assert!(!failed.is_empty(), "the coordinator died before the stream ended, so some events failed");

    // Restarted, the client retries every event (those that got a 200 too:
    // it cannot always know). Retries of logged ids are duplicates.
    t.cluster.coordinator =
        start_coordinator(t.cluster.dir.path(), &t.cluster.redis_url(), port, "").expect("restart coordinator");
    wait_ready(&t.http, &t.cluster.coordinator).await.expect("coordinator ready");
    let mut last = 0;
    for n in 0..40 {
        let event = json!({"tenant": "acme", "entity": "item", "id": n.to_string(), "event_id": format!("crash-{n}")});
        let answer = t.event(event).await;
        if !failed.contains(&n) {
            assert_eq!(answer["duplicate"], true, "event {n} got a 200 before, so its retry is a duplicate: {answer}");
        }
        last = last.max(seq(&answer));
    }
    // Every key is gone everywhere, and no drain was left half done.
    t.wait_applied("acme", last).await;
    for n in 0..40 {
        for k in 0..5 {
            for i in 0..2 {
                assert_eq!(status_of(&t, i, &format!("crash:{n}:{k}")).await, 404, "crash:{n}:{k} via agent {i}");
            }
        }
    }
    let mut redis = t.cluster.redis().connection().await.expect("Redis");
    let leftovers: Vec<String> =
        redis::cmd("KEYS").arg(draining("*")).query_async(&mut redis).await.expect("KEYS (test only)");
    assert!(leftovers.is_empty(), "drains left behind: {leftovers:?}");
}

/// A tag drain cut short (its coordinator died after detaching the tag) leaves
/// a draining set; the next invalidation of the tag finishes it, then drains
/// the members stored since, and leaves no draining set behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_invalidation_of_a_tag_finishes_a_drain_cut_short() {
    let t = TestCluster::start(1, "").await;
    let partition = shared::schema::Layout::default().of("acme").clone();
    let mut redis = t.cluster.redis().connection().await.expect("Redis");
    for k in 0..1200 {
        t.put_ok(0, "acme", &format!("left:old:{k}"), "?tags=left", "old").await;
    }
    // What DETACH does before a crash: the tag's set becomes its draining set.
    let _: () = redis::cmd("RENAME")
        .arg(partition.tag("acme", "left"))
        .arg(partition.draining("acme", "left"))
        .query_async(&mut redis)
        .await
        .expect("RENAME");
    for k in 0..3 {
        t.put_ok(0, "acme", &format!("left:new:{k}"), "?tags=left", "new").await;
    }
    let answer = t.invalidate(json!({"tenant": "acme", "tags": ["left"]})).await;
    assert_eq!(answer["l2_deleted"], 1203, "{answer}");
    for key in ["left:old:0", "left:old:1199", "left:new:2"] {
        let exists: bool =
            redis::cmd("EXISTS").arg(entry_key("acme", key)).query_async(&mut redis).await.expect("EXISTS");
        assert!(!exists, "{key} is still in L2");
    }
    for set in [partition.draining("acme", "left"), partition.tag("acme", "left")] {
        let exists: bool = redis::cmd("EXISTS").arg(&set).query_async(&mut redis).await.expect("EXISTS");
        assert!(!exists, "{set} is left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_log() {
    let t = TestCluster::with(ClusterOptions { agents: 2, ..ClusterOptions::default() }).await;
    let second = start_coordinator(t.cluster.dir.path(), &t.cluster.redis_url(), integration_tests::free_port(), "")
        .expect("second coordinator");
    wait_ready(&t.http, &second).await.expect("second coordinator ready");
    let bases = [t.cluster.coordinator.url(""), second.url("")];

    // Both at once, interleaved: every seq is handed out once, with no gap.
    let mut tasks = Vec::new();
    for (c, base) in bases.iter().enumerate() {
        let (http, base) = (t.http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..25 {
                let body = json!({"tenant": "acme", "keys": [format!("two:{c}:{n}")]});
                let resp = http.post(format!("{base}/v1/invalidate?wait=all")).json(&body).send().await;
                let answer: Value = match resp {
                    Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
                    other => panic!("coordinator {c}: {other:?}"),
                };
                seqs.push(seq(&answer));
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    all.sort_unstable();
    let first = all[0];
    assert_eq!(all, (first..first + 50).collect::<Vec<_>>(), "seqs are unique and contiguous");
    t.wait_applied("acme", first + 49).await;
    // Either coordinator's invalidation reaches the agents.
    t.put_ok(0, "acme", "two:k", "", "old").await;
    t.warm("acme", "two:k").await;
    let (status, _) =
        t.post_to(&format!("{}/v1/invalidate?wait=all", bases[1]), json!({"tenant": "acme", "keys": ["two:k"]})).await;
    assert_eq!(status, 200);
    for i in 0..2 {
        assert_eq!(status_of(&t, i, "two:k").await, 404, "agent {i}");
    }
}

/// Redis restored from an old snapshot rewinds the log under the same epoch:
/// the entry an answered invalidation deleted is back in L2, and the next
/// invalidation reuses a seq every agent has already applied. Agents and the
/// coordinator must see the fork: the deleted entry is never served again,
/// and the next invalidation is applied, not skipped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restored_from_an_old_snapshot_is_a_fork_that_undoes_no_answered_invalidation() {
    let mut t =
        TestCluster::with(ClusterOptions { agents: 2, redis: Some("single"), ..ClusterOptions::default() }).await;
    t.put_ok(0, "acme", "snap:a", "", "old-a").await;
    t.put_ok(0, "acme", "snap:b", "", "old-b").await;
    t.warm("acme", "snap:a").await;
    t.warm("acme", "snap:b").await;
    let mut conn = t.cluster.redis().connection().await.expect("redis");
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.expect("SAVE");
    drop(conn);

    let p = usize::from(crate::partition_of("acme"));
    let epoch_before = t.get_json(t.agent(0), "/v1/status").await.1["partitions"][p]["epoch"].clone();
    // Answered after the snapshot, applied by every agent.
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["snap:a"]})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "snap:a").await;

    // Restored: snap:a is back in L2, the log one message shorter, the epoch
    // the same.
    let port = t.cluster.redis().port;
    t.cluster.redis_mut().proc.kill();
    t.cluster.set_redis(Redis::start_on(t.cluster.dir.path(), port).await.expect("restart Redis"));
    let mut conn = t.cluster.redis().connection().await.expect("redis");
    let restored: bool =
        redis::cmd("EXISTS").arg(entry_key("acme", "snap:a")).query_async(&mut conn).await.expect("EXISTS");
    assert!(restored, "the snapshot did not bring snap:a back: the test shows nothing");

    // The next invalidation, as soon as the coordinator answers again: its
    // seq may be one every agent has applied already.
    wait_ready(&t.http, &t.cluster.coordinator).await.expect("coordinator ready");
    let deadline = std::time::Instant::now() + RECOVERY;
    loop {
        let (status, answer) =
            t.coordinator_post("/v1/invalidate", json!({"tenant": "acme", "keys": ["snap:b"]})).await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no invalidation answered after the restore: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From here on neither key is ever served: snap:a's invalidation was
    // answered before the restore, snap:b's after it.
    for i in 0..2 {
        for key in ["snap:a", "snap:b"] {
            let gone = wait_until(RECOVERY, || async {
                let (status, layer, body) = t.read(i, "acme", key).await;
                assert!(status != 200, "agent {i} served {key} = {body} from {layer} after the restore");
                status == 404
            })
            .await;
            assert!(gone, "agent {i} never answered 404 for {key} after the restore");
        }
        // The partition moves to a new epoch (an agent or the coordinator
        // found the fork first; the others follow the new epoch). A 404 above
        // may come before: a read that finds the fork asks for the catch-up
        // that moves the epoch, and does not wait for it.
        let moved = wait_until(RECOVERY, || async {
            let (_, s) = t.get_json(t.agent(i), "/v1/status").await;
            s["partitions"][p]["epoch"] != epoch_before
        })
        .await;
        assert!(moved, "agent {i} is still in the forked epoch");
    }
    // Later invalidations reach every agent.
    t.put_ok(0, "acme", "snap:c", "", "c").await;
    t.warm("acme", "snap:c").await;
    let answer = t.invalidate(json!({"tenant": "acme", "keys": ["snap:c"]})).await;
    t.assert_gone_everywhere(seq(&answer), "acme", "snap:c").await;
}
