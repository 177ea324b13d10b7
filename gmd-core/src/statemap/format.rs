//! On-disk format of a state map (format version 2).
//!
//! ```text
//! offset 0      superblock, copy A   (4 KiB)
//! offset 4096   superblock, copy B   (4 KiB)
//! offset 8192   page 0 copy A, page 0 copy B, page 1 copy A, page 1 copy B, …
//! ```
//!
//! Every 4 KiB block carries a magic, the device UUID, a sequence number and a
//! CRC32 (crc32fast) over the whole block with the CRC field zeroed. An update
//! always writes the copy that does *not* hold the newest valid version, and
//! only one update of a given block is in flight at a time, so a crash at any
//! instant leaves the previous version readable: a reader takes the valid copy
//! with the highest sequence number. A block with no valid copy makes the
//! whole map unreadable — it is never taken as clean.
//!
//! Each page holds 4032 bytes of packed cells (8064 regions, 252 MiB of
//! device); a 1 TiB device needs 4162 pages, 33 MiB on disk.
//!
//! Version 2 adds to the superblock the data generations
//! ([`crate::generations`]) and the role the device ran in (so that a
//! device restored after a crash knows it was primary). Version 1 maps are
//! read as holding their device's legacy generation (both sides of an
//! upgraded pair agree) and are written as version 2 from then on; pages
//! did not change.

use uuid::Uuid;

use crate::generations::Generations;
use crate::link::PairRole;

/// Size of every block of the format.
pub const BLOCK_SIZE: usize = 4096;
/// Bytes at the start of a page before the packed cells.
pub const PAGE_HEADER_SIZE: usize = 64;
/// Packed cell bytes in one page.
pub const PAGE_CELL_BYTES: usize = BLOCK_SIZE - PAGE_HEADER_SIZE;
/// Regions described by one page.
pub const REGIONS_PER_PAGE: u64 = (PAGE_CELL_BYTES * 2) as u64;
/// Current format version.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version still read.
pub const FORMAT_VERSION_MIN: u16 = 1;
/// Most remote peers a device may have recorded as down.
pub const PEERS_DOWN_MAX: usize = 7;
/// Longest machine name that fits a down record.
pub const PEER_NAME_MAX: usize = 63;

const SUPER_MAGIC: [u8; 8] = *b"GMDSMAP\0";
const PAGE_MAGIC: [u8; 8] = *b"GMDSPAGE";
const CRC_OFFSET: usize = BLOCK_SIZE - 4;
const PAGE_CRC_OFFSET: usize = 60;

const _: () = assert!(PAGE_CELL_BYTES % 2 == 0);
/// Where the version 2 fields start in the superblock.
const GENERATIONS_OFFSET: usize = 1024;

const _: () = assert!(88 + 1 + PEERS_DOWN_MAX * (PEER_NAME_MAX + 1) < GENERATIONS_OFFSET);
const _: () = assert!(GENERATIONS_OFFSET + 56 < CRC_OFFSET);

/// Where each block of a map of `page_count` pages lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Number of cell pages.
    pub page_count: u64,
}

impl Layout {
    /// Layout of the map of a device with `region_count` regions.
    pub fn for_regions(region_count: u64) -> Self {
        Layout {
            page_count: region_count.div_ceil(REGIONS_PER_PAGE).max(1),
        }
    }

    /// Byte offset of superblock copy `slot` (0 or 1).
    pub fn superblock_offset(slot: u8) -> u64 {
        u64::from(slot & 1) * BLOCK_SIZE as u64
    }

    /// Byte offset of copy `slot` of page `page_index`.
    pub fn page_offset(page_index: u64, slot: u8) -> u64 {
        (2 + 2 * page_index + u64::from(slot & 1)) * BLOCK_SIZE as u64
    }

    /// Bytes of storage the map needs.
    pub fn file_size_bytes(&self) -> u64 {
        Self::page_offset(self.page_count, 0)
    }

    /// Range of packed cell bytes held by page `page_index`, for a map of `packed_len` bytes.
    pub fn page_cells(page_index: u64, packed_len: usize) -> std::ops::Range<usize> {
        let start = (page_index as usize * PAGE_CELL_BYTES).min(packed_len);
        start..(start + PAGE_CELL_BYTES).min(packed_len)
    }

    /// Page that holds the cell of `region_index`.
    pub fn page_of_region(region_index: u64) -> u64 {
        region_index / REGIONS_PER_PAGE
    }
}

/// Administrative state recorded in the superblock, restored when gmdd restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AdminState {
    /// Not configured.
    Defined,
    /// Configured, not usable by applications.
    Stopped,
    /// Usable by applications.
    Available,
}

impl std::fmt::Display for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdminState::Defined => "DEFINED",
            AdminState::Stopped => "STOPPED",
            AdminState::Available => "AVAILABLE",
        })
    }
}

impl AdminState {
    fn to_byte(self) -> u8 {
        match self {
            AdminState::Defined => 0,
            AdminState::Stopped => 1,
            AdminState::Available => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(AdminState::Defined),
            1 => Some(AdminState::Stopped),
            2 => Some(AdminState::Available),
            _ => None,
        }
    }
}

/// Everything the superblock records about a device's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Identity of the device, made when it is first defined.
    pub uuid: Uuid,
    /// Size of the data volume the map describes.
    pub device_size_bytes: u64,
    /// Region size (32 KiB in format 1).
    pub region_size_bytes: u64,
    /// Bits per cell (4 in format 1).
    pub cell_bits: u8,
    /// Number of regions.
    pub region_count: u64,
    /// Number of cell pages.
    pub page_count: u64,
    /// Bumped on every superblock update.
    pub generation: u64,
    /// State the device was last put in by the administrator.
    pub admin_state: AdminState,
    /// Remote peers recorded as down with `gmdctl down`.
    pub peers_down: Vec<String>,
    /// Which data this volume holds (format 2).
    pub generations: Generations,
    /// The role the device ran in when this was written (format 2): a
    /// device restored after a crash comes back in it where that is safe.
    pub role: PairRole,
    /// Whether `role` was read from the map. Format 1 recorded no role
    /// (`role` then reads as secondary): a device restored from such a map
    /// comes back in its configured role, as the gmd that wrote it ran it.
    pub role_recorded: bool,
    /// Whether the device ran as primary when it last stopped and has been
    /// given no role since (format 2; 0 in maps written before it): it
    /// started again as secondary, and its marks hold the last writer's
    /// writes (see [`crate::link::SideFacts::ran_primary`]).
    pub ran_primary: bool,
}

/// Why a block could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The block does not start with the expected magic: not a gmd state map, or never written.
    #[error("no gmd state map magic")]
    BadMagic,
    /// The CRC does not match: torn or corrupted write.
    #[error("checksum mismatch (torn or corrupted block)")]
    BadChecksum,
    /// Written by a newer or unknown version of gmd.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// The block belongs to another device (or another position).
    #[error("block belongs to device {uuid}, page {page_index}")]
    Foreign {
        /// UUID found in the block.
        uuid: Uuid,
        /// Page index found in the block.
        page_index: u32,
    },
    /// A field holds a value this version cannot interpret.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

fn crc_with_zeroed(block: &[u8], crc_offset: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&block[..crc_offset]);
    hasher.update(&[0; 4]);
    hasher.update(&block[crc_offset + 4..]);
    hasher.finalize()
}

fn read_u64(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

fn read_u32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u16(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(block[at..at + 2].try_into().expect("2 bytes"))
}

/// Encodes `sb` with sequence number `seq` into a 4 KiB block.
///
/// # Panics
/// If `block` is not 4 KiB, or more than [`PEERS_DOWN_MAX`] peers or a name
/// longer than [`PEER_NAME_MAX`] bytes are recorded (configuration limits
/// prevent both).
pub fn encode_superblock(sb: &Superblock, seq: u64, block: &mut [u8]) {
    assert_eq!(block.len(), BLOCK_SIZE);
    assert!(sb.peers_down.len() <= PEERS_DOWN_MAX);
    block.fill(0);
    block[0..8].copy_from_slice(&SUPER_MAGIC);
    block[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    block[10] = sb.cell_bits;
    block[16..32].copy_from_slice(sb.uuid.as_bytes());
    block[32..40].copy_from_slice(&sb.device_size_bytes.to_le_bytes());
    block[40..48].copy_from_slice(&sb.region_size_bytes.to_le_bytes());
    block[48..56].copy_from_slice(&sb.region_count.to_le_bytes());
    block[56..64].copy_from_slice(&sb.page_count.to_le_bytes());
    block[64..72].copy_from_slice(&sb.generation.to_le_bytes());
    block[72..80].copy_from_slice(&seq.to_le_bytes());
    block[80] = sb.admin_state.to_byte();
    block[88] = sb.peers_down.len() as u8;
    for (i, name) in sb.peers_down.iter().enumerate() {
        assert!(name.len() <= PEER_NAME_MAX, "peer name too long");
        let at = 89 + i * (PEER_NAME_MAX + 1);
        block[at] = name.len() as u8;
        block[at + 1..at + 1 + name.len()].copy_from_slice(name.as_bytes());
    }
    let g = &sb.generations;
    let at = GENERATIONS_OFFSET;
    block[at..at + 8].copy_from_slice(&g.current.to_le_bytes());
    block[at + 8..at + 16].copy_from_slice(&g.bitmap.to_le_bytes());
    for (i, h) in g.history.iter().enumerate() {
        block[at + 16 + 8 * i..at + 24 + 8 * i].copy_from_slice(&h.to_le_bytes());
    }
    block[at + 40] = match sb.role {
        PairRole::Secondary => 0,
        PairRole::Primary => 1,
        PairRole::Split => 2,
    };
    block[at + 41] = u8::from(sb.ran_primary);
    block[at + 48..at + 56].copy_from_slice(&g.term.to_le_bytes());
    let crc = crc_with_zeroed(block, CRC_OFFSET);
    block[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a superblock copy; returns it with its sequence number.
///
/// # Errors
/// Any [`BlockError`]: the copy must not be used.
pub fn decode_superblock(block: &[u8]) -> Result<(Superblock, u64), BlockError> {
    if block.len() != BLOCK_SIZE || block[0..8] != SUPER_MAGIC {
        return Err(BlockError::BadMagic);
    }
    if read_u32(block, CRC_OFFSET) != crc_with_zeroed(block, CRC_OFFSET) {
        return Err(BlockError::BadChecksum);
    }
    let version = read_u16(block, 8);
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(BlockError::Version(version));
    }
    let admin_state = AdminState::from_byte(block[80]).ok_or(BlockError::Invalid("admin state"))?;
    let count = block[88] as usize;
    if count > PEERS_DOWN_MAX {
        return Err(BlockError::Invalid("peer count"));
    }
    let mut peers_down = Vec::with_capacity(count);
    for i in 0..count {
        let at = 89 + i * (PEER_NAME_MAX + 1);
        let len = block[at] as usize;
        if len > PEER_NAME_MAX {
            return Err(BlockError::Invalid("peer name length"));
        }
        let name = std::str::from_utf8(&block[at + 1..at + 1 + len])
            .map_err(|_| BlockError::Invalid("peer name"))?;
        peers_down.push(name.to_owned());
    }
    let uuid = Uuid::from_slice(&block[16..32]).expect("16 bytes");
    let (generations, role, role_recorded, ran_primary) = if version == 1 {
        (
            Generations::legacy(&uuid),
            PairRole::Secondary,
            false,
            false,
        )
    } else {
        let at = GENERATIONS_OFFSET;
        let generations = Generations {
            current: read_u64(block, at),
            bitmap: read_u64(block, at + 8),
            history: [
                read_u64(block, at + 16),
                read_u64(block, at + 24),
                read_u64(block, at + 32),
            ],
            // Zero in maps written before terms.
            term: read_u64(block, at + 48),
        };
        let role = match block[at + 40] {
            0 => PairRole::Secondary,
            1 => PairRole::Primary,
            2 => PairRole::Split,
            _ => return Err(BlockError::Invalid("role")),
        };
        let ran_primary = match block[at + 41] {
            0 => false,
            1 => true,
            _ => return Err(BlockError::Invalid("ran as primary")),
        };
        (generations, role, true, ran_primary)
    };
    let sb = Superblock {
        uuid,
        device_size_bytes: read_u64(block, 32),
        region_size_bytes: read_u64(block, 40),
        cell_bits: block[10],
        region_count: read_u64(block, 48),
        page_count: read_u64(block, 56),
        generation: read_u64(block, 64),
        admin_state,
        peers_down,
        generations,
        role,
        role_recorded,
        ran_primary,
    };
    if sb.cell_bits != crate::units::CELL_BITS
        || sb.region_size_bytes != crate::units::REGION_SIZE_BYTES
        || sb.region_count != crate::units::region_count(sb.device_size_bytes)
        || sb.page_count != Layout::for_regions(sb.region_count).page_count
    {
        return Err(BlockError::Invalid("geometry"));
    }
    Ok((sb, read_u64(block, 72)))
}

/// Encodes page `page_index` of device `uuid` with sequence `seq` and the given packed cells.
///
/// Cells beyond `cells.len()` (the tail of the last page) are written as zero.
///
/// # Panics
/// If `block` is not 4 KiB or `cells` is longer than [`PAGE_CELL_BYTES`].
pub fn encode_page(uuid: &Uuid, page_index: u64, seq: u64, cells: &[u8], block: &mut [u8]) {
    assert_eq!(block.len(), BLOCK_SIZE);
    assert!(cells.len() <= PAGE_CELL_BYTES);
    block[..PAGE_HEADER_SIZE].fill(0);
    block[0..8].copy_from_slice(&PAGE_MAGIC);
    block[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    block[12..16].copy_from_slice(&(page_index as u32).to_le_bytes());
    block[16..32].copy_from_slice(uuid.as_bytes());
    block[32..40].copy_from_slice(&seq.to_le_bytes());
    block[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + cells.len()].copy_from_slice(cells);
    block[PAGE_HEADER_SIZE + cells.len()..].fill(0);
    let crc = crc_with_zeroed(block, PAGE_CRC_OFFSET);
    block[PAGE_CRC_OFFSET..PAGE_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes one copy of a page; returns its sequence number and its 4032 cell bytes.
///
/// # Errors
/// Any [`BlockError`]; [`BlockError::Foreign`] when the page belongs to another
/// device or position.
pub fn decode_page<'a>(
    block: &'a [u8],
    uuid: &Uuid,
    page_index: u64,
) -> Result<(u64, &'a [u8]), BlockError> {
    let (found_uuid, found_index, seq, cells) = decode_page_any(block)?;
    if found_uuid != *uuid || u64::from(found_index) != page_index {
        return Err(BlockError::Foreign {
            uuid: found_uuid,
            page_index: found_index,
        });
    }
    Ok((seq, cells))
}

/// Decodes one copy of a page without checking whose it is.
///
/// # Errors
/// Bad magic, checksum or version.
pub fn decode_page_any(block: &[u8]) -> Result<(Uuid, u32, u64, &[u8]), BlockError> {
    if block.len() != BLOCK_SIZE || block[0..8] != PAGE_MAGIC {
        return Err(BlockError::BadMagic);
    }
    if read_u32(block, PAGE_CRC_OFFSET) != crc_with_zeroed(block, PAGE_CRC_OFFSET) {
        return Err(BlockError::BadChecksum);
    }
    let version = read_u16(block, 8);
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(BlockError::Version(version));
    }
    Ok((
        Uuid::from_slice(&block[16..32]).expect("16 bytes"),
        read_u32(block, 12),
        read_u64(block, 32),
        &block[PAGE_HEADER_SIZE..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        let size = 300 << 20;
        let regions = crate::units::region_count(size);
        Superblock {
            uuid: Uuid::from_u128(0x1234),
            device_size_bytes: size,
            region_size_bytes: crate::units::REGION_SIZE_BYTES,
            cell_bits: 4,
            region_count: regions,
            page_count: Layout::for_regions(regions).page_count,
            generation: 7,
            admin_state: AdminState::Available,
            peers_down: vec!["beta".into(), "delta".into()],
            generations: Generations {
                term: 9,
                current: 0x1111,
                bitmap: 0x2222,
                history: [3, 4, 5],
            },
            role: PairRole::Primary,
            role_recorded: true,
            ran_primary: true,
        }
    }

    #[test]
    fn superblock_round_trips() {
        let mut block = vec![0; BLOCK_SIZE];
        encode_superblock(&sb(), 42, &mut block);
        assert_eq!(decode_superblock(&block), Ok((sb(), 42)));
    }

    /// A format 2 superblock written before primary terms reads term 0.
    #[test]
    fn a_superblock_from_before_terms_reads_term_zero() {
        let mut block = vec![0; BLOCK_SIZE];
        encode_superblock(&sb(), 42, &mut block);
        block[GENERATIONS_OFFSET + 48..GENERATIONS_OFFSET + 56].fill(0);
        let crc = crc_with_zeroed(&block, CRC_OFFSET);
        block[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        let (read, _) = decode_superblock(&block).unwrap();
        assert_eq!(read.generations.term, 0);
        assert_eq!(read.generations.current, sb().generations.current);
    }

    /// A superblock as format version 1 wrote it: no generations, no role.
    fn encode_version_1(sb: &Superblock, seq: u64, block: &mut [u8]) {
        encode_superblock(sb, seq, block);
        block[8..10].copy_from_slice(&1u16.to_le_bytes());
        block[GENERATIONS_OFFSET..GENERATIONS_OFFSET + 56].fill(0);
        let crc = crc_with_zeroed(block, CRC_OFFSET);
        block[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_version_1_superblock_reads_as_its_devices_legacy_generation() {
        let mut block = vec![0; BLOCK_SIZE];
        encode_version_1(&sb(), 9, &mut block);
        let (read, seq) = decode_superblock(&block).unwrap();
        assert_eq!(seq, 9);
        assert_eq!(read.generations, Generations::legacy(&sb().uuid));
        assert_eq!(read.role, PairRole::Secondary);
        assert!(!read.role_recorded, "format 1 recorded no role");
        assert_eq!(read.peers_down, sb().peers_down);
        // Written back, it is version 2 and keeps that generation; the
        // role it is written with is recorded from then on.
        encode_superblock(&read, 10, &mut block);
        assert_eq!(read_u16(&block, 8), 2);
        let again = decode_superblock(&block).unwrap().0;
        assert!(again.role_recorded);
        assert_eq!(
            again,
            Superblock {
                role_recorded: true,
                ..read
            }
        );
    }

    #[test]
    fn newer_format_versions_are_refused() {
        let mut block = vec![0; BLOCK_SIZE];
        encode_superblock(&sb(), 1, &mut block);
        block[8..10].copy_from_slice(&3u16.to_le_bytes());
        let crc = crc_with_zeroed(&block, CRC_OFFSET);
        block[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_superblock(&block), Err(BlockError::Version(3)));
    }

    #[test]
    fn any_flipped_bit_in_a_superblock_is_detected() {
        let mut block = vec![0; BLOCK_SIZE];
        encode_superblock(&sb(), 1, &mut block);
        for byte in (0..BLOCK_SIZE).step_by(97) {
            let mut bad = block.clone();
            bad[byte] ^= 0x10;
            assert!(decode_superblock(&bad).is_err(), "byte {byte}");
        }
    }

    #[test]
    fn page_round_trips_and_rejects_other_devices() {
        let uuid = Uuid::from_u128(9);
        let mut block = vec![0; BLOCK_SIZE];
        let cells = vec![0xf0u8; 100];
        encode_page(&uuid, 3, 5, &cells, &mut block);
        let (seq, got) = decode_page(&block, &uuid, 3).unwrap();
        assert_eq!(seq, 5);
        assert_eq!(&got[..100], &cells[..]);
        assert!(got[100..].iter().all(|&b| b == 0));
        assert!(matches!(
            decode_page(&block, &Uuid::from_u128(10), 3),
            Err(BlockError::Foreign { .. })
        ));
        assert!(matches!(
            decode_page(&block, &uuid, 4),
            Err(BlockError::Foreign { .. })
        ));
        block[2000] ^= 1;
        assert_eq!(decode_page(&block, &uuid, 3), Err(BlockError::BadChecksum));
    }

    #[test]
    fn layout_of_one_tib() {
        let layout = Layout::for_regions(crate::units::region_count(1 << 40));
        assert_eq!(layout.page_count, 4162);
        assert_eq!(Layout::page_offset(0, 0), 8192);
        assert_eq!(Layout::page_offset(0, 1), 12288);
        assert_eq!(layout.file_size_bytes(), 8192 + 4162 * 8192);
    }
}
