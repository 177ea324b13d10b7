//! The one error type at the boundary of this crate.

use std::time::Duration;

/// Everything that can go wrong when configuring or using GeoMessage.
///
/// Variants say whether retrying can help: `PeerDown`, `PeerRestarted` and
/// `WouldBlock` are conditions of the moment; the configuration and size errors
/// are not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The configuration is inconsistent; the message names the field.
    #[error("invalid GeoMessage configuration: {0}")]
    Config(String),
    /// No machine of that name is configured.
    #[error("unknown machine {0:?}")]
    UnknownPeer(String),
    /// The peer index is not a configured remote machine.
    #[error("peer index {0} is not a remote machine of this cluster")]
    BadPeer(u16),
    /// The stream id is outside `0..streams_max` or reserved.
    #[error("stream {stream} is not usable (streams_max = {streams_max})")]
    BadStream {
        /// The stream asked for.
        stream: u16,
        /// The configured bound.
        streams_max: u16,
    },
    /// A message is larger than `message_bytes_max`; splitting it is the
    /// caller's job.
    #[error("message of {len_bytes} bytes exceeds the maximum of {max_bytes} bytes")]
    MessageTooLarge {
        /// Size of the rejected message.
        len_bytes: usize,
        /// Configured maximum.
        max_bytes: usize,
    },
    /// The peer was declared down (promote-failure timeout elapsed with no
    /// working path). Requests in flight to it have failed; retry after
    /// `PeerUp`.
    #[error("peer {peer} is down (no working path for {timeout:?})")]
    PeerDown {
        /// Name of the peer machine.
        peer: String,
        /// Its promote-failure timeout.
        timeout: Duration,
    },
    /// The peer restarted (new epoch) or its session was reset; whatever was
    /// in flight to the old session is lost and will never be delivered.
    #[error("peer {peer} restarted (new epoch {epoch:#x}); in-flight messages were discarded")]
    PeerRestarted {
        /// Name of the peer machine.
        peer: String,
        /// The new epoch that was seen.
        epoch: u64,
    },
    /// The per-peer send buffer or request table is full; the sans-IO caller
    /// must wait for `Event::Released` (the tokio driver waits for you).
    #[error("send buffer to peer is full ({buffered_bytes} of {max_bytes} bytes)")]
    WouldBlock {
        /// Bytes currently charged to the peer's send buffer.
        buffered_bytes: usize,
        /// The bound.
        max_bytes: usize,
    },
    /// The node was shut down.
    #[error("GeoMessage node is shut down")]
    Shutdown,
    /// A socket operation failed.
    #[error("I/O error on {what}: {message}")]
    Io {
        /// What was being done.
        what: String,
        /// The operating system's message.
        message: String,
    },
}

impl NetError {
    /// True when retrying the same operation later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NetError::PeerDown { .. }
                | NetError::PeerRestarted { .. }
                | NetError::WouldBlock { .. }
        )
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, err: &std::io::Error) -> Self {
        NetError::Io {
            what: what.into(),
            message: err.to_string(),
        }
    }
}
