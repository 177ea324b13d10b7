//! Counters in the shape of the reference's `krpcstat`: per machine (RPC level)
//! and per network (packet level), plus per-path state and security rejects.
//!
//! All counters are cumulative since the endpoint started. The figures of an
//! interval are the difference of two snapshots: [`Stats::since`].

use std::time::Duration;

/// Per remote machine: message (RPC) level counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineStats {
    /// Machine name.
    pub name: String,
    /// Requests and one-way messages sent (originals, not resends): the
    /// reference's "rpcs".
    pub rpcs_sent: u64,
    /// Requests and one-way messages received and delivered.
    pub rpcs_received: u64,
    /// Message payload bytes sent (originals).
    pub bytes_sent: u64,
    /// Message payload bytes delivered.
    pub bytes_received: u64,
    /// Replies sent.
    pub replies_sent: u64,
    /// Replies received and matched to a request.
    pub replies_received: u64,
    /// Requests that failed (peer down or restarted).
    pub failures: u64,
    /// Messages sent that needed more than one fragment.
    pub fragmented: u64,
    /// Fragments sent for fragmented messages (originals).
    pub fragments: u64,
    /// Duplicate message fragments received and dropped.
    pub duplicate_fragments: u64,
    /// Passing messages delivered before earlier ones of their ordered
    /// stream that had not arrived yet (after a loss).
    pub passed: u64,
    /// One-way messages the sending thread transmitted itself, the link
    /// being idle (`Node::try_post_now`), instead of the driver task.
    pub sent_now: u64,
    /// Datagrams to this machine whose data was declared lost and re-queued
    /// (retries, summed over its paths).
    pub resends: u64,
    /// Times the peer was declared down.
    pub peer_downs: u64,
    /// Times the peer's epoch changed (restart or session reset).
    pub restarts: u64,
    /// Whether the peer is up now.
    pub up: bool,
    /// The peer's epoch, if known.
    pub epoch: Option<u64>,
    /// The network traffic goes to now.
    pub active_network: Option<String>,
}

impl MachineStats {
    /// Percentage of sent messages that were fragmented.
    pub fn fragmented_percent(&self) -> f64 {
        if self.rpcs_sent + self.replies_sent == 0 {
            0.0
        } else {
            100.0 * self.fragmented as f64 / (self.rpcs_sent + self.replies_sent) as f64
        }
    }
}

/// Per local network: packet level counters, summed over peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Network name.
    pub name: String,
    /// Datagrams sent (including resends and pings/acks).
    pub packets_sent: u64,
    /// Datagrams received and authenticated.
    pub packets_received: u64,
    /// Bytes of datagrams sent.
    pub bytes_sent: u64,
    /// Bytes of datagrams received and authenticated.
    pub bytes_received: u64,
    /// Packets whose data was declared lost and re-queued (resends).
    pub resends: u64,
    /// Packets declared lost that were acknowledged after all (a late
    /// acknowledgement or reordering): resends that were not needed.
    pub spurious: u64,
    /// Retransmission timeouts that fired.
    pub timeouts: u64,
    /// Times a path on this network was declared down.
    pub failures: u64,
    /// Duplicate datagrams received (network duplication or replay).
    pub duplicates: u64,
    /// Datagrams that carried no message data (pings, acks, hellos, credit).
    pub other: u64,
    /// Smoothed RTT of the best path on this network, if measured.
    pub srtt: Option<Duration>,
    /// The kernel takes a batch of datagrams as one send (UDP GSO); false
    /// once it refused one, or without a socket (the simulator).
    pub gso: bool,
    /// The kernel hands received datagrams over in batches (UDP GRO).
    pub gro: bool,
    /// Receive system calls (`recvmmsg`) on this network's socket.
    pub receive_calls: u64,
    /// Receive system calls that found nothing to read: each one is a
    /// wake-up or turn spent for no datagram.
    pub empty_receives: u64,
}

/// State of one path (interface pair) to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStats {
    /// Peer machine name.
    pub peer: String,
    /// Network name.
    pub network: String,
    /// Whether the path is considered up.
    pub up: bool,
    /// Whether new traffic to the peer goes here.
    pub active: bool,
    /// Smoothed RTT, if measured.
    pub srtt: Option<Duration>,
    /// RTT variance, if measured.
    pub rttvar: Option<Duration>,
    /// Current retransmission timeout.
    pub rto: Duration,
    /// Congestion window in bytes.
    pub cwnd_bytes: usize,
    /// Bytes in flight.
    pub in_flight_bytes: usize,
    /// Congestion-window decreases undone because every loss behind them
    /// proved spurious.
    pub undone_decreases: u64,
    /// Size of data datagrams now (UDP payload).
    pub datagram_bytes: usize,
    /// Largest size the path may use: the discovery's ceiling, or the
    /// configured size when it is fixed.
    pub datagram_max: usize,
    /// Path-MTU probes sent.
    pub mtu_probes: u64,
    /// Times datagrams above the starting size stopped passing and the
    /// size fell back to it.
    pub black_holes: u64,
}

/// Datagrams rejected before they could have any effect, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityStats {
    /// Too short to hold header and tag, or otherwise cut off.
    pub truncated: u64,
    /// Unknown version or flag bits.
    pub bad_version: u64,
    /// Cluster id of another cluster.
    pub wrong_cluster: u64,
    /// Sender or receiver machine id not ours / not configured, or from a
    /// source address that is not the peer's.
    pub unknown_machine: u64,
    /// Tag did not verify: wrong key, forgery or corruption.
    pub bad_auth: u64,
    /// Packet number already seen or older than the replay window.
    pub replayed: u64,
    /// Authenticated but from an old epoch or addressed to one of ours.
    pub stale_epoch: u64,
    /// Authenticated but frames did not parse or broke a protocol bound.
    pub malformed: u64,
}

/// Datagrams from one source address whose authentication tag did not
/// verify (see [`SecurityStats::bad_auth`]): the usual sign of machines
/// holding different cluster keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailures {
    /// The source address.
    pub from: std::net::SocketAddr,
    /// Datagrams from it that failed authentication.
    pub count: u64,
}

/// Source addresses tracked in [`Stats::auth_failures`] at most.
pub const AUTH_FAILURE_SOURCES_MAX: usize = 64;

/// A snapshot of every counter of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// One entry per remote machine.
    pub machines: Vec<MachineStats>,
    /// One entry per local network.
    pub networks: Vec<NetworkStats>,
    /// One entry per (peer, network) path.
    pub paths: Vec<PathStats>,
    /// Rejected datagrams.
    pub security: SecurityStats,
    /// Datagrams dropped by the `recv_loss_ppm` test knob.
    pub injected_losses: u64,
    /// Authentication failures per source address (filled by the driver;
    /// at most [`AUTH_FAILURE_SOURCES_MAX`] addresses, the first seen).
    pub auth_failures: Vec<AuthFailures>,
}

macro_rules! sub_fields {
    ($new:expr, $old:expr, $($f:ident),*) => {
        $( $new.$f = $new.$f.saturating_sub($old.$f); )*
    };
}

impl Stats {
    /// The counters accumulated between `earlier` and `self` (gauges such as
    /// RTT, up and active keep their current values).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut d = self.clone();
        for m in &mut d.machines {
            if let Some(o) = earlier.machines.iter().find(|o| o.name == m.name) {
                sub_fields!(
                    m,
                    o,
                    rpcs_sent,
                    rpcs_received,
                    bytes_sent,
                    bytes_received,
                    replies_sent,
                    replies_received,
                    failures,
                    fragmented,
                    fragments,
                    sent_now,
                    duplicate_fragments,
                    passed,
                    resends,
                    peer_downs,
                    restarts
                );
            }
        }
        for n in &mut d.networks {
            if let Some(o) = earlier.networks.iter().find(|o| o.name == n.name) {
                sub_fields!(
                    n,
                    o,
                    packets_sent,
                    packets_received,
                    bytes_sent,
                    bytes_received,
                    resends,
                    spurious,
                    timeouts,
                    failures,
                    duplicates,
                    other
                );
            }
        }
        let (s, o) = (&mut d.security, &earlier.security);
        sub_fields!(
            s,
            o,
            truncated,
            bad_version,
            wrong_cluster,
            unknown_machine,
            bad_auth,
            replayed,
            stale_epoch,
            malformed
        );
        d.injected_losses = d.injected_losses.saturating_sub(earlier.injected_losses);
        for a in &mut d.auth_failures {
            if let Some(o) = earlier.auth_failures.iter().find(|o| o.from == a.from) {
                a.count = a.count.saturating_sub(o.count);
            }
        }
        d
    }

    /// Total rejected datagrams of all classes.
    pub fn rejected_total(&self) -> u64 {
        let s = &self.security;
        s.truncated
            + s.bad_version
            + s.wrong_cluster
            + s.unknown_machine
            + s.bad_auth
            + s.replayed
            + s.stale_epoch
            + s.malformed
    }
}
