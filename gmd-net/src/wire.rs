//! Wire format of GeoMessage datagrams: a fixed clear-text header, a payload of
//! frames (encrypted or not) and a 16-byte AEAD tag.
//!
//! ```text
//! 0      1      2             4                       12          16
//! +------+------+-------------+-----------------------+-----------+
//! | ver  | flags| reserved=0  | cluster id (u64 BE)   | src mach. |
//! +------+------+-------------+-----------------------+-----------+
//! 16          20                      28                      36                      44
//! | dst mach. | src epoch (u64)       | dst epoch (u64, 0=?)  | packet number (u64)   |
//! +-----------+-----------------------+-----------------------+-----------------------+
//! | frames ... (encrypted when flags & ENCRYPTED)  | AEAD tag (16) |
//! ```
//!
//! Frames start with a type byte; integers are QUIC variable-length integers
//! (1, 2, 4 or 8 bytes, 62 bits). Decoding never panics and never allocates:
//! every length is checked against the remaining input, and a frame that does
//! not parse rejects the whole datagram. This module is pure and is what the
//! fuzz target exercises.

use ring::digest;

/// Protocol version carried in byte 0.
pub const VERSION: u8 = 1;
/// Size of the clear-text header.
pub const HEADER_BYTES: usize = 44;
/// Size of the AEAD tag at the end of every datagram.
pub const TAG_BYTES: usize = 16;
/// Header flag: the payload is encrypted (otherwise only authenticated).
pub const FLAG_ENCRYPTED: u8 = 0x01;
/// Largest number of SACK ranges in one ACK frame.
pub const ACK_RANGES_MAX: usize = 64;
/// Worst-case encoded size of a STREAM frame header.
pub const STREAM_FRAME_OVERHEAD_BYTES: usize = 1 + 8 + 8 + 1 + 8 + 8 + 8 + 8;

/// Frame type: ping (ack-eliciting, no body).
pub const FRAME_PING: u8 = 0x01;
/// Frame type: acknowledgement.
pub const FRAME_ACK: u8 = 0x02;
/// Frame type: hello (tell me your epoch).
pub const FRAME_HELLO: u8 = 0x03;
/// Frame type: fragment of a message.
pub const FRAME_STREAM: u8 = 0x04;
/// Frame type: flow-control credit.
pub const FRAME_CREDIT: u8 = 0x05;
/// Frame type: the sender is shutting down.
pub const FRAME_CLOSE: u8 = 0x06;

/// The fixed header of every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Flags (`FLAG_ENCRYPTED`).
    pub flags: u8,
    /// Cluster id (hash of the cluster name).
    pub cluster_id: u64,
    /// Sender machine id.
    pub src_machine: u32,
    /// Receiver machine id.
    pub dst_machine: u32,
    /// Sender's session epoch.
    pub src_epoch: u64,
    /// Receiver's epoch as the sender knows it; zero when unknown.
    pub dst_epoch: u64,
    /// Packet number, unique per (src epoch, dst epoch) session and direction.
    pub packet_number: u64,
}

/// Why a datagram was rejected before any state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than header + tag, or a frame runs past the end.
    Truncated,
    /// Unknown version or reserved bits set.
    BadVersion,
    /// A frame is malformed (unknown type, impossible values).
    Malformed,
}

impl Header {
    /// Writes the header into the first `HEADER_BYTES` of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than `HEADER_BYTES` (a caller bug).
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= HEADER_BYTES, "header buffer too short");
        out[0] = VERSION;
        out[1] = self.flags;
        out[2] = 0;
        out[3] = 0;
        out[4..12].copy_from_slice(&self.cluster_id.to_be_bytes());
        out[12..16].copy_from_slice(&self.src_machine.to_be_bytes());
        out[16..20].copy_from_slice(&self.dst_machine.to_be_bytes());
        out[20..28].copy_from_slice(&self.src_epoch.to_be_bytes());
        out[28..36].copy_from_slice(&self.dst_epoch.to_be_bytes());
        out[36..44].copy_from_slice(&self.packet_number.to_be_bytes());
    }

    /// Parses the header of a whole datagram (header, payload and tag).
    ///
    /// # Errors
    /// `Truncated` if the datagram cannot hold header and tag; `BadVersion`
    /// for an unknown version or flag bits.
    pub fn decode(datagram: &[u8]) -> Result<Header, DecodeError> {
        if datagram.len() < HEADER_BYTES + TAG_BYTES {
            return Err(DecodeError::Truncated);
        }
        if datagram[0] != VERSION
            || datagram[1] & !FLAG_ENCRYPTED != 0
            || datagram[2] != 0
            || datagram[3] != 0
        {
            return Err(DecodeError::BadVersion);
        }
        let u64_at = |i: usize| u64::from_be_bytes(datagram[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(datagram[i..i + 4].try_into().expect("4 bytes"));
        Ok(Header {
            flags: datagram[1],
            cluster_id: u64_at(4),
            src_machine: u32_at(12),
            dst_machine: u32_at(16),
            src_epoch: u64_at(20),
            dst_epoch: u64_at(28),
            packet_number: u64_at(36),
        })
    }
}

/// Cluster id of a cluster name: the first 8 bytes of a domain-separated SHA-256.
pub fn cluster_id(name: &str) -> u64 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"gmd-net cluster id v1\0");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"))
}

/// Machine id of a machine name: the first 4 bytes of a domain-separated SHA-256.
pub fn machine_id(name: &str) -> u32 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"gmd-net machine id v1\0");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    u32::from_be_bytes(d.as_ref()[..4].try_into().expect("4 bytes"))
}

// ---------------------------------------------------------------------------
// Variable-length integers (QUIC, RFC 9000 §16).

/// Largest value a varint can hold.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Encoded size of `v`.
pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// A cursor writing into a fixed buffer; callers size frames beforehand, so
/// running out of room is a bug and panics.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pos
    }
    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Writes one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf[self.pos] = v;
        self.pos += 1;
    }
    /// Writes raw bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf[self.pos..self.pos + v.len()].copy_from_slice(v);
        self.pos += v.len();
    }
    /// Writes a varint.
    ///
    /// # Panics
    /// If `v > VARINT_MAX`.
    pub fn varint(&mut self, v: u64) {
        assert!(v <= VARINT_MAX, "varint out of range");
        match varint_len(v) {
            1 => self.u8(v as u8),
            2 => self.bytes(&((v as u16) | 0x4000).to_be_bytes()),
            4 => self.bytes(&((v as u32) | 0x8000_0000).to_be_bytes()),
            _ => self.bytes(&(v | 0xC000_0000_0000_0000).to_be_bytes()),
        }
    }
}

/// A cursor reading from a slice; every read is bounds-checked.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads from the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// True when all input is consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// Reads a varint.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for _ in 1..len {
            v = (v << 8) | u64::from(self.u8()?);
        }
        Ok(v)
    }
}

// ---------------------------------------------------------------------------
// Frames.

/// Kind of a message, carried in its STREAM frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    /// One-way message.
    OneWay,
    /// One-way message its receiver may deliver before earlier messages of
    /// its ordered stream that have not arrived yet (the sender knows it
    /// does not depend on them); later messages of the stream still wait
    /// for it, as for any other.
    Passing,
    /// Request expecting a reply with the same id.
    Request(u64),
    /// Reply to the request with this id.
    Reply(u64),
}

/// One fragment of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFrame<'a> {
    /// Stream (lane) id.
    pub stream: u16,
    /// Message sequence number within the stream.
    pub seq: u64,
    /// Kind and request id.
    pub kind: MsgKind,
    /// Total message length in bytes.
    pub total_len: u32,
    /// Offset of this fragment in the message.
    pub offset: u32,
    /// Fragment bytes.
    pub data: &'a [u8],
}

/// An acknowledgement: `ranges` are inclusive packet-number ranges in
/// descending order, the first holding the largest acknowledged number.
#[derive(Debug, Clone)]
pub struct AckFrame<'a> {
    /// Largest packet number acknowledged.
    pub largest: u64,
    /// Time the receiver held the ack, in microseconds.
    pub delay_us: u64,
    /// Encoded ranges, iterated with [`AckFrame::ranges`].
    raw: Reader<'a>,
    /// Number of ranges after the first.
    extra: u64,
    first_len: u64,
}

impl AckFrame<'_> {
    /// Iterates the acknowledged ranges as inclusive `(low, high)`, highest first.
    pub fn ranges(&self) -> AckRanges<'_> {
        AckRanges {
            raw: self.raw.clone(),
            left: self.extra,
            next: Some((self.largest - self.first_len, self.largest)),
        }
    }
}

/// Iterator over the ranges of an [`AckFrame`].
#[derive(Debug)]
pub struct AckRanges<'a> {
    raw: Reader<'a>,
    left: u64,
    next: Option<(u64, u64)>,
}

impl Iterator for AckRanges<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let cur = self.next.take()?;
        if self.left > 0 {
            self.left -= 1;
            // Validated at decode time, so these cannot fail or underflow.
            let gap = self.raw.varint().ok()?;
            let len = self.raw.varint().ok()?;
            let high = cur.0 - gap - 2;
            self.next = Some((high - len, high));
        }
        Some(cur)
    }
}

/// A decoded frame borrowing from the payload.
#[derive(Debug, Clone)]
pub enum Frame<'a> {
    /// Elicits an acknowledgement.
    Ping,
    /// Acknowledges packets.
    Ack(AckFrame<'a>),
    /// Asks the receiver to reveal its epoch.
    Hello,
    /// Carries a message fragment.
    Stream(StreamFrame<'a>),
    /// Grants the sender credit up to this many cumulative charged bytes.
    Credit(u64),
    /// The sender is shutting down.
    Close,
}

impl Frame<'_> {
    /// Whether receiving this frame obliges the receiver to acknowledge.
    /// CREDIT rides on acknowledgements and must not elicit one, or two
    /// endpoints would acknowledge each other forever; a CREDIT that has to be
    /// reliable is sent with a PING.
    pub fn is_ack_eliciting(&self) -> bool {
        !matches!(self, Frame::Ack(_) | Frame::Credit(_))
    }
}

/// Encoded size of a STREAM frame header for these values.
pub fn stream_frame_header_len(
    stream: u16,
    seq: u64,
    kind: MsgKind,
    total_len: u32,
    offset: u32,
    len: usize,
) -> usize {
    let kind_len = match kind {
        MsgKind::OneWay | MsgKind::Passing => 1,
        MsgKind::Request(id) | MsgKind::Reply(id) => 1 + varint_len(id),
    };
    1 + varint_len(u64::from(stream))
        + varint_len(seq)
        + kind_len
        + varint_len(u64::from(total_len))
        + varint_len(u64::from(offset))
        + varint_len(len as u64)
}

/// Writes a STREAM frame.
pub fn write_stream(w: &mut Writer<'_>, f: &StreamFrame<'_>) {
    w.u8(FRAME_STREAM);
    w.varint(u64::from(f.stream));
    w.varint(f.seq);
    match f.kind {
        MsgKind::OneWay => w.u8(0),
        MsgKind::Passing => w.u8(3),
        MsgKind::Request(id) => {
            w.u8(1);
            w.varint(id);
        }
        MsgKind::Reply(id) => {
            w.u8(2);
            w.varint(id);
        }
    }
    w.varint(u64::from(f.total_len));
    w.varint(u64::from(f.offset));
    w.varint(f.data.len() as u64);
    w.bytes(f.data);
}

/// Writes an ACK frame from inclusive ranges in descending order (at most
/// `ACK_RANGES_MAX`, non-overlapping, non-adjacent). Returns false and writes
/// nothing when `ranges` is empty.
pub fn write_ack(w: &mut Writer<'_>, delay_us: u64, ranges: &[(u64, u64)]) -> bool {
    let Some(&(low, high)) = ranges.first() else {
        return false;
    };
    let ranges = &ranges[..ranges.len().min(ACK_RANGES_MAX)];
    w.u8(FRAME_ACK);
    w.varint(high);
    w.varint(delay_us.min(VARINT_MAX));
    w.varint(ranges.len() as u64 - 1);
    w.varint(high - low);
    let mut prev_low = low;
    for &(l, h) in &ranges[1..] {
        w.varint(prev_low - h - 2);
        w.varint(h - l);
        prev_low = l;
    }
    true
}

/// Worst-case size of an ACK frame with `n` ranges.
pub fn ack_frame_len_max(n: usize) -> usize {
    1 + 8 + 8 + 8 + 8 + n.min(ACK_RANGES_MAX) * 16
}

/// Iterates the frames of a decrypted payload. Use [`validate_payload`] first,
/// or handle the error of each item.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    r: Reader<'a>,
}

/// Starts iterating the frames of `payload`.
pub fn frames(payload: &[u8]) -> Frames<'_> {
    Frames {
        r: Reader::new(payload),
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.r.is_empty() {
            return None;
        }
        let res = decode_frame(&mut self.r);
        if res.is_err() {
            // Stop after the first error.
            self.r = Reader::new(&[]);
        }
        Some(res)
    }
}

/// Checks that a whole payload parses; returns (frame count, ack-eliciting).
///
/// # Errors
/// The first decoding error.
pub fn validate_payload(payload: &[u8]) -> Result<(usize, bool), DecodeError> {
    let mut n = 0;
    let mut eliciting = false;
    for f in frames(payload) {
        let f = f?;
        eliciting |= f.is_ack_eliciting();
        n += 1;
    }
    Ok((n, eliciting))
}

fn decode_frame<'a>(r: &mut Reader<'a>) -> Result<Frame<'a>, DecodeError> {
    match r.u8()? {
        FRAME_PING => Ok(Frame::Ping),
        FRAME_HELLO => Ok(Frame::Hello),
        FRAME_CLOSE => Ok(Frame::Close),
        FRAME_CREDIT => Ok(Frame::Credit(r.varint()?)),
        FRAME_ACK => {
            let largest = r.varint()?;
            let delay_us = r.varint()?;
            let extra = r.varint()?;
            if extra as usize >= ACK_RANGES_MAX {
                return Err(DecodeError::Malformed);
            }
            let first_len = r.varint()?;
            if first_len > largest {
                return Err(DecodeError::Malformed);
            }
            let raw = r.clone();
            let mut low = largest - first_len;
            for _ in 0..extra {
                let gap = r.varint()?;
                let len = r.varint()?;
                // next high = low - gap - 2 must not underflow, nor high - len.
                let high = low
                    .checked_sub(gap)
                    .and_then(|v| v.checked_sub(2))
                    .ok_or(DecodeError::Malformed)?;
                low = high.checked_sub(len).ok_or(DecodeError::Malformed)?;
            }
            Ok(Frame::Ack(AckFrame {
                largest,
                delay_us,
                raw,
                extra,
                first_len,
            }))
        }
        FRAME_STREAM => {
            let stream = r.varint()?;
            let stream = u16::try_from(stream).map_err(|_| DecodeError::Malformed)?;
            let seq = r.varint()?;
            let kind = match r.u8()? {
                0 => MsgKind::OneWay,
                1 => MsgKind::Request(r.varint()?),
                2 => MsgKind::Reply(r.varint()?),
                3 => MsgKind::Passing,
                _ => return Err(DecodeError::Malformed),
            };
            let total_len = u32::try_from(r.varint()?).map_err(|_| DecodeError::Malformed)?;
            let offset = u32::try_from(r.varint()?).map_err(|_| DecodeError::Malformed)?;
            let len = r.varint()?;
            if u64::from(offset) + len > u64::from(total_len) {
                return Err(DecodeError::Malformed);
            }
            let data = r.bytes(len as usize)?;
            Ok(Frame::Stream(StreamFrame {
                stream,
                seq,
                kind,
                total_len,
                offset,
                data,
            }))
        }
        _ => Err(DecodeError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_rejections() {
        let h = Header {
            flags: FLAG_ENCRYPTED,
            cluster_id: 0x0102_0304_0506_0708,
            src_machine: 7,
            dst_machine: 9,
            src_epoch: 11,
            dst_epoch: 0,
            packet_number: u64::MAX,
        };
        let mut buf = [0u8; HEADER_BYTES + TAG_BYTES];
        h.encode(&mut buf);
        assert_eq!(Header::decode(&buf), Ok(h));
        assert_eq!(
            Header::decode(&buf[..HEADER_BYTES + TAG_BYTES - 1]),
            Err(DecodeError::Truncated)
        );
        buf[0] = 2;
        assert_eq!(Header::decode(&buf), Err(DecodeError::BadVersion));
        buf[0] = VERSION;
        buf[1] = 0x80;
        assert_eq!(Header::decode(&buf), Err(DecodeError::BadVersion));
    }

    #[test]
    fn varint_roundtrip_at_boundaries() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut buf = [0u8; 8];
            let mut w = Writer::new(&mut buf);
            w.varint(v);
            assert_eq!(w.len(), varint_len(v));
            let n = w.len();
            let mut r = Reader::new(&buf[..n]);
            assert_eq!(r.varint(), Ok(v));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn ack_roundtrip() {
        let ranges = [(90, 100), (50, 80), (0, 10)];
        let mut buf = [0u8; 256];
        let mut w = Writer::new(&mut buf);
        assert!(write_ack(&mut w, 123, &ranges));
        let n = w.len();
        assert!(n <= ack_frame_len_max(3));
        let mut it = frames(&buf[..n]);
        let Some(Ok(Frame::Ack(a))) = it.next() else {
            panic!("no ack")
        };
        assert_eq!(a.largest, 100);
        assert_eq!(a.delay_us, 123);
        assert_eq!(a.ranges().collect::<Vec<_>>(), ranges.to_vec());
        assert!(it.next().is_none());
    }

    #[test]
    fn stream_roundtrip_and_length_checks() {
        let data = [7u8; 100];
        let f = StreamFrame {
            stream: 3,
            seq: 1000,
            kind: MsgKind::Request(77),
            total_len: 300,
            offset: 200,
            data: &data,
        };
        let mut buf = [0u8; 256];
        let mut w = Writer::new(&mut buf);
        write_stream(&mut w, &f);
        let n = w.len();
        assert_eq!(
            n,
            stream_frame_header_len(3, 1000, f.kind, 300, 200, 100) + 100
        );
        let got: Vec<_> = frames(&buf[..n]).collect();
        assert!(matches!(&got[..], [Ok(Frame::Stream(g))] if *g == f));
        for kind in [MsgKind::OneWay, MsgKind::Passing, MsgKind::Reply(5)] {
            let f = StreamFrame { kind, ..f };
            let mut other = [0u8; 256];
            let mut w = Writer::new(&mut other);
            write_stream(&mut w, &f);
            let n = w.len();
            let got: Vec<_> = frames(&other[..n]).collect();
            assert!(
                matches!(&got[..], [Ok(Frame::Stream(g))] if *g == f),
                "{kind:?}"
            );
        }
        // Truncated data.
        assert!(validate_payload(&buf[..n - 1]).is_err());
        // Fragment past the end of the message.
        let bad = StreamFrame { offset: 201, ..f };
        let mut w = Writer::new(&mut buf);
        write_stream(&mut w, &bad);
        let n = w.len();
        assert_eq!(validate_payload(&buf[..n]), Err(DecodeError::Malformed));
    }

    #[test]
    fn malformed_ack_is_rejected() {
        // largest 5, first range 10 > largest
        let mut buf = [0u8; 32];
        let mut w = Writer::new(&mut buf);
        w.u8(FRAME_ACK);
        w.varint(5);
        w.varint(0);
        w.varint(0);
        w.varint(10);
        let n = w.len();
        assert_eq!(validate_payload(&buf[..n]), Err(DecodeError::Malformed));
        // gap underflow
        let mut w = Writer::new(&mut buf);
        w.u8(FRAME_ACK);
        w.varint(5);
        w.varint(0);
        w.varint(1);
        w.varint(2);
        w.varint(5);
        w.varint(0);
        let n = w.len();
        assert_eq!(validate_payload(&buf[..n]), Err(DecodeError::Malformed));
        assert_eq!(validate_payload(&[0xEE]), Err(DecodeError::Malformed));
    }
}
