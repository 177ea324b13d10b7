//! Mirroring between daemons: one [`DeviceLink`] per device joins the device
//! thread to GeoMessage and drives the device's sans-IO link
//! ([`gmd_core::link::Link`]): the handshake, the role, the session.
//!
//! - Messages of the device protocol travel on the device's ordered stream
//!   (stream = minor + 1), each prefixed with the link session it belongs
//!   to; a receiver hands only the session's the link takes to the device.
//! - The handshake runs on the control stream: the initiator sends
//!   `Connect` with its offer (identity, role, data generations, marks);
//!   the responder lets the link decide ([`gmd_core::link::decide`]: which
//!   side is newer, what moves, or why not) and answers `Accept` with a
//!   fresh session; the initiator connects its device and sends `Go`; the
//!   responder connects its own. Whatever the initiator sends before the
//!   responder connected waits in the responder's device, tagged with the
//!   session.
//! - A peer declared down by GeoMessage (its promote-failure timeout), a
//!   peer that restarted, or a peer that says it leaves, turns the link off:
//!   the device goes on alone, marks what it writes stale, and records the
//!   peer as down — unless, for a peer that is unreachable (or stalled),
//!   the isolation verdict holds its writes instead (see `isolation`). A
//!   peer that comes back is connected again automatically.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use gmd_core::link::{HandshakeError, Link, Offer, PairRole, Part, Plan, Start};
use gmd_core::mirror::{self, Hold, LinkEvent, PeerLink, Release, ToPeer};
use gmd_core::runtime::Port;
use gmd_core::units::region_count;
use gmd_net::arena::Arenas;
use gmd_net::{Node, PeerId, Receipt, StreamId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Daemon;
use super::peers::{DeviceInfo, PeerReply, PeerRequest, PeerState, decode_bits, encode_bits};

/// How long a handshake request may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a status request may take before the peer counts as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// After this long a daemon has met every peer that is up; one not met is
/// taken as unreachable without asking.
const STARTUP_GRACE: Duration = Duration::from_secs(2);
/// How often disconnected devices look for their peer.
pub(super) const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);
/// Device messages up to this size are handed to GeoMessage without
/// waiting for the driver to queue each one (see `send_loop`).
const POST_BYTES_MAX: usize = 64 << 10;
/// Room for async's backlog of one engine batch, made when the link starts
/// (a larger batch grows it once).
const HELD_MESSAGES_INITIAL: usize = 64;
/// Messages for the peer waiting for the sender task (`DeviceLink::out`).
/// The engine bounds what it has in flight toward the peer: one message per
/// busy slot (application, peer and resync slots: 528 with the default
/// parameters) plus, in async mode, the unacknowledged backlog below
/// `hwm_kib`; 16 384 covers the slots and an 8 MiB async backlog of
/// 512-byte writes, so a peer that keeps up with the engine's own limits
/// never fills it. Its memory is that of the messages (the engine's
/// bounds, in bytes). If it does fill, the device thread must not wait (it
/// holds the engine, and the peer's progress can depend on this side
/// taking the peer's messages, whose credit only the engine returns), and
/// dropping a message would break the mirror silently: the link drops the
/// peer as a stalled one instead (the device goes on alone, marks what it
/// writes stale, and resynchronises when the peer is back).
pub(super) const OUT_MESSAGES_MAX: usize = 16_384;
/// How long the receive task waits before offering a message again to a
/// device whose peer queue is full (`gmd_core::runtime::PEER_MESSAGES_QUEUED_MAX`);
/// the message keeps its GeoMessage credit meanwhile, so the peer's flow
/// control holds the sender back.
/// Encoding buffers per device link: messages to the peer are carved from
/// up to [`ENCODE_ARENAS`] arenas of [`ENCODE_ARENA_BYTES`] (at most 1 MiB
/// held per device once idle), so a small message (a 4 KiB write, an
/// answer) allocates nothing, and neither does GeoMessage's clone of it; a
/// larger one (over 256 KiB) gets a buffer of its own.
const ENCODE_ARENAS: usize = 4;
/// See [`ENCODE_ARENAS`].
const ENCODE_ARENA_BYTES: usize = 256 << 10;
const PEER_QUEUE_RETRY: Duration = Duration::from_millis(1);
/// A connection refused for good (a divergence, a role, another device)
/// is retried this much later; one refused only for now (the peer could
/// not be reached, or was busy with a handshake of its own) at the next
/// look ([`RECONNECT_INTERVAL`]).
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Why the last connection attempt failed, and when the next may start.
#[derive(Clone, Debug)]
pub(super) struct Refusal {
    /// What status and events show.
    pub(super) reason: String,
    /// It holds until something changes on one side.
    lasting: bool,
    /// No attempt before this.
    retry_at: Instant,
}

impl Refusal {
    /// A refusal that holds until something changes: the next attempt
    /// waits [`REFUSED_RETRY`].
    pub(super) fn lasting(reason: String) -> Self {
        Refusal {
            reason,
            lasting: true,
            retry_at: Instant::now() + REFUSED_RETRY,
        }
    }

    /// Records a failed attempt in `slot`; returns whether its reason is
    /// new (worth a warning). A failure only for now does not hide a
    /// lasting refusal's reason (a divergence stays on show while the peer
    /// is busy), and never holds the next attempt back.
    fn record(slot: &mut Option<Refusal>, reason: String, lasting: bool) -> bool {
        let now = Instant::now();
        match slot {
            Some(r) if r.lasting && !lasting => {
                r.retry_at = now;
                false
            }
            _ => {
                let new = slot.as_ref().is_none_or(|r| r.reason != reason);
                let hold = if lasting {
                    REFUSED_RETRY
                } else {
                    Duration::ZERO
                };
                *slot = Some(Refusal {
                    reason,
                    lasting,
                    retry_at: now + hold,
                });
                new
            }
        }
    }

    /// The next attempt must wait.
    fn holds(&self) -> bool {
        Instant::now() < self.retry_at
    }
}

/// A connection attempt that failed: why, and whether it holds until
/// something changes ([`Refusal`]).
#[derive(Debug)]
struct Failed {
    reason: String,
    lasting: bool,
}

impl Failed {
    /// Holds until something changes on one side.
    fn lasting(reason: String) -> Self {
        Failed {
            reason,
            lasting: true,
        }
    }

    /// Only for now: the peer did not answer, or something was in the way.
    fn for_now(reason: String) -> Self {
        Failed {
            reason,
            lasting: false,
        }
    }

    /// The peer's refusal (`busy`: only for now, see [`PeerReply::Refused`]).
    fn peer(reason: String, busy: bool) -> Self {
        Failed {
            reason,
            lasting: !busy,
        }
    }
}

/// Why a handshake step failed, as the reply to the peer: a handshake or
/// session in the way is only for now.
fn refusal_reply(e: &HandshakeError) -> PeerReply {
    match e {
        HandshakeError::Busy(reason) => PeerReply::busy(reason.clone()),
        other => PeerReply::refused(other.to_string()),
    }
}

/// The stream of a device: its minor number + 1 (stream 0 is control).
pub(super) fn device_stream(minor: u32) -> StreamId {
    StreamId(minor as u16 + 1)
}

/// This side's part in a session's resync, for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResyncPart {
    /// Nothing to resync.
    None,
    /// Sends.
    Source,
    /// Receives.
    Target,
}

/// Regions of a session's resync in this side's part.
fn part_regions(part: &Part) -> u64 {
    match part {
        Part::None => 0,
        Part::Source(r) | Part::Target { regions: r, .. } => r.count(),
    }
}

impl ResyncPart {
    fn of(part: &Part) -> ResyncPart {
        match part {
            Part::None => ResyncPart::None,
            Part::Source(_) => ResyncPart::Source,
            Part::Target { .. } => ResyncPart::Target,
        }
    }

    /// The name status uses.
    pub(super) fn name(self) -> &'static str {
        match self {
            ResyncPart::None => "none",
            ResyncPart::Source => "source",
            ResyncPart::Target => "target",
        }
    }
}

/// The link state of one device.
#[derive(Debug)]
pub(super) struct LinkInner {
    /// The running device (AVAILABLE only).
    pub(super) port: Option<Port>,
    /// The peer of the session (pending or in force).
    peer_id: Option<PeerId>,
    /// The link itself: role, handshake, session, hot peer.
    pub(super) core: Link,
    /// A handshake this side started is under way.
    connecting: bool,
    /// The device is being started (peers asking see STARTING).
    pub(super) starting: bool,
    /// The last failed connection attempt.
    pub(super) refused: Option<Refusal>,
    /// This side's part of the current resync is done.
    pub(super) resync_done: bool,
    /// This side's part in the current session's resync, the plan, and
    /// the regions of that part as the handshake gave them.
    pub(super) plan: Option<(ResyncPart, Plan, u64)>,
    /// Responder: the incarnation the initiator's offer carried.
    offer_incarnation: u64,
    /// Writes are held: the peer was lost and this side may not write
    /// alone yet (see `isolation`).
    pub(super) frozen: Option<super::isolation::Frozen>,
    /// Peer losses that held writes so far.
    pub(super) losses: u64,
    /// The peer the fence handler fenced, until the pair is in sync again
    /// (then the handler runs with `unfence`).
    pub(super) fenced: Option<String>,
    /// The peer `gmdctl down` confirmed down since the link was last up.
    pub(super) confirmed_down: Option<String>,
}

impl LinkInner {
    /// The peer mirrored with now, if any.
    pub(super) fn connected_peer(&self) -> Option<String> {
        self.core.connected().map(|(p, _)| p.to_owned())
    }
}

/// Joins one device to GeoMessage; the device thread's [`PeerLink`].
pub(super) struct DeviceLink {
    pub(super) device: String,
    size_bytes: u64,
    /// Messages for the sender task, at most [`OUT_MESSAGES_MAX`].
    out: mpsc::Sender<Outgoing>,
    /// Messages handed to the sender task and not yet taken by GeoMessage
    /// (queued in `out`, or in the task's hands). While any is, a new
    /// message follows them through `out`; when none is, it is sent from
    /// the calling thread ([`Node::try_post_now`]), still in order: every
    /// message of the device is queued under the engine's lock.
    out_pending: Arc<AtomicUsize>,
    /// The device's GeoMessage stream.
    stream: StreamId,
    /// Where messages to the peer are encoded ([`ENCODE_ARENAS`]).
    encode: Mutex<Arenas>,
    /// Async's backlog of the engine's current batch, in order, until its
    /// end (`PeerLink::end_of_batch`): it leaves after the batch's
    /// completions (see `queue`).
    held: Mutex<Vec<Outgoing>>,
    pub(super) inner: Mutex<LinkInner>,
    node: Arc<Node>,
    pub(super) rt: tokio::runtime::Handle,
    /// Told whenever something about the device may have changed, so that
    /// `gmdctl events` hears of it at once (see `ops::watch_devices`).
    watch: Arc<super::ops::Watch>,
    /// This link itself, for tasks it starts from the device thread.
    pub(super) me: std::sync::Weak<DeviceLink>,
    /// How the device behaves when its peer is lost.
    pub(super) isolation: super::isolation::Settings,
}

impl std::fmt::Debug for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLink")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl PeerLink for DeviceLink {
    fn send(&self, message: ToPeer<'_>) {
        self.queue(message, false, false);
    }

    fn send_passing(&self, message: ToPeer<'_>) {
        self.queue(message, true, false);
    }

    fn send_awaited(&self, message: ToPeer<'_>, passing: bool) {
        self.queue(message, passing, true);
    }

    fn end_of_batch(&self) {
        let mut held = self.held.lock().expect("held lock");
        for outgoing in held.drain(..) {
            self.post(outgoing, true);
        }
    }

    fn resync_done(&self) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.resync_done = true;
        let part = inner.plan.map(|(p, _, _)| p.name());
        info!(device = %self.device, peer = ?inner.connected_peer(), part, "resync finished");
        drop(inner);
        self.unfence();
        self.poke();
    }

    fn stalled(&self, waited_ms: u64) {
        self.drop_stalled_peer(waited_ms);
    }

    fn window_hint(&self) -> Option<u64> {
        let peer = self.inner.lock().expect("link lock").peer_id?;
        self.node.peer_window(peer)
    }

    fn renegotiate(&self) {
        let (peer, session) = {
            let inner = self.inner.lock().expect("link lock");
            match inner.core.connected() {
                Some((p, s)) => (p.to_owned(), s),
                None => return,
            }
        };
        info!(device = %self.device, %peer, "the link must be set up again (a side wrote alone, or holds a region stale)");
        self.disconnect();
        let Some(id) = self.node.peer(&peer) else {
            return;
        };
        let request = PeerRequest::Renegotiate {
            device: self.device.clone(),
            session,
        };
        let Ok(body) = serde_json::to_vec(&request) else {
            return;
        };
        let node = self.node.clone();
        self.rt.spawn(async move {
            let _ = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                node.request(id, StreamId::CONTROL, Bytes::from(body)),
            )
            .await;
        });
    }
}

impl DeviceLink {
    /// Queues a device message for the peer, prefixed with the session
    /// (`passing`: the peer may take it before earlier ones still on their
    /// way, see `gmd_core::engine::Engine::poll_action`). An `awaited` one
    /// (a request waits for it) leaves from this thread when the link is
    /// idle: no hop to the runtime on the write's path. Async's backlog (a
    /// write or barrier nobody waits for) is held until the end of the
    /// engine's batch (`PeerLink::end_of_batch`), after the batch's
    /// completions went back to the application, and then leaves the same
    /// way. Under load, and for the rest (resync), the sender task batches.
    fn queue(&self, message: ToPeer<'_>, passing: bool, awaited: bool) {
        let (session, peer) = {
            let inner = self.inner.lock().expect("link lock");
            match (inner.core.connected(), inner.peer_id) {
                (Some((_, s)), Some(p)) => (s, p),
                _ => return,
            }
        };
        let backlog = !awaited && matches!(message, ToPeer::Write { .. } | ToPeer::Flush { .. });
        // One buffer: the session, then the message (one copy of the data),
        // carved from an arena (nothing allocated for a small message).
        let body = {
            let mut arenas = self.encode.lock().expect("encode lock");
            let buf = arenas.arena(8 + mirror::encoded_len(&message));
            buf.put_u64_le(session);
            mirror::encode_into(&message, buf);
            buf.split().freeze()
        };
        let outgoing = Outgoing {
            peer,
            body,
            passing,
        };
        let mut held = self.held.lock().expect("held lock");
        if backlog {
            held.push(outgoing);
            return;
        }
        // In order: what was held back goes first.
        for earlier in held.drain(..) {
            self.post(earlier, true);
        }
        drop(held);
        self.post(outgoing, awaited);
    }

    /// Hands one message to GeoMessage: from this thread (no hop to the
    /// runtime) when `direct`, the link is idle and flow control admits it
    /// at once; otherwise through the sender task, behind what it holds.
    fn post(&self, mut outgoing: Outgoing, direct: bool) {
        if direct
            && outgoing.body.len() <= POST_BYTES_MAX
            && self.out_pending.load(Ordering::Acquire) == 0
        {
            match self.node.try_post_now(
                outgoing.peer,
                self.stream,
                outgoing.body,
                outgoing.passing,
            ) {
                Ok(()) => {
                    self.watch.traffic.notify_one();
                    return;
                }
                Err(back) => outgoing.body = back,
            }
        }
        self.out_pending.fetch_add(1, Ordering::AcqRel);
        match self.out.try_send(outgoing) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.out_pending.fetch_sub(1, Ordering::AcqRel);
                self.drop_stuck_peer(format!(
                    "{OUT_MESSAGES_MAX} messages wait to be sent to the peer"
                ));
                return;
            }
            // The sender task ended with the runtime: nothing to send on.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.out_pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // Writes, resync data and flushes change backlogs and progress.
        self.watch.traffic.notify_one();
    }

    /// Tells the event watcher that this device may have changed.
    pub(super) fn poke(&self) {
        self.watch.changed.notify_one();
    }

    /// Drops a peer that acknowledged nothing for `waited_ms`: the device
    /// goes on alone and marks what it writes stale, as after a peer loss.
    fn drop_stalled_peer(&self, waited_ms: u64) {
        self.drop_stuck_peer(format!(
            "the peer acknowledged nothing for {:.1} s",
            waited_ms as f64 / 1000.0
        ));
    }

    /// Drops a peer that does not keep up (`why`): the device goes on alone
    /// and marks what it writes stale, as after a peer loss.
    fn drop_stuck_peer(&self, why: String) {
        let peer = self.inner.lock().expect("link lock").connected_peer();
        warn!(
            device = %self.device,
            ?peer,
            "{why} while writes waited: dropping it and going on alone \
             (written regions are marked stale and resynchronised when the \
             peer answers again)"
        );
        self.lose("the peer acknowledged nothing");
        // Do not reconnect at once to a peer that is probably still stuck:
        // wait as after a refused handshake, serving alone meanwhile.
        self.inner.lock().expect("link lock").refused = Some(Refusal::lasting(why));
        self.poke();
    }

    /// A link for `device` on `machine` and its two tasks (sender and
    /// receiver) on `node`.
    pub(super) fn start(
        node: Arc<Node>,
        machine: &str,
        device: String,
        minor: u32,
        size_bytes: u64,
        watch: Arc<super::ops::Watch>,
        isolation: super::isolation::Settings,
    ) -> Arc<DeviceLink> {
        let (tx, rx) = mpsc::channel(OUT_MESSAGES_MAX);
        let stream = device_stream(minor);
        let out_pending = Arc::new(AtomicUsize::new(0));
        let link = Arc::new_cyclic(|me| DeviceLink {
            inner: Mutex::new(LinkInner {
                port: None,
                peer_id: None,
                core: Link::new(&device, machine),
                connecting: false,
                starting: false,
                refused: None,
                resync_done: false,
                plan: None,
                offer_incarnation: 0,
                frozen: None,
                losses: 0,
                fenced: None,
                confirmed_down: None,
            }),
            device,
            size_bytes,
            out: tx,
            out_pending: out_pending.clone(),
            stream,
            encode: Mutex::new(Arenas::new(ENCODE_ARENAS, ENCODE_ARENA_BYTES, false)),
            held: Mutex::new(Vec::with_capacity(HELD_MESSAGES_INITIAL)),
            node: node.clone(),
            rt: tokio::runtime::Handle::current(),
            watch,
            me: me.clone(),
            isolation,
        });
        tokio::spawn(send_loop(node.clone(), stream, rx, out_pending));
        tokio::spawn(receive_loop(node, stream, link.clone()));
        link
    }

    /// Regions of the device.
    fn region_count(&self) -> u64 {
        region_count(self.size_bytes)
    }

    /// Gives the link the running device, started in `role`.
    pub(super) fn attach(&self, port: Port, role: PairRole) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.port = Some(port);
        inner.starting = false;
        inner.refused = None;
        let incarnation = loop {
            let i: u64 = rand::random();
            if i != 0 {
                break i;
            }
        };
        inner.core.started(incarnation, role);
        drop(inner);
        self.poke();
    }

    /// Ends the session, if any, as a loss of the peer (the device marks
    /// unacknowledged writes stale); returns the peer and session it had.
    pub(super) fn disconnect(&self) -> Option<(String, u64)> {
        self.end(LinkEvent::Lost)
    }

    /// Ends the session, if any, telling the device with `event`.
    pub(super) fn end(&self, event: LinkEvent) -> Option<(String, u64)> {
        let mut inner = self.inner.lock().expect("link lock");
        let peer = inner.core.peer().map(str::to_owned);
        let had = inner.core.end();
        if had.is_some() {
            if let Some(port) = &inner.port {
                port.link_event(event);
            }
        }
        // `connecting` stays: a handshake this side started runs to its end
        // (`connect` clears it then), so that no new one begins meanwhile,
        // whose offer the old one's end would abandon.
        inner.peer_id = None;
        inner.plan = None;
        drop(inner);
        self.poke();
        had.and_then(|session| peer.map(|p| (p, session)))
    }

    /// Forgets the running device (it is stopping).
    pub(super) fn detach(&self) {
        self.disconnect();
        let mut inner = self.inner.lock().expect("link lock");
        DeviceLink::thaw(&mut inner, &self.device);
        inner.port = None;
    }

    /// Changes the role the link offers (the device's changed already).
    pub(super) fn set_role(&self, role: PairRole) {
        self.inner.lock().expect("link lock").core.set_role(role);
        self.poke();
    }
}

/// A device message on its way to the sender task.
#[derive(Debug)]
pub(super) struct Outgoing {
    peer: PeerId,
    /// The session, then the encoded message.
    body: Bytes,
    /// It may pass earlier messages (`Node::post_passing`).
    passing: bool,
}

async fn send_loop(
    node: Arc<Node>,
    stream: StreamId,
    mut rx: mpsc::Receiver<Outgoing>,
    pending: Arc<AtomicUsize>,
) {
    while let Some(Outgoing {
        peer,
        body,
        passing,
    }) = rx.recv().await
    {
        // In order: flow control admits each message before the next, and
        // the driver takes them in that order. Small messages do not wait a
        // driver turn each (4 KiB writes stream back to back); large ones
        // do, which paces the driver's fragmenting (measured: bursts of
        // 1 MiB messages lost a quarter of their throughput).
        // A large message never passes (it is sent whole, in order): that
        // is always allowed.
        let result = if passing && body.len() <= POST_BYTES_MAX {
            node.post_passing(peer, stream, body).await
        } else if body.len() <= POST_BYTES_MAX {
            node.post(peer, stream, body).await
        } else {
            node.send(peer, stream, body).await
        };
        // GeoMessage has it (or refused it): later messages may go direct.
        pending.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = result {
            debug!(stream = stream.0, error = %e, "device message not sent");
        }
    }
}

async fn receive_loop(node: Arc<Node>, stream: StreamId, link: Arc<DeviceLink>) {
    let mut rx = match node.register_stream(stream).await {
        Ok(rx) => rx,
        Err(e) => {
            warn!(device = %link.device, error = %e, "cannot receive device messages");
            return;
        }
    };
    let receipts = Arc::new(Receipts::default());
    while let Some(incoming) = rx.recv().await {
        let body = incoming.body;
        if body.len() < 8 {
            warn!(device = %link.device, "malformed device message (no session)");
            continue;
        }
        let session = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        // Only the session the link takes from this peer (pending or in
        // force) reaches the device: nothing from an ended one.
        let port = {
            let inner = link.inner.lock().expect("link lock");
            let taken = inner.peer_id == Some(incoming.peer)
                && inner.core.peer().and_then(|p| inner.core.session_with(p)) == Some(session);
            taken.then(|| inner.port.clone()).flatten()
        };
        let Some(port) = port else {
            continue;
        };
        match mirror::decode(&body.slice(8..), link.size_bytes) {
            Ok(message) => {
                // The message's GeoMessage credit goes back when the device
                // thread has taken it (for an operation with data, once it
                // is copied into an aligned buffer), so the peer's
                // flow-control window bounds this side's unprocessed backlog.
                let token = receipts.keep(incoming.receipt);
                let mut offered = (message, Hold::new(receipts.clone(), token));
                // A full device queue holds this task (and so the stream,
                // and the peer's window) until the engine catches up.
                while let Err(back) = port.from_peer_held(session, offered.0, offered.1) {
                    offered = back;
                    tokio::time::sleep(PEER_QUEUE_RETRY).await;
                }
            }
            Err(e) => warn!(device = %link.device, error = %e, "device message refused"),
        }
        // Answers shrink backlogs, resync data fills the target.
        link.watch.traffic.notify_one();
    }
}

/// Receipts of the device messages the device thread has not taken yet,
/// each named by the token of the message's [`Hold`]. Dropping the hold
/// drops the receipt, which gives the message's credit back to the peer.
/// The slots are reused: nothing is allocated per message once warm.
#[derive(Default)]
struct Receipts {
    held: Mutex<slab::Slab<Receipt>>,
}

impl Receipts {
    /// Keeps `receipt` until the hold of the returned token is dropped.
    fn keep(&self, receipt: Receipt) -> u64 {
        self.held.lock().expect("receipts lock").insert(receipt) as u64
    }
}

impl Release for Receipts {
    fn release(&self, token: u64) {
        let receipt = self
            .held
            .lock()
            .expect("receipts lock")
            .try_remove(token as usize);
        // Given back outside the lock.
        drop(receipt);
    }
}

impl Daemon {
    /// Sends a request to another daemon and waits for its reply.
    pub(super) async fn ask(
        &self,
        peer: &str,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, String> {
        let id = self
            .node
            .peer(peer)
            .ok_or_else(|| format!("{peer} is not a machine of this cluster"))?;
        let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(
            timeout,
            self.node.request(id, StreamId::CONTROL, Bytes::from(body)),
        )
        .await
        .map_err(|_| format!("{peer} did not answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply).map_err(|e| format!("unreadable answer from {peer}: {e}"))
    }

    /// What `peer` says about `device`; `None` when it cannot be reached.
    /// A peer GeoMessage has no session with is not waited for, once the
    /// daemon has been up long enough to have found it.
    pub(super) async fn peer_status(&self, device: &str, peer: &str) -> Option<DeviceInfo> {
        let known = self
            .reachable
            .lock()
            .expect("reachable lock")
            .contains(peer);
        if !known && self.started.elapsed() > STARTUP_GRACE {
            return None;
        }
        match self
            .ask(
                peer,
                &PeerRequest::Status {
                    device: device.into(),
                },
                STATUS_TIMEOUT,
            )
            .await
        {
            Ok(PeerReply::Status { info }) => Some(info),
            Ok(other) => {
                debug!(%device, %peer, ?other, "unexpected status answer");
                None
            }
            Err(e) => {
                debug!(%device, %peer, error = %e, "peer unreachable");
                None
            }
        }
    }

    /// This side's offer for a handshake of `device` (blocking).
    fn local_offer(&self, device: &str) -> Result<Offer, String> {
        let link = self
            .link(device)
            .ok_or_else(|| format!("no device {device}"))?;
        // The offer says what the map on disk says: a region just received
        // counts once its cleared mark is written, a generation just drawn
        // once it is.
        let settler = self
            .devices
            .lock()
            .expect("devices lock")
            .get(device)
            .and_then(|h| h.facts_settler());
        if let Some(settler) = settler {
            settler.settle().map_err(|e| e.to_string())?;
        }
        let devices = self.devices.lock().expect("devices lock");
        let handle = devices
            .get(device)
            .ok_or_else(|| format!("no device {device}"))?;
        let identity = handle
            .identity()
            .ok_or_else(|| format!("{device}: the state map is not open"))?;
        let (facts, marks, hot) = handle
            .offer_parts()
            .ok_or_else(|| format!("{device}: the state map is not open"))?;
        let mut inner = link.inner.lock().expect("link lock");
        // The configuration as the device was started with it: a session
        // uses checksum resync when both sides' offers ask for it.
        inner
            .core
            .set_resync_checksums(handle.config().resync_checksums);
        Ok(inner.core.offer(identity, facts, marks, hot))
    }

    /// Starts mirroring `device` with `peer`, as initiator.
    pub(super) async fn connect(self: Arc<Self>, device: String, peer: String) {
        let Some(link) = self.link(&device) else {
            return;
        };
        {
            let mut inner = link.inner.lock().expect("link lock");
            if inner.port.is_none() || inner.connecting {
                return;
            }
            if let Err(e) = inner.core.begin(&peer) {
                debug!(%device, %peer, "not connecting: {e}");
                return;
            }
            inner.connecting = true;
            inner.peer_id = self.node.peer(&peer);
        }
        let result = self.clone().try_connect(&link, &device, &peer).await;
        link.poke();
        let mut inner = link.inner.lock().expect("link lock");
        inner.connecting = false;
        inner.core.abandon_offer(&peer);
        if let Err(failed) = &result {
            if inner.core.peer() == Some(peer.as_str()) {
                // The peer's own offer, taken meanwhile, set the link up.
                let reason = &failed.reason;
                debug!(%device, %peer, "own offer not taken ({reason}); the peer's was");
                return;
            }
        }
        if let Err(Failed { reason, lasting }) = result {
            if Refusal::record(&mut inner.refused, reason.clone(), lasting) {
                warn!(%device, %peer, "not mirroring: {reason}");
            } else {
                debug!(%device, %peer, "not mirroring: {reason}");
            }
        }
    }

    async fn try_connect(
        self: Arc<Self>,
        link: &Arc<DeviceLink>,
        device: &str,
        peer: &str,
    ) -> Result<(), Failed> {
        let d = self.clone();
        let name = device.to_owned();
        let offer = tokio::task::spawn_blocking(move || d.local_offer(&name))
            .await
            .map_err(|e| Failed::lasting(e.to_string()))?
            .map_err(Failed::lasting)?;
        let request = PeerRequest::Connect {
            device: device.into(),
            offer: Box::new(offer),
        };
        let accept = match self
            .ask(peer, &request, HANDSHAKE_TIMEOUT)
            .await
            .map_err(Failed::for_now)?
        {
            PeerReply::Accept { accept } => accept,
            PeerReply::Refused { reason, busy } => return Err(Failed::peer(reason, busy)),
            other => return Err(Failed::lasting(format!("unexpected answer {other:?}"))),
        };
        let start = {
            let mut inner = link.inner.lock().expect("link lock");
            let Some(port) = inner.port.clone() else {
                return Err(Failed::for_now(
                    "the device stopped during the handshake".into(),
                ));
            };
            let start = inner
                .core
                .on_accept(peer, &accept, link.region_count())
                .map_err(|e| Failed {
                    lasting: !matches!(e, HandshakeError::Busy(_)),
                    reason: e.to_string(),
                })?;
            inner.peer_id = self.node.peer(peer);
            inner.resync_done = false;
            inner.plan = Some((
                ResyncPart::of(&start.part),
                start.plan,
                part_regions(&start.part),
            ));
            DeviceLink::thaw(&mut inner, &link.device);
            port.link_event(LinkEvent::Connected {
                session: start.session,
                connection: start.connection(link.region_count()),
            });
            start
        };
        match self
            .ask(
                peer,
                &PeerRequest::Go {
                    device: device.into(),
                    session: start.session,
                },
                HANDSHAKE_TIMEOUT,
            )
            .await
        {
            Ok(PeerReply::Ok) => {}
            Ok(PeerReply::Refused { reason, busy }) => {
                link.disconnect();
                return Err(Failed::peer(reason, busy));
            }
            Ok(other) => {
                link.disconnect();
                return Err(Failed::lasting(format!("unexpected answer {other:?}")));
            }
            Err(e) => {
                link.disconnect();
                return Err(Failed::for_now(e));
            }
        }
        link.inner.lock().expect("link lock").refused = None;
        self.connected(device, &start).await;
        Ok(())
    }

    /// A session started: say so, and forget the peer's down record.
    async fn connected(self: &Arc<Self>, device: &str, start: &Start) {
        let part = ResyncPart::of(&start.part);
        let regions = part_regions(&start.part);
        info!(
            %device,
            peer = %start.peer,
            session = start.session,
            part = part.name(),
            regions,
            basis = ?start.plan.basis,
            full = start.plan.full,
            "mirroring"
        );
        if part == ResyncPart::Target && start.plan.discarded > 0 {
            warn!(
                %device,
                peer = %start.peer,
                regions = start.plan.discarded,
                "{} region(s) written here and never sent to {} are overwritten by its newer data",
                start.plan.discarded,
                start.peer
            );
        }
        self.record_peer(device, &start.peer, false).await;
        if part == ResyncPart::None {
            if let Some(link) = self.link(device) {
                link.unfence();
            }
        }
    }

    /// Records or forgets `peer` as down for `device` (in its map).
    pub(super) async fn record_peer(self: &Arc<Self>, device: &str, peer: &str, down: bool) {
        let d = self.clone();
        let (device, peer) = (device.to_owned(), peer.to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            let mut devices = d.devices.lock().expect("devices lock");
            if let Some(handle) = devices.get_mut(&device) {
                if let Err(e) = handle.set_peer_down(&peer, down) {
                    warn!(%device, %peer, "cannot record the peer: {e}");
                }
            }
        })
        .await;
    }

    /// Answers a request from another daemon.
    pub(super) async fn on_peer_request(
        self: Arc<Self>,
        from: String,
        request: PeerRequest,
    ) -> PeerReply {
        let refused = PeerReply::refused;
        match request {
            PeerRequest::Facts => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.facts()).await {
                    Ok(facts) => PeerReply::Facts { facts },
                    Err(e) => refused(e.to_string()),
                }
            }
            PeerRequest::Status { device } => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.local_info(&device, false)).await {
                    Ok(Ok((info, _))) => PeerReply::Status { info },
                    Ok(Err(e)) => refused(e.message),
                    Err(e) => refused(e.to_string()),
                }
            }
            PeerRequest::Connect { device, offer } => self.on_connect(from, device, *offer).await,
            PeerRequest::Go { device, session } => self.on_go(&from, &device, session).await,
            PeerRequest::Leave {
                device,
                session,
                flushed,
            } => {
                if let Some(link) = self.link(&device) {
                    if link.current(&from, session) {
                        // Recorded first, as for a peer lost.
                        self.record_peer(&device, &from, true).await;
                    }
                    if link.current(&from, session) {
                        link.end(if flushed {
                            LinkEvent::Left
                        } else {
                            LinkEvent::Lost
                        });
                        warn!(%device, peer = %from, flushed, "peer stopped its device: going on alone, writes are marked stale");
                    }
                }
                PeerReply::Ok
            }
            PeerRequest::Renegotiate { device, session } => {
                if let Some(link) = self.link(&device) {
                    if link.current(&from, session) {
                        info!(%device, peer = %from, "peer asks to set the link up again");
                        link.disconnect();
                    }
                }
                PeerReply::Ok
            }
            PeerRequest::StopDevice { device, by } => {
                warn!(%device, %by, "stopping the device at the request of {by}");
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.force_stop(&device)).await {
                    Ok(Ok(())) => PeerReply::Ok,
                    Ok(Err(e)) => refused(e.message),
                    Err(e) => refused(e.to_string()),
                }
            }
            PeerRequest::GetMap { device } => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.local_info(&device, true)).await {
                    Ok(Ok((info, bits))) => PeerReply::Map {
                        info,
                        bits: encode_bits(&bits.unwrap_or_default()),
                    },
                    Ok(Err(e)) => refused(e.message),
                    Err(e) => refused(e.to_string()),
                }
            }
            PeerRequest::Checksums {
                device,
                session,
                regions,
            } => self.on_checksums(&from, &device, session, regions).await,
            PeerRequest::Unify {
                device,
                master,
                bits,
            } => {
                let Some(size) = self.config().devices.get(&device).map(|d| d.size_bytes) else {
                    return refused(format!("device {device} has no copy on {}", self.machine));
                };
                let bits = match decode_bits(&bits, gmd_core::units::region_count(size)) {
                    Ok(b) => b,
                    Err(reason) => return refused(reason),
                };
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.unify_local(&device, master, &bits))
                    .await
                {
                    Ok(Ok(())) => PeerReply::Ok,
                    Ok(Err(e)) => refused(e.message),
                    Err(e) => refused(e.to_string()),
                }
            }
        }
    }

    async fn on_connect(self: Arc<Self>, from: String, device: String, remote: Offer) -> PeerReply {
        let refuse = PeerReply::refused;
        let Some(link) = self.link(&device) else {
            return refuse(format!("device {device} has no copy on {}", self.machine));
        };
        if remote.facts.machine != from {
            return refuse(format!(
                "{device}: an offer from {from} that names {}",
                remote.facts.machine
            ));
        }
        let (running, previous) = {
            let inner = link.inner.lock().expect("link lock");
            (
                inner.port.is_some() && !inner.starting,
                inner.connected_peer().filter(|p| *p != from),
            )
        };
        if !running {
            return PeerReply::busy(format!("{device} is not AVAILABLE on {}", self.machine));
        }
        // One active remote peer: a second one joining takes over.
        if let Some(previous) = previous {
            warn!(%device, first = %previous, second = %from,
                "a second remote peer joined: {previous} is taken down (gmddown) and its device stopped");
            link.disconnect();
            self.record_peer(&device, &previous, true).await;
            let stop = PeerRequest::StopDevice {
                device: device.clone(),
                by: self.machine.clone(),
            };
            if let Err(e) = self.ask(&previous, &stop, HANDSHAKE_TIMEOUT).await {
                warn!(%device, peer = %previous, "could not stop the device there: {e}");
            }
        }
        let d = self.clone();
        let name = device.clone();
        let local = match tokio::task::spawn_blocking(move || d.local_offer(&name)).await {
            Ok(Ok(offer)) => offer,
            Ok(Err(e)) => return refuse(e),
            Err(e) => return refuse(e.to_string()),
        };
        let session = loop {
            let s: u64 = rand::random();
            if s != 0 {
                break s;
            }
        };
        let mut inner = link.inner.lock().expect("link lock");
        // Both offered at once and the peer took ours: its own offer,
        // arriving now, must not end the session it just accepted.
        if inner.core.refuse_crossing(&remote) {
            debug!(%device, peer = %from, "an offer that crossed ours: the session goes on");
            return PeerReply::busy(format!(
                "{device}: {} mirrors with {from} already (the offers crossed)",
                self.machine
            ));
        }
        // The initiator starts over (it restarted, or lost our earlier
        // answer): the session in force ends first.
        if inner.connected_peer().is_some() && inner.core.end().is_some() {
            if let Some(port) = &inner.port {
                port.link_event(LinkEvent::Lost);
            }
        }
        match inner.core.on_offer(&local, &remote, session) {
            Ok(accept) => {
                inner.peer_id = self.node.peer(&from);
                inner.offer_incarnation = remote.incarnation;
                inner.resync_done = false;
                PeerReply::Accept {
                    accept: Box::new(accept),
                }
            }
            Err(HandshakeError::Busy(reason)) => {
                // Only for now (a handshake of this side's own): nothing
                // to record, the peer may try again at once.
                drop(inner);
                debug!(%device, peer = %from, "connection refused for now: {reason}");
                PeerReply::busy(reason)
            }
            Err(e) => {
                let reason = e.to_string();
                let new = Refusal::record(&mut inner.refused, reason.clone(), true);
                drop(inner);
                if new {
                    warn!(%device, peer = %from, "connection refused: {reason}");
                }
                link.poke();
                refuse(reason)
            }
        }
    }

    async fn on_go(self: Arc<Self>, from: &str, device: &str, session: u64) -> PeerReply {
        let Some(link) = self.link(device) else {
            return PeerReply::refused(format!("no device {device}"));
        };
        let start = {
            let mut inner = link.inner.lock().expect("link lock");
            let Some(port) = inner.port.clone() else {
                return PeerReply::busy(format!("{device} stopped on {}", self.machine));
            };
            let incarnation = inner.offer_incarnation;
            match inner.core.on_go(from, session, incarnation) {
                Ok(start) => {
                    inner.plan = Some((
                        ResyncPart::of(&start.part),
                        start.plan,
                        part_regions(&start.part),
                    ));
                    inner.refused = None;
                    DeviceLink::thaw(&mut inner, &link.device);
                    port.link_event(LinkEvent::Connected {
                        session,
                        connection: start.connection(link.region_count()),
                    });
                    start
                }
                Err(e) => return refusal_reply(&e),
            }
        };
        link.poke();
        self.connected(device, &start).await;
        PeerReply::Ok
    }

    /// GeoMessage declared `peer` down (or saw it restart): every device
    /// mirroring with it goes on alone and records it down.
    ///
    /// `isolating`: the peer is unreachable (not known to have stopped):
    /// the device may hold its writes instead (see `isolation`).
    pub(super) async fn peer_lost(self: &Arc<Self>, peer: &str, why: &str, isolating: bool) {
        for link in self.links() {
            let (lost, session) = {
                let inner = link.inner.lock().expect("link lock");
                (
                    inner.core.peer() == Some(peer),
                    inner
                        .core
                        .connected()
                        .filter(|(p, _)| *p == peer)
                        .map(|(_, s)| s),
                )
            };
            if !lost {
                continue;
            }
            // Recorded first: once status shows the link gone, the record
            // that lets this side go on alone (and be promoted) is there.
            if let Some(session) = session {
                self.record_peer(&link.device, peer, true).await;
                if !link.current(peer, session) {
                    continue;
                }
            }
            if isolating {
                link.lose(why);
            } else if link.disconnect().is_some() {
                warn!(device = %link.device, %peer, "{why}: the device goes on alone and marks written regions stale");
            }
        }
    }

    /// A device just started here: mirror with the first remote peer whose
    /// copy is AVAILABLE, taking over from whichever peer it mirrors with now
    /// (one active remote peer; the first is taken down).
    pub(super) async fn join(self: &Arc<Self>, device: String) {
        for peer in self.remote_peers(&device) {
            if let Some(info) = self.peer_status(&device, &peer).await {
                if info.state == PeerState::Available {
                    self.clone().connect(device.clone(), peer).await;
                    return;
                }
            }
        }
    }

    /// Connects every AVAILABLE device that is not mirroring to the first
    /// reachable remote peer whose copy is AVAILABLE and free.
    pub(super) async fn reconnect(self: &Arc<Self>) {
        for link in self.links() {
            let skip = {
                let inner = link.inner.lock().expect("link lock");
                inner.port.is_none()
                    || inner.core.peer().is_some()
                    || inner.connecting
                    || inner.core.role() == PairRole::Split
                    || inner.refused.as_ref().is_some_and(Refusal::holds)
            };
            if skip {
                continue;
            }
            let device = link.device.clone();
            for peer in self.remote_peers(&device) {
                if let Some(info) = self.peer_status(&device, &peer).await {
                    if info.state == PeerState::Available
                        && info
                            .connected_to
                            .as_deref()
                            .is_none_or(|m| m == self.machine)
                    {
                        self.clone().connect(device.clone(), peer).await;
                        break;
                    }
                }
            }
        }
    }
}

impl DeviceLink {
    /// Whether `session` with `peer` is the one pending or in force.
    fn current(&self, peer: &str, session: u64) -> bool {
        self.inner
            .lock()
            .expect("link lock")
            .core
            .session_with(peer)
            == Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_for_now_does_not_hold_the_next_attempt() {
        let mut slot = None;
        assert!(Refusal::record(
            &mut slot,
            "beta did not answer".into(),
            false
        ));
        assert!(!slot.as_ref().unwrap().holds());
        // The same reason again is not news (no second warning).
        assert!(!Refusal::record(
            &mut slot,
            "beta did not answer".into(),
            false
        ));
    }

    #[test]
    fn a_lasting_refusal_holds_and_stays_on_show_through_failures_for_now() {
        let mut slot = None;
        assert!(Refusal::record(&mut slot, "data divergence".into(), true));
        assert!(slot.as_ref().unwrap().holds());
        // Busy a moment later: the divergence is still what status shows,
        // but the next attempt need not wait.
        assert!(!Refusal::record(
            &mut slot,
            "beta is connecting to alpha itself".into(),
            false
        ));
        let r = slot.as_ref().unwrap();
        assert_eq!(r.reason, "data divergence");
        assert!(!r.holds());
        // The divergence found again holds again, without a new warning.
        assert!(!Refusal::record(&mut slot, "data divergence".into(), true));
        assert!(slot.as_ref().unwrap().holds());
        // Another lasting reason replaces it.
        assert!(Refusal::record(
            &mut slot,
            "not the same device".into(),
            true
        ));
        assert_eq!(slot.unwrap().reason, "not the same device");
    }

    #[test]
    fn only_a_busy_handshake_is_refused_for_now() {
        let busy = refusal_reply(&HandshakeError::Busy("connecting itself".into()));
        assert!(matches!(busy, PeerReply::Refused { busy: true, .. }));
        let invalid = refusal_reply(&HandshakeError::Invalid("not the same device".into()));
        assert!(matches!(invalid, PeerReply::Refused { busy: false, .. }));
    }

    #[test]
    fn refusals_read_the_same_to_daemons_that_do_not_know_busy() {
        // A lasting refusal is written as before; an older daemon's refusal
        // (no `busy`) reads as lasting; an older daemon reading a busy one
        // ignores the field it does not know.
        let lasting = serde_json::to_value(PeerReply::refused("no".into())).unwrap();
        assert_eq!(
            lasting,
            serde_json::json!({"reply": "refused", "reason": "no"})
        );
        let old: PeerReply = serde_json::from_str(r#"{"reply":"refused","reason":"no"}"#).unwrap();
        assert!(matches!(old, PeerReply::Refused { busy: false, .. }));
        let busy = serde_json::to_string(&PeerReply::busy("later".into())).unwrap();
        let back: PeerReply = serde_json::from_str(&busy).unwrap();
        assert!(matches!(back, PeerReply::Refused { busy: true, .. }));
    }
}
