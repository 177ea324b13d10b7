//! Which state-map pages are durable: per-page dirty bits, the page list of
//! the group commit in flight, and two epochs (`started`, `durable`).
//!
//! A cell change that alters what recovery would read from it dirties its
//! page and marks its region changed (see [`durable_class`]: clean, written
//! or hot, not received, stale). A writer that needs its regions' cells
//! durable waits for the epoch after which they are: the next commit if one
//! of its regions changed since the last commit started, the current one if
//! such a change is being written, none otherwise. Tracking this per region,
//! not per page, keeps writes to regions already marked on disk from waiting
//! for commits of their neighbours (a page covers thousands of regions).
//!
//! The superblock (data generations, and what the driver records there) is
//! committed the same way: a change dirties it, and the next commit writes
//! it with the pages.

use crate::generations::Generations;
use crate::statemap::cells::{
    CELL_CONSISTENT, CELL_INCONSISTENT, CELL_RESYNC, CELL_STALE, CellValue, StateMap,
};
use crate::statemap::format::Layout;

/// What a crash followed by a reload makes of a cell value: the values a
/// write in flight or a hot region leave (`0x1`–`0x5`) all load as `0x7`,
/// so changes among them need no map write; `0x0`, `0x6` (not received)
/// and `0xf` (stale) each mean something else to recovery and are written.
pub(super) fn durable_class(value: CellValue) -> CellValue {
    match value {
        CELL_CONSISTENT => CELL_CONSISTENT,
        CELL_RESYNC => CELL_RESYNC,
        1..=5 | CELL_INCONSISTENT => CELL_INCONSISTENT,
        _ => CELL_STALE,
    }
}

/// Number of a state-map write (group commit).
pub type Epoch = u64;

/// A set of page indexes as a bitmap.
#[derive(Clone, Debug)]
pub(super) struct PageSet {
    words: Vec<u64>,
    count: usize,
}

impl PageSet {
    pub(super) fn new(pages: u64) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            count: 0,
        }
    }

    pub(super) fn insert(&mut self, page: u64) {
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.count += 1;
        }
    }

    fn drain_into(&mut self, out: &mut Vec<u64>) {
        for (i, word) in self.words.iter_mut().enumerate() {
            let mut w = *word;
            while w != 0 {
                out.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
            *word = 0;
        }
        self.count = 0;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A set of regions as a bitmap that remembers which words it touched, so
/// that clearing costs what was inserted, not the device size.
#[derive(Clone, Debug)]
pub(super) struct RegionSet {
    words: Vec<u64>,
    touched: Vec<usize>,
}

impl RegionSet {
    fn new(regions: u64) -> Self {
        RegionSet {
            words: vec![0; regions.div_ceil(64) as usize],
            touched: Vec::new(),
        }
    }

    fn contains(&self, region: u64) -> bool {
        self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    fn insert(&mut self, region: u64) {
        let index = (region / 64) as usize;
        if self.words[index] == 0 {
            self.touched.push(index);
        }
        self.words[index] |= 1 << (region % 64);
    }

    fn clear(&mut self) {
        for &index in &self.touched {
            self.words[index] = 0;
        }
        self.touched.clear();
    }

    /// Adds every region of `other`.
    fn extend(&mut self, other: &RegionSet) {
        for &index in &other.touched {
            if self.words[index] == 0 && other.words[index] != 0 {
                self.touched.push(index);
            }
            self.words[index] |= other.words[index];
        }
    }
}

/// The in-memory map plus what of it is durable.
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) map: StateMap,
    dirty: PageSet,
    flushing: Vec<u64>,
    /// Regions whose class changed since the last commit started.
    changed: RegionSet,
    /// Regions whose class change the commit in flight writes.
    flushing_regions: RegionSet,
    /// The data generations as they are in memory.
    pub(super) gens: Generations,
    /// As the last successful commit wrote them.
    gens_durable: Generations,
    /// As the commit in flight writes them, if it writes the superblock.
    gens_flushing: Option<Generations>,
    /// The superblock changed since the last commit started.
    superblock_dirty: bool,
    /// Cells marked not received (`0x6`): kept here, where every change
    /// goes through, so that no path can leave the count behind.
    resync_cells: u64,
    /// The commit after which every `0x6` mark cleared so far is cleared on
    /// disk too (a crash before it brings the marks back).
    lacks_cleared_at: Epoch,
    started: Epoch,
    durable: Epoch,
    in_flight: bool,
    pub(super) failed: bool,
}

impl Journal {
    pub(super) fn new(map: StateMap, gens: Generations) -> Self {
        let pages = Layout::for_regions(map.region_count()).page_count;
        let regions = map.region_count();
        let resync_cells = (0..regions).filter(|&r| map.get(r) == CELL_RESYNC).count() as u64;
        Journal {
            map,
            dirty: PageSet::new(pages),
            flushing: Vec::with_capacity(pages as usize),
            changed: RegionSet::new(regions),
            flushing_regions: RegionSet::new(regions),
            gens,
            gens_durable: gens,
            gens_flushing: None,
            superblock_dirty: false,
            resync_cells,
            lacks_cleared_at: 0,
            started: 0,
            durable: 0,
            in_flight: false,
            failed: false,
        }
    }

    /// Sets one cell; dirties its page when the class changes.
    pub(super) fn set(&mut self, region: u64, value: CellValue) -> CellValue {
        let old = self.map.set(region, value);
        if old == CELL_RESYNC && value != CELL_RESYNC {
            self.resync_cells -= 1;
            // Its page is dirty now: the next commit writes it.
            self.lacks_cleared_at = self.started + 1;
        } else if value == CELL_RESYNC && old != CELL_RESYNC {
            self.resync_cells += 1;
        }
        if durable_class(old) != durable_class(value) {
            self.dirty.insert(Layout::page_of_region(region));
            self.changed.insert(region);
        }
        old
    }

    /// How many cells are marked not received (`0x6`): a resync target
    /// still waits for their data.
    pub(super) fn resync_cells(&self) -> u64 {
        self.resync_cells
    }

    /// The epoch after which the cells of `regions` are durable as they
    /// are in memory (their class, which is what a crash must find).
    pub(super) fn needed(&self, regions: std::ops::Range<u64>) -> Epoch {
        let mut need = self.durable;
        for region in regions {
            if self.changed.contains(region) {
                return self.started + 1;
            }
            if self.in_flight && self.flushing_regions.contains(region) {
                need = self.started;
            }
        }
        need
    }

    /// Changes the data generations; they are written with the next commit.
    pub(super) fn set_generations(&mut self, gens: Generations) {
        if gens != self.gens {
            self.gens = gens;
            self.superblock_dirty = true;
        }
    }

    /// Asks for the superblock to be written with the next commit (the
    /// driver changed what it records there).
    pub(super) fn touch_superblock(&mut self) {
        self.superblock_dirty = true;
    }

    /// The generations as the last successful commit wrote them.
    pub(super) fn durable_generations(&self) -> Generations {
        self.gens_durable
    }

    /// The generations the commit in flight writes, if it writes the superblock.
    pub(super) fn flushing_generations(&self) -> Option<Generations> {
        self.gens_flushing
    }

    /// The epoch after which the generations in memory are durable.
    pub(super) fn needed_generations(&self) -> Epoch {
        if self.superblock_dirty {
            self.started + 1
        } else if self.in_flight && self.gens_flushing.is_some() {
            self.started
        } else {
            self.durable
        }
    }

    /// The epoch after which every change made so far is durable.
    pub(super) fn needed_all(&self) -> Epoch {
        if !self.dirty.is_empty() || self.superblock_dirty {
            self.started + 1
        } else if self.in_flight {
            self.started
        } else {
            self.durable
        }
    }

    pub(super) fn durable(&self) -> Epoch {
        self.durable
    }

    /// The epoch after which no `0x6` mark cleared in memory is still set
    /// on disk.
    pub(super) fn lacks_cleared_at(&self) -> Epoch {
        self.lacks_cleared_at
    }

    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.superblock_dirty
    }

    pub(super) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Starts a group commit of every dirty page and of the superblock if
    /// it changed, unless one is in flight.
    pub(super) fn start(&mut self) -> Option<Epoch> {
        if self.in_flight || !self.has_dirty() {
            return None;
        }
        self.flushing.clear();
        self.dirty.drain_into(&mut self.flushing);
        self.gens_flushing = self.superblock_dirty.then_some(self.gens);
        self.superblock_dirty = false;
        self.flushing_regions.clear();
        std::mem::swap(&mut self.changed, &mut self.flushing_regions);
        self.started += 1;
        self.in_flight = true;
        Some(self.started)
    }

    pub(super) fn flushing(&self) -> &[u64] {
        &self.flushing
    }

    /// Ends commit `epoch`; on failure its pages are dirty again.
    ///
    /// # Panics
    /// If `epoch` is not the commit in flight.
    pub(super) fn finish(&mut self, epoch: Epoch, ok: bool) {
        assert!(
            self.in_flight && epoch == self.started,
            "map write {epoch} was not in flight"
        );
        self.in_flight = false;
        let gens = self.gens_flushing.take();
        if ok {
            self.durable = epoch;
            if let Some(gens) = gens {
                self.gens_durable = gens;
            }
        } else {
            self.failed = true;
            for &page in &self.flushing {
                self.dirty.insert(page);
            }
            self.changed.extend(&self.flushing_regions);
            self.superblock_dirty |= gens.is_some();
            if self.lacks_cleared_at > self.durable {
                self.lacks_cleared_at = self.started + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statemap::cells::{CELL_ACTIVE, CELL_WRITING};
    use crate::units::REGION_SIZE_BYTES;

    /// A write waits only for its own regions' class changes, not for those
    /// of other regions on the same map page.
    #[test]
    fn a_write_waits_only_for_changes_of_its_own_regions() {
        let mut j = Journal::new(StateMap::new(1000 * REGION_SIZE_BYTES), Generations::none());
        assert_eq!(Layout::page_of_region(3), Layout::page_of_region(700));
        // Region 3 marked and durable.
        j.set(3, CELL_WRITING);
        assert_eq!(j.needed(3..4), 1, "its change waits for the next commit");
        let first = j.start().unwrap();
        assert_eq!(j.needed(3..4), first, "then for the commit in flight");
        // A neighbour changes while the commit is in flight.
        j.set(700, CELL_STALE);
        assert_eq!(j.needed(700..701), first + 1);
        assert_eq!(j.needed(3..5), first, "region 3 is being written");
        j.finish(first, true);
        assert_eq!(j.needed(3..5), first, "durable: nothing to wait for");
        assert_eq!(j.needed(699..701), first + 1, "the neighbour still waits");
        // Changes within a class need nothing: the disk shows the class.
        j.set(3, CELL_ACTIVE);
        j.set(3, CELL_WRITING);
        assert_eq!(j.needed(3..4), first);
        let second = j.start().unwrap();
        assert_eq!(j.needed(699..701), second);
        assert_eq!(j.needed(3..4), first);
        // A failed commit leaves its changes waiting.
        j.finish(second, false);
        assert_eq!(j.needed(700..701), second + 1);
        // Back to clean is a change too.
        j.set(3, CELL_CONSISTENT);
        assert_eq!(j.needed(3..4), second + 1);
    }

    /// Every value recovery reads differently is written: not received over
    /// hot, stale over not received, inconsistent over not received.
    #[test]
    fn values_that_recovery_tells_apart_are_written() {
        let mut j = Journal::new(StateMap::new(1000 * REGION_SIZE_BYTES), Generations::none());
        let commit = |j: &mut Journal| {
            let e = j.start().expect("a change to write");
            j.finish(e, true);
        };
        j.set(3, CELL_ACTIVE);
        commit(&mut j);
        j.set(3, CELL_RESYNC);
        assert!(j.has_dirty(), "0x6 over 0x5 is written");
        commit(&mut j);
        j.set(3, CELL_STALE);
        assert!(j.has_dirty(), "0xf over 0x6 is written");
        commit(&mut j);
        j.set(3, CELL_RESYNC);
        commit(&mut j);
        j.set(3, CELL_INCONSISTENT);
        assert!(j.has_dirty(), "0x7 over 0x6 is written");
        commit(&mut j);
        // In-flight stages and hot all load as 0x7: nothing to write.
        j.set(3, CELL_WRITING);
        j.set(3, CELL_ACTIVE);
        assert!(!j.has_dirty());
    }

    #[test]
    fn generations_are_durable_once_a_commit_wrote_the_superblock() {
        let mut j = Journal::new(StateMap::new(1000 * REGION_SIZE_BYTES), Generations::none());
        let mut g = Generations::none();
        g.go_alone(9);
        j.set_generations(g);
        assert_eq!(j.needed_generations(), 1);
        let e = j.start().unwrap();
        assert_eq!(j.flushing_generations(), Some(g));
        assert_eq!(j.durable_generations(), Generations::none());
        j.finish(e, true);
        assert_eq!(j.durable_generations(), g);
        assert_eq!(j.needed_generations(), e);
        // A failed commit writes them again next time.
        j.touch_superblock();
        let e = j.start().unwrap();
        j.finish(e, false);
        assert!(j.has_dirty());
    }
}
