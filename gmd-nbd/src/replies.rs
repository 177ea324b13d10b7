//! Replies to a connection's requests, and the permits they give back.
//!
//! A reply goes out from the thread that finished its request (the device
//! thread, or the task that took the peer's answer) when that request is
//! the connection's only one in flight, the reply is small and nobody else
//! is writing: the client waits for exactly this reply, and waking the
//! connection's writer task for it would cost a thread hand-off per request
//! (`bench/alloc-per-write.sh` counts them). Otherwise the reply waits in the
//! connection's queue and the writer task sends it, batching everything
//! waiting into one vectored write. Replies may leave in any order (NBD
//! matches them by cookie); what must hold is that one reply's bytes are
//! never interleaved with another's, so only the holder of [`Wire`]'s lock
//! writes, and a reply the socket took in part is finished by the writer
//! task before anything else is written.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;
use gmd_core::buf::IoBuf;
use gmd_core::engine::{EngineError, OpKind, Request};
use gmd_core::runtime::CompletionSink;
use tokio::sync::{Notify, Semaphore};

use crate::proto::{nbd_error, simple_reply};
use crate::server::{BUDGET_UNIT, Export};

/// Largest reply (header and data) the finishing thread writes itself; a
/// larger read is copied into the socket by the writer task, off the
/// device thread.
const DIRECT_REPLY_BYTES_MAX: usize = 64 << 10;

/// Replies the writer task hands to one vectored write.
const BATCH_REPLIES_MAX: usize = 32;

/// The sending half of a client connection, written without blocking from
/// any thread.
pub(crate) trait ReplySocket: Send + Sync + 'static {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Waits until the socket may take more.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ReplySocket for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedWriteHalf::writable(self)
    }
}

impl ReplySocket for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
}

/// A finished request waiting for its reply.
pub(crate) struct Done {
    cookie: u64,
    kind: OpKind,
    budget_units: u64,
    error: u32,
    buf: Option<IoBuf>,
    admitted: bool,
}

impl Done {
    /// A request answered by the server itself (refused, or empty), never
    /// admitted to the device.
    pub(crate) fn immediate(cookie: u64, kind: OpKind, budget_units: u64, error: u32) -> Done {
        Done {
            cookie,
            kind,
            budget_units,
            error,
            buf: None,
            admitted: false,
        }
    }

    /// The data that follows the reply's header (a successful read's).
    fn data(&self) -> &[u8] {
        match &self.buf {
            Some(buf) if self.error == 0 && self.kind == OpKind::Read => buf,
            _ => &[],
        }
    }
}

/// A reply being written: its header and how many of its bytes are sent.
struct Unsent {
    header: [u8; 16],
    done: Done,
    sent: usize,
}

impl Unsent {
    fn new(done: Done) -> Unsent {
        Unsent {
            header: simple_reply(done.error, done.cookie),
            done,
            sent: 0,
        }
    }

    fn len(&self) -> usize {
        self.header.len() + self.done.data().len()
    }

    /// Puts the bytes still to send at the start of `iov` (room for two
    /// slices); returns how many slices it used.
    fn unsent_slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let data = self.done.data();
        if self.sent >= self.header.len() {
            iov[0] = IoSlice::new(&data[self.sent - self.header.len()..]);
            return 1;
        }
        iov[0] = IoSlice::new(&self.header[self.sent..]);
        if data.is_empty() {
            return 1;
        }
        iov[1] = IoSlice::new(data);
        2
    }
}

/// The socket and what is owed on it; holding the lock is the right to write.
struct Wire<S> {
    socket: Option<Arc<S>>,
    /// Replies taken for writing, in order; only the first may be partly sent.
    unsent: VecDeque<Unsent>,
    /// Why writing failed; later replies are dropped (their permits return).
    broken: Option<String>,
}

/// Per-connection state shared by the reader, the writer task and whoever
/// finishes a request.
pub(crate) struct Connection<S> {
    export: Arc<dyn Export>,
    /// Finished requests waiting for the writer task.
    done: ArrayQueue<Done>,
    /// Wakes the writer task: a reply queued, the reader done, or the last
    /// request finished after it.
    notify: Notify,
    wire: Mutex<Wire<S>>,
    /// Requests the connection may still have in flight.
    pub(crate) requests: Semaphore,
    /// Request data (in [`BUDGET_UNIT`]s) the connection may still hold.
    pub(crate) bytes: Semaphore,
    budget_units: u64,
    in_flight: AtomicUsize,
    reader_done: AtomicBool,
}

impl<S: ReplySocket> Connection<S> {
    /// A connection to `export` replying on `socket`.
    pub(crate) fn new(
        export: Arc<dyn Export>,
        socket: Arc<S>,
        requests_max: usize,
        budget_units: u64,
    ) -> Connection<S> {
        Connection {
            export,
            done: ArrayQueue::new(requests_max),
            notify: Notify::new(),
            wire: Mutex::new(Wire {
                socket: Some(socket),
                unsent: VecDeque::with_capacity(requests_max),
                broken: None,
            }),
            requests: Semaphore::new(requests_max),
            bytes: Semaphore::new(budget_units as usize),
            budget_units,
            in_flight: AtomicUsize::new(0),
            reader_done: AtomicBool::new(false),
        }
    }

    /// Counts a request the reader took (its permits already held).
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// The reader takes no more requests; the writer ends once the last reply is out.
    pub(crate) fn reader_done(&self) {
        self.reader_done.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Queues a reply for the writer task.
    pub(crate) fn push(&self, done: Done) {
        if self.done.push(done).is_err() {
            unreachable!("replies are bounded by the request permits");
        }
        self.notify.notify_one();
    }

    /// Writes `done`'s reply now, on this thread, if the socket is free and
    /// nothing is owed on it; gives it back otherwise.
    fn send_now(&self, done: Done) -> Option<Done> {
        let Ok(mut wire) = self.wire.try_lock() else {
            return Some(done);
        };
        if !wire.unsent.is_empty() || wire.broken.is_some() {
            return Some(done);
        }
        let Some(socket) = &wire.socket else {
            return Some(done);
        };
        let reply = Unsent::new(done);
        let mut iov = [IoSlice::new(&[]); 2];
        let slices = reply.unsent_slices(&mut iov);
        match socket.try_write_vectored(&iov[..slices]) {
            Ok(n) if n == reply.len() => {
                drop(wire);
                self.finish(reply.done);
            }
            Ok(n) => {
                // The socket took part of it: the writer task sends the rest
                // before anything else.
                wire.unsent.push_back(Unsent { sent: n, ..reply });
                drop(wire);
                self.notify.notify_one();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(reply.done),
            Err(e) => {
                wire.broken = Some(e.to_string());
                drop(wire);
                self.finish(reply.done);
            }
        }
        None
    }

    /// Gives back what a replied (or dropped) request held.
    fn finish(&self, done: Done) {
        drop(done.buf);
        if done.admitted {
            self.export.admission().add_permits(1);
        }
        if done.budget_units > 0 {
            self.bytes
                .add_permits(done.budget_units.min(self.budget_units) as usize);
        }
        self.requests.add_permits(1);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.reader_done.load(Ordering::SeqCst)
        {
            self.notify.notify_one();
        }
    }

    /// Writes the replies taken for writing on `socket` until they are
    /// out, the socket is full (true) or broken.
    fn write_unsent(&self, wire: &mut Wire<S>, socket: &S) -> bool {
        loop {
            if wire.unsent.is_empty() {
                return false;
            }
            if wire.broken.is_some() {
                while let Some(u) = wire.unsent.pop_front() {
                    self.finish(u.done);
                }
                return false;
            }
            let mut iov = [IoSlice::new(&[]); 2 * BATCH_REPLIES_MAX];
            let mut slices = 0;
            for u in wire.unsent.iter().take(BATCH_REPLIES_MAX) {
                slices += u.unsent_slices(&mut iov[slices..]);
            }
            match socket.try_write_vectored(&iov[..slices]) {
                // A stream socket that takes nothing of a non-empty write
                // is gone; never loop on it.
                Ok(0) => wire.broken = Some("the connection takes no more bytes".into()),
                Ok(mut n) => {
                    while n > 0 {
                        let first = wire
                            .unsent
                            .front_mut()
                            .expect("written bytes belong to a reply");
                        let left = first.len() - first.sent;
                        if n < left {
                            first.sent += n;
                            break;
                        }
                        n -= left;
                        let u = wire.unsent.pop_front().expect("checked above");
                        self.finish(u.done);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => wire.broken = Some(e.to_string()),
            }
        }
    }
}

impl<S: ReplySocket> CompletionSink for Connection<S> {
    fn complete(
        &self,
        tag: u64,
        request: &Request,
        result: Result<(), EngineError>,
        buf: Option<IoBuf>,
    ) {
        let budget_units = match request.kind {
            OpKind::Read | OpKind::Write => request.len_bytes.div_ceil(BUDGET_UNIT).max(1),
            _ => 0,
        };
        let done = Done {
            cookie: tag,
            kind: request.kind,
            budget_units,
            error: match result {
                Ok(()) => 0,
                Err(e) => nbd_error(e.errno()),
            },
            buf,
            admitted: true,
        };
        let alone = self.in_flight.load(Ordering::SeqCst) == 1;
        let small = 16 + done.data().len() <= DIRECT_REPLY_BYTES_MAX;
        let done = if alone && small {
            match self.send_now(done) {
                None => return,
                Some(done) => done,
            }
        } else {
            done
        };
        self.push(done);
    }
}

/// The connection's writer task: sends queued replies until the reader is
/// done and every request has been replied to.
pub(crate) async fn write_replies<S: ReplySocket>(conn: &Connection<S>) -> Result<(), String> {
    let socket = conn
        .wire
        .lock()
        .expect("wire lock")
        .socket
        .clone()
        .expect("the socket stays until the writer ends");
    loop {
        let full = {
            let mut wire = conn.wire.lock().expect("wire lock");
            while let Some(done) = conn.done.pop() {
                wire.unsent.push_back(Unsent::new(done));
            }
            conn.write_unsent(&mut wire, &socket)
        };
        if full {
            if let Err(e) = socket.writable().await {
                let mut wire = conn.wire.lock().expect("wire lock");
                wire.broken.get_or_insert(e.to_string());
            }
            continue;
        }
        if conn.reader_done.load(Ordering::SeqCst) && conn.in_flight.load(Ordering::SeqCst) == 0 {
            break;
        }
        conn.notify.notified().await;
    }
    let mut wire = conn.wire.lock().expect("wire lock");
    wire.socket = None;
    match wire.broken.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use gmd_core::buf::BufPool;
    use gmd_core::runtime::Submission;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::proto::SIMPLE_REPLY_MAGIC;

    const REQUESTS_MAX: usize = 8;

    struct NoExport {
        pool: BufPool,
        admission: Semaphore,
        fence: CancellationToken,
    }

    impl Export for NoExport {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn io_len_max(&self) -> u32 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn buffers(&self) -> &BufPool {
            &self.pool
        }
        fn admission(&self) -> &Semaphore {
            &self.admission
        }
        fn submit(&self, submission: Submission) -> Result<(), Submission> {
            Err(submission)
        }
        fn fence(&self) -> &CancellationToken {
            &self.fence
        }
    }

    /// A socket that takes at most `chunk` bytes per call and, when
    /// `stutter` is set, refuses one call in three (as a full socket does).
    #[derive(Default)]
    struct FakeSocket {
        out: Mutex<Vec<u8>>,
        chunk: usize,
        stutter: bool,
        calls: AtomicUsize,
    }

    impl ReplySocket for FakeSocket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.stutter && call % 3 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut out = self.out.lock().unwrap();
            let mut taken = 0;
            for b in bufs {
                let n = b.len().min(self.chunk - taken);
                out.extend_from_slice(&b[..n]);
                taken += n;
            }
            Ok(taken)
        }
        async fn writable(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn connection(socket: FakeSocket) -> (Arc<Connection<FakeSocket>>, Arc<FakeSocket>) {
        let socket = Arc::new(socket);
        let export = Arc::new(NoExport {
            pool: BufPool::new(),
            admission: Semaphore::new(0),
            fence: CancellationToken::new(),
        });
        let conn = Connection::new(export, socket.clone(), REQUESTS_MAX, 1024);
        (Arc::new(conn), socket)
    }

    fn read(len: u64) -> Request {
        Request {
            kind: OpKind::Read,
            offset_bytes: 0,
            len_bytes: len,
            fua: false,
        }
    }

    /// Takes a request's permits and counts it, as the reader does.
    fn start<S: ReplySocket>(conn: &Connection<S>, units: u32) {
        conn.requests.try_acquire().unwrap().forget();
        conn.bytes.try_acquire_many(units).unwrap().forget();
        conn.started();
    }

    /// Splits the written stream into replies: (cookie, data).
    fn replies(mut stream: &[u8], data_len: impl Fn(u64) -> usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !stream.is_empty() {
            assert!(stream.len() >= 16, "a reply cut short: {stream:?}");
            let magic = u32::from_be_bytes(stream[0..4].try_into().unwrap());
            assert_eq!(magic, SIMPLE_REPLY_MAGIC, "replies interleaved");
            let cookie = u64::from_be_bytes(stream[8..16].try_into().unwrap());
            let len = data_len(cookie);
            out.push((cookie, stream[16..16 + len].to_vec()));
            stream = &stream[16 + len..];
        }
        out
    }

    fn filled(len: usize, byte: u8) -> IoBuf {
        let mut buf = IoBuf::new(len);
        buf.fill(byte);
        buf
    }

    #[test]
    fn a_lone_request_is_answered_by_the_thread_that_finished_it() {
        let (conn, socket) = connection(FakeSocket {
            chunk: usize::MAX,
            ..FakeSocket::default()
        });
        start(&conn, 1);
        // A plain thread, no runtime and no writer task: the reply must
        // still reach the socket.
        let sink = conn.clone();
        std::thread::spawn(move || {
            sink.complete(7, &read(4096), Ok(()), Some(filled(4096, 0xab)));
        })
        .join()
        .unwrap();
        let out = socket.out.lock().unwrap().clone();
        assert_eq!(replies(&out, |_| 4096), vec![(7, vec![0xab; 4096])]);
        assert_eq!(socket.calls.load(Ordering::SeqCst), 1, "one system call");
        assert_eq!(conn.requests.available_permits(), REQUESTS_MAX);
        assert_eq!(conn.bytes.available_permits(), 1024);
        assert_eq!(conn.in_flight.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn replies_at_depth_wait_for_the_writer_task_which_sends_them_together() {
        let (conn, socket) = connection(FakeSocket {
            chunk: usize::MAX,
            ..FakeSocket::default()
        });
        for _ in 0..3 {
            start(&conn, 1);
        }
        for cookie in 1..=3 {
            conn.complete(
                cookie,
                &read(4096),
                Ok(()),
                Some(filled(4096, cookie as u8)),
            );
        }
        assert!(socket.out.lock().unwrap().is_empty(), "queued, not written");
        conn.reader_done();
        write_replies(&conn).await.unwrap();
        let out = socket.out.lock().unwrap().clone();
        let got = replies(&out, |_| 4096);
        assert_eq!(got.len(), 3);
        for (cookie, data) in got {
            assert_eq!(data, vec![cookie as u8; 4096]);
        }
        assert_eq!(socket.calls.load(Ordering::SeqCst), 1, "one vectored write");
        assert_eq!(conn.requests.available_permits(), REQUESTS_MAX);
    }

    /// A socket that takes a few bytes at a time and is often full: every
    /// reply still arrives whole, never cut by another, whether its
    /// finishing thread or the writer task started it.
    #[test]
    fn a_reply_taken_in_part_is_finished_before_any_other() {
        let (conn, socket) = connection(FakeSocket {
            chunk: 700,
            stutter: true,
            ..FakeSocket::default()
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let writer = {
            let conn = conn.clone();
            runtime.spawn(async move { write_replies(&conn).await })
        };
        let len = |cookie: u64| 512 * (1 + cookie as usize % 8);
        let mut expected = Vec::new();
        for round in 0..200u64 {
            // Alone (the finishing thread writes) or two at once (queued).
            let depth = 1 + round % 2;
            for _ in 0..depth {
                start(&conn, 1);
            }
            let finishers: Vec<_> = (0..depth)
                .map(|i| {
                    let cookie = round * 2 + i;
                    expected.push((cookie, vec![cookie as u8; len(cookie)]));
                    let sink = conn.clone();
                    std::thread::spawn(move || {
                        let buf = filled(len(cookie), cookie as u8);
                        sink.complete(cookie, &read(len(cookie) as u64), Ok(()), Some(buf));
                    })
                })
                .collect();
            for f in finishers {
                f.join().unwrap();
            }
            // Like a client, wait for the replies before asking again.
            while conn.in_flight.load(Ordering::SeqCst) > 0 {
                std::thread::yield_now();
            }
        }
        conn.reader_done();
        runtime.block_on(writer).unwrap().unwrap();
        let out = socket.out.lock().unwrap().clone();
        let mut got = replies(&out, len);
        got.sort();
        assert_eq!(got, expected);
        assert_eq!(conn.requests.available_permits(), REQUESTS_MAX);
        assert_eq!(conn.bytes.available_permits(), 1024);
    }

    #[tokio::test]
    async fn a_broken_socket_still_gives_every_permit_back() {
        struct Broken;
        impl ReplySocket for Broken {
            fn try_write_vectored(&self, _: &[IoSlice<'_>]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            async fn writable(&self) -> io::Result<()> {
                Ok(())
            }
        }
        let export = Arc::new(NoExport {
            pool: BufPool::new(),
            admission: Semaphore::new(0),
            fence: CancellationToken::new(),
        });
        let conn = Arc::new(Connection::new(export, Arc::new(Broken), REQUESTS_MAX, 16));
        for _ in 0..3 {
            start(&conn, 1);
        }
        // The first alone would go straight out; two more queue behind it.
        conn.complete(1, &read(4096), Ok(()), Some(filled(4096, 1)));
        conn.complete(2, &read(4096), Ok(()), Some(filled(4096, 2)));
        conn.complete(3, &read(4096), Ok(()), Some(filled(4096, 3)));
        conn.reader_done();
        let err = write_replies(&conn).await.unwrap_err();
        assert!(err.contains("pipe"), "{err}");
        assert_eq!(conn.requests.available_permits(), REQUESTS_MAX);
        assert_eq!(conn.bytes.available_permits(), 16);
        assert_eq!(conn.in_flight.load(Ordering::SeqCst), 0);
    }
}
