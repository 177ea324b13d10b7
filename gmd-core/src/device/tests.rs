//! Lifecycle and start rules of one device, on real files.

use super::*;
use crate::statemap::cells::CELL_STALE;
use std::os::unix::fs::FileExt;

const EXAMPLE: &str = include_str!("../../../examples/loopback.toml");

struct Site {
    dir: tempfile::TempDir,
    config: ClusterConfig,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, EXAMPLE.replace("256MiB", "64MiB")).unwrap();
    std::fs::create_dir_all(dir.path().join("alpha")).unwrap();
    File::create(dir.path().join("alpha/data10.img"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let config = ClusterConfig::load(&path).unwrap();
    Site { dir, config }
}

fn handle(s: &Site) -> DeviceHandle {
    DeviceHandle::new(&s.config, "alpha", "data10gmd").unwrap()
}

fn beta(reachable: bool) -> PeerView {
    PeerView {
        machine: "beta".into(),
        reachable,
        available: reachable,
        starting: false,
        role: PairRole::Secondary,
        facts: None,
    }
}

#[test]
fn full_lifecycle_with_the_peer_recorded_down() {
    let s = site();
    let mut dev = handle(&s);
    let err = dev.configure().unwrap_err();
    assert!(err.message.contains("gmdctl init-state data10gmd"), "{err}");
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap();
    dev.configure().unwrap();
    assert_eq!(dev.state(), AdminState::Stopped);
    let err = dev
        .start(&[beta(false)], &StartOptions::default())
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Refused);
    assert!(err.message.contains("gmdctl down data10gmd beta"), "{err}");
    dev.down(&s.config, "beta").unwrap();
    dev.start(&[beta(false)], &StartOptions::default()).unwrap();
    assert_eq!(dev.state(), AdminState::Available);
    assert!(dev.runtime().is_some());
    // Recording a peer down works while AVAILABLE too (failover).
    dev.down(&s.config, "beta").unwrap();
    assert_eq!(dev.peers_down(), vec!["beta".to_string()]);
    let err = dev.stop(1).unwrap_err();
    assert!(err.message.contains("in use"), "{err}");
    dev.stop(0).unwrap();
    dev.unconfigure().unwrap();
    assert_eq!(dev.state(), AdminState::Defined);
    // The down record survives.
    dev.configure().unwrap();
    assert_eq!(dev.peers_down(), vec!["beta".to_string()]);
}

#[test]
fn wrong_states_and_unknown_peers_are_refused_with_the_way_out() {
    let s = site();
    let mut dev = handle(&s);
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap();
    assert!(
        dev.start(&[], &StartOptions::default())
            .unwrap_err()
            .message
            .contains("gmdctl configure")
    );
    assert!(dev.stop(0).is_err());
    assert!(dev.unconfigure().is_err());
    let err = dev.down(&s.config, "gamma").unwrap_err();
    assert_eq!(err.class, ErrorClass::NotFound);
    assert!(err.message.contains("remote peers are: beta"), "{err}");
    dev.configure().unwrap();
    assert!(dev.update_config(&s.config).is_err());
    let err = dev
        .init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, true)
        .unwrap_err();
    assert!(err.message.contains("DEFINED"), "{err}");
    let err = DeviceHandle::new(&s.config, "alpha", "nosuch").unwrap_err();
    assert_eq!(err.class, ErrorClass::NotFound);
}

#[test]
fn start_rules_against_the_peer() {
    let s = site();
    let mut dev = handle(&s);
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Zeroed, false)
        .unwrap();
    dev.configure().unwrap();
    let starting = PeerView {
        starting: true,
        ..beta(true)
    };
    assert!(
        dev.start(&[starting], &StartOptions::default())
            .unwrap_err()
            .message
            .contains("is starting")
    );
    let stopped = PeerView {
        available: false,
        ..beta(true)
    };
    assert!(
        dev.start(&[stopped], &StartOptions::default())
            .unwrap_err()
            .message
            .contains("not AVAILABLE on remote peer beta")
    );
    // Divergence: both sides wrote alone from the same data.
    dev.dirty().unwrap();
    let mut theirs = dev.side_facts().unwrap();
    theirs.machine = "beta".into();
    let dirty_peer = PeerView {
        facts: Some(theirs.clone()),
        ..beta(true)
    };
    let err = dev
        .start(&[dirty_peer], &StartOptions::default())
        .unwrap_err();
    assert!(err.message.contains("divergence"), "{err}");
    assert!(
        err.message.contains("gmdctl unify data10gmd --master"),
        "{err}"
    );
    // Stale marks here while the peer is available with the same data and
    // clean: this side is the source of the resync that follows.
    theirs.stale = 0;
    theirs.marked = 0;
    let clean_peer = PeerView {
        facts: Some(theirs),
        ..beta(true)
    };
    dev.start(&[clean_peer], &StartOptions::default()).unwrap();
    dev.stop(0).unwrap();
    dev.clean(true, true).unwrap();
    // More than one active remote peer.
    let gamma = PeerView {
        machine: "gamma".into(),
        ..beta(true)
    };
    let err = dev
        .start(&[beta(true), gamma], &StartOptions::default())
        .unwrap_err();
    assert!(err.message.contains("2 remote peers are active"), "{err}");
    assert_eq!(dev.state(), AdminState::Stopped);
}

#[test]
fn a_configured_primary_starts_as_secondary_where_primary_is_not_safe() {
    let s = site();
    let path = s.config.path.clone();
    crate::config::set_device_attributes(
        &path,
        "data10gmd",
        "alpha",
        &[("role".into(), "primary".into())],
    )
    .unwrap();
    let config = ClusterConfig::load(&path).unwrap();
    let mut dev = DeviceHandle::new(&config, "alpha", "data10gmd").unwrap();
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap();
    dev.configure().unwrap();
    // A copy without known data does not start as primary either.
    dev.down(&s.config, "beta").unwrap();
    dev.start(&[beta(false)], &StartOptions::default()).unwrap();
    assert_eq!(dev.role(), PairRole::Secondary);
    assert!(dev.role_note().unwrap().contains("holds no known data"));
    dev.stop(0).unwrap();
    dev.unconfigure().unwrap();
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Zeroed, true)
        .unwrap();
    dev.configure().unwrap();
    let primary = PeerView {
        role: PairRole::Primary,
        ..beta(true)
    };
    dev.start(&[primary], &StartOptions::default()).unwrap();
    assert_eq!(dev.role(), PairRole::Secondary, "one primary per pair");
    assert!(dev.role_note().unwrap().contains("beta is primary"));
    dev.stop(0).unwrap();
    dev.start(&[beta(true)], &StartOptions::default()).unwrap();
    assert_eq!(dev.role(), PairRole::Primary, "the configured role");
}

fn damage_and_recover(damage: &[(u64, usize)]) {
    let s = site();
    let mut dev = handle(&s);
    let uuid = dev
        .init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap();
    let map_path = s.dir.path().join("alpha/data10.sm");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&map_path)
        .unwrap();
    for &(offset, len) in damage {
        f.write_all_at(&vec![0xaa; len], offset).unwrap();
    }
    drop(f);
    let err = dev.configure().unwrap_err();
    assert!(
        err.message.contains(&map_path.display().to_string()),
        "{err}"
    );
    assert!(err.message.contains("gmdctl dirty data10gmd"), "{err}");
    dev.dirty().unwrap();
    dev.configure().unwrap();
    assert_eq!(dev.uuid(), Some(uuid), "identity salvaged");
    let (_, cells) = dev.map_snapshot().unwrap();
    assert_eq!(cells.count_value(CELL_STALE), cells.region_count());
}

#[test]
fn a_map_with_a_destroyed_page_refuses_to_configure_until_dirtied() {
    // Both copies of page 0.
    damage_and_recover(&[(8192, 8192)]);
}

#[test]
fn a_map_with_destroyed_superblocks_refuses_to_configure_until_dirtied() {
    damage_and_recover(&[(0, 8192)]);
}

#[test]
fn data_volume_problems_say_how_to_fix_them() {
    let s = site();
    let dev = handle(&s);
    std::fs::remove_file(s.dir.path().join("alpha/data10.img")).unwrap();
    let err = dev
        .init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap_err();
    assert!(err.message.contains("truncate -s 67108864"), "{err}");
    File::create(s.dir.path().join("alpha/data10.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let err = dev
        .init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap_err();
    assert!(err.message.contains("configured size is 67108864"), "{err}");
}

#[test]
fn clean_needs_force_a_down_peer_and_a_stopped_device() {
    let s = site();
    let mut dev = handle(&s);
    dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
        .unwrap();
    dev.configure().unwrap();
    dev.dirty().unwrap();
    assert!(
        dev.clean(false, true)
            .unwrap_err()
            .message
            .contains("--force")
    );
    assert!(
        dev.clean(true, false)
            .unwrap_err()
            .message
            .contains("peer is up")
    );
    dev.down(&s.config, "beta").unwrap();
    dev.start(&[beta(false)], &StartOptions::default()).unwrap();
    assert!(
        dev.clean(true, true)
            .unwrap_err()
            .message
            .contains("stop the device")
    );
    dev.stop(0).unwrap();
    let cleared = dev.clean(true, true).unwrap();
    assert_eq!(cleared, dev.map_snapshot().unwrap().1.region_count());
    assert!(dev.map_snapshot().unwrap().1.is_clean());
}

#[test]
fn restore_returns_to_the_recorded_state() {
    let s = site();
    {
        let mut dev = handle(&s);
        dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Unknown, false)
            .unwrap();
        dev.configure().unwrap();
        dev.down(&s.config, "beta").unwrap();
        dev.start(&[beta(false)], &StartOptions::default()).unwrap();
        // Dropped while AVAILABLE, as when gmdd is killed.
    }
    let mut dev = handle(&s);
    assert_eq!(
        dev.restore(&[beta(false)], &StartOptions::default())
            .unwrap(),
        AdminState::Available
    );
    assert_eq!(dev.state(), AdminState::Available);
    dev.stop(0).unwrap();
    let mut again = handle(&s);
    drop(dev);
    assert_eq!(
        again
            .restore(&[beta(false)], &StartOptions::default())
            .unwrap(),
        AdminState::Stopped
    );
}

/// Rewrites both superblock copies of the map at `path` as format 1 wrote
/// them: version 1, no generations or role (bytes 1024..1072 zero).
fn make_format_1(path: &std::path::Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    for slot in 0..2u64 {
        let mut block = vec![0u8; 4096];
        file.read_exact_at(&mut block, slot * 4096).unwrap();
        if &block[..8] != b"GMDSMAP\0" {
            continue;
        }
        block[8..10].copy_from_slice(&1u16.to_le_bytes());
        block[1024..1072].fill(0);
        block[4092..].fill(0);
        let crc = crc32fast::hash(&block);
        block[4092..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&block, slot * 4096).unwrap();
    }
}

#[test]
fn a_device_restored_from_a_format_1_map_takes_its_configured_role() {
    let s = site();
    let path = s.config.path.clone();
    crate::config::set_device_attributes(
        &path,
        "data10gmd",
        "alpha",
        &[("role".into(), "primary".into())],
    )
    .unwrap();
    let config = ClusterConfig::load(&path).unwrap();
    let map = config.devices["data10gmd"].machines["alpha"]
        .state_map
        .clone();
    {
        let mut dev = DeviceHandle::new(&config, "alpha", "data10gmd").unwrap();
        dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Zeroed, false)
            .unwrap();
        dev.configure().unwrap();
        dev.down(&config, "beta").unwrap();
        dev.start(&[beta(false)], &StartOptions::default()).unwrap();
        assert_eq!(dev.role(), PairRole::Primary);
        // Demoted online, then dropped while AVAILABLE (gmdd killed).
        dev.set_role(PairRole::Secondary, false).unwrap();
    }
    // Format 2 recorded the demotion: restored as secondary.
    {
        let mut dev = DeviceHandle::new(&config, "alpha", "data10gmd").unwrap();
        dev.restore(&[beta(false)], &StartOptions::default())
            .unwrap();
        assert_eq!(dev.role(), PairRole::Secondary, "the recorded role");
    }
    // The map as the gmd before roles wrote it: no role recorded, so the
    // configured primary it ran as comes back primary.
    make_format_1(&map);
    let mut dev = DeviceHandle::new(&config, "alpha", "data10gmd").unwrap();
    assert_eq!(
        dev.restore(&[beta(false)], &StartOptions::default())
            .unwrap(),
        AdminState::Available
    );
    assert_eq!(dev.role(), PairRole::Primary, "the configured role");
    assert_eq!(dev.role_note(), None);
}

#[test]
fn a_restore_does_not_wait_for_a_peer_restoring_at_the_same_moment() {
    let s = site();
    {
        let mut dev = handle(&s);
        dev.init_state(uuid::Uuid::from_u128(42), NewVolume::Zeroed, false)
            .unwrap();
        dev.configure().unwrap();
        dev.start(&[beta(true)], &StartOptions::default()).unwrap();
        // Dropped while AVAILABLE and mirroring (beta not recorded down).
    }
    let starting = PeerView {
        available: false,
        starting: true,
        ..beta(true)
    };
    let stopped = PeerView {
        available: false,
        ..beta(true)
    };
    // A restore (both daemons restarting at once) goes on: the device
    // comes back and connects once the peer is there.
    for peer in [starting.clone(), stopped] {
        let mut dev = handle(&s);
        assert_eq!(
            dev.restore(&[peer], &StartOptions::default()).unwrap(),
            AdminState::Available
        );
        assert_eq!(dev.role(), PairRole::Secondary);
    }
    // A start by the administrator is still refused while the peer starts.
    let mut dev = handle(&s);
    dev.configure().unwrap();
    let err = dev
        .start(&[starting], &StartOptions::default())
        .unwrap_err();
    assert!(err.message.contains("is starting the device"), "{err}");
}
