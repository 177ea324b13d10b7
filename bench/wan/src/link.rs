//! The sans-IO model of one direction of the emulated link.
//!
//! A [`Link`] is fed `(time, packet)` with [`Link::push`] and asked for the
//! packets due at a time with [`Link::pop_due`]; it never reads a clock.
//! Times are [`Duration`]s since an epoch the caller chooses.
//!
//! A packet goes through, in order:
//! 1. random loss (probability [`LinkParams::loss`]);
//! 2. the bottleneck: a drop-tail queue of at most
//!    [`LinkParams::queue_bytes`] drained by a token bucket of
//!    [`LinkParams::rate_bps`] with a depth of [`LinkParams::burst_bytes`]
//!    (no rate: no queue, packets pass at once);
//! 3. propagation: the one-way [`LinkParams::delay`] plus a uniform random
//!    jitter in `0..=jitter` (jitter alone never reorders: a packet is never
//!    due before the one queued ahead of it), and with probability
//!    [`LinkParams::reorder`] an extra [`LinkParams::reorder_extra`] so that
//!    the packets behind it overtake it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The parameters of one direction of the link.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Uniform random extra delay in `0..=jitter` (does not reorder).
    pub jitter: Duration,
    /// Bottleneck rate in bits per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Token bucket depth in bytes (the largest burst at line speed).
    pub burst_bytes: usize,
    /// Bottleneck queue limit in bytes (drop-tail).
    pub queue_bytes: usize,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Probability that a packet is held back by `reorder_extra`.
    pub reorder: f64,
    /// The extra delay of a reordered packet.
    pub reorder_extra: Duration,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            burst_bytes: 16 * 1024,
            queue_bytes: 1 << 20,
            loss: 0.0,
            reorder: 0.0,
            reorder_extra: Duration::from_millis(5),
        }
    }
}

impl LinkParams {
    /// The bandwidth-delay product of the round trip (`2 × delay`) at the
    /// bottleneck rate, in bytes; `None` without a rate.
    pub fn bdp_bytes(&self) -> Option<usize> {
        self.rate_bps
            .map(|r| (r as f64 / 8.0 * 2.0 * self.delay.as_secs_f64()) as usize)
    }
}

/// What became of a packet handed to [`Link::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; it will be due later (or is due now).
    Queued,
    /// Dropped by the random loss.
    Lost,
    /// Dropped because the bottleneck queue was full.
    QueueFull,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets pushed.
    pub packets_in: u64,
    /// Bytes pushed.
    pub bytes_in: u64,
    /// Packets dropped by random loss.
    pub lost: u64,
    /// Packets dropped at the full queue.
    pub queue_drops: u64,
    /// Of those, TCP segments (IPv4 protocol 6): who loses at a shared
    /// queue tells whether GeoMessage and TCP share it fairly.
    pub queue_drops_tcp: u64,
    /// Packets held back to be reordered.
    pub reordered: u64,
    /// Packets handed out by [`Link::pop_due`].
    pub packets_out: u64,
    /// Bytes handed out by [`Link::pop_due`].
    pub bytes_out: u64,
}

/// Whether `packet` is an IPv4 TCP segment.
fn is_tcp(packet: &[u8]) -> bool {
    packet.len() > 9 && packet[0] >> 4 == 4 && packet[9] == 6
}

/// A packet in propagation: ordered by due time, then by sequence.
struct InFlight {
    due: Duration,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// One direction of the emulated link (see the module documentation).
pub struct Link {
    params: LinkParams,
    rng: StdRng,
    /// Waiting for tokens.
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// Tokens (bytes) as of `tokens_at`.
    tokens: f64,
    tokens_at: Duration,
    /// Propagating, keyed by due time.
    flight: BinaryHeap<Reverse<InFlight>>,
    /// The due time of the last packet not held back (jitter keeps order).
    last_due: Duration,
    seq: u64,
    stats: LinkStats,
}

impl Link {
    /// A link with these parameters and a deterministic random seed.
    pub fn new(params: LinkParams, seed: u64) -> Self {
        let tokens = params.burst_bytes as f64;
        Link {
            params,
            rng: StdRng::seed_from_u64(seed),
            queue: VecDeque::new(),
            queued_bytes: 0,
            tokens,
            tokens_at: Duration::ZERO,
            flight: BinaryHeap::new(),
            last_due: Duration::ZERO,
            seq: 0,
            stats: LinkStats::default(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Bytes waiting in the bottleneck queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Offers a packet arriving at `now` (times must not go backwards).
    pub fn push(&mut self, now: Duration, packet: Vec<u8>) -> Verdict {
        self.advance(now);
        self.stats.packets_in += 1;
        self.stats.bytes_in += packet.len() as u64;
        if self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss.min(1.0)) {
            self.stats.lost += 1;
            return Verdict::Lost;
        }
        let Some(rate) = self.params.rate_bps else {
            self.depart(now, packet);
            return Verdict::Queued;
        };
        if self.queued_bytes + packet.len() > self.params.queue_bytes && !self.queue.is_empty() {
            self.stats.queue_drops += 1;
            if is_tcp(&packet) {
                self.stats.queue_drops_tcp += 1;
            }
            return Verdict::QueueFull;
        }
        if self.queue.is_empty() {
            // Tokens accrue while nothing waits, up to the bucket depth.
            let cap = self.params.burst_bytes as f64;
            let dt = now.saturating_sub(self.tokens_at).as_secs_f64();
            self.tokens = (self.tokens + dt * rate as f64 / 8.0).min(cap);
            self.tokens_at = now;
        }
        self.queued_bytes += packet.len();
        self.queue.push_back(packet);
        self.advance(now);
        Verdict::Queued
    }

    /// When the head of the bottleneck queue gets its tokens.
    fn head_departure(&self) -> Option<Duration> {
        let rate = self.params.rate_bps? as f64 / 8.0;
        let len = self.queue.front()?.len() as f64;
        if self.tokens >= len {
            Some(self.tokens_at)
        } else {
            let wait = (len - self.tokens) / rate;
            Some(self.tokens_at + Duration::from_secs_f64(wait))
        }
    }

    /// Moves every packet that gets its tokens by `now` into propagation.
    fn advance(&mut self, now: Duration) {
        let Some(rate) = self.params.rate_bps else {
            return;
        };
        while let Some(t) = self.head_departure() {
            if t > now {
                break;
            }
            let packet = self.queue.pop_front().expect("head");
            let len = packet.len();
            self.queued_bytes -= len;
            // Refill to t (capped by the bucket, or by this packet if it is
            // larger than the bucket), then pay for the packet.
            let cap = (self.params.burst_bytes.max(len)) as f64;
            let dt = t.saturating_sub(self.tokens_at).as_secs_f64();
            self.tokens = (self.tokens + dt * rate as f64 / 8.0).min(cap) - len as f64;
            self.tokens = self.tokens.max(0.0);
            self.tokens_at = t;
            self.depart(t, packet);
        }
    }

    /// The packet leaves the bottleneck at `t` and starts propagating.
    fn depart(&mut self, t: Duration, packet: Vec<u8>) {
        let mut due = t + self.params.delay;
        if !self.params.jitter.is_zero() {
            let j = self.rng.gen_range(0..=self.params.jitter.as_nanos() as u64);
            due += Duration::from_nanos(j);
        }
        due = due.max(self.last_due);
        if self.params.reorder > 0.0 && self.rng.gen_bool(self.params.reorder.min(1.0)) {
            self.stats.reordered += 1;
            due += self.params.reorder_extra;
        } else {
            self.last_due = due;
        }
        self.seq += 1;
        self.flight.push(Reverse(InFlight {
            due,
            seq: self.seq,
            packet,
        }));
    }

    /// The next packet due at or before `now`, in due order.
    pub fn pop_due(&mut self, now: Duration) -> Option<Vec<u8>> {
        self.advance(now);
        if self.flight.peek()?.0.due > now {
            return None;
        }
        let p = self.flight.pop()?.0.packet;
        self.stats.packets_out += 1;
        self.stats.bytes_out += p.len() as u64;
        Some(p)
    }

    /// The earliest time something is due (a packet out of propagation, or
    /// the head of the queue getting its tokens); `None` when idle.
    pub fn next_deadline(&self) -> Option<Duration> {
        let a = self.flight.peek().map(|f| f.0.due);
        let b = self.head_departure();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn packet(id: u32, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(4)];
        p[..4].copy_from_slice(&id.to_be_bytes());
        p
    }

    fn id(p: &[u8]) -> u32 {
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }

    /// Drains everything, stepping the clock to each deadline; returns
    /// (packet id, time it came out).
    fn drain(link: &mut Link) -> Vec<(u32, Duration)> {
        let mut out = Vec::new();
        while let Some(t) = link.next_deadline() {
            while let Some(p) = link.pop_due(t) {
                out.push((id(&p), t));
            }
        }
        out
    }

    #[test]
    fn delay_only_keeps_order_and_delays_each_packet() {
        let mut l = Link::new(
            LinkParams {
                delay: ms(20),
                ..LinkParams::default()
            },
            1,
        );
        for i in 0..10u32 {
            assert_eq!(l.push(ms(i as u64), packet(i, 100)), Verdict::Queued);
        }
        assert_eq!(l.pop_due(ms(19)), None);
        assert_eq!(l.next_deadline(), Some(ms(20)));
        let out = drain(&mut l);
        let want: Vec<_> = (0..10u32).map(|i| (i, ms(20 + i as u64))).collect();
        assert_eq!(out, want);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.stats().packets_out, 10);
    }

    #[test]
    fn token_bucket_paces_at_the_rate_after_the_burst() {
        // 8 Mbit/s = 1 byte/µs; 1000-byte packets take 1 ms each; a bucket
        // of 2000 bytes lets the first two out at once.
        let mut l = Link::new(
            LinkParams {
                delay: ms(10),
                rate_bps: Some(8_000_000),
                burst_bytes: 2000,
                queue_bytes: 1 << 20,
                ..LinkParams::default()
            },
            1,
        );
        for i in 0..10u32 {
            l.push(Duration::ZERO, packet(i, 1000));
        }
        assert_eq!(l.queued_bytes(), 8000);
        let out = drain(&mut l);
        let times: Vec<_> = out.iter().map(|o| o.1).collect();
        let mut want = vec![ms(10), ms(10)];
        want.extend((1..=8).map(|i| ms(10 + i)));
        assert_eq!(times, want);
        assert!(out.iter().map(|o| o.0).eq(0..10));
        // Idle for a while: the bucket refills to its depth, no further.
        let t = ms(100);
        for i in 0..4u32 {
            l.push(t, packet(i, 1000));
        }
        let times: Vec<_> = drain(&mut l).iter().map(|o| o.1).collect();
        assert_eq!(times, vec![ms(110), ms(110), ms(111), ms(112)]);
    }

    #[test]
    fn long_run_throughput_matches_the_rate() {
        // 10 Mbit/s, offered 20 Mbit/s for 2 s with a big queue: what comes
        // out in the first 2 s is ~10 Mbit/s worth.
        let mut l = Link::new(
            LinkParams {
                rate_bps: Some(10_000_000),
                burst_bytes: 1500,
                queue_bytes: 100 << 20,
                ..LinkParams::default()
            },
            1,
        );
        let mut out = 0usize;
        for us in (0..2_000_000u64).step_by(600) {
            let now = Duration::from_micros(us);
            l.push(now, packet(0, 1500));
            while let Some(p) = l.pop_due(now) {
                out += p.len();
            }
        }
        let want = 10_000_000 / 8 * 2;
        assert!(
            (out as f64 - want as f64).abs() < 3000.0,
            "{out} bytes vs {want}"
        );
    }

    #[test]
    fn full_queue_drops_the_tail() {
        let mut l = Link::new(
            LinkParams {
                rate_bps: Some(8_000_000),
                burst_bytes: 1000,
                queue_bytes: 3000,
                ..LinkParams::default()
            },
            1,
        );
        // The first leaves at once on the bucket; three wait; the rest drop.
        let v: Vec<_> = (0..6u32)
            .map(|i| l.push(Duration::ZERO, packet(i, 1000)))
            .collect();
        use Verdict::*;
        assert_eq!(
            v,
            vec![Queued, Queued, Queued, Queued, QueueFull, QueueFull]
        );
        assert_eq!(l.stats().queue_drops, 2);
        assert_eq!(l.stats().queue_drops_tcp, 0);
        // Drops of TCP segments are counted apart from UDP datagrams.
        let ip = |protocol: u8| {
            let mut p = vec![0u8; 1000];
            p[0] = 0x45;
            p[9] = protocol;
            p
        };
        assert_eq!(l.push(Duration::ZERO, ip(6)), QueueFull);
        assert_eq!(l.push(Duration::ZERO, ip(17)), QueueFull);
        assert_eq!(l.stats().queue_drops, 4);
        assert_eq!(l.stats().queue_drops_tcp, 1);
        // After 1 ms one has drained: room for exactly one more.
        assert_eq!(l.push(ms(1), packet(6, 1000)), Queued);
        assert_eq!(l.push(ms(1), packet(7, 1000)), QueueFull);
        let ids: Vec<_> = drain(&mut l).iter().map(|o| o.0).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 6]);
    }

    #[test]
    fn loss_rate_is_close_to_the_probability_and_seeded() {
        let params = LinkParams {
            loss: 0.05,
            ..LinkParams::default()
        };
        let run = |seed| {
            let mut l = Link::new(params.clone(), seed);
            let v: Vec<_> = (0..20_000u32)
                .map(|i| l.push(Duration::ZERO, packet(i, 64)))
                .collect();
            (l.stats().lost, v)
        };
        let (lost, a) = run(7);
        // Binomial(20000, 0.05): mean 1000, sd ~31.
        assert!((850..=1150).contains(&lost), "lost {lost}");
        assert_eq!(run(7).1, a, "same seed, same drops");
        assert_ne!(run(8).1, a, "another seed, other drops");
    }

    #[test]
    fn reorder_holds_packets_back_and_others_overtake() {
        let mut l = Link::new(
            LinkParams {
                delay: ms(10),
                reorder: 0.1,
                reorder_extra: ms(5),
                ..LinkParams::default()
            },
            3,
        );
        for i in 0..10_000u32 {
            l.push(Duration::from_micros(100 * i as u64), packet(i, 64));
        }
        let held = l.stats().reordered;
        assert!((850..=1150).contains(&held), "held {held}");
        let out = drain(&mut l);
        assert_eq!(out.len(), 10_000, "nothing lost");
        // A packet is out of order when a later-sent one came out before it.
        let mut max_seen = 0;
        let mut late = 0;
        for &(i, t) in &out {
            if i < max_seen {
                late += 1;
            }
            max_seen = max_seen.max(i);
            let sent = Duration::from_micros(100 * i as u64);
            let d = t - sent;
            assert!(d == ms(10) || d == ms(15), "packet {i} delayed {d:?}");
        }
        assert_eq!(late, held, "every held packet arrives late, no other");
    }

    #[test]
    fn jitter_spreads_delay_without_reordering() {
        let mut l = Link::new(
            LinkParams {
                delay: ms(10),
                jitter: ms(4),
                ..LinkParams::default()
            },
            5,
        );
        for i in 0..2000u32 {
            l.push(Duration::from_millis(i as u64), packet(i, 64));
        }
        let out = drain(&mut l);
        assert!(out.iter().map(|o| o.0).eq(0..2000), "order kept");
        let delays: Vec<_> = out
            .iter()
            .map(|&(i, t)| t - Duration::from_millis(i as u64))
            .collect();
        assert!(delays.iter().all(|d| *d >= ms(10) && *d <= ms(14)));
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(mean > ms(11) && mean < ms(13), "mean {mean:?}");
    }

    #[test]
    fn bdp() {
        let p = LinkParams {
            delay: ms(25),
            rate_bps: Some(200_000_000),
            ..LinkParams::default()
        };
        assert_eq!(p.bdp_bytes(), Some(1_250_000));
        assert_eq!(LinkParams::default().bdp_bytes(), None);
    }
}
