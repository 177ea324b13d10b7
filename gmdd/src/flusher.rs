//! gmdd serves block devices (ublk, NBD) from user space, so the kernel may
//! be waiting on gmdd to write back dirty pages of those very devices.
//! Were gmdd's own allocations then to enter direct reclaim and start I/O
//! on them, or be throttled behind their writeback, the machine would
//! deadlock under memory pressure. The IO_FLUSHER state
//! (`PR_SET_IO_FLUSHER`, Linux 5.6) is the kernel's answer for such
//! daemons (the same reason open-iscsi's and FUSE's servers use it): the
//! process's allocations never start I/O (`PF_MEMALLOC_NOIO`) and are not
//! throttled behind another device's writeback (`PF_LOCAL_THROTTLE`).
//!
//! The state belongs to a thread and is inherited by the threads it makes
//! (kernel `copy_process` keeps these flags), so gmdd enters it before it
//! starts any other thread.

use std::io;

/// `prctl` option (linux/prctl.h); the libc crate does not name it for Linux.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Puts the calling thread, and every thread it starts afterwards, in the
/// IO_FLUSHER state. Needs `CAP_SYS_RESOURCE`.
pub fn enter() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What an administrator should read when [`enter`] fails with `e`.
pub fn explain(e: &io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => "it lacks CAP_SYS_RESOURCE: run it as root, or add the capability \
                              to the unit's CapabilityBoundingSet"
            .to_string(),
        Some(libc::EINVAL) => {
            "this kernel does not know PR_SET_IO_FLUSHER (Linux 5.6 and later do)".to_string()
        }
        _ => e.to_string(),
    };
    format!(
        "gmdd is not in the IO_FLUSHER state ({why}); under memory pressure its allocations \
         may wait on writeback to the devices it serves itself and hang them"
    )
}
