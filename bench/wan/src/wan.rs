//! Two namespaces joined by an emulated link, and the forwarder between them.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::link::{Link, LinkParams, LinkStats};
use crate::netns;

/// The TUN device's name inside each namespace.
pub const TUN_NAME: &str = "wan0";

/// What [`Wan::up`] builds.
#[derive(Clone, Debug)]
pub struct WanConfig {
    /// Namespace of side A.
    pub ns_a: String,
    /// Namespace of side B.
    pub ns_b: String,
    /// Address of side A (on its TUN device).
    pub addr_a: Ipv4Addr,
    /// Address of side B.
    pub addr_b: Ipv4Addr,
    /// MTU of both TUN devices.
    pub mtu: u32,
    /// The direction A → B.
    pub a_to_b: LinkParams,
    /// The direction B → A.
    pub b_to_a: LinkParams,
    /// Seed of the random loss, jitter and reordering (B → A uses seed + 1).
    pub seed: u64,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            ns_a: "wanA".into(),
            ns_b: "wanB".into(),
            addr_a: Ipv4Addr::new(10, 77, 0, 1),
            addr_b: Ipv4Addr::new(10, 77, 0, 2),
            mtu: 1500,
            a_to_b: LinkParams::default(),
            b_to_a: LinkParams::default(),
            seed: 1,
        }
    }
}

/// A running emulated WAN; dropping it stops the forwarder and deletes the
/// namespaces (processes still inside them keep running, unreachable).
pub struct Wan {
    config: WanConfig,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<[LinkStats; 2]>>>,
}

impl Wan {
    /// Creates both namespaces and TUN devices, configures addresses and
    /// starts forwarding. Fails if either namespace already exists.
    pub fn up(config: WanConfig) -> io::Result<Wan> {
        for ns in [&config.ns_a, &config.ns_b] {
            if netns::exists(ns) {
                return Err(io::Error::other(format!(
                    "namespace {ns} exists (gmd-wan down --ns-a {} --ns-b {})",
                    config.ns_a, config.ns_b
                )));
            }
        }
        let mut wan = Wan {
            config,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        // From here on a failure drops `wan`, which deletes what exists.
        let c = wan.config.clone();
        let mut fds = Vec::new();
        for (ns, local, peer) in [(&c.ns_a, c.addr_a, c.addr_b), (&c.ns_b, c.addr_b, c.addr_a)] {
            netns::add(ns)?;
            fds.push(netns::run_in(ns, || netns::open_tun(TUN_NAME))??);
            let (local, peer, mtu) = (
                format!("{local}/32"),
                format!("{peer}/32"),
                c.mtu.to_string(),
            );
            netns::ip(&["-n", ns, "link", "set", "lo", "up"])?;
            netns::ip(&[
                "-n", ns, "addr", "add", &local, "peer", &peer, "dev", TUN_NAME,
            ])?;
            netns::ip(&[
                "-n",
                ns,
                "link",
                "set",
                TUN_NAME,
                "mtu",
                &mtu,
                "txqueuelen",
                "1000",
                "up",
            ])?;
        }
        let fd_b = fds.pop().expect("b");
        let fd_a = fds.pop().expect("a");
        let links = [
            Link::new(c.a_to_b.clone(), c.seed),
            Link::new(c.b_to_a.clone(), c.seed.wrapping_add(1)),
        ];
        let stop = wan.stop.clone();
        let mtu = c.mtu as usize;
        wan.thread = Some(
            std::thread::Builder::new()
                .name("gmd-wan-fwd".into())
                .spawn(move || forward([fd_a, fd_b], links, mtu, &stop))?,
        );
        Ok(wan)
    }

    /// The configuration it runs.
    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    /// Stops forwarding, deletes the namespaces and returns the counters of
    /// A → B and B → A.
    pub fn down(mut self) -> io::Result<[LinkStats; 2]> {
        let stats = self.stop_forwarder();
        let del = self.delete();
        let stats = stats?;
        del?;
        Ok(stats)
    }

    fn stop_forwarder(&mut self) -> io::Result<[LinkStats; 2]> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("forwarder panicked"))?,
            None => Ok(Default::default()),
        }
    }

    fn delete(&self) -> io::Result<()> {
        let a = netns::delete(&self.config.ns_a);
        let b = netns::delete(&self.config.ns_b);
        a.and(b)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = self.stop_forwarder();
        let _ = self.delete();
    }
}

/// The longest the forwarder sleeps before looking at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);
/// Packets read from one device per wake-up, at most.
const READ_BATCH: usize = 256;

/// Carries packets between the TUN devices until `stop`: fds\[0\] → links\[0\]
/// → fds\[1\], fds\[1\] → links\[1\] → fds\[0\].
fn forward(
    fds: [OwnedFd; 2],
    mut links: [Link; 2],
    mtu: usize,
    stop: &AtomicBool,
) -> io::Result<[LinkStats; 2]> {
    let start = Instant::now();
    let mut buf = vec![0u8; mtu.max(1500) + 64];
    let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd()];
    while !stop.load(Ordering::Relaxed) {
        let now = start.elapsed();
        for (dir, link) in links.iter_mut().enumerate() {
            while let Some(p) = link.pop_due(now) {
                // SAFETY: writing an owned buffer to an open fd.
                let n = unsafe { libc::write(raw[1 - dir], p.as_ptr().cast(), p.len()) };
                // A packet the stack refuses (or a full device) is lost,
                // as on a real link.
                let _ = n;
            }
        }
        let next = links.iter().filter_map(Link::next_deadline).min();
        let wait = next.map_or(STOP_CHECK, |t| t.saturating_sub(now).min(STOP_CHECK));
        let mut pfd = raw.map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: two valid pollfds, a valid timespec, no signal mask.
        let r = unsafe { libc::ppoll(pfd.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (dir, p) in pfd.iter_mut().enumerate() {
            if p.revents == 0 {
                continue;
            }
            for _ in 0..READ_BATCH {
                // SAFETY: reading into an owned buffer from an open fd.
                let n = unsafe { libc::read(raw[dir], buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                links[dir].push(start.elapsed(), buf[..n as usize].to_vec());
            }
        }
    }
    Ok([links[0].stats(), links[1].stats()])
}
