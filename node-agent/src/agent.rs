//! The agent itself, without HTTP: what an app that embeds the agent calls, and
//! what the HTTP handlers in [`crate::api`] wrap.
//!
//! - [`Agent::get`]: L1, else L2 (filling L1), else a miss with a fill token.
//! - [`Agent::put`]: L2 then L1.
//! - [`Agent::delete`]: the shared invalidation path, then this agent's L1 at once.
//!
//! Background work (subscription, heartbeat) lives in [`crate::sync`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;

use shared::invalidation::{self, Outcome, Request};
use shared::names::{self, InvalidName};
use shared::protocol::{FillToken, Selector};
use shared::{l2, service::ApiError};

use crate::l1::{self, L1};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// A cheap-to-clone handle to one agent.
#[derive(Clone)]
pub struct Agent(pub(crate) Arc<Inner>);

/// The agent's shared state.
pub struct Inner {
    /// Settings it was started with.
    pub settings: Settings,
    /// This node's id.
    pub node_id: String,
    /// Address of its cache API (empty when embedded without HTTP).
    pub addr: String,
    /// Redis connections for reads, writes and invalidations.
    pub pool: deadpool_redis::Pool,
    /// Client for the dedicated subscription connection.
    pub redis: redis::Client,
    /// The in-memory cache.
    pub l1: L1,
    /// How far this agent is in sync with the invalidation log.
    pub sync: SyncState,
    /// Metrics and counters.
    pub metrics: Metrics,
    /// L2 reads in flight, by (tenant, key), with the fill guard they started under.
    pub flights: Mutex<HashMap<(String, String), (l1::FillGuard, Flight)>>,
}

/// One shared L2 read.
pub type Flight = Shared<BoxFuture<'static, Result<Read, String>>>;

/// The moment proofs of sync are counted from (the first use in this process).
static CLOCK_ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Where this agent stands with respect to the invalidation log.
///
/// L1 may answer only while the agent holds a recent *proof* of being in sync:
/// a moment at which it was subscribed and had applied everything the log held.
/// Proofs come from the heartbeat (every `heartbeat_interval_ms`): at once when
/// L1 has applied the head the heartbeat read, or as soon as it has; a proof
/// older than the staleness bound makes L1 untrusted.
#[derive(Debug, Default)]
pub struct SyncState {
    /// Epoch of the log L1 is in sync with (empty until first known).
    pub epoch: Mutex<String>,
    /// Highest seq applied to L1.
    pub applied_seq: AtomicU64,
    /// The subscription is live.
    pub subscribed: AtomicBool,
    /// Counts subscriptions made and lost, so a proof can tell that the
    /// subscription it relied on lasted throughout.
    pub subscription: AtomicU64,
    /// The last heartbeat reached Redis.
    pub redis_ok: AtomicBool,
    /// When the agent last proved it was in sync: nanoseconds after
    /// [`CLOCK_ORIGIN`], 0 for never. An atomic, because every read checks it.
    pub proven_at: AtomicU64,
    /// A heartbeat that found the log head ahead of L1 by messages still on
    /// their way: (when it was sent, the head it read, the subscription).
    /// Applying up to that head proves sync as of the heartbeat.
    pub pending_proof: Mutex<Option<(Instant, u64, u64)>>,
    /// The staleness bound in force: the configured one, lowered below the
    /// coordinators' `node_dead_after_ms` when needed.
    pub bound_ms: AtomicU64,
    /// Wakes the acknowledger when `applied_seq` moves.
    pub applied: tokio::sync::Notify,
    /// Asks the heartbeat to report now (the subscription state changed).
    pub report_now: tokio::sync::Notify,
    /// Asks the subscriber to catch up with the log head now.
    pub catch_up_now: tokio::sync::Notify,
}

impl SyncState {
    /// Whether L1 may answer: a proof of sync younger than the bound.
    pub fn in_sync(&self) -> bool {
        let proven = self.proven_at.load(Ordering::Acquire);
        if proven == 0 {
            return false;
        }
        let age = CLOCK_ORIGIN.elapsed().saturating_sub(Duration::from_nanos(proven - 1));
        age < Duration::from_millis(self.bound_ms.load(Ordering::Acquire))
    }

    /// Records a proof of sync made at `at` (keeps the newest).
    pub fn prove(&self, at: Instant) {
        let Some(since) = at.checked_duration_since(*CLOCK_ORIGIN) else {
            // Older than the origin (forced when the agent is built): no proof.
            return;
        };
        let nanos = since.as_nanos();
        // +1 keeps 0 for "never"; u64 nanoseconds last 584 years.
        self.proven_at.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1, Ordering::AcqRel);
    }
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
        entry: Arc<l1::Entry>,
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
    /// TTL in seconds; `None` means `default_ttl_secs`.
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
        let pool = shared::service::redis_pool(&settings.redis_url, settings.redis_pool_size)?;
        let redis = redis::Client::open(settings.redis_url.as_str()).map_err(|e| format!("bad redis_url: {e}"))?;
        let metrics = Metrics::new();
        metrics.l1_capacity.set(i64::try_from(settings.l1_max_bytes).unwrap_or(i64::MAX));
        LazyLock::force(&CLOCK_ORIGIN);
        let sync = SyncState::default();
        sync.bound_ms.store(settings.staleness_bound_ms, Ordering::Release);
        Ok(Agent(Arc::new(Inner {
            l1: L1::new(settings.l1_max_bytes),
            settings,
            node_id,
            addr,
            pool,
            redis,
            sync,
            metrics,
            flights: Mutex::default(),
        })))
    }

    /// Shared state, for the HTTP layer and the background tasks.
    pub fn inner(&self) -> &Inner {
        &self.0
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.0.node_id
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, AgentError> {
        self.0.pool.get().await.map_err(|e| self.l2_failed(e))
    }

    fn l2_failed(&self, e: impl std::fmt::Display) -> AgentError {
        self.0.metrics.l2_errors.inc();
        AgentError::Unavailable(format!(
            "Redis is unreachable ({e}), and L1 cannot answer: it does not hold this key, or it cannot be \
             proven fresh while the agent is out of sync; retry shortly"
        ))
    }

    /// Reads a key: L1 (while in sync), then L2 (filling L1), else a miss
    /// with a fill token.
    pub async fn get(&self, tenant: &str, key: &str) -> Result<Read, AgentError> {
        names::validate_tenant(tenant)?;
        names::validate_key(key)?;
        let m = &self.0.metrics;
        let trusted = self.0.sync.in_sync();
        if !trusted {
            // Out of sync for longer than the staleness bound: L1 may hold
            // entries invalidated meanwhile, so it neither answers nor fills.
            m.l1_bypassed.inc();
        } else if let Some(entry) = self.0.l1.get(tenant, key) {
            m.hits.l1.inc();
            return Ok(Read::Hit { entry, layer: Layer::L1 });
        }
        m.misses.l1.inc();
        self.read_through(tenant, key, trusted).await
    }

    /// Reads L2 for a key. Concurrent misses for one key share a single L2
    /// read (no reload stampede after a flush), but only a read that started
    /// after the last invalidation applied to the tenant: a caller never gets
    /// a value read before an invalidation it has already seen.
    async fn read_through(&self, tenant: &str, key: &str, fill: bool) -> Result<Read, AgentError> {
        let id = (tenant.to_string(), key.to_string());
        let guard = self.0.l1.fill_guard(tenant);
        let flight = {
            let mut flights = crate::sync::lock(&self.0.flights);
            match flights.get(&id) {
                Some((started, flight)) if *started == guard => flight.clone(),
                _ => {
                    let agent = self.clone();
                    let (t, k) = id.clone();
                    let flight = async move { agent.load(&t, &k, guard, fill).await.map_err(|e| e.to_string()) }
                        .boxed()
                        .shared();
                    flights.insert(id.clone(), (guard, flight.clone()));
                    flight
                }
            }
        };
        let result = flight.clone().await;
        let mut flights = crate::sync::lock(&self.0.flights);
        if flights.get(&id).is_some_and(|(_, f)| f.ptr_eq(&flight)) {
            flights.remove(&id);
        }
        result.map_err(AgentError::Unavailable)
    }

    /// One L2 read; fills L1 if `fill` and no invalidation of the tenant was
    /// applied since `guard` was taken.
    async fn load(&self, tenant: &str, key: &str, guard: l1::FillGuard, fill: bool) -> Result<Read, AgentError> {
        let m = &self.0.metrics;
        let mut conn = self.conn().await?;
        let lookup = l2::get(&mut conn, tenant, key).await.map_err(|e| self.l2_failed(e))?;
        match lookup.entry {
            Some(found) => {
                m.hits.l2.inc();
                let entry = l1::Entry::new(
                    Bytes::from(found.value),
                    &found.content_type,
                    found.tags,
                    found.depends_on,
                    Duration::from_millis(found.ttl_ms),
                );
                if fill {
                    self.0.l1.insert(tenant, key, entry.clone(), guard);
                }
                Ok(Read::Hit { entry: Arc::new(entry), layer: Layer::L2 })
            }
            None => {
                m.misses.l2.inc();
                Ok(Read::Miss { fill_token: lookup.token.encode() })
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
        let ttl_secs = put.ttl_secs.unwrap_or(s.default_ttl_secs);
        if ttl_secs == 0 || ttl_secs > s.max_ttl_secs {
            return Err(invalid("invalid_ttl", format!("ttl must be between 1 and {} seconds", s.max_ttl_secs)));
        }
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
        let stored = l2::Entry {
            value: put.value.to_vec(),
            content_type: content_type.clone(),
            tags: put.tags.clone(),
            depends_on: put.depends_on.clone(),
            ttl_ms: ttl_secs * 1000,
        };
        let mut conn = self.conn().await?;
        l2::put(&mut conn, tenant, key, &stored, token.as_ref())
            .await
            .map_err(|e| self.l2_failed(e))?
            .map_err(|stale| AgentError::StaleFill(stale.explain()))?;
        let entry = l1::Entry::new(put.value, &content_type, put.tags, put.depends_on, Duration::from_secs(ttl_secs));
        self.0.l1.insert(tenant, key, entry, guard);
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
        };
        let mut conn = self.conn().await?;
        let outcome = invalidation::execute(&mut conn, request, self.0.settings.log_max_len)
            .await
            .map_err(|e| self.l2_failed(e))?;
        // Read-your-writes on this agent; the broadcast applies it again, harmlessly.
        for selector in &outcome.invalidated {
            self.0.l1.apply(selector);
        }
        Ok(outcome)
    }

    /// Whether the agent can do its job, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        let s = &self.0.sync;
        if !s.redis_ok.load(Ordering::Acquire) {
            Err("redis_unreachable")
        } else if !s.subscribed.load(Ordering::Acquire) {
            Err("not_subscribed")
        } else if !s.in_sync() {
            Err("out_of_sync")
        } else {
            Ok(())
        }
    }

    /// This agent as `GET /v1/status` shows it.
    pub fn status(&self) -> Status {
        let i = &self.0;
        let m = &i.metrics;
        let l1_hits = m.hits.l1.get();
        let l1_misses = m.misses.l1.get();
        Status {
            node_id: i.node_id.clone(),
            addr: i.addr.clone(),
            ready: self.readiness().is_ok(),
            not_ready_reason: self.readiness().err(),
            epoch: crate::sync::lock(&i.sync.epoch).clone(),
            applied_seq: i.sync.applied_seq.load(Ordering::Acquire),
            staleness_bound_ms: i.sync.bound_ms.load(Ordering::Acquire),
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
                entries_dropped: i.l1.stats.invalidated.load(Ordering::Relaxed),
                fills_refused: i.l1.stats.fills_refused.load(Ordering::Relaxed),
            },
        }
    }
}

fn ratio(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Node id.
    pub node_id: String,
    /// Cache API address.
    pub addr: String,
    /// Ready to serve.
    pub ready: bool,
    /// Why not ready, if not.
    pub not_ready_reason: Option<&'static str>,
    /// Epoch in sync with.
    pub epoch: String,
    /// Highest seq applied.
    pub applied_seq: u64,
    /// Configured staleness bound.
    pub staleness_bound_ms: u64,
    /// L1 counters.
    pub l1: L1Status,
    /// L2 counters.
    pub l2: L2Status,
    /// Invalidation counters.
    pub invalidations: InvalidationStatus,
}

/// L1 part of the status.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct L2Status {
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// Failed calls.
    pub errors: u64,
}

/// Invalidation part of the status.
#[derive(Debug, Clone, Serialize)]
pub struct InvalidationStatus {
    /// Messages applied.
    pub applied: u64,
    /// Messages replayed from the log.
    pub replayed: u64,
    /// Gaps detected.
    pub gaps_detected: u64,
    /// Full flushes.
    pub full_flushes: u64,
    /// L1 entries dropped by invalidations.
    pub entries_dropped: u64,
    /// Fills kept out of L1 because an invalidation raced them.
    pub fills_refused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_is_trusted_only_with_a_proof_younger_than_the_bound() {
        LazyLock::force(&CLOCK_ORIGIN);
        let sync = SyncState::default();
        sync.bound_ms.store(60_000, Ordering::Release);
        assert!(!sync.in_sync(), "no proof yet");

        let now = Instant::now();
        sync.prove(now);
        assert!(sync.in_sync());
        // An older proof never replaces a newer one.
        sync.prove(now - Duration::from_millis(1));
        assert_eq!(sync.proven_at.load(Ordering::Acquire), now.duration_since(*CLOCK_ORIGIN).as_nanos() as u64 + 1);

        // Past the bound, the same proof no longer counts.
        sync.bound_ms.store(1, Ordering::Release);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!sync.in_sync());
    }

    #[test]
    fn a_proof_from_before_the_clock_origin_is_ignored() {
        LazyLock::force(&CLOCK_ORIGIN);
        let sync = SyncState::default();
        sync.bound_ms.store(u64::MAX / 2, Ordering::Release);
        let before = CLOCK_ORIGIN.checked_sub(Duration::from_secs(1)).expect("the monotonic clock is over 1 s old");
        sync.prove(before);
        assert!(!sync.in_sync());
    }
}
