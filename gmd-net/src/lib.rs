//! GeoMessage: reliable, ordered, authenticated request/reply messaging between
//! machines over one or more UDP networks.
//!
//! This crate knows nothing about devices or state maps; the mirror engine in
//! `gmd-core` is driven by `gmdd`, which connects the two.
//!
//! Layers, bottom up:
//! - [`wire`]: datagram header and frames, pure encode/decode (fuzzed).
//! - [`crypto`]: key derivation from the cluster's pre-shared key, AEAD
//!   sealing, replay window.
//! - [`proto`]: the sans-IO protocol core ([`proto::Endpoint`]): sessions and
//!   epochs, acknowledgements, loss recovery, congestion and flow control,
//!   fragmentation, streams, path choice, peer liveness, counters.
//! - [`arena`]: buffers reused in place (receive batches; a sender's
//!   encoded messages).
//! - `driver` (feature `tokio`, default): [`Node`], one UDP socket per local
//!   interface, batched with `sendmmsg`/`recvmmsg` and UDP GSO/GRO.
//! - `testing` (feature `test-support`): a deterministic network simulator and
//!   a fault-injecting UDP relay.
//!
//! `docs/net.md` describes the wire format, state machine, timers, path
//! choice, security and memory bounds.

pub mod arena;
pub mod config;
pub mod crypto;
pub mod proto;
pub mod ranges;
pub mod stats;
pub mod wire;

mod error;

#[cfg(feature = "tokio")]
mod driver;
#[cfg(feature = "tokio")]
pub mod netprobe;
#[cfg(feature = "tokio")]
mod sys;
#[cfg(feature = "test-support")]
pub mod testing;

pub use config::{
    DATAGRAM_BYTES_DEFAULT, InterfaceConfig, MachineConfig, NetConfig, NetworkConfig, NetworkId,
    PORT_DEFAULT, PeerId, Tuning,
};
pub use error::NetError;
pub use proto::mtu::DISCOVERY_MAX;
pub use proto::{Endpoint, Event, RequestId, TRANSMIT_BYTES_MAX};
pub use stats::{
    AUTH_FAILURE_SOURCES_MAX, AuthFailures, MachineStats, NetworkStats, PathStats, SecurityStats,
    Stats,
};

#[cfg(feature = "tokio")]
pub use driver::{
    COMMAND_QUEUE_MAX, Incoming, IncomingReceiver, Node, NodeEvent, Receipt, Responder,
    stream_queue_max,
};

/// A stream of messages to one peer. Streams other than [`StreamId::CONTROL`]
/// deliver in order; each is independent of the others (one per device keeps
/// write order per device without blocking the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u16);

impl StreamId {
    /// The unordered control stream: exactly-once, no ordering.
    pub const CONTROL: StreamId = StreamId(0);
    /// Internal lane carrying replies (unordered).
    pub(crate) const REPLY: StreamId = StreamId(u16::MAX);
    /// Reserved unordered stream answered by the driver itself (netprobe).
    pub const PROBE: StreamId = StreamId(u16::MAX - 1);
    /// Whether messages on this stream are delivered in order.
    pub fn is_ordered(self) -> bool {
        self != StreamId::CONTROL && self != StreamId::PROBE && self != StreamId::REPLY
    }
}
