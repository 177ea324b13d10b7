//! Deterministic simulator runs of the sans-IO core: thousands of seeded
//! scenarios with latency, jitter, loss up to 30 %, duplication, reordering,
//! bandwidth limits, path failure and repair, partitions and restarts.
//!
//! A failing seed prints itself and replays exactly:
//! `GMD_SIM_SEED=1234 cargo nextest run -p gmd-net sim`.
//! `GMD_SIM_SEEDS=n` changes the number of seeds per shard (default 1000),
//! `GMD_SIM_SEED_START=k` where each shard starts (default 0).

use std::time::Duration;

use gmd_net::testing::sim::{Fault, LinkParams, Scenario, Sim, run_scenario, run_seed};

fn seeds_per_shard() -> u64 {
    std::env::var("GMD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn run_shard(shard: u64) {
    if let Some(seed) = std::env::var("GMD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        // Replay one seed (every shard runs it; they agree).
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
        return;
    }
    let n = seeds_per_shard();
    // `GMD_SIM_SEED_START=k` explores seeds k.. of every shard instead of 0..
    let first: u64 = std::env::var("GMD_SIM_SEED_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut delivered = 0;
    for i in first..first + n {
        let seed = shard * 1_000_000 + i;
        match run_seed(seed) {
            Ok(s) => delivered += s.delivered,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(delivered > 0, "no message was delivered in {n} seeds");
}

#[test]
fn sim_seeds_0() {
    run_shard(0);
}
#[test]
fn sim_seeds_1() {
    run_shard(1);
}
#[test]
fn sim_seeds_2() {
    run_shard(2);
}
#[test]
fn sim_seeds_3() {
    run_shard(3);
}
#[test]
fn sim_seeds_4() {
    run_shard(4);
}
#[test]
fn sim_seeds_5() {
    run_shard(5);
}
#[test]
fn sim_seeds_6() {
    run_shard(6);
}
#[test]
fn sim_seeds_7() {
    run_shard(7);
}

/// Every fault at the worst loss rate, on three networks, explicitly (the
/// random shards cover them too, but not necessarily at 30 % loss).
#[test]
fn sim_each_fault_at_30_percent_loss() {
    let faults = [
        Fault::None,
        Fault::PathFailure,
        Fault::ShortPartition,
        Fault::LongPartition,
        Fault::LongPartitionNeverDown,
        Fault::Restart,
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        let mut sc = Scenario::from_seed(9_000_000 + i as u64);
        sc.fault = fault;
        sc.networks = 3;
        sc.links = vec![sc.links[0]; 3];
        for l in &mut sc.links {
            l.loss = 0.30;
            l.duplicate = 0.05;
        }
        if fault == Fault::LongPartitionNeverDown {
            sc.promote = std::time::Duration::ZERO;
        } else if sc.promote.is_zero() {
            sc.promote = std::time::Duration::from_secs(4);
        }
        sc.fault_for = match fault {
            Fault::ShortPartition | Fault::PathFailure => sc.promote / 6,
            Fault::LongPartition | Fault::LongPartitionNeverDown => {
                std::time::Duration::from_secs(9)
            }
            _ => sc.fault_for,
        };
        if let Err(e) = run_scenario(sc) {
            panic!("{e}");
        }
    }
}

/// 4 MiB messages, fragmented into 1200-byte datagrams, across loss and
/// reordering.
#[test]
fn sim_four_mib_messages() {
    let mut sc = Scenario::from_seed(9_100_000);
    sc.fault = Fault::PathFailure;
    sc.networks = 2;
    sc.links = vec![sc.links[0]; 2];
    for l in &mut sc.links {
        l.loss = 0.05;
        l.jitter = l.latency / 2;
        l.bandwidth_bytes_per_sec = 0;
    }
    sc.datagram_bytes = 1200;
    sc.size_max = 4 << 20;
    sc.messages = 12;
    sc.machines = 2;
    sc.large_fraction = 0.5;
    let st = run_scenario(sc).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        st.largest_delivered_bytes > 1 << 20,
        "no large message was delivered: {st:?}"
    );
}

/// A long session of small ordered messages through the smallest windows: the
/// receiver must give every receive slot back, or it refuses all data once
/// the slots an honest sender could use have leaked away.
#[test]
fn sim_long_session_gives_back_receive_slots() {
    let mut sc = Scenario::from_seed(9_200_000);
    sc.fault = Fault::None;
    sc.machines = 2;
    sc.networks = 1;
    sc.links.truncate(1);
    sc.links[0].loss = 0.0;
    sc.links[0].duplicate = 0.0;
    sc.links[0].bandwidth_bytes_per_sec = 0;
    sc.size_max = 64;
    sc.large_fraction = 0.0;
    sc.messages = 20_000;
    sc.release_delay = std::time::Duration::ZERO;
    let st = run_scenario(sc).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        st.delivered >= 2 * 20_000,
        "not every message of the long session arrived: {st:?}"
    );
}

/// One run of the loopback test `traffic_moves_to_the_other_path_when_one_is_cut`
/// in the simulator: A sends 150 requests of 32 KiB on stream 1, B echoes;
/// after 50 replies the path that carried them (net0, the first and
/// preferred one) is cut for good. Optionally net1 gets faster at that moment
/// (as under load), so the active path moves away from net0 while data is in
/// flight on it. Every request must still be answered over net1 within a
/// bounded time, and both sides must declare net0 down.
fn path_cut_run(seed: u64, net0: LinkParams, net1: LinkParams, net1_after_cut: Option<LinkParams>) {
    use bytes::Bytes;
    use gmd_net::proto::{Event, IncomingKind};
    use gmd_net::{NetworkId, PeerId, StreamId, Tuning};

    const REQUESTS: usize = 150;
    let tuning = Tuning {
        rto_min: Duration::from_millis(10),
        ping_interval: Duration::from_millis(100),
        path_timeouts_max: 3,
        ..Tuning::default()
    };
    let rto_max = tuning.rto_max;
    let mut sim = Sim::new(
        seed,
        2,
        2,
        8192,
        Duration::from_secs(30),
        seed % 2 == 0,
        tuning,
    );
    sim.set_network(0, net0);
    sim.set_network(1, net1);
    let start = sim.now;
    // Warm up: let the handshake finish and both paths be measured.
    while sim.now < start + Duration::from_millis(300) {
        sim.step(start + Duration::from_millis(300));
    }
    for m in 0..2 {
        sim.drain_events(m);
    }
    let mut next = 0usize;
    let mut replies = [false; REQUESTS];
    let mut done = 0usize;
    let mut cut_at = None;
    let mut path_down = [None; 2];
    let mut last_progress = (0usize, sim.now);
    let deadline = sim.now + Duration::from_secs(60);
    let ctx = |sim: &Sim| {
        format!(
            "seed {seed}, t={:?}, a={:?}, b={:?}",
            sim.elapsed(),
            sim.nodes[0].endpoint.stats().paths,
            sim.nodes[1].endpoint.stats().paths
        )
    };
    while done < REQUESTS || path_down.iter().any(Option::is_none) {
        while next < REQUESTS {
            let mut body = vec![(next % 251) as u8; 32 << 10];
            body[..4].copy_from_slice(&(next as u32).to_be_bytes());
            match sim.nodes[0]
                .endpoint
                .request(sim.now, PeerId(1), StreamId(1), Bytes::from(body))
            {
                Ok(_) => next += 1,
                Err(gmd_net::NetError::WouldBlock { .. }) => break,
                Err(e) => panic!("request failed: {e} ({})", ctx(&sim)),
            }
        }
        let now = sim.now;
        for (m, down) in path_down.iter_mut().enumerate() {
            for e in sim.drain_events(m) {
                match e {
                    Event::Message(d) => {
                        let IncomingKind::Request(to) = d.kind else {
                            panic!("unexpected one-way message")
                        };
                        sim.nodes[m].endpoint.release(d.credit);
                        sim.nodes[m].endpoint.reply(now, to, d.body).expect("reply");
                    }
                    Event::Reply { body, .. } => {
                        let i = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
                        assert!(!replies[i], "reply {i} twice ({})", ctx(&sim));
                        replies[i] = true;
                        done += 1;
                    }
                    Event::PathDown { network, .. } => {
                        assert_eq!(
                            network,
                            NetworkId(0),
                            "working path declared down ({})",
                            ctx(&sim)
                        );
                        assert!(cut_at.is_some(), "net0 down before the cut ({})", ctx(&sim));
                        down.get_or_insert(now);
                    }
                    Event::RequestFailed { error, .. } => {
                        panic!("request failed: {error} ({})", ctx(&sim))
                    }
                    Event::PeerDown { .. } | Event::PeerRestarted { .. } => {
                        panic!("session lost: {e:?} ({})", ctx(&sim))
                    }
                    _ => {}
                }
            }
        }
        if cut_at.is_none() && done >= 50 {
            sim.set_network_up(0, false);
            if let Some(l) = net1_after_cut {
                sim.set_network(1, l);
            }
            cut_at = Some(sim.now);
        }
        if done > last_progress.0 {
            last_progress = (done, sim.now);
        }
        if let Some(c) = cut_at {
            // The cut path is declared down after path_timeouts_max
            // backed-off timeouts, and nothing waits on it for longer.
            let bound = rto_max * 3 + Duration::from_secs(1);
            for (m, d) in path_down.iter().enumerate() {
                assert!(
                    d.is_some() || sim.now <= c + bound,
                    "machine {m} did not declare the cut net0 down ({})",
                    ctx(&sim)
                );
            }
            assert!(
                done == REQUESTS || sim.now <= last_progress.1 + bound,
                "after the cut of net0, stuck at {done}/{REQUESTS} replies since {:?} ({})",
                sim.now - last_progress.1,
                ctx(&sim)
            );
        }
        assert!(sim.now < deadline, "not finished in time ({})", ctx(&sim));
        sim.step(deadline);
    }
}

/// The cut path's packets vanish while the other path works; neither the
/// pings on the cut path (every 100 ms, less than its backed-off RTO) nor a
/// move of the active path to the other network may keep its in-flight data
/// from being resent there, or the cut path from being declared down.
#[test]
fn sim_cut_path_is_declared_down_and_its_data_moves() {
    let ms = Duration::from_millis;
    let slow = LinkParams {
        latency: ms(5),
        jitter: ms(10),
        ..LinkParams::default()
    };
    let fast = LinkParams {
        latency: ms(1),
        jitter: ms(1),
        ..LinkParams::default()
    };
    for seed in 0..8 {
        // Paths alike: whichever is active at the cut, net0's data in flight
        // (requests from A, replies from B) must move.
        path_cut_run(seed, slow, slow, None);
        // net1 gets faster at the cut: the active path moves while data is in
        // flight on net0.
        path_cut_run(100 + seed, slow, slow, Some(fast));
        // net1 a little slower (within the hysteresis band) before the cut.
        path_cut_run(
            200 + seed,
            slow,
            LinkParams {
                latency: ms(6),
                ..slow
            },
            Some(fast),
        );
    }
}

/// A receiver that stalls (a descheduled VM, a busy host) finds the
/// datagrams that arrived meanwhile waiting in its socket buffer and
/// acknowledges them late, out of order with those sent after the stall.
/// Nothing was lost. The sender declared them lost, resent them and slowed
/// down; the late acknowledgements prove every one of those losses
/// spurious, and the slowdown is undone.
/// Two machines on one network, 1 400-byte datagrams, encrypted, default
/// tuning.
fn pair(seed: u64) -> Sim {
    Sim::new(
        seed,
        2,
        1,
        1400,
        Duration::from_secs(30),
        true,
        gmd_net::Tuning::default(),
    )
}

/// A sender of one 16 KiB message every `every` on stream 1 from machine 0
/// to machine 1, which releases each as it arrives.
struct Paced {
    start: std::time::Instant,
    every: Duration,
    sent: u64,
    received: u64,
}

impl Paced {
    fn new(sim: &Sim, every: Duration) -> Paced {
        Paced {
            start: sim.now,
            every,
            sent: 0,
            received: 0,
        }
    }

    /// Runs the simulation until `until`; panics if the session is lost.
    fn run(&mut self, sim: &mut Sim, until: std::time::Instant) {
        use bytes::Bytes;
        use gmd_net::proto::Event;
        use gmd_net::{PeerId, StreamId};
        while sim.now < until {
            while self.start + self.every * self.sent as u32 <= sim.now {
                let body = Bytes::from(vec![(self.sent % 251) as u8; 16 << 10]);
                match sim.nodes[0]
                    .endpoint
                    .send(sim.now, PeerId(1), StreamId(1), body)
                {
                    Ok(()) => self.sent += 1,
                    Err(gmd_net::NetError::WouldBlock { .. }) => break,
                    Err(e) => panic!("send failed: {e}"),
                }
            }
            for e in sim.drain_events(1) {
                if let Event::Message(d) = e {
                    assert_eq!(d.body[0], (self.received % 251) as u8, "out of order");
                    self.received += 1;
                    sim.nodes[1].endpoint.release(d.credit);
                }
            }
            for e in sim.drain_events(0) {
                assert!(
                    !matches!(e, Event::PeerDown { .. } | Event::PeerRestarted { .. }),
                    "session lost: {e:?}"
                );
            }
            sim.step(until.min(self.start + self.every * self.sent as u32));
        }
    }
}

#[test]
fn sim_a_stalled_receiver_loses_nothing_and_the_window_comes_back() {
    let ms = Duration::from_millis;
    let mut sim = pair(7);
    let link = LinkParams {
        latency: ms(10),
        bandwidth_bytes_per_sec: 5_000_000,
        ..LinkParams::default()
    };
    sim.set_network(0, link);
    // 16 KiB every 8 ms (2 MB/s, 40 % of the link): no standing queue.
    let mut tx = Paced::new(&sim, ms(8));
    let start = sim.now;
    tx.run(&mut sim, start + ms(1500));
    let path = |sim: &Sim| sim.nodes[0].endpoint.stats().paths[0].clone();
    let net = |sim: &Sim| sim.nodes[0].endpoint.stats().networks[0].clone();
    let before = path(&sim);
    let resends_before = net(&sim).resends;
    assert_eq!(before.undone_decreases, 0);
    // What is sent for 60 ms arrives 300 ms late, overtaken by what follows.
    sim.set_link(
        0,
        0,
        1,
        LinkParams {
            latency: ms(300),
            ..link
        },
    );
    tx.run(&mut sim, start + ms(1560));
    sim.set_link(0, 0, 1, link);
    tx.run(&mut sim, start + ms(1900));
    let after = path(&sim);
    let n = net(&sim);
    let resends = n.resends - resends_before;
    assert!(resends > 0, "the stall declared nothing lost: {n:?}");
    assert!(
        n.spurious >= resends * 9 / 10,
        "{} of {resends} resends proved spurious ({n:?})",
        n.spurious
    );
    assert!(after.undone_decreases >= 1, "nothing undone: {after:?}");
    assert!(
        after.cwnd_bytes >= before.cwnd_bytes,
        "window {} after the stall, {} before",
        after.cwnd_bytes,
        before.cwnd_bytes
    );
    assert!(tx.received > 0 && tx.received <= tx.sent);
}

/// A receiving host that is not scheduled for 200 ms (a TCG guest under a
/// busy hypervisor) acknowledges everything late, in order. Probe timeouts
/// send two probes each, not the whole flight again, and nothing is
/// declared lost, so the window stays.
#[test]
fn sim_a_receiver_host_stall_gets_probes_not_the_flight_again() {
    let ms = Duration::from_millis;
    let mut sim = pair(11);
    sim.set_network(
        0,
        LinkParams {
            latency: ms(5),
            bandwidth_bytes_per_sec: 10_000_000,
            ..LinkParams::default()
        },
    );
    // 16 KiB every 4 ms (4 MB/s): about 40 datagrams in flight.
    let mut tx = Paced::new(&sim, ms(4));
    let start = sim.now;
    tx.run(&mut sim, start + ms(1500));
    let net = |sim: &Sim| sim.nodes[0].endpoint.stats().networks[0].clone();
    let path = |sim: &Sim| sim.nodes[0].endpoint.stats().paths[0].clone();
    let before = net(&sim);
    let flight = path(&sim).in_flight_bytes / 1400;
    let cwnd = path(&sim).cwnd_bytes;
    assert!(flight >= 10, "too little in flight to tell: {flight}");
    sim.stall(1, sim.now + ms(200));
    tx.run(&mut sim, start + ms(2500));
    let n = net(&sim);
    let timeouts = n.timeouts - before.timeouts;
    let resends = n.resends - before.resends;
    assert!(timeouts >= 2, "the stall outlasted no timeout: {n:?}");
    assert!(
        resends <= 2 * timeouts,
        "{resends} resends for {timeouts} probe timeouts ({flight} in flight): {n:?}"
    );
    assert_eq!(
        n.spurious, before.spurious,
        "nothing should be declared lost"
    );
    assert!(path(&sim).cwnd_bytes >= cwnd, "the window shrank");
    assert!(
        tx.received + 8 >= tx.sent,
        "{} of {} arrived",
        tx.received,
        tx.sent
    );
}

/// Machine 0 sends 64 KiB messages to machine 1 as fast as the stream
/// takes them for `secs` of virtual time; returns the bytes delivered.
fn bulk(sim: &mut Sim, secs: Duration) -> u64 {
    use bytes::Bytes;
    use gmd_net::proto::Event;
    use gmd_net::{PeerId, StreamId};

    let end = sim.now + secs;
    let mut received = 0u64;
    while sim.now < end {
        while sim.nodes[0]
            .endpoint
            .send(
                sim.now,
                PeerId(1),
                StreamId(1),
                Bytes::from(vec![7u8; 64 << 10]),
            )
            .is_ok()
        {}
        for e in sim.drain_events(1) {
            if let Event::Message(d) = e {
                received += d.body.len() as u64;
                sim.nodes[1].endpoint.release(d.credit);
            }
        }
        sim.drain_events(0);
        sim.step(end);
    }
    received
}

#[test]
fn sim_deep_reordering_is_not_taken_for_loss() {
    let ms = Duration::from_millis;
    let mut sim = pair(11);
    let rate = 50_000_000u64;
    sim.set_network(
        0,
        LinkParams {
            latency: ms(1),
            jitter: ms(2),
            bandwidth_bytes_per_sec: rate,
            ..LinkParams::default()
        },
    );
    let received = bulk(&mut sim, ms(3000));
    let n = sim.nodes[0].endpoint.stats().networks[0].clone();
    assert!(
        n.resends * 100 <= n.packets_sent,
        "reordering taken for loss: {n:?}"
    );
    // Virtual time: half the link over 3 s, slow start included.
    assert!(
        received >= rate * 3 / 2,
        "{received} bytes in 3 s on a {rate} B/s link ({n:?})"
    );
}

/// Slow start on a long path with a drop-tail queue (the simulator's
/// 100 ms): it ends when the queue forms, not after a doubling window has
/// overfilled it, so the start loses (almost) nothing and the window does
/// not come out of it at twice what the path holds.
#[test]
fn sim_slow_start_ends_before_the_queue_overflows() {
    let ms = Duration::from_millis;
    let mut sim = pair(5);
    let rate = 12_500_000u64;
    sim.set_network(
        0,
        LinkParams {
            latency: ms(25),
            bandwidth_bytes_per_sec: rate,
            ..LinkParams::default()
        },
    );
    let received = bulk(&mut sim, ms(3000));
    let n = sim.nodes[0].endpoint.stats().networks[0].clone();
    let p = sim.nodes[0].endpoint.stats().paths[0].clone();
    // The path holds 50 ms × 12.5 MB/s = 625 kB plus a 1.25 MB queue.
    assert!(
        sim.dropped <= 10,
        "slow start overshot: {} dropped, {n:?}",
        sim.dropped
    );
    assert!(
        p.cwnd_bytes <= 2_000_000,
        "window {} after slow start",
        p.cwnd_bytes
    );
    // Virtual time: most of the link over 3 s, slow start included.
    assert!(
        received >= rate * 3 * 7 / 10,
        "{received} bytes in 3 s on a {rate} B/s link ({n:?})"
    );
}

/// A standby path is pinged while the active one carries traffic; the
/// peer's acknowledgements cover the whole session and go back on both
/// paths, so the ack of a standby ping often arrives first on the active
/// path. The standby path still counts as up soon: its packets arrive.
#[test]
fn sim_a_standby_path_comes_up_while_the_active_one_is_busy() {
    let ms = Duration::from_millis;
    let mut sim = Sim::new(
        3,
        2,
        2,
        1400,
        Duration::from_secs(30),
        true,
        gmd_net::Tuning::default(),
    );
    // The standby path is the slower one: acks on the active path win.
    for (n, latency) in [(0, ms(2)), (1, ms(20))] {
        sim.set_network(
            n,
            LinkParams {
                latency,
                bandwidth_bytes_per_sec: 10_000_000,
                ..LinkParams::default()
            },
        );
    }
    let mut tx = Paced::new(&sim, ms(2));
    let start = sim.now;
    let mut up_at = None;
    while sim.now < start + ms(3000) && up_at.is_none() {
        let until = sim.now + ms(50);
        tx.run(&mut sim, until);
        if sim.nodes[0].endpoint.stats().paths.iter().all(|p| p.up) {
            up_at = Some(sim.now - start);
        }
    }
    let up_at = up_at.expect("the standby path never came up in 3 s");
    assert!(up_at <= ms(1000), "both paths up only after {up_at:?}");
}

/// A passing message (`send_passing`) is delivered as soon as it arrives,
/// before an earlier message of its stream whose datagram was lost; the
/// ordinary message after it still waits for that one. Sent the ordinary
/// way, the same three arrive in order.
#[test]
fn sim_a_passing_message_goes_before_an_earlier_lost_one_and_the_next_waits() {
    use bytes::Bytes;
    use gmd_net::proto::Event;
    use gmd_net::{PeerId, StreamId};

    fn received(sim: &mut Sim, secs: u64, got: &mut Vec<u8>) {
        let end = sim.now + Duration::from_secs(secs);
        while sim.now < end {
            for e in sim.drain_events(1) {
                if let Event::Message(d) = e {
                    got.push(d.body[0]);
                    sim.nodes[1].endpoint.release(d.credit);
                }
            }
            sim.drain_events(0);
            sim.step(end);
        }
    }

    for passing in [false, true] {
        let mut sim = pair(5);
        let (to, stream) = (PeerId(1), StreamId(1));
        let mut got = Vec::new();
        sim.nodes[0]
            .endpoint
            .send(sim.now, to, stream, Bytes::from_static(b"0"))
            .expect("sent");
        received(&mut sim, 1, &mut got);
        assert_eq!(got, b"0", "the session is up");
        // A's datagram (and any resend of it) is lost.
        sim.set_network_up(0, false);
        sim.nodes[0]
            .endpoint
            .send(sim.now, to, stream, Bytes::from_static(b"A"))
            .expect("sent");
        sim.flush();
        let down_until = sim.now + Duration::from_millis(5);
        while sim.now < down_until {
            sim.step(down_until);
        }
        sim.set_network_up(0, true);
        let b = Bytes::from_static(b"B");
        if passing {
            sim.nodes[0].endpoint.send_passing(sim.now, to, stream, b)
        } else {
            sim.nodes[0].endpoint.send(sim.now, to, stream, b)
        }
        .expect("sent");
        sim.nodes[0]
            .endpoint
            .send(sim.now, to, stream, Bytes::from_static(b"C"))
            .expect("sent");
        received(&mut sim, 3, &mut got);
        let want: &[u8] = if passing { b"0BAC" } else { b"0ABC" };
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "passing {passing}"
        );
    }
}

/// Runs 16 KiB every 4 ms from machine 0 to 1 over a 10 ms link carrying
/// datagrams of at most `carries` bytes (0: any), for `secs`; returns the
/// sender's path and network statistics.
fn paced_over(
    sim: &mut Sim,
    carries: usize,
    secs: u64,
) -> (gmd_net::PathStats, gmd_net::NetworkStats) {
    sim.set_network(
        0,
        LinkParams {
            latency: Duration::from_millis(10),
            datagram_max: carries,
            ..LinkParams::default()
        },
    );
    let mut tx = Paced::new(sim, Duration::from_millis(4));
    let start = sim.now;
    tx.run(sim, start + Duration::from_secs(secs));
    assert!(
        tx.received + 8 >= tx.sent,
        "{} of {} arrived",
        tx.received,
        tx.sent
    );
    let st = sim.nodes[0].endpoint.stats();
    (st.paths[0].clone(), st.networks[0].clone())
}

/// Path-MTU discovery finds the largest datagram each path carries, within
/// 32 bytes and never above, and data then uses it: fewer datagrams for
/// the same messages. Lost probes resend no data. A fixed size never
/// probes.
#[test]
fn sim_discovery_finds_what_the_path_carries_and_data_uses_it() {
    let fixed = {
        let mut sim = pair(21);
        let (p, n) = paced_over(&mut sim, 0, 3);
        assert_eq!(p.mtu_probes, 0, "a fixed size probed: {p:?}");
        assert_eq!(p.datagram_bytes, 1400);
        n.packets_sent
    };
    for carries in [0, 1472, 3000, 1400] {
        let mut sim = pair(21);
        sim.discover_datagram_sizes();
        let (p, n) = paced_over(&mut sim, carries, 3);
        let limit = if carries == 0 {
            gmd_net::DISCOVERY_MAX
        } else {
            carries
        };
        assert!(
            p.datagram_bytes <= limit && p.datagram_bytes + 32 >= limit.max(1432),
            "carries {carries}: settled at {} ({p:?})",
            p.datagram_bytes
        );
        assert!(p.mtu_probes > 0, "carries {carries}: no probe");
        assert_eq!(n.resends, 0, "carries {carries}: lost probes resent data");
        assert_eq!(p.black_holes, 0);
        if carries == 0 {
            assert!(
                n.packets_sent * 3 < fixed,
                "8 972-byte datagrams: {} datagrams, 1 400-byte: {fixed}",
                n.packets_sent
            );
        }
    }
}

/// A path that stops carrying the datagrams discovery proved (a route
/// change to a tunnel, silently dropping them) is a black hole for every
/// full datagram: the size falls back to the base within seconds, the
/// session survives, every message arrives, and the search that starts
/// again a minute later keeps the size the path now carries.
#[test]
fn sim_a_black_hole_falls_back_to_the_base_and_loses_nothing() {
    let s = Duration::from_secs;
    let mut sim = pair(23);
    sim.discover_datagram_sizes();
    let link = LinkParams {
        latency: Duration::from_millis(10),
        ..LinkParams::default()
    };
    sim.set_network(0, link);
    let mut tx = Paced::new(&sim, Duration::from_millis(4));
    let start = sim.now;
    tx.run(&mut sim, start + s(2));
    let p = sim.nodes[0].endpoint.stats().paths[0].clone();
    assert_eq!(p.datagram_bytes, gmd_net::DISCOVERY_MAX);
    // From now on nothing above 1 400 bytes passes, either way.
    sim.set_network(
        0,
        LinkParams {
            datagram_max: 1400,
            ..link
        },
    );
    let start = sim.now;
    tx.run(&mut sim, start + s(3));
    assert!(
        tx.received + 40 >= tx.sent,
        "3 s after the change only {} of {} arrived",
        tx.received,
        tx.sent
    );
    let p = sim.nodes[0].endpoint.stats().paths[0].clone();
    assert_eq!(p.black_holes, 1, "{p:?}");
    assert_eq!(p.datagram_bytes, 1400);
    let probes = p.mtu_probes;
    tx.run(&mut sim, start + s(75));
    assert!(tx.received + 8 >= tx.sent);
    let p = sim.nodes[0].endpoint.stats().paths[0].clone();
    assert!(p.mtu_probes > probes, "no search after the black hole");
    assert_eq!(p.datagram_bytes, 1400, "{p:?}");
    assert_eq!(p.black_holes, 1, "{p:?}");
}

/// An outage is not a black hole: a path that carries nothing at all for a
/// while (large datagrams and small alike) times out and may go down, but
/// its size is not taken for too big; once it is back, the search proves
/// the size again, and every message arrives.
#[test]
fn sim_an_outage_is_not_taken_for_a_black_hole() {
    let s = Duration::from_secs;
    let mut sim = pair(29);
    sim.discover_datagram_sizes();
    sim.set_network(
        0,
        LinkParams {
            latency: Duration::from_millis(10),
            ..LinkParams::default()
        },
    );
    let mut tx = Paced::new(&sim, Duration::from_millis(4));
    let start = sim.now;
    tx.run(&mut sim, start + s(2));
    assert_eq!(
        sim.nodes[0].endpoint.stats().paths[0].datagram_bytes,
        gmd_net::DISCOVERY_MAX
    );
    for cut in [Duration::from_millis(300), s(3)] {
        sim.set_network_up(0, false);
        let at = sim.now;
        tx.run(&mut sim, at + cut);
        sim.set_network_up(0, true);
        let at = sim.now;
        tx.run(&mut sim, at + s(3));
        let p = sim.nodes[0].endpoint.stats().paths[0].clone();
        assert_eq!(
            p.black_holes, 0,
            "a {cut:?} outage taken for a black hole: {p:?}"
        );
        assert_eq!(
            p.datagram_bytes,
            gmd_net::DISCOVERY_MAX,
            "after {cut:?}: {p:?}"
        );
    }
    assert!(tx.received + 8 >= tx.sent, "{} of {}", tx.received, tx.sent);
}
