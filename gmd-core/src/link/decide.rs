//! Which side of a pair is newer, and what the resync that follows a
//! connection moves: one pure function of both sides' durable facts
//! ([`decide`]), called by the daemon's handshake and by the simulator alike.
//!
//! | situation | result |
//! |---|---|
//! | both primary | refused |
//! | neither holds data | connect; nothing to copy (promote one with `--force`) |
//! | one holds no data | full copy from the other |
//! | same `current`, no marks | nothing to do |
//! | same `current`, marks | the union of the marks, from the side with stale marks, else the primary, else the side that lacks nothing, else the side that ran as primary last and has marks, else the only side with marks (ties: the smaller machine name) |
//! | my `bitmap` is the peer's `current` | I went on alone from the peer's data: the union from me |
//! | the peer's `current` is in my history | a full copy from me |
//! | (and the same the other way round) | |
//! | anything else | both moved on: divergence, refused |
//!
//! A side that receives is never the primary (its application would write
//! where the source's data is about to land); such a connection is refused
//! with the commands that resolve it.

use crate::generations::{GEN_NONE, GenId, Generations};

/// What one side tells the other about its copy when they meet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SideFacts {
    /// Machine name.
    pub machine: String,
    /// Whether this side is primary now.
    pub primary: bool,
    /// Its data generations.
    pub gens: Generations,
    /// Stale cells (`0xf`: written here, the peer does not have it).
    pub stale: u64,
    /// Cells not received (`0x6`: this side lacks the peer's data there).
    pub not_received: u64,
    /// Regions this side's map asks the resync to cover.
    pub marked: u64,
    /// Whether this side ran as primary when it last stopped (it crashed,
    /// or was stopped, as primary) and has not been given a role since:
    /// its marks then hold the last writer's writes, which its peer, a
    /// secondary then, may have lost (a power cut takes what it had not
    /// flushed). Restarted as secondary, such a copy is still the source
    /// of the marks' union (DRBD's "crashed primary").
    #[serde(default)]
    pub ran_primary: bool,
}

impl SideFacts {
    /// Whether this side lacks data it knows of: it holds none at all, or
    /// regions it has not received.
    pub fn lacks_data(&self) -> bool {
        self.gens.holds_no_data() || self.not_received > 0
    }
}

/// Which side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The side calling [`decide`].
    Local,
    /// The other one.
    Remote,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Remote,
            Side::Remote => Side::Local,
        }
    }
}

/// Why one side is the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Same data: only the marked regions can differ.
    SameData,
    /// The source went on alone from the target's data; its marks cover the gap.
    Ahead,
    /// The source descends from the target's data but its marks do not cover the gap.
    AheadUnmarked,
    /// The target holds no known data.
    TargetEmpty,
}

/// What a connection starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The side that sends, if anything moves.
    pub source: Option<Side>,
    /// Every region moves (otherwise: the union of both sides' marks).
    pub full: bool,
    /// Why.
    pub basis: Basis,
    /// Regions of the target holding changes of its own (written and never
    /// sent, or in flight when it stopped), overwritten by the source's
    /// data: counted and reported.
    pub discarded: u64,
    /// The source's `current`, which the target takes once it received everything.
    pub source_current: GenId,
}

impl Plan {
    /// The plan as the other side sees it.
    pub fn mirrored(self) -> Plan {
        Plan {
            source: self.source.map(Side::other),
            ..self
        }
    }

    fn nothing(basis: Basis, current: GenId) -> Plan {
        Plan {
            source: None,
            full: false,
            basis,
            discarded: 0,
            source_current: current,
        }
    }
}

/// Why two copies must not mirror; the message names the commands that resolve it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Both sides are primary.
    #[error(
        "{device}: both {a} and {b} are primary; make one secondary ('gmdctl secondary {device}' there)"
    )]
    TwoPrimaries {
        /// The device.
        device: String,
        /// One side.
        a: String,
        /// The other.
        b: String,
    },
    /// Both sides wrote without the other.
    #[error(
        "{device}: both {a} and {b} wrote while apart (data divergence: generations {a_gens} and {b_gens}); \
         inspect with 'gmdctl show-state {device}' on both, then keep one side's data with \
         'gmdctl unify {device} --master <machine>' (the other side's changes are discarded)"
    )]
    Divergence {
        /// The device.
        device: String,
        /// One side.
        a: String,
        /// Its generations.
        a_gens: Box<Generations>,
        /// The other.
        b: String,
        /// Its generations.
        b_gens: Box<Generations>,
    },
    /// The side that would receive is primary.
    #[error(
        "{device}: {newer} holds data {target} has not got, but {target} is primary; \
         make {target} secondary ('gmdctl secondary {device}' on {target}) to receive it, \
         or keep {target}'s data with 'gmdctl unify {device} --master {target}'"
    )]
    TargetIsPrimary {
        /// The device.
        device: String,
        /// The newer side.
        newer: String,
        /// The primary that would receive.
        target: String,
    },
    /// Neither side can be the source of what the other lacks.
    #[error(
        "{device}: {a} and {b} both lack data the other holds (interrupted resyncs); \
         promote the side to keep with 'gmdctl primary {device} --force' (its copy becomes the source)"
    )]
    BothLackData {
        /// The device.
        device: String,
        /// One side.
        a: String,
        /// The other.
        b: String,
    },
}

/// Decides what a connection between `local` and `remote` copies of
/// `device` starts with (see the module documentation). Symmetric:
/// `decide(d, b, a)` is `decide(d, a, b)` mirrored.
pub fn decide(device: &str, local: &SideFacts, remote: &SideFacts) -> Result<Plan, Refusal> {
    // What the data says comes first: a divergence is named as such even
    // when both sides are primary too.
    let plan = data_plan(device, local, remote)?;
    if local.primary && remote.primary {
        let (a, b) = ordered(local, remote);
        return Err(Refusal::TwoPrimaries {
            device: device.into(),
            a: a.machine.clone(),
            b: b.machine.clone(),
        });
    }
    if let Some(source) = plan.source {
        let (src, dst) = match source {
            Side::Local => (local, remote),
            Side::Remote => (remote, local),
        };
        if dst.primary {
            return Err(Refusal::TargetIsPrimary {
                device: device.into(),
                newer: src.machine.clone(),
                target: dst.machine.clone(),
            });
        }
    }
    Ok(plan)
}

/// Which side is newer and what moves, from the data alone (roles only
/// break ties between copies of the same data).
fn data_plan(device: &str, local: &SideFacts, remote: &SideFacts) -> Result<Plan, Refusal> {
    let (lg, rg) = (&local.gens, &remote.gens);
    match (lg.holds_no_data(), rg.holds_no_data()) {
        (true, true) => return Ok(Plan::nothing(Basis::SameData, GEN_NONE)),
        (true, false) => {
            return from(
                device,
                Side::Remote,
                remote,
                local,
                true,
                Basis::TargetEmpty,
            );
        }
        (false, true) => return from(device, Side::Local, local, remote, true, Basis::TargetEmpty),
        (false, false) => {}
    }
    if lg.current == rg.current {
        if local.marked == 0 && remote.marked == 0 {
            return Ok(Plan::nothing(Basis::SameData, lg.current));
        }
        let source = same_data_source(device, local, remote)?;
        return match source {
            Side::Local => from(device, Side::Local, local, remote, false, Basis::SameData),
            Side::Remote => from(device, Side::Remote, remote, local, false, Basis::SameData),
        };
    }
    // Each test must hold one way only: a lineage that claims both ways
    // is not one to act on.
    let local_ahead = lg.bitmap != 0 && lg.bitmap == rg.current;
    let remote_ahead = rg.bitmap != 0 && rg.bitmap == lg.current;
    match (local_ahead, remote_ahead) {
        (true, false) => return from(device, Side::Local, local, remote, false, Basis::Ahead),
        (false, true) => return from(device, Side::Remote, remote, local, false, Basis::Ahead),
        _ => {}
    }
    match (lg.knows(rg.current), rg.knows(lg.current)) {
        (true, false) if !remote_ahead => {
            return from(
                device,
                Side::Local,
                local,
                remote,
                true,
                Basis::AheadUnmarked,
            );
        }
        (false, true) if !local_ahead => {
            return from(
                device,
                Side::Remote,
                remote,
                local,
                true,
                Basis::AheadUnmarked,
            );
        }
        _ => {}
    }
    let (a, b) = ordered(local, remote);
    Err(Refusal::Divergence {
        device: device.into(),
        a: a.machine.clone(),
        a_gens: Box::new(a.gens),
        b: b.machine.clone(),
        b_gens: Box::new(b.gens),
    })
}

/// The two sides in a stable order (by machine name), for messages that
/// must read the same on both.
fn ordered<'a>(x: &'a SideFacts, y: &'a SideFacts) -> (&'a SideFacts, &'a SideFacts) {
    if x.machine <= y.machine {
        (x, y)
    } else {
        (y, x)
    }
}

/// Same data, some marks: who sends the union.
fn same_data_source(device: &str, local: &SideFacts, remote: &SideFacts) -> Result<Side, Refusal> {
    // The copy promoted last holds the pair's data. Of one generation, it
    // was promoted in a switch (a promotion apart draws another), once it
    // lacked nothing of the earlier primary's and its volume was synced:
    // the other's marks cover nothing it lacks (stale marks whose clear
    // did not land, failed local writes, hot regions already here) — and
    // a secondary makes no stale marks — while its own may cover writes
    // the other lost in a power cut. Equal terms (maps from before terms,
    // or no promotion since): the rules below.
    match local.gens.term.cmp(&remote.gens.term) {
        std::cmp::Ordering::Greater => return Ok(Side::Local),
        std::cmp::Ordering::Less => return Ok(Side::Remote),
        std::cmp::Ordering::Equal => {}
    }
    let lacks = |s: &SideFacts| s.not_received > 0;
    match (local.stale > 0, remote.stale > 0) {
        (true, false) => return Ok(Side::Local),
        (false, true) => return Ok(Side::Remote),
        (true, true) => {
            let (a, b) = ordered(local, remote);
            return Err(Refusal::Divergence {
                device: device.into(),
                a: a.machine.clone(),
                a_gens: Box::new(a.gens),
                b: b.machine.clone(),
                b_gens: Box::new(b.gens),
            });
        }
        (false, false) => {}
    }
    match (local.primary, remote.primary) {
        (true, false) => return Ok(Side::Local),
        (false, true) => return Ok(Side::Remote),
        _ => {}
    }
    match (lacks(local), lacks(remote)) {
        (false, true) => return Ok(Side::Local),
        (true, false) => return Ok(Side::Remote),
        (true, true) => {
            let (a, b) = ordered(local, remote);
            return Err(Refusal::BothLackData {
                device: device.into(),
                a: a.machine.clone(),
                b: b.machine.clone(),
            });
        }
        (false, false) => {}
    }
    // Neither is primary now. Marks of a secondary that lacks nothing are
    // writes it made as primary (hot or in flight when it stopped): the
    // data of the last writer is the pair's. The copy that crashed as
    // primary holds it; its peer may have lost what it had not flushed
    // (a power cut), while what the peer itself wrote as primary before
    // reached this one before it was promoted (a switch is made while
    // connected).
    let last_writer = |s: &SideFacts| s.ran_primary && s.marked > 0;
    match (last_writer(local), last_writer(remote)) {
        (true, false) => return Ok(Side::Local),
        (false, true) => return Ok(Side::Remote),
        _ => {}
    }
    // A side without marks knows of nothing it holds that its peer lacks;
    // the other side's marks (its own writes, resent) do.
    match (local.marked > 0, remote.marked > 0) {
        (true, false) => Ok(Side::Local),
        (false, true) => Ok(Side::Remote),
        _ if local.machine <= remote.machine => Ok(Side::Local),
        _ => Ok(Side::Remote),
    }
}

/// A plan with `source` (`src`) sending to `dst`, unless the source lacks
/// data itself.
fn from(
    device: &str,
    source: Side,
    src: &SideFacts,
    dst: &SideFacts,
    full: bool,
    basis: Basis,
) -> Result<Plan, Refusal> {
    if src.not_received > 0 {
        // The source would send data it does not have itself.
        let (a, b) = ordered(src, dst);
        return Err(Refusal::BothLackData {
            device: device.into(),
            a: a.machine.clone(),
            b: b.machine.clone(),
        });
    }
    Ok(Plan {
        source: Some(source),
        full,
        basis,
        discarded: dst.marked.saturating_sub(dst.not_received),
        source_current: src.gens.current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(machine: &str, current: GenId, bitmap: GenId) -> SideFacts {
        SideFacts {
            machine: machine.into(),
            primary: false,
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

    fn with_history(mut s: SideFacts, history: [GenId; 3]) -> SideFacts {
        s.gens.history = history;
        s
    }

    fn marked(mut s: SideFacts, stale: u64, not_received: u64, other: u64) -> SideFacts {
        s.stale = stale;
        s.not_received = not_received;
        s.marked = stale + not_received + other;
        s
    }

    fn primary(mut s: SideFacts) -> SideFacts {
        s.primary = true;
        s
    }

    fn ran_primary(mut s: SideFacts) -> SideFacts {
        s.ran_primary = true;
        s
    }

    #[test]
    fn same_data_and_clean_maps_need_nothing() {
        let plan = decide("d", &side("a", 7, 0), &side("b", 7, 0)).unwrap();
        assert_eq!(plan.source, None);
    }

    #[test]
    fn same_data_resyncs_the_marks_from_the_side_with_stale_ones_then_the_primary() {
        let a = marked(side("a", 7, 0), 3, 0, 0);
        let b = primary(marked(side("b", 7, 0), 0, 0, 2));
        assert!(
            decide("d", &a, &b)
                .unwrap_err()
                .to_string()
                .contains("primary")
        );
        let b = marked(side("b", 7, 0), 0, 0, 2);
        assert_eq!(decide("d", &a, &b).unwrap().source, Some(Side::Local));
        let a = primary(marked(side("a", 7, 0), 0, 0, 1));
        let b = marked(side("b", 7, 0), 0, 4, 0);
        let plan = decide("d", &a, &b).unwrap();
        assert_eq!((plan.source, plan.full), (Some(Side::Local), false));
        // Neither primary: the side that lacks nothing; then the smaller name.
        let a = marked(side("a", 7, 0), 0, 4, 0);
        let b = marked(side("b", 7, 0), 0, 0, 1);
        assert_eq!(decide("d", &a, &b).unwrap().source, Some(Side::Remote));
        let a = marked(side("a", 7, 0), 0, 0, 1);
        assert_eq!(decide("d", &a, &b).unwrap().source, Some(Side::Local));
        assert_eq!(decide("d", &b, &a).unwrap().source, Some(Side::Remote));
    }

    /// Seed 23666 of the mirror simulator: node1, primary, crashed (its
    /// disk kept what it wrote); node0, a secondary since a switch, lost
    /// the writes it had not flushed in a power cut, and kept marks of its
    /// own from when it was primary before the switch. Both restarted as
    /// secondaries with the same generation: the copy that crashed as
    /// primary sends the union, whatever the names.
    #[test]
    fn same_data_between_secondaries_comes_from_the_one_that_crashed_as_primary() {
        let old = marked(side("a", 7, 0), 0, 0, 2);
        let last = ran_primary(marked(side("b", 7, 0), 0, 0, 10));
        assert_eq!(decide("d", &old, &last).unwrap().source, Some(Side::Remote));
        assert_eq!(decide("d", &last, &old).unwrap().source, Some(Side::Local));
        // A flag left from long ago on a copy without marks says nothing.
        let clean = ran_primary(side("b", 7, 0));
        assert_eq!(decide("d", &old, &clean).unwrap().source, Some(Side::Local));
        // What a copy lacks still comes first.
        let lacking = ran_primary(marked(side("b", 7, 0), 0, 3, 0));
        assert_eq!(
            decide("d", &old, &lacking).unwrap().source,
            Some(Side::Local)
        );
    }

    /// Seed 57327 of the mirror simulator: node1, promoted in a switch,
    /// wrote, was demoted in a switch that a power cut of node0 broke off
    /// (node0 lost part of those writes); node0 kept marks of its own
    /// failed local writes from when it was primary before. Both restarted
    /// as secondaries with the same generation and marks: the copy
    /// promoted last (the higher term) sends the union, whatever the names
    /// and even without marks of its own.
    #[test]
    fn same_data_between_secondaries_comes_from_the_one_promoted_last() {
        let term = |mut s: SideFacts, term| {
            s.gens.term = term;
            s
        };
        let older = term(marked(side("a", 7, 0), 0, 0, 2), 1);
        let last = term(marked(side("b", 7, 0), 0, 0, 1), 2);
        assert_eq!(
            decide("d", &older, &last).unwrap().source,
            Some(Side::Remote)
        );
        assert_eq!(
            decide("d", &last, &older).unwrap().source,
            Some(Side::Local)
        );
        let clean_last = term(side("b", 7, 0), 2);
        assert_eq!(
            decide("d", &older, &clean_last).unwrap().source,
            Some(Side::Remote)
        );
        // Even over stale marks of the earlier primary (seed 25119: their
        // clear had not landed; the region had reached the later one
        // before its promotion), on either side or both.
        let stale = term(marked(side("a", 7, 0), 1, 0, 0), 1);
        assert_eq!(
            decide("d", &stale, &last).unwrap().source,
            Some(Side::Remote)
        );
        let both = term(marked(side("b", 7, 0), 2, 0, 0), 2);
        assert_eq!(
            decide("d", &stale, &both).unwrap().source,
            Some(Side::Remote)
        );
        assert_eq!(
            decide("d", &both, &stale).unwrap().source,
            Some(Side::Local)
        );
        // The copy promoted last never takes data: lacking some, it refuses.
        let lacking = term(marked(side("b", 7, 0), 0, 3, 0), 2);
        assert!(decide("d", &older, &lacking).is_err());
        // Terms equal (maps from before terms): the name decides, as before.
        let a = marked(side("a", 7, 0), 0, 0, 2);
        let b = marked(side("b", 7, 0), 0, 0, 1);
        assert_eq!(decide("d", &b, &a).unwrap().source, Some(Side::Remote));
    }

    /// Seed 27329 of the mirror simulator: node1, demoted in a switch
    /// that a power cut of node0 broke off, holds hot regions node0
    /// acknowledged and then lost; node0 restarted with a clean map. The
    /// only side with marks sends them, whatever the names.
    #[test]
    fn same_data_between_secondaries_comes_from_the_only_one_with_marks() {
        let unmarked = side("a", 7, 0);
        let hot = marked(side("b", 7, 0), 0, 0, 5);
        assert_eq!(
            decide("d", &unmarked, &hot).unwrap().source,
            Some(Side::Remote)
        );
        assert_eq!(
            decide("d", &hot, &unmarked).unwrap().source,
            Some(Side::Local)
        );
    }

    #[test]
    fn the_side_that_went_on_alone_sends_its_marks() {
        let a = primary(marked(side("a", 8, 7), 5, 0, 0));
        let b = marked(side("b", 7, 0), 2, 0, 1);
        let plan = decide("d", &a, &b).unwrap();
        assert_eq!(
            (
                plan.source,
                plan.full,
                plan.basis,
                plan.discarded,
                plan.source_current
            ),
            (Some(Side::Local), false, Basis::Ahead, 3, 8)
        );
    }

    #[test]
    fn an_ancestor_whose_gap_is_unmarked_gets_a_full_copy() {
        let a = with_history(side("a", 9, 0), [8, 7, 0]);
        let b = side("b", 7, 0);
        let plan = decide("d", &a, &b).unwrap();
        assert_eq!((plan.source, plan.full), (Some(Side::Local), true));
    }

    #[test]
    fn a_volume_without_data_receives_a_full_copy_and_two_empty_ones_wait() {
        let a = side("a", GEN_NONE, 0);
        let b = marked(side("b", 7, 0), 1, 0, 0);
        let plan = decide("d", &a, &b).unwrap();
        assert_eq!((plan.source, plan.full), (Some(Side::Remote), true));
        assert_eq!(plan.basis, Basis::TargetEmpty);
        assert_eq!(
            decide("d", &a, &side("b", GEN_NONE, 0)).unwrap().source,
            None
        );
        // A blank volume is never the primary that receives.
        let refused = decide("d", &primary(a.clone()), &b).unwrap_err();
        assert!(
            matches!(refused, Refusal::TargetIsPrimary { .. }),
            "{refused}"
        );
    }

    #[test]
    fn both_moved_on_is_divergence() {
        let a = marked(side("a", 8, 7), 1, 0, 0);
        let b = marked(side("b", 9, 7), 1, 0, 0);
        let refused = decide("d", &a, &b).unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, Refusal::Divergence { .. }));
        assert!(text.contains("gmdctl unify d --master"), "{text}");
        // Unrelated data too.
        assert!(matches!(
            decide("d", &side("a", 8, 0), &side("b", 9, 0)),
            Err(Refusal::Divergence { .. })
        ));
    }

    #[test]
    fn a_primary_never_receives() {
        let a = marked(side("a", 8, 7), 1, 0, 0);
        let b = primary(side("b", 7, 0));
        let refused = decide("d", &a, &b).unwrap_err();
        assert!(matches!(refused, Refusal::TargetIsPrimary { ref target, .. } if target == "b"));
        assert!(refused.to_string().contains("gmdctl secondary d"));
        assert!(matches!(
            decide("d", &primary(side("a", 7, 0)), &b),
            Err(Refusal::TwoPrimaries { .. })
        ));
    }

    #[test]
    fn two_primaries_that_both_wrote_are_named_a_divergence() {
        let a = primary(marked(side("a", 8, 7), 1, 0, 0));
        let b = primary(marked(side("b", 9, 7), 1, 0, 0));
        assert!(matches!(
            decide("d", &a, &b),
            Err(Refusal::Divergence { .. })
        ));
    }

    #[test]
    fn a_source_that_lacks_data_is_refused() {
        let a = marked(side("a", 8, 7), 0, 3, 0);
        let b = side("b", 7, 0);
        assert!(matches!(
            decide("d", &a, &b),
            Err(Refusal::BothLackData { .. })
        ));
    }

    fn arb_side(machine: &'static str) -> impl Strategy<Value = SideFacts> {
        (
            any::<bool>(),
            0u64..5,
            0u64..5,
            proptest::array::uniform3(0u64..5),
            0u64..3,
            0u64..3,
            0u64..3,
            any::<bool>(),
        )
            .prop_map(
                move |(p, current, bitmap, history, stale, nr, other, ran)| SideFacts {
                    machine: machine.into(),
                    primary: p,
                    gens: Generations {
                        term: 0,
                        current,
                        bitmap,
                        history,
                    },
                    stale,
                    not_received: nr,
                    marked: stale + nr + other,
                    ran_primary: ran,
                },
            )
    }

    proptest! {
        /// Both sides reach the same decision, each from its own point of view.
        #[test]
        fn decisions_are_symmetric(a in arb_side("alpha"), b in arb_side("beta")) {
            match (decide("d", &a, &b), decide("d", &b, &a)) {
                (Ok(x), Ok(y)) => prop_assert_eq!(x, y.mirrored()),
                (Err(x), Err(y)) => prop_assert_eq!(x, y),
                (x, y) => prop_assert!(false, "{:?} vs {:?}", x, y),
            }
        }

        /// Nothing is ever copied onto a primary, nor from a side that
        /// lacks data, nor from a volume without data.
        #[test]
        fn a_plan_is_always_safe(a in arb_side("alpha"), b in arb_side("beta")) {
            if let Ok(plan) = decide("d", &a, &b) {
                if let Some(source) = plan.source {
                    let (src, dst) = match source { Side::Local => (&a, &b), Side::Remote => (&b, &a) };
                    prop_assert!(!dst.primary);
                    prop_assert!(!src.lacks_data());
                    prop_assert_eq!(plan.source_current, src.gens.current);
                    prop_assert!(plan.full || src.gens.current == dst.gens.current || src.gens.bitmap == dst.gens.current);
                }
            }
        }
    }
}
