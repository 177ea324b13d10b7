//! `gmdd`: one daemon per machine. It hosts every GeoMirror device of the
//! machine, serves the root-only control socket and the NBD exports, runs
//! the GeoMessage endpoint that mirrors devices to their peers, brings
//! devices back to their recorded state when it starts, and on SIGTERM
//! finishes in-flight I/O and persists every map before exiting.

mod compare;
mod control;
mod exports;
pub mod flusher;
mod isolation;
mod link;
pub mod notify;
mod ops;
mod peers;
mod roles;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use gmd_core::buf::BufPool;
use gmd_core::config::{ClusterConfig, Device, Frontend, ListenAddr, Mode, set_device_attributes};
use gmd_core::device::{DeviceError, DeviceHandle, ErrorClass, PeerView, StartOptions};
use gmd_core::link::PairRole;
use gmd_core::statemap::dump::{self, MapSummary};
use gmd_core::statemap::{AdminState, StateMap};
use gmd_core::units::REGION_SIZE_BYTES;
use gmd_net::{
    InterfaceConfig, MachineConfig, NetConfig, NetworkConfig, Node, NodeEvent, StreamId, Tuning,
};
use indexmap::IndexMap;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use exports::{DeviceExport, Exports};
use gmdctl::machine::resolve_machine;
use gmdctl::protocol::*;
use gmdctl::report::*;
use link::DeviceLink;

pub use peers::{DeviceInfo, PeerState};
use peers::{PeerReply, PeerRequest, decode_bits, encode_bits, union};

/// How long SIGTERM waits for the devices to stop before gmdd exits anyway.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

/// How `gmdd` was started.
#[derive(Clone, Debug)]
pub struct Options {
    /// Cluster configuration file.
    pub config: PathBuf,
    /// This machine's name (default: the hostname).
    pub machine: Option<String>,
    /// Control socket path.
    pub socket: PathBuf,
}

/// The shortest time a reachable but silent peer is waited for.
pub const PEER_STALL_MIN: Duration = Duration::from_secs(30);

/// The GeoMessage configuration of this machine, from the cluster's.
pub fn net_config(config: &ClusterConfig, machine: &str, key: &[u8]) -> NetConfig {
    NetConfig {
        cluster_name: config.name.clone(),
        psk: key.to_vec(),
        encrypt: config.encrypt,
        local_machine: machine.to_owned(),
        machines: config
            .machines
            .values()
            .map(|m| MachineConfig {
                name: m.name.clone(),
                promote_failure_timeout: Duration::from_secs(m.promote_failure_timeout_s),
                interfaces: m
                    .interfaces
                    .iter()
                    .map(|(network, addr)| InterfaceConfig {
                        network: network.clone(),
                        addr: *addr,
                    })
                    .collect(),
            })
            .collect(),
        networks: config
            .networks
            .values()
            .map(|n| NetworkConfig {
                name: n.name.clone(),
                // Unset: discovered per path, from the default up.
                datagram_bytes: n
                    .datagram_size
                    .map_or(gmd_net::DATAGRAM_BYTES_DEFAULT, |d| d as usize),
                discover: n.datagram_size.is_none(),
            })
            .collect(),
        tuning: Tuning {
            // One ordered stream per device: minor + 1 (minors 0–1023).
            streams_max: 1026,
            ..Tuning::default()
        },
    }
}

/// The `netstat` report (and the metrics' network part) from GeoMessage's
/// counters.
pub fn net_report(config: &ClusterConfig, machine: &str, s: &gmd_net::Stats) -> NetReport {
    let us = |d: Option<std::time::Duration>| d.map(|d| d.as_micros() as u64);
    NetReport {
        schema: REPORT_SCHEMA,
        machine: machine.to_owned(),
        machines: s
            .machines
            .iter()
            .map(|m| NetMachine {
                name: m.name.clone(),
                up: m.up,
                active_network: m.active_network.clone(),
                rpcs_sent: m.rpcs_sent,
                rpcs_received: m.rpcs_received,
                bytes_sent: m.bytes_sent,
                bytes_received: m.bytes_received,
                replies_sent: m.replies_sent,
                replies_received: m.replies_received,
                failures: m.failures,
                fragmented: m.fragmented,
                fragments: m.fragments,
                resends: m.resends,
                passed: m.passed,
                sent_now: m.sent_now,
                peer_downs: m.peer_downs,
            })
            .collect(),
        networks: s
            .networks
            .iter()
            .map(|n| NetNetwork {
                name: n.name.clone(),
                packets_sent: n.packets_sent,
                packets_received: n.packets_received,
                bytes_sent: n.bytes_sent,
                bytes_received: n.bytes_received,
                resends: n.resends,
                spurious: n.spurious,
                timeouts: n.timeouts,
                failures: n.failures,
                duplicates: n.duplicates,
                other: n.other,
                srtt_us: us(n.srtt),
                gso: Some(n.gso),
                gro: Some(n.gro),
            })
            .collect(),
        paths: s
            .paths
            .iter()
            .map(|p| NetPath {
                peer: p.peer.clone(),
                network: p.network.clone(),
                up: p.up,
                active: p.active,
                srtt_us: us(p.srtt),
                rttvar_us: us(p.rttvar),
                rto_us: p.rto.as_micros() as u64,
                cwnd_bytes: p.cwnd_bytes as u64,
                in_flight_bytes: p.in_flight_bytes as u64,
                datagram_bytes: Some(p.datagram_bytes as u64),
            })
            .collect(),
        rejected: s.rejected_total(),
        auth_failures: auth_failures(config, s),
    }
}

/// GeoMessage's authentication failures per source address, with the
/// configured machine that has an interface at that address.
pub fn auth_failures(config: &ClusterConfig, s: &gmd_net::Stats) -> Vec<AuthFailure> {
    s.auth_failures
        .iter()
        .map(|a| AuthFailure {
            from: a.from.to_string(),
            machine: config
                .machines
                .values()
                .find(|m| m.interfaces.values().any(|addr| *addr == a.from))
                .map(|m| m.name.clone()),
            count: a.count,
        })
        .collect()
}

/// How often gmdd says at most, per source address, that datagrams from
/// it fail authentication.
const AUTH_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The daemon's state, shared by the control server, the NBD server and
/// the GeoMessage tasks.
pub struct Daemon {
    machine: String,
    config: Mutex<Arc<ClusterConfig>>,
    devices: Mutex<IndexMap<String, DeviceHandle>>,
    exports: Arc<Exports>,
    /// ublk devices, by device name.
    ublk: Mutex<HashMap<String, gmd_ublk::UblkFrontend>>,
    links: HashMap<String, Arc<DeviceLink>>,
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    pool: BufPool,
    started: Instant,
    resync_started: Mutex<HashMap<String, Instant>>,
    /// Peers GeoMessage has a working session with.
    reachable: Mutex<std::collections::HashSet<String>>,
    /// State changes for `gmdctl events`.
    events: tokio::sync::broadcast::Sender<Event>,
    /// The metrics endpoint's address and its stop token, when it runs.
    metrics: tokio::sync::Mutex<Option<(std::net::SocketAddr, CancellationToken)>>,
    /// Per source address: when its authentication failures were last
    /// logged, and the count then.
    auth_logged: Mutex<HashMap<String, (Instant, u64)>>,
    /// The last STATUS line sent to systemd.
    status_line: Mutex<String>,
    /// Something about a device may have changed: the event watcher looks
    /// (commands, the links, messages to and from peers tell it).
    watch: Arc<ops::Watch>,
    /// What the event watcher saw last, per device (see [`Daemon::look`]).
    watched: Mutex<ops::Watched>,
    /// The running or last online compare of each device (`gmdctl compare`).
    compares: Mutex<HashMap<String, CompareReport>>,
}

fn control_error(e: DeviceError) -> ControlError {
    ControlError {
        kind: match e.class {
            ErrorClass::Refused => ErrorKind::Refused,
            ErrorClass::NotFound => ErrorKind::NotFound,
            ErrorClass::Invalid => ErrorKind::Invalid,
            ErrorClass::Internal => ErrorKind::Internal,
        },
        message: e.message,
    }
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, ControlError> {
    serde_json::to_value(value).map_err(|e| ControlError::internal(e.to_string()))
}

/// The identity a peer's description gives, when its map is open.
fn identity_of(info: &DeviceInfo) -> Option<gmd_core::link::Identity> {
    Some(gmd_core::link::Identity {
        uuid: info.uuid.as_deref()?.parse().ok()?,
        size_bytes: info.size_bytes,
        minor: info.minor,
        mode: info.mode,
    })
}

/// How status names why a resync goes the way it goes.
fn basis_name(basis: gmd_core::link::Basis) -> &'static str {
    match basis {
        gmd_core::link::Basis::SameData => "same_data",
        gmd_core::link::Basis::Ahead => "ahead",
        gmd_core::link::Basis::AheadUnmarked => "ahead_unmarked",
        gmd_core::link::Basis::TargetEmpty => "target_empty",
    }
}

impl Daemon {
    fn new(config: ClusterConfig, machine: String, node: Arc<Node>) -> Daemon {
        let watch = Arc::new(ops::Watch::default());
        let mut devices = IndexMap::new();
        let mut links = HashMap::new();
        for device in config.devices_on(&machine) {
            let handle = DeviceHandle::new(&config, &machine, &device.name)
                .expect("devices_on lists only devices with a copy here");
            devices.insert(device.name.clone(), handle);
            links.insert(
                device.name.clone(),
                DeviceLink::start(
                    node.clone(),
                    &machine,
                    device.name.clone(),
                    device.minor,
                    device.size_bytes,
                    watch.clone(),
                    isolation_settings(&config, &machine, device),
                ),
            );
        }
        Daemon {
            machine,
            config: Mutex::new(Arc::new(config)),
            devices: Mutex::new(devices),
            exports: Arc::new(Exports::default()),
            ublk: Mutex::new(HashMap::new()),
            links,
            node,
            rt: tokio::runtime::Handle::current(),
            pool: BufPool::new(),
            started: Instant::now(),
            resync_started: Mutex::new(HashMap::new()),
            reachable: Mutex::new(std::collections::HashSet::new()),
            events: tokio::sync::broadcast::channel(ops::EVENTS_QUEUE_MAX).0,
            metrics: tokio::sync::Mutex::new(None),
            auth_logged: Mutex::new(HashMap::new()),
            status_line: Mutex::new(String::new()),
            watch,
            watched: Mutex::new(ops::Watched::default()),
            compares: Mutex::new(HashMap::new()),
        }
    }

    /// Subscribes to state changes, with the `exists` events of the current
    /// state first.
    pub(crate) fn subscribe(&self) -> (Vec<Event>, tokio::sync::broadcast::Receiver<Event>) {
        let rx = self.events.subscribe();
        (self.exists_events(), rx)
    }

    fn config(&self) -> Arc<ClusterConfig> {
        self.config.lock().expect("config lock").clone()
    }

    fn link(&self, device: &str) -> Option<Arc<DeviceLink>> {
        self.links.get(device).cloned()
    }

    fn links(&self) -> Vec<Arc<DeviceLink>> {
        self.links.values().cloned().collect()
    }

    /// Remote peers of `device` (machines at the other site), in config order.
    fn remote_peers(&self, device: &str) -> Vec<String> {
        let config = self.config();
        config
            .devices
            .get(device)
            .map(|d| {
                d.remote_peers(&config, &self.machine)
                    .map(|m| m.machine.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// This machine's description of `device`, with its non-zero cells as
    /// bits when asked (unify).
    fn local_info(
        &self,
        device: &str,
        with_bits: bool,
    ) -> Result<(DeviceInfo, Option<Vec<u8>>), ControlError> {
        let devices = self.devices.lock().expect("devices lock");
        let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
        let (connected_to, starting) = self
            .link(device)
            .map(|l| {
                let inner = l.inner.lock().expect("link lock");
                (inner.connected_peer(), inner.starting)
            })
            .unwrap_or((None, false));
        let state = match handle.state() {
            _ if starting => PeerState::Starting,
            AdminState::Defined => PeerState::Defined,
            AdminState::Stopped => PeerState::Stopped,
            AdminState::Available => PeerState::Available,
        };
        let (summary, bits) = match handle.state() {
            AdminState::Defined => (None, None),
            _ => {
                let (_, cells) = handle.map_snapshot().map_err(control_error)?;
                let bits = with_bits.then(|| cells.resync_bits(false));
                (Some(MapSummary::of(&cells)), bits)
            }
        };
        Ok((
            DeviceInfo {
                uuid: handle.uuid().map(|u| u.to_string()),
                size_bytes: handle.config().size_bytes,
                minor: handle.config().minor,
                mode: handle.config().mode,
                role: handle.role(),
                state,
                stale: summary.map_or(0, |s| s.stale),
                inconsistent: summary.map_or(0, |s| s.inconsistent),
                connected_to,
                facts: handle.side_facts(),
            },
            bits,
        ))
    }

    /// What the remote peers of `device` say (blocking; no lock held).
    fn remote_views(&self, device: &str) -> Vec<PeerView> {
        self.remote_peers(device)
            .into_iter()
            .map(|peer| {
                let info = self.rt.block_on(self.peer_status(device, &peer));
                PeerView {
                    reachable: info.is_some(),
                    available: info
                        .as_ref()
                        .is_some_and(|i| i.state == PeerState::Available),
                    starting: info
                        .as_ref()
                        .is_some_and(|i| i.state == PeerState::Starting),
                    role: info.as_ref().map_or(PairRole::Secondary, |i| i.role),
                    facts: info
                        .filter(|i| i.state == PeerState::Available)
                        .and_then(|i| i.facts),
                    machine: peer,
                }
            })
            .collect()
    }

    fn restore_all(self: &Arc<Self>) {
        let names: Vec<String> = self
            .devices
            .lock()
            .expect("devices lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let recorded = {
                let devices = self.devices.lock().expect("devices lock");
                let handle = &devices[&name];
                gmd_core::statemap::file::MapFile::open(
                    &handle.local().state_map,
                    Some(handle.config().size_bytes),
                )
                .map(|(m, _)| m.superblock().admin_state)
                .ok()
            };
            let peers = if recorded == Some(AdminState::Available) {
                self.set_starting(&name, true);
                self.remote_views(&name)
            } else {
                Vec::new()
            };
            let options = self.start_options(&name);
            let mut devices = self.devices.lock().expect("devices lock");
            let handle = devices.get_mut(&name).expect("listed");
            let result = handle.restore(&peers, &options);
            match result {
                Ok(AdminState::Defined) => {}
                Ok(state) => {
                    info!(device = %name, %state, "device restored");
                    if state == AdminState::Available {
                        if let Err(e) = self.went_available(handle) {
                            error!(device = %name, "{}", e.message);
                        }
                    }
                }
                Err(e) => error!(device = %name, "device not restored: {e}"),
            }
            drop(devices);
            self.set_starting(&name, false);
        }
    }

    fn set_starting(&self, device: &str, starting: bool) {
        if let Some(link) = self.link(device) {
            link.inner.lock().expect("link lock").starting = starting;
        }
    }

    fn start_options(&self, device: &str) -> StartOptions {
        StartOptions {
            pool: self.pool.clone(),
            link: self
                .link(device)
                .map(|l| l as Arc<dyn gmd_core::mirror::PeerLink>),
            peer_stall_ms: self.peer_stall_ms(device),
            restoring: false,
        }
    }

    /// How long a reachable peer may leave messages unanswered before the
    /// device drops it and goes on alone: its machine's promote-failure
    /// timeout, but never under [`PEER_STALL_MIN`] (a disk pausing for a few
    /// seconds is not a failure); 0 (wait forever) if a peer's timeout is 0.
    fn peer_stall_ms(&self, device: &str) -> u64 {
        let config = self.config();
        let mut limit = PEER_STALL_MIN;
        for peer in self.remote_peers(device) {
            match config
                .machines
                .get(&peer)
                .map(|m| m.promote_failure_timeout_s)
            {
                Some(0) => return 0,
                Some(s) => limit = limit.max(Duration::from_secs(s)),
                None => {}
            }
        }
        limit.as_millis() as u64
    }

    /// Which frontends `config` gets on this host: (ublk, nbd). With no
    /// `export` list: ublk where the driver is loaded, else NBD (logged
    /// when `say_why`).
    fn frontends(&self, config: &Device, say_why: bool) -> (bool, bool) {
        if config.export.is_empty() {
            if gmd_ublk::available() {
                return (true, false);
            }
            if !say_why {
                return (false, true);
            }
            info!(
                device = %config.name,
                "exporting over NBD: no ublk on this host ({} is missing; `modprobe ublk_drv`, Linux ≥ 6.0)",
                gmd_ublk::control_path().display()
            );
            return (false, true);
        }
        (
            config.export.contains(&Frontend::Ublk),
            config.export.contains(&Frontend::Nbd),
        )
    }

    /// A device just became AVAILABLE: export it, attach its link and look
    /// for its peer.
    ///
    /// # Errors
    /// The ublk device could not be created; nothing was exported then.
    fn went_available(self: &Arc<Self>, handle: &DeviceHandle) -> Result<(), ControlError> {
        let name = handle.config().name.clone();
        let runtime = handle.runtime().expect("AVAILABLE devices run");
        let config = handle.config();
        let role = handle.role();
        let (_, nbd) = self.frontends(config, true);
        self.export_ublk(handle)?;
        if let Some(link) = self.link(&name) {
            link.attach(runtime.port(), role);
        }
        if nbd {
            self.exports.insert(Arc::new(DeviceExport::new(
                config,
                !role.writable(),
                runtime.submitter(),
                self.pool.clone(),
            )));
        }
        if let Some(note) = handle.role_note() {
            warn!(device = %name, "started as secondary: {note}");
        }
        let daemon = self.clone();
        self.rt.spawn(async move { daemon.join(name).await });
        Ok(())
    }

    /// Makes the ublk device of a running device, when it is exported over
    /// ublk: read-only while secondary; none for an async secondary, which
    /// serves no application I/O.
    fn export_ublk(&self, handle: &DeviceHandle) -> Result<(), ControlError> {
        let config = handle.config();
        let name = config.name.clone();
        let role = handle.role();
        let (ublk, _) = self.frontends(config, false);
        if !ublk {
            return Ok(());
        }
        if config.mode == Mode::Async && role == PairRole::Secondary {
            info!(device = %name, "not exported over ublk here: an async secondary is not readable");
            return Ok(());
        }
        let runtime = handle.runtime().expect("AVAILABLE devices run");
        let spec = gmd_ublk::Spec {
            read_only: !role.writable(),
            id: handle.local().ublk_id.unwrap_or(config.minor),
            name: name.clone(),
            size_bytes: config.size_bytes,
            block_size: config.block_size,
            queues: if config.ublk_queues == 0 {
                gmd_ublk::queues_default()
            } else {
                config.ublk_queues
            },
            depth: if config.ublk_depth == 0 {
                gmd_ublk::DEPTH_DEFAULT
            } else {
                config.ublk_depth
            },
        };
        let frontend = gmd_ublk::UblkFrontend::start(spec, runtime.submitter(), self.pool.clone())
            .map_err(|e| ControlError::refused(format!("{name}: {e}")))?;
        self.ublk.lock().expect("ublk lock").insert(name, frontend);
        Ok(())
    }

    /// Whether `device` has a ublk device now.
    fn ublk_exported(&self, device: &str) -> bool {
        self.ublk.lock().expect("ublk lock").contains_key(device)
    }

    /// The ublk node of `device`, if it has one.
    fn ublk_path(&self, device: &str) -> Option<String> {
        self.ublk
            .lock()
            .expect("ublk lock")
            .get(device)
            .map(|u| u.path().display().to_string())
    }

    /// Deletes `device`'s ublk node; refused while it is open or mounted
    /// unless `force`.
    fn remove_ublk(&self, device: &str, force: bool) -> Result<(), ControlError> {
        let mut table = self.ublk.lock().expect("ublk lock");
        let Some(frontend) = table.remove(device) else {
            return Ok(());
        };
        if !force {
            if let Some(why) = frontend.in_use() {
                let path = frontend.path();
                table.insert(device.to_owned(), frontend);
                return Err(ControlError::refused(format!(
                    "{device}: stop refused: the device is in use ({} is {why}); unmount it and close it first",
                    path.display()
                )));
            }
        }
        drop(table);
        frontend
            .stop(force)
            .map_err(|e| ControlError::refused(format!("{device}: {e}")))
    }

    fn nbd_url(&self, device: &str) -> String {
        let config = self.config();
        match &config.machines[&self.machine].nbd_listen {
            ListenAddr::Tcp(addr) => format!("nbd://{addr}/{device}"),
            ListenAddr::Unix(path) => format!("nbd+unix:///{device}?socket={}", path.display()),
        }
    }

    /// Executes one control command (blocking; run it off the async workers).
    fn handle(self: &Arc<Self>, command: Command) -> Result<Value, ControlError> {
        match command {
            Command::Hello => to_value(&Hello {
                machine: self.machine.clone(),
                config: self.config().path.display().to_string(),
                daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_s: self.started.elapsed().as_secs(),
            }),
            Command::Status { device } => self.status(device.as_deref()),
            Command::Configure { target } => self.lifecycle(target, Step::Configure),
            Command::Start { target } => self.lifecycle(target, Step::Start),
            Command::Stop { target } => self.lifecycle(target, Step::Stop),
            Command::Unconfigure { target } => self.lifecycle(target, Step::Unconfigure),
            Command::Down { device, peer } => self.down(&device, &peer),
            Command::Set { device, changes } => self.set(&device, &changes),
            Command::ShowState { device } => {
                let (uuid, cells, state) = self.with_device(&device, |h| {
                    let (uuid, cells) = h.map_snapshot()?;
                    Ok((uuid, cells, h.state()))
                })?;
                to_value(&ShowState {
                    machine: self.machine.clone(),
                    device,
                    state,
                    source: if state == AdminState::Defined {
                        "disk"
                    } else {
                        "daemon"
                    }
                    .into(),
                    map_file_base64: base64::engine::general_purpose::STANDARD
                        .encode(dump::encode(&uuid, &cells)),
                })
            }
            Command::Dirty { device } => {
                self.refuse_if_peer_available(&device, "dirty")?;
                self.with_device(&device, |h| h.dirty())?;
                info!(%device, "every cell of the state map marked stale");
                to_value(&Outcome {
                    lines: vec![format!(
                        "{device}: every region marked stale; the whole device will be sent to the peer when mirroring resumes"
                    )],
                    warnings: vec![],
                })
            }
            Command::Clean { device, force } => {
                let peer_up = self.remote_views(&device).iter().any(|p| p.available);
                let cleared = self.with_device(&device, |h| h.clean(force, !peer_up))?;
                warn!(%device, cleared, "state map cleaned by the administrator");
                to_value(&Outcome {
                    lines: vec![format!("{device}: state map cleaned")],
                    warnings: vec![format!(
                        "{cleared} region(s) marked as differing from the peer were forgotten; \
                         they will not be resynchronised"
                    )],
                })
            }
            Command::Primary { device, force } => self.primary(&device, force),
            Command::Secondary { device } => self.secondary(&device),
            Command::Split { device } => self.split(&device),
            Command::Rejoin { device } => self.rejoin(&device),
            Command::InitState {
                device,
                force,
                uuid,
                zeroed,
            } => {
                let cluster = self.config().name.clone();
                let volume = if zeroed {
                    gmd_core::device::NewVolume::Zeroed
                } else {
                    gmd_core::device::NewVolume::Unknown
                };
                let given =
                    match uuid {
                        Some(text) => Some(text.parse::<uuid::Uuid>().map_err(|_| {
                            ControlError::invalid(format!("{text:?} is not a UUID"))
                        })?),
                        None => None,
                    };
                let uuid = self.with_device(&device, |h| {
                    let uuid = given
                        .unwrap_or_else(|| gmd_core::device::default_uuid(&cluster, h.config()));
                    h.init_state(uuid, volume, force)
                })?;
                info!(%device, %uuid, zeroed, "state map initialised");
                to_value(&Outcome {
                    lines: vec![
                        format!("{device}: new state map written (device id {uuid})"),
                        if zeroed {
                            format!(
                                "{device}: the volume is declared zeroed: with a peer initialised --zeroed too, the pair starts without a copy"
                            )
                        } else {
                            format!(
                                "{device}: the volume holds no known data: it receives a full copy from its peer (for a new pair, run 'gmdctl primary {device} --force' on the side to keep)"
                            )
                        },
                    ],
                    warnings: vec![],
                })
            }
            Command::Stats { devices } => self.stats(&devices),
            Command::NetStat => self.netstat(),
            Command::VerifyCluster => self.verify_cluster(),
            Command::Events => Err(ControlError::invalid(
                "events is a streaming command: the control session handles it",
            )),
            Command::Unify {
                device,
                master,
                preview,
            } => self.unify(&device, &master, preview),
            Command::NetProbe { peer, rounds } => self.netprobe(&peer, rounds),
            Command::Compare {
                device,
                repair,
                rate_mib_s,
            } => to_value(&self.compare_start(&device, repair, rate_mib_s)?),
            Command::CompareStatus { device } => {
                if !self.links.contains_key(&device) {
                    return Err(self.unknown(&device));
                }
                match self.compare_report(&device) {
                    Some(r) => to_value(&r),
                    None => Err(ControlError::not_found(format!(
                        "no compare of {device} since gmdd started: gmdctl compare {device}"
                    ))),
                }
            }
        }
    }

    fn netprobe(&self, peer: &str, rounds: usize) -> Result<Value, ControlError> {
        let id = self
            .node
            .peer(peer)
            .filter(|_| peer != self.machine)
            .ok_or_else(|| {
                ControlError::not_found(format!(
                    "{peer} is not another machine of the cluster; machines: {}",
                    self.config()
                        .machines
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let sizes = gmd_net::netprobe::PROBE_SIZES_DEFAULT;
        let report = self
            .rt
            .block_on(gmd_net::netprobe::netprobe(
                &self.node,
                id,
                sizes,
                rounds.clamp(1, 1000),
            ))
            .map_err(|e| ControlError::refused(format!("netprobe to {peer}: {e}")))?;
        to_value(&NetProbe {
            peer: report.peer,
            paths: report
                .paths
                .into_iter()
                .map(|p| ProbePath {
                    network: p.network,
                    up: p.up,
                    srtt_us: p.srtt.map(|d| d.as_micros() as u64),
                    sizes: p
                        .sizes
                        .into_iter()
                        .map(|s| ProbeSize {
                            bytes: s.message_bytes,
                            rtt_min_us: s.rtt_min.as_micros() as u64,
                            rtt_avg_us: s.rtt_avg.as_micros() as u64,
                            rtt_max_us: s.rtt_max.as_micros() as u64,
                            bytes_per_s: s.throughput_bytes_per_sec as u64,
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    fn with_device<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut DeviceHandle) -> Result<T, DeviceError>,
    ) -> Result<T, ControlError> {
        let mut devices = self.devices.lock().expect("devices lock");
        let handle = devices.get_mut(name).ok_or_else(|| self.unknown(name))?;
        f(handle).map_err(control_error)
    }

    fn unknown(&self, name: &str) -> ControlError {
        let config = self.config();
        if config.devices.contains_key(name) {
            ControlError::not_found(format!(
                "device {name} has no copy on machine {}",
                self.machine
            ))
        } else {
            ControlError::not_found(format!(
                "no device named {name} in {}; devices here: {}",
                config.path.display(),
                config
                    .devices_on(&self.machine)
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    fn refuse_if_peer_available(&self, device: &str, what: &str) -> Result<(), ControlError> {
        if !self
            .devices
            .lock()
            .expect("devices lock")
            .contains_key(device)
        {
            return Err(self.unknown(device));
        }
        if let Some(peer) = self.remote_views(device).into_iter().find(|p| p.available) {
            return Err(ControlError::refused(format!(
                "{device}: {what} refused while the device is AVAILABLE on the remote peer {}; \
                 stop it there first (gmdctl stop {device} on {})",
                peer.machine, peer.machine
            )));
        }
        Ok(())
    }

    fn lifecycle(self: &Arc<Self>, target: Target, step: Step) -> Result<Value, ControlError> {
        let names: Vec<String> = {
            let devices = self.devices.lock().expect("devices lock");
            match &target {
                Target::Device(name) => {
                    if !devices.contains_key(name) {
                        return Err(self.unknown(name));
                    }
                    vec![name.clone()]
                }
                Target::All => devices
                    .iter()
                    .filter(|(_, h)| h.state() == step.from())
                    .map(|(n, _)| n.clone())
                    .collect(),
            }
        };
        let mut outcome = Outcome {
            lines: vec![],
            warnings: vec![],
        };
        let mut failures = Vec::new();
        for name in names {
            match self.step(&name, step) {
                Ok(mut lines) => {
                    info!(device = %name, "{}", step.done());
                    outcome.lines.push(format!("{name}: {}", step.done()));
                    outcome.lines.append(&mut lines.0);
                    outcome.warnings.append(&mut lines.1);
                }
                Err(e) => {
                    warn!(device = %name, "{}", e.message);
                    failures.push(e);
                }
            }
        }
        if failures.is_empty() {
            return to_value(&outcome);
        }
        let kind = failures
            .iter()
            .map(|e| e.kind)
            .max_by_key(|k| k.exit_code())
            .unwrap_or(ErrorKind::Refused);
        let mut message: Vec<String> = outcome.lines;
        message.extend(failures.into_iter().map(|e| e.message));
        Err(ControlError {
            kind,
            message: message.join("\n"),
        })
    }

    /// One lifecycle step of one device; returns extra lines and warnings.
    fn step(
        self: &Arc<Self>,
        name: &str,
        step: Step,
    ) -> Result<(Vec<String>, Vec<String>), ControlError> {
        match step {
            Step::Configure => {
                self.with_device(name, |h| h.configure())?;
                // The peer must hold the same device.
                let (local, _) = self.local_info(name, false)?;
                for peer in self.remote_peers(name) {
                    if let Some(remote) = self.rt.block_on(self.peer_status(name, &peer)) {
                        let (Some(a), Some(b)) = (identity_of(&local), identity_of(&remote)) else {
                            continue;
                        };
                        if let Err(reason) =
                            gmd_core::link::same_device(name, &a, &b, &self.machine, &peer)
                        {
                            let _ = self.with_device(name, |h| h.unconfigure());
                            return Err(ControlError::refused(format!(
                                "configure refused: {reason}"
                            )));
                        }
                    }
                }
                Ok((vec![], vec![]))
            }
            Step::Start => {
                {
                    let devices = self.devices.lock().expect("devices lock");
                    let handle = devices.get(name).ok_or_else(|| self.unknown(name))?;
                    if handle.state() != AdminState::Stopped {
                        drop(devices);
                        return self
                            .with_device(name, |h| h.start(&[], &StartOptions::default()))
                            .map(|_| (vec![], vec![]));
                    }
                }
                {
                    let devices = self.devices.lock().expect("devices lock");
                    let config = devices.get(name).expect("checked").config();
                    if config.export.contains(&Frontend::Ublk) && !gmd_ublk::available() {
                        return Err(ControlError::refused(format!(
                            "{name}: start refused: {}",
                            gmd_ublk::NOT_LOADED
                        )));
                    }
                }
                self.set_starting(name, true);
                let peers = self.remote_views(name);
                let options = self.start_options(name);
                let result = {
                    let mut devices = self.devices.lock().expect("devices lock");
                    let handle = devices.get_mut(name).expect("checked");
                    match handle.start(&peers, &options).map_err(control_error) {
                        Ok(()) => match self.went_available(handle) {
                            Ok(()) => Ok(handle.peers_down()),
                            Err(e) => {
                                // Nothing half-made: back to STOPPED.
                                self.exports.withdraw(name);
                                if let Some(link) = self.link(name) {
                                    link.detach();
                                }
                                if let Err(stop) = handle.stop(0) {
                                    warn!(device = %name, "{stop}");
                                }
                                Err(e)
                            }
                        },
                        Err(e) => Err(e),
                    }
                };
                self.set_starting(name, false);
                let down = result?;
                let mut lines = Vec::new();
                let mut warnings = Vec::new();
                if let Some(path) = self.ublk_path(name) {
                    lines.push(format!("{name}: exported at {path}"));
                }
                if self.exports.contains(name) {
                    lines.push(format!("{name}: exported at {}", self.nbd_url(name)));
                }
                if let Some(peer) = peers
                    .iter()
                    .find(|p| p.available && !down.contains(&p.machine))
                {
                    lines.push(format!("{name}: mirroring with {}", peer.machine));
                } else if !down.is_empty() {
                    warnings.push(format!(
                        "{name}: remote peer(s) {} down: writes are marked stale until they return",
                        down.join(", ")
                    ));
                }
                Ok((lines, warnings))
            }
            Step::Stop => {
                // NBD clients refuse the stop below; only then is ublk's turn.
                if self.exports.clients(name) == 0 {
                    self.remove_ublk(name, false)?;
                }
                let clients = self.exports.withdraw_unless_in_use(name);
                if clients > 0 {
                    return self
                        .with_device(name, |h| h.stop(clients))
                        .map(|()| (vec![], vec![]));
                }
                // The device drains while still linked: its hot regions'
                // marks go behind a barrier with the peer, and its volume
                // is flushed; the peer is told after, so that both maps
                // are left clean.
                let session = self.link(name).and_then(|l| {
                    l.inner
                        .lock()
                        .expect("link lock")
                        .core
                        .connected()
                        .map(|(p, s)| (p.to_owned(), s))
                });
                let result = self.with_device(name, |h| h.stop(0));
                self.leave(name, session, result.is_ok());
                result.map(|()| (vec![], vec![]))
            }
            Step::Unconfigure => self
                .with_device(name, |h| h.unconfigure())
                .map(|()| (vec![], vec![])),
        }
    }

    /// Tells the peer of `session` (taken before the device stopped) that
    /// this device stopped mirroring with it (`flushed`: after flushing its
    /// volume), then detaches the link.
    fn leave(&self, device: &str, session: Option<(String, u64)>, flushed: bool) {
        let Some(link) = self.link(device) else {
            return;
        };
        if let Some((peer, session)) = session {
            let request = PeerRequest::Leave {
                device: device.into(),
                session,
                flushed,
            };
            if let Err(e) = self
                .rt
                .block_on(self.ask(&peer, &request, Duration::from_secs(3)))
            {
                warn!(%device, %peer, "could not tell the peer: {e}");
            }
        }
        link.detach();
    }

    /// Stops a device whatever its clients (the peer asked: `gmdctl down`
    /// run there, or a second remote peer took over).
    fn force_stop(&self, device: &str) -> Result<(), ControlError> {
        if !self
            .devices
            .lock()
            .expect("devices lock")
            .contains_key(device)
        {
            return Err(self.unknown(device));
        }
        if let Err(e) = self.remove_ublk(device, true) {
            warn!(%device, "{}", e.message);
        }
        if let Some(export) = self.exports.fence(device) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while export.clients() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(link) = self.link(device) {
            link.detach();
        }
        self.with_device(device, |h| {
            if h.state() == AdminState::Available {
                h.stop(0)
            } else {
                Ok(())
            }
        })
    }

    fn down(self: &Arc<Self>, device: &str, peer: &str) -> Result<Value, ControlError> {
        let mut warnings = Vec::new();
        if !self.remote_peers(device).iter().any(|p| p == peer) {
            // Let the device layer produce its message.
            let config = self.config();
            return self
                .with_device(device, |h| h.down(&config, peer))
                .map(|()| Value::Null);
        }
        {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            if handle.state() == AdminState::Defined {
                let config = self.config();
                drop(devices);
                self.with_device(device, |h| h.down(&config, peer))?;
                // A promotion once it starts needs no fencing: the
                // administrator confirmed the peer down.
                if let Some(link) = self.link(device) {
                    link.confirm_down(peer);
                }
                return Ok(Value::Null);
            }
        }
        // A running device stops mirroring with it first: it goes on alone.
        if let Some(link) = self.link(device) {
            let with_it = link.inner.lock().expect("link lock").core.peer() == Some(peer);
            if with_it && link.disconnect().is_some() {
                warnings.push(format!(
                    "{device}: stopped mirroring with {peer}; writes are marked stale until it returns"
                ));
            }
        }
        if let Some(info) = self.rt.block_on(self.peer_status(device, peer)) {
            if info.state == PeerState::Available {
                // Protect against divergence: the peer's device stops.
                let request = PeerRequest::StopDevice {
                    device: device.into(),
                    by: self.machine.clone(),
                };
                match self.rt.block_on(self.ask(peer, &request, Duration::from_secs(20))) {
                    Ok(PeerReply::Ok) => warnings.push(format!(
                        "{peer} was in fact AVAILABLE: its copy of {device} was stopped to protect against divergence"
                    )),
                    Ok(PeerReply::Refused { reason, .. }) => {
                        return Err(ControlError::refused(format!(
                            "{device}: {peer} is AVAILABLE and could not be stopped: {reason}"
                        )));
                    }
                    Ok(_) | Err(_) => {}
                }
            }
        }
        let config = self.config();
        self.with_device(device, |h| h.down(&config, peer))?;
        info!(%device, %peer, "remote peer recorded as down");
        if let Some(link) = self.link(device) {
            link.confirm_down(peer);
        }
        to_value(&Outcome {
            lines: vec![format!("{device}: remote peer {peer} recorded as down")],
            warnings,
        })
    }

    fn set(&self, device: &str, changes: &[(String, String)]) -> Result<Value, ControlError> {
        let mut devices = self.devices.lock().expect("devices lock");
        let handle = devices
            .get_mut(device)
            .ok_or_else(|| self.unknown(device))?;
        if handle.state() != AdminState::Defined {
            return Err(ControlError::refused(format!(
                "{device}: attributes can only change while the device is DEFINED (it is {}); \
                 run 'gmdctl stop {device}' and 'gmdctl unconfigure {device}' first",
                handle.state()
            )));
        }
        let path = self.config().path.clone();
        let new = set_device_attributes(&path, device, &self.machine, changes)
            .map_err(|e| ControlError::invalid(e.to_string()))?;
        handle.update_config(&new).map_err(control_error)?;
        *self.config.lock().expect("config lock") = Arc::new(new);
        let summary: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        info!(%device, changes = %summary.join(" "), "attributes changed");
        to_value(&Outcome {
            lines: vec![format!(
                "{device}: {} written to {}",
                summary.join(" "),
                path.display()
            )],
            warnings: vec![
                "make the same change on every machine of the device (gmdctl verify checks)".into(),
            ],
        })
    }

    /// Applies unify on this machine: as master, mark `bits` stale; otherwise clear the map.
    fn unify_local(&self, device: &str, master: bool, bits: &[u8]) -> Result<(), ControlError> {
        self.with_device(device, |h| {
            if master {
                h.mark_stale_bits(bits)
            } else {
                // This side's changes are discarded: its data generation
                // goes back to the one its marks counted from, and the
                // master's union covers every region that may differ.
                h.discard_own_changes()?;
                h.clear_map()
            }
        })?;
        info!(%device, master, "state map unified");
        Ok(())
    }

    fn unify(&self, device: &str, master: &str, preview: bool) -> Result<Value, ControlError> {
        let peers = self.remote_peers(device);
        if !self
            .devices
            .lock()
            .expect("devices lock")
            .contains_key(device)
        {
            return Err(self.unknown(device));
        }
        let other = if master == self.machine {
            peers.first().cloned()
        } else if peers.iter().any(|p| p == master) {
            Some(master.to_owned())
        } else {
            return Err(ControlError::invalid(format!(
                "{device}: --master must be {} or one of its remote peers ({})",
                self.machine,
                peers.join(", ")
            )));
        }
        .ok_or_else(|| ControlError::invalid(format!("{device} has no remote peer")))?;
        let (local, local_bits) = self.local_info(device, true)?;
        let remote = match self.rt.block_on(self.ask(
            &other,
            &PeerRequest::GetMap {
                device: device.into(),
            },
            Duration::from_secs(20),
        )) {
            Ok(PeerReply::Map { info, bits }) => {
                let regions = gmd_core::units::region_count(local.size_bytes);
                (
                    info,
                    decode_bits(&bits, regions).map_err(ControlError::internal)?,
                )
            }
            Ok(PeerReply::Refused { reason, .. }) => return Err(ControlError::refused(reason)),
            Ok(other) => {
                return Err(ControlError::internal(format!(
                    "unexpected answer {other:?}"
                )));
            }
            Err(e) => {
                return Err(ControlError::refused(format!(
                    "{device}: {other} cannot be reached ({e}); unify needs both state maps"
                )));
            }
        };
        let all = union(&local_bits.unwrap_or_default(), &remote.1);
        let size = local.size_bytes;
        let mut unified = StateMap::new(size);
        for r in 0..unified.region_count() {
            if all
                .get((r / 8) as usize)
                .is_some_and(|b| b & (1 << (r % 8)) != 0)
            {
                unified.set(r, gmd_core::statemap::cells::CELL_STALE);
            }
        }
        let uuid =
            gmd_core::device::default_uuid(&self.config().name, &self.config().devices[device]);
        let map_file =
            base64::engine::general_purpose::STANDARD.encode(dump::encode(&uuid, &unified));
        if preview {
            return to_value(&ShowState {
                machine: format!("{} + {}", self.machine, other),
                device: device.into(),
                state: AdminState::Defined,
                source: "unify preview".into(),
                map_file_base64: map_file,
            });
        }
        let non_master_state = if master == self.machine {
            remote.0.state
        } else {
            local.state
        };
        if non_master_state == PeerState::Available || non_master_state == PeerState::Starting {
            let non_master = if master == self.machine {
                other.clone()
            } else {
                self.machine.clone()
            };
            return Err(ControlError::refused(format!(
                "{device}: stop the device on {non_master} (the side whose changes are discarded) before unify: gmdctl stop {device}"
            )));
        }
        let bits = encode_bits(&all);
        let apply = |machine: &str, is_master: bool| -> Result<(), ControlError> {
            if machine == self.machine {
                self.unify_local(device, is_master, &all)
            } else {
                let request = PeerRequest::Unify {
                    device: device.into(),
                    master: is_master,
                    bits: bits.clone(),
                };
                match self
                    .rt
                    .block_on(self.ask(machine, &request, Duration::from_secs(30)))
                {
                    Ok(PeerReply::Ok) => Ok(()),
                    Ok(PeerReply::Refused { reason, .. }) => Err(ControlError::refused(reason)),
                    Ok(other) => Err(ControlError::internal(format!(
                        "unexpected answer {other:?}"
                    ))),
                    Err(e) => Err(ControlError::refused(e)),
                }
            }
        };
        let non_master = if master == self.machine {
            other.clone()
        } else {
            self.machine.clone()
        };
        // Master first: the union is durable there before the other map is cleared.
        apply(master, true)?;
        apply(&non_master, false)?;
        let regions = unified.count_nonzero();
        warn!(%device, %master, regions, "maps unified");
        to_value(&Outcome {
            lines: vec![
                format!("{device}: {regions} region(s) will be sent from {master} to {non_master}"),
                format!(
                    "{device}: now start the device on {non_master} (gmdctl start {device}) to resynchronise it from {master}"
                ),
            ],
            warnings: vec![format!(
                "changes made on {non_master} in those regions while apart are discarded"
            )],
        })
    }

    fn link_status(&self, device: &str, handle: &DeviceHandle) -> Option<LinkStatus> {
        let runtime = handle.runtime()?;
        let link = self.link(device)?;
        let stats = runtime.stats().snapshot().engine;
        let inner = link.inner.lock().expect("link lock");
        let part = inner.plan.map(|(p, _, _)| p);
        let (total, remaining) = match part {
            Some(link::ResyncPart::Source) => (stats.resync_total, stats.resync_remaining),
            Some(link::ResyncPart::Target) => {
                (stats.resync_target_total, stats.resync_target_remaining)
            }
            _ => (0, 0),
        };
        let connected = inner.core.connected();
        let mut started = self.resync_started.lock().expect("resync lock");
        let key = format!("{device}/{}", connected.map_or(0, |(_, s)| s));
        let since = *started.entry(key).or_insert_with(Instant::now);
        let elapsed = since.elapsed().as_secs_f64().max(0.001);
        let rate = (stats.resync_bytes_sent as f64 / elapsed) as u64;
        let eta = (remaining > 0 && rate > 0).then(|| remaining * REGION_SIZE_BYTES / rate);
        let mode = if connected.is_none() {
            "standalone".to_string()
        } else if stats.hwm_fallback_active == 1 {
            "async (above the high water mark: mwc)".to_string()
        } else {
            handle.config().mode.to_string()
        };
        let plan = inner.plan.map(|(_, p, _)| p);
        Some(LinkStatus {
            peer: inner.core.peer().map(str::to_owned),
            connected: connected.is_some(),
            mode_in_effect: mode,
            resync_role: part.map(|p| p.name().to_owned()),
            resync_total: total,
            resync_remaining: remaining,
            resync_bytes_per_s: if part == Some(link::ResyncPart::Source) {
                rate
            } else {
                0
            },
            resync_eta_s: eta,
            backlog_bytes: stats.backlog_bytes,
            hwm_fallbacks: stats.hwm_fallbacks,
            refused: inner.refused.as_ref().map(|r| r.reason.clone()),
            resync_basis: plan
                .filter(|p| p.source.is_some())
                .map(|p| basis_name(p.basis).to_owned()),
            resync_full: plan.is_some_and(|p| p.full),
            discarded_regions: plan
                .filter(|_| part == Some(link::ResyncPart::Target))
                .map_or(0, |p| p.discarded),
            resync_read_errors: stats.resync_read_errors,
            resync_failed_regions: stats.resync_failed_regions,
            resync_bytes_sent: stats.resync_bytes_sent,
            resync_same_bytes: stats.resync_same_bytes,
            resync_checks: stats.resync_checks,
            resync_checks_differ: stats.resync_checks_differ,
            isolation: {
                drop(inner);
                link.isolation_status(stats.writes_held)
            },
        })
    }

    fn status(&self, device: Option<&str>) -> Result<Value, ControlError> {
        let auth = self.auth_failures_by_machine();
        let config = self.config();
        let devices = self.devices.lock().expect("devices lock");
        let mut out = Vec::new();
        for (name, handle) in devices.iter() {
            if device.is_some_and(|d| d != name) {
                continue;
            }
            let down = handle.peers_down();
            let map = match handle.state() {
                AdminState::Defined => None,
                _ => handle
                    .map_snapshot()
                    .ok()
                    .map(|(_, cells)| MapSummary::of(&cells)),
            };
            let exported = handle.state() == AdminState::Available && self.exports.contains(name);
            let facts = handle.side_facts();
            out.push(DeviceStatus {
                schema: STATUS_SCHEMA,
                name: name.clone(),
                state: handle.state(),
                minor: handle.config().minor,
                mode: handle.config().mode,
                role: handle.role(),
                configured_role: handle.local().role,
                role_note: handle.role_note().map(str::to_owned),
                size_bytes: handle.config().size_bytes,
                uuid: handle.uuid().map(|u| u.to_string()),
                generations: handle.generations(),
                lacks_data: facts.as_ref().map(|f| f.lacks_data()),
                not_received: facts.as_ref().map(|f| f.not_received),
                data: handle.local().data.display().to_string(),
                state_map: handle.local().state_map.display().to_string(),
                peers: handle
                    .config()
                    .remote_peers(&config, &self.machine)
                    .map(|m| PeerStatus {
                        machine: m.machine.clone(),
                        site: config.site_of(&m.machine).unwrap_or_default().to_owned(),
                        down: down.contains(&m.machine),
                        auth_failures: auth.get(&m.machine).copied().unwrap_or(0),
                    })
                    .collect(),
                map,
                exports: {
                    let mut e: Vec<String> = self.ublk_path(name).into_iter().collect();
                    if exported {
                        e.push(self.nbd_url(name));
                    }
                    e
                },
                clients: self.exports.clients(name),
                problem: handle.problem().map(str::to_owned),
                link: self.link_status(name, handle),
                compare: self.compare_report(name),
            });
        }
        if let Some(d) = device {
            if out.is_empty() {
                return Err(self.unknown(d));
            }
        }
        to_value(&out)
    }

    fn stats(&self, wanted: &[String]) -> Result<Value, ControlError> {
        to_value(&self.report(wanted)?)
    }

    /// Every figure of the devices in `wanted` (all when empty) and of the
    /// remote machines.
    fn report(&self, wanted: &[String]) -> Result<Report, ControlError> {
        let net = self
            .rt
            .block_on(self.node.stats())
            .map_err(|e| ControlError::internal(format!("GeoMessage statistics: {e}")))?;
        let devices = self.devices.lock().expect("devices lock");
        for name in wanted {
            if !devices.contains_key(name) {
                return Err(self.unknown(name));
            }
        }
        let mut out = Vec::new();
        for (name, handle) in devices.iter() {
            if !wanted.is_empty() && !wanted.contains(name) {
                continue;
            }
            out.push(self.device_report(name, handle));
        }
        Ok(Report {
            schema: REPORT_SCHEMA,
            machine: self.machine.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            devices: out,
            peers: net
                .machines
                .iter()
                .map(|m| PeerReport {
                    machine: m.name.clone(),
                    up: m.up,
                    active_network: m.active_network.clone(),
                    messages_sent: m.rpcs_sent,
                    retries: m.resends,
                    replies: m.replies_received,
                    bytes_sent: m.bytes_sent,
                    bytes_received: m.bytes_received,
                    failures: m.failures,
                })
                .collect(),
        })
    }

    fn device_report(&self, name: &str, handle: &DeviceHandle) -> DeviceReport {
        let c = handle
            .runtime()
            .map(|r| r.stats().snapshot())
            .unwrap_or_default();
        let e = &c.engine;
        let map = match handle.state() {
            AdminState::Defined => None,
            _ => handle.map_snapshot().ok().map(|(_, cells)| {
                let s = MapSummary::of(&cells);
                MapCounts {
                    regions: s.cells,
                    stale: s.stale,
                    inconsistent: s.inconsistent,
                    hot: s.hot,
                }
            }),
        };
        let link = self.link_status(name, handle);
        let refused = link
            .as_ref()
            .filter(|l| !l.connected)
            .and_then(|l| l.refused.clone());
        let frozen = link
            .as_ref()
            .and_then(|l| l.isolation.as_ref())
            .map(|i| format!("{} ({} write(s) held)", i.message, i.writes_held));
        let mode = handle.config().mode;
        let mode_in_effect = match (handle.state(), &link) {
            (AdminState::Defined, _) => "defined".to_string(),
            (AdminState::Stopped, _) => "stopped".to_string(),
            (_, Some(l)) if l.connected => {
                if mode == Mode::Async && e.hwm_fallback_active == 1 {
                    "async-hwm-fallback".to_string()
                } else {
                    mode.to_string()
                }
            }
            _ => "standalone".to_string(),
        };
        DeviceReport {
            name: name.to_owned(),
            state: handle.state(),
            mode,
            mode_in_effect,
            peer: link
                .as_ref()
                .filter(|l| l.connected)
                .and_then(|l| l.peer.clone()),
            uptime_ms: handle.uptime().map_or(0, |d| d.as_millis() as u64),
            local: LocalCounters {
                reads: c.reads,
                read_bytes: c.read_bytes,
                direct_reads: c.direct_reads,
                writes: c.writes,
                direct_writes: c.direct_writes,
                write_bytes: c.write_bytes,
                flushes: c.flushes,
                errors: c.errors,
                in_flight: c.in_flight,
                overlap_waits: e.overlap_waits,
            },
            remote: RemoteCounters {
                writes: e.peer_ops,
                write_bytes: e.peer_op_bytes,
            },
            mirrored: MirrorCounters {
                writes: e.remote_writes,
                write_bytes: e.remote_write_bytes,
                flushes: e.remote_flushes,
                failures: e.remote_failures,
                wait_us: c.remote_wait_us,
                stalls: e.peer_stalls,
            },
            latency: Latency::from_buckets(c.write_latency_buckets, c.write_latency_us),
            backlog: Backlog {
                bytes: e.backlog_bytes,
                hwm_bytes: if mode == Mode::Async {
                    handle.config().hwm_kib * 1024
                } else {
                    0
                },
                hwm_fallbacks: e.hwm_fallbacks,
                fallback_active: e.hwm_fallback_active == 1,
            },
            map,
            map_writes: MapWrites {
                commits: e.map_commits,
                pages_written: e.map_pages_written,
            },
            resync: link.filter(|l| l.resync_remaining > 0).map(|l| Resync {
                role: l.resync_role.unwrap_or_else(|| "none".into()),
                regions_total: l.resync_total,
                regions_left: l.resync_remaining,
                bytes_per_s: l.resync_bytes_per_s,
                eta_s: l.resync_eta_s,
            }),
            role: (handle.state() == AdminState::Available).then(|| handle.role().to_string()),
            size_bytes: handle.config().size_bytes,
            resync_sent_bytes: e.resync_bytes_sent,
            resync_same_bytes: e.resync_same_bytes,
            refused,
            frozen,
        }
    }

    /// This machine's configuration and state map facts.
    fn facts(&self) -> gmdctl::verify::MachineFacts {
        gmdctl::verify::facts(&self.config(), &self.machine)
    }

    /// Compares this machine's facts with every other machine's, asked over
    /// GeoMessage (blocking).
    fn verify_cluster(&self) -> Result<Value, ControlError> {
        let local = self.facts();
        let mut findings = Vec::new();
        let others: Vec<String> = self
            .config()
            .machines
            .keys()
            .filter(|m| **m != self.machine)
            .cloned()
            .collect();
        for other in others {
            match self.rt.block_on(self.ask(
                &other,
                &PeerRequest::Facts,
                Duration::from_secs(20),
            )) {
                Ok(PeerReply::Facts { facts }) => {
                    findings.push(gmdctl::verify::Finding {
                        ok: true,
                        text: format!("{other} answers over GeoMessage"),
                    });
                    findings.extend(gmdctl::verify::compare(&local, &facts));
                }
                Ok(other_reply) => findings.push(gmdctl::verify::Finding {
                    ok: false,
                    text: format!("{other} did not describe itself: {other_reply:?}"),
                }),
                Err(e) => findings.push(gmdctl::verify::Finding {
                    ok: false,
                    text: format!(
                        "{other} cannot be reached over GeoMessage ({e}); start gmdd there to check it"
                    ),
                }),
            }
        }
        to_value(&findings)
    }

    fn netstat(&self) -> Result<Value, ControlError> {
        let net = self
            .rt
            .block_on(self.node.stats())
            .map_err(|e| ControlError::internal(format!("GeoMessage statistics: {e}")))?;
        to_value(&net_report(&self.config(), &self.machine, &net))
    }

    /// Stops every running device without changing its recorded state, so the
    /// next gmdd brings it back (SIGTERM).
    fn shutdown_devices(&self) {
        let names: Vec<String> = self
            .devices
            .lock()
            .expect("devices lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let ublk = self.ublk.lock().expect("ublk lock").remove(&name);
            if let Some(frontend) = ublk {
                if frontend.in_use().is_some() {
                    frontend.detach();
                } else if let Err(e) = frontend.stop(false) {
                    warn!(device = %name, "{e}");
                }
            }
            self.exports.withdraw(&name);
            let session = self.link(&name).and_then(|l| {
                l.inner
                    .lock()
                    .expect("link lock")
                    .core
                    .connected()
                    .map(|(p, s)| (p.to_owned(), s))
            });
            let stopped = {
                let mut devices = self.devices.lock().expect("devices lock");
                let handle = devices.get_mut(&name).expect("listed");
                if handle.state() != AdminState::Available {
                    None
                } else {
                    match handle.shutdown() {
                        Ok(()) => {
                            info!(device = %name, "device stopped for shutdown; map persisted");
                            Some(true)
                        }
                        Err(e) => {
                            error!(device = %name, "{e}");
                            Some(false)
                        }
                    }
                }
            };
            self.leave(&name, session, stopped == Some(true));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Configure,
    Start,
    Stop,
    Unconfigure,
}

impl Step {
    fn from(self) -> AdminState {
        match self {
            Step::Configure => AdminState::Defined,
            Step::Start => AdminState::Stopped,
            Step::Stop => AdminState::Available,
            Step::Unconfigure => AdminState::Stopped,
        }
    }

    fn done(self) -> &'static str {
        match self {
            Step::Configure => "configured (STOPPED)",
            Step::Start => "started (AVAILABLE)",
            Step::Stop => "stopped (STOPPED)",
            Step::Unconfigure => "unconfigured (DEFINED)",
        }
    }
}

impl Daemon {
    /// SIGHUP: re-reads the configuration file. Applied without a restart:
    /// the metrics address, and the attributes of devices that are DEFINED.
    /// Anything else that changed is logged as needing a restart (machines,
    /// sites, networks, cluster name or key, devices added or removed) or a
    /// stop and unconfigure first (attributes of a configured device); the
    /// configuration in use then stays as it was for those.
    async fn reload(self: &Arc<Self>) {
        let old = self.config();
        let new = match ClusterConfig::load(&old.path) {
            Ok(c) => c,
            Err(e) => {
                error!("SIGHUP: configuration not reloaded, the one in use stays: {e}");
                return;
            }
        };
        let mut restart = Vec::new();
        if new.name != old.name || new.key_file != old.key_file || new.encrypt != old.encrypt {
            restart.push("cluster name, key or encryption".to_string());
        }
        if new.sites != old.sites {
            restart.push("sites".into());
        }
        if new.networks != old.networks {
            restart.push("networks".into());
        }
        let strip = |c: &ClusterConfig| {
            c.machines
                .values()
                .map(|m| {
                    let mut m = m.clone();
                    m.metrics = None;
                    m
                })
                .collect::<Vec<_>>()
        };
        if strip(&new) != strip(&old) {
            restart
                .push("machines (interfaces, sites, timeouts, nbd_listen, fence handlers)".into());
        }
        let here = |c: &ClusterConfig| {
            c.devices_on(&self.machine)
                .map(|d| d.name.clone())
                .collect::<Vec<_>>()
        };
        if here(&new) != here(&old) {
            restart.push("the devices of this machine (added or removed)".into());
        }
        let metrics = new.machines.get(&self.machine).and_then(|m| m.metrics);
        self.set_metrics(metrics).await;
        if !restart.is_empty() {
            warn!(
                "SIGHUP: these changes need a restart of gmdd and were not applied: {}",
                restart.join("; ")
            );
            info!(?metrics, "SIGHUP: metrics address applied");
            return;
        }
        let d = self.clone();
        let new = Arc::new(new);
        let n = new.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut applied = Vec::new();
            let mut refused = Vec::new();
            let mut devices = d.devices.lock().expect("devices lock");
            for (name, handle) in devices.iter_mut() {
                if old.devices.get(name) == n.devices.get(name) {
                    continue;
                }
                match handle.update_config(&n) {
                    Ok(()) => applied.push(name.clone()),
                    Err(e) => refused.push(format!("{name}: {}", e.message)),
                }
            }
            (applied, refused)
        })
        .await;
        let (applied, refused) = outcome.unwrap_or_default();
        if refused.is_empty() {
            *self.config.lock().expect("config lock") = new;
        } else {
            warn!(
                "SIGHUP: device attributes not applied (stop and unconfigure the device, \
                 then send SIGHUP again): {}",
                refused.join("; ")
            );
        }
        info!(
            ?metrics,
            devices = %applied.join(", "),
            "SIGHUP: configuration reloaded (metrics address; attributes of DEFINED devices)"
        );
    }
}

/// Answers other daemons on GeoMessage's control stream.
async fn serve_peers(daemon: Arc<Daemon>, mut rx: gmd_net::IncomingReceiver) {
    while let Some(incoming) = rx.recv().await {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let from = daemon
                .node
                .peer_name(incoming.peer)
                .unwrap_or("?")
                .to_owned();
            let reply = match serde_json::from_slice::<PeerRequest>(&incoming.body) {
                Ok(request) => daemon.clone().on_peer_request(from.clone(), request).await,
                Err(e) => PeerReply::refused(format!("unreadable request: {e}")),
            };
            if let Some(responder) = incoming.responder {
                let mut body = serde_json::to_vec(&reply).unwrap_or_default();
                // An answer GeoMessage cannot carry would leave the asker
                // waiting until its timeout, then saying this side cannot
                // be reached: say what failed instead.
                let max = Tuning::default().message_bytes_max;
                if body.len() > max {
                    let reason = format!(
                        "the answer from {} ({} bytes) is larger than a GeoMessage message ({max} bytes)",
                        daemon.machine,
                        body.len()
                    );
                    warn!(peer = %from, "{reason}");
                    body = serde_json::to_vec(&PeerReply::refused(reason)).unwrap_or_default();
                }
                let _ = responder.reply(Bytes::from(body)).await;
            }
        });
    }
}

impl Daemon {
    fn path_event(&self, peer: gmd_net::PeerId, network: gmd_net::NetworkId, up: bool) {
        let name = self.node.peer_name(peer).unwrap_or("?").to_owned();
        let net = self.node.network_name(network).unwrap_or("?").to_owned();
        if up {
            info!(peer = %name, network = %net, "path up");
        } else {
            warn!(peer = %name, network = %net, "path down");
        }
        self.publish(Event::now(
            "change",
            "path",
            &name,
            &[
                ("network", net),
                ("up", if up { "yes" } else { "no" }.into()),
            ],
        ));
    }
}

/// Follows GeoMessage's view of the peers.
async fn watch_peers(
    daemon: Arc<Daemon>,
    mut events: tokio::sync::broadcast::Receiver<NodeEvent>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(link::RECONNECT_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                daemon.reconnect().await;
                daemon.log_auth_failures().await;
                let summary = daemon.summary().await;
                let changed = {
                    let mut last = daemon.status_line.lock().expect("status lock");
                    let changed = *last != summary;
                    *last = summary.clone();
                    changed
                };
                if changed {
                    notify::status(&summary);
                }
            }
            event = events.recv() => match event {
                Ok(NodeEvent::PeerUp { peer, .. }) => {
                    let name = daemon.node.peer_name(peer).unwrap_or("?").to_owned();
                    info!(peer = %name, "peer reachable");
                    daemon.publish(Event::now("change", "peer", &name, &[("up", "yes".into())]));
                    daemon.reachable.lock().expect("reachable lock").insert(name.clone());
                    daemon.reconnect().await;
                }
                Ok(NodeEvent::PeerDown { peer }) => {
                    let name = daemon.node.peer_name(peer).unwrap_or("?").to_owned();
                    daemon.reachable.lock().expect("reachable lock").remove(&name);
                    warn!(peer = %name, "peer down: promote-failure timeout exceeded");
                    daemon.publish(Event::now("change", "peer", &name, &[("up", "no".into())]));
                    daemon.peer_lost(&name, "peer unreachable for its promote-failure timeout", true).await;
                }
                Ok(NodeEvent::PeerRestarted { peer, .. }) => {
                    let name = daemon.node.peer_name(peer).unwrap_or("?").to_owned();
                    daemon.publish(Event::now("change", "peer", &name, &[("up", "yes".into()), ("restarted", "yes".into())]));
                    daemon.peer_lost(&name, "peer restarted", false).await;
                }
                Ok(NodeEvent::PathUp { peer, network }) => daemon.path_event(peer, network, true),
                Ok(NodeEvent::PathDown { peer, network }) => daemon.path_event(peer, network, false),
                Ok(NodeEvent::ActivePathChanged { peer, network }) => {
                    let name = daemon.node.peer_name(peer).unwrap_or("?").to_owned();
                    let net = network.and_then(|n| daemon.node.network_name(n)).unwrap_or("-").to_owned();
                    info!(peer = %name, network = %net, "active path changed");
                    daemon.publish(Event::now("change", "path", &name, &[("network", net), ("active", "yes".into())]));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => warn!(missed = n, "GeoMessage events lagged"),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

impl Daemon {
    /// Says, at most once per [`AUTH_FAILURE_LOG_INTERVAL`] per source
    /// address, that datagrams from it fail authentication.
    async fn log_auth_failures(&self) {
        let Ok(stats) = self.node.stats().await else {
            return;
        };
        let failures = auth_failures(&self.config(), &stats);
        let mut logged = self.auth_logged.lock().expect("auth_logged lock");
        for f in failures {
            let due = logged.get(&f.from).is_none_or(|(at, count)| {
                *count < f.count && at.elapsed() >= AUTH_FAILURE_LOG_INTERVAL
            });
            if due {
                warn!(
                    from = %f.from,
                    machine = f.machine.as_deref().unwrap_or("-"),
                    "{}",
                    auth_failure_text(&f)
                );
                logged.insert(f.from.clone(), (Instant::now(), f.count));
            }
        }
    }

    /// One line for systemd's STATUS: devices by state, mirroring, peers.
    async fn summary(self: &Arc<Self>) -> String {
        let d = self.clone();
        let seen = tokio::task::spawn_blocking(move || d.seen())
            .await
            .unwrap_or_default();
        let count = |s: AdminState| seen.iter().filter(|(_, x)| x.state() == s).count();
        let mirroring = seen.iter().filter(|(_, x)| x.mirroring()).count();
        let resyncing = seen.iter().filter(|(_, x)| x.resyncing()).count();
        let mut reachable: Vec<String> = self
            .reachable
            .lock()
            .expect("reachable lock")
            .iter()
            .cloned()
            .collect();
        reachable.sort();
        let mut line = format!(
            "{} device(s): {} AVAILABLE ({mirroring} mirroring",
            seen.len(),
            count(AdminState::Available)
        );
        if resyncing > 0 {
            line.push_str(&format!(", {resyncing} resynchronising"));
        }
        line.push_str(&format!(
            "), {} STOPPED, {} DEFINED; peers up: {}",
            count(AdminState::Stopped),
            count(AdminState::Defined),
            if reachable.is_empty() {
                "none".to_string()
            } else {
                reachable.join(", ")
            }
        ));
        line
    }

    /// Datagrams that failed authentication from each machine's addresses.
    fn auth_failures_by_machine(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        if let Ok(stats) = self.rt.block_on(self.node.stats()) {
            for f in auth_failures(&self.config(), &stats) {
                if let Some(m) = f.machine {
                    *out.entry(m).or_insert(0) += f.count;
                }
            }
        }
        out
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// Bad configuration, key file, socket or listen address: nothing is left
/// half-started.
pub async fn run(options: Options) -> anyhow::Result<()> {
    // Signals first: one that arrives while gmdd starts must not kill it
    // with the default action.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    notify::status("starting: reading the configuration");
    let config = ClusterConfig::load(&options.config)?;
    let machine = resolve_machine(&config, options.machine.as_deref())?;
    let key = gmdctl::keyfile::read(&config.key_file)?;
    control::ensure_no_daemon(&options.socket)?;
    let nbd_listen = config.machines[&machine].nbd_listen.clone();
    let nbd_listener = match &nbd_listen {
        ListenAddr::Tcp(addr) => {
            gmd_nbd::Listener::Tcp(tokio::net::TcpListener::bind(addr).await.with_context(
                || format!("cannot listen for NBD on {addr} (machines.{machine}.nbd_listen)"),
            )?)
        }
        ListenAddr::Unix(path) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another process serves NBD on {} (machines.{machine}.nbd_listen)",
                    path.display()
                );
            }
            let _ = std::fs::remove_file(path);
            gmd_nbd::Listener::Unix(tokio::net::UnixListener::bind(path).with_context(|| {
                format!(
                    "cannot listen for NBD on {} (machines.{machine}.nbd_listen)",
                    path.display()
                )
            })?)
        }
    };
    let node = Arc::new(
        Node::start(net_config(&config, &machine, &key))
            .with_context(|| format!("cannot start GeoMessage (machines.{machine}.interfaces)"))?,
    );
    // Follow peer events from the start: a session that comes up while the
    // devices are being restored must still count as reachable.
    let peer_events = node.events();
    let peer_requests = node.register_stream(StreamId::CONTROL).await?;
    let control_listener = control::bind(&options.socket)?;
    let runtime_threads = tokio::runtime::Handle::current().metrics().num_workers();
    info!(%machine, config = %config.path.display(), socket = %options.socket.display(), nbd = %nbd_listen, runtime_threads, "gmdd starting");
    let daemon = Arc::new(Daemon::new(config, machine, node.clone()));
    // A peer met before the subscription above had its PeerUp sent to
    // nobody: take GeoMessage's view now (later changes come as events).
    // Otherwise that peer would never count as reachable, and past the
    // start-up grace it is no longer asked anything.
    if let Ok(stats) = node.stats().await {
        let mut reachable = daemon.reachable.lock().expect("reachable lock");
        for m in stats.machines.iter().filter(|m| m.up) {
            reachable.insert(m.name.clone());
        }
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_peers(daemon.clone(), peer_requests));
    notify::status("starting: restoring devices");
    {
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || d.restore_all()).await?;
    }
    tokio::spawn(watch_peers(daemon.clone(), peer_events, shutdown.clone()));
    {
        // The baseline of `gmdctl events`, taken before any command.
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || d.look()).await?;
    }
    tokio::spawn(ops::watch_devices(daemon.clone(), shutdown.clone()));
    let metrics = daemon.config().machines[&daemon.machine].metrics;
    daemon.set_metrics(metrics).await;
    let nbd = gmd_nbd::Server::new(
        daemon.exports.clone(),
        gmd_nbd::Limits::default(),
        shutdown.clone(),
    );
    let nbd_task = tokio::spawn(nbd.serve(nbd_listener));
    let control_task = tokio::spawn(control::serve(
        daemon.clone(),
        control_listener,
        shutdown.clone(),
    ));
    // The control socket serves and every device is back in its recorded
    // state: systemd may start what depends on gmdd.
    let summary = daemon.summary().await;
    notify::notify(&format!("READY=1\nSTATUS={summary}"));
    info!(status = %summary, "gmdd ready");
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                notify::reloading();
                daemon.reload().await;
                let summary = daemon.summary().await;
                notify::notify(&format!("READY=1\nSTATUS={summary}"));
            }
        }
    }
    notify::notify("STOPPING=1\nSTATUS=stopping: finishing I/O and persisting the state maps");
    shutdown.cancel();
    let _ = nbd_task.await;
    let _ = control_task.await;
    // Let connected clients finish what they have in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.exports.total_clients() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = daemon.clone();
    let stopping = tokio::task::spawn_blocking(move || d.shutdown_devices());
    // A device that cannot stop must not keep the daemon alive forever: its
    // state map already covers every write not known to be on both sides,
    // so exiting is as safe as a kill -9.
    if tokio::time::timeout(SHUTDOWN_LIMIT, stopping)
        .await
        .is_err()
    {
        error!(
            "devices did not stop within {SHUTDOWN_LIMIT:?}; exiting anyway \
             (their state maps mark what must be resynchronised)"
        );
        let _ = std::fs::remove_file(&options.socket);
        // The runtime would wait for the stuck thread when dropped.
        std::process::exit(1);
    }
    node.shutdown().await;
    let _ = std::fs::remove_file(&options.socket);
    if let ListenAddr::Unix(path) = &nbd_listen {
        let _ = std::fs::remove_file(path);
    }
    info!("gmdd stopped");
    Ok(())
}

/// How `device` behaves on `machine` when its peer is lost: the machine's
/// site, the device's mode, the machine's fence handler.
fn isolation_settings(
    config: &ClusterConfig,
    machine: &str,
    device: &Device,
) -> isolation::Settings {
    let here = config.machines.get(machine);
    let dominant = here
        .and_then(|m| config.sites.get(&m.site))
        .is_some_and(|s| s.dominant);
    let fence = here.and_then(|m| m.fence.clone());
    isolation::Settings {
        machine: machine.to_owned(),
        policy: gmd_core::link::isolation::Policy {
            dominant,
            mode: device.mode,
            fence_handler: fence.is_some(),
        },
        fence,
    }
}

#[cfg(test)]
mod tests {
    /// The configuration accepts exactly the datagram sizes GeoMessage can
    /// send: gmd-core cannot see gmd-net's limits, so they are checked here.
    #[test]
    fn the_configured_datagram_range_is_geomessages() {
        assert_eq!(
            gmd_core::config::DATAGRAM_SIZE_MAX,
            gmd_net::config::DATAGRAM_BYTES_MAX as i64
        );
        assert!(gmd_core::config::DATAGRAM_SIZE_MIN >= gmd_net::config::DATAGRAM_BYTES_MIN as i64);
    }
}
