//! Every rejection class of the security design, on the sans-IO core: forged,
//! replayed, truncated, wrong-cluster, wrong-key, bad-version, unknown-machine
//! and stale-epoch datagrams are dropped without effect and counted; plus a
//! property test feeding arbitrary bytes to the decoder and the endpoint.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gmd_net::proto::{Endpoint, Event};
use gmd_net::testing::cluster_config;
use gmd_net::wire::{self, HEADER_BYTES};
use gmd_net::{NetConfig, NetworkId, PeerId, StreamId, Tuning};
use proptest::prelude::*;

fn addrs() -> Vec<Vec<SocketAddr>> {
    vec![
        vec!["10.0.0.1:6755".parse().unwrap()],
        vec!["10.0.0.2:6755".parse().unwrap()],
    ]
}

fn config(local: usize) -> NetConfig {
    cluster_config(
        local,
        &addrs(),
        1400,
        Duration::from_secs(10),
        true,
        Tuning::default(),
    )
}

/// Moves every pending datagram from `from` to `to`; returns them too.
fn pump(now: Instant, from: &mut Endpoint, to: &mut Endpoint) -> Vec<Vec<u8>> {
    let mut buf = Vec::new();
    let mut all = Vec::new();
    while let Some(t) = from.poll_transmit(now, 1, &mut buf) {
        all.push(buf[..t.len].to_vec());
        to.handle_datagram(now, NetworkId(0), BytesMut::from(&buf[..t.len]));
    }
    all
}

/// Two endpoints with an established session and one captured data datagram
/// from A to B (not yet delivered).
struct Setup {
    now: Instant,
    a: Endpoint,
    b: Endpoint,
    data: Vec<u8>,
}

fn setup() -> Setup {
    let now = Instant::now();
    let mut a = Endpoint::new(&config(0), 100, 1, now).unwrap();
    let mut b = Endpoint::new(&config(1), 200, 2, now).unwrap();
    for _ in 0..3 {
        pump(now, &mut a, &mut b);
        pump(now, &mut b, &mut a);
    }
    assert!(
        a.is_peer_up(PeerId(1)) && b.is_peer_up(PeerId(0)),
        "handshake"
    );
    while b.poll_event().is_some() {}
    a.send(
        now,
        PeerId(1),
        StreamId(1),
        Bytes::from_static(b"secret payload"),
    )
    .unwrap();
    let mut buf = Vec::new();
    let t = a.poll_transmit(now, 1, &mut buf).expect("data datagram");
    Setup {
        now,
        a,
        b,
        data: buf[..t.len].to_vec(),
    }
}

/// Delivers `d` to B and asserts nothing happened but one counter moving.
fn assert_rejected(s: &mut Setup, d: &[u8], counter: fn(&gmd_net::SecurityStats) -> u64) {
    let before = s.b.stats();
    s.b.handle_datagram(s.now, NetworkId(0), BytesMut::from(d));
    let after = s.b.stats();
    assert_eq!(
        counter(&after.security),
        counter(&before.security) + 1,
        "counter did not move"
    );
    assert_eq!(
        after.rejected_total(),
        before.rejected_total() + 1,
        "exactly one rejection"
    );
    assert!(
        s.b.poll_event().is_none(),
        "a rejected datagram had an effect"
    );
    assert_eq!(
        after.networks[0].packets_received,
        before.networks[0].packets_received
    );
    assert_eq!(after.machines, before.machines);
}

fn delivered(s: &mut Setup) -> Vec<Bytes> {
    let mut v = Vec::new();
    while let Some(e) = s.b.poll_event() {
        if let Event::Message(d) = e {
            v.push(d.body);
        }
    }
    v
}

#[test]
fn genuine_datagram_is_accepted_and_encrypted() {
    let mut s = setup();
    assert!(
        !s.data.windows(14).any(|w| w == b"secret payload"),
        "payload visible on the wire"
    );
    let d = s.data.clone();
    s.b.handle_datagram(s.now, NetworkId(0), BytesMut::from(&d[..]));
    assert_eq!(
        delivered(&mut s),
        vec![Bytes::from_static(b"secret payload")]
    );
    assert_eq!(s.b.stats().rejected_total(), 0);
}

#[test]
fn truncated_is_rejected() {
    let mut s = setup();
    let d = s.data[..HEADER_BYTES + 3].to_vec();
    assert_rejected(&mut s, &d, |x| x.truncated);
    // Cut inside the payload: the tag no longer verifies.
    let d = s.data[..s.data.len() - 1].to_vec();
    assert_rejected(&mut s, &d, |x| x.bad_auth);
}

#[test]
fn bad_version_is_rejected() {
    let mut s = setup();
    let mut d = s.data.clone();
    d[0] = 9;
    assert_rejected(&mut s, &d, |x| x.bad_version);
}

#[test]
fn forged_payload_or_header_is_rejected() {
    let mut s = setup();
    let mut d = s.data.clone();
    let n = d.len();
    d[n - 20] ^= 0x40;
    assert_rejected(&mut s, &d, |x| x.bad_auth);
    let mut d = s.data.clone();
    d[40] ^= 1; // packet number
    assert_rejected(&mut s, &d, |x| x.bad_auth);
    // The genuine one still works afterwards.
    let d = s.data.clone();
    s.b.handle_datagram(s.now, NetworkId(0), BytesMut::from(&d[..]));
    assert_eq!(delivered(&mut s).len(), 1);
}

#[test]
fn replay_is_rejected() {
    let mut s = setup();
    let d = s.data.clone();
    s.b.handle_datagram(s.now, NetworkId(0), BytesMut::from(&d[..]));
    assert_eq!(delivered(&mut s).len(), 1);
    assert_rejected(&mut s, &d, |x| x.replayed);
    assert_eq!(s.b.stats().networks[0].duplicates, 1);
}

#[test]
fn wrong_cluster_is_rejected() {
    let mut s = setup();
    let mut other = config(0);
    other.cluster_name = "othercluster".into();
    let mut a2 = Endpoint::new(&other, 100, 1, s.now).unwrap();
    let mut buf = Vec::new();
    let t = a2.poll_transmit(s.now, 1, &mut buf).expect("hello");
    let d = buf[..t.len].to_vec();
    assert_rejected(&mut s, &d, |x| x.wrong_cluster);
}

#[test]
fn wrong_key_is_rejected() {
    let mut s = setup();
    let mut other = config(0);
    other.psk = vec![0xAA; 32];
    let mut a2 = Endpoint::new(&other, 100, 1, s.now).unwrap();
    let mut buf = Vec::new();
    let t = a2.poll_transmit(s.now, 1, &mut buf).expect("hello");
    let d = buf[..t.len].to_vec();
    assert_rejected(&mut s, &d, |x| x.bad_auth);
    // Encryption setting mismatch counts as a wrong key too.
    let mut plain = config(0);
    plain.encrypt = false;
    let mut a3 = Endpoint::new(&plain, 100, 1, s.now).unwrap();
    let t = a3.poll_transmit(s.now, 1, &mut buf).expect("hello");
    let d = buf[..t.len].to_vec();
    assert_rejected(&mut s, &d, |x| x.bad_auth);
}

#[test]
fn unknown_machine_is_rejected() {
    let mut s = setup();
    // A datagram from B to A delivered back to B: B is not its destination.
    let mut buf = Vec::new();
    s.b.send(s.now, PeerId(0), StreamId(1), Bytes::from_static(b"x"))
        .unwrap();
    let t = s.b.poll_transmit(s.now, 1, &mut buf).expect("datagram");
    let d = buf[..t.len].to_vec();
    assert_rejected(&mut s, &d, |x| x.unknown_machine);
}

#[test]
fn restarted_peer_is_recognised_and_old_data_never_delivered() {
    let mut s = setup();
    let old = s.data.clone();
    // A restarts with a larger epoch and reconnects.
    let mut a2 = Endpoint::new(&config(0), 300, 3, s.now).unwrap();
    for _ in 0..3 {
        pump(s.now, &mut a2, &mut s.b);
        pump(s.now, &mut s.b, &mut a2);
    }
    let evs: Vec<Event> = std::iter::from_fn(|| s.b.poll_event()).collect();
    assert!(
        evs.iter().any(|e| matches!(
            e,
            Event::PeerRestarted {
                peer: PeerId(0),
                epoch: 300
            }
        )),
        "no PeerRestarted in {evs:?}"
    );
    // The old incarnation's in-flight datagram arrives late: dropped, counted.
    assert_rejected(&mut s, &old, |x| x.stale_epoch);
    // New data flows.
    a2.send(s.now, PeerId(1), StreamId(1), Bytes::from_static(b"new"))
        .unwrap();
    pump(s.now, &mut a2, &mut s.b);
    assert_eq!(delivered(&mut s), vec![Bytes::from_static(b"new")]);
}

#[test]
fn restart_fails_outstanding_requests_with_peer_restarted() {
    let mut s = setup();
    let id =
        s.b.request(s.now, PeerId(0), StreamId(1), Bytes::from_static(b"q"))
            .unwrap();
    pump(s.now, &mut s.b, &mut s.a);
    let mut a2 = Endpoint::new(&config(0), 300, 3, s.now).unwrap();
    for _ in 0..3 {
        pump(s.now, &mut a2, &mut s.b);
        pump(s.now, &mut s.b, &mut a2);
    }
    let evs: Vec<Event> = std::iter::from_fn(|| s.b.poll_event()).collect();
    assert!(
        evs.iter().any(|e| matches!(e, Event::RequestFailed { request, error: gmd_net::NetError::PeerRestarted { .. }, .. } if *request == id)),
        "request not failed: {evs:?}"
    );
}

#[test]
fn peer_down_only_after_promote_failure_timeout() {
    let mut s = setup();
    let t0 = s.now;
    // Nothing arrives from A any more.
    let mut t = t0;
    let mut down_at = None;
    while t < t0 + Duration::from_secs(15) {
        t =
            s.b.poll_timeout()
                .unwrap_or(t + Duration::from_millis(100))
                .max(t + Duration::from_micros(1));
        s.b.handle_timeout(t);
        let mut buf = Vec::new();
        while s.b.poll_transmit(t, 1, &mut buf).is_some() {}
        while let Some(e) = s.b.poll_event() {
            if matches!(e, Event::PeerDown { peer: PeerId(0) }) && down_at.is_none() {
                down_at = Some(t);
            }
        }
    }
    let down_at = down_at.expect("peer down never fired");
    assert!(
        down_at >= t0 + Duration::from_secs(10),
        "fired early: {:?}",
        down_at - t0
    );
    assert!(
        down_at <= t0 + Duration::from_millis(10_010),
        "fired late: {:?}",
        down_at - t0
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// The decoder never panics on arbitrary input.
    #[test]
    fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = wire::Header::decode(&data);
        let _ = wire::validate_payload(&data);
        for f in wire::frames(&data) {
            if let Ok(wire::Frame::Ack(a)) = f {
                for _ in a.ranges() {}
            }
        }
    }

    /// Arbitrary datagrams (also mutations of a genuine one) never panic the
    /// endpoint and never deliver anything.
    #[test]
    fn endpoint_survives_garbage(data in proptest::collection::vec(any::<u8>(), 0..200), flip in 0usize..2000, keep_header in any::<bool>()) {
        let now = Instant::now();
        let mut b = Endpoint::new(&config(1), 200, 2, now).unwrap();
        let mut d = data.clone();
        if keep_header {
            let mut a = Endpoint::new(&config(0), 100, 1, now).unwrap();
            let mut buf = Vec::new();
            let t = a.poll_transmit(now, 1, &mut buf).unwrap();
            d = buf[..t.len].to_vec();
            let i = flip % d.len();
            d[i] ^= 1 << (flip % 8);
        }
        b.handle_datagram(now, NetworkId(0), BytesMut::from(&d[..]));
        let st = b.stats();
        prop_assert_eq!(st.rejected_total(), 1);
        prop_assert!(std::iter::from_fn(|| b.poll_event()).next().is_none());
    }
}
