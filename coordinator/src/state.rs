//! The coordinator's shared state and the one place where a resolved request
//! runs the invalidation path ([`Coordinator::invalidate`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry};
use serde::Serialize;

use shared::invalidation::{Outcome, Request};
use shared::protocol::Selector;
use shared::service::{register, ApiError};

use crate::barrier::{self, AckBoard, Barrier, Liveness};
use crate::batch::Batcher;
use crate::rules::RuleSet;
use crate::settings::Settings;

/// A cheap-to-clone handle to the coordinator.
#[derive(Clone)]
pub struct Coordinator(Arc<Inner>);

/// Shared state.
pub struct Inner {
    /// Settings it was started with.
    pub settings: Settings,
    /// The checked rules.
    pub rules: RuleSet,
    /// Redis connections.
    pub pool: deadpool_redis::Pool,
    /// For the acknowledgement subscription.
    pub redis: redis::Client,
    /// Agents' newest acknowledgements, for `wait=all`.
    pub acks: AckBoard,
    /// The cluster view shared by every `wait=all` in progress.
    pub liveness: Liveness,
    /// Group commit of concurrent invalidations.
    pub batcher: Batcher,
    /// This process, as recorded in messages it logs.
    pub origin: String,
    /// The last Redis check succeeded.
    pub redis_ok: AtomicBool,
    /// Start time, for uptime.
    pub started: Instant,
    /// Metrics.
    pub metrics: Metrics,
}

/// The coordinator's Prometheus metrics.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Events received.
    pub events: IntCounter,
    /// Invalidations logged.
    pub invalidations: IntCounter,
    /// Entries deleted from L2.
    pub l2_deleted: IntCounter,
    /// Time to run the invalidation path.
    pub invalidation_seconds: Histogram,
    /// Time from logged to every live agent acknowledging (`wait=all`).
    pub barrier_seconds: Histogram,
    /// `wait=all` requests that timed out.
    pub barrier_timeouts: IntCounter,
    /// 1 while Redis answers.
    pub redis_up: IntGauge,
    /// HTTP latency.
    pub http: HistogramVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str| register(&registry, IntCounter::new(name, help).unwrap_or_else(|e| panic!("{e}")));
        Metrics {
            events: counter("dcc_events_total", "Write events received"),
            invalidations: counter("dcc_invalidations_logged_total", "Invalidations logged and broadcast"),
            l2_deleted: counter("dcc_l2_deleted_total", "Entries deleted from L2 by invalidations"),
            invalidation_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dcc_invalidation_duration_seconds",
                        "Time from request to logged and broadcast",
                    )
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            barrier_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dcc_barrier_duration_seconds",
                        "wait=all: time from logged to acknowledged by every live agent",
                    )
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            barrier_timeouts: counter("dcc_barrier_timeouts_total", "wait=all requests answered 504"),
            redis_up: register(
                &registry,
                IntGauge::new("dcc_redis_up", "1 while Redis answers").unwrap_or_else(|e| panic!("{e}")),
            ),
            http: shared::service::http_latency_histogram(&registry),
            registry,
        }
    }
}

/// How many live nodes there are and how many already applied a seq.
#[derive(Debug, Clone, Serialize)]
pub struct NodeCount {
    /// Nodes heard from within `node_dead_after_ms`.
    pub live: usize,
    /// Live nodes whose last report shows the seq applied.
    pub acked: usize,
}

/// The answer to an event or an invalidation.
#[derive(Debug, Clone, Serialize)]
pub struct InvalidationAnswer {
    /// Seq it was logged under.
    pub seq: u64,
    /// Epoch of the log.
    pub epoch: String,
    /// What was invalidated, per tenant.
    pub invalidated: Vec<Selector>,
    /// Entries deleted from L2.
    pub l2_deleted: u64,
    /// Live and acknowledging nodes.
    pub nodes: NodeCount,
    /// True when this repeats an `event_id` already logged: nothing was redone.
    pub duplicate: bool,
}

impl Coordinator {
    /// Builds the state; nothing connects yet.
    pub fn new(settings: Settings, origin: String) -> Result<Coordinator, String> {
        let rules = RuleSet::new(settings.rules.clone())?;
        let pool = shared::service::redis_pool(&settings.redis_url, settings.redis_pool_size)?;
        let redis = redis::Client::open(settings.redis_url.as_str()).map_err(|e| format!("bad redis_url: {e}"))?;
        let batcher = Batcher::new(pool.clone(), settings.log_max_len);
        Ok(Coordinator(Arc::new(Inner {
            settings,
            rules,
            pool,
            redis,
            acks: AckBoard::default(),
            liveness: Liveness::default(),
            batcher,
            origin,
            redis_ok: AtomicBool::new(false),
            started: Instant::now(),
            metrics: Metrics::new(),
        })))
    }

    /// Shared state.
    pub fn inner(&self) -> &Inner {
        &self.0
    }

    /// A pooled Redis connection, or 503.
    pub async fn conn(&self) -> Result<deadpool_redis::Connection, ApiError> {
        self.0.pool.get().await.map_err(|e| self.redis_failed(e))
    }

    /// Records a Redis failure and makes the 503 for it.
    pub fn redis_failed(&self, e: impl std::fmt::Display) -> ApiError {
        self.0.redis_ok.store(false, Ordering::Release);
        self.0.metrics.redis_up.set(0);
        ApiError::redis_unavailable(e)
    }

    /// Runs the invalidation path for a resolved request: delete from L2, log,
    /// broadcast (all in [`shared::invalidation::execute`]); then counts nodes,
    /// or with `wait` (`wait=all`) waits for every live node to apply it.
    pub async fn invalidate(&self, request: Request, wait: Option<Duration>) -> Result<InvalidationAnswer, ApiError> {
        let started = Instant::now();
        // Possibly merged with requests running at the same time (group commit).
        let outcome: Outcome = self.0.batcher.execute(request).await.map_err(|e| self.redis_failed(e))?;
        let m = &self.0.metrics;
        m.invalidation_seconds.observe(started.elapsed().as_secs_f64());
        if !outcome.duplicate {
            m.invalidations.inc();
            m.l2_deleted.inc_by(outcome.l2_deleted);
        }
        let nodes = match wait {
            None => {
                // Informational: who is live (a view up to a second old, shared
                // with every other request) and who has acknowledged already.
                let since = Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or(started);
                let view = self
                    .0
                    .liveness
                    .view_since(&self.0.pool, self.0.settings.node_dead_after_ms, since.into())
                    .await
                    .map_err(|e| self.redis_failed(e))?;
                let live: Vec<_> = view.live().collect();
                let acked = live.iter().filter(|n| {
                    (view.epoch == outcome.epoch && n.in_epoch && n.applied_seq >= outcome.seq)
                        || self.0.acks.covers(&n.node_id, &outcome.epoch, outcome.seq, &view.epoch)
                });
                NodeCount { live: live.len(), acked: acked.count() }
            }
            Some(timeout) => {
                let logged = Instant::now();
                let barrier = barrier::wait_for_all(
                    &self.0.pool,
                    &self.0.acks,
                    &self.0.liveness,
                    self.0.settings.node_dead_after_ms,
                    &outcome.epoch,
                    outcome.seq,
                    timeout,
                )
                .await
                .map_err(|e| self.redis_failed(e))?;
                match barrier {
                    Barrier::Passed { live } => {
                        m.barrier_seconds.observe(logged.elapsed().as_secs_f64());
                        NodeCount { live, acked: live }
                    }
                    Barrier::TimedOut { live, lagging, settling } => {
                        m.barrier_timeouts.inc();
                        let acked = live - lagging.len();
                        let message = if lagging.is_empty() && settling {
                            format!(
                                "seq {} is logged and broadcast, but Redis lost its data less than \
                                 node_dead_after_ms ago: agents that have not registered again since could still \
                                 answer from L1 within the {} ms timeout",
                                outcome.seq,
                                timeout.as_millis()
                            )
                        } else {
                            format!(
                                "seq {} is logged and broadcast, but {} of {live} live agents had not applied it \
                                 within {} ms",
                                outcome.seq,
                                lagging.len(),
                                timeout.as_millis()
                            )
                        };
                        return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
                            .with("seq", outcome.seq.into())
                            .with("epoch", outcome.epoch.into())
                            .with("nodes", serde_json::json!({"live": live, "acked": acked}))
                            .with("lagging", lagging.into()));
                    }
                }
            }
        };
        Ok(InvalidationAnswer {
            seq: outcome.seq,
            epoch: outcome.epoch,
            invalidated: outcome.invalidated,
            l2_deleted: outcome.l2_deleted,
            nodes,
            duplicate: outcome.duplicate,
        })
    }
}
