//! Redis as production runs it, on one machine, for tests (no Docker), as
//! redis-rs's own test harness does: a real Redis Cluster (`redis-server`
//! processes in cluster mode on free loopback ports, joined with `redis-cli
//! --cluster create`), and a primary with a replica watched by three
//! sentinels (`redis-server --sentinel`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use redis::RedisResult;

use crate::{free_port, free_port_with, which, Proc, Redis};

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> anyhow::Result<u16> {
    free_port_with(&[10_000])
}

/// The `redis-server` arguments of a cluster node on `port`. Each node has a
/// folder of its own: a replica's sync writes `dump.rdb` there, and a node
/// restarted in a shared folder would load another node's old snapshot.
fn node_args(dir: &Path, port: u16) -> Vec<String> {
    let conf = dir.join(format!("nodes-{port}.conf"));
    let own = dir.join(format!("node-{port}"));
    let _ = std::fs::create_dir_all(&own);
    [
        "--dir",
        &own.display().to_string(),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &conf.display().to_string(),
        "--cluster-node-timeout",
        "2000",
        "--cluster-require-full-coverage",
        "no",
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-allow-replica-migration",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// Its port.
    pub port: u16,
    /// A master (else a replica).
    pub master: bool,
    /// The slot ranges it serves (masters).
    pub slots: Vec<(u16, u16)>,
}

/// The cluster's nodes; each is killed when this drops.
pub struct RedisCluster {
    /// Every node, masters first as created.
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each, joins them and
    /// waits until the cluster is `ok` on every node with its replicas in place.
    pub async fn start(dir: &Path, masters: usize, replicas: usize) -> anyhow::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_cluster_port()?;
            nodes.push(Redis::start_with(dir, port, &node_args(dir, port)).await?);
        }
        let cluster = RedisCluster { nodes };
        let cli = which("redis-cli").context("redis-cli is not installed (it comes with redis-server)")?;
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas".into(), replicas.to_string(), "--cluster-yes".into()]);
        let mut created = false;
        for _ in 0..5 {
            let out = tokio::process::Command::new(&cli).args(&args).output().await?;
            if out.status.success() {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !created {
            bail!("redis-cli --cluster create failed");
        }
        cluster.wait_healthy(masters, masters * replicas, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Starts the node of `port` again (after it was killed): it rejoins
    /// from its `nodes.conf`, empty, and becomes a replica if its slots moved.
    pub async fn restart(&mut self, dir: &Path, port: u16) -> anyhow::Result<()> {
        let node = Redis::start_with(dir, port, &node_args(dir, port)).await?;
        match self.nodes.iter_mut().find(|n| n.port == port) {
            Some(slot) => *slot = node,
            None => self.nodes.push(node),
        }
        Ok(())
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> Option<&mut Redis> {
        self.nodes.iter_mut().find(|n| n.port == port)
    }

    /// `CLUSTER NODES`, as seen by the first node that answers.
    pub async fn topology(&self) -> anyhow::Result<Vec<NodeInfo>> {
        for node in &self.nodes {
            let Ok(mut conn) = node.connection().await else { continue };
            let Ok(text) = redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut conn).await else { continue };
            return Ok(parse_nodes(&text));
        }
        bail!("no cluster node answers")
    }

    /// The master serving `slot`.
    pub async fn master_of(&self, slot: u16) -> anyhow::Result<NodeInfo> {
        let nodes = self.topology().await?;
        nodes
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot)))
            .context("no master serves the slot")
    }

    /// Waits until every live node says `cluster_state:ok` and the topology
    /// has `masters` masters and `replicas` replicas.
    pub async fn wait_healthy(&self, masters: usize, replicas: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ok = true;
            for node in &self.nodes {
                if node.proc.pid().is_none() {
                    continue;
                }
                let state = match node.connection().await {
                    Ok(mut conn) => redis::cmd("CLUSTER").arg("INFO").query_async::<String>(&mut conn).await.ok(),
                    Err(_) => None,
                };
                ok &= state.is_some_and(|s| s.contains("cluster_state:ok"));
            }
            if ok {
                let nodes = self.topology().await?;
                let m = nodes.iter().filter(|n| n.master && !n.slots.is_empty()).count();
                let r = nodes.iter().filter(|n| !n.master).count();
                if m == masters && r >= replicas {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Redis Cluster did not become healthy within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The name the sentinels know the primary by.
pub const MASTER_NAME: &str = "dcc-primary";

/// A primary, a replica and three sentinels; each is killed when this drops.
pub struct Sentinels {
    /// The data nodes: the first one starts as the primary.
    pub data: Vec<Redis>,
    /// The sentinels.
    pub sentinels: Vec<(u16, Proc)>,
    /// The sentinels' own password (`requirepass`), if they were given one.
    pub password: Option<String>,
}

impl Sentinels {
    /// Starts a primary, a replica of it and three sentinels (quorum 2,
    /// `down-after-milliseconds` 1000), and waits until every sentinel knows
    /// the primary, its replica and the other sentinels.
    pub async fn start(dir: &Path) -> anyhow::Result<Sentinels> {
        Sentinels::start_with(dir, None).await
    }

    /// [`Sentinels::start`], with sentinels that require `password` of their
    /// clients (and of each other) when one is given.
    pub async fn start_with(dir: &Path, password: Option<&str>) -> anyhow::Result<Sentinels> {
        // No 5 s wait before a replica's first sync (Redis's default).
        let quick = ["--repl-diskless-sync-delay".to_string(), "0".into()];
        let primary = Redis::start_with(dir, free_port(), &quick).await?;
        let mut replicaof = vec!["--replicaof".to_string(), "127.0.0.1".into(), primary.port.to_string()];
        replicaof.extend(quick.iter().cloned());
        let replica = Redis::start_with(dir, free_port(), &replicaof).await?;
        let program = which("redis-server").context("redis-server is not installed")?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{port}.conf"));
            let requirepass = password.map(|p| format!("requirepass {p}\n")).unwrap_or_default();
            let text = format!(
                "{requirepass}port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\nsentinel failover-timeout {MASTER_NAME} 3000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.display(),
                primary.port
            );
            std::fs::write(&conf, text)?;
            let args = [conf.display().to_string(), "--sentinel".to_string()];
            let proc = Proc::spawn("redis-sentinel", &program, &args, &[], dir.join(format!("sentinel-{port}.log")))?;
            sentinels.push((port, proc));
        }
        let set = Sentinels { data: vec![primary, replica], sentinels, password: password.map(str::to_string) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ready = set.replica_in_sync().await;
            for (port, _) in &set.sentinels {
                ready &= set.sentinel_knows_everything(*port).await;
            }
            if ready {
                return Ok(set);
            }
            if Instant::now() > deadline {
                bail!("the sentinels did not discover the primary, its replica and each other within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The replica has finished its first sync (its link to the primary is up).
    async fn replica_in_sync(&self) -> bool {
        let Some(replica) = self.data.get(1) else { return false };
        let Ok(mut conn) = replica.connection().await else { return false };
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.unwrap_or_default();
        info.contains("master_link_status:up")
    }

    /// A client of the sentinel on `port` (with the sentinels' password).
    pub fn sentinel_client(&self, port: u16) -> RedisResult<redis::Client> {
        let auth = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))
    }

    async fn sentinel_knows_everything(&self, port: u16) -> bool {
        let Ok(client) = self.sentinel_client(port) else { return false };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return false };
        let replicas: Vec<redis::Value> =
            redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME).query_async(&mut conn).await.unwrap_or_default();
        let others: Vec<redis::Value> =
            redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER_NAME).query_async(&mut conn).await.unwrap_or_default();
        !replicas.is_empty() && others.len() >= 2
    }

    /// `redis+sentinel://` naming every sentinel and the master.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The port of the primary the sentinels name now (the first that answers).
    pub async fn primary_port(&self) -> anyhow::Result<u16> {
        for (port, _) in &self.sentinels {
            let Ok(client) = self.sentinel_client(*port) else { continue };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else { continue };
            let addr: RedisResult<(String, u16)> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER_NAME).query_async(&mut conn).await;
            if let Ok((_, port)) = addr {
                return Ok(port);
            }
        }
        bail!("no sentinel names a primary")
    }

    /// Asks a sentinel to fail over now (`SENTINEL FAILOVER`).
    pub async fn failover(&self) -> anyhow::Result<()> {
        for (port, _) in &self.sentinels {
            let Ok(client) = self.sentinel_client(*port) else { continue };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else { continue };
            let done: RedisResult<()> =
                redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME).query_async(&mut conn).await;
            if done.is_ok() {
                return Ok(());
            }
        }
        bail!("no sentinel accepted SENTINEL FAILOVER")
    }

    /// Starts a new replica of the primary on `primary_port` (a lost node
    /// replaced), and waits until it has synced.
    pub async fn add_replica(&mut self, dir: &Path, primary_port: u16) -> anyhow::Result<u16> {
        let args: Vec<String> =
            ["--replicaof", "127.0.0.1", &primary_port.to_string(), "--repl-diskless-sync-delay", "0"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let replica = Redis::start_with(dir, free_port(), &args).await?;
        let port = replica.port;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut conn = replica.connection().await?;
            let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.unwrap_or_default();
            if info.contains("master_link_status:up") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the new replica did not sync within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.data.push(replica);
        Ok(port)
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> Option<&Redis> {
        self.data.iter().find(|n| n.port == port)
    }

    /// The data node on `port`, to kill or restart it.
    pub fn node_mut(&mut self, port: u16) -> Option<&mut Redis> {
        self.data.iter_mut().find(|n| n.port == port)
    }
}

/// Reads `CLUSTER NODES` lines: `id addr flags master ping pong epoch state slots...`.
fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let id = fields.first()?.to_string();
            let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            if flags.contains("fail") || flags.contains("noaddr") {
                return None;
            }
            let master = flags.contains("master");
            let slots = fields
                .iter()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            Some(NodeInfo { id, port, master, slots })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_are_read() {
        let text = "07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected\n\
                    e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 7000\n\
                    9a1b 127.0.0.1:30002@40002 master,fail - 0 0 2 disconnected\n";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 2);
        assert!(!nodes[0].master);
        assert_eq!(nodes[1].port, 30001);
        assert_eq!(nodes[1].slots, [(0, 5460), (7000, 7000)]);
    }
}
