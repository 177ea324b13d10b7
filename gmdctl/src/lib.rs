//! The pieces of gmd shared by the daemon (`gmdd`, its own crate) and the
//! command-line tools `gmdctl` and `gmdstat`: the control protocol and its
//! client, statistics reports and their renderings, the cluster key,
//! sizing and verify. Links neither ublk, GeoMessage nor io_uring.

pub mod cli;
pub mod client;
pub mod keyfile;
pub mod machine;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod sizing;
pub mod verify;
pub mod views;

/// Lets a closed pipe end the program quietly, as command-line tools do
/// (`gmdctl status | head`), instead of a panic on the failed write.
pub fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default has no
    // preconditions; done first thing in main, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
