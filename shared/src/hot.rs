//! The cluster's hot set: the keys most hit across the agents, which a
//! starting agent (or one that flushed) loads into L1 before it reports ready
//! (warm start; contract v2, section 4).
//!
//! Agents add their hit counts every [`REPORT_EVERY`] ([`report`]); the set
//! is a zset of `"{tenant}\n{key}"` in the control slot, every score halved
//! once per [`DECAY_PERIOD_MS`] so that yesterday's hot keys fade, and trimmed
//! to the [`MAX_MEMBERS`] most counted. [`hottest`] reads the top of it.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::schema::{HOT, HOT_DECAYED};
use crate::script::with_prelude;

/// How often agents add their counts.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Every score is halved once per this period.
pub const DECAY_PERIOD_MS: u64 = 60_000;
/// The most members the set keeps.
pub const MAX_MEMBERS: usize = 20_000;

static HOT_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/hot.lua")));

/// The hot set's member for a key.
fn member(tenant: &str, key: &str) -> String {
    format!("{tenant}\n{key}")
}

/// Adds `(tenant, key, hits)` counts to the hot set (one script call).
pub async fn report(conn: &mut impl ConnectionLike, counts: &[(String, String, u64)]) -> RedisResult<()> {
    if counts.is_empty() {
        return Ok(());
    }
    let mut inv = HOT_SCRIPT.prepare_invoke();
    inv.key(HOT).key(HOT_DECAYED).arg(DECAY_PERIOD_MS).arg(MAX_MEMBERS);
    for (tenant, key, hits) in counts {
        inv.arg(member(tenant, key)).arg(*hits);
    }
    let _: u64 = inv.invoke_async(conn).await?;
    Ok(())
}

/// The `n` hottest keys, hottest first, as `(tenant, key)`.
pub async fn hottest(conn: &mut impl ConnectionLike, n: usize) -> RedisResult<Vec<(String, String)>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let members: Vec<String> = redis::cmd("ZREVRANGE").arg(HOT).arg(0).arg(n - 1).query_async(conn).await?;
    Ok(members.into_iter().filter_map(|m| m.split_once('\n').map(|(t, k)| (t.to_string(), k.to_string()))).collect())
}
