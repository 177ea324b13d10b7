//! `gmdctl compare`: online verify of a connected pair. Bytes changed in
//! the secondary's data file behind gmd's back are found (exactly those
//! regions), `--repair` resends them from the primary, the secondary
//! refuses to run it, and a compare while the application writes reports
//! no false differences.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gmd_tests::*;

const DEV: &str = "data10gmd";
const REGION: u64 = 32 << 10;

fn compare_json(gmdd: &Gmdd, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["compare", DEV, "--json"];
    args.extend_from_slice(extra);
    let run = gmdd.ctl(&args).ok();
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.text()))
}

fn differing_regions(report: &serde_json::Value) -> Vec<u64> {
    let mut out = Vec::new();
    for run in report["ranges"].as_array().expect("ranges") {
        let first = run["first_region"].as_u64().unwrap();
        let n = run["regions"].as_u64().unwrap();
        assert_eq!(run["offset_bytes"].as_u64(), Some(first * REGION), "{run}");
        out.extend(first..first + n);
    }
    out
}

/// `gmdctl events --json` of `gmdd`, once its current state was printed;
/// the compare events it prints next.
fn follow_events(gmdd: &Gmdd) -> (Child, mpsc::Receiver<serde_json::Value>) {
    let mut child = gmdd.events_json();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    for line in lines.by_ref() {
        let e: serde_json::Value = serde_json::from_str(&line.expect("line")).expect("json");
        if e["object"] == "-" {
            break;
        }
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            let Ok(line) = line else { return };
            let e: serde_json::Value = serde_json::from_str(&line).expect("json");
            if e["object"] == "compare" && tx.send(e).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

#[test]
fn compare_finds_exactly_the_regions_changed_behind_gmds_back_and_repair_resends_them() {
    let cluster = Cluster::with_mode("mwc", 5);
    let (alpha, beta) = cluster.start_pair();
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    assert_qemu_io_clean(&qemu_io(
        &alpha.url(DEV),
        &["write -P 0x5a 0 4M", "write -P 0x3c 100M 2M"],
    ));
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);

    // A clean pair compares clean.
    let clean = compare_json(&alpha, &["--rate", "1000"]);
    assert_eq!(clean["state"], "done", "{clean:#}");
    assert_eq!(clean["differing"], 0, "{clean:#}");
    assert_eq!(clean["regions_total"], DEVICE_SIZE / REGION, "{clean:#}");
    assert_eq!(clean["regions_done"], DEVICE_SIZE / REGION, "{clean:#}");

    // Corrupt beta's copy behind gmd's back: regions 3 (written data), 3200
    // and 3201 (one write across their border) and 8000 (never written).
    let data = cluster.path("beta/data10.img");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.write_all_at(b"rot", 3 * REGION + 100).unwrap();
    file.write_all_at(&[0xee; 64], 3201 * REGION - 32).unwrap();
    file.write_all_at(&[1], 8000 * REGION + REGION - 1).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let (mut events, rx) = follow_events(&alpha);
    let found = compare_json(&alpha, &["--rate", "1000"]);
    assert_eq!(found["state"], "done", "{found:#}");
    assert_eq!(
        differing_regions(&found),
        vec![3, 3200, 3201, 8000],
        "{found:#}"
    );
    assert_eq!(found["differing"], 4, "{found:#}");
    assert_eq!(found["out_of_sync_regions"], 4, "{found:#}");
    assert_eq!(found["repaired"], 0, "{found:#}");
    // Events: the compare's start and end, with what it found.
    let compare_events: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a compare event")
        })
        .collect();
    events.kill().ok();
    events.wait().ok();
    assert_eq!(
        compare_events[0]["attrs"]["phase"], "start",
        "{compare_events:?}"
    );
    assert_eq!(
        compare_events[1]["attrs"]["phase"], "end",
        "{compare_events:?}"
    );
    assert_eq!(
        compare_events[1]["attrs"]["differing"], "4",
        "{compare_events:?}"
    );
    // Status shows the result, and the text names the ranges.
    let status = alpha.status_json(DEV);
    assert_eq!(status["compare"]["out_of_sync_regions"], 4, "{status:#}");
    let text = alpha.ctl(&["status", DEV]).ok().stdout;
    assert!(
        text.contains("compare     with beta: done") && text.contains("out_of_sync_regions 4"),
        "{text}"
    );
    let text = alpha.ctl(&["compare", DEV, "--rate", "1000"]).ok().stdout;
    assert!(text.contains("4 differ"), "{text}");
    assert!(text.contains("regions 3200-3201"), "{text}");
    assert!(text.contains("--repair"), "{text}");

    let repaired = compare_json(&alpha, &["--repair", "--rate", "1000"]);
    assert_eq!(repaired["state"], "done", "{repaired:#}");
    assert_eq!(differing_regions(&repaired), vec![3, 3200, 3201, 8000]);
    assert_eq!(repaired["repaired"], 4, "{repaired:#}");
    assert_eq!(repaired["out_of_sync_regions"], 0, "{repaired:#}");
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);

    let again = compare_json(&alpha, &["--rate", "1000"]);
    assert_eq!(again["differing"], 0, "{again:#}");
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(&cluster.path("alpha/data10.img"), &data);
}

#[test]
fn compare_is_refused_on_the_secondary_without_a_peer_and_while_one_runs() {
    let cluster = Cluster::with_mode("mwc", 5);
    let (alpha, beta) = cluster.start_pair();
    let run = beta.ctl(&["compare", DEV]);
    assert_eq!(run.code, 2, "{}", run.text());
    assert!(
        run.stderr.contains("compare runs on the primary")
            && run.stderr.contains("secondary")
            && run.stderr.contains("alpha"),
        "{}",
        run.text()
    );
    let run = alpha.ctl(&["compare", DEV, "--rate", "0"]);
    assert_eq!(run.code, 1, "{}", run.text());
    // --no-wait returns at once; a second compare is refused while the
    // first runs; status follows it to its end.
    let run = alpha
        .ctl(&["compare", DEV, "--no-wait", "--rate", "100"])
        .ok();
    assert!(run.stdout.contains("started"), "{}", run.text());
    let run = alpha.ctl(&["compare", DEV]);
    assert_eq!(run.code, 2, "{}", run.text());
    assert!(run.stderr.contains("is running"), "{}", run.text());
    let running = alpha.status_json(DEV)["compare"].clone();
    assert_eq!(running["state"], "running", "{running:#}");
    wait_for("the compare to end", Duration::from_secs(20), || {
        alpha.status_json(DEV)["compare"]["state"] == "done"
    });
    assert_eq!(alpha.status_json(DEV)["compare"]["differing"], 0);
    beta.ctl(&["stop", DEV]).ok();
    alpha.wait_mirroring(DEV, false);
    let run = alpha.ctl(&["compare", DEV]);
    assert_eq!(run.code, 2, "{}", run.text());
    assert!(
        run.stderr.contains("compare needs a connected pair"),
        "{}",
        run.text()
    );
    let run = alpha.ctl(&["compare", "nosuchdev"]);
    assert_eq!(run.code, 2, "{}", run.text());
}

#[test]
fn a_compare_while_the_application_writes_reports_no_false_differences() {
    compare_under_writes("mwc");
}

/// Async: writes complete before the peer has them (queued cells).
#[test]
fn an_async_compare_while_the_application_writes_reports_no_false_differences() {
    compare_under_writes("async");
}

fn compare_under_writes(mode: &str) {
    let cluster = Cluster::with_mode(mode, 5);
    let (alpha, beta) = cluster.start_pair();
    let stop = Arc::new(AtomicBool::new(false));
    // Two writers, each all over the device (64 writes per round, small
    // and large, a new pattern each round), so that writes land while
    // regions are read on either side.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (url, stop) = (alpha.url(DEV), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let cmds: Vec<String> = (0..64u64)
                        .map(|i| {
                            let offset = (i * 4 + (rounds + 2 * w) % 4) * (1 << 20)
                                + (i % 7) * 4096
                                + w * 65536;
                            let len = if i % 5 == 0 { "256k" } else { "4k" };
                            format!("write -P {} {offset} {len}", (rounds + i + w) % 250 + 1)
                        })
                        .collect();
                    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                    assert_qemu_io_clean(&qemu_io(&url, &refs));
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let started = Instant::now();
    // 256 MiB at 64 MiB/s: about 4 s of writes under way.
    let report = compare_json(&alpha, &["--rate", "64"]);
    stop.store(true, Ordering::Relaxed);
    let rounds: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(rounds >= 4, "the application wrote during the compare");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the rate is bounded"
    );
    assert_eq!(report["state"], "done", "{report:#}");
    assert_eq!(report["differing"], 0, "{report:#}");
    let compared = report["regions_compared"].as_u64().unwrap();
    assert!(
        compared > DEVICE_SIZE / REGION / 2,
        "most regions compared: {report:#}"
    );
    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}
