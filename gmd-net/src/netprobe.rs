//! netprobe: round-trip time and throughput per message size over each path
//! to a peer — the reference's `geonet` tool, as a library function that
//! `gmdctl netprobe <peer>` prints.
//!
//! Each path is measured in turn by pinning the peer's data traffic to it
//! (other traffic to that peer follows the pinned path for the duration), and
//! the peer's driver answers probe requests itself on [`StreamId::PROBE`], so
//! no application handler is needed on the other side.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{NetError, NetworkId, Node, PeerId, StreamId};

/// Requests in flight while measuring throughput.
const PROBE_WINDOW: usize = 8;

/// Measurements of one message size on one path.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeProbe {
    /// Request size in bytes (replies are 8 bytes).
    pub message_bytes: usize,
    /// Fastest sequential round trip.
    pub rtt_min: Duration,
    /// Mean sequential round trip.
    pub rtt_avg: Duration,
    /// Slowest sequential round trip.
    pub rtt_max: Duration,
    /// Request bytes per second with `PROBE_WINDOW` requests in flight.
    pub throughput_bytes_per_sec: f64,
}

/// Measurements of one path.
#[derive(Debug, Clone, PartialEq)]
pub struct PathProbe {
    /// Network name.
    pub network: String,
    /// The path's smoothed RTT after the probe, as GeoMessage estimates it.
    pub srtt: Option<Duration>,
    /// Whether the path was up.
    pub up: bool,
    /// One entry per size; empty if the path was down.
    pub sizes: Vec<SizeProbe>,
}

/// Result of [`netprobe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// Peer name.
    pub peer: String,
    /// One entry per path.
    pub paths: Vec<PathProbe>,
}

/// Default sizes: from one small datagram to a large fragmented message.
pub const PROBE_SIZES_DEFAULT: &[usize] = &[64, 1024, 8192, 65_536, 1 << 20];

/// Probes every path to `peer` with `rounds` requests per size (sequential
/// for RTT, then pipelined for throughput). Restores automatic path choice
/// afterwards, also on error.
///
/// # Errors
/// `PeerDown`/`PeerRestarted` if the peer goes away, `BadPeer`, `Shutdown`.
pub async fn netprobe(
    node: &Node,
    peer: PeerId,
    sizes: &[usize],
    rounds: usize,
) -> Result<ProbeReport, NetError> {
    let rounds = rounds.max(1);
    let name = node
        .peer_name(peer)
        .ok_or(NetError::BadPeer(peer.0))?
        .to_string();
    let networks: Vec<(NetworkId, String)> = node
        .topology()
        .peers
        .get(peer.0 as usize)
        .ok_or(NetError::BadPeer(peer.0))?
        .paths
        .iter()
        .map(|p| {
            (
                p.network,
                node.network_name(p.network).unwrap_or("?").to_string(),
            )
        })
        .collect();
    let mut paths = Vec::new();
    for (net, net_name) in networks {
        let up = path_state(node, &name, &net_name).await?.0;
        let mut probes = Vec::new();
        if up {
            node.pin_path(peer, Some(net)).await?;
            let r = probe_sizes(node, peer, sizes, rounds).await;
            node.pin_path(peer, None).await?;
            probes = r?;
        }
        let (up, srtt) = path_state(node, &name, &net_name).await?;
        paths.push(PathProbe {
            network: net_name,
            srtt,
            up,
            sizes: probes,
        });
    }
    Ok(ProbeReport { peer: name, paths })
}

async fn path_state(
    node: &Node,
    peer: &str,
    network: &str,
) -> Result<(bool, Option<Duration>), NetError> {
    let st = node.stats().await?;
    Ok(st
        .paths
        .iter()
        .find(|p| p.peer == peer && p.network == network)
        .map_or((false, None), |p| (p.up, p.srtt)))
}

async fn probe_sizes(
    node: &Node,
    peer: PeerId,
    sizes: &[usize],
    rounds: usize,
) -> Result<Vec<SizeProbe>, NetError> {
    let mut out = Vec::new();
    for &size in sizes {
        let body = Bytes::from(vec![0xA5; size]);
        let mut rtts = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            node.request(peer, StreamId::PROBE, body.clone()).await?;
            rtts.push(t.elapsed());
        }
        let start = Instant::now();
        let mut sent = 0;
        while sent < rounds {
            let n = PROBE_WINDOW.min(rounds - sent);
            let futs: Vec<_> = (0..n)
                .map(|_| node.request(peer, StreamId::PROBE, body.clone()))
                .collect();
            for r in join_all(futs).await {
                r?;
            }
            sent += n;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let sum: Duration = rtts.iter().sum();
        out.push(SizeProbe {
            message_bytes: size,
            rtt_min: *rtts.iter().min().expect("rounds >= 1"),
            rtt_avg: sum / rtts.len() as u32,
            rtt_max: *rtts.iter().max().expect("rounds >= 1"),
            throughput_bytes_per_sec: (size * rounds) as f64 / secs,
        });
    }
    Ok(out)
}

/// Polls all futures concurrently until each is done.
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
