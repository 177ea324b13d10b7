//! Marks waiting to be cleared, and the barrier that clears them.
//!
//! A mark may go only once the data it covers is durable on both sides: a
//! region queued for clearing waits for a barrier (a local sync and the
//! peer's flush) that starts after every write to it completed. A write
//! that starts in a region whose barrier is under way takes it out of that
//! barrier — the barrier does not cover it — and puts it back in the queue
//! for a later one; a region with writes in flight is not taken into a
//! barrier at all.

use super::resync::RegionBits;

/// Regions waiting for a barrier, and those the barrier in flight covers.
#[derive(Debug)]
pub(super) struct Clears {
    /// Queued regions, in order (an entry whose bit is gone is skipped).
    waiting: Vec<u64>,
    waiting_set: RegionBits,
    /// Regions the barrier in flight covers (a write clears its bit).
    covered: RegionBits,
}

impl Clears {
    pub(super) fn new(regions: u64, capacity: usize) -> Self {
        Clears {
            waiting: Vec::with_capacity(capacity),
            waiting_set: RegionBits::new(regions),
            covered: RegionBits::new(regions),
        }
    }

    /// Queues `region` for the next barrier.
    pub(super) fn queue(&mut self, region: u64) {
        if !self.waiting_set.get(region) {
            self.waiting_set.set(region);
            self.waiting.push(region);
        }
    }

    /// Whether no region waits for a barrier.
    pub(super) fn is_empty(&self) -> bool {
        self.waiting_set.count() == 0
    }

    /// A write starts in `region`: the barrier in flight does not cover it
    /// any more; a later one will.
    pub(super) fn touched(&mut self, region: u64) {
        if self.covered.get(region) {
            self.covered.clear(region);
            self.queue(region);
        }
    }

    /// `region`'s mark must stay (a local write failed there).
    pub(super) fn keep(&mut self, region: u64) {
        self.waiting_set.clear(region);
        self.covered.clear(region);
    }

    /// Moves the waiting regions that `ready` accepts (no write in flight)
    /// into a new barrier; the others keep waiting.
    pub(super) fn take_for_barrier(&mut self, ready: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for region in std::mem::take(&mut self.waiting) {
            if !self.waiting_set.get(region) {
                continue;
            }
            if ready(region) {
                self.waiting_set.clear(region);
                self.covered.set(region);
                taken.push(region);
            } else {
                kept.push(region);
            }
        }
        self.waiting = kept;
        taken
    }

    /// Whether the finished barrier still covers `region` (nothing was
    /// written there since it started); forgets it either way.
    pub(super) fn still_covered(&mut self, region: u64) -> bool {
        let covered = self.covered.get(region);
        self.covered.clear(region);
        covered
    }

    /// The barrier over `regions` failed: those it still covered wait again.
    pub(super) fn requeue(&mut self, regions: &[u64]) {
        for &region in regions {
            if self.covered.get(region) {
                self.covered.clear(region);
                self.queue(region);
            }
        }
    }

    /// Forgets every queued and covered region (the link ended: the marks
    /// stay as they are).
    pub(super) fn drop_all(&mut self, barrier: &[u64]) {
        for region in std::mem::take(&mut self.waiting) {
            self.waiting_set.clear(region);
        }
        for &region in barrier {
            self.covered.clear(region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_during_a_barrier_defers_its_region_to_the_next() {
        let mut c = Clears::new(100, 8);
        c.queue(3);
        c.queue(4);
        c.queue(3);
        let first = c.take_for_barrier(|r| r != 4);
        assert_eq!(first, vec![3], "4 has writes in flight");
        assert!(!c.is_empty(), "4 waits");
        c.touched(3);
        assert!(!c.still_covered(3), "written after the barrier started");
        let second = c.take_for_barrier(|_| true);
        assert_eq!(second, vec![4, 3]);
        assert!(c.still_covered(3) && c.still_covered(4));
        assert!(c.is_empty());
    }

    #[test]
    fn kept_regions_never_clear_and_failed_barriers_requeue() {
        let mut c = Clears::new(100, 8);
        c.queue(1);
        c.queue(2);
        let b = c.take_for_barrier(|_| true);
        c.keep(1);
        c.requeue(&b);
        assert_eq!(c.take_for_barrier(|_| true), vec![2]);
        c.drop_all(&[2]);
        assert!(!c.still_covered(2));
        assert!(c.is_empty());
    }
}
