//! What a pair copies when its copies meet: a blank replacement volume gets
//! a full copy, two new zeroed volumes copy nothing, and a resync whose
//! source's gmdd is killed half-way resumes by itself once it restarts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Region size (one state map cell).
const REGION: u64 = 32 << 10;
/// Regions of the test device.
const REGIONS: u64 = DEVICE_SIZE / REGION;

#[test]
fn two_new_zeroed_volumes_mirror_without_a_resync() {
    let cluster = Cluster::new();
    let (alpha, beta) = cluster.start_pair();
    for gmdd in [&alpha, &beta] {
        let link = &gmdd.status_json(DEV)["link"];
        assert_eq!(link["resync_total"], 0, "{}: {link:#}", gmdd.machine);
        assert_eq!(link["resync_full"], false, "{}: {link:#}", gmdd.machine);
        assert_eq!(link["resync_bytes_sent"], 0, "{}: {link:#}", gmdd.machine);
    }
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x5a 8M 1M"]));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    for gmdd in [&alpha, &beta] {
        let link = &gmdd.status_json(DEV)["link"];
        assert_eq!(link["resync_bytes_sent"], 0, "{}: {link:#}", gmdd.machine);
    }
    // beta got the write, and only the write.
    let applied = beta.stat_json(DEV)["remote"]["write_bytes"].as_u64();
    assert_eq!(applied, Some(1 << 20));
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    // A clean stop of a connected pair leaves both maps clean.
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}

#[test]
fn a_blank_replacement_volume_receives_a_full_copy() {
    // A full copy of 256 MiB: more resync data in flight than the default.
    let cluster = Cluster::with_config(|t| {
        t.replace("sync_rate_kib = 32", "sync_rate_kib = 2048")
            .replace("promote_failure_timeout = 5", "promote_failure_timeout = 2")
    });
    cluster.init_zeroed();
    let (alpha, beta) = cluster.start_pair();
    let writes = [
        "write -P 0x11 0 4M",
        "write -P 0x22 100M 3M",
        "write -P 0x33 250M 2M",
    ];
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &writes));
    alpha.wait_in_sync(DEV);

    // beta's disk is replaced by a blank one: a new data file, a new map
    // that says the volume holds no known data.
    beta.ctl(&["stop", DEV]).ok();
    beta.ctl(&["unconfigure", DEV]).ok();
    let data = cluster.path("beta/data10.img");
    std::fs::remove_file(&data).unwrap();
    std::fs::File::create(&data)
        .unwrap()
        .set_len(DEVICE_SIZE)
        .unwrap();
    beta.ctl(&["init-state", DEV, "--force"]).ok();
    let gens = &beta.status_json(DEV)["generations"];
    assert!(gens.is_null() || gens["current"] == 0, "{gens}");
    // alpha writes on while beta is away.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x44 50M 1M"]));
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["start", DEV]).ok();
    beta.wait_mirroring(DEV, true);
    let status = beta.status_json(DEV);
    let link = &status["link"];
    assert_eq!(link["resync_role"], "target", "{status:#}");
    assert_eq!(link["resync_basis"], "target_empty", "{status:#}");
    assert_eq!(link["resync_full"], true, "{status:#}");
    assert_eq!(link["resync_total"], REGIONS, "{status:#}");
    assert_eq!(status["role"], "secondary", "{status:#}");
    let alpha_link = &alpha.status_json(DEV)["link"];
    assert_eq!(alpha_link["resync_role"], "source", "{alpha_link:#}");
    assert_eq!(alpha_link["resync_full"], true, "{alpha_link:#}");
    // The application writes on during the copy.
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 0x55 200M 1M", "write -P 0x66 2M 64k"],
    ));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let sent = alpha.status_json(DEV)["link"]["resync_bytes_sent"].as_u64();
    assert_eq!(sent, Some(DEVICE_SIZE), "every region sent once");
    // The copy now holds alpha's data: its generation is alpha's.
    assert_eq!(
        alpha.status_json(DEV)["generations"]["current"],
        beta.status_json(DEV)["generations"]["current"]
    );
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    // A clean stop of a connected pair leaves both maps clean.
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(&cluster.path("alpha/data10.img"), &data);
}

/// Data written by fio: 4 KiB blocks with crc32c headers, in `size` bytes.
fn fio_args(url: &str, size: &str, verify_only: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=alone",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=256k",
        "--verify_interval=4096",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--thread",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--uri={url}"));
    args.push(format!("--size={size}"));
    if verify_only {
        args.push("--verify_only".into());
    }
    args
}

/// Runs fio to completion (at most `timeout`) and checks it reported no
/// error and no bad data.
#[track_caller]
fn fio_clean(args: &[String], log: &std::path::Path, timeout: Duration) {
    let mut child: Child = Command::new("fio")
        .args(args)
        .arg(format!("--output={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fio did not finish in {timeout:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "fio failed:\n{text}");
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    assert!(!text.contains("verify:"), "fio found bad data:\n{text}");
    if args.iter().any(|a| a == "--verify_only") {
        assert!(
            text.contains("read: IOPS"),
            "fio read nothing back:\n{text}"
        );
    }
}

#[test]
fn a_resync_resumes_by_itself_after_its_source_is_killed() {
    let cluster = Cluster::with_mode("mwc", 2);
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    // alpha works alone (beta recorded down) and writes a lot.
    alpha.start_standalone(DEV, "beta");
    let size = "160M";
    fio_clean(
        &fio_args(&alpha.url(DEV), size, false),
        &cluster.path("fio-write.log"),
        Duration::from_secs(120),
    );
    let stale = alpha.status_json(DEV)["map"]["stale"].as_u64().unwrap();
    assert_eq!(stale, (160 << 20) / REGION, "every written region is stale");
    // Regions written in the last 30 s are hot (in the activity set): once
    // resynchronised their mark stays 0x5, and a crash makes every hot
    // region be sent again. Data written earlier is the case where a
    // resync interrupted by a crash resumes with only what was left.
    std::thread::sleep(Duration::from_secs(32));

    // beta joins and receives alpha's regions; alpha's gmdd is killed
    // half-way through.
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["start", DEV]).ok();
    beta.wait_mirroring(DEV, true);
    let mut progress = (0, 0);
    wait_for(
        "the resync to be under way",
        Duration::from_secs(60),
        || {
            let link = &beta.status_json(DEV)["link"];
            progress = (
                link["resync_total"].as_u64().unwrap_or(0),
                link["resync_remaining"].as_u64().unwrap_or(0),
            );
            progress.0 > 0 && progress.1 > 0 && progress.1 < progress.0 * 3 / 4
        },
    );
    alpha.kill9();
    let (total, remaining) = progress;
    assert_eq!(total, stale);
    // What the crash leaves on alpha's map: the regions not yet confirmed,
    // and those confirmed whose marks wait for a barrier.
    let left = marked_regions(&cluster.path("alpha/data10.sm"));
    eprintln!(
        "alpha killed with {remaining} of {total} region(s) left to resync; its map marks {left}"
    );
    assert!(left <= remaining + 16, "alpha's map marks {left} region(s)");
    // beta knows what it lacks, durably: regions not received.
    let status = beta.status_json(DEV);
    assert!(
        status["map"]["inconsistent"].as_u64().unwrap() > 0,
        "{status:#}"
    );

    // alpha's gmdd restarts; nobody types anything.
    let alpha = cluster.gmdd("alpha");
    wait_for(
        "alpha's device to be restored",
        Duration::from_secs(30),
        || alpha.status_json(DEV)["state"] == "AVAILABLE",
    );
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let link = &beta.status_json(DEV)["link"];
    assert_eq!(link["resync_role"], "target", "{link:#}");
    let resumed = link["resync_total"].as_u64().unwrap();
    eprintln!("the resync resumed with {resumed} region(s)");
    assert!(
        resumed <= left,
        "the resumed resync covers only what was left ({resumed}; alpha's map marked {left})"
    );

    // Both copies read back what fio wrote; then byte for byte identical.
    fio_clean(
        &fio_args(&alpha.url(DEV), size, true),
        &cluster.path("fio-verify-alpha.log"),
        Duration::from_secs(120),
    );
    fio_clean(
        &fio_args(&beta.url(DEV), size, true),
        &cluster.path("fio-verify-beta.log"),
        Duration::from_secs(120),
    );
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    // A clean stop of a connected pair leaves both maps clean.
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}
