//! `make run`: a private redis-server, a coordinator (with the rules of
//! `deploy/coordinator.toml`) and three agents, in the foreground until Ctrl-C.
//! Uses ports 7700-7703 when they are free, other free ports otherwise.

use std::net::TcpListener;

use integration_tests::{deploy_coordinator_toml, free_port, Cluster, ClusterOptions};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let wanted = [7700, 7701, 7702, 7703];
    let ports: Vec<u16> = if wanted.iter().all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok()) {
        wanted.to_vec()
    } else {
        println!("ports 7700-7703 are taken; using free ports instead");
        wanted.iter().map(|_| free_port()).collect()
    };
    let options = ClusterOptions {
        agents: 3,
        coordinator_toml: deploy_coordinator_toml(),
        ports: Some(ports),
        ..Default::default()
    };
    let cluster = match Cluster::start(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("the cluster failed to start: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let c = &cluster.coordinator;
    println!("redis        {}", cluster.redis_url());
    println!("coordinator  {}   (health: {})", c.url(""), c.url("/v1/cluster/health"));
    println!("dashboard    {}", c.url("/dashboard"));
    for agent in &cluster.agents {
        println!("{:<12} {}   (status: {})", agent.proc.name, agent.url(""), agent.url("/v1/status"));
    }
    let a = &cluster.agents[0];
    println!("\nTry:");
    println!("  curl -X PUT --data 'hello' '{}'", a.url("/v1/cache/acme/greeting?tags=greetings"));
    println!("  curl -i {}", cluster.agents[1].url("/v1/cache/acme/greeting"));
    println!(
        "  curl -X POST {} -H 'content-type: application/json' -d '{{\"tenant\":\"acme\",\"entity\":\"greeting\",\"tags\":[\"greetings\"]}}'",
        c.url("/v1/events")
    );
    println!("\nLogs: {}\nPress Ctrl-C to stop.", cluster.dir.path().display());

    let signal = shared_signal().await;
    println!("\n{signal}: stopping the agents, the coordinator and Redis");
    let Cluster { mut agents, mut coordinator, backend, dir } = cluster;
    for agent in &mut agents {
        let _ = agent.proc.terminate();
    }
    let _ = coordinator.proc.terminate();
    drop(backend);
    drop(dir);
    std::process::ExitCode::SUCCESS
}

async fn shared_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
