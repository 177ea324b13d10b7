//! One path to a peer: RTT estimation (RFC 6298), retransmission timeout with
//! backoff, congestion control ([`super::congestion`]), liveness.

use std::time::{Duration, Instant};

use super::congestion::{Cubic, RttView};
use crate::config::{PathConfig, Tuning};

/// Clock granularity `G` of RFC 6298.
pub(crate) const GRANULARITY: Duration = Duration::from_micros(100);

/// Smallest congestion window, in datagrams.
const CWND_MIN_DATAGRAMS: usize = 4;

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
        Path {
            cfg,
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
        self.cc.on_session_reset(t.cwnd_initial_bytes);
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

    /// Room for another datagram of `len` bytes under the congestion window.
    pub(crate) fn can_send(&self, len: usize) -> bool {
        self.in_flight_bytes + len <= self.cwnd_bytes
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
    /// one decrease per loss episode, none for a loss without a queue).
    pub(crate) fn on_loss_cc(&mut self, now: Instant, sent: Instant) {
        let rtt = self.rtt_view();
        self.cc.on_loss(now, sent, rtt);
        self.cwnd_bytes = self.cc.cwnd();
    }

    /// Congestion response to a retransmission timeout. The first one in a
    /// row counts as one loss (a lost tail: the last datagrams of a flight,
    /// or their acks, which no later ack can reveal); only a second one in a
    /// row — nothing acknowledged for two timeouts, persistent congestion in
    /// RFC 9002's terms — restarts the window from its minimum. Collapsing on
    /// every tail loss left a long path at 0.5 % random loss in a cycle of
    /// timeouts and slow starts.
    pub(crate) fn on_timeout_cc(&mut self, now: Instant) {
        if self.timeouts_in_row == 0 {
            let rtt = self.rtt_view();
            let sent = self.rto_base.unwrap_or(now);
            self.cc.on_loss(now, sent, rtt);
        } else {
            self.cc.on_timeout(now);
        }
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
        };
        Path::new(cfg, &Tuning::default())
    }

    #[test]
    fn first_timeout_in_a_row_is_one_loss_the_second_collapses() {
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
        p.rto_base_touch(now - Duration::from_millis(100));
        p.on_timeout_cc(now);
        // No queue seen: a tolerated loss, the window stays.
        assert_eq!(p.cwnd_bytes, before);
        p.timeouts_in_row = 1;
        p.on_timeout_cc(now + Duration::from_millis(200));
        assert_eq!(p.cwnd_bytes, CWND_MIN_DATAGRAMS * 1400);
    }
}
