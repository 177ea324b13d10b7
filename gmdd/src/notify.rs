//! systemd's readiness protocol (`sd_notify`): one datagram per message to
//! the Unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Without `NOTIFY_SOCKET` (not under systemd with
//! `Type=notify`) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use tracing::debug;

/// Where the notifications go, set once from the environment.
static SOCKET: Mutex<Option<String>> = Mutex::new(None);

/// Reads `NOTIFY_SOCKET` and removes it from the environment, so that
/// processes gmdd starts do not talk to systemd in its name. Call it
/// before any thread starts (first thing in `main`).
pub fn init() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        *SOCKET.lock().expect("notify lock") = Some(path.to_string_lossy().into_owned());
        // SAFETY: called first thing in `main`, before any other thread
        // exists that could read the environment.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` lines); errors are only
/// logged: systemd going away must not stop gmdd.
pub(crate) fn notify(state: &str) {
    let Some(path) = SOCKET.lock().expect("notify lock").clone() else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        debug!(socket = %path, error = %e, "sd_notify failed");
    }
}

/// `STATUS=` with one line of text (newlines would end it).
pub(crate) fn status(text: &str) {
    notify(&format!("STATUS={}", text.replace('\n', " ")));
}

/// `RELOADING=1` with the monotonic time systemd asks for.
pub(crate) fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration"
    ));
}
