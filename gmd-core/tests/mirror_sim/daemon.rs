//! What the daemons do with each node's link, as gmdd/src/link.rs does it,
//! driving the real sans-IO `gmd_core::link::Link`: the reconnect timer
//! that starts a handshake (`begin`, an offer built by `link::offer_parts`
//! from the running engine, `Link::offer`), the responder that ends a
//! session in force and answers (`on_offer`: `decide`, a new session), the
//! initiator that connects its engine at `on_accept` and sends `Go`, the
//! responder that connects at `on_go`; refusals retried later, requests
//! that fail when the peer is lost, `Renegotiate` and stalls.
//!
//! The handshake messages travel on the control stream: each takes its own
//! random delay, is not ordered with the device stream, and is lost with a
//! partition or a crash of either end (a request waiting for its answer
//! then fails at once). An answer reaches only the request it answers.

use gmd_core::config::Mode;
use gmd_core::link::{
    self, Accept, HandshakeError, Identity, MapSource, Offer, PairRole, Part as LinkPart, Start,
};
use rand::Rng;
use uuid::Uuid;

use crate::wire::{Control, Ctl};
use crate::{NAMES, Part, REGIONS, SIZE, World};

/// A handshake message takes at most this many steps.
const CONTROL_DELAY_MAX: usize = 6;
/// A refused or failed handshake is tried again this many steps later
/// (gmdd: 30 s).
const REFUSED_RETRY: usize = 30;

/// A request a daemon waits for an answer to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    req: u64,
    peer: usize,
    kind: TaskKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskKind {
    /// `Connect{offer}`: waits for `Accept` or a refusal.
    Offer,
    /// `Go`: waits for the responder's answer.
    Go,
}

/// What identifies the device on both nodes.
pub(crate) fn identity(mode: Mode) -> Identity {
    Identity {
        uuid: Uuid::from_u128(0x0067_6d64_5f73_696d),
        size_bytes: SIZE,
        minor: 0,
        mode,
    }
}

impl World {
    /// Node `n`'s offer, as gmdd's `local_offer` builds it from the running
    /// device: `link::offer_parts` over the engine's map and durable
    /// generations, then `Link::offer`.
    fn offer(&self, n: usize) -> Offer {
        let node = &self.nodes[n];
        let engine = node.engine.as_ref().expect("running");
        let (mut facts, marks, hot) = link::offer_parts(
            NAMES[n],
            node.link.role() == PairRole::Primary,
            engine.durable_generations(),
            engine.map(),
            MapSource::Running,
        );
        facts.ran_primary = node.ran_primary;
        node.link.offer(identity(self.mode), facts, marks, hot)
    }

    /// Whether what a handshake reads of node `n` is on disk as in memory
    /// (`Engine::facts_durable`); if not, the map write that settles it is
    /// started.
    fn facts_durable(&mut self, n: usize) -> bool {
        let engine = self.engine(n);
        if engine.facts_durable() {
            return true;
        }
        engine.settle_facts();
        self.pump(n);
        false
    }

    fn send_control(&mut self, from: usize, req: u64, msg: Ctl) {
        if !self.link_up {
            // The peer cannot be reached: the message is lost.
            return;
        }
        let at = if self.step == 0 {
            0
        } else {
            self.step + self.rng.gen_range(1..=CONTROL_DELAY_MAX)
        };
        self.control.push(Control { from, at, req, msg });
    }

    fn next_req(&mut self) -> u64 {
        self.last_req += 1;
        self.last_req
    }

    /// Delivers every handshake message whose time has come.
    pub(crate) fn deliver_control(&mut self) {
        while let Some(i) = self.control.iter().position(|c| c.at <= self.step) {
            let c = self.control.remove(i);
            let to = 1 - c.from;
            if self.nodes[to].engine.is_none() {
                continue;
            }
            match c.msg {
                Ctl::Offer(remote) if !self.facts_durable(to) => {
                    // gmdd's `local_offer` waits for that map write.
                    self.control.push(Control {
                        from: c.from,
                        at: self.step + 1,
                        req: c.req,
                        msg: Ctl::Offer(remote),
                    });
                    continue;
                }
                Ctl::Offer(remote) => self.on_offer(to, c.from, c.req, *remote),
                Ctl::Accepted(answer) => self.on_accepted(to, c.from, c.req, answer),
                Ctl::Go(session) => self.on_go(to, c.from, c.req, session),
                Ctl::GoAnswer(answer) => self.on_go_answer(to, c.from, c.req, answer),
                Ctl::Renegotiate(session) => {
                    if self.nodes[to].link.session_with(NAMES[c.from]) == Some(session) {
                        self.note(format!(
                            "node {to}: node {} asks to set the link up again",
                            c.from
                        ));
                        self.disconnect(to);
                    }
                }
            }
        }
    }

    /// The daemon's reconnect timer on node `n`: a running device that is
    /// not mirroring, not setting a link up, not split and not refused
    /// lately starts a handshake with its peer if that one answers and is
    /// AVAILABLE.
    pub(crate) fn reconnect(&mut self, n: usize) {
        let peer = 1 - n;
        let node = &self.nodes[n];
        if node.engine.is_none()
            || node.link.peer().is_some()
            || node.connecting
            || node.link.role() == PairRole::Split
            || node
                .refused_at
                .is_some_and(|at| self.step < at + REFUSED_RETRY)
        {
            return;
        }
        // The peer's status: reachable, AVAILABLE (mirroring with nobody
        // else: it has no other peer).
        if !self.link_up || self.nodes[peer].engine.is_none() {
            return;
        }
        // gmdd's `local_offer` first waits until the map on disk lacks no
        // more than the memory says (`Engine::settle_facts`).
        if !self.facts_durable(n) {
            return;
        }
        if self.nodes[n].link.begin(NAMES[peer]).is_err() {
            return;
        }
        self.nodes[n].connecting = true;
        let offer = self.offer(n);
        let req = self.next_req();
        self.nodes[n].tasks.push(Task {
            req,
            peer,
            kind: TaskKind::Offer,
        });
        self.send_control(n, req, Ctl::Offer(Box::new(offer)));
    }

    /// gmdd's `on_connect`: responder `r` answers initiator `i`'s offer
    /// with its own (built first), after ending the session in force (the
    /// initiator starts over: it restarted, or lost the answer).
    fn on_offer(&mut self, r: usize, i: usize, req: u64, remote: Offer) {
        let local = self.offer(r);
        // Both offered at once and ours was answered first: theirs is
        // stale (`Link::crossing`), the session stays.
        if self.nodes[r].link.refuse_crossing(&remote) {
            self.note(format!(
                "node {r}: node {i}'s offer crossed the session in force"
            ));
            let reason = "mirroring already (an offer made at the same time)".to_string();
            self.send_control(r, req, Ctl::Accepted(Err(reason)));
            return;
        }
        if self.nodes[r].link.connected().is_some() && self.nodes[r].link.end().is_some() {
            self.note(format!(
                "node {r}: a new offer from node {i} ends the session in force"
            ));
            self.engine_lost_peer(r, false);
        }
        self.last_session += 1;
        let session = self.last_session;
        let answer = match self.nodes[r].link.on_offer(&local, &remote, session) {
            Ok(accept) => {
                self.nodes[r].offer_incarnation = remote.incarnation;
                Ok(Box::new(accept))
            }
            Err(e) => {
                self.refused(r, i, &e);
                Err(e.to_string())
            }
        };
        self.send_control(r, req, Ctl::Accepted(answer));
    }

    /// Initiator `i` gets the answer to its offer: connects its engine and
    /// sends `Go`, or gives up for now.
    fn on_accepted(&mut self, i: usize, r: usize, req: u64, answer: Result<Box<Accept>, String>) {
        if !self.take_task(i, req) {
            return;
        }
        let accept = match answer {
            Ok(accept) => accept,
            Err(reason) => return self.connect_failed(i, r, reason),
        };
        let start = match self.nodes[i].link.on_accept(NAMES[r], &accept, REGIONS) {
            Ok(start) => start,
            Err(e) => return self.connect_failed(i, r, e.to_string()),
        };
        // (6) nothing differs outside what the resync sends.
        self.check_unsent_regions_match(&accept.regions.to_bits(REGIONS));
        self.connect_engine(i, &start);
        let req = self.next_req();
        self.nodes[i].tasks.push(Task {
            req,
            peer: r,
            kind: TaskKind::Go,
        });
        self.send_control(i, req, Ctl::Go(start.session));
    }

    /// gmdd's `on_go`: responder `r` connects its engine.
    fn on_go(&mut self, r: usize, i: usize, req: u64, session: u64) {
        let incarnation = self.nodes[r].offer_incarnation;
        let answer = match self.nodes[r].link.on_go(NAMES[i], session, incarnation) {
            Ok(start) => {
                self.nodes[r].refused_at = None;
                self.connect_engine(r, &start);
                self.nodes[r].peer_down = false;
                self.counts.sessions += 1;
                self.last_refusal = None;
                self.failed_over_from = None;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        self.send_control(r, req, Ctl::GoAnswer(answer));
    }

    /// Initiator `i` gets the answer to `Go`.
    fn on_go_answer(&mut self, i: usize, r: usize, req: u64, answer: Result<(), String>) {
        if !self.take_task(i, req) {
            return;
        }
        self.nodes[i].connecting = false;
        self.nodes[i].link.abandon_offer(NAMES[r]);
        match answer {
            Ok(()) => {
                self.nodes[i].refused_at = None;
                self.nodes[i].peer_down = false;
            }
            Err(reason) => {
                self.note(format!("node {i}: Go refused by node {r}: {reason}"));
                self.disconnect(i);
                self.nodes[i].refused_at = Some(self.step);
            }
        }
    }

    /// Removes the request `req` node `n` waits for; false if none does
    /// (the answer is dropped).
    fn take_task(&mut self, n: usize, req: u64) -> bool {
        let tasks = &mut self.nodes[n].tasks;
        match tasks.iter().position(|t| t.req == req) {
            Some(i) => {
                tasks.remove(i);
                true
            }
            None => false,
        }
    }

    /// The handshake node `i` started with `r` did not lead to a session
    /// (unless the peer's own offer won meanwhile: then it mirrors).
    fn connect_failed(&mut self, i: usize, r: usize, reason: String) {
        let node = &mut self.nodes[i];
        node.connecting = false;
        node.link.abandon_offer(NAMES[r]);
        if node.link.connected().is_some_and(|(p, _)| p == NAMES[r]) {
            return;
        }
        node.refused_at = Some(self.step);
        self.note(format!("node {i}: not mirroring with node {r}: {reason}"));
    }

    /// The responder refused an offer.
    fn refused(&mut self, r: usize, i: usize, e: &HandshakeError) {
        self.nodes[r].refused_at = Some(self.step);
        if let HandshakeError::Refused(refusal) = e {
            self.note(format!("node {r} refuses node {i}'s offer: {refusal}"));
            self.counts.refusals += 1;
            if matches!(refusal, gmd_core::link::Refusal::TargetIsPrimary { .. }) {
                self.counts.refused_target_is_primary += 1;
            } else {
                self.counts.refused_other += 1;
            }
            self.last_refusal = Some((self.step, refusal.clone()));
        }
    }

    /// Connects node `n`'s engine for `start` (the runtime's
    /// `LinkEvent::Connected`: a session still in force ends first).
    fn connect_engine(&mut self, n: usize, start: &Start) {
        let engine = self.engine(n);
        if engine.is_connected() {
            engine.peer_lost();
        }
        engine.connect(start.connection(REGIONS));
        let (part, regions) = match &start.part {
            LinkPart::None => (Part::None, 0),
            LinkPart::Source(r) => (Part::Source, r.count()),
            LinkPart::Target { regions, .. } => (Part::Target, regions.count()),
        };
        let node = &mut self.nodes[n];
        node.engine_session = start.session;
        node.part = part;
        node.resync_done = part == Part::None;
        self.resync_read_failed = None;
        let engine = self.nodes[n].engine.as_ref().expect("running");
        let (memory, durable) = (engine.generations(), engine.durable_generations());
        self.note(format!(
            "node {n} connects (session {}): {part:?}, {regions} regions, {:?}, full {}, \
             source's generation {:016X}; here {memory} (durable {durable})",
            start.session, start.plan.basis, start.plan.full, start.plan.source_current
        ));
        self.pump(n);
        self.check_resync_finished();
    }

    /// The engine of node `n` lost its session (`isolate`: holding its
    /// writes, as gmdd's `LinkEvent::Isolated`).
    fn engine_lost_peer(&mut self, n: usize, isolate: bool) {
        let node = &mut self.nodes[n];
        node.engine_session = 0;
        node.part = Part::None;
        node.resync_done = false;
        if isolate {
            self.counts.isolations += 1;
            self.engine(n).peer_isolated();
        } else {
            self.engine(n).peer_lost();
        }
        self.pump(n);
    }

    /// gmdd's `disconnect`: the link's handshake or session ends; the
    /// engine loses its peer if it had a session.
    pub(crate) fn disconnect(&mut self, n: usize) -> Option<u64> {
        self.disconnect_holding(n, false)
    }

    /// As [`World::disconnect`]; `isolate`: the engine holds its writes.
    fn disconnect_holding(&mut self, n: usize, isolate: bool) -> Option<u64> {
        let had = self.nodes[n].link.end();
        // A handshake this daemon started is still under way while it
        // waits for an answer (gmdd's `try_connect` runs to its end): no
        // new offer before, whose own handshake the old answer would
        // abandon.
        self.nodes[n].connecting = !self.nodes[n].tasks.is_empty();
        if had.is_some() {
            self.engine_lost_peer(n, isolate);
        }
        had
    }

    /// GeoMessage tells node `n`'s daemon its peer is down (a partition,
    /// the peer crashed): the link ends, a lost session records the peer
    /// down, and requests waiting for the peer fail.
    pub(crate) fn peer_lost(&mut self, n: usize) {
        if self.nodes[n].engine.is_none() {
            return;
        }
        let isolate = {
            let params = self.engine(n).params();
            params.writable && params.mode != Mode::Async
        } && self.faults.isolation
            && self.rng.gen_bool(super::faults::ISOLATION_PROBABILITY);
        if self.nodes[n].link.peer() == Some(NAMES[1 - n])
            && self.disconnect_holding(n, isolate).is_some()
        {
            if isolate {
                self.note(format!("node {n}: peer lost, holds its writes"));
            } else {
                self.note(format!("node {n}: peer lost, goes on alone"));
            }
            self.nodes[n].peer_down = true;
        }
        let tasks = std::mem::take(&mut self.nodes[n].tasks);
        for task in tasks {
            if task.kind == TaskKind::Go {
                self.disconnect(n);
            }
            self.connect_failed(n, task.peer, "the peer is lost".into());
        }
    }

    /// The engine of node `n` asks to set the link up again: the session
    /// ends here, and the peer is asked to end it too.
    pub(crate) fn renegotiate(&mut self, n: usize) {
        let Some((_, session)) = self.nodes[n].link.connected() else {
            return;
        };
        self.note(format!("node {n} asks to renegotiate"));
        self.disconnect(n);
        let req = self.next_req();
        self.send_control(n, req, Ctl::Renegotiate(session));
    }

    /// The engine of node `n` found its peer silent: the session ends here
    /// and no handshake is tried for a while.
    pub(crate) fn stalled(&mut self, n: usize, waited_ms: u64) {
        self.note(format!(
            "node {n}: peer silent for {waited_ms} ms, link dropped"
        ));
        self.disconnect(n);
        self.nodes[n].refused_at = Some(self.step);
    }
}
