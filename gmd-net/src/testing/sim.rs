//! Deterministic, seeded network simulator for the sans-IO core, and a
//! scenario runner that checks GeoMessage's properties.
//!
//! Time is virtual: the simulator jumps from one event (datagram delivery,
//! endpoint timer, workload action, fault) to the next, so seconds of
//! simulated WAN time cost milliseconds. Everything random comes from one
//! `StdRng` seeded by the scenario seed, so a failing seed replays exactly:
//! `GMD_SIM_SEED=1234 cargo nextest run -p gmd-net sim`.
//!
//! Links are one per (network, sender, receiver) with latency, jitter (which
//! reorders), loss, duplication, a bandwidth limit with a 100 ms tail-drop
//! queue, and up/down state. A partition takes every network down.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{NetworkId, PeerId, Tuning};
use crate::proto::{Endpoint, Event, IncomingKind, PeerFootprint, RequestId};
use crate::wire::ACK_RANGES_MAX;
use crate::{NetError, StreamId};

/// Behaviour of one directed link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Base one-way latency.
    pub latency: Duration,
    /// Extra uniformly random latency in `0..jitter` (reorders datagrams).
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
    /// Bytes per second; 0 = unlimited.
    pub bandwidth_bytes_per_sec: u64,
    /// Largest datagram (UDP payload) the link carries; larger ones are
    /// dropped, as a hop drops a don't-fragment packet above its MTU. 0 =
    /// any size.
    pub datagram_max: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            bandwidth_bytes_per_sec: 0,
            datagram_max: 0,
        }
    }
}

/// Queue depth of a bandwidth-limited link before tail drop.
const LINK_QUEUE_TIME: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Link {
    params: LinkParams,
    busy_until: Option<Instant>,
}

#[derive(Debug)]
struct InFlight {
    to: usize,
    from: usize,
    network: usize,
    data: Vec<u8>,
    /// Copies of one sent datagram share a group.
    group: u64,
}

/// One simulated machine.
#[derive(Debug)]
pub struct SimNode {
    /// Its endpoint (replaced on restart).
    pub endpoint: Endpoint,
    /// Restarts so far.
    pub incarnation: u32,
    /// Events seen, with time.
    pub events: Vec<(Instant, Event)>,
}

/// The simulator.
#[derive(Debug)]
pub struct Sim {
    /// Seeded randomness for the network and the workload.
    pub rng: StdRng,
    /// Virtual time now.
    pub now: Instant,
    /// Virtual time zero.
    pub start: Instant,
    /// Machines.
    pub nodes: Vec<SimNode>,
    networks: usize,
    links: Vec<Link>,
    network_up: Vec<bool>,
    /// Partition: nothing crosses any network.
    pub partitioned: bool,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: BTreeMap<u64, InFlight>,
    next_packet: u64,
    configs: Vec<crate::NetConfig>,
    /// Last time a datagram (first arriving copy) from `from` was delivered to `to`:
    /// `last_delivery[to][from]`.
    pub last_delivery: Vec<Vec<Option<Instant>>>,
    /// Datagrams delivered.
    pub delivered: u64,
    groups_delivered: std::collections::BTreeSet<u64>,
    /// Print every datagram sent (`GMD_SIM_TRACE=1`).
    trace: bool,
    /// Datagrams dropped by loss, queue or down links.
    pub dropped: u64,
    /// Per machine: stalled until then (a host that is not scheduled):
    /// it receives, sends and times out nothing, and what arrives for it
    /// waits, in order.
    stalled_until: Vec<Option<Instant>>,
    buf: Vec<u8>,
    seed: u64,
}

fn sim_addr(machine: usize, network: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, network as u8, 0, machine as u8 + 1)),
        6755,
    )
}

impl Sim {
    /// Builds `machines` endpoints sharing `networks` networks.
    ///
    /// # Panics
    /// If the configuration does not validate.
    pub fn new(
        seed: u64,
        machines: usize,
        networks: usize,
        datagram_bytes: usize,
        promote_failure_timeout: Duration,
        encrypt: bool,
        tuning: Tuning,
    ) -> Sim {
        let start = Instant::now();
        let addrs: Vec<Vec<SocketAddr>> = (0..machines)
            .map(|m| (0..networks).map(|n| sim_addr(m, n)).collect())
            .collect();
        let configs: Vec<_> = (0..machines)
            .map(|m| {
                super::cluster_config(
                    m,
                    &addrs,
                    datagram_bytes,
                    promote_failure_timeout,
                    encrypt,
                    tuning.clone(),
                )
            })
            .collect();
        let nodes = configs
            .iter()
            .enumerate()
            .map(|(m, c)| SimNode {
                endpoint: Endpoint::new(c, 1_000_000, seed ^ m as u64, start)
                    .expect("valid sim config"),
                incarnation: 0,
                events: Vec::new(),
            })
            .collect();
        let links = (0..networks * machines * machines)
            .map(|_| Link {
                params: LinkParams::default(),
                busy_until: None,
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            now: start,
            start,
            nodes,
            networks,
            links,
            network_up: vec![true; networks],
            partitioned: false,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            next_packet: 0,
            configs,
            last_delivery: vec![vec![None; machines]; machines],
            delivered: 0,
            groups_delivered: Default::default(),
            trace: std::env::var_os("GMD_SIM_TRACE").is_some(),
            dropped: 0,
            stalled_until: vec![None; machines],
            buf: Vec::new(),
            seed,
        }
    }

    /// Makes every machine discover its datagram sizes, from the size
    /// given to [`Sim::new`] up to [`crate::DISCOVERY_MAX`], instead of
    /// using that size throughout. Call before anything runs.
    pub fn discover_datagram_sizes(&mut self) {
        for (m, c) in self.configs.iter_mut().enumerate() {
            for n in &mut c.networks {
                n.discover = true;
            }
            self.nodes[m].endpoint =
                Endpoint::new(c, 1_000_000, self.seed ^ m as u64, self.start).expect("valid");
        }
    }

    /// Stalls `machine` from now until `until`, as a host that is not
    /// scheduled (a busy hypervisor): nothing it would receive is lost,
    /// but nothing is processed before then.
    pub fn stall(&mut self, machine: usize, until: Instant) {
        self.stalled_until[machine] = Some(until);
    }

    fn stalled(&self, machine: usize) -> Option<Instant> {
        self.stalled_until[machine].filter(|&u| u > self.now)
    }

    fn link_index(&self, network: usize, from: usize, to: usize) -> usize {
        let m = self.nodes.len();
        (network * m + from) * m + to
    }

    /// Sets the parameters of the directed link.
    pub fn set_link(&mut self, network: usize, from: usize, to: usize, params: LinkParams) {
        let i = self.link_index(network, from, to);
        self.links[i].params = params;
    }

    /// Sets both directions of every pair on a network.
    pub fn set_network(&mut self, network: usize, params: LinkParams) {
        let m = self.nodes.len();
        for a in 0..m {
            for b in 0..m {
                if a != b {
                    self.set_link(network, a, b, params);
                }
            }
        }
    }

    /// Takes a network down or up.
    pub fn set_network_up(&mut self, network: usize, up: bool) {
        self.network_up[network] = up;
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Restarts a machine: a fresh endpoint with a larger epoch; everything it
    /// held is lost. Datagrams in flight to it still arrive.
    pub fn restart(&mut self, machine: usize) {
        let epoch = 1_000_000 + self.elapsed().as_micros() as u64 + 1;
        let n = &mut self.nodes[machine];
        n.incarnation += 1;
        n.endpoint = Endpoint::new(
            &self.configs[machine],
            epoch,
            n.incarnation as u64,
            self.now,
        )
        .expect("valid");
    }

    /// Moves every endpoint's pending datagrams onto the links.
    pub fn flush(&mut self) {
        for from in 0..self.nodes.len() {
            if self.stalled(from).is_some() {
                continue;
            }
            let mut buf = std::mem::take(&mut self.buf);
            while let Some(t) = self.nodes[from]
                .endpoint
                .poll_transmit(self.now, 16, &mut buf)
            {
                let to = (0..self.nodes.len())
                    .find(|&m| sim_addr(m, t.network.0 as usize) == t.destination)
                    .expect("destination is a sim machine");
                for seg in buf[..t.len].chunks(t.segment_bytes) {
                    self.send_datagram(from, to, t.network.0 as usize, seg);
                }
            }
            self.buf = buf;
        }
    }

    fn send_datagram(&mut self, from: usize, to: usize, network: usize, data: &[u8]) {
        if self.trace {
            eprintln!(
                "{:>12?} {from}->{to} net{network} {} bytes",
                self.elapsed(),
                data.len()
            );
        }
        if self.partitioned || !self.network_up[network] {
            self.dropped += 1;
            return;
        }
        let li = self.link_index(network, from, to);
        let p = self.links[li].params;
        if (p.loss > 0.0 && self.rng.gen_bool(p.loss))
            || (p.datagram_max > 0 && data.len() > p.datagram_max)
        {
            self.dropped += 1;
            return;
        }
        let mut depart = self.now;
        if let Some(ns) = (data.len() as u64 * 1_000_000_000).checked_div(p.bandwidth_bytes_per_sec)
        {
            let busy = self.links[li].busy_until.unwrap_or(self.now).max(self.now);
            if busy - self.now > LINK_QUEUE_TIME {
                self.dropped += 1;
                return;
            }
            let tx = Duration::from_nanos(ns);
            depart = busy + tx;
            self.links[li].busy_until = Some(depart);
        }
        let group = self.next_packet;
        let copies = if p.duplicate > 0.0 && self.rng.gen_bool(p.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if p.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(self.rng.gen_range(0..p.jitter.as_nanos() as u64))
            };
            let at = depart + p.latency + jitter;
            let id = self.next_packet;
            self.next_packet += 1;
            self.in_flight.insert(
                id,
                InFlight {
                    to,
                    from,
                    network,
                    data: data.to_vec(),
                    group,
                },
            );
            self.queue.push(Reverse((at, id)));
        }
    }

    /// The next time something happens inside the network or the endpoints.
    pub fn next_event_time(&self) -> Option<Instant> {
        let q = self.queue.peek().map(|Reverse((t, _))| *t);
        let e = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(m, n)| {
                let t = n.endpoint.poll_timeout()?;
                Some(self.stalled(m).map_or(t, |u| t.max(u)))
            })
            .min();
        match (q, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances to `until` (or the next event before it), processing
    /// everything due. Returns false when nothing at all is scheduled.
    pub fn step(&mut self, until: Instant) -> bool {
        self.flush();
        let Some(next) = self.next_event_time() else {
            self.now = self.now.max(until);
            return false;
        };
        self.now = self.now.max(next.min(until));
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            if let Some(u) = self.stalled(self.in_flight[&id].to) {
                // Waits for the host, behind what was queued before it.
                self.queue.push(Reverse((u, id)));
                continue;
            }
            let pkt = self.in_flight.remove(&id).expect("queued packet");
            if self.partitioned || !self.network_up[pkt.network] {
                self.dropped += 1;
                continue;
            }
            self.delivered += 1;
            if self.groups_delivered.insert(pkt.group) {
                // The first copy to arrive (a duplicate may overtake the original).
                self.last_delivery[pkt.to][pkt.from] = Some(self.now);
            }
            let data = BytesMut::from(&pkt.data[..]);
            self.nodes[pkt.to].endpoint.handle_datagram(
                self.now,
                NetworkId(pkt.network as u8),
                data,
            );
        }
        for m in 0..self.nodes.len() {
            if self.stalled(m).is_some() {
                continue;
            }
            let n = &mut self.nodes[m];
            if n.endpoint.poll_timeout().is_some_and(|t| t <= self.now) {
                n.endpoint.handle_timeout(self.now);
            }
        }
        self.flush();
        true
    }

    /// Drains the events of one node.
    pub fn drain_events(&mut self, machine: usize) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.nodes[machine].endpoint.poll_event() {
            out.push(e);
        }
        out
    }

    /// Number of networks.
    pub fn networks(&self) -> usize {
        self.networks
    }

    /// Datagrams still travelling.
    pub fn packets_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

// ---------------------------------------------------------------------------
// Scenario runner.

/// What a scenario does to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing beyond loss, jitter and duplication.
    None,
    /// One network fails at some time and is repaired later.
    PathFailure,
    /// Every network fails for less than the promote-failure timeout.
    ShortPartition,
    /// Every network fails for longer than the promote-failure timeout.
    LongPartition,
    /// Like `LongPartition` with promote-failure timeout 0 (never down).
    LongPartitionNeverDown,
    /// One machine restarts.
    Restart,
}

/// A whole scenario, derived from a seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The seed.
    pub seed: u64,
    /// Machines (2 or 3).
    pub machines: usize,
    /// Networks (1 to 3).
    pub networks: usize,
    /// Datagram size.
    pub datagram_bytes: usize,
    /// Payload encryption.
    pub encrypt: bool,
    /// Link parameters per network.
    pub links: Vec<LinkParams>,
    /// The fault.
    pub fault: Fault,
    /// When the fault starts and how long it lasts.
    pub fault_at: Duration,
    /// Duration of the fault.
    pub fault_for: Duration,
    /// Promote-failure timeout.
    pub promote: Duration,
    /// Messages per ordered pair of machines in the first burst.
    pub messages: usize,
    /// Largest message size.
    pub size_max: usize,
    /// Fraction of messages drawn up to `size_max` (the rest are < 2 KB).
    pub large_fraction: f64,
    /// The application releases credit this long after delivery.
    pub release_delay: Duration,
    /// Datagram sizes are discovered, from `datagram_bytes` up (links may
    /// carry less: `LinkParams::datagram_max`).
    pub discover: bool,
    /// Then every link stops carrying datagrams above `datagram_bytes`
    /// (a route change: a black hole for the sizes discovered).
    pub shrink_at: Option<Duration>,
}

impl Scenario {
    /// Derives a scenario from a seed.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut r = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let machines = if r.gen_bool(0.2) { 3 } else { 2 };
        let networks = r.gen_range(1..=3);
        let links = (0..networks)
            .map(|_| {
                let latency = Duration::from_micros(
                    *[100u64, 1_000, 5_000, 20_000, 50_000]
                        .get(r.gen_range(0..5))
                        .unwrap(),
                );
                LinkParams {
                    latency,
                    jitter: if r.gen_bool(0.5) {
                        latency / 2
                    } else {
                        Duration::ZERO
                    },
                    loss: *[0.0, 0.01, 0.05, 0.15, 0.30]
                        .get(r.gen_range(0..5))
                        .unwrap(),
                    duplicate: if r.gen_bool(0.3) { 0.05 } else { 0.0 },
                    bandwidth_bytes_per_sec: if r.gen_bool(0.3) {
                        r.gen_range(1..50) * 1_000_000
                    } else {
                        0
                    },
                    datagram_max: 0,
                }
            })
            .collect();
        let fault = match r.gen_range(0..10) {
            0..=2 => Fault::None,
            3 | 4 => Fault::PathFailure,
            5 => Fault::ShortPartition,
            6 => Fault::LongPartition,
            7 => Fault::LongPartitionNeverDown,
            _ => Fault::Restart,
        };
        let promote = if fault == Fault::LongPartitionNeverDown {
            Duration::ZERO
        } else {
            Duration::from_secs(r.gen_range(3..=6))
        };
        let fault_at = Duration::from_millis(r.gen_range(100..2_000));
        let fault_for = match fault {
            Fault::ShortPartition => promote / 6,
            Fault::PathFailure if networks == 1 => promote / 6,
            Fault::LongPartition | Fault::LongPartitionNeverDown => {
                Duration::from_secs(r.gen_range(7..12))
            }
            _ => Duration::from_millis(r.gen_range(500..4_000)),
        };
        Scenario {
            seed,
            machines,
            networks,
            datagram_bytes: *[1200usize, 1400, 4000, 9000]
                .get(r.gen_range(0..4))
                .unwrap(),
            encrypt: r.gen_bool(0.5),
            links,
            fault,
            fault_at,
            fault_for,
            promote,
            messages: r.gen_range(10..60),
            size_max: if r.gen_bool(0.1) { 300_000 } else { 20_000 },
            large_fraction: 0.05,
            release_delay: if r.gen_bool(0.3) {
                Duration::from_millis(r.gen_range(1..50))
            } else {
                Duration::ZERO
            },
            discover: false,
            shrink_at: None,
        }
        .with_discovery_from(seed)
    }

    /// Path-MTU discovery for some seeds, drawn from a generator of its
    /// own so that the rest of each seed's scenario stays what it was.
    fn with_discovery_from(mut self, seed: u64) -> Scenario {
        let mut r = StdRng::seed_from_u64(seed ^ 0x6d74_7564_6973_636f);
        if !r.gen_bool(0.4) {
            return self;
        }
        self.discover = true;
        let base = self.datagram_bytes;
        for l in &mut self.links {
            l.datagram_max = match r.gen_range(0..4) {
                0 => 0,
                1 => base + 72,
                2 => r.gen_range(base..=crate::DISCOVERY_MAX.max(base)),
                _ => base,
            };
        }
        if r.gen_bool(0.3) {
            self.shrink_at = Some(Duration::from_millis(r.gen_range(100..3_000)));
        }
        self
    }

    /// Tuning used by scenarios: a small window so flow control is exercised.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            send_buffer_bytes_max: (4 << 20) + 4096 + if self.seed % 2 == 0 { 0 } else { 1 << 20 },
            message_bytes_max: 4 << 20,
            recv_window_bytes: (4 << 20) + 4096,
            stream_window_messages: 64,
            streams_max: 8,
            requests_outstanding_max: 32,
            sent_packets_max: 4096,
            ..Tuning::default()
        }
    }
}

#[derive(Debug, Clone)]
struct SentMsg {
    from: usize,
    from_incarnation: u32,
    to: usize,
    stream: u16,
    sent_at: Instant,
    request: Option<RequestId>,
    /// Sent as a passing message ([`Endpoint::send_passing`]).
    passing: bool,
    /// Outcome: delivered at, replied, failed.
    delivered: Vec<Instant>,
    replied: bool,
    failed: bool,
    body_len: usize,
    /// Sender's epoch toward the receiver when sent.
    sender_epoch: u64,
    /// Receiver's epoch as the sender knew it when sent.
    receiver_epoch: Option<u64>,
}

/// A scenario failure, with the seed to replay.
#[derive(Debug)]
pub struct SimFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub reason: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed: {}\nreplay with: GMD_SIM_SEED={} cargo nextest run -p gmd-net sim",
            self.seed, self.reason, self.seed
        )
    }
}

const MAGIC: u32 = 0x474D_4431;

fn body_for(id: u64, len: usize) -> Bytes {
    let len = len.max(12);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&MAGIC.to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    let mut x = id.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    Bytes::from(v)
}

fn check_body(body: &[u8]) -> Option<u64> {
    if body.len() < 12 || body[..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let id = u64::from_be_bytes(body[4..12].try_into().ok()?);
    (body_for(id, body.len())[..] == *body).then_some(id)
}

fn reply_for(request_body: &[u8]) -> Bytes {
    let d = ring::digest::digest(&ring::digest::SHA256, request_body);
    Bytes::copy_from_slice(&d.as_ref()[..16])
}

/// Observed resets, for deciding which losses are excused.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `restart` is shown in failure messages.
struct ResetSeen {
    at: Instant,
    by: usize,
    about: usize,
    restart: bool,
}

struct Runner {
    sc: Scenario,
    sim: Sim,
    msgs: Vec<SentMsg>,
    /// (from, from incarnation, to, request id) -> message index
    requests: BTreeMap<(usize, u32, usize, u64), usize>,
    resets: Vec<ResetSeen>,
    /// Sends waiting for buffer space: (from, to, stream, message index, body, is request).
    backlog: Vec<(usize, usize, u16, usize, Bytes, bool)>,
    /// Credits to release later: (at, machine, credit)
    releases: Vec<(Instant, usize, crate::proto::Credit)>,
    /// Last delivered app sequence that did not pass, per (to, from, from
    /// incarnation, stream).
    order: BTreeMap<(usize, usize, u32, u16), usize>,
    downs: Vec<(Instant, usize, usize)>,
    restarts_done: Vec<(Instant, usize)>,
    fault_windows: Vec<(Instant, Instant)>,
    /// (machine, peer) -> (peer's epoch known, our epoch toward it), as of
    /// the events processed so far.
    epochs: BTreeMap<(usize, usize), (Option<u64>, u64)>,
}

impl Runner {
    fn fail(&self, reason: impl Into<String>) -> SimFailure {
        SimFailure {
            seed: self.sc.seed,
            reason: format!(
                "{} (scenario {:?}, t={:?})",
                reason.into(),
                self.sc,
                self.sim.elapsed()
            ),
        }
    }

    fn submit(&mut self, from: usize, to: usize, count: usize) {
        for _ in 0..count {
            let stream = self.sim.rng.gen_range(0..4u16);
            let size = if self.sim.rng.gen_bool(self.sc.large_fraction) {
                self.sim.rng.gen_range(12..=self.sc.size_max)
            } else {
                self.sim.rng.gen_range(12..2_000)
            };
            let is_request = self.sim.rng.gen_bool(0.5);
            // A third of the one-way messages may pass earlier ones.
            let passing = !is_request && self.sim.rng.gen_bool(1.0 / 3.0);
            let idx = self.msgs.len();
            self.msgs.push(SentMsg {
                from,
                from_incarnation: self.sim.nodes[from].incarnation,
                to,
                stream,
                sent_at: self.sim.now,
                request: None,
                passing,
                delivered: Vec::new(),
                replied: false,
                failed: false,
                body_len: size,
                sender_epoch: 0,
                receiver_epoch: None,
            });
            let body = body_for(idx as u64, size);
            self.backlog.push((from, to, stream, idx, body, is_request));
        }
    }

    fn pump_backlog(&mut self) -> Result<(), SimFailure> {
        let mut keep = Vec::new();
        let backlog = std::mem::take(&mut self.backlog);
        let mut blocked = vec![false; self.sim.nodes.len() * self.sim.nodes.len()];
        for (from, to, stream, idx, body, is_request) in backlog {
            let key = from * self.sim.nodes.len() + to;
            if blocked[key] {
                keep.push((from, to, stream, idx, body, is_request));
                continue;
            }
            let now = self.sim.now;
            self.msgs[idx].sent_at = now;
            self.msgs[idx].from_incarnation = self.sim.nodes[from].incarnation;
            let ep = &mut self.sim.nodes[from].endpoint;
            self.msgs[idx].sender_epoch = ep.local_epoch(PeerId(to as u16)).expect("peer");
            self.msgs[idx].receiver_epoch = ep.peer_epoch(PeerId(to as u16));
            let res = if is_request {
                ep.request(now, PeerId(to as u16), StreamId(stream), body.clone())
                    .map(Some)
            } else if self.msgs[idx].passing {
                ep.send_passing(now, PeerId(to as u16), StreamId(stream), body.clone())
                    .map(|_| None)
            } else {
                ep.send(now, PeerId(to as u16), StreamId(stream), body.clone())
                    .map(|_| None)
            };
            match res {
                Ok(rid) => {
                    if let Some(rid) = rid {
                        self.msgs[idx].request = Some(rid);
                        self.requests
                            .insert((from, self.sim.nodes[from].incarnation, to, rid.0), idx);
                    }
                }
                Err(NetError::WouldBlock { .. }) => {
                    // Keep per-pair submission order: block the rest of this pair.
                    blocked[key] = true;
                    keep.push((from, to, stream, idx, body, is_request));
                }
                Err(NetError::PeerDown { .. }) => self.msgs[idx].failed = true,
                Err(e) => return Err(self.fail(format!("unexpected send error {e}"))),
            }
        }
        self.backlog = keep;
        Ok(())
    }

    fn handle_events(&mut self) -> Result<(), SimFailure> {
        for m in 0..self.sim.nodes.len() {
            let evs = self.sim.drain_events(m);
            let now = self.sim.now;
            for e in evs {
                self.sim.nodes[m].events.push((now, e.clone()));
                match e {
                    Event::Message(d) => {
                        let Some(idx) = check_body(&d.body) else {
                            return Err(self.fail(format!(
                                "machine {m} got a corrupt message on {:?}",
                                d.stream
                            )));
                        };
                        let idx = idx as usize;
                        let msg = self
                            .msgs
                            .get(idx)
                            .cloned()
                            .ok_or_else(|| self.fail("unknown message id"))?;
                        if msg.to != m || msg.from != d.peer.0 as usize || msg.stream != d.stream.0
                        {
                            return Err(
                                self.fail(format!("message {idx} delivered to the wrong place"))
                            );
                        }
                        if !msg.delivered.is_empty() {
                            return Err(self.fail(format!("message {idx} delivered twice")));
                        }
                        if msg.body_len != d.body.len() {
                            return Err(self.fail(format!("message {idx} has the wrong length")));
                        }
                        if let Some(why) = self.old_session_delivery(&msg, m) {
                            return Err(self.fail(format!(
                                "message {idx} from an old session delivered: {why}"
                            )));
                        }
                        if d.stream.is_ordered() {
                            // Nothing comes after a later message that
                            // does not pass; a passing one may come before
                            // earlier ones.
                            let k = (m, msg.from, msg.from_incarnation, msg.stream);
                            if let Some(&prev) = self.order.get(&k)
                                && prev > idx
                            {
                                return Err(self.fail(format!(
                                    "stream {} out of order: {idx} after {prev}",
                                    msg.stream
                                )));
                            }
                            if !msg.passing {
                                self.order.insert(k, idx);
                            }
                        }
                        self.msgs[idx].delivered.push(now);
                        if let IncomingKind::Request(to) = d.kind {
                            let _ = self.sim.nodes[m]
                                .endpoint
                                .reply(now, to, reply_for(&d.body));
                        }
                        if self.sc.release_delay.is_zero() {
                            self.sim.nodes[m].endpoint.release(d.credit);
                        } else {
                            self.releases
                                .push((now + self.sc.release_delay, m, d.credit));
                        }
                    }
                    Event::Reply {
                        peer,
                        request,
                        body,
                    } => {
                        let key = (m, self.sim.nodes[m].incarnation, peer.0 as usize, request.0);
                        let Some(&idx) = self.requests.get(&key) else {
                            return Err(self.fail(format!("reply to unknown request {key:?}")));
                        };
                        let req = body_for(idx as u64, self.msgs[idx].body_len);
                        if body != reply_for(&req) {
                            return Err(
                                self.fail(format!("reply to {idx} does not match its request"))
                            );
                        }
                        if self.msgs[idx].replied || self.msgs[idx].failed {
                            return Err(self.fail(format!("request {idx} resolved twice")));
                        }
                        self.msgs[idx].replied = true;
                    }
                    Event::RequestFailed {
                        peer,
                        request,
                        error,
                    } => {
                        let key = (m, self.sim.nodes[m].incarnation, peer.0 as usize, request.0);
                        let Some(&idx) = self.requests.get(&key) else {
                            return Err(self.fail(format!("failure of unknown request {key:?}")));
                        };
                        if !matches!(
                            error,
                            NetError::PeerDown { .. } | NetError::PeerRestarted { .. }
                        ) {
                            return Err(self.fail(format!("request failed with {error}")));
                        }
                        if self.msgs[idx].replied || self.msgs[idx].failed {
                            return Err(self.fail(format!("request {idx} resolved twice")));
                        }
                        self.msgs[idx].failed = true;
                    }
                    Event::PeerUp { peer, epoch } => {
                        self.epochs
                            .get_mut(&(m, peer.0 as usize))
                            .expect("tracked")
                            .0 = Some(epoch);
                    }
                    Event::PeerDown { peer } => {
                        let p = peer.0 as usize;
                        let e = self.epochs.get_mut(&(m, p)).expect("tracked");
                        *e = (None, e.1 + 1);
                        self.resets.push(ResetSeen {
                            at: now,
                            by: m,
                            about: p,
                            restart: false,
                        });
                        self.downs.push((now, m, p));
                        // Not before the promote-failure timeout since the last
                        // datagram from the peer arrived.
                        let last = self.sim.last_delivery[m][p].unwrap_or(self.sim.start);
                        let restarted_recently = self.restarts_done.iter().any(|&(_, w)| w == m);
                        if !restarted_recently && now < last + self.sc.promote {
                            return Err(self.fail(format!(
                                "peer down fired {:?} after the last datagram, before the timeout {:?}; {:?}",
                                now - last,
                                self.sc.promote,
                                self.sim.nodes[m].endpoint.stats().security
                            )));
                        }
                        if self.sc.promote.is_zero() {
                            return Err(self.fail("peer down with promote-failure timeout 0"));
                        }
                    }
                    Event::PeerRestarted { peer, epoch } => {
                        self.epochs
                            .get_mut(&(m, peer.0 as usize))
                            .expect("tracked")
                            .0 = Some(epoch);
                        self.resets.push(ResetSeen {
                            at: now,
                            by: m,
                            about: peer.0 as usize,
                            restart: true,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Whether delivering `msg` at `to` now would leak a message of an old
    /// session into a new one: the receiver must still be in the session the
    /// sender was in when it sent.
    ///
    /// The receiver's epochs are tracked through its event stream (not read
    /// from the endpoint), because events are drained after a whole step in
    /// which later datagrams may already have moved the session on.
    fn old_session_delivery(&self, msg: &SentMsg, to: usize) -> Option<String> {
        let (remote, local) = self.epochs[&(to, msg.from)];
        if remote != Some(msg.sender_epoch) {
            return Some(format!(
                "sender epoch {:#x}, receiver knew {remote:?}",
                msg.sender_epoch
            ));
        }
        if let Some(e) = msg.receiver_epoch
            && local != e
        {
            return Some(format!(
                "sent to receiver epoch {e:#x}, receiver was at {local:#x}"
            ));
        }
        None
    }

    /// Starts tracking the epochs of machine `m` (at start and after a restart).
    fn track_epochs(&mut self, m: usize) {
        for p in 0..self.sim.nodes.len() {
            if p != m {
                let local = self.sim.nodes[m]
                    .endpoint
                    .local_epoch(PeerId(p as u16))
                    .expect("peer");
                self.epochs.insert((m, p), (None, local));
            }
        }
    }

    fn check_bounds(&self) -> Result<(), SimFailure> {
        let t = self.sc.tuning();
        for (m, n) in self.sim.nodes.iter().enumerate() {
            for p in 0..self.sim.nodes.len() {
                if p == m {
                    continue;
                }
                let f: PeerFootprint = n.endpoint.footprint(PeerId(p as u16));
                let ok = f.send_buffered_bytes <= t.send_buffer_bytes_max
                    && f.sent_packets <= t.sent_packets_max
                    && f.recv_charged_bytes <= t.recv_window_bytes
                    && f.recv_slots == f.recv_slots_accounted
                    && f.recv_slots
                        <= (t.streams_max as usize + 1) * t.stream_window_messages as usize
                    && f.requests <= t.requests_outstanding_max
                    && f.ack_ranges <= ACK_RANGES_MAX
                    && f.chunk_records <= t.sent_packets_max * 4
                    && f.retransmit_chunks <= 2 * t.sent_packets_max * 4
                    && f.reply_buffered_bytes
                        <= t.requests_outstanding_max * (t.message_bytes_max + 64);
                if !ok {
                    return Err(self.fail(format!("machine {m} toward {p} exceeds a bound: {f:?}")));
                }
            }
        }
        Ok(())
    }

    fn excused(&self, idx: usize) -> bool {
        let msg = &self.msgs[idx];
        msg.failed
            || self.resets.iter().any(|r| {
                r.at >= msg.sent_at
                    && ((r.by == msg.from && r.about == msg.to)
                        || (r.by == msg.to && r.about == msg.from))
            })
            || self
                .restarts_done
                .iter()
                .any(|&(t, who)| t >= msg.sent_at && (who == msg.from || who == msg.to))
    }
}

/// Runs the scenario of one seed and checks every property.
///
/// # Errors
/// A [`SimFailure`] naming the seed and the violated property.
pub fn run_seed(seed: u64) -> Result<SimStats, SimFailure> {
    run_scenario(Scenario::from_seed(seed))
}

/// Counters of one finished scenario.
#[derive(Debug, Clone, Default)]
pub struct SimStats {
    /// Messages submitted.
    pub messages: usize,
    /// Messages delivered.
    pub delivered: usize,
    /// Largest message delivered, in bytes.
    pub largest_delivered_bytes: usize,
    /// Datagrams delivered by the simulated network.
    pub datagrams: u64,
    /// Virtual time the scenario took.
    pub elapsed: Duration,
}

/// Runs an explicit scenario.
///
/// # Errors
/// A [`SimFailure`] naming the seed and the violated property.
pub fn run_scenario(sc: Scenario) -> Result<SimStats, SimFailure> {
    let mut sim = Sim::new(
        sc.seed,
        sc.machines,
        sc.networks,
        sc.datagram_bytes,
        sc.promote,
        sc.encrypt,
        sc.tuning(),
    );
    if sc.discover {
        sim.discover_datagram_sizes();
    }
    for (n, l) in sc.links.iter().enumerate() {
        sim.set_network(n, *l);
    }
    let mut shrink_at = sc.shrink_at.map(|d| sim.start + d);
    let mut r = Runner {
        sc: sc.clone(),
        sim,
        msgs: Vec::new(),
        requests: BTreeMap::new(),
        resets: Vec::new(),
        backlog: Vec::new(),
        releases: Vec::new(),
        order: BTreeMap::new(),
        downs: Vec::new(),
        restarts_done: Vec::new(),
        fault_windows: Vec::new(),
        epochs: BTreeMap::new(),
    };
    for m in 0..sc.machines {
        r.track_epochs(m);
    }
    let start = r.sim.start;
    let m = sc.machines;
    // First burst: spread over the first two seconds.
    let mut actions: Vec<(Instant, usize, usize, usize)> = Vec::new();
    for a in 0..m {
        for b in 0..m {
            if a != b {
                let mut left = sc.messages;
                while left > 0 {
                    let n = left.min(r.sim.rng.gen_range(1..8));
                    left -= n;
                    let at = start + Duration::from_millis(r.sim.rng.gen_range(0..2_000));
                    actions.push((at, a, b, n));
                }
            }
        }
    }
    let fault_start = start + sc.fault_at;
    let fault_end = fault_start + sc.fault_for;
    // Second burst after the fault heals (and after a long partition, after the
    // peers found each other again).
    let settle = match sc.fault {
        Fault::LongPartition | Fault::LongPartitionNeverDown | Fault::Restart => {
            Duration::from_secs(3)
        }
        _ => Duration::from_millis(500),
    };
    let second = fault_end + settle;
    for a in 0..m {
        for b in 0..m {
            if a != b {
                actions.push((second, a, b, 5));
            }
        }
    }
    actions.sort_by_key(|x| x.0);
    let mut fault_started = false;
    let mut fault_ended = false;
    let victim_net = r.sim.rng.gen_range(0..sc.networks);
    let deadline = second + Duration::from_secs(300);
    let mut steps: u64 = 0;
    let mut next_action = 0;
    loop {
        steps += 1;
        if steps % 64 == 0 {
            r.check_bounds()?;
        }
        let now = r.sim.now;
        if shrink_at.is_some_and(|at| now >= at) {
            shrink_at = None;
            for (n, l) in sc.links.iter().enumerate() {
                r.sim.set_network(
                    n,
                    LinkParams {
                        datagram_max: sc.datagram_bytes,
                        ..*l
                    },
                );
            }
        }
        if !fault_started && now >= fault_start {
            fault_started = true;
            match sc.fault {
                Fault::None => {}
                Fault::PathFailure => r.sim.set_network_up(victim_net, false),
                Fault::ShortPartition | Fault::LongPartition | Fault::LongPartitionNeverDown => {
                    r.sim.partitioned = true
                }
                Fault::Restart => {
                    r.sim.restart(1);
                    r.restarts_done.push((now, 1));
                    r.track_epochs(1);
                    // The dead incarnation's sends are gone.
                    r.backlog.retain(|b| b.0 != 1);
                }
            }
            r.fault_windows.push((fault_start, fault_end));
        }
        if fault_started && !fault_ended && now >= fault_end {
            fault_ended = true;
            r.sim.partitioned = false;
            for n in 0..sc.networks {
                r.sim.set_network_up(n, true);
            }
        }
        while next_action < actions.len() && actions[next_action].0 <= now {
            let (_, a, b, n) = actions[next_action];
            r.submit(a, b, n);
            next_action += 1;
        }
        let due: Vec<_> = r.releases.iter().filter(|x| x.0 <= now).copied().collect();
        r.releases.retain(|x| x.0 > now);
        for (_, mm, c) in due {
            r.sim.nodes[mm].endpoint.release(c);
        }
        r.pump_backlog()?;
        r.sim.flush();
        r.handle_events()?;
        r.pump_backlog()?;
        let all_submitted = next_action == actions.len();
        let idle = all_submitted
            && fault_ended
            && r.backlog.is_empty()
            && r.releases.is_empty()
            && r.sim.nodes.iter().all(|n| n.endpoint.is_idle());
        if idle {
            break;
        }
        if now > deadline {
            let stuck: Vec<_> = (0..m)
                .flat_map(|a| (0..m).filter(move |&b| b != a).map(move |b| (a, b)))
                .map(|(a, b)| (a, b, r.sim.nodes[a].endpoint.footprint(PeerId(b as u16))))
                .collect();
            let paths: Vec<_> = r
                .sim
                .nodes
                .iter()
                .map(|n| n.endpoint.stats().paths)
                .collect();
            return Err(r.fail(format!(
                "did not settle within the deadline; backlog {} footprints {stuck:?} paths {paths:?}",
                r.backlog.len()
            )));
        }
        // Next stop: the earliest of network/endpoint events, workload, fault, release.
        let mut until = deadline + Duration::from_secs(1);
        if next_action < actions.len() {
            until = until.min(actions[next_action].0);
        }
        if !fault_started {
            until = until.min(fault_start);
        } else if !fault_ended {
            until = until.min(fault_end);
        }
        if let Some(x) = r.releases.iter().map(|x| x.0).min() {
            until = until.min(x);
        }
        if let Some(x) = shrink_at {
            until = until.min(x);
        }
        if !r.backlog.is_empty() {
            // Retry blocked sends at least every millisecond of virtual time.
            until = until.min(now + Duration::from_millis(1));
        }
        r.sim.step(until);
    }
    r.check_bounds()?;
    // Every message must be delivered exactly once unless a reset excused it.
    let mut delivered = 0;
    for idx in 0..r.msgs.len() {
        let msg = &r.msgs[idx];
        if msg.delivered.len() > 1 {
            return Err(r.fail(format!(
                "message {idx} delivered {} times",
                msg.delivered.len()
            )));
        }
        delivered += msg.delivered.len();
        if msg.delivered.is_empty() && !r.excused(idx) {
            return Err(r.fail(format!(
                "message {idx} {msg:?} was never delivered and no reset excuses it"
            )));
        }
        if msg.request.is_some() && !msg.replied && !msg.failed && !r.excused(idx) {
            return Err(r.fail(format!("request {idx} never resolved")));
        }
        if msg.request.is_some() && msg.failed && !r.excused(idx) {
            return Err(r.fail(format!("request {idx} failed without a reset")));
        }
    }
    // Fault-specific properties.
    match sc.fault {
        Fault::LongPartition => {
            // Each side declares the other down, not later than timeout after
            // the partition began.
            for a in 0..m {
                for b in 0..m {
                    if a == b {
                        continue;
                    }
                    let Some(&(t, _, _)) = r.downs.iter().find(|d| d.1 == a && d.2 == b) else {
                        return Err(r.fail(format!(
                            "machine {a} never declared {b} down in a long partition"
                        )));
                    };
                    if t > fault_start + sc.promote + Duration::from_millis(1) {
                        return Err(r.fail(format!(
                            "peer down fired late: {:?} after the partition",
                            t - fault_start
                        )));
                    }
                }
            }
        }
        Fault::ShortPartition
        | Fault::None
        | Fault::PathFailure
        | Fault::LongPartitionNeverDown => {
            if let Some(d) = r.downs.first() {
                return Err(r.fail(format!(
                    "peer declared down without a long partition: {d:?} {:?}",
                    r.sim
                        .nodes
                        .iter()
                        .map(|n| n.endpoint.stats())
                        .collect::<Vec<_>>()
                )));
            }
            if let Some(x) = r.resets.first() {
                return Err(r.fail(format!(
                    "session reset without a long partition or restart: {x:?}"
                )));
            }
        }
        Fault::Restart => {}
    }
    // The second burst, sent after healing, must be delivered (traffic resumed
    // without restarting anything) — checked above, since nothing excuses it
    // unless a reset happened after it was sent.
    let after_heal: Vec<_> = r.msgs.iter().filter(|x| x.sent_at >= second).collect();
    if after_heal
        .iter()
        .any(|x| x.delivered.is_empty() && !x.failed)
        && sc.fault != Fault::Restart
    {
        return Err(r.fail("traffic did not resume after the fault healed"));
    }
    Ok(SimStats {
        messages: r.msgs.len(),
        delivered,
        largest_delivered_bytes: r
            .msgs
            .iter()
            .filter(|x| !x.delivered.is_empty())
            .map(|x| x.body_len)
            .max()
            .unwrap_or(0),
        datagrams: r.sim.delivered,
        elapsed: r.sim.elapsed(),
    })
}
