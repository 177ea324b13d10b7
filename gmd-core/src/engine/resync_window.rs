//! How much resync data the source keeps in flight.
//!
//! The reference kept a fixed `sync_rate_kib` (32 KiB) in flight: one 32 KiB
//! region per round trip, 0.6 MiB/s at 50 ms whatever the link. Here the
//! window follows the link: [`LINK_WINDOW_MULTIPLE`] times the congestion
//! window GeoMessage reports for the peer
//! ([`crate::mirror::PeerLink::window_hint`]). The congestion window is the
//! link's own estimate of rate × round trip; a multiple of it keeps the
//! link, not the resync, the limit (GeoMessage grows its window only while
//! it is used), and what is on the wire stays bounded by the link's own
//! congestion control (the rest waits in its send buffer). Four, not two:
//! a lost datagram holds up the ordered stream for a round trip while the
//! link's flight is acknowledged, so with twice the window the link saw
//! itself idle and stopped growing; at 0.5 % loss on a 50 ms link the
//! resync went from 0.12 to 0.41 of the link (bench/RESULTS.md). `sync_rate_kib`, when a person sets it, caps the
//! window; it never goes below one region ([`WINDOW_FLOOR_BYTES`]).

use crate::units::REGION_SIZE_BYTES;

/// The resync window in congestion windows of the link.
pub const LINK_WINDOW_MULTIPLE: u64 = 4;

/// Smallest window: one region, the reference's 32 KiB.
pub const WINDOW_FLOOR_BYTES: u64 = REGION_SIZE_BYTES;

/// Resync bytes in flight allowed now.
///
/// - `adaptive`: the window follows `link_window` (the peer link's
///   congestion window, bytes, `None` while it has none); without a hint it
///   is the floor, so nothing bursts before the link has measured itself.
/// - not `adaptive` (a fixed window, as in the reference): `cap`.
///
/// `cap` bounds the result in both cases (the person's `sync_rate_kib`, or
/// the resync slots when unset); never below one region.
pub fn resync_window(adaptive: bool, cap: u64, link_window: Option<u64>) -> u64 {
    let want = if adaptive {
        link_window.map_or(WINDOW_FLOOR_BYTES, |w| {
            w.saturating_mul(LINK_WINDOW_MULTIPLE)
        })
    } else {
        cap
    };
    want.min(cap).max(WINDOW_FLOOR_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn follows_a_multiple_of_the_link_window_under_the_cap() {
        // 200 Mbit/s × 50 ms ≈ 1.25 MB of congestion window.
        let bdp = 1_250_000;
        assert_eq!(resync_window(true, 8 * MIB, Some(bdp)), 4 * bdp);
        assert_eq!(resync_window(true, MIB, Some(bdp)), MIB);
    }

    #[test]
    fn the_reference_32_kib_stays_32_kib() {
        assert_eq!(resync_window(true, 32 << 10, Some(10 * MIB)), 32 << 10);
        assert_eq!(resync_window(false, 32 << 10, None), 32 << 10);
    }

    #[test]
    fn no_hint_means_one_region_not_the_cap() {
        assert_eq!(resync_window(true, 8 * MIB, None), WINDOW_FLOOR_BYTES);
    }

    #[test]
    fn never_below_one_region() {
        assert_eq!(resync_window(true, 8 * MIB, Some(1000)), WINDOW_FLOOR_BYTES);
        assert_eq!(resync_window(false, 1024, None), WINDOW_FLOOR_BYTES);
    }

    #[test]
    fn fixed_window_ignores_the_link() {
        assert_eq!(resync_window(false, 2 * MIB, Some(100 * MIB)), 2 * MIB);
        assert_eq!(resync_window(false, 2 * MIB, Some(1)), 2 * MIB);
    }
}
