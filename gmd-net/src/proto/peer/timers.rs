//! Timers: loss detection, retransmission, keepalives and path probes.

use std::time::Instant;

use smallvec::SmallVec;
use tracing::debug;

use crate::proto::path::{PROBE_DATAGRAMS, Path, PathState, PathTimer};
use crate::proto::{Event, Shared, Sink};

use super::{Peer, PeerState, PeerTimer, Reset};

impl Peer {
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let peer = self.timers.iter().flatten().min().copied();
        let path = self
            .paths
            .iter()
            .flat_map(|p| p.timers.iter().flatten())
            .min()
            .copied();
        match (peer, path) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant, shared: &Shared, sink: &mut Sink) {
        let t = &shared.tuning;
        if self.timers[PeerTimer::Down as usize].is_some_and(|d| d <= now) {
            self.timers[PeerTimer::Down as usize] = None;
            if self.state != PeerState::Down {
                self.reset_session(now, shared, sink, Reset::Down);
            }
        }
        if self.timers[PeerTimer::Handshake as usize].is_some_and(|d| d <= now) {
            if self.remote_epoch.is_none() {
                self.hello_due.iter_mut().for_each(|h| *h = true);
                let every = if self.state == PeerState::Down {
                    t.ping_interval
                } else {
                    t.handshake_interval
                };
                self.timers[PeerTimer::Handshake as usize] = Some(now + every);
            } else {
                self.timers[PeerTimer::Handshake as usize] = None;
            }
        }
        if self.timers[PeerTimer::Ack as usize].is_some_and(|d| d <= now) {
            self.timers[PeerTimer::Ack as usize] = None;
            for p in &mut self.paths {
                if p.unacked_received > 0 {
                    p.ack_pending = true;
                }
            }
        }
        for pi in 0..self.paths.len() {
            if self.paths[pi].timers[PathTimer::Loss as usize].is_some_and(|d| d <= now) {
                self.on_loss_timer(now, shared, sink, pi);
            }
            let p = &mut self.paths[pi];
            if p.timers[PathTimer::Ping as usize].is_some_and(|d| d <= now) {
                // A silent peer is probed four times as often, so that a
                // lossy but working path is found before the promote-failure
                // timeout declares the peer down.
                let silent = self
                    .last_recv
                    .is_none_or(|l| now.saturating_duration_since(l) > t.ping_interval);
                let idle_since = p.last_send.unwrap_or(self.created);
                if p.state == PathState::Down
                    || silent
                    || now.saturating_duration_since(idle_since) >= t.ping_interval
                {
                    p.ping_pending = true;
                }
                let every = if silent {
                    (t.ping_interval / 4).max(t.rto_min)
                } else {
                    t.ping_interval
                };
                p.timers[PathTimer::Ping as usize] = Some(now + every);
            }
        }
    }

    fn on_loss_timer(&mut self, now: Instant, shared: &Shared, sink: &mut Sink, pi: usize) {
        let t = &shared.tuning;
        if self.paths[pi].loss_time.is_some() {
            self.detect_losses(now, shared, sink);
            self.trim_sent();
            return;
        }
        if self.paths[pi].in_flight_packets == 0 {
            self.paths[pi].timers[PathTimer::Loss as usize] = None;
            return;
        }
        // Probe timeout: nothing acknowledged for a retransmission timeout.
        // Nothing is declared lost yet; probes ask the peer what arrived.
        let net = self.paths[pi].cfg.network;
        sink.nets[net.0 as usize].timeouts += 1;
        self.paths[pi].on_probe_timeout(now);
        self.queue_probe_data(sink, pi);
        let p = &mut self.paths[pi];
        debug!(peer = %self.cfg.name, network = net.0, timeouts = p.timeouts_in_row, "probe timeout");
        if p.timeouts_in_row >= t.path_timeouts_max && p.state != PathState::Down {
            p.state = PathState::Down;
            sink.nets[net.0 as usize].failures += 1;
            debug!(peer = %self.cfg.name, network = net.0, "path down");
            sink.events.push_back(Event::PathDown {
                peer: self.id,
                network: net,
            });
            // No acknowledgement will come back on this path: what it
            // carries is lost, to be resent on another. Its datagram size
            // is proven again once it is back.
            p.mtu.on_path_down();
            p.datagram_size_changed();
            p.on_down_cc(now);
            let idx: Vec<usize> = self
                .sent
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.resolved && s.path as usize == pi)
                .map(|(i, _)| i)
                .collect();
            for i in idx {
                self.declare_lost(now, shared, sink, i, true);
            }
            self.trim_sent();
            self.refresh_active(shared, sink);
        }
        self.arm_loss_timer(pi, t);
    }

    /// Queues the data of the oldest packets still in flight on path `pi`
    /// for resending ahead of everything else, as many as a probe timeout
    /// lets out beyond the window: if they were lost, the probes carry them
    /// already; if not, the probes' acknowledgement tells.
    fn queue_probe_data(&mut self, sink: &mut Sink, pi: usize) {
        // On the stack: a probe timeout allocates nothing.
        let mut probes: SmallVec<[(u64, u64); PROBE_DATAGRAMS as usize]> = SmallVec::new();
        for s in &self.sent {
            if probes.len() == PROBE_DATAGRAMS as usize {
                break;
            }
            if !s.resolved && s.in_flight && s.path as usize == pi && s.chunks_end > s.chunks_start
            {
                probes.push((s.chunks_start, s.chunks_end));
            }
        }
        let mut queued = 0;
        for &(cs, ce) in probes.iter().rev() {
            if self.requeue_unacked(cs, ce, true) {
                queued += 1;
            }
        }
        let net = self.paths[pi].cfg.network;
        sink.nets[net.0 as usize].resends += queued;
        self.stats.resends += queued;
    }

    /// Chooses the preferred path: lowest smoothed RTT among working paths,
    /// the first on ties, with a hysteresis band so near-equal paths do not
    /// flap.
    pub(super) fn refresh_active(&mut self, shared: &Shared, sink: &mut Sink) {
        let t = &shared.tuning;
        let rank = |p: &Path| (p.state != PathState::Up, p.rank_rtt(t));
        let best = (0..self.paths.len())
            .filter(|&i| self.paths[i].is_usable())
            .min_by(|&a, &b| {
                rank(&self.paths[a])
                    .cmp(&rank(&self.paths[b]))
                    .then(a.cmp(&b))
            });
        let new = match (self.active, best) {
            (_, None) => None,
            (None, Some(b)) => Some(b),
            (Some(a), Some(b)) => {
                let pa = &self.paths[a];
                let pb = &self.paths[b];
                if !pa.is_usable() || (pa.state != PathState::Up && pb.state == PathState::Up) {
                    Some(b)
                } else {
                    let (ra, rb) = (pa.rank_rtt(t), pb.rank_rtt(t));
                    let clearly_better = rb * 8 < ra * 7;
                    let earlier_and_equal = b < a && rb <= ra * 9 / 8;
                    if b != a && (clearly_better || earlier_and_equal) {
                        Some(b)
                    } else {
                        Some(a)
                    }
                }
            }
        };
        if new != self.active {
            self.active = new;
            sink.events.push_back(Event::ActivePathChanged {
                peer: self.id,
                network: new.map(|i| self.paths[i].cfg.network),
            });
        }
    }
}
