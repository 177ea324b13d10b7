//! The device engine: a sans-IO state machine that decides, for every
//! request, what must be persisted in the state map before which local
//! operation, and when the request completes.
//!
//! Drive it like raft-rs's `RawNode`: hand it requests with
//! [`Engine::submit`], report the results of the actions it asked for
//! ([`Engine::local_done`], [`Engine::map_written`]) and drain
//! [`Engine::poll_action`] after each call. It never performs I/O, reads no
//! clock and allocates nothing after construction, so the same code runs
//! under the io_uring runtime ([`crate::runtime`]) and in simulations.
//!
//! This version serves a device whose remote peers are all down: every
//! written region is marked stale (`0xf`), and that mark is durable in the
//! state map before the write is issued (write intent before dispatch), so a
//! crash at any point leaves every region that may differ from the peer
//! marked. Pages of the map are group-committed: while one map write is in
//! flight, new marks accumulate and go out together in the next one.

use std::collections::VecDeque;

use crate::statemap::cells::{CELL_STALE, CellClass, StateMap};
use crate::statemap::format::Layout;

/// Index of a request in the caller's table; below [`EngineParams::slots_max`].
pub type Slot = u32;

/// Number of a state-map write (group commit); increases by one per write.
pub type Epoch = u64;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Read bytes.
    Read,
    /// Write bytes.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Write zeroes (without sending a buffer).
    WriteZeroes,
    /// Discard: the range reads back as zeroes afterwards.
    Trim,
}

impl OpKind {
    /// Whether the operation changes data (and so the state map).
    pub fn changes_data(self) -> bool {
        matches!(self, OpKind::Write | OpKind::WriteZeroes | OpKind::Trim)
    }
}

/// A request from a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: OpKind,
    /// First byte (ignored for flush).
    pub offset_bytes: u64,
    /// Number of bytes (ignored for flush).
    pub len_bytes: u64,
    /// Force unit access: durable before completion.
    pub fua: bool,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The range goes beyond the end of the device.
    #[error(
        "range {offset_bytes}+{len_bytes} is beyond the end of the device ({size_bytes} bytes)"
    )]
    OutOfRange {
        /// Start of the request.
        offset_bytes: u64,
        /// Length of the request.
        len_bytes: u64,
        /// Device size.
        size_bytes: u64,
    },
    /// Offset or length is not a multiple of the logical block size.
    #[error("range {offset_bytes}+{len_bytes} is not aligned to the block size {block_size}")]
    Misaligned {
        /// Start of the request.
        offset_bytes: u64,
        /// Length of the request.
        len_bytes: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The request is larger than the device accepts in one piece.
    #[error("request of {len_bytes} bytes exceeds the maximum of {max_bytes}")]
    TooLarge {
        /// Length of the request.
        len_bytes: u64,
        /// Largest accepted.
        max_bytes: u64,
    },
    /// The device refuses writes here (e.g. the async secondary).
    #[error("device is read-only on this machine")]
    ReadOnly,
    /// The state map could not be written, so writes cannot be protected.
    #[error("state map cannot be written; writes are refused until the device is restarted")]
    MapFailed,
    /// The local volume returned an error (errno).
    #[error("local volume error: {}", std::io::Error::from_raw_os_error(*.0))]
    Io(i32),
    /// The device is stopping.
    #[error("device is stopping")]
    Stopping,
}

impl EngineError {
    /// The errno a frontend reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } | EngineError::Misaligned { .. } => libc::EINVAL,
            EngineError::TooLarge { .. } => libc::EOVERFLOW,
            EngineError::ReadOnly => libc::EPERM,
            EngineError::MapFailed => libc::EIO,
            EngineError::Io(errno) => *errno,
            EngineError::Stopping => libc::ESHUTDOWN,
        }
    }
}

/// What the engine asks its driver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Issue the local operation of this slot; report with [`Engine::local_done`].
    Local(Slot),
    /// Write the pages listed by [`Engine::flushing_pages`] and sync the map;
    /// report with [`Engine::map_written`].
    PersistMap(Epoch),
    /// Complete the request of this slot to its frontend; the slot is free again.
    Complete(Slot, Result<(), EngineError>),
}

/// Fixed parameters of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineParams {
    /// Device size.
    pub size_bytes: u64,
    /// Logical block size: offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Largest request accepted.
    pub io_len_max: u64,
    /// Number of request slots (requests in flight at once).
    pub slots_max: usize,
    /// Whether applications may write here.
    pub writable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting for the state map to be durable up to the epoch.
    Parked(Epoch),
    /// The local operation is in flight.
    Local,
}

/// A set of page indexes as a bitmap.
#[derive(Clone, Debug)]
struct PageSet {
    words: Vec<u64>,
    count: usize,
}

impl PageSet {
    fn new(pages: u64) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            count: 0,
        }
    }

    fn contains(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn insert(&mut self, page: u64) {
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
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
            *word = 0;
        }
        self.count = 0;
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Counters kept by the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Map writes (group commits) completed.
    pub map_commits: u64,
    /// Map pages written.
    pub map_pages_written: u64,
    /// Writes that had to wait for a map write.
    pub writes_waited_for_map: u64,
}

/// The per-device state machine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    params: EngineParams,
    map: StateMap,
    requests: Vec<Request>,
    states: Vec<SlotState>,
    actions: VecDeque<Action>,
    parked: VecDeque<Slot>,
    dirty_pages: PageSet,
    flushing: Vec<u64>,
    flushing_set: PageSet,
    epoch_started: Epoch,
    epoch_durable: Epoch,
    flush_in_flight: bool,
    map_failed: bool,
    stats: EngineStats,
}

impl Engine {
    /// An engine over `map` (as loaded from disk) with the given parameters.
    ///
    /// # Panics
    /// If the map describes another size than `params.size_bytes`.
    pub fn new(params: EngineParams, map: StateMap) -> Engine {
        assert_eq!(map.size_bytes(), params.size_bytes, "map of another device");
        let pages = Layout::for_regions(map.region_count()).page_count;
        Engine {
            params,
            map,
            requests: vec![
                Request {
                    kind: OpKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    fua: false,
                };
                params.slots_max
            ],
            states: vec![SlotState::Free; params.slots_max],
            actions: VecDeque::with_capacity(params.slots_max * 2 + 4),
            parked: VecDeque::with_capacity(params.slots_max),
            dirty_pages: PageSet::new(pages),
            flushing: Vec::with_capacity(pages as usize),
            flushing_set: PageSet::new(pages),
            epoch_started: 0,
            epoch_durable: 0,
            flush_in_flight: false,
            map_failed: false,
            stats: EngineStats::default(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// The in-memory state map (a snapshot is a clone of it).
    pub fn map(&self) -> &StateMap {
        &self.map
    }

    /// The request held by `slot`.
    pub fn request(&self, slot: Slot) -> &Request {
        &self.requests[slot as usize]
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Whether nothing is in flight: no request, no map write.
    pub fn is_idle(&self) -> bool {
        !self.flush_in_flight
            && self.dirty_pages.is_empty()
            && self.states.iter().all(|s| *s == SlotState::Free)
            && self.actions.is_empty()
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Takes a new request into `slot`.
    ///
    /// # Panics
    /// If `slot` is out of range or still in use.
    pub fn submit(&mut self, slot: Slot, request: Request) {
        let index = slot as usize;
        assert_eq!(self.states[index], SlotState::Free, "slot {slot} in use");
        self.requests[index] = request;
        if let Err(e) = self.check(&request) {
            self.actions.push_back(Action::Complete(slot, Err(e)));
            return;
        }
        if !request.kind.changes_data() {
            self.states[index] = SlotState::Local;
            self.actions.push_back(Action::Local(slot));
            return;
        }
        if self.map_failed {
            self.actions
                .push_back(Action::Complete(slot, Err(EngineError::MapFailed)));
            return;
        }
        let need = self.mark(request.offset_bytes, request.len_bytes, CELL_STALE);
        if need <= self.epoch_durable {
            self.states[index] = SlotState::Local;
            self.actions.push_back(Action::Local(slot));
        } else {
            self.stats.writes_waited_for_map += 1;
            self.states[index] = SlotState::Parked(need);
            self.parked.push_back(slot);
            self.start_flush_if_needed();
        }
    }

    fn check(&self, request: &Request) -> Result<(), EngineError> {
        if request.kind == OpKind::Flush {
            return Ok(());
        }
        let Request {
            offset_bytes,
            len_bytes,
            ..
        } = *request;
        if offset_bytes
            .checked_add(len_bytes)
            .is_none_or(|end| end > self.params.size_bytes)
        {
            return Err(EngineError::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.params.size_bytes,
            });
        }
        let block = u64::from(self.params.block_size);
        if offset_bytes % block != 0 || len_bytes % block != 0 {
            return Err(EngineError::Misaligned {
                offset_bytes,
                len_bytes,
                block_size: self.params.block_size,
            });
        }
        if matches!(request.kind, OpKind::Read | OpKind::Write)
            && len_bytes > self.params.io_len_max
        {
            return Err(EngineError::TooLarge {
                len_bytes,
                max_bytes: self.params.io_len_max,
            });
        }
        if request.kind.changes_data() && !self.params.writable {
            return Err(EngineError::ReadOnly);
        }
        Ok(())
    }

    /// Sets the cells of a byte range to `value`; returns the epoch that must
    /// be durable before data may be written there.
    fn mark(&mut self, offset_bytes: u64, len_bytes: u64, value: u8) -> Epoch {
        let regions = self.map.regions_of(offset_bytes, len_bytes);
        if regions.is_empty() {
            return self.epoch_durable;
        }
        let pages = Layout::page_of_region(regions.start)..=Layout::page_of_region(regions.end - 1);
        for region in regions {
            let old = self.map.set(region, value);
            if CellClass::of(old) != CellClass::of(value) {
                self.dirty_pages.insert(Layout::page_of_region(region));
            }
        }
        pages
            .map(|page| self.page_durable_epoch(page))
            .max()
            .unwrap_or(self.epoch_durable)
    }

    /// The epoch after which page `page` as it is in memory is durable.
    fn page_durable_epoch(&self, page: u64) -> Epoch {
        if self.dirty_pages.contains(page) {
            self.epoch_started + 1
        } else if self.flush_in_flight && self.flushing_set.contains(page) {
            self.epoch_started
        } else {
            self.epoch_durable
        }
    }

    fn start_flush_if_needed(&mut self) {
        if self.flush_in_flight || self.dirty_pages.is_empty() {
            return;
        }
        self.flushing.clear();
        self.dirty_pages.drain_into(&mut self.flushing);
        for &page in &self.flushing {
            self.flushing_set.insert(page);
        }
        self.epoch_started += 1;
        self.flush_in_flight = true;
        self.actions
            .push_back(Action::PersistMap(self.epoch_started));
    }

    /// Pages the current map write must write (valid after [`Action::PersistMap`]).
    pub fn flushing_pages(&self) -> &[u64] {
        &self.flushing
    }

    /// Marks every cell `value` (e.g. stale for `gmdctl dirty`); returns the
    /// epoch to wait for before the change is durable.
    pub fn mark_all(&mut self, value: u8) -> Epoch {
        let need = self.mark(0, self.params.size_bytes, value);
        self.start_flush_if_needed();
        need
    }

    /// The last epoch known durable.
    pub fn durable_epoch(&self) -> Epoch {
        self.epoch_durable
    }

    /// Reports the end of map write `epoch`.
    ///
    /// On failure the pages stay marked in memory, every write waiting for the
    /// map fails with [`EngineError::MapFailed`], and so do later writes.
    ///
    /// # Panics
    /// If `epoch` is not the map write in flight.
    pub fn map_written(&mut self, epoch: Epoch, result: Result<(), i32>) {
        assert!(
            self.flush_in_flight && epoch == self.epoch_started,
            "map write {epoch} was not in flight"
        );
        self.flush_in_flight = false;
        for &page in &self.flushing {
            self.flushing_set.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
        self.flushing_set.count = 0;
        match result {
            Ok(()) => {
                self.epoch_durable = epoch;
                self.stats.map_commits += 1;
                self.stats.map_pages_written += self.flushing.len() as u64;
                let mut waiting = self.parked.len();
                while waiting > 0 {
                    waiting -= 1;
                    let slot = self.parked.pop_front().expect("counted");
                    match self.states[slot as usize] {
                        SlotState::Parked(need) if need <= self.epoch_durable => {
                            self.states[slot as usize] = SlotState::Local;
                            self.actions.push_back(Action::Local(slot));
                        }
                        _ => self.parked.push_back(slot),
                    }
                }
                self.start_flush_if_needed();
            }
            Err(_) => {
                self.map_failed = true;
                while let Some(slot) = self.parked.pop_front() {
                    self.states[slot as usize] = SlotState::Free;
                    self.actions
                        .push_back(Action::Complete(slot, Err(EngineError::MapFailed)));
                }
                for &page in &self.flushing {
                    self.dirty_pages.insert(page);
                }
            }
        }
    }

    /// Whether a map write failed (writes are refused until restart).
    pub fn map_failed(&self) -> bool {
        self.map_failed
    }

    /// Reports the end of the local operation of `slot` (`Err(errno)` on failure).
    ///
    /// # Panics
    /// If `slot` had no local operation in flight.
    pub fn local_done(&mut self, slot: Slot, result: Result<(), i32>) {
        assert_eq!(
            self.states[slot as usize],
            SlotState::Local,
            "slot {slot} had no local operation"
        );
        self.states[slot as usize] = SlotState::Free;
        self.actions
            .push_back(Action::Complete(slot, result.map_err(EngineError::Io)));
    }
}

#[cfg(test)]
mod tests;
