//! A `[[sources]]` of kind `postgres`: logical replication with `pgoutput`.
//!
//! The replication connection is `pgwire-replication` (it starts where we say
//! and confirms only what we say is done); the `pgoutput` messages are decoded
//! by `pg_walstream`'s parser. Protocol version 1: PostgreSQL sends a
//! transaction only once it committed, and never one that rolled back.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser, TupleData};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use shared::audit::{self, Trail};
use shared::invalidation::Request;
use shared::names;
use shared::service::Backoff;
use shared::store::Conn;

use super::lease::Lease;
use super::setup::{self, Prepared};
use super::txn::Txn;
use super::{Report, SourceSettings};
use crate::state::{Coordinator, InvalidationAnswer};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// How often a coordinator without the lease looks whether it is free.
const STANDBY_POLL: Duration = Duration::from_secs(1);
/// How long connecting and preparing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most tenants remembered from rows, for a `TRUNCATE` of a tenant-column table.
const MAX_SEEN_TENANTS: usize = 10_000;

/// Where and how to connect, from the source's `url`. (No `Debug`: it
/// holds the password.)
#[derive(Clone)]
pub struct ConnectSettings {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    tls: TlsConfig,
}

impl ConnectSettings {
    /// Parses `postgres://user[:password]@host[:port]/database[?sslmode=..&sslrootcert=..]`.
    pub fn parse(url: &str) -> Result<ConnectSettings, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(format!("scheme {:?}: use postgres://", parsed.scheme()));
        }
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or("the URL names no host")?.to_string();
        let user = match parsed.username() {
            "" => "postgres".to_string(),
            u => decode(u),
        };
        let database = match parsed.path().trim_start_matches('/') {
            "" => user.clone(),
            d => decode(d),
        };
        let mut mode = "prefer".to_string();
        let mut root_cert = None;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "sslmode" => mode = v.into_owned(),
                "sslrootcert" => root_cert = Some(std::path::PathBuf::from(v.as_ref())),
                other => return Err(format!("unknown parameter {other:?}: sslmode and sslrootcert are known")),
            }
        }
        let tls = match mode.as_str() {
            "disable" => TlsConfig::disabled(),
            "prefer" => TlsConfig { mode: SslMode::Prefer, ..TlsConfig::default() },
            "require" => TlsConfig::require(),
            "verify-ca" => TlsConfig::verify_ca(root_cert),
            "verify-full" => TlsConfig::verify_full(root_cert),
            other => return Err(format!("sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full")),
        };
        Ok(ConnectSettings {
            host,
            port: parsed.port().unwrap_or(5432),
            user,
            password: parsed.password().map(decode).unwrap_or_default(),
            database,
            tls,
        })
    }

    /// The replication connection's configuration, reading from `start`.
    fn replication(&self, settings: &SourceSettings, start: Lsn, name: &str) -> ReplicationConfig {
        ReplicationConfig::new(
            &self.host,
            &self.user,
            &self.password,
            &self.database,
            &settings.slot,
            settings.publication.as_str(),
        )
        .with_port(self.port)
        .with_tls(self.tls.clone())
        .with_start_lsn(start)
        // A confirmation reaches PostgreSQL this soon after the answer.
        .with_status_interval(Duration::from_millis(settings.status_interval_ms))
        // An idle connection sends its status this often too (and whenever
        // PostgreSQL asks, at half its `wal_sender_timeout`).
        .with_wakeup_interval(Duration::from_millis(settings.status_interval_ms))
        // Bounds what is read ahead of the invalidations; PostgreSQL keeps the rest.
        .with_buffer_size(1024)
        .with_application_name(name)
    }
}

/// Follows the source until `stop`: takes the lease, streams, and on any
/// failure reports it and tries again with backoff.
pub async fn run(coordinator: Coordinator, index: usize, trail: Trail, stop: CancellationToken) {
    let inner = coordinator.inner();
    let settings = &inner.settings.sources[index];
    let report = Report { status: &inner.sources[index], metrics: &inner.metrics.sources };
    let connect = match ConnectSettings::parse(&settings.url) {
        Ok(c) => c,
        Err(e) => return report.down(format!("url: {e}")),
    };
    let source = Source { coordinator: &coordinator, settings, connect, report, trail };
    let report = &source.report;
    let settings = source.settings;
    let mut seen_tenants = BTreeSet::new();
    let mut backoff = Backoff::default();
    while !stop.is_cancelled() {
        let lease = match Lease::acquire(&inner.store, &settings.slot, &inner.origin).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                report.active(false);
                report.down("another coordinator consumes the slot".into());
                wait_or_stop(STANDBY_POLL, &stop).await;
                continue;
            }
            Err(e) => {
                report.active(false);
                report.down(format!("cannot take the slot's lease in Redis: {e}"));
                wait_or_stop(STANDBY_POLL, &stop).await;
                continue;
            }
        };
        report.active(true);
        let ended = tokio::select! {
            ended = follow(&source, &lease.lost, &stop, &mut seen_tenants) => ended,
            // Whatever it was doing, once it had a moment to send its last
            // confirmation: nothing unanswered was confirmed.
            _ = async { stop.cancelled().await; tokio::time::sleep(2 * CONNECT_TIMEOUT / 5).await } => Ok(()),
        };
        lease.release().await;
        report.active(false);
        match ended {
            Ok(()) => report.down("stopped".into()),
            Err(Failure::Refused(why)) => {
                warn!(slot = %settings.slot, %why, "the source is refused; retrying in 30 s");
                report.down(why);
                wait_or_stop(Duration::from_secs(30), &stop).await;
            }
            Err(Failure::Retry(why)) => {
                warn!(slot = %settings.slot, %why, "the source stopped; retrying");
                // A session that streamed starts the backoff over.
                if report.status.is_connected() {
                    backoff.reset();
                }
                report.down(why);
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            }
        }
        backoff.reset();
    }
    report.down("stopped".into());
}

async fn wait_or_stop(delay: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.cancelled() => {}
    }
}

/// Why following stopped.
pub(super) enum Failure {
    /// A fault (PostgreSQL or Redis unreachable, the lease lost): retry soon.
    Retry(String),
    /// The configuration cannot work until someone changes it.
    Refused(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Retry(e.to_string())
    }
}

/// How a followed table's rows become events.
#[derive(Debug, Clone)]
pub(super) struct Mapping {
    /// The events' entity.
    pub entity: String,
    /// The column holding a row's id.
    pub id_column: String,
    /// Where a row's tenant comes from.
    pub tenant: TenantOf,
}

/// Where a row's tenant comes from.
#[derive(Debug, Clone)]
pub(super) enum TenantOf {
    /// Every row's: a single-tenant table.
    Fixed(String),
    /// This column's value.
    Column(String),
}

/// A relation as the stream described it: its mapping and where its columns are.
struct Relation {
    /// How its rows become events.
    mapping: Mapping,
    /// The id column's position; `None` if the stream leaves it out.
    id: Option<usize>,
    /// The tenant column's position; `None` if the stream leaves it out.
    tenant: Option<usize>,
}

/// One `[[sources]]` being followed: what every step needs.
struct Source<'a> {
    coordinator: &'a Coordinator,
    settings: &'a SourceSettings,
    connect: ConnectSettings,
    report: Report<'a>,
    trail: Trail,
}

/// Connects, prepares the slot, streams, and runs each committed
/// transaction's invalidation before confirming it.
async fn follow(
    source: &Source<'_>,
    lost: &CancellationToken,
    stop: &CancellationToken,
    seen_tenants: &mut BTreeSet<String>,
) -> Result<(), Failure> {
    let Source { coordinator, settings, connect, report, trail } = source;
    let inner = coordinator.inner();
    let name = format!("dcc {}", inner.origin);
    // Check and prepare on one session, then stream on another from where
    // the slot stands. A server that does not answer is a fault like any
    // other; creating a slot may wait for long transactions, unbounded.
    let mut client = ReplicationClient::connect_gated(connect.replication(settings, Lsn(0), &name)).await?;
    tokio::time::timeout(CONNECT_TIMEOUT, setup::query(&mut client, "SELECT 1"))
        .await
        .map_err(|_| Failure::Retry(format!("PostgreSQL did not answer within {CONNECT_TIMEOUT:?}")))??;
    let known = shared::schema::source_known(&settings.slot);
    let prepared = tokio::select! {
        prepared = setup::prepare(&mut client, settings, &inner.store, &known) => prepared?,
        _ = lost.cancelled() => return Err(Failure::Retry("the lease was lost".into())),
    };
    drop(client);
    repair(source, &prepared, lost, stop, seen_tenants).await?;
    let Prepared { mappings, confirmed, history } = prepared;
    let mut client = ReplicationClient::connect(connect.replication(settings, confirmed, &name)).await?;
    tokio::select! {
        started = tokio::time::timeout(CONNECT_TIMEOUT, client.wait_started()) => {
            started.map_err(|_| Failure::Retry(format!("replication did not start within {CONNECT_TIMEOUT:?}")))??
        }
        _ = lost.cancelled() => return Err(Failure::Retry("the lease was lost".into())),
    }
    info!(slot = %settings.slot, confirmed = %confirmed, "following PostgreSQL");
    report.connected(confirmed.0, client.metrics());

    let mut parser = LogicalReplicationParser::with_protocol_version(1);
    let mut relations: HashMap<u32, Option<Relation>> = HashMap::new();
    let mut txn: Option<(Txn, u64)> = None;
    // What this connection was told is done (it sends it within a second).
    let mut applied = confirmed;
    // The lag gauge follows what the connection sends and sees, between transactions too.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = client.recv() => event?,
            _ = tick.tick() => {
                report.refresh();
                continue;
            }
            _ = lost.cancelled() => return Err(Failure::Retry("the lease was lost".into())),
            _ = stop.cancelled() => {
                finish(client, applied).await;
                return Ok(());
            }
        };
        match event {
            None => return Err(Failure::Retry("PostgreSQL ended the stream".into())),
            Some(ReplicationEvent::KeepAlive { wal_end, .. }) => {
                // Between transactions, everything the server sent is
                // answered: the slot may move past WAL we did not need.
                if txn.is_none() {
                    client.update_applied_lsn(wal_end);
                    applied = applied.max(wal_end);
                }
            }
            Some(ReplicationEvent::Begin { commit_time_micros, .. }) => {
                let commit_ms = unix_ms(commit_time_micros);
                report.began(commit_ms);
                txn = Some((Txn::new(settings.max_rows_per_transaction), commit_ms));
            }
            Some(ReplicationEvent::XLogData { data, .. }) => {
                // Changes come between BEGIN and COMMIT; a relation's
                // description is read wherever it comes.
                let mut outside = Txn::new(1);
                let txn = txn.as_mut().map_or(&mut outside, |(txn, _)| txn);
                read_change(&mut parser, &data, &mappings, &mut relations, txn, seen_tenants)?;
            }
            Some(ReplicationEvent::Commit { lsn, end_lsn, .. }) => {
                let Some((txn, commit_ms)) = txn.take() else { continue };
                let invalidated = !txn.is_empty();
                let mut replayed = false;
                if invalidated {
                    let event_id =
                        format!("pg-{}-{history}-{:X}-{:X}", settings.slot, lsn.0 >> 32, lsn.0 & 0xffff_ffff);
                    let tenants = if txn.everywhere_entities().next().is_some() {
                        every_tenant(coordinator, seen_tenants).await?
                    } else {
                        BTreeSet::new()
                    };
                    let request = txn.request(&inner.rules, &tenants, &event_id, inner.origin.clone());
                    let answered = answer(coordinator, &request, report, lost, stop).await?;
                    replayed = answered.duplicate;
                    if !replayed {
                        audit(trail, settings, &request, &event_id, &answered);
                    }
                }
                // Only now may PostgreSQL forget the transaction.
                client.update_applied_lsn(end_lsn);
                applied = applied.max(end_lsn);
                report.answered(txn.changes, invalidated, (!replayed).then_some(commit_ms));
            }
            Some(ReplicationEvent::Message { .. }) => {}
            Some(ReplicationEvent::StoppedAt { .. }) => return Err(Failure::Retry("the stream stopped".into())),
        }
    }
}

/// Ends the stream once PostgreSQL was sent `applied` (the connection sends
/// confirmations every `status_interval_ms`), so that a graceful stop
/// replays nothing; it waits 2 s at most.
async fn finish(client: ReplicationClient, applied: Lsn) {
    let metrics = client.metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while metrics.last_applied_lsn() < applied && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.stop();
    let _ = tokio::time::timeout(Duration::from_secs(1), client.join()).await;
}

/// Runs the invalidation until it is answered; a fault is retried with
/// backoff while this coordinator still holds the slot.
async fn answer(
    coordinator: &Coordinator,
    request: &Request,
    report: &Report<'_>,
    lost: &CancellationToken,
    stop: &CancellationToken,
) -> Result<InvalidationAnswer, Failure> {
    let mut backoff = Backoff::default();
    loop {
        match coordinator.invalidate(request.clone(), None).await {
            Ok(answered) => return Ok(answered),
            Err(e) => {
                warn!(error = %e.message, "a committed transaction's invalidation failed; retrying");
                report.status.with(|s| s.error = Some(format!("invalidating: {}", e.message)));
            }
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = lost.cancelled() => return Err(Failure::Retry("the lease was lost while invalidating".into())),
            _ = stop.cancelled() => return Err(Failure::Retry("stopping while invalidating".into())),
        }
    }
}

/// Records a transaction's invalidation in the audit trail, as the source's
/// own action (`source`, "token" `source:{slot}`).
fn audit(trail: &Trail, settings: &SourceSettings, request: &Request, event_id: &str, answered: &InvalidationAnswer) {
    let token = format!("source:{}", settings.slot);
    let entry = audit::Entry::of("source", Some(token), &request.items).answered(200, answered.seq, None);
    trail.record(audit::Entry { request: Some(event_id.to_string()), ..entry });
}

/// One `pgoutput` message of a transaction: a relation's description, or a
/// row change that joins `txn`.
fn read_change(
    parser: &mut LogicalReplicationParser,
    data: &Bytes,
    mappings: &HashMap<String, Mapping>,
    relations: &mut HashMap<u32, Option<Relation>>,
    txn: &mut Txn,
    seen_tenants: &mut BTreeSet<String>,
) -> Result<(), Failure> {
    let message =
        parser.parse_wal_message_bytes(data.clone()).map_err(|e| format!("cannot decode a pgoutput message: {e}"))?;
    if matches!(
        message.message,
        LogicalReplicationMessage::Insert { .. }
            | LogicalReplicationMessage::Update { .. }
            | LogicalReplicationMessage::Delete { .. }
            | LogicalReplicationMessage::Truncate { .. }
    ) {
        txn.changes += 1;
    }
    match message.message {
        LogicalReplicationMessage::Relation { relation_id, namespace, relation_name, columns, .. } => {
            let relation = mappings.get(&format!("{namespace}.{relation_name}")).map(|mapping| {
                let at = |name: &str| columns.iter().position(|c| &*c.name == name);
                Relation {
                    id: at(&mapping.id_column),
                    tenant: match &mapping.tenant {
                        TenantOf::Column(column) => at(column),
                        TenantOf::Fixed(_) => None,
                    },
                    mapping: mapping.clone(),
                }
            });
            relations.insert(relation_id, relation);
        }
        LogicalReplicationMessage::Insert { relation_id, tuple } => {
            row(relations, relation_id, &tuple, Tuple::Whole, txn, seen_tenants)?;
        }
        LogicalReplicationMessage::Update { relation_id, old_tuple, new_tuple, key_type } => {
            // The old row too: an update may move a row to another id or tenant.
            if let Some(old) = &old_tuple {
                row(relations, relation_id, old, Tuple::old(key_type), txn, seen_tenants)?;
            }
            row(relations, relation_id, &new_tuple, Tuple::Whole, txn, seen_tenants)?;
        }
        LogicalReplicationMessage::Delete { relation_id, old_tuple, key_type } => {
            row(relations, relation_id, &old_tuple, Tuple::old(Some(key_type)), txn, seen_tenants)?;
        }
        LogicalReplicationMessage::Truncate { relation_ids, .. } => {
            for id in relation_ids {
                if let Some(Some(relation)) = relations.get(&id) {
                    match &relation.mapping.tenant {
                        TenantOf::Fixed(tenant) => txn.all_rows(tenant, &relation.mapping.entity),
                        TenantOf::Column(_) => txn.everywhere(&relation.mapping.entity),
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// What an old row carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tuple {
    /// Every column (a new row, or an old one under `REPLICA IDENTITY FULL`).
    Whole,
    /// Only the replica identity's columns, the others NULL.
    KeyOnly,
}

impl Tuple {
    /// `pgoutput`'s `K` (key) or `O` (old, whole).
    fn old(key_type: Option<char>) -> Tuple {
        if key_type == Some('K') {
            Tuple::KeyOnly
        } else {
            Tuple::Whole
        }
    }
}

/// A row of a followed table changed: it joins the transaction.
fn row(
    relations: &HashMap<u32, Option<Relation>>,
    relation_id: u32,
    tuple: &TupleData,
    carries: Tuple,
    txn: &mut Txn,
    seen_tenants: &mut BTreeSet<String>,
) -> Result<(), Failure> {
    let relation = match relations.get(&relation_id) {
        Some(Some(relation)) => relation,
        // A table the source does not follow.
        Some(None) => return Ok(()),
        // PostgreSQL describes a relation before its first change: without
        // it nothing says which table this is. Read again from the slot.
        None => return Err(Failure::Retry(format!("a change of relation {relation_id}, never described"))),
    };
    let text =
        |at: Option<usize>| at.and_then(|i| tuple.get_column(i)).and_then(|c| c.as_str()).map(|s| s.into_owned());
    let entity = &relation.mapping.entity;
    let tenant = match &relation.mapping.tenant {
        TenantOf::Fixed(tenant) => tenant.clone(),
        TenantOf::Column(_) => match text(relation.tenant) {
            Some(tenant) => tenant,
            // The stream leaves the tenant column out (a column list, or it
            // was renamed), or left it out of an update (unchanged, stored
            // out of line): the row's tenant is unknown.
            None if relation.tenant.is_none_or(|i| tuple.get_column(i).is_none_or(|c| c.is_unchanged())) => {
                txn.everywhere(entity);
                return Ok(());
            }
            // NULL in an old row of key columns only: the replica identity
            // no longer carries the tenant (it changed since the check at
            // connection), so the row's tenant is unknown.
            None if carries == Tuple::KeyOnly => {
                txn.everywhere(entity);
                return Ok(());
            }
            // NULL: the row belongs to no tenant, so nothing of it is cached.
            None => return Ok(()),
        },
    };
    // A value that is no tenant name cannot have entries.
    if names::validate_tenant(&tenant).is_err() {
        return Ok(());
    }
    if seen_tenants.len() < MAX_SEEN_TENANTS && !seen_tenants.contains(&tenant) {
        seen_tenants.insert(tenant.clone());
    }
    match text(relation.id) {
        Some(id) if crate::events::valid_id(&id) => txn.row(&tenant, entity, Some(&id)),
        _ => txn.all_rows(&tenant, entity),
    }
    Ok(())
}

/// The tenants a change to every row of a tenant-column table reaches: those
/// with a key index in L2 (every tenant with entries), and those the source
/// saw rows of. Rare (a `TRUNCATE`, a widened transaction, a repair), and a
/// `SCAN` of the keyspace: one on one server; on a cluster, one per
/// partition, on the node that holds the partition's slot.
async fn every_tenant(coordinator: &Coordinator, seen: &BTreeSet<String>) -> Result<BTreeSet<String>, Failure> {
    let inner = coordinator.inner();
    let mut tenants = seen.clone();
    let mut conn = inner.store.get().await?;
    let patterns: Vec<String> = match conn {
        Conn::Cluster(_) => inner.layout.all().iter().map(|p| p.every_key_index()).collect(),
        _ => vec![shared::schema::EVERY_KEY_INDEX.to_string()],
    };
    for pattern in patterns {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000);
            let (next, keys): (u64, Vec<String>) = match &mut conn {
                Conn::Cluster(cluster) => {
                    let route = Route::with_key(pattern.as_bytes(), SlotAddr::Master);
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    redis::FromRedisValue::from_redis_value(cluster.route_command(scan, routing).await?)?
                }
                other => scan.query_async(other).await?,
            };
            tenants.extend(keys.iter().filter_map(|key| shared::schema::tenant_of_key_index(key)).map(str::to_string));
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(tenants)
}

fn unix_ms(pg_micros: i64) -> u64 {
    (pg_micros.saturating_add(PG_EPOCH_MICROS) / 1000).max(0) as u64
}

/// After a slot that had been followed was recreated (a PostgreSQL failover
/// that did not carry it, someone dropped it, it lost WAL), commits between
/// its last confirmation and the new slot were never read: every followed
/// entity is invalidated as a whole, in every tenant, before reading on.
///
/// `known` (`dcc:{ctl}:source:{slot}:known`) is `pending` from before such a
/// slot was created until this repair was answered, so a repair cut short
/// (a crash, Redis away, the lease lost) is done by the next attempt; `1`
/// once the slot was followed and nothing is owed.
async fn repair(
    source: &Source<'_>,
    prepared: &Prepared,
    lost: &CancellationToken,
    stop: &CancellationToken,
    seen_tenants: &BTreeSet<String>,
) -> Result<(), Failure> {
    let Source { coordinator, settings, report, .. } = source;
    let inner = coordinator.inner();
    let known = shared::schema::source_known(&settings.slot);
    let mut conn = inner.store.get().await?;
    let state: Option<String> = redis::cmd("GET").arg(&known).query_async(&mut conn).await?;
    if state.as_deref() == Some("pending") {
        warn!(slot = %settings.slot, "the slot was recreated: invalidating every followed entity in every tenant");
        let mut txn = Txn::new(settings.max_rows_per_transaction);
        for mapping in prepared.mappings.values() {
            match &mapping.tenant {
                TenantOf::Fixed(tenant) => txn.all_rows(tenant, &mapping.entity),
                TenantOf::Column(_) => txn.everywhere(&mapping.entity),
            }
        }
        let tenants = every_tenant(coordinator, seen_tenants).await?;
        let event_id = format!("pg-{}-{}-repair-{:X}", settings.slot, prepared.history, prepared.confirmed.0);
        let request = txn.request(&inner.rules, &tenants, &event_id, inner.origin.clone());
        answer(coordinator, &request, report, lost, stop).await?;
    }
    if state.as_deref() != Some("1") {
        let _: () = redis::cmd("SET").arg(&known).arg("1").query_async(&mut conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_like_libpq() {
        let c = ConnectSettings::parse("postgres://dcc:s%40cret@db.internal:6543/app?sslmode=require").expect("valid");
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.password.as_str()),
            ("db.internal", 6543, "dcc", "s@cret")
        );
        assert_eq!(c.database, "app");
        assert_eq!(c.tls.mode, SslMode::Require);
        let c = ConnectSettings::parse("postgresql://127.0.0.1").expect("valid");
        assert_eq!((c.port, c.user.as_str(), c.database.as_str()), (5432, "postgres", "postgres"));
        assert!(ConnectSettings::parse("mysql://x/y").is_err());
        assert!(ConnectSettings::parse("postgres://h/db?sslmode=sometimes").is_err());
        assert!(ConnectSettings::parse("postgres://h/db?options=x").is_err());
    }

    #[test]
    fn commit_times_are_unix_ms() {
        assert_eq!(unix_ms(0), 946_684_800_000);
        assert_eq!(unix_ms(1_000_000), 946_684_801_000);
    }
}
