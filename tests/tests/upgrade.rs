//! A pair made before data generations (state map format version 1) keeps
//! working with this gmd: both maps read as holding their device's legacy
//! generation, the pair connects and resynchronises only what the marks
//! say (not a full copy), ends identical, and the maps are written back as
//! version 2.

use gmd_tests::*;

const DEV: &str = "data10gmd";

/// What alpha writes while beta is down: (offset, length, pattern).
const ALONE: [(u64, u64, u8); 3] = [
    (10 << 20, 64 << 10, 0x22),
    (100 << 20, 4 << 10, 0x33),
    (200 << 20, 96 << 10, 0x44),
];

fn bytes_sent_to_peer(gmdd: &Gmdd) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&gmdd.stat(&["-l", DEV, "--json"]).ok().stdout).expect("json");
    stats["peers"][0]["bytes_sent"]
        .as_u64()
        .expect("peers[0].bytes_sent")
}

#[test]
fn an_mwc_pair_with_format_1_maps_resyncs_only_its_marks_and_is_upgraded() {
    upgrade("mwc");
}

#[test]
fn an_async_pair_with_format_1_maps_resyncs_only_its_marks_and_is_upgraded() {
    upgrade("async");
}

fn upgrade(mode: &str) {
    let cluster = Cluster::with_mode(mode, 2);
    let alpha_map = cluster.path("alpha/data10.sm");
    let beta_map = cluster.path("beta/data10.sm");

    // The pair runs, then beta goes down and alpha writes alone: stale
    // marks on alpha only.
    let (alpha, beta) = cluster.start_pair();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x11 0 1M"]));
    alpha.wait_in_sync(DEV);
    beta.terminate();
    alpha.wait_mirroring(DEV, false);
    for (offset, len, byte) in ALONE {
        assert_qemu_io_clean(&qemu_io(
            &alpha.url(DEV),
            &[&format!("write -P {byte:#x} {offset} {len}")],
        ));
    }
    let marked = regions_of(&ALONE.map(|(o, l, _)| (o, l))).len() as u64;
    assert_eq!(marked, 6);
    assert_eq!(alpha.status_json(DEV)["map"]["stale"], marked);
    alpha.terminate();

    // Both maps as the previous gmd wrote them.
    for map in [&alpha_map, &beta_map] {
        assert_eq!(map_version(map), 2);
        assert_eq!(make_format_1_map(map), 2, "{}", map.display());
        assert_eq!(map_version(map), 1);
    }
    let offline = cluster.gmdctl_offline("alpha", &["show-state", DEV]);
    let cells = cells_from_show_state(&offline.stdout);
    let stale: Vec<u64> = (0..cells.len() as u64)
        .filter(|&r| cells[r as usize] != 0)
        .collect();
    assert_eq!(
        stale,
        regions_of(&ALONE.map(|(o, l, _)| (o, l))),
        "the format 1 map reads with alpha's marks"
    );

    // The new gmd on both: each device comes back as it was (AVAILABLE),
    // they connect and resynchronise the marked regions only.
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    alpha.wait_mirroring(DEV, true);
    beta.wait_mirroring(DEV, true);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let a = alpha.status_json(DEV);
    let b = beta.status_json(DEV);
    eprintln!(
        "after the upgrade: alpha {} {} {}, beta {} {}",
        a["role"], a["generations"], a["link"], b["role"], b["generations"]
    );
    assert_eq!(a["link"]["resync_role"], "source", "{a:#}");
    assert_eq!(a["link"]["resync_full"], false, "{a:#}");
    assert_eq!(a["link"]["resync_total"], marked, "{a:#}");
    assert_eq!(
        a["generations"]["current"], b["generations"]["current"],
        "both read the legacy generation"
    );
    let sent = bytes_sent_to_peer(&alpha);
    eprintln!("alpha sent {sent} bytes to beta");
    assert!(
        sent < 2 << 20,
        "{sent} bytes sent: more than the marked regions (a full copy is 256 MiB)"
    );

    // Format 1 recorded no role: each side comes back in its configured
    // one, as a fresh start would. The async pair names its primary, which
    // serves its applications again at once; an mwc pair configured with
    // role "none" has no writer until one is promoted.
    if mode == "async" {
        assert_eq!(a["role"], "primary", "the configured primary");
        assert_eq!(b["role"], "secondary");
        assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["read -P 0x11 0 1M"]));
    } else {
        assert_eq!(a["role"], "secondary");
        assert_eq!(b["role"], "secondary");
        alpha.ctl(&["primary", DEV]).ok();
    }
    // The pair keeps working: the writer's writes mirror.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x55 50M 64k"]));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
    let data = std::fs::read(cluster.path("beta/data10.img")).expect("read");
    for (offset, len, byte) in ALONE {
        let range = &data[offset as usize..(offset + len) as usize];
        assert!(range.iter().all(|&b| b == byte), "{offset}: not resynced");
    }

    // Written back as version 2, both copies, and readable again.
    alpha.terminate();
    beta.terminate();
    for map in [&alpha_map, &beta_map] {
        let copies = map_superblocks(map);
        assert!(
            copies.iter().all(|c| matches!(c, Some((2, _)))),
            "{}: {copies:?}",
            map.display()
        );
    }
}
