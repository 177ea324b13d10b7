//! Fuzzes the datagram decoder: header, frames and ACK ranges of arbitrary
//! bytes, and the endpoint's whole receive path (which must reject garbage
//! without panicking).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gmd_net::proto::Endpoint;
use gmd_net::wire;
use gmd_net::{InterfaceConfig, MachineConfig, NetConfig, NetworkId, Tuning};
use libfuzzer_sys::fuzz_target;

fn config() -> &'static NetConfig {
    static C: OnceLock<NetConfig> = OnceLock::new();
    C.get_or_init(|| {
        let m = |name: &str, addr: &str| MachineConfig {
            name: name.into(),
            promote_failure_timeout: Duration::from_secs(5),
            interfaces: vec![InterfaceConfig { network: "n".into(), addr: addr.parse().unwrap() }],
        };
        NetConfig {
            cluster_name: "fuzz".into(),
            psk: vec![7; 32],
            encrypt: false,
            local_machine: "b".into(),
            machines: vec![m("a", "10.0.0.1:1"), m("b", "10.0.0.2:1")],
            networks: vec![],
            tuning: Tuning::default(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // Pure decoding of arbitrary payloads (what an authenticated peer could send).
    let _ = wire::Header::decode(data);
    let _ = wire::validate_payload(data);
    for f in wire::frames(data) {
        match f {
            Ok(wire::Frame::Ack(a)) => for _ in a.ranges() {},
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The endpoint's receive path.
    let now = Instant::now();
    let mut ep = Endpoint::new(config(), 5, 1, now).expect("valid");
    ep.handle_datagram(now, NetworkId(0), BytesMut::from(data));
    assert!(ep.poll_event().is_none());
});
