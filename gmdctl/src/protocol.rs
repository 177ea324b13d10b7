//! The control protocol between `gmdd` and its clients (`gmdctl`, `gmdstat`).
//!
//! One JSON object per line in each direction over a Unix socket. Every
//! request carries [`PROTOCOL_VERSION`]; the daemon refuses other versions
//! with an error naming both. A request is answered by exactly one response.

use gmd_core::config::{Mode, Role};
pub use gmd_core::generations::Generations;
pub use gmd_core::link::PairRole;
use gmd_core::statemap::AdminState;
use gmd_core::statemap::dump::MapSummary;
use serde::{Deserialize, Serialize};

/// Version of this protocol.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/gmd/gmdd.sock";

/// Default path of the cluster configuration.
pub const DEFAULT_CONFIG: &str = "/etc/gmd/cluster.toml";

/// Which devices a lifecycle command applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// One device by name.
    Device(String),
    /// Every device of this machine (`-A`).
    All,
}

/// A command for the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Daemon identity and configuration path.
    Hello,
    /// State of one or all devices.
    Status {
        /// A device, or all when absent.
        device: Option<String>,
    },
    /// DEFINED → STOPPED.
    Configure {
        /// Which devices.
        target: Target,
    },
    /// STOPPED → AVAILABLE.
    Start {
        /// Which devices.
        target: Target,
    },
    /// AVAILABLE → STOPPED.
    Stop {
        /// Which devices.
        target: Target,
    },
    /// STOPPED → DEFINED.
    Unconfigure {
        /// Which devices.
        target: Target,
    },
    /// Records a remote peer as down (device STOPPED or AVAILABLE).
    Down {
        /// The device.
        device: String,
        /// The remote machine.
        peer: String,
    },
    /// Changes attributes (device DEFINED).
    Set {
        /// The device.
        device: String,
        /// `key`, `value` pairs.
        changes: Vec<(String, String)>,
    },
    /// The device's state map.
    ShowState {
        /// The device.
        device: String,
    },
    /// Marks every cell stale.
    Dirty {
        /// The device.
        device: String,
    },
    /// Marks every cell consistent (dangerous).
    Clean {
        /// The device.
        device: String,
        /// The administrator accepted the loss of the record.
        force: bool,
    },
    /// Writes a fresh state map (device DEFINED).
    InitState {
        /// The device.
        device: String,
        /// Overwrite a valid map.
        force: bool,
        /// Identity to give the device (default: derived from its definition).
        #[serde(default)]
        uuid: Option<String>,
        /// The volume is new and holds only zeroes, like its peer's
        /// (initialised the same way): the pair starts without a copy.
        /// Otherwise the map says it holds no known data.
        #[serde(default)]
        zeroed: bool,
    },
    /// Makes this side primary (device AVAILABLE).
    Primary {
        /// The device.
        device: String,
        /// Also when this copy lacks data: it becomes the newest as it is.
        #[serde(default)]
        force: bool,
    },
    /// Makes this side secondary (device AVAILABLE): flushes, then refuses writes.
    Secondary {
        /// The device.
        device: String,
    },
    /// Drill: makes this secondary copy writable here, apart from the primary.
    Split {
        /// The device.
        device: String,
    },
    /// Ends a drill: discards the split copy's writes and resynchronises it
    /// from the primary.
    Rejoin {
        /// The device.
        device: String,
    },
    /// Counters for gmdstat (result: [`crate::report::Report`]).
    Stats {
        /// Devices to report; all when empty.
        devices: Vec<String>,
    },
    /// GeoMessage counters (result: [`crate::report::NetReport`]).
    NetStat,
    /// Compares configuration and state maps with every other machine over
    /// GeoMessage (result: a list of [`crate::verify::Finding`]).
    VerifyCluster,
    /// Streams state changes: the response is `{"streaming":true}`, then one
    /// [`Event`] per line until the client closes the connection. The
    /// current state comes first as `exists` events, ended by one event of
    /// object `-`.
    Events,
    /// Measures round trips and throughput per message size on each path to
    /// `peer` (the reference's geonet).
    NetProbe {
        /// The machine to probe.
        peer: String,
        /// Requests per size.
        rounds: usize,
    },
    /// Unifies the maps of this machine and the other copy after divergence.
    Unify {
        /// The device.
        device: String,
        /// The machine whose data wins.
        master: String,
        /// Only show the unified map.
        preview: bool,
    },
    /// Online verify: starts comparing every region of the device with the
    /// peer's copy (checksums on both sides) as a background job on the
    /// primary (result: [`CompareReport`], as it starts).
    Compare {
        /// The device.
        device: String,
        /// Resynchronise the regions found different from this side.
        #[serde(default)]
        repair: bool,
        /// Data read per second on each side, MiB (default
        /// [`COMPARE_RATE_DEFAULT_MIB_S`]).
        #[serde(default)]
        rate_mib_s: Option<u64>,
    },
    /// The running or last compare of a device (result: [`CompareReport`]).
    CompareStatus {
        /// The device.
        device: String,
    },
}

/// A request: a command with the protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// Classes of failure, which decide gmdctl's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (unknown attribute, bad value): exit 1.
    Invalid,
    /// No such device or peer here: exit 2.
    NotFound,
    /// Not allowed in the current state (start rules, in use, wrong state): exit 2.
    Refused,
    /// The system failed (I/O error, daemon fault): exit 255.
    Internal,
}

impl ErrorKind {
    /// The exit status gmdctl uses for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid => 1,
            ErrorKind::NotFound | ErrorKind::Refused => 2,
            ErrorKind::Internal => 255,
        }
    }
}

/// A failure with a message that says what was wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What was wrong and what to do.
    pub message: String,
}

impl ControlError {
    /// A refusal.
    pub fn refused(message: impl Into<String>) -> Self {
        ControlError {
            kind: ErrorKind::Refused,
            message: message.into(),
        }
    }

    /// Not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        ControlError {
            kind: ErrorKind::NotFound,
            message: message.into(),
        }
    }

    /// Invalid request.
    pub fn invalid(message: impl Into<String>) -> Self {
        ControlError {
            kind: ErrorKind::Invalid,
            message: message.into(),
        }
    }

    /// Internal failure.
    pub fn internal(message: impl Into<String>) -> Self {
        ControlError {
            kind: ErrorKind::Internal,
            message: message.into(),
        }
    }
}

/// A response: the result or an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The daemon's protocol version.
    pub version: u32,
    /// The result when the command succeeded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<serde_json::Value>,
    /// The error when it failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ControlError>,
}

/// Result of [`Command::Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// This machine's name.
    pub machine: String,
    /// The configuration file in use.
    pub config: String,
    /// The daemon's version.
    pub daemon_version: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
}

/// Version of the JSON of `gmdctl status --json`, `list --json`,
/// `verify --json` and `show-state --json`: fields are only ever added; any
/// other change bumps it (docs/OPERATIONS.md).
pub const STATUS_SCHEMA: u32 = 1;

fn status_schema() -> u32 {
    STATUS_SCHEMA
}

/// A remote peer as a device sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Machine name.
    pub machine: String,
    /// Its site.
    pub site: String,
    /// Recorded as down with `gmdctl down`.
    pub down: bool,
    /// Datagrams from its addresses that failed authentication since gmdd
    /// started: non-zero when the machines' cluster keys differ.
    #[serde(default)]
    pub auth_failures: u64,
}

/// State of one device (result of [`Command::Status`], one per device).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// [`STATUS_SCHEMA`].
    #[serde(default = "status_schema")]
    pub schema: u32,
    /// Device name.
    pub name: String,
    /// Lifecycle state.
    pub state: AdminState,
    /// Minor number.
    pub minor: u32,
    /// Mirroring mode.
    pub mode: Mode,
    /// The role the device runs in here (AVAILABLE), or last ran in.
    pub role: PairRole,
    /// The role the configuration gives this machine (the role at start).
    pub configured_role: Role,
    /// Why the device runs as secondary where primary was asked for.
    pub role_note: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Device identity, when the map is readable.
    pub uuid: Option<String>,
    /// Which data this copy holds, when the map is readable (durable).
    pub generations: Option<Generations>,
    /// Whether this copy lacks data it knows of, when the map is readable:
    /// it holds no known data (a new or replaced volume), or regions it has
    /// not received from its peer (a resync target that has not finished).
    /// Such a copy is promoted only with `gmdctl primary --force`; a
    /// cluster manager must never promote it (the OCF agent deletes its
    /// promotion score).
    #[serde(default)]
    pub lacks_data: Option<bool>,
    /// Regions this copy has not received from its peer (`0x6` cells),
    /// when the map is readable.
    #[serde(default)]
    pub not_received: Option<u64>,
    /// Data volume path.
    pub data: String,
    /// State map path.
    pub state_map: String,
    /// Remote peers.
    pub peers: Vec<PeerStatus>,
    /// Map cell counts, when known.
    pub map: Option<MapSummary>,
    /// Where the device is exported, when AVAILABLE.
    pub exports: Vec<String>,
    /// Clients connected (the device is in use when non-zero).
    pub clients: u64,
    /// Why the device is not usable, when something is wrong (e.g. damaged map).
    pub problem: Option<String>,
    /// Mirroring, when AVAILABLE.
    pub link: Option<LinkStatus>,
    /// The running or last online compare since gmdd started, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareReport>,
}

/// Default rate of `gmdctl compare`: data read per second on each side.
pub const COMPARE_RATE_DEFAULT_MIB_S: u64 = 100;
/// Highest rate `gmdctl compare --rate` takes, MiB/s.
pub const COMPARE_RATE_MAX_MIB_S: u64 = 10_000;

/// Where an online compare is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareState {
    /// Comparing (or re-checking, or repairing).
    Running,
    /// Finished: every region was looked at.
    Done,
    /// Stopped before the end (`error` says why).
    Failed,
}

/// Consecutive regions found different by a compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRange {
    /// First region index.
    pub first_region: u64,
    /// Number of regions.
    pub regions: u64,
    /// Byte offset of the first region on the device.
    pub offset_bytes: u64,
    /// Bytes covered.
    pub len_bytes: u64,
}

/// Progress and result of an online compare (`gmdctl compare DEV --json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// [`STATUS_SCHEMA`].
    pub schema: u32,
    /// Device name.
    pub device: String,
    /// The machine compared with.
    pub peer: String,
    /// Running, done or failed.
    pub state: CompareState,
    /// Regions found different are resynchronised from this side.
    pub repair: bool,
    /// Rate limit, MiB read per second on each side.
    pub rate_mib_s: u64,
    /// When it started, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// Seconds it ran (so far).
    pub elapsed_s: f64,
    /// Regions of the device.
    pub regions_total: u64,
    /// Regions looked at so far.
    pub regions_done: u64,
    /// Regions whose checksums were compared.
    pub regions_compared: u64,
    /// Regions not compared: written, marked or resyncing while looked at
    /// (a region being written is the application's; any difference there
    /// is already being sent).
    pub regions_skipped: u64,
    /// Percent done.
    pub percent: f64,
    /// Estimated seconds left, while running.
    pub eta_s: Option<u64>,
    /// Regions found different (each re-checked before it counts).
    pub differing: u64,
    /// Those regions as runs.
    pub ranges: Vec<RegionRange>,
    /// Regions resynchronised from this side (`repair`).
    pub repaired: u64,
    /// Regions found different and not repaired: they differ from the peer
    /// until `gmdctl compare DEVICE --repair` resends them.
    pub out_of_sync_regions: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl RegionRange {
    /// Runs of consecutive regions of sorted `regions`.
    pub fn runs(regions: &[u64], size_bytes: u64) -> Vec<RegionRange> {
        let region = gmd_core::units::REGION_SIZE_BYTES;
        let mut out: Vec<RegionRange> = Vec::new();
        for &r in regions {
            match out.last_mut() {
                Some(last) if last.first_region + last.regions == r => last.regions += 1,
                _ => out.push(RegionRange {
                    first_region: r,
                    regions: 1,
                    offset_bytes: r * region,
                    len_bytes: 0,
                }),
            }
        }
        for run in &mut out {
            let end = ((run.first_region + run.regions) * region).min(size_bytes);
            run.len_bytes = end.saturating_sub(run.offset_bytes);
        }
        out
    }
}

/// Result of [`Command::NetProbe`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetProbe {
    /// The machine probed.
    pub peer: String,
    /// One entry per path (network).
    pub paths: Vec<ProbePath>,
}

/// Measurements of one path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbePath {
    /// Network name.
    pub network: String,
    /// Whether the path was up.
    pub up: bool,
    /// Smoothed RTT after the probe, microseconds.
    pub srtt_us: Option<u64>,
    /// One entry per message size.
    pub sizes: Vec<ProbeSize>,
}

/// Measurements of one message size on one path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeSize {
    /// Request size in bytes.
    pub bytes: usize,
    /// Fastest round trip, microseconds.
    pub rtt_min_us: u64,
    /// Mean round trip, microseconds.
    pub rtt_avg_us: u64,
    /// Slowest round trip, microseconds.
    pub rtt_max_us: u64,
    /// Throughput with requests pipelined, bytes per second.
    pub bytes_per_s: u64,
}

/// Mirroring state of an AVAILABLE device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer mirrored with (or being connected).
    pub peer: Option<String>,
    /// Whether writes are mirrored now.
    pub connected: bool,
    /// Mode in effect: the configured one, `async (hwm fallback: mwc)`, or `standalone`.
    pub mode_in_effect: String,
    /// This side's part in the current resync: `source`, `target` or `none`.
    pub resync_role: Option<String>,
    /// Regions of the current resync.
    pub resync_total: u64,
    /// Regions of it left (source: to confirm; target: to receive).
    pub resync_remaining: u64,
    /// Resync rate since it started, bytes per second (source).
    pub resync_bytes_per_s: u64,
    /// Estimated seconds to finish (source).
    pub resync_eta_s: Option<u64>,
    /// Async bytes completed but not yet acknowledged by the peer.
    pub backlog_bytes: u64,
    /// Times async fell back to mwc at the high water mark.
    pub hwm_fallbacks: u64,
    /// Why the last connection attempt was refused, if it was.
    pub refused: Option<String>,
    /// Why the resync goes this way (`same_data`, `ahead`, `ahead_unmarked`,
    /// `target_empty`), when there is one.
    pub resync_basis: Option<String>,
    /// Whether it copies every region.
    pub resync_full: bool,
    /// Regions written here and never sent, overwritten by the peer's newer
    /// data when this session started.
    pub discarded_regions: u64,
    /// Resync reads that failed (each region is retried after a back-off).
    pub resync_read_errors: u64,
    /// Regions whose read failed and that wait for their retry.
    pub resync_failed_regions: u64,
    /// Resync data this side sent since the device started, bytes.
    #[serde(default)]
    pub resync_bytes_sent: u64,
    /// Resync regions found identical by checksum since the device
    /// started, bytes: not sent (source) or not received (target).
    #[serde(default)]
    pub resync_same_bytes: u64,
    /// Resync checksums this side sent since the device started (source).
    #[serde(default)]
    pub resync_checks: u64,
    /// Of those, the regions the peer found different (their data moved).
    #[serde(default)]
    pub resync_checks_differ: u64,
    /// Writes are held because the peer was lost (site isolation), when
    /// they are.
    #[serde(default)]
    pub isolation: Option<IsolationStatus>,
}

/// A device whose writes are held after it lost its peer (site isolation;
/// see docs/OPERATIONS.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationStatus {
    /// Always true (the field is absent when nothing is held).
    pub frozen: bool,
    /// The peer lost.
    pub peer: String,
    /// Why: `non-dominant` (this site is not the dominant one), `fencing`
    /// (the fence handler runs), `fence-failed`.
    pub hold: String,
    /// Seconds since the peer was lost.
    pub since_s: u64,
    /// Application writes waiting now.
    pub writes_held: u64,
    /// How the fence handler ended, when it did.
    pub fence: Option<String>,
    /// One sentence for the administrator: what is held and what ends it.
    pub message: String,
}

/// Result of a role change ([`Command::Primary`], [`Command::Secondary`],
/// [`Command::Split`], [`Command::Rejoin`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// Machine.
    pub machine: String,
    /// Device.
    pub device: String,
    /// Role before.
    pub previous: PairRole,
    /// Role now.
    pub role: PairRole,
    /// Whether the copy became the newest as it is (`--force`).
    pub forced: bool,
    /// Data generations now.
    pub generations: Option<Generations>,
    /// What happened, for people.
    pub lines: Vec<String>,
    /// What to watch for.
    pub warnings: Vec<String>,
}

/// Result of [`Command::ShowState`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShowState {
    /// Machine the map belongs to.
    pub machine: String,
    /// Device name.
    pub device: String,
    /// Device state.
    pub state: AdminState,
    /// Where the map was read: `disk` or `daemon`.
    pub source: String,
    /// The map as a map file (see `gmd_core::statemap::dump`), base64.
    pub map_file_base64: String,
}

/// A state change, streamed by [`Command::Events`] (see docs/OPERATIONS.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `exists` for the state when the stream starts, `change` afterwards.
    pub change: String,
    /// What changed: `device`, `connection`, `peer`, `path`, `hwm`,
    /// `resync`, `divergence`, `refused`, `isolation`; `-` ends the `exists` part.
    pub object: String,
    /// The device, or the machine for `peer` and `path`.
    pub name: String,
    /// Attributes, in a fixed order per object.
    pub attrs: indexmap::IndexMap<String, String>,
}

impl Event {
    /// An event stamped now.
    pub fn now(change: &str, object: &str, name: &str, attrs: &[(&str, String)]) -> Event {
        Event {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            change: change.into(),
            object: object.into(),
            name: name.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    /// One line as `drbdsetup events2` prints them:
    /// `change device name:data10gmd state:AVAILABLE` (values with spaces
    /// are quoted).
    pub fn to_text(&self) -> String {
        let mut line = format!("{} {}", self.change, self.object);
        if self.object != "-" {
            line.push_str(&format!(" name:{}", self.name));
        }
        for (k, v) in &self.attrs {
            if v.contains(char::is_whitespace) || v.is_empty() {
                line.push_str(&format!(" {k}:{v:?}"));
            } else {
                line.push_str(&format!(" {k}:{v}"));
            }
        }
        line
    }
}

/// Result of a lifecycle command: one line per device it touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// What happened, one human-readable line per device.
    pub lines: Vec<String>,
    /// Warnings the administrator must see.
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_tagged_json() {
        let req = Request {
            version: PROTOCOL_VERSION,
            command: Command::Start {
                target: Target::Device("data10gmd".into()),
            },
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"cmd":"start","target":{"device":"data10gmd"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        let all: Request =
            serde_json::from_str(r#"{"version":1,"cmd":"stop","target":"all"}"#).unwrap();
        assert_eq!(
            all.command,
            Command::Stop {
                target: Target::All
            }
        );
    }

    #[test]
    fn exit_codes_follow_the_reference() {
        assert_eq!(ErrorKind::Invalid.exit_code(), 1);
        assert_eq!(ErrorKind::Refused.exit_code(), 2);
        assert_eq!(ErrorKind::NotFound.exit_code(), 2);
        assert_eq!(ErrorKind::Internal.exit_code(), 255);
    }

    #[test]
    fn differing_regions_are_reported_as_runs_with_byte_ranges() {
        let size = 10 * 32768 + 4096;
        let runs = RegionRange::runs(&[0, 3, 4, 5, 10], size);
        let got: Vec<(u64, u64, u64, u64)> = runs
            .iter()
            .map(|r| (r.first_region, r.regions, r.offset_bytes, r.len_bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 1, 0, 32768),
                (3, 3, 3 * 32768, 3 * 32768),
                (10, 1, 10 * 32768, 4096)
            ]
        );
        assert!(RegionRange::runs(&[], size).is_empty());
    }
}
