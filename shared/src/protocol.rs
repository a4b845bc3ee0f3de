//! What crosses the wire between the coordinator, Redis and the agents: the
//! invalidation message (logged and broadcast), the fill token, and the node
//! report that agents publish as their heartbeat.
//!
//! An invalidation message is JSON so that an operator can read it with
//! `redis-cli` and so that any language can consume it:
//!
//! ```json
//! {"v":2,"p":3,"epoch":"8c1f…","seq":17,"nonce":"5be0…","prev":"a41c…","ts_ms":1732300000000,
//!  "origin":"coordinator@host",
//!  "invalidations":[{"tenant":"acme","keys":["k"],"tags":["suppliers"],"patterns":["suppliers:list:*"],"cascade":true}]}
//! ```
//!
//! The header (`v`, `p`, `epoch`, `seq`, `nonce`, `prev`) is written by the
//! log-append script inside Redis, because only Redis can hand out the next
//! contiguous sequence number atomically with the append and the publish; see
//! [`MessageBody::encode_tail`]. Every message carries a random `nonce` and the
//! nonce of the message before it (`prev`), so a reader that applied seq `s`
//! can tell whether the log it now reads continues the history it applied
//! (the log-matching check of Raft): after a failover to a replica that had
//! not received the last messages, it does not.

use serde::{Deserialize, Serialize};

/// Version of the invalidation message format. A reader refuses other versions.
pub const MESSAGE_VERSION: u32 = 2;

/// What one invalidation covers in one tenant. Keys are exact; tags and patterns
/// are resolved by every holder of entries (L2 in the coordinator, L1 in each
/// agent) against its own indexes. With `cascade`, entries that `depends_on` an
/// invalidated key are invalidated too, transitively.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Selector {
    /// The tenant everything below lives in.
    pub tenant: String,
    /// Exact keys, including dependents the coordinator found in L2.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Tags: every entry carrying one of them goes.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Globs over the tenant's keys.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Follow `depends_on` edges from every invalidated key.
    #[serde(default = "yes")]
    pub cascade: bool,
}

fn yes() -> bool {
    true
}

impl Selector {
    /// Whether it covers every key of its tenant (a pattern such as `*`).
    pub fn wipes_tenant(&self) -> bool {
        self.patterns.iter().any(|p| crate::glob::matches_everything(p))
    }
}

impl Selector {
    /// True when the selector covers nothing at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tags.is_empty() && self.patterns.is_empty()
    }
}

/// One entry of the invalidation log, as broadcast to every agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidationMessage {
    /// Format version, [`MESSAGE_VERSION`].
    pub v: u32,
    /// The partition whose log it is in.
    pub p: u16,
    /// Identity of the partition's history that issued `seq`; it changes when
    /// Redis loses the data or a failover forks the log.
    pub epoch: String,
    /// Contiguous sequence number within the partition.
    pub seq: u64,
    /// A random id of this message.
    pub nonce: String,
    /// The nonce of message `seq - 1` (empty when there was none).
    pub prev: String,
    /// When the invalidation was accepted (Unix milliseconds), for lag metrics.
    pub ts_ms: u64,
    /// Which process issued it (`coordinator@host:port` or `agent@node-id`).
    pub origin: String,
    /// What it invalidates.
    pub invalidations: Vec<Selector>,
    /// Someone waits for every agent to acknowledge it (`wait=all`): agents
    /// publish their acknowledgement of it at once. Without it they only
    /// record their position, which costs the coordinator nothing.
    #[serde(default)]
    pub ack: bool,
}

/// The part of a message that the issuer writes; Redis adds the header.
#[derive(Debug, Clone, Serialize)]
pub struct MessageBody<'a> {
    /// See [`InvalidationMessage::ts_ms`].
    pub ts_ms: u64,
    /// See [`InvalidationMessage::origin`].
    pub origin: &'a str,
    /// See [`InvalidationMessage::invalidations`].
    pub invalidations: &'a [Selector],
    /// See [`InvalidationMessage::ack`]; left out when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
}

impl MessageBody<'_> {
    /// The JSON object without its opening brace. The log-append script prefixes
    /// `{"v":2,"p":P,"epoch":"…","seq":N,"nonce":"…","prev":"…",` to it, which
    /// yields a complete message.
    pub fn encode_tail(&self) -> Result<String, serde_json::Error> {
        let mut json = serde_json::to_string(self)?;
        json.remove(0);
        Ok(json)
    }
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON of the expected shape.
    #[error("malformed invalidation message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not understand.
    #[error("invalidation message version {0} is not supported (this build reads {MESSAGE_VERSION})")]
    Version(u32),
}

impl InvalidationMessage {
    /// Parses a message from the log or the channel.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg: InvalidationMessage = serde_json::from_slice(bytes)?;
        if msg.v != MESSAGE_VERSION {
            return Err(DecodeError::Version(msg.v));
        }
        Ok(msg)
    }

    /// Builds the header exactly as the log-append script does; used by tests
    /// and by tools that write messages without Redis.
    pub fn assemble(position: &Position, prev: &str, body: &MessageBody<'_>) -> Result<String, serde_json::Error> {
        let text = |s: &str| serde_json::Value::String(s.to_string());
        Ok(format!(
            "{{\"v\":{MESSAGE_VERSION},\"p\":{},\"epoch\":{},\"seq\":{},\"nonce\":{},\"prev\":{},{}",
            position.partition,
            text(&position.epoch),
            position.seq,
            text(&position.nonce),
            text(prev),
            body.encode_tail()?
        ))
    }

    /// Where this message stands in its partition's log.
    pub fn position(&self) -> Position {
        Position { partition: self.p, epoch: self.epoch.clone(), seq: self.seq, nonce: self.nonce.clone() }
    }
}

/// A place in one partition's log: the message with this seq and nonce, in
/// this epoch. Two positions with the same seq and different nonces are on
/// different histories (a fork).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Position {
    /// The partition.
    pub partition: u16,
    /// Its epoch.
    pub epoch: String,
    /// The seq.
    pub seq: u64,
    /// The nonce of the message at `seq` (empty when unknown, or seq 0).
    #[serde(skip)]
    pub nonce: String,
}

/// A fill token: the log position (epoch and seq) observed, atomically with the
/// L2 miss, before a value is loaded from the source of truth, and when (Redis
/// time). Any invalidation that began after the miss has a higher seq bound;
/// see `docs/guarantees.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillToken {
    /// Epoch at the time of the miss.
    pub epoch: String,
    /// Highest seq in the log at the time of the miss.
    pub seq: u64,
    /// Redis time of the miss (Unix ms); tokens expire.
    pub issued_ms: u64,
}

/// How long a fill token stays usable.
pub const FILL_TOKEN_TTL_MS: u64 = 60_000;

impl FillToken {
    /// The opaque header value.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.epoch, self.seq, self.issued_ms)
    }

    /// Parses a header value; `None` for anything this build did not issue.
    /// Numbers must be written as [`encode`](Self::encode) writes them (no
    /// sign, no leading zero), so that a token that decodes encodes back to
    /// itself.
    pub fn decode(token: &str) -> Option<Self> {
        let mut parts = token.split('.');
        let (epoch, seq, issued) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(FillToken { epoch: epoch.to_string(), seq: decimal(seq)?, issued_ms: decimal(issued)? })
    }
}

/// A `u64` in its canonical decimal form: digits only, no leading zero.
fn decimal(text: &str) -> Option<u64> {
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

/// What an agent publishes about itself on every heartbeat; the coordinator's
/// cluster view is built from these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The agent's node id.
    pub node_id: String,
    /// Address its cache API listens on.
    pub addr: String,
    /// Whether the agent considers itself ready (connected, subscribed, caught up).
    pub ready: bool,
    /// Sum over the partitions of the highest seq applied to L1.
    pub applied_seq: u64,
    /// Partitions it cannot prove in sync (L1 serves none of their tenants).
    #[serde(default)]
    pub unsynced: Vec<u16>,
    /// Entries in L1.
    pub l1_entries: u64,
    /// Bytes in L1 (keys and values).
    pub l1_bytes: u64,
    /// L1 hits / (hits + misses) since start, 0 when nothing was read.
    pub hit_ratio: f64,
    /// Staleness bound the agent enforces, so the coordinator can check it.
    pub staleness_bound_ms: u64,
    /// When this report was written (Unix milliseconds).
    pub ts_ms: u64,
    /// Per-tenant figures since the agent started (at most
    /// [`MAX_REPORTED_TENANTS`], the busiest), for `GET /v1/stats`. Absent
    /// in reports of older agents.
    #[serde(default)]
    pub tenants: Vec<TenantReport>,
}

/// The most tenants one agent reports figures for (the busiest by reads).
pub const MAX_REPORTED_TENANTS: usize = 64;

/// One tenant's figures in one agent since it started. Counters only grow,
/// so the coordinator can add up the latest report of every agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantReport {
    /// The tenant.
    pub tenant: String,
    /// Reads answered from L1.
    pub l1_hits: u64,
    /// Reads answered from L2 (Redis).
    pub l2_hits: u64,
    /// Reads answered by neither (404 with a fill token).
    pub misses: u64,
    /// Entries of the tenant in L1 now.
    pub entries: u64,
    /// Bytes of the tenant in L1 now (as L1 charges them).
    pub bytes: u64,
    /// Invalidations of the tenant applied to L1 (every agent applies every one).
    pub invalidations: u64,
    /// Fills kept out of L1 because an invalidation of the tenant raced them.
    pub fills_refused: u64,
    /// L1 entries evicted to make room.
    pub evictions: u64,
    /// Of those, entries evicted before their first L1 hit.
    pub evicted_unread: u64,
    /// Misses that waited for another miss's fill (the key's lease).
    pub lease_waits: u64,
    /// Reads answered `X-Cache: STALE` (stale-if-error while Redis was unreachable).
    pub stale_answers: u64,
    /// Fills refused with 409 `stale_fill` (an invalidation overtook their token).
    pub stale_fills: u64,
    /// Hits handed an eager refresh (`X-Cache-Refresh`).
    pub refresh_hints: u64,
    /// The most read keys (a space-saving sketch: `reads` may overcount by up to `error`).
    pub top_keys: Vec<KeyReads>,
    /// Reads by key prefix (the key up to its first `:`).
    pub prefixes: Vec<PrefixReport>,
    /// Invalidations and hits by tag.
    pub tags: Vec<TagReport>,
}

/// One heavy hitter of a space-saving sketch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyReads {
    /// The key.
    pub key: String,
    /// Reads counted for it (an upper bound).
    pub reads: u64,
    /// How much of `reads` may belong to keys it displaced from the sketch.
    pub error: u64,
}

/// Reads of the keys sharing one prefix, with the sums behind the typical
/// gap between two reads of one key and the TTL it is stored with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixReport {
    /// The key up to its first `:` (the whole key when it has none).
    pub prefix: String,
    /// Reads.
    pub reads: u64,
    /// Of which answered from L1 or L2.
    pub hits: u64,
    /// Sum of the gaps measured between two reads of one key that L1 missed (ms).
    pub gap_ms_sum: u64,
    /// How many gaps were measured.
    pub gaps: u64,
    /// Sum of the TTLs of the writes (ms).
    pub ttl_ms_sum: u64,
    /// How many writes.
    pub writes: u64,
}

impl PrefixReport {
    /// Adds another report's figures of the same prefix (of another thread,
    /// or another agent) to these.
    pub fn add(&mut self, other: &PrefixReport) {
        self.reads += other.reads;
        self.hits += other.hits;
        self.gap_ms_sum += other.gap_ms_sum;
        self.gaps += other.gaps;
        self.ttl_ms_sum += other.ttl_ms_sum;
        self.writes += other.writes;
    }
}

/// One tag: how often it was invalidated, and how often its entries were hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TagReport {
    /// The tag.
    pub tag: String,
    /// Invalidations naming the tag applied to L1.
    pub invalidations: u64,
    /// L1 hits of entries carrying the tag, counted as each entry leaves L1.
    pub hits: u64,
    /// Entries carrying the tag stored in L1.
    pub fills: u64,
}

/// One epoch standing for several partitions' epochs: the epoch itself when
/// there is one, else a short fingerprint that changes whenever any of them does.
pub fn epochs_fingerprint<'a>(epochs: impl IntoIterator<Item = &'a str>) -> String {
    let epochs: Vec<&str> = epochs.into_iter().collect();
    match epochs.as_slice() {
        [one] => one.to_string(),
        all => format!("{:04x}", crc16::State::<crc16::XMODEM>::calculate(all.join(",").as_bytes())),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Selector> {
        vec![Selector {
            tenant: "acme".into(),
            keys: vec!["a\"quoted\"/key".into()],
            tags: vec!["suppliers".into()],
            patterns: vec!["suppliers:list:*".into()],
            cascade: true,
        }]
    }

    #[test]
    fn message_round_trip_through_the_script_header() {
        let items = sample();
        let body = MessageBody { ts_ms: 5, origin: "test", invalidations: &items, ack: false };
        let at = Position { partition: 3, epoch: "abc123".into(), seq: 42, nonce: "n42".into() };
        let wire = InvalidationMessage::assemble(&at, "n41", &body).expect("encodes");
        let msg = InvalidationMessage::decode(wire.as_bytes()).expect("decodes");
        assert_eq!(msg.v, MESSAGE_VERSION);
        assert_eq!(msg.position(), at);
        assert_eq!(msg.prev, "n41");
        assert_eq!(msg.ts_ms, 5);
        assert_eq!(msg.invalidations, items);
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let wire =
            r#"{"v":1,"p":0,"epoch":"e","seq":1,"nonce":"n","prev":"","ts_ms":0,"origin":"x","invalidations":[]}"#;
        assert!(matches!(InvalidationMessage::decode(wire.as_bytes()), Err(DecodeError::Version(1))));
        assert!(InvalidationMessage::decode(b"not json").is_err());
        assert!(InvalidationMessage::decode(br#"{"v":2}"#).is_err());
    }

    #[test]
    fn cascade_defaults_to_true() {
        let s: Selector = serde_json::from_str(r#"{"tenant":"t","keys":["k"]}"#).expect("parses");
        assert!(s.cascade);
        assert!(s.tags.is_empty());
    }

    #[test]
    fn fill_tokens() {
        let t = FillToken { epoch: "00ff".into(), seq: 7, issued_ms: 1_700_000_000_000 };
        assert_eq!(FillToken::decode(&t.encode()), Some(t));
        assert_eq!(FillToken::decode("garbage"), None);
        assert_eq!(FillToken::decode("zz.1.2"), None);
        assert_eq!(FillToken::decode("ab.x.2"), None);
        assert_eq!(FillToken::decode("ab.1"), None);
        assert_eq!(FillToken::decode("ab.1.2.3"), None);
    }

    // Found by the fuzz target `fuzz_fill_token` (shared/tests/fuzz.rs):
    // `u64::from_str` takes a `+` sign and leading zeros, so tokens this build
    // never issues (`ab.+1.2`, `ab.01.2`) decoded, and encoded back to
    // another string.
    #[test]
    fn fill_token_numbers_are_canonical() {
        assert_eq!(FillToken::decode("ab.+1.2"), None);
        assert_eq!(FillToken::decode("ab.1.+2"), None);
        assert_eq!(FillToken::decode("ab.01.2"), None);
        assert_eq!(FillToken::decode("ab.1.00"), None);
        assert_eq!(FillToken::decode("ab.1.-2"), None);
        assert_eq!(FillToken::decode("ab..2"), None);
        assert_eq!(FillToken::decode("ab.18446744073709551616.2"), None);
        let max = FillToken { epoch: "AbC0".into(), seq: u64::MAX, issued_ms: 0 };
        assert_eq!(FillToken::decode(&max.encode()), Some(max.clone()));
        assert_eq!(FillToken::decode("AbC0.18446744073709551615.0"), Some(max));
    }
}
