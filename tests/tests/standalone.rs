//! One machine, peer recorded down: lifecycle, data path and state map
//! through real clients (qemu-io, fio, nbdfuse + loop + ext4), across
//! clean restarts and kill -9.

use std::process::Command;
use std::time::Duration;

use gmd_tests::*;

const DEV: &str = "data10gmd";

/// Writes at offsets chosen to hit region boundaries (a region is 32 KiB).
const WRITES: [(u64, u64, u8); 5] = [
    (0, 4096, 0x11),
    (32768 - 512, 1024, 0x22),       // straddles regions 0 and 1
    (5 << 20, 1 << 20, 0x33),        // 32 whole regions
    (100 << 20, 65536 + 4096, 0x44), // three regions
    ((256 << 20) - 512, 512, 0x55),  // the very last sector
];

fn write_commands() -> Vec<String> {
    WRITES
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect()
}

fn read_commands() -> Vec<String> {
    WRITES
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect()
}

fn expected_regions() -> Vec<u64> {
    regions_of(&WRITES.iter().map(|&(o, l, _)| (o, l)).collect::<Vec<_>>())
}

fn stale_regions(gmdd: &Gmdd) -> Vec<u64> {
    let show = gmdd.ctl(&["show-state", DEV]);
    assert_eq!(show.code, 2, "a dirty map exits 2:\n{}", show.text());
    cells_from_show_state(&show.stdout)
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
        .map(|(i, v)| {
            assert_eq!(*v, 0xf, "written regions are stale (0xf)");
            i as u64
        })
        .collect()
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn start_needs_the_peer_recorded_down() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.ctl(&["configure", DEV]).ok();
    let refused = alpha.ctl(&["start", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(
        refused.stderr.contains("gmdctl down data10gmd beta"),
        "{}",
        refused.text()
    );
    // Only AVAILABLE devices are exported.
    let list = run(Command::new("nbdinfo").arg("--list").arg(&alpha.nbd));
    assert!(!list.stdout.contains(DEV), "{}", list.text());
    alpha.ctl(&["down", DEV, "beta"]).ok();
    let started = alpha.ctl(&["start", DEV]).ok();
    assert!(
        started.stdout.contains("exported at nbd://"),
        "{}",
        started.text()
    );
    let list = run(Command::new("nbdinfo").arg("--list").arg(&alpha.nbd)).ok();
    assert!(list.stdout.contains(DEV), "{}", list.text());
    let status = alpha.ctl(&["status", DEV, "--json"]).ok();
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json[0]["state"], "AVAILABLE");
    assert_eq!(json[0]["peers"][0]["down"], true);
    alpha.ctl(&["stop", DEV]).ok();
    let list = run(Command::new("nbdinfo").arg("--list").arg(&alpha.nbd));
    assert!(!list.stdout.contains(DEV), "{}", list.text());
}

/// `PF_MEMALLOC_NOIO` in the flags of `/proc/<pid>/task/<tid>/stat`
/// (include/linux/sched.h), set by `PR_SET_IO_FLUSHER`.
const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;

/// Each thread of process `pid`: (thread id, name, kernel task flags).
fn thread_flags(pid: u32) -> Vec<(String, String, u64)> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list") {
        let tid = entry
            .expect("task entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue; // the thread ended meanwhile
        };
        // "tid (name) state ppid pgrp session tty_nr tpgid flags ..."; the
        // name may hold spaces and parentheses, so count after the last ')'.
        let open = stat.find('(').expect("name");
        let close = stat.rfind(')').expect("name");
        let name = stat[open + 1..close].to_string();
        let flags: u64 = stat[close + 1..]
            .split_whitespace()
            .nth(6)
            .and_then(|f| f.parse().ok())
            .expect("flags field");
        threads.push((tid, name, flags));
    }
    threads
}

/// True when this process holds `CAP_SYS_RESOURCE` (bit 24 of CapEff),
/// which `PR_SET_IO_FLUSHER` needs; gmdd started from here inherits it.
fn holds_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line");
    u64::from_str_radix(eff.trim(), 16).expect("hex capabilities") & (1 << 24) != 0
}

/// gmdd serves block devices, so the kernel may wait on it to write their
/// dirty pages back: none of its threads may start I/O from its own memory
/// allocations (the IO_FLUSHER state), or the machine can deadlock under
/// memory pressure. Where gmdd cannot have that state (no
/// `CAP_SYS_RESOURCE`, as in some containers), it says so and what to do,
/// and serves anyway. The test VM (`tests/vm`, full capabilities) checks
/// the flag on a ublk-serving gmdd as well.
#[test]
fn every_gmdd_thread_is_an_io_flusher() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    // The device thread, its ring's workers, the NBD export and the async
    // runtime's workers all exist once a write went through.
    assert_qemu_io_clean(&qemu_io(&alpha.url(DEV), &["write -P 0x11 0 64k"]));
    let threads = thread_flags(alpha.pid());
    assert!(threads.len() >= 3, "{threads:?}");
    let log = std::fs::read_to_string(&alpha.log).expect("log");
    if holds_cap_sys_resource() {
        for (tid, name, flags) in &threads {
            assert!(
                flags & PF_MEMALLOC_NOIO != 0,
                "gmdd thread {tid} ({name}) is not an IO_FLUSHER (flags {flags:#x}); all: {threads:x?}"
            );
        }
        assert!(!log.contains("IO_FLUSHER"), "gmdd warned:\n{log}");
    } else {
        assert!(
            threads
                .iter()
                .all(|(_, _, flags)| flags & PF_MEMALLOC_NOIO == 0),
            "{threads:x?}"
        );
        assert!(
            log.contains("gmdd is not in the IO_FLUSHER state (it lacks CAP_SYS_RESOURCE"),
            "gmdd did not say why it is not an IO_FLUSHER:\n{log}"
        );
    }
}

#[test]
fn qemu_io_data_and_stale_marks_survive_restart_and_kill9() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let url = alpha.url(DEV);
    assert_qemu_io_clean(&qemu_io(&url, &as_refs(&write_commands())));
    assert_qemu_io_clean(&qemu_io(&url, &as_refs(&read_commands())));
    assert_eq!(stale_regions(&alpha), expected_regions());

    // Clean restart: the device comes back AVAILABLE with data and map.
    let log = alpha.terminate();
    assert!(log.contains("map persisted"), "{log}");
    let alpha = cluster.gmdd("alpha");
    let status = alpha.ctl(&["status", DEV]).ok();
    assert!(status.stdout.contains("AVAILABLE"), "{}", status.text());
    assert_qemu_io_clean(&qemu_io(&url, &as_refs(&read_commands())));
    assert_eq!(stale_regions(&alpha), expected_regions());

    // kill -9 right after a write: the mark was durable before the write completed.
    assert_qemu_io_clean(&qemu_io(&url, &["write -P 0x66 200M 4k"]));
    alpha.kill9();
    let alpha = cluster.gmdd("alpha");
    assert_qemu_io_clean(&qemu_io(&url, &["read -P 0x66 200M 4k"]));
    let mut expected = expected_regions();
    expected.push((200 << 20) / 32768);
    expected.sort();
    assert_eq!(stale_regions(&alpha), expected);

    // The map file read cold (gmdd stopped) agrees.
    alpha.terminate();
    let offline = cluster.gmdctl_offline("alpha", &["show-state", DEV]);
    assert_eq!(offline.code, 2);
    assert!(
        offline.stdout.contains("map read from disk"),
        "{}",
        offline.text()
    );
    let cells = cells_from_show_state(&offline.stdout);
    let stale: Vec<u64> = (0..cells.len() as u64)
        .filter(|&i| cells[i as usize] == 0xf)
        .collect();
    assert_eq!(stale, expected);
}

#[test]
fn fio_randwrite_verifies_through_nbd() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let result = run(Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
        ])
        .args([
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={}", alpha.url(DEV))));
    assert_eq!(result.code, 0, "{}", result.text());
    assert!(result.stdout.contains("err= 0"), "{}", result.stdout);
    assert!(!result.text().contains("verify: bad"), "{}", result.text());
    let stat = alpha.stat(&["-l", DEV, "--json"]).ok();
    let json: serde_json::Value = serde_json::from_str(stat.stdout.trim()).unwrap();
    let counters = &json["devices"][0]["local"];
    assert!(counters["writes"].as_u64().unwrap() >= 16384, "{json}");
    assert!(counters["reads"].as_u64().unwrap() >= 16384, "{json}");
    assert_eq!(counters["errors"], 0);
    // Every region fio touched is stale: 64 MiB = 2048 regions.
    assert_eq!(json["devices"][0]["map"]["stale"], 2048);
}

#[test]
fn ext4_on_nbdfuse_and_loop_mounts_writes_and_checks_clean() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.start_standalone(DEV, "beta");
    let attached = NbdLoop::attach(&alpha.url(DEV), cluster.dir.path());
    let dev = attached.loop_dev.clone();
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev])).ok();
    let mnt = cluster.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&dev).arg(&mnt)).ok();
    let mut expected = Vec::new();
    for i in 0..20u32 {
        let sub = mnt.join(format!("dir{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        let content: Vec<u8> = (0..(i as usize * 7919 + 100))
            .map(|b| (b as u32 * 31 + i) as u8)
            .collect();
        std::fs::write(sub.join(format!("file{i}")), &content).unwrap();
        expected.push((sub.join(format!("file{i}")), content));
    }
    run(&mut Command::new("sync")).ok();
    // In use: stop is refused.
    let refused = alpha.ctl(&["stop", DEV]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(refused.stderr.contains("in use"), "{}", refused.text());
    run(Command::new("umount").arg(&mnt)).ok();
    run(Command::new("mount").arg(&dev).arg(&mnt)).ok();
    for (path, content) in &expected {
        assert_eq!(&std::fs::read(path).unwrap(), content, "{}", path.display());
    }
    run(Command::new("umount").arg(&mnt)).ok();
    let fsck = run(Command::new("e2fsck").args(["-fn", &dev]));
    assert_eq!(fsck.code, 0, "fsck found problems:\n{}", fsck.text());
    attached.detach();
    // Clients gone: stop succeeds.
    for _ in 0..100 {
        if alpha.ctl(&["stop", DEV]).code == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "stop still refused after the clients left:\n{}",
        alpha.ctl(&["status", DEV]).text()
    );
}

#[test]
fn dirty_and_clean_rules() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    alpha.ctl(&["dirty", DEV]).ok();
    let show = alpha.ctl(&["show-state", DEV]);
    assert_eq!(show.code, 2);
    assert!(show.stdout.contains("8192 stale"), "{}", show.stdout);
    assert!(
        show.stdout.contains("map read from disk"),
        "{}",
        show.stdout
    );
    let refused = alpha.ctl(&["clean", DEV]);
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("--force"), "{}", refused.text());
    alpha.start_standalone(DEV, "beta");
    let refused = alpha.ctl(&["clean", DEV, "--force"]);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("stop the device"),
        "{}",
        refused.text()
    );
    alpha.ctl(&["stop", DEV]).ok();
    let cleaned = alpha.ctl(&["clean", DEV, "--force"]).ok();
    assert!(
        cleaned.stderr.contains("8192 region(s)"),
        "{}",
        cleaned.text()
    );
    let show = alpha.ctl(&["show-state", DEV]).ok();
    assert!(show.stdout.contains("(clean)"), "{}", show.stdout);
    // Dump and read back a map file.
    alpha.ctl(&["dirty", DEV]).ok();
    let dump = cluster.path("map.dump");
    let shown = alpha.ctl(&["show-state", DEV, "--dump", dump.to_str().unwrap()]);
    assert_eq!(shown.code, 2);
    let from = alpha.ctl(&["show-state", "--from", dump.to_str().unwrap()]);
    assert_eq!(from.code, 2);
    assert_eq!(
        cells_from_show_state(&from.stdout),
        cells_from_show_state(&shown.stdout)
    );
}

#[test]
fn set_changes_attributes_only_while_defined() {
    let cluster = Cluster::new();
    let alpha = cluster.gmdd("alpha");
    let set = alpha
        .ctl(&["set", DEV, "hwm_kib=256", "sync_rate_kib=64"])
        .ok();
    assert!(set.stdout.contains("hwm_kib=256"), "{}", set.text());
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    assert!(text.contains("hwm_kib = 256"), "{text}");
    let bad = alpha.ctl(&["set", DEV, "mode=fast"]);
    assert_eq!(bad.code, 1, "{}", bad.text());
    assert!(
        bad.stderr.contains("devices.data10gmd.mode"),
        "{}",
        bad.text()
    );
    let unknown = alpha.ctl(&["set", DEV, "colour=blue"]);
    assert_eq!(unknown.code, 1, "{}", unknown.text());
    alpha.ctl(&["configure", DEV]).ok();
    let refused = alpha.ctl(&["set", DEV, "hwm_kib=512"]);
    assert_eq!(refused.code, 2, "{}", refused.text());
    assert!(refused.stderr.contains("DEFINED"), "{}", refused.text());
}
