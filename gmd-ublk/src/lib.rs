//! ublk frontend: serves a GeoMirror device as `/dev/ublkb<minor>`.
//!
//! The frontend translates ublk descriptors into engine requests and results
//! into errnos; it contains no mirroring logic. It is built on the `libublk`
//! crate: the control commands (add, start, stop, delete, user recovery) and
//! the per-queue io_uring loops are libublk's.
//!
//! # Threading
//!
//! One thread per ublk queue (libublk's `run_target`). Each queue thread runs
//! a single-threaded executor with one task per tag: the task receives a
//! request from the kernel (`FETCH`/`COMMIT_AND_FETCH` on the queue's
//! io_uring).
//!
//! A READ goes straight to the data volume when the device allows it
//! ([`Submitter::direct_read`]: not a secondary, no resync holding reads
//! back): the task reads into the tag's own buffer with an io_uring READ on
//! the queue's ring and commits the result; no other thread and no copy.
//!
//! Everything else (writes, flushes, discards, and reads the engine must
//! order) runs on the queue thread ([`Submitter::start_here`]). A write of
//! at least half a request buffer hands the tag's buffer itself to the
//! engine, and the tag takes a fresh one from the queue's pool for its next
//! request (the kernel reads the buffer's address anew with every
//! `COMMIT_AND_FETCH`); a smaller one is copied into a pooled buffer of its
//! size. The engine takes the request there,
//! hands what goes to the peer to GeoMessage, and gives the local I/O back
//! as an io_uring operation that the task issues on the queue's ring. When
//! it finishes ([`Submitter::local_result`]) the request usually completes
//! at once (standalone, async). If it waits for something else (the peer's
//! answer in mwc and sync, a state map commit, resync), the device thread
//! finishes it. It completes through the queue's [`CompletionSink`], which
//! pushes the result into a fixed-capacity queue and writes the queue's
//! eventfd. A read of that eventfd is always pending on the queue's io_uring,
//! so the queue thread wakes and hands each result to its tag's task. The
//! task copies read data back and commits the result to the kernel.
//!
//! Nothing is allocated per request once warm: buffers come from the
//! device's [`BufPool`] and the queue's pool of request-sized buffers,
//! completion queues and per-tag slots are sized when the queue starts.
//!
//! # Lifetime
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! if `gmdd` dies, the kernel keeps `/dev/ublkb<minor>` and queues its I/O;
//! [`UblkFrontend::start`] finds such a quiesced device and recovers it (the
//! requests that were in flight are reissued). A clean stop deletes the
//! device; [`UblkFrontend::detach`] leaves it for the next `gmdd` instead.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use gmd_core::buf::{BUF_ALIGN, BufPool, IoBuf};
use gmd_core::engine::{EngineError, OpKind, Request};
use gmd_core::runtime::{CompletionSink, DirectRead, Here, Submission, Submitter};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags, sys};
use tracing::{debug, info, warn};

/// The control node's usual path.
pub const DEFAULT_CONTROL: &str = "/dev/ublk-control";

/// Environment variable naming the control node to look for (tests use it to
/// model a host without ublk).
pub const CONTROL_ENV: &str = "GMD_UBLK_CONTROL";

/// What an administrator is told when ublk is asked for on a host without it.
pub const NOT_LOADED: &str =
    "ublk_drv is not loaded: `modprobe ublk_drv` (Linux ≥ 6.0), or use the NBD export";

/// Default queue depth per ublk queue.
pub const DEPTH_DEFAULT: u16 = 128;

/// Largest single read or write the kernel sends (bytes).
pub const IO_BYTES_MAX: u32 = 512 << 10;

/// Request-sized buffers a queue keeps free once large writes gave them
/// back (16 MiB at 512 KiB each; more are freed and allocated again).
const TAG_BUFS_FREE_MAX: usize = 32;

/// Largest discard or write-zeroes request the kernel sends (bytes).
pub const DISCARD_BYTES_MAX: u32 = 64 << 20;

/// How long `start` waits for a live device whose server died to be
/// quiesced by the kernel.
const LIVE_WAIT: Duration = Duration::from_secs(20);

/// How long `start` waits for the kernel to bring the device up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The control node this process uses: `$GMD_UBLK_CONTROL`, else
/// [`DEFAULT_CONTROL`].
pub fn control_path() -> PathBuf {
    std::env::var_os(CONTROL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL))
}

/// Whether this host can create ublk devices (the control node exists).
pub fn available() -> bool {
    control_path().exists()
}

/// Default number of queues: one per core.
pub fn queues_default() -> u16 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 64) as u16
}

/// The block device node of ublk device `id`.
pub fn bdev_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Why the frontend could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host has no ublk driver.
    #[error("{NOT_LOADED}")]
    NotLoaded,
    /// Another process serves a ublk device with this id.
    #[error(
        "ublk device {id} already exists and is served by another process; delete it or use another minor"
    )]
    Taken {
        /// The device id (= minor).
        id: u32,
    },
    /// The device is open or mounted.
    #[error("/dev/ublkb{id} is in use ({why}); unmount it and close it first")]
    InUse {
        /// The device id.
        id: u32,
        /// Who holds it.
        why: String,
    },
    /// The kernel or libublk refused.
    #[error("ublk device {id}: {what}: {source}")]
    Ublk {
        /// The device id.
        id: u32,
        /// What was being done.
        what: &'static str,
        /// libublk's error.
        source: UblkError,
    },
    /// The device did not come up in time.
    #[error("ublk device {id}: {0}", .why)]
    Start {
        /// The device id.
        id: u32,
        /// What happened.
        why: String,
    },
}

/// How a device is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// ublk device id: the device's minor (`/dev/ublkb<id>`).
    pub id: u32,
    /// Device name (logs, thread names).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Number of queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// The block device refuses writes (a secondary copy).
    pub read_only: bool,
}

/// One request's result, from the device thread to its queue thread.
struct Done {
    tag: u16,
    result: Result<(), EngineError>,
    buf: Option<IoBuf>,
}

/// The completion path of one queue: shared between its thread and the
/// device thread.
struct QueueSink {
    done: ArrayQueue<Done>,
    efd: OwnedFd,
}

impl CompletionSink for QueueSink {
    fn complete(
        &self,
        tag: u64,
        _request: &Request,
        result: Result<(), EngineError>,
        buf: Option<IoBuf>,
    ) {
        let done = Done {
            tag: tag as u16,
            result,
            buf,
        };
        // Capacity is the queue depth and each tag has at most one request in
        // the device, so this cannot fail.
        if self.done.push(done).is_err() {
            warn!("ublk completion queue overflow (a bug)");
            return;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Per-tag rendezvous between the completion reaper and the tag's task.
#[derive(Default)]
struct TagSlot {
    done: Option<(Result<(), EngineError>, Option<IoBuf>)>,
    waker: Option<Waker>,
}

/// State shared by the frontend handle and its threads.
struct Shared {
    spec: Spec,
    submitter: Submitter,
    pool: BufPool,
    /// Set before a shutdown that leaves the device to the next gmdd: tasks
    /// stop taking requests (the kernel reissues them to the successor).
    frozen: AtomicBool,
}

/// A running ublk device serving one GeoMirror device.
pub struct UblkFrontend {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    recovered: bool,
}

impl fmt::Debug for UblkFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UblkFrontend")
            .field("spec", &self.shared.spec)
            .finish_non_exhaustive()
    }
}

/// What the kernel already holds under an id.
enum Existing {
    None,
    /// Quiesced: its server died; recover it.
    Quiesced {
        queues: u16,
        depth: u16,
    },
    /// Stopped but not deleted (a previous server could not clean up).
    Dead,
    /// Live: someone serves it.
    Live,
}

fn existing(id: u32) -> Existing {
    if !Path::new(&format!("/dev/ublkc{id}")).exists() {
        return Existing::None;
    }
    match UblkCtrl::new_simple(id as i32) {
        Ok(ctrl) => {
            let info = ctrl.dev_info();
            match u32::from(info.state) {
                sys::UBLK_S_DEV_QUIESCED => Existing::Quiesced {
                    queues: info.nr_hw_queues,
                    depth: info.queue_depth,
                },
                sys::UBLK_S_DEV_DEAD => Existing::Dead,
                _ => Existing::Live,
            }
        }
        Err(_) => Existing::None,
    }
}

impl UblkFrontend {
    /// Creates `/dev/ublkb<spec.id>` (or recovers the quiesced device a dead
    /// gmdd left) and serves it with `submitter`'s device; returns once the
    /// kernel has the block device.
    ///
    /// # Errors
    /// No ublk driver ([`Error::NotLoaded`]), the id is served by someone
    /// else, or the kernel refused; nothing is left behind then.
    pub fn start(spec: Spec, submitter: Submitter, pool: BufPool) -> Result<UblkFrontend, Error> {
        if !available() {
            return Err(Error::NotLoaded);
        }
        let id = spec.id;
        // A server that just died leaves its device LIVE until the kernel
        // notices (a few seconds) and quiesces it: wait for that.
        let mut found = existing(id);
        let deadline = std::time::Instant::now() + LIVE_WAIT;
        while matches!(found, Existing::Live) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            found = existing(id);
        }
        let (recover, queues, depth) = match found {
            Existing::None => (false, spec.queues, spec.depth),
            Existing::Quiesced { queues, depth } => (true, queues, depth),
            Existing::Dead => {
                info!(id, "deleting a stopped ublk device left behind");
                if let Ok(ctrl) = UblkCtrl::new_simple(id as i32) {
                    let _ = ctrl.del_dev();
                }
                (false, spec.queues, spec.depth)
            }
            Existing::Live => return Err(Error::Taken { id }),
        };
        let shared = Arc::new(Shared {
            spec: Spec {
                queues,
                depth,
                ..spec
            },
            submitter,
            pool,
            frozen: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Result<(), Error>>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk{id}"))
            .spawn(move || serve(thread_shared, recover, tx))
            .map_err(|e| Error::Start {
                id,
                why: format!("cannot start its thread: {e}"),
            })?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => {
                info!(
                    id,
                    device = %shared.spec.name,
                    recovered = recover,
                    queues,
                    depth,
                    "ublk device /dev/ublkb{id} up"
                );
                Ok(UblkFrontend {
                    shared,
                    thread: Some(thread),
                    recovered: recover,
                })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                // Leave nothing half-made: delete whatever the kernel holds.
                if let Ok(ctrl) = UblkCtrl::new_simple(id as i32) {
                    let _ = ctrl.kill_dev();
                    let _ = ctrl.del_dev();
                }
                Err(Error::Start {
                    id,
                    why: format!("the kernel did not bring the device up within {START_TIMEOUT:?}"),
                })
            }
        }
    }

    /// The block device node.
    pub fn path(&self) -> PathBuf {
        bdev_path(self.shared.spec.id)
    }

    /// Whether `start` reattached a device a previous gmdd left.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Who holds the block device open (mounted, or open by a process), if
    /// anyone.
    pub fn in_use(&self) -> Option<String> {
        in_use(self.shared.spec.id)
    }

    /// Deletes the device; refused while it is open or mounted unless
    /// `force` (then its users get I/O errors).
    ///
    /// # Errors
    /// [`Error::InUse`], or the kernel refused to delete it.
    pub fn stop(mut self, force: bool) -> Result<(), Error> {
        let id = self.shared.spec.id;
        if !force {
            if let Some(why) = self.in_use() {
                return Err(Error::InUse { id, why });
            }
        }
        let ctrl = UblkCtrl::new_simple(id as i32).map_err(|source| Error::Ublk {
            id,
            what: "open for delete",
            source,
        })?;
        ctrl.kill_dev().map_err(|source| Error::Ublk {
            id,
            what: "stop",
            source,
        })?;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = ctrl.del_dev();
        info!(id, "ublk device /dev/ublkb{id} deleted");
        Ok(())
    }

    /// Leaves the device to the next gmdd (daemon shutdown while it is in
    /// use): requests stop being taken and the kernel queues them until a
    /// new gmdd recovers the device. Call before stopping the device thread.
    pub fn detach(mut self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
        // The queue threads stay parked until the process exits.
        drop(self.thread.take());
        info!(
            id = self.shared.spec.id,
            "ublk device left for the next gmdd to recover"
        );
    }
}

/// Who holds `/dev/ublkb<id>`: an exclusive opener (a mount) or any process
/// with it open.
pub fn in_use(id: u32) -> Option<String> {
    let path = bdev_path(id);
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDONLY | libc::O_EXCL | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Some("mounted or held exclusively".into());
        }
    } else {
        // SAFETY: we just opened it.
        drop(unsafe { File::from_raw_fd(fd) });
    }
    let me = std::process::id();
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                return Some(format!("open by process {pid}"));
            }
        }
    }
    None
}

/// The device thread body: builds (or recovers) the device and runs it until
/// it is deleted.
fn serve(shared: Arc<Shared>, recover: bool, tx: mpsc::Sender<Result<(), Error>>) {
    let spec = shared.spec.clone();
    let id = spec.id;
    let fail = |what, source| Error::Ublk { id, what, source };
    if recover {
        match UblkCtrl::new_simple(id as i32) {
            Ok(c) => {
                if let Err(e) = c.start_user_recover() {
                    let _ = tx.send(Err(fail("start recovery", e)));
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(fail("open for recovery", e)));
                return;
            }
        }
    }
    let flags = if recover {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = match UblkCtrlBuilder::default()
        .name("gmd")
        .id(id as i32)
        .nr_queues(spec.queues)
        .depth(spec.depth)
        .io_buf_bytes(IO_BYTES_MAX)
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
        .dev_flags(flags)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(fail("add", e)));
            return;
        }
    };
    let tgt_init = |dev: &mut UblkDev| {
        init_params(dev, &spec);
        Ok(())
    };
    let q_shared = shared.clone();
    let started = tx.clone();
    let result = ctrl.run_target(
        tgt_init,
        move |qid, dev: &UblkDev| serve_queue(qid, dev, &q_shared),
        move |_ctrl: &UblkCtrl| {
            let _ = started.send(Ok(()));
        },
    );
    if let Err(e) = result {
        // Before the device started: nothing must stay behind.
        let _ = ctrl.kill_dev();
        let _ = ctrl.del_dev();
        let _ = tx.send(Err(fail("start", e)));
        return;
    }
    if shared.frozen.load(Ordering::SeqCst) {
        ctrl.disown();
    } else {
        let _ = ctrl.del_dev();
    }
    debug!(id, "ublk queues finished");
}

fn init_params(dev: &mut UblkDev, spec: &Spec) {
    let lbs_shift = spec.block_size.trailing_zeros() as u8;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let discard_sectors = DISCARD_BYTES_MAX >> 9;
    dev.tgt.dev_size = spec.size_bytes;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE
                | sys::UBLK_ATTR_FUA
                | if spec.read_only {
                    sys::UBLK_ATTR_READ_ONLY
                } else {
                    0
                },
            logical_bs_shift: lbs_shift,
            physical_bs_shift: lbs_shift.max(12),
            io_opt_shift: lbs_shift.max(12),
            io_min_shift: lbs_shift,
            max_sectors,
            dev_sectors: spec.size_bytes >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: spec.block_size.max(4096),
            max_discard_sectors: discard_sectors,
            max_write_zeroes_sectors: discard_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// One queue thread: a task per tag plus the completion reaper.
fn serve_queue(qid: u16, dev: &UblkDev, shared: &Arc<Shared>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            warn!(id = shared.spec.id, qid, "ublk queue setup failed: {e}");
            return;
        }
    };
    let depth = usize::from(dev.dev_info.queue_depth);
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        warn!(
            id = shared.spec.id,
            qid,
            "eventfd: {}",
            io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: a fresh descriptor we own.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let sink = Arc::new(QueueSink {
        done: ArrayQueue::new(depth.max(1)),
        efd,
    });
    let slots: Rc<RefCell<Vec<TagSlot>>> = Rc::new(RefCell::new(
        (0..depth).map(|_| TagSlot::default()).collect(),
    ));
    // Request-sized buffers, one per tag and those large writes took to
    // the engine (see `TagBuf`); at most TAG_BUFS_FREE_MAX kept free.
    let tag_pool = BufPool::with_classes(&[(
        (dev.dev_info.max_io_buf_bytes as usize).next_multiple_of(BUF_ALIGN),
        TAG_BUFS_FREE_MAX,
    )]);
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::with_capacity(depth);
    for tag in queue.tags() {
        let q = queue.clone();
        let slots = slots.clone();
        let shared = shared.clone();
        let sink: Arc<dyn CompletionSink> = sink.clone();
        let pool = tag_pool.clone();
        tasks.push(exe.spawn(async move {
            match tag_task(&q, tag, &shared, &sink, &slots, pool).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => warn!(id = shared.spec.id, tag, "ublk io task failed: {e}"),
            }
        }));
    }
    let reaper = {
        let q = queue.clone();
        let slots = slots.clone();
        let sink = sink.clone();
        exe.spawn(async move { reap(&q, &sink, &slots).await })
    };
    let run = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while run.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            debug!("ublk queue loop ended: {e}");
        }
    }));
    drop(reaper);
}

/// Waits on the eventfd through the queue's io_uring and hands every result
/// to its tag's task.
async fn reap(q: &UblkQueue<'_>, sink: &QueueSink, slots: &RefCell<Vec<TagSlot>>) {
    // The kernel writes here while a read is pending, possibly after this
    // task is dropped (the ring outlives it): one small leak per queue start.
    let counter: &'static mut u64 = Box::leak(Box::new(0u64));
    let target: *mut u8 = (counter as *mut u64).cast();
    loop {
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fd(sink.efd.as_raw_fd()),
            target,
            std::mem::size_of::<u64>() as u32,
        )
        .build();
        let res = q.ublk_submit_sqe(sqe).await;
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            warn!("ublk completion eventfd read failed: {res}");
            return;
        }
        let mut slots = slots.borrow_mut();
        while let Some(done) = sink.done.pop() {
            let slot = &mut slots[usize::from(done.tag)];
            slot.done = Some((done.result, done.buf));
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }
}

/// Where the kernel puts a tag's next request, and takes a read's data from
/// when the tag commits: a buffer of the queue's own pool, so that a large
/// write's buffer itself goes to the engine (no copy) while a fresh one
/// takes its place for the next request. The kernel reads the address
/// anew from every `FETCH`/`COMMIT_AND_FETCH`, and only writes into it
/// once that command has handed it over.
struct TagBuf {
    /// At the full request size.
    current: IoBuf,
    /// The queue's pool of request-sized buffers.
    pool: BufPool,
}

impl TagBuf {
    fn new(pool: BufPool, bytes: usize) -> TagBuf {
        TagBuf {
            current: pool.take(bytes),
            pool,
        }
    }

    /// The buffer the current request's data is in (full request size).
    fn data(&mut self) -> &mut [u8] {
        &mut self.current
    }

    /// The data of the current request, a write of `len` bytes, as the
    /// engine's buffer. A write of at least half a request buffer moves
    /// the buffer itself (held memory stays within twice the data while
    /// async keeps it for the peer); a smaller one is copied into a buffer
    /// of `small`'s that fits it.
    fn write_data(&mut self, len: usize, small: &BufPool) -> IoBuf {
        let bytes = self.current.len();
        if len >= bytes / 2 {
            let next = self.pool.take(bytes);
            let mut full = std::mem::replace(&mut self.current, next);
            full.set_len(len);
            return full;
        }
        let mut copy = small.take(len);
        copy.copy_from_slice(&self.current[..len]);
        copy
    }
}

/// Serves one tag for the life of the queue.
async fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    shared: &Shared,
    sink: &Arc<dyn CompletionSink>,
    slots: &RefCell<Vec<TagSlot>>,
    pool: BufPool,
) -> Result<(), UblkError> {
    let mut buf = TagBuf::new(pool, q.dev.dev_info.max_io_buf_bytes as usize);
    // libublk counts a buffer of its own per tag before the device starts;
    // the kernel is given ours. A page is enough for the count.
    let registered = libublk::helpers::IoBuf::<u8>::new(BUF_ALIGN);
    q.submit_io_prep_cmd(
        tag,
        BufDesc::RawAddress(buf.data().as_ptr()),
        0,
        Some(&registered),
    )
    .await?;
    loop {
        if shared.frozen.load(Ordering::Relaxed) {
            // Left for the next gmdd: never answer; the kernel reissues.
            std::future::pending::<()>().await;
        }
        let res = handle(q, tag, shared, sink, slots, &mut buf).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.data()), res)
            .await?;
    }
}

/// Reads straight from the data volume into the tag's buffer on this queue's
/// io_uring (no thread hop, no copy); returns the ublk result.
async fn read_direct(q: &UblkQueue<'_>, read: DirectRead<'_>, offset: u64, data: &mut [u8]) -> i32 {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &mut data[done..];
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fd(read.fd()),
            rest.as_mut_ptr(),
            rest.len() as u32,
        )
        .offset(offset + done as u64)
        .build();
        let res = q.ublk_submit_sqe(sqe).await;
        match res {
            n if n > 0 => done += n as usize,
            0 => {
                warn!(offset, "direct read hit the end of the data volume");
                read.finish(false);
                return -libc::EIO;
            }
            e if e == -libc::EINTR || e == -libc::EAGAIN => {}
            e => {
                read.finish(false);
                return e;
            }
        }
    }
    read.finish(true);
    data.len() as i32
}

/// Waits for the device thread to finish this tag's request.
async fn wait_for_device(
    tag: u16,
    slots: &RefCell<Vec<TagSlot>>,
) -> (Result<(), EngineError>, Option<IoBuf>) {
    std::future::poll_fn(|cx| {
        let mut slots = slots.borrow_mut();
        let slot = &mut slots[usize::from(tag)];
        match slot.done.take() {
            Some(d) => Poll::Ready(d),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// First and longest wait of a request the device cannot take yet.
const PAUSE_MIN: Duration = Duration::from_micros(20);
/// Longest wait between two tries.
const PAUSE_MAX: Duration = Duration::from_millis(1);

/// Sleeps on the queue's io_uring (an io_uring timeout), so the queue's
/// other tasks go on meanwhile.
async fn pause(q: &UblkQueue<'_>, how_long: Duration) {
    // The kernel copies the timespec when it takes the entry.
    let ts = io_uring::types::Timespec::from(how_long);
    let sqe = io_uring::opcode::Timeout::new(&ts).build();
    let _ = q.ublk_submit_sqe(sqe).await;
}

/// Decodes one ublk request, runs it through the device, returns the ublk
/// result (bytes, 0 or -errno).
async fn handle(
    q: &UblkQueue<'_>,
    tag: u16,
    shared: &Shared,
    sink: &Arc<dyn CompletionSink>,
    slots: &RefCell<Vec<TagSlot>>,
    tag_buf: &mut TagBuf,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    // Flush first: its sector fields are not meaningful.
    let kind = match op {
        sys::UBLK_IO_OP_FLUSH => OpKind::Flush,
        sys::UBLK_IO_OP_READ => OpKind::Read,
        sys::UBLK_IO_OP_WRITE => OpKind::Write,
        sys::UBLK_IO_OP_DISCARD => OpKind::Trim,
        sys::UBLK_IO_OP_WRITE_ZEROES => OpKind::WriteZeroes,
        _ => return -libc::EOPNOTSUPP,
    };
    let request = if kind == OpKind::Flush {
        Request {
            kind,
            offset_bytes: 0,
            len_bytes: 0,
            fua: false,
        }
    } else {
        Request {
            kind,
            offset_bytes: iod.start_sector << 9,
            len_bytes: u64::from(iod.nr_sectors) << 9,
            fua,
        }
    };
    let len = request.len_bytes as usize;
    if kind == OpKind::Read && len <= tag_buf.data().len() {
        if let Some(read) = shared
            .submitter
            .direct_read(request.offset_bytes, request.len_bytes)
        {
            return read_direct(q, read, request.offset_bytes, &mut tag_buf.data()[..len]).await;
        }
    }
    let io_buf = match kind {
        OpKind::Read | OpKind::Write if len > tag_buf.data().len() => return -libc::EINVAL,
        OpKind::Read => Some(shared.pool.take(len)),
        OpKind::Write => Some(tag_buf.write_data(len, &shared.pool)),
        _ => None,
    };
    let submission = Submission {
        request,
        buf: io_buf,
        tag: u64::from(tag),
        sink: sink.clone(),
    };
    // The engine takes the request on this thread; its local part runs on
    // this queue's ring. The device thread only steps in for what waits
    // (the peer's answer, a state map commit, resync).
    let mut here = shared.submitter.start_here(submission);
    let mut backoff = PAUSE_MIN;
    let (result, back) = loop {
        match here {
            Here::Issue { slot, sqe } => {
                let res = q.ublk_submit_sqe(sqe).await;
                here = shared.submitter.local_result(slot, res);
            }
            Here::Done { result, buf } => break (result, buf),
            Here::Handed => break wait_for_device(tag, slots).await,
            Here::Full(back) => {
                // The device is busy (its slots are shared with the other
                // queues and NBD): let this queue's other requests run
                // meanwhile, backing off so waiting tasks do not spin.
                pause(q, backoff).await;
                backoff = (backoff * 2).min(PAUSE_MAX);
                here = shared.submitter.start_here(back);
            }
        }
    };
    match result {
        Ok(()) => match kind {
            OpKind::Read => match back {
                Some(b) if b.len() >= len => {
                    tag_buf.data()[..len].copy_from_slice(&b[..len]);
                    len as i32
                }
                _ => -libc::EIO,
            },
            OpKind::Write => len as i32,
            _ => 0,
        },
        Err(e) => -e.errno(),
    }
}
