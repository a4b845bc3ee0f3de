//! The agent's Prometheus metrics. The counters are also the source of the
//! numbers in `GET /v1/status`, so the two never disagree.

use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use shared::service::register;

/// Every metric the agent exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Hits per layer (`l1`, `l2`). The L1 count is raised to
    /// `Usage::l1_hits` when read (`/metrics`, the status), never on a hit.
    pub hits: ByLayer,
    /// Misses per layer (`l1`, `l2`).
    pub misses: ByLayer,
    /// Failed L2 calls.
    pub l2_errors: IntCounter,
    /// Reads that waited for another miss's fill (the key's lease).
    pub lease_waits: IntCounter,
    /// Hits that carried an eager-refresh hint (`X-Cache-Refresh: 1`).
    pub refresh_hints: IntCounter,
    /// Entries loaded into L1 by warm-ups (see `crate::warm`).
    pub warm_loaded: IntCounter,
    /// How long the last complete warm-up took.
    pub warm_seconds: Gauge,
    /// Reads answered `X-Cache: STALE` (stale-if-error while Redis was unreachable).
    pub stale_answers: IntCounter,
    /// Reads that skipped L1 because the agent was out of sync beyond the staleness bound.
    pub l1_bypassed: IntCounter,
    /// Bytes in L1 (set when scraped).
    pub l1_bytes: IntGauge,
    /// Entries in L1 (set when scraped).
    pub l1_entries: IntGauge,
    /// Capacity of L1 in bytes.
    pub l1_capacity: IntGauge,
    /// Entries evicted from L1 for room (set when scraped).
    pub l1_evictions: IntGauge,
    /// Invalidation messages applied to L1 (live or replayed).
    pub applied: IntCounter,
    /// Messages applied from the log after a gap.
    pub replayed: IntCounter,
    /// Gaps in sequence numbers detected.
    pub gaps: IntCounter,
    /// Flushes of L1 (one partition's tenants, or all).
    pub flushes: IntCounter,
    /// Forks of a partition's log detected.
    pub forks: IntCounter,
    /// L2 reads not served: the node lacked invalidations this agent applied.
    pub forked_reads: IntCounter,
    /// L2 values that did not decrypt (answered as misses).
    pub decrypt_errors: IntCounter,
    /// Highest seq applied.
    pub applied_seq: IntGauge,
    /// 1 when ready.
    pub ready: IntGauge,
    /// From an invalidation being logged to this agent applying it.
    pub propagation_lag: Histogram,
    /// HTTP latency.
    pub http: HistogramVec,
    /// Open connections to the Redis protocol port.
    pub resp_connections: IntGauge,
    /// Commands on the Redis protocol port.
    pub resp_commands: RespCommands,
    /// Per-tenant hits and misses, only with `[metrics] tenant_labels = true`.
    pub tenants: Option<ByTenant>,
}

/// Commands on the Redis protocol port by kind (the `command` label), each
/// counter looked up once, as [`ByLayer`]'s are.
pub struct RespCommands {
    /// `GET`.
    get: IntCounter,
    /// `MGET`.
    mget: IntCounter,
    /// `SET`.
    set: IntCounter,
    /// `DEL`, `UNLINK`.
    del: IntCounter,
    /// `EXISTS`, `TTL`, `PTTL`.
    exists: IntCounter,
    /// `PING`, `AUTH`, `HELLO` and the other connection commands.
    connection: IntCounter,
    /// Anything else (answered `-ERR unknown command`).
    unknown: IntCounter,
}

impl RespCommands {
    /// Counts one command, by its name in capitals.
    pub fn count(&self, name: &[u8]) {
        match name {
            b"GET" => &self.get,
            b"MGET" => &self.mget,
            b"SET" => &self.set,
            b"DEL" | b"UNLINK" => &self.del,
            b"EXISTS" | b"TTL" | b"PTTL" => &self.exists,
            b"PING" | b"ECHO" | b"AUTH" | b"HELLO" | b"CLIENT" | b"SELECT" | b"COMMAND" | b"INFO" | b"QUIT" => {
                &self.connection
            }
            _ => &self.unknown,
        }
        .inc();
    }
}

/// Hits and misses with a `tenant` label. Copied from the per-tenant tally
/// (`crate::usage`) when `/metrics` is scraped, never counted on the read
/// path: a label lookup there would cost every hit a hash and a lock.
pub struct ByTenant {
    /// `dcc_tenant_cache_hits_total{tenant, layer}`.
    pub hits: IntCounterVec,
    /// `dcc_tenant_cache_misses_total{tenant}`.
    pub misses: IntCounterVec,
}

impl ByTenant {
    /// Brings the counters up to the tally's (L1 hits, L2 hits, misses) per tenant.
    pub fn update(&self, totals: &std::collections::HashMap<String, [u64; 3]>) {
        for (tenant, [l1, l2, misses]) in totals {
            raise(&self.hits.with_label_values(&[tenant.as_str(), "l1"]), *l1);
            raise(&self.hits.with_label_values(&[tenant.as_str(), "l2"]), *l2);
            raise(&self.misses.with_label_values(&[tenant.as_str()]), *misses);
        }
    }
}

/// Raises `counter` to `to` (a total counted elsewhere, such as the L1 hits
/// of `crate::usage`); returns its value.
pub fn raise(counter: &IntCounter, to: u64) -> u64 {
    counter.inc_by(to.saturating_sub(counter.get()));
    counter.get()
}

/// One counter per cache layer (the `layer` label), each looked up once here:
/// a label lookup on every read would cost a hash and a lock on the hit path.
pub struct ByLayer {
    /// `layer="l1"`.
    pub l1: IntCounter,
    /// `layer="l2"`.
    pub l2: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric (none with a tenant label).
    pub fn new() -> Self {
        Self::with_tenant_labels(false)
    }

    /// Creates and registers every metric; with `tenant_labels`, the
    /// per-tenant hit and miss counters too.
    pub fn with_tenant_labels(tenant_labels: bool) -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str| {
            let vec = register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &["layer"]).unwrap_or_else(|e| panic!("{e}")),
            );
            ByLayer { l1: vec.with_label_values(&["l1"]), l2: vec.with_label_values(&["l2"]) }
        };
        let counter =
            |name: &str, help: &str| register(&registry, IntCounter::new(name, help).unwrap_or_else(|e| panic!("{e}")));
        let gauge =
            |name: &str, help: &str| register(&registry, IntGauge::new(name, help).unwrap_or_else(|e| panic!("{e}")));
        Metrics {
            hits: counter_vec("dcc_cache_hits_total", "Cache hits by layer"),
            misses: counter_vec("dcc_cache_misses_total", "Cache misses by layer"),
            l2_errors: counter("dcc_l2_errors_total", "Redis calls that failed"),
            warm_loaded: counter(
                "dcc_warm_loaded_total",
                "Entries loaded into L1 from the cluster's hot set by warm-ups",
            ),
            warm_seconds: register(
                &registry,
                Gauge::new("dcc_warm_seconds", "How long the last complete warm-up took")
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            refresh_hints: counter(
                "dcc_refresh_hints_total",
                "Hits past refresh_ahead of their TTL that were handed a fill token to reload the entry early",
            ),
            stale_answers: counter(
                "dcc_stale_answers_total",
                "Reads answered from L1 past its staleness bound (stale-if-error) while Redis was unreachable",
            ),
            lease_waits: counter(
                "dcc_lease_waits_total",
                "Reads of a missing key that waited for another miss's fill (its lease) instead of loading it too",
            ),
            l1_bypassed: counter(
                "dcc_l1_bypassed_total",
                "Reads that skipped L1 because the agent could not prove it was in sync within the staleness bound",
            ),
            l1_bytes: gauge("dcc_l1_bytes", "Bytes held in L1, keys and values counted"),
            l1_entries: gauge("dcc_l1_entries", "Entries held in L1"),
            l1_capacity: gauge("dcc_l1_capacity_bytes", "L1 capacity in bytes"),
            l1_evictions: gauge("dcc_l1_evictions_total", "Entries evicted from L1 to make room"),
            applied: counter("dcc_invalidations_applied_total", "Invalidation messages applied to L1"),
            replayed: counter("dcc_invalidations_replayed_total", "Invalidation messages replayed from the log"),
            gaps: counter("dcc_invalidation_gaps_total", "Gaps in sequence numbers detected"),
            flushes: counter("dcc_l1_flushes_total", "Flushes of L1 (one partition's tenants, or all)"),
            forks: counter(
                "dcc_log_forks_total",
                "Forks of a partition's log detected (a failover lost applied messages)",
            ),
            forked_reads: counter(
                "dcc_l2_forked_reads_total",
                "L2 reads answered as misses: the node read lacked invalidations this agent applied",
            ),
            decrypt_errors: counter(
                "dcc_decrypt_errors_total",
                "Sealed L2 values that did not decrypt (unknown key id, wrong key, altered bytes): answered as misses",
            ),
            applied_seq: gauge("dcc_applied_seq", "Highest invalidation seq applied"),
            ready: gauge("dcc_ready", "1 when the agent is ready"),
            propagation_lag: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dcc_propagation_lag_seconds",
                        "Time from an invalidation being logged to this agent applying it",
                    )
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            http: shared::service::http_latency_histogram(&registry),
            resp_connections: gauge("dcc_resp_connections", "Open connections to the Redis protocol port"),
            resp_commands: {
                let vec = register(
                    &registry,
                    IntCounterVec::new(
                        Opts::new("dcc_resp_commands_total", "Commands on the Redis protocol port by kind"),
                        &["command"],
                    )
                    .unwrap_or_else(|e| panic!("{e}")),
                );
                let kind = |name: &str| vec.with_label_values(&[name]);
                RespCommands {
                    get: kind("get"),
                    mget: kind("mget"),
                    set: kind("set"),
                    del: kind("del"),
                    exists: kind("exists"),
                    connection: kind("connection"),
                    unknown: kind("unknown"),
                }
            },
            tenants: tenant_labels.then(|| {
                let vec = |name: &str, help: &str, labels: &[&str]| {
                    register(
                        &registry,
                        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{e}")),
                    )
                };
                ByTenant {
                    hits: vec("dcc_tenant_cache_hits_total", "Cache hits by tenant and layer", &["tenant", "layer"]),
                    misses: vec(
                        "dcc_tenant_cache_misses_total",
                        "Reads cached in neither layer, by tenant",
                        &["tenant"],
                    ),
                }
            }),
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
