//! GeoMessage vs plain TCP on loopback, measured in the same run.
//!
//! `gmd-net-bench all` spawns itself as the receiving process for each case
//! and prints a table of ratios:
//! - bulk one-way transfer of `--gib` GiB in 1 MiB messages: TCP, GeoMessage
//!   with 0 % loss (encrypted and authenticated-only), and with 1 % injected
//!   loss (the `recv_loss_ppm` knob on both nodes);
//! - small-message round trips: TCP ping-pong vs GeoMessage request/reply.
//!
//! `gmd-net-bench rtt` runs only the round trips (TCP, then GeoMessage),
//! `--repeat` times, printing p50 and p99 of each and their ratio.
//!
//! `gmd-net-bench crypto` measures what one CPU can seal and open per second
//! with GeoMessage's own keys (AES-256-GCM, and the ChaCha20-Poly1305 tag of
//! authentication-only mode) on datagrams of `--datagram` bytes, and how
//! fast it copies 1 MiB: the ceilings of a mirrored stream on that CPU (the
//! two-VM bench prints them for its guests).
//!
//! Every case is bounded: a fixed byte/round-trip count and a 120 s timeout.
//!
//! Across an emulated WAN (`bench/wan.sh`, `gmd-wan`): run `all` in one
//! namespace with `--addr0` (its own address), `--addr1` (the server's) and
//! `--server-netns NS` (the servers are started with `ip netns exec NS`);
//! `--rtt-rounds` bounds the round trips. Defaults: 127.0.0.1 both, no
//! namespace, 20 000 round trips.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gmd_net::{InterfaceConfig, MachineConfig, NetConfig, NetworkConfig, Node, StreamId, Tuning};

const MESSAGE_BYTES: usize = 1 << 20;
const RTT_ROUNDS: usize = 20_000;

/// Where the two ends are (see the module documentation).
struct Opts {
    addr0: Ipv4Addr,
    addr1: Ipv4Addr,
    server_netns: Option<String>,
    rtt_rounds: usize,
    /// TCP congestion control of the client sockets (`--tcp-cc`), e.g.
    /// cubic; `None`: the system default.
    tcp_cc: Option<String>,
}

static OPTS: OnceLock<Opts> = OnceLock::new();

fn opts() -> &'static Opts {
    OPTS.get().expect("options parsed")
}
const RTT_BYTES: usize = 64;
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// `--datagram BYTES`, or `auto` (0): the size follows the path.
fn datagram_arg(s: &str) -> Option<usize> {
    if s == "auto" { Some(0) } else { s.parse().ok() }
}

fn gm_config(
    local: usize,
    ports: [u16; 2],
    encrypt: bool,
    loss_ppm: u32,
    datagram: usize,
) -> NetConfig {
    let m = |i: usize| MachineConfig {
        name: format!("bench{i}"),
        promote_failure_timeout: Duration::from_secs(30),
        interfaces: vec![InterfaceConfig {
            network: "lo".into(),
            addr: SocketAddr::from((if i == 0 { opts().addr0 } else { opts().addr1 }, ports[i])),
        }],
    };
    NetConfig {
        cluster_name: "bench".into(),
        psk: vec![0x42; 32],
        encrypt,
        local_machine: format!("bench{local}"),
        machines: vec![m(0), m(1)],
        networks: vec![NetworkConfig {
            name: "lo".into(),
            // 0 (`--datagram auto`): discovered from the default up.
            datagram_bytes: if datagram == 0 {
                gmd_net::DATAGRAM_BYTES_DEFAULT
            } else {
                datagram
            },
            discover: datagram == 0,
        }],
        tuning: Tuning {
            recv_loss_ppm: loss_ppm,
            ..Tuning::default()
        },
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = |name, default| arg(&args, name).map_or(default, |a| a.parse().expect(name));
    let _ = OPTS.set(Opts {
        addr0: addr("--addr0", Ipv4Addr::LOCALHOST),
        addr1: addr("--addr1", Ipv4Addr::LOCALHOST),
        server_netns: arg(&args, "--server-netns"),
        rtt_rounds: arg(&args, "--rtt-rounds").map_or(RTT_ROUNDS, |n| n.parse().expect("rounds")),
        tcp_cc: arg(&args, "--tcp-cc"),
    });
    match args.get(1).map(String::as_str) {
        Some("tcp-server") => {
            tcp_server(arg(&args, "--port").expect("--port").parse().expect("port"))
        }
        Some("gm-server") => gm_server(&args),
        Some("fair") => fair(&args),
        Some("gm") => {
            // GeoMessage alone for --secs (GMD_BENCH_VERBOSE: a trace).
            let secs = arg(&args, "--secs")
                .and_then(|s| s.parse().ok())
                .unwrap_or(10.0);
            let dg = arg(&args, "--datagram")
                .and_then(|s| datagram_arg(&s))
                .unwrap_or(1400);
            let r = gm_bulk_for(dg, secs);
            println!("  geomsg alone {secs} s: {:.2} MiB/s", r / (1 << 20) as f64);
        }
        Some("crypto") => crypto(&args),
        Some("rtt") => rtt(&args),
        Some("all") | None => all(&args),
        Some(other) => {
            eprintln!(
                "unknown mode {other}; use: all [--gib N] [--datagram BYTES] | rtt [--repeat N] | crypto [--datagram BYTES]"
            );
            std::process::exit(1);
        }
    }
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> ChildGuard {
    let exe = std::env::current_exe().expect("exe");
    let o = opts();
    let mut cmd = match &o.server_netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let (a0, a1) = (o.addr0.to_string(), o.addr1.to_string());
    ChildGuard(
        cmd.args(args)
            .args(["--addr0", &a0, "--addr1", &a1])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn server"),
    )
}

// ---------------------------------------------------------------------------
// TCP baseline.

fn tcp_server(port: u16) {
    let l = TcpListener::bind((opts().addr1, port)).expect("listen");
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        c.set_nodelay(true).ok();
        let mut mode = [0u8; 1];
        if c.read_exact(&mut mode).is_err() {
            continue;
        }
        if mode[0] == b'B' {
            // Bulk: length-prefixed messages until a zero length, then ack.
            let mut buf = vec![0u8; MESSAGE_BYTES];
            loop {
                let mut len = [0u8; 4];
                if c.read_exact(&mut len).is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if n == 0 {
                    let _ = c.write_all(b"k");
                    break;
                }
                if c.read_exact(&mut buf[..n]).is_err() {
                    break;
                }
            }
        } else {
            let mut buf = [0u8; RTT_BYTES];
            while c.read_exact(&mut buf).is_ok() {
                if c.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    }
}

/// Sets the socket's TCP congestion control (root may pick any the kernel
/// has, whatever the namespace's default).
fn set_tcp_cc(s: &TcpStream, cc: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and a buffer of the given length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    assert!(
        r == 0,
        "TCP_CONGESTION {cc}: {} (see net.ipv4.tcp_available_congestion_control)",
        std::io::Error::last_os_error()
    );
}

fn tcp_connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect((opts().addr1, port)) {
            Ok(s) => {
                if let Some(cc) = &opts().tcp_cc {
                    set_tcp_cc(&s, cc);
                }
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("connect: {e}"),
        }
    }
}

fn tcp_bulk(port: u16, total: usize) -> f64 {
    let mut s = tcp_connect(port);
    s.set_nodelay(true).ok();
    let msg = vec![0x5a; MESSAGE_BYTES];
    let start = Instant::now();
    s.write_all(b"B").unwrap();
    for _ in 0..total / MESSAGE_BYTES {
        s.write_all(&(MESSAGE_BYTES as u32).to_be_bytes()).unwrap();
        s.write_all(&msg).unwrap();
    }
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut k = [0u8; 1];
    s.read_exact(&mut k).unwrap();
    total as f64 / start.elapsed().as_secs_f64()
}

/// Sends 1 MiB messages for `secs`, then waits for the receiver's ack:
/// bytes per second.
fn tcp_bulk_for(port: u16, secs: f64) -> f64 {
    let mut s = tcp_connect(port);
    s.set_nodelay(true).ok();
    let msg = vec![0x5a; MESSAGE_BYTES];
    let start = Instant::now();
    let mut sent = 0usize;
    s.write_all(b"B").unwrap();
    while start.elapsed().as_secs_f64() < secs {
        s.write_all(&(MESSAGE_BYTES as u32).to_be_bytes()).unwrap();
        s.write_all(&msg).unwrap();
        sent += MESSAGE_BYTES;
    }
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut k = [0u8; 1];
    s.read_exact(&mut k).unwrap();
    sent as f64 / start.elapsed().as_secs_f64()
}

fn tcp_rtt(port: u16) -> Vec<Duration> {
    let mut s = tcp_connect(port);
    s.set_nodelay(true).ok();
    s.write_all(b"R").unwrap();
    let mut buf = [7u8; RTT_BYTES];
    let mut v = Vec::with_capacity(opts().rtt_rounds);
    for _ in 0..opts().rtt_rounds {
        let t = Instant::now();
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap();
        v.push(t.elapsed());
    }
    v
}

// ---------------------------------------------------------------------------
// GeoMessage.

fn gm_server(args: &[String]) {
    let ports = [
        arg(args, "--p0").unwrap().parse().unwrap(),
        arg(args, "--p1").unwrap().parse().unwrap(),
    ];
    let encrypt = arg(args, "--encrypt").as_deref() != Some("0");
    let loss: u32 = arg(args, "--loss-ppm")
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    let dg: usize = arg(args, "--datagram")
        .and_then(|s| datagram_arg(&s))
        .expect("--datagram BYTES|auto");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The server answers from a task of its own, as gmdd's tasks do: a
    // future under `block_on` is polled only after the runtime looked at
    // its sockets once more (an extra `epoll_wait` per wake-up).
    rt.block_on(async move {
        let node = Node::start(gm_config(1, ports, encrypt, loss, dg)).expect("start server");
        let mut rx = node.register_stream(StreamId(1)).await.unwrap();
        tokio::spawn(async move {
            let _node = node;
            while let Some(inc) = rx.recv().await {
                if let Some(r) = inc.responder {
                    let _ = r
                        .reply(inc.body.slice(..inc.body.len().min(RTT_BYTES)))
                        .await;
                }
            }
        })
        .await
        .expect("server task");
    });
}

#[derive(Debug, Default)]
struct GmResult {
    bytes_per_sec: f64,
    resends: u64,
    timeouts: u64,
    injected: u64,
    /// The sender's datagram size at the end (discovered or set).
    datagram: usize,
}

/// Starts the client node, waits until the server answers, and runs the
/// case `f` in a task of its own (as gmdd's tasks run: a future under
/// `block_on` is polled only after the runtime looked at its sockets once
/// more, an extra `epoll_wait` per wake-up that no gmdd task pays).
fn gm_client<T, Fut>(
    ports: [u16; 2],
    encrypt: bool,
    loss: u32,
    dg: usize,
    f: impl FnOnce(Arc<Node>, gmd_net::PeerId) -> Fut + Send + 'static,
) -> (Option<T>, gmd_net::Stats)
where
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let node =
            Arc::new(Node::start(gm_config(0, ports, encrypt, loss, dg)).expect("start client"));
        let peer = node.peer("bench1").unwrap();
        // Wait until the server answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout(
                Duration::from_millis(500),
                node.request(peer, StreamId(1), Bytes::from_static(b"hi")),
            )
            .await
            {
                Ok(Ok(_)) => break,
                _ if Instant::now() < deadline => continue,
                _ => panic!("server did not answer"),
            }
        }
        let before = node.stats().await.unwrap();
        // A case that does not finish in time is reported, not fatal (a
        // slow case across an emulated WAN must not hide the others).
        let r = tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, f(node.clone(), peer)))
            .await
            .expect("case task")
            .ok();
        if r.is_none() {
            eprintln!("  (case timed out after {CASE_TIMEOUT:?}; reported as 0)");
        }
        let st = node.stats().await.unwrap().since(&before);
        node.shutdown().await;
        (r, st)
    })
}

/// Prints, after `what` (GMD_BENCH_VERBOSE), the first path's window, bytes
/// in flight, RTT and losses.
async fn show_progress(node: &Node, start: Instant, what: &str) {
    let st = node.stats().await.unwrap();
    let (p, n) = (&st.paths[0], &st.networks[0]);
    eprintln!(
        "{:>6.3}s {what}: cwnd {} in flight {} srtt {:?} rto {:?} resends {} timeouts {}",
        start.elapsed().as_secs_f64(),
        p.cwnd_bytes,
        p.in_flight_bytes,
        p.srtt,
        p.rto,
        n.resends,
        n.timeouts
    );
}

fn gm_bulk(encrypt: bool, loss: u32, dg: usize, total: usize) -> GmResult {
    let ports = [free_port(), free_port()];
    let _server = spawn(&[
        "gm-server",
        "--p0",
        &ports[0].to_string(),
        "--p1",
        &ports[1].to_string(),
        "--encrypt",
        if encrypt { "1" } else { "0" },
        "--loss-ppm",
        &loss.to_string(),
        "--datagram",
        &dg.to_string(),
    ]);
    let msg = Bytes::from(vec![0x5a; MESSAGE_BYTES]);
    let (rate, st) = gm_client(
        ports,
        encrypt,
        loss,
        dg,
        move |node: Arc<Node>, peer| async move {
            let start = Instant::now();
            let verbose = std::env::var_os("GMD_BENCH_VERBOSE").is_some();
            for i in 0..total / MESSAGE_BYTES {
                node.send(peer, StreamId(1), msg.clone())
                    .await
                    .expect("send");
                if verbose && i % 64 == 0 {
                    show_progress(&node, start, &format!("msg {i}")).await;
                }
            }
            // Same ordered stream: the reply proves everything before it arrived.
            node.request(peer, StreamId(1), Bytes::from_static(b"done"))
                .await
                .expect("final");
            total as f64 / start.elapsed().as_secs_f64()
        },
    );
    GmResult {
        bytes_per_sec: rate.unwrap_or(0.0),
        resends: st.networks.iter().map(|n| n.resends).sum(),
        timeouts: st.networks.iter().map(|n| n.timeouts).sum(),
        injected: st.injected_losses,
        datagram: st.paths.first().map_or(0, |p| p.datagram_bytes),
    }
}

/// GeoMessage (encrypted) sends 1 MiB messages for `secs`, then a request
/// on the same ordered stream: bytes per second.
fn gm_bulk_for(dg: usize, secs: f64) -> f64 {
    let ports = [free_port(), free_port()];
    let _server = spawn(&[
        "gm-server",
        "--p0",
        &ports[0].to_string(),
        "--p1",
        &ports[1].to_string(),
        "--datagram",
        &dg.to_string(),
    ]);
    let msg = Bytes::from(vec![0x5a; MESSAGE_BYTES]);
    let (rate, _) = gm_client(
        ports,
        true,
        0,
        dg,
        move |node: Arc<Node>, peer| async move {
            // Connected (gm_client waited for an answer): start now.
            let start = Instant::now();
            let mut sent = 0usize;
            let verbose = std::env::var_os("GMD_BENCH_VERBOSE").is_some();
            let mut shown = 0.0;
            while start.elapsed().as_secs_f64() < secs {
                node.send(peer, StreamId(1), msg.clone())
                    .await
                    .expect("send");
                sent += MESSAGE_BYTES;
                if verbose && start.elapsed().as_secs_f64() >= shown {
                    shown += 0.5;
                    show_progress(&node, start, &format!("{} MiB", sent >> 20)).await;
                }
            }
            node.request(peer, StreamId(1), Bytes::from_static(b"done"))
                .await
                .expect("final");
            sent as f64 / start.elapsed().as_secs_f64()
        },
    );
    rate.unwrap_or(0.0)
}

/// `fair --secs S --link-mbit R`: a TCP stream and a GeoMessage stream on
/// the same link at once for S seconds; prints each one's rate and share
/// of the link.
fn fair(args: &[String]) {
    let secs: f64 = arg(args, "--secs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(20.0);
    let link: f64 = arg(args, "--link-mbit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200.0)
        * 1e6
        / 8.0;
    let dg: usize = arg(args, "--datagram")
        .and_then(|s| datagram_arg(&s))
        .unwrap_or(1400);
    let tcp_port = free_port();
    let _tcp = spawn(&["tcp-server", "--port", &tcp_port.to_string()]);
    let gm = std::thread::spawn(move || gm_bulk_for(dg, secs));
    let tcp = tcp_bulk_for(tcp_port, secs);
    let gm = gm.join().expect("geomsg thread");
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "  fair share, {secs} s together: tcp {:.1} MiB/s ({:.2} of the link), geomsg {:.1} MiB/s ({:.2} of the link)",
        mib(tcp),
        tcp / link,
        mib(gm),
        gm / link
    );
    println!(
        "figures: fair_tcp_link={:.3} fair_geomsg_link={:.3}",
        tcp / link,
        gm / link
    );
}

fn gm_rtt(dg: usize) -> Vec<Duration> {
    let ports = [free_port(), free_port()];
    let _server = spawn(&[
        "gm-server",
        "--p0",
        &ports[0].to_string(),
        "--p1",
        &ports[1].to_string(),
        "--datagram",
        &dg.to_string(),
    ]);
    let body = Bytes::from(vec![7u8; RTT_BYTES]);
    gm_client(
        ports,
        true,
        0,
        dg,
        move |node: Arc<Node>, peer| async move {
            let mut v = Vec::with_capacity(opts().rtt_rounds);
            for _ in 0..opts().rtt_rounds {
                let t = Instant::now();
                node.request(peer, StreamId(1), body.clone())
                    .await
                    .expect("rtt");
                v.push(t.elapsed());
            }
            v
        },
    )
    .0
    .expect("round trips timed out")
}

/// TCP ping-pong against the server on `tcp_port`, then GeoMessage
/// request/reply: (p50, p99) of each, TCP first.
fn round_trips(tcp_port: u16, dg: usize) -> [(Duration, Duration); 2] {
    let mut tr = tcp_rtt(tcp_port);
    let mut gr = gm_rtt(dg);
    [
        (pct(&mut tr, 0.5), pct(&mut tr, 0.99)),
        (pct(&mut gr, 0.5), pct(&mut gr, 0.99)),
    ]
}

/// Round trips only: TCP ping-pong then GeoMessage request/reply of
/// [`RTT_BYTES`], `--repeat` times, each with p50, p99 and their ratios.
fn rtt(args: &[String]) {
    let dg: usize = arg(args, "--datagram")
        .and_then(|s| datagram_arg(&s))
        .unwrap_or(65_000);
    let repeat: usize = arg(args, "--repeat")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let tcp_port = free_port();
    let _tcp = spawn(&["tcp-server", "--port", &tcp_port.to_string()]);
    println!(
        "round trips of {RTT_BYTES} B x {}, {repeat} times: TCP ping-pong, then GeoMessage request/reply",
        opts().rtt_rounds
    );
    for r in 0..repeat {
        let [(t50, t99), (g50, g99)] = round_trips(tcp_port, dg);
        println!(
            "  run {r}: tcp p50 {t50:?} p99 {t99:?}; geomsg p50 {g50:?} p99 {g99:?}; ratio p50 {:.2}x p99 {:.2}x",
            g50.as_secs_f64() / t50.as_secs_f64(),
            g99.as_secs_f64() / t99.as_secs_f64()
        );
    }
}

fn median(mut v: Vec<GmResult>) -> GmResult {
    v.sort_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    v.swap_remove(v.len() / 2)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn all(args: &[String]) {
    let gib: f64 = arg(args, "--gib")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let dg: usize = arg(args, "--datagram")
        .and_then(|s| datagram_arg(&s))
        .unwrap_or(65_000);
    let total = ((gib * (1u64 << 30) as f64) as usize / MESSAGE_BYTES).max(1) * MESSAGE_BYTES;
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "GeoMessage vs TCP, {} -> {}: {} MiB in 1 MiB messages, datagram {}",
        opts().addr0,
        opts().addr1,
        total >> 20,
        if dg == 0 {
            "discovered per path".to_string()
        } else {
            format!("{dg} bytes")
        }
    );

    let repeat: usize = arg(args, "--repeat")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("  each bulk case runs {repeat} times, interleaved; the median is reported");
    let tcp_port = free_port();
    let _tcp = spawn(&["tcp-server", "--port", &tcp_port.to_string()]);
    let mut runs: [Vec<GmResult>; 4] = Default::default();
    for r in 0..repeat {
        runs[0].push(GmResult {
            bytes_per_sec: tcp_bulk(tcp_port, total),
            resends: 0,
            timeouts: 0,
            injected: 0,
            datagram: 0,
        });
        runs[1].push(gm_bulk(true, 0, dg, total));
        runs[2].push(gm_bulk(false, 0, dg, total));
        runs[3].push(if args.iter().any(|a| a == "--no-injected-loss") {
            GmResult::default()
        } else {
            gm_bulk(true, 10_000, dg, total)
        });
        let show: Vec<String> = runs
            .iter()
            .map(|v| format!("{:.0}", mib(v[r].bytes_per_sec)))
            .collect();
        println!(
            "  run {r}: tcp / enc / auth / enc+1% loss MiB/s: {}",
            show.join(" / ")
        );
    }
    let [tcp, gm0, gm0p, gm1] = runs.map(median);
    let tcp = tcp.bytes_per_sec;
    println!("  tcp bulk                   {:>9.1} MiB/s", mib(tcp));
    println!(
        "  geomsg bulk, 0% loss, enc  {:>9.1} MiB/s  resends {} timeouts {} datagrams {} bytes",
        mib(gm0.bytes_per_sec),
        gm0.resends,
        gm0.timeouts,
        gm0.datagram
    );
    println!(
        "  geomsg bulk, 0% loss, auth {:>9.1} MiB/s  resends {} timeouts {}",
        mib(gm0p.bytes_per_sec),
        gm0p.resends,
        gm0p.timeouts
    );
    println!(
        "  geomsg bulk, 1% loss, enc  {:>9.1} MiB/s  resends {} timeouts {} (client-side injected drops {})",
        mib(gm1.bytes_per_sec),
        gm1.resends,
        gm1.timeouts,
        gm1.injected
    );
    println!(
        "figures: tcp_Bps={:.0} geomsg_Bps={:.0} geomsg_auth_Bps={:.0}",
        tcp, gm0.bytes_per_sec, gm0p.bytes_per_sec
    );
    let [(t50, t99), (g50, g99)] = round_trips(tcp_port, dg);
    println!(
        "  rtt {RTT_BYTES} B x {}: tcp p50 {t50:?} p99 {t99:?}; geomsg p50 {g50:?} p99 {g99:?}",
        opts().rtt_rounds
    );
    println!();
    println!("| metric | GeoMessage | TCP | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| bulk 0% loss, encrypted (MiB/s) | {:.0} | {:.0} | {:.2}x | >= 1.0x |",
        mib(gm0.bytes_per_sec),
        mib(tcp),
        gm0.bytes_per_sec / tcp
    );
    println!(
        "| bulk 0% loss, auth only (MiB/s) | {:.0} | {:.0} | {:.2}x | >= 1.0x |",
        mib(gm0p.bytes_per_sec),
        mib(tcp),
        gm0p.bytes_per_sec / tcp
    );
    println!(
        "| bulk 1% loss vs own 0% (MiB/s) | {:.0} | {:.0} (own 0%) | {:.2}x | >= 0.7x |",
        mib(gm1.bytes_per_sec),
        mib(gm0.bytes_per_sec),
        gm1.bytes_per_sec / gm0.bytes_per_sec
    );
    println!(
        "| small RPC p50 (us) | {:.1} | {:.1} | {:.2}x | lower is better |",
        g50.as_secs_f64() * 1e6,
        t50.as_secs_f64() * 1e6,
        g50.as_secs_f64() / t50.as_secs_f64()
    );
    println!(
        "| small RPC p99 (us) | {:.1} | {:.1} | {:.2}x | lower is better |",
        g99.as_secs_f64() * 1e6,
        t99.as_secs_f64() * 1e6,
        g99.as_secs_f64() / t99.as_secs_f64()
    );
}

/// `crypto`: seal+open throughput of one datagram size on one thread, per
/// mode, and a 1 MiB copy, each for about half a second.
fn crypto(args: &[String]) {
    use gmd_net::crypto::{MasterKey, SessionIds};
    use gmd_net::wire::{HEADER_BYTES, TAG_BYTES};
    let dg: usize = arg(args, "--datagram")
        .and_then(|s| datagram_arg(&s))
        .unwrap_or(1400);
    assert!(dg > HEADER_BYTES + TAG_BYTES, "--datagram too small");
    let key = MasterKey::new(&[0x42; 32], 1).session(SessionIds {
        src_machine: 1,
        src_epoch: 2,
        dst_machine: 3,
        dst_epoch: 4,
    });
    let payload = (dg - HEADER_BYTES - TAG_BYTES) as f64;
    let mut line = format!("crypto: {dg}-byte datagrams, payload MiB/s on one thread:");
    for (name, encrypt) in [("aes-256-gcm", true), ("auth-only", false)] {
        let mut d = vec![7u8; dg];
        let (mut n, t0) = (0u64, Instant::now());
        while t0.elapsed() < Duration::from_millis(500) {
            for _ in 0..64 {
                key.seal(n, &mut d, encrypt);
                key.open(n, &mut d, encrypt).expect("own seal opens");
                n += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        line += &format!(
            " {name} seal+open {:.1} ({:.1} us/datagram)",
            n as f64 * payload / secs / (1 << 20) as f64,
            secs * 1e6 / n as f64
        );
    }
    let (src, mut dst) = (vec![1u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut n, t0) = (0u64, Instant::now());
    while t0.elapsed() < Duration::from_millis(500) {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        n += 1;
    }
    line += &format!(
        "; memcpy 1 MiB {:.0}",
        n as f64 / t0.elapsed().as_secs_f64()
    );
    println!("{line}");
}
