//! Keys, sealing and the replay window.
//!
//! The cluster's pre-shared key never touches the wire. HKDF-SHA256 extracts a
//! master secret from it (salted with the cluster id), and every session
//! direction gets its own AES-256-GCM key expanded with
//! `(src machine, src epoch, dst machine, dst epoch)` as info. Because a key
//! is used by exactly one sender in one session, the 64-bit packet number is
//! a unique nonce. With encryption off, ChaCha20-Poly1305 (RFC 8439, its own
//! key expanded alongside the AES key, the same nonce) with the whole
//! datagram as associated data and nothing to encrypt authenticates it
//! instead: a Poly1305 tag under a one-time key, 16 bytes.

use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::wire::{HEADER_BYTES, TAG_BYTES};

/// The per-cluster secret from which session keys are derived.
pub struct MasterKey {
    prk: hkdf::Prk,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// One direction of one session.
pub struct SessionKey {
    key: LessSafeKey,
    /// Key of the authentication-only mode: ChaCha20-Poly1305 over associated
    /// data alone. Per 1 400-byte datagram (seal + open, `gmd-net-bench
    /// crypto`) it costs about a third of the BLAKE3 keyed hash used before
    /// on an AES-NI host and half of it in an emulated (TCG) guest, where it
    /// also costs a third of AES-GCM; ring's AES-GCM hashes associated data
    /// a block at a time, which made GMAC slower than encrypting.
    auth: LessSafeKey,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Identifies one direction of one session for key derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionIds {
    /// Sending machine id.
    pub src_machine: u32,
    /// Sender's epoch.
    pub src_epoch: u64,
    /// Receiving machine id.
    pub dst_machine: u32,
    /// Receiver's epoch as known to the sender (0 = unknown).
    pub dst_epoch: u64,
}

struct Len64;
impl hkdf::KeyType for Len64 {
    fn len(&self) -> usize {
        64
    }
}

impl MasterKey {
    /// Extracts the master secret from the pre-shared key.
    pub fn new(psk: &[u8], cluster_id: u64) -> Self {
        let mut salt = Vec::with_capacity(24);
        salt.extend_from_slice(b"gmd-net v1 salt\0");
        salt.extend_from_slice(&cluster_id.to_be_bytes());
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(psk);
        MasterKey { prk }
    }

    /// Derives the key of one session direction.
    pub fn session(&self, ids: SessionIds) -> SessionKey {
        let mut info = [0u8; 8 + 4 + 8 + 4 + 8];
        info[..8].copy_from_slice(b"gmd-pkt1");
        info[8..12].copy_from_slice(&ids.src_machine.to_be_bytes());
        info[12..20].copy_from_slice(&ids.src_epoch.to_be_bytes());
        info[20..24].copy_from_slice(&ids.dst_machine.to_be_bytes());
        info[24..32].copy_from_slice(&ids.dst_epoch.to_be_bytes());
        let mut out = [0u8; 64];
        self.prk
            .expand(&[&info], Len64)
            .and_then(|okm| okm.fill(&mut out))
            .expect("64 bytes is a valid HKDF-SHA256 output length");
        let key = UnboundKey::new(&AES_256_GCM, &out[..32]).expect("32-byte AES-256 key");
        let auth = UnboundKey::new(&CHACHA20_POLY1305, &out[32..]).expect("32-byte ChaCha20 key");
        SessionKey {
            key: LessSafeKey::new(key),
            auth: LessSafeKey::new(auth),
        }
    }
}

fn nonce(packet_number: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&packet_number.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl SessionKey {
    /// Seals a datagram in place: `datagram` holds header and payload, and has
    /// `TAG_BYTES` of room at the end for the tag (its length includes them).
    ///
    /// # Panics
    /// If `datagram` is shorter than header + tag.
    pub fn seal(&self, packet_number: u64, datagram: &mut [u8], encrypt: bool) {
        let n = datagram.len();
        assert!(n >= HEADER_BYTES + TAG_BYTES, "datagram too short to seal");
        let (body, tag_out) = datagram.split_at_mut(n - TAG_BYTES);
        if encrypt {
            let (hdr, payload) = body.split_at_mut(HEADER_BYTES);
            let tag = self
                .key
                .seal_in_place_separate_tag(nonce(packet_number), Aad::from(&*hdr), payload)
                .expect("AES-GCM sealing cannot fail below its length limit");
            tag_out.copy_from_slice(tag.as_ref());
        } else {
            let tag = self
                .auth
                .seal_in_place_separate_tag(nonce(packet_number), Aad::from(&*body), &mut [])
                .expect("ChaCha20-Poly1305 sealing cannot fail below its length limit");
            tag_out.copy_from_slice(tag.as_ref());
        }
    }

    /// Verifies (and decrypts) a datagram in place. On success the payload is
    /// `datagram[HEADER_BYTES..len - TAG_BYTES]` in clear text.
    ///
    /// # Errors
    /// `Err(())` when the tag does not verify (wrong key, forgery, corruption).
    #[allow(clippy::result_unit_err)]
    pub fn open(&self, packet_number: u64, datagram: &mut [u8], encrypted: bool) -> Result<(), ()> {
        let n = datagram.len();
        if n < HEADER_BYTES + TAG_BYTES {
            return Err(());
        }
        if encrypted {
            let (hdr, rest) = datagram.split_at_mut(HEADER_BYTES);
            self.key
                .open_in_place(nonce(packet_number), Aad::from(&*hdr), rest)
                .map(|_| ())
                .map_err(|_| ())
        } else {
            let (body, tag) = datagram.split_at(n - TAG_BYTES);
            // Nothing was encrypted: the tag alone is the "ciphertext", and
            // ring compares it in constant time.
            let mut tag_only = [0u8; TAG_BYTES];
            tag_only.copy_from_slice(tag);
            self.auth
                .open_in_place(nonce(packet_number), Aad::from(body), &mut tag_only)
                .map(|_| ())
                .map_err(|_| ())
        }
    }
}

/// Bits of the replay window: packets this far behind the highest seen are
/// rejected outright.
pub const REPLAY_WINDOW_PACKETS: u64 = 8192;
const REPLAY_WORDS: usize = (REPLAY_WINDOW_PACKETS / 64) as usize;

/// Sliding-window replay detector over packet numbers of one session
/// (RFC 4303 §3.4.3 style). 1 KiB of state.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One past the highest packet number accepted; 0 = none yet.
    top: u64,
    bits: Box<[u64; REPLAY_WORDS]>,
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplayWindow(top={})", self.top)
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: 0,
            bits: Box::new([0; REPLAY_WORDS]),
        }
    }
}

impl ReplayWindow {
    /// True when `pn` would be accepted (not seen, not too old). Does not record.
    pub fn check(&self, pn: u64) -> bool {
        if pn >= self.top {
            return true;
        }
        if self.top - pn > REPLAY_WINDOW_PACKETS {
            return false;
        }
        let (w, b) = Self::slot(pn);
        self.bits[w] & (1 << b) == 0
    }

    /// Records `pn` as seen; call only after the datagram authenticated and
    /// `check` passed.
    pub fn record(&mut self, pn: u64) {
        if pn >= self.top {
            let advance = pn + 1 - self.top;
            if advance >= REPLAY_WINDOW_PACKETS {
                self.bits.fill(0);
            } else {
                for p in self.top..=pn {
                    let (w, b) = Self::slot(p);
                    self.bits[w] &= !(1 << b);
                }
            }
            self.top = pn + 1;
        }
        let (w, b) = Self::slot(pn);
        self.bits[w] |= 1 << b;
    }

    fn slot(pn: u64) -> (usize, u32) {
        let i = pn % REPLAY_WINDOW_PACKETS;
        ((i / 64) as usize, (i % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> SessionIds {
        SessionIds {
            src_machine: 1,
            src_epoch: 2,
            dst_machine: 3,
            dst_epoch: 4,
        }
    }

    #[test]
    fn seal_open_roundtrip_both_modes() {
        let mk = MasterKey::new(&[5u8; 32], 99);
        let k = mk.session(ids());
        for encrypt in [true, false] {
            let mut d = vec![0u8; HEADER_BYTES + 10 + TAG_BYTES];
            d[HEADER_BYTES..HEADER_BYTES + 10].copy_from_slice(b"0123456789");
            k.seal(7, &mut d, encrypt);
            assert_eq!(
                &d[HEADER_BYTES..HEADER_BYTES + 10] == b"0123456789",
                !encrypt
            );
            let mut c = d.clone();
            assert!(k.open(7, &mut c, encrypt).is_ok());
            assert_eq!(&c[HEADER_BYTES..HEADER_BYTES + 10], b"0123456789");
            // wrong nonce, wrong mode, tampered header
            assert!(k.open(8, &mut d.clone(), encrypt).is_err());
            assert!(k.open(7, &mut d.clone(), !encrypt).is_err());
            // Any flipped bit, in header, payload or tag, fails.
            for at in [5, HEADER_BYTES + 3, d.len() - 1] {
                let mut t = d.clone();
                t[at] ^= 1;
                assert!(k.open(7, &mut t, encrypt).is_err(), "byte {at}");
            }
        }
    }

    #[test]
    fn replay_window_rejects_repeats_and_ancient() {
        let mut w = ReplayWindow::default();
        for pn in [0u64, 1, 5, 3] {
            assert!(w.check(pn));
            w.record(pn);
            assert!(!w.check(pn));
        }
        assert!(w.check(2) && w.check(4));
        w.record(REPLAY_WINDOW_PACKETS + 10);
        assert!(!w.check(2), "too old");
        assert!(w.check(REPLAY_WINDOW_PACKETS + 9));
        assert!(!w.check(REPLAY_WINDOW_PACKETS + 10));
        w.record(REPLAY_WINDOW_PACKETS * 5);
        assert!(w.check(REPLAY_WINDOW_PACKETS * 5 - 1));
    }
}
