//! A private PostgreSQL server for a test, the demo or a bench: `initdb` into
//! a fresh data directory, then `postgres` on a free loopback port with
//! logical replication on, trust authentication and `fsync=off`, and a
//! database `app`. It never touches the machine's own server (port 5432).
//!
//! PostgreSQL refuses to run as root. When we are root, the data directory
//! belongs to the `postgres` system user and `initdb` and `postgres` run as
//! that user: the child process takes its uid and gid as it starts (what
//! `runuser -u postgres` does, without the `runuser` parent in between, so
//! that the process we hold is the postmaster itself and killing it kills the
//! server).
//!
//! The server is shut down (immediate shutdown, then SIGKILL) when its handle
//! drops, also when a test panics.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;

use crate::{free_port, Proc};

/// How long starting or stopping may take on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The database every [`Postgres`] creates, which [`Postgres::url`] names.
pub const DATABASE: &str = "app";

/// A private PostgreSQL server, killed when dropped.
pub struct Postgres {
    /// The directory of `initdb`, `postgres` and friends.
    bin: PathBuf,
    /// The data directory (also where the server's Unix socket lives).
    data: PathBuf,
    /// The server's log.
    log: PathBuf,
    /// The loopback port it listens on, the same across restarts.
    port: u16,
    /// The user the server runs as, when we are root: (uid, gid) of `postgres`.
    run_as: Option<(u32, u32)>,
    /// The postmaster, while it runs.
    proc: Option<Proc>,
}

impl Postgres {
    /// Creates a cluster under `dir` (in `dir/pg-{port}`, logging to
    /// `dir/pg-{port}.log`), starts it on a free port, waits until it accepts
    /// connections and creates the database `app`.
    pub async fn start(dir: &Path) -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let port = free_port();
        let run_as = if running_as_root() { Some(postgres_user()?) } else { None };
        let data = dir.join(format!("pg-{port}"));
        let log = dir.join(format!("pg-{port}.log"));
        let mut pg = Postgres { bin, data, log, port, run_as, proc: None };
        pg.init(dir)?;
        pg.launch().await?;
        let create = format!("CREATE DATABASE {DATABASE}");
        pg.run_psql("postgres", &create).await.context("creating the database")?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:{port}/app`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server was started and not stopped.
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `sql` in the database `app` with `psql` (stopping at the first
    /// error) and returns its unaligned, tuples-only output: one row per
    /// line, columns separated by `|`.
    pub async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.run_psql(DATABASE, sql).await
    }

    /// Fast shutdown (SIGINT: active transactions are rolled back, clients
    /// disconnected, then a checkpoint), waiting until the server exited.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut proc) = self.proc.take() else { return Ok(()) };
        proc.signal(Signal::SIGINT)?;
        let deadline = Instant::now() + PATIENCE;
        while proc.try_status().is_none() {
            if Instant::now() > deadline {
                bail!("postgres did not shut down within {PATIENCE:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the server if it runs (after [`Postgres::stop`] it does not),
    /// then starts it on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// `initdb` into the data directory, with trust authentication for local
    /// and loopback connections, replication included.
    fn init(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data).with_context(|| format!("creating {}", self.data.display()))?;
        std::fs::set_permissions(&self.data, std::fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = self.run_as {
            // The server's user must reach its data directory through ours.
            let mode = std::fs::metadata(dir)?.permissions().mode();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))?;
            std::os::unix::fs::chown(&self.data, Some(uid), Some(gid)).context("chown of the data directory")?;
        }
        let data = self.data.display().to_string();
        let args = ["-D", &data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"];
        let out = self.command("initdb").args(args).stdin(Stdio::null()).output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let hba = "local all all trust\nlocal replication all trust\n\
                   host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";
        std::fs::write(self.data.join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
        Ok(())
    }

    /// Starts the postmaster and waits until it accepts connections.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={}", self.port),
            format!("unix_socket_directories={}", self.data.display()),
            "wal_level=logical".into(),
            "max_replication_slots=10".into(),
            "max_wal_senders=10".into(),
            "fsync=off".into(),
        ];
        let mut args = vec!["-D".to_string(), self.data.display().to_string()];
        for setting in settings {
            args.extend(["-c".to_string(), setting]);
        }
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        let mut cmd = self.command("postgres");
        cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().context("starting postgres")?;
        let mut proc = Proc { name: format!("postgres-{}", self.port), child: Some(child), log: self.log.clone() };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = proc.try_status() {
                bail!("postgres exited ({status}) while starting:\n{}", self.log_tail());
            }
            if self.is_ready().await {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within {PATIENCE:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `pg_isready` says it accepts connections.
    async fn is_ready(&self) -> bool {
        let status = tokio::process::Command::new(self.bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "5",
            ])
            .stdin(Stdio::null())
            .status()
            .await;
        status.is_ok_and(|s| s.success())
    }

    async fn run_psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let args = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .args(args)
            .args(["-d", database, "-At", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// A command for one of the server's programs, as the server's user.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", &self.data).current_dir(&self.data);
        }
        cmd.env("LC_ALL", "C");
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            // Immediate shutdown: the postmaster stops its children and
            // releases its shared memory; SIGKILL (Proc's drop) if it hangs.
            if proc.signal(Signal::SIGQUIT).is_ok() {
                let _ = proc.wait_exit(Duration::from_secs(10));
            }
        }
    }
}

/// The `bin` directory of the highest PostgreSQL under `/usr/lib/postgresql`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let versions = std::fs::read_dir(root)
        .with_context(|| format!("no PostgreSQL under {}: apt-get install postgresql", root.display()))?;
    let highest = versions
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let version: f64 = path.file_name()?.to_str()?.parse().ok()?;
            path.join("bin/postgres").is_file().then_some((version, path.join("bin")))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    highest.map(|(_, bin)| bin).with_context(|| format!("no PostgreSQL server under {}", root.display()))
}

/// Whether this process runs as root (`/proc/self` belongs to our user).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// (uid, gid) of the `postgres` system user, from `/etc/passwd`.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"));
    let fields: Vec<&str> = line.context("no postgres user (PostgreSQL refuses to run as root)")?.split(':').collect();
    let id = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).context("a malformed postgres line in /etc/passwd");
    Ok((id(2)?, id(3)?))
}
