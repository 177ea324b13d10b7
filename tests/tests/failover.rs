//! Failover and failback with a filesystem, as an operator runs them: ext4
//! on alpha (primary, mwc), alpha's gmdd killed with SIGKILL, beta taken
//! over by hand (`gmdctl down`, `gmdctl primary`) and the filesystem
//! mounted there; alpha's gmdd restarted comes back secondary by itself,
//! receives what beta wrote, and the pair is switched back.

use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Region size (one state map cell).
const REGION: u64 = 32 << 10;

#[test]
fn failover_to_the_secondary_and_back_with_ext4() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();

    // Production on alpha: ext4 made, mounted, files written and fsynced.
    let mut fs = Ext4::attach(&alpha.url(DEV), &cluster.path("on-alpha"));
    fs.mkfs();
    fs.mount();
    let mut before = write_files(&fs.mnt, "written-long-ago", 16);
    // The regions written so far leave the activity set after 30 s idle
    // (their marks are cleared): as on a volume in use for a while, alpha's
    // map marks only what it wrote recently when it fails.
    wait_for(
        "alpha's hot regions to cool",
        Duration::from_secs(60),
        || alpha.status_json(DEV)["map"]["hot"] == 0,
    );
    before.extend(write_files(&fs.mnt, "before-failure", 32));

    // alpha's machine dies: its gmdd is killed, its host loses the mount.
    alpha.kill9();
    fs.abandon();

    // The operator takes over on beta.
    let down = beta.ctl(&["down", DEV, "alpha"]).ok();
    assert_eq!(
        beta.status_json(DEV)["link"]["connected"],
        false,
        "{down:?}"
    );
    let promoted = beta.ctl(&["primary", DEV, "--json"]).ok();
    let promoted: serde_json::Value = serde_json::from_str(&promoted.stdout).expect("json");
    assert_eq!(promoted["previous"], "secondary", "{promoted}");
    assert_eq!(promoted["role"], "primary", "{promoted}");
    assert_eq!(beta.status_json(DEV)["role"], "primary");

    // The filesystem on beta: mounted (its journal is replayed), every file
    // fsynced before the failure is there; more files written.
    let mut fs = Ext4::attach(&beta.url(DEV), &cluster.path("on-beta"));
    assert!(
        fs.needs_recovery(),
        "beta's copy is as alpha's crash left it"
    );
    fs.mount();
    let wrong = wrong_files(&fs.mnt, &before);
    assert!(
        wrong.is_empty(),
        "files wrong on beta after failover: {wrong:?}"
    );
    let mut after = write_files(&fs.mnt, "after-failover", 24);
    fs.umount();
    let fsck = fs.fsck();
    assert_eq!(fsck.code, 0, "e2fsck on beta:\n{}", fsck.text());
    // Production goes on on beta.
    fs.mount();

    // What the resync may move: what beta wrote since the takeover (its
    // stale regions) and alpha's own marks (hot and in-flight regions of
    // its map as the crash left it).
    let beta_wrote = beta.status_json(DEV)["map"]["stale"].as_u64().unwrap();
    assert!(beta_wrote > 0, "beta's writes must be marked stale");
    let alpha_marks = marked_regions(&cluster.path("alpha/data10.sm"));
    let sent_before = beta.status_json(DEV)["link"]["resync_bytes_sent"]
        .as_u64()
        .unwrap();

    // alpha's gmdd restarts, and nobody types anything there: it must come
    // back secondary (beta is primary now) and receive beta's data.
    let alpha = cluster.gmdd("alpha");
    wait_for(
        "alpha's device to be restored",
        Duration::from_secs(30),
        || alpha.status_json(DEV)["state"] == "AVAILABLE",
    );
    let status = alpha.status_json(DEV);
    assert_eq!(status["role"], "secondary", "{status:#}");
    let note = status["role_note"].as_str().unwrap_or_default();
    assert!(note.contains("beta"), "the note names beta: {status:#}");
    // beta writes on while alpha catches up.
    after.extend(write_files(&fs.mnt, "during-failback", 8));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let status = alpha.status_json(DEV);
    assert_eq!(status["link"]["resync_role"], "target", "{status:#}");
    assert_eq!(status["link"]["resync_basis"], "ahead", "{status:#}");
    assert_eq!(status["link"]["resync_full"], false, "{status:#}");
    let regions = status["link"]["resync_total"].as_u64().unwrap();
    let sent = beta.status_json(DEV)["link"]["resync_bytes_sent"]
        .as_u64()
        .unwrap()
        - sent_before;
    let bound = (2 * beta_wrote + alpha_marks) * REGION;
    eprintln!(
        "failback: beta wrote {beta_wrote} region(s) since the takeover, alpha's map held \
         {alpha_marks} mark(s); the resync covered {regions} region(s): {sent} bytes sent by \
         beta (bound {bound}); {} of alpha's region(s) discarded",
        status["link"]["discarded_regions"]
    );
    // Measured (2 cores, loopback): beta wrote 235 regions (journal
    // replay, 24 files and their metadata); alpha's map held 305 marks (the
    // 32 files written in its last 30 s, hot at the crash); the resync
    // covered 533 regions (the union), 17 465 344 bytes sent by beta,
    // against a bound of 775 regions (25 395 200 bytes).
    // alpha's marks are counted as discarded: after a crash its hot regions
    // may hide writes beta never got.
    assert!(regions > 0 && regions <= 2 * beta_wrote + alpha_marks);
    assert!(sent <= bound, "beta sent {sent} bytes, more than {bound}");
    assert_eq!(
        sent,
        regions * REGION,
        "each region of the resync is sent once"
    );
    assert_eq!(
        status["link"]["discarded_regions"], alpha_marks,
        "{status:#}"
    );
    assert!(
        alpha
            .log_text()
            .contains("are overwritten by its newer data"),
        "alpha logs the regions it discards:\n{}",
        alpha.log_text()
    );

    // Switch back: beta's filesystem unmounted (and checked), beta
    // secondary (flushed), alpha primary.
    fs.umount();
    let fsck = fs.fsck();
    assert_eq!(fsck.code, 0, "e2fsck on beta:\n{}", fsck.text());
    let refused = beta.ctl(&["secondary", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(refused.stderr.contains("NBD client"), "{}", refused.text());
    fs.detach();
    beta.wait_no_clients(DEV);
    let demoted = beta.ctl(&["secondary", DEV, "--json"]).ok();
    let demoted: serde_json::Value = serde_json::from_str(&demoted.stdout).expect("json");
    assert_eq!(
        (&demoted["previous"], &demoted["role"]),
        (&"primary".into(), &"secondary".into()),
        "{demoted}"
    );
    alpha.ctl(&["primary", DEV]).ok();
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    assert_eq!(beta.status_json(DEV)["role"], "secondary");

    // Production on alpha again: every file of both phases is there.
    let mut fs = Ext4::attach(&alpha.url(DEV), &cluster.path("on-alpha-again"));
    fs.mount();
    let mut all = before;
    all.extend(after);
    let wrong = wrong_files(&fs.mnt, &all);
    assert!(
        wrong.is_empty(),
        "files wrong on alpha after failback: {wrong:?}"
    );
    fs.umount();
    let fsck = fs.fsck();
    assert_eq!(fsck.code, 0, "e2fsck on alpha:\n{}", fsck.text());
    fs.detach();
    alpha.wait_no_clients(DEV);

    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
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
fn a_primary_restarted_while_its_peer_is_unreachable_comes_back_secondary() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x5c 4M 1M"]));
    // Both machines fail, alpha first: its map still has beta as a peer in
    // step, not recorded down.
    alpha.kill9();
    beta.kill9();

    // alpha's gmdd alone: beta may be primary on the other side of a
    // partition for all alpha knows, so it does not write.
    let alpha = cluster.gmdd("alpha");
    wait_for(
        "alpha's device to be restored",
        Duration::from_secs(30),
        || alpha.status_json(DEV)["state"] == "AVAILABLE",
    );
    let status = alpha.status_json(DEV);
    assert_eq!(status["role"], "secondary", "{status:#}");
    assert_eq!(status["configured_role"], "none", "{status:#}");
    let note = status["role_note"].as_str().unwrap_or_default();
    assert!(note.contains("beta"), "{status:#}");
    let write = qemu_io(&alpha.url(DEV), &["write -P 0x5d 4M 64k"]);
    assert!(
        write.code != 0 || write.text().to_lowercase().contains("error"),
        "alpha must refuse writes:\n{}",
        write.text()
    );
    // Promoting it is refused until beta is known to be down.
    let refused = alpha.ctl(&["primary", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(
        refused.stderr.contains("gmdctl down data10gmd beta"),
        "{}",
        refused.text()
    );

    // beta comes back (secondary, as it ran): the pair mirrors, the
    // crash's marks are resynchronised, and alpha may be primary again.
    let beta = cluster.gmdd("beta");
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
    alpha.ctl(&["primary", DEV]).ok();
    let read = qemu_io(&alpha.url(DEV), &["read -P 0x5c 4M 1M"]);
    assert_qemu_io_clean(&read);
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
fn a_primary_restarted_with_its_peer_recorded_down_comes_back_primary() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    // beta fails first: alpha goes on alone and records it down.
    beta.kill9();
    // Once status shows the link gone, the down record is there too (a
    // promotion asked at that moment is not refused).
    alpha.wait_mirroring(DEV, false);
    let status = alpha.status_json(DEV);
    assert_eq!(status["peers"][0]["down"], true, "{status:#}");
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x4d 8M 512k"]));
    // Then alpha: restarted alone, it may write again at once.
    alpha.kill9();
    let alpha = cluster.gmdd("alpha");
    wait_for(
        "alpha's device to be restored",
        Duration::from_secs(30),
        || alpha.status_json(DEV)["state"] == "AVAILABLE",
    );
    let status = alpha.status_json(DEV);
    assert_eq!(status["role"], "primary", "{status:#}");
    assert!(status["role_note"].is_null(), "{status:#}");
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["read -P 0x4d 8M 512k", "write -P 0x4e 9M 512k"],
    ));
    // beta returns and receives what it missed.
    let beta = cluster.gmdd("beta");
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}

#[test]
fn a_peer_whose_device_restarted_gets_the_hot_regions_again() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    // 4 MiB mirrored and acknowledged: 128 regions hot on alpha.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x3c 16M 4M"]));
    let hot = alpha.status_json(DEV)["map"]["hot"].as_u64().unwrap();
    assert!(hot >= 128, "{hot} hot region(s)");
    let sent_before = alpha.status_json(DEV)["link"]["resync_bytes_sent"]
        .as_u64()
        .unwrap();
    // beta's gmdd is killed and restarted: what its disk cache held may be
    // lost, so alpha sends its hot regions again.
    beta.kill9();
    let beta = cluster.gmdd("beta");
    alpha.wait_mirroring(DEV, true);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let link = &alpha.status_json(DEV)["link"];
    let sent = link["resync_bytes_sent"].as_u64().unwrap() - sent_before;
    assert_eq!(link["resync_role"], "source", "{link:#}");
    assert!(
        link["resync_total"].as_u64().unwrap() >= 128 && sent >= 128 * REGION,
        "alpha resends its hot regions ({sent} bytes): {link:#}"
    );
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}
