//! The datagram size of one path: fixed by configuration, or discovered
//! (packetization-layer path-MTU discovery, RFC 8899).
//!
//! Discovery starts at a size every path of the network is expected to
//! carry (the base) and sends, one at a time, probes of a larger size: a
//! datagram padded to that size that asks for an acknowledgement. The
//! datagrams leave with the don't-fragment bit, so a hop that cannot carry
//! one drops it. An acknowledged probe raises the size data uses; a size
//! whose probe is lost [`PROBE_TRIES`] times in a row is too big. The
//! first probe tries the ceiling (the first hop's MTU, which most paths
//! carry whole); after it fails, a binary search narrows the bracket down
//! to [`SEARCH_DONE_GAP`] bytes. A complete search starts again after
//! [`RAISE_INTERVAL`], for a path that grew.
//!
//! A path that stops carrying the size it proved (a route change, a
//! tunnel) is a black hole for every full datagram: losses of datagrams
//! above the base at [`BLACK_HOLE_EVENTS`] distinct moments, with no such
//! datagram acknowledged in between, bring the size back to the base; the
//! search starts again after [`BLACK_HOLE_RETRY`]. A loss is only declared
//! when something sent later was acknowledged, so a path that carries
//! nothing at all (an outage) never looks like a black hole; after a probe
//! timeout the path's ping goes alone, small enough to pass one. A path
//! declared down starts again from the base, and searches as soon as it
//! is up. Losing a probe never touches the congestion window.
//!
//! Pure state, driven by the peer's sending and acknowledgement code.

use std::time::{Duration, Instant};

/// Largest size discovery tries: a 9 000-byte (jumbo) frame less the IPv4
/// and UDP headers. Larger datagrams save little more per byte and a lost
/// one costs more.
pub const DISCOVERY_MAX: usize = 8972;
/// Probes of one size lost in a row before the size counts as too big.
pub(crate) const PROBE_TRIES: u8 = 3;
/// The search ends when the sizes known to pass and to fail are this
/// close.
const SEARCH_DONE_GAP: usize = 32;
/// A complete search starts again after this long (RFC 8899's
/// PMTU_RAISE_TIMER).
pub(crate) const RAISE_INTERVAL: Duration = Duration::from_secs(600);
/// Loss events of datagrams above the base, with none acknowledged in
/// between, that make a black hole.
pub(crate) const BLACK_HOLE_EVENTS: u32 = 3;
/// After a black hole, the search starts again after this long.
pub(crate) const BLACK_HOLE_RETRY: Duration = Duration::from_secs(60);

/// Datagram size of a path and its discovery.
#[derive(Debug, Clone)]
pub(crate) struct PathMtu {
    /// Size every path of the network carries: the floor.
    base: usize,
    /// Largest size tried (the first hop's limit, [`DISCOVERY_MAX`] at most).
    max: usize,
    /// Size data uses now: the largest proven.
    current: usize,
    /// Smallest size known too big (`max + 1` when none is).
    too_big: usize,
    /// Size of the probe in flight.
    probing: Option<usize>,
    /// Probes of the next size lost in a row.
    failures: u8,
    /// No search before then.
    paused_until: Option<Instant>,
    /// Loss events of datagrams above the base since one was last
    /// acknowledged.
    suspicious: u32,
    /// When the last of them was counted: losses declared at one instant
    /// are one event.
    suspicious_at: Option<Instant>,
    /// Black holes seen.
    black_holes: u64,
    /// Probes sent.
    probes: u64,
}

impl PathMtu {
    /// A size set by configuration: no discovery.
    #[cfg(test)]
    pub(crate) fn fixed(bytes: usize) -> Self {
        PathMtu::discover(bytes, bytes)
    }

    /// Discovery between `base` and `max` (a fixed size when equal).
    pub(crate) fn discover(base: usize, max: usize) -> Self {
        let max = max.max(base);
        PathMtu {
            base,
            max,
            current: base,
            too_big: max + 1,
            probing: None,
            failures: 0,
            paused_until: None,
            suspicious: 0,
            suspicious_at: None,
            black_holes: 0,
            probes: 0,
        }
    }

    /// Limits every size to `limit` (what the first hop carries whole).
    pub(crate) fn cap(&mut self, limit: usize) {
        self.base = self.base.min(limit);
        self.max = self.max.min(limit);
        self.current = self.current.min(limit);
        self.too_big = self.too_big.min(self.max + 1);
        self.probing = None;
    }

    /// Size of data datagrams now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Largest size this path may ever use.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Black holes seen so far.
    pub(crate) fn black_holes(&self) -> u64 {
        self.black_holes
    }

    /// Whether data datagrams are above the base now.
    pub(crate) fn is_raised(&self) -> bool {
        self.current > self.base
    }

    /// Whether a datagram of `len` bytes could be lost to a black hole
    /// (it is larger than the base).
    pub(crate) fn is_large(&self, len: usize) -> bool {
        len > self.base
    }

    /// The size to probe next, when the search is not over.
    fn next_size(&self) -> Option<usize> {
        let top = self.too_big - 1;
        if top <= self.current || self.too_big - self.current <= SEARCH_DONE_GAP {
            return None;
        }
        if self.too_big > self.max {
            // Nothing failed yet: the ceiling first, most paths carry it.
            return Some(self.max);
        }
        Some(self.current + (self.too_big - self.current) / 2)
    }

    /// Size of a probe to send now, if one is due.
    pub(crate) fn probe_due(&self, now: Instant) -> Option<usize> {
        if self.probing.is_some() || self.paused_until.is_some_and(|u| now < u) {
            return None;
        }
        self.next_size()
    }

    /// Probes sent so far.
    pub(crate) fn probes(&self) -> u64 {
        self.probes
    }

    /// A probe of `size` bytes went out.
    pub(crate) fn on_probe_sent(&mut self, size: usize) {
        self.probes += 1;
        self.probing = Some(size);
    }

    /// The probe of `size` bytes was acknowledged: data may use that size.
    pub(crate) fn on_probe_acked(&mut self, now: Instant, size: usize) {
        self.probing = None;
        self.failures = 0;
        if size > self.current && size < self.too_big {
            self.current = size;
        }
        self.pause_if_done(now);
    }

    /// The probe of `size` bytes was lost.
    pub(crate) fn on_probe_lost(&mut self, now: Instant, size: usize) {
        self.probing = None;
        if size >= self.too_big || size <= self.current {
            return;
        }
        self.failures += 1;
        if self.failures >= PROBE_TRIES {
            self.failures = 0;
            self.too_big = size;
            self.pause_if_done(now);
        }
    }

    fn pause_if_done(&mut self, now: Instant) {
        if self.next_size().is_none() {
            self.paused_until = Some(now + RAISE_INTERVAL);
            // The next search, once due, tries the ceiling again.
            self.too_big = self.max + 1;
        } else {
            self.paused_until = None;
        }
    }

    /// A data datagram above the base was acknowledged: the size passes.
    pub(crate) fn on_large_acked(&mut self) {
        self.suspicious = 0;
    }

    /// Datagrams above the base were declared lost at `now`. Returns
    /// whether that makes a black hole (the size is back to the base).
    pub(crate) fn on_large_lost(&mut self, now: Instant) -> bool {
        if self.current <= self.base || self.suspicious_at == Some(now) {
            return false;
        }
        self.suspicious_at = Some(now);
        self.suspicious += 1;
        if self.suspicious < BLACK_HOLE_EVENTS {
            return false;
        }
        self.restart(Some(now + BLACK_HOLE_RETRY));
        self.black_holes += 1;
        true
    }

    /// The path was declared down: back to the base, searching again as
    /// soon as it carries anything.
    pub(crate) fn on_path_down(&mut self) {
        self.restart(None);
    }

    fn restart(&mut self, paused_until: Option<Instant>) {
        self.current = self.base;
        self.too_big = self.max + 1;
        self.probing = None;
        self.failures = 0;
        self.suspicious = 0;
        self.suspicious_at = None;
        self.paused_until = paused_until;
    }

    /// The session ended: its packets, the probe among them, are gone.
    /// What the path carries stays known.
    pub(crate) fn on_session_reset(&mut self) {
        self.probing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs probes against a path that carries `carries` bytes until the
    /// search is over; returns the probes sent.
    fn search(m: &mut PathMtu, now: Instant, carries: usize) -> Vec<usize> {
        let mut sent = Vec::new();
        while let Some(size) = m.probe_due(now) {
            m.on_probe_sent(size);
            assert_eq!(m.probe_due(now), None, "one probe at a time");
            sent.push(size);
            if size <= carries {
                m.on_probe_acked(now, size);
            } else {
                m.on_probe_lost(now, size);
            }
            assert!(sent.len() < 100, "the search does not end: {sent:?}");
        }
        sent
    }

    #[test]
    fn a_path_that_carries_the_ceiling_takes_one_probe() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, 1472);
        assert_eq!(m.current(), 1400);
        assert_eq!(search(&mut m, now, 1472), vec![1472]);
        assert_eq!(m.current(), 1472);
    }

    #[test]
    fn a_smaller_hop_is_found_within_the_gap_and_never_exceeded() {
        let now = Instant::now();
        for carries in [1400, 1401, 1500, 4000, 8000, 8971] {
            let mut m = PathMtu::discover(1400, DISCOVERY_MAX);
            let probes = search(&mut m, now, carries);
            assert!(m.current() <= carries, "{carries}: {}", m.current());
            assert!(
                carries - m.current() <= SEARCH_DONE_GAP,
                "{carries}: stopped at {} after {probes:?}",
                m.current()
            );
            // Each size too big was tried PROBE_TRIES times, never more.
            let lost = probes.iter().filter(|&&p| p > carries).count();
            assert_eq!(lost % PROBE_TRIES as usize, 0, "{probes:?}");
            assert!(probes.len() <= 60, "{carries}: {} probes", probes.len());
        }
    }

    #[test]
    fn a_lost_probe_is_tried_again_before_the_size_counts_as_too_big() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, 1472);
        m.on_probe_sent(1472);
        m.on_probe_lost(now, 1472);
        assert_eq!(m.probe_due(now), Some(1472));
        m.on_probe_sent(1472);
        m.on_probe_acked(now, 1472);
        assert_eq!(m.current(), 1472);
    }

    #[test]
    fn a_fixed_size_never_probes_nor_changes() {
        let now = Instant::now();
        let mut m = PathMtu::fixed(8192);
        assert_eq!(m.probe_due(now), None);
        for k in 0..10 {
            assert!(!m.on_large_lost(now + Duration::from_secs(k)));
        }
        m.on_path_down();
        assert_eq!(m.current(), 8192);
        assert_eq!(m.probe_due(now), None);
    }

    #[test]
    fn the_search_starts_again_after_the_raise_interval() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, DISCOVERY_MAX);
        search(&mut m, now, 3000);
        let found = m.current();
        assert_eq!(
            m.probe_due(now + RAISE_INTERVAL - Duration::from_secs(1)),
            None
        );
        // The path grew meanwhile: the ceiling passes now.
        let later = now + RAISE_INTERVAL;
        assert_eq!(search(&mut m, later, DISCOVERY_MAX), vec![DISCOVERY_MAX]);
        assert!(m.current() > found);
    }

    #[test]
    fn a_black_hole_takes_three_events_without_an_acknowledgement() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut m = PathMtu::discover(1400, 1472);
        search(&mut m, now, 1472);
        // Losses at one instant are one event; an acknowledged large
        // datagram clears the count (congestion, not a black hole).
        assert!(!m.on_large_lost(now + s(1)));
        assert!(!m.on_large_lost(now + s(1)));
        assert!(!m.on_large_lost(now + s(2)));
        m.on_large_acked();
        assert!(!m.on_large_lost(now + s(3)));
        assert!(!m.on_large_lost(now + s(4)));
        assert_eq!(m.current(), 1472);
        assert!(m.on_large_lost(now + s(5)));
        assert_eq!(m.current(), 1400);
        assert_eq!(m.black_holes(), 1);
        // No probe for a while, then the search starts over.
        assert_eq!(m.probe_due(now + s(6)), None);
        assert_eq!(m.probe_due(now + s(5) + BLACK_HOLE_RETRY), Some(1472));
        // At the base there is nothing to fall from.
        assert!(!m.on_large_lost(now + s(7)));
    }

    #[test]
    fn a_path_down_searches_again_as_soon_as_it_is_up() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, 1472);
        search(&mut m, now, 1472);
        m.on_probe_sent(1472); // (a stray probe while the search is paused)
        m.on_path_down();
        assert_eq!(m.current(), 1400);
        assert_eq!(m.probe_due(now), Some(1472));
    }

    #[test]
    fn the_first_hop_caps_every_size() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, DISCOVERY_MAX);
        m.cap(1252);
        assert_eq!(m.current(), 1252);
        assert_eq!(m.max(), 1252);
        assert_eq!(m.probe_due(now), None);
        let mut m = PathMtu::discover(1400, DISCOVERY_MAX);
        m.cap(1472);
        assert_eq!(search(&mut m, now, 1472), vec![1472]);
    }

    #[test]
    fn a_session_reset_forgets_the_probe_but_not_the_size() {
        let now = Instant::now();
        let mut m = PathMtu::discover(1400, 4000);
        search(&mut m, now, 2000);
        let found = m.current();
        m.on_session_reset();
        assert_eq!(m.current(), found);
        let mut m = PathMtu::discover(1400, 4000);
        m.on_probe_sent(4000);
        m.on_session_reset();
        assert_eq!(m.probe_due(now), Some(4000));
    }
}
