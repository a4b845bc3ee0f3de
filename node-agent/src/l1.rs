//! L1: the in-memory cache of one agent, bounded by bytes, with a TTL per entry,
//! and the indexes that let an invalidation find its entries: per tenant, its
//! keys (for patterns), tag members, and dependents (`depends_on` edges).
//!
//! Reads go straight to moka without any lock. Writes that change what an
//! invalidation could find (inserts, invalidations, flushes) take the index
//! lock, so an invalidation never runs between an entry entering the cache and
//! entering the indexes. A fill that read L2 before an invalidation of its
//! tenant was applied is refused (see [`FillGuard`]), so an invalidation that
//! arrives while L2 is being read cannot let the old value in.
//!
//! moka reports removals (evictions, expiry, replacement) through a listener
//! that may run inside a cache call; it only queues the removed entry, and the
//! queue is folded into the indexes at the next write, matched by generation so
//! that a replaced entry never removes the index records of its successor.
//!
//! The per-tenant figures of `GET /v1/stats` that L1 knows (entries, bytes,
//! evictions, invalidations, refused fills, tag hits) are kept beside the
//! indexes, on the write paths only. The one thing a hit records is in the
//! entry itself: its read count ([`Reads`]), a plain load and store on the
//! entry a lookup has just touched, so a hit takes no lock and no shared line.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use shared::glob;
use shared::protocol::{Selector, TagReport, TenantReport};
use shared::schema::Layout;

/// An entry's name: its tenant, a NUL, its key, in one shared string
/// (a tenant cannot contain NUL; see `shared::names`). The cache and every
/// index record of the entry hold the same string, so a key is stored once
/// however many indexes name it, and a lookup by `&str` allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryKey(Arc<str>);

impl EntryKey {
    fn new(tenant: &str, key: &str) -> Self {
        EntryKey(with_name(tenant, key, |name| Arc::from(name)))
    }

    fn tenant(&self) -> &str {
        self.0.split_once('\0').map_or(&*self.0, |(tenant, _)| tenant)
    }

    fn key(&self) -> &str {
        self.0.split_once('\0').map_or("", |(_, key)| key)
    }
}

impl Borrow<str> for EntryKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Calls `f` with the name of `tenant`/`key` (see [`EntryKey`]), spelled out
/// in a buffer of this thread: reads name entries without allocating.
fn with_name<R>(tenant: &str, key: &str, f: impl FnOnce(&str) -> R) -> R {
    thread_local!(static NAME: RefCell<String> = const { RefCell::new(String::new()) });
    NAME.with(|cell| match cell.try_borrow_mut() {
        Ok(mut name) => {
            name.clear();
            name.push_str(tenant);
            name.push('\0');
            name.push_str(key);
            f(&name)
        }
        // Only if `f` itself named an entry: spell this one out afresh.
        Err(_) => f(&format!("{tenant}\0{key}")),
    })
}

/// An entry held in L1.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// Its content type (the common ones shared, not copied per entry).
    pub content_type: Arc<str>,
    /// Tags it carries.
    pub tags: Box<[String]>,
    /// Keys it depends on.
    pub depends_on: Box<[String]>,
    /// When it expires (the same moment as in L2).
    pub expires_at: Instant,
    /// Insertion generation, to match index records with this very entry.
    generation: u64,
    /// L1 hits of this entry.
    reads: Reads,
}

/// How often an entry was hit in L1. Counted with a relaxed load and store,
/// not a locked add: two threads hitting one entry at once may count one hit
/// (the figures are statistics), and a hit costs no atomic read-modify-write.
#[derive(Debug, Default)]
pub struct Reads(AtomicU32);

impl Reads {
    fn hit(&self) {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n.saturating_add(1), Ordering::Relaxed);
    }

    /// Hits counted so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Clone for Reads {
    fn clone(&self) -> Self {
        Reads(AtomicU32::new(self.get()))
    }
}

/// Content types most entries have, held once for all of them.
static COMMON_CONTENT_TYPES: LazyLock<[Arc<str>; 5]> = LazyLock::new(|| {
    [
        "application/octet-stream",
        "application/json",
        "text/plain; charset=utf-8",
        "text/plain",
        "text/html; charset=utf-8",
    ]
    .map(Arc::from)
});

impl Entry {
    /// An entry expiring `ttl` from now.
    pub fn new(value: Bytes, content_type: &str, tags: Vec<String>, depends_on: Vec<String>, ttl: Duration) -> Self {
        let content_type = COMMON_CONTENT_TYPES
            .iter()
            .find(|common| ***common == *content_type)
            .cloned()
            .unwrap_or_else(|| Arc::from(content_type));
        Entry {
            value,
            content_type,
            tags: tags.into_boxed_slice(),
            depends_on: depends_on.into_boxed_slice(),
            expires_at: Instant::now() + ttl,
            generation: 0,
            reads: Reads::default(),
        }
    }

    /// L1 hits of this entry so far.
    pub fn reads(&self) -> u32 {
        self.reads.get()
    }

    /// Time to live left.
    pub fn ttl_left(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Bytes it is charged for: key, tenant, value and metadata.
    fn weight(&self, name: &EntryKey) -> u32 {
        let meta: usize = self.tags.iter().chain(&self.depends_on).map(String::len).sum();
        // The name is tenant, NUL, key: the NUL is not charged.
        let total = name.0.len() - 1 + self.value.len() + self.content_type.len() + meta;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Proof of when a fill started: the tenant's invalidation count before L2 was
/// read. The fill may enter L1 only if no invalidation of the tenant was
/// applied since, and no flush of its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillGuard {
    /// The tenant's count of applied invalidations.
    invalidations: u64,
    /// The count of flushes of the tenant's partition.
    flushes: u64,
}

/// Counters the agent reports.
#[derive(Debug, Default)]
pub struct L1Stats {
    /// Entries removed to make room.
    pub evictions: AtomicU64,
    /// Entries dropped by invalidations.
    pub invalidated: AtomicU64,
    /// Fills refused because an invalidation of their tenant came in meanwhile.
    pub fills_refused: AtomicU64,
}

/// Index records of one tenant; every record holds the generation of the
/// entry it was made for, and names it by the entry's shared name.
#[derive(Debug, Default)]
struct TenantIndex {
    /// Every entry of the tenant in L1 (patterns walk this).
    keys: HashMap<EntryKey, u64>,
    /// Tag -> entries carrying it.
    tags: HashMap<String, HashMap<EntryKey, u64>>,
    /// Key -> entries that depend on it.
    dependents: HashMap<String, HashMap<EntryKey, u64>>,
}

#[derive(Debug, Default)]
struct Indexes {
    /// Per-tenant index records.
    tenants: HashMap<String, TenantIndex>,
    /// Per-tenant count of applied invalidations, for fill guards. Never shrinks,
    /// so a guard can never match a count from before it was taken.
    invalidations: HashMap<String, u64>,
    /// Count of flushes of each partition, also part of every fill guard.
    flushes: Vec<u64>,
    /// Per-tenant figures for the stats (at most [`MAX_TRACKED_TENANTS`]).
    usage: HashMap<String, TenantUsage>,
}

/// The most tenants whose L1 figures are kept; later ones go uncounted.
pub const MAX_TRACKED_TENANTS: usize = 1024;
/// The most tags of one tenant whose figures are kept; later ones go uncounted.
pub const MAX_TRACKED_TAGS: usize = 32;

/// What L1 counts of one tenant, on its write paths.
#[derive(Debug, Default, Clone)]
struct TenantUsage {
    /// Entries held.
    entries: u64,
    /// Bytes held (entry weights).
    bytes: u64,
    /// Invalidations of the tenant applied (from the log).
    invalidations: u64,
    /// Fills refused for a racing invalidation.
    fills_refused: u64,
    /// Entries evicted for room.
    evictions: u64,
    /// Of those, never hit.
    evicted_unread: u64,
    /// Per tag: invalidations, fills, and the hits of its entries gone from L1.
    tags: HashMap<String, TagReport>,
}

impl TenantUsage {
    /// The figures of a tag, unless the tenant already has too many.
    fn tag(&mut self, tag: &str) -> Option<&mut TagReport> {
        if !self.tags.contains_key(tag) {
            if self.tags.len() >= MAX_TRACKED_TAGS {
                return None;
            }
            self.tags.insert(tag.to_string(), TagReport { tag: tag.to_string(), ..TagReport::default() });
        }
        self.tags.get_mut(tag)
    }
}

impl Indexes {
    fn guard(&self, tenant: &str, partition: u16) -> FillGuard {
        FillGuard {
            invalidations: self.invalidations.get(tenant).copied().unwrap_or(0),
            flushes: self.flushes.get(usize::from(partition)).copied().unwrap_or(0),
        }
    }

    /// The tenant's figures, unless too many tenants are tracked already.
    fn usage(&mut self, tenant: &str) -> Option<&mut TenantUsage> {
        if !self.usage.contains_key(tenant) {
            if self.usage.len() >= MAX_TRACKED_TENANTS {
                return None;
            }
            self.usage.insert(tenant.to_string(), TenantUsage::default());
        }
        self.usage.get_mut(tenant)
    }
}

/// Entries moka removed, queued by its listener until the next index update.
type RemovalQueue = Arc<Mutex<Vec<(EntryKey, Arc<Entry>, RemovalCause)>>>;

/// The L1 cache with its indexes; cheap to share behind an `Arc`.
pub struct L1 {
    /// The entries; moka bounds them by weight and expires them per entry.
    cache: Cache<EntryKey, Arc<Entry>>,
    /// Index records, guarded together with inserts and invalidations.
    /// A std mutex: it is never held across an await.
    indexes: Mutex<Indexes>,
    /// Entries moka removed, waiting to be folded into the indexes.
    removed: RemovalQueue,
    /// Next insertion generation.
    next_generation: AtomicU64,
    /// Capacity in bytes.
    capacity: u64,
    /// Which partition each tenant is in (flushes go by partition).
    layout: Layout,
    /// Counters.
    pub stats: Arc<L1Stats>,
}

/// Expires each entry at its own `expires_at`.
struct PerEntryTtl;

impl Expiry<EntryKey, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &EntryKey, value: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &EntryKey,
        value: &Arc<Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}

impl L1 {
    /// An empty L1 holding at most `capacity_bytes`, for tenants partitioned by `layout`.
    pub fn new(capacity_bytes: u64, layout: Layout) -> Self {
        let stats = Arc::new(L1Stats::default());
        let removed: RemovalQueue = Arc::default();
        let (listener_stats, listener_queue) = (stats.clone(), removed.clone());
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|k: &EntryKey, v: &Arc<Entry>| v.weight(k))
            .expire_after(PerEntryTtl)
            .eviction_listener(move |name: Arc<EntryKey>, value: Arc<Entry>, cause: RemovalCause| {
                if cause == RemovalCause::Size {
                    listener_stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                lock(&listener_queue).push(((*name).clone(), value, cause));
            })
            .build();
        let indexes = Indexes { flushes: vec![0; usize::from(layout.count())], ..Indexes::default() };
        L1 {
            cache,
            indexes: Mutex::new(indexes),
            removed,
            next_generation: AtomicU64::new(1),
            capacity: capacity_bytes,
            layout,
            stats,
        }
    }

    /// The entry, if L1 holds it and it has not expired.
    pub fn get(&self, tenant: &str, key: &str) -> Option<Arc<Entry>> {
        let entry = with_name(tenant, key, |name| self.cache.get(name))?;
        if entry.expires_at > Instant::now() {
            entry.reads.hit();
            Some(entry)
        } else {
            None
        }
    }

    /// Takes a guard before reading L2 for a fill of `tenant`.
    pub fn fill_guard(&self, tenant: &str) -> FillGuard {
        self.lock_indexes().guard(tenant, self.layout.of(tenant).index)
    }

    /// Stores an entry unless an invalidation of its tenant was applied after
    /// `guard` was taken. Returns whether it was stored.
    pub fn insert(&self, tenant: &str, key: &str, mut entry: Entry, guard: FillGuard) -> bool {
        let mut idx = self.lock_indexes();
        if idx.guard(tenant, self.layout.of(tenant).index) != guard {
            self.stats.fills_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(usage) = idx.usage(tenant) {
                usage.fills_refused += 1;
            }
            return false;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        entry.generation = generation;
        let name = EntryKey::new(tenant, key);
        let weight = u64::from(entry.weight(&name));
        if let Some(usage) = idx.usage(tenant) {
            usage.entries += 1;
            usage.bytes += weight;
            for tag in &entry.tags {
                if let Some(t) = usage.tag(tag) {
                    t.fills += 1;
                }
            }
        }
        let t = idx.tenants.entry(tenant.to_string()).or_default();
        t.keys.insert(name.clone(), generation);
        for tag in &entry.tags {
            t.tags.entry(tag.clone()).or_default().insert(name.clone(), generation);
        }
        for dep in &entry.depends_on {
            t.dependents.entry(dep.clone()).or_default().insert(name.clone(), generation);
        }
        self.cache.insert(name, Arc::new(entry));
        true
    }

    /// Drops every entry the selector covers: its keys, the members of its tags,
    /// the tenant's keys matching its patterns and, with `cascade`, every entry
    /// depending on one of those, transitively. Returns how many were dropped.
    /// Counted in the tenant's figures: an invalidation from the log.
    pub fn apply(&self, selector: &Selector) -> usize {
        self.apply_counted(selector, true)
    }

    /// [`apply`](Self::apply) ahead of the log, for this agent's own DELETE
    /// (read-your-writes): not counted, the log's copy of it will be.
    pub fn apply_ahead(&self, selector: &Selector) -> usize {
        self.apply_counted(selector, false)
    }

    fn apply_counted(&self, selector: &Selector, counted: bool) -> usize {
        let mut idx = self.lock_indexes();
        *idx.invalidations.entry(selector.tenant.clone()).or_insert(0) += 1;
        if counted {
            if let Some(usage) = idx.usage(&selector.tenant) {
                usage.invalidations += 1;
                for tag in &selector.tags {
                    if let Some(t) = usage.tag(tag) {
                        t.invalidations += 1;
                    }
                }
            }
        }
        let Some(t) = idx.tenants.get(&selector.tenant) else {
            return 0;
        };

        let mut doomed: HashSet<EntryKey> = selector.keys.iter().map(|k| EntryKey::new(&selector.tenant, k)).collect();
        for tag in &selector.tags {
            if let Some(members) = t.tags.get(tag) {
                doomed.extend(members.keys().cloned());
            }
        }
        for pattern in &selector.patterns {
            doomed.extend(t.keys.keys().filter(|name| glob::matches(pattern, name.key())).cloned());
        }
        if selector.cascade {
            let mut frontier: Vec<EntryKey> = doomed.iter().cloned().collect();
            while let Some(name) = frontier.pop() {
                for dependent in t.dependents.get(name.key()).into_iter().flat_map(HashMap::keys) {
                    if doomed.insert(dependent.clone()) {
                        frontier.push(dependent.clone());
                    }
                }
            }
        }

        let mut dropped = 0;
        for name in doomed {
            if self.cache.remove(&name).is_some() {
                dropped += 1;
            }
        }
        self.stats.invalidated.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Drops every entry of the tenants of partition `partition` (its log
    /// cannot prove them fresh). Fills of those tenants guarded before the
    /// flush are refused afterwards. Returns how many entries were dropped.
    pub fn flush_partition(&self, partition: u16) -> usize {
        let mut idx = self.lock_indexes();
        if let Some(count) = idx.flushes.get_mut(usize::from(partition)) {
            *count += 1;
        }
        let tenants: Vec<String> =
            idx.tenants.keys().filter(|t| self.layout.of(t).index == partition).cloned().collect();
        let mut dropped = 0;
        for tenant in tenants {
            if let Some(index) = idx.tenants.remove(&tenant) {
                for name in index.keys.keys() {
                    if self.cache.remove(name).is_some() {
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// Drops everything. Fills guarded before the flush are refused
    /// afterwards, whatever their tenant.
    pub fn flush(&self) {
        let mut idx = self.lock_indexes();
        for count in idx.flushes.iter_mut() {
            *count += 1;
        }
        idx.tenants.clear();
        self.cache.invalidate_all();
    }

    /// Entries held (after pending maintenance).
    pub fn entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Bytes held, keys and values counted.
    pub fn bytes(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Runs moka's pending work and folds removals into the indexes; called
    /// periodically so that index records do not outlive their entries for long.
    pub fn maintain(&self) {
        self.cache.run_pending_tasks();
        drop(self.lock_indexes());
    }

    /// Locks the indexes, first folding in what moka removed meanwhile.
    fn lock_indexes(&self) -> MutexGuard<'_, Indexes> {
        let mut idx = lock(&self.indexes);
        let removed = std::mem::take(&mut *lock(&self.removed));
        for (key, entry, cause) in removed {
            account(&mut idx, &key, &entry, cause);
            forget(&mut idx, &key, &entry);
        }
        idx
    }

    /// The L1 figures of each tenant: entries, bytes, invalidations, refused
    /// fills, evictions and tags (after pending maintenance).
    pub fn tenant_figures(&self) -> HashMap<String, TenantReport> {
        self.cache.run_pending_tasks();
        let idx = self.lock_indexes();
        idx.usage
            .iter()
            .map(|(tenant, u)| {
                let mut tags: Vec<TagReport> = u.tags.values().cloned().collect();
                tags.sort_by(|a, b| a.tag.cmp(&b.tag));
                let report = TenantReport {
                    tenant: tenant.clone(),
                    entries: u.entries,
                    bytes: u.bytes,
                    invalidations: u.invalidations,
                    fills_refused: u.fills_refused,
                    evictions: u.evictions,
                    evicted_unread: u.evicted_unread,
                    tags,
                    ..TenantReport::default()
                };
                (tenant.clone(), report)
            })
            .collect()
    }
}

/// Counts an entry gone from L1 in its tenant's figures: its room, its hits
/// (for its tags), and whether it was evicted before its first hit.
fn account(idx: &mut Indexes, name: &EntryKey, entry: &Entry, cause: RemovalCause) {
    let weight = u64::from(entry.weight(name));
    let Some(usage) = idx.usage.get_mut(name.tenant()) else {
        return;
    };
    usage.entries = usage.entries.saturating_sub(1);
    usage.bytes = usage.bytes.saturating_sub(weight);
    let reads = u64::from(entry.reads());
    if cause == RemovalCause::Size {
        usage.evictions += 1;
        if reads == 0 {
            usage.evicted_unread += 1;
        }
    }
    if reads > 0 {
        for tag in &entry.tags {
            if let Some(t) = usage.tag(tag) {
                t.hits += reads;
            }
        }
    }
}

/// Removes the index records that were made for this very entry.
fn forget(idx: &mut Indexes, name: &EntryKey, entry: &Entry) {
    let Some(t) = idx.tenants.get_mut(name.tenant()) else {
        return;
    };
    let generation = entry.generation;
    let drop_record = |map: &mut HashMap<String, HashMap<EntryKey, u64>>, record: &str| {
        if let Some(members) = map.get_mut(record) {
            if members.get(name) == Some(&generation) {
                members.remove(name);
            }
            if members.is_empty() {
                map.remove(record);
            }
        }
    };
    for tag in &entry.tags {
        drop_record(&mut t.tags, tag);
    }
    for dep in &entry.depends_on {
        drop_record(&mut t.dependents, dep);
    }
    if t.keys.get(name) == Some(&generation) {
        t.keys.remove(name);
    }
    if t.keys.is_empty() && t.tags.is_empty() && t.dependents.is_empty() {
        idx.tenants.remove(name.tenant());
    }
}

/// Locks a std mutex, recovering the data if a panicking thread poisoned it:
/// the indexes stay usable (at worst they over-invalidate).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tags: &[&str], deps: &[&str]) -> Entry {
        Entry::new(
            Bytes::from_static(b"value"),
            "text/plain",
            tags.iter().map(|s| s.to_string()).collect(),
            deps.iter().map(|s| s.to_string()).collect(),
            Duration::from_secs(60),
        )
    }

    fn store(l1: &L1, tenant: &str, key: &str, tags: &[&str], deps: &[&str]) {
        let guard = l1.fill_guard(tenant);
        assert!(l1.insert(tenant, key, entry(tags, deps), guard));
    }

    fn selector(tenant: &str) -> Selector {
        Selector { tenant: tenant.into(), cascade: true, ..Selector::default() }
    }

    #[test]
    fn keys_tags_and_patterns_drop_exactly_what_they_cover() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        store(&l1, "t", "list:1", &["red"], &[]);
        store(&l1, "t", "list:2", &[], &[]);
        store(&l1, "t", "item:1", &["red", "blue"], &[]);
        store(&l1, "t", "item:2", &["green"], &[]);
        store(&l1, "u", "item:1", &["red"], &[]);

        assert_eq!(l1.apply(&Selector { tags: vec!["red".into()], ..selector("t") }), 2);
        assert!(l1.get("t", "list:1").is_none() && l1.get("t", "item:1").is_none());
        assert!(l1.get("u", "item:1").is_some(), "another tenant is untouched");

        assert_eq!(l1.apply(&Selector { patterns: vec!["list:*".into()], ..selector("t") }), 1);
        assert!(l1.get("t", "list:2").is_none());
        assert_eq!(l1.apply(&Selector { keys: vec!["item:2".into()], ..selector("t") }), 1);
        assert_eq!(l1.entries(), 1);
    }

    #[test]
    fn cascade_follows_depends_on_transitively_and_stops_at_cycles() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        store(&l1, "t", "base", &[], &[]);
        store(&l1, "t", "mid", &[], &["base"]);
        store(&l1, "t", "top", &[], &["mid"]);
        store(&l1, "t", "loop-a", &[], &["loop-b"]);
        store(&l1, "t", "loop-b", &[], &["loop-a"]);
        store(&l1, "t", "alone", &[], &[]);

        let no_cascade = Selector { keys: vec!["base".into()], cascade: false, ..selector("t") };
        assert_eq!(l1.apply(&no_cascade), 1);
        assert!(l1.get("t", "mid").is_some());
        // The index still knows mid depends on base, so a cascading invalidation follows it.
        assert_eq!(l1.apply(&Selector { keys: vec!["base".into()], ..selector("t") }), 2);
        assert!(l1.get("t", "top").is_none());
        assert_eq!(l1.apply(&Selector { keys: vec!["loop-a".into()], ..selector("t") }), 2);
        assert!(l1.get("t", "alone").is_some());
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_of_its_tenant_stays_out() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        let guard = l1.fill_guard("t");
        l1.apply(&Selector { keys: vec!["other".into()], ..selector("t") });
        assert!(!l1.insert("t", "k", entry(&[], &[]), guard));
        assert!(l1.get("t", "k").is_none());
        assert_eq!(l1.stats.fills_refused.load(Ordering::Relaxed), 1);

        // Another tenant's invalidation does not void the fill.
        let guard = l1.fill_guard("t");
        l1.apply(&Selector { keys: vec!["k".into()], ..selector("u") });
        assert!(l1.insert("t", "k", entry(&[], &[]), guard));

        // A flush voids every fill guarded before it.
        let guard = l1.fill_guard("fresh-tenant");
        l1.flush();
        assert!(!l1.insert("fresh-tenant", "k", entry(&[], &[]), guard));
        assert!(l1.get("t", "k").is_none());
    }

    #[test]
    fn a_partition_flush_drops_its_tenants_only() {
        let layout = Layout::new(16);
        let l1 = L1::new(1 << 20, layout.clone());
        let tenants: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        for t in &tenants {
            store(&l1, t, "k", &["tag"], &[]);
        }
        let flushed = layout.of("t0").index;
        let guard_in = l1.fill_guard("t0");
        let other = tenants.iter().find(|t| layout.of(t).index != flushed).expect("another partition");
        let guard_out = l1.fill_guard(other);
        let members = tenants.iter().filter(|t| layout.of(t).index == flushed).count();
        assert_eq!(l1.flush_partition(flushed), members);
        for t in &tenants {
            assert_eq!(l1.get(t, "k").is_none(), layout.of(t).index == flushed, "tenant {t}");
        }
        assert!(!l1.insert("t0", "k2", entry(&[], &[]), guard_in), "a fill from before the flush");
        assert!(l1.insert(other, "k2", entry(&[], &[]), guard_out), "another partition's fill");
        // The flushed tenants' indexes are gone with their entries.
        assert_eq!(l1.apply(&Selector { tags: vec!["tag".into()], ..selector("t0") }), 0);
    }

    #[test]
    fn replacing_an_entry_keeps_the_new_entrys_index_records() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        store(&l1, "t", "k", &["a"], &[]);
        store(&l1, "t", "k", &["a", "b"], &[]);
        l1.maintain();
        // The replaced entry's removal must not erase the new entry's record for tag "a".
        assert_eq!(l1.apply(&Selector { tags: vec!["a".into()], ..selector("t") }), 1);
        assert!(l1.get("t", "k").is_none());
    }

    #[test]
    fn capacity_is_bounded_by_bytes_and_counts_keys() {
        let l1 = L1::new(10_000, Layout::new(16));
        // 1000 entries of 24 bytes each would need 24 000 bytes.
        for i in 0..1000 {
            store(&l1, "t", &format!("key-{i:04}"), &[], &[]);
        }
        l1.maintain();
        assert!(l1.bytes() <= 10_000, "L1 holds {} bytes", l1.bytes());
        assert!(l1.stats.evictions.load(Ordering::Relaxed) > 0);
        // Each entry weighs tenant + key + value + content type.
        let one = L1::new(10_000, Layout::new(16));
        store(&one, "t", "key-0001", &[], &[]);
        assert_eq!(one.bytes(), (1 + 8 + 5 + 10) as u64);
    }

    #[test]
    fn tenant_figures_count_entries_bytes_tags_and_invalidations_from_the_log() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        store(&l1, "t", "a", &["red"], &[]);
        store(&l1, "t", "b", &["red"], &[]);
        store(&l1, "t", "b", &["red"], &[]); // replaced: still one entry
        store(&l1, "u", "c", &[], &[]);
        assert!(l1.get("t", "a").is_some() && l1.get("t", "a").is_some());
        assert_eq!(l1.get("t", "a").map(|e| e.reads()), Some(3));
        l1.apply(&Selector { tags: vec!["red".into()], ..selector("t") });
        // This agent's own DELETE, applied ahead of the log: counted when the log's copy comes.
        l1.apply_ahead(&Selector { keys: vec!["zzz".into()], ..selector("t") });
        let figures = l1.tenant_figures();
        let t = &figures["t"];
        assert_eq!((t.entries, t.bytes, t.invalidations, t.evictions), (0, 0, 1, 0), "{t:?}");
        let red = t.tags.iter().find(|g| g.tag == "red").expect("the red tag");
        // Three fills (one replaced), and the hits of "a", counted as it left L1.
        assert_eq!((red.invalidations, red.fills, red.hits), (1, 3, 3), "{red:?}");
        // "u" + NUL + "c" (the NUL not charged), a 5-byte value, "text/plain".
        assert_eq!((figures["u"].entries, figures["u"].bytes), (1, 2 + 5 + 10));
    }

    #[test]
    fn evictions_of_entries_never_hit_are_counted_per_tenant() {
        let l1 = L1::new(2_000, Layout::new(16));
        for i in 0..500 {
            store(&l1, "t", &format!("key-{i:04}"), &[], &[]);
        }
        l1.maintain();
        let t = &l1.tenant_figures()["t"];
        assert!(t.evictions > 0 && t.evicted_unread == t.evictions, "{t:?}");
        assert!(t.bytes <= 2_000 && t.entries == l1.entries(), "{t:?}");
    }

    #[test]
    fn entries_expire_at_their_own_ttl() {
        let l1 = L1::new(1 << 20, Layout::new(16));
        let short = Entry::new(Bytes::from_static(b"v"), "", vec![], vec![], Duration::from_millis(30));
        let guard = l1.fill_guard("t");
        assert!(l1.insert("t", "short", short, guard));
        store(&l1, "t", "long", &[], &[]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(l1.get("t", "short").is_none());
        assert!(l1.get("t", "long").is_some());
    }
}
