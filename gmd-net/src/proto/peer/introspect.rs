//! Introspection: footprint, idleness and statistics.

use crate::proto::path::PathState;
use crate::proto::{PeerFootprint, Shared};
use crate::stats::{PathStats, Stats};

use super::{Peer, PeerState};

impl Peer {
    pub(crate) fn footprint(&self) -> PeerFootprint {
        PeerFootprint {
            send_buffered_bytes: self.buffered_bytes,
            reply_buffered_bytes: self.reply_bytes,
            send_messages: self.lanes.values().map(|l| l.msgs.len()).sum(),
            sent_packets: self.sent.len(),
            chunk_records: self.chunk_log.len(),
            retransmit_chunks: self.retransmit.len(),
            recv_charged_bytes: (self.charged_in - self.released_in.min(self.charged_in)) as usize,
            recv_slots: self.recv_lanes.values().map(|l| l.slots.len()).sum(),
            recv_slots_accounted: self.recv_slots,
            requests: self.requests.len(),
            ack_ranges: self.received_pns.len(),
        }
    }

    pub(crate) fn is_sending(&self) -> bool {
        self.buffered_bytes > 0
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.buffered_bytes == 0
            && self.reply_bytes == 0
            && self.pending.is_empty()
            && self.retransmit.is_empty()
            && self.requests.is_empty()
            && self.lanes.values().all(|l| l.msgs.is_empty())
    }

    pub(crate) fn add_stats(&self, shared: &Shared, st: &mut Stats) {
        let t = &shared.tuning;
        let mut m = self.stats.clone();
        m.up = self.state == PeerState::Up;
        m.epoch = self.remote_epoch;
        m.active_network = self.active.map(|i| {
            shared.topo.networks[self.paths[i].cfg.network.0 as usize]
                .0
                .clone()
        });
        st.machines.push(m);
        for (i, p) in self.paths.iter().enumerate() {
            st.paths.push(PathStats {
                peer: self.cfg.name.clone(),
                network: shared.topo.networks[p.cfg.network.0 as usize].0.clone(),
                up: p.state == PathState::Up,
                active: self.active == Some(i),
                srtt: p.rtt.srtt(),
                rttvar: p.rtt.srtt().map(|_| p.rtt.rttvar()),
                rto: p.rto(t),
                cwnd_bytes: p.cwnd_bytes,
                in_flight_bytes: p.in_flight_bytes,
                undone_decreases: p.cc.undone(),
                datagram_bytes: p.datagram_bytes(),
                datagram_max: p.mtu.max(),
                mtu_probes: p.mtu.probes(),
                black_holes: p.mtu.black_holes(),
            });
        }
    }
}
