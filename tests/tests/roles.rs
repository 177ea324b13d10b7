//! One writer per pair, through gmdctl: which role changes are refused and
//! how (exit code 2, a message naming the machine or the client in the
//! way), what a secondary's export allows, and the `--json` results.

use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";

/// Runs a role command with `--json` and parses its result.
#[track_caller]
fn role_json(gmdd: &Gmdd, args: &[&str]) -> serde_json::Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let run = gmdd.ctl(&with_json).ok();
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{args:?} --json: {e}:\n{}", run.text()))
}

/// Asserts a command was refused with exit code 2 and a message holding
/// every one of `words`.
#[track_caller]
fn assert_refused(run: &Run, words: &[&str]) {
    assert_eq!(run.code, 2, "expected a refusal (exit 2):\n{}", run.text());
    for w in words {
        assert!(run.stderr.contains(w), "{w:?} not in:\n{}", run.text());
    }
}

#[test]
fn one_writer_per_pair_through_gmdctl() {
    let cluster = Cluster::with_mode("mwc", 2);
    let (alpha, beta) = cluster.start_pair();
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    assert_eq!(beta.status_json(DEV)["role"], "secondary");

    // The connected peer is primary: beta may not be, with or without --force.
    assert_refused(&beta.ctl(&["primary", DEV]), &["alpha is primary"]);
    assert_refused(
        &beta.ctl(&["primary", DEV, "--force"]),
        &["alpha is primary"],
    );
    let refused = beta.ctl(&["primary", DEV, "--json"]);
    assert_refused(&refused, &["alpha is primary"]);

    // A secondary's export is read-only: a write fails, a read-only open reads.
    let written = qemu_io(&alpha.url(DEV), &["write -P 0x61 1M 64k"]);
    assert_qemu_io_clean(&written);
    let write_on_beta = qemu_io(&beta.url(DEV), &["write -P 0x62 1M 64k"]);
    assert!(
        write_on_beta.code != 0
            || write_on_beta.text().to_lowercase().contains("error")
            || write_on_beta.text().contains("read-only")
            || write_on_beta.text().contains("ermission"),
        "a write on the secondary must fail:\n{}",
        write_on_beta.text()
    );
    let mut read = std::process::Command::new("qemu-io");
    read.args([
        "-r",
        "-f",
        "raw",
        &beta.url(DEV),
        "-c",
        "read -P 0x61 1M 64k",
    ]);
    assert_qemu_io_clean(&run(&mut read));

    // Repeating a role is harmless and says so.
    let again = role_json(&beta, &["secondary", DEV]);
    assert_eq!(
        (&again["previous"], &again["role"]),
        (&"secondary".into(), &"secondary".into())
    );
    let again = role_json(&alpha, &["primary", DEV]);
    assert_eq!(
        (&again["previous"], &again["role"]),
        (&"primary".into(), &"primary".into())
    );
    assert_eq!(again["machine"], "alpha");
    assert_eq!(again["forced"], false);

    // A split is for the secondary; rejoin only ends a split.
    assert_refused(&alpha.ctl(&["split", DEV]), &["run it on the secondary"]);
    assert_refused(&beta.ctl(&["rejoin", DEV]), &["not split"]);

    // alpha may not step down while a client holds its export open.
    let attached = NbdLoop::attach(&alpha.url(DEV), &cluster.path("client"));
    wait_for("the client", Duration::from_secs(10), || {
        alpha.status_json(DEV)["clients"] != 0
    });
    assert_refused(
        &alpha.ctl(&["secondary", DEV]),
        &["NBD client", "demote refused"],
    );
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    attached.detach();
    alpha.wait_no_clients(DEV);

    // Switch over: alpha secondary, then beta primary, both in JSON.
    let demoted = role_json(&alpha, &["secondary", DEV]);
    assert_eq!(
        (&demoted["previous"], &demoted["role"]),
        (&"primary".into(), &"secondary".into())
    );
    assert_eq!(demoted["machine"], "alpha");
    assert!(
        demoted["generations"]["current"].as_u64().is_some(),
        "{demoted}"
    );
    let promoted = role_json(&beta, &["primary", DEV]);
    assert_eq!(
        (&promoted["previous"], &promoted["role"]),
        (&"secondary".into(), &"primary".into())
    );
    assert_eq!(promoted["forced"], false);
    assert_eq!(
        promoted["generations"]["current"], demoted["generations"]["current"],
        "a switch-over keeps the data's generation"
    );
    assert_refused(&alpha.ctl(&["primary", DEV]), &["beta is primary"]);
    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["write -P 0x63 2M 64k"]));
    let write_on_alpha = qemu_io(&alpha.url(DEV), &["write -P 0x64 2M 64k"]);
    assert!(
        write_on_alpha.code != 0
            || write_on_alpha.text().to_lowercase().contains("error")
            || write_on_alpha.text().contains("ermission"),
        "a write on the new secondary must fail:\n{}",
        write_on_alpha.text()
    );
    // Text output too.
    let text = alpha.ctl(&["status", DEV]).ok().stdout;
    assert!(text.contains("secondary"), "{text}");

    // Roles survive a daemon restart: beta's gmdd stopped (SIGTERM) and
    // started again brings its device back primary, alpha's stays secondary.
    beta.terminate();
    let beta = cluster.gmdd("beta");
    wait_for(
        "beta's device to be restored",
        Duration::from_secs(30),
        || beta.status_json(DEV)["state"] == "AVAILABLE",
    );
    let status = beta.status_json(DEV);
    assert_eq!(status["role"], "primary", "{status:#}");
    assert_eq!(status["configured_role"], "none", "{status:#}");
    assert_eq!(alpha.status_json(DEV)["role"], "secondary");
    beta.wait_mirroring(DEV, true);
    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["write -P 0x65 3M 64k"]));

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
fn a_copy_holding_no_known_data_is_promoted_only_with_force() {
    // Maps initialised without --zeroed: the volumes hold no known data.
    let cluster = Cluster::with_config(|t| t);
    for m in ["alpha", "beta"] {
        cluster.gmdctl_offline(m, &["init-state", DEV]).ok();
    }
    let alpha = cluster.gmdd("alpha");
    alpha.ctl(&["configure", DEV]).ok();
    alpha.ctl(&["down", DEV, "beta"]).ok();
    alpha.ctl(&["start", DEV]).ok();
    let status = alpha.status_json(DEV);
    assert_eq!(status["role"], "secondary");
    assert_eq!(status["lacks_data"], true, "{status:#}");
    assert_refused(
        &alpha.ctl(&["primary", DEV]),
        &["holds no known data", "--force"],
    );
    let refused = alpha.ctl(&["primary", DEV, "--json"]);
    assert_refused(&refused, &["holds no known data"]);
    assert_eq!(alpha.status_json(DEV)["role"], "secondary");
    let forced = role_json(&alpha, &["primary", DEV, "--force"]);
    assert_eq!(
        (&forced["previous"], &forced["role"]),
        (&"secondary".into(), &"primary".into())
    );
    assert_eq!(forced["forced"], true, "{forced}");
    let current = forced["generations"]["current"].as_u64().unwrap();
    assert_ne!(current, 0, "a new generation: {forced}");
    let status = alpha.status_json(DEV);
    assert_eq!(status["role"], "primary");
    assert_eq!(status["lacks_data"], false, "{status:#}");
    assert_eq!(status["not_received"], 0, "{status:#}");
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x71 0 64k"]));
    // A stopped device changes no role.
    alpha.ctl(&["stop", DEV]).ok();
    assert_refused(&alpha.ctl(&["secondary", DEV]), &["AVAILABLE"]);
    let unknown = alpha.ctl(&["primary", "nosuch"]);
    assert_eq!(unknown.code, 2, "{}", unknown.text());
}
