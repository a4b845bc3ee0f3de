//! Encryption at rest: values that `[[encrypt]]` rules name reach Redis only
//! as ciphertext (every key of the Redis is read back and searched for the
//! plaintext), read back as plaintext through another agent, survive a key
//! rotation, and a value that cannot be decrypted is a miss and a metric.

use std::collections::HashMap;

use base64::Engine;
use redis::AsyncCommands;

use integration_tests::{free_port, start_agent, wait_ready, ClusterOptions};

use crate::{entry_key, TestCluster};

/// A key setting: `id:` and 32 bytes of `byte`, base64.
fn key(id: &str, byte: u8) -> String {
    format!("{id}:{}", base64::engine::general_purpose::STANDARD.encode([byte; 32]))
}

/// An agent's config: patients of clinic are sealed, with `keys`.
fn agent_toml(keys: &str) -> String {
    format!("encryption_keys = \"{keys}\"\n[[encrypt]]\ntenant = \"clinic\"\nkeys = \"patient:*\"\n")
}

/// A stream entry's fields.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Every byte Redis holds under every key, key name included, as one list
/// of (key, bytes) records: strings, hashes, sets, sorted sets, lists and
/// streams read in full.
async fn everything_in_redis(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(String, Vec<u8>)> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(conn).await.expect("KEYS");
    let mut out = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(conn).await.expect("TYPE");
        let mut bytes = k.as_bytes().to_vec();
        let mut add = |chunks: Vec<Vec<u8>>| {
            for c in chunks {
                bytes.push(0);
                bytes.extend(c);
            }
        };
        match kind.as_str() {
            "string" => add(vec![conn.get::<_, Vec<u8>>(&k).await.expect("GET")]),
            "hash" => {
                let h: HashMap<Vec<u8>, Vec<u8>> = conn.hgetall(&k).await.expect("HGETALL");
                add(h.into_iter().flat_map(|(f, v)| [f, v]).collect())
            }
            "set" => add(conn.smembers(&k).await.expect("SMEMBERS")),
            "zset" => add(conn.zrange(&k, 0, -1).await.expect("ZRANGE")),
            "list" => add(conn.lrange(&k, 0, -1).await.expect("LRANGE")),
            "stream" => {
                let entries: Vec<(String, Fields)> =
                    redis::cmd("XRANGE").arg(&k).arg("-").arg("+").query_async(conn).await.expect("XRANGE");
                add(entries.into_iter().flat_map(|(_, fields)| fields.into_iter().flat_map(|(f, v)| [f, v])).collect())
            }
            other => panic!("{k} is a {other}: this test does not read that type yet"),
        }
        out.push((k, bytes));
    }
    out
}

/// The keys whose bytes hold any 8-byte run of `plaintext`.
fn holders(records: &[(String, Vec<u8>)], plaintext: &[u8]) -> Vec<String> {
    let runs: Vec<&[u8]> = plaintext.windows(8).collect();
    records.iter().filter(|(_, b)| runs.iter().any(|r| b.windows(8).any(|w| w == *r))).map(|(k, _)| k.clone()).collect()
}

/// The agent's `dcc_decrypt_errors_total`.
async fn decrypt_errors(t: &TestCluster, agent: &integration_tests::Service) -> u64 {
    let text = t.http.get(agent.url("/metrics")).send().await.expect("metrics").text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("dcc_decrypt_errors_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no dcc_decrypt_errors_total in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_values_never_reach_redis_in_plaintext_and_read_back_everywhere() {
    let old_key = key("k1", 1);
    let t = TestCluster::with(ClusterOptions {
        agents: 2,
        agent_toml: agent_toml(&old_key),
        redis: Some("single"),
        ..ClusterOptions::default()
    })
    .await;
    let secret = "Jane Doe, born 1970-01-01, diagnosis: confidential-7731";
    let open = "Room 12 is on the second floor, by the lifts";
    t.put_ok(0, "clinic", "patient:7", "?tags=ward:3", secret).await;
    t.put_ok(0, "clinic", "room:12", "", open).await;

    // Redis holds the unsealed value (so the search below can see a
    // plaintext), and no run of 8 bytes of the sealed one anywhere.
    let mut conn = t.cluster.redis().connection().await.expect("redis");
    let records = everything_in_redis(&mut conn).await;
    assert!(!records.is_empty(), "nothing read from Redis");
    assert_eq!(holders(&records, open.as_bytes()), vec![entry_key("clinic", "room:12")], "the unsealed value");
    assert_eq!(holders(&records, secret.as_bytes()), Vec::<String>::new(), "the sealed value shows in Redis");
    let stored: HashMap<String, Vec<u8>> = conn.hgetall(entry_key("clinic", "patient:7")).await.expect("HGETALL");
    assert_eq!(stored.get("x").map(|v| v.as_slice()), Some(&b"k1"[..]), "the key id is stored with the value");

    // Agent 0 answers from L1 (plaintext); agent 1 opens it from L2, then L1.
    assert_eq!(t.read(0, "clinic", "patient:7").await, (200, "L1".into(), secret.into()));
    assert_eq!(t.read(1, "clinic", "patient:7").await, (200, "L2".into(), secret.into()));
    t.warm("clinic", "patient:7").await;
    assert_eq!(t.read(1, "clinic", "patient:7").await, (200, "L1".into(), secret.into()));

    // Rotation: an agent with a new key first and the old one after opens
    // what the old key sealed, and seals new writes with the new key.
    let rotated_keys = format!("{},{old_key}", key("k2", 2));
    let rotated = start_agent(
        t.cluster.dir.path(),
        &t.cluster.redis_url(),
        free_port(),
        "agent-rotated",
        &agent_toml(&rotated_keys),
    )
    .expect("rotated agent");
    wait_ready(&t.http, &rotated).await.unwrap_or_else(|e| panic!("{e:#}"));
    let get = |path: &str| t.http.get(rotated.url(path)).send();
    let resp = get("/v1/cache/clinic/patient:7").await.expect("GET");
    assert_eq!((resp.status().as_u16(), resp.text().await.unwrap_or_default()), (200, secret.to_string()));
    let newer = "John Roe, born 1980-02-02, diagnosis: confidential-9917";
    let put = t.http.put(rotated.url("/v1/cache/clinic/patient:8")).body(newer).send().await.expect("PUT");
    assert_eq!(put.status(), 204);
    let stored: HashMap<String, Vec<u8>> = conn.hgetall(entry_key("clinic", "patient:8")).await.expect("HGETALL");
    assert_eq!(stored.get("x").map(|v| v.as_slice()), Some(&b"k2"[..]), "new writes use the first key");
    assert_eq!(holders(&everything_in_redis(&mut conn).await, newer.as_bytes()), Vec::<String>::new());

    // Agent 1 lacks k2: patient:8 is a miss (with a fill token), counted,
    // never garbage or a 5xx.
    let before = decrypt_errors(&t, t.agent(1)).await;
    let resp = t.get(1, "clinic", "patient:8").await;
    assert_eq!(resp.status().as_u16(), 404, "a value sealed with an unknown key");
    assert!(!crate::header(&resp, "x-cache-fill-token").is_empty(), "the miss carries a fill token");
    assert!(decrypt_errors(&t, t.agent(1)).await > before, "the failure is counted");

    // Altered bytes in Redis do not authenticate: a miss, counted, on an
    // agent that has the key but not the entry in L1.
    let mut bytes = conn.hget::<_, _, Vec<u8>>(entry_key("clinic", "patient:8"), "v").await.expect("HGET");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let _: () = conn.hset(entry_key("clinic", "patient:8"), "v", bytes).await.expect("HSET");
    let before = decrypt_errors(&t, t.agent(0)).await;
    assert_eq!(t.read(0, "clinic", "patient:8").await.0, 404, "altered ciphertext");
    assert!(decrypt_errors(&t, t.agent(0)).await > before, "the failure is counted");

    // A plaintext value under a key a rule names (written before the rule,
    // or by someone who may write to Redis) is not served either.
    let planted = entry_key("clinic", "patient:8");
    let _: () = conn.hdel(&planted, "x").await.expect("HDEL");
    let _: () = conn.hset(&planted, "v", "planted plaintext").await.expect("HSET");
    let before = decrypt_errors(&t, t.agent(0)).await;
    assert_eq!(t.read(0, "clinic", "patient:8").await.0, 404, "an unencrypted value a rule names");
    assert!(decrypt_errors(&t, t.agent(0)).await > before, "the refusal is counted");

    // A fill after the miss stores it again, and everyone reads it.
    t.put_ok(0, "clinic", "patient:8", "", newer).await;
    assert_eq!(t.read(1, "clinic", "patient:8").await, (200, "L2".into(), newer.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_rules_without_keys_are_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = "[[encrypt]]\ntenant = \"clinic\"\n";
    let mut agent = start_agent(dir.path(), "redis://127.0.0.1:1", free_port(), "agent-nokeys", toml).expect("spawn");
    let status = agent.proc.wait_exit(std::time::Duration::from_secs(30)).expect("the agent exits");
    assert_eq!(status.code(), Some(2), "a configuration error exits with 2:\n{}", agent.proc.log_tail());
    let log = std::fs::read_to_string(&agent.proc.log).unwrap_or_default();
    assert!(log.contains("encryption_keys"), "the message names the missing setting:\n{log}");
}
