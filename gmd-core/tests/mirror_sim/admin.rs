//! The administrator and the start rules: roles as gmdd/src/roles.rs and
//! `DeviceHandle::start` apply `gmd_core::link::roles` — the role a
//! restarted node takes, role switches of a connected pair, failovers,
//! promotions of a writer that came back as secondary, and `unify` for the
//! one refusal a failover can leave behind.

use gmd_core::config::Mode;
use gmd_core::engine::Epoch;
use gmd_core::engine::{OpKind, Request};
use gmd_core::link::roles::{self, Lacks, PeerCondition};
use gmd_core::link::{self, MapSource, PairRole, Refusal};
use gmd_core::statemap::StateMap;
use gmd_core::statemap::cells::CELL_STALE;
use rand::Rng;

use crate::{BLOCKS, NAMES, REGIONS, SIZE, SlotData, World, readable, region_of};

/// Chance that an administrator's turn with a connected pair switches roles.
const SWITCH_CHANCE: f64 = 0.1;
/// Chance that an administrator's turn with the primary down fails over.
const FAILOVER_CHANCE: f64 = 0.5;
/// Steps a switch waits for the new primary's promotion to be allowed
/// before the administrator gives up (the old primary is promoted again).
const SWITCH_PATIENCE: usize = 200;

/// A role switch of a connected pair (`gmdctl secondary` on the primary,
/// then `gmdctl primary` on the other).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Switch {
    from: usize,
    to: usize,
    phase: Phase,
    since: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The old primary's application stops; waiting for its requests.
    Drain,
    /// Demoted; waiting for the demotion's flush.
    Flush,
    /// Promoting the other (retried while its rules refuse).
    Promote,
}

/// A unify under way: the master's stale marks must be durable (`epoch`)
/// before the other's map is cleared.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unify {
    master: usize,
    other: usize,
    epoch: Epoch,
}

impl Switch {
    pub(crate) fn involves(&self, n: usize) -> bool {
        self.from == n || self.to == n
    }
}

impl World {
    /// The role node `n` restarts in after a crash (`DeviceHandle::start`,
    /// restoring): the role recorded in its superblock where that is safe
    /// (`roles::may_promote` against what it sees of its peer), else
    /// secondary; refused when the handshake could only refuse it.
    fn start_role(&self, n: usize) -> Result<PairRole, Refusal> {
        let node = &self.nodes[n];
        let peer = 1 - n;
        let (mut facts, _, _) = link::offer_parts(
            NAMES[n],
            node.recorded_role == PairRole::Primary,
            node.gens_durable,
            &node.map_durable,
            MapSource::Disk,
        );
        facts.ran_primary = node.ran_primary;
        let reachable = self.link_up && self.nodes[peer].engine.is_some();
        let condition = if node.peer_down && !reachable {
            PeerCondition::KnownDown {
                machine: NAMES[peer].into(),
            }
        } else if !reachable {
            PeerCondition::Unknown {
                machine: NAMES[peer].into(),
            }
        } else {
            PeerCondition::Connected {
                machine: NAMES[peer].into(),
                role: self.nodes[peer].link.role(),
            }
        };
        let lacks = Lacks {
            no_data: facts.gens.holds_no_data(),
            not_received: facts.not_received,
        };
        let role = match node.recorded_role {
            PairRole::Primary => {
                match roles::may_promote("sim", PairRole::Secondary, &condition, lacks, false) {
                    Ok(_) => PairRole::Primary,
                    Err(_) => PairRole::Secondary,
                }
            }
            other => other,
        };
        if reachable {
            let peer_node = &self.nodes[peer];
            let engine = peer_node.engine.as_ref().expect("running");
            let (mut remote, _, _) = link::offer_parts(
                NAMES[peer],
                peer_node.link.role() == PairRole::Primary,
                engine.durable_generations(),
                engine.map(),
                MapSource::Running,
            );
            remote.ran_primary = peer_node.ran_primary;
            let mut local = facts;
            local.primary = role == PairRole::Primary;
            local.ran_primary = role == PairRole::Secondary
                && (node.recorded_role == PairRole::Primary || node.ran_primary);
            local.marked = local.marked.max(local.stale + local.not_received);
            link::decide("sim", &local, &remote)?;
        }
        Ok(role)
    }

    /// Node `n` is started again after a crash, in the role the start rules give it.
    pub(crate) fn restart(&mut self, n: usize) {
        match self.start_role(n) {
            Ok(role) => {
                if self.nodes[n].recorded_role == PairRole::Primary && role != PairRole::Primary {
                    let other = self.nodes[1 - n].role();
                    self.note(format!(
                        "node {n} ran as primary but restarts as {role} (node {} is {other:?})",
                        1 - n
                    ));
                    if other == Some(PairRole::Primary) {
                        self.counts.restarted_secondary += 1;
                    }
                }
                self.start_engine(n, role);
            }
            Err(refusal) => {
                self.note(format!("start of node {n} refused: {refusal}"));
                self.counts.starts_refused += 1;
                self.last_refusal = Some((self.step, refusal));
                self.nodes[n].down_since = Some(self.step);
                self.resolve_refusal();
            }
        }
    }

    /// Changes node `n`'s role: its engine's access, its link, its superblock.
    ///
    /// `gmdctl primary|secondary` returns once the change is durable (a
    /// promotion syncs the data volume first; a failover's new generation
    /// goes in the same commit): the administrator's command is one step
    /// here, its device's syncs and map commits run to their end. If the
    /// map cannot be written the role stays as it was (the engine has
    /// failed; the node restarts in its recorded role).
    fn set_role(&mut self, n: usize, role: PairRole) -> Result<(), String> {
        let before = self.nodes[n].link.role();
        let term_before = self.nodes[n].gens_durable.term;
        let read = readable(self.mode, role);
        let epoch = self.engine(n).change_access(role, read);
        self.pump(n);
        let mut rounds = 0;
        loop {
            let engine = self.nodes[n].engine.as_ref().expect("running");
            if engine.map_failed() {
                // A failed commit may still have landed its superblock: a
                // promotion whose raised term is on disk happened (the
                // device restarts as primary of a new generation if it
                // went apart), whatever gmdctl was told.
                if role == PairRole::Primary && self.nodes[n].gens_durable.term > term_before {
                    self.note(format!(
                        "node {n}: the map failed, but the promotion's superblock landed"
                    ));
                    break;
                }
                let read = readable(self.mode, before);
                self.engine(n).change_access(before, read);
                self.pump(n);
                return Err("the map cannot be written".into());
            }
            if engine.durable_epoch() >= epoch {
                break;
            }
            rounds += 1;
            assert!(
                rounds < 100_000,
                "node {n}: a role change never became durable"
            );
            if self.nodes[n].map_in_flight.is_some() {
                self.map_commit_done(n);
            } else if !self.nodes[n].syncs.is_empty() {
                self.sync_done(n, 0);
            } else {
                let now = self.step as u64;
                self.engine(n).tick(now);
                self.pump(n);
            }
        }
        self.nodes[n].link.set_role(role);
        self.nodes[n].recorded_role = role;
        self.nodes[n].ran_primary = false;
        Ok(())
    }

    /// What node `n`'s daemon knows of its peer for a role change (gmdd's
    /// `peer_condition`).
    fn peer_condition(&self, n: usize) -> Result<PeerCondition, String> {
        let node = &self.nodes[n];
        let peer = 1 - n;
        let machine = NAMES[peer].to_string();
        if node.link.handshaking() {
            return Err("the link is being set up".into());
        }
        if node.link.connected().is_some() {
            if !self.link_up || self.nodes[peer].engine.is_none() {
                return Err(format!("{machine} does not answer"));
            }
            return Ok(PeerCondition::Connected {
                machine,
                role: self.nodes[peer].link.role(),
            });
        }
        Ok(if node.peer_down {
            PeerCondition::KnownDown { machine }
        } else {
            PeerCondition::Unknown { machine }
        })
    }

    /// `gmdctl primary` on node `n`, under `roles::may_promote`. Promoting
    /// the other copy of the writer while not connected to it is a
    /// failover; connected (the writer demoted), a switch.
    fn promote(&mut self, n: usize) -> Result<(), String> {
        let condition = self.peer_condition(n)?;
        let engine = self.nodes[n].engine.as_ref().expect("running");
        let (facts, _, _) = link::offer_parts(
            NAMES[n],
            false,
            engine.durable_generations(),
            engine.map(),
            MapSource::Running,
        );
        let lacks = Lacks {
            no_data: facts.gens.holds_no_data(),
            not_received: facts.not_received,
        };
        let current = self.nodes[n].link.role();
        roles::may_promote("sim", current, &condition, lacks, false)?;
        let connected = matches!(condition, PeerCondition::Connected { .. });
        if n != self.writer && !connected && self.applying(n) {
            // The administrator fails over once the survivor's disk is
            // quiet: the engine does not hold the new primary's writes
            // back behind what the ended session still has on its disk.
            return Err("operations of the ended session still land here".into());
        }
        self.set_role(n, PairRole::Primary)?;
        if n != self.writer && !connected {
            self.failover(n);
        } else if n != self.writer {
            self.counts.switches += 1;
            self.note(format!(
                "switch: node {n} promoted (connected, {condition:?})"
            ));
        } else {
            self.counts.promotions += 1;
            self.note(format!("node {n} promoted again ({condition:?})"));
        }
        self.writer = n;
        Ok(())
    }

    /// Node `m` becomes primary while the writer is down or apart. What the
    /// writer acknowledged may be lost exactly where its durable map says
    /// `m` lacks it (promise 1): async, any mark (writes within the HWM,
    /// acknowledged once their intent mark was durable); sync and mwc, a
    /// stale mark only (a write the peer lost is acknowledged once its stale
    /// mark is durable; every other one the peer acknowledged) — in both,
    /// what was acknowledged after that mark was made durable (the region
    /// was clean before: its data durable on both sides). And in blocks a
    /// power cut of `m` took since its last resync, whatever no flush
    /// covered (promise 2). Everything else must be on `m`. Writes of the
    /// old primary in those blocks that `m` does not hold are dead from now
    /// on, and the old primary is behind until a resync brings it the
    /// pair's data.
    fn failover(&mut self, m: usize) {
        let w = self.writer;
        let since = if self.mode == Mode::Async {
            self.nodes[w].marked_since.clone()
        } else {
            self.nodes[w].stale_since.clone()
        };
        // (Async, what a power cut of `m` took is in regions `w` marks.)
        let cut: Vec<bool> = if self.mode == Mode::Async {
            vec![false; BLOCKS]
        } else {
            self.nodes[m].cut_blocks.clone()
        };
        let lossy = |b: usize| since[region_of(b) as usize].is_some() || cut[b];
        // Durable on `m`: regions clean on both durable maps (their data is
        // durable on both sides), and, async, what was acknowledged before
        // a region was marked (it was clean then); elsewhere only what
        // flushes of both copies covered.
        let clean = |n: usize, b: usize| self.nodes[n].map_durable.get(region_of(b)) == 0;
        let asynchronous = self.mode == Mode::Async;
        let durable_there: Vec<bool> = (0..BLOCKS)
            .map(|b| {
                (clean(w, b) && clean(m, b))
                    || (asynchronous && since[region_of(b) as usize].is_some())
            })
            .collect();
        self.promises.failover(
            |b| since[region_of(b) as usize],
            |b| cut[b],
            |b| durable_there[b],
        );
        let hi = self.next_id - 1;
        for b in (0..BLOCKS).filter(|&b| lossy(b)) {
            let lo = self.nodes[m].disk.visible()[b];
            self.promises.bury(b, lo, hi);
        }
        let regions = since.iter().filter(|s| s.is_some()).count();
        let cut = cut.iter().filter(|&&c| c).count();
        self.note(format!(
            "failover: node {m} promoted while node {w} is {}; {regions} regions of node {w}'s \
             durable map and {cut} blocks node {m}'s power cuts took may lose what was \
             acknowledged",
            if self.nodes[w].engine.is_some() {
                "apart"
            } else {
                "down"
            }
        ));
        self.nodes[w].behind = Some(self.step);
        self.failed_over_from = Some(w);
        self.counts.failovers += 1;
    }

    /// Whether node `n`'s disk still applies operations from its peer.
    fn applying(&self, n: usize) -> bool {
        self.nodes[n]
            .slots
            .values()
            .any(|d| matches!(d, SlotData::Peer { .. }))
    }

    /// An administrator's turn: resolves a refusal it knows how to, makes
    /// a copy primary when none is, or starts a role switch.
    pub(crate) fn administer_roles(&mut self) {
        if self.switch.is_some() || self.settling {
            return;
        }
        self.resolve_refusal();
        let primary = (0..2).any(|n| self.nodes[n].role() == Some(PairRole::Primary));
        if !primary {
            self.promote_someone();
        } else if self.connected()
            && self.nodes[self.writer].role() == Some(PairRole::Primary)
            && self.rng.gen_bool(SWITCH_CHANCE)
        {
            let from = self.writer;
            self.note(format!(
                "switch: node {from}'s application stops, node {} is to be primary",
                1 - from
            ));
            self.nodes[from].app_stopped = true;
            self.switch = Some(Switch {
                from,
                to: 1 - from,
                phase: Phase::Drain,
                since: self.step,
            });
        }
    }

    /// No copy is primary: the writer, if it runs, is promoted again (its
    /// peer, if down, recorded down first: `gmdctl down`); if it is down,
    /// sometimes the other fails over — only when its data is the pair's
    /// (the same generation: the old primary did not go on alone), the old
    /// primary will not come back as primary by itself (it did not record
    /// its peer down), and the survivor applied what the old session sent.
    fn promote_someone(&mut self) {
        let w = self.writer;
        if self.nodes[w].engine.is_some() {
            if self.nodes[1 - w].engine.is_none() {
                self.nodes[w].peer_down = true;
            }
            if let Err(why) = self.promote(w) {
                self.note(format!("node {w} not promoted: {why}"));
            }
            return;
        }
        let m = 1 - w;
        let Some(engine) = &self.nodes[m].engine else {
            return;
        };
        let same = engine.durable_generations().current == self.nodes[w].gens_durable.current;
        if !same || self.nodes[w].peer_down || !self.rng.gen_bool(FAILOVER_CHANCE) {
            return;
        }
        self.nodes[m].peer_down = true;
        if let Err(why) = self.promote(m) {
            self.note(format!("node {m} not promoted: {why}"));
        }
    }

    /// Moves a role switch on: drain, demote (a flush), promote.
    pub(crate) fn continue_switch(&mut self) {
        let Some(switch) = self.switch else {
            return;
        };
        let (from, to) = (switch.from, switch.to);
        match switch.phase {
            Phase::Drain => {
                if self.nodes[from].app_busy() {
                    return;
                }
                // `gmdctl secondary`: read-only first, then a flush.
                if let Err(why) = self.set_role(from, PairRole::Secondary) {
                    self.abandon_switch(&format!("node {from} cannot be demoted: {why}"));
                    return;
                }
                let floors = self.promises.floors();
                let session = self.nodes[from].engine_session;
                let flush = Request {
                    kind: OpKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    fua: false,
                };
                self.note(format!("switch: node {from} demoted, flushing"));
                self.switch = Some(Switch {
                    phase: Phase::Flush,
                    ..switch
                });
                let slot = self.engine(from).submit(flush);
                self.nodes[from].slots.insert(
                    slot,
                    SlotData::AppFlush {
                        floors,
                        demotion: true,
                        session,
                    },
                );
                self.pump(from);
            }
            Phase::Flush => {}
            Phase::Promote => match self.promote(to) {
                Ok(()) => {
                    self.switch = None;
                    self.nodes[from].app_stopped = false;
                }
                Err(why) if self.step > switch.since + SWITCH_PATIENCE => {
                    self.abandon_switch(&format!("node {to} cannot be promoted: {why}"));
                }
                Err(_) => {}
            },
        }
    }

    /// The demotion flush of node `n` completed.
    pub(crate) fn demotion_flushed(&mut self, n: usize) {
        if let Some(switch) = self
            .switch
            .filter(|s| s.from == n && s.phase == Phase::Flush)
        {
            self.switch = Some(Switch {
                phase: Phase::Promote,
                ..switch
            });
        }
    }

    /// The switch is given up; its old primary's application may run again
    /// (it is promoted again by the next administrator's turn).
    pub(crate) fn abandon_switch(&mut self, why: &str) {
        if let Some(switch) = self.switch.take() {
            self.note(format!("switch abandoned: {why}"));
            self.nodes[switch.from].app_stopped = false;
        }
    }

    /// Resolves the refusals an administrator can judge from both copies'
    /// state, with `gmdctl unify --master <writer>` (the other copy stopped,
    /// its changes discarded):
    /// - the link refused because the primary would receive the other's
    ///   data: after a failover, a new primary that has not written yet
    ///   holds the same generation as the old one, whose stale marks make
    ///   it look newer (its changes were excused and buried at the
    ///   failover);
    /// - a divergence where the other copy holds no stale cell (it never
    ///   wrote alone: a secondary all along): the writer went on alone
    ///   through more generations than the history keeps (a primary
    ///   restarted again and again while apart), so the lineage that joins
    ///   them is forgotten. The other copy's data is an earlier state of
    ///   the writer's: nothing promised is discarded.
    ///
    /// Other refusals are not resolved: none should happen.
    pub(crate) fn resolve_refusal(&mut self) {
        let m = self.writer;
        let o = 1 - m;
        let resolvable = match &self.last_refusal {
            Some((_, Refusal::TargetIsPrimary { target, .. })) => {
                *target == NAMES[m]
                    && self.nodes[m].role() == Some(PairRole::Primary)
                    && self.failed_over_from == Some(o)
            }
            Some((_, Refusal::Divergence { .. })) => {
                let map = self.nodes[o]
                    .engine
                    .as_ref()
                    .map_or(&self.nodes[o].map_durable, |e| e.map());
                map.count_value(CELL_STALE) == 0
                    && self.nodes[o].map_durable.count_value(CELL_STALE) == 0
            }
            _ => false,
        };
        if !resolvable {
            return;
        }
        if self.unifying.is_some() {
            return;
        }
        self.last_refusal = None;
        if self.nodes[o].engine.is_some() {
            self.note(format!("unify: node {o} stopped"));
            self.crash(o, None);
        }
        // `gmdctl unify --master m`: the master marks stale the union of
        // both maps, durably, before the other's map is cleared.
        let mine = self.nodes[m].map().resync_bits(false);
        let theirs = self.nodes[o].map_durable.resync_bits(false);
        let union: Vec<u8> = mine.iter().zip(&theirs).map(|(a, b)| a | b).collect();
        self.note(format!("unify: node {m} is master, marks the union stale"));
        if self.nodes[m].engine.is_none() {
            // A stopped master's map is written at once.
            let mut map = self.nodes[m].map_durable.clone();
            for r in 0..REGIONS {
                if union[(r / 8) as usize] & (1 << (r % 8)) != 0 {
                    map.set(r, CELL_STALE);
                }
            }
            self.set_durable_map(m, map);
            self.finish_unify(m, o);
            return;
        }
        let epoch = self.engine(m).mark_stale_bits(&union);
        self.pump(m);
        self.unifying = Some(Unify {
            master: m,
            other: o,
            epoch,
        });
        self.continue_unify();
    }

    /// Whether a unify keeps node `n` stopped.
    pub(crate) fn unify_holds(&self, n: usize) -> bool {
        self.unifying.is_some_and(|u| u.other == n)
    }

    /// A unify whose master's marks are durable clears the other's map: it
    /// discards its own changes and gets a clean map (the master's marks
    /// cover every region that may differ). A master that went down or
    /// whose map failed ends it (the other's map is untouched).
    pub(crate) fn continue_unify(&mut self) {
        let Some(Unify {
            master: m,
            other: o,
            epoch,
        }) = self.unifying
        else {
            return;
        };
        let Some(engine) = &self.nodes[m].engine else {
            self.unifying = None;
            self.note("unify abandoned: the master went down".into());
            return;
        };
        if engine.map_failed() {
            self.unifying = None;
            self.note("unify abandoned: the master's map failed".into());
            return;
        }
        if engine.durable_epoch() < epoch {
            return;
        }
        self.unifying = None;
        self.finish_unify(m, o);
    }

    /// The master's marks are durable: the other discards its own changes
    /// and gets a clean map; its copy is not the pair's data any more until
    /// a resync brought it.
    fn finish_unify(&mut self, m: usize, o: usize) {
        let node = &mut self.nodes[o];
        node.behind = Some(self.step);
        node.gens_durable.discard_own_changes();
        // A stopped device's clean stop records it secondary.
        node.recorded_role = PairRole::Secondary;
        node.ran_primary = false;
        self.set_durable_map(o, StateMap::new(SIZE));
        self.counts.unifies += 1;
        self.note(format!(
            "unify: node {m} is master; node {o} discards its changes (generations now {})",
            self.nodes[o].gens_durable
        ));
    }
}
