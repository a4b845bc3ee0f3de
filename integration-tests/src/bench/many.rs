//! Propagation at scale: a thousand agents, embedded in the bench process,
//! each with its own subscription, heartbeat and acknowledger, as a thousand
//! sidecars would have, against a thousand plain Redis subscribers.
//!
//! Ours: one invalidation at a time is posted to the coordinator; a sweeper
//! thread reads every agent's applied seq (an atomic-cheap read of its
//! cursor) until all have applied it, and records, per agent, the time from
//! the POST being sent to the agent having applied it. Raw: one `PUBLISH` at
//! a time to the same number of redis-rs subscribers, per subscriber the time
//! from the publish to its receipt. Both are one message in flight at a time,
//! so the figures are the fan-out's latency, not a queue's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use node_agent::agent::Agent;
use node_agent::settings::Settings;
use serde_json::{json, Value};
use shared::store::{Delivery, Store};
use tokio_util::sync::CancellationToken;

use super::{median, percentile, Options, Row};

/// The tenant every invalidation is for (one partition).
const TENANT: &str = "bench";
/// The longest one invalidation may take to reach every agent before the
/// measure gives up.
const REACH_DEADLINE: Duration = Duration::from_secs(30);

/// Per-agent latencies in µs of one message, and the slowest of them.
struct Fanout {
    samples: Vec<f64>,
    last: f64,
    /// For ours, when the POST was answered (µs after it was sent).
    answered: f64,
}

/// Starts `count` embedded agents on `redis_url` and waits until all are ready.
async fn start_agents(
    redis_url: &str,
    count: usize,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<Agent>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut agents = Vec::with_capacity(count);
    let mut tasks = Vec::new();
    for i in 0..count {
        let settings = Settings {
            redis_url: redis_url.to_string(),
            // A thousand agents share two cores and one Redis: a heartbeat a
            // second each (the most the default staleness bound allows) and a
            // small pool, as a sidecar that only reads L1 needs.
            heartbeat_interval_ms: 1000,
            redis_pool_size: 2,
            l1_max_bytes: 1 << 20,
            // They measure propagation, not first reads.
            warm_keys: 0,
            ..Settings::default()
        };
        let agent = Agent::new(settings, format!("many-{i}"), String::new()).map_err(anyhow::Error::msg)?;
        tasks.extend(node_agent::sync::spawn(&agent, stop.clone()));
        agents.push(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let waiting = agents.iter().filter(|a| a.readiness().is_err()).count();
        if waiting == 0 {
            return Ok((agents, tasks));
        }
        if Instant::now() > deadline {
            bail!("{waiting} of {count} embedded agents never became ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Posts one invalidation and times its arrival in every agent.
async fn one_invalidation(http: &reqwest::Client, url: &str, agents: &Arc<Vec<Agent>>) -> anyhow::Result<Fanout> {
    let sent = Instant::now();
    let answer = http.post(url).json(&json!({"tenant": TENANT, "keys": ["many:k"]})).send().await?;
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    let answered = sent.elapsed().as_secs_f64() * 1e6;
    let seq = match body["seq"].as_u64() {
        Some(seq) if status == 200 => seq,
        _ => bail!("POST /v1/invalidate answered {status}: {body}"),
    };
    let agents = agents.clone();
    tokio::task::spawn_blocking(move || {
        let mut at: Vec<Option<Duration>> = vec![None; agents.len()];
        let mut left = agents.len();
        while left > 0 {
            for (agent, at) in agents.iter().zip(at.iter_mut()) {
                if at.is_none() && agent.applied_seq(TENANT) >= seq {
                    *at = Some(sent.elapsed());
                    left -= 1;
                }
            }
            if sent.elapsed() > REACH_DEADLINE {
                bail!(
                    "seq {seq} reached only {} of {} agents in {REACH_DEADLINE:?}",
                    agents.len() - left,
                    agents.len()
                );
            }
            // A short pause: the sweeper must not take a core from the subscribers.
            std::thread::sleep(Duration::from_micros(50));
        }
        let samples: Vec<f64> = at.into_iter().flatten().map(|d| d.as_secs_f64() * 1e6).collect();
        let last = samples.iter().copied().fold(0.0, f64::max);
        Ok(Fanout { samples, last, answered })
    })
    .await?
}

/// `count` plain subscribers to one channel; one message at a time.
async fn raw(redis_url: &str, count: usize, messages: usize) -> anyhow::Result<Vec<Fanout>> {
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    let channel = "bench:many";
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut tasks = Vec::new();
    for _ in 0..count {
        let mut subscription = redis.subscribe(&[channel.to_string()]).await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(delivery)) = subscription.next().await {
                let now = Instant::now();
                if let Delivery::Message { payload, .. } = delivery {
                    let id = std::str::from_utf8(&payload).ok().and_then(|p| p.split(' ').next()?.parse().ok());
                    if let Some(id) = id {
                        let _ = tx.send((id, now));
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut conn = redis.dedicated().await?;
    // A message the size of a typical invalidation message.
    let padding = "x".repeat(200);
    let mut out = Vec::with_capacity(messages);
    for id in 0..messages as u64 {
        let sent = Instant::now();
        let receivers: usize = redis::cmd(if redis.sharded() { "SPUBLISH" } else { "PUBLISH" })
            .arg(channel)
            .arg(format!("{id} {padding}"))
            .query_async(&mut conn)
            .await?;
        if receivers < count {
            bail!("PUBLISH reached {receivers} of {count} subscribers");
        }
        let mut samples = Vec::with_capacity(count);
        while samples.len() < count {
            let (got, at) = tokio::time::timeout(REACH_DEADLINE, rx.recv())
                .await
                .context("a raw subscriber never received its message")?
                .context("the raw subscribers stopped")?;
            if got == id {
                samples.push(at.duration_since(sent).as_secs_f64() * 1e6);
            }
        }
        let last = samples.iter().copied().fold(0.0, f64::max);
        out.push(Fanout { samples, last, answered: 0.0 });
    }
    for task in tasks {
        task.abort();
    }
    Ok(out)
}

/// `p50 / p99 / max` of a set of µs samples, in ms.
fn summary(samples: &[f64]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        median(samples) / 1e3,
        percentile(samples, 99.0) / 1e3,
        percentile(samples, 100.0) / 1e3
    )
}

/// Propagation to `count` embedded agents, against `count` raw subscribers,
/// on the Redis at `redis_url` behind the coordinator at `coordinator`.
pub async fn propagation(
    options: &Options,
    coordinator: &str,
    redis_url: &str,
    count: usize,
) -> anyhow::Result<(Vec<Row>, String)> {
    let stop = CancellationToken::new();
    let started = Instant::now();
    let (agents, tasks) = start_agents(redis_url, count, &stop).await?;
    let ready_in = started.elapsed();
    let agents = Arc::new(agents);
    let http = reqwest::Client::new();
    let url = format!("{coordinator}/v1/invalidate");
    // The first invalidations warm the paths up (and may wait out a young epoch).
    for _ in 0..3 {
        one_invalidation(&http, &url, &agents).await?;
    }
    let messages = (options.rounds * 10).max(20);
    let mut ours = Vec::with_capacity(messages);
    for _ in 0..messages {
        ours.push(one_invalidation(&http, &url, &agents).await?);
    }
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    drop(agents);
    let raw = raw(redis_url, count, messages).await?;

    let answers: Vec<f64> = ours.iter().map(|f| f.answered).collect();
    let all = |f: &[Fanout]| f.iter().flat_map(|f| f.samples.iter().copied()).collect::<Vec<f64>>();
    let lasts = |f: &[Fanout]| f.iter().map(|f| f.last).collect::<Vec<f64>>();
    let rows = vec![
        Row {
            measure: format!("propagation to {count} embedded agents (each its own subscription), per agent"),
            ours: summary(&all(&ours)),
            baseline: summary(&all(&raw)),
            result: format!("p99 {:.2} ms", percentile(&all(&ours), 99.0) / 1e3),
            target: "(reported)".into(),
            met: true,
        },
        Row {
            measure: format!("propagation to {count} embedded agents: to the last of them, per invalidation"),
            ours: summary(&lasts(&ours)),
            baseline: summary(&lasts(&raw)),
            result: format!("p99 {:.2} ms", percentile(&lasts(&ours), 99.0) / 1e3),
            target: "(reported)".into(),
            met: true,
        },
    ];
    let note = format!(
        "{count} agents: `node_agent::agent::Agent`s in the bench process, each with its own Redis \
         subscription, heartbeat (every 1000 ms) and acknowledger, {count} connections of each kind on \
         one Redis; all ready {:.1} s after starting. {messages} invalidations of one key of one tenant are \
         posted one after another to the coordinator (`POST /v1/invalidate`); a sweeper thread reads every \
         agent's applied seq every 50 µs and times each agent from the POST being sent (so the coordinator's \
         own work is included: the POST itself was answered in p50 {:.2} ms, p99 {:.2} ms) to its L1 having \
         applied the seq. Raw: {count} redis-rs subscribers, one \
         200-byte `PUBLISH` at a time, each timed from the publish to its receipt. The agents, the \
         subscribers, the coordinator and Redis share the same 2 cores.",
        ready_in.as_secs_f64(),
        median(&answers) / 1e3,
        percentile(&answers, 99.0) / 1e3
    );
    Ok((rows, note))
}
