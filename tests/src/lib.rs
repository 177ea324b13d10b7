//! Harness for end-to-end tests: a cluster directory made like a user would
//! (configuration, key, data files, state maps), `gmdd` processes, and the
//! real clients (`qemu-io`, `fio`, `nbdfuse`, `losetup`, `mkfs.ext4`, …).
//!
//! The gmd binaries must be built (`cargo build --workspace --bins`, which
//! `cargo nextest run --workspace` does).

use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a gmd binary next to the test executable's target directory.
///
/// # Panics
/// When the binary has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The outcome of a command.
#[derive(Debug)]
pub struct Run {
    /// Exit status (−1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Both streams together, for messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed:\n{}", self.text());
        self
    }
}

/// Runs a command to completion.
///
/// # Panics
/// When the program cannot be started (e.g. not installed: see `.ci/run`).
pub fn run(cmd: &mut Command) -> Run {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? see .ci/run)"));
    Run::from(output)
}

/// A free TCP or UDP port on 127.0.0.1 (both protocols free at the time of
/// the call), below the kernel's ephemeral range (32768 and up here): a
/// daemon restarted on its port must not find it taken meanwhile by a
/// socket of another test that asked the kernel for any port (a failover
/// test once failed so, "Address already in use").
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const FIRST: u16 = 20_000;
    const COUNT: u64 = 12_000;
    loop {
        // A random start per call (std's hasher keys are random per process).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = FIRST + (h.finish() % COUNT) as u16;
        let Ok(_tcp) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Size of the test device.
pub const DEVICE_SIZE: u64 = 256 << 20;

/// A cluster directory as a user sets it up from `examples/loopback.toml`.
pub struct Cluster {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The configuration file.
    pub config: PathBuf,
    /// NBD port per machine: alpha, beta.
    pub nbd_ports: [u16; 2],
}

/// The example configuration shipped with gmd.
pub fn example_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loopback.toml");
    std::fs::read_to_string(path).expect("examples/loopback.toml")
}

impl Cluster {
    /// The example cluster with fresh ports: key generated, data files
    /// truncated to size (zeroes) and state maps initialised on both
    /// machines as new zeroed volumes (the pair starts without a copy).
    pub fn new() -> Cluster {
        let cluster = Cluster::with_config(|text| text);
        cluster.init_zeroed();
        cluster
    }

    /// `gmdctl init-state data10gmd --zeroed` on both machines (offline).
    pub fn init_zeroed(&self) {
        for machine in ["alpha", "beta"] {
            self.gmdctl_offline(machine, &["init-state", "data10gmd", "--zeroed"])
                .ok();
        }
    }

    /// The example cluster with alpha's metrics endpoint on 127.0.0.1:`port`.
    pub fn with_metrics_on(port: u16) -> Cluster {
        Cluster::with_config(|text| {
            text.replacen(
                "nbd_listen = \"127.0.0.1:",
                &format!("metrics = \"127.0.0.1:{port}\"\nnbd_listen = \"127.0.0.1:"),
                1,
            )
        })
    }

    /// The example cluster with `edit` applied to the configuration text;
    /// key and data files created, state maps not.
    pub fn with_config(edit: impl FnOnce(String) -> String) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nbd_ports = [free_port(), free_port()];
        let text = example_config()
            .replace("127.0.0.1:10809", &format!("127.0.0.1:{}", nbd_ports[0]))
            .replace("127.0.0.1:10810", &format!("127.0.0.1:{}", nbd_ports[1]))
            .replace("127.0.0.1:6755", &format!("127.0.0.1:{}", free_port()))
            .replace("127.0.0.1:6756", &format!("127.0.0.1:{}", free_port()));
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, edit(text)).expect("write config");
        let cluster = Cluster {
            dir,
            config,
            nbd_ports,
        };
        run(Command::new(bin("gmdctl"))
            .arg("genkey")
            .arg(cluster.path("cluster.key")))
        .ok();
        for machine in ["alpha", "beta"] {
            std::fs::create_dir_all(cluster.path(machine)).expect("mkdir");
            let data = std::fs::File::create(cluster.path(&format!("{machine}/data10.img")))
                .expect("create data");
            data.set_len(DEVICE_SIZE).expect("truncate");
        }
        cluster
    }

    /// A path inside the cluster directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Waits until both copies of the example device `data10gmd` are in
    /// sync, stops both, and checks their backing files are identical.
    #[track_caller]
    pub fn stop_in_sync_and_compare(&self, alpha: &Gmdd, beta: &Gmdd) {
        let dev = "data10gmd";
        alpha.wait_in_sync(dev);
        beta.wait_in_sync(dev);
        alpha.ctl(&["stop", dev]).ok();
        beta.ctl(&["stop", dev]).ok();
        assert_same_files(
            &self.path("alpha/data10.img"),
            &self.path("beta/data10.img"),
        );
    }

    /// Control socket of `machine`'s gmdd.
    pub fn socket(&self, machine: &str) -> PathBuf {
        self.path(&format!("{machine}.sock"))
    }

    /// Runs gmdctl for `machine` without a daemon (offline commands).
    pub fn gmdctl_offline(&self, machine: &str, args: &[&str]) -> Run {
        run(Command::new(bin("gmdctl"))
            .arg("--config")
            .arg(&self.config)
            .arg("--machine")
            .arg(machine)
            .arg("--socket")
            .arg(self.socket(machine))
            .args(args))
    }

    /// Starts gmdd for `machine` and waits until it answers.
    pub fn gmdd(&self, machine: &str) -> Gmdd {
        self.spawn_gmdd(machine, &self.config, &[])
    }

    /// Starts gmdd for `machine` with another configuration file (e.g. one
    /// that differs from the other machines'), and waits until it answers.
    pub fn gmdd_with_config(&self, machine: &str, config: &Path) -> Gmdd {
        self.spawn_gmdd(machine, config, &[])
    }

    /// Starts gmdd for `machine` with extra environment variables.
    pub fn gmdd_env(&self, machine: &str, env: &[(&str, &str)]) -> Gmdd {
        self.spawn_gmdd(machine, &self.config, env)
    }

    fn spawn_gmdd(&self, machine: &str, config: &Path, env: &[(&str, &str)]) -> Gmdd {
        let log = self.path(&format!("{machine}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = Command::new(bin("gmdd"));
        child
            .arg("--config")
            .arg(config)
            .arg("--machine")
            .arg(machine)
            .arg("--socket")
            .arg(self.socket(machine))
            .env("GMD_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // A test killed by its timeout never runs Drop; make the kernel
        // kill the daemon when the test thread that started it ends.
        // SAFETY: prctl is async-signal-safe and touches no memory.
        unsafe {
            child.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = child.spawn().expect("spawn gmdd");
        let port = if machine == "alpha" {
            self.nbd_ports[0]
        } else {
            self.nbd_ports[1]
        };
        let gmdd = Gmdd {
            child: Some(child),
            socket: self.socket(machine),
            config: config.to_owned(),
            machine: machine.to_owned(),
            log,
            nbd: format!("nbd://127.0.0.1:{port}"),
        };
        gmdd.wait_ready();
        gmdd
    }
}

impl Drop for Cluster {
    /// With `GMD_KEEP_FAILED` set, a failed test leaves its cluster
    /// directory (configuration, logs, data files, maps) for a look.
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("GMD_KEEP_FAILED").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("cluster directory kept: {}", dir.keep().display());
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// A running gmdd.
pub struct Gmdd {
    child: Option<Child>,
    /// Its control socket.
    pub socket: PathBuf,
    config: PathBuf,
    /// Its machine.
    pub machine: String,
    /// Its log file.
    pub log: PathBuf,
    /// `nbd://127.0.0.1:PORT` of its exports.
    pub nbd: String,
}

impl Gmdd {
    /// Waits until the daemon answers a command: it serves its control
    /// socket only once it has restored its devices (the socket accepts
    /// connections before that).
    fn wait_ready(&self) {
        use std::io::{BufRead, Write};
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.socket) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                if stream
                    .write_all(b"{\"version\":1,\"cmd\":\"hello\"}\n")
                    .is_ok()
                {
                    let mut line = String::new();
                    let mut reader = std::io::BufReader::new(stream);
                    if reader.read_line(&mut line).is_ok() && line.contains("\"version\"") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gmdd {} did not start:\n{}", self.machine, self.log_text());
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs gmdctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Run {
        run(Command::new(bin("gmdctl"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .arg("--machine")
            .arg(&self.machine)
            .args(args))
    }

    /// Runs gmdstat against this daemon.
    pub fn stat(&self, args: &[&str]) -> Run {
        run(Command::new(bin("gmdstat"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args))
    }

    /// URL of an export.
    pub fn url(&self, device: &str) -> String {
        format!("{}/{device}", self.nbd)
    }

    /// Configures and starts `device` with every remote peer recorded as
    /// down, and makes this side primary.
    pub fn start_standalone(&self, device: &str, peer: &str) {
        self.ctl(&["configure", device]).ok();
        self.ctl(&["down", device, peer]).ok();
        self.ctl(&["start", device]).ok();
        self.ctl(&["primary", device]).ok();
    }

    /// Sends SIGTERM and waits for a clean exit.
    ///
    /// # Panics
    /// If gmdd does not exit 0 within 30 s.
    pub fn terminate(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "gmdd exited with {status}:\n{}",
                    self.log_text()
                );
                return self.log_text();
            }
            assert!(
                Instant::now() < deadline,
                "gmdd did not stop:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills gmdd with SIGKILL, as a crash would.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Gmdd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses `gmdctl show-state` output into the list of cell values.
///
/// # Panics
/// If the output is not a state map rendering.
pub fn cells_from_show_state(text: &str) -> Vec<u8> {
    let start = text.find("Cell      Value").expect("a cell table");
    let count = gmd_core::units::region_count(DEVICE_SIZE);
    gmd_core::statemap::dump::parse_rendered(&text[start..], count).expect("cell table parses")
}

/// Regions touched by byte ranges, as a sorted list.
pub fn regions_of(ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| gmd_core::units::regions_touched(o, l))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Runs qemu-io commands against an NBD URL.
pub fn qemu_io(url: &str, commands: &[&str]) -> Run {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", url]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(&mut cmd)
}

/// Asserts qemu-io ran every command without a pattern mismatch or an error.
#[track_caller]
pub fn assert_qemu_io_clean(result: &Run) {
    let text = result.text();
    assert_eq!(result.code, 0, "qemu-io failed:\n{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
}

/// Mirroring modes, as the configuration spells them.
pub const MODES: [&str; 3] = ["sync", "mwc", "async"];

impl Cluster {
    /// The example cluster in `mode` (async: alpha primary, beta secondary),
    /// with a promote-failure timeout of `promote_s` seconds; state maps
    /// initialised on both machines.
    pub fn with_mode(mode: &str, promote_s: u32) -> Cluster {
        let cluster = Cluster::with_config(|text| {
            let mut text = text
                .replace("mode = \"mwc\"", &format!("mode = \"{mode}\""))
                .replace(
                    "promote_failure_timeout = 5",
                    &format!("promote_failure_timeout = {promote_s}"),
                );
            if mode == "async" {
                text = text
                    .replacen(
                        "state_map = \"alpha/data10.sm\"",
                        "state_map = \"alpha/data10.sm\"\nrole = \"primary\"",
                        1,
                    )
                    .replacen(
                        "state_map = \"beta/data10.sm\"",
                        "state_map = \"beta/data10.sm\"\nrole = \"secondary\"",
                        1,
                    );
            }
            text
        });
        cluster.init_zeroed();
        cluster
    }

    /// GeoMessage UDP ports of alpha and beta.
    pub fn geomessage_ports(&self) -> Vec<u16> {
        let text = std::fs::read_to_string(&self.config).expect("config");
        text.lines()
            .filter(|l| l.contains("interfaces = { geonet1"))
            .filter_map(|l| l.rsplit(':').next())
            .filter_map(|p| p.trim_end_matches([' ', '}', '"']).parse().ok())
            .collect()
    }

    /// Starts gmdd on both machines and the device on both, alpha first
    /// (with beta recorded down), then waits until they mirror.
    pub fn start_pair(&self) -> (Gmdd, Gmdd) {
        let alpha = self.gmdd("alpha");
        let beta = self.gmdd("beta");
        alpha.start_standalone("data10gmd", "beta");
        beta.ctl(&["configure", "data10gmd"]).ok();
        beta.ctl(&["start", "data10gmd"]).ok();
        alpha.wait_mirroring("data10gmd", true);
        beta.wait_mirroring("data10gmd", true);
        (alpha, beta)
    }
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

impl Gmdd {
    /// `gmdctl events --json` against this daemon, its standard output piped.
    pub fn events_json(&self) -> Child {
        Command::new(bin("gmdctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["events", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gmdctl events")
    }

    /// `gmdctl status DEV --json` of this daemon.
    pub fn status_json(&self, device: &str) -> serde_json::Value {
        let run = self.ctl(&["status", device, "--json"]).ok();
        let mut all: serde_json::Value = serde_json::from_str(&run.stdout).expect("status json");
        all[0].take()
    }

    /// `gmdctl netstat --json` of this daemon (one report).
    pub fn netstat_json(&self) -> serde_json::Value {
        let run = self.ctl(&["netstat", "--json", "-c", "1"]).ok();
        serde_json::from_str(run.stdout.lines().next().unwrap_or("")).expect("netstat json")
    }

    /// Waits until the device mirrors (or stops mirroring) with its peer.
    pub fn wait_mirroring(&self, device: &str, mirroring: bool) {
        wait_for(
            &format!("{} {} mirroring = {mirroring}", self.machine, device),
            Duration::from_secs(60),
            || self.status_json(device)["link"]["connected"] == mirroring,
        );
    }

    /// Waits until no resync runs and no cell is stale or inconsistent
    /// (hot regions aside).
    pub fn wait_in_sync(&self, device: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.status_json(device);
            if s["link"]["connected"] == true
                && s["link"]["resync_remaining"] == 0
                && s["map"]["stale"] == 0
                && s["map"]["inconsistent"] == 0
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} {device} not in sync after 120 s:\n{s:#}\n{}",
                    self.machine,
                    self.log_text()
                        .lines()
                        .filter(|l| l.contains("WARN")
                            || l.contains("mirroring")
                            || l.contains("resync"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// PID of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// A network cut between the two machines: an nftables rule that drops
/// GeoMessage datagrams to either machine's port. Removed when dropped.
pub struct Cut {
    table: String,
}

impl Cut {
    /// Cuts GeoMessage traffic to the given UDP ports.
    ///
    /// # Panics
    /// When nftables cannot be used (root and the `nftables` package are needed).
    pub fn new(ports: &[u16]) -> Cut {
        Cut::with_rule(ports, "drop")
    }

    /// Drops `per_mille` of the GeoMessage datagrams to the given UDP
    /// ports, at random (a lossy link rather than a cut).
    ///
    /// # Panics
    /// As [`Cut::new`].
    pub fn lossy(ports: &[u16], per_mille: u32) -> Cut {
        Cut::with_rule(ports, &format!("numgen random mod 1000 < {per_mille} drop"))
    }

    fn with_rule(ports: &[u16], rule: &str) -> Cut {
        let table = format!(
            "gmdcut{}{}",
            std::process::id(),
            ports.first().copied().unwrap_or(0)
        );
        let set: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0;\n    udp dport {{ {} }} {rule}\n  }}\n}}\n",
            set.join(", ")
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (package nftables)");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())
            .expect("write");
        drop(child.stdin.take());
        assert!(
            child.wait().expect("nft").success(),
            "nft refused:\n{script}"
        );
        Cut { table }
    }

    /// Heals the cut.
    pub fn heal(self) {}
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// SHA-256-free comparison of two files: equal bytes.
#[track_caller]
pub fn assert_same_files(a: &Path, b: &Path) {
    let x = std::fs::read(a).expect("read");
    let y = std::fs::read(b).expect("read");
    assert_eq!(x.len(), y.len(), "sizes differ");
    if x != y {
        let first = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(0);
        let differing = x
            .chunks(32768)
            .zip(y.chunks(32768))
            .filter(|(p, q)| p != q)
            .count();
        panic!(
            "{} and {} differ: first at byte {first}, {differing} region(s) differ",
            a.display(),
            b.display()
        );
    }
}

/// An NBD export seen as a block device without the kernel NBD client:
/// `nbdfuse` shows it as a file, `losetup` makes that file a loop device.
pub struct NbdLoop {
    fuse_dir: PathBuf,
    /// The loop device, e.g. `/dev/loop3`.
    pub loop_dev: String,
    nbdfuse: Option<Child>,
}

impl NbdLoop {
    /// Attaches the export at `url`, using `dir/fuse` as the mount point.
    pub fn attach(url: &str, dir: &Path) -> NbdLoop {
        let fuse_dir = dir.join("fuse");
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(url)
            .spawn()
            .expect("nbdfuse (package nbdfuse / libnbd-bin)");
        let file = fuse_dir.join("nbd");
        wait_for("nbdfuse", Duration::from_secs(10), || file.exists());
        let mut attached = NbdLoop {
            fuse_dir,
            loop_dev: String::new(),
            nbdfuse: Some(nbdfuse),
        };
        attached.loop_dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&file))
            .ok()
            .stdout
            .trim()
            .to_owned();
        attached
    }

    /// Detaches the loop device and unmounts the FUSE file, checking both.
    pub fn detach(mut self) {
        run(Command::new("losetup").args(["-d", &self.loop_dev])).ok();
        run(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir)).ok();
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for NbdLoop {
    fn drop(&mut self) {
        // After a failed assertion: leave no loop device or FUSE mount behind.
        if let Some(mut child) = self.nbdfuse.take() {
            if !self.loop_dev.is_empty() {
                let _ = Command::new("losetup")
                    .args(["-d", &self.loop_dev])
                    .status();
            }
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Files written into a mounted filesystem: each path relative to the mount
/// point, with the bytes it must hold.
pub type Files = Vec<(PathBuf, Vec<u8>)>;

/// Writes `count` files into `root/<tag>/` and fsyncs each (content depends
/// on the tag and the index; sizes from a few bytes to ~600 KiB, spread
/// over many regions), then syncs the filesystem; returns what each holds.
pub fn write_files(root: &Path, tag: &str, count: u32) -> Files {
    use std::io::Write;
    let sub = root.join(tag);
    std::fs::create_dir_all(&sub).expect("mkdir");
    let seed = tag
        .bytes()
        .fold(0x9e37_79b9_u32, |h, b| h.rotate_left(5) ^ u32::from(b));
    let files = (0..count)
        .map(|i| {
            let len = (i as usize * 104_729 + 13) % (600 << 10);
            let content: Vec<u8> = (0..len)
                .map(|b| {
                    (b as u32)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i ^ seed)
                        .rotate_right(7) as u8
                })
                .collect();
            let rel = PathBuf::from(tag).join(format!("file{i}"));
            let mut file = std::fs::File::create(root.join(&rel)).expect("create");
            file.write_all(&content).expect("write");
            file.sync_all().expect("fsync");
            (rel, content)
        })
        .collect();
    sync_fs();
    files
}

/// The files of `files` that are missing under `root` or hold other bytes.
pub fn wrong_files(root: &Path, files: &Files) -> Vec<String> {
    files
        .iter()
        .filter(|(rel, content)| std::fs::read(root.join(rel)).ok().as_ref() != Some(content))
        .map(|(rel, _)| rel.display().to_string())
        .collect()
}

/// `sync`: every filesystem's dirty data and metadata to its device.
pub fn sync_fs() {
    run(&mut Command::new("sync")).ok();
}

/// An ext4 filesystem on a device's NBD export, as an application host sees
/// it: the export attached ([`NbdLoop`]) and mounted at `<dir>/mnt`.
/// Dropping it unmounts and detaches whatever is left.
pub struct Ext4 {
    attached: Option<NbdLoop>,
    /// The mount point.
    pub mnt: PathBuf,
    mounted: bool,
}

impl Ext4 {
    /// Attaches the export at `url`, working in `dir` (one per attachment).
    pub fn attach(url: &str, dir: &Path) -> Ext4 {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        Ext4 {
            attached: Some(NbdLoop::attach(url, dir)),
            mnt,
            mounted: false,
        }
    }

    /// The loop device.
    pub fn dev(&self) -> String {
        self.attached.as_ref().expect("attached").loop_dev.clone()
    }

    /// `mkfs.ext4` on the device, initialising inode tables and journal
    /// now (no background zeroing after mount) and discarding nothing.
    pub fn mkfs(&self) {
        run(Command::new("mkfs.ext4").args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            &self.dev(),
        ]))
        .ok();
    }

    /// Mounts it read-write (a filesystem left mounted elsewhere replays its
    /// journal here).
    pub fn mount(&mut self) {
        run(Command::new("mount").arg(self.dev()).arg(&self.mnt)).ok();
        self.mounted = true;
    }

    /// Unmounts it.
    pub fn umount(&mut self) {
        run(Command::new("umount").arg(&self.mnt)).ok();
        self.mounted = false;
    }

    /// Whether the filesystem's journal must be replayed before it is used
    /// (it was not unmounted cleanly): `needs_recovery` in `dumpe2fs -h`.
    pub fn needs_recovery(&self) -> bool {
        let header = run(Command::new("dumpe2fs").args(["-h", &self.dev()])).ok();
        header
            .stdout
            .lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"))
    }

    /// `e2fsck -fn` on the (unmounted) device.
    pub fn fsck(&self) -> Run {
        assert!(!self.mounted, "e2fsck runs on an unmounted filesystem");
        run(Command::new("e2fsck").args(["-fn", &self.dev()]))
    }

    /// Unmounts (if mounted) and detaches, checking each step.
    pub fn detach(mut self) {
        if self.mounted {
            self.umount();
        }
        if let Some(attached) = self.attached.take() {
            attached.detach();
        }
    }

    /// The application host lost its server (gmdd killed): the mount is
    /// dropped lazily and the attachment torn down, whatever fails.
    pub fn abandon(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            self.mounted = false;
        }
        // NbdLoop's Drop detaches the loop device and the FUSE mount.
        drop(self.attached.take());
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Regions a state map on disk asks the resync to cover (its non-zero
/// cells), read while no gmdd holds it.
pub fn marked_regions(map: &Path) -> u64 {
    let (_, cells) =
        gmd_core::statemap::file::MapFile::open(map, Some(DEVICE_SIZE)).expect("state map");
    cells.count_nonzero()
}

impl Gmdd {
    /// Waits until no NBD client is connected to `device` here.
    pub fn wait_no_clients(&self, device: &str) {
        wait_for(
            &format!("{}: {device}'s NBD clients to leave", self.machine),
            Duration::from_secs(20),
            || self.status_json(device)["clients"] == 0,
        );
    }

    /// Asserts `device`'s state map marks nothing (`gmdctl show-state`
    /// exits 0 only for a clean map).
    #[track_caller]
    pub fn assert_map_clean(&self, device: &str) {
        let shown = self.ctl(&["show-state", device]);
        assert_eq!(
            shown.code,
            0,
            "{}'s map of {device} is not clean:\n{}",
            self.machine,
            shown.text()
        );
    }

    /// `gmdstat -l DEVICE --json`: the device's entry in the report.
    pub fn stat_json(&self, device: &str) -> serde_json::Value {
        let run = self.stat(&["-l", device, "--json"]).ok();
        let mut report: serde_json::Value =
            serde_json::from_str(run.stdout.lines().last().expect("a report"))
                .expect("gmdstat json");
        report["devices"][0].take()
    }
}

/// Looks at a copy's backing file as a disaster-recovery site would:
/// attached read-only (`losetup -r`), checked with `e2fsck -fn`, mounted
/// read-only at `mnt` and handed to `check`, which lists what is wrong.
/// Returns every problem found (empty: the copy is good).
pub fn inspect_copy(
    file: &Path,
    mnt: &Path,
    check: impl FnOnce(&Path) -> Vec<String>,
) -> Vec<String> {
    let dev = run(Command::new("losetup")
        .args(["-r", "-f", "--show"])
        .arg(file))
    .ok()
    .stdout
    .trim()
    .to_owned();
    let mut problems = Vec::new();
    let fsck = run(Command::new("e2fsck").args(["-fn", &dev]));
    if fsck.code != 0 {
        problems.push(format!("e2fsck -fn {}:\n{}", file.display(), fsck.text()));
    }
    std::fs::create_dir_all(mnt).expect("mkdir");
    let mounted = run(Command::new("mount").args(["-o", "ro"]).arg(&dev).arg(mnt));
    if mounted.code == 0 {
        problems.extend(check(mnt));
        run(Command::new("umount").arg(mnt)).ok();
    } else {
        problems.push(format!("mount {}:\n{}", file.display(), mounted.text()));
    }
    run(Command::new("losetup").args(["-d", &dev])).ok();
    problems
}

/// A minimal NBD client written from the protocol document (fixed
/// newstyle, `NBD_OPT_GO`, simple replies), for what well-behaved clients
/// refuse to do: send a write to an export whose flags say it is
/// read-only, so that the server's own answer can be checked. It also
/// writes without flushing, which qemu-io does not (it flushes when it
/// closes the image).
pub struct RawNbd {
    stream: std::net::TcpStream,
    /// Transmission flags the server sent at the handshake.
    pub flags: u16,
    /// Export size the server sent.
    pub size_bytes: u64,
    cookie: u64,
}

/// NBD transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;

impl RawNbd {
    /// Connects to `url` (`nbd://HOST:PORT`) and opens `export`.
    ///
    /// # Errors
    /// Connection or protocol errors, or the server refusing the export.
    pub fn connect(url: &str, export: &str) -> std::io::Result<RawNbd> {
        use std::io::{Error, Read, Write};
        let addr = url.trim_start_matches("nbd://").trim_end_matches('/');
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(Error::other("not a newstyle NBD server"));
        }
        // Fixed newstyle, no zeroes.
        stream.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        // One information request: NBD_INFO_BLOCK_SIZE (this client sends
        // aligned requests only, which gmd asks clients to promise).
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        stream.write_all(&opt)?;
        let (mut flags, mut size_bytes) = (None, 0);
        loop {
            let mut head = [0u8; 20];
            stream.read_exact(&mut head)?;
            let reply = u32::from_be_bytes(head[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(head[16..20].try_into().expect("4")) as usize;
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body)?;
            match reply {
                1 => break, // NBD_REP_ACK
                3 if body.len() >= 12 && body[..2] == [0, 0] => {
                    // NBD_REP_INFO, NBD_INFO_EXPORT: size and flags.
                    size_bytes = u64::from_be_bytes(body[2..10].try_into().expect("8"));
                    flags = Some(u16::from_be_bytes(body[10..12].try_into().expect("2")));
                }
                3 => {}
                e if e & (1 << 31) != 0 => {
                    return Err(Error::other(format!(
                        "export {export} refused: reply {e:#x} {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                other => return Err(Error::other(format!("unexpected option reply {other}"))),
            }
        }
        Ok(RawNbd {
            stream,
            flags: flags.ok_or_else(|| Error::other("no NBD_INFO_EXPORT"))?,
            size_bytes,
            cookie: 0,
        })
    }

    /// Whether the server said the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req)
    }

    /// Reads the simple reply to the last request: its error (0 = success).
    fn reply(&mut self) -> std::io::Result<u32> {
        use std::io::Read;
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head)?;
        if head[..4] != 0x6744_6698u32.to_be_bytes() {
            return Err(std::io::Error::other("not a simple reply"));
        }
        if u64::from_be_bytes(head[8..16].try_into().expect("8")) != self.cookie {
            return Err(std::io::Error::other("reply to another request"));
        }
        Ok(u32::from_be_bytes(head[4..8].try_into().expect("4")))
    }

    /// Writes `data` at `offset` without flushing; the NBD error (0 = done).
    ///
    /// # Errors
    /// The connection failed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.request(1, offset, data.len() as u32, data)?;
        self.reply()
    }

    /// Reads `len` bytes at `offset`: the data, or the NBD error.
    ///
    /// # Errors
    /// The connection failed.
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
        use std::io::Read;
        self.request(0, offset, len, &[])?;
        let error = self.reply()?;
        if error != 0 {
            return Ok(Err(error));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(Ok(data))
    }

    /// Flushes; the NBD error (0 = done).
    ///
    /// # Errors
    /// The connection failed.
    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.request(3, 0, 0, &[])?;
        self.reply()
    }
}

impl Drop for RawNbd {
    fn drop(&mut self) {
        // NBD_CMD_DISC, then close.
        let _ = self.request(2, 0, 0, &[]);
    }
}

/// A disk with a volatile write cache, for power cuts.
///
/// `file` plays the platters. `nbdkit` serves it through its cache filter
/// in writeback mode (`nbdkit-cache-filter(1)`): a write stays in nbdkit's
/// own cache (a temporary file in `dir`, unlinked) until the client
/// flushes, then goes to `file` and the file plugin syncs it. `nbdfuse`
/// shows the export as a file and `losetup --direct-io=on` makes that a
/// block device, so O_DIRECT writes and fdatasync on the device go
/// through to nbdkit unchanged (fdatasync → loop flush → FUSE fsync →
/// NBD_CMD_FLUSH). [`VolatileDisk::cut`] is a power cut: nbdkit is killed
/// with SIGKILL, and every write not flushed is lost with its cache.
/// [`VolatileDisk::restart`] powers the disk up again on the same file.
///
/// `link` is a symbolic link kept pointing at the current loop device:
/// name it in gmdd's configuration (`data` or `state_map`).
///
/// Dropping the disk kills nbdkit and removes the loop device and the FUSE
/// mount (lazily if something still holds them), also after a failed test.
pub struct VolatileDisk {
    file: PathBuf,
    dir: PathBuf,
    /// The symbolic link to the current loop device.
    pub link: PathBuf,
    /// The loop device now, e.g. `/dev/loop3` (empty while cut).
    pub loop_dev: String,
    nbdkit: Option<Child>,
    nbdfuse: Option<Child>,
    powered: u32,
}

impl VolatileDisk {
    /// Powers up a disk on `file` (which must exist with its final size),
    /// working in `dir` (created), with `link` pointing at its loop device.
    ///
    /// # Panics
    /// When nbdkit, nbdfuse or losetup fail (root, `/dev/fuse` and the
    /// packages `nbdkit`, `libnbd-bin`/`nbdfuse`, `fuse3` are needed).
    pub fn new(file: &Path, dir: &Path, link: &Path) -> VolatileDisk {
        std::fs::create_dir_all(dir).expect("disk dir");
        let mut disk = VolatileDisk {
            file: file.to_owned(),
            dir: dir.to_owned(),
            link: link.to_owned(),
            loop_dev: String::new(),
            nbdkit: None,
            nbdfuse: None,
            powered: 0,
        };
        disk.restart();
        disk
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbdkit.sock")
    }

    fn fuse_dir(&self) -> PathBuf {
        self.dir.join("fuse")
    }

    /// Powers the disk up (again) on the same file: a new nbdkit with an
    /// empty cache, a new FUSE file and loop device; `link` follows.
    ///
    /// # Panics
    /// If the disk is running, or a tool fails.
    pub fn restart(&mut self) {
        assert!(self.nbdkit.is_none(), "the disk is running");
        self.powered += 1;
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let mut nbdkit = Command::new("nbdkit");
        nbdkit
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(["--filter=cache", "file"])
            .arg(&self.file)
            .arg("cache=writeback")
            // The cache's temporary file lives here, not in /var/tmp.
            .env("TMPDIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join(format!("nbdkit{}.log", self.powered)))
                    .expect("nbdkit log"),
            );
        self.nbdkit = Some(nbdkit.spawn().expect("nbdkit (package nbdkit)"));
        wait_for("nbdkit's socket", Duration::from_secs(10), || {
            socket.exists()
        });
        let fuse_dir = self.fuse_dir();
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        self.nbdfuse = Some(
            Command::new("nbdfuse")
                .arg(fuse_dir.join("nbd"))
                .arg("--unix")
                .arg(&socket)
                .stdin(Stdio::null())
                .spawn()
                .expect("nbdfuse (package nbdfuse / libnbd-bin)"),
        );
        let file = fuse_dir.join("nbd");
        wait_for("nbdfuse", Duration::from_secs(10), || file.exists());
        self.loop_dev = run(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&file))
        .ok()
        .stdout
        .trim()
        .to_owned();
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            self.loop_dev.trim_start_matches("/dev/")
        ))
        .unwrap_or_default();
        assert_eq!(
            dio.trim(),
            "1",
            "{} does not do direct I/O on its FUSE file: writes would wait in the page cache",
            self.loop_dev
        );
        // Point the link at the new device (rename replaces atomically).
        let tmp = self.link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.loop_dev, &tmp).expect("symlink");
        std::fs::rename(&tmp, &self.link).expect("rename symlink");
    }

    /// Power cut: nbdkit is killed with SIGKILL, losing every write that
    /// was not flushed, then the loop device and FUSE mount are removed.
    /// To cut a machine, kill its gmdd in the same instant: see
    /// [`power_cut`].
    pub fn cut(&mut self) {
        self.kill_nbdkit();
        self.teardown();
    }

    fn kill_nbdkit(&mut self) {
        if let Some(mut nbdkit) = self.nbdkit.take() {
            let _ = nbdkit.kill();
            let _ = nbdkit.wait();
        }
    }

    /// Sends SIGKILL to nbdkit without waiting (see [`power_cut`]).
    fn signal_nbdkit(&self) {
        if let Some(nbdkit) = &self.nbdkit {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(nbdkit.id() as i32, libc::SIGKILL);
            }
        }
    }

    fn teardown(&mut self) {
        if !self.loop_dev.is_empty() {
            let _ = Command::new("losetup")
                .args(["-d", &self.loop_dev])
                .stderr(Stdio::null())
                .status();
            self.loop_dev.clear();
        }
        let fuse_dir = self.fuse_dir();
        let unmounted = Command::new("fusermount3")
            .arg("-u")
            .arg(&fuse_dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&fuse_dir)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut nbdfuse) = self.nbdfuse.take() {
            let _ = nbdfuse.kill();
            let _ = nbdfuse.wait();
        }
    }

    /// Flushes the disk's cache to the file: fdatasync on the loop device.
    ///
    /// # Panics
    /// If the disk is cut or the flush fails.
    pub fn flush(&self) {
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.loop_dev)
            .expect("open the loop device");
        dev.sync_data().expect("fdatasync through the loop device");
    }

    /// Flushes, then stops nbdkit and removes the loop device: the file
    /// holds everything written.
    pub fn shut_down(mut self) {
        self.flush();
        self.cut();
    }
}

impl Drop for VolatileDisk {
    fn drop(&mut self) {
        self.kill_nbdkit();
        self.teardown();
    }
}

/// A power cut of a machine: its gmdd and its disks' nbdkit get SIGKILL in
/// the same instant (gmdd first, so it never sees a disk fail; what it had
/// in flight lands in the cache that dies with nbdkit), then the disks'
/// loop devices and FUSE mounts are removed.
pub fn power_cut(gmdd: Gmdd, disks: &mut [&mut VolatileDisk]) {
    // SAFETY: kill(2) on a child's pid.
    unsafe {
        libc::kill(gmdd.pid() as i32, libc::SIGKILL);
    }
    for disk in disks.iter() {
        disk.signal_nbdkit();
    }
    gmdd.kill9();
    for disk in disks.iter_mut() {
        disk.cut();
    }
}

/// Writes `data` at `offset` of `path` with O_DIRECT (no page cache), and
/// fdatasyncs afterwards when `sync`.
///
/// # Panics
/// On any I/O error, or when `offset` and `data` are not 4 KiB aligned.
pub fn write_direct(path: &Path, offset: u64, data: &[u8], sync: bool) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT");
    let buf = AlignedBuf::from(data);
    file.write_all_at(buf.as_slice(), offset)
        .expect("O_DIRECT write");
    if sync {
        file.sync_data().expect("fdatasync");
    }
}

/// Reads `len` bytes at `offset` of `path` with O_DIRECT.
///
/// # Panics
/// On any I/O error, or when `offset` and `len` are not 4 KiB aligned.
pub fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::from(&vec![0u8; len][..]);
    file.read_exact_at(buf.as_mut_slice(), offset)
        .expect("O_DIRECT read");
    buf.as_slice().to_vec()
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn from(data: &[u8]) -> AlignedBuf {
        assert!(
            !data.is_empty() && data.len() % 4096 == 0,
            "O_DIRECT needs 4 KiB multiples"
        );
        let layout = std::alloc::Layout::from_size_align(data.len(), 4096).expect("layout");
        // SAFETY: non-zero size; the copy stays within the allocation.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        AlignedBuf { ptr, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: allocated and initialised for layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The state map format, as far as the upgrade tests need it (offsets from
/// `gmd_core::statemap::format`, written out here so that the test does not
/// trust the code it tests).
mod map_format {
    pub(super) const BLOCK: usize = 4096;
    pub(super) const SUPER_MAGIC: &[u8; 8] = b"GMDSMAP\0";
    pub(super) const PAGE_MAGIC: &[u8; 8] = b"GMDSPAGE";
    /// Version: u16 little-endian at byte 8 of every block.
    pub(super) const VERSION: usize = 8;
    /// Superblock: sequence number (u64 LE).
    pub(super) const SUPER_SEQ: usize = 72;
    /// Superblock: the version 2 fields (generations, role).
    pub(super) const SUPER_V2: std::ops::Range<usize> = 1024..1072;
    /// Superblock: CRC32 in the last 4 bytes.
    pub(super) const SUPER_CRC: usize = BLOCK - 4;
    /// Page: CRC32 at byte 60.
    pub(super) const PAGE_CRC: usize = 60;

    /// CRC32 of `block` with its CRC field zeroed.
    pub(super) fn crc(block: &[u8], at: usize) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&block[..at]);
        h.update(&[0; 4]);
        h.update(&block[at + 4..]);
        h.finalize()
    }

    pub(super) fn crc_ok(block: &[u8], at: usize) -> bool {
        block[at..at + 4] == crc(block, at).to_le_bytes()
    }

    pub(super) fn set_crc(block: &mut [u8], at: usize) {
        let c = crc(block, at);
        block[at..at + 4].copy_from_slice(&c.to_le_bytes());
    }
}

/// Rewrites the state map at `path` as gmd wrote it before data generations
/// (format version 1): in each valid superblock copy the version field
/// becomes 1 and the version 2 area (bytes 1024..1072: generations, role)
/// zeroes; each valid page copy gets version 1 too (pages did not change
/// otherwise); checksums are recomputed. Blocks that are not valid (never
/// written, torn) are left as they are. Returns how many superblock copies
/// were rewritten.
///
/// # Panics
/// If the file cannot be read or written.
pub fn make_format_1_map(path: &Path) -> usize {
    use map_format::*;
    let mut bytes = std::fs::read(path).expect("read state map");
    let mut supers = 0;
    for (i, block) in bytes.chunks_exact_mut(BLOCK).enumerate() {
        if i < 2 && &block[..8] == SUPER_MAGIC && crc_ok(block, SUPER_CRC) {
            block[VERSION..VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
            block[SUPER_V2].fill(0);
            set_crc(block, SUPER_CRC);
            supers += 1;
        } else if i >= 2 && &block[..8] == PAGE_MAGIC && crc_ok(block, PAGE_CRC) {
            block[VERSION..VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
            set_crc(block, PAGE_CRC);
        }
    }
    std::fs::write(path, &bytes).expect("write state map");
    supers
}

/// `(format version, sequence number)` of each valid superblock copy of the
/// state map at `path` (copy A, copy B; `None` for a copy that is not valid).
///
/// # Panics
/// If the file cannot be read.
pub fn map_superblocks(path: &Path) -> [Option<(u16, u64)>; 2] {
    use map_format::*;
    let bytes = std::fs::read(path).expect("read state map");
    let copy = |i: usize| {
        let block = bytes.get(i * BLOCK..(i + 1) * BLOCK)?;
        if &block[..8] != SUPER_MAGIC || !crc_ok(block, SUPER_CRC) {
            return None;
        }
        Some((
            u16::from_le_bytes(block[VERSION..VERSION + 2].try_into().expect("2")),
            u64::from_le_bytes(block[SUPER_SEQ..SUPER_SEQ + 8].try_into().expect("8")),
        ))
    };
    [copy(0), copy(1)]
}

/// Format version of the newest valid superblock copy (the one gmd reads).
///
/// # Panics
/// If no copy is valid.
pub fn map_version(path: &Path) -> u16 {
    map_superblocks(path)
        .into_iter()
        .flatten()
        .max_by_key(|&(_, seq)| seq)
        .expect("a valid superblock")
        .0
}
