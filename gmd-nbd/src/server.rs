//! The NBD server: accept loop, handshake and transmission.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gmd_core::buf::BufPool;
use gmd_core::engine::{OpKind, Request};
use gmd_core::runtime::{CompletionSink, Submission};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proto::*;
use crate::replies::{Connection, Done, ReplySocket, write_replies};

/// A device as the NBD server sees it.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// Logical block size (minimum I/O size and alignment).
    fn block_size(&self) -> u32;
    /// Largest read or write accepted in one request.
    fn io_len_max(&self) -> u32;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Buffers for request data.
    fn buffers(&self) -> &BufPool;
    /// One permit per request the device can take; a request is submitted
    /// only with a permit, which the server returns when the request completes.
    fn admission(&self) -> &Semaphore;
    /// Hands a request to the device.
    ///
    /// # Errors
    /// The device is full; cannot happen for a request holding a permit.
    fn submit(&self, submission: Submission) -> Result<(), Submission>;
    /// Cancelled when the device is being stopped by force: connections
    /// finish what is in flight and close.
    fn fence(&self) -> &CancellationToken;
}

/// Keeps an export "in use" while a client is connected to it.
pub type Lease = Box<dyn Send + Sync>;

/// The exports a server offers.
pub trait Registry: Send + Sync + 'static {
    /// Names of the exports currently offered (AVAILABLE devices).
    fn list(&self) -> Vec<String>;
    /// The export called `name`, if offered, for describing it.
    fn describe(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Opens `name` for a client; the device counts as in use until the lease drops.
    fn open(&self, name: &str) -> Option<(Arc<dyn Export>, Lease)>;
}

/// Bounds on what one server and one connection may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub connections_max: usize,
    /// Requests in flight per connection.
    pub requests_per_connection_max: usize,
    /// Request data held per connection (a single larger request is still
    /// admitted, alone).
    pub bytes_per_connection_max: u64,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 64,
            requests_per_connection_max: 128,
            bytes_per_connection_max: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Longest option payload accepted during the handshake.
const OPTION_DATA_MAX: u32 = 64 << 10;
/// Largest write payload the server will read; a longer one is garbage.
const WRITE_PAYLOAD_MAX: u32 = 64 << 20;
/// Read-side buffer: several small requests arrive in one system call.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Unit of the per-connection byte budget.
pub(crate) const BUDGET_UNIT: u64 = 4096;

/// Where a server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener.
    Unix(UnixListener),
}

/// An NBD server over a [`Registry`].
pub struct Server {
    registry: Arc<dyn Registry>,
    limits: Limits,
    shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server offering `registry`'s exports; it stops when `shutdown` is cancelled.
    pub fn new(
        registry: Arc<dyn Registry>,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> Arc<Server> {
        Arc::new(Server {
            registry,
            limits,
            shutdown,
            connections: Arc::new(Semaphore::new(limits.connections_max)),
            next_id: AtomicU64::new(1),
        })
    }

    /// Accepts and serves clients until shutdown; every connection runs in its own task.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = accept(&listener) => a,
            };
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(conn = id, %peer, max = self.limits.connections_max, "nbd connection refused: too many connections");
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                debug!(conn = id, %peer, "nbd client connected");
                let result = match stream {
                    Stream::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        let (r, w) = s.into_split();
                        server
                            .connection(id, BufReader::with_capacity(READ_BUFFER_BYTES, r), w)
                            .await
                    }
                    Stream::Unix(s) => {
                        let (r, w) = s.into_split();
                        server
                            .connection(id, BufReader::with_capacity(READ_BUFFER_BYTES, r), w)
                            .await
                    }
                };
                match result {
                    Ok(()) => debug!(conn = id, %peer, "nbd client disconnected"),
                    Err(why) => warn!(conn = id, %peer, "nbd client disconnected: {why}"),
                }
                drop(permit);
            });
        }
    }

    async fn connection<R, W>(&self, id: u64, mut reader: R, mut writer: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + ReplySocket + Unpin,
    {
        let handshake = tokio::time::timeout(
            self.limits.handshake_timeout,
            self.handshake(&mut reader, &mut writer),
        );
        let opened = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(()),
            r = handshake => r.map_err(|_| "handshake timed out".to_string())??,
        };
        let Some((name, export, lease)) = opened else {
            return Ok(());
        };
        info!(conn = id, export = %name, "nbd transmission started");
        let result = self.transmission(export, reader, writer).await;
        drop(lease);
        result
    }

    /// Runs option haggling; returns the export to serve, or `None` when the
    /// client ended the handshake politely.
    async fn handshake<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<Option<(String, Arc<dyn Export>, Lease)>, String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        writer.write_all(&hello).await.map_err(io_text)?;
        writer.flush().await.map_err(io_text)?;
        let client_flags = reader.read_u32().await.map_err(io_text)?;
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err("client does not speak fixed newstyle NBD".into());
        }
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(format!("unknown client flags {client_flags:#x}"));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            let magic = reader.read_u64().await.map_err(io_text)?;
            if magic != IHAVEOPT {
                return Err(format!("garbage: bad option magic {magic:#x}"));
            }
            let option = reader.read_u32().await.map_err(io_text)?;
            let len = reader.read_u32().await.map_err(io_text)?;
            if len > OPTION_DATA_MAX {
                return Err(format!("garbage: option {option} carries {len} bytes"));
            }
            let mut data = vec![0u8; len as usize];
            reader.read_exact(&mut data).await.map_err(io_text)?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some((export, lease)) = self.registry.open(&name) else {
                        return Err(format!("unknown export {name:?} (NBD_OPT_EXPORT_NAME)"));
                    };
                    let mut reply = Vec::with_capacity(10 + 124);
                    reply.extend_from_slice(&export.size_bytes().to_be_bytes());
                    reply.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    writer.write_all(&reply).await.map_err(io_text)?;
                    writer.flush().await.map_err(io_text)?;
                    return Ok(Some((name, export, lease)));
                }
                OPT_ABORT => {
                    option_reply(writer, option, REP_ACK, &[]).await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        option_reply(
                            writer,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_LIST takes no data",
                        )
                        .await?;
                        continue;
                    }
                    for name in self.registry.list() {
                        let mut item = Vec::with_capacity(4 + name.len());
                        item.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        item.extend_from_slice(name.as_bytes());
                        option_reply(writer, option, REP_SERVER, &item).await?;
                    }
                    option_reply(writer, option, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, infos)) = parse_info_request(&data) else {
                        option_reply(
                            writer,
                            option,
                            REP_ERR_INVALID,
                            b"malformed NBD_OPT_INFO/GO data",
                        )
                        .await?;
                        continue;
                    };
                    let Some(export) = self.registry.describe(&name) else {
                        let msg = format!("no export named {name:?} is available");
                        option_reply(writer, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                        continue;
                    };
                    if option == OPT_GO && !infos.contains(&INFO_BLOCK_SIZE) {
                        option_reply(
                            writer,
                            option,
                            REP_ERR_BLOCK_SIZE_REQD,
                            b"this server needs clients that honour block size constraints",
                        )
                        .await?;
                        continue;
                    }
                    let lease = if option == OPT_GO {
                        match self.registry.open(&name) {
                            Some((_, lease)) => Some(lease),
                            None => {
                                let msg = format!("export {name:?} stopped");
                                option_reply(writer, option, REP_ERR_UNKNOWN, msg.as_bytes())
                                    .await?;
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&export.size_bytes().to_be_bytes());
                    info.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                    option_reply(writer, option, REP_INFO, &info).await?;
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&export.block_size().to_be_bytes());
                    sizes.extend_from_slice(&(export.block_size().max(64 << 10)).to_be_bytes());
                    sizes.extend_from_slice(&export.io_len_max().to_be_bytes());
                    option_reply(writer, option, REP_INFO, &sizes).await?;
                    option_reply(writer, option, REP_ACK, &[]).await?;
                    if let Some(lease) = lease {
                        return Ok(Some((name, export, lease)));
                    }
                }
                other => {
                    option_reply(writer, other, REP_ERR_UNSUP, b"option not supported").await?;
                }
            }
        }
    }

    async fn transmission<R, W>(
        &self,
        export: Arc<dyn Export>,
        mut reader: R,
        writer: W,
    ) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: ReplySocket,
    {
        let limits = self.limits;
        let budget_units = (limits.bytes_per_connection_max / BUDGET_UNIT).max(1);
        let conn = Arc::new(Connection::new(
            export.clone(),
            Arc::new(writer),
            limits.requests_per_connection_max,
            budget_units,
        ));
        let sink: Arc<dyn CompletionSink> = conn.clone();
        let read_side = async {
            let result = self
                .read_requests(&export, &conn, &sink, &mut reader, budget_units)
                .await;
            conn.reader_done();
            result
        };
        let (read_result, write_result) = tokio::join!(read_side, write_replies(&conn));
        read_result.and(write_result)
    }

    async fn read_requests<R: AsyncRead + Unpin, S: ReplySocket>(
        &self,
        export: &Arc<dyn Export>,
        conn: &Arc<Connection<S>>,
        sink: &Arc<dyn CompletionSink>,
        reader: &mut R,
        budget_units: u64,
    ) -> Result<(), String> {
        let mut header = [0u8; RequestHeader::LEN];
        loop {
            let read = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = export.fence().cancelled() => {
                    return Err("the device is being stopped by force; disconnecting".into());
                }
                r = reader.read_exact(&mut header) => r,
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Many clients just close; at a request boundary that is no fault.
                    debug!("client closed the connection without NBD_CMD_DISC");
                    return Ok(());
                }
                Err(e) => return Err(io_text(e)),
            }
            let Some(h) = RequestHeader::decode(&header) else {
                return Err("garbage: bad request magic".into());
            };
            let kind = match h.kind {
                CMD_DISC => return Ok(()),
                CMD_READ => OpKind::Read,
                CMD_WRITE => OpKind::Write,
                CMD_FLUSH => OpKind::Flush,
                CMD_TRIM => OpKind::Trim,
                CMD_WRITE_ZEROES => OpKind::WriteZeroes,
                _ => {
                    // Unknown commands carry no payload: refuse and go on.
                    take_permit(&conn.requests).await;
                    conn.started();
                    conn.push(Done::immediate(h.cookie, OpKind::Flush, 0, EINVAL));
                    continue;
                }
            };
            if kind == OpKind::Write && h.length > WRITE_PAYLOAD_MAX {
                return Err(format!("garbage: write of {} bytes", h.length));
            }
            let len = u64::from(h.length);
            if matches!(kind, OpKind::Read | OpKind::Write) && h.length > export.io_len_max() {
                // Too large to buffer: refuse without allocating (skipping a write's payload).
                if kind == OpKind::Write {
                    let mut payload = (&mut *reader).take(len);
                    tokio::io::copy(&mut payload, &mut tokio::io::sink())
                        .await
                        .map_err(io_text)?;
                }
                take_permit(&conn.requests).await;
                conn.started();
                conn.push(Done::immediate(h.cookie, kind, 0, EOVERFLOW));
                continue;
            }
            let units = if matches!(kind, OpKind::Read | OpKind::Write) {
                len.div_ceil(BUDGET_UNIT).clamp(1, budget_units)
            } else {
                0
            };
            take_permit(&conn.requests).await;
            if units > 0 {
                conn.bytes
                    .acquire_many(units as u32)
                    .await
                    .expect("semaphore never closed")
                    .forget();
            }
            conn.started();
            let mut buf = None;
            if matches!(kind, OpKind::Read | OpKind::Write) {
                let mut b = export.buffers().take(h.length as usize);
                if kind == OpKind::Write {
                    if let Err(e) = reader.read_exact(&mut b).await {
                        conn.push(Done::immediate(h.cookie, kind, units, EIO));
                        return Err(io_text(e));
                    }
                }
                buf = Some(b);
            }
            if len == 0 && kind != OpKind::Flush {
                conn.push(Done::immediate(h.cookie, kind, units, 0));
                continue;
            }
            take_permit(export.admission()).await;
            let submission = Submission {
                request: Request {
                    kind,
                    offset_bytes: h.offset,
                    len_bytes: len,
                    fua: h.flags & CMD_FLAG_FUA != 0,
                },
                buf,
                tag: h.cookie,
                sink: sink.clone(),
            };
            if let Err(s) = export.submit(submission) {
                export.admission().add_permits(1);
                conn.push(Done::immediate(s.tag, kind, units, ESHUTDOWN));
            }
        }
    }
}

async fn take_permit(semaphore: &Semaphore) {
    semaphore
        .acquire()
        .await
        .expect("semaphore never closed")
        .forget();
}

fn io_text(e: std::io::Error) -> String {
    e.to_string()
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4 + name_len)?)
        .ok()?
        .to_owned();
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let items = rest.get(2..)?;
    if items.len() != count * 2 {
        return None;
    }
    let infos = items
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

async fn option_reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), String> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    writer.write_all(&out).await.map_err(io_text)?;
    writer.flush().await.map_err(io_text)
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            Ok((Stream::Tcp(s), addr.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix".to_string()))
        }
    }
}
