//! Deterministic simulation of two mirror engines: applications writing,
//! disks completing in any order, map commits torn per page by crashes,
//! ordered links that break, nodes that crash and restart, partitions that
//! heal, resync, and unify after divergence. Now and then (1 %) a local data
//! write — the application's, the peer's or resync data — fails with EIO,
//! having written any subset of its blocks: the application write completes
//! with the error, unacknowledged (so (1) never asks for it, and what it left
//! counts as a later write over earlier ones); a peer write or resync data
//! is answered with the error and resent.
//!
//! Invariants checked after every step:
//! - (3) wherever the two disks differ, at least one durable map marks the region;
//! - (5) async: bytes completed but not acknowledged never exceed the HWM;
//! - (4) async, outside resync: the secondary holds a state the primary went
//!   through — for every write present there, everything the primary had
//!   completed before that write was issued is present too.
//!
//! At each unify (divergence), before anything is discarded:
//! - (1) every acknowledged write is on the disk of the node that wrote it
//!   (with the exceptions below), so that a resync that overwrote it is not
//!   hidden by the unify that follows.
//!
//! And at the end, once everything is healed and quiet:
//! - (3) both disks are identical, both durable maps are clean and no region
//!   still counts as awaiting resync data; a region whose application write
//!   failed locally stays inconsistent (0x7) until a handshake resends it,
//!   so healing sets the link up again when only such marks are left;
//! - (1) every acknowledged write is on both disks, unless a later write
//!   replaced it or unify discarded it on purpose: only what node 1 held and
//!   node 0 did not, in the regions unify marked. (A write the peer lost is
//!   acknowledged only once its stale mark is durable: a crash before that
//!   would leave an intent mark, which the handshake does not count.)
//!
//! A failing seed is printed; replay one with `GMD_SIM_SEED=<n>`, change the
//! count with `GMD_SIM_SEEDS=<n>` (default 2000).

use std::collections::{HashMap, HashSet, VecDeque};

use gmd_core::config::Mode;
use gmd_core::engine::{
    Action, Engine, EngineError, EngineParams, Epoch, OpKind, PeerOp, Request, ResyncRole, Seq,
    Slot,
};
use gmd_core::statemap::StateMap;
use gmd_core::statemap::cells::{CELL_INCONSISTENT, CELL_RESYNC, CELL_STALE};
use gmd_core::statemap::format::Layout;
use gmd_core::units::{REGION_SIZE_BYTES, region_bytes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 512;
const REGIONS: u64 = 48;
const SIZE: u64 = REGIONS * REGION_SIZE_BYTES;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const STEPS: usize = 1500;
/// Chance that a local data write fails with EIO.
const EIO_PROBABILITY: f64 = 0.01;

fn region_of(block: usize) -> u64 {
    block as u64 * BLOCK / REGION_SIZE_BYTES
}

/// A write's identity; block contents are the id of the write that produced them.
type WriteId = u32;

#[derive(Clone, Debug)]
enum Msg {
    Write {
        seq: Seq,
        after: Seq,
        id: WriteId,
        request: Request,
    },
    Flush {
        seq: Seq,
    },
    Resync {
        seq: Seq,
        region: u64,
        blocks: Vec<WriteId>,
    },
    Ack {
        seq: Seq,
        ok: bool,
    },
    Prioritize {
        region: u64,
    },
    ResyncAdd {
        region: u64,
    },
    Adopted {
        current: u64,
    },
}

#[derive(Clone, Debug)]
enum SlotData {
    AppWrite {
        id: WriteId,
    },
    AppOther,
    Peer {
        seq: Seq,
        id: WriteId,
        resync: Option<Vec<WriteId>>,
    },
    ResyncRead {
        blocks: Option<Vec<WriteId>>,
    },
}

/// Pages of a map commit with their cells.
type PageImages = Vec<(u64, Vec<u8>)>;

struct Node {
    engine: Option<Engine>,
    disk: Vec<WriteId>,
    map_durable: StateMap,
    map_in_flight: Option<(Epoch, PageImages)>,
    slots: HashMap<Slot, SlotData>,
    locals: Vec<Slot>,
    /// Blocks with an application write in flight (the application never overlaps itself).
    busy_blocks: HashSet<usize>,
    /// Regions where an application write failed here: marked inconsistent
    /// (0x7) until the next handshake resends them.
    failed_regions: HashSet<u64>,
    writer: bool,
    down_since: Option<usize>,
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
    blocks: std::ops::Range<usize>,
    submitted: usize,
    completed: Option<usize>,
    acked: bool,
}

struct World {
    rng: StdRng,
    mode: Mode,
    nodes: [Node; 2],
    /// Messages in flight per direction (0: node 0 → node 1).
    wires: [VecDeque<Msg>; 2],
    link_up: bool,
    connected: bool,
    /// Node that is source of the resync in progress, if any.
    resync_source: Option<usize>,
    resync_done: [bool; 2],
    next_id: WriteId,
    writes: Vec<History>,
    /// Per block, the writes to it in issue order (ids).
    block_writes: Vec<Vec<WriteId>>,
    /// Per block, the positions in `block_writes` whose data unify discarded
    /// on purpose (the non-master's writes the master did not hold).
    discarded: Vec<Vec<std::ops::Range<usize>>>,
    step: usize,
    unified: bool,
    log: Vec<String>,
    /// A handshake whose maps were read but whose connect has not happened
    /// yet: (source, resync bits, steps until connect). Writes go on meanwhile.
    handshaking: Option<(usize, Vec<u8>, usize)>,
    /// Application writes whose local part failed (never acknowledged).
    failed_writes: HashSet<WriteId>,
    /// Local data writes failed so far: application, peer, resync data.
    eio_count: [usize; 3],
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = [Mode::Sync, Mode::Mwc, Mode::Async][rng.gen_range(0..3)];
        let both_write = mode != Mode::Async && rng.gen_bool(0.3);
        let node = |writer: bool| Node {
            engine: Some(Engine::new(params(mode, true), StateMap::new(SIZE))),
            disk: vec![0; BLOCKS],
            map_durable: StateMap::new(SIZE),
            map_in_flight: None,
            slots: HashMap::new(),
            locals: Vec::new(),
            busy_blocks: HashSet::new(),
            failed_regions: HashSet::new(),
            writer,
            down_since: None,
        };
        let mut world = World {
            rng,
            mode,
            nodes: [node(true), node(both_write)],
            wires: [VecDeque::new(), VecDeque::new()],
            link_up: true,
            connected: false,
            resync_source: None,
            resync_done: [false, false],
            next_id: 1,
            writes: vec![History {
                node: 0,
                blocks: 0..0,
                submitted: 0,
                completed: Some(0),
                acked: true,
            }],
            block_writes: vec![Vec::new(); BLOCKS],
            discarded: vec![Vec::new(); BLOCKS],
            step: 0,
            unified: false,
            log: Vec::new(),
            handshaking: None,
            failed_writes: HashSet::new(),
            eio_count: [0; 3],
        };
        if mode == Mode::Async {
            // The secondary serves no application I/O.
            world.nodes[1].engine = Some(Engine::new(params(mode, false), StateMap::new(SIZE)));
        }
        world.handshake();
        world
    }

    fn note(&mut self, text: String) {
        self.log.push(format!("{:>5} {text}", self.step));
    }

    fn engine(&mut self, n: usize) -> &mut Engine {
        self.nodes[n].engine.as_mut().expect("node is running")
    }

    // ----- driver -------------------------------------------------------

    fn pump(&mut self, n: usize) {
        loop {
            let Some(action) = self.nodes[n].engine.as_mut().and_then(|e| e.poll_action()) else {
                return;
            };
            self.act(n, action);
        }
    }

    fn act(&mut self, n: usize, action: Action) {
        let wire = n;
        if std::env::var_os("GMD_SIM_TRACE").is_some() {
            let extra = match action {
                Action::Local(slot)
                | Action::Complete(slot, _)
                | Action::SendWrite { slot, .. } => {
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
        match action {
            Action::Local(slot) => self.nodes[n].locals.push(slot),
            Action::ResyncRead(slot) => {
                self.nodes[n].locals.push(slot);
                self.nodes[n]
                    .slots
                    .insert(slot, SlotData::ResyncRead { blocks: None });
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
            Action::Complete(slot, result) => {
                let data = self.nodes[n].slots.remove(&slot).expect("slot data");
                if let SlotData::AppWrite { id } = data {
                    let h = &mut self.writes[id as usize];
                    for b in h.blocks.clone() {
                        self.nodes[n].busy_blocks.remove(&b);
                    }
                    h.completed = Some(self.step);
                    h.acked = result.is_ok();
                    // The only refusals: data not here after an interrupted
                    // resync, and the local disk failing the write.
                    let failed_here = self.failed_writes.contains(&id);
                    let expected = if failed_here {
                        matches!(result, Err(EngineError::Io(libc::EIO)))
                    } else {
                        matches!(result, Ok(()) | Err(EngineError::Unavailable))
                    };
                    assert!(
                        expected,
                        "write {id} completed with {result:?} (local part failed: {failed_here})"
                    );
                }
            }
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
                self.wires[wire].push_back(Msg::Write {
                    seq,
                    after,
                    id,
                    request,
                });
            }
            Action::SendFlush { seq } => self.wires[wire].push_back(Msg::Flush { seq }),
            Action::Reply(slot, result) => {
                let Some(SlotData::Peer { seq, .. }) = self.nodes[n].slots.remove(&slot) else {
                    panic!("Reply for a slot without a peer op")
                };
                if self.connected {
                    self.wires[wire].push_back(Msg::Ack {
                        seq,
                        ok: result.is_ok(),
                    });
                }
            }
            Action::Discard(slot) => {
                let Some(SlotData::Peer { .. }) = self.nodes[n].slots.remove(&slot) else {
                    panic!("Discard of a slot without a peer op")
                };
            }
            Action::SendResync { slot, seq, region } => {
                let Some(SlotData::ResyncRead {
                    blocks: Some(blocks),
                }) = self.nodes[n].slots.remove(&slot)
                else {
                    panic!("SendResync without data")
                };
                self.wires[wire].push_back(Msg::Resync {
                    seq,
                    region,
                    blocks,
                });
            }
            Action::SendPrioritize { region } => {
                self.wires[wire].push_back(Msg::Prioritize { region })
            }
            Action::SendResyncAdd { region } => {
                self.wires[wire].push_back(Msg::ResyncAdd { region })
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
            Action::SendAdopted { current } => self.wires[wire].push_back(Msg::Adopted { current }),
            Action::SyncData => {
                // Completed writes are durable here (no volatile cache yet).
                self.engine(n).data_synced(Ok(()));
            }
            Action::ResyncDone => {
                self.note(format!("resync done on node {n}"));
                self.resync_done[n] = true;
                if self.resync_done[0] && self.resync_done[1] {
                    self.resync_source = None;
                }
            }
        }
    }

    fn local_complete(&mut self, n: usize, index: usize) {
        let slot = self.nodes[n].locals.swap_remove(index);
        let request = *self.engine(n).request(slot);
        let blocks = (request.offset_bytes / BLOCK) as usize
            ..((request.offset_bytes + request.len_bytes) / BLOCK) as usize;
        // A data write (the application's, the peer's or resync data) fails
        // now and then with EIO; any subset of its blocks may have landed.
        let writes_data = matches!(
            self.nodes[n].slots.get(&slot),
            Some(SlotData::AppWrite { .. } | SlotData::Peer { .. })
        ) && request.kind.changes_data();
        let fails = writes_data && self.rng.gen_bool(EIO_PROBABILITY);
        let kind = match self.nodes[n].slots.get(&slot) {
            Some(SlotData::AppWrite { .. }) => 0,
            Some(SlotData::Peer { resync: None, .. }) => 1,
            _ => 2,
        };
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
        let disk = &mut self.nodes[n].disk;
        let mut put = |i: usize, id: WriteId| {
            if landed[i] {
                disk[blocks.start + i] = id;
            }
        };
        match self.nodes[n].slots.get_mut(&slot) {
            Some(SlotData::AppWrite { id }) => {
                let id = *id;
                (0..blocks.len()).for_each(|i| put(i, id));
                if fails {
                    self.failed_writes.insert(id);
                    let regions = region_of(blocks.start)..=region_of(blocks.end - 1);
                    self.nodes[n].failed_regions.extend(regions);
                }
            }
            Some(SlotData::Peer { id, resync, .. }) => {
                if let Some(data) = resync.take() {
                    (0..blocks.len()).for_each(|i| put(i, data[i]));
                } else if request.kind.changes_data() {
                    let id = *id;
                    (0..blocks.len()).for_each(|i| put(i, id));
                }
            }
            Some(SlotData::ResyncRead { blocks: data }) => {
                *data = Some(self.nodes[n].disk[blocks].to_vec())
            }
            Some(SlotData::AppOther) | None => {}
        }
        let result = if fails {
            self.eio_count[kind] += 1;
            self.note(format!(
                "node {n}: local write of slot {slot} ({request:?}) fails with EIO"
            ));
            Err(libc::EIO)
        } else {
            Ok(())
        };
        self.engine(n).local_done(slot, result);
        self.pump(n);
    }

    fn map_commit_done(&mut self, n: usize) {
        let (epoch, pages) = self.nodes[n]
            .map_in_flight
            .take()
            .expect("commit in flight");
        let mut packed = self.nodes[n].map_durable.packed().to_vec();
        for (page, cells) in pages {
            let range = Layout::page_cells(page, packed.len());
            packed[range].copy_from_slice(&cells);
        }
        self.nodes[n].map_durable = StateMap::from_packed(SIZE, packed).unwrap();
        self.engine(n).map_written(epoch, Ok(()));
        self.pump(n);
    }

    // ----- the application ------------------------------------------------

    fn app_write(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() || !self.nodes[n].writer {
            return;
        }
        // Node 0 writes the first half, node 1 the second half.
        let half = BLOCKS / 2;
        let base = if n == 0 { 0 } else { half };
        let len = self.rng.gen_range(1..=64usize);
        let start = base + self.rng.gen_range(0..half - len);
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
        for b in blocks.clone() {
            self.nodes[n].busy_blocks.insert(b);
            self.block_writes[b].push(id);
        }
        self.writes.push(History {
            node: n,
            blocks,
            submitted: self.step,
            completed: None,
            acked: false,
        });
        let slot = self.engine(n).submit(request);
        self.nodes[n].slots.insert(slot, SlotData::AppWrite { id });
        self.pump(n);
    }

    fn app_other(&mut self, n: usize) {
        let engine = self.nodes[n].engine.as_ref().expect("running");
        if !engine.app_slot_available() || !self.nodes[n].writer {
            return;
        }
        let request = if self.rng.gen_bool(0.5) {
            Request {
                kind: OpKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                fua: false,
            }
        } else {
            let start = self.rng.gen_range(0..BLOCKS as u64 - 8);
            Request {
                kind: OpKind::Read,
                offset_bytes: start * BLOCK,
                len_bytes: 8 * BLOCK,
                fua: false,
            }
        };
        let slot = self.engine(n).submit(request);
        self.nodes[n].slots.insert(slot, SlotData::AppOther);
        self.pump(n);
    }

    // ----- the network ----------------------------------------------------

    fn deliver(&mut self, wire: usize) {
        let to = 1 - wire;
        if !self.connected || self.nodes[to].engine.is_none() {
            return;
        }
        let Some(msg) = self.wires[wire].front().cloned() else {
            return;
        };
        let op = |seq, after, request, resync_region| PeerOp {
            seq,
            after,
            request,
            resync_region,
        };
        match msg {
            Msg::Write {
                seq,
                after,
                id,
                request,
            } => {
                if !self.engine(to).peer_slot_available() {
                    return;
                }
                self.wires[wire].pop_front();
                let slot = self.engine(to).peer_op(op(seq, after, request, None));
                self.nodes[to].slots.insert(
                    slot,
                    SlotData::Peer {
                        seq,
                        id,
                        resync: None,
                    },
                );
            }
            Msg::Flush { seq } => {
                if !self.engine(to).peer_slot_available() {
                    return;
                }
                self.wires[wire].pop_front();
                let flush = Request {
                    kind: OpKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    fua: false,
                };
                let slot = self.engine(to).peer_op(op(seq, 0, flush, None));
                self.nodes[to].slots.insert(
                    slot,
                    SlotData::Peer {
                        seq,
                        id: 0,
                        resync: None,
                    },
                );
            }
            Msg::Resync {
                seq,
                region,
                blocks,
            } => {
                if !self.engine(to).peer_slot_available() {
                    return;
                }
                self.wires[wire].pop_front();
                let bytes = region_bytes(region, SIZE);
                let request = Request {
                    kind: OpKind::Write,
                    offset_bytes: bytes.start,
                    len_bytes: bytes.end - bytes.start,
                    fua: false,
                };
                let slot = self.engine(to).peer_op(op(seq, 0, request, Some(region)));
                self.nodes[to].slots.insert(
                    slot,
                    SlotData::Peer {
                        seq,
                        id: 0,
                        resync: Some(blocks),
                    },
                );
            }
            Msg::Ack { seq, ok } => {
                self.wires[wire].pop_front();
                let result = if ok {
                    Ok(())
                } else {
                    Err(EngineError::Remote(5))
                };
                self.engine(to).remote_done(seq, result);
            }
            Msg::Prioritize { region } => {
                self.wires[wire].pop_front();
                self.engine(to).prioritize(region);
            }
            Msg::ResyncAdd { region } => {
                self.wires[wire].pop_front();
                self.engine(to).resync_added(region);
            }
            Msg::Adopted { current } => {
                self.wires[wire].pop_front();
                self.engine(to).peer_adopted(current);
            }
        }
        self.pump(to);
    }

    fn link_lost(&mut self) {
        self.handshaking = None;
        if !self.connected {
            return;
        }
        self.connected = false;
        self.resync_source = None;
        self.wires[0].clear();
        self.wires[1].clear();
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
        if s0 > 0 && s1 > 0 {
            self.unify();
            return;
        }
        let source = if s0 > 0 {
            0
        } else if s1 > 0 {
            1
        } else {
            0 // async: the primary; sync/mwc: the side that was running
        };
        let bits: Vec<u8> = {
            let a = self.nodes[0].engine.as_ref().unwrap().dirty_bits();
            let b = self.nodes[1].engine.as_ref().unwrap().dirty_bits();
            a.iter().zip(&b).map(|(x, y)| x | y).collect()
        };
        // The maps were read; the connect happens up to about a message's
        // way there and back later (Connect, Accept, Go across the network),
        // long enough for writes issued meanwhile to mark stale, be written
        // locally and acknowledged before the connect.
        let delay = if self.step == 0 {
            0
        } else {
            self.rng.gen_range(0..16)
        };
        self.handshaking = Some((source, bits, delay));
        self.finish_handshake();
    }

    fn finish_handshake(&mut self) {
        let Some((source, bits, delay)) = self.handshaking.take() else {
            return;
        };
        if delay > 0 {
            self.handshaking = Some((source, bits, delay - 1));
            return;
        }
        if !self.link_up || self.nodes.iter().any(|n| n.engine.is_none()) {
            return;
        }
        self.connected = true;
        self.wires[0].clear();
        self.wires[1].clear();
        let regions = bits.iter().map(|b| b.count_ones()).sum::<u32>();
        self.resync_done = [false, false];
        if regions == 0 {
            // Nothing to resend: the daemons connect both without a resync.
            self.resync_source = None;
            self.note("connect: no resync".into());
            for n in 0..2 {
                self.engine(n).connect(ResyncRole::None);
            }
        } else {
            self.resync_source = Some(source);
            self.note(format!("connect: source {source}, {regions} regions"));
            self.engine(source)
                .connect(ResyncRole::Source(bits.clone()));
            self.engine(1 - source).connect(ResyncRole::Target(bits));
        }
        for n in 0..2 {
            self.pump(n);
        }
    }

    /// Divergence: both sides wrote alone. The administrator picks node 0 as
    /// master: both devices stop, the OR of both maps goes to the master and
    /// the other's is cleared, and they start again. What node 1 holds and
    /// node 0 does not in those regions is discarded on purpose; everything
    /// else acknowledged must have survived until now, on the disk of the
    /// node that wrote it.
    fn unify(&mut self) {
        self.note("divergence: unify with node 0 as master".into());
        self.unified = true;
        for n in 0..2 {
            self.drain_node(n);
        }
        for b in 0..BLOCKS {
            let Some(p) = self.last_acked_kept(b) else {
                continue;
            };
            let writer = self.writes[self.block_writes[b][p] as usize].node;
            let have = self.nodes[writer].disk[b];
            self.check_acked(b, p, have, &format!("before unify, on node {writer}"));
        }
        let mut merged = self.nodes[0].map_durable.clone();
        merged.merge(&self.nodes[1].map_durable).unwrap();
        let mut master = StateMap::new(SIZE);
        for r in 0..REGIONS {
            if merged.get(r) != 0 {
                master.set(r, CELL_STALE);
                let bytes = region_bytes(r, SIZE);
                for b in (bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize {
                    let kept = self.nodes[0].disk[b];
                    let from = self.position(b, kept);
                    let to = self.block_writes[b].len();
                    if from < to {
                        self.discarded[b].push(from..to);
                    }
                }
            }
        }
        self.nodes[0].map_durable = master;
        self.nodes[1].map_durable = StateMap::new(SIZE);
        for n in 0..2 {
            self.restart(n);
        }
        self.handshake();
    }

    /// Stops a node cleanly: every operation completes, every commit lands.
    fn drain_node(&mut self, n: usize) {
        for _ in 0..100_000 {
            if self.nodes[n].map_in_flight.is_some() {
                self.map_commit_done(n);
            } else if !self.nodes[n].locals.is_empty() {
                self.local_complete(n, 0);
            } else {
                break;
            }
        }
        self.nodes[n].engine = None;
        self.nodes[n].slots.clear();
        self.nodes[n].busy_blocks.clear();
    }

    fn crash(&mut self, n: usize) {
        self.note(format!("crash node {n}"));
        // The node stops at once: only its peer sees the link go (a dead
        // engine acknowledges nothing and commits nothing more).
        let engine = self.nodes[n].engine.take().expect("running");
        self.link_lost();
        // In-flight local writes land or not; a commit in flight lands page by page or not.
        let locals = std::mem::take(&mut self.nodes[n].locals);
        for slot in locals {
            if !self.rng.gen_bool(0.5) {
                continue;
            }
            let request = *engine.request(slot);
            let blocks = (request.offset_bytes / BLOCK) as usize
                ..((request.offset_bytes + request.len_bytes) / BLOCK) as usize;
            match self.nodes[n].slots.get(&slot) {
                Some(SlotData::AppWrite { id }) => {
                    let id = *id;
                    self.nodes[n].disk[blocks].fill(id);
                }
                Some(SlotData::Peer { id, resync, .. }) if request.kind.changes_data() => {
                    if let Some(data) = resync {
                        let data = data.clone();
                        self.nodes[n].disk[blocks].copy_from_slice(&data);
                    } else {
                        let id = *id;
                        self.nodes[n].disk[blocks].fill(id);
                    }
                }
                _ => {}
            }
        }
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
        self.nodes[n].slots.clear();
        self.nodes[n].busy_blocks.clear();
        self.nodes[n].down_since = Some(self.step);
    }

    fn restart(&mut self, n: usize) {
        let writable = !(self.mode == Mode::Async && n == 1);
        let mut engine = Engine::new(
            params(self.mode, writable),
            self.nodes[n].map_durable.clone(),
        );
        engine.tick(self.step as u64);
        self.nodes[n].engine = Some(engine);
        self.nodes[n].down_since = None;
        self.pump(n);
    }

    // ----- invariants -----------------------------------------------------

    fn watch(&mut self) {
        let Some(region) = std::env::var("GMD_SIM_WATCH")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let bytes = region_bytes(region, SIZE);
        let blocks = (bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize;
        let now: Vec<String> = (0..2)
            .map(|n| {
                let node = &self.nodes[n];
                format!(
                    "node {n}: mem {:?} durable {} disk {:?}",
                    node.engine.as_ref().map(|e| e.map().get(region)),
                    node.map_durable.get(region),
                    {
                        let mut ids: Vec<u32> = node.disk[blocks.clone()].to_vec();
                        ids.dedup();
                        ids
                    }
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
        // (3) differing regions are marked durably on one side at least.
        for r in 0..REGIONS {
            let bytes = region_bytes(r, SIZE);
            let blocks = (bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize;
            if self.nodes[0].disk[blocks.clone()] != self.nodes[1].disk[blocks] {
                assert!(
                    self.nodes[0].map_durable.get(r) != 0 || self.nodes[1].map_durable.get(r) != 0,
                    "region {r} differs between the disks but neither durable map marks it \
                     (memory cells {:?}, {:?}; blocks {:?} vs {:?})",
                    self.nodes[0].engine.as_ref().map(|e| e.map().get(r)),
                    self.nodes[1].engine.as_ref().map(|e| e.map().get(r)),
                    &self.nodes[0].disk
                        [(bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize],
                    &self.nodes[1].disk
                        [(bytes.start / BLOCK) as usize..(bytes.end / BLOCK) as usize],
                );
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
        // (4) holds outside resync, and only for a secondary that is not
        // missing regions from an interrupted resync (it says so in its map).
        let secondary_complete = {
            let map = match &self.nodes[1].engine {
                Some(e) => e.map(),
                None => &self.nodes[1].map_durable,
            };
            (0..REGIONS).all(|r| map.get(r) != CELL_RESYNC)
        };
        if self.mode == Mode::Async
            && self.resync_source.is_none()
            && secondary_complete
            && !self.unified
        {
            self.check_secondary_is_an_earlier_state();
        }
    }

    /// (4): for the newest write (by submission) present on the secondary,
    /// every block holds at least what the primary had completed before it.
    fn check_secondary_is_an_earlier_state(&self) {
        let secondary = &self.nodes[1].disk;
        let newest = secondary
            .iter()
            .map(|&id| self.writes[id as usize].submitted)
            .max()
            .unwrap_or(0);
        for (b, &have) in secondary.iter().enumerate() {
            let writes = &self.block_writes[b];
            let position = |id: WriteId| {
                if id == 0 {
                    0
                } else {
                    writes.iter().position(|&w| w == id).map_or(0, |p| p + 1)
                }
            };
            let needed = writes
                .iter()
                .rev()
                .find(|&&w| {
                    self.writes[w as usize]
                        .completed
                        .is_some_and(|c| c < newest)
                        && self.writes[w as usize].acked
                })
                .copied()
                .unwrap_or(0);
            assert!(
                position(have) >= position(needed),
                "block {b} on the secondary holds write {have} but write {needed}, completed on the primary before write submitted at step {newest}, is missing"
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
        assert_eq!(
            self.nodes[0].disk, self.nodes[1].disk,
            "disks differ after recovery"
        );
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
        // (1) every acknowledged write survived, unless a later write
        // replaced it or unify discarded it (see `last_acked_kept`).
        for b in 0..BLOCKS {
            if let Some(p) = self.last_acked_kept(b) {
                self.check_acked(b, p, self.nodes[0].disk[b], "after recovery");
            }
        }
    }

    /// Where `id` stands among the writes to block `b`: 0 for the initial
    /// contents, else one past its index.
    fn position(&self, b: usize, id: WriteId) -> usize {
        if id == 0 {
            return 0;
        }
        let writes = &self.block_writes[b];
        writes
            .iter()
            .position(|&w| w == id)
            .expect("a write to the block")
            + 1
    }

    /// The index of the last acknowledged write to block `b` that must have
    /// survived: not discarded by unify, nor (in a run that diverged, where
    /// both nodes write) left covered by an intent mark only by a crash of
    /// its node. Runs that never diverge keep the strict check.
    fn last_acked_kept(&self, b: usize) -> Option<usize> {
        self.block_writes[b]
            .iter()
            .enumerate()
            .rposition(|(i, &w)| {
                self.writes[w as usize].acked && !self.discarded[b].iter().any(|d| d.contains(&i))
            })
    }

    /// (1) for block `b`, holding `have`: the acknowledged write at index `p`
    /// or a later one.
    fn check_acked(&self, b: usize, p: usize, have: WriteId, when: &str) {
        let writes = &self.block_writes[b];
        if writes[p..].contains(&have) {
            return;
        }
        let id = writes[p];
        let w = &self.writes[id as usize];
        panic!(
            "block {b}: acknowledged write {id} lost {when} (written by node {}, submitted at step {}, \
             acknowledged at step {}); the disk holds write {have}",
            w.node,
            w.submitted,
            w.completed.unwrap_or(0),
        );
    }

    // ----- the schedule ---------------------------------------------------

    fn step(&mut self) {
        self.step += 1;
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
                if !self.nodes[n].locals.is_empty() {
                    let i = self.rng.gen_range(0..self.nodes[n].locals.len());
                    self.local_complete(n, i);
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
                    self.crash(n);
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
                    if self.nodes[n].down_since.is_some_and(|s| self.step > s + 20) {
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
        self.link_up = true;
        for n in 0..2 {
            if self.nodes[n].engine.is_none() {
                self.restart(n);
            }
        }
        self.handshake();
        for round in 0..200_000 {
            self.step += 1;
            if !self.connected && self.handshaking.is_none() {
                // A side asked to renegotiate: the daemons set the link up
                // again (a divergence found then is unified).
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
                && self
                    .nodes
                    .iter()
                    .all(|n| n.map_in_flight.is_none() && n.locals.is_empty())
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
            }
        }
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
        eprintln!(
            "durable marks (region, durable, memory): {:?} / {:?}",
            marks(0),
            marks(1)
        );
        panic!(
            "the pair did not settle: connected {}, resync source {:?}, wires {} {}, maps {} {}, locals {} {}, stats {:?} / {:?}",
            self.connected,
            self.resync_source,
            self.wires[0].len(),
            self.wires[1].len(),
            self.nodes[0].map_durable.count_nonzero(),
            self.nodes[1].map_durable.count_nonzero(),
            self.nodes[0].locals.len(),
            self.nodes[1].locals.len(),
            self.nodes[0].engine.as_ref().map(|e| e.stats()),
            self.nodes[1].engine.as_ref().map(|e| e.stats()),
        );
    }
}

/// Runs one seed; returns how many application, peer and resync data
/// writes failed locally.
fn run(seed: u64) -> [usize; 3] {
    let mut world = World::new(seed);
    for _ in 0..STEPS {
        world.step();
    }
    world.settle();
    world.final_checks();
    world.eio_count
}

fn run_catching(seed: u64) -> Result<[usize; 3], String> {
    std::panic::catch_unwind(|| run(seed)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn two_engines_keep_every_invariant_under_faults() {
    if let Ok(seed) = std::env::var("GMD_SIM_SEED") {
        let seed: u64 = seed.parse().expect("GMD_SIM_SEED is a number");
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
            for line in world.log.iter().rev().take(30).rev() {
                eprintln!("{line}");
            }
            std::panic::resume_unwind(e);
        }
        return;
    }
    let seeds: u64 = std::env::var("GMD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut eio = [0; 3];
    for seed in 0..seeds {
        match run_catching(seed) {
            Ok(counts) => (0..3).for_each(|k| eio[k] += counts[k]),
            Err(message) => {
                failures.push(format!("seed {seed}: {message}"));
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "{seeds} seeds; local EIO on application writes {}, peer writes {}, resync data {}",
        eio[0], eio[1], eio[2]
    );
    if seeds >= 100 && failures.is_empty() {
        assert!(
            eio.iter().all(|&c| c > 0),
            "every kind of local write failure occurs: {eio:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} failing seed(s) (replay with GMD_SIM_SEED=<n>):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
