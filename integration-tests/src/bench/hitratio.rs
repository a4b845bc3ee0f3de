//! L1's hit ratio under skew: a read-through loop over a Zipf trace, run on
//! L1 and on moka (L1's store before, whose TinyLFU admission is known for
//! its hit ratio) with the same byte budget and the same weights, so that a
//! leaner L1 is shown not to be a dumber one.

use std::time::Duration;

use moka::sync::Cache;
use node_agent::l1::{Entry, L1};
use shared::schema::Layout;

use super::Row;

const TENANT: &str = "zipf";
const CONTENT_TYPE: &str = "application/octet-stream";
/// Distinct keys in the trace.
const KEYS: usize = 100_000;
/// Reads in the trace.
const READS: usize = 2_000_000;
/// The Zipf exponent: 0.99, as in the YCSB and the caching literature's traces.
const SKEW: f64 = 0.99;

/// Key ranks drawn from Zipf(`SKEW`) over `KEYS` keys, from a fixed seed.
fn trace() -> Vec<u32> {
    let mut cumulative = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for rank in 1..=KEYS {
        sum += 1.0 / (rank as f64).powf(SKEW);
        cumulative.push(sum);
    }
    let mut rng = fastrand::Rng::with_seed(42);
    (0..READS)
        .map(|_| {
            let x = rng.f64() * sum;
            // Shuffle ranks over the key space, so that hot keys are not neighbours.
            let rank = cumulative.partition_point(|c| *c < x).min(KEYS - 1);
            (rank as u32).wrapping_mul(2_654_435_761) % KEYS as u32
        })
        .collect()
}

fn key(id: u32) -> String {
    format!("item:{id:06}")
}

/// Hit ratio of L1 holding `capacity` bytes over the trace, filling each miss.
fn l1_ratio(trace: &[u32], value: &[u8], capacity: u64) -> f64 {
    let l1 = L1::new(capacity, Layout::default());
    let mut hits = 0usize;
    for &id in trace {
        let key = key(id);
        if l1.get(TENANT, &key).is_some() {
            hits += 1;
        } else {
            let entry = Entry::new(TENANT, &key, value, CONTENT_TYPE, vec![], vec![], Duration::from_secs(3600));
            l1.insert(entry, l1.fill_guard(TENANT));
        }
    }
    hits as f64 / trace.len() as f64
}

/// The same for a moka cache weighing entries as L1 does.
fn moka_ratio(trace: &[u32], value: &[u8], capacity: u64) -> f64 {
    let cache: Cache<String, bytes::Bytes> = Cache::builder()
        .max_capacity(capacity)
        .weigher(|k: &String, v: &bytes::Bytes| (TENANT.len() + k.len() + v.len() + CONTENT_TYPE.len()) as u32)
        .build();
    let value = bytes::Bytes::copy_from_slice(value);
    let mut hits = 0usize;
    for &id in trace {
        let key = key(id);
        if cache.get(&key).is_some() {
            hits += 1;
        } else {
            cache.insert(key, value.clone());
        }
    }
    hits as f64 / trace.len() as f64
}

/// Hit ratios of L1 and moka on one Zipf trace, with room for 1% and 10% of its keys.
pub fn run() -> (Vec<Row>, String) {
    let trace = trace();
    let value = vec![b'v'; 100];
    let weight = (TENANT.len() + key(0).len() + value.len() + CONTENT_TYPE.len()) as u64;
    let rows = [1u64, 10]
        .into_iter()
        .map(|percent| {
            let capacity = weight * KEYS as u64 * percent / 100;
            let ours = l1_ratio(&trace, &value, capacity);
            let moka = moka_ratio(&trace, &value, capacity);
            eprintln!("  hit ratio with room for {percent}% of the keys: L1 {ours:.3}, moka {moka:.3}");
            Row {
                measure: format!("L1 hit ratio, Zipf {SKEW} over {KEYS} keys, room for {percent}% of them"),
                ours: format!("{:.1}%", ours * 100.0),
                baseline: format!("moka (TinyLFU): {:.1}%", moka * 100.0),
                result: format!("{:+.1} points", (ours - moka) * 100.0),
                target: "within 5 points of moka".into(),
                met: ours >= moka - 0.05,
            }
        })
        .collect();
    let note = format!(
        "Hit ratio: {READS} reads drawn from Zipf({SKEW}) over {KEYS} keys (fixed seed, ranks scattered \
         over the key space), each miss filled at once, on `node_agent::l1::L1` (sharded tables, CLOCK \
         with a 2-bit use count) and on a `moka::sync::Cache` (TinyLFU admission, LRU eviction; L1's \
         store before) with the same byte budget and the same weights (tenant, key, 100-byte value, \
         content type), single-threaded."
    );
    (rows, note)
}
