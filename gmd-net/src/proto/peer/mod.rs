//! Protocol state toward one remote machine: session and epochs, packet
//! numbers and acknowledgements, loss recovery, streams, reassembly, flow
//! control and path choice.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::MESSAGE_OVERHEAD_BYTES;
use super::Shared;
use super::path::Path;
use crate::arena::Arenas;
use crate::config::{NetworkId, PeerConfig, PeerId, Tuning};
use crate::crypto::{ReplayWindow, SessionKey};
use crate::ranges::RangeSet;
use crate::stats::MachineStats;
use crate::wire::MsgKind;
use crate::{NetError, StreamId};

mod app;
mod introspect;
mod recv;
mod send;
mod session;
mod timers;

/// Ack-eliciting packets received before an acknowledgement is sent at once.
const ACK_EVERY_PACKETS: u32 = 2;
/// Smallest useful fragment when filling the end of a datagram.
const FRAGMENT_BYTES_MIN: usize = 64;
/// Reassembly arenas kept per peer, of [`REASSEMBLY_ARENA_BYTES`] each: at
/// most 1 MiB held per peer once idle; a message larger than an arena is
/// reassembled in a buffer of its own.
const REASSEMBLY_ARENAS: usize = 4;
/// See [`REASSEMBLY_ARENAS`].
const REASSEMBLY_ARENA_BYTES: usize = 256 << 10;

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
    /// Acknowledged or declared lost.
    resolved: bool,
    /// A path-MTU probe: padding only; its loss is not congestion.
    mtu_probe: bool,
}

/// A packet declared lost, kept a while in `Peer::lost` so that a late
/// acknowledgement can still prove the loss spurious.
#[derive(Debug)]
struct LostPacket {
    path: u8,
    time_sent: Instant,
    lost_at: Instant,
    /// Its fragments: acknowledged after all if the packet was.
    chunks: Vec<Chunk>,
}

/// Lost packets remembered per peer; older ones are forgotten first.
const LOST_RECORDS_MAX: usize = 4096;

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
    /// Packets declared lost in the last `Tuning::rto_max`, by number.
    lost: BTreeMap<u64, LostPacket>,
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
    /// Slots of ordered lanes whose passing message was delivered ahead of
    /// earlier ones (bounded by `passed_slots_max`).
    passed_slots: usize,
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
    /// Messages ready for delivery, gathered per call (kept to reuse its
    /// allocation).
    ready_scratch: Vec<RecvMsg>,
    /// Where messages of several datagrams are reassembled
    /// ([`REASSEMBLY_ARENAS`]): nothing allocated per message.
    reassembly: Arenas,
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
    t.recv_window_bytes / MESSAGE_OVERHEAD_BYTES
        + 3 * t.stream_window_messages as usize
        + passed_slots_max(t)
}

/// Passing messages of ordered lanes delivered ahead of earlier ones and
/// still waiting for them (their credit released): one lane's window. Past
/// it, a passing message waits for its turn, its credit held, so the
/// sender's credit bounds the rest.
pub(crate) fn passed_slots_max(t: &Tuning) -> usize {
    t.stream_window_messages as usize
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
    /// Limits the datagrams of its path on `network` to `peer_addr`, if it
    /// has one, to `limit` bytes.
    pub(crate) fn cap_datagrams(
        &mut self,
        network: NetworkId,
        peer_addr: SocketAddr,
        limit: usize,
    ) {
        for p in &mut self.paths {
            if p.cfg.network == network && p.cfg.remote_addr == peer_addr {
                p.mtu.cap(limit);
                p.datagram_size_changed();
            }
        }
    }

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
            lost: BTreeMap::new(),
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
            passed_slots: 0,
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
            ready_scratch: Vec::new(),
            reassembly: Arenas::new(REASSEMBLY_ARENAS, REASSEMBLY_ARENA_BYTES, false),
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
}

// The charge must cover the bookkeeping it stands for.
const _: () =
    assert!(MESSAGE_OVERHEAD_BYTES >= std::mem::size_of::<OutMsg>() + std::mem::size_of::<Slot>());
