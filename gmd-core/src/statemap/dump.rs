//! Machine-readable map files (`gmdctl show-state --dump FILE`) and their
//! human-readable rendering (`cell value` lines with `*` for repeats, as the
//! reference's `gmd_show_state`).
//!
//! A map file is: magic `GMDDUMP1`, device UUID (16 bytes), device size,
//! region size (u64 LE each), the packed cells, then a CRC32 of all of it.

use std::fmt::Write as _;

use uuid::Uuid;

use super::cells::{CellClass, StateMap};
use crate::units::REGION_SIZE_BYTES;

const DUMP_MAGIC: [u8; 8] = *b"GMDDUMP1";
const DUMP_HEADER: usize = 8 + 16 + 8 + 8;

/// Why a map file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    /// Not a gmd map file.
    #[error("not a gmd map file (bad magic)")]
    BadMagic,
    /// Shorter than its header says.
    #[error("map file is truncated")]
    Truncated,
    /// The checksum does not match.
    #[error("map file checksum mismatch")]
    BadChecksum,
    /// Written with another region size.
    #[error("map file uses region size {0}, this gmd uses {REGION_SIZE_BYTES}")]
    RegionSize(u64),
}

/// Serialises a map and the UUID of its device into a map file.
pub fn encode(uuid: &Uuid, map: &StateMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(DUMP_HEADER + map.packed().len() + 4);
    out.extend_from_slice(&DUMP_MAGIC);
    out.extend_from_slice(uuid.as_bytes());
    out.extend_from_slice(&map.size_bytes().to_le_bytes());
    out.extend_from_slice(&REGION_SIZE_BYTES.to_le_bytes());
    out.extend_from_slice(map.packed());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a map file back.
///
/// # Errors
/// [`DumpError`] when the bytes are not an intact map file.
pub fn decode(bytes: &[u8]) -> Result<(Uuid, StateMap), DumpError> {
    if bytes.len() < 8 || bytes[..8] != DUMP_MAGIC {
        return Err(DumpError::BadMagic);
    }
    if bytes.len() < DUMP_HEADER + 4 {
        return Err(DumpError::Truncated);
    }
    let size = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    let region = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
    if region != REGION_SIZE_BYTES {
        return Err(DumpError::RegionSize(region));
    }
    let packed_len = crate::units::region_count(size).div_ceil(2);
    let expected = (DUMP_HEADER as u64)
        .checked_add(packed_len)
        .and_then(|n| n.checked_add(4))
        .ok_or(DumpError::Truncated)?;
    if bytes.len() as u64 != expected {
        return Err(DumpError::Truncated);
    }
    let body = &bytes[..bytes.len() - 4];
    let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(body) != crc {
        return Err(DumpError::BadChecksum);
    }
    let uuid = Uuid::from_slice(&bytes[8..24]).expect("16 bytes");
    let map =
        StateMap::from_packed(size, body[DUMP_HEADER..].to_vec()).expect("length checked above");
    Ok((uuid, map))
}

/// Summary line figures of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapSummary {
    /// Number of cells.
    pub cells: u64,
    /// Cells with value 0xf.
    pub stale: u64,
    /// Cells with values 0x1–0x4, 0x6, 0x7: writes in flight, regions being
    /// resynchronised, or left over from a crash.
    pub inconsistent: u64,
    /// Cells with value 0x5: written recently and identical on both sides,
    /// kept marked while hot (cleared when idle).
    #[serde(default)]
    pub hot: u64,
}

impl MapSummary {
    /// Counts the classes of every cell.
    pub fn of(map: &StateMap) -> Self {
        let mut summary = MapSummary {
            cells: map.region_count(),
            stale: 0,
            inconsistent: 0,
            hot: 0,
        };
        for run in map.dirty_region_runs() {
            for region in run {
                match CellClass::of(map.get(region)) {
                    CellClass::Stale => summary.stale += 1,
                    CellClass::Inconsistent if map.get(region) == super::cells::CELL_ACTIVE => {
                        summary.hot += 1
                    }
                    CellClass::Inconsistent => summary.inconsistent += 1,
                    CellClass::Clean => {}
                }
            }
        }
        summary
    }

    /// Whether any cell is non-zero.
    pub fn is_dirty(&self) -> bool {
        self.stale + self.inconsistent + self.hot > 0
    }
}

/// Renders the cells as `cell value` lines; a line holding `*` stands for
/// lines equal to the one above it, up to the next printed line. The last
/// cell is always printed.
pub fn render_cells(map: &StateMap) -> String {
    let mut out = String::from("Cell      Value\n--------  -----\n");
    let count = map.region_count();
    let mut last_printed: Option<u8> = None;
    let mut starred = false;
    for region in 0..count {
        let value = map.get(region);
        let is_last = region + 1 == count;
        if last_printed == Some(value) && !is_last {
            if !starred {
                out.push_str("*\n");
                starred = true;
            }
            continue;
        }
        let _ = writeln!(out, "{region:<8}  0x{value:x}");
        last_printed = Some(value);
        starred = false;
    }
    out
}

/// Parses the output of [`render_cells`] back into cell values (used by tests
/// and by anyone scripting against the text form).
///
/// # Errors
/// A line that is neither a header, a `*` nor a `cell 0xV` pair.
pub fn parse_rendered(text: &str, region_count: u64) -> Result<Vec<u8>, String> {
    let mut cells = Vec::with_capacity(region_count as usize);
    let mut pending_star = false;
    for line in text.lines().skip(2) {
        let line = line.trim();
        if line == "*" {
            pending_star = true;
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(cell), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("unexpected line {line:?}"));
        };
        let cell: u64 = cell.parse().map_err(|_| format!("bad cell in {line:?}"))?;
        let value = u8::from_str_radix(value.trim_start_matches("0x"), 16)
            .map_err(|_| format!("bad value in {line:?}"))?;
        if pending_star {
            let repeat = *cells.last().ok_or("star before the first cell")?;
            while (cells.len() as u64) < cell {
                cells.push(repeat);
            }
            pending_star = false;
        }
        if cells.len() as u64 != cell {
            return Err(format!("cell {cell} out of order"));
        }
        cells.push(value);
    }
    if cells.len() as u64 != region_count {
        return Err(format!("{} cells, expected {region_count}", cells.len()));
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statemap::cells::{CELL_STALE, CELL_WRITING};
    use proptest::prelude::*;

    const SIZE: u64 = 40 * REGION_SIZE_BYTES;

    #[test]
    fn render_compresses_repeats_like_gmd_show_state() {
        let mut map = StateMap::new(SIZE);
        map.set(3, CELL_STALE);
        map.set(4, CELL_STALE);
        map.set(5, CELL_STALE);
        let text = render_cells(&map);
        let expected = "Cell      Value\n--------  -----\n\
0         0x0\n*\n3         0xf\n*\n6         0x0\n*\n39        0x0\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn corrupt_map_files_are_refused() {
        let map = StateMap::new(SIZE);
        let mut bytes = encode(&Uuid::from_u128(5), &map);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(DumpError::Truncated));
        bytes[45] ^= 1;
        assert_eq!(decode(&bytes), Err(DumpError::BadChecksum));
        assert_eq!(decode(b"hello world"), Err(DumpError::BadMagic));
    }

    proptest! {
        #[test]
        fn dump_and_render_round_trip(
            cells in proptest::collection::vec(prop_oneof![4 => Just(0u8), 1 => Just(CELL_STALE), 1 => Just(CELL_WRITING)], 40)
        ) {
            let mut map = StateMap::new(SIZE);
            for (r, &v) in cells.iter().enumerate() {
                map.set(r as u64, v);
            }
            let uuid = Uuid::from_u128(99);
            let (got_uuid, got) = decode(&encode(&uuid, &map)).unwrap();
            prop_assert_eq!(got_uuid, uuid);
            prop_assert_eq!(&got, &map);
            let parsed = parse_rendered(&render_cells(&map), 40).unwrap();
            prop_assert_eq!(parsed, cells.clone());
            let summary = MapSummary::of(&map);
            prop_assert_eq!(summary.stale, cells.iter().filter(|&&v| v == CELL_STALE).count() as u64);
            prop_assert_eq!(summary.inconsistent, cells.iter().filter(|&&v| v == CELL_WRITING).count() as u64);
        }
    }
}
