//! The faults the simulator injects: each has a switch (a constant default,
//! overridden by an environment variable: `1` on, `0` off) and a probability.
//! Every fault is on by default.

use std::sync::OnceLock;

/// Chance that a local data write (the application's, the peer's, resync
/// data) fails with EIO, having written any subset of its blocks.
pub(crate) const DATA_EIO_PROBABILITY: f64 = 0.01;
/// Share of crashes that are power cuts (the rest are process crashes).
pub(crate) const POWER_CUT_SHARE: f64 = 0.5;
/// Chance that a map commit fails with EIO.
pub(crate) const MAP_EIO_PROBABILITY: f64 = 0.002;
/// Chance that a resync read fails with EIO.
pub(crate) const RESYNC_EIO_PROBABILITY: f64 = 0.01;
/// Chance that the engine's sync of the data volume (`Action::SyncData`,
/// a barrier's local part) fails with EIO.
pub(crate) const SYNC_EIO_PROBABILITY: f64 = 0.01;
/// Chance that a message on the wire survives a link loss (it is delivered
/// once the receiver is in a session again, and must be dropped there).
pub(crate) const OLD_MESSAGE_SURVIVAL: f64 = 0.3;
/// Chance that a delivery takes a passing message (one the sender let
/// pass earlier ones) from behind others on the wire, as GeoMessage does
/// when the datagrams of those before it were lost.
pub(crate) const PASS_CHANCE: f64 = 0.3;

/// One switch: its environment variable, its default and what it does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Switch {
    /// Environment variable: `1` turns it on, `0` off.
    pub(crate) env: &'static str,
    /// On unless the variable says otherwise.
    pub(crate) default: bool,
    /// One line for the run's summary.
    pub(crate) what: &'static str,
}

/// Local data writes fail with EIO now and then.
pub(crate) const DATA_EIO: Switch = Switch {
    env: "GMD_SIM_DATA_EIO",
    default: true,
    what: "local data writes fail with EIO",
};
/// Some crashes are power cuts, which lose the volatile write cache.
pub(crate) const POWER_CUT: Switch = Switch {
    env: "GMD_SIM_POWER_CUT",
    default: true,
    what: "power cuts drop unflushed writes",
};
/// Check (3d): a region neither durable map marks is durable on both sides.
pub(crate) const DURABLE_MARKS: Switch = Switch {
    env: "GMD_SIM_DURABLE_MARKS",
    default: true,
    what: "check (3d): unmarked regions are durable on both sides",
};
/// Map commits fail with EIO now and then; the administrator restarts the node.
pub(crate) const MAP_EIO: Switch = Switch {
    env: "GMD_SIM_MAP_EIO",
    default: true,
    what: "map commits fail with EIO",
};
/// Resync reads fail with EIO now and then.
pub(crate) const RESYNC_EIO: Switch = Switch {
    env: "GMD_SIM_RESYNC_EIO",
    default: true,
    what: "resync reads fail with EIO",
};
/// The engine's data syncs fail with EIO now and then.
pub(crate) const SYNC_EIO: Switch = Switch {
    env: "GMD_SIM_SYNC_EIO",
    default: true,
    what: "data syncs (barriers) fail with EIO",
};
/// Messages of an ended link session survive its end and arrive later.
pub(crate) const OLD_MESSAGES: Switch = Switch {
    env: "GMD_SIM_OLD_MESSAGES",
    default: true,
    what: "messages of an ended session arrive in the next one",
};

/// A primary in sync or mwc that loses its peer sometimes holds its writes
/// (site isolation: the non-dominant site, or a fence handler running)
/// until the link returns or the administrator releases it.
pub(crate) const ISOLATION: Switch = Switch {
    env: "GMD_SIM_ISOLATION",
    default: true,
    what: "a primary that loses its peer may hold its writes until the link returns or a release",
};

/// Chance that a sync/mwc primary losing its peer isolates (holds writes).
pub(crate) const ISOLATION_PROBABILITY: f64 = 0.5;
/// Chance per administration round that a held node is released (the
/// peer confirmed down).
pub(crate) const RELEASE_PROBABILITY: f64 = 0.2;

impl Switch {
    fn read(self) -> bool {
        match std::env::var(self.env).as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            Ok(other) => panic!("{}={other}: use 1 (on) or 0 (off)", self.env),
            Err(_) => self.default,
        }
    }
}

/// Which faults are on for this run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Faults {
    pub(crate) data_eio: bool,
    pub(crate) power_cut: bool,
    pub(crate) durable_marks: bool,
    pub(crate) map_eio: bool,
    pub(crate) resync_eio: bool,
    pub(crate) sync_eio: bool,
    pub(crate) old_messages: bool,
    pub(crate) isolation: bool,
}

impl Faults {
    /// The switches as the environment sets them (read once per run).
    pub(crate) fn get() -> Faults {
        static FAULTS: OnceLock<Faults> = OnceLock::new();
        *FAULTS.get_or_init(|| Faults {
            data_eio: DATA_EIO.read(),
            power_cut: POWER_CUT.read(),
            durable_marks: DURABLE_MARKS.read(),
            map_eio: MAP_EIO.read(),
            resync_eio: RESYNC_EIO.read(),
            sync_eio: SYNC_EIO.read(),
            old_messages: OLD_MESSAGES.read(),
            isolation: ISOLATION.read(),
        })
    }

    /// One line per switch: on or off, and what it does.
    pub(crate) fn describe(&self) -> String {
        [
            (DATA_EIO, self.data_eio),
            (POWER_CUT, self.power_cut),
            (DURABLE_MARKS, self.durable_marks),
            (MAP_EIO, self.map_eio),
            (RESYNC_EIO, self.resync_eio),
            (SYNC_EIO, self.sync_eio),
            (OLD_MESSAGES, self.old_messages),
            (ISOLATION, self.isolation),
        ]
        .iter()
        .map(|(s, on)| format!("  {}={} ({})", s.env, u8::from(*on), s.what))
        .collect::<Vec<_>>()
        .join("\n")
    }
}
