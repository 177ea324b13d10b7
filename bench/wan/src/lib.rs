//! An emulated WAN link between two network namespaces.
//!
//! [`Wan::up`] creates two network namespaces, a TUN device in each with a
//! point-to-point address, and a forwarder thread in the calling process
//! that carries IP packets between the two TUN devices through a
//! [`link::Link`] per direction (delay, jitter, token-bucket rate with a
//! drop-tail queue, loss, reordering). Anything run inside the namespaces
//! (`ip netns exec`) — TCP, GeoMessage, two `gmdd` — crosses the same link.
//! Dropping the [`Wan`] (or [`Wan::down`]) stops the forwarder and deletes
//! the namespaces.

pub mod link;
pub mod netns;
pub mod wan;

pub use wan::{Wan, WanConfig};
