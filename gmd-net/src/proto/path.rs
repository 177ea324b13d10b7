//! One path to a peer: RTT estimation (RFC 6298), retransmission timeout with
//! backoff, congestion control ([`super::congestion`]), liveness.

use std::time::{Duration, Instant};

use super::congestion::{Cubic, RttView};
use super::mtu::PathMtu;
use crate::config::{PathConfig, Tuning};

/// Clock granularity `G` of RFC 6298.
pub(crate) const GRANULARITY: Duration = Duration::from_micros(100);

/// Smallest congestion window, in datagrams.
const CWND_MIN_DATAGRAMS: usize = 4;

/// Packets acknowledged above a missing one before it is declared lost, at
/// first (RFC 9002's kPacketThreshold).
pub(crate) const PACKET_THRESHOLD: u64 = 3;
/// The packet threshold never grows past this: reordering deeper than that
/// turns the packet rule off, and is left to the time threshold (RACK,
/// RFC 8985, relies on time alone).
const PACKET_THRESHOLD_MAX: u64 = 32;
/// The packet threshold that turns the packet rule off.
const PACKET_THRESHOLD_OFF: u64 = u64::MAX;
/// Time threshold at first: a packet is lost 1 + 1/8 round trips after it
/// was sent (RFC 9002's kTimeThreshold), in eighths of a round trip beyond
/// the first.
const REORDER_EIGHTHS_INITIAL: u32 = 1;
/// The time threshold never grows past 1 + 64/8 round trips, nor past the
/// retransmission timeout. A guest that stalls for milliseconds on a
/// sub-millisecond path needs many round trips; the timeout bounds what a
/// real loss waits.
const REORDER_EIGHTHS_MAX: u32 = 64;
/// After this many losses without a spurious one, the thresholds step back
/// toward their initial values (RFC 8985 §6.2 decays its reordering window
/// the same way).
const REORDER_DECAY_LOSSES: u32 = 64;
/// Datagrams a probe timeout lets go out beyond the congestion window
/// (RFC 9002 §6.2.4: one or two).
pub(crate) const PROBE_DATAGRAMS: u32 = 2;
/// Probe timeouts in a row, with nothing acknowledged, after which losses
/// the next acknowledgement reveals are persistent congestion.
const PERSISTENT_TIMEOUTS: u32 = 2;

/// RFC 6298 smoothed RTT estimator.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    latest: Duration,
    min: Duration,
}

impl RttEstimator {
    pub(crate) fn new() -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            latest: Duration::ZERO,
            min: Duration::MAX,
        }
    }

    /// Feeds one sample (RFC 6298 §2.2/2.3, alpha 1/8, beta 1/4).
    pub(crate) fn sample(&mut self, rtt: Duration) {
        self.latest = rtt;
        self.min = self.min.min(rtt);
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }
    pub(crate) fn rttvar(&self) -> Duration {
        self.rttvar
    }
    pub(crate) fn latest(&self) -> Duration {
        self.latest
    }
    pub(crate) fn min(&self) -> Duration {
        self.min
    }

    /// RTO = SRTT + max(G, 4·RTTVAR) + peer's maximum ack delay, clamped.
    pub(crate) fn rto(&self, t: &Tuning) -> Duration {
        match self.srtt {
            None => t.rto_initial,
            Some(srtt) => (srtt + (self.rttvar * 4).max(GRANULARITY) + t.ack_delay_max)
                .clamp(t.rto_min, t.rto_max),
        }
    }
}

/// Liveness of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathState {
    /// Not yet confirmed; used as if up until proven otherwise.
    Unknown,
    /// Acks arrive.
    Up,
    /// `path_timeouts_max` consecutive timeouts; only pinged.
    Down,
}

/// Timers of a path, indexing `Path::timers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathTimer {
    /// Loss detection: time-threshold loss or retransmission timeout.
    Loss = 0,
    /// Next ping on an idle or down path.
    Ping = 1,
}
pub(crate) const PATH_TIMER_COUNT: usize = 2;

/// One path to a peer.
#[derive(Debug)]
pub(crate) struct Path {
    pub(crate) cfg: PathConfig,
    pub(crate) state: PathState,
    pub(crate) rtt: RttEstimator,
    /// Consecutive retransmission timeouts without an ack on this path.
    pub(crate) timeouts_in_row: u32,
    /// Congestion window, bytes: a copy of `cc`'s after every change.
    pub(crate) cwnd_bytes: usize,
    /// Congestion controller.
    pub(crate) cc: Cubic,
    pub(crate) in_flight_bytes: usize,
    /// Ack-eliciting packets in flight on this path.
    pub(crate) in_flight_packets: usize,
    /// Earliest time-threshold loss deadline of packets on this path.
    pub(crate) loss_time: Option<Instant>,
    /// The retransmission timer runs from here: the first ack-eliciting send
    /// while nothing was in flight, the last newly acknowledged packet, or
    /// the last timeout. Later sends do not move it.
    pub(crate) rto_base: Option<Instant>,
    /// Largest packet number acknowledged among those sent on this path.
    pub(crate) largest_acked: Option<u64>,
    pub(crate) last_send: Option<Instant>,
    pub(crate) last_recv: Option<Instant>,
    pub(crate) timers: [Option<Instant>; PATH_TIMER_COUNT],
    /// An ack is owed on this path for packets received on it.
    pub(crate) ack_pending: bool,
    /// Ack-eliciting packets received since the last ack sent on this path.
    pub(crate) unacked_received: u32,
    /// A ping should go out at the next opportunity.
    pub(crate) ping_pending: bool,
    /// That ping goes without data, in a small datagram: after a probe
    /// timeout on a path whose datagrams are above the base, so that it
    /// passes a black hole for large ones and its acknowledgement shows
    /// them lost.
    pub(crate) ping_alone: bool,
    /// Packet threshold of loss detection, raised by reordering.
    pub(crate) packet_threshold: u64,
    /// Time threshold of loss detection: `rtt + rtt × reorder_eighths / 8`,
    /// raised by late acknowledgements.
    reorder_eighths: u32,
    /// Losses declared since the last spurious one.
    losses_since_spurious: u32,
    /// Ack-eliciting datagrams that may still go out beyond the congestion
    /// window: the probes of the last probe timeout.
    probe_budget: u32,
    /// `timeouts_in_row` as it was when the acknowledgement being processed
    /// arrived; losses it reveals after enough timeouts collapse the window.
    timeouts_before_ack: u32,
    /// Datagram size, fixed or discovered.
    pub(crate) mtu: PathMtu,
}

impl Path {
    pub(crate) fn new(cfg: PathConfig, t: &Tuning) -> Self {
        let cc = Cubic::new(
            cfg.datagram_bytes,
            t.cwnd_initial_bytes,
            CWND_MIN_DATAGRAMS * cfg.datagram_bytes,
            t.cwnd_max_bytes,
            t.cwnd_decrease_percent,
        );
        let mtu = PathMtu::discover(cfg.datagram_bytes, cfg.datagram_max);
        Path {
            cfg,
            mtu,
            state: PathState::Unknown,
            rtt: RttEstimator::new(),
            timeouts_in_row: 0,
            cwnd_bytes: cc.cwnd(),
            cc,
            in_flight_bytes: 0,
            in_flight_packets: 0,
            loss_time: None,
            rto_base: None,
            largest_acked: None,
            last_send: None,
            last_recv: None,
            timers: [None; PATH_TIMER_COUNT],
            ack_pending: false,
            unacked_received: 0,
            ping_pending: false,
            ping_alone: false,
            packet_threshold: PACKET_THRESHOLD,
            reorder_eighths: REORDER_EIGHTHS_INITIAL,
            losses_since_spurious: 0,
            probe_budget: 0,
            timeouts_before_ack: 0,
        }
    }

    /// Resets everything that belongs to a session (packet state, window).
    pub(crate) fn reset_session(&mut self, t: &Tuning) {
        self.in_flight_bytes = 0;
        self.in_flight_packets = 0;
        self.largest_acked = None;
        self.loss_time = None;
        self.rto_base = None;
        self.ack_pending = false;
        self.unacked_received = 0;
        self.timers[PathTimer::Loss as usize] = None;
        self.packet_threshold = PACKET_THRESHOLD;
        self.reorder_eighths = REORDER_EIGHTHS_INITIAL;
        self.losses_since_spurious = 0;
        self.probe_budget = 0;
        self.timeouts_before_ack = 0;
        self.mtu.on_session_reset();
        self.cc.on_session_reset(t.cwnd_initial_bytes);
        self.cwnd_bytes = self.cc.cwnd();
    }

    /// Size of data datagrams on this path now.
    pub(crate) fn datagram_bytes(&self) -> usize {
        self.mtu.current()
    }

    /// The datagram size changed: the congestion controller counts in
    /// datagrams of the new size, and its smallest window holds
    /// [`CWND_MIN_DATAGRAMS`] of them.
    pub(crate) fn datagram_size_changed(&mut self) {
        let d = self.mtu.current();
        self.cc.set_datagram(d, CWND_MIN_DATAGRAMS * d);
        self.cwnd_bytes = self.cc.cwnd();
    }

    /// Restarts the retransmission timer's reference point.
    pub(crate) fn rto_base_touch(&mut self, now: Instant) {
        self.rto_base = Some(now);
    }

    pub(crate) fn is_usable(&self) -> bool {
        self.state != PathState::Down
    }

    pub(crate) fn rto(&self, t: &Tuning) -> Duration {
        let base = self.rtt.rto(t);
        let backoff = 1u32 << self.timeouts_in_row.min(6);
        (base * backoff).min(t.rto_max)
    }

    /// Smoothed RTT used to rank paths; unmeasured paths rank as the initial RTO.
    pub(crate) fn rank_rtt(&self, t: &Tuning) -> Duration {
        self.rtt.srtt().unwrap_or(t.rto_initial)
    }

    /// Room for another datagram of `len` bytes under the congestion window,
    /// or a probe owed after a probe timeout.
    pub(crate) fn can_send(&self, len: usize) -> bool {
        self.in_flight_bytes + len <= self.cwnd_bytes || self.probe_budget > 0
    }

    /// An ack-eliciting datagram of `len` bytes went out. The retransmission
    /// timer starts only if it is not running (RFC 6298 §5.1): restarting it
    /// on every send would let a stream of sends no faster than the RTO (the
    /// periodic pings on an idle path, each unanswered on a dead one) keep it
    /// from ever expiring, so the path would never be declared down and its
    /// in-flight data never resent elsewhere.
    pub(crate) fn on_sent(&mut self, now: Instant, len: usize, ack_eliciting: bool) {
        self.last_send = Some(now);
        if ack_eliciting {
            if self.in_flight_packets == 0 {
                self.rto_base = Some(now);
            }
            self.in_flight_bytes += len;
            self.in_flight_packets += 1;
            self.probe_budget = self.probe_budget.saturating_sub(1);
        }
    }

    /// A packet that was in flight left the network (acked or lost).
    pub(crate) fn on_left_flight(&mut self, len: usize) {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(len);
        self.in_flight_packets = self.in_flight_packets.saturating_sub(1);
    }

    fn rtt_view(&self) -> RttView {
        RttView {
            latest: self.rtt.latest(),
            min: self.rtt.min(),
        }
    }

    /// Congestion response to a packet of `len` bytes sent at `sent` and
    /// acknowledged at `now` (already out of `in_flight_bytes`).
    pub(crate) fn on_ack_cc(&mut self, now: Instant, sent: Instant, len: usize) {
        // Window-limited: the flight before this ack used at least half of it.
        let limited = (self.in_flight_bytes + len) * 2 >= self.cwnd_bytes;
        let rtt = self.rtt_view();
        self.cc.on_ack(now, sent, len, rtt, limited);
        self.cwnd_bytes = self.cc.cwnd();
    }

    /// Congestion response to a loss of a packet sent at `sent` (at most
    /// one decrease per loss episode, none for a loss without a queue). A
    /// loss revealed by the first acknowledgement after
    /// [`PERSISTENT_TIMEOUTS`] probe timeouts in a row is persistent
    /// congestion (RFC 9002 §7.6): the window restarts from its minimum,
    /// once for all the losses that acknowledgement reveals.
    pub(crate) fn on_loss_cc(&mut self, now: Instant, sent: Instant) {
        if self.timeouts_before_ack >= PERSISTENT_TIMEOUTS {
            self.timeouts_before_ack = 0;
            self.cc.on_timeout(now);
        } else {
            let rtt = self.rtt_view();
            self.cc.on_loss(now, sent, rtt);
        }
        self.cwnd_bytes = self.cc.cwnd();
    }

    /// An acknowledgement arrived on some path: remembers how many probe
    /// timeouts in a row preceded it, for the losses it may reveal.
    pub(crate) fn ack_arrived(&mut self) {
        self.timeouts_before_ack = self.timeouts_in_row;
    }

    /// The acknowledgement is processed: its losses are declared.
    pub(crate) fn ack_processed(&mut self) {
        self.timeouts_before_ack = 0;
    }

    /// The larger of the smoothed and latest RTT (RFC 9002 §6.1.2).
    fn loss_rtt(&self, t: &Tuning) -> Duration {
        self.rtt
            .srtt()
            .unwrap_or(t.rto_initial)
            .max(self.rtt.latest())
    }

    /// How long after its sending an unacknowledged packet is declared lost:
    /// 9/8 of [`Self::loss_rtt`] at first, more after late acknowledgements,
    /// but not past the retransmission timeout once that is the longer.
    pub(crate) fn loss_delay(&self, t: &Tuning) -> Duration {
        let rtt = self.loss_rtt(t);
        let first = rtt + rtt / 8;
        let adapted = rtt + rtt * self.reorder_eighths / 8;
        adapted.min(self.rtt.rto(t)).max(first).max(GRANULARITY)
    }

    /// A packet of this path was declared lost at `now`, after the
    /// congestion response to it.
    pub(crate) fn on_lost(&mut self, now: Instant) {
        self.cc.note_lost(now);
        self.losses_since_spurious += 1;
        if self.losses_since_spurious >= REORDER_DECAY_LOSSES {
            self.losses_since_spurious = 0;
            self.reorder_eighths = (self.reorder_eighths / 2).max(REORDER_EIGHTHS_INITIAL);
            self.packet_threshold = if self.packet_threshold > PACKET_THRESHOLD_MAX {
                PACKET_THRESHOLD_MAX
            } else {
                (self.packet_threshold / 2).max(PACKET_THRESHOLD)
            };
        }
    }

    /// A packet sent at `sent` and declared lost at `lost_at` was
    /// acknowledged at `now` after all, with `above` packets acknowledged
    /// above it. An acknowledgement within the time threshold means the
    /// packet threshold misjudged reordering; a later one, that the time
    /// threshold was too short for this path's delays: the threshold that
    /// misfired grows just enough. The congestion response is undone when
    /// every loss since it proved spurious. Returns whether it was.
    pub(crate) fn on_spurious_loss(
        &mut self,
        now: Instant,
        sent: Instant,
        lost_at: Instant,
        above: u64,
        t: &Tuning,
    ) -> bool {
        self.losses_since_spurious = 0;
        let took = now.saturating_duration_since(sent);
        if took <= self.loss_delay(t) {
            let needed = if above < PACKET_THRESHOLD_MAX {
                above + 1
            } else {
                PACKET_THRESHOLD_OFF
            };
            self.packet_threshold = self.packet_threshold.max(needed);
        } else {
            let rtt = self.loss_rtt(t);
            if !rtt.is_zero() {
                let beyond = took.saturating_sub(rtt).as_nanos() * 8;
                let eighths = beyond
                    .div_ceil(rtt.as_nanos())
                    .min(REORDER_EIGHTHS_MAX.into());
                self.reorder_eighths = self.reorder_eighths.max(eighths as u32);
            }
        }
        let undone = self.cc.on_spurious_loss(lost_at);
        self.cwnd_bytes = self.cc.cwnd();
        undone
    }

    /// A probe timeout at `now` (RFC 9002 §6.2): nothing was acknowledged
    /// for a retransmission timeout. Nothing is declared lost and the
    /// window stays: a stalled receiver acknowledges everything late, and
    /// declaring the whole flight lost resent it all for nothing. Instead a
    /// ping and up to [`PROBE_DATAGRAMS`] datagrams go out beyond the
    /// window; their acknowledgement reveals by the usual thresholds what
    /// was really lost. The timer backs off.
    pub(crate) fn on_probe_timeout(&mut self, now: Instant) {
        self.timeouts_in_row += 1;
        self.rto_base = Some(now);
        self.ping_pending = true;
        self.ping_alone = self.mtu.is_raised();
        self.probe_budget = PROBE_DATAGRAMS;
    }

    /// The path was declared down: everything still in flight on it is
    /// lost, and its window restarts from its minimum.
    pub(crate) fn on_down_cc(&mut self, now: Instant) {
        self.probe_budget = 0;
        self.cc.on_timeout(now);
        self.cwnd_bytes = self.cc.cwnd();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6298_first_and_second_sample() {
        let t = Tuning::default();
        let mut r = RttEstimator::new();
        assert_eq!(r.rto(&t), t.rto_initial);
        r.sample(Duration::from_millis(100));
        assert_eq!(r.srtt(), Some(Duration::from_millis(100)));
        assert_eq!(r.rttvar(), Duration::from_millis(50));
        // RTO = 100 + 4*50 + ack delay
        assert_eq!(r.rto(&t), Duration::from_millis(302));
        r.sample(Duration::from_millis(200));
        // rttvar = 3/4*50 + 1/4*100 = 62.5; srtt = 7/8*100 + 1/8*200 = 112.5
        assert_eq!(r.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(r.rttvar(), Duration::from_micros(62_500));
    }

    #[test]
    fn lan_rtt_gets_the_floor_not_one_second() {
        let t = Tuning::default();
        let mut r = RttEstimator::new();
        for _ in 0..50 {
            r.sample(Duration::from_micros(200));
        }
        assert_eq!(r.rto(&t), t.rto_min);
        assert!(t.rto_min < Duration::from_millis(100));
    }

    fn path() -> Path {
        let cfg = PathConfig {
            network: crate::config::NetworkId(0),
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            datagram_bytes: 1400,
            datagram_max: 1400,
        };
        Path::new(cfg, &Tuning::default())
    }

    #[test]
    fn spurious_losses_grow_the_threshold_that_misfired_and_losses_decay_it() {
        let t = Tuning::default();
        let mut p = path();
        let ms = Duration::from_millis;
        p.rtt.sample(ms(50));
        let t0 = Instant::now();
        assert_eq!(p.loss_delay(&t), ms(50) * 9 / 8);
        // Acknowledged 30 ms after sending, within the time threshold:
        // reordering past the packet threshold, 10 packets deep.
        p.on_spurious_loss(t0 + ms(30), t0, t0 + ms(20), 9, &t);
        assert_eq!(p.packet_threshold, 10);
        assert_eq!(p.loss_delay(&t), ms(50) * 9 / 8);
        // Deeper than 32: the packet rule is off until losses bring it back.
        let mut deep = path();
        deep.rtt.sample(ms(50));
        deep.on_spurious_loss(t0 + ms(30), t0, t0 + ms(20), 40, &t);
        assert_eq!(deep.packet_threshold, u64::MAX);
        for _ in 0..REORDER_DECAY_LOSSES {
            deep.on_lost(t0);
        }
        assert_eq!(deep.packet_threshold, 32);
        // Acknowledged 70 ms after sending: the time threshold grows to
        // cover it in whole eighths (1 + 4/8 round trips), not further.
        p.on_spurious_loss(t0 + ms(70), t0, t0 + ms(57), 1, &t);
        assert_eq!(p.loss_delay(&t), ms(75));
        assert_eq!(p.packet_threshold, 10);
        // Never beyond the retransmission timeout.
        p.on_spurious_loss(t0 + ms(2000), t0, t0 + ms(57), 1, &t);
        assert_eq!(p.loss_delay(&t), p.rtt.rto(&t));
        assert!(p.loss_delay(&t) > ms(100));
        // Losses that stay losses bring both back, step by step.
        for _ in 0..REORDER_DECAY_LOSSES {
            p.on_lost(t0);
        }
        assert_eq!(p.packet_threshold, 5);
        for _ in 0..7 * REORDER_DECAY_LOSSES {
            p.on_lost(t0);
        }
        assert_eq!(p.loss_delay(&t), ms(50) * 9 / 8);
        assert_eq!(p.packet_threshold, PACKET_THRESHOLD);
    }

    #[test]
    fn a_probe_timeout_keeps_the_window_and_two_before_a_loss_collapse_it() {
        let mut p = path();
        let t0 = Instant::now();
        for i in 0..5u32 {
            p.rtt.sample(Duration::from_millis(50));
            let now = t0 + Duration::from_millis(50) * (i + 1);
            for _ in 0..p.cwnd_bytes / 1400 {
                p.in_flight_bytes = p.cwnd_bytes;
                p.on_ack_cc(now, now - Duration::from_millis(50), 1400);
            }
        }
        let before = p.cwnd_bytes;
        let now = t0 + Duration::from_secs(2);
        p.in_flight_bytes = before;
        assert!(!p.can_send(1400));
        p.on_probe_timeout(now);
        // The window stays, the timer backs off, and two probes may go out
        // beyond the full window, not three.
        assert_eq!(p.cwnd_bytes, before);
        assert_eq!(p.rto(&Tuning::default()), p.rtt.rto(&Tuning::default()) * 2);
        assert!(p.ping_pending);
        for _ in 0..PROBE_DATAGRAMS {
            assert!(p.can_send(1400));
            p.on_sent(now, 1400, true);
        }
        assert!(!p.can_send(1400));
        // The probes' acknowledgement reveals a loss after one timeout: one
        // loss (tolerated here, no queue was seen), not a collapse.
        p.ack_arrived();
        p.timeouts_in_row = 0;
        p.on_loss_cc(
            now + Duration::from_millis(50),
            now - Duration::from_millis(100),
        );
        p.ack_processed();
        assert_eq!(p.cwnd_bytes, before);
        // After two timeouts in a row, a revealed loss is persistent
        // congestion: the window restarts from its minimum.
        p.on_probe_timeout(now + Duration::from_millis(100));
        p.on_probe_timeout(now + Duration::from_millis(300));
        p.ack_arrived();
        p.timeouts_in_row = 0;
        p.on_loss_cc(now + Duration::from_millis(400), now);
        assert_eq!(p.cwnd_bytes, CWND_MIN_DATAGRAMS * 1400);
        p.ack_processed();
        // An acknowledgement that reveals nothing lost after the same two
        // timeouts (a stalled receiver) leaves the window alone.
        let mut q = path();
        let w = q.cwnd_bytes;
        q.on_probe_timeout(now);
        q.on_probe_timeout(now + Duration::from_millis(500));
        q.ack_arrived();
        q.timeouts_in_row = 0;
        q.ack_processed();
        q.on_loss_cc(
            now + Duration::from_secs(1),
            now + Duration::from_millis(900),
        );
        assert_eq!(q.cwnd_bytes, w);
    }
}
