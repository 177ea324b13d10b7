//! The cluster's pre-shared key file: 32 random bytes as 64 hexadecimal
//! characters, readable by root only.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Bytes in a cluster key.
pub const KEY_LEN: usize = 32;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file does not exist.
    #[error(
        "cluster key file {0} does not exist; create it with 'gmdctl genkey {0}' and copy it to every machine"
    )]
    Missing(String),
    /// The file exists and overwriting was not asked for.
    #[error("{0} already exists; add --force to replace it (every machine then needs the new key)")]
    Exists(String),
    /// The content is not 64 hexadecimal characters.
    #[error("cluster key file {0} is not a gmd key (expected 64 hexadecimal characters)")]
    Malformed(String),
    /// Group or others may read it.
    #[error(
        "cluster key file {path} is readable by others (mode {mode:o}); run 'chmod 600 {path}'"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing failed.
    #[error("cluster key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes a new random key to `path` with mode 0600.
///
/// # Errors
/// The file exists (without `force`) or cannot be written.
pub fn generate(path: &Path, force: bool) -> Result<(), KeyError> {
    let shown = path.display().to_string();
    let mut key = [0u8; KEY_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key);
    let text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(shown.clone())
        } else {
            KeyError::Io {
                path: shown.clone(),
                source,
            }
        }
    })?;
    let io = |source| KeyError::Io {
        path: shown.clone(),
        source,
    };
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    file.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Reads and checks the key at `path`.
///
/// # Errors
/// Missing, malformed, readable by others, or unreadable.
pub fn read(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeyError::Missing(shown.clone())
        } else {
            KeyError::Io {
                path: shown.clone(),
                source,
            }
        }
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: shown.clone(),
        source,
    })?;
    let text = text.trim();
    if text.len() != KEY_LEN * 2 {
        return Err(KeyError::Malformed(shown));
    }
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| KeyError::Malformed(shown.clone()))?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_read_back_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        generate(&path, false).unwrap();
        let key = read(&path).unwrap();
        assert_ne!(key, [0u8; KEY_LEN]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(generate(&path, false), Err(KeyError::Exists(_))));
        generate(&path, true).unwrap();
        assert_ne!(read(&path).unwrap(), key);
    }

    #[test]
    fn bad_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        assert!(matches!(read(&path), Err(KeyError::Missing(_))));
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read(&path), Err(KeyError::Malformed(_))));
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read(&path), Err(KeyError::Exposed { .. })));
    }
}
