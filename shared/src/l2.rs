//! L2: the entries in Redis and the indexes that find them again (tenant key
//! index, tag members, dependents), kept consistent by small Lua scripts.
//!
//! Every write goes through [`put`], which stores the entry and indexes it in
//! one atomic script. Deletions come in bounded chunks ([`CHUNK`] members per
//! call) so that no single Redis call blocks the server for long; they are only
//! ever driven by the invalidation path in [`crate::invalidation`].

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::protocol::FillToken;
use crate::schema;

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
    /// Time to live left, in milliseconds.
    pub ttl_ms: u64,
}

/// The answer to an L2 read: the entry if there is one, and the log position
/// observed before the read, which becomes the fill token of a miss.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The entry, if L2 has it.
    pub entry: Option<Entry>,
    /// Log position read before the entry, in the same pipeline.
    pub token: FillToken,
}

/// Separator of `depends_on` keys inside the `deps` field: keys cannot contain
/// control characters, so a newline never occurs inside one.
const DEPS_SEPARATOR: char = '\n';

/// Creates the epoch if Redis has none (a fresh or emptied dataset), with its
/// birth time, and returns it.
static ENSURE_EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1] epoch, KEYS[2] epoch birth; ARGV[1] epoch candidate
local e = redis.call('GET', KEYS[1])
if not e then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000))
  e = ARGV[1]
end
return e",
    )
});

/// The scripts of this module, for [`crate::invalidation::load_scripts`].
pub(crate) fn scripts() -> [&'static Script; 4] {
    [&ENSURE_EPOCH, &PUT, &DELETE, &DETACH]
}

/// Returns the epoch of this Redis dataset, creating it if needed.
pub async fn ensure_epoch(conn: &mut impl ConnectionLike) -> RedisResult<String> {
    ENSURE_EPOCH
        .key(schema::EPOCH)
        .key(schema::EPOCH_BORN)
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .invoke_async(conn)
        .await
}

/// The head of the log: the epoch and the last seq handed out in it.
pub async fn head(conn: &mut impl ConnectionLike) -> RedisResult<(String, u64)> {
    let (epoch, seq): (Option<String>, Option<u64>) =
        redis::pipe().get(schema::EPOCH).get(schema::SEQ).query_async(conn).await?;
    let epoch = match epoch {
        Some(e) => e,
        None => ensure_epoch(conn).await?,
    };
    Ok((epoch, seq.unwrap_or(0)))
}

/// What one pipelined read returns: epoch, seq, time, the entry's fields, its PTTL.
type ReadReply = (Option<String>, Option<u64>, (u64, u64), HashMap<String, Vec<u8>>, i64);

/// Reads an entry, and the log position just before it (in the same
/// pipeline, which Redis runs in order), which is the fill token of a miss.
pub async fn get(conn: &mut impl ConnectionLike, tenant: &str, key: &str) -> RedisResult<Lookup> {
    let vkey = schema::value(tenant, key);
    let (epoch, seq, (secs, micros), fields, pttl): ReadReply = redis::pipe()
        .get(schema::EPOCH)
        .get(schema::SEQ)
        .cmd("TIME")
        .hgetall(&vkey)
        .pttl(&vkey)
        .query_async(conn)
        .await?;
    let epoch = match epoch {
        Some(e) => e,
        None => ensure_epoch(conn).await?,
    };
    let token = FillToken { epoch, seq: seq.unwrap_or(0), issued_ms: secs * 1000 + micros / 1000 };
    Ok(Lookup { entry: entry_from_fields(fields, pttl), token })
}

fn entry_from_fields(mut fields: HashMap<String, Vec<u8>>, pttl: i64) -> Option<Entry> {
    // A hash without `v` is not an entry (or expired between the two reads).
    let value = fields.remove("v")?;
    let text = |f: Option<Vec<u8>>| f.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
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
/// can slip between them (see `invalidation::BEGIN` for why that is enough).
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1] entry hash, KEYS[2] epoch, KEYS[3] pattern markers,
-- KEYS[4 .. 3+nm] markers (key, tags, depends_on keys), then index zsets
-- (tenant keys, tags, dependents).
-- ARGV: value, content type, tags, deps, ttl ms, key, nm,
--       token epoch ('' without a token), token seq, token issued ms, token ttl ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local nm = tonumber(ARGV[7])
if ARGV[8] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[8] then return 'epoch' end
  if now - tonumber(ARGV[10]) > tonumber(ARGV[11]) then return 'expired' end
  local seq = tonumber(ARGV[9])
  for i = 4, 3 + nm do
    local m = redis.call('GET', KEYS[i])
    if m and tonumber(m) > seq then return 'invalidated' end
  end
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. seq, '+inf')) do
    if string.find(ARGV[6], p) then return 'invalidated' end
  end
end
local ttl = tonumber(ARGV[5])
local expiry = now + ttl
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ct', ARGV[2], 'tags', ARGV[3], 'deps', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 4 + nm, #KEYS do
  local idx = KEYS[i]
  redis.call('ZADD', idx, 'GT', expiry, ARGV[6])
  local gone = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, 8)
  if #gone > 0 then redis.call('ZREM', idx, unpack(gone)) end
  local left = redis.call('PTTL', idx)
  if left == -1 or left < ttl then redis.call('PEXPIRE', idx, ttl) end
end
return 'ok'",
    )
});

/// Why a write with a fill token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleFill {
    /// Redis lost its data since the token was issued.
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
            StaleFill::Epoch => "Redis lost its data since the fill token was issued",
            StaleFill::Expired => "the fill token has expired",
            StaleFill::Invalidated => {
                "the key, one of its tags or depends_on keys, or a pattern matching it was invalidated after the fill token was issued"
            }
        }
    }
}

/// Writes an entry to L2 with its indexes, atomically; with a fill token, only
/// if nothing covering it was invalidated since (see [`PUT`]).
pub async fn put(
    conn: &mut impl ConnectionLike,
    tenant: &str,
    key: &str,
    entry: &Entry,
    token: Option<&FillToken>,
) -> RedisResult<Result<(), StaleFill>> {
    let mut inv = PUT.prepare_invoke();
    inv.key(schema::value(tenant, key)).key(schema::EPOCH).key(schema::pattern_markers(tenant));
    let mut markers = 0;
    if token.is_some() {
        inv.key(schema::key_marker(tenant, key));
        for tag in &entry.tags {
            inv.key(schema::tag_marker(tenant, tag));
        }
        for dep in &entry.depends_on {
            inv.key(schema::key_marker(tenant, dep));
        }
        markers = 1 + entry.tags.len() + entry.depends_on.len();
    }
    inv.key(schema::tenant_keys(tenant));
    for tag in &entry.tags {
        inv.key(schema::tag(tenant, tag));
    }
    for dep in &entry.depends_on {
        inv.key(schema::dependents(tenant, dep));
    }
    let deps = entry.depends_on.join(&DEPS_SEPARATOR.to_string());
    inv.arg(&entry.value[..])
        .arg(&entry.content_type)
        .arg(entry.tags.join(","))
        .arg(deps)
        .arg(entry.ttl_ms.max(1))
        .arg(key)
        .arg(markers);
    match token {
        Some(t) => inv.arg(&t.epoch).arg(t.seq).arg(t.issued_ms).arg(crate::protocol::FILL_TOKEN_TTL_MS),
        None => inv.arg("").arg(0).arg(0).arg(0),
    };
    let outcome: String = inv.invoke_async(conn).await?;
    Ok(match outcome.as_str() {
        "ok" => Ok(()),
        "epoch" => Err(StaleFill::Epoch),
        "expired" => Err(StaleFill::Expired),
        _ => Err(StaleFill::Invalidated),
    })
}

/// Deletes one chunk of entries, marks each key for fill tokens, removes them
/// from the tenant index and, with `cascade`, returns (and drops) their
/// dependents sets. The chunk is either the keys given, or the first members
/// of a tag's draining set, which leave the set in the same step, once their
/// entries are gone (so a second coordinator draining the same tag cannot
/// find the set empty while entries are still in L2).
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1] tenant index, KEYS[2] (optional) a draining set to take the chunk from
-- ARGV: cascade ('1' or '0'), marker value, marker ttl ms, then the key
--       prefixes of entries, dependents sets and key markers, then either
--       the chunk size (draining) or the keys themselves
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local mark = tonumber(ARGV[2])
local keys
if #KEYS == 2 then
  keys = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[7]) - 1)
else
  keys = {unpack(ARGV, 7)}
end
if #keys == 0 then return {0, keys, {}} end
-- One call per kind of work, not per key: entries, index records, markers.
local entries, markers = {}, {}
for i, key in ipairs(keys) do
  entries[i] = ARGV[4] .. key
  markers[i] = ARGV[6] .. key
end
local deleted = redis.call('UNLINK', unpack(entries))
redis.call('ZREM', KEYS[1], unpack(keys))
local old = redis.call('MGET', unpack(markers))
for i, marker in ipairs(markers) do
  if not old[i] or tonumber(old[i]) < mark then redis.call('SET', marker, mark, 'PX', ARGV[3]) end
end
local deps = {}
if ARGV[1] == '1' then
  local sets = {}
  for i, key in ipairs(keys) do sets[i] = ARGV[5] .. key end
  -- Most entries have no dependents: one EXISTS tells, before any per-key read.
  if redis.call('EXISTS', unpack(sets)) > 0 then
    for _, set in ipairs(sets) do
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', set, now, '+inf')) do deps[#deps + 1] = m end
    end
    redis.call('UNLINK', unpack(sets))
  end
end
-- The members read above, still first in the set (the script is atomic).
if #KEYS == 2 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, #keys - 1) end
return {deleted, keys, deps}",
    )
});

/// What one [`DELETE`] call did: entries that existed, the keys handled, and
/// the dependents found (with `cascade`).
type Deleted = (u64, Vec<String>, Vec<String>);

/// A [`DELETE`] call with the common arguments in place.
fn delete_call(tenant: &str, cascade: bool, mark: u64) -> redis::ScriptInvocation<'static> {
    let mut inv = DELETE.prepare_invoke();
    inv.key(schema::tenant_keys(tenant))
        .arg(if cascade { "1" } else { "0" })
        .arg(mark)
        .arg(MARKER_TTL_MS)
        .arg(schema::value(tenant, ""))
        .arg(schema::dependents(tenant, ""))
        .arg(schema::key_marker(tenant, ""));
    inv
}

/// Deletes entries by exact key, in chunks, marking each key with `mark` for
/// fill tokens. Returns how many existed, and the keys that depend on them
/// (only with `cascade`).
pub async fn delete_keys(
    conn: &mut impl ConnectionLike,
    tenant: &str,
    keys: &[String],
    cascade: bool,
    mark: u64,
) -> RedisResult<(u64, Vec<String>)> {
    let mut deleted = 0;
    let mut dependents = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut inv = delete_call(tenant, cascade, mark);
        for key in chunk {
            inv.arg(key);
        }
        let (n, _, deps): Deleted = inv.invoke_async(conn).await?;
        deleted += n;
        dependents.extend(deps);
    }
    Ok((deleted, dependents))
}

/// Deletes the next [`DRAIN_CHUNK`] members of a draining set (see
/// [`detach_tags`]) and removes them from it. Returns how many entries existed,
/// the members handled (none once the set is drained) and their dependents.
pub async fn drain_chunk(
    conn: &mut impl ConnectionLike,
    tenant: &str,
    set: &str,
    cascade: bool,
    mark: u64,
) -> RedisResult<(u64, Vec<String>, Vec<String>)> {
    let mut inv = delete_call(tenant, cascade, mark);
    inv.key(set).arg(DRAIN_CHUNK);
    inv.invoke_async(conn).await
}

/// Members deleted by one [`drain_chunk`] call: small enough that the call
/// stays in the low milliseconds.
pub const DRAIN_CHUNK: usize = 500;

/// How long fill-token markers live: longer than a token.
pub const MARKER_TTL_MS: u64 = crate::protocol::FILL_TOKEN_TTL_MS + 10_000;

/// Detaches a tag's members for deletion: renames the tag's set to the tag's
/// draining set (O(1), however many members), so that entries stored after
/// this moment are not swept up by the drain that follows. There is one
/// draining set per tag: if one is already there (another invalidation of the
/// tag is draining it, or died while doing so) nothing is renamed, and the
/// caller drains that set first and detaches again.
static DETACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS: pairs of (tag set, its draining set); returns one status per pair
local found = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    found[#found + 1] = 1
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    found[#found + 1] = 2
  else
    found[#found + 1] = 0
  end
end
return found",
    )
});

/// What [`detach_tags`] found for a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// The tag has no members: nothing to drain.
    Nothing,
    /// A draining set was already there: drain it, then detach again.
    Leftover(String),
    /// The tag's members are now in this draining set: drain it, and done.
    Members(String),
}

/// Detaches the members of each tag (see [`DETACH`]), one call per
/// [`CHUNK`] tags: an event that names many tags costs one round trip.
pub async fn detach_tags(conn: &mut impl ConnectionLike, tenant: &str, tags: &[String]) -> RedisResult<Vec<Detached>> {
    let mut found = Vec::with_capacity(tags.len());
    for inv in detach_calls(tenant, tags) {
        let chunk: Vec<i64> = inv.invoke_async(conn).await?;
        found.extend(chunk);
    }
    Ok(detached(tenant, tags, found))
}

/// The [`DETACH`] calls of [`detach_tags`], one per [`CHUNK`] tags, for a
/// caller that sends them in a pipeline with other work.
pub fn detach_calls(tenant: &str, tags: &[String]) -> Vec<redis::ScriptInvocation<'static>> {
    tags.chunks(CHUNK)
        .map(|chunk| {
            let mut inv = DETACH.prepare_invoke();
            for tag in chunk {
                inv.key(schema::tag(tenant, tag)).key(schema::draining(tenant, tag));
            }
            inv
        })
        .collect()
}

/// Reads the statuses the [`detach_calls`] answered, one per tag in order.
pub fn detached(tenant: &str, tags: &[String], found: Vec<i64>) -> Vec<Detached> {
    tags.iter()
        .zip(found)
        .map(|(tag, found)| match found {
            1 => Detached::Leftover(schema::draining(tenant, tag)),
            2 => Detached::Members(schema::draining(tenant, tag)),
            _ => Detached::Nothing,
        })
        .collect()
}

/// One step of a `ZSCAN` over an index zset: the next cursor, and the members
/// (with their expiry scores) matching `pattern`, if given.
pub async fn scan_index(
    conn: &mut impl ConnectionLike,
    index: &str,
    cursor: u64,
    pattern: Option<&str>,
) -> RedisResult<(u64, Vec<(String, f64)>)> {
    let mut cmd = redis::cmd("ZSCAN");
    cmd.arg(index).arg(cursor);
    if let Some(p) = pattern {
        cmd.arg("MATCH").arg(p);
    }
    cmd.arg("COUNT").arg(CHUNK);
    cmd.query_async(conn).await
}

/// Which of these keys have an entry in L2 (one pipeline).
pub async fn existing(conn: &mut impl ConnectionLike, tenant: &str, keys: &[String]) -> RedisResult<Vec<String>> {
    let mut found = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.exists(schema::value(tenant, key));
        }
        let flags: Vec<bool> = pipe.query_async(conn).await?;
        found.extend(chunk.iter().zip(flags).filter(|(_, f)| *f).map(|(k, _)| k.clone()));
    }
    Ok(found)
}

/// The live dependents of each key (one pipeline per chunk).
pub async fn dependents_of(
    conn: &mut impl ConnectionLike,
    tenant: &str,
    keys: &[String],
    now_ms: u64,
) -> RedisResult<Vec<String>> {
    let mut found = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.zrangebyscore(schema::dependents(tenant, key), now_ms, "+inf");
        }
        let lists: Vec<Vec<String>> = pipe.query_async(conn).await?;
        found.extend(lists.into_iter().flatten());
    }
    Ok(found)
}
