//! The link between the two copies of a device, as a sans-IO state machine
//! beside the engine: the handshake ([`Link`]), the decision of which side
//! is newer and what the resync moves ([`decide`]), the rules of role
//! changes ([`roles`]), whether a primary that lost its peer may write alone
//! ([`isolation`]), the link session, and which peer the hot regions
//! are known to be identical on. The daemon drives it with real messages;
//! the simulator runs the same code.

mod decide;
mod facts;
mod handshake;
pub mod isolation;
mod regions;
pub mod roles;

pub use decide::{Basis, Plan, Refusal, Side, SideFacts, decide};
pub use facts::{MapSource, offer_parts};
pub use handshake::{
    Accept, HandshakeError, HotPeer, Identity, Link, Offer, PairRole, Part, Start, same_device,
};
pub use regions::Regions;
