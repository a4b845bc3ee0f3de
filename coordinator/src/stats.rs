//! `GET /v1/stats`: per-tenant figures, cluster-wide, added up from the last
//! report of every live agent (see `shared::protocol::TenantReport`), and the
//! recommendations those figures support, each with the numbers behind it.
//!
//! Counts of reads, entries, bytes, evictions and refused fills are added up
//! over the agents. Invalidations are not: every agent applies every
//! invalidation, so a tenant's (and a tag's) count is the highest any agent
//! reports. The most read keys are the agents' sketches merged.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use shared::protocol::{KeyReads, PrefixReport, TagReport, TenantReport};
use shared::sketch::SpaceSaving;

/// Keys listed per tenant.
pub const TOP_KEYS: usize = 16;

/// `l1_too_small`: at least this many L1 evictions...
pub const MIN_EVICTIONS: u64 = 10;
/// ...of which at least this share had never been hit.
pub const UNREAD_EVICTION_SHARE: f64 = 0.5;
/// `ttl_too_short`: at least this many reads of the prefix...
pub const MIN_PREFIX_READS: u64 = 20;
/// ...with a hit ratio under this...
pub const LOW_HIT_RATIO: f64 = 0.10;
/// ...and at least this many gaps measured, typically longer than the TTL.
pub const MIN_GAPS: u64 = 3;
/// `tag_invalidated_too_often`: at least this many invalidations of the tag,
/// while its entries were hit fewer times than they were filled.
pub const MIN_TAG_INVALIDATIONS: u64 = 5;

/// One tenant, cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct TenantStats {
    /// The tenant.
    pub tenant: String,
    /// Reads answered from an agent's L1.
    pub l1_hits: u64,
    /// Reads answered from L2 (Redis).
    pub l2_hits: u64,
    /// Reads cached in neither (answered 404 with a fill token).
    pub misses: u64,
    /// (l1_hits + l2_hits) / reads; 0 when nothing was read.
    pub hit_ratio: f64,
    /// Entries in the agents' L1s.
    pub entries: u64,
    /// Bytes in the agents' L1s (keys, values and metadata).
    pub bytes: u64,
    /// Invalidations of the tenant applied (the most any agent applied).
    pub invalidations: u64,
    /// Fills kept out of L1 because an invalidation raced them.
    pub fills_refused: u64,
    /// L1 entries evicted to make room.
    pub evictions: u64,
    /// Of those, entries evicted before their first hit.
    pub evicted_unread: u64,
    /// Misses that waited for another miss's fill (the key's lease).
    pub lease_waits: u64,
    /// Reads answered `X-Cache: STALE` (stale-if-error while Redis was unreachable).
    pub stale_answers: u64,
    /// Fills refused with 409 `stale_fill`.
    pub stale_fills: u64,
    /// Hits handed an eager refresh (`X-Cache-Refresh`).
    pub refresh_hints: u64,
    /// Agents whose reports are counted.
    pub nodes: u64,
    /// The most read keys, most first; `reads` may overcount by up to `error`.
    pub top_keys: Vec<KeyReads>,
}

/// Something to change, and the figures that say so.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Recommendation {
    /// The tenant it concerns.
    pub tenant: String,
    /// `l1_too_small`, `ttl_too_short` or `tag_invalidated_too_often`.
    #[schema(pattern = "^(l1_too_small|ttl_too_short|tag_invalidated_too_often)$")]
    pub kind: &'static str,
    /// What to do, in words.
    pub message: String,
    /// `ttl_too_short`: the key prefix (the keys up to their first `:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `tag_invalidated_too_often`: the tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `l1_too_small`: L1 evictions of the tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evictions: Option<u64>,
    /// `l1_too_small`: of those, entries never hit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted_unread: Option<u64>,
    /// `ttl_too_short`: reads of the prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<u64>,
    /// `ttl_too_short`: of those, hits (L1 or L2); `tag_invalidated_too_often`:
    /// L1 hits of the tag's entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits: Option<u64>,
    /// `ttl_too_short`: hits / reads of the prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<f64>,
    /// `ttl_too_short`: the mean gap between two reads of one key that L1 missed (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typical_gap_ms: Option<u64>,
    /// `ttl_too_short`: the mean TTL the prefix's keys are written with (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// `tag_invalidated_too_often`: invalidations naming the tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidations: Option<u64>,
    /// `tag_invalidated_too_often`: entries with the tag stored in L1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fills: Option<u64>,
}

/// The answer of `GET /v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Stats {
    /// Every tenant the agents report (and the caller may read), by name.
    pub tenants: Vec<TenantStats>,
    /// What the figures suggest changing.
    pub recommendations: Vec<Recommendation>,
    /// Live agents whose reports were read.
    pub nodes: u64,
}

/// One tenant's figures added up over the agents, with what the rules need.
#[derive(Default)]
struct Sum {
    stats: TenantStats,
    top: Option<SpaceSaving>,
    prefixes: BTreeMap<String, PrefixReport>,
    tags: BTreeMap<String, TagReport>,
}

/// Adds up the agents' reports (one list of tenants per live agent), keeps
/// the tenants `visible` says the caller may see, and derives the recommendations.
pub fn aggregate<'a>(reports: impl IntoIterator<Item = &'a [TenantReport]>, visible: impl Fn(&str) -> bool) -> Stats {
    let mut nodes = 0;
    let mut sums: BTreeMap<String, Sum> = BTreeMap::new();
    for tenants in reports {
        nodes += 1;
        for t in tenants.iter().filter(|t| visible(&t.tenant)) {
            let sum = sums.entry(t.tenant.clone()).or_default();
            let s = &mut sum.stats;
            s.l1_hits += t.l1_hits;
            s.l2_hits += t.l2_hits;
            s.misses += t.misses;
            s.entries += t.entries;
            s.bytes += t.bytes;
            s.invalidations = s.invalidations.max(t.invalidations);
            s.fills_refused += t.fills_refused;
            s.evictions += t.evictions;
            s.evicted_unread += t.evicted_unread;
            s.lease_waits += t.lease_waits;
            s.stale_answers += t.stale_answers;
            s.stale_fills += t.stale_fills;
            s.refresh_hints += t.refresh_hints;
            s.nodes += 1;
            let mut sketch = SpaceSaving::new(TOP_KEYS);
            for k in &t.top_keys {
                sketch.offer(&k.key, k.reads);
            }
            match &mut sum.top {
                Some(top) => top.merge(&sketch),
                None => sum.top = Some(sketch),
            }
            for p in &t.prefixes {
                sum.prefixes.entry(p.prefix.clone()).or_default().add(p);
            }
            for tag in &t.tags {
                let into = sum.tags.entry(tag.tag.clone()).or_default();
                into.invalidations = into.invalidations.max(tag.invalidations);
                into.hits += tag.hits;
                into.fills += tag.fills;
            }
        }
    }
    let mut stats = Stats { nodes, ..Stats::default() };
    for (tenant, mut sum) in sums {
        sum.stats.tenant = tenant.clone();
        let reads = sum.stats.l1_hits + sum.stats.l2_hits + sum.stats.misses;
        sum.stats.hit_ratio = ratio(sum.stats.l1_hits + sum.stats.l2_hits, reads);
        sum.stats.top_keys = sum.top.map(|t| t.top()).unwrap_or_default();
        stats.recommendations.extend(recommend(&sum.stats, &sum.prefixes, &sum.tags));
        stats.tenants.push(sum.stats);
    }
    stats
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The three rules, applied to one tenant's figures.
fn recommend(
    t: &TenantStats,
    prefixes: &BTreeMap<String, PrefixReport>,
    tags: &BTreeMap<String, TagReport>,
) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let base = || Recommendation { tenant: t.tenant.clone(), ..Recommendation::default() };
    // L1 evicts entries before anyone read them: they were stored only to
    // make room for others, so L1 is smaller than the tenant's working set.
    if t.evictions >= MIN_EVICTIONS && ratio(t.evicted_unread, t.evictions) >= UNREAD_EVICTION_SHARE {
        out.push(Recommendation {
            kind: "l1_too_small",
            message: format!(
                "L1 evicted {} entries of tenant {:?} to make room, {} of them ({:.0}%) before their first hit: \
                 the agents' L1 is smaller than this tenant's working set; raise l1_max_bytes",
                t.evictions,
                t.tenant,
                t.evicted_unread,
                100.0 * ratio(t.evicted_unread, t.evictions)
            ),
            evictions: Some(t.evictions),
            evicted_unread: Some(t.evicted_unread),
            ..base()
        });
    }
    // Reads of a prefix mostly miss, and the same keys come back later than
    // their TTL: a longer TTL would have kept them.
    for (prefix, p) in prefixes {
        let hit_ratio = ratio(p.hits, p.reads);
        if p.reads < MIN_PREFIX_READS || hit_ratio >= LOW_HIT_RATIO || p.gaps < MIN_GAPS || p.writes == 0 {
            continue;
        }
        let gap = p.gap_ms_sum / p.gaps;
        let ttl = p.ttl_ms_sum / p.writes;
        if gap <= ttl {
            continue;
        }
        out.push(Recommendation {
            kind: "ttl_too_short",
            message: format!(
                "keys {prefix}:* of tenant {:?} are hit on {:.0}% of {} reads: they are read again about every \
                 {gap} ms but written with a TTL of {ttl} ms, so they expire between reads; write them with a TTL \
                 above {gap} ms (if they may be that stale) or stop caching them",
                t.tenant,
                100.0 * hit_ratio,
                p.reads
            ),
            prefix: Some(prefix.clone()),
            reads: Some(p.reads),
            hits: Some(p.hits),
            hit_ratio: Some(hit_ratio),
            typical_gap_ms: Some(gap),
            ttl_ms: Some(ttl),
            ..base()
        });
    }
    // Entries of a tag are thrown away by invalidations before they earn
    // their fill: each fill costs a read of the source and a write, each hit saves one read.
    for (tag, g) in tags {
        if g.invalidations < MIN_TAG_INVALIDATIONS || g.fills == 0 || g.hits >= g.fills {
            continue;
        }
        out.push(Recommendation {
            kind: "tag_invalidated_too_often",
            message: format!(
                "tag {tag:?} of tenant {:?} was invalidated {} times, and its entries were filled {} times but hit \
                 only {} times: caching them costs more than it saves; stop caching them, or invalidate by key \
                 rather than by tag",
                t.tenant, g.invalidations, g.fills, g.hits
            ),
            tag: Some(tag.clone()),
            invalidations: Some(g.invalidations),
            hits: Some(g.hits),
            fills: Some(g.fills),
            ..base()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tenant: &str) -> TenantReport {
        TenantReport { tenant: tenant.into(), ..TenantReport::default() }
    }

    fn kinds(stats: &Stats) -> Vec<(&str, &str)> {
        stats.recommendations.iter().map(|r| (r.tenant.as_str(), r.kind)).collect()
    }

    #[test]
    fn figures_add_up_over_agents_and_invalidations_are_not_double_counted() {
        let a = vec![TenantReport {
            l1_hits: 10,
            l2_hits: 2,
            misses: 3,
            entries: 4,
            bytes: 100,
            invalidations: 7,
            top_keys: vec![KeyReads { key: "k1".into(), reads: 9, error: 0 }],
            ..report("t")
        }];
        let b = vec![
            TenantReport {
                l1_hits: 5,
                misses: 5,
                entries: 1,
                bytes: 20,
                invalidations: 6,
                top_keys: vec![
                    KeyReads { key: "k2".into(), reads: 8, error: 0 },
                    KeyReads { key: "k1".into(), reads: 1, error: 0 },
                ],
                ..report("t")
            },
            report("u"),
        ];
        let stats = aggregate([a.as_slice(), b.as_slice()], |_| true);
        assert_eq!(stats.nodes, 2);
        let t = &stats.tenants[0];
        assert_eq!((t.l1_hits, t.l2_hits, t.misses, t.entries, t.bytes), (15, 2, 8, 5, 120));
        assert_eq!(t.invalidations, 7, "every agent applies every invalidation: the most, not the sum");
        assert_eq!(t.nodes, 2);
        assert!((t.hit_ratio - 17.0 / 25.0).abs() < 1e-9);
        assert_eq!(t.top_keys.iter().map(|k| (k.key.as_str(), k.reads)).collect::<Vec<_>>(), [("k1", 10), ("k2", 8)]);
        assert_eq!(stats.tenants[1].tenant, "u");
        assert_eq!(stats.tenants[1].hit_ratio, 0.0);

        let only_u = aggregate([a.as_slice(), b.as_slice()], |t| t == "u");
        assert_eq!(only_u.tenants.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>(), ["u"]);
    }

    #[test]
    fn l1_too_small_needs_enough_evictions_mostly_unread() {
        let small = [TenantReport { evictions: 20, evicted_unread: 15, ..report("t") }];
        let stats = aggregate([small.as_slice()], |_| true);
        assert_eq!(kinds(&stats), [("t", "l1_too_small")]);
        assert_eq!(stats.recommendations[0].evicted_unread, Some(15));

        let read_first = [TenantReport { evictions: 20, evicted_unread: 5, ..report("t") }];
        let few = [TenantReport { evictions: 5, evicted_unread: 5, ..report("t") }];
        assert!(aggregate([read_first.as_slice()], |_| true).recommendations.is_empty());
        assert!(aggregate([few.as_slice()], |_| true).recommendations.is_empty());
    }

    fn prefix(reads: u64, hits: u64, gap_ms: u64, gaps: u64, ttl_ms: u64) -> PrefixReport {
        PrefixReport {
            prefix: "session".into(),
            reads,
            hits,
            gap_ms_sum: gap_ms * gaps,
            gaps,
            ttl_ms_sum: ttl_ms * 2,
            writes: 2,
        }
    }

    #[test]
    fn ttl_too_short_needs_a_low_hit_ratio_and_gaps_longer_than_the_ttl() {
        let short = [TenantReport { prefixes: vec![prefix(40, 2, 3000, 10, 1000)], ..report("t") }];
        let stats = aggregate([short.as_slice()], |_| true);
        assert_eq!(kinds(&stats), [("t", "ttl_too_short")]);
        let r = &stats.recommendations[0];
        assert_eq!(
            (r.prefix.as_deref(), r.typical_gap_ms, r.ttl_ms, r.reads, r.hits),
            (Some("session"), Some(3000), Some(1000), Some(40), Some(2))
        );

        for fine in [
            prefix(40, 20, 3000, 10, 1000), // hit often enough
            prefix(40, 2, 500, 10, 1000),   // the TTL outlives the gap: not the TTL's fault
            prefix(10, 0, 3000, 10, 1000),  // too few reads to say
            prefix(40, 2, 3000, 1, 1000),   // too few gaps measured
        ] {
            let t = [TenantReport { prefixes: vec![fine.clone()], ..report("t") }];
            assert!(aggregate([t.as_slice()], |_| true).recommendations.is_empty(), "{fine:?}");
        }
    }

    #[test]
    fn a_tag_is_invalidated_too_often_when_its_fills_outnumber_its_hits() {
        let tag = |invalidations, hits, fills| TagReport { tag: "prices".into(), invalidations, hits, fills };
        // Two agents: invalidations are the most either applied, hits and fills add up.
        let a = [TenantReport { tags: vec![tag(8, 1, 5)], ..report("t") }];
        let b = [TenantReport { tags: vec![tag(8, 2, 5)], ..report("t") }];
        let stats = aggregate([a.as_slice(), b.as_slice()], |_| true);
        assert_eq!(kinds(&stats), [("t", "tag_invalidated_too_often")]);
        let r = &stats.recommendations[0];
        assert_eq!((r.tag.as_deref(), r.invalidations, r.hits, r.fills), (Some("prices"), Some(8), Some(3), Some(10)));

        let worth_it = [TenantReport { tags: vec![tag(8, 50, 10)], ..report("t") }];
        let rare = [TenantReport { tags: vec![tag(2, 0, 10)], ..report("t") }];
        assert!(aggregate([worth_it.as_slice()], |_| true).recommendations.is_empty());
        assert!(aggregate([rare.as_slice()], |_| true).recommendations.is_empty());
    }
}
