//! What people see and script against: machines whose cluster keys differ
//! are named as such; metrics pass `promtool check metrics` and carry the
//! state sets the dashboard and alert rules use; `gmdctl up`, the JSON of
//! `list`/`verify`/`show-state`, the map picture, `events --now
//! --timestamps`, and device events pushed as they happen.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn machines_with_different_keys_are_told_so_in_the_log_status_and_netstat() {
    let cluster = Cluster::new();
    // beta gets a key of its own: every datagram between them is rejected.
    let beta_config = cluster.path("beta.toml");
    let text = std::fs::read_to_string(&cluster.config).expect("config");
    std::fs::write(
        &beta_config,
        text.replace("key_file = \"cluster.key\"", "key_file = \"beta.key\""),
    )
    .expect("beta config");
    run(Command::new(bin("gmdctl"))
        .arg("genkey")
        .arg(cluster.path("beta.key")))
    .ok();
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd_with_config("beta", &beta_config);
    alpha.ctl(&["configure", DEV]).ok();
    wait_for(
        "alpha's log names beta's address",
        Duration::from_secs(30),
        || alpha.log_text().contains("failed authentication"),
    );
    let log = alpha.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("failed authentication"))
        .expect("line");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("cluster keys"), "{line}");
    assert!(line.contains("(beta)"), "{line}");
    // netstat names the source and the machine.
    let r = alpha.ctl(&["netstat", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let f = &v["auth_failures"][0];
    assert_eq!(f["machine"], "beta", "{v}");
    assert!(f["count"].as_u64().unwrap_or(0) > 0, "{v}");
    let text = alpha.ctl(&["netstat"]).ok().stdout;
    assert!(
        text.contains("failed authentication") && text.contains("(beta)"),
        "{text}"
    );
    // status says it on the device's peer.
    let status = alpha.ctl(&["status", DEV]).ok().stdout;
    assert!(
        status.contains("failed authentication: the cluster keys"),
        "{status}"
    );
    assert!(alpha.status_json(DEV)["peers"][0]["auth_failures"].as_u64() > Some(0));
    // At most once a minute per source: 5 s later still one line.
    std::thread::sleep(Duration::from_secs(5));
    let count = alpha
        .log_text()
        .lines()
        .filter(|l| l.contains("failed authentication"))
        .count();
    assert_eq!(count, 1, "{}", alpha.log_text());
    drop(beta);
}

/// GET /metrics over plain HTTP/1.1; the body.
fn scrape(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let (_, body) = text.split_once("\r\n\r\n").expect("http response");
            return body.to_owned();
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `gmd_…` metric names in a PromQL expression (histogram suffixes cut).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("gmd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].trim_end_matches("_bucket").to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn a_real_scrape_passes_promtool_and_has_what_the_dashboard_and_alerts_use() {
    let port = free_port();
    let cluster = Cluster::with_metrics_on(port);
    cluster.init_zeroed();
    let (alpha, _beta) = cluster.start_pair();
    alpha.ctl(&["primary", DEV]).ok();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x22 0 1M"]));
    let body = scrape(&format!("127.0.0.1:{port}"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // State sets: one sample at 1 per device.
    for (family, one) in [
        ("gmd_device_state", "state=\"AVAILABLE\"} 1"),
        ("gmd_device_mode_in_effect", "mode=\"mwc\"} 1"),
        ("gmd_device_role", "role=\"primary\"} 1"),
    ] {
        let lines: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .collect();
        assert!(lines.len() >= 3, "{family}: {lines:?}");
        let ones: Vec<&&str> = lines.iter().filter(|l| l.ends_with(" 1")).collect();
        assert_eq!(ones.len(), 1, "{family}: {lines:?}");
        assert!(ones[0].ends_with(one), "{family}: {lines:?}");
    }
    assert!(body.contains(&format!(
        "gmd_device_size_bytes{{device=\"{DEV}\"}} {}",
        DEVICE_SIZE
    )));
    assert!(body.contains("gmd_build_info{version=\""));
    assert!(body.contains("gmd_device_out_of_sync_bytes{"));
    assert!(body.contains("gmd_device_resync_sent_bytes_total{"));
    // Every metric the dashboard and the alert rules query is served (the
    // authentication failures only once there are some).
    let mut names = Vec::new();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("dist/grafana/gmd-dashboard.json")).expect("dashboard"),
    )
    .expect("json");
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            names.extend(metric_names(t["expr"].as_str().unwrap_or("")));
        }
    }
    let rules = std::fs::read_to_string(repo("dist/prometheus/gmd-alerts.yml")).expect("rules");
    for l in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        names.extend(metric_names(l));
    }
    for name in names {
        if name == "gmd_auth_failed_datagrams_total" {
            continue;
        }
        assert!(
            body.contains(&format!("\n# TYPE {name} ")),
            "{name} is queried but not served"
        );
    }
}

#[test]
fn up_list_verify_and_show_state_speak_json_and_draw_the_map() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 0x22 0 64k", "write -P 0x22 128M 32k"],
    ));

    let list: serde_json::Value =
        serde_json::from_str(&alpha.ctl(&["list", "--json"]).ok().stdout).expect("list json");
    assert_eq!(list["schema"], 1);
    assert_eq!(list["devices"][0]["name"], DEV);
    assert_eq!(list["devices"][0]["state"], "AVAILABLE");
    assert_eq!(list["devices"][0]["role"], "primary");
    assert_eq!(alpha.status_json(DEV)["schema"], 1);

    let verify = alpha.ctl(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&verify.stdout).expect("verify json");
    assert_eq!(v["schema"], 1);
    // beta is not running: the check across machines fails, and says so.
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(verify.code, 1);
    assert!(v["errors"].as_u64() >= Some(1));
    assert!(v["findings"].as_array().is_some_and(|f| {
        f.iter()
            .any(|f| f["ok"] == false && f["text"].as_str().is_some_and(|t| t.contains("beta")))
    }));

    // Standalone: the written regions are stale (exit 2: dirty).
    let r = alpha.ctl(&["show-state", DEV, "--json"]);
    assert_eq!(r.code, 2, "{}", r.text());
    let m: serde_json::Value = serde_json::from_str(&r.stdout).expect("show-state json");
    assert_eq!(m["schema"], 1);
    assert_eq!(m["regions"], 8192);
    assert_eq!(m["region_bytes"], 32768);
    assert_eq!(m["stale"], 3);
    assert_eq!(m["dirty"], true);
    assert_eq!(
        m["runs"],
        serde_json::json!([
            {"first": 0, "count": 2, "value": 15},
            {"first": 4096, "count": 1, "value": 15},
        ])
    );
    let r = alpha.ctl(&["show-state", DEV, "--picture"]);
    assert_eq!(r.code, 2, "{}", r.text());
    let grid: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| !l.is_empty() && l.chars().all(|c| ".hinS".contains(c)))
        .collect();
    assert!(
        r.stdout.lines().all(|l| l.chars().count() <= 80),
        "{}",
        r.stdout
    );
    // 8192 regions, 4 per character: 2048 characters, 80 a line.
    assert_eq!(grid.len(), 26, "{}", r.stdout);
    assert!(grid[0].starts_with("S."), "{}", r.stdout);
    let cells: String = grid.concat();
    assert_eq!(
        cells.chars().filter(|c| *c == 'S').count(),
        2,
        "{}",
        r.stdout
    );
    assert_eq!(cells.chars().nth(1024), Some('S'), "{}", r.stdout);

    // More for the resync to carry: 96 MiB.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x33 64M 96M"]));

    // DRBD's habit: one command from DEFINED to AVAILABLE (beta configures,
    // then starts and receives alpha's stale regions).
    let beta = cluster.gmdd("beta");
    assert_eq!(beta.status_json(DEV)["state"], "DEFINED");
    let up = beta.ctl(&["up", DEV]).ok();
    assert!(up.stdout.contains(DEV), "{}", up.text());
    // While it runs, status shows the resync as a bar with percent done.
    let mut bar = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while bar.is_none() && Instant::now() < deadline {
        let text = alpha.ctl(&["status", DEV]).ok().stdout;
        bar = text
            .lines()
            .find(|l| l.trim_start().starts_with("resync ") && l.contains("regions left"))
            .map(str::to_owned);
        let s = alpha.status_json(DEV);
        if bar.is_none() && s["link"]["connected"] == true && s["link"]["resync_remaining"] == 0 {
            break;
        }
    }
    let bar = bar.expect("no resync line in gmdctl status while it ran");
    let (_, rest) = bar.split_once('[').expect("bar");
    let (cells, rest) = rest.split_once(']').expect("bar end");
    assert_eq!(cells.chars().count(), 20, "{bar}");
    assert!(cells.chars().all(|c| c == '#' || c == '.'), "{bar}");
    assert!(
        rest.split_whitespace()
            .next()
            .is_some_and(|p| p.ends_with('%')),
        "{bar}"
    );
    assert_eq!(beta.status_json(DEV)["state"], "AVAILABLE");
    let again = beta.ctl(&["up", DEV]).ok();
    assert!(
        again.stdout.contains("already AVAILABLE"),
        "{}",
        again.text()
    );
    alpha.wait_in_sync(DEV);
}

#[test]
fn events_now_prints_the_state_once_with_timestamps() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let r = alpha.ctl(&["events", "--now", "--timestamps"]).ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.ends_with(" exists -")),
        "{lines:?}"
    );
    for l in &lines {
        let (stamp, rest) = l.split_once(' ').expect("stamp");
        // 2025-01-31T12:34:56.789Z
        assert_eq!(stamp.len(), 24, "{l}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{l}");
        assert!(rest.starts_with("exists "), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("exists device name:{DEV} state:AVAILABLE")))
    );
}

/// `gmdctl events --json` in a thread; each event with the time it was read.
fn follow(
    gmdd: &Gmdd,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    let mut child = gmdd.events_json();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).expect("json")).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

#[test]
fn device_events_are_pushed_when_they_happen_not_polled() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let (mut child, events) = follow(&alpha);
    // The `exists` part first.
    loop {
        let e = events
            .recv_timeout(Duration::from_secs(10))
            .expect("exists");
        if e["object"] == "-" {
            break;
        }
    }
    // Each state change stamped at most a few ms after the command that
    // made it returned (a 250 ms poll would average 125 ms).
    let mut delays = Vec::new();
    for (cmd, state) in [("stop", "STOPPED"), ("start", "AVAILABLE")]
        .iter()
        .cycle()
        .take(6)
    {
        alpha.ctl(&[cmd, DEV]).ok();
        let returned = now_ms();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no device {state} event"));
            if e["object"] == "device" && e["attrs"]["state"] == *state {
                delays.push((e["time_ms"].as_i64().expect("time") - returned).max(0));
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let mean = delays.iter().sum::<i64>() / delays.len() as i64;
    assert!(mean < 80, "events came {delays:?} ms after their commands");
}
