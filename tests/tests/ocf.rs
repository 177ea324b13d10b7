//! The OCF resource agent (`dist/ocf/gmd`, installed as
//! `/usr/lib/ocf/resource.d/gmd/gmd`) for a Pacemaker promotable clone:
//! `ocf-tester` against a running pair, the actions Pacemaker issues
//! through a failover and a switch back, promotion scores (a stub
//! `crm_master` on PATH logs them; no cluster runs), meta-data and
//! validate-all. No Pacemaker cluster is started here (`pacemaker.rs` runs
//! a real one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Region size (one state map cell).
const REGION: u64 = 32 << 10;

/// OCF exit codes.
const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_PROMOTED: i32 = 8;

const OCF_ROOT: &str = "/usr/lib/ocf";

/// The agent in the repository.
fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ocf/gmd")
}

/// Fails (never skips) without the OCF shell functions and ocf-tester.
fn require_resource_agents() {
    assert!(
        Path::new(OCF_ROOT)
            .join("lib/heartbeat/ocf-shellfuncs")
            .exists()
            && Path::new("/usr/sbin/ocf-tester").exists(),
        "the OCF shell functions or ocf-tester are missing: \
         apt-get install --no-install-recommends resource-agents libxml2-utils (.ci/run does)"
    );
}

/// Runs the agent as Pacemaker would, for one machine.
struct Agent<'a> {
    cluster: &'a Cluster,
    machine: &'static str,
    /// Directory of the stub `crm_master` (first on PATH).
    stubs: PathBuf,
    /// More resource parameters (`OCF_RESKEY_<name>`).
    params: Vec<(&'static str, &'static str)>,
}

impl<'a> Agent<'a> {
    fn new(cluster: &'a Cluster, machine: &'static str) -> Agent<'a> {
        let stubs = cluster.path(&format!("stubs-{machine}"));
        std::fs::create_dir_all(&stubs).expect("mkdir");
        let log = stubs.join("crm_master.log");
        let stub = stubs.join("crm_master");
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho \"$*\" >> '{}'\n", log.display()),
        )
        .expect("stub");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Agent {
            cluster,
            machine,
            stubs,
            params: Vec::new(),
        }
    }

    /// Runs `action` (a recurring monitor, interval 10 s, unless `probe`).
    fn action_with(&self, action: &str, probe: bool) -> Run {
        let path = format!(
            "{}:{}",
            self.stubs.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new(agent())
            .arg(action)
            .env("PATH", path)
            .env("OCF_ROOT", OCF_ROOT)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "0")
            .env("OCF_RESOURCE_INSTANCE", "gmd_data10:0")
            .env("OCF_RESKEY_device", DEV)
            .env("OCF_RESKEY_socket", self.cluster.socket(self.machine))
            .env("OCF_RESKEY_gmdctl", bin("gmdctl"))
            .env("OCF_RESKEY_config", &self.cluster.config)
            .env(
                "OCF_RESKEY_CRM_meta_interval",
                if probe { "0" } else { "10000" },
            )
            .env("OCF_RESKEY_CRM_meta_timeout", "90000")
            .envs(
                self.params
                    .iter()
                    .map(|(k, v)| (format!("OCF_RESKEY_{k}"), *v)),
            ))
    }

    /// Runs `action` and asserts its exit code.
    #[track_caller]
    fn expect(&self, action: &str, code: i32) -> Run {
        let r = self.action_with(action, false);
        assert_eq!(
            r.code,
            code,
            "{} {action}: expected {code}, got {}:\n{}",
            self.machine,
            r.code,
            r.text()
        );
        r
    }

    /// The promotion score calls made so far, one line each.
    fn scores(&self) -> Vec<String> {
        std::fs::read_to_string(self.stubs.join("crm_master.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The last promotion score call.
    fn last_score(&self) -> String {
        self.scores().last().cloned().unwrap_or_default()
    }
}

#[test]
fn ocf_tester_passes_against_a_running_pair() {
    require_resource_agents();
    let cluster = Cluster::with_mode("mwc", 2);
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    // beta's copy runs (secondary, alpha recorded down until it comes).
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["down", DEV, "alpha"]).ok();
    beta.ctl(&["start", DEV]).ok();
    // ocf-tester runs every action on alpha itself (start, promote, demote,
    // stop, each repeated), checking the exit codes OCF asks for.
    let r = run(Command::new("ocf-tester")
        .args(["-n", "gmd_data10"])
        .arg("-o")
        .arg(format!("device={DEV}"))
        .arg("-o")
        .arg(format!("socket={}", alpha.socket.display()))
        .arg("-o")
        .arg(format!("gmdctl={}", bin("gmdctl").display()))
        .arg(agent())
        .env("OCF_ROOT", OCF_ROOT));
    assert_eq!(r.code, 0, "ocf-tester:\n{}", r.text());
    assert!(r.stdout.contains("passed all tests"), "{}", r.text());
    // It ends with the device stopped; beta went on alone.
    assert_eq!(alpha.status_json(DEV)["state"], "STOPPED");
    assert_eq!(beta.status_json(DEV)["state"], "AVAILABLE");
}

#[test]
fn pacemaker_actions_fail_over_and_back() {
    require_resource_agents();
    let cluster = Cluster::with_mode("mwc", 2);
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let (ra, rb) = (Agent::new(&cluster, "alpha"), Agent::new(&cluster, "beta"));

    // Probes, then start on both: unpromoted.
    for a in [&ra, &rb] {
        let probe = a.action_with("monitor", true);
        assert_eq!(probe.code, OCF_NOT_RUNNING, "{}", probe.text());
        a.expect("start", OCF_SUCCESS);
    }
    alpha.wait_mirroring(DEV, true);
    beta.wait_mirroring(DEV, true);
    for a in [&ra, &rb] {
        a.expect("monitor", OCF_SUCCESS);
        assert_eq!(a.last_score(), "-q -l reboot -v 10000", "{:?}", a.scores());
        a.expect("start", OCF_SUCCESS);
    }
    assert_eq!(alpha.status_json(DEV)["role"], "secondary");
    assert_eq!(beta.status_json(DEV)["role"], "secondary");

    // alpha promoted; the application writes there.
    ra.expect("promote", OCF_SUCCESS);
    ra.expect("monitor", OCF_RUNNING_PROMOTED);
    rb.expect("monitor", OCF_SUCCESS);
    ra.expect("notify", OCF_SUCCESS);
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 0xa1 0 1M", "write -P 0xa2 64M 512k"],
    ));

    // alpha's machine dies.
    alpha.kill9();
    let alpha_marks = marked_regions(&cluster.path("alpha/data10.sm"));
    rb.expect("monitor", OCF_SUCCESS);
    beta.wait_mirroring(DEV, false);
    rb.expect("monitor", OCF_SUCCESS);
    assert_eq!(rb.last_score(), "-q -l reboot -v 1000", "{:?}", rb.scores());
    // Pacemaker (having fenced alpha) promotes beta.
    rb.expect("promote", OCF_SUCCESS);
    rb.expect("monitor", OCF_RUNNING_PROMOTED);
    assert_eq!(beta.status_json(DEV)["peers"][0]["down"], true);
    assert_qemu_io_clean(&qemu_io(
        &beta.url(DEV),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xa2 64M 512k",
            "write -P 0xb1 128M 256k",
        ],
    ));
    let beta_wrote = beta.status_json(DEV)["map"]["stale"].as_u64().unwrap();
    assert_eq!(beta_wrote, 8, "beta's 256 KiB are marked stale");

    // alpha's gmdd restarts: the device comes back secondary by itself;
    // Pacemaker's start finds it running.
    let alpha = cluster.gmdd("alpha");
    wait_for(
        "alpha's device to be restored",
        Duration::from_secs(30),
        || alpha.status_json(DEV)["state"] == "AVAILABLE",
    );
    ra.expect("start", OCF_SUCCESS);
    ra.expect("monitor", OCF_SUCCESS);
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    ra.expect("monitor", OCF_SUCCESS);
    assert_eq!(
        ra.last_score(),
        "-q -l reboot -v 10000",
        "{:?}",
        ra.scores()
    );
    // Only what changed moved: beta's writes and alpha's own marks.
    let link = alpha.status_json(DEV)["link"].clone();
    assert_eq!(link["resync_role"], "target", "{link:#}");
    assert_eq!(link["resync_full"], false, "{link:#}");
    let regions = link["resync_total"].as_u64().unwrap();
    eprintln!(
        "failback: beta wrote {beta_wrote} region(s), alpha's map held {alpha_marks} mark(s); \
         the resync covered {regions}"
    );
    assert!(
        regions >= beta_wrote && regions <= beta_wrote + alpha_marks,
        "{link:#}"
    );
    assert!(regions * REGION < DEVICE_SIZE / 16, "{link:#}");

    // Switch back: beta demoted, alpha promoted.
    rb.expect("demote", OCF_SUCCESS);
    rb.expect("monitor", OCF_SUCCESS);
    rb.expect("demote", OCF_SUCCESS);
    ra.expect("promote", OCF_SUCCESS);
    ra.expect("monitor", OCF_RUNNING_PROMOTED);
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xa2 64M 512k",
            "read -P 0xb1 128M 256k",
        ],
    ));

    // Stop both (alpha demoted first); stopping again succeeds.
    alpha.wait_in_sync(DEV);
    ra.expect("stop", OCF_SUCCESS);
    assert_eq!(alpha.status_json(DEV)["role"], "secondary");
    rb.expect("stop", OCF_SUCCESS);
    for a in [&ra, &rb] {
        a.expect("monitor", OCF_NOT_RUNNING);
        a.expect("stop", OCF_SUCCESS);
        assert_eq!(a.last_score(), "-q -l reboot -D", "{:?}", a.scores());
    }
    alpha.assert_map_clean(DEV);
    beta.assert_map_clean(DEV);
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}

#[test]
fn a_promotion_with_the_peer_gone_but_not_recorded_down_records_it() {
    require_resource_agents();
    // No promote-failure timeout: gmd never records alpha down by itself.
    let cluster = Cluster::with_mode("mwc", 0);
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let ra = Agent::new(&cluster, "alpha");
    let mut rb = Agent::new(&cluster, "beta");
    rb.params.push(("peer_wait", "2"));
    ra.expect("start", OCF_SUCCESS);
    rb.expect("start", OCF_SUCCESS);
    alpha.wait_mirroring(DEV, true);
    ra.expect("promote", OCF_SUCCESS);
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0xc1 2M 256k"]));
    // Both machines fail; only beta returns. Its device comes back
    // secondary, alpha neither connected nor known to be down: gmd alone
    // refuses to promote it.
    alpha.kill9();
    beta.kill9();
    let beta = cluster.gmdd("beta");
    wait_for(
        "beta's device to be restored",
        Duration::from_secs(30),
        || beta.status_json(DEV)["state"] == "AVAILABLE",
    );
    let status = beta.status_json(DEV);
    assert_eq!(status["link"]["connected"], false, "{status:#}");
    assert_eq!(status["peers"][0]["down"], false, "{status:#}");
    let refused = beta.ctl(&["primary", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    rb.expect("start", OCF_SUCCESS);
    rb.expect("monitor", OCF_SUCCESS);
    assert_eq!(rb.last_score(), "-q -l reboot -v 1000", "{:?}", rb.scores());
    // Pacemaker promotes it (alpha fenced): after peer_wait the agent
    // records alpha down, as gmd requires, and promotes without --force.
    let promoted = rb.expect("promote", OCF_SUCCESS);
    assert!(
        promoted.text().contains("recording alpha down"),
        "{}",
        promoted.text()
    );
    rb.expect("monitor", OCF_RUNNING_PROMOTED);
    let status = beta.status_json(DEV);
    assert_eq!(status["peers"][0]["down"], true, "{status:#}");
    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["read -P 0xc1 2M 256k"]));
}

#[test]
fn both_instances_started_at_once_come_up_and_mirror() {
    require_resource_agents();
    // Pacemaker starts every clone instance at once when the cluster
    // starts: neither start may stop the other's copy.
    for round in 0..3 {
        let cluster = Cluster::with_mode("mwc", 2);
        let alpha = cluster.gmdd("alpha");
        let beta = cluster.gmdd("beta");
        let mut ra = Agent::new(&cluster, "alpha");
        let mut rb = Agent::new(&cluster, "beta");
        ra.params.push(("CRM_meta_clone", "0"));
        rb.params.push(("CRM_meta_clone", "1"));
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| ra.action_with("start", false));
            let b = s.spawn(|| rb.action_with("start", false));
            (a.join().expect("alpha"), b.join().expect("beta"))
        });
        assert_eq!(
            a.code,
            OCF_SUCCESS,
            "round {round}: alpha start:\n{}",
            a.text()
        );
        assert_eq!(
            b.code,
            OCF_SUCCESS,
            "round {round}: beta start:\n{}",
            b.text()
        );
        alpha.wait_mirroring(DEV, true);
        beta.wait_mirroring(DEV, true);
        ra.expect("monitor", OCF_SUCCESS);
        rb.expect("monitor", OCF_SUCCESS);
        for g in [&alpha, &beta] {
            assert!(
                !g.log_text().contains("at the request of"),
                "round {round}: a start stopped the other copy:\n{}",
                g.log_text()
            );
        }
    }
}

#[test]
fn a_resync_target_lacking_data_is_never_promotable() {
    require_resource_agents();
    // alpha's volume is new and zeroed; beta's holds no known data: it
    // receives a full copy.
    let cluster = Cluster::with_mode("mwc", 2);
    cluster
        .gmdctl_offline("beta", &["init-state", DEV, "--force"])
        .ok();
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let (ra, rb) = (Agent::new(&cluster, "alpha"), Agent::new(&cluster, "beta"));
    ra.expect("start", OCF_SUCCESS);
    ra.expect("promote", OCF_SUCCESS);
    rb.expect("start", OCF_SUCCESS);
    // Connected, receiving: no score, and no promotion.
    wait_for(
        "beta's full copy to be under way",
        Duration::from_secs(30),
        || {
            let s = beta.status_json(DEV);
            s["link"]["resync_role"] == "target" && s["not_received"].as_u64().unwrap_or(0) > 0
        },
    );
    rb.expect("monitor", OCF_SUCCESS);
    assert_eq!(rb.last_score(), "-q -l reboot -D", "{:?}", rb.scores());
    // Its source dies half-way: beta knows, durably, what it lacks.
    alpha.kill9();
    beta.wait_mirroring(DEV, false);
    let status = beta.status_json(DEV);
    eprintln!(
        "beta's full copy cut with {} of {} region(s) not received",
        status["not_received"], status["link"]["resync_total"]
    );
    assert_eq!(status["lacks_data"], true, "{status:#}");
    assert!(status["not_received"].as_u64().unwrap() > 0, "{status:#}");
    rb.expect("monitor", OCF_SUCCESS);
    assert!(
        rb.scores().iter().all(|s| s.ends_with("-D")),
        "beta was never promotable: {:?}",
        rb.scores()
    );
    // Were Pacemaker to promote it anyway, the agent refuses (no --force).
    let refused = rb.expect("promote", OCF_ERR_GENERIC);
    assert!(refused.text().contains("lacks data"), "{}", refused.text());
    rb.expect("monitor", OCF_SUCCESS);
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
}

#[test]
fn meta_data_is_well_formed_and_validate_all_rejects_unknown_devices() {
    require_resource_agents();
    let cluster = Cluster::new();
    let ra = Agent::new(&cluster, "alpha");
    let meta = ra.expect("meta-data", OCF_SUCCESS).stdout;
    // Parsed by python3's XML parser: parameters and actions as Pacemaker
    // reads them.
    let script = r#"
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
assert root.tag == "resource-agent" and root.get("name") == "gmd", root.tag
params = {p.get("name"): p.get("required") for p in root.find("parameters")}
print("params", " ".join(sorted(params)))
print("required", " ".join(sorted(n for n, r in params.items() if r == "1")))
for a in root.find("actions"):
    print("action", a.get("name"), a.get("role") or "-")
"#;
    let mut py = Command::new("python3");
    py.args(["-c", script]).stdin(std::process::Stdio::piped());
    py.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = py.spawn().expect("python3");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), meta.as_bytes())
        .expect("write");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("python3");
    let parsed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "meta-data is not well-formed XML:\n{meta}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = parsed.lines().collect();
    assert!(
        lines.contains(&"params config device gmdctl peer_wait socket"),
        "{parsed}"
    );
    assert!(lines.contains(&"required device"), "{parsed}");
    for wanted in [
        "action start -",
        "action stop -",
        "action promote -",
        "action demote -",
        "action notify -",
        "action monitor Promoted",
        "action monitor Unpromoted",
        "action meta-data -",
        "action validate-all -",
    ] {
        assert!(lines.contains(&wanted), "{wanted:?} not in:\n{parsed}");
    }
    // And valid against the OCF DTD, as ocf-tester checks it.
    let lint = run(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' meta-data | xmllint --noout --valid -",
            agent().display()
        ))
        .current_dir("/usr/share/resource-agents")
        .env("OCF_ROOT", OCF_ROOT));
    assert_eq!(lint.code, 0, "xmllint:\n{}", lint.text());

    // POSIX sh: dash parses it; shellcheck (where installed) finds nothing.
    run(Command::new("sh").arg("-n").arg(agent())).ok();
    if Command::new("shellcheck").arg("--version").output().is_ok() {
        run(Command::new("shellcheck").arg(agent())).ok();
    }

    // validate-all: with gmdd running, a known device passes, an unknown or
    // missing one is a configuration error.
    let alpha = cluster.gmdd("alpha");
    ra.expect("validate-all", OCF_SUCCESS);
    let socket = alpha.socket.clone();
    let with = |device: Option<&str>, config: &Path| {
        let mut cmd = Command::new(agent());
        cmd.arg("validate-all")
            .env("OCF_ROOT", OCF_ROOT)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RESOURCE_INSTANCE", "gmd_x")
            .env("OCF_RESKEY_socket", &socket)
            .env("OCF_RESKEY_gmdctl", bin("gmdctl"))
            .env("OCF_RESKEY_config", config);
        if let Some(d) = device {
            cmd.env("OCF_RESKEY_device", d);
        }
        run(&mut cmd)
    };
    let none = cluster.path("no-such-config.toml");
    let missing = with(None, &none);
    assert_eq!(missing.code, OCF_ERR_CONFIGURED, "{}", missing.text());
    assert!(
        missing.text().contains("'device' is required"),
        "{}",
        missing.text()
    );
    let unknown = with(Some("nosuch"), &none);
    assert_eq!(unknown.code, OCF_ERR_CONFIGURED, "{}", unknown.text());
    // gmdd stopped: the device is checked against the configuration file.
    alpha.terminate();
    let unknown = with(Some("nosuch"), &cluster.config);
    assert_eq!(unknown.code, OCF_ERR_CONFIGURED, "{}", unknown.text());
    assert!(
        unknown.text().contains("no device nosuch"),
        "{}",
        unknown.text()
    );
    let known = with(Some(DEV), &cluster.config);
    assert_eq!(known.code, OCF_SUCCESS, "{}", known.text());
    // A probe with gmdd stopped: not running.
    let probe = ra.action_with("monitor", true);
    assert_eq!(probe.code, OCF_NOT_RUNNING, "{}", probe.text());
}
