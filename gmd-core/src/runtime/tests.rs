//! Runtime tests on real files: data round trips through io_uring with
//! O_DIRECT, and every written region is durably stale in the map file.

use std::sync::{Condvar, mpsc};
use std::time::Duration;

use super::*;
use crate::buf::BufPool;
use crate::statemap::cells::CELL_STALE;
use crate::statemap::file::MapFile;
use crate::units::REGION_SIZE_BYTES;

const SIZE: u64 = 64 << 20;

type Done = (u64, Result<(), EngineError>, Option<IoBuf>);

#[derive(Default)]
struct Collect {
    done: Mutex<Vec<Done>>,
    cv: Condvar,
}

impl CompletionSink for Collect {
    fn complete(
        &self,
        tag: u64,
        _request: &Request,
        result: Result<(), EngineError>,
        buf: Option<IoBuf>,
    ) {
        self.done.lock().unwrap().push((tag, result, buf));
        self.cv.notify_all();
    }
}

impl Collect {
    fn wait(&self, count: usize) -> Vec<Done> {
        let mut done = self.done.lock().unwrap();
        while done.len() < count {
            let (guard, timeout) = self.cv.wait_timeout(done, Duration::from_secs(20)).unwrap();
            done = guard;
            assert!(!timeout.timed_out(), "requests did not complete");
        }
        std::mem::take(&mut *done)
    }
}

struct Device {
    _dir: tempfile::TempDir,
    data_path: PathBuf,
    map_path: PathBuf,
    runtime: Option<Runtime>,
    sink: Arc<Collect>,
    pool: BufPool,
}

fn device() -> Device {
    device_with(EngineParams {
        block_size: 4096,
        slots_max: 128,
        ..EngineParams::new(SIZE, crate::config::Mode::Mwc)
    })
}

fn device_with(params: EngineParams) -> Device {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data.img");
    let map_path = dir.path().join("data.sm");
    File::create(&data_path).unwrap().set_len(SIZE).unwrap();
    let map = MapFile::create(&map_path, Uuid::from_u128(3), SIZE, false).unwrap();
    let runtime = Runtime::start(RuntimeConfig {
        name: "test".into(),
        data_path: data_path.clone(),
        map_path: map_path.clone(),
        uuid: Uuid::from_u128(3),
        map: StateMap::new(SIZE),
        page_slots: map.page_slots().clone(),
        superblock: map.superblock_state(),
        gen_seed: 1,
        params,
        pool: BufPool::new(),
        link: None,
    })
    .unwrap();
    Device {
        _dir: dir,
        data_path,
        map_path,
        runtime: Some(runtime),
        sink: Arc::new(Collect::default()),
        pool: BufPool::new(),
    }
}

impl Device {
    fn submit(&self, tag: u64, kind: OpKind, offset: u64, len: u64, fill: Option<u8>) {
        let buf = match kind {
            OpKind::Read | OpKind::Write => {
                let mut buf = self.pool.take(len as usize);
                buf.fill(fill.unwrap_or(0));
                Some(buf)
            }
            _ => None,
        };
        let submission = Submission {
            request: Request {
                kind,
                offset_bytes: offset,
                len_bytes: len,
                fua: kind == OpKind::Write && tag % 2 == 0,
            },
            buf,
            tag,
            sink: self.sink.clone(),
        };
        self.runtime.as_ref().unwrap().submit(submission).unwrap();
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.submit(9999, OpKind::Read, offset, len, Some(0xee));
        let mut done = self.sink.wait(1);
        let (tag, result, buf) = done.pop().unwrap();
        assert_eq!(tag, 9999);
        result.unwrap();
        buf.unwrap().to_vec()
    }
}

#[test]
fn writes_read_back_and_leave_their_regions_durably_stale() {
    let mut dev = device();
    // 64 writes in flight at once, each 64 KiB at a distinct offset, straddling regions.
    for i in 0..64u64 {
        dev.submit(
            i,
            OpKind::Write,
            i * 3 * REGION_SIZE_BYTES + 16384,
            65536,
            Some(i as u8 + 1),
        );
    }
    let done = dev.sink.wait(64);
    assert!(done.iter().all(|(_, r, _)| r.is_ok()));
    for i in [0u64, 17, 63] {
        let data = dev.read(i * 3 * REGION_SIZE_BYTES + 16384, 65536);
        assert!(
            data.iter().all(|&b| b == i as u8 + 1),
            "write {i} reads back"
        );
    }
    let stats = dev.runtime.as_ref().unwrap().stats().snapshot();
    assert_eq!(stats.writes, 64);
    assert_eq!(stats.write_bytes, 64 * 65536);
    assert!(stats.engine.map_commits >= 1);
    assert_eq!(stats.in_flight, 0);
    let stopped = dev.runtime.take().unwrap().stop().unwrap();
    let (map, slots) = (stopped.map, stopped.page_slots);
    // The map on disk, read back cold, holds exactly the written regions.
    let (file, on_disk) = MapFile::open(&dev.map_path, Some(SIZE)).unwrap();
    assert_eq!(on_disk, map);
    assert_eq!(file.page_slots(), &slots);
    let mut expected = StateMap::new(SIZE);
    for i in 0..64u64 {
        expected.mark_bytes(i * 3 * REGION_SIZE_BYTES + 16384, 65536, CELL_STALE);
    }
    assert_eq!(on_disk, expected);
    // And the data file holds the bytes.
    let raw = std::fs::read(&dev.data_path).unwrap();
    let at = (17 * 3 * REGION_SIZE_BYTES + 16384) as usize;
    assert!(raw[at..at + 65536].iter().all(|&b| b == 18));
}

#[test]
fn write_zeroes_trim_and_flush() {
    let dev = device();
    dev.submit(1, OpKind::Write, 0, 1 << 20, Some(0xab));
    dev.sink.wait(1);
    dev.submit(2, OpKind::WriteZeroes, 4096, 8192, None);
    dev.submit(3, OpKind::Trim, 65536, 65536, None);
    dev.submit(4, OpKind::Flush, 0, 0, None);
    let done = dev.sink.wait(3);
    assert!(
        done.iter().all(|(_, r, _)| r.is_ok()),
        "{:?}",
        done.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    let data = dev.read(0, 1 << 20);
    assert!(data[..4096].iter().all(|&b| b == 0xab));
    assert!(data[4096..12288].iter().all(|&b| b == 0));
    assert!(data[12288..65536].iter().all(|&b| b == 0xab));
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[131072..].iter().all(|&b| b == 0xab));
}

#[test]
fn bad_requests_fail_without_touching_the_device() {
    let dev = device();
    dev.submit(1, OpKind::Write, SIZE - 4096, 8192, Some(1));
    dev.submit(2, OpKind::Read, 100, 4096, Some(1));
    let done = dev.sink.wait(2);
    for (_, result, _) in &done {
        assert_eq!(result.unwrap_err().errno(), libc::EINVAL);
    }
    let rt = dev.runtime.as_ref().unwrap();
    let (tx, rx) = mpsc::channel();
    rt.snapshot(move |map| tx.send(map).unwrap());
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_clean());
    assert_eq!(rt.stats().snapshot().errors, 2);
}

/// Reads `len` bytes at `offset` with `pread` under `permit`.
fn pread_direct(permit: &DirectRead<'_>, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = IoBuf::new(len as usize);
    // SAFETY: the buffer is valid for `len` bytes and 4 KiB aligned.
    let n = unsafe {
        libc::pread(
            permit.fd(),
            buf.as_mut_ptr().cast(),
            len as usize,
            offset as libc::off_t,
        )
    };
    assert_eq!(n, len as isize, "{}", io::Error::last_os_error());
    buf.to_vec()
}

/// Waits until the device thread opened the gate for direct reads.
fn direct_read_permit(submitter: &Submitter, offset: u64, len: u64) -> DirectRead<'_> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(permit) = submitter.direct_read(offset, len) {
            return permit;
        }
        assert!(Instant::now() < deadline, "direct reads never allowed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn direct_reads_see_completed_writes_and_are_counted() {
    let mut dev = device();
    dev.submit(1, OpKind::Write, 3 * 4096, 8192, Some(0x5a));
    dev.sink.wait(1)[0].1.unwrap();
    let submitter = dev.runtime.as_ref().unwrap().submitter();
    let before = submitter.stats().snapshot();
    let permit = direct_read_permit(&submitter, 2 * 4096, 4 * 4096);
    let data = pread_direct(&permit, 2 * 4096, 4 * 4096);
    permit.finish(true);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..3 * 4096].iter().all(|&b| b == 0x5a));
    assert!(data[3 * 4096..].iter().all(|&b| b == 0));
    let after = submitter.stats().snapshot();
    assert_eq!(after.reads, before.reads + 1);
    assert_eq!(after.direct_reads, before.direct_reads + 1);
    assert_eq!(after.read_bytes, before.read_bytes + 4 * 4096);
    assert_eq!(after.in_flight, 0);
    // Not a plain valid read: left to the engine, which names the error.
    assert!(submitter.direct_read(512, 4096).is_none(), "misaligned");
    assert!(
        submitter.direct_read(SIZE - 4096, 8192).is_none(),
        "past the end"
    );
    assert!(submitter.direct_read(0, 0).is_none(), "empty");
    drop(submitter);
    dev.runtime.take().unwrap().stop().unwrap();
}

#[test]
fn a_secondary_never_allows_direct_reads() {
    let mut dev = device_with(EngineParams {
        block_size: 4096,
        readable: false,
        writable: false,
        ..EngineParams::new(SIZE, crate::config::Mode::Async)
    });
    let runtime = dev.runtime.take().unwrap();
    // Let the device thread run its loop a few times.
    let (tx, rx) = mpsc::channel();
    runtime.snapshot(move |m| tx.send(m).unwrap());
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(runtime.submitter().direct_read(0, 4096).is_none());
    runtime.stop().unwrap();
}

/// What a ublk queue thread does: runs requests with the engine on its own
/// thread and their local I/O on its own io_uring.
struct Frontend {
    ring: IoUring,
    /// Operations this thread carried out.
    issued: u64,
}

/// A request's end as the frontend saw it: `None` when the device thread
/// took it over (the result comes through the sink).
type Inline = Option<(Result<(), EngineError>, Option<IoBuf>)>;

impl Frontend {
    fn new() -> Frontend {
        Frontend {
            ring: IoUring::new(8).unwrap(),
            issued: 0,
        }
    }

    fn run(&mut self, submitter: &Submitter, submission: Submission) -> Inline {
        let mut here = submitter.start_here(submission);
        loop {
            here = match here {
                Here::Issue { slot, sqe } => {
                    // SAFETY: the entry points into the request's buffer,
                    // which the device keeps until the request ends.
                    unsafe { self.ring.submission().push(&sqe.user_data(7)).unwrap() };
                    self.ring.submit_and_wait(1).unwrap();
                    let cqe = self.ring.completion().next().unwrap();
                    assert_eq!(cqe.user_data(), 7);
                    self.issued += 1;
                    submitter.local_result(slot, cqe.result())
                }
                Here::Done { result, buf } => return Some((result, buf)),
                Here::Handed => return None,
                Here::Full(back) => {
                    std::thread::sleep(Duration::from_millis(1));
                    submitter.start_here(back)
                }
            };
        }
    }
}

impl Device {
    fn inline(
        &self,
        frontend: &mut Frontend,
        tag: u64,
        kind: OpKind,
        offset: u64,
        len: u64,
        fill: u8,
    ) -> Inline {
        let buf = matches!(kind, OpKind::Read | OpKind::Write).then(|| {
            let mut buf = self.pool.take(len as usize);
            buf.fill(fill);
            buf
        });
        let submission = Submission {
            request: Request {
                kind,
                offset_bytes: offset,
                len_bytes: len,
                fua: false,
            },
            buf,
            tag,
            sink: self.sink.clone(),
        };
        frontend.run(&self.runtime.as_ref().unwrap().submitter(), submission)
    }
}

/// Writes whose regions are already marked run entirely on the frontend's
/// thread: the engine takes them there and their local I/O goes on the
/// frontend's ring; the first write to a region waits for the state map on
/// the device thread and comes back through the sink.
#[test]
fn writes_run_on_the_frontend_thread_once_their_regions_are_marked() {
    let mut dev = device();
    let mut fe = Frontend::new();
    let at = 5 * REGION_SIZE_BYTES;
    // First write: its region must be durably stale before the data is written.
    assert!(
        dev.inline(&mut fe, 1, OpKind::Write, at, 8192, 0x11)
            .is_none(),
        "the first write to a region waits for the map"
    );
    let done = dev.sink.wait(1);
    assert_eq!(done[0].0, 1);
    done[0].1.unwrap();
    let issued = fe.issued;
    // Then: done here, on this thread's ring.
    let (result, _) = dev
        .inline(&mut fe, 2, OpKind::Write, at + 4096, 16384, 0x22)
        .expect("finished on the frontend thread");
    result.unwrap();
    assert_eq!(fe.issued, issued + 1);
    for (tag, kind) in [(3, OpKind::WriteZeroes), (4, OpKind::Trim)] {
        let (result, _) = dev
            .inline(&mut fe, tag, kind, at + 8192, 4096, 0)
            .expect("finished on the frontend thread");
        result.unwrap();
    }
    let (result, _) = dev
        .inline(&mut fe, 5, OpKind::Flush, 0, 0, 0)
        .expect("finished on the frontend thread");
    result.unwrap();
    // A read the engine serves comes back with its data.
    let (result, buf) = dev
        .inline(&mut fe, 6, OpKind::Read, at, 20480, 0xee)
        .expect("finished on the frontend thread");
    result.unwrap();
    let data = buf.unwrap().to_vec();
    assert!(data[..4096].iter().all(|&b| b == 0x11));
    assert!(data[4096..8192].iter().all(|&b| b == 0x22));
    assert!(data[8192..12288].iter().all(|&b| b == 0));
    assert!(data[12288..].iter().all(|&b| b == 0x22));
    // A bad request is refused at once, without I/O.
    let issued = fe.issued;
    let (result, _) = dev
        .inline(&mut fe, 7, OpKind::Write, SIZE - 4096, 8192, 1)
        .expect("refused at once");
    assert_eq!(result.unwrap_err().errno(), libc::EINVAL);
    assert_eq!(fe.issued, issued);
    let stats = dev.runtime.as_ref().unwrap().stats().snapshot();
    assert_eq!(stats.writes, 4);
    assert_eq!(stats.direct_writes, 3, "write, write-zeroes, trim");
    assert_eq!(stats.flushes, 1);
    assert_eq!(stats.errors, 1);
    assert_eq!(stats.in_flight, 0);
    dev.runtime.take().unwrap().stop().unwrap();
    let (_, on_disk) = MapFile::open(&dev.map_path, Some(SIZE)).unwrap();
    let mut expected = StateMap::new(SIZE);
    expected.mark_bytes(at, 8192, CELL_STALE);
    assert_eq!(on_disk, expected);
}

#[test]
fn mark_all_is_durable_when_acknowledged() {
    let mut dev = device();
    let (tx, rx) = mpsc::channel();
    dev.runtime
        .as_ref()
        .unwrap()
        .mark_all(CELL_STALE, move |r| tx.send(r).unwrap());
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    // Read the file while the device still runs: the marks are already on disk.
    let (_, on_disk) = MapFile::open(&dev.map_path, Some(SIZE)).unwrap();
    assert_eq!(on_disk.count_nonzero(), on_disk.region_count());
    dev.runtime.take().unwrap().stop().unwrap();
}

mod mirroring {
    use super::*;
    use crate::engine::ResyncRole;
    use crate::mirror::{self, FromPeer, Hold, LinkEvent, PeerLink, Release, ToPeer};
    use std::sync::{OnceLock, Weak};

    /// Hands every message to the other runtime through the wire encoding.
    struct Wire {
        /// What the other runtime's ports reach, held weakly: each runtime
        /// holds its link, so strong references both ways would keep both
        /// alive. It lives until that runtime's device thread ended, so the
        /// answers to a stopping side's last messages still reach it.
        other: OnceLock<Weak<Shared>>,
        session: u64,
        resyncs_done: AtomicU64,
    }

    impl PeerLink for Wire {
        fn send(&self, message: ToPeer<'_>) {
            let bytes = mirror::encode(&message);
            let decoded: FromPeer = mirror::decode(&bytes, SIZE).expect("valid message");
            // Once the other side stopped, its messages are lost.
            if let Some(shared) = self.other.get().expect("linked").upgrade() {
                let other = Port { shared };
                // Only the bounded-queue test fills it, before its session
                // starts: the message waits until the other side drains it.
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut offered = decoded;
                while let Err(back) = other.from_peer(self.session, offered) {
                    assert!(Instant::now() < deadline, "the peer queue never drained");
                    offered = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        fn resync_done(&self) {
            self.resyncs_done.fetch_add(1, Ordering::SeqCst);
        }
        fn renegotiate(&self) {
            panic!("no renegotiation expected");
        }
        fn stalled(&self, waited_ms: u64) {
            panic!("no stall expected (silent for {waited_ms} ms)");
        }
    }

    fn side_in(
        dir: &std::path::Path,
        name: &str,
        link: Arc<dyn PeerLink>,
        mode: crate::config::Mode,
    ) -> (Runtime, PathBuf, PathBuf) {
        let data = dir.join(format!("{name}.img"));
        let map = dir.join(format!("{name}.sm"));
        File::create(&data).unwrap().set_len(SIZE).unwrap();
        let file = MapFile::create(&map, Uuid::from_u128(3), SIZE, false).unwrap();
        let runtime = Runtime::start(RuntimeConfig {
            name: name.into(),
            data_path: data.clone(),
            map_path: map.clone(),
            uuid: Uuid::from_u128(3),
            map: StateMap::new(SIZE),
            page_slots: file.page_slots().clone(),
            superblock: file.superblock_state(),
            gen_seed: 1,
            params: EngineParams {
                block_size: 4096,
                slots_max: 64,
                resync_in_flight_max_bytes: 256 << 10,
                resync_adaptive: false,
                ..EngineParams::new(SIZE, mode)
            },
            pool: BufPool::new(),
            link: Some(link),
        })
        .unwrap();
        (runtime, data, map)
    }

    /// Two runtimes in `mode`, `a` and `b`, each linked to the other by a
    /// wire that delivers in link session `session`.
    struct Pair {
        a: Arc<Runtime>,
        b: Arc<Runtime>,
        wire_a: Arc<Wire>,
        wire_b: Arc<Wire>,
        data_a: PathBuf,
        data_b: PathBuf,
    }

    fn pair(dir: &std::path::Path, mode: crate::config::Mode, session: u64) -> Pair {
        let wire = || {
            Arc::new(Wire {
                other: OnceLock::new(),
                session,
                resyncs_done: AtomicU64::new(0),
            })
        };
        let (wire_a, wire_b) = (wire(), wire());
        let (a, data_a, _) = side_in(dir, "a", wire_a.clone(), mode);
        let (b, data_b, _) = side_in(dir, "b", wire_b.clone(), mode);
        let (a, b) = (Arc::new(a), Arc::new(b));
        wire_a.other.set(Arc::downgrade(&b.shared)).unwrap();
        wire_b.other.set(Arc::downgrade(&a.shared)).unwrap();
        Pair {
            a,
            b,
            wire_a,
            wire_b,
            data_a,
            data_b,
        }
    }

    /// Writes on `rt`; with a frontend, the way a ublk queue thread does.
    fn write_all(
        rt: &Runtime,
        sink: &Arc<Collect>,
        pool: &BufPool,
        writes: &[(u64, u64, u8)],
        mut frontend: Option<&mut Frontend>,
    ) {
        let mut results = Vec::new();
        for (i, &(offset, len, fill)) in writes.iter().enumerate() {
            let mut buf = pool.take(len as usize);
            buf.fill(fill);
            let submission = Submission {
                request: Request {
                    kind: OpKind::Write,
                    offset_bytes: offset,
                    len_bytes: len,
                    fua: false,
                },
                buf: Some(buf),
                tag: i as u64,
                sink: sink.clone(),
            };
            match frontend.as_deref_mut() {
                Some(fe) => {
                    if let Some((result, _)) = fe.run(&rt.submitter(), submission) {
                        results.push(result);
                    }
                }
                None => rt.submit(submission).unwrap(),
            }
        }
        let handed = writes.len() - results.len();
        results.extend(sink.wait(handed).into_iter().map(|d| d.1));
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    }

    /// The resync set of a handshake: one bit per dirty region.
    fn stale_bits(map: &StateMap) -> Vec<u8> {
        let mut bits = vec![0u8; map.region_count().div_ceil(8) as usize];
        for r in map.dirty_region_runs().flatten() {
            bits[(r / 8) as usize] |= 1 << (r % 8);
        }
        bits
    }

    /// Connects `a` (resync source of `bits`) and `b` (its target) in link
    /// session `session`, and waits until both engines mirror: link events
    /// and submissions reach the device thread by different queues, and
    /// writes submitted before a side took the event would be written alone.
    fn connect(a: &Runtime, b: &Runtime, session: u64, bits: Vec<u8>) {
        b.link_event(LinkEvent::Connected {
            session,
            connection: ResyncRole::Target(bits.clone()).into(),
        });
        a.link_event(LinkEvent::Connected {
            session,
            connection: ResyncRole::Source(bits).into(),
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.stats().snapshot().engine.connected == 0
            || b.stats().snapshot().engine.connected == 0
        {
            assert!(Instant::now() < deadline, "no link");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops `a`, then `b`; `a` drains what it sent while `b` still
    /// answers (well within [`STOP_DRAIN_TIMEOUT`]).
    fn stop_both(a: Arc<Runtime>, b: Arc<Runtime>) {
        for rt in [a, b] {
            let started = Instant::now();
            let rt = Arc::try_unwrap(rt).unwrap_or_else(|_| panic!("a runtime is still held"));
            rt.stop().unwrap();
            assert!(
                started.elapsed() < STOP_DRAIN_TIMEOUT,
                "the peer's answers did not drain the stop"
            );
        }
    }

    fn snapshot(rt: &Runtime) -> StateMap {
        let (tx, rx) = mpsc::channel();
        rt.snapshot(move |m| tx.send(m).unwrap());
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// The device holds at most `PEER_MESSAGES_QUEUED_MAX` messages from the
    /// peer that its engine has not taken: the next one is given back (the
    /// caller waits and offers it again), none is lost, and once the engine
    /// takes them there is room again.
    #[test]
    fn the_peer_queue_is_bounded_and_gives_messages_back_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let Pair { a, b, .. } = pair(dir.path(), crate::config::Mode::Mwc, 7);
        // Not connected yet: messages of session 7 wait for it to start.
        let message = |region| FromPeer::Prioritize { region };
        for region in 0..PEER_MESSAGES_QUEUED_MAX as u64 {
            assert!(a.from_peer(7, message(region % 4)).is_ok());
        }
        match a.from_peer(7, message(0)) {
            Err(FromPeer::Prioritize { region: 0 }) => {}
            other => panic!("a full queue must give the message back, got {other:?}"),
        }
        // With its hold, which is not given back meanwhile.
        let released = Arc::new(Released::default());
        match a
            .port()
            .from_peer_held(7, message(1), Hold::new(released.clone(), 5))
        {
            Err((FromPeer::Prioritize { region: 1 }, hold)) => {
                assert!(released.tokens().is_empty());
                drop(hold);
                assert_eq!(released.tokens(), [5]);
            }
            other => panic!("a full queue must give the message back, got {other:?}"),
        }
        // Session 7 starts: the engine takes every waiting message.
        connect(&a, &b, 7, stale_bits(&snapshot(&a)));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut offered = message(0);
        loop {
            match a.from_peer(7, offered) {
                Ok(()) => break,
                Err(back) => offered = back,
            }
            assert!(Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop_both(a, b);
    }

    /// Records the tokens of the holds given back.
    #[derive(Default)]
    struct Released(Mutex<Vec<u64>>);

    impl Release for Released {
        fn release(&self, token: u64) {
            self.0.lock().unwrap().push(token);
        }
    }

    impl Released {
        fn tokens(&self) -> Vec<u64> {
            let mut t = self.0.lock().unwrap().clone();
            t.sort_unstable();
            t
        }

        fn wait_for(&self, expected: &[u64]) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.tokens() != expected {
                assert!(
                    Instant::now() < deadline,
                    "released {:?}, expected {expected:?}",
                    self.tokens()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// A message from the peer keeps what it holds of its transport (its
    /// flow-control credit) while it waits for the engine, and gives it back
    /// once the device thread has taken it, or dropped it for being of an
    /// ended session; one given back by a full queue keeps its hold.
    #[test]
    fn a_peer_message_holds_its_credit_until_the_device_thread_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let Pair { a, b, .. } = pair(dir.path(), crate::config::Mode::Mwc, 7);
        let released = Arc::new(Released::default());
        let hold = |token| Hold::new(released.clone(), token);
        // Not connected yet: messages of session 7 wait for it to start.
        for region in 0..3 {
            a.port()
                .from_peer_held(7, FromPeer::Prioritize { region }, hold(region))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            released.tokens().is_empty(),
            "held while waiting for the engine"
        );
        connect(&a, &b, 7, stale_bits(&snapshot(&a)));
        released.wait_for(&[0, 1, 2]);
        // Another session's message is dropped: its hold goes with it.
        a.port()
            .from_peer_held(6, FromPeer::Prioritize { region: 0 }, hold(9))
            .unwrap();
        released.wait_for(&[0, 1, 2, 9]);
        stop_both(a, b);
    }

    /// The peer's answers are taken on the thread that delivers them (here
    /// the peer's device thread, which the wire runs on) and complete their
    /// writes from there, but only in the session in force: one of another
    /// session goes through the queue (and is dropped there). In sync mode
    /// an answer starts the local write, which is the device thread's: none
    /// is taken elsewhere.
    #[test]
    fn answers_are_taken_where_they_arrive_in_the_session_in_force() {
        assert!(answers_taken_where_they_arrive(crate::config::Mode::Mwc) > 0);
        assert_eq!(
            answers_taken_where_they_arrive(crate::config::Mode::Sync),
            0
        );
    }

    /// 20 mirrored writes, one at a time, in `mode`; the answers the
    /// writing side took without its device thread.
    fn answers_taken_where_they_arrive(mode: crate::config::Mode) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let Pair {
            a,
            b,
            data_a,
            data_b,
            ..
        } = pair(dir.path(), mode, 8);
        // No session yet: an answer of session 7 is queued, not taken.
        let stray = FromPeer::Answer {
            seq: 1,
            result: Ok(()),
        };
        a.from_peer(7, stray).unwrap();
        assert_eq!(a.stats().snapshot().answers_here, 0);
        connect(&a, &b, 8, stale_bits(&snapshot(&a)));
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());
        // One write at a time: each completes once the peer answered.
        for i in 0..20u64 {
            write_all(&a, &sink, &pool, &[(i * 65536, 8192, i as u8 + 1)], None);
        }
        let here = a.stats().snapshot().answers_here;
        assert_eq!(a.stats().snapshot().engine.remote_writes, 20);
        stop_both(a, b);
        assert_eq!(
            std::fs::read(&data_a).unwrap(),
            std::fs::read(&data_b).unwrap()
        );
        here
    }

    /// A resync target waits for direct reads in flight before it takes
    /// the link, then refuses them until every region arrived; afterwards
    /// they see the source's data.
    #[test]
    fn a_resync_target_drains_direct_reads_and_refuses_them_until_resynced() {
        let dir = tempfile::tempdir().unwrap();
        let Pair { a, b, wire_b, .. } = pair(dir.path(), crate::config::Mode::Mwc, 9);
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());
        let region = 12u64;
        let offset = region * REGION_SIZE_BYTES;
        write_all(&a, &sink, &pool, &[(offset, REGION_SIZE_BYTES, 0x3c)], None);
        let mut bits = vec![0u8; (SIZE / REGION_SIZE_BYTES).div_ceil(8) as usize];
        bits[(region / 8) as usize] |= 1 << (region % 8);

        let reader = b.submitter();
        let permit = direct_read_permit(&reader, offset, 4096);
        b.link_event(LinkEvent::Connected {
            session: 9,
            connection: ResyncRole::Target(bits.clone()).into(),
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            b.stats().snapshot().engine.connected,
            0,
            "the target took the link while a direct read was in flight"
        );
        // Meanwhile the device thread keeps serving requests (the reader
        // may be a frontend thread waiting for it).
        b.submit(Submission {
            request: Request {
                kind: OpKind::Read,
                offset_bytes: 0,
                len_bytes: 4096,
                fua: false,
            },
            buf: Some(pool.take(4096)),
            tag: 77,
            sink: sink.clone(),
        })
        .unwrap();
        let done = sink.wait(1);
        assert_eq!((done[0].0, done[0].1), (77, Ok(())));
        let old = pread_direct(&permit, offset, 4096);
        assert!(old.iter().all(|&x| x == 0));
        permit.finish(true);
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.stats().snapshot().engine.connected == 0 {
            assert!(Instant::now() < deadline, "no link after the read ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            reader.direct_read(offset, 4096).is_none(),
            "a direct read of a region not yet received"
        );
        a.link_event(LinkEvent::Connected {
            session: 9,
            connection: ResyncRole::Source(bits).into(),
        });
        let permit = direct_read_permit(&reader, offset, 4096);
        assert_eq!(wire_b.resyncs_done.load(Ordering::SeqCst), 1);
        let new = pread_direct(&permit, offset, 4096);
        permit.finish(true);
        assert!(new.iter().all(|&x| x == 0x3c), "resynchronised data");
        drop(reader);
        stop_both(a, b);
    }

    #[test]
    fn standalone_writes_resync_then_mirrored_writes_leave_identical_copies() {
        let dir = tempfile::tempdir().unwrap();
        let Pair {
            a,
            b,
            wire_a,
            wire_b,
            data_a,
            data_b,
        } = pair(dir.path(), crate::config::Mode::Mwc, 7);
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());

        // A alone: these regions become stale.
        let alone: Vec<(u64, u64, u8)> = (0..40u64)
            .map(|i| (i * 5 * REGION_SIZE_BYTES + 4096, 65536, i as u8 + 1))
            .collect();
        write_all(&a, &sink, &pool, &alone, None);
        let stale = snapshot(&a);
        let mut expected = StateMap::new(SIZE);
        for &(o, l, _) in &alone {
            expected.mark_bytes(o, l, CELL_STALE);
        }
        assert_eq!(stale, expected);

        // Connect: A sends its stale regions to B.
        connect(&a, &b, 7, stale_bits(&stale));
        // Meanwhile the application keeps writing on A (mirrored, mwc).
        let during: Vec<(u64, u64, u8)> = (0..40u64)
            .map(|i| (i * 7 * REGION_SIZE_BYTES, 8192, 0xa0 + i as u8))
            .collect();
        // Half of them the way a ublk queue thread does, during the resync.
        let mut fe = Frontend::new();
        let (first, second) = during.split_at(20);
        write_all(&a, &sink, &pool, first, None);
        write_all(&a, &sink, &pool, second, Some(&mut fe));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while wire_a.resyncs_done.load(Ordering::SeqCst) == 0
            || wire_b.resyncs_done.load(Ordering::SeqCst) == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "resync did not finish"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let after: Vec<(u64, u64, u8)> = (0..20u64)
            .map(|i| (i * 11 * REGION_SIZE_BYTES + 512 * 8, 4096, 0x70 + i as u8))
            .collect();
        write_all(&a, &sink, &pool, &after, Some(&mut fe));
        // Their regions are marked now: written again, they run on the
        // frontend's thread (mwc: the peer's answer still comes through the
        // device thread).
        let before = a.stats().snapshot().direct_writes;
        let again: Vec<(u64, u64, u8)> = after.iter().map(|&(o, l, f)| (o, l, !f)).collect();
        write_all(&a, &sink, &pool, &again, Some(&mut fe));
        assert_eq!(a.stats().snapshot().direct_writes, before + 20);
        let now = snapshot(&a);
        let still: Vec<(u64, u8)> = now
            .dirty_region_runs()
            .flatten()
            .filter(|&r| stale.get(r) == 0xf && now.get(r) == 0xf)
            .map(|r| (r, now.get(r)))
            .collect();
        assert!(
            still.is_empty(),
            "regions still stale after the resync: {still:?}; stats {:?}",
            a.stats().snapshot().engine
        );
        let stats = a.stats().snapshot().engine;
        assert_eq!(stats.resync_total, expected.count_nonzero());
        assert!(stats.remote_writes >= 60);
        stop_both(a, b);
        assert!(
            std::fs::read(&data_a).unwrap() == std::fs::read(&data_b).unwrap(),
            "the copies differ"
        );
    }

    /// Records what the device would send, encoded.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<bytes::Bytes>>,
    }

    impl PeerLink for Recorder {
        fn send(&self, message: ToPeer<'_>) {
            self.sent.lock().unwrap().push(mirror::encode(&message));
        }
        fn resync_done(&self) {}
        fn renegotiate(&self) {}
        fn stalled(&self, _: u64) {}
    }

    /// One log of what a device thread did, in order: messages handed to
    /// the link, batch ends, completions.
    #[derive(Default)]
    struct Journal {
        log: Mutex<Vec<&'static str>>,
    }

    impl PeerLink for Journal {
        fn send(&self, message: ToPeer<'_>) {
            let what = match message {
                ToPeer::Write { .. } => "send write",
                _ => "send other",
            };
            self.log.lock().unwrap().push(what);
        }
        fn end_of_batch(&self) {
            self.log.lock().unwrap().push("end of batch");
        }
        fn resync_done(&self) {}
        fn renegotiate(&self) {}
        fn stalled(&self, _: u64) {}
    }

    impl CompletionSink for Journal {
        fn complete(&self, _: u64, _: &Request, result: Result<(), EngineError>, _: Option<IoBuf>) {
            assert!(result.is_ok(), "{result:?}");
            self.log.lock().unwrap().push("complete");
        }
    }

    /// An async write is complete once written here, and the message that
    /// carries it to the peer must not make the application wait: the
    /// device thread tells the link that its batch ended (so a link that
    /// held the message back may send it) only after handing the batch's
    /// completions back.
    #[test]
    fn an_async_batch_ends_after_its_completions_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::default());
        let (rt, _, _) = side_in(dir.path(), "a", journal.clone(), crate::config::Mode::Async);
        rt.link_event(LinkEvent::Connected {
            session: 1,
            connection: ResyncRole::Source(vec![0; 256]).into(),
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while rt.stats().snapshot().engine.connected == 0 {
            assert!(Instant::now() < deadline, "no link");
            std::thread::sleep(Duration::from_millis(1));
        }
        let pool = BufPool::new();
        let mut buf = pool.take(4096);
        buf.fill(7);
        rt.submit(Submission {
            request: Request {
                kind: OpKind::Write,
                offset_bytes: 0,
                len_bytes: 4096,
                fua: false,
            },
            buf: Some(buf),
            tag: 1,
            sink: journal.clone(),
        })
        .unwrap();
        while !journal.log.lock().unwrap().contains(&"complete") {
            assert!(Instant::now() < deadline, "the write did not complete");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The peer never answers here: let the device go on alone to stop.
        rt.link_event(LinkEvent::Lost);
        rt.stop().unwrap();
        let log = journal.log.lock().unwrap().clone();
        let sent = log
            .iter()
            .position(|&e| e == "send write")
            .expect("the write was sent");
        let completed = log.iter().position(|&e| e == "complete").unwrap();
        let batch_end = sent
            + log[sent..]
                .iter()
                .position(|&e| e == "end of batch")
                .expect("the batch that sent the write ended");
        assert!(
            sent < completed && completed < batch_end,
            "the write's completion must go back before its batch ends: {log:?}"
        );
    }

    /// While an action waits for the device thread, a frontend carries out
    /// nothing the engine asks after it (here an async write's message and
    /// its completion, which would free the data the message needs) and
    /// takes no new request inline: the engine's order is kept. Driven by
    /// hand, without a device thread, so nothing races.
    #[test]
    fn a_frontend_defers_everything_behind_an_action_left_to_the_device_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        File::create(&path).unwrap().set_len(SIZE).unwrap();
        let recorder = Arc::new(Recorder::default());
        let shared = Arc::new(
            Shared::new(
                crate::engine::Engine::new(
                    EngineParams {
                        block_size: 4096,
                        ..EngineParams::new(SIZE, crate::config::Mode::Async)
                    },
                    StateMap::new(SIZE),
                ),
                Some(recorder.clone()),
                crate::volume::open_rw(&path, true).unwrap(),
            )
            .unwrap(),
        );
        let submitter = Submitter {
            shared: shared.clone(),
        };
        {
            let engine = &mut shared.core.lock().unwrap().engine;
            engine.connect(ResyncRole::Source(vec![0; 256]));
            while engine.poll_action().is_some() {}
        }
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());
        let write = |tag: u64| {
            let mut buf = pool.take(4096);
            buf.fill(tag as u8);
            Submission {
                request: Request {
                    kind: OpKind::Write,
                    offset_bytes: 4096 * tag,
                    len_bytes: 4096,
                    fua: false,
                },
                buf: Some(buf),
                tag,
                sink: sink.clone(),
            }
        };
        // The first write marks its region: the map commit is left to the
        // device thread, which here is this test.
        assert!(matches!(submitter.start_here(write(1)), Here::Handed));
        let slot = {
            let mut core = shared.core.lock().unwrap();
            let Some(Action::PersistMap(epoch)) = core.deferred.pop_front() else {
                panic!("expected a map commit, got {:?}", core.deferred);
            };
            assert!(core.deferred.is_empty());
            core.engine.map_written(epoch, Ok(()));
            let Some(Action::Local(slot)) = core.engine.poll_action() else {
                panic!("the write goes on once the map is durable");
            };
            assert_eq!(core.engine.poll_action(), None);
            slot
        };
        // Say the write's local part ran on the frontend's ring, and the
        // device thread still has an action to carry out.
        let sqe = shared
            .core
            .lock()
            .unwrap()
            .local_sqe(slot, shared.data_file.as_raw_fd());
        assert!(sqe.is_some());
        let waiting = Action::SendPrioritize { region: 9 };
        shared.core.lock().unwrap().deferred.push_back(waiting);
        assert!(matches!(submitter.local_result(slot, 4096), Here::Handed));
        let deferred: Vec<Action> = shared.core.lock().unwrap().deferred.drain(..).collect();
        assert!(
            matches!(
                deferred[..],
                [
                    Action::SendPrioritize { region: 9 },
                    Action::SendWrite { slot: s, .. },
                    Action::Complete(c, Ok(())),
                ] if s == slot && c == slot
            ),
            "{deferred:?}"
        );
        assert!(
            recorder.sent.lock().unwrap().is_empty(),
            "nothing sent out of order"
        );
        // Nor is a new request taken inline meanwhile: it is given back, to
        // try again once the device thread has caught up.
        shared.core.lock().unwrap().deferred.push_back(waiting);
        assert!(matches!(submitter.start_here(write(2)), Here::Full(_)));
        assert!(shared.inbox.is_empty());
        assert_eq!(shared.core.lock().unwrap().deferred.len(), 1);
    }

    /// Two frontend threads run writes on their own threads, and a third
    /// submits to the device thread, while the device resynchronises and
    /// mirrors, in each mode: the engine is shared
    /// between them and the device thread, and actions only the device
    /// thread can carry out keep their order. Both copies end identical.
    #[test]
    fn frontend_threads_and_the_device_thread_share_the_engine_in_every_mode() {
        use crate::config::Mode;
        for mode in [Mode::Sync, Mode::Mwc, Mode::Async] {
            let dir = tempfile::tempdir().unwrap();
            let Pair {
                a,
                b,
                wire_a,
                wire_b,
                data_a,
                data_b,
            } = pair(dir.path(), mode, 5);
            let pool = BufPool::new();
            // A alone first: 300 regions to resynchronise.
            let alone: Vec<(u64, u64, u8)> = (0..300u64)
                .map(|i| (i * 6 * REGION_SIZE_BYTES, REGION_SIZE_BYTES, i as u8))
                .collect();
            for chunk in alone.chunks(50) {
                write_all(&a, &Arc::new(Collect::default()), &pool, chunk, None);
            }
            connect(&a, &b, 5, stale_bits(&snapshot(&a)));
            // Each thread owns 12 regions, some of them still to resync; per
            // round it writes 24 blocks in them, none twice, and waits.
            std::thread::scope(|s| {
                // Threads 0 and 1 run their writes inline, as ublk queue
                // threads do; thread 2 submits through the device thread's
                // queue, as NBD does.
                for t in 0..3u64 {
                    let (a, pool) = (&a, &pool);
                    s.spawn(move || {
                        let mut fe = Frontend::new();
                        let sink = Arc::new(Collect::default());
                        for round in 0..12u64 {
                            let writes: Vec<(u64, u64, u8)> = (0..24u64)
                                .map(|k| {
                                    let region = (k % 12) * 50 + t;
                                    let block = (round + k / 12 * 4) % 8;
                                    let offset = region * REGION_SIZE_BYTES + block * 4096;
                                    (offset, 4096, (t * 100 + round * 24 + k) as u8)
                                })
                                .collect();
                            let inline = (t < 2).then_some(&mut fe);
                            write_all(a, &sink, pool, &writes, inline);
                        }
                    });
                }
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            while wire_a.resyncs_done.load(Ordering::SeqCst) == 0
                || wire_b.resyncs_done.load(Ordering::SeqCst) == 0
                || a.stats().snapshot().engine.backlog_bytes != 0
            {
                assert!(Instant::now() < deadline, "{mode:?}: resync did not finish");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Once the map is quiet, writes to marked regions run inline
            // (while it changes they wait for its next commit). Sync writes
            // the peer's copy first: the local write follows the answer, on
            // the device thread.
            // The first round starts the commit of what the resync changed.
            let sink = Arc::new(Collect::default());
            let mut before = 0;
            for fill in [0xf0, 0xe0] {
                before = a.stats().snapshot().direct_writes;
                let again: Vec<(u64, u64, u8)> = (0..12u64)
                    .map(|k| (k * 50 * REGION_SIZE_BYTES, 4096, fill | k as u8))
                    .collect();
                write_all(&a, &sink, &pool, &again, Some(&mut Frontend::new()));
            }
            let stats = a.stats().snapshot();
            if mode != Mode::Sync {
                assert!(
                    stats.direct_writes > before,
                    "{mode:?}: no write ran inline"
                );
            }
            assert_eq!(stats.errors, 0);
            // Async: let the peer acknowledge the backlog while it can
            // still reach this side.
            let deadline = Instant::now() + Duration::from_secs(20);
            while a.stats().snapshot().engine.backlog_bytes != 0 {
                assert!(
                    Instant::now() < deadline,
                    "{mode:?}: backlog not acknowledged"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            stop_both(a, b);
            assert!(
                std::fs::read(&data_a).unwrap() == std::fs::read(&data_b).unwrap(),
                "{mode:?}: the copies differ"
            );
        }
    }
}

#[test]
fn latency_percentiles_are_bucket_upper_bounds() {
    let mut buckets = [0u64; LATENCY_BUCKETS];
    assert_eq!(latency_percentile_us(&buckets, 0.5), None);
    // 90 writes below 128 µs (bucket 6: 64–127 µs), 9 at 1–2 ms, 1 at 40 ms.
    buckets[latency_bucket(100)] += 90;
    buckets[latency_bucket(1500)] += 9;
    buckets[latency_bucket(40_000)] += 1;
    assert_eq!(latency_bucket(100), 6);
    assert_eq!(latency_percentile_us(&buckets, 0.5), Some(128));
    assert_eq!(latency_percentile_us(&buckets, 0.99), Some(2048));
    assert_eq!(latency_percentile_us(&buckets, 0.999), Some(65536));
    assert_eq!(latency_bucket(0), 0);
    assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
}

/// A group commit that carries the superblock syncs its pages before it
/// writes the superblock; one without, or the superblock alone, syncs once.
#[test]
fn a_commits_superblock_is_written_only_after_its_pages_are_durable() {
    use super::{FlushStep, SUPERBLOCK_PAGE, flush_step};
    let flush = |next, writes_in_flight, pages_synced| super::Flush {
        epoch: 1,
        next,
        writes_in_flight,
        failed: None,
        syncing: false,
        pages_synced,
        superblock: None,
    };
    let with_superblock = [(3, 0, 7), (9, 1, 7), (SUPERBLOCK_PAGE, 1, 4)];
    assert_eq!(
        flush_step(&with_superblock, &flush(0, 0, false)),
        FlushStep::Write
    );
    assert_eq!(
        flush_step(&with_superblock, &flush(1, 1, false)),
        FlushStep::Write
    );
    // Both pages written: their writes complete, then they are synced.
    assert_eq!(
        flush_step(&with_superblock, &flush(2, 2, false)),
        FlushStep::Wait
    );
    assert_eq!(
        flush_step(&with_superblock, &flush(2, 0, false)),
        FlushStep::SyncPages
    );
    // Only then the superblock, and the sync that ends the commit.
    assert_eq!(
        flush_step(&with_superblock, &flush(2, 0, true)),
        FlushStep::Write
    );
    assert_eq!(
        flush_step(&with_superblock, &flush(3, 1, true)),
        FlushStep::Wait
    );
    assert_eq!(
        flush_step(&with_superblock, &flush(3, 0, true)),
        FlushStep::SyncAll
    );
    // Pages alone, or the superblock alone: one sync.
    let pages = [(3, 0, 7), (9, 1, 7)];
    assert_eq!(flush_step(&pages, &flush(1, 1, false)), FlushStep::Write);
    assert_eq!(flush_step(&pages, &flush(2, 0, false)), FlushStep::SyncAll);
    let superblock = [(SUPERBLOCK_PAGE, 1, 4)];
    assert_eq!(
        flush_step(&superblock, &flush(0, 0, false)),
        FlushStep::Write
    );
    assert_eq!(
        flush_step(&superblock, &flush(1, 0, false)),
        FlushStep::SyncAll
    );
}
