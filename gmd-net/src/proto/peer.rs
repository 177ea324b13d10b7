//! Protocol state toward one remote machine: session and epochs, packet
//! numbers and acknowledgements, loss recovery, streams, reassembly, flow
//! control and path choice.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, trace};

use super::path::{GRANULARITY, Path, PathState, PathTimer};
use super::{
    Credit, Delivery, Event, IncomingKind, PeerFootprint, ReplyTo, RequestId, Shared, Sink,
    Transmit,
};
use super::{MESSAGE_OVERHEAD_BYTES, message_charge};
use crate::config::{NetworkId, PeerConfig, PeerId, Tuning};
use crate::crypto::{ReplayWindow, SessionIds, SessionKey};
use crate::ranges::RangeSet;
use crate::stats::{MachineStats, PathStats, Stats};
use crate::wire::{self, FLAG_ENCRYPTED, Frame, HEADER_BYTES, Header, MsgKind, TAG_BYTES, Writer};
use crate::{NetError, StreamId};

/// Packets acknowledged above a missing one before it is declared lost.
const PACKET_THRESHOLD: u64 = 3;
/// Ack-eliciting packets received before an acknowledgement is sent at once.
const ACK_EVERY_PACKETS: u32 = 2;
/// Smallest useful fragment when filling the end of a datagram.
const FRAGMENT_BYTES_MIN: usize = 64;

/// Timers of a peer, indexing `Peer::timers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerTimer {
    /// Next hello while the peer's epoch is unknown.
    Handshake = 0,
    /// Delayed acknowledgement.
    Ack = 1,
    /// Promote-failure timeout.
    Down = 2,
}
const PEER_TIMER_COUNT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    /// Never reached (or reached again after down) — handshaking.
    Connecting,
    Up,
    /// Declared down; sends fail until contact resumes.
    Down,
}

/// One fragment of a message in a sent packet.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    lane: u16,
    seq: u64,
    offset: u32,
    len: u32,
}

impl Chunk {
    /// The byte range it covers; an empty message counts as `[0, 1)`.
    fn range(&self) -> (u64, u64) {
        let start = u64::from(self.offset);
        (
            start,
            if self.len == 0 {
                start + 1
            } else {
                start + u64::from(self.len)
            },
        )
    }
}

#[derive(Debug)]
struct SentPacket {
    pn: u64,
    path: u8,
    time_sent: Instant,
    size: u32,
    /// Chunk records `[chunks_start, chunks_end)` in `Peer::chunk_log`.
    chunks_start: u64,
    chunks_end: u64,
    has_credit: bool,
    /// Ack-eliciting, counted in the path's bytes in flight. Ack-only
    /// packets are tracked too, for the send time of RTT samples.
    in_flight: bool,
    resolved: bool,
}

#[derive(Debug)]
struct OutMsg {
    kind: MsgKind,
    body: Bytes,
    /// Next offset never sent yet.
    sent_offset: u32,
    /// The first fragment went out (credit was taken).
    started: bool,
    /// Bytes acknowledged; an empty message counts as `[0, 1)`.
    acked: RangeSet,
    /// Counts against the gated send buffer (not a reply).
    gated: bool,
    /// Original fragments sent.
    fragments: u32,
}

impl OutMsg {
    fn extent(&self) -> u64 {
        (self.body.len() as u64).max(1)
    }
    fn fully_queued(&self) -> bool {
        self.started && self.sent_offset as usize >= self.body.len()
    }
    fn fully_acked(&self) -> bool {
        self.acked.contains_range(0, self.extent())
    }
}

#[derive(Debug, Default)]
struct SendLane {
    next_seq: u64,
    /// Sequence number of `msgs[0]`.
    base_seq: u64,
    /// `None` once acknowledged (popped from the front).
    msgs: VecDeque<Option<OutMsg>>,
}

impl SendLane {
    fn get(&mut self, seq: u64) -> Option<&mut OutMsg> {
        let i = seq.checked_sub(self.base_seq)?;
        self.msgs.get_mut(i as usize).and_then(|m| m.as_mut())
    }
}

#[derive(Debug)]
enum RecvData {
    Whole(Bytes),
    Parts(BytesMut),
}

#[derive(Debug)]
struct RecvMsg {
    kind: MsgKind,
    total: u32,
    data: RecvData,
    got: RangeSet,
}

#[derive(Debug)]
enum Slot {
    Empty,
    Partial(RecvMsg),
    /// Complete, waiting for earlier messages (ordered streams).
    Ready(RecvMsg),
    Delivered,
}

#[derive(Debug)]
struct RecvLane {
    ordered: bool,
    /// Sequence number of `slots[0]`: everything below was delivered.
    base: u64,
    slots: VecDeque<Slot>,
}

/// What happened to a peer's session.
#[derive(Debug, Clone, Copy)]
enum Reset {
    Down,
    Restarted(u64),
    Closed,
}

#[derive(Debug)]
pub(crate) struct Peer {
    id: PeerId,
    cfg: PeerConfig,
    boot_epoch: u64,
    /// Bumped when we reset the session ourselves (peer declared down).
    generation: u64,
    remote_epoch: Option<u64>,
    state: PeerState,
    /// Counter identifying the current session for credits and replies.
    session: u64,
    paths: Vec<Path>,
    active: Option<usize>,
    pin: Option<usize>,
    stream_window: u64,
    chunk_records_max: usize,
    recv_window: u64,

    tx_key: Option<(u64, SessionKey)>,
    rx_key: Option<(u64, u64, SessionKey)>,
    rx_hello_key: Option<(u64, SessionKey)>,
    hello_key: Option<SessionKey>,
    replay: ReplayWindow,
    replay_hello: ReplayWindow,
    next_pn: u64,
    hello_pn: u64,

    sent: VecDeque<SentPacket>,
    chunk_log: VecDeque<Chunk>,
    chunk_base: u64,
    received_pns: RangeSet,
    largest_received: Option<(u64, Instant)>,

    lanes: BTreeMap<u16, SendLane>,
    pending: VecDeque<(u16, u64)>,
    retransmit: VecDeque<Chunk>,
    buffered_bytes: usize,
    reply_bytes: usize,
    credit_limit: u64,
    credit_used: u64,
    requests: std::collections::BTreeSet<u64>,
    next_request: u64,

    recv_lanes: BTreeMap<u16, RecvLane>,
    /// Receive slots across all lanes (bounded by `recv_slots_max`).
    recv_slots: usize,
    charged_in: u64,
    released_in: u64,
    credit_advertised: u64,
    credit_dirty: bool,

    timers: [Option<Instant>; PEER_TIMER_COUNT],
    created: Instant,
    last_recv: Option<Instant>,
    stats: MachineStats,
    /// Per path: a hello is owed (handshake or answer to a stale datagram).
    hello_due: Vec<bool>,
    last_hello_reply: Vec<Option<Instant>>,
    close_due: Vec<bool>,
}

/// Makes `buf` at least `len` long. Transmit buffers are reused without
/// truncation, so steady-state sends never zero-fill them again; only
/// `buf[..Transmit::len]` is meaningful.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Sent packets that may be tracked before new data waits; the rest of
/// `sent_packets_max` is kept for acknowledgements and pings.
fn data_packets_max(t: &Tuning) -> usize {
    t.sent_packets_max - CONTROL_PACKETS_RESERVED
}

/// Fragment records kept for tracked packets (each 24 bytes).
pub(crate) fn chunk_records_max(t: &Tuning) -> usize {
    t.sent_packets_max * CHUNKS_PER_PACKET_AVG
}

/// Average fragments per tracked packet that `chunk_records_max` allows;
/// packets of many tiny messages stop filling at the bound.
const CHUNKS_PER_PACKET_AVG: usize = 4;

/// Receive slots across all streams: what the receive window can have
/// started (each message is charged at least `MESSAGE_OVERHEAD_BYTES`), plus
/// the windows of the three unordered lanes, whose delivered slots wait for
/// earlier ones after their credit was released.
pub(crate) fn recv_slots_max(t: &Tuning) -> usize {
    t.recv_window_bytes / MESSAGE_OVERHEAD_BYTES + 3 * t.stream_window_messages as usize
}

/// Tracked packets reserved for control traffic.
const CONTROL_PACKETS_RESERVED: usize = 32;
const _: () = assert!(
    CONTROL_PACKETS_RESERVED < 64,
    "sent_packets_max is validated to be >= 64"
);

fn lane_ordered(lane: u16) -> bool {
    StreamId(lane).is_ordered()
}

impl Peer {
    pub(crate) fn new(
        id: PeerId,
        cfg: PeerConfig,
        boot_epoch: u64,
        shared: &Shared,
        now: Instant,
    ) -> Peer {
        let t = &shared.tuning;
        let paths: Vec<Path> = cfg
            .paths
            .iter()
            .map(|pc| Path::new(pc.clone(), t))
            .collect();
        let n = paths.len();
        let mut p = Peer {
            id,
            stats: MachineStats {
                name: cfg.name.clone(),
                ..Default::default()
            },
            cfg,
            boot_epoch,
            generation: 0,
            remote_epoch: None,
            state: PeerState::Connecting,
            session: 0,
            paths,
            active: Some(0),
            pin: None,
            stream_window: u64::from(t.stream_window_messages),
            chunk_records_max: chunk_records_max(t),
            recv_window: t.recv_window_bytes as u64,
            tx_key: None,
            rx_key: None,
            rx_hello_key: None,
            hello_key: None,
            replay: ReplayWindow::default(),
            replay_hello: ReplayWindow::default(),
            next_pn: 0,
            hello_pn: 0,
            sent: VecDeque::new(),
            chunk_log: VecDeque::new(),
            chunk_base: 0,
            received_pns: RangeSet::new(),
            largest_received: None,
            lanes: BTreeMap::new(),
            pending: VecDeque::new(),
            retransmit: VecDeque::new(),
            buffered_bytes: 0,
            reply_bytes: 0,
            credit_limit: t.recv_window_bytes as u64,
            credit_used: 0,
            requests: Default::default(),
            next_request: 1,
            recv_lanes: BTreeMap::new(),
            recv_slots: 0,
            charged_in: 0,
            released_in: 0,
            credit_advertised: t.recv_window_bytes as u64,
            credit_dirty: false,
            timers: [None; PEER_TIMER_COUNT],
            created: now,
            last_recv: None,
            hello_due: vec![true; n],
            last_hello_reply: vec![None; n],
            close_due: vec![false; n],
        };
        p.timers[PeerTimer::Handshake as usize] = Some(now + t.handshake_interval);
        p.arm_down_timer();
        p
    }

    pub(crate) fn local_epoch(&self) -> u64 {
        self.boot_epoch + self.generation
    }

    pub(crate) fn remote_epoch(&self) -> Option<u64> {
        self.remote_epoch
    }

    pub(crate) fn session_tag(&self) -> u64 {
        self.session
    }

    /// Congestion window of the preferred path, bytes (congestion: wan2).
    pub(crate) fn window_bytes(&self) -> Option<usize> {
        self.active.map(|i| self.paths[i].cwnd_bytes)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.state == PeerState::Up
    }

    pub(crate) fn session_gone_error(&self) -> NetError {
        match (self.state, self.remote_epoch) {
            (PeerState::Down, _) | (_, None) => self.down_error(),
            (_, Some(e)) => NetError::PeerRestarted {
                peer: self.cfg.name.clone(),
                epoch: e,
            },
        }
    }

    fn down_error(&self) -> NetError {
        NetError::PeerDown {
            peer: self.cfg.name.clone(),
            timeout: self.cfg.promote_failure_timeout.unwrap_or_default(),
        }
    }

    pub(crate) fn pin(&mut self, network: Option<NetworkId>) -> Result<(), NetError> {
        self.pin = match network {
            None => None,
            Some(n) => Some(
                self.paths
                    .iter()
                    .position(|p| p.cfg.network == n)
                    .ok_or_else(|| {
                        NetError::Config(format!(
                            "peer {} has no path on network {}",
                            self.cfg.name, n.0
                        ))
                    })?,
            ),
        };
        Ok(())
    }

    // ------------------------------------------------------------------
    // Application side.

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

    fn credit_limit_in(&self, t: &Tuning) -> u64 {
        self.released_in + t.recv_window_bytes as u64
    }

    fn maybe_grant_credit_after_release(&mut self) {
        // Advertise when at least an eighth of the window was freed, so that
        // a sender blocked on credit resumes without waiting for an ack.
        let limit = self.released_in + self.recv_window;
        if limit >= self.credit_advertised + self.recv_window / 8 {
            self.credit_dirty = true;
        }
    }

    // ------------------------------------------------------------------
    // Session management.

    fn arm_down_timer(&mut self) {
        self.timers[PeerTimer::Down as usize] = self
            .cfg
            .promote_failure_timeout
            .map(|t| self.last_recv.unwrap_or(self.created) + t);
    }

    fn reset_session(&mut self, now: Instant, shared: &Shared, sink: &mut Sink, why: Reset) {
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
        self.chunk_log.clear();
        self.chunk_base = 0;
        self.received_pns.clear();
        self.largest_received = None;
        self.recv_lanes.clear();
        self.recv_slots = 0;
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

    fn on_session_established(
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

    // ------------------------------------------------------------------
    // Receiving.

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
                let (pn, path, time_sent, size, cs, ce, in_flight) = {
                    let s = &self.sent[i];
                    (
                        s.pn,
                        s.path as usize,
                        s.time_sent,
                        s.size as usize,
                        s.chunks_start,
                        s.chunks_end,
                        s.in_flight,
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
                eliciting_acked = true;
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
        if newly_acked_any {
            self.detect_losses(now, shared, sink);
            self.trim_sent();
            self.refresh_active(shared, sink);
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
    fn detect_losses(&mut self, now: Instant, shared: &Shared, sink: &mut Sink) {
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
            let rtt = p.rtt.srtt().unwrap_or(t.rto_initial).max(p.rtt.latest());
            let loss_delay = (rtt * 9 / 8).max(GRANULARITY);
            if la >= s.pn + PACKET_THRESHOLD || s.time_sent + loss_delay <= now {
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

    fn declare_lost(
        &mut self,
        now: Instant,
        _shared: &Shared,
        sink: &mut Sink,
        i: usize,
        timeout: bool,
    ) {
        let s = &mut self.sent[i];
        s.resolved = true;
        let (path, time_sent, size, cs, ce, credit) = (
            s.path as usize,
            s.time_sent,
            s.size as usize,
            s.chunks_start,
            s.chunks_end,
            s.has_credit,
        );
        if !s.in_flight {
            return;
        }
        let p = &mut self.paths[path];
        p.on_left_flight(size);
        if !timeout {
            p.on_loss_cc(now, time_sent);
        }
        if credit {
            self.credit_dirty = true;
        }
        if ce > cs {
            sink.nets[p.cfg.network.0 as usize].resends += 1;
            self.stats.resends += 1;
        }
        trace!(peer = %self.cfg.name, pn = self.sent[i].pn, "lost");
        for ci in cs..ce {
            let c = self.chunk_log[(ci - self.chunk_base) as usize];
            let Some(lane) = self.lanes.get_mut(&c.lane) else {
                continue;
            };
            let Some(m) = lane.get(c.seq) else { continue };
            let (start, end) = c.range();
            if !m.acked.contains_range(start, end) {
                self.retransmit.push_back(c);
            }
        }
    }

    fn trim_sent(&mut self) {
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

    fn arm_loss_timer(&mut self, pi: usize, t: &Tuning) {
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
                RecvData::Parts(BytesMut::with_capacity(s.total_len as usize))
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

    fn deliver_ready(&mut self, _shared: &Shared, sink: &mut Sink, lane_id: u16) {
        let lane = self.recv_lanes.get_mut(&lane_id).expect("lane exists");
        let mut out = Vec::new();
        if lane.ordered {
            while matches!(lane.slots.front(), Some(Slot::Ready(_))) {
                let Some(Slot::Ready(m)) = lane.slots.pop_front() else {
                    unreachable!()
                };
                lane.base += 1;
                self.recv_slots -= 1;
                out.push(m);
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
        for m in out {
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
    }

    // ------------------------------------------------------------------
    // Timers.

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
        // Retransmission timeout: everything in flight on this path is lost.
        let net = self.paths[pi].cfg.network;
        sink.nets[net.0 as usize].timeouts += 1;
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
        let p = &mut self.paths[pi];
        p.on_timeout_cc(now);
        p.timeouts_in_row += 1;
        p.rto_base = Some(now);
        p.ping_pending = true;
        debug!(peer = %self.cfg.name, network = net.0, timeouts = p.timeouts_in_row, "retransmission timeout");
        if p.timeouts_in_row >= t.path_timeouts_max && p.state != PathState::Down {
            p.state = PathState::Down;
            sink.nets[net.0 as usize].failures += 1;
            debug!(peer = %self.cfg.name, network = net.0, "path down");
            sink.events.push_back(Event::PathDown {
                peer: self.id,
                network: net,
            });
            self.refresh_active(shared, sink);
        }
        self.arm_loss_timer(pi, t);
    }

    /// Chooses the preferred path: lowest smoothed RTT among working paths,
    /// the first on ties, with a hysteresis band so near-equal paths do not
    /// flap.
    fn refresh_active(&mut self, shared: &Shared, sink: &mut Sink) {
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

    // ------------------------------------------------------------------
    // Sending.

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
                && self.paths[p].can_send(self.paths[p].cfg.datagram_bytes))
            .then_some(p);
        }
        let a = self.active?;
        let pa = &self.paths[a];
        if pa.can_send(pa.cfg.datagram_bytes) {
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
                p.state == PathState::Up
                    && p.rank_rtt(t) <= limit
                    && p.can_send(p.cfg.datagram_bytes)
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
                let with_data = Some(pi) == data_path;
                let seg = self.paths[pi].cfg.datagram_bytes;
                grow(buf, seg);
                let len = self.build_packet(now, shared, sink, pi, &mut buf[..seg], with_data);
                if len > 0 {
                    return Some(self.transmit(pi, len, len));
                }
            }
        }
        // Data, batched for GSO while datagrams come out full-sized.
        let pi = data_path?;
        if !self.has_data() || self.sent.len() >= data_packets_max(t) {
            return None;
        }
        let seg = self.paths[pi].cfg.datagram_bytes;
        let mut total = 0;
        for _ in 0..max_datagrams {
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
            let ranges: Vec<(u64, u64)> = self
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

    // ------------------------------------------------------------------
    // Introspection.

    pub(crate) fn footprint(&self) -> PeerFootprint {
        PeerFootprint {
            send_buffered_bytes: self.buffered_bytes,
            reply_buffered_bytes: self.reply_bytes,
            send_messages: self.lanes.values().map(|l| l.msgs.len()).sum(),
            sent_packets: self.sent.len(),
            chunk_records: self.chunk_log.len(),
            retransmit_chunks: self.retransmit.len(),
            recv_charged_bytes: (self.charged_in - self.released_in.min(self.charged_in)) as usize,
            recv_slots: self.recv_lanes.values().map(|l| l.slots.len()).sum(),
            recv_slots_accounted: self.recv_slots,
            requests: self.requests.len(),
            ack_ranges: self.received_pns.len(),
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.buffered_bytes == 0
            && self.reply_bytes == 0
            && self.pending.is_empty()
            && self.retransmit.is_empty()
            && self.requests.is_empty()
            && self.lanes.values().all(|l| l.msgs.is_empty())
    }

    pub(crate) fn add_stats(&self, shared: &Shared, st: &mut Stats) {
        let t = &shared.tuning;
        let mut m = self.stats.clone();
        m.up = self.state == PeerState::Up;
        m.epoch = self.remote_epoch;
        m.active_network = self.active.map(|i| {
            shared.topo.networks[self.paths[i].cfg.network.0 as usize]
                .0
                .clone()
        });
        st.machines.push(m);
        for (i, p) in self.paths.iter().enumerate() {
            st.paths.push(PathStats {
                peer: self.cfg.name.clone(),
                network: shared.topo.networks[p.cfg.network.0 as usize].0.clone(),
                up: p.state == PathState::Up,
                active: self.active == Some(i),
                srtt: p.rtt.srtt(),
                rttvar: p.rtt.srtt().map(|_| p.rtt.rttvar()),
                rto: p.rto(t),
                cwnd_bytes: p.cwnd_bytes,
                in_flight_bytes: p.in_flight_bytes,
            });
        }
    }
}

// The charge must cover the bookkeeping it stands for.
const _: () =
    assert!(MESSAGE_OVERHEAD_BYTES >= std::mem::size_of::<OutMsg>() + std::mem::size_of::<Slot>());
