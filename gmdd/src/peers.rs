//! What daemons ask each other about a device, over GeoMessage's control
//! stream: one JSON request, one JSON reply. Region sets travel as runs
//! ([`gmd_core::link::Regions`], packed), the unify bitmap too.

use gmd_core::config::Mode;
use gmd_core::link::{Accept, Offer, PairRole, Regions, SideFacts};
use serde::{Deserialize, Serialize};

/// A device as the other machine describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Identity, when the map is open.
    pub uuid: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Minor number.
    pub minor: u32,
    /// Mode.
    pub mode: Mode,
    /// The role it runs in (AVAILABLE), or last ran in.
    pub role: PairRole,
    /// Lifecycle state there.
    pub state: PeerState,
    /// Stale cells (written alone).
    pub stale: u64,
    /// Inconsistent cells (crash leftovers, resync marks).
    pub inconsistent: u64,
    /// The machine it mirrors with now, if any.
    pub connected_to: Option<String>,
    /// Role, data generations and marks, when the map is open.
    pub facts: Option<SideFacts>,
}

/// Lifecycle state of a device on another machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerState {
    /// Not configured.
    Defined,
    /// Configured.
    Stopped,
    /// Being started.
    Starting,
    /// Serving.
    Available,
}

/// A request from another daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum PeerRequest {
    /// Describe the device.
    Status { device: String },
    /// Start mirroring with the sender, whose copy `offer` describes.
    Connect { device: String, offer: Box<Offer> },
    /// The sender has connected its side of session `session`: connect yours.
    Go { device: String, session: u64 },
    /// The sender's device stops (`flushed`: after flushing its volume, so
    /// that everything it acknowledged is durable there): go on alone.
    Leave {
        device: String,
        session: u64,
        #[serde(default)]
        flushed: bool,
    },
    /// Drop session `session` quietly; the next handshake sets the link up
    /// again (one side wrote alone during the handshake).
    Renegotiate { device: String, session: u64 },
    /// Stop your device now (`gmdctl down` run on an AVAILABLE peer, or a
    /// second remote peer took over).
    StopDevice { device: String, by: String },
    /// Send your map (unify).
    GetMap { device: String },
    /// Describe your configuration and state maps (`gmdctl verify`).
    Facts,
    /// `gmdctl compare`: the checksums of these regions of your copy (at
    /// most [`crate::compare::CHECKSUM_REGIONS_MAX`]), in session `session`.
    Checksums {
        device: String,
        session: u64,
        regions: Vec<u64>,
    },
    /// Unify: as master, mark these regions stale; otherwise drop this
    /// side's own changes and clear the map.
    Unify {
        device: String,
        master: bool,
        bits: String,
    },
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(super) enum PeerReply {
    /// The device's description.
    Status { info: DeviceInfo },
    /// Connection accepted.
    Accept { accept: Box<Accept> },
    /// The device's map.
    Map { info: DeviceInfo, bits: String },
    /// The answer to [`PeerRequest::Facts`].
    Facts { facts: gmdctl::verify::MachineFacts },
    /// The answer to [`PeerRequest::Checksums`]: one per region asked, in
    /// order; `None` where the region is not settled there (not received,
    /// marked, written), so it is not compared.
    Checksums { sums: Vec<Option<u32>> },
    /// Done.
    Ok,
    /// Not done, and why (with the command that resolves it).
    Refused {
        reason: String,
        /// Only for now: something in the way (a handshake of its own, a
        /// device starting or stopping) that goes by itself, so a
        /// connection may be tried again at once. Older daemons never
        /// say so, and their refusals count as lasting.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        busy: bool,
    },
}

impl PeerReply {
    /// A refusal that holds until something changes on one side.
    pub(super) fn refused(reason: String) -> Self {
        PeerReply::Refused {
            reason,
            busy: false,
        }
    }

    /// A refusal only for now (see [`PeerReply::Refused`]).
    pub(super) fn busy(reason: String) -> Self {
        PeerReply::Refused { reason, busy: true }
    }
}

/// Encodes a bitmap for the wire, as a packed region set: the marks of a
/// 4 TiB device take a few bytes per run, not 16 MiB.
pub(super) fn encode_bits(bits: &[u8]) -> String {
    Regions::from_bits(bits).to_packed()
}

/// Decodes a bitmap from the wire for a device of `region_count` regions
/// (a set that names regions past its end is refused, and nothing larger
/// than the device's own bitmap is ever allocated).
pub(super) fn decode_bits(text: &str, region_count: u64) -> Result<Vec<u8>, String> {
    let set = Regions::from_packed(text).map_err(|e| format!("bad bitmap: {e}"))?;
    if !set.is_valid_for(region_count) {
        return Err(format!(
            "bad bitmap: its runs are not sorted and disjoint within the device's {region_count} regions"
        ));
    }
    Ok(set.to_bits(region_count))
}

/// Bitwise OR of two bitmaps of the same device.
pub(super) fn union(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = a.to_vec();
    out.resize(a.len().max(b.len()), 0);
    for (o, x) in out.iter_mut().zip(b) {
        *o |= x;
    }
    out
}
