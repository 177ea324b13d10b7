//! Statistics reports: what `gmdd` answers to `stats` and `netstat`, and
//! their renderings as text (≤ 80 columns, like iostat) for `gmdstat` and
//! `gmdctl netstat`.
//!
//! The JSON shapes are stable: fields are only ever added, and a change
//! that is not an addition bumps [`REPORT_SCHEMA`]. docs/OPERATIONS.md
//! documents every field.

use std::fmt::Write as _;

use gmd_core::config::Mode;
use gmd_core::latency::{LATENCY_BUCKETS, latency_percentile_us};
use gmd_core::statemap::AdminState;
use serde::{Deserialize, Serialize};

/// Version of the report schemas ([`Report`], [`NetReport`]).
pub const REPORT_SCHEMA: u32 = 1;

/// Result of the `stats` command: every figure gmdstat shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    /// Machine name.
    pub machine: String,
    /// Milliseconds since gmdd started.
    pub uptime_ms: u64,
    /// One entry per device requested.
    pub devices: Vec<DeviceReport>,
    /// One entry per remote machine (GeoMessage message level).
    pub peers: Vec<PeerReport>,
}

/// Figures of one device. Counters are cumulative since the device started
/// (zero when it is not AVAILABLE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Lifecycle state.
    pub state: AdminState,
    /// Mode configured.
    pub mode: Mode,
    /// Mode in effect: `sync`, `mwc`, `async`, `async-hwm-fallback` (async
    /// behaving as mwc above the high water mark), `standalone` (no peer),
    /// or `stopped` / `defined` when not AVAILABLE.
    pub mode_in_effect: String,
    /// The peer mirrored with, when connected.
    pub peer: Option<String>,
    /// Milliseconds since the device started.
    pub uptime_ms: u64,
    /// Requests of local applications.
    pub local: LocalCounters,
    /// Writes originated by the remote peer and applied here.
    pub remote: RemoteCounters,
    /// Local writes sent to the peer, and time spent waiting on it.
    pub mirrored: MirrorCounters,
    /// Latency of local writes (application view: submit to completion).
    pub latency: Latency,
    /// Async backlog and high water mark.
    pub backlog: Backlog,
    /// State map cell counts, when the map is open.
    pub map: Option<MapCounts>,
    /// State map writes since start (group commits amortise them).
    pub map_writes: MapWrites,
    /// The current resync, if one runs.
    pub resync: Option<Resync>,
    /// The role the device runs in here (`primary`, `secondary`, `split`),
    /// when AVAILABLE.
    #[serde(default)]
    pub role: Option<String>,
    /// Device size, bytes.
    #[serde(default)]
    pub size_bytes: u64,
    /// Resync data this side sent since the device started, bytes.
    #[serde(default)]
    pub resync_sent_bytes: u64,
    /// Resync regions found identical by checksum since the device
    /// started, bytes (not sent, or not received): `resync_checksums`.
    #[serde(default)]
    pub resync_same_bytes: u64,
    /// Why mirroring with the peer is refused, when it is.
    #[serde(default)]
    pub refused: Option<String>,
    /// Writes are held after the peer was lost (site isolation): what is
    /// held and what ends it, when they are.
    #[serde(default)]
    pub frozen: Option<String>,
}

impl DeviceReport {
    /// Bytes that differ from the peer or are not known to be identical
    /// (stale and inconsistent regions), at most the device's size.
    pub fn out_of_sync_bytes(&self) -> u64 {
        let regions = self.map.map_or(0, |m| m.stale + m.inconsistent);
        let bytes = regions * gmd_core::units::REGION_SIZE_BYTES;
        if self.size_bytes > 0 {
            bytes.min(self.size_bytes)
        } else {
            bytes
        }
    }

    /// Whether the refusal is a divergence (both sides wrote while apart).
    pub fn divergence_refused(&self) -> bool {
        self.refused
            .as_deref()
            .is_some_and(|r| r.contains("divergence") || r.contains("holds writes of its own"))
    }
}

/// Requests of local applications.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalCounters {
    /// Reads completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Of the reads, those the frontend served itself, without the device
    /// thread (ublk queue threads, when no resync holds reads back).
    #[serde(default)]
    pub direct_reads: u64,
    /// Writes (including write-zeroes and trims) completed.
    pub writes: u64,
    /// Of the writes, those whose local part the frontend ran itself, without
    /// the device thread (ublk queue threads).
    #[serde(default)]
    pub direct_writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests in the device now (a gauge).
    pub in_flight: u64,
    /// Writes that waited for an earlier overlapping write to finish (so
    /// that both copies end with the later one's data).
    #[serde(default)]
    pub overlap_waits: u64,
}

/// Writes originated by the remote peer (mirrored or resynchronised to here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCounters {
    /// Operations applied.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

/// Local writes sent to the peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorCounters {
    /// Writes sent.
    pub writes: u64,
    /// Bytes of writes sent.
    pub write_bytes: u64,
    /// Flushes sent.
    pub flushes: u64,
    /// Writes or flushes the peer failed or never answered.
    pub failures: u64,
    /// Microseconds local writes waited for the peer after their local part
    /// finished (the reference's time spent satisfying KRPC requests).
    pub wait_us: u64,
    /// Times the peer was dropped for acknowledging nothing for its stall
    /// limit while writes waited.
    pub stalls: u64,
}

/// Write latency histogram and percentiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Writes counted.
    pub writes: u64,
    /// Sum of their latencies, microseconds.
    pub sum_us: u64,
    /// 50th percentile, µs (upper bound of its power-of-two bucket).
    pub p50_us: Option<u64>,
    /// 99th percentile, µs.
    pub p99_us: Option<u64>,
    /// 99.9th percentile, µs.
    pub p999_us: Option<u64>,
    /// Bucket `i` counts writes that took below `2^(i+1)` µs (and at least
    /// `2^i` µs for `i > 0`); the last bucket takes the rest.
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Latency {
    /// Percentiles filled in from a histogram.
    pub fn from_buckets(buckets: [u64; LATENCY_BUCKETS], sum_us: u64) -> Latency {
        Latency {
            writes: buckets.iter().sum(),
            sum_us,
            p50_us: latency_percentile_us(&buckets, 0.5),
            p99_us: latency_percentile_us(&buckets, 0.99),
            p999_us: latency_percentile_us(&buckets, 0.999),
            buckets,
        }
    }

    /// The latencies of the writes counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Latency) -> Latency {
        let buckets = std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i]));
        Latency::from_buckets(buckets, self.sum_us.saturating_sub(earlier.sum_us))
    }
}

/// Async backlog: writes completed locally, not yet acknowledged by the peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    /// Bytes in the backlog now.
    pub bytes: u64,
    /// The high water mark, bytes (async only; 0 otherwise).
    pub hwm_bytes: u64,
    /// Times async fell back to mwc at the high water mark.
    pub hwm_fallbacks: u64,
    /// Whether async behaves as mwc now.
    pub fallback_active: bool,
}

/// State map writes: commits (one sync each) and the pages they wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapWrites {
    /// Map commits.
    pub commits: u64,
    /// Map pages written by them.
    pub pages_written: u64,
}

/// State map cell counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCounts {
    /// Regions (cells) of the device.
    pub regions: u64,
    /// Regions marked stale: they differ from the peer (dirty).
    pub stale: u64,
    /// Regions with writes in flight or being resynchronised.
    pub inconsistent: u64,
    /// Regions written recently, identical on both sides.
    pub hot: u64,
}

/// Progress of the current resync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resync {
    /// This side's part: `source` or `target`.
    pub role: String,
    /// Regions of the resync.
    pub regions_total: u64,
    /// Regions left.
    pub regions_left: u64,
    /// Rate since it started, bytes per second (source side; 0 on the target).
    pub bytes_per_s: u64,
    /// Estimated seconds to finish (source side).
    pub eta_s: Option<u64>,
}

/// One remote machine, GeoMessage message level.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Machine name.
    pub machine: String,
    /// Whether GeoMessage has a session with it.
    pub up: bool,
    /// The network traffic to it uses now.
    pub active_network: Option<String>,
    /// Messages sent (requests and one-way; originals, not resends).
    pub messages_sent: u64,
    /// Datagrams to it re-sent after a loss.
    pub retries: u64,
    /// Replies received.
    pub replies: u64,
    /// Message bytes sent (written to it).
    pub bytes_sent: u64,
    /// Message bytes received (read from it).
    pub bytes_received: u64,
    /// Requests that failed (peer down or restarted).
    pub failures: u64,
}

/// The counters of a device accumulated over an interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInterval {
    /// Length of the interval, seconds.
    pub seconds: f64,
    /// Local requests in the interval (`in_flight` is the current gauge).
    pub local: LocalCounters,
    /// Remote-originated writes in the interval.
    pub remote: RemoteCounters,
    /// Writes sent to the peer in the interval.
    pub mirrored: MirrorCounters,
    /// Write latencies in the interval.
    pub latency: Latency,
}

impl DeviceReport {
    /// The counters accumulated between `earlier` and `self`, over `seconds`.
    pub fn since(&self, earlier: &DeviceReport, seconds: f64) -> DeviceInterval {
        let (l, e) = (&self.local, &earlier.local);
        let (r, er) = (&self.remote, &earlier.remote);
        let (m, em) = (&self.mirrored, &earlier.mirrored);
        DeviceInterval {
            seconds,
            local: LocalCounters {
                reads: l.reads.saturating_sub(e.reads),
                read_bytes: l.read_bytes.saturating_sub(e.read_bytes),
                direct_reads: l.direct_reads.saturating_sub(e.direct_reads),
                writes: l.writes.saturating_sub(e.writes),
                direct_writes: l.direct_writes.saturating_sub(e.direct_writes),
                write_bytes: l.write_bytes.saturating_sub(e.write_bytes),
                flushes: l.flushes.saturating_sub(e.flushes),
                errors: l.errors.saturating_sub(e.errors),
                in_flight: l.in_flight,
                overlap_waits: l.overlap_waits.saturating_sub(e.overlap_waits),
            },
            remote: RemoteCounters {
                writes: r.writes.saturating_sub(er.writes),
                write_bytes: r.write_bytes.saturating_sub(er.write_bytes),
            },
            mirrored: MirrorCounters {
                writes: m.writes.saturating_sub(em.writes),
                write_bytes: m.write_bytes.saturating_sub(em.write_bytes),
                flushes: m.flushes.saturating_sub(em.flushes),
                failures: m.failures.saturating_sub(em.failures),
                wait_us: m.wait_us.saturating_sub(em.wait_us),
                stalls: m.stalls.saturating_sub(em.stalls),
            },
            latency: self.latency.since(&earlier.latency),
        }
    }

    /// The counters since the device started, as an interval.
    pub fn since_start(&self) -> DeviceInterval {
        DeviceInterval {
            seconds: self.uptime_ms as f64 / 1000.0,
            local: self.local,
            remote: self.remote,
            mirrored: self.mirrored,
            latency: self.latency,
        }
    }
}

/// One report of gmdstat's JSON output (one object per line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GmdstatJson {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    /// Machine name.
    pub machine: String,
    /// Seconds covered by `interval` of each device; `null` in the first
    /// report, whose rates are since start.
    pub interval_s: Option<f64>,
    /// Devices: the daemon's figures plus the interval's.
    pub devices: Vec<GmdstatDevice>,
    /// Remote machines.
    pub peers: Vec<PeerReport>,
}

/// A device in [`GmdstatJson`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GmdstatDevice {
    /// Cumulative figures.
    #[serde(flatten)]
    pub report: DeviceReport,
    /// The counters of this report's interval (since start in the first).
    pub interval: DeviceInterval,
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

fn per_s(x: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { x / seconds } else { 0.0 }
}

/// `x` with one decimal, or shorter (no decimals, then k/M/G/T) to fit `width`.
fn fit(x: f64, width: usize) -> String {
    let text = format!("{x:.1}");
    if text.len() <= width {
        return text;
    }
    let text = format!("{x:.0}");
    if text.len() <= width {
        return text;
    }
    let mut v = x;
    for unit in ["k", "M", "G", "T", "P"] {
        v /= 1000.0;
        let text = format!("{v:.0}{unit}");
        if text.len() <= width {
            return text;
        }
    }
    format!("{x:e}")
}

/// A count, shortened with k/M/G/T to fit `width` when needed.
fn count(n: u64, width: usize) -> String {
    let text = n.to_string();
    if text.len() <= width {
        text
    } else {
        fit(n as f64, width)
    }
}

/// Whether the kernel batches the network's datagrams, when the daemon
/// says (without batching each datagram is its own trip through the
/// kernel, which small virtual machines feel).
fn batching(n: &NetNetwork) -> Option<String> {
    let word = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    };
    (n.gso.is_some() || n.gro.is_some()).then(|| {
        format!(
            "  batched by the kernel: sending {} (GSO), receiving {} (GRO)",
            word(n.gso),
            word(n.gro)
        )
    })
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{:.3}", u as f64 / 1000.0))
}

/// Splits `text` at spaces into lines of at most `width` characters (a
/// longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Renders one gmdstat report as text, each line at most 80 columns.
/// `earlier` is the previous report (`None`: rates since start).
pub fn render_gmdstat(now: &Report, earlier: Option<(&Report, f64)>, summary: bool) -> String {
    let mut out = String::new();
    let span = match earlier {
        Some((_, s)) => format!("last {s:.1} s"),
        None => "since start".into(),
    };
    let _ = writeln!(out, "gmdstat: machine {}, rates {span}", now.machine);
    let intervals: Vec<DeviceInterval> = now
        .devices
        .iter()
        .map(|d| {
            match earlier
                .and_then(|(e, s)| e.devices.iter().find(|p| p.name == d.name).map(|p| (p, s)))
            {
                Some((p, s)) => d.since(p, s),
                None => d.since_start(),
            }
        })
        .collect();
    if summary {
        let _ = writeln!(
            out,
            "{:<11} {:<10} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>6}",
            "GMD", "MODE", "lw/s", "lKiB/s", "rw/s", "rKiB/s", "p99ms", "bklgKiB", "stale"
        );
        for (d, i) in now.devices.iter().zip(&intervals) {
            let _ = writeln!(
                out,
                "{:<11} {:<10} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>6}",
                d.name,
                if d.mode_in_effect == "async-hwm-fallback" {
                    "async-hwm"
                } else {
                    &d.mode_in_effect
                },
                fit(per_s(i.local.writes as f64, i.seconds), 7),
                fit(per_s(kib(i.local.write_bytes), i.seconds), 8),
                fit(per_s(i.remote.writes as f64, i.seconds), 7),
                fit(per_s(kib(i.remote.write_bytes), i.seconds), 8),
                i.latency
                    .p99_us
                    .map_or_else(|| "-".into(), |u| fit(u as f64 / 1000.0, 7)),
                fit(kib(d.backlog.bytes), 7),
                d.map.map_or(0, |m| m.stale),
            );
        }
        let _ = writeln!(
            out,
            "l = local, r = remote-originated, w = writes, bklg = async backlog"
        );
        return out;
    }
    for (d, i) in now.devices.iter().zip(&intervals) {
        let peer = match &d.peer {
            Some(p) => format!("peer {p}"),
            None => "no peer".into(),
        };
        let _ = writeln!(
            out,
            "\n{}  {}  mode {} (configured {})  {peer}",
            d.name, d.state, d.mode_in_effect, d.mode
        );
        if let Some(frozen) = &d.frozen {
            for line in wrap(&format!("FROZEN {frozen}"), 76) {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(
            out,
            "  {:<16} {:>11} {:>12} {:>10} {:>11}",
            "", "count", "KiB", "count/s", "KiB/s"
        );
        let mut row = |what: &str, n: u64, bytes: Option<u64>| {
            let (k, ks) = match bytes {
                Some(b) => (fit(kib(b), 12), fit(per_s(kib(b), i.seconds), 11)),
                None => ("-".into(), "-".into()),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:>11} {:>12} {:>10} {:>11}",
                what,
                count(n, 11),
                k,
                fit(per_s(n as f64, i.seconds), 10),
                ks
            );
        };
        row(
            "local transfers",
            i.local.reads + i.local.writes,
            Some(i.local.read_bytes + i.local.write_bytes),
        );
        row("local writes", i.local.writes, Some(i.local.write_bytes));
        row("local flushes", i.local.flushes, None);
        row("remote writes", i.remote.writes, Some(i.remote.write_bytes));
        row(
            "sent to peer",
            i.mirrored.writes,
            Some(i.mirrored.write_bytes),
        );
        let mean_wait = if i.local.writes > 0 {
            i.mirrored.wait_us as f64 / i.local.writes as f64 / 1000.0
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "  waited on remote {:.3} ms ({mean_wait:.3} ms per write), {} failed",
            i.mirrored.wait_us as f64 / 1000.0,
            i.mirrored.failures
        );
        let _ = writeln!(
            out,
            "  write latency    p50 {} ms  p99 {} ms  p99.9 {} ms",
            ms(i.latency.p50_us),
            ms(i.latency.p99_us),
            ms(i.latency.p999_us)
        );
        if d.mode == Mode::Async {
            let _ = writeln!(
                out,
                "  async backlog    {:.1} of {:.1} KiB (hwm), {} fallback(s) to mwc",
                kib(d.backlog.bytes),
                kib(d.backlog.hwm_bytes),
                d.backlog.hwm_fallbacks
            );
        }
        if let Some(m) = &d.map {
            let _ = writeln!(
                out,
                "  state map        {} regions: {} stale, {} inconsistent, {} hot",
                m.regions, m.stale, m.inconsistent, m.hot
            );
        }
        match &d.resync {
            Some(r) => {
                let eta = r.eta_s.map_or_else(|| "-".into(), |s| format!("{s} s"));
                let _ = writeln!(
                    out,
                    "  resync           {}: {} of {} regions left, {:.1} KiB/s, eta {eta}",
                    r.role,
                    r.regions_left,
                    r.regions_total,
                    kib(r.bytes_per_s)
                );
            }
            None => {
                let _ = writeln!(out, "  resync           none");
            }
        }
    }
    if !now.peers.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<12} {:<4} {:<10} {:>8} {:>7} {:>8} {:>12} {:>12}",
            "REMOTE HOST", "UP", "PATH", "msgs", "retries", "replies", "KiB written", "KiB read"
        );
        let earlier_peers = earlier.map(|(e, _)| &e.peers);
        for p in &now.peers {
            let before = earlier_peers
                .and_then(|ps| ps.iter().find(|o| o.machine == p.machine))
                .cloned()
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<12} {:<4} {:<10} {:>8} {:>7} {:>8} {:>12} {:>12}",
                p.machine,
                if p.up { "yes" } else { "no" },
                p.active_network.as_deref().unwrap_or("-"),
                count(p.messages_sent.saturating_sub(before.messages_sent), 8),
                count(p.retries.saturating_sub(before.retries), 7),
                count(p.replies.saturating_sub(before.replies), 8),
                fit(kib(p.bytes_sent.saturating_sub(before.bytes_sent)), 12),
                fit(
                    kib(p.bytes_received.saturating_sub(before.bytes_received)),
                    12
                ),
            );
        }
    }
    out
}

/// Result of the `netstat` command: GeoMessage's counters (the reference's
/// krpcstat), cumulative since gmdd started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetReport {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    /// Machine name.
    pub machine: String,
    /// Per remote machine, message (RPC) level.
    pub machines: Vec<NetMachine>,
    /// Per local network, datagram level.
    pub networks: Vec<NetNetwork>,
    /// Per (remote machine, network) path.
    pub paths: Vec<NetPath>,
    /// Datagrams rejected before they had any effect (all reasons).
    pub rejected: u64,
    /// Of those, datagrams whose authentication failed, per source address
    /// (the cluster keys, or `encrypt`, may differ).
    #[serde(default)]
    pub auth_failures: Vec<AuthFailure>,
}

/// Datagrams from one address that failed authentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthFailure {
    /// Source address (`ip:port`).
    pub from: String,
    /// The configured machine with an interface at that address, if any.
    pub machine: Option<String>,
    /// Datagrams that failed authentication.
    pub count: u64,
}

/// What to say about datagrams from `from` that fail authentication.
pub fn auth_failure_text(f: &AuthFailure) -> String {
    format!(
        "{} datagram(s) from {}{} failed authentication: the cluster keys (key_file) or `encrypt` may differ between the machines",
        f.count,
        f.from,
        f.machine
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    )
}

/// One remote machine in a [`NetReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMachine {
    /// Machine name.
    pub name: String,
    /// Whether it is up.
    pub up: bool,
    /// The network traffic to it uses now.
    pub active_network: Option<String>,
    /// Requests and one-way messages sent (originals).
    pub rpcs_sent: u64,
    /// Requests and one-way messages received.
    pub rpcs_received: u64,
    /// Message bytes sent.
    pub bytes_sent: u64,
    /// Message bytes received.
    pub bytes_received: u64,
    /// Replies sent.
    pub replies_sent: u64,
    /// Replies received.
    pub replies_received: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Messages that needed more than one fragment.
    pub fragmented: u64,
    /// Fragments of those messages.
    pub fragments: u64,
    /// Datagrams re-sent after a loss.
    pub resends: u64,
    /// Messages from it delivered before earlier ones held up by a loss
    /// (writes and answers that depend on none of those). Absent from older
    /// daemons' reports: 0.
    #[serde(default)]
    pub passed: u64,
    /// Messages to it that the thread holding them sent itself, the link
    /// being idle (a write at queue depth 1: no hop to the network task).
    /// Absent from older daemons' reports: 0.
    #[serde(default)]
    pub sent_now: u64,
    /// Times it was declared down.
    pub peer_downs: u64,
}

/// One local network in a [`NetReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNetwork {
    /// Network name.
    pub name: String,
    /// Datagrams sent (with resends, pings and acks).
    pub packets_sent: u64,
    /// Datagrams received and authenticated.
    pub packets_received: u64,
    /// Bytes of datagrams sent.
    pub bytes_sent: u64,
    /// Bytes of datagrams received.
    pub bytes_received: u64,
    /// Datagrams whose data was re-sent.
    pub resends: u64,
    /// Datagrams declared lost and acknowledged after all (late or
    /// reordered, not lost). Absent from a gmdd before 2026-12.
    #[serde(default)]
    pub spurious: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Times a path on it was declared down.
    pub failures: u64,
    /// Duplicate datagrams received.
    pub duplicates: u64,
    /// Datagrams without message data (pings, acks, hellos, credit).
    pub other: u64,
    /// Smoothed RTT of its best path, µs.
    pub srtt_us: Option<u64>,
    /// The kernel takes a batch of datagrams as one send (UDP GSO). Absent
    /// from a gmdd before 2026-12-07.
    #[serde(default)]
    pub gso: Option<bool>,
    /// The kernel hands received datagrams over in batches (UDP GRO).
    #[serde(default)]
    pub gro: Option<bool>,
}

/// One path in a [`NetReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPath {
    /// Remote machine.
    pub peer: String,
    /// Network.
    pub network: String,
    /// Whether the path is up.
    pub up: bool,
    /// Whether traffic to the peer uses it now.
    pub active: bool,
    /// Smoothed RTT, µs.
    pub srtt_us: Option<u64>,
    /// RTT variance, µs.
    pub rttvar_us: Option<u64>,
    /// Retransmission timeout, µs.
    pub rto_us: u64,
    /// Congestion window, bytes.
    pub cwnd_bytes: u64,
    /// Bytes in flight.
    pub in_flight_bytes: u64,
    /// Size of its data datagrams now (UDP payload): the configured
    /// `datagram_size`, or what path-MTU discovery found. Absent from a
    /// gmdd before 2026-12-07 (evening).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagram_bytes: Option<u64>,
}

impl NetReport {
    /// Keeps only the named machines and networks (all when a list is empty).
    pub fn filter(&mut self, machines: &[String], networks: &[String]) {
        if !machines.is_empty() {
            self.machines.retain(|m| machines.contains(&m.name));
            self.paths.retain(|p| machines.contains(&p.peer));
        }
        if !networks.is_empty() {
            self.networks.retain(|n| networks.contains(&n.name));
            self.paths.retain(|p| networks.contains(&p.network));
        }
    }

    /// The counters accumulated between `earlier` and `self` (gauges keep
    /// their current values).
    pub fn since(&self, earlier: &NetReport) -> NetReport {
        let mut d = self.clone();
        for m in &mut d.machines {
            if let Some(o) = earlier.machines.iter().find(|o| o.name == m.name) {
                m.rpcs_sent = m.rpcs_sent.saturating_sub(o.rpcs_sent);
                m.rpcs_received = m.rpcs_received.saturating_sub(o.rpcs_received);
                m.bytes_sent = m.bytes_sent.saturating_sub(o.bytes_sent);
                m.bytes_received = m.bytes_received.saturating_sub(o.bytes_received);
                m.replies_sent = m.replies_sent.saturating_sub(o.replies_sent);
                m.replies_received = m.replies_received.saturating_sub(o.replies_received);
                m.failures = m.failures.saturating_sub(o.failures);
                m.fragmented = m.fragmented.saturating_sub(o.fragmented);
                m.fragments = m.fragments.saturating_sub(o.fragments);
                m.resends = m.resends.saturating_sub(o.resends);
                m.passed = m.passed.saturating_sub(o.passed);
                m.sent_now = m.sent_now.saturating_sub(o.sent_now);
                m.peer_downs = m.peer_downs.saturating_sub(o.peer_downs);
            }
        }
        for n in &mut d.networks {
            if let Some(o) = earlier.networks.iter().find(|o| o.name == n.name) {
                n.packets_sent = n.packets_sent.saturating_sub(o.packets_sent);
                n.packets_received = n.packets_received.saturating_sub(o.packets_received);
                n.bytes_sent = n.bytes_sent.saturating_sub(o.bytes_sent);
                n.bytes_received = n.bytes_received.saturating_sub(o.bytes_received);
                n.resends = n.resends.saturating_sub(o.resends);
                n.spurious = n.spurious.saturating_sub(o.spurious);
                n.timeouts = n.timeouts.saturating_sub(o.timeouts);
                n.failures = n.failures.saturating_sub(o.failures);
                n.duplicates = n.duplicates.saturating_sub(o.duplicates);
                n.other = n.other.saturating_sub(o.other);
            }
        }
        d.rejected = d.rejected.saturating_sub(earlier.rejected);
        for a in &mut d.auth_failures {
            if let Some(o) = earlier.auth_failures.iter().find(|o| o.from == a.from) {
                a.count = a.count.saturating_sub(o.count);
            }
        }
        d.auth_failures.retain(|a| a.count > 0);
        d
    }
}

/// Renders a netstat report as text (≤ 80 columns). `seconds` is the
/// interval the counters cover (`None`: since gmdd started, no rates).
/// `summary` leaves out the second line per machine and network, and the paths.
pub fn render_netstat(r: &NetReport, seconds: Option<f64>, summary: bool) -> String {
    let mut out = String::new();
    let rate = |x: f64| match seconds {
        Some(s) => fit(per_s(x, s), 8),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "netstat: machine {}, {}",
        r.machine,
        match seconds {
            Some(s) => format!("last {s:.1} s"),
            None => "since start".into(),
        }
    );
    let _ = writeln!(
        out,
        "{:<12} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8}",
        "MACHINE", "rpcs out", "rpcs/s", "KiB out", "KiB/s", "rpcs in", "KiB in", "replies"
    );
    for m in &r.machines {
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8}",
            m.name,
            count(m.rpcs_sent, 8),
            rate(m.rpcs_sent as f64),
            fit(kib(m.bytes_sent), 9),
            rate(kib(m.bytes_sent)),
            count(m.rpcs_received, 8),
            fit(kib(m.bytes_received), 9),
            count(m.replies_received, 8)
        );
        if !summary {
            let total = m.rpcs_sent + m.replies_sent;
            let frag = if total == 0 {
                0.0
            } else {
                100.0 * m.fragmented as f64 / total as f64
            };
            let _ = writeln!(
                out,
                "  {} failures {}  fragd {}  frags {}  %frag {frag:.1}  resends {}  path {}",
                if m.up { "up" } else { "DOWN" },
                m.failures,
                m.fragmented,
                m.fragments,
                m.resends,
                m.active_network.as_deref().unwrap_or("-")
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<12} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8}",
        "NETWORK", "pkts out", "pkts/s", "KiB out", "KiB/s", "pkts in", "KiB in", "srtt ms"
    );
    for n in &r.networks {
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8}",
            n.name,
            count(n.packets_sent, 8),
            rate(n.packets_sent as f64),
            fit(kib(n.bytes_sent), 9),
            rate(kib(n.bytes_sent)),
            count(n.packets_received, 8),
            fit(kib(n.bytes_received), 9),
            n.srtt_us
                .map_or_else(|| "-".into(), |u| fit(u as f64 / 1000.0, 8))
        );
        if !summary {
            let _ = writeln!(
                out,
                "  resends {}  spurious {}  timeouts {}  failures {}  dups {}  other {}",
                n.resends, n.spurious, n.timeouts, n.failures, n.duplicates, n.other
            );
            if let Some(line) = batching(n) {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    if !summary && !r.paths.is_empty() {
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<4} {:<6} {:>9} {:>9} {:>9} {:>8} {:>5}",
            "PATH TO",
            "NETWORK",
            "UP",
            "ACTIVE",
            "srtt ms",
            "rttvar ms",
            "rto ms",
            "cwnd KiB",
            "dgram"
        );
        for p in &r.paths {
            let _ = writeln!(
                out,
                "{:<12} {:<10} {:<4} {:<6} {:>9} {:>9} {:>9} {:>8} {:>5}",
                p.peer,
                p.network,
                if p.up { "yes" } else { "no" },
                if p.active { "yes" } else { "no" },
                ms(p.srtt_us),
                ms(p.rttvar_us),
                ms(Some(p.rto_us)),
                fit(kib(p.cwnd_bytes), 8),
                p.datagram_bytes
                    .map_or_else(|| "-".into(), |b| b.to_string())
            );
        }
    }
    if r.rejected > 0 {
        let _ = writeln!(out, "rejected datagrams: {}", r.rejected);
    }
    for f in &r.auth_failures {
        let _ = writeln!(
            out,
            "failed authentication: {} datagram(s) from {}{}",
            f.count,
            f.from,
            f.machine
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  the cluster keys (key_file) or `encrypt` may differ between the machines"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DeviceReport {
        DeviceReport {
            name: "data10gmd".into(),
            state: AdminState::Available,
            mode: Mode::Async,
            mode_in_effect: "async-hwm-fallback".into(),
            peer: Some("beta".into()),
            uptime_ms: 10_000,
            local: LocalCounters {
                reads: 5,
                read_bytes: 5 << 20,
                writes: 999_999_999,
                write_bytes: 999_999 << 20,
                ..Default::default()
            },
            remote: RemoteCounters::default(),
            mirrored: MirrorCounters::default(),
            latency: Latency::from_buckets([1; LATENCY_BUCKETS], 0),
            backlog: Backlog {
                bytes: 100 << 10,
                hwm_bytes: 128 << 10,
                hwm_fallbacks: 3,
                fallback_active: true,
            },
            map_writes: MapWrites::default(),
            map: Some(MapCounts {
                regions: 8192,
                stale: 8192,
                inconsistent: 12,
                hot: 1,
            }),
            resync: Some(Resync {
                role: "source".into(),
                regions_total: 8192,
                regions_left: 4000,
                bytes_per_s: 10 << 20,
                eta_s: Some(12345),
            }),
            role: Some("primary".into()),
            size_bytes: 256 << 20,
            resync_sent_bytes: 0,
            resync_same_bytes: 0,
            refused: None,
            frozen: None,
        }
    }

    #[test]
    fn a_frozen_device_says_so_within_eighty_columns() {
        let mut d = device();
        d.frozen = Some(
            "writes frozen: peer beta lost, this site is not dominant; waiting for the link \
             or 'gmdctl down data10gmd beta'"
                .into(),
        );
        let report = Report {
            schema: REPORT_SCHEMA,
            machine: "alpha".into(),
            uptime_ms: 10_000,
            devices: vec![d],
            peers: vec![],
        };
        let text = render_gmdstat(&report, None, false);
        assert!(
            text.contains("FROZEN writes frozen: peer beta lost"),
            "{text}"
        );
        assert!(text.contains("'gmdctl down data10gmd beta'"), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
    }

    #[test]
    fn text_fits_eighty_columns() {
        let report = Report {
            schema: REPORT_SCHEMA,
            machine: "alpha".into(),
            uptime_ms: 10_000,
            devices: vec![device()],
            peers: vec![PeerReport {
                machine: "beta".into(),
                up: true,
                active_network: Some("geonet1".into()),
                messages_sent: 99_999_999,
                bytes_sent: 999_999 << 20,
                ..Default::default()
            }],
        };
        for summary in [false, true] {
            let text = render_gmdstat(&report, None, summary);
            for line in text.lines() {
                assert!(line.chars().count() <= 80, "too wide: {line:?}");
            }
        }
        let net = NetReport {
            schema: REPORT_SCHEMA,
            machine: "alpha".into(),
            machines: vec![NetMachine {
                name: "beta".into(),
                rpcs_sent: 99_999_999,
                bytes_sent: 999_999 << 20,
                ..Default::default()
            }],
            networks: vec![NetNetwork {
                name: "geonet1".into(),
                packets_sent: 99_999_999,
                srtt_us: Some(123_456),
                gso: Some(false),
                gro: Some(true),
                ..Default::default()
            }],
            paths: vec![NetPath {
                peer: "beta".into(),
                network: "geonet1".into(),
                rto_us: 1_000_000,
                cwnd_bytes: 1 << 30,
                datagram_bytes: Some(65_000),
                ..Default::default()
            }],
            rejected: 1,
            auth_failures: vec![AuthFailure {
                from: "127.0.0.1:6756".into(),
                machine: Some("beta".into()),
                count: 26,
            }],
        };
        for summary in [false, true] {
            for line in render_netstat(&net, Some(1.0), summary).lines() {
                assert!(line.chars().count() <= 80, "too wide: {line:?}");
            }
        }
    }

    #[test]
    fn netstat_says_whether_the_kernel_batches_datagrams_when_the_daemon_knows() {
        let mut n = NetNetwork {
            name: "geonet1".into(),
            gso: Some(false),
            gro: Some(true),
            ..Default::default()
        };
        assert_eq!(
            batching(&n).as_deref(),
            Some("  batched by the kernel: sending no (GSO), receiving yes (GRO)")
        );
        // A daemon from before the fields: nothing said, rather than "no".
        let old: NetNetwork = serde_json::from_str(r#"{"name":"geonet1","packets_sent":1,"packets_received":1,"bytes_sent":1,"bytes_received":1,"resends":0,"timeouts":0,"failures":0,"duplicates":0,"other":0,"srtt_us":null}"#)
            .expect("an older daemon's network");
        assert_eq!((old.gso, old.gro), (None, None));
        assert_eq!(batching(&old), None);
        n.gso = None;
        assert!(batching(&n).expect("gro known").contains("sending ? (GSO)"));
    }

    #[test]
    fn netstat_shows_each_paths_datagram_size_when_the_daemon_knows() {
        let mut r = NetReport {
            schema: REPORT_SCHEMA,
            machine: "alpha".into(),
            machines: Vec::new(),
            networks: Vec::new(),
            rejected: 0,
            auth_failures: Vec::new(),
            paths: vec![NetPath {
                peer: "beta".into(),
                network: "geonet1".into(),
                up: true,
                active: true,
                datagram_bytes: Some(1472),
                ..Default::default()
            }],
        };
        let text = render_netstat(&r, None, false);
        let header = text
            .lines()
            .find(|l| l.starts_with("PATH TO"))
            .expect("table");
        let row = text.lines().find(|l| l.starts_with("beta")).expect("row");
        assert!(header.ends_with("dgram"), "{header:?}");
        assert!(row.ends_with(" 1472"), "{row:?}");
        // A daemon from before the field: "-", and its JSON still reads.
        let old: NetPath = serde_json::from_str(r#"{"peer":"beta","network":"geonet1","up":true,"active":true,"srtt_us":null,"rttvar_us":null,"rto_us":1,"cwnd_bytes":1,"in_flight_bytes":0}"#)
            .expect("an older daemon's path");
        assert_eq!(old.datagram_bytes, None);
        r.paths = vec![old];
        let text = render_netstat(&r, None, false);
        let row = text.lines().find(|l| l.starts_with("beta")).expect("row");
        assert!(row.ends_with(" -"), "{row:?}");
    }

    #[test]
    fn intervals_subtract_counters_and_keep_gauges() {
        let earlier = device();
        let mut now = device();
        now.local.writes += 10;
        now.local.write_bytes += 40960;
        now.local.in_flight = 7;
        now.latency.buckets[3] += 10;
        now.latency = Latency::from_buckets(now.latency.buckets, 0);
        let i = now.since(&earlier, 2.0);
        assert_eq!(i.local.writes, 10);
        assert_eq!(i.local.write_bytes, 40960);
        assert_eq!(i.local.in_flight, 7);
        assert_eq!(i.latency.writes, 10);
        assert_eq!(i.latency.p50_us, Some(16));
    }
}
