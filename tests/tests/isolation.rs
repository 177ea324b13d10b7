//! Site isolation, as the reference intends: the link between the sites is
//! cut (nftables) with each site primary. alpha's site (austin) is the
//! dominant one: its primary goes on once the peer is declared lost; beta's
//! (dallas) holds its writes (pending, not failed) until the link returns,
//! `gmdctl down` confirms the peer down, or a fence handler reports it
//! fenced. A configured fence handler gates the dominant site too.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Promote-failure timeout of both machines, seconds.
const PROMOTE_S: u32 = 2;
/// How long a held write is watched staying pending: many promote-failure
/// timeouts.
const HELD_FOR: Duration = Duration::from_secs(8);

/// The pair in `mode` with `primary` ("alpha" or "beta") primary, mirroring.
fn pair_with_primary(cluster: &Cluster, primary: &str) -> (Gmdd, Gmdd) {
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let (p, s, other) = if primary == "alpha" {
        (&alpha, &beta, "beta")
    } else {
        (&beta, &alpha, "alpha")
    };
    p.start_standalone(DEV, other);
    s.ctl(&["configure", DEV]).ok();
    s.ctl(&["start", DEV]).ok();
    alpha.wait_mirroring(DEV, true);
    beta.wait_mirroring(DEV, true);
    assert_eq!(p.status_json(DEV)["role"], "primary");
    (alpha, beta)
}

/// A qemu-io write of `pattern` at `offset` (64 KiB), running in the
/// background.
fn spawn_write(url: &str, pattern: u8, offset: u64) -> Child {
    Command::new("qemu-io")
        .args(["-f", "raw", url, "-c"])
        .arg(format!("write -P {pattern:#x} {offset} 64k"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io")
}

/// Waits (60 s at most) for a background write to end; its output.
#[track_caller]
fn assert_write_completes(mut child: Child) -> String {
    let mut status = None;
    wait_for(
        "the held write to complete",
        Duration::from_secs(60),
        || {
            status = child.try_wait().expect("wait");
            status.is_some()
        },
    );
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.expect("ended").success(), "qemu-io failed: {text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert!(text.contains("wrote 65536/65536 bytes"), "{text}");
    text
}

/// Watches a background write stay pending for [`HELD_FOR`].
#[track_caller]
fn assert_write_held(child: &mut Child, gmdd: &Gmdd) {
    let deadline = std::time::Instant::now() + HELD_FOR;
    while std::time::Instant::now() < deadline {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the write ended while it should be held:\n{}",
            gmdd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The isolation part of `gmdctl status --json`, once writes are held.
fn wait_frozen(gmdd: &Gmdd) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for("writes to be held", Duration::from_secs(30), || {
        last = gmdd.status_json(DEV)["link"]["isolation"].clone();
        last["frozen"] == true
    });
    last
}

/// Stops both devices once in sync and checks the copies are identical.
fn converge(cluster: &Cluster, alpha: &Gmdd, beta: &Gmdd) {
    alpha.wait_mirroring(DEV, true);
    cluster.stop_in_sync_and_compare(alpha, beta);
}

/// Bytes of `machine`'s backing file at `offset`, 64 KiB, all `pattern`.
fn holds(cluster: &Cluster, machine: &str, offset: u64, pattern: u8) -> bool {
    let data = std::fs::read(cluster.path(&format!("{machine}/data10.img"))).expect("read");
    data[offset as usize..offset as usize + 65536]
        .iter()
        .all(|&b| b == pattern)
}

#[test]
fn the_dominant_primary_goes_on_alone_once_the_peer_is_lost() {
    let cluster = Cluster::with_mode("sync", PROMOTE_S);
    let (alpha, beta) = pair_with_primary(&cluster, "alpha");
    let cut = Cut::new(&cluster.geomessage_ports());
    alpha.wait_mirroring(DEV, false);
    // The peer is lost (promote-failure timeout): the write goes on alone.
    assert_write_completes(spawn_write(&alpha.url(DEV), 0x11, 1 << 20));
    let status = alpha.status_json(DEV);
    assert!(status["link"]["isolation"].is_null(), "{status:#}");
    assert!(status["map"]["stale"].as_u64() > Some(0), "{status:#}");
    cut.heal();
    converge(&cluster, &alpha, &beta);
    assert!(holds(&cluster, "beta", 1 << 20, 0x11));
}

#[test]
fn the_non_dominant_primary_holds_writes_until_the_link_returns() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    let (alpha, beta) = pair_with_primary(&cluster, "beta");
    let cut = Cut::new(&cluster.geomessage_ports());
    beta.wait_mirroring(DEV, false);
    let isolation = wait_frozen(&beta);
    assert_eq!(isolation["peer"], "alpha", "{isolation:#}");
    assert_eq!(isolation["hold"], "non-dominant", "{isolation:#}");
    let mut write = spawn_write(&beta.url(DEV), 0x22, 2 << 20);
    assert_write_held(&mut write, &beta);
    // What the administrator sees.
    let isolation = beta.status_json(DEV)["link"]["isolation"].clone();
    assert_eq!(isolation["writes_held"], 1, "{isolation:#}");
    let text = beta.ctl(&["status", DEV]).ok().stdout;
    assert!(
        text.contains("writes frozen: peer alpha lost")
            && text.contains("'gmdctl down data10gmd alpha'"),
        "{text}"
    );
    let stat = beta.stat(&["-l", DEV]).ok().stdout;
    assert!(
        stat.contains("FROZEN writes frozen: peer alpha lost"),
        "{stat}"
    );
    assert!(
        beta.log_text().contains("writes are held (not failed)"),
        "{}",
        beta.log_text()
    );
    // Nothing was written alone: no stale region.
    assert_eq!(beta.status_json(DEV)["map"]["stale"], 0);
    // The link returns: the write completes, mirrored.
    cut.heal();
    assert_write_completes(write);
    assert!(beta.status_json(DEV)["link"]["isolation"].is_null());
    converge(&cluster, &alpha, &beta);
    assert!(holds(&cluster, "alpha", 2 << 20, 0x22));
}

#[test]
fn gmdctl_down_releases_a_held_non_dominant_primary() {
    let cluster = Cluster::with_mode("sync", PROMOTE_S);
    let (alpha, beta) = pair_with_primary(&cluster, "beta");
    let cut = Cut::new(&cluster.geomessage_ports());
    beta.wait_mirroring(DEV, false);
    wait_frozen(&beta);
    let mut write = spawn_write(&beta.url(DEV), 0x33, 3 << 20);
    assert_write_held(&mut write, &beta);
    let down = beta.ctl(&["down", DEV, "alpha"]).ok();
    assert!(down.stdout.contains("recorded as down"), "{}", down.text());
    assert_write_completes(write);
    let status = beta.status_json(DEV);
    assert!(status["link"]["isolation"].is_null(), "{status:#}");
    assert!(
        status["map"]["stale"].as_u64() > Some(0),
        "written alone: {status:#}"
    );
    assert!(beta.log_text().contains("confirmed down"));
    // Later writes go on alone at once.
    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["write -P 0x34 4M 64k"]));
    cut.heal();
    converge(&cluster, &alpha, &beta);
    assert!(holds(&cluster, "alpha", 3 << 20, 0x33));
    assert!(holds(&cluster, "alpha", 4 << 20, 0x34));
}

/// Adds a fence handler for `machine`: a script that logs each action in
/// `fence.actions`, and for `fence` records its environment in `fence.env`
/// and exits with the code in `fence.exit`.
fn add_fence_handler(cluster: &Cluster, machine: &str, exit: i32) {
    let script = cluster.path("fence.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $GMD_PEER for $GMD_DEVICE\" >> {actions}\n\
             [ \"$1\" = unfence ] && exit 0\n\
             echo \"fencing $GMD_PEER for $GMD_DEVICE\"\n\
             env | grep -E '^(GMD|DRBD)_' | sort > {env}\nexit $(cat {exit})\n",
            actions = cluster.path("fence.actions").display(),
            env = cluster.path("fence.env").display(),
            exit = cluster.path("fence.exit").display(),
        ),
    )
    .expect("write script");
    Command::new("chmod")
        .args(["+x"])
        .arg(&script)
        .status()
        .expect("chmod");
    std::fs::write(cluster.path("fence.exit"), exit.to_string()).expect("exit code");
    let config = cluster.path("cluster.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let port_line = text
        .lines()
        .skip_while(|l| *l != format!("[machines.{machine}]"))
        .find(|l| l.starts_with("nbd_listen"))
        .expect("nbd_listen")
        .to_owned();
    let text = text.replacen(
        &port_line,
        &format!(
            "{port_line}\nfence_handler = \"{}\"\nfence_timeout = 20",
            script.display()
        ),
        1,
    );
    std::fs::write(&config, text).expect("write config");
}

#[test]
fn a_fence_handler_that_fails_keeps_writes_held_and_one_that_succeeds_releases_them() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    add_fence_handler(&cluster, "beta", 1);
    let (alpha, beta) = pair_with_primary(&cluster, "beta");

    // First cut: the handler fails, writes stay held.
    let cut = Cut::new(&cluster.geomessage_ports());
    beta.wait_mirroring(DEV, false);
    let mut write = spawn_write(&beta.url(DEV), 0x44, 5 << 20);
    let mut isolation = serde_json::Value::Null;
    wait_for("the handler to fail", Duration::from_secs(30), || {
        isolation = beta.status_json(DEV)["link"]["isolation"].clone();
        isolation["hold"] == "fence-failed"
    });
    assert!(
        isolation["fence"]
            .as_str()
            .is_some_and(|f| f.contains("exited 1")),
        "{isolation:#}"
    );
    assert_write_held(&mut write, &beta);
    let env = std::fs::read_to_string(cluster.path("fence.env")).expect("env");
    assert!(env.contains("GMD_DEVICE=data10gmd\n"), "{env}");
    assert!(env.contains("GMD_PEER=alpha\n"), "{env}");
    assert!(env.contains("DRBD_RESOURCE=data10gmd\n"), "{env}");
    assert!(env.contains("GMD_FENCE_ACTION=fence\n"), "{env}");
    assert!(
        beta.log_text()
            .contains("fence handler stdout: fencing alpha for data10gmd"),
        "{}",
        beta.log_text()
    );
    cut.heal();
    assert_write_completes(write);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);

    // Second cut: the handler succeeds, the side goes on alone.
    std::fs::write(cluster.path("fence.exit"), "0").expect("exit code");
    let cut = Cut::new(&cluster.geomessage_ports());
    beta.wait_mirroring(DEV, false);
    let write = spawn_write(&beta.url(DEV), 0x45, 6 << 20);
    assert_write_completes(write);
    assert!(beta.status_json(DEV)["link"]["isolation"].is_null());
    assert!(beta.log_text().contains("the peer is fenced"));
    cut.heal();
    converge(&cluster, &alpha, &beta);
    assert!(holds(&cluster, "alpha", 6 << 20, 0x45));
    // In sync again: what the handler placed is lifted (once; the failed
    // fence placed nothing).
    let actions = || std::fs::read_to_string(cluster.path("fence.actions")).unwrap_or_default();
    wait_for("the unfence", Duration::from_secs(30), || {
        actions().contains("unfence")
    });
    assert_eq!(
        actions(),
        "fence alpha for data10gmd\nfence alpha for data10gmd\nunfence alpha for data10gmd\n"
    );
}

#[test]
fn a_fence_handler_gates_the_dominant_site_too() {
    let cluster = Cluster::with_mode("sync", PROMOTE_S);
    add_fence_handler(&cluster, "alpha", 5);
    let (alpha, beta) = pair_with_primary(&cluster, "alpha");
    let cut = Cut::new(&cluster.geomessage_ports());
    alpha.wait_mirroring(DEV, false);
    let mut write = spawn_write(&alpha.url(DEV), 0x55, 7 << 20);
    // Exit 5 (DRBD: the peer could not be reached) is not "fenced".
    wait_for("the handler to fail", Duration::from_secs(30), || {
        alpha.status_json(DEV)["link"]["isolation"]["hold"] == "fence-failed"
    });
    assert_write_held(&mut write, &alpha);
    // The administrator confirms the peer down: the write goes on alone.
    alpha.ctl(&["down", DEV, "beta"]).ok();
    assert_write_completes(write);
    cut.heal();
    converge(&cluster, &alpha, &beta);
    assert!(holds(&cluster, "beta", 7 << 20, 0x55));
}

#[test]
fn a_fence_handler_runs_before_a_secondary_is_promoted_while_apart() {
    let cluster = Cluster::with_mode("mwc", PROMOTE_S);
    add_fence_handler(&cluster, "beta", 6);
    let (alpha, beta) = pair_with_primary(&cluster, "alpha");
    let cut = Cut::new(&cluster.geomessage_ports());
    beta.wait_mirroring(DEV, false);
    wait_for("beta to record alpha down", Duration::from_secs(30), || {
        beta.status_json(DEV)["peers"][0]["down"] == true
    });
    // Exit 6 (DRBD: the peer is primary and refused): not fenced.
    let refused = beta.ctl(&["primary", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(
        refused
            .stderr
            .contains("the fence handler did not fence it")
            && refused.stderr.contains("gmdctl down data10gmd alpha"),
        "{}",
        refused.text()
    );
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
    // The handler fences: the promotion goes through.
    std::fs::write(cluster.path("fence.exit"), "7").expect("exit code");
    let promoted = beta.ctl(&["primary", DEV]).ok();
    assert!(
        promoted
            .stdout
            .contains("fenced alpha before the promotion"),
        "{}",
        promoted.text()
    );
    assert_eq!(beta.status_json(DEV)["role"], "primary");
    let actions = std::fs::read_to_string(cluster.path("fence.actions")).unwrap_or_default();
    assert_eq!(
        actions,
        "fence alpha for data10gmd\nfence alpha for data10gmd\n"
    );
    drop(cut);
    drop((alpha, beta));
}
