//! Engine tests: a model driver with a simulated map disk checks the order
//! of actions in each mode. The two-engine simulation with faults is in
//! `tests/mirror_sim.rs`.

use super::*;
use crate::generations::{GenId, Generations};
use crate::statemap::format::{Layout, REGIONS_PER_PAGE};
use proptest::prelude::*;

const SIZE: u64 = 3 * REGIONS_PER_PAGE * REGION_SIZE_BYTES; // three map pages

fn params(mode: Mode) -> EngineParams {
    EngineParams {
        slots_max: 16,
        peer_slots_max: 8,
        resync_slots_max: 2,
        block_size: 4096,
        io_len_max: 1 << 20,
        hwm_bytes: 16 << 10,
        ..EngineParams::new(SIZE, mode)
    }
}

/// A driver that models the map on disk: pages become durable only when a
/// map write completes. Remote messages are recorded, not delivered.
/// Pages of a map commit with their cells.
type PageImages = Vec<(u64, Vec<u8>)>;

struct Model {
    engine: Engine,
    durable: StateMap,
    in_flight_map: Option<(Epoch, PageImages)>,
    local: Vec<Slot>,
    sent: Vec<(Seq, Slot)>,
    /// The dependency each sent write carried: (seq, after).
    afters: Vec<(Seq, Seq)>,
    /// Writes sent as passing earlier messages.
    passing: Vec<Seq>,
    flushes_sent: Vec<Seq>,
    completed: Vec<(Slot, Result<(), EngineError>)>,
    map_writes: usize,
    log: Vec<String>,
    /// `PeerStalled` reports, with how long the peer had been silent.
    stalls: Vec<u64>,
    /// Resync reads asked for and not yet reported.
    resync_reads: Vec<Slot>,
    /// Resync data sent: (seq, region).
    resync_sent: Vec<(Seq, u64)>,
    /// Resync checksums sent: (seq, region).
    checks_sent: Vec<(Seq, u64)>,
    /// Data volume syncs wait for [`Model::finish_syncs`] instead of
    /// completing at once.
    hold_syncs: bool,
    /// Data volume syncs asked for and not yet finished.
    syncs: Vec<u64>,
    /// The generations each map write put in the superblock (`None`: it
    /// did not write the superblock).
    map_gens: Vec<Option<Generations>>,
    /// Whether each write or flush sent was marked awaited: (seq, awaited).
    awaited: Vec<(Seq, bool)>,
}

impl Model {
    fn new(mode: Mode) -> Self {
        Model::with(params(mode))
    }

    fn with(params: EngineParams) -> Self {
        Model {
            engine: Engine::new(params, StateMap::new(SIZE)),
            durable: StateMap::new(SIZE),
            in_flight_map: None,
            local: Vec::new(),
            sent: Vec::new(),
            afters: Vec::new(),
            passing: Vec::new(),
            flushes_sent: Vec::new(),
            completed: Vec::new(),
            map_writes: 0,
            log: Vec::new(),
            stalls: Vec::new(),
            resync_reads: Vec::new(),
            resync_sent: Vec::new(),
            checks_sent: Vec::new(),
            hold_syncs: false,
            syncs: Vec::new(),
            map_gens: Vec::new(),
            awaited: Vec::new(),
        }
    }

    /// Async, connected, past its 16 KiB high water mark: four 4 KiB writes
    /// (regions 0–3) in the backlog, the fifth (region 4) sent and waiting
    /// for the peer.
    fn past_the_high_water_mark() -> Self {
        let mut m = Model::connected(Mode::Async);
        let slots: Vec<Slot> = (0..5u64)
            .map(|i| m.submit(write(i * REGION_SIZE_BYTES, 4096)))
            .collect();
        m.settle_map();
        for s in slots {
            m.finish_local(s);
        }
        m
    }

    fn connected(mode: Mode) -> Self {
        let mut m = Model::new(mode);
        m.engine.connect(ResyncRole::None);
        m.pump();
        m.log.clear();
        m
    }

    fn pump(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Local(slot) => {
                    let req = *self.engine.request(slot);
                    // A peer's write is covered by the peer's mark, not this side's.
                    let from_peer = slot >= self.engine.params().slots_max as Slot;
                    if req.kind.changes_data() && !from_peer {
                        for region in self.durable.regions_of(req.offset_bytes, req.len_bytes) {
                            assert_ne!(
                                self.durable.get(region),
                                0,
                                "write issued to region {region} before its mark was durable"
                            );
                        }
                    }
                    self.log.push(format!("local {slot}"));
                    self.local.push(slot);
                }
                Action::PersistMap(epoch) => {
                    assert!(self.in_flight_map.is_none(), "two map writes in flight");
                    let packed = self.engine.map().packed();
                    let pages = self
                        .engine
                        .flushing_pages()
                        .iter()
                        .map(|&p| (p, packed[Layout::page_cells(p, packed.len())].to_vec()))
                        .collect();
                    self.in_flight_map = Some((epoch, pages));
                    self.map_writes += 1;
                    self.map_gens.push(self.engine.flushing_generations());
                }
                Action::Complete(slot, result) => {
                    self.log.push(format!("complete {slot}"));
                    self.completed.push((slot, result));
                }
                Action::SendWrite {
                    slot,
                    seq,
                    after,
                    request,
                    passing,
                    awaited,
                } => {
                    self.awaited.push((seq, awaited));
                    self.afters.push((seq, after));
                    if passing {
                        self.passing.push(seq);
                    }
                    for region in self
                        .durable
                        .regions_of(request.offset_bytes, request.len_bytes)
                    {
                        assert_ne!(
                            self.durable.get(region),
                            0,
                            "write sent for region {region} before its mark was durable"
                        );
                    }
                    self.log.push(format!("send {slot}"));
                    self.sent.push((seq, slot));
                }
                Action::SendFlush { seq, awaited } => {
                    self.awaited.push((seq, awaited));
                    self.log.push("send flush".into());
                    self.flushes_sent.push(seq);
                }
                Action::PeerStalled { waited_ms } => self.stalls.push(waited_ms),
                Action::Reply {
                    slot,
                    result,
                    passing,
                } => {
                    let how = if passing { " passing" } else { "" };
                    self.log.push(format!("reply {slot} {result:?}{how}"));
                }
                Action::SendResyncAdd { region } => self.log.push(format!("resync add {region}")),
                Action::SendPrioritize { region } => self.log.push(format!("prioritize {region}")),
                Action::ResyncRead(slot) => {
                    self.log.push(format!("resync read {slot}"));
                    self.resync_reads.push(slot);
                }
                Action::SendResync { seq, region, .. } => {
                    self.log.push(format!("send resync {region}"));
                    self.resync_sent.push((seq, region));
                }
                Action::SendResyncCheck { seq, region, .. } => {
                    self.log.push(format!("send check {region}"));
                    self.checks_sent.push((seq, region));
                }
                Action::Discard(slot) => self.log.push(format!("discard {slot}")),
                Action::ResyncDone => self.log.push("resync done".into()),
                Action::Renegotiate => self.log.push("renegotiate".into()),
                Action::SendAdopted { current } => self.log.push(format!("adopted {current}")),
                Action::SendTerm { term } => self.log.push(format!("term {term}")),
                Action::SyncData(sync) => {
                    self.log.push("sync data".into());
                    if self.hold_syncs {
                        self.syncs.push(sync);
                    } else {
                        self.engine.data_synced(sync, Ok(()));
                    }
                }
            }
        }
    }

    fn finish_map_write(&mut self, ok: bool) {
        let (epoch, pages) = self.in_flight_map.take().expect("a map write in flight");
        if ok {
            let mut packed = self.durable.packed().to_vec();
            for (page, cells) in pages {
                let range = Layout::page_cells(page, packed.len());
                packed[range].copy_from_slice(&cells);
            }
            self.durable = StateMap::from_packed(SIZE, packed).unwrap();
            self.engine.map_written(epoch, Ok(()));
        } else {
            self.engine.map_written(epoch, Err(libc::EIO));
        }
        self.pump();
    }

    fn finish_local(&mut self, slot: Slot) {
        let i = self
            .local
            .iter()
            .position(|&s| s == slot)
            .expect("in flight");
        self.local.swap_remove(i);
        self.engine.local_done(slot, Ok(()));
        self.pump();
    }

    fn ack(&mut self, seq: Seq) {
        self.engine.remote_done(seq, Ok(()));
        self.pump();
    }

    /// The peer answers every flush sent so far (barriers before marks go).
    fn ack_flushes(&mut self) {
        for seq in std::mem::take(&mut self.flushes_sent) {
            self.ack(seq);
        }
        self.settle_map();
    }

    fn submit(&mut self, req: Request) -> Slot {
        let slot = self.engine.submit(req);
        self.pump();
        slot
    }

    fn settle_map(&mut self) {
        while self.in_flight_map.is_some() {
            self.finish_map_write(true);
        }
    }

    /// Finishes the data volume syncs held back.
    fn finish_syncs(&mut self) {
        for sync in std::mem::take(&mut self.syncs) {
            self.engine.data_synced(sync, Ok(()));
            self.pump();
        }
        self.settle_map();
    }

    /// A model whose engine holds data generation `current`.
    fn with_generation(mode: Mode, current: GenId) -> Self {
        let mut m = Model::new(mode);
        m.engine = Engine::with_generations(
            params(mode),
            StateMap::new(SIZE),
            Generations {
                current,
                ..Generations::default()
            },
            7,
        );
        m
    }
}

impl Model {
    /// Connects as the resync source of `region` alone and lets it be read
    /// and sent; returns the message's sequence number.
    fn source_sends_region(&mut self, region: u64) -> Seq {
        let mut bits = vec![0u8; self.engine.map().region_count().div_ceil(8) as usize];
        bits[(region / 8) as usize] |= 1 << (region % 8);
        self.engine.connect(ResyncRole::Source(bits));
        self.pump();
        self.settle_map();
        self.read_and_send_region(region)
    }

    /// Finishes the pending resync read, which must be of `region`; returns
    /// the sequence number of the data sent.
    fn read_and_send_region(&mut self, region: u64) -> Seq {
        let read = self.resync_reads.pop().expect("a resync read");
        self.engine.local_done(read, Ok(()));
        self.pump();
        let (seq, sent) = *self.resync_sent.last().expect("resync data sent");
        assert_eq!(sent, region);
        seq
    }

    fn tick(&mut self, now_ms: u64) {
        self.engine.tick(now_ms);
        self.pump();
    }
}

fn write(offset: u64, len: u64) -> Request {
    Request {
        kind: OpKind::Write,
        offset_bytes: offset,
        len_bytes: len,
        fua: false,
    }
}

fn flush() -> Request {
    Request {
        kind: OpKind::Flush,
        offset_bytes: 0,
        len_bytes: 0,
        fua: false,
    }
}

/// The resync data of a whole region, message `seq` from the peer.
fn resync_op(seq: Seq, region: u64) -> PeerOp {
    let bytes = region_bytes(region, SIZE);
    PeerOp {
        seq,
        after: 0,
        request: write(bytes.start, bytes.end - bytes.start),
        resync_region: Some(region),
    }
}

#[test]
fn standalone_first_write_to_a_region_waits_for_the_stale_mark() {
    let mut m = Model::new(Mode::Mwc);
    let a = m.submit(write(0, 4096));
    assert!(m.local.is_empty(), "the write must wait for its mark");
    m.finish_map_write(true);
    assert_eq!(m.local, vec![a]);
    assert_eq!(m.durable.get(0), crate::statemap::cells::CELL_STALE);
    m.finish_local(a);
    // The region is durably stale now: no further map write.
    let b = m.submit(write(8192, 4096));
    assert_eq!(m.local, vec![b]);
    assert_eq!(m.map_writes, 1);
    m.finish_local(b);
    assert!(m.completed.iter().all(|(_, r)| r.is_ok()));
    assert!(m.sent.is_empty(), "nothing goes to a peer that is down");
}

#[test]
fn marks_arriving_during_a_map_write_are_group_committed() {
    let mut m = Model::new(Mode::Mwc);
    m.submit(write(0, 4096));
    for i in 1..9u64 {
        m.submit(write(i * 10 * REGION_SIZE_BYTES, 4096));
    }
    assert_eq!(m.map_writes, 1);
    m.finish_map_write(true);
    assert_eq!(m.local.len(), 1, "only the first write's mark is durable");
    assert_eq!(m.map_writes, 2, "the others went out together");
    m.finish_map_write(true);
    assert_eq!(m.local.len(), 9);
}

#[test]
fn sync_sends_first_then_writes_locally_then_completes() {
    let mut m = Model::connected(Mode::Sync);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    assert_eq!(m.log, vec![format!("send {s}")]);
    assert!(m.local.is_empty(), "local waits for the remote");
    m.ack(m.sent[0].0);
    assert_eq!(m.local, vec![s]);
    m.finish_local(s);
    assert_eq!(m.log.last().unwrap(), &format!("complete {s}"));
}

#[test]
fn mwc_dispatches_both_and_completes_when_both_are_done() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    assert_eq!(m.log, vec![format!("local {s}"), format!("send {s}")]);
    m.finish_local(s);
    assert!(m.completed.is_empty(), "the remote is still outstanding");
    m.ack(m.sent[0].0);
    assert_eq!(m.completed, vec![(s, Ok(()))]);
}

#[test]
fn async_completes_after_the_local_write_and_sends_in_completion_order() {
    let mut m = Model::connected(Mode::Async);
    let a = m.submit(write(0, 4096));
    let b = m.submit(write(REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert!(
        m.sent.is_empty(),
        "nothing is sent before it completes locally"
    );
    m.finish_local(b);
    m.finish_local(a);
    assert_eq!(m.completed, vec![(b, Ok(())), (a, Ok(()))]);
    assert_eq!(
        m.sent.iter().map(|&(_, s)| s).collect::<Vec<_>>(),
        vec![b, a]
    );
    assert_eq!(m.engine.backlog_bytes(), 8192);
    m.ack(m.sent[0].0);
    m.ack(m.sent[1].0);
    assert_eq!(m.engine.backlog_bytes(), 0);
}

/// Async, a flush is local; on a copy that no longer takes writes (a
/// primary being demoted flushes before the other side is promoted) it
/// waits for the peer: the backlog sent before it, and the peer's own
/// flush. Otherwise the new primary could lose, in a power cut, writes the
/// old one acknowledged and flushed (sim seed 15937: read back older data
/// after a switch and a power cut of the new primary).
#[test]
fn async_a_flush_after_demotion_waits_for_the_peer() {
    let mut m = Model::connected(Mode::Async);
    let a = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(a);
    assert_eq!(m.sent.len(), 1, "in the backlog");
    // A flush while writable completes locally.
    let f = m.submit(flush());
    m.finish_local(f);
    assert!(m.completed.contains(&(f, Ok(()))));
    // Demoted (read-only, and an async secondary serves no reads): its
    // flush goes to the peer and waits for it.
    m.engine.set_access(false, false);
    m.flushes_sent.clear();
    m.completed.clear();
    let g = m.submit(flush());
    m.finish_local(g);
    assert!(
        !m.completed.iter().any(|&(s, _)| s == g),
        "waits for the peer"
    );
    let seq = *m.flushes_sent.last().expect("the flush is sent");
    assert!(seq > m.sent[0].0, "after the backlog");
    m.ack(m.sent[0].0);
    m.ack(seq);
    assert!(m.completed.contains(&(g, Ok(()))));
}

#[test]
fn async_above_the_high_water_mark_waits_for_the_remote_until_caught_up() {
    let mut m = Model::past_the_high_water_mark();
    assert_eq!(m.completed.len(), 4, "the fifth waits for the peer");
    assert!(m.engine.backlog_bytes() <= 16 << 10);
    assert_eq!(m.engine.stats().hwm_fallbacks, 1);
    // While falling back, new writes behave as mwc.
    let f = m.submit(write(10 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert!(m.sent.iter().any(|&(_, s)| s == f), "mwc: sent at once");
    for (seq, _) in m.sent.clone() {
        m.ack(seq);
    }
    m.finish_local(f);
    assert_eq!(m.completed.len(), 6);
    assert_eq!(
        m.engine.stats().hwm_fallback_active,
        0,
        "caught up: async again"
    );
}

/// A write larger than the high water mark waits for the peer (as in mwc)
/// with nothing in the backlog; once the peer has it the device is caught
/// up and async again. (It used to stay in mwc until the link went down: in
/// `bench/mirror.sh` async 4 KiB QD1 ran as slowly as mwc after the 1 MiB
/// warm-up pass.)
#[test]
fn async_a_write_above_the_high_water_mark_falls_back_only_until_the_peer_has_it() {
    let mut m = Model::connected(Mode::Async);
    // HWM 16 KiB.
    let big = m.submit(write(0, 32 << 10));
    m.settle_map();
    m.finish_local(big);
    assert!(m.completed.is_empty(), "waits for the peer");
    assert_eq!(m.engine.stats().hwm_fallback_active, 1);
    m.ack(m.sent[0].0);
    assert_eq!(m.completed, vec![(big, Ok(()))]);
    assert_eq!(m.engine.stats().hwm_fallback_active, 0, "caught up");
    let small = m.submit(write(4 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(small);
    assert!(
        m.completed.contains(&(small, Ok(()))),
        "async again: complete after the local write"
    );
    assert_eq!(m.engine.backlog_bytes(), 4096);
}

/// Falling back past the high water mark, writes are sent at once, as in
/// mwc, before they complete. A write the application submits meanwhile
/// depends on what it saw complete, not on those: otherwise the peer would
/// apply a busy device's writes one round of answers at a time (async 4 KiB
/// QD32 on loopback ran at a third of mwc's rate).
#[test]
fn async_falling_back_a_write_does_not_depend_on_writes_still_waiting_for_the_peer() {
    let mut m = Model::past_the_high_water_mark();
    let backlog_last = m.sent[3].0;
    let fifth = m.sent[4].0;
    assert_eq!(m.engine.stats().hwm_fallback_active, 1);
    // Two writes sent at once and in flight, then a third submitted.
    let a = m.submit(write(10 * REGION_SIZE_BYTES, 4096));
    let b = m.submit(write(11 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    let c = m.submit(write(12 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    let seq_of = |m: &Model, slot: Slot| m.sent.iter().rev().find(|&&(_, s)| s == slot).unwrap().0;
    let after_of = |m: &Model, seq: Seq| m.afters.iter().find(|&&(q, _)| q == seq).unwrap().1;
    let (sa, sb, sc) = (seq_of(&m, a), seq_of(&m, b), seq_of(&m, c));
    assert!(sa > fifth && sb > fifth);
    assert_eq!(
        after_of(&m, sc),
        backlog_last,
        "depends on the backlog the application saw complete, not on writes in flight"
    );
    // Once the peer answered one and it completed, later writes depend on it.
    m.ack(fifth);
    m.ack(sa);
    m.finish_local(a);
    assert!(m.completed.iter().any(|&(s, _)| s == a));
    let d = m.submit(write(13 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    let sd = seq_of(&m, d);
    assert!(after_of(&m, sd) >= sa, "a completed write is a dependency");
    assert!(after_of(&m, sd) < sb, "one still in flight is not");
}

/// Overlapping application writes go one after the other in every mode:
/// issued together, the local disk keeps whichever landed last while the
/// peer applies them in the order they were sent, and the two copies differ
/// with nothing marked. A write that overlaps nothing in flight goes at once.
#[test]
fn an_overlapping_write_waits_until_the_earlier_one_finished() {
    for mode in [Mode::Sync, Mode::Mwc, Mode::Async] {
        let mut m = Model::connected(mode);
        let first = m.submit(write(0, 8192));
        m.settle_map();
        let second = m.submit(write(4096, 8192));
        let apart = m.submit(write(REGION_SIZE_BYTES, 4096));
        m.settle_map();
        let issued = |m: &Model, slot: Slot| {
            m.log
                .iter()
                .any(|l| *l == format!("local {slot}") || *l == format!("send {slot}"))
        };
        assert!(issued(&m, first) && issued(&m, apart), "{mode}");
        assert!(
            !issued(&m, second),
            "{mode}: waits for the overlapping write"
        );
        assert_eq!(m.engine.stats().overlap_waits, 1, "{mode}");
        // The first one finishes: the second goes.
        if mode == Mode::Sync {
            m.ack(m.sent[0].0);
        }
        m.finish_local(first);
        if mode == Mode::Mwc {
            m.ack(m.sent[0].0);
        }
        assert!(m.completed.iter().any(|&(s, _)| s == first), "{mode}");
        assert!(issued(&m, second), "{mode}: goes once the first finished");
        if mode != Mode::Async {
            let seq_of = |slot| m.sent.iter().find(|&&(_, s)| s == slot).unwrap().0;
            assert!(seq_of(second) > seq_of(first), "{mode}: sent after it");
        }
    }
}

/// In sync and mwc, a write that overlaps nothing the peer has not answered,
/// with only writes unanswered before it, may pass them on the way (a lost
/// datagram then holds up only its own write). The session's first message
/// goes in order, and so does everything until the peer answered it; a
/// write sent while a flush is unanswered goes in order; async writes
/// (ordered by their dependencies) always do.
#[test]
fn a_write_may_pass_earlier_ones_only_when_it_depends_on_none_of_them() {
    for mode in [Mode::Sync, Mode::Mwc] {
        let mut m = Model::connected(mode);
        let w = |m: &mut Model, region: u64| {
            let slot = m.submit(write(region * REGION_SIZE_BYTES, 4096));
            m.settle_map();
            m.sent.iter().find(|&&(_, s)| s == slot).expect("sent").0
        };
        let first = w(&mut m, 0);
        let second = w(&mut m, 1);
        assert!(
            m.passing.is_empty(),
            "{mode}: in order until the first is answered"
        );
        m.ack(first);
        m.ack(second);
        let third = w(&mut m, 2);
        let fourth = w(&mut m, 3);
        assert_eq!(m.passing, vec![third, fourth], "{mode}");
        // A flush on its way: the next write goes in order.
        let f = m.submit(flush());
        assert_eq!(m.flushes_sent.len(), 1, "{mode}");
        let fifth = w(&mut m, 4);
        assert!(!m.passing.contains(&fifth), "{mode}: after a flush");
        m.ack(third);
        m.ack(fourth);
        m.ack(m.flushes_sent[0]);
        m.finish_local(f);
        let sixth = w(&mut m, 5);
        assert!(m.passing.contains(&sixth), "{mode}: flush answered");
    }
    let mut m = Model::connected(Mode::Async);
    for region in 0..3 {
        let slot = m.submit(write(region * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(slot);
        m.ack(m.sent.last().expect("sent").0);
    }
    assert!(m.passing.is_empty(), "async writes never pass");
    // A peer that does not take passing messages (an older one) gets none.
    let mut m = Model::new(Mode::Mwc);
    m.engine.connect(Connection {
        passing: false,
        ..Connection::from(ResyncRole::None)
    });
    m.pump();
    for region in 0..3 {
        let slot = m.submit(write(region * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(slot);
        m.ack(m.sent.last().expect("sent").0);
    }
    assert!(m.passing.is_empty(), "the peer does not take them");
}

/// Answers to plain writes that went well may pass each other (the peer
/// takes answers in any order), while this side has sent the peer nothing
/// but answers in the session; answers to failed writes and flushes go in
/// order.
#[test]
fn only_answers_to_writes_that_went_well_may_pass() {
    let mut m = Model::connected(Mode::Mwc);
    let op = |seq: Seq, request: Request| PeerOp {
        seq,
        after: 0,
        request,
        resync_region: None,
    };
    let good = m.engine.peer_op(op(1, write(0, 4096)));
    m.pump();
    m.finish_local(good);
    let bad = m.engine.peer_op(op(2, write(REGION_SIZE_BYTES, 4096)));
    m.pump();
    m.local.retain(|&s| s != bad);
    m.engine.local_done(bad, Err(libc::EIO));
    m.pump();
    m.settle_map();
    let f = m.engine.peer_op(op(3, flush()));
    m.pump();
    m.finish_local(f);
    let replies: Vec<&String> = m.log.iter().filter(|l| l.starts_with("reply")).collect();
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(replies[0].ends_with(" passing"), "{replies:?}");
    assert!(!replies[1].ends_with(" passing"), "{replies:?}");
    assert!(!replies[2].ends_with(" passing"), "{replies:?}");
    // Once this side sent the peer something else, its answers go in order.
    let w = m.submit(write(5 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert!(m.sent.iter().any(|&(_, s)| s == w));
    let next = m.engine.peer_op(op(4, write(7 * REGION_SIZE_BYTES, 4096)));
    m.pump();
    m.finish_local(next);
    let last = m.log.iter().rfind(|l| l.starts_with("reply")).unwrap();
    assert!(!last.ends_with(" passing"), "{last}");
}

#[test]
fn flush_is_honoured_remotely_in_sync_and_mwc_but_not_waited_for_in_async() {
    for mode in [Mode::Sync, Mode::Mwc] {
        let mut m = Model::connected(mode);
        let f = m.submit(flush());
        assert_eq!(m.flushes_sent.len(), 1, "{mode}");
        m.finish_local(f);
        assert!(m.completed.is_empty(), "{mode}: waits for the remote flush");
        m.ack(m.flushes_sent[0]);
        assert_eq!(m.completed, vec![(f, Ok(()))]);
    }
    let mut m = Model::connected(Mode::Async);
    let f = m.submit(flush());
    m.finish_local(f);
    assert_eq!(m.completed, vec![(f, Ok(()))]);
    assert_eq!(
        m.flushes_sent.len(),
        1,
        "a barrier still goes into the stream"
    );
}

/// A write or flush is `awaited` (the link sends it at once instead of
/// batching it) exactly when the application's request waits for the
/// peer's answer: in sync and mwc always, in async only past the high
/// water mark; async's backlog and its flush barriers are already complete.
#[test]
fn a_message_is_awaited_exactly_when_a_request_waits_for_its_answer() {
    for mode in [Mode::Sync, Mode::Mwc] {
        let mut m = Model::connected(mode);
        m.submit(write(0, 4096));
        m.submit(flush());
        m.settle_map();
        assert_eq!(m.awaited.len(), 2, "{mode}");
        assert!(m.awaited.iter().all(|&(_, a)| a), "{mode}: {:?}", m.awaited);
    }
    let mut m = Model::connected(Mode::Async);
    let w = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(w);
    let f = m.submit(flush());
    m.finish_local(f);
    assert_eq!(
        m.completed.len(),
        2,
        "both complete before the peer answers"
    );
    assert_eq!(
        m.awaited.iter().map(|&(_, a)| a).collect::<Vec<_>>(),
        [false, false]
    );
    // Past the high water mark the fifth write waits for the peer.
    let m = Model::past_the_high_water_mark();
    assert_eq!(
        m.awaited.iter().map(|&(_, a)| a).collect::<Vec<_>>(),
        [false, false, false, false, true]
    );
}

#[test]
fn peer_loss_completes_waiting_writes_once_their_regions_are_durably_stale() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(s);
    assert!(m.completed.is_empty());
    m.engine.peer_lost();
    m.pump();
    assert_eq!(m.engine.map().get(0), crate::statemap::cells::CELL_STALE);
    // Only this side has the write: a crash now would find just its intent
    // mark, so it is not acknowledged before the stale mark is on disk.
    assert!(
        m.completed.is_empty(),
        "acknowledged before the mark was durable"
    );
    m.settle_map();
    assert_eq!(m.durable.get(0), crate::statemap::cells::CELL_STALE);
    assert_eq!(m.completed, vec![(s, Ok(()))]);
    // Once the region is stale on disk, later lost writes to it need nothing.
    m.engine.connect(ResyncRole::None);
    m.pump();
    let t = m.submit(write(4096, 4096));
    m.settle_map();
    m.finish_local(t);
    m.engine.peer_lost();
    m.pump();
    assert_eq!(m.completed.last(), Some(&(t, Ok(()))));
}

#[test]
fn a_lost_write_fails_when_its_stale_mark_cannot_be_written() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(s);
    m.engine.peer_lost();
    m.pump();
    m.finish_map_write(false);
    assert_eq!(m.completed, vec![(s, Err(EngineError::MapFailed))]);
}

#[test]
fn a_lost_link_resends_what_the_peer_missed_but_not_the_acknowledged_hot_set() {
    let mut m = Model::connected(Mode::Mwc);
    // Regions 0..8: written and acknowledged (hot). Region 20: written,
    // but the link goes before the peer answers.
    for r in 0..8u64 {
        let s = m.submit(write(r * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(s);
        let (seq, _) = *m.sent.last().unwrap();
        m.ack(seq);
    }
    let cut = m.submit(write(20 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(cut);
    m.engine.peer_lost();
    m.pump();
    // Region 30: written alone.
    let alone = m.submit(write(30 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(alone);
    assert_eq!(m.engine.map().get(3), CELL_ACTIVE, "still hot");
    let bits = m.engine.dirty_bits();
    let set: Vec<u64> = (0..m.engine.map().region_count())
        .filter(|&r| bits[(r / 8) as usize] & (1 << (r % 8)) != 0)
        .collect();
    assert_eq!(set, vec![20, 30]);
    // Loaded from disk (after a crash), every cell of the hot extent is
    // suspect, written or not: the price of intent per 4 MiB extent.
    let reloaded = Engine::new(params(Mode::Mwc), m.engine.map().clone());
    let bits = reloaded.dirty_bits();
    let count: u32 = bits.iter().map(|b| b.count_ones()).sum();
    assert_eq!(u64::from(count), params(Mode::Mwc).activity_extent_regions);
}

#[test]
fn hot_regions_cost_at_most_one_map_write_per_64_data_writes() {
    let mut m = Model::connected(Mode::Mwc);
    // A hot set of 32 regions, written over and over.
    let mut data_writes = 0;
    for round in 0..100u64 {
        for r in 0..32u64 {
            let s = m.submit(write(r * REGION_SIZE_BYTES + (round % 8) * 4096, 4096));
            m.settle_map();
            m.finish_local(s);
            let seq = m.sent.last().unwrap().0;
            m.ack(seq);
            data_writes += 1;
        }
        m.engine.tick(round * 10);
        m.pump();
        m.settle_map();
    }
    let commits = m.engine.stats().map_commits as usize;
    assert!(
        commits * 64 <= data_writes,
        "{commits} map writes for {data_writes} data writes"
    );
    // Once idle, the regions are cleaned lazily: behind a barrier, once
    // the data is durable on both sides (this side synced, the peer flushed).
    m.engine.tick(1_000_000);
    m.pump();
    m.settle_map();
    assert!(m.log.iter().any(|l| l == "sync data"), "{:?}", m.log);
    assert!(!m.durable.is_clean(), "not before the peer flushed");
    m.ack_flushes();
    assert!(m.durable.is_clean(), "idle regions are cleared");
}

#[test]
fn random_writes_in_an_extent_cost_one_map_write_and_the_whole_extent_clears_when_idle() {
    let mut m = Model::connected(Mode::Mwc);
    let extent = params(Mode::Mwc).activity_extent_regions;
    let before = m.engine.stats().map_commits;
    // 64 writes scattered over the 128 regions of extent 1, each one to a
    // region not written before.
    for i in 0..64u64 {
        let r = extent + (i * 37) % extent;
        let s = m.submit(write(r * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(s);
        let seq = m.sent.last().unwrap().0;
        m.ack(seq);
    }
    assert_eq!(
        m.engine.stats().map_commits - before,
        1,
        "the first write marked the extent"
    );
    for r in extent..2 * extent {
        assert_ne!(
            m.durable.get(r),
            0,
            "region {r} of the extent is marked on disk"
        );
    }
    assert_eq!(m.durable.get(2 * extent), 0, "the next extent is not");
    // A write in another extent pays its own commit.
    let s = m.submit(write(3 * extent * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(s);
    let seq = m.sent.last().unwrap().0;
    m.ack(seq);
    assert_eq!(m.engine.stats().map_commits - before, 2);
    // Idle, every mark of both extents goes, written or not, once the data
    // is durable on both sides.
    m.engine.tick(1_000_000);
    m.pump();
    m.settle_map();
    m.ack_flushes();
    assert!(m.durable.is_clean(), "idle extents are cleared whole");
}

#[test]
fn reads_and_flushes_never_touch_the_map() {
    let mut m = Model::new(Mode::Mwc);
    m.submit(Request {
        kind: OpKind::Read,
        offset_bytes: 0,
        len_bytes: 65536,
        fua: false,
    });
    m.submit(Request {
        kind: OpKind::Flush,
        offset_bytes: 12345,
        len_bytes: 99,
        fua: false,
    });
    assert_eq!(m.local.len(), 2);
    assert_eq!(m.map_writes, 0);
    assert!(m.engine.map().is_clean());
}

#[test]
fn bad_requests_complete_with_errors_and_mark_nothing() {
    let mut m = Model::new(Mode::Mwc);
    m.submit(write(SIZE - 4096, 8192));
    m.submit(write(512, 4096));
    m.submit(write(0, 2 << 20));
    assert!(matches!(
        m.completed[0].1,
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        m.completed[1].1,
        Err(EngineError::Misaligned { .. })
    ));
    assert!(matches!(
        m.completed[2].1,
        Err(EngineError::TooLarge { .. })
    ));
    assert!(m.engine.map().is_clean());
    assert_eq!(m.map_writes, 0);
}

#[test]
fn the_async_secondary_refuses_reads_and_writes() {
    let mut m = Model::with(EngineParams {
        writable: false,
        readable: false,
        ..params(Mode::Async)
    });
    m.submit(write(0, 4096));
    m.submit(Request {
        kind: OpKind::Read,
        offset_bytes: 0,
        len_bytes: 4096,
        fua: false,
    });
    assert_eq!(m.completed[0].1, Err(EngineError::Secondary));
    assert_eq!(m.completed[1].1, Err(EngineError::Secondary));
    assert_eq!(
        m.engine.stats().writes_refused,
        1,
        "the write counts as refused, as on a readable secondary"
    );
}

#[test]
fn direct_reads_are_allowed_only_when_readable_and_nothing_awaits_resync() {
    let secondary = Model::with(EngineParams {
        readable: false,
        ..params(Mode::Mwc)
    });
    assert!(!secondary.engine.direct_reads_allowed());

    let mut m = Model::new(Mode::Mwc);
    assert!(m.engine.direct_reads_allowed());
    let regions = [0u64, 5];
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    for r in regions {
        bits[0] |= 1 << r;
    }
    m.engine.connect(ResyncRole::Target(bits));
    m.pump();
    m.settle_map();
    for (i, &region) in regions.iter().enumerate() {
        assert!(
            !m.engine.direct_reads_allowed(),
            "region {region} has not arrived yet"
        );
        let slot = m.engine.peer_op(resync_op(i as Seq + 1, region));
        m.pump();
        m.settle_map();
        m.finish_local(slot);
        m.settle_map();
    }
    assert!(m.log.iter().any(|l| l == "resync done"), "{:?}", m.log);
    assert!(m.engine.direct_reads_allowed());
}

/// A target that received a region's data holds it in memory at once, but
/// says so to a handshake only once the map on disk does too: a crash in
/// between brings the 0x6 mark back, and the peer, told otherwise, may by
/// then lack the same region (mirror_sim seed 178303: both sides then lack
/// data and neither may be the source).
#[test]
fn a_target_s_received_regions_count_for_a_handshake_only_once_durable() {
    let mut m = Model::new(Mode::Mwc);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] |= 1 << 3;
    m.engine.connect(ResyncRole::Target(bits));
    m.pump();
    m.settle_map();
    assert!(m.engine.facts_durable(), "lacking region 3 is on disk");
    let slot = m.engine.peer_op(resync_op(1, 3));
    m.pump();
    m.settle_map();
    m.local.retain(|&s| s != slot);
    m.engine.local_done(slot, Ok(()));
    assert_eq!(m.engine.map().get(3), CELL_CONSISTENT);
    assert_eq!(
        m.durable.get(3),
        CELL_RESYNC,
        "the clear rides a later commit"
    );
    assert!(!m.engine.facts_durable());
    let epoch = m.engine.settle_facts();
    m.pump();
    assert!(!m.engine.facts_durable(), "the commit is in flight");
    m.settle_map();
    assert!(m.engine.durable_epoch() >= epoch);
    assert!(m.engine.facts_durable());
    assert_eq!(m.durable.get(3), CELL_CONSISTENT);
}

/// A side that wrote alone after the handshake read its map and is then
/// told to be the target must not let the source overwrite those writes:
/// it asks for a new handshake and keeps its stale marks.
#[test]
fn a_target_that_wrote_alone_since_the_handshake_renegotiates() {
    let mut m = Model::new(Mode::Mwc);
    let s = m.submit(write(3 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(s);
    assert_eq!(m.completed.last(), Some(&(s, Ok(()))));
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = (1 << 3) | (1 << 4);
    m.engine.connect(ResyncRole::Target(bits));
    m.pump();
    m.settle_map();
    assert!(m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
    assert_eq!(
        m.engine.map().get(3),
        CELL_STALE,
        "the write alone stays to be sent"
    );
    assert_ne!(
        m.engine.map().get(4),
        CELL_RESYNC,
        "nothing is to be received"
    );
    assert!(m.engine.direct_reads_allowed());
}

/// Async: a region the primary wrote alone after the handshake read the maps
/// goes into the resync at the connect, unknown to the secondary, and every
/// write the primary completes afterwards depends on its data. The
/// secondary must mark it not received (`0x6`), durably, before it applies
/// any of them: when the resync is cut, its map then says what is missing
/// (mirror_sim seeds 5256, 8045, 9483, 12510 and 19475 with 20 000 seeds).
#[test]
fn a_region_added_to_the_resync_after_the_handshake_is_marked_on_the_target_first() {
    let mut primary = Model::new(Mode::Async);
    let mut secondary = Model::with(EngineParams {
        writable: false,
        readable: false,
        ..params(Mode::Async)
    });
    // Region 1 is stale when the handshake reads the maps.
    let s = primary.submit(write(REGION_SIZE_BYTES, 4096));
    primary.settle_map();
    primary.finish_local(s);
    let bits = primary.engine.dirty_bits();
    // Before the connect, a write to region 3, acknowledged here.
    let alone = primary.submit(write(3 * REGION_SIZE_BYTES, 4096));
    primary.settle_map();
    primary.finish_local(alone);
    assert_eq!(primary.completed.last(), Some(&(alone, Ok(()))));
    primary.log.clear();
    primary.engine.connect(ResyncRole::Source(bits.clone()));
    primary.pump();
    secondary.engine.connect(ResyncRole::Target(bits));
    secondary.pump();
    secondary.settle_map();
    assert_eq!(
        primary.log.first().map(String::as_str),
        Some("resync add 3"),
        "the target is told first: {:?}",
        primary.log
    );
    assert!(
        !primary.log.iter().any(|l| l == "resync add 1"),
        "region 1 is in the handshake's set: {:?}",
        primary.log
    );
    // A write completed after the one to region 3 depends on it.
    let later = primary.submit(write(5 * REGION_SIZE_BYTES, 4096));
    primary.settle_map();
    primary.finish_local(later);
    let (seq, _) = *primary.sent.last().expect("sent");
    // The secondary gets the stream in order: the add, then the write.
    secondary.engine.resync_added(3);
    secondary.pump();
    assert_eq!(secondary.engine.map().get(3), CELL_RESYNC);
    let applied = secondary.engine.peer_op(PeerOp {
        seq,
        after: 0,
        request: write(5 * REGION_SIZE_BYTES, 4096),
        resync_region: None,
    });
    secondary.pump();
    assert!(
        secondary.local.is_empty(),
        "a later write applied before region 3 was marked durably"
    );
    secondary.finish_map_write(true);
    assert_eq!(secondary.durable.get(3), CELL_RESYNC);
    assert_eq!(secondary.local, vec![applied]);
    secondary.finish_local(applied);
    // The link goes before region 3 arrives: the secondary's map says so,
    // and the next handshake resends it.
    secondary.engine.peer_lost();
    secondary.pump();
    secondary.settle_map();
    assert_eq!(secondary.durable.get(3), CELL_RESYNC);
    assert_ne!(secondary.engine.dirty_bits()[0] & (1 << 3), 0);
}

/// A region that becomes stale while connected (the peer failed a write)
/// is announced to the peer once, when it joins the resync.
#[test]
fn a_region_that_becomes_stale_while_connected_is_announced_once() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    let t = m.submit(write(2 * REGION_SIZE_BYTES + 8192, 4096));
    m.settle_map();
    m.finish_local(s);
    m.finish_local(t);
    m.engine
        .remote_done(m.sent[0].0, Err(EngineError::Remote(libc::EIO)));
    m.engine
        .remote_done(m.sent[1].0, Err(EngineError::Remote(libc::EIO)));
    m.pump();
    let adds: Vec<&String> = m
        .log
        .iter()
        .filter(|l| l.starts_with("resync add"))
        .collect();
    assert_eq!(adds, vec!["resync add 2"]);
}

/// On a target that reads (sync, mwc), a region the peer adds to the resync
/// is read only once its data is here, like the handshake's regions.
#[test]
fn a_region_the_peer_adds_to_the_resync_is_read_only_once_received() {
    let mut m = Model::new(Mode::Mwc);
    let none = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    m.engine.connect(ResyncRole::Target(none));
    m.pump();
    assert!(m.engine.direct_reads_allowed());
    m.engine.resync_added(4);
    m.pump();
    assert!(!m.engine.direct_reads_allowed());
    let read = m.submit(Request {
        kind: OpKind::Read,
        offset_bytes: 4 * REGION_SIZE_BYTES,
        len_bytes: 4096,
        fua: false,
    });
    assert!(m.local.is_empty(), "read before the region arrived");
    assert!(m.log.iter().any(|l| l == "prioritize 4"), "{:?}", m.log);
    m.settle_map();
    let data = m.engine.peer_op(resync_op(1, 4));
    m.pump();
    m.finish_local(data);
    assert_eq!(m.local, vec![read]);
    assert!(m.engine.direct_reads_allowed());
}

/// A write from the peer that fails here leaves this copy out of date in
/// its regions: they are marked not received (0x6), durably before anything
/// later from the peer is applied, reads of them wait for the peer's data,
/// and the peer learns of the failure from the reply.
#[test]
fn a_peer_write_that_fails_here_marks_its_regions_not_received() {
    let mut m = Model::connected(Mode::Mwc);
    let op = |seq: Seq, offset: u64| PeerOp {
        seq,
        after: 0,
        request: write(offset, 4096),
        resync_region: None,
    };
    let failing = m.engine.peer_op(op(1, 3 * REGION_SIZE_BYTES));
    m.pump();
    assert_eq!(m.local, vec![failing]);
    m.local.clear();
    m.engine.local_done(failing, Err(libc::EIO));
    m.pump();
    assert!(
        m.log
            .iter()
            .any(|l| l.starts_with(&format!("reply {failing} Err"))),
        "{:?}",
        m.log
    );
    assert_eq!(m.engine.map().get(3), CELL_RESYNC);
    assert!(!m.engine.direct_reads_allowed());
    // The next write from the peer waits for the mark to be on disk.
    let next = m.engine.peer_op(op(2, 9 * REGION_SIZE_BYTES));
    m.pump();
    assert!(m.local.is_empty(), "applied before the mark was durable");
    m.settle_map();
    assert_eq!(m.durable.get(3), CELL_RESYNC);
    assert_eq!(m.local, vec![next]);
    m.finish_local(next);
    // The peer resends the region: the copy is whole again.
    let resync = m.engine.peer_op(resync_op(3, 3));
    m.pump();
    m.finish_local(resync);
    assert_eq!(m.engine.map().get(3), CELL_CONSISTENT);
    assert!(m.engine.direct_reads_allowed());
}

/// An application write that fails here, in a region whose resync data was
/// read before it and is on its way, leaves this copy unlike what the peer
/// gets: the peer's confirmation must not clear the region, which is read
/// and sent again (mirror_sim seeds 509, 1520, 1674, 2095, 3499).
#[test]
fn a_local_write_failing_after_its_region_was_read_for_resync_sends_it_again() {
    let mut m = Model::new(Mode::Async);
    let seq = m.source_sends_region(2);
    // A write to region 2, issued once its data was read, fails here (any
    // part of it may have reached the disk).
    let w = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert_eq!(m.local, vec![w]);
    m.local.clear();
    m.engine.local_done(w, Err(libc::EIO));
    m.pump();
    assert_eq!(m.completed, vec![(w, Err(EngineError::Io(libc::EIO)))]);
    // The peer confirms the data read before the failure: the region stays marked.
    m.ack(seq);
    assert_eq!(m.engine.map().get(2), CELL_INCONSISTENT);
    assert!(!m.log.iter().any(|l| l == "resync done"), "{:?}", m.log);
    // It is read and sent again; that confirmation clears it (behind a barrier).
    let seq = m.read_and_send_region(2);
    m.ack(seq);
    m.ack_flushes();
    assert_ne!(m.engine.map().get(2), CELL_INCONSISTENT);
    assert!(m.log.iter().any(|l| l == "resync done"), "{:?}", m.log);
}

/// A confirmation of resync data never clears a mark saying this side lacks
/// the region's data (0x6): such a side is never chosen as the source
/// (`link::decide`), and if it were, the peer's copy would not be this one.
#[test]
fn a_resync_confirmation_never_clears_a_not_received_mark() {
    let mut map = StateMap::new(SIZE);
    map.set(2, CELL_RESYNC);
    let mut m = Model::new(Mode::Mwc);
    m.engine = Engine::new(params(Mode::Mwc), map.clone());
    m.durable = map;
    assert!(!m.engine.direct_reads_allowed(), "region 2 awaits data");
    let seq = m.source_sends_region(2);
    m.ack(seq);
    m.ack_flushes();
    assert_eq!(m.engine.map().get(2), CELL_RESYNC);
    assert_eq!(m.engine.stats().resync_target_remaining, 1);
}

#[test]
fn a_failed_map_write_fails_waiting_writes_and_later_ones() {
    let mut m = Model::new(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.finish_map_write(false);
    assert_eq!(m.completed, vec![(s, Err(EngineError::MapFailed))]);
    assert!(m.local.is_empty(), "no data write without a durable mark");
    m.submit(write(REGION_SIZE_BYTES * 5, 4096));
    assert_eq!(m.completed[1].1, Err(EngineError::MapFailed));
    assert!(m.engine.map_failed());
}

#[test]
fn mark_all_returns_the_epoch_that_makes_it_durable() {
    let mut m = Model::new(Mode::Mwc);
    let need = m.engine.mark_all(crate::statemap::cells::CELL_STALE);
    m.pump();
    m.finish_map_write(true);
    assert!(m.engine.durable_epoch() >= need);
    assert_eq!(m.durable.count_nonzero(), m.durable.region_count());
}

#[derive(Clone, Debug)]
enum Step {
    Submit {
        offset_blocks: u64,
        len_blocks: u64,
        kind: u8,
    },
    FinishMap,
    FinishLocal(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let blocks = SIZE / 4096;
    prop_oneof![
        4 => (0..blocks, 1u64..64, 0u8..5).prop_map(|(o, l, k)| Step::Submit { offset_blocks: o, len_blocks: l, kind: k }),
        2 => Just(Step::FinishMap),
        3 => (0usize..32).prop_map(Step::FinishLocal),
    ]
}

proptest! {
    /// Standalone: any interleaving of requests, map writes and local
    /// completions issues no data write before its mark is durable,
    /// completes every request exactly once, and ends with every written
    /// region marked on disk.
    #[test]
    fn writes_never_overtake_their_marks(steps in proptest::collection::vec(step(), 1..200)) {
        let mut m = Model::new(Mode::Mwc);
        let mut open = 0usize;
        let mut written = StateMap::new(SIZE);
        for s in steps {
            match s {
                Step::Submit { offset_blocks, len_blocks, kind } => {
                    if !m.engine.app_slot_available() { continue; }
                    let offset = offset_blocks * 4096;
                    let len = (len_blocks * 4096).min(SIZE - offset);
                    let kind = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::WriteZeroes, OpKind::Trim][kind as usize];
                    if kind.changes_data() {
                        written.mark_bytes(offset, len, 0xf);
                    }
                    m.submit(Request { kind, offset_bytes: offset, len_bytes: len, fua: kind == OpKind::Write });
                    open += 1;
                }
                Step::FinishMap => if m.in_flight_map.is_some() { m.finish_map_write(true) },
                Step::FinishLocal(i) => if !m.local.is_empty() { let s = m.local[i % m.local.len()]; m.finish_local(s) },
            }
        }
        for _ in 0..10_000 {
            if m.in_flight_map.is_some() {
                m.finish_map_write(true);
            } else if let Some(&s) = m.local.first() {
                m.finish_local(s);
            } else {
                break;
            }
        }
        prop_assert!(m.engine.is_idle());
        prop_assert_eq!(m.completed.len(), open);
        prop_assert!(m.completed.iter().all(|(_, r)| r.is_ok()));
        for region in 0..written.region_count() {
            prop_assert_eq!(m.durable.get(region) != 0, written.get(region) != 0);
        }
    }
}

#[test]
fn a_peer_that_answers_nothing_is_reported_once_after_the_stall_limit() {
    let mut m = Model::with(EngineParams {
        peer_stall_ms: 1_000,
        ..params(Mode::Mwc)
    });
    m.tick(10_000);
    m.engine.connect(ResyncRole::None);
    m.pump();
    // Nothing waits: an idle peer is never stalled.
    m.tick(20_000);
    assert!(m.stalls.is_empty());
    m.submit(write(0, 4096));
    m.settle_map();
    assert_eq!(m.sent.len(), 1);
    m.tick(20_999);
    assert!(m.stalls.is_empty(), "reported before the limit");
    m.tick(21_000);
    assert_eq!(m.stalls, vec![1_000]);
    m.tick(40_000);
    assert_eq!(m.stalls.len(), 1, "reported once per session");
    assert_eq!(m.engine.stats().peer_stalls, 1);
    // The daemon drops the link: the write completes, its region stale.
    m.engine.peer_lost();
    m.pump();
    m.settle_map();
    assert_eq!(m.engine.map().get(0), crate::statemap::cells::CELL_STALE);
}

#[test]
fn a_slow_peer_that_keeps_answering_is_not_stalled() {
    let mut m = Model::with(EngineParams {
        peer_stall_ms: 1_000,
        ..params(Mode::Mwc)
    });
    m.engine.connect(ResyncRole::None);
    m.pump();
    // Two writes in flight; each answer comes 900 ms after the last
    // progress, so the oldest waits 1.8 s in all without the peer stalling.
    m.submit(write(0, 4096));
    m.submit(write(REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert_eq!(m.sent.len(), 2);
    m.tick(900);
    m.ack(m.sent[0].0);
    m.tick(1_800);
    assert!(m.stalls.is_empty(), "a peer making progress was stalled");
    m.ack(m.sent[1].0);
    m.tick(5_000);
    assert!(m.stalls.is_empty(), "nothing waits any more");
}

#[test]
fn a_stall_limit_of_zero_waits_forever() {
    let mut m = Model::with(EngineParams {
        peer_stall_ms: 0,
        ..params(Mode::Sync)
    });
    m.engine.connect(ResyncRole::None);
    m.pump();
    m.submit(write(0, 4096));
    m.settle_map();
    m.tick(10_000_000);
    assert!(m.stalls.is_empty());
}

// ----- one writer, data generations, barriers --------------------------------

/// Writing without the peer starts a new generation, durable before the
/// write lands: a peer promoted meanwhile and this side are then told apart
/// (divergence) instead of one silently overwriting the other.
#[test]
fn a_write_without_the_peer_starts_a_new_generation_durably_first() {
    let mut m = Model::with_generation(Mode::Mwc, 100);
    let a = m.submit(write(0, 4096));
    assert!(m.local.is_empty(), "not before the generation is durable");
    assert_eq!(m.engine.durable_generations().current, 100);
    m.settle_map();
    let gens = m.engine.durable_generations();
    assert_ne!(gens.current, 100);
    assert_eq!((gens.bitmap, gens.history[0]), (100, 100));
    assert_eq!(m.local, vec![a]);
    m.finish_local(a);
    // Further writes alone keep the generation.
    let b = m.submit(write(5 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(b);
    assert_eq!(m.engine.durable_generations(), gens);
    // A connection to a peer holding this data and a loss later, the next
    // write alone draws again, counting from the generation both held.
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::None,
        peer_current: gens.current,
        stale_at_handshake: 2,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    m.engine.peer_lost();
    m.pump();
    let c = m.submit(write(9 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(c);
    let again = m.engine.durable_generations();
    assert_ne!(again.current, gens.current);
    assert_eq!(again.bitmap, gens.current);
}

/// A write alone that drew a generation not yet durable: a handshake that
/// read the older generation and found the same data on both sides does
/// not make the new one the pair's, even where the marks it counts did not
/// change (a handshake counting them in memory): the link is set up again,
/// and the next handshake reads it (mirror_sim seed 1804: it became
/// durable later and read as a divergence).
#[test]
fn a_generation_drawn_after_the_handshake_read_this_side_sets_the_link_up_again() {
    let mut m = Model::with_generation(Mode::Mwc, 100);
    let a = m.submit(write(0, 4096));
    assert!(m.in_flight_map.is_some(), "the new generation's commit");
    assert!(!m.engine.facts_durable(), "a handshake must wait for it");
    assert_eq!(m.engine.durable_generations().current, 100);
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::None,
        peer_current: 100,
        stale_at_handshake: 1,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    assert!(m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
    m.settle_map();
    assert!(m.engine.facts_durable());
    let _ = a;
}

/// A resync target takes the source's generation once the marks of what
/// it lacks are durable, in a later map write than theirs, and tells the
/// source only then. Sim seed 30318: the target had stale marks of its own
/// (writes a failover discarded); a crash tore the map write that held
/// both the new generation and the 0x6 marks over them, the superblock
/// landed and the page did not, and the copy came back naming the
/// source's data with its discarded writes marked stale, as if the source
/// lacked them: promoted later, it sent them back.
#[test]
fn a_target_takes_the_source_generation_once_its_marks_are_durable_and_then_says_so() {
    let mut m = Model::with_generation(Mode::Mwc, 100);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 0b110;
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Target(bits),
        peer_current: 200,
        stale_at_handshake: 0,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    // The write of the marks does not name the source's data.
    assert!(m.in_flight_map.is_some());
    assert_ne!(m.map_gens.last().unwrap().map(|g| g.current), Some(200));
    assert_eq!(m.engine.generations().current, 100);
    m.finish_map_write(true);
    assert_eq!(m.durable.get(1), CELL_RESYNC);
    assert_eq!(m.durable.get(2), CELL_RESYNC);
    assert_eq!(m.engine.durable_generations().current, 100);
    // Then the generation, in a write of its own.
    assert!(m.in_flight_map.is_some());
    assert_eq!(m.map_gens.last().unwrap().map(|g| g.current), Some(200));
    assert_eq!(m.engine.generations().current, 200);
    assert!(
        !m.log.iter().any(|l| l.starts_with("adopted")),
        "{:?}",
        m.log
    );
    m.settle_map();
    assert_eq!(m.engine.durable_generations().current, 200);
    assert_eq!(
        m.log.iter().filter(|l| *l == "adopted 200").count(),
        1,
        "{:?}",
        m.log
    );
}

/// A source that wrote alone between the handshake and the connect drew a
/// new generation: the target would take the one the handshake read, which
/// the source no longer holds. It asks to renegotiate instead (sim seed 60:
/// after a role switch the old target went alone from that name and the
/// pair refused to connect as diverged).
#[test]
fn a_source_whose_generation_changed_since_the_handshake_renegotiates() {
    let mut m = Model::with_generation(Mode::Mwc, 100);
    // The handshake read generation 100; then a write alone draws another.
    let a = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(a);
    let drawn = m.engine.durable_generations().current;
    assert_ne!(drawn, 100);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 0b10;
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Source(bits.clone()),
        peer_current: 100,
        stale_at_handshake: 0,
        source_current: 100,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    assert!(m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
    assert!(m.resync_reads.is_empty(), "nothing is sent in that session");
    m.engine.peer_lost();
    m.pump();
    // The next handshake reads the new generation: the session goes on.
    m.log.clear();
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Source(bits),
        peer_current: 100,
        stale_at_handshake: 1,
        source_current: drawn,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    m.settle_map();
    assert!(!m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
    assert!(!m.resync_reads.is_empty(), "the resync starts");
}

/// A link set up and dropped before the peer took this side's generation
/// (the source renegotiated at connect) draws no other: the peer cannot
/// hold the one drawn alone, and short-lived set-ups would otherwise push
/// the generation the peer holds out of the history (sim seed 89: after a
/// few renegotiations the pair refused to connect as diverged). Once a
/// session gave it to the peer, the next write alone draws again.
#[test]
fn a_generation_no_session_took_is_kept_when_the_link_drops_again() {
    let mut m = Model::with_generation(Mode::Mwc, 100);
    let a = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(a);
    let alone = m.engine.durable_generations();
    assert_ne!(alone.current, 100);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 1;
    // A handshake that read generation 100 before the write: renegotiated.
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Source(bits.clone()),
        peer_current: 100,
        stale_at_handshake: 0,
        source_current: 100,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    m.engine.peer_lost();
    m.pump();
    let b = m.submit(write(7 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(b);
    assert_eq!(m.engine.durable_generations(), alone, "nothing drawn");
    // The next handshake reads it; the session gives it to the peer.
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Source(bits),
        peer_current: 100,
        stale_at_handshake: 2,
        source_current: alone.current,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    m.engine.peer_lost();
    m.pump();
    let c = m.submit(write(9 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(c);
    let again = m.engine.durable_generations();
    assert_ne!(again.current, alone.current, "drawn again");
    assert_eq!(again.bitmap, 100, "the marks still count from the peer's");
}

/// A resync source marks every region it is to send (here a region its
/// own map holds clean, marked on the target only), durably before it reads
/// any: the target clears its mark once the data is on its platters, while
/// this copy may hold that data in its disk cache only, and a power cut here
/// would otherwise leave the copies different with neither map marking it
/// (sim seed 15934: a failover made the old secondary, whose disk cache held
/// a write of the ended session, the source).
#[test]
fn a_source_reads_nothing_before_the_regions_it_sends_are_durably_marked() {
    let mut m = Model::new(Mode::Mwc);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 1 << 3;
    m.engine.connect(ResyncRole::Source(bits));
    m.pump();
    assert_eq!(m.engine.map().get(3), CELL_INCONSISTENT);
    assert_eq!(m.durable.get(3), 0);
    assert!(m.resync_reads.is_empty(), "read before the mark is durable");
    m.finish_map_write(true);
    assert_eq!(m.durable.get(3), CELL_INCONSISTENT);
    assert_eq!(m.resync_reads.len(), 1, "read once it is");
}

/// The source stops counting its marks from the older generation once the
/// target says it holds the source's.
#[test]
fn a_source_forgets_the_older_generation_once_the_target_adopted() {
    let mut m = Model::new(Mode::Mwc);
    m.engine = Engine::with_generations(
        params(Mode::Mwc),
        StateMap::new(SIZE),
        Generations {
            term: 0,
            current: 200,
            bitmap: 100,
            history: [100, 0, 0],
        },
        7,
    );
    m.engine.connect(ResyncRole::None);
    m.pump();
    m.engine.peer_adopted(999);
    m.pump();
    m.settle_map();
    assert_eq!(
        m.engine.durable_generations().bitmap,
        100,
        "another generation"
    );
    m.engine.peer_adopted(200);
    m.pump();
    m.settle_map();
    assert_eq!(m.engine.durable_generations().bitmap, 0);
}

/// Idle hot regions lose their marks only once both volumes are flushed:
/// the local sync and the peer's flush, in either order.
#[test]
fn hot_marks_go_only_after_both_sides_flushed() {
    for sync_first in [true, false] {
        let mut m = Model::connected(Mode::Mwc);
        m.hold_syncs = true;
        let s = m.submit(write(0, 4096));
        m.settle_map();
        m.finish_local(s);
        let (seq, _) = *m.sent.last().unwrap();
        m.ack(seq);
        assert_eq!(m.durable.get(0), CELL_WRITING, "written as in flight");
        m.tick(1_000_000);
        m.settle_map();
        assert_eq!(m.syncs.len(), 1, "a local sync for the barrier");
        assert_eq!(m.flushes_sent.len(), 1, "and a flush to the peer");
        if sync_first {
            m.finish_syncs();
            assert_ne!(m.durable.get(0), 0, "the peer has not flushed yet");
            m.ack_flushes();
        } else {
            m.ack_flushes();
            assert_ne!(m.durable.get(0), 0, "this side has not synced yet");
            m.finish_syncs();
        }
        assert!(m.durable.is_clean(), "sync first: {sync_first}");
        assert!(m.engine.is_idle());
    }
}

/// A barrier the link takes away leaves the marks: nothing says the peer
/// holds the data durably.
#[test]
fn a_barrier_cut_by_the_link_keeps_the_marks() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(s);
    let (seq, _) = *m.sent.last().unwrap();
    m.ack(seq);
    m.tick(1_000_000);
    m.settle_map();
    assert_eq!(m.flushes_sent.len(), 1);
    m.engine.peer_lost();
    m.pump();
    m.settle_map();
    assert_eq!(m.engine.map().get(0), CELL_ACTIVE, "still hot");
    assert!(m.engine.is_idle(), "nothing waits for a peer that is gone");
}

/// Resync confirmations clear the source's marks behind a barrier too, and
/// resync data is written with FUA on the target.
#[test]
fn resync_confirmations_clear_marks_behind_a_barrier_and_data_lands_with_fua() {
    let mut m = Model::new(Mode::Mwc);
    let seq = m.source_sends_region(4);
    m.ack(seq);
    m.settle_map();
    assert_ne!(m.durable.get(4), 0, "not before the barrier");
    m.ack_flushes();
    assert_eq!(m.durable.get(4), 0);
    // Target side.
    let mut t = Model::new(Mode::Mwc);
    let mut bits = vec![0u8; t.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 1 << 4;
    t.engine.connect(ResyncRole::Target(bits));
    t.pump();
    t.settle_map();
    let slot = t.engine.peer_op(resync_op(1, 4));
    t.pump();
    assert!(t.engine.request(slot).fua, "resync data is written durably");
}

/// A resync read that fails keeps its region to send, is counted, and is
/// read again after a back-off while the resync stays open: never silent,
/// never stopped.
#[test]
fn a_failed_resync_read_is_counted_and_retried_after_a_back_off() {
    let mut m = Model::new(Mode::Mwc);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 1 << 2;
    m.engine.connect(ResyncRole::Source(bits));
    m.pump();
    m.settle_map();
    let read = m.resync_reads.pop().expect("a read");
    m.engine.local_done(read, Err(libc::EIO));
    m.pump();
    let stats = m.engine.stats();
    assert_eq!(stats.resync_read_errors, 1);
    assert_eq!(stats.resync_failed_regions, 1);
    assert_eq!(stats.resync_remaining, 1, "still to send");
    assert!(!m.log.iter().any(|l| l == "resync done"));
    m.tick(500);
    assert!(m.resync_reads.is_empty(), "not before the back-off");
    m.tick(1_500);
    let seq = m.read_and_send_region(2);
    m.ack(seq);
    m.ack_flushes();
    assert!(m.log.iter().any(|l| l == "resync done"), "{:?}", m.log);
    assert_eq!(m.engine.map().get(2), 0);
}

/// Resync data for a region the target holds stale is never applied over
/// it: refused, and the pair sets the link up again (also when the source
/// adds such a region to the resync).
#[test]
fn a_target_refuses_resync_data_for_a_region_it_holds_stale() {
    let mut m = Model::new(Mode::Mwc);
    let s = m.submit(write(3 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.finish_local(s);
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    bits[0] = 1 << 5;
    m.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Target(bits),
        peer_current: 0,
        stale_at_handshake: 1,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    m.pump();
    m.settle_map();
    let slot = m.engine.peer_op(resync_op(1, 3));
    m.pump();
    assert!(
        m.log
            .iter()
            .any(|l| *l == format!("reply {slot} Err(StaleHere)")),
        "{:?}",
        m.log
    );
    assert!(m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
    assert_eq!(m.engine.map().get(3), CELL_STALE, "kept");
    assert_eq!(m.engine.stats().resync_refused, 1);
    m.log.clear();
    m.engine.resync_added(3);
    m.pump();
    assert!(m.log.iter().any(|l| l == "renegotiate"), "{:?}", m.log);
}

/// A clean stop of a connected pair leaves the map clean: idle hot regions
/// go behind a barrier before the device stops.
#[test]
fn a_clean_stop_of_a_connected_pair_leaves_the_map_clean() {
    let mut m = Model::connected(Mode::Mwc);
    for r in 0..4u64 {
        let s = m.submit(write(r * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(s);
        let (seq, _) = *m.sent.last().unwrap();
        m.ack(seq);
    }
    assert!(!m.durable.is_clean());
    m.engine.prepare_stop();
    m.pump();
    assert!(!m.engine.is_idle(), "the barrier is under way");
    m.ack_flushes();
    assert!(m.durable.is_clean());
    assert!(m.engine.is_idle());
}

/// A peer that stopped after flushing everything it acknowledged lets the
/// hot marks go once this side synced: no flush to a peer that is gone.
#[test]
fn a_peer_that_left_flushed_lets_hot_marks_go_after_a_local_sync() {
    let mut m = Model::connected(Mode::Mwc);
    m.hold_syncs = true;
    let s = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(s);
    let (seq, _) = *m.sent.last().unwrap();
    m.ack(seq);
    m.engine.peer_left();
    m.pump();
    assert!(m.flushes_sent.is_empty());
    assert_eq!(m.syncs.len(), 1);
    m.finish_syncs();
    assert!(m.durable.is_clean());
}

/// A secondary refuses writes, and serves them again once promoted.
#[test]
fn access_follows_the_role() {
    let mut m = Model::new(Mode::Mwc);
    m.engine.set_access(false, true);
    let w = m.submit(write(0, 4096));
    assert_eq!(m.completed, vec![(w, Err(EngineError::ReadOnly))]);
    assert_eq!(EngineError::ReadOnly.errno(), libc::EPERM);
    let r = m.submit(Request {
        kind: OpKind::Read,
        ..write(0, 4096)
    });
    assert_eq!(m.local, vec![r], "reads go on");
    m.finish_local(r);
    assert_eq!(m.engine.stats().writes_refused, 1);
    m.engine.set_access(true, true);
    let w = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(w);
    assert_eq!(m.completed.last(), Some(&(w, Ok(()))));
}

/// A secondary promoted syncs its data volume before anything else: what
/// it received from the old primary (acknowledged there) may sit in a
/// cache only. The superblock recording the role and the first write of
/// the new primary both wait for that sync; a failed sync is tried again
/// at the next tick, the writes held meanwhile (never failed).
#[test]
fn a_promotion_syncs_the_data_volume_before_the_role_and_the_first_write() {
    let mut m = Model::with(EngineParams {
        writable: false,
        ..params(Mode::Sync)
    });
    m.hold_syncs = true;
    let epoch = m.engine.change_access(PairRole::Primary, true);
    m.pump();
    assert_eq!(m.syncs.len(), 1, "the data volume is synced first");
    assert!(m.in_flight_map.is_none(), "the role waits for the sync");
    let w = m.submit(write(0, 4096));
    assert!(m.local.is_empty() && m.completed.is_empty(), "held");
    assert!(!m.engine.is_idle());
    // The sync fails: reported, tried again at the next tick.
    let failed = m.syncs.pop().expect("sync");
    m.engine.data_synced(failed, Err(libc::EIO));
    m.pump();
    assert!(m.in_flight_map.is_none() && m.completed.is_empty());
    m.tick(1_000);
    assert_eq!(m.syncs.len(), 1, "tried again");
    assert!(m.engine.durable_epoch() < epoch);
    m.finish_syncs();
    assert!(m.engine.durable_epoch() >= epoch, "the role is durable now");
    m.finish_local(w);
    assert_eq!(m.completed, vec![(w, Ok(()))]);
    // Already primary: nothing to sync.
    m.engine.change_access(PairRole::Primary, true);
    m.pump();
    assert!(m.syncs.is_empty());
    // Demoted while a promotion waits: the held write is refused.
    m.engine.change_access(PairRole::Secondary, true);
    m.engine.change_access(PairRole::Primary, true);
    m.pump();
    let held = m.submit(write(0, 4096));
    m.engine.change_access(PairRole::Secondary, true);
    m.pump();
    assert_eq!(
        m.completed.last(),
        Some(&(held, Err(EngineError::ReadOnly)))
    );
    m.settle_map();
    assert!(m.engine.is_idle());
}

/// A copy promoted apart from its peer (a failover) starts a new
/// generation in the commit that records its role, before `gmdctl
/// primary` returns and whether or not it ever writes: the old primary,
/// back with writes this copy never got, is behind it. Promoted while
/// connected (a switch), the pair's generation stays.
#[test]
fn a_failover_promotion_draws_a_generation_with_the_role_and_a_switch_does_not() {
    let secondary = |current| {
        let mut m = Model::with_generation(Mode::Mwc, current);
        m.engine.set_access(false, true);
        m
    };
    let mut apart = secondary(100);
    let epoch = apart.engine.change_access(PairRole::Primary, true);
    apart.pump();
    assert_eq!(apart.engine.durable_generations().current, 100);
    apart.settle_map();
    assert!(apart.engine.durable_epoch() >= epoch);
    let gens = apart.engine.durable_generations();
    assert_ne!(gens.current, 100, "a new generation, durable with the role");
    assert_eq!((gens.bitmap, gens.history[0]), (100, 100));
    // Its first write draws no other.
    let w = apart.submit(write(0, 4096));
    apart.settle_map();
    apart.finish_local(w);
    assert_eq!(apart.engine.durable_generations(), gens);

    assert_eq!(gens.term, 1, "a promotion raises the term");
    let mut connected = secondary(100);
    connected.engine.connect(Connection {
        peer_term: 4,
        role: ResyncRole::None,
        peer_current: 100,
        stale_at_handshake: 0,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    connected.pump();
    connected.settle_map();
    assert_eq!(
        connected.engine.durable_generations().term,
        4,
        "a connection takes the peer's higher term"
    );
    connected.engine.change_access(PairRole::Primary, true);
    connected.pump();
    connected.settle_map();
    let gens = connected.engine.durable_generations();
    assert_eq!((gens.current, gens.term), (100, 5));
    assert!(
        connected.log.iter().any(|l| l == "term 5"),
        "a promotion while connected tells the peer its term: {:?}",
        connected.log
    );
    // The peer, promoted again within the session (seeds 535784, 753808),
    // says so: this side's next promotion goes above it.
    connected.engine.change_access(PairRole::Secondary, true);
    connected.pump();
    connected.engine.peer_promoted(9);
    connected.engine.change_access(PairRole::Primary, true);
    connected.pump();
    connected.settle_map();
    assert_eq!(connected.engine.durable_generations().term, 10);

    // A resync target takes the source's term with its generation, even a
    // lower one: its own counted promotions of another lineage (seed
    // 248924: the higher term of a copy that then received the failed-over
    // side's data made it the source of data it lacked).
    let mut target = secondary(100);
    target.engine.change_access(PairRole::Primary, true);
    target.pump();
    target.settle_map();
    target.engine.change_access(PairRole::Secondary, true);
    target.pump();
    target.settle_map();
    assert_eq!(target.engine.durable_generations().term, 1);
    let bits = bits_of(&target, &[3]);
    target.engine.connect(Connection {
        peer_term: 0,
        role: ResyncRole::Target(bits),
        peer_current: 300,
        stale_at_handshake: 0,
        source_current: 0,
        resync_checksums: false,
        passing: true,
    });
    target.pump();
    target.settle_map();
    let gens = target.engine.durable_generations();
    assert_eq!((gens.current, gens.term), (300, 0));
}

/// `--force` makes a copy that lacks regions the newest as it is: a new
/// generation, and the regions it had not received turn stale (sent from
/// here); discarding goes the other way.
#[test]
fn forcing_and_discarding_move_the_generation_and_the_marks() {
    let mut map = StateMap::new(SIZE);
    map.set(2, CELL_RESYNC);
    let mut m = Model::new(Mode::Mwc);
    m.engine = Engine::with_generations(
        params(Mode::Mwc),
        map.clone(),
        Generations {
            current: 100,
            ..Generations::default()
        },
        7,
    );
    m.durable = map;
    m.engine.force_new_generation();
    m.pump();
    m.settle_map();
    assert_eq!(m.durable.get(2), CELL_STALE);
    let g = m.engine.durable_generations();
    assert_ne!(g.current, 100);
    assert_eq!(g.bitmap, 100);
    assert!(m.engine.direct_reads_allowed(), "nothing awaited any more");
    m.engine.discard_own_changes().expect("apart");
    m.pump();
    m.settle_map();
    assert_eq!(m.durable.get(2), CELL_INCONSISTENT, "resent, not stale");
    assert_eq!(m.engine.durable_generations().current, 100);
    m.engine.connect(ResyncRole::None);
    m.pump();
    assert_eq!(
        m.engine.discard_own_changes(),
        None,
        "never while connected"
    );
}

/// A write that starts in a region whose barrier is under way is not
/// covered by it: the region keeps its mark until a later barrier (sim
/// seeds 225, 23); and a sync of a barrier the link dropped counts for
/// nothing in the next one (sim seeds 2959, 13578).
#[test]
fn a_barrier_clears_only_what_it_covers() {
    let mut m = Model::connected(Mode::Mwc);
    m.hold_syncs = true;
    let write_and_ack = |m: &mut Model, r: u64| {
        let s = m.submit(write(r * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        m.finish_local(s);
        let (seq, _) = *m.sent.last().unwrap();
        m.ack(seq);
    };
    write_and_ack(&mut m, 0);
    m.tick(1_000_000);
    m.settle_map();
    assert_eq!(m.syncs.len(), 1, "a barrier over region 0 started");
    // Region 0 is written again while the barrier is under way.
    write_and_ack(&mut m, 0);
    m.tick(2_000_000);
    m.finish_syncs();
    m.ack_flushes();
    assert_ne!(
        m.durable.get(0),
        0,
        "the barrier did not cover the new write"
    );
    // A later barrier does.
    m.tick(3_000_000);
    m.finish_syncs();
    m.ack_flushes();
    assert_eq!(m.durable.get(0), 0);
    // A sync of a barrier the link dropped finishes nothing later.
    write_and_ack(&mut m, 1);
    m.tick(4_000_000);
    let old: Vec<u64> = m.syncs.drain(..).collect();
    m.engine.peer_lost();
    m.pump();
    m.settle_map();
    m.engine.connect(ResyncRole::None);
    m.pump();
    m.settle_map();
    assert_eq!(m.syncs.len(), 1, "a new barrier, its own sync");
    for sync in old {
        m.engine.data_synced(sync, Ok(()));
        m.pump();
    }
    m.ack_flushes();
    assert_ne!(m.durable.get(1), 0, "an old sync counts for nothing");
    m.finish_syncs();
    assert_eq!(m.durable.get(1), 0);
}

/// `gmdctl compare`: a region is compared only while clean or hot with no
/// write in flight, and never while disconnected.
#[test]
fn a_region_is_settled_for_compare_only_without_writes_in_flight() {
    let m = Model::new(Mode::Mwc);
    assert!(!m.engine.region_settled(2), "not connected");
    let mut m = Model::connected(Mode::Mwc);
    assert!(m.engine.region_settled(2));
    let s = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert!(!m.engine.region_settled(2), "a write is in flight");
    assert!(m.engine.region_settled(3));
    m.finish_local(s);
    assert!(!m.engine.region_settled(2), "the peer has not answered");
    m.ack(m.sent[0].0);
    assert!(m.engine.region_settled(2), "hot, every write acknowledged");
    assert!(!m.engine.region_settled(m.engine.map().region_count()));
}

/// `gmdctl compare --repair`: a differing region is marked stale durably,
/// announced to the peer, and read for the resync only once the mark is
/// durable; its confirmation clears it.
#[test]
fn regions_a_compare_found_different_are_resent_after_their_marks_are_durable() {
    let mut m = Model::connected(Mode::Mwc);
    m.engine.resend_regions(&[4, 9, 4]);
    m.pump();
    assert_eq!(m.engine.map().get(4), CELL_STALE);
    assert_eq!(m.engine.map().get(9), CELL_STALE);
    let adds: Vec<&String> = m
        .log
        .iter()
        .filter(|l| l.starts_with("resync add"))
        .collect();
    assert_eq!(adds, vec!["resync add 4", "resync add 9"]);
    assert!(
        m.resync_reads.is_empty(),
        "read before the marks are durable"
    );
    m.finish_map_write(true);
    m.pump();
    assert_eq!(m.durable.get(4), CELL_STALE);
    assert!(!m.resync_reads.is_empty(), "read once they are");
}

// ----- site isolation --------------------------------------------------

/// A connected mwc model with one write done locally but not acknowledged
/// by the peer when the link is lost, isolated; returns it and the slot.
fn isolated_with_a_lost_write(mode: Mode) -> (Model, Slot) {
    let mut m = Model::connected(mode);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    if mode == Mode::Mwc {
        m.finish_local(s);
    }
    m.engine.peer_isolated();
    m.pump();
    if mode == Mode::Sync {
        // sync: the local write goes once the peer is gone.
        m.finish_local(s);
    }
    m.settle_map();
    (m, s)
}

#[test]
fn an_isolated_side_holds_lost_and_new_writes_without_failing_them() {
    for mode in [Mode::Sync, Mode::Mwc] {
        let (mut m, lost) = isolated_with_a_lost_write(mode);
        assert!(m.engine.is_isolated());
        assert!(m.completed.is_empty(), "{mode:?}: a held write completed");
        let generation = m.engine.generations().current;
        // Region 200: outside the lost write's extent (not warmed).
        let new = m.submit(write(200 * REGION_SIZE_BYTES, 4096));
        m.settle_map();
        assert!(m.local.is_empty(), "{mode:?}: a new write was issued");
        assert_eq!(m.engine.map().get(200), 0, "no stale mark for a held write");
        assert_eq!(
            m.engine.generations().current,
            generation,
            "no new generation"
        );
        assert_eq!(m.engine.stats().writes_held, 2);
        // Reads and flushes go on.
        let read = m.submit(Request {
            kind: OpKind::Read,
            ..write(0, 4096)
        });
        m.finish_local(read);
        let f = m.submit(flush());
        m.finish_local(f);
        assert_eq!(m.completed, vec![(read, Ok(())), (f, Ok(()))]);
        // Released (the peer confirmed down): both complete, alone.
        m.completed.clear();
        m.engine.release_isolation();
        m.pump();
        m.settle_map();
        m.finish_local(new);
        m.settle_map();
        let mut done: Vec<_> = m.completed.clone();
        done.sort_by_key(|(s, _)| *s);
        let mut want = vec![(lost, Ok(())), (new, Ok(()))];
        want.sort_by_key(|(s, _)| *s);
        assert_eq!(done, want, "{mode:?}");
        assert_eq!(m.engine.map().get(200), CELL_STALE);
        assert_ne!(m.engine.generations().current, generation, "alone now");
        assert_eq!(m.engine.stats().writes_held, 0);
    }
}

#[test]
fn an_isolated_side_whose_link_returns_mirrors_the_held_writes() {
    let (mut m, lost) = isolated_with_a_lost_write(Mode::Mwc);
    let new = m.submit(write(10 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    let generation = m.engine.generations().current;
    m.engine.connect(ResyncRole::None);
    m.pump();
    m.settle_map();
    assert!(!m.engine.is_isolated());
    // The lost write completes (its region stays stale, for the resync);
    // the new one is mirrored like any other.
    assert_eq!(m.completed, vec![(lost, Ok(()))]);
    assert_eq!(m.engine.map().get(0), CELL_STALE);
    assert!(m.sent.iter().any(|&(_, s)| s == new), "{:?}", m.log);
    m.finish_local(new);
    let (seq, _) = *m.sent.iter().find(|&&(_, s)| s == new).unwrap();
    m.ack(seq);
    assert_eq!(m.completed.last(), Some(&(new, Ok(()))));
    assert_eq!(
        m.engine.generations().current,
        generation,
        "never wrote alone"
    );
}

#[test]
fn a_plain_peer_loss_still_goes_on_alone() {
    let mut m = Model::connected(Mode::Mwc);
    let s = m.submit(write(0, 4096));
    m.settle_map();
    m.finish_local(s);
    m.engine.peer_lost();
    m.pump();
    m.settle_map();
    assert!(!m.engine.is_isolated());
    assert_eq!(m.completed, vec![(s, Ok(()))]);
    // A release without an isolation changes nothing.
    m.engine.release_isolation();
    m.pump();
    let t = m.submit(write(4096, 4096));
    m.settle_map();
    m.finish_local(t);
    m.settle_map();
    assert_eq!(m.completed.last(), Some(&(t, Ok(()))));
}

#[test]
fn held_writes_fail_when_the_isolated_device_stops() {
    let (mut m, lost) = isolated_with_a_lost_write(Mode::Mwc);
    let new = m.submit(write(10 * REGION_SIZE_BYTES, 4096));
    m.engine.fail_isolated();
    m.pump();
    m.settle_map();
    let mut done = m.completed.clone();
    done.sort_by_key(|(s, _)| *s);
    let mut want = vec![
        (lost, Err(EngineError::Unavailable)),
        (new, Err(EngineError::Unavailable)),
    ];
    want.sort_by_key(|(s, _)| *s);
    assert_eq!(done, want);
    assert_eq!(
        m.engine.map().get(0),
        CELL_STALE,
        "the lost write's region stays stale"
    );
    assert!(m.engine.is_idle());
}

// ----- checksum resync ----------------------------------------------------

/// One bit per region, `regions` set.
fn bits_of(m: &Model, regions: &[u64]) -> Vec<u8> {
    let mut bits = vec![0u8; m.engine.map().region_count().div_ceil(8) as usize];
    for &r in regions {
        bits[(r / 8) as usize] |= 1 << (r % 8);
    }
    bits
}

/// Connects `m` as the source of `regions` with checksum resync.
fn connect_checking_source(m: &mut Model, regions: &[u64]) {
    let bits = bits_of(m, regions);
    m.engine.connect(Connection {
        resync_checksums: true,
        passing: true,
        ..Connection::from(ResyncRole::Source(bits))
    });
    m.pump();
    m.settle_map();
}

/// A target with `regions` not received, its marks durable.
fn checking_target(regions: &[u64]) -> Model {
    let mut t = Model::new(Mode::Mwc);
    let bits = bits_of(&t, regions);
    t.engine.connect(Connection {
        resync_checksums: true,
        passing: true,
        ..Connection::from(ResyncRole::Target(bits))
    });
    t.pump();
    t.settle_map();
    t
}

/// Source: a region's checksum goes instead of its data; the target's
/// "same" clears the mark only behind a barrier (both volumes flushed),
/// and no data message is ever sent for it.
#[test]
fn a_region_found_the_same_moves_no_data_and_clears_after_both_flushed() {
    let mut m = Model::new(Mode::Mwc);
    connect_checking_source(&mut m, &[4]);
    let read = m.resync_reads.pop().expect("the region is read");
    m.engine.local_done(read, Ok(()));
    m.pump();
    assert!(m.resync_sent.is_empty(), "no data goes first");
    let (seq, region) = m.checks_sent[0];
    assert_eq!(region, 4);
    m.ack(seq);
    m.settle_map();
    assert_ne!(m.durable.get(4), 0, "not before the barrier");
    assert!(
        !m.flushes_sent.is_empty(),
        "a barrier asks the peer to flush"
    );
    m.ack_flushes();
    assert_eq!(m.durable.get(4), 0);
    assert!(m.resync_sent.is_empty());
    assert!(m.log.iter().any(|l| l == "resync done"), "{:?}", m.log);
    let stats = m.engine.stats();
    assert_eq!(stats.resync_same_bytes, REGION_SIZE_BYTES);
    assert_eq!(stats.resync_bytes_sent, 0);
    assert_eq!(stats.resync_checks, 1);
}

/// Target: a region found the same is taken as received only once its
/// volume is synced (what it read is then on disk), and only then answered.
#[test]
fn a_target_takes_a_region_found_the_same_once_its_volume_is_synced() {
    let mut t = checking_target(&[4, 5]);
    t.hold_syncs = true;
    let slot = t.engine.peer_check(1, 4);
    t.pump();
    assert_eq!(t.local, vec![slot], "the region is read");
    assert_eq!(t.engine.request(slot).kind, OpKind::Read);
    t.local.clear();
    t.engine.check_done(slot, Ok(true));
    t.pump();
    assert_eq!(t.syncs.len(), 1, "a sync first");
    assert!(!t.log.iter().any(|l| l.starts_with("reply")), "{:?}", t.log);
    assert_eq!(t.engine.map().get(4), CELL_RESYNC, "not received yet");
    t.finish_syncs();
    assert!(
        t.log.iter().any(|l| *l == format!("reply {slot} Ok(())")),
        "{:?}",
        t.log
    );
    assert_eq!(t.durable.get(4), CELL_CONSISTENT);
    assert_eq!(t.durable.get(5), CELL_RESYNC);
    assert_eq!(t.engine.stats().resync_same_bytes, REGION_SIZE_BYTES);
    assert!(!t.log.iter().any(|l| l == "resync done"), "region 5 waits");
}

/// A region whose checksum differs (or cannot be read on the target) keeps
/// its marks, and its data then moves as in a plain resync.
#[test]
fn a_region_found_different_moves_its_data() {
    let mut t = checking_target(&[4]);
    let slot = t.engine.peer_check(1, 4);
    t.pump();
    t.engine.check_done(slot, Ok(false));
    t.pump();
    assert!(
        t.log
            .iter()
            .any(|l| *l == format!("reply {slot} Err(Differs)")),
        "{:?}",
        t.log
    );
    assert_eq!(t.engine.map().get(4), CELL_RESYNC, "still to receive");
    assert_eq!(t.engine.stats().resync_same_bytes, 0);

    let mut m = Model::new(Mode::Mwc);
    connect_checking_source(&mut m, &[4]);
    let read = m.resync_reads.pop().expect("read");
    m.engine.local_done(read, Ok(()));
    m.pump();
    let (seq, _) = m.checks_sent[0];
    m.engine
        .remote_done(seq, Err(EngineError::Remote(libc::EILSEQ)));
    m.pump();
    m.ack_flushes();
    assert_ne!(m.durable.get(4), 0, "still marked");
    // Read again, and this time the data goes.
    let seq = m.read_and_send_region(4);
    assert_eq!(m.checks_sent.len(), 1, "no second check");
    m.ack(seq);
    m.ack_flushes();
    assert_eq!(m.durable.get(4), 0);
    let stats = m.engine.stats();
    assert_eq!(stats.resync_checks_differ, 1);
    assert_eq!(stats.resync_bytes_sent, REGION_SIZE_BYTES);
    assert_eq!(stats.resync_same_bytes, 0);
}

/// A write to a region being read for its check waits until the check is
/// on the stream, so it comes after it; on the target, a write after a
/// check of its region waits until the check has read it: the check
/// always compares the copies at the same point of the stream.
#[test]
fn a_write_racing_a_check_is_ordered_after_it_on_both_sides() {
    let mut m = Model::new(Mode::Mwc);
    connect_checking_source(&mut m, &[2]);
    let read = m.resync_reads.pop().expect("read");
    let w = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    assert!(m.sent.is_empty(), "the write waits for the region's read");
    m.engine.local_done(read, Ok(()));
    m.pump();
    m.settle_map();
    let (check_seq, _) = m.checks_sent[0];
    let (write_seq, slot) = m.sent[0];
    assert_eq!(slot, w);
    assert!(write_seq > check_seq, "the write follows the check");

    let mut t = checking_target(&[2]);
    let check = t.engine.peer_check(1, 2);
    t.pump();
    let op = t.engine.peer_op(PeerOp {
        seq: 2,
        after: 0,
        request: write(2 * REGION_SIZE_BYTES, 4096),
        resync_region: None,
    });
    t.pump();
    assert_eq!(t.local, vec![check], "the write waits for the check's read");
    t.local.clear();
    t.engine.check_done(check, Ok(false));
    t.pump();
    assert_eq!(t.local, vec![op]);
}

/// A local write failing after a region was read for its check: the
/// peer's "same" compared what this copy no longer holds; the region goes
/// again and its mark stays.
#[test]
fn a_local_write_failing_after_a_check_was_read_sends_the_region_again() {
    let mut m = Model::new(Mode::Async);
    connect_checking_source(&mut m, &[2]);
    let read = m.resync_reads.pop().expect("read");
    m.engine.local_done(read, Ok(()));
    m.pump();
    let (seq, _) = m.checks_sent[0];
    let w = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    m.local.retain(|&s| s != w);
    m.engine.local_done(w, Err(libc::EIO));
    m.pump();
    m.ack(seq);
    m.ack_flushes();
    assert_ne!(m.durable.get(2), 0, "kept");
    assert_eq!(m.engine.stats().resync_same_bytes, 0);
    assert_eq!(m.resync_reads.len(), 1, "read again");
}

/// Target: a check found the region the same, then a later write from the
/// peer to it failed here (partly written): the check compared what this
/// copy held before, so it is answered "differs" and the region stays
/// marked not received, durably, whether or not its sync had started.
#[test]
fn a_peer_write_failing_after_a_check_read_the_region_spoils_the_check() {
    for sync_started in [false, true] {
        let mut t = checking_target(&[2, 3]);
        t.hold_syncs = true;
        let other = t.engine.peer_check(1, 3);
        t.pump();
        t.engine.check_done(other, Ok(true));
        t.pump();
        assert_eq!(t.syncs.len(), 1, "the first check's sync holds the second");
        let check = t.engine.peer_check(2, 2);
        t.pump();
        t.engine.check_done(check, Ok(true));
        if sync_started {
            t.finish_syncs();
            t.hold_syncs = true;
            assert_eq!(t.syncs.len(), 1, "the check's own sync is in flight");
        }
        let op = t.engine.peer_op(PeerOp {
            seq: 3,
            after: 0,
            request: write(2 * REGION_SIZE_BYTES, 4096),
            resync_region: None,
        });
        t.pump();
        t.local.retain(|&s| s != op);
        t.engine.local_done(op, Err(libc::EIO));
        t.pump();
        t.finish_syncs();
        t.settle_map();
        assert!(
            t.log
                .iter()
                .any(|l| *l == format!("reply {check} Err(Differs)")),
            "sync started {sync_started}: {:?}",
            t.log
        );
        assert_eq!(t.durable.get(2), CELL_RESYNC, "sync started {sync_started}");
        assert_eq!(t.durable.get(3), CELL_CONSISTENT, "the other check stands");
        assert_eq!(t.engine.stats().resync_same_bytes, REGION_SIZE_BYTES);
    }
}

/// Source: the peer lost a write to a region whose checksum (or data) was
/// read before it and is on its way: the answer describes the peer's copy
/// before the loss, so it clears nothing and the region goes again, even
/// when the peer's error arrives first.
#[test]
fn a_write_the_peer_lost_after_a_check_was_read_sends_the_region_again() {
    let mut m = Model::new(Mode::Mwc);
    connect_checking_source(&mut m, &[2]);
    let read = m.resync_reads.pop().expect("read");
    m.engine.local_done(read, Ok(()));
    m.pump();
    let (check_seq, _) = m.checks_sent[0];
    let w = m.submit(write(2 * REGION_SIZE_BYTES, 4096));
    m.settle_map();
    let (write_seq, _) = *m.sent.iter().find(|&&(_, s)| s == w).expect("sent");
    m.engine
        .remote_done(write_seq, Err(EngineError::Remote(libc::EIO)));
    m.pump();
    m.finish_local(w);
    m.settle_map();
    m.ack(check_seq);
    m.ack_flushes();
    m.settle_map();
    assert_ne!(m.durable.get(2), 0, "kept");
    assert_eq!(m.engine.stats().resync_same_bytes, 0);
    assert_eq!(m.resync_reads.len(), 1, "read again");
}

/// Checks found equal that wait for their sync when the link ends are
/// dropped unanswered, their marks kept; the sync's late end does nothing.
#[test]
fn checks_waiting_for_their_sync_are_dropped_when_the_link_ends() {
    let mut t = checking_target(&[4]);
    t.hold_syncs = true;
    let slot = t.engine.peer_check(1, 4);
    t.pump();
    t.engine.check_done(slot, Ok(true));
    t.pump();
    t.engine.peer_lost();
    t.pump();
    assert!(
        t.log.iter().any(|l| *l == format!("discard {slot}")),
        "{:?}",
        t.log
    );
    assert!(!t.log.iter().any(|l| l.starts_with("reply")), "{:?}", t.log);
    t.finish_syncs();
    assert_eq!(t.engine.map().get(4), CELL_RESYNC, "still not received");
    assert!(t.engine.peer_slot_available());
    assert_eq!(t.engine.stats().resync_same_bytes, 0);
}

/// Without checksum resync agreed, data goes as before.
#[test]
fn without_checksums_agreed_resync_sends_data() {
    let mut m = Model::new(Mode::Mwc);
    let seq = m.source_sends_region(3);
    assert!(m.checks_sent.is_empty());
    m.ack(seq);
    assert_eq!(m.engine.stats().resync_checks, 0);
}

#[test]
fn an_adaptive_resync_window_follows_the_link_and_a_set_cap_bounds_it() {
    // 16 regions to send, 16 resync slots, cap 8 regions.
    let mut p = params(Mode::Mwc);
    p.resync_slots_max = 16;
    p.resync_adaptive = true;
    p.resync_in_flight_max_bytes = 8 * REGION_SIZE_BYTES;
    let mut m = Model::with(p);
    let regions = m.engine.map().region_count();
    let mut bits = vec![0u8; regions.div_ceil(8) as usize];
    bits[0] = 0xff;
    bits[1] = 0xff;
    m.engine.connect(ResyncRole::Source(bits));
    m.pump();
    m.settle_map();
    // No measure of the link yet: one region, as the reference's 32 KiB.
    assert_eq!(m.resync_reads.len(), 1);
    // A congestion window of 1.5 regions: six regions in flight.
    m.engine.set_link_window(Some(REGION_SIZE_BYTES * 3 / 2));
    m.pump();
    assert_eq!(m.resync_reads.len(), 6);
    // A wide link: the cap (the person's sync_rate_kib) bounds it.
    m.engine.set_link_window(Some(100 * REGION_SIZE_BYTES));
    m.pump();
    assert_eq!(m.resync_reads.len(), 8);
    assert_eq!(m.engine.resync_window_bytes(), 8 * REGION_SIZE_BYTES);
}
