//! Two machines (two gmdd processes on loopback) mirroring a device in each
//! mode, under faults: the secondary killed with SIGKILL and restarted, the
//! primary killed and restarted, the network cut and healed. fio checks
//! every block it wrote (crc32c); at the end both backing files are
//! identical. Then divergence and unify, the async prefix property, and
//! the identity and peer rules.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Promote-failure timeout used by these tests (seconds).
const PROMOTE_S: u32 = 2;

fn fio_args(url: &str, offset: &str, size: &str) -> Vec<String> {
    [
        "--name=mirror",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--rate_iops=2500",
        // One process: killing it ends every job (forked job processes
        // outlive a killed parent and write errors to their log forever).
        "--thread",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--uri={url}"),
        format!("--offset={offset}"),
        format!("--size={size}"),
    ])
    .collect()
}

/// A running fio, killed when dropped (also when a test fails half-way).
struct Fio {
    child: Child,
    log: PathBuf,
}

impl Fio {
    fn spawn(args: &[String], log: &Path) -> Fio {
        let child = Command::new("fio")
            .args(args)
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

    /// Waits until fio ends, at most `timeout` (then kills it); whether it
    /// ended by itself and succeeded.
    fn finish_within(&mut self, timeout: Duration) -> bool {
        wait_child(&mut self.child, timeout).unwrap_or(false)
    }

    /// Waits for fio (4 min at most) and checks it wrote and verified
    /// everything without error.
    #[track_caller]
    fn assert_clean(mut self) {
        let finished = wait_child(&mut self.child, Duration::from_secs(240));
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(finished.is_some(), "fio did not finish in 240 s:\n{text}");
        assert!(finished == Some(true), "fio failed:\n{text}");
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

/// Waits for `child` at most `timeout`: `Some(success)` when it ended, `None`
/// when it had to be killed.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status.success());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn secondary_killed(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    let fio = Fio::spawn(
        &fio_args(&alpha.url(DEV), "0", "96M"),
        &cluster.path("fio.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    beta.kill9();
    alpha.wait_mirroring(DEV, false);
    let beta = cluster.gmdd("beta");
    fio.assert_clean();
    let status = alpha.status_json(DEV);
    assert!(status["link"]["connected"] == true || status["map"]["stale"].as_u64() > Some(0));
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

fn primary_killed(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    // Data written and acknowledged before the crash...
    let first = fio_args(&alpha.url(DEV), "0", "32M");
    Fio::spawn(&first, &cluster.path("fio1.log")).assert_clean();
    // ...then a crash in the middle of more writes. fio fails with the
    // server (its nbd engine may also retry until killed).
    let mut second = Fio::spawn(
        &fio_args(&alpha.url(DEV), "128M", "64M"),
        &cluster.path("fio2.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    alpha.kill9();
    second.finish_within(Duration::from_secs(30));
    drop(second);
    let alpha = cluster.gmdd("alpha");
    alpha.wait_mirroring(DEV, true);
    // Everything acknowledged before the crash reads back intact.
    let mut verify: Vec<String> = first.clone();
    verify.push("--verify_only".into());
    Fio::spawn(&verify, &cluster.path("fio3.log")).assert_clean();
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

fn network_cut(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    let fio = Fio::spawn(
        &fio_args(&alpha.url(DEV), "0", "96M"),
        &cluster.path("fio.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let cut = Cut::new(&cluster.geomessage_ports());
    alpha.wait_mirroring(DEV, false);
    beta.wait_mirroring(DEV, false);
    std::thread::sleep(Duration::from_secs(2));
    cut.heal();
    fio.assert_clean();
    alpha.wait_mirroring(DEV, true);
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

#[test]
fn sync_survives_the_secondary_killed() {
    secondary_killed("sync");
}

#[test]
fn mwc_survives_the_secondary_killed() {
    secondary_killed("mwc");
}

#[test]
fn async_survives_the_secondary_killed() {
    secondary_killed("async");
}

#[test]
fn sync_survives_the_primary_killed() {
    primary_killed("sync");
}

#[test]
fn mwc_survives_the_primary_killed() {
    primary_killed("mwc");
}

#[test]
fn async_survives_the_primary_killed() {
    primary_killed("async");
}

#[test]
fn sync_survives_a_network_cut() {
    network_cut("sync");
}

#[test]
fn mwc_survives_a_network_cut() {
    network_cut("mwc");
}

#[test]
fn async_survives_a_network_cut() {
    network_cut("async");
}

#[test]
fn divergence_refuses_until_unified() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    let cut = Cut::new(&cluster.geomessage_ports());
    alpha.wait_mirroring(DEV, false);
    beta.wait_mirroring(DEV, false);
    // The promote-failure timeout passed on beta too: it may be promoted.
    beta.ctl(&["primary", DEV]).ok();
    // Both sides write while apart.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0xaa 0 64k"]));
    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["write -P 0xbb 100M 64k"]));
    cut.heal();
    // They meet and refuse to mirror: divergence.
    wait_for("the divergence refusal", Duration::from_secs(30), || {
        [&alpha, &beta].iter().any(|g| {
            g.status_json(DEV)["link"]["refused"]
                .as_str()
                .is_some_and(|r| r.contains("divergence"))
        })
    });
    assert_eq!(alpha.status_json(DEV)["link"]["connected"], false);
    // Restarting the non-master is refused too.
    beta.ctl(&["stop", DEV]).ok();
    let refused = beta.ctl(&["start", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(refused.stderr.contains("divergence"), "{}", refused.text());
    assert!(
        refused.stderr.contains("gmdctl unify"),
        "{}",
        refused.text()
    );
    // Preview, then unify with alpha as master.
    let preview = alpha.ctl(&["unify", DEV, "--master", "alpha", "--preview"]);
    assert_eq!(preview.code, 2, "dirty maps exit 2: {}", preview.text());
    let cells = cells_from_show_state(&preview.stdout);
    let expected = regions_of(&[(0, 65536), (100 << 20, 65536)]);
    for r in &expected {
        assert_ne!(cells[*r as usize], 0, "region {r} in the union");
    }
    alpha.ctl(&["unify", DEV, "--master", "alpha"]).ok();
    beta.ctl(&["start", DEV]).ok();
    beta.wait_mirroring(DEV, true);
    cluster.stop_in_sync_and_compare(&alpha, &beta);
    // alpha's data won; beta's write while apart was discarded.
    let data = std::fs::read(cluster.path("beta/data10.img")).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0xaa));
    assert!(data[100 << 20..(100 << 20) + 65536].iter().all(|&b| b == 0));
}

#[test]
fn async_secondary_holds_a_prefix_of_the_primarys_writes_after_a_cut() {
    let cluster = Cluster::with_mode("async", PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    // Sequential writes: each completes before the next is issued.
    const WRITES: u64 = 3000;
    let commands: Vec<String> = (0..WRITES)
        .map(|i| format!("write -P {} {} 4k", i % 250 + 1, i * 4096))
        .collect();
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw", &alpha.url(DEV)]);
    for c in &commands {
        qemu.args(["-c", c]);
    }
    let mut child = qemu
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(1500));
    let cut = Cut::new(&cluster.geomessage_ports());
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(180)),
        Some(true),
        "qemu-io failed or hung"
    );
    beta.wait_mirroring(DEV, false);
    // The secondary stops where the stream stopped.
    beta.terminate();
    let data = std::fs::read(cluster.path("beta/data10.img")).unwrap();
    let block = |i: u64| &data[(i * 4096) as usize..((i + 1) * 4096) as usize];
    let applied = (0..WRITES)
        .take_while(|&i| block(i).iter().all(|&b| b == (i % 250 + 1) as u8))
        .count() as u64;
    assert!(applied > 0, "nothing reached the secondary before the cut");
    assert!(applied < WRITES, "the cut came too late to test anything");
    for i in applied..WRITES {
        assert!(
            block(i).iter().all(|&b| b == 0),
            "write {i} reached the secondary after write {applied} did not: not a prefix"
        );
    }
    // Heal and resync: identical again.
    cut.heal();
    let beta = cluster.gmdd("beta");
    beta.wait_mirroring(DEV, true);
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

#[test]
fn configure_refuses_a_peer_holding_another_device() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    // beta's map is re-created with another identity.
    cluster
        .gmdctl_offline(
            "beta",
            &[
                "init-state",
                DEV,
                "--force",
                "--uuid",
                "11111111-2222-3333-4444-555555555555",
            ],
        )
        .ok();
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    beta.ctl(&["configure", DEV]).ok();
    let refused = alpha.ctl(&["configure", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(
        refused.stderr.contains("do not hold the same device"),
        "{}",
        refused.text()
    );
    assert!(refused.stderr.contains("identity"), "{}", refused.text());
    assert!(alpha.status_json(DEV)["state"] == "DEFINED");
}

#[test]
fn down_on_an_available_peer_stops_its_device() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    alpha.ctl(&["stop", DEV]).ok();
    let down = alpha.ctl(&["down", DEV, "beta"]).ok();
    assert!(
        down.stderr.contains("was in fact AVAILABLE"),
        "{}",
        down.text()
    );
    assert_eq!(beta.status_json(DEV)["state"], "STOPPED");
    // alpha can start alone now; beta joins again later and is resynced.
    alpha.ctl(&["start", DEV]).ok();
    alpha.ctl(&["primary", DEV]).ok();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x42 1M 64k"]));
    beta.ctl(&["start", DEV]).ok();
    beta.wait_mirroring(DEV, true);
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

#[test]
fn a_second_remote_peer_takes_over_from_the_first() {
    let gamma_nbd = free_port();
    let gamma_geo = free_port();
    let cluster = Cluster::with_config(|text| {
        format!(
            "{}\n[machines.gamma]\nsite = \"dallas\"\npromote_failure_timeout = 2\n\
             interfaces = {{ geonet1 = \"127.0.0.1:{gamma_geo}\" }}\nnbd_listen = \"127.0.0.1:{gamma_nbd}\"\n\n\
             [devices.data10gmd.machines.gamma]\ndata = \"gamma/data10.img\"\nstate_map = \"gamma/data10.sm\"\n",
            // Two full copies of the device (to beta, then to gamma): at
            // the reference's 32 KiB in flight they took minutes on a
            // loaded machine.
            text.replace("promote_failure_timeout = 5", "promote_failure_timeout = 2")
                .replace("sync_rate_kib = 32", "sync_rate_kib = 2048")
        )
    });
    std::fs::create_dir_all(cluster.path("gamma")).unwrap();
    std::fs::File::create(cluster.path("gamma/data10.img"))
        .unwrap()
        .set_len(DEVICE_SIZE)
        .unwrap();
    for m in ["alpha", "beta", "gamma"] {
        cluster.gmdctl_offline(m, &["init-state", DEV]).ok();
    }
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let gamma = cluster.gmdd("gamma");
    alpha.ctl(&["configure", DEV]).ok();
    alpha.ctl(&["down", DEV, "beta"]).ok();
    alpha.ctl(&["down", DEV, "gamma"]).ok();
    alpha.ctl(&["start", DEV]).ok();
    // Three new volumes holding no known data: alpha's is declared the one
    // to keep, and the others receive full copies.
    alpha.ctl(&["primary", DEV, "--force"]).ok();
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["start", DEV]).ok();
    alpha.wait_mirroring(DEV, true);
    assert_eq!(alpha.status_json(DEV)["link"]["peer"], "beta");
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x11 0 1M"]));
    // gamma joins: beta is taken down and its device stopped.
    gamma.ctl(&["configure", DEV]).ok();
    gamma.ctl(&["start", DEV]).ok();
    wait_for("gamma to take over", Duration::from_secs(30), || {
        alpha.status_json(DEV)["link"]["peer"] == "gamma"
            && alpha.status_json(DEV)["link"]["connected"] == true
    });
    wait_for("beta to be stopped", Duration::from_secs(30), || {
        beta.status_json(DEV)["state"] == "STOPPED"
    });
    assert!(
        alpha.log_text().contains("a second remote peer joined"),
        "{}",
        alpha.log_text()
    );
    let status = alpha.status_json(DEV);
    assert!(
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["machine"] == "beta" && p["down"] == true)
    );
    alpha.wait_in_sync(DEV);
    gamma.wait_in_sync(DEV);
    alpha.ctl(&["stop", DEV]).ok();
    gamma.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("gamma/data10.img"),
    );
}

/// A clean stop of a connected pair flushes both sides and leaves both maps
/// clean: the next start resends nothing (hot regions included).
#[test]
fn a_clean_stop_of_a_connected_pair_leaves_both_maps_clean() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    // Writes spread over many regions: they stay hot (marked) while the
    // pair runs.
    let commands: Vec<String> = (0..64u64)
        .map(|i| format!("write -P {} {} 4k", i + 1, i * (1 << 20)))
        .collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &refs));
    assert!(
        alpha.status_json(DEV)["map"]["hot"].as_u64() > Some(0),
        "the written regions are hot while the pair runs"
    );
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    for g in [&alpha, &beta] {
        let show = g.ctl(&["show-state", DEV]);
        assert_eq!(
            show.code,
            0,
            "{}: the map is clean after a clean stop:\n{}",
            g.machine,
            show.text()
        );
    }
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
    // Started again: nothing to resend.
    beta.ctl(&["start", DEV]).ok();
    alpha.ctl(&["start", DEV]).ok();
    alpha.wait_mirroring(DEV, true);
    for g in [&alpha, &beta] {
        let link = &g.status_json(DEV)["link"];
        assert_eq!(link["resync_role"], "none", "{}: {link}", g.machine);
        assert_eq!(link["resync_total"], 0, "{}: {link}", g.machine);
    }
}

/// Overlapping writes in flight together (fio does not serialize them: 32
/// at once over 256 KiB, 4–64 KiB each, at random offsets, so nearly every
/// one overlaps another) leave the two copies the same: the primary issues
/// an overlapping write only once the earlier one finished, so the local
/// disk and the peer apply them in the same order, and gmdstat counts the
/// writes that waited. Without the rule the copies differ here (tried: it
/// failed in each of 4 runs, e.g. four 32 KiB regions apart), and nothing
/// marks it.
fn overlapping_writes(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    let args: Vec<String> = [
        "--name=overlap",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=32",
        "--size=256k",
        "--io_size=64m",
        // Without it fio writes each block once per pass and drains between
        // passes, so writes in flight never overlap.
        "--norandommap",
        "--thread",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--uri={}", alpha.url(DEV))])
    .collect();
    let mut fio = Fio::spawn(&args, &cluster.path("fio.log"));
    assert!(
        fio.finish_within(Duration::from_secs(120)),
        "fio failed:\n{}",
        std::fs::read_to_string(cluster.path("fio.log")).unwrap_or_default()
    );
    // 32 writes in flight over 64 blocks of 4 KiB: some overlapped an
    // earlier one still in flight and waited for it (gmdstat counts them).
    let waits = alpha.stat_json(DEV)["local"]["overlap_waits"].as_u64();
    assert!(waits > Some(0), "overlapping writes waited: {waits:?}");
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

/// 3 % of the datagrams lost both ways while fio writes and verifies at
/// QD16: every write completes and reads back, the links resend, and the
/// copies end the same. In sync and mwc, writes that depend on no earlier
/// one pass those held up by a loss (GeoMessage passing messages).
fn lossy_link(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    let lossy = Cut::lossy(&cluster.geomessage_ports(), 30);
    Fio::spawn(
        &fio_args(&alpha.url(DEV), "0", "32M"),
        &cluster.path("fio.log"),
    )
    .assert_clean();
    let resends = alpha.netstat_json()["networks"][0]["resends"].as_u64();
    // Messages beta took before earlier ones held up by a loss: writes.
    // (Its answers go in order in this session: beta told alpha which
    // generation it adopted after the first resync, and an answer must not
    // pass that.)
    let passed = beta.netstat_json()["machines"][0]["passed"].as_u64();
    lossy.heal();
    assert!(
        resends > Some(0),
        "datagrams were lost and resent: {resends:?}"
    );
    if mode == "async" {
        assert_eq!(passed, Some(0), "async writes go in order");
    } else {
        assert!(passed > Some(0), "writes passed lost ones: {passed:?}");
    }
    assert_eq!(
        alpha.status_json(DEV)["link"]["connected"],
        true,
        "the pair stays connected through the losses"
    );
    cluster.stop_in_sync_and_compare(&alpha, &beta);
}

#[test]
fn sync_survives_a_lossy_link() {
    lossy_link("sync");
}

#[test]
fn mwc_survives_a_lossy_link() {
    lossy_link("mwc");
}

#[test]
fn async_survives_a_lossy_link() {
    lossy_link("async");
}

#[test]
fn sync_overlapping_writes_leave_both_copies_the_same() {
    overlapping_writes("sync");
}

#[test]
fn mwc_overlapping_writes_leave_both_copies_the_same() {
    overlapping_writes("mwc");
}

/// Writes one at a time: in mwc each leaves from the thread that holds it
/// (the link is idle between them, nothing to batch with), and so does the
/// peer's answer; in async too, once the batch that completed the write
/// handed its completion back (the message is held until then, so the
/// application does not wait for it), rather than through the sender task.
/// An async write does not wait for its answer, so the next one may find
/// the link busy (and is batched, rightly): here each async write waits
/// until the peer has the one before. `gmdctl netstat --json` counts them
/// (`sent_now`).
#[test]
fn writes_at_queue_depth_one_leave_without_a_hop() {
    const WRITES: u64 = 32;
    for mode in ["mwc", "async"] {
        let cluster = Cluster::with_mode(mode, PROMOTE_S);
        let (alpha, beta) = cluster.start_pair();
        let sent_now = |g: &Gmdd| g.netstat_json()["machines"][0]["sent_now"].as_u64();
        let (alpha_before, beta_before) = (sent_now(&alpha), sent_now(&beta));
        let commands: Vec<String> = (0..WRITES)
            .map(|i| format!("write -P {} {} 4k", i + 1, i * (1 << 20)))
            .collect();
        let settled = || {
            wait_for("the peer has every write", Duration::from_secs(30), || {
                alpha.status_json(DEV)["link"]["backlog_bytes"] == 0
            })
        };
        if mode == "async" {
            for command in &commands {
                assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &[command.as_str()]));
                settled();
            }
        } else {
            let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
            assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &refs));
            settled();
        }
        let alpha_now = sent_now(&alpha).zip(alpha_before).map(|(a, b)| a - b);
        let beta_now = sent_now(&beta).zip(beta_before).map(|(a, b)| a - b);
        assert!(
            alpha_now >= Some(WRITES / 2),
            "{mode}: most writes leave from the writing thread: {alpha_now:?} of {WRITES}"
        );
        assert!(
            beta_now >= Some(WRITES / 2),
            "{mode}: most answers leave from beta's device thread: {beta_now:?} of {WRITES}"
        );
    }
}
