//! Test support: a deterministic network simulator driving the sans-IO core,
//! a seeded scenario runner with the protocol's properties as checks, and a
//! fault-injecting UDP relay for tests with real sockets.
//!
//! Enabled by the `test-support` feature; never used by production code.

pub mod relay;
pub mod sim;

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{InterfaceConfig, MachineConfig, NetConfig, NetworkConfig, Tuning};

/// A configuration for `machines` machines named `m0`, `m1`, … with one
/// interface per network at the given addresses (`addrs[machine][network]`).
pub fn cluster_config(
    local: usize,
    addrs: &[Vec<SocketAddr>],
    datagram_bytes: usize,
    promote_failure_timeout: Duration,
    encrypt: bool,
    tuning: Tuning,
) -> NetConfig {
    let networks = addrs.first().map_or(0, |a| a.len());
    NetConfig {
        cluster_name: "testcluster".into(),
        psk: (0u8..32).collect(),
        encrypt,
        local_machine: format!("m{local}"),
        machines: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| MachineConfig {
                name: format!("m{i}"),
                promote_failure_timeout,
                interfaces: a
                    .iter()
                    .enumerate()
                    .map(|(n, addr)| InterfaceConfig {
                        network: format!("net{n}"),
                        addr: *addr,
                    })
                    .collect(),
            })
            .collect(),
        networks: (0..networks)
            .map(|n| NetworkConfig {
                name: format!("net{n}"),
                datagram_bytes,
                discover: false,
            })
            .collect(),
        tuning,
    }
}
