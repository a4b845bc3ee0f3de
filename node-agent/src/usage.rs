//! Per-tenant read figures for `GET /v1/stats`: hits by layer and misses, the
//! most read keys (a space-saving sketch), and reads by key prefix with the
//! typical gap between two reads of one key and the TTL it is written with.
//!
//! Reads are counted on the agent's read path, L1 hits included, so the
//! tally must cost a hit next to nothing: it is split into shards, each
//! thread counting into its own (a thread takes one at its first read, in
//! turn), so a hit locks a mutex no other thread is using and touches no
//! line another core writes. Nothing is allocated once a tenant and a
//! prefix are known, but to lengthen a sketch slot for a longer key. Gaps are measured on L1 misses only, in one table
//! for all threads (a miss has just waited on Redis): a key read within its
//! TTL is a hit, and a key whose reads keep missing is what the gap
//! explains. Everything is bounded: [`MAX_TENANTS`] tenants a shard,
//! [`TOP_KEYS`] keys and [`MAX_PREFIXES`] prefixes a tenant.
//!
//! [`Usage::report`] merges the shards with what L1 counts (see
//! [`crate::l1::L1::tenant_figures`]) into the heartbeat's `tenants`.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use shared::protocol::{PrefixReport, TagReport, TenantReport, MAX_REPORTED_TENANTS};

use crate::l1::MAX_TRACKED_TAGS;
use shared::sketch::SpaceSaving;

/// Keys a tenant's sketch holds.
pub const TOP_KEYS: usize = 16;
/// Prefixes counted per tenant; reads of later ones count for the tenant only.
pub const MAX_PREFIXES: usize = 16;
/// Tenants one shard counts; reads of later ones are not counted.
pub const MAX_TENANTS: usize = 256;
/// Keys per prefix whose last missed read is remembered, for gaps.
const GAP_SLOTS: usize = 64;

/// Something that happened to a tenant's read or write, counted per tenant
/// for `/v1/stats` (besides hits and misses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A miss waited for another miss's fill (see `crate::lease`).
    LeaseWait = 0,
    /// A read was answered `X-Cache: STALE` (stale-if-error).
    StaleAnswer = 1,
    /// A fill was refused with 409 `stale_fill`.
    StaleFill = 2,
    /// A hit was handed an eager refresh.
    RefreshHint = 3,
}

/// How a read was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// From L1.
    L1,
    /// From L2.
    L2,
    /// Not cached.
    Miss,
}

/// Gaps between missed reads of the keys of one prefix.
#[derive(Debug, Clone)]
struct Gaps {
    /// The last missed read of a few keys: (key hash, ms since start), indexed by the hash.
    recent: Box<[(u64, u64)]>,
    /// Sum of the gaps measured (ms).
    sum_ms: u64,
    /// How many.
    count: u64,
}

impl Default for Gaps {
    fn default() -> Self {
        Gaps { recent: vec![(0, 0); GAP_SLOTS].into_boxed_slice(), sum_ms: 0, count: 0 }
    }
}

impl Gaps {
    /// A missed read of the key hashed `h`, `now_ms` since start.
    fn missed(&mut self, h: u64, now_ms: u64) {
        let slot = &mut self.recent[(h % GAP_SLOTS as u64) as usize];
        if slot.0 == h && slot.1 != 0 {
            self.sum_ms += now_ms.saturating_sub(slot.1);
            self.count += 1;
        }
        // Never 0: that marks an empty slot.
        *slot = (h, now_ms.max(1));
    }
}

/// Gaps by tenant, then by prefix.
type GapTables = HashMap<String, HashMap<String, Gaps>>;

/// One tenant's reads in one shard.
#[derive(Debug, Clone)]
struct Tally {
    /// Reads answered from L1.
    l1_hits: u64,
    /// Reads answered from L2.
    l2_hits: u64,
    /// Reads not cached.
    misses: u64,
    /// The tenant's [`Event`]s, by kind.
    events: [u64; 4],
    /// The most read keys.
    top: SpaceSaving,
    /// Per prefix, at most [`MAX_PREFIXES`].
    prefixes: Vec<PrefixReport>,
    /// L1 hits of entries carrying each tag, at most [`MAX_TRACKED_TAGS`] tags.
    tag_hits: Vec<(String, u64)>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            l1_hits: 0,
            l2_hits: 0,
            misses: 0,
            events: [0; 4],
            top: SpaceSaving::new(TOP_KEYS),
            prefixes: Vec::new(),
            tag_hits: Vec::new(),
        }
    }
}

impl Tally {
    fn count_read(&mut self, key: &str, served: Served) {
        match served {
            Served::L1 => self.l1_hits += 1,
            Served::L2 => self.l2_hits += 1,
            Served::Miss => self.misses += 1,
        }
        self.top.offer(key, 1);
        if let Some(prefix) = self.prefix(key) {
            prefix.reads += 1;
            if served != Served::Miss {
                prefix.hits += 1;
            }
        }
    }

    fn prefix(&mut self, key: &str) -> Option<&mut PrefixReport> {
        let prefix = prefix_of(key);
        match self.prefixes.iter().position(|p| p.prefix == prefix) {
            Some(i) => self.prefixes.get_mut(i),
            None if self.prefixes.len() < MAX_PREFIXES => {
                self.prefixes.push(PrefixReport { prefix: prefix.to_string(), ..PrefixReport::default() });
                self.prefixes.last_mut()
            }
            None => None,
        }
    }
}

/// The prefix a key is counted under: up to its first `:`.
pub fn prefix_of(key: &str) -> &str {
    key.split_once(':').map_or(key, |(prefix, _)| prefix)
}

/// One shard: the tenants one set of threads counted, on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Tallies>);

/// What one shard counts.
#[derive(Default)]
struct Tallies {
    /// Per tenant.
    tenants: HashMap<String, Tally, Fnv>,
    /// L1 hits of every tenant, counted ones or not: `dcc_cache_hits_total{layer="l1"}`.
    l1_hits: u64,
    /// Hits by `"{tenant}\n{key}"` since the last [`Usage::take_hot`], for the
    /// cluster's hot set (warm start): every L2 hit, one L1 hit in
    /// [`HOT_SAMPLE`]; at most [`HOT_KEYS`] keys.
    hot: HashMap<String, u64, Fnv>,
    /// Where a hot key's name is put together for the lookup (no allocation
    /// for a key already counted).
    scratch: String,
}

/// One L1 hit in this many counts for the hot set (as this many): a hit
/// stays cheap, and a key read often is counted all the same.
pub const HOT_SAMPLE: u64 = 16;
/// Keys one shard counts for the hot set between two reports.
pub const HOT_KEYS: usize = 4096;

impl Tallies {
    /// Counts `hits` for `tenant`/`key` in the hot set's tally.
    fn hot(&mut self, tenant: &str, key: &str, hits: u64) {
        self.scratch.clear();
        self.scratch.push_str(tenant);
        self.scratch.push('\n');
        self.scratch.push_str(key);
        if let Some(count) = self.hot.get_mut(self.scratch.as_str()) {
            *count += hits;
        } else if self.hot.len() < HOT_KEYS {
            self.hot.insert(self.scratch.clone(), hits);
        }
    }
}

/// FNV-1a: tenant names are short, and SipHash's setup would be most of a hit's cost.
#[derive(Clone, Copy, Default)]
struct Fnv;

/// The state of an FNV-1a hash.
struct FnvHasher(u64);

impl BuildHasher for Fnv {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn hash(key: &str) -> u64 {
    let mut h = Fnv.build_hasher();
    h.write(key.as_bytes());
    h.finish()
}

/// The per-tenant read tally of one agent.
pub struct Usage {
    /// One per thread, in turn (more threads than shards share them).
    shards: Box<[Shard]>,
    /// Gaps between missed reads, for every thread (only misses touch it).
    gaps: Mutex<GapTables>,
    /// Gaps are measured in ms since then.
    started: Instant,
}

/// Which shard this thread counts into (its number; `usize::MAX` until its first read).
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local!(static THREAD: Cell<usize> = const { Cell::new(usize::MAX) });

impl Default for Usage {
    fn default() -> Self {
        Self::new()
    }
}

impl Usage {
    /// An empty tally, with a shard for each of twice as many threads as cores.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(8, |n| n.get());
        let shards = (0..(2 * threads).clamp(4, 64)).map(|_| Shard::default()).collect();
        Usage { shards, gaps: Mutex::default(), started: Instant::now() }
    }

    fn shard(&self) -> MutexGuard<'_, Tallies> {
        let thread = THREAD.with(|t| {
            if t.get() == usize::MAX {
                t.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
            }
            t.get()
        });
        let shard = &self.shards[thread % self.shards.len()];
        shard.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_tally(&self, tenant: &str, f: impl FnOnce(&mut Tally)) {
        Self::tally_in(&mut self.shard(), tenant, f);
    }

    fn tally_in(shard: &mut Tallies, tenant: &str, f: impl FnOnce(&mut Tally)) {
        if let Some(tally) = shard.tenants.get_mut(tenant) {
            return f(tally);
        }
        if shard.tenants.len() < MAX_TENANTS {
            f(shard.tenants.entry(tenant.to_string()).or_default());
        }
    }

    /// Counts an L1 hit of `key`, an entry carrying `tags`: the only
    /// count of L1 hits there is, so that a hit writes nothing another
    /// core writes (a shared counter would be one such line).
    pub fn l1_hit<'a>(&self, tenant: &str, key: &str, tags: impl Iterator<Item = &'a str>) {
        let mut shard = self.shard();
        shard.l1_hits += 1;
        if shard.l1_hits.is_multiple_of(HOT_SAMPLE) {
            shard.hot(tenant, key, HOT_SAMPLE);
        }
        Self::tally_in(&mut shard, tenant, |tally| {
            tally.count_read(key, Served::L1);
            for tag in tags {
                match tally.tag_hits.iter().position(|(t, _)| t == tag) {
                    Some(i) => tally.tag_hits[i].1 += 1,
                    None if tally.tag_hits.len() < MAX_TRACKED_TAGS => tally.tag_hits.push((tag.to_string(), 1)),
                    None => {}
                }
            }
        });
    }

    /// L1 hits so far, of every tenant.
    pub fn l1_hits(&self) -> u64 {
        self.shards.iter().map(|shard| shard.0.lock().unwrap_or_else(|p| p.into_inner()).l1_hits).sum()
    }

    /// Counts one read of `key` and how it was answered.
    /// (L1 hits go through [`Usage::l1_hit`].)
    pub fn read(&self, tenant: &str, key: &str, served: Served) {
        if served == Served::L1 {
            return self.l1_hit(tenant, key, std::iter::empty());
        }
        {
            let mut shard = self.shard();
            if served == Served::L2 {
                shard.hot(tenant, key, 1);
            }
            Self::tally_in(&mut shard, tenant, |tally| tally.count_read(key, served));
        }
        self.missed(tenant, key);
    }

    /// The keys hit since the last call, most hit first, at most `limit`, as
    /// `(tenant, key, hits)`; the counts start again from zero.
    pub fn take_hot(&self, limit: usize) -> Vec<(String, String, u64)> {
        let mut merged: HashMap<String, u64> = HashMap::new();
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            for (name, hits) in shard.hot.drain() {
                *merged.entry(name).or_default() += hits;
            }
        }
        let mut hot: Vec<(String, u64)> = merged.into_iter().collect();
        hot.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        hot.truncate(limit);
        hot.into_iter()
            .filter_map(|(name, hits)| name.split_once('\n').map(|(t, k)| (t.to_string(), k.to_string(), hits)))
            .collect()
    }

    /// Counts an [`Event`] of `tenant`.
    pub fn event(&self, tenant: &str, event: Event) {
        self.with_tally(tenant, |tally| tally.events[event as usize] += 1);
    }

    /// Measures the gap since the last missed read of `key`, if remembered.
    fn missed(&self, tenant: &str, key: &str) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let mut gaps = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        if !gaps.contains_key(tenant) && gaps.len() >= MAX_TENANTS {
            return;
        }
        let prefixes = gaps.entry(tenant.to_string()).or_default();
        let prefix = prefix_of(key);
        if !prefixes.contains_key(prefix) && prefixes.len() >= MAX_PREFIXES {
            return;
        }
        prefixes.entry(prefix.to_string()).or_default().missed(hash(key), now_ms);
    }

    /// Counts a write of `key` with its TTL.
    pub fn write(&self, tenant: &str, key: &str, ttl_ms: u64) {
        self.with_tally(tenant, |tally| {
            if let Some(prefix) = tally.prefix(key) {
                prefix.writes += 1;
                prefix.ttl_ms_sum += ttl_ms;
            }
        });
    }

    /// Every counted tenant's (L1 hits, L2 hits, misses), for `/metrics`.
    pub fn totals(&self) -> HashMap<String, [u64; 3]> {
        let mut totals: HashMap<String, [u64; 3]> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            for (tenant, tally) in shard.tenants.iter() {
                let t = totals.entry(tenant.clone()).or_default();
                t[0] += tally.l1_hits;
                t[1] += tally.l2_hits;
                t[2] += tally.misses;
            }
        }
        totals
    }

    /// Every tenant's figures: the shards merged, with what L1 counted
    /// (`l1`, by tenant); the [`MAX_REPORTED_TENANTS`] busiest, by name.
    pub fn report(&self, mut l1: HashMap<String, TenantReport>) -> Vec<TenantReport> {
        let mut merged: HashMap<String, Tally> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            for (tenant, tally) in shard.tenants.iter() {
                match merged.get_mut(tenant) {
                    None => {
                        merged.insert(tenant.clone(), tally.clone());
                    }
                    Some(into) => {
                        into.l1_hits += tally.l1_hits;
                        into.l2_hits += tally.l2_hits;
                        into.misses += tally.misses;
                        for (into, n) in into.events.iter_mut().zip(tally.events) {
                            *into += n;
                        }
                        into.top.merge(&tally.top);
                        for (tag, hits) in &tally.tag_hits {
                            match into.tag_hits.iter_mut().find(|(t, _)| t == tag) {
                                Some((_, into)) => *into += hits,
                                None => into.tag_hits.push((tag.clone(), *hits)),
                            }
                        }
                        for p in &tally.prefixes {
                            match into.prefixes.iter_mut().find(|q| q.prefix == p.prefix) {
                                Some(q) => q.add(p),
                                None => into.prefixes.push(p.clone()),
                            }
                        }
                    }
                }
            }
        }
        let gaps = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        let mut reports: Vec<TenantReport> = merged
            .into_iter()
            .map(|(tenant, mut tally)| {
                for (prefix, g) in gaps.get(&tenant).into_iter().flatten() {
                    if let Some(p) = tally.prefixes.iter_mut().find(|p| p.prefix == *prefix) {
                        p.gap_ms_sum = g.sum_ms;
                        p.gaps = g.count;
                    }
                }
                let mut report = l1.remove(&tenant).unwrap_or_default();
                report.tenant = tenant;
                report.l1_hits = tally.l1_hits;
                report.l2_hits = tally.l2_hits;
                report.misses = tally.misses;
                [report.lease_waits, report.stale_answers, report.stale_fills, report.refresh_hints] = tally.events;
                report.top_keys = tally.top.top();
                report.prefixes = tally.prefixes;
                report.prefixes.sort_by(|a, b| a.prefix.cmp(&b.prefix));
                // L1 counts a tag's fills and invalidations, this tally its hits.
                for (tag, hits) in tally.tag_hits {
                    match report.tags.iter().position(|t| t.tag == tag) {
                        Some(i) => report.tags[i].hits += hits,
                        None if report.tags.len() < MAX_TRACKED_TAGS => {
                            report.tags.push(TagReport { tag, hits, ..TagReport::default() })
                        }
                        None => {}
                    }
                }
                report.tags.sort_by(|a, b| a.tag.cmp(&b.tag));
                report
            })
            .collect();
        // Tenants with entries but no read through this agent yet.
        reports.extend(l1.into_values());
        let reads = |r: &TenantReport| r.l1_hits + r.l2_hits + r.misses;
        reports.sort_by(|a, b| reads(b).cmp(&reads(a)).then_with(|| b.entries.cmp(&a.entries)));
        reports.truncate(MAX_REPORTED_TENANTS);
        reports.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_counted_per_tenant_layer_and_prefix_across_threads() {
        let usage = std::sync::Arc::new(Usage::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let usage = usage.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        usage.read("t", "user:1", Served::L1);
                    }
                    usage.read("t", "order:9", Served::L2);
                    usage.read("t", "order:9", Served::Miss);
                    usage.write("t", "order:9", 1000);
                    usage.event("t", Event::LeaseWait);
                    usage.event("t", Event::StaleAnswer);
                    usage.event("t", Event::StaleAnswer);
                    usage.event("t", Event::StaleFill);
                    usage.event("t", Event::RefreshHint);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let report = usage.report(HashMap::new());
        assert_eq!(report.len(), 1);
        let t = &report[0];
        assert_eq!((t.l1_hits, t.l2_hits, t.misses), (400, 4, 4));
        assert_eq!((t.lease_waits, t.stale_answers, t.stale_fills, t.refresh_hints), (4, 8, 4, 4));
        assert_eq!(t.top_keys[0].key, "user:1");
        assert_eq!(t.top_keys[0].reads, 400);
        let order = t.prefixes.iter().find(|p| p.prefix == "order").expect("the order prefix");
        assert_eq!((order.reads, order.hits, order.writes, order.ttl_ms_sum), (8, 4, 4, 4000));
        // Every missed read of order:9 but the first measured a gap, whatever its thread.
        assert_eq!(order.gaps, 7);
    }

    #[test]
    fn l1_hits_are_counted_with_their_tags_and_merged_with_what_l1_counts() {
        let usage = Usage::new();
        for _ in 0..3 {
            usage.l1_hit("t", "item:1", ["red", "blue"].into_iter());
        }
        usage.l1_hit("t", "item:2", std::iter::empty());
        usage.read("u", "x", Served::L1);
        usage.read("t", "item:3", Served::Miss);
        assert_eq!(usage.l1_hits(), 5);
        let mut from_l1 = HashMap::new();
        let red = TagReport { tag: "red".into(), fills: 2, invalidations: 1, ..TagReport::default() };
        from_l1.insert("t".to_string(), TenantReport { tags: vec![red], ..TenantReport::default() });
        let reports = usage.report(from_l1);
        let t = reports.iter().find(|r| r.tenant == "t").expect("tenant t");
        assert_eq!((t.l1_hits, t.misses), (4, 1));
        let tags: Vec<_> = t.tags.iter().map(|g| (g.tag.as_str(), g.fills, g.invalidations, g.hits)).collect();
        assert_eq!(tags, [("blue", 0, 0, 3), ("red", 2, 1, 3)]);
    }

    #[test]
    fn tenants_and_prefixes_are_bounded() {
        let usage = Usage {
            shards: vec![Shard::default()].into_boxed_slice(),
            gaps: Mutex::default(),
            started: Instant::now(),
        };
        for i in 0..(MAX_TENANTS + 10) {
            usage.read(&format!("t{i}"), "k", Served::Miss);
        }
        for i in 0..(MAX_PREFIXES + 10) {
            usage.read("t0", &format!("p{i}:k"), Served::Miss);
        }
        let report = usage.report(HashMap::new());
        assert_eq!(report.len(), MAX_REPORTED_TENANTS);
        let t0 = report.iter().find(|t| t.tenant == "t0").expect("the busiest tenant is reported");
        assert_eq!(t0.misses, 1 + MAX_PREFIXES as u64 + 10, "the tenant counts every read");
        assert_eq!(t0.prefixes.len(), MAX_PREFIXES);
    }
}
