//! The command lines of gmd's programs (`gmdctl`, `gmdstat`, `gmdd`), as
//! clap definitions: the binaries parse them, and `gmdctl generate` writes
//! man pages and shell completions from them (see [`generate`]).

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::protocol::{DEFAULT_CONFIG, DEFAULT_SOCKET};

/// Administer GeoMirror devices (gmd).
#[derive(Parser, Debug)]
#[command(
    name = "gmdctl",
    version,
    after_help = "Exit status: 0 ok, 1 bad input, 2 refused or not available, 255 system error."
)]
pub struct Cli {
    /// gmdd's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Cluster configuration, for commands that work without gmdd.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// This machine's name (default: the hostname), for commands without gmdd.
    #[arg(long, global = true)]
    pub machine: Option<String>,
    #[allow(missing_docs)]
    #[command(subcommand)]
    pub command: Cmd,
}

#[allow(missing_docs)]
#[derive(Args, Debug)]
pub struct TargetArgs {
    /// The device.
    pub device: Option<String>,
    /// Every device of this machine.
    #[arg(short = 'A', long = "all", conflicts_with = "device")]
    pub all: bool,
}

#[allow(missing_docs)]
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write a new random cluster key (mode 0600); copy it to every machine.
    Genkey {
        /// Key file to create.
        file: PathBuf,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Write a fresh state map for this machine's copy of a device (DEFINED only).
    InitState {
        /// The device.
        device: String,
        /// Replace a valid map (its record of regions to resynchronise is lost).
        #[arg(long)]
        force: bool,
        /// Device identity (default: derived from the cluster name, device
        /// name, minor and size, so both sides agree).
        #[arg(long)]
        uuid: Option<uuid::Uuid>,
        /// The data volume is new and holds only zeroes, and so does its
        /// peer's (initialised with --zeroed too): the pair starts without a
        /// copy. Without it the map says the volume holds no known data: it
        /// receives a full copy from its peer, and a new pair needs
        /// 'gmdctl primary DEVICE --force' on the side to keep.
        #[arg(long)]
        zeroed: bool,
    },
    /// Check configuration, volumes, maps, key and addresses on this machine
    /// and, with gmdd running, against every other machine.
    Verify {
        /// Machine-readable output: `{"schema":1,"ok":…,"errors":…,"findings":[{"ok","text"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// One line per device.
    List {
        /// Machine-readable output (one object per device).
        #[arg(long)]
        json: bool,
    },
    /// Device state in detail.
    Status {
        /// One device (default: all).
        device: Option<String>,
        /// Machine-readable output (a list of devices; see docs/OPERATIONS.md,
        /// "gmdctl status --json", schema 1).
        #[arg(long)]
        json: bool,
    },
    /// DEFINED → STOPPED: open and check the map and the data volume.
    Configure(TargetArgs),
    /// STOPPED → AVAILABLE: start serving applications.
    Start(TargetArgs),
    /// Bring a device up as DRBD's `drbdadm up` does: configure it if it is
    /// DEFINED, then start it (a device already AVAILABLE is left as it is).
    Up(TargetArgs),
    /// AVAILABLE → STOPPED (refused while in use).
    Stop(TargetArgs),
    /// STOPPED → DEFINED.
    Unconfigure(TargetArgs),
    /// Record a remote peer as down: start does not wait for it, and this
    /// side may become primary alone (an AVAILABLE device stops mirroring
    /// with it; if the peer is in fact running, its device is stopped).
    Down {
        /// The device.
        device: String,
        /// The remote machine.
        peer: String,
    },
    /// Make this side primary: applications may write here. Refused while
    /// the peer is primary, while apart from a peer not known to be down,
    /// and on a copy that lacks data unless --force.
    Primary {
        /// The device.
        device: String,
        /// Use this copy as it is even if it lacks data (it becomes the
        /// newest: its peer's data is overwritten where they differ).
        #[arg(long)]
        force: bool,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Make this side secondary: flush, then refuse writes (refused while a
    /// client holds the device open).
    Secondary {
        /// The device.
        device: String,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Disaster-recovery drill: make this secondary copy writable here,
    /// apart from the primary, while production goes on there.
    Split {
        /// The device.
        device: String,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// End a drill: discard the split copy's writes and resynchronise it
    /// from the primary (the regions either side changed meanwhile).
    Rejoin {
        /// The device.
        device: String,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Change attributes while DEFINED: mode, role, role.<machine>, hwm_kib, sync_rate_kib, minor, size, block_size, export.
    Set {
        /// The device.
        device: String,
        /// KEY=VALUE pairs, applied together.
        #[arg(required = true)]
        assignments: Vec<String>,
    },
    /// Print a device's state map (exit 2 when it is dirty).
    ShowState {
        /// The device (not with --from).
        #[arg(required_unless_present = "from")]
        device: Option<String>,
        /// Also write a machine-readable map file.
        #[arg(long, value_name = "FILE")]
        dump: Option<PathBuf>,
        /// Print a map file written by --dump instead.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["device", "dump"])]
        from: Option<PathBuf>,
        /// Draw the map as an 80-column grid, one character per bucket of
        /// regions: `.` clean, `h` hot, `i` in flight, `S` stale, `n` not
        /// received (the worst cell of the bucket wins).
        #[arg(long, conflicts_with = "json")]
        picture: bool,
        /// Machine-readable output: counts and the runs of non-clean cells.
        #[arg(long)]
        json: bool,
    },
    /// Mark every region stale: the whole device is sent to the peer when mirroring resumes.
    Dirty {
        /// The device.
        device: String,
    },
    /// Online verify (DRBD's verify): compare every region of a connected,
    /// in-sync device with the peer's copy by checksum while applications
    /// run, at a bounded rate; report the regions that differ (and with
    /// --repair, resend them from this side). Runs on the primary, in gmdd.
    Compare {
        /// The device.
        device: String,
        /// Resynchronise the regions found different from this primary now.
        #[arg(long)]
        repair: bool,
        /// Data read per second on each side, MiB (1-10000).
        #[arg(long, value_name = "MIB_S", default_value_t = crate::protocol::COMPARE_RATE_DEFAULT_MIB_S)]
        rate: u64,
        /// Start it and return; `gmdctl status DEVICE` shows its progress and result.
        #[arg(long)]
        no_wait: bool,
        /// Machine-readable result: regions compared and skipped, `differing`,
        /// `ranges` (region indices and byte offsets), `repaired`.
        #[arg(long)]
        json: bool,
    },
    /// Mark every region consistent (testing only: the record of differences is lost).
    Clean {
        /// The device.
        device: String,
        /// Confirm that the record of regions to resynchronise may be lost.
        #[arg(long)]
        force: bool,
    },
    /// Round trips and throughput per message size on each GeoMessage path
    /// to a machine (the reference's geonet).
    Netprobe {
        /// The machine to probe.
        peer: String,
        /// Requests per message size.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// GeoMessage statistics per machine, network and path (the reference's krpcstat).
    Netstat {
        /// Summary report (no per-path or second lines).
        #[arg(short = 's')]
        summary: bool,
        /// Only these remote machines.
        #[arg(short = 'm', num_args = 1.., value_name = "MACHINE")]
        machines: Vec<String>,
        /// Only these networks.
        #[arg(short = 'n', num_args = 1.., value_name = "NETWORK")]
        networks: Vec<String>,
        /// Seconds between reports (default 1).
        #[arg(short = 'i', value_name = "SEC")]
        interval: Option<f64>,
        /// Number of reports (default 1; with -i alone, until interrupted).
        #[arg(short = 'c', value_name = "COUNT")]
        count: Option<u64>,
        /// One JSON object per report, per line.
        #[arg(long)]
        json: bool,
    },
    /// Sample the write rate of block devices or files and report the
    /// network bandwidth it needs (the reference's gmdsizing); with
    /// --sync-time, print how long a full synchronisation takes per link.
    /// Ctrl-C ends sampling early, with a report.
    Sizing {
        /// Block devices (sampled from /proc/diskstats) or regular files
        /// (sampled by their growth).
        #[arg(
            required_unless_present_any = ["sync_time", "rtt_ms"],
            conflicts_with_all = ["sync_time", "rtt_ms"]
        )]
        targets: Vec<PathBuf>,
        /// Time between samples: seconds, or e.g. 30s, 5m.
        #[arg(short = 'i', long, default_value = "1")]
        interval: String,
        /// How long to sample: seconds, or e.g. 5m, 24h.
        #[arg(short = 't', long, default_value = "60")]
        duration: String,
        /// Print every interval as it ends.
        #[arg(short = 'V', long)]
        verbose: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print the table of full synchronisation times instead.
        #[arg(long, requires_all = ["size", "link"])]
        sync_time: bool,
        /// The link's round trip in milliseconds: with --link, print the
        /// async high water mark it needs (2 x bandwidth-delay product).
        #[arg(
            long,
            value_name = "MS",
            requires = "link",
            conflicts_with = "sync_time"
        )]
        rtt_ms: Option<f64>,
        /// Amount of data to synchronise (e.g. 1T, 500G; binary units).
        #[arg(long)]
        size: Option<String>,
        /// The link's rate (e.g. 1Gbit, 100Mbit, 1.544Mbit).
        #[arg(long)]
        link: Option<String>,
    },
    /// Stream state changes (like `drbdsetup events2`): the current state as
    /// `exists` lines, `exists -`, then one `change` line per change.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print the current state (`exists` lines) and exit.
        #[arg(long)]
        now: bool,
        /// Start each text line with the event's time (RFC 3339, UTC, ms).
        #[arg(long)]
        timestamps: bool,
    },
    /// After divergence: OR both maps into the master's, clear the other's;
    /// starting the other side then resyncs those regions from the master.
    /// With --preview, print the unified map (exit 2 while it is dirty).
    Unify {
        /// The device.
        device: String,
        /// The machine whose data wins.
        #[arg(long)]
        master: String,
        /// Only show the unified map.
        #[arg(long)]
        preview: bool,
    },
    /// Write man pages and shell completions for gmdctl, gmdstat and gmdd
    /// into DIR (used to build the packages).
    #[command(hide = true)]
    Generate {
        /// Output directory: DIR/man/man8/*.8, DIR/completions/{bash,zsh,fish}/….
        dir: PathBuf,
    },
}

/// Show GeoMirror device statistics.
#[derive(Parser, Debug)]
#[command(
    name = "gmdstat",
    version,
    after_help = "The first report gives rates since each device started; each further one, \
                  rates over the last interval.\n\
                  Exit status: 0 ok, 1 bad switches, 2 device not available, 255 system error."
)]
pub struct GmdstatArgs {
    /// gmdd's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Summary report: one line per device.
    #[arg(short = 's')]
    pub summary: bool,
    /// All devices.
    #[arg(short = 'A', conflicts_with = "devices")]
    pub all: bool,
    /// These devices (each must be AVAILABLE).
    #[arg(short = 'l', num_args = 1.., value_name = "GMD")]
    pub devices: Vec<String>,
    /// Seconds between reports (default 1).
    #[arg(short = 'i', value_name = "SEC")]
    pub interval: Option<f64>,
    /// Number of reports (default 1; with -i alone, until interrupted).
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<u64>,
    /// One JSON object per report, per line (see docs/OPERATIONS.md).
    #[arg(long)]
    pub json: bool,
}

/// The gmd daemon: hosts this machine's GeoMirror devices.
#[derive(Parser, Debug)]
#[command(
    name = "gmdd",
    version,
    after_help = "Logs to the journal under systemd (with levels), else to stderr; GMD_LOG sets \
                  the filter (info, debug, …). SIGTERM stops every device cleanly, SIGHUP \
                  re-reads the configuration. Under systemd (Type=notify) gmdd reports \
                  READY once its control socket serves and its devices are restored."
)]
pub struct GmddArgs {
    /// Cluster configuration file (identical on every machine).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// This machine's name in the configuration (default: the hostname).
    #[arg(long)]
    pub machine: Option<String>,
    /// Control socket (root only).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Threads of the async runtime (GeoMessage's driver, NBD connections,
    /// the control socket). One by default: GeoMessage's work is one task
    /// and the devices have threads of their own, so a second runtime
    /// thread mostly wakes the first; raise it for many NBD-exported
    /// devices under load.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub runtime_threads: u16,
}

/// Writes the man pages (section 8: the programs are in /usr/sbin) of
/// gmdctl, each of its subcommands (`gmdctl-status.8` …), gmdstat and gmdd
/// into `dir/man/man8` (a directory for `MANPATH=dir/man`), and their bash, zsh and fish completions into
/// `dir/completions/{bash,zsh,fish}`. Returns the files written.
pub fn generate(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    let mut written = Vec::new();
    let man = dir.join("man").join("man8");
    std::fs::create_dir_all(&man)?;
    let commands = [Cli::command(), GmdstatArgs::command(), GmddArgs::command()];
    for cmd in &commands {
        let cmd = cmd.clone();
        let name = cmd.get_name().to_owned();
        write_man(&man, &name, &cmd, &mut written)?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let sub_name = format!("{name}-{}", sub.get_name());
            let sub = sub
                .clone()
                .display_name(sub_name.clone())
                .bin_name(format!("{name} {}", sub.get_name()));
            write_man(&man, &sub_name, &sub, &mut written)?;
        }
    }
    for (shell, sub, file) in [
        (Shell::Bash, "bash", "{}"),
        (Shell::Zsh, "zsh", "_{}"),
        (Shell::Fish, "fish", "{}.fish"),
    ] {
        let out = dir.join("completions").join(sub);
        std::fs::create_dir_all(&out)?;
        for cmd in &commands {
            let mut cmd = cmd.clone();
            let name = cmd.get_name().to_owned();
            let path = out.join(file.replace("{}", &name));
            let mut f = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut cmd, name, &mut f);
            written.push(path);
        }
    }
    Ok(written)
}

fn write_man(
    dir: &Path,
    name: &str,
    cmd: &clap::Command,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let path = dir.join(format!("{name}.8"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("gmd")
        .source(format!("gmd {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)?;
    std::fs::write(&path, buf)?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_lines_are_consistent() {
        Cli::command().debug_assert();
        GmdstatArgs::command().debug_assert();
        GmddArgs::command().debug_assert();
    }

    #[test]
    fn generate_writes_a_page_per_program_and_subcommand_and_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate(dir.path()).expect("generate");
        for f in [
            "man/man8/gmdctl.8",
            "man/man8/gmdctl-status.8",
            "man/man8/gmdctl-up.8",
            "man/man8/gmdstat.8",
            "man/man8/gmdd.8",
            "completions/bash/gmdctl",
            "completions/zsh/_gmdstat",
            "completions/fish/gmdd.fish",
        ] {
            assert!(
                files.contains(&dir.path().join(f)),
                "{f} missing: {files:?}"
            );
        }
        assert!(!dir.path().join("man/man8/gmdctl-generate.8").exists());
    }
}
