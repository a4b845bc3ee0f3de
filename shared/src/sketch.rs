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
    /// How many keys it holds.
    capacity: usize,
}

impl SpaceSaving {
    /// An empty sketch of `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        SpaceSaving { slots: Vec::with_capacity(capacity), capacity }
    }

    /// Counts `weight` reads of `key`. Reuses the displaced key's buffer.
    pub fn offer(&mut self, key: &str, weight: u64) {
        let mut least: Option<(usize, u64)> = None;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.key == key {
                slot.reads += weight;
                return;
            }
            if least.is_none_or(|(_, reads)| slot.reads < reads) {
                least = Some((i, slot.reads));
            }
        }
        if self.slots.len() < self.capacity {
            self.slots.push(KeyReads { key: key.to_string(), reads: weight, error: 0 });
        } else if let Some(slot) = least.and_then(|(i, _)| self.slots.get_mut(i)) {
            slot.key.clear();
            slot.key.push_str(key);
            slot.error = slot.reads;
            slot.reads += weight;
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
    }

    /// The keys, most read first.
    pub fn top(&self) -> Vec<KeyReads> {
        let mut top = self.slots.clone();
        top.sort_by(|a, b| b.reads.cmp(&a.reads).then_with(|| a.key.cmp(&b.key)));
        top
    }
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
