//! `gmdd`: the gmd daemon, one per machine.

use clap::Parser;
use gmdctl::cli::GmddArgs as Args;
use gmdd::{Options, run};

/// Logs to journald with each event's level as its priority when stderr is
/// the journal (systemd sets `JOURNAL_STREAM`), to stderr otherwise.
/// `GMD_LOG` sets the filter (default `info`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("GMD_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter())
                .with(journald.with_syslog_identifier("gmdd".into()))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter())
        .init();
}

fn main() {
    let args = Args::parse();
    gmdd::notify::init();
    init_logging();
    // Before any other thread exists: they inherit the state.
    if let Err(e) = gmdd::flusher::enter() {
        tracing::warn!("{}", gmdd::flusher::explain(&e));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.runtime_threads))
        .thread_name("gmdd")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gmdd: cannot start the async runtime: {e}");
            std::process::exit(255);
        }
    };
    let result = runtime.block_on(run(Options {
        config: args.config,
        machine: args.machine,
        socket: args.socket,
    }));
    if let Err(e) = result {
        eprintln!("gmdd: {e:#}");
        std::process::exit(1);
    }
}
