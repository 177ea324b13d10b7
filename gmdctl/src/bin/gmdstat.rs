//! `gmdstat`: GeoMirror device statistics, since start and per interval.
//!
//! Exit status (reference): 0 ok, 1 bad switches, 2 a requested device is not
//! available, 255 system error.

use std::time::{Duration, Instant};

use clap::Parser;
use gmd_core::statemap::AdminState;
use gmdctl::cli::GmdstatArgs;
use gmdctl::client::{Client, ClientError};
use gmdctl::protocol::{Command, ControlError};
use gmdctl::report::{GmdstatDevice, GmdstatJson, Report, render_gmdstat};

type Args = GmdstatArgs;

fn main() {
    gmdctl::restore_sigpipe();
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
    if args
        .interval
        .is_some_and(|i| !i.is_finite() || i <= 0.0 || i > 86_400.0)
    {
        eprintln!("gmdstat: -i needs a number of seconds between 0 and 86400");
        std::process::exit(1);
    }
    if args.count == Some(0) {
        eprintln!("gmdstat: -c needs at least 1 report");
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

fn fetch(client: &mut Client, args: &Args) -> Result<Report, ClientError> {
    client.call(Command::Stats {
        devices: args.devices.clone(),
    })
}

fn run(args: &Args) -> Result<(), ClientError> {
    let mut client = Client::connect(&args.socket)?;
    let mut previous = fetch(&mut client, args)?;
    for d in &previous.devices {
        if !args.devices.is_empty() && d.state != AdminState::Available {
            return Err(ClientError::Daemon(ControlError::not_found(format!(
                "{} is {}, not AVAILABLE (gmdctl start {})",
                d.name, d.state, d.name
            ))));
        }
    }
    let interval = Duration::from_secs_f64(args.interval.unwrap_or(1.0));
    let count = args
        .count
        .unwrap_or(if args.interval.is_some() { u64::MAX } else { 1 });
    let mut taken = Instant::now();
    emit(args, &previous, None);
    for _ in 1..count {
        std::thread::sleep(interval.saturating_sub(taken.elapsed()));
        let now = fetch(&mut client, args)?;
        let seconds = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        emit(args, &now, Some((&previous, seconds)));
        previous = now;
    }
    Ok(())
}

fn emit(args: &Args, now: &Report, earlier: Option<(&Report, f64)>) {
    if !args.json {
        print!("{}", render_gmdstat(now, earlier, args.summary));
        return;
    }
    let json = GmdstatJson {
        schema: now.schema,
        machine: now.machine.clone(),
        interval_s: earlier.map(|(_, s)| s),
        devices: now
            .devices
            .iter()
            .map(|d| GmdstatDevice {
                interval: match earlier
                    .and_then(|(e, s)| e.devices.iter().find(|p| p.name == d.name).map(|p| (p, s)))
                {
                    Some((p, s)) => d.since(p, s),
                    None => d.since_start(),
                },
                report: d.clone(),
            })
            .collect(),
        peers: now.peers.clone(),
    };
    match serde_json::to_string(&json) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("gmdstat: cannot encode the report: {e}"),
    }
}
