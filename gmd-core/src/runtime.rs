//! The running device: one thread per AVAILABLE device that owns an
//! io_uring, the [`Engine`], the data volume and the state map volume (both
//! `O_DIRECT`), and executes the engine's actions.
//!
//! Frontends hand requests over with [`Submitter::submit`] (a bounded
//! lock-free queue plus an eventfd wake-up that is only written when the
//! thread sleeps) and get results through their [`CompletionSink`], called on
//! the device thread. Messages for the peer go to a [`PeerLink`]; messages
//! from the peer and link changes come in through [`Runtime::from_peer`] and
//! [`Runtime::link_event`]. Request slots, ring entries and buffers are
//! allocated when the device starts; the steady-state local data path
//! allocates nothing.
//!
//! Threading: the thread sleeps in `io_uring_enter` (at most
//! [`TICK_INTERVAL`]) waiting for a completion or the eventfd.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use io_uring::{IoUring, opcode, squeue, types};
use uuid::Uuid;

use crate::buf::{BufPool, IoBuf};
use crate::engine::{
    Action, Engine, EngineError, EngineParams, EngineStats, OpKind, Request, Seq, Slot,
};
use crate::mirror::{FromPeer, LinkEvent, PeerLink, ToPeer};
use crate::statemap::cells::StateMap;
use crate::statemap::file::PageSlots;
use crate::statemap::format::{self, BLOCK_SIZE, Layout};
use crate::volume;

/// Most map page writes in flight at once during a group commit.
pub const MAP_WRITES_INFLIGHT_MAX: usize = 64;
/// How often the engine clock advances (lazy cleaning, resync pacing).
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// How long a stopping device waits for the peer to acknowledge its backlog.
pub const STOP_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const KIND_SHIFT: u32 = 62;
const KIND_DATA: u64 = 0;
const KIND_MAP_PAGE: u64 = 1;
const KIND_MAP_SYNC: u64 = 2;
const KIND_WAKE: u64 = 3;

/// In [`Shared::read_gate`]: direct reads are not allowed now. The other
/// bits count the direct reads in flight.
const READ_GATE_CLOSED: u64 = 1 << 63;

/// Receives the results of requests; called on the device thread, so it must
/// not block.
pub trait CompletionSink: Send + Sync {
    /// The request `tag` (which asked for `request`) finished with `result`;
    /// `buf` is the request's buffer when it still owns it (always for reads).
    fn complete(
        &self,
        tag: u64,
        request: &Request,
        result: Result<(), EngineError>,
        buf: Option<IoBuf>,
    );
}

/// A request handed to the device thread.
pub struct Submission {
    /// What to do.
    pub request: Request,
    /// Data to write, or room for the data to read (length = request length).
    pub buf: Option<IoBuf>,
    /// The frontend's identifier, returned with the result.
    pub tag: u64,
    /// Where the result goes.
    pub sink: Arc<dyn CompletionSink>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("request", &self.request)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// Everything needed to start a device thread.
pub struct RuntimeConfig {
    /// Device name (thread name and logs).
    pub name: String,
    /// Data volume.
    pub data_path: PathBuf,
    /// State map volume.
    pub map_path: PathBuf,
    /// Device identity (written into every map page).
    pub uuid: Uuid,
    /// Cells as loaded from the map.
    pub map: StateMap,
    /// Which copy of each map page is current.
    pub page_slots: PageSlots,
    /// Engine parameters (`slots_max` also bounds the submission queue).
    pub params: EngineParams,
    /// Buffers for data from the peer and for resync reads.
    pub pool: BufPool,
    /// Where messages for the peer go.
    pub link: Option<Arc<dyn PeerLink>>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("name", &self.name)
            .field("data_path", &self.data_path)
            .finish_non_exhaustive()
    }
}

/// Live counters of a running device, readable from any thread.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Reads completed.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Of the reads, those a frontend did itself ([`Submitter::direct_read`]).
    pub direct_reads: AtomicU64,
    /// Writes (including write-zeroes and trims) completed.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Requests currently in the device.
    pub in_flight: AtomicU64,
    /// Sum of write latencies, microseconds.
    pub write_latency_us: AtomicU64,
    /// Writes by latency: bucket `i` counts latencies below `2^(i+1)` µs
    /// (and at least `2^i` µs for `i > 0`); the last bucket takes the rest.
    pub write_latency_buckets: [AtomicU64; LATENCY_BUCKETS],
    /// Time writes waited for the peer after their local part finished,
    /// microseconds.
    pub remote_wait_us: AtomicU64,
    engine: Mutex<EngineStats>,
}

/// Number of buckets of the write latency histogram (powers of two of µs).
pub const LATENCY_BUCKETS: usize = 32;

/// The latency at or below which a fraction `q` (0–1) of the writes counted
/// in `buckets` finished, as the upper bound of its bucket in microseconds;
/// `None` when no write was counted.
pub fn latency_percentile_us(buckets: &[u64; LATENCY_BUCKETS], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(1u64 << (i + 1));
        }
    }
    Some(1u64 << LATENCY_BUCKETS)
}

/// Histogram bucket of a latency in microseconds.
fn latency_bucket(us: u64) -> usize {
    (63 - us.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

/// A plain copy of [`RuntimeStats`] plus the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Reads completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Of the reads, those a frontend did itself.
    pub direct_reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests currently in the device.
    pub in_flight: u64,
    /// Sum of write latencies, microseconds.
    pub write_latency_us: u64,
    /// Writes by latency (see [`RuntimeStats::write_latency_buckets`]).
    pub write_latency_buckets: [u64; LATENCY_BUCKETS],
    /// Time writes waited for the peer after their local part finished, µs.
    pub remote_wait_us: u64,
    /// The engine's counters.
    pub engine: EngineStats,
}

impl RuntimeStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            reads: r(&self.reads),
            read_bytes: r(&self.read_bytes),
            direct_reads: r(&self.direct_reads),
            writes: r(&self.writes),
            write_bytes: r(&self.write_bytes),
            flushes: r(&self.flushes),
            errors: r(&self.errors),
            in_flight: r(&self.in_flight),
            write_latency_us: r(&self.write_latency_us),
            write_latency_buckets: std::array::from_fn(|i| r(&self.write_latency_buckets[i])),
            remote_wait_us: r(&self.remote_wait_us),
            engine: *self.engine.lock().expect("stats lock"),
        }
    }
}

type SnapshotReply = Box<dyn FnOnce(StateMap) + Send>;
type DoneReply = Box<dyn FnOnce(Result<(), EngineError>) + Send>;

enum Control {
    Snapshot(SnapshotReply),
    MarkAll(u8, DoneReply),
    MarkStale(Vec<u8>, DoneReply),
    Link(LinkEvent),
    Stop,
}

struct Shared {
    inbox: ArrayQueue<Submission>,
    control: Mutex<Vec<Control>>,
    peer_inbox: Mutex<VecDeque<(u64, FromPeer)>>,
    control_pending: AtomicBool,
    wake_fd: OwnedFd,
    sleeping: AtomicBool,
    stats: RuntimeStats,
    /// Whether frontends may read the data volume themselves
    /// ([`READ_GATE_CLOSED`] clear) and how many such reads are in flight.
    read_gate: AtomicU64,
    /// The data volume (`O_DIRECT`), for direct reads.
    read_file: File,
    /// Device size, block size and largest read: what a direct read must fit.
    read_limits: (u64, u64, u64),
}

impl Shared {
    fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.inbox.push(submission)?;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.wake();
        Ok(())
    }

    /// Wakes the device thread if it sleeps (or is about to).
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake_always();
        }
    }

    fn wake_always(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.wake_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// What the device thread returns when it stops: the cells and page slots to
/// carry on from.
pub type StopResult = io::Result<(StateMap, PageSlots)>;

/// Handle to a running device thread.
pub struct Runtime {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<StopResult>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// Submits requests to a running device; see [`Runtime::submitter`].
///
/// A request submitted after the device stopped is never completed, so
/// frontends must be detached before the device stops.
#[derive(Clone)]
pub struct Submitter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter").finish_non_exhaustive()
    }
}

impl Submitter {
    /// Hands a request to the device thread.
    ///
    /// # Errors
    /// The queue is full; the submission is given back.
    pub fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.shared.submit(submission)
    }

    /// Live counters.
    pub fn stats(&self) -> &RuntimeStats {
        &self.shared.stats
    }

    /// Permission to read `len_bytes` at `offset_bytes` straight from the
    /// data volume on the caller's own thread (and io_uring), without the
    /// device thread; `None` when the read must be submitted instead: the
    /// device is a secondary, a resync target still waiting for regions, or
    /// the request is not a plain valid read (the engine then answers with
    /// the precise error). Hold the permit until the read finished: a link
    /// event that can make the device a resync target waits for outstanding
    /// permits.
    pub fn direct_read(&self, offset_bytes: u64, len_bytes: u64) -> Option<DirectRead<'_>> {
        let shared = &*self.shared;
        let (size, block, len_max) = shared.read_limits;
        let valid = len_bytes > 0
            && len_bytes <= len_max
            && offset_bytes % block == 0
            && len_bytes % block == 0
            && offset_bytes
                .checked_add(len_bytes)
                .is_some_and(|end| end <= size);
        if !valid {
            return None;
        }
        if shared.read_gate.fetch_add(1, Ordering::Acquire) & READ_GATE_CLOSED != 0 {
            shared.read_gate.fetch_sub(1, Ordering::Release);
            return None;
        }
        shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(DirectRead {
            shared,
            len_bytes,
            done: false,
        })
    }
}

/// A read a frontend carries out itself on the data volume; see
/// [`Submitter::direct_read`]. Dropping it without [`DirectRead::finish`]
/// counts the read as failed.
pub struct DirectRead<'a> {
    shared: &'a Shared,
    len_bytes: u64,
    done: bool,
}

impl std::fmt::Debug for DirectRead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectRead")
            .field("len_bytes", &self.len_bytes)
            .finish_non_exhaustive()
    }
}

impl DirectRead<'_> {
    /// The data volume, opened with `O_DIRECT`: buffers, offsets and lengths
    /// must be aligned to the device's block size.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.shared.read_file.as_raw_fd()
    }

    /// Ends the read, counting it in the device's statistics.
    pub fn finish(mut self, ok: bool) {
        let stats = &self.shared.stats;
        if ok {
            stats.reads.fetch_add(1, Ordering::Relaxed);
            stats.direct_reads.fetch_add(1, Ordering::Relaxed);
            stats
                .read_bytes
                .fetch_add(self.len_bytes, Ordering::Relaxed);
        } else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.done = true;
    }
}

impl Drop for DirectRead<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.read_gate.fetch_sub(1, Ordering::Release);
    }
}

/// Reaches a running device from the network side: messages from the peer,
/// link changes, map snapshots. Cloneable; see [`Runtime::port`].
#[derive(Clone)]
pub struct Port {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").finish_non_exhaustive()
    }
}

impl Port {
    fn control(&self, message: Control) {
        self.shared
            .control
            .lock()
            .expect("control queue lock")
            .push(message);
        self.shared.control_pending.store(true, Ordering::SeqCst);
        self.shared.wake_always();
    }

    /// Delivers a message from the peer, sent in link session `session`;
    /// messages of any other than the current session are dropped.
    pub fn from_peer(&self, session: u64, message: FromPeer) {
        self.shared
            .peer_inbox
            .lock()
            .expect("peer inbox lock")
            .push_back((session, message));
        self.shared.control_pending.store(true, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Tells the device the link changed.
    pub fn link_event(&self, event: LinkEvent) {
        self.control(Control::Link(event));
    }

    /// Asks for a copy of the live state map; `reply` is called on the device thread.
    pub fn snapshot(&self, reply: impl FnOnce(StateMap) + Send + 'static) {
        self.control(Control::Snapshot(Box::new(reply)));
    }

    /// Sets every cell to `value` and calls `reply` once that is durable.
    pub fn mark_all(
        &self,
        value: u8,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        self.control(Control::MarkAll(value, Box::new(reply)));
    }

    /// Marks the regions whose bit is set stale (unify on the master) and
    /// calls `reply` once that is durable.
    pub fn mark_stale(
        &self,
        bits: Vec<u8>,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        self.control(Control::MarkStale(bits, Box::new(reply)));
    }

    /// Live counters.
    pub fn stats(&self) -> &RuntimeStats {
        &self.shared.stats
    }
}

impl Runtime {
    /// A handle for the network side; see [`Port`].
    pub fn port(&self) -> Port {
        Port {
            shared: self.shared.clone(),
        }
    }

    /// Opens the volumes, sets up the ring and starts the device thread.
    ///
    /// # Errors
    /// A volume cannot be opened with `O_DIRECT`, or io_uring is unavailable.
    pub fn start(config: RuntimeConfig) -> io::Result<Runtime> {
        let data = volume::open_rw(&config.data_path, true).map_err(|e| {
            io::Error::new(e.kind(), format!("{}: {e}", config.data_path.display()))
        })?;
        let map_file = volume::open_rw(&config.map_path, true)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", config.map_path.display())))?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let params = config.params;
        let read_file = data.try_clone()?;
        let slots = params.slots_max + params.peer_slots_max + params.resync_slots_max;
        let entries = (slots + MAP_WRITES_INFLIGHT_MAX + 2).next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring setup failed: {e}")))?;
        let shared = Arc::new(Shared {
            inbox: ArrayQueue::new(params.slots_max),
            control: Mutex::new(Vec::new()),
            peer_inbox: Mutex::new(VecDeque::new()),
            control_pending: AtomicBool::new(false),
            wake_fd,
            sleeping: AtomicBool::new(false),
            stats: RuntimeStats::default(),
            read_gate: AtomicU64::new(READ_GATE_CLOSED),
            read_file,
            read_limits: (
                params.size_bytes,
                u64::from(params.block_size),
                params.io_len_max,
            ),
        });
        let mut worker = Worker {
            shared: shared.clone(),
            ring,
            data,
            map_file,
            uuid: config.uuid,
            engine: Engine::new(params, config.map),
            page_slots: config.page_slots,
            slots: (0..slots).map(|_| SlotEntry::default()).collect(),
            ops_in_flight: 0,
            completions: Vec::with_capacity(entries as usize * 2),
            wake_buf: Box::new([0; 8]),
            flush: None,
            flush_pages: Vec::new(),
            map_bufs: (0..MAP_WRITES_INFLIGHT_MAX)
                .map(|_| IoBuf::new(BLOCK_SIZE))
                .collect(),
            map_bufs_free: (0..MAP_WRITES_INFLIGHT_MAX).collect(),
            peer_waiting: VecDeque::new(),
            session: 0,
            pool: config.pool,
            link: config.link,
            stopping: None,
            started: Instant::now(),
            last_tick: Instant::now(),
            stats_seen: EngineStats::default(),
            controls: VecDeque::new(),
            controls_waiting: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("gmd-{}", config.name))
            .spawn(move || worker.run())?;
        Ok(Runtime {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a request to the device thread.
    ///
    /// # Errors
    /// The queue is full (more than `slots_max` requests outstanding); the
    /// submission is given back.
    pub fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.shared.submit(submission)
    }

    /// A cheap, cloneable handle that can only submit requests (for frontends).
    pub fn submitter(&self) -> Submitter {
        Submitter {
            shared: self.shared.clone(),
        }
    }

    /// Live counters.
    pub fn stats(&self) -> &RuntimeStats {
        &self.shared.stats
    }

    fn control(&self, message: Control) {
        self.port().control(message);
    }

    /// Delivers a message from the peer (see [`Port::from_peer`]).
    pub fn from_peer(&self, session: u64, message: FromPeer) {
        self.port().from_peer(session, message);
    }

    /// Tells the device the link changed.
    pub fn link_event(&self, event: LinkEvent) {
        self.control(Control::Link(event));
    }

    /// Asks for a copy of the live state map; `reply` is called on the device thread.
    pub fn snapshot(&self, reply: impl FnOnce(StateMap) + Send + 'static) {
        self.control(Control::Snapshot(Box::new(reply)));
    }

    /// Sets every cell to `value` and calls `reply` once that is durable.
    pub fn mark_all(
        &self,
        value: u8,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        self.control(Control::MarkAll(value, Box::new(reply)));
    }

    /// Finishes every request in flight, waits (up to [`STOP_DRAIN_TIMEOUT`])
    /// for the peer to acknowledge what it has not yet, persists the map and
    /// stops the thread.
    ///
    /// # Errors
    /// The device thread failed (an io_uring error) or panicked.
    pub fn stop(mut self) -> StopResult {
        self.control(Control::Stop);
        let thread = self.thread.take().expect("thread present until stop");
        thread
            .join()
            .map_err(|_| io::Error::other("device thread panicked"))?
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.control(Control::Stop);
            let _ = thread.join();
        }
    }
}

/// The data a slot's operation works on.
enum Data {
    /// An aligned buffer owned by the slot.
    Owned(IoBuf),
    /// Shared with a message to the peer (the bytes stay valid while held).
    Shared(Bytes),
}

impl Data {
    fn ptr(&mut self, offset: u64) -> *mut u8 {
        match self {
            Data::Owned(buf) => {
                // SAFETY: offset < buffer length (checked by the caller).
                unsafe { buf.as_mut_ptr().add(offset as usize) }
            }
            // The kernel only reads from a shared buffer (a write).
            Data::Shared(bytes) => bytes[offset as usize..].as_ptr().cast_mut(),
        }
    }
}

#[derive(Default)]
struct SlotEntry {
    /// Application request (app slots).
    submission: Option<Submission>,
    /// Buffer for peer operations and resync reads, or the shared app data.
    data: Option<Data>,
    /// The peer's stream position (peer slots).
    peer_seq: Seq,
    started: Option<Instant>,
    /// When the local part of an application write finished.
    local_done_at: Option<Instant>,
    done_bytes: u64,
    phase: Phase,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Main,
    /// FUA of a write-zeroes or trim: a data sync after the operation.
    Sync,
    /// Trim fell back from punching a hole to zeroing the range.
    ZeroFallback,
    /// Write-zeroes fell back from zeroing the range to punching a hole
    /// (tmpfs and some other file systems lack `FALLOC_FL_ZERO_RANGE`).
    PunchFallback,
}

struct Flush {
    epoch: u64,
    next: usize,
    writes_in_flight: usize,
    failed: Option<i32>,
    syncing: bool,
}

struct Worker {
    shared: Arc<Shared>,
    ring: IoUring,
    data: File,
    map_file: File,
    uuid: Uuid,
    engine: Engine,
    page_slots: PageSlots,
    slots: Vec<SlotEntry>,
    ops_in_flight: usize,
    completions: Vec<(u64, i32)>,
    wake_buf: Box<[u8; 8]>,
    flush: Option<Flush>,
    /// Pages of the current group commit: (page, copy, sequence).
    flush_pages: Vec<(u64, u8, u64)>,
    map_bufs: Vec<IoBuf>,
    map_bufs_free: Vec<usize>,
    /// Messages from the peer waiting for a slot, with their session.
    peer_waiting: VecDeque<(u64, FromPeer)>,
    /// The link session in force (0: none).
    session: u64,
    pool: BufPool,
    link: Option<Arc<dyn PeerLink>>,
    stopping: Option<Instant>,
    started: Instant,
    last_tick: Instant,
    stats_seen: EngineStats,
    /// Control messages not yet handled, in order: a link event that can
    /// make this side a resync target waits at the front until no direct
    /// read is in flight (the thread goes on serving requests meanwhile).
    controls: VecDeque<Control>,
    /// Since when the front control has waited for direct reads.
    controls_waiting: Option<Instant>,
}

fn user_data(kind: u64, index: u64) -> u64 {
    (kind << KIND_SHIFT) | index
}

impl Worker {
    fn run(&mut self) -> StopResult {
        self.arm_wake()?;
        self.update_read_gate();
        let mut waiting_marks: Vec<(u64, DoneReply)> = Vec::new();
        loop {
            if self.shared.control_pending.swap(false, Ordering::SeqCst) {
                let controls: Vec<Control> =
                    std::mem::take(&mut *self.shared.control.lock().expect("control queue lock"));
                self.controls.extend(controls);
                let messages: VecDeque<(u64, FromPeer)> =
                    std::mem::take(&mut *self.shared.peer_inbox.lock().expect("peer inbox lock"));
                self.peer_waiting.extend(messages);
            }
            while let Some(control) = self.controls.front() {
                // As a resync target, reads of regions not yet received must
                // wait in the engine: no direct read may overlap that. Never
                // block here: a frontend thread holding a read permit may be
                // waiting for this thread to take its next request.
                if matches!(control, Control::Link(LinkEvent::Connected { .. }))
                    && !self.read_gate_drained()
                {
                    break;
                }
                self.controls_waiting = None;
                let control = self.controls.pop_front().expect("front exists");
                self.on_control(control, &mut waiting_marks);
                // The engine may have freed slots: carry that out before
                // anything can reuse them.
                self.execute_actions()?;
            }
            self.take_peer_messages()?;
            // New requests, as long as there are free slots.
            while self.engine.app_slot_available() {
                let Some(submission) = self.shared.inbox.pop() else {
                    break;
                };
                let slot = self.engine.submit(submission.request);
                let entry = &mut self.slots[slot as usize];
                entry.submission = Some(submission);
                entry.started = Some(Instant::now());
                entry.done_bytes = 0;
                entry.phase = Phase::Main;
                // A refused request frees its slot at once: handle that
                // before the slot can be given to the next request.
                self.execute_actions()?;
            }
            if self.last_tick.elapsed() >= TICK_INTERVAL {
                self.last_tick = Instant::now();
                self.engine.tick(self.started.elapsed().as_millis() as u64);
                self.execute_actions()?;
            }
            self.execute_actions()?;
            if !waiting_marks.is_empty() {
                let durable = self.engine.durable_epoch();
                let failed = self.engine.map_failed();
                let mut i = 0;
                while i < waiting_marks.len() {
                    if waiting_marks[i].0 <= durable {
                        (waiting_marks.swap_remove(i).1)(Ok(()));
                    } else if failed {
                        (waiting_marks.swap_remove(i).1)(Err(EngineError::MapFailed));
                    } else {
                        i += 1;
                    }
                }
            }
            self.publish_engine_stats();
            self.update_read_gate();
            if let Some(since) = self.stopping {
                if self.engine.is_connected() && since.elapsed() >= STOP_DRAIN_TIMEOUT {
                    tracing::warn!("peer did not acknowledge in time; its backlog is marked stale");
                    self.engine.peer_lost();
                    continue;
                }
                if self.shared.inbox.is_empty()
                    && self.engine.is_idle()
                    && self.ops_in_flight == 0
                    && waiting_marks.is_empty()
                {
                    break;
                }
            }
            // Sleep until a completion, a wake-up or the next tick.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let busy = (!self.shared.inbox.is_empty() && self.engine.app_slot_available())
                || self.shared.control_pending.load(Ordering::SeqCst);
            let result = if busy {
                self.ring.submit()
            } else {
                let ts = types::Timespec::from(TICK_INTERVAL);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            };
            match result {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                    ) => {}
                Err(e) => return Err(e),
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap()?;
        }
        let map = self.engine.map().clone();
        Ok((map, self.page_slots.clone()))
    }

    fn on_control(&mut self, control: Control, waiting_marks: &mut Vec<(u64, DoneReply)>) {
        match control {
            Control::Snapshot(reply) => reply(self.engine.map().clone()),
            Control::MarkAll(value, reply) => {
                if self.engine.map_failed() {
                    reply(Err(EngineError::MapFailed));
                } else {
                    let epoch = self.engine.mark_all(value);
                    waiting_marks.push((epoch, reply));
                }
            }
            Control::MarkStale(bits, reply) => {
                if self.engine.map_failed() {
                    reply(Err(EngineError::MapFailed));
                } else {
                    let epoch = self.engine.mark_stale_bits(&bits);
                    waiting_marks.push((epoch, reply));
                }
            }
            Control::Link(LinkEvent::Connected { session, role }) => {
                if self.engine.is_connected() {
                    self.engine.peer_lost();
                }
                self.session = session;
                self.engine.connect(role);
            }
            Control::Link(LinkEvent::Lost) => {
                self.session = 0;
                self.engine.peer_lost();
            }
            Control::Stop => {
                self.stopping.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Opens the gate for direct reads when the engine allows them and no
    /// control waits for it to drain; it is closed only by
    /// [`Worker::read_gate_drained`].
    fn update_read_gate(&self) {
        let gate = &self.shared.read_gate;
        if self.controls_waiting.is_none()
            && self.engine.direct_reads_allowed()
            && gate.load(Ordering::Relaxed) & READ_GATE_CLOSED != 0
        {
            gate.fetch_and(!READ_GATE_CLOSED, Ordering::AcqRel);
        }
    }

    /// Stops new direct reads; whether none is in flight any more (they are
    /// local reads, so that takes about one disk access).
    fn read_gate_drained(&mut self) -> bool {
        let gate = &self.shared.read_gate;
        let in_flight = gate.fetch_or(READ_GATE_CLOSED, Ordering::AcqRel) & !READ_GATE_CLOSED;
        if in_flight == 0 {
            return true;
        }
        let since = *self.controls_waiting.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(5) {
            tracing::warn!(in_flight, "the link waits for direct reads to finish");
            self.controls_waiting = Some(Instant::now());
        }
        false
    }

    /// Hands messages from the peer to the engine while it has slots for
    /// them. Until the link is connected they wait (the peer may finish its
    /// side of the handshake first); a lost link drops them.
    fn take_peer_messages(&mut self) -> io::Result<()> {
        if !self.controls.is_empty() {
            // A link event waits (see `run`): the messages may belong to the
            // session it starts, which the engine does not know yet.
            return Ok(());
        }
        if !self.engine.is_connected() {
            // Keep only what may belong to a session about to start.
            self.peer_waiting
                .retain(|(s, _)| *s != 0 && *s != self.session);
            return Ok(());
        }
        while let Some((session, message)) = self.peer_waiting.front() {
            if *session != self.session {
                self.peer_waiting.pop_front();
                continue;
            }
            match message {
                FromPeer::Op { .. } if !self.engine.peer_slot_available() => return Ok(()),
                _ => {}
            }
            match self.peer_waiting.pop_front().expect("present").1 {
                FromPeer::Op { op, data } => {
                    let slot = self.engine.peer_op(op);
                    let entry = &mut self.slots[slot as usize];
                    entry.peer_seq = op.seq;
                    entry.done_bytes = 0;
                    entry.phase = Phase::Main;
                    entry.data = if data.is_empty() {
                        None
                    } else {
                        // O_DIRECT needs aligned memory: one copy here.
                        let mut buf = self.pool.take(data.len());
                        buf.copy_from_slice(&data);
                        Some(Data::Owned(buf))
                    };
                }
                FromPeer::Answer { seq, result } => self.engine.remote_done(seq, result),
                FromPeer::Prioritize { region } => self.engine.prioritize(region),
            }
            // An answer may complete a request and free its slot: carry that
            // out before a new request can be given the same slot.
            self.execute_actions()?;
        }
        Ok(())
    }

    fn publish_engine_stats(&mut self) {
        let now = self.engine.stats();
        if now != self.stats_seen {
            *self.shared.stats.engine.lock().expect("stats lock") = now;
            self.stats_seen = now;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.shared.wake_fd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(user_data(KIND_WAKE, 0));
        self.push(entry)?;
        self.ops_in_flight -= 1; // the wake-up read is not work
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at (slot buffers, map page
            // buffers, the wake buffer) lives in this worker and is neither
            // moved nor freed until the entry's completion has been reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.ops_in_flight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn send(&self, message: ToPeer) {
        if let Some(link) = &self.link {
            link.send(message);
        }
    }

    fn execute_actions(&mut self) -> io::Result<()> {
        while let Some(action) = self.engine.poll_action() {
            tracing::trace!(?action, "device action");
            match action {
                Action::Local(slot) => self.issue_local(slot)?,
                Action::PersistMap(epoch) => {
                    self.flush_pages.clear();
                    for &page in self.engine.flushing_pages() {
                        let (slot, seq) = self.page_slots.next(page);
                        self.flush_pages.push((page, slot, seq));
                    }
                    self.flush = Some(Flush {
                        epoch,
                        next: 0,
                        writes_in_flight: 0,
                        failed: None,
                        syncing: false,
                    });
                    self.pump_flush()?;
                }
                Action::Complete(slot, result) => self.complete(slot, result),
                Action::SendWrite {
                    slot,
                    seq,
                    after,
                    request,
                } => {
                    let entry = &mut self.slots[slot as usize];
                    let data = if request.kind == OpKind::Write {
                        let shared = match entry.data.take() {
                            Some(Data::Shared(bytes)) => bytes,
                            // Already being written locally: the heap memory
                            // stays where it is when the buffer moves into Bytes.
                            Some(Data::Owned(buf)) => Bytes::from_owner(buf),
                            _ => {
                                let buf = entry
                                    .submission
                                    .as_mut()
                                    .and_then(|s| s.buf.take())
                                    .expect("a write carries its data");
                                Bytes::from_owner(buf)
                            }
                        };
                        entry.data = Some(Data::Shared(shared.clone()));
                        shared
                    } else {
                        Bytes::new()
                    };
                    self.send(ToPeer::Write {
                        seq,
                        after,
                        request,
                        data,
                    });
                }
                Action::SendFlush { seq } => self.send(ToPeer::Flush { seq }),
                Action::Reply(slot, result) => {
                    let entry = &mut self.slots[slot as usize];
                    entry.data = None;
                    let seq = entry.peer_seq;
                    self.send(ToPeer::Reply {
                        seq,
                        result: result.map_err(|e| e.errno()),
                    });
                }
                Action::Discard(slot) => self.slots[slot as usize].data = None,
                Action::ResyncRead(slot) => {
                    let len = self.engine.request(slot).len_bytes as usize;
                    let entry = &mut self.slots[slot as usize];
                    entry.data = Some(Data::Owned(self.pool.take(len)));
                    entry.done_bytes = 0;
                    entry.phase = Phase::Main;
                    self.issue_local(slot)?;
                }
                Action::SendResync { slot, seq, region } => {
                    let data = match self.slots[slot as usize].data.take() {
                        Some(Data::Owned(buf)) => Bytes::from_owner(buf),
                        _ => unreachable!("a resync read fills an owned buffer"),
                    };
                    self.send(ToPeer::Resync { seq, region, data });
                }
                Action::SendPrioritize { region } => self.send(ToPeer::Prioritize { region }),
                Action::ResyncDone => {
                    if let Some(link) = &self.link {
                        link.resync_done();
                    }
                }
                Action::Renegotiate => {
                    if let Some(link) = &self.link {
                        link.renegotiate();
                    }
                }
                Action::PeerStalled { waited_ms } => {
                    if let Some(link) = &self.link {
                        link.stalled(waited_ms);
                    }
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, slot: Slot, result: Result<(), EngineError>) {
        let entry = &mut self.slots[slot as usize];
        let submission = entry
            .submission
            .take()
            .expect("completed slot has a request");
        entry.data = None;
        let started = entry.started.take();
        let local_done_at = entry.local_done_at.take();
        let stats = &self.shared.stats;
        let request = submission.request;
        match (&result, request.kind) {
            (Err(_), _) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(()), OpKind::Read) => {
                stats.reads.fetch_add(1, Ordering::Relaxed);
                stats
                    .read_bytes
                    .fetch_add(request.len_bytes, Ordering::Relaxed);
            }
            (Ok(()), OpKind::Flush) => {
                stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(()), _) => {
                stats.writes.fetch_add(1, Ordering::Relaxed);
                stats
                    .write_bytes
                    .fetch_add(request.len_bytes, Ordering::Relaxed);
                if let Some(t) = started {
                    let us = t.elapsed().as_micros() as u64;
                    stats.write_latency_us.fetch_add(us, Ordering::Relaxed);
                    stats.write_latency_buckets[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
                }
                if let Some(t) = local_done_at {
                    stats
                        .remote_wait_us
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            }
        }
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        submission
            .sink
            .complete(submission.tag, &request, result, submission.buf);
    }

    fn issue_local(&mut self, slot: Slot) -> io::Result<()> {
        let fd = types::Fd(self.data.as_raw_fd());
        let request = *self.engine.request(slot);
        let entry = &mut self.slots[slot as usize];
        let ud = user_data(KIND_DATA, u64::from(slot));
        let offset = request.offset_bytes + entry.done_bytes;
        let remaining = request.len_bytes - entry.done_bytes;
        let sqe = match (request.kind, entry.phase) {
            (_, Phase::Sync) | (OpKind::Flush, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (OpKind::Read | OpKind::Write, _) if remaining == 0 => {
                self.engine.local_done(slot, Ok(()));
                return Ok(());
            }
            (OpKind::Read | OpKind::Write, _) => {
                if entry.data.is_none() {
                    if let Some(buf) = entry.submission.as_mut().and_then(|s| s.buf.take()) {
                        entry.data = Some(Data::Owned(buf));
                    }
                }
                let data = entry.data.as_mut().expect("reads and writes have a buffer");
                let ptr = data.ptr(entry.done_bytes);
                if request.kind == OpKind::Read {
                    opcode::Read::new(fd, ptr, remaining as u32)
                        .offset(offset)
                        .build()
                } else {
                    let flags = if request.fua { libc::RWF_DSYNC } else { 0 };
                    opcode::Write::new(fd, ptr, remaining as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                }
            }
            (OpKind::WriteZeroes, Phase::PunchFallback) => {
                opcode::Fallocate::new(fd, request.len_bytes)
                    .offset(request.offset_bytes)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            (OpKind::WriteZeroes, _) | (OpKind::Trim, Phase::ZeroFallback) => {
                opcode::Fallocate::new(fd, request.len_bytes)
                    .offset(request.offset_bytes)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            (OpKind::Trim, _) => opcode::Fallocate::new(fd, request.len_bytes)
                .offset(request.offset_bytes)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        self.push(sqe.user_data(ud))
    }

    /// Notes when an application write's local part finished, to measure
    /// how long it then waits for the peer.
    fn mark_local_done(&mut self, slot: Slot, kind: OpKind) {
        let entry = &mut self.slots[slot as usize];
        if entry.submission.is_some() && !matches!(kind, OpKind::Read | OpKind::Flush) {
            entry.local_done_at = Some(Instant::now());
        }
    }

    fn on_data_completion(&mut self, slot: Slot, res: i32) -> io::Result<()> {
        let request = *self.engine.request(slot);
        let entry = &mut self.slots[slot as usize];
        if res < 0 {
            let errno = -res;
            if request.kind == OpKind::Trim
                && entry.phase == Phase::Main
                && (errno == libc::EOPNOTSUPP || errno == libc::EINVAL)
            {
                entry.phase = Phase::ZeroFallback;
                return self.issue_local(slot);
            }
            if request.kind == OpKind::WriteZeroes
                && entry.phase == Phase::Main
                && (errno == libc::EOPNOTSUPP || errno == libc::EINVAL)
            {
                entry.phase = Phase::PunchFallback;
                return self.issue_local(slot);
            }
            if errno == libc::EINTR || errno == libc::EAGAIN {
                return self.issue_local(slot);
            }
            self.engine.local_done(slot, Err(errno));
            return Ok(());
        }
        match request.kind {
            OpKind::Read | OpKind::Write if entry.phase == Phase::Main => {
                if res == 0 {
                    // End of the volume inside the device: it shrank underneath us.
                    self.engine.local_done(slot, Err(libc::EIO));
                    return Ok(());
                }
                entry.done_bytes += res as u64;
                if entry.done_bytes < request.len_bytes {
                    return self.issue_local(slot);
                }
                // Hand an application read's data back with its request.
                if request.kind == OpKind::Read {
                    if let (Some(Data::Owned(_)), Some(sub)) = (&entry.data, &entry.submission) {
                        if sub.buf.is_none() {
                            if let Some(Data::Owned(buf)) = entry.data.take() {
                                entry.submission.as_mut().expect("checked").buf = Some(buf);
                            }
                        }
                    }
                }
                self.mark_local_done(slot, request.kind);
                self.engine.local_done(slot, Ok(()));
                Ok(())
            }
            OpKind::WriteZeroes | OpKind::Trim if request.fua && entry.phase != Phase::Sync => {
                entry.phase = Phase::Sync;
                self.issue_local(slot)
            }
            _ => {
                self.mark_local_done(slot, request.kind);
                self.engine.local_done(slot, Ok(()));
                Ok(())
            }
        }
    }

    fn pump_flush(&mut self) -> io::Result<()> {
        loop {
            let Some(flush) = self.flush.as_mut() else {
                return Ok(());
            };
            if flush.failed.is_some() || flush.syncing {
                return Ok(());
            }
            if flush.next == self.flush_pages.len() {
                if flush.writes_in_flight == 0 {
                    flush.syncing = true;
                    let sqe = opcode::Fsync::new(types::Fd(self.map_file.as_raw_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(user_data(KIND_MAP_SYNC, 0));
                    self.push(sqe)?;
                }
                return Ok(());
            }
            let Some(buf_index) = self.map_bufs_free.pop() else {
                return Ok(());
            };
            let (page, slot, seq) = self.flush_pages[flush.next];
            flush.next += 1;
            flush.writes_in_flight += 1;
            let packed = self.engine.map().packed();
            let buf = &mut self.map_bufs[buf_index];
            format::encode_page(
                &self.uuid,
                page,
                seq,
                &packed[Layout::page_cells(page, packed.len())],
                buf,
            );
            let sqe = opcode::Write::new(
                types::Fd(self.map_file.as_raw_fd()),
                buf.as_mut_ptr(),
                BLOCK_SIZE as u32,
            )
            .offset(Layout::page_offset(page, slot))
            .build()
            .user_data(user_data(KIND_MAP_PAGE, buf_index as u64));
            self.push(sqe)?;
        }
    }

    fn on_map_completion(&mut self, kind: u64, index: u64, res: i32) -> io::Result<()> {
        let flush = self.flush.as_mut().expect("map completion during a flush");
        if kind == KIND_MAP_PAGE {
            self.map_bufs_free.push(index as usize);
            flush.writes_in_flight -= 1;
            if res != BLOCK_SIZE as i32 {
                flush
                    .failed
                    .get_or_insert(if res < 0 { -res } else { libc::EIO });
            }
            if let Some(errno) = flush.failed {
                if flush.writes_in_flight == 0 {
                    let epoch = flush.epoch;
                    self.flush = None;
                    tracing::error!(errno, "state map write failed");
                    self.engine.map_written(epoch, Err(errno));
                }
                return Ok(());
            }
            return self.pump_flush();
        }
        // The sync ends the group commit.
        let epoch = flush.epoch;
        self.flush = None;
        if res < 0 {
            tracing::error!(errno = -res, "state map sync failed");
            self.engine.map_written(epoch, Err(-res));
        } else {
            for &(page, slot, seq) in &self.flush_pages {
                self.page_slots.commit(page, slot, seq);
            }
            self.engine.map_written(epoch, Ok(()));
        }
        Ok(())
    }

    fn reap(&mut self) -> io::Result<()> {
        self.completions.clear();
        for cqe in self.ring.completion() {
            self.completions.push((cqe.user_data(), cqe.result()));
        }
        for i in 0..self.completions.len() {
            let (ud, res) = self.completions[i];
            let kind = ud >> KIND_SHIFT;
            let index = ud & ((1 << KIND_SHIFT) - 1);
            if kind == KIND_WAKE {
                self.arm_wake()?;
                continue;
            }
            self.ops_in_flight -= 1;
            match kind {
                KIND_DATA => self.on_data_completion(index as Slot, res)?,
                _ => self.on_map_completion(kind, index, res)?,
            }
            self.execute_actions()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
