//! What a copy tells its peer in a handshake, read from its state map: the
//! one place that turns a map and its generations into facts and region
//! sets, for the daemon and the simulator alike.

use super::decide::SideFacts;
use super::regions::Regions;
use crate::generations::Generations;
use crate::statemap::cells::{CELL_RESYNC, CELL_STALE, StateMap};

/// Where the map comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSource {
    /// A running engine's map: its hot cells (every write acknowledged) are
    /// given apart, to be skipped by the peer that acknowledged them.
    Running,
    /// A map read from disk: after a crash a hot cell may hide a cut
    /// write, so every non-zero cell is a mark.
    Disk,
}

/// The facts and region sets of a copy with map `cells` and durable
/// generations `gens` on `machine`: (facts, marks, hot regions). The caller
/// sets [`SideFacts::ran_primary`] from its superblock.
pub fn offer_parts(
    machine: &str,
    primary: bool,
    gens: Generations,
    cells: &StateMap,
    source: MapSource,
) -> (SideFacts, Regions, Regions) {
    let running = source == MapSource::Running;
    let marks = Regions::from_bits(&cells.resync_bits(running));
    let hot = if running {
        Regions::from_bits(&cells.hot_bits())
    } else {
        Regions::new()
    };
    let facts = SideFacts {
        machine: machine.to_owned(),
        primary,
        gens,
        stale: cells.count_value(CELL_STALE),
        not_received: cells.count_value(CELL_RESYNC),
        marked: marks.count(),
        ran_primary: false,
    };
    (facts, marks, hot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statemap::cells::{CELL_ACTIVE, CELL_INCONSISTENT};
    use crate::units::REGION_SIZE_BYTES;

    #[test]
    fn hot_cells_are_apart_only_in_a_running_map() {
        let mut cells = StateMap::new(64 * REGION_SIZE_BYTES);
        cells.set(1, CELL_STALE);
        cells.set(2, CELL_ACTIVE);
        cells.set(3, CELL_RESYNC);
        cells.set(4, CELL_INCONSISTENT);
        let g = Generations::default();
        let (f, marks, hot) = offer_parts("a", true, g, &cells, MapSource::Running);
        assert_eq!((f.stale, f.not_received, f.marked), (1, 1, 3));
        assert_eq!(marks.runs().collect::<Vec<_>>(), vec![1..2, 3..5]);
        assert_eq!(hot.runs().collect::<Vec<_>>(), vec![2..3]);
        let (f, marks, hot) = offer_parts("a", true, g, &cells, MapSource::Disk);
        assert_eq!(f.marked, 4);
        assert_eq!(marks.count(), 4);
        assert!(hot.is_empty());
    }
}
