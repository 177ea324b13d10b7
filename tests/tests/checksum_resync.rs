//! Checksum resync (`resync_checksums = true`): a full copy between two
//! volumes that already hold the same data moves only the regions that
//! differ; the rest is compared by checksum and left where it is.

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Region size (one state map cell).
const REGION: u64 = 32 << 10;

/// The same pseudo-random bytes for both copies: `len` bytes from `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, deterministic, not all zeroes.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_full_copy_between_copies_holding_the_same_data_moves_only_the_differences() {
    let cluster = Cluster::with_config(|t| {
        t.replace(
            "sync_rate_kib = 32",
            "sync_rate_kib = 2048\nresync_checksums = true",
        )
    });
    let alpha_data = cluster.path("alpha/data10.img");
    let beta_data = cluster.path("beta/data10.img");
    // Both copies hold the same data (a restored backup, say): 16 MiB of
    // it at three places, zeroes elsewhere...
    for (at, seed) in [(0u64, 1u64), (100 << 20, 2), (240 << 20, 3)] {
        let data = pattern(seed, 16 << 20);
        write_direct(&alpha_data, at, &data, true);
        write_direct(&beta_data, at, &data, true);
    }
    // ...except four regions of beta's.
    let differ = [
        (8 << 20, 4096usize),
        (100 << 20, 2 * REGION as usize),
        (200 << 20, 512 * 8),
    ];
    let differing_regions = 4;
    for (at, len) in differ {
        write_direct(&beta_data, at, &vec![0xa5; len], true);
    }
    // beta's map says it holds no known data: it gets a full copy.
    cluster
        .gmdctl_offline("alpha", &["init-state", DEV, "--zeroed"])
        .ok();
    cluster.gmdctl_offline("beta", &["init-state", DEV]).ok();
    let (alpha, beta) = cluster.start_pair();
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);

    let link = alpha.status_json(DEV)["link"].clone();
    assert_eq!(link["resync_full"], true, "{link:#}");
    let same = DEVICE_SIZE - differing_regions * REGION;
    assert_eq!(
        link["resync_bytes_sent"],
        differing_regions * REGION,
        "{link:#}"
    );
    assert_eq!(link["resync_same_bytes"], same, "{link:#}");
    assert_eq!(link["resync_checks"], DEVICE_SIZE / REGION, "{link:#}");
    assert_eq!(link["resync_checks_differ"], differing_regions, "{link:#}");
    let target = beta.status_json(DEV)["link"].clone();
    assert_eq!(target["resync_same_bytes"], same, "{target:#}");
    let stat = alpha.stat_json(DEV);
    assert_eq!(stat["resync_same_bytes"], same, "{stat:#}");

    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(&alpha_data, &beta_data);
}

/// A pair whose machines disagree (beta's daemon does not ask for checksum
/// resync, as an older one could not) copies plainly: every region's data
/// moves, no checksum crosses the link, and the copies end identical.
#[test]
fn a_pair_where_only_one_side_asks_copies_plainly() {
    let cluster = Cluster::with_config(|t| {
        t.replace(
            "sync_rate_kib = 32",
            "sync_rate_kib = 2048\nresync_checksums = true",
        )
    });
    let text = std::fs::read_to_string(cluster.path("cluster.toml")).unwrap();
    let beta_config = cluster.path("beta.toml");
    std::fs::write(
        &beta_config,
        text.replace("resync_checksums = true", "resync_checksums = false"),
    )
    .unwrap();
    cluster
        .gmdctl_offline("alpha", &["init-state", DEV, "--zeroed"])
        .ok();
    cluster.gmdctl_offline("beta", &["init-state", DEV]).ok();
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd_with_config("beta", &beta_config);
    alpha.start_standalone(DEV, "beta");
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["start", DEV]).ok();
    alpha.wait_mirroring(DEV, true);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    let link = alpha.status_json(DEV)["link"].clone();
    assert_eq!(link["resync_full"], true, "{link:#}");
    assert_eq!(link["resync_checks"], 0, "{link:#}");
    assert_eq!(link["resync_same_bytes"], 0, "{link:#}");
    assert_eq!(link["resync_bytes_sent"], DEVICE_SIZE, "{link:#}");
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}
