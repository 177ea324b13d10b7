//! Sending: choosing a path and packing frames into datagrams.

use std::time::Instant;

use crate::config::Tuning;
use crate::crypto::SessionIds;
use crate::proto::message_charge;
use crate::proto::path::PathState;
use crate::proto::{Shared, Sink, TRANSMIT_BYTES_MAX, Transmit};
use crate::wire::{self, FLAG_ENCRYPTED, HEADER_BYTES, Header, TAG_BYTES, Writer};

use super::{Chunk, FRAGMENT_BYTES_MIN, Peer, PeerTimer, SentPacket, data_packets_max, grow};

impl Peer {
    fn has_data(&self) -> bool {
        if !self.retransmit.is_empty() {
            return true;
        }
        let Some(&(lane, seq)) = self.pending.front() else {
            return false;
        };
        let Some(l) = self.lanes.get(&lane) else {
            return false;
        };
        let Some(Some(m)) = l.msgs.get((seq - l.base_seq) as usize) else {
            return false;
        };
        m.started || self.may_start(lane, seq, m.body.len())
    }

    /// Whether the first fragment of a message may go out: inside the
    /// stream's window and the peer's credit.
    fn may_start(&self, lane: u16, seq: u64, len: usize) -> bool {
        let l = &self.lanes[&lane];
        seq < l.base_seq + self.stream_window
            && self.credit_used + message_charge(len) as u64 <= self.credit_limit
    }

    /// Path for data: the active path, else overflow paths within the RTT
    /// ratio, each only with congestion-window room.
    fn data_path(&self, t: &Tuning) -> Option<usize> {
        if let Some(p) = self.pin {
            return (self.paths[p].is_usable()
                && self.paths[p].can_send(self.paths[p].datagram_bytes()))
            .then_some(p);
        }
        let a = self.active?;
        let pa = &self.paths[a];
        if pa.can_send(pa.datagram_bytes()) {
            return Some(a);
        }
        if t.spill_rtt_ratio == 0 || pa.state != PathState::Up {
            return None;
        }
        let limit = pa.rank_rtt(t) * t.spill_rtt_ratio;
        (0..self.paths.len())
            .filter(|&i| i != a)
            .filter(|&i| {
                let p = &self.paths[i];
                p.state == PathState::Up && p.rank_rtt(t) <= limit && p.can_send(p.datagram_bytes())
            })
            .min_by_key(|&i| (self.paths[i].rank_rtt(t), i))
    }

    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        let t = &shared.tuning;
        // Hellos (handshake, or answers to a peer that lost track of us).
        for pi in 0..self.paths.len() {
            if self.hello_due[pi] || self.close_due[pi] {
                let len = self.build_control(now, shared, sink, pi, buf);
                if len > 0 {
                    return Some(self.transmit(pi, len, len));
                }
            }
        }
        self.remote_epoch?;
        // Acks and pings owed on specific paths; data may ride along.
        let data_path = self.data_path(t);
        for pi in 0..self.paths.len() {
            let p = &self.paths[pi];
            if p.ack_pending || p.ping_pending || (self.credit_dirty && Some(pi) == data_path) {
                let with_data = Some(pi) == data_path && !(p.ping_pending && p.ping_alone);
                self.paths[pi].ping_alone = false;
                let seg = self.paths[pi].datagram_bytes();
                grow(buf, seg);
                let len = self.build_packet(now, shared, sink, pi, &mut buf[..seg], with_data);
                if len > 0 {
                    return Some(self.transmit(pi, len, len));
                }
            }
        }
        // A path-MTU probe, when one is due.
        for pi in 0..self.paths.len() {
            if let Some(len) = self.build_mtu_probe(now, shared, sink, pi, buf) {
                return Some(self.transmit(pi, len, len));
            }
        }
        // Data, batched for GSO while datagrams come out full-sized.
        let pi = data_path?;
        if !self.has_data() || self.sent.len() >= data_packets_max(t) {
            return None;
        }
        let seg = self.paths[pi].datagram_bytes();
        let mut total = 0;
        for _ in 0..max_datagrams {
            if total + seg > TRANSMIT_BYTES_MAX && total > 0 {
                break;
            }
            if !self.has_data()
                || !self.paths[pi].can_send(seg)
                || self.sent.len() >= data_packets_max(t)
                || (self.data_path(t) != Some(pi))
            {
                break;
            }
            grow(buf, total + seg);
            let len = self.build_packet(now, shared, sink, pi, &mut buf[total..total + seg], true);
            if len == 0 {
                break;
            }
            total += len;
            if len < seg {
                break;
            }
        }
        (total > 0).then(|| self.transmit(pi, total, seg.min(total)))
    }

    /// A path-MTU probe on path `pi`, if one is due and the path is up, not
    /// timing out, with room in its window: a datagram of the size to try, holding pings
    /// only (a ping is one byte, so the padding is pings too, which every
    /// version of the protocol reads). Returns its length.
    fn build_mtu_probe(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        pi: usize,
        buf: &mut Vec<u8>,
    ) -> Option<usize> {
        let t = &shared.tuning;
        let p = &self.paths[pi];
        let size = p.mtu.probe_due(now)?;
        // Not while the path times out: its probe budget is for data.
        if p.state != PathState::Up
            || p.timeouts_in_row > 0
            || p.in_flight_bytes + size > p.cwnd_bytes
            || self.sent.len() >= t.sent_packets_max.min(data_packets_max(t))
        {
            return None;
        }
        grow(buf, size);
        buf[HEADER_BYTES..size - TAG_BYTES].fill(wire::FRAME_PING);
        let pn = self.next_pn;
        self.next_pn += 1;
        let end = self.chunk_base + self.chunk_log.len() as u64;
        self.sent.push_back(SentPacket {
            pn,
            path: pi as u8,
            time_sent: now,
            size: size as u32,
            chunks_start: end,
            chunks_end: end,
            has_credit: false,
            in_flight: true,
            resolved: false,
            mtu_probe: true,
        });
        let p = &mut self.paths[pi];
        p.on_sent(now, size, true);
        p.mtu.on_probe_sent(size);
        self.arm_loss_timer(pi, t);
        self.seal(
            shared,
            self.remote_epoch.expect("session established"),
            pn,
            &mut buf[..size],
        );
        self.account_sent(sink, pi, size, false);
        Some(size)
    }

    fn transmit(&self, pi: usize, len: usize, segment_bytes: usize) -> Transmit {
        let p = &self.paths[pi];
        Transmit {
            network: p.cfg.network,
            destination: p.cfg.remote_addr,
            len,
            segment_bytes,
        }
    }

    /// A hello (or close) datagram on path `pi`; returns its length.
    fn build_control(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        pi: usize,
        buf: &mut Vec<u8>,
    ) -> usize {
        let close = self.close_due[pi];
        self.hello_due[pi] = false;
        self.close_due[pi] = false;
        let dst_epoch = self.remote_epoch.unwrap_or(0);
        let len = HEADER_BYTES + 1 + TAG_BYTES;
        grow(buf, len);
        buf[HEADER_BYTES] = if close {
            wire::FRAME_CLOSE
        } else {
            wire::FRAME_HELLO
        };
        let pn = if dst_epoch == 0 {
            let pn = self.hello_pn;
            self.hello_pn += 1;
            pn
        } else {
            let pn = self.next_pn;
            self.next_pn += 1;
            // Hellos in a session are ack-eliciting and tracked like any packet.
            let tracked = self.sent.len() < shared.tuning.sent_packets_max;
            let end = self.chunk_base + self.chunk_log.len() as u64;
            if tracked {
                self.sent.push_back(SentPacket {
                    pn,
                    path: pi as u8,
                    time_sent: now,
                    size: len as u32,
                    chunks_start: end,
                    chunks_end: end,
                    has_credit: false,
                    in_flight: !close,
                    resolved: close,
                    mtu_probe: false,
                });
            }
            if !close && tracked {
                self.paths[pi].on_sent(now, len, true);
                self.arm_loss_timer(pi, &shared.tuning);
            }
            pn
        };
        self.seal(shared, dst_epoch, pn, &mut buf[..len]);
        self.trim_sent();
        self.account_sent(sink, pi, len, false);
        len
    }

    fn account_sent(&mut self, sink: &mut Sink, pi: usize, len: usize, data: bool) {
        let ns = &mut sink.nets[self.paths[pi].cfg.network.0 as usize];
        ns.packets_sent += 1;
        ns.bytes_sent += len as u64;
        if !data {
            ns.other += 1;
        }
    }

    fn seal(&mut self, shared: &Shared, dst_epoch: u64, pn: u64, datagram: &mut [u8]) {
        let src_epoch = self.local_epoch();
        let hdr = Header {
            flags: if shared.encrypt { FLAG_ENCRYPTED } else { 0 },
            cluster_id: shared.topo.cluster_id,
            src_machine: shared.topo.local_machine_id,
            dst_machine: self.cfg.machine_id,
            src_epoch,
            dst_epoch,
            packet_number: pn,
        };
        hdr.encode(datagram);
        let ids = SessionIds {
            src_machine: shared.topo.local_machine_id,
            src_epoch,
            dst_machine: self.cfg.machine_id,
            dst_epoch,
        };
        let key = if dst_epoch == 0 {
            self.hello_key
                .get_or_insert_with(|| shared.master.session(ids))
        } else {
            if self.tx_key.as_ref().is_none_or(|k| k.0 != dst_epoch) {
                self.tx_key = Some((dst_epoch, shared.master.session(ids)));
            }
            &self.tx_key.as_ref().expect("just set").1
        };
        key.seal(pn, datagram, shared.encrypt);
    }

    /// Builds one session packet on path `pi` into `out` (its length is the
    /// path's datagram size); returns the datagram length or 0 if there was
    /// nothing to send.
    fn build_packet(
        &mut self,
        now: Instant,
        shared: &Shared,
        sink: &mut Sink,
        pi: usize,
        out: &mut [u8],
        with_data: bool,
    ) -> usize {
        let t = &shared.tuning;
        let seg = out.len();
        let cap = seg - TAG_BYTES;
        let mut w = Writer::new(&mut out[HEADER_BYTES..cap]);
        let mut eliciting = false;
        let mut has_credit = false;
        // ACK for what arrived on this path (covers the whole session).
        if self.paths[pi].unacked_received > 0 || self.paths[pi].ack_pending {
            // Nearly always a few ranges: on the stack, no allocation.
            let ranges: smallvec::SmallVec<[(u64, u64); 8]> = self
                .received_pns
                .iter()
                .rev()
                .take(wire::ACK_RANGES_MAX)
                .map(|(s, e)| (s, e - 1))
                .collect();
            let delay = self.largest_received.map_or(0, |(_, at)| {
                now.saturating_duration_since(at).as_micros() as u64
            });
            if wire::ack_frame_len_max(ranges.len()) + 10 <= w.remaining()
                && wire::write_ack(&mut w, delay, &ranges)
            {
                let p = &mut self.paths[pi];
                p.ack_pending = false;
                p.unacked_received = 0;
                if self.paths.iter().all(|p| p.unacked_received == 0) {
                    self.timers[PeerTimer::Ack as usize] = None;
                }
                // Credit rides with every ack so a lost grant heals itself.
                let limit = self.credit_limit_in(t);
                w.u8(wire::FRAME_CREDIT);
                w.varint(limit);
                self.credit_advertised = limit;
                has_credit = true;
            }
        }
        if self.credit_dirty && w.remaining() > 10 {
            let limit = self.credit_limit_in(t);
            if !has_credit {
                w.u8(wire::FRAME_CREDIT);
                w.varint(limit);
            }
            self.credit_advertised = limit;
            self.credit_dirty = false;
            has_credit = true;
            // A grant the sender may be blocked on must arrive: elicit an ack.
            self.paths[pi].ping_pending = true;
        }
        if self.paths[pi].ping_pending {
            self.paths[pi].ping_pending = false;
            w.u8(wire::FRAME_PING);
            eliciting = true;
        }
        let chunks_start = self.chunk_base + self.chunk_log.len() as u64;
        let mut data = false;
        if with_data && self.sent.len() < data_packets_max(t) && self.paths[pi].can_send(seg) {
            data = self.fill_data(sink, &mut w);
            eliciting |= data;
        }
        if w.is_empty() {
            return 0;
        }
        let payload_len = w.len();
        let len = HEADER_BYTES + payload_len + TAG_BYTES;
        let pn = self.next_pn;
        self.next_pn += 1;
        let chunks_end = self.chunk_base + self.chunk_log.len() as u64;
        // Control packets beyond the bound go untracked: they carry nothing
        // to retransmit (CREDIT rides every ack again), only a lost RTT sample.
        let track = data || self.sent.len() < t.sent_packets_max;
        if track {
            self.sent.push_back(SentPacket {
                pn,
                path: pi as u8,
                time_sent: now,
                size: len as u32,
                chunks_start,
                chunks_end,
                has_credit,
                in_flight: eliciting,
                resolved: false,
                mtu_probe: false,
            });
        }
        if eliciting && track {
            let p = &mut self.paths[pi];
            p.on_sent(now, len, true);
            self.arm_loss_timer(pi, t);
        } else {
            self.paths[pi].last_send = Some(now);
        }
        self.trim_sent();
        self.seal(
            shared,
            self.remote_epoch.expect("session established"),
            pn,
            &mut out[..len],
        );
        self.account_sent(sink, pi, len, data);
        len
    }

    /// Writes STREAM frames: retransmissions first, then new data in
    /// submission order. Returns whether any was written.
    fn fill_data(&mut self, _sink: &mut Sink, w: &mut Writer<'_>) -> bool {
        let mut wrote = false;
        loop {
            if self.chunk_log.len() >= self.chunk_records_max {
                break;
            }
            let room = w.remaining();
            if room < wire::STREAM_FRAME_OVERHEAD_BYTES + FRAGMENT_BYTES_MIN.min(room) {
                break;
            }
            // Retransmissions.
            if let Some(c) = self.retransmit.pop_front() {
                let Some(lane) = self.lanes.get_mut(&c.lane) else {
                    continue;
                };
                let Some(m) = lane.get(c.seq) else { continue };
                let (start, end) = c.range();
                if m.acked.contains_range(start, end) {
                    continue;
                }
                let total = m.body.len() as u32;
                let hdr = wire::stream_frame_header_len(
                    c.lane,
                    c.seq,
                    m.kind,
                    total,
                    c.offset,
                    c.len as usize,
                );
                let fit = (room.saturating_sub(hdr) as u32).min(c.len);
                if fit == 0 && c.len > 0 {
                    self.retransmit.push_front(c);
                    break;
                }
                let piece = m.body.slice(c.offset as usize..(c.offset + fit) as usize);
                wire::write_stream(
                    w,
                    &wire::StreamFrame {
                        stream: c.lane,
                        seq: c.seq,
                        kind: m.kind,
                        total_len: total,
                        offset: c.offset,
                        data: &piece,
                    },
                );
                self.chunk_log.push_back(Chunk { len: fit, ..c });
                if fit < c.len {
                    self.retransmit.push_front(Chunk {
                        offset: c.offset + fit,
                        len: c.len - fit,
                        ..c
                    });
                }
                wrote = true;
                continue;
            }
            // New data.
            let Some(&(lane_id, seq)) = self.pending.front() else {
                break;
            };
            let (len, started) = {
                let lane = self.lanes.get_mut(&lane_id).expect("pending lane exists");
                let m = lane.get(seq).expect("pending message exists");
                (m.body.len(), m.started)
            };
            if !started {
                if !self.may_start(lane_id, seq, len) {
                    break;
                }
                self.credit_used += message_charge(len) as u64;
            }
            let lane = self.lanes.get_mut(&lane_id).expect("pending lane exists");
            let m = lane.get(seq).expect("pending message exists");
            m.started = true;
            let total = m.body.len() as u32;
            let off = m.sent_offset;
            let left = total - off;
            let hdr =
                wire::stream_frame_header_len(lane_id, seq, m.kind, total, off, left as usize);
            let fit = (room.saturating_sub(hdr) as u32).min(left);
            if fit == 0 && left > 0 {
                break;
            }
            let piece = m.body.slice(off as usize..(off + fit) as usize);
            wire::write_stream(
                w,
                &wire::StreamFrame {
                    stream: lane_id,
                    seq,
                    kind: m.kind,
                    total_len: total,
                    offset: off,
                    data: &piece,
                },
            );
            m.sent_offset += fit;
            m.fragments += 1;
            let done = m.sent_offset == total;
            let frags = m.fragments;
            self.chunk_log.push_back(Chunk {
                lane: lane_id,
                seq,
                offset: off,
                len: fit,
            });
            wrote = true;
            if done {
                self.pending.pop_front();
                if frags > 1 {
                    self.stats.fragmented += 1;
                    self.stats.fragments += u64::from(frags);
                }
            }
        }
        wrote
    }
}
