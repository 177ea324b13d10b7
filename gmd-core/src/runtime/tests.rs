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
    let (map, slots) = dev.runtime.take().unwrap().stop().unwrap();
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
    use crate::mirror::{self, FromPeer, LinkEvent, PeerLink, ToPeer};
    use std::sync::OnceLock;

    /// Hands every message to the other runtime through the wire encoding.
    struct Wire {
        other: OnceLock<Arc<Runtime>>,
        session: u64,
        resyncs_done: AtomicU64,
    }

    impl PeerLink for Wire {
        fn send(&self, message: ToPeer) {
            let bytes = mirror::encode(&message);
            let decoded: FromPeer = mirror::decode(&bytes, SIZE).expect("valid message");
            self.other
                .get()
                .expect("linked")
                .from_peer(self.session, decoded);
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

    fn side(dir: &std::path::Path, name: &str, link: Arc<Wire>) -> (Runtime, PathBuf, PathBuf) {
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
            params: EngineParams {
                block_size: 4096,
                slots_max: 64,
                resync_in_flight_max_bytes: 256 << 10,
                ..EngineParams::new(SIZE, crate::config::Mode::Mwc)
            },
            pool: BufPool::new(),
            link: Some(link),
        })
        .unwrap();
        (runtime, data, map)
    }

    fn write_all(rt: &Runtime, sink: &Arc<Collect>, pool: &BufPool, writes: &[(u64, u64, u8)]) {
        for (i, &(offset, len, fill)) in writes.iter().enumerate() {
            let mut buf = pool.take(len as usize);
            buf.fill(fill);
            rt.submit(Submission {
                request: Request {
                    kind: OpKind::Write,
                    offset_bytes: offset,
                    len_bytes: len,
                    fua: false,
                },
                buf: Some(buf),
                tag: i as u64,
                sink: sink.clone(),
            })
            .unwrap();
        }
        let done = sink.wait(writes.len());
        assert!(
            done.iter().all(|(_, r, _)| r.is_ok()),
            "{:?}",
            done.iter().map(|d| d.1).collect::<Vec<_>>()
        );
    }

    fn snapshot(rt: &Runtime) -> StateMap {
        let (tx, rx) = mpsc::channel();
        rt.snapshot(move |m| tx.send(m).unwrap());
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// A resync target waits for direct reads in flight before it takes
    /// the link, then refuses them until every region arrived; afterwards
    /// they see the source's data.
    #[test]
    fn a_resync_target_drains_direct_reads_and_refuses_them_until_resynced() {
        let dir = tempfile::tempdir().unwrap();
        let wire = |session| {
            Arc::new(Wire {
                other: OnceLock::new(),
                session,
                resyncs_done: AtomicU64::new(0),
            })
        };
        let (wire_a, wire_b) = (wire(9), wire(9));
        let (a, _, _) = side(dir.path(), "a", wire_a.clone());
        let (b, _, _) = side(dir.path(), "b", wire_b.clone());
        let (a, b) = (Arc::new(a), Arc::new(b));
        wire_a.other.set(b.clone()).ok().unwrap();
        wire_b.other.set(a.clone()).ok().unwrap();
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());
        let region = 12u64;
        let offset = region * REGION_SIZE_BYTES;
        write_all(&a, &sink, &pool, &[(offset, REGION_SIZE_BYTES, 0x3c)]);
        let mut bits = vec![0u8; (SIZE / REGION_SIZE_BYTES).div_ceil(8) as usize];
        bits[(region / 8) as usize] |= 1 << (region % 8);

        let reader = b.submitter();
        let permit = direct_read_permit(&reader, offset, 4096);
        b.link_event(LinkEvent::Connected {
            session: 9,
            role: ResyncRole::Target(bits.clone()),
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
            role: ResyncRole::Source(bits),
        });
        let permit = direct_read_permit(&reader, offset, 4096);
        assert_eq!(wire_b.resyncs_done.load(Ordering::SeqCst), 1);
        let new = pread_direct(&permit, offset, 4096);
        permit.finish(true);
        assert!(new.iter().all(|&x| x == 0x3c), "resynchronised data");
        drop((reader, wire_a, wire_b));
        if let (Some(a), Some(b)) = (Arc::try_unwrap(a).ok(), Arc::try_unwrap(b).ok()) {
            a.stop().unwrap();
            b.stop().unwrap();
        }
    }

    #[test]
    fn standalone_writes_resync_then_mirrored_writes_leave_identical_copies() {
        let dir = tempfile::tempdir().unwrap();
        let wire_a = Arc::new(Wire {
            other: OnceLock::new(),
            session: 7,
            resyncs_done: AtomicU64::new(0),
        });
        let wire_b = Arc::new(Wire {
            other: OnceLock::new(),
            session: 7,
            resyncs_done: AtomicU64::new(0),
        });
        let (a, data_a, _) = side(dir.path(), "a", wire_a.clone());
        let (b, data_b, _) = side(dir.path(), "b", wire_b.clone());
        let a = Arc::new(a);
        let b = Arc::new(b);
        wire_a.other.set(b.clone()).ok().unwrap();
        wire_b.other.set(a.clone()).ok().unwrap();
        let pool = BufPool::new();
        let sink = Arc::new(Collect::default());

        // A alone: these regions become stale.
        let alone: Vec<(u64, u64, u8)> = (0..40u64)
            .map(|i| (i * 5 * REGION_SIZE_BYTES + 4096, 65536, i as u8 + 1))
            .collect();
        write_all(&a, &sink, &pool, &alone);
        let stale = snapshot(&a);
        let mut expected = StateMap::new(SIZE);
        for &(o, l, _) in &alone {
            expected.mark_bytes(o, l, CELL_STALE);
        }
        assert_eq!(stale, expected);

        // Connect: A sends its stale regions to B.
        let bits = {
            let mut bits = vec![0u8; stale.region_count().div_ceil(8) as usize];
            for run in stale.dirty_region_runs() {
                for r in run {
                    bits[(r / 8) as usize] |= 1 << (r % 8);
                }
            }
            bits
        };
        b.link_event(LinkEvent::Connected {
            session: 7,
            role: ResyncRole::Target(bits.clone()),
        });
        a.link_event(LinkEvent::Connected {
            session: 7,
            role: ResyncRole::Source(bits),
        });
        // Link events and submissions reach the device thread by different
        // queues: writes submitted before A took the event would be written
        // alone (stale, and resynchronised too). Wait until both mirror.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while a.stats().snapshot().engine.connected == 0
            || b.stats().snapshot().engine.connected == 0
        {
            assert!(std::time::Instant::now() < deadline, "no link");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Meanwhile the application keeps writing on A (mirrored, mwc).
        let during: Vec<(u64, u64, u8)> = (0..40u64)
            .map(|i| (i * 7 * REGION_SIZE_BYTES, 8192, 0xa0 + i as u8))
            .collect();
        write_all(&a, &sink, &pool, &during);
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
        write_all(&a, &sink, &pool, &after);
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
        drop(wire_a);
        drop(wire_b);
        let a = Arc::try_unwrap(a).ok();
        let b = Arc::try_unwrap(b).ok();
        // Links hold the runtimes: stop through the handles we still have.
        if let (Some(a), Some(b)) = (a, b) {
            a.stop().unwrap();
            b.stop().unwrap();
        }
        assert!(
            std::fs::read(&data_a).unwrap() == std::fs::read(&data_b).unwrap(),
            "the copies differ"
        );
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
