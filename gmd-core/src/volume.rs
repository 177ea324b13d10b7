//! Opening backing volumes (regular files or block devices) and asking their size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

nix::ioctl_read!(
    /// `BLKGETSIZE64`: size of a block device in bytes.
    blkgetsize64, 0x12, 114, u64
);

/// Size in bytes of an open regular file or block device.
///
/// # Errors
/// The metadata or the `BLKGETSIZE64` ioctl failed, or the file is neither a
/// regular file nor a block device.
pub fn size_bytes(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(file), &mut size) }
            .map_err(io::Error::from)?;
        Ok(size)
    } else if meta.file_type().is_file() {
        Ok(meta.len())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ))
    }
}

/// Whether `path` names a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Opens a volume for reading and writing, with `O_DIRECT` when `direct` is set.
///
/// # Errors
/// The open failed; the error is returned unchanged.
pub fn open_rw(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Flushes the directory holding `path` so that a newly created file survives a crash.
///
/// # Errors
/// The directory could not be opened or synced.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
