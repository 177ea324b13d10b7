//! A GeoMirror device on this machine and its lifecycle:
//! DEFINED → STOPPED → AVAILABLE, the start rules, and the state-map
//! commands (init-state, show-state, dirty, clean, down).
//!
//! Frontends are not known here: the daemon asks whether the device is in use
//! and registers exports itself. Remote peers are described to [`DeviceHandle::start`]
//! by a [`PeerView`], so the rules can be tested without a network.

// Without `runtime` only the offline functions remain; some imports serve
// only the running device.
#![cfg_attr(not(feature = "runtime"), allow(unused_imports))]

use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use std::sync::Arc;

use crate::buf::{BufPool, IoBuf};
use crate::config::{ClusterConfig, Device, DeviceMachine, Mode, Role};
use crate::engine::{Engine, EngineParams, Epoch};
use crate::generations::Generations;
use crate::link::roles::{self, Lacks, PeerCondition};
use crate::link::{Identity, PairRole, Regions, SideFacts};
use crate::mirror::PeerLink;
#[cfg(feature = "runtime")]
use crate::runtime::{Runtime, RuntimeConfig};
use crate::statemap::cells::{CELL_CONSISTENT, CELL_STALE, StateMap};
use crate::statemap::file::{MapError, MapFile};
use crate::statemap::format::{AdminState, PEER_NAME_MAX, Superblock};
use crate::units::REGION_SIZE_BYTES;
use crate::units::format_size;
use crate::volume;

/// Request slots per device (requests in flight at once).
pub const DEVICE_SLOTS: usize = 256;
/// Resync reads in flight at most: 256 regions, 8 MiB (the ceiling of the
/// adaptive resync window when `sync_rate_kib` is not set; four congestion
/// windows of a 165 Mbit/s, 100 ms link).
pub const RESYNC_SLOTS: usize = 256;
/// Largest single read or write accepted.
pub const IO_LEN_MAX: u32 = 4 << 20;
#[cfg(feature = "runtime")]
/// How long administrative calls wait for the device thread.
const DEVICE_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Classes of device errors (they decide exit codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Not allowed now; another command resolves it.
    Refused,
    /// No such device or peer.
    NotFound,
    /// Bad input.
    Invalid,
    /// The system failed.
    Internal,
}

/// A device operation that failed, with a message saying what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeviceError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// What was wrong and what to do.
    pub message: String,
}

impl DeviceError {
    fn refused(message: impl Into<String>) -> Self {
        DeviceError {
            class: ErrorClass::Refused,
            message: message.into(),
        }
    }

    #[cfg(feature = "runtime")]
    fn not_found(message: impl Into<String>) -> Self {
        DeviceError {
            class: ErrorClass::NotFound,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        DeviceError {
            class: ErrorClass::Internal,
            message: message.into(),
        }
    }
}

/// Explains a map problem for device `device`, with the command that resolves it.
pub fn map_error(device: &str, err: &MapError) -> DeviceError {
    match err {
        MapError::Missing { path } => DeviceError::refused(format!(
            "{device}: state map {} does not exist; create it with 'gmdctl init-state {device}'",
            path.display()
        )),
        MapError::Busy { .. } => DeviceError::refused(format!(
            "{device}: {err}; is another gmdd running, or the device configured?"
        )),
        MapError::Exists { path, uuid } => DeviceError::refused(format!(
            "{device}: state map {} already holds a valid map of device {uuid}; \
             add --force to replace it (its record of regions to resynchronise is lost)",
            path.display()
        )),
        e if e.is_damage() => DeviceError::refused(format!(
            "{device}: {e}; the map cannot be trusted, so the device will not start. \
             To keep this side's data and resynchronise the whole device to its peer, \
             run 'gmdctl dirty {device}'"
        )),
        MapError::SizeMismatch { .. } => DeviceError::refused(format!(
            "{device}: {err}; fix the size in the configuration, or re-create the map with \
             'gmdctl init-state {device} --force' and then 'gmdctl dirty {device}'"
        )),
        other => DeviceError::internal(format!("{device}: {other}")),
    }
}

/// What a starting device is given by its host.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Buffers for peer data and resync reads.
    pub pool: BufPool,
    /// Where messages for the peer go (none: the device stays standalone).
    pub link: Option<Arc<dyn PeerLink>>,
    /// A connected peer silent this long while messages wait is dropped
    /// (milliseconds; 0 = wait forever).
    pub peer_stall_ms: u64,
    /// The device comes back after a daemon restart: it takes the role it
    /// ran in (where that is safe) rather than the configured one.
    pub restoring: bool,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("link", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

/// What is known about one remote peer when starting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// Machine name.
    pub machine: String,
    /// The machine answers over GeoMessage.
    pub reachable: bool,
    /// Its copy of the device is AVAILABLE.
    pub available: bool,
    /// Its copy is starting.
    pub starting: bool,
    /// Its role now (AVAILABLE copies).
    pub role: PairRole,
    /// What its copy holds (when its map is open), for the same decision
    /// the handshake makes ([`crate::link::decide`]).
    pub facts: Option<SideFacts>,
}

#[cfg(feature = "runtime")]
enum State {
    Defined,
    Stopped {
        map: MapFile,
        cells: StateMap,
        _data_lock: File,
    },
    Available {
        map: MapFile,
        runtime: Runtime,
        _data_lock: File,
        started: Instant,
        role: PairRole,
        /// See [`Superblock::ran_primary`](crate::statemap::format::Superblock::ran_primary).
        ran_primary: bool,
    },
}

#[cfg(feature = "runtime")]
/// One device on this machine.
pub struct DeviceHandle {
    config: Device,
    machine: String,
    state: State,
    /// Why the device could not be restored or configured, for status.
    problem: Option<String>,
    /// Why the device started in another role than asked, for status.
    role_note: Option<String>,
}

#[cfg(feature = "runtime")]
impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("name", &self.config.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "runtime")]
impl DeviceHandle {
    /// The device `name` as seen from `machine`.
    ///
    /// # Errors
    /// No such device, or it has no copy on this machine.
    pub fn new(config: &ClusterConfig, machine: &str, name: &str) -> Result<Self, DeviceError> {
        let device = lookup(config, machine, name)?;
        Ok(DeviceHandle {
            config: device.clone(),
            machine: machine.to_owned(),
            state: State::Defined,
            problem: None,
            role_note: None,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &Device {
        &self.config
    }

    /// This machine's part of the device.
    pub fn local(&self) -> &DeviceMachine {
        self.config.on(&self.machine).expect("checked at creation")
    }

    /// The lifecycle state.
    pub fn state(&self) -> AdminState {
        match self.state {
            State::Defined => AdminState::Defined,
            State::Stopped { .. } => AdminState::Stopped,
            State::Available { .. } => AdminState::Available,
        }
    }

    /// Why the device is not usable, if something went wrong restoring it.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// Counts of stale and inconsistent cells, when the map is open.
    pub fn map_counts(&self) -> Option<(u64, u64)> {
        let summary = match &self.state {
            State::Defined => return None,
            State::Stopped { cells, .. } => crate::statemap::dump::MapSummary::of(cells),
            State::Available { .. } => {
                let (_, cells) = self.map_snapshot().ok()?;
                crate::statemap::dump::MapSummary::of(&cells)
            }
        };
        Some((summary.stale, summary.inconsistent))
    }

    /// The running device, when AVAILABLE.
    pub fn runtime(&self) -> Option<&Runtime> {
        match &self.state {
            State::Available { runtime, .. } => Some(runtime),
            _ => None,
        }
    }

    /// Time since the device became AVAILABLE.
    pub fn uptime(&self) -> Option<Duration> {
        match &self.state {
            State::Available { started, .. } => Some(started.elapsed()),
            _ => None,
        }
    }

    /// The device identity, when the map is open.
    pub fn uuid(&self) -> Option<Uuid> {
        self.map_file().map(|m| m.superblock().uuid)
    }

    /// Remote peers recorded as down.
    pub fn peers_down(&self) -> Vec<String> {
        self.map_file()
            .map(|m| m.superblock().peers_down.clone())
            .unwrap_or_default()
    }

    fn map_file(&self) -> Option<&MapFile> {
        match &self.state {
            State::Defined => None,
            State::Stopped { map, .. } | State::Available { map, .. } => Some(map),
        }
    }

    /// Replaces the configuration (only while DEFINED).
    ///
    /// # Errors
    /// The device is not DEFINED.
    pub fn update_config(&mut self, config: &ClusterConfig) -> Result<(), DeviceError> {
        self.require(
            AdminState::Defined,
            "change its attributes",
            "gmdctl stop / unconfigure",
        )?;
        self.config = lookup(config, &self.machine, &self.config.name)?.clone();
        Ok(())
    }

    fn require(&self, needed: AdminState, action: &str, how: &str) -> Result<(), DeviceError> {
        let state = self.state();
        if state == needed {
            return Ok(());
        }
        Err(DeviceError::refused(format!(
            "{}: cannot {action} while {state}; the device must be {needed} ({how})",
            self.config.name
        )))
    }

    /// DEFINED → STOPPED: opens and checks the state map and the data volume.
    ///
    /// # Errors
    /// Wrong state, a missing or damaged map (naming `gmdctl dirty` /
    /// `init-state`), a missing or wrongly sized data volume, or a volume that
    /// cannot do direct I/O at the device's block size.
    pub fn configure(&mut self) -> Result<(), DeviceError> {
        self.require(AdminState::Defined, "configure it", "gmdctl unconfigure")?;
        let name = self.config.name.clone();
        let data_lock = check_data_volume(&self.config, self.local())?;
        let (mut map, cells) = MapFile::open(&self.local().state_map, Some(self.config.size_bytes))
            .map_err(|e| map_error(&name, &e))?;
        map.update_superblock(|sb| sb.admin_state = AdminState::Stopped)
            .map_err(|e| map_error(&name, &e))?;
        self.problem = None;
        self.state = State::Stopped {
            map,
            cells,
            _data_lock: data_lock,
        };
        Ok(())
    }

    /// STOPPED → AVAILABLE, applying the start rules against `peers`.
    ///
    /// The device starts as primary when the configuration says so (or,
    /// restoring after a daemon restart, when it ran as primary) and that is
    /// safe: no peer is primary, its copy lacks nothing, and a peer it
    /// cannot reach is recorded down. Otherwise it starts as secondary and
    /// [`DeviceHandle::role_note`] says why.
    ///
    /// # Errors
    /// Wrong state, a refusal by a start rule (each names the command that
    /// resolves it), or the device thread could not start.
    pub fn start(&mut self, peers: &[PeerView], options: &StartOptions) -> Result<(), DeviceError> {
        self.require(AdminState::Stopped, "start it", "gmdctl configure")?;
        let name = self.config.name.clone();
        let down = self.peers_down();
        let Some(facts) = self.side_facts() else {
            unreachable!("STOPPED devices have a map")
        };
        let (recorded, _) = self.recorded();
        // A format 1 map recorded no role: restored, the device takes its
        // configured one, as a start does.
        let role_recorded = self.map_file().is_none_or(|m| m.superblock().role_recorded);
        let wanted = if options.restoring && role_recorded {
            recorded
        } else if self.local().role == Role::Primary {
            PairRole::Primary
        } else {
            PairRole::Secondary
        };
        let mut peer_condition = PeerCondition::None;
        for peer in peers {
            // A down record means "do not wait for it"; a peer recorded down
            // that is in fact there is held to the rules like any other.
            if down.contains(&peer.machine) && !(peer.reachable && peer.available) {
                peer_condition = PeerCondition::KnownDown {
                    machine: peer.machine.clone(),
                };
                continue;
            }
            // Restoring after a restart, a peer that is not there yet
            // (unreachable, or restoring or starting its copy at the same
            // moment) is not waited for: the device comes back in the role
            // that is safe without it and connects when the peer is there.
            if options.restoring && (!peer.reachable || peer.starting || !peer.available) {
                peer_condition = PeerCondition::Unknown {
                    machine: peer.machine.clone(),
                };
                continue;
            }
            if !peer.reachable {
                return Err(DeviceError::refused(format!(
                    "{name}: start refused: remote peer {} cannot be reached. If {} is down, \
                     record it with 'gmdctl down {name} {}' and start again \
                     (writes are then marked stale and resynchronised when it returns)",
                    peer.machine, peer.machine, peer.machine
                )));
            }
            if peer.starting {
                return Err(DeviceError::refused(format!(
                    "{name}: start refused: remote peer {} is starting the device; \
                     start again once it is AVAILABLE",
                    peer.machine
                )));
            }
            if !peer.available {
                return Err(DeviceError::refused(format!(
                    "{name}: start refused: the device is not AVAILABLE on remote peer {}; \
                     start it there first, or record the peer as down with 'gmdctl down {name} {}'",
                    peer.machine, peer.machine
                )));
            }
            peer_condition = PeerCondition::Connected {
                machine: peer.machine.clone(),
                role: peer.role,
            };
        }
        let active = peers
            .iter()
            .filter(|p| !down.contains(&p.machine) && p.available)
            .count();
        if active > 1 {
            return Err(DeviceError::refused(format!(
                "{name}: start refused: {active} remote peers are active; only one may be. \
                 Stop the device on all but one, or record them with 'gmdctl down'"
            )));
        }
        // The role it starts in: the one asked for where that is safe.
        let lacks = Lacks {
            no_data: facts.gens.holds_no_data(),
            not_received: facts.not_received,
        };
        let (role, note) = match wanted {
            PairRole::Secondary => (PairRole::Secondary, None),
            PairRole::Split => (PairRole::Split, None),
            PairRole::Primary => {
                match roles::may_promote(&name, PairRole::Secondary, &peer_condition, lacks, false)
                {
                    Ok(_) => (PairRole::Primary, None),
                    Err(why) => (PairRole::Secondary, Some(why)),
                }
            }
        };
        if let Some(why) = &note {
            tracing::warn!(device = %name, "started as secondary, not primary: {why}");
        }
        // The same decision the handshake will make: a start that could only
        // be refused (divergence, a newer copy here while the peer is
        // primary) is refused now, with the commands that resolve it.
        for peer in peers.iter().filter(|p| p.reachable && p.available) {
            if let Some(remote) = &peer.facts {
                let mut local = facts.clone();
                local.primary = role == PairRole::Primary;
                // Marks of a copy read from disk are all to be resent.
                local.marked = local.marked.max(local.stale + local.not_received);
                if let Err(refusal) = crate::link::decide(&name, &local, remote) {
                    return Err(DeviceError::refused(format!("start refused: {refusal}")));
                }
            }
        }
        let State::Stopped {
            mut map,
            cells,
            _data_lock,
        } = std::mem::replace(&mut self.state, State::Defined)
        else {
            unreachable!("checked above")
        };
        // A copy that ran as primary when it stopped (it crashed so) and
        // starts as secondary keeps saying so until it is given a role: its
        // marks hold the last writer's writes (`SideFacts::ran_primary`).
        let ran_primary = role == PairRole::Secondary
            && (recorded == PairRole::Primary || map.superblock().ran_primary);
        // Recorded first: a device found AVAILABLE in its map is restored
        // by the next gmdd, in the role recorded with it.
        if let Err(e) = map.update_superblock(|sb| {
            sb.admin_state = AdminState::Available;
            sb.role = role;
            sb.role_recorded = true;
            sb.ran_primary = ran_primary;
        }) {
            self.state = State::Stopped {
                map,
                cells,
                _data_lock,
            };
            return Err(map_error(&name, &e));
        }
        let async_secondary = self.config.mode == Mode::Async && role == PairRole::Secondary;
        let mut params = EngineParams::new(self.config.size_bytes, self.config.mode);
        params.block_size = self.config.block_size;
        params.io_len_max = u64::from(IO_LEN_MAX);
        params.slots_max = DEVICE_SLOTS;
        params.writable = role.writable();
        params.readable = !async_secondary;
        params.hwm_bytes = self.config.hwm_kib * 1024;
        // The resync window follows the link, capped by sync_rate_kib
        // when set, else by the resync slots.
        params.resync_slots_max = RESYNC_SLOTS;
        params.resync_adaptive = true;
        params.resync_in_flight_max_bytes = self
            .config
            .sync_rate_kib
            .map_or(RESYNC_SLOTS as u64 * REGION_SIZE_BYTES, |k| k * 1024);
        params.peer_stall_ms = options.peer_stall_ms;
        let runtime = Runtime::start(RuntimeConfig {
            name: name.clone(),
            data_path: self.local().data.clone(),
            map_path: self.local().state_map.clone(),
            uuid: map.superblock().uuid,
            map: cells.clone(),
            page_slots: map.page_slots().clone(),
            superblock: map.superblock_state(),
            gen_seed: random_seed(),
            params,
            pool: options.pool.clone(),
            link: options.link.clone(),
        });
        let runtime = match runtime {
            Ok(r) => r,
            Err(e) => {
                let _ = map.update_superblock(|sb| sb.admin_state = AdminState::Stopped);
                self.state = State::Stopped {
                    map,
                    cells,
                    _data_lock,
                };
                return Err(DeviceError::internal(format!(
                    "{name}: cannot start the device thread: {e}"
                )));
            }
        };
        self.role_note = note;
        self.state = State::Available {
            map,
            runtime,
            _data_lock,
            started: Instant::now(),
            role,
            ran_primary,
        };
        Ok(())
    }

    /// The role the device runs in (AVAILABLE), or last ran in.
    pub fn role(&self) -> PairRole {
        match &self.state {
            State::Available { role, .. } => *role,
            _ => self.recorded().0,
        }
    }

    /// Why the device started as secondary when primary was asked for.
    pub fn role_note(&self) -> Option<&str> {
        self.role_note.as_deref()
    }

    /// The role and data generations recorded in the map (defaults when
    /// DEFINED).
    fn recorded(&self) -> (PairRole, Generations) {
        self.map_file()
            .map(|m| (m.superblock().role, m.superblock().generations))
            .unwrap_or_default()
    }

    /// What identifies this device to its peer.
    pub fn identity(&self) -> Option<Identity> {
        Some(Identity {
            uuid: self.uuid()?,
            size_bytes: self.config.size_bytes,
            minor: self.config.minor,
            mode: self.config.mode,
        })
    }

    /// This copy's facts for the handshake, with the regions its map asks
    /// to resend: (facts, marks, hot). A running device's hot regions are
    /// given apart (see [`crate::link::Offer`]); a map read from disk has
    /// none (after a crash a hot cell may hide a cut write). `None` when
    /// DEFINED.
    pub fn offer_parts(&self) -> Option<(SideFacts, Regions, Regions)> {
        let machine = self.machine.clone();
        match &self.state {
            State::Defined => None,
            State::Stopped { map, cells, .. } => {
                let sb = map.superblock();
                let (mut facts, marks, hot) = crate::link::offer_parts(
                    &machine,
                    sb.role == PairRole::Primary,
                    sb.generations,
                    cells,
                    crate::link::MapSource::Disk,
                );
                facts.ran_primary = sb.ran_primary;
                Some((facts, marks, hot))
            }
            State::Available {
                runtime,
                role,
                ran_primary,
                ..
            } => {
                let primary = *role == PairRole::Primary;
                let ran_primary = *ran_primary;
                Some(runtime.port().inspect(|engine: &Engine| {
                    let (mut facts, marks, hot) = crate::link::offer_parts(
                        &machine,
                        primary,
                        engine.durable_generations(),
                        engine.map(),
                        crate::link::MapSource::Running,
                    );
                    facts.ran_primary = ran_primary;
                    (facts, marks, hot)
                }))
            }
        }
    }

    /// A handle that waits, without this device's lock, until what a
    /// handshake reads of this copy is on disk as in memory (see
    /// [`Engine::facts_durable`]); call it before [`Self::offer_parts`].
    /// `None` when not running (a map read from disk is what is durable).
    pub fn facts_settler(&self) -> Option<FactsSettler> {
        match &self.state {
            State::Available { runtime, .. } => Some(FactsSettler {
                port: runtime.port(),
                name: self.config.name.clone(),
            }),
            _ => None,
        }
    }

    /// This copy's facts (see [`DeviceHandle::offer_parts`]).
    pub fn side_facts(&self) -> Option<SideFacts> {
        self.offer_parts().map(|(facts, _, _)| facts)
    }

    /// The data generations: as durable on disk (the running engine's durable ones).
    pub fn generations(&self) -> Option<Generations> {
        match &self.state {
            State::Defined => None,
            State::Stopped { map, .. } => Some(map.superblock().generations),
            State::Available { runtime, .. } => {
                Some(runtime.port().inspect(|e| e.durable_generations()))
            }
        }
    }

    /// Runs `change` on the running device's engine and superblock and
    /// waits until it is durable.
    fn change_running(
        &self,
        change: impl FnOnce(&mut Engine, &mut Superblock) -> Epoch + Send + 'static,
    ) -> Result<(), DeviceError> {
        let name = &self.config.name;
        let State::Available { runtime, .. } = &self.state else {
            return Err(DeviceError::internal(format!("{name}: not running")));
        };
        let (tx, rx) = mpsc::channel();
        runtime.port().change(change, move |r| {
            let _ = tx.send(r);
        });
        match rx.recv_timeout(DEVICE_REPLY_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DeviceError::internal(format!("{name}: {e}"))),
            Err(_) => Err(DeviceError::internal(format!(
                "{name}: the device thread did not answer"
            ))),
        }
    }

    /// Changes the role of the running device (the caller applied the
    /// rules of [`crate::link::roles`]): what applications may do here, and
    /// the role recorded in the map. With `forced`, the copy becomes the
    /// newest as it is ([`Engine::force_new_generation`]).
    ///
    /// # Errors
    /// Not AVAILABLE, or the map cannot be written.
    pub fn set_role(&mut self, new: PairRole, forced: bool) -> Result<(), DeviceError> {
        self.require(AdminState::Available, "change its role", "gmdctl start")?;
        let readable = !(self.config.mode == Mode::Async && new == PairRole::Secondary);
        self.change_running(move |engine, sb| {
            sb.role = new;
            sb.ran_primary = false;
            let epoch = engine.change_access(new, readable);
            if forced {
                epoch.max(engine.force_new_generation())
            } else {
                epoch
            }
        })?;
        if let State::Available {
            role, ran_primary, ..
        } = &mut self.state
        {
            *role = new;
            *ran_primary = false;
        }
        self.role_note = None;
        Ok(())
    }

    /// Drops this copy's own changes (rejoin after a drill, the non-master
    /// side of unify): see [`Engine::discard_own_changes`]. The device must
    /// not be connected.
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn discard_own_changes(&mut self) -> Result<(), DeviceError> {
        let name = self.config.name.clone();
        match &mut self.state {
            State::Defined => Err(DeviceError::refused(format!(
                "{name}: configure the device first (gmdctl configure {name})"
            ))),
            State::Stopped { map, cells, .. } => {
                let mut next = cells.clone();
                for region in 0..next.region_count() {
                    if next.get(region) == CELL_STALE {
                        next.set(region, crate::statemap::cells::CELL_INCONSISTENT);
                    }
                }
                map.write_all(&next).map_err(|e| map_error(&name, &e))?;
                *cells = next;
                map.update_superblock(|sb| {
                    sb.generations.discard_own_changes();
                    sb.ran_primary = false;
                })
                .map_err(|e| map_error(&name, &e))
            }
            State::Available { .. } => {
                let (tx, rx) = mpsc::channel();
                self.change_running(move |engine, sb| {
                    let epoch = engine.discard_own_changes();
                    let _ = tx.send(epoch.is_some());
                    if epoch.is_some() {
                        sb.ran_primary = false;
                    }
                    epoch.unwrap_or_else(|| engine.durable_epoch())
                })?;
                if rx.try_recv() != Ok(true) {
                    return Err(DeviceError::refused(format!(
                        "{name}: mirroring with its peer: only a copy apart can discard its changes"
                    )));
                }
                if let State::Available { ran_primary, .. } = &mut self.state {
                    *ran_primary = false;
                }
                Ok(())
            }
        }
    }

    /// AVAILABLE → STOPPED: finishes every request, persists the map.
    ///
    /// `clients` is the number of frontend users; a device in use is not stopped.
    ///
    /// # Errors
    /// Wrong state, in use, or the device thread failed.
    pub fn stop(&mut self, clients: u64) -> Result<(), DeviceError> {
        self.require(AdminState::Available, "stop it", "it is not running")?;
        let name = self.config.name.clone();
        if clients > 0 {
            return Err(DeviceError::refused(format!(
                "{name}: stop refused: the device is in use ({clients} client(s) connected); \
                 unmount it and disconnect its NBD clients first"
            )));
        }
        let State::Available {
            mut map,
            runtime,
            _data_lock,
            ..
        } = std::mem::replace(&mut self.state, State::Defined)
        else {
            unreachable!("checked above")
        };
        let stopped = match runtime.stop() {
            Ok(r) => r,
            Err(e) => {
                // The thread is gone; reload what is on disk, which is safe by design.
                drop(map);
                self.problem = Some(format!("device thread failed: {e}"));
                return Err(DeviceError::internal(format!(
                    "{name}: device thread failed: {e}; the device is DEFINED now, configure it again"
                )));
            }
        };
        map.set_page_slots(stopped.page_slots);
        map.set_superblock_state(stopped.superblock);
        // A clean stop: the next start takes the configured role.
        let result = map.update_superblock(|sb| {
            sb.admin_state = AdminState::Stopped;
            sb.role = PairRole::Secondary;
        });
        self.state = State::Stopped {
            map,
            cells: stopped.map,
            _data_lock,
        };
        result.map_err(|e| map_error(&name, &e))
    }

    /// Stops a running device for a daemon shutdown: finishes in-flight
    /// requests and persists the map, but keeps AVAILABLE recorded so that the
    /// next gmdd brings the device back.
    ///
    /// # Errors
    /// The device thread failed.
    pub fn shutdown(&mut self) -> Result<(), DeviceError> {
        if self.state() != AdminState::Available {
            return Ok(());
        }
        let State::Available {
            mut map,
            runtime,
            _data_lock,
            ..
        } = std::mem::replace(&mut self.state, State::Defined)
        else {
            unreachable!("checked above")
        };
        let stopped = runtime.stop().map_err(|e| {
            DeviceError::internal(format!("{}: device thread failed: {e}", self.config.name))
        })?;
        map.set_page_slots(stopped.page_slots);
        map.set_superblock_state(stopped.superblock);
        self.state = State::Stopped {
            map,
            cells: stopped.map,
            _data_lock,
        };
        Ok(())
    }

    /// STOPPED → DEFINED.
    ///
    /// # Errors
    /// Wrong state or the map cannot be written.
    pub fn unconfigure(&mut self) -> Result<(), DeviceError> {
        self.require(AdminState::Stopped, "unconfigure it", "gmdctl stop")?;
        let State::Stopped { mut map, .. } = std::mem::replace(&mut self.state, State::Defined)
        else {
            unreachable!("checked above")
        };
        map.update_superblock(|sb| sb.admin_state = AdminState::Defined)
            .map_err(|e| map_error(&self.config.name, &e))
    }

    /// Records remote peer `peer` as down so that start does not wait for it
    /// and this side may become primary alone.
    ///
    /// # Errors
    /// DEFINED, or `peer` is not a remote peer of the device.
    pub fn down(&mut self, config: &ClusterConfig, peer: &str) -> Result<(), DeviceError> {
        let name = self.config.name.clone();
        let remote: Vec<String> = self
            .config
            .remote_peers(config, &self.machine)
            .map(|m| m.machine.clone())
            .collect();
        if !remote.iter().any(|m| m == peer) {
            return Err(DeviceError::not_found(format!(
                "{name}: {peer} is not a remote peer of the device; its remote peers are: {}",
                remote.join(", ")
            )));
        }
        if self.state() == AdminState::Defined {
            return Err(DeviceError::refused(format!(
                "{name}: cannot record a peer as down while DEFINED; the device must be \
                 STOPPED or AVAILABLE (gmdctl configure {name})"
            )));
        }
        debug_assert!(peer.len() <= PEER_NAME_MAX);
        self.set_peer_down(peer, true)
    }

    /// The device identity and a copy of its state map: from disk when DEFINED,
    /// from memory when STOPPED, from the running device when AVAILABLE.
    ///
    /// # Errors
    /// The map cannot be read (DEFINED) or the device thread does not answer.
    pub fn map_snapshot(&self) -> Result<(Uuid, StateMap), DeviceError> {
        match &self.state {
            State::Defined => read_map(&self.config, self.local()),
            State::Stopped { map, cells, .. } => Ok((map.superblock().uuid, cells.clone())),
            State::Available { map, runtime, .. } => {
                let (tx, rx) = mpsc::channel();
                runtime.snapshot(move |cells| {
                    let _ = tx.send(cells);
                });
                let cells = rx.recv_timeout(DEVICE_REPLY_TIMEOUT).map_err(|_| {
                    DeviceError::internal(format!(
                        "{}: the device thread did not answer",
                        self.config.name
                    ))
                })?;
                Ok((map.superblock().uuid, cells))
            }
        }
    }

    /// Marks every cell stale (`gmdctl dirty`): the whole device will be sent
    /// to the peer. On a damaged map (DEFINED) this rebuilds the map.
    ///
    /// # Errors
    /// The map cannot be written, or the device thread failed.
    pub fn dirty(&mut self) -> Result<(), DeviceError> {
        self.mark_all(CELL_STALE)
    }

    /// Marks every cell consistent (`gmdctl clean`): the record of regions to
    /// resynchronise is lost. Returns how many cells were non-zero.
    ///
    /// `peers_down` tells whether every remote peer is down (recorded or unreachable).
    ///
    /// # Errors
    /// Without `force`, while AVAILABLE, or while a peer is up.
    pub fn clean(&mut self, force: bool, peers_down: bool) -> Result<u64, DeviceError> {
        let name = self.config.name.clone();
        if !force {
            return Err(DeviceError::refused(format!(
                "{name}: clean refused without --force: it discards the record of regions that \
                 differ from the peer, and they will never be resynchronised"
            )));
        }
        if !peers_down {
            return Err(DeviceError::refused(format!(
                "{name}: clean refused: a remote peer is up; clean only while the peer is down \
                 (gmdctl down {name} <peer>)"
            )));
        }
        if self.state() == AdminState::Available {
            return Err(DeviceError::refused(format!(
                "{name}: clean refused while AVAILABLE; stop the device first (gmdctl stop {name})"
            )));
        }
        let (_, before) = self.map_snapshot()?;
        self.mark_all(CELL_CONSISTENT)?;
        Ok(before.count_nonzero())
    }

    fn mark_all(&mut self, value: u8) -> Result<(), DeviceError> {
        let name = self.config.name.clone();
        match &mut self.state {
            State::Defined => mark_all_on_disk(&self.config, self.local(), value),
            State::Stopped { map, cells, .. } => {
                let mut next = cells.clone();
                next.fill(value);
                map.write_all(&next).map_err(|e| map_error(&name, &e))?;
                *cells = next;
                Ok(())
            }
            State::Available { .. } => self.change_running(move |engine, _| engine.mark_all(value)),
        }
    }

    /// Writes a fresh, clean state map (`gmdctl init-state`), only while DEFINED.
    ///
    /// # Errors
    /// Wrong state, a missing data volume, or a valid map in place without `force`.
    pub fn init_state(
        &self,
        uuid: Uuid,
        volume: NewVolume,
        force: bool,
    ) -> Result<Uuid, DeviceError> {
        self.require(
            AdminState::Defined,
            "initialise its state map",
            "gmdctl stop / unconfigure",
        )?;
        init_state(&self.config, self.local(), uuid, volume, force)
    }

    /// Records (or forgets) remote peer `peer` as down, in any state but
    /// DEFINED (promotion of a failure, or the peer coming back).
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn set_peer_down(&mut self, peer: &str, down: bool) -> Result<(), DeviceError> {
        let name = self.config.name.clone();
        let listed = self.peers_down().iter().any(|p| p == peer);
        if listed == down {
            return Ok(());
        }
        let owned = peer.to_owned();
        let change = move |sb: &mut Superblock| {
            if down {
                if !sb.peers_down.contains(&owned) {
                    sb.peers_down.push(owned);
                }
            } else {
                sb.peers_down.retain(|p| *p != owned);
            }
        };
        match &mut self.state {
            State::Defined => Ok(()),
            State::Stopped { map, .. } => map
                .update_superblock(change)
                .map_err(|e| map_error(&name, &e)),
            State::Available { .. } => {
                let peers_down = {
                    let mut sb = self.map_file().expect("open").superblock().clone();
                    change(&mut sb);
                    sb.peers_down
                };
                let recorded = peers_down.clone();
                self.change_running(move |engine, sb| {
                    sb.peers_down = recorded;
                    engine.touch_superblock()
                })?;
                if let State::Available { map, .. } = &mut self.state {
                    map.note_peers_down(peers_down);
                }
                Ok(())
            }
        }
    }

    /// Clears the map of a device that is not running (unify, non-master side).
    ///
    /// # Errors
    /// AVAILABLE, or the map cannot be written.
    pub fn clear_map(&mut self) -> Result<(), DeviceError> {
        if self.state() == AdminState::Available {
            return Err(DeviceError::refused(format!(
                "{}: the non-master side must be stopped for unify (gmdctl stop {})",
                self.config.name, self.config.name
            )));
        }
        self.mark_all(CELL_CONSISTENT)
    }

    /// Marks stale the regions whose bit is set (unify, master side).
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn mark_stale_bits(&mut self, bits: &[u8]) -> Result<(), DeviceError> {
        let name = self.config.name.clone();
        let size = self.config.size_bytes;
        let map_path = self.local().state_map.clone();
        match &mut self.state {
            State::Defined => {
                let (mut map, mut cells) =
                    MapFile::open(&map_path, Some(size)).map_err(|e| map_error(&name, &e))?;
                mark_bits(&mut cells, bits);
                map.write_all(&cells).map_err(|e| map_error(&name, &e))
            }
            State::Stopped { map, cells, .. } => {
                let mut next = cells.clone();
                mark_bits(&mut next, bits);
                map.write_all(&next).map_err(|e| map_error(&name, &e))?;
                *cells = next;
                Ok(())
            }
            State::Available { .. } => {
                let bits = bits.to_vec();
                self.change_running(move |engine, _| engine.mark_stale_bits(&bits))
            }
        }
    }

    /// Brings the device back to the state recorded in its map (after a
    /// daemon restart). Problems are kept for status and returned.
    ///
    /// # Errors
    /// What configure or start refused.
    pub fn restore(
        &mut self,
        peers: &[PeerView],
        options: &StartOptions,
    ) -> Result<AdminState, DeviceError> {
        let recorded = match MapFile::open(&self.local().state_map, Some(self.config.size_bytes)) {
            Ok((map, _)) => map.superblock().admin_state,
            Err(MapError::Missing { .. }) => return Ok(AdminState::Defined),
            Err(e) => {
                let err = map_error(&self.config.name, &e);
                self.problem = Some(err.message.clone());
                return Err(err);
            }
        };
        let result = (|| -> Result<AdminState, DeviceError> {
            if recorded != AdminState::Defined {
                self.configure()?;
            }
            if recorded == AdminState::Available {
                let options = StartOptions {
                    restoring: true,
                    ..options.clone()
                };
                self.start(peers, &options)?;
            }
            Ok(recorded)
        })();
        if let Err(e) = &result {
            self.problem = Some(e.message.clone());
        }
        result
    }
}

#[cfg(feature = "runtime")]
fn lookup<'a>(
    config: &'a ClusterConfig,
    machine: &str,
    name: &str,
) -> Result<&'a Device, DeviceError> {
    let device = config.devices.get(name).ok_or_else(|| {
        DeviceError::not_found(format!(
            "no device named {name} in {}; devices: {}",
            config.path.display(),
            config
                .devices
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    if device.on(machine).is_none() {
        return Err(DeviceError::not_found(format!(
            "device {name} has no copy on machine {machine}"
        )));
    }
    Ok(device)
}

/// A random seed for new generation ids.
fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        // Never expected on Linux ≥ 3.17; the time is unique enough then.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(seed)
}

#[cfg(feature = "runtime")]
fn mark_bits(cells: &mut StateMap, bits: &[u8]) {
    for region in 0..cells.region_count() {
        if bits
            .get((region / 8) as usize)
            .is_some_and(|b| b & (1 << (region % 8)) != 0)
        {
            cells.set(region, CELL_STALE);
        }
    }
}

/// Checks the data volume exists, has the configured size and can do direct
/// I/O at the device's block size; returns it opened and locked.
///
/// # Errors
/// A message saying how to create or fix the volume.
pub fn check_data_volume(device: &Device, local: &DeviceMachine) -> Result<File, DeviceError> {
    let path = &local.data;
    let name = &device.name;
    let size = device.size_bytes;
    let file = volume::open_rw(path, false).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DeviceError::refused(format!(
                "{name}: data volume {} does not exist; create it, e.g. 'truncate -s {size} {}', \
                 or point 'data' at a block device of exactly {size} bytes",
                path.display(),
                path.display()
            ))
        } else {
            DeviceError::internal(format!("{name}: data volume {}: {e}", path.display()))
        }
    })?;
    let actual = volume::size_bytes(&file).map_err(|e| {
        DeviceError::internal(format!("{name}: data volume {}: {e}", path.display()))
    })?;
    if actual != size {
        return Err(DeviceError::refused(format!(
            "{name}: data volume {} is {actual} bytes ({}) but the configured size is {size} bytes ({}); \
             make them equal",
            path.display(),
            format_size(actual),
            format_size(size)
        )));
    }
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(DeviceError::refused(format!(
            "{name}: data volume {} is in use by another process",
            path.display()
        )));
    }
    check_direct_io(path, device.block_size).map_err(|e| {
        DeviceError::refused(format!(
            "{name}: data volume {} cannot do direct I/O in {}-byte blocks ({e}); \
             set block_size = 4096 for the device, or use a volume that supports O_DIRECT",
            path.display(),
            device.block_size
        ))
    })?;
    Ok(file)
}

fn check_direct_io(path: &Path, block_size: u32) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = volume::open_rw(path, true)?;
    let mut buf = IoBuf::new(block_size as usize);
    file.read_exact_at(&mut buf, u64::from(block_size))
        .or_else(|e| {
            // A tiny volume has no second block; try the first.
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                file.read_exact_at(&mut buf, 0)
            } else {
                Err(e)
            }
        })
}

/// Reads the map of a DEFINED device from disk.
///
/// # Errors
/// As [`map_error`].
pub fn read_map(device: &Device, local: &DeviceMachine) -> Result<(Uuid, StateMap), DeviceError> {
    let (map, cells) = MapFile::open(&local.state_map, Some(device.size_bytes))
        .map_err(|e| map_error(&device.name, &e))?;
    Ok((map.superblock().uuid, cells))
}

/// The identity a device gets unless one is given: derived from what defines
/// it (cluster, name, minor, size), so that both sides, initialised
/// independently, agree — and a device redefined with another minor or size
/// is another device.
pub fn default_uuid(cluster_name: &str, device: &Device) -> Uuid {
    let name = format!(
        "gmd:{cluster_name}:{}:{}:{}",
        device.name, device.minor, device.size_bytes
    );
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
}

/// What a new state map says about the data volume it describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NewVolume {
    /// Nothing is known of its data: it receives a full copy from its peer
    /// (a new pair needs `gmdctl primary --force` on the side to keep).
    #[default]
    Unknown,
    /// The administrator says it holds only zeroes, like its peer's
    /// (initialised the same way): the pair starts without a copy.
    Zeroed,
}

/// Writes a fresh, clean map for `local`'s side of `device` with identity `uuid`.
///
/// # Errors
/// A missing or wrongly sized data volume, or a valid map in place without `force`.
pub fn init_state(
    device: &Device,
    local: &DeviceMachine,
    uuid: Uuid,
    volume: NewVolume,
    force: bool,
) -> Result<Uuid, DeviceError> {
    drop(check_data_volume(device, local)?);
    let gens = match volume {
        NewVolume::Unknown => Generations::none(),
        NewVolume::Zeroed => Generations::zeroed(&uuid),
    };
    MapFile::create_with(&local.state_map, uuid, device.size_bytes, gens, force)
        .map_err(|e| map_error(&device.name, &e))?;
    Ok(uuid)
}

/// Sets every cell of a DEFINED device's map on disk; a damaged map is
/// rebuilt with the UUID salvaged from it (it must be readable somewhere).
///
/// # Errors
/// The map cannot be written, or nothing of the device's identity survives.
pub fn mark_all_on_disk(
    device: &Device,
    local: &DeviceMachine,
    value: u8,
) -> Result<(), DeviceError> {
    let name = &device.name;
    match MapFile::open(&local.state_map, Some(device.size_bytes)) {
        Ok((mut map, mut cells)) => {
            cells.fill(value);
            map.write_all(&cells).map_err(|e| map_error(name, &e))
        }
        Err(e) if e.is_damage() && value == CELL_STALE => {
            let Some(uuid) = MapFile::salvage_uuid(&local.state_map) else {
                return Err(DeviceError::refused(format!(
                    "{name}: state map {} is damaged beyond recovery (no readable block names the device); \
                     re-create it with 'gmdctl init-state {name} --force', then run 'gmdctl dirty {name}' \
                     (the device gets a new identity and the peer must be re-initialised too)",
                    local.state_map.display()
                )));
            };
            let salvaged = MapFile::salvage_superblock(&local.state_map);
            let mut map = MapFile::create(&local.state_map, uuid, device.size_bytes, true)
                .map_err(|e| map_error(name, &e))?;
            let mut cells = StateMap::new(device.size_bytes);
            cells.fill(CELL_STALE);
            map.write_all(&cells).map_err(|e| map_error(name, &e))?;
            // Keep what the administrator recorded (peers down, data
            // generations). Without them, this copy's data is declared the
            // newest as it is (`dirty` sends all of it): a new generation.
            let (peers_down, generation, gens) = match salvaged.filter(|sb| sb.uuid == uuid) {
                Some(old) => (old.peers_down, old.generation, old.generations),
                None => {
                    let mut gens = Generations::none();
                    gens.go_alone(crate::generations::GenSource::new(random_seed()).draw());
                    (Vec::new(), 0, gens)
                }
            };
            map.update_superblock(|sb| {
                sb.peers_down = peers_down;
                sb.generation = sb.generation.max(generation);
                sb.generations = gens;
            })
            .map_err(|e| map_error(name, &e))?;
            Ok(())
        }
        Err(e) => Err(map_error(name, &e)),
    }
}

#[cfg(feature = "runtime")]
#[cfg(test)]
mod tests;

#[cfg(feature = "runtime")]
/// Waits until what a handshake reads of a running device is on disk as in
/// memory: generations and lacked regions (from
/// [`DeviceHandle::facts_settler`]; see [`Engine::facts_durable`]).
pub struct FactsSettler {
    port: crate::runtime::Port,
    name: String,
}

#[cfg(feature = "runtime")]
impl FactsSettler {
    /// Returns at once when nothing is pending, else starts the map write
    /// and waits for it.
    ///
    /// # Errors
    /// The map write fails, or the device thread does not answer.
    pub fn settle(&self) -> Result<(), DeviceError> {
        if self.port.inspect(|e| e.facts_durable()) {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.port.change(
            |engine, _| engine.settle_facts(),
            move |r| {
                let _ = tx.send(r);
            },
        );
        let name = &self.name;
        match rx.recv_timeout(DEVICE_REPLY_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DeviceError::internal(format!("{name}: {e}"))),
            Err(_) => Err(DeviceError::internal(format!(
                "{name}: the device thread did not answer"
            ))),
        }
    }
}
