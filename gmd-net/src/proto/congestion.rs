//! Congestion control of one path, sans-IO: CUBIC (RFC 9438) with the
//! slow-start exit of HyStart++ (RFC 9406), and a tolerance of random loss.
//!
//! The path calls [`Cubic::on_ack`] for every acknowledged datagram,
//! [`Cubic::on_loss`] for every datagram declared lost and
//! [`Cubic::on_timeout`] on a retransmission timeout; it sends while its
//! bytes in flight stay under [`Cubic::cwnd`].
//!
//! Why CUBIC: the former Reno-like controller grew by one datagram per round
//! trip after a loss, so at 50 ms and 200 Mbit/s (a bandwidth-delay product
//! of ~900 datagrams) one early slow-start exit took ~45 s to reach the
//! link rate. CUBIC's growth depends on the time since the last decrease,
//! not on the round trip, and it converges with a TCP stream on the same
//! link (same decrease factor, same shape).
//!
//! Random loss: a loss-based controller gives up most of a long path at a
//! fraction of a percent of random loss (Mathis: rate ≈ 1.22·MSS/(RTT·√p)).
//! A loss that comes while the path shows no queue — the smallest round trip
//! of this round and the last within the HyStart threshold of the minimum
//! (the smallest, so that a late sample from a busy host is not a queue; a
//! full drop-tail queue delays every sample) — and while recent loss stays
//! under [`TOLERATED_LOSS_FRACTION`] (or [`TOLERATED_LOSSES`] datagrams, for
//! small windows) cannot be this flow's queue overflowing;
//! the window is kept ([`Cubic::tolerated_losses`] counts them). Once the
//! queue builds (another flow, or this one past the path's capacity) every
//! loss is a congestion event as in RFC 9438, so the fair share with TCP
//! stays that of two CUBIC flows. Reordering taken for loss is tolerated the
//! same way: it comes without a queue.
//!
//! Slow start ends when the smallest of the last [`RECENT_SAMPLES`] RTT
//! samples shows a queue, not only when a whole round's minimum does: a
//! doubling window overfills a drop-tail queue in the round the queue forms,
//! and the overshoot (two BDP, hundreds of datagrams dropped) took the link
//! from a TCP stream started at the same time for the rest of its run.
//! Conservative slow start ends in avoidance when the queue keeps growing.
//!
//! Spurious loss: packet numbers are never reused, so an acknowledgement of
//! a datagram already declared lost proves it arrived (a late acknowledgement
//! from a stalled receiver, or reordering). When every datagram declared
//! lost since the last decrease turns out to have arrived,
//! [`Cubic::on_spurious_loss`] undoes that decrease (as Linux TCP's undo
//! does with DSACK or timestamps; F-RTO for timeouts, RFC 5682).

use std::time::{Duration, Instant};

/// CUBIC's scaling constant C, in datagrams per second cubed (RFC 9438 §4.1).
const CUBIC_C: f64 = 0.4;
/// Round-trip samples per round before HyStart++ judges the round (N_RTT_SAMPLE).
const HYSTART_SAMPLES_MIN: u32 = 8;
/// Bounds of the RTT increase that ends slow start (RFC 9406).
const HYSTART_RTT_THRESH_MIN: Duration = Duration::from_millis(4);
const HYSTART_RTT_THRESH_MAX: Duration = Duration::from_millis(16);
/// RTT samples whose minimum is the current view of the queue.
const RECENT_SAMPLES: usize = 8;
/// Conservative slow start grows this many times slower than slow start.
const CSS_GROWTH_DIVISOR: usize = 4;
/// Rounds of conservative slow start before congestion avoidance.
const CSS_ROUNDS: u32 = 5;
/// Above this fraction of datagrams lost over the last two rounds, every
/// loss is a congestion event whatever the round trip says (BBRv2's 2 %).
pub(crate) const TOLERATED_LOSS_FRACTION: f64 = 0.02;
/// However small the window, this many datagrams lost over the last two
/// rounds may still be random loss.
pub(crate) const TOLERATED_LOSSES: u64 = 2;

/// The round-trip figures of the path the controller reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RttView {
    /// Latest sample.
    pub(crate) latest: Duration,
    /// Smallest sample seen.
    pub(crate) min: Duration,
}

impl RttView {
    /// The queueing delay that counts as a queue: min/8 within 4..16 ms.
    fn queue_threshold(&self) -> Duration {
        (self.min / 8).clamp(HYSTART_RTT_THRESH_MIN, HYSTART_RTT_THRESH_MAX)
    }
    /// Whether `sample` shows a standing queue.
    fn queued(&self, sample: Duration) -> bool {
        self.min != Duration::MAX
            && sample != Duration::MAX
            && sample >= self.min + self.queue_threshold()
    }
}

/// Phase of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Exponential growth.
    SlowStart,
    /// HyStart++'s conservative slow start, entered when the RTT rose;
    /// `baseline` is the round minimum that triggered it.
    Conservative { baseline: Duration, rounds: u32 },
    /// CUBIC's window function.
    Avoidance,
}

/// The controller's state before its last decrease, kept while every loss
/// declared since may still prove spurious.
#[derive(Debug, Clone)]
struct Undo {
    /// When the decrease happened.
    at: Instant,
    cwnd: usize,
    ssthresh: usize,
    phase: Phase,
    w_max: f64,
    k: f64,
    /// Datagrams declared lost since the decrease (the one that caused it
    /// included), and how many of them were acknowledged after all.
    lost: u64,
    spurious: u64,
}

/// CUBIC congestion controller of one path (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct Cubic {
    datagram: usize,
    min_cwnd: usize,
    max_cwnd: usize,
    /// Multiplicative decrease: window kept after a congestion event.
    beta: f64,
    cwnd: usize,
    ssthresh: usize,
    phase: Phase,
    /// Window before the last reduction, bytes (W_max).
    w_max: f64,
    /// Time from the epoch start to reach `w_max`, seconds.
    k: f64,
    /// Start of the current congestion-avoidance epoch.
    epoch_start: Option<Instant>,
    /// Reno-friendly window estimate, bytes (W_est).
    w_est: f64,
    /// Datagrams sent before this belong to the current recovery period:
    /// their loss does not decrease the window again.
    recovery_start: Option<Instant>,
    /// A round ends when a datagram sent at or after this is acknowledged.
    round_start: Option<Instant>,
    round_min_rtt: Duration,
    last_round_min_rtt: Duration,
    round_samples: u32,
    /// The last [`RECENT_SAMPLES`] RTT samples, a ring filled in order
    /// (`Duration::MAX` where none yet), `recent_next` the oldest.
    recent: [Duration; RECENT_SAMPLES],
    recent_next: usize,
    /// Datagrams acknowledged and lost in this round and the last.
    round_acked: [u64; 2],
    round_lost: [u64; 2],
    tolerated: u64,
    congestion_events: u64,
    undo: Option<Undo>,
    undone: u64,
}

impl Cubic {
    /// A controller for datagrams of `datagram` bytes, starting at
    /// `initial` bytes, never below `min_cwnd` nor above `max_cwnd`, keeping
    /// `decrease_percent` of the window on a congestion event.
    pub(crate) fn new(
        datagram: usize,
        initial: usize,
        min_cwnd: usize,
        max_cwnd: usize,
        decrease_percent: u32,
    ) -> Self {
        Cubic {
            datagram,
            min_cwnd,
            max_cwnd,
            beta: f64::from(decrease_percent) / 100.0,
            cwnd: initial.clamp(min_cwnd, max_cwnd),
            ssthresh: usize::MAX,
            phase: Phase::SlowStart,
            w_max: 0.0,
            k: 0.0,
            epoch_start: None,
            w_est: 0.0,
            recovery_start: None,
            round_start: None,
            round_min_rtt: Duration::MAX,
            last_round_min_rtt: Duration::MAX,
            round_samples: 0,
            recent: [Duration::MAX; RECENT_SAMPLES],
            recent_next: 0,
            round_acked: [0; 2],
            round_lost: [0; 2],
            tolerated: 0,
            congestion_events: 0,
            undo: None,
            undone: 0,
        }
    }

    /// Datagrams are `datagram` bytes from now on, and the window never
    /// below `min_cwnd` (nor above its maximum).
    pub(crate) fn set_datagram(&mut self, datagram: usize, min_cwnd: usize) {
        self.datagram = datagram;
        self.min_cwnd = min_cwnd.min(self.max_cwnd);
        self.cwnd = self.cwnd.max(self.min_cwnd);
    }

    /// Congestion window, bytes.
    pub(crate) fn cwnd(&self) -> usize {
        self.cwnd
    }
    /// Slow-start threshold, bytes (`usize::MAX` before the first exit).
    #[cfg(test)]
    pub(crate) fn ssthresh(&self) -> usize {
        self.ssthresh
    }
    /// Current phase.
    #[cfg(test)]
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }
    /// Losses that left the window as it was (no queue, little loss).
    #[cfg(test)]
    pub(crate) fn tolerated_losses(&self) -> u64 {
        self.tolerated
    }
    /// Multiplicative decreases so far (losses and timeouts).
    #[cfg(test)]
    pub(crate) fn congestion_events(&self) -> u64 {
        self.congestion_events
    }
    /// Decreases undone because their losses proved spurious.
    pub(crate) fn undone(&self) -> u64 {
        self.undone
    }

    fn in_recovery(&self, sent: Instant) -> bool {
        self.recovery_start.is_some_and(|r| sent <= r)
    }

    fn next_round(&mut self, now: Instant) {
        self.round_start = Some(now);
        self.last_round_min_rtt = self.round_min_rtt;
        self.round_min_rtt = Duration::MAX;
        self.round_samples = 0;
        self.round_acked = [0, self.round_acked[0]];
        self.round_lost = [0, self.round_lost[0]];
        if let Phase::Conservative { baseline, rounds } = self.phase {
            if rounds + 1 >= CSS_ROUNDS {
                self.enter_avoidance();
            } else {
                self.phase = Phase::Conservative {
                    baseline,
                    rounds: rounds + 1,
                };
            }
        }
    }

    fn enter_avoidance(&mut self) {
        self.ssthresh = self.cwnd;
        self.phase = Phase::Avoidance;
        self.epoch_start = None;
    }

    /// Whether the datagrams lost over this round and the last may be
    /// random loss: few, or a small fraction.
    fn recent_loss_small(&self) -> bool {
        let lost = self.round_lost[0] + self.round_lost[1];
        let total = lost + self.round_acked[0] + self.round_acked[1];
        lost <= TOLERATED_LOSSES || lost as f64 <= TOLERATED_LOSS_FRACTION * total as f64
    }

    /// The smallest round trip of this round and the last (the latest
    /// sample when neither has one).
    fn recent_min_rtt(&self, rtt: RttView) -> Duration {
        let m = self.round_min_rtt.min(self.last_round_min_rtt);
        if m == Duration::MAX { rtt.latest } else { m }
    }

    /// The smallest of the last [`RECENT_SAMPLES`] round trips, once there
    /// are that many: a forming queue delays every one of them, a busy host
    /// only some.
    fn last_samples_min_rtt(&self) -> Option<Duration> {
        (self.recent[RECENT_SAMPLES - 1] != Duration::MAX)
            .then(|| self.recent.iter().copied().min().expect("not empty"))
    }

    /// `len` bytes sent at `sent` were acknowledged at `now`. `rtt` is the
    /// path's view including this ack's sample; `cwnd_limited` whether the
    /// sender was using at least half the window (an application-limited
    /// sender does not grow it, RFC 9438 §5.8).
    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        len: usize,
        rtt: RttView,
        cwnd_limited: bool,
    ) {
        if self.round_start.is_none_or(|r| sent >= r) {
            self.next_round(now);
        }
        self.round_acked[0] += 1;
        if rtt.latest > Duration::ZERO {
            self.round_min_rtt = self.round_min_rtt.min(rtt.latest);
            self.round_samples += 1;
            self.recent[self.recent_next] = rtt.latest;
            self.recent_next = (self.recent_next + 1) % RECENT_SAMPLES;
        }
        if self.in_recovery(sent) {
            return;
        }
        if !cwnd_limited {
            // The epoch restarts from the window actually used when the
            // sender comes back.
            self.epoch_start = None;
            return;
        }
        match self.phase {
            Phase::SlowStart => {
                self.cwnd += len;
                if self.round_samples >= HYSTART_SAMPLES_MIN
                    && self.last_round_min_rtt != Duration::MAX
                    && self.round_min_rtt != Duration::MAX
                {
                    let thresh = (self.last_round_min_rtt / 8)
                        .clamp(HYSTART_RTT_THRESH_MIN, HYSTART_RTT_THRESH_MAX);
                    // The round's minimum (RFC 9406) sees a queue only a
                    // round after it formed, when a doubling window has
                    // overfilled it; the recent samples see it form.
                    let now_rtt = self
                        .round_min_rtt
                        .max(self.last_samples_min_rtt().unwrap_or(Duration::ZERO));
                    if now_rtt >= self.last_round_min_rtt + thresh {
                        self.phase = Phase::Conservative {
                            baseline: now_rtt,
                            rounds: 0,
                        };
                    }
                }
                if self.cwnd >= self.ssthresh {
                    self.enter_avoidance();
                }
            }
            Phase::Conservative { baseline, rounds } => {
                self.cwnd += len / CSS_GROWTH_DIVISOR;
                // The queue keeps growing: this is the path's capacity.
                let thresh = (baseline / 8).clamp(HYSTART_RTT_THRESH_MIN, HYSTART_RTT_THRESH_MAX);
                if self
                    .last_samples_min_rtt()
                    .is_some_and(|m| m >= baseline + thresh)
                {
                    self.enter_avoidance();
                } else if rounds >= 1
                    && self.round_samples >= HYSTART_SAMPLES_MIN
                    && self.round_min_rtt < baseline
                {
                    // The RTT came back down: the rise was not a queue.
                    self.phase = Phase::SlowStart;
                }
            }
            Phase::Avoidance => self.avoidance(now, len, rtt),
        }
        self.cwnd = self.cwnd.min(self.max_cwnd);
    }

    fn avoidance(&mut self, now: Instant, len: usize, rtt: RttView) {
        let mss = self.datagram as f64;
        let cwnd = self.cwnd as f64;
        let epoch = match self.epoch_start {
            Some(e) => e,
            None => {
                self.epoch_start = Some(now);
                if cwnd < self.w_max {
                    self.k = ((self.w_max - cwnd) / mss / CUBIC_C).cbrt();
                } else {
                    self.k = 0.0;
                    self.w_max = cwnd;
                }
                self.w_est = cwnd;
                now
            }
        };
        // Target one round trip ahead (RFC 9438 §4.2), within 1.5× the window.
        let ahead = if rtt.min == Duration::MAX {
            0.0
        } else {
            rtt.min.as_secs_f64()
        };
        let t = now.saturating_duration_since(epoch).as_secs_f64() + ahead - self.k;
        let w_cubic = CUBIC_C * t * t * t * mss + self.w_max;
        let target = w_cubic.clamp(cwnd, 1.5 * cwnd);
        // Reno-friendly estimate (RFC 9438 §4.3).
        let alpha = if self.w_est >= self.w_max {
            1.0
        } else {
            3.0 * (1.0 - self.beta) / (1.0 + self.beta)
        };
        self.w_est += alpha * mss * len as f64 / cwnd;
        let next = if w_cubic < self.w_est {
            self.w_est
        } else {
            cwnd + (target - cwnd) * len as f64 / cwnd
        };
        self.cwnd = (next as usize).max(self.cwnd);
    }

    /// A datagram of the path sent at `sent` was declared lost at `now`.
    pub(crate) fn on_loss(&mut self, now: Instant, sent: Instant, rtt: RttView) {
        self.round_lost[0] += 1;
        if self.in_recovery(sent) {
            return;
        }
        if !rtt.queued(self.recent_min_rtt(rtt)) && self.recent_loss_small() {
            self.tolerated += 1;
            return;
        }
        self.congestion_event(now);
    }

    /// A datagram was declared lost at `lost_at`, after the controller's
    /// response to it: it counts against undoing the last decrease.
    pub(crate) fn note_lost(&mut self, lost_at: Instant) {
        if let Some(u) = &mut self.undo
            && lost_at >= u.at
        {
            u.lost += 1;
        }
    }

    /// A datagram declared lost at `lost_at` was acknowledged after all.
    /// When every loss declared since the last decrease has proved spurious,
    /// the decrease is undone (the window and threshold come back, never
    /// lower than they are now). Returns whether it was.
    pub(crate) fn on_spurious_loss(&mut self, lost_at: Instant) -> bool {
        let Some(u) = &mut self.undo else {
            return false;
        };
        if lost_at < u.at {
            return false;
        }
        u.spurious += 1;
        if u.spurious < u.lost {
            return false;
        }
        let u = self.undo.take().expect("checked above");
        self.cwnd = self.cwnd.max(u.cwnd);
        self.ssthresh = self.ssthresh.max(u.ssthresh);
        self.phase = u.phase;
        self.w_max = u.w_max;
        self.k = u.k;
        self.epoch_start = None;
        self.recovery_start = None;
        self.undone += 1;
        true
    }

    fn congestion_event(&mut self, now: Instant) {
        self.undo = Some(Undo {
            at: now,
            cwnd: self.cwnd,
            ssthresh: self.ssthresh,
            phase: self.phase,
            w_max: self.w_max,
            k: self.k,
            lost: 0,
            spurious: 0,
        });
        self.congestion_events += 1;
        self.recovery_start = Some(now);
        let cwnd = self.cwnd as f64;
        // Fast convergence (RFC 9438 §4.7): a flow whose window keeps
        // shrinking releases bandwidth to newer flows.
        self.w_max = if cwnd < self.w_max {
            cwnd * (1.0 + self.beta) / 2.0
        } else {
            cwnd
        };
        self.cwnd = ((cwnd * self.beta) as usize).max(self.min_cwnd);
        self.ssthresh = self.cwnd;
        self.phase = Phase::Avoidance;
        self.epoch_start = None;
    }

    /// Retransmission timeout at `now`: everything in flight is taken as
    /// lost, the window restarts from its minimum in slow start up to the
    /// reduced threshold.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        // Undo goes back to before the first of consecutive decreases.
        let before = self.undo.clone().filter(|u| u.spurious < u.lost);
        self.congestion_event(now);
        if before.is_some() {
            self.undo = before;
        }
        self.cwnd = self.min_cwnd;
        self.phase = Phase::SlowStart;
    }

    /// A new session with the peer: the window is kept at most at half,
    /// never below `initial`.
    pub(crate) fn on_session_reset(&mut self, initial: usize) {
        self.cwnd = self.cwnd.min(initial.max(self.cwnd / 2));
        self.undo = None;
        self.recovery_start = None;
        self.epoch_start = None;
        self.round_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1400;
    const RTT: Duration = Duration::from_millis(50);

    fn flat(latest: Duration) -> RttView {
        RttView { latest, min: RTT }
    }

    /// A sender that always fills the window, one round trip at a time:
    /// every datagram of a round is acknowledged one RTT after its round
    /// began, with `rtt` as the sample. Returns the time after `rounds`.
    fn run(cc: &mut Cubic, mut now: Instant, rounds: u32, rtt: Duration) -> Instant {
        for _ in 0..rounds {
            let sent = now;
            now += rtt;
            let n = cc.cwnd() / MSS;
            for _ in 0..n {
                cc.on_ack(now, sent, MSS, flat(rtt), true);
            }
        }
        now
    }

    fn cubic() -> Cubic {
        Cubic::new(MSS, 64 << 10, 4 * MSS, 64 << 20, 70)
    }

    #[test]
    fn slow_start_doubles_per_round_until_the_rtt_rises() {
        let mut cc = cubic();
        let now = Instant::now();
        let w0 = cc.cwnd();
        let now = run(&mut cc, now, 3, RTT);
        assert_eq!(cc.phase(), Phase::SlowStart);
        assert!(
            cc.cwnd() >= w0 * 7,
            "{} after 3 rounds from {w0}",
            cc.cwnd()
        );
        // A standing queue of 20 ms: conservative slow start, then avoidance.
        run(&mut cc, now, 1, RTT + Duration::from_millis(20));
        assert!(matches!(cc.phase(), Phase::Conservative { .. }));
    }

    #[test]
    fn one_jittered_sample_does_not_end_slow_start() {
        // The former exit test fired on any single late sample; a loaded
        // host delays a few acks by many milliseconds.
        let mut cc = cubic();
        let mut now = run(&mut cc, Instant::now(), 2, RTT);
        let sent = now;
        now += RTT;
        let n = cc.cwnd() / MSS;
        for i in 0..n {
            let rtt = if i == 3 { RTT * 2 } else { RTT };
            cc.on_ack(now, sent, MSS, flat(rtt), true);
        }
        assert_eq!(cc.phase(), Phase::SlowStart);
    }

    #[test]
    fn a_queue_forming_ends_slow_start_in_its_round_and_a_growing_one_ends_css() {
        // A doubling window fills a queue of one BDP within the round in
        // which it forms; the round's minimum would show it a round later,
        // after the loss of a window's worth.
        let ms = Duration::from_millis;
        let mut cc = cubic();
        let mut now = run(&mut cc, Instant::now(), 3, RTT);
        let sent = now;
        now += RTT;
        let n = cc.cwnd() / MSS;
        for i in 0..n {
            // The queue forms halfway through the round: 10 ms, then more.
            let rtt = if i < n / 2 { RTT } else { RTT + ms(10) };
            cc.on_ack(now, sent, MSS, flat(rtt), true);
        }
        let Phase::Conservative { baseline, .. } = cc.phase() else {
            panic!("still {:?} with the queue formed", cc.phase());
        };
        assert_eq!(baseline, RTT + ms(10));
        // In conservative slow start the queue grows by another threshold
        // (60 ms / 8): this is the path's capacity, avoidance starts.
        let w = cc.cwnd();
        for _ in 0..RECENT_SAMPLES {
            cc.on_ack(now, sent, MSS, flat(RTT + ms(18)), true);
        }
        assert_eq!(cc.phase(), Phase::Avoidance);
        assert!(cc.cwnd() < w + RECENT_SAMPLES * MSS / 2);
        // A few late samples among prompt ones (a busy host) do not end
        // slow start: the smallest of the recent ones stays low.
        let mut cc = cubic();
        let mut now = run(&mut cc, Instant::now(), 3, RTT);
        let sent = now;
        now += RTT;
        for i in 0..cc.cwnd() / MSS {
            let rtt = if i % 4 == 3 { RTT + ms(30) } else { RTT };
            cc.on_ack(now, sent, MSS, flat(rtt), true);
        }
        assert_eq!(cc.phase(), Phase::SlowStart);
    }

    #[test]
    fn at_most_one_decrease_per_loss_episode() {
        let mut cc = cubic();
        let now = run(&mut cc, Instant::now(), 4, RTT);
        // Two rounds with a standing queue of one RTT.
        let now = run(&mut cc, now, 2, RTT * 2);
        let before = cc.cwnd();
        let sent = now - RTT;
        let queued = flat(RTT * 2);
        for _ in 0..50 {
            cc.on_loss(now, sent, queued);
        }
        assert_eq!(cc.congestion_events(), 1);
        assert_eq!(cc.cwnd(), (before as f64 * 0.7) as usize);
        // A datagram sent after the decrease starts a new episode.
        cc.on_loss(now + RTT * 2, now + RTT, queued);
        assert_eq!(cc.congestion_events(), 2);
    }

    #[test]
    fn window_returns_to_its_maximum_after_about_k_seconds() {
        let mut cc = cubic();
        let mut now = run(&mut cc, Instant::now(), 4, RTT);
        // Leave slow start by a loss at a known window, with a queue.
        while cc.cwnd() < 1_000 * MSS {
            now = run(&mut cc, now, 1, RTT);
        }
        now = run(&mut cc, now, 2, RTT * 2);
        let w_max = cc.cwnd();
        cc.on_loss(now, now - RTT, flat(RTT * 2));
        let reduced = cc.cwnd();
        assert!(reduced < w_max);
        // K = cbrt(W_max·(1-β)/C) in datagrams.
        let k = ((w_max / MSS) as f64 * 0.3 / CUBIC_C).cbrt();
        let start = now;
        while cc.cwnd() < w_max * 99 / 100 {
            now = run(&mut cc, now, 1, RTT);
            assert!(now - start < Duration::from_secs_f64(k * 2.0), "too slow");
        }
        let took = (now - start).as_secs_f64();
        assert!(took > k * 0.5, "{took:.2}s, K {k:.2}s");
        // Reno's one datagram per round trip would need twice as long.
        let reno = ((w_max - reduced) / MSS) as f64 * RTT.as_secs_f64();
        assert!(took < reno / 2.0, "{took:.2}s vs Reno {reno:.2}s");
    }

    #[test]
    fn loss_without_a_queue_keeps_the_window() {
        // Random loss (or reordering taken for loss) at 0.5 %: the window
        // is kept while the path shows no queue.
        let mut cc = cubic();
        let mut now = run(&mut cc, Instant::now(), 6, RTT);
        now = run(&mut cc, now, 2, RTT * 2);
        cc.on_loss(now, now - RTT, flat(RTT * 2));
        assert_eq!(cc.congestion_events(), 1);
        let after_first = cc.cwnd();
        // The queue drains.
        now = run(&mut cc, now, 2, RTT);
        for _ in 0..20 {
            now = run(&mut cc, now, 1, RTT);
            cc.on_loss(now, now - RTT / 2, flat(RTT));
        }
        assert_eq!(cc.congestion_events(), 1);
        assert_eq!(cc.tolerated_losses(), 20);
        assert!(cc.cwnd() > after_first);
    }

    #[test]
    fn a_late_sample_from_a_busy_host_is_not_a_queue() {
        let mut cc = cubic();
        let now = run(&mut cc, Instant::now(), 4, RTT);
        // The round's other samples show no queue; the latest is late.
        cc.on_loss(now, now - RTT / 2, flat(RTT * 2));
        assert_eq!(cc.congestion_events(), 0);
        assert_eq!(cc.tolerated_losses(), 1);
    }

    #[test]
    fn heavy_loss_is_congestion_even_without_a_queue() {
        let mut cc = cubic();
        let now = run(&mut cc, Instant::now(), 3, RTT);
        let sent = now - RTT;
        // 10 % of the last round lost.
        let acked = cc.round_acked[0];
        for _ in 0..acked / 10 + 1 {
            cc.on_loss(now, sent, flat(RTT));
        }
        assert_eq!(cc.congestion_events(), 1);
    }

    #[test]
    fn application_limited_sender_does_not_grow_the_window() {
        let mut cc = cubic();
        let now = Instant::now();
        let w0 = cc.cwnd();
        for i in 0..1000u32 {
            cc.on_ack(now + RTT * i, now + RTT * i - RTT, MSS, flat(RTT), false);
        }
        assert_eq!(cc.cwnd(), w0);
    }

    /// A window grown in slow start, then two rounds with a queue, so that
    /// the next loss is a congestion event.
    fn queued(cc: &mut Cubic) -> Instant {
        let now = run(cc, Instant::now(), 6, RTT);
        run(cc, now, 2, RTT * 2)
    }

    #[test]
    fn a_decrease_whose_losses_all_prove_spurious_is_undone() {
        let mut cc = cubic();
        let now = queued(&mut cc);
        let before = (cc.cwnd(), cc.ssthresh(), cc.phase());
        // Three datagrams of one flight declared lost: one decrease.
        for _ in 0..3 {
            cc.on_loss(now, now - RTT, flat(RTT * 2));
            cc.note_lost(now);
        }
        assert_eq!(cc.congestion_events(), 1);
        assert!(cc.cwnd() < before.0);
        // Their acknowledgements arrive late: the first two change nothing.
        assert!(!cc.on_spurious_loss(now));
        assert!(!cc.on_spurious_loss(now));
        assert!(cc.cwnd() < before.0);
        assert!(cc.on_spurious_loss(now));
        assert_eq!((cc.cwnd(), cc.ssthresh(), cc.phase()), before);
        assert_eq!(cc.undone(), 1);
        // Nothing left to undo.
        assert!(!cc.on_spurious_loss(now));
    }

    #[test]
    fn a_decrease_with_one_real_loss_behind_it_stays() {
        let mut cc = cubic();
        let now = queued(&mut cc);
        let before = cc.cwnd();
        cc.on_loss(now, now - RTT, flat(RTT * 2));
        cc.note_lost(now);
        // A later loss in the same episode that never proves spurious.
        cc.on_loss(now + RTT / 2, now - RTT, flat(RTT * 2));
        cc.note_lost(now + RTT / 2);
        assert!(!cc.on_spurious_loss(now));
        assert!(cc.cwnd() < before);
        assert_eq!(cc.undone(), 0);
        // A loss declared before the decrease says nothing about it.
        assert!(!cc.on_spurious_loss(now - RTT));
    }

    #[test]
    fn timeouts_from_a_stall_are_undone_back_to_before_the_first() {
        // A stalled receiver: a loss event, then two timeouts in a row,
        // then every acknowledgement arrives.
        let mut cc = cubic();
        let now = queued(&mut cc);
        let (before, phase) = (cc.cwnd(), cc.phase());
        cc.on_loss(now, now - RTT, flat(RTT * 2));
        cc.note_lost(now);
        let t1 = now + RTT * 4;
        cc.on_timeout(t1);
        cc.note_lost(t1);
        cc.note_lost(t1);
        assert_eq!(cc.cwnd(), 4 * MSS);
        for at in [now, t1, t1] {
            cc.on_spurious_loss(at);
        }
        assert_eq!((cc.cwnd(), cc.phase()), (before, phase));
        assert_eq!(cc.undone(), 1);
    }

    #[test]
    fn timeout_restarts_from_the_minimum_in_slow_start() {
        let mut cc = cubic();
        let now = run(&mut cc, Instant::now(), 4, RTT);
        let before = cc.cwnd();
        cc.on_timeout(now);
        assert_eq!(cc.cwnd(), 4 * MSS);
        assert_eq!(cc.ssthresh(), (before as f64 * 0.7) as usize);
        assert_eq!(cc.phase(), Phase::SlowStart);
        // Slow start again up to the threshold, then avoidance.
        run(&mut cc, now, 12, RTT);
        assert_eq!(cc.phase(), Phase::Avoidance);
    }
}
