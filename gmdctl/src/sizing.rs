//! `gmdctl sizing`: the reference's gmdsizing (3.7.1) and its table of full
//! synchronisation times (3.8).
//!
//! Block devices are sampled from `/proc/diskstats` (sectors of 512 bytes
//! read and written); regular files by the growth of their size (bytes
//! appended: a file rewritten in place shows nothing, and reads are not
//! seen). The network bandwidth a write rate implies assumes 20% network
//! overhead, as the reference does: `bytes/s × 8 / 0.8`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Share of a link's bandwidth left for data (20% overhead).
pub const LINK_EFFICIENCY: f64 = 0.8;

/// Where a target's figures come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A block device: its line in `/proc/diskstats`.
    Disk(String),
    /// A regular file: growth of its size.
    File(PathBuf),
}

/// Cumulative bytes read and written by a target at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read (0 for files).
    pub read_bytes: u64,
    /// Bytes written (for files: the current size).
    pub write_bytes: u64,
}

/// Finds how to sample `path`.
///
/// # Errors
/// The path does not exist, or is neither a block device nor a regular file.
pub fn source_of(path: &Path) -> Result<Source, String> {
    use std::os::unix::fs::FileTypeExt;
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_block_device() {
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{}: no device name", path.display()))?;
        Ok(Source::Disk(name))
    } else if meta.is_file() {
        Ok(Source::File(real))
    } else {
        Err(format!(
            "{}: neither a block device nor a regular file",
            path.display()
        ))
    }
}

/// Reads a device's counters from the text of `/proc/diskstats`.
pub fn parse_diskstats(text: &str, device: &str) -> Option<Counters> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[2] != device {
            return None;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        Some(Counters {
            read_bytes: n(5)? * 512,
            write_bytes: n(9)? * 512,
        })
    })
}

/// Samples a source now.
///
/// # Errors
/// The device left `/proc/diskstats`, or the file cannot be read.
pub fn sample(source: &Source) -> Result<Counters, String> {
    match source {
        Source::Disk(name) => {
            let text = std::fs::read_to_string("/proc/diskstats")
                .map_err(|e| format!("/proc/diskstats: {e}"))?;
            parse_diskstats(&text, name).ok_or_else(|| format!("{name} is not in /proc/diskstats"))
        }
        Source::File(path) => {
            let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Counters {
                read_bytes: 0,
                write_bytes: meta.len(),
            })
        }
    }
}

/// One interval of one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Seconds the interval lasted.
    pub seconds: f64,
    /// Bytes read in it.
    pub read_bytes: u64,
    /// Bytes written in it.
    pub write_bytes: u64,
}

/// The report for one target (JSON: see docs/OPERATIONS.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetReport {
    /// The path given.
    pub name: String,
    /// `device` or `file`.
    pub kind: String,
    /// Every interval sampled.
    pub intervals: Vec<Interval>,
    /// Seconds sampled in all.
    pub seconds: f64,
    /// KiB read in all.
    pub read_kib: f64,
    /// KiB written in all.
    pub write_kib: f64,
    /// Average write rate, KiB/s.
    pub avg_write_kib_s: f64,
    /// Highest write rate of an interval, KiB/s.
    pub peak_write_kib_s: f64,
    /// Lowest write rate of an interval, KiB/s.
    pub low_write_kib_s: f64,
    /// Percent of the bytes that were read (the rest were written).
    pub read_percent: f64,
    /// Network bandwidth the average write rate needs with 20% overhead, kbit/s.
    pub bandwidth_avg_kbit_s: f64,
    /// Network bandwidth the peak write rate needs with 20% overhead, kbit/s.
    pub bandwidth_peak_kbit_s: f64,
}

/// Network bandwidth, in kbit/s (1000 bit/s), that `kib_per_s` of writes
/// needs with 20% overhead.
pub fn bandwidth_kbit_s(kib_per_s: f64) -> f64 {
    kib_per_s * 1024.0 * 8.0 / 1000.0 / LINK_EFFICIENCY
}

impl TargetReport {
    /// Sums up the intervals of a target.
    pub fn new(name: &str, source: &Source, intervals: Vec<Interval>) -> TargetReport {
        let seconds: f64 = intervals.iter().map(|i| i.seconds).sum();
        let read: u64 = intervals.iter().map(|i| i.read_bytes).sum();
        let write: u64 = intervals.iter().map(|i| i.write_bytes).sum();
        let rates: Vec<f64> = intervals
            .iter()
            .filter(|i| i.seconds > 0.0)
            .map(|i| i.write_bytes as f64 / 1024.0 / i.seconds)
            .collect();
        let avg = if seconds > 0.0 {
            write as f64 / 1024.0 / seconds
        } else {
            0.0
        };
        let peak = rates.iter().copied().fold(0.0, f64::max);
        let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
        TargetReport {
            name: name.to_owned(),
            kind: match source {
                Source::Disk(_) => "device",
                Source::File(_) => "file",
            }
            .into(),
            intervals,
            seconds,
            read_kib: read as f64 / 1024.0,
            write_kib: write as f64 / 1024.0,
            avg_write_kib_s: avg,
            peak_write_kib_s: peak,
            low_write_kib_s: if low.is_finite() { low } else { 0.0 },
            read_percent: if read + write > 0 {
                100.0 * read as f64 / (read + write) as f64
            } else {
                0.0
            },
            bandwidth_avg_kbit_s: bandwidth_kbit_s(avg),
            bandwidth_peak_kbit_s: bandwidth_kbit_s(peak),
        }
    }

    /// The report as text (≤ 80 columns).
    pub fn render(&self) -> String {
        let ratio = if self.kind == "file" {
            "n/a (files: writes only)".to_string()
        } else {
            format!(
                "{:.0}:{:.0} (read:write, percent)",
                self.read_percent,
                100.0 - self.read_percent
            )
        };
        format!(
            "{} ({}), {} interval(s) over {:.1} s\n\
             \x20 total      read {:.1} KiB, written {:.1} KiB\n\
             \x20 writes     average {:.1} KiB/s, peak {:.1} KiB/s, low {:.1} KiB/s\n\
             \x20 ratio      {ratio}\n\
             \x20 bandwidth  {:.1} kbit/s average, {:.1} kbit/s peak (20% overhead)\n",
            self.name,
            self.kind,
            self.intervals.len(),
            self.seconds,
            self.read_kib,
            self.write_kib,
            self.avg_write_kib_s,
            self.peak_write_kib_s,
            self.low_write_kib_s,
            self.bandwidth_avg_kbit_s,
            self.bandwidth_peak_kbit_s,
        )
    }
}

/// Parses a duration: seconds, or a number with `s`, `m`, `h` or `d`.
///
/// # Errors
/// Not a positive number with an optional unit.
pub fn parse_duration_s(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1.0),
        Some('m') => (&t[..t.len() - 1], 60.0),
        Some('h') => (&t[..t.len() - 1], 3600.0),
        Some('d') => (&t[..t.len() - 1], 86400.0),
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n * mult),
        _ => Err(format!(
            "{text:?} is not a duration (seconds, or e.g. 30s, 5m, 24h, 2d)"
        )),
    }
}

/// Parses a link rate in bit/s: a number with `bit`, `kbit`, `Mbit`,
/// `Gbit` (or `K`, `M`, `G`, decimal), e.g. `1Gbit`, `1.544M`.
///
/// # Errors
/// Not a positive rate.
pub fn parse_link_bits_s(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .trim_end_matches("/s")
        .trim_end_matches("ps")
        .trim_end_matches("bit")
        .trim_end_matches('b');
    let (num, mult) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1e3),
        Some('m') => (&stripped[..stripped.len() - 1], 1e6),
        Some('g') => (&stripped[..stripped.len() - 1], 1e9),
        Some('t') => (&stripped[..stripped.len() - 1], 1e12),
        _ => (stripped, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n * mult),
        _ => Err(format!(
            "{text:?} is not a link rate (e.g. 1Gbit, 100Mbit, 1.544Mbit)"
        )),
    }
}

/// Hours a full synchronisation of `bytes` takes over `bits_s` with 20% overhead.
pub fn sync_hours(bytes: f64, bits_s: f64) -> f64 {
    bytes * 8.0 / (bits_s * LINK_EFFICIENCY) / 3600.0
}

/// The async high water mark a link needs, from its rate and round trip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HwmAdvice {
    /// Bandwidth-delay product, bytes: what the link holds in flight.
    pub bdp_bytes: u64,
    /// Recommended `hwm_kib`: twice the bandwidth-delay product, rounded up
    /// to 64 KiB, never below the default.
    pub hwm_kib: u64,
}

/// `hwm_kib` for async mode over a link of `bits_s` with a round trip of
/// `rtt_s`: at least twice its bandwidth-delay product. Async mode stops
/// the application at the high water mark of unacknowledged data; with less
/// than one BDP the link idles while acks travel back, and sustained writes
/// reach the link rate only with about two (one in flight, one queued
/// behind it while the first is acknowledged).
pub fn hwm_advice(bits_s: f64, rtt_s: f64) -> HwmAdvice {
    let bdp_bytes = (bits_s / 8.0 * rtt_s).ceil() as u64;
    let two = (2 * bdp_bytes).div_ceil(1024).next_multiple_of(64);
    HwmAdvice {
        bdp_bytes,
        hwm_kib: two.max(gmd_core::config::HWM_KIB_DEFAULT),
    }
}

/// `gmdctl sizing --link RATE --rtt-ms MS` as text.
pub fn hwm_text(link_label: &str, bits_s: f64, rtt_ms: f64) -> String {
    let a = hwm_advice(bits_s, rtt_ms / 1000.0);
    format!(
        "link {link_label} ({:.3} Mbit/s), round trip {rtt_ms} ms\n\
         \x20 bandwidth-delay product  {} KiB\n\
         \x20 async high water mark    hwm_kib = {}  (2 x BDP: sustained writes\n\
         \x20                          reach the link rate; less caps them\n\
         \x20                          near hwm / round trip)\n",
        bits_s / 1e6,
        a.bdp_bytes.div_ceil(1024),
        a.hwm_kib,
    )
}

/// Common links and their rates in bit/s (reference table 20, and today's).
pub const LINKS: &[(&str, f64)] = &[
    ("T1", 1.544e6),
    ("E1", 2.048e6),
    ("10 Mbit Ethernet", 10e6),
    ("T3", 44.736e6),
    ("100 Mbit Ethernet", 100e6),
    ("155 Mbit ATM OC3", 155.52e6),
    ("622 Mbit ATM OC12", 622.08e6),
    ("1 Gbit Ethernet", 1e9),
    ("10 Gbit Ethernet", 10e9),
    ("25 Gbit Ethernet", 25e9),
];

/// Hours with three significant digits (at most 8 characters).
fn hours(h: f64) -> String {
    if h >= 100.0 {
        return format!("{h:.0}");
    }
    let magnitude = if h > 0.0 { h.log10().floor() as i64 } else { 0 };
    let decimals = (2 - magnitude).clamp(2, 6) as usize;
    format!("{h:.decimals$}")
}

/// The table of full synchronisation times (reference 3.8): hours per link
/// for 1, 10, 100 and 1000 GB (decimal, as the reference) and for `bytes`,
/// with a last line for `bytes` over `link_bits_s`.
pub fn sync_table(bytes: u64, size_label: &str, link_label: &str, link_bits_s: f64) -> String {
    let mut out = format!(
        "Hours to synchronise a whole device, 20% network overhead (reference 3.8)\n\
         {:<18} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
        "link", "Mbit/s", "1 GB", "10 GB", "100 GB", "1000 GB", size_label
    );
    let mut links: Vec<(String, f64)> = LINKS.iter().map(|(n, r)| (n.to_string(), *r)).collect();
    if !links.iter().any(|(_, r)| (*r - link_bits_s).abs() < 1.0) {
        links.push((format!("{link_label} (given)"), link_bits_s));
        links.sort_by(|a, b| a.1.total_cmp(&b.1));
    }
    for (name, rate) in &links {
        let mut line = format!("{:<18} {:>9}", name, format!("{:.3}", rate / 1e6));
        for gb in [1e9, 10e9, 100e9, 1000e9, bytes as f64] {
            line.push_str(&format!(" {:>8}", hours(sync_hours(gb, *rate))));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let h = sync_hours(bytes as f64, link_bits_s);
    let secs = (h * 3600.0).round() as u64;
    out.push_str(&format!(
        "{size_label} over {link_label}: {} h ({}h {:02}m {:02}s)\n",
        hours(h),
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_figures() {
        // Table 20: 1000 GB over T1 takes 1799.08 h; 1 GB over E1 1.39 h
        // (the reference takes E1 as 2 Mbit/s).
        assert!((sync_hours(1000e9, 1.544e6) - 1799.08).abs() < 0.01);
        assert!((sync_hours(1e9, 2e6) - 1.39).abs() < 0.01);
        // 3.7.1: 5753 bytes/s of writes need 58 kbit/s.
        let kbit = bandwidth_kbit_s(5753.0 / 1024.0);
        assert!((kbit - 57.5).abs() < 0.1, "{kbit}");
    }

    #[test]
    fn parses_diskstats_durations_and_rates() {
        let text =
            "   8       0 sda 100 0 2000 0 50 0 4000 0 0 0 0\n 259 0 nvme0n1 1 2 3 4 5 6 7 8 9";
        assert_eq!(
            parse_diskstats(text, "sda"),
            Some(Counters {
                read_bytes: 2000 * 512,
                write_bytes: 4000 * 512
            })
        );
        assert_eq!(parse_diskstats(text, "sdb"), None);
        assert_eq!(parse_duration_s("5m"), Ok(300.0));
        assert_eq!(parse_duration_s("2"), Ok(2.0));
        assert!(parse_duration_s("-1").is_err());
        assert_eq!(parse_link_bits_s("1Gbit"), Ok(1e9));
        assert_eq!(parse_link_bits_s("1.544Mbit"), Ok(1.544e6));
        assert_eq!(parse_link_bits_s("100M"), Ok(100e6));
        assert!(parse_link_bits_s("fast").is_err());
    }

    #[test]
    fn hwm_is_at_least_twice_the_bdp() {
        // 200 Mbit/s × 50 ms = 1.25 MB; twice that, rounded up to 64 KiB.
        let a = hwm_advice(200e6, 0.050);
        assert_eq!(a.bdp_bytes, 1_250_000);
        assert!(a.hwm_kib * 1024 >= 2 * a.bdp_bytes);
        assert_eq!(a.hwm_kib, 2496);
        // A LAN keeps the default.
        assert_eq!(hwm_advice(1e9, 0.0002).hwm_kib, 128);
        let t = hwm_text("200Mbit", 200e6, 50.0);
        assert!(t.contains("hwm_kib = 2496"), "{t}");
        for line in t.lines() {
            assert!(line.len() <= 80, "{line:?}");
        }
    }

    #[test]
    fn table_fits_eighty_columns() {
        let t = sync_table(1 << 40, "1 TiB", "1Gbit", 1e9);
        for line in t.lines() {
            assert!(line.len() <= 80, "{line:?}");
        }
        assert!(t.contains("1 TiB over 1Gbit: 3.05 h (3h 03m 15s)"), "{t}");
        let t = sync_table(1 << 40, "1 TiB", "40Gbit", 40e9);
        assert!(t.contains("40Gbit (given)"), "{t}");
    }
}
