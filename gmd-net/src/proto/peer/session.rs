//! Session management: handshakes, epochs and keys toward the peer.

use std::time::Instant;

use tracing::debug;

use crate::NetError;
use crate::crypto::ReplayWindow;
use crate::proto::path::PathTimer;
use crate::proto::{Event, RequestId, Shared, Sink};

use super::{Peer, PeerState, PeerTimer, Reset};

impl Peer {
    pub(super) fn arm_down_timer(&mut self) {
        self.timers[PeerTimer::Down as usize] = self
            .cfg
            .promote_failure_timeout
            .map(|t| self.last_recv.unwrap_or(self.created) + t);
    }

    pub(super) fn reset_session(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        why: Reset,
    ) {
        let t = &shared.tuning;
        let error = match why {
            Reset::Down | Reset::Closed => self.down_error(),
            Reset::Restarted(epoch) => NetError::PeerRestarted {
                peer: self.cfg.name.clone(),
                epoch,
            },
        };
        for &rid in &self.requests {
            self.stats.failures += 1;
            sink.events.push_back(Event::RequestFailed {
                peer: self.id,
                request: RequestId(rid),
                error: error.clone(),
            });
        }
        self.requests.clear();
        if self.buffered_bytes > 0 {
            sink.events.push_back(Event::Released {
                peer: self.id,
                bytes: self.buffered_bytes,
            });
        }
        self.buffered_bytes = 0;
        self.reply_bytes = 0;
        self.lanes.clear();
        self.pending.clear();
        self.retransmit.clear();
        self.sent.clear();
        self.lost.clear();
        self.chunk_log.clear();
        self.chunk_base = 0;
        self.received_pns.clear();
        self.largest_received = None;
        self.recv_lanes.clear();
        self.recv_slots = 0;
        self.passed_slots = 0;
        self.charged_in = 0;
        self.released_in = 0;
        self.credit_advertised = t.recv_window_bytes as u64;
        self.credit_limit = t.recv_window_bytes as u64;
        self.credit_used = 0;
        self.credit_dirty = false;
        self.next_pn = 0;
        self.replay = ReplayWindow::default();
        self.replay_hello = ReplayWindow::default();
        self.tx_key = None;
        self.rx_key = None;
        self.rx_hello_key = None;
        self.session += 1;
        self.timers[PeerTimer::Ack as usize] = None;
        for p in &mut self.paths {
            p.reset_session(t);
        }
        match why {
            Reset::Down | Reset::Closed => {
                self.generation += 1;
                self.hello_key = None;
                self.hello_pn = 0;
                self.remote_epoch = None;
                self.state = PeerState::Down;
                self.stats.peer_downs += 1;
                self.timers[PeerTimer::Down as usize] = None;
                self.timers[PeerTimer::Handshake as usize] = Some(now + t.ping_interval);
                for p in &mut self.paths {
                    p.timers[PathTimer::Ping as usize] = None;
                }
                debug!(peer = %self.cfg.name, "peer down");
                sink.events.push_back(Event::PeerDown { peer: self.id });
            }
            Reset::Restarted(epoch) => {
                self.remote_epoch = Some(epoch);
                self.stats.restarts += 1;
                debug!(peer = %self.cfg.name, epoch, "peer restarted");
                sink.events.push_back(Event::PeerRestarted {
                    peer: self.id,
                    epoch,
                });
            }
        }
    }

    pub(super) fn on_session_established(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        epoch: u64,
    ) {
        let t = &shared.tuning;
        self.remote_epoch = Some(epoch);
        self.timers[PeerTimer::Handshake as usize] = None;
        for (i, p) in self.paths.iter_mut().enumerate() {
            // Measure every path at once so the best one is known early.
            p.ping_pending = true;
            p.timers[PathTimer::Ping as usize] = Some(now + t.ping_interval);
            self.hello_due[i] = false;
        }
        if self.state != PeerState::Up {
            self.state = PeerState::Up;
            debug!(peer = %self.cfg.name, epoch, "peer up");
            sink.events.push_back(Event::PeerUp {
                peer: self.id,
                epoch,
            });
        }
    }

    pub(crate) fn close(&mut self, now: Instant, shared: &Shared, sink: &mut Sink) {
        if self.remote_epoch.is_some() {
            self.close_due.iter_mut().for_each(|c| *c = true);
            // Build the CLOSE datagrams now, before the session is gone.
        }
        let _ = (now, shared, sink);
    }
}
