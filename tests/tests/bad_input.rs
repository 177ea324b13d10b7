//! Bad input gets a clear message, a non-zero exit status, no half-made
//! state, and a daemon that keeps serving.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;

use gmd_tests::*;

const DEV: &str = "data10gmd";

fn gmdd_fails(cluster: &Cluster) -> Run {
    let r = run(Command::new(bin("gmdd"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--machine", "alpha", "--socket"])
        .arg(cluster.socket("alpha")));
    assert_ne!(
        r.code,
        0,
        "gmdd should have refused to start:\n{}",
        r.text()
    );
    assert!(!cluster.socket("alpha").exists(), "no socket left behind");
    r
}

#[test]
fn each_class_of_config_error_stops_gmdd_with_file_and_field() {
    let cases: [(&str, &str, &[&str]); 7] = [
        ("[cluster]", "[cluster", &["cluster.toml", "line"]),
        ("hwm_kib = 128", "hwm_kb = 128", &["cluster.toml", "hwm_kb"]),
        (
            "mode = \"mwc\"",
            "mode = \"turbo\"",
            &["devices.data10gmd.mode", "\"sync\", \"mwc\" or \"async\""],
        ),
        (
            "minor = 10",
            "minor = 4096",
            &["devices.data10gmd.minor", "0–1023"],
        ),
        (
            "site = \"dallas\"",
            "site = \"paris\"",
            &["machines.beta.site", "unknown site"],
        ),
        (
            "[devices.data10gmd.machines.beta]",
            "[devices.data10gmd.machines.zeta]",
            &["devices.data10gmd.machines.zeta", "unknown machine"],
        ),
        (
            "size = \"256MiB\"",
            "size = \"huge\"",
            &["devices.data10gmd.size", "not a size"],
        ),
    ];
    for (from, to, needles) in cases {
        let cluster = Cluster::with_config(|t| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, to, 1)
        });
        let r = gmdd_fails(&cluster);
        for needle in needles {
            assert!(
                r.stderr.contains(needle),
                "case {to:?}: {needle:?} missing in:\n{}",
                r.stderr
            );
        }
        // verify reports the same problems and fails.
        let v = cluster.gmdctl_offline("alpha", &["verify"]);
        assert_ne!(v.code, 0, "{}", v.text());
        assert!(v.stdout.trim_end().ends_with("ERROR(S)"), "{}", v.stdout);
    }
}

#[test]
fn missing_key_unknown_machine_and_busy_ports_are_refused() {
    let cluster = Cluster::new();
    std::fs::remove_file(cluster.path("cluster.key")).unwrap();
    let r = gmdd_fails(&cluster);
    assert!(r.stderr.contains("gmdctl genkey"), "{}", r.stderr);
    run(Command::new(bin("gmdctl"))
        .arg("genkey")
        .arg(cluster.path("cluster.key")))
    .ok();
    let exposed = cluster.path("cluster.key");
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = gmdd_fails(&cluster);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(Command::new(bin("gmdd"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--machine", "omega", "--socket"])
        .arg(cluster.socket("alpha")));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("machines: alpha, beta"), "{}", r.stderr);
    // The NBD port is taken.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", cluster.nbd_ports[0])).unwrap();
    let r = gmdd_fails(&cluster);
    assert!(
        r.stderr.contains("machines.alpha.nbd_listen"),
        "{}",
        r.stderr
    );
}

/// The runtime has one thread unless told otherwise (a second one mostly
/// wakes the first, bench/RESULTS.md); a count of none, or more than 256,
/// is refused before anything starts.
#[test]
fn gmdd_runs_one_runtime_thread_unless_told_and_refuses_a_bad_count() {
    let cluster = Cluster::new();
    for bad in ["0", "257", "many"] {
        let r = run(Command::new(bin("gmdd"))
            .arg("--config")
            .arg(&cluster.config)
            .args(["--machine", "alpha", "--runtime-threads", bad, "--socket"])
            .arg(cluster.socket("alpha")));
        assert_eq!(r.code, 2, "{}", r.text());
        assert!(r.stderr.contains("--runtime-threads"), "{}", r.stderr);
        assert!(!cluster.socket("alpha").exists(), "no socket left behind");
    }
    let alpha = cluster.gmdd("alpha");
    assert!(
        alpha.log_text().contains("runtime_threads=1"),
        "{}",
        alpha.log_text()
    );
}

#[test]
fn a_second_gmdd_on_the_same_socket_is_refused() {
    let cluster = Cluster::new();
    let _alpha = cluster.gmdd("alpha");
    let r = run(Command::new(bin("gmdd"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--machine", "alpha", "--socket"])
        .arg(cluster.socket("alpha")));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("already running"), "{}", r.stderr);
}

#[test]
fn a_corrupt_state_map_refuses_until_dirtied_and_the_daemon_keeps_serving() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x5a 0 64k"]));
    alpha.terminate();
    // Scribble over both copies of page 0 of the map.
    let map = cluster.path("alpha/data10.sm");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[8192 + 100..8192 + 200].fill(0xee);
    bytes[12288 + 100..12288 + 200].fill(0xee);
    std::fs::write(&map, &bytes).unwrap();
    let alpha = cluster.gmdd("alpha");
    assert!(
        alpha.log_text().contains("not restored"),
        "{}",
        alpha.log_text()
    );
    let status = alpha.ctl(&["status", DEV]).ok();
    assert!(status.stdout.contains("DEFINED"), "{}", status.stdout);
    assert!(
        status.stdout.contains("gmdctl dirty data10gmd"),
        "{}",
        status.stdout
    );
    let refused = alpha.ctl(&["configure", DEV]);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains(&map.display().to_string()),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("gmdctl dirty data10gmd"),
        "{}",
        refused.stderr
    );
    let show = alpha.ctl(&["show-state", DEV]);
    assert_eq!(show.code, 2, "never shown as clean: {}", show.text());
    assert!(show.stderr.contains("corrupt"), "{}", show.text());
    // Recovery: keep this side's data, resynchronise everything later.
    alpha.ctl(&["dirty", DEV]).ok();
    alpha.ctl(&["configure", DEV]).ok();
    alpha.ctl(&["start", DEV]).ok();
    alpha.ctl(&["primary", DEV]).ok();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["read -P 0x5a 0 64k"]));
    let show = alpha.ctl(&["show-state", DEV]);
    assert!(show.stdout.contains("8192 stale"), "{}", show.stdout);
}

#[test]
fn garbage_on_the_nbd_socket_harms_nobody_else() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", cluster.nbd_ports[0])).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&[0, 0, 0, 3]).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    // A client that connects and sends pure noise.
    let mut noise = std::net::TcpStream::connect(("127.0.0.1", cluster.nbd_ports[0])).unwrap();
    noise.write_all(&[0xff; 4096]).unwrap();
    let _ = noise.read_to_end(&mut rest);
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 7 0 4k", "read -P 7 0 4k"],
    ));
    assert!(alpha.log_text().contains("garbage"), "{}", alpha.log_text());
    let status = alpha.ctl(&["status", DEV]).ok();
    assert!(status.stdout.contains("(0 client(s))"), "{}", status.stdout);
}

#[test]
fn control_errors_have_messages_and_exit_codes() {
    let cluster = Cluster::new();
    // No daemon: 255 with what to do.
    let r = cluster.gmdctl_offline("alpha", &["status"]);
    assert_eq!(r.code, 255);
    assert!(r.stderr.contains("gmdd is not running"), "{}", r.stderr);
    let alpha = cluster.gmdd("alpha");
    let r = alpha.ctl(&["start", "nosuch"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no device named nosuch"), "{}", r.stderr);
    let r = alpha.ctl(&["stop", DEV]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("must be AVAILABLE"), "{}", r.stderr);
    let r = alpha.ctl(&["down", DEV, "gamma"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a remote peer"), "{}", r.stderr);
    let r = alpha.ctl(&["start"]);
    assert_eq!(r.code, 1, "usage error: {}", r.text());
    let r = alpha.ctl(&["frobnicate"]);
    assert_eq!(r.code, 1, "usage error: {}", r.text());
    let r = alpha.ctl(&["init-state", DEV]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    // Raw protocol abuse on the control socket.
    let stream = UnixStream::connect(&alpha.socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    writer.write_all(b"{this is not json\n").unwrap();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("malformed request"), "{line}");
    line.clear();
    writer
        .write_all(b"{\"version\":99,\"cmd\":\"hello\"}\n")
        .unwrap();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("protocol version 99"), "{line}");
    // Still serving.
    alpha.ctl(&["status"]).ok();
    // gmdstat exit codes.
    assert_eq!(alpha.stat(&["--bogus"]).code, 1);
    assert_eq!(alpha.stat(&[]).code, 1);
    assert_eq!(alpha.stat(&["-l", "nosuch"]).code, 2);
    assert_eq!(alpha.stat(&["-l", DEV]).code, 2, "not AVAILABLE");
    assert_eq!(alpha.stat(&["-A"]).code, 0);
    let down = run(Command::new(bin("gmdstat")).args(["--socket", "/nonexistent/gmdd.sock", "-A"]));
    assert_eq!(down.code, 255);
}

#[test]
fn the_control_socket_is_for_root_only() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    let mode = std::fs::metadata(&alpha.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Let another user reach the socket's directory, then try as nobody.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("gmdctl"))
        .arg("--socket")
        .arg(&alpha.socket)
        .arg("status"));
    assert_eq!(r.code, 255, "{}", r.text());
    assert!(r.stderr.contains("root only"), "{}", r.stderr);
}

#[test]
fn verify_passes_on_a_good_setup_and_names_each_problem() {
    let cluster = Cluster::new();
    let v = cluster.gmdctl_offline("alpha", &["verify"]).ok();
    assert!(v.stdout.trim_end().ends_with("No ERRORS"), "{}", v.stdout);
    // Wrong data size on alpha, missing data file on beta.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(cluster.path("alpha/data10.img"))
        .unwrap();
    f.set_len(DEVICE_SIZE / 2).unwrap();
    let v = cluster.gmdctl_offline("alpha", &["verify"]);
    assert_eq!(v.code, 1);
    assert!(
        v.stdout.contains("configured size is 268435456"),
        "{}",
        v.stdout
    );
    std::fs::remove_file(cluster.path("beta/data10.img")).unwrap();
    std::fs::remove_file(cluster.path("beta/data10.sm")).unwrap();
    let v = cluster.gmdctl_offline("beta", &["verify"]);
    assert_eq!(v.code, 1);
    assert!(v.stdout.contains("truncate -s 268435456"), "{}", v.stdout);
    assert!(
        v.stdout.contains("gmdctl init-state data10gmd"),
        "{}",
        v.stdout
    );
    assert!(v.stdout.trim_end().ends_with("2 ERROR(S)"), "{}", v.stdout);
}

#[test]
fn verify_names_the_site_role_and_checks_the_fence_handler() {
    let cluster = Cluster::new();
    let v = cluster.gmdctl_offline("alpha", &["verify"]).ok();
    assert!(v.stdout.contains("site austin is dominant"), "{}", v.stdout);
    let v = cluster.gmdctl_offline("beta", &["verify"]).ok();
    assert!(
        v.stdout.contains("site dallas is not dominant"),
        "{}",
        v.stdout
    );
    // A handler that is missing, then one that is not executable.
    let config = cluster.path("cluster.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let handler = cluster.path("fence.sh");
    let text = text.replacen(
        "[machines.alpha]",
        &format!(
            "[machines.alpha]\nfence_handler = \"{}\"",
            handler.display()
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let v = cluster.gmdctl_offline("alpha", &["verify"]);
    assert_eq!(v.code, 1, "{}", v.text());
    assert!(
        v.stdout.contains("machines.alpha.fence_handler") && v.stdout.contains("cannot be used"),
        "{}",
        v.stdout
    );
    std::fs::write(&handler, "#!/bin/sh\nexit 0\n").unwrap();
    let v = cluster.gmdctl_offline("alpha", &["verify"]);
    assert!(
        v.stdout.contains("is not an executable file"),
        "{}",
        v.stdout
    );
    Command::new("chmod")
        .arg("+x")
        .arg(&handler)
        .status()
        .unwrap();
    let v = cluster.gmdctl_offline("alpha", &["verify"]).ok();
    assert!(v.stdout.contains("fence handler"), "{}", v.stdout);
    assert!(v.stdout.trim_end().ends_with("No ERRORS"), "{}", v.stdout);
    // A relative path is refused when the file is read.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&handler.display().to_string(), "fence.sh");
    std::fs::write(&config, text).unwrap();
    let v = cluster.gmdctl_offline("alpha", &["verify"]);
    assert_eq!(v.code, 1, "{}", v.text());
    assert!(v.stdout.contains("not an absolute path"), "{}", v.stdout);
}
