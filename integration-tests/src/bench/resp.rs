//! The agent's Redis protocol port against Redis itself, both measured by
//! Redis's own load generator: `redis-benchmark -t set,get -P 1 -c 50`, one
//! run against the port, then one against Redis, alternating.
//!
//! `redis-benchmark` writes and reads one key (`key:__rand_int__`, as it
//! names it without `-r`), so after its SETs every GET through the port is
//! an L1 hit; the bench checks that from the agent's own counters.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use super::{median, ratios, spread, Options, Row};
use crate::{free_port, start_agent, wait_ready};

/// Clients, as the issue states the measure.
const CLIENTS: &str = "50";
/// Value size, as the other hit measures use.
const VALUE_BYTES: &str = "100";

/// requests/s of SET and GET from one `redis-benchmark` run against `port`.
fn redis_benchmark(port: u16, requests: usize) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set,get", "-P", "1", "-c", CLIENTS])
        .args(["-d", VALUE_BYTES, "-n", &requests.to_string(), "--csv"])
        .output()
        .context("running redis-benchmark (make redis installs it, with redis-tools)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("redis-benchmark failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    // "SET","34782.61",... then "GET","51413.88",...
    let rate = |test: &str| -> anyhow::Result<f64> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .with_context(|| format!("no {test} line in redis-benchmark's output: {stdout}"))?;
        let field = line.split(',').nth(1).unwrap_or("").trim_matches('"');
        field.parse().with_context(|| format!("redis-benchmark's {test} rate {field:?}"))
    };
    Ok((rate("SET")?, rate("GET")?))
}

/// L1 hits and misses the agent at `addr` has counted, from `/v1/status`.
async fn l1_counts(client: &reqwest::Client, addr: &str) -> anyhow::Result<(u64, u64)> {
    let status: serde_json::Value = client.get(format!("http://{addr}/v1/status")).send().await?.json().await?;
    let count = |name: &str| status["l1"][name].as_u64().with_context(|| format!("no l1.{name} in {status}"));
    Ok((count("hits")?, count("misses")?))
}

/// Starts an agent with `resp_bind` beside the others (in `dir`, on the Redis
/// at `redis_url`) and measures its port against that Redis.
pub async fn run(options: &Options, dir: &Path, redis_url: &str) -> anyhow::Result<(Vec<Row>, String)> {
    let redis_port: u16 = redis_url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {redis_url}"))?;
    let resp_port = free_port();
    let toml = format!("resp_bind = \"127.0.0.1:{resp_port}\"\nresp_default_tenant = \"bench\"\n");
    let agent = start_agent(dir, redis_url, free_port(), "agent-resp", &toml)?;
    let client = reqwest::Client::new();
    wait_ready(&client, &agent).await?;

    // Requests per run: about `options.run` at the rates seen here (50k-100k/s).
    let requests = (options.run.as_secs_f64() * 50_000.0).max(10_000.0) as usize;
    let (hits_before, misses_before) = l1_counts(&client, &agent.addr).await?;
    let (mut ours_get, mut redis_get, mut ours_set, mut redis_set) = (vec![], vec![], vec![], vec![]);
    for round in 0..options.rounds {
        let (set, get) = redis_benchmark(resp_port, requests)?;
        ours_set.push(set);
        ours_get.push(get);
        let (set, get) = redis_benchmark(redis_port, requests)?;
        redis_set.push(set);
        redis_get.push(get);
        eprintln!(
            "  resp round {}: GET {:.0}/s vs Redis {:.0}/s; SET {:.0}/s vs {:.0}/s",
            round + 1,
            ours_get[round],
            redis_get[round],
            ours_set[round],
            redis_set[round]
        );
    }
    let (hits, misses) = l1_counts(&client, &agent.addr).await?;
    let (hits, misses) = (hits - hits_before, misses - misses_before);
    let gets = (requests * options.rounds) as u64;
    if hits < gets {
        bail!("the port's GETs were not all L1 hits: {hits} hits and {misses} misses for {gets} GETs");
    }
    drop(agent);

    let get_ratio = median(&ratios(&ours_get, &redis_get));
    let set_ratio = median(&ratios(&ours_set, &redis_set));
    let rows = vec![
        Row {
            measure: format!("Redis protocol port: L1-hit GET, redis-benchmark -P 1 -c {CLIENTS}"),
            ours: spread(&ours_get, "GET/s", 0),
            baseline: spread(&redis_get, "GET/s", 0),
            result: format!("{get_ratio:.2}x"),
            target: "≥ 1.0x".into(),
            met: get_ratio >= 1.0,
        },
        Row {
            measure: format!("Redis protocol port: SET (L2 write + L1), redis-benchmark -P 1 -c {CLIENTS}"),
            ours: spread(&ours_set, "SET/s", 0),
            baseline: spread(&redis_set, "SET/s", 0),
            result: format!("{set_ratio:.2}x"),
            target: "(none)".into(),
            met: true,
        },
    ];
    let note = format!(
        "Redis protocol port: `redis-benchmark -t set,get -P 1 -c {CLIENTS} -d {VALUE_BYTES} -n {requests}` \
         against an agent's `resp_bind` (tenant from `resp_default_tenant`, no tokens), then against the \
         Redis it uses, alternating; {hits} L1 hits and {misses} misses counted by the agent for {gets} GETs. \
         A SET through the port is a Redis SET plus its tag bookkeeping and the L1 insert, so it cannot \
         match a bare SET. redis-benchmark, the agent and Redis share the same 2 cores."
    );
    Ok((rows, note))
}
