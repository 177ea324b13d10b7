//! Ordering of operations received from the peer before they are applied to
//! the local volume.
//!
//! Operations arrive in the sender's stream order, each with its sequence
//! number `seq` and a dependency `after`: every operation with a sequence
//! number up to `after` must be complete here before this one is issued (in
//! async mode these are the writes the primary had completed before the
//! application issued this one). Besides, an operation never passes an
//! earlier one that overlaps it, and a barrier (flush) waits for everything
//! before it and holds back everything after it. So the local copy only ever
//! holds states the sender's copy went through or could have crashed into.

use std::collections::VecDeque;

use super::Slot;

/// Sequence number of a message of the mirror stream.
pub type Seq = u64;

/// What the ordering needs to know about one received operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ordered {
    pub(super) slot: Slot,
    pub(super) seq: Seq,
    pub(super) after: Seq,
    /// Byte range it touches (empty for barriers).
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) barrier: bool,
}

impl Ordered {
    fn overlaps(&self, other: &Ordered) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Most pending operations examined per scan; later ones wait for the next.
const SCAN_MAX: usize = 64;

/// Received operations waiting for their turn, and the completion record.
#[derive(Debug)]
pub(super) struct TargetQueue {
    pending: VecDeque<Ordered>,
    in_flight: Vec<Ordered>,
    /// Every sequence number up to this one is complete (set from the
    /// session's first message).
    prefix: Seq,
    started: bool,
    /// Completed sequence numbers beyond `prefix + 1`, relative to it.
    ahead: VecDeque<bool>,
}

impl TargetQueue {
    pub(super) fn new(capacity: usize) -> Self {
        TargetQueue {
            pending: VecDeque::with_capacity(capacity),
            in_flight: Vec::with_capacity(capacity),
            prefix: 0,
            started: false,
            ahead: VecDeque::with_capacity(capacity * 2),
        }
    }

    /// Starts a new session; its first message sets the numbering.
    pub(super) fn reset(&mut self) {
        self.pending.clear();
        self.in_flight.clear();
        self.prefix = 0;
        self.started = false;
        self.ahead.clear();
    }

    fn start_at(&mut self, seq: Seq) {
        if !self.started {
            self.started = true;
            self.prefix = seq.saturating_sub(1);
        }
    }

    /// Highest sequence number up to which everything is complete.
    #[cfg(test)]
    pub(super) fn prefix(&self) -> Seq {
        self.prefix
    }

    /// Queues a received operation.
    pub(super) fn push(&mut self, op: Ordered) {
        self.start_at(op.seq);
        self.pending.push_back(op);
    }

    /// Records that `seq` is complete (an operation, or a message with nothing to apply).
    pub(super) fn complete(&mut self, seq: Seq) {
        self.start_at(seq);
        if seq <= self.prefix {
            return;
        }
        let index = (seq - self.prefix - 1) as usize;
        while self.ahead.len() <= index {
            self.ahead.push_back(false);
        }
        self.ahead[index] = true;
        while self.ahead.front() == Some(&true) {
            self.ahead.pop_front();
            self.prefix += 1;
        }
    }

    /// An issued operation finished.
    pub(super) fn finished(&mut self, slot: Slot) -> Option<Seq> {
        let i = self.in_flight.iter().position(|o| o.slot == slot)?;
        let op = self.in_flight.swap_remove(i);
        self.complete(op.seq);
        Some(op.seq)
    }

    /// Moves every operation that may be issued now into `out` (their slots).
    pub(super) fn issuable(&mut self, blocked: impl Fn(&Ordered) -> bool, out: &mut Vec<Slot>) {
        if self.in_flight.iter().any(|o| o.barrier) {
            // Nothing passes a barrier, in flight or queued.
            return;
        }
        let mut i = 0;
        let mut scanned = 0;
        while i < self.pending.len() && scanned < SCAN_MAX {
            scanned += 1;
            let op = self.pending[i];
            if op.barrier {
                if i == 0 && self.in_flight.is_empty() && self.prefix >= op.seq.saturating_sub(1) {
                    let op = self.pending.remove(0).expect("present");
                    self.in_flight.push(op);
                    out.push(op.slot);
                    return;
                }
                // Nothing passes a barrier.
                return;
            }
            let free = self.prefix >= op.after
                && !self.in_flight.iter().any(|o| o.overlaps(&op))
                && !self.pending.iter().take(i).any(|o| o.overlaps(&op))
                && !blocked(&op);
            if free {
                let op = self.pending.remove(i).expect("present");
                self.in_flight.push(op);
                out.push(op.slot);
            } else {
                i += 1;
            }
        }
    }

    /// Drops every queued operation (the session ended); returns their slots.
    pub(super) fn drain_pending(&mut self, out: &mut Vec<Slot>) {
        out.extend(self.pending.drain(..).map(|o| o.slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(slot: Slot, seq: Seq, after: Seq, start: u64, end: u64) -> Ordered {
        Ordered {
            slot,
            seq,
            after,
            start,
            end,
            barrier: false,
        }
    }

    fn issue(q: &mut TargetQueue) -> Vec<Slot> {
        let mut out = Vec::new();
        q.issuable(|_| false, &mut out);
        out
    }

    #[test]
    fn disjoint_writes_go_together_overlapping_ones_in_order() {
        let mut q = TargetQueue::new(16);
        q.reset();
        q.push(op(0, 1, 0, 0, 4096));
        q.push(op(1, 2, 0, 8192, 12288));
        q.push(op(2, 3, 0, 0, 512));
        assert_eq!(issue(&mut q), vec![0, 1]);
        assert_eq!(q.finished(1), Some(2));
        assert_eq!(issue(&mut q), Vec::<Slot>::new());
        assert_eq!(q.prefix(), 0, "seq 1 still open");
        q.finished(0);
        assert_eq!(q.prefix(), 2);
        assert_eq!(issue(&mut q), vec![2]);
    }

    #[test]
    fn dependencies_wait_for_the_prefix() {
        let mut q = TargetQueue::new(16);
        q.reset();
        q.push(op(0, 1, 0, 0, 4096));
        q.push(op(1, 2, 1, 8192, 12288));
        assert_eq!(issue(&mut q), vec![0]);
        q.finished(0);
        assert_eq!(issue(&mut q), vec![1]);
    }

    #[test]
    fn barriers_hold_everything_back() {
        let mut q = TargetQueue::new(16);
        q.reset();
        q.push(op(0, 10, 0, 0, 4096));
        q.push(Ordered {
            barrier: true,
            ..op(1, 11, 0, 0, 0)
        });
        q.push(op(2, 12, 0, 65536, 69632));
        assert_eq!(issue(&mut q), vec![0]);
        q.finished(0);
        assert_eq!(issue(&mut q), vec![1]);
        assert_eq!(
            issue(&mut q),
            Vec::<Slot>::new(),
            "the write after the flush waits"
        );
        q.finished(1);
        assert_eq!(issue(&mut q), vec![2]);
    }

    #[test]
    fn messages_without_io_complete_the_prefix() {
        let mut q = TargetQueue::new(4);
        q.reset();
        q.push(op(0, 1, 0, 0, 4096));
        q.complete(2);
        q.complete(3);
        assert_eq!(q.prefix(), 0, "the session starts at its first message, 1");
        assert_eq!(issue(&mut q), vec![0]);
        q.finished(0);
        assert_eq!(q.prefix(), 3);
    }
}
