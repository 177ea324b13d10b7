//! gmd-core: the state map, configuration, device lifecycle and the local data
//! path of a GeoMirror device. No sockets, no ublk, no NBD wire formats.

pub mod buf;
pub mod config;
pub mod device;
pub mod engine;
pub mod generations;
pub mod latency;
pub mod link;
pub mod mirror;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod statemap;
pub mod units;
pub mod volume;
