//! Resynchronisation, source side: which regions remain to be sent, which
//! are being read or are on the wire, and how many may be in flight.
//!
//! Regions are sent in ascending order, except those the target asks for
//! first (an application there waits for them). A region is not read while
//! application writes to it are in flight, and application writes to a
//! region being read wait until its data is queued on the mirror stream, so
//! older resync data can never overtake a newer write on the target.

use std::collections::VecDeque;

/// Most target requests remembered at once.
const PRIORITY_MAX: usize = 256;

/// One region bitmap.
#[derive(Clone, Debug)]
pub(super) struct RegionBits {
    words: Vec<u64>,
    count: u64,
}

impl RegionBits {
    pub(super) fn new(regions: u64) -> Self {
        RegionBits {
            words: vec![0; regions.div_ceil(64) as usize],
            count: 0,
        }
    }

    pub(super) fn get(&self, region: u64) -> bool {
        self.words
            .get((region / 64) as usize)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    pub(super) fn set(&mut self, region: u64) {
        let word = &mut self.words[(region / 64) as usize];
        let bit = 1 << (region % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.count += 1;
        }
    }

    pub(super) fn clear(&mut self, region: u64) {
        let word = &mut self.words[(region / 64) as usize];
        let bit = 1 << (region % 64);
        if *word & bit != 0 {
            *word &= !bit;
            self.count -= 1;
        }
    }

    pub(super) fn count(&self) -> u64 {
        self.count
    }

    /// The first set region at or after `from`, if any.
    pub(super) fn next_from(&self, from: u64) -> Option<u64> {
        let mut index = (from / 64) as usize;
        if index >= self.words.len() {
            return None;
        }
        let mut word = self.words[index] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some(index as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            index += 1;
            if index >= self.words.len() {
                return None;
            }
            word = self.words[index];
        }
    }
}

/// Resync in progress on the source.
#[derive(Debug)]
pub(super) struct ResyncSource {
    /// Regions still to be confirmed by the target.
    pub(super) pending: RegionBits,
    /// Regions being read or on the wire (not to be picked again).
    pub(super) busy: RegionBits,
    /// Busy regions whose local copy changed outside the mirror stream after
    /// their data was read (a write failed here): sent again once confirmed.
    pub(super) resend: RegionBits,
    /// Regions whose read failed: tried again from `retry_at_ms` on.
    failed: RegionBits,
    retry_at_ms: u64,
    /// Consecutive rounds of failed reads (sets the back-off).
    failed_rounds: u32,
    cursor: u64,
    priority: VecDeque<u64>,
    /// Resync data bytes read or on the wire.
    pub(super) in_flight_bytes: u64,
    /// Regions at the start.
    pub(super) total: u64,
    /// Checksum resync: a region goes as its checksum first.
    pub(super) checks: bool,
    /// Regions whose checksum the target found different: their data goes.
    pub(super) send_data: RegionBits,
    /// Checksums on the wire, not yet answered.
    pub(super) checks_in_flight: usize,
}

impl ResyncSource {
    pub(super) fn new(pending: RegionBits) -> Self {
        let regions = pending.words.len() as u64 * 64;
        ResyncSource {
            total: pending.count(),
            busy: RegionBits::new(regions),
            resend: RegionBits::new(regions),
            send_data: RegionBits::new(regions),
            checks: false,
            checks_in_flight: 0,
            failed: RegionBits::new(regions),
            retry_at_ms: 0,
            failed_rounds: 0,
            pending,
            cursor: 0,
            priority: VecDeque::with_capacity(PRIORITY_MAX),
            in_flight_bytes: 0,
        }
    }

    /// The target asks for `region` first.
    pub(super) fn prioritize(&mut self, region: u64) {
        if self.pending.get(region)
            && !self.priority.contains(&region)
            && self.priority.len() < PRIORITY_MAX
        {
            self.priority.push_back(region);
        }
    }

    /// The read of `region` failed at `now_ms`: it stays to be sent and is
    /// tried again after a back-off (1 s doubling to 1 min), other regions
    /// going on meanwhile. Returns the back-off.
    pub(super) fn read_failed(&mut self, region: u64, now_ms: u64) -> u64 {
        self.busy.clear(region);
        self.failed.set(region);
        let backoff = (1000u64 << self.failed_rounds.min(6)).min(60_000);
        if self.retry_at_ms <= now_ms {
            self.failed_rounds = self.failed_rounds.saturating_add(1);
            self.retry_at_ms = now_ms + backoff;
        }
        backoff
    }

    /// Regions whose read failed and that wait for their retry.
    pub(super) fn failed_count(&self) -> u64 {
        self.failed.count()
    }

    /// Lets failed regions be read again once their back-off passed.
    pub(super) fn retry_due(&mut self, now_ms: u64) {
        if self.failed.count() > 0 && now_ms >= self.retry_at_ms {
            self.failed = RegionBits::new(self.pending.words.len() as u64 * 64);
        }
    }

    /// A read succeeded: the back-off starts over.
    pub(super) fn read_succeeded(&mut self) {
        if self.failed.count() == 0 {
            self.failed_rounds = 0;
        }
    }

    /// The next region to read, skipping those `skip` rejects (busy with
    /// application writes) and those waiting to retry a failed read; scans
    /// at most once around.
    pub(super) fn next(&mut self, skip: impl Fn(u64) -> bool) -> Option<u64> {
        let failed = &self.failed;
        let skip = |r: u64| failed.get(r) || skip(r);
        while let Some(region) = self.priority.pop_front() {
            if self.pending.get(region) && !self.busy.get(region) && !skip(region) {
                return Some(region);
            }
        }
        let start = self.cursor;
        let mut from = start;
        let mut wrapped = false;
        loop {
            match self.pending.next_from(from) {
                Some(region) if wrapped && region >= start => return None,
                Some(region) => {
                    if !self.busy.get(region) && !skip(region) {
                        self.cursor = region + 1;
                        return Some(region);
                    }
                    from = region + 1;
                }
                None if wrapped => return None,
                None => {
                    wrapped = true;
                    from = 0;
                }
            }
        }
    }

    /// Adds a region to send (one that became stale during the session);
    /// whether it was not to be sent already.
    pub(super) fn add(&mut self, region: u64) -> bool {
        if self.pending.get(region) {
            return false;
        }
        self.pending.set(region);
        self.total += 1;
        true
    }

    /// Regions not yet confirmed.
    pub(super) fn remaining(&self) -> u64 {
        self.pending.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_in_order_priority_first_and_skip_busy_ones() {
        let mut bits = RegionBits::new(200);
        for r in [3, 70, 71, 150] {
            bits.set(r);
        }
        let mut rs = ResyncSource::new(bits);
        assert_eq!(rs.total, 4);
        rs.prioritize(150);
        assert_eq!(rs.next(|_| false), Some(150));
        rs.busy.set(150);
        assert_eq!(rs.next(|r| r == 3), Some(70));
        rs.busy.set(70);
        assert_eq!(rs.next(|r| r == 3), Some(71));
        rs.busy.set(71);
        assert_eq!(rs.next(|r| r == 3), None, "3 is skipped, the rest busy");
        assert_eq!(rs.next(|_| false), Some(3), "wraps around to it");
    }

    #[test]
    fn next_from_finds_set_bits() {
        let mut bits = RegionBits::new(200);
        bits.set(0);
        bits.set(9);
        bits.set(130);
        assert_eq!(bits.next_from(1), Some(9));
        assert_eq!(bits.next_from(10), Some(130));
        assert_eq!(bits.next_from(131), None);
        bits.clear(9);
        assert_eq!(bits.count(), 2);
    }
}
