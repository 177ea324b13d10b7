//! Which frontends a device gets: ublk asked for on a host without the
//! driver fails cleanly, and the default falls back to NBD with one log
//! line. `GMD_UBLK_CONTROL` points gmdd at a control node that does not
//! exist, modelling such a host whatever this kernel has. (ublk itself is
//! exercised in the test VM: `tests/vm/run.sh`.)

use gmd_tests::*;

const DEV: &str = "data10gmd";
const NOT_LOADED: &str =
    "ublk_drv is not loaded: `modprobe ublk_drv` (Linux ≥ 6.0), or use the NBD export";

fn no_ublk(cluster: &Cluster) -> String {
    cluster.path("no-ublk-control").display().to_string()
}

#[test]
fn asking_for_ublk_without_the_driver_refuses_and_leaves_the_device_stopped() {
    for export in [r#"["ublk"]"#, r#"["ublk", "nbd"]"#] {
        let cluster = Cluster::with_config(|t| {
            t.replace(r#"export = ["nbd"]"#, &format!("export = {export}"))
        });
        cluster
            .gmdctl_offline("alpha", &["init-state", DEV, "--zeroed"])
            .ok();
        let control = no_ublk(&cluster);
        let alpha = cluster.gmdd_env("alpha", &[("GMD_UBLK_CONTROL", &control)]);
        alpha.ctl(&["configure", DEV]).ok();
        alpha.ctl(&["down", DEV, "beta"]).ok();
        let start = alpha.ctl(&["start", DEV]);
        assert_eq!(
            start.code,
            2,
            "refused exits 2 ({export}):\n{}",
            start.text()
        );
        assert!(
            start.stderr.contains(NOT_LOADED),
            "the message says what to do ({export}):\n{}",
            start.text()
        );
        let status = alpha.status_json(DEV);
        assert_eq!(status["state"], "STOPPED", "{export}: {status}");
        assert_eq!(
            status["exports"],
            serde_json::json!([]),
            "{export}: {status}"
        );
        // Nothing half-made: no NBD export answers either.
        let probe = qemu_io(&alpha.url(DEV), &["read 0 4096"]);
        assert_ne!(probe.code, 0, "{export}: the export must not exist");
        // And the device still starts once the administrator picks NBD.
        alpha.ctl(&["unconfigure", DEV]).ok();
        alpha.ctl(&["set", DEV, "export=nbd"]).ok();
        alpha.ctl(&["configure", DEV]).ok();
        alpha.ctl(&["start", DEV]).ok();
        alpha.ctl(&["primary", DEV]).ok();
        assert_qemu_io_clean(&qemu_io(
            &alpha.url(DEV),
            &["write -P 0x5a 0 65536", "read -P 0x5a 0 65536"],
        ));
        alpha.ctl(&["stop", DEV]).ok();
        alpha.terminate();
    }
}

#[test]
fn by_default_a_host_without_ublk_exports_over_nbd_and_says_why_once() {
    let cluster = Cluster::with_config(|t| t.replace("export = [\"nbd\"]\n", ""));
    cluster
        .gmdctl_offline("alpha", &["init-state", DEV, "--zeroed"])
        .ok();
    let control = no_ublk(&cluster);
    let alpha = cluster.gmdd_env("alpha", &[("GMD_UBLK_CONTROL", &control)]);
    alpha.ctl(&["configure", DEV]).ok();
    alpha.ctl(&["down", DEV, "beta"]).ok();
    let start = alpha.ctl(&["start", DEV]).ok();
    assert!(
        start
            .stdout
            .contains(&format!("exported at {}", alpha.url(DEV))),
        "{}",
        start.text()
    );
    alpha.ctl(&["primary", DEV]).ok();
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 0x33 4096 8192", "read -P 0x33 4096 8192"],
    ));
    alpha.ctl(&["stop", DEV]).ok();
    let log = alpha.terminate();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no ublk on this host"))
        .collect();
    assert_eq!(why.len(), 1, "one log line says why:\n{log}");
    assert!(
        why[0].contains(&control),
        "it names the missing node: {}",
        why[0]
    );
}
