//! A peer that stays reachable but acknowledges nothing — its disk hangs
//! (here: beta's files sit on an ext4 frozen with `fsfreeze`) — must not hold
//! the primary's applications forever. GeoMessage still answers pings, so the
//! promote-failure timeout never fires; the engine notices that nothing it
//! sent was answered for the stall limit (the promote-failure timeout, at
//! least 30 s), drops the peer, completes the waiting writes with their
//! regions stale and resynchronises them once the peer answers again.

use std::process::Command;
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";

/// beta's directory moved onto a loop-mounted ext4 that the test can freeze.
struct FreezableDir {
    mount: std::path::PathBuf,
}

impl FreezableDir {
    fn over(cluster: &Cluster, machine: &str) -> FreezableDir {
        let mount = cluster.path(machine);
        let saved = cluster.path(&format!("{machine}.saved"));
        let image = cluster.path(&format!("{machine}.fs.img"));
        std::fs::rename(&mount, &saved).expect("move beta's files aside");
        std::fs::create_dir(&mount).expect("mkdir");
        let f = std::fs::File::create(&image).expect("fs image");
        f.set_len(DEVICE_SIZE + (128 << 20)).expect("size");
        drop(f);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)).ok();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount))
        .ok();
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg("-a")
            .arg(saved.join("."))
            .arg(&mount))
        .ok();
        FreezableDir { mount }
    }

    fn freeze(&self) {
        run(Command::new("fsfreeze").arg("-f").arg(&self.mount)).ok();
    }

    fn thaw(&self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).status();
    }
}

impl Drop for FreezableDir {
    fn drop(&mut self) {
        self.thaw();
        let umount = Command::new("umount").arg("-l").arg(&self.mount).output();
        if !umount.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cannot unmount {}: {umount:?}", self.mount.display());
        }
    }
}

#[test]
fn a_peer_whose_disk_hangs_is_dropped_and_resynchronised_later() {
    let cluster = Cluster::with_mode("mwc", 2);
    let frozen = FreezableDir::over(&cluster, "beta");
    let (alpha, beta) = cluster.start_pair();
    let url = alpha.url(DEV);
    assert_qemu_io_clean(&qemu_io(&url, &["write -P 0x11 0 1M"]));
    alpha.wait_in_sync(DEV);

    frozen.freeze();
    let began = Instant::now();
    // mwc: the write waits for beta, whose disk does not answer. It must
    // still complete, once the stall limit (30 s) dropped beta.
    let result = run(Command::new("timeout")
        .args(["180", "qemu-io", "-f", "raw", &url])
        .args(["-c", "write -P 0x22 8M 256k"]));
    let waited = began.elapsed();
    assert_qemu_io_clean(&result);
    assert!(
        waited < Duration::from_secs(150),
        "the write waited {waited:?} for a stuck peer"
    );
    let status = alpha.status_json(DEV);
    assert_eq!(status["link"]["connected"], false, "{status:#}");
    assert!(
        status["map"]["stale"].as_u64().unwrap() >= 8,
        "the regions written without beta must be stale: {status:#}"
    );
    assert!(
        alpha.log_text().contains("acknowledged nothing"),
        "alpha must say why it dropped beta:\n{}",
        alpha.log_text()
    );
    let stat = alpha.stat(&["-l", DEV, "--json"]).ok();
    let json: serde_json::Value = serde_json::from_str(stat.stdout.trim()).expect("gmdstat json");
    assert_eq!(json["devices"][0]["mirrored"]["stalls"], 1, "{json:#}");
    // Alpha goes on serving alone while beta is stuck.
    assert_qemu_io_clean(&qemu_io(&url, &["write -P 0x33 16M 64k"]));

    frozen.thaw();
    alpha.wait_mirroring(DEV, true);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    assert_qemu_io_clean(&qemu_io(
        &url,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 8M 256k",
            "read -P 0x33 16M 64k",
        ],
    ));
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
    drop(beta);
    drop(frozen);
}
