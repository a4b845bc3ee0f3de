//! A miss herd: 200 concurrent misses of one cold key spread over 8 agents,
//! every caller that gets a 404 "loading from the database" (a 50 ms pause)
//! and filling with its token. Counted: the loads, with the agents' miss
//! leases, and with 8 agents alike but `lease_ms = 0`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{median, spread, Options, Row};

/// Concurrent misses per herd.
pub const CALLERS: usize = 200;

/// How long one "database load" takes.
const LOAD: Duration = Duration::from_millis(50);

/// One herd on `agents` (base URLs) for `key`: the loads, and the time
/// until every caller had the value.
async fn herd(http: &reqwest::Client, agents: &[String], key: &str) -> anyhow::Result<(usize, Duration)> {
    let loads = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::with_capacity(CALLERS);
    for i in 0..CALLERS {
        let (http, loads) = (http.clone(), loads.clone());
        let url = format!("{}/v1/cache/bench/{key}", agents[i % agents.len()]);
        callers.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await?;
            match resp.status().as_u16() {
                200 => {}
                404 => {
                    loads.fetch_add(1, Ordering::Relaxed);
                    let token = resp
                        .headers()
                        .get("x-cache-fill-token")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    tokio::time::sleep(LOAD).await;
                    let put = http.put(format!("{url}?fill_token={token}")).body("loaded").send().await?;
                    // 409: another caller's fill landed first with a newer
                    // token's write in between; the value is there either way.
                    if !put.status().is_success() && put.status() != 409 {
                        bail!("PUT answered {}", put.status());
                    }
                }
                other => bail!("GET answered {other}"),
            }
            anyhow::Ok(())
        }));
    }
    for caller in callers {
        caller.await??;
    }
    Ok((loads.load(Ordering::Relaxed), started.elapsed()))
}

/// Herds on the leased agents and on the lease-less ones, in alternating rounds.
pub async fn run(options: &Options, leased: &[String], unleased: &[String]) -> anyhow::Result<(Row, String)> {
    let http = reqwest::Client::new();
    let (mut with, mut without, mut with_ms, mut without_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let tag = std::process::id();
    for round in 0..options.rounds {
        let (loads, took) = herd(&http, leased, &format!("herd:{tag}:{round}:leased")).await?;
        with.push(loads as f64);
        with_ms.push(took.as_secs_f64() * 1000.0);
        let (loads, took) = herd(&http, unleased, &format!("herd:{tag}:{round}:unleased")).await?;
        without.push(loads as f64);
        without_ms.push(took.as_secs_f64() * 1000.0);
        eprintln!(
            "  herd round {}: {} loads with leases ({:.0} ms), {} without ({:.0} ms)",
            round + 1,
            with[round],
            with_ms[round],
            without[round],
            without_ms[round]
        );
    }
    let row = Row {
        measure: format!(
            "database loads per herd: {CALLERS} concurrent misses of one key over {} agents (Redis column: the \
             same agents with lease_ms = 0)",
            leased.len()
        ),
        ours: format!("{} (all served in {})", spread(&with, "loads", 0), spread(&with_ms, "ms", 0)),
        baseline: format!("{} (all served in {})", spread(&without, "loads", 0), spread(&without_ms, "ms", 0)),
        result: format!("{:.0} vs {:.0} loads", median(&with), median(&without)),
        target: "1 load".into(),
        met: with.iter().all(|&loads| loads <= 1.0),
    };
    let note = format!(
        "Herd: {CALLERS} tasks GET one cold key at once, spread over {} agents; a caller answered 404 \"loads from \
         the database\" ({} ms) and PUTs the value with its fill token, a caller answered 200 is done. Loads are the \
         404s. The same herd runs on {} agents started alike but with `lease_ms = 0`, in alternating rounds, each \
         round on a new key.",
        leased.len(),
        LOAD.as_millis(),
        unleased.len()
    );
    Ok((row, note))
}
