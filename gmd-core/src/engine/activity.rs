//! The activity set: regions kept marked in the state map while they are hot,
//! so repeated writes to them cost no map write (DRBD's activity log).
//!
//! A region enters when a write to it starts (its cell goes from clean to an
//! in-flight value, which costs one map commit), counts the writes in flight
//! to it, and leaves when it has been idle for a while or when the set is
//! over capacity — only ever with no write in flight, so every write it saw
//! is on both sides. Leaving clears the cell lazily (the page is written with
//! the next commit; nothing waits for it). After a crash, resync touches at
//! most the regions of the set: its capacity bounds the recovery work.

use std::collections::HashMap;

/// State of one hot region.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Writes to the region not yet complete on both sides.
    in_flight: u32,
    /// Last time a write to it finished (ms, engine clock).
    last_ms: u64,
}

/// The set of hot regions.
#[derive(Debug)]
pub(super) struct ActivitySet {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    scratch: Vec<(u64, u64)>,
}

impl ActivitySet {
    /// A set that keeps at most `capacity` idle regions; `in_flight_max`
    /// bounds the regions busy at once (memory is reserved for both).
    pub(super) fn new(capacity: usize, in_flight_max: usize) -> Self {
        ActivitySet {
            capacity,
            entries: HashMap::with_capacity(capacity + in_flight_max),
            scratch: Vec::with_capacity(capacity + in_flight_max),
        }
    }

    /// Number of regions in the set.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `region` is in the set.
    pub(super) fn contains(&self, region: u64) -> bool {
        self.entries.contains_key(&region)
    }

    /// Writes in flight to `region`.
    pub(super) fn in_flight(&self, region: u64) -> u32 {
        self.entries.get(&region).map_or(0, |e| e.in_flight)
    }

    /// A write to `region` starts; returns whether the region just entered.
    pub(super) fn begin(&mut self, region: u64, now_ms: u64) -> bool {
        let mut entered = false;
        let entry = self.entries.entry(region).or_insert_with(|| {
            entered = true;
            Entry {
                in_flight: 0,
                last_ms: now_ms,
            }
        });
        entry.in_flight += 1;
        entered
    }

    /// A write to `region` finished on both sides; returns the writes still in flight.
    ///
    /// # Panics
    /// If no write to `region` was in flight.
    pub(super) fn end(&mut self, region: u64, now_ms: u64) -> u32 {
        let entry = self
            .entries
            .get_mut(&region)
            .expect("a write in flight keeps its region in the set");
        assert!(
            entry.in_flight > 0,
            "region {region} had no write in flight"
        );
        entry.in_flight -= 1;
        entry.last_ms = now_ms;
        entry.in_flight
    }

    /// Removes regions idle for at least `idle_ms`, and the least recently
    /// used idle ones while the set is over capacity; appends them to `out`.
    pub(super) fn evict(&mut self, now_ms: u64, idle_ms: u64, out: &mut Vec<u64>) {
        let before = out.len();
        self.entries.retain(|&region, e| {
            let keep = e.in_flight > 0 || now_ms.saturating_sub(e.last_ms) < idle_ms;
            if !keep {
                out.push(region);
            }
            keep
        });
        let _ = before;
        if self.entries.len() <= self.capacity {
            return;
        }
        // Over capacity: drop the oldest idle regions down to 7/8 of it, so
        // that the scan is paid once per many insertions.
        let target = self.capacity - self.capacity / 8;
        self.scratch.clear();
        self.scratch.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.in_flight == 0)
                .map(|(&r, e)| (e.last_ms, r)),
        );
        self.scratch.sort_unstable();
        let excess = self.entries.len().saturating_sub(target);
        for &(_, region) in self.scratch.iter().take(excess) {
            self.entries.remove(&region);
            out.push(region);
        }
    }

    /// Whether the set holds more regions than its capacity.
    pub(super) fn over_capacity(&self) -> bool {
        self.entries.len() > self.capacity
    }

    /// Removes every idle region (used when the map is rewritten as a whole).
    pub(super) fn clear_idle(&mut self, out: &mut Vec<u64>) {
        self.entries.retain(|&region, e| {
            if e.in_flight == 0 {
                out.push(region);
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_regions_are_never_evicted() {
        let mut set = ActivitySet::new(2, 8);
        assert!(set.begin(1, 0));
        assert!(!set.begin(1, 0));
        set.begin(2, 0);
        set.begin(3, 0);
        let mut out = Vec::new();
        set.evict(1000, 10, &mut out);
        assert!(out.is_empty(), "all busy");
        assert_eq!(set.end(1, 5), 1);
        assert_eq!(set.end(1, 5), 0);
        set.evict(6, 10, &mut out);
        assert_eq!(
            out,
            vec![1],
            "over capacity: the idle region goes, however recent"
        );
        assert_eq!(set.len(), 2);
        out.clear();
        set.end(2, 7);
        set.evict(8, 10, &mut out);
        assert!(out.is_empty(), "within capacity and idle for 1 ms only");
        set.evict(20, 10, &mut out);
        assert_eq!(out, vec![2]);
    }

    #[test]
    fn over_capacity_evicts_least_recently_used_idle_regions() {
        let mut set = ActivitySet::new(8, 8);
        for r in 0..12u64 {
            set.begin(r, r);
            set.end(r, r);
        }
        assert!(set.over_capacity());
        let mut out = Vec::new();
        set.evict(12, 1_000_000, &mut out);
        out.sort();
        assert_eq!(
            out,
            vec![0, 1, 2, 3, 4],
            "down to 7/8 of capacity, oldest first"
        );
        assert!(!set.over_capacity());
    }
}
