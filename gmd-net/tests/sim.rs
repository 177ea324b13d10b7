//! Deterministic simulator runs of the sans-IO core: thousands of seeded
//! scenarios with latency, jitter, loss up to 30 %, duplication, reordering,
//! bandwidth limits, path failure and repair, partitions and restarts.
//!
//! A failing seed prints itself and replays exactly:
//! `GMD_SIM_SEED=1234 cargo nextest run -p gmd-net sim`.
//! `GMD_SIM_SEEDS=n` changes the number of seeds per shard (default 1000),
//! `GMD_SIM_SEED_START=k` where each shard starts (default 0).

use gmd_net::testing::sim::{Fault, Scenario, run_scenario, run_seed};

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
