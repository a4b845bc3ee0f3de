//! `make bench`: the system measured side by side with Redis itself, in one
//! run, so that the ratios hold on a noisy machine.
//!
//! Every comparison runs as alternating rounds (ours, then Redis, then ours
//! again, ...); the report gives the median of each side, the spread of the
//! rounds (min–max) and the median of the per-round ratios. The results go to
//! `BENCHMARKS.md` with the machine, the command and the date.
//!
//! The measures, one module each:
//! - [`hits`]: L1-hit GETs through an agent's HTTP API, and through the agent
//!   embedded as a library, vs direct Redis GETs.
//! - [`costs`]: Redis CPU and commands per invalidation and per idle agent,
//!   the inputs of `docs/capacity.md`.
//! - [`fanout`]: propagation from an accepted event to the last agent, the
//!   `wait=all` round trip, and the coordinator's event throughput, vs raw
//!   Redis pub/sub and `PUBLISH`.
//! - [`herd`]: database loads of a miss herd, with miss leases and without.
//! - [`many`]: propagation to a thousand agents embedded in the bench
//!   process, vs as many plain Redis subscribers.
//! - [`resp`]: the agent's Redis protocol port vs Redis, both driven by
//!   `redis-benchmark`.
//! - [`warm`]: how long a new agent takes to warm 10k hot keys.
//! - [`pgsource`]: the PostgreSQL source: commit to the last agent, and row
//!   changes per second through one coordinator.
//! - [`scale`]: a tag of 100k keys and a pattern over a tenant of 1M keys,
//!   and agent memory per L1 entry.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

pub mod costs;
pub mod fanout;
pub mod herd;
pub mod hitratio;
pub mod hits;
pub mod many;
pub mod pgsource;
pub mod resp;
pub mod scale;
pub mod warm;

/// How long and how often to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Alternating rounds per comparison.
    pub rounds: usize,
    /// Length of one throughput or latency run.
    pub run: Duration,
    /// Entries for the scale measures (100k tag, 1M tenant, 1M L1 entries).
    pub tag_keys: usize,
    /// See `tag_keys`.
    pub tenant_keys: usize,
    /// See `tag_keys`.
    pub l1_entries: usize,
}

impl Options {
    /// The full suite, as the targets are stated.
    pub fn full() -> Self {
        Options {
            rounds: 5,
            run: Duration::from_secs(2),
            tag_keys: 100_000,
            tenant_keys: 1_000_000,
            l1_entries: 1_000_000,
        }
    }

    /// A quick pass (`make bench QUICK=1`): fewer, shorter rounds and a tenth
    /// of the entries, to check that everything runs.
    pub fn quick() -> Self {
        Options {
            rounds: 2,
            run: Duration::from_millis(500),
            tag_keys: 10_000,
            tenant_keys: 100_000,
            l1_entries: 100_000,
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub measure: String,
    /// Our figure, with its spread.
    pub ours: String,
    /// The Redis baseline, with its spread ("" when there is none).
    pub baseline: String,
    /// The ratio or the figure the target is about.
    pub result: String,
    /// The target.
    pub target: String,
    /// Whether the target is met.
    pub met: bool,
}

/// One HTTP/1.1 connection driven by hyper, with Nagle off, as every
/// HTTP client of the bench uses (no connection pool in the way).
pub async fn http_connection<B>(addr: &str) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use anyhow::Context as _;
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Median of a sample (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `p`th percentile of a sample, nearest rank (0 when empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "median (min–max)" of per-round figures, with a unit and a scale.
pub fn spread(values: &[f64], unit: &str, digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.*} {unit} ({:.*}–{:.*})", digits, median(values), digits, min, digits, max)
}

/// Per-round ratios ours / baseline.
pub fn ratios(ours: &[f64], baseline: &[f64]) -> Vec<f64> {
    ours.iter().zip(baseline).map(|(o, b)| if *b > 0.0 { o / b } else { 0.0 }).collect()
}

/// Operations per second: the counts the tasks return, over the time since `started`.
pub async fn per_second(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<u64>>>,
    started: std::time::Instant,
) -> anyhow::Result<f64> {
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// What the report says about the machine: CPU, cores, memory, load.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{model}, {cores} cores, {mem_gib:.0} GiB RAM; load average at the end: {}", load_average())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The report as Markdown.
pub fn report(rows: &[Row], options: &Options, command: &str, notes: &[String]) -> String {
    let mut out = String::new();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(out, "Written by `{command}` on {date}.\n");
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(
        out,
        "- Rounds: {} per comparison, alternating ours and Redis, {} ms each; figures are the median \
         of the rounds with their min–max in brackets; ratios are the median of the per-round ratios.",
        options.rounds,
        options.run.as_millis()
    );
    let _ = writeln!(
        out,
        "- Everything runs on this one machine: Redis, the coordinator, the agents and the load \
         generator share its cores, for our side and for Redis's alike.\n"
    );
    let _ = writeln!(out, "| measure | ours | Redis | result | target | met |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.measure,
            row.ours,
            row.baseline,
            row.result,
            row.target,
            if row.met { "yes" } else { "**no**" }
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## How each figure is taken\n");
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// The criterion micro-benchmarks' medians (from `target/criterion`, written
/// by `cargo bench`), as a Markdown section; empty when there are none.
pub fn criterion_table(root: &Path) -> String {
    let mut found = Vec::new();
    collect_estimates(root, &mut found);
    if found.is_empty() {
        return String::new();
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::from(
        "\n## Micro-benchmarks (criterion)\n\n`cargo bench -p shared -p node-agent`, run by `make bench` \
         before the system measures; median time per iteration with criterion's 95% confidence interval.\n\n\
         | benchmark | median | interval |\n|---|---|---|\n",
    );
    for (id, median, low, high) in found {
        let _ = writeln!(out, "| {id} | {} | {} – {} |", nanos(median), nanos(low), nanos(high));
    }
    out
}

/// A duration in ns as text with a fitting unit.
fn nanos(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Finds `<bench>/new/{benchmark,estimates}.json` below `dir`.
fn collect_estimates(dir: &Path, found: &mut Vec<(String, f64, f64, f64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let read = |name: &str| {
                std::fs::read_to_string(path.join(name))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            };
            if let (Some(benchmark), Some(estimates)) = (read("benchmark.json"), read("estimates.json")) {
                let median = &estimates["median"];
                let id = benchmark["full_id"].as_str().unwrap_or("?").to_string();
                let value = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
                found.push((
                    id,
                    value(&median["point_estimate"]),
                    value(&median["confidence_interval"]["lower_bound"]),
                    value(&median["confidence_interval"]["upper_bound"]),
                ));
            }
        } else if path.file_name().is_none_or(|n| n != "base" && n != "change" && n != "report") {
            collect_estimates(&path, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }
}
