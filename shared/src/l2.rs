//! L2: the entries in Redis and the indexes that find them again (tenant key
//! index, tag members, dependents), and the head of each partition's log.
//!
//! Every write goes through [`put`], which stores the entry and indexes it in
//! one atomic script (`lua/put.lua`), stamped with the partition's epoch.
//! A read ([`get`]) treats an entry stamped with another epoch as a miss: when
//! a partition moves to a new epoch (Redis lost its data, or a failover forked
//! its log), whatever a failover brought back from before is never served.
//! Deletions are the invalidation path's, in [`crate::invalidation`].

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::protocol::FillToken;
use crate::schema::Partition;
use crate::script::{with_prelude, ENSURE_EPOCH};

/// Most members handled by one Redis call while deleting or scanning.
pub const CHUNK: usize = 1000;

/// An entry as stored in L2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value, opaque bytes.
    pub value: Vec<u8>,
    /// The `Content-Type` it was stored with.
    pub content_type: String,
    /// Tags it carries.
    pub tags: Vec<String>,
    /// Keys of the same tenant it depends on.
    pub depends_on: Vec<String>,
    /// Time to live left, in milliseconds (when written: the TTL).
    pub ttl_ms: u64,
    /// The TTL it was written with, in milliseconds, when read back (0 when
    /// unknown, or when writing): what an agent's `refresh_ahead` is a part of.
    pub written_ttl_ms: u64,
    /// The id of the key `value` is sealed under (the agent's encryption at
    /// rest); `None`: `value` is the plaintext.
    pub sealed_by: Option<String>,
}

/// The answer to an L2 read: the entry if there is one, and the log position
/// observed before the read, which becomes the fill token of a miss.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The entry, if L2 has it (in the current epoch).
    pub entry: Option<Entry>,
    /// Log position read before the entry, in the same pipeline (the
    /// partition's epoch and head seq on the node that answered).
    pub token: FillToken,
    /// The nonce of message `applied` (the caller's applied seq) in that
    /// node's log, when the log holds it: with the head seq, it tells whether
    /// the node carries the history the caller applied (see
    /// `node_agent::sync::state::node_disagrees`).
    pub nonce_at_applied: Option<String>,
}

/// Separator of `depends_on` keys inside the `deps` field: keys cannot contain
/// control characters, so a newline never occurs inside one.
const DEPS_SEPARATOR: char = '\n';

/// A new epoch id: 32 hex characters.
pub fn new_epoch_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Returns the partition's epoch, creating it if Redis has none.
pub async fn ensure_epoch(conn: &mut impl ConnectionLike, partition: &Partition) -> RedisResult<String> {
    ENSURE_EPOCH.key(partition.epoch()).key(partition.epoch_born()).arg(new_epoch_id()).invoke_async(conn).await
}

/// Where a partition's log stands: its epoch, its last seq, and the nonce of
/// the message at that seq (empty before the first message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// The epoch.
    pub epoch: String,
    /// The last seq handed out in it.
    pub seq: u64,
    /// The nonce of message `seq`, if known.
    pub nonce: String,
}

/// Reads the head of a partition's log (one round trip; two when the epoch
/// must be created).
pub async fn head(conn: &mut impl ConnectionLike, partition: &Partition) -> RedisResult<Head> {
    let (epoch, seq, last): (Option<String>, Option<u64>, Option<String>) =
        redis::cmd("MGET").arg(partition.epoch()).arg(partition.seq()).arg(partition.last()).query_async(conn).await?;
    let epoch = match epoch {
        Some(e) => e,
        None => ensure_epoch(conn, partition).await?,
    };
    let seq = seq.unwrap_or(0);
    Ok(Head { epoch, seq, nonce: last_nonce(last.as_deref(), seq) })
}

/// Every partition's head in one `MGET` (one command instead of one per
/// partition): for one server or a Sentinel primary, where the partitions'
/// keys may be read together; a cluster reads them with [`head`] each.
pub async fn heads(conn: &mut impl ConnectionLike, partitions: &[Partition]) -> RedisResult<Vec<Head>> {
    let mut mget = redis::cmd("MGET");
    for partition in partitions {
        mget.arg(partition.epoch()).arg(partition.seq()).arg(partition.last());
    }
    let values: Vec<Option<String>> = mget.query_async(conn).await?;
    let mut heads = Vec::with_capacity(partitions.len());
    for (partition, fields) in partitions.iter().zip(values.chunks(3)) {
        let [epoch, seq, last] = fields else {
            return Err(redis::RedisError::from((redis::ErrorKind::Parse, "MGET answered fewer values than asked")));
        };
        let epoch = match epoch {
            Some(e) => e.clone(),
            None => ensure_epoch(conn, partition).await?,
        };
        let seq = match seq {
            Some(s) => s
                .parse()
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Parse, "a partition's seq is not a number")))?,
            None => 0,
        };
        heads.push(Head { epoch, seq, nonce: last_nonce(last.as_deref(), seq) });
    }
    Ok(heads)
}

/// The nonce in a `"{seq} {nonce}"` record, if it is the one of `seq`.
pub fn last_nonce(last: Option<&str>, seq: u64) -> String {
    match last.and_then(|l| l.split_once(' ')) {
        Some((s, nonce)) if s.parse::<u64>().ok() == Some(seq) => nonce.to_string(),
        _ => String::new(),
    }
}

/// One logged message: its id and fields.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// What one pipelined read returns: epoch, seq, the log entry at the
/// caller's applied seq, time, the entry's fields, its PTTL.
type ReadReply = (Option<String>, Option<u64>, Vec<LogEntry>, (u64, u64), HashMap<String, Vec<u8>>, i64);

/// Reads an entry, and the log position just before it (in the same
/// pipeline, which Redis runs in order), which is the fill token of a miss;
/// and the nonce of message `applied` in the log, so that the caller can
/// tell a node that forked from the history it applied.
pub async fn get(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    key: &str,
    applied: u64,
) -> RedisResult<Lookup> {
    let vkey = partition.value(tenant, key);
    let at = format!("{applied}-0");
    let (epoch, seq, logged, (secs, micros), fields, pttl): ReadReply = redis::pipe()
        .get(partition.epoch())
        .get(partition.seq())
        .cmd("XRANGE")
        .arg(partition.log())
        .arg(&at)
        .arg(&at)
        .cmd("TIME")
        .hgetall(&vkey)
        .pttl(&vkey)
        .query_async(conn)
        .await?;
    let nonce_at_applied = logged
        .into_iter()
        .next()
        .and_then(|(_, fields)| fields.into_iter().find(|(f, _)| f == "n"))
        .and_then(|(_, v)| String::from_utf8(v).ok());
    let epoch = match epoch {
        Some(e) => e,
        None => ensure_epoch(conn, partition).await?,
    };
    let entry = entry_from_fields(fields, pttl, &epoch);
    let token = FillToken { epoch, seq: seq.unwrap_or(0), issued_ms: secs * 1000 + micros / 1000 };
    Ok(Lookup { entry, token, nonce_at_applied })
}

fn entry_from_fields(mut fields: HashMap<String, Vec<u8>>, pttl: i64, epoch: &str) -> Option<Entry> {
    // Written in another epoch: from a history this partition no longer has.
    if fields.remove("e").as_deref() != Some(epoch.as_bytes()) {
        return None;
    }
    // A hash without `v` is not an entry (or expired between the two reads).
    let value = fields.remove("v")?;
    let text = |f: Option<Vec<u8>>| f.and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
    let split = |s: String, sep: char| -> Vec<String> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split(sep).map(str::to_string).collect()
        }
    };
    Some(Entry {
        value,
        content_type: text(fields.remove("ct")),
        tags: split(text(fields.remove("tags")), ','),
        depends_on: split(text(fields.remove("deps")), DEPS_SEPARATOR),
        // -1 (no TTL) cannot happen for entries we wrote; treat it as "unknown".
        ttl_ms: u64::try_from(pttl).unwrap_or(0),
        written_ttl_ms: text(fields.remove("t")).parse().unwrap_or(0),
        sealed_by: fields.remove("x").map(|id| text(Some(id))),
    })
}

/// Stores an entry and indexes it: the tenant's key index, each tag, and the
/// dependents set of each key it depends on. Each index is a zset scored by the
/// member's expiry, expires itself with its last member, and sheds a few expired
/// members on every write, so indexes stay proportional to live entries.
///
/// With a fill token, the write happens only if nothing that covers the entry
/// was invalidated since the token was issued: the token's epoch is current,
/// it has not expired, no marker of the key, its tags or the keys it depends
/// on is above the token's seq, and no pattern invalidated above that seq
/// matches the key. Check and write are one atomic script, so no invalidation
/// can slip between them (see the invalidation path's `BEGIN` for why that is enough).
static PUT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/put.lua")));

/// Takes a key's fill lease after a miss (see [`take_lease`]).
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lease.lua")));

/// The scripts of this module, for [`crate::invalidation::load_scripts`].
pub(crate) fn scripts() -> [&'static Script; 3] {
    [&ENSURE_EPOCH, &PUT, &LEASE]
}

/// Who may fill a missing key (see [`take_lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This miss's fill token holds the lease: its caller loads the value.
    Mine,
    /// Another miss's token holds it for this long yet: wait for its fill
    /// (the lease's waiters are told on [`Partition::fills`] when it ends).
    Held {
        /// Milliseconds the lease has left.
        left_ms: u64,
    },
    /// The key was stored since the miss was read: read it again.
    Filled,
}

/// After a miss, takes the key's fill lease for `lease_ms` with the miss's
/// token, so that concurrent misses of the key on every agent make one load.
/// A lease ends when the key is written ([`put`]), when its holder's fill is
/// refused, when an invalidation of the key or of a pattern matching it
/// overtakes its token (the next miss takes it over), or after `lease_ms`.
/// A miss that finds the lease held marks it waited for, so that its end is
/// published on the partition's fills channel.
pub async fn take_lease(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    key: &str,
    token: &FillToken,
    lease_ms: u64,
) -> RedisResult<Lease> {
    let p = partition;
    let (state, ms): (String, i64) = LEASE
        .key(p.lease(tenant, key))
        .key(p.value(tenant, key))
        .key(p.key_marker(tenant, key))
        .key(p.pattern_markers(tenant))
        .key(p.epoch())
        .arg(token.encode())
        .arg(token.seq)
        .arg(lease_ms.max(1))
        .arg(key)
        .invoke_async(conn)
        .await?;
    Ok(match state.as_str() {
        "mine" => Lease::Mine,
        "filled" => Lease::Filled,
        _ => Lease::Held { left_ms: u64::try_from(ms).unwrap_or(0) },
    })
}

/// A fill token issued now: the partition's epoch and head seq, and Redis's
/// time, in one round trip (what a miss's [`get`] reads with the entry). For
/// an eager refresh of an entry that is still cached.
pub async fn fill_token(conn: &mut impl ConnectionLike, partition: &Partition) -> RedisResult<FillToken> {
    let (epoch, seq, (secs, micros)): (Option<String>, Option<u64>, (u64, u64)) =
        redis::pipe().get(partition.epoch()).get(partition.seq()).cmd("TIME").query_async(conn).await?;
    let epoch = match epoch {
        Some(e) => e,
        None => ensure_epoch(conn, partition).await?,
    };
    Ok(FillToken { epoch, seq: seq.unwrap_or(0), issued_ms: secs * 1000 + micros / 1000 })
}

/// The payload of a fill notice for `tenant`/`key` (see [`Partition::fills`]).
pub fn fill_notice(tenant: &str, key: &str) -> String {
    format!("{tenant}\n{key}")
}

/// The tenant and key of a fill notice.
pub fn read_fill_notice(payload: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(payload).ok()?.split_once('\n')
}

/// Why a write with a fill token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleFill {
    /// The partition moved to a new epoch since the token was issued.
    Epoch,
    /// The token is older than [`crate::protocol::FILL_TOKEN_TTL_MS`].
    Expired,
    /// Something covering the entry was invalidated after the token.
    Invalidated,
}

impl StaleFill {
    /// What to tell the client.
    pub fn explain(self) -> &'static str {
        match self {
            StaleFill::Epoch => "Redis lost its data, or a failover forked the log, since the fill token was issued",
            StaleFill::Expired => "the fill token has expired",
            StaleFill::Invalidated => {
                "the key, one of its tags or depends_on keys, or a pattern matching it was invalidated after the fill token was issued"
            }
        }
    }
}

/// Writes an entry to L2 with its indexes, atomically; with a fill token, only
/// if nothing covering it was invalidated since (see [`PUT`]). Ends the key's
/// fill lease, as a refused fill of the lease's holder does, and publishes a
/// fill notice when an agent waits for it (`sharded`: with `SPUBLISH`).
pub async fn put(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    key: &str,
    entry: &Entry,
    token: Option<&FillToken>,
    sharded: bool,
) -> RedisResult<Result<(), StaleFill>> {
    let p = partition;
    let mut inv = PUT.prepare_invoke();
    inv.key(p.value(tenant, key)).key(p.epoch()).key(p.epoch_born()).key(p.pattern_markers(tenant));
    inv.key(p.lease(tenant, key)).key(p.fills());
    let mut markers = 0;
    if token.is_some() {
        inv.key(p.key_marker(tenant, key));
        for tag in &entry.tags {
            inv.key(p.tag_marker(tenant, tag));
        }
        for dep in &entry.depends_on {
            inv.key(p.key_marker(tenant, dep));
        }
        markers = 1 + entry.tags.len() + entry.depends_on.len();
    }
    inv.key(p.tenant_keys(tenant));
    for tag in &entry.tags {
        inv.key(p.tag(tenant, tag));
    }
    for dep in &entry.depends_on {
        inv.key(p.dependents(tenant, dep));
    }
    let deps = entry.depends_on.join(&DEPS_SEPARATOR.to_string());
    inv.arg(&entry.value[..])
        .arg(&entry.content_type)
        .arg(entry.tags.join(","))
        .arg(deps)
        .arg(entry.ttl_ms.max(1))
        .arg(key)
        .arg(markers)
        .arg(new_epoch_id());
    match token {
        Some(t) => inv.arg(&t.epoch).arg(t.seq).arg(t.issued_ms).arg(crate::protocol::FILL_TOKEN_TTL_MS),
        None => inv.arg("").arg(0).arg(0).arg(0),
    };
    inv.arg(entry.sealed_by.as_deref().unwrap_or(""))
        .arg(token.map(FillToken::encode).unwrap_or_default())
        .arg(if sharded { "SPUBLISH" } else { "PUBLISH" })
        .arg(fill_notice(tenant, key));
    let outcome: String = inv.invoke_async(conn).await?;
    Ok(match outcome.as_str() {
        "ok" => Ok(()),
        "epoch" => Err(StaleFill::Epoch),
        "expired" => Err(StaleFill::Expired),
        _ => Err(StaleFill::Invalidated),
    })
}

/// One key as the key explorer lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = ListedKey)]
pub struct Listed {
    /// The key.
    pub key: String,
    /// The size of the value as stored (the ciphertext, for a sealed one).
    pub bytes: u64,
    /// Whole seconds left to live (rounded up).
    pub ttl_secs: u64,
    /// Its tags.
    pub tags: Vec<String>,
}

/// A page of the key explorer, and where the next one starts (`None`: this
/// was the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The keys of this page, live and of the partition's current epoch.
    pub keys: Vec<Listed>,
    /// The cursor of the next page.
    pub cursor: Option<ListCursor>,
}

/// Where a listing stands: a `ZSCAN` cursor over the tenant's key index, and
/// how many matching members of the batch that cursor returns were already
/// listed (a small index comes back whole from one `ZSCAN`, whatever its
/// `COUNT`). Written `"{scan}.{skip}"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListCursor {
    /// The `ZSCAN` cursor.
    pub scan: u64,
    /// Members of its batch already listed.
    pub skip: usize,
}

impl ListCursor {
    /// Reads a cursor this service wrote.
    pub fn decode(text: &str) -> Option<ListCursor> {
        let (scan, skip) = text.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(scan) || !digits(skip) {
            return None;
        }
        Some(ListCursor { scan: scan.parse().ok()?, skip: skip.parse().ok()? })
    }

    /// As the API gives it.
    pub fn encode(self) -> String {
        format!("{}.{}", self.scan, self.skip)
    }
}

/// Most `ZSCAN` calls one page makes before it answers with what it found
/// (a sparse pattern over a large tenant): the next page goes on from there.
const MAX_SCANS_PER_PAGE: usize = 64;

/// Lists up to `limit` keys of a tenant whose names match `pattern` (the
/// glob dialect), from `cursor`: `ZSCAN ... MATCH` over the tenant's key
/// index, then each entry's size, TTL, tags and epoch in one pipeline.
/// Entries the index still names but that expired, or that were written in
/// another epoch, are left out, so a page can hold fewer than `limit` keys.
/// Following the cursors lists every key present throughout at least once,
/// as `ZSCAN` does (once unless the index is rehashed meanwhile).
pub async fn list_keys(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    pattern: &str,
    cursor: ListCursor,
    limit: usize,
) -> RedisResult<Page> {
    let index = partition.tenant_keys(tenant);
    let mut names: Vec<String> = Vec::new();
    let mut at = cursor;
    let mut next = None;
    for _ in 0..MAX_SCANS_PER_PAGE {
        let (scan, flat): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(&index)
            .arg(at.scan)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(limit.max(100))
            .query_async(conn)
            .await?;
        // Members and scores alternate.
        let members: Vec<String> = flat.into_iter().step_by(2).skip(at.skip).collect();
        let room = limit - names.len();
        if members.len() > room {
            names.extend(members.into_iter().take(room));
            next = Some(ListCursor { scan: at.scan, skip: at.skip + room });
            break;
        }
        names.extend(members);
        if scan == 0 {
            break;
        }
        at = ListCursor { scan, skip: 0 };
        next = Some(at);
        if names.len() == limit {
            break;
        }
    }
    let mut pipe = redis::pipe();
    pipe.get(partition.epoch());
    for name in &names {
        let vkey = partition.value(tenant, name);
        pipe.cmd("HMGET").arg(&vkey).arg("e").arg("tags").cmd("HSTRLEN").arg(&vkey).arg("v").pttl(&vkey);
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut replies = replies.into_iter();
    let epoch: Option<String> = match replies.next() {
        Some(value) => redis::from_redis_value(value)?,
        None => None,
    };
    let mut keys = Vec::new();
    for name in names {
        let (Some(fields), Some(bytes), Some(pttl)) = (replies.next(), replies.next(), replies.next()) else {
            break;
        };
        let (entry_epoch, tags): (Option<String>, Option<String>) = redis::from_redis_value(fields)?;
        let bytes: u64 = redis::from_redis_value(bytes)?;
        let pttl: i64 = redis::from_redis_value(pttl)?;
        if entry_epoch.is_none() || entry_epoch != epoch || pttl < 0 {
            continue;
        }
        let tags =
            tags.filter(|t| !t.is_empty()).map(|t| t.split(',').map(str::to_string).collect()).unwrap_or_default();
        let ttl_secs = u64::try_from(pttl).unwrap_or(0).div_ceil(1000);
        keys.push(Listed { key: name, bytes, ttl_secs, tags });
    }
    Ok(Page { keys, cursor: next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_another_epoch_are_misses() {
        let fields = |e: &str| {
            HashMap::from([
                ("v".to_string(), b"x".to_vec()),
                ("ct".to_string(), b"text/plain".to_vec()),
                ("e".to_string(), e.as_bytes().to_vec()),
            ])
        };
        assert_eq!(entry_from_fields(fields("e1"), 1000, "e1").and_then(|e| e.sealed_by), None);
        let mut sealed = fields("e1");
        sealed.insert("x".to_string(), b"k1".to_vec());
        assert_eq!(entry_from_fields(sealed, 1000, "e1").and_then(|e| e.sealed_by).as_deref(), Some("k1"));
        assert!(entry_from_fields(fields("e0"), 1000, "e1").is_none());
        let mut unstamped = fields("e1");
        unstamped.remove("e");
        assert!(entry_from_fields(unstamped, 1000, "e1").is_none());
    }

    #[test]
    fn list_cursors_read_back_only_what_was_written() {
        let c = ListCursor { scan: 123, skip: 7 };
        assert_eq!(ListCursor::decode(&c.encode()), Some(c));
        for bad in ["", ".", "1.", ".1", "1", "a.b", "1.2.3", "-1.0", "+1.0", "1 .0", "99999999999999999999999.0"] {
            assert_eq!(ListCursor::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_last_record_names_the_nonce_of_its_own_seq_only() {
        assert_eq!(last_nonce(Some("7 abc"), 7), "abc");
        assert_eq!(last_nonce(Some("6 abc"), 7), "");
        assert_eq!(last_nonce(None, 0), "");
        assert_eq!(last_nonce(Some("garbage"), 7), "");
    }
}
