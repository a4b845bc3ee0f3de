//! From the coordinator out: propagation to every agent, the `wait=all`
//! round trip, and event throughput, each next to raw Redis pub/sub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{json, Value};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{http_connection, median, per_second, percentile, ratios, spread, Options, Row};

/// Events per second of the propagation runs.
const RATE: u64 = 1000;
/// Concurrent tasks of the throughput runs, ours and raw `PUBLISH` alike.
const WRITERS: usize = 16;
/// Events per batch in the batched throughput run.
const BATCH: usize = 100;

/// What the bench's own subscriber saw: when each seq was broadcast, and
/// every agent acknowledgement (agents acknowledge the highest seq applied).
#[derive(Default)]
struct Seen {
    broadcast: HashMap<u64, Instant>,
    acks: HashMap<String, Vec<(Instant, u64)>>,
}

impl Seen {
    /// For each seq broadcast after `from`, the time from its broadcast to the
    /// last of `nodes` acknowledging it (or a later seq), in µs.
    fn latencies(&self, nodes: usize, from: Instant) -> anyhow::Result<Vec<f64>> {
        if self.acks.len() < nodes {
            bail!("only {} of {nodes} agents acknowledged anything", self.acks.len());
        }
        let mut out = Vec::new();
        for (seq, at) in &self.broadcast {
            if *at < from {
                continue;
            }
            let mut last = *at;
            for acks in self.acks.values() {
                // Acks of one node arrive in seq order: the first covering `seq`.
                let i = acks.partition_point(|(_, s)| s < seq);
                match acks.get(i) {
                    Some((t, _)) => last = last.max(*t),
                    None => bail!("seq {seq} was never acknowledged by every agent"),
                }
            }
            out.push(last.duration_since(*at).as_secs_f64() * 1e6);
        }
        Ok(out)
    }
}

/// Follows the bench tenant's partition's invalidation and ack channels
/// into `seen` until `stop` is set.
async fn follow(redis: &redis::Client, seen: Arc<Mutex<Seen>>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let partition = shared::schema::Layout::default().of("bench").clone();
    let mut pubsub = redis.get_async_pubsub().await?;
    pubsub.subscribe(partition.channel()).await?;
    pubsub.subscribe(partition.ack_channel()).await?;
    Ok(tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let now = Instant::now();
            let payload: String = msg.get_payload().unwrap_or_default();
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if msg.get_channel_name() == partition.channel() {
                if let Some(seq) = serde_json::from_str::<Value>(&payload).ok().and_then(|v| v["seq"].as_u64()) {
                    seen.broadcast.insert(seq, now);
                }
            } else if let Some(ack) = shared::registry::Ack::decode(partition.index, &payload) {
                seen.acks.entry(ack.node_id).or_default().push((now, ack.position.seq));
            }
        }
    }))
}

/// Posts `RATE` single-item events per second for `run` (to `/v1/events`).
async fn post_events_at_rate(http: &reqwest::Client, coordinator: &str, run: Duration) -> anyhow::Result<()> {
    let url = format!("{coordinator}/v1/events");
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let deadline = Instant::now() + run;
    let mut posts = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        ticker.tick().await;
        n += 1;
        let (http, url) = (http.clone(), url.clone());
        posts.push(tokio::spawn(async move {
            let event = json!({"tenant": "bench", "entity": "item", "id": (n % 1000).to_string()});
            let status = http.post(&url).json(&event).send().await?.status();
            if status != 200 {
                bail!("POST /v1/events answered {status}");
            }
            anyhow::Ok(())
        }));
    }
    for post in posts {
        post.await??;
    }
    Ok(())
}

/// Our propagation: per seq, broadcast to the last agent's acknowledgement, in µs.
async fn ours_propagation(
    http: &reqwest::Client,
    coordinator: &str,
    redis: &redis::Client,
    agents: usize,
    run: Duration,
) -> anyhow::Result<Vec<f64>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let follower = follow(redis, seen.clone()).await?;
    let started = Instant::now();
    post_events_at_rate(http, coordinator, run).await?;
    // Stragglers: give the last acknowledgements time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    follower.abort();
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    // The first 10% is warm-up.
    seen.latencies(agents, started + run / 10)
}

/// Raw Redis fan-out: `subscribers` connections, `RATE` messages per second
/// of a typical message's size; per message, publish to the last receipt, in µs.
async fn raw_fanout(redis: &redis::Client, subscribers: usize, run: Duration) -> anyhow::Result<Vec<f64>> {
    let origin = Instant::now();
    let channel = "bench:raw";
    let received: Arc<Mutex<HashMap<u64, (usize, Duration)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut pubsub = redis.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let at = origin.elapsed();
                let payload: String = msg.get_payload().unwrap_or_default();
                let id = payload.split(' ').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(u64::MAX);
                let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
                let entry = received.entry(id).or_insert((0, Duration::ZERO));
                entry.0 += 1;
                entry.1 = entry.1.max(at);
            }
        }));
    }
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let padding = "x".repeat(180);
    let mut sent = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let deadline = Instant::now() + run;
    let mut id = 0u64;
    while Instant::now() < deadline {
        ticker.tick().await;
        id += 1;
        sent.insert(id, origin.elapsed());
        let _: i64 = conn.publish(channel, format!("{id} {padding}")).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for task in tasks {
        task.abort();
    }
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    let warm_up = id / 10;
    let mut out = Vec::new();
    for (id, at) in sent {
        if id <= warm_up {
            continue;
        }
        match received.get(&id) {
            Some((n, last)) if *n == subscribers => out.push(last.saturating_sub(at).as_secs_f64() * 1e6),
            _ => bail!("raw message {id} did not reach all {subscribers} subscribers"),
        }
    }
    Ok(out)
}

/// Measure 3 for one cluster size: ours and raw, alternating.
pub async fn propagation(
    options: &Options,
    coordinator: &str,
    redis_url: &str,
    agents: usize,
) -> anyhow::Result<(Row, String)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let redis = redis::Client::open(redis_url)?;
    let run = (options.run * 2).max(Duration::from_secs(1));
    let (mut ours, mut raw, mut ours_p99) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let o = ours_propagation(&http, coordinator, &redis, agents, run).await?;
        let r = raw_fanout(&redis, agents, run).await?;
        eprintln!(
            "  propagation to {agents}, round {}: ours p50 {:.0} µs p99 {:.0} µs; raw p50 {:.0} µs p99 {:.0} µs",
            round + 1,
            median(&o),
            percentile(&o, 99.0),
            median(&r),
            percentile(&r, 99.0)
        );
        ours_p99.push(percentile(&o, 99.0));
        ours.extend(o);
        raw.extend(r);
    }
    let p99 = percentile(&ours, 99.0);
    let row = Row {
        measure: format!("propagation to {agents} agents at {RATE} events/s (all rounds pooled)"),
        ours: format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            median(&ours) / 1e3,
            p99 / 1e3,
            percentile(&ours, 100.0) / 1e3
        ),
        baseline: format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            median(&raw) / 1e3,
            percentile(&raw, 99.0) / 1e3,
            percentile(&raw, 100.0) / 1e3
        ),
        result: format!(
            "p99 {:.2} ms (rounds: {})",
            p99 / 1e3,
            spread(&ours_p99.iter().map(|v| v / 1e3).collect::<Vec<_>>(), "ms", 2)
        ),
        target: if agents == 8 { "p99 ≤ 2 ms".into() } else { "(reported)".into() },
        met: agents != 8 || p99 <= 2000.0,
    };
    let note = format!(
        "Propagation to {agents}: events posted to `/v1/events` at {RATE}/s for {} ms per round. The bench's own \
         subscriber on `dcc:inv` and `dcc:acked` times each seq from its broadcast to the last agent's \
         acknowledgement (agents acknowledge as soon as they have applied it), so it includes one extra \
         hop back through Redis. Raw: the same number of plain redis-rs subscribers in the bench process, \
         200-byte messages at the same rate, from `PUBLISH` to the last receipt.",
        run.as_millis()
    );
    Ok((row, note))
}

/// Measure 4: the `wait=all` round trip, one client, one request after another.
pub async fn barrier(options: &Options, coordinator: &str, agents: usize) -> anyhow::Result<(Row, String)> {
    let http = reqwest::Client::new();
    let url = format!("{coordinator}/v1/invalidate?wait=all&timeout_ms=5000");
    let body = json!({"tenant": "bench", "keys": ["barrier:k"]});
    // The first one waits out a young epoch (see docs/guarantees.md, section 6).
    let warm = http.post(format!("{coordinator}/v1/invalidate?wait=all")).json(&body).send().await?;
    if warm.status() != 200 {
        bail!("wait=all answered {}", warm.status());
    }
    let mut samples = Vec::new();
    let mut per_round = Vec::new();
    for _ in 0..options.rounds {
        let mut round = Vec::new();
        let deadline = Instant::now() + options.run;
        while Instant::now() < deadline {
            let t = Instant::now();
            let resp = http.post(&url).json(&body).send().await?;
            let status = resp.status();
            let answer: Value = resp.json().await.unwrap_or(Value::Null);
            if status != 200 || answer["nodes"]["acked"].as_u64() != Some(agents as u64) {
                bail!("wait=all answered {status}: {answer}");
            }
            round.push(t.elapsed().as_secs_f64() * 1e6);
        }
        per_round.push(percentile(&round, 99.0) / 1e3);
        samples.extend(round);
    }
    let p99 = percentile(&samples, 99.0);
    let row = Row {
        measure: format!("`wait=all` round trip, {agents} agents, 1 client"),
        ours: format!("p50 {:.2} ms, p99 {:.2} ms", median(&samples) / 1e3, p99 / 1e3),
        baseline: "—".into(),
        result: format!("p99 {:.2} ms (rounds: {})", p99 / 1e3, spread(&per_round, "ms", 2)),
        target: "p99 ≤ 5 ms".into(),
        met: p99 <= 5000.0,
    };
    let note = format!(
        "Barrier: `POST /v1/invalidate?wait=all` of one key, {} requests in all, each answered 200 with \
         every one of the {agents} agents acknowledging; timed by the client, HTTP included.",
        samples.len()
    );
    Ok((row, note))
}

/// Events per second from `WRITERS` tasks posting as fast as they can,
/// `batch` events per request, each task on its own keep-alive connection
/// (hyper, as the hit measure's client).
async fn ours_throughput(coordinator: &str, batch: usize, run: Duration) -> anyhow::Result<f64> {
    let addr = coordinator.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut connections = Vec::new();
    for _ in 0..WRITERS {
        connections.push(http_connection::<Full<Bytes>>(&addr).await?);
    }
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for (w, mut sender) in connections.into_iter().enumerate() {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let events: Vec<Value> = (0..batch)
                    .map(|i| json!({"tenant": "bench", "entity": "item", "id": format!("{w}-{}", (n as usize + i) % 1000)}))
                    .collect();
                let body = if batch == 1 { events[0].clone() } else { Value::Array(events) };
                sender.ready().await?;
                let request = hyper::Request::post("/v1/events")
                    .header(hyper::header::HOST, &addr)
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                // Read to the end, so that the connection is kept for the next request.
                response.into_body().collect().await?;
                if status != 200 {
                    bail!("POST /v1/events answered {status}");
                }
                n += batch as u64;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// `PUBLISH`es per second from `WRITERS` connections.
async fn raw_publish(redis: &redis::Client, run: Duration) -> anyhow::Result<f64> {
    let mut connections = Vec::new();
    for _ in 0..WRITERS {
        connections.push(redis.get_multiplexed_async_connection().await?);
    }
    let payload = "x".repeat(200);
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for mut conn in connections {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let _: i64 = conn.publish("bench:publish", &payload).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// Measure 5: event throughput, single and batched, vs raw `PUBLISH`; then
/// single events again against a coordinator that no agent listens to
/// (`alone`: its own Redis), to tell the coordinator's cost from the cost of
/// the agents that share this machine's cores.
pub async fn throughput(
    options: &Options,
    coordinator: &str,
    redis_url: &str,
    alone: (&str, &str),
) -> anyhow::Result<(Vec<Row>, String)> {
    let redis = redis::Client::open(redis_url)?;
    let (mut single, mut batched, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        single.push(ours_throughput(coordinator, 1, options.run).await?);
        raw.push(raw_publish(&redis, options.run).await?);
        batched.push(ours_throughput(coordinator, BATCH, options.run).await?);
        eprintln!(
            "  throughput round {}: {:.0} events/s single, {:.0} events/s in batches; raw PUBLISH {:.0}/s",
            round + 1,
            single[round],
            batched[round],
            raw[round]
        );
    }
    let alone_redis = redis::Client::open(alone.1)?;
    let (mut single_alone, mut raw_alone) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        single_alone.push(ours_throughput(alone.0, 1, options.run).await?);
        raw_alone.push(raw_publish(&alone_redis, options.run).await?);
        eprintln!(
            "  throughput round {} with no agent listening: {:.0} events/s single; raw PUBLISH {:.0}/s",
            round + 1,
            single_alone[round],
            raw_alone[round]
        );
    }
    let row = |measure: String, ours: &[f64], raw: &[f64]| {
        let ratio = median(&ratios(ours, raw));
        Row {
            measure,
            ours: spread(ours, "events/s", 0),
            baseline: spread(raw, "PUBLISH/s", 0),
            result: format!("{ratio:.2}x"),
            target: "≥ 0.3x".into(),
            met: ratio >= 0.3,
        }
    };
    let rows = vec![
        row(format!("event throughput, {WRITERS} writers, one event per request"), &single, &raw),
        row(format!("event throughput, {WRITERS} writers, batches of {BATCH}"), &batched, &raw),
        row(
            format!("event throughput, {WRITERS} writers, one event per request, no agent listening"),
            &single_alone,
            &raw_alone,
        ),
    ];
    let note = format!(
        "Throughput: {WRITERS} tasks post events (`entity: item`, default rule: one tag each) as fast as \
         the coordinator answers, each on its own keep-alive connection (hyper); batches are JSON arrays of \
         {BATCH} events, resolved into one invalidation. Raw: {WRITERS} redis-rs connections `PUBLISH` 200 \
         bytes in a loop, to a channel nobody subscribes to. With 8 agents, every invalidation is also \
         received, applied and acknowledged by 8 agent processes on the same 2 cores; \"no agent listening\" \
         runs single events against a second coordinator with its own Redis and no agents, and its raw \
         `PUBLISH` against that Redis."
    );
    Ok((rows, note))
}
