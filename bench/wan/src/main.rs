//! `gmd-wan`: an emulated WAN between two network namespaces; see README.md.
//!
//! `gmd-wan up [...]` builds the link, prints its parameters and forwards in
//! the foreground until SIGINT or SIGTERM, then deletes the namespaces;
//! `gmd-wan down` deletes them after a crash.

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gmd_wan::link::{LinkParams, LinkStats};
use gmd_wan::{Wan, WanConfig, netns};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(
    name = "gmd-wan",
    about = "An emulated WAN link between two network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the namespaces and forward until SIGINT/SIGTERM.
    Up(UpArgs),
    /// Delete the namespaces (after a crash of `up`).
    Down(Names),
}

#[derive(Args)]
struct Names {
    /// Namespace of side A.
    #[arg(long, default_value = "wanA")]
    ns_a: String,
    /// Namespace of side B.
    #[arg(long, default_value = "wanB")]
    ns_b: String,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    names: Names,
    /// Address of side A.
    #[arg(long, default_value = "10.77.0.1")]
    addr_a: Ipv4Addr,
    /// Address of side B.
    #[arg(long, default_value = "10.77.0.2")]
    addr_b: Ipv4Addr,
    /// One-way delay in ms (the round trip is twice this).
    #[arg(long, default_value_t = 25.0)]
    delay_ms: f64,
    /// Uniform extra one-way delay in 0..=JITTER ms (keeps order).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Bottleneck rate per direction in Mbit/s; 0 = unlimited.
    #[arg(long, default_value_t = 200.0)]
    rate_mbit: f64,
    /// Bottleneck queue in bandwidth-delay products of the round trip.
    #[arg(long, default_value_t = 1.0)]
    queue_bdp: f64,
    /// Bottleneck queue in KiB (overrides --queue-bdp).
    #[arg(long)]
    queue_kib: Option<usize>,
    /// Token bucket depth in KiB.
    #[arg(long, default_value_t = 16)]
    burst_kib: usize,
    /// Probability that a packet is lost (per direction).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a packet is held back and overtaken.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How long a reordered packet is held back, in ms.
    #[arg(long, default_value_t = 5.0)]
    reorder_ms: f64,
    /// MTU of the TUN devices.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Seed of the random loss, jitter and reordering.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

fn params(a: &UpArgs) -> LinkParams {
    let mut p = LinkParams {
        delay: ms(a.delay_ms),
        jitter: ms(a.jitter_ms),
        rate_bps: (a.rate_mbit > 0.0).then_some((a.rate_mbit * 1e6) as u64),
        burst_bytes: a.burst_kib.max(1) * 1024,
        queue_bytes: 0,
        loss: a.loss.clamp(0.0, 1.0),
        reorder: a.reorder.clamp(0.0, 1.0),
        reorder_extra: ms(a.reorder_ms),
    };
    // At least 64 full packets, so a tiny BDP still queues a burst.
    let floor = 64 * a.mtu as usize;
    p.queue_bytes = match (a.queue_kib, p.bdp_bytes()) {
        (Some(k), _) => k * 1024,
        (None, Some(bdp)) => ((bdp as f64 * a.queue_bdp) as usize).max(floor),
        (None, None) => usize::MAX,
    };
    p
}

fn print_stats(name: &str, s: &LinkStats) {
    println!(
        "  {name}: in {} pkts / {} B, out {} pkts / {} B, lost {}, queue drops {} (tcp {}), reordered {}",
        s.packets_in,
        s.bytes_in,
        s.packets_out,
        s.bytes_out,
        s.lost,
        s.queue_drops,
        s.queue_drops_tcp,
        s.reordered
    );
}

fn up(a: UpArgs) -> Result<(), String> {
    let p = params(&a);
    let config = WanConfig {
        ns_a: a.names.ns_a.clone(),
        ns_b: a.names.ns_b.clone(),
        addr_a: a.addr_a,
        addr_b: a.addr_b,
        mtu: a.mtu,
        a_to_b: p.clone(),
        b_to_a: p.clone(),
        seed: a.seed,
    };
    // Block the stop signals before any thread exists, then wait for them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().map_err(|e| e.to_string())?;
    let wan = Wan::up(config).map_err(|e| e.to_string())?;
    let rate = match p.rate_bps {
        Some(r) => format!("{} Mbit/s", r as f64 / 1e6),
        None => "unlimited".into(),
    };
    let queue = match p.rate_bps {
        Some(_) => format!("{} KiB", p.queue_bytes / 1024),
        None => "none".into(),
    };
    println!(
        "gmd-wan up: {} {} <-> {} {} (device {} in each, MTU {})",
        a.names.ns_a,
        a.addr_a,
        a.names.ns_b,
        a.addr_b,
        gmd_wan::wan::TUN_NAME,
        a.mtu
    );
    println!(
        "  per direction: delay {:?} (RTT {:?}), jitter {:?}, rate {rate}, queue {queue}, burst {} KiB, loss {}, reorder {} (+{:?}), seed {}",
        p.delay,
        p.delay * 2,
        p.jitter,
        p.burst_bytes / 1024,
        p.loss,
        p.reorder,
        p.reorder_extra,
        a.seed
    );
    println!(
        "  run: ip netns exec {} CMD / ip netns exec {} CMD; stop with Ctrl-C or SIGTERM",
        a.names.ns_a, a.names.ns_b
    );
    let sig = sigs.wait().map_err(|e| e.to_string())?;
    println!(
        "gmd-wan: {sig:?}, removing {} and {}",
        a.names.ns_a, a.names.ns_b
    );
    let stats = wan.down().map_err(|e| e.to_string())?;
    print_stats("A->B", &stats[0]);
    print_stats("B->A", &stats[1]);
    Ok(())
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Up(a) => up(a),
        Cmd::Down(n) => netns::delete(&n.ns_a)
            .and(netns::delete(&n.ns_b))
            .map_err(|e| e.to_string()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gmd-wan: {e}");
            ExitCode::FAILURE
        }
    }
}
