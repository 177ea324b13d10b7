//! The activity set: extents (runs of regions, 4 MiB by default) kept marked
//! in the state map while they are hot, so repeated writes to them cost no
//! map write (DRBD's activity log).
//!
//! The unit of write intent is the extent, the unit of marks stays the
//! region. A write that finds its own region clean pays one map commit
//! anyway; the engine then marks every clean region of the extent hot in
//! that same commit (one page holds thousands of regions), so the next
//! writes anywhere in the extent cost none. The set counts the writes in
//! flight per extent (for eviction) and per region (a region is read by
//! resync or taken into a barrier only with none in flight). An extent
//! leaves when it has been idle for a while or when the set is over
//! capacity — only ever with no write in flight in it, so every write it saw
//! is on both sides. Leaving clears its regions' cells lazily (behind a
//! barrier; nothing waits for it). After a crash every hot region loads as
//! inconsistent and is resent: the set's capacity bounds the recovery work,
//! and an extent that saw one write costs its whole 4 MiB.

use std::collections::HashMap;
use std::ops::Range;

/// State of one hot extent.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Writes (counted per region they touch) not yet complete on both sides.
    in_flight: u32,
    /// Last time a write to it finished (ms, engine clock).
    last_ms: u64,
}

/// The set of hot extents, and the regions with writes in flight.
#[derive(Debug)]
pub(super) struct ActivitySet {
    /// log2 of the regions per extent.
    shift: u32,
    /// Regions of the device (the last extent may be short).
    region_count: u64,
    /// Idle extents kept at most.
    capacity: usize,
    extents: HashMap<u64, Entry>,
    /// Writes in flight per region (regions with none are absent).
    busy: HashMap<u64, u32>,
    scratch: Vec<(u64, u64)>,
}

impl ActivitySet {
    /// A set of extents of `extent_regions` regions (a power of two) over
    /// `region_count` regions, that keeps idle extents covering at most
    /// `capacity_regions` regions (at least one extent); `in_flight_max`
    /// bounds the regions busy at once (memory is reserved for all of it).
    ///
    /// # Panics
    /// If `extent_regions` is not a power of two.
    pub(super) fn new(
        extent_regions: u64,
        capacity_regions: usize,
        in_flight_max: usize,
        region_count: u64,
    ) -> Self {
        assert!(
            extent_regions.is_power_of_two(),
            "extent of {extent_regions} regions is not a power of two"
        );
        let shift = extent_regions.trailing_zeros();
        let capacity = (capacity_regions >> shift).max(1);
        ActivitySet {
            shift,
            region_count,
            capacity,
            extents: HashMap::with_capacity(capacity + in_flight_max),
            busy: HashMap::with_capacity(in_flight_max),
            scratch: Vec::with_capacity(capacity + in_flight_max),
        }
    }

    /// The regions of the extent that holds `region`.
    pub(super) fn extent_of(&self, region: u64) -> Range<u64> {
        extent_regions(self.shift, self.region_count, region >> self.shift)
    }

    /// Number of extents in the set.
    pub(super) fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the extent of `region` is in the set.
    pub(super) fn contains(&self, region: u64) -> bool {
        self.extents.contains_key(&(region >> self.shift))
    }

    /// Writes in flight to `region`.
    pub(super) fn in_flight(&self, region: u64) -> u32 {
        self.busy.get(&region).copied().unwrap_or(0)
    }

    /// A write to `region` starts; returns whether its extent just entered.
    pub(super) fn begin(&mut self, region: u64, now_ms: u64) -> bool {
        let mut entered = false;
        let entry = self.extents.entry(region >> self.shift).or_insert_with(|| {
            entered = true;
            Entry {
                in_flight: 0,
                last_ms: now_ms,
            }
        });
        entry.in_flight += 1;
        *self.busy.entry(region).or_insert(0) += 1;
        entered
    }

    /// A write to `region` finished on both sides; returns the writes still
    /// in flight to that region.
    ///
    /// # Panics
    /// If no write to `region` was in flight.
    pub(super) fn end(&mut self, region: u64, now_ms: u64) -> u32 {
        let count = self
            .busy
            .get_mut(&region)
            .unwrap_or_else(|| panic!("region {region} had no write in flight"));
        *count -= 1;
        let left = *count;
        if left == 0 {
            self.busy.remove(&region);
        }
        let entry = self
            .extents
            .get_mut(&(region >> self.shift))
            .expect("a write in flight keeps its extent in the set");
        entry.in_flight -= 1;
        entry.last_ms = now_ms;
        left
    }

    /// Removes extents idle for at least `idle_ms`, and the least recently
    /// used idle ones while the set is over capacity; appends their regions
    /// to `out`.
    pub(super) fn evict(&mut self, now_ms: u64, idle_ms: u64, out: &mut Vec<u64>) {
        let shift = self.shift;
        let count = self.region_count;
        self.extents.retain(|&extent, e| {
            let keep = e.in_flight > 0 || now_ms.saturating_sub(e.last_ms) < idle_ms;
            if !keep {
                out.extend(extent_regions(shift, count, extent));
            }
            keep
        });
        if self.extents.len() <= self.capacity {
            return;
        }
        // Over capacity: drop the oldest idle extents down to 7/8 of it, so
        // that the scan is paid once per many insertions.
        let target = self.capacity - self.capacity / 8;
        self.scratch.clear();
        self.scratch.extend(
            self.extents
                .iter()
                .filter(|(_, e)| e.in_flight == 0)
                .map(|(&x, e)| (e.last_ms, x)),
        );
        self.scratch.sort_unstable();
        let excess = self.extents.len().saturating_sub(target);
        for i in 0..excess.min(self.scratch.len()) {
            let extent = self.scratch[i].1;
            self.extents.remove(&extent);
            out.extend(extent_regions(self.shift, self.region_count, extent));
        }
    }

    /// Whether the set holds more extents than its capacity.
    pub(super) fn over_capacity(&self) -> bool {
        self.extents.len() > self.capacity
    }

    /// Removes every idle extent (used when the map is rewritten as a
    /// whole, or the device stops); appends their regions to `out`.
    pub(super) fn clear_idle(&mut self, out: &mut Vec<u64>) {
        let shift = self.shift;
        let count = self.region_count;
        self.extents.retain(|&extent, e| {
            if e.in_flight == 0 {
                out.extend(extent_regions(shift, count, extent));
                false
            } else {
                true
            }
        });
    }
}

/// Regions of `extent` (of `1 << shift` regions) among `region_count`.
fn extent_regions(shift: u32, region_count: u64, extent: u64) -> Range<u64> {
    extent << shift..((extent + 1) << shift).min(region_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_extents_are_never_evicted() {
        // Extents of one region: the set behaves as one of regions.
        let mut set = ActivitySet::new(1, 2, 8, 100);
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
            "over capacity: the idle extent goes, however recent"
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
    fn over_capacity_evicts_least_recently_used_idle_extents() {
        let mut set = ActivitySet::new(1, 8, 8, 100);
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

    #[test]
    fn an_extent_stays_while_any_of_its_regions_is_busy_and_leaves_whole() {
        // Extents of 4 regions over 10 regions: 0..4, 4..8, 8..10.
        let mut set = ActivitySet::new(4, 8, 8, 10);
        assert_eq!(set.extent_of(9), 8..10, "the last extent is short");
        assert!(set.begin(5, 0));
        assert!(!set.begin(6, 0), "same extent");
        assert!(set.contains(4) && set.contains(7) && !set.contains(8));
        assert_eq!((set.in_flight(5), set.in_flight(4)), (1, 0));
        assert_eq!(set.end(5, 1), 0);
        let mut out = Vec::new();
        set.evict(100, 10, &mut out);
        assert!(out.is_empty(), "region 6 is still busy");
        assert_eq!(set.end(6, 2), 0);
        set.evict(100, 10, &mut out);
        assert_eq!(out, vec![4, 5, 6, 7], "every region of the extent");
        assert_eq!(set.len(), 0);
        set.begin(9, 200);
        set.end(9, 200);
        out.clear();
        set.clear_idle(&mut out);
        assert_eq!(out, vec![8, 9]);
    }

    #[test]
    fn capacity_counts_regions_and_keeps_one_extent_at_least() {
        let mut set = ActivitySet::new(4, 2, 8, 100);
        set.begin(0, 0);
        assert!(!set.over_capacity(), "one extent even below its size");
        set.begin(4, 0);
        assert!(set.over_capacity());
        let big = ActivitySet::new(128, 32_768, 8, 1 << 20);
        assert_eq!(
            big.capacity, 256,
            "1 GiB of 32 KiB regions in 4 MiB extents"
        );
    }
}
