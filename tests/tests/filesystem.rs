//! A filesystem on a mirrored device: ext4 made and mounted on alpha
//! through nbdfuse + loop, files written while mirroring and while the
//! network is cut, the cut healed and the stale regions resynchronised;
//! then beta's copy, attached read-only, checks clean with e2fsck and holds
//! every file alpha wrote.

use std::path::{Path, PathBuf};
use std::process::Command;

use gmd_tests::*;

const DEV: &str = "data10gmd";

/// Writes `count` files into `dir/<tag>/`, returning what each must hold.
fn write_files(dir: &Path, tag: &str, count: u32) -> Vec<(PathBuf, Vec<u8>)> {
    let sub = dir.join(tag);
    std::fs::create_dir_all(&sub).expect("mkdir");
    (0..count)
        .map(|i| {
            // Sizes from a few bytes to ~600 KiB, spread over many regions.
            let len = (i as usize * 104_729 + 13) % (600 << 10);
            let content: Vec<u8> = (0..len)
                .map(|b| (b as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8)
                .collect();
            let path = sub.join(format!("file{i}"));
            std::fs::write(&path, &content).expect("write");
            (path, content)
        })
        .collect()
}

fn sync_fs() {
    run(&mut Command::new("sync")).ok();
}

#[test]
fn ext4_written_through_a_cut_is_whole_on_the_peer() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    let attached = NbdLoop::attach(&alpha.url(DEV), cluster.dir.path());
    let dev = attached.loop_dev.clone();
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev])).ok();
    let mnt = cluster.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&dev).arg(&mnt)).ok();

    let mut expected = write_files(&mnt, "mirrored", 24);
    sync_fs();

    // Cut the network: after the promote-failure timeout alpha goes on
    // alone and marks what it writes stale.
    let cut = Cut::new(&cluster.geomessage_ports());
    expected.extend(write_files(&mnt, "during-cut", 24));
    std::fs::remove_file(&expected[0].0).unwrap();
    expected.remove(0);
    sync_fs();
    alpha.wait_mirroring(DEV, false);
    let stale = alpha.status_json(DEV)["map"]["stale"].as_u64().unwrap();
    assert!(stale > 0, "writes during the cut must be marked stale");

    // Heal: the link comes back and the stale regions are resynchronised,
    // while the filesystem stays mounted and in use.
    cut.heal();
    alpha.wait_mirroring(DEV, true);
    expected.extend(write_files(&mnt, "after-heal", 8));
    sync_fs();
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);

    run(Command::new("umount").arg(&mnt)).ok();
    attached.detach();
    wait_for(
        "alpha's export to close",
        std::time::Duration::from_secs(10),
        || alpha.ctl(&["stop", DEV]).code == 0,
    );
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );

    // beta's copy, as a disaster-recovery site would use it: read-only.
    let beta_loop = run(Command::new("losetup")
        .args(["-r", "-f", "--show"])
        .arg(cluster.path("beta/data10.img")))
    .ok()
    .stdout
    .trim()
    .to_owned();
    let fsck = run(Command::new("e2fsck").args(["-fn", &beta_loop]));
    let beta_mnt = cluster.path("beta-mnt");
    std::fs::create_dir_all(&beta_mnt).unwrap();
    let mounted = run(Command::new("mount")
        .args(["-o", "ro"])
        .arg(&beta_loop)
        .arg(&beta_mnt));
    let mut wrong = Vec::new();
    if mounted.code == 0 {
        for (path, content) in &expected {
            let on_beta = beta_mnt.join(path.strip_prefix(&mnt).unwrap());
            if std::fs::read(&on_beta).ok().as_ref() != Some(content) {
                wrong.push(on_beta.display().to_string());
            }
        }
        let deleted = beta_mnt.join("mirrored/file0");
        if deleted.exists() {
            wrong.push(format!("{} (deleted on alpha)", deleted.display()));
        }
        run(Command::new("umount").arg(&beta_mnt)).ok();
    }
    run(Command::new("losetup").args(["-d", &beta_loop])).ok();
    assert_eq!(fsck.code, 0, "e2fsck on beta's copy:\n{}", fsck.text());
    assert_eq!(mounted.code, 0, "mount beta's copy:\n{}", mounted.text());
    assert!(wrong.is_empty(), "files wrong on beta: {wrong:?}");
}
