//! What a PostgreSQL source checks and prepares before it streams: the
//! server, each followed table, the publication and the slot. Everything
//! here runs on one replication session (`replication=database`), which
//! takes SQL as well as replication commands.
//!
//! A setup that cannot work (a setting, a missing table, a replica identity
//! that would hide a `DELETE`'s tenant, a narrowed publication) is
//! [`Failure::Refused`] with the fix named: nothing is streamed, since a
//! change could then be confirmed without being invalidated.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient};
use tracing::{info, warn};

use shared::store::Store;

use super::postgres::{Failure, Mapping, TenantOf};
use super::{SourceSettings, TableSettings};

/// The oldest PostgreSQL the source follows: the replication client asks
/// `pgoutput` for logical messages (`messages 'true'`), an option of 14.
const MIN_VERSION: u32 = 140_000;

/// What [`prepare`] found.
pub struct Prepared {
    /// How each followed table (`schema.table`) maps to events.
    pub mappings: HashMap<String, Mapping>,
    /// Where the slot stands: reading starts there.
    pub confirmed: Lsn,
    /// The server's history, `{system id}.{timeline}`: part of every event
    /// id, since another server or a promoted standby reuses positions.
    pub history: String,
}

/// `"name"`: a name checked by `source::identifier` is safe to quote, and
/// quoted it cannot be read as a keyword.
fn quoted(name: &str) -> String {
    format!("\"{name}\"")
}

/// `"schema"."table"`.
fn quoted_table(table: &str) -> String {
    table.split('.').map(quoted).collect::<Vec<_>>().join(".")
}

/// Runs `sql`: each row's columns as text. PostgreSQL's own refusals
/// (permissions, syntax, a missing object) are [`Failure::Refused`]; a
/// connection that failed is [`Failure::Retry`].
pub async fn query(client: &mut ReplicationClient, sql: &str) -> Result<Vec<Vec<Option<String>>>, Failure> {
    let rows = client.simple_query(sql).await.map_err(|e| match e {
        PgWireError::Server(why) => Failure::Refused(format!("{sql}: {why}")),
        other => Failure::Retry(format!("{sql}: {other}")),
    })?;
    let text = |c: &Option<Bytes>| c.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    Ok(rows.iter().map(|row| row.iter().map(text).collect()).collect())
}

/// The first column of the first row.
async fn value(client: &mut ReplicationClient, sql: &str) -> Result<Option<String>, Failure> {
    Ok(query(client, sql).await?.into_iter().next().and_then(|row| row.into_iter().next().flatten()))
}

/// Checks the server and the tables, creates the publication and the slot
/// when missing (a lost slot is replaced); answers how each table maps and
/// where the slot stands. `known` is the Redis key that says the slot was
/// followed before: it becomes `pending` before a slot is created over
/// one that was, and only [`super::postgres`]'s repair clears it.
pub async fn prepare(
    client: &mut ReplicationClient,
    settings: &SourceSettings,
    store: &Store,
    known: &str,
) -> Result<Prepared, Failure> {
    let version: u32 = value(client, "SHOW server_version_num").await?.and_then(|v| v.parse().ok()).unwrap_or(0);
    if version < MIN_VERSION {
        return Err(Failure::Refused(format!(
            "PostgreSQL {version} is too old: the source needs 14 or newer (pgoutput's messages option)"
        )));
    }
    let wal_level = value(client, "SHOW wal_level").await?.unwrap_or_default();
    if wal_level != "logical" {
        return Err(Failure::Refused(format!(
            "PostgreSQL has wal_level = {wal_level}; set wal_level = logical and restart it"
        )));
    }
    let system = client.identify_system().await.map_err(|e| Failure::Retry(format!("IDENTIFY_SYSTEM: {e}")))?;
    let mut mappings = HashMap::new();
    for table in &settings.tables {
        mappings.insert(table.qualified(), check_table(client, table).await?);
    }
    ensure_publication(client, settings, version).await?;
    let confirmed = ensure_slot(client, settings, version, store, known).await?;
    Ok(Prepared { mappings, confirmed, history: format!("{}.{}", system.system_id, system.timeline) })
}

/// The slot's confirmed position; a missing or lost slot is created anew,
/// after `known` was marked `pending` if the slot had been followed.
async fn ensure_slot(
    client: &mut ReplicationClient,
    settings: &SourceSettings,
    version: u32,
    store: &Store,
    known: &str,
) -> Result<Lsn, Failure> {
    let slot = &settings.slot;
    // A slot PostgreSQL invalidated cannot be read any more.
    let invalidated = if version >= 170_000 {
        "wal_status = 'lost' OR invalidation_reason IS NOT NULL"
    } else {
        "wal_status = 'lost'"
    };
    let rows = query(
        client,
        &format!(
            "SELECT plugin, confirmed_flush_lsn::text, ({invalidated})::text FROM pg_replication_slots \
             WHERE slot_name = '{slot}'"
        ),
    )
    .await?;
    let found = rows.into_iter().next();
    // We hold the slot's lease: a session still holding the slot is a
    // coordinator that lost it (frozen, or cut off) and that PostgreSQL has
    // not timed out yet (`wal_sender_timeout`, 60 s by default). End it; a
    // role not allowed to (another role's session) waits for the timeout.
    let terminate = format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = '{slot}' AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()"
    );
    if let Err(Failure::Retry(why) | Failure::Refused(why)) = query(client, &terminate).await {
        warn!(%slot, %why, "cannot end the session still holding the slot");
    }
    let column = |row: &[Option<String>], i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    match found {
        Some(row) if column(&row, 2) != "true" => {
            let plugin = column(&row, 0);
            if plugin != "pgoutput" {
                return Err(Failure::Refused(format!(
                    "slot {slot} exists with plugin {plugin:?}, not pgoutput; drop it or name another slot"
                )));
            }
            return Lsn::parse(&column(&row, 1)).map_err(|e| Failure::Retry(format!("slot {slot}: {e}")));
        }
        Some(_) => {
            warn!(%slot, "PostgreSQL invalidated the slot (it lost WAL it had not confirmed); replacing it");
            mark_pending(store, known).await?;
            query(client, &format!("DROP_REPLICATION_SLOT {}", quoted(slot))).await?;
        }
        None => mark_pending(store, known).await?,
    }
    info!(%slot, "creating the replication slot: it waits for the transactions open now to end");
    let created =
        query(client, &format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT", quoted(slot))).await?;
    info!(%slot, "created the replication slot");
    let lsn = created.first().map(|row| column(row, 1)).unwrap_or_default();
    Lsn::parse(&lsn).map_err(|e| Failure::Retry(format!("slot {slot}: {e}")))
}

/// Before a slot is created over one that was followed: the commits between
/// them will never be read, so a repair is owed, whatever happens next.
async fn mark_pending(store: &Store, known: &str) -> Result<(), Failure> {
    let mut conn = store.get().await?;
    // `XX`: only a slot that was followed leaves a repair owed.
    let _: Option<String> = redis::cmd("SET").arg(known).arg("pending").arg("XX").query_async(&mut conn).await?;
    Ok(())
}

/// A table's kind, columns and replica identity: a `DELETE` must carry the id
/// and the tenant column, or it could not be invalidated; a partitioned or
/// inherited table publishes its rows under its children's names.
async fn check_table(client: &mut ReplicationClient, table: &TableSettings) -> Result<Mapping, Failure> {
    let name = table.qualified();
    let columns_of = |filter: &str| {
        format!(
            "(SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a \
             ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = c.oid AND i.{filter})"
        )
    };
    let sql = format!(
        "SELECT c.relreplident::text, {}, {}, \
         (SELECT string_agg(attname, ',') FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped), \
         c.relkind::text, c.relhassubclass::text \
         FROM pg_class c WHERE c.oid = to_regclass('{name}')",
        columns_of("indisprimary"),
        columns_of("indisreplident"),
    );
    let rows = query(client, &sql).await?;
    let Some(row) = rows.first() else {
        return Err(Failure::Refused(format!("table {name} does not exist")));
    };
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let list = |i: usize| -> Vec<String> {
        row.get(i).cloned().flatten().map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default()
    };
    if text(4) == "p" || text(5) == "true" {
        return Err(Failure::Refused(format!(
            "table {name} is partitioned or has child tables, whose changes PostgreSQL publishes under the \
             children's names: list each partition in [[sources.tables]] instead"
        )));
    }
    let (identity, primary, index, all) = (text(0), list(1), list(2), list(3));
    let id_column = match (&table.id_column, primary.as_slice()) {
        (Some(column), _) => column.clone(),
        (None, [one]) => one.clone(),
        (None, _) => {
            return Err(Failure::Refused(format!(
                "table {name} has no one-column primary key: give id_column in its [[sources.tables]]"
            )))
        }
    };
    let carried: Vec<String> = match identity.as_str() {
        "f" => all.clone(),
        "d" => primary,
        "i" => index,
        _ => Vec::new(),
    };
    let mut needed = vec![id_column.clone()];
    needed.extend(table.tenant_column.clone());
    for column in &needed {
        if !all.contains(column) {
            return Err(Failure::Refused(format!("table {name} has no column {column}")));
        }
        if !carried.contains(column) {
            return Err(Failure::Refused(format!(
                "table {name}: a DELETE would not carry column {column} (its replica identity lacks it); \
                 run ALTER TABLE {name} REPLICA IDENTITY FULL"
            )));
        }
    }
    let tenant = match (&table.tenant_column, &table.tenant) {
        (Some(column), _) => TenantOf::Column(column.clone()),
        (None, Some(tenant)) => TenantOf::Fixed(tenant.clone()),
        (None, None) => return Err(Failure::Refused(format!("table {name}: give tenant_column or tenant"))),
    };
    Ok(Mapping { entity: table.entity.clone(), id_column, tenant })
}

/// Creates the publication for the tables, or adds the tables it lacks. An
/// existing one must publish every kind of change, every row and every
/// column: anything less would hide changes.
async fn ensure_publication(
    client: &mut ReplicationClient,
    settings: &SourceSettings,
    version: u32,
) -> Result<(), Failure> {
    let publication = &settings.publication;
    let wanted: Vec<String> = settings.tables.iter().map(TableSettings::qualified).collect();
    let list = |tables: &[String]| tables.iter().map(|t| quoted_table(t)).collect::<Vec<_>>().join(", ");
    let found = query(
        client,
        &format!(
            "SELECT puballtables::text, (pubinsert AND pubupdate AND pubdelete AND pubtruncate)::text \
             FROM pg_publication WHERE pubname = '{publication}'"
        ),
    )
    .await?;
    let Some(row) = found.first() else {
        query(client, &format!("CREATE PUBLICATION {} FOR TABLE {}", quoted(publication), list(&wanted))).await?;
        info!(%publication, "created the publication");
        return Ok(());
    };
    if row.get(1).cloned().flatten().as_deref() != Some("true") {
        return Err(Failure::Refused(format!(
            "publication {publication} does not publish every change: run ALTER PUBLICATION {publication} \
             SET (publish = 'insert, update, delete, truncate')"
        )));
    }
    if version >= 150_000 {
        let narrowed = value(
            client,
            &format!(
                "SELECT count(*)::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = '{publication}' AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL)"
            ),
        )
        .await?;
        if narrowed.as_deref() != Some("0") {
            return Err(Failure::Refused(format!(
                "publication {publication} has a row filter or a column list, which hide changes: give the \
                 source a publication of its own"
            )));
        }
    }
    if row.first().cloned().flatten().as_deref() == Some("true") {
        return Ok(());
    }
    let has = query(
        client,
        &format!("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = '{publication}'"),
    )
    .await?;
    let has: BTreeSet<String> = has.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
    let missing: Vec<String> = wanted.into_iter().filter(|t| !has.contains(t)).collect();
    if !missing.is_empty() {
        query(client, &format!("ALTER PUBLICATION {} ADD TABLE {}", quoted(publication), list(&missing))).await?;
        info!(%publication, tables = %missing.join(", "), "added tables to the publication");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_for_sql() {
        assert_eq!(quoted("table"), "\"table\"");
        assert_eq!(quoted_table("public.order"), "\"public\".\"order\"");
    }
}
