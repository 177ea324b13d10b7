//! A small set of half-open `u64` ranges, kept sorted and merged. Used for
//! received packet numbers (to build ACK frames), the bytes of a message
//! being reassembled, and the bytes of a sent message already acknowledged.
//! The last two nearly always hold one range (fragments arrive and are
//! acknowledged in order), so up to [`INLINE_RANGES`] live inside the set:
//! a set per message sent or received allocates nothing.

use smallvec::SmallVec;

/// Ranges held without a heap allocation.
pub const INLINE_RANGES: usize = 2;

/// Sorted, disjoint, non-adjacent half-open ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: SmallVec<[(u64, u64); INLINE_RANGES]>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        RangeSet {
            ranges: SmallVec::new(),
        }
    }

    /// True while the ranges live inside the set (no heap allocation).
    pub fn is_inline(&self) -> bool {
        !self.ranges.spilled()
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The ranges in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Largest value contained plus one, if any.
    pub fn end(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }

    /// True when `[start, end)` is entirely contained.
    pub fn contains_range(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        // First range whose end is > start.
        let i = self.ranges.partition_point(|r| r.1 <= start);
        self.ranges
            .get(i)
            .is_some_and(|r| r.0 <= start && r.1 >= end)
    }

    /// True when `v` is contained.
    pub fn contains(&self, v: u64) -> bool {
        self.contains_range(v, v + 1)
    }

    /// Inserts `[start, end)`; returns how many values were new.
    pub fn insert(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        // Ranges touching or overlapping [start, end) are merged.
        let lo = self.ranges.partition_point(|r| r.1 < start);
        let hi = self.ranges.partition_point(|r| r.0 <= end);
        if lo == hi {
            self.ranges.insert(lo, (start, end));
            return end - start;
        }
        let mut covered = 0;
        for r in &self.ranges[lo..hi] {
            covered += r.1.min(end).saturating_sub(r.0.max(start));
        }
        let new_start = start.min(self.ranges[lo].0);
        let new_end = end.max(self.ranges[hi - 1].1);
        self.ranges[lo] = (new_start, new_end);
        self.ranges.drain(lo + 1..hi);
        (end - start) - covered
    }

    /// Drops the lowest ranges until at most `max` remain.
    pub fn truncate_low(&mut self, max: usize) {
        if self.ranges.len() > max {
            let excess = self.ranges.len() - max;
            self.ranges.drain(..excess);
        }
    }

    /// Removes every value below `v`.
    pub fn remove_below(&mut self, v: u64) {
        let i = self.ranges.partition_point(|r| r.1 <= v);
        self.ranges.drain(..i);
        if let Some(first) = self.ranges.first_mut() {
            first.0 = first.0.max(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_and_counts_new_values() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert(10, 20), 10);
        assert_eq!(s.insert(30, 40), 10);
        assert_eq!(s.insert(15, 35), 10);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        assert_eq!(s.insert(40, 41), 1, "adjacent merges");
        assert_eq!(s.len(), 1);
        assert!(s.contains_range(10, 41));
        assert!(!s.contains(41));
        s.remove_below(20);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(20, 41)]);
    }

    #[test]
    fn a_message_received_in_order_allocates_no_ranges() {
        let mut s = RangeSet::new();
        for fragment in 0..100u64 {
            s.insert(fragment * 1400, (fragment + 1) * 1400);
        }
        s.insert(200_000, 200_001);
        assert_eq!(s.len(), 2);
        assert!(s.is_inline());
        s.insert(300_000, 300_001);
        assert!(!s.is_inline(), "a third range moves to the heap");
        assert!(s.contains_range(0, 140_000) && s.contains(300_000));
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..20), 1..40)) {
            let mut s = RangeSet::new();
            let mut bits = [false; 220];
            for (a, l) in ops {
                let new = (a..a + l).filter(|&i| !bits[i as usize]).count() as u64;
                prop_assert_eq!(s.insert(a, a + l), new);
                for i in a..a + l { bits[i as usize] = true; }
                for (i, b) in bits.iter().enumerate() {
                    prop_assert_eq!(s.contains(i as u64), *b);
                }
                let v: Vec<_> = s.iter().collect();
                for w in v.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            }
        }
    }
}
