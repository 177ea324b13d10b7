//! Sets of regions as sorted runs, the form in which maps cross the wire in
//! the handshake: a map's marks are clustered (a file, a hot database
//! table), so runs are small where a bitmap of a large device is not.
//!
//! On the wire a set is one string, `"r1:"` and the base64 of a LEB128
//! varint pair per run (the gap since the previous run's end, the run's
//! length): about 3 bytes for a lone region of a 4 TiB device, where
//! `[123456789,123456790]` takes 22 and a bitmap 16 MiB. A JSON array of
//! `[start, end]` pairs is read too.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of regions of a device, as sorted, disjoint, non-adjacent runs
/// `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Regions {
    runs: Vec<[u64; 2]>,
}

/// Prefix of the packed form (its version).
const PACKED_PREFIX: &str = "r1:";

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or("a run is cut short")?;
        *bytes = rest;
        let low = u64::from(b & 0x7f);
        if shift == 63 && low > 1 {
            return Err("a number does not fit in 64 bits".into());
        }
        v |= low << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a number does not fit in 64 bits".into())
}

impl Regions {
    /// The packed wire form (see the module documentation).
    pub fn to_packed(&self) -> String {
        let mut bytes = Vec::with_capacity(self.runs.len() * 3);
        let mut prev_end = 0;
        for &[start, end] in &self.runs {
            put_varint(&mut bytes, start.saturating_sub(prev_end));
            put_varint(&mut bytes, end.saturating_sub(start));
            prev_end = end;
        }
        let mut out = String::from(PACKED_PREFIX);
        base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(&bytes, &mut out);
        out
    }

    /// Reads the packed wire form. The runs are not checked against a
    /// device: do that with [`Regions::is_valid_for`].
    ///
    /// # Errors
    /// Not the packed form, bad base64, a cut varint, or a run past 2^64.
    pub fn from_packed(text: &str) -> Result<Regions, String> {
        let body = text
            .strip_prefix(PACKED_PREFIX)
            .ok_or_else(|| format!("a region set must start with {PACKED_PREFIX:?}"))?;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(body)
            .map_err(|e| format!("a region set is not base64: {e}"))?;
        let mut rest = bytes.as_slice();
        let mut runs = Vec::new();
        let mut prev_end = 0u64;
        while !rest.is_empty() {
            let gap = take_varint(&mut rest)?;
            let len = take_varint(&mut rest)?;
            let start = prev_end.checked_add(gap).ok_or("a run starts past 2^64")?;
            let end = start.checked_add(len).ok_or("a run ends past 2^64")?;
            runs.push([start, end]);
            prev_end = end;
        }
        Ok(Regions { runs })
    }
}

impl Serialize for Regions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_packed())
    }
}

impl<'de> Deserialize<'de> for Regions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Packed(String),
            Runs(Vec<[u64; 2]>),
        }
        match Wire::deserialize(deserializer)? {
            Wire::Packed(text) => Regions::from_packed(&text).map_err(serde::de::Error::custom),
            Wire::Runs(runs) => Ok(Regions { runs }),
        }
    }
}

impl Regions {
    /// The empty set.
    pub fn new() -> Self {
        Regions::default()
    }

    /// Every region of a device of `region_count` regions.
    pub fn all(region_count: u64) -> Self {
        let mut r = Regions::new();
        if region_count > 0 {
            r.runs.push([0, region_count]);
        }
        r
    }

    /// The set of a bitmap (bit `r % 8` of byte `r / 8`, as
    /// [`crate::statemap::StateMap::resync_bits`] makes).
    pub fn from_bits(bits: &[u8]) -> Self {
        let mut r = Regions::new();
        for (i, &byte) in bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for b in 0..8 {
                if byte & (1 << b) != 0 {
                    r.push(i as u64 * 8 + b);
                }
            }
        }
        r
    }

    /// Adds `region`, which must not be below any region already in the set.
    fn push(&mut self, region: u64) {
        match self.runs.last_mut() {
            Some(last) if last[1] == region => last[1] += 1,
            Some(last) if last[1] > region => {
                debug_assert!(region >= last[0], "regions pushed in order");
            }
            _ => self.runs.push([region, region + 1]),
        }
    }

    /// The set as a bitmap for a device of `region_count` regions (regions
    /// beyond it are dropped).
    pub fn to_bits(&self, region_count: u64) -> Vec<u8> {
        let mut bits = vec![0u8; region_count.div_ceil(8) as usize];
        for &[start, end] in &self.runs {
            for r in start..end.min(region_count) {
                bits[(r / 8) as usize] |= 1 << (r % 8);
            }
        }
        bits
    }

    /// Number of regions.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|[s, e]| e - s).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether every run is well formed and inside a device of
    /// `region_count` regions (sets from the wire are checked with this).
    pub fn is_valid_for(&self, region_count: u64) -> bool {
        let mut prev_end = None;
        for &[start, end] in &self.runs {
            if start >= end || end > region_count || prev_end.is_some_and(|p| start <= p) {
                return false;
            }
            prev_end = Some(end);
        }
        true
    }

    /// The union of two sets.
    pub fn union(&self, other: &Regions) -> Regions {
        let mut all: Vec<[u64; 2]> = self.runs.iter().chain(&other.runs).copied().collect();
        all.sort_unstable();
        let mut out = Regions::new();
        for [start, end] in all {
            match out.runs.last_mut() {
                Some(last) if start <= last[1] => last[1] = last[1].max(end),
                _ => out.runs.push([start, end]),
            }
        }
        out
    }

    /// The runs.
    pub fn runs(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.runs.iter().map(|&[s, e]| s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bits_become_runs_and_back() {
        let bits = [0b1000_0111u8, 0b0000_0001, 0, 0b1000_0000];
        let r = Regions::from_bits(&bits);
        assert_eq!(r.runs().collect::<Vec<_>>(), vec![0..3, 7..9, 31..32]);
        assert_eq!(r.count(), 6);
        assert_eq!(r.to_bits(32), bits.to_vec());
        assert!(r.is_valid_for(32) && !r.is_valid_for(31));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("\"{}\"", r.to_packed()));
        assert_eq!(serde_json::from_str::<Regions>(&json).unwrap(), r);
        let runs: Regions = serde_json::from_str("[[0,3],[7,9],[31,32]]").unwrap();
        assert_eq!(runs, r);
    }

    /// One region in every hundred of a 4 TiB device (1.3 million lone
    /// regions) fits a GeoMessage message (16 MiB) with room to spare.
    #[test]
    fn scattered_marks_of_a_4_tib_device_pack_small() {
        let regions = 4u64 << 40 >> 15;
        let mut bits = vec![0u8; (regions / 8) as usize];
        for r in (0..regions).step_by(100) {
            bits[(r / 8) as usize] |= 1 << (r % 8);
        }
        let set = Regions::from_bits(&bits);
        assert_eq!(set.count(), regions.div_ceil(100));
        let json = serde_json::to_vec(&set).unwrap();
        assert!(json.len() < 4 << 20, "{} bytes", json.len());
        let back: Regions = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, set);
        assert!(back.is_valid_for(regions));
    }

    #[test]
    fn malformed_packed_sets_are_refused() {
        for bad in ["[[0,1]", "\"x1:AAA\"", "\"r1:!!\"", "\"r1:gA\""] {
            assert!(serde_json::from_str::<Regions>(bad).is_err(), "{bad}");
        }
        // Eleven continuation bytes: a number past 64 bits.
        let long = base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xffu8; 11]);
        assert!(Regions::from_packed(&format!("r1:{long}")).is_err());
        // A gap that overflows the previous end.
        let mut bytes = Vec::new();
        put_varint(&mut bytes, u64::MAX - 1);
        put_varint(&mut bytes, 1);
        put_varint(&mut bytes, 5);
        put_varint(&mut bytes, 1);
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes);
        assert!(Regions::from_packed(&format!("r1:{text}")).is_err());
        // Well formed but empty or adjacent runs: read, then refused by
        // the device check.
        let mut bytes = Vec::new();
        for v in [0, 4, 0, 4] {
            put_varint(&mut bytes, v);
        }
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes);
        let adjacent = Regions::from_packed(&format!("r1:{text}")).unwrap();
        assert!(!adjacent.is_valid_for(100));
    }

    #[test]
    fn malformed_sets_from_the_wire_are_invalid() {
        let bad: Regions = serde_json::from_str("[[5,3]]").unwrap();
        assert!(!bad.is_valid_for(100));
        let overlapping: Regions = serde_json::from_str("[[0,5],[4,8]]").unwrap();
        assert!(!overlapping.is_valid_for(100));
        let adjacent_is_fine: Regions = serde_json::from_str("[[0,4],[5,8]]").unwrap();
        assert!(adjacent_is_fine.is_valid_for(100));
    }

    proptest! {
        #[test]
        fn union_is_the_or_of_the_bitmaps(a in proptest::collection::vec(any::<u8>(), 0..16),
                                          b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let n = 16 * 8;
            let u = Regions::from_bits(&a).union(&Regions::from_bits(&b));
            prop_assert!(u.is_valid_for(n));
            let mut expected = vec![0u8; 16];
            for (i, x) in a.iter().enumerate() { expected[i] |= x; }
            for (i, x) in b.iter().enumerate() { expected[i] |= x; }
            prop_assert_eq!(u.to_bits(n), expected);
        }

        #[test]
        fn packed_sets_read_back_the_same(a in proptest::collection::vec(any::<u8>(), 0..64),
                                          base in 0u64..(1 << 40)) {
            let set = Regions::from_bits(&a);
            let shifted = Regions {
                runs: set.runs.iter().map(|&[s, e]| [s + base, e + base]).collect(),
            };
            prop_assert_eq!(Regions::from_packed(&shifted.to_packed()).unwrap(), shifted);
        }
    }
}
