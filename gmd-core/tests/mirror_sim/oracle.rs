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
//! - A failover (the secondary promoted while the primary is down or apart)
//!   may lose, in each region the old primary's durable map marks, every
//!   write acknowledged since that mark was made durable (before it, the
//!   region was clean: its data durable on both sides): the floors of its
//!   blocks go back to what they were then. Promise 1 excuses exactly these.
//! - Writes of the old primary that the new one does not hold are dead: a
//!   resync must never bring them back (see [`Promises::bury`]).
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
    /// The newest write a completed flush or FUA made durable on the
    /// writer, per block…
    durable: Vec<WriteId>,
    /// …and on both copies (a flush or FUA the peer took part in: sync and
    /// mwc, connected in the same session from submission to completion).
    durable_both: Vec<WriteId>,
    /// Per block, every change of its floor: (tick, new floor).
    history: Vec<Vec<(u64, WriteId)>>,
    /// Changes so far.
    tick: u64,
    /// Per block, ranges `(lo, hi]` of write ids that must never show again
    /// (a failover or a unify discarded them).
    dead: Vec<Vec<(WriteId, WriteId)>>,
}

impl Promises {
    /// Nothing promised yet: every block may hold its initial contents.
    pub(crate) fn new(blocks: usize) -> Promises {
        Promises {
            floor: vec![0; blocks],
            durable: vec![0; blocks],
            durable_both: vec![0; blocks],
            history: vec![Vec::new(); blocks],
            tick: 0,
            dead: vec![Vec::new(); blocks],
        }
    }

    /// The current tick: the moment a request is submitted, for later questions.
    pub(crate) fn now(&self) -> u64 {
        self.tick
    }

    /// Write `id` to `blocks` was acknowledged (durable if FUA: on both
    /// copies if `mirrored`).
    pub(crate) fn acknowledged(
        &mut self,
        blocks: Range<usize>,
        id: WriteId,
        fua: bool,
        mirrored: bool,
    ) {
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
                if mirrored {
                    self.durable_both[b] = id;
                }
            }
        }
    }

    /// Every floor now, for a flush being submitted.
    pub(crate) fn floors(&self) -> Vec<WriteId> {
        self.floor.clone()
    }

    /// A flush submitted when the floors were `floors` completed (on both
    /// copies if `mirrored`).
    pub(crate) fn flushed(&mut self, floors: &[WriteId], mirrored: bool) {
        for (b, &floor) in floors.iter().enumerate() {
            let covered = floor.min(self.floor[b]);
            self.durable[b] = self.durable[b].max(covered);
            if mirrored {
                self.durable_both[b] = self.durable_both[b].max(covered);
            }
        }
    }

    /// A failover. For every block for which `since(b)` gives a tick, the
    /// new primary may lack every write acknowledged after it: the floor
    /// goes back to what it was then. For every block `cut(b)` (a power cut
    /// of the new primary took it), any write no flush of both copies
    /// covered. The new primary holds durably, in blocks `durable_there(b)`,
    /// its (new) floor, elsewhere what flushes of both copies covered: that
    /// is what a power cut of it keeps from now on.
    pub(crate) fn failover(
        &mut self,
        since: impl Fn(usize) -> Option<u64>,
        cut: impl Fn(usize) -> bool,
        durable_there: impl Fn(usize) -> bool,
    ) {
        self.tick += 1;
        for b in 0..self.floor.len() {
            let mut floor = self.floor[b];
            if let Some(since) = since(b) {
                floor = floor.min(self.floor_at(b, since));
            }
            if cut(b) {
                floor = floor.min(self.durable_both[b]);
            }
            if floor < self.floor[b] {
                self.floor[b] = floor;
                self.history[b].push((self.tick, floor));
            }
            self.durable[b] = if durable_there(b) {
                floor
            } else {
                floor.min(self.durable_both[b])
            };
            self.durable_both[b] = self.durable_both[b].min(self.durable[b]);
        }
    }

    /// The writes `(lo, hi]` of block `b` are gone for good: the copy that
    /// holds the pair's data now has `lo` there, and the others (up to `hi`,
    /// the newest write so far) came from a copy whose changes were
    /// discarded. No read of a copy that is not lagging, and no final copy,
    /// may show one.
    pub(crate) fn bury(&mut self, b: usize, lo: WriteId, hi: WriteId) {
        if hi > lo {
            self.dead[b].push((lo, hi));
        }
    }

    /// Whether write `id` of block `b` was discarded (see [`Promises::bury`]).
    pub(crate) fn is_dead(&self, b: usize, id: WriteId) -> bool {
        self.dead[b].iter().any(|&(lo, hi)| lo < id && id <= hi)
    }

    /// The writer lost its volatile cache: only durable writes stay promised.
    pub(crate) fn power_cut(&mut self) {
        self.tick += 1;
        for b in 0..self.floor.len() {
            if self.floor[b] != self.durable[b] {
                self.floor[b] = self.durable[b];
                self.history[b].push((self.tick, self.durable[b]));
            }
            self.durable_both[b] = self.durable_both[b].min(self.floor[b]);
        }
    }

    /// The oldest write block `b` may show now.
    pub(crate) fn floor(&self, b: usize) -> WriteId {
        self.floor[b]
    }

    /// The oldest write every block may show now.
    pub(crate) fn floor_slice(&self) -> &[WriteId] {
        &self.floor
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
