//! Invalidation at scale (a tag of 100k keys, a pattern over a tenant of 1M
//! keys) with the longest single blocking of Redis, and agent memory per L1
//! entry.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use redis::AsyncCommands;
use serde_json::{json, Value};

use super::{Options, Row};

/// Tasks that load entries, each with its own connection.
const LOADERS: usize = 32;

/// Writes `count` entries `{prefix}{i}` of 100 bytes into L2 the way an
/// agent's `PUT` does (entry, tenant index, tag sets), through `l2::put`.
async fn load_l2(redis: &redis::Client, tenant: &str, prefix: &str, tags: &[&str], count: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for t in 0..LOADERS {
        let mut conn = redis.get_multiplexed_async_connection().await?;
        let (tenant, prefix) = (tenant.to_string(), prefix.to_string());
        let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        tasks.push(tokio::spawn(async move {
            let entry = shared::l2::Entry {
                value: vec![b'v'; 100],
                content_type: "application/octet-stream".into(),
                tags,
                depends_on: Vec::new(),
                ttl_ms: 3_600_000,
                written_ttl_ms: 0,
                sealed_by: None,
            };
            for i in (t..count).step_by(LOADERS) {
                let partition = shared::schema::Layout::default().of(&tenant).clone();
                shared::l2::put(&mut conn, &partition, &tenant, &format!("{prefix}{i}"), &entry, None, false)
                    .await?
                    .map_err(|e| anyhow::anyhow!("load refused: {e:?}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Runs one invalidation and returns (seconds it took, entries deleted,
/// longest Redis command meanwhile in µs and its name, from `SLOWLOG`, and
/// the CPU seconds Redis's main thread spent meanwhile).
async fn timed_invalidation(
    coordinator: &str,
    redis: &redis::Client,
    body: Value,
) -> anyhow::Result<(f64, u64, (u64, String), f64)> {
    let mut conn = redis.get_multiplexed_async_connection().await?;
    // Every command over 100 µs is logged while the invalidation runs.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg(100).query_async(&mut conn).await?;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("slowlog-max-len").arg(100_000).query_async(&mut conn).await?;
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query_async(&mut conn).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let cpu_before = main_thread_cpu(&mut conn).await?;
    let started = Instant::now();
    let resp = http.post(format!("{coordinator}/v1/invalidate")).json(&body).send().await?;
    let took = started.elapsed().as_secs_f64();
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 200 {
        bail!("invalidate {body} answered {status}: {answer}");
    }
    let busy = main_thread_cpu(&mut conn).await? - cpu_before;
    // SLOWLOG GET entries: [id, timestamp, duration µs, [args], client, name].
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG").arg("GET").arg(-1).query_async(&mut conn).await?;
    let longest = log
        .iter()
        .filter_map(|e| match e {
            redis::Value::Array(fields) => {
                let micros = fields.get(2).and_then(|d| redis::from_redis_value::<u64>(d.clone()).ok())?;
                let args: Vec<String> =
                    fields.get(3).and_then(|a| redis::from_redis_value(a.clone()).ok()).unwrap_or_default();
                let command = args.first().cloned().unwrap_or_default();
                // Not the bench's own SLOWLOG RESET (logged after it emptied the log).
                (!command.eq_ignore_ascii_case("SLOWLOG")).then_some((micros, command))
            }
            _ => None,
        })
        .max()
        .unwrap_or_default();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg(10_000).query_async(&mut conn).await?;
    Ok((took, answer["l2_deleted"].as_u64().unwrap_or(0), longest, busy))
}

/// CPU seconds (user and system) Redis's main thread has used, from `INFO cpu`.
async fn main_thread_cpu(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<f64>().ok())
            .with_context(|| format!("INFO cpu has no {name}"))
    };
    Ok(field("used_cpu_user_main_thread")? + field("used_cpu_sys_main_thread")?)
}

/// Measure 6: one tag of `tag_keys` keys, and a pattern over a tenant of `tenant_keys` keys.
pub async fn invalidation(options: &Options, coordinator: &str, redis_url: &str) -> anyhow::Result<(Vec<Row>, String)> {
    let redis = redis::Client::open(redis_url)?;
    let n = options.tag_keys;
    let started = Instant::now();
    load_l2(&redis, "scale-tag", "item:", &["big"], n).await?;
    eprintln!("  loaded {n} tagged entries in {:.1} s", started.elapsed().as_secs_f64());
    let (tag_secs, tag_deleted, tag_block, tag_busy) =
        timed_invalidation(coordinator, &redis, json!({"tenant": "scale-tag", "tags": ["big"]})).await?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let left: usize =
        conn.exists(shared::schema::Layout::default().of("scale-tag").value("scale-tag", "item:0")).await?;
    if tag_deleted != n as u64 || left != 0 {
        bail!("the tag invalidation deleted {tag_deleted} of {n} entries");
    }

    let m = options.tenant_keys;
    let started = Instant::now();
    load_l2(&redis, "scale-pattern", "row:", &[], m).await?;
    eprintln!("  loaded {m} entries in {:.1} s", started.elapsed().as_secs_f64());
    // row:99* matches about 1.1% of the keys (row:99, row:990..., row:9900...).
    let expected = (0..m).filter(|i| i.to_string().starts_with("99")).count() as u64;
    let (pattern_secs, pattern_deleted, pattern_block, pattern_busy) =
        timed_invalidation(coordinator, &redis, json!({"tenant": "scale-pattern", "patterns": ["row:99*"]})).await?;
    if pattern_deleted != expected {
        bail!("the pattern invalidation deleted {pattern_deleted}, expected {expected}");
    }
    let rows = vec![
        Row {
            measure: format!("invalidate one tag of {n} keys"),
            ours: format!(
                "{tag_secs:.2} s in all, Redis busy {tag_busy:.2} s of it; longest Redis call {:.1} ms ({})",
                tag_block.0 as f64 / 1e3,
                tag_block.1
            ),
            baseline: "—".into(),
            result: format!("{tag_secs:.2} s, {:.1} ms", tag_block.0 as f64 / 1e3),
            target: "≤ 1 s, no call over 10 ms".into(),
            met: tag_secs <= 1.0 && tag_block.0 <= 10_000,
        },
        Row {
            measure: format!("invalidate a pattern over a tenant of {m} keys ({expected} match)"),
            ours: format!(
                "{pattern_secs:.2} s in all, Redis busy {pattern_busy:.2} s of it; longest Redis call {:.1} ms ({})",
                pattern_block.0 as f64 / 1e3,
                pattern_block.1
            ),
            baseline: "—".into(),
            result: format!("{pattern_secs:.2} s, {:.1} ms", pattern_block.0 as f64 / 1e3),
            target: "(reported; no call over 10 ms)".into(),
            met: pattern_block.0 <= 10_000,
        },
    ];
    let note = format!(
        "Scale: entries loaded straight into L2 with `shared::l2::put` (the script an agent's PUT runs), \
         then one `POST /v1/invalidate` timed by the client until its 200 (everything deleted from L2 and \
         logged). The longest Redis call is the largest duration in `SLOWLOG` (threshold 100 µs) during \
         the invalidation; other clients (agents' heartbeats) count too. Redis busy: the CPU time of Redis's \
         main thread meanwhile (`INFO cpu`), so the rest of the total is round trips and the coordinator. The tag covers {n} keys; the \
         pattern `row:99*` matches {expected} of {m}."
    );
    Ok((rows, note))
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Measure 7: an agent's RSS per L1 entry after `l1_entries` PUTs of 100
/// bytes, against the bytes stored (key and value).
pub async fn memory(options: &Options, agent_addr: &str, agent_pid: u32) -> anyhow::Result<(Vec<Row>, String)> {
    let count = options.l1_entries;
    let before = rss(agent_pid)?;
    let mut tasks = Vec::new();
    let started = Instant::now();
    for t in 0..LOADERS {
        let addr = agent_addr.to_string();
        let stream = tokio::net::TcpStream::connect(&addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        tasks.push(tokio::spawn(async move {
            let value = Bytes::from(vec![b'v'; 100]);
            for i in (t..count).step_by(LOADERS) {
                sender.ready().await?;
                let request = hyper::Request::put(format!("/v1/cache/mem/m:{i:07}?ttl=3600"))
                    .header(hyper::header::HOST, &addr)
                    .body(Full::new(value.clone()))?;
                let status = sender.send_request(request).await?.status();
                if status != 204 {
                    bail!("PUT answered {status}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    eprintln!("  stored {count} entries through the agent in {:.1} s", started.elapsed().as_secs_f64());
    let status: Value = reqwest::get(format!("http://{agent_addr}/v1/status")).await?.json().await?;
    let entries = status["l1"]["entries"].as_u64().unwrap_or(0);
    if entries != count as u64 {
        bail!("L1 holds {entries} entries, not {count}: {status}");
    }
    let after = rss(agent_pid)?;
    let stored = count as u64 * (100 + 9); // "m:" + 7 digits, and the value
    let per_entry = after.saturating_sub(before) as f64 / count as f64;
    let ratio = after.saturating_sub(before) as f64 / stored as f64;
    let row = Row {
        measure: format!("agent memory with {count} L1 entries of 100 bytes"),
        ours: format!(
            "RSS {:.0} MiB → {:.0} MiB: {per_entry:.0} bytes per entry",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        ),
        baseline: format!("{:.0} MiB stored (109 bytes per entry)", stored as f64 / 1048576.0),
        result: format!("{ratio:.2}x the bytes stored"),
        target: "≤ 2x, plus a fixed overhead".into(),
        met: ratio <= 2.0,
    };
    let floor = moka_floor(count).await?;
    let floor_row = Row {
        measure: format!("the same {count} entries in a bare moka cache (L1's settings, no indexes)"),
        ours: format!("{floor:.0} bytes per entry"),
        baseline: "109 bytes per entry".into(),
        result: format!("{:.2}x the bytes stored", floor / 109.0),
        target: "(reported: the floor under L1)".into(),
        met: true,
    };
    let note = format!(
        "Memory: a dedicated agent process (l1_max_bytes 1 GiB); {count} PUTs of 100-byte values with \
         9-byte keys through its HTTP API; RSS (`VmRSS`) read before and after, the growth divided by the \
         entries. The fixed overhead is the RSS before ({:.0} MiB). The floor: a child process of the bench \
         (mimalloc, as the agent) fills a bare `moka::sync::Cache<String, Bytes>` with the same names and \
         values and L1's settings (byte weigher, per-entry expiry, removal listener), and reports its RSS \
         growth per entry: what moka itself costs, before any index of ours.",
        before as f64 / 1048576.0
    );
    Ok((vec![row, floor_row], note))
}

/// Runs [`moka_floor_child`] in a child process (a clean heap) and reads its answer.
async fn moka_floor(count: usize) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe).arg("--moka-floor").arg(count.to_string()).output().await?;
    if !out.status.success() {
        bail!("the moka floor child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().map_err(|e| anyhow::anyhow!("the moka floor child printed {text:?}: {e}"))
}

/// In the child: RSS growth per entry of a bare moka cache holding `count`
/// 100-byte values under the names L1 gives them ("mem", NUL, "m:0000000").
pub fn moka_floor_child(count: usize) -> anyhow::Result<f64> {
    struct Ttl;
    impl moka::Expiry<String, Bytes> for Ttl {
        fn expire_after_create(&self, _: &String, _: &Bytes, _: std::time::Instant) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    let pid = std::process::id();
    let before = rss(pid)?;
    let cache: moka::sync::Cache<String, Bytes> = moka::sync::Cache::builder()
        .max_capacity(1 << 30)
        .weigher(|k: &String, v: &Bytes| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
        .expire_after(Ttl)
        .eviction_listener(|_, _, _| {})
        .build();
    for i in 0..count {
        cache.insert(format!("mem\0m:{i:07}"), Bytes::from(vec![b'v'; 100]));
    }
    cache.run_pending_tasks();
    if cache.entry_count() != count as u64 {
        bail!("the bare cache holds {} entries, not {count}", cache.entry_count());
    }
    let after = rss(pid)?;
    Ok(after.saturating_sub(before) as f64 / count as f64)
}
