//! What the application was promised, per block, as the oldest write a read
//! of the block (and the final state of both copies) may show: its floor.
//!
//! Write ids grow with submission, and the application never has two writes
//! to one block in flight at once, so for one block "this write or a later
//! one" is "an id at least this one": a later write that was in flight,
//! failed or never acknowledged may be there, an older one never.
//!
//! - A write acknowledged (completed `Ok`) raises the floor of its blocks.
//! - A completed FLUSH makes durable every write acknowledged before the
//!   flush was submitted; a FUA write is durable once acknowledged.
//! - A power cut of the writer lowers every floor to what was durable: an
//!   acknowledged write that no flush covered may be lost (promise 2 covers
//!   flushed writes only), on that node and so on the pair.
//!
//! Floors change at numbered moments (ticks), so that questions about the
//! past ("what was promised when this read was submitted") have exact answers.

use std::ops::Range;

use crate::WriteId;

/// The floors of every block, and their history.
#[derive(Clone, Debug)]
pub(crate) struct Promises {
    /// The oldest write each block may show now.
    floor: Vec<WriteId>,
    /// The newest write a completed flush or FUA made durable, per block.
    durable: Vec<WriteId>,
    /// Per block, every change of its floor: (tick, new floor).
    history: Vec<Vec<(u64, WriteId)>>,
    /// Changes so far.
    tick: u64,
}

impl Promises {
    /// Nothing promised yet: every block may hold its initial contents.
    pub(crate) fn new(blocks: usize) -> Promises {
        Promises {
            floor: vec![0; blocks],
            durable: vec![0; blocks],
            history: vec![Vec::new(); blocks],
            tick: 0,
        }
    }

    /// The current tick: the moment a request is submitted, for later questions.
    pub(crate) fn now(&self) -> u64 {
        self.tick
    }

    /// Write `id` to `blocks` was acknowledged (durable if FUA).
    pub(crate) fn acknowledged(&mut self, blocks: Range<usize>, id: WriteId, fua: bool) {
        self.tick += 1;
        for b in blocks {
            assert!(
                id > self.floor[b],
                "block {b}: write {id} acknowledged after the later write {}",
                self.floor[b]
            );
            self.floor[b] = id;
            self.history[b].push((self.tick, id));
            if fua {
                self.durable[b] = id;
            }
        }
    }

    /// Every floor now, for a flush being submitted.
    pub(crate) fn floors(&self) -> Vec<WriteId> {
        self.floor.clone()
    }

    /// A flush submitted when the floors were `floors` completed.
    pub(crate) fn flushed(&mut self, floors: &[WriteId]) {
        for (durable, &floor) in self.durable.iter_mut().zip(floors) {
            *durable = (*durable).max(floor);
        }
    }

    /// The writer lost its volatile cache: only durable writes stay promised.
    pub(crate) fn power_cut(&mut self) {
        self.tick += 1;
        for b in 0..self.floor.len() {
            if self.floor[b] != self.durable[b] {
                self.floor[b] = self.durable[b];
                self.history[b].push((self.tick, self.durable[b]));
            }
        }
    }

    /// The oldest write block `b` may show now.
    pub(crate) fn floor(&self, b: usize) -> WriteId {
        self.floor[b]
    }

    /// The floor of block `b` as it was at tick `tick`.
    fn floor_at(&self, b: usize, tick: u64) -> WriteId {
        let history = &self.history[b];
        let i = history.partition_point(|&(t, _)| t <= tick);
        if i == 0 { 0 } else { history[i - 1].1 }
    }

    /// The lowest floor of block `b` from tick `since` until now: what a
    /// read submitted at `since` and served now must at least show, or a
    /// copy holding a write submitted at `since` (a power cut meanwhile
    /// excuses what it cost).
    pub(crate) fn lowest_since(&self, b: usize, since: u64) -> WriteId {
        let history = &self.history[b];
        let i = history.partition_point(|&(t, _)| t <= since);
        history[i..]
            .iter()
            .map(|&(_, id)| id)
            .fold(self.floor_at(b, since), WriteId::min)
    }
}
