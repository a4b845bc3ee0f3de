//! The system as users run it, for tests, the demo and `make run`: a private
//! `redis-server` on a free port, a coordinator process and node-agent
//! processes, each started from its real binary with a real config file.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running. Logs go to files under a temporary directory, printed when
//! a process fails to start.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod bench;
pub mod checker;
pub mod postgres;
pub mod redis_cluster;

/// A response header as a string (empty when absent or not text).
pub fn header_str(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// A port nobody listens on right now, and that this process has not handed
/// out before. The port is free only until somebody binds it: a cluster asks
/// for the coordinator's and every agent's port before any of them binds, and
/// the kernel may offer a port twice in that window (an agent then took the
/// coordinator's port, and a test talked to the wrong process).
pub fn free_port() -> u16 {
    free_port_with(&[]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`free_port`] for a port `p` such that `p + offset` is free too for each
/// of `offsets` (a cluster node's bus port is `p + 10000`); those ports are
/// handed out with it.
pub fn free_port_with(offsets: &[u16]) -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("binding port 0")?.port();
        let Some(companions) = offsets.iter().map(|o| port.checked_add(*o)).collect::<Option<Vec<u16>>>() else {
            continue;
        };
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let unused = |p: &u16| !handed_out.contains(p);
        let companions_free = companions.iter().all(|p| unused(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok());
        if unused(&port) && companions_free {
            handed_out.push(port);
            handed_out.extend(companions);
            return Ok(port);
        }
    }
    bail!("no free port that was not handed out already")
}

/// Where the workspace's binaries are: `$DCC_BIN_DIR`, else `target/debug`
/// (or the directory of the running executable, for the demo and run tools).
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("DCC_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        // Test executables live in target/<profile>/deps, tools in target/<profile>.
        for candidate in [dir.join(name), dir.join("..").join(name)] {
            if candidate.exists() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug").join(name)
}

/// A child process that is killed when dropped.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// The process.
    child: Option<Child>,
    /// Its combined output.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("process already reaped")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Whether it has exited (and how), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(15))
    }

    /// Kills it at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private `redis-server` on a free loopback port, without persistence.
pub struct Redis {
    /// Its port.
    pub port: u16,
    /// The process.
    pub proc: Proc,
    /// Its working directory.
    dir: PathBuf,
}

impl Redis {
    /// Starts one and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        Self::start_on(dir, free_port()).await
    }

    /// Starts one on `port` (used to restart on the same port).
    pub async fn start_on(dir: &Path, port: u16) -> anyhow::Result<Redis> {
        Self::start_with(dir, port, &[]).await
    }

    /// Starts one on `port` with extra `redis-server` arguments (cluster
    /// mode, `--replicaof`, ...).
    pub async fn start_with(dir: &Path, port: u16, extra: &[String]) -> anyhow::Result<Redis> {
        let program = which("redis-server").context(
            "redis-server is not installed: run `make test` (it installs it), or `apt-get install redis-server`",
        )?;
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
            "--protected-mode",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn("redis-server", &program, &args, &[], dir.join(format!("redis-{port}.log")))?;
        let redis = Redis { port, proc, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = redis.connection().await {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Ok(redis);
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server did not start on port {port}:\n{}", redis.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A fresh connection, for tests that look into Redis or inject faults.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        redis::Client::open(self.url())?.get_multiplexed_async_connection_with_config(&config).await
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Finds a program on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A coordinator or agent process and its address.
pub struct Service {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// Its config file.
    pub config: PathBuf,
}

impl Service {
    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many agents.
    pub agents: usize,
    /// Extra TOML for the coordinator's config (settings and `[[rules]]`).
    pub coordinator_toml: String,
    /// Extra TOML for every agent's config.
    pub agent_toml: String,
    /// Fixed ports (coordinator, then agents), if wanted.
    pub ports: Option<Vec<u16>>,
    /// The Redis to start (`single`, `cluster` or `sentinel`); `None`:
    /// whatever `DCC_TEST_REDIS` names (see [`Backend`]).
    pub redis: Option<&'static str>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            agents: 3,
            coordinator_toml: String::new(),
            agent_toml: String::new(),
            ports: None,
            redis: None,
        }
    }
}

/// The rules of `deploy/coordinator.toml`, which the demo and `make run` use too.
pub fn deploy_coordinator_toml() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
    std::fs::read_to_string(&path)
        .map(|text| {
            text.lines()
                .filter(|l| !l.starts_with("bind") && !l.starts_with("redis_url"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The Redis a [`Cluster`] runs on, as `DCC_TEST_REDIS` chooses: `single`
/// (the default), `cluster` (3 masters, 3 replicas) or `sentinel` (a
/// primary, a replica, 3 sentinels). The same system tests then run on each.
pub enum Backend {
    /// One `redis-server`.
    Single(Redis),
    /// A Redis Cluster.
    Cluster(redis_cluster::RedisCluster),
    /// A primary watched by sentinels.
    Sentinel(redis_cluster::Sentinels),
}

impl Backend {
    /// Starts the backend `DCC_TEST_REDIS` names.
    pub async fn start(dir: &Path) -> anyhow::Result<Backend> {
        Backend::start_kind(dir, &std::env::var("DCC_TEST_REDIS").unwrap_or_default()).await
    }

    /// Starts the backend `kind` names (as `DCC_TEST_REDIS` would).
    pub async fn start_kind(dir: &Path, kind: &str) -> anyhow::Result<Backend> {
        match kind {
            "" | "single" => Ok(Backend::Single(Redis::start(dir).await?)),
            "cluster" => Ok(Backend::Cluster(redis_cluster::RedisCluster::start(dir, 3, 1).await?)),
            "sentinel" => Ok(Backend::Sentinel(redis_cluster::Sentinels::start(dir).await?)),
            other => bail!("DCC_TEST_REDIS={other:?}: use single, cluster or sentinel"),
        }
    }

    /// The `redis_url` that reaches it.
    pub fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
            Backend::Sentinel(s) => s.url(),
        }
    }
}

/// Redis, a coordinator and agents, all real processes.
pub struct Cluster {
    /// Agents, in order.
    pub agents: Vec<Service>,
    /// The coordinator.
    pub coordinator: Service,
    /// The Redis they run on.
    pub backend: Backend,
    /// Logs and configs; removed on drop unless `DCC_KEEP_LOGS` is set.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything and waits until every process is ready.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let mut dir = tempfile::Builder::new().prefix("dcc-cluster-").tempdir()?;
        dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let backend = match options.redis {
            Some(kind) => Backend::start_kind(dir.path(), kind).await?,
            None => Backend::start(dir.path()).await?,
        };
        let url = backend.url();
        let port = |i: usize| options.ports.as_ref().and_then(|p| p.get(i).copied()).unwrap_or_else(free_port);
        let coordinator = start_coordinator(dir.path(), &url, port(0), &options.coordinator_toml)?;
        let mut agents = Vec::new();
        for i in 1..=options.agents {
            agents.push(start_agent(dir.path(), &url, port(i), &format!("agent-{i}"), &options.agent_toml)?);
        }
        let cluster = Cluster { agents, coordinator, backend, dir };
        let client = reqwest::Client::new();
        wait_ready(&client, &cluster.coordinator).await?;
        for agent in &cluster.agents {
            wait_ready(&client, agent).await?;
        }
        Ok(cluster)
    }

    /// Agent `i` (0-based).
    pub fn agent(&self, i: usize) -> &Service {
        &self.agents[i]
    }

    /// The `redis_url` every process uses.
    pub fn redis_url(&self) -> String {
        self.backend.url()
    }

    /// The one `redis-server`, for tests that inject faults into it (they
    /// run with the single backend only).
    pub fn redis(&self) -> &Redis {
        match &self.backend {
            Backend::Single(r) => r,
            _ => panic!("this test injects faults into one redis-server: run it with DCC_TEST_REDIS=single"),
        }
    }

    /// See [`Cluster::redis`].
    pub fn redis_mut(&mut self) -> &mut Redis {
        match &mut self.backend {
            Backend::Single(r) => r,
            _ => panic!("this test injects faults into one redis-server: run it with DCC_TEST_REDIS=single"),
        }
    }

    /// Replaces the one `redis-server` (after restarting it).
    pub fn set_redis(&mut self, redis: Redis) {
        self.backend = Backend::Single(redis);
    }

    /// A connection to whatever Redis the cluster runs on, through the
    /// product's own store, for tests that look into Redis.
    pub async fn redis_conn(&self) -> anyhow::Result<shared::store::SharedConn> {
        let store = shared::store::Store::open(&self.redis_url(), 2).map_err(anyhow::Error::msg)?;
        Ok(store.get().await?.shared())
    }

    /// Keeps the logs directory after the cluster is dropped, and returns it.
    pub fn keep_logs(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Writes a config file and starts a coordinator with it.
pub fn start_coordinator(dir: &Path, redis_url: &str, port: u16, extra_toml: &str) -> anyhow::Result<Service> {
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join(format!("coordinator-{port}.toml"));
    write_config(&config, &format!("bind = \"{addr}\"\nredis_url = \"{redis_url}\"\n{extra_toml}\n"))?;
    let proc = Proc::spawn(
        "coordinator",
        &bin_path("coordinator"),
        &["--config".into(), config.display().to_string()],
        &[],
        dir.join(format!("coordinator-{port}.log")),
    )?;
    Ok(Service { proc, addr, config })
}

/// Writes a config file and starts an agent with it.
pub fn start_agent(dir: &Path, redis_url: &str, port: u16, node_id: &str, extra_toml: &str) -> anyhow::Result<Service> {
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join(format!("{node_id}.toml"));
    write_config(
        &config,
        &format!("bind = \"{addr}\"\nredis_url = \"{redis_url}\"\nnode_id = \"{node_id}\"\n{extra_toml}\n"),
    )?;
    let proc = Proc::spawn(
        node_id,
        &bin_path("node-agent"),
        &["--config".into(), config.display().to_string()],
        &[],
        dir.join(format!("{node_id}.log")),
    )?;
    Ok(Service { proc, addr, config })
}

fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Waits until `/readyz` answers 200 (30 s at most: a busy machine is slow).
pub async fn wait_ready(client: &reqwest::Client, service: &Service) -> anyhow::Result<()> {
    wait_status(client, service, "/readyz", 200, Duration::from_secs(30)).await
}

/// Waits until `path` answers `status`.
pub async fn wait_status(
    client: &reqwest::Client,
    service: &Service,
    path: &str,
    status: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(resp) = client.get(service.url(path)).send().await {
            if resp.status().as_u16() == status {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer {status} on {path} within {timeout:?}; log:\n{}",
                service.proc.name,
                service.proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
