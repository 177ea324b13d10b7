//! `gmdstat`: GeoMirror device statistics, since start and per interval.
//!
//! Exit status (reference): 0 ok, 1 bad switches, 2 a requested device is not
//! available, 255 system error.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use gmd_core::statemap::AdminState;
use gmdctl::client::{Client, ClientError};
use gmdctl::protocol::{Command, DEFAULT_SOCKET, DeviceStats, Stats};

/// Show GeoMirror device statistics.
#[derive(Parser, Debug)]
#[command(name = "gmdstat", version, about)]
struct Args {
    /// gmdd's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Only the figures since start (no per-second rates).
    #[arg(short = 's')]
    since_start: bool,
    /// All devices.
    #[arg(short = 'A', conflicts_with = "devices")]
    all: bool,
    /// These devices.
    #[arg(short = 'l', num_args = 1.., value_name = "GMD")]
    devices: Vec<String>,
    /// Seconds between reports.
    #[arg(short = 'i', value_name = "SEC")]
    interval: Option<f64>,
    /// Number of reports.
    #[arg(short = 'c', value_name = "COUNT")]
    count: Option<u64>,
    /// One JSON object per report.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if !args.all && args.devices.is_empty() {
        eprintln!("gmdstat: give -A for all devices or -l GMD ...");
        std::process::exit(1);
    }
    if args.interval.is_some_and(|i| i.is_nan() || i <= 0.0) {
        eprintln!("gmdstat: -i needs a positive number of seconds");
        std::process::exit(1);
    }
    std::process::exit(match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gmdstat: {e}");
            e.exit_code()
        }
    });
}

fn fetch(client: &mut Client, args: &Args) -> Result<Stats, ClientError> {
    client.call(Command::Stats {
        devices: args.devices.clone(),
    })
}

fn run(args: &Args) -> Result<(), ClientError> {
    let mut client = Client::connect(&args.socket)?;
    let mut previous = fetch(&mut client, args)?;
    for d in &previous.devices {
        if !args.devices.is_empty() && d.state != AdminState::Available {
            return Err(ClientError::Daemon(
                gmdctl::protocol::ControlError::not_found(format!(
                    "{} is {}, not AVAILABLE",
                    d.name, d.state
                )),
            ));
        }
    }
    let interval = args.interval.map(Duration::from_secs_f64);
    let count = args
        .count
        .unwrap_or(if interval.is_some() { u64::MAX } else { 1 });
    report(args, &previous, None, None);
    let mut done = 1;
    while done < count {
        let Some(interval) = interval else { break };
        std::thread::sleep(interval);
        let now = fetch(&mut client, args)?;
        report(args, &now, Some(&previous), Some(interval));
        previous = now;
        done += 1;
    }
    Ok(())
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

fn report(args: &Args, now: &Stats, before: Option<&Stats>, interval: Option<Duration>) {
    if args.json {
        let mut value = serde_json::to_value(now).unwrap_or_default();
        if let Some(secs) = interval.map(|i| i.as_secs_f64()) {
            value["interval_s"] = serde_json::json!(secs);
        }
        println!("{}", serde_json::to_string(&value).unwrap_or_default());
        return;
    }
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "GMD", "lx", "lx/s", "lw", "lw/s", "lkw", "lkw/s", "stale"
    );
    for d in &now.devices {
        let prev = before.and_then(|b| b.devices.iter().find(|p| p.name == d.name));
        let (dx, dw, dkw, secs) = rates(d, prev, interval);
        let c = &d.counters;
        let per = |x: f64| {
            if args.since_start {
                "-".to_string()
            } else {
                format!("{:.1}", x / secs)
            }
        };
        println!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>10} {:>8}",
            d.name,
            c.reads + c.writes,
            per(dx),
            c.writes,
            per(dw),
            kib(c.write_bytes),
            per(dkw),
            d.map.map_or(0, |m| m.stale),
        );
    }
    println!(
        "lx = local transfers, lw = local writes, lkw = KiB written locally, /s = per second {}",
        if interval.is_some() {
            "over the interval"
        } else {
            "since start"
        }
    );
}

fn rates(
    d: &DeviceStats,
    prev: Option<&DeviceStats>,
    interval: Option<Duration>,
) -> (f64, f64, f64, f64) {
    let c = &d.counters;
    match (prev, interval) {
        (Some(p), Some(i)) => {
            let pc = &p.counters;
            (
                (c.reads + c.writes).saturating_sub(pc.reads + pc.writes) as f64,
                c.writes.saturating_sub(pc.writes) as f64,
                kib(c.write_bytes.saturating_sub(pc.write_bytes)),
                i.as_secs_f64(),
            )
        }
        _ => (
            (c.reads + c.writes) as f64,
            c.writes as f64,
            kib(c.write_bytes),
            (d.uptime_ms as f64 / 1000.0).max(0.001),
        ),
    }
}
