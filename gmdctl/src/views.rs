//! Views for people: the resync bar of `gmdctl status`, the state map
//! picture of `gmdctl show-state --picture`, the map as JSON, and event
//! time stamps.

use std::fmt::Write as _;

use gmd_core::statemap::StateMap;
use gmd_core::statemap::cells::{
    CELL_ACTIVE as CELL_HOT, CELL_CONSISTENT, CELL_RESYNC as CELL_NOT_RECEIVED, CELL_STALE,
};
use gmd_core::units::{REGION_SIZE_BYTES, format_size};
use serde::Serialize;

/// Columns of the map picture (and the widest line of every view).
pub const PICTURE_COLUMNS: usize = 80;
/// Rows the map picture uses at most: a large device gets bigger buckets.
pub const PICTURE_ROWS_MAX: usize = 32;

/// `h:mm:ss` (hours unbounded).
pub fn hms(seconds: u64) -> String {
    format!(
        "{}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// The resync line of `gmdctl status`:
/// `[##########..........]  50.0%  128 of 256 regions left  4 MiB/s  ETA 0:00:32`
/// (rate and ETA only where known: the source measures them).
pub fn resync_bar(total: u64, left: u64, bytes_per_s: u64, eta_s: Option<u64>) -> String {
    const WIDTH: usize = 20;
    let done = total.saturating_sub(left);
    let fraction = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((fraction * WIDTH as f64).floor() as usize).min(WIDTH);
    let mut line = format!(
        "[{}{}] {:5.1}%  {left} of {total} regions left",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0
    );
    if bytes_per_s > 0 {
        let _ = write!(line, "  {}/s", format_size(bytes_per_s));
    }
    if let Some(eta) = eta_s {
        let _ = write!(line, "  ETA {}", hms(eta));
    }
    line
}

/// What one picture character stands for, worst first.
const CLASSES: [(char, &str); 5] = [
    ('S', "stale (differs from the peer)"),
    ('n', "not received (resync target)"),
    ('i', "in flight or to be resent"),
    ('h', "hot (recently written, identical)"),
    ('.', "clean"),
];

/// The class rank of a cell value: 0 stale … 4 clean (see [`CLASSES`]).
fn rank(value: u8) -> usize {
    match value {
        CELL_STALE => 0,
        CELL_NOT_RECEIVED => 1,
        CELL_HOT => 3,
        CELL_CONSISTENT => 4,
        _ => 2,
    }
}

/// Regions per picture character for a map of `regions` cells: at least
/// one, and few enough that the picture fits [`PICTURE_ROWS_MAX`] rows.
pub fn bucket_regions(regions: u64) -> u64 {
    let cells = (PICTURE_COLUMNS * PICTURE_ROWS_MAX) as u64;
    regions.div_ceil(cells).max(1)
}

/// The map as a grid of [`PICTURE_COLUMNS`] characters per line, one per
/// bucket of regions, the worst class in the bucket shown; a legend and the
/// scale follow.
pub fn picture(map: &StateMap) -> String {
    let regions = map.region_count();
    let per = bucket_regions(regions);
    let buckets = regions.div_ceil(per);
    let mut worst = vec![4usize; buckets as usize];
    for run in map.dirty_region_runs() {
        for region in run {
            let b = (region / per) as usize;
            worst[b] = worst[b].min(rank(map.get(region)));
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "1 character = {per} region(s) of {}, {} per line (the worst cell shows):",
        format_size(REGION_SIZE_BYTES),
        format_size(per * REGION_SIZE_BYTES * PICTURE_COLUMNS as u64)
    );
    for line in worst.chunks(PICTURE_COLUMNS) {
        out.extend(line.iter().map(|r| CLASSES[*r].0));
        out.push('\n');
    }
    let legend: Vec<String> = CLASSES
        .iter()
        .rev()
        .map(|(c, what)| format!("{c} {what}"))
        .collect();
    // Two lines of legend, each within 80 columns.
    let _ = writeln!(out, "{}", legend[..3].join("  "));
    let _ = writeln!(out, "{}", legend[3..].join("  "));
    out
}

/// One run of equal non-clean cells, for `show-state --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellRun {
    /// First region.
    pub first: u64,
    /// Regions in the run.
    pub count: u64,
    /// Cell value (see docs/ARCHITECTURE.md, "The state map").
    pub value: u8,
}

/// The non-clean cells of `map` as runs of equal values.
pub fn cell_runs(map: &StateMap) -> Vec<CellRun> {
    let mut runs: Vec<CellRun> = Vec::new();
    for run in map.dirty_region_runs() {
        for region in run {
            let value = map.get(region);
            match runs.last_mut() {
                Some(r) if r.value == value && r.first + r.count == region => r.count += 1,
                _ => runs.push(CellRun {
                    first: region,
                    count: 1,
                    value,
                }),
            }
        }
    }
    runs
}

/// `time_ms` (milliseconds since the Unix epoch) as RFC 3339 in UTC with
/// milliseconds: `2025-01-31T12:34:56.789Z`.
pub fn rfc3339_ms(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        time_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hms_and_timestamps() {
        assert_eq!(hms(0), "0:00:00");
        assert_eq!(hms(3725), "1:02:05");
        assert_eq!(hms(100 * 3600), "100:00:00");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }

    #[test]
    fn the_resync_bar_shows_percent_rate_and_eta() {
        assert_eq!(
            resync_bar(256, 128, 4 << 20, Some(32)),
            "[##########..........]  50.0%  128 of 256 regions left  4 MiB/s  ETA 0:00:32"
        );
        assert_eq!(
            resync_bar(10, 10, 0, None),
            "[....................]   0.0%  10 of 10 regions left"
        );
        assert!(resync_bar(3, 0, 0, None).starts_with("[####################] 100.0%"));
    }

    #[test]
    fn the_picture_is_80_columns_and_shows_the_worst_cell_of_each_bucket() {
        // 8192 regions (256 MiB): 4 regions per character, 2048 characters.
        let mut map = StateMap::new(8192 * REGION_SIZE_BYTES);
        map.set(0, CELL_HOT);
        map.set(1, CELL_STALE);
        map.set(4, CELL_HOT);
        map.set(8, 0x1);
        map.set(12, CELL_NOT_RECEIVED);
        map.set(8191, CELL_STALE);
        let text = picture(&map);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.iter().all(|l| l.chars().count() <= PICTURE_COLUMNS),
            "{text}"
        );
        assert!(lines[0].starts_with("1 character = 4 region(s)"), "{text}");
        assert!(lines[1].starts_with("Shin."), "{text}");
        assert_eq!(lines[1].chars().count(), 80);
        // 2048 characters: 25 full lines and one of 48.
        assert_eq!(lines[26].chars().count(), 48);
        assert!(lines[26].ends_with('S'));
        assert_eq!(lines.len(), 1 + 26 + 2);
        assert_eq!(
            cell_runs(&map),
            [
                CellRun {
                    first: 0,
                    count: 1,
                    value: CELL_HOT
                },
                CellRun {
                    first: 1,
                    count: 1,
                    value: CELL_STALE
                },
                CellRun {
                    first: 4,
                    count: 1,
                    value: CELL_HOT
                },
                CellRun {
                    first: 8,
                    count: 1,
                    value: 1
                },
                CellRun {
                    first: 12,
                    count: 1,
                    value: CELL_NOT_RECEIVED
                },
                CellRun {
                    first: 8191,
                    count: 1,
                    value: CELL_STALE
                },
            ]
        );
    }

    #[test]
    fn a_large_map_gets_larger_buckets() {
        // 1 TiB: 32 Mi regions → at most 32 lines.
        assert_eq!(bucket_regions(32 << 20), 13_108);
        assert_eq!(bucket_regions(100), 1);
    }
}
