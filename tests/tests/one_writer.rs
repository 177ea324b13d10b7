//! One writer per pair: the secondary's NBD export refuses application
//! writes in every mode (read-only flag at the handshake, EPERM for a
//! client that writes anyway, nothing reaches its volume), reads work on a
//! sync or mwc secondary and are refused on an async one, the refusal is
//! logged once, and `gmdctl secondary` + `gmdctl primary` move the writer
//! online so that the same holds the other way round.

use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";
/// Promote-failure timeout used by these tests (seconds).
const PROMOTE_S: u32 = 2;
/// What gmd logs, once per role, when an application write is refused.
const REFUSAL: &str = "a write was refused: this copy is secondary";

/// Waits until `gmdd`'s copy holds everything its peer wrote (async: the
/// backlog is drained).
fn settled(gmdd: &Gmdd) {
    wait_for("the backlog to drain", Duration::from_secs(30), || {
        let s = gmdd.status_json(DEV);
        s["link"]["connected"] == true && s["link"]["backlog_bytes"] == 0
    });
}

/// How many times `gmdd` logged the refusal.
fn refusals_logged(gmdd: &Gmdd) -> usize {
    gmdd.log_text().matches(REFUSAL).count()
}

/// Every check of the rule with `writer` primary and `reader` secondary.
/// `writer` wrote `pattern` at 0..1 MiB before; `logged` is how many
/// refusals `reader` logged before (one per role it refused writes in).
fn check_one_writer(
    mode: &str,
    cluster: &Cluster,
    writer: &Gmdd,
    reader: &Gmdd,
    pattern: u8,
    logged: usize,
) {
    let url = reader.url(DEV);
    let reader_file = cluster.path(&format!("{}/data10.img", reader.machine));
    let writer_file = cluster.path(&format!("{}/data10.img", writer.machine));
    let before = std::fs::read(&reader_file).expect("read volume");
    assert!(
        before[..1 << 20].iter().all(|&b| b == pattern),
        "{} does not hold the primary's data",
        reader.machine
    );

    // qemu-io: the export says it is read-only, so qemu-io refuses to open
    // it read-write and no write is ever sent.
    let open_rw = qemu_io(&url, &["write -P 0xee 0 64k"]);
    assert_eq!(open_rw.code, 1, "{}", open_rw.text());
    assert!(
        open_rw.stderr.contains("can't open device")
            && open_rw.stderr.contains("Permission denied"),
        "qemu-io should be refused the read-write open:\n{}",
        open_rw.text()
    );
    // Opened read-only, qemu-io refuses the write itself.
    let open_ro = run(std::process::Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &url,
        "-c",
        "write -P 0xee 0 64k",
    ]));
    assert!(
        open_ro.text().contains("Block node is read-only"),
        "{}",
        open_ro.text()
    );

    // A client that writes anyway gets EPERM from the device, every time;
    // gmdd says why once.
    let local_writes = || {
        let stats: serde_json::Value =
            serde_json::from_str(&reader.stat(&["-l", DEV, "--json"]).ok().stdout).expect("json");
        stats["devices"][0]["local"]["writes"]
            .as_u64()
            .expect("local.writes")
    };
    let writes_before = local_writes();
    let mut raw = RawNbd::connect(&reader.nbd, DEV).expect("NBD handshake");
    assert!(raw.read_only(), "flags {:#x}", raw.flags);
    for offset in [0u64, 1 << 20, 200 << 20] {
        assert_eq!(
            raw.write(offset, &[0xee; 65536]).expect("write reply"),
            NBD_EPERM
        );
    }
    // A flush is harmless and allowed.
    assert_eq!(raw.flush().expect("flush reply"), 0);
    drop(raw);
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        refusals_logged(reader) > logged
    });
    assert_eq!(
        refusals_logged(reader),
        logged + 1,
        "{} logs the refusal once per role:\n{}",
        reader.machine,
        reader.log_text()
    );
    assert_eq!(local_writes(), writes_before, "no write reached the volume");

    // Reads: a sync or mwc secondary serves them; an async one refuses.
    let read = run(std::process::Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &url,
        "-c",
        &format!("read -P {pattern:#x} 0 1M"),
    ]));
    if mode == "async" {
        assert!(
            read.text().contains("read failed: Operation not permitted"),
            "{}",
            read.text()
        );
        let mut raw = RawNbd::connect(&reader.nbd, DEV).expect("NBD handshake");
        assert_eq!(raw.read(0, 4096).expect("read reply"), Err(NBD_EPERM));
    } else {
        assert_qemu_io_clean(&read);
    }

    // Nothing changed on the secondary's volume.
    assert!(
        std::fs::read(&reader_file).expect("read volume") == before,
        "{}'s volume changed",
        reader.machine
    );

    // The primary is unaffected: still mirroring, its data intact, and it
    // writes; the write reaches the secondary.
    assert_eq!(writer.status_json(DEV)["link"]["connected"], true);
    assert_eq!(reader.status_json(DEV)["link"]["connected"], true);
    assert_qemu_io_clean(&qemu_io(
        &writer.url(DEV),
        &[
            &format!("read -P {pattern:#x} 0 1M"),
            "write -P 0x44 8M 64k",
            "read -P 0x44 8M 64k",
        ],
    ));
    settled(writer);
    let w = std::fs::read(&writer_file).expect("read volume");
    assert!(w[..1 << 20].iter().all(|&b| b == pattern));
    assert!(w[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0x44));
    wait_for(
        "the write to reach the secondary",
        Duration::from_secs(10),
        || {
            let r = std::fs::read(&reader_file).expect("read volume");
            r[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0x44)
        },
    );
    let r = std::fs::read(&reader_file).expect("read volume");
    assert!(r[..1 << 20].iter().all(|&b| b == pattern));
}

fn secondary_refuses_writes(mode: &str) {
    let cluster = Cluster::with_mode(mode, PROMOTE_S);
    let (alpha, beta) = cluster.start_pair();
    assert_eq!(alpha.status_json(DEV)["role"], "primary");
    assert_eq!(beta.status_json(DEV)["role"], "secondary");
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x5a 0 1M"]));
    settled(&alpha);
    check_one_writer(mode, &cluster, &alpha, &beta, 0x5a, 0);

    // A client connected to the primary holds its role: demotion is
    // refused until it leaves.
    let client = RawNbd::connect(&alpha.nbd, DEV).expect("NBD handshake");
    assert!(!client.read_only());
    let refused = alpha.ctl(&["secondary", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(
        refused
            .stderr
            .contains("demote refused: 1 NBD client(s) are connected"),
        "{}",
        refused.text()
    );
    drop(client);
    // A client of the secondary connected before the switch keeps the
    // flags of its handshake.
    let mut early = RawNbd::connect(&beta.nbd, DEV).expect("NBD handshake");
    assert!(early.read_only());

    // The writer moves: alpha steps down (flushing), beta steps up.
    wait_for("alpha's client to leave", Duration::from_secs(10), || {
        alpha.status_json(DEV)["clients"] == 0
    });
    let down = alpha.ctl(&["secondary", DEV]).ok();
    assert!(
        down.stdout.contains("secondary on alpha"),
        "{}",
        down.text()
    );
    let up = beta.ctl(&["primary", DEV]).ok();
    assert!(up.stdout.contains("primary on beta"), "{}", up.text());
    assert_eq!(alpha.status_json(DEV)["role"], "secondary");
    assert_eq!(beta.status_json(DEV)["role"], "primary");
    alpha.wait_mirroring(DEV, true);
    beta.wait_mirroring(DEV, true);

    // The early client still has the read-only flag (the flags are sent
    // once, at the handshake): qemu-io would refuse to write through it
    // until it reconnects. gmd does not hold it to those flags: the device
    // is writable now, and a write it sends anyway is done.
    assert!(early.read_only());
    assert_eq!(early.write(2 << 20, &[0x66; 4096]).expect("write reply"), 0);
    drop(early);
    let fresh = RawNbd::connect(&beta.nbd, DEV).expect("NBD handshake");
    assert!(!fresh.read_only(), "a new connection sees the new role");
    drop(fresh);

    assert_qemu_io_clean(&qemu_io(&beta.url(DEV), &["write -P 0xa5 0 1M"]));
    settled(&beta);
    check_one_writer(mode, &cluster, &beta, &alpha, 0xa5, 0);
    // beta refused nothing as primary; its count stays one.
    assert_eq!(refusals_logged(&beta), 1, "{}", beta.log_text());

    alpha.wait_in_sync(DEV);
    beta.wait_in_sync(DEV);
    alpha.ctl(&["stop", DEV]).ok();
    beta.ctl(&["stop", DEV]).ok();
    assert_same_files(
        &cluster.path("alpha/data10.img"),
        &cluster.path("beta/data10.img"),
    );
}

#[test]
fn a_sync_secondary_refuses_writes_and_the_writer_moves() {
    secondary_refuses_writes("sync");
}

#[test]
fn an_mwc_secondary_refuses_writes_and_the_writer_moves() {
    secondary_refuses_writes("mwc");
}

#[test]
fn an_async_secondary_refuses_writes_and_reads_and_the_writer_moves() {
    secondary_refuses_writes("async");
}
