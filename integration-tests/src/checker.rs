//! The stale-read checker: a history test of the promise that no agent
//! serves a value whose invalidation was acknowledged.
//!
//! - A **database** (an array of version counters, the source of truth) holds
//!   one version per item.
//! - **Writers** bump an item's version in the database, then post a write
//!   event for it to the coordinator with `wait=all`, retrying with the same
//!   `event_id` until it answers 200. The moment the 200 arrives is recorded:
//!   from then on, no read may return an older version.
//! - **Readers** on every agent `GET` items. A hit records the version it
//!   returned and when the read began. A miss reads the database *after* the
//!   agent issued the fill token and `PUT`s what it read with that token
//!   (tagged `item:{id}`, which the event's default rule invalidates).
//! - A **chaos** task injects faults: subscriber kills, an output-buffer limit
//!   that drops subscribers during a burst, a frozen agent, Redis killed and
//!   restarted empty, the coordinator killed and restarted.
//!
//! Afterwards every hit is checked against the acknowledgements: a read that
//! began after the 200 for version `v` and returned a version below `v` is
//! stale. Reads that overlap an acknowledgement are not judged (they may
//! legitimately see either version).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use reqwest::Client;
use serde_json::json;

use crate::{start_coordinator, wait_ready, Backend, Cluster, ClusterOptions, Redis};

/// The tenant the checker uses.
const TENANT: &str = "chk";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long readers and writers run.
    pub duration: Duration,
    /// Agents to start.
    pub agents: usize,
    /// Items in the database.
    pub items: usize,
    /// Writer tasks (each owns a share of the items).
    pub writers: usize,
    /// Reader tasks per agent.
    pub readers_per_agent: usize,
    /// Inject faults (otherwise a plain run, for comparison).
    pub faults: bool,
    /// Pause between faults.
    pub fault_every: Duration,
    /// After `duration`, go on until this many reads were judged, this many
    /// writes acknowledged and every fault injected once (so that a starved
    /// machine yields a run that means something, only slower), but no
    /// longer than `give_up_after` in all.
    pub min_reads: u64,
    /// See `min_reads`.
    pub min_writes: u64,
    /// See `min_reads`.
    pub give_up_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(50),
            agents: 3,
            items: 16,
            writers: 2,
            readers_per_agent: 2,
            faults: true,
            fault_every: Duration::from_millis(2500),
            min_reads: 500,
            min_writes: 50,
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// The faults on one `redis-server`, injected in this order, round after round.
pub const FAULTS: [&str; 5] =
    ["client_kill_pubsub", "output_buffer_overflow", "freeze_agent", "redis_restart", "coordinator_kill"];

/// The faults on a Redis Cluster: a master killed (its replica takes over,
/// and it comes back as a replica), a graceful failover (`CLUSTER FAILOVER`
/// on a replica), besides subscriber kills on every node.
pub const CLUSTER_FAULTS: [&str; 5] =
    ["client_kill_pubsub", "master_kill", "freeze_agent", "forced_failover", "coordinator_kill"];

/// The faults under Sentinel: `SENTINEL FAILOVER` (the primary changes, its
/// last writes possibly lost: a fork), besides subscriber kills on the primary.
pub const SENTINEL_FAULTS: [&str; 4] = ["client_kill_pubsub", "freeze_agent", "sentinel_failover", "coordinator_kill"];

/// The faults a run injects on the Redis that `DCC_TEST_REDIS` names.
pub fn faults() -> &'static [&'static str] {
    match std::env::var("DCC_TEST_REDIS").unwrap_or_default().as_str() {
        "cluster" => &CLUSTER_FAULTS,
        "sentinel" => &SENTINEL_FAULTS,
        _ => &FAULTS,
    }
}

/// The coordinator's config for a checker run: a short `node_dead_after_ms`,
/// so that a frozen agent stops being awaited within a few seconds.
const COORDINATOR_TOML: &str = "node_dead_after_ms = 3000\n";

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Reads answered from a cache (200), judged by the history check.
    pub hits: u64,
    /// Of those, from L1.
    pub l1_hits: u64,
    /// Of those, from L2.
    pub l2_hits: u64,
    /// Misses (404), each followed by a fill from the database.
    pub misses: u64,
    /// Fills stored.
    pub fills: u64,
    /// Fills refused with 409 (an invalidation raced them).
    pub fills_refused: u64,
    /// 503 answers (Redis unreachable and L1 not trusted).
    pub unavailable: u64,
    /// Requests that failed (timeouts while an agent was frozen, refused connections).
    pub errors: u64,
    /// Writes whose invalidation was acknowledged by every live agent.
    pub writes_acked: u64,
    /// `wait=all` answers of 504 (retried).
    pub barrier_timeouts: u64,
    /// Other failed attempts to post an event (coordinator or Redis down; retried).
    pub write_retries: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Stale reads found by the history check, described.
    pub stale: Vec<String>,
    /// How long readers and writers ran.
    pub ran_for: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "stale-read checker, {:.0} s", self.ran_for.as_secs_f64())?;
        writeln!(f, "  cache reads judged: {} (L1 {}, L2 {})", self.hits, self.l1_hits, self.l2_hits)?;
        writeln!(f, "  misses: {} (fills stored {}, refused 409 {})", self.misses, self.fills, self.fills_refused)?;
        writeln!(f, "  503 answers: {}, failed requests: {}", self.unavailable, self.errors)?;
        writeln!(
            f,
            "  writes acknowledged by every live agent: {} (504 retried: {}, other retries: {})",
            self.writes_acked, self.barrier_timeouts, self.write_retries
        )?;
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        writeln!(f, "  faults injected: {}", if faults.is_empty() { "none".into() } else { faults.join(", ") })?;
        write!(f, "  STALE READS: {}", self.stale.len())?;
        for s in self.stale.iter().take(20) {
            write!(f, "\n    {s}")?;
        }
        Ok(())
    }
}

/// A cache read that returned a value.
struct Hit {
    item: usize,
    version: u64,
    began: Instant,
    agent: usize,
    layer: String,
}

/// Shared between the tasks.
struct Shared {
    database: Vec<AtomicU64>,
    /// Per item: (version, when its invalidation was acknowledged).
    acked: Mutex<Vec<Vec<(u64, Instant)>>>,
    hits: Mutex<Vec<Hit>>,
    counters: Mutex<Report>,
    stop: AtomicBool,
    agents: Vec<String>,
    coordinator: Mutex<String>,
    /// When the run began, and when each fault began, to explain a stale read.
    started: Instant,
    fault_log: Mutex<Vec<(Instant, &'static str)>>,
}

impl Shared {
    /// Whether the run has done the minimum of work that `options` asks for.
    fn enough(&self, options: &Options) -> bool {
        let report = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        report.hits >= options.min_reads
            && report.writes_acked >= options.min_writes
            && (!options.faults || faults().iter().all(|kind| report.faults.contains_key(kind)))
    }

    fn count(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Runs the checker on a cluster of its own and returns what it saw.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let cluster = Cluster::start(ClusterOptions {
        agents: options.agents,
        coordinator_toml: COORDINATOR_TOML.into(),
        ..ClusterOptions::default()
    })
    .await?;
    let shared = Arc::new(Shared {
        database: (0..options.items).map(|_| AtomicU64::new(1)).collect(),
        acked: Mutex::new(vec![Vec::new(); options.items]),
        hits: Mutex::new(Vec::new()),
        counters: Mutex::new(Report::default()),
        stop: AtomicBool::new(false),
        agents: cluster.agents.iter().map(|a| a.url("")).collect(),
        coordinator: Mutex::new(cluster.coordinator.url("")),
        started: Instant::now(),
        fault_log: Mutex::new(Vec::new()),
    });
    let http = Client::builder()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(64)
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?;

    let mut tasks = Vec::new();
    for w in 0..options.writers {
        let mine: Vec<usize> = (0..options.items).filter(|i| i % options.writers == w).collect();
        tasks.push(tokio::spawn(writer(shared.clone(), http.clone(), w, mine)));
    }
    for agent in 0..options.agents {
        for r in 0..options.readers_per_agent {
            let seed = (agent * 1000 + r) as u64 + 1;
            tasks.push(tokio::spawn(reader(shared.clone(), http.clone(), agent, options.items, seed)));
        }
    }
    let chaos = {
        let shared = shared.clone();
        let options = options.clone();
        tokio::spawn(async move { chaos(shared, cluster, options).await })
    };
    tokio::time::sleep(options.duration).await;
    let started = shared.started;
    while !shared.enough(&options) && started.elapsed() < options.give_up_after.max(options.duration) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shared.stop.store(true, Ordering::Release);
    let ran_for = started.elapsed();
    let cluster = chaos.await.context("chaos task")??;
    for task in tasks {
        task.await.context("checker task")?;
    }
    drop(cluster);

    let mut report = std::mem::take(&mut *shared.counters.lock().unwrap_or_else(|p| p.into_inner()));
    report.stale = judge(&shared);
    report.ran_for = ran_for;
    Ok(report)
}

/// Counts the reads that returned a version older than one acknowledged before they began.
fn judge(shared: &Shared) -> Vec<String> {
    let acked = shared.acked.lock().unwrap_or_else(|p| p.into_inner());
    let hits = shared.hits.lock().unwrap_or_else(|p| p.into_inner());
    let faults = shared.fault_log.lock().unwrap_or_else(|p| p.into_inner());
    let secs = |at: Instant| at.saturating_duration_since(shared.started).as_secs_f64();
    let mut stale = Vec::new();
    for hit in hits.iter() {
        let required = acked[hit.item].iter().filter(|(_, at)| *at < hit.began).max_by_key(|(v, _)| *v);
        if let Some((required, acked_at)) = required.filter(|(r, _)| hit.version < *r) {
            let fault = faults
                .iter()
                .rev()
                .find(|(at, _)| *at < hit.began)
                .map_or("no fault before it".to_string(), |(at, kind)| {
                    format!("last fault {kind} at {:.2}s", secs(*at))
                });
            stale.push(format!(
                "agent {} returned item {} version {} from {} in a read begun at {:.2}s, but version {required} \
                 had been acknowledged at {:.2}s ({fault})",
                hit.agent + 1,
                hit.item,
                hit.version,
                hit.layer,
                secs(hit.began),
                secs(*acked_at),
            ));
        }
    }
    stale
}

/// Bumps versions and posts their events with `wait=all` until acknowledged.
async fn writer(shared: Arc<Shared>, http: Client, w: usize, mine: Vec<usize>) {
    let mut n = 0u64;
    let mut rng = fastrand::Rng::with_seed(w as u64 + 7);
    while !shared.stop.load(Ordering::Acquire) {
        let item = mine[rng.usize(..mine.len())];
        // The database write, then the event that announces it.
        let version = shared.database[item].fetch_add(1, Ordering::AcqRel) + 1;
        n += 1;
        let event =
            json!({"tenant": TENANT, "entity": "item", "id": item.to_string(), "event_id": format!("w{w}-{n}")});
        loop {
            let url = format!("{}/v1/events?wait=all", shared.coordinator.lock().unwrap_or_else(|p| p.into_inner()));
            match http.post(&url).json(&event).send().await.map(|r| r.status().as_u16()) {
                Ok(200) => {
                    let at = Instant::now();
                    shared.acked.lock().unwrap_or_else(|p| p.into_inner())[item].push((version, at));
                    shared.count(|r| r.writes_acked += 1);
                    break;
                }
                Ok(504) => shared.count(|r| r.barrier_timeouts += 1),
                _ => {
                    shared.count(|r| r.write_retries += 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if shared.stop.load(Ordering::Acquire) {
                // Unacknowledged: it proves nothing, and is not recorded.
                return;
            }
        }
    }
}

/// Reads random items through one agent, filling misses from the database.
async fn reader(shared: Arc<Shared>, http: Client, agent: usize, items: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let base = shared.agents[agent].clone();
    while !shared.stop.load(Ordering::Acquire) {
        // A short pause between reads leaves CPU for the rest of a small machine.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let item = rng.usize(..items);
        let url = format!("{base}/v1/cache/{TENANT}/item:{item}");
        let began = Instant::now();
        let resp = match http.get(&url).send().await {
            Ok(resp) => resp,
            Err(_) => {
                shared.count(|r| r.errors += 1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match resp.status().as_u16() {
            200 => {
                let layer = crate::header_str(&resp, "x-cache");
                let body = resp.text().await.unwrap_or_default();
                let Ok(version) = body.parse::<u64>() else {
                    shared.count(|r| r.errors += 1);
                    continue;
                };
                shared.count(|r| {
                    r.hits += 1;
                    if layer == "L1" {
                        r.l1_hits += 1;
                    } else {
                        r.l2_hits += 1;
                    }
                });
                shared.hits.lock().unwrap_or_else(|p| p.into_inner()).push(Hit { item, version, began, agent, layer });
            }
            404 => {
                shared.count(|r| r.misses += 1);
                let token = crate::header_str(&resp, "x-cache-fill-token");
                // The database is read after the token was issued.
                let version = shared.database[item].load(Ordering::Acquire);
                let put = http
                    .put(format!("{url}?tags=item:{item}&fill_token={token}"))
                    .header("content-type", "text/plain")
                    .body(version.to_string())
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                match put {
                    Ok(204) => shared.count(|r| r.fills += 1),
                    Ok(409) => shared.count(|r| r.fills_refused += 1),
                    Ok(503) => shared.count(|r| r.unavailable += 1),
                    _ => shared.count(|r| r.errors += 1),
                }
            }
            503 => {
                shared.count(|r| r.unavailable += 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => shared.count(|r| r.errors += 1),
        }
    }
}

/// The faults, in turn, until the run ends. Returns the cluster (it owns the processes).
async fn chaos(shared: Arc<Shared>, mut cluster: Cluster, options: Options) -> anyhow::Result<Cluster> {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut turn = 0;
    let http = Client::builder().timeout(Duration::from_secs(5)).pool_idle_timeout(Duration::from_secs(2)).build()?;
    loop {
        tokio::time::sleep(options.fault_every).await;
        if shared.stop.load(Ordering::Acquire) {
            return Ok(cluster);
        }
        if !options.faults {
            continue;
        }
        let kinds = faults();
        let kind = kinds[turn % kinds.len()];
        turn += 1;
        shared.fault_log.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), kind));
        let injected = match kind {
            "client_kill_pubsub" => client_kill_pubsub(&cluster).await,
            "output_buffer_overflow" => output_buffer_overflow(&cluster, &http, &mut rng).await,
            "freeze_agent" => freeze_agent(&cluster, &mut rng).await,
            "redis_restart" => redis_restart(&mut cluster).await,
            "master_kill" => master_kill(&mut cluster, &mut rng).await,
            "forced_failover" => forced_failover(&cluster, &mut rng).await,
            "sentinel_failover" => sentinel_failover(&cluster).await,
            _ => coordinator_kill(&shared, &mut cluster, &http).await,
        };
        match injected {
            Ok(()) => shared.count(|r| *r.faults.entry(kind).or_default() += 1),
            Err(e) => eprintln!("chaos: {kind} failed: {e:#}"),
        }
    }
}

/// Drops every subscriber connection: of the one server, of every cluster
/// node, or of the primary Sentinel names.
async fn client_kill_pubsub(cluster: &Cluster) -> anyhow::Result<()> {
    let nodes: Vec<&Redis> = match &cluster.backend {
        Backend::Single(redis) => vec![redis],
        Backend::Cluster(c) => c.nodes.iter().filter(|n| n.proc.pid().is_some()).collect(),
        Backend::Sentinel(s) => s.node(s.primary_port().await?).into_iter().collect(),
    };
    for node in nodes {
        let mut conn = node.connection().await?;
        let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await?;
    }
    Ok(())
}

/// kill -9 of a random cluster master; once its replica has taken over, the
/// node comes back on its port, empty, and rejoins as a replica.
async fn master_kill(cluster: &mut Cluster, rng: &mut fastrand::Rng) -> anyhow::Result<()> {
    let dir = cluster.dir.path().to_path_buf();
    let Backend::Cluster(redis) = &mut cluster.backend else { anyhow::bail!("master_kill needs a Redis Cluster") };
    let masters: Vec<_> = redis.topology().await?.into_iter().filter(|n| n.master && !n.slots.is_empty()).collect();
    let victim = masters.get(rng.usize(..masters.len().max(1))).context("no master")?.clone();
    redis.node(victim.port).context("the master's process")?.proc.kill();
    redis.wait_healthy(3, 0, Duration::from_secs(60)).await?;
    redis.restart(&dir, victim.port).await?;
    redis.wait_healthy(3, 3, Duration::from_secs(60)).await
}

/// `CLUSTER FAILOVER` on a random replica: it takes its master's slots over,
/// after catching up with it.
async fn forced_failover(cluster: &Cluster, rng: &mut fastrand::Rng) -> anyhow::Result<()> {
    let Backend::Cluster(redis) = &cluster.backend else { anyhow::bail!("forced_failover needs a Redis Cluster") };
    let replicas: Vec<_> = redis.topology().await?.into_iter().filter(|n| !n.master).collect();
    let replica = replicas.get(rng.usize(..replicas.len().max(1))).context("no replica")?;
    let node = redis.nodes.iter().find(|n| n.port == replica.port).context("the replica's process")?;
    let mut conn = node.connection().await?;
    let _: () = redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut conn).await?;
    redis.wait_healthy(3, 3, Duration::from_secs(60)).await
}

/// `SENTINEL FAILOVER`: the sentinels promote the replica at once, whatever
/// it has received.
async fn sentinel_failover(cluster: &Cluster) -> anyhow::Result<()> {
    let Backend::Sentinel(set) = &cluster.backend else { anyhow::bail!("sentinel_failover needs Sentinel") };
    let before = set.primary_port().await?;
    set.failover().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while set.primary_port().await.ok() == Some(before) {
        anyhow::ensure!(Instant::now() < deadline, "the sentinels did not fail over within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Lowers the pub/sub output-buffer limit, freezes an agent so its buffer
/// fills, posts a burst of large invalidations, and restores everything:
/// Redis drops the frozen agent's subscription mid-burst.
async fn output_buffer_overflow(cluster: &Cluster, http: &Client, rng: &mut fastrand::Rng) -> anyhow::Result<()> {
    let mut conn = cluster.redis().connection().await?;
    let set = |value: &str| redis::cmd("CONFIG").arg("SET").arg("client-output-buffer-limit").arg(value).clone();
    let _: () = set("pubsub 16kb 0 0").query_async(&mut conn).await?;
    let victim = cluster.agent(rng.usize(..cluster.agents.len()));
    victim.proc.signal(Signal::SIGSTOP)?;
    let keys: Vec<String> = (0..400).map(|i| format!("burst:{i}:{}", "x".repeat(40))).collect();
    // About 800 KB for the frozen subscriber; on a starved machine, whatever
    // 6 s allow (the victim stays frozen no longer than that).
    let deadline = Instant::now() + Duration::from_secs(6);
    for _ in 0..40 {
        if Instant::now() >= deadline {
            break;
        }
        let body = json!({"tenant": "burst", "keys": keys});
        let post = http.post(cluster.coordinator.url("/v1/invalidate")).json(&body).timeout(Duration::from_secs(2));
        let _ = post.send().await;
    }
    victim.proc.signal(Signal::SIGCONT)?;
    let _: () = set("pubsub 32mb 8mb 60").query_async(&mut conn).await?;
    Ok(())
}

/// Freezes an agent for 0.5 to 4 s (sometimes past its staleness bound and
/// the coordinator's `node_dead_after_ms`).
async fn freeze_agent(cluster: &Cluster, rng: &mut fastrand::Rng) -> anyhow::Result<()> {
    let victim = cluster.agent(rng.usize(..cluster.agents.len()));
    victim.proc.signal(Signal::SIGSTOP)?;
    tokio::time::sleep(Duration::from_millis(rng.u64(500..4000))).await;
    victim.proc.signal(Signal::SIGCONT)?;
    Ok(())
}

/// kill -9 of Redis, and a new empty one on the same port.
async fn redis_restart(cluster: &mut Cluster) -> anyhow::Result<()> {
    let port = cluster.redis().port;
    cluster.redis_mut().proc.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.set_redis(Redis::start_on(cluster.dir.path(), port).await?);
    Ok(())
}

/// kill -9 of the coordinator while writers post to it, and a restart on the same port.
async fn coordinator_kill(shared: &Shared, cluster: &mut Cluster, http: &Client) -> anyhow::Result<()> {
    let port: u16 = cluster.coordinator.addr.rsplit(':').next().and_then(|p| p.parse().ok()).context("port")?;
    cluster.coordinator.proc.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.coordinator = start_coordinator(cluster.dir.path(), &cluster.redis_url(), port, COORDINATOR_TOML)?;
    wait_ready(http, &cluster.coordinator).await?;
    *shared.coordinator.lock().unwrap_or_else(|p| p.into_inner()) = cluster.coordinator.url("");
    Ok(())
}
