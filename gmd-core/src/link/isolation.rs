//! Site isolation: whether a primary that lost its peer may go on writing
//! alone, as pure functions the daemon asks at the loss and at every event
//! after it (a fence handler's end, `gmdctl down`).
//!
//! The reference keeps the dominant site running when the sites are
//! isolated and holds the other one: both may believe the other is down,
//! and at most one of them may write. Here:
//!
//! - A secondary writes nothing: it never holds (a later promotion while
//!   apart is the administrator's decision, checked by [`super::roles`]).
//! - async goes on as before: its writes were completed locally before the
//!   peer saw them, so the copies already differ by the backlog; holding
//!   would not keep them identical.
//! - A peer confirmed down (`gmdctl down`) releases every hold.
//! - With a fence handler configured, it runs first on either site, and the
//!   primary goes on only once it reports the peer fenced; a failed handler
//!   keeps the writes held (as DRBD's `resource-and-stonith`).
//! - Without one, the dominant site goes on (its promote-failure timeout
//!   already passed: that is when the peer was declared lost) and the other
//!   site holds until the link returns or the peer is confirmed down.
//!
//! Held writes are not failed: they wait, and complete once the hold ends.

use crate::config::Mode;

/// What decides a device's behaviour on isolation, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// This machine's site is the dominant one.
    pub dominant: bool,
    /// The device's mirroring mode.
    pub mode: Mode,
    /// A fence handler is configured for this machine.
    pub fence_handler: bool,
}

/// Where the fence handler is for the current loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Not started (or none configured).
    NotRun,
    /// Started, not finished.
    Running,
    /// It reported the peer fenced: it cannot write or be promoted.
    Fenced,
    /// It failed, timed out or could not be run.
    Failed,
}

/// Why writes are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The fence handler runs.
    Fencing,
    /// The fence handler failed: the peer may still write.
    FenceFailed,
    /// This site is not the dominant one.
    NonDominant,
}

impl Hold {
    /// A short name for status and events.
    pub fn name(self) -> &'static str {
        match self {
            Hold::Fencing => "fencing",
            Hold::FenceFailed => "fence-failed",
            Hold::NonDominant => "non-dominant",
        }
    }
}

/// What a primary that lost its peer does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write alone: unacknowledged and new writes mark their regions stale.
    GoOn,
    /// Hold writes and start the fence handler.
    RunFence,
    /// Hold writes (they stay pending) until the link returns or another
    /// event changes the verdict.
    Hold(Hold),
}

impl Verdict {
    /// Whether writes are held under this verdict.
    pub fn holds(self) -> bool {
        self != Verdict::GoOn
    }
}

/// May a device that lost its peer write alone now?
///
/// `primary`: this side takes writes; `confirmed_down`: the administrator
/// recorded the peer down since the loss (`gmdctl down`); `fence`: where
/// the fence handler is.
pub fn verdict(policy: Policy, primary: bool, confirmed_down: bool, fence: Fence) -> Verdict {
    if !primary || policy.mode == Mode::Async || confirmed_down {
        return Verdict::GoOn;
    }
    if policy.fence_handler {
        return match fence {
            Fence::NotRun => Verdict::RunFence,
            Fence::Running => Verdict::Hold(Hold::Fencing),
            Fence::Fenced => Verdict::GoOn,
            Fence::Failed => Verdict::Hold(Hold::FenceFailed),
        };
    }
    if policy.dominant {
        Verdict::GoOn
    } else {
        Verdict::Hold(Hold::NonDominant)
    }
}

/// What a fence handler's end means, following DRBD's `fence-peer` exit
/// codes: 0 (gmd's own "fenced"), 3 (the peer's disk was inconsistent
/// already), 4 (the peer was outdated) and 7 (the peer was STONITHed) say
/// the peer cannot write; 5 (the peer was not reachable), 6 (the peer is
/// primary and refused), any other code, a signal (`None`) or a timeout
/// are failures.
pub fn fence_outcome(exit_code: Option<i32>) -> Fence {
    match exit_code {
        Some(0 | 3 | 4 | 7) => Fence::Fenced,
        _ => Fence::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Mode; 3] = [Mode::Sync, Mode::Mwc, Mode::Async];
    const FENCES: [Fence; 4] = [Fence::NotRun, Fence::Running, Fence::Fenced, Fence::Failed];

    fn policy(dominant: bool, mode: Mode, fence_handler: bool) -> Policy {
        Policy {
            dominant,
            mode,
            fence_handler,
        }
    }

    #[test]
    fn without_a_handler_the_dominant_site_goes_on_and_the_other_holds() {
        for mode in [Mode::Sync, Mode::Mwc] {
            assert_eq!(
                verdict(policy(true, mode, false), true, false, Fence::NotRun),
                Verdict::GoOn
            );
            assert_eq!(
                verdict(policy(false, mode, false), true, false, Fence::NotRun),
                Verdict::Hold(Hold::NonDominant)
            );
        }
    }

    #[test]
    fn a_peer_confirmed_down_releases_every_hold() {
        for dominant in [true, false] {
            for mode in MODES {
                for handler in [true, false] {
                    for fence in FENCES {
                        assert_eq!(
                            verdict(policy(dominant, mode, handler), true, true, fence),
                            Verdict::GoOn,
                            "{dominant} {mode:?} {handler} {fence:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn async_and_secondaries_never_hold() {
        for dominant in [true, false] {
            for handler in [true, false] {
                for fence in FENCES {
                    let p = policy(dominant, Mode::Async, handler);
                    assert_eq!(verdict(p, true, false, fence), Verdict::GoOn);
                    for mode in MODES {
                        let p = policy(dominant, mode, handler);
                        assert_eq!(verdict(p, false, false, fence), Verdict::GoOn);
                    }
                }
            }
        }
    }

    #[test]
    fn a_handler_runs_first_on_both_sites_and_only_its_success_releases() {
        for dominant in [true, false] {
            for mode in [Mode::Sync, Mode::Mwc] {
                let p = policy(dominant, mode, true);
                assert_eq!(verdict(p, true, false, Fence::NotRun), Verdict::RunFence);
                assert_eq!(
                    verdict(p, true, false, Fence::Running),
                    Verdict::Hold(Hold::Fencing)
                );
                assert_eq!(verdict(p, true, false, Fence::Fenced), Verdict::GoOn);
                assert_eq!(
                    verdict(p, true, false, Fence::Failed),
                    Verdict::Hold(Hold::FenceFailed)
                );
            }
        }
    }

    #[test]
    fn fence_exit_codes_follow_drbd() {
        for code in [0, 3, 4, 7] {
            assert_eq!(fence_outcome(Some(code)), Fence::Fenced, "{code}");
        }
        for code in [1, 2, 5, 6, 8, 127, 255] {
            assert_eq!(fence_outcome(Some(code)), Fence::Failed, "{code}");
        }
        assert_eq!(fence_outcome(None), Fence::Failed);
    }

    #[test]
    fn only_go_on_releases_writes() {
        assert!(!Verdict::GoOn.holds());
        assert!(Verdict::RunFence.holds());
        assert!(Verdict::Hold(Hold::NonDominant).holds());
    }
}
