//! Site isolation in the daemon: when a link is lost involuntarily (the
//! peer's promote-failure timeout, or a peer that acknowledges nothing),
//! the device asks gmd-core's verdict ([`gmd_core::link::isolation`])
//! whether its primary may write alone. If not, the session ends with
//! [`LinkEvent::Isolated`] (writes wait in the engine), the fence handler
//! runs when one is configured, and the hold ends when the link returns,
//! when `gmdctl down` confirms the peer down, or when the handler reports
//! the peer fenced.
//!
//! Intentional ends (a peer that leaves, `gmdctl down`, a split, a stop, a
//! renegotiation, a restarted peer that comes back) never hold.

use std::process::Stdio;
use std::time::{Duration, Instant};

use gmd_core::config::FenceHandler;
use gmd_core::link::PairRole;
use gmd_core::link::isolation::{self, Fence, Hold, Policy, Verdict};
use gmd_core::mirror::LinkEvent;
use gmdctl::protocol::IsolationStatus;
use tracing::{info, warn};

use super::link::DeviceLink;

/// How the device behaves on isolation, from the configuration.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    /// This machine.
    pub(super) machine: String,
    /// Site, mode, whether a handler is configured.
    pub(super) policy: Policy,
    /// The fence handler, if any.
    pub(super) fence: Option<FenceHandler>,
}

/// A device whose writes are held: the peer was lost and it may not write
/// alone yet.
#[derive(Clone, Debug)]
pub(super) struct Frozen {
    /// The peer lost.
    peer: String,
    /// When.
    since: Instant,
    /// Where the fence handler is.
    fence: Fence,
    /// How the fence handler ended, for status.
    fence_detail: Option<String>,
    /// Tells this loss from a later one (a handler's late result for an
    /// earlier loss is ignored).
    loss: u64,
}

/// Bytes of a fence handler's output kept for the log.
const FENCE_OUTPUT_MAX: usize = 4096;

impl Frozen {
    /// The status shown by `gmdctl status` (`writes_held` from the engine).
    pub(super) fn status(&self, device: &str, policy: Policy, writes_held: u64) -> IsolationStatus {
        let hold = match isolation::verdict(policy, true, false, self.fence) {
            Verdict::Hold(h) => h,
            Verdict::RunFence => Hold::Fencing,
            Verdict::GoOn => Hold::NonDominant,
        };
        let peer = &self.peer;
        let waiting = match hold {
            Hold::Fencing => "the fence handler runs".to_string(),
            Hold::FenceFailed => format!(
                "the fence handler failed ({}); waiting for the link or 'gmdctl down {device} {peer}'",
                self.fence_detail.as_deref().unwrap_or("no detail")
            ),
            Hold::NonDominant => format!(
                "this site is not dominant; waiting for the link or 'gmdctl down {device} {peer}'"
            ),
        };
        IsolationStatus {
            frozen: true,
            peer: peer.clone(),
            hold: hold.name().to_owned(),
            since_s: self.since.elapsed().as_secs(),
            writes_held,
            fence: self.fence_detail.clone(),
            message: format!("writes frozen: peer {peer} lost, {waiting}"),
        }
    }
}

impl DeviceLink {
    /// Ends the session because the peer was lost (not by anyone's
    /// choice): as [`DeviceLink::disconnect`], but the device holds its
    /// writes when the isolation verdict says so, and the fence handler
    /// starts when it must. Returns the peer and session it had.
    pub(super) fn lose(&self, why: &str) -> Option<(String, u64)> {
        let (verdict, peer) = {
            let inner = self.inner.lock().expect("link lock");
            let Some((peer, _)) = inner.core.connected() else {
                return self.disconnect();
            };
            let primary = inner.core.role() == PairRole::Primary;
            let policy = self.isolation.policy;
            (
                isolation::verdict(policy, primary, false, Fence::NotRun),
                peer.to_owned(),
            )
        };
        if verdict == Verdict::GoOn {
            let had = self.disconnect();
            if had.is_some() {
                warn!(device = %self.device, %peer, "{why}: the device goes on alone and marks written regions stale");
            }
            return had;
        }
        let had = self.end(LinkEvent::Isolated)?;
        let loss = {
            let mut inner = self.inner.lock().expect("link lock");
            inner.losses += 1;
            let fence = if verdict == Verdict::RunFence {
                Fence::Running
            } else {
                Fence::NotRun
            };
            inner.frozen = Some(Frozen {
                peer: peer.clone(),
                since: Instant::now(),
                fence,
                fence_detail: None,
                loss: inner.losses,
            });
            inner.losses
        };
        let device = &self.device;
        match verdict {
            Verdict::RunFence => {
                warn!(%device, %peer, "{why}: writes are held while the fence handler runs");
                self.run_fence(peer, loss);
            }
            _ => warn!(
                %device, %peer,
                "{why}: this site is not dominant: writes are held (not failed) until the link \
                 returns or the peer is confirmed down ('gmdctl down {device} {peer}')"
            ),
        }
        self.poke();
        Some(had)
    }

    /// `gmdctl down` recorded `peer` down: a hold because of it ends, and
    /// a promotion until the link returns needs no fencing.
    pub(super) fn confirm_down(&self, peer: &str) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.confirmed_down = Some(peer.to_owned());
        if inner.frozen.as_ref().is_some_and(|f| f.peer == peer) {
            inner.frozen = None;
            if let Some(port) = &inner.port {
                port.release_isolation();
            }
            drop(inner);
            warn!(device = %self.device, %peer, "the peer is confirmed down: held writes go on alone (their regions are marked stale)");
            self.poke();
        }
    }

    /// The link is back (or the device stopped): a hold ends with it (the
    /// engine ends its own on connect).
    pub(super) fn thaw(inner: &mut super::link::LinkInner, device: &str) {
        inner.confirmed_down = None;
        if let Some(f) = inner.frozen.take() {
            info!(%device, peer = %f.peer, "the hold ends: held writes go on");
        }
    }

    /// Before this side is promoted while `peer` is apart (recorded down,
    /// not confirmed by `gmdctl down`): the fence handler runs, as DRBD
    /// runs `fence-peer` before promoting; blocks the calling thread.
    /// `Ok` with a line for the administrator when it ran and fenced the
    /// peer (or `None`: nothing to run); `Err` with the refusal otherwise.
    pub(super) fn fence_before_promotion(&self, peer: &str) -> Result<Option<String>, String> {
        let confirmed = self
            .inner
            .lock()
            .expect("link lock")
            .confirmed_down
            .as_deref()
            == Some(peer);
        let policy = self.isolation.policy;
        if isolation::verdict(policy, true, confirmed, Fence::NotRun) != Verdict::RunFence {
            return Ok(None);
        }
        let Some(handler) = self.isolation.fence.clone() else {
            return Ok(None);
        };
        let device = &self.device;
        let (code, detail) = self.rt.block_on(run_handler(
            &handler,
            "fence",
            device,
            peer,
            &self.isolation.machine,
            policy,
        ));
        if isolation::fence_outcome(code) == Fence::Fenced {
            self.inner.lock().expect("link lock").fenced = Some(peer.to_owned());
            warn!(%device, %peer, "fence handler before promotion: {detail}: the peer is fenced");
            Ok(Some(format!(
                "{device}: the fence handler fenced {peer} before the promotion ({detail})"
            )))
        } else {
            warn!(%device, %peer, "fence handler before promotion: {detail}: promotion refused");
            Err(format!(
                "{device}: promote refused: {peer} is apart and the fence handler did not fence it \
                 ({detail}); if {peer} is down, confirm it with 'gmdctl down {device} {peer}' and promote again"
            ))
        }
    }

    /// Status of the hold, if writes are held.
    pub(super) fn isolation_status(&self, writes_held: u64) -> Option<IsolationStatus> {
        let inner = self.inner.lock().expect("link lock");
        inner
            .frozen
            .as_ref()
            .map(|f| f.status(&self.device, self.isolation.policy, writes_held))
    }

    /// Runs the fence handler for the loss of `peer` (number `loss`) on the
    /// daemon's runtime, and applies its result.
    fn run_fence(&self, peer: String, loss: u64) {
        let Some(handler) = self.isolation.fence.clone() else {
            return;
        };
        let Some(link) = self.me.upgrade() else {
            return;
        };
        let device = self.device.clone();
        let machine = self.isolation.machine.clone();
        let policy = self.isolation.policy;
        self.rt.spawn(async move {
            let started = Instant::now();
            let (code, detail) =
                run_handler(&handler, "fence", &device, &peer, &machine, policy).await;
            let fence = isolation::fence_outcome(code);
            let mut inner = link.inner.lock().expect("link lock");
            if fence == Fence::Fenced {
                // Whatever it placed is lifted once the pair is in sync
                // again, even if the hold ended meanwhile.
                inner.fenced = Some(peer.clone());
            }
            let Some(frozen) = inner.frozen.as_mut().filter(|f| f.loss == loss) else {
                info!(%device, %peer, "{detail}: the hold it was run for had ended already");
                return;
            };
            frozen.fence = fence;
            frozen.fence_detail = Some(detail.clone());
            let took = started.elapsed().as_secs_f64();
            if isolation::verdict(policy, true, false, fence) == Verdict::GoOn {
                inner.frozen = None;
                if let Some(port) = &inner.port {
                    port.release_isolation();
                }
                warn!(%device, %peer, "fence handler: {detail} after {took:.1} s: the peer is fenced, held writes go on alone");
            } else {
                warn!(%device, %peer, "fence handler: {detail} after {took:.1} s: writes stay held until the link returns or 'gmdctl down {device} {peer}'");
            }
            drop(inner);
            link.poke();
        });
    }
}

impl DeviceLink {
    /// The pair is in sync again after this side fenced its peer: the
    /// handler runs with `unfence` to lift what it placed (its result is
    /// only logged). Nothing happens when this side fenced nothing.
    pub(super) fn unfence(&self) {
        let Some(peer) = self.inner.lock().expect("link lock").fenced.take() else {
            return;
        };
        let Some(handler) = self.isolation.fence.clone() else {
            return;
        };
        let device = self.device.clone();
        let machine = self.isolation.machine.clone();
        let policy = self.isolation.policy;
        self.rt.spawn(async move {
            let (code, detail) =
                run_handler(&handler, "unfence", &device, &peer, &machine, policy).await;
            if code == Some(0) {
                info!(%device, %peer, "fence handler (unfence): {detail}: the peer may be promoted again");
            } else {
                warn!(%device, %peer, "fence handler (unfence): {detail}: what it placed may still forbid promoting {peer}; lift it by hand");
            }
        });
    }
}

/// Runs `handler action` (`fence` or `unfence`) with the device and peer
/// in its environment; its exit code (`None`: killed, timed out, or not
/// started) and a description.
async fn run_handler(
    handler: &FenceHandler,
    action: &str,
    device: &str,
    peer: &str,
    machine: &str,
    policy: Policy,
) -> (Option<i32>, String) {
    let path = handler.path.display().to_string();
    let mut command = tokio::process::Command::new(&handler.path);
    command
        .arg(action)
        .env("GMD_FENCE_ACTION", action)
        .env("GMD_DEVICE", device)
        .env("GMD_PEER", peer)
        .env("GMD_MACHINE", machine)
        .env("GMD_MODE", policy.mode.to_string())
        .env("GMD_DOMINANT", if policy.dominant { "yes" } else { "no" })
        // DRBD's names, so that handlers written for it find theirs.
        .env("DRBD_RESOURCE", device)
        .env("DRBD_PEERS", peer)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    info!(%device, %peer, handler = %path, action, "running the fence handler");
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return (None, format!("{path} could not be run: {e}")),
    };
    let timeout = Duration::from_secs(handler.timeout_s);
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return (None, format!("{path} failed: {e}")),
        Err(_) => {
            return (
                None,
                format!("{path} did not finish in {} s (killed)", handler.timeout_s),
            );
        }
    };
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(FENCE_OUTPUT_MAX)]);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            info!(%device, %peer, "fence handler {stream}: {line}");
        }
    }
    let code = output.status.code();
    let detail = match code {
        Some(c) => format!("{path} exited {c}"),
        None => format!("{path} was killed by a signal"),
    };
    (code, detail)
}
