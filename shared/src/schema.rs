//! The Redis key schema. Every key this system writes is named here and nowhere
//! else; `docs/redis-schema.md` describes the same table for operators.
//!
//! | key | type | what |
//! |---|---|---|
//! | `dcc:epoch` | string | identity of this Redis dataset; recreated when Redis lost its data |
//! | `dcc:epoch:born` | string (int) | when the epoch began (Redis time, Unix ms); the registry is complete `node_dead_after_ms` later |
//! | `dcc:seq` | string (int) | last sequence number handed out in this epoch |
//! | `dcc:log` | stream | the invalidation log; entry id `{seq}-0`, field `m` = message |
//! | `dcc:inv` | pub/sub channel | every invalidation message, as logged |
//! | `dcc:nodes` | zset | node id → last heartbeat (Redis time, Unix ms) |
//! | `dcc:coordinators` | hash | coordinator → its `node_dead_after_ms` (agents keep their staleness bound below the smallest) |
//! | `dcc:acks` | hash | node id → highest seq it applied, written as soon as it moves |
//! | `dcc:node:{node}` | string | the node's last [`NodeReport`](crate::protocol::NodeReport), JSON |
//! | `dcc:t:{tenant}:v:{key}` | hash | an entry: `v` value, `ct` content type, `tags`, `deps` |
//! | `dcc:t:{tenant}:keys` | zset | every key of the tenant → expiry (Unix ms); pattern scans walk this |
//! | `dcc:t:{tenant}:tag:{tag}` | zset | keys carrying the tag → expiry |
//! | `dcc:t:{tenant}:dep:{key}` | zset | keys that `depends_on` this key → expiry |
//! | `dcc:t:{tenant}:mk:{key}` | string | fill-token marker: seq bound of the last invalidation that touched the key |
//! | `dcc:t:{tenant}:mt:{tag}` | string | fill-token marker of a tag |
//! | `dcc:t:{tenant}:mp` | zset | invalidated patterns (as Lua patterns) → seq bound |
//! | `dcc:t:{tenant}:mpt` | zset | the same patterns → when (Redis time), for pruning |
//! | `dcc:t:{tenant}:event:{id}` | string | seq an `event_id` was logged under (idempotency, 24 h) |
//!
//! Tenant names cannot contain `:`, so `dcc:t:{tenant}:` is an unambiguous prefix.

/// Identity of the current Redis dataset.
pub const EPOCH: &str = "dcc:epoch";
/// When the current epoch began (Redis time, Unix ms). Created with the epoch:
/// a registry that began empty lists every live node only once a full
/// `node_dead_after_ms` has passed since.
pub const EPOCH_BORN: &str = "dcc:epoch:born";
/// Last sequence number handed out.
pub const SEQ: &str = "dcc:seq";
/// The invalidation log (a stream).
pub const LOG: &str = "dcc:log";
/// The broadcast channel.
pub const CHANNEL: &str = "dcc:inv";
/// Registry of nodes by last heartbeat.
pub const NODES: &str = "dcc:nodes";

/// Coordinators' `node_dead_after_ms`, by coordinator.
pub const COORDINATORS: &str = "dcc:coordinators";

/// Acknowledgements: node id → `"{epoch} {seq}"`, the highest seq it applied.
pub const ACKS: &str = "dcc:acks";

/// Acknowledgements as they happen (`"{epoch} {seq} {node_id}"`), for `wait=all`.
pub const ACK_CHANNEL: &str = "dcc:acked";

/// A node's last report.
pub fn node(node_id: &str) -> String {
    format!("dcc:node:{node_id}")
}

/// An entry's hash.
pub fn value(tenant: &str, key: &str) -> String {
    format!("dcc:t:{tenant}:v:{key}")
}

/// The tenant's key index.
pub fn tenant_keys(tenant: &str) -> String {
    format!("dcc:t:{tenant}:keys")
}

/// The members of a tag.
pub fn tag(tenant: &str, tag: &str) -> String {
    format!("dcc:t:{tenant}:tag:{tag}")
}

/// The keys that depend on `key`.
pub fn dependents(tenant: &str, key: &str) -> String {
    format!("dcc:t:{tenant}:dep:{key}")
}

/// Fill-token marker of a key.
pub fn key_marker(tenant: &str, key: &str) -> String {
    format!("dcc:t:{tenant}:mk:{key}")
}

/// Fill-token marker of a tag.
pub fn tag_marker(tenant: &str, tag: &str) -> String {
    format!("dcc:t:{tenant}:mt:{tag}")
}

/// Invalidated patterns by seq bound.
pub fn pattern_markers(tenant: &str) -> String {
    format!("dcc:t:{tenant}:mp")
}

/// Invalidated patterns by time, for pruning.
pub fn pattern_marker_times(tenant: &str) -> String {
    format!("dcc:t:{tenant}:mpt")
}

/// The seq an event id was logged under.
pub fn event(tenant: &str, event_id: &str) -> String {
    format!("dcc:t:{tenant}:event:{event_id}")
}

/// A tag's members being deleted (see `l2::detach_tags`). One per tag, so that a
/// drain cut short by a crash is finished by the next invalidation of the tag.
pub fn draining(tenant: &str, tag: &str) -> String {
    format!("dcc:t:{tenant}:draining:{tag}")
}
