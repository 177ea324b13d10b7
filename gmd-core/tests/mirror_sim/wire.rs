//! The messages between the two engines (the device stream), tagged with
//! the link session they were sent in, and the daemons' handshake requests
//! (the control stream). Which device messages a receiver takes is the
//! link's rule ([`gmd_core::link::Link::session_with`]).

use gmd_core::engine::{Request, Seq};
use gmd_core::link::{Accept, Offer};

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
    /// Checksum resync: the sender's copy of the region, standing for its
    /// checksum (a perfect one: equal exactly when the blocks are).
    ResyncCheck {
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
    Term {
        term: u64,
    },
}

/// A message on the wire: the daemon prefixes each with its link session.
#[derive(Clone, Debug)]
pub(crate) struct Packet {
    /// The link session it was sent in (never 0: nothing is sent without one).
    pub(crate) session: u64,
    pub(crate) msg: Msg,
    /// It may be delivered before earlier messages still on the wire.
    pub(crate) passing: bool,
}

/// A request or answer between the daemons (gmdd's `PeerRequest`s of the
/// handshake), on the control stream: it is not ordered with the device
/// stream, and is lost with a partition or a crash of either end.
#[derive(Clone, Debug)]
pub(crate) enum Ctl {
    /// `Connect`: the initiator's offer.
    Offer(Box<Offer>),
    /// The responder's answer to an offer: accepted, or refused (why).
    Accepted(Result<Box<Accept>, String>),
    /// The initiator connected its side of this session.
    Go(u64),
    /// The responder's answer to `Go`.
    GoAnswer(Result<(), String>),
    /// The sender dropped this session and asks the peer to drop it too.
    Renegotiate(u64),
}

/// A control message on its way.
#[derive(Clone, Debug)]
pub(crate) struct Control {
    pub(crate) from: usize,
    /// The step from which it may arrive.
    pub(crate) at: usize,
    /// The request it is, or answers (an answer goes to the request waiting
    /// for it, never to a later one).
    pub(crate) req: u64,
    pub(crate) msg: Ctl,
}
