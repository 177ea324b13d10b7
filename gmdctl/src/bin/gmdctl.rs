//! `gmdctl`: administer the GeoMirror devices of this machine.
//!
//! Exit status: 0 success; 1 bad input; 2 refused or not available (and
//! `show-state` of a dirty map, as the reference's gmd_show_state);
//! 255 system error (e.g. gmdd not running).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Parser;
use gmd_core::config::ClusterConfig;
use gmd_core::device::{self, DeviceError, ErrorClass};
use gmd_core::statemap::cells::{CELL_CONSISTENT, CELL_STALE};
use gmd_core::statemap::dump::{self, MapSummary};
use gmd_core::units::{REGION_SIZE_BYTES, format_size};
use gmdctl::cli::{Cli, Cmd, TargetArgs};
use gmdctl::client::{Client, ClientError};
use gmdctl::protocol::*;
use gmdctl::report::{NetReport, render_netstat};

struct Failure {
    code: i32,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl From<DeviceError> for Failure {
    fn from(e: DeviceError) -> Self {
        Failure {
            code: match e.class {
                ErrorClass::Invalid => 1,
                ErrorClass::Refused | ErrorClass::NotFound => 2,
                ErrorClass::Internal => 255,
            },
            message: e.message,
        }
    }
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn main() {
    gmdctl::restore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(f) => {
            eprintln!("gmdctl: {}", f.message);
            std::process::exit(f.code);
        }
    }
}

fn target(args: &TargetArgs) -> Result<Target, Failure> {
    match (&args.device, args.all) {
        (Some(d), false) => Ok(Target::Device(d.clone())),
        (None, true) => Ok(Target::All),
        _ => Err(fail(1, "name a device, or give -A for all devices")),
    }
}

fn print_outcome(value: serde_json::Value) -> Result<i32, Failure> {
    let outcome: Outcome = serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
    for line in outcome.lines {
        println!("{line}");
    }
    for warning in outcome.warnings {
        eprintln!("gmdctl: warning: {warning}");
    }
    Ok(0)
}

/// Talks to gmdd when it runs; otherwise returns `None` so that the caller
/// can work on the files directly.
fn daemon_or_offline(socket: &Path) -> Result<Option<Client>, Failure> {
    match Client::connect(socket) {
        Ok(c) => Ok(Some(c)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn offline(cli: &Cli) -> Result<(ClusterConfig, String), Failure> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = ClusterConfig::load(&path).map_err(|e| fail(1, e.to_string()))?;
    let machine = gmdctl::machine::resolve_machine(&config, cli.machine.as_deref())
        .map_err(|e| fail(1, e.to_string()))?;
    Ok((config, machine))
}

fn local_device<'a>(
    config: &'a ClusterConfig,
    machine: &str,
    name: &str,
) -> Result<
    (
        &'a gmd_core::config::Device,
        &'a gmd_core::config::DeviceMachine,
    ),
    Failure,
> {
    let device = config.devices.get(name).ok_or_else(|| {
        fail(
            2,
            format!("no device named {name} in {}", config.path.display()),
        )
    })?;
    let local = device
        .on(machine)
        .ok_or_else(|| fail(2, format!("device {name} has no copy on machine {machine}")))?;
    Ok((device, local))
}

fn run(cli: Cli) -> Result<i32, Failure> {
    match &cli.command {
        Cmd::Genkey { file, force } => {
            gmdctl::keyfile::generate(file, *force).map_err(|e| fail(2, e.to_string()))?;
            println!(
                "new cluster key written to {} (mode 0600); copy it to every machine",
                file.display()
            );
            Ok(0)
        }
        Cmd::Generate { dir } => {
            let files = gmdctl::cli::generate(dir)
                .map_err(|e| fail(255, format!("{}: {e}", dir.display())))?;
            println!("{} file(s) written under {}", files.len(), dir.display());
            Ok(0)
        }
        Cmd::Verify { json } => {
            let path = match (&cli.config, Client::connect(&cli.socket)) {
                (Some(p), _) => p.clone(),
                (None, Ok(mut client)) => {
                    let hello: Hello = client.call(Command::Hello)?;
                    PathBuf::from(hello.config)
                }
                (None, Err(_)) => PathBuf::from(DEFAULT_CONFIG),
            };
            let mut findings = gmdctl::verify::verify_local(&path, cli.machine.as_deref());
            match Client::connect(&cli.socket) {
                Ok(mut client) => {
                    let across: Vec<gmdctl::verify::Finding> =
                        client.call(Command::VerifyCluster)?;
                    findings.extend(across);
                }
                Err(_) => findings.push(gmdctl::verify::Finding {
                    ok: true,
                    text: "gmdd is not running here: the checks across machines were skipped"
                        .into(),
                }),
            }
            let errors = findings.iter().filter(|f| !f.ok).count();
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "schema": STATUS_SCHEMA,
                        "ok": errors == 0,
                        "errors": errors,
                        "findings": findings,
                    })
                );
            } else {
                print!("{}", gmdctl::verify::render(&findings));
            }
            Ok(if errors == 0 { 0 } else { 1 })
        }
        Cmd::InitState {
            device,
            force,
            uuid,
            zeroed,
        } => match daemon_or_offline(&cli.socket)? {
            Some(mut client) => print_outcome(client.call_value(Command::InitState {
                device: device.clone(),
                force: *force,
                uuid: uuid.map(|u| u.to_string()),
                zeroed: *zeroed,
            })?),
            None => {
                let (config, machine) = offline(&cli)?;
                let (dev, local) = local_device(&config, &machine, device)?;
                let uuid = uuid.unwrap_or_else(|| device::default_uuid(&config.name, dev));
                let volume = if *zeroed {
                    device::NewVolume::Zeroed
                } else {
                    device::NewVolume::Unknown
                };
                let uuid = device::init_state(dev, local, uuid, volume, *force)?;
                println!(
                    "{device}: new state map written to {} (device id {uuid})",
                    local.state_map.display()
                );
                println!("{device}: {}", init_state_note(volume));
                Ok(0)
            }
        },
        Cmd::Primary {
            device,
            force,
            json,
        } => print_role_change(
            Client::connect(&cli.socket)?.call_value(Command::Primary {
                device: device.clone(),
                force: *force,
            })?,
            *json,
        ),
        Cmd::Secondary { device, json } => print_role_change(
            Client::connect(&cli.socket)?.call_value(Command::Secondary {
                device: device.clone(),
            })?,
            *json,
        ),
        Cmd::Split { device, json } => print_role_change(
            Client::connect(&cli.socket)?.call_value(Command::Split {
                device: device.clone(),
            })?,
            *json,
        ),
        Cmd::Rejoin { device, json } => print_role_change(
            Client::connect(&cli.socket)?.call_value(Command::Rejoin {
                device: device.clone(),
            })?,
            *json,
        ),
        Cmd::List { json } => {
            let mut client = Client::connect(&cli.socket)?;
            let devices: Vec<DeviceStatus> = client.call(Command::Status { device: None })?;
            if *json {
                let list: Vec<serde_json::Value> = devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "name": d.name,
                            "state": d.state,
                            "mode": d.mode,
                            "role": d.role,
                            "minor": d.minor,
                            "size_bytes": d.size_bytes,
                            "connected": d.link.as_ref().is_some_and(|l| l.connected),
                            "peer": d.link.as_ref().and_then(|l| l.peer.clone()),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "schema": STATUS_SCHEMA, "devices": list })
                );
                return Ok(0);
            }
            println!(
                "{:<16} {:<10} {:<6} {:<10} {:>6} {:>10}",
                "DEVICE", "STATE", "MODE", "ROLE", "MINOR", "SIZE"
            );
            for d in devices {
                println!(
                    "{:<16} {:<10} {:<6} {:<10} {:>6} {:>10}",
                    d.name,
                    d.state.to_string(),
                    d.mode.to_string(),
                    d.role.to_string(),
                    d.minor,
                    format_size(d.size_bytes)
                );
            }
            Ok(0)
        }
        Cmd::Status { device, json } => {
            let mut client = Client::connect(&cli.socket)?;
            let value = client.call_value(Command::Status {
                device: device.clone(),
            })?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                return Ok(0);
            }
            let devices: Vec<DeviceStatus> =
                serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
            for d in devices {
                print_status(&d);
            }
            Ok(0)
        }
        Cmd::Configure(t) => {
            let target = target(t)?;
            print_outcome(Client::connect(&cli.socket)?.call_value(Command::Configure { target })?)
        }
        Cmd::Start(t) => {
            let target = target(t)?;
            print_outcome(Client::connect(&cli.socket)?.call_value(Command::Start { target })?)
        }
        Cmd::Up(t) => up(&cli.socket, target(t)?),
        Cmd::Stop(t) => {
            let target = target(t)?;
            print_outcome(Client::connect(&cli.socket)?.call_value(Command::Stop { target })?)
        }
        Cmd::Unconfigure(t) => {
            let target = target(t)?;
            print_outcome(
                Client::connect(&cli.socket)?.call_value(Command::Unconfigure { target })?,
            )
        }
        Cmd::Down { device, peer } => {
            print_outcome(Client::connect(&cli.socket)?.call_value(Command::Down {
                device: device.clone(),
                peer: peer.clone(),
            })?)
        }
        Cmd::Set {
            device,
            assignments,
        } => {
            let mut changes = Vec::new();
            for a in assignments {
                let Some((k, v)) = a.split_once('=') else {
                    return Err(fail(
                        1,
                        format!("{a:?} is not KEY=VALUE (e.g. role=primary)"),
                    ));
                };
                changes.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            print_outcome(Client::connect(&cli.socket)?.call_value(Command::Set {
                device: device.clone(),
                changes,
            })?)
        }
        Cmd::ShowState {
            device,
            dump: dump_path,
            from,
            picture,
            json,
        } => {
            let view = MapView {
                picture: *picture,
                json: *json,
            };
            if let Some(path) = from {
                let bytes =
                    std::fs::read(path).map_err(|e| fail(2, format!("{}: {e}", path.display())))?;
                let (uuid, cells) = dump::decode(&bytes)
                    .map_err(|e| fail(2, format!("{}: {e}", path.display())))?;
                if view.json {
                    return Ok(print_map_json(
                        serde_json::json!({"file": path.display().to_string()}),
                        &uuid,
                        &cells,
                    ));
                }
                println!("Map file: {}", path.display());
                println!("Device id: {uuid}");
                return Ok(view.print(&cells));
            }
            let device = device.clone().expect("clap requires it");
            let (header, uuid, cells, about) = match daemon_or_offline(&cli.socket)? {
                Some(mut client) => {
                    let s: ShowState = client.call(Command::ShowState {
                        device: device.clone(),
                    })?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(&s.map_file_base64)
                        .map_err(|e| fail(255, e.to_string()))?;
                    let (uuid, cells) =
                        dump::decode(&bytes).map_err(|e| fail(255, e.to_string()))?;
                    let about = serde_json::json!({
                        "machine": s.machine,
                        "device": s.device,
                        "state": s.state,
                        "source": if s.source == "disk" { "disk" } else { "gmdd" },
                    });
                    (
                        format!(
                            "Point of View: Node {}\nName: {}  Status: {}  (map read from {})",
                            s.machine,
                            s.device,
                            s.state,
                            if s.source == "disk" { "disk" } else { "gmdd" }
                        ),
                        uuid,
                        cells,
                        about,
                    )
                }
                None => {
                    let (config, machine) = offline(&cli)?;
                    let (dev, local) = local_device(&config, &machine, &device)?;
                    let (uuid, cells) = device::read_map(dev, local)?;
                    let about = serde_json::json!({
                        "machine": machine,
                        "device": device,
                        "state": "DEFINED",
                        "source": "disk",
                    });
                    (
                        format!(
                            "Point of View: Node {machine}\nName: {device}  Status: DEFINED  (map read from disk; gmdd not running)"
                        ),
                        uuid,
                        cells,
                        about,
                    )
                }
            };
            if let Some(path) = dump_path {
                std::fs::write(path, dump::encode(&uuid, &cells))
                    .map_err(|e| fail(255, format!("{}: {e}", path.display())))?;
                eprintln!("map file written to {}", path.display());
            }
            if view.json {
                return Ok(print_map_json(about, &uuid, &cells));
            }
            println!("{header}");
            println!("Device id: {uuid}");
            Ok(view.print(&cells))
        }
        Cmd::Netprobe { peer, rounds, json } => {
            let mut client = Client::connect(&cli.socket)?;
            let value = client.call_value(Command::NetProbe {
                peer: peer.clone(),
                rounds: *rounds,
            })?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                return Ok(0);
            }
            let report: NetProbe =
                serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
            for path in &report.paths {
                let srtt = path
                    .srtt_us
                    .map(|u| format!("{u} µs"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{} via {}: {}, smoothed RTT {srtt}",
                    report.peer,
                    path.network,
                    if path.up { "up" } else { "DOWN" }
                );
                println!(
                    "  {:>9} {:>10} {:>10} {:>10} {:>12}",
                    "size", "rtt min", "rtt avg", "rtt max", "throughput"
                );
                for s in &path.sizes {
                    println!(
                        "  {:>9} {:>8}µs {:>8}µs {:>8}µs {:>10}/s",
                        format_size(s.bytes as u64),
                        s.rtt_min_us,
                        s.rtt_avg_us,
                        s.rtt_max_us,
                        format_size(s.bytes_per_s)
                    );
                }
            }
            Ok(0)
        }
        Cmd::Netstat {
            summary,
            machines,
            networks,
            interval,
            count,
            json,
        } => netstat(
            &cli.socket,
            *summary,
            machines,
            networks,
            *interval,
            *count,
            *json,
        ),
        Cmd::Sizing {
            targets,
            interval,
            duration,
            verbose,
            json,
            sync_time,
            size,
            link,
            rtt_ms,
        } => {
            if let Some(rtt) = rtt_ms {
                let link = link.as_deref().unwrap_or("");
                let bits = gmdctl::sizing::parse_link_bits_s(link).map_err(|e| fail(1, e))?;
                if !(rtt.is_finite() && *rtt > 0.0) {
                    return Err(fail(
                        1,
                        format!(
                            "--rtt-ms {rtt} is not a round trip; give milliseconds > 0, e.g. 50"
                        ),
                    ));
                }
                print!("{}", gmdctl::sizing::hwm_text(link, bits, *rtt));
                return Ok(0);
            }
            if *sync_time {
                let (size, link) = (size.as_deref().unwrap_or(""), link.as_deref().unwrap_or(""));
                let bytes = gmd_core::units::parse_size_bytes(size)
                    .filter(|b| *b > 0)
                    .ok_or_else(|| {
                        fail(1, format!("--size {size:?} is not a size (e.g. 1T, 500G)"))
                    })?;
                let bits = gmdctl::sizing::parse_link_bits_s(link).map_err(|e| fail(1, e))?;
                print!(
                    "{}",
                    gmdctl::sizing::sync_table(bytes, &format_size(bytes), link, bits)
                );
                return Ok(0);
            }
            sizing(targets, interval, duration, *verbose, *json)
        }
        Cmd::Events {
            json,
            now,
            timestamps,
        } => {
            use std::io::Write as _;
            let events = Client::connect(&cli.socket)?.events()?;
            let mut out = std::io::stdout().lock();
            for event in events {
                let event = event?;
                let line = if *json {
                    serde_json::to_string(&event).unwrap_or_default()
                } else if *timestamps {
                    format!(
                        "{} {}",
                        gmdctl::views::rfc3339_ms(event.time_ms),
                        event.to_text()
                    )
                } else {
                    event.to_text()
                };
                if *now && event.object == "-" {
                    // `exists -` ends the current state: with --now, so does the output.
                    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
                    return Ok(0);
                }
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // The reader went away (e.g. `| head`).
                    return Ok(0);
                }
            }
            Ok(0)
        }
        Cmd::Unify {
            device,
            master,
            preview,
        } => {
            let mut client = Client::connect(&cli.socket)?;
            let value = client.call_value(Command::Unify {
                device: device.clone(),
                master: master.clone(),
                preview: *preview,
            })?;
            if !*preview {
                return print_outcome(value);
            }
            let s: ShowState =
                serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&s.map_file_base64)
                .map_err(|e| fail(255, e.to_string()))?;
            let (_, cells) = dump::decode(&bytes).map_err(|e| fail(255, e.to_string()))?;
            println!(
                "Point of View: Nodes {}\nName: {device}  (unified map, preview; master {master})",
                s.machine
            );
            Ok(print_map(&cells))
        }
        Cmd::Dirty { device } => match daemon_or_offline(&cli.socket)? {
            Some(mut client) => print_outcome(client.call_value(Command::Dirty {
                device: device.clone(),
            })?),
            None => {
                let (config, machine) = offline(&cli)?;
                let (dev, local) = local_device(&config, &machine, device)?;
                device::mark_all_on_disk(dev, local, CELL_STALE)?;
                println!(
                    "{device}: every region marked stale; the whole device will be sent to the peer when mirroring resumes"
                );
                Ok(0)
            }
        },
        Cmd::Compare {
            device,
            repair,
            rate,
            no_wait,
            json,
        } => compare(&cli.socket, device, *repair, *rate, *no_wait, *json),
        Cmd::Clean { device, force } => match daemon_or_offline(&cli.socket)? {
            Some(mut client) => print_outcome(client.call_value(Command::Clean {
                device: device.clone(),
                force: *force,
            })?),
            None => {
                if !force {
                    return Err(fail(
                        2,
                        format!(
                            "{device}: clean refused without --force: it discards the record of regions that differ from the peer"
                        ),
                    ));
                }
                let (config, machine) = offline(&cli)?;
                let (dev, local) = local_device(&config, &machine, device)?;
                let (_, before) = device::read_map(dev, local)?;
                device::mark_all_on_disk(dev, local, CELL_CONSISTENT)?;
                println!("{device}: state map cleaned");
                eprintln!(
                    "gmdctl: warning: {} region(s) marked as differing from the peer were forgotten; they will not be resynchronised",
                    before.count_nonzero()
                );
                Ok(0)
            }
        },
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `gmdctl sizing`: samples every target each interval until the duration
/// ends or SIGINT/SIGTERM arrives, then reports.
fn sizing(
    targets: &[PathBuf],
    interval: &str,
    duration: &str,
    verbose: bool,
    json: bool,
) -> Result<i32, Failure> {
    use gmdctl::sizing::*;
    use std::time::{Duration, Instant};
    let every = parse_duration_s(interval).map_err(|e| fail(1, format!("-i: {e}")))?;
    let total = parse_duration_s(duration).map_err(|e| fail(1, format!("-t: {e}")))?;
    let mut sources = Vec::new();
    for t in targets {
        sources.push(source_of(t).map_err(|e| fail(2, e))?);
    }
    let mut last: Vec<gmdctl::sizing::Counters> = sources
        .iter()
        .map(sample)
        .collect::<Result<_, _>>()
        .map_err(|e| fail(2, e))?;
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::Handler(on_interrupt))
        }
        .map_err(|e| fail(255, format!("cannot catch {signal}: {e}")))?;
    }
    let names: Vec<String> = targets.iter().map(|t| t.display().to_string()).collect();
    if !json {
        println!(
            "sampling {} every {every} s for {total} s (Ctrl-C to stop early)",
            names.join(", ")
        );
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let mut intervals: Vec<Vec<Interval>> = vec![Vec::new(); sources.len()];
    let mut taken = Instant::now();
    let stop = |now: Instant| {
        INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
            || now.duration_since(start).as_secs_f64() >= total
    };
    loop {
        let due = taken + Duration::from_secs_f64(every);
        while Instant::now() < due && !stop(Instant::now()) {
            std::thread::sleep(Duration::from_millis(50).min(due - Instant::now()));
        }
        let now = Instant::now();
        let seconds = now.duration_since(taken).as_secs_f64();
        taken = now;
        for (i, source) in sources.iter().enumerate() {
            let c = sample(source).map_err(|e| fail(255, e))?;
            let iv = Interval {
                seconds,
                read_bytes: c.read_bytes.saturating_sub(last[i].read_bytes),
                write_bytes: c.write_bytes.saturating_sub(last[i].write_bytes),
            };
            if verbose && !json {
                println!(
                    "{:<24} {:>8.1} s  read {:>10.1} KiB  written {:>10.1} KiB",
                    names[i],
                    iv.seconds,
                    iv.read_bytes as f64 / 1024.0,
                    iv.write_bytes as f64 / 1024.0
                );
            }
            intervals[i].push(iv);
            last[i] = c;
        }
        if stop(now) {
            break;
        }
    }
    let reports: Vec<TargetReport> = sources
        .iter()
        .zip(intervals)
        .zip(&names)
        .map(|((s, iv), n)| TargetReport::new(n, s, iv))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({ "schema": gmdctl::report::REPORT_SCHEMA, "interval_s": every, "targets": reports })
        );
    } else {
        for r in &reports {
            print!("{}", r.render());
        }
    }
    Ok(0)
}

/// `gmdctl netstat`: the first report since gmdd started, then one per interval.
fn netstat(
    socket: &Path,
    summary: bool,
    machines: &[String],
    networks: &[String],
    interval: Option<f64>,
    count: Option<u64>,
    json: bool,
) -> Result<i32, Failure> {
    if interval.is_some_and(|i| !i.is_finite() || i <= 0.0 || i > 86_400.0) {
        return Err(fail(1, "-i needs a number of seconds between 0 and 86400"));
    }
    if count == Some(0) {
        return Err(fail(1, "-c needs at least 1 report"));
    }
    let mut client = Client::connect(socket)?;
    let fetch = |client: &mut Client| -> Result<NetReport, Failure> {
        let mut r: NetReport = client.call(Command::NetStat)?;
        for m in machines {
            if !r.machines.iter().any(|x| &x.name == m) {
                return Err(fail(
                    2,
                    format!(
                        "{m} is not a remote machine of {} (machines: {})",
                        r.machine,
                        r.machines
                            .iter()
                            .map(|x| x.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for n in networks {
            if !r.networks.iter().any(|x| &x.name == n) {
                return Err(fail(
                    2,
                    format!(
                        "{n} is not a network of {} (networks: {})",
                        r.machine,
                        r.networks
                            .iter()
                            .map(|x| x.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        r.filter(machines, networks);
        Ok(r)
    };
    let emit = |r: &NetReport, seconds: Option<f64>| {
        if json {
            let mut value = serde_json::to_value(r).unwrap_or_default();
            value["interval_s"] = serde_json::json!(seconds);
            println!("{value}");
        } else {
            print!("{}", render_netstat(r, seconds, summary));
        }
    };
    let mut previous = fetch(&mut client)?;
    emit(&previous, None);
    let every = std::time::Duration::from_secs_f64(interval.unwrap_or(1.0));
    let count = count.unwrap_or(if interval.is_some() { u64::MAX } else { 1 });
    let mut taken = std::time::Instant::now();
    for _ in 1..count {
        std::thread::sleep(every.saturating_sub(taken.elapsed()));
        let now = fetch(&mut client)?;
        let seconds = taken.elapsed().as_secs_f64();
        taken = std::time::Instant::now();
        emit(&now.since(&previous), Some(seconds));
        previous = now;
    }
    Ok(0)
}

/// How `show-state` prints a map.
struct MapView {
    picture: bool,
    json: bool,
}

impl MapView {
    fn print(&self, cells: &gmd_core::statemap::StateMap) -> i32 {
        if self.picture {
            print_map_summary(cells);
            print!("{}", gmdctl::views::picture(cells));
            if MapSummary::of(cells).is_dirty() {
                2
            } else {
                0
            }
        } else {
            print_map(cells)
        }
    }
}

/// `show-state --json`: the map's counts and its non-clean cells as runs;
/// exit 2 while dirty, as the text form.
fn print_map_json(
    mut about: serde_json::Value,
    uuid: &uuid::Uuid,
    cells: &gmd_core::statemap::StateMap,
) -> i32 {
    let s = MapSummary::of(cells);
    about["schema"] = serde_json::json!(STATUS_SCHEMA);
    about["device_id"] = serde_json::json!(uuid.to_string());
    about["region_bytes"] = serde_json::json!(REGION_SIZE_BYTES);
    about["regions"] = serde_json::json!(s.cells);
    about["stale"] = serde_json::json!(s.stale);
    about["inconsistent"] = serde_json::json!(s.inconsistent);
    about["hot"] = serde_json::json!(s.hot);
    about["dirty"] = serde_json::json!(s.is_dirty());
    about["runs"] = serde_json::json!(gmdctl::views::cell_runs(cells));
    println!("{about}");
    if s.is_dirty() { 2 } else { 0 }
}

fn print_map_summary(cells: &gmd_core::statemap::StateMap) {
    let s = MapSummary::of(cells);
    println!(
        "State Map: {} cells of {}: {} stale, {} inconsistent, {} hot{}",
        s.cells,
        format_size(REGION_SIZE_BYTES),
        s.stale,
        s.inconsistent,
        s.hot,
        if s.is_dirty() { " (dirty)" } else { " (clean)" }
    );
}

/// `gmdctl up`: configure where DEFINED, then start where STOPPED; an
/// AVAILABLE device is left alone. The lines of both steps are printed.
fn up(socket: &Path, target: Target) -> Result<i32, Failure> {
    let mut client = Client::connect(socket)?;
    let devices: Vec<DeviceStatus> = client.call(Command::Status {
        device: match &target {
            Target::Device(d) => Some(d.clone()),
            Target::All => None,
        },
    })?;
    for d in devices {
        let one = || Target::Device(d.name.clone());
        if d.state == gmd_core::statemap::AdminState::Defined {
            print_outcome(client.call_value(Command::Configure { target: one() })?)?;
        }
        if d.state != gmd_core::statemap::AdminState::Available {
            print_outcome(client.call_value(Command::Start { target: one() })?)?;
        } else {
            println!("{}: already AVAILABLE", d.name);
        }
    }
    Ok(0)
}

fn print_map(cells: &gmd_core::statemap::StateMap) -> i32 {
    let s = MapSummary::of(cells);
    println!(
        "State Map: {} cells of {}: {} stale, {} inconsistent, {} hot{}",
        s.cells,
        format_size(REGION_SIZE_BYTES),
        s.stale,
        s.inconsistent,
        s.hot,
        if s.is_dirty() { " (dirty)" } else { " (clean)" }
    );
    print!("{}", dump::render_cells(cells));
    if s.is_dirty() { 2 } else { 0 }
}

/// What a new map means, for the person who wrote it.
fn init_state_note(volume: device::NewVolume) -> &'static str {
    match volume {
        device::NewVolume::Zeroed => {
            "the volume is declared zeroed: with a peer initialised --zeroed too, the pair starts without a copy"
        }
        device::NewVolume::Unknown => {
            "the volume holds no known data: it receives a full copy from its peer \
             (for a new pair, run 'gmdctl primary DEVICE --force' on the side to keep)"
        }
    }
}

/// Prints the result of a role change (or its JSON).
fn print_role_change(value: serde_json::Value, json: bool) -> Result<i32, Failure> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(0);
    }
    let change: RoleChange = serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
    for line in change.lines {
        println!("{line}");
    }
    for warning in change.warnings {
        eprintln!("gmdctl: warning: {warning}");
    }
    Ok(0)
}

/// `gmdctl compare`: starts the daemon's job and, unless told not to,
/// follows it (progress on stderr when it is a terminal) and prints the result.
fn compare(
    socket: &Path,
    device: &str,
    repair: bool,
    rate: u64,
    no_wait: bool,
    json: bool,
) -> Result<i32, Failure> {
    use std::io::{IsTerminal, Write};
    let mut client = Client::connect(socket)?;
    let value = client.call_value(Command::Compare {
        device: device.to_owned(),
        repair,
        rate_mib_s: Some(rate),
    })?;
    let mut report: CompareReport =
        serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
    if no_wait {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        } else {
            println!(
                "{device}: compare with {} started ({} regions, {} MiB/s); gmdctl status {device} shows its progress",
                report.peer, report.regions_total, report.rate_mib_s
            );
        }
        return Ok(0);
    }
    let tty = std::io::stderr().is_terminal() && !json;
    while report.state == CompareState::Running {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let value = client.call_value(Command::CompareStatus {
            device: device.to_owned(),
        })?;
        report = serde_json::from_value(value).map_err(|e| fail(255, e.to_string()))?;
        if tty {
            let eta = report.eta_s.map_or(String::new(), |s| {
                format!(", ETA {}", gmdctl::views::hms(s))
            });
            let phase = if report.regions_done < report.regions_total {
                String::new()
            } else if report.repair && report.differing > 0 {
                format!(", repairing {}/{}", report.repaired, report.differing)
            } else {
                ", re-checking".to_owned()
            };
            eprint!(
                "\r{device}: {:5.1}% ({}/{} regions){eta}{phase}   ",
                report.percent, report.regions_done, report.regions_total
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprintln!();
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_compare(&report);
    }
    Ok(if report.state == CompareState::Failed {
        2
    } else {
        0
    })
}

fn print_compare(r: &CompareReport) {
    let device = &r.device;
    if let Some(e) = &r.error {
        println!("{device}: compare with {} failed: {e}", r.peer);
    }
    println!(
        "{device}: {} of {} regions compared with {} in {:.1} s ({} skipped: written or marked while looked at), {} differ",
        r.regions_compared, r.regions_total, r.peer, r.elapsed_s, r.regions_skipped, r.differing
    );
    for run in &r.ranges {
        println!(
            "  regions {}-{}  bytes {}-{} ({})",
            run.first_region,
            run.first_region + run.regions - 1,
            run.offset_bytes,
            run.offset_bytes + run.len_bytes - 1,
            format_size(run.len_bytes)
        );
    }
    if r.repair && r.differing > 0 {
        println!(
            "{device}: {} of {} region(s) resent from this side",
            r.repaired, r.differing
        );
    } else if r.differing > 0 {
        println!(
            "{device}: the peer's copy differs in {} region(s); resend them with: gmdctl compare {device} --repair",
            r.differing
        );
    }
}

fn print_status(d: &DeviceStatus) {
    println!(
        "{}  {}  {} mode  {}  minor {}  {}",
        d.name,
        d.state,
        d.mode,
        d.role,
        d.minor,
        format_size(d.size_bytes)
    );
    if let Some(note) = &d.role_note {
        println!(
            "  role        {} (configured {}): {note}",
            d.role, d.configured_role
        );
    }
    if let Some(g) = &d.generations {
        println!("  data        generation {g}");
    }
    println!("  volume      {}", d.data);
    let map = match &d.map {
        Some(m) => format!(
            "  {} stale, {} inconsistent, {} hot of {} cells",
            m.stale, m.inconsistent, m.hot, m.cells
        ),
        None => String::new(),
    };
    println!("  state map   {}{map}", d.state_map);
    if let Some(uuid) = &d.uuid {
        println!("  device id   {uuid}");
    }
    for p in &d.peers {
        println!(
            "  peer        {} (site {}){}",
            p.machine,
            p.site,
            if p.down { ": recorded down" } else { "" }
        );
        if p.auth_failures > 0 {
            println!(
                "  auth        {} datagram(s) from {} failed authentication: the cluster keys (key_file) or `encrypt` may differ",
                p.auth_failures, p.machine
            );
        }
    }
    if let Some(l) = &d.link {
        match (&l.peer, l.connected) {
            (Some(peer), true) => println!("  mirroring   with {peer}, {}", l.mode_in_effect),
            _ => println!("  mirroring   no: standalone, written regions are marked stale"),
        }
        if l.resync_remaining > 0 {
            println!(
                "  resync      {} {}",
                l.resync_role.as_deref().unwrap_or("?"),
                gmdctl::views::resync_bar(
                    l.resync_total,
                    l.resync_remaining,
                    l.resync_bytes_per_s,
                    l.resync_eta_s
                )
            );
        }
        if l.backlog_bytes > 0 || l.hwm_fallbacks > 0 {
            println!(
                "  async       backlog {} bytes, {} fallback(s) to mwc at the high water mark",
                l.backlog_bytes, l.hwm_fallbacks
            );
        }
        if l.resync_checks > 0 || l.resync_same_bytes > 0 {
            println!(
                "  checksums   {} byte(s) of resync found identical (not moved); {} of {} region(s) checked differed and were sent",
                l.resync_same_bytes, l.resync_checks_differ, l.resync_checks
            );
        }
        if l.resync_read_errors > 0 {
            println!(
                "  resync      {} read error(s); {} region(s) wait to be read again",
                l.resync_read_errors, l.resync_failed_regions
            );
        }
        if l.discarded_regions > 0 {
            println!(
                "  discarded   {} region(s) written here and never sent were overwritten by the peer's newer data",
                l.discarded_regions
            );
        }
        if let Some(reason) = &l.refused {
            if !l.connected {
                println!("  refused     {reason}");
            }
        }
        if let Some(i) = &l.isolation {
            println!(
                "  FROZEN      {} ({} write(s) held)",
                i.message, i.writes_held
            );
        }
    }
    if let Some(c) = &d.compare {
        let what = match c.state {
            CompareState::Running => format!(
                "running {:.1}% ({}/{} regions{}), {} differ so far",
                c.percent,
                c.regions_done,
                c.regions_total,
                c.eta_s.map_or(String::new(), |s| format!(
                    ", ETA {}",
                    gmdctl::views::hms(s)
                )),
                c.differing
            ),
            CompareState::Done => format!(
                "done: {} region(s) compared, {} differ, {} repaired; out_of_sync_regions {}",
                c.regions_compared, c.differing, c.repaired, c.out_of_sync_regions
            ),
            CompareState::Failed => format!(
                "failed after {}/{} regions: {}",
                c.regions_done,
                c.regions_total,
                c.error.as_deref().unwrap_or("?")
            ),
        };
        println!("  compare     with {}: {what}", c.peer);
    }
    for e in &d.exports {
        println!("  export      {e}  ({} client(s))", d.clients);
    }
    if let Some(problem) = &d.problem {
        println!("  problem     {problem}");
    }
}
