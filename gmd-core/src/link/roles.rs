//! The rules of role changes, as pure functions: which side may become
//! primary and when, so that at most one side of a pair ever writes.
//!
//! - A side becomes primary only if its peer is not primary, and, when the
//!   pair is not connected, only if the peer is known to be down (its
//!   promote-failure timeout passed, or `gmdctl down` recorded it):
//!   otherwise both sides of a partition could write.
//! - A side that lacks data (holds no known data, or regions it has not
//!   received) becomes primary only with `--force`, which makes its copy
//!   the newest as it is (a new generation; regions it lacked are then
//!   sent from here, overwriting the peer's).
//! - Two primaries are never offered.

use super::handshake::PairRole;

/// What this side knows about its peer when a role change is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCondition {
    /// The device has no remote peer at all.
    None,
    /// Mirroring with the peer, which is in this role.
    Connected {
        /// The peer machine.
        machine: String,
        /// Its role.
        role: PairRole,
    },
    /// Not connected; the peer is recorded down.
    KnownDown {
        /// The peer machine.
        machine: String,
    },
    /// Not connected, and nothing says the peer is down (it may be running
    /// on the other side of a partition).
    Unknown {
        /// The peer machine.
        machine: String,
    },
}

/// What this side's copy lacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lacks {
    /// It holds no known data (a fresh map).
    pub no_data: bool,
    /// Regions not received from the peer.
    pub not_received: u64,
}

impl Lacks {
    fn any(self) -> bool {
        self.no_data || self.not_received > 0
    }
}

/// What a promotion does besides changing the role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// Nothing more: this side's data is the pair's.
    Plain,
    /// `--force`: this copy becomes the newest as it is (new generation,
    /// regions not received turn stale, to be sent from here); a connected
    /// pair sets its link up again so the resync follows the new lineage.
    Forced,
}

/// Whether `device` may become primary here.
///
/// # Errors
/// A message saying why not and what to do.
pub fn may_promote(
    device: &str,
    current: PairRole,
    peer: &PeerCondition,
    lacks: Lacks,
    force: bool,
) -> Result<Promotion, String> {
    if current == PairRole::Split {
        return Err(format!(
            "{device}: split for a drill; 'gmdctl rejoin {device}' first (it discards the drill's writes)"
        ));
    }
    match peer {
        PeerCondition::Connected {
            machine,
            role: PairRole::Primary,
        } => {
            return Err(format!(
                "{device}: {machine} is primary; gmd keeps one primary per pair (two would need \
                 per-block conflict detection, which it does not offer): run \
                 'gmdctl secondary {device}' on {machine} first"
            ));
        }
        PeerCondition::Unknown { machine } => {
            return Err(format!(
                "{device}: not connected to {machine}, and {machine} is not known to be down \
                 (it may be running on the other side of a partition); wait for the link, or if \
                 {machine} is down record it with 'gmdctl down {device} {machine}' and promote again"
            ));
        }
        _ => {}
    }
    if current == PairRole::Primary && !force {
        return Ok(Promotion::Plain);
    }
    if lacks.any() {
        if !force {
            let what = if lacks.no_data {
                "holds no known data (a new or replaced volume)".to_owned()
            } else {
                format!(
                    "lacks {} region(s) it has not received from its peer",
                    lacks.not_received
                )
            };
            return Err(format!(
                "{device}: this copy {what}; let the resync finish, or, to use this copy as it \
                 is (its peer's data in those regions is then overwritten), promote with \
                 'gmdctl primary {device} --force'"
            ));
        }
        return Ok(Promotion::Forced);
    }
    Ok(if force {
        Promotion::Forced
    } else {
        Promotion::Plain
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(role: PairRole) -> PeerCondition {
        PeerCondition::Connected {
            machine: "beta".into(),
            role,
        }
    }

    #[test]
    fn one_primary_per_pair() {
        let e = may_promote(
            "d",
            PairRole::Secondary,
            &connected(PairRole::Primary),
            Lacks::default(),
            true,
        )
        .unwrap_err();
        assert!(e.contains("one primary per pair"), "{e}");
        assert!(e.contains("gmdctl secondary d"), "{e}");
        assert_eq!(
            may_promote(
                "d",
                PairRole::Secondary,
                &connected(PairRole::Secondary),
                Lacks::default(),
                false
            ),
            Ok(Promotion::Plain)
        );
    }

    #[test]
    fn apart_only_when_the_peer_is_known_down() {
        let unknown = PeerCondition::Unknown {
            machine: "beta".into(),
        };
        let e =
            may_promote("d", PairRole::Secondary, &unknown, Lacks::default(), true).unwrap_err();
        assert!(e.contains("gmdctl down d beta"), "{e}");
        let down = PeerCondition::KnownDown {
            machine: "beta".into(),
        };
        assert_eq!(
            may_promote("d", PairRole::Secondary, &down, Lacks::default(), false),
            Ok(Promotion::Plain)
        );
        assert_eq!(
            may_promote(
                "d",
                PairRole::Secondary,
                &PeerCondition::None,
                Lacks::default(),
                false
            ),
            Ok(Promotion::Plain)
        );
    }

    #[test]
    fn a_copy_that_lacks_data_needs_force() {
        let lacks = Lacks {
            no_data: false,
            not_received: 3,
        };
        let e = may_promote(
            "d",
            PairRole::Secondary,
            &connected(PairRole::Secondary),
            lacks,
            false,
        )
        .unwrap_err();
        assert!(
            e.contains("lacks 3 region(s)") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(
            may_promote(
                "d",
                PairRole::Secondary,
                &connected(PairRole::Secondary),
                lacks,
                true
            ),
            Ok(Promotion::Forced)
        );
        let blank = Lacks {
            no_data: true,
            not_received: 0,
        };
        let e =
            may_promote("d", PairRole::Secondary, &PeerCondition::None, blank, false).unwrap_err();
        assert!(e.contains("holds no known data"), "{e}");
    }

    #[test]
    fn a_split_copy_rejoins_before_anything_else() {
        let e = may_promote(
            "d",
            PairRole::Split,
            &PeerCondition::None,
            Lacks::default(),
            true,
        )
        .unwrap_err();
        assert!(e.contains("gmdctl rejoin d"), "{e}");
    }
}
