//! The device engine: a sans-IO state machine that decides, for every
//! request, what must be durable in the state map before which local
//! operation or message to the peer, and when the request completes.
//!
//! Drive it like raft-rs's `RawNode`: hand it requests ([`Engine::submit`]),
//! operations received from the peer ([`Engine::peer_op`]), results of the
//! actions it asked for ([`Engine::local_done`], [`Engine::map_written`],
//! [`Engine::remote_done`]), link changes ([`Engine::connect`],
//! [`Engine::peer_lost`]) and clock ticks ([`Engine::tick`]); drain
//! [`Engine::poll_action`] after each call — completely, and carrying each
//! action out, before the next call: a slot freed by one call is handed to
//! the next request submitted. It performs no I/O, reads no
//! clock and allocates nothing per request, so the same code runs under the
//! io_uring runtime ([`crate::runtime`]) and in simulations.
//!
//! # Rules it enforces
//! - **Write intent before dispatch.** Connected, a write first puts its
//!   regions' extent (4 MiB) in the activity set (its own cells `0x1`,
//!   durable before the write is issued anywhere; the extent's other clean
//!   cells `0x5` in the same commit); extents stay marked while hot and are
//!   cleared lazily once idle, so writes to hot extents cost no map write.
//!   With the peer down, a write marks its regions stale (`0xf`), durable
//!   before the write is issued.
//! - **Modes.** sync: remote, then local, then completion. mwc: local and
//!   remote together, completion when both are done. async: local, then
//!   completion, then the remote in completion order; when the bytes
//!   completed but not yet acknowledged by the peer would exceed the high
//!   water mark, writes behave as mwc until that backlog is zero.
//! - **Peer loss.** Every write the peer did not acknowledge leaves its
//!   regions stale; the intent mark already on disk covers the gap until the
//!   stale mark is.
//! - **Receiving.** Operations from the peer are applied in stream order
//!   under the rules of [`target`]: never reordered across overlaps,
//!   dependencies or barriers.
//! - **Resync.** The source sends every region of the agreed set, never
//!   reading a region while writes to it are in flight, and holding back
//!   writes to a region while it reads it; the target holds back its own
//!   application's I/O to regions not yet received.
//! - **Checksum resync.** When both sides agreed on it
//!   ([`Connection::resync_checksums`]), the source sends a region's
//!   checksum where its data would go in the stream; the target compares it
//!   with its own copy at that point of the stream and, when they match and
//!   its volume is synced, takes the region as received. Otherwise the
//!   region is read again and its data sent as above.

mod activity;
mod clears;
mod journal;
mod resync;
pub mod resync_window;
mod target;

use std::collections::VecDeque;
use std::ops::Range;

pub use journal::Epoch;
pub use target::Seq;

use crate::config::Mode;
use crate::generations::{GenId, GenSource, Generations};
use crate::link::PairRole;
use crate::statemap::cells::{
    CELL_ACTIVE, CELL_CONSISTENT, CELL_INCONSISTENT, CELL_LOCAL_DONE, CELL_QUEUED,
    CELL_REMOTE_DONE, CELL_RESYNC, CELL_STALE, CELL_WRITING, CellValue, StateMap,
};
use crate::units::{REGION_SIZE_BYTES, region_bytes};
use activity::ActivitySet;
use clears::Clears;
use journal::Journal;
use resync::{RegionBits, ResyncSource};
use target::{Ordered, TargetQueue};

/// Index of a request in the engine's table (shared with the driver, which
/// keeps the request's buffer under the same index).
pub type Slot = u32;

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

/// A request from a frontend, or an operation to apply for the peer.
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
    /// The device refuses writes here: this copy is secondary.
    #[error(
        "this copy is secondary and refuses writes; write on the primary, or promote this side with 'gmdctl primary'"
    )]
    ReadOnly,
    /// The async secondary serves no application I/O.
    #[error("this machine is the async secondary of the device; applications use the primary")]
    Secondary,
    /// The data is not here yet: resynchronisation from the peer was interrupted.
    #[error("region not yet resynchronised and the peer is gone; its data is not available here")]
    Unavailable,
    /// The state map could not be written, so writes cannot be protected.
    #[error("state map cannot be written; writes are refused until the device is restarted")]
    MapFailed,
    /// The local volume returned an error (errno).
    #[error("local volume error: {}", std::io::Error::from_raw_os_error(*.0))]
    Io(i32),
    /// The peer failed the operation (errno).
    #[error("peer volume error: {}", std::io::Error::from_raw_os_error(*.0))]
    Remote(i32),
    /// The link to the peer ended before the answer.
    #[error("the link to the peer ended")]
    PeerLost,
    /// The device is stopping.
    #[error("device is stopping")]
    Stopping,
    /// Resync data for a region this side holds stale (it wrote it alone).
    #[error("this side holds the region stale; the link is set up again")]
    StaleHere,
    /// A resync checksum from the peer does not match this side's copy of
    /// the region: the peer sends its data.
    #[error("the region differs from the peer's copy; the peer sends its data")]
    Differs,
}

impl EngineError {
    /// The errno a frontend reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } | EngineError::Misaligned { .. } => libc::EINVAL,
            EngineError::TooLarge { .. } => libc::EOVERFLOW,
            EngineError::ReadOnly | EngineError::Secondary => libc::EPERM,
            EngineError::Unavailable | EngineError::MapFailed => libc::EIO,
            EngineError::Io(errno) | EngineError::Remote(errno) => *errno,
            EngineError::PeerLost => libc::ENOTCONN,
            EngineError::Stopping => libc::ESHUTDOWN,
            EngineError::StaleHere => libc::EBUSY,
            EngineError::Differs => libc::EILSEQ,
        }
    }
}

/// An operation received from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerOp {
    /// Its place in the peer's stream.
    pub seq: Seq,
    /// Every message up to this one must be applied first.
    pub after: Seq,
    /// What to do (`Flush` is a barrier).
    pub request: Request,
    /// Resync data for this region (the write covers the whole region); a
    /// `Read` of a whole region is a checksum check of it
    /// ([`Engine::peer_check`]).
    pub resync_region: Option<u64>,
}

/// What the engine asks its driver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Issue the local operation of this slot; report with [`Engine::local_done`].
    Local(Slot),
    /// Write the pages listed by [`Engine::flushing_pages`] and sync the map;
    /// report with [`Engine::map_written`].
    PersistMap(Epoch),
    /// Complete this application request; the slot is free again.
    Complete(Slot, Result<(), EngineError>),
    /// Send this slot's write to the peer as message `seq` (taking a
    /// reference to its data, which stays needed after `Complete` in async
    /// mode); report with [`Engine::remote_done`].
    SendWrite {
        /// The slot holding the request and its data.
        slot: Slot,
        /// Its place in the stream.
        seq: Seq,
        /// The peer must apply everything up to here first.
        after: Seq,
        /// The write (the slot may be free by the time this is handled).
        request: Request,
        /// The peer may apply it before earlier messages still on their
        /// way (see [`Engine::poll_action`]): send it so that it can pass
        /// them (`PeerLink::send_passing`).
        passing: bool,
        /// The application's request waits for the peer's answer (sync,
        /// mwc, async past its high water mark); false for async's backlog,
        /// already complete. A link sends an awaited write at once rather
        /// than batching it (`PeerLink::send_awaited`).
        awaited: bool,
    },
    /// Send a flush barrier as message `seq`; report with [`Engine::remote_done`].
    SendFlush {
        /// Its place in the stream.
        seq: Seq,
        /// An application's flush waits for the peer's answer (as for
        /// [`Action::SendWrite`]); false for a barrier nobody waits on.
        awaited: bool,
    },
    /// Answer the peer for the operation in this slot; the slot is free again.
    Reply {
        /// The slot of the operation.
        slot: Slot,
        /// How it went.
        result: Result<(), EngineError>,
        /// The answer may pass earlier messages still on their way (see
        /// [`Engine::poll_action`]).
        passing: bool,
    },
    /// Drop the operation in this slot without answering (it belonged to an
    /// earlier link session); the slot is free again.
    Discard(Slot),
    /// Read the region of this resync slot (its request says where) into a
    /// buffer; report with [`Engine::local_done`].
    ResyncRead(Slot),
    /// Send the region data read into this slot as message `seq` (taking the
    /// buffer); the slot is free again. Report with [`Engine::remote_done`].
    SendResync {
        /// The slot holding the data.
        slot: Slot,
        /// Its place in the stream.
        seq: Seq,
        /// The region.
        region: u64,
    },
    /// Send the checksum of the region data read into this slot instead of
    /// the data, as message `seq` (the peer compares it with its copy);
    /// the slot is free again. Report with [`Engine::remote_done`]: `Ok`
    /// means the peer's copy is the same (and durable there).
    SendResyncCheck {
        /// The slot holding the data.
        slot: Slot,
        /// Its place in the stream.
        seq: Seq,
        /// The region.
        region: u64,
    },
    /// Ask the peer to resynchronise `region` next (an application waits for it).
    SendPrioritize {
        /// The region.
        region: u64,
    },
    /// Tell the peer, target of this side's resync, that `region` was added
    /// to the resync after the handshake (the handshake's set does not hold
    /// it): the peer marks it not received (`0x6`), durably before it applies
    /// anything sent after this message. Sent in stream order, never answered.
    SendResyncAdd {
        /// The region.
        region: u64,
    },
    /// Send the peer this side's new primary term (a promotion while
    /// connected): its own next promotion goes above it.
    SendTerm {
        /// The term.
        term: u64,
    },
    /// Tell the peer, source of this side's resync, that this side now
    /// durably holds generation `current` (with every region it still
    /// lacks marked): the source then stops counting its marks from an
    /// older one. Sent in stream order, never answered.
    SendAdopted {
        /// The generation taken.
        current: GenId,
    },
    /// Make every completed write to the local data volume durable (fsync);
    /// report with [`Engine::data_synced`] and this id. Marks are cleared on
    /// disk only after the data they cover is durable on both sides.
    SyncData(u64),
    /// The resync this side took part in is finished.
    ResyncDone,
    /// The link must be set up again: this side wrote alone after the
    /// handshake read its map (the agreed resync does not cover it).
    Renegotiate,
    /// The connected peer answered nothing for `peer_stall_ms` while
    /// messages waited: drop the link (the device goes on alone, marking
    /// writes stale) rather than hold applications forever.
    PeerStalled {
        /// How long the oldest unanswered message has waited without progress.
        waited_ms: u64,
    },
}

/// The part this side plays in resynchronisation when a link starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncRole {
    /// Both copies are the same: nothing to send.
    None,
    /// Send these regions (one bit per region, as [`Engine::dirty_bits`]).
    Source(Vec<u8>),
    /// Receive these regions.
    Target(Vec<u8>),
}

/// What the engine is told when a link session starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Its part in the resync.
    pub role: ResyncRole,
    /// The peer's current generation; for a target, the source's, which it
    /// takes (durably, with its marks) before it applies anything.
    pub peer_current: GenId,
    /// How many cells of this side were stale when the handshake read its
    /// map: more now means it wrote alone since, and a target then asks to
    /// renegotiate rather than have those writes overwritten.
    pub stale_at_handshake: u64,
    /// A source's current generation as the handshake read it: the one the
    /// target takes. A source that drew another since (it wrote alone
    /// between the handshake and the connect) asks to renegotiate: the
    /// target would hold its data under a generation the source no longer
    /// has, and a later handshake would take their lineages for a
    /// divergence. [`GEN_NONE`](crate::generations::GEN_NONE): not checked.
    pub source_current: GenId,
    /// Both sides agreed on checksum resync: a source sends each region's
    /// checksum first and its data only if the target's copy differs.
    pub resync_checksums: bool,
    /// The peer's primary term; this side takes it if higher.
    pub peer_term: u64,
    /// The peer takes device messages that pass earlier ones (see
    /// [`Engine::poll_action`]); an older one does not.
    pub passing: bool,
}

impl From<ResyncRole> for Connection {
    /// A connection to a peer holding no known data, after a handshake
    /// that found no stale cell here (tests and tools).
    fn from(role: ResyncRole) -> Self {
        Connection {
            role,
            peer_current: crate::generations::GEN_NONE,
            stale_at_handshake: 0,
            source_current: crate::generations::GEN_NONE,
            peer_term: 0,
            resync_checksums: false,
            passing: true,
        }
    }
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
    /// Application requests in flight at once.
    pub slots_max: usize,
    /// Operations from the peer in flight at once.
    pub peer_slots_max: usize,
    /// Resync reads in flight at once.
    pub resync_slots_max: usize,
    /// Whether applications may write here.
    pub writable: bool,
    /// Whether applications may read here.
    pub readable: bool,
    /// Mirroring mode.
    pub mode: Mode,
    /// Async high water mark, bytes.
    pub hwm_bytes: u64,
    /// Resync data in flight at most, bytes: the cap of the adaptive
    /// window, or the fixed window when `resync_adaptive` is off.
    pub resync_in_flight_max_bytes: u64,
    /// The resync window follows the peer link's congestion window
    /// ([`Engine::set_link_window`], [`resync_window::resync_window`]).
    pub resync_adaptive: bool,
    /// Regions of idle extents kept in the activity set (the bound of what
    /// a crash resends).
    pub activity_regions: usize,
    /// Regions per activity extent, the unit of write intent (a power of
    /// two; 128 regions = 4 MiB).
    pub activity_extent_regions: u64,
    /// An extent idle this long leaves the activity set.
    pub activity_idle_ms: u64,
    /// A connected peer that answers nothing for this long while messages
    /// wait is dropped ([`Action::PeerStalled`]); 0 = wait forever.
    pub peer_stall_ms: u64,
}

impl EngineParams {
    /// Parameters for a device of `size_bytes` with defaults for the rest.
    pub fn new(size_bytes: u64, mode: Mode) -> Self {
        EngineParams {
            size_bytes,
            block_size: 512,
            io_len_max: 4 << 20,
            slots_max: 256,
            peer_slots_max: 256,
            resync_slots_max: 16,
            writable: true,
            readable: true,
            mode,
            hwm_bytes: 128 << 10,
            resync_in_flight_max_bytes: 32 << 10,
            resync_adaptive: false,
            // 1 GiB of hot extents of 4 MiB kept for 30 s: a database's
            // working set pays no map write per data write, random writes
            // one per 4 MiB touched; a crash resends at most this.
            activity_regions: 32_768,
            activity_extent_regions: 128,
            activity_idle_ms: 30_000,
            peer_stall_ms: 30_000,
        }
    }

    fn slots_total(&self) -> usize {
        self.slots_max + self.peer_slots_max + self.resync_slots_max
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
    /// Writes sent to the peer.
    pub remote_writes: u64,
    /// Bytes of writes sent to the peer.
    pub remote_write_bytes: u64,
    /// Flushes sent to the peer.
    pub remote_flushes: u64,
    /// Writes or flushes the peer failed or never answered.
    pub remote_failures: u64,
    /// Async bytes completed but not yet acknowledged by the peer.
    pub backlog_bytes: u64,
    /// Times async fell back to mwc at the high water mark.
    pub hwm_fallbacks: u64,
    /// Resyncs this side took part in (as source or target), however short:
    /// watchers that sample the state compare this to see ones they missed.
    pub resyncs: u64,
    /// Whether async currently behaves as mwc (1) or not (0).
    pub hwm_fallback_active: u64,
    /// Regions in the current resync (source side).
    pub resync_total: u64,
    /// Regions of it still to be confirmed.
    pub resync_remaining: u64,
    /// Resync bytes sent since start.
    pub resync_bytes_sent: u64,
    /// Bytes of resync regions found identical by checksum since start
    /// (source: not sent; target: not received).
    pub resync_same_bytes: u64,
    /// Resync checksums sent since start (source).
    pub resync_checks: u64,
    /// Of those, the regions the target found different (their data was
    /// then sent).
    pub resync_checks_differ: u64,
    /// Regions still to be received (target side).
    pub resync_target_remaining: u64,
    /// Regions to receive in the current resync (target side).
    pub resync_target_total: u64,
    /// Operations received from the peer and applied.
    pub peer_ops: u64,
    /// Bytes written for the peer.
    pub peer_op_bytes: u64,
    /// Extents in the activity set.
    pub activity_extents: u64,
    /// Whether a peer is connected (1) or not (0).
    pub connected: u64,
    /// Times a connected peer was dropped for answering nothing.
    pub peer_stalls: u64,
    /// Resync reads that failed (each region is retried after a back-off).
    pub resync_read_errors: u64,
    /// Regions whose resync read failed and that wait for their retry.
    pub resync_failed_regions: u64,
    /// Barriers completed before clearing marks (data durable on both sides).
    pub barriers: u64,
    /// Resync data from the peer refused because this side holds the region stale.
    pub resync_refused: u64,
    /// Application writes refused because this copy is secondary.
    pub writes_refused: u64,
    /// Application writes that waited for an earlier overlapping one.
    pub overlap_waits: u64,
    /// Whether writes without the peer are held (1) or not (0): see
    /// [`Engine::peer_isolated`].
    pub isolated: u64,
    /// Application writes held now, waiting for the link or a release.
    pub writes_held: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    App,
    Peer,
    Resync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Idle,
    InFlight,
    Done(Result<(), i32>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    /// No peer part (standalone, reads, or async before completion).
    NotNeeded,
    /// Sent as message `seq`, waiting for the answer.
    Pending(Seq),
    /// The peer applied it.
    Done,
    /// The peer failed it, or the link ended first: the regions are stale.
    Lost,
    /// Async: handed to the backlog at local completion.
    Backlog,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    None,
    /// The map must be durable up to this epoch.
    Epoch(Epoch),
    /// A region is being read for resync (source).
    ResyncRead,
    /// A region has not been received yet (target).
    ResyncTarget,
    /// Done, but the peer did not get it: acknowledged once the map is
    /// durable up to this epoch (its regions stale on disk).
    Acknowledge(Epoch),
    /// Isolated: the write waits for the link or a release (not admitted
    /// yet if its local part is idle, else waiting for its completion).
    Isolated,
    /// Not admitted yet: this copy is being promoted and its data volume
    /// is being synced first ([`Engine::change_access`]).
    Promotion,
    /// Not admitted yet: an earlier application write overlapping this one
    /// has not finished ([`Engine::waits_for_overlap`]).
    Overlap,
}

/// A promotion waiting for the sync of the data volume
/// ([`Engine::change_access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promotion {
    /// Sync `u64` is in flight.
    Syncing(u64),
    /// The last sync failed: the next tick tries again.
    Retry,
}

#[derive(Clone, Copy, Debug)]
struct SlotInfo {
    owner: Owner,
    request: Request,
    wait: Wait,
    local: Local,
    remote: Remote,
    /// Regions were entered in the activity set (ended at completion or by the backlog).
    tracked: bool,
    /// Stream position everything before must be applied by the peer first
    /// (async), taken in link session `session` (0: not connected).
    after: Seq,
    session: u64,
    resync_region: Option<u64>,
    /// Submission order of application requests.
    ticket: u64,
}

impl SlotInfo {
    /// A checksum check from the peer ([`Engine::peer_check`]).
    fn is_check(&self) -> bool {
        self.owner == Owner::Peer
            && self.resync_region.is_some()
            && self.request.kind == OpKind::Read
    }

    const FREE: SlotInfo = SlotInfo {
        owner: Owner::Free,
        request: Request {
            kind: OpKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            fua: false,
        },
        wait: Wait::None,
        local: Local::Idle,
        remote: Remote::NotNeeded,
        tracked: false,
        after: 0,
        session: 0,
        resync_region: None,
        ticket: 0,
    };
}

#[derive(Clone, Copy, Debug)]
enum RemoteKind {
    Write {
        regions_start: u64,
        regions_end: u64,
        bytes: u64,
    },
    Flush,
    /// The remote half of a barrier before marks are cleared.
    Barrier,
    Resync {
        region: u64,
        bytes: u64,
    },
    /// The checksum of a resync region instead of its data.
    ResyncCheck {
        region: u64,
        bytes: u64,
    },
}

/// Whether application writes may pass earlier messages to the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fence {
    /// Yes, as far as this goes (see [`Engine::poll_action`]).
    Clear,
    /// No: the next message with a sequence number goes in order (the
    /// session's first, or one after an unsequenced message).
    NextSent,
    /// No, until the peer answered this message or a later one: sent in
    /// order, it arrived after everything before it.
    Until(Seq),
}

/// A barrier in flight: the local data volume is being synced and the peer
/// flushes its own; once both are done, the marks of `regions` go.
#[derive(Debug)]
struct Barrier {
    /// The id of its local sync.
    sync: u64,
    local_done: bool,
    /// The peer's flush (`None`: no peer part: it flushed when it left).
    remote: Option<Seq>,
    session: u64,
    regions: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
struct RemoteEntry {
    seq: Seq,
    /// The application request waiting for it; `None` for backlog and resync.
    slot: Option<Slot>,
    kind: RemoteKind,
    done: bool,
}

/// Most regions remembered as asked for from the peer.
const REQUESTED_MAX: usize = 64;

/// Most resync checksums on the wire at once (source): each makes the
/// target read one region, so at most 64 × 32 KiB = 2 MiB of reads there.
const CHECKS_IN_FLIGHT_MAX: usize = 64;

/// The per-device state machine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    params: EngineParams,
    journal: Journal,
    slots: Vec<SlotInfo>,
    free_app: Vec<Slot>,
    free_peer: Vec<Slot>,
    free_resync: Vec<Slot>,
    actions: VecDeque<Action>,
    waiting: VecDeque<Slot>,
    activity: ActivitySet,
    evicted: Vec<u64>,
    scratch: Vec<Slot>,
    now_ms: u64,
    /// Last time the peer answered anything, or the queue of unanswered
    /// messages became non-empty.
    remote_progress_ms: u64,
    /// This session's stall was reported.
    stall_reported: bool,
    connected: bool,
    /// Number of the current (or last) link session.
    session: u64,
    next_seq: Seq,
    /// Submission tickets of application requests so far.
    next_ticket: u64,
    /// Application writes waiting for an overlapping one (`Wait::Overlap`).
    overlap_waiters: usize,
    /// An application write finished while some waited for an overlap:
    /// the next `poll_action` looks at them.
    overlap_freed: bool,
    /// Whether writes may pass earlier messages (see [`Engine::poll_action`]).
    fence: Fence,
    /// This side has sent nothing but answers in this session: its answers
    /// to plain writes may pass each other.
    answers_only: bool,
    /// The peer of this session takes passing messages.
    peer_takes_passing: bool,
    /// What a write submitted now depends on (async): the last message of
    /// the stream that is not an application's write or flush still
    /// waiting for the peer. Those are sent before they complete (mwc, the
    /// fallback past the high water mark) and count only once the peer has
    /// answered: a write the application has not seen complete orders
    /// nothing after it, and depending on it would make the peer apply a
    /// busy device's writes one round of answers at a time.
    depends_on: Seq,
    remote: VecDeque<RemoteEntry>,
    backlog_bytes: u64,
    fallback: bool,
    resync: Option<ResyncSource>,
    /// The peer link's congestion window, bytes, as last reported.
    link_window: Option<u64>,
    /// Regions being read for resync: application writes to them wait.
    reading: Vec<u64>,
    target: TargetQueue,
    target_marks_epoch: Epoch,
    /// Source: no resync data is read before the marks of the regions to
    /// send are durable here (this epoch).
    source_marks_epoch: Epoch,
    /// Operations of an ended session still being applied locally: until
    /// they land, no resync read and no new operation may touch the disk.
    stale_peer_ops: usize,
    requested: Vec<u64>,
    stats: EngineStats,
    /// Draws data generation ids.
    gen_source: GenSource,
    /// The next write without a peer starts a new generation (set at start
    /// and whenever a link ends that may have given the peer the current
    /// one, cleared when it connects).
    new_generation_due: bool,
    /// The peer may hold the current generation: a session took it since
    /// it was drawn (or it was read from disk). A generation drawn alone
    /// that no session took since is this side's own: a link set up and
    /// dropped before the peer got it (a renegotiation) draws no other, so
    /// that short-lived set-ups do not push the generations the peer holds
    /// out of the history.
    current_shared: bool,
    /// Target: the source's generation and primary term, to take once the
    /// marks of the regions this side lacks are durable (the epoch).
    adopting: Option<(GenId, u64, Epoch)>,
    /// Target: the generation taken, to announce once durable.
    adopted: Option<(GenId, Epoch)>,
    /// Regions whose marks may go once a barrier covers them.
    clears: Clears,
    /// Id of the next local data sync.
    next_sync: u64,
    /// The barrier in flight, if any.
    barrier: Option<Barrier>,
    /// The next barrier needs no peer part (the peer flushed as it left).
    peer_flushed: bool,
    /// Target: checks found equal whose reads finished, waiting for a sync.
    checks_equal: Vec<Slot>,
    /// Target: the id of the data sync in flight for the checks of
    /// `checks_syncing`; once it is done, their regions count as received.
    check_sync: Option<u64>,
    /// Target: the checks the sync in flight covers.
    checks_syncing: Vec<Slot>,
    /// Target: checks a failed write spoiled, being answered (scratch).
    spoiled: Vec<Slot>,
    /// A refused write was logged since the access last changed.
    refusal_logged: bool,
    /// Becoming writable: the data volume is synced first; meanwhile map
    /// commits and application writes wait.
    promotion: Option<Promotion>,
    /// The highest primary term the peer has shown (its handshake, or a
    /// promotion while connected): this side's next promotion goes above.
    peer_term: u64,
    /// The peer was lost and this side may not write alone yet: writes wait
    /// (see [`Engine::peer_isolated`]).
    isolated: bool,
}

impl Engine {
    /// An engine over `map` (as loaded from disk) with the given
    /// parameters, holding no known data (tests and tools; devices use
    /// [`Engine::with_generations`]).
    ///
    /// # Panics
    /// If the map describes another size than `params.size_bytes`.
    pub fn new(params: EngineParams, map: StateMap) -> Engine {
        Engine::with_generations(params, map, Generations::none(), 1)
    }

    /// An engine over `map` and data generations `gens` (both as loaded
    /// from disk); new generation ids are drawn from `gen_seed` (random in
    /// production, fixed in simulations).
    ///
    /// # Panics
    /// If the map describes another size than `params.size_bytes`.
    pub fn with_generations(
        params: EngineParams,
        map: StateMap,
        gens: Generations,
        gen_seed: u64,
    ) -> Engine {
        assert_eq!(map.size_bytes(), params.size_bytes, "map of another device");
        // In-flight stages loaded from disk are crash leftovers: only a resync
        // may clear them, so they must not look like hot regions.
        let mut map = map;
        for region in 0..map.region_count() {
            if (CELL_WRITING..=CELL_ACTIVE).contains(&map.get(region)) {
                map.set(region, CELL_INCONSISTENT);
            }
        }
        let region_count = map.region_count();
        let total = params.slots_total();
        let app = params.slots_max as Slot;
        let peer = app + params.peer_slots_max as Slot;
        let in_flight_regions = (params.slots_max + params.peer_slots_max)
            * (params.io_len_max / REGION_SIZE_BYTES + 1) as usize;
        Engine {
            params,
            journal: Journal::new(map, gens),
            slots: vec![SlotInfo::FREE; total],
            free_app: (0..app).rev().collect(),
            free_peer: (app..peer).rev().collect(),
            free_resync: (peer..total as Slot).rev().collect(),
            actions: VecDeque::with_capacity(total * 3 + 8),
            waiting: VecDeque::with_capacity(total),
            activity: ActivitySet::new(
                params.activity_extent_regions,
                params.activity_regions,
                in_flight_regions.min(1 << 16),
                region_count,
            ),
            evicted: Vec::with_capacity(
                params.activity_regions + params.activity_extent_regions as usize,
            ),
            scratch: Vec::with_capacity(total),
            now_ms: 0,
            remote_progress_ms: 0,
            stall_reported: false,
            connected: false,
            session: 0,
            next_seq: 1,
            next_ticket: 0,
            overlap_waiters: 0,
            overlap_freed: false,
            fence: Fence::NextSent,
            answers_only: true,
            peer_takes_passing: false,
            depends_on: 0,
            remote: VecDeque::with_capacity(total * 2),
            backlog_bytes: 0,
            fallback: false,
            resync: None,
            link_window: None,
            reading: Vec::with_capacity(params.resync_slots_max),
            target: TargetQueue::new(params.peer_slots_max),
            target_marks_epoch: 0,
            source_marks_epoch: 0,
            stale_peer_ops: 0,
            requested: Vec::with_capacity(REQUESTED_MAX),
            stats: EngineStats::default(),
            gen_source: GenSource::new(gen_seed),
            new_generation_due: true,
            current_shared: true,
            adopting: None,
            adopted: None,
            clears: Clears::new(region_count, params.activity_regions),
            next_sync: 1,
            barrier: None,
            peer_flushed: false,
            checks_equal: Vec::with_capacity(params.peer_slots_max),
            check_sync: None,
            checks_syncing: Vec::with_capacity(params.peer_slots_max),
            spoiled: Vec::with_capacity(params.peer_slots_max),
            refusal_logged: false,
            promotion: None,
            peer_term: 0,
            isolated: false,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// The in-memory state map (a snapshot is a clone of it).
    pub fn map(&self) -> &StateMap {
        &self.journal.map
    }

    /// The request held by `slot` (for a resync slot: the region to read;
    /// for a peer slot: the operation to apply).
    pub fn request(&self, slot: Slot) -> &Request {
        &self.slots[slot as usize].request
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats;
        s.backlog_bytes = self.backlog_bytes;
        s.hwm_fallback_active = u64::from(self.fallback);
        s.resync_remaining = self.resync.as_ref().map_or(0, |r| r.remaining());
        s.resync_total = self.resync.as_ref().map_or(s.resync_total, |r| r.total);
        s.resync_target_remaining = self.journal.resync_cells();
        s.resync_failed_regions = self.resync.as_ref().map_or(0, |r| r.failed_count());
        s.activity_extents = self.activity.len() as u64;
        s.connected = u64::from(self.connected);
        s.isolated = u64::from(self.isolated);
        s.writes_held = self
            .waiting
            .iter()
            .filter(|&&slot| self.slots[slot as usize].wait == Wait::Isolated)
            .count() as u64;
        s
    }

    /// Whether a peer is connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether nothing is in flight: no request, no map write, no message to the peer.
    pub fn is_idle(&self) -> bool {
        !self.journal.in_flight()
            && !self.journal.has_dirty()
            && self.slots.iter().all(|s| s.owner == Owner::Free)
            && self.actions.is_empty()
            && self.remote.is_empty()
            && self.barrier.is_none()
            && self.clears.is_empty()
            && self.promotion.is_none()
    }

    /// The data generations as they are now (changes not yet durable included).
    pub fn generations(&self) -> Generations {
        self.journal.gens
    }

    /// The data generations as the state map holds them durably: what the
    /// handshake tells the peer (a crash returns to these).
    pub fn durable_generations(&self) -> Generations {
        self.journal.durable_generations()
    }

    /// The generations the map write in flight must put in the superblock,
    /// if it writes the superblock (valid after [`Action::PersistMap`]).
    pub fn flushing_generations(&self) -> Option<Generations> {
        self.journal.flushing_generations()
    }

    /// The driver changed what it records in the superblock: the next map
    /// write writes it; returns the epoch to wait for.
    pub fn touch_superblock(&mut self) -> Epoch {
        self.journal.touch_superblock();
        self.start_commit();
        self.journal.needed_all()
    }

    /// Sets what applications may do here: write (primary, or split for a
    /// drill) and read (not an async secondary). Requests already taken
    /// are not affected.
    pub fn set_access(&mut self, writable: bool, readable: bool) {
        self.params.writable = writable;
        self.params.readable = readable;
        self.refusal_logged = false;
    }

    /// Changes what applications may do here for a new `role`, as
    /// [`Engine::set_access`] (`readable`: not an async secondary), raises
    /// the primary term at a promotion to primary (not for a drill's
    /// split), and has the next map write record the role
    /// (the driver sets it in the superblock); returns the epoch after
    /// which that is durable.
    ///
    /// Becoming writable (promotion), the data volume is synced before
    /// anything else: what this copy received from its peer as secondary
    /// and holds only in a cache is then durable before the role is
    /// recorded and before the first write of the new primary. A power cut
    /// afterwards cannot take writes the old primary had acknowledged from
    /// the copy that now decides (CONSISTENCY.md, "durable means flushed").
    /// Meanwhile map commits and application writes wait; a failed sync is
    /// reported and tried again at the next tick. Promoted apart from the
    /// peer (a failover), the copy starts a new generation in that commit
    /// (as DRBD does at promotion): the old primary, back with data this
    /// copy lacks, is then behind it, not "the same data" whose marks win.
    pub fn change_access(&mut self, role: PairRole, readable: bool) -> Epoch {
        let writable = role.writable();
        let promote = writable && !self.params.writable;
        self.set_access(writable, readable);
        if !writable {
            self.promotion = None;
        } else if promote {
            self.sync_for_promotion();
            if role == PairRole::Primary {
                // Not a drill's split: its writes are discarded at rejoin.
                // Above every term the pair has shown this side: the peer
                // may have been promoted again within this session.
                let mut gens = self.journal.gens;
                gens.term = gens.term.max(self.peer_term) + 1;
                self.journal.set_generations(gens);
                if self.connected {
                    self.actions.push_back(Action::SendTerm { term: gens.term });
                }
            }
            if !self.connected {
                // A failover: this copy's data is the pair's from now on,
                // whatever the old primary holds that it lacks. Told apart
                // by a generation in the same commit as the role, before
                // `gmdctl primary` returns, whether or not it writes.
                self.draw_generation_if_due();
            }
        }
        let epoch = self.touch_superblock();
        self.resume_waiting();
        epoch
    }

    /// Starts a new generation if none was drawn since the peer may have
    /// taken the current one (this side is apart from it).
    fn draw_generation_if_due(&mut self) {
        if self.new_generation_due {
            self.new_generation_due = false;
            self.current_shared = false;
            let mut gens = self.journal.gens;
            gens.go_alone(self.gen_source.draw());
            self.journal.set_generations(gens);
        }
    }

    fn sync_for_promotion(&mut self) {
        let sync = self.next_sync;
        self.next_sync += 1;
        self.promotion = Some(Promotion::Syncing(sync));
        self.actions.push_back(Action::SyncData(sync));
    }

    /// The data volume sync of a promotion ended.
    fn promotion_synced(&mut self, result: Result<(), i32>) {
        match result {
            Ok(()) => {
                self.promotion = None;
                self.start_commit();
                self.resume_waiting();
            }
            Err(errno) => {
                tracing::error!(
                    errno,
                    "the data volume cannot be synced: the promotion waits (what this copy \
                     received must be durable before it writes as primary); trying again"
                );
                self.promotion = Some(Promotion::Retry);
            }
        }
    }

    /// Makes this copy the newest as it is (`gmdctl primary --force`): a
    /// new generation, and regions it had not received become stale, to be
    /// sent from here. Returns the epoch after which this is durable.
    pub fn force_new_generation(&mut self) -> Epoch {
        let mut gens = self.journal.gens;
        gens.go_alone(self.gen_source.draw());
        self.journal.set_generations(gens);
        self.new_generation_due = false;
        self.current_shared = false;
        for region in 0..self.journal.map.region_count() {
            if self.journal.map.get(region) == CELL_RESYNC {
                self.journal.set(region, CELL_STALE);
            }
        }
        self.start_commit();
        self.journal.needed_all()
    }

    /// Drops this side's own changes (a drill's writes, or the side that is
    /// not the master of a unify): its generation goes back to the one its
    /// marks count from, and its stale marks become inconsistent, so that
    /// the peer's data overwrites those regions at the next connection.
    /// Not while connected (then nothing changes and `None` is returned).
    /// Returns the epoch after which this is durable.
    pub fn discard_own_changes(&mut self) -> Option<Epoch> {
        if self.connected {
            return None;
        }
        let mut gens = self.journal.gens;
        gens.discard_own_changes();
        self.journal.set_generations(gens);
        self.new_generation_due = true;
        self.current_shared = true;
        for region in 0..self.journal.map.region_count() {
            if self.journal.map.get(region) == CELL_STALE {
                self.journal.set(region, CELL_INCONSISTENT);
            }
        }
        self.start_commit();
        Some(self.journal.needed_all())
    }

    /// Whether an application read could skip the engine and go straight
    /// to the data volume now: the device is readable and no region is
    /// waiting for resync data (reads are never ordered against writes, so
    /// nothing else about a read depends on the engine's state). Becomes
    /// false only in [`Engine::connect`] (as a resync target) and in
    /// [`Engine::resync_added`].
    pub fn direct_reads_allowed(&self) -> bool {
        self.params.readable && self.journal.resync_cells() == 0
    }

    /// Whether an application request can be submitted now.
    pub fn app_slot_available(&self) -> bool {
        !self.free_app.is_empty()
    }

    /// Whether an operation from the peer can be taken now.
    pub fn peer_slot_available(&self) -> bool {
        !self.free_peer.is_empty()
    }

    /// The next action for the driver, if any.
    ///
    /// Which messages may pass earlier ones on their way to the peer is
    /// decided here, in the order they are sent: an application write in
    /// sync or mwc mode that overlaps no earlier message the peer has not
    /// answered, with no unanswered message before it but writes, and
    /// nothing unsequenced (a `SendResyncAdd`, a `SendTerm`…) sent since
    /// an answer showed the peer has everything before it; and this side's
    /// answers to plain writes while it has sent nothing but answers in
    /// this session. The peer applies such a write on arrival, so a lost
    /// datagram holds up only its own write, not every one behind it.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.overlap_freed {
            self.overlap_freed = false;
            self.resume_overlaps();
        }
        let mut action = self.actions.pop_front()?;
        match &mut action {
            Action::SendWrite {
                seq,
                after,
                request,
                passing,
                ..
            } => {
                *passing = self.write_may_pass(*seq, *after, request);
                self.sequenced_sent(*seq);
            }
            Action::SendFlush { seq, .. }
            | Action::SendResync { seq, .. }
            | Action::SendResyncCheck { seq, .. } => self.sequenced_sent(*seq),
            Action::SendPrioritize { .. }
            | Action::SendResyncAdd { .. }
            | Action::SendAdopted { .. }
            | Action::SendTerm { .. } => {
                self.fence = Fence::NextSent;
                self.answers_only = false;
            }
            Action::Reply { passing, .. } => {
                *passing = *passing && self.answers_only && self.peer_takes_passing;
            }
            _ => {}
        }
        Some(action)
    }

    /// A message with a sequence number goes to the peer.
    fn sequenced_sent(&mut self, seq: Seq) {
        self.answers_only = false;
        if self.fence == Fence::NextSent {
            self.fence = Fence::Until(seq);
        }
    }

    /// Whether the write sent as `seq` may pass earlier messages (see
    /// [`Engine::poll_action`]).
    fn write_may_pass(&self, seq: Seq, after: Seq, request: &Request) -> bool {
        if !self.connected
            || !self.peer_takes_passing
            || self.params.mode == Mode::Async
            || after != 0
            || self.fence != Fence::Clear
        {
            return false;
        }
        let regions = self.regions(request);
        self.remote
            .iter()
            .take_while(|e| e.seq < seq)
            .filter(|e| !e.done)
            .all(|e| match e.kind {
                RemoteKind::Write {
                    regions_start,
                    regions_end,
                    ..
                } => regions_end <= regions.start || regions.end <= regions_start,
                _ => false,
            })
    }

    /// Whether an earlier application write overlapping `slot`'s has not
    /// finished. Overlapping writes go one after the other, so that both
    /// copies apply them in the same order: issued together, the local disk
    /// would keep whichever of them landed last, and the peer the one sent
    /// last (DRBD waits for conflicting writes the same way).
    fn waits_for_overlap(&self, slot: Slot) -> bool {
        let me = &self.slots[slot as usize];
        let (start, end) = (
            me.request.offset_bytes,
            me.request.offset_bytes + me.request.len_bytes,
        );
        self.slots[..self.params.slots_max]
            .iter()
            .enumerate()
            .any(|(i, o)| {
                i != slot as usize
                    && o.owner == Owner::App
                    && o.ticket < me.ticket
                    && o.request.kind.changes_data()
                    && o.request.offset_bytes < end
                    && start < o.request.offset_bytes + o.request.len_bytes
            })
    }

    /// Admits the writes waiting for an overlapping one that has finished,
    /// in the order they were submitted (waiting ones keep their order).
    fn resume_overlaps(&mut self) {
        let mut count = self.waiting.len();
        while count > 0 {
            count -= 1;
            let slot = self.waiting.pop_front().expect("counted");
            if self.slots[slot as usize].wait == Wait::Overlap && !self.waits_for_overlap(slot) {
                self.overlap_waiters -= 1;
                self.slots[slot as usize].wait = Wait::None;
                self.advance(slot);
            } else {
                self.waiting.push_back(slot);
            }
        }
    }

    /// Pages the current map write must write (valid after [`Action::PersistMap`]).
    pub fn flushing_pages(&self) -> &[u64] {
        self.journal.flushing()
    }

    /// Whether what a handshake reads of this copy is on disk as in memory:
    /// the generations (one drawn for a write alone is durable before that
    /// write), and every region this copy no longer lacks (a `0x6` mark
    /// cleared as the resync brought its data; the clear rides a later
    /// commit). Until then a handshake must wait: a crash would bring back
    /// marks the peer was told were gone (with the peer lacking the same
    /// regions, neither side could be the source), and a generation the
    /// peer never heard of would read as a divergence later.
    pub fn facts_durable(&self) -> bool {
        let durable = self.journal.durable();
        durable >= self.journal.lacks_cleared_at() && durable >= self.journal.needed_generations()
    }

    /// Starts the map write that makes [`Engine::facts_durable`] true and
    /// returns the epoch to wait for.
    pub fn settle_facts(&mut self) -> Epoch {
        self.start_commit();
        self.journal
            .lacks_cleared_at()
            .max(self.journal.needed_generations())
    }

    /// The last epoch known durable.
    pub fn durable_epoch(&self) -> Epoch {
        self.journal.durable()
    }

    /// Whether a map write failed (writes are refused until restart).
    pub fn map_failed(&self) -> bool {
        self.journal.failed
    }

    /// Async bytes completed but not yet acknowledged by the peer.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes
    }

    /// The regions this side needs resynchronised, one bit per region (for
    /// the resync handshake): every non-zero cell but the hot ones, which
    /// the peer has acknowledged (see [`StateMap::resync_bits`]).
    pub fn dirty_bits(&self) -> Vec<u8> {
        self.journal.map.resync_bits(true)
    }

    /// The hot regions (every write acknowledged by the peer of this
    /// engine's sessions), one bit per region: identical on that peer
    /// unless its device restarted since.
    pub fn hot_bits(&self) -> Vec<u8> {
        self.journal.map.hot_bits()
    }

    // ----- application requests -------------------------------------------

    /// Takes a new application request; returns its slot.
    ///
    /// # Panics
    /// If no application slot is free ([`Engine::app_slot_available`]).
    pub fn submit(&mut self, request: Request) -> Slot {
        let slot = self.free_app.pop().expect("an application slot is free");
        self.next_ticket += 1;
        self.slots[slot as usize] = SlotInfo {
            owner: Owner::App,
            ticket: self.next_ticket,
            request,
            after: self.depends_on,
            session: if self.connected { self.session } else { 0 },
            ..SlotInfo::FREE
        };
        if let Err(e) = self.check(&request) {
            self.finish_app(slot, Err(e));
            return slot;
        }
        self.advance(slot);
        slot
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
        Ok(())
    }

    fn regions(&self, request: &Request) -> Range<u64> {
        if request.kind == OpKind::Flush {
            return 0..0;
        }
        self.journal
            .map
            .regions_of(request.offset_bytes, request.len_bytes)
    }

    /// Moves an application request as far as it can go now.
    fn advance(&mut self, slot: Slot) {
        let info = self.slots[slot as usize];
        let request = info.request;
        if request.kind == OpKind::Flush {
            self.dispatch_flush(slot);
            return;
        }
        if !self.params.readable {
            let what = if request.kind.changes_data() {
                self.stats.writes_refused += 1;
                "write"
            } else {
                "read"
            };
            if !self.refusal_logged {
                // Once per role, as for a readable secondary below.
                self.refusal_logged = true;
                tracing::warn!(
                    "a {what} was refused: this copy is secondary (an async secondary serves \
                     no application I/O: use the primary, or promote this side with 'gmdctl primary')"
                );
            }
            self.finish_app(slot, Err(EngineError::Secondary));
            return;
        }
        if request.kind.changes_data() && self.promotion.is_some() {
            self.park(slot, Wait::Promotion);
            return;
        }
        if request.kind.changes_data() && !self.params.writable {
            self.stats.writes_refused += 1;
            if !self.refusal_logged {
                // Once per role: an application writing here is told EPERM
                // on every write; the log says why once.
                self.refusal_logged = true;
                tracing::warn!(
                    "a write was refused: this copy is secondary (write on the primary, \
                     or promote this side with 'gmdctl primary')"
                );
            }
            self.finish_app(slot, Err(EngineError::ReadOnly));
            return;
        }
        let regions = self.regions(&request);
        // Target of a resync: this region's data has not arrived yet.
        if self.journal.resync_cells() > 0 {
            if let Some(region) = regions
                .clone()
                .find(|&r| self.journal.map.get(r) == CELL_RESYNC)
            {
                if !self.connected {
                    self.finish_app(slot, Err(EngineError::Unavailable));
                    return;
                }
                self.park(slot, Wait::ResyncTarget);
                self.ask_for(region);
                return;
            }
        }
        if !request.kind.changes_data() {
            self.issue_local(slot);
            return;
        }
        if self.waits_for_overlap(slot) {
            self.stats.overlap_waits += 1;
            self.park(slot, Wait::Overlap);
            return;
        }
        if self.journal.failed {
            self.finish_app(slot, Err(EngineError::MapFailed));
            return;
        }
        // Source of a resync: the region is being read; wait until its data is queued.
        if regions.clone().any(|r| self.reading.contains(&r)) {
            self.park(slot, Wait::ResyncRead);
            return;
        }
        // Isolated: the write waits, admitted once the link returns or the
        // hold is released (no generation drawn, no stale mark made).
        if !self.connected && self.isolated {
            self.park(slot, Wait::Isolated);
            return;
        }
        // Writing without the peer: a new generation first, durable before
        // the write lands, so that a peer promoted meanwhile and this side
        // are told apart (divergence) rather than one silently overwritten.
        if !self.connected {
            self.draw_generation_if_due();
        }
        // Write intent (connected) or stale mark (standalone).
        for region in regions.clone() {
            self.clears.touched(region);
            self.activity.begin(region, self.now_ms);
            let cell = self.journal.map.get(region);
            if self.connected {
                if cell == CELL_CONSISTENT {
                    self.journal.set(region, CELL_WRITING);
                    self.warm_extent(region);
                } else if cell == CELL_ACTIVE {
                    self.journal.set(region, CELL_WRITING);
                }
            } else if cell != CELL_STALE {
                self.journal.set(region, CELL_STALE);
            }
        }
        self.slots[slot as usize].tracked = true;
        if self.activity.over_capacity() {
            self.evict_idle();
        }
        let mut need = self.journal.needed(regions);
        if !self.connected {
            need = need.max(self.journal.needed_generations());
        }
        if need > self.journal.durable() {
            self.stats.writes_waited_for_map += 1;
            self.park(slot, Wait::Epoch(need));
            self.start_commit();
            return;
        }
        self.dispatch_write(slot);
    }

    /// A write to clean `region` pays a map commit: the other clean regions
    /// of its extent become hot in that same commit (same page), so that
    /// later writes anywhere in the extent pay none. They hold no write,
    /// so their marks claim nothing the peer lacks.
    fn warm_extent(&mut self, region: u64) {
        for r in self.activity.extent_of(region) {
            if r != region && self.journal.map.get(r) == CELL_CONSISTENT {
                self.journal.set(r, CELL_ACTIVE);
            }
        }
    }

    fn park(&mut self, slot: Slot, wait: Wait) {
        if wait == Wait::Overlap {
            self.overlap_waiters += 1;
        }
        self.slots[slot as usize].wait = wait;
        self.waiting.push_back(slot);
    }

    fn ask_for(&mut self, region: u64) {
        if !self.requested.contains(&region) {
            if self.requested.len() == REQUESTED_MAX {
                self.requested.remove(0);
            }
            self.requested.push(region);
            self.actions.push_back(Action::SendPrioritize { region });
        }
    }

    fn dispatch_write(&mut self, slot: Slot) {
        if !self.connected {
            // The peer will not get this write: its regions are stale.
            self.lose(slot);
            self.issue_local(slot);
            return;
        }
        match self.params.mode {
            Mode::Sync => self.send_write(slot),
            Mode::Mwc => {
                self.issue_local(slot);
                self.send_write(slot);
            }
            Mode::Async if self.fallback => {
                self.issue_local(slot);
                self.send_write(slot);
            }
            Mode::Async => self.issue_local(slot),
        }
    }

    fn dispatch_flush(&mut self, slot: Slot) {
        self.issue_local(slot);
        // Async, a flush is local: the peer gets the backlog in its own
        // time. On a copy that no longer takes writes (a primary being
        // demoted flushes before the other side is promoted) it goes to the
        // peer too and completes once the peer holds everything before it
        // durably: the new primary then has, on its platters, all that the
        // old one acknowledged, and nothing of it is still on its way.
        if self.connected && (self.params.mode != Mode::Async || !self.params.writable) {
            let seq = self.push_remote(Some(slot), RemoteKind::Flush);
            self.slots[slot as usize].remote = Remote::Pending(seq);
            self.stats.remote_flushes += 1;
            self.actions
                .push_back(Action::SendFlush { seq, awaited: true });
        }
    }

    fn issue_local(&mut self, slot: Slot) {
        let info = &mut self.slots[slot as usize];
        assert!(
            info.owner != Owner::Free && info.local == Local::Idle,
            "slot {slot}: local operation issued in state {:?}/{:?}",
            info.owner,
            info.local
        );
        info.local = Local::InFlight;
        info.wait = Wait::None;
        let request = info.request;
        if let Some(cells) = self.stage_cells(&request) {
            self.set_stage(cells, CELL_WRITING);
        }
        self.actions.push_back(Action::Local(slot));
    }

    /// Regions whose cell shows the stage of a mirrored write, if any.
    fn stage_cells(&self, request: &Request) -> Option<Range<u64>> {
        (self.connected && request.kind.changes_data()).then(|| self.regions(request))
    }

    /// Shows a write's stage in its cells (in-flight values only; stale and
    /// resync marks stay).
    fn set_stage(&mut self, regions: Range<u64>, value: CellValue) {
        for region in regions {
            let cell = self.journal.map.get(region);
            if (CELL_WRITING..=CELL_ACTIVE).contains(&cell) {
                self.journal.set(region, value);
            }
        }
    }

    fn push_remote(&mut self, slot: Option<Slot>, kind: RemoteKind) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        if slot.is_none() {
            self.depends_on = seq;
        }
        if self.remote.is_empty() {
            // Answered messages leave the front at once, so an empty queue
            // means nothing was waiting: the stall clock starts now.
            self.remote_progress_ms = self.now_ms;
        }
        self.remote.push_back(RemoteEntry {
            seq,
            slot,
            kind,
            done: false,
        });
        seq
    }

    /// The dependency to send with a write: only within the session it was
    /// taken in (a write submitted before this session depends on nothing
    /// the peer has not already got through resync).
    fn after_of(&self, info: &SlotInfo) -> Seq {
        if self.params.mode == Mode::Async && info.session == self.session {
            info.after
        } else {
            0
        }
    }

    fn send_write(&mut self, slot: Slot) {
        let request = self.slots[slot as usize].request;
        assert!(
            self.slots[slot as usize].owner == Owner::App
                && !matches!(self.slots[slot as usize].remote, Remote::Pending(_)),
            "slot {slot}: sent twice"
        );
        let regions = self.regions(&request);
        let seq = self.push_remote(
            Some(slot),
            RemoteKind::Write {
                regions_start: regions.start,
                regions_end: regions.end,
                bytes: request.len_bytes,
            },
        );
        let after = self.after_of(&self.slots[slot as usize]);
        self.slots[slot as usize].remote = Remote::Pending(seq);
        self.stats.remote_writes += 1;
        self.stats.remote_write_bytes += request.len_bytes;
        self.actions.push_back(Action::SendWrite {
            slot,
            seq,
            after,
            request,
            passing: false,
            awaited: true,
        });
    }

    /// Completes an application request when every part of it is done.
    fn try_complete(&mut self, slot: Slot) {
        let info = self.slots[slot as usize];
        let Local::Done(local) = info.local else {
            return;
        };
        if matches!(info.remote, Remote::Pending(_)) || matches!(info.wait, Wait::Acknowledge(_)) {
            return;
        }
        // Isolated: a write the peer did not get is not acknowledged until
        // the link returns or the hold is released.
        if self.isolated && !self.connected && info.remote == Remote::Lost {
            if info.wait != Wait::Isolated {
                self.park(slot, Wait::Isolated);
            }
            return;
        }
        let regions = self.regions(&info.request);
        if info.request.kind.changes_data() && info.tracked && info.remote != Remote::Backlog {
            self.end_regions(regions.clone(), info.remote == Remote::Lost);
        }
        if local.is_err() && info.request.kind.changes_data() {
            // The local copy may be wrong where the peer's is right: keep the
            // regions marked as inconsistent, out of reach of lazy cleaning.
            self.keep_marked(regions.clone());
            for region in regions.clone() {
                if self.journal.map.get(region) != CELL_STALE {
                    self.journal.set(region, CELL_INCONSISTENT);
                }
                // Resync data read before this write is on its way: its
                // confirmation must not clear the mark, the region goes again.
                if let Some(rs) = self.resync.as_mut() {
                    if rs.busy.get(region) {
                        rs.resend.set(region);
                    }
                }
            }
        }
        if info.remote == Remote::Lost && local.is_ok() {
            // Only this side has the write. Until its regions are stale on
            // disk, a crash would find just the intent mark ("inconsistent"),
            // which a handshake may settle in the peer's favour, losing an
            // acknowledged write: acknowledge it once the mark is durable.
            if self.journal.failed {
                self.finish_app(slot, Err(EngineError::MapFailed));
                return;
            }
            let need = self.journal.needed(regions);
            if need > self.journal.durable() {
                self.park(slot, Wait::Acknowledge(need));
                self.start_commit();
                return;
            }
        }
        self.finish_app(slot, local.map_err(EngineError::Io));
    }

    /// The writes of a finished request leave their regions.
    fn end_regions(&mut self, regions: Range<u64>, lost: bool) {
        for region in regions {
            let left = self.activity.end(region, self.now_ms);
            let cell = self.journal.map.get(region);
            if lost {
                self.mark_region_stale(region);
            } else if left == 0 && (CELL_WRITING..=CELL_QUEUED).contains(&cell) {
                self.journal.set(region, CELL_ACTIVE);
            }
        }
    }

    fn finish_app(&mut self, slot: Slot, result: Result<(), EngineError>) {
        if self.slots[slot as usize].request.kind.changes_data() && self.overlap_waiters > 0 {
            self.overlap_freed = true;
        }
        self.slots[slot as usize] = SlotInfo::FREE;
        self.free_app.push(slot);
        self.actions.push_back(Action::Complete(slot, result));
    }

    // ----- results of actions ---------------------------------------------

    /// Reports the end of the local operation of `slot` (`Err(errno)` on failure).
    ///
    /// # Panics
    /// If `slot` had no local operation in flight.
    pub fn local_done(&mut self, slot: Slot, result: Result<(), i32>) {
        let info = self.slots[slot as usize];
        assert_eq!(
            info.local,
            Local::InFlight,
            "slot {slot} had no local operation"
        );
        if info.is_check() {
            // A check reported without its comparison: taken as different
            // (the data is sent), never as the same.
            self.check_done(slot, result.map(|()| false));
            return;
        }
        self.slots[slot as usize].local = Local::Done(result);
        match info.owner {
            Owner::App => self.app_local_done(slot, result),
            Owner::Peer => self.peer_local_done(slot, result),
            Owner::Resync => self.resync_read_done(slot, result),
            Owner::Free => unreachable!("free slots have no operation"),
        }
    }

    fn app_local_done(&mut self, slot: Slot, result: Result<(), i32>) {
        let info = self.slots[slot as usize];
        let request = info.request;
        if self.connected
            && self.params.mode == Mode::Async
            && info.remote == Remote::NotNeeded
            && result.is_ok()
        {
            if request.kind == OpKind::Flush {
                // A barrier in the stream, in completion order; nobody waits for it.
                self.push_remote(None, RemoteKind::Flush);
                let seq = self.next_seq - 1;
                self.stats.remote_flushes += 1;
                self.actions.push_back(Action::SendFlush {
                    seq,
                    awaited: false,
                });
            } else if request.kind.changes_data() {
                if !self.fallback && self.backlog_bytes + request.len_bytes <= self.params.hwm_bytes
                {
                    let regions = self.regions(&request);
                    let seq = self.push_remote(
                        None,
                        RemoteKind::Write {
                            regions_start: regions.start,
                            regions_end: regions.end,
                            bytes: request.len_bytes,
                        },
                    );
                    self.backlog_bytes += request.len_bytes;
                    self.stats.remote_writes += 1;
                    self.stats.remote_write_bytes += request.len_bytes;
                    self.set_stage(regions, CELL_QUEUED);
                    self.slots[slot as usize].remote = Remote::Backlog;
                    let after = self.after_of(&info);
                    self.actions.push_back(Action::SendWrite {
                        slot,
                        seq,
                        after,
                        request,
                        passing: false,
                        awaited: false,
                    });
                } else {
                    // High water mark: this write and those after it wait
                    // for the peer until the backlog is zero.
                    if !self.fallback {
                        self.fallback = true;
                        self.stats.hwm_fallbacks += 1;
                    }
                    self.send_write(slot);
                }
            }
        } else if let Some(regions) = self.stage_cells(&request) {
            if matches!(info.remote, Remote::Pending(_)) {
                self.set_stage(regions, CELL_LOCAL_DONE);
            }
        }
        self.try_complete(slot);
    }

    /// Reports the peer's answer to message `seq`.
    pub fn remote_done(&mut self, seq: Seq, result: Result<(), EngineError>) {
        if !self.connected {
            return;
        }
        let Some(front) = self.remote.front() else {
            return;
        };
        let Some(index) = seq.checked_sub(front.seq).map(|i| i as usize) else {
            return;
        };
        let Some(entry) = self.remote.get_mut(index) else {
            return;
        };
        if entry.done {
            return;
        }
        entry.done = true;
        let entry = *entry;
        if let Fence::Until(first) = self.fence
            && seq >= first
        {
            // Sent in order after whatever closed the fence: the peer has
            // taken that.
            self.fence = Fence::Clear;
        }
        if entry.slot.is_some() {
            // The peer has it: what the application submits from now on
            // may depend on it (see `depends_on`).
            self.depends_on = self.depends_on.max(seq);
            if self.backlog_bytes == 0 {
                // Caught up. (A write larger than the high water mark
                // falls back with nothing in the backlog, and no backlog
                // answer would end the fallback.)
                self.fallback = false;
            }
        }
        self.remote_progress_ms = self.now_ms;
        if result.is_err() {
            self.stats.remote_failures += 1;
        }
        match (entry.kind, entry.slot) {
            (RemoteKind::Write { .. } | RemoteKind::Flush, Some(slot)) => {
                let info = self.slots[slot as usize];
                if result.is_err() {
                    if let RemoteKind::Write {
                        regions_start,
                        regions_end,
                        ..
                    } = entry.kind
                    {
                        self.mark_stale(regions_start..regions_end);
                    }
                }
                self.slots[slot as usize].remote = if result.is_ok() {
                    Remote::Done
                } else {
                    Remote::Lost
                };
                if info.local == Local::Idle {
                    // sync: the peer has it, now the local copy.
                    self.issue_local(slot);
                    if let Some(regions) = self.stage_cells(&info.request) {
                        self.set_stage(regions, CELL_REMOTE_DONE);
                    }
                } else {
                    self.try_complete(slot);
                }
            }
            (
                RemoteKind::Write {
                    regions_start,
                    regions_end,
                    bytes,
                },
                None,
            ) => {
                self.backlog_bytes -= bytes;
                self.end_regions(regions_start..regions_end, result.is_err());
                if self.backlog_bytes == 0 {
                    self.fallback = false;
                }
            }
            (RemoteKind::Flush, None) => {}
            (RemoteKind::Barrier, _) => self.barrier_remote_done(seq, result.is_ok()),
            (RemoteKind::Resync { region, bytes }, _) => {
                self.resync_confirmed(region, bytes, result)
            }
            (RemoteKind::ResyncCheck { region, bytes }, _) => {
                self.resync_checked(region, bytes, result)
            }
        }
        while self.remote.front().is_some_and(|e| e.done) {
            self.remote.pop_front();
        }
        self.pump_resync();
    }

    /// The peer will never get this write: mark its regions stale (the intent
    /// mark already on disk covers them until the stale mark is).
    fn lose(&mut self, slot: Slot) {
        let regions = self.regions(&self.slots[slot as usize].request);
        self.mark_stale(regions);
        self.slots[slot as usize].remote = Remote::Lost;
    }

    fn mark_stale(&mut self, regions: Range<u64>) {
        for region in regions {
            self.mark_region_stale(region);
        }
    }

    /// The peer lost a write to `region`: it is stale here and goes again.
    /// Resync data or a checksum of the region read before that write may
    /// be on its way: its confirmation describes the peer's copy before the
    /// loss, so it must not clear the region; it is sent again after it.
    fn mark_region_stale(&mut self, region: u64) {
        if let Some(rs) = self.resync.as_mut() {
            if rs.busy.get(region) {
                rs.resend.set(region);
            }
        }
        if self.journal.map.get(region) != CELL_STALE {
            self.journal.set(region, CELL_STALE);
            self.resync_add(region);
        }
    }

    /// A region became stale while a peer is connected (a write that was
    /// issued before the link came up, or one the peer failed): send it.
    fn resync_add(&mut self, region: u64) {
        if !self.connected {
            return;
        }
        let regions = self.journal.map.region_count();
        let added = self
            .resync
            .get_or_insert_with(|| ResyncSource::new(RegionBits::new(regions)))
            .add(region);
        if added {
            // The peer did not get it in the handshake's set: tell it.
            self.actions.push_back(Action::SendResyncAdd { region });
        }
    }

    /// Reports the end of map write `epoch`.
    ///
    /// On failure the pages stay marked in memory, every write waiting for the
    /// map fails with [`EngineError::MapFailed`], and so do later writes.
    ///
    /// # Panics
    /// If `epoch` is not the map write in flight.
    pub fn map_written(&mut self, epoch: Epoch, result: Result<(), i32>) {
        let pages = self.journal.flushing().len() as u64;
        self.journal.finish(epoch, result.is_ok());
        if result.is_ok() {
            self.stats.map_commits += 1;
            self.stats.map_pages_written += pages;
        }
        self.resume_waiting();
        self.issue_peer_ops();
        self.adopt_once_marked();
        self.announce_adoption();
        self.pump_resync();
        self.start_commit();
    }

    fn start_commit(&mut self) {
        if self.journal.failed || self.promotion.is_some() {
            return;
        }
        if let Some(epoch) = self.journal.start() {
            self.actions.push_back(Action::PersistMap(epoch));
        }
    }

    /// Re-examines every waiting request.
    fn resume_waiting(&mut self) {
        let mut count = self.waiting.len();
        while count > 0 {
            count -= 1;
            let slot = self.waiting.pop_front().expect("counted");
            let info = self.slots[slot as usize];
            match info.wait {
                Wait::Epoch(_) | Wait::Acknowledge(_) if self.journal.failed => {
                    self.finish_app(slot, Err(EngineError::MapFailed));
                }
                Wait::Acknowledge(need) if need <= self.journal.durable() => {
                    self.finish_app(slot, Ok(()));
                }
                Wait::Epoch(need) if need <= self.journal.durable() => {
                    self.slots[slot as usize].wait = Wait::None;
                    self.dispatch_write(slot);
                }
                Wait::ResyncRead | Wait::ResyncTarget => {
                    self.slots[slot as usize].wait = Wait::None;
                    self.advance(slot);
                }
                Wait::Promotion if self.promotion.is_none() => {
                    // Not admitted yet: as if submitted now.
                    self.slots[slot as usize].wait = Wait::None;
                    self.slots[slot as usize].after = self.depends_on;
                    self.slots[slot as usize].session =
                        if self.connected { self.session } else { 0 };
                    self.advance(slot);
                }
                Wait::Isolated if !self.isolated || self.connected => {
                    self.slots[slot as usize].wait = Wait::None;
                    if info.local == Local::Idle {
                        // Not admitted yet: as if submitted now.
                        self.slots[slot as usize].after = self.depends_on;
                        self.slots[slot as usize].session =
                            if self.connected { self.session } else { 0 };
                        self.advance(slot);
                    } else {
                        self.try_complete(slot);
                    }
                }
                _ => self.waiting.push_back(slot),
            }
        }
    }

    // ----- the link -------------------------------------------------------

    /// A peer is connected: mirroring starts, with `connection.role` in
    /// resync (a bare [`ResyncRole`] converts: a peer holding no known data).
    ///
    /// # Panics
    /// If a peer is already connected, or the bitmap is too short.
    pub fn connect(&mut self, connection: impl Into<Connection>) {
        let Connection {
            role,
            peer_current,
            stale_at_handshake,
            source_current,
            resync_checksums,
            peer_term,
            passing,
        } = connection.into();
        assert!(!self.connected, "already connected");
        self.peer_term = self.peer_term.max(peer_term);
        // Of the same data, both take the higher term; a target takes the
        // source's with its generation (terms count promotions within one
        // lineage: a higher one on a copy that then received another
        // lineage says nothing about it).
        if matches!(role, ResyncRole::None) && peer_term > self.journal.gens.term {
            let mut gens = self.journal.gens;
            gens.term = peer_term;
            self.journal.set_generations(gens);
        }
        self.connected = true;
        self.session += 1;
        // The session's first message goes in order: the peer numbers the
        // session from it.
        self.fence = Fence::NextSent;
        self.answers_only = true;
        self.peer_takes_passing = passing;
        self.stall_reported = false;
        self.new_generation_due = false;
        self.peer_flushed = false;
        self.remote_progress_ms = self.now_ms;
        // Sequence numbers keep growing across sessions, so that a late
        // answer from an earlier session can never match a new message.
        self.target.reset();
        self.requested.clear();
        let regions = self.journal.map.region_count();
        let bits_of = |bits: &[u8]| {
            assert!(
                bits.len() as u64 >= regions.div_ceil(8),
                "resync bitmap too short"
            );
            let mut set = RegionBits::new(regions);
            for r in 0..regions {
                if bits[(r / 8) as usize] & (1 << (r % 8)) != 0 {
                    set.set(r);
                }
            }
            set
        };
        if role != ResyncRole::None {
            self.stats.resyncs += 1;
        }
        match role {
            ResyncRole::None => {
                // A generation drawn after the handshake read this side (a
                // write alone waiting for it) is not the pair's: set the
                // link up again, as for a write alone.
                let drawn_since =
                    self.journal.gens.current != self.journal.durable_generations().current;
                if self.wrote_alone(stale_at_handshake) || drawn_since {
                    self.actions.push_back(Action::Renegotiate);
                }
                // Same data on both sides: marks no longer count from an
                // older generation.
                let mut gens = self.journal.gens;
                self.current_shared = gens.current == peer_current;
                if gens.current == peer_current && gens.bitmap != 0 {
                    gens.bitmap = 0;
                    self.journal.set_generations(gens);
                }
            }
            ResyncRole::Source(bits) => {
                // The target takes the generation the handshake read here;
                // one drawn since (a write alone after the handshake) would
                // leave the two copies' data under different names. Set
                // the link up again: the next handshake reads this one.
                if source_current != crate::generations::GEN_NONE
                    && self.journal.gens.current != source_current
                {
                    self.actions.push_back(Action::Renegotiate);
                    self.start_commit();
                    return;
                }
                // The target takes this side's generation.
                self.current_shared = true;
                let mut set = bits_of(&bits);
                // Regions that became stale after the handshake's snapshot go
                // too. The target knows only the handshake's set: it is told
                // of these before anything else of this session, so that it
                // marks them before any later write lands (async: a write
                // completed here after one of theirs depends on it).
                for run in self.journal.map.dirty_region_runs() {
                    for r in run {
                        if self.journal.map.get(r) == CELL_STALE && !set.get(r) {
                            set.set(r);
                            self.actions.push_back(Action::SendResyncAdd { region: r });
                        }
                    }
                }
                // Keep every region to send marked here too, so that a crash
                // of this side during the resync still covers them. (0x6
                // means "data missing here", which is the target's mark.)
                // Durably before any of it is read: the target clears its
                // own mark once the data is on its platters, and this copy's
                // may still be in its disk cache (a region marked only on
                // the target, such as one an operation of an ended session
                // wrote here after the link went): a power cut here must
                // not leave the two copies different with neither map
                // saying so.
                let mut next = set.next_from(0);
                while let Some(r) = next {
                    let cell = self.journal.map.get(r);
                    if cell == CELL_CONSISTENT || cell == CELL_ACTIVE {
                        self.journal.set(r, CELL_INCONSISTENT);
                    }
                    next = set.next_from(r + 1);
                }
                self.source_marks_epoch = self.journal.needed_all();
                self.stats.resync_total = set.count();
                if set.count() > 0 {
                    let mut rs = ResyncSource::new(set);
                    rs.checks = resync_checksums;
                    self.resync = Some(rs);
                } else {
                    self.actions.push_back(Action::ResyncDone);
                }
            }
            ResyncRole::Target(bits) => {
                let set = bits_of(&bits);
                // The target's stale regions at the handshake are in the set
                // and discarded by the plan (the source's data overwrites
                // them). One more now was written alone since, and its data
                // must not be overwritten by the source's. Set the link up
                // again instead; the marks stay.
                if self.wrote_alone(stale_at_handshake) {
                    self.actions.push_back(Action::Renegotiate);
                    self.start_commit();
                    return;
                }
                let mut next = set.next_from(0);
                let mut count = 0;
                while let Some(r) = next {
                    if self.journal.map.get(r) != CELL_RESYNC {
                        self.journal.set(r, CELL_RESYNC);
                    }
                    count += 1;
                    next = set.next_from(r + 1);
                }
                self.stats.resync_target_total = count;
                // This copy takes the source's generation once the marks of
                // every region it still lacks are durable, in a later map
                // write: an interrupted resync then resumes from those
                // marks. Not in the same write: a crash tears a map write
                // page by page, and a superblock naming the source's data
                // over a page still holding this side's stale marks would
                // make those look like writes of the source's generation
                // the source lacks (its discarded changes sent back).
                self.current_shared = true;
                // Received data is applied only once the marks are durable.
                self.target_marks_epoch = self.journal.needed_all();
                self.adopting = Some((peer_current, peer_term, self.target_marks_epoch));
                if count == 0 {
                    self.actions.push_back(Action::ResyncDone);
                }
            }
        }
        // Hot regions left from earlier sessions that this one did not
        // resend are identical on the peer: their marks may go (behind a
        // barrier, like every clear).
        for run in self.journal.map.dirty_region_runs() {
            for r in run {
                if self.journal.map.get(r) == CELL_ACTIVE && !self.activity.contains(r) {
                    self.clears.queue(r);
                }
            }
        }
        // The link is back: held writes complete (their regions are stale,
        // in this session's resync) and new ones are mirrored.
        if self.isolated {
            self.isolated = false;
            self.resume_waiting();
        }
        self.start_commit();
        self.adopt_once_marked();
        self.announce_adoption();
        self.pump_resync();
        self.pump_barrier();
    }

    /// The peer was promoted, while connected, with primary `term`: this
    /// side's next promotion goes above it (within one session, a
    /// promotion's term reaches the peer only so).
    pub fn peer_promoted(&mut self, term: u64) {
        self.peer_term = self.peer_term.max(term);
    }

    /// Target: takes the source's generation once the marks of what this
    /// side lacks are durable (see [`Engine::connect`]).
    fn adopt_once_marked(&mut self) {
        if let Some((current, term, epoch)) = self.adopting {
            if self.connected && self.journal.durable() >= epoch && !self.journal.failed {
                self.adopting = None;
                let mut gens = self.journal.gens;
                gens.adopt(current);
                gens.term = term;
                self.journal.set_generations(gens);
                self.start_commit();
                self.adopted = Some((current, self.journal.needed_all()));
            }
        }
    }

    /// Whether more regions are stale than the handshake found. On a side
    /// that is not the resync source that means it wrote alone after the
    /// handshake read its map: only a new handshake can decide who keeps what.
    fn wrote_alone(&self, stale_at_handshake: u64) -> bool {
        let stale = self
            .journal
            .map
            .dirty_region_runs()
            .flatten()
            .filter(|&r| self.journal.map.get(r) == CELL_STALE)
            .count() as u64;
        stale > stale_at_handshake
    }

    /// Target: tells the source which generation this side now durably
    /// holds, once the commit that wrote it (with the marks) is durable.
    fn announce_adoption(&mut self) {
        if let Some((current, epoch)) = self.adopted {
            if self.connected && self.journal.durable() >= epoch && !self.journal.failed {
                self.adopted = None;
                self.actions.push_back(Action::SendAdopted { current });
            }
        }
    }

    /// The peer, target of this side's resync, durably holds generation
    /// `current` ([`Action::SendAdopted`]): if that is this side's, the
    /// marks no longer count from an older generation.
    pub fn peer_adopted(&mut self, current: GenId) {
        let mut gens = self.journal.gens;
        if self.connected && gens.current == current && gens.bitmap != 0 {
            gens.bitmap = 0;
            self.journal.set_generations(gens);
            self.start_commit();
        }
    }

    /// The link to the peer ended: every write it did not acknowledge leaves
    /// its regions stale, and the device goes on alone.
    pub fn peer_lost(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.new_generation_due = self.current_shared || self.journal.gens.holds_no_data();
        self.adopting = None;
        self.adopted = None;
        // Marks waiting for a barrier stay: without the peer's flush the
        // data they cover is not known durable there.
        let barrier = self.barrier.take();
        self.clears
            .drop_all(barrier.as_ref().map_or(&[], |b| &b.regions));
        let entries: Vec<RemoteEntry> = self.remote.drain(..).collect();
        for entry in entries {
            if entry.done {
                continue;
            }
            self.stats.remote_failures += 1;
            match (entry.kind, entry.slot) {
                (
                    RemoteKind::Write {
                        regions_start,
                        regions_end,
                        ..
                    },
                    Some(slot),
                ) => {
                    self.mark_stale(regions_start..regions_end);
                    self.slots[slot as usize].remote = Remote::Lost;
                }
                (RemoteKind::Flush, Some(slot)) => self.slots[slot as usize].remote = Remote::Lost,
                (
                    RemoteKind::Write {
                        regions_start,
                        regions_end,
                        ..
                    },
                    None,
                ) => self.end_regions(regions_start..regions_end, true),
                _ => {}
            }
        }
        self.backlog_bytes = 0;
        self.fallback = false;
        self.resync = None;
        self.reading.clear();
        let session = self.session;
        self.stale_peer_ops += self
            .slots
            .iter()
            .filter(|s| {
                s.owner == Owner::Peer && s.local == Local::InFlight && s.session == session
            })
            .count();
        // Operations from the peer not yet applied are dropped, and so are
        // checks found equal that wait for a sync (unanswered: the peer
        // sends those regions again in a later session).
        self.scratch.clear();
        self.target.drain_pending(&mut self.scratch);
        self.scratch.append(&mut self.checks_equal);
        self.scratch.append(&mut self.checks_syncing);
        self.check_sync = None;
        let dropped: Vec<Slot> = self.scratch.drain(..).collect();
        for slot in dropped {
            self.slots[slot as usize] = SlotInfo::FREE;
            self.free_peer.push(slot);
            self.actions.push_back(Action::Discard(slot));
        }
        // Writes not yet handed to the peer (waiting for their intent, or
        // async writes not yet complete locally) will not reach it either.
        for slot in 0..self.params.slots_max as Slot {
            let info = self.slots[slot as usize];
            if info.owner == Owner::App
                && info.request.kind.changes_data()
                && info.tracked
                && info.remote == Remote::NotNeeded
            {
                self.lose(slot);
            }
        }
        // Requests whose peer part is gone move on alone.
        for slot in 0..self.slots.len() as Slot {
            let info = self.slots[slot as usize];
            if info.owner == Owner::App && info.remote == Remote::Lost {
                if info.local == Local::Idle && info.wait == Wait::None {
                    self.issue_local(slot);
                } else {
                    self.try_complete(slot);
                }
            }
        }
        self.resume_waiting();
        self.start_commit();
    }

    /// The link to the peer ended and this side may not write alone yet
    /// (site isolation, [`crate::link::isolation`]): as
    /// [`Engine::peer_lost`], but every write the peer did not acknowledge,
    /// and every new one, waits instead of completing or going on alone,
    /// until the link returns ([`Engine::connect`]) or
    /// [`Engine::release_isolation`]. Reads and flushes go on.
    pub fn peer_isolated(&mut self) {
        if !self.connected {
            return;
        }
        self.isolated = true;
        self.peer_lost();
    }

    /// Whether writes without the peer are held ([`Engine::peer_isolated`]).
    pub fn is_isolated(&self) -> bool {
        self.isolated && !self.connected
    }

    /// Ends an isolation: this side may write alone (the peer was confirmed
    /// down, or fenced). Held writes complete, or go on alone and mark their
    /// regions stale. Nothing happens when not isolated.
    pub fn release_isolation(&mut self) {
        if !self.isolated {
            return;
        }
        self.isolated = false;
        self.resume_waiting();
        self.start_commit();
    }

    /// Fails every held write with [`EngineError::Unavailable`] and ends
    /// the isolation (the device stops: a held write was never
    /// acknowledged, and completing it alone now would be the very
    /// divergence the hold prevents). Their regions stay stale.
    pub fn fail_isolated(&mut self) {
        if !self.isolated {
            return;
        }
        self.isolated = false;
        let mut count = self.waiting.len();
        while count > 0 {
            count -= 1;
            let slot = self.waiting.pop_front().expect("counted");
            let info = self.slots[slot as usize];
            if info.wait != Wait::Isolated {
                self.waiting.push_back(slot);
                continue;
            }
            if info.tracked {
                self.end_regions(self.regions(&info.request), true);
            }
            self.finish_app(slot, Err(EngineError::Unavailable));
        }
        self.resume_waiting();
        self.start_commit();
    }

    /// The peer stopped its device cleanly: as [`Engine::peer_lost`], and
    /// since it flushed its volume after applying everything it
    /// acknowledged, the hot regions' marks may go once the local volume is
    /// synced too (a barrier without a peer part): a clean stop leaves both
    /// maps clean.
    pub fn peer_left(&mut self) {
        if !self.connected {
            return;
        }
        self.peer_lost();
        self.peer_flushed = true;
        for run in self.journal.map.dirty_region_runs() {
            for r in run {
                if self.journal.map.get(r) == CELL_ACTIVE && self.activity.in_flight(r) == 0 {
                    self.clears.queue(r);
                }
            }
        }
        self.pump_barrier();
    }

    /// The device is about to stop: every idle hot region leaves the
    /// activity set and its mark goes behind a barrier (connected: both
    /// volumes flushed), so that a clean stop of a connected pair leaves
    /// both maps clean. Drive the engine until [`Engine::is_idle`].
    pub fn prepare_stop(&mut self) {
        self.evicted.clear();
        self.activity.clear_idle(&mut self.evicted);
        if self.connected || self.peer_flushed {
            for i in 0..self.evicted.len() {
                let region = self.evicted[i];
                if self.journal.map.get(region) == CELL_ACTIVE {
                    self.clears.queue(region);
                }
            }
        }
        self.pump_barrier();
    }

    // ----- barriers: marks go once the data is durable on both sides -------

    /// Starts a barrier for the regions waiting to be cleared, unless one
    /// is in flight: the local volume is synced and the peer flushes its own
    /// (a flush in the mirror stream, after everything it covers).
    fn pump_barrier(&mut self) {
        if self.barrier.is_some()
            || self.clears.is_empty()
            || self.journal.failed
            || !(self.connected || self.peer_flushed)
        {
            return;
        }
        // Only regions every write to which completed: the sync and the
        // flush issued now cover them.
        let activity = &self.activity;
        let regions = self.clears.take_for_barrier(|r| activity.in_flight(r) == 0);
        if regions.is_empty() {
            return;
        }
        let remote = self.connected.then(|| {
            let seq = self.push_remote(None, RemoteKind::Barrier);
            self.actions.push_back(Action::SendFlush {
                seq,
                awaited: false,
            });
            seq
        });
        let sync = self.next_sync;
        self.next_sync += 1;
        self.barrier = Some(Barrier {
            sync,
            local_done: false,
            remote,
            session: self.session,
            regions,
        });
        self.actions.push_back(Action::SyncData(sync));
    }

    /// Reports the end of [`Action::SyncData`] `sync`. A sync of a barrier
    /// that was dropped (the link ended) counts for nothing.
    pub fn data_synced(&mut self, sync: u64, result: Result<(), i32>) {
        if self.promotion == Some(Promotion::Syncing(sync)) {
            self.promotion_synced(result);
            return;
        }
        if self.check_sync == Some(sync) {
            self.check_sync_done(result);
            return;
        }
        let Some(barrier) = self.barrier.as_mut().filter(|b| b.sync == sync) else {
            return;
        };
        match result {
            Ok(()) => {
                barrier.local_done = true;
                self.finish_barrier();
            }
            Err(errno) => {
                // Nothing is known durable: the marks stay, tried again later.
                tracing::error!(errno, "data volume sync failed; marks are kept");
                let barrier = self.barrier.take().expect("checked");
                self.clears.requeue(&barrier.regions);
            }
        }
    }

    /// The peer's part of the barrier (`seq`) is done.
    fn barrier_remote_done(&mut self, seq: Seq, ok: bool) {
        let Some(barrier) = self.barrier.as_mut() else {
            return;
        };
        if barrier.remote != Some(seq) || barrier.session != self.session {
            return;
        }
        if !ok {
            let barrier = self.barrier.take().expect("checked");
            self.clears.requeue(&barrier.regions);
            return;
        }
        barrier.remote = None;
        self.finish_barrier();
    }

    /// Clears the marks a completed barrier covers, where nothing newer
    /// marked them meanwhile.
    fn finish_barrier(&mut self) {
        let done = self
            .barrier
            .as_ref()
            .is_some_and(|b| b.local_done && b.remote.is_none());
        if !done {
            return;
        }
        let barrier = self.barrier.take().expect("checked");
        self.stats.barriers += 1;
        for &region in &barrier.regions {
            // A write started there after the barrier did: not covered.
            if !self.clears.still_covered(region) {
                continue;
            }
            let cell = self.journal.map.get(region);
            let resyncing = self
                .resync
                .as_ref()
                .is_some_and(|rs| rs.pending.get(region) || rs.busy.get(region));
            if cell == CELL_STALE || cell == CELL_RESYNC || cell == CELL_CONSISTENT || resyncing {
                continue;
            }
            // Connected, a region still in the activity set stays hot (its
            // next write needs no map write); alone, its next write marks
            // it stale anyway.
            let next = if self.activity.in_flight(region) > 0 {
                CELL_WRITING
            } else if self.connected && self.activity.contains(region) {
                CELL_ACTIVE
            } else {
                CELL_CONSISTENT
            };
            if cell != next {
                self.journal.set(region, next);
            }
        }
        self.start_commit();
        self.pump_barrier();
    }

    /// Regions whose marks must stay (a local write failed there): taken
    /// out of pending clears.
    fn keep_marked(&mut self, regions: Range<u64>) {
        for region in regions {
            self.clears.keep(region);
        }
    }

    /// The peer asks for `region` to be resynchronised next.
    pub fn prioritize(&mut self, region: u64) {
        if let Some(rs) = self.resync.as_mut() {
            rs.prioritize(region);
        }
        self.pump_resync();
    }

    /// The peer, source of a resync, added `region` to it after the
    /// handshake ([`Action::SendResyncAdd`]): its data here is out of date
    /// until the peer sends it. Marked as not received (`0x6`) like the
    /// handshake's regions; nothing received after this is applied before
    /// the mark is durable, so that an interrupted resync leaves a map that
    /// says which data is missing (async: the secondary then holds a state
    /// the primary went through everywhere else).
    pub fn resync_added(&mut self, region: u64) {
        if !self.connected || region >= self.journal.map.region_count() {
            return;
        }
        if self.journal.map.get(region) == CELL_STALE {
            // This side wrote the region alone: the source's data must not
            // overwrite it. Only a new handshake can decide who keeps what.
            self.stats.resync_refused += 1;
            self.actions.push_back(Action::Renegotiate);
            return;
        }
        self.mark_not_received(region);
        self.target_marks_epoch = self.journal.needed_all();
        self.start_commit();
    }

    // ----- operations from the peer ---------------------------------------

    /// Takes an operation received from the peer; returns its slot (the
    /// driver keeps the operation's data and reply handle there).
    ///
    /// # Panics
    /// If no peer slot is free ([`Engine::peer_slot_available`]).
    pub fn peer_op(&mut self, mut op: PeerOp) -> Slot {
        let slot = self.free_peer.pop().expect("a peer slot is free");
        // Resync data clears this side's mark once written: written with
        // FUA, so that the mark never goes before the data is durable.
        if op.resync_region.is_some() && op.request.kind == OpKind::Write {
            op.request.fua = true;
        }
        self.slots[slot as usize] = SlotInfo {
            owner: Owner::Peer,
            request: op.request,
            after: op.after,
            session: self.session,
            resync_region: op.resync_region,
            ..SlotInfo::FREE
        };
        let invalid = self.check(&op.request).err().or_else(|| {
            op.resync_region
                .filter(|&r| {
                    let bytes = region_bytes(r, self.params.size_bytes);
                    r >= self.journal.map.region_count()
                        || op.request.offset_bytes != bytes.start
                        || op.request.len_bytes != bytes.end - bytes.start
                })
                .map(|_| EngineError::OutOfRange {
                    offset_bytes: op.request.offset_bytes,
                    len_bytes: op.request.len_bytes,
                    size_bytes: self.params.size_bytes,
                })
        });
        if let Some(e) = invalid {
            self.target.complete(op.seq);
            self.finish_peer(slot, Err(e));
            self.issue_peer_ops();
            return slot;
        }
        if op
            .resync_region
            .is_some_and(|r| self.journal.map.get(r) == CELL_STALE)
        {
            // Data for a region this side wrote alone: never applied over it.
            self.stats.resync_refused += 1;
            self.target.complete(op.seq);
            self.finish_peer(slot, Err(EngineError::StaleHere));
            self.actions.push_back(Action::Renegotiate);
            self.issue_peer_ops();
            return slot;
        }
        let (start, end) = if op.request.kind == OpKind::Flush {
            (0, 0)
        } else {
            (
                op.request.offset_bytes,
                op.request.offset_bytes + op.request.len_bytes,
            )
        };
        self.target.push(Ordered {
            slot,
            seq: op.seq,
            after: op.after,
            start,
            end,
            barrier: op.request.kind == OpKind::Flush,
        });
        self.issue_peer_ops();
        slot
    }

    /// Takes a resync checksum check from the peer, message `seq`: the
    /// peer's copy of `region` has the checksum the driver keeps; returns
    /// the slot. It is ordered like resync data of the region: the driver
    /// reads the region into a buffer when told ([`Action::Local`] of a
    /// `Read`), compares the checksums and reports with
    /// [`Engine::check_done`]. A region found the same counts as received
    /// once this side's volume is synced (the answer waits for that).
    ///
    /// # Panics
    /// If no peer slot is free ([`Engine::peer_slot_available`]).
    pub fn peer_check(&mut self, seq: Seq, region: u64) -> Slot {
        let bytes = if region < self.journal.map.region_count() {
            region_bytes(region, self.params.size_bytes)
        } else {
            // Refused by the range check of `peer_op`.
            let start = region.saturating_mul(REGION_SIZE_BYTES);
            start..start.saturating_add(REGION_SIZE_BYTES)
        };
        self.peer_op(PeerOp {
            seq,
            after: 0,
            request: Request {
                kind: OpKind::Read,
                offset_bytes: bytes.start,
                len_bytes: bytes.end - bytes.start,
                fua: false,
            },
            resync_region: Some(region),
        })
    }

    /// Reports the end of the read of check `slot` ([`Engine::peer_check`]):
    /// `Ok(true)` if this copy's checksum matched the peer's, `Ok(false)` if
    /// not, `Err(errno)` if the read failed (the peer then sends the data).
    ///
    /// # Panics
    /// If `slot` had no check in flight.
    pub fn check_done(&mut self, slot: Slot, result: Result<bool, i32>) {
        let info = self.slots[slot as usize];
        assert!(
            info.is_check() && info.local == Local::InFlight,
            "slot {slot} had no check in flight"
        );
        if !self.connected || info.session != self.session {
            self.slots[slot as usize].local = Local::Done(Ok(()));
            self.peer_local_done(slot, Ok(()));
            return;
        }
        self.slots[slot as usize].local = Local::Done(result.map(|_| ()));
        self.target.finished(slot);
        match result {
            Ok(true) => {
                self.checks_equal.push(slot);
                self.pump_check_sync();
            }
            Ok(false) => self.finish_peer(slot, Err(EngineError::Differs)),
            Err(errno) => self.finish_peer(slot, Err(EngineError::Io(errno))),
        }
        self.issue_peer_ops();
    }

    /// Target: syncs the data volume for the checks found equal, unless a
    /// sync for earlier ones is in flight. Only checks whose reads finished
    /// before the sync is issued count on it: what they read is then on disk.
    fn pump_check_sync(&mut self) {
        if self.check_sync.is_some() || self.checks_equal.is_empty() || !self.connected {
            return;
        }
        debug_assert!(self.checks_syncing.is_empty());
        std::mem::swap(&mut self.checks_equal, &mut self.checks_syncing);
        let sync = self.next_sync;
        self.next_sync += 1;
        self.check_sync = Some(sync);
        self.actions.push_back(Action::SyncData(sync));
    }

    /// Target: the sync for checks found equal ended.
    fn check_sync_done(&mut self, result: Result<(), i32>) {
        self.check_sync = None;
        for i in 0..self.checks_syncing.len() {
            let slot = self.checks_syncing[i];
            match result {
                Ok(()) => self.check_equal_done(slot),
                Err(errno) => self.finish_peer(slot, Err(EngineError::Io(errno))),
            }
        }
        self.checks_syncing.clear();
        self.pump_check_sync();
    }

    /// Target: the region of check `slot` is the same here as on the peer,
    /// and durable: it counts as received, as if its data had been written.
    fn check_equal_done(&mut self, slot: Slot) {
        let info = self.slots[slot as usize];
        let region = info.resync_region.expect("checks carry a region");
        self.stats.resync_same_bytes += info.request.len_bytes;
        if self.journal.map.get(region) == CELL_RESYNC {
            self.journal.set(region, CELL_CONSISTENT);
            self.requested.retain(|&r| r != region);
            if self.journal.resync_cells() == 0 {
                self.actions.push_back(Action::ResyncDone);
            }
            self.resume_waiting();
        }
        self.finish_peer(slot, Ok(()));
        self.start_commit();
    }

    fn issue_peer_ops(&mut self) {
        if !self.connected
            || self.stale_peer_ops > 0
            || self.journal.durable() < self.target_marks_epoch
        {
            return;
        }
        self.scratch.clear();
        self.target.issuable(|_| false, &mut self.scratch);
        for i in 0..self.scratch.len() {
            let slot = self.scratch[i];
            self.slots[slot as usize].local = Local::InFlight;
            self.actions.push_back(Action::Local(slot));
        }
    }

    fn peer_local_done(&mut self, slot: Slot, result: Result<(), i32>) {
        let info = self.slots[slot as usize];
        if !self.connected || info.session != self.session {
            // Applied for a session that ended: no answer may reach the new one.
            self.slots[slot as usize] = SlotInfo::FREE;
            self.free_peer.push(slot);
            self.actions.push_back(Action::Discard(slot));
            self.stale_peer_ops -= 1;
            if self.stale_peer_ops == 0 {
                self.issue_peer_ops();
                self.pump_resync();
            }
            return;
        }
        self.target.finished(slot);
        if result.is_ok() {
            self.stats.peer_ops += 1;
            if info.request.kind.changes_data() {
                self.stats.peer_op_bytes += info.request.len_bytes;
            }
            if let Some(region) = info.resync_region {
                if self.journal.map.get(region) == CELL_RESYNC {
                    self.journal.set(region, CELL_CONSISTENT);
                    self.requested.retain(|&r| r != region);
                    if self.journal.resync_cells() == 0 {
                        self.actions.push_back(Action::ResyncDone);
                    }
                    self.resume_waiting();
                }
            }
        } else if info.request.kind.changes_data() && info.resync_region.is_none() {
            // The peer's write did not land here: this copy is out of date
            // in its regions until the peer sends them again (the error
            // reply makes it resynchronise them). Mark them not received,
            // durably before anything later from the peer is applied, so
            // that neither a crash nor a cut leaves a clean map over them.
            for region in self.regions(&info.request) {
                self.mark_not_received(region);
                self.spoil_checks(region);
            }
            self.target_marks_epoch = self.journal.needed_all();
            self.start_commit();
        }
        self.finish_peer(slot, result.map_err(EngineError::Io));
        self.issue_peer_ops();
    }

    /// Target: a write from the peer to `region` failed here after a check
    /// of the region had read it and found it the same. The check compared
    /// what this copy held before the write; the copy no longer matches the
    /// peer's, so the check is answered as different (the data is sent)
    /// instead of clearing the region once the sync is done.
    fn spoil_checks(&mut self, region: u64) {
        for list in [&mut self.checks_equal, &mut self.checks_syncing] {
            let slots = &self.slots;
            let mut k = 0;
            while k < list.len() {
                let slot = list[k];
                if slots[slot as usize].resync_region == Some(region) {
                    list.swap_remove(k);
                    self.spoiled.push(slot);
                } else {
                    k += 1;
                }
            }
        }
        while let Some(slot) = self.spoiled.pop() {
            self.finish_peer(slot, Err(EngineError::Differs));
        }
    }

    /// Marks `region` as waiting for the peer's data (`0x6`), unless it is
    /// already, or stale (written alone here: a stale mark is never dropped;
    /// the handshake settles which side keeps what).
    fn mark_not_received(&mut self, region: u64) {
        match self.journal.map.get(region) {
            CELL_RESYNC | CELL_STALE => {}
            _ => {
                self.journal.set(region, CELL_RESYNC);
                self.stats.resync_target_total += 1;
            }
        }
    }

    fn finish_peer(&mut self, slot: Slot, result: Result<(), EngineError>) {
        let request = self.slots[slot as usize].request;
        let resync = self.slots[slot as usize].resync_region.is_some();
        self.slots[slot as usize] = SlotInfo::FREE;
        self.free_peer.push(slot);
        // An answer to a plain write that went well is one the peer takes
        // in any order; whether it may pass is decided as it is sent.
        let passing = result.is_ok()
            && request.kind.changes_data()
            && !resync
            && self.params.mode != Mode::Async;
        self.actions.push_back(Action::Reply {
            slot,
            result,
            passing,
        });
    }

    // ----- resync (source) ------------------------------------------------

    fn pump_resync(&mut self) {
        if !self.connected
            || self.stale_peer_ops > 0
            || self.journal.durable() < self.source_marks_epoch
        {
            return;
        }
        // The application comes first: while it has requests in flight,
        // resync keeps to half its budget (always at least one region).
        let app_busy = self.free_app.len() < self.params.slots_max;
        let window = self.resync_window_bytes();
        let budget = if app_busy { window / 2 } else { window };
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        while !self.free_resync.is_empty()
            && (rs.in_flight_bytes == 0 || rs.in_flight_bytes + REGION_SIZE_BYTES <= budget)
            && rs.checks_in_flight < CHECKS_IN_FLIGHT_MAX
        {
            let activity = &self.activity;
            let Some(region) = rs.next(|r| activity.in_flight(r) > 0) else {
                break;
            };
            rs.busy.set(region);
            let bytes = region_bytes(region, self.params.size_bytes);
            let len = bytes.end - bytes.start;
            rs.in_flight_bytes += len;
            let slot = self.free_resync.pop().expect("checked");
            self.slots[slot as usize] = SlotInfo {
                owner: Owner::Resync,
                request: Request {
                    kind: OpKind::Read,
                    offset_bytes: bytes.start,
                    len_bytes: len,
                    fua: false,
                },
                local: Local::InFlight,
                session: self.session,
                resync_region: Some(region),
                ..SlotInfo::FREE
            };
            self.reading.push(region);
            self.actions.push_back(Action::ResyncRead(slot));
        }
        if rs.remaining() == 0 && rs.in_flight_bytes == 0 {
            self.resync = None;
            self.actions.push_back(Action::ResyncDone);
        }
    }

    fn resync_read_done(&mut self, slot: Slot, result: Result<(), i32>) {
        let info = self.slots[slot as usize];
        let region = info.resync_region.expect("resync slots carry a region");
        let len = info.request.len_bytes;
        self.slots[slot as usize] = SlotInfo::FREE;
        self.free_resync.push(slot);
        let current = self.resync.is_some() && self.connected && info.session == self.session;
        // A read of an ended session was forgotten when it ended; the same
        // region may be being read again for the current one.
        if info.session == self.session {
            if let Some(i) = self.reading.iter().position(|&r| r == region) {
                self.reading.swap_remove(i);
            }
        }
        match (current, result) {
            (true, Ok(())) => {
                let rs = self.resync.as_mut().expect("current");
                rs.read_succeeded();
                if rs.checks && !rs.send_data.get(region) {
                    // Only the checksum goes: it weighs nothing against the
                    // sync rate, and CHECKS_IN_FLIGHT_MAX bounds them.
                    rs.in_flight_bytes -= len;
                    rs.checks_in_flight += 1;
                    let seq =
                        self.push_remote(None, RemoteKind::ResyncCheck { region, bytes: len });
                    self.stats.resync_checks += 1;
                    self.actions
                        .push_back(Action::SendResyncCheck { slot, seq, region });
                    self.resume_waiting();
                    self.pump_resync();
                    return;
                }
                let seq = self.push_remote(None, RemoteKind::Resync { region, bytes: len });
                self.stats.resync_bytes_sent += len;
                self.actions
                    .push_back(Action::SendResync { slot, seq, region });
            }
            (true, Err(errno)) => {
                // The local copy cannot be read here now: the region stays
                // marked and to be sent; it is read again after a back-off
                // while the others go on. Reported, never silent.
                self.stats.resync_read_errors += 1;
                let rs = self.resync.as_mut().expect("current");
                rs.in_flight_bytes -= len;
                let backoff = rs.read_failed(region, self.now_ms);
                tracing::error!(
                    region,
                    errno,
                    "resync read failed; the region is read again in {} s",
                    backoff / 1000
                );
            }
            (false, _) => {}
        }
        // Writes held back for this region may go now: the resync data is queued first.
        self.resume_waiting();
        self.pump_resync();
    }

    fn resync_confirmed(&mut self, region: u64, bytes: u64, result: Result<(), EngineError>) {
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        rs.busy.clear(region);
        rs.in_flight_bytes -= bytes;
        if rs.resend.get(region) {
            // A local write failed after the data was read: what the peer
            // got is not this copy; read and send the region again.
            rs.resend.clear(region);
            return;
        }
        if result.is_err() {
            return;
        }
        self.resync_region_done(region);
    }

    /// The target answered the checksum of `region`: `Ok`, its copy is the
    /// same (and durable); an error, it differs (or could not be read
    /// there): the data is read again and sent.
    fn resync_checked(&mut self, region: u64, bytes: u64, result: Result<(), EngineError>) {
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        rs.busy.clear(region);
        rs.checks_in_flight -= 1;
        if rs.resend.get(region) {
            // A local write failed after the region was read: what was
            // compared is not this copy; the region goes again.
            rs.resend.clear(region);
            return;
        }
        if result.is_err() {
            self.stats.resync_checks_differ += 1;
            rs.send_data.set(region);
            return;
        }
        self.stats.resync_same_bytes += bytes;
        self.resync_region_done(region);
    }

    /// The target holds `region` as this side does (data written or found
    /// the same, durably there).
    fn resync_region_done(&mut self, region: u64) {
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        rs.pending.clear(region);
        // The target wrote the region durably (resync data is written with
        // FUA); the mark goes once this side's copy is durable too, behind
        // a barrier, unless something newer marked it meanwhile. A stale
        // mark becomes a plain one meanwhile, so that a write the peer loses
        // from now on marks it stale again (and sends it again).
        let cell = self.journal.map.get(region);
        if cell == CELL_STALE {
            self.journal.set(region, CELL_INCONSISTENT);
        }
        if cell != CELL_RESYNC && cell != CELL_CONSISTENT {
            self.clears.queue(region);
            self.pump_barrier();
        }
    }

    // ----- time and administration ----------------------------------------

    /// The peer link's congestion window in bytes (`None`: not measured,
    /// or no peer), which an adaptive resync window follows; a wider one
    /// lets more resync reads start now.
    pub fn set_link_window(&mut self, bytes: Option<u64>) {
        let wider = match (self.link_window, bytes) {
            (Some(a), Some(b)) => b > a,
            (None, Some(_)) => true,
            _ => false,
        };
        self.link_window = bytes;
        if wider {
            self.pump_resync();
        }
    }

    /// Resync bytes allowed in flight now (application idle).
    pub fn resync_window_bytes(&self) -> u64 {
        resync_window::resync_window(
            self.params.resync_adaptive,
            self.params.resync_in_flight_max_bytes,
            self.link_window,
        )
    }

    /// Advances the engine clock: idle regions leave the activity set (their
    /// cells are cleared lazily) and pending map changes are committed.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.promotion == Some(Promotion::Retry) {
            self.sync_for_promotion();
        }
        self.check_stall();
        self.evict_idle();
        self.start_commit();
        if let Some(rs) = self.resync.as_mut() {
            rs.retry_due(now_ms);
        }
        self.pump_resync();
        self.pump_barrier();
    }

    /// Reports a connected peer that has answered nothing for
    /// `peer_stall_ms` while messages waited (progress-based: a slow peer
    /// that keeps answering is never dropped).
    fn check_stall(&mut self) {
        let limit = self.params.peer_stall_ms;
        if limit == 0 || !self.connected || self.stall_reported || self.remote.is_empty() {
            return;
        }
        let waited_ms = self.now_ms.saturating_sub(self.remote_progress_ms);
        if waited_ms >= limit {
            self.stall_reported = true;
            self.stats.peer_stalls += 1;
            self.actions.push_back(Action::PeerStalled { waited_ms });
        }
    }

    /// Idle regions leave the activity set; their marks go once a barrier
    /// covers them (their data durable on both sides). Without a peer they
    /// stay hot: whether the peer holds them durably is not known.
    fn evict_idle(&mut self) {
        self.evicted.clear();
        self.activity
            .evict(self.now_ms, self.params.activity_idle_ms, &mut self.evicted);
        if !self.connected && !self.peer_flushed {
            return;
        }
        for i in 0..self.evicted.len() {
            let region = self.evicted[i];
            if self.journal.map.get(region) == CELL_ACTIVE {
                self.clears.queue(region);
            }
        }
    }

    /// Marks stale every region whose bit is set (one bit per region, as
    /// [`Engine::dirty_bits`]); returns the epoch to wait for.
    pub fn mark_stale_bits(&mut self, bits: &[u8]) -> Epoch {
        for region in 0..self.journal.map.region_count() {
            let set = bits
                .get((region / 8) as usize)
                .is_some_and(|b| b & (1 << (region % 8)) != 0);
            if set && self.journal.map.get(region) != CELL_STALE {
                self.journal.set(region, CELL_STALE);
            }
        }
        self.start_commit();
        self.journal.needed_all()
    }

    /// Whether `region` may be compared with the peer now (`gmdctl
    /// compare`): connected, its cell clean or hot (every write to it
    /// acknowledged by the peer), and no write of it in flight.
    pub fn region_settled(&self, region: u64) -> bool {
        self.connected
            && region < self.journal.map.region_count()
            && matches!(self.journal.map.get(region), CELL_CONSISTENT | CELL_ACTIVE)
            && self.activity.in_flight(region) == 0
    }

    /// Regions an online compare found different on the peer
    /// (`gmdctl compare --repair`): marked stale and added to the resync
    /// now, as a write the peer lost would be (the peer marks them not
    /// received first, [`Action::SendResyncAdd`]); their data is sent once
    /// the stale marks are durable. Returns the epoch of those marks.
    pub fn resend_regions(&mut self, regions: &[u64]) -> Epoch {
        let count = self.journal.map.region_count();
        for &region in regions {
            if region < count && self.journal.map.get(region) != CELL_STALE {
                self.journal.set(region, CELL_STALE);
                self.resync_add(region);
            }
        }
        self.start_commit();
        let epoch = self.journal.needed_all();
        if self.connected {
            self.source_marks_epoch = self.source_marks_epoch.max(epoch);
        }
        self.pump_resync();
        epoch
    }

    /// Marks every cell `value` (stale for `gmdctl dirty`); returns the epoch
    /// to wait for before the change is durable.
    pub fn mark_all(&mut self, value: u8) -> Epoch {
        self.evicted.clear();
        self.activity.clear_idle(&mut self.evicted);
        for region in 0..self.journal.map.region_count() {
            if self.journal.map.get(region) != value {
                self.journal.set(region, value);
            }
        }
        self.start_commit();
        self.journal.needed_all()
    }
}

#[cfg(test)]
mod tests;
