//! From the coordinator out: propagation to every agent, the `wait=all`
//! round trip, and event throughput, each next to raw Redis pub/sub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};
use shared::store::{Delivery, Store};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{http_connection, median, per_second, percentile, ratios, spread, Options, Row};

/// Events per second of the propagation runs.
const RATE: u64 = 1000;
/// Concurrent tasks of the throughput runs, ours and raw `PUBLISH` alike.
const WRITERS: usize = 16;
/// Events per batch in the batched throughput run.
const BATCH: usize = 100;
/// Agents listening in the bench's cluster (the subscribers of the fanned-out baseline).
const AGENTS: usize = 8;

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
/// into `seen` until the task is aborted.
async fn follow(redis: &Store, seen: Arc<Mutex<Seen>>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let partition = shared::schema::Layout::default().of("bench").clone();
    let mut subscription = redis.subscribe(&[partition.channel(), partition.ack_channel()]).await?;
    Ok(tokio::spawn(async move {
        while let Ok(Some(delivery)) = subscription.next().await {
            let now = Instant::now();
            let Delivery::Message { channel, payload } = delivery else { continue };
            let payload = String::from_utf8_lossy(&payload);
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if channel == partition.channel() {
                if let Some(seq) = serde_json::from_str::<Value>(&payload).ok().and_then(|v| v["seq"].as_u64()) {
                    seen.broadcast.insert(seq, now);
                }
            } else if let Some(ack) = shared::registry::Ack::decode(partition.index, &payload) {
                seen.acks.entry(ack.node_id).or_default().push((now, ack.position.seq));
            }
        }
    }))
}

/// `PUBLISH`, or `SPUBLISH` on a cluster (as the coordinator does).
fn publish_command(redis: &Store, channel: &str, payload: &str) -> redis::Cmd {
    let mut cmd = redis::cmd(if redis.sharded() { "SPUBLISH" } else { "PUBLISH" });
    cmd.arg(channel).arg(payload);
    cmd
}

/// Posts `RATE` single-item events per second for `run` (to `/v1/events`).
async fn post_events_at_rate(http: &reqwest::Client, coordinator: &str, run: Duration) -> anyhow::Result<()> {
    // With `wait=all`, so that agents publish their acknowledgements (without
    // it they only record them, and the bench's subscriber would hear nothing).
    let url = format!("{coordinator}/v1/events?wait=all&timeout_ms=10000");
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
    redis: &Store,
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
async fn raw_fanout(redis: &Store, subscribers: usize, run: Duration) -> anyhow::Result<Vec<f64>> {
    let origin = Instant::now();
    let channel = "bench:raw";
    let received: Arc<Mutex<HashMap<u64, (usize, Duration)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut subscription = redis.subscribe(&[channel.to_string()]).await?;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(delivery)) = subscription.next().await {
                let at = origin.elapsed();
                let Delivery::Message { payload, .. } = delivery else { continue };
                let payload = String::from_utf8_lossy(&payload);
                let id = payload.split(' ').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(u64::MAX);
                let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
                let entry = received.entry(id).or_insert((0, Duration::ZERO));
                entry.0 += 1;
                entry.1 = entry.1.max(at);
            }
        }));
    }
    let mut conn = redis.dedicated().await?;
    let padding = "x".repeat(180);
    let mut sent = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let deadline = Instant::now() + run;
    let mut id = 0u64;
    while Instant::now() < deadline {
        ticker.tick().await;
        id += 1;
        sent.insert(id, origin.elapsed());
        let _: i64 = publish_command(redis, channel, &format!("{id} {padding}")).query_async(&mut conn).await?;
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
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
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
         subscriber on the tenant's partition's invalidation and ack channels times each seq from its broadcast to the last agent's \
         acknowledgement (events are posted with `wait=all`, so agents publish their acknowledgement as soon \
         as they have applied the message), so it includes one extra hop back through Redis. Raw: the same number of plain redis-rs subscribers in the bench process, \
         200-byte messages at the same rate, from `PUBLISH` (`SPUBLISH` on a cluster) to the last receipt.",
        run.as_millis()
    );
    Ok((row, note))
}

/// Propagation while one agent serves L1 hits as fast as `hits::TASKS`
/// connections ask (the load of measure 1), against raw fan-out under the
/// same load: whether the subscriber queues behind HTTP work.
pub async fn propagation_under_load(
    options: &Options,
    coordinator: &str,
    redis_url: &str,
    agents: usize,
    loaded_agent: &str,
) -> anyhow::Result<(Row, String)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    super::hits::prepare_agent(loaded_agent, &redis).await?;
    let run = (options.run * 2).max(Duration::from_secs(1));
    let (mut ours, mut raw, mut hits) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let (addr, length) = (loaded_agent.to_string(), run + Duration::from_millis(600));
        let load = tokio::spawn(async move { super::hits::agent_throughput(&addr, length).await });
        // Let the load reach its pace first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let o = ours_propagation(&http, coordinator, &redis, agents, run).await?;
        hits.push(load.await??);
        let (addr, length) = (loaded_agent.to_string(), run + Duration::from_millis(600));
        let load = tokio::spawn(async move { super::hits::agent_throughput(&addr, length).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = raw_fanout(&redis, agents, run).await?;
        load.await??;
        eprintln!(
            "  propagation under hit load ({:.0} hits/s), round {}: ours p50 {:.0} µs p99 {:.0} µs; raw p50 {:.0} µs p99 {:.0} µs",
            hits[round],
            round + 1,
            median(&o),
            percentile(&o, 99.0),
            median(&r),
            percentile(&r, 99.0)
        );
        ours.extend(o);
        raw.extend(r);
    }
    let p99 = percentile(&ours, 99.0);
    let pooled = |v: &[f64]| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            median(v) / 1e3,
            percentile(v, 99.0) / 1e3,
            percentile(v, 100.0) / 1e3
        )
    };
    let row = Row {
        measure: format!(
            "propagation to {agents} agents at {RATE} events/s while agent 1 serves L1 hits to {} connections \
             (all rounds pooled)",
            super::hits::TASKS
        ),
        ours: pooled(&ours),
        baseline: pooled(&raw),
        result: format!("p99 {:.2} ms", p99 / 1e3),
        target: "(reported)".into(),
        met: true,
    };
    let note = format!(
        "Propagation under load: as propagation to {agents}, while {} hyper connections read an L1 hit from \
         agent 1 as fast as it answers ({} hits/s, median of the rounds); the raw fan-out runs under the \
         same load. Every process shares the same 2 cores, so this shows whether an agent's subscriber \
         waits behind its HTTP work.",
        super::hits::TASKS,
        spread(&hits, "", 0)
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
/// (hyper, as the hit measure's client); the tasks' events name `tenants`
/// tenants (task `w` posts for tenant `w % tenants`).
async fn ours_throughput(coordinator: &str, batch: usize, tenants: usize, run: Duration) -> anyhow::Result<f64> {
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
        let tenant = if tenants == 1 { "bench".to_string() } else { format!("bench-{}", w % tenants) };
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let events: Vec<Value> = (0..batch)
                    .map(|i| json!({"tenant": tenant, "entity": "item", "id": format!("{w}-{}", (n as usize + i) % 1000)}))
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

/// `PUBLISH`es (`SPUBLISH`es on a cluster) per second from `WRITERS`
/// connections, each to its own channel (on a cluster, channels spread over
/// the masters as the partitions are).
async fn raw_publish(redis: &Store, run: Duration) -> anyhow::Result<f64> {
    publish_loops(redis, |w| format!("bench:publish:{w}"), run).await
}

/// `PUBLISH`es (`SPUBLISH`es on a cluster) of 200 bytes per second from
/// `WRITERS` connections in a loop for `run`, writer `w` to `channel(w)`.
async fn publish_loops(redis: &Store, channel: impl Fn(usize) -> String, run: Duration) -> anyhow::Result<f64> {
    let mut connections = Vec::new();
    for _ in 0..WRITERS {
        connections.push(redis.dedicated().await?);
    }
    let payload = "x".repeat(200);
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for (w, mut conn) in connections.into_iter().enumerate() {
        let publish = publish_command(redis, &channel(w), &payload);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let _: i64 = publish.query_async(&mut conn).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// `PUBLISH`es (`SPUBLISH`es on a cluster) per second from `WRITERS`
/// connections to one channel that `subscribers` connections of this process
/// subscribe to: the fan-out an invalidation's broadcast makes to as many
/// agents. Fails if a subscriber missed messages (Redis drops a subscriber
/// that cannot keep up), since the publishes would then have cost less.
async fn raw_publish_fanned(redis: &Store, subscribers: usize, run: Duration) -> anyhow::Result<f64> {
    let channel = "bench:fanned";
    let received: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..subscribers).map(|_| std::sync::atomic::AtomicU64::new(0)).collect());
    let mut listeners = Vec::new();
    for i in 0..subscribers {
        let mut subscription = redis.subscribe(&[channel.to_string()]).await?;
        let received = received.clone();
        listeners.push(tokio::spawn(async move {
            while let Ok(Some(delivery)) = subscription.next().await {
                if let Delivery::Message { .. } = delivery {
                    received[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    let rate = publish_loops(redis, |_| channel.to_string(), run).await?;
    let published = (rate * started.elapsed().as_secs_f64()) as u64;
    // Every subscriber must have had every message (within the rounding of `published`).
    let all_in = Instant::now() + Duration::from_secs(10);
    let least = || received.iter().map(|r| r.load(std::sync::atomic::Ordering::Relaxed)).min().unwrap_or(0);
    while least() + published / 100 < published && Instant::now() < all_in {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for listener in listeners {
        listener.abort();
    }
    if least() + published / 100 < published {
        bail!("a raw subscriber received {} of about {published} messages", least());
    }
    Ok(rate)
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
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    let (mut single, mut batched, mut raw, mut fanned) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        single.push(ours_throughput(coordinator, 1, 1, options.run).await?);
        raw.push(raw_publish(&redis, options.run).await?);
        batched.push(ours_throughput(coordinator, BATCH, 1, options.run).await?);
        fanned.push(raw_publish_fanned(&redis, AGENTS, options.run).await?);
        eprintln!(
            "  throughput round {}: {:.0} events/s single, {:.0} events/s in batches; raw PUBLISH {:.0}/s, \
             to {AGENTS} subscribers {:.0}/s",
            round + 1,
            single[round],
            batched[round],
            raw[round],
            fanned[round]
        );
    }
    let alone_redis = Store::open(alone.1, 4).map_err(anyhow::Error::msg)?;
    let (mut single_alone, mut raw_alone) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        single_alone.push(ours_throughput(alone.0, 1, 1, options.run).await?);
        raw_alone.push(raw_publish(&alone_redis, options.run).await?);
        eprintln!(
            "  throughput round {} with no agent listening: {:.0} events/s single; raw PUBLISH {:.0}/s",
            round + 1,
            single_alone[round],
            raw_alone[round]
        );
    }
    let row = throughput_row;
    let rows = vec![
        row(format!("event throughput, {WRITERS} writers, one event per request"), &single, &raw),
        Row {
            target: "≥ 0.5x".into(),
            met: median(&ratios(&single, &fanned)) >= 0.5,
            ..row(
                format!(
                    "event throughput, {WRITERS} writers, one event per request (Redis column: PUBLISH to \
                     {AGENTS} subscribers, the fan-out of our broadcast)"
                ),
                &single,
                &fanned,
            )
        },
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
         bytes in a loop, each to its own channel that nobody subscribes to (`SPUBLISH` on a cluster, where \
         the channels spread over the masters); fanned out: the same writers `PUBLISH` to one channel that \
         {AGENTS} redis-rs subscribers of the bench process receive (every message checked to reach all \
         of them), the fan-out an invalidation's broadcast makes to the agents. The events of the first rows all name one tenant (one \
         partition); \"for {WRITERS} tenants\" gives each writer its own. With 8 agents, every invalidation is also \
         received, applied and acknowledged by 8 agent processes on the same 2 cores; \"no agent listening\" \
         runs single events against a second coordinator with its own Redis and no agents, and its raw \
         `PUBLISH` against that Redis."
    );
    Ok((rows, note))
}

/// A row of events per second against raw publishes per second.
fn throughput_row(measure: String, ours: &[f64], raw: &[f64]) -> Row {
    let ratio = median(&ratios(ours, raw));
    Row {
        measure,
        ours: spread(ours, "events/s", 0),
        baseline: spread(raw, "PUBLISH/s", 0),
        result: format!("{ratio:.2}x"),
        target: "≥ 0.3x".into(),
        met: ratio >= 0.3,
    }
}

/// Measure 5 across partitions: single events from `WRITERS` tasks, each
/// for its own tenant, so that they spread over the partitions (and, on a
/// cluster, over the masters), vs raw publishes spread the same way. Run on
/// one Redis and on a cluster, it shows what the masters add.
pub async fn spread_throughput(options: &Options, coordinator: &str, redis_url: &str) -> anyhow::Result<Row> {
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        ours.push(ours_throughput(coordinator, 1, WRITERS, options.run).await?);
        raw.push(raw_publish(&redis, options.run).await?);
        eprintln!(
            "  throughput round {} over {WRITERS} tenants: {:.0} events/s; raw {:.0}/s",
            round + 1,
            ours[round],
            raw[round]
        );
    }
    Ok(throughput_row(
        format!("event throughput, {WRITERS} writers for {WRITERS} tenants, one event per request"),
        &ours,
        &raw,
    ))
}

/// Latencies in µs of one client posting `POST /v1/invalidate` of one key
/// (no wait), one request after another, for `run`.
async fn invalidate_latencies(coordinator: &str, run: Duration) -> anyhow::Result<Vec<f64>> {
    let http = reqwest::Client::new();
    let url = format!("{coordinator}/v1/invalidate");
    let body = json!({"tenant": "bench", "keys": ["replicated:k"]});
    let mut samples = Vec::new();
    let deadline = Instant::now() + run;
    while Instant::now() < deadline {
        let t = Instant::now();
        let status = http.post(&url).json(&body).send().await?.status();
        if status != 200 {
            bail!("POST /v1/invalidate answered {status}");
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// What `min_replicas = 1` costs: two coordinators on one primary with one
/// replica, one with `min_replicas = 1` (every answer waits for `WAIT 1`)
/// and one with `0`, measured in alternating rounds: the single-client
/// latency of an invalidation and the event throughput of `WRITERS` tasks.
pub async fn replication_cost(
    options: &Options,
    replicated: &str,
    unreplicated: &str,
) -> anyhow::Result<(Vec<Row>, String)> {
    let (mut with, mut without, mut with_p50, mut without_p50) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut with_tp, mut without_tp) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let w = invalidate_latencies(replicated, options.run).await?;
        let o = invalidate_latencies(unreplicated, options.run).await?;
        with_tp.push(ours_throughput(replicated, 1, 1, options.run).await?);
        without_tp.push(ours_throughput(unreplicated, 1, 1, options.run).await?);
        eprintln!(
            "  min_replicas round {}: p50 {:.0} µs with 1, {:.0} µs with 0; {:.0} vs {:.0} events/s",
            round + 1,
            median(&w),
            median(&o),
            with_tp[round],
            without_tp[round]
        );
        with_p50.push(median(&w));
        without_p50.push(median(&o));
        with.extend(w);
        without.extend(o);
    }
    let added: Vec<f64> = with_p50.iter().zip(&without_p50).map(|(w, o)| w - o).collect();
    let tp_ratio = median(&ratios(&with_tp, &without_tp));
    let rows = vec![
        Row {
            measure: "one invalidation, 1 client, primary + 1 replica: `min_replicas = 1` (ours) vs `0` (Redis column)"
                .into(),
            ours: format!("p50 {:.0} µs, p99 {:.0} µs", median(&with), percentile(&with, 99.0)),
            baseline: format!("p50 {:.0} µs, p99 {:.0} µs", median(&without), percentile(&without, 99.0)),
            result: format!("+{} per invalidation (p50, per round)", spread(&added, "µs", 0)),
            target: "(reported)".into(),
            met: true,
        },
        Row {
            measure: format!(
                "event throughput, {WRITERS} writers, primary + 1 replica: `min_replicas = 1` (ours) vs `0` (Redis column)"
            ),
            ours: spread(&with_tp, "events/s", 0),
            baseline: spread(&without_tp, "events/s", 0),
            result: format!("{tp_ratio:.2}x"),
            target: "(reported)".into(),
            met: true,
        },
    ];
    let note = "min_replicas: a primary with one replica (and 3 sentinels, `redis+sentinel://`), no agents, \
                two coordinators on it, one with `min_replicas = 1` and one with `min_replicas = 0`, in \
                alternating rounds. Latency: one client posting `POST /v1/invalidate` of one key, one \
                request after another, timed by the client; throughput as in measure 5 (the writers' \
                concurrent invalidations share one `WAIT` per group commit)."
        .to_string();
    Ok((rows, note))
}
