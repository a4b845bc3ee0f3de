//! `make bench`: starts a private Redis, a coordinator and agents (release
//! builds), measures them side by side with Redis itself, and writes
//! `BENCHMARKS.md`. `bench --quick` (`make bench QUICK=1`) is a short pass
//! that checks everything runs; `--out FILE` writes elsewhere; `--only
//! NAME[,NAME]` runs some measures (hits, embedded, resp, propagation, loaded, barrier, throughput,
//! token, costs, herd, warm, propagation32, scale, hitratio, memory, many, cluster, replicas,
//! pgsource), for profiling one of them; `--run-ms N`
//! makes each run N ms long (to hold a load steady under a profiler).
//! See `integration_tests::bench` for what each figure is.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use integration_tests::bench::{self, costs, fanout, herd, hits, many, pgsource, resp, scale, warm, Options};
use integration_tests::{free_port, start_agent, start_coordinator, wait_ready, Cluster, ClusterOptions};

/// As the agent: the memory floor it reports is measured under the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(count) = args.iter().position(|a| a == "--moka-floor").and_then(|i| args.get(i + 1)) {
        // The child process of the memory measure (see `scale::moka_floor_child`).
        println!("{}", scale::moka_floor_child(count.parse().context("--moka-floor takes a count")?)?);
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick") || std::env::var("QUICK").is_ok_and(|v| !v.is_empty());
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md"));
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_string).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let mut options = if quick { Options::quick() } else { Options::full() };
    if let Some(ms) = args.iter().position(|a| a == "--run-ms").and_then(|i| args.get(i + 1)) {
        options.run = std::time::Duration::from_millis(ms.parse().context("--run-ms takes milliseconds")?);
    }
    let command = if quick { "make bench QUICK=1" } else { "make bench" };
    let started = Instant::now();

    eprintln!("starting Redis, a coordinator and 8 agents");
    let mut cluster = Cluster::start(ClusterOptions { agents: 8, ..ClusterOptions::default() }).await?;
    let redis_url = cluster.redis_url();
    let coordinator = cluster.coordinator.url("");
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    if wanted("hits") {
        eprintln!("1-2. L1 hits vs Redis GET");
        let (r, n) = hits::run(&options, &cluster.agent(0).addr, &redis_url).await?;
        rows.extend(r);
        notes.extend(n);
    }
    if wanted("embedded") {
        eprintln!("2b. embedded L1 hits vs Redis GET");
        let (r, n) = hits::embedded(&options, &cluster.agent(0).addr, &redis_url).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("token") {
        eprintln!("1b. L1 hits with a token");
        let secret = "bench-token-secret";
        let mut toml = String::new();
        for (i, name) in ["bench", "other-1", "other-2", "other-3", "other-4"].iter().enumerate() {
            let digest = shared::auth::sha256_hex(&if i == 0 { secret.to_string() } else { format!("{secret}-{i}") });
            toml.push_str(&format!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{digest}\"\ntenants = [\"bench\"]\nscopes = [\"read\", \"write\"]\n\n"
            ));
        }
        // Two agents started alike, one with tokens and one without.
        let secured = start_agent(cluster.dir.path(), &redis_url, free_port(), "agent-token", &toml)?;
        let open = start_agent(cluster.dir.path(), &redis_url, free_port(), "agent-open", "")?;
        wait_ready(&reqwest::Client::new(), &secured).await?;
        wait_ready(&reqwest::Client::new(), &open).await?;
        let (r, n) = hits::with_token(&options, &open.addr, &secured.addr, secret, &redis_url).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("resp") {
        eprintln!("1c. the Redis protocol port vs Redis, by redis-benchmark");
        let (r, n) = resp::run(&options, cluster.dir.path(), &redis_url).await?;
        rows.extend(r);
        notes.push(n);
    }
    if wanted("propagation") {
        eprintln!("3. propagation to 8 agents");
        let (r, n) = fanout::propagation(&options, &coordinator, &redis_url, 8).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("loaded") {
        eprintln!("3b. propagation under hit load");
        let (r, n) =
            fanout::propagation_under_load(&options, &coordinator, &redis_url, 8, &cluster.agent(0).addr).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("barrier") {
        eprintln!("4. wait=all round trip");
        let (r, n) = fanout::barrier(&options, &coordinator, 8).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("throughput") {
        eprintln!("5. event throughput");
        let alone = Cluster::start(ClusterOptions { agents: 0, ..ClusterOptions::default() }).await?;
        let alone_urls = (alone.coordinator.url(""), alone.redis_url());
        let (r, n) = fanout::throughput(&options, &coordinator, &redis_url, (&alone_urls.0, &alone_urls.1)).await?;
        drop(alone);
        rows.extend(r);
        notes.push(n);
        rows.push(fanout::spread_throughput(&options, &coordinator, &redis_url).await?);
    }
    if wanted("costs") {
        eprintln!("5b. what an invalidation and an idle agent cost Redis");
        let alone = Cluster::start(ClusterOptions { agents: 0, ..ClusterOptions::default() }).await?;
        let (alone_cost, idle_alone) =
            costs::invalidation(&options, &alone.coordinator.url(""), &alone.redis_url()).await?;
        drop(alone);
        let (cost, idle_with_agents) = costs::invalidation(&options, &coordinator, &redis_url).await?;
        let raw = costs::raw_publish(&options, &redis_url, 8).await?;
        let (r, n) = costs::rows(8, &alone_cost, &cost, &raw, &idle_alone, &idle_with_agents);
        rows.extend(r);
        notes.push(n);
    }
    let client = reqwest::Client::new();
    if wanted("herd") {
        eprintln!("5c. a miss herd, with and without leases");
        let mut unleased = Vec::new();
        for i in 0..8 {
            let name = format!("agent-nolease-{i}");
            unleased.push(start_agent(cluster.dir.path(), &redis_url, free_port(), &name, "lease_ms = 0\n")?);
        }
        for agent in &unleased {
            wait_ready(&reqwest::Client::new(), agent).await?;
        }
        let leased: Vec<String> = (0..8).map(|i| cluster.agent(i).url("")).collect();
        let unleased_urls: Vec<String> = unleased.iter().map(|a| a.url("")).collect();
        let (r, n) = herd::run(&options, &leased, &unleased_urls).await?;
        drop(unleased);
        rows.push(r);
        notes.push(n);
    }
    if wanted("warm") {
        eprintln!("5d. warm start of 10k hot keys");
        let (r, n) = warm::run(&options, cluster.dir.path(), &redis_url).await?;
        rows.push(r);
        notes.push(n);
    }
    if wanted("propagation32") {
        eprintln!("3. propagation to 32 agents");
        for i in 9..=32 {
            let agent = start_agent(cluster.dir.path(), &redis_url, free_port(), &format!("agent-{i}"), "")?;
            cluster.agents.push(agent);
        }
        for agent in &cluster.agents {
            wait_ready(&client, agent).await?;
        }
        let (r, n) = fanout::propagation(&options, &coordinator, &redis_url, 32).await?;
        rows.push(r);
        notes.push(n);
        // Back to 8, so that the next measures do not pay for 24 idle agents.
        cluster.agents.truncate(8);
    }
    if wanted("scale") {
        eprintln!("6. invalidation at scale");
        let (r, n) = scale::invalidation(&options, &coordinator, &redis_url).await?;
        rows.extend(r);
        notes.push(n);
    }
    if wanted("hitratio") {
        eprintln!("7a. L1 hit ratio against moka");
        let (r, n) = bench::hitratio::run();
        rows.extend(r);
        notes.push(n);
    }
    if wanted("memory") {
        eprintln!("7. agent memory");
        let memory_agent =
            start_agent(cluster.dir.path(), &redis_url, free_port(), "agent-memory", "l1_max_bytes = 1073741824\n")?;
        wait_ready(&client, &memory_agent).await?;
        let pid = memory_agent.proc.pid().context("the memory agent has no pid")?;
        let (r, n) = scale::memory(&options, &memory_agent.addr, pid).await?;
        rows.extend(r);
        notes.push(n);
        drop(memory_agent);
    }
    drop(cluster);

    if wanted("many") {
        let count = if quick { 100 } else { 1000 };
        eprintln!("10. propagation to {count} embedded agents");
        let alone = Cluster::start(ClusterOptions { agents: 0, ..ClusterOptions::default() }).await?;
        let (r, n) = many::propagation(&options, &alone.coordinator.url(""), &alone.redis_url(), count).await?;
        rows.extend(r);
        notes.push(n);
    }
    if wanted("cluster") {
        eprintln!("8. hits, propagation and throughput on a Redis Cluster of 3 masters and 3 replicas");
        let on_cluster =
            Cluster::start(ClusterOptions { agents: 8, redis: Some("cluster"), ..ClusterOptions::default() }).await?;
        let (url, coordinator) = (on_cluster.redis_url(), on_cluster.coordinator.url(""));
        let mut section = hits::run(&options, &on_cluster.agent(0).addr, &url).await?.0;
        section.push(fanout::propagation(&options, &coordinator, &url, 8).await?.0);
        section.push(fanout::spread_throughput(&options, &coordinator, &url).await?);
        for mut row in section {
            row.measure.push_str(" — **3-master cluster**");
            rows.push(row);
        }
        notes.push(
            "Cluster: the same measures on a Redis Cluster of 3 masters with a replica each \
             (`redis+cluster://`), 8 agents, the coordinator with its default `min_replicas = \"auto\"` (1 \
             here: every answer waits for `WAIT 1`); Redis's side uses redis-rs's cluster client, and \
             `SSUBSCRIBE`/`SPUBLISH` where ours does. All 6 Redis processes, the coordinator, the agents and \
             the load share the same 2 cores, so this shows what the cluster costs, not how it scales."
                .into(),
        );
    }
    if wanted("replicas") {
        eprintln!("9. what min_replicas = 1 costs");
        let replicated = Cluster::start(ClusterOptions {
            agents: 0,
            coordinator_toml: "min_replicas = 1\n".into(),
            redis: Some("sentinel"),
            ..ClusterOptions::default()
        })
        .await?;
        let unreplicated =
            start_coordinator(replicated.dir.path(), &replicated.redis_url(), free_port(), "min_replicas = 0\n")?;
        wait_ready(&client, &unreplicated).await?;
        let (r, n) = fanout::replication_cost(&options, &replicated.coordinator.url(""), &unreplicated.url("")).await?;
        rows.extend(r);
        notes.push(n);
    }

    if wanted("pgsource") {
        eprintln!("11. the PostgreSQL source: commit to the last agent, and row changes per second");
        let transactions = if quick { 200 } else { 2000 };
        let (r, n) = pgsource::run(&options, transactions).await?;
        rows.extend(r);
        notes.extend(n);
    }

    let micro = bench::criterion_table(&criterion_dir());
    let mut text = bench::report(&rows, &options, command, &notes);
    text.push_str(&micro);
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("{text}");
    eprintln!("wrote {} in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Where `cargo bench` left criterion's results: `$CRITERION_HOME`, else
/// `criterion/` in the build folder this binary runs from (`target/`, or
/// wherever `CARGO_TARGET_DIR` points).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let exe = std::env::current_exe().ok();
    let build_folder = exe.as_deref().and_then(Path::parent).and_then(Path::parent);
    match build_folder {
        Some(dir) => dir.join("criterion"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion"),
    }
}
