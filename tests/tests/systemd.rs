//! The systemd unit (`dist/gmdd.service`) and gmdd's side of it: the unit
//! passes `systemd-analyze verify`, its `systemd-analyze security` exposure
//! is at most 5.0, and gmdd speaks the notify protocol (READY once its
//! control socket serves and its devices are restored, STATUS, STOPPING).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gmd_tests::*;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The unit with ExecStart pointing at the gmdd just built (verify checks
/// that the program exists), and the man pages it names on MANPATH.
fn unit_for_checks(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo("dist/gmdd.service")).expect("unit");
    let gmdd = bin("gmdd");
    let text = text.replace("/usr/sbin/gmdd", gmdd.to_str().expect("utf-8 path"));
    let path = dir.join("gmdd.service");
    std::fs::write(&path, text).expect("write unit");
    run(Command::new(bin("gmdctl"))
        .arg("generate")
        .arg(dir.join("gen")))
    .ok();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_checks(dir.path());
    let r = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", dir.path().join("gen/man")));
    assert_eq!(r.code, 0, "systemd-analyze verify:\n{}", r.text());
    assert!(
        r.stderr.trim().is_empty(),
        "systemd-analyze verify warned:\n{}",
        r.stderr
    );
}

#[test]
fn the_unit_is_sandboxed_to_an_exposure_of_at_most_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_checks(dir.path());
    let r = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    let text = r.text();
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level:\n{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("{line}");
    assert!(score <= 5.0, "exposure {score} > 5.0:\n{text}");
    // What gmdd needs is still there.
    let unit_text = std::fs::read_to_string(&unit).expect("unit");
    for needed in [
        "Type=notify",
        "DeviceAllow=block-* rw",
        "DeviceAllow=/dev/ublk-control rw",
        "SystemCallFilter=@system-service",
        "LimitMEMLOCK=infinity",
        "CAP_SYS_ADMIN",
    ] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
    // io_uring (@aio) and mlock (@memlock) are in the allowed set.
    let service = run(Command::new("systemd-analyze").args(["syscall-filter", "@system-service"]));
    for (group, call) in [
        ("@aio", "io_uring_setup"),
        ("@aio", "io_uring_enter"),
        ("@memlock", "mlock"),
    ] {
        let calls = run(Command::new("systemd-analyze").args(["syscall-filter", group]));
        assert!(
            service.stdout.lines().any(|l| l.trim() == group)
                && calls.stdout.lines().any(|l| l.trim() == call),
            "{call} ({group}) is not allowed by @system-service"
        );
    }
}

/// Receives notify datagrams until one contains `wanted`; returns them all.
fn receive_until(sock: &UnixDatagram, wanted: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == wanted);
            got.push(msg);
            if done {
                return got;
            }
        }
    }
    panic!("no {wanted} within {timeout:?}; got {got:?}");
}

#[test]
fn gmdd_notifies_ready_once_its_devices_are_restored_then_stopping() {
    let cluster = Cluster::new();
    // A device left AVAILABLE by the previous gmdd: the next must have it
    // back before it says READY.
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone("data10gmd", "beta");
    alpha.terminate();

    let sock_path = cluster.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let mut child = Command::new(bin("gmdd"))
        .arg("--config")
        .arg(&cluster.config)
        .arg("--machine")
        .arg("alpha")
        .arg("--socket")
        .arg(cluster.socket("alpha"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gmdd");
    let got = receive_until(&sock, "READY=1", Duration::from_secs(30));
    // At READY the control socket answers and the device is back.
    let status = run(Command::new(bin("gmdctl"))
        .arg("--socket")
        .arg(cluster.socket("alpha"))
        .args(["status", "data10gmd", "--json"]))
    .ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).expect("json");
    assert_eq!(v[0]["state"], "AVAILABLE", "{got:?}");
    assert!(
        got.iter().any(|m| m.contains("STATUS=starting")),
        "no STATUS while starting: {got:?}"
    );
    let ready = got.last().expect("READY");
    assert!(
        ready.contains("STATUS=1 device(s): 1 AVAILABLE"),
        "READY without a status line: {ready:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let got = receive_until(&sock, "STOPPING=1", Duration::from_secs(30));
    assert!(got.last().expect("STOPPING").contains("STATUS=stopping"));
    let status = child.wait().expect("wait");
    assert!(status.success(), "gmdd exited with {status}");
}
