//! A space-saving sketch: the most read keys of a stream in bounded memory,
//! kept per tenant by each agent and merged by the coordinator for
//! `GET /v1/stats`.

use crate::protocol::KeyReads;

/// A space-saving sketch (Metwally et al.): the heavy hitters of a stream in
/// bounded memory. A key not held takes the place of the least counted one
/// and inherits its count as its possible error, so any key read more than
/// `total / capacity` times is held, and no held count is too low.
#[derive(Debug, Clone, Default)]
pub struct SpaceSaving {
    /// (key, count, error), at most `capacity`.
    slots: Vec<KeyReads>,
    /// Each slot's key's [`fingerprint`], compared before the key itself: the
    /// keys of a tenant tend to share long prefixes, and one string
    /// comparison per slot would be most of the cost of counting a read.
    prints: Vec<u64>,
    /// How many keys it holds.
    capacity: usize,
}

impl SpaceSaving {
    /// An empty sketch of `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        SpaceSaving { slots: Vec::with_capacity(capacity), prints: Vec::with_capacity(capacity), capacity }
    }

    /// Counts `weight` reads of `key`. Reuses the displaced key's buffer.
    pub fn offer(&mut self, key: &str, weight: u64) {
        let print = fingerprint(key);
        let mut least: Option<(usize, u64)> = None;
        for (i, (slot, p)) in self.slots.iter_mut().zip(&self.prints).enumerate() {
            if *p == print && slot.key == key {
                slot.reads += weight;
                return;
            }
            if least.is_none_or(|(_, reads)| slot.reads < reads) {
                least = Some((i, slot.reads));
            }
        }
        if self.slots.len() < self.capacity {
            self.slots.push(KeyReads { key: key.to_string(), reads: weight, error: 0 });
            self.prints.push(print);
        } else if let Some((i, _)) = least {
            if let (Some(slot), Some(p)) = (self.slots.get_mut(i), self.prints.get_mut(i)) {
                slot.key.clear();
                slot.key.push_str(key);
                slot.error = slot.reads;
                slot.reads += weight;
                *p = print;
            }
        }
    }

    /// Adds another sketch's counts (of another shard or agent).
    pub fn merge(&mut self, other: &SpaceSaving) {
        for slot in &other.slots {
            match self.slots.iter_mut().find(|s| s.key == slot.key) {
                Some(mine) => {
                    mine.reads += slot.reads;
                    mine.error += slot.error;
                }
                None => self.slots.push(slot.clone()),
            }
        }
        self.slots.sort_by(|a, b| b.reads.cmp(&a.reads).then_with(|| a.key.cmp(&b.key)));
        self.slots.truncate(self.capacity);
        self.prints = self.slots.iter().map(|s| fingerprint(&s.key)).collect();
    }

    /// The keys, most read first.
    pub fn top(&self) -> Vec<KeyReads> {
        let mut top = self.slots.clone();
        top.sort_by(|a, b| b.reads.cmp(&a.reads).then_with(|| a.key.cmp(&b.key)));
        top
    }
}

/// A cheap summary of a key: its length and three of its 8-byte words
/// (start, middle, end). Equal keys have equal fingerprints; unequal keys
/// rarely do, and then cost one string comparison.
fn fingerprint(key: &str) -> u64 {
    let bytes = key.as_bytes();
    let n = bytes.len();
    let word = |at: usize| {
        let mut w = [0u8; 8];
        let end = (at + 8).min(n);
        if let (Some(into), Some(from)) = (w.get_mut(..end.saturating_sub(at)), bytes.get(at..end)) {
            into.copy_from_slice(from);
        }
        u64::from_le_bytes(w)
    };
    let (head, middle, tail) = if n <= 8 { (word(0), 0, 0) } else { (word(0), word((n - 8) / 2), word(n - 8)) };
    (n as u64)
        ^ head.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ middle.rotate_left(21).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ tail.rotate_left(42)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sketch_keeps_the_heavy_hitters_in_bounded_room() {
        let mut sketch = SpaceSaving::new(8);
        // Two hot keys among 1000 read once each: 1750 reads, so any key read
        // more than 1750 / 8 times is held, whatever the order.
        for i in 0..1000 {
            sketch.offer(&format!("cold:{i}"), 1);
            if i % 2 == 0 {
                sketch.offer("hot:a", 1);
            }
            if i % 4 == 0 {
                sketch.offer("hot:b", 1);
            }
        }
        let top = sketch.top();
        assert_eq!(top.len(), 8, "never more than its capacity");
        assert_eq!((top[0].key.as_str(), top[1].key.as_str()), ("hot:a", "hot:b"), "{top:?}");
        // Counts are upper bounds; the error says by how much at most.
        assert!(top[0].reads >= 500 && top[0].reads - top[0].error <= 500, "{:?}", top[0]);
        assert!(top[1].reads >= 250 && top[1].reads - top[1].error <= 250, "{:?}", top[1]);
    }

    #[test]
    fn keys_that_differ_anywhere_are_told_apart() {
        let mut sketch = SpaceSaving::new(64);
        let long = "x".repeat(40);
        let keys = ["", "a", "ab", "supplier:1:detail", "supplier:2:detail", "supplier:10:detail", long.as_str()];
        for (i, key) in keys.iter().enumerate() {
            sketch.offer(key, i as u64 + 1);
        }
        for (i, key) in keys.iter().enumerate() {
            sketch.offer(key, 100);
            let held = sketch.top().into_iter().find(|k| k.key == **key).expect("held");
            assert_eq!(held.reads, i as u64 + 101, "{key:?}");
        }
        assert_eq!(sketch.top().len(), keys.len());
    }

    #[test]
    fn merged_sketches_add_up_per_key() {
        let mut a = SpaceSaving::new(3);
        let mut b = SpaceSaving::new(3);
        a.offer("x", 5);
        a.offer("y", 1);
        b.offer("x", 2);
        b.offer("z", 4);
        b.offer("w", 3);
        a.merge(&b);
        let top = a.top();
        assert_eq!(top.iter().map(|k| (k.key.as_str(), k.reads)).collect::<Vec<_>>(), [("x", 7), ("z", 4), ("w", 3)]);
    }
}
