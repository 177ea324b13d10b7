//! The in-memory state map: one 4-bit cell per 32 KiB region.
//!
//! Cells are packed two per byte (the even region in the low nibble), so a
//! 1 TiB device costs 16 MiB of memory. This module is pure: it knows nothing
//! of files, pages on disk or engines.

use std::ops::Range;

use crate::units::{REGION_SIZE_BYTES, region_count, regions_touched};

/// Value of a state-map cell (only the low four bits are used).
pub type CellValue = u8;

/// The region is the same on both sides.
pub const CELL_CONSISTENT: CellValue = 0x0;
/// A write is in flight: neither the local nor the remote copy is confirmed.
pub const CELL_WRITING: CellValue = 0x1;
/// The local write completed; the remote one is still outstanding.
pub const CELL_LOCAL_DONE: CellValue = 0x2;
/// The remote write completed; the local one is still outstanding.
pub const CELL_REMOTE_DONE: CellValue = 0x3;
/// Async mode: the local write completed and the write waits in the backlog.
pub const CELL_QUEUED: CellValue = 0x4;
/// Every write finished, the region is kept marked while it is hot (activity set).
pub const CELL_ACTIVE: CellValue = 0x5;
/// The region is being resynchronised.
pub const CELL_RESYNC: CellValue = 0x6;
/// The region was inconsistent when the map was last persisted (found after a crash).
pub const CELL_INCONSISTENT: CellValue = 0x7;
/// Written while the remote peer was down: must be sent to the peer.
pub const CELL_STALE: CellValue = 0xf;

/// How a cell value is classified for persistence and for divergence checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellClass {
    /// `0x0`.
    Clean,
    /// `0x1`–`0x7`: a write was in flight.
    Inconsistent,
    /// `0xf` (and any other non-zero value outside 1–7).
    Stale,
}

impl CellClass {
    /// Classifies a cell value.
    pub fn of(value: CellValue) -> Self {
        match value & 0xf {
            0 => CellClass::Clean,
            1..=7 => CellClass::Inconsistent,
            _ => CellClass::Stale,
        }
    }
}

/// One 4-bit cell per region of a device.
#[derive(Clone, PartialEq, Eq)]
pub struct StateMap {
    size_bytes: u64,
    region_count: u64,
    packed: Vec<u8>,
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMap")
            .field("size_bytes", &self.size_bytes)
            .field("region_count", &self.region_count)
            .field("nonzero", &self.count_nonzero())
            .finish()
    }
}

impl StateMap {
    /// A clean map for a device of `size_bytes`.
    pub fn new(size_bytes: u64) -> Self {
        let region_count = region_count(size_bytes);
        StateMap {
            size_bytes,
            region_count,
            packed: vec![0; region_count.div_ceil(2) as usize],
        }
    }

    /// A map built from packed cells (two per byte, even region in the low nibble).
    ///
    /// Returns `None` when `packed` has the wrong length for `size_bytes`. Bits
    /// of a trailing half byte beyond the last region are cleared.
    pub fn from_packed(size_bytes: u64, mut packed: Vec<u8>) -> Option<Self> {
        let region_count = region_count(size_bytes);
        if packed.len() as u64 != region_count.div_ceil(2) {
            return None;
        }
        if region_count % 2 == 1 {
            if let Some(last) = packed.last_mut() {
                *last &= 0x0f;
            }
        }
        Some(StateMap {
            size_bytes,
            region_count,
            packed,
        })
    }

    /// Size of the device the map describes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Number of regions (cells).
    pub fn region_count(&self) -> u64 {
        self.region_count
    }

    /// The packed cells, two per byte.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Value of the cell of `region_index`.
    ///
    /// # Panics
    /// If `region_index` is beyond the device.
    pub fn get(&self, region_index: u64) -> CellValue {
        assert!(region_index < self.region_count, "region out of range");
        let byte = self.packed[(region_index / 2) as usize];
        if region_index % 2 == 0 {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// Sets the cell of `region_index` to `value` and returns the old value.
    ///
    /// # Panics
    /// If `region_index` is beyond the device.
    pub fn set(&mut self, region_index: u64, value: CellValue) -> CellValue {
        assert!(region_index < self.region_count, "region out of range");
        let value = value & 0x0f;
        let byte = &mut self.packed[(region_index / 2) as usize];
        let old;
        if region_index % 2 == 0 {
            old = *byte & 0x0f;
            *byte = (*byte & 0xf0) | value;
        } else {
            old = *byte >> 4;
            *byte = (*byte & 0x0f) | (value << 4);
        }
        old
    }

    /// Regions touched by a byte range, clipped to the device.
    pub fn regions_of(&self, offset_bytes: u64, len_bytes: u64) -> Range<u64> {
        let range = regions_touched(offset_bytes, len_bytes);
        range.start.min(self.region_count)..range.end.min(self.region_count)
    }

    /// Sets every cell touched by the byte range to `value`; returns how many changed.
    pub fn mark_bytes(&mut self, offset_bytes: u64, len_bytes: u64, value: CellValue) -> u64 {
        let regions = self.regions_of(offset_bytes, len_bytes);
        self.mark_regions(regions, value)
    }

    /// Clears every cell touched by the byte range; returns how many changed.
    pub fn clear_bytes(&mut self, offset_bytes: u64, len_bytes: u64) -> u64 {
        self.mark_bytes(offset_bytes, len_bytes, CELL_CONSISTENT)
    }

    /// Sets every cell of `regions` to `value`; returns how many changed.
    pub fn mark_regions(&mut self, regions: Range<u64>, value: CellValue) -> u64 {
        let mut changed = 0;
        for region in regions {
            if self.set(region, value) != value & 0x0f {
                changed += 1;
            }
        }
        changed
    }

    /// Sets every cell to `value`.
    pub fn fill(&mut self, value: CellValue) {
        let nibble = value & 0x0f;
        self.packed.fill(nibble | (nibble << 4));
        if self.region_count % 2 == 1 {
            if let Some(last) = self.packed.last_mut() {
                *last &= 0x0f;
            }
        }
    }

    /// Bitwise-ORs `other` into this map, cell by cell (the reference's unify).
    ///
    /// # Errors
    /// The maps describe devices of different sizes.
    pub fn merge(&mut self, other: &StateMap) -> Result<(), GeometryMismatch> {
        if other.size_bytes != self.size_bytes {
            return Err(GeometryMismatch {
                ours: self.size_bytes,
                theirs: other.size_bytes,
            });
        }
        for (mine, theirs) in self.packed.iter_mut().zip(&other.packed) {
            *mine |= theirs;
        }
        Ok(())
    }

    /// Number of non-zero cells.
    pub fn count_nonzero(&self) -> u64 {
        self.packed
            .iter()
            .map(|b| u64::from(b & 0x0f != 0) + u64::from(b >> 4 != 0))
            .sum()
    }

    /// Number of cells holding exactly `value`.
    pub fn count_value(&self, value: CellValue) -> u64 {
        let value = value & 0x0f;
        if value == 0 {
            return self.region_count - self.count_nonzero();
        }
        self.dirty_region_runs()
            .flatten()
            .filter(|&r| self.get(r) == value)
            .count() as u64
    }

    /// Whether every cell is zero.
    pub fn is_clean(&self) -> bool {
        self.packed.iter().all(|&b| b == 0)
    }

    /// One bit per region (bit `r % 8` of byte `r / 8`) that a resync must
    /// cover: every non-zero cell, except hot cells ([`CELL_ACTIVE`]) when
    /// `live`. A running engine's hot cell means "in the activity set, every
    /// write acknowledged by the peer": both copies are identical, so a
    /// link that comes back need not resend it. Cells read from disk are
    /// never `live`: there a hot cell may hide a write cut by a crash.
    pub fn resync_bits(&self, live: bool) -> Vec<u8> {
        let mut out = vec![0u8; self.region_count.div_ceil(8) as usize];
        for run in self.dirty_region_runs() {
            for r in run {
                if !(live && self.get(r) == CELL_ACTIVE) {
                    out[(r / 8) as usize] |= 1 << (r % 8);
                }
            }
        }
        out
    }

    /// One bit per region whose cell is hot ([`CELL_ACTIVE`]).
    pub fn hot_bits(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.region_count.div_ceil(8) as usize];
        for run in self.dirty_region_runs() {
            for r in run {
                if self.get(r) == CELL_ACTIVE {
                    out[(r / 8) as usize] |= 1 << (r % 8);
                }
            }
        }
        out
    }

    /// Maximal runs of consecutive non-zero regions, in ascending order.
    pub fn dirty_region_runs(&self) -> DirtyRuns<'_> {
        DirtyRuns { map: self, next: 0 }
    }

    /// Byte ranges of the device covered by non-zero cells, in ascending order.
    pub fn dirty_byte_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.dirty_region_runs().map(move |run| {
            run.start * REGION_SIZE_BYTES..(run.end * REGION_SIZE_BYTES).min(self.size_bytes)
        })
    }
}

/// Iterator over maximal runs of non-zero regions.
#[derive(Debug)]
pub struct DirtyRuns<'a> {
    map: &'a StateMap,
    next: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let count = self.map.region_count;
        let mut region = self.next;
        // Skip clean words, then clean bytes, quickly (a 4 TiB map is
        // 64 MiB, nearly all zero).
        while region < count {
            if region % 16 == 0 {
                let byte = (region / 2) as usize;
                if let Some(word) = self.map.packed.get(byte..byte + 8) {
                    if word.iter().all(|&b| b == 0) {
                        region += 16;
                        continue;
                    }
                }
            }
            if region % 2 == 0 && self.map.packed[(region / 2) as usize] == 0 {
                region += 2;
                continue;
            }
            if self.map.get(region) != 0 {
                break;
            }
            region += 1;
        }
        if region >= count {
            self.next = count;
            return None;
        }
        let start = region;
        while region < count && self.map.get(region) != 0 {
            region += 1;
        }
        self.next = region;
        Some(start..region)
    }
}

/// Two maps that describe devices of different sizes cannot be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state maps describe devices of different sizes ({ours} vs {theirs} bytes)")]
pub struct GeometryMismatch {
    /// Size of the device of the map being merged into.
    pub ours: u64,
    /// Size of the device of the other map.
    pub theirs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 64 * REGION_SIZE_BYTES + 4096;

    #[test]
    fn resync_bits_skip_hot_cells_only_when_live() {
        let mut map = StateMap::new(SIZE);
        map.set(1, CELL_ACTIVE);
        map.set(2, CELL_STALE);
        map.set(9, CELL_WRITING);
        map.set(64, CELL_ACTIVE);
        let on_disk = map.resync_bits(false);
        assert_eq!(on_disk, {
            let mut b = vec![0u8; 9];
            b[0] = 0b110;
            b[1] = 0b10;
            b[8] = 1;
            b
        });
        let live = map.resync_bits(true);
        assert_eq!(live, {
            let mut b = vec![0u8; 9];
            b[0] = 0b100;
            b[1] = 0b10;
            b
        });
    }

    #[test]
    fn new_map_is_clean_and_sized() {
        let map = StateMap::new(SIZE);
        assert_eq!(map.region_count(), 65);
        assert_eq!(map.packed().len(), 33);
        assert!(map.is_clean());
    }

    #[test]
    fn write_straddling_boundary_marks_both_regions() {
        let mut map = StateMap::new(SIZE);
        map.mark_bytes(3 * REGION_SIZE_BYTES - 512, 1024, CELL_STALE);
        assert_eq!(map.get(2), CELL_STALE);
        assert_eq!(map.get(3), CELL_STALE);
        assert_eq!(map.count_nonzero(), 2);
    }

    #[test]
    fn fill_leaves_no_bits_beyond_last_region() {
        let mut map = StateMap::new(SIZE);
        map.fill(CELL_STALE);
        assert_eq!(map.count_nonzero(), 65);
        assert_eq!(*map.packed().last().unwrap(), 0x0f);
    }

    #[test]
    fn merge_refuses_other_sizes() {
        let mut a = StateMap::new(SIZE);
        let b = StateMap::new(SIZE * 2);
        assert!(a.merge(&b).is_err());
    }

    #[test]
    fn classes() {
        assert_eq!(CellClass::of(0), CellClass::Clean);
        assert_eq!(CellClass::of(CELL_WRITING), CellClass::Inconsistent);
        assert_eq!(CellClass::of(CELL_INCONSISTENT), CellClass::Inconsistent);
        assert_eq!(CellClass::of(CELL_STALE), CellClass::Stale);
    }

    proptest! {
        #[test]
        fn marking_a_range_marks_exactly_the_touched_regions(
            offset in 0u64..SIZE, len in 0u64..(4 * REGION_SIZE_BYTES)
        ) {
            let len = len.min(SIZE - offset);
            let mut map = StateMap::new(SIZE);
            map.mark_bytes(offset, len, CELL_STALE);
            for region in 0..map.region_count() {
                let start = region * REGION_SIZE_BYTES;
                let end = start + REGION_SIZE_BYTES;
                let touched = len > 0 && offset < end && offset + len > start;
                prop_assert_eq!(map.get(region) == CELL_STALE, touched, "region {}", region);
            }
        }

        #[test]
        fn merge_is_cellwise_or(
            a in proptest::collection::vec(0u8..16, 65),
            b in proptest::collection::vec(0u8..16, 65),
        ) {
            let mut left = StateMap::new(SIZE);
            let mut right = StateMap::new(SIZE);
            for (r, (&x, &y)) in a.iter().zip(&b).enumerate() {
                left.set(r as u64, x);
                right.set(r as u64, y);
            }
            let mut merged = left.clone();
            merged.merge(&right).unwrap();
            for r in 0..65u64 {
                prop_assert_eq!(merged.get(r), a[r as usize] | b[r as usize]);
            }
            // Commutative and idempotent.
            let mut other = right.clone();
            other.merge(&left).unwrap();
            prop_assert_eq!(&other, &merged);
            let mut twice = merged.clone();
            twice.merge(&merged).unwrap();
            prop_assert_eq!(twice, merged);
        }

        #[test]
        fn dirty_runs_cover_exactly_the_nonzero_cells(
            cells in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => 1u8..16], 65)
        ) {
            let mut map = StateMap::new(SIZE);
            for (r, &v) in cells.iter().enumerate() {
                map.set(r as u64, v);
            }
            let mut covered = [false; 65];
            let mut last_end = None;
            for run in map.dirty_region_runs() {
                prop_assert!(run.start < run.end);
                if let Some(end) = last_end {
                    prop_assert!(run.start > end, "runs are maximal and ordered");
                }
                last_end = Some(run.end);
                for r in run { covered[r as usize] = true; }
            }
            for r in 0..65 {
                prop_assert_eq!(covered[r], cells[r] != 0);
            }
            prop_assert_eq!(map.count_nonzero(), cells.iter().filter(|&&v| v != 0).count() as u64);
            let bytes: u64 = map.dirty_byte_ranges().map(|r| r.end - r.start).sum();
            prop_assert!(bytes <= SIZE);
        }

        /// Sparse maps, where runs and counts skip whole clean words: the
        /// same answers as a walk over every cell.
        #[test]
        fn sparse_runs_and_counts_match_a_walk_over_every_cell(
            cells in proptest::collection::vec(prop_oneof![40 => Just(0u8), 1 => 1u8..16], 200..700)
        ) {
            let mut map = StateMap::new(cells.len() as u64 * REGION_SIZE_BYTES);
            for (r, &v) in cells.iter().enumerate() {
                map.set(r as u64, v);
            }
            let listed: Vec<u64> = map.dirty_region_runs().flatten().collect();
            let expected: Vec<u64> = (0..cells.len() as u64).filter(|&r| cells[r as usize] != 0).collect();
            prop_assert_eq!(listed, expected);
            for value in 0..16u8 {
                let naive = cells.iter().filter(|&&v| v == value).count() as u64;
                prop_assert_eq!(map.count_value(value), naive, "value {}", value);
            }
        }
    }
}
