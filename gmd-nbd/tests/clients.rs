//! The NBD server against real clients (nbdinfo, qemu-io) and against
//! hand-written misbehaving ones, over a memory-backed export.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gmd_core::buf::BufPool;
use gmd_core::engine::{EngineError, OpKind};
use gmd_core::runtime::Submission;
use gmd_nbd::proto::*;
use gmd_nbd::{Export, Lease, Limits, Listener, Registry, Server};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 64 << 20;

struct MemExport {
    data: Mutex<Vec<u8>>,
    pool: BufPool,
    admission: Semaphore,
    fence: CancellationToken,
}

impl Export for MemExport {
    fn size_bytes(&self) -> u64 {
        SIZE
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn io_len_max(&self) -> u32 {
        4 << 20
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
    fn fence(&self) -> &CancellationToken {
        &self.fence
    }
    fn submit(&self, mut s: Submission) -> Result<(), Submission> {
        let r = s.request;
        let result = if r.kind != OpKind::Flush
            && (r.offset_bytes + r.len_bytes > SIZE
                || r.offset_bytes % 512 != 0
                || r.len_bytes % 512 != 0)
        {
            Err(EngineError::Misaligned {
                offset_bytes: r.offset_bytes,
                len_bytes: r.len_bytes,
                block_size: 512,
            })
        } else {
            let mut data = self.data.lock().unwrap();
            let range = r.offset_bytes as usize..(r.offset_bytes + r.len_bytes) as usize;
            match r.kind {
                OpKind::Read => s.buf.as_mut().unwrap().copy_from_slice(&data[range]),
                OpKind::Write => data[range].copy_from_slice(s.buf.as_ref().unwrap()),
                OpKind::WriteZeroes | OpKind::Trim => data[range].fill(0),
                OpKind::Flush => {}
            }
            Ok(())
        };
        s.sink.complete(s.tag, &r, result, s.buf);
        Ok(())
    }
}

struct MemRegistry {
    export: Arc<MemExport>,
    leases: Arc<Mutex<u32>>,
}

struct CountedLease(Arc<Mutex<u32>>);
impl Drop for CountedLease {
    fn drop(&mut self) {
        *self.0.lock().unwrap() -= 1;
    }
}

impl Registry for MemRegistry {
    fn list(&self) -> Vec<String> {
        vec!["mem".into()]
    }
    fn describe(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name == "mem").then(|| self.export.clone() as Arc<dyn Export>)
    }
    fn open(&self, name: &str) -> Option<(Arc<dyn Export>, Lease)> {
        let export = self.describe(name)?;
        *self.leases.lock().unwrap() += 1;
        Some((export, Box::new(CountedLease(self.leases.clone()))))
    }
}

struct Fixture {
    addr: SocketAddr,
    leases: Arc<Mutex<u32>>,
    shutdown: CancellationToken,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn serve() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let export = Arc::new(MemExport {
        data: Mutex::new(vec![0; SIZE as usize]),
        pool: BufPool::new(),
        admission: Semaphore::new(256),
        fence: CancellationToken::new(),
    });
    let leases = Arc::new(Mutex::new(0));
    let registry = Arc::new(MemRegistry {
        export,
        leases: leases.clone(),
    });
    let shutdown = CancellationToken::new();
    let limits = Limits {
        handshake_timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let server = Server::new(registry, limits, shutdown.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(server.serve(Listener::Tcp(listener)));
    Fixture {
        addr,
        leases,
        shutdown,
        _rt: rt,
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install it: see .ci/run)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn nbdinfo_lists_and_describes_the_export() {
    let f = serve();
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", f.addr)));
    assert!(
        list.contains("export=\"mem\"") || list.contains("mem"),
        "{list}"
    );
    let info = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("nbd://{}/mem", f.addr)));
    assert!(info.contains(&format!("\"export-size\": {SIZE}")), "{info}");
    assert!(info.contains("\"block_size_minimum\": 512"), "{info}");
    assert!(info.contains("\"can_multi_conn\": true"), "{info}");
    assert!(info.contains("\"can_fua\": true"), "{info}");
}

#[test]
fn qemu_io_writes_patterns_and_reads_them_back() {
    let f = serve();
    let url = format!("nbd://{}/mem", f.addr);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", &url])
        .args(["-c", "write -P 0xab 0 1M"])
        .args(["-c", "write -f -P 0xcd 1M 64k"])
        .args(["-c", "aio_write -P 0x11 2M 128k"])
        .args(["-c", "aio_write -P 0x22 3M 128k"])
        .args(["-c", "aio_flush"])
        .args(["-c", "write -z 4k 4k"])
        .args(["-c", "discard 8k 8k"])
        .args(["-c", "flush"])
        .args(["-c", "read -P 0xab 0 4k"])
        .args(["-c", "read -P 0 4k 12k"])
        .args(["-c", "read -P 0xab 16k 1008k"])
        .args(["-c", "read -P 0xcd 1M 64k"])
        .args(["-c", "read -P 0x11 2M 128k"])
        .args(["-c", "read -P 0x22 3M 128k"])
        .args(["-c", "write -P 0x33 1000 100"])
        .args(["-c", "read -P 0x33 1000 100"])
        .args(["-c", "read -P 0xab 0 1000"]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
}

fn hello(stream: &mut TcpStream) {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBD_MAGIC.to_be_bytes());
    stream
        .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut out = Vec::new();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out).unwrap();
}

fn read_option_reply(stream: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut data = vec![0; len as usize];
    stream.read_exact(&mut data).unwrap();
    (reply, data)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn connect(f: &Fixture) -> TcpStream {
    let s = TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn go(f: &Fixture) -> TcpStream {
    let mut s = connect(f);
    hello(&mut s);
    send_option(&mut s, OPT_GO, &go_data("mem", &[INFO_BLOCK_SIZE]));
    loop {
        let (reply, _) = read_option_reply(&mut s);
        if reply == REP_ACK {
            return s;
        }
        assert_eq!(reply, REP_INFO);
    }
}

#[test]
fn go_needs_block_sizes_and_a_known_export() {
    let f = serve();
    let mut s = connect(&f);
    hello(&mut s);
    send_option(&mut s, OPT_GO, &go_data("mem", &[]));
    assert_eq!(read_option_reply(&mut s).0, REP_ERR_BLOCK_SIZE_REQD);
    send_option(&mut s, OPT_GO, &go_data("nope", &[INFO_BLOCK_SIZE]));
    let (reply, msg) = read_option_reply(&mut s);
    assert_eq!(reply, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    send_option(&mut s, 999, &[]);
    assert_eq!(read_option_reply(&mut s).0, REP_ERR_UNSUP);
    send_option(&mut s, OPT_GO, &[1, 2, 3]);
    assert_eq!(read_option_reply(&mut s).0, REP_ERR_INVALID);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(read_option_reply(&mut s).0, REP_ACK);
}

fn request(kind: u16, cookie: u64, offset: u64, length: u32, flags: u16) -> [u8; 28] {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
    .encode()
}

fn read_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(head[4..8].try_into().unwrap()),
        u64::from_be_bytes(head[8..16].try_into().unwrap()),
    )
}

#[test]
fn pipelined_requests_all_get_their_replies() {
    let f = serve();
    let mut s = go(&f);
    // 300 writes sent back to back (more than the per-connection window).
    let mut out = Vec::new();
    for i in 0..300u64 {
        out.extend_from_slice(&request(
            CMD_WRITE,
            1000 + i,
            i * 4096,
            4096,
            if i % 3 == 0 { CMD_FLAG_FUA } else { 0 },
        ));
        out.extend_from_slice(&[i as u8; 4096]);
    }
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&out).unwrap());
    let mut cookies: Vec<u64> = (0..300)
        .map(|_| {
            let (e, c) = read_reply(&mut s);
            assert_eq!(e, 0);
            c
        })
        .collect();
    sender.join().unwrap();
    cookies.sort();
    assert_eq!(cookies, (1000..1300).collect::<Vec<_>>());
    // Read one back, then an out-of-range read and an unknown command fail alone.
    s.write_all(&request(CMD_READ, 7, 299 * 4096, 4096, 0))
        .unwrap();
    let (e, c) = read_reply(&mut s);
    assert_eq!((e, c), (0, 7));
    let mut data = [0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 299u64 as u8));
    s.write_all(&request(CMD_READ, 8, SIZE, 4096, 0)).unwrap();
    assert_eq!(read_reply(&mut s), (EINVAL, 8));
    s.write_all(&request(77, 9, 0, 0, 0)).unwrap();
    assert_eq!(read_reply(&mut s), (EINVAL, 9));
    s.write_all(&request(CMD_READ, 10, 0, 1 << 30, 0)).unwrap();
    assert_eq!(read_reply(&mut s), (EOVERFLOW, 10));
    s.write_all(&request(CMD_DISC, 11, 0, 0, 0)).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn garbage_disconnects_only_its_sender() {
    let f = serve();
    let mut good = go(&f);
    assert_eq!(*f.leases.lock().unwrap(), 1);
    // Garbage during the handshake.
    let mut bad = connect(&f);
    hello(&mut bad);
    bad.write_all(b"this is not an NBD option at all").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    // Garbage during transmission.
    let mut bad2 = go(&f);
    bad2.write_all(&[0xffu8; 28]).unwrap();
    let mut rest = Vec::new();
    let n = bad2.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "no reply to garbage, just a disconnect");
    // The well-behaved client is unaffected.
    good.write_all(&request(CMD_WRITE, 1, 0, 512, 0)).unwrap();
    good.write_all(&[5u8; 512]).unwrap();
    assert_eq!(read_reply(&mut good), (0, 1));
    good.write_all(&request(CMD_FLUSH, 2, 0, 0, 0)).unwrap();
    assert_eq!(read_reply(&mut good), (0, 2));
    drop(good);
    for _ in 0..100 {
        if *f.leases.lock().unwrap() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("leases were not released after the clients left");
}

/// A client that asks for far more than the socket holds, reads none of it
/// and hangs up: the replies the server was writing (from its writer task
/// and from the threads that finished the reads) fail, every permit comes
/// back, the connection ends, and the next client is served.
#[test]
fn a_client_that_stops_reading_and_hangs_up_frees_its_connection() {
    let f = serve();
    let mut s = go(&f);
    let mut out = Vec::new();
    for i in 0..48u64 {
        // 1 MiB reads (48 MiB of replies) with small ones between them.
        out.extend_from_slice(&request(CMD_READ, 100 + i, i << 20, 1 << 20, 0));
        out.extend_from_slice(&request(CMD_READ, 200 + i, i * 4096, 4096, 0));
    }
    s.write_all(&out).unwrap();
    // Let the server fill the socket and wait for room.
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while *f.leases.lock().unwrap() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection of a client that hung up was never released"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut next = go(&f);
    next.write_all(&request(CMD_WRITE, 1, 4096, 4096, 0))
        .unwrap();
    next.write_all(&[9u8; 4096]).unwrap();
    assert_eq!(read_reply(&mut next), (0, 1));
    next.write_all(&request(CMD_READ, 2, 4096, 4096, 0))
        .unwrap();
    assert_eq!(read_reply(&mut next), (0, 2));
    let mut data = [0u8; 4096];
    next.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 9));
}
