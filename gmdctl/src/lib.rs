//! The pieces of gmd shared by the daemon (`gmdd`, its own crate) and the
//! command-line tools `gmdctl` and `gmdstat`: the control protocol and its
//! client, statistics reports and their renderings, the cluster key,
//! sizing and verify. Links neither ublk, GeoMessage nor io_uring.

pub mod client;
pub mod keyfile;
pub mod machine;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod sizing;
pub mod verify;
