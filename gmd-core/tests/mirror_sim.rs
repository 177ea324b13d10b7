//! Deterministic simulation of two mirror engines (`gmd_core::engine`, the
//! real sans-IO state machines) with simulated disks, map commits, ordered
//! wires and an application, under faults. Only one node's application
//! writes: the primary ([`World::primary`], node 0); the other's reads.
//!
//! # Faults
//! Each has a switch (a constant default, overridden by an environment
//! variable: `1` on, `0` off) and a probability, in `mirror_sim/faults.rs`.
//! The defaults keep the default run green on today's engine.
//! - Always: local operations complete in any order; map commits complete in
//!   order and are torn page by page by crashes; links break (partitions,
//!   renegotiation, a stalled peer) and heal; nodes crash (the process: the
//!   disks' caches stay) and restart some steps later with their durable map.
//! - `GMD_SIM_DATA_EIO` (on, 1 %): a local data write — the application's,
//!   the peer's or resync data — fails with EIO, having written any subset
//!   of its blocks. The application write completes with the error,
//!   unacknowledged (what it left counts as a later write over earlier
//!   ones); a peer write or resync data is answered with the error.
//! - `GMD_SIM_POWER_CUT` (on, half the crashes): the disks have a volatile
//!   write cache (`mirror_sim/disk.rs`; always modelled): a completed write
//!   is durable only once a flush of that disk completes (an `OpKind::Flush`
//!   local operation, or the engine's `Action::SyncData`; each covers what
//!   was cached when it was issued) or if it was written with FUA. A power cut is a crash that also loses the
//!   cache: all of it, or each cached block with probability 1/2. Map
//!   commits are durable once complete (the runtime writes and fdatasyncs).
//! - `GMD_SIM_MAP_EIO` (on, 0.2 % of commits): a map commit fails (each of
//!   its pages landed or not); the engine fails writes with `MapFailed`
//!   from then on, and the administrator restarts the node 5–40 steps later.
//! - `GMD_SIM_RESYNC_EIO` (on, 1 %): a resync read fails with EIO; the
//!   engine reads the region again after a back-off.
//! - `GMD_SIM_SYNC_EIO` (on, 1 %): the engine's data sync (`SyncData`, the
//!   local half of a barrier before marks are cleared) fails with EIO.
//! - `GMD_SIM_OLD_MESSAGES` (on, 30 %): every message carries the link
//!   session it was sent in; a message on the wire survives a link loss with
//!   this probability and arrives once the receiver is in a session again.
//!   The receiver drops messages of another session ([`wire::accepts`], the
//!   daemon's receive loop); the engine must never see one.
//!
//! # Invariants checked after every step
//! - (3) wherever the two disks differ, at least one durable map marks the region;
//! - (3d) with `GMD_SIM_DURABLE_MARKS` (on): wherever neither durable map
//!   marks a region, its data is durable on both sides (a mark may be
//!   cleared only once the data it covers survives a power cut of either
//!   side; otherwise a power cut leaves the copies different, unmarked);
//! - (5) async: bytes completed but not acknowledged never exceed the HWM;
//! - (4) async, outside resync and not after a power cut of the secondary
//!   until the next resync: the secondary holds a state the primary went
//!   through — for the newest write present there, every block holds at
//!   least what was acknowledged before that write was submitted, less what
//!   a power cut of the primary since took (unflushed writes).
//!
//! # At every connect
//! - (6) every region the resync will not send (neither in the handshake's
//!   set nor stale) holds the same data on both sides.
//!
//! # At the completion of every application request
//! - Writes: `Ok`; EIO when the local part failed; `MapFailed` only after a
//!   map commit failed on that node; `Unavailable` only as for reads.
//! - Flushes: `Ok` (`MapFailed` after a map commit failed there, promising
//!   nothing). A completed flush makes every write acknowledged before
//!   it was submitted durable (promise 2); a FUA write is durable once
//!   acknowledged (`mirror_sim/oracle.rs`).
//! - Reads (`Read`): never issued to the disk where the node's map marks
//!   the data not received (promise 4). The data is recorded when the read's local operation
//!   completes. Every block must hold the latest write acknowledged before
//!   the read was submitted, or a later one (in flight, failed, or
//!   acknowledged meanwhile) — less only by what a power cut of the writer
//!   since took (unflushed writes). On the secondary, blocks the writer's
//!   map marks as possibly different on the peer (a write in flight, queued,
//!   stale, or inconsistent), or after the secondary's own power cut until
//!   the next resync, may hold older writes. A read fails only with
//!   `Unavailable`, and only where the node's map marks the data not
//!   received (0x6; the engine's map: the mark is acted on before its
//!   commit, and made durable before any data it covers arrives).
//!
//! # At the end, once everything is healed and quiet
//! - (3) both disks are identical, both durable maps are clean and no region
//!   still counts as awaiting resync data; a region whose application write
//!   failed locally stays inconsistent (0x7) until a handshake resends it,
//!   so healing sets the link up again when only such marks are left;
//! - (1) every block holds its promised write or a later one.
//!
//! A pair that goes quiet with marks left fails, naming the cause (a resync
//! stopped by a read error, for one). A failing seed is printed; replay one
//! with `GMD_SIM_SEED=<n>` (`GMD_SIM_TRACE=1` prints every action,
//! `GMD_SIM_WATCH=<region>` one region's cells and blocks), change the count
//! with `GMD_SIM_SEEDS=<n>` (default 2000), the first seed with
//! `GMD_SIM_SEED_FROM=<n>`, how many failures to collect before stopping
//! with `GMD_SIM_MAX_FAILURES=<n>` (default 5).

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
    Action, Connection, Engine, EngineError, EngineParams, Epoch, OpKind, PeerOp, Request,
    ResyncRole, Seq, Slot,
};
use gmd_core::statemap::StateMap;
use gmd_core::statemap::cells::{
    CELL_ACTIVE, CELL_CONSISTENT, CELL_INCONSISTENT, CELL_RESYNC, CELL_STALE,
};
use gmd_core::statemap::format::Layout;
use gmd_core::units::{REGION_SIZE_BYTES, region_bytes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use disk::{CacheSnapshot, Disk, PowerCut};
use faults::Faults;
use oracle::Promises;
use wire::{Msg, Packet};

const BLOCK: u64 = 512;
const REGIONS: u64 = 48;
const SIZE: u64 = REGIONS * REGION_SIZE_BYTES;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const STEPS: usize = 1500;
/// The node whose application writes when a run starts (the primary); see
/// [`World::primary`]. Role changes (promote, demote, failover) will move it.
const PRIMARY: usize = 0;
/// Steps a crashed node stays down at least.
const DOWN_STEPS: usize = 20;
/// Milliseconds the settle phase skips ahead when nothing is in flight
/// (idle regions leave the activity set, failed resync reads are retried
/// after a back-off of up to a minute).
const QUIET_SKIP_MS: usize = 100;
/// Milliseconds with nothing in flight after which a pair that still has
/// marks is stuck.
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
    /// An application flush; the floors when it was submitted.
    AppFlush {
        floors: Vec<WriteId>,
    },
    AppRead(Read),
    Peer {
        seq: Seq,
        id: WriteId,
        resync: Option<Vec<WriteId>>,
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
    /// Set when its local operation completes: per block, what the disk held
    /// and the oldest write it may hold (`None`: this replica may lag there).
    data: Option<Vec<(WriteId, Option<WriteId>)>>,
}

/// Pages of a map commit with their cells.
type PageImages = Vec<(u64, Vec<u8>)>;

struct Node {
    engine: Option<Engine>,
    disk: Disk,
    map_durable: StateMap,
    map_in_flight: Option<(Epoch, PageImages)>,
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
    /// The step of a power cut that lost cached writes here, until the next
    /// resync finished (or a connect without one).
    lost_cache: Option<usize>,
    /// Per block, the write its last power cut took, and when.
    lost: Vec<Option<(WriteId, usize)>>,
    /// Per region, the engine's cell as last seen, and the value it last
    /// went back to clean from, and when.
    cells_seen: Vec<u8>,
    cleared: Vec<Option<(u8, usize)>>,
    /// The engine's packed map as last seen (to skip unchanged maps).
    packed_seen: Vec<u8>,
    /// The link session this node's receiver is in (0: none).
    link_session: u64,
    /// This incarnation of the node's device (a new one at each start), and
    /// whose sessions its hot regions come from.
    incarnation: u64,
    hot_peer: HotPeer,
    /// Each of the engine's data syncs in flight (`Action::SyncData`): its
    /// id, when it was issued and what the disk had cached then, in issue
    /// order.
    syncs: Vec<(u64, usize, CacheSnapshot)>,
}

impl Node {
    fn new(engine: Engine) -> Node {
        Node {
            engine: Some(engine),
            disk: Disk::new(BLOCKS),
            map_durable: StateMap::new(SIZE),
            map_in_flight: None,
            map_at_crash: StateMap::new(SIZE),
            slots: HashMap::new(),
            flushes: HashMap::new(),
            locals: Vec::new(),
            busy_blocks: HashSet::new(),
            failed_regions: HashSet::new(),
            down_since: None,
            map_failed: None,
            lost_cache: None,
            lost: vec![None; BLOCKS],
            cells_seen: vec![CELL_CONSISTENT; REGIONS as usize],
            cleared: vec![None; REGIONS as usize],
            packed_seen: StateMap::new(SIZE).packed().to_vec(),
            link_session: 0,
            incarnation: 1,
            hot_peer: HotPeer::Nobody,
            syncs: Vec::new(),
        }
    }

    /// The map this node acts on: the engine's, or the one it had when it went down.
    fn map(&self) -> &StateMap {
        self.engine.as_ref().map_or(&self.map_at_crash, |e| e.map())
    }
}

fn params(mode: Mode, writable: bool) -> EngineParams {
    EngineParams {
        size_bytes: SIZE,
        block_size: BLOCK as u32,
        io_len_max: 64 << 10,
        slots_max: 6,
        peer_slots_max: 6,
        resync_slots_max: 2,
        writable,
        readable: true,
        mode,
        hwm_bytes: 24 << 10,
        resync_in_flight_max_bytes: 64 << 10,
        activity_regions: 6,
        activity_idle_ms: 40,
        // Steps are milliseconds: a peer silent this long while messages
        // wait (a wire held up by the scenario) is dropped like a cut link.
        peer_stall_ms: 300,
    }
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
}

/// A handshake in progress: what the daemons agreed from the maps they
/// read, to be carried out at connect.
#[derive(Clone, Debug)]
struct Handshake {
    source: usize,
    /// The regions to resend, one bit per region.
    bits: Vec<u8>,
    /// Steps until the connect.
    delay: usize,
    /// Per node: its stale cells and its durable generation when its map
    /// was read, and its device's incarnation.
    stale: [u64; 2],
    current: [u64; 2],
    incarnation: [u64; 2],
}

/// Who acknowledged the writes behind a running device's hot regions
/// (`gmd_core::link::HotPeer`, for the one peer a node has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HotPeer {
    /// No session since the device started.
    Nobody,
    /// Every session was with this incarnation of the peer's device.
    Only(u64),
    /// Sessions with several incarnations.
    Several,
}

impl HotPeer {
    fn session_with(&mut self, incarnation: u64) {
        *self = match *self {
            HotPeer::Nobody => HotPeer::Only(incarnation),
            HotPeer::Only(i) if i == incarnation => HotPeer::Only(i),
            _ => HotPeer::Several,
        };
    }
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
    /// Messages of an ended session dropped by a receiver in a newer one.
    old_dropped: usize,
    /// Blocks of successful reads checked against the promises…
    read_blocks_checked: usize,
    /// …and those excused because the reading replica may lag there.
    read_blocks_lagging: usize,
    reads_unavailable: usize,
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
        self.read_blocks_checked += other.read_blocks_checked;
        self.read_blocks_lagging += other.read_blocks_lagging;
        self.reads_unavailable += other.reads_unavailable;
    }
}

struct World {
    rng: StdRng,
    faults: Faults,
    mode: Mode,
    /// The node whose application writes (and which is the resync source
    /// unless the other holds stale marks). See [`World::primary`].
    primary: usize,
    nodes: [Node; 2],
    /// Messages in flight per direction (0: node 0 → node 1).
    wires: [VecDeque<Packet>; 2],
    link_up: bool,
    connected: bool,
    /// The link session in force (0: none), and the last one handed out.
    session: u64,
    last_session: u64,
    /// Node that is source of the resync in progress, if any.
    resync_source: Option<usize>,
    resync_done: [bool; 2],
    /// A resync read of the current session failed: (node, region, step).
    resync_read_failed: Option<(usize, u64, usize)>,
    next_id: WriteId,
    writes: Vec<History>,
    promises: Promises,
    step: usize,
    /// The final phase: no new faults but data EIO and resync read errors.
    settling: bool,
    log: Vec<String>,
    /// A handshake whose maps were read but whose connect has not happened
    /// yet. Writes go on meanwhile.
    handshaking: Option<Handshake>,
    /// Application writes whose local part failed (never acknowledged).
    failed_writes: HashSet<WriteId>,
    counts: Counts,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = [Mode::Sync, Mode::Mwc, Mode::Async][rng.gen_range(0..3)];
        let node =
            |n: usize| Node::new(Engine::new(params(mode, n == PRIMARY), StateMap::new(SIZE)));
        let mut world = World {
            rng,
            faults: Faults::get(),
            mode,
            primary: PRIMARY,
            nodes: [node(0), node(1)],
            wires: [VecDeque::new(), VecDeque::new()],
            link_up: true,
            connected: false,
            session: 0,
            last_session: 0,
            resync_source: None,
            resync_done: [false, false],
            resync_read_failed: None,
            next_id: 1,
            writes: vec![History {
                node: PRIMARY,
                blocks: 0..0,
                fua: false,
                submitted: 0,
                submitted_tick: 0,
                completed: Some(0),
                acked: true,
            }],
            promises: Promises::new(BLOCKS),
            step: 0,
            settling: false,
            log: Vec::new(),
            handshaking: None,
            failed_writes: HashSet::new(),
            counts: Counts::default(),
        };
        world.handshake();
        world
    }

    /// The node whose application writes. Only it writes (CONSISTENCY.md,
    /// "One writer"); the other is read-only in every mode.
    fn primary(&self) -> usize {
        self.primary
    }

    fn note(&mut self, text: String) {
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
                let session = self.session;
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
                assert!(
                    self.nodes[n].map_in_flight.is_none(),
                    "two map commits in flight"
                );
                self.nodes[n].map_in_flight = Some((epoch, pages));
            }
            Action::Complete(slot, result) => self.completed(n, slot, result),
            Action::SendWrite {
                slot,
                seq,
                after,
                request,
            } => {
                let Some(SlotData::AppWrite { id }) = self.nodes[n].slots.get(&slot).cloned()
                else {
                    panic!("SendWrite of a slot without a write")
                };
                self.send(
                    n,
                    Msg::Write {
                        seq,
                        after,
                        id,
                        request,
                    },
                );
            }
            Action::SendFlush { seq } => self.send(n, Msg::Flush { seq }),
            Action::Reply(slot, result) => {
                let Some(SlotData::Peer { seq, .. }) = self.nodes[n].slots.remove(&slot) else {
                    panic!("Reply for a slot without a peer op")
                };
                let ok = result.is_ok();
                self.send(n, Msg::Ack { seq, ok });
            }
            Action::Discard(slot) => {
                let Some(SlotData::Peer { .. }) = self.nodes[n].slots.remove(&slot) else {
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
            Action::SendPrioritize { region } => self.send(n, Msg::Prioritize { region }),
            Action::SendResyncAdd { region } => self.send(n, Msg::ResyncAdd { region }),
            Action::SendAdopted { current } => self.send(n, Msg::Adopted { current }),
            Action::SyncData(sync) => {
                // Two syncs in flight (the first one's barrier was dropped
                // with its link): counted; each reports its own id.
                if !self.nodes[n].syncs.is_empty() {
                    self.counts.syncs_overlapping += 1;
                }
                let cached = self.nodes[n].disk.cached();
                self.nodes[n].syncs.push((sync, self.step, cached));
            }
            Action::Renegotiate => {
                self.note(format!("node {n} asks to renegotiate"));
                self.link_lost();
            }
            Action::PeerStalled { waited_ms } => {
                self.note(format!(
                    "node {n}: peer silent for {waited_ms} ms, link dropped"
                ));
                self.link_lost();
            }
            Action::ResyncDone => {
                self.note(format!("resync done on node {n}"));
                self.resync_done[n] = true;
                if self.resync_done[0] && self.resync_done[1] {
                    self.resync_source = None;
                    self.resync_finished();
                }
            }
        }
    }

    /// Queues a message from node `n` on its wire, tagged with its session
    /// (like the daemon, nothing is sent without one).
    fn send(&mut self, n: usize, msg: Msg) {
        let session = self.nodes[n].link_session;
        if session != 0 {
            self.wires[n].push_back(Packet { session, msg });
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
        if let Some(SlotData::AppRead(read)) = self.nodes[n].slots.get(&slot) {
            // Promise 4: a replica never serves data it knows it lacks.
            assert!(
                !self.not_received(n, &read.blocks),
                "node {n} reads blocks {:?} from its disk, but its map marks them not received \
                 (cells {:?})",
                read.blocks,
                regions_of(&read.blocks)
                    .map(|r| self.cells(r))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// A resync finished on both sides: the data a power cut took is back
    /// (check (6) and the final state tell if it was not).
    fn resync_finished(&mut self) {
        for node in &mut self.nodes {
            node.lost_cache = None;
        }
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
            OpKind::Read => self.read_done(n, slot, &request),
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
                    if session == self.session && self.connected {
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
    /// queued, stale, inconsistent), or a power cut took part of the
    /// reader's cache since its last resync.
    fn may_lag(&self, reader: usize, b: usize) -> bool {
        if reader == self.primary() {
            return false;
        }
        if self.nodes[reader].lost_cache.is_some() {
            return true;
        }
        let cell = self.nodes[self.primary()].map().get(region_of(b));
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

    fn map_commit_done(&mut self, n: usize) {
        let (epoch, pages) = self.nodes[n]
            .map_in_flight
            .take()
            .expect("commit in flight");
        let fails =
            !self.settling && self.faults.map_eio && self.rng.gen_bool(faults::MAP_EIO_PROBABILITY);
        let mut packed = self.nodes[n].map_durable.packed().to_vec();
        for (page, cells) in pages {
            // A failed commit may have written any of its pages.
            if !fails || self.rng.gen_bool(0.5) {
                let range = Layout::page_cells(page, packed.len());
                packed[range].copy_from_slice(&cells);
            }
        }
        self.nodes[n].map_durable = StateMap::from_packed(SIZE, packed).unwrap();
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

    fn app_write(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() || n != self.primary() {
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
        let kind = match self.rng.gen_range(0..10) {
            0 => OpKind::WriteZeroes,
            1 => OpKind::Trim,
            _ => OpKind::Write,
        };
        let request = Request {
            kind,
            offset_bytes: blocks.start as u64 * BLOCK,
            len_bytes: len as u64 * BLOCK,
            fua: self.rng.gen_bool(0.1),
        };
        self.nodes[n].busy_blocks.extend(blocks.clone());
        self.writes.push(History {
            node: n,
            blocks,
            fua: request.fua,
            submitted: self.step,
            submitted_tick: self.promises.now(),
            completed: None,
            acked: false,
        });
        let slot = self.engine(n).submit(request);
        self.nodes[n].slots.insert(slot, SlotData::AppWrite { id });
        self.pump(n);
    }

    /// A flush (the writer only) or a read (either node).
    fn app_other(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() {
            return;
        }
        let (request, data) = if n == self.primary() && self.rng.gen_bool(0.5) {
            let flush = Request {
                kind: OpKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                fua: false,
            };
            let floors = self.promises.floors();
            (flush, SlotData::AppFlush { floors })
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
            SlotData::AppFlush { floors } => {
                // A flush whose peer part was lost fails once the map failed
                // (it cannot mark anything); it promises nothing then.
                let map_failed = self.nodes[n].map_failed.is_some();
                match result {
                    Ok(()) => self.promises.flushed(&floors),
                    Err(EngineError::MapFailed) if map_failed => {}
                    Err(e) => panic!("node {n}: flush failed with {e:?}"),
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
        let (blocks, fua) = (h.blocks.clone(), h.fua);
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
            self.promises.acknowledged(blocks, id, fua);
        }
    }

    /// Whether node `n` knows the data of a region of `blocks` is not here:
    /// its map marks it not received (0x6). The engine's map, not only the
    /// durable one: a mark is acted on at once, and durable before any data
    /// it covers arrives (a crash before that forgets it, and the source's
    /// marks send the region again).
    fn not_received(&self, n: usize, blocks: &Range<usize>) -> bool {
        regions_of(blocks).any(|r| self.nodes[n].map().get(r) == CELL_RESYNC)
    }

    /// A read completed: `Ok` with every block at least its floor (see the
    /// file header), or `Unavailable` where the data is durably not received.
    fn check_read(&mut self, n: usize, read: Read, result: Result<(), EngineError>) {
        let blocks = read.blocks.clone();
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

    /// Delivers the next message of `wire`, if its receiver is in a session:
    /// one of another session is dropped there ([`wire::accepts`]).
    fn deliver(&mut self, wire: usize) {
        let to = 1 - wire;
        let current = self.nodes[to].link_session;
        if current == 0 {
            // Nobody receives: messages wait in the network.
            return;
        }
        let Some(packet) = self.wires[wire].front() else {
            return;
        };
        if !wire::accepts(current, packet) {
            self.wires[wire].pop_front();
            self.counts.old_dropped += 1;
            return;
        }
        assert!(
            self.connected && packet.session == self.session,
            "node {to} would take a message of session {} in session {}: {:?}",
            packet.session,
            self.session,
            packet.msg
        );
        let needs_slot = matches!(
            packet.msg,
            Msg::Write { .. } | Msg::Flush { .. } | Msg::Resync { .. }
        );
        if needs_slot && !self.engine(to).peer_slot_available() {
            return;
        }
        let msg = self.wires[wire].pop_front().expect("front").msg;
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
        };
        let slot = self.engine(to).peer_op(peer_op);
        self.nodes[to]
            .slots
            .insert(slot, SlotData::Peer { seq, id, resync });
    }

    /// The link session ends: both engines lose their peer. Messages on the
    /// wires are lost, or (`GMD_SIM_OLD_MESSAGES`) some arrive later.
    fn link_lost(&mut self) {
        self.handshaking = None;
        if !self.connected {
            return;
        }
        self.connected = false;
        self.session = 0;
        self.resync_source = None;
        self.resync_read_failed = None;
        for node in &mut self.nodes {
            node.link_session = 0;
        }
        for wire in &mut self.wires {
            if self.faults.old_messages {
                wire.retain(|_| self.rng.gen_bool(faults::OLD_MESSAGE_SURVIVAL));
            } else {
                wire.clear();
            }
        }
        for n in 0..2 {
            if self.nodes[n].engine.is_some() {
                self.engine(n).peer_lost();
                self.pump(n);
            }
        }
    }

    /// What the daemons do when both sides are running and can talk.
    fn handshake(&mut self) {
        if self.connected
            || self.handshaking.is_some()
            || !self.link_up
            || self.nodes.iter().any(|n| n.engine.is_none())
        {
            return;
        }
        let stale = |w: &World, n: usize| {
            let map = w.nodes[n].engine.as_ref().unwrap().map();
            (0..map.region_count())
                .filter(|&r| map.get(r) == CELL_STALE)
                .count()
        };
        // The maps are read now: the regions whose local writes failed so
        // far are in them, and the resync that follows clears them.
        for node in &mut self.nodes {
            node.failed_regions.clear();
        }
        let (s0, s1) = (stale(self, 0), stale(self, 1));
        assert!(
            s0 == 0 || s1 == 0,
            "divergence: both sides hold stale regions ({s0}, {s1}), but only node {} writes",
            self.primary()
        );
        let source = if s0 > 0 {
            0
        } else if s1 > 0 {
            1
        } else {
            self.primary() // async: the primary; sync/mwc: the side that was running
        };
        let bits = self
            .resync_bits(0)
            .iter()
            .zip(&self.resync_bits(1))
            .map(|(x, y)| x | y)
            .collect();
        // The maps were read; the connect happens up to about a message's
        // way there and back later (Connect, Accept, Go across the network),
        // long enough for writes issued meanwhile to mark stale, be written
        // locally and acknowledged before the connect.
        let delay = if self.step == 0 {
            0
        } else {
            self.rng.gen_range(0..16)
        };
        let engine = |n: usize| self.nodes[n].engine.as_ref().expect("running");
        self.handshaking = Some(Handshake {
            source,
            bits,
            delay,
            stale: [s0 as u64, s1 as u64],
            current: [0, 1].map(|n| engine(n).durable_generations().current),
            incarnation: [0, 1].map(|n| self.nodes[n].incarnation),
        });
        self.finish_handshake();
    }

    /// The regions node `n` offers to resend (`gmd_core::link`'s offer):
    /// its marks, and its hot regions unless every session since its device
    /// started was with the peer's device as it is now (a peer that
    /// restarted may have lost what it acknowledged but had not flushed).
    fn resync_bits(&self, n: usize) -> Vec<u8> {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        let mut bits = engine.dirty_bits();
        if self.nodes[n].hot_peer != HotPeer::Only(self.nodes[1 - n].incarnation) {
            for (b, hot) in bits.iter_mut().zip(engine.hot_bits()) {
                *b |= hot;
            }
        }
        bits
    }

    fn finish_handshake(&mut self) {
        let Some(mut handshake) = self.handshaking.take() else {
            return;
        };
        if handshake.delay > 0 {
            handshake.delay -= 1;
            self.handshaking = Some(handshake);
            return;
        }
        let restarted = (0..2).any(|n| self.nodes[n].incarnation != handshake.incarnation[n]);
        if !self.link_up || self.nodes.iter().any(|n| n.engine.is_none()) || restarted {
            return;
        }
        let Handshake {
            source,
            bits,
            stale,
            current,
            ..
        } = handshake;
        self.check_unsent_regions_match(&bits);
        self.connected = true;
        self.last_session += 1;
        self.session = self.last_session;
        for n in 0..2 {
            self.nodes[n].link_session = self.session;
            let peer = self.nodes[1 - n].incarnation;
            self.nodes[n].hot_peer.session_with(peer);
        }
        let regions = bits.iter().map(|b| b.count_ones()).sum::<u32>();
        self.resync_done = [false, false];
        self.resync_read_failed = None;
        let roles = if regions == 0 {
            // Nothing to resend: the daemons connect both without a resync.
            self.resync_source = None;
            self.resync_finished();
            self.note(format!("connect (session {}): no resync", self.session));
            [ResyncRole::None, ResyncRole::None]
        } else {
            self.resync_source = Some(source);
            self.note(format!(
                "connect (session {}): source {source}, {regions} regions",
                self.session
            ));
            let mut roles = [
                ResyncRole::Target(bits.clone()),
                ResyncRole::Target(bits.clone()),
            ];
            roles[source] = ResyncRole::Source(bits);
            roles
        };
        for (n, role) in roles.into_iter().enumerate() {
            self.engine(n).connect(Connection {
                role,
                peer_current: current[1 - n],
                stale_at_handshake: stale[n],
                source_current: 0,
            });
        }
        for n in 0..2 {
            self.pump(n);
        }
    }

    // ----- crashes --------------------------------------------------------

    /// Node `n` stops at once (a process crash, or with `cut` a power cut):
    /// only its peer sees the link go; a dead engine acknowledges nothing
    /// and commits nothing more.
    fn crash(&mut self, n: usize, cut: Option<PowerCut>) {
        match cut {
            None => self.note(format!("crash node {n}")),
            Some(cut) => self.note(format!("power cut node {n} ({cut:?})")),
        }
        let engine = self.nodes[n].engine.take().expect("running");
        self.nodes[n].map_at_crash = engine.map().clone();
        self.link_lost();
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
        // A commit in flight lands page by page or not.
        if let Some((_, pages)) = self.nodes[n].map_in_flight.take() {
            let mut packed = self.nodes[n].map_durable.packed().to_vec();
            for (page, cells) in pages {
                if self.rng.gen_bool(0.5) {
                    let range = Layout::page_cells(page, packed.len());
                    packed[range].copy_from_slice(&cells);
                }
            }
            self.nodes[n].map_durable = StateMap::from_packed(SIZE, packed).unwrap();
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
        if n == self.primary() {
            self.promises.power_cut();
        }
        if !lost.is_empty() {
            self.nodes[n].lost_cache = Some(self.step);
        }
        for (b, id) in lost {
            self.nodes[n].lost[b] = Some((id, self.step));
        }
    }

    fn restart(&mut self, n: usize) {
        let mut engine = Engine::new(
            params(self.mode, n == self.primary()),
            self.nodes[n].map_durable.clone(),
        );
        engine.tick(self.step as u64);
        let node = &mut self.nodes[n];
        for r in 0..REGIONS {
            node.cells_seen[r as usize] = engine.map().get(r);
        }
        node.packed_seen = engine.map().packed().to_vec();
        node.incarnation += 1;
        node.hot_peer = HotPeer::Nobody;
        node.engine = Some(engine);
        self.nodes[n].down_since = None;
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

    fn check(&self) {
        for r in 0..REGIONS {
            let marked =
                self.nodes[0].map_durable.get(r) != 0 || self.nodes[1].map_durable.get(r) != 0;
            if marked {
                continue;
            }
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
            // (3d) and unmarked data is durable on both sides.
            if self.faults.durable_marks {
                self.check_durable(r);
            }
        }
        // (5) the async backlog stays within the HWM.
        for node in &self.nodes {
            if let Some(e) = &node.engine {
                assert!(
                    e.backlog_bytes() <= params(self.mode, true).hwm_bytes,
                    "backlog {} above the HWM",
                    e.backlog_bytes()
                );
            }
        }
        // (4) holds outside resync, for a secondary that is not missing
        // regions from an interrupted resync (it says so in its map) nor
        // data its power cut took (until the next resync brings it back).
        let secondary = &self.nodes[1 - self.primary()];
        let secondary_complete = (0..REGIONS).all(|r| secondary.map().get(r) != CELL_RESYNC)
            && (0..REGIONS).all(|r| secondary.map_durable.get(r) != CELL_RESYNC);
        if self.mode == Mode::Async
            && self.resync_source.is_none()
            && secondary_complete
            && secondary.lost_cache.is_none()
        {
            self.check_secondary_is_an_earlier_state();
        }
    }

    /// (3d) Region `r`, which neither durable map marks, is durable on both
    /// sides: a power cut of either would otherwise leave the copies
    /// different with nothing to say so.
    fn check_durable(&self, r: u64) {
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
    }

    /// (4): for the newest write present on the secondary, every block holds
    /// at least what was promised before it was submitted (less what a power
    /// cut of the primary since took: the secondary may hold a copy of the
    /// primary's state after it).
    fn check_secondary_is_an_earlier_state(&self) {
        let secondary = self.nodes[1 - self.primary()].disk.visible();
        // The floor now is never below the lowest since: blocks at it or
        // above pass whatever the newest write is.
        let mut behind = (0..BLOCKS)
            .filter(|&b| secondary[b] < self.promises.floor(b))
            .peekable();
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

    /// (6) At connect, every region the resync will not send holds the same
    /// data on both sides: the engines take them as identical from now on.
    /// Sent are the handshake's regions and those stale now (the source adds
    /// its own at connect; a target with any renegotiates).
    fn check_unsent_regions_match(&self, bits: &[u8]) {
        for r in 0..REGIONS {
            let in_set = bits[(r / 8) as usize] & (1 << (r % 8)) != 0;
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
        }
        // (1) every block holds its promised write or a later one.
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
        }
    }

    // ----- the schedule ---------------------------------------------------

    fn step(&mut self) {
        self.step += 1;
        self.administer(false);
        self.finish_handshake();
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
                    self.note("partition".into());
                    self.link_up = false;
                    self.link_lost();
                } else if !self.link_up {
                    self.note("heal".into());
                    self.link_up = true;
                }
            }
            _ => {
                for n in 0..2 {
                    if self.nodes[n]
                        .down_since
                        .is_some_and(|s| self.step > s + DOWN_STEPS)
                    {
                        self.note(format!("restart node {n}"));
                        self.restart(n);
                    }
                }
                self.handshake();
            }
        }
        self.watch();
        self.check();
    }

    /// Heals everything and runs without new application I/O until quiet.
    fn settle(&mut self) {
        self.settling = true;
        self.link_up = true;
        self.administer(true);
        for n in 0..2 {
            if self.nodes[n].engine.is_none() {
                self.restart(n);
            }
        }
        self.handshake();
        let mut quiet_rounds = 0;
        for round in 0..200_000 {
            self.step += 1;
            if !self.connected && self.handshaking.is_none() {
                // A side asked to renegotiate: the daemons set the link up again.
                self.handshake();
            }
            self.finish_handshake();
            let mut progressed = false;
            for n in 0..2 {
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
                for n in 0..2 {
                    let now = self.step as u64;
                    self.engine(n).tick(now);
                    self.pump(n);
                }
            }
            self.watch();
            self.check();
            let drained = !progressed
                && self.nodes.iter().all(|n| {
                    n.map_in_flight.is_none() && n.locals.is_empty() && n.syncs.is_empty()
                })
                && self.wires.iter().all(|w| w.is_empty())
                && self.handshaking.is_none()
                && self.connected;
            if drained && self.nodes.iter().all(|n| n.map_durable.is_clean()) {
                return;
            }
            if drained && self.only_failed_writes_marked() {
                // A region whose application write failed here stays
                // inconsistent until a handshake resends it: the operator
                // sets the link up again.
                self.note("heal: link set up again for regions whose local write failed".into());
                self.link_lost();
                self.handshake();
                quiet_rounds = 0;
            } else if drained {
                // Nothing happens until the engines' clocks say so: skip ahead.
                quiet_rounds += 1;
                if quiet_rounds * QUIET_SKIP_MS > STUCK_MS {
                    self.stuck();
                }
                self.step += QUIET_SKIP_MS;
                for n in 0..2 {
                    let now = self.step as u64;
                    self.engine(n).tick(now);
                    self.pump(n);
                }
            } else {
                quiet_rounds = 0;
            }
        }
        self.stuck();
    }

    /// The pair does not settle: says why, as far as the simulator knows.
    fn stuck(&self) -> ! {
        let stats = |n: usize| self.nodes[n].engine.as_ref().map(|e| e.stats());
        let cause = match (self.resync_source, self.resync_read_failed) {
            (Some(source), Some((node, region, step))) => format!(
                "the resync hangs: node {node}'s resync read of region {region} failed with EIO \
                 at step {step} (Engine::resync_read_done) and the resync never finished though \
                 the session went on and nothing is in flight (source: {:?} regions to confirm, \
                 {:?} waiting to be read again; target: {:?} to receive)",
                stats(source).map(|s| s.resync_remaining),
                stats(source).map(|s| s.resync_failed_regions),
                stats(1 - source).map(|s| s.resync_target_remaining),
            ),
            (Some(source), None) => format!(
                "the resync from node {source} never finishes though nothing is in flight \
                 (source: {:?} regions to confirm; target: {:?} to receive)",
                stats(source).map(|s| s.resync_remaining),
                stats(1 - source).map(|s| s.resync_target_remaining),
            ),
            (None, _) if self.connected => {
                "marks remain though nothing is in flight and no resync runs".to_string()
            }
            (None, _) => "the link does not come up".to_string(),
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
            "the pair did not settle: {cause}. Application requests waiting {} / {}, connected \
             {}, resync source {:?}, wires {} {}, durable marks (region, durable, memory) {:?} / \
             {:?}, locals {} {}, stats {:?} / {:?}",
            waiting(0),
            waiting(1),
            self.connected,
            self.resync_source,
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
    if let Err(e) = result {
        eprintln!("mode {:?}; last events:", world.mode);
        let lines = env_number("GMD_SIM_LOG_LINES", 30) as usize;
        for line in world.log.iter().rev().take(lines).rev() {
            eprintln!("{line}");
        }
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
