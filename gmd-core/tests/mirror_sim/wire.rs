//! The messages between the two engines, tagged with the link session they
//! were sent in, and the receiver's session filter.

use gmd_core::engine::{Request, Seq};

use crate::WriteId;

/// A message of the mirror stream (what `gmd_core::mirror` encodes).
#[derive(Clone, Debug)]
pub(crate) enum Msg {
    Write {
        seq: Seq,
        after: Seq,
        id: WriteId,
        request: Request,
    },
    Flush {
        seq: Seq,
    },
    Resync {
        seq: Seq,
        region: u64,
        blocks: Vec<WriteId>,
    },
    Ack {
        seq: Seq,
        ok: bool,
    },
    Prioritize {
        region: u64,
    },
    ResyncAdd {
        region: u64,
    },
    Adopted {
        current: u64,
    },
}

/// A message on the wire: the daemon prefixes each with its link session.
#[derive(Clone, Debug)]
pub(crate) struct Packet {
    /// The link session it was sent in (never 0: nothing is sent without one).
    pub(crate) session: u64,
    pub(crate) msg: Msg,
}

/// The receiver's filter: a message reaches the engine only if it belongs
/// to the session the receiver is in (`current`, 0 for none). The daemon
/// does this in its receive loop (`gmdctl/src/daemon/link.rs`,
/// `receive_loop`); it will move to gmd-core's link state machine.
pub(crate) fn accepts(current: u64, packet: &Packet) -> bool {
    current != 0 && packet.session == current
}
