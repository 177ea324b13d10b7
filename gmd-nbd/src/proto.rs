//! NBD wire constants and the few fixed-size encodings (fixed newstyle
//! handshake, simple replies), as in the NBD protocol document.

/// `NBDMAGIC`, first word of the handshake.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the handshake and magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and start transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: acknowledgement.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: an information item.
pub const REP_INFO: u32 = 3;
/// Option error: unsupported option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
/// Option error: invalid option data.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// Option error: the server needs the client to honour block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) | 8;
/// Option error: request too big.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: flush supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: trim supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: write zeroes supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see one consistent device.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Errors in replies.
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Maps an errno to the NBD error set (anything unknown becomes EIO).
pub fn nbd_error(errno: i32) -> u32 {
    match u32::try_from(errno) {
        Ok(e @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN)) => e,
        _ => EIO,
    }
}

/// A transmission request header (28 bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Size on the wire.
    pub const LEN: usize = 28;

    /// Decodes a header; `None` when the magic is wrong.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Option<Self> {
        let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: u16::from_be_bytes(bytes[4..6].try_into().expect("2")),
            kind: u16::from_be_bytes(bytes[6..8].try_into().expect("2")),
            cookie: u64::from_be_bytes(bytes[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8")),
            length: u32::from_be_bytes(bytes[24..28].try_into().expect("4")),
        })
    }

    /// Encodes a header (used by tests and clients).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Encodes a simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 65536,
        };
        let bytes = h.encode();
        assert_eq!(RequestHeader::decode(&bytes), Some(h));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(RequestHeader::decode(&bad), None);
    }

    #[test]
    fn unknown_errnos_become_eio() {
        assert_eq!(nbd_error(22), EINVAL);
        assert_eq!(nbd_error(1), EPERM);
        assert_eq!(nbd_error(9999), EIO);
        assert_eq!(nbd_error(108), ESHUTDOWN);
    }
}
