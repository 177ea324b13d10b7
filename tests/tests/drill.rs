//! A disaster-recovery drill: while production runs on alpha (ext4 mounted,
//! mwc), the secondary copy on beta is split off (`gmdctl split`), mounted
//! read-write there and written; `gmdctl rejoin` then discards the drill's
//! writes and resynchronises beta from alpha, which wrote on meanwhile.

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Region size (one state map cell).
const REGION: u64 = 32 << 10;

/// `N region(s) (B bytes)` in rejoin's report.
fn rejoin_figures(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("resynchronising"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "resynchronising")?;
    let regions = words.next()?.parse().ok()?;
    words.next()?; // "region(s)"
    let bytes = words.next()?.trim_start_matches('(').parse().ok()?;
    Some((regions, bytes))
}

#[test]
fn a_drill_on_the_secondary_is_discarded_at_rejoin() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    let mut prod = Ext4::attach(&alpha.url(DEV), &cluster.path("on-alpha"));
    prod.mkfs();
    prod.mount();
    let mut expected = write_files(&prod.mnt, "before-drill", 24);

    // The drill starts: beta's copy is split off, writable there.
    let split = beta.ctl(&["split", DEV, "--json"]).ok();
    let split: serde_json::Value = serde_json::from_str(&split.stdout).expect("json");
    assert_eq!(split["previous"], "secondary", "{split}");
    assert_eq!(split["role"], "split", "{split}");
    assert_eq!(beta.status_json(DEV)["role"], "split");
    alpha.wait_mirroring(DEV, false);
    assert_eq!(alpha.status_json(DEV)["role"], "primary");

    // The split copy is crash-consistent: mounted (journal replay), it
    // holds production's files; the drill writes its own and deletes one.
    let mut drill = Ext4::attach(&beta.url(DEV), &cluster.path("on-beta"));
    assert!(drill.needs_recovery(), "the split copy is crash-consistent");
    drill.mount();
    let wrong = wrong_files(&drill.mnt, &expected);
    assert!(wrong.is_empty(), "the split copy lacks: {wrong:?}");
    let drill_files = write_files(&drill.mnt, "drill", 16);
    std::fs::remove_file(drill.mnt.join(&expected[1].0)).expect("rm");
    sync_fs();
    // Production goes on meanwhile.
    expected.extend(write_files(&prod.mnt, "during-drill", 16));
    drill.umount();
    let fsck = drill.fsck();
    assert_eq!(fsck.code, 0, "e2fsck on the drill copy:\n{}", fsck.text());
    // rejoin is refused while the drill's filesystem is still attached.
    let refused = beta.ctl(&["rejoin", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(refused.stderr.contains("NBD client"), "{}", refused.text());
    drill.detach();
    beta.wait_no_clients(DEV);

    // The drill ends: its writes are discarded, beta resynchronises.
    let rejoin = beta.ctl(&["rejoin", DEV]).ok();
    let (regions, bytes) = rejoin_figures(&rejoin.stdout)
        .unwrap_or_else(|| panic!("rejoin names regions and bytes:\n{}", rejoin.text()));
    assert!(regions > 0, "{}", rejoin.text());
    assert_eq!(bytes, regions * REGION, "{}", rejoin.text());
    assert!(rejoin.stdout.contains("discarded"), "{}", rejoin.text());
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
    // Production writes on during the resync.
    expected.extend(write_files(&prod.mnt, "after-rejoin", 8));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let status = beta.status_json(DEV);
    assert_eq!(status["link"]["resync_role"], "target", "{status:#}");
    assert!(
        status["link"]["discarded_regions"].as_u64().unwrap() > 0,
        "the drill's regions are counted as discarded: {status:#}"
    );
    let received = status["link"]["resync_total"].as_u64().unwrap();
    eprintln!(
        "rejoin: {regions} region(s) announced; beta received {received} region(s), {} discarded",
        status["link"]["discarded_regions"]
    );
    // (Regions alpha adds to the resync later, written before the link
    // came up, are counted in the total too.)
    assert!(
        regions <= received,
        "{regions} announced, {received} received"
    );

    prod.detach();
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

    // beta's copy, read-only: production's files, none of the drill's.
    let problems = inspect_copy(
        &cluster.path("beta/data10.img"),
        &cluster.path("beta-copy"),
        |mnt| {
            let mut wrong = wrong_files(mnt, &expected);
            wrong.extend(
                drill_files
                    .iter()
                    .map(|(rel, _)| rel)
                    .filter(|rel| mnt.join(rel).exists())
                    .map(|rel| format!("{} (the drill's)", rel.display())),
            );
            if mnt.join("drill").exists() {
                wrong.push("drill/ (the drill's directory)".into());
            }
            wrong
        },
    );
    assert!(
        problems.is_empty(),
        "beta's copy after the drill: {problems:?}"
    );
}
