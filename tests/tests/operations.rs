//! Operations: gmdstat and netstat against daemons with known traffic
//! (golden files in tests/golden/, `~` masking figures that depend on time
//! or load), their exit codes, the event stream, the Prometheus endpoint
//! read by a real parser, and sizing of a file written at a known rate.
//!
//! `GMD_BLESS=1` rewrites the golden files from the output of this run
//! (then put the `~` masks back by hand).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}

/// Compares text with a golden file token by token: a `~` token matches any
/// token. Lines must also be at most 80 columns.
#[track_caller]
fn assert_golden_text(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("GMD_BLESS").is_some() {
        std::fs::write(&path, actual).expect("bless");
    }
    let golden = std::fs::read_to_string(&path).expect("golden file");
    let g: Vec<&str> = golden.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    assert_eq!(
        g.len(),
        a.len(),
        "{name}: line count differs\n--- golden\n{golden}--- actual\n{actual}"
    );
    for (gl, al) in g.iter().zip(&a) {
        assert!(al.chars().count() <= 80, "{name}: wider than 80: {al:?}");
        let gt: Vec<&str> = gl.split_whitespace().collect();
        let at: Vec<&str> = al.split_whitespace().collect();
        let same = gt.len() == at.len() && gt.iter().zip(&at).all(|(g, a)| token_matches(g, a));
        assert!(
            same,
            "{name}: line differs\n golden: {gl}\n actual: {al}\n--- whole output\n{actual}"
        );
    }
}

/// Whether `actual` matches `golden`, where each `~` in `golden` stands for
/// any run of characters (e.g. `(~` matches `(1.363`).
fn token_matches(golden: &str, actual: &str) -> bool {
    let parts: Vec<&str> = golden.split('~').collect();
    if parts.len() == 1 {
        return golden == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || actual.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &actual[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Compares JSON with a golden file: `"~"` matches any value; objects must
/// have the same keys, arrays the same length.
#[track_caller]
fn assert_golden_json(name: &str, actual: &serde_json::Value) {
    let path = golden_path(name);
    if std::env::var_os("GMD_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(actual).unwrap() + "\n").expect("bless");
    }
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("golden file"))
            .expect("golden json");
    fn walk(g: &serde_json::Value, a: &serde_json::Value, at: &str) -> Result<(), String> {
        use serde_json::Value::*;
        match (g, a) {
            (String(s), _) if s == "~" => Ok(()),
            (Object(go), Object(ao)) => {
                let gk: Vec<_> = go.keys().collect();
                let ak: Vec<_> = ao.keys().collect();
                if gk != ak {
                    return Err(format!("{at}: keys {gk:?} != {ak:?}"));
                }
                for (k, v) in go {
                    walk(v, &ao[k], &format!("{at}.{k}"))?;
                }
                Ok(())
            }
            (Array(ga), Array(aa)) => {
                if ga.len() != aa.len() {
                    return Err(format!("{at}: {} items != {}", ga.len(), aa.len()));
                }
                for (i, (g, a)) in ga.iter().zip(aa).enumerate() {
                    walk(g, a, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            _ if g == a => Ok(()),
            _ => Err(format!("{at}: {g} != {a}")),
        }
    }
    if let Err(e) = walk(&golden, actual, "$") {
        panic!(
            "{name}: {e}\n{}",
            serde_json::to_string_pretty(actual).unwrap()
        );
    }
}

fn stat_json(gmdd: &Gmdd, args: &[&str]) -> serde_json::Value {
    let run = gmdd.stat(args).ok();
    serde_json::from_str(run.stdout.lines().last().expect("a report")).expect("gmdstat json")
}

/// Two machines mirroring in mwc; alpha's application writes 16 × 64 KiB
/// and reads 4 × 64 KiB.
fn pair_with_known_traffic() -> (Cluster, Gmdd, Gmdd) {
    let cluster = Cluster::with_mode("mwc", 5);
    let (alpha, beta) = cluster.start_pair();
    let mut commands = Vec::new();
    for i in 0..16 {
        commands.push(format!("write -P 0x5a {} 64k", i * 65536));
    }
    for i in 0..4 {
        commands.push(format!("read -P 0x5a {} 64k", i * 65536));
    }
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &refs));
    wait_for(
        "beta applied alpha's writes",
        Duration::from_secs(60),
        || {
            stat_json(&beta, &["-l", DEV, "--json"])["devices"][0]["remote"]["write_bytes"]
                == 16 * 65536
        },
    );
    (cluster, alpha, beta)
}

#[test]
fn gmdstat_and_netstat_match_golden_output() {
    let (_cluster, alpha, beta) = pair_with_known_traffic();
    let text = alpha.stat(&["-l", DEV]).ok().stdout;
    assert_golden_text("gmdstat_alpha.txt", &text);
    let text = beta.stat(&["-A"]).ok().stdout;
    assert_golden_text("gmdstat_beta.txt", &text);
    let text = alpha.stat(&["-s", "-A"]).ok().stdout;
    assert_golden_text("gmdstat_summary.txt", &text);
    // Two reports: the second covers an interval of about 0.2 s.
    let run = alpha.stat(&["-s", "-l", DEV, "-i", "0.2", "-c", "2"]).ok();
    assert_golden_text("gmdstat_interval.txt", &run.stdout);
    let json = stat_json(&alpha, &["-l", DEV, "--json"]);
    assert_golden_json("gmdstat_alpha.json", &json);
    let text = alpha.ctl(&["netstat"]).ok().stdout;
    assert_golden_text("netstat_alpha.txt", &text);
    let text = alpha
        .ctl(&["netstat", "-s", "-m", "beta", "-n", "geonet1"])
        .ok()
        .stdout;
    assert_golden_text("netstat_summary.txt", &text);
    let run = alpha.ctl(&["netstat", "--json"]).ok();
    let json: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("json");
    assert_golden_json("netstat_alpha.json", &json);
    // The active path and its smoothed RTT are there.
    assert_eq!(json["paths"][0]["active"], true, "{json}");
    assert!(json["paths"][0]["srtt_us"].as_u64().is_some(), "{json}");
}

#[test]
fn gmdstat_and_netstat_exit_codes() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    // Bad switches: 1.
    for args in [
        &["--bogus"][..],
        &[],
        &["-A", "-l", DEV],
        &["-A", "-i", "0"],
        &["-A", "-i", "x"],
        &["-A", "-c", "0"],
    ] {
        let run = alpha.stat(args);
        assert_eq!(run.code, 1, "gmdstat {args:?}: {}", run.text());
    }
    // Not available: 2 (unknown, or not AVAILABLE).
    assert_eq!(alpha.stat(&["-l", "nosuch"]).code, 2);
    let run = alpha.stat(&["-l", DEV]);
    assert_eq!(run.code, 2, "{}", run.text());
    assert!(run.stderr.contains("not AVAILABLE"), "{}", run.text());
    assert_eq!(alpha.stat(&["-A"]).code, 0);
    // System error: 255.
    let down =
        run_cmd(Command::new(bin("gmdstat")).args(["--socket", "/nonexistent/gmdd.sock", "-A"]));
    assert_eq!(down.code, 255, "{}", down.text());
    // netstat: the same classes.
    assert_eq!(alpha.ctl(&["netstat", "-i", "-1"]).code, 1);
    assert_eq!(alpha.ctl(&["netstat", "-m", "nosuch"]).code, 2);
    assert_eq!(alpha.ctl(&["netstat", "-n", "nonet"]).code, 2);
    assert_eq!(alpha.ctl(&["netstat", "-m", "beta"]).code, 0);
    let down = run_cmd(Command::new(bin("gmdctl")).args([
        "--socket",
        "/nonexistent/gmdd.sock",
        "netstat",
    ]));
    assert_eq!(down.code, 255, "{}", down.text());
}

fn run_cmd(cmd: &mut Command) -> Run {
    run(cmd)
}

/// Reads `gmdctl events --json` lines in a thread.
struct Events {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Events {
    fn start(gmdd: &Gmdd) -> Events {
        let mut child = gmdd.events_json();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line).expect("event json");
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Events {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for an event whose object is `object` and whose attributes
    /// include `attrs`.
    #[track_caller]
    fn expect(&mut self, object: &str, attrs: &[(&str, &str)]) -> serde_json::Value {
        let matches = |e: &serde_json::Value| {
            e["object"] == object && attrs.iter().all(|(k, v)| e["attrs"][*k] == *v)
        };
        if let Some(e) = self.seen.iter().find(|e| matches(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(e) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(e.clone());
                if matches(&e) {
                    return e;
                }
            }
        }
        panic!(
            "no {object} event with {attrs:?}; seen:\n{}",
            self.seen
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Async mode with the peer frozen (SIGSTOP: reachable as far as anyone
/// knows, answering nothing): writes complete alone until the unacknowledged
/// backlog would pass the high-water mark, then wait for the peer as in mwc
/// (an `hwm fallback:entered` event); once the peer answers again the
/// backlog drains, async resumes (`fallback:left`) and both copies match.
#[test]
fn async_falls_back_to_mwc_above_the_high_water_mark_and_back() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let cluster = Cluster::with_mode("async", 60);
    let (alpha, beta) = cluster.start_pair();
    alpha.wait_in_sync(DEV);
    let mut events = Events::start(&alpha);
    events.expect("-", &[]);
    let beta_pid = Pid::from_raw(beta.pid() as i32);
    kill(beta_pid, Signal::SIGSTOP).expect("SIGSTOP");
    // Sixteen 64 KiB writes: two fit under the 128 KiB high-water mark.
    let url = alpha.url(DEV);
    let writer = std::thread::spawn(move || {
        let cmds: Vec<String> = (0..16)
            .map(|i| format!("write -P 0x{:02x} {}k 64k", 0x40 + i, i * 64))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&url, &cmds)
    });
    events.expect("hwm", &[("fallback", "entered")]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !writer.is_finished(),
        "writes past the high-water mark completed without the peer"
    );
    let stat = alpha.stat(&["-l", DEV, "--json"]).ok();
    assert!(
        stat.stdout.contains("async-hwm-fallback"),
        "gmdstat does not show the fallback: {}",
        stat.stdout
    );
    kill(beta_pid, Signal::SIGCONT).expect("SIGCONT");
    assert_qemu_io_clean(&writer.join().expect("writer"));
    events.expect("hwm", &[("fallback", "left")]);
    alpha.wait_in_sync(DEV);
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}

#[test]
fn events_stream_state_changes() {
    let cluster = Cluster::with_mode("mwc", 2);
    let alpha = cluster.gmdd("alpha");
    let mut events = Events::start(&alpha);
    let first = events.expect("device", &[("state", "DEFINED")]);
    assert_eq!(first["change"], "exists");
    events.expect("-", &[]);
    alpha.start_standalone(DEV, "beta");
    events.expect("device", &[("state", "STOPPED")]);
    events.expect("device", &[("state", "AVAILABLE")]);
    // Alpha writes alone: beta must be resynchronised when it joins.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x11 0 4M"]));
    let beta = cluster.gmdd("beta");
    events.expect("peer", &[("up", "yes")]);
    beta.ctl(&["configure", DEV]).ok();
    beta.ctl(&["start", DEV]).ok();
    events.expect(
        "connection",
        &[("peer", "beta"), ("connected", "yes"), ("mode", "mwc")],
    );
    events.expect("resync", &[("phase", "start"), ("role", "source")]);
    events.expect("resync", &[("phase", "end")]);
    // The peer goes away: the connection ends and, after the
    // promote-failure timeout, the peer is down.
    beta.kill9();
    events.expect("connection", &[("connected", "no")]);
    events.expect("peer", &[("up", "no")]);
    // Text form, as drbdsetup events2 prints it.
    let mut child = Command::new(bin("gmdctl"))
        .arg("--socket")
        .arg(&alpha.socket)
        .arg("events")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gmdctl events");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("a line");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.trim(), "exists device name:data10gmd state:AVAILABLE");
}

/// GET /metrics over plain HTTP/1.1.
fn scrape(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").expect("http response");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(head.contains("text/plain; version=0.0.4"), "{head}");
            return body.to_owned();
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn prometheus_scrape_parses_with_the_same_figures() {
    let port = free_port();
    let cluster = Cluster::with_metrics_on(port);
    cluster.init_zeroed();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &[
            "write -P 0x22 0 64k",
            "write -P 0x22 1M 64k",
            "write -P 0x22 2M 64k",
        ],
    ));
    let body = scrape(&format!("127.0.0.1:{port}"));
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text format: {e}\n{body}"));
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("device") == Some(DEV))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: {other:?}"),
            })
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert_eq!(value("gmd_device_writes_total"), 3.0);
    assert_eq!(value("gmd_device_written_bytes_total"), 3.0 * 65536.0);
    assert_eq!(value("gmd_device_available"), 1.0);
    // Written alone: each 64 KiB write made two 32 KiB regions stale.
    assert_eq!(value("gmd_device_stale_regions"), 6.0);
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "gmd_device_write_latency_seconds")
        .unwrap_or_else(|| panic!("latency histogram missing:\n{body}"));
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.last().expect("buckets").count, 3.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // Same figures as gmdstat.
    let json = stat_json(&alpha, &["-l", DEV, "--json"]);
    assert_eq!(json["devices"][0]["local"]["writes"], 3);
    // Every metric has HELP and TYPE.
    for s in &scrape.samples {
        let base = s
            .metric
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            scrape.docs.contains_key(base) || scrape.docs.contains_key(&s.metric),
            "{} has no HELP",
            s.metric
        );
        assert!(s.metric.starts_with("gmd_"), "{}", s.metric);
    }
}

#[test]
fn sizing_reports_a_file_written_at_a_known_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("growing.dat");
    std::fs::write(&file, b"").unwrap();
    let mut child = Command::new(bin("gmdctl"))
        .args(["sizing", "-i", "0.5", "-t", "600", "--json"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gmdctl sizing");
    // Let sizing take its first sample, then write 2 MiB in 32 pieces
    // of 64 KiB, about 10 per second.
    std::thread::sleep(Duration::from_millis(1500));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    for _ in 0..32 {
        f.write_all(&[0x33; 65536]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(f);
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let t = &json["targets"][0];
    assert_eq!(t["kind"], "file");
    assert_eq!(t["write_kib"], 2048.0, "{json}");
    let avg = t["avg_write_kib_s"].as_f64().unwrap();
    let peak = t["peak_write_kib_s"].as_f64().unwrap();
    let low = t["low_write_kib_s"].as_f64().unwrap();
    let seconds = t["seconds"].as_f64().unwrap();
    assert!((avg - 2048.0 / seconds).abs() < 0.01, "{json}");
    assert!(low <= avg && avg <= peak && peak > 0.0, "{json}");
    // Bandwidth: bytes/s × 8 with 20% overhead.
    let bw = t["bandwidth_avg_kbit_s"].as_f64().unwrap();
    assert!(
        (bw - avg * 1024.0 * 8.0 / 1000.0 / 0.8).abs() < 0.01,
        "{json}"
    );
    // The full-synchronisation table of reference 3.8.
    let run = run_cmd(Command::new(bin("gmdctl")).args([
        "sizing",
        "--sync-time",
        "--size",
        "1T",
        "--link",
        "1Gbit",
    ]))
    .ok();
    assert_golden_text("sizing_sync_time.txt", &run.stdout);
    assert_eq!(
        run_cmd(Command::new(bin("gmdctl")).args(["sizing", "/nonexistent"])).code,
        2
    );
    assert_eq!(
        run_cmd(Command::new(bin("gmdctl")).args(["sizing", "-i", "x", "/dev/null"])).code,
        1
    );
}

#[test]
fn sighup_applies_what_it_can_and_names_what_needs_a_restart() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(alpha.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP")
    };
    // The metrics endpoint starts without a restart; a DEFINED device takes
    // new attributes.
    let port = free_port();
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let text = text
        .replacen(
            "nbd_listen = \"127.0.0.1:",
            &format!("metrics = \"127.0.0.1:{port}\"\nnbd_listen = \"127.0.0.1:"),
            1,
        )
        .replace("hwm_kib = 128", "hwm_kib = 256");
    std::fs::write(&cluster.config, &text).unwrap();
    hup();
    let body = scrape(&format!("127.0.0.1:{port}"));
    assert!(body.contains("gmd_up{machine=\"alpha\"} 1"), "{body}");
    wait_for("reload logged", Duration::from_secs(30), || {
        alpha.log_text().contains("SIGHUP: configuration reloaded")
    });
    // A network change needs a restart: said, and not applied.
    std::fs::write(
        &cluster.config,
        text.replace("datagram_size = 8192", "datagram_size = 4096"),
    )
    .unwrap();
    hup();
    wait_for("restart warning", Duration::from_secs(30), || {
        alpha
            .log_text()
            .contains("need a restart of gmdd and were not applied: networks")
    });
    // A broken file keeps the configuration in use.
    std::fs::write(&cluster.config, "not toml [").unwrap();
    hup();
    wait_for("reload refused", Duration::from_secs(30), || {
        alpha.log_text().contains("configuration not reloaded")
    });
    alpha.ctl(&["status", DEV]).ok();
}

/// A change made to beta's copy of the configuration.
type Edit = Box<dyn Fn(&str) -> String>;

/// `gmdctl verify` on alpha, once beta answers over GeoMessage.
fn verify_across(alpha: &Gmdd) -> Run {
    let mut last = None;
    wait_for("beta answers verify", Duration::from_secs(60), || {
        let run = alpha.ctl(&["verify"]);
        let reached = !run.stdout.contains("cannot be reached");
        last = Some(run);
        reached
    });
    last.expect("a run")
}

#[test]
fn verify_across_machines_names_each_mismatch() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    let original = std::fs::read_to_string(&cluster.config).unwrap();
    let beta_config = cluster.path("beta.toml");
    // Identical configurations: no errors.
    std::fs::write(&beta_config, &original).unwrap();
    let beta = cluster.gmdd_with_config("beta", &beta_config);
    let run = verify_across(&alpha);
    assert_eq!(run.code, 0, "{}", run.text());
    assert!(
        run.stdout.contains("beta answers over GeoMessage"),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.stdout.lines().last(),
        Some("No ERRORS"),
        "{}",
        run.stdout
    );
    drop(beta);
    let data_sm = cluster.path("beta/data10.sm");
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "name",
            Box::new(|t: &str| t.replace("data10gmd", "data11gmd")),
            "data10gmd: not defined on beta",
        ),
        (
            "minor",
            Box::new(|t: &str| t.replace("minor = 10", "minor = 11")),
            "data10gmd: minor differs: 10 on alpha, 11 on beta",
        ),
        (
            "size",
            Box::new(|t: &str| t.replace("size = \"256MiB\"", "size = \"128MiB\"")),
            "data10gmd: size differs: 268435456 on alpha, 134217728 on beta",
        ),
        (
            "mode",
            Box::new(|t: &str| t.replace("mode = \"mwc\"", "mode = \"sync\"")),
            "data10gmd: mode differs: mwc on alpha, sync on beta",
        ),
        (
            "role",
            Box::new(|t: &str| {
                t.replacen(
                    "state_map = \"alpha/data10.sm\"",
                    "state_map = \"alpha/data10.sm\"\nrole = \"primary\"",
                    1,
                )
            }),
            "data10gmd: role differs: alpha=none beta=none on alpha, alpha=primary beta=none on beta",
        ),
        (
            "networks",
            Box::new(|t: &str| t.replace("datagram_size = 8192", "datagram_size = 4096")),
            "network definitions differ",
        ),
        (
            "state map",
            Box::new(|t: &str| t.to_owned()),
            "data10gmd: on beta:",
        ),
    ];
    for (what, edit, expected) in cases {
        std::fs::write(&beta_config, edit(&original)).unwrap();
        let saved = (what == "state map").then(|| {
            let bytes = std::fs::read(&data_sm).unwrap();
            std::fs::remove_file(&data_sm).unwrap();
            bytes
        });
        let beta = cluster.gmdd_with_config("beta", &beta_config);
        let run = verify_across(&alpha);
        assert_eq!(run.code, 1, "{what}: {}", run.text());
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ERROR") && l.contains(expected)),
            "{what}: expected an ERROR line with {expected:?}:\n{}",
            run.stdout
        );
        assert!(run.stdout.ends_with("ERROR(S)\n"), "{}", run.stdout);
        drop(beta);
        if let Some(bytes) = saved {
            std::fs::write(&data_sm, bytes).unwrap();
        }
    }
}

/// A local route to `addr` with its own MTU, removed when dropped: the
/// loopback delivers to it, and the kernel reports the route's MTU as the
/// path MTU toward it, as for a peer behind a 1 500-byte link.
struct RouteWithMtu(&'static str);

impl RouteWithMtu {
    fn add(addr: &'static str, mtu: u32) -> RouteWithMtu {
        run(Command::new("ip").args([
            "route",
            "replace",
            "local",
            &format!("{addr}/32"),
            "dev",
            "lo",
            "mtu",
            &mtu.to_string(),
            "table",
            "local",
        ]))
        .ok();
        RouteWithMtu(addr)
    }
}

impl Drop for RouteWithMtu {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "route",
                "del",
                "local",
                &format!("{}/32", self.0),
                "table",
                "local",
            ])
            .status();
    }
}

/// With no `datagram_size` set, each path finds the largest datagram it
/// carries whole and data uses it: toward a peer behind a 1 500-byte MTU,
/// 1 472 bytes (the MTU less the IP and UDP headers); over the loopback,
/// the 8 972 of a jumbo frame. `gmdctl netstat` shows both, and nothing
/// warns of fragmentation.
#[test]
fn gmdd_discovers_the_datagram_size_each_path_carries_when_none_is_set() {
    let _route = RouteWithMtu::add("127.77.0.3", 1500);
    let cluster = Cluster::with_config(|t| {
        let at = t.rfind("geonet1 = \"127.0.0.1:").expect("beta's interface");
        let t = format!(
            "{}geonet1 = \"127.77.0.3:{}",
            &t[..at],
            &t[at + "geonet1 = \"127.0.0.1:".len()..]
        );
        t.lines()
            .filter(|l| !l.starts_with("datagram_size"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let alpha = cluster.gmdd("alpha");
    let beta = cluster.gmdd("beta");
    let datagram = |g: &Gmdd| {
        let run = g.ctl(&["netstat", "--json"]).ok();
        let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("netstat json");
        json["paths"][0]["datagram_bytes"].as_u64()
    };
    wait_for(
        "alpha's datagrams at 1 472 bytes",
        Duration::from_secs(20),
        || datagram(&alpha) == Some(1472),
    );
    wait_for(
        "beta's datagrams at 8 972 bytes",
        Duration::from_secs(20),
        || datagram(&beta) == Some(8972),
    );
    let text = alpha.ctl(&["netstat"]).ok().stdout;
    let row = text
        .lines()
        .skip_while(|l| !l.starts_with("PATH TO"))
        .nth(1)
        .expect("path row");
    assert!(row.starts_with("beta ") && row.ends_with(" 1472"), "{text}");
    let log = alpha.log_text();
    assert!(
        log.contains("the path carries datagrams of 1472 bytes (was 1400)"),
        "{log}"
    );
    assert!(!log.contains("IP fragments every datagram"), "{log}");
}

/// A datagram size that the path to the peer cannot carry whole (8 KiB
/// datagrams, the example's, toward a peer behind a 1 500-byte MTU) is
/// named when gmdd starts, with the size that fits; on the loopback the
/// same size draws no warning.
#[test]
fn gmdd_warns_when_datagrams_would_be_fragmented_on_the_way_to_the_peer() {
    const WARNING: &str = "IP fragments every datagram";
    let _route = RouteWithMtu::add("127.77.0.2", 1500);
    let cluster = Cluster::with_config(|t| {
        // beta's GeoMessage address (the second interface) behind the route.
        let at = t.rfind("geonet1 = \"127.0.0.1:").expect("beta's interface");
        format!(
            "{}geonet1 = \"127.77.0.2:{}",
            &t[..at],
            &t[at + "geonet1 = \"127.0.0.1:".len()..]
        )
    });
    let alpha = cluster.gmdd("alpha");
    wait_for("the warning", Duration::from_secs(10), || {
        alpha.log_text().contains(WARNING)
    });
    let log = alpha.log_text();
    assert!(
        log.contains("datagram_size 8192 of network geonet1")
            && log.contains("path to beta at 127.77.0.2:")
            && log.contains("set datagram_size = 1472 or less in [networks.geonet1]"),
        "{log}"
    );
    drop(alpha);
    let plain = Cluster::new();
    let alpha = plain.gmdd("alpha");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!alpha.log_text().contains(WARNING), "{}", alpha.log_text());
}
