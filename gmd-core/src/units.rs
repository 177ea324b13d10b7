//! Units and fixed geometry shared by every part of the product.
//!
//! One helper for each conversion, so that no module multiplies by 512 or
//! 32768 on its own.

/// Size of one state-map region: every write marks the regions it touches.
pub const REGION_SIZE_BYTES: u64 = 32 * 1024;

/// Bits of state per region in memory and on disk.
pub const CELL_BITS: u8 = 4;

/// Bytes in a sector, the unit of the ublk and block-layer interfaces.
pub const SECTOR_SIZE_BYTES: u64 = 512;

/// Number of regions needed to cover `size_bytes` (the last one may be partial).
pub const fn region_count(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(REGION_SIZE_BYTES)
}

/// Regions touched by the byte range `offset_bytes .. offset_bytes + len_bytes`.
///
/// An empty range touches no region. A range that straddles a region boundary
/// touches both regions.
pub fn regions_touched(offset_bytes: u64, len_bytes: u64) -> std::ops::Range<u64> {
    if len_bytes == 0 {
        return 0..0;
    }
    let first = offset_bytes / REGION_SIZE_BYTES;
    let last = (offset_bytes + len_bytes - 1) / REGION_SIZE_BYTES;
    first..last + 1
}

/// Byte range covered by `region_index` on a device of `size_bytes`.
pub fn region_bytes(region_index: u64, size_bytes: u64) -> std::ops::Range<u64> {
    let start = region_index * REGION_SIZE_BYTES;
    start.min(size_bytes)..(start + REGION_SIZE_BYTES).min(size_bytes)
}

/// Converts sectors to bytes.
pub const fn sectors_to_bytes(sectors: u64) -> u64 {
    sectors * SECTOR_SIZE_BYTES
}

/// Converts bytes to whole sectors (rounding down).
pub const fn bytes_to_sectors(bytes: u64) -> u64 {
    bytes / SECTOR_SIZE_BYTES
}

/// Parses a human size such as `256MiB`, `1T`, `4096` or `512k` into bytes.
///
/// Suffixes are binary (K = KiB = 1024). Returns `None` for anything else.
pub fn parse_size_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let value: u64 = digits.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return None,
    };
    value.checked_mul(1u64 << shift)
}

/// Formats a byte count with a binary suffix, e.g. `256 MiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn straddling_range_touches_both_regions() {
        assert_eq!(regions_touched(REGION_SIZE_BYTES - 512, 1024), 0..2);
        assert_eq!(regions_touched(REGION_SIZE_BYTES, REGION_SIZE_BYTES), 1..2);
        assert_eq!(regions_touched(0, REGION_SIZE_BYTES), 0..1);
        assert_eq!(regions_touched(0, REGION_SIZE_BYTES + 1), 0..2);
        assert_eq!(regions_touched(5, 0), 0..0);
    }

    #[test]
    fn one_tib_needs_sixteen_mib_of_cells() {
        let regions = region_count(1 << 40);
        assert_eq!(regions * u64::from(CELL_BITS) / 8, 16 << 20);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size_bytes("256MiB"), Some(256 << 20));
        assert_eq!(parse_size_bytes("256M"), Some(256 << 20));
        assert_eq!(parse_size_bytes("1 TiB"), Some(1 << 40));
        assert_eq!(parse_size_bytes("4096"), Some(4096));
        assert_eq!(parse_size_bytes("12x"), None);
        assert_eq!(parse_size_bytes(""), None);
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
    }
}
