//! What a running device exchanges with its peer, and how it is encoded on
//! the device's ordered GeoMessage stream.
//!
//! The device thread hands [`ToPeer`] messages to a [`PeerLink`] (the daemon
//! moves them over GeoMessage) and receives [`FromPeer`] messages through
//! [`crate::runtime::Runtime::from_peer`]. Encoding is a fixed little-endian
//! header followed by the data; [`decode`] checks every field, because even
//! an authenticated peer may run another version.

use bytes::{BufMut, Bytes, BytesMut};

use crate::engine::{Connection, EngineError, OpKind, PeerOp, Request, Seq};
use crate::generations::GenId;

/// The checksum of a region in checksum resync: BLAKE3, 256 bits. A
/// region found equal is not sent, so a collision would leave two
/// different copies with clean maps (the worst, silent, failure): the
/// checksum must make that practically impossible, which a 32-bit CRC
/// does not (one in 4 billion regions; a large device has millions).
pub type RegionSum = [u8; 32];

/// The [`RegionSum`] of a region's data.
pub fn region_sum(data: &[u8]) -> RegionSum {
    *blake3::hash(data).as_bytes()
}

/// A message from the device thread for the peer. Its data is borrowed
/// from the device's buffers: a [`PeerLink`] encodes the message (one copy
/// of the data) before its `send` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToPeer<'a> {
    /// Apply this write (data empty for write-zeroes and trim).
    Write {
        /// Stream position.
        seq: Seq,
        /// Apply everything up to here first.
        after: Seq,
        /// The operation.
        request: Request,
        /// The data.
        data: &'a [u8],
    },
    /// A barrier: everything before it durable.
    Flush {
        /// Stream position.
        seq: Seq,
    },
    /// Resync data of one region.
    Resync {
        /// Stream position.
        seq: Seq,
        /// The region.
        region: u64,
        /// Its bytes.
        data: &'a [u8],
    },
    /// The checksum of one resync region, in place of its data: the peer
    /// answers `Ok` if its copy has the same (checksum resync).
    ResyncCheck {
        /// Stream position.
        seq: Seq,
        /// The region.
        region: u64,
        /// The checksum of this side's copy.
        sum: RegionSum,
    },
    /// The answer to the peer's message `seq`.
    Reply {
        /// The peer's stream position.
        seq: Seq,
        /// `Err(errno)` when it failed.
        result: Result<(), i32>,
    },
    /// Please resync this region next.
    Prioritize {
        /// The region.
        region: u64,
    },
    /// This region was added to the resync after the handshake: mark it
    /// not received before applying anything sent after this.
    ResyncAdd {
        /// The region.
        region: u64,
    },
    /// This side (resync target) now durably holds generation `current`.
    Adopted {
        /// The generation.
        current: GenId,
    },
    /// This side was promoted with primary term `term`.
    Term {
        /// The term.
        term: u64,
    },
}

/// A message from the peer for the device thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromPeer {
    /// An operation to apply (its data, empty if none).
    Op {
        /// The operation.
        op: PeerOp,
        /// Its data.
        data: Bytes,
    },
    /// The peer's checksum of one resync region
    /// ([`crate::engine::Engine::peer_check`]).
    ResyncCheck {
        /// Its place in the peer's stream.
        seq: Seq,
        /// The region.
        region: u64,
        /// The peer's checksum.
        sum: RegionSum,
    },
    /// The peer's answer to our message `seq`.
    Answer {
        /// Our stream position.
        seq: Seq,
        /// Its result.
        result: Result<(), EngineError>,
    },
    /// Resync this region next.
    Prioritize {
        /// The region.
        region: u64,
    },
    /// The peer added this region to its resync after the handshake
    /// ([`crate::engine::Engine::resync_added`]).
    ResyncAdd {
        /// The region.
        region: u64,
    },
    /// The peer, target of this side's resync, durably holds `current`
    /// ([`crate::engine::Engine::peer_adopted`]).
    Adopted {
        /// The generation.
        current: GenId,
    },
    /// The peer was promoted with primary term `term`
    /// ([`crate::engine::Engine::peer_promoted`]).
    Term {
        /// The term.
        term: u64,
    },
}

/// What a received message keeps of its transport until the device thread
/// has taken it: for GeoMessage, the message's flow-control credit, so that
/// the peer's window bounds this side's unprocessed backlog. Dropping it
/// gives that back. It allocates nothing: the owner is shared, the token
/// names what to release.
pub struct Hold {
    owner: Option<std::sync::Arc<dyn Release>>,
    token: u64,
}

/// Whoever gives back what a [`Hold`] kept.
pub trait Release: Send + Sync + 'static {
    /// Gives back what `token` names (once per token).
    fn release(&self, token: u64);
}

impl Hold {
    /// A hold that keeps nothing.
    pub fn none() -> Hold {
        Hold {
            owner: None,
            token: 0,
        }
    }

    /// A hold that calls `owner.release(token)` when dropped.
    pub fn new(owner: std::sync::Arc<dyn Release>, token: u64) -> Hold {
        Hold {
            owner: Some(owner),
            token,
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.release(self.token);
        }
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("held", &self.owner.is_some())
            .field("token", &self.token)
            .finish()
    }
}

/// A change of the link, decided by the daemon's handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Mirroring starts, as link session `session` (never 0), with this
    /// part in resync.
    Connected {
        /// The session id both sides agreed on.
        session: u64,
        /// This side's part in resync, and the peer's generation.
        connection: Connection,
    },
    /// The peer is gone.
    Lost,
    /// The peer is gone and this side may not write alone yet (site
    /// isolation): writes wait ([`crate::engine::Engine::peer_isolated`])
    /// until the link returns or the isolation is released (the runtime's
    /// `Port::release_isolation`).
    Isolated,
    /// The peer stopped its device cleanly, after flushing its volume
    /// ([`crate::engine::Engine::peer_left`]).
    Left,
}

/// Where the device thread sends what is for the peer. Called on the device
/// thread (or a frontend's): must not block, and encodes each message before
/// returning (its data is borrowed).
pub trait PeerLink: Send + Sync + 'static {
    /// Sends one message, in order.
    fn send(&self, message: ToPeer<'_>);
    /// Sends one message that the peer may take before earlier ones still
    /// on their way (the engine found it depends on none of them; see
    /// [`crate::engine::Engine::poll_action`]). By default, in order.
    fn send_passing(&self, message: ToPeer<'_>) {
        self.send(message);
    }
    /// Sends one message a request waits for (a write in sync or mwc, a
    /// flush, an answer to the peer), `passing` as in
    /// [`PeerLink::send_passing`]. A link may send it on the calling thread
    /// rather than hand it to a sender that batches. By default, as `send`
    /// or `send_passing`.
    fn send_awaited(&self, message: ToPeer<'_>, passing: bool) {
        if passing {
            self.send_passing(message);
        } else {
            self.send(message);
        }
    }
    /// The calling thread carried out a batch of the engine's actions and
    /// handed back its completions: messages the link held back until then
    /// (async's backlog, so that the application's completion does not wait
    /// for the message) may leave now. Called with the engine's lock held,
    /// as every send. By default the link holds nothing back.
    fn end_of_batch(&self) {}
    /// This side's part of a resync finished.
    fn resync_done(&self);
    /// The session must be dropped and set up again (see
    /// [`crate::engine::Action::Renegotiate`]).
    fn renegotiate(&self);
    /// The peer answered nothing for `waited_ms` while messages waited
    /// ([`crate::engine::Action::PeerStalled`]): drop the session.
    fn stalled(&self, waited_ms: u64);
    /// The link's congestion window toward the peer, bytes: what it
    /// estimates it can have in flight (rate × round trip). An adaptive
    /// resync window follows it. `None` (the default): not known.
    fn window_hint(&self) -> Option<u64> {
        None
    }
}

const TAG_WRITE: u8 = 1;
const TAG_FLUSH: u8 = 2;
const TAG_RESYNC: u8 = 3;
const TAG_REPLY: u8 = 4;
const TAG_PRIORITIZE: u8 = 5;
/// Added after the others: a peer that does not know it refuses the message
/// (the daemon logs it) and goes on as before.
const TAG_RESYNC_ADD: u8 = 6;
/// Added with data generations (likewise refused by older peers, which
/// then keep counting their marks from the older generation: safe).
const TAG_ADOPTED: u8 = 7;
/// Added with checksum resync; sent only to a peer that asked for it in
/// the handshake (an older one would refuse it).
const TAG_RESYNC_CHECK: u8 = 8;
/// Added with primary terms (refused by older peers, which then count
/// their own promotions only: their terms may tie, and the same-data rules
/// fall back to the marks).
const TAG_TERM: u8 = 9;

/// Why a message from the peer was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed device message: {0}")]
pub struct DecodeError(pub &'static str);

fn kind_byte(kind: OpKind) -> u8 {
    match kind {
        OpKind::Read => 0,
        OpKind::Write => 1,
        OpKind::Flush => 2,
        OpKind::WriteZeroes => 3,
        OpKind::Trim => 4,
    }
}

fn kind_of(byte: u8) -> Option<OpKind> {
    Some(match byte {
        1 => OpKind::Write,
        3 => OpKind::WriteZeroes,
        4 => OpKind::Trim,
        _ => return None,
    })
}

/// Encodes a message: the header, then the data.
pub fn encode(message: &ToPeer<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(encoded_len(message));
    encode_into(message, &mut out);
    out.freeze()
}

/// How many bytes [`encode_into`] appends for `message`.
pub fn encoded_len(message: &ToPeer<'_>) -> usize {
    match message {
        ToPeer::Write { data, .. } => 35 + data.len(),
        ToPeer::Flush { .. }
        | ToPeer::Prioritize { .. }
        | ToPeer::ResyncAdd { .. }
        | ToPeer::Adopted { .. }
        | ToPeer::Term { .. } => 9,
        ToPeer::Resync { data, .. } => 17 + data.len(),
        ToPeer::Reply { .. } => 13,
        ToPeer::ResyncCheck { .. } => 17 + 32,
    }
}

/// Appends the encoding of `message` to `out` (for a sender that puts its
/// own header first: one buffer, one copy of the data).
pub fn encode_into(message: &ToPeer<'_>, out: &mut BytesMut) {
    match message {
        ToPeer::Write {
            seq,
            after,
            request,
            data,
        } => {
            out.put_u8(TAG_WRITE);
            out.put_u8(kind_byte(request.kind));
            out.put_u8(u8::from(request.fua));
            out.put_u64_le(*seq);
            out.put_u64_le(*after);
            out.put_u64_le(request.offset_bytes);
            out.put_u64_le(request.len_bytes);
            out.put_slice(data);
        }
        ToPeer::Flush { seq } => {
            out.put_u8(TAG_FLUSH);
            out.put_u64_le(*seq);
        }
        ToPeer::Resync { seq, region, data } => {
            out.put_u8(TAG_RESYNC);
            out.put_u64_le(*seq);
            out.put_u64_le(*region);
            out.put_slice(data);
        }
        ToPeer::ResyncCheck { seq, region, sum } => {
            out.put_u8(TAG_RESYNC_CHECK);
            out.put_u64_le(*seq);
            out.put_u64_le(*region);
            out.put_slice(sum);
        }
        ToPeer::Reply { seq, result } => {
            out.put_u8(TAG_REPLY);
            out.put_u64_le(*seq);
            out.put_i32_le(match result {
                Ok(()) => 0,
                Err(errno) => (*errno).max(1),
            });
        }
        ToPeer::Prioritize { region } => {
            out.put_u8(TAG_PRIORITIZE);
            out.put_u64_le(*region);
        }
        ToPeer::ResyncAdd { region } => {
            out.put_u8(TAG_RESYNC_ADD);
            out.put_u64_le(*region);
        }
        ToPeer::Adopted { current } => {
            out.put_u8(TAG_ADOPTED);
            out.put_u64_le(*current);
        }
        ToPeer::Term { term } => {
            out.put_u8(TAG_TERM);
            out.put_u64_le(*term);
        }
    }
}

fn take_u64(bytes: &[u8], at: &mut usize) -> Result<u64, DecodeError> {
    let v = bytes
        .get(*at..*at + 8)
        .ok_or(DecodeError("truncated"))?
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| DecodeError("truncated"))?;
    *at += 8;
    Ok(v)
}

/// Decodes a message from the peer for a device of `size_bytes`.
///
/// # Errors
/// Unknown tag, truncated header, data length not matching the header, or
/// a range outside the device.
pub fn decode(body: &Bytes, size_bytes: u64) -> Result<FromPeer, DecodeError> {
    let tag = *body.first().ok_or(DecodeError("empty"))?;
    let mut at = 1;
    match tag {
        TAG_WRITE => {
            let kind = kind_of(*body.get(1).ok_or(DecodeError("truncated"))?)
                .ok_or(DecodeError("unknown operation"))?;
            let fua = *body.get(2).ok_or(DecodeError("truncated"))? != 0;
            at = 3;
            let seq = take_u64(body, &mut at)?;
            let after = take_u64(body, &mut at)?;
            let offset = take_u64(body, &mut at)?;
            let len = take_u64(body, &mut at)?;
            if offset.checked_add(len).is_none_or(|end| end > size_bytes) {
                return Err(DecodeError("range beyond the device"));
            }
            let data = body.slice(at..);
            let expected = if kind == OpKind::Write { len } else { 0 };
            if data.len() as u64 != expected {
                return Err(DecodeError("data length does not match"));
            }
            Ok(FromPeer::Op {
                op: PeerOp {
                    seq,
                    after,
                    request: Request {
                        kind,
                        offset_bytes: offset,
                        len_bytes: len,
                        fua,
                    },
                    resync_region: None,
                },
                data,
            })
        }
        TAG_FLUSH => {
            let seq = take_u64(body, &mut at)?;
            Ok(FromPeer::Op {
                op: PeerOp {
                    seq,
                    after: 0,
                    request: Request {
                        kind: OpKind::Flush,
                        offset_bytes: 0,
                        len_bytes: 0,
                        fua: false,
                    },
                    resync_region: None,
                },
                data: Bytes::new(),
            })
        }
        TAG_RESYNC => {
            let seq = take_u64(body, &mut at)?;
            let region = take_u64(body, &mut at)?;
            let bytes = crate::units::region_bytes(region, size_bytes);
            let data = body.slice(at..);
            if bytes.is_empty() || data.len() as u64 != bytes.end - bytes.start {
                return Err(DecodeError("resync data does not match its region"));
            }
            Ok(FromPeer::Op {
                op: PeerOp {
                    seq,
                    after: 0,
                    request: Request {
                        kind: OpKind::Write,
                        offset_bytes: bytes.start,
                        len_bytes: bytes.end - bytes.start,
                        fua: false,
                    },
                    resync_region: Some(region),
                },
                data,
            })
        }
        TAG_REPLY => {
            let seq = take_u64(body, &mut at)?;
            let code = body
                .get(at..at + 4)
                .ok_or(DecodeError("truncated"))?
                .try_into()
                .map(i32::from_le_bytes)
                .map_err(|_| DecodeError("truncated"))?;
            Ok(FromPeer::Answer {
                seq,
                result: if code == 0 {
                    Ok(())
                } else {
                    Err(EngineError::Remote(code))
                },
            })
        }
        TAG_PRIORITIZE => Ok(FromPeer::Prioritize {
            region: take_u64(body, &mut at)?,
        }),
        TAG_RESYNC_ADD => {
            let region = take_u64(body, &mut at)?;
            if region
                .checked_mul(crate::units::REGION_SIZE_BYTES)
                .is_none_or(|start| start >= size_bytes)
            {
                return Err(DecodeError("region beyond the device"));
            }
            Ok(FromPeer::ResyncAdd { region })
        }
        TAG_ADOPTED => Ok(FromPeer::Adopted {
            current: take_u64(body, &mut at)?,
        }),
        TAG_TERM => Ok(FromPeer::Term {
            term: take_u64(body, &mut at)?,
        }),
        TAG_RESYNC_CHECK => {
            let seq = take_u64(body, &mut at)?;
            let region = take_u64(body, &mut at)?;
            if region
                .checked_mul(crate::units::REGION_SIZE_BYTES)
                .is_none_or(|start| start >= size_bytes)
            {
                return Err(DecodeError("region beyond the device"));
            }
            let sum: RegionSum = body
                .get(at..)
                .and_then(|rest| rest.try_into().ok())
                .ok_or(DecodeError("a resync checksum is 32 bytes"))?;
            Ok(FromPeer::ResyncCheck { seq, region, sum })
        }
        _ => Err(DecodeError("unknown message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size a sender reserves is the size it gets: no reallocation.
    #[test]
    fn encoded_len_is_exact_for_every_message() {
        let data = Bytes::from_static(&[7; 100]);
        let request = Request {
            kind: OpKind::Write,
            offset_bytes: 0,
            len_bytes: 100,
            fua: false,
        };
        for message in [
            ToPeer::Write {
                seq: 1,
                after: 0,
                request,
                data: &data,
            },
            ToPeer::Flush { seq: 2 },
            ToPeer::Resync {
                seq: 3,
                region: 4,
                data: &data,
            },
            ToPeer::Reply {
                seq: 5,
                result: Err(5),
            },
            ToPeer::Prioritize { region: 6 },
            ToPeer::ResyncAdd { region: 7 },
            ToPeer::Adopted { current: 8 },
            ToPeer::Term { term: 3 },
            ToPeer::ResyncCheck {
                seq: 9,
                region: 10,
                sum: [3; 32],
            },
        ] {
            let mut out = BytesMut::new();
            out.put_u64_le(9);
            encode_into(&message, &mut out);
            assert_eq!(out.len(), 8 + encoded_len(&message), "{message:?}");
            assert_eq!(&out[8..], &encode(&message)[..]);
        }
    }

    #[test]
    fn messages_round_trip() {
        let write = ToPeer::Write {
            seq: 7,
            after: 5,
            request: Request {
                kind: OpKind::Write,
                offset_bytes: 4096,
                len_bytes: 4,
                fua: true,
            },
            data: b"abcd",
        };
        match decode(&encode(&write), 1 << 20).unwrap() {
            FromPeer::Op { op, data } => {
                assert_eq!(op.seq, 7);
                assert_eq!(op.after, 5);
                assert!(op.request.fua);
                assert_eq!(&data[..], b"abcd");
            }
            other => panic!("{other:?}"),
        }
        let reply = ToPeer::Reply {
            seq: 9,
            result: Err(5),
        };
        assert_eq!(
            decode(&encode(&reply), 1 << 20).unwrap(),
            FromPeer::Answer {
                seq: 9,
                result: Err(EngineError::Remote(5))
            }
        );
        let resync = ToPeer::Resync {
            seq: 1,
            region: 1,
            data: &[0u8; 32768],
        };
        assert!(matches!(
            decode(&encode(&resync), 1 << 20).unwrap(),
            FromPeer::Op { op, .. } if op.resync_region == Some(1)
        ));
        assert_eq!(
            decode(&encode(&ToPeer::ResyncAdd { region: 31 }), 1 << 20).unwrap(),
            FromPeer::ResyncAdd { region: 31 }
        );
        assert_eq!(
            decode(&encode(&ToPeer::Adopted { current: 0xfeed }), 1 << 20).unwrap(),
            FromPeer::Adopted { current: 0xfeed }
        );
        assert_eq!(
            decode(&encode(&ToPeer::Term { term: 12 }), 1 << 20).unwrap(),
            FromPeer::Term { term: 12 }
        );
        let sum = region_sum(b"region");
        assert_eq!(
            decode(
                &encode(&ToPeer::ResyncCheck {
                    seq: 4,
                    region: 31,
                    sum
                }),
                1 << 20
            )
            .unwrap(),
            FromPeer::ResyncCheck {
                seq: 4,
                region: 31,
                sum
            }
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        assert!(decode(&Bytes::new(), 1 << 20).is_err());
        assert!(decode(&Bytes::from_static(&[99]), 1 << 20).is_err());
        let write = ToPeer::Write {
            seq: 1,
            after: 0,
            request: Request {
                kind: OpKind::Write,
                offset_bytes: (1 << 20) - 2,
                len_bytes: 4,
                fua: false,
            },
            data: b"abcd",
        };
        assert!(
            decode(&encode(&write), 1 << 20).is_err(),
            "beyond the device"
        );
        let mut short = encode(&write).to_vec();
        short.truncate(20);
        assert!(decode(&Bytes::from(short), 1 << 30).is_err());
        let resync = ToPeer::Resync {
            seq: 1,
            region: 0,
            data: &[0u8; 100],
        };
        assert!(
            decode(&encode(&resync), 1 << 20).is_err(),
            "wrong region size"
        );
        assert!(
            decode(&encode(&ToPeer::ResyncAdd { region: 32 }), 1 << 20).is_err(),
            "region beyond the device"
        );
        assert!(decode(&encode(&ToPeer::ResyncAdd { region: u64::MAX }), 1 << 20).is_err());
        let check = ToPeer::ResyncCheck {
            seq: 1,
            region: 32,
            sum: [0; 32],
        };
        assert!(
            decode(&encode(&check), 1 << 20).is_err(),
            "region beyond the device"
        );
        let mut short = encode(&ToPeer::ResyncCheck {
            seq: 1,
            region: 0,
            sum: [0; 32],
        })
        .to_vec();
        short.pop();
        assert!(decode(&Bytes::from(short), 1 << 20).is_err(), "short sum");
    }
}
