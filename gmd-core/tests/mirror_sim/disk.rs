//! A data volume with a volatile write cache, as a disk (or the page cache
//! of a file) behaves: a completed write sits in the cache until a flush of
//! the volume completes, or it was written with FUA; a process crash keeps
//! the cache, a power cut loses all of it or part of it.

use std::ops::Range;

use rand::Rng;
use rand::rngs::StdRng;

use crate::WriteId;

/// One data volume: what reads see (the cache over the durable contents)
/// and what survives a power cut.
#[derive(Clone, Debug)]
pub(crate) struct Disk {
    /// What reads see.
    visible: Vec<WriteId>,
    /// What survives a power cut.
    durable: Vec<WriteId>,
    /// Per block, how many writes landed on it (the cache's version).
    version: Vec<u64>,
    /// Per block, the version the durable contents are of.
    durable_version: Vec<u64>,
    /// Blocks that may be cached (a superset: each is checked when used).
    dirty: Vec<usize>,
    in_dirty: Vec<bool>,
    /// Blocks written since [`Disk::take_written`] was last called.
    written: Vec<usize>,
}

/// The blocks a flush covers: those cached when it was issued, with the
/// write each held and its version, in block order.
pub(crate) type CacheSnapshot = Vec<(usize, WriteId, u64)>;

/// What a power cut keeps of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PowerCut {
    /// Nothing: every cached block reverts to its durable contents.
    DropAll,
    /// Each cached block survives with probability 1/2.
    KeepHalf,
}

impl Disk {
    /// A volume of `blocks` blocks, all holding the initial contents (write 0).
    pub(crate) fn new(blocks: usize) -> Disk {
        Disk {
            visible: vec![0; blocks],
            durable: vec![0; blocks],
            version: vec![0; blocks],
            durable_version: vec![0; blocks],
            dirty: Vec::new(),
            in_dirty: vec![false; blocks],
            written: Vec::new(),
        }
    }

    /// What reads of every block see.
    pub(crate) fn visible(&self) -> &[WriteId] {
        &self.visible
    }

    /// What reads of `blocks` see.
    pub(crate) fn read(&self, blocks: Range<usize>) -> &[WriteId] {
        &self.visible[blocks]
    }

    /// What block `b` holds durably.
    pub(crate) fn durable(&self, b: usize) -> WriteId {
        self.durable[b]
    }

    /// A write of `id` to block `b` landed: in the cache, or durably (FUA).
    pub(crate) fn write(&mut self, b: usize, id: WriteId, fua: bool) {
        self.written.push(b);
        self.visible[b] = id;
        self.version[b] += 1;
        if fua {
            self.durable[b] = id;
            self.durable_version[b] = self.version[b];
        } else if !self.in_dirty[b] {
            self.in_dirty[b] = true;
            self.dirty.push(b);
        }
    }

    /// The blocks cached now (and forgets those that are not any more).
    fn dirty_blocks(&mut self) -> Vec<usize> {
        let (version, durable_version, in_dirty) =
            (&self.version, &self.durable_version, &mut self.in_dirty);
        self.dirty.retain(|&b| {
            let cached = version[b] != durable_version[b];
            in_dirty[b] = cached;
            cached
        });
        self.dirty.clone()
    }

    /// Whether a power cut now could change what block `b` holds.
    pub(crate) fn is_cached(&self, b: usize) -> bool {
        self.visible[b] != self.durable[b]
    }

    /// The blocks written since the last call (only a write puts a block
    /// in the cache).
    pub(crate) fn take_written(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.written)
    }

    /// The cached blocks, for a flush being issued now.
    pub(crate) fn cached(&mut self) -> CacheSnapshot {
        let mut blocks = self.dirty_blocks();
        blocks.sort_unstable();
        blocks
            .into_iter()
            .map(|b| (b, self.visible[b], self.version[b]))
            .collect()
    }

    /// A flush issued when `issued` was cached completed: those blocks are
    /// durable (a block written again since holds the flushed write or the
    /// newer one); blocks cached since the issue may or may not be.
    pub(crate) fn flush(&mut self, issued: &CacheSnapshot, rng: &mut StdRng) {
        let dirty = self.dirty_blocks();
        for &(b, id, version) in issued {
            if self.durable_version[b] >= version {
                continue;
            }
            if self.version[b] == version || rng.gen_bool(0.5) {
                self.durable[b] = id;
                self.durable_version[b] = version;
            } else {
                self.settle_block(b);
            }
        }
        for b in dirty {
            let covered = issued.binary_search_by_key(&b, |&(b, _, _)| b).is_ok();
            if !covered && self.version[b] != self.durable_version[b] && rng.gen_bool(0.5) {
                self.settle_block(b);
            }
        }
    }

    /// The cache writes block `b` back.
    fn settle_block(&mut self, b: usize) {
        self.durable[b] = self.visible[b];
        self.durable_version[b] = self.version[b];
    }

    /// The power goes: the cache is lost (all of it, or each block with
    /// probability 1/2). Returns the blocks that lost their cached write,
    /// with that write.
    pub(crate) fn power_cut(&mut self, cut: PowerCut, rng: &mut StdRng) -> Vec<(usize, WriteId)> {
        let mut lost = Vec::new();
        for b in self.dirty_blocks() {
            if cut == PowerCut::KeepHalf && rng.gen_bool(0.5) {
                self.settle_block(b);
                continue;
            }
            if self.visible[b] != self.durable[b] {
                lost.push((b, self.visible[b]));
            }
            self.visible[b] = self.durable[b];
            self.version[b] += 1;
            self.durable_version[b] = self.version[b];
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_flush_makes_what_was_cached_at_its_issue_durable() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut disk = Disk::new(4);
        disk.write(0, 5, false);
        disk.write(1, 6, true);
        assert!(disk.is_cached(0) && !disk.is_cached(1));
        let issued = disk.cached();
        disk.write(0, 7, false);
        disk.flush(&issued, &mut rng);
        assert!([5, 7].contains(&disk.durable(0)));
        let lost = disk.power_cut(PowerCut::DropAll, &mut rng);
        assert_eq!(disk.read(0..2), &[disk.durable(0), 6]);
        assert_eq!(lost.len(), usize::from(disk.durable(0) == 5));
    }
}
