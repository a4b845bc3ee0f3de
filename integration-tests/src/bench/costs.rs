//! What one invalidation costs Redis, and what one agent costs it at rest:
//! the inputs of the capacity model in `docs/capacity.md`.
//!
//! Redis's own accounting is the meter: its process CPU time (`INFO cpu`,
//! user + system, which includes reading, parsing and writing to sockets)
//! and its per-command call counts (`INFO commandstats`). Each measure
//! takes an idle window first (the agents' heartbeats only) and subtracts
//! that background, pro rata, from the window in which the invalidations
//! are posted. CPU time, unlike latency, does not stretch much on a busy
//! machine, so these figures hold better than the timings elsewhere.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use shared::store::{Delivery, Store};

use super::{Options, Row};

/// Redis's counters at one moment.
#[derive(Debug, Default, Clone)]
struct Meter {
    /// Process CPU seconds, user + system.
    cpu_s: f64,
    /// Calls per command.
    calls: BTreeMap<String, u64>,
}

impl Meter {
    async fn read(redis: &Store) -> anyhow::Result<Meter> {
        let mut conn = redis.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
        let field = |name: &str| -> f64 {
            cpu.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0.0)
        };
        let mut calls = BTreeMap::new();
        for line in stats.lines() {
            // cmdstat_publish:calls=10,usec=50,...
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
            let n = rest.split(',').find_map(|kv| kv.strip_prefix("calls=")?.parse().ok()).unwrap_or(0);
            calls.insert(name.to_string(), n);
        }
        Ok(Meter { cpu_s: field("used_cpu_user") + field("used_cpu_sys"), calls })
    }

    /// `self - earlier`.
    fn since(&self, earlier: &Meter) -> Meter {
        let calls = self
            .calls
            .iter()
            .map(|(name, n)| (name.clone(), n.saturating_sub(earlier.calls.get(name).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect();
        Meter { cpu_s: self.cpu_s - earlier.cpu_s, calls }
    }
}

/// Per-operation cost: Redis CPU µs, and calls per command.
#[derive(Debug, Default)]
pub struct Cost {
    pub cpu_us: f64,
    pub calls: BTreeMap<String, f64>,
}

impl Cost {
    /// Commands per operation, as `name×n` sorted by name.
    fn commands(&self) -> String {
        let shown: Vec<String> =
            self.calls.iter().filter(|(_, n)| **n >= 0.05).map(|(name, n)| format!("{name}×{n:.1}")).collect();
        shown.join(", ")
    }

    fn total_calls(&self) -> f64 {
        self.calls.values().sum()
    }
}

/// `busy` minus `idle` scaled to `busy`'s length, divided by `operations`.
fn per_operation(busy: &Meter, busy_s: f64, idle: &Meter, idle_s: f64, operations: usize) -> Cost {
    let scale = busy_s / idle_s;
    let n = operations as f64;
    let calls = busy
        .calls
        .iter()
        .map(|(name, c)| {
            let background = idle.calls.get(name).copied().unwrap_or(0) as f64 * scale;
            (name.clone(), ((*c as f64 - background) / n).max(0.0))
        })
        .collect();
    Cost { cpu_us: ((busy.cpu_s - idle.cpu_s * scale) / n * 1e6).max(0.0), calls }
}

/// A measuring window: an idle part first, then the operations.
struct Window {
    m1: Meter,
    background: Meter,
    idle_s: f64,
    busy_from: Instant,
}

impl Window {
    /// Reads the meter, waits out the idle part, reads it again.
    async fn start(redis: &Store, idle: Duration) -> anyhow::Result<Window> {
        let m0 = Meter::read(redis).await?;
        let t0 = Instant::now();
        // A measuring window, not a wait for a condition.
        tokio::time::sleep(idle).await;
        let m1 = Meter::read(redis).await?;
        let idle_s = t0.elapsed().as_secs_f64();
        Ok(Window { background: m1.since(&m0), m1, idle_s, busy_from: Instant::now() })
    }

    /// After `operations`: their cost, and the background per second.
    async fn finish(self, redis: &Store, operations: usize) -> anyhow::Result<(Cost, Cost)> {
        // The agents' last acknowledgements trail the last answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m2 = Meter::read(redis).await?;
        let busy_s = self.busy_from.elapsed().as_secs_f64();
        let cost = per_operation(&m2.since(&self.m1), busy_s, &self.background, self.idle_s, operations);
        let per_second = Cost {
            cpu_us: self.background.cpu_s / self.idle_s * 1e6,
            calls: self.background.calls.iter().map(|(n, c)| (n.clone(), *c as f64 / self.idle_s)).collect(),
        };
        Ok((cost, per_second))
    }
}

/// The cost of `operations` invalidations posted one after another to the
/// coordinator at `coordinator`, on the Redis at `redis_url`; and the
/// background of the idle window (per second).
pub async fn invalidation(options: &Options, coordinator: &str, redis_url: &str) -> anyhow::Result<(Cost, Cost)> {
    let redis = Store::open(redis_url, 2).map_err(anyhow::Error::msg)?;
    let http = reqwest::Client::new();
    let url = format!("{coordinator}/v1/invalidate");
    let operations = operations(options);
    let window = Window::start(&redis, idle(options)).await?;
    for i in 0..operations {
        let body = json!({"tenant": "bench", "keys": [format!("cost:{}", i % 100)]});
        let status = http.post(&url).json(&body).send().await?.status();
        if status != 200 {
            bail!("POST /v1/invalidate answered {status}");
        }
    }
    window.finish(&redis, operations).await
}

/// The cost of a bare `PUBLISH` of a 200-byte message to `subscribers`
/// redis-rs subscribers, each message received by all before the next.
pub async fn raw_publish(options: &Options, redis_url: &str, subscribers: usize) -> anyhow::Result<Cost> {
    let redis = Store::open(redis_url, 2).map_err(anyhow::Error::msg)?;
    let channel = "bench:cost";
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut subscription = redis.subscribe(&[channel.to_string()]).await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(delivery)) = subscription.next().await {
                if matches!(delivery, Delivery::Message { .. }) && tx.send(()).is_err() {
                    return;
                }
            }
        }));
    }
    let mut conn = redis.dedicated().await?;
    let payload = "x".repeat(200);
    let operations = operations(options);
    let window = Window::start(&redis, idle(options)).await?;
    for _ in 0..operations {
        let _: i64 = redis::cmd(if redis.sharded() { "SPUBLISH" } else { "PUBLISH" })
            .arg(channel)
            .arg(&payload)
            .query_async(&mut conn)
            .await?;
        for _ in 0..subscribers {
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("a subscriber never received the message")?;
        }
    }
    let (cost, _) = window.finish(&redis, operations).await?;
    drop(conn);
    for task in tasks {
        task.abort();
    }
    Ok(cost)
}

fn operations(options: &Options) -> usize {
    if options.rounds >= 5 {
        1000
    } else {
        200
    }
}

fn idle(options: &Options) -> Duration {
    (options.run * 2).max(Duration::from_secs(1))
}

/// The rows: an invalidation with 0 and with `agents` agents, a bare
/// PUBLISH to as many subscribers, and an idle agent per second.
pub fn rows(
    agents: usize,
    alone: &Cost,
    with_agents: &Cost,
    raw: &Cost,
    idle_alone: &Cost,
    idle_with_agents: &Cost,
) -> (Vec<Row>, String) {
    let per_agent_idle_us = (idle_with_agents.cpu_us - idle_alone.cpu_us) / agents as f64;
    let per_agent_idle_calls = (idle_with_agents.total_calls() - idle_alone.total_calls()) / agents as f64;
    let per_agent_us = (with_agents.cpu_us - alone.cpu_us) / agents as f64;
    let per_agent_calls = (with_agents.total_calls() - alone.total_calls()) / agents as f64;
    let rows = vec![
        Row {
            measure: "Redis CPU per invalidation, no agent (the coordinator's own commands)".into(),
            ours: format!("{:.1} µs, {:.1} commands: {}", alone.cpu_us, alone.total_calls(), alone.commands()),
            baseline: String::new(),
            result: format!("{:.1} µs", alone.cpu_us),
            target: "(reported)".into(),
            met: true,
        },
        Row {
            measure: format!("Redis CPU per invalidation, {agents} agents (delivery and acknowledgements)"),
            ours: format!(
                "{:.1} µs, {:.1} commands: {}",
                with_agents.cpu_us,
                with_agents.total_calls(),
                with_agents.commands()
            ),
            baseline: format!("bare PUBLISH to {agents} subscribers: {:.1} µs", raw.cpu_us),
            result: format!("{per_agent_us:.1} µs and {per_agent_calls:.1} commands per agent"),
            target: "(reported)".into(),
            met: true,
        },
        Row {
            measure: format!("Redis CPU per idle agent per second ({agents} agents' heartbeats)"),
            ours: format!(
                "{per_agent_idle_us:.0} µs/s, {per_agent_idle_calls:.1} commands/s (all {agents}: {})",
                idle_with_agents.commands()
            ),
            baseline: String::new(),
            result: format!("{per_agent_idle_us:.0} µs/s"),
            target: "(reported)".into(),
            met: true,
        },
    ];
    let note = format!(
        "Costs: Redis's own CPU time (`INFO cpu`, user + system) and calls (`INFO commandstats`) over \
         invalidations of one key posted one after another to `POST /v1/invalidate`, minus the background \
         of an idle window just before (heartbeats), pro rata; once on a coordinator with no agent and once \
         with {agents} agents, whose difference is the per-agent cost. The baseline is a bare 200-byte \
         `PUBLISH` to as many redis-rs subscribers, measured the same way. Commands are shown per \
         invalidation (calls of the whole system, so the agents' heartbeat share that the idle window \
         did not remove shows as fractions). The idle row is per agent: the idle window with {agents} \
         agents minus the one with none, divided by {agents} (commands listed per second for the whole system). These are the inputs of docs/capacity.md."
    );
    (rows, note)
}
