//! `gmdd`: one daemon per machine. It hosts every GeoMirror device of the
//! machine, serves the root-only control socket and the NBD exports, brings
//! devices back to their recorded state when it starts, and on SIGTERM
//! finishes in-flight I/O and persists every map before exiting.

mod control;
mod exports;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use gmd_core::buf::BufPool;
use gmd_core::config::{ClusterConfig, Frontend, ListenAddr, set_device_attributes};
use gmd_core::device::{DeviceError, DeviceHandle, ErrorClass, PeerView, StartOptions};
use gmd_core::statemap::AdminState;
use gmd_core::statemap::dump::{self, MapSummary};
use indexmap::IndexMap;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::protocol::*;
use exports::{DeviceExport, Exports};

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

/// Finds this machine in the configuration.
///
/// # Errors
/// The name (given or the hostname) is not a machine of the cluster.
pub fn resolve_machine(config: &ClusterConfig, given: Option<&str>) -> anyhow::Result<String> {
    let name = match given {
        Some(n) => n.to_owned(),
        None => nix::unistd::gethostname()
            .context("cannot read the hostname; give --machine NAME")?
            .to_string_lossy()
            .into_owned(),
    };
    if !config.machines.contains_key(&name) {
        bail!(
            "machine {name:?} is not in {} (machines: {}); give --machine NAME",
            config.path.display(),
            config
                .machines
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(name)
}

/// The daemon's state, shared by the control server and the NBD server.
pub struct Daemon {
    machine: String,
    config: Mutex<Arc<ClusterConfig>>,
    devices: Mutex<IndexMap<String, DeviceHandle>>,
    exports: Arc<Exports>,
    pool: BufPool,
    started: Instant,
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

impl Daemon {
    fn new(config: ClusterConfig, machine: String) -> Daemon {
        let mut devices = IndexMap::new();
        for device in config.devices_on(&machine) {
            let handle = DeviceHandle::new(&config, &machine, &device.name)
                .expect("devices_on lists only devices with a copy here");
            devices.insert(device.name.clone(), handle);
        }
        Daemon {
            machine,
            config: Mutex::new(Arc::new(config)),
            devices: Mutex::new(devices),
            exports: Arc::new(Exports::default()),
            pool: BufPool::new(),
            started: Instant::now(),
        }
    }

    fn config(&self) -> Arc<ClusterConfig> {
        self.config.lock().expect("config lock").clone()
    }

    /// What this machine knows about the remote peers of a device. Until
    /// GeoMessage joins the daemon, no peer can be reached.
    fn peer_views(&self, handle: &DeviceHandle) -> Vec<PeerView> {
        let config = self.config();
        handle
            .config()
            .remote_peers(&config, &self.machine)
            .map(|m| PeerView {
                machine: m.machine.clone(),
                reachable: false,
                available: false,
                starting: false,
                role: m.role,
                dirty: false,
            })
            .collect()
    }

    fn start_options(&self) -> StartOptions {
        StartOptions {
            pool: self.pool.clone(),
            link: None,
        }
    }

    fn restore_all(&self) {
        let mut devices = self.devices.lock().expect("devices lock");
        let names: Vec<String> = devices.keys().cloned().collect();
        for name in names {
            let handle = devices.get_mut(&name).expect("listed");
            let peers = self.peer_views(handle);
            let options = self.start_options();
            match handle.restore(&peers, &options) {
                Ok(AdminState::Defined) => {}
                Ok(state) => {
                    info!(device = %name, %state, "device restored");
                    if state == AdminState::Available {
                        self.export(handle);
                    }
                }
                Err(e) => error!(device = %name, "device not restored: {e}"),
            }
        }
    }

    fn export(&self, handle: &DeviceHandle) {
        let config = handle.config();
        if !config.export.is_empty() && !config.export.contains(&Frontend::Nbd) {
            return;
        }
        let runtime = handle.runtime().expect("exported devices are AVAILABLE");
        let read_only = config.mode == gmd_core::config::Mode::Async
            && handle.local().role == gmd_core::config::Role::Secondary;
        self.exports.insert(Arc::new(DeviceExport::new(
            config,
            read_only,
            runtime.submitter(),
            self.pool.clone(),
        )));
    }

    fn nbd_url(&self, device: &str) -> String {
        let config = self.config();
        match &config.machines[&self.machine].nbd_listen {
            ListenAddr::Tcp(addr) => format!("nbd://{addr}/{device}"),
            ListenAddr::Unix(path) => format!("nbd+unix:///{device}?socket={}", path.display()),
        }
    }

    /// Executes one control command (blocking; run it off the async workers).
    fn handle(&self, command: Command) -> Result<Value, ControlError> {
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
            Command::Down { device, peer } => {
                let config = self.config();
                self.with_device(&device, |h| h.down(&config, &peer))?;
                info!(%device, %peer, "remote peer recorded as down");
                to_value(&Outcome {
                    lines: vec![format!("{device}: remote peer {peer} recorded as down")],
                    warnings: vec![],
                })
            }
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
                let cleared = self.with_device(&device, |h| h.clean(force, true))?;
                warn!(%device, cleared, "state map cleaned by the administrator");
                to_value(&Outcome {
                    lines: vec![format!("{device}: state map cleaned")],
                    warnings: vec![format!(
                        "{cleared} region(s) marked as differing from the peer were forgotten; \
                         they will not be resynchronised"
                    )],
                })
            }
            Command::InitState { device, force } => {
                let uuid = self.with_device(&device, |h| h.init_state(force))?;
                info!(%device, %uuid, "state map initialised");
                to_value(&Outcome {
                    lines: vec![format!(
                        "{device}: new state map written (device id {uuid})"
                    )],
                    warnings: vec![],
                })
            }
            Command::Stats { devices } => self.stats(&devices),
        }
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

    fn lifecycle(&self, target: Target, step: Step) -> Result<Value, ControlError> {
        let mut devices = self.devices.lock().expect("devices lock");
        let names: Vec<String> = match &target {
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
        };
        let mut outcome = Outcome {
            lines: vec![],
            warnings: vec![],
        };
        let mut failures = Vec::new();
        for name in names {
            let handle = devices.get_mut(&name).expect("listed");
            let result = match step {
                Step::Configure => handle.configure(),
                Step::Start => {
                    let peers = self.peer_views(handle);
                    let options = self.start_options();
                    let r = handle.start(&peers, &options);
                    if r.is_ok() {
                        self.export(handle);
                    }
                    r
                }
                Step::Stop => {
                    let clients = self.exports.withdraw_unless_in_use(&name);
                    handle.stop(clients)
                }
                Step::Unconfigure => handle.unconfigure(),
            };
            match result {
                Ok(()) => {
                    info!(device = %name, state = %handle.state(), "{}", step.done());
                    outcome.lines.push(format!("{name}: {}", step.done()));
                    if step == Step::Start {
                        let down = handle.peers_down();
                        if !down.is_empty() {
                            outcome.warnings.push(format!(
                                "{name}: remote peer(s) {} down: writes are marked stale until they return",
                                down.join(", ")
                            ));
                        }
                        if self.exports.contains(&name) {
                            outcome
                                .lines
                                .push(format!("{name}: exported at {}", self.nbd_url(&name)));
                        }
                    }
                }
                Err(e) => {
                    warn!(device = %name, "{e}");
                    failures.push(e);
                }
            }
        }
        if failures.is_empty() {
            return to_value(&outcome);
        }
        let kind = failures
            .iter()
            .map(|e| control_error(e.clone()).kind)
            .max_by_key(|k| k.exit_code())
            .unwrap_or(ErrorKind::Refused);
        let mut message: Vec<String> = outcome.lines;
        message.extend(failures.into_iter().map(|e| e.message));
        Err(ControlError {
            kind,
            message: message.join("\n"),
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

    fn status(&self, device: Option<&str>) -> Result<Value, ControlError> {
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
            out.push(DeviceStatus {
                name: name.clone(),
                state: handle.state(),
                minor: handle.config().minor,
                mode: handle.config().mode,
                role: handle.local().role,
                size_bytes: handle.config().size_bytes,
                uuid: handle.uuid().map(|u| u.to_string()),
                data: handle.local().data.display().to_string(),
                state_map: handle.local().state_map.display().to_string(),
                peers: handle
                    .config()
                    .remote_peers(&config, &self.machine)
                    .map(|m| PeerStatus {
                        machine: m.machine.clone(),
                        site: config.site_of(&m.machine).unwrap_or_default().to_owned(),
                        down: down.contains(&m.machine),
                    })
                    .collect(),
                map,
                exports: if exported {
                    vec![self.nbd_url(name)]
                } else {
                    vec![]
                },
                clients: self.exports.clients(name),
                problem: handle.problem().map(str::to_owned),
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
            let counters = handle
                .runtime()
                .map(|r| r.stats().snapshot())
                .unwrap_or_default();
            let map = match handle.state() {
                AdminState::Defined => None,
                _ => handle
                    .map_snapshot()
                    .ok()
                    .map(|(_, cells)| MapSummary::of(&cells)),
            };
            out.push(DeviceStats {
                name: name.clone(),
                state: handle.state(),
                mode: handle.config().mode,
                counters,
                map,
                uptime_ms: handle.uptime().map_or(0, |d| d.as_millis() as u64),
            });
        }
        to_value(&Stats {
            machine: self.machine.clone(),
            devices: out,
        })
    }

    /// Stops every running device without changing its recorded state, so the
    /// next gmdd brings it back (SIGTERM).
    fn shutdown_devices(&self) {
        let mut devices = self.devices.lock().expect("devices lock");
        for (name, handle) in devices.iter_mut() {
            self.exports.withdraw(name);
            if handle.state() == AdminState::Available {
                match handle.shutdown() {
                    Ok(()) => info!(device = %name, "device stopped for shutdown; map persisted"),
                    Err(e) => error!(device = %name, "{e}"),
                }
            }
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

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// Bad configuration, key file, socket or listen address: nothing is left
/// half-started.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&options.config)?;
    let machine = resolve_machine(&config, options.machine.as_deref())?;
    let _key = crate::keyfile::read(&config.key_file)?;
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
    let control_listener = control::bind(&options.socket)?;
    info!(%machine, config = %config.path.display(), socket = %options.socket.display(), nbd = %nbd_listen, "gmdd starting");
    let daemon = Arc::new(Daemon::new(config, machine));
    {
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || d.restore_all()).await?;
    }
    let shutdown = CancellationToken::new();
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    shutdown.cancel();
    let _ = nbd_task.await;
    let _ = control_task.await;
    // Let connected clients finish what they have in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.exports.total_clients() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = daemon.clone();
    tokio::task::spawn_blocking(move || d.shutdown_devices()).await?;
    let _ = std::fs::remove_file(&options.socket);
    if let ListenAddr::Unix(path) = &nbd_listen {
        let _ = std::fs::remove_file(path);
    }
    info!("gmdd stopped");
    Ok(())
}
