//! Operations: the event stream (`gmdctl events`) and the Prometheus
//! endpoint.
//!
//! Device-level changes (state, connection, HWM fallback, resync, refusals,
//! writes held on isolation)
//! are found by comparing a small snapshot of each device as soon as the
//! daemon is told something changed (`Daemon::watch`); peer and path
//! changes come straight from GeoMessage's events (see `watch_peers`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmd_core::statemap::AdminState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Daemon;
use gmdctl::protocol::Event;

/// Longest time between two comparisons of device snapshots (changes the
/// daemon is not told about, e.g. an async backlog draining by itself).
pub(super) const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest time between two comparisons: a burst of changes is one look.
pub(super) const WATCH_GAP: Duration = Duration::from_millis(10);
/// Shortest time between two comparisons made for messages alone: a write
/// stream moves backlogs and resync progress all the time, and a look per
/// message burst (up to 100 a second) took a CPU's share from the data
/// path on slow machines.
pub(super) const TRAFFIC_GAP: Duration = Duration::from_millis(100);

/// What tells the event watcher ([`watch_devices`]) to compare device
/// snapshots.
#[derive(Default)]
pub(super) struct Watch {
    /// Something about a device may have changed (a command, the link
    /// coming up or going, a refusal, a resync ending): look within
    /// [`WATCH_GAP`].
    pub(super) changed: tokio::sync::Notify,
    /// A message went to or came from a peer (backlogs, the HWM fallback,
    /// resync progress move with them): look within [`TRAFFIC_GAP`].
    pub(super) traffic: tokio::sync::Notify,
}
/// Least time between two resync progress events of one device.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Events kept for a slow subscriber before it misses some.
pub(super) const EVENTS_QUEUE_MAX: usize = 1024;
/// Longest HTTP request head the metrics endpoint reads.
const HTTP_HEAD_MAX: usize = 8192;

/// What the watcher compares, per device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Seen {
    state: AdminState,
    peer: Option<String>,
    mode: String,
    fallback: bool,
    backlog_bytes: u64,
    /// (role, total, left) of the current resync.
    resync: Option<(String, u64, u64)>,
    /// Resyncs started since the device started (to see short ones that
    /// began and ended between two snapshots).
    resyncs: u64,
    /// (role, total) of the latest resync, running or finished.
    last_resync: (String, u64),
    refused: Option<String>,
    /// (peer, hold) while writes are held after the peer was lost.
    frozen: Option<(String, String)>,
}

impl Seen {
    /// Lifecycle state.
    pub(super) fn state(&self) -> AdminState {
        self.state
    }

    /// Whether writes are mirrored to a peer now.
    pub(super) fn mirroring(&self) -> bool {
        self.peer.is_some()
    }

    /// Whether a resync runs.
    pub(super) fn resyncing(&self) -> bool {
        self.resync.is_some()
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

impl Daemon {
    /// Publishes an event to every `gmdctl events` client.
    pub(super) fn publish(&self, event: Event) {
        debug!(event = %event.to_text(), "event");
        let _ = self.events.send(event);
    }

    /// The snapshot of every device (blocking).
    pub(super) fn seen(&self) -> Vec<(String, Seen)> {
        let devices = self.devices.lock().expect("devices lock");
        devices
            .iter()
            .map(|(name, handle)| {
                let link = self.link_status(name, handle);
                let engine = handle
                    .runtime()
                    .map(|r| r.stats().snapshot().engine)
                    .unwrap_or_default();
                let connected = link.as_ref().is_some_and(|l| l.connected);
                let seen = Seen {
                    state: handle.state(),
                    peer: link
                        .as_ref()
                        .filter(|l| l.connected)
                        .and_then(|l| l.peer.clone()),
                    mode: if connected {
                        if engine.hwm_fallback_active == 1 {
                            "async-hwm-fallback".into()
                        } else {
                            handle.config().mode.to_string()
                        }
                    } else {
                        "standalone".into()
                    },
                    fallback: engine.hwm_fallback_active == 1,
                    backlog_bytes: engine.backlog_bytes,
                    resync: link.as_ref().filter(|l| l.resync_remaining > 0).map(|l| {
                        (
                            l.resync_role.clone().unwrap_or_default(),
                            l.resync_total,
                            l.resync_remaining,
                        )
                    }),
                    resyncs: engine.resyncs,
                    last_resync: link
                        .as_ref()
                        .map(|l| (l.resync_role.clone().unwrap_or_default(), l.resync_total))
                        .unwrap_or_default(),
                    refused: link
                        .as_ref()
                        .filter(|l| !l.connected)
                        .and_then(|l| l.refused.clone()),
                    frozen: link
                        .as_ref()
                        .and_then(|l| l.isolation.as_ref())
                        .map(|i| (i.peer.clone(), i.hold.clone())),
                };
                (name.clone(), seen)
            })
            .collect()
    }

    /// The `exists` events describing the current state, ended by `-`.
    pub(super) fn exists_events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for (name, s) in self.seen() {
            out.push(Event::now(
                "exists",
                "device",
                &name,
                &[("state", s.state.to_string())],
            ));
            if s.state == AdminState::Available {
                out.push(connection_event("exists", &name, &s));
            }
            if s.frozen.is_some() {
                out.push(isolation_event("exists", &name, &s));
            }
            if let Some((role, total, left)) = &s.resync {
                out.push(Event::now(
                    "exists",
                    "resync",
                    &name,
                    &[
                        ("phase", "progress".into()),
                        ("role", role.clone()),
                        ("regions_total", total.to_string()),
                        ("regions_left", left.to_string()),
                    ],
                ));
            }
        }
        let reachable = self.reachable.lock().expect("reachable lock").clone();
        let config = self.config();
        for machine in config.machines.keys().filter(|m| **m != self.machine) {
            out.push(Event::now(
                "exists",
                "peer",
                machine,
                &[("up", yes(reachable.contains(machine)))],
            ));
        }
        out.push(Event::now("exists", "-", "", &[]));
        out
    }
}

fn connection_event(change: &str, name: &str, s: &Seen) -> Event {
    Event::now(
        change,
        "connection",
        name,
        &[
            ("peer", s.peer.clone().unwrap_or_else(|| "-".into())),
            ("connected", yes(s.peer.is_some())),
            ("mode", s.mode.clone()),
        ],
    )
}

/// Whether writes are held after the peer was lost, and why.
fn isolation_event(change: &str, name: &str, s: &Seen) -> Event {
    let (peer, hold) = s.frozen.clone().unwrap_or_else(|| ("-".into(), "-".into()));
    Event::now(
        change,
        "isolation",
        name,
        &[
            ("frozen", yes(s.frozen.is_some())),
            ("peer", peer),
            ("hold", hold),
        ],
    )
}

/// The events that lead from `old` to `new` for device `name`.
fn changes(name: &str, old: &Seen, new: &Seen, last_progress: &mut Instant) -> Vec<Event> {
    let mut out = Vec::new();
    if old.state != new.state {
        out.push(Event::now(
            "change",
            "device",
            name,
            &[("state", new.state.to_string())],
        ));
    }
    if old.peer != new.peer || (new.peer.is_some() && old.mode != new.mode && !new.fallback) {
        out.push(connection_event("change", name, new));
    }
    if old.fallback != new.fallback {
        out.push(Event::now(
            "change",
            "hwm",
            name,
            &[
                (
                    "fallback",
                    if new.fallback { "entered" } else { "left" }.into(),
                ),
                ("backlog_bytes", new.backlog_bytes.to_string()),
            ],
        ));
    }
    let resync_event = |phase: &str, role: &str, total: u64, left: u64| {
        Event::now(
            "change",
            "resync",
            name,
            &[
                ("phase", phase.into()),
                ("role", role.into()),
                ("regions_total", total.to_string()),
                ("regions_left", left.to_string()),
            ],
        )
    };
    // Resyncs that started since the last snapshot, the current one included.
    let started = new.resyncs.saturating_sub(old.resyncs);
    if let Some((role, total, _)) = &old.resync {
        if new.resync.is_none() || started > 0 {
            out.push(resync_event("end", role, *total, 0));
        }
    }
    if started > u64::from(new.resync.is_some()) {
        // One began and finished between two snapshots.
        let (role, total) = &new.last_resync;
        out.push(resync_event("start", role, *total, *total));
        out.push(resync_event("end", role, *total, 0));
    }
    match (&old.resync, &new.resync) {
        (old_resync, Some((role, total, left))) if old_resync.is_none() || started > 0 => {
            *last_progress = Instant::now();
            out.push(resync_event("start", role, *total, *left));
        }
        (Some(_), Some((role, total, left)))
            if old.resync != new.resync && last_progress.elapsed() >= PROGRESS_INTERVAL =>
        {
            *last_progress = Instant::now();
            out.push(resync_event("progress", role, *total, *left));
        }
        _ => {}
    }
    if old.frozen != new.frozen {
        out.push(isolation_event("change", name, new));
    }
    if old.refused != new.refused {
        if let Some(reason) = &new.refused {
            let divergence =
                reason.contains("divergence") || reason.contains("holds writes of its own");
            out.push(Event::now(
                "change",
                if divergence { "divergence" } else { "refused" },
                name,
                &[("reason", reason.clone())],
            ));
        }
    }
    out
}

/// What the watcher saw last: the snapshot of each device and when it last
/// published resync progress.
#[derive(Default)]
pub(super) struct Watched {
    last: HashMap<String, Seen>,
    progress: HashMap<String, Instant>,
}

impl Daemon {
    /// Compares every device with what was seen last and publishes the
    /// differences (blocking). A command looks as soon as it is done, so
    /// each state a command leaves is published even when the next command
    /// follows within milliseconds.
    pub(super) fn look(&self) {
        let mut watched = self.watched.lock().expect("watched lock");
        let Watched { last, progress } = &mut *watched;
        for (name, seen) in self.seen() {
            // The first look (at start, before the control socket opens)
            // is the baseline that `exists` events describe.
            if let Some(old) = last.get(&name) {
                let p = progress.entry(name.clone()).or_insert_with(Instant::now);
                for event in changes(&name, old, &seen, p) {
                    self.publish(event);
                }
            }
            last.insert(name, seen);
        }
    }
}

/// Compares device snapshots whenever something tells the daemon that a
/// device may have changed ([`Watch`]: the link, a message to or from the
/// peer), at most every [`WATCH_GAP`] (every [`TRAFFIC_GAP`] for messages
/// alone) and at least every [`WATCH_INTERVAL`], and publishes the
/// differences. Commands look themselves, at once ([`Daemon::look`]).
pub(super) async fn watch_devices(daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let watch = daemon.watch.clone();
    watch_loop(&watch, &shutdown, || {
        let d = daemon.clone();
        async move {
            let _ = tokio::task::spawn_blocking(move || d.look()).await;
        }
    })
    .await;
}

/// The timing of [`watch_devices`]: calls `look` at once, then after every
/// change it is told of, until `shutdown`.
async fn watch_loop<F, Fut>(watch: &Watch, shutdown: &CancellationToken, mut look: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        look().await;
        let traffic = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = watch.changed.notified() => false,
            _ = watch.traffic.notified() => true,
            _ = tokio::time::sleep(WATCH_INTERVAL) => false,
        };
        if traffic {
            // Messages alone: one look per TRAFFIC_GAP (messages meanwhile
            // leave one permit, so the last of a stream is looked at too),
            // sooner if something else changes.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = watch.changed.notified() => {}
                _ = tokio::time::sleep(TRAFFIC_GAP) => {}
            }
        }
        // Let a burst of changes settle into one look.
        tokio::time::sleep(WATCH_GAP).await;
    }
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until
/// `stop` is cancelled.
pub(super) async fn serve_metrics(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let (mut stream, from) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HTTP_HEAD_MAX {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, content_type, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else if path == "/metrics" || path.starts_with("/metrics?") {
                let d = daemon.clone();
                match tokio::task::spawn_blocking(move || d.metrics_text()).await {
                    Ok(Ok(text)) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                    Ok(Err(e)) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                    Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                }
            } else {
                ("404 Not Found", "text/plain", "see /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                debug!(%from, error = %e, "metrics client went away");
            }
            let _ = stream.shutdown().await;
        });
    }
}

impl Daemon {
    /// Every figure in Prometheus text format (blocking).
    fn metrics_text(&self) -> Result<String, gmdctl::protocol::ControlError> {
        let report = self.report(&[])?;
        let net = self
            .rt
            .block_on(self.node.stats())
            .map_err(|e| gmdctl::protocol::ControlError::internal(e.to_string()))?;
        let net = crate::net_report(&self.config(), &self.machine, &net);
        Ok(gmdctl::metrics::render(&report, &net))
    }

    /// Starts, moves or stops the metrics endpoint to match `addr`.
    pub(super) async fn set_metrics(self: &Arc<Self>, addr: Option<SocketAddr>) {
        let mut current = self.metrics.lock().await;
        if current.as_ref().map(|(a, _)| *a) == addr {
            return;
        }
        if let Some((old, stop)) = current.take() {
            stop.cancel();
            info!(%old, "metrics endpoint closed");
        }
        let Some(addr) = addr else { return };
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let stop = CancellationToken::new();
                tokio::spawn(serve_metrics(self.clone(), listener, stop.clone()));
                info!(%addr, "metrics endpoint listening (GET /metrics)");
                *current = Some((addr, stop));
            }
            Err(e) => warn!(%addr, error = %e, "cannot serve metrics"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`watch_loop`] on a paused clock while `drive` pokes it; returns
    /// the (virtual) times of its looks, from the start.
    async fn looks_while<D, DF>(drive: D) -> Vec<Duration>
    where
        D: FnOnce(Arc<Watch>) -> DF,
        DF: std::future::Future<Output = ()>,
    {
        let watch = Arc::new(Watch::default());
        let shutdown = CancellationToken::new();
        let looks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let start = tokio::time::Instant::now();
        let task = {
            let (watch, shutdown, looks) = (watch.clone(), shutdown.clone(), looks.clone());
            tokio::spawn(async move {
                watch_loop(&watch, &shutdown, || {
                    looks.lock().unwrap().push(start.elapsed());
                    std::future::ready(())
                })
                .await;
            })
        };
        drive(watch).await;
        shutdown.cancel();
        task.await.unwrap();
        looks.lock().unwrap().clone()
    }

    /// A write stream (a message every millisecond for a second) is looked
    /// at about every TRAFFIC_GAP, not every WATCH_GAP, and its end is seen.
    #[tokio::test(start_paused = true)]
    async fn messages_alone_are_looked_at_every_traffic_gap() {
        let looks = looks_while(|watch| async move {
            for _ in 0..1000 {
                watch.traffic.notify_one();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await;
        let during = looks
            .iter()
            .filter(|t| **t > Duration::ZERO && **t <= Duration::from_secs(1))
            .count();
        let gap = (TRAFFIC_GAP + WATCH_GAP).as_millis() as usize;
        assert!(
            (1000 / gap - 1..=1000 / gap + 1).contains(&during),
            "{during} looks in a second of messages: {looks:?}"
        );
        // The last message (at 999 ms) is looked at within one gap.
        assert!(
            looks.iter().any(|t| *t > Duration::from_millis(999)
                && *t <= Duration::from_millis(999) + TRAFFIC_GAP + 2 * WATCH_GAP),
            "{looks:?}"
        );
    }

    /// A change (a command, the link) during a write stream is looked at
    /// within WATCH_GAP, not held back by the stream's TRAFFIC_GAP.
    #[tokio::test(start_paused = true)]
    async fn a_change_is_looked_at_at_once_even_in_a_message_stream() {
        let looks = looks_while(|watch| async move {
            for i in 0..200 {
                watch.traffic.notify_one();
                if i == 150 {
                    watch.changed.notify_one();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(
            looks.iter().any(|t| *t >= Duration::from_millis(150)
                && *t <= Duration::from_millis(150) + 2 * WATCH_GAP),
            "{looks:?}"
        );
    }

    fn seen() -> Seen {
        Seen {
            state: AdminState::Available,
            peer: None,
            mode: "standalone".into(),
            fallback: false,
            backlog_bytes: 0,
            resync: None,
            resyncs: 0,
            last_resync: Default::default(),
            refused: None,
            frozen: None,
        }
    }

    #[test]
    fn a_hold_is_published_when_it_starts_changes_and_ends() {
        let mut p = Instant::now();
        let a = seen();
        let mut b = a.clone();
        b.frozen = Some(("beta".into(), "fencing".into()));
        let mut c = b.clone();
        c.frozen = Some(("beta".into(), "fence-failed".into()));
        let text = |x: &Seen, y: &Seen, p: &mut Instant| -> Vec<String> {
            changes("d", x, y, p).iter().map(Event::to_text).collect()
        };
        assert_eq!(
            text(&a, &b, &mut p),
            ["change isolation name:d frozen:yes peer:beta hold:fencing"]
        );
        assert_eq!(
            text(&b, &c, &mut p),
            ["change isolation name:d frozen:yes peer:beta hold:fence-failed"]
        );
        assert_eq!(
            text(&c, &a, &mut p),
            ["change isolation name:d frozen:no peer:- hold:-"]
        );
    }

    #[test]
    fn a_resync_shorter_than_the_watch_interval_still_shows() {
        let mut p = Instant::now();
        let a = seen();
        // Started and finished between two snapshots.
        let mut b = a.clone();
        b.resyncs = 1;
        b.last_resync = ("source".into(), 128);
        let text: Vec<String> = changes("d", &a, &b, &mut p)
            .iter()
            .map(Event::to_text)
            .collect();
        assert_eq!(
            text,
            [
                "change resync name:d phase:start role:source regions_total:128 regions_left:128",
                "change resync name:d phase:end role:source regions_total:128 regions_left:0",
            ]
        );
        // One running is replaced by a new one (the link came back).
        let mut c = b.clone();
        c.resync = Some(("source".into(), 20, 15));
        c.resyncs = 2;
        c.last_resync = ("source".into(), 20);
        let mut d = c.clone();
        d.resync = Some(("target".into(), 30, 30));
        d.resyncs = 3;
        d.last_resync = ("target".into(), 30);
        let text: Vec<String> = changes("d", &c, &d, &mut p)
            .iter()
            .map(Event::to_text)
            .collect();
        assert_eq!(
            text,
            [
                "change resync name:d phase:end role:source regions_total:20 regions_left:0",
                "change resync name:d phase:start role:target regions_total:30 regions_left:30",
            ]
        );
    }

    #[test]
    fn changes_name_what_changed() {
        let mut p = Instant::now();
        let a = seen();
        assert!(changes("d", &a, &a, &mut p).is_empty());
        let mut b = a.clone();
        b.peer = Some("beta".into());
        b.mode = "async".into();
        b.resync = Some(("source".into(), 10, 10));
        b.resyncs = 1;
        b.last_resync = ("source".into(), 10);
        let e = changes("d", &a, &b, &mut p);
        let text: Vec<String> = e.iter().map(Event::to_text).collect();
        assert_eq!(
            text,
            [
                "change connection name:d peer:beta connected:yes mode:async",
                "change resync name:d phase:start role:source regions_total:10 regions_left:10",
            ]
        );
        let mut c = b.clone();
        c.fallback = true;
        c.mode = "async-hwm-fallback".into();
        c.resync = None;
        let text: Vec<String> = changes("d", &b, &c, &mut p)
            .iter()
            .map(Event::to_text)
            .collect();
        assert_eq!(
            text,
            [
                "change hwm name:d fallback:entered backlog_bytes:0",
                "change resync name:d phase:end role:source regions_total:10 regions_left:0",
            ]
        );
        let mut d = a.clone();
        d.refused = Some("d: both wrote while apart (data divergence)".into());
        let e = changes("d", &a, &d, &mut p);
        assert_eq!(e[0].object, "divergence");
        assert!(
            e[0].to_text()
                .starts_with("change divergence name:d reason:\"")
        );
    }
}
