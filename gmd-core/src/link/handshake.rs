//! The link of one device to its peer, sans IO: roles, the handshake that
//! sets up a session, and which peer the hot regions are identical on.
//!
//! ```text
//! initiator                                   responder
//!   begin(peer)      ── Offer{facts, marks} ──►  on_offer: same device? decide() → plan,
//!                                                 session; state Accepted
//!   on_accept        ◄── Accept{session, plan,  ──
//!     → Start (connect the engine)                 regions, incarnation}
//!                    ── Go{session} ──────────►  on_go → Start (connect the engine)
//! ```
//!
//! Whatever the initiator sends on the device stream before the responder
//! connected waits on the responder's side, tagged with the session
//! ([`Link::session_with`] filters everything else).
//!
//! Hot regions (`0x5`: in the activity set, every write acknowledged) are
//! identical on the peer that acknowledged them, unless that peer's device
//! restarted since (it may have lost what its disk cache held): each side
//! sends them apart from its other marks, with who acknowledged them, and
//! the responder counts them only when that is the very same peer, same
//! incarnation.

use uuid::Uuid;

use super::decide::{Plan, Refusal, Side, SideFacts, decide};
use super::regions::Regions;
use crate::config::Mode;
use crate::engine::{Connection, ResyncRole};
use crate::generations::GenId;

/// What identifies the device a copy belongs to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// Identity made when the device was defined.
    pub uuid: Uuid,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Minor number.
    pub minor: u32,
    /// Mode.
    pub mode: Mode,
}

/// Refuses two copies that are not of the same device: identity, size,
/// minor number and mode must be equal.
///
/// # Errors
/// A message naming every difference and what to do.
pub fn same_device(
    device: &str,
    local: &Identity,
    remote: &Identity,
    local_name: &str,
    remote_name: &str,
) -> Result<(), String> {
    let mut differs = Vec::new();
    if local.uuid != remote.uuid {
        differs.push(format!("identity {} vs {}", local.uuid, remote.uuid));
    }
    if local.size_bytes != remote.size_bytes {
        differs.push(format!(
            "size {} vs {}",
            local.size_bytes, remote.size_bytes
        ));
    }
    if local.minor != remote.minor {
        differs.push(format!("minor {} vs {}", local.minor, remote.minor));
    }
    if local.mode != remote.mode {
        differs.push(format!("mode {} vs {}", local.mode, remote.mode));
    }
    if differs.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{device}: {local_name} and {remote_name} do not hold the same device ({}); \
         make the configuration identical on both machines (gmdctl verify), and re-create \
         a wrong state map with 'gmdctl init-state {device} --force' on the side to replace \
         (it then receives a full copy)",
        differs.join(", ")
    ))
}

/// Who acknowledged the writes behind a running device's hot regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotPeer {
    /// No session since the device started.
    #[default]
    Nobody,
    /// Every session was with this peer, in this incarnation of its device.
    Only {
        /// The peer machine.
        machine: String,
        /// Its device's incarnation.
        incarnation: u64,
    },
    /// Sessions with more than one peer, or incarnation.
    Several,
}

impl HotPeer {
    fn session_with(&mut self, machine: &str, incarnation: u64) {
        *self = match std::mem::take(self) {
            HotPeer::Nobody => HotPeer::Only {
                machine: machine.to_owned(),
                incarnation,
            },
            HotPeer::Only {
                machine: m,
                incarnation: i,
            } if m == machine && i == incarnation => HotPeer::Only {
                machine: m,
                incarnation: i,
            },
            _ => HotPeer::Several,
        };
    }

    /// Whether the hot regions are known identical on `machine` in `incarnation`.
    pub fn is(&self, machine: &str, incarnation: u64) -> bool {
        matches!(self, HotPeer::Only { machine: m, incarnation: i } if m == machine && *i == incarnation)
    }
}

/// The role a running device plays in its pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairRole {
    /// Applications write here; the peer receives.
    Primary,
    /// Receives the peer's writes; applications may only read (sync, mwc).
    #[default]
    Secondary,
    /// Split for a drill: writable here, apart from the primary until `rejoin`.
    Split,
}

impl PairRole {
    /// Whether applications may write on this side.
    pub fn writable(self) -> bool {
        self != PairRole::Secondary
    }
}

impl std::fmt::Display for PairRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PairRole::Primary => "primary",
            PairRole::Secondary => "secondary",
            PairRole::Split => "split",
        })
    }
}

/// A side's description of its copy, sent by the initiator and built by the
/// responder for itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    /// Which device.
    pub identity: Identity,
    /// Role, generations and mark counts.
    pub facts: SideFacts,
    /// This incarnation of the device (drawn when it started).
    pub incarnation: u64,
    /// Who acknowledged its hot regions.
    pub hot_peer: HotPeer,
    /// Regions that must be resent whatever happens (stale, not received,
    /// inconsistent, writes in flight).
    pub marks: Regions,
    /// Hot regions (resent unless the other side acknowledged them and did
    /// not restart since).
    pub hot: Regions,
    /// The last session this side had in force when it made the offer (0:
    /// none since its device started). A peer mirroring with it in another
    /// session knows the offer predates that session (see [`Link::crossing`]).
    #[serde(default)]
    pub last_session: u64,
    /// This side asks for checksum resync (`resync_checksums = true`) and
    /// understands its messages. Absent from older peers' offers: `false`.
    #[serde(default)]
    pub resync_checksums: bool,
    /// This side takes device messages that pass earlier ones (GeoMessage's
    /// passing messages; see [`crate::engine::Engine::poll_action`]).
    /// Absent from older peers' offers, which would refuse such messages:
    /// `false`.
    #[serde(default)]
    pub passing: bool,
}

impl Offer {
    /// The regions of this offer that the resync must cover when it meets
    /// `other`.
    fn effective(&self, other: &Offer) -> Regions {
        if self.hot_peer.is(&other.facts.machine, other.incarnation) {
            self.marks.clone()
        } else {
            self.marks.union(&self.hot)
        }
    }
}

/// The responder's answer: the session and what the initiator does in it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Accept {
    /// The session's id (never 0).
    pub session: u64,
    /// The plan, as the initiator sees it.
    pub plan: Plan,
    /// The regions the resync covers.
    pub regions: Regions,
    /// The responder's device incarnation.
    pub incarnation: u64,
    /// The initiator's stale cells as its offer counted them.
    pub your_stale: u64,
    /// The responder's current generation.
    pub peer_current: GenId,
    /// The responder's primary term (absent from older peers: 0).
    #[serde(default)]
    pub peer_term: u64,
    /// Both offers asked for checksum resync: the session uses it. Absent
    /// from older peers' answers: `false`, plain resync.
    #[serde(default)]
    pub resync_checksums: bool,
    /// Both offers take passing device messages: the session may send them.
    /// Absent from older peers' answers: `false`.
    #[serde(default)]
    pub passing: bool,
}

/// This side's part in the resync a session starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Nothing to resync.
    None,
    /// Send these regions.
    Source(Regions),
    /// Receive these regions; take generation `source_current` first.
    Target {
        /// The regions.
        regions: Regions,
        /// The source's generation.
        source_current: GenId,
    },
}

/// Connect the engine: a session starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The peer.
    pub peer: String,
    /// The session id.
    pub session: u64,
    /// This side's part.
    pub part: Part,
    /// The peer's current generation (the engine drops its own bitmap when
    /// they are the same).
    pub peer_current: GenId,
    /// The peer's primary term (see [`crate::generations::Generations::term`]).
    pub peer_term: u64,
    /// The plan, as this side sees it (for logs and status).
    pub plan: Plan,
    /// This side's stale cells when the handshake read its map.
    pub stale_at_handshake: u64,
    /// Both sides agreed on checksum resync for this session.
    pub resync_checksums: bool,
    /// Both sides take passing device messages.
    pub passing: bool,
}

impl Start {
    /// What the engine is told, for a device of `region_count` regions.
    pub fn connection(&self, region_count: u64) -> Connection {
        let role = match &self.part {
            Part::None => ResyncRole::None,
            Part::Source(regions) => ResyncRole::Source(regions.to_bits(region_count)),
            Part::Target { regions, .. } => ResyncRole::Target(regions.to_bits(region_count)),
        };
        let peer_current = match &self.part {
            Part::Target { source_current, .. } => *source_current,
            _ => self.peer_current,
        };
        let source_current = match &self.part {
            Part::Source(_) => self.plan.source_current,
            _ => crate::generations::GEN_NONE,
        };
        Connection {
            role,
            peer_current,
            stale_at_handshake: self.stale_at_handshake,
            source_current,
            resync_checksums: self.resync_checksums,
            peer_term: self.peer_term,
            passing: self.passing,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// Initiator: the offer is on its way.
    Offered {
        peer: String,
    },
    /// Responder: accepted, waiting for `Go`.
    Accepted {
        peer: String,
        start: Start,
    },
    /// Mirroring.
    Connected {
        peer: String,
        session: u64,
        /// The incarnation of the peer's device in this session.
        peer_incarnation: u64,
        /// This side's offer set it up (else the peer's).
        initiated: bool,
    },
}

/// Why a handshake step was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The generations or roles forbid mirroring now.
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// The copies are not of the same device, or a message is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Another handshake or session is in the way.
    #[error("{0}")]
    Busy(String),
}

/// The link of one device to its peer. See the module documentation.
#[derive(Clone, Debug)]
pub struct Link {
    device: String,
    machine: String,
    role: PairRole,
    incarnation: u64,
    hot: HotPeer,
    state: State,
    /// The last session in force since the device started (0: none).
    last_session: u64,
    /// This side's offers ask for checksum resync.
    resync_checksums: bool,
    /// The session in force for which a crossing offer was refused once.
    crossing_refused: Option<u64>,
}

impl Link {
    /// The link of `device` on `machine`, stopped.
    pub fn new(device: &str, machine: &str) -> Link {
        Link {
            device: device.to_owned(),
            machine: machine.to_owned(),
            role: PairRole::Secondary,
            incarnation: 0,
            hot: HotPeer::Nobody,
            state: State::Idle,
            last_session: 0,
            resync_checksums: false,
            crossing_refused: None,
        }
    }

    /// Whether this side's offers ask for checksum resync (the device's
    /// `resync_checksums`); a session uses it only if both sides ask.
    pub fn set_resync_checksums(&mut self, on: bool) {
        self.resync_checksums = on;
    }

    /// The device started (incarnation `incarnation`, never 0) in `role`:
    /// nothing is known about its hot regions yet.
    pub fn started(&mut self, incarnation: u64, role: PairRole) {
        self.incarnation = incarnation;
        self.role = role;
        self.hot = HotPeer::Nobody;
        self.state = State::Idle;
        self.last_session = 0;
    }

    /// This side's role.
    pub fn role(&self) -> PairRole {
        self.role
    }

    /// Changes the role (the caller checked the rules, see [`super::roles`]).
    pub fn set_role(&mut self, role: PairRole) {
        self.role = role;
    }

    /// This incarnation of the device.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Who acknowledged the hot regions.
    pub fn hot_peer(&self) -> &HotPeer {
        &self.hot
    }

    /// The peer of the session in force or being set up.
    pub fn peer(&self) -> Option<&str> {
        match &self.state {
            State::Idle => None,
            State::Offered { peer }
            | State::Accepted { peer, .. }
            | State::Connected { peer, .. } => Some(peer),
        }
    }

    /// The session in force (mirroring) with its peer.
    pub fn connected(&self) -> Option<(&str, u64)> {
        match &self.state {
            State::Connected { peer, session, .. } => Some((peer, *session)),
            _ => None,
        }
    }

    /// Whether a handshake is under way.
    pub fn handshaking(&self) -> bool {
        matches!(self.state, State::Offered { .. } | State::Accepted { .. })
    }

    /// The session messages from `peer` must carry to be taken (pending or
    /// in force); `None`: take nothing from it.
    pub fn session_with(&self, peer: &str) -> Option<u64> {
        match &self.state {
            State::Accepted { peer: p, start } if p == peer => Some(start.session),
            State::Connected {
                peer: p, session, ..
            } if p == peer => Some(*session),
            _ => None,
        }
    }

    /// Builds this side's offer from what its device says now.
    pub fn offer(
        &self,
        identity: Identity,
        facts: SideFacts,
        marks: Regions,
        hot: Regions,
    ) -> Offer {
        Offer {
            identity,
            facts,
            incarnation: self.incarnation,
            hot_peer: self.hot.clone(),
            marks,
            hot,
            last_session: self.last_session,
            resync_checksums: self.resync_checksums,
            passing: true,
        }
    }

    /// Whether `remote`'s offer crossed one of this side's own that its
    /// peer answered: it comes from the peer of the session in force, from
    /// the same incarnation of its device, and was made before that session
    /// started (it does not name it). Both sides offered at once, the peer
    /// took this side's offer, and its own arrives late: the session goes
    /// on, the offer is refused ([`Link::on_offer`]). An offer made after
    /// the peer ended the session (it names it), or by a restarted device,
    /// sets the link up again instead. So does a second such offer in one
    /// session: a peer that took part in it would not offer again after
    /// the refusal (it is connected), so it has left the session without
    /// this side knowing (mirror_sim seed 63457 offered forever).
    pub fn crossing(&self, remote: &Offer) -> bool {
        matches!(&self.state, State::Connected { peer, session, peer_incarnation, .. }
            if *peer == remote.facts.machine
                && *peer_incarnation == remote.incarnation
                && remote.last_session != *session
                && self.crossing_refused != Some(*session))
    }

    /// Whether to refuse `remote`'s offer as a crossing ([`Link::crossing`]);
    /// a refusal counts once per session.
    pub fn refuse_crossing(&mut self, remote: &Offer) -> bool {
        if !self.crossing(remote) {
            return false;
        }
        self.crossing_refused = self.connected().map(|(_, session)| session);
        true
    }

    /// Initiator: starts a handshake with `peer` (send it the offer).
    ///
    /// # Errors
    /// A handshake or session is already in force; a split device stays apart.
    pub fn begin(&mut self, peer: &str) -> Result<(), HandshakeError> {
        if self.role == PairRole::Split {
            return Err(HandshakeError::Busy(format!(
                "{}: split for a drill; 'gmdctl rejoin {}' joins the pair again",
                self.device, self.device
            )));
        }
        match &self.state {
            State::Idle => {
                self.state = State::Offered {
                    peer: peer.to_owned(),
                };
                Ok(())
            }
            _ => Err(HandshakeError::Busy(format!(
                "{}: a link with {} is already being set up or in force",
                self.device,
                self.peer().unwrap_or("?")
            ))),
        }
    }

    /// Responder: answers `remote`'s offer with this side's `local` one and
    /// a fresh `session` id (never 0). An earlier session, with this peer
    /// (it restarted, or lost the answer) or another one (which it takes
    /// over from), ends: the caller disconnects the engine first when
    /// [`Link::connected`] or a pending session says so.
    ///
    /// # Errors
    /// Not the same device, a refusal of [`decide`], or a split device.
    pub fn on_offer(
        &mut self,
        local: &Offer,
        remote: &Offer,
        session: u64,
    ) -> Result<Accept, HandshakeError> {
        assert_ne!(session, 0, "session 0 means none");
        let from = remote.facts.machine.clone();
        if self.role == PairRole::Split {
            return Err(HandshakeError::Busy(format!(
                "{}: split for a drill on {}; 'gmdctl rejoin {}' there joins the pair again",
                self.device, self.machine, self.device
            )));
        }
        if self.refuse_crossing(remote) {
            return Err(HandshakeError::Busy(format!(
                "{}: {} mirrors with {from} already (its offer crossed {}'s)",
                self.device, self.machine, self.machine
            )));
        }
        if let State::Offered { peer } = &self.state {
            if *peer == from && self.machine < from {
                // Both initiated: the machine with the smaller name goes on.
                return Err(HandshakeError::Busy(format!(
                    "{} is connecting to {from} itself",
                    self.machine
                )));
            }
        }
        same_device(
            &self.device,
            &local.identity,
            &remote.identity,
            &self.machine,
            &from,
        )
        .map_err(HandshakeError::Invalid)?;
        let region_count = crate::units::region_count(local.identity.size_bytes);
        for set in [&remote.marks, &remote.hot] {
            if !set.is_valid_for(region_count) {
                return Err(HandshakeError::Invalid(format!(
                    "{}: malformed region set from {from}",
                    self.device
                )));
            }
        }
        let mine = local.effective(remote);
        let theirs = remote.effective(local);
        let mut lf = local.facts.clone();
        let mut rf = remote.facts.clone();
        lf.marked = mine.count();
        rf.marked = theirs.count();
        let plan = decide(&self.device, &lf, &rf)?;
        let regions = if plan.full {
            Regions::all(region_count)
        } else if plan.source.is_some() {
            mine.union(&theirs)
        } else {
            Regions::new()
        };
        // Only when both ask for it: a peer that does not know checksum
        // resync (or does not want it) gets plain resync data.
        let resync_checksums = local.resync_checksums && remote.resync_checksums;
        let passing = local.passing && remote.passing;
        let start = Start {
            peer: from.clone(),
            session,
            part: part(&plan, Side::Local, &regions),
            peer_current: remote.facts.gens.current,
            peer_term: remote.facts.gens.term,
            plan,
            stale_at_handshake: local.facts.stale,
            resync_checksums,
            passing,
        };
        self.state = State::Accepted { peer: from, start };
        Ok(Accept {
            session,
            plan: plan.mirrored(),
            regions,
            incarnation: self.incarnation,
            your_stale: remote.facts.stale,
            peer_current: local.facts.gens.current,
            peer_term: local.facts.gens.term,
            resync_checksums,
            passing,
        })
    }

    /// Initiator: the responder accepted this side's offer (`accept` is
    /// the answer to it). Connect the engine with the returned start (a
    /// session in force ends first), then send `Go`.
    ///
    /// The answer is taken while the offer is pending, and also while this
    /// side waits for the `Go` of the peer's own offer or is in the session
    /// that offer set up: the peer answers an offer only once it is out of
    /// any session with this side (it ends its session in force to answer,
    /// or had left it without this side knowing: a session ended on one
    /// side only); the peer's offer was taken here because this side's was
    /// no longer pending when it arrived (both offered). Refusing the answer
    /// would leave each side waiting for the other; taking it, they meet in
    /// this session, or (both took an answer) each `Go` fails and both start
    /// over. In a session this side's own offer set up, another answer is to
    /// an older offer, delayed: it is not taken.
    ///
    /// # Errors
    /// No offer to `peer` is under way, or a malformed answer.
    pub fn on_accept(
        &mut self,
        peer: &str,
        accept: &Accept,
        region_count: u64,
    ) -> Result<Start, HandshakeError> {
        let offered = matches!(&self.state, State::Offered { peer: p } if p == peer);
        let taken = match &self.state {
            State::Offered { peer: p } | State::Accepted { peer: p, .. } => p == peer,
            // In a session this side's own offer set up, another answer is
            // to an offer made before that one (delayed): not taken.
            State::Connected {
                peer: p, initiated, ..
            } => p == peer && !initiated,
            State::Idle => false,
        };
        if !taken {
            return Err(HandshakeError::Busy(format!(
                "{}: no offer to {peer} is pending",
                self.device
            )));
        }
        if accept.session == 0 || !accept.regions.is_valid_for(region_count) {
            if offered {
                self.state = State::Idle;
            }
            return Err(HandshakeError::Invalid(format!(
                "{}: malformed answer from {peer}",
                self.device
            )));
        }
        self.hot.session_with(peer, accept.incarnation);
        self.state = State::Connected {
            peer: peer.to_owned(),
            session: accept.session,
            peer_incarnation: accept.incarnation,
            initiated: true,
        };
        self.last_session = accept.session;
        Ok(Start {
            peer: peer.to_owned(),
            session: accept.session,
            part: part(&accept.plan, Side::Local, &accept.regions),
            peer_current: accept.peer_current,
            peer_term: accept.peer_term,
            plan: accept.plan,
            stale_at_handshake: accept.your_stale,
            resync_checksums: accept.resync_checksums,
            passing: accept.passing,
        })
    }

    /// Responder: the initiator connected its side of `session`; connect
    /// the engine with the returned start. `peer_incarnation` is the one
    /// its offer carried.
    ///
    /// # Errors
    /// No such session is being set up with `peer`.
    pub fn on_go(
        &mut self,
        peer: &str,
        session: u64,
        peer_incarnation: u64,
    ) -> Result<Start, HandshakeError> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Accepted { peer: p, start } if p == peer && start.session == session => {
                self.hot.session_with(peer, peer_incarnation);
                self.state = State::Connected {
                    peer: p,
                    session,
                    peer_incarnation,
                    initiated: false,
                };
                self.last_session = session;
                Ok(start)
            }
            other => {
                self.state = other;
                Err(HandshakeError::Busy(format!(
                    "{}: no connection being set up with {peer}",
                    self.device
                )))
            }
        }
    }

    /// Initiator: the offer to `peer` got no usable answer (refused, timed
    /// out); whatever else happened meanwhile (an offer of the peer's
    /// accepted) stays.
    pub fn abandon_offer(&mut self, peer: &str) {
        if matches!(&self.state, State::Offered { peer: p } if p == peer) {
            self.state = State::Idle;
        }
    }

    /// The handshake or session ends (refused, peer lost, leaving, stalled,
    /// renegotiating). Returns the session that was connected, if any: the
    /// engine must then be told the peer is lost.
    pub fn end(&mut self) -> Option<u64> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Connected { session, .. } => Some(session),
            _ => None,
        }
    }
}

/// This side's part in `plan` over `regions`.
fn part(plan: &Plan, me: Side, regions: &Regions) -> Part {
    match plan.source {
        None => Part::None,
        Some(s) if s == me => Part::Source(regions.clone()),
        Some(_) => Part::Target {
            regions: regions.clone(),
            source_current: plan.source_current,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generations::Generations;
    use crate::link::decide::Basis;

    const REGIONS: u64 = 64;

    fn identity() -> Identity {
        Identity {
            uuid: Uuid::from_u128(7),
            size_bytes: REGIONS * crate::units::REGION_SIZE_BYTES,
            minor: 10,
            mode: Mode::Mwc,
        }
    }

    fn facts(machine: &str, primary: bool, current: GenId, bitmap: GenId) -> SideFacts {
        SideFacts {
            machine: machine.into(),
            primary,
            gens: Generations {
                term: 0,
                current,
                bitmap,
                history: [0; 3],
            },
            stale: 0,
            not_received: 0,
            marked: 0,
            ran_primary: false,
        }
    }

    fn regions(list: &[u64]) -> Regions {
        let mut bits = vec![0u8; (REGIONS / 8) as usize];
        for &r in list {
            bits[(r / 8) as usize] |= 1 << (r % 8);
        }
        Regions::from_bits(&bits)
    }

    /// Runs a whole handshake; returns both starts (initiator's, responder's).
    fn handshake(a: &mut Link, ao: Offer, b: &mut Link, bo: Offer) -> (Start, Start) {
        a.begin("beta").unwrap();
        let accept = b.on_offer(&bo, &ao, 42).unwrap();
        let sa = a.on_accept("beta", &accept, REGIONS).unwrap();
        let sb = b.on_go("alpha", accept.session, ao.incarnation).unwrap();
        (sa, sb)
    }

    /// An offer with no marks, made by `machine` (alpha as primary).
    fn plain_offer(l: &Link, machine: &str) -> Offer {
        l.offer(
            identity(),
            facts(machine, machine == "alpha", 7, 0),
            Regions::new(),
            Regions::new(),
        )
    }

    /// Checksum resync is used only when both offers ask for it; an offer
    /// or answer without the field (an older peer) counts as not asking.
    #[test]
    fn checksum_resync_needs_both_sides_and_old_peers_do_not_ask() {
        for (ask_a, ask_b) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut a = Link::new("d", "alpha");
            let mut b = Link::new("d", "beta");
            a.started(1, PairRole::Primary);
            b.started(2, PairRole::Secondary);
            a.set_resync_checksums(ask_a);
            b.set_resync_checksums(ask_b);
            let ao = plain_offer(&a, "alpha");
            let bo = plain_offer(&b, "beta");
            assert_eq!(ao.resync_checksums, ask_a);
            let (sa, sb) = handshake(&mut a, ao, &mut b, bo);
            let both = ask_a && ask_b;
            assert_eq!(sa.connection(REGIONS).resync_checksums, both);
            assert_eq!(sb.connection(REGIONS).resync_checksums, both);
        }
        let mut a = Link::new("d", "alpha");
        a.set_resync_checksums(true);
        let mut old = serde_json::to_value(plain_offer(&a, "alpha")).unwrap();
        old.as_object_mut().unwrap().remove("resync_checksums");
        let offer: Offer = serde_json::from_value(old).unwrap();
        assert!(
            !offer.resync_checksums,
            "an older peer's offer does not ask"
        );
    }

    /// Passing device messages are used only when both offers say they
    /// take them: an older peer would refuse them.
    #[test]
    fn passing_messages_need_both_sides_and_old_peers_do_not_take_them() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        let ao = plain_offer(&a, "alpha");
        let bo = plain_offer(&b, "beta");
        assert!(ao.passing && bo.passing);
        let (sa, sb) = handshake(&mut a, ao.clone(), &mut b, bo);
        assert!(sa.connection(REGIONS).passing && sb.connection(REGIONS).passing);
        let mut old = serde_json::to_value(plain_offer(&b, "beta")).unwrap();
        old.as_object_mut().unwrap().remove("passing");
        let old: Offer = serde_json::from_value(old).unwrap();
        assert!(!old.passing, "an older peer's offer does not take them");
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        let (sa, sb) = handshake(&mut a, ao, &mut b, old);
        assert!(!sa.connection(REGIONS).passing && !sb.connection(REGIONS).passing);
    }

    #[test]
    fn a_handshake_connects_both_sides_with_mirrored_parts() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        let mut af = facts("alpha", true, 8, 7);
        af.stale = 2;
        let ao = a.offer(identity(), af, regions(&[3, 4]), Regions::new());
        let bo = b.offer(
            identity(),
            facts("beta", false, 7, 0),
            regions(&[9]),
            Regions::new(),
        );
        let (sa, sb) = handshake(&mut a, ao, &mut b, bo);
        assert_eq!(sa.session, 42);
        assert_eq!(sa.plan.basis, Basis::Ahead);
        assert_eq!(sa.part, Part::Source(regions(&[3, 4, 9])));
        assert_eq!(
            sb.part,
            Part::Target {
                regions: regions(&[3, 4, 9]),
                source_current: 8
            }
        );
        // The source's engine checks its generation is still the one the
        // target takes; the target takes it.
        assert_eq!(sa.connection(REGIONS).source_current, 8);
        assert_eq!(sb.connection(REGIONS).source_current, 0);
        assert_eq!(sb.connection(REGIONS).peer_current, 8);
        assert_eq!(a.connected(), Some(("beta", 42)));
        assert_eq!(b.session_with("alpha"), Some(42));
        assert_eq!(b.session_with("gamma"), None);
        assert_eq!(b.end(), Some(42));
        assert_eq!(b.session_with("alpha"), None);
    }

    #[test]
    fn hot_regions_are_skipped_only_with_the_same_incarnation_of_the_same_peer() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        let offers = |a: &Link, b: &Link| {
            (
                a.offer(
                    identity(),
                    facts("alpha", true, 7, 0),
                    Regions::new(),
                    regions(&[5]),
                ),
                b.offer(
                    identity(),
                    facts("beta", false, 7, 0),
                    Regions::new(),
                    Regions::new(),
                ),
            )
        };
        // First session: alpha's hot region was not acknowledged by anyone yet.
        let (ao, bo) = offers(&a, &b);
        let (sa, _) = handshake(&mut a, ao, &mut b, bo);
        assert_eq!(sa.part, Part::Source(regions(&[5])));
        // The link drops and comes back to the same beta: skipped.
        a.end();
        b.end();
        let (ao, bo) = offers(&a, &b);
        let (sa, _) = handshake(&mut a, ao, &mut b, bo);
        assert_eq!(sa.part, Part::None);
        // beta's device restarted (its disk cache may be gone): resent.
        a.end();
        b.started(3, PairRole::Secondary);
        let (ao, bo) = offers(&a, &b);
        let (sa, _) = handshake(&mut a, ao, &mut b, bo);
        assert_eq!(sa.part, Part::Source(regions(&[5])));
    }

    #[test]
    fn refusals_leave_the_responder_idle() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Primary);
        a.begin("beta").unwrap();
        let ao = a.offer(
            identity(),
            facts("alpha", true, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        let bo = b.offer(
            identity(),
            facts("beta", true, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        let refused = b.on_offer(&bo, &ao, 5).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("both alpha and beta are primary")
        );
        assert_eq!(b.peer(), None);
        // Another device entirely.
        let mut other = identity();
        other.uuid = Uuid::from_u128(8);
        let bo = b.offer(
            other,
            facts("beta", false, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        let refused = b.on_offer(&bo, &ao, 5).unwrap_err();
        assert!(
            refused.to_string().contains("do not hold the same device"),
            "{refused}"
        );
        // A split device stays apart.
        b.set_role(PairRole::Split);
        let bo = b.offer(
            identity(),
            facts("beta", false, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        assert!(matches!(
            b.on_offer(&bo, &ao, 5),
            Err(HandshakeError::Busy(_))
        ));
        assert!(matches!(b.begin("alpha"), Err(HandshakeError::Busy(_))));
    }

    #[test]
    fn simultaneous_initiators_are_settled_by_name() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        a.begin("beta").unwrap();
        b.begin("alpha").unwrap();
        let ao = a.offer(
            identity(),
            facts("alpha", true, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        let bo = b.offer(
            identity(),
            facts("beta", false, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        // alpha (smaller) refuses beta's offer; beta answers alpha's.
        assert!(matches!(
            a.on_offer(&ao, &bo, 9),
            Err(HandshakeError::Busy(_))
        ));
        assert!(b.on_offer(&bo, &ao, 9).is_ok());
    }

    #[test]
    fn an_offer_that_crossed_the_answered_one_leaves_the_session_alone() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        let offer = |l: &Link, machine: &str, primary: bool| {
            l.offer(
                identity(),
                facts(machine, primary, 7, 0),
                Regions::new(),
                Regions::new(),
            )
        };
        // Both offer; beta (the larger name) answers alpha's, and alpha
        // connects before beta's own offer reaches it.
        a.begin("beta").unwrap();
        b.begin("alpha").unwrap();
        let (ao, late) = (offer(&a, "alpha", true), offer(&b, "beta", false));
        let accept = b.on_offer(&offer(&b, "beta", false), &ao, 9).unwrap();
        a.on_accept("beta", &accept, REGIONS).unwrap();
        b.on_go("alpha", 9, 1).unwrap();
        assert!(a.crossing(&late));
        assert!(matches!(
            a.on_offer(&offer(&a, "alpha", true), &late, 10),
            Err(HandshakeError::Busy(_))
        ));
        assert_eq!(a.connected(), Some(("beta", 9)), "the session goes on");
        // The same offer again: beta is not in the session (it would not
        // offer again after the refusal), so the link is set up again.
        assert!(!a.crossing(&late), "refused once per session");
        // beta ends the session and offers again: it names the session,
        // and alpha sets the link up again.
        b.end();
        let again = offer(&b, "beta", false);
        assert_eq!(again.last_session, 9);
        assert!(!a.crossing(&again));
        assert!(a.on_offer(&offer(&a, "alpha", true), &again, 10).is_ok());
        assert_eq!(a.session_with("beta"), Some(10));
        b.begin("alpha").unwrap();
        let go = a.on_go("beta", 10, again.incarnation);
        assert!(go.is_ok());
        // beta's device restarted: its offer (no session known) is taken.
        b.started(3, PairRole::Secondary);
        let restarted = offer(&b, "beta", false);
        assert_eq!(restarted.last_session, 0);
        assert!(!a.crossing(&restarted));
    }

    /// A session ended on one side only (a late failure there), and the
    /// peer took an offer this side had made before: the answer replaces
    /// the session, so that both end in the same one (sim seed 17724: one
    /// side stayed connected, the other waited for a Go).
    #[test]
    fn an_answer_from_the_peer_of_the_session_in_force_replaces_it() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        a.begin("beta").unwrap();
        b.begin("alpha").unwrap();
        let from_beta = plain_offer(&b, "beta");
        let accept = b
            .on_offer(&plain_offer(&b, "beta"), &plain_offer(&a, "alpha"), 9)
            .unwrap();
        a.on_accept("beta", &accept, REGIONS).unwrap();
        b.on_go("alpha", 9, 1).unwrap();
        // alpha left session 9 without beta knowing, then took beta's old offer.
        a.end();
        let late = a
            .on_offer(&plain_offer(&a, "alpha"), &from_beta, 10)
            .unwrap();
        let start = b.on_accept("alpha", &late, REGIONS).unwrap();
        assert_eq!(start.session, 10);
        assert_eq!(b.connected(), Some(("alpha", 10)));
        a.on_go("beta", 10, 2).unwrap();
        assert_eq!(a.connected(), Some(("beta", 10)));
    }

    /// Both offered and each took the other's offer (neither was pending
    /// when the other arrived), then each gets the answer to its own: both
    /// take it, their `Go`s fail on the other side, and both are idle again
    /// (then the next handshake meets), rather than each waiting for a `Go`
    /// for ever (sim seeds 575, 16058).
    #[test]
    fn offers_taken_on_both_sides_start_over_rather_than_wait() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        a.begin("beta").unwrap();
        b.begin("alpha").unwrap();
        let (ao, bo) = (plain_offer(&a, "alpha"), plain_offer(&b, "beta"));
        // Each offer arrives where the offer made there is no longer pending.
        a.abandon_offer("beta");
        b.abandon_offer("alpha");
        let to_alpha = b.on_offer(&plain_offer(&b, "beta"), &ao, 11).unwrap();
        let to_beta = a.on_offer(&plain_offer(&a, "alpha"), &bo, 12).unwrap();
        assert_eq!(a.on_accept("beta", &to_alpha, REGIONS).unwrap().session, 11);
        assert_eq!(b.on_accept("alpha", &to_beta, REGIONS).unwrap().session, 12);
        // Each Go finds the other in another session: refused, and the
        // daemon whose Go was refused disconnects.
        assert!(b.on_go("alpha", 11, 1).is_err());
        assert!(a.on_go("beta", 12, 2).is_err());
        a.end();
        b.end();
        assert!(!a.handshaking() && !b.handshaking());
        a.begin("beta").unwrap();
        let accept = b
            .on_offer(&plain_offer(&b, "beta"), &plain_offer(&a, "alpha"), 13)
            .unwrap();
        a.on_accept("beta", &accept, REGIONS).unwrap();
        b.on_go("alpha", 13, 1).unwrap();
        assert_eq!(a.connected(), Some(("beta", 13)));
        assert_eq!(b.connected(), Some(("alpha", 13)));
    }

    /// Two offers of this side were answered and the answers crossed: in
    /// the session the later one set up, the earlier answer is stale and
    /// refused, so that both sides stay in that session (sim seed 4440).
    #[test]
    fn a_delayed_answer_to_an_older_offer_leaves_the_session_alone() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        a.begin("beta").unwrap();
        let older = plain_offer(&a, "alpha");
        a.end();
        a.begin("beta").unwrap();
        let newer = plain_offer(&a, "alpha");
        let first = b.on_offer(&plain_offer(&b, "beta"), &older, 20).unwrap();
        let second = b.on_offer(&plain_offer(&b, "beta"), &newer, 21).unwrap();
        assert_eq!(a.on_accept("beta", &second, REGIONS).unwrap().session, 21);
        assert!(a.on_accept("beta", &first, REGIONS).is_err());
        b.on_go("alpha", 21, 1).unwrap();
        assert_eq!(a.connected(), Some(("beta", 21)));
        assert_eq!(b.connected(), Some(("alpha", 21)));
    }

    #[test]
    fn an_old_or_foreign_go_is_refused() {
        let mut a = Link::new("d", "alpha");
        let mut b = Link::new("d", "beta");
        a.started(1, PairRole::Primary);
        b.started(2, PairRole::Secondary);
        a.begin("beta").unwrap();
        let ao = a.offer(
            identity(),
            facts("alpha", true, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        let bo = b.offer(
            identity(),
            facts("beta", false, 7, 0),
            Regions::new(),
            Regions::new(),
        );
        b.on_offer(&bo, &ao, 9).unwrap();
        assert!(b.on_go("alpha", 8, 1).is_err(), "another session");
        assert!(b.on_go("gamma", 9, 1).is_err(), "another peer");
        assert!(b.on_go("alpha", 9, 1).is_ok());
    }
}
