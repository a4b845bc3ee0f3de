//! Redis as production runs it: one server (`redis://`), a primary found
//! through Sentinel (`redis+sentinel://s1:p1,s2:p2/MASTER`), or a Redis
//! Cluster (`redis+cluster://h1:p1,h2:p2`), behind one handle, [`Store`].
//!
//! - [`Store::get`] gives a connection for a request: a pooled one (deadpool)
//!   on one server or under Sentinel, a clone of the process's one
//!   `ClusterConnection` (one multiplexed connection per node, following
//!   `MOVED`/`ASK` and failovers) on a cluster. Under Sentinel every new
//!   connection goes to the node most sentinels name as the primary (see
//!   [`Primary`]), and a pooled one is handed out again only while that is
//!   still the node it was made to, so that the pool follows failovers. Both
//!   implement `ConnectionLike`, and [`Conn::shared`] gives a cloneable
//!   handle for requests sent side by side (one per partition).
//! - [`Store::subscribe`] follows a set of channels: `SUBSCRIBE` on one
//!   server; on a cluster, sharded `SSUBSCRIBE` on a RESP3 connection, each
//!   channel at the master of its slot, so a message crosses only its shard.
//!   When a slot moves, Redis ends the subscription with an unrequested
//!   `SUNSUBSCRIBE`, which redis-rs would not undo: [`Subscription::next`]
//!   subscribes again, and reports the channel, so that its partition catches up.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushKind, RedisError, RedisFuture, RedisResult, Value};

/// Which Redis a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server: the URL as redis-rs reads it.
    Standalone(String),
    /// A Redis Cluster: its seed nodes, as `redis://[user:password@]host:port` URLs.
    Cluster(Vec<String>),
    /// A primary found through Sentinel.
    Sentinel {
        /// The sentinels, `(host, port)`.
        sentinels: Vec<(String, u16)>,
        /// The master's name.
        master: String,
        /// The data nodes' user name, if any.
        username: Option<String>,
        /// The data nodes' password, if any.
        password: Option<String>,
    },
}

impl Topology {
    /// Reads a `redis_url`: `redis://…`, or `redis+cluster://[user:password@]h1:p1[,h2:p2…]`.
    pub fn parse(url: &str) -> Result<Topology, String> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (credentials, hosts) = match rest.rsplit_once('@') {
                Some((c, h)) => (format!("{c}@"), h),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            let nodes: Vec<String> =
                hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{credentials}{h}")).collect();
            if nodes.is_empty() {
                return Err("redis+cluster:// needs at least one host:port".into());
            }
            for node in &nodes {
                redis::Client::open(node.as_str())
                    .map_err(|e| format!("a cluster node is not a valid address: {e}"))?;
            }
            Ok(Topology::Cluster(nodes))
        } else if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (credentials, rest) = match rest.rsplit_once('@') {
                Some((c, r)) => (Some(c), r),
                None => (None, rest),
            };
            let (hosts, master) = rest
                .split_once('/')
                .ok_or("redis+sentinel:// needs the master's name: redis+sentinel://h1:p1,h2:p2/MASTER_NAME")?;
            let master = master.trim_end_matches('/');
            if master.is_empty() || master.contains('/') {
                return Err("redis+sentinel:// needs the master's name after the hosts".into());
            }
            let sentinels = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    let (host, port) = h.rsplit_once(':').ok_or("each sentinel is host:port")?;
                    let port = port.parse::<u16>().map_err(|_| "a sentinel's port is not a number")?;
                    Ok((host.to_string(), port))
                })
                .collect::<Result<Vec<_>, &str>>()?;
            if sentinels.is_empty() {
                return Err("redis+sentinel:// needs at least one sentinel host:port".into());
            }
            let decode = |s: &str| percent_decode(s);
            let (username, password) = match credentials.map(|c| c.split_once(':').unwrap_or(("", c))) {
                Some((user, password)) => {
                    (Some(decode(user)).filter(|u| !u.is_empty()), Some(decode(password)).filter(|p| !p.is_empty()))
                }
                None => (None, None),
            };
            Ok(Topology::Sentinel { sentinels, master: master.to_string(), username, password })
        } else {
            redis::Client::open(url).map_err(|e| format!("not a valid Redis URL: {e}"))?;
            Ok(Topology::Standalone(url.to_string()))
        }
    }

    /// Whether messages are published with `SPUBLISH` (a cluster).
    pub fn sharded(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }
}

/// Timeouts for every Redis connection: 5 s to connect, 5 s for a reply.
/// (redis-rs times a reply out after 500 ms by default: too tight for a busy
/// machine, where it turns a slow moment into a 503.)
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`CONNECT_TIMEOUT`].
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeouts for a connection to one server.
pub fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// `%XX` escapes of a URL's user or password, decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The primary a set of sentinels names, as last asked: every connection
/// made to it carries the *generation* it was made in, and a new primary
/// (a failover) starts a new generation, so that connections to the old one
/// (which may still answer, and still call itself primary, until Sentinel
/// reconfigures it) are dropped rather than used.
///
/// The primary is the node that **most of the sentinels** name. Right after
/// a failover the sentinels disagree for a moment (each learns of the new
/// primary from the leader's hello messages): a process that believed the
/// first sentinel to answer could go on proving its sync against the old
/// primary, which still answers, while another already writes to the new
/// one. A majority cannot name both: once a process has seen most sentinels
/// name the new primary, any other asking later sees the same (a sentinel
/// never goes back to an older configuration), and one that still sees the
/// old majority asks again at its next heartbeat.
pub struct Primary {
    /// Every sentinel of the URL, with its kept connection.
    sentinels: Vec<SentinelNode>,
    /// The master's name.
    master: String,
    /// The data nodes' credentials.
    node: redis::RedisConnectionInfo,
    /// The primary's address as last named.
    named: std::sync::Mutex<Option<(String, u16)>>,
    /// Bumped whenever the named primary changes.
    generation: tokio::sync::watch::Sender<u64>,
}

/// One sentinel, asked over a connection kept between questions.
struct SentinelNode {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

/// How long one sentinel may take to answer before it counts as silent.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

impl SentinelNode {
    /// The address this sentinel names for `master`; `None` if it did not
    /// answer in time, or knows no such master.
    async fn ask(&self, master: &str) -> Option<(String, u16)> {
        let question = async {
            let mut kept = self.conn.lock().await;
            let mut conn = match kept.as_ref() {
                Some(conn) => conn.clone(),
                None => {
                    let conn = self.client.get_multiplexed_async_connection_with_config(&connection_config()).await?;
                    kept.insert(conn).clone()
                }
            };
            drop(kept);
            let answer: RedisResult<Option<(String, u16)>> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(master).query_async(&mut conn).await;
            if answer.as_ref().is_err_and(|e| e.is_unrecoverable_error()) {
                *self.conn.lock().await = None;
            }
            answer
        };
        match tokio::time::timeout(SENTINEL_TIMEOUT, question).await {
            Ok(Ok(named)) => named,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a sentinel did not answer");
                None
            }
            Err(_) => {
                // A connection that hangs is made again next time.
                *self.conn.lock().await = None;
                None
            }
        }
    }
}

/// The address more than half of the sentinels name (silent ones count
/// against every address), if there is one.
fn majority(answers: &[Option<(String, u16)>]) -> Option<(String, u16)> {
    let named = answers.iter().flatten();
    named.clone().find(|a| named.clone().filter(|b| b == a).count() * 2 > answers.len()).cloned()
}

impl Primary {
    fn new(
        sentinels: &[(String, u16)],
        master: &str,
        node: redis::RedisConnectionInfo,
        sentinel_password: Option<&str>,
    ) -> Result<Primary, String> {
        let mut auth = redis::RedisConnectionInfo::default();
        if let Some(password) = sentinel_password {
            auth = auth.set_password(password);
        }
        let sentinels = sentinels
            .iter()
            .map(|(host, port)| {
                let info =
                    redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(host.clone(), *port))
                        .map_err(|e| format!("bad redis_url: {e}"))?
                        .set_redis_settings(auth.clone());
                let client = redis::Client::open(info).map_err(|e| format!("bad redis_url: {e}"))?;
                Ok(SentinelNode { client, conn: tokio::sync::Mutex::new(None) })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Primary {
            sentinels,
            master: master.to_string(),
            node,
            named: std::sync::Mutex::new(None),
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// Asks every sentinel for the primary now (side by side); a new one
    /// starts a new generation. Returns a client of it, or an error when no
    /// majority of the sentinels names one node.
    async fn resolve(&self) -> RedisResult<redis::Client> {
        let answers = futures_util::future::join_all(self.sentinels.iter().map(|s| s.ask(&self.master))).await;
        let Some((host, port)) = majority(&answers) else {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "no majority of the sentinels names a primary",
                format!(
                    "{} of {} answered for {}: {answers:?}",
                    answers.iter().flatten().count(),
                    answers.len(),
                    self.master
                ),
            )));
        };
        let info = redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(host.clone(), port))?
            .set_redis_settings(self.node.clone());
        let client = redis::Client::open(info)?;
        let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        if named.as_ref() != Some(&(host.clone(), port)) {
            if named.is_some() {
                tracing::warn!(primary = %format!("{host}:{port}"), "the sentinels name a new primary: dropping connections to the old one");
            }
            *named = Some((host, port));
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(client)
    }

    fn generation(&self) -> u64 {
        *self.generation.borrow()
    }
}

/// A connection to the primary Sentinel named, with the generation it was made in.
pub struct SentinelConn {
    /// The connection.
    conn: MultiplexedConnection,
    /// See [`Primary`].
    generation: u64,
}

/// Makes the pool's connections to the primary (see [`Primary`]); a
/// connection is handed out again only while its generation is current and
/// it answers.
pub struct SentinelManager {
    primary: std::sync::Arc<Primary>,
}

impl deadpool::managed::Manager for SentinelManager {
    type Type = SentinelConn;
    type Error = RedisError;

    async fn create(&self) -> Result<SentinelConn, RedisError> {
        let client = self.primary.resolve().await?;
        let generation = self.primary.generation();
        let conn = client.get_multiplexed_async_connection_with_config(&connection_config()).await?;
        Ok(SentinelConn { conn, generation })
    }

    async fn recycle(
        &self,
        conn: &mut SentinelConn,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        if conn.generation != self.primary.generation() {
            return Err(deadpool::managed::RecycleError::message("the primary changed"));
        }
        let _: String = redis::cmd("PING").query_async(&mut conn.conn).await?;
        Ok(())
    }
}

/// The process's handle to Redis.
#[derive(Clone)]
pub enum Store {
    /// One server, through a pool.
    Standalone {
        /// Pooled connections.
        pool: deadpool_redis::Pool,
        /// For subscriptions and the agents' acknowledgement connection.
        client: redis::Client,
    },
    /// A primary found through Sentinel, through a pool that follows it.
    Sentinel {
        /// Pooled connections to the primary.
        pool: deadpool::managed::Pool<SentinelManager>,
        /// The primary as the sentinels name it, shared with the pool.
        primary: std::sync::Arc<Primary>,
    },
    /// A cluster, through one shared connection (made at first use).
    Cluster {
        /// The cluster client.
        client: Box<redis::cluster::ClusterClient>,
        /// The seed nodes, for subscription clients.
        nodes: Vec<String>,
        /// `redis_password`, for them too.
        password: Option<String>,
        /// The shared connection, once made.
        shared: std::sync::Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
        /// The connection of the writes that `WAIT` for replicas (see
        /// [`Store::writer`]), once made.
        writer: std::sync::Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
    },
}

/// Why Redis did not answer, as readiness reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Down, or not reachable (the default).
    Unreachable,
    /// It refused the credentials (`WRONGPASS`, `NOAUTH`).
    CredentialsRefused,
    /// The user may not run a command it needs (`NOPERM`): its ACL is too narrow.
    PermissionDenied,
    /// The TLS handshake failed: the server's certificate is not trusted
    /// (`redis_ca_file`), or names another host.
    TlsRefused,
}

impl Outage {
    /// What an error's text says happened. (The pool reports errors as text,
    /// so the text is what every path has in common.)
    pub fn of(error: &str) -> Outage {
        if error.contains("WRONGPASS") || error.contains("NOAUTH") || error.contains("AuthenticationFailed") {
            Outage::CredentialsRefused
        } else if error.contains("NOPERM") {
            Outage::PermissionDenied
        } else if error.contains("certificate") || error.contains("TLS") || error.contains("tls handshake") {
            Outage::TlsRefused
        } else {
            Outage::Unreachable
        }
    }

    /// The `reason` of a 503 `not_ready`.
    pub fn reason(self) -> &'static str {
        match self {
            Outage::Unreachable => "redis_unreachable",
            Outage::CredentialsRefused => "redis_credentials_refused",
            Outage::PermissionDenied => "redis_permission_denied",
            Outage::TlsRefused => "redis_tls_failed",
        }
    }

    /// As a number, to keep in an atomic.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// See [`Outage::code`].
    pub fn from_code(code: u8) -> Outage {
        match code {
            1 => Outage::CredentialsRefused,
            2 => Outage::PermissionDenied,
            3 => Outage::TlsRefused,
            _ => Outage::Unreachable,
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

impl From<Unreachable> for RedisError {
    fn from(e: Unreachable) -> Self {
        RedisError::from((redis::ErrorKind::Io, "Redis is unreachable", e.0))
    }
}

/// What a process needs besides its `redis_url` to reach Redis.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The sentinels' own password (`redis_sentinel_password`), when they
    /// require one (`requirepass` in their config); the data nodes'
    /// credentials are in the URL.
    pub sentinel_password: Option<String>,
    /// The data nodes' password (`redis_password`), if it is not in the URL
    /// (so that the URL can sit in a config file and the secret in the
    /// environment); it wins over one in the URL.
    pub password: Option<String>,
    /// A PEM bundle of CAs to trust besides the system's, for a `rediss://`
    /// URL (`redis_ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Access {
    /// Checks a `redis_url` and these settings together, as the processes'
    /// settings do before they start.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let topology = Topology::parse(url).map_err(|e| format!("redis_url: {e}"))?;
        if self.sentinel_password.is_some() && !matches!(topology, Topology::Sentinel { .. }) {
            return Err("redis_sentinel_password is for a redis+sentinel:// redis_url".into());
        }
        if self.ca_file.is_some() {
            if !url.starts_with("rediss://") {
                return Err("redis_ca_file is for a rediss:// redis_url (TLS)".into());
            }
            self.tls_certificates()?;
        }
        Ok(())
    }

    /// The CAs a `rediss://` connection trusts: `redis_ca_file`'s and the
    /// system's (redis-rs trusts only the bundle it is given, so the system's
    /// are added to it); `None` without `redis_ca_file` (the system's alone).
    fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, String> {
        let Some(path) = &self.ca_file else { return Ok(None) };
        let mut bundle =
            std::fs::read(path).map_err(|e| format!("redis_ca_file {}: cannot read it: {e}", path.display()))?;
        let mut found = 0;
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&bundle) {
            let _: rustls::pki_types::CertificateDer =
                cert.map_err(|e| format!("redis_ca_file {}: not a PEM certificate bundle: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!("redis_ca_file {}: holds no PEM certificate", path.display()));
        }
        bundle.push(b'\n');
        for cert in rustls_native_certs::load_native_certs().certs {
            bundle.extend_from_slice(pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())).as_bytes());
        }
        Ok(Some(redis::TlsCertificates { client_tls: None, root_cert: Some(bundle) }))
    }
}

/// Makes `ring` the process's TLS crypto provider, once. rustls picks one by
/// itself only while exactly one is compiled in; the coordinator's PostgreSQL
/// client brings `aws-lc-rs` into the workspace beside `ring`, and a TLS
/// connection with two and none chosen would panic.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another part of the process chose first, which is as good.
        // (`ring` is deprecated only for lacking post-quantum key exchange,
        // which the Redis and PostgreSQL servers we talk to do not offer.)
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Store {
    /// A store for `url` (see [`Topology::parse`]) with at most `pool_size`
    /// pooled connections on one server. Nothing connects yet.
    pub fn open(url: &str, pool_size: usize) -> Result<Store, String> {
        Store::open_with(url, pool_size, &Access::default())
    }

    /// [`Store::open`], with `access` (see [`Access`]).
    pub fn open_with(url: &str, pool_size: usize, access: &Access) -> Result<Store, String> {
        install_crypto_provider();
        match Topology::parse(url)? {
            Topology::Standalone(url) => {
                let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(|e| format!("bad redis_url: {e}"))?;
                if let Some(password) = &access.password {
                    let settings = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(settings);
                }
                // rediss:// with redis_ca_file: the client carries the CAs
                // (the pool's manager is made from its connection info).
                let client = match access.tls_certificates()? {
                    Some(certs) => redis::Client::build_with_tls(info, certs),
                    None => redis::Client::open(info),
                }
                .map_err(|e| format!("bad redis_url: {e}"))?;
                let manager =
                    deadpool_redis::Manager::new_with_config(client.get_connection_info().clone(), connection_config())
                        .map_err(|e| format!("bad redis_url: {e}"))?;
                let pool = pool(manager, pool_size)?;
                Ok(Store::Standalone { pool, client })
            }
            Topology::Cluster(nodes) => {
                let password = access.password.clone();
                let client =
                    cluster_builder(&nodes, password.as_deref()).build().map_err(|e| format!("bad redis_url: {e}"))?;
                Ok(Store::Cluster {
                    client: Box::new(client),
                    nodes,
                    password,
                    shared: Default::default(),
                    writer: Default::default(),
                })
            }
            Topology::Sentinel { sentinels, master, username, password } => {
                let mut node = redis::RedisConnectionInfo::default();
                if let Some(user) = &username {
                    node = node.set_username(user);
                }
                if let Some(password) = access.password.as_ref().or(password.as_ref()) {
                    node = node.set_password(password);
                }
                let primary = Primary::new(&sentinels, &master, node, access.sentinel_password.as_deref());
                let primary = std::sync::Arc::new(primary?);
                let pool = pool(SentinelManager { primary: primary.clone() }, pool_size)?;
                Ok(Store::Sentinel { pool, primary })
            }
        }
    }

    /// Whether messages are published with `SPUBLISH` (a cluster).
    pub fn sharded(&self) -> bool {
        matches!(self, Store::Cluster { .. })
    }

    /// A connection for one request (or one run of the invalidation path).
    pub async fn get(&self) -> Result<Conn, Unreachable> {
        match self {
            Store::Standalone { pool, .. } => {
                pool.get().await.map(Conn::Pooled).map_err(|e| Unreachable(e.to_string()))
            }
            Store::Sentinel { pool, .. } => {
                pool.get().await.map(Conn::Sentinel).map_err(|e| Unreachable(e.to_string()))
            }
            Store::Cluster { client, shared, .. } => shared_cluster_connection(client, shared).await,
        }
    }

    /// A connection for the invalidation path, whose writes end with a
    /// `WAIT` for replicas: on a cluster, a second shared `ClusterConnection`.
    /// Redis holds a connection that sent `WAIT` until the replicas answer
    /// (up to `replica_timeout_ms`), and on the connection every read of the
    /// process shares, each read to that master would wait behind it. (`WAIT`
    /// must go on the connection of the writes it waits for, so it cannot
    /// have one of its own.) Elsewhere the same as [`Store::get`]: a pooled
    /// connection is the caller's alone.
    pub async fn writer(&self) -> Result<Conn, Unreachable> {
        match self {
            Store::Cluster { client, writer, .. } => shared_cluster_connection(client, writer).await,
            _ => self.get().await,
        }
    }

    /// A connection of its own for a task that writes often (an agent's
    /// acknowledgements): on one server a dedicated multiplexed connection
    /// (no pool checkout per write), on a cluster the shared one.
    pub async fn dedicated(&self) -> Result<SharedConn, Unreachable> {
        match self {
            Store::Standalone { client, .. } => client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
                .map(SharedConn::Mux)
                .map_err(|e| Unreachable(e.to_string())),
            Store::Sentinel { primary, .. } => {
                let client = primary.resolve().await.map_err(|e| Unreachable(e.to_string()))?;
                let conn = client.get_multiplexed_async_connection_with_config(&connection_config()).await;
                conn.map(SharedConn::Mux).map_err(|e| Unreachable(e.to_string()))
            }
            Store::Cluster { .. } => Ok(self.get().await?.shared()),
        }
    }

    /// Asks the sentinels which node is the primary now (nothing to do for
    /// the other topologies): when it changed, connections to the old one are
    /// dropped before their next use and subscriptions on it end. The agents'
    /// heartbeat calls this before it reads the logs' heads, so that a proof
    /// of sync is always made against the primary the coordinators write to,
    /// never against an old one that still answers.
    pub async fn check_primary(&self) -> RedisResult<()> {
        if let Store::Sentinel { primary, .. } = self {
            primary.resolve().await?;
        }
        Ok(())
    }

    /// The primary's generation (see [`Primary`]; 0 for the other topologies).
    pub fn generation(&self) -> u64 {
        match self {
            Store::Sentinel { primary, .. } => primary.generation(),
            _ => 0,
        }
    }

    /// Whether the node `conn` wrote to is still the primary, asking the
    /// sentinels now (always true for the other topologies). Under Sentinel an
    /// invalidation is answered only then: one written to a primary that had
    /// just been replaced (it still answers until Sentinel reconfigures it)
    /// would be lost with it.
    pub async fn still_primary(&self, conn: &Conn) -> RedisResult<bool> {
        self.check_primary().await?;
        Ok(self.is_current(conn))
    }

    /// Whether a connection kept between uses still goes to the primary.
    pub fn is_current(&self, conn: &Conn) -> bool {
        match conn {
            Conn::Sentinel(c) => c.generation == self.generation(),
            _ => true,
        }
    }

    /// Subscribes to `channels`; see [`Subscription`].
    pub async fn subscribe(&self, channels: &[String]) -> RedisResult<Subscription> {
        let classic = async |client: &redis::Client, changed: Option<tokio::sync::watch::Receiver<u64>>| {
            let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
                .await
                .map_err(|_| RedisError::from((redis::ErrorKind::Io, "timed out subscribing")))??;
            pubsub.subscribe(channels).await?;
            let (sink, stream) = pubsub.split();
            RedisResult::Ok(Subscription::Classic { _sink: sink, stream: Box::pin(stream), changed })
        };
        match self {
            Store::Standalone { client, .. } => classic(client, None).await,
            // The primary as the sentinels name it now; the subscription ends
            // when they name another.
            Store::Sentinel { primary, .. } => {
                let client = primary.resolve().await?;
                let mut changed = primary.generation.subscribe();
                changed.borrow_and_update();
                classic(&client, Some(changed)).await
            }
            Store::Cluster { nodes, password, .. } => {
                let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
                let client = cluster_builder(nodes, password.as_deref())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()?;
                let mut conn = client.get_async_connection().await?;
                // One call per channel: channels of different slots live on
                // different masters.
                for channel in channels {
                    conn.ssubscribe(channel).await?;
                }
                Ok(Subscription::Sharded { conn, pushes, channels: channels.to_vec() })
            }
        }
    }
}

/// A pool that never waits long: a request fails with 503 when Redis is down
/// (at once when it refuses connections); these bound a Redis, or a machine,
/// too busy to answer.
fn pool<M, W>(manager: M, size: usize) -> Result<deadpool::managed::Pool<M, W>, String>
where
    M: deadpool::managed::Manager,
    W: From<deadpool::managed::Object<M>>,
{
    deadpool::managed::Pool::<M, W>::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("cannot build the Redis pool: {e}"))
}

/// The connection kept in `slot`, made at first use.
async fn shared_cluster_connection(
    client: &redis::cluster::ClusterClient,
    slot: &tokio::sync::Mutex<Option<ClusterConnection>>,
) -> Result<Conn, Unreachable> {
    let mut slot = slot.lock().await;
    if let Some(conn) = slot.as_ref() {
        return Ok(Conn::Cluster(conn.clone()));
    }
    let conn = client.get_async_connection().await.map_err(|e| Unreachable(e.to_string()))?;
    *slot = Some(conn.clone());
    Ok(Conn::Cluster(conn))
}

/// A cluster client with this project's timeouts.
fn cluster_builder(nodes: &[String], password: Option<&str>) -> redis::cluster::ClusterClientBuilder {
    let builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    match password {
        Some(password) => builder.password(password),
        None => builder,
    }
}

/// A connection from [`Store::get`].
pub enum Conn {
    /// A pooled connection to one server.
    Pooled(deadpool_redis::Connection),
    /// A pooled connection to the primary Sentinel names.
    Sentinel(deadpool::managed::Object<SentinelManager>),
    /// The cluster connection.
    Cluster(ClusterConnection),
}

impl Conn {
    /// A cloneable handle on the same connection, for requests sent side by
    /// side (they share one round trip).
    pub fn shared(&self) -> SharedConn {
        match self {
            Conn::Pooled(conn) => SharedConn::Mux((**conn).clone()),
            Conn::Sentinel(conn) => SharedConn::Mux(conn.conn.clone()),
            Conn::Cluster(conn) => SharedConn::Cluster(conn.clone()),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Pooled(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.conn.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Pooled(c) => c.get_db(),
            Conn::Sentinel(c) => c.conn.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A cloneable connection: requests on clones are pipelined on one socket
/// (per node, on a cluster).
#[derive(Clone)]
pub enum SharedConn {
    /// One server.
    Mux(MultiplexedConnection),
    /// A cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            SharedConn::Mux(c) => c.req_packed_command(cmd),
            SharedConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            SharedConn::Mux(c) => c.req_packed_commands(cmd, offset, count),
            SharedConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            SharedConn::Mux(c) => c.get_db(),
            SharedConn::Cluster(c) => c.get_db(),
        }
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A message on one of the channels.
    Message {
        /// The channel.
        channel: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// The channel's subscription was interrupted and is back (a slot moved,
    /// or its node's connection was re-made): messages may have been missed.
    Resubscribed(String),
}

/// A subscription to a set of channels. It ends (`None`, or an error) when
/// its connection is lost: the caller then subscribes again.
pub enum Subscription {
    /// `SUBSCRIBE` on one server.
    Classic {
        /// Kept so that the subscription lasts.
        _sink: redis::aio::PubSubSink,
        /// Its messages.
        stream: std::pin::Pin<Box<redis::aio::PubSubStream>>,
        /// Under Sentinel: changes when another node becomes the primary.
        changed: Option<tokio::sync::watch::Receiver<u64>>,
    },
    /// `SSUBSCRIBE` on a cluster.
    Sharded {
        /// The RESP3 cluster connection holding the subscriptions.
        conn: ClusterConnection,
        /// Its pushes.
        pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        /// The channels subscribed to.
        channels: Vec<String>,
    },
}

impl Subscription {
    /// The next delivery; `None` when the subscription ended.
    pub async fn next(&mut self) -> RedisResult<Option<Delivery>> {
        use futures_util::StreamExt;
        match self {
            Subscription::Classic { stream, changed, .. } => {
                let primary_changed = async {
                    match changed {
                        Some(changed) => {
                            let _ = changed.changed().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    msg = stream.next() => Ok(msg.map(|msg| Delivery::Message {
                        channel: msg.get_channel_name().to_string(),
                        payload: msg.get_payload_bytes().to_vec(),
                    })),
                    // Subscribed to a node that is no longer the primary.
                    _ = primary_changed => Ok(None),
                }
            }
            Subscription::Sharded { conn, pushes, channels } => loop {
                let Some(push) = pushes.recv().await else { return Ok(None) };
                let channel = push.data.first().and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
                match (push.kind, channel) {
                    (PushKind::SMessage, Some(channel)) => {
                        let payload = push.data.get(1).cloned().and_then(|v| redis::from_redis_value(v).ok());
                        return Ok(Some(Delivery::Message { channel, payload: payload.unwrap_or_default() }));
                    }
                    // A slot moved (or its node went away): Redis ended the
                    // subscription, and redis-rs dropped it from its list.
                    (PushKind::SUnsubscribe, Some(channel)) if channels.contains(&channel) => {
                        conn.ssubscribe(&channel).await?;
                        return Ok(Some(Delivery::Resubscribed(channel)));
                    }
                    // redis-rs re-made a node's connection and subscribed again.
                    (PushKind::SSubscribe, Some(channel)) if channels.contains(&channel) => {
                        return Ok(Some(Delivery::Resubscribed(channel)));
                    }
                    // A node's connection closed: which channels it carried is
                    // not said, so the whole subscription starts over.
                    (PushKind::Disconnection, _) => return Ok(None),
                    _ => {}
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_says_when_redis_refused_the_credentials() {
        let wrong = "WRONGPASS: invalid username-password pair or user is disabled.";
        assert_eq!(Outage::of(wrong), Outage::CredentialsRefused);
        assert_eq!(Outage::of("Backend error: NOAUTH: Authentication required."), Outage::CredentialsRefused);
        assert_eq!(
            Outage::of("NOPERM: User dcc has no permissions to run the 'flushall' command"),
            Outage::PermissionDenied
        );
        assert_eq!(Outage::of("Connection refused (os error 111)"), Outage::Unreachable);
        assert_eq!(Outage::of("invalid peer certificate: UnknownIssuer"), Outage::TlsRefused);
        for o in [Outage::Unreachable, Outage::CredentialsRefused, Outage::PermissionDenied, Outage::TlsRefused] {
            assert_eq!(Outage::from_code(o.code()), o);
        }
    }

    #[test]
    fn the_primary_is_what_most_sentinels_name() {
        let a = Some(("10.0.0.1".to_string(), 6379));
        let b = Some(("10.0.0.2".to_string(), 6379));
        assert_eq!(majority(&[a.clone(), a.clone(), b.clone()]), a);
        assert_eq!(majority(&[b.clone(), a.clone(), b.clone()]), b);
        // Mid-failover, one sentinel each way and one silent: nobody is named.
        assert_eq!(majority(&[a.clone(), b.clone(), None]), None);
        assert_eq!(majority(&[a.clone(), None, None]), None);
        assert_eq!(majority(&[a.clone(), a.clone(), None]), a);
        assert_eq!(majority(&[a.clone(), b.clone()]), None);
        assert_eq!(majority(std::slice::from_ref(&a)), a);
        assert_eq!(majority(&[None]), None);
    }

    #[test]
    fn a_sentinel_password_goes_with_a_sentinel_url() {
        let access = Access { sentinel_password: Some("secret".into()), ..Access::default() };
        assert!(access.check("redis+sentinel://127.0.0.1:26379/mymaster").is_ok());
        assert!(access.check("redis://127.0.0.1:6379").is_err());
        assert!(access.check("redis+cluster://127.0.0.1:7000").is_err());
        assert!(Access::default().check("redis://127.0.0.1:6379").is_ok());
        assert!(Access::default().check("redis+sentinel://127.0.0.1:26379").is_err());
    }

    #[test]
    fn urls_name_their_topology() {
        assert_eq!(
            Topology::parse("redis://127.0.0.1:6379"),
            Ok(Topology::Standalone("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(
            Topology::parse("redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001/"),
            Ok(Topology::Cluster(vec!["redis://u:p@127.0.0.1:7000".into(), "redis://u:p@127.0.0.1:7001".into()]))
        );
        assert!(Topology::parse("redis+cluster://").is_err());
        assert_eq!(
            Topology::parse("redis+sentinel://app:s%40cret@127.0.0.1:26379,127.0.0.1:26380/mymaster"),
            Ok(Topology::Sentinel {
                sentinels: vec![("127.0.0.1".into(), 26379), ("127.0.0.1".into(), 26380)],
                master: "mymaster".into(),
                username: Some("app".into()),
                password: Some("s@cret".into()),
            })
        );
        assert!(Topology::parse("redis+sentinel://127.0.0.1:26379").is_err(), "no master name");
        assert!(Topology::parse("redis+sentinel://127.0.0.1:x/m").is_err());
        assert!(Topology::parse("http://nope").is_err());
        assert!(Topology::parse("redis+cluster://127.0.0.1:7000").is_ok_and(|t| t.sharded()));
    }
}
