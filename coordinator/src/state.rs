//! The coordinator's shared state and the one place where a resolved request
//! runs the invalidation path ([`Coordinator::invalidate`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry};
use serde::Serialize;

use shared::invalidation::{LogSettings, Outcome, Request};
use shared::protocol::{Position, Selector};
use shared::schema::Layout;
use shared::service::{register, ApiError};
use shared::store::{Conn, Store};

use crate::barrier::{self, AckBoard, Barrier, Liveness, Waiting};
use crate::batch::{BatchError, Batcher};
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
    /// How tenants map to partitions.
    pub layout: Layout,
    /// How the log is kept, broadcast and replicated.
    pub log: LogSettings,
    /// The last position this coordinator appended in each partition, until
    /// its fork check looks at it.
    appended: Mutex<Vec<Option<Position>>>,
    /// Redis (one server or a cluster): connections and subscriptions.
    pub store: Store,
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
    /// Why the last check of Redis failed ([`shared::store::Outage::code`]).
    pub outage: std::sync::atomic::AtomicU8,
    /// Start time, for uptime.
    pub started: Instant,
    /// Metrics.
    pub metrics: Metrics,
    /// Each `[[sources]]`' state, in the settings' order.
    pub sources: Vec<crate::source::Status>,
    /// Cancelled when shutdown begins: ends the endless answers (the
    /// invalidation stream) so that the graceful stop does not wait for them.
    pub closing: tokio_util::sync::CancellationToken,
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
    /// Invalidations answered `not_replicated`.
    pub not_replicated: IntCounter,
    /// Forks of a partition's log this coordinator found.
    pub forks: IntCounter,
    /// 1 while Redis answers.
    pub redis_up: IntGauge,
    /// HTTP latency.
    pub http: HistogramVec,
    /// The sources' figures.
    pub sources: crate::source::SourceMetrics,
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
            not_replicated: counter(
                "dcc_not_replicated_total",
                "Invalidations answered 503 not_replicated (min_replicas not reached in time)",
            ),
            forks: counter("dcc_log_forks_total", "Forks of a partition's log found by this coordinator"),
            redis_up: register(
                &registry,
                IntGauge::new("dcc_redis_up", "1 while Redis answers").unwrap_or_else(|e| panic!("{e}")),
            ),
            http: shared::service::http_latency_histogram(&registry),
            sources: crate::source::SourceMetrics::new(&registry),
            registry,
        }
    }
}

/// How many live nodes there are and how many already applied an invalidation.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeCount {
    /// Nodes heard from within `node_dead_after_ms`.
    pub live: usize,
    /// Live nodes that have applied it in every partition it touched.
    pub acked: usize,
}

/// The answer to an event or an invalidation.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InvalidationAnswer {
    /// Seq it was logged under, when it touched one partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Epoch of that partition's log, when it touched one partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// That partition, when it touched one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u16>,
    /// Where it was logged in each partition it touched.
    pub positions: Vec<Position>,
    /// What was invalidated, per tenant.
    pub invalidated: Vec<Selector>,
    /// Entries deleted from L2.
    pub l2_deleted: u64,
    /// Live and acknowledging nodes.
    pub nodes: NodeCount,
    /// True when this repeats event ids already logged: nothing was redone.
    pub duplicate: bool,
}

/// The top-level `seq`, `epoch` and `partition` of one position, for answers.
fn single(positions: &[Position]) -> (Option<u64>, Option<String>, Option<u16>) {
    match positions {
        [one] => (Some(one.seq), Some(one.epoch.clone()), Some(one.partition)),
        _ => (None, None, None),
    }
}

impl Coordinator {
    /// Builds the state; nothing connects yet.
    pub fn new(settings: Settings, origin: String) -> Result<Coordinator, String> {
        let rules = RuleSet::new(settings.rules.clone())?;
        let store = Store::open_with(&settings.redis_url, settings.redis_pool_size, &settings.redis_access())?;
        let layout = Layout::new(settings.partitions);
        let log = LogSettings {
            max_len: settings.log_max_len,
            sharded: store.sharded(),
            min_replicas: settings.min_replicas,
            replica_timeout_ms: settings.replica_timeout_ms,
        };
        let batcher = Batcher::new(store.clone(), layout.clone(), log.clone());
        let sources = settings.sources.iter().map(crate::source::Status::new).collect();
        Ok(Coordinator(Arc::new(Inner {
            appended: Mutex::new(vec![None; usize::from(layout.count())]),
            settings,
            rules,
            layout,
            log,
            store,
            acks: AckBoard::default(),
            liveness: Liveness::default(),
            batcher,
            origin,
            redis_ok: AtomicBool::new(false),
            outage: std::sync::atomic::AtomicU8::new(0),
            started: Instant::now(),
            sources,
            metrics: Metrics::new(),
            closing: tokio_util::sync::CancellationToken::new(),
        })))
    }

    /// Shared state.
    pub fn inner(&self) -> &Inner {
        &self.0
    }

    /// A pooled Redis connection, or 503.
    pub async fn conn(&self) -> Result<Conn, ApiError> {
        self.0.store.get().await.map_err(|e| self.redis_failed(e))
    }

    /// Records a Redis failure and makes the 503 for it.
    pub fn redis_failed(&self, e: impl std::fmt::Display) -> ApiError {
        self.0.redis_ok.store(false, Ordering::Release);
        self.0.metrics.redis_up.set(0);
        ApiError::redis_unavailable(e)
    }

    /// What the barrier reads.
    fn waiting(&self) -> Waiting<'_> {
        let i = &self.0;
        Waiting {
            store: &i.store,
            layout: &i.layout,
            board: &i.acks,
            liveness: &i.liveness,
            node_dead_after_ms: i.settings.node_dead_after_ms,
        }
    }

    /// Runs the invalidation path for a resolved request: split by
    /// partition, each part deleted from L2, logged, broadcast and replicated
    /// ([`shared::invalidation::execute`], through its partition's lane),
    /// the parts side by side; then counts nodes, or with `wait`
    /// (`wait=all`) waits for every live node to apply every part.
    pub async fn invalidate(
        &self,
        mut request: Request,
        wait: Option<Duration>,
    ) -> Result<InvalidationAnswer, ApiError> {
        let started = Instant::now();
        // Agents publish their acknowledgements only of messages someone waits for.
        request.ack = wait.is_some();
        let parts = request.split(&self.0.layout);
        let runs = parts.into_iter().map(|(partition, part)| self.0.batcher.execute(partition, part));
        let results = futures_util::future::join_all(runs).await;
        let m = &self.0.metrics;
        m.invalidation_seconds.observe(started.elapsed().as_secs_f64());

        let mut outcomes: Vec<Outcome> = Vec::with_capacity(results.len());
        let mut unreplicated = Vec::new();
        let mut failure = None;
        for result in results {
            match result {
                Ok(outcome) => outcomes.push(outcome),
                Err(BatchError::NotReplicated(e)) => unreplicated.push(e),
                Err(e) => failure = Some(e),
            }
        }
        for outcome in outcomes.iter().filter(|o| !o.duplicate) {
            m.invalidations.inc();
            m.l2_deleted.inc_by(outcome.l2_deleted);
            self.remember_appended(&outcome.position);
        }
        if let Some(e) = failure {
            return Err(self.redis_failed(e));
        }
        if !unreplicated.is_empty() {
            m.not_replicated.inc();
            let positions: Vec<Position> = outcomes
                .iter()
                .map(|o| o.position.clone())
                .chain(unreplicated.iter().map(|e| e.position.clone()))
                .collect();
            let detail: Vec<String> = unreplicated
                .iter()
                .map(|e| {
                    format!(
                        "partition {} seq {}: {} of {} replicas",
                        e.position.partition, e.position.seq, e.reached, e.wanted
                    )
                })
                .collect();
            let (seq, epoch, _) = single(&positions);
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_replicated",
                format!(
                    "deleted from L2, logged and broadcast, but not held by enough replicas within {} ms ({}): a \
                     failover could undo it; retry it, with the same event_id",
                    self.0.settings.replica_timeout_ms,
                    detail.join("; ")
                ),
            )
            .with("positions", serde_json::json!(positions));
            if let (Some(seq), Some(epoch)) = (seq, epoch) {
                err = err.with("seq", seq.into()).with("epoch", epoch.into());
            }
            return Err(err);
        }

        let positions: Vec<Position> = outcomes.iter().map(|o| o.position.clone()).collect();
        let nodes = match wait {
            None => self.count_applied(&positions, started).await?,
            Some(timeout) => self.wait_for_all(&positions, timeout).await?,
        };
        let (seq, epoch, partition) = single(&positions);
        Ok(InvalidationAnswer {
            seq,
            epoch,
            partition,
            duplicate: !outcomes.is_empty() && outcomes.iter().all(|o| o.duplicate),
            l2_deleted: outcomes.iter().map(|o| o.l2_deleted).sum(),
            invalidated: outcomes.into_iter().flat_map(|o| o.invalidated).collect(),
            positions,
            nodes,
        })
    }

    /// Informational: who is live (a view up to a second old, shared with
    /// every other request) and who has applied the positions already.
    async fn count_applied(&self, positions: &[Position], started: Instant) -> Result<NodeCount, ApiError> {
        let i = &self.0;
        let since = tokio::time::Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or(started.into());
        let view = i
            .liveness
            .view_since(&i.store, &i.layout, &i.acks, i.settings.node_dead_after_ms, since)
            .await
            .map_err(|e| self.redis_failed(e))?;
        let mut count = NodeCount { live: 0, acked: 0 };
        let mut facts = barrier::LogFacts::default();
        for node in view.live() {
            count.live += 1;
            let applied = i.acks.has_applied_all(&i.store, &i.layout, &mut facts, &view, node, positions).await;
            if applied.map_err(|e| self.redis_failed(e))? {
                count.acked += 1;
            }
        }
        Ok(count)
    }

    /// `wait=all`: every live node has applied every position, or a 504.
    async fn wait_for_all(&self, positions: &[Position], timeout: Duration) -> Result<NodeCount, ApiError> {
        let m = &self.0.metrics;
        let logged = Instant::now();
        let barrier =
            barrier::wait_for_all(&self.waiting(), positions, timeout).await.map_err(|e| self.redis_failed(e))?;
        match barrier {
            Barrier::Passed { live } => {
                m.barrier_seconds.observe(logged.elapsed().as_secs_f64());
                Ok(NodeCount { live, acked: live })
            }
            Barrier::TimedOut { live, lagging, settling } => {
                m.barrier_timeouts.inc();
                let acked = live - lagging.len();
                let what = match positions {
                    [one] => format!("seq {}", one.seq),
                    all => format!("the invalidation ({} partitions)", all.len()),
                };
                let message = if lagging.is_empty() && settling {
                    format!(
                        "{what} is logged and broadcast, but Redis lost the node registry less than \
                         node_dead_after_ms ago: agents that have not registered again since could still \
                         answer from L1 within the {} ms timeout",
                        timeout.as_millis()
                    )
                } else {
                    format!(
                        "{what} is logged and broadcast, but {} of {live} live agents had not applied it within {} ms",
                        lagging.len(),
                        timeout.as_millis()
                    )
                };
                let (seq, epoch, _) = single(positions);
                let mut err = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
                    .with("positions", serde_json::json!(positions))
                    .with("nodes", serde_json::json!({"live": live, "acked": acked}))
                    .with("lagging", lagging.into());
                if let (Some(seq), Some(epoch)) = (seq, epoch) {
                    err = err.with("seq", seq.into()).with("epoch", epoch.into());
                }
                Err(err)
            }
        }
    }

    /// Keeps the last position this coordinator appended in each partition,
    /// for its own fork check ([`crate::server`]).
    fn remember_appended(&self, position: &Position) {
        let mut appended = self.0.appended.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = appended.get_mut(usize::from(position.partition)) {
            let newer = slot.as_ref().is_none_or(|old| old.epoch != position.epoch || old.seq < position.seq);
            if newer {
                *slot = Some(position.clone());
            }
        }
    }

    /// Takes the positions remembered by [`Self::remember_appended`].
    pub fn take_appended(&self) -> Vec<Position> {
        let mut appended = self.0.appended.lock().unwrap_or_else(|p| p.into_inner());
        appended.iter_mut().filter_map(Option::take).collect()
    }
}
