//! The sans-IO protocol core.
//!
//! [`Endpoint`] is a plain state machine for the local machine: feed it
//! received datagrams ([`Endpoint::handle_datagram`]), clock ticks
//! ([`Endpoint::handle_timeout`]) and application sends
//! ([`Endpoint::send`], [`Endpoint::request`], [`Endpoint::reply`]); drain
//! datagrams to transmit ([`Endpoint::poll_transmit`]), the next deadline
//! ([`Endpoint::poll_timeout`]) and events ([`Endpoint::poll_event`]). It never
//! reads a clock, touches a socket or draws unseeded randomness, so the same
//! code runs under the deterministic simulator and under the tokio driver.
//!
//! What it does not do: it does not know devices, does not retry a request
//! after the peer is declared down, and does not time out requests on its own
//! (the promote-failure timeout does).

mod congestion;
pub mod mtu;
mod path;
mod peer;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::config::{NetConfig, NetworkId, PeerId, Topology, Tuning};
use crate::crypto::MasterKey;
use crate::stats::{NetworkStats, SecurityStats, Stats};
use crate::wire::{self, Header};
use crate::{NetError, StreamId};

use peer::Peer;

/// Bytes charged per message on top of its length, so that many empty
/// messages still consume send buffer and receive window; it covers the
/// per-message bookkeeping on both sides, so charged bytes bound memory.
pub const MESSAGE_OVERHEAD_BYTES: usize = 256;

/// What a message costs against the send buffer and the receive window.
pub fn message_charge(len_bytes: usize) -> usize {
    len_bytes + MESSAGE_OVERHEAD_BYTES
}

/// A receiver grants new credit once this fraction (1/n) of its receive
/// window was freed since its last grant; released credit smaller than that
/// waits for the driver's next turn instead of waking it.
pub(crate) const CREDIT_GRANT_DIVISOR: usize = 8;

/// Identifies a request within a session with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Opaque token returned with every delivered message; hand it back to
/// [`Endpoint::release`] once the application consumed the message so the
/// peer may send more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    pub(crate) peer: PeerId,
    pub(crate) session: u64,
    pub(crate) bytes: usize,
}

impl Credit {
    /// Bytes of receive window this token returns.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What kind of message was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingKind {
    /// One-way message.
    OneWay,
    /// A request; answer with [`Endpoint::reply`] and this token.
    Request(ReplyTo),
}

/// Everything needed to address a reply: the peer, its session and the
/// request id. A reply for a session that has since been reset is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The requesting peer.
    pub peer: PeerId,
    /// The session the request arrived in.
    pub session: u64,
    /// The requester's id.
    pub request: RequestId,
}

/// A message delivered to the application.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Sender.
    pub peer: PeerId,
    /// Stream it was sent on.
    pub stream: StreamId,
    /// One-way or request.
    pub kind: IncomingKind,
    /// The message.
    pub body: Bytes,
    /// Receive-window credit to return with [`Endpoint::release`].
    pub credit: Credit,
}

/// Something the application or driver should know.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session with the peer is established (first contact, or after down).
    PeerUp {
        /// The peer.
        peer: PeerId,
        /// Its epoch.
        epoch: u64,
    },
    /// No path worked for the peer's promote-failure timeout (or it closed).
    /// Every outstanding request to it failed with `NetError::PeerDown`.
    PeerDown {
        /// The peer.
        peer: PeerId,
    },
    /// The peer came back with a new epoch; the old session's in-flight
    /// messages are gone and outstanding requests failed with
    /// `NetError::PeerRestarted`.
    PeerRestarted {
        /// The peer.
        peer: PeerId,
        /// Its new epoch.
        epoch: u64,
    },
    /// A path to the peer started working.
    PathUp {
        /// The peer.
        peer: PeerId,
        /// The path's network.
        network: NetworkId,
    },
    /// A path to the peer was declared down after repeated timeouts.
    PathDown {
        /// The peer.
        peer: PeerId,
        /// The path's network.
        network: NetworkId,
    },
    /// New traffic to the peer now prefers this network.
    ActivePathChanged {
        /// The peer.
        peer: PeerId,
        /// The preferred network, or `None` when no path is usable.
        network: Option<NetworkId>,
    },
    /// A one-way message or request arrived (in stream order).
    Message(Delivery),
    /// A reply to one of our requests arrived.
    Reply {
        /// The peer.
        peer: PeerId,
        /// The request it answers.
        request: RequestId,
        /// The reply body.
        body: Bytes,
    },
    /// A request will never be answered.
    RequestFailed {
        /// The peer.
        peer: PeerId,
        /// The request.
        request: RequestId,
        /// `PeerDown` or `PeerRestarted`.
        error: NetError,
    },
    /// Send-buffer space toward the peer was freed (acknowledged or dropped).
    Released {
        /// The peer.
        peer: PeerId,
        /// Charged bytes freed.
        bytes: usize,
    },
}

/// Most bytes one [`Transmit`] holds: what one UDP GSO send takes.
pub const TRANSMIT_BYTES_MAX: usize = 65_000;

/// A datagram (or, with `segment_bytes < len`, a GSO batch of datagrams of
/// `segment_bytes` each, the last possibly shorter) written into the buffer
/// given to [`Endpoint::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Local network (socket) to send from.
    pub network: NetworkId,
    /// Destination address.
    pub destination: SocketAddr,
    /// Total bytes written.
    pub len: usize,
    /// Size of each datagram in the batch.
    pub segment_bytes: usize,
}

/// Things the peers share and never mutate.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) tuning: Tuning,
    pub(crate) topo: Topology,
    pub(crate) master: MasterKey,
    pub(crate) encrypt: bool,
}

/// Mutable sinks the peers write into.
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) events: VecDeque<Event>,
    pub(crate) nets: Vec<NetworkStats>,
    pub(crate) sec: SecurityStats,
}

/// Sizes of one peer's state, for checking bounds in tests and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerFootprint {
    /// Charged bytes in the send buffer (gated messages).
    pub send_buffered_bytes: usize,
    /// Charged bytes of replies queued or unacknowledged.
    pub reply_buffered_bytes: usize,
    /// Messages held by the send side.
    pub send_messages: usize,
    /// Sent packets tracked.
    pub sent_packets: usize,
    /// Fragment records of tracked packets.
    pub chunk_records: usize,
    /// Fragments queued for retransmission.
    pub retransmit_chunks: usize,
    /// Charged bytes held by the receive side (reassembling or undelivered or
    /// delivered but not released).
    pub recv_charged_bytes: usize,
    /// Receive slots across streams.
    pub recv_slots: usize,
    /// Receive slots as the admission check counts them; equal to
    /// `recv_slots` unless a slot leaked.
    pub recv_slots_accounted: usize,
    /// Outstanding requests.
    pub requests: usize,
    /// Ranges of received packet numbers kept for acknowledgements.
    pub ack_ranges: usize,
}

/// The protocol state machine of one machine toward all its peers.
#[derive(Debug)]
pub struct Endpoint {
    shared: Shared,
    peers: Vec<Option<Peer>>,
    sink: Sink,
    /// Round-robin start for transmit fairness.
    next_peer: usize,
    /// xorshift state for the `recv_loss_ppm` test knob.
    loss_rng: u64,
    injected_losses: u64,
}

impl Endpoint {
    /// Builds the endpoint. `epoch` must grow across restarts of this machine
    /// (the driver uses wall-clock microseconds); `seed` feeds the test-only
    /// loss knob.
    ///
    /// # Errors
    /// `NetError::Config` if the configuration does not validate.
    pub fn new(
        config: &NetConfig,
        epoch: u64,
        seed: u64,
        now: Instant,
    ) -> Result<Endpoint, NetError> {
        let topo = config.validate()?;
        if epoch == 0 {
            return Err(NetError::Config("epoch 0 is reserved".into()));
        }
        let master = MasterKey::new(&config.psk, topo.cluster_id);
        let nets = topo
            .networks
            .iter()
            .map(|(name, _, _)| NetworkStats {
                name: name.clone(),
                ..Default::default()
            })
            .collect();
        let shared = Shared {
            tuning: config.tuning.clone(),
            topo,
            master,
            encrypt: config.encrypt,
        };
        let peers = shared
            .topo
            .peers
            .iter()
            .enumerate()
            .map(|(i, pc)| {
                (PeerId(i as u16) != shared.topo.local)
                    .then(|| Peer::new(PeerId(i as u16), pc.clone(), epoch, &shared, now))
            })
            .collect();
        Ok(Endpoint {
            shared,
            peers,
            sink: Sink {
                events: VecDeque::new(),
                nets,
                sec: SecurityStats::default(),
            },
            next_peer: 0,
            loss_rng: seed | 1,
            injected_losses: 0,
        })
    }

    /// The resolved topology (peer names, networks).
    pub fn topology(&self) -> &Topology {
        &self.shared.topo
    }

    /// The tuning in force.
    pub fn tuning(&self) -> &Tuning {
        &self.shared.tuning
    }

    fn peer_mut(&mut self, peer: PeerId) -> Result<&mut Peer, NetError> {
        self.peers
            .get_mut(peer.0 as usize)
            .and_then(|p| p.as_mut())
            .ok_or(NetError::BadPeer(peer.0))
    }

    fn check_stream(&self, stream: StreamId) -> Result<(), NetError> {
        if stream.0 >= self.shared.tuning.streams_max && stream != StreamId::PROBE {
            return Err(NetError::BadStream {
                stream: stream.0,
                streams_max: self.shared.tuning.streams_max,
            });
        }
        Ok(())
    }

    /// Queues a one-way message. Reliable and, on streams other than
    /// [`StreamId::CONTROL`], delivered in order.
    ///
    /// # Errors
    /// `BadPeer`, `BadStream`, `MessageTooLarge`, `PeerDown` (while the peer
    /// is declared down) or `WouldBlock` (send buffer full: wait for
    /// `Event::Released`).
    pub fn send(
        &mut self,
        now: Instant,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
    ) -> Result<(), NetError> {
        self.one_way(now, peer, stream, wire::MsgKind::OneWay, body)
    }

    /// Queues a one-way message as [`Endpoint::send`] does, which the peer
    /// may deliver before earlier messages of `stream` that have not
    /// arrived yet (a datagram of theirs was lost); messages sent after it
    /// still wait for it. For a message that depends on none of the earlier
    /// ones still on their way: the sender must know that.
    ///
    /// # Errors
    /// As [`Endpoint::send`].
    pub fn send_passing(
        &mut self,
        now: Instant,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
    ) -> Result<(), NetError> {
        self.one_way(now, peer, stream, wire::MsgKind::Passing, body)
    }

    fn one_way(
        &mut self,
        now: Instant,
        peer: PeerId,
        stream: StreamId,
        kind: wire::MsgKind,
        body: Bytes,
    ) -> Result<(), NetError> {
        self.check_stream(stream)?;
        self.enqueue(now, peer, stream, kind, body, None)
            .map(|_| ())
    }

    /// Queues a request; the reply arrives as `Event::Reply` with the returned
    /// id, or `Event::RequestFailed` if the peer goes down or restarts first.
    ///
    /// # Errors
    /// As [`Endpoint::send`]; `WouldBlock` also when `requests_outstanding_max`
    /// requests are outstanding.
    pub fn request(
        &mut self,
        now: Instant,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
    ) -> Result<RequestId, NetError> {
        self.check_stream(stream)?;
        self.enqueue(now, peer, stream, wire::MsgKind::Request(0), body, None)
            .map(|id| RequestId(id.expect("requests get an id")))
    }

    /// Sends the reply to a delivered request. Replies are not subject to the
    /// send-buffer bound (they are bounded by the requests the peer may have
    /// outstanding), so this never returns `WouldBlock`.
    ///
    /// # Errors
    /// `PeerRestarted`/`PeerDown` when the request's session is gone (the
    /// requester was already told), `MessageTooLarge`.
    pub fn reply(&mut self, now: Instant, to: ReplyTo, body: Bytes) -> Result<(), NetError> {
        let kind = wire::MsgKind::Reply(to.request.0);
        self.enqueue(now, to.peer, StreamId::REPLY, kind, body, Some(to.session))
            .map(|_| ())
    }

    /// Queues a message toward `peer`. Replies (`reply_session` set) must
    /// still belong to the current session and bypass the send-buffer bound.
    fn enqueue(
        &mut self,
        now: Instant,
        peer: PeerId,
        stream: StreamId,
        kind: wire::MsgKind,
        body: Bytes,
        reply_session: Option<u64>,
    ) -> Result<Option<u64>, NetError> {
        let Endpoint {
            shared,
            peers,
            sink,
            ..
        } = self;
        let p = peers
            .get_mut(peer.0 as usize)
            .and_then(|p| p.as_mut())
            .ok_or(NetError::BadPeer(peer.0))?;
        if let Some(session) = reply_session
            && p.session_tag() != session
        {
            return Err(p.session_gone_error());
        }
        let gated = reply_session.is_none();
        p.enqueue(now, shared, sink, stream.0, kind, body, gated)
    }

    /// Returns receive-window credit for a consumed message.
    pub fn release(&mut self, credit: Credit) {
        if let Ok(p) = self.peer_mut(credit.peer) {
            p.release(credit);
        }
    }

    /// Pins data traffic to one peer onto one network (netprobe), or unpins.
    ///
    /// # Errors
    /// `BadPeer`, or `Config` if the peer has no path on that network.
    pub fn pin_path(&mut self, peer: PeerId, network: Option<NetworkId>) -> Result<(), NetError> {
        let p = self.peer_mut(peer)?;
        p.pin(network)
    }

    /// Processes one received datagram. `data` is decrypted in place and its
    /// bytes may be kept (zero-copy) by delivered messages.
    pub fn handle_datagram(&mut self, now: Instant, network: NetworkId, data: BytesMut) {
        let ppm = self.shared.tuning.recv_loss_ppm;
        if ppm > 0 {
            let mut x = self.loss_rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.loss_rng = x;
            if x % 1_000_000 < u64::from(ppm) {
                self.injected_losses += 1;
                return;
            }
        }
        let hdr = match Header::decode(&data) {
            Ok(h) => h,
            Err(wire::DecodeError::Truncated) => {
                self.sink.sec.truncated += 1;
                return;
            }
            Err(_) => {
                self.sink.sec.bad_version += 1;
                return;
            }
        };
        if hdr.cluster_id != self.shared.topo.cluster_id {
            self.sink.sec.wrong_cluster += 1;
            return;
        }
        if hdr.dst_machine != self.shared.topo.local_machine_id {
            self.sink.sec.unknown_machine += 1;
            return;
        }
        let Some(index) = self
            .shared
            .topo
            .peers
            .iter()
            .position(|p| p.machine_id == hdr.src_machine)
        else {
            self.sink.sec.unknown_machine += 1;
            return;
        };
        let Endpoint {
            shared,
            peers,
            sink,
            ..
        } = self;
        let Some(p) = peers[index].as_mut() else {
            // Our own machine id as a sender: a reflection or a forgery.
            sink.sec.unknown_machine += 1;
            return;
        };
        p.handle_datagram(now, shared, sink, network, hdr, data);
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Endpoint {
            shared,
            peers,
            sink,
            ..
        } = self;
        for p in peers.iter_mut().flatten() {
            p.handle_timeout(now, shared, sink);
        }
    }

    /// The earliest deadline at which [`Endpoint::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|p| p.next_timeout())
            .min()
    }

    /// Limits the datagrams of every path from network `network` to
    /// `peer_addr` to `limit` bytes: what the first hop carries whole (the
    /// route's MTU less the headers). Discovery searches below it.
    pub fn cap_datagrams(&mut self, network: NetworkId, peer_addr: SocketAddr, limit: usize) {
        for p in self.peers.iter_mut().flatten() {
            p.cap_datagrams(network, peer_addr, limit);
        }
    }

    /// Writes the next datagram(s) to send into `buf`, up to `max_datagrams`
    /// datagrams of one path batched for GSO, [`TRANSMIT_BYTES_MAX`] in all. The datagrams are
    /// `buf[..transmit.len]`; `buf` may be longer (it is reused as scratch
    /// and never shrunk, so reuse one buffer per batch slot).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        let n = self.peers.len();
        let Endpoint {
            shared,
            peers,
            sink,
            next_peer,
            ..
        } = self;
        for k in 0..n {
            let i = (*next_peer + k) % n;
            if let Some(p) = peers[i].as_mut()
                && let Some(t) = p.poll_transmit(now, shared, sink, max_datagrams.max(1), buf)
            {
                *next_peer = (i + 1) % n;
                return Some(t);
            }
        }
        None
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.sink.events.pop_front()
    }

    /// Tells every peer we are going away (one CLOSE datagram per path) and
    /// fails everything outstanding. Drain `poll_transmit` afterwards.
    pub fn close(&mut self, now: Instant) {
        let Endpoint {
            shared,
            peers,
            sink,
            ..
        } = self;
        for p in peers.iter_mut().flatten() {
            p.close(now, shared, sink);
        }
    }

    /// Datagrams rejected so far because their authentication tag did not
    /// verify (cheap: the driver asks after every datagram to tell which
    /// source they came from).
    pub fn bad_auth_total(&self) -> u64 {
        self.sink.sec.bad_auth
    }

    /// Snapshot of all counters.
    pub fn stats(&self) -> Stats {
        let mut st = Stats {
            networks: self.sink.nets.clone(),
            security: self.sink.sec.clone(),
            injected_losses: self.injected_losses,
            ..Default::default()
        };
        for p in self.peers.iter().flatten() {
            p.add_stats(&self.shared, &mut st);
        }
        for (i, n) in st.networks.iter_mut().enumerate() {
            n.srtt = st
                .paths
                .iter()
                .filter(|p| p.network == self.shared.topo.networks[i].0)
                .filter_map(|p| p.srtt)
                .min();
        }
        st
    }

    /// Sizes of one peer's state (tests check them against the bounds).
    pub fn footprint(&self, peer: PeerId) -> PeerFootprint {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .map(|p| p.footprint())
            .unwrap_or_default()
    }

    /// True when nothing is queued, unacknowledged or outstanding toward any
    /// peer (the simulator's "settled" test).
    pub fn is_idle(&self) -> bool {
        self.peers.iter().flatten().all(|p| p.is_idle())
    }

    /// True while a message sent to `peer` is queued or unacknowledged
    /// (its send buffer holds something).
    pub fn is_sending_to(&self, peer: PeerId) -> bool {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .is_some_and(|p| p.is_sending())
    }

    /// The peer's epoch in the current session, if known.
    pub fn peer_epoch(&self, peer: PeerId) -> Option<u64> {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .and_then(|p| p.remote_epoch())
    }

    /// Our epoch toward the peer (grows when we reset the session after
    /// declaring the peer down).
    pub fn local_epoch(&self, peer: PeerId) -> Option<u64> {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .map(|p| p.local_epoch())
    }

    /// Congestion window of the peer's preferred path, bytes, while the
    /// peer is up: what the path estimates it can have in flight.
    pub fn peer_window(&self, peer: PeerId) -> Option<usize> {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .filter(|p| p.is_up())
            .and_then(|p| p.window_bytes())
    }

    /// Whether the peer is currently up.
    pub fn is_peer_up(&self, peer: PeerId) -> bool {
        self.peers
            .get(peer.0 as usize)
            .and_then(|p| p.as_ref())
            .is_some_and(|p| p.is_up())
    }
}
