//! Application side: messages, requests and replies handed in by the endpoint.

use std::time::Instant;

use bytes::Bytes;

use crate::NetError;
use crate::config::Tuning;
use crate::proto::message_charge;
use crate::proto::{Credit, Shared, Sink};
use crate::ranges::RangeSet;
use crate::wire::MsgKind;

use super::{OutMsg, Peer, PeerState};

impl Peer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue(
        &mut self,
        _now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        lane: u16,
        kind: MsgKind,
        body: Bytes,
        gated: bool,
    ) -> Result<Option<u64>, NetError> {
        let t = &shared.tuning;
        if body.len() > t.message_bytes_max {
            return Err(NetError::MessageTooLarge {
                len_bytes: body.len(),
                max_bytes: t.message_bytes_max,
            });
        }
        if self.state == PeerState::Down {
            return Err(self.down_error());
        }
        let charge = message_charge(body.len());
        if gated && self.buffered_bytes + charge > t.send_buffer_bytes_max {
            return Err(NetError::WouldBlock {
                buffered_bytes: self.buffered_bytes,
                max_bytes: t.send_buffer_bytes_max,
            });
        }
        let mut kind = kind;
        let mut id = None;
        if let MsgKind::Request(_) = kind {
            if self.requests.len() >= t.requests_outstanding_max {
                return Err(NetError::WouldBlock {
                    buffered_bytes: self.buffered_bytes,
                    max_bytes: t.send_buffer_bytes_max,
                });
            }
            let rid = self.next_request;
            self.next_request += 1;
            self.requests.insert(rid);
            kind = MsgKind::Request(rid);
            id = Some(rid);
        }
        if gated {
            self.buffered_bytes += charge;
        } else {
            self.reply_bytes += charge;
        }
        match kind {
            MsgKind::Reply(_) => self.stats.replies_sent += 1,
            _ => self.stats.rpcs_sent += 1,
        }
        self.stats.bytes_sent += body.len() as u64;
        let l = self.lanes.entry(lane).or_default();
        let seq = l.next_seq;
        l.next_seq += 1;
        l.msgs.push_back(Some(OutMsg {
            kind,
            body,
            sent_offset: 0,
            started: false,
            acked: RangeSet::new(),
            gated,
            fragments: 0,
        }));
        self.pending.push_back((lane, seq));
        let _ = sink;
        Ok(id)
    }

    pub(crate) fn release(&mut self, credit: Credit) {
        if credit.session != self.session {
            return;
        }
        self.released_in += credit.bytes as u64;
        self.maybe_grant_credit_after_release();
    }

    pub(super) fn credit_limit_in(&self, t: &Tuning) -> u64 {
        self.released_in + t.recv_window_bytes as u64
    }

    pub(super) fn maybe_grant_credit_after_release(&mut self) {
        // Advertise when at least an eighth of the window was freed, so that
        // a sender blocked on credit resumes without waiting for an ack.
        let limit = self.released_in + self.recv_window;
        if limit
            >= self.credit_advertised + self.recv_window / crate::proto::CREDIT_GRANT_DIVISOR as u64
        {
            self.credit_dirty = true;
        }
    }
}
