//! Micro-benchmarks of the L1 hot paths on a cache holding 100k entries of
//! 100-byte values: lookups (`l1/get_hit`, `l1/get_miss`; `l1/get_hit_counted`
//! adds what `Agent::get` also does on a hit for `GET /v1/stats`, the
//! per-tenant tally of `node_agent::usage`, and `l1/count_hit` that tally
//! alone), a fill with two tags
//! (`l1/insert_2_tags`: `fill_guard` then `insert`, i.e. the index update) and
//! invalidations (`l1/apply_key`: one key; `l1/apply_tag_100`: a tag carried by
//! 100 entries).
//!
//! The insert and apply benchmarks restore the cache before every iteration
//! (`iter_batched`, per iteration), outside the timing, so every timed call
//! really inserts or drops something.
//!
//! Run with `make bench`, or `cargo bench -p node-agent --bench l1` (add
//! `-- --quick` for a fast, rougher pass). `cargo test --all-targets` runs each
//! benchmark once.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use node_agent::l1::{Entry, L1};
use node_agent::usage::Usage;
use shared::protocol::Selector;

const TENANT: &str = "acme";
const ENTRIES: usize = 100_000;
/// Entries carrying [`HOT_TAG`], for `l1/apply_tag_100`.
const TAGGED: usize = 100;
const HOT_TAG: &str = "supplier-hot";
/// Room for every entry (about 150 bytes each with its key and tags), so nothing is evicted.
const CAPACITY: u64 = 256 << 20;

fn value() -> Bytes {
    Bytes::from(vec![b'x'; 100])
}

fn entry(key: &str, value: &Bytes, tags: &[&str]) -> Entry {
    Entry::new(
        TENANT,
        key,
        value,
        "application/json",
        tags.iter().map(|t| t.to_string()).collect(),
        Vec::new(),
        Duration::from_secs(3600),
    )
}

fn key(i: usize) -> String {
    format!("supplier:{i}:detail")
}

fn store(l1: &L1, entry: Entry) {
    let guard = l1.fill_guard(TENANT);
    assert!(l1.insert(entry, guard), "no invalidation races the benchmark's own fills");
}

/// 100k entries, each with a broad tag and one of 1000 narrower ones.
fn populated() -> L1 {
    let l1 = L1::new(CAPACITY, shared::schema::Layout::default());
    let value = value();
    for i in 0..ENTRIES {
        let group = format!("supplier-group:{}", i % 1000);
        store(&l1, entry(&key(i), &value, &["suppliers", &group]));
    }
    assert_eq!(l1.entries(), ENTRIES as u64, "nothing was evicted");
    l1
}

fn bench_l1(c: &mut Criterion) {
    let l1 = populated();
    let value = value();
    // Keys visited in a scattered order, so lookups do not all hit one hot slot.
    let hits: Vec<String> = (0..ENTRIES).map(|i| key(i * 7919 % ENTRIES)).collect();
    let misses: Vec<String> = (0..ENTRIES).map(|i| format!("supplier:{i}:absent")).collect();

    let mut group = c.benchmark_group("l1");
    group.bench_function("get_hit", |b| {
        let mut keys = hits.iter().cycle();
        b.iter(|| {
            let key = keys.next().expect("cycle never ends");
            l1.get(TENANT, black_box(key)).expect("every key is held")
        })
    });
    let usage = Usage::new();
    group.bench_function("get_hit_counted", |b| {
        let mut keys = hits.iter().cycle();
        b.iter(|| {
            let key = keys.next().expect("cycle never ends");
            let entry = l1.get(TENANT, black_box(key)).expect("every key is held");
            usage.l1_hit(TENANT, key, entry.tags());
            entry
        })
    });
    // The tally alone, the same keys and two tags as the entries carry: what `Agent::get` adds to a hit.
    group.bench_function("count_hit", |b| {
        let mut keys = hits.iter().cycle();
        b.iter(|| {
            let key = keys.next().expect("cycle never ends");
            usage.l1_hit(TENANT, black_box(key), ["suppliers", "supplier-group:7"].into_iter());
        })
    });
    group.bench_function("get_miss", |b| {
        let mut keys = misses.iter().cycle();
        b.iter(|| {
            let key = keys.next().expect("cycle never ends");
            assert!(l1.get(TENANT, black_box(key)).is_none());
        })
    });

    let fresh = "supplier:fresh:detail";
    let drop_fresh = Selector { tenant: TENANT.into(), keys: vec![fresh.into()], ..Selector::default() };
    group.bench_function("insert_2_tags", |b| {
        b.iter_batched(
            || {
                // Make sure the key is absent.
                l1.apply(&drop_fresh);
                entry(fresh, &value, &["suppliers", "supplier:fresh"])
            },
            |entry| {
                let guard = l1.fill_guard(TENANT);
                l1.insert(entry, guard)
            },
            BatchSize::PerIteration,
        )
    });

    let one = key(ENTRIES / 2);
    let drop_one = Selector { tenant: TENANT.into(), keys: vec![one.clone()], cascade: true, ..Selector::default() };
    group.bench_function("apply_key", |b| {
        b.iter_batched(
            || {
                store(&l1, entry(&one, &value, &["suppliers", "supplier-group:0"]));
            },
            |()| assert_eq!(l1.apply(black_box(&drop_one)), 1),
            BatchSize::PerIteration,
        )
    });

    let tagged: Vec<String> = (0..TAGGED).map(|i| format!("supplier:hot{i}:detail")).collect();
    let drop_tag = Selector { tenant: TENANT.into(), tags: vec![HOT_TAG.into()], cascade: true, ..Selector::default() };
    group.bench_function("apply_tag_100", |b| {
        b.iter_batched(
            || {
                for key in &tagged {
                    store(&l1, entry(key, &value, &["suppliers", HOT_TAG]));
                }
            },
            |()| assert_eq!(l1.apply(black_box(&drop_tag)), TAGGED),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_l1);
criterion_main!(benches);
