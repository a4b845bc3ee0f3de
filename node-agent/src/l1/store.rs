//! Where L1's entries live: a hash table split into shards, each behind a
//! read-write lock, bounded by bytes, with CLOCK eviction.
//!
//! A shard is a hash table of the entries themselves: an entry costs its own
//! allocation (name, value and header, see [`Entry`]) plus a pointer and a
//! control byte in the table, about 10 to 19 bytes with the table's load.
//! (moka, L1's store before, cost about 420 bytes per entry on top of the
//! entry itself; `make bench` still measures it beside L1.) Many small shards also grow in small steps, so the tables
//! they outgrow are small blocks the allocator reuses at once.
//!
//! Eviction is CLOCK with a 2-bit use count (GCLOCK): a hit raises the
//! entry's count up to 3, and the hand of each shard, walking its buckets,
//! lowers counts on its way and evicts the first entry at 0 (or expired).
//! Entries hit often survive several sweeps; one-hit wonders go first. The
//! Zipf hit-ratio row of `make bench` compares it with moka's TinyLFU on the
//! same trace.
//!
//! A hit takes the shard's read lock, marks the entry used (a store only if
//! that changes it) and hands out a copy of a small entry, or the entry
//! itself for a large one (see `COPY_LIMIT`). Every change (insert, remove,
//! evict, sweep) is made by L1 with its index lock held, so there is one
//! writer at a time and the byte budget needs no compare-and-swap loop.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

use super::Entry;

/// Shards of a store: a power of two, from [`MIN_SHARDS`] to [`MAX_SHARDS`],
/// one per [`BYTES_PER_SHARD`] of capacity. Small shards grow in small steps
/// (the tables they outgrow are blocks the allocator soon reuses), but each
/// evicts from its own entries only, so a small L1 keeps fewer of them.
const MIN_SHARDS: usize = 16;
const MAX_SHARDS: usize = 1024;
const BYTES_PER_SHARD: u64 = 256 * 1024;

/// Why an entry left the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Evicted for room.
    Size,
    /// Its TTL ran out.
    Expired,
    /// Removed on purpose (invalidated, replaced or flushed).
    Explicit,
}

/// One shard; aligned so that two shards' locks never share a cache line.
#[repr(align(128))]
struct Padded(RwLock<Shard>);

#[derive(Default)]
struct Shard {
    /// The entries, found by the hash of their name.
    table: HashTable<Entry>,
    /// The CLOCK hand: the next bucket eviction looks at.
    hand: usize,
    /// The next bucket the expiry sweep looks at.
    swept: usize,
    /// Sum of its entries' weights.
    bytes: u64,
}

/// The sharded, byte-bounded table of entries.
pub struct Store {
    shards: Box<[Padded]>,
    hasher: foldhash::fast::RandomState,
    /// Sum of the entries' weights.
    bytes: AtomicU64,
    /// Entries held.
    entries: AtomicU64,
    /// The shard eviction takes its next victim from.
    evict_from: AtomicUsize,
    /// The shard the expiry sweep looks at next.
    sweep_from: AtomicUsize,
}

impl Store {
    /// An empty store for `capacity` bytes of entries.
    pub fn new(capacity: u64) -> Self {
        let wanted = usize::try_from(capacity / BYTES_PER_SHARD).unwrap_or(MAX_SHARDS);
        let shards = wanted.clamp(MIN_SHARDS, MAX_SHARDS).next_power_of_two();
        Store {
            shards: (0..shards).map(|_| Padded(RwLock::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            evict_from: AtomicUsize::new(0),
            sweep_from: AtomicUsize::new(0),
        }
    }

    fn hash(&self, name: &[u8]) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The shard of a hash: bits the table itself does not use (it takes the
    /// low bits for the bucket and the top 7 for its control bytes).
    fn shard_of(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[(hash >> 32) as usize & (self.shards.len() - 1)].0
    }

    /// The entry named `name`, unless it expired by `now_ns` (see `ns_since_origin`).
    pub fn get(&self, name: &[u8], now_ns: u64) -> Option<Entry> {
        let hash = self.hash(name);
        let shard = read(self.shard_of(hash));
        let entry = shard.table.find(hash, |e| e.name() == name)?;
        if entry.expired(now_ns) {
            return None;
        }
        entry.hit();
        Some(entry.handed_out())
    }

    /// [`Store::get`] for stale-if-error: an entry that expired at most
    /// `grace_ns` before `now_ns` is found too (if not swept yet). Not a hit.
    pub fn get_within(&self, name: &[u8], now_ns: u64, grace_ns: u64) -> Option<Entry> {
        let hash = self.hash(name);
        let shard = read(self.shard_of(hash));
        let entry = shard.table.find(hash, |e| e.name() == name)?;
        if entry.expired(now_ns.saturating_sub(grace_ns)) {
            return None;
        }
        Some(entry.handed_out())
    }

    /// Stores `entry`, returning the one it replaced.
    pub fn insert(&self, entry: Entry) -> Option<Entry> {
        let hash = self.hash(entry.name());
        let mut guard = write(self.shard_of(hash));
        let shard = &mut *guard;
        let weight = entry.weight();
        shard.bytes += weight;
        self.bytes.fetch_add(weight, Ordering::Relaxed);
        let hasher = &self.hasher;
        match shard.table.entry(hash, |e| e.name() == entry.name(), |e| hasher.hash_one(e.name())) {
            hashbrown::hash_table::Entry::Occupied(mut held) => {
                let old = std::mem::replace(held.get_mut(), entry);
                shard.bytes -= old.weight();
                self.bytes.fetch_sub(old.weight(), Ordering::Relaxed);
                Some(old)
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(entry);
                self.entries.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Removes the entry named `name`.
    pub fn remove(&self, name: &[u8]) -> Option<Entry> {
        let hash = self.hash(name);
        let mut shard = write(self.shard_of(hash));
        let (entry, _) = shard.table.find_entry(hash, |e| e.name() == name).ok()?.remove();
        Some(self.removed(&mut shard, entry))
    }

    /// Removes the entry in bucket `bucket`, if any.
    fn remove_bucket(&self, shard: &mut Shard, bucket: usize) -> Option<Entry> {
        let (entry, _) = shard.table.get_bucket_entry(bucket).ok()?.remove();
        Some(self.removed(shard, entry))
    }

    /// Counts an entry gone from `shard`.
    fn removed(&self, shard: &mut Shard, entry: Entry) -> Entry {
        shard.bytes -= entry.weight();
        self.bytes.fetch_sub(entry.weight(), Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
        entry
    }

    /// Evicts one entry (an expired one if the hand meets it first), taking
    /// the shards in turn and skipping those holding less than their share of
    /// the bytes, so that no shard is emptied while others stay full; `None`
    /// when the store is empty.
    pub fn evict_one(&self, now_ns: u64) -> Option<(Entry, Cause)> {
        let shards = self.shards.len();
        let share = self.bytes() / shards as u64;
        for _ in 0..2 * shards {
            let index = self.evict_from.fetch_add(1, Ordering::Relaxed) % shards;
            let mut shard = write(&self.shards[index].0);
            if shard.table.is_empty() || shard.bytes < share {
                continue;
            }
            let buckets = shard.table.num_buckets();
            // Every entry looked at loses a use, so 4 rounds find a victim.
            for _ in 0..=4 * buckets {
                let bucket = shard.hand % buckets;
                shard.hand = bucket + 1;
                let Some(entry) = shard.table.get_bucket(bucket) else {
                    continue;
                };
                let cause = if entry.expired(now_ns) {
                    Cause::Expired
                } else if !entry.cool() {
                    Cause::Size
                } else {
                    continue;
                };
                return self.remove_bucket(&mut shard, bucket).map(|entry| (entry, cause));
            }
        }
        None
    }

    /// Removes expired entries among the next `budget` buckets: each call
    /// continues where the last stopped, shard after shard.
    pub fn sweep_expired(&self, now_ns: u64, budget: usize) -> Vec<Entry> {
        let mut gone = Vec::new();
        let mut looked = 0;
        let shards = self.shards.len();
        for _ in 0..shards {
            let index = self.sweep_from.load(Ordering::Relaxed) % shards;
            let mut shard = write(&self.shards[index].0);
            while shard.swept < shard.table.num_buckets() && looked < budget {
                looked += 1;
                let bucket = shard.swept;
                shard.swept += 1;
                if shard.table.get_bucket(bucket).is_some_and(|e| e.expired(now_ns)) {
                    gone.extend(self.remove_bucket(&mut shard, bucket));
                }
            }
            if looked >= budget {
                break;
            }
            shard.swept = 0;
            self.sweep_from.store(index + 1, Ordering::Relaxed);
        }
        gone
    }

    /// Calls `f` with every entry (each shard under its read lock in turn).
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for shard in self.shards.iter() {
            read(&shard.0).table.iter().for_each(&mut f);
        }
    }

    /// Removes every entry `doomed` picks, returning them.
    pub fn remove_where(&self, mut doomed: impl FnMut(&Entry) -> bool) -> Vec<Entry> {
        let mut gone = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = write(&shard.0);
            let mut taken = Vec::new();
            shard.table.retain(|e| {
                let keep = !doomed(e);
                if !keep {
                    taken.push(e.clone());
                }
                keep
            });
            for entry in taken {
                gone.push(self.removed(&mut shard, entry));
            }
            if shard.table.is_empty() {
                // Give the memory of a flushed shard back.
                shard.table = HashTable::new();
            }
        }
        gone
    }

    /// Sum of the entries' weights.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }
}

/// Takes a read lock, recovering from poisoning (a shard's table is only
/// changed in ways that leave it consistent between calls that can panic).
fn read(lock: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write(lock: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(key: &str) -> Entry {
        Entry::new("t", key, b"v", "text/plain", vec![], vec![], Duration::from_secs(60))
    }

    fn name(key: &str) -> Vec<u8> {
        format!("t\0{key}").into_bytes()
    }

    #[test]
    fn removals_keep_every_other_entry_findable() {
        let store = Store::new(0);
        for i in 0..2000 {
            assert!(store.insert(entry(&format!("k{i}"))).is_none());
        }
        for i in (1..2000).step_by(2) {
            assert!(store.remove(&name(&format!("k{i}"))).is_some(), "k{i}");
        }
        for i in 0..2000 {
            let found = store.get(&name(&format!("k{i}")), 0).map(|e| e.key().to_string());
            assert_eq!(found, (i % 2 == 0).then(|| format!("k{i}")));
        }
        assert_eq!(store.entries(), 1000);
        let mut bytes = 0;
        store.for_each(|e| bytes += e.weight());
        assert_eq!(store.bytes(), bytes);
        let evicted: usize = std::iter::from_fn(|| store.evict_one(0)).count();
        assert_eq!((evicted, store.entries(), store.bytes()), (1000, 0, 0));
    }

    #[test]
    fn the_hand_spares_entries_in_use() {
        let store = Store::new(0);
        for i in 0..1000 {
            store.insert(entry(&format!("k{i}")));
        }
        for i in 0..100 {
            store.get(&name(&format!("k{i}")), 0);
        }
        let mut used_evicted = 0;
        for _ in 0..500 {
            let (victim, cause) = store.evict_one(0).expect("entries left");
            assert_eq!(cause, Cause::Size);
            let i: usize = victim.key()[1..].parse().expect("a number");
            used_evicted += usize::from(i < 100);
        }
        // Shards are evicted in turn, so a shard whose unused entries are all
        // gone may give up a used one while another still has unused ones.
        assert!(used_evicted <= 5, "{used_evicted} of 100 used entries evicted among 500 of 1000");
        // Expired entries go first, whatever their use.
        let (victim, cause) = store.evict_one(u64::MAX).expect("entries left");
        assert_eq!(cause, Cause::Expired, "{victim:?}");
    }
}
