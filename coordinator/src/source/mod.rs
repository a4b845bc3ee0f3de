//! Write events from a database's commit log: `[[sources]]` of kind
//! `postgres` follow PostgreSQL through logical replication, so that every
//! committed row change is invalidated, also the writes no app reported.
//!
//! From a row change to an L1 entry disappearing:
//! 1. [`postgres::follow`] reads the slot: `BEGIN`, row changes, `COMMIT`;
//! 2. each change of a `[[sources.tables]]` table becomes a row of a
//!    [`txn::Txn`] (tenant, entity, id);
//! 3. at `COMMIT` the transaction becomes one request through the rules, as a
//!    posted event would, and runs the invalidation path
//!    ([`crate::state::Coordinator::invalidate`]): L2, log, broadcast; agents
//!    drop their L1 entries from the broadcast;
//! 4. once that is answered, and only then, the commit's position is
//!    confirmed to PostgreSQL. A crash before that replays the transaction;
//!    its `event_id`, made from its commit position, keeps it from being
//!    logged twice.
//!
//! One coordinator at a time consumes a slot: the one holding its lease in
//! Redis ([`lease`]). PostgreSQL itself refuses a second consumer, so the
//! lease only spares the others from retrying against it.

pub mod lease;
pub mod postgres;
mod setup;
pub mod txn;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use pgwire_replication::ReplicationMetrics;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use shared::names;
use shared::service::register;

/// One `[[sources]]` table. (Its `Debug` leaves the URL's password out.)
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// `postgres`, the only kind so far.
    pub kind: String,
    /// `postgres://user[:password]@host[:port]/database[?sslmode=...]`; the
    /// role needs `REPLICATION` (and owns the tables, or the publication exists).
    pub url: String,
    /// The logical replication slot (created if missing).
    #[serde(default = "dcc")]
    pub slot: String,
    /// The publication (created if missing, and given the tables it lacks).
    #[serde(default = "dcc")]
    pub publication: String,
    /// Past this many distinct rows, a transaction invalidates the entities it
    /// changed as a whole instead of row by row.
    #[serde(default = "default_max_rows")]
    pub max_rows_per_transaction: usize,
    /// How often the position answered is sent to PostgreSQL (its slot then
    /// frees the WAL before it); a crash replays at most this much.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// The tables followed.
    #[serde(default)]
    pub tables: Vec<TableSettings>,
}

impl std::fmt::Debug for SourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut url = url::Url::parse(&self.url).ok();
        if let Some(url) = url.as_mut().filter(|u| u.password().is_some()) {
            // Err only for URLs that cannot have a password.
            let _ = url.set_password(Some("***"));
        }
        f.debug_struct("SourceSettings")
            .field("kind", &self.kind)
            .field("url", &url.map_or("(not a URL)".to_string(), |u| u.to_string()))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("max_rows_per_transaction", &self.max_rows_per_transaction)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("tables", &self.tables)
            .finish()
    }
}

fn default_status_interval_ms() -> u64 {
    1000
}

fn dcc() -> String {
    "dcc".into()
}

fn default_max_rows() -> usize {
    1000
}

/// One `[[sources.tables]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSettings {
    /// `schema.table` (`public.` when no schema is given).
    pub table: String,
    /// The event's entity: the rules apply as for posted events.
    pub entity: String,
    /// The column holding the event's id (default: the one-column primary key).
    pub id_column: Option<String>,
    /// The column holding the tenant.
    pub tenant_column: Option<String>,
    /// The tenant of every row (a single-tenant table).
    pub tenant: Option<String>,
}

impl TableSettings {
    /// `schema.table`.
    pub fn qualified(&self) -> String {
        if self.table.contains('.') {
            self.table.clone()
        } else {
            format!("public.{}", self.table)
        }
    }
}

/// A plain SQL identifier: what a name in `[[sources]]` may be, so that it
/// can be written into SQL without quoting.
fn identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

impl SourceSettings {
    /// Every problem with this source, named.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let at = format!("source {:?}", self.slot);
        if self.kind != "postgres" {
            problems.push(format!("{at}: kind {:?} is unknown; the kind is \"postgres\"", self.kind));
        }
        if let Err(e) = postgres::ConnectSettings::parse(&self.url) {
            problems.push(format!("{at}: url: {e}"));
        }
        if !identifier(&self.slot) {
            problems.push(format!("{at}: slot must be 1 to 63 of [a-z0-9_], starting with a letter or _"));
        }
        if !identifier(&self.publication) {
            problems.push(format!("{at}: publication must be 1 to 63 of [a-z0-9_], starting with a letter or _"));
        }
        if !(100..=60_000).contains(&self.status_interval_ms) {
            problems.push(format!("{at}: status_interval_ms must be between 100 and 60000"));
        }
        if self.max_rows_per_transaction == 0 {
            problems.push(format!("{at}: max_rows_per_transaction must be at least 1"));
        }
        if self.tables.is_empty() {
            problems.push(format!("{at}: give at least one [[sources.tables]]"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tables {
            let table = t.qualified();
            let parts: Vec<&str> = table.split('.').collect();
            if parts.len() != 2 || !parts.iter().all(|p| identifier(p)) {
                problems.push(format!("{at}: table {:?} must be schema.table of plain lower-case names", t.table));
            }
            if !seen.insert(table.clone()) {
                problems.push(format!("{at}: table {table} is listed twice"));
            }
            if names::validate_tag(&t.entity).is_err() {
                problems.push(format!("{at}: table {table}: entity {:?} is not a valid entity name", t.entity));
            }
            for column in [&t.id_column, &t.tenant_column].into_iter().flatten() {
                if !identifier(column) {
                    problems.push(format!("{at}: table {table}: column {column:?} must be a plain lower-case name"));
                }
            }
            match (&t.tenant_column, &t.tenant) {
                (Some(_), Some(_)) => {
                    problems.push(format!("{at}: table {table}: give tenant_column or tenant, not both"))
                }
                (None, None) => problems.push(format!("{at}: table {table}: give tenant_column or tenant")),
                (None, Some(tenant)) => {
                    if let Err(e) = names::validate_tenant(tenant) {
                        problems.push(format!("{at}: table {table}: tenant: {}", e.message));
                    }
                }
                (Some(_), None) => {}
            }
        }
        problems
    }
}

/// What `GET /v1/cluster/health` shows of a source.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct SourceHealth {
    /// `postgres`.
    pub kind: String,
    /// The replication slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// This coordinator streams from the slot now.
    pub connected: bool,
    /// This coordinator holds the slot's lease (it consumes, or is connecting).
    pub active: bool,
    /// The last position this coordinator confirmed to PostgreSQL (`X/Y`):
    /// sent to it, which happens within a second of the invalidation's answer.
    pub confirmed_lsn: Option<String>,
    /// WAL the server has that is not confirmed yet, in bytes (while connected).
    pub lag_bytes: Option<u64>,
    /// How far behind the commits the invalidations are: from the oldest
    /// commit not yet answered (or the last one answered) to its answer, in ms.
    pub lag_ms: Option<u64>,
    /// Why the source is not connected, when it is not.
    pub error: Option<String>,
    /// Transactions read since the start.
    pub transactions: u64,
    /// Row changes read since the start.
    pub changes: u64,
}

/// A source's live state, written by its task and read by the API.
pub struct Status {
    state: Mutex<State>,
    /// `postgres`.
    kind: String,
    /// The slot, the metrics' label.
    slot: String,
    /// The publication.
    publication: String,
}

/// See [`SourceHealth`]; positions as numbers.
#[derive(Default)]
struct State {
    connected: bool,
    active: bool,
    /// Where the slot stood when streaming began.
    started_at: Option<u64>,
    /// The replication connection's own figures: what it sent PostgreSQL,
    /// and where the server's WAL ends as its messages tell.
    wire: Option<Arc<ReplicationMetrics>>,
    /// Commit time (Unix ms) of the oldest transaction read but not answered.
    pending_since_ms: Option<u64>,
    /// Commit to answer of the last transaction answered.
    last_lag_ms: Option<u64>,
    error: Option<String>,
    transactions: u64,
    changes: u64,
}

impl State {
    /// (confirmed, server): what PostgreSQL was told is done, and where its
    /// WAL ends; `None` before streaming ever began.
    fn positions(&self) -> Option<(u64, u64)> {
        let sent = self.wire.as_ref().map_or(0, |w| w.last_applied_lsn().0);
        let confirmed = self.started_at?.max(sent);
        let server = self.wire.as_ref().map_or(0, |w| w.last_wal_end().0);
        Some((confirmed, server.max(confirmed)))
    }
}

/// Wall-clock now, Unix ms.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Status {
    /// The state of a source not started yet.
    pub fn new(settings: &SourceSettings) -> Status {
        Status {
            state: Mutex::new(State { error: Some("not connected yet".into()), ..State::default() }),
            kind: settings.kind.clone(),
            slot: settings.slot.clone(),
            publication: settings.publication.clone(),
        }
    }

    /// Whether the source streams now.
    pub fn is_connected(&self) -> bool {
        self.with(|s| s.connected)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The health view.
    pub fn health(&self) -> SourceHealth {
        self.with(|s| {
            let pending = s.pending_since_ms.map(|since| now_ms().saturating_sub(since));
            SourceHealth {
                kind: self.kind.clone(),
                slot: self.slot.clone(),
                publication: self.publication.clone(),
                connected: s.connected,
                active: s.active,
                confirmed_lsn: s.positions().map(|(confirmed, _)| pgwire_replication::Lsn(confirmed).to_string()),
                lag_bytes: s.positions().filter(|_| s.connected).map(|(confirmed, server)| server - confirmed),
                // `None` orders below any figure.
                lag_ms: pending.max(s.last_lag_ms),
                error: s.error.clone(),
                transactions: s.transactions,
                changes: s.changes,
            }
        })
    }
}

/// The sources' metrics, labelled by slot.
pub struct SourceMetrics {
    changes: IntCounterVec,
    transactions: IntCounterVec,
    invalidations: IntCounterVec,
    connected: IntGaugeVec,
    active: IntGaugeVec,
    lag_bytes: IntGaugeVec,
    lag_seconds: GaugeVec,
}

impl SourceMetrics {
    /// Registers them.
    pub fn new(registry: &Registry) -> SourceMetrics {
        let counter = |name: &str, help: &str| {
            register(registry, IntCounterVec::new(Opts::new(name, help), &["slot"]).unwrap_or_else(|e| panic!("{e}")))
        };
        let gauge = |name: &str, help: &str| {
            register(registry, IntGaugeVec::new(Opts::new(name, help), &["slot"]).unwrap_or_else(|e| panic!("{e}")))
        };
        SourceMetrics {
            changes: counter("dcc_source_changes_total", "Row changes read from a source"),
            transactions: counter("dcc_source_transactions_total", "Committed transactions read from a source"),
            invalidations: counter(
                "dcc_source_invalidations_total",
                "Invalidations a source made (transactions that changed a followed table)",
            ),
            connected: gauge("dcc_source_connected", "1 while this coordinator streams from the source"),
            active: gauge(
                "dcc_source_active",
                "1 while this coordinator holds the source's lease (it consumes, or is connecting)",
            ),
            lag_bytes: gauge("dcc_source_lag_bytes", "WAL the source's server has that is not confirmed, in bytes"),
            lag_seconds: register(
                registry,
                GaugeVec::new(
                    Opts::new("dcc_source_lag_seconds", "From a transaction's commit to its invalidation's answer"),
                    &["slot"],
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
        }
    }
}

/// What a source's task reports as it goes; updates the status and the metrics.
pub struct Report<'a> {
    /// The status the API reads.
    pub status: &'a Status,
    /// The metrics.
    pub metrics: &'a SourceMetrics,
}

impl Report<'_> {
    fn label(&self) -> [&str; 1] {
        [self.status.slot.as_str()]
    }

    /// This coordinator holds the lease, or no longer does.
    pub fn active(&self, active: bool) {
        self.status.with(|s| s.active = active);
        self.metrics.active.with_label_values(&self.label()).set(i64::from(active));
    }

    /// Streaming from `confirmed`, on a connection whose figures are `wire`.
    pub fn connected(&self, confirmed: u64, wire: Arc<ReplicationMetrics>) {
        self.status.with(|s| {
            s.connected = true;
            s.error = None;
            s.started_at = Some(confirmed);
            s.wire = Some(wire);
        });
        self.metrics.connected.with_label_values(&self.label()).set(1);
        self.refresh();
    }

    /// Brings the lag gauge up to date with what the connection sent and saw.
    pub fn refresh(&self) {
        let lag = self.status.with(|s| s.positions().map_or(0, |(confirmed, server)| server - confirmed));
        self.metrics.lag_bytes.with_label_values(&self.label()).set(lag as i64);
    }

    /// Not streaming, and why.
    pub fn down(&self, why: String) {
        self.status.with(|s| {
            s.connected = false;
            s.error = Some(why);
            s.pending_since_ms = None;
            // What the last connection sent stays the last confirmation.
            if let Some((confirmed, _)) = s.positions() {
                s.started_at = Some(confirmed);
            }
            s.wire = None;
        });
        self.metrics.connected.with_label_values(&self.label()).set(0);
        // Unknown while not streaming (health says null); alert on connected.
        self.metrics.lag_bytes.with_label_values(&self.label()).set(0);
    }

    /// A transaction committed at `commit_ms` (Unix ms) is being read.
    pub fn began(&self, commit_ms: u64) {
        self.status.with(|s| {
            s.pending_since_ms.get_or_insert(commit_ms);
        });
    }

    /// A transaction with `changes` row changes was answered (`invalidated`:
    /// it made an invalidation); `commit_ms`, when it was committed, unless
    /// it was read again after a restart (then its lag says nothing new).
    pub fn answered(&self, changes: u64, invalidated: bool, commit_ms: Option<u64>) {
        let lag_ms = commit_ms.map(|at| now_ms().saturating_sub(at));
        self.status.with(|s| {
            s.transactions += 1;
            s.changes += changes;
            s.pending_since_ms = None;
            s.last_lag_ms = lag_ms.or(s.last_lag_ms);
        });
        let label = self.label();
        self.metrics.transactions.with_label_values(&label).inc();
        self.metrics.changes.with_label_values(&label).inc_by(changes);
        if invalidated {
            self.metrics.invalidations.with_label_values(&label).inc();
        }
        if let Some(lag_ms) = lag_ms {
            self.metrics.lag_seconds.with_label_values(&label).set(lag_ms as f64 / 1000.0);
        }
        self.refresh();
    }
}
