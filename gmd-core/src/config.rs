//! The cluster configuration: one TOML file, identical on every machine.
//!
//! ```toml
//! [cluster]
//! name = "demo"
//! key_file = "cluster.key"        # relative paths are relative to this file
//!
//! [sites.austin]
//! dominant = true
//! [sites.dallas]
//!
//! [networks.geonet1]
//!
//! [machines.alpha]
//! site = "austin"
//! promote_failure_timeout = 5     # seconds; 0 = never
//! interfaces = { geonet1 = "127.0.0.1:6755" }
//! nbd_listen = "127.0.0.1:10809"  # or "unix:/run/gmd/nbd.sock"
//! # metrics = "127.0.0.1:9477"    # Prometheus endpoint; off when absent
//! # fence_handler = "/usr/lib/gmd/fence-pacemaker"  # run before going on alone
//! # fence_timeout = 60            # seconds the handler may take
//!
//! [devices.data10gmd]
//! minor = 10
//! mode = "mwc"                    # sync | mwc | async
//! size = "256MiB"
//! [devices.data10gmd.machines.alpha]
//! data = "alpha/data10.img"
//! state_map = "alpha/data10.sm"
//! role = "none"                   # primary | secondary | none
//! ```
//!
//! [`ClusterConfig::load`] parses and checks everything that does not depend
//! on the machine it runs on, and reports every problem at once, each naming
//! the file, the field and what is allowed.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

use crate::units::{format_size, parse_size_bytes};

/// Lowest allowed minor number.
pub const MINOR_MIN: u32 = 0;
/// Highest allowed minor number.
pub const MINOR_MAX: u32 = 1023;
/// Most machines in a cluster (reference: 2–8).
pub const MACHINES_MAX: usize = 8;
/// Most remote peers of one device (reference: 7).
pub const REMOTE_PEERS_MAX: usize = 7;
/// Longest name of a cluster, site, machine, network or device.
pub const NAME_LEN_MAX: usize = 63;
/// Most ublk queues per device.
pub const UBLK_QUEUES_MAX: i64 = 64;
/// Deepest ublk queue.
pub const UBLK_DEPTH_MAX: i64 = 1024;
/// Default async high water mark, KiB.
pub const HWM_KIB_DEFAULT: u64 = 128;
/// Smallest resync window, KiB: the reference's default, one region.
pub const SYNC_RATE_KIB_FLOOR: u64 = 32;
/// Default NBD listen address.
pub const NBD_LISTEN_DEFAULT: &str = "127.0.0.1:10809";
/// Default GeoMessage UDP port (reference).
pub const GEOMESSAGE_PORT_DEFAULT: u16 = 6755;

/// Mirroring mode of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Remote write acknowledged, then local write, then completion.
    Sync,
    /// Mirror write consistency: intent recorded, local and remote together.
    Mwc,
    /// Local write and completion, remote in the background, bounded by the HWM.
    Async,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "sync" => Some(Mode::Sync),
            "mwc" => Some(Mode::Mwc),
            "async" => Some(Mode::Async),
            _ => None,
        }
    }

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Mwc => "mwc",
            Mode::Async => "async",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Role of one machine for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writes originate here.
    Primary,
    /// Receives the mirror; refuses application I/O in async mode.
    Secondary,
    /// Either side may write (sync and mwc only).
    None,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "primary" => Some(Role::Primary),
            "secondary" => Some(Role::Secondary),
            "none" => Some(Role::None),
            _ => None,
        }
    }

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::None => "none",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How applications reach a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// `/dev/ublkb<minor>`.
    Ublk,
    /// NBD export named after the device.
    Nbd,
}

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A site (exactly two per cluster).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Site name.
    pub name: String,
    /// Whether this site keeps running on isolation.
    pub dominant: bool,
}

/// A machine of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Machine name (its hostname unless gmdd is told otherwise).
    pub name: String,
    /// Site the machine is at.
    pub site: String,
    /// Seconds without reaching this machine before it is declared down; 0 = never.
    pub promote_failure_timeout_s: u64,
    /// GeoMessage interfaces, in preference order: network name → UDP address.
    pub interfaces: IndexMap<String, SocketAddr>,
    /// Where this machine's NBD exports listen.
    pub nbd_listen: ListenAddr,
    /// Where gmdd serves Prometheus metrics (`GET /metrics`); off when absent.
    pub metrics: Option<SocketAddr>,
    /// The command run before a primary of this machine goes on without
    /// its peer (see [`crate::link::isolation`]); none when absent.
    pub fence: Option<FenceHandler>,
}

/// A fence handler: a command that makes sure the peer can no longer write
/// (a cluster-manager constraint, a STONITH), run with the device and peer
/// names in its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceHandler {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Seconds it may run before it is killed and counted as failed.
    pub timeout_s: u64,
}

/// Seconds a fence handler may run when `fence_timeout` is not given.
pub const FENCE_TIMEOUT_S_DEFAULT: u64 = 60;

/// Smallest `datagram_size` accepted.
pub const DATAGRAM_SIZE_MIN: i64 = 576;
/// Largest `datagram_size` accepted: GeoMessage's largest datagram
/// (`gmd_net::config::DATAGRAM_BYTES_MAX`; gmdd's tests check they agree).
pub const DATAGRAM_SIZE_MAX: i64 = 65_000;

/// A GeoMessage network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// Largest datagram sent on this network (bytes); `None` = each path
    /// discovers what it carries (path-MTU discovery, from 1 400 bytes up).
    pub datagram_size: Option<u32>,
}

/// One machine's part of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMachine {
    /// Machine name.
    pub machine: String,
    /// Data volume (file or block device), resolved against the config's directory.
    pub data: PathBuf,
    /// State map volume (file or block device), resolved likewise.
    pub state_map: PathBuf,
    /// Role of this machine for the device.
    pub role: Role,
    /// ublk device id on this machine (`/dev/ublkb<id>`); the minor number
    /// unless set (two machines sharing one kernel, as in a test VM, need
    /// different ids).
    pub ublk_id: Option<u32>,
}

/// The largest ublk device id a machine's copy may be given.
pub const UBLK_ID_MAX: u32 = 65535;

/// A GeoMirror device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Device name; also the NBD export name.
    pub name: String,
    /// Minor number (the ublk device id), 0–1023, unique in the cluster.
    pub minor: u32,
    /// Mirroring mode.
    pub mode: Mode,
    /// Size of the data volume in bytes.
    pub size_bytes: u64,
    /// Logical block size exposed to applications (512, the default, or 4096).
    pub block_size: u32,
    /// High water mark of async mode, KiB.
    pub hwm_kib: u64,
    /// Cap on resync data in flight, KiB, when the person set one; `None`
    /// (the default) lets the window follow the link alone (a multiple of
    /// its congestion window, see [`crate::engine::resync_window`]).
    pub sync_rate_kib: Option<u64>,
    /// Checksum resync: a region's checksum goes first during resync and
    /// its data only if the target's copy differs (used when both
    /// machines' daemons ask for it; default off).
    pub resync_checksums: bool,
    /// Frontends that expose the device; empty = the default for the host.
    pub export: Vec<Frontend>,
    /// ublk queues (one thread each); 0 = one per core.
    pub ublk_queues: u16,
    /// ublk requests in flight per queue; 0 = the default (128).
    pub ublk_depth: u16,
    /// The machines that hold a copy, in file order.
    pub machines: IndexMap<String, DeviceMachine>,
}

/// The whole cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// Cluster name; GeoMessage's cluster id derives from it.
    pub name: String,
    /// Pre-shared key file, resolved against the config's directory.
    pub key_file: PathBuf,
    /// Whether GeoMessage encrypts payloads (authentication is always on).
    pub encrypt: bool,
    /// The two sites.
    pub sites: IndexMap<String, Site>,
    /// Machines by name.
    pub machines: IndexMap<String, Machine>,
    /// Networks by name.
    pub networks: IndexMap<String, Network>,
    /// Devices by name.
    pub devices: IndexMap<String, Device>,
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// Dotted path of the field, e.g. `devices.data10gmd.mode`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has fields of the wrong type or name.
    #[error("configuration {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parses but breaks rules; every problem is listed.
    #[error("configuration {path} has {} error(s):\n{}", problems.len(), render_problems(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: Option<RawCluster>,
    #[serde(default)]
    sites: IndexMap<String, RawSite>,
    #[serde(default)]
    machines: IndexMap<String, RawMachine>,
    #[serde(default)]
    networks: IndexMap<String, RawNetwork>,
    #[serde(default)]
    devices: IndexMap<String, RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    key_file: Option<String>,
    encrypt: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    #[serde(default)]
    dominant: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    site: Option<String>,
    promote_failure_timeout: Option<i64>,
    #[serde(default)]
    interfaces: IndexMap<String, String>,
    nbd_listen: Option<String>,
    metrics: Option<String>,
    fence_handler: Option<String>,
    fence_timeout: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    datagram_size: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    minor: Option<i64>,
    mode: Option<String>,
    role: Option<String>,
    size: Option<toml::Value>,
    block_size: Option<i64>,
    hwm_kib: Option<i64>,
    sync_rate_kib: Option<i64>,
    resync_checksums: Option<toml::Value>,
    export: Option<Vec<String>>,
    ublk_queues: Option<i64>,
    ublk_depth: Option<i64>,
    #[serde(default)]
    machines: IndexMap<String, RawDeviceMachine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceMachine {
    data: Option<String>,
    state_map: Option<String>,
    role: Option<String>,
    ublk_id: Option<i64>,
}

/// The fence handler of machine `field`: an absolute path (the same file
/// names it for every machine, and a handler runs as root: no lookup in a
/// search path or relative to the file), and a timeout of 1 s or more.
fn parse_fence(
    c: &mut Checker,
    field: &str,
    handler: Option<String>,
    timeout: Option<i64>,
) -> Option<FenceHandler> {
    let timeout_s = match timeout {
        None => FENCE_TIMEOUT_S_DEFAULT,
        Some(t) if t >= 1 => t as u64,
        Some(t) => {
            c.problem(
                format!("{field}.fence_timeout"),
                format!(
                    "{t} is not a timeout; use seconds ≥ 1 (default {FENCE_TIMEOUT_S_DEFAULT})"
                ),
            );
            FENCE_TIMEOUT_S_DEFAULT
        }
    };
    let Some(handler) = handler else {
        if timeout.is_some() {
            c.problem(
                format!("{field}.fence_timeout"),
                "fence_timeout without fence_handler; set fence_handler = \"/usr/lib/gmd/fence-pacemaker\" or drop fence_timeout",
            );
        }
        return None;
    };
    let path = PathBuf::from(&handler);
    if handler.is_empty() || !path.is_absolute() {
        c.problem(
            format!("{field}.fence_handler"),
            format!(
                "{handler:?} is not an absolute path; name the executable in full, e.g. \"/usr/lib/gmd/fence-pacemaker\""
            ),
        );
        return None;
    }
    Some(FenceHandler { path, timeout_s })
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn name(&mut self, field: &str, kind: &str, name: &str) {
        let ok = !name.is_empty()
            && name.len() <= NAME_LEN_MAX
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !ok {
            self.problem(
                field,
                format!(
                    "{kind} name {name:?} is not allowed; use 1–{NAME_LEN_MAX} characters from A–Z, a–z, 0–9, '-', '_', '.'"
                ),
            );
        }
    }

    fn required<T>(&mut self, field: String, value: Option<T>, what: &str) -> Option<T> {
        if value.is_none() {
            self.problem(field, format!("missing; {what}"));
        }
        value
    }
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve_path(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

/// Parses a listen address: `host:port` or `unix:/path`.
pub fn parse_listen(base: &Path, text: &str) -> Result<ListenAddr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a path, e.g. unix:/run/gmd/nbd.sock".into());
        }
        return Ok(ListenAddr::Unix(resolve_path(base, path)));
    }
    text.parse::<SocketAddr>()
        .map(ListenAddr::Tcp)
        .map_err(|_| {
            format!("{text:?} is not an address; use IP:PORT (e.g. 127.0.0.1:10809) or unix:/path")
        })
}

impl ClusterConfig {
    /// Reads, parses and checks a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and, for rule violations, every field at fault.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Absolute, so that relative paths inside mean the same from anywhere.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Self::parse(&path, &text)
    }

    /// Parses and checks configuration `text` as if read from `path`.
    ///
    /// # Errors
    /// As [`ClusterConfig::load`].
    pub fn parse(path: &Path, text: &str) -> Result<ClusterConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let mut c = Checker {
            problems: Vec::new(),
        };
        let config = build(&mut c, path, &base, raw);
        if c.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems: c.problems,
            })
        }
    }

    /// The machine called `name`.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.get(name)
    }

    /// The site the machine `name` is at.
    pub fn site_of(&self, machine: &str) -> Option<&str> {
        self.machines.get(machine).map(|m| m.site.as_str())
    }

    /// Devices that have a copy on `machine`.
    pub fn devices_on<'a>(&'a self, machine: &'a str) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices
            .values()
            .filter(move |d| d.machines.contains_key(machine))
    }
}

impl Device {
    /// The machines holding this device at the other site than `machine`.
    pub fn remote_peers<'a>(
        &'a self,
        config: &'a ClusterConfig,
        machine: &str,
    ) -> impl Iterator<Item = &'a DeviceMachine> + 'a {
        let site = config.site_of(machine).unwrap_or_default().to_owned();
        self.machines
            .values()
            .filter(move |m| config.site_of(&m.machine) != Some(site.as_str()))
    }

    /// This machine's part of the device, if it has one.
    pub fn on(&self, machine: &str) -> Option<&DeviceMachine> {
        self.machines.get(machine)
    }
}

fn build(c: &mut Checker, path: &Path, base: &Path, raw: RawConfig) -> ClusterConfig {
    let cluster = raw.cluster.unwrap_or(RawCluster {
        name: None,
        key_file: None,
        encrypt: None,
    });
    let name = c
        .required(
            "cluster.name".into(),
            cluster.name,
            "give the cluster a name, e.g. name = \"prod\"",
        )
        .unwrap_or_default();
    if !name.is_empty() {
        c.name("cluster.name", "cluster", &name);
    }
    let key_file = c
        .required(
            "cluster.key_file".into(),
            cluster.key_file,
            "name the pre-shared key file, e.g. key_file = \"cluster.key\" (create it with 'gmdctl genkey FILE')",
        )
        .map(|k| resolve_path(base, &k))
        .unwrap_or_default();

    // Sites.
    let mut sites = IndexMap::new();
    for (site_name, site) in raw.sites {
        c.name(&format!("sites.{site_name}"), "site", &site_name);
        sites.insert(
            site_name.clone(),
            Site {
                name: site_name,
                dominant: site.dominant,
            },
        );
    }
    if sites.len() != 2 {
        c.problem(
            "sites",
            format!(
                "a cluster has exactly two sites, found {}; add [sites.NAME] tables",
                sites.len()
            ),
        );
    } else if sites.values().filter(|s| s.dominant).count() != 1 {
        c.problem(
            "sites",
            "exactly one site must have dominant = true (it keeps running when the sites are isolated)",
        );
    }

    // Networks.
    let mut networks = IndexMap::new();
    for (net_name, net) in raw.networks {
        let field = format!("networks.{net_name}");
        c.name(&field, "network", &net_name);
        let datagram_size = match net.datagram_size {
            None => None,
            Some(n) if (DATAGRAM_SIZE_MIN..=DATAGRAM_SIZE_MAX).contains(&n) => Some(n as u32),
            Some(n) => {
                c.problem(
                    format!("{field}.datagram_size"),
                    format!(
                        "{n} is out of range; use {DATAGRAM_SIZE_MIN}–{DATAGRAM_SIZE_MAX} bytes, \
                         or leave it unset for each path to find the size it carries"
                    ),
                );
                None
            }
        };
        networks.insert(
            net_name.clone(),
            Network {
                name: net_name,
                datagram_size,
            },
        );
    }
    if networks.is_empty() {
        c.problem(
            "networks",
            "at least one GeoMessage network is needed; add [networks.NAME]",
        );
    }

    // Machines.
    let mut machines = IndexMap::new();
    let mut addresses: IndexMap<SocketAddr, String> = IndexMap::new();
    for (machine_name, m) in raw.machines {
        let field = format!("machines.{machine_name}");
        c.name(&field, "machine", &machine_name);
        let site = c
            .required(
                format!("{field}.site"),
                m.site,
                &format!(
                    "name the machine's site, one of: {}",
                    sites.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
            .unwrap_or_default();
        if !site.is_empty() && !sites.contains_key(&site) {
            c.problem(
                format!("{field}.site"),
                format!(
                    "unknown site {site:?}; defined sites: {}",
                    sites.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        let timeout = match m.promote_failure_timeout {
            None => 30,
            Some(t) if t >= 0 => t as u64,
            Some(t) => {
                c.problem(
                    format!("{field}.promote_failure_timeout"),
                    format!("{t} is negative; use seconds ≥ 0 (0 = never declare the peer down)"),
                );
                0
            }
        };
        let mut interfaces = IndexMap::new();
        for (net, addr) in m.interfaces {
            let ifield = format!("{field}.interfaces.{net}");
            if !networks.contains_key(&net) {
                c.problem(
                    ifield.clone(),
                    format!(
                        "unknown network {net:?}; defined networks: {}",
                        networks.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            match addr.parse::<SocketAddr>() {
                Ok(sa) => {
                    if let Some(other) = addresses.insert(sa, ifield.clone()) {
                        c.problem(ifield.clone(), format!("address {sa} is also used by {other}"));
                    }
                    interfaces.insert(net, sa);
                }
                Err(_) => c.problem(
                    ifield,
                    format!(
                        "{addr:?} is not an address; use IP:PORT, e.g. \"192.0.2.1:{GEOMESSAGE_PORT_DEFAULT}\""
                    ),
                ),
            }
        }
        if interfaces.is_empty() {
            c.problem(
                format!("{field}.interfaces"),
                "a machine needs at least one GeoMessage interface, e.g. interfaces = { geonet1 = \"192.0.2.1:6755\" }",
            );
        }
        let nbd_listen =
            match parse_listen(base, m.nbd_listen.as_deref().unwrap_or(NBD_LISTEN_DEFAULT)) {
                Ok(l) => l,
                Err(e) => {
                    c.problem(format!("{field}.nbd_listen"), e);
                    ListenAddr::Tcp(NBD_LISTEN_DEFAULT.parse().expect("valid default"))
                }
            };
        let metrics = match m.metrics.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(addr)) => Some(addr),
            Some(Err(_)) => {
                c.problem(
                    format!("{field}.metrics"),
                    "not an IP address and port, e.g. metrics = \"127.0.0.1:9477\"",
                );
                None
            }
        };
        let fence = parse_fence(c, &field, m.fence_handler, m.fence_timeout);
        machines.insert(
            machine_name.clone(),
            Machine {
                name: machine_name,
                site,
                promote_failure_timeout_s: timeout,
                interfaces,
                nbd_listen,
                metrics,
                fence,
            },
        );
    }
    if machines.is_empty() || machines.len() > MACHINES_MAX {
        c.problem(
            "machines",
            format!(
                "a cluster has 1–{MACHINES_MAX} machines, found {}",
                machines.len()
            ),
        );
    }

    // Devices.
    let mut devices = IndexMap::new();
    let mut minors: IndexMap<u32, String> = IndexMap::new();
    for (dev_name, d) in raw.devices {
        let field = format!("devices.{dev_name}");
        c.name(&field, "device", &dev_name);
        let minor = match d.minor {
            Some(m) if (i64::from(MINOR_MIN)..=i64::from(MINOR_MAX)).contains(&m) => {
                let m = m as u32;
                if let Some(other) = minors.insert(m, dev_name.clone()) {
                    c.problem(
                        format!("{field}.minor"),
                        format!(
                            "minor {m} is already used by device {other}; minors must be unique"
                        ),
                    );
                }
                m
            }
            Some(m) => {
                c.problem(
                    format!("{field}.minor"),
                    format!("{m} is out of range; use {MINOR_MIN}–{MINOR_MAX}"),
                );
                0
            }
            None => {
                c.problem(
                    format!("{field}.minor"),
                    format!("missing; give a minor number {MINOR_MIN}–{MINOR_MAX} (the device becomes /dev/ublkb<minor>)"),
                );
                0
            }
        };
        let mode = match d.mode.as_deref() {
            Some(text) => Mode::parse(text).unwrap_or_else(|| {
                c.problem(
                    format!("{field}.mode"),
                    format!("{text:?} is not a mode; use \"sync\", \"mwc\" or \"async\""),
                );
                Mode::Mwc
            }),
            None => {
                c.problem(
                    format!("{field}.mode"),
                    "missing; use \"sync\", \"mwc\" or \"async\"",
                );
                Mode::Mwc
            }
        };
        let block_size = match d.block_size {
            None => 512,
            Some(512) => 512,
            Some(4096) => 4096,
            Some(n) => {
                c.problem(
                    format!("{field}.block_size"),
                    format!("{n} is not supported; use 512 or 4096"),
                );
                512
            }
        };
        let size_bytes = match &d.size {
            Some(toml::Value::Integer(n)) if *n > 0 => *n as u64,
            Some(toml::Value::String(s)) => parse_size_bytes(s).unwrap_or_else(|| {
                c.problem(
                    format!("{field}.size"),
                    format!("{s:?} is not a size; use bytes or a number with K, M, G, T (binary), e.g. \"256MiB\""),
                );
                0
            }),
            Some(other) => {
                c.problem(
                    format!("{field}.size"),
                    format!("{other} is not a size; use bytes or a string such as \"256MiB\""),
                );
                0
            }
            None => {
                c.problem(
                    format!("{field}.size"),
                    "missing; give the size of the data volume, e.g. size = \"256MiB\"",
                );
                0
            }
        };
        if size_bytes > 0 && size_bytes % u64::from(block_size) != 0 {
            c.problem(
                format!("{field}.size"),
                format!("{size_bytes} bytes is not a multiple of the block size {block_size}"),
            );
        }
        let positive = |c: &mut Checker, name: &str, value: Option<i64>, default: u64| match value {
            None => default,
            Some(v) if v >= 1 => v as u64,
            Some(v) => {
                c.problem(
                    format!("{field}.{name}"),
                    format!(
                        "{v} is not allowed; use a whole number of KiB ≥ 1 (default {default})"
                    ),
                );
                default
            }
        };
        let hwm_kib = positive(c, "hwm_kib", d.hwm_kib, HWM_KIB_DEFAULT);
        let sync_rate_kib = d
            .sync_rate_kib
            .is_some()
            .then(|| positive(c, "sync_rate_kib", d.sync_rate_kib, SYNC_RATE_KIB_FLOOR));
        let resync_checksums = match d.resync_checksums {
            None => false,
            Some(toml::Value::Boolean(on)) => on,
            Some(other) => {
                c.problem(
                    format!("{field}.resync_checksums"),
                    format!("{other} is not allowed; use true or false (default false)"),
                );
                false
            }
        };
        let mut export = Vec::new();
        for e in d.export.unwrap_or_default() {
            match e.as_str() {
                "ublk" => export.push(Frontend::Ublk),
                "nbd" => export.push(Frontend::Nbd),
                other => c.problem(
                    format!("{field}.export"),
                    format!("{other:?} is not a frontend; use \"ublk\" and/or \"nbd\""),
                ),
            }
        }
        let ublk_queues = match d.ublk_queues {
            None => 0,
            Some(v) if (1..=UBLK_QUEUES_MAX).contains(&v) => v as u16,
            Some(v) => {
                c.problem(
                    format!("{field}.ublk_queues"),
                    format!("{v} is not allowed; use 1–{UBLK_QUEUES_MAX} (default: one per core)"),
                );
                0
            }
        };
        let ublk_depth = match d.ublk_depth {
            None => 0,
            Some(v) if (1..=UBLK_DEPTH_MAX).contains(&v) => v as u16,
            Some(v) => {
                c.problem(
                    format!("{field}.ublk_depth"),
                    format!("{v} is not allowed; use 1–{UBLK_DEPTH_MAX} (default 128)"),
                );
                0
            }
        };
        let default_role = match d.role.as_deref() {
            None => Role::None,
            Some(text) => Role::parse(text).unwrap_or_else(|| {
                c.problem(
                    format!("{field}.role"),
                    format!("{text:?} is not a role; use \"primary\", \"secondary\" or \"none\""),
                );
                Role::None
            }),
        };
        let mut dev_machines = IndexMap::new();
        for (machine_name, dm) in d.machines {
            let mfield = format!("{field}.machines.{machine_name}");
            if !machines.contains_key(&machine_name) {
                c.problem(
                    mfield.clone(),
                    format!(
                        "unknown machine {machine_name:?}; defined machines: {}",
                        machines.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            let data = c
                .required(
                    format!("{mfield}.data"),
                    dm.data,
                    "give the data volume (a file or block device)",
                )
                .map(|p| resolve_path(base, &p))
                .unwrap_or_default();
            let state_map = c
                .required(
                    format!("{mfield}.state_map"),
                    dm.state_map,
                    "give the state map volume (a file or block device)",
                )
                .map(|p| resolve_path(base, &p))
                .unwrap_or_default();
            let role = match dm.role.as_deref() {
                None => default_role,
                Some(text) => Role::parse(text).unwrap_or_else(|| {
                    c.problem(
                        format!("{mfield}.role"),
                        format!(
                            "{text:?} is not a role; use \"primary\", \"secondary\" or \"none\""
                        ),
                    );
                    default_role
                }),
            };
            let ublk_id = dm.ublk_id.and_then(|id| match u32::try_from(id) {
                Ok(id) if id <= UBLK_ID_MAX => Some(id),
                _ => {
                    c.problem(
                        format!("{mfield}.ublk_id"),
                        format!("{id} is not a ublk device id; use 0–{UBLK_ID_MAX}"),
                    );
                    None
                }
            });
            dev_machines.insert(
                machine_name.clone(),
                DeviceMachine {
                    machine: machine_name,
                    data,
                    state_map,
                    role,
                    ublk_id,
                },
            );
        }
        check_device_machines(c, &field, mode, &dev_machines, &machines);
        devices.insert(
            dev_name.clone(),
            Device {
                name: dev_name,
                minor,
                mode,
                size_bytes,
                block_size,
                hwm_kib,
                sync_rate_kib,
                resync_checksums,
                export,
                ublk_queues,
                ublk_depth,
                machines: dev_machines,
            },
        );
    }

    ClusterConfig {
        path: path.to_owned(),
        name,
        key_file,
        encrypt: cluster.encrypt.unwrap_or(true),
        sites,
        machines,
        networks,
        devices,
    }
}

fn check_device_machines(
    c: &mut Checker,
    field: &str,
    mode: Mode,
    dev_machines: &IndexMap<String, DeviceMachine>,
    machines: &IndexMap<String, Machine>,
) {
    let mfield = format!("{field}.machines");
    let mut per_site: IndexMap<&str, usize> = IndexMap::new();
    for name in dev_machines.keys() {
        if let Some(m) = machines.get(name) {
            *per_site.entry(m.site.as_str()).or_default() += 1;
        }
    }
    if per_site.len() < 2 {
        c.problem(
            mfield.clone(),
            "a GeoMirror device needs a copy at each of the two sites; add a machine of the other site",
        );
    }
    for (site, count) in &per_site {
        if *count > REMOTE_PEERS_MAX {
            c.problem(
                mfield.clone(),
                format!("{count} machines at site {site}: a device has at most {REMOTE_PEERS_MAX} remote peers"),
            );
        }
    }
    let primaries: Vec<&str> = dev_machines
        .values()
        .filter(|m| m.role == Role::Primary)
        .map(|m| m.machine.as_str())
        .collect();
    let nones = dev_machines
        .values()
        .filter(|m| m.role == Role::None)
        .count();
    match mode {
        Mode::Async => {
            if primaries.len() != 1 || nones > 0 {
                c.problem(
                    mfield.clone(),
                    "async mode needs exactly one machine with role = \"primary\" and the others \"secondary\"",
                );
            }
            if let Some(primary) = primaries.first().and_then(|p| machines.get(*p)) {
                let remote = dev_machines
                    .keys()
                    .filter(|n| machines.get(*n).is_some_and(|m| m.site != primary.site))
                    .count();
                if remote != 1 {
                    c.problem(
                        mfield,
                        format!("async mode allows exactly one remote peer of the primary, found {remote}"),
                    );
                }
            }
        }
        Mode::Sync | Mode::Mwc => {
            if primaries.len() > 1 {
                c.problem(
                    mfield.clone(),
                    format!(
                        "only one machine may be primary, found {}",
                        primaries.join(", ")
                    ),
                );
            }
        }
    }
}

/// Rewrites device attributes in the configuration file, keeping its
/// comments and layout (used by `gmdctl set` while the device is DEFINED).
///
/// Each key is `mode`, `role` (of `machine`), `role.<machine>` (of another
/// machine), `hwm_kib`, `sync_rate_kib`, `minor`, `size`, `block_size` or
/// `export` (comma-separated). All changes are applied together and the new
/// file is checked in full before it replaces the old one (atomically), so a
/// mode change that needs new roles is made in one step.
///
/// # Errors
/// An unknown key, a value the checks refuse, or a file that cannot be written.
pub fn set_device_attributes(
    path: &Path,
    device: &str,
    machine: &str,
    changes: &[(String, String)],
) -> Result<ClusterConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
    let invalid = |field: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        problems: vec![Problem { field, message }],
    };
    let Some(dev) = doc
        .get_mut("devices")
        .and_then(|d| d.get_mut(device))
        .and_then(|d| d.as_table_like_mut())
    else {
        return Err(invalid(
            format!("devices.{device}"),
            "no such device in the configuration".into(),
        ));
    };
    for (key, value) in changes {
        let (key, target) = match key.split_once('.') {
            Some(("role", other)) => ("role", other),
            _ => (key.as_str(), machine),
        };
        let item = match key {
            "mode" | "size" => toml_edit::value(value.as_str()),
            "hwm_kib" | "sync_rate_kib" | "minor" | "block_size" => match value.parse::<i64>() {
                Ok(n) => toml_edit::value(n),
                Err(_) => {
                    return Err(invalid(
                        format!("devices.{device}.{key}"),
                        format!("{value:?} is not a whole number"),
                    ));
                }
            },
            "export" => {
                let mut array = toml_edit::Array::new();
                for part in value.split(',').filter(|p| !p.is_empty()) {
                    array.push(part.trim());
                }
                toml_edit::value(array)
            }
            "role" => {
                let Some(m) = dev
                    .get_mut("machines")
                    .and_then(|m| m.get_mut(target))
                    .and_then(|m| m.as_table_like_mut())
                else {
                    return Err(invalid(
                        format!("devices.{device}.machines.{target}"),
                        format!("machine {target} holds no copy of the device"),
                    ));
                };
                replace_keeping_comment(m, "role", toml_edit::value(value.as_str()));
                continue;
            }
            other => {
                return Err(invalid(
                    format!("devices.{device}.{other}"),
                    "not an attribute that can be set; use mode, role, role.<machine>, hwm_kib, sync_rate_kib, minor, size, block_size or export".into(),
                ));
            }
        };
        replace_keeping_comment(dev, key, item);
    }
    let new_text = doc.to_string();
    let config = ClusterConfig::parse(path, &new_text)?;
    let tmp = path.with_extension("toml.tmp");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &new_text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::volume::sync_parent_dir(path)
    };
    write().map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(config)
}

/// Replaces `key` in `table`, keeping the comment and spacing around the old value.
fn replace_keeping_comment(
    table: &mut dyn toml_edit::TableLike,
    key: &str,
    mut item: toml_edit::Item,
) {
    if let (Some(old), Some(new)) = (
        table.get(key).and_then(|i| i.as_value()),
        item.as_value_mut(),
    ) {
        *new.decor_mut() = old.decor().clone();
    }
    table.insert(key, item);
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (minor {}, {} mode, {})",
            self.name,
            self.minor,
            self.mode,
            format_size(self.size_bytes)
        )
    }
}

#[cfg(test)]
mod tests;
