//! The invalidation path, L2 side, in the order it runs, with its scripts
//! beside it (`*.lua` in this folder):
//!
//! 0. **Resolve** happened before this module: the coordinator turned events and
//!    rules into [`Selector`]s (an agent's `DELETE` is one key), and
//!    [`Request::split`] divided them by partition. Everything below runs in
//!    one partition, on one slot of a cluster.
//! 1. **Idempotency** ([`already_logged_each`]): a request whose event ids were
//!    all logged before is answered with the seq it got then.
//! 2. **Announce** ([`announce`], `begin.lua` and `detach.lua`): fill-token
//!    markers for the request's keys, tags and patterns, so that no fill racing
//!    it can store an old value; each tag's members move to its draining set.
//! 3. **Delete from L2** ([`delete_selector`], `delete.lua`): exact keys, every
//!    member of each tag (drained in chunks), every key of the tenant matching
//!    each pattern (`ZSCAN` over the tenant's key index, never `KEYS`), then,
//!    with `cascade`, the keys that `depends_on` any of those, transitively. The
//!    dependents found are added to the selector's keys, so that agents drop
//!    them even when their own indexes do not know the chain.
//! 4. **Log and broadcast** ([`append`], `append.lua`): one script takes the
//!    partition's next seq, appends the message (with a random nonce, and the
//!    nonce of the message before it) to the partition's log and publishes it
//!    on the partition's channel. Seq, log and broadcast are therefore atomic
//!    and in one order, even with several coordinators.
//! 5. **Replicate** ([`replicate`]): with replicas required (`min_replicas`),
//!    `WAIT` until that many replicas hold everything written so far; until then
//!    the invalidation is not answered, so that a failover cannot undo an
//!    answered one.
//! 6. **Apply to L1**: every agent's subscriber hands the message to its L1
//!    (`node_agent::sync`), which drops matching entries.
//!
//! A caller gets an [`Outcome`] only after step 5. Tools of the path follow:
//! [`preview`] (dry runs), [`read_log`] (replay), [`rotate`] (forks) and
//! [`load_scripts`].

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisError, RedisResult, Script};

use crate::glob;
use crate::l2::{self, CHUNK};
use crate::protocol::{now_ms, InvalidationMessage, MessageBody, Position, Selector, MESSAGE_VERSION};
use crate::schema::{Layout, Partition};
use crate::script::with_prelude;

/// How long an `event_id` is remembered for idempotent retries.
pub const EVENT_ID_TTL_SECS: u64 = 24 * 3600;

/// One invalidation to carry out.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// What to invalidate, per tenant.
    pub items: Vec<Selector>,
    /// Idempotency ids `(tenant, event_id)`: a request whose ids were all logged
    /// before is answered with the seq it got then, and does nothing again.
    pub event_ids: Vec<(String, String)>,
    /// Who issues it, recorded in the message.
    pub origin: String,
    /// The caller waits for every agent's acknowledgement (`wait=all`): the
    /// message asks agents to publish theirs (see
    /// [`crate::protocol::InvalidationMessage::ack`]).
    pub ack: bool,
}

impl Request {
    /// Divides the request by partition (in partition order): each part holds
    /// the selectors and event ids of the tenants of one partition.
    pub fn split(self, layout: &Layout) -> Vec<(u16, Request)> {
        let mut parts: BTreeMap<u16, Request> = BTreeMap::new();
        let (origin, ack) = (self.origin, self.ack);
        let new = || Request { origin: origin.clone(), ack, ..Request::default() };
        for selector in self.items {
            let index = layout.of(&selector.tenant).index;
            parts.entry(index).or_insert_with(new).items.push(selector);
        }
        for (tenant, id) in self.event_ids {
            let index = layout.of(&tenant).index;
            parts.entry(index).or_insert_with(new).event_ids.push((tenant, id));
        }
        parts.into_iter().collect()
    }
}

/// What an invalidation did in one partition.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Where it was logged.
    pub position: Position,
    /// The selectors as logged (keys include dependents found in L2).
    pub invalidated: Vec<Selector>,
    /// Entries that existed in L2 and were deleted.
    pub l2_deleted: u64,
    /// True when every event id had been logged before: nothing was done again.
    pub duplicate: bool,
}

/// How many replicas must hold an invalidation before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinReplicas {
    /// 1 while the primary has a connected replica, else 0.
    #[default]
    Auto,
    /// Exactly this many (0: never wait).
    Count(u32),
}

impl<'de> serde::Deserialize<'de> for MinReplicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(MinReplicas::Count(n)),
            Raw::Text(t) if t == "auto" => Ok(MinReplicas::Auto),
            // Environment variables arrive as text.
            Raw::Text(t) => t
                .parse::<u32>()
                .map(MinReplicas::Count)
                .map_err(|_| serde::de::Error::custom(format!("min_replicas must be a number or \"auto\", not {t:?}"))),
        }
    }
}

/// How the log is kept and broadcast; the same for every process.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Length each partition's log is trimmed to (approximately).
    pub max_len: u64,
    /// Publish with `SPUBLISH` (a Redis Cluster: the message stays in its
    /// shard) instead of `PUBLISH`.
    pub sharded: bool,
    /// Replicas that must hold an invalidation before it is answered.
    pub min_replicas: MinReplicas,
    /// How long to wait for them.
    pub replica_timeout_ms: u64,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { max_len: 100_000, sharded: false, min_replicas: MinReplicas::Auto, replica_timeout_ms: 1000 }
    }
}

/// Logged and broadcast, but not held by enough replicas in time: a failover
/// could still lose it. Retry it, with the same `event_id`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "logged at seq {} of partition {}, but only {reached} of {wanted} replicas acknowledged it in time",
    .position.seq, .position.partition
)]
pub struct NotReplicated {
    /// Where it was logged.
    pub position: Position,
    /// Replicas required.
    pub wanted: u32,
    /// Replicas that acknowledged.
    pub reached: u32,
}

/// Why an invalidation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvalidationError {
    /// Redis failed or is unreachable: it may be partly done; retry it.
    #[error("{0}")]
    Redis(#[from] RedisError),
    /// See [`NotReplicated`].
    #[error(transparent)]
    NotReplicated(#[from] NotReplicated),
}

/// Runs steps 1 to 5 of the path for one partition's request; see the module docs.
pub async fn execute(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    request: Request,
    settings: &LogSettings,
) -> Result<Outcome, InvalidationError> {
    // Step 1: a retry of logged event ids does nothing again.
    if let Some(seq) = already_logged_each(conn, partition, &[&request.event_ids]).await?.pop().flatten() {
        return answer_duplicate(conn, partition, seq, settings).await;
    }

    // Steps 2 and 3: announce to fill tokens and detach tags' members, then
    // delete from L2, collecting dependents into each selector's keys.
    let announced = announce(conn, partition, &request.items).await?;
    let mut l2_deleted = 0;
    let mut invalidated = Vec::with_capacity(request.items.len());
    for (selector, (mark, detached)) in request.items.into_iter().zip(announced) {
        let (deleted, selector) = delete_selector(conn, partition, selector, mark, detached).await?;
        l2_deleted += deleted;
        invalidated.push(selector);
    }

    // Step 4: log and broadcast (and count the replicas step 5 must reach,
    // in the same round trip).
    let (position, wanted) =
        append(conn, partition, &invalidated, &request.origin, request.ack, &request.event_ids, settings).await?;

    // Step 5: held by the replicas before it is answered.
    replicate(conn, partition, &position, settings, wanted).await?;
    Ok(Outcome { position, invalidated, l2_deleted, duplicate: false })
}

// ---- Step 1: idempotency ---------------------------------------------------

/// For each request's event ids, the highest seq they were logged under, if
/// every one of them was (one round trip for all; ids of one partition).
pub async fn already_logged_each(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    requests: &[&[(String, String)]],
) -> RedisResult<Vec<Option<u64>>> {
    let mut pipe = redis::pipe();
    for event_ids in requests.iter().filter(|ids| !ids.is_empty()) {
        pipe.cmd("MGET");
        for (tenant, id) in event_ids.iter() {
            pipe.arg(partition.event(tenant, id));
        }
    }
    let mut found: std::vec::IntoIter<Vec<Option<u64>>> =
        if pipe.cmd_iter().next().is_none() { Vec::new() } else { pipe.query_async(conn).await? }.into_iter();
    Ok(requests
        .iter()
        .map(|ids| {
            if ids.is_empty() {
                return None;
            }
            let seqs = found.next()?.into_iter().collect::<Option<Vec<u64>>>()?;
            seqs.into_iter().max()
        })
        .collect())
}

/// The answer to a request whose event ids were all logged under `seq`: its
/// position (the nonce unknown) once the replicas hold what was written, as
/// for the first answer (the first attempt may have ended in `not_replicated`).
pub async fn answer_duplicate(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    seq: u64,
    settings: &LogSettings,
) -> Result<Outcome, InvalidationError> {
    let head = l2::head(conn, partition).await?;
    let position = Position { partition: partition.index, epoch: head.epoch, seq, nonce: String::new() };
    let wanted = wanted_replicas(conn, partition, settings).await?;
    if wanted > 0 {
        // WAIT counts this connection's writes, up to its last one that was
        // replicated: make one (INCRBY 0 always is, and changes nothing), so
        // that it covers everything before, the original invalidation included.
        let _: u64 = redis::cmd("INCRBY").arg(partition.seq()).arg(0).query_async(conn).await?;
        replicate(conn, partition, &position, settings, wanted).await?;
    }
    Ok(Outcome { position, duplicate: true, ..Outcome::default() })
}

// ---- Step 2: announce --------------------------------------------------------

/// Writes the fill-token markers of an invalidation's explicit keys, tags and
/// patterns. Every marker gets the *mark*: one above the log head now, so
/// that it is above the seq of every fill token issued before this moment.
/// Returns the mark.
///
/// Why markers are enough: a fill's `PUT` script and each step of the
/// deletion are atomic, so for every entry one of two things happens first.
/// Either the fill writes (and indexes) the entry before the deletion looks
/// for it, and the deletion removes it; or the deletion (or this script)
/// marks it first, and a fill whose token predates this moment is refused.
/// A token issued after this moment was issued after the write it announces,
/// so the value read with it is not stale.
static BEGIN: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("begin.lua")));

/// Detaches a tag's members for deletion: renames the tag's set to the tag's
/// draining set (O(1), however many members), so that entries stored after
/// this moment are not swept up by the drain that follows. There is one
/// draining set per tag: if one is already there (another invalidation of the
/// tag is draining it, or died while doing so) nothing is renamed, and the
/// caller drains that set first and detaches again.
static DETACH: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("detach.lua")));

/// The [`BEGIN`] call of one selector.
fn begin_call(partition: &Partition, selector: &Selector) -> redis::ScriptInvocation<'static> {
    let (p, tenant) = (partition, &selector.tenant);
    let mut inv = BEGIN.prepare_invoke();
    inv.key(p.seq()).key(p.pattern_markers(tenant)).key(p.pattern_marker_times(tenant));
    for key in &selector.keys {
        inv.key(p.key_marker(tenant, key));
    }
    for tag in &selector.tags {
        inv.key(p.tag_marker(tenant, tag));
    }
    inv.arg(MARKER_TTL_MS);
    for pattern in &selector.patterns {
        inv.arg(glob::to_lua_pattern(pattern));
    }
    inv
}

/// The [`DETACH`] calls for a tenant's tags, one per [`CHUNK`] tags.
fn detach_calls(partition: &Partition, tenant: &str, tags: &[String]) -> Vec<redis::ScriptInvocation<'static>> {
    tags.chunks(CHUNK)
        .map(|chunk| {
            let mut inv = DETACH.prepare_invoke();
            for tag in chunk {
                inv.key(partition.tag(tenant, tag)).key(partition.draining(tenant, tag));
            }
            inv
        })
        .collect()
}

/// What [`DETACH`] found for a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Detached {
    /// The tag has no members: nothing to drain.
    Nothing,
    /// A draining set was already there: drain it, then detach again.
    Leftover(String),
    /// The tag's members are now in this draining set: drain it, and done.
    Members(String),
}

/// Reads the statuses [`DETACH`] answered, one per tag in order.
fn detached(partition: &Partition, tenant: &str, tags: &[String], found: Vec<i64>) -> Vec<Detached> {
    tags.iter()
        .zip(found)
        .map(|(tag, found)| match found {
            1 => Detached::Leftover(partition.draining(tenant, tag)),
            2 => Detached::Members(partition.draining(tenant, tag)),
            _ => Detached::Nothing,
        })
        .collect()
}

/// Step 2, for every selector in one round trip: its [`BEGIN`] (the markers;
/// returns the mark), then the [`DETACH`] of its tags. Redis runs a pipeline
/// in order, so every marker is written before the deletion looks for a
/// single entry. Returns each selector's mark and what detaching its tags found.
async fn announce(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    items: &[Selector],
) -> RedisResult<Vec<(u64, Vec<Detached>)>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    let mut detach_chunks = Vec::with_capacity(items.len());
    for selector in items {
        pipe.invoke_script(&begin_call(partition, selector));
        let calls = detach_calls(partition, &selector.tenant, &selector.tags);
        detach_chunks.push(calls.len());
        for inv in &calls {
            pipe.invoke_script(inv);
        }
    }
    // Running part of it twice (after a lost script cache) is harmless:
    // markers only rise, and a tag detached already reads as a draining set to finish.
    let replies = query_with_scripts(conn, &pipe).await?;
    let mut replies = replies.into_iter();
    let mut next =
        || replies.next().ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Parse, "short pipeline reply")));
    let mut out = Vec::with_capacity(items.len());
    for (selector, chunks) in items.iter().zip(detach_chunks) {
        let mark: u64 = redis::from_redis_value(next()?)?;
        let mut found = Vec::with_capacity(selector.tags.len());
        for _ in 0..chunks {
            let chunk: Vec<i64> = redis::from_redis_value(next()?)?;
            found.extend(chunk);
        }
        out.push((mark, detached(partition, &selector.tenant, &selector.tags, found)));
    }
    Ok(out)
}

// ---- Step 3: delete from L2 --------------------------------------------------

/// Deletes one chunk of entries, marks each key for fill tokens, removes them
/// from the tenant index and, with `cascade`, returns (and drops) their
/// dependents sets. The chunk is either the keys given, or the first members
/// of a tag's draining set, which leave the set in the same step, once their
/// entries are gone (so a second coordinator draining the same tag cannot
/// find the set empty while entries are still in L2).
static DELETE: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("delete.lua")));

/// How long fill-token markers live: longer than a token.
pub const MARKER_TTL_MS: u64 = crate::protocol::FILL_TOKEN_TTL_MS + 10_000;

/// Members deleted by one drain call: small enough that the call stays in the
/// low milliseconds.
pub const DRAIN_CHUNK: usize = 500;

/// What one [`DELETE`] call did: entries that existed, the keys handled, and
/// the dependents found (with `cascade`).
type Deleted = (u64, Vec<String>, Vec<String>);

/// A [`DELETE`] call with the common arguments in place.
fn delete_call(partition: &Partition, tenant: &str, cascade: bool, mark: u64) -> redis::ScriptInvocation<'static> {
    let mut inv = DELETE.prepare_invoke();
    inv.key(partition.tenant_keys(tenant))
        .arg(if cascade { "1" } else { "0" })
        .arg(mark)
        .arg(MARKER_TTL_MS)
        .arg(partition.value(tenant, ""))
        .arg(partition.dependents(tenant, ""))
        .arg(partition.key_marker(tenant, ""));
    inv
}

/// Deletes entries by exact key, in chunks, marking each key with `mark`.
/// Returns how many existed, and the keys that depend on them (with `cascade`).
async fn delete_keys(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    keys: &[String],
    cascade: bool,
    mark: u64,
) -> RedisResult<(u64, Vec<String>)> {
    let mut deleted = 0;
    let mut dependents = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut inv = delete_call(partition, tenant, cascade, mark);
        for key in chunk {
            inv.arg(key);
        }
        let (n, _, deps): Deleted = inv.invoke_async(conn).await?;
        deleted += n;
        dependents.extend(deps);
    }
    Ok((deleted, dependents))
}

/// Deletes everything one selector covers from L2. Returns the number of
/// entries deleted and the selector with the cascaded dependents added to its keys.
async fn delete_selector(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    mut selector: Selector,
    mark: u64,
    tags_detached: Vec<Detached>,
) -> RedisResult<(u64, Selector)> {
    let tenant = selector.tenant.clone();
    let cascade = selector.cascade;
    let mut deleted = 0;
    // Keys deleted so far, to stop cascades at cycles and repeated dependents.
    let mut seen: HashSet<String> = HashSet::new();
    let mut dependents = Vec::new();

    let exact: Vec<String> = selector.keys.iter().filter(|k| seen.insert((*k).clone())).cloned().collect();
    let (n, found) = delete_keys(conn, partition, &tenant, &exact, cascade, mark).await?;
    deleted += n;
    dependents.extend(found);

    // Every tag was detached by `announce`; a draining set found first is
    // finished first, then that tag is detached again and its own members drained.
    for (tag, mut state) in selector.tags.iter().zip(tags_detached) {
        loop {
            let (set, done) = match state {
                Detached::Nothing => break,
                Detached::Leftover(set) => (set, false),
                Detached::Members(set) => (set, true),
            };
            loop {
                let mut inv = delete_call(partition, &tenant, cascade, mark);
                inv.key(&set).arg(DRAIN_CHUNK);
                let (n, members, found): Deleted = inv.invoke_async(conn).await?;
                if members.is_empty() {
                    break;
                }
                deleted += n;
                dependents.extend(found);
                seen.extend(members);
            }
            if done {
                break;
            }
            let mut again = Vec::new();
            for inv in detach_calls(partition, &tenant, std::slice::from_ref(tag)) {
                let found: Vec<i64> = inv.invoke_async(conn).await?;
                again.extend(found);
            }
            state = detached(partition, &tenant, std::slice::from_ref(tag), again)
                .into_iter()
                .next()
                .unwrap_or(Detached::Nothing);
        }
    }

    let index = partition.tenant_keys(&tenant);
    for pattern in &selector.patterns {
        let mut cursor = 0;
        loop {
            let (next, members) = scan_index(conn, &index, cursor, Some(pattern)).await?;
            let fresh: Vec<String> = members.into_iter().map(|(k, _)| k).filter(|k| seen.insert(k.clone())).collect();
            let (n, found) = delete_keys(conn, partition, &tenant, &fresh, cascade, mark).await?;
            deleted += n;
            dependents.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    // Cascade along depends_on, breadth first; `seen` stops cycles.
    while !dependents.is_empty() {
        let wave: Vec<String> =
            std::mem::take(&mut dependents).into_iter().filter(|k| seen.insert(k.clone())).collect();
        if wave.is_empty() {
            break;
        }
        selector.keys.extend(wave.iter().cloned());
        let (n, found) = delete_keys(conn, partition, &tenant, &wave, cascade, mark).await?;
        deleted += n;
        dependents.extend(found);
    }
    Ok((deleted, selector))
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

// ---- Step 4: log and broadcast -----------------------------------------------

/// Takes the next seq, appends the message to the log and publishes it, in
/// one atomic step. The epoch is created here if Redis lost it, so a
/// restarted Redis starts a new epoch.
static APPEND: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("append.lua")));

/// A random message nonce: 16 hex characters.
pub fn new_nonce() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].to_string()
}

/// Step 4: log and broadcast. Returns where the message was logged, and how
/// many replicas step 5 must reach (`min_replicas`, where `auto` is counted
/// with `ROLE` in the same round trip, as [`wanted_replicas`] does).
pub async fn append(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    invalidated: &[Selector],
    origin: &str,
    ack: bool,
    event_ids: &[(String, String)],
    settings: &LogSettings,
) -> RedisResult<(Position, u32)> {
    let body = MessageBody { ts_ms: now_ms(), origin, invalidations: invalidated, ack };
    let tail = body
        .encode_tail()
        .map_err(|e| RedisError::from((redis::ErrorKind::Client, "cannot encode the message", e.to_string())))?;
    let nonce = new_nonce();
    let p = partition;
    let mut inv = APPEND.prepare_invoke();
    inv.key(p.epoch()).key(p.epoch_born()).key(p.seq()).key(p.last()).key(p.log()).key(p.channel());
    for (tenant, event_id) in event_ids {
        inv.key(p.event(tenant, event_id));
    }
    inv.arg(l2::new_epoch_id())
        .arg(MESSAGE_VERSION)
        .arg(p.index)
        .arg(&nonce)
        .arg(tail)
        .arg(settings.max_len.max(1))
        .arg(if settings.sharded { "SPUBLISH" } else { "PUBLISH" })
        .arg(EVENT_ID_TTL_SECS);
    // With `min_replicas = "auto"`, the replicas are counted right behind the
    // append, in the same round trip (see [`wanted_replicas`]).
    let mut pipe = redis::pipe();
    pipe.invoke_script(&inv);
    let auto = matches!(settings.min_replicas, MinReplicas::Auto);
    if auto {
        pipe.exists(p.seq()).cmd("ROLE");
    }
    // If sent twice, the script had not run; EXISTS and ROLE write nothing.
    let replies = query_with_scripts(conn, &pipe).await?;
    let mut replies = replies.into_iter();
    let short = || redis::RedisError::from((redis::ErrorKind::Parse, "short pipeline reply"));
    let (epoch, seq): (String, u64) = redis::from_redis_value(replies.next().ok_or_else(short)?)?;
    let wanted = match settings.min_replicas {
        MinReplicas::Count(n) => n,
        MinReplicas::Auto => u32::from(connected_replicas(&replies.nth(1).ok_or_else(short)?) > 0),
    };
    Ok((Position { partition: p.index, epoch, seq, nonce }, wanted))
}

// ---- Step 5: replicate ---------------------------------------------------------

/// How many replicas an invalidation must reach now: `min_replicas`, where
/// `auto` is 1 while the partition's primary has a connected replica (read
/// with `ROLE`, behind a read of the partition's seq so that a cluster routes
/// it to the partition's master).
async fn wanted_replicas(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    settings: &LogSettings,
) -> RedisResult<u32> {
    match settings.min_replicas {
        MinReplicas::Count(n) => Ok(n),
        MinReplicas::Auto => {
            let (_, role): (redis::Value, redis::Value) =
                redis::pipe().exists(partition.seq()).cmd("ROLE").query_async(conn).await?;
            Ok(u32::from(connected_replicas(&role) > 0))
        }
    }
}

/// The replicas a `ROLE` answer of a primary lists.
fn connected_replicas(role: &redis::Value) -> usize {
    match role {
        redis::Value::Array(items) => match items.get(2) {
            Some(redis::Value::Array(replicas)) => replicas.len(),
            _ => 0,
        },
        _ => 0,
    }
}

/// Step 5: waits (`WAIT`, at most `replica_timeout_ms`) until `wanted`
/// replicas (counted by [`wanted_replicas`] or with the append) hold
/// everything this connection wrote, the invalidation included.
pub async fn replicate(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    position: &Position,
    settings: &LogSettings,
    wanted: u32,
) -> Result<(), InvalidationError> {
    if wanted == 0 {
        return Ok(());
    }
    let (_, reached): (redis::Value, u32) = redis::pipe()
        .exists(partition.seq())
        .cmd("WAIT")
        .arg(wanted)
        .arg(settings.replica_timeout_ms)
        .query_async(conn)
        .await?;
    if reached < wanted {
        return Err(NotReplicated { position: position.clone(), wanted, reached }.into());
    }
    Ok(())
}

// ---- Tools of the path -------------------------------------------------------

/// The most keys a dry run lists by name.
pub const PREVIEW_LIMIT: usize = 1000;

/// What a dry run found: up to [`PREVIEW_LIMIT`] keys by name, and how many in all.
#[derive(Debug, Clone, Default)]
pub struct Preview {
    /// `(tenant, key)` pairs that would be deleted, at most [`PREVIEW_LIMIT`].
    pub would_delete: Vec<(String, String)>,
    /// How many entries would be deleted in all.
    pub count: u64,
}

/// Walks the same selectors as [`execute`] without changing anything, reading
/// in the same bounded chunks.
pub async fn preview(conn: &mut impl ConnectionLike, layout: &Layout, items: &[Selector]) -> RedisResult<Preview> {
    let now = now_ms() as f64;
    let mut preview = Preview::default();
    for selector in items {
        let tenant = &selector.tenant;
        let p = layout.of(tenant);
        let mut seen: HashSet<String> = HashSet::new();
        let mut candidates: Vec<String> = selector.keys.clone();
        let scan = async |conn: &mut _, index: String, pattern: Option<&str>, out: &mut Vec<String>| {
            let mut cursor = 0;
            loop {
                let (next, members) = scan_index(conn, &index, cursor, pattern).await?;
                out.extend(members.into_iter().filter(|(_, exp)| *exp > now).map(|(k, _)| k));
                if next == 0 {
                    return RedisResult::Ok(());
                }
                cursor = next;
            }
        };
        for tag in &selector.tags {
            scan(conn, p.tag(tenant, tag), None, &mut candidates).await?;
        }
        for pattern in &selector.patterns {
            scan(conn, p.tenant_keys(tenant), Some(pattern), &mut candidates).await?;
        }
        while !candidates.is_empty() {
            let fresh: Vec<String> =
                std::mem::take(&mut candidates).into_iter().filter(|k| seen.insert(k.clone())).collect();
            let live = existing(conn, p, tenant, &fresh).await?;
            preview.count += live.len() as u64;
            for key in &live {
                if preview.would_delete.len() < PREVIEW_LIMIT {
                    preview.would_delete.push((tenant.clone(), key.clone()));
                }
            }
            if selector.cascade {
                candidates = dependents_of(conn, p, tenant, &fresh, now as u64).await?;
            }
        }
    }
    Ok(preview)
}

/// Which of these keys have an entry in L2 (one pipeline per chunk).
async fn existing(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    keys: &[String],
) -> RedisResult<Vec<String>> {
    let mut found = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.exists(partition.value(tenant, key));
        }
        let flags: Vec<bool> = pipe.query_async(conn).await?;
        found.extend(chunk.iter().zip(flags).filter(|(_, f)| *f).map(|(k, _)| k.clone()));
    }
    Ok(found)
}

/// The live dependents of each key (one pipeline per chunk).
async fn dependents_of(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    tenant: &str,
    keys: &[String],
    now_ms: u64,
) -> RedisResult<Vec<String>> {
    let mut found = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.zrangebyscore(partition.dependents(tenant, key), now_ms, "+inf");
        }
        let lists: Vec<Vec<String>> = pipe.query_async(conn).await?;
        found.extend(lists.into_iter().flatten());
    }
    Ok(found)
}

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads the logged messages with seq `from..=to` of a partition, in order, in
/// chunks. Returns `None` when the log no longer holds all of them (trimmed,
/// or a new epoch), so the reader knows it must flush instead of replaying.
pub async fn read_log(
    conn: &mut impl ConnectionLike,
    partition: &Partition,
    from: u64,
    to: u64,
) -> RedisResult<Option<Vec<InvalidationMessage>>> {
    let mut messages = Vec::new();
    let mut next = from;
    while next <= to {
        let entries: Vec<LogEntry> = redis::cmd("XRANGE")
            .arg(partition.log())
            .arg(format!("{next}-0"))
            .arg(format!("{to}-0"))
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(conn)
            .await?;
        if entries.is_empty() {
            return Ok(None);
        }
        for (id, fields) in entries {
            let seq = id.split('-').next().and_then(|s| s.parse::<u64>().ok());
            let payload = fields.into_iter().find(|(f, _)| f == "m").map(|(_, v)| v);
            match (seq, payload.map(|p| InvalidationMessage::decode(&p))) {
                (Some(seq), Some(Ok(msg))) if seq == next && msg.seq == seq => messages.push(msg),
                _ => return Ok(None),
            }
            next += 1;
        }
    }
    Ok(Some(messages))
}

/// The nonce of message `seq` in a partition's log, if the log holds it.
pub async fn nonce_at(conn: &mut impl ConnectionLike, partition: &Partition, seq: u64) -> RedisResult<Option<String>> {
    let entries: Vec<LogEntry> = redis::cmd("XRANGE")
        .arg(partition.log())
        .arg(format!("{seq}-0"))
        .arg(format!("{seq}-0"))
        .query_async(conn)
        .await?;
    Ok(entries
        .into_iter()
        .next()
        .and_then(|(_, fields)| fields.into_iter().find(|(f, _)| f == "n"))
        .and_then(|(_, v)| String::from_utf8(v).ok()))
}

/// Moves a partition whose log forked to a new epoch (compare and set: of
/// several processes that find the same fork, one rotates). Returns the epoch
/// now in force.
static ROTATE: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("rotate.lua")));

/// See [`ROTATE`]. After it, agents flush the partition's tenants, fill
/// tokens of the old epoch are refused and L2 entries written in it are misses.
pub async fn rotate(conn: &mut impl ConnectionLike, partition: &Partition, forked: &str) -> RedisResult<String> {
    ROTATE
        .key(partition.epoch())
        .key(partition.epoch_born())
        .arg(forked)
        .arg(l2::new_epoch_id())
        .invoke_async(conn)
        .await
}

/// Sends a pipeline of script calls; if Redis lost its script cache (a
/// restart, or a promoted replica), loads the scripts and sends it again.
async fn query_with_scripts(conn: &mut impl ConnectionLike, pipe: &redis::Pipeline) -> RedisResult<Vec<redis::Value>> {
    match pipe.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            load_scripts(conn).await?;
            pipe.query_async(conn).await
        }
        other => other,
    }
}

/// Loads every script into Redis's script cache, so that the first request
/// after a (re)connection does not pay for it. (Calls still fall back to
/// sending the script if Redis lost its cache.)
pub async fn load_scripts(conn: &mut impl ConnectionLike) -> RedisResult<()> {
    let path = [&*BEGIN, &*DETACH, &*DELETE, &*APPEND, &*ROTATE];
    for script in l2::scripts().into_iter().chain(path).chain([&*crate::registry::BEAT]) {
        script.load_async(conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(tenant: &str, keys: &[&str]) -> Selector {
        Selector {
            tenant: tenant.into(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            cascade: true,
            ..Selector::default()
        }
    }

    #[test]
    fn a_request_splits_by_partition_with_its_event_ids() {
        let layout = Layout::new(16);
        let tenants: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let request = Request {
            items: tenants.iter().map(|t| selector(t, &["k"])).collect(),
            event_ids: tenants.iter().map(|t| (t.clone(), "e".to_string())).collect(),
            origin: "o".into(),
            ack: true,
        };
        let parts = request.split(&layout);
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(|(_, r)| r.items.len()).sum::<usize>(), 40);
        for (index, part) in &parts {
            assert_eq!((part.origin.as_str(), part.ack), ("o", true));
            assert!(part.items.iter().all(|s| layout.of(&s.tenant).index == *index));
            assert!(part.event_ids.iter().all(|(t, _)| layout.of(t).index == *index));
            assert_eq!(part.items.len(), part.event_ids.len());
        }
        let indexes: Vec<u16> = parts.iter().map(|(i, _)| *i).collect();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "in partition order");
    }

    #[test]
    fn min_replicas_reads_a_number_or_auto() {
        let read = |s: &str| serde_json::from_str::<MinReplicas>(s).map_err(|e| e.to_string());
        assert_eq!(read("2"), Ok(MinReplicas::Count(2)));
        assert_eq!(read("\"auto\""), Ok(MinReplicas::Auto));
        assert_eq!(read("\"1\""), Ok(MinReplicas::Count(1)));
        assert!(read("\"most\"").is_err());
    }

    #[test]
    fn role_answers_count_connected_replicas() {
        use redis::Value;
        let replica = Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec())]);
        let role =
            Value::Array(vec![Value::BulkString(b"master".to_vec()), Value::Int(10), Value::Array(vec![replica])]);
        assert_eq!(connected_replicas(&role), 1);
        let alone = Value::Array(vec![Value::BulkString(b"master".to_vec()), Value::Int(10), Value::Array(vec![])]);
        assert_eq!(connected_replicas(&alone), 0);
    }
}
