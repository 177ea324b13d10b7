//! The remote path of a mirrored write allocates nothing per message: two
//! nodes on loopback exchange a 4 KiB write and its small answer, one at a
//! time, as a device link does (each message carved from an arena, each
//! received one dropped with its receipt once taken), and every heap
//! allocation of the process is counted. Own test binary: the counting
//! allocator is global.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BufMut;
use gmd_net::arena::Arenas;
use gmd_net::testing::cluster_config;
use gmd_net::{Node, StreamId, Tuning};

/// Counts every allocation and reallocation of the process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WRITE: usize = 4096 + 43; // a 4 KiB write with the device's headers
const ANSWER: usize = 21;
const WARM: u32 = 500;
const COUNTED: u32 = 3000;

fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

/// One message of `len` bytes carved from `arenas`, as a device link
/// encodes one.
fn carve(arenas: &mut Arenas, len: usize, fill: u8) -> bytes::Bytes {
    let buf = arenas.arena(len);
    buf.put_bytes(fill, len);
    buf.split().freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_and_its_answer_allocate_nothing_once_warm() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let addrs = vec![vec![free_addr()], vec![free_addr()]];
        let config = |i| {
            cluster_config(
                i,
                &addrs,
                1400,
                Duration::from_secs(30),
                true,
                Tuning::default(),
            )
        };
        let a = Node::start(config(0)).expect("node a");
        let b = Node::start(config(1)).expect("node b");
        let (to_b, to_a) = (a.peer("m1").expect("m1"), b.peer("m0").expect("m0"));
        let mut rx_a = a.register_stream(StreamId(7)).await.expect("register");
        let mut rx_b = b.register_stream(StreamId(7)).await.expect("register");
        let answerer = tokio::spawn(async move {
            let mut arenas = Arenas::new(4, 256 << 10, false);
            while let Some(write) = rx_b.recv().await {
                assert_eq!(write.body.len(), WRITE);
                drop(write);
                let answer = carve(&mut arenas, ANSWER, 2);
                if b.post(to_a, StreamId(7), answer).await.is_err() {
                    break;
                }
            }
            b
        });
        let mut arenas = Arenas::new(4, 256 << 10, false);
        let mut before = 0;
        for i in 0..WARM + COUNTED {
            if i == WARM {
                before = ALLOCATIONS.load(Ordering::Relaxed);
            }
            let write = carve(&mut arenas, WRITE, 1);
            a.post(to_b, StreamId(7), write).await.expect("post");
            let answer = rx_a.recv().await.expect("an answer");
            assert_eq!(answer.body.len(), ANSWER);
        }
        let per_write = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / f64::from(COUNTED);
        eprintln!("{per_write:.3} allocations per write and answer (both nodes)");
        a.shutdown().await;
        drop(answerer);
        // Timers and counters may allocate now and then; a step of the
        // path that allocates for every message makes this 1 or more.
        assert!(
            per_write < 0.5,
            "{per_write:.2} allocations per write and answer (both nodes)"
        );
    })
    .await
    .expect("test timed out");
}
