//! Online role changes: `gmdctl primary`, `secondary`, `split` and
//! `rejoin`. The rules are gmd-core's ([`gmd_core::link::roles`]); here
//! they are applied to the running device, its exports and its link.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use gmd_core::buf::IoBuf;
use gmd_core::engine::{EngineError, OpKind, Request};
use gmd_core::link::PairRole;
use gmd_core::link::roles::{self, Lacks, PeerCondition, Promotion};
use gmd_core::runtime::{CompletionSink, Submission};
use gmd_core::statemap::AdminState;
use gmdctl::protocol::{ControlError, RoleChange};
use serde_json::Value;
use tracing::{info, warn};

use super::peers::PeerState;
use super::{Daemon, to_value};

/// How long a demotion waits for its flush.
const FLUSH_WAIT: Duration = Duration::from_secs(60);
/// How long `rejoin` waits for the link to come up, to report the resync.
const REJOIN_WAIT: Duration = Duration::from_secs(15);

/// Collects the result of one request submitted here.
struct Waiter(mpsc::SyncSender<Result<(), EngineError>>);

impl CompletionSink for Waiter {
    fn complete(
        &self,
        _tag: u64,
        _request: &Request,
        result: Result<(), EngineError>,
        _buf: Option<IoBuf>,
    ) {
        let _ = self.0.try_send(result);
    }
}

impl Daemon {
    /// The role `device` runs in here; refused unless it is AVAILABLE.
    fn running_role(&self, device: &str) -> Result<PairRole, ControlError> {
        let devices = self.devices.lock().expect("devices lock");
        let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
        if handle.state() != AdminState::Available {
            return Err(ControlError::refused(format!(
                "{device}: the device is {}; roles change while it is AVAILABLE \
                 (gmdctl start {device})",
                handle.state()
            )));
        }
        Ok(handle.role())
    }

    /// What is known about the peer of `device` for a role change.
    fn peer_condition(&self, device: &str) -> Result<PeerCondition, ControlError> {
        let peers = self.remote_peers(device);
        let Some(link) = self.link(device) else {
            return Ok(PeerCondition::None);
        };
        let (connected, handshaking) = {
            let inner = link.inner.lock().expect("link lock");
            (inner.connected_peer(), inner.core.handshaking())
        };
        if handshaking {
            return Err(ControlError::refused(format!(
                "{device}: the link to its peer is being set up; try again in a moment"
            )));
        }
        if let Some(machine) = connected {
            let role = match self.rt.block_on(self.peer_status(device, &machine)) {
                Some(info) if info.state == PeerState::Available => info.role,
                Some(_) => PairRole::Secondary,
                None => {
                    return Err(ControlError::refused(format!(
                        "{device}: {machine} does not answer; if it is down, record it with \
                         'gmdctl down {device} {machine}' first"
                    )));
                }
            };
            return Ok(PeerCondition::Connected { machine, role });
        }
        let down = {
            let devices = self.devices.lock().expect("devices lock");
            devices
                .get(device)
                .map(|h| h.peers_down())
                .unwrap_or_default()
        };
        match peers.into_iter().find(|p| !down.contains(p)) {
            Some(machine) => Ok(PeerCondition::Unknown { machine }),
            None => Ok(match down.into_iter().next() {
                Some(machine) => PeerCondition::KnownDown { machine },
                None => PeerCondition::None,
            }),
        }
    }

    /// Who holds `device` open so that it could write (NBD clients, or the
    /// ublk device open or mounted), if anyone.
    fn writers(&self, device: &str) -> Option<String> {
        let clients = self.exports.clients(device);
        if clients > 0 {
            return Some(format!("{clients} NBD client(s) are connected"));
        }
        let ublk = self.ublk.lock().expect("ublk lock");
        let frontend = ublk.get(device)?;
        frontend
            .in_use()
            .map(|why| format!("{} is {why}", frontend.path().display()))
    }

    /// The exports follow the role: NBD tells new clients whether it is
    /// read-only; a ublk device is made again with the read-only attribute
    /// that fits (refused while open: the caller checked).
    fn reexport(self: &Arc<Self>, device: &str, role: PairRole) -> Result<(), ControlError> {
        self.exports.set_read_only(device, !role.writable());
        if self.ublk_exported(device) {
            self.remove_ublk(device, false)?;
        }
        let devices = self.devices.lock().expect("devices lock");
        let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
        self.export_ublk(handle)
    }

    /// Flushes `device` (everything written is durable here and, mirrored,
    /// on the peer).
    fn flush_device(&self, device: &str) -> Result<(), ControlError> {
        let submitter = {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            handle
                .runtime()
                .ok_or_else(|| ControlError::refused(format!("{device} is not running")))?
                .submitter()
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let mut submission = Submission {
            request: Request {
                kind: OpKind::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                fua: false,
            },
            buf: None,
            tag: 0,
            sink: Arc::new(Waiter(tx)),
        };
        let deadline = Instant::now() + FLUSH_WAIT;
        loop {
            match submitter.submit(submission) {
                Ok(()) => break,
                Err(back) if Instant::now() < deadline => {
                    submission = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    return Err(ControlError::internal(format!(
                        "{device}: the device takes no request"
                    )));
                }
            }
        }
        match rx.recv_timeout(FLUSH_WAIT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ControlError::internal(format!(
                "{device}: flush failed: {e}"
            ))),
            Err(_) => Err(ControlError::internal(format!(
                "{device}: the flush did not finish in {FLUSH_WAIT:?}"
            ))),
        }
    }

    /// Changes the role of the running device and of its link.
    fn apply_role(&self, device: &str, role: PairRole, forced: bool) -> Result<(), ControlError> {
        self.with_device(device, |h| h.set_role(role, forced))?;
        if let Some(link) = self.link(device) {
            link.set_role(role);
        }
        Ok(())
    }

    fn role_change(
        &self,
        device: &str,
        previous: PairRole,
        forced: bool,
        lines: Vec<String>,
        warnings: Vec<String>,
    ) -> Result<Value, ControlError> {
        let (role, generations) = {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            (handle.role(), handle.generations())
        };
        to_value(&RoleChange {
            machine: self.machine.clone(),
            device: device.to_owned(),
            previous,
            role,
            forced,
            generations,
            lines,
            warnings,
        })
    }

    /// `gmdctl primary DEVICE [--force]`.
    pub(super) fn primary(
        self: &Arc<Self>,
        device: &str,
        force: bool,
    ) -> Result<Value, ControlError> {
        let previous = self.running_role(device)?;
        let peer = self.peer_condition(device)?;
        let lacks = {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            let facts = handle
                .side_facts()
                .ok_or_else(|| ControlError::internal(format!("{device}: no state map")))?;
            Lacks {
                no_data: facts.gens.holds_no_data(),
                not_received: facts.not_received,
            }
        };
        let promotion = roles::may_promote(device, previous, &peer, lacks, force)
            .map_err(ControlError::refused)?;
        let forced = promotion == Promotion::Forced;
        if previous == PairRole::Primary && !forced {
            return self.role_change(
                device,
                previous,
                false,
                vec![format!("{device}: already primary on {}", self.machine)],
                vec![],
            );
        }
        if let Some(who) = self.writers(device).filter(|_| self.ublk_exported(device)) {
            // The ublk device must be made again read-write.
            return Err(ControlError::refused(format!(
                "{device}: promote refused: {who}; close it (it is read-only while secondary) and promote again"
            )));
        }
        let mut fenced = None;
        if let (PeerCondition::KnownDown { machine }, Some(link)) = (&peer, self.link(device)) {
            fenced = link
                .fence_before_promotion(machine)
                .map_err(ControlError::refused)?;
        }
        self.apply_role(device, PairRole::Primary, forced)?;
        self.reexport(device, PairRole::Primary)?;
        let mut lines = vec![format!("{device}: primary on {}", self.machine)];
        lines.extend(fenced);
        let mut warnings = Vec::new();
        if forced {
            warn!(%device, "promoted with --force: this copy is the newest as it is");
            lines.push(format!(
                "{device}: this copy is now the newest data (new generation); where its peer differs, the peer receives it"
            ));
            // A connected pair decides again from the new lineage.
            if let Some(link) = self.link(device) {
                if link.disconnect().is_some() {
                    warnings.push(format!(
                        "{device}: the link is set up again to resynchronise from here"
                    ));
                }
            }
        }
        if let PeerCondition::KnownDown { machine } = &peer {
            warnings.push(format!(
                "{device}: {machine} is recorded down: writes are marked stale and sent when it returns"
            ));
        }
        info!(%device, forced, "promoted to primary");
        self.role_change(device, previous, forced, lines, warnings)
    }

    /// `gmdctl secondary DEVICE`.
    pub(super) fn secondary(self: &Arc<Self>, device: &str) -> Result<Value, ControlError> {
        let previous = self.running_role(device)?;
        if previous == PairRole::Split {
            return Err(ControlError::refused(format!(
                "{device}: split for a drill; 'gmdctl rejoin {device}' ends it (the drill's writes are discarded)"
            )));
        }
        if previous == PairRole::Secondary {
            return self.role_change(
                device,
                previous,
                false,
                vec![format!("{device}: already secondary on {}", self.machine)],
                vec![],
            );
        }
        if let Some(who) = self.writers(device) {
            return Err(ControlError::refused(format!(
                "{device}: demote refused: {who}; unmount it and disconnect its clients first"
            )));
        }
        self.apply_role(device, PairRole::Secondary, false)?;
        self.flush_device(device)?;
        self.reexport(device, PairRole::Secondary)?;
        info!(%device, "demoted to secondary (flushed)");
        self.role_change(
            device,
            previous,
            false,
            vec![format!(
                "{device}: secondary on {} (flushed; writes are refused here now)",
                self.machine
            )],
            vec![],
        )
    }

    /// `gmdctl split DEVICE`: a drill on the secondary.
    pub(super) fn split(self: &Arc<Self>, device: &str) -> Result<Value, ControlError> {
        let previous = self.running_role(device)?;
        if previous != PairRole::Secondary {
            return Err(ControlError::refused(format!(
                "{device}: split is for a secondary copy (this one is {previous}); run it on the secondary"
            )));
        }
        let not_received = {
            let devices = self.devices.lock().expect("devices lock");
            let handle = devices.get(device).ok_or_else(|| self.unknown(device))?;
            handle.side_facts().map_or(0, |f| f.not_received)
        };
        if not_received > 0 {
            return Err(ControlError::refused(format!(
                "{device}: this copy lacks {not_received} region(s) it has not received; \
                 let the resync finish before a drill"
            )));
        }
        if let Some(who) = self.writers(device).filter(|_| self.ublk_exported(device)) {
            return Err(ControlError::refused(format!(
                "{device}: split refused: {who}; close it (it is read-only while secondary) and split again"
            )));
        }
        // Apart first: the primary goes on alone (its writes are marked to
        // be sent at rejoin).
        let peer = self.link(device).and_then(|l| {
            l.inner
                .lock()
                .expect("link lock")
                .core
                .set_role(PairRole::Split);
            l.disconnect()
        });
        if let Some((peer, session)) = &peer {
            let request = super::peers::PeerRequest::Leave {
                device: device.into(),
                session: *session,
                flushed: false,
            };
            if let Err(e) = self
                .rt
                .block_on(self.ask(peer, &request, Duration::from_secs(5)))
            {
                warn!(%device, %peer, "could not tell the primary: {e}");
            }
        }
        self.apply_role(device, PairRole::Split, false)?;
        self.reexport(device, PairRole::Split)?;
        info!(%device, "split for a drill: writable here, apart from the primary");
        self.role_change(
            device,
            previous,
            false,
            vec![
                format!("{device}: split on {}: writable here for the drill", self.machine),
                format!(
                    "{device}: 'gmdctl rejoin {device}' discards the drill's writes and resynchronises from the primary"
                ),
            ],
            vec![],
        )
    }

    /// `gmdctl rejoin DEVICE`: ends a drill.
    pub(super) fn rejoin(self: &Arc<Self>, device: &str) -> Result<Value, ControlError> {
        let previous = self.running_role(device)?;
        if previous != PairRole::Split {
            return Err(ControlError::refused(format!(
                "{device}: not split (it is {previous}); rejoin ends a drill started with 'gmdctl split'"
            )));
        }
        if let Some(who) = self.writers(device) {
            return Err(ControlError::refused(format!(
                "{device}: rejoin refused: {who}; unmount it and disconnect its clients first \
                 (the drill's writes are about to be discarded)"
            )));
        }
        // Still split (apart: the link does not connect) while the drill's
        // writes are made durable and then discarded; secondary after.
        self.flush_device(device)?;
        self.with_device(device, |h| h.discard_own_changes())
            .map_err(|e| ControlError {
                message: format!("{}; the copy stays apart", e.message),
                ..e
            })?;
        self.apply_role(device, PairRole::Secondary, false)?;
        self.reexport(device, PairRole::Secondary)?;
        info!(%device, "drill ended: its writes are discarded, resynchronising from the primary");
        // Set the link up again now, and report what moves.
        let daemon = self.clone();
        let name = device.to_owned();
        self.rt.spawn(async move { daemon.join(name).await });
        let deadline = Instant::now() + REJOIN_WAIT;
        let mut lines = vec![format!(
            "{device}: rejoined as secondary on {}: the drill's writes are discarded",
            self.machine
        )];
        let mut warnings = Vec::new();
        loop {
            // The regions the handshake gave this side (the engine's own
            // count follows only once the device thread took the session).
            let plan = self
                .link(device)
                .and_then(|l| l.inner.lock().expect("link lock").plan);
            if let Some((_, _, regions)) = plan {
                lines.push(format!(
                    "{device}: resynchronising {regions} region(s) ({} bytes) from the primary",
                    regions * gmd_core::units::REGION_SIZE_BYTES
                ));
                break;
            }
            if Instant::now() >= deadline {
                warnings.push(format!(
                    "{device}: not connected to the primary yet; the resync starts when it is (gmdctl status {device})"
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.role_change(device, previous, false, lines, warnings)
    }
}
