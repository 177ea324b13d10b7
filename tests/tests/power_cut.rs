//! Power cuts of the secondary when its disk has a volatile write cache
//! ([`VolatileDisk`]: nbdkit's cache filter in writeback mode behind
//! nbdfuse and a direct-I/O loop device). First the harness itself: a cut
//! really loses what was written and not flushed, and keeps what was
//! flushed. Then an mwc pair whose secondary loses its power (and its
//! cache) in the middle of the primary's writes: after it comes back and
//! resynchronises, both copies are identical.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";
const MIB: u64 = 1 << 20;

fn pattern(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}

fn all(data: &[u8], byte: u8) -> bool {
    data.iter().all(|&b| b == byte)
}

fn file_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read");
    buf
}

#[test]
fn a_power_cut_loses_what_was_not_flushed_and_keeps_what_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file)
        .expect("create")
        .set_len(64 * MIB)
        .expect("truncate");
    let mut disk = VolatileDisk::new(
        &file,
        &dir.path().join("disk"),
        &dir.path().join("disk.dev"),
    );
    let dev = disk.link.clone();

    // Written, then flushed (fdatasync on the device): on the platters.
    write_direct(&dev, 0, &pattern(0xab, MIB), false);
    write_direct(&dev, 8 * MIB, &pattern(0xcd, MIB), true);
    // Written after the flush, never flushed: only in the cache.
    write_direct(&dev, 16 * MIB, &pattern(0xef, MIB), false);
    // The device serves it (from the cache)...
    assert!(all(&read_direct(&dev, 16 * MIB, MIB as usize), 0xef));
    // ...but the platters do not hold it.
    assert!(all(&file_range(&file, 0, MIB), 0xab), "flushed earlier");
    assert!(all(&file_range(&file, 8 * MIB, MIB), 0xcd), "flushed");
    assert!(
        all(&file_range(&file, 16 * MIB, MIB), 0),
        "an unflushed write reached the file: the cache is not volatile"
    );

    disk.cut();
    disk.restart();
    assert!(all(&read_direct(&dev, 0, MIB as usize), 0xab));
    assert!(all(&read_direct(&dev, 8 * MIB, MIB as usize), 0xcd));
    assert!(
        all(&read_direct(&dev, 16 * MIB, MIB as usize), 0),
        "the unflushed write survived the cut"
    );

    // And the same with a write that is flushed: it survives.
    write_direct(&dev, 16 * MIB, &pattern(0x11, MIB), true);
    disk.cut();
    disk.restart();
    assert!(all(&read_direct(&dev, 16 * MIB, MIB as usize), 0x11));
    disk.shut_down();
}

/// A running fio, killed when dropped (also when a test fails half-way).
struct Fio {
    child: Child,
    log: std::path::PathBuf,
}

impl Fio {
    /// fio's nbd engine on `url`: 4 KiB random writes over `offset..+size`,
    /// crc32c-verified at the end; `fsync` flushes after every that many
    /// writes (0: never).
    fn spawn(url: &str, offset: u64, size: u64, fsync: u32, log: &Path) -> Fio {
        let child = Command::new("fio")
            .args([
                "--name=powercut",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--rate_iops=1000",
                "--thread",
            ])
            .arg(format!("--uri={url}"))
            .arg(format!("--offset={offset}"))
            .arg(format!("--size={size}"))
            .arg(format!("--fsync={fsync}"))
            .arg(format!("--output={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio");
        Fio {
            child,
            log: log.to_owned(),
        }
    }

    /// Waits for fio (bounded) and checks it wrote and verified everything.
    #[track_caller]
    fn assert_clean(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let status = status.unwrap_or_else(|| panic!("fio did not finish in {timeout:?}:\n{text}"));
        assert!(status.success(), "fio failed:\n{text}");
        assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
        assert!(!text.contains("verify:"), "fio found bad data:\n{text}");
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example cluster in `mode` (sync or mwc) with beta's data volume and state map on
/// [`VolatileDisk`]s (one cache each, cut together), both sides
/// initialised as zeroed volumes.
fn cluster_with_volatile_secondary(mode: &str) -> (Cluster, VolatileDisk, VolatileDisk) {
    let cluster = Cluster::with_config(|text| {
        text.replace("promote_failure_timeout = 5", "promote_failure_timeout = 2")
            .replace("mode = \"mwc\"", &format!("mode = \"{mode}\""))
            .replace("data = \"beta/data10.img\"", "data = \"beta/data10.dev\"")
            .replace(
                "state_map = \"beta/data10.sm\"",
                "state_map = \"beta/data10.smdev\"",
            )
    });
    let text = std::fs::read_to_string(&cluster.config).expect("config");
    assert!(text.contains("beta/data10.smdev") && text.contains("beta/data10.dev"));
    let map_bytes =
        gmd_core::statemap::format::Layout::for_regions(gmd_core::units::region_count(DEVICE_SIZE))
            .file_size_bytes();
    std::fs::File::create(cluster.path("beta/data10.sm"))
        .expect("map file")
        .set_len(map_bytes)
        .expect("truncate");
    let data = VolatileDisk::new(
        &cluster.path("beta/data10.img"),
        &cluster.path("beta/disk-data"),
        &cluster.path("beta/data10.dev"),
    );
    let map = VolatileDisk::new(
        &cluster.path("beta/data10.sm"),
        &cluster.path("beta/disk-map"),
        &cluster.path("beta/data10.smdev"),
    );
    cluster.init_zeroed();
    (cluster, data, map)
}

/// 64 KiB pieces of `offset..+len` on beta's platters that do not hold `byte`.
fn pieces_lacking(path: &Path, offset: u64, len: u64, byte: u8) -> usize {
    file_range(path, offset, len)
        .chunks(65536)
        .filter(|c| !all(c, byte))
        .count()
}

/// Waits until the resync to beta has moved half of its regions or more, not all.
fn resync_half_way(alpha: &Gmdd) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(
        "the resync to be under way",
        Duration::from_secs(60),
        || {
            last = alpha.status_json(DEV)["link"].clone();
            let (total, left) = (
                last["resync_total"].as_u64().unwrap_or(0),
                last["resync_remaining"].as_u64().unwrap_or(0),
            );
            last["connected"] == true && left > 0 && left <= total / 2
        },
    );
    last
}

/// An mwc or sync pair whose secondary (data and map on [`VolatileDisk`]s)
/// loses its power during the primary's writes, with and without flushes;
/// with `again_in_resync`, a second time while it resynchronises. In the
/// end both copies are identical.
fn secondary_power_cut(mode: &str, again_in_resync: bool) {
    let (cluster, mut data, mut map) = cluster_with_volatile_secondary(mode);
    let (alpha, beta) = cluster.start_pair();
    let beta_file = cluster.path("beta/data10.img");

    // A flush that completed on the primary: beta's disk flushed too.
    let mut raw = RawNbd::connect(&alpha.nbd, DEV).expect("NBD handshake");
    for i in 0..16 {
        assert_eq!(raw.write(160 * MIB + i * 65536, &[0x66; 65536]).unwrap(), 0);
    }
    assert_eq!(raw.flush().unwrap(), 0);
    assert_eq!(
        pieces_lacking(&beta_file, 160 * MIB, MIB, 0x66),
        0,
        "a completed flush left writes in beta's volatile cache"
    );

    // Writes with flushes (each flush is a barrier: beta's disk flushes).
    let flushed = Fio::spawn(
        &alpha.url(DEV),
        64 * MIB,
        16 * MIB,
        16,
        &cluster.path("fio-flushed.log"),
    );
    // Writes that are never flushed, still running when the power goes.
    let unflushed = Fio::spawn(
        &alpha.url(DEV),
        0,
        48 * MIB,
        0,
        &cluster.path("fio-unflushed.log"),
    );
    flushed.assert_clean(Duration::from_secs(60));
    // Acknowledged by alpha (beta received them), never flushed.
    for i in 0..16 {
        assert_eq!(raw.write(128 * MIB + i * 65536, &[0x77; 65536]).unwrap(), 0);
    }
    drop(raw);
    let written_unflushed = Instant::now();

    power_cut(beta, &mut [&mut data, &mut map]);
    let lost = pieces_lacking(&beta_file, 128 * MIB, MIB, 0x77);
    eprintln!(
        "{mode}: the cut lost {lost} of 16 acknowledged, unflushed 64 KiB writes on beta's \
         platters ({:?} after they were acknowledged)",
        written_unflushed.elapsed()
    );
    assert!(
        lost > 0,
        "nothing unflushed was lost: the cut did not test what it should"
    );
    assert_eq!(pieces_lacking(&beta_file, 160 * MIB, MIB, 0x66), 0);
    alpha.wait_mirroring(DEV, false);

    // Power back: the same platters, an empty cache, a new gmdd that
    // restores the device and resynchronises.
    data.restart();
    map.restart();
    let mut beta = cluster.gmdd("beta");
    if again_in_resync {
        let link = resync_half_way(&alpha);
        eprintln!("{mode}: cut again during the resync: {link}");
        power_cut(beta, &mut [&mut data, &mut map]);
        alpha.wait_mirroring(DEV, false);
        data.restart();
        map.restart();
        beta = cluster.gmdd("beta");
    }
    alpha.wait_mirroring(DEV, true);
    unflushed.assert_clean(Duration::from_secs(120));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    eprintln!(
        "{mode}: alpha after the resync: {}",
        alpha.status_json(DEV)["link"]
    );
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    data.flush();
    map.flush();
    assert_same_files(&cluster.path("alpha/data10.img"), &beta_file);
    beta.terminate();
    data.shut_down();
    map.shut_down();
}

#[test]
fn an_mwc_secondary_that_loses_power_and_its_disk_cache_is_made_whole_again() {
    secondary_power_cut("mwc", false);
}

#[test]
fn a_sync_secondary_that_loses_power_and_its_disk_cache_is_made_whole_again() {
    secondary_power_cut("sync", false);
}

#[test]
fn an_mwc_secondary_that_loses_power_again_during_its_resync_is_made_whole() {
    secondary_power_cut("mwc", true);
}
