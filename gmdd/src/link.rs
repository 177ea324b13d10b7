//! Mirroring between daemons: one [`DeviceLink`] per device joins the device
//! thread to GeoMessage, and the handshake below decides when two copies
//! mirror, which one resyncs which, and when they refuse.
//!
//! - Messages of the device protocol travel on the device's ordered stream
//!   (stream = minor + 1), each prefixed with the link session it belongs
//!   to; a receiver hands only the current session's to the device.
//! - The handshake runs on the control stream: the initiator sends
//!   `Connect` with its map; the responder checks identity and the rules,
//!   picks the resync direction and a fresh session id and answers
//!   `Accept`; the initiator connects its device and sends `Go`; the
//!   responder connects its own. Whatever the initiator sends before the
//!   responder connects waits in the responder's device, tagged with the
//!   session.
//! - A peer declared down by GeoMessage (its promote-failure timeout), a
//!   peer that restarted, or a peer that says it leaves, turns the link off:
//!   the device goes on alone, marks what it writes stale, and records the
//!   peer as down. A peer that comes back is connected again automatically.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use gmd_core::config::{Mode, Role};
use gmd_core::engine::ResyncRole;
use gmd_core::mirror::{self, LinkEvent, PeerLink, ToPeer};
use gmd_core::runtime::Port;
use gmd_net::{Node, PeerId, StreamId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Daemon;
use super::peers::{
    DeviceInfo, PeerReply, PeerRequest, PeerState, WireRole, decode_bits, encode_bits, union,
};

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
/// A refused connection is retried this much later.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// The stream of a device: its minor number + 1 (stream 0 is control).
pub(super) fn device_stream(minor: u32) -> StreamId {
    StreamId(minor as u16 + 1)
}

/// The link state of one device.
#[derive(Debug, Default)]
pub(super) struct LinkInner {
    /// The running device (AVAILABLE only).
    pub(super) port: Option<Port>,
    /// The peer of the session (pending or connected).
    pub(super) peer: Option<String>,
    peer_id: Option<PeerId>,
    /// The session in force or being set up (0: none).
    pub(super) session: u64,
    /// Mirroring.
    pub(super) connected: bool,
    connecting: bool,
    /// The device is being started (peers asking see STARTING).
    pub(super) starting: bool,
    /// The role to take when the initiator says `Go` (responder).
    pending_role: Option<ResyncRole>,
    /// Last refusal and when.
    pub(super) refused: Option<(String, Instant)>,
    /// This side's part of the current resync is done.
    pub(super) resync_done: bool,
    /// This side's part in the current session's resync.
    pub(super) resync_role: Option<WireRole>,
    /// Which peer acknowledged the writes behind the running engine's hot
    /// cells (reset when the device starts).
    pub(super) hot_acked_by: HotPeer,
}

/// The peers a running device mirrored with since it started: its hot cells
/// (0x5) are known to be identical only on such a peer, and only if there
/// was one. A peer that takes over from another must get them resent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum HotPeer {
    /// No session yet.
    #[default]
    Nobody,
    /// Every session was with this peer.
    Only(String),
    /// Sessions with more than one peer.
    Several,
}

impl HotPeer {
    /// Records a session with `peer`.
    fn session_with(&mut self, peer: &str) {
        *self = match std::mem::take(self) {
            HotPeer::Nobody => HotPeer::Only(peer.to_owned()),
            HotPeer::Only(p) if p == peer => HotPeer::Only(p),
            _ => HotPeer::Several,
        };
    }

    /// Whether every session was with `peer`.
    pub(super) fn is_only(&self, peer: &str) -> bool {
        matches!(self, HotPeer::Only(p) if p == peer)
    }
}

/// Joins one device to GeoMessage; the device thread's [`PeerLink`].
pub(super) struct DeviceLink {
    pub(super) device: String,
    size_bytes: u64,
    out: mpsc::UnboundedSender<(PeerId, Bytes)>,
    pub(super) inner: Mutex<LinkInner>,
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLink")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl PeerLink for DeviceLink {
    fn send(&self, message: ToPeer) {
        let (session, peer) = {
            let inner = self.inner.lock().expect("link lock");
            match (inner.session, inner.peer_id) {
                (0, _) | (_, None) => return,
                (s, Some(p)) => (s, p),
            }
        };
        // One buffer: the session, then the message (one copy of the data).
        let mut body = BytesMut::with_capacity(8 + mirror::encoded_len(&message));
        body.put_u64_le(session);
        mirror::encode_into(&message, &mut body);
        let _ = self.out.send((peer, body.freeze()));
    }

    fn resync_done(&self) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.resync_done = true;
        info!(device = %self.device, peer = ?inner.peer, role = ?inner.resync_role, "resync finished");
    }

    fn stalled(&self, waited_ms: u64) {
        self.drop_stalled_peer(waited_ms);
    }

    fn renegotiate(&self) {
        let (peer, session) = {
            let inner = self.inner.lock().expect("link lock");
            (inner.peer.clone(), inner.session)
        };
        info!(device = %self.device, ?peer, "wrote alone during the handshake: setting the link up again");
        self.disconnect();
        let (Some(peer), true) = (peer, session != 0) else {
            return;
        };
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
    /// Drops a peer that acknowledged nothing for `waited_ms`: the device
    /// goes on alone and marks what it writes stale, as after a peer loss.
    fn drop_stalled_peer(&self, waited_ms: u64) {
        let peer = self.inner.lock().expect("link lock").peer.clone();
        warn!(
            device = %self.device,
            ?peer,
            "the peer acknowledged nothing for {:.1} s while writes waited: \
             dropping it and going on alone (written regions are marked stale \
             and resynchronised when the peer answers again)",
            waited_ms as f64 / 1000.0
        );
        self.disconnect();
        // Do not reconnect at once to a peer that is probably still stuck:
        // wait as after a refused handshake, serving alone meanwhile.
        self.inner.lock().expect("link lock").refused = Some((
            format!(
                "the peer acknowledged nothing for {:.1} s",
                waited_ms as f64 / 1000.0
            ),
            Instant::now(),
        ));
    }

    /// A link for `device` and its two tasks (sender and receiver) on `node`.
    pub(super) fn start(
        node: Arc<Node>,
        device: String,
        minor: u32,
        size_bytes: u64,
    ) -> Arc<DeviceLink> {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(DeviceLink {
            device,
            size_bytes,
            out: tx,
            inner: Mutex::new(LinkInner::default()),
            node: node.clone(),
            rt: tokio::runtime::Handle::current(),
        });
        let stream = device_stream(minor);
        tokio::spawn(send_loop(node.clone(), stream, rx));
        tokio::spawn(receive_loop(node, stream, link.clone()));
        link
    }

    /// Gives the link the running device.
    pub(super) fn attach(&self, port: Port) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.port = Some(port);
        inner.starting = false;
        inner.hot_acked_by = HotPeer::Nobody;
    }

    /// Ends the session, if any; returns the peer and session it had.
    pub(super) fn disconnect(&self) -> Option<(String, u64)> {
        let mut inner = self.inner.lock().expect("link lock");
        let had = inner
            .peer
            .clone()
            .filter(|_| inner.session != 0)
            .map(|p| (p, inner.session));
        if inner.session != 0 {
            if let Some(port) = &inner.port {
                port.link_event(LinkEvent::Lost);
            }
        }
        inner.session = 0;
        inner.connected = false;
        inner.connecting = false;
        inner.pending_role = None;
        inner.peer = None;
        inner.peer_id = None;
        had
    }

    /// Forgets the running device (it is stopping).
    pub(super) fn detach(&self) {
        self.disconnect();
        self.inner.lock().expect("link lock").port = None;
    }
}

async fn send_loop(
    node: Arc<Node>,
    stream: StreamId,
    mut rx: mpsc::UnboundedReceiver<(PeerId, Bytes)>,
) {
    while let Some((peer, body)) = rx.recv().await {
        // In order: flow control admits each message before the next, and
        // the driver takes them in that order. Small messages do not wait a
        // driver turn each (4 KiB writes stream back to back); large ones
        // do, which paces the driver's fragmenting (measured: bursts of
        // 1 MiB messages lost a quarter of their throughput).
        let result = if body.len() <= POST_BYTES_MAX {
            node.post(peer, stream, body).await
        } else {
            node.send(peer, stream, body).await
        };
        if let Err(e) = result {
            debug!(stream = stream.0, error = %e, "device message not sent");
        }
    }
}

async fn receive_loop(node: Arc<Node>, stream: StreamId, link: Arc<DeviceLink>) {
    let mut rx = match node.register_stream(stream) {
        Ok(rx) => rx,
        Err(e) => {
            warn!(device = %link.device, error = %e, "cannot receive device messages");
            return;
        }
    };
    while let Some(incoming) = rx.recv().await {
        let body = incoming.body;
        if body.len() < 8 {
            warn!(device = %link.device, "malformed device message (no session)");
            continue;
        }
        let session = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        let port = {
            let inner = link.inner.lock().expect("link lock");
            (inner.session == session && inner.peer_id == Some(incoming.peer))
                .then(|| inner.port.clone())
                .flatten()
        };
        let Some(port) = port else {
            continue;
        };
        match mirror::decode(&body.slice(8..), link.size_bytes) {
            Ok(message) => port.from_peer(session, message),
            Err(e) => warn!(device = %link.device, error = %e, "device message refused"),
        }
    }
}

fn wire_role(role: &ResyncRole) -> WireRole {
    match role {
        ResyncRole::None => WireRole::None,
        ResyncRole::Source(_) => WireRole::Source,
        ResyncRole::Target(_) => WireRole::Target,
    }
}

fn resync_role(role: WireRole, bits: Vec<u8>) -> ResyncRole {
    match role {
        WireRole::None => ResyncRole::None,
        WireRole::Source => ResyncRole::Source(bits),
        WireRole::Target => ResyncRole::Target(bits),
    }
}

/// Refuses two copies that are not of the same device: identity (when both
/// maps are known), size, minor number and mode must be equal.
pub(super) fn same_device(
    device: &str,
    local: &DeviceInfo,
    remote: &DeviceInfo,
    local_name: &str,
    remote_name: &str,
) -> Result<(), String> {
    let mut differs = Vec::new();
    if local.uuid.is_some() && remote.uuid.is_some() && local.uuid != remote.uuid {
        differs.push(format!(
            "identity {} vs {}",
            fmt_uuid(&local.uuid),
            fmt_uuid(&remote.uuid)
        ));
    }
    if local.size_bytes != remote.size_bytes {
        differs.push(format!(
            "size {} vs {}",
            local.size_bytes, remote.size_bytes
        ));
    }
    if local.minor != remote.minor {
        differs.push(format!("minor {} vs {}", local.minor, remote.minor));
    }
    if local.mode != remote.mode {
        differs.push(format!("mode {} vs {}", local.mode, remote.mode));
    }
    if !differs.is_empty() {
        return Err(format!(
            "{device}: {local_name} and {remote_name} do not hold the same device ({}); \
             make the configuration identical on both machines (gmdctl verify), and re-create \
             a wrong state map with 'gmdctl init-state {device} --force' followed by 'gmdctl dirty {device}' on the side to keep",
            differs.join(", ")
        ));
    }
    Ok(())
}

/// Which side sends (`Ok(true)`: the local one), or why they must not mirror.
pub(super) fn decide(
    device: &str,
    mode: Mode,
    local: &DeviceInfo,
    remote: &DeviceInfo,
    local_name: &str,
    remote_name: &str,
) -> Result<bool, String> {
    same_device(device, local, remote, local_name, remote_name)?;
    if local.uuid.is_none() || remote.uuid.is_none() {
        return Err(format!("{device}: the state map of one side is not open"));
    }
    if local.stale > 0 && remote.stale > 0 {
        return Err(format!(
            "{device}: both {local_name} and {remote_name} wrote while apart (data divergence); \
             inspect with 'gmdctl show-state {device}' on both, resolve with 'gmdctl unify {device} --master <machine>'"
        ));
    }
    if local.role == Role::Primary && remote.role == Role::Primary {
        return Err(format!(
            "{device}: both {local_name} and {remote_name} are primary"
        ));
    }
    // Returns whether the local side is the resync source.
    if mode == Mode::Async {
        let (primary_stale, secondary_stale, local_primary) = if local.role == Role::Primary {
            (local.stale, remote.stale, true)
        } else {
            (remote.stale, local.stale, false)
        };
        let _ = primary_stale;
        if secondary_stale > 0 {
            let secondary = if local_primary {
                remote_name
            } else {
                local_name
            };
            return Err(format!(
                "{device}: the async secondary {secondary} holds writes of its own; \
                 resolve with 'gmdctl unify {device} --master <machine>'"
            ));
        }
        return Ok(local_primary);
    }
    Ok(remote.stale == 0)
}

fn fmt_uuid(uuid: &Option<String>) -> &str {
    uuid.as_deref().unwrap_or("unknown")
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

    /// Starts mirroring `device` with `peer`, as initiator.
    pub(super) async fn connect(self: Arc<Self>, device: String, peer: String) {
        let Some(link) = self.link(&device) else {
            return;
        };
        {
            let mut inner = link.inner.lock().expect("link lock");
            if inner.connected || inner.connecting || inner.port.is_none() {
                return;
            }
            inner.connecting = true;
        }
        let result = self.clone().try_connect(&link, &device, &peer).await;
        let mut inner = link.inner.lock().expect("link lock");
        inner.connecting = false;
        if let Err(reason) = result {
            let repeated = inner.refused.as_ref().is_some_and(|(r, _)| *r == reason);
            if !repeated {
                warn!(%device, %peer, "not mirroring: {reason}");
            }
            inner.refused = Some((reason, Instant::now()));
        }
    }

    async fn try_connect(
        self: Arc<Self>,
        link: &Arc<DeviceLink>,
        device: &str,
        peer: &str,
    ) -> Result<(), String> {
        let d = self.clone();
        let name = device.to_owned();
        let who = peer.to_owned();
        let (info, bits) =
            tokio::task::spawn_blocking(move || d.local_info(&name, true, Some(&who)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.message)?;
        let request = PeerRequest::Connect {
            device: device.into(),
            from: self.machine.clone(),
            info,
            bits: encode_bits(&bits.unwrap_or_default()),
        };
        let (session, role, bits) = match self.ask(peer, &request, HANDSHAKE_TIMEOUT).await? {
            PeerReply::Accept {
                session,
                role,
                bits,
            } => (session, role, decode_bits(&bits)?),
            PeerReply::Refused { reason } => return Err(reason),
            other => return Err(format!("unexpected answer {other:?}")),
        };
        let peer_id = self.node.peer(peer);
        let regions: u32 = bits.iter().map(|b| b.count_ones()).sum();
        {
            let mut inner = link.inner.lock().expect("link lock");
            let Some(port) = inner.port.clone() else {
                return Err("the device stopped during the handshake".into());
            };
            if inner.session != 0 {
                port.link_event(LinkEvent::Lost);
            }
            inner.session = session;
            inner.peer = Some(peer.to_owned());
            inner.peer_id = peer_id;
            inner.resync_done = false;
            inner.resync_role = Some(role);
            inner.hot_acked_by.session_with(peer);
            port.link_event(LinkEvent::Connected {
                session,
                role: resync_role(role, bits),
            });
        }
        match self
            .ask(
                peer,
                &PeerRequest::Go {
                    device: device.into(),
                    session,
                },
                HANDSHAKE_TIMEOUT,
            )
            .await
        {
            Ok(PeerReply::Ok) => {}
            Ok(PeerReply::Refused { reason }) => {
                link.disconnect();
                return Err(reason);
            }
            Ok(other) => {
                link.disconnect();
                return Err(format!("unexpected answer {other:?}"));
            }
            Err(e) => {
                link.disconnect();
                return Err(e);
            }
        }
        {
            let mut inner = link.inner.lock().expect("link lock");
            inner.connected = true;
            inner.refused = None;
        }
        info!(%device, %peer, session, resync = ?role, regions, "mirroring");
        self.record_peer(device, peer, false).await;
        Ok(())
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
        match request {
            PeerRequest::Facts => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.facts()).await {
                    Ok(facts) => PeerReply::Facts { facts },
                    Err(e) => PeerReply::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            PeerRequest::Status { device } => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.local_info(&device, false, None)).await
                {
                    Ok(Ok((info, _))) => PeerReply::Status { info },
                    Ok(Err(e)) => PeerReply::Refused { reason: e.message },
                    Err(e) => PeerReply::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            PeerRequest::Connect {
                device,
                from: initiator,
                info,
                bits,
            } => self.on_connect(initiator, device, info, bits).await,
            PeerRequest::Go { device, session } => self.on_go(&from, &device, session).await,
            PeerRequest::Leave { device, session } => {
                if let Some(link) = self.link(&device) {
                    let current = {
                        let inner = link.inner.lock().expect("link lock");
                        inner.session == session && inner.peer.as_deref() == Some(from.as_str())
                    };
                    if current {
                        link.disconnect();
                        warn!(%device, peer = %from, "peer stopped its device: going on alone, writes are marked stale");
                        self.record_peer(&device, &from, true).await;
                    }
                }
                PeerReply::Ok
            }
            PeerRequest::Renegotiate { device, session } => {
                if let Some(link) = self.link(&device) {
                    let current = {
                        let inner = link.inner.lock().expect("link lock");
                        inner.session == session && inner.peer.as_deref() == Some(from.as_str())
                    };
                    if current {
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
                    Ok(Err(e)) => PeerReply::Refused { reason: e.message },
                    Err(e) => PeerReply::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            PeerRequest::GetMap { device } => {
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.local_info(&device, true, None)).await {
                    Ok(Ok((info, bits))) => PeerReply::Map {
                        info,
                        bits: encode_bits(&bits.unwrap_or_default()),
                    },
                    Ok(Err(e)) => PeerReply::Refused { reason: e.message },
                    Err(e) => PeerReply::Refused {
                        reason: e.to_string(),
                    },
                }
            }
            PeerRequest::Unify {
                device,
                master,
                bits,
            } => {
                let bits = match decode_bits(&bits) {
                    Ok(b) => b,
                    Err(reason) => return PeerReply::Refused { reason },
                };
                let d = self.clone();
                match tokio::task::spawn_blocking(move || d.unify_local(&device, master, &bits))
                    .await
                {
                    Ok(Ok(())) => PeerReply::Ok,
                    Ok(Err(e)) => PeerReply::Refused { reason: e.message },
                    Err(e) => PeerReply::Refused {
                        reason: e.to_string(),
                    },
                }
            }
        }
    }

    async fn on_connect(
        self: Arc<Self>,
        from: String,
        device: String,
        remote: DeviceInfo,
        bits: String,
    ) -> PeerReply {
        let refuse = |reason: String| PeerReply::Refused { reason };
        let Some(link) = self.link(&device) else {
            return refuse(format!("device {device} has no copy on {}", self.machine));
        };
        let remote_bits = match decode_bits(&bits) {
            Ok(b) => b,
            Err(e) => return refuse(e),
        };
        let d = self.clone();
        let name = device.clone();
        let who = from.clone();
        let (local, local_bits) = match tokio::task::spawn_blocking(move || {
            d.local_info(&name, true, Some(&who))
        })
        .await
        {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return refuse(e.message),
            Err(e) => return refuse(e.to_string()),
        };
        if local.state != PeerState::Available {
            return refuse(format!(
                "{device} is {:?} on {}, not AVAILABLE",
                local.state, self.machine
            ));
        }
        // One active remote peer: a second one joining takes over.
        let previous = {
            let inner = link.inner.lock().expect("link lock");
            if inner.connecting && inner.peer.is_none() && self.machine < from {
                return refuse(format!("{} is connecting to {from} itself", self.machine));
            }
            inner
                .peer
                .clone()
                .filter(|p| *p != from && inner.session != 0)
        };
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
        let local_source = match decide(&device, local.mode, &local, &remote, &self.machine, &from)
        {
            Ok(s) => s,
            Err(reason) => {
                warn!(%device, peer = %from, "connection refused: {reason}");
                return refuse(reason);
            }
        };
        let all = union(&local_bits.unwrap_or_default(), &remote_bits);
        let any = all.iter().any(|&b| b != 0);
        let (mine, theirs) = match (any, local_source) {
            (false, _) => (ResyncRole::None, WireRole::None),
            (true, true) => (ResyncRole::Source(all.clone()), WireRole::Target),
            (true, false) => (ResyncRole::Target(all.clone()), WireRole::Source),
        };
        let session = loop {
            let s: u64 = rand::random();
            if s != 0 {
                break s;
            }
        };
        {
            let mut inner = link.inner.lock().expect("link lock");
            if inner.session != 0 {
                // The initiator starts over (it restarted, or lost our earlier answer).
                if let Some(port) = &inner.port {
                    port.link_event(LinkEvent::Lost);
                }
            }
            inner.session = session;
            inner.peer = Some(from.clone());
            inner.peer_id = self.node.peer(&from);
            inner.connected = false;
            inner.resync_done = false;
            inner.resync_role = Some(wire_role(&mine));
            inner.pending_role = Some(mine);
        }
        PeerReply::Accept {
            session,
            role: theirs,
            bits: encode_bits(&all),
        }
    }

    async fn on_go(self: Arc<Self>, from: &str, device: &str, session: u64) -> PeerReply {
        let Some(link) = self.link(device) else {
            return PeerReply::Refused {
                reason: format!("no device {device}"),
            };
        };
        {
            let mut inner = link.inner.lock().expect("link lock");
            let ok = inner.session == session && inner.peer.as_deref() == Some(from);
            let (Some(role), Some(port), true) =
                (inner.pending_role.take(), inner.port.clone(), ok)
            else {
                return PeerReply::Refused {
                    reason: format!("{device}: no connection being set up with {from}"),
                };
            };
            port.link_event(LinkEvent::Connected { session, role });
            inner.hot_acked_by.session_with(from);
            inner.connected = true;
            inner.refused = None;
        }
        info!(%device, peer = %from, session, "mirroring");
        self.record_peer(device, from, false).await;
        PeerReply::Ok
    }

    /// GeoMessage declared `peer` down (or saw it restart): every device
    /// mirroring with it goes on alone and records it down.
    pub(super) async fn peer_lost(self: &Arc<Self>, peer: &str, why: &str) {
        for link in self.links() {
            let lost = {
                let inner = link.inner.lock().expect("link lock");
                inner.session != 0 && inner.peer.as_deref() == Some(peer)
            };
            if lost {
                link.disconnect();
                warn!(device = %link.device, %peer, "{why}: the device goes on alone and marks written regions stale");
                self.record_peer(&link.device, peer, true).await;
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
                    || inner.connected
                    || inner.connecting
                    || inner
                        .refused
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() < REFUSED_RETRY)
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

#[cfg(test)]
mod tests {
    use super::HotPeer;

    #[test]
    fn hot_cells_count_as_acknowledged_only_by_the_single_peer_since_start() {
        let mut hot = HotPeer::default();
        assert!(!hot.is_only("beta"), "no session yet");
        hot.session_with("beta");
        hot.session_with("beta");
        assert!(hot.is_only("beta"));
        assert!(!hot.is_only("gamma"));
        hot.session_with("gamma");
        assert_eq!(hot, HotPeer::Several);
        assert!(!hot.is_only("gamma") && !hot.is_only("beta"));
    }
}
