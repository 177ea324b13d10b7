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
//! Frontends with an io_uring per thread (ublk queues) can instead run a
//! request on their own thread ([`Submitter::start_here`]): the engine and
//! its slots sit behind one lock (`Core`), so the frontend takes the request
//! into the engine, sends what goes to the peer, and gets the local I/O back
//! to issue on its own ring ([`Here::Issue`], then
//! [`Submitter::local_result`]). What only the device thread can do (map
//! commits, resync, replies to the peer, other requests' I/O) is left to it
//! in order, and everything after it too.
//!
//! Threading: the thread sleeps in `io_uring_enter` (at most
//! [`TICK_INTERVAL`]) waiting for a completion or the eventfd, without the
//! lock.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use io_uring::{IoUring, opcode, squeue, types};
use uuid::Uuid;

use crate::buf::{BufPool, IoBuf};
use crate::engine::{
    Action, Engine, EngineError, EngineParams, EngineStats, Epoch, OpKind, Request, Seq, Slot,
};
use crate::mirror::{FromPeer, Hold, LinkEvent, PeerLink, RegionSum, ToPeer, region_sum};
use crate::statemap::cells::StateMap;
use crate::statemap::file::PageSlots;
use crate::statemap::format::{self, BLOCK_SIZE, Layout, Superblock};
use crate::volume;

use crate::latency::latency_bucket;
pub use crate::latency::{LATENCY_BUCKETS, latency_percentile_us};

/// Most map page writes in flight at once during a group commit.
pub const MAP_WRITES_INFLIGHT_MAX: usize = 64;
/// How often the engine clock advances (lazy cleaning, resync pacing).
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Messages from the peer the device holds and the engine has not taken yet
/// (the peer inbox plus those waiting for a peer slot). When it is reached
/// [`Port::from_peer`] gives the message back and the caller waits before
/// offering it again; nothing is dropped, and since the device thread never
/// waits on this, the engine keeps taking messages as its peer slots free
/// (a peer operation needs only the local disk to finish). The caller
/// (gmdd's receive task) holds the message's GeoMessage credit meanwhile,
/// so the peer's flow control stops the sender. 16 384 messages covers a
/// full 64 MiB receive window of 4 KiB writes; the queue itself costs about
/// 64 bytes a message (the data is shared with the received datagrams).
pub const PEER_MESSAGES_QUEUED_MAX: usize = 16_384;

/// How often the peer link's congestion window is read for the adaptive
/// resync window: a few times per round trip of a long link.
pub const LINK_WINDOW_INTERVAL: Duration = Duration::from_millis(5);
/// How long a stopping device waits for the peer to acknowledge its backlog.
pub const STOP_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const KIND_SHIFT: u32 = 62;
const KIND_DATA: u64 = 0;
const KIND_MAP_PAGE: u64 = 1;
const KIND_MAP_SYNC: u64 = 2;
const KIND_WAKE: u64 = 3;
// With [`KIND_MAP_SYNC`], index 0 is the map's sync, [`MAP_PAGES_SYNC`] the
// sync of a commit's pages before its superblock; any other index is the
// id of a data volume sync for a barrier (ids start at 1).
/// The sync that makes a commit's pages durable before its superblock is
/// written (a superblock never names generations its pages do not hold).
const MAP_PAGES_SYNC: u64 = 1 << 61;
/// In a group commit's page list: the superblock, not a page.
const SUPERBLOCK_PAGE: u64 = u64::MAX;

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
    /// The superblock as last written, and which copy holds it with what
    /// sequence number: the device thread writes it from now on.
    pub superblock: (Superblock, u8, u64),
    /// Seed for new data generation ids (random).
    pub gen_seed: u64,
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
    /// Of the writes, those whose local part a frontend ran on its own
    /// thread ([`Submitter::start_here`]).
    pub direct_writes: AtomicU64,
    /// Answers from the peer taken on the thread that received them
    /// ([`Port::from_peer`]), without the device thread.
    pub answers_here: AtomicU64,
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
    /// Of the writes, those whose local part a frontend ran itself.
    pub direct_writes: u64,
    /// Answers from the peer taken without the device thread.
    pub answers_here: u64,
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
            direct_writes: r(&self.direct_writes),
            answers_here: r(&self.answers_here),
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
/// A change made on the device thread to the engine and the superblock;
/// returns the epoch after which it is durable.
pub type EngineChange = Box<dyn FnOnce(&mut Engine, &mut Superblock) -> Epoch + Send>;

enum Control {
    Snapshot(SnapshotReply),
    Change(EngineChange, DoneReply),
    Link(LinkEvent),
    Stop,
}

struct Shared {
    /// The engine and its slots; see [`Core`].
    core: Mutex<Core>,
    /// Where messages for the peer go (any thread holding `core` may send).
    link: Option<Arc<dyn PeerLink>>,
    inbox: ArrayQueue<Submission>,
    control: Mutex<Vec<Control>>,
    peer_inbox: Mutex<VecDeque<(u64, FromPeer, Hold)>>,
    /// Messages in `peer_inbox` and `Worker::peer_waiting`, at most
    /// [`PEER_MESSAGES_QUEUED_MAX`].
    peer_queued: AtomicUsize,
    control_pending: AtomicBool,
    /// The device thread holds controls it has taken but not carried out
    /// yet (a link event waiting for direct reads to finish).
    controls_held: AtomicBool,
    wake_fd: OwnedFd,
    sleeping: AtomicBool,
    stats: RuntimeStats,
    /// Whether frontends may read the data volume themselves
    /// ([`READ_GATE_CLOSED`] clear) and how many such reads are in flight.
    read_gate: AtomicU64,
    /// The data volume (`O_DIRECT`), for direct reads and for requests
    /// frontends run on their own rings.
    data_file: File,
    /// Device size, block size and largest read: what a direct read must fit.
    read_limits: (u64, u64, u64),
}

impl Shared {
    /// Everything but the device thread: the engine over `map`, the queues,
    /// the wake-up eventfd; `data` is the data volume (`O_DIRECT`).
    fn new(engine: Engine, link: Option<Arc<dyn PeerLink>>, data: File) -> io::Result<Shared> {
        let params = *engine.params();
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let slots = params.slots_max + params.peer_slots_max + params.resync_slots_max;
        Ok(Shared {
            core: Mutex::new(Core {
                engine,
                slots: (0..slots).map(|_| SlotEntry::default()).collect(),
                deferred: VecDeque::new(),
                stats_seen: EngineStats::default(),
                session: 0,
            }),
            link,
            inbox: ArrayQueue::new(params.slots_max),
            control: Mutex::new(Vec::new()),
            peer_inbox: Mutex::new(VecDeque::new()),
            peer_queued: AtomicUsize::new(0),
            control_pending: AtomicBool::new(false),
            controls_held: AtomicBool::new(false),
            wake_fd,
            sleeping: AtomicBool::new(false),
            stats: RuntimeStats::default(),
            read_gate: AtomicU64::new(READ_GATE_CLOSED),
            data_file: data,
            read_limits: (
                params.size_bytes,
                u64::from(params.block_size),
                params.io_len_max,
            ),
        })
    }

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

    /// Takes the peer's answer to `seq` (sent in link session `session`) on
    /// the caller's thread, when nothing the device thread has yet to do
    /// comes before it: no message from the peer waits, no control, no
    /// deferred action, the engine mirrors in `session` (not in sync mode),
    /// and no other thread holds the engine (never waited for). The writes
    /// it completes go back to their frontends from here: no device-thread
    /// hop. Returns `false` when the answer must go through the queue
    /// instead.
    fn answer_here(&self, session: u64, seq: Seq, result: Result<(), EngineError>) -> bool {
        if result.is_err()
            || self.peer_queued.load(Ordering::Acquire) != 0
            || self.control_pending.load(Ordering::SeqCst)
        {
            // A failed write changes what may be read directly: that is
            // the device thread's to carry out (`update_read_gate`).
            return false;
        }
        let Ok(mut core) = self.core.try_lock() else {
            return false;
        };
        // Checked again under the lock: the device thread moves messages
        // and controls only while it holds it.
        // In sync mode an answer starts the local write, which only the
        // device thread's ring issues: taken here it would cost a hop more
        // (measured: sync 1 MiB writes lost ~14 %).
        if core.engine.params().mode == crate::config::Mode::Sync
            || session == 0
            || core.session != session
            || !core.engine.is_connected()
            || !core.deferred.is_empty()
            || self.peer_queued.load(Ordering::Acquire) != 0
            || self.control_pending.load(Ordering::SeqCst)
            || self.controls_held.load(Ordering::Relaxed)
        {
            return false;
        }
        core.engine.remote_done(seq, result);
        self.stats.answers_here.fetch_add(1, Ordering::Relaxed);
        self.run_here(&mut core, None);
        true
    }

    /// Carries out on a frontend thread (or the thread that took a peer's
    /// answer) what the engine asks after a call for slot `own` there: the
    /// local part of `own` (returned to issue), completions, messages to
    /// the peer. Anything else, and everything after it, is left in order
    /// to the device thread.
    fn run_here(&self, core: &mut Core, own: Option<Slot>) -> Here {
        let mut here = Here::Handed;
        let mut deferred = false;
        let mut freed = false;
        while let Some(action) = core.engine.poll_action() {
            if !core.deferred.is_empty() {
                core.deferred.push_back(action);
                deferred = true;
                continue;
            }
            let action = match core.send(self.link.as_ref(), action) {
                Ok(()) => continue,
                Err(action) => action,
            };
            match action {
                Action::Local(slot) if Some(slot) == own => {
                    if let Some(sqe) = core.local_sqe(slot, self.data_file.as_raw_fd()) {
                        here = Here::Issue { slot, sqe };
                    }
                }
                Action::Complete(slot, result) => {
                    let submission = core.finish(slot, &result, &self.stats);
                    freed = true;
                    if Some(slot) == own {
                        here = Here::Done {
                            result,
                            buf: submission.buf,
                        };
                    } else {
                        hand_back(submission, result);
                    }
                }
                other => {
                    core.deferred.push_back(other);
                    deferred = true;
                }
            }
        }
        if let Some(link) = &self.link {
            link.end_of_batch();
        }
        core.publish_stats(&self.stats);
        if deferred {
            self.control_pending.store(true, Ordering::SeqCst);
            self.wake();
        } else if freed && !self.inbox.is_empty() {
            // Requests wait for the slot this freed.
            self.wake();
        }
        here
    }

    fn wake_always(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.wake_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// What the device thread returns when it stops: the cells and page slots to
/// carry on from.
pub type StopResult = io::Result<Stopped>;

/// What a stopped device leaves: its map as last written, and where.
#[derive(Debug)]
pub struct Stopped {
    /// The cells.
    pub map: StateMap,
    /// Which copy of each page is current.
    pub page_slots: PageSlots,
    /// The superblock, its copy and its sequence number.
    pub superblock: (Superblock, u8, u64),
}

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

    /// Runs a request on the caller's thread as far as it can go: the
    /// engine takes it here (write intent, place in the peer stream, the
    /// message to the peer) and, when its local part can start at once,
    /// gives it back as an io_uring operation for the caller's own ring
    /// ([`Here::Issue`]), whose result goes to [`Submitter::local_result`].
    /// No device-thread hop on the local path; waiting for the peer or for
    /// the state map is left to the device thread ([`Here::Handed`]).
    ///
    /// Meant for frontends with an io_uring per thread (ublk queues); the
    /// request's `sink` still receives the result when it is handed on.
    pub fn start_here(&self, submission: Submission) -> Here {
        let shared = &*self.shared;
        let mut core = shared.core.lock().expect("core lock");
        // The device thread has actions of the engine to carry out first
        // (see `Core::deferred`; it has been woken), or no slot is free.
        // The submission queue stays for submitters that cannot wait (NBD
        // sizes its admission to it).
        if !core.deferred.is_empty() || !core.engine.app_slot_available() {
            return Here::Full(submission);
        }
        shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = core.admit(submission);
        shared.run_here(&mut core, Some(slot))
    }

    /// Takes the result (`res`: bytes or -errno, as io_uring gives it) of
    /// an operation from [`Here::Issue`] for `slot`; says what comes next.
    pub fn local_result(&self, slot: Slot, res: i32) -> Here {
        let shared = &*self.shared;
        let mut core = shared.core.lock().expect("core lock");
        let changes_data = core.engine.request(slot).kind.changes_data();
        if let Some(sqe) = core.local_result(slot, res, shared.data_file.as_raw_fd()) {
            return Here::Issue { slot, sqe };
        }
        if changes_data {
            shared.stats.direct_writes.fetch_add(1, Ordering::Relaxed);
        }
        shared.run_here(&mut core, Some(slot))
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

/// What a frontend running a request on its own thread does next; see
/// [`Submitter::start_here`].
pub enum Here {
    /// Carry out this io_uring operation on the data volume (it points into
    /// the request's buffer, which stays put until the request ends; set
    /// your own `user_data`), then hand its result to
    /// [`Submitter::local_result`] with `slot`.
    Issue {
        /// The request's slot in the engine.
        slot: Slot,
        /// The operation.
        sqe: squeue::Entry,
    },
    /// The request ended.
    Done {
        /// Its result.
        result: Result<(), EngineError>,
        /// Its buffer (with the data of a read).
        buf: Option<IoBuf>,
    },
    /// The device thread finishes it: the result comes through the
    /// submission's sink.
    Handed,
    /// The device cannot take it now (no free slot, or the device thread
    /// has the engine's work to do first): the submission is given back;
    /// try again shortly.
    Full(Submission),
}

impl std::fmt::Debug for Here {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Here::Issue { slot, .. } => f.debug_struct("Issue").field("slot", slot).finish(),
            Here::Done { result, .. } => f.debug_struct("Done").field("result", result).finish(),
            Here::Handed => f.write_str("Handed"),
            Here::Full(s) => f.debug_tuple("Full").field(s).finish(),
        }
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
        self.shared.data_file.as_raw_fd()
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
    ///
    /// # Errors
    /// The device holds [`PEER_MESSAGES_QUEUED_MAX`] messages the engine has
    /// not taken yet: the message is given back; offer it again shortly
    /// (the device thread is working through them).
    pub fn from_peer(&self, session: u64, message: FromPeer) -> Result<(), FromPeer> {
        self.from_peer_held(session, message, Hold::none())
            .map_err(|(message, _)| message)
    }

    /// As [`Port::from_peer`], with what the message keeps of its transport
    /// until the device thread has taken it (then `hold` is dropped).
    ///
    /// # Errors
    /// As [`Port::from_peer`]: both are given back.
    pub fn from_peer_held(
        &self,
        session: u64,
        message: FromPeer,
        hold: Hold,
    ) -> Result<(), (FromPeer, Hold)> {
        if let FromPeer::Answer { seq, result } = message {
            if self.shared.answer_here(session, seq, result) {
                return Ok(());
            }
        }
        let queued = &self.shared.peer_queued;
        if queued.fetch_add(1, Ordering::AcqRel) >= PEER_MESSAGES_QUEUED_MAX {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err((message, hold));
        }
        self.shared
            .peer_inbox
            .lock()
            .expect("peer inbox lock")
            .push_back((session, message, hold));
        self.shared.control_pending.store(true, Ordering::SeqCst);
        self.shared.wake();
        Ok(())
    }

    /// Tells the device the link changed.
    pub fn link_event(&self, event: LinkEvent) {
        self.control(Control::Link(event));
    }

    /// Ends a site isolation ([`LinkEvent::Isolated`]): held writes
    /// complete or go on alone. Nothing happens when not isolated.
    pub fn release_isolation(&self) {
        self.change(
            |engine, _| {
                engine.release_isolation();
                engine.durable_epoch()
            },
            |_| {},
        );
    }

    /// Asks for a copy of the live state map; `reply` is called on the device thread.
    pub fn snapshot(&self, reply: impl FnOnce(StateMap) + Send + 'static) {
        self.control(Control::Snapshot(Box::new(reply)));
    }

    /// Runs `change` on the device thread against the engine and the
    /// superblock (which the next map write writes), and calls `reply` once
    /// the epoch it returns is durable.
    pub fn change(
        &self,
        change: impl FnOnce(&mut Engine, &mut Superblock) -> Epoch + Send + 'static,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        self.control(Control::Change(Box::new(change), Box::new(reply)));
    }

    /// Reads the engine now (under its lock, on the calling thread).
    pub fn inspect<T>(&self, read: impl FnOnce(&Engine) -> T) -> T {
        read(&self.shared.core.lock().expect("core lock").engine)
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
        let params = config.params;
        let slots = params.slots_max + params.peer_slots_max + params.resync_slots_max;
        let entries = (slots + MAP_WRITES_INFLIGHT_MAX + 2).next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring setup failed: {e}")))?;
        let (superblock, super_slot, super_seq) = config.superblock;
        let engine =
            Engine::with_generations(params, config.map, superblock.generations, config.gen_seed);
        let shared = Arc::new(Shared::new(engine, config.link, data.try_clone()?)?);
        let mut worker = Worker {
            shared: shared.clone(),
            ring,
            data,
            map_file,
            uuid: config.uuid,
            page_slots: config.page_slots,
            superblock,
            super_slot,
            super_seq,
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
            pool: config.pool,
            stopping: None,
            started: Instant::now(),
            last_tick: Instant::now(),
            last_window: Instant::now(),
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
    ///
    /// # Errors
    /// As [`Port::from_peer`]: the message is given back when the device
    /// holds too many already.
    pub fn from_peer(&self, session: u64, message: FromPeer) -> Result<(), FromPeer> {
        self.port().from_peer(session, message)
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
        self.port()
            .change(move |engine, _| engine.mark_all(value), reply);
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

#[derive(Default)]
struct SlotEntry {
    /// Application request (app slots).
    submission: Option<Submission>,
    /// Buffer for peer operations, resync reads and the application's
    /// data once its local part is issued.
    data: Option<IoBuf>,
    /// The peer's stream position (peer slots).
    peer_seq: Seq,
    started: Option<Instant>,
    /// When the local part of an application write finished.
    local_done_at: Option<Instant>,
    done_bytes: u64,
    phase: Phase,
    /// The peer's checksum of the region a check from it reads (peer slots).
    check_sum: Option<RegionSum>,
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
    /// The commit's pages are durable (its superblock may be written).
    pages_synced: bool,
    /// The superblock this commit writes, as it was when the commit began:
    /// a change made meanwhile (a role) goes with the next commit, after
    /// what the engine orders before it.
    superblock: Option<Superblock>,
}

/// What a group commit does next ([`flush_step`]).
#[derive(Debug, PartialEq, Eq)]
enum FlushStep {
    /// Write the next page (or the superblock).
    Write,
    /// Sync the pages written, before the superblock.
    SyncPages,
    /// Sync what was written: the commit ends.
    SyncAll,
    /// Wait for writes in flight.
    Wait,
}

/// The next step of a group commit writing `pages` (the superblock, if
/// any, last). The superblock goes only once the pages before it are
/// durable: a crash then leaves old generations over new pages, never new
/// generations over old pages (a copy naming data whose marks did not land).
fn flush_step(pages: &[(u64, u8, u64)], flush: &Flush) -> FlushStep {
    match pages.get(flush.next) {
        None if flush.writes_in_flight == 0 => FlushStep::SyncAll,
        None => FlushStep::Wait,
        Some(&(page, _, _)) if page == SUPERBLOCK_PAGE && flush.next > 0 && !flush.pages_synced => {
            if flush.writes_in_flight == 0 {
                FlushStep::SyncPages
            } else {
                FlushStep::Wait
            }
        }
        Some(_) => FlushStep::Write,
    }
}

struct Worker {
    shared: Arc<Shared>,
    ring: IoUring,
    data: File,
    map_file: File,
    uuid: Uuid,
    page_slots: PageSlots,
    /// The superblock the device thread writes, its copy and sequence.
    superblock: Superblock,
    super_slot: u8,
    super_seq: u64,
    ops_in_flight: usize,
    completions: Vec<(u64, i32)>,
    wake_buf: Box<[u8; 8]>,
    flush: Option<Flush>,
    /// Pages of the current group commit: (page, copy, sequence).
    flush_pages: Vec<(u64, u8, u64)>,
    map_bufs: Vec<IoBuf>,
    map_bufs_free: Vec<usize>,
    /// Messages from the peer waiting for a slot, with their session.
    peer_waiting: VecDeque<(u64, FromPeer, Hold)>,
    pool: BufPool,
    stopping: Option<Instant>,
    started: Instant,
    last_tick: Instant,
    /// Last read of the link's congestion window.
    last_window: Instant,
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

/// The engine and the state of its slots. The device thread holds it while
/// it works (never while it sleeps); a frontend thread holds it while it
/// runs a request on its own thread ([`Submitter::start_here`]).
struct Core {
    engine: Engine,
    slots: Vec<SlotEntry>,
    /// Actions drawn on a frontend thread that only the device thread can
    /// carry out, in the engine's order. While any waits here every later
    /// action waits behind it, and frontends take no new request inline:
    /// the peer stream and slot reuse keep the engine's order. The device
    /// thread empties it before it touches the engine.
    deferred: VecDeque<Action>,
    /// The engine counters last published to [`RuntimeStats`].
    stats_seen: EngineStats,
    /// The link session the engine mirrors in (0: none), as the device
    /// thread last took it from a link event.
    session: u64,
}

impl Core {
    /// Gives a new application request to the engine.
    fn admit(&mut self, submission: Submission) -> Slot {
        let slot = self.engine.submit(submission.request);
        let entry = &mut self.slots[slot as usize];
        entry.submission = Some(submission);
        entry.started = Some(Instant::now());
        entry.local_done_at = None;
        entry.done_bytes = 0;
        entry.phase = Phase::Main;
        slot
    }

    /// The io_uring operation that carries out (the rest of) the local part
    /// of `slot` on the data volume `fd`; `None` when nothing is left to do
    /// (the engine has been told).
    fn local_sqe(&mut self, slot: Slot, fd: RawFd) -> Option<squeue::Entry> {
        let fd = types::Fd(fd);
        let request = *self.engine.request(slot);
        let entry = &mut self.slots[slot as usize];
        let offset = request.offset_bytes + entry.done_bytes;
        let remaining = request.len_bytes - entry.done_bytes;
        let sqe = match (request.kind, entry.phase) {
            (_, Phase::Sync) | (OpKind::Flush, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (OpKind::Read | OpKind::Write, _) if remaining == 0 => {
                self.engine.local_done(slot, Ok(()));
                return None;
            }
            (OpKind::Read | OpKind::Write, _) => {
                if entry.data.is_none() {
                    if let Some(buf) = entry.submission.as_mut().and_then(|s| s.buf.take()) {
                        entry.data = Some(buf);
                    }
                }
                let data = entry.data.as_mut().expect("reads and writes have a buffer");
                // SAFETY: done_bytes < the request's length = the buffer's.
                let ptr = unsafe { data.as_mut_ptr().add(entry.done_bytes as usize) };
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
        Some(sqe)
    }

    /// Takes the result `res` of the local operation of `slot`; returns the
    /// operation to issue next when it is not finished (a short transfer, a
    /// retry, a fallback, the sync of a FUA), else tells the engine.
    fn local_result(&mut self, slot: Slot, res: i32, fd: RawFd) -> Option<squeue::Entry> {
        let request = *self.engine.request(slot);
        let entry = &mut self.slots[slot as usize];
        if res < 0 {
            let errno = -res;
            let unsupported = errno == libc::EOPNOTSUPP || errno == libc::EINVAL;
            if request.kind == OpKind::Trim && entry.phase == Phase::Main && unsupported {
                entry.phase = Phase::ZeroFallback;
                return self.local_sqe(slot, fd);
            }
            if request.kind == OpKind::WriteZeroes && entry.phase == Phase::Main && unsupported {
                // tmpfs and some other file systems lack FALLOC_FL_ZERO_RANGE.
                entry.phase = Phase::PunchFallback;
                return self.local_sqe(slot, fd);
            }
            if errno == libc::EINTR || errno == libc::EAGAIN {
                return self.local_sqe(slot, fd);
            }
            self.engine.local_done(slot, Err(errno));
            return None;
        }
        match request.kind {
            OpKind::Read | OpKind::Write if entry.phase == Phase::Main => {
                if res == 0 {
                    // End of the volume inside the device: it shrank underneath us.
                    self.engine.local_done(slot, Err(libc::EIO));
                    return None;
                }
                entry.done_bytes += res as u64;
                if entry.done_bytes < request.len_bytes {
                    return self.local_sqe(slot, fd);
                }
                // A check from the peer: compare the region read with its
                // checksum; the buffer is not needed any more.
                if let Some(sum) = entry.check_sum.take_if(|_| request.kind == OpKind::Read) {
                    let same = match entry.data.take() {
                        Some(buf) => region_sum(&buf[..request.len_bytes as usize]) == sum,
                        _ => false,
                    };
                    self.engine.check_done(slot, Ok(same));
                    return None;
                }
                // Hand an application read's data back with its request.
                if request.kind == OpKind::Read {
                    if let (Some(_), Some(sub)) = (&entry.data, &entry.submission) {
                        if sub.buf.is_none() {
                            if let Some(buf) = entry.data.take() {
                                entry.submission.as_mut().expect("checked").buf = Some(buf);
                            }
                        }
                    }
                }
            }
            OpKind::WriteZeroes | OpKind::Trim if request.fua && entry.phase != Phase::Sync => {
                entry.phase = Phase::Sync;
                return self.local_sqe(slot, fd);
            }
            _ => {}
        }
        // Note when an application write's local part finished, to measure
        // how long it then waits for the peer.
        if entry.submission.is_some() && !matches!(request.kind, OpKind::Read | OpKind::Flush) {
            entry.local_done_at = Some(Instant::now());
        }
        self.engine.local_done(slot, Ok(()));
        None
    }

    /// Carries out an action any thread may: a message to the peer.
    /// Gives any other action back.
    fn send(&mut self, link: Option<&Arc<dyn PeerLink>>, action: Action) -> Result<(), Action> {
        let mut passes = false;
        let mut awaits = false;
        let message = match action {
            Action::SendWrite {
                slot,
                seq,
                after,
                request,
                passing,
                awaited,
            } => {
                passes = passing;
                awaits = awaited;
                // Borrowed: the link encodes (copies) it before `send`
                // returns, so the buffer stays with the slot, unshared.
                let entry = &self.slots[slot as usize];
                let data: &[u8] = if request.kind == OpKind::Write {
                    let len = request.len_bytes as usize;
                    let held = entry
                        .submission
                        .as_ref()
                        .and_then(|s| s.buf.as_ref())
                        .map(|buf| &buf[..len]);
                    match &entry.data {
                        Some(buf) => &buf[..len],
                        None => held.expect("a write carries its data"),
                    }
                } else {
                    &[]
                };
                ToPeer::Write {
                    seq,
                    after,
                    request,
                    data,
                }
            }
            Action::SendFlush { seq, awaited } => {
                awaits = awaited;
                ToPeer::Flush { seq }
            }
            Action::SendPrioritize { region } => ToPeer::Prioritize { region },
            Action::SendResyncAdd { region } => ToPeer::ResyncAdd { region },
            Action::SendAdopted { current } => ToPeer::Adopted { current },
            Action::SendTerm { term } => ToPeer::Term { term },
            other => return Err(other),
        };
        match link {
            Some(link) if awaits => link.send_awaited(message, passes),
            Some(link) if passes => link.send_passing(message),
            Some(link) => link.send(message),
            None => {}
        }
        Ok(())
    }

    /// Ends an application request: counts it and returns its submission
    /// (holding the data of a read) for its frontend.
    fn finish(
        &mut self,
        slot: Slot,
        result: &Result<(), EngineError>,
        stats: &RuntimeStats,
    ) -> Submission {
        let entry = &mut self.slots[slot as usize];
        let submission = entry
            .submission
            .take()
            .expect("completed slot has a request");
        entry.data = None;
        let started = entry.started.take();
        let local_done_at = entry.local_done_at.take();
        let request = submission.request;
        match (result, request.kind) {
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
    }

    /// Copies the engine's counters where readers see them, when they changed.
    fn publish_stats(&mut self, stats: &RuntimeStats) {
        let now = self.engine.stats();
        if now != self.stats_seen {
            *stats.engine.lock().expect("stats lock") = now;
            self.stats_seen = now;
        }
    }
}

/// Hands a finished request to its frontend.
fn hand_back(submission: Submission, result: Result<(), EngineError>) {
    let Submission {
        request,
        buf,
        tag,
        sink,
    } = submission;
    sink.complete(tag, &request, result, buf);
}

impl Worker {
    fn run(&mut self) -> StopResult {
        self.arm_wake()?;
        let shared = self.shared.clone();
        let mut waiting_marks: Vec<(u64, DoneReply)> = Vec::new();
        loop {
            let mut guard = shared.core.lock().expect("core lock");
            let core = &mut *guard;
            self.reap(core)?;
            // Frontends may have left actions for this thread: they come
            // before anything else touches the engine.
            self.execute_actions(core)?;
            // A failed write from the peer makes its regions wait for the
            // peer's data: no direct read of them from now on.
            self.update_read_gate(core);
            if self.shared.control_pending.swap(false, Ordering::SeqCst) {
                let controls: Vec<Control> =
                    std::mem::take(&mut *self.shared.control.lock().expect("control queue lock"));
                self.controls.extend(controls);
                // Drained, not swapped: the inbox keeps its room (a fresh
                // one would allocate on the next message).
                let mut inbox = self.shared.peer_inbox.lock().expect("peer inbox lock");
                self.peer_waiting.extend(inbox.drain(..));
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
                self.on_control(core, control, &mut waiting_marks);
                // The engine may have freed slots: carry that out before
                // anything can reuse them.
                self.execute_actions(core)?;
            }
            self.shared
                .controls_held
                .store(!self.controls.is_empty(), Ordering::Relaxed);
            self.take_peer_messages(core)?;
            // New requests, as long as there are free slots.
            while core.engine.app_slot_available() {
                let Some(submission) = self.shared.inbox.pop() else {
                    break;
                };
                core.admit(submission);
                // A refused request frees its slot at once: handle that
                // before the slot can be given to the next request.
                self.execute_actions(core)?;
            }
            if self.last_window.elapsed() >= LINK_WINDOW_INTERVAL {
                self.last_window = Instant::now();
                let window = self.shared.link.as_ref().and_then(|l| l.window_hint());
                core.engine.set_link_window(window);
            }
            if self.last_tick.elapsed() >= TICK_INTERVAL {
                self.last_tick = Instant::now();
                core.engine.tick(self.started.elapsed().as_millis() as u64);
                self.execute_actions(core)?;
            }
            self.execute_actions(core)?;
            if !waiting_marks.is_empty() {
                let durable = core.engine.durable_epoch();
                let failed = core.engine.map_failed();
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
            core.publish_stats(&self.shared.stats);
            self.update_read_gate(core);
            if let Some(since) = self.stopping {
                if core.engine.is_connected() && since.elapsed() >= STOP_DRAIN_TIMEOUT {
                    tracing::warn!("peer did not acknowledge in time; its backlog is marked stale");
                    core.engine.peer_lost();
                    continue;
                }
                if self.shared.inbox.is_empty()
                    && core.engine.is_idle()
                    && self.ops_in_flight == 0
                    && waiting_marks.is_empty()
                {
                    break;
                }
            }
            // Sleep until a completion, a wake-up or the next tick.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let busy = (!self.shared.inbox.is_empty() && core.engine.app_slot_available())
                || self.shared.control_pending.load(Ordering::SeqCst);
            drop(guard);
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
        }
        let map = shared.core.lock().expect("core lock").engine.map().clone();
        Ok(Stopped {
            map,
            page_slots: self.page_slots.clone(),
            superblock: (self.superblock.clone(), self.super_slot, self.super_seq),
        })
    }

    fn on_control(
        &mut self,
        core: &mut Core,
        control: Control,
        waiting_marks: &mut Vec<(u64, DoneReply)>,
    ) {
        let engine = &mut core.engine;
        match control {
            Control::Snapshot(reply) => reply(engine.map().clone()),
            Control::Change(change, reply) => {
                if engine.map_failed() {
                    reply(Err(EngineError::MapFailed));
                } else {
                    let epoch = change(engine, &mut self.superblock);
                    waiting_marks.push((epoch, reply));
                }
            }
            Control::Link(LinkEvent::Connected {
                session,
                connection,
            }) => {
                if engine.is_connected() {
                    engine.peer_lost();
                }
                core.session = session;
                engine.connect(connection);
            }
            Control::Link(LinkEvent::Lost) => {
                core.session = 0;
                engine.peer_lost();
            }
            Control::Link(LinkEvent::Isolated) => {
                core.session = 0;
                engine.peer_isolated();
            }
            Control::Link(LinkEvent::Left) => {
                core.session = 0;
                engine.peer_left();
            }
            Control::Stop => {
                if self.stopping.is_none() {
                    self.stopping = Some(Instant::now());
                    // Hot regions' marks go behind a barrier: a clean stop
                    // of a connected pair leaves both maps clean.
                    engine.prepare_stop();
                    // Held writes were never acknowledged: they fail
                    // rather than complete alone (their regions stay stale).
                    engine.fail_isolated();
                }
            }
        }
    }

    /// Opens the gate for direct reads when the engine allows them and no
    /// control waits for it to drain, and closes it when the engine stops
    /// allowing them in the middle of a session (the peer added a region to
    /// its resync, or one of its writes failed here: reads of that region
    /// must wait in the engine; direct reads already in flight began before
    /// and may finish). Before a link event that can make this side a
    /// resync target it is closed and drained by
    /// [`Worker::read_gate_drained`].
    fn update_read_gate(&self, core: &Core) {
        let gate = &self.shared.read_gate;
        let closed = gate.load(Ordering::Relaxed) & READ_GATE_CLOSED != 0;
        let allowed = core.engine.direct_reads_allowed();
        if allowed && closed && self.controls_waiting.is_none() {
            gate.fetch_and(!READ_GATE_CLOSED, Ordering::AcqRel);
        } else if !allowed && !closed {
            gate.fetch_or(READ_GATE_CLOSED, Ordering::AcqRel);
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
    fn take_peer_messages(&mut self, core: &mut Core) -> io::Result<()> {
        if !self.controls.is_empty() {
            // A link event waits (see `run`): the messages may belong to the
            // session it starts, which the engine does not know yet.
            return Ok(());
        }
        if !core.engine.is_connected() {
            // Keep only what may belong to a session about to start.
            let before = self.peer_waiting.len();
            self.peer_waiting
                .retain(|(s, _, _)| *s != 0 && *s != core.session);
            self.shared
                .peer_queued
                .fetch_sub(before - self.peer_waiting.len(), Ordering::AcqRel);
            return Ok(());
        }
        while let Some((session, message, _)) = self.peer_waiting.front() {
            if *session != core.session {
                self.peer_waiting.pop_front();
                self.shared.peer_queued.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            match message {
                FromPeer::Op { .. } | FromPeer::ResyncCheck { .. }
                    if !core.engine.peer_slot_available() =>
                {
                    return Ok(());
                }
                _ => {}
            }
            // The hold goes when the engine has taken the message (a
            // write's data copied into an aligned buffer): at the end of
            // this turn of the loop.
            let (_, message, _hold) = self.peer_waiting.pop_front().expect("present");
            self.shared.peer_queued.fetch_sub(1, Ordering::AcqRel);
            match message {
                FromPeer::Op { op, data } => {
                    let slot = core.engine.peer_op(op);
                    let entry = &mut core.slots[slot as usize];
                    entry.check_sum = None;
                    entry.peer_seq = op.seq;
                    entry.done_bytes = 0;
                    entry.phase = Phase::Main;
                    entry.data = if data.is_empty() {
                        None
                    } else {
                        // O_DIRECT needs aligned memory: one copy here.
                        let mut buf = self.pool.take(data.len());
                        buf.copy_from_slice(&data);
                        Some(buf)
                    };
                }
                FromPeer::ResyncCheck { seq, region, sum } => {
                    let slot = core.engine.peer_check(seq, region);
                    let len = core.engine.request(slot).len_bytes as usize;
                    let entry = &mut core.slots[slot as usize];
                    entry.peer_seq = seq;
                    entry.done_bytes = 0;
                    entry.phase = Phase::Main;
                    entry.check_sum = Some(sum);
                    entry.data = Some(self.pool.take(len));
                }
                FromPeer::Answer { seq, result } => core.engine.remote_done(seq, result),
                FromPeer::Prioritize { region } => core.engine.prioritize(region),
                FromPeer::ResyncAdd { region } => {
                    core.engine.resync_added(region);
                    // Reads of the region must wait in the engine now.
                    self.update_read_gate(core);
                }
                FromPeer::Adopted { current } => core.engine.peer_adopted(current),
                FromPeer::Term { term } => core.engine.peer_promoted(term),
            }
            // An answer may complete a request and free its slot: carry that
            // out before a new request can be given the same slot.
            self.execute_actions(core)?;
        }
        Ok(())
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
            // buffers, the wake buffer) lives in this worker or its core and
            // is neither moved nor freed until the entry's completion has
            // been reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.ops_in_flight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Carries out the actions left by frontends, then the engine's; what
    /// the link held back during them leaves at the end.
    fn execute_actions(&mut self, core: &mut Core) -> io::Result<()> {
        let result = self.carry_out(core);
        if let Some(link) = &self.shared.link {
            link.end_of_batch();
        }
        result
    }

    fn carry_out(&mut self, core: &mut Core) -> io::Result<()> {
        loop {
            let Some(action) = core
                .deferred
                .pop_front()
                .or_else(|| core.engine.poll_action())
            else {
                return Ok(());
            };
            tracing::trace!(?action, "device action");
            let action = match core.send(self.shared.link.as_ref(), action) {
                Ok(()) => continue,
                Err(action) => action,
            };
            match action {
                Action::Local(slot) => self.issue_local(core, slot)?,
                Action::PersistMap(epoch) => {
                    self.flush_pages.clear();
                    for &page in core.engine.flushing_pages() {
                        let (slot, seq) = self.page_slots.next(page);
                        self.flush_pages.push((page, slot, seq));
                    }
                    let mut superblock = None;
                    if let Some(gens) = core.engine.flushing_generations() {
                        self.superblock.generations = gens;
                        self.superblock.generation += 1;
                        superblock = Some(self.superblock.clone());
                        self.flush_pages.push((
                            SUPERBLOCK_PAGE,
                            self.super_slot ^ 1,
                            self.super_seq + 1,
                        ));
                    }
                    self.flush = Some(Flush {
                        epoch,
                        next: 0,
                        writes_in_flight: 0,
                        failed: None,
                        syncing: false,
                        pages_synced: false,
                        superblock,
                    });
                    self.pump_flush(core)?;
                }
                Action::Complete(slot, result) => {
                    hand_back(core.finish(slot, &result, &self.shared.stats), result);
                }
                Action::Reply {
                    slot,
                    result,
                    passing,
                } => {
                    let entry = &mut core.slots[slot as usize];
                    entry.data = None;
                    entry.check_sum = None;
                    let seq = entry.peer_seq;
                    let reply = ToPeer::Reply {
                        seq,
                        result: result.map_err(|e| e.errno()),
                    };
                    // The peer's request (or its backlog) waits for it.
                    if let Some(link) = &self.shared.link {
                        link.send_awaited(reply, passing);
                    }
                }
                Action::Discard(slot) => {
                    core.slots[slot as usize].data = None;
                    core.slots[slot as usize].check_sum = None;
                }
                Action::ResyncRead(slot) => {
                    let len = core.engine.request(slot).len_bytes as usize;
                    let entry = &mut core.slots[slot as usize];
                    entry.data = Some(self.pool.take(len));
                    entry.done_bytes = 0;
                    entry.phase = Phase::Main;
                    self.issue_local(core, slot)?;
                }
                Action::SendResync { slot, seq, region } => {
                    let data = match core.slots[slot as usize].data.take() {
                        Some(buf) => buf,
                        _ => unreachable!("a resync read fills an owned buffer"),
                    };
                    self.send(ToPeer::Resync {
                        seq,
                        region,
                        data: &data[..],
                    });
                }
                Action::SendResyncCheck { slot, seq, region } => {
                    let sum = match core.slots[slot as usize].data.take() {
                        Some(buf) => region_sum(&buf[..]),
                        _ => unreachable!("a resync read fills an owned buffer"),
                    };
                    self.send(ToPeer::ResyncCheck { seq, region, sum });
                }
                Action::SyncData(sync) => {
                    let sqe = opcode::Fsync::new(types::Fd(self.data.as_raw_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(user_data(KIND_MAP_SYNC, sync));
                    self.push(sqe)?;
                }
                Action::ResyncDone => {
                    if let Some(link) = &self.shared.link {
                        link.resync_done();
                    }
                }
                Action::Renegotiate => {
                    if let Some(link) = &self.shared.link {
                        link.renegotiate();
                    }
                }
                Action::PeerStalled { waited_ms } => {
                    if let Some(link) = &self.shared.link {
                        link.stalled(waited_ms);
                    }
                }
                Action::SendWrite { .. }
                | Action::SendFlush { .. }
                | Action::SendPrioritize { .. }
                | Action::SendResyncAdd { .. }
                | Action::SendAdopted { .. }
                | Action::SendTerm { .. } => {
                    unreachable!("sent by Core::send")
                }
            }
        }
    }

    fn send(&self, message: ToPeer) {
        if let Some(link) = &self.shared.link {
            link.send(message);
        }
    }

    fn issue_local(&mut self, core: &mut Core, slot: Slot) -> io::Result<()> {
        match core.local_sqe(slot, self.data.as_raw_fd()) {
            Some(sqe) => self.push(sqe.user_data(user_data(KIND_DATA, u64::from(slot)))),
            None => Ok(()),
        }
    }

    fn on_data_completion(&mut self, core: &mut Core, slot: Slot, res: i32) -> io::Result<()> {
        match core.local_result(slot, res, self.data.as_raw_fd()) {
            Some(sqe) => self.push(sqe.user_data(user_data(KIND_DATA, u64::from(slot)))),
            None => Ok(()),
        }
    }

    fn pump_flush(&mut self, core: &mut Core) -> io::Result<()> {
        loop {
            let Some(flush) = self.flush.as_mut() else {
                return Ok(());
            };
            if flush.failed.is_some() || flush.syncing {
                return Ok(());
            }
            let sync = match flush_step(&self.flush_pages, flush) {
                FlushStep::Wait => return Ok(()),
                FlushStep::Write => None,
                FlushStep::SyncPages => Some(MAP_PAGES_SYNC),
                FlushStep::SyncAll => Some(0),
            };
            if let Some(sync) = sync {
                flush.syncing = true;
                let sqe = opcode::Fsync::new(types::Fd(self.map_file.as_raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(user_data(KIND_MAP_SYNC, sync));
                self.push(sqe)?;
                return Ok(());
            }
            let Some(buf_index) = self.map_bufs_free.pop() else {
                return Ok(());
            };
            let (page, slot, seq) = self.flush_pages[flush.next];
            flush.next += 1;
            flush.writes_in_flight += 1;
            let packed = core.engine.map().packed();
            let buf = &mut self.map_bufs[buf_index];
            let offset = if page == SUPERBLOCK_PAGE {
                let superblock = flush.superblock.as_ref().expect("taken with its page");
                format::encode_superblock(superblock, seq, buf);
                Layout::superblock_offset(slot)
            } else {
                format::encode_page(
                    &self.uuid,
                    page,
                    seq,
                    &packed[Layout::page_cells(page, packed.len())],
                    buf,
                );
                Layout::page_offset(page, slot)
            };
            let sqe = opcode::Write::new(
                types::Fd(self.map_file.as_raw_fd()),
                buf.as_mut_ptr(),
                BLOCK_SIZE as u32,
            )
            .offset(offset)
            .build()
            .user_data(user_data(KIND_MAP_PAGE, buf_index as u64));
            self.push(sqe)?;
        }
    }

    fn on_map_completion(
        &mut self,
        core: &mut Core,
        kind: u64,
        index: u64,
        res: i32,
    ) -> io::Result<()> {
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
                    core.engine.map_written(epoch, Err(errno));
                }
                return Ok(());
            }
            return self.pump_flush(core);
        }
        if index == MAP_PAGES_SYNC && res >= 0 {
            flush.syncing = false;
            flush.pages_synced = true;
            return self.pump_flush(core);
        }
        // The sync ends the group commit (or failed before its superblock).
        let epoch = flush.epoch;
        self.flush = None;
        if res < 0 {
            tracing::error!(errno = -res, "state map sync failed");
            core.engine.map_written(epoch, Err(-res));
        } else {
            for &(page, slot, seq) in &self.flush_pages {
                if page == SUPERBLOCK_PAGE {
                    self.super_slot = slot;
                    self.super_seq = seq;
                } else {
                    self.page_slots.commit(page, slot, seq);
                }
            }
            core.engine.map_written(epoch, Ok(()));
        }
        Ok(())
    }

    fn reap(&mut self, core: &mut Core) -> io::Result<()> {
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
                KIND_DATA => self.on_data_completion(core, index as Slot, res)?,
                KIND_MAP_SYNC if index != 0 && index != MAP_PAGES_SYNC => {
                    core.engine
                        .data_synced(index, if res < 0 { Err(-res) } else { Ok(()) });
                }
                _ => self.on_map_completion(core, kind, index, res)?,
            }
            self.execute_actions(core)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
