//! Engine tests: a model driver with a simulated map disk checks that no
//! data write is ever issued before its regions are durably marked.

use super::*;
use crate::statemap::format::REGIONS_PER_PAGE;
use crate::units::REGION_SIZE_BYTES;
use proptest::prelude::*;

const SIZE: u64 = 3 * REGIONS_PER_PAGE * REGION_SIZE_BYTES; // three map pages
const SLOTS: usize = 16;

fn params() -> EngineParams {
    EngineParams {
        size_bytes: SIZE,
        block_size: 4096,
        io_len_max: 1 << 20,
        slots_max: SLOTS,
        writable: true,
    }
}

/// Pages being written, with their cells.
type PageImages = Vec<(u64, Vec<u8>)>;

/// A driver that models the map on disk: pages become durable only when a
/// map write completes.
struct Model {
    engine: Engine,
    durable: StateMap,
    /// Snapshot being written: (epoch, pages with their cells).
    in_flight_map: Option<(Epoch, PageImages)>,
    local: Vec<Slot>,
    completed: Vec<(Slot, Result<(), EngineError>)>,
    map_writes: usize,
}

impl Model {
    fn new() -> Self {
        Model {
            engine: Engine::new(params(), StateMap::new(SIZE)),
            durable: StateMap::new(SIZE),
            in_flight_map: None,
            local: Vec::new(),
            completed: Vec::new(),
            map_writes: 0,
        }
    }

    fn pump(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Local(slot) => {
                    let req = *self.engine.request(slot);
                    if req.kind.changes_data() {
                        for region in self.durable.regions_of(req.offset_bytes, req.len_bytes) {
                            assert_ne!(
                                self.durable.get(region),
                                0,
                                "write issued to region {region} before its mark was durable"
                            );
                        }
                    }
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
                }
                Action::Complete(slot, result) => self.completed.push((slot, result)),
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

    fn finish_local(&mut self, index: usize) {
        let slot = self.local.swap_remove(index);
        self.engine.local_done(slot, Ok(()));
        self.pump();
    }

    fn submit(&mut self, slot: Slot, req: Request) {
        self.engine.submit(slot, req);
        self.pump();
    }

    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.in_flight_map.is_some() {
                self.finish_map_write(true);
            } else if !self.local.is_empty() {
                self.finish_local(0);
            } else {
                break;
            }
        }
        assert!(self.engine.is_idle(), "engine did not settle");
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

#[test]
fn first_write_to_a_region_waits_for_the_map_later_ones_do_not() {
    let mut m = Model::new();
    m.submit(0, write(0, 4096));
    assert!(m.local.is_empty(), "the write must wait for its mark");
    assert_eq!(m.map_writes, 1);
    m.finish_map_write(true);
    assert_eq!(m.local, vec![0]);
    m.finish_local(0);
    // The region is durably stale now: no further map write.
    m.submit(1, write(8192, 4096));
    assert_eq!(m.local, vec![1]);
    assert_eq!(m.map_writes, 1);
    m.drain();
    assert_eq!(m.completed.len(), 2);
    assert!(m.completed.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(m.engine.stats().map_commits, 1);
}

#[test]
fn marks_arriving_during_a_map_write_are_group_committed() {
    let mut m = Model::new();
    m.submit(0, write(0, 4096));
    // While the first map write is in flight, eight writes to new regions arrive.
    for i in 1..9u32 {
        m.submit(i, write(u64::from(i) * 10 * REGION_SIZE_BYTES, 4096));
    }
    assert_eq!(m.map_writes, 1);
    m.finish_map_write(true);
    assert_eq!(m.local, vec![0], "only the first write's mark is durable");
    assert_eq!(m.map_writes, 2, "the others went out together");
    m.finish_map_write(true);
    assert_eq!(m.local.len(), 9);
    m.drain();
    assert_eq!(m.engine.stats().map_commits, 2);
}

#[test]
fn reads_and_flushes_never_touch_the_map() {
    let mut m = Model::new();
    m.submit(
        0,
        Request {
            kind: OpKind::Read,
            offset_bytes: 0,
            len_bytes: 65536,
            fua: false,
        },
    );
    m.submit(
        1,
        Request {
            kind: OpKind::Flush,
            offset_bytes: 12345,
            len_bytes: 99,
            fua: false,
        },
    );
    assert_eq!(m.local, vec![0, 1]);
    assert_eq!(m.map_writes, 0);
    m.drain();
    assert!(m.engine.map().is_clean());
}

#[test]
fn bad_requests_complete_with_errors_and_mark_nothing() {
    let mut m = Model::new();
    m.submit(0, write(SIZE - 4096, 8192));
    m.submit(1, write(512, 4096));
    m.submit(2, write(0, 2 << 20));
    assert!(matches!(
        m.completed[0],
        (0, Err(EngineError::OutOfRange { .. }))
    ));
    assert!(matches!(
        m.completed[1],
        (1, Err(EngineError::Misaligned { .. }))
    ));
    assert!(matches!(
        m.completed[2],
        (2, Err(EngineError::TooLarge { .. }))
    ));
    assert!(m.engine.map().is_clean());
    assert_eq!(m.map_writes, 0);
}

#[test]
fn read_only_engine_refuses_writes() {
    let mut engine = Engine::new(
        EngineParams {
            writable: false,
            ..params()
        },
        StateMap::new(SIZE),
    );
    engine.submit(0, write(0, 4096));
    assert_eq!(
        engine.poll_action(),
        Some(Action::Complete(0, Err(EngineError::ReadOnly)))
    );
}

#[test]
fn a_failed_map_write_fails_waiting_writes_and_later_ones() {
    let mut m = Model::new();
    m.submit(0, write(0, 4096));
    m.finish_map_write(false);
    assert_eq!(m.completed, vec![(0, Err(EngineError::MapFailed))]);
    assert!(m.local.is_empty(), "no data write without a durable mark");
    m.submit(0, write(0, 4096));
    assert_eq!(m.completed[1], (0, Err(EngineError::MapFailed)));
    assert!(m.engine.map_failed());
}

#[test]
fn mark_all_returns_the_epoch_that_makes_it_durable() {
    let mut m = Model::new();
    let need = m.engine.mark_all(CELL_STALE);
    m.pump();
    assert_eq!(need, 1);
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
    /// Any interleaving of requests, map writes and local completions issues
    /// no data write before its mark is durable, completes every request
    /// exactly once, and ends with every written region marked on disk.
    #[test]
    fn writes_never_overtake_their_marks(steps in proptest::collection::vec(step(), 1..200)) {
        let mut m = Model::new();
        let mut free: Vec<Slot> = (0..SLOTS as Slot).collect();
        let mut submitted = 0;
        let mut written = StateMap::new(SIZE);
        for s in steps {
            match s {
                Step::Submit { offset_blocks, len_blocks, kind } => {
                    let Some(slot) = free.pop() else { continue };
                    let offset = offset_blocks * 4096;
                    let len = (len_blocks * 4096).min(SIZE - offset);
                    let kind = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::WriteZeroes, OpKind::Trim][kind as usize];
                    if kind.changes_data() {
                        written.mark_bytes(offset, len, CELL_STALE);
                    }
                    m.submit(slot, Request { kind, offset_bytes: offset, len_bytes: len, fua: kind == OpKind::Write });
                    submitted += 1;
                }
                Step::FinishMap => if m.in_flight_map.is_some() { m.finish_map_write(true) },
                Step::FinishLocal(i) => if !m.local.is_empty() { let n = m.local.len(); m.finish_local(i % n) },
            }
            for (slot, _) in m.completed.drain(..) {
                free.push(slot);
                submitted -= 1;
            }
        }
        m.drain();
        for (slot, result) in m.completed.drain(..) {
            prop_assert!(result.is_ok());
            free.push(slot);
            submitted -= 1;
        }
        prop_assert_eq!(submitted, 0);
        prop_assert_eq!(free.len(), SLOTS);
        for region in 0..written.region_count() {
            prop_assert_eq!(m.durable.get(region) != 0, written.get(region) != 0);
        }
    }
}
