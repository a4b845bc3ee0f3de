//! L1: the in-memory cache of one agent, bounded by bytes, with a TTL per entry,
//! and the indexes that let an invalidation find its entries: per tenant, tag
//! members and dependents (`depends_on` edges); patterns walk the entries.
//!
//! Reads go to the sharded [`store`] under a shard's read lock and never touch
//! the indexes. Every change (inserts, invalidations, evictions, expiry sweeps,
//! flushes) is made with the index lock held, so an invalidation never runs
//! between an entry entering the store and entering the indexes, and index
//! records always describe the entries held. A fill that read L2 before an
//! invalidation of its tenant was applied is refused (see [`FillGuard`]), so
//! an invalidation that arrives while L2 is being read cannot let the old
//! value in.
//!
//! The per-tenant figures of `GET /v1/stats` that L1 knows (entries, bytes,
//! evictions, invalidations, refused fills, tag fills) are kept beside the
//! indexes, on the write paths only. The one thing a hit records is in the
//! entry itself: its use count for eviction and whether it was ever read
//! ([`Entry::was_read`]), written only when they change. Hits themselves are
//! counted per thread by `crate::usage`.

mod store;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use triomphe::ThinArc;

use shared::glob;
use shared::protocol::{Selector, TagReport, TenantReport};
use shared::schema::Layout;

use store::{Cause, Store};

/// The moment L1's clock counts from: an entry's expiry is held as
/// nanoseconds since then (8 bytes, where an `Instant` takes 16).
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds from [`ORIGIN`] to `at` (0 for anything earlier).
fn ns_since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*ORIGIN).as_nanos()).unwrap_or(u64::MAX)
}

/// Calls `f` with the name of `tenant`/`key`: the tenant, a NUL, the key (a
/// tenant cannot contain NUL; see `shared::names`), spelled out in a buffer of
/// this thread, so that a lookup allocates nothing.
fn with_name<R>(tenant: &str, key: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local!(static NAME: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) });
    NAME.with(|cell| match cell.try_borrow_mut() {
        Ok(mut name) => {
            name.clear();
            name.extend_from_slice(tenant.as_bytes());
            name.push(0);
            name.extend_from_slice(key.as_bytes());
            f(&name)
        }
        // Only if `f` itself named an entry: spell this one out afresh.
        Err(_) => f(format!("{tenant}\0{key}").as_bytes()),
    })
}

/// An entry held in L1, cheap to clone (a reference count). Its header (16
/// bytes), name (tenant, NUL, key), value and, if it has any, its tags,
/// dependencies and uncommon content type share one allocation. The header is
/// kept to 16 bytes on purpose: with the allocator's rounding, a 100-byte
/// value with a short key then takes a 160-byte block instead of a 192-byte one.
#[derive(Clone)]
pub struct Entry(ThinArc<Header, u8>);

/// The fixed part of an entry.
struct Header {
    /// When it expires, in nanoseconds since [`ORIGIN`] (the same moment as in L2).
    expires_at: u64,
    /// Its use count for eviction (0 to 3, in the top 2 bits; see `store`)
    /// and whether it was ever hit ([`READ`]). A hit writes it only when
    /// that changes it, so the hits of a hot entry write nothing to it: two
    /// cores hitting one entry do not pass its cache line back and forth.
    uses: AtomicU32,
    /// Bytes of the name; the value follows it.
    name_len: u16,
    /// Index into [`COMMON_CONTENT_TYPES`] (or [`OTHER_CONTENT_TYPE`]), plus
    /// [`HAS_META`] when tags, dependencies or the content type follow the value.
    kind: u8,
}

/// Content types most entries have, held once for all of them.
const COMMON_CONTENT_TYPES: [&str; 5] = [
    "application/octet-stream",
    "application/json",
    "text/plain; charset=utf-8",
    "text/plain",
    "text/html; charset=utf-8",
];
/// The entry's content type is in its meta.
const OTHER_CONTENT_TYPE: u8 = 0x7f;
/// After the value come the meta (tags, dependencies, and the content type
/// if uncommon, each a 2-byte length and the bytes) and its length in 4 bytes.
const HAS_META: u8 = 0x80;
/// The highest use count, and where it sits in `uses`.
const MAX_USES: u32 = 3;
const USES_SHIFT: u32 = 30;
/// In `uses`: the entry was hit at least once.
const READ: u32 = 1;
/// In `uses`, between [`READ`] and the use count: the refresh lead, in whole
/// seconds (see [`Entry::with_refresh_lead`]). Set once, when the entry is
/// made; the use count's writes carry it over.
const LEAD_SHIFT: u32 = 1;
const LEAD_MASK: u32 = ((1 << (USES_SHIFT - LEAD_SHIFT)) - 1) << LEAD_SHIFT;
/// Entries up to this size (name, value, meta) are copied out on a hit
/// rather than shared: a copy writes only memory of the reading thread,
/// where sharing raises the entry's reference count, a cache line every
/// core hitting the entry must take in turn. The trade, measured: a hit on
/// one key from two threads stays at 7-11M reads/s (`bench --only
/// embedded`; shared, rounds fell to 3.2M whenever both cores hit it), and a
/// single-threaded hit of an entry not in the CPU cache costs about 230 ns
/// more (`l1/get_hit`: 0.42 µs shared, 0.65 µs copied).
const COPY_LIMIT: usize = 1024;

impl Entry {
    /// The entry of `tenant`/`key`, expiring `ttl` from now. The value is
    /// copied into the entry's own allocation, so it never keeps a larger
    /// buffer it was sliced from alive.
    pub fn new(
        tenant: &str,
        key: &str,
        value: &[u8],
        content_type: &str,
        tags: Vec<String>,
        depends_on: Vec<String>,
        ttl: Duration,
    ) -> Self {
        let common = COMMON_CONTENT_TYPES.iter().position(|c| *c == content_type);
        let mut data = Vec::with_capacity(tenant.len() + 1 + key.len() + value.len());
        data.extend_from_slice(tenant.as_bytes());
        data.push(0);
        data.extend_from_slice(key.as_bytes());
        let name_len = data.len();
        data.extend_from_slice(value);
        let mut kind = common.map_or(OTHER_CONTENT_TYPE, |i| i as u8);
        if common.is_none() || !tags.is_empty() || !depends_on.is_empty() {
            kind |= HAS_META;
            let meta_start = data.len();
            // Counts and lengths take 2 bytes: a tag is at most 256 bytes
            // and a key 1024 (`shared::names`), a content type a header value.
            fn put_count(data: &mut Vec<u8>, n: usize) {
                data.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes());
            }
            fn put_string(data: &mut Vec<u8>, s: &str) {
                let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
                put_count(data, bytes.len());
                data.extend_from_slice(bytes);
            }
            for list in [&tags, &depends_on] {
                let list = &list[..list.len().min(usize::from(u16::MAX))];
                put_count(&mut data, list.len());
                list.iter().for_each(|s| put_string(&mut data, s));
            }
            if common.is_none() {
                put_string(&mut data, content_type);
            }
            let meta_len = u32::try_from(data.len() - meta_start).unwrap_or(u32::MAX);
            data.extend_from_slice(&meta_len.to_le_bytes());
        }
        let header = Header {
            expires_at: ns_since_origin(Instant::now() + ttl),
            uses: AtomicU32::new(0),
            // A tenant is at most 64 bytes and a key 1024 (`shared::names`).
            name_len: u16::try_from(name_len).unwrap_or(u16::MAX),
            kind,
        };
        Entry(ThinArc::from_header_and_slice(header, &data))
    }

    fn header(&self) -> &Header {
        &self.0.header.header
    }

    /// Sets how long before it expires the entry is due for an eager refresh
    /// (`refresh_ahead`; whole seconds, at most about 17 years; zero: never).
    pub fn with_refresh_lead(self, lead: Duration) -> Self {
        let secs = u32::try_from(lead.as_secs()).unwrap_or(u32::MAX).min(LEAD_MASK >> LEAD_SHIFT);
        let word = &self.header().uses;
        word.store(word.load(Ordering::Relaxed) & !LEAD_MASK | secs << LEAD_SHIFT, Ordering::Relaxed);
        self
    }

    /// Whether the entry is due for an eager refresh as of `now`: it has a
    /// refresh lead and less than that left to live.
    pub fn due_for_refresh(&self, now: Instant) -> bool {
        let lead = (self.header().uses.load(Ordering::Relaxed) & LEAD_MASK) >> LEAD_SHIFT;
        lead > 0 && self.expires_at().saturating_duration_since(now) <= Duration::from_secs(u64::from(lead))
    }

    /// The meta's bytes (empty without).
    fn meta(&self) -> &[u8] {
        let data = &self.0.slice;
        if self.header().kind & HAS_META == 0 || data.len() < 4 {
            return &[];
        }
        let (rest, len) = data.split_at(data.len() - 4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        &rest[rest.len().saturating_sub(len)..]
    }

    /// The entry's tags (`part` 0), dependencies (1) or uncommon content type (2).
    fn part(&self, part: usize) -> impl Iterator<Item = &str> {
        let mut meta = Meta(self.meta());
        for _ in 0..part.min(2) {
            meta.skip_list();
        }
        let count = if part < 2 { meta.count() } else { 1 };
        (0..count).map(move |_| meta.string())
    }

    /// Tenant, NUL, key.
    fn name(&self) -> &[u8] {
        &self.0.slice[..usize::from(self.header().name_len)]
    }

    /// The name as text (it was made of two strings and a NUL).
    fn name_str(&self) -> &str {
        std::str::from_utf8(self.name()).unwrap_or_default()
    }

    /// The tenant it belongs to.
    pub fn tenant(&self) -> &str {
        let name = self.name_str();
        name.split_once('\0').map_or(name, |(tenant, _)| tenant)
    }

    /// Its key.
    pub fn key(&self) -> &str {
        self.name_str().split_once('\0').map_or("", |(_, key)| key)
    }

    /// The value's bytes, borrowed.
    pub fn value_slice(&self) -> &[u8] {
        let data = &self.0.slice;
        let meta = if self.header().kind & HAS_META == 0 { 0 } else { self.meta().len() + 4 };
        &data[usize::from(self.header().name_len)..data.len() - meta]
    }

    /// The value, sharing the entry's memory (no copy).
    pub fn value(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }

    /// Its content type.
    pub fn content_type(&self) -> &str {
        match COMMON_CONTENT_TYPES.get(usize::from(self.header().kind & !HAS_META)) {
            Some(common) => common,
            None => self.part(2).next().unwrap_or(""),
        }
    }

    /// Tags it carries.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.part(0)
    }

    /// Keys it depends on.
    pub fn depends_on(&self) -> impl Iterator<Item = &str> {
        self.part(1)
    }

    /// When it expires (the same moment as in L2).
    pub fn expires_at(&self) -> Instant {
        *ORIGIN + Duration::from_nanos(self.header().expires_at)
    }

    /// Time to live left.
    pub fn ttl_left(&self) -> Duration {
        self.expires_at().saturating_duration_since(Instant::now())
    }

    /// Whether it was hit in L1 since it was stored.
    pub fn was_read(&self) -> bool {
        self.header().uses.load(Ordering::Relaxed) & READ != 0
    }

    fn expired(&self, now_ns: u64) -> bool {
        self.header().expires_at <= now_ns
    }

    /// Counts a hit: marks it read and raises its use count (up to
    /// [`MAX_USES`]), writing only if that changes anything.
    fn hit(&self) {
        let word = &self.header().uses;
        let now = word.load(Ordering::Relaxed);
        let raised = ((now >> USES_SHIFT) + 1).min(MAX_USES) << USES_SHIFT | READ | now & LEAD_MASK;
        if raised != now {
            word.store(raised, Ordering::Relaxed);
        }
    }

    /// Lowers the use count as the eviction hand passes; false if it was
    /// already 0 (the entry is the victim).
    fn cool(&self) -> bool {
        let word = &self.header().uses;
        let now = word.load(Ordering::Relaxed);
        let uses = now >> USES_SHIFT;
        if uses > 0 {
            word.store((uses - 1) << USES_SHIFT | now & (READ | LEAD_MASK), Ordering::Relaxed);
        }
        uses > 0
    }

    /// What a hit hands out: a private copy of a small entry (see
    /// [`COPY_LIMIT`]), the entry itself otherwise.
    fn handed_out(&self) -> Entry {
        if self.0.slice.len() > COPY_LIMIT {
            return self.clone();
        }
        let h = self.header();
        let header = Header {
            expires_at: h.expires_at,
            uses: AtomicU32::new(h.uses.load(Ordering::Relaxed)),
            name_len: h.name_len,
            kind: h.kind,
        };
        Entry(ThinArc::from_header_and_slice(header, &self.0.slice))
    }

    /// Bytes it is charged for: tenant, key, value, content type, tags and
    /// dependencies (the NUL is not charged).
    fn weight(&self) -> u64 {
        let meta: usize = self.tags().chain(self.depends_on()).map(str::len).sum();
        let total = self.name().len() - 1 + self.value_slice().len() + self.content_type().len() + meta;
        total as u64
    }
}

/// Reads an entry's meta: 2-byte little-endian counts and lengths, and strings.
struct Meta<'a>(&'a [u8]);

impl<'a> Meta<'a> {
    fn count(&mut self) -> usize {
        let Some((n, rest)) = self.0.split_first_chunk::<2>() else {
            return 0;
        };
        self.0 = rest;
        usize::from(u16::from_le_bytes(*n))
    }

    fn string(&mut self) -> &'a str {
        let len = self.count().min(self.0.len());
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).unwrap_or_default()
    }

    fn skip_list(&mut self) {
        for _ in 0..self.count() {
            self.string();
        }
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("tenant", &self.tenant())
            .field("key", &self.key())
            .field("bytes", &self.value_slice().len())
            .field("content_type", &self.content_type())
            .field("tags", &self.tags().collect::<Vec<_>>())
            .field("depends_on", &self.depends_on().collect::<Vec<_>>())
            .field("ttl_left", &self.ttl_left())
            .finish()
    }
}

/// An entry's value as the owner of a [`Bytes`].
struct ValueOf(Entry);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        self.0.value_slice()
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

/// Index records of one tenant, naming entries by their name (tenant, NUL,
/// key), one shared string per entry however many records it has.
#[derive(Debug, Default)]
struct TenantIndex {
    /// Tag -> entries carrying it.
    tags: HashMap<String, HashSet<Arc<str>>>,
    /// Key -> entries that depend on it.
    dependents: HashMap<String, HashSet<Arc<str>>>,
}

#[derive(Debug, Default)]
struct Indexes {
    /// Per-tenant index records (only of tenants with tagged or dependent entries).
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
/// Entries the expiry sweep of one [`L1::maintain`] looks at.
const SWEEP_BUDGET: usize = 16 * 1024;

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

    /// Records an entry that entered the store: its index records and figures.
    fn entered(&mut self, entry: &Entry) {
        if let Some(usage) = self.usage(entry.tenant()) {
            usage.entries += 1;
            usage.bytes += entry.weight();
            for tag in entry.tags() {
                if let Some(t) = usage.tag(tag) {
                    t.fills += 1;
                }
            }
        }
        if entry.header().kind & HAS_META == 0 {
            return;
        }
        let name: Arc<str> = Arc::from(entry.name_str());
        let t = self.tenants.entry(entry.tenant().to_string()).or_default();
        for tag in entry.tags() {
            t.tags.entry(tag.to_string()).or_default().insert(name.clone());
        }
        for dep in entry.depends_on() {
            t.dependents.entry(dep.to_string()).or_default().insert(name.clone());
        }
    }

    /// Records an entry that left the store: removes its index records and
    /// counts it in its tenant's figures (its room, and whether it was
    /// evicted before its first hit).
    fn left(&mut self, entry: &Entry, cause: Cause) {
        if let Some(usage) = self.usage.get_mut(entry.tenant()) {
            usage.entries = usage.entries.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(entry.weight());
            if cause == Cause::Size {
                usage.evictions += 1;
                if !entry.was_read() {
                    usage.evicted_unread += 1;
                }
            }
        }
        let Some(t) = self.tenants.get_mut(entry.tenant()) else {
            return;
        };
        let name = entry.name_str();
        let drop_record = |map: &mut HashMap<String, HashSet<Arc<str>>>, record: &str| {
            if let Some(members) = map.get_mut(record) {
                members.remove(name);
                if members.is_empty() {
                    map.remove(record);
                }
            }
        };
        for tag in entry.tags() {
            drop_record(&mut t.tags, tag);
        }
        for dep in entry.depends_on() {
            drop_record(&mut t.dependents, dep);
        }
        if t.tags.is_empty() && t.dependents.is_empty() {
            self.tenants.remove(entry.tenant());
        }
    }
}

/// The L1 cache with its indexes; cheap to share behind an `Arc`.
pub struct L1 {
    /// The entries, bounded by weight, each with its own expiry.
    store: Store,
    /// Index records and figures, guarded together with every change to the
    /// store. A std mutex: it is never held across an await.
    indexes: Mutex<Indexes>,
    /// Capacity in bytes.
    capacity: u64,
    /// Which partition each tenant is in (flushes go by partition).
    layout: Layout,
    /// Counters.
    pub stats: Arc<L1Stats>,
}

impl L1 {
    /// An empty L1 holding at most `capacity_bytes`, for tenants partitioned by `layout`.
    pub fn new(capacity_bytes: u64, layout: Layout) -> Self {
        LazyLock::force(&ORIGIN);
        let indexes = Indexes { flushes: vec![0; usize::from(layout.count())], ..Indexes::default() };
        L1 {
            store: Store::new(capacity_bytes),
            indexes: Mutex::new(indexes),
            capacity: capacity_bytes,
            layout,
            stats: Arc::default(),
        }
    }

    /// The entry, if L1 holds it and it has not expired.
    pub fn get(&self, tenant: &str, key: &str) -> Option<Entry> {
        self.get_at(tenant, key, Instant::now())
    }

    /// [`get`](Self::get) with the caller's clock reading, for a caller
    /// that already read the clock (one read per hit instead of two).
    pub fn get_at(&self, tenant: &str, key: &str, now: Instant) -> Option<Entry> {
        with_name(tenant, key, |name| self.store.get(name, ns_since_origin(now)))
    }

    /// An entry for a stale-if-error answer: as [`L1::get_at`], but one that
    /// expired at most `grace` before `now` counts too, while L1 still holds
    /// it (expired entries are swept a slice at a time). Entries an applied
    /// invalidation covered are never held.
    pub fn get_stale(&self, tenant: &str, key: &str, now: Instant, grace: Duration) -> Option<Entry> {
        let grace_ns = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        with_name(tenant, key, |name| self.store.get_within(name, ns_since_origin(now), grace_ns))
    }

    /// Takes a guard before reading L2 for a fill of `tenant`.
    pub fn fill_guard(&self, tenant: &str) -> FillGuard {
        lock(&self.indexes).guard(tenant, self.layout.of(tenant).index)
    }

    /// Stores an entry unless an invalidation of its tenant was applied after
    /// `guard` was taken, then evicts what exceeds the capacity. Returns
    /// whether it was stored (an entry larger than all of L1 is not).
    pub fn insert(&self, entry: Entry, guard: FillGuard) -> bool {
        let mut idx = lock(&self.indexes);
        let tenant = entry.tenant();
        if idx.guard(tenant, self.layout.of(tenant).index) != guard {
            self.stats.fills_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(usage) = idx.usage(tenant) {
                usage.fills_refused += 1;
            }
            return false;
        }
        if entry.weight() > self.capacity {
            return false;
        }
        // The replaced entry's records go first: the new one may share them.
        if let Some(replaced) = self.store.insert(entry.clone()) {
            idx.left(&replaced, Cause::Explicit);
        }
        idx.entered(&entry);
        let now = ns_since_origin(Instant::now());
        while self.store.bytes() > self.capacity {
            let Some((victim, cause)) = self.store.evict_one(now) else {
                break;
            };
            if cause == Cause::Size {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
            idx.left(&victim, cause);
        }
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
        let mut idx = lock(&self.indexes);
        let tenant = selector.tenant.as_str();
        *idx.invalidations.entry(tenant.to_string()).or_insert(0) += 1;
        if counted {
            if let Some(usage) = idx.usage(tenant) {
                usage.invalidations += 1;
                for tag in &selector.tags {
                    if let Some(t) = usage.tag(tag) {
                        t.invalidations += 1;
                    }
                }
            }
        }

        // Names of the doomed entries: tenant, NUL, key.
        let name = |key: &str| format!("{tenant}\0{key}");
        let mut doomed: HashSet<String> = selector.keys.iter().map(|k| name(k)).collect();
        let index = idx.tenants.get(tenant);
        for tag in &selector.tags {
            if let Some(members) = index.and_then(|t| t.tags.get(tag)) {
                doomed.extend(members.iter().map(|m| m.to_string()));
            }
        }
        if !selector.patterns.is_empty() {
            // Patterns walk the entries: no per-key index is kept for them.
            self.store.for_each(|entry| {
                if entry.tenant() == tenant && selector.patterns.iter().any(|p| glob::matches(p, entry.key())) {
                    doomed.insert(entry.name_str().to_string());
                }
            });
        }
        if let Some(index) = index.filter(|_| selector.cascade) {
            let mut frontier: Vec<String> = doomed.iter().cloned().collect();
            while let Some(doomed_name) = frontier.pop() {
                let key = doomed_name.split_once('\0').map_or("", |(_, key)| key);
                for dependent in index.dependents.get(key).into_iter().flatten() {
                    if !doomed.contains(&**dependent) {
                        doomed.insert(dependent.to_string());
                        frontier.push(dependent.to_string());
                    }
                }
            }
        }

        let mut dropped = 0;
        for name in doomed {
            if let Some(entry) = self.store.remove(name.as_bytes()) {
                idx.left(&entry, Cause::Explicit);
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
        let mut idx = lock(&self.indexes);
        if let Some(count) = idx.flushes.get_mut(usize::from(partition)) {
            *count += 1;
        }
        let mut partitions: HashMap<String, u16> = HashMap::new();
        let gone = self.store.remove_where(|entry| {
            let tenant = entry.tenant();
            if let Some(p) = partitions.get(tenant) {
                return *p == partition;
            }
            let p = self.layout.of(tenant).index;
            partitions.insert(tenant.to_string(), p);
            p == partition
        });
        for entry in &gone {
            idx.left(entry, Cause::Explicit);
        }
        gone.len()
    }

    /// Drops everything. Fills guarded before the flush are refused
    /// afterwards, whatever their tenant.
    pub fn flush(&self) {
        let mut idx = lock(&self.indexes);
        for count in idx.flushes.iter_mut() {
            *count += 1;
        }
        for entry in self.store.remove_where(|_| true) {
            idx.left(&entry, Cause::Explicit);
        }
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.store.entries()
    }

    /// Bytes held, keys and values counted.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Removes expired entries, a bounded number of them per call (each call
    /// goes on where the last stopped); called with every heartbeat, so that
    /// expired entries do not hold memory for long where no eviction needs it.
    pub fn maintain(&self) {
        let mut idx = lock(&self.indexes);
        for entry in self.store.sweep_expired(ns_since_origin(Instant::now()), SWEEP_BUDGET) {
            idx.left(&entry, Cause::Expired);
        }
    }

    /// The L1 figures of each tenant: entries, bytes, invalidations, refused
    /// fills, evictions and tags.
    pub fn tenant_figures(&self) -> HashMap<String, TenantReport> {
        let idx = lock(&self.indexes);
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

/// Locks a std mutex, recovering the data if a panicking thread poisoned it:
/// the indexes stay usable (at worst they over-invalidate).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, key: &str, tags: &[&str], deps: &[&str]) -> Entry {
        Entry::new(
            tenant,
            key,
            b"value",
            "text/plain",
            tags.iter().map(|s| s.to_string()).collect(),
            deps.iter().map(|s| s.to_string()).collect(),
            Duration::from_secs(60),
        )
    }

    fn store(l1: &L1, tenant: &str, key: &str, tags: &[&str], deps: &[&str]) {
        let guard = l1.fill_guard(tenant);
        assert!(l1.insert(entry(tenant, key, tags, deps), guard));
    }

    fn selector(tenant: &str) -> Selector {
        Selector { tenant: tenant.into(), cascade: true, ..Selector::default() }
    }

    #[test]
    fn an_entry_gives_back_its_name_value_and_meta() {
        let tags = vec!["red".to_string(), "x".repeat(256)];
        let deps = vec!["base".to_string()];
        let value = vec![7u8; 1000];
        let ttl = Duration::from_secs(60);
        let full = Entry::new("acme", "k:1", &value, "image/png", tags.clone(), deps.clone(), ttl);
        assert_eq!((full.tenant(), full.key(), full.value_slice()), ("acme", "k:1", &value[..]));
        assert_eq!(full.tags().collect::<Vec<_>>(), tags);
        assert_eq!(full.depends_on().collect::<Vec<_>>(), deps);
        assert_eq!((full.content_type(), &full.value()[..]), ("image/png", &value[..]));
        let plain = Entry::new("acme", "k:2", b"", "application/json", vec![], vec![], ttl);
        assert_eq!((plain.value_slice(), plain.content_type()), (&b""[..], "application/json"));
        assert_eq!((plain.tags().count(), plain.depends_on().count()), (0, 0));
        let deps_only = Entry::new("a", "k", b"v", "text/plain", vec![], deps.clone(), ttl);
        assert_eq!((deps_only.tags().count(), deps_only.depends_on().collect::<Vec<_>>()), (0, vec!["base"]));
        assert_eq!((deps_only.value_slice(), deps_only.content_type()), (&b"v"[..], "text/plain"));
        // A hit marks the entry read and raises its use count, up to 3.
        assert!(!plain.was_read());
        for _ in 0..5 {
            plain.hit();
        }
        assert!(plain.cool() && plain.cool() && plain.cool() && !plain.cool());
        assert!(plain.was_read());
        assert!(ttl - full.ttl_left() < Duration::from_secs(5));
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
        assert!(!l1.insert(entry("t", "k", &[], &[]), guard));
        assert!(l1.get("t", "k").is_none());
        assert_eq!(l1.stats.fills_refused.load(Ordering::Relaxed), 1);

        // Another tenant's invalidation does not void the fill.
        let guard = l1.fill_guard("t");
        l1.apply(&Selector { keys: vec!["k".into()], ..selector("u") });
        assert!(l1.insert(entry("t", "k", &[], &[]), guard));

        // A flush voids every fill guarded before it.
        let guard = l1.fill_guard("fresh-tenant");
        l1.flush();
        assert!(!l1.insert(entry("fresh-tenant", "k", &[], &[]), guard));
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
        assert!(!l1.insert(entry("t0", "k2", &[], &[]), guard_in), "a fill from before the flush");
        assert!(l1.insert(entry(other, "k2", &[], &[]), guard_out), "another partition's fill");
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
        assert!(l1.get("t", "a").is_some_and(|a| a.was_read()));
        l1.apply(&Selector { tags: vec!["red".into()], ..selector("t") });
        // This agent's own DELETE, applied ahead of the log: counted when the log's copy comes.
        l1.apply_ahead(&Selector { keys: vec!["zzz".into()], ..selector("t") });
        let figures = l1.tenant_figures();
        let t = &figures["t"];
        assert_eq!((t.entries, t.bytes, t.invalidations, t.evictions), (0, 0, 1, 0), "{t:?}");
        let red = t.tags.iter().find(|g| g.tag == "red").expect("the red tag");
        // Three fills (one replaced); hits are counted by `crate::usage`.
        assert_eq!((red.invalidations, red.fills, red.hits), (1, 3, 0), "{red:?}");
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
        let short = Entry::new("t", "short", b"v", "", vec![], vec![], Duration::from_millis(30));
        let guard = l1.fill_guard("t");
        assert!(l1.insert(short, guard));
        store(&l1, "t", "long", &[], &[]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(l1.get("t", "short").is_none());
        assert!(l1.get("t", "long").is_some());
    }

    #[test]
    fn the_refresh_lead_survives_hits_and_the_eviction_hand() {
        let ttl = Duration::from_secs(100);
        let entry = Entry::new("t", "k", b"v", "", vec![], vec![], ttl).with_refresh_lead(Duration::from_secs(20));
        let now = Instant::now();
        assert!(!entry.due_for_refresh(now), "100 s left, a lead of 20 s");
        assert!(entry.due_for_refresh(now + Duration::from_secs(81)), "19 s left");
        for _ in 0..5 {
            entry.hit();
        }
        while entry.cool() {}
        assert!(entry.was_read());
        assert!(entry.due_for_refresh(now + Duration::from_secs(81)), "the use count's writes keep the lead");
        assert!(entry.handed_out().due_for_refresh(now + Duration::from_secs(81)), "so does a copy");
        let never = Entry::new("t", "k", b"v", "", vec![], vec![], ttl);
        assert!(!never.due_for_refresh(now + Duration::from_secs(99)), "no lead: never due");
        let clamped = Entry::new("t", "k", b"v", "", vec![], vec![], ttl).with_refresh_lead(Duration::MAX);
        assert!(clamped.due_for_refresh(now), "a lead beyond the field's range is its largest");
        assert_eq!(clamped.header().uses.load(Ordering::Relaxed) >> USES_SHIFT, 0, "and spills into nothing");
    }
}
