//! Configuration of one GeoMessage endpoint, filled by `gmdd` from the cluster
//! TOML. Validation happens once in [`NetConfig::validate`]; the protocol core
//! works from the resolved [`Topology`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::NetError;
use crate::wire::{self, HEADER_BYTES, TAG_BYTES};

/// Default datagram size: fits a 1500-byte Ethernet MTU with IPv6 + UDP
/// headers and some tunnel overhead.
pub const DATAGRAM_BYTES_DEFAULT: usize = 1400;
/// Smallest allowed datagram: leaves room for header, tag and a useful frame.
pub const DATAGRAM_BYTES_MIN: usize = 512;
/// Largest allowed datagram (UDP over IPv4 allows 65507 bytes of payload).
pub const DATAGRAM_BYTES_MAX: usize = 65_000;
/// Default UDP port of GeoMessage (the reference's `gmd_port`).
pub const PORT_DEFAULT: u16 = 6755;
/// Machines in a cluster (the reference allows 2–8).
pub const MACHINES_MAX: usize = 8;
/// Networks a machine may have an interface on.
pub const NETWORKS_MAX: usize = 8;

const _: () = assert!(DATAGRAM_BYTES_MIN > HEADER_BYTES + TAG_BYTES + 64);
const _: () = assert!(DATAGRAM_BYTES_MAX <= 65_507);

/// Whole configuration of one endpoint.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Cluster name; the 64-bit cluster id carried by every datagram derives
    /// from it, so two clusters on one network never accept each other's
    /// traffic.
    pub cluster_name: String,
    /// Pre-shared key bytes (gmdd reads 32 random bytes from the key file).
    /// Per-purpose keys are derived from it with HKDF-SHA256.
    pub psk: Vec<u8>,
    /// Encrypt payloads (AES-256-GCM). When off, datagrams are still
    /// authenticated with the same AEAD over the whole datagram.
    pub encrypt: bool,
    /// Name of the machine this endpoint runs on.
    pub local_machine: String,
    /// Every machine of the cluster, the local one included.
    pub machines: Vec<MachineConfig>,
    /// Per-network settings; networks not listed use the defaults.
    pub networks: Vec<NetworkConfig>,
    /// Timers and bounds; the defaults suit a LAN or a metro WAN.
    pub tuning: Tuning,
}

/// One machine of the cluster.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Machine name (usually its hostname).
    pub name: String,
    /// After this long with no working path to this machine it is declared
    /// down; zero means never.
    pub promote_failure_timeout: Duration,
    /// Interfaces in order of preference for ties: (network name, address).
    pub interfaces: Vec<InterfaceConfig>,
}

/// One interface of a machine on a named network.
#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// Network name; two machines talk over every network both are on.
    pub network: String,
    /// UDP address of this interface.
    pub addr: SocketAddr,
}

/// Settings of one named network.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Network name.
    pub name: String,
    /// Largest UDP payload sent on this network, header and tag included;
    /// with `discover`, the size to start from and never go below.
    pub datagram_bytes: usize,
    /// Discover how large a datagram each path carries (path-MTU
    /// discovery), from `datagram_bytes` up to the first hop's MTU and at
    /// most [`crate::DISCOVERY_MAX`].
    pub discover: bool,
}

/// Timers and bounds. Every queue, window and retry of the protocol has its
/// bound here; `docs/net.md` adds them up into the worst-case memory per peer.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Floor of the retransmission timeout (RFC 6298 says 1 s; a LAN wants
    /// milliseconds).
    pub rto_min: Duration,
    /// Ceiling of the retransmission timeout after backoff.
    pub rto_max: Duration,
    /// RTO before the first RTT sample on a path.
    pub rto_initial: Duration,
    /// Longest an acknowledgement may be delayed by the receiver.
    pub ack_delay_max: Duration,
    /// Interval of pings on idle or down paths.
    pub ping_interval: Duration,
    /// Consecutive retransmission timeouts after which a path is down.
    pub path_timeouts_max: u32,
    /// Interval of handshake (hello) retries while the peer's epoch is unknown.
    pub handshake_interval: Duration,
    /// A peer epoch lower than the known one is accepted (clock stepped back
    /// across a restart) only after the peer was silent this long.
    pub stale_epoch_silence: Duration,
    /// Largest message accepted by `send`/`request`.
    pub message_bytes_max: usize,
    /// Bytes of messages queued or unacknowledged per peer (each message is
    /// charged `len + MESSAGE_OVERHEAD_BYTES`).
    pub send_buffer_bytes_max: usize,
    /// Receive window per peer: bytes of messages being reassembled or
    /// delivered but not yet consumed by the application.
    pub recv_window_bytes: usize,
    /// Messages per stream that may be in flight beyond the oldest
    /// unacknowledged one (also the receiver's reorder window).
    pub stream_window_messages: u32,
    /// Stream ids usable are `0..streams_max`; stream 0 is the unordered
    /// control stream.
    pub streams_max: u16,
    /// Outstanding requests per peer (sent, reply not yet received).
    pub requests_outstanding_max: usize,
    /// Sent packets tracked per peer (in flight or awaiting a verdict).
    pub sent_packets_max: usize,
    /// Initial congestion window per path, in bytes.
    pub cwnd_initial_bytes: usize,
    /// Ceiling of the congestion window per path, in bytes.
    pub cwnd_max_bytes: usize,
    /// Multiplicative decrease factor on loss, in percent of the window kept.
    pub cwnd_decrease_percent: u32,
    /// Another path is used as overflow when its smoothed RTT is at most this
    /// many times the best path's (0 = never use more than one path).
    pub spill_rtt_ratio: u32,
    /// Test knob: drop this fraction (parts per million) of received
    /// datagrams before processing. Zero in production.
    pub recv_loss_ppm: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            rto_min: Duration::from_millis(20),
            rto_max: Duration::from_secs(2),
            rto_initial: Duration::from_millis(250),
            ack_delay_max: Duration::from_millis(2),
            ping_interval: Duration::from_millis(500),
            path_timeouts_max: 4,
            handshake_interval: Duration::from_millis(250),
            stale_epoch_silence: Duration::from_secs(10),
            message_bytes_max: 16 << 20,
            send_buffer_bytes_max: 64 << 20,
            recv_window_bytes: 64 << 20,
            stream_window_messages: 4096,
            streams_max: 1024,
            requests_outstanding_max: 16_384,
            sent_packets_max: 16_384,
            cwnd_initial_bytes: 64 << 10,
            cwnd_max_bytes: 64 << 20,
            cwnd_decrease_percent: 70,
            spill_rtt_ratio: 2,
            recv_loss_ppm: 0,
        }
    }
}

/// Index of a machine in [`NetConfig::machines`]; also names a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u16);

/// Index of a network in [`Topology::networks`] (sorted by first appearance in
/// the local machine's interface list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkId(pub u8);

/// One path to a peer: a network both machines have an interface on.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// The network.
    pub network: NetworkId,
    /// The peer's address on it.
    pub remote_addr: SocketAddr,
    /// Datagram size on this network: fixed, or where discovery starts.
    pub datagram_bytes: usize,
    /// Largest datagram discovery may try; `datagram_bytes` when the size
    /// is fixed.
    pub datagram_max: usize,
}

/// One remote machine as the core sees it.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Its name.
    pub name: String,
    /// Wire id (hash of the name).
    pub machine_id: u32,
    /// Promote-failure timeout; `None` = never.
    pub promote_failure_timeout: Option<Duration>,
    /// Paths in the order of the local interface list (ties go to the first).
    pub paths: Vec<PathConfig>,
}

/// The validated, resolved view of a [`NetConfig`] for the local machine.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Cluster id carried by every datagram.
    pub cluster_id: u64,
    /// Local machine index in `machines`.
    pub local: PeerId,
    /// Wire id of the local machine.
    pub local_machine_id: u32,
    /// Local networks: (name, local address, largest datagram), in interface
    /// order.
    pub networks: Vec<(String, SocketAddr, usize)>,
    /// One entry per configured machine; the local one has no paths.
    pub peers: Vec<PeerConfig>,
}

impl NetConfig {
    /// Checks the configuration and resolves the local machine's view.
    ///
    /// # Errors
    /// `NetError::Config` naming the first inconsistency found.
    pub fn validate(&self) -> Result<Topology, NetError> {
        let bad = |s: String| Err(NetError::Config(s));
        if self.cluster_name.is_empty() {
            return bad("cluster name is empty".into());
        }
        if self.psk.len() < 16 {
            return bad(format!(
                "pre-shared key has {} bytes; at least 16 (32 recommended) are needed",
                self.psk.len()
            ));
        }
        if self.machines.len() < 2 || self.machines.len() > MACHINES_MAX {
            return bad(format!(
                "{} machines configured; 2 to {MACHINES_MAX} are allowed",
                self.machines.len()
            ));
        }
        let t = &self.tuning;
        if t.message_bytes_max < 4 << 20 {
            return bad("tuning.message_bytes_max must be at least 4 MiB".into());
        }
        if t.send_buffer_bytes_max < t.message_bytes_max + crate::proto::MESSAGE_OVERHEAD_BYTES {
            return bad("tuning.send_buffer_bytes_max must hold one largest message".into());
        }
        if t.recv_window_bytes < t.message_bytes_max + crate::proto::MESSAGE_OVERHEAD_BYTES {
            return bad("tuning.recv_window_bytes must hold one largest message".into());
        }
        if t.message_bytes_max > u32::MAX as usize / 2 {
            return bad("tuning.message_bytes_max is too large".into());
        }
        if t.streams_max < 2 || t.streams_max > crate::StreamId::PROBE.0 {
            return bad("tuning.streams_max must be in 2..=65534".into());
        }
        if t.stream_window_messages < 16 || t.stream_window_messages > 1 << 20 {
            return bad("tuning.stream_window_messages must be in 16..=1048576".into());
        }
        if t.rto_min.is_zero() || t.rto_max < t.rto_min || t.rto_initial < t.rto_min {
            return bad("tuning: need 0 < rto_min <= rto_initial, rto_min <= rto_max".into());
        }
        if t.path_timeouts_max == 0 || t.ping_interval.is_zero() || t.handshake_interval.is_zero() {
            return bad(
                "tuning: path_timeouts_max, ping_interval and handshake_interval must be > 0"
                    .into(),
            );
        }
        if t.sent_packets_max < 64 || t.requests_outstanding_max == 0 {
            return bad("tuning: sent_packets_max >= 64 and requests_outstanding_max >= 1".into());
        }
        if t.cwnd_initial_bytes < 2 * DATAGRAM_BYTES_MAX / 16
            || t.cwnd_max_bytes < t.cwnd_initial_bytes
        {
            return bad("tuning: cwnd_initial_bytes too small or above cwnd_max_bytes".into());
        }
        if !(10..=95).contains(&t.cwnd_decrease_percent) {
            return bad("tuning.cwnd_decrease_percent must be in 10..=95".into());
        }
        for n in &self.networks {
            if !(DATAGRAM_BYTES_MIN..=DATAGRAM_BYTES_MAX).contains(&n.datagram_bytes) {
                return bad(format!(
                    "network {}: datagram_bytes {} outside {DATAGRAM_BYTES_MIN}..={DATAGRAM_BYTES_MAX}",
                    n.name, n.datagram_bytes
                ));
            }
        }
        // (start, largest) datagram size of a network.
        let datagram_bytes = |net: &str| {
            self.networks.iter().find(|n| n.name == net).map_or(
                (DATAGRAM_BYTES_DEFAULT, DATAGRAM_BYTES_DEFAULT),
                |n| {
                    let max = if n.discover {
                        crate::DISCOVERY_MAX.max(n.datagram_bytes)
                    } else {
                        n.datagram_bytes
                    };
                    (n.datagram_bytes, max)
                },
            )
        };
        let mut ids = Vec::new();
        for (i, m) in self.machines.iter().enumerate() {
            if m.name.is_empty() {
                return bad(format!("machine #{i} has an empty name"));
            }
            if self.machines[..i].iter().any(|o| o.name == m.name) {
                return bad(format!("machine {:?} is listed twice", m.name));
            }
            let id = wire::machine_id(&m.name);
            if ids.contains(&id) {
                return bad(format!(
                    "machine {:?}: name hash collides with another machine",
                    m.name
                ));
            }
            ids.push(id);
            if m.interfaces.is_empty() || m.interfaces.len() > NETWORKS_MAX {
                return bad(format!(
                    "machine {:?} has {} interfaces; 1 to {NETWORKS_MAX} are allowed",
                    m.name,
                    m.interfaces.len()
                ));
            }
            for (j, ifc) in m.interfaces.iter().enumerate() {
                if m.interfaces[..j].iter().any(|o| o.network == ifc.network) {
                    return bad(format!(
                        "machine {:?} has two interfaces on network {:?}",
                        m.name, ifc.network
                    ));
                }
            }
        }
        let Some(local_index) = self
            .machines
            .iter()
            .position(|m| m.name == self.local_machine)
        else {
            return bad(format!(
                "local machine {:?} is not in the machine list",
                self.local_machine
            ));
        };
        let local = &self.machines[local_index];
        let sizes: Vec<(usize, usize)> = local
            .interfaces
            .iter()
            .map(|i| datagram_bytes(&i.network))
            .collect();
        let networks: Vec<(String, SocketAddr, usize)> = local
            .interfaces
            .iter()
            .zip(&sizes)
            .map(|(i, &(_, max))| (i.network.clone(), i.addr, max))
            .collect();
        let mut peers = Vec::new();
        for (i, m) in self.machines.iter().enumerate() {
            let mut paths = Vec::new();
            if i != local_index {
                for (n, ((net, _, _), &(start, max))) in networks.iter().zip(&sizes).enumerate() {
                    if let Some(ifc) = m.interfaces.iter().find(|x| &x.network == net) {
                        paths.push(PathConfig {
                            network: NetworkId(n as u8),
                            remote_addr: ifc.addr,
                            datagram_bytes: start,
                            datagram_max: max,
                        });
                    }
                }
                if paths.is_empty() {
                    return bad(format!(
                        "machine {:?} shares no network with local machine {:?}",
                        m.name, self.local_machine
                    ));
                }
            }
            peers.push(PeerConfig {
                name: m.name.clone(),
                machine_id: ids[i],
                promote_failure_timeout: (!m.promote_failure_timeout.is_zero())
                    .then_some(m.promote_failure_timeout),
                paths,
            });
        }
        Ok(Topology {
            cluster_id: wire::cluster_id(&self.cluster_name),
            local: PeerId(local_index as u16),
            local_machine_id: ids[local_index],
            networks,
            peers,
        })
    }
}

impl Topology {
    /// Index of the machine called `name`.
    pub fn peer_by_name(&self, name: &str) -> Option<PeerId> {
        self.peers
            .iter()
            .position(|p| p.name == name)
            .map(|i| PeerId(i as u16))
    }
}
