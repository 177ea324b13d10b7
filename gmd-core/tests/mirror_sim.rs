//! Deterministic simulation of a pair of mirror devices: two real engines
//! (`gmd_core::engine`), each driven by its real link
//! (`gmd_core::link::Link`) as gmdd drives it, with simulated disks, map
//! and superblock commits, ordered device wires, the daemons' handshake
//! messages, an administrator and an application, under faults. Nothing
//! that decides is copied here: which side is newer and what a resync
//! moves (`decide`, `Link::on_offer`), which hot regions are skipped
//! (`HotPeer`), sessions, generations and the rules of roles
//! (`roles::may_promote`) are gmd-core's.
//!
//! # What runs
//! - Each node: an engine made by `Engine::with_generations` over its
//!   durable map and superblock generations (both volumes start as two new
//!   zeroed ones, `Generations::zeroed`), and a `Link` ("node0", "node1")
//!   started with a new incarnation and the node's role at every engine
//!   start. The superblock's generations are taken at each map commit from
//!   `Engine::flushing_generations` and are durable when it completes.
//! - The daemons (`mirror_sim/daemon.rs`, as gmdd/src/link.rs): a reconnect
//!   timer on each node begins a handshake (`Link::begin`, an offer from
//!   `link::offer_parts` over the running engine's map and durable
//!   generations, `Link::offer`); the responder refuses an offer that
//!   crossed its session (`Link::crossing`), ends a session in force (engine
//!   `peer_lost`) and answers (`Link::on_offer`, a new session); the
//!   initiator connects its engine at `on_accept` (`Start::connection`, the
//!   runtime's rule: a session in force ends first) and sends `Go`; the
//!   responder connects at `on_go`. Offer, Accept, Go and their answers are
//!   control messages with their own random delays (1–6 steps), not
//!   ordered with the device stream, lost with a partition or a crash of
//!   either end (a request waiting for its answer then fails); an answer
//!   reaches only the request it answers. A refused or failed handshake is
//!   tried again 30 steps later. `Action::Renegotiate` ends the session and
//!   asks the peer to end it too; `Action::PeerStalled` ends it here only.
//!   A partition or a crash is the peer lost for the other daemon(s): the
//!   link ends, a lost session records the peer down (in the superblock).
//! - Device messages (`mirror_sim/wire.rs`) carry the session they were
//!   sent in; a receiver takes those of the session its link takes from
//!   that peer (`Link::session_with`: pending or in force), which wait
//!   while its engine is not connected yet (the responder before `Go`, as
//!   the runtime holds them), and drops the others. `SendAdopted` reaches
//!   `peer_adopted`. A message the engine let pass (`SendWrite`'s and
//!   `Reply`'s `passing`) is delivered before earlier ones still on the
//!   wire at random (`faults::PASS_CHANCE`), as GeoMessage does after a
//!   loss; any other waits for all before it.
//! - Roles (`mirror_sim/admin.rs`): a node restarted after a crash takes
//!   the role recorded in its superblock where `roles::may_promote` allows
//!   it against what it sees of its peer (reachable and its role, recorded
//!   down, or unknown), as `DeviceHandle::start` restoring does; the start
//!   is refused when `decide` could only refuse the pair. The engine's
//!   access follows the role (`set_access`: writable when primary; an async
//!   secondary serves no application I/O). Only the primary's application
//!   writes: the writer ([`World::writer`]), whose acknowledged writes the
//!   promises are about.
//!
//! # Faults
//! Each has a switch (a constant default, overridden by an environment
//! variable: `1` on, `0` off) and a probability, in `mirror_sim/faults.rs`.
//! Every fault is on by default.
//! - Always: local operations complete in any order; map commits complete
//!   in order and are torn page by page by crashes (the superblock lands
//!   only after all of its commit's pages, as the runtime writes it);
//!   links break (partitions, renegotiation, a stalled peer) and heal;
//!   handshake messages are delayed, reordered and lost; nodes crash (the
//!   process: the disks' caches stay) and restart some steps later with
//!   their durable map and generations.
//! - `GMD_SIM_DATA_EIO` (1 %): a local data write — the application's, the
//!   peer's or resync data — fails with EIO, having written any subset of
//!   its blocks. The application write completes with the error,
//!   unacknowledged (what it left counts as a later write over earlier
//!   ones); a peer write or resync data is answered with the error.
//! - `GMD_SIM_POWER_CUT` (half the crashes): the disks have a volatile
//!   write cache (`mirror_sim/disk.rs`; always modelled): a completed write
//!   is durable only once a flush of that disk completes (an
//!   `OpKind::Flush` local operation, or the engine's `Action::SyncData`;
//!   each covers what was cached when it was issued) or if it was written
//!   with FUA. A power cut is a crash that also loses the cache: all of it,
//!   or each cached block with probability 1/2. Map commits are durable
//!   once complete (the runtime writes and fdatasyncs).
//! - `GMD_SIM_MAP_EIO` (0.2 % of commits): a map commit fails (each of its
//!   pages and its superblock landed or not); the engine fails writes with
//!   `MapFailed` from then on, and the administrator restarts the node 5–40
//!   steps later.
//! - `GMD_SIM_RESYNC_EIO` (1 %): a resync read fails with EIO; the engine
//!   reads the region again after a back-off. A target's read for a
//!   checksum check fails likewise (answered as different: the data moves).
//! - Checksum resync (not a fault): in odd seeds both links ask for it
//!   (`Link::set_resync_checksums`), so a source sends a region's checksum
//!   (`Msg::ResyncCheck`, the blocks themselves: a perfect checksum) and
//!   its data only if the target's copy differs; in one seed of four only
//!   node 0 asks, and the pair must resync plainly.
//! - `GMD_SIM_SYNC_EIO` (1 %): the engine's data sync (`SyncData`, the
//!   local half of a barrier before marks are cleared) fails with EIO.
//! - `GMD_SIM_OLD_MESSAGES` (30 %): a device message on the wire survives a
//!   partition or a crash with this probability and arrives later; the
//!   receiver's link must drop it (the engine must never see one).
//! - `GMD_SIM_ISOLATION` (half the losses): a sync/mwc primary whose peer
//!   is lost holds its writes (`Engine::peer_isolated`, gmdd's
//!   `LinkEvent::Isolated` on the non-dominant site) until the link returns
//!   or, 20 % of administration rounds, the administrator releases it
//!   (`release_isolation`, gmdctl down). It shifts the random sequence of
//!   seeds where a primary loses its peer; `GMD_SIM_ISOLATION=0` replays
//!   seeds found before it.
//!
//! # Events (besides application I/O, completions and deliveries)
//! - Crashes (process or power cut), restarts at least 20 steps later;
//!   partitions and heals; the daemons' reconnect timers.
//! - (a) The application on a read-only copy tries to write: the write
//!   must complete at once with `EngineError::ReadOnly` (`Secondary` on an
//!   async secondary), never reach the disk, and leave it unchanged.
//! - (b) Role switch of a connected pair: the primary's application stops
//!   and drains, `secondary` on it (read-only, then a flush, which must
//!   complete), then `primary` on the other under `roles::may_promote`
//!   (retried while refused; given up after 200 steps).
//! - (c) Failover: while the primary is down, or apart and demoted, the
//!   administrator promotes the other (`may_promote` with the peer
//!   recorded down: `PeerCondition::KnownDown`), once its data is the
//!   pair's (same generation as the old primary's, which did not record
//!   its peer down and so will not come back primary by itself) and the
//!   operations of the ended session landed on its disk; its application
//!   writes. The old primary restarts as secondary (`may_promote`, as on
//!   restore) and the handshake resynchronises it from the new primary,
//!   discarding its own unsent changes.
//! - A writer that came back as secondary is promoted again (its peer, if
//!   down, recorded down first).
//! - Unify (`gmdctl unify --master <writer>`, the other copy stopped; the
//!   master's union of both maps durably stale before the other discards
//!   its own changes and gets a clean map) for the refusals an
//!   administrator can judge: after a failover whose new primary has not
//!   written, the old primary's stale marks make it look newer
//!   (`Refusal::TargetIsPrimary`); a divergence where the other copy has no
//!   stale cell (a primary restarted again and again while apart drew more
//!   generations than the history keeps). Real divergences (both wrote
//!   apart) are not staged: the run has one writer.
//!
//! # Invariants checked after every step
//! - (3) wherever the two disks differ, at least one durable map marks the
//!   region;
//! - (3d) with `GMD_SIM_DURABLE_MARKS` (on): wherever neither durable map
//!   marks a region, its data is durable on both sides (a mark may be
//!   cleared only once the data it covers survives a power cut of either
//!   side; otherwise a power cut leaves the copies different, unmarked);
//! - (5) async: bytes completed but not acknowledged never exceed the HWM;
//! - (R) one writer: at most one running copy is primary, and only the
//!   writer; each engine's access follows its link's role; a link and its
//!   engine are in a session together or not at all; an engine takes device
//!   messages of its own session only;
//! - (4) async, outside resync, for a secondary not behind (a power cut of
//!   it, or being the old primary of a failover or the discarded side of a
//!   unify, until the next resync): the secondary holds a state the primary
//!   went through — for the newest write present there, every block holds
//!   at least what was acknowledged before that write was submitted, less
//!   what a power cut of the primary since took (unflushed writes).
//!
//! # At every connect (the initiator's `on_accept`)
//! - (6) every region the resync will not send (neither in the Accept's
//!   regions nor stale) holds the same data on both sides.
//!
//! # At the completion of every application request
//! - Writes: `Ok`; EIO when the local part failed; `MapFailed` only after a
//!   map commit failed on that node; `Unavailable` only as for reads; only
//!   the writer's are acknowledged. Writes submitted to a read-only copy:
//!   see (a).
//! - Flushes: `Ok` (`MapFailed` after a map commit failed there, promising
//!   nothing). A completed flush makes every write acknowledged before it
//!   was submitted durable (promise 2); a FUA write is durable once
//!   acknowledged (`mirror_sim/oracle.rs`).
//! - Reads: never issued to the disk where the node's map marks the data
//!   not received (promise 4). The data is recorded when the read's local
//!   operation completes. Every block must hold the latest write
//!   acknowledged before the read was submitted, or a later one (in
//!   flight, failed, or acknowledged meanwhile) — less only by what a power
//!   cut of the writer since took (unflushed writes), or a failover (below)
//!   — and never a write a failover discarded. On the copy that is not the
//!   writer, blocks the writer's map marks as possibly different (a write
//!   in flight, queued, stale, or inconsistent), or on a copy that is
//!   behind (see (4)), may hold older writes. A read fails only with
//!   `Unavailable`, and only where the node's map marks the data not
//!   received (0x6), or with `Secondary` on an async secondary.
//!
//! # At a failover (promises 1 and 2)
//! The old primary's acknowledged writes may be lost exactly where its
//! durable map at that moment says the new primary lacks them: async, any
//! mark (writes within the HWM are acknowledged once their intent mark is
//! durable); sync and mwc, a stale mark only (a write the peer lost is
//! acknowledged once its stale mark is durable; the peer acknowledged
//! every other one). There the floor of each block goes back to what it
//! was when that mark became durable. Sync and mwc, blocks a power cut of
//! the new primary took since its last resync may lose what no flush of
//! both copies covered (promise 2). Everything else the new primary must
//! hold, checked by its reads, (3), and the final state; and a power cut of
//! it afterwards may take only what is not durable there (regions clean on
//! both durable maps, async what preceded a mark, and flushes of both
//! copies are). Writes of the old primary in the blocks it may lose that
//! the new primary does not hold are dead: no read of a copy that is not
//! behind, and no final copy, may show one again (a resync in the wrong
//! direction would).
//!
//! # At the end, once everything is healed and quiet
//! - (3) both disks are identical, both durable maps are clean, no region
//!   still counts as awaiting resync data, and both copies hold the same
//!   generation; a region whose application write failed locally stays
//!   inconsistent (0x7) until a handshake resends it, so healing sets the
//!   link up again when only such marks are left;
//! - (1) every block holds its promised write or a later one, and no dead
//!   write.
//!
//! A pair that goes quiet with marks left, or whose link does not come up,
//! fails, naming the cause (a resync stopped by a read error, the links'
//! states, the last refusal). A failing seed is printed; replay one with
//! `GMD_SIM_SEED=<n>` (`GMD_SIM_TRACE=1` prints every action,
//! `GMD_SIM_WATCH=<region>` one region's cells and blocks, `GMD_SIM_LOG=1`
//! the events even when it passes, `GMD_SIM_LOG_LINES=<n>` how many), change
//! the count with `GMD_SIM_SEEDS=<n>` (default 2000; CI runs 20 000 in
//! release), the first seed with `GMD_SIM_SEED_FROM=<n>`, how many failures
//! to collect before stopping with `GMD_SIM_MAX_FAILURES=<n>` (default 5).

#[path = "mirror_sim/admin.rs"]
mod admin;
#[path = "mirror_sim/daemon.rs"]
mod daemon;
#[path = "mirror_sim/disk.rs"]
mod disk;
#[path = "mirror_sim/faults.rs"]
mod faults;
#[path = "mirror_sim/oracle.rs"]
mod oracle;
#[path = "mirror_sim/wire.rs"]
mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;

use gmd_core::config::Mode;
use gmd_core::engine::{
    Action, Engine, EngineError, EngineParams, Epoch, OpKind, PeerOp, Request, Seq, Slot,
};
use gmd_core::generations::Generations;
use gmd_core::link::{Link, PairRole, Refusal};
use gmd_core::statemap::StateMap;
use gmd_core::statemap::cells::{
    CELL_ACTIVE, CELL_CONSISTENT, CELL_INCONSISTENT, CELL_RESYNC, CELL_STALE,
};
use gmd_core::statemap::format::Layout;
use gmd_core::units::{REGION_SIZE_BYTES, region_bytes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use admin::{Switch, Unify};
use daemon::Task;
use disk::{CacheSnapshot, Disk, PowerCut};
use faults::Faults;
use oracle::Promises;
use wire::{Control, Msg, Packet};

const BLOCK: u64 = 512;
const REGIONS: u64 = 48;
const SIZE: u64 = REGIONS * REGION_SIZE_BYTES;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const STEPS: usize = 1500;
/// The machines' names (the link's and `decide`'s).
const NAMES: [&str; 2] = ["node0", "node1"];
/// The node that is primary when a run starts; role changes and failovers
/// move the writer ([`World::writer`]).
const FIRST_PRIMARY: usize = 0;
/// Steps a crashed node stays down at least.
const DOWN_STEPS: usize = 20;
/// Milliseconds the settle phase skips ahead when nothing is in flight
/// (idle regions leave the activity set, failed resync reads are retried
/// after a back-off of up to a minute).
const QUIET_SKIP_MS: usize = 100;
/// Milliseconds with nothing in flight after which a pair that still has
/// marks, or is not connected, is stuck.
const STUCK_MS: usize = 180_000;

/// A write's identity; block contents are the id of the write that produced them.
type WriteId = u32;

fn region_of(block: usize) -> u64 {
    block as u64 * BLOCK / REGION_SIZE_BYTES
}

/// The blocks of region `r`.
fn region_blocks(r: u64) -> Range<usize> {
    let bytes = region_bytes(r, SIZE);
    (bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize
}

/// The blocks a request touches.
fn blocks_of(request: &Request) -> Range<usize> {
    (request.offset_bytes / BLOCK) as usize
        ..((request.offset_bytes + request.len_bytes) / BLOCK) as usize
}

/// The regions of a range of blocks.
fn regions_of(blocks: &Range<usize>) -> std::ops::RangeInclusive<u64> {
    region_of(blocks.start)..=region_of(blocks.end - 1)
}

/// What the simulator keeps for a slot of an engine.
#[derive(Clone, Debug)]
enum SlotData {
    AppWrite {
        id: WriteId,
    },
    /// A write submitted while the copy was read-only: it must be refused
    /// without touching the disk.
    AppWriteRefused {
        readable: bool,
    },
    /// An application flush; the floors when it was submitted, whether it
    /// is the flush of a demotion (a role switch waits for it), and the
    /// session its engine was in then.
    AppFlush {
        floors: Vec<WriteId>,
        demotion: bool,
        session: u64,
    },
    AppRead(Read),
    Peer {
        seq: Seq,
        id: WriteId,
        resync: Option<Vec<WriteId>>,
    },
    /// A checksum check from the peer: its copy of the region.
    PeerCheck {
        seq: Seq,
        blocks: Vec<WriteId>,
    },
    /// A resync read of link session `session`, and its data once read.
    ResyncRead {
        session: u64,
        blocks: Option<Vec<WriteId>>,
    },
}

/// An application read in flight.
#[derive(Clone, Debug)]
struct Read {
    blocks: Range<usize>,
    submitted: usize,
    /// The promises' tick when it was submitted.
    since: u64,
    /// Whether the copy served reads when it was submitted (an async
    /// secondary does not).
    readable: bool,
    /// Set when its local operation completes: per block, what the disk held
    /// and the oldest write it may hold (`None`: this replica may lag there).
    data: Option<Vec<(WriteId, Option<WriteId>)>>,
}

/// Pages of a map commit with their cells.
type PageImages = Vec<(u64, Vec<u8>)>;

/// A map commit in flight: its pages, and the generations it writes in the
/// superblock (if it writes the superblock).
#[derive(Clone, Debug)]
struct Commit {
    epoch: Epoch,
    pages: PageImages,
    gens: Option<Generations>,
}

/// A node's part in the resync of its engine's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    None,
    Source,
    Target,
}

struct Node {
    engine: Option<Engine>,
    /// The device's link (`gmd_core::link::Link`, as gmdd keeps it): role,
    /// handshake, session, who acknowledged the hot regions.
    link: Link,
    /// What the superblock records besides the map: the role a restart
    /// after a crash asks for, whether it ran as primary when it last
    /// stopped and was given no role since (`SideFacts::ran_primary`, as
    /// `DeviceHandle::start` records it), whether the peer is recorded
    /// down, the data generations (durable: what a restart reads).
    recorded_role: PairRole,
    ran_primary: bool,
    peer_down: bool,
    gens_durable: Generations,
    disk: Disk,
    map_durable: StateMap,
    map_in_flight: Option<Commit>,
    /// Per region: the promises' tick at which its durable cell last went
    /// from clean to marked (`None` while clean), and to stale (`None`
    /// while not stale).
    marked_since: Vec<Option<u64>>,
    stale_since: Vec<Option<u64>>,
    /// Blocks a power cut took here since the last resync finished.
    cut_blocks: Vec<bool>,
    /// The engine's map when the node last went down (what it knew then).
    map_at_crash: StateMap,
    slots: HashMap<Slot, SlotData>,
    /// What the disk had cached when each local flush in flight was issued.
    flushes: HashMap<Slot, CacheSnapshot>,
    locals: Vec<Slot>,
    /// Blocks with an application write in flight (the application never overlaps itself).
    busy_blocks: HashSet<usize>,
    /// Regions where an application write failed here: marked inconsistent
    /// (0x7) until the next handshake resends them.
    failed_regions: HashSet<u64>,
    down_since: Option<usize>,
    /// A map commit failed: the step at which the administrator restarts the node.
    map_failed: Option<usize>,
    /// Since when this copy may lack what the pair holds, until the next
    /// resync finished (or a connect without one): a power cut took cached
    /// writes here, or it was the old primary at a failover.
    behind: Option<usize>,
    /// Per block, the write its last power cut took, and when.
    lost: Vec<Option<(WriteId, usize)>>,
    /// Per region, the engine's cell as last seen, and the value it last
    /// went back to clean from, and when.
    cells_seen: Vec<u8>,
    cleared: Vec<Option<(u8, usize)>>,
    /// The engine's packed map as last seen (to skip unchanged maps).
    packed_seen: Vec<u8>,
    /// The daemon's side of the link: a handshake it started is under way,
    /// its requests waiting for an answer, when a handshake was last
    /// refused (retried later), the incarnation the offer it answered carried.
    connecting: bool,
    tasks: Vec<Task>,
    refused_at: Option<usize>,
    offer_incarnation: u64,
    /// The session the engine is connected in (0: none), its part in the
    /// resync, and whether that part is done.
    engine_session: u64,
    part: Part,
    resync_done: bool,
    /// The application is stopped (a role switch drains it).
    app_stopped: bool,
    /// Each of the engine's data syncs in flight (`Action::SyncData`): its
    /// id, when it was issued and what the disk had cached then, in issue
    /// order.
    syncs: Vec<(u64, usize, CacheSnapshot)>,
}

impl Node {
    fn new(n: usize, gens: Generations) -> Node {
        Node {
            engine: None,
            link: Link::new("sim", NAMES[n]),
            recorded_role: PairRole::Secondary,
            ran_primary: false,
            peer_down: false,
            gens_durable: gens,
            disk: Disk::new(BLOCKS),
            map_durable: StateMap::new(SIZE),
            map_in_flight: None,
            marked_since: vec![None; REGIONS as usize],
            stale_since: vec![None; REGIONS as usize],
            cut_blocks: vec![false; BLOCKS],
            map_at_crash: StateMap::new(SIZE),
            slots: HashMap::new(),
            flushes: HashMap::new(),
            locals: Vec::new(),
            busy_blocks: HashSet::new(),
            failed_regions: HashSet::new(),
            down_since: None,
            map_failed: None,
            behind: None,
            lost: vec![None; BLOCKS],
            cells_seen: vec![CELL_CONSISTENT; REGIONS as usize],
            cleared: vec![None; REGIONS as usize],
            packed_seen: StateMap::new(SIZE).packed().to_vec(),
            connecting: false,
            tasks: Vec::new(),
            refused_at: None,
            offer_incarnation: 0,
            engine_session: 0,
            part: Part::None,
            resync_done: false,
            app_stopped: false,
            syncs: Vec::new(),
        }
    }

    /// The map this node acts on: the engine's, or the one it had when it went down.
    fn map(&self) -> &StateMap {
        self.engine.as_ref().map_or(&self.map_at_crash, |e| e.map())
    }

    /// The role it runs in (`None`: down).
    fn role(&self) -> Option<PairRole> {
        self.engine.as_ref().map(|_| self.link.role())
    }

    /// Whether the application has requests in flight here.
    fn app_busy(&self) -> bool {
        self.slots.values().any(|d| {
            matches!(
                d,
                SlotData::AppWrite { .. } | SlotData::AppFlush { .. } | SlotData::AppRead(_)
            )
        })
    }
}

/// The engine's parameters for a copy in `role`: writable when primary (or
/// split), readable unless an async secondary (as `DeviceHandle::start`).
fn params(mode: Mode, role: PairRole) -> EngineParams {
    EngineParams {
        size_bytes: SIZE,
        block_size: BLOCK as u32,
        io_len_max: 64 << 10,
        slots_max: 6,
        peer_slots_max: 6,
        resync_slots_max: 2,
        writable: role.writable(),
        readable: readable(mode, role),
        mode,
        hwm_bytes: 24 << 10,
        resync_in_flight_max_bytes: 64 << 10,
        resync_adaptive: false,
        // Two extents of 4 regions: writes warm their neighbours, and
        // extents leave the set by age and by capacity.
        activity_regions: 8,
        activity_extent_regions: 4,
        activity_idle_ms: 40,
        // Steps are milliseconds: a peer silent this long while messages
        // wait (a wire held up by the scenario) is dropped like a cut link.
        peer_stall_ms: 300,
    }
}

/// Whether applications may read a copy in `role` (an async secondary serves no I/O).
fn readable(mode: Mode, role: PairRole) -> bool {
    !(mode == Mode::Async && role == PairRole::Secondary)
}

/// One write as the application saw it.
#[derive(Clone, Debug)]
struct History {
    /// The node whose application issued it.
    node: usize,
    blocks: Range<usize>,
    fua: bool,
    submitted: usize,
    /// The promises' tick at submission.
    submitted_tick: u64,
    completed: Option<usize>,
    acked: bool,
    /// The session its engine was in when it was submitted (0: none).
    session: u64,
}

/// What happened in a run, summed over seeds for the report.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    /// Local data writes failed: application, peer, resync data.
    eio: [usize; 3],
    power_cuts: usize,
    /// Cached blocks power cuts took.
    blocks_lost: usize,
    map_failures: usize,
    resync_read_failures: usize,
    sync_failures: usize,
    /// Data syncs issued while another was in flight.
    syncs_overlapping: usize,
    /// Device messages of another session dropped by a receiver.
    old_dropped: usize,
    /// Passing device messages delivered before earlier ones.
    passed: usize,
    /// Device messages that waited for the receiver's engine to connect.
    /// Primaries that held their writes on losing their peer, and holds
    /// the administrator released.
    isolations: usize,
    releases: usize,
    held: usize,
    /// Blocks of successful reads checked against the promises…
    read_blocks_checked: usize,
    /// …and those excused because the reading replica may lag there.
    read_blocks_lagging: usize,
    reads_unavailable: usize,
    /// Sessions connected (both sides).
    sessions: usize,
    /// Handshakes refused by the link (generations or roles), and how.
    refusals: usize,
    refused_target_is_primary: usize,
    refused_other: usize,
    /// Writes the application attempted on a read-only copy.
    writes_refused: usize,
    /// Role switches completed, failovers, other promotions.
    switches: usize,
    failovers: usize,
    promotions: usize,
    /// Old primaries that restarted as secondary because the other was primary.
    restarted_secondary: usize,
    /// Starts refused by the start rules, and unifies that resolved them.
    starts_refused: usize,
    unifies: usize,
    /// Checksum resync: regions found the same (no data moved), and
    /// regions found different (data moved).
    checks_same: usize,
    checks_differ: usize,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        (0..3).for_each(|k| self.eio[k] += other.eio[k]);
        self.power_cuts += other.power_cuts;
        self.blocks_lost += other.blocks_lost;
        self.map_failures += other.map_failures;
        self.resync_read_failures += other.resync_read_failures;
        self.sync_failures += other.sync_failures;
        self.syncs_overlapping += other.syncs_overlapping;
        self.old_dropped += other.old_dropped;
        self.passed += other.passed;
        self.held += other.held;
        self.isolations += other.isolations;
        self.releases += other.releases;
        self.read_blocks_checked += other.read_blocks_checked;
        self.read_blocks_lagging += other.read_blocks_lagging;
        self.reads_unavailable += other.reads_unavailable;
        self.sessions += other.sessions;
        self.refusals += other.refusals;
        self.refused_target_is_primary += other.refused_target_is_primary;
        self.refused_other += other.refused_other;
        self.writes_refused += other.writes_refused;
        self.switches += other.switches;
        self.failovers += other.failovers;
        self.promotions += other.promotions;
        self.restarted_secondary += other.restarted_secondary;
        self.starts_refused += other.starts_refused;
        self.unifies += other.unifies;
        self.checks_same += other.checks_same;
        self.checks_differ += other.checks_differ;
    }
}

struct World {
    rng: StdRng,
    faults: Faults,
    mode: Mode,
    /// The node whose application writes: the primary, or while none is
    /// (demoted, down), the last one. The promises are about its data.
    writer: usize,
    nodes: [Node; 2],
    /// Device messages in flight per direction (0: node 0 → node 1).
    wires: [VecDeque<Packet>; 2],
    /// The daemons' handshake messages in flight.
    control: Vec<Control>,
    /// The network between the nodes is up (no partition).
    link_up: bool,
    /// The last session id and request id handed out.
    last_session: u64,
    last_req: u64,
    /// Incarnations of devices handed out.
    last_incarnation: u64,
    /// A resync read of the current session failed: (node, region, step).
    resync_read_failed: Option<(usize, u64, usize)>,
    /// The last handshake or start the link's rules refused, and when.
    last_refusal: Option<(usize, Refusal)>,
    /// A role switch under way.
    switch: Option<Switch>,
    /// The old primary of the last failover, until the pair connects again.
    failed_over_from: Option<usize>,
    /// A unify under way.
    unifying: Option<Unify>,
    /// Regions a durable map cleared since the last check.
    cleared_since_check: Vec<u64>,
    next_id: WriteId,
    writes: Vec<History>,
    promises: Promises,
    step: usize,
    /// The final phase: no new faults but data EIO and resync read errors.
    settling: bool,
    log: Vec<String>,
    /// Application writes whose local part failed (never acknowledged).
    failed_writes: HashSet<WriteId>,
    counts: Counts,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = [Mode::Sync, Mode::Mwc, Mode::Async][rng.gen_range(0..3)];
        // Two new volumes the administrator initialised as zeroed: same
        // generation, nothing to copy.
        let zeroed = Generations::zeroed(&daemon::identity(mode).uuid);
        let mut world = World {
            rng,
            faults: Faults::get(),
            mode,
            writer: FIRST_PRIMARY,
            nodes: [Node::new(0, zeroed), Node::new(1, zeroed)],
            wires: [VecDeque::new(), VecDeque::new()],
            control: Vec::new(),
            link_up: true,
            last_session: 0,
            last_req: 0,
            last_incarnation: 0,
            resync_read_failed: None,
            last_refusal: None,
            switch: None,
            failed_over_from: None,
            unifying: None,
            cleared_since_check: Vec::new(),
            next_id: 1,
            writes: vec![History {
                node: FIRST_PRIMARY,
                blocks: 0..0,
                fua: false,
                submitted: 0,
                submitted_tick: 0,
                completed: Some(0),
                acked: true,
                session: 0,
            }],
            promises: Promises::new(BLOCKS),
            step: 0,
            settling: false,
            log: Vec::new(),
            failed_writes: HashSet::new(),
            counts: Counts::default(),
        };
        // Checksum resync: both nodes ask for it in odd seeds; in one seed
        // of four only node 0 does (the pair then resyncs plainly).
        for n in 0..2 {
            let asks = seed % 2 == 1 || (seed % 4 == 2 && n == 0);
            world.nodes[n].link.set_resync_checksums(asks);
        }
        for n in 0..2 {
            let role = if n == FIRST_PRIMARY {
                PairRole::Primary
            } else {
                PairRole::Secondary
            };
            world.start_engine(n, role);
        }
        // The first handshake completes before the first step.
        world.reconnect(FIRST_PRIMARY);
        world.deliver_control();
        world
    }

    fn note(&mut self, text: String) {
        // A note repeated (a refusal retried) is kept once.
        if self.log.last().is_some_and(|l| l.ends_with(&text)) {
            return;
        }
        self.log.push(format!("{:>5} {text}", self.step));
    }

    fn engine(&mut self, n: usize) -> &mut Engine {
        self.nodes[n].engine.as_mut().expect("node is running")
    }

    // ----- driver -------------------------------------------------------

    fn pump(&mut self, n: usize) {
        while let Some(action) = self.nodes[n].engine.as_mut().and_then(|e| e.poll_action()) {
            self.act(n, action);
        }
        self.observe_cells(n);
    }

    /// Notes which cells of node `n`'s map went back to clean, and from
    /// what (for failure messages: 0x5 a hot region cleaned lazily, 0x6 a
    /// resync target's data applied, 0x7 or 0xf a resync source's
    /// confirmation).
    fn observe_cells(&mut self, n: usize) {
        let step = self.step;
        let node = &mut self.nodes[n];
        let Some(engine) = &node.engine else {
            return;
        };
        if engine.map().packed() == node.packed_seen.as_slice() {
            return;
        }
        node.packed_seen.clear();
        node.packed_seen.extend_from_slice(engine.map().packed());
        for r in 0..REGIONS {
            let cell = engine.map().get(r);
            let seen = &mut node.cells_seen[r as usize];
            if cell != *seen {
                if cell == CELL_CONSISTENT {
                    node.cleared[r as usize] = Some((*seen, step));
                }
                *seen = cell;
            }
        }
    }

    fn trace(&self, n: usize, action: &Action) {
        let extra = match *action {
            Action::Local(slot) | Action::Complete(slot, _) | Action::SendWrite { slot, .. } => {
                format!(
                    "{:?} {:?}",
                    self.nodes[n].slots.get(&slot),
                    self.nodes[n].engine.as_ref().map(|e| *e.request(slot))
                )
            }
            _ => String::new(),
        };
        eprintln!("{:>5} node {n}: {action:?} {extra}", self.step);
    }

    fn act(&mut self, n: usize, action: Action) {
        if std::env::var_os("GMD_SIM_TRACE").is_some() {
            self.trace(n, &action);
        }
        match action {
            Action::Local(slot) => self.issue_local(n, slot),
            Action::ResyncRead(slot) => {
                self.nodes[n].locals.push(slot);
                let session = self.nodes[n].engine_session;
                self.nodes[n].slots.insert(
                    slot,
                    SlotData::ResyncRead {
                        session,
                        blocks: None,
                    },
                );
            }
            Action::PersistMap(epoch) => {
                let engine = self.nodes[n].engine.as_ref().expect("running");
                let packed = engine.map().packed();
                let pages = engine
                    .flushing_pages()
                    .iter()
                    .map(|&p| (p, packed[Layout::page_cells(p, packed.len())].to_vec()))
                    .collect();
                // The superblock goes with the pages when the generations
                // changed (the runtime writes it in the same group commit).
                let gens = engine.flushing_generations();
                assert!(
                    self.nodes[n].map_in_flight.is_none(),
                    "two map commits in flight"
                );
                self.nodes[n].map_in_flight = Some(Commit { epoch, pages, gens });
            }
            Action::Complete(slot, result) => self.completed(n, slot, result),
            Action::SendWrite {
                slot,
                seq,
                after,
                request,
                passing,
                ..
            } => {
                let Some(SlotData::AppWrite { id }) = self.nodes[n].slots.get(&slot).cloned()
                else {
                    panic!("SendWrite of a slot without a write")
                };
                self.send_as(
                    n,
                    Msg::Write {
                        seq,
                        after,
                        id,
                        request,
                    },
                    passing,
                );
            }
            Action::SendFlush { seq, .. } => self.send(n, Msg::Flush { seq }),
            Action::Reply {
                slot,
                result,
                passing,
            } => {
                let Some(SlotData::Peer { seq, .. } | SlotData::PeerCheck { seq, .. }) =
                    self.nodes[n].slots.remove(&slot)
                else {
                    panic!("Reply for a slot without a peer op")
                };
                let ok = result.is_ok();
                self.send_as(n, Msg::Ack { seq, ok }, passing);
            }
            Action::Discard(slot) => {
                let Some(SlotData::Peer { .. } | SlotData::PeerCheck { .. }) =
                    self.nodes[n].slots.remove(&slot)
                else {
                    panic!("Discard of a slot without a peer op")
                };
            }
            Action::SendResync { slot, seq, region } => {
                let Some(SlotData::ResyncRead {
                    blocks: Some(blocks),
                    ..
                }) = self.nodes[n].slots.remove(&slot)
                else {
                    panic!("SendResync without data")
                };
                self.send(
                    n,
                    Msg::Resync {
                        seq,
                        region,
                        blocks,
                    },
                );
            }
            Action::SendResyncCheck { slot, seq, region } => {
                let Some(SlotData::ResyncRead {
                    blocks: Some(blocks),
                    ..
                }) = self.nodes[n].slots.remove(&slot)
                else {
                    panic!("SendResyncCheck without data")
                };
                self.send(
                    n,
                    Msg::ResyncCheck {
                        seq,
                        region,
                        blocks,
                    },
                );
            }
            Action::SendPrioritize { region } => self.send(n, Msg::Prioritize { region }),
            Action::SendResyncAdd { region } => self.send(n, Msg::ResyncAdd { region }),
            Action::SendAdopted { current } => self.send(n, Msg::Adopted { current }),
            Action::SendTerm { term } => self.send(n, Msg::Term { term }),
            Action::SyncData(sync) => {
                // Two syncs in flight (the first one's barrier was dropped
                // with its link): counted; each reports its own id.
                if !self.nodes[n].syncs.is_empty() {
                    self.counts.syncs_overlapping += 1;
                }
                let cached = self.nodes[n].disk.cached();
                self.nodes[n].syncs.push((sync, self.step, cached));
            }
            Action::Renegotiate => self.renegotiate(n),
            Action::PeerStalled { waited_ms } => self.stalled(n, waited_ms),
            Action::ResyncDone => {
                self.note(format!("resync done on node {n}"));
                self.nodes[n].resync_done = true;
                self.check_resync_finished();
            }
        }
    }

    /// Queues a message from node `n` on its wire, tagged with the session
    /// its link is in (like gmdd, nothing is sent without one).
    fn send(&mut self, n: usize, msg: Msg) {
        self.send_as(n, msg, false);
    }

    /// As `send`; a passing message may be delivered before earlier ones
    /// still on the wire (GeoMessage's `post_passing`, after a loss).
    fn send_as(&mut self, n: usize, msg: Msg, passing: bool) {
        if let Some((_, session)) = self.nodes[n].link.connected() {
            self.wires[n].push_back(Packet {
                session,
                msg,
                passing,
            });
        }
    }

    /// The engine issues the local operation of `slot`; a flush covers what
    /// the disk has cached now.
    fn issue_local(&mut self, n: usize, slot: Slot) {
        self.nodes[n].locals.push(slot);
        if self.engine(n).request(slot).kind == OpKind::Flush {
            let cached = self.nodes[n].disk.cached();
            self.nodes[n].flushes.insert(slot, cached);
        }
        match self.nodes[n].slots.get(&slot) {
            Some(SlotData::AppRead(read)) => {
                // Promise 4: a replica never serves data it knows it lacks.
                assert!(
                    !self.not_received(n, &read.blocks),
                    "node {n} reads blocks {:?} from its disk, but its map marks them not \
                     received (cells {:?})",
                    read.blocks,
                    regions_of(&read.blocks)
                        .map(|r| self.cells(r))
                        .collect::<Vec<_>>()
                );
            }
            Some(SlotData::AppWriteRefused { .. }) => {
                panic!("node {n}: a write submitted to a read-only copy is issued to its disk")
            }
            _ => {}
        }
    }

    /// A resync finished on both sides of one session (or a session began
    /// without one): a copy that was behind has what the pair holds again
    /// (check (6) and the final state tell if it has not).
    fn check_resync_finished(&mut self) {
        let [a, b] = &self.nodes;
        let same = a.engine.is_some()
            && b.engine.is_some()
            && a.engine_session != 0
            && a.engine_session == b.engine_session;
        if same && a.resync_done && b.resync_done {
            for node in &mut self.nodes {
                node.behind = None;
                node.cut_blocks.fill(false);
            }
        }
    }

    /// Whether a resync runs (a node connected as source or target whose
    /// part is not done).
    fn resyncing(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.engine_session != 0 && n.part != Part::None && !n.resync_done)
    }

    // ----- local operations -------------------------------------------

    fn local_complete(&mut self, n: usize, index: usize) {
        let slot = self.nodes[n].locals.swap_remove(index);
        let request = *self.engine(n).request(slot);
        let result = match request.kind {
            OpKind::Flush => {
                let issued = self.nodes[n].flushes.remove(&slot).expect("flush issued");
                self.nodes[n].disk.flush(&issued, &mut self.rng);
                Ok(())
            }
            OpKind::Read => {
                if let Some(SlotData::PeerCheck { blocks, .. }) = self.nodes[n].slots.get(&slot) {
                    // A check: compare this copy with the peer's (a read
                    // that fails answers "different").
                    let result = if self.faults.resync_eio
                        && self.rng.gen_bool(faults::RESYNC_EIO_PROBABILITY)
                    {
                        Err(libc::EIO)
                    } else {
                        Ok(self.nodes[n].disk.read(blocks_of(&request)) == &blocks[..])
                    };
                    match result {
                        Ok(true) => self.counts.checks_same += 1,
                        _ => self.counts.checks_differ += 1,
                    }
                    self.engine(n).check_done(slot, result);
                    self.pump(n);
                    return;
                }
                self.read_done(n, slot, &request)
            }
            _ => self.data_write_done(n, slot, &request),
        };
        self.engine(n).local_done(slot, result);
        self.pump(n);
    }

    /// A local data write completes: it lands in the disk's cache (durably
    /// if FUA), or fails with EIO having written any subset of its blocks.
    fn data_write_done(&mut self, n: usize, slot: Slot, request: &Request) -> Result<(), i32> {
        let blocks = blocks_of(request);
        let kind = match self.nodes[n].slots.get(&slot) {
            Some(SlotData::AppWrite { .. }) => 0,
            Some(SlotData::Peer { resync: None, .. }) => 1,
            _ => 2,
        };
        let fails = self.faults.data_eio && self.rng.gen_bool(faults::DATA_EIO_PROBABILITY);
        let landed: Vec<bool> = if fails {
            let len = blocks.len();
            match self.rng.gen_range(0..3) {
                0 => vec![false; len],
                1 => vec![true; len],
                _ => (0..len).map(|_| self.rng.gen_bool(0.5)).collect(),
            }
        } else {
            vec![true; blocks.len()]
        };
        let contents = self.contents(n, slot, blocks.len());
        for (i, b) in blocks.clone().enumerate() {
            if landed[i] {
                self.nodes[n]
                    .disk
                    .write(b, contents[i], request.fua && !fails);
            }
        }
        if !fails {
            return Ok(());
        }
        if let Some(SlotData::AppWrite { id }) = self.nodes[n].slots.get(&slot) {
            self.failed_writes.insert(*id);
            self.nodes[n].failed_regions.extend(regions_of(&blocks));
        }
        self.counts.eio[kind] += 1;
        self.note(format!(
            "node {n}: local write of slot {slot} ({request:?}) fails with EIO"
        ));
        Err(libc::EIO)
    }

    /// What a data write of `slot` puts in each of its `len` blocks.
    fn contents(&mut self, n: usize, slot: Slot, len: usize) -> Vec<WriteId> {
        match self.nodes[n].slots.get_mut(&slot) {
            Some(SlotData::AppWrite { id }) => vec![*id; len],
            Some(SlotData::Peer { id, resync, .. }) => {
                resync.take().unwrap_or_else(|| vec![*id; len])
            }
            other => panic!("node {n}: data write of slot {slot} holding {other:?}"),
        }
    }

    /// A local read completes: resync data (which may fail with EIO) or an
    /// application read, whose data and promises are recorded now.
    fn read_done(&mut self, n: usize, slot: Slot, request: &Request) -> Result<(), i32> {
        let blocks = blocks_of(request);
        match self.nodes[n].slots.get(&slot).cloned() {
            Some(SlotData::ResyncRead { session, .. }) => {
                if self.faults.resync_eio && self.rng.gen_bool(faults::RESYNC_EIO_PROBABILITY) {
                    self.nodes[n].slots.remove(&slot);
                    self.counts.resync_read_failures += 1;
                    let region = region_of(blocks.start);
                    self.note(format!(
                        "node {n}: resync read of region {region} fails with EIO"
                    ));
                    if session != 0 && session == self.nodes[n].engine_session {
                        self.resync_read_failed
                            .get_or_insert((n, region, self.step));
                    }
                    return Err(libc::EIO);
                }
                let data = self.nodes[n].disk.read(blocks).to_vec();
                self.nodes[n].slots.insert(
                    slot,
                    SlotData::ResyncRead {
                        session,
                        blocks: Some(data),
                    },
                );
            }
            Some(SlotData::AppRead(mut read)) => {
                let data = blocks
                    .clone()
                    .map(|b| {
                        let floor = (!self.may_lag(n, b))
                            .then(|| self.promises.lowest_since(b, read.since));
                        (self.nodes[n].disk.visible()[b], floor)
                    })
                    .collect();
                read.data = Some(data);
                self.nodes[n].slots.insert(slot, SlotData::AppRead(read));
            }
            other => panic!("node {n}: read of slot {slot} holding {other:?}"),
        }
        Ok(())
    }

    /// Whether `reader` may hold, in block `b`, an older write than the
    /// writer acknowledged without knowing it: it is not the writer, and the
    /// writer's map says the peer may differ there (a write in flight or
    /// queued, stale, inconsistent), or the reader is behind (a power cut
    /// took part of its cache, or it was the old primary at a failover)
    /// until its next resync.
    fn may_lag(&self, reader: usize, b: usize) -> bool {
        if reader == self.writer {
            return false;
        }
        if self.nodes[reader].behind.is_some() {
            return true;
        }
        let cell = self.nodes[self.writer].map().get(region_of(b));
        cell != CELL_CONSISTENT && cell != CELL_ACTIVE
    }

    /// The engine's data sync `index` (of those in flight) completes: what
    /// was cached when it was issued is durable; or (`GMD_SIM_SYNC_EIO`) it
    /// fails, and nothing is known durable.
    fn sync_done(&mut self, n: usize, index: usize) {
        let (sync, step, issued) = self.nodes[n].syncs.remove(index);
        if let Some(&(_, other, _)) = self.nodes[n].syncs.first() {
            self.note(format!(
                "node {n}: data sync issued at step {step} completes while the one issued at \
                 step {other} is in flight"
            ));
        }
        if self.faults.sync_eio && self.rng.gen_bool(faults::SYNC_EIO_PROBABILITY) {
            self.counts.sync_failures += 1;
            self.note(format!("node {n}: data sync fails with EIO"));
            self.engine(n).data_synced(sync, Err(libc::EIO));
        } else {
            self.nodes[n].disk.flush(&issued, &mut self.rng);
            self.engine(n).data_synced(sync, Ok(()));
        }
        self.pump(n);
    }

    /// Commit `commit` of node `n` lands on disk: all of it, or (a failed
    /// commit, a crash during it) each page or not, and the superblock only
    /// if every page did: the runtime writes it after the pages are synced.
    fn land(&mut self, n: usize, commit: Commit, whole: bool) {
        let mut packed = self.nodes[n].map_durable.packed().to_vec();
        let mut every_page = true;
        for (page, cells) in commit.pages {
            if whole || self.rng.gen_bool(0.5) {
                let range = Layout::page_cells(page, packed.len());
                packed[range].copy_from_slice(&cells);
            } else {
                every_page = false;
            }
        }
        if let Some(gens) = commit.gens {
            if whole || (every_page && self.rng.gen_bool(0.5)) {
                self.nodes[n].gens_durable = gens;
            }
        }
        self.set_durable_map(n, StateMap::from_packed(SIZE, packed).unwrap());
    }

    /// Node `n`'s durable map becomes `map`; regions that went from clean
    /// to marked note the promises' tick (a failover may lose what was
    /// acknowledged after it).
    fn set_durable_map(&mut self, n: usize, map: StateMap) {
        let now = self.promises.now();
        let node = &mut self.nodes[n];
        for r in 0..REGIONS {
            let stale = &mut node.stale_since[r as usize];
            match (node.map_durable.get(r), map.get(r)) {
                (CELL_STALE, CELL_STALE) => {}
                (_, CELL_STALE) => *stale = Some(now),
                _ => *stale = None,
            }
            let since = &mut node.marked_since[r as usize];
            match (node.map_durable.get(r), map.get(r)) {
                (0, 0) => {}
                (_, 0) => {
                    *since = None;
                    self.cleared_since_check.push(r);
                }
                (0, _) => *since = Some(now),
                _ => {}
            }
        }
        node.map_durable = map;
    }

    fn map_commit_done(&mut self, n: usize) {
        let commit = self.nodes[n]
            .map_in_flight
            .take()
            .expect("commit in flight");
        let epoch = commit.epoch;
        let fails =
            !self.settling && self.faults.map_eio && self.rng.gen_bool(faults::MAP_EIO_PROBABILITY);
        self.land(n, commit, !fails);
        if fails {
            let restart = self.step + self.rng.gen_range(5..=40);
            self.note(format!(
                "node {n}: map commit {epoch} fails with EIO; restart at step {restart}"
            ));
            self.counts.map_failures += 1;
            self.nodes[n].map_failed = Some(restart);
            self.engine(n).map_written(epoch, Err(libc::EIO));
        } else {
            self.engine(n).map_written(epoch, Ok(()));
        }
        self.pump(n);
    }

    // ----- the application ------------------------------------------------

    /// The application on node `n` writes: on the primary (the writer),
    /// unless its application is stopped; on a read-only copy it tries now
    /// and then, and must be refused.
    fn app_write(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() {
            return;
        }
        let role = self.nodes[n].link.role();
        if !role.writable() {
            if self.rng.gen_bool(0.3) {
                self.app_write_refused(n);
            }
            return;
        }
        assert_eq!(n, self.writer, "node {n} is {role} but not the writer");
        if self.nodes[n].app_stopped {
            return;
        }
        let len = self.rng.gen_range(1..=64usize);
        let start = self.rng.gen_range(0..BLOCKS - len);
        let blocks = start..start + len;
        if blocks
            .clone()
            .any(|b| self.nodes[n].busy_blocks.contains(&b))
        {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let request = self.random_write(&blocks);
        self.nodes[n].busy_blocks.extend(blocks.clone());
        self.writes.push(History {
            node: n,
            blocks,
            fua: request.fua,
            submitted: self.step,
            submitted_tick: self.promises.now(),
            completed: None,
            acked: false,
            session: self.nodes[n].engine_session,
        });
        let slot = self.engine(n).submit(request);
        self.nodes[n].slots.insert(slot, SlotData::AppWrite { id });
        self.pump(n);
    }

    fn random_write(&mut self, blocks: &Range<usize>) -> Request {
        let kind = match self.rng.gen_range(0..10) {
            0 => OpKind::WriteZeroes,
            1 => OpKind::Trim,
            _ => OpKind::Write,
        };
        Request {
            kind,
            offset_bytes: blocks.start as u64 * BLOCK,
            len_bytes: blocks.len() as u64 * BLOCK,
            fua: self.rng.gen_bool(0.1),
        }
    }

    /// (a) The application on a read-only copy (secondary) writes: the
    /// engine refuses it at once and nothing reaches the disk.
    fn app_write_refused(&mut self, n: usize) {
        let len = self.rng.gen_range(1..=64usize);
        let start = self.rng.gen_range(0..BLOCKS - len);
        let blocks = start..start + len;
        let request = self.random_write(&blocks);
        let before = self.nodes[n].disk.read(blocks.clone()).to_vec();
        let readable = readable(self.mode, self.nodes[n].link.role());
        let slot = self.engine(n).submit(request);
        self.nodes[n]
            .slots
            .insert(slot, SlotData::AppWriteRefused { readable });
        self.pump(n);
        assert!(
            !self.nodes[n].slots.contains_key(&slot),
            "node {n}: a write to a read-only copy did not complete at once"
        );
        assert_eq!(
            self.nodes[n].disk.read(blocks.clone()),
            before.as_slice(),
            "node {n}: a write refused on a read-only copy changed its disk"
        );
        self.counts.writes_refused += 1;
    }

    /// A flush (the writer only, while its application runs) or a read
    /// (either node).
    fn app_other(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() {
            return;
        }
        let role = self.nodes[n].link.role();
        let writes = role.writable() && !self.nodes[n].app_stopped;
        let (request, data) = if writes && self.rng.gen_bool(0.5) {
            let flush = Request {
                kind: OpKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                fua: false,
            };
            let floors = self.promises.floors();
            let session = self.nodes[n].engine_session;
            (
                flush,
                SlotData::AppFlush {
                    floors,
                    demotion: false,
                    session,
                },
            )
        } else {
            let len = self.rng.gen_range(1..=16);
            let start = self.rng.gen_range(0..BLOCKS - len);
            let read = Request {
                kind: OpKind::Read,
                offset_bytes: start as u64 * BLOCK,
                len_bytes: len as u64 * BLOCK,
                fua: false,
            };
            let data = SlotData::AppRead(Read {
                blocks: start..start + len,
                submitted: self.step,
                since: self.promises.now(),
                readable: readable(self.mode, role),
                data: None,
            });
            (read, data)
        };
        let slot = self.engine(n).submit(request);
        self.nodes[n].slots.insert(slot, data);
        self.pump(n);
    }

    /// An application request completed.
    fn completed(&mut self, n: usize, slot: Slot, result: Result<(), EngineError>) {
        match self.nodes[n].slots.remove(&slot).expect("slot data") {
            SlotData::AppWrite { id } => self.write_completed(n, id, result),
            SlotData::AppWriteRefused { readable } => {
                let expected = if readable {
                    EngineError::ReadOnly
                } else {
                    EngineError::Secondary
                };
                assert_eq!(
                    result,
                    Err(expected),
                    "node {n}: a write to a read-only copy completed with {result:?}"
                );
            }
            SlotData::AppFlush {
                floors,
                demotion,
                session,
            } => {
                // A flush whose peer part was lost fails once the map failed
                // (it cannot mark anything); it promises nothing then.
                let map_failed = self.nodes[n].map_failed.is_some();
                let mirrored = self.mirrored(n, session);
                match result {
                    Ok(()) => self.promises.flushed(&floors, mirrored),
                    Err(EngineError::MapFailed) if map_failed => {}
                    Err(e) => panic!("node {n}: flush failed with {e:?}"),
                }
                if demotion {
                    self.demotion_flushed(n);
                }
            }
            SlotData::AppRead(read) => self.check_read(n, read, result),
            other => panic!("node {n}: Complete of slot {slot} holding {other:?}"),
        }
    }

    fn write_completed(&mut self, n: usize, id: WriteId, result: Result<(), EngineError>) {
        let h = &mut self.writes[id as usize];
        for b in h.blocks.clone() {
            self.nodes[n].busy_blocks.remove(&b);
        }
        h.completed = Some(self.step);
        h.acked = result.is_ok();
        let (blocks, fua, session) = (h.blocks.clone(), h.fua, h.session);
        // The only refusals: the local disk failing the write, the map
        // failing, data not here after an interrupted resync.
        let failed_here = self.failed_writes.contains(&id);
        let expected = match result {
            Ok(()) => !failed_here,
            Err(EngineError::Io(libc::EIO)) => failed_here,
            Err(EngineError::MapFailed) => !failed_here && self.nodes[n].map_failed.is_some(),
            Err(EngineError::Unavailable) => !failed_here && self.not_received(n, &blocks),
            Err(_) => false,
        };
        assert!(
            expected,
            "node {n}: write {id} completed with {result:?} (local part failed: {failed_here}, \
             map failed: {})",
            self.nodes[n].map_failed.is_some()
        );
        if result.is_ok() {
            assert_eq!(
                n, self.writer,
                "node {n}: write {id} acknowledged, but node {} is the writer",
                self.writer
            );
            let mirrored = self.mirrored(n, session);
            self.promises.acknowledged(blocks, id, fua, mirrored);
        }
    }

    /// Whether a flush or FUA write of node `n` submitted in engine session
    /// `session` that completes now made its data durable on the peer too:
    /// sync or mwc, connected in that session all along (the peer answered
    /// its part).
    fn mirrored(&self, n: usize, session: u64) -> bool {
        self.mode != Mode::Async && session != 0 && self.nodes[n].engine_session == session
    }

    /// Whether node `n` knows the data of a region of `blocks` is not here:
    /// its map marks it not received (0x6). The engine's map, not only the
    /// durable one: a mark is acted on at once, and durable before any data
    /// it covers arrives (a crash before that forgets it, and the source's
    /// marks send the region again).
    fn not_received(&self, n: usize, blocks: &Range<usize>) -> bool {
        regions_of(blocks).any(|r| self.nodes[n].map().get(r) == CELL_RESYNC)
    }

    /// A read completed: `Ok` with every block at least its floor and none
    /// a discarded write (see the file header), or `Unavailable` where the
    /// data is durably not received, or `Secondary` on an async secondary.
    fn check_read(&mut self, n: usize, read: Read, result: Result<(), EngineError>) {
        let blocks = read.blocks.clone();
        if !read.readable {
            assert_eq!(
                result,
                Err(EngineError::Secondary),
                "node {n}: a read on an async secondary completed with {result:?}"
            );
            return;
        }
        match result {
            Ok(()) => {
                let data = read.data.unwrap_or_else(|| {
                    panic!("node {n}: read of blocks {blocks:?} completed without reading the disk")
                });
                for (b, (have, floor)) in blocks.zip(data) {
                    let Some(floor) = floor else {
                        self.counts.read_blocks_lagging += 1;
                        continue;
                    };
                    self.counts.read_blocks_checked += 1;
                    if have < floor {
                        let w = &self.writes[floor as usize];
                        panic!(
                            "node {n}: read of block {b} (submitted at step {}) returned write \
                             {have}, but write {floor} (node {}, submitted at step {}, \
                             acknowledged at step {:?}) was acknowledged before; cells {}{}",
                            read.submitted,
                            w.node,
                            w.submitted,
                            w.completed,
                            self.cells(region_of(b)),
                            self.losses(region_of(b)),
                        );
                    }
                    if self.promises.is_dead(b, have) {
                        panic!(
                            "node {n}: read of block {b} (submitted at step {}) returned write \
                             {have} (node {}, submitted at step {}), which a failover \
                             discarded; cells {}{}",
                            read.submitted,
                            self.writes[have as usize].node,
                            self.writes[have as usize].submitted,
                            self.cells(region_of(b)),
                            self.losses(region_of(b)),
                        );
                    }
                }
            }
            Err(EngineError::Unavailable) => {
                self.counts.reads_unavailable += 1;
                assert!(
                    self.not_received(n, &blocks),
                    "node {n}: read of blocks {blocks:?} failed as unavailable, but its map \
                     does not mark any of its regions not received (cells {:?})",
                    regions_of(&blocks)
                        .map(|r| self.cells(r))
                        .collect::<Vec<_>>()
                );
            }
            Err(e) => panic!("node {n}: read of blocks {blocks:?} failed with {e:?}"),
        }
    }

    // ----- the network ----------------------------------------------------

    /// Delivers the next message of `wire` (as gmdd's receive loop and the
    /// runtime do): one of a session the receiver's link does not take from
    /// the sender ([`Link::session_with`]: pending or in force) is dropped;
    /// one of the session it takes waits while its engine is not connected
    /// yet (the responder before `Go`), or has no slot for it.
    fn deliver(&mut self, wire: usize) {
        let to = 1 - wire;
        if self.nodes[to].engine.is_none() {
            return;
        }
        // A passing message may go first (as when the datagrams of those
        // before it were lost); any other waits for all before it.
        let passers: Vec<usize> = (1..self.wires[wire].len())
            .filter(|&i| self.wires[wire][i].passing)
            .collect();
        let at = if !passers.is_empty() && self.rng.gen_bool(faults::PASS_CHANCE) {
            passers[self.rng.gen_range(0..passers.len())]
        } else {
            0
        };
        let Some(packet) = self.wires[wire].get(at) else {
            return;
        };
        let session = packet.session;
        let needs_slot = matches!(
            packet.msg,
            Msg::Write { .. } | Msg::Flush { .. } | Msg::Resync { .. } | Msg::ResyncCheck { .. }
        );
        let taken = self.nodes[to].link.session_with(NAMES[wire]);
        if taken != Some(session) {
            self.wires[wire].remove(at);
            self.counts.old_dropped += 1;
            return;
        }
        if !self.engine(to).is_connected() {
            self.counts.held += 1;
            return;
        }
        assert_eq!(
            self.nodes[to].engine_session, session,
            "node {to}'s engine would take a message of another session"
        );
        if needs_slot && !self.engine(to).peer_slot_available() {
            return;
        }
        if at != 0 {
            self.counts.passed += 1;
        }
        let msg = self.wires[wire].remove(at).expect("chosen").msg;
        self.hand_over(to, msg);
        self.pump(to);
    }

    /// Gives a message of the current session to node `to`'s engine.
    fn hand_over(&mut self, to: usize, msg: Msg) {
        let op = |seq, after, request, resync_region| PeerOp {
            seq,
            after,
            request,
            resync_region,
        };
        let (seq, id, resync, peer_op) = match msg {
            Msg::Write {
                seq,
                after,
                id,
                request,
            } => (seq, id, None, op(seq, after, request, None)),
            Msg::Flush { seq } => {
                let flush = Request {
                    kind: OpKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    fua: false,
                };
                (seq, 0, None, op(seq, 0, flush, None))
            }
            Msg::Resync {
                seq,
                region,
                blocks,
            } => {
                let bytes = region_bytes(region, SIZE);
                let request = Request {
                    kind: OpKind::Write,
                    offset_bytes: bytes.start,
                    len_bytes: bytes.end - bytes.start,
                    fua: false,
                };
                (seq, 0, Some(blocks), op(seq, 0, request, Some(region)))
            }
            Msg::ResyncCheck {
                seq,
                region,
                blocks,
            } => {
                let slot = self.engine(to).peer_check(seq, region);
                self.nodes[to]
                    .slots
                    .insert(slot, SlotData::PeerCheck { seq, blocks });
                return;
            }
            Msg::Ack { seq, ok } => {
                let result = if ok {
                    Ok(())
                } else {
                    Err(EngineError::Remote(5))
                };
                self.engine(to).remote_done(seq, result);
                return;
            }
            Msg::Prioritize { region } => {
                self.engine(to).prioritize(region);
                return;
            }
            Msg::ResyncAdd { region } => {
                self.engine(to).resync_added(region);
                return;
            }
            Msg::Adopted { current } => {
                self.engine(to).peer_adopted(current);
                return;
            }
            Msg::Term { term } => {
                self.engine(to).peer_promoted(term);
                return;
            }
        };
        let slot = self.engine(to).peer_op(peer_op);
        self.nodes[to]
            .slots
            .insert(slot, SlotData::Peer { seq, id, resync });
    }

    /// The network between the nodes breaks: messages on the wires are
    /// lost, or (`GMD_SIM_OLD_MESSAGES`) some arrive later; handshake
    /// messages are lost.
    fn break_wires(&mut self) {
        self.control.clear();
        for wire in &mut self.wires {
            if self.faults.old_messages {
                wire.retain(|_| self.rng.gen_bool(faults::OLD_MESSAGE_SURVIVAL));
            } else {
                wire.clear();
            }
        }
    }

    /// A partition: both daemons lose their peer.
    fn partition(&mut self) {
        self.note("partition".into());
        self.link_up = false;
        self.break_wires();
        for n in 0..2 {
            self.peer_lost(n);
        }
    }

    // ----- crashes --------------------------------------------------------

    /// Node `n` stops at once (a process crash, or with `cut` a power cut):
    /// its peer's daemon sees it go; a dead engine acknowledges nothing and
    /// commits nothing more.
    fn crash(&mut self, n: usize, cut: Option<PowerCut>) {
        match cut {
            None => self.note(format!("crash node {n}")),
            Some(cut) => self.note(format!("power cut node {n} ({cut:?})")),
        }
        let engine = self.nodes[n].engine.take().expect("running");
        self.nodes[n].map_at_crash = engine.map().clone();
        {
            let node = &mut self.nodes[n];
            node.tasks.clear();
            node.connecting = false;
            node.link.end();
            node.engine_session = 0;
            node.part = Part::None;
        }
        if self.switch.is_some_and(|s| s.involves(n)) {
            self.abandon_switch("a node of the switch went down");
        }
        self.break_wires();
        self.peer_lost(1 - n);
        // In-flight local writes land (in the cache) or not.
        let locals = std::mem::take(&mut self.nodes[n].locals);
        for slot in locals {
            let request = *engine.request(slot);
            let writes = matches!(
                self.nodes[n].slots.get(&slot),
                Some(SlotData::AppWrite { .. } | SlotData::Peer { .. })
            );
            if !writes || !request.kind.changes_data() || !self.rng.gen_bool(0.5) {
                continue;
            }
            let blocks = blocks_of(&request);
            let contents = self.contents(n, slot, blocks.len());
            for (i, b) in blocks.enumerate() {
                self.nodes[n].disk.write(b, contents[i], false);
            }
        }
        // A commit in flight lands page by page (and the superblock) or not.
        if let Some(commit) = self.nodes[n].map_in_flight.take() {
            self.land(n, commit, false);
        }
        // Writes in flight from this node's application are unacknowledged for ever.
        for data in self.nodes[n].slots.values() {
            if let SlotData::AppWrite { id } = data {
                self.writes[*id as usize].completed = Some(self.step);
            }
        }
        let node = &mut self.nodes[n];
        node.slots.clear();
        node.flushes.clear();
        node.syncs.clear();
        node.busy_blocks.clear();
        node.down_since = Some(self.step);
        node.map_failed = None;
        node.app_stopped = false;
        if let Some(cut) = cut {
            self.power_cut(n, cut);
        }
    }

    /// The disk of node `n` loses its cache (all, or each block with
    /// probability 1/2); the writer's unflushed writes are promised no more.
    fn power_cut(&mut self, n: usize, cut: PowerCut) {
        let lost = self.nodes[n].disk.power_cut(cut, &mut self.rng);
        self.counts.power_cuts += 1;
        self.counts.blocks_lost += lost.len();
        self.note(format!(
            "node {n}: power cut lost {} cached blocks",
            lost.len()
        ));
        if n == self.writer {
            self.promises.power_cut();
        }
        if !lost.is_empty() {
            self.nodes[n].behind = Some(self.step);
        }
        for (b, id) in lost {
            self.nodes[n].lost[b] = Some((id, self.step));
            self.nodes[n].cut_blocks[b] = true;
        }
    }

    /// Starts node `n`'s device in `role` from what its disks hold: the
    /// engine over its durable map and generations, a new incarnation of
    /// its link (`Link::started`), the role recorded in its superblock.
    fn start_engine(&mut self, n: usize, role: PairRole) {
        let seed = self.rng.r#gen::<u64>();
        let node = &self.nodes[n];
        let mut engine = Engine::with_generations(
            params(self.mode, role),
            node.map_durable.clone(),
            node.gens_durable,
            seed,
        );
        engine.tick(self.step as u64);
        self.last_incarnation += 1;
        let incarnation = self.last_incarnation;
        let node = &mut self.nodes[n];
        for r in 0..REGIONS {
            node.cells_seen[r as usize] = engine.map().get(r);
        }
        node.packed_seen = engine.map().packed().to_vec();
        node.engine = Some(engine);
        node.link.started(incarnation, role);
        node.ran_primary = role == PairRole::Secondary
            && (node.recorded_role == PairRole::Primary || node.ran_primary);
        node.recorded_role = role;
        node.down_since = None;
        node.connecting = false;
        node.tasks.clear();
        node.refused_at = None;
        node.engine_session = 0;
        node.part = Part::None;
        node.resync_done = false;
        self.note(format!(
            "node {n} starts as {role} (incarnation {incarnation})"
        ));
        self.pump(n);
    }

    /// The administrator restarts a node whose map write failed, once its
    /// time has come (`now`: whatever the time).
    fn administer(&mut self, now: bool) {
        for n in 0..2 {
            if self.nodes[n]
                .map_failed
                .is_some_and(|at| now || self.step >= at)
            {
                self.note(format!(
                    "administrator stops node {n} after its map write failed"
                ));
                self.crash(n, None);
            }
        }
    }

    // ----- invariants -----------------------------------------------------

    /// The cells of region `r` on both nodes: memory/durable.
    fn cells(&self, r: u64) -> String {
        let cell = |n: usize| {
            let node = &self.nodes[n];
            let memory = node
                .engine
                .as_ref()
                .map_or("down".to_string(), |e| format!("{:#x}", e.map().get(r)));
            format!("node {n} {memory}/{:#x}", node.map_durable.get(r))
        };
        format!("[{}, {}] (memory/durable)", cell(0), cell(1))
    }

    /// What power cuts took from region `r`, and when its cells last went
    /// back to clean, for failure messages.
    fn losses(&self, r: u64) -> String {
        let mut out = String::new();
        for (n, node) in self.nodes.iter().enumerate() {
            if let Some((from, step)) = node.cleared[r as usize] {
                out += &format!("; node {n} cleared it from {from:#x} at step {step}");
            }
            let lost: Vec<_> = region_blocks(r)
                .filter_map(|b| node.lost[b].map(|(id, step)| (b, id, step)))
                .collect();
            if let Some(&(b, id, step)) = lost.last() {
                out += &format!(
                    "; node {n}'s power cuts took {} blocks of it (last: write {id} of block {b} at step {step})",
                    lost.len()
                );
            }
        }
        out
    }

    fn watch(&mut self) {
        let Some(region) = std::env::var("GMD_SIM_WATCH")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let blocks = region_blocks(region);
        let now: Vec<String> = (0..2)
            .map(|n| {
                let node = &self.nodes[n];
                let mut ids: Vec<u32> = node.disk.read(blocks.clone()).to_vec();
                ids.dedup();
                let mut durable: Vec<u32> = blocks.clone().map(|b| node.disk.durable(b)).collect();
                durable.dedup();
                format!(
                    "node {n}: mem {:?} durable {} disk {ids:?} durably {durable:?}",
                    node.engine.as_ref().map(|e| e.map().get(region)),
                    node.map_durable.get(region),
                )
            })
            .collect();
        let line = now.join(" | ");
        if self.log.last().is_none_or(|l| !l.ends_with(&line)) {
            eprintln!("{:>5} watch {line}", self.step);
            self.log.push(format!("watch {line}"));
        }
    }

    fn check(&mut self) {
        // (3d) unmarked data is durable on both sides. A block enters a
        // disk cache only when written, and a region gets unmarked only when
        // a map write clears it: those are the ones to look at.
        if self.faults.durable_marks {
            let mut regions = [false; REGIONS as usize];
            for n in 0..2 {
                for b in self.nodes[n].disk.take_written() {
                    regions[region_of(b) as usize] = true;
                }
            }
            for r in std::mem::take(&mut self.cleared_since_check) {
                regions[r as usize] = true;
            }
            for r in (0..REGIONS).filter(|&r| regions[r as usize]) {
                let unmarked =
                    self.nodes[0].map_durable.get(r) == 0 && self.nodes[1].map_durable.get(r) == 0;
                let cached = |n: usize| region_blocks(r).any(|b| self.nodes[n].disk.is_cached(b));
                if unmarked && (cached(0) || cached(1)) {
                    self.durable_violated(r);
                }
            }
        }
        let unmarked =
            |r: u64| self.nodes[0].map_durable.get(r) == 0 && self.nodes[1].map_durable.get(r) == 0;
        // (Identical disks, the common case, need no look per region.)
        let same = self.nodes[0].disk.visible() == self.nodes[1].disk.visible();
        for r in (0..REGIONS).filter(|&r| !same && unmarked(r)) {
            let blocks = region_blocks(r);
            // (3) differing regions are marked durably on one side at least.
            if self.nodes[0].disk.read(blocks.clone()) != self.nodes[1].disk.read(blocks.clone()) {
                panic!(
                    "region {r} differs between the disks but neither durable map marks it \
                     (cells {}; blocks {:?} vs {:?}){}",
                    self.cells(r),
                    self.nodes[0].disk.read(blocks.clone()),
                    self.nodes[1].disk.read(blocks.clone()),
                    self.losses(r),
                );
            }
        }
        // (5) the async backlog stays within the HWM.
        for node in &self.nodes {
            if let Some(e) = &node.engine {
                assert!(
                    e.backlog_bytes() <= params(self.mode, PairRole::Primary).hwm_bytes,
                    "backlog {} above the HWM",
                    e.backlog_bytes()
                );
            }
        }
        // (R) one writer: at most one running copy is primary, only the
        // writer, and its engine alone takes writes; a link and its engine
        // are in a session together or not at all.
        let primaries: Vec<usize> = (0..2)
            .filter(|&n| self.nodes[n].role() == Some(PairRole::Primary))
            .collect();
        assert!(
            primaries.len() <= 1 && primaries.iter().all(|&n| n == self.writer),
            "(R) primaries {primaries:?}, writer node {}",
            self.writer
        );
        for (n, node) in self.nodes.iter().enumerate() {
            if let Some(e) = &node.engine {
                assert_eq!(
                    e.params().writable,
                    node.link.role().writable(),
                    "(R) node {n}: the engine's access does not follow the link's role"
                );
                assert_eq!(
                    e.is_connected(),
                    node.link.connected().is_some(),
                    "node {n}: engine connected {} but link {:?}",
                    e.is_connected(),
                    node.link.connected()
                );
            }
        }
        // (4) holds outside resync, for a secondary that is not missing
        // regions from an interrupted resync (it says so in its map) nor
        // data it is behind on (until the next resync brings it back).
        let secondary = &self.nodes[1 - self.writer];
        let secondary_complete = (0..REGIONS).all(|r| secondary.map().get(r) != CELL_RESYNC)
            && (0..REGIONS).all(|r| secondary.map_durable.get(r) != CELL_RESYNC);
        if self.mode == Mode::Async
            && !self.resyncing()
            && secondary_complete
            && secondary.behind.is_none()
        {
            self.check_secondary_is_an_earlier_state();
        }
    }

    /// (3d) Region `r`, which neither durable map marks, is not durable on
    /// both sides: a power cut of either would leave the copies different
    /// with nothing to say so.
    fn durable_violated(&self, r: u64) -> ! {
        for (n, node) in self.nodes.iter().enumerate() {
            if let Some(b) = region_blocks(r).find(|&b| node.disk.is_cached(b)) {
                panic!(
                    "(3d) region {r}: neither durable map marks it, but node {n} holds write {} \
                     of block {b} in its volatile cache only (durable: write {}); a power cut \
                     would leave the copies different, unmarked (cells {}){}",
                    node.disk.visible()[b],
                    node.disk.durable(b),
                    self.cells(r),
                    self.losses(r),
                );
            }
        }
        unreachable!("a cached block of region {r}")
    }

    /// (4): for the newest write present on the secondary, every block holds
    /// at least what was promised before it was submitted (less what a power
    /// cut of the primary since took: the secondary may hold a copy of the
    /// primary's state after it).
    fn check_secondary_is_an_earlier_state(&self) {
        let secondary = self.nodes[1 - self.writer].disk.visible();
        // The floor now is never below the lowest since: blocks at it or
        // above pass whatever the newest write is.
        let floors = self.promises.floor_slice();
        if secondary
            .iter()
            .zip(floors)
            .all(|(have, floor)| have >= floor)
        {
            return;
        }
        let mut behind = (0..BLOCKS).filter(|&b| secondary[b] < floors[b]).peekable();
        if behind.peek().is_none() {
            return;
        }
        let newest = secondary.iter().copied().max().unwrap_or(0);
        let tick = self.writes[newest as usize].submitted_tick;
        for b in behind {
            let have = secondary[b];
            let needed = self.promises.lowest_since(b, tick);
            assert!(
                have >= needed,
                "block {b} on the secondary holds write {have} but write {needed}, promised on \
                 the primary before write {newest} (submitted at step {}) was, is missing \
                 (cells {})",
                self.writes[newest as usize].submitted,
                self.cells(region_of(b)),
            );
        }
    }

    /// (6) When a session starts (the initiator connects), every region the
    /// resync will not send holds the same data on both sides: the engines
    /// take them as identical from now on. Sent are the handshake's regions
    /// (`regions`) and those stale now (the source adds its own at connect;
    /// a target with any renegotiates).
    fn check_unsent_regions_match(&self, regions: &[u8]) {
        for r in 0..REGIONS {
            let in_set = regions[(r / 8) as usize] & (1 << (r % 8)) != 0;
            let stale = self.nodes.iter().any(|n| n.map().get(r) == CELL_STALE);
            let blocks = region_blocks(r);
            if in_set
                || stale
                || self.nodes[0].disk.read(blocks.clone()) == self.nodes[1].disk.read(blocks)
            {
                continue;
            }
            panic!(
                "(6) region {r} differs between the disks at connect, but the resync will not \
                 send it (cells {}){}",
                self.cells(r),
                self.losses(r),
            );
        }
    }

    /// Whether the only marks left, in memory and on disk, are the
    /// inconsistent cells of regions where an application write failed
    /// locally since the last handshake (only a handshake clears those).
    fn only_failed_writes_marked(&self) -> bool {
        let mut any = false;
        for node in &self.nodes {
            let memory = node.engine.as_ref().expect("running").map();
            for r in 0..REGIONS {
                for cell in [memory.get(r), node.map_durable.get(r)] {
                    if cell == 0 {
                        continue;
                    }
                    if cell != CELL_INCONSISTENT || !node.failed_regions.contains(&r) {
                        return false;
                    }
                    any = true;
                }
            }
        }
        any
    }

    fn final_checks(&self) {
        if let Some(b) = (0..BLOCKS)
            .find(|&b| self.nodes[0].disk.visible()[b] != self.nodes[1].disk.visible()[b])
        {
            let r = region_of(b);
            panic!(
                "disks differ after recovery: block {b} (region {r}) holds write {} on node 0 and \
                 write {} on node 1{}",
                self.nodes[0].disk.visible()[b],
                self.nodes[1].disk.visible()[b],
                self.losses(r),
            );
        }
        for (n, node) in self.nodes.iter().enumerate() {
            assert!(
                node.map_durable.is_clean(),
                "node {n}: durable map not clean after recovery: {} cells",
                node.map_durable.count_nonzero()
            );
            let e = node.engine.as_ref().unwrap();
            assert!(e.map().is_clean(), "node {n}: map not clean in memory");
            assert!(e.is_idle(), "node {n}: engine not idle");
            assert_eq!(
                e.stats().resync_target_remaining,
                0,
                "node {n}: still counts regions to receive with a clean map"
            );
            // Both copies hold the same data again: the same generation.
            assert_eq!(
                e.durable_generations().current,
                self.nodes[1 - n]
                    .engine
                    .as_ref()
                    .unwrap()
                    .durable_generations()
                    .current,
                "node {n}: identical clean copies with different generations"
            );
        }
        // (1) every block holds its promised write or a later one, never
        // one a failover discarded.
        for b in 0..BLOCKS {
            let have = self.nodes[0].disk.visible()[b];
            let floor = self.promises.floor(b);
            if have < floor {
                let w = &self.writes[floor as usize];
                panic!(
                    "block {b}: acknowledged write {floor} lost after recovery (written by node \
                     {}, submitted at step {}, acknowledged at step {:?}); the disks hold write \
                     {have}{}",
                    w.node,
                    w.submitted,
                    w.completed,
                    self.losses(region_of(b)),
                );
            }
            if self.promises.is_dead(b, have) {
                let w = &self.writes[have as usize];
                panic!(
                    "block {b}: after recovery the disks hold write {have} (node {}, submitted \
                     at step {}), which a failover discarded{}",
                    w.node,
                    w.submitted,
                    self.losses(region_of(b)),
                );
            }
        }
    }

    // ----- the schedule ---------------------------------------------------

    fn step(&mut self) {
        self.step += 1;
        self.administer(false);
        self.deliver_control();
        self.continue_switch();
        self.continue_unify();
        let r = self.rng.gen_range(0..100);
        let n = self.rng.gen_range(0..2);
        match r {
            0..=17 => {
                if self.nodes[n].engine.is_some() {
                    self.app_write(n);
                }
            }
            18..=21 => {
                if self.nodes[n].engine.is_some() {
                    self.app_other(n);
                }
            }
            22..=49 => {
                let locals = self.nodes[n].locals.len();
                let operations = locals + self.nodes[n].syncs.len();
                if operations > 0 {
                    match self.rng.gen_range(0..operations) {
                        i if i < locals => self.local_complete(n, i),
                        i => self.sync_done(n, i - locals),
                    }
                }
            }
            50..=61 => {
                if self.nodes[n].map_in_flight.is_some() {
                    self.map_commit_done(n);
                }
            }
            62..=85 => self.deliver(n),
            86..=93 => {
                if self.nodes[n].engine.is_some() {
                    let now = self.step as u64;
                    self.engine(n).tick(now);
                    self.pump(n);
                }
            }
            94 => {
                if self.nodes[n].engine.is_some() && self.rng.gen_bool(0.5) {
                    let cut = (self.faults.power_cut && self.rng.gen_bool(faults::POWER_CUT_SHARE))
                        .then(|| {
                            if self.rng.gen_bool(0.5) {
                                PowerCut::DropAll
                            } else {
                                PowerCut::KeepHalf
                            }
                        });
                    self.crash(n, cut);
                }
            }
            95 => {
                if self.link_up && self.rng.gen_bool(0.5) {
                    self.partition();
                } else if !self.link_up {
                    self.note("heal".into());
                    self.link_up = true;
                }
            }
            96..=97 => {
                for n in 0..2 {
                    if self.nodes[n]
                        .down_since
                        .is_some_and(|s| self.step > s + DOWN_STEPS)
                        && !self.unify_holds(n)
                    {
                        self.restart(n);
                    }
                }
                // The daemons' reconnect timers.
                for n in 0..2 {
                    self.reconnect(n);
                }
                // The administrator confirms a lost peer down (`gmdctl
                // down`): a held node goes on alone.
                for n in 0..2 {
                    if self.nodes[n]
                        .engine
                        .as_ref()
                        .is_some_and(|e| e.is_isolated())
                        && self.rng.gen_bool(faults::RELEASE_PROBABILITY)
                    {
                        self.note(format!("node {n}: peer confirmed down, held writes go on"));
                        self.counts.releases += 1;
                        self.engine(n).release_isolation();
                        self.pump(n);
                    }
                }
            }
            _ => self.administer_roles(),
        }
        self.watch();
        self.check();
    }

    /// Whether nothing is in flight anywhere: map commits, local
    /// operations, data syncs, device and handshake messages.
    fn quiet(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.map_in_flight.is_none() && n.locals.is_empty() && n.syncs.is_empty())
            && self.wires.iter().all(|w| w.is_empty())
            && self.control.is_empty()
    }

    /// Whether both links and engines are in one session.
    fn connected(&self) -> bool {
        let [a, b] = &self.nodes;
        a.engine.is_some()
            && b.engine.is_some()
            && a.engine_session != 0
            && a.engine_session == b.engine_session
    }

    /// Heals everything and runs without new application I/O until quiet.
    fn settle(&mut self) {
        self.settling = true;
        if !self.link_up {
            self.note("heal".into());
            self.link_up = true;
        }
        self.administer(true);
        let mut quiet_rounds = 0;
        for round in 0..200_000 {
            self.step += 1;
            self.continue_unify();
            for n in 0..2 {
                if self.nodes[n].engine.is_none() && !self.unify_holds(n) {
                    self.restart(n);
                }
            }
            self.deliver_control();
            self.continue_switch();
            self.resolve_refusal();
            for n in 0..2 {
                self.reconnect(n);
            }
            let mut progressed = false;
            for n in 0..2 {
                if self.nodes[n].engine.is_none() {
                    continue;
                }
                if self.nodes[n].map_in_flight.is_some() {
                    self.map_commit_done(n);
                    progressed = true;
                }
                if !self.nodes[n].locals.is_empty() {
                    self.local_complete(n, 0);
                    progressed = true;
                }
                if !self.nodes[n].syncs.is_empty() {
                    self.sync_done(n, 0);
                    progressed = true;
                }
                let before = self.wires[n].len();
                self.deliver(n);
                progressed |= self.wires[n].len() != before;
            }
            if round % 7 == 0 {
                self.tick_all();
            }
            self.watch();
            self.check();
            let quiet = !progressed && self.quiet();
            let connected = self.connected();
            let idle = self
                .nodes
                .iter()
                .all(|n| n.engine.as_ref().is_some_and(|e| e.is_idle()));
            if quiet && connected && idle && self.nodes.iter().all(|n| n.map_durable.is_clean()) {
                return;
            }
            if quiet && connected && self.only_failed_writes_marked() {
                // A region whose application write failed here stays
                // inconsistent until a handshake resends it: the operator
                // sets the link up again.
                self.note("heal: link set up again for regions whose local write failed".into());
                for n in 0..2 {
                    self.disconnect(n);
                }
                quiet_rounds = 0;
            } else if quiet {
                // Nothing happens until the engines' or daemons' clocks say
                // so: skip ahead.
                quiet_rounds += 1;
                if quiet_rounds * QUIET_SKIP_MS > STUCK_MS {
                    self.stuck();
                }
                self.step += QUIET_SKIP_MS;
                self.tick_all();
            } else {
                quiet_rounds = 0;
            }
        }
        self.stuck();
    }

    fn tick_all(&mut self) {
        for n in 0..2 {
            if self.nodes[n].engine.is_some() {
                let now = self.step as u64;
                self.engine(n).tick(now);
                self.pump(n);
            }
        }
    }

    /// The pair does not settle: says why, as far as the simulator knows.
    fn stuck(&self) -> ! {
        let stats = |n: usize| self.nodes[n].engine.as_ref().map(|e| e.stats());
        let source = (0..2).find(|&n| self.nodes[n].part == Part::Source);
        let cause = match (source, self.resync_read_failed) {
            (Some(source), Some((node, region, step))) if self.connected() => format!(
                "the resync hangs: node {node}'s resync read of region {region} failed with EIO \
                 at step {step} (Engine::resync_read_done) and the resync never finished though \
                 the session went on and nothing is in flight (source: {:?} regions to confirm, \
                 {:?} waiting to be read again; target: {:?} to receive)",
                stats(source).map(|s| s.resync_remaining),
                stats(source).map(|s| s.resync_failed_regions),
                stats(1 - source).map(|s| s.resync_target_remaining),
            ),
            (Some(source), None) if self.connected() => format!(
                "the resync from node {source} never finishes though nothing is in flight \
                 (source: {:?} regions to confirm; target: {:?} to receive)",
                stats(source).map(|s| s.resync_remaining),
                stats(1 - source).map(|s| s.resync_target_remaining),
            ),
            _ if self.connected() => {
                "marks remain though nothing is in flight and no resync runs".to_string()
            }
            _ => {
                let link = |n: usize| {
                    let node = &self.nodes[n];
                    format!(
                        "link {:?} connecting {} tasks {:?} \
                         refused at {:?}",
                        node.link, node.connecting, node.tasks, node.refused_at,
                    )
                };
                format!(
                    "the link does not come up (node 0: {}; node 1: {}; control messages {}; \
                     last refusal {:?})",
                    link(0),
                    link(1),
                    self.control.len(),
                    self.last_refusal
                        .as_ref()
                        .map(|(at, r)| format!("step {at}: {r}")),
                )
            }
        };
        let marks = |n: usize| -> Vec<(u64, u8, u8)> {
            (0..REGIONS)
                .filter(|&r| self.nodes[n].map_durable.get(r) != 0)
                .map(|r| {
                    (
                        r,
                        self.nodes[n].map_durable.get(r),
                        self.nodes[n].engine.as_ref().map_or(99, |e| e.map().get(r)),
                    )
                })
                .collect()
        };
        let waiting = |n: usize| {
            self.nodes[n]
                .slots
                .values()
                .filter(|d| {
                    matches!(
                        d,
                        SlotData::AppRead(_)
                            | SlotData::AppWrite { .. }
                            | SlotData::AppFlush { .. }
                    )
                })
                .count()
        };
        panic!(
            "the pair did not settle: {cause}. Roles {:?} / {:?}, generations {} / {}, \
             application requests waiting {} / {}, parts {:?} / {:?}, wires {} {}, durable marks \
             (region, durable, memory) {:?} / {:?}, locals {} {}, stats {:?} / {:?}",
            self.nodes[0].role(),
            self.nodes[1].role(),
            self.nodes[0].gens_durable,
            self.nodes[1].gens_durable,
            waiting(0),
            waiting(1),
            self.nodes[0].part,
            self.nodes[1].part,
            self.wires[0].len(),
            self.wires[1].len(),
            marks(0),
            marks(1),
            self.nodes[0].locals.len(),
            self.nodes[1].locals.len(),
            stats(0),
            stats(1),
        );
    }
}

/// Runs one seed; returns what happened.
fn run(seed: u64) -> Counts {
    let mut world = World::new(seed);
    for _ in 0..STEPS {
        world.step();
    }
    world.settle();
    world.final_checks();
    world.counts
}

fn run_catching(seed: u64) -> Result<Counts, String> {
    std::panic::catch_unwind(|| run(seed)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

/// Replays one seed, printing the last events if it fails.
fn replay(seed: u64) {
    let mut world = World::new(seed);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..STEPS {
            world.step();
        }
        world.settle();
        world.final_checks();
    }));
    if result.is_err() || std::env::var_os("GMD_SIM_LOG").is_some() {
        eprintln!("mode {:?}; last events:", world.mode);
        let lines = env_number("GMD_SIM_LOG_LINES", 30) as usize;
        for line in world.log.iter().rev().take(lines).rev() {
            eprintln!("{line}");
        }
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn two_engines_keep_every_invariant_under_faults() {
    if let Ok(seed) = std::env::var("GMD_SIM_SEED") {
        replay(seed.parse().expect("GMD_SIM_SEED is a number"));
        return;
    }
    let faults = Faults::get();
    let seeds = env_number("GMD_SIM_SEEDS", 2000);
    let first = env_number("GMD_SIM_SEED_FROM", 0);
    let max_failures = env_number("GMD_SIM_MAX_FAILURES", 5) as usize;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut counts = Counts::default();
    for seed in first..first + seeds {
        match run_catching(seed) {
            Ok(c) => counts.add(&c),
            Err(message) => {
                failures.push(format!("seed {seed}: {message}"));
                if failures.len() >= max_failures {
                    break;
                }
            }
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "{seeds} seeds from {first}; faults:\n{}\n{counts:?}",
        faults.describe()
    );
    if seeds >= 100 && failures.is_empty() {
        assert!(
            counts.eio.iter().all(|&c| c > 0) || !faults.data_eio,
            "every kind of local write failure occurs: {:?}",
            counts.eio
        );
        for (on, happened, what) in [
            (
                faults.power_cut,
                counts.blocks_lost,
                "power cuts losing cached data",
            ),
            (faults.map_eio, counts.map_failures, "map write failures"),
            (
                faults.resync_eio,
                counts.resync_read_failures,
                "resync read failures",
            ),
            (faults.sync_eio, counts.sync_failures, "data sync failures"),
            (
                faults.old_messages,
                counts.old_dropped,
                "old-session messages dropped",
            ),
            (true, counts.read_blocks_checked, "read blocks checked"),
            (
                true,
                counts.read_blocks_lagging,
                "read blocks of a lagging replica",
            ),
            (true, counts.held, "device messages held until Go"),
            (
                true,
                counts.passed,
                "device messages delivered before earlier ones",
            ),
            (
                faults.isolation,
                counts.isolations,
                "primaries holding writes",
            ),
            (faults.isolation, counts.releases, "held primaries released"),
            (true, counts.checks_same, "resync regions found the same"),
            (true, counts.checks_differ, "resync regions found different"),
            (true, counts.writes_refused, "writes refused on a secondary"),
            (true, counts.switches, "role switches"),
            (true, counts.failovers, "failovers"),
            (
                true,
                counts.restarted_secondary,
                "old primaries restarted as secondary",
            ),
        ] {
            assert!(!on || happened > 0, "no {what} in {seeds} seeds");
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing seed(s) (replay with GMD_SIM_SEED=<n>):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
