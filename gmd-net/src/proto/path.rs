//! One path to a peer: RTT estimation (RFC 6298), retransmission timeout with
//! backoff, AIMD congestion control, liveness.

use std::time::{Duration, Instant};

use crate::config::{PathConfig, Tuning};

/// Clock granularity `G` of RFC 6298.
pub(crate) const GRANULARITY: Duration = Duration::from_micros(100);

/// Smallest congestion window, in datagrams.
const CWND_MIN_DATAGRAMS: usize = 4;

/// Bounds of the RTT increase that ends slow start (RFC 9406).
const HYSTART_RTT_THRESH_MIN: Duration = Duration::from_millis(4);
const HYSTART_RTT_THRESH_MAX: Duration = Duration::from_millis(16);

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
    pub(crate) cwnd_bytes: usize,
    pub(crate) ssthresh_bytes: usize,
    pub(crate) in_flight_bytes: usize,
    /// Ack-eliciting packets in flight on this path.
    pub(crate) in_flight_packets: usize,
    /// Bytes acknowledged in congestion avoidance toward the next increase.
    pub(crate) acked_accum_bytes: usize,
    /// Packets sent before this time belong to the current recovery period.
    pub(crate) recovery_start: Option<Instant>,
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
        Path {
            cfg,
            state: PathState::Unknown,
            rtt: RttEstimator::new(),
            timeouts_in_row: 0,
            cwnd_bytes: t.cwnd_initial_bytes,
            ssthresh_bytes: usize::MAX,
            in_flight_bytes: 0,
            in_flight_packets: 0,
            acked_accum_bytes: 0,
            recovery_start: None,
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
        self.recovery_start = None;
        self.loss_time = None;
        self.rto_base = None;
        self.ack_pending = false;
        self.unacked_received = 0;
        self.timers[PathTimer::Loss as usize] = None;
        self.cwnd_bytes = self
            .cwnd_bytes
            .min(t.cwnd_initial_bytes.max(self.cwnd_bytes / 2));
        self.acked_accum_bytes = 0;
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

    /// Smallest congestion window: enough datagrams that a single loss can
    /// still be detected by the packets after it rather than a timeout.
    pub(crate) fn min_cwnd(&self) -> usize {
        CWND_MIN_DATAGRAMS * self.cfg.datagram_bytes
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

    /// Congestion response to an acknowledged packet sent at `sent`.
    pub(crate) fn on_ack_cc(&mut self, sent: Instant, len: usize, t: &Tuning) {
        if self.recovery_start.is_some_and(|r| sent <= r) {
            return;
        }
        if self.cwnd_bytes < self.ssthresh_bytes {
            // Leave slow start once the RTT shows a standing queue (the
            // delay-increase test of HyStart++, RFC 9406), before a burst
            // overflows a buffer and costs a retransmission timeout.
            let min = self.rtt.min();
            let thresh = (min / 8).clamp(HYSTART_RTT_THRESH_MIN, HYSTART_RTT_THRESH_MAX);
            if self.rtt.srtt().is_some() && self.rtt.latest() >= min + thresh {
                self.ssthresh_bytes = self.cwnd_bytes;
            } else {
                self.cwnd_bytes += len;
            }
        } else {
            // Additive increase: one datagram per window acknowledged.
            self.acked_accum_bytes += len;
            if self.acked_accum_bytes >= self.cwnd_bytes {
                self.acked_accum_bytes -= self.cwnd_bytes;
                self.cwnd_bytes += self.cfg.datagram_bytes;
            }
        }
        self.cwnd_bytes = self.cwnd_bytes.min(t.cwnd_max_bytes);
    }

    /// Congestion response to a loss of a packet sent at `sent`: one
    /// multiplicative decrease per round trip.
    pub(crate) fn on_loss_cc(&mut self, now: Instant, sent: Instant, t: &Tuning) {
        if self.recovery_start.is_some_and(|r| sent <= r) {
            return;
        }
        self.recovery_start = Some(now);
        let kept = self.cwnd_bytes / 100 * t.cwnd_decrease_percent as usize;
        self.cwnd_bytes = kept.max(self.min_cwnd());
        self.ssthresh_bytes = self.cwnd_bytes;
        self.acked_accum_bytes = 0;
    }

    /// Congestion response to a retransmission timeout.
    pub(crate) fn on_timeout_cc(&mut self, now: Instant) {
        self.ssthresh_bytes = (self.cwnd_bytes / 2).max(self.min_cwnd());
        self.cwnd_bytes = self.min_cwnd();
        self.recovery_start = Some(now);
        self.acked_accum_bytes = 0;
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
}
