//! The tokio driver: [`Node`] owns one UDP socket per local interface and a
//! task that runs the sans-IO [`Endpoint`] — one small loop, in the manner of
//! quinn's connection driver: take commands, receive a batch per socket,
//! fire timers, transmit (at most `TRANSMITS_PER_TURN` datagram batches per
//! turn so receiving is never starved), forward events, then sleep until a
//! socket, a command or the next deadline wakes it.
//!
//! Backpressure: every peer has a byte semaphore sized to the send buffer and
//! a request semaphore sized to `requests_outstanding_max`; `send` and
//! `request` wait on them, and permits return when the core reports the
//! message acknowledged (or dropped by a reset).
//!
//! Queues, each with a named bound (see docs/ARCHITECTURE.md, "Queues"):
//! - commands to the driver: [`COMMAND_QUEUE_MAX`]; a caller waits for room
//!   (the driver never waits on it, so this cannot deadlock);
//! - received messages of a stream: [`stream_queue_max`], which the
//!   receive window already bounds because a message holds its credit (its
//!   [`Receipt`]) until the application drops it;
//! - credit given back: not a queue but a sum per peer and session
//!   (`Releases`), so giving credit back never waits and never allocates.

use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use std::sync::Mutex;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::arena::Arenas;
use crate::config::{NetConfig, NetworkId, PeerId, Topology};
use crate::proto::{
    CREDIT_GRANT_DIVISOR, Credit, Endpoint, Event, IncomingKind, MESSAGE_OVERHEAD_BYTES, ReplyTo,
    RequestId, message_charge,
};
use crate::stats::Stats;
use crate::sys::{self, BATCH_MAX, GSO_BYTES_MAX, GSO_SEGMENTS_MAX, InDatagram, OutDatagram};
use crate::{NetError, StreamId};

/// Datagram batches transmitted per loop turn before receiving again.
const TRANSMITS_PER_TURN: usize = 64;
/// Receive batches per socket per loop turn.
const RECV_BATCHES_PER_TURN: usize = 8;
/// Receive arenas kept for reuse (each one batch's slots: 2 MiB with GRO).
///
/// Receive memory for `recvmmsg` batches ([`Arenas`], zero-filled): each
/// arena's whole allocation is zero-filled once, when it is made, and from
/// then on only overwritten by the kernel, so it is initialised wherever a
/// batch lands in it and the gaps between a batch's datagrams need no
/// clearing. Clearing the unused tail of every slot instead (up to 64 KiB
/// per datagram with GRO's slots, for a 1 400-byte datagram or a 50-byte
/// acknowledgement) took 5 % of all CPU of a mirrored 1 MiB write stream on
/// loopback, plus page faults on every fresh arena.
const RX_ARENAS_MAX: usize = 4;

/// Commands taken per loop turn.
const COMMANDS_PER_TURN: usize = 1024;
/// Commands waiting for the driver (sends, replies, registrations, stats).
/// A caller finding it full waits for room: backpressure, nothing dropped.
/// The driver takes up to [`COMMANDS_PER_TURN`] per turn and never sends to
/// it itself, so a waiting caller always makes progress. Sends in it are
/// already admitted by the send-buffer gate, so they bound its memory
/// (`send_buffer_bytes_max` per peer); the rest are small.
pub const COMMAND_QUEUE_MAX: usize = 1024;
const _: () = assert!(COMMAND_QUEUE_MAX >= COMMANDS_PER_TURN);

/// Capacity of the event broadcast channel; a receiver that lags further
/// loses the oldest events (and sees `RecvError::Lagged`).
pub(crate) const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// Peer and path events, as broadcast by [`Node::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A session with the peer is established.
    PeerUp {
        /// The peer.
        peer: PeerId,
        /// Its epoch.
        epoch: u64,
    },
    /// The peer was declared down; outstanding requests failed.
    PeerDown {
        /// The peer.
        peer: PeerId,
    },
    /// The peer restarted (new epoch); outstanding requests failed.
    PeerRestarted {
        /// The peer.
        peer: PeerId,
        /// Its new epoch.
        epoch: u64,
    },
    /// A path started working.
    PathUp {
        /// The peer.
        peer: PeerId,
        /// The network.
        network: NetworkId,
    },
    /// A path was declared down.
    PathDown {
        /// The peer.
        peer: PeerId,
        /// The network.
        network: NetworkId,
    },
    /// Traffic to the peer now prefers this network.
    ActivePathChanged {
        /// The peer.
        peer: PeerId,
        /// The network, or `None` if no path is usable.
        network: Option<NetworkId>,
    },
}

/// A message received from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// Sender.
    pub peer: PeerId,
    /// Stream.
    pub stream: StreamId,
    /// The message.
    pub body: Bytes,
    /// Present for requests: answer through it (later and out of order is fine).
    pub responder: Option<Responder>,
    /// Holds the message's receive-window credit: dropping it (or the whole
    /// `Incoming`) gives the credit back to the peer. Keep it until the
    /// message is *processed*, not just received, so that the peer's flow
    /// control bounds the backlog of unprocessed messages.
    pub receipt: Receipt,
}

/// Receive-window credit of one delivered message, given back to the peer
/// when dropped. Dropping never blocks and never allocates.
#[derive(Debug)]
pub struct Receipt {
    credit: Option<Credit>,
    releases: Arc<Releases>,
}

impl Receipt {
    /// Bytes of receive window this receipt gives back.
    pub fn bytes(&self) -> usize {
        self.credit.map_or(0, |c| c.bytes())
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        if let Some(credit) = self.credit.take() {
            self.releases.add(credit);
        }
    }
}

/// Credit given back by receipts and not yet handed to the endpoint,
/// summed per (peer, session): at most one entry per peer and session with
/// receipts outstanding, so it stays a few entries long.
#[derive(Debug)]
struct Releases {
    pending: Mutex<Vec<Credit>>,
    /// Wakes the driver when a peer's pending credit reaches `wake_bytes`.
    wake: Notify,
    /// Credit worth a grant on its own ([`CREDIT_GRANT_DIVISOR`] of the
    /// receive window). Less waits for the driver's next turn — the next
    /// datagram, timer or command — rather than waking it: the endpoint
    /// would not grant it alone, and a receipt dropped by a device thread
    /// for each message woke a runtime thread for nothing. A sender blocked
    /// on credit has a whole window held here, so its grant always comes.
    wake_bytes: usize,
}

impl Releases {
    fn new(recv_window_bytes: usize) -> Self {
        Releases {
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            wake_bytes: (recv_window_bytes / CREDIT_GRANT_DIVISOR).max(1),
        }
    }

    /// Adds released credit; returns whether it woke the driver.
    fn add(&self, credit: Credit) -> bool {
        let mut pending = self.pending.lock().expect("releases lock");
        let (before, after) = match pending
            .iter_mut()
            .find(|c| c.peer == credit.peer && c.session == credit.session)
        {
            Some(c) => {
                c.bytes += credit.bytes;
                (c.bytes - credit.bytes, c.bytes)
            }
            None => {
                pending.push(credit);
                (0, credit.bytes)
            }
        };
        drop(pending);
        let wake = before < self.wake_bytes && after >= self.wake_bytes;
        if wake {
            self.wake.notify_one();
        }
        wake
    }

    /// Moves the pending credit into `into` (emptied first), keeping both
    /// allocations.
    fn take(&self, into: &mut Vec<Credit>) {
        into.clear();
        std::mem::swap(&mut *self.pending.lock().expect("releases lock"), into);
    }
}

/// Capacity of a stream's queue of received messages. Every queued message
/// holds at least [`MESSAGE_OVERHEAD_BYTES`] of its peer's receive window
/// until the application drops its [`Receipt`], so with `peers` peers at
/// most `peers * recv_window_bytes / MESSAGE_OVERHEAD_BYTES` messages can
/// wait, twice that across a session reset (the old session's receipts
/// outstanding, the new one's window fresh). The queue is sized to that,
/// so the driver never finds it full in practice; if it does, the message
/// waits with the driver (`unclaimed`, which the same credit bounds) and is
/// delivered in order once there is room. tokio allocates the queue in small
/// blocks as it fills, so a large capacity costs nothing while unused.
pub fn stream_queue_max(peers: usize, recv_window_bytes: usize) -> usize {
    2 * peers.max(1) * (recv_window_bytes / MESSAGE_OVERHEAD_BYTES).max(1)
}

/// Answers one request.
#[derive(Debug)]
pub struct Responder {
    to: ReplyTo,
    cmd: mpsc::Sender<Command>,
}

impl Responder {
    /// Sends the reply, waiting while the driver's command queue is full.
    /// Replies to a session that has since been reset are dropped (the
    /// requester already got `PeerDown`/`PeerRestarted`).
    ///
    /// # Errors
    /// `Shutdown` if the node is gone.
    pub async fn reply(self, body: Bytes) -> Result<(), NetError> {
        self.cmd
            .send(Command::Reply { to: self.to, body })
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// The requesting peer.
    pub fn peer(&self) -> PeerId {
        self.to.peer
    }
}

/// Receives the messages of one stream, in order (except the control stream).
/// A message's receive-window credit returns to the peer when its
/// [`Incoming::receipt`] is dropped, so a slow consumer slows the sender
/// instead of growing memory.
#[derive(Debug)]
pub struct IncomingReceiver {
    rx: mpsc::Receiver<Incoming>,
}

impl IncomingReceiver {
    /// Waits for the next message; `None` once the node is shut down.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

#[derive(Debug)]
enum Command {
    Send {
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
        reply: Option<oneshot::Sender<Result<Bytes, NetError>>>,
        accepted: Option<oneshot::Sender<Result<(), NetError>>>,
        /// A one-way message that may pass earlier ones ([`Node::post_passing`]).
        passing: bool,
    },
    Reply {
        to: ReplyTo,
        body: Bytes,
    },
    Register {
        stream: StreamId,
        tx: mpsc::Sender<Incoming>,
    },
    Stats(oneshot::Sender<Stats>),
    Pin {
        peer: PeerId,
        network: Option<NetworkId>,
        done: oneshot::Sender<Result<(), NetError>>,
    },
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Gate {
    bytes: Semaphore,
    requests: Semaphore,
    /// Congestion window toward the peer, bytes (0: down or unknown), as
    /// of the driver's last turn ([`Node::peer_window`]).
    window: AtomicU64,
}

/// A running GeoMessage endpoint.
#[derive(Debug)]
pub struct Node {
    topo: Topology,
    message_bytes_max: usize,
    gates: Arc<Vec<Gate>>,
    cmd: mpsc::Sender<Command>,
    events: broadcast::Sender<NodeEvent>,
    local_addrs: Vec<std::net::SocketAddr>,
    /// Capacity of each stream's queue ([`stream_queue_max`]).
    stream_queue_max: usize,
    /// The endpoint, for one-way messages sent from the caller's thread;
    /// weak, so that the sockets close when the driver ends.
    shared: std::sync::Weak<Shared>,
    /// Messages in `cmd` (or on their way in) that the driver has not yet
    /// given to the endpoint: while any is, nothing is sent past them.
    sends_queued: Arc<AtomicUsize>,
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

struct Sock {
    /// Registered for reading only: a socket registered for writing too
    /// wakes the thread parked in `epoll_wait` each time the kernel frees a
    /// sent datagram's buffer (at once on loopback), so every datagram sent
    /// from a device thread woke a runtime thread for nothing. While the
    /// socket is full the driver watches a duplicate of it for room
    /// ([`WriteWatch`]).
    io: AsyncFd<std::net::UdpSocket>,
    /// UDP GSO works (cleared when the kernel refuses it).
    gso: AtomicBool,
    gro: bool,
    slot_bytes: usize,
}

impl Node {
    /// Validates `config`, binds one UDP socket per local interface and
    /// spawns the driver task on the current tokio runtime.
    ///
    /// # Errors
    /// `Config` for an invalid configuration, `Io` if a socket cannot be bound.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: NetConfig) -> Result<Node, NetError> {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .max(1);
        let seed = epoch ^ u64::from(std::process::id()).rotate_left(32);
        let mut ep = Endpoint::new(&config, epoch, seed, Instant::now())?;
        let topo = ep.topology().clone();
        let t = ep.tuning().clone();
        let mut socks = Vec::new();
        let mut local_addrs = Vec::new();
        for (n, (name, addr, dg)) in topo.networks.iter().enumerate() {
            let (s, gso, gro) =
                sys::bind(*addr).map_err(|e| NetError::io(format!("bind {name} {addr}"), &e))?;
            let discovering = discovering_paths(&topo, NetworkId(n as u8));
            if !discovering.is_empty() {
                sys::set_dont_fragment(&s, addr.is_ipv6())
                    .map_err(|e| NetError::io(format!("don't-fragment on {name} {addr}"), &e))?;
                for remote in discovering {
                    // What the first hop carries: discovery searches below.
                    if let Ok(mtu) = sys::path_mtu(*addr, remote) {
                        let limit = sys::datagram_max_for_mtu(mtu, remote.is_ipv6());
                        ep.cap_datagrams(NetworkId(n as u8), remote, limit);
                    }
                }
            }
            local_addrs.push(s.local_addr().map_err(|e| NetError::io("local_addr", &e))?);
            let io =
                register(s, Interest::READABLE).map_err(|e| NetError::io("register socket", &e))?;
            // Without GRO, room for the largest datagram of this network
            // or of a peer that discovers its size.
            let slot_bytes = if gro {
                65_536
            } else {
                (*dg).max(crate::DISCOVERY_MAX).next_power_of_two()
            };
            info!(
                network = %name,
                %addr,
                "listening; the kernel batches datagrams on sending (UDP GSO): {}, on receiving (UDP GRO): {}",
                yes_no(gso),
                yes_no(gro)
            );
            socks.push(Sock {
                io,
                gso: AtomicBool::new(gso),
                gro,
                slot_bytes,
            });
        }
        warn_of_fragmentation(&topo);
        let gates: Arc<Vec<Gate>> = Arc::new(
            topo.peers
                .iter()
                .map(|_| Gate {
                    bytes: Semaphore::new(t.send_buffer_bytes_max),
                    requests: Semaphore::new(t.requests_outstanding_max),
                    window: AtomicU64::new(0),
                })
                .collect(),
        );
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (ev_tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let releases = Arc::new(Releases::new(t.recv_window_bytes));
        let stream_queue_max = stream_queue_max(topo.peers.len(), t.recv_window_bytes);
        let sends_queued = Arc::new(AtomicUsize::new(0));
        // One batch of the largest slots per arena.
        let rx_arena_bytes = socks.iter().map(|s| s.slot_bytes).max().unwrap_or(2048) * BATCH_MAX;
        let shared = Arc::new(Shared {
            sends_queued: sends_queued.clone(),
            link: Mutex::new(Link {
                ep,
                tx_bufs: (0..BATCH_MAX)
                    .map(|_| Vec::with_capacity(GSO_BYTES_MAX))
                    .collect(),
                tx_queue: VecDeque::new(),
                sleeps_until: None,
                blocked: None,
                sent_now: vec![0; topo.peers.len()],
            }),
            socks,
            releases: releases.clone(),
        });
        let driver = Driver {
            shared: shared.clone(),
            releases,
            released: Vec::new(),
            cmd_rx,
            cmd_tx: cmd_tx.clone(),
            events: ev_tx.clone(),
            gates: gates.clone(),
            pending: BTreeMap::new(),
            streams: BTreeMap::new(),
            unclaimed: BTreeMap::new(),
            rx_arenas: Arenas::new(RX_ARENAS_MAX, rx_arena_bytes, true),
            rx_list: Vec::with_capacity(BATCH_MAX),
            auth_failures: Vec::new(),
            receives: vec![(0, 0); shared.socks.len()],
        };
        tokio::spawn(driver.run());
        Ok(Node {
            message_bytes_max: t.message_bytes_max,
            topo,
            gates,
            cmd: cmd_tx,
            events: ev_tx,
            local_addrs,
            stream_queue_max,
            shared: Arc::downgrade(&shared),
            sends_queued,
        })
    }

    /// Congestion window of the preferred path to `peer`, bytes, as of the
    /// driver's last turn: the link's estimate of rate × round trip. `None`
    /// while the peer is down or not measured. Cheap (one atomic load).
    pub fn peer_window(&self, peer: PeerId) -> Option<u64> {
        self.gates
            .get(peer.0 as usize)
            .map(|g| g.window.load(Ordering::Relaxed))
            .filter(|&w| w > 0)
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<PeerId> {
        self.topo
            .peer_by_name(name)
            .filter(|&p| p != self.topo.local)
    }

    /// Name of a peer.
    pub fn peer_name(&self, peer: PeerId) -> Option<&str> {
        self.topo
            .peers
            .get(peer.0 as usize)
            .map(|p| p.name.as_str())
    }

    /// Name of a local network.
    pub fn network_name(&self, network: NetworkId) -> Option<&str> {
        self.topo
            .networks
            .get(network.0 as usize)
            .map(|n| n.0.as_str())
    }

    /// Addresses the local sockets are bound to (one per network).
    pub fn local_addrs(&self) -> &[std::net::SocketAddr] {
        &self.local_addrs
    }

    /// The resolved topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    fn gate(&self, peer: PeerId, len: usize) -> Result<&Gate, NetError> {
        if len > self.message_bytes_max {
            return Err(NetError::MessageTooLarge {
                len_bytes: len,
                max_bytes: self.message_bytes_max,
            });
        }
        if peer == self.topo.local {
            return Err(NetError::BadPeer(peer.0));
        }
        self.gates
            .get(peer.0 as usize)
            .ok_or(NetError::BadPeer(peer.0))
    }

    /// Waits for send-buffer space (and a request slot) toward `peer`. The
    /// permits are handed to the driver only once all are held, with no await
    /// in between and the command sent right after, so dropping the caller's
    /// future never leaks them; the driver returns them when the core
    /// releases the message.
    async fn admit(&self, peer: PeerId, len: usize, request: bool) -> Result<(), NetError> {
        let gate = self.gate(peer, len)?;
        let slot = match request {
            true => Some(
                gate.requests
                    .acquire()
                    .await
                    .map_err(|_| NetError::Shutdown)?,
            ),
            false => None,
        };
        let charge = message_charge(len) as u32;
        let bytes = gate
            .bytes
            .acquire_many(charge)
            .await
            .map_err(|_| NetError::Shutdown)?;
        bytes.forget();
        if let Some(s) = slot {
            s.forget();
        }
        Ok(())
    }

    /// Sends a request and waits for its reply. Waits first for send-buffer
    /// space toward the peer (flow control).
    ///
    /// # Errors
    /// `PeerDown`/`PeerRestarted` when the peer is declared down or restarts
    /// before replying; `BadPeer`, `BadStream`, `MessageTooLarge`, `Shutdown`.
    pub async fn request(
        &self,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
    ) -> Result<Bytes, NetError> {
        self.admit(peer, body.len(), true).await?;
        let (tx, rx) = oneshot::channel();
        let counted = QueuedSend::count(&self.sends_queued);
        self.cmd
            .send(Command::Send {
                peer,
                stream,
                body,
                reply: Some(tx),
                accepted: None,
                passing: false,
            })
            .await
            .map_err(|_| NetError::Shutdown)?;
        counted.queued();
        rx.await.map_err(|_| NetError::Shutdown)?
    }

    /// Sends a one-way message (reliable, and ordered on its stream). Returns
    /// once the message is queued; waits while the send buffer is full.
    ///
    /// # Errors
    /// `PeerDown` while the peer is declared down; `BadPeer`, `BadStream`,
    /// `MessageTooLarge`, `Shutdown`.
    pub async fn send(&self, peer: PeerId, stream: StreamId, body: Bytes) -> Result<(), NetError> {
        let (tx, rx) = oneshot::channel();
        self.one_way(peer, stream, body, Some(tx), false).await?;
        rx.await.map_err(|_| NetError::Shutdown)?
    }

    /// Sends a one-way message (reliable, and ordered on its stream, also
    /// after earlier `post`s and `send`s from the same task), returning as
    /// soon as flow control admits it and the driver has it: unlike
    /// [`Node::send`], it does not wait a driver turn for the message to be
    /// queued, so one task can stream messages back to back (the driver
    /// sends what piles up in few system calls). A refusal by the driver
    /// (peer down, unknown stream) is not reported.
    ///
    /// # Errors
    /// `BadPeer`, `MessageTooLarge`, `Shutdown`.
    pub async fn post(&self, peer: PeerId, stream: StreamId, body: Bytes) -> Result<(), NetError> {
        self.one_way(peer, stream, body, None, false).await
    }

    /// As [`Node::post`], for a message the peer may deliver before earlier
    /// messages of the stream that have not arrived yet (a datagram of
    /// theirs was lost): one that depends on none of them, which only the
    /// sender can know. Later messages still wait for it.
    ///
    /// # Errors
    /// As [`Node::post`].
    pub async fn post_passing(
        &self,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
    ) -> Result<(), NetError> {
        self.one_way(peer, stream, body, None, true).await
    }

    /// As [`Node::post`] (or [`Node::post_passing`] when `passing`), from
    /// any thread and without waiting, for a message that should not wait
    /// for the driver task to be scheduled (a write at queue depth 1): when
    /// nothing sent to the peer is unacknowledged (the link is idle, so
    /// there is nothing to batch it with) and flow control admits the
    /// message at once, it is handed to the endpoint and its datagrams leave
    /// on this thread. Otherwise (traffic in flight, send buffer full, a bad
    /// peer or size) the body comes back untouched, for the caller to
    /// [`Node::post`] it, in order, through the driver, which sends what
    /// piles up in few system calls.
    /// The caller keeps the stream's order: nothing of the stream may still
    /// be on its way through an unfinished `post` or `send`.
    ///
    /// # Errors
    /// The body, when the message was not taken.
    pub fn try_post_now(
        &self,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
        passing: bool,
    ) -> Result<(), Bytes> {
        let Ok(gate) = self.gate(peer, body.len()) else {
            return Err(body);
        };
        let Some(shared) = self.shared.upgrade() else {
            return Err(body);
        };
        match gate
            .bytes
            .try_acquire_many(message_charge(body.len()) as u32)
        {
            Ok(permits) => permits.forget(),
            Err(_) => return Err(body),
        }
        shared.send_now(gate, peer, stream, body, passing)
    }

    /// True while a message to `peer` waits in the driver's queue, or is
    /// queued or unacknowledged in the endpoint: then
    /// [`Node::try_post_now`] gives messages back.
    pub fn is_sending_to(&self, peer: PeerId) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let link = shared.link.lock().expect("endpoint lock");
        shared.busy_toward(&link, peer)
    }

    /// Admits a one-way message and hands it to the driver, which answers
    /// on `accepted` once it is queued (or refused).
    async fn one_way(
        &self,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
        accepted: Option<oneshot::Sender<Result<(), NetError>>>,
        passing: bool,
    ) -> Result<(), NetError> {
        self.admit(peer, body.len(), false).await?;
        let counted = QueuedSend::count(&self.sends_queued);
        self.cmd
            .send(Command::Send {
                peer,
                stream,
                body,
                reply: None,
                accepted,
                passing,
            })
            .await
            .map_err(|_| NetError::Shutdown)?;
        counted.queued();
        Ok(())
    }

    /// Registers a stream and returns its receiver. Messages that arrived for
    /// it before registration are delivered first. Registering again replaces
    /// the previous receiver.
    ///
    /// # Errors
    /// `Shutdown`.
    pub async fn register_stream(&self, stream: StreamId) -> Result<IncomingReceiver, NetError> {
        let (tx, rx) = mpsc::channel(self.stream_queue_max);
        self.cmd
            .send(Command::Register { stream, tx })
            .await
            .map_err(|_| NetError::Shutdown)?;
        Ok(IncomingReceiver { rx })
    }

    /// Subscribes to peer and path events.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// A snapshot of all counters.
    ///
    /// # Errors
    /// `Shutdown`.
    pub async fn stats(&self) -> Result<Stats, NetError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Stats(tx))
            .await
            .map_err(|_| NetError::Shutdown)?;
        rx.await.map_err(|_| NetError::Shutdown)
    }

    /// Forces data to `peer` onto one network (`None` restores automatic
    /// choice). Used by netprobe.
    ///
    /// # Errors
    /// `BadPeer`, `Config` (no such path), `Shutdown`.
    pub async fn pin_path(&self, peer: PeerId, network: Option<NetworkId>) -> Result<(), NetError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Pin {
                peer,
                network,
                done: tx,
            })
            .await
            .map_err(|_| NetError::Shutdown)?;
        rx.await.map_err(|_| NetError::Shutdown)?
    }

    /// Tells the peers we are leaving, fails everything outstanding with
    /// `Shutdown` and stops the driver.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        for g in self.gates.iter() {
            g.bytes.close();
            g.requests.close();
        }
    }
}

/// Counts one [`Command::Send`] in [`Node::sends_queued`] from before it
/// enters the command queue; uncounted on drop unless it got in (then the
/// driver uncounts it when it gives the message to the endpoint), so a
/// refused or cancelled send never leaves the count up.
struct QueuedSend<'a>(&'a AtomicUsize);

impl<'a> QueuedSend<'a> {
    fn count(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        QueuedSend(n)
    }

    /// The command is in the queue: the driver uncounts it.
    fn queued(self) {
        std::mem::forget(self);
    }
}

impl Drop for QueuedSend<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Driver {
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Command>,
    cmd_tx: mpsc::Sender<Command>,
    /// Credit given back by receipts.
    releases: Arc<Releases>,
    /// Scratch for taking `releases` without allocating.
    released: Vec<Credit>,
    events: broadcast::Sender<NodeEvent>,
    gates: Arc<Vec<Gate>>,
    pending: BTreeMap<(PeerId, RequestId), oneshot::Sender<Result<Bytes, NetError>>>,
    streams: BTreeMap<StreamId, mpsc::Sender<Incoming>>,
    /// Messages for streams nobody registered yet, or whose queue was full;
    /// bounded by the receive window because each holds its credit until
    /// the application drops it. While a stream has messages here, newer
    /// ones queue behind them (order).
    unclaimed: BTreeMap<StreamId, VecDeque<Incoming>>,
    rx_arenas: Arenas,
    rx_list: Vec<InDatagram>,
    /// Datagrams that failed authentication, per source address.
    auth_failures: Vec<crate::stats::AuthFailures>,
    /// Per socket: receive system calls, and those that found nothing
    /// (`NetworkStats::receive_calls`, `NetworkStats::empty_receives`).
    receives: Vec<(u64, u64)>,
}

/// What the driver task shares with the tasks and threads that send one-way
/// messages themselves ([`Node::post`], [`Node::try_post_now`]): the endpoint
/// and its transmit buffers behind one lock, the sockets, and the driver's
/// wake-up. A sender hands its message to the endpoint and transmits what
/// the window allows on its own thread, so a write's datagrams leave without
/// waiting for the driver task to be scheduled; receiving and timers stay
/// with the driver.
struct Shared {
    link: Mutex<Link>,
    /// [`Node::sends_queued`].
    sends_queued: Arc<AtomicUsize>,
    socks: Vec<Sock>,
    /// Credit given back; its `wake` also wakes the driver for a sender.
    releases: Arc<Releases>,
}

/// The endpoint and what transmitting needs (under [`Shared::link`]).
struct Link {
    ep: Endpoint,
    tx_bufs: Vec<Vec<u8>>,
    /// Filled transmit buffers waiting for the socket: (buffer index, transmit).
    tx_queue: VecDeque<(usize, crate::proto::Transmit)>,
    /// The deadline the driver sleeps until, as it last looked (`None`: no
    /// timer). A sender that moves the endpoint's deadline earlier wakes it.
    sleeps_until: Option<Instant>,
    /// The socket a transmit found full, whose readiness the driver awaits.
    blocked: Option<usize>,
    /// Messages sent by [`Shared::send_now`], per peer (`MachineStats::sent_now`).
    sent_now: Vec<u64>,
}

/// How far one call of [`Link::transmit`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transmitted {
    /// Nothing left that the window allows.
    All,
    /// This socket would block; the rest waits for it.
    Blocked(usize),
    /// [`TRANSMITS_PER_TURN`] batches went out; more may be ready.
    TurnFull,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// A send is queued for the driver, or something sent to `peer` is
    /// queued or unacknowledged in the endpoint (`link` is its lock held):
    /// a message must not leave from the caller's thread now.
    fn busy_toward(&self, link: &Link, peer: PeerId) -> bool {
        self.sends_queued.load(Ordering::Acquire) > 0 || link.ep.is_sending_to(peer)
    }

    /// Gives a one-way message, admitted by `gate`, to the endpoint and
    /// transmits what the window allows, on the calling thread, if nothing
    /// sent to `peer` is unacknowledged; wakes the driver if the endpoint
    /// now needs it sooner than it planned (a new deadline, a full socket,
    /// more to send). A message not taken (traffic in flight) comes back, a
    /// refused one (peer down) is dropped; both return their charge.
    fn send_now(
        &self,
        gate: &Gate,
        peer: PeerId,
        stream: StreamId,
        body: Bytes,
        passing: bool,
    ) -> Result<(), Bytes> {
        let now = Instant::now();
        let charge = message_charge(body.len());
        let mut link = self.link.lock().expect("endpoint lock");
        // Order: the driver takes queued messages under this lock, so none
        // is between the queue and the endpoint now.
        if self.busy_toward(&link, peer) {
            drop(link);
            gate.bytes.add_permits(charge);
            return Err(body);
        }
        let r = if passing {
            link.ep.send_passing(now, peer, stream, body)
        } else {
            link.ep.send(now, peer, stream, body)
        };
        if r.is_err() {
            drop(link);
            gate.bytes.add_permits(charge);
            return Ok(());
        }
        if let Some(n) = link.sent_now.get_mut(peer.0 as usize) {
            *n += 1;
        }
        let sent = link.transmit(&self.socks);
        if let Transmitted::Blocked(i) = sent {
            link.blocked = Some(i);
        }
        let sooner = match (link.ep.poll_timeout(), link.sleeps_until) {
            (Some(t), Some(s)) => t < s,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(link);
        if sooner || sent != Transmitted::All {
            self.releases.wake.notify_one();
        }
        Ok(())
    }
}

impl Link {
    /// Drains the endpoint's transmits into the sockets, at most
    /// [`TRANSMITS_PER_TURN`] batches.
    fn transmit(&mut self, socks: &[Sock]) -> Transmitted {
        let now = Instant::now();
        for _ in 0..TRANSMITS_PER_TURN {
            // Fill free buffers.
            while self.tx_queue.len() < BATCH_MAX {
                let idx = (0..BATCH_MAX)
                    .find(|b| !self.tx_queue.iter().any(|q| q.0 == *b))
                    .expect("free buffer");
                let mut buf = std::mem::take(&mut self.tx_bufs[idx]);
                let max = self.max_segments(socks);
                let t = self.ep.poll_transmit(now, max, &mut buf);
                self.tx_bufs[idx] = buf;
                match t {
                    Some(t) => self.tx_queue.push_back((idx, t)),
                    None => break,
                }
            }
            if self.tx_queue.is_empty() {
                return Transmitted::All;
            }
            // Send a run of transmits that share a socket.
            let net = self.tx_queue[0].1.network.0 as usize;
            let n = self
                .tx_queue
                .iter()
                .take_while(|q| q.1.network.0 as usize == net)
                .count();
            let sock = &socks[net];
            // On the stack: the queue holds at most BATCH_MAX transmits.
            let unused = OutDatagram {
                dest: self.tx_queue[0].1.destination,
                data: &[],
                segment: 0,
            };
            let mut items = [unused; BATCH_MAX];
            for (item, (b, t)) in items.iter_mut().zip(self.tx_queue.iter().take(n)) {
                *item = OutDatagram {
                    dest: t.destination,
                    data: &self.tx_bufs[*b][..t.len],
                    segment: t.segment_bytes,
                };
            }
            let items = &items[..n];
            let gso = sock.gso.load(Ordering::Relaxed);
            let r = sys::send_batch(sock.io.get_ref(), items, gso);
            match r {
                Ok(k) => {
                    for _ in 0..k {
                        self.tx_queue.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Transmitted::Blocked(net);
                }
                Err(e) => {
                    if gso && e.raw_os_error() == Some(libc::EIO) {
                        warn!("UDP GSO failed; sending datagrams one by one from now on");
                        sock.gso.store(false, Ordering::Relaxed);
                        continue;
                    }
                    // Unreachable destination and the like: drop the datagram;
                    // loss recovery and path liveness deal with it.
                    debug!(error = %e, "send");
                    self.tx_queue.pop_front();
                }
            }
        }
        Transmitted::TurnFull
    }

    fn max_segments(&self, socks: &[Sock]) -> usize {
        // The endpoint keeps a batch within GSO_BYTES_MAX.
        if socks.iter().all(|s| s.gso.load(Ordering::Relaxed)) {
            GSO_SEGMENTS_MAX
        } else {
            1
        }
    }
}

/// Peer addresses on network `net` whose datagram size is discovered.
fn discovering_paths(topo: &Topology, net: NetworkId) -> Vec<std::net::SocketAddr> {
    topo.peers
        .iter()
        .flat_map(|p| &p.paths)
        .filter(|p| p.network == net && p.datagram_max > p.datagram_bytes)
        .map(|p| p.remote_addr)
        .collect()
}

/// Warns, for every path, when the configured datagram size is larger than
/// the path's MTU carries unfragmented (the kernel's view of the route: a
/// smaller hop further on is not seen). IP then splits each datagram, and
/// one lost fragment loses the whole datagram: a 8 KiB datagram over a
/// 1 500-byte link, for one, lost so many that throughput collapsed.
fn warn_of_fragmentation(topo: &crate::config::Topology) {
    for peer in &topo.peers {
        // A discovered size stays below the first hop's MTU by itself.
        for path in peer
            .paths
            .iter()
            .filter(|p| p.datagram_max == p.datagram_bytes)
        {
            let (network, local, _) = &topo.networks[path.network.0 as usize];
            let Ok(mtu) = sys::path_mtu(*local, path.remote_addr) else {
                continue;
            };
            if let Some(max) = fragmented(path.datagram_bytes, mtu, path.remote_addr.is_ipv6()) {
                warn!(
                    "datagram_size {} of network {network} is more than the path to {} at {} carries \
                     whole (MTU {mtu}: {max} bytes of UDP payload): IP fragments every datagram and a \
                     lost fragment loses all of it; set datagram_size = {max} or less in [networks.{network}]",
                    path.datagram_bytes, peer.name, path.remote_addr
                );
            }
        }
    }
}

/// `Some(largest whole datagram)` when datagrams of `datagram_bytes` are
/// fragmented on a path of `mtu` bytes.
fn fragmented(datagram_bytes: usize, mtu: usize, ipv6: bool) -> Option<usize> {
    let max = sys::datagram_max_for_mtu(mtu, ipv6);
    (datagram_bytes > max).then_some(max)
}

/// Registers `sock` with the runtime for `interest` alone.
fn register(
    sock: std::net::UdpSocket,
    interest: Interest,
) -> std::io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the socket owns its descriptor, open and the same for as long
    // as the `AsyncFd` holds the socket.
    unsafe { AsyncFd::register_with_interest(sock, interest) }.map_err(|e| e.into_parts().1)
}

/// Watches the one full socket for room to send: a duplicate of its
/// descriptor registered for writing, only while the socket is full (the
/// socket itself is registered for reading only, see [`Sock`]).
#[derive(Default)]
struct WriteWatch {
    watched: Option<AsyncFd<std::net::UdpSocket>>,
}

impl WriteWatch {
    /// Watches socket `blocked` (none: stops watching), registered anew
    /// each time: a registration reports room the socket already has, so
    /// nothing freed since the send that failed is missed, and no readiness
    /// left from an earlier wake-up stands for room that is gone.
    fn follow(&mut self, socks: &[Sock], blocked: Option<usize>) {
        self.watched = None;
        // Without a watch (out of descriptors) the path's timers still
        // bring the driver back to try again.
        self.watched = blocked.and_then(|i| {
            let dup = socks[i].io.get_ref().try_clone();
            dup.and_then(|d| register(d, Interest::WRITABLE))
                .inspect_err(|e| debug!(error = %e, "watching a full socket"))
                .ok()
        });
    }

    /// Ready when the watched socket has room again.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.watched {
            Some(fd) => fd.poll_write_ready(cx).map(|_| ()),
            None => Poll::Pending,
        }
    }
}

/// What a driver turn ended with.
enum Turn {
    /// Stop: the node shuts down (answer `done` when given).
    Shutdown(Option<oneshot::Sender<()>>),
    /// Work may be left: turn again at once.
    Again,
    /// Sleep until the deadline, a socket, a command or a wake-up.
    Sleep {
        deadline: Option<Instant>,
        blocked: Option<usize>,
    },
}

/// Lets the runtime's other ready tasks run once before the caller goes on:
/// the task wakes itself, which puts it at the back of the run queue.
/// Unlike `tokio::task::yield_now`, the runtime does not poll its sockets
/// (an `epoll_wait`) before running it again when nothing else is ready.
async fn let_others_run_first() {
    let mut first = true;
    poll_fn(|cx| {
        if std::mem::take(&mut first) {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
}

impl Driver {
    async fn run(mut self) {
        let shared = self.shared.clone();
        let mut watch = WriteWatch::default();
        // One timer for the driver's life, moved as the endpoint's deadline
        // moves (`armed`: where it is set). Moving a tokio timer earlier
        // than the runtime planned to wake makes it wake its own thread (an
        // eventfd write and one more `epoll_wait`); a deadline that came
        // earlier (an acknowledgement owed, most often) is therefore first
        // given one turn of the runtime's other ready tasks, in which a task
        // that got a message may answer and carry the acknowledgement along,
        // moving the deadline back.
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        let mut yielded = false;
        loop {
            let (deadline, blocked) = match self.turn() {
                Turn::Shutdown(done) => {
                    self.shutdown().await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                // Let the runtime's other tasks run between busy turns.
                Turn::Again => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Turn::Sleep { deadline, blocked } => (deadline, blocked),
            };
            if let Some(d) = deadline {
                if armed != Some(d) {
                    if armed.is_some_and(|a| d < a) && !yielded {
                        yielded = true;
                        let_others_run_first().await;
                        continue;
                    }
                    sleep.as_mut().reset(d.into());
                    armed = Some(d);
                }
            }
            yielded = false;
            watch.follow(&shared.socks, blocked);
            let wake = poll_fn(|cx| {
                for s in &shared.socks {
                    // Readiness is cleared by a receive that empties the queue.
                    if s.io.poll_read_ready(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                watch.poll_room(cx)
            });
            let timer = async {
                match deadline {
                    Some(_) => sleep.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                c = self.cmd_rx.recv() => match c {
                    Some(Command::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => {
                        let mut link = shared.link.lock().expect("endpoint lock");
                        self.command(&mut link, c);
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                _ = shared.releases.wake.notified() => {}
                _ = wake => {}
                _ = timer => {}
            }
        }
    }

    /// One turn, under the endpoint lock: commands, credit, receive,
    /// timers, transmit, events.
    fn turn(&mut self) -> Turn {
        let shared = self.shared.clone();
        let mut link = shared.link.lock().expect("endpoint lock");
        // 1. Commands.
        for _ in 0..COMMANDS_PER_TURN {
            match self.cmd_rx.try_recv() {
                Ok(Command::Shutdown(done)) => return Turn::Shutdown(Some(done)),
                Ok(c) => self.command(&mut link, c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Turn::Shutdown(None),
            }
        }
        // Credit given back, and messages waiting for room in a queue.
        self.take_releases(&mut link);
        self.deliver_unclaimed();
        // 2. Receive.
        for i in 0..shared.socks.len() {
            self.receive(&mut link, i);
        }
        // 3. Timers.
        let now = Instant::now();
        if link.ep.poll_timeout().is_some_and(|t| t <= now) {
            link.ep.handle_timeout(now);
        }
        // 4. Transmit.
        let sent = link.transmit(&shared.socks);
        link.blocked = match sent {
            Transmitted::Blocked(i) => Some(i),
            _ => None,
        };
        // 5. Events.
        self.dispatch_events(&mut link);
        self.publish_windows(&link);
        // 6. Sleep until something happens.
        if sent == Transmitted::TurnFull || !self.cmd_rx.is_empty() {
            return Turn::Again;
        }
        let deadline = link.ep.poll_timeout();
        link.sleeps_until = deadline;
        Turn::Sleep {
            deadline,
            blocked: link.blocked,
        }
    }

    /// Copies each peer's congestion window where [`Node::peer_window`]
    /// reads it.
    fn publish_windows(&self, link: &Link) {
        for (i, gate) in self.gates.iter().enumerate() {
            let w = link.ep.peer_window(PeerId(i as u16)).unwrap_or(0);
            gate.window.store(w as u64, Ordering::Relaxed);
        }
    }

    fn command(&mut self, link: &mut Link, c: Command) {
        let now = Instant::now();
        match c {
            Command::Send {
                peer,
                stream,
                body,
                reply,
                accepted,
                passing,
            } => {
                // The endpoint has it once this call returns, under the lock.
                self.shared.sends_queued.fetch_sub(1, Ordering::AcqRel);
                let charge = message_charge(body.len());
                let gate = &self.gates[peer.0 as usize];
                if let Some(reply) = reply {
                    match link.ep.request(now, peer, stream, body) {
                        Ok(id) => {
                            self.pending.insert((peer, id), reply);
                        }
                        Err(e) => {
                            gate.bytes.add_permits(charge);
                            gate.requests.add_permits(1);
                            let _ = reply.send(Err(e));
                        }
                    }
                } else {
                    let r = if passing {
                        link.ep.send_passing(now, peer, stream, body)
                    } else {
                        link.ep.send(now, peer, stream, body)
                    };
                    if r.is_err() {
                        gate.bytes.add_permits(charge);
                    }
                    if let Some(a) = accepted {
                        let _ = a.send(r);
                    }
                }
            }
            Command::Reply { to, body } => {
                if let Err(e) = link.ep.reply(now, to, body) {
                    debug!(error = %e, "reply dropped");
                }
            }
            Command::Register { stream, tx } => {
                self.streams.insert(stream, tx);
                self.deliver_unclaimed();
            }
            Command::Stats(tx) => {
                let mut stats = link.ep.stats();
                stats.auth_failures = self.auth_failures.clone();
                for (n, s) in stats.networks.iter_mut().zip(&self.shared.socks) {
                    n.gso = s.gso.load(Ordering::Relaxed);
                    n.gro = s.gro;
                }
                for (n, &(calls, empty)) in stats.networks.iter_mut().zip(&self.receives) {
                    n.receive_calls = calls;
                    n.empty_receives = empty;
                }
                for m in &mut stats.machines {
                    let peer = link.ep.topology().peer_by_name(&m.name);
                    if let Some(n) = peer.and_then(|p| link.sent_now.get(p.0 as usize)) {
                        m.sent_now = *n;
                    }
                }
                let _ = tx.send(stats);
            }
            Command::Pin {
                peer,
                network,
                done,
            } => {
                let _ = done.send(link.ep.pin_path(peer, network));
            }
            Command::Shutdown(_) => unreachable!("handled by the loop"),
        }
    }

    fn receive(&mut self, link: &mut Link, i: usize) {
        let shared = self.shared.clone();
        let socks = &shared.socks;
        let slot = socks[i].slot_bytes;
        let need = slot * BATCH_MAX;
        for _ in 0..RECV_BATCHES_PER_TURN {
            self.rx_list.clear();
            let Driver {
                rx_arenas, rx_list, ..
            } = self;
            let arena = rx_arenas.arena(need);
            let spare = &mut arena.spare_capacity_mut()[..need];
            // SAFETY: an arena's allocation is initialised throughout (see
            // `RX_ARENAS_MAX`), and `u8` and `MaybeUninit<u8>` share a layout.
            let spare: &mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), need) };
            // A short batch emptied the socket's queue (recvmmsg stops
            // early only when nothing is left, or on an error, and this
            // unconnected socket without IP_RECVERR is told of no ICMP
            // errors): it is reported as `WouldBlock`, which clears the
            // readiness. Otherwise the next turn would find the socket
            // still marked readable and spend a recvmmsg to learn it is
            // empty — one wasted system call and turn per wake-up. A
            // datagram that arrives after this call is a new edge for
            // epoll, and tokio keeps readiness that came after it was read.
            let mut got = 0;
            let counts = &mut self.receives[i];
            let r = socks[i].io.try_io(Interest::READABLE, |s| {
                counts.0 += 1;
                got = sys::recv_batch(s, spare, slot, rx_list).inspect_err(|e| {
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        counts.1 += 1;
                    }
                })?;
                if got < BATCH_MAX {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // An error of the socket (none is expected, see above);
                    // the protocol handles any loss, so only note it.
                    debug!(error = %e, "recv");
                    return;
                }
            }
            if got == 0 {
                return;
            }
            let used = rx_list
                .iter()
                .map(|d| d.slot * slot + d.len)
                .max()
                .unwrap_or(0);
            // SAFETY: an arena's allocation is initialised throughout (see
            // `RX_ARENAS_MAX`): what recvmmsg did not overwrite between the
            // datagrams holds earlier bytes, and nothing reads them.
            unsafe { arena.set_len(used) };
            let mut whole = arena.split_to(used);
            let now = Instant::now();
            let mut consumed = 0;
            let network = NetworkId(i as u8);
            let list = std::mem::take(&mut self.rx_list);
            for d in &list {
                let start = d.slot * slot;
                let _ = whole.split_to(start - consumed);
                let mut dgram = whole.split_to(d.len);
                consumed = start + d.len;
                let bad_auth = link.ep.bad_auth_total();
                if socks[i].gro && d.segment < d.len {
                    while !dgram.is_empty() {
                        let n = d.segment.min(dgram.len());
                        let seg = dgram.split_to(n);
                        link.ep.handle_datagram(now, network, seg);
                    }
                } else {
                    link.ep.handle_datagram(now, network, dgram);
                }
                let failed = link.ep.bad_auth_total() - bad_auth;
                if failed > 0 {
                    if let Some(from) = d.from {
                        self.count_auth_failures(from, failed);
                    }
                }
            }
            self.rx_list = list;
            if got < BATCH_MAX {
                return;
            }
        }
    }

    /// Counts datagrams from `from` that failed authentication.
    fn count_auth_failures(&mut self, from: std::net::SocketAddr, n: u64) {
        if let Some(a) = self.auth_failures.iter_mut().find(|a| a.from == from) {
            a.count += n;
        } else if self.auth_failures.len() < crate::stats::AUTH_FAILURE_SOURCES_MAX {
            debug!(%from, "datagrams from this address fail authentication");
            self.auth_failures
                .push(crate::stats::AuthFailures { from, count: n });
        }
    }

    fn dispatch_events(&mut self, link: &mut Link) {
        while let Some(e) = link.ep.poll_event() {
            let ne = match e {
                Event::Message(d) => {
                    let responder = match d.kind {
                        IncomingKind::Request(to) => Some(Responder {
                            to,
                            cmd: self.cmd_tx.clone(),
                        }),
                        IncomingKind::OneWay => None,
                    };
                    let inc = Incoming {
                        peer: d.peer,
                        stream: d.stream,
                        body: d.body,
                        responder,
                        receipt: Receipt {
                            credit: Some(d.credit),
                            releases: self.releases.clone(),
                        },
                    };
                    if d.stream == StreamId::PROBE {
                        // netprobe: answer at once with a short reply.
                        let Incoming {
                            mut receipt,
                            responder,
                            body,
                            ..
                        } = inc;
                        if let Some(c) = receipt.credit.take() {
                            link.ep.release(c);
                        }
                        let inc = (body, responder);
                        if let Some(r) = inc.1 {
                            let head = inc.0.slice(..inc.0.len().min(8));
                            let _ = link.ep.reply(Instant::now(), r.to, head);
                        }
                        continue;
                    }
                    self.deliver(inc);
                    continue;
                }
                Event::Reply {
                    peer,
                    request,
                    body,
                } => {
                    self.resolve(peer, request, Ok(body));
                    continue;
                }
                Event::RequestFailed {
                    peer,
                    request,
                    error,
                } => {
                    self.resolve(peer, request, Err(error));
                    continue;
                }
                Event::Released { peer, bytes } => {
                    self.gates[peer.0 as usize].bytes.add_permits(bytes);
                    continue;
                }
                Event::PeerUp { peer, epoch } => NodeEvent::PeerUp { peer, epoch },
                Event::PeerDown { peer } => NodeEvent::PeerDown { peer },
                Event::PeerRestarted { peer, epoch } => NodeEvent::PeerRestarted { peer, epoch },
                Event::PathUp { peer, network } => NodeEvent::PathUp { peer, network },
                Event::PathDown { peer, network } => NodeEvent::PathDown { peer, network },
                Event::ActivePathChanged { peer, network } => {
                    NodeEvent::ActivePathChanged { peer, network }
                }
            };
            let _ = self.events.send(ne);
        }
    }

    /// Hands a message to its stream's queue, or keeps it in `unclaimed`
    /// (in order) when the stream has no receiver, its queue is full, or
    /// older messages of the stream wait there already.
    fn deliver(&mut self, inc: Incoming) {
        let stream = inc.stream;
        if let Some(q) = self.unclaimed.get_mut(&stream) {
            q.push_back(inc);
            return;
        }
        let Some(tx) = self.streams.get(&stream) else {
            self.unclaimed.entry(stream).or_default().push_back(inc);
            return;
        };
        match tx.try_send(inc) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(inc)) => {
                debug!(stream = stream.0, "stream queue full: the message waits");
                self.unclaimed.entry(stream).or_default().push_back(inc);
            }
            Err(mpsc::error::TrySendError::Closed(inc)) => {
                // Receiver dropped: hold until registered again.
                self.streams.remove(&stream);
                self.unclaimed.entry(stream).or_default().push_back(inc);
            }
        }
    }

    /// Moves waiting messages into their streams' queues while there is
    /// room, oldest first.
    fn deliver_unclaimed(&mut self) {
        if self.unclaimed.is_empty() {
            return;
        }
        let Driver {
            unclaimed, streams, ..
        } = self;
        unclaimed.retain(|stream, q| {
            let Some(tx) = streams.get(stream) else {
                return true;
            };
            while let Some(inc) = q.pop_front() {
                match tx.try_send(inc) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(inc)) => {
                        q.push_front(inc);
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(inc)) => {
                        q.push_front(inc);
                        streams.remove(stream);
                        return true;
                    }
                }
            }
            false
        });
    }

    /// Gives the credit released by receipts to the endpoint.
    fn take_releases(&mut self, link: &mut Link) {
        self.releases.take(&mut self.released);
        for c in self.released.drain(..) {
            link.ep.release(c);
        }
    }

    /// Completes a request's future and returns its request slot.
    fn resolve(&mut self, peer: PeerId, request: RequestId, result: Result<Bytes, NetError>) {
        if let Some(tx) = self.pending.remove(&(peer, request)) {
            let _ = tx.send(result);
        }
        self.gates[peer.0 as usize].requests.add_permits(1);
    }

    async fn shutdown(&mut self) {
        let shared = self.shared.clone();
        shared
            .link
            .lock()
            .expect("endpoint lock")
            .ep
            .close(Instant::now());
        // Best effort: push the CLOSE datagrams out.
        for _ in 0..4 {
            let done = {
                let mut link = shared.link.lock().expect("endpoint lock");
                link.transmit(&shared.socks) == Transmitted::All && link.tx_queue.is_empty()
            };
            if done {
                break;
            }
            tokio::task::yield_now().await;
        }
        for (_, tx) in std::mem::take(&mut self.pending) {
            let _ = tx.send(Err(NetError::Shutdown));
        }
        for g in self.gates.iter() {
            g.bytes.close();
            g.requests.close();
        }
        self.streams.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    #[test]
    fn a_datagram_larger_than_the_path_carries_whole_is_found() {
        // 1 500-byte Ethernet: 1 472 bytes of UDP payload over IPv4, 1 452 over IPv6.
        assert_eq!(fragmented(1400, 1500, false), None);
        assert_eq!(fragmented(1472, 1500, false), None);
        assert_eq!(fragmented(1473, 1500, false), Some(1472));
        assert_eq!(fragmented(8192, 1500, false), Some(1472));
        assert_eq!(fragmented(1472, 1500, true), Some(1452));
        assert_eq!(fragmented(8192, 9000, false), None);
    }

    #[test]
    fn the_path_mtu_of_the_loopback_is_the_loopbacks() {
        let lo: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let mtu = sys::path_mtu(lo, peer).expect("IP_MTU on a connected socket");
        let dev: usize = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("lo's MTU")
            .trim()
            .parse()
            .expect("a number");
        // An IP packet is at most 65 535 bytes, whatever the device says.
        assert_eq!(mtu, dev.min(65_535));
        assert_eq!(
            fragmented(65_000, mtu, false),
            None,
            "loopback carries 65 000 bytes whole"
        );
    }
    fn credit(peer: u16, session: u64, bytes: usize) -> Credit {
        Credit {
            peer: PeerId(peer),
            session,
            bytes,
        }
    }

    #[test]
    fn released_credit_wakes_the_driver_only_once_it_is_worth_a_grant() {
        // A window of 8 MiB: a grant is worth 1 MiB.
        let r = Releases::new(8 << 20);
        // 4 KiB writes' receipts: none wakes the driver until 1 MiB waits.
        for i in 1..256 {
            assert!(!r.add(credit(0, 7, 4096)), "receipt {i} woke the driver");
        }
        assert!(r.add(credit(0, 7, 4096)), "1 MiB released did not wake it");
        // Past the mark it has been woken already: no second wake-up.
        assert!(!r.add(credit(0, 7, 4096)));
        // Each peer and session counts on its own.
        assert!(r.add(credit(1, 3, 1 << 20)), "another peer's grant");
        let mut taken = Vec::new();
        r.take(&mut taken);
        assert_eq!(
            taken.iter().map(|c| c.bytes).sum::<usize>(),
            (257 << 12) + (1 << 20)
        );
        // Taken: counting starts again.
        assert!(!r.add(credit(0, 7, 4096)));
        assert!(r.add(credit(0, 7, 1 << 20)));
        // A window smaller than a message still wakes on every release.
        assert!(Releases::new(4).add(credit(0, 1, 1)));
    }

    fn test_sock() -> Sock {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_nonblocking(true).expect("non-blocking");
        Sock {
            io: register(s, Interest::READABLE).expect("register"),
            gso: AtomicBool::new(false),
            gro: false,
            slot_bytes: 2048,
        }
    }

    #[tokio::test]
    async fn a_full_socket_is_watched_for_room_and_only_while_it_is_full() {
        let socks = [test_sock(), test_sock()];
        let mut watch = WriteWatch::default();
        async fn room(watch: &WriteWatch) -> bool {
            let room = poll_fn(|cx| watch.poll_room(cx));
            tokio::time::timeout(Duration::from_millis(500), room)
                .await
                .is_ok()
        }
        // Nothing full: nothing to wait for.
        watch.follow(&socks, None);
        assert!(!room(&watch).await, "room reported with no socket full");
        // Socket 1 refused a send: room it already has again is reported
        // by the new registration, not lost between the send and now.
        watch.follow(&socks, Some(1));
        assert!(
            room(&watch).await,
            "room of the watched socket not reported"
        );
        // Still full after the next try: watched anew, reported again.
        watch.follow(&socks, Some(1));
        assert!(
            room(&watch).await,
            "room not reported after a second refusal"
        );
        // Sent: no longer watched, so its room wakes nobody.
        watch.follow(&socks, None);
        assert!(
            !room(&watch).await,
            "room reported after the socket was sent to"
        );
    }
}
