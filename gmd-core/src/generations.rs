//! Data generations: a small, durable record of which data a volume holds,
//! kept in its state map's superblock. The handshake decides from these
//! alone which side is newer (see [`crate::link::decide`]), never from who
//! answered first.
//!
//! - `current` names the data as it is now on this side. A new one is drawn
//!   whenever this side starts writing without its peer: it goes on alone as
//!   primary, is promoted with `--force`, or is split for a drill.
//! - `bitmap` is the `current` of the moment this side's marks started
//!   counting: the marks then describe exactly the regions that differ from
//!   that generation. 0 while the pair is in step.
//! - `history` holds the last earlier `current` ids, newest first.
//!
//! Two values are reserved: [`GEN_NONE`] ("holds no known data": a fresh
//! map; it never is a resync source and receives a full copy) and 0 in
//! `bitmap`/`history` ("nothing"). [`Generations::zeroed`] gives two new
//! volumes known to be all zeroes the same, deterministic generation, so
//! that they start without a copy.

use uuid::Uuid;

/// A data generation id.
pub type GenId = u64;

/// `current` of a volume that holds no known data.
pub const GEN_NONE: GenId = 0;

/// How many earlier generations a volume remembers.
pub const HISTORY_LEN: usize = 3;

/// The lineage of the data on one volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generations {
    /// The data as it is now ([`GEN_NONE`]: no known data).
    pub current: GenId,
    /// The generation this side's marks are relative to (0: in step with the peer).
    pub bitmap: GenId,
    /// Earlier `current` ids, newest first (0: empty).
    pub history: [GenId; HISTORY_LEN],
    /// The pair's primary term as this copy knows it: raised at each
    /// promotion; at a connection of the same data both sides take the
    /// higher, and a resync target takes the source's with its generation
    /// (terms count promotions within one lineage). Of two copies of the
    /// same generation, the
    /// one with the higher term was promoted last (in a switch, which
    /// covers what the earlier primary wrote), so its data is the pair's
    /// (0 in maps and offers that predate it).
    #[serde(default)]
    pub term: u64,
}

/// Derives a generation id from a device identity and a purpose, so that
/// both sides of a pair, set up independently, agree on it.
fn derived(uuid: &Uuid, purpose: &str) -> GenId {
    let id = Uuid::new_v5(uuid, purpose.as_bytes());
    let bytes: [u8; 8] = id.as_bytes()[..8].try_into().expect("8 bytes");
    // Never one of the reserved values.
    u64::from_le_bytes(bytes) | 1
}

impl Generations {
    /// A fresh volume: no known data.
    pub fn none() -> Self {
        Generations::default()
    }

    /// A new volume that the administrator says holds only zeroes: both
    /// sides of device `uuid` initialised so agree and need no copy.
    pub fn zeroed(uuid: &Uuid) -> Self {
        Generations {
            current: derived(uuid, "gmd zeroed volume"),
            ..Generations::default()
        }
    }

    /// The generation of a map written before generations existed (format
    /// version 1): both sides of a pair upgraded so hold the same data, as
    /// the old rules assumed; their marks keep meaning what they meant.
    pub fn legacy(uuid: &Uuid) -> Self {
        Generations {
            current: derived(uuid, "gmd format 1 map"),
            ..Generations::default()
        }
    }

    /// Whether this volume holds no known data.
    pub fn holds_no_data(&self) -> bool {
        self.current == GEN_NONE
    }

    /// This side starts writing without its peer: a new `current` (`new`,
    /// never [`GEN_NONE`]). The marks keep counting from the generation the
    /// peer holds: `bitmap` takes the old `current` only if it was in step.
    pub fn go_alone(&mut self, new: GenId) {
        debug_assert_ne!(new, GEN_NONE);
        if self.bitmap == 0 && self.current != GEN_NONE {
            self.bitmap = self.current;
        }
        self.push_history();
        self.current = new;
    }

    /// A resync target that received everything takes the source's
    /// generation; its marks are all cleared.
    pub fn adopt(&mut self, current: GenId) {
        if self.current != current {
            self.push_history();
            self.current = current;
        }
        self.bitmap = 0;
    }

    /// Drops this side's own changes: its data will be overwritten by the
    /// peer's, from the generation its marks are relative to (or by a full
    /// copy if it has none). The marks stay, to be resent.
    pub fn discard_own_changes(&mut self) {
        if self.bitmap != 0 {
            self.push_history();
            self.current = self.bitmap;
            self.bitmap = 0;
        } else {
            self.push_history();
            self.current = GEN_NONE;
        }
    }

    /// Whether `id` is this side's current data or one it held before.
    pub fn knows(&self, id: GenId) -> bool {
        id != GEN_NONE && (self.current == id || self.history.contains(&id))
    }

    fn push_history(&mut self) {
        if self.current == GEN_NONE || self.history[0] == self.current {
            return;
        }
        self.history.rotate_right(1);
        self.history[0] = self.current;
    }
}

impl std::fmt::Display for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = |g: GenId| {
            if g == GEN_NONE {
                "-".to_owned()
            } else {
                format!("{g:016X}")
            }
        };
        write!(
            f,
            "{}",
            if self.holds_no_data() {
                "no-data".to_owned()
            } else {
                id(self.current)
            }
        )?;
        if self.bitmap != 0 {
            write!(f, " (changes since {})", id(self.bitmap))?;
        }
        Ok(())
    }
}

/// Draws generation ids: a small deterministic generator (splitmix64), so
/// that the engine stays sans-IO and simulations replay exactly. Seed it
/// from a random source in production.
#[derive(Clone, Debug)]
pub struct GenSource {
    state: u64,
}

impl GenSource {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        GenSource { state: seed }
    }

    /// The next id (never [`GEN_NONE`]).
    pub fn draw(&mut self) -> GenId {
        loop {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != GEN_NONE {
                return z;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn going_alone_keeps_counting_from_the_generation_the_peer_holds() {
        let mut g = Generations {
            current: 10,
            ..Generations::default()
        };
        g.go_alone(11);
        assert_eq!((g.current, g.bitmap, g.history), (11, 10, [10, 0, 0]));
        // Again before the peer caught up: the marks still count from 10.
        g.go_alone(12);
        assert_eq!((g.current, g.bitmap, g.history), (12, 10, [11, 10, 0]));
        assert!(g.knows(10) && g.knows(11) && g.knows(12) && !g.knows(13));
    }

    #[test]
    fn a_volume_without_data_goes_alone_without_a_bitmap() {
        let mut g = Generations::none();
        g.go_alone(5);
        assert_eq!((g.current, g.bitmap, g.history), (5, 0, [0, 0, 0]));
    }

    #[test]
    fn adopting_and_discarding() {
        let mut target = Generations {
            current: 10,
            ..Generations::default()
        };
        target.adopt(11);
        assert_eq!(
            (target.current, target.bitmap, target.history),
            (11, 0, [10, 0, 0])
        );
        let mut drill = target;
        drill.go_alone(20);
        drill.discard_own_changes();
        assert_eq!(
            drill.current, 11,
            "back to the generation the marks count from"
        );
        assert_eq!(drill.bitmap, 0);
        let mut lone = Generations {
            current: 7,
            ..Generations::default()
        };
        lone.discard_own_changes();
        assert!(lone.holds_no_data(), "no bitmap: only a full copy can help");
    }

    #[test]
    fn derived_generations_agree_per_device_and_differ_by_purpose() {
        let a = Uuid::from_u128(1);
        assert_eq!(Generations::zeroed(&a), Generations::zeroed(&a));
        assert_ne!(
            Generations::zeroed(&a).current,
            Generations::legacy(&a).current
        );
        assert_ne!(
            Generations::zeroed(&a).current,
            Generations::zeroed(&Uuid::from_u128(2)).current
        );
        assert!(!Generations::zeroed(&a).holds_no_data());
    }

    #[test]
    fn drawn_ids_are_never_the_no_data_value() {
        let mut s = GenSource::new(0);
        let ids: Vec<GenId> = (0..1000).map(|_| s.draw()).collect();
        assert!(ids.iter().all(|&g| g != GEN_NONE));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }
}
