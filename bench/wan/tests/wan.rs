//! The emulator end to end: two namespaces, TCP across the link (needs root,
//! /dev/net/tun and `ip`; fails, never skips, without them).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gmd_wan::link::LinkParams;
use gmd_wan::{Wan, WanConfig, netns};

const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Namespace names unique to this process and call, so runs can overlap.
fn names() -> (String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = format!("gwt{}x{n}", std::process::id());
    (format!("{id}a"), format!("{id}b"))
}

fn listed(ns: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the WAN emulator test needs root (network namespaces, TUN)"
    );
}

/// Echo ('E', 64-byte messages) or sink ('B': counts bytes to EOF, answers
/// with the count) for `conns` connections.
fn serve(l: TcpListener, conns: usize) {
    for _ in 0..conns {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.set_nodelay(true).unwrap();
        let mut mode = [0u8; 1];
        c.read_exact(&mut mode).unwrap();
        if mode[0] == b'E' {
            let mut buf = [0u8; 64];
            while c.read_exact(&mut buf).is_ok() {
                c.write_all(&buf).unwrap();
            }
        } else {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match c.read(&mut buf).unwrap() {
                    0 => break,
                    k => n += k as u64,
                }
            }
            c.write_all(&n.to_be_bytes()).unwrap();
        }
    }
}

fn connect(ns: &str, to: SocketAddr) -> TcpStream {
    let s = netns::run_in(ns, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[test]
fn tcp_crosses_the_link_with_its_delay_and_rate() {
    require_root();
    let (a, b) = names();
    let rate = 20_000_000u64;
    let mut p = LinkParams {
        delay: Duration::from_millis(20),
        rate_bps: Some(rate),
        ..LinkParams::default()
    };
    p.queue_bytes = p.bdp_bytes().unwrap().max(64 * 1500);
    let wan = Wan::up(WanConfig {
        ns_a: a.clone(),
        ns_b: b.clone(),
        a_to_b: p.clone(),
        b_to_a: p,
        ..WanConfig::default()
    })
    .unwrap();
    assert!(listed(&a) && listed(&b));

    let l = netns::run_in(&b, || TcpListener::bind((ADDR_B, 0)))
        .unwrap()
        .unwrap();
    let to = l.local_addr().unwrap();
    let server = std::thread::spawn(move || serve(l, 2));

    // Round trips: each crosses the link twice.
    let mut s = connect(&a, to);
    s.write_all(b"E").unwrap();
    let mut rtts = Vec::new();
    let mut buf = [7u8; 64];
    for _ in 0..10 {
        let t = Instant::now();
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap();
        rtts.push(t.elapsed());
    }
    drop(s);
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    eprintln!("RTT over 2 x 20 ms: median {median:?}, all {rtts:?}");
    assert!(
        median >= Duration::from_millis(35),
        "the delay is not applied: median RTT {median:?}"
    );

    // Bulk: 3 MB at 20 Mbit/s takes 1.2 s at the very least.
    let total = 3_000_000usize;
    let mut s = connect(&a, to);
    let t = Instant::now();
    s.write_all(b"B").unwrap();
    let chunk = vec![0x5au8; 1 << 16];
    let mut left = total;
    while left > 0 {
        let k = left.min(chunk.len());
        s.write_all(&chunk[..k]).unwrap();
        left -= k;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    let took = t.elapsed();
    assert_eq!(u64::from_be_bytes(n), total as u64);
    let ideal = Duration::from_secs_f64(total as f64 * 8.0 / rate as f64);
    eprintln!(
        "3 MB at 20 Mbit/s: {took:?} (ideal {ideal:?}, {:.1} Mbit/s)",
        total as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    assert!(
        took >= ideal.mul_f64(0.8),
        "the rate is not applied: {took:?} for {total} bytes"
    );
    server.join().unwrap();

    let stats = wan.down().unwrap();
    eprintln!("A->B {:?}\nB->A {:?}", stats[0], stats[1]);
    assert!(stats[0].bytes_out >= total as u64);
    assert!(!listed(&a) && !listed(&b), "namespaces left behind");
}

#[test]
fn up_refuses_an_existing_namespace_and_drop_cleans_up() {
    require_root();
    let (a, b) = names();
    let config = WanConfig {
        ns_a: a.clone(),
        ns_b: b.clone(),
        ..WanConfig::default()
    };
    let wan = Wan::up(config.clone()).unwrap();
    let err = Wan::up(config).err().expect("second up refused");
    assert!(err.to_string().contains("exists"), "{err}");
    // The refused second `up` did not delete the first one's namespaces.
    assert!(listed(&a) && listed(&b));
    drop(wan);
    assert!(!listed(&a) && !listed(&b), "namespaces left behind");
}

#[test]
fn tcp_survives_loss_and_reordering_and_the_link_counts_them() {
    require_root();
    let (a, b) = names();
    let p = LinkParams {
        delay: Duration::from_millis(5),
        loss: 0.01,
        reorder: 0.02,
        reorder_extra: Duration::from_millis(3),
        ..LinkParams::default()
    };
    let wan = Wan::up(WanConfig {
        ns_a: a.clone(),
        ns_b: b.clone(),
        a_to_b: p.clone(),
        b_to_a: p,
        seed: 42,
        ..WanConfig::default()
    })
    .unwrap();
    let l = netns::run_in(&b, || TcpListener::bind((ADDR_B, 0)))
        .unwrap()
        .unwrap();
    let to = l.local_addr().unwrap();
    let server = std::thread::spawn(move || serve(l, 1));
    let total = 2_000_000usize;
    let mut s = connect(&a, to);
    s.write_all(b"B").unwrap();
    s.write_all(&vec![1u8; total]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    assert_eq!(u64::from_be_bytes(n), total as u64, "every byte arrived");
    server.join().unwrap();
    let st = wan.down().unwrap();
    eprintln!("A->B {:?}\nB->A {:?}", st[0], st[1]);
    // ~1400 data packets: about 14 lost and 28 held back (loose bounds).
    assert!(st[0].lost > 0 && st[0].reordered > 0, "{:?}", st[0]);
    assert!(st[0].lost < st[0].packets_in / 20, "{:?}", st[0]);
    assert!(!listed(&a) && !listed(&b), "namespaces left behind");
}
