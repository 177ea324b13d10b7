//! A fault-injecting UDP relay for one path between two endpoints on real
//! sockets: machine A is configured to reach B at [`Relay::addr_for_a`], B to
//! reach A at [`Relay::addr_for_b`]. Datagrams can be dropped entirely (path
//! cut), with a probability, or above a size (a hop of a smaller MTU that
//! drops don't-fragment packets), in either direction.
//!
//! Two threads, each bounded by a read timeout so that dropping the relay
//! stops them within 50 ms.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Shared knobs of a running relay.
#[derive(Debug, Default)]
pub struct RelayControl {
    /// Drop everything (the path is cut).
    pub cut: AtomicBool,
    /// Drop this many datagrams per million, pseudo-randomly.
    pub loss_ppm: AtomicU32,
    /// Drop datagrams larger than this many bytes; 0 = none.
    pub datagram_max: AtomicUsize,
    /// Datagrams forwarded.
    pub forwarded: AtomicU64,
    /// Datagrams dropped.
    pub dropped: AtomicU64,
    stop: AtomicBool,
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// Knobs.
    pub control: Arc<RelayControl>,
    addr_for_a: SocketAddr,
    addr_for_b: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `a` and `b`, binding two sockets on `bind_ip`.
    ///
    /// # Errors
    /// Socket errors.
    pub fn start(
        bind_ip: std::net::IpAddr,
        a: SocketAddr,
        b: SocketAddr,
    ) -> std::io::Result<Relay> {
        let sa = UdpSocket::bind((bind_ip, 0))?;
        let sb = UdpSocket::bind((bind_ip, 0))?;
        sa.set_read_timeout(Some(Duration::from_millis(50)))?;
        sb.set_read_timeout(Some(Duration::from_millis(50)))?;
        let control = Arc::new(RelayControl::default());
        let addr_for_a = sa.local_addr()?;
        let addr_for_b = sb.local_addr()?;
        let sa = Arc::new(sa);
        let sb = Arc::new(sb);
        let t1 = spawn_half(sa.clone(), sb.clone(), b, control.clone(), 0x9E37_79B9);
        let t2 = spawn_half(sb, sa, a, control.clone(), 0x85EB_CA6B);
        Ok(Relay {
            control,
            addr_for_a,
            addr_for_b,
            threads: vec![t1, t2],
        })
    }

    /// The address A must use for B.
    pub fn addr_for_a(&self) -> SocketAddr {
        self.addr_for_a
    }

    /// The address B must use for A.
    pub fn addr_for_b(&self) -> SocketAddr {
        self.addr_for_b
    }

    /// Cuts or restores the path.
    pub fn set_cut(&self, cut: bool) {
        self.control.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn_half(
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    dest: SocketAddr,
    control: Arc<RelayControl>,
    seed: u64,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut x = seed;
        while !control.stop.load(Ordering::Relaxed) {
            let Ok((n, _)) = from.recv_from(&mut buf) else {
                continue;
            };
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ppm = u64::from(control.loss_ppm.load(Ordering::Relaxed));
            let max = control.datagram_max.load(Ordering::Relaxed);
            if control.cut.load(Ordering::Relaxed) || x % 1_000_000 < ppm || (max > 0 && n > max) {
                control.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if to.send_to(&buf[..n], dest).is_ok() {
                control.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}
