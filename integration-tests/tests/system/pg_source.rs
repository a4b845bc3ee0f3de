//! The PostgreSQL source (contract v2, section 6): committed changes to
//! watched tables, read from a logical replication slot, become
//! invalidations. Each test starts a private PostgreSQL ([`Postgres`]) and a
//! cluster whose coordinator follows it, caches entries through the agents,
//! changes rows with `psql`, and waits until every agent drops the entries.
//!
//! The source is asynchronous: nothing here waits for a fixed time. Each
//! check polls for up to [`SOURCE_DEADLINE`]; "nothing else was dropped" is
//! checked after a later change was seen, which proves the source got past
//! the change in question (commit order is kept).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::postgres::Postgres;
use integration_tests::{deploy_coordinator_toml, free_port, start_coordinator, wait_ready, ClusterOptions, Service};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use shared::protocol::InvalidationMessage;

use crate::{header, partition_of, wait_until, TestCluster};

/// How long the source may take to turn a commit into dropped entries, or to
/// (re)connect: lease expiry, reconnect backoff and a busy machine.
const SOURCE_DEADLINE: Duration = Duration::from_secs(30);

/// The tenant of the `suppliers` table (see [`TABLES`]).
const ACME: &str = "acme";

/// The tables the source follows, with rows to change.
const SCHEMA: &str = "
CREATE TABLE suppliers (id int PRIMARY KEY, name text NOT NULL, version bigint NOT NULL DEFAULT 0);
INSERT INTO suppliers (id, name) SELECT g, 'supplier ' || g FROM generate_series(1, 20) g;
CREATE TABLE clinic_suppliers (clinic_id text, id int, name text NOT NULL, PRIMARY KEY (clinic_id, id));
INSERT INTO clinic_suppliers VALUES
    ('clinic-a', 1, 'a1'), ('clinic-a', 2, 'a2'), ('clinic-a', 3, 'a3'), ('clinic-b', 1, 'b1'), ('clinic-b', 2, 'b2');
";

/// The `[[sources.tables]]` of [`SCHEMA`]: `suppliers` in tenant acme,
/// `clinic_suppliers` by its `clinic_id` column; both are the entity `supplier`.
const TABLES: &str = r#"
[[sources.tables]]
table = "public.suppliers"
entity = "supplier"
tenant = "acme"

[[sources.tables]]
table = "public.clinic_suppliers"
entity = "supplier"
id_column = "id"
tenant_column = "clinic_id"
"#;

/// `[[sources]]` following `tables` in `pg`.
fn sources_toml(pg: &Postgres, tables: &str) -> String {
    format!("[[sources]]\nkind = \"postgres\"\nurl = \"{}\"\nslot = \"dcc\"\npublication = \"dcc\"\n{tables}", pg.url())
}

/// A private PostgreSQL, and a cluster whose coordinator follows it. Fields drop in order: the cluster, then PostgreSQL, then its
/// directory.
struct PgCluster {
    /// The cluster (Redis, coordinator, agents).
    t: TestCluster,
    /// The database.
    pg: Postgres,
    /// The coordinator's extra TOML (rules, then the source), for restarts
    /// and second coordinators.
    coordinator_toml: String,
    /// PostgreSQL's data directory and log; kept with `DCC_KEEP_LOGS`.
    _pg_dir: tempfile::TempDir,
}

impl PgCluster {
    /// Starts PostgreSQL with [`SCHEMA`], then `agents` agents and a
    /// coordinator with `rules` following [`TABLES`], and waits until the
    /// source streams.
    async fn start(agents: usize, rules: &str) -> PgCluster {
        PgCluster::launch(agents, rules, SCHEMA, TABLES).await.streaming().await
    }

    /// Waits until the coordinator's source streams.
    async fn streaming(self) -> PgCluster {
        self.wait_source(&self.t.cluster.coordinator, "connected", |s| s["connected"] == true).await;
        self
    }

    /// Starts PostgreSQL with `schema`, then `agents` agents and a
    /// coordinator with `rules` following `tables`.
    async fn launch(agents: usize, rules: &str, schema: &str, tables: &str) -> PgCluster {
        let mut pg_dir = tempfile::Builder::new().prefix("dcc-pg-").tempdir().expect("tempdir");
        pg_dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
        let pg = Postgres::start(pg_dir.path()).await.unwrap_or_else(|e| panic!("postgres: {e:#}"));
        pg.psql(schema).await.unwrap_or_else(|e| panic!("schema: {e:#}"));
        let coordinator_toml = format!("{rules}\n{}", sources_toml(&pg, tables));
        let options =
            ClusterOptions { agents, coordinator_toml: coordinator_toml.clone(), ..ClusterOptions::default() };
        let t = TestCluster::with(options).await;
        PgCluster { t, pg, coordinator_toml, _pg_dir: pg_dir }
    }

    /// Runs SQL that must succeed; returns `psql`'s output.
    async fn sql(&self, sql: &str) -> String {
        match self.pg.psql(sql).await {
            Ok(out) => out,
            Err(e) => panic!("{e:#}\npostgres log:\n{}", self.pg.log_tail()),
        }
    }

    /// Commits a change to supplier 1, then at once one to supplier `id`;
    /// returns the WAL position just before the second commit. Confirmations
    /// go out at most once a second, so the second one's usually waits.
    async fn commit_two_quickly(&self, id: u32) -> String {
        self.sql(&format!(
            "BEGIN; UPDATE suppliers SET name = 'x' WHERE id = 1; COMMIT; \
             BEGIN; UPDATE suppliers SET name = 'x' WHERE id = {id}; SELECT pg_current_wal_insert_lsn(); COMMIT"
        ))
        .await
    }

    /// Caches `key` in `tenant` tagged `tags` (comma-separated, or none) and
    /// waits until every agent serves it from L1.
    async fn cache(&self, tenant: &str, key: &str, tags: &str) {
        let query = if tags.is_empty() { String::new() } else { format!("?tags={tags}") };
        self.t.put_ok(0, tenant, key, &query, "cached").await;
        self.t.warm(tenant, key).await;
    }

    /// Waits until no agent serves `key` any more.
    async fn assert_dropped(&self, tenant: &str, key: &str) {
        for i in 0..self.t.cluster.agents.len() {
            let gone = wait_until(SOURCE_DEADLINE, || async { self.t.read(i, tenant, key).await.0 == 404 }).await;
            assert!(gone, "agent {i} still serves {tenant}/{key}\n{}", self.diagnostics().await);
        }
    }

    /// Asserts every agent still serves `key`.
    async fn assert_kept(&self, tenant: &str, key: &str) {
        self.t.assert_kept_everywhere(tenant, key).await;
    }

    /// The source's entry in `coordinator`'s `/v1/cluster/health` (null when
    /// it did not answer).
    async fn source(&self, coordinator: &Service) -> Value {
        let (_, health) = self.t.get_json(coordinator, "/v1/cluster/health").await;
        health["sources"][0].clone()
    }

    /// Waits until `coordinator`'s source satisfies `check` (`what` names it).
    async fn wait_source(&self, coordinator: &Service, what: &str, check: impl Fn(&Value) -> bool) {
        let ok = wait_until(SOURCE_DEADLINE, || async { check(&self.source(coordinator).await) }).await;
        assert!(ok, "{}: the source never became {what}\n{}", coordinator.proc.name, self.diagnostics().await);
    }

    /// Which of `coordinators` consumes (holds the lease and streams) while
    /// every other one only waits; `None` unless exactly one does.
    async fn consumer(&self, coordinators: [&Service; 2]) -> Option<usize> {
        let mut consumers = Vec::new();
        for (i, coordinator) in coordinators.into_iter().enumerate() {
            let source = self.source(coordinator).await;
            match (source["active"].as_bool(), source["connected"].as_bool()) {
                (Some(true), Some(true)) => consumers.push(i),
                (Some(false), Some(false)) => {}
                _ => return None,
            }
        }
        (consumers.len() == 1).then(|| consumers[0])
    }

    /// Kills the coordinator (kill -9) and starts another with the same
    /// config on the same Redis (on a new port, so that the old log stays).
    async fn replace_coordinator(&mut self) {
        self.t.cluster.coordinator.proc.kill();
        let (dir, redis) = (self.t.cluster.dir.path(), self.t.cluster.redis_url());
        let coordinator = start_coordinator(dir, &redis, free_port(), &self.coordinator_toml).expect("coordinator");
        wait_ready(&self.t.http, &coordinator).await.unwrap_or_else(|e| panic!("{e:#}"));
        self.t.cluster.coordinator = coordinator;
    }

    /// The log messages of `tenant`'s partition that invalidate in `tenant`.
    async fn messages(&self, tenant: &str) -> Vec<InvalidationMessage> {
        let log = shared::schema::Layout::default().of(tenant).log();
        let mut redis = self.t.cluster.redis_conn().await.expect("redis");
        let range: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&log).arg("-").arg("+").query_async(&mut redis).await.expect("XRANGE");
        let decode = |id: &redis::streams::StreamId| {
            let bytes: Vec<u8> = id.get("m").unwrap_or_else(|| panic!("log entry {} without a message", id.id));
            InvalidationMessage::decode(&bytes).unwrap_or_else(|e| panic!("log entry {}: {e:?}", id.id))
        };
        let messages = range.ids.iter().map(decode);
        messages.filter(|m| m.invalidations.iter().any(|s| s.tenant == tenant)).collect()
    }

    /// The seq of `tenant`'s partition: of the last message logged.
    async fn last_seq(&self, tenant: &str) -> u64 {
        let key = shared::schema::Layout::default().of(tenant).seq();
        let mut redis = self.t.cluster.redis_conn().await.expect("redis");
        let seq: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.expect("GET seq");
        seq.unwrap_or(0)
    }

    /// The seq of the first message after `after` that invalidates `tag` in
    /// `tenant`, waiting for it up to [`SOURCE_DEADLINE`].
    async fn logged_after(&self, tenant: &str, after: u64, tag: &str) -> Option<u64> {
        let deadline = Instant::now() + SOURCE_DEADLINE;
        while Instant::now() < deadline {
            let messages = self.messages(tenant).await;
            if let Some(m) = messages.iter().find(|m| m.seq > after && names_tag(m, tenant, tag)) {
                return Some(m.seq);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The source's event ids recorded in `tenant` (`pg-dcc-*`).
    async fn event_ids(&self, tenant: &str) -> Vec<String> {
        let pattern = shared::schema::Layout::default().of(tenant).event(tenant, "pg-dcc-*");
        let mut redis = self.t.cluster.redis_conn().await.expect("redis");
        redis::cmd("KEYS").arg(&pattern).query_async(&mut redis).await.expect("KEYS")
    }

    /// What to print when a test fails: the source as the coordinator sees
    /// it, and the last lines of the coordinator's and PostgreSQL's logs.
    async fn diagnostics(&self) -> String {
        let coordinator = &self.t.cluster.coordinator;
        format!(
            "source: {}\n--- {} log ({}):\n{}\n--- postgres log:\n{}",
            self.source(coordinator).await,
            coordinator.proc.name,
            coordinator.proc.log.display(),
            coordinator.proc.log_tail(),
            self.pg.log_tail()
        )
    }
}

/// Whether `message` invalidates `tag` in `tenant`.
fn names_tag(message: &InvalidationMessage, tenant: &str, tag: &str) -> bool {
    message.invalidations.iter().any(|s| s.tenant == tenant && s.tags.iter().any(|t| t == tag))
}

/// How many of `messages` invalidate `tag` in `tenant`.
fn count_naming(messages: &[InvalidationMessage], tenant: &str, tag: &str) -> usize {
    messages.iter().filter(|m| names_tag(m, tenant, tag)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_postgres_starts_answers_psql_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pg = Postgres::start(dir.path()).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(pg.port(), 5432);
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')").await.unwrap();
    assert_eq!(pg.psql("SELECT id, v FROM t ORDER BY id").await.unwrap(), "1|a\n2|b");
    assert_eq!(pg.psql("SHOW wal_level").await.unwrap(), "logical");
    // Only rows are printed, no command tags.
    let bumped = pg.psql("BEGIN; UPDATE t SET v = 'c' WHERE id = 1 RETURNING id; SELECT 'x'; COMMIT").await.unwrap();
    assert_eq!(bumped, "1\nx");
    let err = pg.psql("SELECT nope").await.unwrap_err();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    pg.stop().await.unwrap();
    assert!(pg.psql("SELECT 1").await.is_err());
    pg.restart().await.unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM t").await.unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_and_truncate_each_reach_every_agent() {
    let pc = PgCluster::start(2, "").await;
    for id in [1, 2, 100] {
        pc.cache(ACME, &format!("supplier:{id}"), &format!("supplier:{id}")).await;
    }

    pc.sql("INSERT INTO suppliers (id, name) VALUES (100, 'new')").await;
    pc.assert_dropped(ACME, "supplier:100").await;
    pc.assert_kept(ACME, "supplier:1").await;

    pc.sql("UPDATE suppliers SET name = 'renamed' WHERE id = 1").await;
    pc.assert_dropped(ACME, "supplier:1").await;
    pc.assert_kept(ACME, "supplier:2").await;

    pc.sql("DELETE FROM suppliers WHERE id = 2").await;
    pc.assert_dropped(ACME, "supplier:2").await;

    // An UPDATE that changes the id drops the old id's entries and the new one's.
    pc.cache(ACME, "supplier:3", "supplier:3").await;
    pc.cache(ACME, "supplier:300", "supplier:300").await;
    pc.sql("UPDATE suppliers SET id = 300 WHERE id = 3").await;
    pc.assert_dropped(ACME, "supplier:3").await;
    pc.assert_dropped(ACME, "supplier:300").await;

    // TRUNCATE: the entity's collection-level tag (the default rule's `supplier`).
    pc.cache(ACME, "suppliers:all", "supplier").await;
    pc.sql("TRUNCATE suppliers").await;
    pc.assert_dropped(ACME, "suppliers:all").await;

    // Counted in the health and the metrics.
    let source = pc.source(&pc.t.cluster.coordinator).await;
    assert!(source["transactions"].as_u64() >= Some(5) && source["changes"].as_u64() >= Some(5), "{source}");
    let metrics = pc.t.http.get(pc.t.cluster.coordinator.url("/metrics")).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics");
    let sources: Vec<&str> = metrics.lines().filter(|l| l.starts_with("dcc_source_")).collect();
    let names = ["changes_total", "transactions_total", "invalidations_total", "connected", "lag_bytes", "lag_seconds"];
    for name in names {
        let line = format!("dcc_source_{name}{{slot=\"dcc\"}}");
        assert!(sources.iter().any(|l| l.starts_with(&line)), "no {line} among {sources:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_one_invalidation_and_a_rolled_back_one_is_none() {
    let pc = PgCluster::start(2, "").await;
    for id in 3..=7 {
        pc.cache(ACME, &format!("supplier:{id}"), &format!("supplier:{id}")).await;
    }
    let before = pc.messages(ACME).await.len();

    pc.sql(concat!(
        "BEGIN; UPDATE suppliers SET name = 'x' WHERE id = 3; UPDATE suppliers SET name = 'y' WHERE id = 4; ",
        "DELETE FROM suppliers WHERE id = 5; COMMIT"
    ))
    .await;
    for id in 3..=5 {
        pc.assert_dropped(ACME, &format!("supplier:{id}")).await;
    }
    pc.sql("BEGIN; UPDATE suppliers SET name = 'never' WHERE id = 6; ROLLBACK").await;
    // A later commit: once it is seen, the source got past the rollback.
    pc.sql("UPDATE suppliers SET name = 'later' WHERE id = 7").await;
    pc.assert_dropped(ACME, "supplier:7").await;
    pc.assert_kept(ACME, "supplier:6").await;

    let messages = pc.messages(ACME).await;
    let new = &messages[before..];
    assert_eq!(new.len(), 2, "one message per transaction: {new:#?}\n{}", pc.diagnostics().await);
    for id in 3..=5 {
        assert!(names_tag(&new[0], ACME, &format!("supplier:{id}")), "the first names supplier {id}: {:#?}", new[0]);
    }
    assert!(names_tag(&new[1], ACME, "supplier:7"), "the second is the later commit: {:#?}", new[1]);
    assert_eq!(count_naming(new, ACME, "supplier:6"), 0, "the rolled-back row: {new:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_column_sends_each_row_to_its_own_tenant() {
    let pc = PgCluster::start(2, "").await;
    for tenant in ["clinic-a", "clinic-b"] {
        for id in 1..=3 {
            pc.cache(tenant, &format!("supplier:{id}"), &format!("supplier:{id}")).await;
        }
    }

    pc.sql("UPDATE clinic_suppliers SET name = 'changed' WHERE clinic_id = 'clinic-a' AND id = 1").await;
    pc.assert_dropped("clinic-a", "supplier:1").await;
    // A later change in clinic-b: once seen, clinic-b's log is past the first.
    pc.sql("UPDATE clinic_suppliers SET name = 'changed' WHERE clinic_id = 'clinic-b' AND id = 2").await;
    pc.assert_dropped("clinic-b", "supplier:2").await;
    pc.assert_kept("clinic-b", "supplier:1").await;
    pc.assert_kept("clinic-a", "supplier:2").await;

    // A row that moves to another tenant: dropped in both.
    pc.sql("UPDATE clinic_suppliers SET clinic_id = 'clinic-b' WHERE clinic_id = 'clinic-a' AND id = 3").await;
    pc.assert_dropped("clinic-a", "supplier:3").await;
    pc.assert_dropped("clinic-b", "supplier:3").await;

    // TRUNCATE: the collection tag in every tenant with entries, not only the table's.
    for tenant in ["clinic-a", "clinic-b", "clinic-c"] {
        pc.cache(tenant, "suppliers:all", "supplier").await;
    }
    pc.sql("TRUNCATE clinic_suppliers").await;
    for tenant in ["clinic-a", "clinic-b", "clinic-c"] {
        pc.assert_dropped(tenant, "suppliers:all").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplier_update_cascades_through_the_rules_to_every_agent() {
    let pc = PgCluster::start(2, &deploy_coordinator_toml()).await;
    // (key, tags): by supplier's own templates, then by its dependents'
    // (supplier_payment, purchase_order) and theirs (ledger) collection-level ones.
    let dropped = [
        ("supplier:9:profile", ""),
        ("supplier-card-9", "supplier:9"),
        ("suppliers:list:1", ""),
        ("supplier_payments:list:1", ""),
        ("payments-page", "supplier_payments"),
        ("purchase_orders:list:2", ""),
        ("ledger:2024", ""),
        ("ledger-summary", "ledger"),
    ];
    let kept = [("supplier:10:profile", "supplier:10"), ("supplier_payment:5", "supplier_payment:5")];
    for (key, tags) in dropped.iter().chain(&kept) {
        pc.cache(ACME, key, tags).await;
    }

    pc.sql("UPDATE suppliers SET name = 'renamed' WHERE id = 9").await;
    for (key, _) in dropped {
        pc.assert_dropped(ACME, key).await;
    }
    for (key, _) in kept {
        pc.assert_kept(ACME, key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_killed_coordinator_never_confirmed_is_invalidated_by_the_next_one() {
    let mut pc = PgCluster::start(2, "").await;
    pc.cache(ACME, "supplier:1", "supplier:1").await;
    // Frozen, the coordinator cannot answer the commit, so cannot confirm it.
    pc.t.cluster.coordinator.proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    pc.sql("UPDATE suppliers SET name = 'while frozen' WHERE id = 1").await;
    pc.replace_coordinator().await;
    pc.assert_dropped(ACME, "supplier:1").await;
    assert_eq!(count_naming(&pc.messages(ACME).await, ACME, "supplier:1"), 1, "logged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_confirms_what_was_answered_so_a_restart_replays_nothing() {
    let mut pc = PgCluster::start(1, "").await;
    pc.cache(ACME, "supplier:3", "supplier:3").await;
    // Confirmations go out once a second: stopping right after the answer
    // finds the last one not sent yet, and the stop must send it.
    let lsn = pc.commit_two_quickly(3).await;
    pc.assert_dropped(ACME, "supplier:3").await;
    let status = pc.t.cluster.coordinator.proc.terminate().expect("SIGTERM");
    assert!(status.success(), "the coordinator exited {status}\n{}", pc.diagnostics().await);
    let confirmed = format!("SELECT confirmed_flush_lsn > '{lsn}' FROM pg_replication_slots WHERE slot_name = 'dcc'");
    assert_eq!(pc.sql(&confirmed).await, "t", "the stop did not confirm the answered commit\n{}", pc.pg.log_tail());
}

/// A slot that disappears (a PostgreSQL failover that did not carry it,
/// someone dropped it) loses the commits made meanwhile: the new slot comes
/// with a repair that invalidates every followed entity as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_what_it_missed_is_invalidated() {
    let mut pc = PgCluster::start(2, "").await;
    // The entity's collection tag is what a wide invalidation reaches.
    pc.cache(ACME, "supplier:7", "supplier,supplier:7").await;
    let status = pc.t.cluster.coordinator.proc.terminate().expect("SIGTERM");
    assert!(status.success(), "the coordinator exited {status}");
    // PostgreSQL releases the slot once the stopped coordinator's session ended.
    let active = "SELECT active FROM pg_replication_slots WHERE slot_name = 'dcc'";
    let released = wait_until(SOURCE_DEADLINE, || async { pc.sql(active).await == "f" }).await;
    assert!(released, "the slot stayed active\n{}", pc.pg.log_tail());
    pc.sql("SELECT pg_drop_replication_slot('dcc')").await;
    // No slot exists: no one will ever read this commit.
    pc.sql("UPDATE suppliers SET name = 'unseen' WHERE id = 7").await;
    pc.replace_coordinator().await;
    pc.assert_dropped(ACME, "supplier:7").await;
    let repaired = |s: &Value| s["connected"] == true;
    pc.wait_source(&pc.t.cluster.coordinator, "connected after the repair", repaired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_replayed_after_a_kill_is_not_logged_twice() {
    // The coordinator sends its confirmations once a minute: killed after
    // the answer, it has not confirmed the transaction.
    let held_back = "status_interval_ms = 60000\n";
    let pc = PgCluster::launch(2, "", SCHEMA, &format!("{held_back}{TABLES}")).await;
    let mut pc = pc.streaming().await;
    let key = "supplier:10";
    pc.cache(ACME, key, key).await;
    let before = pc.last_seq(ACME).await;
    let lsn = pc.commit_two_quickly(10).await;
    let logged = pc.logged_after(ACME, before, key).await;
    assert!(logged.is_some(), "{key}'s change was never logged\n{}", pc.diagnostics().await);
    pc.assert_dropped(ACME, key).await;
    let unconfirmed =
        format!("SELECT confirmed_flush_lsn <= '{lsn}' FROM pg_replication_slots WHERE slot_name = 'dcc'");
    assert_eq!(pc.sql(&unconfirmed).await, "t", "confirmed before the kill\n{}", pc.diagnostics().await);
    let event_ids = pc.event_ids(ACME).await;
    // The next coordinator confirms as usual.
    pc.coordinator_toml = pc.coordinator_toml.replace(held_back, "");
    pc.replace_coordinator().await;
    pc.wait_source(&pc.t.cluster.coordinator, "connected", |s| s["connected"] == true).await;

    // A later commit seen by the agents: the replay is behind us.
    pc.cache(ACME, "supplier:3", "supplier:3").await;
    pc.sql("UPDATE suppliers SET name = 'y' WHERE id = 3").await;
    pc.assert_dropped(ACME, "supplier:3").await;
    let messages = pc.messages(ACME).await;
    let logged = count_naming(&messages, ACME, key);
    assert_eq!(logged, 1, "{key} was logged {logged} times: {messages:#?}\n{}", pc.diagnostics().await);
    // The replay reused its event id (`pg-dcc-<commit LSN>`); only the later commit added one.
    let after = pc.event_ids(ACME).await;
    assert_eq!(after.len(), event_ids.len() + 1, "event ids before {event_ids:?}, after {after:?}");

    // Caught up: nothing unconfirmed, and PostgreSQL's slot is where the health says.
    let slot = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'dcc'";
    let caught_up = wait_until(SOURCE_DEADLINE, || async {
        let source = pc.source(&pc.t.cluster.coordinator).await;
        source["lag_bytes"] == 0 && source["confirmed_lsn"].as_str() == Some(pc.sql(slot).await.as_str())
    })
    .await;
    assert!(caught_up, "slot at {}\n{}", pc.sql(slot).await, pc.diagnostics().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_coordinators_one_consumes_and_the_other_takes_over_when_it_dies() {
    takeover(Signal::SIGKILL).await;
}

/// A frozen consumer still holds the slot in PostgreSQL until
/// `wal_sender_timeout` (60 s): the new lease holder ends its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_coordinators_the_other_takes_over_from_a_frozen_one_within_seconds() {
    takeover(Signal::SIGSTOP).await;
}

/// Two coordinators follow one slot; the consumer gets `signal`; the other
/// consumes from then on, and an UPDATE reaches the agents through it.
async fn takeover(signal: Signal) {
    let mut pc = PgCluster::start(2, "").await;
    let (dir, redis) = (pc.t.cluster.dir.path().to_path_buf(), pc.t.cluster.redis_url());
    let second = start_coordinator(&dir, &redis, free_port(), &pc.coordinator_toml).expect("second coordinator");
    wait_ready(&pc.t.http, &second).await.unwrap_or_else(|e| panic!("{e:#}"));

    // Exactly one holds the lease and streams; the other waits.
    let holder = || async { pc.consumer([&pc.t.cluster.coordinator, &second]).await };
    let settled = wait_until(SOURCE_DEADLINE, || async { holder().await.is_some() }).await;
    assert!(settled, "not exactly one consumer\n{}", pc.diagnostics().await);
    let holder = holder().await.expect("the consumer still consumes");

    pc.cache(ACME, "supplier:4", "supplier:4").await;
    // The consumer gets the signal; the other one is the cluster's coordinator from now on.
    let mut stopped = if holder == 0 { std::mem::replace(&mut pc.t.cluster.coordinator, second) } else { second };
    stopped.proc.signal(signal).expect("signal the consumer");
    let consuming = |s: &Value| s["active"] == true && s["connected"] == true;
    pc.wait_source(&pc.t.cluster.coordinator, "consuming after the takeover", consuming).await;
    pc.sql("UPDATE suppliers SET name = 'after takeover' WHERE id = 4").await;
    pc.assert_dropped(ACME, "supplier:4").await;
    if signal == Signal::SIGSTOP {
        // Thawed, it finds its lease taken and stands by; the other goes on.
        stopped.proc.signal(Signal::SIGCONT).expect("thaw");
        let standing_by = |s: &Value| s["active"] == false && s["connected"] == false;
        pc.wait_source(&stopped, "standing by after the thaw", standing_by).await;
        pc.cache(ACME, "supplier:5", "supplier:5").await;
        pc.sql("UPDATE suppliers SET name = 'after the thaw' WHERE id = 5").await;
        pc.assert_dropped(ACME, "supplier:5").await;
    }
    stopped.proc.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_the_source_reconnects_and_misses_nothing() {
    let mut pc = PgCluster::start(2, "").await;
    pc.cache(ACME, "supplier:5", "supplier:5").await;
    // Stopped right after a commit was logged, most likely before its
    // confirmation: PostgreSQL sends it again.
    let before = pc.last_seq(ACME).await;
    pc.commit_two_quickly(6).await;
    assert!(pc.logged_after(ACME, before, "supplier:6").await.is_some(), "{}", pc.diagnostics().await);
    pc.pg.stop().await.unwrap_or_else(|e| panic!("{e:#}"));

    let coordinator = &pc.t.cluster.coordinator;
    let down = |s: &Value| s["connected"] == false && s["error"].is_string();
    pc.wait_source(coordinator, "disconnected with an error", down).await;
    // The coordinator stays ready and serves posted events.
    let (status, _) = pc.t.get_json(coordinator, "/readyz").await;
    assert_eq!(status, 200, "{}", pc.diagnostics().await);
    pc.cache(ACME, "invoice:1", "invoice:1").await;
    pc.t.event(json!({"tenant": ACME, "entity": "invoice", "id": "1"})).await;
    pc.assert_dropped(ACME, "invoice:1").await;

    pc.pg.restart().await.unwrap_or_else(|e| panic!("{e:#}"));
    // At once, before the source is back: it must not miss it.
    pc.sql("UPDATE suppliers SET name = 'after restart' WHERE id = 5").await;
    pc.assert_dropped(ACME, "supplier:5").await;
    pc.wait_source(&pc.t.cluster.coordinator, "connected again", |s| s["connected"] == true).await;
    let messages = pc.messages(ACME).await;
    assert_eq!(count_naming(&messages, ACME, "supplier:6"), 1, "sent again, logged once: {messages:#?}");
    assert_eq!(count_naming(&messages, ACME, "supplier:5"), 1, "{messages:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_table_whose_deletes_lack_the_tenant_is_refused_until_fixed() {
    let schema = "CREATE TABLE visits (id int PRIMARY KEY, clinic_id text NOT NULL);
                  INSERT INTO visits VALUES (1, 'clinic-a')";
    let tables = "[[sources.tables]]\ntable = \"public.visits\"\nentity = \"visit\"\ntenant_column = \"clinic_id\"\n";
    let pc = PgCluster::launch(1, "", schema, tables).await;
    let coordinator = &pc.t.cluster.coordinator;
    let names_the_fix = |s: &Value| s["error"].as_str().is_some_and(|e| e.contains("REPLICA IDENTITY FULL"));
    pc.wait_source(coordinator, "refused with the fix named", |s| s["connected"] == false && names_the_fix(s)).await;
    let (status, _) = pc.t.get_json(coordinator, "/readyz").await;
    assert_eq!(status, 200, "the coordinator stays ready\n{}", pc.diagnostics().await);

    // Fixed, it is followed once the refusal is retried (every 30 s).
    pc.sql("ALTER TABLE visits REPLICA IDENTITY FULL").await;
    let retried = wait_until(2 * SOURCE_DEADLINE, || async { pc.source(coordinator).await["connected"] == true }).await;
    assert!(retried, "still refused after the fix\n{}", pc.diagnostics().await);
    pc.cache("clinic-a", "visit:1", "visit:1").await;
    pc.sql("DELETE FROM visits WHERE id = 1").await;
    pc.assert_dropped("clinic-a", "visit:1").await;
}

/// The stale-read checker with writes made in SQL: writers bump a row's
/// version, readers read through the cache (a miss reads the row and fills
/// with the miss's fill token). A read that began once every agent had
/// applied the invalidation of version `v` must not return a version below
/// `v`.
mod checker {
    use super::*;

    /// Rows written and read: suppliers 1..=ROWS.
    const ROWS: i64 = 3;
    /// Reader tasks per agent.
    const READERS_PER_AGENT: usize = 2;
    /// The least a run does before it stops, and how long it may take to.
    const MIN_RUN: Duration = Duration::from_secs(5);
    const MIN_WRITES: usize = 15;
    const MIN_HITS: usize = 100;
    const GIVE_UP_AFTER: Duration = Duration::from_secs(90);

    /// The cache key of a row, which is also its tag.
    fn key(id: i64) -> String {
        format!("supplier:{id}")
    }

    /// What the tasks record.
    #[derive(Default)]
    struct History {
        /// (row, version, when every agent had applied its invalidation).
        acked: Mutex<Vec<(i64, i64, Instant)>>,
        /// (row, version, when the read began, agent) of every cache hit.
        hits: Mutex<Vec<(i64, i64, Instant, usize)>>,
        /// Misses, fills stored, fills refused (409).
        fills: Mutex<(usize, usize, usize)>,
        /// Set when the run ends.
        stop: AtomicBool,
    }

    impl History {
        /// Whether the run has done enough to mean something.
        fn enough(&self) -> bool {
            self.acked.lock().unwrap().len() >= MIN_WRITES && self.hits.lock().unwrap().len() >= MIN_HITS
        }

        /// Every hit that began after the acknowledgement of a newer version.
        fn stale_reads(&self) -> Vec<String> {
            let acked = self.acked.lock().unwrap();
            let hits = self.hits.lock().unwrap();
            let mut stale = Vec::new();
            for (row, version, began, agent) in hits.iter() {
                let newest = acked.iter().filter(|(r, _, at)| r == row && at < began).map(|(_, v, _)| *v).max();
                if let Some(newest) = newest.filter(|v| version < v) {
                    stale.push(format!(
                        "agent {agent} returned version {version} of row {row} after {newest} was acked"
                    ));
                }
            }
            stale
        }
    }

    /// Whether every agent has applied `seq` of acme's partition.
    async fn applied_everywhere(pc: &PgCluster, seq: u64) -> bool {
        let p = usize::from(partition_of(ACME));
        for agent in &pc.t.cluster.agents {
            let (_, status) = pc.t.get_json(agent, "/v1/status").await;
            if status["partitions"][p]["applied_seq"].as_u64().unwrap_or(0) < seq {
                return false;
            }
        }
        true
    }

    /// Bumps `row`'s version, then waits until its invalidation is logged and
    /// applied by every agent; records that moment.
    async fn writer(pc: Arc<PgCluster>, history: Arc<History>, row: i64) -> Result<(), String> {
        while !history.stop.load(Ordering::Relaxed) {
            let before = pc.last_seq(ACME).await;
            let bump = format!("UPDATE suppliers SET version = version + 1 WHERE id = {row} RETURNING version");
            let version: i64 = pc.sql(&bump).await.parse().expect("version");
            let seq = pc.logged_after(ACME, before, &key(row)).await;
            let seq = seq.ok_or_else(|| format!("row {row} version {version}: no invalidation logged"))?;
            if !wait_until(SOURCE_DEADLINE, || applied_everywhere(&pc, seq)).await {
                return Err(format!("row {row} version {version}: seq {seq} not applied by every agent"));
            }
            history.acked.lock().unwrap().push((row, version, Instant::now()));
        }
        Ok(())
    }

    /// Reads rows through `agent`; a miss reads the row and fills with the
    /// miss's fill token.
    async fn reader(pc: Arc<PgCluster>, history: Arc<History>, agent: usize) {
        while !history.stop.load(Ordering::Relaxed) {
            let row = fastrand::i64(1..=ROWS);
            let began = Instant::now();
            let resp = pc.t.get(agent, ACME, &key(row)).await;
            match resp.status().as_u16() {
                200 => {
                    let version = resp.text().await.unwrap_or_default().parse().expect("a cached version");
                    history.hits.lock().unwrap().push((row, version, began, agent));
                }
                404 => {
                    let token = header(&resp, "x-cache-fill-token");
                    let version = pc.sql(&format!("SELECT version FROM suppliers WHERE id = {row}")).await;
                    let query = format!("?tags={}&fill_token={token}", key(row));
                    let filled = pc.t.put(agent, ACME, &key(row), &query, &version).await.status().as_u16();
                    let mut fills = history.fills.lock().unwrap();
                    fills.0 += 1;
                    match filled {
                        204 => fills.1 += 1,
                        409 => fills.2 += 1,
                        other => panic!("a fill answered {other}"),
                    }
                }
                other => panic!("agent {agent} answered {other}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_read_returns_a_row_version_older_than_an_applied_sql_write() {
        let pc = Arc::new(PgCluster::start(2, "").await);
        let history = Arc::new(History::default());
        let writers: Vec<_> = (1..=ROWS).map(|row| tokio::spawn(writer(pc.clone(), history.clone(), row))).collect();
        let readers: Vec<_> = (0..pc.t.cluster.agents.len() * READERS_PER_AGENT)
            .map(|i| tokio::spawn(reader(pc.clone(), history.clone(), i % pc.t.cluster.agents.len())))
            .collect();
        let started = Instant::now();
        let running = || !writers.iter().any(|w| w.is_finished());
        while running() && (started.elapsed() < MIN_RUN || !history.enough()) && started.elapsed() < GIVE_UP_AFTER {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        history.stop.store(true, Ordering::Relaxed);
        for writer in writers {
            if let Err(e) = writer.await.expect("writer") {
                panic!("{e}\n{}", pc.diagnostics().await);
            }
        }
        for reader in readers {
            reader.await.expect("reader");
        }

        let (writes, hits) = (history.acked.lock().unwrap().len(), history.hits.lock().unwrap().len());
        let (misses, stored, refused) = *history.fills.lock().unwrap();
        let stale = history.stale_reads();
        eprintln!(
            "SQL checker, {:.1} s: {writes} writes acked, {hits} hits judged, {misses} misses \
             ({stored} fills stored, {refused} refused), {} stale",
            started.elapsed().as_secs_f64(),
            stale.len()
        );
        let first: Vec<&str> = stale.iter().take(20).map(String::as_str).collect();
        assert!(
            stale.is_empty(),
            "{} stale reads, the first:\n{}\n{}",
            stale.len(),
            first.join("\n"),
            pc.diagnostics().await
        );
        assert!(writes >= MIN_WRITES && hits >= MIN_HITS, "too little done to mean anything");
    }
}
