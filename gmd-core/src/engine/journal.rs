//! Which state-map pages are durable: per-page dirty bits, the page list of
//! the group commit in flight, and two epochs (`started`, `durable`).
//!
//! A cell change that alters its class (clean / inconsistent / stale) dirties
//! its page. A writer that needs a page durable waits for the epoch after
//! which it is: the next commit if the page is dirty, the current one if the
//! page is being written, none otherwise.

use crate::statemap::cells::{CellClass, CellValue, StateMap};
use crate::statemap::format::Layout;

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

    pub(super) fn contains(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub(super) fn insert(&mut self, page: u64) {
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.count += 1;
        }
    }

    fn remove(&mut self, page: u64) {
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *word & bit != 0 {
            *word &= !bit;
            self.count -= 1;
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

/// The in-memory map plus what of it is durable.
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) map: StateMap,
    dirty: PageSet,
    flushing: Vec<u64>,
    flushing_set: PageSet,
    started: Epoch,
    durable: Epoch,
    in_flight: bool,
    pub(super) failed: bool,
}

impl Journal {
    pub(super) fn new(map: StateMap) -> Self {
        let pages = Layout::for_regions(map.region_count()).page_count;
        Journal {
            map,
            dirty: PageSet::new(pages),
            flushing: Vec::with_capacity(pages as usize),
            flushing_set: PageSet::new(pages),
            started: 0,
            durable: 0,
            in_flight: false,
            failed: false,
        }
    }

    /// Sets one cell; dirties its page when the class changes.
    pub(super) fn set(&mut self, region: u64, value: CellValue) -> CellValue {
        let old = self.map.set(region, value);
        if CellClass::of(old) != CellClass::of(value) {
            self.dirty.insert(Layout::page_of_region(region));
        }
        old
    }

    /// The epoch after which the pages holding `regions` are durable as they are in memory.
    pub(super) fn needed(&self, regions: std::ops::Range<u64>) -> Epoch {
        if regions.is_empty() {
            return self.durable;
        }
        let pages = Layout::page_of_region(regions.start)..=Layout::page_of_region(regions.end - 1);
        pages
            .map(|page| {
                if self.dirty.contains(page) {
                    self.started + 1
                } else if self.in_flight && self.flushing_set.contains(page) {
                    self.started
                } else {
                    self.durable
                }
            })
            .max()
            .unwrap_or(self.durable)
    }

    /// The epoch after which every change made so far is durable.
    pub(super) fn needed_all(&self) -> Epoch {
        if !self.dirty.is_empty() {
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

    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub(super) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Starts a group commit of every dirty page, if none is in flight.
    pub(super) fn start(&mut self) -> Option<Epoch> {
        if self.in_flight || self.dirty.is_empty() {
            return None;
        }
        self.flushing.clear();
        self.dirty.drain_into(&mut self.flushing);
        for &page in &self.flushing {
            self.flushing_set.insert(page);
        }
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
        for &page in &self.flushing {
            self.flushing_set.remove(page);
        }
        if ok {
            self.durable = epoch;
        } else {
            self.failed = true;
            for &page in &self.flushing {
                self.dirty.insert(page);
            }
        }
    }
}
