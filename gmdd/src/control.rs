//! The control socket: root-only, one JSON request per line, one response per line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Daemon;
use gmdctl::protocol::{Command, ControlError, PROTOCOL_VERSION, Request, Response};

/// Longest request line accepted.
const REQUEST_LINE_MAX: usize = 1 << 20;

/// Binds the control socket with mode 0600, refusing if another gmdd answers on it.
///
/// # Errors
/// Another daemon listens there, or the socket cannot be created.
pub(super) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create the directory of the control socket {}",
                    dir.display()
                )
            })?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    if path.exists() {
        ensure_no_daemon(path)?;
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Fails when a daemon already answers on `path`.
///
/// # Errors
/// Another gmdd is running there.
pub(super) fn ensure_no_daemon(path: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another gmdd is already running on {} (stop it, or give this one --socket)",
            path.display()
        );
    }
    Ok(())
}

/// Serves control clients until shutdown.
pub(super) async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: CancellationToken,
) {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    continue;
                }
            },
        };
        let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        if uid != 0 && uid != own_uid {
            warn!(
                uid,
                "control connection refused: only root may control gmdd"
            );
            continue;
        }
        let daemon = daemon.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = session(daemon, stream, shutdown).await {
                debug!("control session ended: {e}");
            }
        });
    }
}

async fn session(
    daemon: Arc<Daemon>,
    stream: UnixStream,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(REQUEST_LINE_MAX as u64 + 1);
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = limited.read_line(&mut line) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > REQUEST_LINE_MAX {
            let response = error_response(ControlError::invalid("request too long"));
            writer.write_all(response.as_bytes()).await?;
            return Ok(());
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => error_response(ControlError::invalid(format!("malformed request: {e}"))),
            Ok(request) if request.version != PROTOCOL_VERSION => {
                error_response(ControlError::invalid(format!(
                    "protocol version {} is not supported by this gmdd (version {PROTOCOL_VERSION}); use a matching gmdctl",
                    request.version
                )))
            }
            Ok(Request {
                command: Command::Events,
                ..
            }) => {
                return stream_events(&daemon, reader, writer, shutdown).await;
            }
            Ok(request) => {
                let d = daemon.clone();
                // A command may have changed a device: its events go out
                // before the answer, so none is merged into the next one's.
                let result = tokio::task::spawn_blocking(move || {
                    let result = d.handle(request.command);
                    d.look();
                    result
                })
                .await
                .unwrap_or_else(|e| Err(ControlError::internal(format!("command failed: {e}"))));
                let response = match result {
                    Ok(value) => Response {
                        version: PROTOCOL_VERSION,
                        result: Some(value),
                        error: None,
                    },
                    Err(error) => Response {
                        version: PROTOCOL_VERSION,
                        result: None,
                        error: Some(error),
                    },
                };
                encode(&response)
            }
        };
        writer.write_all(response.as_bytes()).await?;
    }
}

/// Streams events to the client until it closes the connection or gmdd stops.
async fn stream_events(
    daemon: &Arc<Daemon>,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let d = daemon.clone();
    let (exists, mut rx) = tokio::task::spawn_blocking(move || d.subscribe())
        .await
        .map_err(std::io::Error::other)?;
    writer
        .write_all(
            encode(&Response {
                version: PROTOCOL_VERSION,
                result: Some(serde_json::json!({ "streaming": true })),
                error: None,
            })
            .as_bytes(),
        )
        .await?;
    let line = |e: &gmdctl::protocol::Event| {
        let mut text = serde_json::to_string(e).unwrap_or_default();
        text.push('\n');
        text
    };
    for e in &exists {
        writer.write_all(line(e).as_bytes()).await?;
    }
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = reader.read(&mut sink) => {
                if n? == 0 {
                    return Ok(());
                }
            }
            event = rx.recv() => match event {
                Ok(e) => writer.write_all(line(&e).as_bytes()).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "an events client is too slow; it missed some events");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

fn error_response(error: ControlError) -> String {
    encode(&Response {
        version: PROTOCOL_VERSION,
        result: None,
        error: Some(error),
    })
}

fn encode(response: &Response) -> String {
    let mut text = serde_json::to_string(response).unwrap_or_else(|e| {
        format!(r#"{{"version":{PROTOCOL_VERSION},"error":{{"kind":"internal","message":"cannot encode response: {e}"}}}}"#)
    });
    text.push('\n');
    text
}
