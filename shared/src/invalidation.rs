//! The invalidation path, L2 side, in the order it runs:
//!
//! 1. **Resolve** happened before this module: the coordinator turned events and
//!    rules into [`Selector`]s (an agent's `DELETE` is one key).
//! 2. **Announce, then delete from L2** ([`execute`]): [`announce`] writes
//!    fill-token markers for its keys, tags and patterns, so that no fill
//!    racing it can store an old value. Then the deletion: exact keys, every member of each tag
//!    (moved to the tag's draining set first, then drained in chunks), every key of the tenant matching
//!    each pattern (`ZSCAN` over the tenant's key index, never `KEYS`), then,
//!    with `cascade`, the keys that `depends_on` any of those, transitively.
//!    The dependents found are added to the selector's keys, so that agents
//!    drop them even when their own indexes do not know the chain.
//! 3. **Log and broadcast** ([`append`]): one script takes the next seq,
//!    appends the message to the `dcc:log` stream (trimmed to a configured
//!    length) and publishes it on `dcc:inv`. Seq, log and broadcast are
//!    therefore atomic and in one order, even with two coordinators.
//! 4. **Apply to L1**: every agent's subscriber hands the message to its L1
//!    (`node_agent::l1::L1::apply`), which drops matching entries.
//!
//! A caller gets an [`Outcome`] only after step 3, so a 200 means the
//! invalidation is in the log.

use std::collections::HashSet;
use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::protocol::{now_ms, MessageBody, Selector};
use crate::schema;
use crate::{glob, l2};

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
}

/// What an invalidation did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Epoch of the log it was appended to.
    pub epoch: String,
    /// Its sequence number.
    pub seq: u64,
    /// The selectors as logged (keys include dependents found in L2).
    pub invalidated: Vec<Selector>,
    /// Entries that existed in L2 and were deleted.
    pub l2_deleted: u64,
    /// True when every event id had been logged before: nothing was done again.
    pub duplicate: bool,
}

/// Runs steps 2 and 3 of the path; see the module docs.
pub async fn execute(conn: &mut impl ConnectionLike, request: Request, log_max_len: u64) -> RedisResult<Outcome> {
    if let Some(seq) = already_logged(conn, &request.event_ids).await? {
        let (epoch, _) = l2::head(conn).await?;
        return Ok(Outcome { epoch, seq, duplicate: true, ..Outcome::default() });
    }

    // Step 2: announce to fill tokens and detach tags' members, then delete
    // from L2, collecting dependents into each selector's keys.
    let announced = announce(conn, &request.items).await?;
    let mut l2_deleted = 0;
    let mut invalidated = Vec::with_capacity(request.items.len());
    for (selector, (mark, detached)) in request.items.into_iter().zip(announced) {
        let (deleted, selector) = delete_selector(conn, selector, mark, detached).await?;
        l2_deleted += deleted;
        invalidated.push(selector);
    }

    // Step 3: log and broadcast.
    let (epoch, seq) = append(conn, &invalidated, &request.origin, &request.event_ids, log_max_len).await?;
    Ok(Outcome { epoch, seq, invalidated, l2_deleted, duplicate: false })
}

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
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1] seq, KEYS[2] pattern markers, KEYS[3] pattern marker times,
-- KEYS[4..] markers (keys, tags)
-- ARGV: marker ttl ms, then Lua patterns
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local mark = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
local marker_ttl = tonumber(ARGV[1])
for i = 4, #KEYS do
  local old = tonumber(redis.call('GET', KEYS[i]) or '0')
  if old < mark then redis.call('SET', KEYS[i], mark, 'PX', marker_ttl) end
end
if #ARGV > 1 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - marker_ttl, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('ZREM', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
  for i = 2, #ARGV do
    redis.call('ZADD', KEYS[2], 'GT', mark, ARGV[i])
    redis.call('ZADD', KEYS[3], now, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[2], marker_ttl)
  redis.call('PEXPIRE', KEYS[3], marker_ttl)
end
return mark",
    )
});

/// The [`BEGIN`] call of one selector.
fn begin_call(selector: &Selector) -> redis::ScriptInvocation<'static> {
    let tenant = &selector.tenant;
    let mut inv = BEGIN.prepare_invoke();
    inv.key(schema::SEQ).key(schema::pattern_markers(tenant)).key(schema::pattern_marker_times(tenant));
    for key in &selector.keys {
        inv.key(schema::key_marker(tenant, key));
    }
    for tag in &selector.tags {
        inv.key(schema::tag_marker(tenant, tag));
    }
    inv.arg(l2::MARKER_TTL_MS);
    for pattern in &selector.patterns {
        inv.arg(glob::to_lua_pattern(pattern));
    }
    inv
}

/// Step 2a, for every selector in one round trip: its [`BEGIN`] (the
/// markers; returns the mark), then the [`l2::DETACH`](l2::detach_tags) of
/// its tags. Redis runs a pipeline in order, so every marker is written
/// before the deletion looks for a single entry. Returns each selector's
/// mark and what detaching its tags found.
async fn announce(conn: &mut impl ConnectionLike, items: &[Selector]) -> RedisResult<Vec<(u64, Vec<l2::Detached>)>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    let mut detach_chunks = Vec::with_capacity(items.len());
    for selector in items {
        pipe.invoke_script(&begin_call(selector));
        let calls = l2::detach_calls(&selector.tenant, &selector.tags);
        detach_chunks.push(calls.len());
        for inv in &calls {
            pipe.invoke_script(inv);
        }
    }
    let replies: Vec<redis::Value> = match pipe.query_async(conn).await {
        // Redis lost its script cache (a restart): load the scripts and send
        // it again. Running part of it twice is harmless: markers only rise,
        // and a tag detached already reads as a draining set to finish.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            load_scripts(conn).await?;
            pipe.query_async(conn).await?
        }
        other => other?,
    };
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
        out.push((mark, l2::detached(&selector.tenant, &selector.tags, found)));
    }
    Ok(out)
}

/// The highest seq recorded for these event ids, if every one of them was logged.
async fn already_logged(conn: &mut impl ConnectionLike, event_ids: &[(String, String)]) -> RedisResult<Option<u64>> {
    Ok(already_logged_each(conn, &[event_ids]).await?.pop().flatten())
}

/// [`already_logged`] for several requests' event ids, in one round trip.
pub async fn already_logged_each(
    conn: &mut impl ConnectionLike,
    requests: &[&[(String, String)]],
) -> RedisResult<Vec<Option<u64>>> {
    let mut pipe = redis::pipe();
    for event_ids in requests.iter().filter(|ids| !ids.is_empty()) {
        pipe.cmd("MGET");
        for (tenant, id) in event_ids.iter() {
            pipe.arg(schema::event(tenant, id));
        }
    }
    let mut found: std::vec::IntoIter<Vec<Option<u64>>> =
        if pipe.cmd_iter().next().is_none() { Vec::new() } else { pipe.query_async(conn).await? }.into_iter();
    Ok(requests
        .iter()
        .map(|ids| match ids.is_empty() {
            true => None,
            false => found.next().and_then(|seqs| seqs.into_iter().collect::<Option<Vec<u64>>>()?.into_iter().max()),
        })
        .collect())
}

/// Merges requests into one, for group commit: per tenant and `cascade`, the
/// union of their keys, tags and patterns (first occurrence order; cascading
/// selectors before the others), and all their event ids. Invalidating the union invalidates everything each one
/// covers. The origin is the first request's.
pub fn merge(requests: Vec<Request>) -> Request {
    let mut merged = Request::default();
    for (i, request) in requests.into_iter().enumerate() {
        if i == 0 {
            merged.origin = request.origin;
        }
        merged.event_ids.extend(request.event_ids);
        for item in request.items {
            match merged.items.iter_mut().find(|m| m.tenant == item.tenant && m.cascade == item.cascade) {
                Some(m) => {
                    m.keys.extend(item.keys);
                    m.tags.extend(item.tags);
                    m.patterns.extend(item.patterns);
                }
                None => merged.items.push(item),
            }
        }
    }
    for item in &mut merged.items {
        for list in [&mut item.keys, &mut item.tags, &mut item.patterns] {
            let mut seen = HashSet::new();
            list.retain(|x| seen.insert(x.clone()));
        }
    }
    // Cascading selectors run first: a tenant's tag or pattern drained without
    // cascade first would leave the cascading one nothing to follow, and the
    // dependents in L2.
    merged.items.sort_by_key(|item| !item.cascade);
    merged
}

/// Deletes everything one selector covers from L2. Returns the number of
/// entries deleted and the selector with the cascaded dependents added to its keys.
async fn delete_selector(
    conn: &mut impl ConnectionLike,
    mut selector: Selector,
    mark: u64,
    detached: Vec<l2::Detached>,
) -> RedisResult<(u64, Selector)> {
    let tenant = selector.tenant.clone();
    let cascade = selector.cascade;
    let mut deleted = 0;
    // Keys deleted so far, to stop cascades at cycles and repeated dependents.
    let mut seen: HashSet<String> = HashSet::new();
    let mut dependents = Vec::new();

    let delete = async |conn: &mut _, keys: Vec<String>, deleted: &mut u64, deps: &mut Vec<String>| {
        let (n, found) = l2::delete_keys(conn, &tenant, &keys, cascade, mark).await?;
        *deleted += n;
        deps.extend(found);
        RedisResult::Ok(())
    };

    let exact: Vec<String> = selector.keys.iter().filter(|k| seen.insert((*k).clone())).cloned().collect();
    delete(conn, exact, &mut deleted, &mut dependents).await?;

    // Every tag was detached by `announce`; a draining set found first is
    // finished first, then that tag is detached again and its own members drained.
    for (tag, mut state) in selector.tags.iter().zip(detached) {
        loop {
            let (set, done) = match state {
                l2::Detached::Nothing => break,
                l2::Detached::Leftover(set) => (set, false),
                l2::Detached::Members(set) => (set, true),
            };
            loop {
                let (n, members, found) = l2::drain_chunk(conn, &tenant, &set, cascade, mark).await?;
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
            let again = l2::detach_tags(conn, &tenant, std::slice::from_ref(tag)).await?;
            state = again.into_iter().next().unwrap_or(l2::Detached::Nothing);
        }
    }

    let index = schema::tenant_keys(&tenant);
    for pattern in &selector.patterns {
        let mut cursor = 0;
        loop {
            let (next, members) = l2::scan_index(conn, &index, cursor, Some(pattern)).await?;
            let fresh: Vec<String> = members.into_iter().map(|(k, _)| k).filter(|k| seen.insert(k.clone())).collect();
            delete(conn, fresh, &mut deleted, &mut dependents).await?;
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
        delete(conn, wave, &mut deleted, &mut dependents).await?;
    }
    Ok((deleted, selector))
}

/// Takes the next seq, appends the message to the log and publishes it, in
/// one atomic step. The epoch is created here if Redis
/// lost it (with the seq), so a restarted Redis starts a new epoch at seq 1.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1] epoch, KEYS[2] seq, KEYS[3] log, KEYS[4] epoch birth,
-- then the event-id markers
-- ARGV: epoch candidate, message tail, log max length, channel, event-id ttl
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  local t = redis.call('TIME')
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[4], t[1] * 1000 + math.floor(t[2] / 1000))
end
local seq = redis.call('INCR', KEYS[2])
local msg = '{"v":1,"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. ARGV[2]
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'm', msg)
redis.call('PUBLISH', ARGV[4], msg)
for i = 5, #KEYS do
  redis.call('SET', KEYS[i], seq, 'EX', ARGV[5])
end
return {epoch, seq}"#,
    )
});

/// Loads every script into Redis's script cache, so that the first request
/// after a (re)connection does not pay for it. (Calls still fall back to
/// sending the script if Redis lost its cache.)
pub async fn load_scripts(conn: &mut impl ConnectionLike) -> RedisResult<()> {
    for script in l2::scripts().into_iter().chain([&*BEGIN, &*APPEND]) {
        script.load_async(conn).await?;
    }
    Ok(())
}

/// Step 3 of the path: log and broadcast. Returns the epoch and the seq.
pub async fn append(
    conn: &mut impl ConnectionLike,
    invalidated: &[Selector],
    origin: &str,
    event_ids: &[(String, String)],
    log_max_len: u64,
) -> RedisResult<(String, u64)> {
    let body = MessageBody { ts_ms: now_ms(), origin, invalidations: invalidated };
    let mut inv = APPEND.prepare_invoke();
    inv.key(schema::EPOCH).key(schema::SEQ).key(schema::LOG).key(schema::EPOCH_BORN);
    for (tenant, event_id) in event_ids {
        inv.key(schema::event(tenant, event_id));
    }
    inv.arg(uuid::Uuid::new_v4().simple().to_string())
        .arg(body.encode_tail())
        .arg(log_max_len.max(1))
        .arg(schema::CHANNEL)
        .arg(EVENT_ID_TTL_SECS);
    inv.invoke_async(conn).await
}

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
pub async fn preview(conn: &mut impl ConnectionLike, items: &[Selector]) -> RedisResult<Preview> {
    let now = now_ms() as f64;
    let mut preview = Preview::default();
    for selector in items {
        let tenant = &selector.tenant;
        let mut seen: HashSet<String> = HashSet::new();
        let mut candidates: Vec<String> = selector.keys.clone();
        let scan = async |conn: &mut _, index: String, pattern: Option<&str>, out: &mut Vec<String>| {
            let mut cursor = 0;
            loop {
                let (next, members) = l2::scan_index(conn, &index, cursor, pattern).await?;
                out.extend(members.into_iter().filter(|(_, exp)| *exp > now).map(|(k, _)| k));
                if next == 0 {
                    return RedisResult::Ok(());
                }
                cursor = next;
            }
        };
        for tag in &selector.tags {
            scan(conn, schema::tag(tenant, tag), None, &mut candidates).await?;
        }
        for pattern in &selector.patterns {
            scan(conn, schema::tenant_keys(tenant), Some(pattern), &mut candidates).await?;
        }
        while !candidates.is_empty() {
            let fresh: Vec<String> =
                std::mem::take(&mut candidates).into_iter().filter(|k| seen.insert(k.clone())).collect();
            let live = l2::existing(conn, tenant, &fresh).await?;
            preview.count += live.len() as u64;
            for key in &live {
                if preview.would_delete.len() < PREVIEW_LIMIT {
                    preview.would_delete.push((tenant.clone(), key.clone()));
                }
            }
            if selector.cascade {
                candidates = l2::dependents_of(conn, tenant, &fresh, now as u64).await?;
            }
        }
    }
    Ok(preview)
}

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads the logged messages with seq `from..=to`, in order, in chunks. Returns
/// `None` when the log no longer holds all of them (trimmed, or a new epoch),
/// so the reader knows it must flush instead of replaying.
pub async fn read_log(
    conn: &mut impl ConnectionLike,
    from: u64,
    to: u64,
) -> RedisResult<Option<Vec<crate::protocol::InvalidationMessage>>> {
    use crate::protocol::InvalidationMessage;
    let mut messages = Vec::new();
    let mut next = from;
    while next <= to {
        let entries: Vec<LogEntry> = redis::cmd("XRANGE")
            .arg(schema::LOG)
            .arg(format!("{next}-0"))
            .arg(format!("{to}-0"))
            .arg("COUNT")
            .arg(l2::CHUNK)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(tenant: &str, keys: &[&str], tags: &[&str], cascade: bool) -> Selector {
        Selector {
            tenant: tenant.into(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            patterns: Vec::new(),
            cascade,
        }
    }

    #[test]
    fn merging_unites_selectors_per_tenant_and_cascade() {
        let a = Request {
            items: vec![selector("acme", &["k1", "k2"], &["t1"], true), selector("globex", &["g"], &[], true)],
            event_ids: vec![("acme".into(), "e1".into())],
            origin: "c1".into(),
        };
        let b = Request {
            items: vec![selector("acme", &["k2", "k3"], &["t1", "t2"], true), selector("acme", &["x"], &[], false)],
            event_ids: vec![("acme".into(), "e2".into())],
            origin: "c2".into(),
        };
        let merged = merge(vec![a, b]);
        assert_eq!(merged.origin, "c1");
        assert_eq!(merged.event_ids.len(), 2);
        assert_eq!(merged.items.len(), 3);
        assert_eq!(merged.items[0].keys, ["k1", "k2", "k3"]);
        assert_eq!(merged.items[0].tags, ["t1", "t2"]);
        assert_eq!(merged.items[1].tenant, "globex");
        assert_eq!((merged.items[2].keys.clone(), merged.items[2].cascade), (vec!["x".to_string()], false));
    }

    #[test]
    fn merging_puts_cascading_selectors_first() {
        // Drained without cascade first, a tag would leave the cascading
        // selector of the same tag no members to follow to their dependents.
        let plain = Request { items: vec![selector("acme", &[], &["t"], false)], ..Request::default() };
        let cascading = Request { items: vec![selector("acme", &[], &["t"], true)], ..Request::default() };
        let merged = merge(vec![plain, cascading]);
        assert_eq!(merged.items.iter().map(|s| s.cascade).collect::<Vec<_>>(), [true, false]);
    }
}
