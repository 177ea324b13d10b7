//! Deterministic simulator runs of the sans-IO core: thousands of seeded
//! scenarios with latency, jitter, loss up to 30 %, duplication, reordering,
//! bandwidth limits, path failure and repair, partitions and restarts.
//!
//! A failing seed prints itself and replays exactly:
//! `GMD_SIM_SEED=1234 cargo nextest run -p gmd-net sim`.
//! `GMD_SIM_SEEDS=n` changes the number of seeds per shard (default 600).

use gmd_net::testing::sim::{Fault, Scenario, run_scenario, run_seed};

const SHARDS: u64 = 8;

fn seeds_per_shard() -> u64 {
    std::env::var("GMD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600)
}

fn run_shard(shard: u64) {
    if let Some(seed) = std::env::var("GMD_SIM_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        // Replay one seed (every shard runs it; they agree).
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
        return;
    }
    let n = seeds_per_shard();
    let mut delivered = 0;
    for i in 0..n {
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
