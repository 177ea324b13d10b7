//! Named network namespaces (`ip netns`) and TUN devices inside them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

/// Where `ip netns` keeps the named namespaces.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Whether the named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Creates the named namespace (`ip netns add`).
pub fn add(name: &str) -> io::Result<()> {
    ip(&["netns", "add", name])
}

/// Deletes the named namespace if it exists (`ip netns del`).
pub fn delete(name: &str) -> io::Result<()> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Runs `f` on a new thread that has entered the named namespace; sockets
/// and TUN devices it opens belong to that namespace and stay there when
/// handed back to other threads.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(path(name))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread in namespace panicked"))?
    })
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it) the TUN device `ifname` in the calling thread's
/// network namespace: IP packets without a header, non-blocking.
pub fn open_tun(ifname: &str) -> io::Result<OwnedFd> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!(
            "interface name {ifname} too long"
        )));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (name, flags, padding to its 40 bytes).
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.into())
}

use std::os::unix::fs::OpenOptionsExt;
