//! A real two-node Pacemaker 2.1 / Corosync 3 cluster runs gmd's OCF agent
//! (`dist/ocf/gmd`, `ocf:gmd:gmd`) as a promotable clone and fails over.
//!
//! `tests/pacemaker/two_node.sh` builds the cluster on this host: each
//! node is `tests/pacemaker/node.sh` as the first process of its own PID,
//! mount, UTS and network namespaces (a veth pair between the two), with
//! its own corosync, Pacemaker daemons and gmdd. Pacemaker promotes one
//! side; data is written there; every process of that node is killed;
//! Pacemaker promotes the other side, where all the data is; the node
//! returns and rejoins as secondary, resynchronising only what changed;
//! a planned switch back promotes it again.
//! The script prints `RESULT key=value` lines, checked here.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use gmd_tests::*;

/// Region size (one state map cell).
const REGION: u64 = 32 << 10;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Fails (never skips) without Pacemaker, Corosync and crmsh.
fn require_cluster_stack() {
    let missing: Vec<&str> = [
        "corosync",
        "pacemakerd",
        "crm",
        "crm_mon",
        "unshare",
        "nsenter",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: apt-get install pacemaker corosync crmsh (.ci/run does)"
    );
}

#[test]
fn a_real_pacemaker_cluster_fails_over_and_the_node_rejoins_as_secondary() {
    require_cluster_stack();
    let gmdd = bin("gmdd");
    let bindir = gmdd.parent().expect("target dir");
    let mut cmd = Command::new("timeout");
    // Bounded: the script's own waits end well before this.
    cmd.args(["--kill-after=10", "240"])
        .arg(repo("tests/pacemaker/two_node.sh"))
        .arg(bindir)
        .arg(repo("dist/ocf/gmd"));
    // The test killed (its own timeout): timeout passes SIGTERM on, and
    // the script kills every node it started.
    // SAFETY: prctl is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = run(&mut cmd);
    eprintln!("{}", r.text());
    assert_eq!(r.code, 0, "two_node.sh failed:\n{}", r.text());
    let result: HashMap<&str, &str> = r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |k: &str| -> &str {
        result
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no RESULT {k} in:\n{}", r.stdout))
    };
    let num = |k: &str| -> u64 {
        get(k)
            .parse()
            .unwrap_or_else(|_| panic!("RESULT {k}={} is not a number", get(k)))
    };

    // Pacemaker promoted one node, then the other once the first died.
    let first = get("first_primary");
    assert!(first == "alpha" || first == "beta", "{first}");
    let survivor = if first == "alpha" { "beta" } else { "alpha" };
    // Every process of the dead node was gone (its PID namespace empty).
    assert_eq!(num("dead_node_processes_left"), 0);
    assert_eq!(get("failover_promoted"), survivor);
    // Through Pacemaker's promote operation on the survivor.
    assert!(num("survivor_promote_ops") >= 1, "{}", r.stdout);
    // The agent (or gmd's promote-failure timeout) recorded the dead peer.
    assert_eq!(get("peer_recorded_down"), "true");
    // All of the first primary's data was read back on the new one.
    assert_eq!(get("data_after_failover"), "ok");
    // The survivor's 256 KiB alone are marked for the returning node.
    assert_eq!(num("stale_regions_after_failover"), 8);

    // The node came back secondary and received only what changed: the
    // survivor's writes, and at most the regions its own map held marked.
    assert_eq!(get("rejoined_role"), "secondary");
    // Pacemaker started its instance there in its first life; in the
    // second, gmdd restored the device as secondary by itself and
    // Pacemaker's probe found it running (or, had it not, started it).
    let (starts, probes) = (num("returned_start_ops"), num("returned_probe_running"));
    assert!(starts >= 1 && starts + probes >= 2, "{}", r.stdout);
    assert_eq!(get("resync_role"), "target");
    assert_eq!(get("resync_full"), "false");
    assert_eq!(num("region_bytes"), REGION);
    let regions = num("resync_regions");
    let marks = num("dead_node_marks");
    eprintln!(
        "failback: survivor wrote 8 region(s), the dead node's map held {marks} mark(s); \
         the resync covered {regions} ({} KiB of {} MiB)",
        (regions * REGION) >> 10,
        DEVICE_SIZE >> 20
    );
    assert!(regions >= 8 && regions <= 8 + marks, "{}", r.stdout);
    assert!(regions * REGION < DEVICE_SIZE / 16, "{}", r.stdout);
    // And both copies are the same, region by region.
    assert_eq!(num("compare_differing"), 0);

    // A planned switch back (`crm_resource --move --promoted`): Pacemaker
    // demotes the survivor and promotes the returned node, where every
    // byte written on either side reads back.
    assert_eq!(get("switched_back_to"), first);
    assert!(num("survivor_demote_ops") >= 1, "{}", r.stdout);
    assert_eq!(get("data_after_switch_back"), "ok");
}
