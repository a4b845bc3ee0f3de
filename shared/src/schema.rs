//! The Redis key schema. Every key this system writes is named here and nowhere
//! else; `docs/redis-schema.md` describes the same table for operators.
//!
//! The data is split into a fixed number of **partitions** ([`Layout`]). A
//! tenant lives in exactly one partition (`crc16(tenant) mod P`), and every key
//! of a partition carries the partition's hash tag, so on a Redis Cluster one
//! partition is one slot: its tenants' entries, indexes and markers, and its
//! own epoch, seq, log, acknowledgements and channels. Every script touches
//! one slot; partitions spread over the masters. On one Redis server the tags
//! cost nothing. The node registry lives in one control slot, `{ctl}`.
//!
//! | key | type | what |
//! |---|---|---|
//! | `dcc:{P}:epoch` | string | identity of the partition's history; a new one when Redis lost the data or the log forked |
//! | `dcc:{P}:epoch:born` | string (int) | when the epoch began (Redis time, Unix ms) |
//! | `dcc:{P}:seq` | string (int) | last sequence number handed out in the partition |
//! | `dcc:{P}:last` | string | `"{seq} {nonce}"` of the last message appended (fork checks) |
//! | `dcc:{P}:log` | stream | the partition's invalidation log; entry id `{seq}-0`, fields `m` = message, `n` = nonce |
//! | `dcc:{P}:inv` | channel | every message of the partition, as logged |
//! | `dcc:{P}:acks` | hash | node id → `"{epoch} {seq} {nonce}"`, the last message it applied |
//! | `dcc:{P}:acked` | channel | acknowledgements as they happen |
//! | `dcc:{P}:fills` | channel | `"{tenant}\n{key}"`: a key's fill lease ended (filled, or its fill refused) while agents waited |
//! | `dcc:{P}:t:{tenant}:v:{key}` | hash | an entry: `v` value, `ct` content type, `tags`, `deps`, `e` epoch written in |
//! | `dcc:{P}:t:{tenant}:keys` | zset | every key of the tenant → expiry (Unix ms); pattern scans walk this |
//! | `dcc:{P}:t:{tenant}:tag:{tag}` | zset | keys carrying the tag → expiry |
//! | `dcc:{P}:t:{tenant}:draining:{tag}` | zset | a tag's members being deleted |
//! | `dcc:{P}:t:{tenant}:dep:{key}` | zset | keys that `depends_on` this key → expiry |
//! | `dcc:{P}:t:{tenant}:lease:{key}` | hash | the key's fill lease: `h` the holder's fill token, `s` its seq, `w` set when an agent waits; expires after `lease_ms` |
//! | `dcc:{P}:t:{tenant}:mk:{key}` | string | fill-token marker of a key |
//! | `dcc:{P}:t:{tenant}:mt:{tag}` | string | fill-token marker of a tag |
//! | `dcc:{P}:t:{tenant}:mp` / `:mpt` | zset | invalidated patterns (as Lua patterns) → seq bound / → when |
//! | `dcc:{P}:t:{tenant}:event:{id}` | string | seq an `event_id` was logged under (idempotency, 24 h) |
//! | `dcc:{ctl}:layout` | string | `"v2 partitions=16"`: every process checks it agrees |
//! | `dcc:{ctl}:epoch`, `:epoch:born` | string | identity and age of the registry |
//! | `dcc:{ctl}:nodes` | zset | node id → last heartbeat (Redis time, Unix ms) |
//! | `dcc:{ctl}:coordinators` | hash | coordinator → its `node_dead_after_ms` |
//! | `dcc:{ctl}:node:{node}` | string | the node's last report, JSON |
//! | `dcc:{ctl}:hot` | zset | `"{tenant}\n{key}"` → hits reported by the agents, halved every minute, at most 20000 (see `crate::hot`) |
//! | `dcc:{ctl}:hot:decayed` | string | when the hot set was last halved (Redis time, Unix ms) |
//! | `dcc:{ctl}:audit` | stream | the audit trail, capped (see `crate::audit`) |
//! | `dcc:{ctl}:source:{slot}` | string | the coordinator consuming the PostgreSQL slot `{slot}`; expires unless renewed (`coordinator::source`) |
//! | `dcc:{ctl}:source:{slot}:known` | string | set once the slot was followed: a slot found missing or lost later is repaired |
//!
//! `{P}` is the partition's hash tag (see [`Layout`]). Tenant names cannot
//! contain `:`, `{` or `}`, so `dcc:{P}:t:{tenant}:` is an unambiguous prefix
//! and the partition's tag is always the first brace pair of a key.

use std::sync::Arc;

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16384;

/// The slot Redis Cluster gives a key (CRC16/XMODEM, honouring a hash tag).
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// The default number of partitions.
pub const DEFAULT_PARTITIONS: u16 = 16;
/// The most partitions a layout may have.
pub const MAX_PARTITIONS: u16 = 1024;

/// The fixed split of the data into partitions, the same in every process of
/// a deployment (checked against [`LAYOUT`] at start).
///
/// Partition `i` gets a hash tag whose slot falls in the `i`-th of `P` equal
/// slot ranges, so that the contiguous ranges `redis-cli --cluster create`
/// hands out spread the partitions evenly over the masters.
#[derive(Debug, Clone)]
pub struct Layout {
    partitions: Arc<[Partition]>,
}

impl Layout {
    /// A layout of `count` partitions (1 to [`MAX_PARTITIONS`]).
    pub fn new(count: u16) -> Layout {
        let count = count.clamp(1, MAX_PARTITIONS);
        let partitions = (0..count)
            .map(|index| {
                let (lo, hi) = slot_range(index, count);
                let tag = (0u32..)
                    .map(|n| format!("p{index}.{n}"))
                    .find(|tag| (lo..hi).contains(&slot(tag)))
                    .unwrap_or_else(|| format!("p{index}"));
                Partition { index, prefix: Arc::from(format!("dcc:{{{tag}}}:")) }
            })
            .collect();
        Layout { partitions }
    }

    /// How many partitions there are.
    pub fn count(&self) -> u16 {
        self.partitions.len() as u16
    }

    /// Every partition, by index.
    pub fn all(&self) -> &[Partition] {
        &self.partitions
    }

    /// Partition `index` (the last one when out of range).
    pub fn get(&self, index: u16) -> &Partition {
        let i = usize::from(index).min(self.partitions.len() - 1);
        &self.partitions[i]
    }

    /// The partition a tenant lives in.
    pub fn of(&self, tenant: &str) -> &Partition {
        let hash = crc16::State::<crc16::XMODEM>::calculate(tenant.as_bytes());
        &self.partitions[usize::from(hash) % self.partitions.len()]
    }

    /// What [`LAYOUT`] holds for this layout.
    pub fn describe(&self) -> String {
        format!("v2 partitions={}", self.count())
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new(DEFAULT_PARTITIONS)
    }
}

/// The `index`-th of `count` equal slot ranges, `[lo, hi)`.
fn slot_range(index: u16, count: u16) -> (u16, u16) {
    let lo = u32::from(index) * u32::from(SLOTS) / u32::from(count);
    let hi = (u32::from(index) + 1) * u32::from(SLOTS) / u32::from(count);
    (lo as u16, hi as u16)
}

/// One partition: its index and the prefix (with its hash tag) of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its index, `0..P`.
    pub index: u16,
    /// `dcc:{tag}:`.
    prefix: Arc<str>,
}

impl Partition {
    fn name(&self, rest: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + rest.len());
        name.push_str(&self.prefix);
        name.push_str(rest);
        name
    }

    fn tenant_name(&self, tenant: &str, kind: &str, rest: &str) -> String {
        let mut name = String::with_capacity(self.prefix.len() + tenant.len() + kind.len() + rest.len() + 3);
        name.push_str(&self.prefix);
        name.push_str("t:");
        name.push_str(tenant);
        name.push(':');
        name.push_str(kind);
        name.push_str(rest);
        name
    }

    /// The partition's epoch: identity of its history.
    pub fn epoch(&self) -> String {
        self.name("epoch")
    }

    /// When its epoch began (Redis time, Unix ms).
    pub fn epoch_born(&self) -> String {
        self.name("epoch:born")
    }

    /// Last seq handed out.
    pub fn seq(&self) -> String {
        self.name("seq")
    }

    /// `"{seq} {nonce}"` of the last message appended.
    pub fn last(&self) -> String {
        self.name("last")
    }

    /// The invalidation log (a stream).
    pub fn log(&self) -> String {
        self.name("log")
    }

    /// The broadcast channel.
    pub fn channel(&self) -> String {
        self.name("inv")
    }

    /// Acknowledgements: node id → `"{epoch} {seq} {nonce}"`.
    pub fn acks(&self) -> String {
        self.name("acks")
    }

    /// Acknowledgements as they happen.
    pub fn ack_channel(&self) -> String {
        self.name("acked")
    }

    /// Fill notices: a key whose lease ended while agents waited for it
    /// (see `l2::take_lease`), as `"{tenant}\n{key}"`.
    pub fn fills(&self) -> String {
        self.name("fills")
    }

    /// An entry's hash.
    pub fn value(&self, tenant: &str, key: &str) -> String {
        self.tenant_name(tenant, "v:", key)
    }

    /// The tenant's key index.
    pub fn tenant_keys(&self, tenant: &str) -> String {
        self.tenant_name(tenant, "keys", "")
    }

    /// The members of a tag.
    pub fn tag(&self, tenant: &str, tag: &str) -> String {
        self.tenant_name(tenant, "tag:", tag)
    }

    /// A tag's members being deleted (see `invalidation`'s `DETACH`). One per
    /// tag, so that a drain cut short by a crash is finished by the next
    /// invalidation of the tag.
    pub fn draining(&self, tenant: &str, tag: &str) -> String {
        self.tenant_name(tenant, "draining:", tag)
    }

    /// The keys that depend on `key`.
    pub fn dependents(&self, tenant: &str, key: &str) -> String {
        self.tenant_name(tenant, "dep:", key)
    }

    /// The fill lease of a key (see `l2::take_lease`).
    pub fn lease(&self, tenant: &str, key: &str) -> String {
        self.tenant_name(tenant, "lease:", key)
    }

    /// Fill-token marker of a key.
    pub fn key_marker(&self, tenant: &str, key: &str) -> String {
        self.tenant_name(tenant, "mk:", key)
    }

    /// Fill-token marker of a tag.
    pub fn tag_marker(&self, tenant: &str, tag: &str) -> String {
        self.tenant_name(tenant, "mt:", tag)
    }

    /// Invalidated patterns by seq bound.
    pub fn pattern_markers(&self, tenant: &str) -> String {
        self.tenant_name(tenant, "mp", "")
    }

    /// Invalidated patterns by time, for pruning.
    pub fn pattern_marker_times(&self, tenant: &str) -> String {
        self.tenant_name(tenant, "mpt", "")
    }

    /// The seq an event id was logged under.
    pub fn event(&self, tenant: &str, event_id: &str) -> String {
        self.tenant_name(tenant, "event:", event_id)
    }

    /// A `SCAN ... MATCH` pattern for the key index of every tenant of the
    /// partition (`dcc:{P}:t:*:keys`).
    pub fn every_key_index(&self) -> String {
        self.name("t:*:keys")
    }
}

/// A `SCAN ... MATCH` pattern for the key index of every tenant of every
/// partition.
pub const EVERY_KEY_INDEX: &str = "dcc:*:t:*:keys";

/// The tenant whose key index (`dcc:{P}:t:{tenant}:keys`) `key` is; `None`
/// for any other key. A tenant name holds no `:`, and the partition's tag is
/// the first brace pair.
pub fn tenant_of_key_index(key: &str) -> Option<&str> {
    let (_, rest) = key.strip_prefix("dcc:{")?.split_once("}:t:")?;
    rest.strip_suffix(":keys").filter(|tenant| !tenant.is_empty() && !tenant.contains(':'))
}

/// The partition layout every process checks at start.
pub const LAYOUT: &str = "dcc:{ctl}:layout";
/// Identity of the registry's data: recreated when Redis lost it.
pub const CONTROL_EPOCH: &str = "dcc:{ctl}:epoch";
/// When the registry's epoch began (Redis time, Unix ms): a registry that
/// began empty lists every live node only once a full `node_dead_after_ms`
/// has passed since.
pub const CONTROL_EPOCH_BORN: &str = "dcc:{ctl}:epoch:born";
/// Registry of nodes by last heartbeat.
pub const NODES: &str = "dcc:{ctl}:nodes";
/// Coordinators' `node_dead_after_ms`, by coordinator.
pub const COORDINATORS: &str = "dcc:{ctl}:coordinators";
/// The audit trail: one stream entry (field `a`, JSON) per audited request.
pub const AUDIT: &str = "dcc:{ctl}:audit";
/// The cluster's hot set (see `crate::hot`): `"{tenant}\n{key}"` → decayed hits.
pub const HOT: &str = "dcc:{ctl}:hot";
/// When the hot set's scores were last halved (Redis time, Unix ms).
pub const HOT_DECAYED: &str = "dcc:{ctl}:hot:decayed";

/// Set once a coordinator followed PostgreSQL replication slot `slot`: a
/// slot found missing later was lost, and what it held must be repaired.
pub fn source_known(slot: &str) -> String {
    format!("dcc:{{ctl}}:source:{slot}:known")
}

/// The lease of the coordinator that consumes PostgreSQL replication slot `slot`.
pub fn source_lease(slot: &str) -> String {
    format!("dcc:{{ctl}}:source:{slot}")
}

/// A node's last report.
pub fn node(node_id: &str) -> String {
    format!("dcc:{{ctl}}:node:{node_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_index_names_its_tenant() {
        let layout = Layout::default();
        let index = layout.of("acme").tenant_keys("acme");
        assert_eq!(tenant_of_key_index(&index), Some("acme"));
        assert_eq!(tenant_of_key_index(&layout.of("acme").tag("acme", "x:keys")), None);
        assert_eq!(tenant_of_key_index("dcc:{ctl}:nodes"), None);
    }

    #[test]
    fn slots_match_redis_cluster() {
        // Values from `redis-cli CLUSTER KEYSLOT`.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("{}foo"), slot("{}foo"), "an empty tag hashes the whole key");
        assert_eq!(slot("a{b}c"), slot("b"));
    }

    #[test]
    fn partitions_get_tags_in_their_own_slot_range() {
        for count in [1, 3, 16, 64] {
            let layout = Layout::new(count);
            assert_eq!(layout.count(), count);
            for p in layout.all() {
                let (lo, hi) = slot_range(p.index, count);
                let s = slot(&p.epoch());
                assert!((lo..hi).contains(&s), "partition {} of {count}: slot {s} outside {lo}..{hi}", p.index);
                // Every key of the partition shares the slot.
                assert_eq!(slot(&p.value("acme", "a{b}c")), s);
                assert_eq!(slot(&p.channel()), s);
            }
        }
    }

    #[test]
    fn tenants_spread_over_partitions() {
        let layout = Layout::new(16);
        let used: std::collections::HashSet<u16> = (0..200).map(|i| layout.of(&format!("tenant-{i}")).index).collect();
        assert_eq!(used.len(), 16);
        assert_eq!(layout.of("acme"), layout.of("acme"));
    }
}
