//! `make demo`: starts a private redis-server, a coordinator and three agents,
//! and tells the story of one value: filled through one agent, read through the
//! others (L2, then L1), invalidated by a write event (with the time until the
//! last agent dropped it), a rules cascade, the cluster's health, and who may
//! do what: the processes run with tokens, a request without one is refused,
//! and the audit trail shows it; then a write no app reported: an `UPDATE`
//! made with `psql` in a private PostgreSQL reaches every agent through the
//! coordinator's PostgreSQL source, with no event posted. Exits 0 and leaves
//! nothing running.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use integration_tests::postgres::Postgres;
use integration_tests::{deploy_coordinator_toml, Cluster, ClusterOptions};
use reqwest::Client;
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// The demo's tokens: the app's (its tenant `acme`) and an operator's.
struct Secrets {
    app: String,
    ops: String,
}

impl Secrets {
    /// Fresh random secrets.
    fn new() -> Secrets {
        let secret = || format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        Secrets { app: secret(), ops: secret() }
    }

    /// `[[tokens]]` for both processes: only the secrets' SHA-256 is configured.
    fn toml(&self) -> String {
        format!(
            "\n[[tokens]]\nname = \"orders-app\"\nsha256 = \"{}\"\ntenants = [\"acme\"]\n\
             scopes = [\"read\", \"write\", \"invalidate\"]\n\n[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\n\
             scopes = [\"admin\"]\n",
            shared::auth::sha256_hex(&self.app),
            shared::auth::sha256_hex(&self.ops)
        )
    }
}

/// The app's table, which the coordinator follows (the `[[sources]]` below).
const SUPPLIERS: &str = "CREATE TABLE suppliers (id int PRIMARY KEY, tenant text NOT NULL, name text NOT NULL);
     ALTER TABLE suppliers REPLICA IDENTITY FULL;
     INSERT INTO suppliers VALUES (9, 'acme', 'Acme Bolts'), (10, 'acme', 'Acme Nuts');";

/// The coordinator's `[[sources]]`: the suppliers table of `postgres`.
fn source_toml(postgres: &Postgres) -> String {
    format!(
        "\n[[sources]]\nkind = \"postgres\"\nurl = \"{}\"\nslot = \"dcc\"\npublication = \"dcc\"\n\n\
         [[sources.tables]]\ntable = \"public.suppliers\"\nentity = \"supplier\"\ntenant_column = \"tenant\"\n",
        postgres.url()
    )
}

async fn run() -> anyhow::Result<()> {
    step("Starting a private PostgreSQL, a private redis-server, a coordinator and 3 node agents, with tokens");
    let pg_dir = tempfile::Builder::new().prefix("dcc-demo-pg-").tempdir()?;
    let postgres = Postgres::start(pg_dir.path()).await.context("starting PostgreSQL")?;
    postgres.psql(SUPPLIERS).await.context("creating the suppliers table")?;
    let secrets = Secrets::new();
    let options = ClusterOptions {
        agents: 3,
        coordinator_toml: format!("{}\n{}{}", deploy_coordinator_toml(), secrets.toml(), source_toml(&postgres)),
        agent_toml: secrets.toml(),
        ..Default::default()
    };
    let cluster = Cluster::start(options).await.context("starting the cluster")?;
    println!("   postgresql   {} (wal_level = logical; table suppliers)", postgres.url());
    println!("   redis        {}", cluster.redis_url());
    println!("   coordinator  http://{}", cluster.coordinator.addr);
    println!("   dashboard    {}", cluster.coordinator.url("/dashboard"));
    for agent in &cluster.agents {
        println!("   {:<12} http://{}", agent.proc.name, agent.addr);
    }
    println!("   tokens       orders-app (tenant acme: read, write, invalidate), ops (admin)");
    // The app's requests carry its token.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", secrets.app).parse()?);
    let http = Client::builder().default_headers(headers).build()?;
    let demo = Demo { cluster: &cluster, http: &http, secrets: &secrets, postgres: &postgres };
    let result = demo.story().await;
    if result.is_err() {
        let dir = cluster.keep_logs();
        eprintln!("logs kept in {}", dir.display());
        return result;
    }
    step("Stopping everything");
    drop(cluster);
    drop(postgres);
    println!("   done: nothing is left running");
    step("The dashboard");
    println!("   `make run` keeps a cluster running (without tokens) until Ctrl-C; its live dashboard is at");
    println!("   http://127.0.0.1:7700/dashboard   (make run prints another port when 7700 is taken)");
    result
}

struct Demo<'a> {
    cluster: &'a Cluster,
    /// Sends the app's token.
    http: &'a Client,
    secrets: &'a Secrets,
    /// The app's database.
    postgres: &'a Postgres,
}

impl Demo<'_> {
    fn agent_url(&self, i: usize, tenant: &str, key: &str) -> String {
        self.cluster.agents[i].url(&format!("/v1/cache/{tenant}/{key}"))
    }

    async fn put(&self, i: usize, key: &str, query: &str, value: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .put(format!("{}{query}", self.agent_url(i, "acme", key)))
            .header("content-type", "application/json")
            .body(value.to_string())
            .send()
            .await?;
        if resp.status().as_u16() != 204 {
            bail!("PUT {key} answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// (status, X-Cache) of a GET.
    async fn get(&self, i: usize, key: &str) -> anyhow::Result<(u16, String)> {
        let resp = self.http.get(self.agent_url(i, "acme", key)).send().await?;
        let layer = resp.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        Ok((resp.status().as_u16(), layer))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self.http.post(self.cluster.coordinator.url(path)).json(&body).send().await?;
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await?;
        if status != 200 {
            bail!("POST {path} answered {status}: {answer}");
        }
        Ok(answer)
    }

    async fn story(&self) -> anyhow::Result<()> {
        let name = |i: usize| self.cluster.agents[i].proc.name.clone();
        let key = "supplier:42:detail";

        step("1. A value is filled through agent-1");
        let (status, _) = self.get(0, key).await?;
        println!("   GET acme/{key} on agent-1 -> {status} (a miss: the app loads it from its database)");
        self.put(0, key, "?tags=supplier:42&ttl=300", r#"{"id":42,"name":"Acme Steel"}"#).await?;
        println!("   PUT acme/{key}?tags=supplier:42 on agent-1 -> 204 (stored in Redis and agent-1's L1)");

        step("2. The other agents read it: first from Redis (L2), then from their own memory (L1)");
        for i in 0..3 {
            let first = self.get(i, key).await?;
            let second = self.get(i, key).await?;
            println!("   {}: {} from {}, then {} from {}", name(i), first.0, first.1, second.0, second.1);
            if second.1 != "L1" {
                bail!("{} did not serve the second read from L1", name(i));
            }
        }

        step("3. The app writes supplier 42 to its database and posts a write event");
        let post = async {
            let started = Instant::now();
            let answer = self
                .post("/v1/events", json!({"tenant": "acme", "entity": "supplier", "id": "42", "op": "update"}))
                .await;
            (answer, started.elapsed())
        };
        let ((answer, accepted), drops) = self.timed_drops(post).await?;
        let answer = answer?;
        println!(
            "   POST /v1/events -> 200 after {:.2} ms: seq {}, {} L2 entries deleted",
            ms(accepted),
            answer["seq"],
            answer["l2_deleted"]
        );
        for (i, d) in drops.iter().enumerate() {
            println!("   {} dropped it {:.2} ms after the event was sent", name(i), ms(*d));
        }
        println!("   => every agent dropped the key within {:.2} ms of the event", ms(last_of(&drops)));
        self.expect_gone(key).await?;

        step("4. A rules cascade: a supplier change reaches payments, orders and the ledger");
        let related = [
            ("suppliers:list:page1", ""),
            ("supplier_payments:list:open", ""),
            ("purchase_orders:list:open", ""),
            ("ledger:2026", ""),
            ("report:q3", "?depends_on=ledger:2026"),
            ("supplier:7:detail", "?tags=supplier:7"),
            ("customers:list:page1", ""),
        ];
        self.cache_everywhere(&related).await?;
        println!("   (report:q3 depends_on ledger:2026)");
        let answer =
            self.post("/v1/events", json!({"tenant": "acme", "entity": "supplier", "id": "7", "op": "update"})).await?;
        println!("   event supplier 7 -> seq {}: tags {}", answer["seq"], answer["invalidated"][0]["tags"]);
        println!("   patterns {}", answer["invalidated"][0]["patterns"]);
        let partition = answer["partition"].as_u64().unwrap_or(0) as usize;
        self.wait_applied(partition, answer["seq"].as_u64().unwrap_or(0)).await?;
        self.show_dropped_or_kept(&related).await?;

        step("5. The cluster's health");
        // Agents report on every heartbeat (500 ms): wait for reports made after the story.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let health: Value =
            self.http.get(self.cluster.coordinator.url("/v1/cluster/health")).send().await?.json().await?;
        println!("   status {}, log seq {}", health["status"], health["seq"]);
        println!(
            "   redis {} using {}, {} clients, keyspace hits {} / misses {}",
            health["redis"]["version"].as_str().unwrap_or("?"),
            health["redis"]["used_memory_human"].as_str().unwrap_or("?"),
            health["redis"]["connected_clients"],
            health["redis"]["keyspace_hits"],
            health["redis"]["keyspace_misses"]
        );
        for node in health["nodes"].as_array().cloned().unwrap_or_default() {
            println!(
                "   {:<8} {:<8} applied seq {:<3} lag {} last seen {:>4} ms ago, L1 {} entries / {} bytes, hit ratio {:.2}",
                node["node_id"].as_str().unwrap_or("?"),
                node["status"].as_str().unwrap_or("?"),
                node["applied_seq"],
                node["lag"],
                node["last_seen_ms"],
                node["l1_entries"],
                node["l1_bytes"],
                node["hit_ratio"].as_f64().unwrap_or(0.0)
            );
        }

        step("6. Who may do what: tokens, refusals and the audit trail");
        let anonymous = Client::new();
        let url = self.agent_url(1, "acme", key);
        let refused = anonymous.get(&url).send().await?;
        println!("   GET acme/{key} on agent-2 without a token -> {}", refused.status().as_u16());
        if refused.status().as_u16() != 401 {
            bail!("a request without a token was answered {}", refused.status());
        }
        let other = self.http.get(self.agent_url(1, "globex", key)).send().await?;
        let why: Value = other.json().await.unwrap_or_default();
        println!("   GET globex/{key} with orders-app's token -> 403: {}", why["message"].as_str().unwrap_or("?"));
        let audit_url = self.cluster.coordinator.url("/v1/audit?tenant=acme&limit=3");
        let mut entries = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The trail is written just after each answer.
        while entries.len() < 3 || !entries.iter().any(|e: &Value| e["action"] == "refused") {
            if Instant::now() > deadline {
                bail!("the audit trail does not show the refused request: {entries:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer: Value = anonymous.get(&audit_url).bearer_auth(&self.secrets.ops).send().await?.json().await?;
            entries = answer["entries"].as_array().cloned().unwrap_or_default();
        }
        println!("   GET /v1/audit?tenant=acme&limit=3 with the ops token, newest first:");
        for e in &entries {
            println!(
                "   {:<9} token {:<12} status {} {}{}",
                e["action"].as_str().unwrap_or("?"),
                e["token"].as_str().unwrap_or("(none)"),
                e["status"],
                e["request"].as_str().map(|r| format!("{r} ")).unwrap_or_default(),
                e["seq"].as_u64().map(|s| format!("seq {s}")).unwrap_or_default()
            );
        }
        self.commit_log().await
    }

    /// Step 7: an `UPDATE` made in SQL, which no app reports, reaches every
    /// agent through the coordinator's PostgreSQL source.
    async fn commit_log(&self) -> anyhow::Result<()> {
        step("7. A write no app reported: an UPDATE made with psql, and no event posted");
        // The coordinator creates its slot when it first connects: changes
        // before that are not read.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut source = self.source().await?;
        while source["connected"] != true {
            if Instant::now() > deadline {
                bail!("the coordinator's source did not connect to PostgreSQL: {source}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            source = self.source().await?;
        }
        println!(
            "   the coordinator follows PostgreSQL: slot {}, connected {}, confirmed LSN {}",
            source["slot"], source["connected"], source["confirmed_lsn"]
        );
        let cached = [
            ("supplier:9:detail", "?tags=supplier:9"),
            ("suppliers:list:page1", ""),
            ("supplier_payments:list:open", ""),
            ("ledger:2026", ""),
            ("supplier:10:detail", "?tags=supplier:10"),
        ];
        self.cache_everywhere(&cached).await?;
        let sql = "UPDATE suppliers SET name = 'Acme Bolts & Screws' WHERE id = 9";
        println!("   psql -c \"{sql}\"");
        let (committed, drops) = self.timed_drops(self.postgres.psql(sql)).await?;
        committed.context("the UPDATE")?;
        for (i, d) in drops.iter().enumerate() {
            println!(
                "   {} dropped supplier:9:detail {:.2} ms after psql started",
                self.cluster.agents[i].proc.name,
                ms(*d)
            );
        }
        let last = ms(last_of(&drops));
        println!("   => every agent dropped it within {last:.2} ms of running psql, and no app posted an event");
        self.expect_gone("supplier:9:detail").await?;
        // The cascade went with the same invalidation, which every agent applied.
        self.show_dropped_or_kept(&cached).await?;
        let source = self.source().await?;
        println!(
            "   source: confirmed LSN {} (confirmed only once the invalidation was answered), lag {} bytes / {} ms, {} transactions",
            source["confirmed_lsn"], source["lag_bytes"], source["lag_ms"], source["transactions"]
        );
        Ok(())
    }

    /// PUTs each `(key, query)` through agent-1 and reads it on every agent.
    async fn cache_everywhere(&self, entries: &[(&str, &str)]) -> anyhow::Result<()> {
        for (k, q) in entries {
            self.put(0, k, q, "{}").await?;
            for i in 0..self.cluster.agents.len() {
                self.get(i, k).await?;
            }
        }
        let keys: Vec<&str> = entries.iter().map(|(k, _)| *k).collect();
        println!("   cached on every agent: {}", keys.join(", "));
        Ok(())
    }

    /// Runs `write` while watching every agent apply the next invalidation
    /// of tenant acme's partition: its output, and each agent's time from
    /// the start of `write`.
    async fn timed_drops<F: std::future::Future>(&self, write: F) -> anyhow::Result<(F::Output, Vec<Duration>)> {
        let before = self.applied_seqs().await?;
        let started = Instant::now();
        let watchers: Vec<_> = (0..before.len()).map(|i| self.watch_applied(i, before[i], started)).collect();
        let (output, drops) = tokio::join!(write, futures_join_all(watchers));
        Ok((output, drops.into_iter().collect::<anyhow::Result<_>>()?))
    }

    /// A line per key: dropped by every agent, or kept.
    async fn show_dropped_or_kept(&self, entries: &[(&str, &str)]) -> anyhow::Result<()> {
        for (k, _) in entries {
            let mut states = Vec::new();
            for i in 0..self.cluster.agents.len() {
                states.push(self.get(i, k).await?.0.to_string());
            }
            let verdict = if states.iter().all(|s| s == "404") { "dropped everywhere" } else { "kept" };
            println!("   {k:<30} {verdict:<20} ({})", states.join(" "));
        }
        Ok(())
    }

    /// The coordinator's first source, as its health shows it.
    async fn source(&self) -> anyhow::Result<Value> {
        let health: Value =
            self.http.get(self.cluster.coordinator.url("/v1/cluster/health")).send().await?.json().await?;
        Ok(health["sources"][0].clone())
    }

    /// Each agent's applied seq in tenant acme's partition.
    async fn applied_seqs(&self) -> anyhow::Result<Vec<u64>> {
        let mut seqs = Vec::new();
        for i in 0..self.cluster.agents.len() {
            seqs.push(self.applied_seq(i).await?);
        }
        Ok(seqs)
    }

    async fn applied_seq(&self, i: usize) -> anyhow::Result<u64> {
        let partition = usize::from(shared::schema::Layout::default().of("acme").index);
        let status: Value = self.http.get(self.cluster.agents[i].url("/v1/status")).send().await?.json().await?;
        Ok(status["partitions"][partition]["applied_seq"].as_u64().unwrap_or(0))
    }

    /// Polls agent `i` until it applied an invalidation after seq `before`
    /// (its L1 entry is then gone); returns the time since `started`. It
    /// watches the agent rather than reading the key: a read of a missing
    /// key may wait on another agent's miss lease, which would count here.
    async fn watch_applied(&self, i: usize, before: u64, started: Instant) -> anyhow::Result<Duration> {
        loop {
            if self.applied_seq(i).await? > before {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("agent {} has not applied the invalidation 10 s after the write", i + 1);
            }
        }
    }

    /// Every agent answers 404 for `key`.
    async fn expect_gone(&self, key: &str) -> anyhow::Result<()> {
        for i in 0..self.cluster.agents.len() {
            let (status, _) = self.get(i, key).await?;
            if status != 404 {
                bail!("agent {} still answers {status} for {key}", i + 1);
            }
        }
        Ok(())
    }

    /// Waits until every agent has applied `seq` of `partition`.
    async fn wait_applied(&self, partition: usize, seq: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for agent in &self.cluster.agents {
            loop {
                let status: Value = self.http.get(agent.url("/v1/status")).send().await?.json().await?;
                if status["partitions"][partition]["applied_seq"].as_u64().unwrap_or(0) >= seq {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} did not apply seq {seq}", agent.proc.name);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }
}

/// The longest of `drops`.
fn last_of(drops: &[Duration]) -> Duration {
    drops.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    futures_util::future::join_all(futures).await
}
