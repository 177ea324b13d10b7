//! Receiving: datagrams in, acknowledgements, reassembly and delivery.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, trace, warn};

use crate::StreamId;
use crate::config::{NetworkId, Tuning};
use crate::crypto::SessionIds;
use crate::proto::message_charge;
use crate::proto::path::{GRANULARITY, PathState, PathTimer};
use crate::proto::{Credit, Delivery, Event, IncomingKind, ReplyTo, RequestId, Shared, Sink};
use crate::ranges::RangeSet;
use crate::wire::{self, FLAG_ENCRYPTED, Frame, HEADER_BYTES, Header, MsgKind, TAG_BYTES};

use super::{
    ACK_EVERY_PACKETS, Chunk, LOST_RECORDS_MAX, LostPacket, Peer, PeerTimer, RecvData, RecvLane,
    RecvMsg, Reset, Slot, lane_ordered, passed_slots_max, recv_slots_max,
};

impl Peer {
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        network: NetworkId,
        hdr: Header,
        mut data: BytesMut,
    ) {
        let t = &shared.tuning;
        let Some(pi) = self.paths.iter().position(|p| p.cfg.network == network) else {
            sink.sec.unknown_machine += 1;
            return;
        };
        let local_epoch = self.local_epoch();
        let known = self.remote_epoch == Some(hdr.src_epoch);
        let to_us = hdr.dst_epoch == local_epoch;
        let hello = hdr.dst_epoch == 0;
        let ids = SessionIds {
            src_machine: self.cfg.machine_id,
            src_epoch: hdr.src_epoch,
            dst_machine: shared.topo.local_machine_id,
            dst_epoch: hdr.dst_epoch,
        };
        let encrypted = hdr.flags & FLAG_ENCRYPTED != 0;
        if encrypted != shared.encrypt {
            // Both sides must agree; a mismatch is treated as a wrong key.
            sink.sec.bad_auth += 1;
            return;
        }
        let opened = if known && to_us {
            if self
                .rx_key
                .as_ref()
                .is_none_or(|k| k.0 != hdr.src_epoch || k.1 != hdr.dst_epoch)
            {
                self.rx_key = Some((hdr.src_epoch, hdr.dst_epoch, shared.master.session(ids)));
            }
            let k = &self.rx_key.as_ref().expect("just set").2;
            k.open(hdr.packet_number, &mut data, encrypted)
        } else if known && hello {
            if self
                .rx_hello_key
                .as_ref()
                .is_none_or(|k| k.0 != hdr.src_epoch)
            {
                self.rx_hello_key = Some((hdr.src_epoch, shared.master.session(ids)));
            }
            let k = &self.rx_hello_key.as_ref().expect("just set").1;
            k.open(hdr.packet_number, &mut data, encrypted)
        } else {
            shared
                .master
                .session(ids)
                .open(hdr.packet_number, &mut data, encrypted)
        };
        if opened.is_err() {
            sink.sec.bad_auth += 1;
            return;
        }
        // Replay check against the window of the session it belongs to
        // (after authentication, so forgeries are counted as such).
        let replay_ok = if known && to_us {
            self.replay.check(hdr.packet_number)
        } else if known && hello {
            self.replay_hello.check(hdr.packet_number)
        } else {
            true
        };
        if !replay_ok {
            sink.sec.replayed += 1;
            sink.nets[network.0 as usize].duplicates += 1;
            return;
        }
        let len = data.len();
        let payload = data.freeze().slice(HEADER_BYTES..len - TAG_BYTES);
        let (_, eliciting) = match wire::validate_payload(&payload) {
            Ok(v) => v,
            Err(_) => {
                sink.sec.malformed += 1;
                return;
            }
        };
        // Authenticated from here on. Sort out epochs.
        if !hello && !to_us {
            // Addressed to an earlier incarnation of us: tell the peer our epoch.
            sink.sec.stale_epoch += 1;
            self.owe_hello(now, pi, t);
            return;
        }
        match self.remote_epoch {
            Some(e) if e == hdr.src_epoch => {}
            Some(e) => {
                let silent = self
                    .last_recv
                    .is_none_or(|l| now.saturating_duration_since(l) >= t.stale_epoch_silence);
                if hdr.src_epoch > e || silent {
                    self.reset_session(now, shared, sink, Reset::Restarted(hdr.src_epoch));
                    self.on_session_established(now, shared, sink, hdr.src_epoch);
                } else {
                    sink.sec.stale_epoch += 1;
                    return;
                }
            }
            None => self.on_session_established(now, shared, sink, hdr.src_epoch),
        }
        if hello {
            self.replay_hello.record(hdr.packet_number);
        } else {
            self.replay.record(hdr.packet_number);
        }
        self.last_recv = Some(now);
        self.arm_down_timer();
        {
            let ns = &mut sink.nets[network.0 as usize];
            ns.packets_received += 1;
            ns.bytes_received += len as u64;
        }
        self.paths[pi].last_recv = Some(now);
        if hello {
            // The peer does not know our epoch yet: answer on this path.
            self.owe_hello(now, pi, t);
            return;
        }
        let mut carried_data = false;
        for f in wire::frames(&payload) {
            let Ok(f) = f else { break };
            match f {
                Frame::Ack(a) => self.on_ack(now, shared, sink, pi, &a),
                Frame::Stream(s) => {
                    carried_data = true;
                    let body = payload.slice_ref(s.data);
                    self.on_stream(shared, sink, &s, body);
                }
                Frame::Credit(c) => {
                    if c > self.credit_limit {
                        self.credit_limit = c;
                    }
                }
                Frame::Close => {
                    self.reset_session(now, shared, sink, Reset::Closed);
                    return;
                }
                Frame::Ping | Frame::Hello => {}
            }
        }
        if !carried_data {
            sink.nets[network.0 as usize].other += 1;
        }
        // Acknowledge.
        let pn = hdr.packet_number;
        let in_order = self.received_pns.end().is_none_or(|e| pn == e);
        self.received_pns.insert(pn, pn + 1);
        self.received_pns.truncate_low(wire::ACK_RANGES_MAX);
        if self.largest_received.is_none_or(|(l, _)| pn > l) {
            self.largest_received = Some((pn, now));
        }
        if eliciting {
            let p = &mut self.paths[pi];
            p.unacked_received += 1;
            if p.unacked_received >= ACK_EVERY_PACKETS || !in_order {
                p.ack_pending = true;
            } else if self.timers[PeerTimer::Ack as usize].is_none() {
                self.timers[PeerTimer::Ack as usize] = Some(now + t.ack_delay_max);
            }
        }
    }

    fn owe_hello(&mut self, now: Instant, pi: usize, t: &Tuning) {
        // Rate-limited: one answer per path per handshake interval / 4.
        if self.last_hello_reply[pi]
            .is_none_or(|l| now.saturating_duration_since(l) >= t.handshake_interval / 4)
        {
            self.last_hello_reply[pi] = Some(now);
            self.hello_due[pi] = true;
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        pi_recv: usize,
        a: &wire::AckFrame<'_>,
    ) {
        let t = &shared.tuning;
        if a.largest >= self.next_pn {
            // Acknowledges a packet we never sent: a protocol violation.
            sink.sec.malformed += 1;
            return;
        }
        for p in &mut self.paths {
            p.ack_arrived();
        }
        let mut newly_acked_any = false;
        let mut eliciting_acked = false;
        // Largest newly acknowledged packet sent on the path the ack came back on.
        let mut largest_on_path: Option<(u64, Instant)> = None;
        for (lo, hi) in a.ranges() {
            let start = self.sent.partition_point(|s| s.pn < lo);
            for i in start..self.sent.len() {
                if self.sent[i].pn > hi {
                    break;
                }
                if self.sent[i].resolved {
                    continue;
                }
                newly_acked_any = true;
                self.sent[i].resolved = true;
                let (pn, path, time_sent, size, cs, ce, in_flight, mtu_probe) = {
                    let s = &self.sent[i];
                    (
                        s.pn,
                        s.path as usize,
                        s.time_sent,
                        s.size as usize,
                        s.chunks_start,
                        s.chunks_end,
                        s.in_flight,
                        s.mtu_probe,
                    )
                };
                if path == pi_recv && largest_on_path.is_none_or(|(l, _)| pn > l) {
                    largest_on_path = Some((pn, time_sent));
                }
                let p = &mut self.paths[path];
                if p.largest_acked.is_none_or(|l| pn > l) {
                    p.largest_acked = Some(pn);
                }
                if !in_flight {
                    continue;
                }
                if path != pi_recv && p.state == PathState::Unknown {
                    // Acknowledged on another path first (acks cover the
                    // whole session): no RTT sample, but the path delivers.
                    // A standby path pinged while the active one carries
                    // acks might otherwise wait many pings for an ack of
                    // its own to win that race before it counts as up.
                    p.state = PathState::Up;
                    debug!(peer = %self.cfg.name, network = p.cfg.network.0, "path up (delivered)");
                    sink.events.push_back(Event::PathUp {
                        peer: self.id,
                        network: p.cfg.network,
                    });
                }
                eliciting_acked = true;
                if mtu_probe {
                    let was = p.datagram_bytes();
                    p.mtu.on_probe_acked(now, size);
                    if p.datagram_bytes() != was {
                        p.datagram_size_changed();
                        info!(
                            peer = %self.cfg.name,
                            network = %shared.topo.networks[p.cfg.network.0 as usize].0,
                            "the path carries datagrams of {} bytes (was {was}): data uses them",
                            p.datagram_bytes()
                        );
                    }
                } else if p.mtu.is_large(size) {
                    p.mtu.on_large_acked();
                }
                p.on_left_flight(size);
                p.on_ack_cc(now, time_sent, size);
                p.timeouts_in_row = 0;
                p.rto_base_touch(now);
                for ci in cs..ce {
                    let c = self.chunk_log[(ci - self.chunk_base) as usize];
                    self.on_chunk_acked(sink, c);
                }
            }
        }
        // Packets declared lost that this frame acknowledges after all
        // (usually none are remembered: skip parsing the ranges again).
        let ranges = if self.lost.is_empty() {
            None
        } else {
            Some(a.ranges())
        };
        for (lo, hi) in ranges.into_iter().flatten() {
            while let Some((&pn, _)) = self.lost.range(lo..=hi).next() {
                let l = self.lost.remove(&pn).expect("just found");
                newly_acked_any = true;
                eliciting_acked = true;
                let path = l.path as usize;
                if path == pi_recv && largest_on_path.is_none_or(|(x, _)| pn > x) {
                    largest_on_path = Some((pn, l.time_sent));
                }
                let p = &mut self.paths[path];
                if p.largest_acked.is_none_or(|x| pn > x) {
                    p.largest_acked = Some(pn);
                }
                p.timeouts_in_row = 0;
                let above = a.largest.saturating_sub(pn);
                if p.on_spurious_loss(now, l.time_sent, l.lost_at, above, t) {
                    debug!(peer = %self.cfg.name, cwnd = p.cwnd_bytes, "losses proved spurious: decrease undone");
                }
                sink.nets[p.cfg.network.0 as usize].spurious += 1;
                for c in l.chunks {
                    self.on_chunk_acked(sink, c);
                }
            }
        }
        // RTT sample of the path the ack came back on, from the largest newly
        // acknowledged packet sent on it, when something ack-eliciting was
        // acknowledged (RFC 9002 §5.1, per path). The peer's ack delay is
        // subtracted only when that packet is the frame's largest; otherwise
        // the sample may be high by up to `ack_delay_max`. Pings on several
        // paths at once would otherwise never yield a sample on any but one.
        if let Some((pn, time_sent)) = largest_on_path
            && eliciting_acked
        {
            let p = &mut self.paths[pi_recv];
            let ack_delay = if pn == a.largest {
                Duration::from_micros(a.delay_us).min(t.ack_delay_max)
            } else {
                Duration::ZERO
            };
            let raw = now.saturating_duration_since(time_sent);
            let rtt = if raw > ack_delay + GRANULARITY {
                raw - ack_delay
            } else {
                raw
            };
            p.rtt.sample(rtt);
            if p.state != PathState::Up {
                p.state = PathState::Up;
                debug!(peer = %self.cfg.name, network = p.cfg.network.0, "path up");
                sink.events.push_back(Event::PathUp {
                    peer: self.id,
                    network: p.cfg.network,
                });
            }
        }
        self.forget_lost(now, t);
        if newly_acked_any {
            self.detect_losses(now, shared, sink);
            self.trim_sent();
            self.refresh_active(shared, sink);
        }
        for p in &mut self.paths {
            p.ack_processed();
        }
    }

    fn on_chunk_acked(&mut self, sink: &mut Sink, c: Chunk) {
        let Some(lane) = self.lanes.get_mut(&c.lane) else {
            return;
        };
        let Some(m) = lane.get(c.seq) else { return };
        let (start, end) = c.range();
        m.acked.insert(start, end);
        if !(m.fully_queued() && m.fully_acked()) {
            return;
        }
        let i = (c.seq - lane.base_seq) as usize;
        let m = lane.msgs[i].take().expect("present");
        let charge = message_charge(m.body.len());
        if m.gated {
            self.buffered_bytes -= charge;
            sink.events.push_back(Event::Released {
                peer: self.id,
                bytes: charge,
            });
        } else {
            self.reply_bytes -= charge;
        }
        while matches!(lane.msgs.front(), Some(None)) {
            lane.msgs.pop_front();
            lane.base_seq += 1;
        }
    }

    /// Declares packets lost by packet or time threshold, per path (paths of
    /// different latency must not declare each other's packets lost).
    pub(super) fn detect_losses(&mut self, now: Instant, shared: &Shared, sink: &mut Sink) {
        let t = &shared.tuning;
        let max_la = self.paths.iter().filter_map(|p| p.largest_acked).max();
        let Some(max_la) = max_la else { return };
        for p in &mut self.paths {
            p.loss_time = None;
        }
        let mut lost = Vec::new();
        for (i, s) in self.sent.iter().enumerate() {
            if s.pn > max_la {
                break;
            }
            if s.resolved {
                continue;
            }
            let p = &mut self.paths[s.path as usize];
            let Some(la) = p.largest_acked else { continue };
            if s.pn > la {
                continue;
            }
            let loss_delay = p.loss_delay(t);
            if la >= s.pn.saturating_add(p.packet_threshold) || s.time_sent + loss_delay <= now {
                lost.push(i);
            } else {
                let when = s.time_sent + loss_delay;
                p.loss_time = Some(p.loss_time.map_or(when, |w: Instant| w.min(when)));
            }
        }
        for i in lost {
            self.declare_lost(now, shared, sink, i, false);
        }
        for pi in 0..self.paths.len() {
            self.arm_loss_timer(pi, t);
        }
    }

    pub(super) fn declare_lost(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        i: usize,
        path_down: bool,
    ) {
        let s = &mut self.sent[i];
        s.resolved = true;
        let (path, time_sent, size, cs, ce, credit, mtu_probe) = (
            s.path as usize,
            s.time_sent,
            s.size as usize,
            s.chunks_start,
            s.chunks_end,
            s.has_credit,
            s.mtu_probe,
        );
        if !s.in_flight {
            return;
        }
        let p = &mut self.paths[path];
        p.on_left_flight(size);
        if mtu_probe {
            // Too big for the path, most likely: not congestion, and
            // nothing to resend.
            p.mtu.on_probe_lost(now, size);
            return;
        }
        if !path_down && p.mtu.is_large(size) && p.mtu.on_large_lost(now) {
            p.datagram_size_changed();
            warn!(
                peer = %self.cfg.name,
                network = %shared.topo.networks[p.cfg.network.0 as usize].0,
                "datagrams larger than {} bytes stopped reaching the peer: back to that size, \
                 probing larger ones again in {} s",
                p.datagram_bytes(),
                crate::proto::mtu::BLACK_HOLE_RETRY.as_secs()
            );
        }
        if !path_down {
            p.on_loss_cc(now, time_sent);
        }
        p.on_lost(now);
        if credit {
            self.credit_dirty = true;
        }
        let pn = self.sent[i].pn;
        trace!(peer = %self.cfg.name, pn, "lost");
        if self.lost.len() >= LOST_RECORDS_MAX {
            self.lost.pop_first();
        }
        self.lost.insert(
            pn,
            LostPacket {
                path: path as u8,
                time_sent,
                lost_at: now,
                chunks: (cs..ce)
                    .map(|ci| self.chunk_log[(ci - self.chunk_base) as usize])
                    .collect(),
            },
        );
        if self.requeue_unacked(cs, ce, false) {
            sink.nets[self.paths[path].cfg.network.0 as usize].resends += 1;
            self.stats.resends += 1;
        }
    }

    /// Queues for resending the chunks `cs..ce` of the chunk log that are
    /// not acknowledged yet: at the back, or at the `front` (in order) for
    /// probes. Returns whether any was queued.
    pub(super) fn requeue_unacked(&mut self, cs: u64, ce: u64, front: bool) -> bool {
        let mut queued = false;
        for k in 0..ce - cs {
            // Pushed at the front, the last goes first so order is kept.
            let ci = if front { ce - 1 - k } else { cs + k };
            let c = self.chunk_log[(ci - self.chunk_base) as usize];
            let Some(lane) = self.lanes.get_mut(&c.lane) else {
                continue;
            };
            let Some(m) = lane.get(c.seq) else { continue };
            let (start, end) = c.range();
            if m.acked.contains_range(start, end) {
                continue;
            }
            queued = true;
            if front {
                self.retransmit.push_front(c);
            } else {
                self.retransmit.push_back(c);
            }
        }
        queued
    }

    /// Forgets lost packets declared more than `rto_max` ago: an
    /// acknowledgement later than that is not waited for.
    pub(super) fn forget_lost(&mut self, now: Instant, t: &Tuning) {
        while self
            .lost
            .first_key_value()
            .is_some_and(|(_, l)| now.saturating_duration_since(l.lost_at) >= t.rto_max)
        {
            self.lost.pop_first();
        }
    }

    pub(super) fn trim_sent(&mut self) {
        // Ack-only packets at the front are dropped as well: nothing will ever
        // acknowledge them unless a later ack-eliciting packet is pending.
        while self
            .sent
            .front()
            .is_some_and(|s| s.resolved || !s.in_flight)
        {
            self.sent.pop_front();
        }
        let keep_from = self
            .sent
            .front()
            .map_or(self.chunk_base + self.chunk_log.len() as u64, |s| {
                s.chunks_start
            });
        while self.chunk_base < keep_from {
            self.chunk_log.pop_front();
            self.chunk_base += 1;
        }
    }

    pub(super) fn arm_loss_timer(&mut self, pi: usize, t: &Tuning) {
        let p = &mut self.paths[pi];
        p.timers[PathTimer::Loss as usize] = if let Some(lt) = p.loss_time {
            Some(lt)
        } else if p.in_flight_packets > 0 {
            Some(p.rto_base.unwrap_or(p.last_send.unwrap_or(self.created)) + p.rto(t))
        } else {
            None
        };
    }

    fn on_stream(
        &mut self,
        shared: &Shared,
        sink: &mut Sink,
        s: &wire::StreamFrame<'_>,
        body: Bytes,
    ) {
        let t = &shared.tuning;
        if s.stream != StreamId::REPLY.0
            && s.stream != StreamId::PROBE.0
            && s.stream >= t.streams_max
        {
            sink.sec.malformed += 1;
            return;
        }
        if s.total_len as usize > t.message_bytes_max {
            sink.sec.malformed += 1;
            return;
        }
        let window = u64::from(t.stream_window_messages);
        let limit = self.credit_limit_in(t);
        let lane = self.recv_lanes.entry(s.stream).or_insert_with(|| RecvLane {
            ordered: lane_ordered(s.stream),
            base: 0,
            slots: VecDeque::new(),
        });
        if s.seq < lane.base {
            self.stats.duplicate_fragments += 1;
            return;
        }
        let idx = s.seq - lane.base;
        if idx >= window {
            sink.sec.malformed += 1;
            return;
        }
        let idx = idx as usize;
        if idx >= lane.slots.len() {
            let grow = idx + 1 - lane.slots.len();
            if self.recv_slots + grow > recv_slots_max(t) {
                // More than an honest sender's credit could have started.
                sink.sec.malformed += 1;
                return;
            }
            self.recv_slots += grow;
            lane.slots.resize_with(idx + 1, || Slot::Empty);
        }
        let slot = &mut lane.slots[idx];
        if let Slot::Empty = slot {
            let charge = message_charge(s.total_len as usize) as u64;
            if self.charged_in + charge > limit {
                sink.sec.malformed += 1;
                return;
            }
            self.charged_in += charge;
            let data = if s.offset == 0 && s.data.len() == s.total_len as usize {
                RecvData::Whole(body.clone())
            } else {
                // Exactly its length, carved from an arena (its own buffer
                // when larger than one).
                let total = s.total_len as usize;
                let arena = self.reassembly.arena(total);
                let rest = arena.split_off(total);
                RecvData::Parts(std::mem::replace(arena, rest))
            };
            *slot = Slot::Partial(RecvMsg {
                kind: s.kind,
                total: s.total_len,
                data,
                got: RangeSet::new(),
            });
        }
        let Slot::Partial(m) = slot else {
            self.stats.duplicate_fragments += 1;
            return;
        };
        if m.total != s.total_len || m.kind != s.kind {
            sink.sec.malformed += 1;
            return;
        }
        let start = u64::from(s.offset);
        let end = start + s.data.len() as u64;
        if s.data.is_empty() && s.total_len > 0 {
            return;
        }
        if s.total_len > 0 {
            if m.got.contains_range(start, end) {
                self.stats.duplicate_fragments += 1;
                return;
            }
            if m.got.len() >= 256 {
                // Pathological fragmentation: refuse rather than grow.
                sink.sec.malformed += 1;
                return;
            }
            if let RecvData::Parts(buf) = &mut m.data {
                // Fragments usually arrive in order: append without zeroing
                // the buffer first; fill holes in place; zero only gaps.
                let (start, end) = (start as usize, end as usize);
                let filled = buf.len();
                if end <= filled {
                    buf[start..end].copy_from_slice(s.data);
                } else if start <= filled {
                    buf[start..filled].copy_from_slice(&s.data[..filled - start]);
                    buf.extend_from_slice(&s.data[filled - start..]);
                } else {
                    buf.resize(start, 0);
                    buf.extend_from_slice(s.data);
                }
            }
            m.got.insert(start, end);
            if !m.got.contains_range(0, u64::from(m.total)) {
                return;
            }
        }
        let Slot::Partial(m) = std::mem::replace(slot, Slot::Empty) else {
            unreachable!()
        };
        *slot = Slot::Ready(m);
        self.deliver_ready(shared, sink, s.stream);
    }

    fn deliver_ready(&mut self, shared: &Shared, sink: &mut Sink, lane_id: u16) {
        let passed_max = passed_slots_max(&shared.tuning);
        let lane = self.recv_lanes.get_mut(&lane_id).expect("lane exists");
        let mut out = std::mem::take(&mut self.ready_scratch);
        if lane.ordered {
            loop {
                match lane.slots.front() {
                    Some(Slot::Ready(_)) => {
                        let Some(Slot::Ready(m)) = lane.slots.pop_front() else {
                            unreachable!()
                        };
                        out.push(m);
                    }
                    // A passing message delivered before its turn.
                    Some(Slot::Delivered) => {
                        lane.slots.pop_front();
                        self.passed_slots -= 1;
                    }
                    _ => break,
                }
                lane.base += 1;
                self.recv_slots -= 1;
            }
            // Passing messages go before earlier ones that have not arrived.
            for slot in lane.slots.iter_mut() {
                if self.passed_slots >= passed_max {
                    break;
                }
                if matches!(slot, Slot::Ready(m) if m.kind == MsgKind::Passing) {
                    self.passed_slots += 1;
                    self.stats.passed += 1;
                    let Slot::Ready(m) = std::mem::replace(slot, Slot::Delivered) else {
                        unreachable!()
                    };
                    out.push(m);
                }
            }
        } else {
            for slot in lane.slots.iter_mut() {
                if matches!(slot, Slot::Ready(_)) {
                    let Slot::Ready(m) = std::mem::replace(slot, Slot::Delivered) else {
                        unreachable!()
                    };
                    out.push(m);
                }
            }
            while matches!(lane.slots.front(), Some(Slot::Delivered)) {
                lane.slots.pop_front();
                lane.base += 1;
                self.recv_slots -= 1;
            }
        }
        for m in out.drain(..) {
            let body = match m.data {
                RecvData::Whole(b) => b,
                RecvData::Parts(b) => b.freeze(),
            };
            let credit = Credit {
                peer: self.id,
                session: self.session,
                bytes: message_charge(m.total as usize),
            };
            match m.kind {
                MsgKind::Reply(id) => {
                    // Replies are consumed by the endpoint itself.
                    self.released_in += credit.bytes as u64;
                    self.maybe_grant_credit_after_release();
                    if self.requests.remove(&id) {
                        self.stats.replies_received += 1;
                        self.stats.bytes_received += body.len() as u64;
                        sink.events.push_back(Event::Reply {
                            peer: self.id,
                            request: RequestId(id),
                            body,
                        });
                    }
                }
                kind => {
                    self.stats.rpcs_received += 1;
                    self.stats.bytes_received += body.len() as u64;
                    let kind = match kind {
                        MsgKind::Request(id) => IncomingKind::Request(ReplyTo {
                            peer: self.id,
                            session: self.session,
                            request: RequestId(id),
                        }),
                        _ => IncomingKind::OneWay,
                    };
                    sink.events.push_back(Event::Message(Delivery {
                        peer: self.id,
                        stream: StreamId(lane_id),
                        kind,
                        body,
                        credit,
                    }));
                }
            }
        }
        self.ready_scratch = out;
    }
}
