//! Sets of regions as sorted runs, the form in which maps cross the wire in
//! the handshake: a map's marks are clustered (a file, a hot database
//! table), so runs are small where a bitmap of a large device is not.

/// A set of regions of a device, as sorted, disjoint, non-adjacent runs
/// `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Regions {
    runs: Vec<[u64; 2]>,
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
        assert_eq!(serde_json::to_string(&r).unwrap(), "[[0,3],[7,9],[31,32]]");
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
    }
}
