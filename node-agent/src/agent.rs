//! The agent itself, without HTTP: what an app that embeds the agent calls, and
//! what the HTTP handlers in [`crate::api`] wrap.
//!
//! - [`Agent::get`]: L1, else L2 (filling L1), else a miss with a fill token.
//! - [`Agent::put`]: L2 then L1.
//! - [`Agent::delete`]: the shared invalidation path, then this agent's L1 at once.
//!
//! Background work (subscription, heartbeat) lives in [`crate::sync`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;

use shared::invalidation::{self, InvalidationError, LogSettings, Outcome, Request};
use shared::names::{self, InvalidName};
use shared::protocol::{epochs_fingerprint, FillToken, Selector};
use shared::schema::Layout;
use shared::store::{Conn, Store};
use shared::{l2, service::ApiError};

use crate::encryption::Encryption;
use crate::l1::{self, L1};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::sync::state::{node_disagrees, SyncState};
use crate::usage::{Event, Served, Usage};

/// A cheap-to-clone handle to one agent.
#[derive(Clone)]
pub struct Agent(pub(crate) Arc<Inner>);

/// The agent's shared state.
pub(crate) struct Inner {
    /// Settings it was started with.
    pub(crate) settings: Settings,
    /// How tenants map to partitions.
    pub(crate) layout: Layout,
    /// How this agent logs its DELETEs.
    pub(crate) log: LogSettings,
    /// This node's id.
    pub(crate) node_id: String,
    /// Address of its cache API (empty when embedded without HTTP).
    pub(crate) addr: String,
    /// Redis (one server or a cluster): connections and subscriptions.
    pub(crate) store: Store,
    /// The in-memory cache.
    pub(crate) l1: L1,
    /// Which values are sealed in L2, and the keys.
    pub(crate) encryption: Encryption,
    /// How long written entries live (`[[ttl]]` tiers, jitter).
    pub(crate) ttl: crate::ttl::TtlPolicy,
    /// How far this agent is in sync with each partition's log.
    pub(crate) sync: SyncState,
    /// Metrics and counters.
    pub(crate) metrics: Metrics,
    /// Per-tenant reads, for the stats in the heartbeat.
    pub(crate) usage: Usage,
    /// Misses waiting for another's fill (see [`crate::lease`]).
    pub(crate) waiters: crate::lease::Waiters,
    /// Warm-ups wanted and under way (see [`crate::warm`]).
    pub(crate) warm: WarmState,
    /// Keys whose eager refresh was handed out, and when (see [`Agent::refresh_hint`]).
    refreshing: Mutex<HashMap<(String, String), Instant>>,
    /// L2 reads in flight, by (tenant, key), with the fill guard they started under.
    flights: Mutex<HashMap<(String, String), (l1::FillGuard, Flight)>>,
}

/// One shared L2 read.
type Flight = Shared<BoxFuture<'static, Result<Loaded, String>>>;

/// What one L2 read found, shared by the concurrent misses of a key on this agent.
#[derive(Debug, Clone)]
enum Loaded {
    /// The entry.
    Hit(l1::Entry),
    /// Not in L2: a fill token, and who may load the value (see [`crate::lease`]).
    Miss {
        /// The opaque fill token.
        fill_token: String,
        /// The key's fill lease, as this read found it.
        lease: MissLease,
    },
}

/// The warm-ups wanted (partitions) and whether one is under way.
#[derive(Default)]
pub(crate) struct WarmState {
    pending: Mutex<std::collections::BTreeSet<u16>>,
    warming: std::sync::atomic::AtomicBool,
    /// Wakes the warm-up task.
    pub(crate) requested: tokio::sync::Notify,
}

impl WarmState {
    /// Asks for a warm-up of `partitions`; readiness waits for it.
    pub(crate) fn request(&self, partitions: impl IntoIterator<Item = u16>) {
        let mut pending = lock(&self.pending);
        pending.extend(partitions);
        self.warming.store(true, Ordering::Release);
        self.requested.notify_one();
    }

    /// The partitions asked for since the last call.
    pub(crate) fn take(&self) -> std::collections::BTreeSet<u16> {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// A warm-up ended: warming no more, unless another was asked for meanwhile.
    pub(crate) fn done(&self) {
        let pending = lock(&self.pending);
        if pending.is_empty() {
            self.warming.store(false, Ordering::Release);
        }
    }

    /// Whether a warm-up is wanted or under way.
    pub(crate) fn warming(&self) -> bool {
        self.warming.load(Ordering::Acquire)
    }
}

impl From<Loaded> for Read {
    fn from(loaded: Loaded) -> Read {
        match loaded {
            Loaded::Hit(entry) => Read::Hit { entry, layer: Layer::L2 },
            Loaded::Miss { fill_token, .. } => Read::Miss { fill_token },
        }
    }
}

/// A miss's part in the key's fill lease.
#[derive(Debug, Clone)]
enum MissLease {
    /// Leases are off (`lease_ms = 0`), or could not be taken: every caller loads.
    Off,
    /// This read's token holds the lease: the first caller to claim it loads;
    /// the other callers that shared the read wait for its fill.
    Mine(Arc<std::sync::atomic::AtomicBool>),
    /// Another miss holds it, for this long yet: wait for its fill.
    Held(Duration),
    /// The key was stored meanwhile: read again.
    Filled,
}

/// Which layer answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layer {
    /// The agent's memory.
    L1,
    /// Redis.
    L2,
}

/// The answer to a read.
#[derive(Debug, Clone)]
pub enum Read {
    /// Found, with the layer that had it.
    Hit {
        /// The entry.
        entry: l1::Entry,
        /// Where it was found.
        layer: Layer,
    },
    /// Not cached anywhere; fill it with this token.
    Miss {
        /// The opaque fill token.
        fill_token: String,
    },
}

/// A value to store.
#[derive(Debug, Clone, Default)]
pub struct Put {
    /// The bytes.
    pub value: Bytes,
    /// Content type to answer reads with.
    pub content_type: String,
    /// TTL in seconds; `None` means the default of the key's `[[ttl]]` tier
    /// (else `default_ttl_secs`), less its jitter.
    pub ttl_secs: Option<u64>,
    /// Tags.
    pub tags: Vec<String>,
    /// Keys of the same tenant this entry depends on.
    pub depends_on: Vec<String>,
    /// Token from an earlier miss.
    pub fill_token: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A name or parameter is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidName),
    /// The value is over `max_value_bytes`.
    #[error("the value is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size sent.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Neither L1 nor L2 can answer.
    #[error("{0}")]
    Unavailable(String),
    /// A DELETE was logged, but not held by enough replicas in time.
    #[error(
        "the key was deleted and the invalidation logged, but {0}: a failover could still undo it; retry the DELETE"
    )]
    NotReplicated(String),
    /// A fill raced an invalidation: nothing was stored.
    #[error(
        "nothing was stored: {0}; read the source of truth again and retry without caching, or GET for a new token"
    )]
    StaleFill(&'static str),
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        use actix_web::http::StatusCode;
        match e {
            AgentError::Invalid(n) => n.into(),
            e @ AgentError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
            }
            AgentError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            e @ AgentError::NotReplicated(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_replicated", e.to_string())
            }
            e @ AgentError::StaleFill(_) => ApiError::new(StatusCode::CONFLICT, "stale_fill", e.to_string()),
        }
    }
}

fn invalid(code: &'static str, message: String) -> AgentError {
    AgentError::Invalid(InvalidName { code, message })
}

impl Agent {
    /// Builds an agent; nothing connects yet, so Redis may be down.
    pub fn new(settings: Settings, node_id: String, addr: String) -> Result<Agent, String> {
        let store = Store::open_with(&settings.redis_url, settings.redis_pool_size, &settings.redis_access())?;
        let encryption = settings.encryption()?;
        let ttl = settings.ttl_policy().map_err(|problems| format!("configuration error: {}", problems.join("; ")))?;
        let warm = WarmState::default();
        if settings.warm_keys > 0 {
            warm.request(0..settings.partitions);
        }
        let metrics = Metrics::with_tenant_labels(settings.metrics.tenant_labels);
        metrics.l1_capacity.set(i64::try_from(settings.l1_max_bytes).unwrap_or(i64::MAX));
        let layout = Layout::new(settings.partitions);
        let sync = SyncState::new(layout.count(), settings.staleness_bound_ms);
        let log = LogSettings {
            max_len: settings.log_max_len,
            sharded: store.sharded(),
            min_replicas: settings.min_replicas,
            replica_timeout_ms: settings.replica_timeout_ms,
        };
        Ok(Agent(Arc::new(Inner {
            l1: L1::new(settings.l1_max_bytes, layout.clone()),
            encryption,
            ttl,
            layout,
            log,
            settings,
            node_id,
            addr,
            store,
            sync,
            metrics,
            usage: Usage::new(),
            waiters: crate::lease::Waiters::default(),
            refreshing: Mutex::default(),
            warm,
            flights: Mutex::default(),
        })))
    }

    /// Shared state, for the HTTP layer and the background tasks.
    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }

    /// Its settings.
    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.0.node_id
    }

    async fn conn(&self) -> Result<Conn, AgentError> {
        self.0.store.get().await.map_err(|e| self.l2_failed(e))
    }

    fn l2_failed(&self, e: impl std::fmt::Display) -> AgentError {
        self.0.metrics.l2_errors.inc();
        AgentError::Unavailable(format!(
            "Redis is unreachable ({e}), and L1 cannot answer: it does not hold this key, or it cannot be \
             proven fresh while the agent is out of sync; retry shortly"
        ))
    }

    /// Reads a key: L1 (while in sync), then L2 (filling L1), else a miss
    /// with a fill token. A miss takes the key's fill lease, or waits for the
    /// fill of the miss that has it (see [`crate::lease`]).
    pub async fn get(&self, tenant: &str, key: &str) -> Result<Read, AgentError> {
        self.read(tenant, key, true).await
    }

    /// Reads a key as [`Agent::get`] does, but a miss neither takes the
    /// key's fill lease nor waits for one: for reads that will not load the
    /// value (`EXISTS`, `TTL` on the Redis protocol port).
    pub async fn peek(&self, tenant: &str, key: &str) -> Result<Read, AgentError> {
        self.read(tenant, key, false).await
    }

    async fn read(&self, tenant: &str, key: &str, leased: bool) -> Result<Read, AgentError> {
        names::validate_tenant(tenant)?;
        names::validate_key(key)?;
        let m = &self.0.metrics;
        // One clock reading for the proof of sync and the entry's expiry.
        let now = Instant::now();
        let trusted = self.0.sync.in_sync_at(self.0.layout.of(tenant).index, now);
        if !trusted {
            // Out of sync for longer than the staleness bound: L1 may hold
            // entries invalidated meanwhile, so it neither answers nor fills.
            m.l1_bypassed.inc();
        } else if let Some(entry) = self.0.l1.get_at(tenant, key, now) {
            // Counted per thread (see `crate::usage`); `/metrics` and the
            // status read the sum.
            self.0.usage.l1_hit(tenant, key, entry.tags());
            return Ok(Read::Hit { entry, layer: Layer::L1 });
        }
        m.misses.l1.inc();
        let read = self.read_through(tenant, key, trusted, leased).await?;
        let served = match &read {
            Read::Hit { .. } => Served::L2,
            Read::Miss { .. } => Served::Miss,
        };
        self.0.usage.read(tenant, key, served);
        Ok(read)
    }

    /// How long before an entry of this TTL expires it is due for an eager
    /// refresh: the part of it after `refresh_ahead` (zero for an unknown TTL).
    fn refresh_lead(&self, ttl: Duration) -> Duration {
        ttl.mul_f64((1.0 - self.0.settings.refresh_ahead).clamp(0.0, 1.0))
    }

    /// Eager refresh (contract v2, section 4): for a hit on an entry past
    /// `refresh_ahead` of its TTL, a fill token if this is the first such hit
    /// on this agent, or the first since `lease_ms` passed without a fill
    /// (a PUT of the key). Its caller may reload the value and PUT it with
    /// the token before the entry expires, so that a hot entry is replaced
    /// instead of missed by everyone at once. `None` for every other hit, or
    /// when Redis cannot issue the token.
    pub async fn refresh_hint(&self, entry: &l1::Entry) -> Option<String> {
        let now = Instant::now();
        if !entry.due_for_refresh(now) {
            return None;
        }
        let (tenant, key) = (entry.tenant(), entry.key());
        let id = (tenant.to_string(), key.to_string());
        let window = Duration::from_millis(match self.0.settings.lease_ms {
            0 => 2000,
            ms => ms,
        });
        {
            let mut hinted = lock(&self.0.refreshing);
            if hinted.get(&id).is_some_and(|at| now.saturating_duration_since(*at) < window) {
                return None;
            }
            if hinted.len() >= 10_000 {
                hinted.retain(|_, at| now.saturating_duration_since(*at) < window);
            }
            hinted.insert(id.clone(), now);
        }
        let token = async {
            let mut conn = self.0.store.get().await.ok()?;
            l2::fill_token(&mut conn, self.0.layout.of(tenant)).await.ok()
        };
        match token.await {
            Some(token) => {
                self.0.metrics.refresh_hints.inc();
                self.0.usage.event(tenant, Event::RefreshHint);
                Some(token.encode())
            }
            None => {
                // The next hit may try again.
                lock(&self.0.refreshing).remove(&id);
                None
            }
        }
    }

    /// Loads one key of the hot set from L2 into L1 (see [`crate::warm`]),
    /// if its partition is in sync. Whether L1 holds it afterwards.
    pub async fn warm_one(&self, tenant: &str, key: &str) -> bool {
        if names::validate_tenant(tenant).is_err() || names::validate_key(key).is_err() {
            return false;
        }
        if !self.0.sync.in_sync(self.0.layout.of(tenant).index) {
            return false;
        }
        if self.0.l1.get(tenant, key).is_some() {
            return true;
        }
        matches!(self.flight(tenant, key, true, false).await, Ok(Loaded::Hit(_)))
    }

    /// Stale if error (RFC 5861; contract v2, section 4): for a read that
    /// failed because Redis is unreachable while L1 could not be proven fresh,
    /// the L1 entry of `tenant`/`key` if the caller accepts answers up to
    /// `within` past freshness. Given only when the partition's last proof of
    /// sync ran out at most `within` ago (it was taken at most the staleness
    /// bound plus `within` ago) and the entry expired at most `within` ago.
    /// Entries whose invalidation the agent applied are never in L1, so none
    /// is served. Returns the entry and its age: the time since it was last
    /// known fresh (the last proof, or its expiry if that came first).
    pub fn stale(&self, tenant: &str, key: &str, within: Duration) -> Option<(l1::Entry, Duration)> {
        let now = Instant::now();
        let p = self.0.layout.of(tenant).index;
        let proof_age = self.0.sync.proof_age(p, now)?;
        if proof_age > Duration::from_millis(self.0.sync.bound_ms()) + within {
            return None;
        }
        let entry = self.0.l1.get_stale(tenant, key, now, within)?;
        let fresh_at = now.checked_sub(proof_age).unwrap_or(now).min(entry.expires_at());
        self.0.metrics.stale_answers.inc();
        self.0.usage.event(tenant, Event::StaleAnswer);
        Some((entry, now.saturating_duration_since(fresh_at)))
    }

    /// Every tenant's figures for the heartbeat (see [`crate::usage`]).
    pub fn tenant_reports(&self) -> Vec<shared::protocol::TenantReport> {
        self.0.usage.report(self.0.l1.tenant_figures())
    }

    /// Reads L2 for a key, and after a miss lets one caller load it (the
    /// lease, see [`crate::lease`]) while the others wait for its fill, at
    /// most `lease_wait_ms`, and then read again. After the wait the last read
    /// answers, with the value or with a miss and a token of the caller's own.
    async fn read_through(&self, tenant: &str, key: &str, fill: bool, leased: bool) -> Result<Read, AgentError> {
        if !leased || self.0.settings.lease_ms == 0 {
            // No lease to take or wait for: one read answers.
            return self.flight(tenant, key, fill, leased).await.map(Read::from).map_err(AgentError::Unavailable);
        }
        let deadline = Instant::now() + Duration::from_millis(self.0.settings.lease_wait_ms);
        let mut waited = false;
        // A key found stored since the miss is read again once, not more: an
        // entry the read cannot use (one that does not decrypt) stays a miss.
        let mut reread = false;
        loop {
            let signal = self.0.waiters.register(tenant, key);
            let answer = {
                // Listening before the read, so that a fill notice arriving
                // between the read and the wait is not missed.
                let notified = signal.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let last = Instant::now() >= deadline;
                let loaded = self.flight(tenant, key, fill, leased).await;
                let left = || deadline.saturating_duration_since(Instant::now());
                let wait = match &loaded {
                    Ok(Loaded::Miss { lease, .. }) if !last => match lease {
                        MissLease::Off => None,
                        MissLease::Mine(claimed) if !claimed.swap(true, Ordering::AcqRel) => None,
                        // Another caller of this read claimed it: wait for its fill.
                        MissLease::Mine(_) => Some(left()),
                        MissLease::Held(lease_left) => Some(left().min(*lease_left)),
                        MissLease::Filled if reread => None,
                        MissLease::Filled => {
                            reread = true;
                            Some(Duration::ZERO)
                        }
                    },
                    _ => None,
                };
                match wait {
                    None => Some(loaded),
                    Some(wait) => {
                        if !wait.is_zero() {
                            let _ = tokio::time::timeout(wait, notified).await;
                        }
                        None
                    }
                }
            };
            self.0.waiters.release(tenant, key, signal);
            let Some(loaded) = answer else {
                waited = true;
                continue;
            };
            if waited {
                self.0.metrics.lease_waits.inc();
                self.0.usage.event(tenant, Event::LeaseWait);
            }
            return loaded.map(Read::from).map_err(AgentError::Unavailable);
        }
    }

    /// One L2 read of a key, shared by the concurrent misses of the key on
    /// this agent (no reload stampede after a flush), but only by misses
    /// that began after the last invalidation applied to the tenant: a caller
    /// never gets a value read before an invalidation it has already seen.
    async fn flight(&self, tenant: &str, key: &str, fill: bool, leased: bool) -> Result<Loaded, String> {
        let id = (tenant.to_string(), key.to_string());
        let guard = self.0.l1.fill_guard(tenant);
        let flight = {
            let mut flights = lock(&self.0.flights);
            match flights.get(&id) {
                Some((started, flight)) if *started == guard => flight.clone(),
                _ => {
                    let agent = self.clone();
                    let (t, k) = id.clone();
                    let flight =
                        async move { agent.load(&t, &k, guard, fill, leased).await.map_err(|e| e.to_string()) }
                            .boxed()
                            .shared();
                    flights.insert(id.clone(), (guard, flight.clone()));
                    flight
                }
            }
        };
        let result = flight.clone().await;
        let mut flights = lock(&self.0.flights);
        if flights.get(&id).is_some_and(|(_, f)| f.ptr_eq(&flight)) {
            flights.remove(&id);
        }
        result
    }

    /// One L2 read; fills L1 if `fill` and no invalidation of the tenant was
    /// applied since `guard` was taken.
    async fn load(
        &self,
        tenant: &str,
        key: &str,
        guard: l1::FillGuard,
        fill: bool,
        leased: bool,
    ) -> Result<Loaded, AgentError> {
        let m = &self.0.metrics;
        let mut conn = self.conn().await?;
        let partition = self.0.layout.of(tenant);
        let tip = self.0.sync.tip(partition.index);
        let lookup = l2::get(&mut conn, partition, tenant, key, tip.applied).await.map_err(|e| self.l2_failed(e))?;
        let disagrees = node_disagrees(&tip, &lookup.token.epoch, lookup.token.seq, lookup.nonce_at_applied.as_deref());
        if let Some(why) = disagrees {
            // Not this history: what the node holds may be what an answered
            // invalidation deleted. A miss (the caller reads its database),
            // and the partition catches up with the node, which finds the
            // fork and moves the partition to a new epoch.
            tracing::warn!(
                partition = partition.index,
                why,
                "an L2 read went to a node that lacks invalidations this agent applied"
            );
            m.forked_reads.inc();
            self.0.sync.request_catch_up(partition.index);
            m.misses.l2.inc();
            return Ok(Loaded::Miss { fill_token: lookup.token.encode(), lease: MissLease::Off });
        }
        let found = match lookup.entry {
            // Sealed (see `crate::encryption`): opened here, so that L1 and
            // the caller see the plaintext. One that does not open is a miss:
            // the caller reads its database and fills the key again.
            Some(mut found) => match found.sealed_by.take() {
                // Stored in plaintext although a rule says it is sealed:
                // written before the rule, or by someone who may write to
                // Redis. Not served; the refill seals it.
                None if self.0.encryption.applies(tenant, key) => {
                    tracing::warn!(
                        tenant,
                        "an L2 value an [[encrypt]] rule names is not encrypted: answered as a miss"
                    );
                    m.decrypt_errors.inc();
                    None
                }
                None => Some(found),
                Some(id) => match self.0.encryption.open(tenant, key, &id, &found.value) {
                    Ok(plain) => Some(l2::Entry { value: plain, ..found }),
                    Err(why) => {
                        tracing::warn!(tenant, key_id = %id, %why, "an L2 value did not decrypt: answered as a miss");
                        m.decrypt_errors.inc();
                        None
                    }
                },
            },
            None => None,
        };
        match found {
            Some(found) => {
                m.hits.l2.inc();
                let entry = l1::Entry::new(
                    tenant,
                    key,
                    &found.value,
                    &found.content_type,
                    found.tags,
                    found.depends_on,
                    Duration::from_millis(found.ttl_ms),
                )
                .with_refresh_lead(self.refresh_lead(Duration::from_millis(found.written_ttl_ms)));
                if fill {
                    self.0.l1.insert(entry.clone(), guard);
                }
                Ok(Loaded::Hit(entry))
            }
            None => {
                m.misses.l2.inc();
                let lease_ms = self.0.settings.lease_ms;
                let lease = if lease_ms == 0 || !leased {
                    MissLease::Off
                } else {
                    match l2::take_lease(&mut conn, partition, tenant, key, &lookup.token, lease_ms).await {
                        Ok(l2::Lease::Mine) => MissLease::Mine(Arc::default()),
                        Ok(l2::Lease::Held { left_ms }) => MissLease::Held(Duration::from_millis(left_ms)),
                        Ok(l2::Lease::Filled) => MissLease::Filled,
                        // The miss stands without a lease: its callers load.
                        Err(e) => {
                            tracing::warn!(error = %e, "the fill lease could not be taken");
                            MissLease::Off
                        }
                    }
                };
                Ok(Loaded::Miss { fill_token: lookup.token.encode(), lease })
            }
        }
    }

    /// Stores a value in L2 and in this agent's L1.
    pub async fn put(&self, tenant: &str, key: &str, put: Put) -> Result<(), AgentError> {
        names::validate_tenant(tenant)?;
        names::validate_key(key)?;
        let s = &self.0.settings;
        if put.value.len() > s.max_value_bytes {
            return Err(AgentError::TooLarge { size: put.value.len(), limit: s.max_value_bytes });
        }
        // The key's `[[ttl]]` tier decides the default and the maximum.
        let ttl = self.0.ttl.ttl(tenant, key, put.ttl_secs).map_err(|e| invalid("invalid_ttl", e.to_string()))?;
        for tag in &put.tags {
            names::validate_tag(tag)?;
        }
        for dep in &put.depends_on {
            names::validate_key(dep)
                .map_err(|e| invalid("invalid_depends_on", format!("depends_on: {}", e.message)))?;
        }
        let token = match &put.fill_token {
            None => None,
            Some(token) => Some(FillToken::decode(token).ok_or_else(|| {
                invalid(
                    "invalid_fill_token",
                    "fill_token is not one this service issued; use the X-Cache-Fill-Token of a 404".into(),
                )
            })?),
        };
        let content_type =
            if put.content_type.is_empty() { "application/octet-stream".to_string() } else { put.content_type };

        let guard = self.0.l1.fill_guard(tenant);
        // Sealed when an `[[encrypt]]` rule names the entry: L2 gets only the
        // ciphertext, L1 the plaintext.
        let (value, sealed_by) = match self.0.encryption.seal(tenant, key, &put.value) {
            Some((sealed, id)) => (sealed, Some(id)),
            None => (put.value.to_vec(), None),
        };
        let stored = l2::Entry {
            value,
            content_type: content_type.clone(),
            tags: put.tags.clone(),
            depends_on: put.depends_on.clone(),
            ttl_ms: ttl.as_millis() as u64,
            written_ttl_ms: 0,
            sealed_by,
        };
        let mut conn = self.conn().await?;
        let written =
            l2::put(&mut conn, self.0.layout.of(tenant), tenant, key, &stored, token.as_ref(), self.0.log.sharded)
                .await
                .map_err(|e| self.l2_failed(e))?;
        // Stored, or a refused fill that ended its lease: this agent's
        // waiters for the key read again (other agents hear it from Redis).
        self.0.waiters.wake_key(tenant, key);
        if let Err(stale) = written {
            self.0.usage.event(tenant, Event::StaleFill);
            return Err(AgentError::StaleFill(stale.explain()));
        }
        let entry = l1::Entry::new(tenant, key, &put.value, &content_type, put.tags, put.depends_on, ttl)
            .with_refresh_lead(self.refresh_lead(ttl));
        self.0.l1.insert(entry, guard);
        // The key's next eager refresh is the new entry's.
        let mut refreshing = lock(&self.0.refreshing);
        if !refreshing.is_empty() {
            refreshing.remove(&(tenant.to_string(), key.to_string()));
        }
        drop(refreshing);
        self.0.usage.write(tenant, key, ttl.as_millis() as u64);
        Ok(())
    }

    /// Invalidates a key everywhere, through the same path as the coordinator's,
    /// and drops it (and its dependents) from this agent's L1 at once.
    pub async fn delete(&self, tenant: &str, key: &str) -> Result<Outcome, AgentError> {
        names::validate_tenant(tenant)?;
        names::validate_key(key)?;
        let request = Request {
            items: vec![Selector {
                tenant: tenant.into(),
                keys: vec![key.into()],
                cascade: true,
                ..Selector::default()
            }],
            event_ids: Vec::new(),
            origin: format!("agent@{}", self.0.node_id),
            // Nobody waits for the other agents' acknowledgements of a DELETE.
            ack: false,
        };
        // Not the connection reads share: the path ends with a WAIT.
        let mut conn = self.0.store.writer().await.map_err(|e| self.l2_failed(e))?;
        let partition = self.0.layout.of(tenant);
        // Read-your-writes on this agent; the broadcast applies it again,
        // harmlessly. Also when it is not replicated in time: it is deleted and logged.
        let apply = |selectors: &[Selector]| {
            for selector in selectors {
                self.0.l1.apply_ahead(selector);
            }
        };
        match invalidation::execute(&mut conn, partition, request, &self.0.log).await {
            Ok(outcome) => {
                apply(&outcome.invalidated);
                // Under Sentinel: written to the primary that still is one.
                match self.0.store.still_primary(&conn).await {
                    Ok(true) => Ok(outcome),
                    Ok(false) => Err(self.l2_failed("the primary changed during the DELETE (a failover); retry it")),
                    Err(e) => Err(self.l2_failed(e)),
                }
            }
            Err(e @ InvalidationError::NotReplicated(_)) => {
                apply(&[Selector {
                    tenant: tenant.into(),
                    keys: vec![key.into()],
                    cascade: true,
                    ..Selector::default()
                }]);
                Err(AgentError::NotReplicated(e.to_string()))
            }
            Err(InvalidationError::Redis(e)) => Err(self.l2_failed(e)),
        }
    }

    /// Whether the agent can do its job, or why not: Redis answers, the
    /// subscription is live, and L1 is proven in sync with at least one
    /// partition (the others are listed in the status, and L1 serves none of
    /// their tenants).
    pub fn readiness(&self) -> Result<(), &'static str> {
        let s = &self.0.sync;
        if !s.redis_ok() {
            Err(s.outage().reason())
        } else if !s.subscribed() {
            Err("not_subscribed")
        } else if (0..s.count()).all(|p| !s.in_sync(p)) {
            Err("out_of_sync")
        } else if self.0.warm.warming() {
            Err("warming")
        } else {
            Ok(())
        }
    }

    /// The highest seq of `tenant`'s partition that L1 has applied: what a
    /// tool timing propagation to embedded agents reads (`make bench`).
    pub fn applied_seq(&self, tenant: &str) -> u64 {
        self.0.sync.tip(self.0.layout.of(tenant).index).applied
    }

    /// This agent as `GET /v1/status` shows it.
    pub fn status(&self) -> Status {
        let i = &self.0;
        let m = &i.metrics;
        let l1_hits = crate::metrics::raise(&m.hits.l1, i.usage.l1_hits());
        let l1_misses = m.misses.l1.get();
        let partitions: Vec<PartitionStatus> = i
            .sync
            .cursors()
            .into_iter()
            .enumerate()
            .map(|(p, cursor)| PartitionStatus {
                partition: p as u16,
                in_sync: i.sync.in_sync(p as u16),
                epoch: cursor.epoch,
                applied_seq: cursor.applied,
            })
            .collect();
        Status {
            node_id: i.node_id.clone(),
            addr: i.addr.clone(),
            ready: self.readiness().is_ok(),
            not_ready_reason: self.readiness().err(),
            epoch: epochs_fingerprint(partitions.iter().map(|p| p.epoch.as_str())),
            applied_seq: partitions.iter().map(|p| p.applied_seq).sum(),
            unsynced_partitions: partitions.iter().filter(|p| !p.in_sync).map(|p| p.partition).collect(),
            partitions,
            staleness_bound_ms: i.sync.bound_ms(),
            l1: L1Status {
                entries: i.l1.entries(),
                bytes: i.l1.bytes(),
                capacity: i.l1.capacity(),
                hits: l1_hits,
                misses: l1_misses,
                evictions: i.l1.stats.evictions.load(Ordering::Relaxed),
                hit_ratio: ratio(l1_hits, l1_misses),
            },
            l2: L2Status { hits: m.hits.l2.get(), misses: m.misses.l2.get(), errors: m.l2_errors.get() },
            invalidations: InvalidationStatus {
                applied: m.applied.get(),
                replayed: m.replayed.get(),
                gaps_detected: m.gaps.get(),
                full_flushes: m.flushes.get(),
                forks_detected: m.forks.get(),
                entries_dropped: i.l1.stats.invalidated.load(Ordering::Relaxed),
                fills_refused: i.l1.stats.fills_refused.load(Ordering::Relaxed),
            },
        }
    }
}

/// Locks a std mutex, recovering from poisoning (the data is a plain value).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ratio(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = AgentStatus)]
pub struct Status {
    /// Node id.
    pub node_id: String,
    /// Cache API address.
    pub addr: String,
    /// Ready to serve.
    pub ready: bool,
    /// Why not ready, if not.
    pub not_ready_reason: Option<&'static str>,
    /// The epoch of the one partition, or a fingerprint of every partition's epoch.
    pub epoch: String,
    /// Sum over the partitions of the highest seq applied.
    pub applied_seq: u64,
    /// Partitions L1 cannot prove in sync (it serves none of their tenants).
    pub unsynced_partitions: Vec<u16>,
    /// Each partition: its epoch, applied seq, and whether it is proven in sync.
    pub partitions: Vec<PartitionStatus>,
    /// The staleness bound in force (configured, or lowered below the
    /// coordinators' `node_dead_after_ms`).
    pub staleness_bound_ms: u64,
    /// L1 counters.
    pub l1: L1Status,
    /// L2 counters.
    pub l2: L2Status,
    /// Invalidation counters.
    pub invalidations: InvalidationStatus,
}

/// One partition in the status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionStatus {
    /// Its index.
    pub partition: u16,
    /// The epoch followed.
    pub epoch: String,
    /// Highest seq applied.
    pub applied_seq: u64,
    /// Whether L1 may answer for its tenants.
    pub in_sync: bool,
}

/// L1 part of the status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct L1Status {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// Evictions for room.
    pub evictions: u64,
    /// hits / (hits + misses).
    pub hit_ratio: f64,
}

/// L2 part of the status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct L2Status {
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// Failed calls.
    pub errors: u64,
}

/// Invalidation part of the status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InvalidationStatus {
    /// Messages applied.
    pub applied: u64,
    /// Messages replayed from the log.
    pub replayed: u64,
    /// Gaps detected.
    pub gaps_detected: u64,
    /// Flushes (of one partition or of all L1).
    pub full_flushes: u64,
    /// Forks of a partition's log detected (a failover lost messages applied here).
    pub forks_detected: u64,
    /// L1 entries dropped by invalidations.
    pub entries_dropped: u64,
    /// Fills kept out of L1 because an invalidation raced them.
    pub fills_refused: u64,
}
