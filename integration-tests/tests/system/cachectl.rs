//! `cachectl` against a real cluster with tokens: every command, in both
//! output modes, with the exit statuses of the contract (0 done, 1 refused,
//! 2 usage, 3 not authorized, 4 `--wait` timed out, 5 not found).

use std::process::Stdio;

use integration_tests::bin_path;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::{TestCluster, PROPAGATION_DEADLINE};

const OPS: &str = "cachectl-ops-secret";
const READER: &str = "cachectl-reader-secret";

fn tokens() -> String {
    let token = crate::token_toml;
    [token("ops", OPS, "[]", r#"["admin"]"#), token("reader", READER, r#"["acme"]"#, r#"["read"]"#)].concat()
}

/// What a run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `cachectl` against the cluster as `secret`, with `stdin`.
async fn cachectl(t: &TestCluster, secret: Option<&str>, args: &[&str], stdin: &[u8]) -> Run {
    let mut cmd = tokio::process::Command::new(bin_path("cachectl"));
    cmd.arg("--coordinator")
        .arg(t.cluster.coordinator.url(""))
        .arg("--agent")
        .arg(t.agent(0).url(""))
        .args(args)
        .env_remove("DCC_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(secret) = secret {
        cmd.env("DCC_TOKEN", secret);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cachectl: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).await.expect("stdin");
    }
    let out = child.wait_with_output().await.expect("cachectl runs");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("cachectl {args:?} -> {}\n{}{}", run.code, run.stdout, run.stderr);
    run
}

/// Runs as the admin and expects exit 0.
async fn ok(t: &TestCluster, args: &[&str]) -> Run {
    let run = cachectl(t, Some(OPS), args, b"").await;
    assert_eq!(run.code, 0, "cachectl {args:?}: {}", run.stderr);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cachectl_runs_every_command_in_both_output_modes_with_the_contracts_exit_statuses() {
    let t = TestCluster::with(integration_tests::ClusterOptions {
        agents: 1,
        coordinator_toml: format!("{}\n{}", integration_tests::deploy_coordinator_toml(), tokens()),
        agent_toml: tokens(),
        ..integration_tests::ClusterOptions::default()
    })
    .await;

    // put (stdin, and a file), get in both modes.
    let run =
        cachectl(&t, Some(OPS), &["-o", "json", "put", "acme", "k1", "--tags", "t1,t2", "--ttl", "600"], b"hello")
            .await;
    assert_eq!((run.code, run.json()["stored"].as_bool()), (0, Some(true)), "{}", run.stderr);
    let file = t.cluster.dir.path().join("value.bin");
    std::fs::write(&file, b"from a file").expect("write");
    ok(&t, &["-o", "table", "put", "acme", "k2", "--file", &file.display().to_string()]).await;
    assert_eq!(ok(&t, &["-o", "table", "get", "acme", "k1"]).await.stdout, "hello");
    let got = ok(&t, &["-o", "json", "get", "acme", "k1"]).await.json();
    assert_eq!((got["value"].as_str(), got["tags"].clone()), (Some("hello"), serde_json::json!(["t1", "t2"])), "{got}");
    assert!(got["ttl_secs"].as_u64().is_some_and(|s| s > 500), "{got}");

    // Views: health, nodes, rules, keys, audit.
    let health = ok(&t, &["-o", "json", "health"]).await.json();
    assert!(health["seq"].is_u64(), "{health}");
    assert!(ok(&t, &["-o", "table", "health"]).await.stdout.contains("agent-1"));
    let nodes = ok(&t, &["-o", "json", "nodes"]).await.json();
    assert_eq!(nodes[0]["node_id"], "agent-1", "{nodes}");
    assert!(ok(&t, &["-o", "table", "nodes"]).await.stdout.contains("agent-1"));
    assert!(ok(&t, &["-o", "json", "rules"]).await.json()["rules"].is_array());
    assert!(ok(&t, &["-o", "table", "rules"]).await.stdout.contains("supplier"));
    let keys = ok(&t, &["-o", "json", "keys", "acme", "k*"]).await.json();
    let listed: Vec<&str> = keys["keys"].as_array().into_iter().flatten().filter_map(|k| k["key"].as_str()).collect();
    assert_eq!(listed.len(), 2, "{keys}");
    assert!(listed.contains(&"k1") && listed.contains(&"k2"), "{keys}");
    assert_eq!(
        ok(&t, &["-o", "json", "keys", "acme", "--limit", "1"]).await.json()["keys"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(ok(&t, &["-o", "table", "keys", "acme"]).await.stdout.contains("k2"));

    // stats: the reads above reach the coordinator with the agent's heartbeats.
    let read_k1 = |stats: &Value| {
        let tenants = stats["tenants"].as_array().cloned().unwrap_or_default();
        tenants.iter().any(|x| {
            let hits = x["l1_hits"].as_u64().unwrap_or(0) + x["l2_hits"].as_u64().unwrap_or(0);
            x["tenant"] == "acme" && hits >= 2 && x["top_keys"][0]["key"] == "k1"
        })
    };
    let counted = crate::wait_until(PROPAGATION_DEADLINE, || async {
        let run = cachectl(&t, Some(OPS), &["-o", "json", "stats"], b"").await;
        run.code == 0 && read_k1(&run.json())
    })
    .await;
    assert!(counted, "the reads of acme/k1 never showed in cachectl stats");
    let shown = ok(&t, &["-o", "table", "stats"]).await.stdout;
    assert!(shown.contains("acme") && shown.contains("most read keys") && shown.contains("k1"), "{shown}");
    let mine = cachectl(&t, Some(READER), &["-o", "json", "stats", "acme"], b"").await;
    assert_eq!(mine.code, 0, "{}", mine.stderr);
    let tenants = mine.json()["tenants"].as_array().cloned().unwrap_or_default();
    assert!(!tenants.is_empty() && tenants.iter().all(|x| x["tenant"] == "acme"), "{}", mine.stdout);
    let theirs = cachectl(&t, Some(READER), &["stats", "globex"], b"").await;
    assert_eq!(theirs.code, 3, "another tenant's stats: {}", theirs.stderr);
    let bad = cachectl(&t, Some(OPS), &["stats", "not a tenant"], b"").await;
    assert_eq!(bad.code, 1, "the server refuses a malformed tenant: {}", bad.stderr);

    // invalidate: a dry run changes nothing, then --wait, then the key is gone (exit 5).
    let dry = ok(&t, &["-o", "json", "invalidate", "acme", "--tag", "t1", "--dry-run"]).await.json();
    assert_eq!((dry["dry_run"].as_bool(), dry["count"].as_u64()), (Some(true), Some(1)), "{dry}");
    assert!(ok(&t, &["-o", "table", "invalidate", "acme", "--tag", "t1", "--dry-run"]).await.stdout.contains("k1"));
    assert_eq!(ok(&t, &["get", "acme", "k1"]).await.code, 0);
    let done = ok(&t, &["-o", "json", "invalidate", "acme", "--tag", "t1", "--wait"]).await.json();
    assert_eq!(done["nodes"]["acked"], 1, "{done}");
    let missing = cachectl(&t, Some(OPS), &["get", "acme", "k1"], b"").await;
    assert_eq!(missing.code, 5, "a key that is not cached: {}", missing.stderr);
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);

    // event and del, in both modes.
    let event = ok(&t, &["-o", "json", "event", "acme", "supplier", "42", "--event-id", "e-1", "--wait"]).await.json();
    assert!(event["positions"].is_array() && event["nodes"]["acked"] == 1, "{event}");
    assert_eq!(
        ok(&t, &["-o", "json", "event", "acme", "supplier", "42", "--event-id", "e-1"]).await.json()["duplicate"],
        true
    );
    assert!(ok(&t, &["-o", "table", "event", "acme", "supplier", "43"]).await.stdout.contains("seq"));
    let del = ok(&t, &["-o", "json", "del", "acme", "k2"]).await.json();
    assert!(del["seq"].is_u64(), "{del}");
    assert!(ok(&t, &["-o", "table", "del", "acme", "k2"]).await.stdout.contains("invalidated acme/k2"));

    // The audit trail holds what was done, with who.
    let audit = ok(&t, &["-o", "json", "audit", "--tenant", "acme", "--limit", "50"]).await.json();
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    assert!(entries.iter().any(|e| e["action"] == "delete" && e["token"] == "ops"), "{audit}");
    assert!(ok(&t, &["-o", "table", "audit", "--limit", "5"]).await.stdout.contains("ops"));

    // Exit statuses: 3 not authorized (no token, a wrong one, a missing scope).
    for secret in [None, Some("wrong")] {
        let run = cachectl(&t, secret, &["health"], b"").await;
        assert_eq!(run.code, 3, "{secret:?}: {}", run.stderr);
        assert!(run.stderr.contains("unauthorized"), "{}", run.stderr);
    }
    let run = cachectl(&t, Some(READER), &["invalidate", "acme", "--key", "k"], b"").await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("forbidden"), "{}", run.stderr);
    // 1: the server refused (nothing to invalidate), with its code.
    let run = cachectl(&t, Some(OPS), &["invalidate", "acme"], b"").await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("nothing_to_invalidate"), "{}", run.stderr);
    // 2: a usage error.
    for args in [&["no-such-command"][..], &["get", "acme"], &["keys", "acme", "--limit", "0"]] {
        assert_eq!(cachectl(&t, Some(OPS), args, b"").await.code, 2, "{args:?}");
    }
    // 4: --wait ran out of time (the agent is frozen).
    t.agent(0).proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let run =
        cachectl(&t, Some(OPS), &["invalidate", "acme", "--key", "k", "--wait", "--timeout-ms", "300"], b"").await;
    t.agent(0).proc.signal(Signal::SIGCONT).expect("SIGCONT");
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert!(run.stderr.contains("timeout"), "{}", run.stderr);

    // The environment stands in for the flags.
    let out = tokio::process::Command::new(bin_path("cachectl"))
        .args(["-o", "json", "nodes"])
        .env("DCC_COORDINATOR_URL", t.cluster.coordinator.url(""))
        .env("DCC_TOKEN", OPS)
        .output()
        .await
        .expect("cachectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The agent is back: it answers again.
    let back = crate::wait_until(PROPAGATION_DEADLINE, || async {
        cachectl(&t, Some(OPS), &["get", "acme", "k2"], b"").await.code == 5
    })
    .await;
    assert!(back, "the agent did not answer after SIGCONT");
}

/// A running `cachectl ... watch`, killed on drop.
struct Watch {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watch {
    fn start(t: &TestCluster, args: &[&str]) -> Watch {
        let mut child = tokio::process::Command::new(bin_path("cachectl"))
            .arg("--coordinator")
            .arg(t.cluster.coordinator.url(""))
            .args(args)
            .env("DCC_TOKEN", OPS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cachectl watch: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        Watch { child, lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)) }
    }

    /// Invalidates `acme/watch:N` (and `globex/watch:N`, which an acme filter
    /// must hide) once a second until a line naming an acme key comes; the
    /// watcher may not be connected before the first ones. Returns every line read.
    async fn until_acme_line(&mut self, t: &TestCluster) -> Vec<String> {
        let mut read = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
        for n in 0.. {
            assert!(std::time::Instant::now() < deadline, "cachectl watch printed no invalidation: {read:?}");
            for tenant in ["globex", "acme"] {
                let body = serde_json::json!({"tenant": tenant, "keys": [format!("watch:{n}")]});
                let resp = t
                    .http
                    .post(t.cluster.coordinator.url("/v1/invalidate"))
                    .bearer_auth(OPS)
                    .json(&body)
                    .send()
                    .await
                    .expect("POST /v1/invalidate");
                assert_eq!(resp.status().as_u16(), 200);
            }
            let second = tokio::time::sleep(std::time::Duration::from_secs(1));
            tokio::pin!(second);
            loop {
                tokio::select! {
                    line = self.lines.next_line() => {
                        let line = line.expect("reading cachectl's output").expect("cachectl watch ended");
                        let done = line.contains("acme") && line.contains("watch:");
                        read.push(line);
                        if done {
                            return read;
                        }
                    }
                    _ = &mut second => break,
                }
            }
        }
        unreachable!()
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cachectl_watch_prints_each_invalidation_as_a_line_or_as_json_until_killed() {
    let t = TestCluster::with(integration_tests::ClusterOptions {
        agents: 1,
        coordinator_toml: tokens(),
        agent_toml: tokens(),
        ..integration_tests::ClusterOptions::default()
    })
    .await;

    // -o json: one JSON object a line, each an invalidation.
    let mut watch = Watch::start(&t, &["-o", "json", "watch"]);
    let lines = watch.until_acme_line(&t).await;
    watch.stop().await;
    for line in &lines {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["seq"].is_u64() && event["id"].is_string(), "{event}");
    }
    let last: Value = serde_json::from_str(lines.last().expect("a line")).expect("JSON");
    assert_eq!(last["invalidations"][0]["tenant"], "acme", "{last}");
    assert!(last["invalidations"][0]["keys"][0].as_str().is_some_and(|k| k.starts_with("watch:")), "{last}");

    // A table, filtered to acme: a header, then lines without globex.
    let mut watch = Watch::start(&t, &["-o", "table", "watch", "--tenant", "acme"]);
    let lines = watch.until_acme_line(&t).await;
    watch.stop().await;
    assert!(lines[0].starts_with("TIME") && lines[0].contains("TENANT"), "{lines:?}");
    assert!(lines[1..].iter().all(|l| l.contains("acme") && l.contains("key watch:")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("globex")), "{lines:?}");

    // Refused: 3 without a token or with a token for other tenants, 1 for a bad tenant.
    let run = cachectl(&t, None, &["watch"], b"").await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    let run = cachectl(&t, Some(READER), &["watch", "--tenant", "globex"], b"").await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("forbidden"), "{}", run.stderr);
    let run = cachectl(&t, Some(OPS), &["watch", "--tenant", "no such"], b"").await;
    assert_eq!(run.code, 1, "{}", run.stderr);
}
