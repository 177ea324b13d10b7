//! The gmd daemon (`gmdd`), its control protocol, and the pieces shared by
//! the command-line tools `gmdctl` and `gmdstat`.

pub mod client;
pub mod daemon;
pub mod keyfile;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod sizing;
pub mod verify;
