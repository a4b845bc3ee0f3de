//! PostgreSQL as the source of write events (`[[sources]]`, contract v2 §6):
//! how long a committed UPDATE takes to reach the last agent, and how many
//! row changes per second one coordinator consumes from its slot.
//!
//! Both run on a system of their own: a private PostgreSQL
//! ([`crate::postgres`]), a private Redis, a coordinator whose source follows
//! `public.suppliers` (tenant from its `tenant` column) and 8 agents.
//!
//! "Applied by the last agent": the propagation measure ([`super::fanout`])
//! hears when each agent has applied a message from the acknowledgement the
//! agent publishes, and agents publish one only for a message that a
//! `wait=all` caller waits for. Nobody waits for the source's invalidations
//! (they ask for no acknowledgement: agents only record their position every
//! 100 ms), so here every agent logs each message it applies
//! (`RUST_LOG=node_agent::sync=debug`: `applied invalidation ... seq=N`,
//! stamped with the agent's wall clock to the µs), and the bench reads the
//! logs afterwards. The bench's own subscriber on the tenant's partition's
//! invalidation channel tells which seq carried which row (by its tag
//! `supplier:<id>`). Commit times are the bench's wall clock as each UPDATE
//! returns; the same clock, on the same machine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use shared::store::{Delivery, Store};

use super::{median, percentile, ratios, spread, Options, Row};
use crate::postgres::Postgres;
use crate::{bin_path, free_port, start_coordinator, wait_ready, Proc, Redis, Service};

/// Commits per second of the latency measure.
const RATE: u64 = 500;
/// Agents listening.
const AGENTS: usize = 8;
/// The tenant of every row (one partition).
const TENANT: &str = "bench";
/// Rows per transaction of the consumption measure.
const ROWS_PER_TRANSACTION: u64 = 100;
/// Ids of the posted events of the latency baseline start above this (no row has them).
const POSTED_IDS: u64 = 100_000_000;
/// What the agents log: info, and every message applied.
const AGENT_LOG: &str = "info,node_agent::sync=debug";
/// The longest the coordinator may take to connect or to consume a backlog.
const DEADLINE: Duration = Duration::from_secs(300);

/// The followed table: an id, a tenant column and a version to bump. The
/// source needs the tenant in the replica identity, hence `FULL`.
fn schema(rows: u64) -> String {
    format!(
        "CREATE TABLE suppliers (id int PRIMARY KEY, tenant text NOT NULL, version int NOT NULL DEFAULT 0) \
         WITH (autovacuum_enabled = false);
         ALTER TABLE suppliers REPLICA IDENTITY FULL;
         INSERT INTO suppliers (id, tenant) SELECT g, '{TENANT}' FROM generate_series(1, {rows}) g;"
    )
}

/// The coordinator's `[[sources]]`.
fn sources_toml(pg: &Postgres) -> String {
    format!(
        r#"
[[sources]]
kind = "postgres"
url = "{}"
slot = "dcc"
publication = "dcc"

[[sources.tables]]
table = "public.suppliers"
entity = "supplier"
tenant_column = "tenant"
"#,
        pg.url()
    )
}

/// Wall-clock now, µs since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// PostgreSQL, Redis, the coordinator and the agents. Fields drop in order:
/// the processes first, their directory last.
struct System {
    /// The coordinator, while it runs.
    coordinator: Option<Service>,
    /// The agents, each logging what it applies.
    agents: Vec<Service>,
    /// The database.
    pg: Postgres,
    /// L2, the log and the channels.
    redis: Redis,
    /// The coordinator's extra TOML.
    toml: String,
    /// Rows in `suppliers` (ids 1..=rows).
    rows: u64,
    /// Logs, configs, PostgreSQL's data; kept with `DCC_KEEP_LOGS`.
    dir: tempfile::TempDir,
}

impl System {
    async fn start(rows: u64) -> anyhow::Result<System> {
        let mut dir = tempfile::Builder::new().prefix("dcc-pgsource-").tempdir()?;
        dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let redis = Redis::start(dir.path()).await?;
        let pg = Postgres::start(dir.path()).await?;
        pg.psql(&schema(rows)).await.context("creating suppliers")?;
        let toml = sources_toml(&pg);
        let mut agents = Vec::new();
        for i in 1..=AGENTS {
            agents.push(start_logging_agent(dir.path(), &redis.url(), &format!("agent-{i}"))?);
        }
        let mut system = System { coordinator: None, agents, pg, redis, toml, rows, dir };
        let client = reqwest::Client::new();
        for agent in &system.agents {
            wait_ready(&client, agent).await?;
        }
        system.start_coordinator()?;
        system.wait_connected().await?;
        Ok(system)
    }

    /// Starts a coordinator on a fresh port (without waiting).
    fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let coordinator = start_coordinator(self.dir.path(), &self.redis.url(), free_port(), &self.toml)?;
        self.coordinator = Some(coordinator);
        Ok(())
    }

    /// Stops the coordinator (SIGTERM, a clean exit).
    fn stop_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(mut coordinator) = self.coordinator.take() {
            let status = coordinator.proc.terminate()?;
            if !status.success() {
                bail!("the coordinator exited with {status}:\n{}", coordinator.proc.log_tail());
            }
        }
        Ok(())
    }

    fn coordinator(&self) -> anyhow::Result<&Service> {
        self.coordinator.as_ref().context("no coordinator runs")
    }

    /// The source's entry of `/v1/cluster/health` (an error while the
    /// coordinator does not answer yet).
    async fn source(&self, http: &reqwest::Client) -> anyhow::Result<Value> {
        let health: Value =
            http.get(self.coordinator()?.url("/v1/cluster/health")).send().await?.error_for_status()?.json().await?;
        Ok(health["sources"][0].clone())
    }

    /// Waits until the coordinator is ready and its source streams.
    async fn wait_connected(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        wait_ready(&http, self.coordinator()?).await?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let source = self.source(&http).await?;
            if source["connected"] == true {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the source never connected: {source}\n{}", self.coordinator()?.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the slot's `confirmed_flush_lsn` reaches PostgreSQL's
    /// current WAL position (everything committed so far is answered and
    /// confirmed); false if it does not within `patience`.
    async fn wait_confirmed(&self, pg: &tokio_postgres::Client, patience: Duration) -> anyhow::Result<bool> {
        let target: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let deadline = Instant::now() + patience;
        loop {
            if slot_reached(pg, &target).await? {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether the slot `dcc`'s `confirmed_flush_lsn` is at `lsn` or past it.
async fn slot_reached(pg: &tokio_postgres::Client, lsn: &str) -> anyhow::Result<bool> {
    let row = pg
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots \
             WHERE slot_name = 'dcc'",
            &[&lsn],
        )
        .await?;
    Ok(row.get(0))
}

/// An agent as [`crate::start_agent`] starts it, logging every message it
/// applies (`env` sets `RUST_LOG` and then becomes the agent, so the process
/// held is the agent itself).
fn start_logging_agent(dir: &Path, redis_url: &str, node_id: &str) -> anyhow::Result<Service> {
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join(format!("{node_id}.toml"));
    std::fs::write(&config, format!("bind = \"{addr}\"\nredis_url = \"{redis_url}\"\nnode_id = \"{node_id}\"\n"))?;
    let args = [
        format!("RUST_LOG={AGENT_LOG}"),
        bin_path("node-agent").display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    let proc = Proc::spawn(node_id, Path::new("/usr/bin/env"), &args, &[], dir.join(format!("{node_id}.log")))?;
    Ok(Service { proc, addr, config })
}

/// A connection to the database `app`, for the load generator.
async fn connect(pg: &Postgres) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Per row id, the seq of the first message that carried its tag
/// `supplier:<id>` and when the bench heard it (µs since the epoch).
type Carried = Arc<Mutex<HashMap<u64, (u64, u64)>>>;

/// Follows the bench tenant's partition's invalidation channel into
/// `carried` until the task is aborted.
async fn follow(redis: &Store, carried: Carried) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let partition = shared::schema::Layout::default().of(TENANT).clone();
    let mut subscription = redis.subscribe(&[partition.channel()]).await?;
    Ok(tokio::spawn(async move {
        while let Ok(Some(delivery)) = subscription.next().await {
            let at = now_us();
            let Delivery::Message { payload, .. } = delivery else { continue };
            let Ok(message) = serde_json::from_slice::<Value>(&payload) else { continue };
            let Some(seq) = message["seq"].as_u64() else { continue };
            let mut carried = carried.lock().unwrap_or_else(|p| p.into_inner());
            for selector in message["invalidations"].as_array().into_iter().flatten() {
                for tag in selector["tags"].as_array().into_iter().flatten() {
                    let id = tag.as_str().and_then(|t| t.strip_prefix("supplier:")).and_then(|id| id.parse().ok());
                    if let Some(id) = id {
                        carried.entry(id).or_insert((seq, at));
                    }
                }
            }
        }
    }))
}

/// µs since the Unix epoch of an RFC 3339 UTC timestamp as the agents log
/// it (`2026-01-02T03:04:05.123456Z`).
fn parse_timestamp(s: &str) -> Option<u64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, min, sec) = (hms.next()??, hms.next()??, hms.next()??);
    let digits: String = fraction.chars().chain(std::iter::repeat('0')).take(6).collect();
    let micros: u64 = digits.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((u64::try_from(days).ok()? * 86_400 + h * 3600 + min * 60 + sec) * 1_000_000 + micros)
}

/// Every `applied invalidation` of `partition` in an agent's log: (seq, when
/// in µs since the epoch), in the order applied.
fn applies(log: &Path, partition: u16) -> anyhow::Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let field = |line: &str, name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse::<u64>().ok())
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("applied invalidation")) {
        let at = line.split_whitespace().next().and_then(parse_timestamp);
        if let (Some(at), Some(p), Some(seq)) = (at, field(line, "partition="), field(line, "seq=")) {
            if p == u64::from(partition) {
                out.push((seq, at));
            }
        }
    }
    Ok(out)
}

/// Every agent's applies, read from the logs.
fn all_applies(system: &System) -> anyhow::Result<Vec<Vec<(u64, u64)>>> {
    let partition = shared::schema::Layout::default().of(TENANT).index;
    let out: Vec<_> = system.agents.iter().map(|a| applies(&a.proc.log, partition)).collect::<Result<_, _>>()?;
    if out.iter().any(Vec::is_empty) {
        bail!("an agent logged no applied invalidation (is RUST_LOG={AGENT_LOG} in force?)");
    }
    Ok(out)
}

/// For each (row id, start in µs since the epoch): from the start to the
/// last agent applying the message that carried the row, and to the bench's
/// subscriber hearing that message, in µs.
fn latencies(
    samples: &[(u64, u64)],
    carried: &HashMap<u64, (u64, u64)>,
    applies: &[Vec<(u64, u64)>],
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut to_last, mut to_broadcast) = (Vec::new(), Vec::new());
    for (id, start) in samples {
        let Some((seq, heard)) = carried.get(id) else { bail!("no broadcast carried row {id}") };
        let mut last = *start;
        for agent in applies {
            // Applies come in seq order: the first covering `seq`.
            let i = agent.partition_point(|(s, _)| s < seq);
            match agent.get(i) {
                Some((_, at)) => last = last.max(*at),
                None => bail!("seq {seq} (row {id}) was never applied by every agent"),
            }
        }
        to_last.push(last.saturating_sub(*start) as f64);
        to_broadcast.push(heard.saturating_sub(*start) as f64);
    }
    Ok((to_last, to_broadcast))
}

/// Single-row UPDATEs (autocommit) of ids from `first`, paced at `RATE` per
/// second for `run`, one after another on one connection: (id, when the
/// UPDATE returned), and the rate reached.
async fn commit_at_rate(pg: &tokio_postgres::Client, first: u64, run: Duration) -> anyhow::Result<Vec<(u64, u64)>> {
    let update = pg.prepare("UPDATE suppliers SET version = version + 1 WHERE id = $1").await?;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let deadline = Instant::now() + run;
    let mut samples = Vec::new();
    let mut id = first;
    while Instant::now() < deadline {
        ticker.tick().await;
        let updated = pg.execute(&update, &[&i32::try_from(id)?]).await?;
        let at = now_us();
        if updated != 1 {
            bail!("UPDATE of row {id} updated {updated} rows");
        }
        samples.push((id, at));
        id += 1;
    }
    Ok(samples)
}

/// The baseline: the same invalidation posted to `/v1/events` (no wait) at
/// `RATE` per second for `run`, ids from `first`: (id, when the POST was sent).
async fn post_at_rate(
    http: &reqwest::Client,
    coordinator: &str,
    first: u64,
    run: Duration,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let url = format!("{coordinator}/v1/events");
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let deadline = Instant::now() + run;
    let mut posts = Vec::new();
    let mut id = first;
    while Instant::now() < deadline {
        ticker.tick().await;
        let (http, url) = (http.clone(), url.clone());
        posts.push(tokio::spawn(async move {
            let event = json!({"tenant": TENANT, "entity": "supplier", "id": id.to_string()});
            let at = now_us();
            let status = http.post(&url).json(&event).send().await?.status();
            if status != 200 {
                bail!("POST /v1/events answered {status}");
            }
            anyhow::Ok((id, at))
        }));
        id += 1;
    }
    let mut samples = Vec::new();
    for post in posts {
        samples.push(post.await??);
    }
    Ok(samples)
}

/// The first 10% of a run is warm-up.
fn warm(samples: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let skip = samples.len() / 10;
    samples.into_iter().skip(skip).collect()
}

/// "p50 …, p99 …, max …" in ms of µs samples.
fn pooled(v: &[f64]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        median(v) / 1e3,
        percentile(v, 99.0) / 1e3,
        percentile(v, 100.0) / 1e3
    )
}

/// Measure 1: commit to the last agent at `RATE` commits per second, in
/// rounds alternating with the posted-event baseline.
async fn commit_latency(options: &Options, system: &System, run: Duration) -> anyhow::Result<(Row, String)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let redis = Store::open(&system.redis.url(), 4).map_err(anyhow::Error::msg)?;
    let pg = connect(&system.pg).await?;
    let coordinator = system.coordinator()?.url("");
    let carried: Carried = Arc::default();
    let follower = follow(&redis, carried.clone()).await?;
    let (mut committed, mut posted) = (Vec::new(), Vec::new());
    let (mut next_row, mut next_posted) = (1, POSTED_IDS + 1);
    for _ in 0..options.rounds {
        let c = commit_at_rate(&pg, next_row, run).await?;
        next_row += c.len() as u64;
        // Stragglers: the source confirms and the agents apply the last ones.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = post_at_rate(&http, &coordinator, next_posted, run).await?;
        next_posted += p.len() as u64;
        tokio::time::sleep(Duration::from_millis(500)).await;
        committed.push(c);
        posted.push(p);
    }
    follower.abort();
    let carried = carried.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let applies = all_applies(system)?;
    let (mut ours, mut baseline, mut broadcast, mut ours_p99, mut rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (round, (c, p)) in committed.into_iter().zip(posted).enumerate() {
        let span = c.last().map_or(0, |l| l.1).saturating_sub(c.first().map_or(0, |f| f.1));
        rates.push(c.len() as f64 / (span as f64 / 1e6).max(1e-6));
        let (o, b) = latencies(&warm(c), &carried, &applies)?;
        let (r, _) = latencies(&warm(p), &carried, &applies)?;
        eprintln!(
            "  pgsource latency round {}: {:.0} commits/s; commit to last agent p50 {:.0} µs p99 {:.0} µs \
             (to broadcast p50 {:.0} µs); posted event to last agent p50 {:.0} µs p99 {:.0} µs",
            round + 1,
            rates[round],
            median(&o),
            percentile(&o, 99.0),
            median(&b),
            median(&r),
            percentile(&r, 99.0)
        );
        ours_p99.push(percentile(&o, 99.0) / 1e3);
        ours.extend(o);
        broadcast.extend(b);
        baseline.extend(r);
    }
    let row = Row {
        measure: format!(
            "PostgreSQL source: commit to the last of {AGENTS} agents, single-row UPDATEs at {RATE} commits/s \
             (Redis column: the same invalidation posted to `/v1/events` at the same rate, from the POST; all \
             rounds pooled)"
        ),
        ours: pooled(&ours),
        baseline: pooled(&baseline),
        result: format!("p99 {:.2} ms (rounds: {})", percentile(&ours, 99.0) / 1e3, spread(&ours_p99, "ms", 2)),
        target: "(reported)".into(),
        met: true,
    };
    let note = format!(
        "PostgreSQL source, latency: a private PostgreSQL 15 (`fsync=off`), a table `suppliers(id int primary \
         key, tenant text, version int)` (`REPLICA IDENTITY FULL`, as a `tenant_column` needs) followed by one \
         coordinator's `[[sources]]`, {AGENTS} agents. One tokio-postgres connection commits `UPDATE suppliers \
         SET version = version + 1 WHERE id = $1` (autocommit, a new row each time) paced at {RATE}/s for {} ms \
         per round (reached: {}); each commit is timed from the UPDATE returning to the last agent having \
         applied the message that carried its tag `supplier:<id>`. Agents log each message they apply \
         (`RUST_LOG={AGENT_LOG}`, the agent's wall clock to the µs) and the bench reads the logs: the \
         source's invalidations ask for no acknowledgement, so the propagation measure's published \
         acknowledgements do not exist for them. Commit to the bench's own subscriber hearing the broadcast: \
         p50 {:.2} ms, p99 {:.2} ms. Redis column: in alternating rounds, events of the same entity posted to \
         `/v1/events` (no wait) at the same rate, from the POST being sent to the last agent's apply, the \
         same way timed: what an application that posts its own events after committing gets. The first 10% \
         of each run is warm-up.",
        run.as_millis(),
        spread(&rates, "commits/s", 0),
        median(&broadcast) / 1e3,
        percentile(&broadcast, 99.0) / 1e3
    );
    Ok((row, note))
}

/// One consumption round: what the coordinator did with a backlog.
struct Consumed {
    /// Row changes per second, from the source streaming to the last row answered.
    rate: f64,
    /// The same from the coordinator's start (its start-up and connection included).
    from_start: f64,
    /// Coordinator start to the source streaming, in s.
    connect: f64,
}

/// Commits `transactions` transactions of `ROWS_PER_TRANSACTION` rows each
/// with the coordinator stopped, starts it again and times until its source
/// has answered every row change (its health's `changes`).
async fn consume_backlog(
    system: &mut System,
    pg: &tokio_postgres::Client,
    transactions: u64,
    first_range: &mut u64,
) -> anyhow::Result<Consumed> {
    // Everything before is confirmed, so that nothing is replayed.
    if !system.wait_confirmed(pg, Duration::from_secs(15)).await? {
        eprintln!("  (the slot's confirmed_flush_lsn did not reach the WAL end before stopping the coordinator)");
    }
    system.stop_coordinator()?;
    let update = pg.prepare("UPDATE suppliers SET version = version + 1 WHERE id BETWEEN $1 AND $2").await?;
    let ranges = system.rows / ROWS_PER_TRANSACTION;
    for _ in 0..transactions {
        let low = (*first_range % ranges) * ROWS_PER_TRANSACTION + 1;
        *first_range += 1;
        let high = low + ROWS_PER_TRANSACTION - 1;
        let updated = pg.execute(&update, &[&i32::try_from(low)?, &i32::try_from(high)?]).await?;
        if updated != ROWS_PER_TRANSACTION {
            bail!("UPDATE of rows {low}..={high} updated {updated}");
        }
    }
    let end: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let rows = transactions * ROWS_PER_TRANSACTION;

    let http = reqwest::Client::new();
    let started = Instant::now();
    system.start_coordinator()?;
    let deadline = started + DEADLINE;
    let mut streaming: Option<(Instant, u64)> = None;
    let done = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Instant::now() > deadline {
            bail!(
                "the coordinator did not answer {rows} row changes within {DEADLINE:?}: {}\n{}",
                system.source(&http).await.unwrap_or_default(),
                system.coordinator()?.proc.log_tail()
            );
        }
        let Ok(source) = system.source(&http).await else { continue };
        let changes = source["changes"].as_u64().unwrap_or(0);
        if source["connected"] == true && streaming.is_none() {
            streaming = Some((Instant::now(), changes));
        }
        if changes >= rows {
            if changes > rows {
                eprintln!("  (the source answered {changes} row changes, {rows} were committed: some were replayed)");
            }
            break Instant::now();
        }
    };
    let (streaming_at, changes_then) = streaming.unwrap_or((started, 0));
    // Every change was confirmed too: the slot's confirmed_flush_lsn reaches the WAL end of the commits.
    let confirmed_by = Instant::now() + Duration::from_secs(10);
    while !slot_reached(pg, &end).await? {
        if Instant::now() > confirmed_by {
            eprintln!("  (the slot's confirmed_flush_lsn did not reach {end} within 10 s of the last answer)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let streamed = done.duration_since(streaming_at).as_secs_f64().max(1e-3);
    Ok(Consumed {
        rate: rows.saturating_sub(changes_then) as f64 / streamed,
        from_start: rows as f64 / done.duration_since(started).as_secs_f64(),
        connect: streaming_at.duration_since(started).as_secs_f64(),
    })
}

/// The baseline: one client posting `ROWS_PER_TRANSACTION` events of the
/// same entity as one `/v1/events` batch, one request after another, for
/// `run`: events per second.
async fn post_batches(coordinator: &str, first: &mut u64, run: Duration) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let url = format!("{coordinator}/v1/events");
    let started = Instant::now();
    let mut events = 0;
    while started.elapsed() < run {
        let batch: Vec<Value> = (0..ROWS_PER_TRANSACTION)
            .map(|i| json!({"tenant": TENANT, "entity": "supplier", "id": (*first + i).to_string()}))
            .collect();
        *first += ROWS_PER_TRANSACTION;
        let status = http.post(&url).json(&batch).send().await?.status();
        if status != 200 {
            bail!("POST /v1/events answered {status}");
        }
        events += ROWS_PER_TRANSACTION;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Measure 2: row changes per second through one coordinator, from a
/// backlog of `transactions` transactions per round.
async fn consumption(
    options: &Options,
    system: &mut System,
    transactions: u64,
    rounds: usize,
) -> anyhow::Result<(Row, String)> {
    let pg = connect(&system.pg).await?;
    let (mut rates, mut from_start, mut connect_s, mut posted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut range = 0;
    let mut posted_id = 2 * POSTED_IDS;
    for round in 0..rounds {
        let c = consume_backlog(system, &pg, transactions, &mut range).await?;
        let coordinator = system.coordinator()?.url("");
        let p = post_batches(&coordinator, &mut posted_id, options.run).await?;
        eprintln!(
            "  pgsource consumption round {}: {:.0} rows/s streaming ({:.0} rows/s from the coordinator's start, \
             {:.2} s to connect); posted batches of {ROWS_PER_TRANSACTION}: {p:.0} events/s",
            round + 1,
            c.rate,
            c.from_start,
            c.connect
        );
        rates.push(c.rate);
        from_start.push(c.from_start);
        connect_s.push(c.connect);
        posted.push(p);
    }
    let ratio = median(&ratios(&rates, &posted));
    let row = Row {
        measure: format!(
            "PostgreSQL source: row changes per second through one coordinator, {ROWS_PER_TRANSACTION} rows per \
             transaction, {AGENTS} agents (Redis column: the same invalidations posted as one `/v1/events` batch \
             of {ROWS_PER_TRANSACTION}, one request at a time)"
        ),
        ours: spread(&rates, "rows/s", 0),
        baseline: spread(&posted, "events/s", 0),
        result: format!("{ratio:.2}x"),
        target: "(reported)".into(),
        met: true,
    };
    let note = format!(
        "PostgreSQL source, consumption: the system of the latency measure. Per round, with every earlier \
         change confirmed, the coordinator is stopped (SIGTERM); {transactions} transactions of `UPDATE \
         suppliers SET version = version + 1 WHERE id BETWEEN $1 AND $2` ({ROWS_PER_TRANSACTION} rows each, \
         {} row changes) are committed; a coordinator is started and `/v1/cluster/health` polled every 50 ms \
         until its source's `changes` (row changes answered: L2, log, broadcast) reaches them all; rows/s \
         counts from the first poll that shows the source streaming (start to streaming: {}; rows/s from the \
         coordinator's start, start-up included: {}). Afterwards the slot's `confirmed_flush_lsn` is checked \
         to reach the WAL end of the commits. Redis column: one client posting the same {ROWS_PER_TRANSACTION} \
         invalidations (`entity: supplier`, default rule) as one JSON array, one request after another, for \
         {} ms after each round: what the source's one-transaction-at-a-time path costs against a client \
         doing the same through HTTP.",
        transactions * ROWS_PER_TRANSACTION,
        spread(&connect_s, "s", 2),
        spread(&from_start, "rows/s", 0),
        options.run.as_millis()
    );
    Ok((row, note))
}

/// Both measures on one system: commit to the last agent, then
/// consumption of `transactions` transactions per round.
pub async fn run(options: &Options, transactions: u64) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let run = (options.run * 2).max(Duration::from_secs(1));
    // A fresh row for every commit of the latency rounds (with room for the
    // pacing's catch-up), and at least 100 ranges for the consumption.
    let commits = RATE * run.as_millis() as u64 / 1000 * options.rounds as u64;
    let rows = (commits * 3 / 2 + 1000).max(100 * ROWS_PER_TRANSACTION);
    let mut system = System::start(rows).await?;
    let (latency_row, latency_note) = commit_latency(options, &system, run).await?;
    let rounds = options.rounds.min(3);
    let (consumption_row, consumption_note) = consumption(options, &mut system, transactions, rounds).await?;
    Ok((vec![latency_row, consumption_row], vec![latency_note, consumption_note]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_the_agents_log_them() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00.000001Z"), Some(1));
        assert_eq!(parse_timestamp("2000-03-01T00:00:00Z"), Some(951_868_800_000_000));
        assert_eq!(parse_timestamp("2026-12-07T04:48:49.5Z"), Some(1_796_618_929_500_000));
        assert_eq!(parse_timestamp("garbage"), None);
    }
}
