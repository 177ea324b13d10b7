//! NBD export of GeoMirror devices: the fixed newstyle handshake (OPT_GO,
//! OPT_INFO, OPT_LIST, OPT_EXPORT_NAME) and the transmission phase (READ,
//! WRITE, FLUSH, TRIM, WRITE_ZEROES, the FUA flag), with many requests in
//! flight per connection and several connections per export.
//!
//! The server only translates: requests become [`gmd_core::runtime::Submission`]s
//! handed to an [`Export`], results become simple replies. It holds no
//! mirroring logic and knows nothing of device states beyond what the
//! [`Registry`] tells it (only AVAILABLE devices are exported).
//!
//! A client that breaks the protocol (bad magic, oversized option or
//! payload) is disconnected with a log line; other clients are unaffected.

pub mod proto;
mod replies;
mod server;

pub use server::{Export, Lease, Limits, Listener, Registry, Server};
