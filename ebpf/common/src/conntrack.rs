//! Conntrack of the tc path: an LRU of [`CtKey`] -> [`CtValue`], two entries
//! per translated flow: one keyed by the tuple of the client's packets as
//! they arrive, one keyed by the tuple of the backend's replies as they
//! arrive. Each says how to rewrite the packets it matches, and where the
//! rewritten packets go (the FIB lookup's answer, remembered by the flow's
//! first forwarded packet and asked again when the entry is refreshed).
//! Entries carry a last-seen timestamp and expire by [`CtValue::expired`];
//! the agent garbage-collects expired ones. A TCP flow whose close completes
//! (a FIN from each side, then the ACK of the second) is deleted by that ACK,
//! so connection churn does not fill the LRU with dead flows
//! ([`CtValue::step`]).
//!
//! A flow starts in a second, smaller LRU of unconfirmed flows
//! ([`CtPendingValue`], flag [`CT_FLAG_PENDING`]): only a SYN (or a UDP
//! datagram) opens one, and it moves to the conntrack table once confirmed,
//! by the client's ACK of the backend's SYN-ACK (its acknowledgment number
//! checked against the backend's initial sequence number) or, for UDP, by
//! the backend's first answer. A flood of spoofed SYNs or datagrams can
//! only evict other unconfirmed flows, which live [`CT_PENDING_TIMEOUT_S`]
//! without a packet; established flows are out of its reach.
//!
//! Timestamps are `bpf_ktime_get_boot_ns` (`CLOCK_BOOTTIME`).

use crate::{
    assert_layout,
    net::{Addr, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// TCP conntrack lifetime after a SYN until the handshake completes.
pub const CT_TCP_SYN_TIMEOUT_S: u64 = 60;
/// TCP conntrack lifetime of an established connection (Cilium's default).
pub const CT_TCP_ESTABLISHED_TIMEOUT_S: u64 = 21_600;
/// TCP conntrack lifetime after a FIN or RST.
pub const CT_TCP_CLOSING_TIMEOUT_S: u64 = 10;
/// UDP conntrack lifetime since the last packet of either direction.
pub const CT_UDP_TIMEOUT_S: u64 = 60;
/// Lifetime of an unconfirmed flow since its last packet: a TCP client
/// retransmits its SYN within 8 s three times, and an unanswered UDP flow
/// that goes quiet longer simply starts again.
pub const CT_PENDING_TIMEOUT_S: u64 = 10;

/// [`CtValue::flags`]: rewrite the source to `new_saddr:new_sport`.
pub const CT_FLAG_REWRITE_SRC: u8 = 1 << 0;
/// [`CtValue::flags`]: rewrite the destination to `new_daddr:new_dport`.
pub const CT_FLAG_REWRITE_DST: u8 = 1 << 1;
/// [`CtValue::flags`]: the entry matches replies of a backend (else: packets
/// of a client).
pub const CT_FLAG_REPLY: u8 = 1 << 2;
/// [`CtValue::flags`]: the flow was translated as it left its client, a pod
/// of this node: its replies are translated back only as they enter that
/// pod (the hook that checks them against the pod's policy on the tuple the
/// backend sent), not where they enter the node.
pub const CT_FLAG_AT_POD: u8 = 1 << 3;
/// [`CtValue::flags`]: the entry is in the table of unconfirmed flows, as
/// the `entry` of a [`CtPendingValue`].
pub const CT_FLAG_PENDING: u8 = 1 << 4;

/// [`CtValue::state`]: TCP handshake in progress (also the state after the
/// first packet of a TCP flow that was not a plain ACK).
pub const CT_STATE_NEW: u8 = 0;
/// [`CtValue::state`]: TCP established, or any UDP flow.
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// [`CtValue::state`]: TCP FIN or RST seen.
pub const CT_STATE_CLOSING: u8 = 2;

/// [`CtValue::fins`]: the client side sent a FIN.
pub const CT_FIN_CLIENT: u8 = 1 << 0;
/// [`CtValue::fins`]: the backend side sent a FIN.
pub const CT_FIN_BACKEND: u8 = 1 << 1;

/// The state after a packet with `tcp_flags` (0 for UDP) in state `state`.
#[inline(always)]
pub const fn next_state(state: u8, proto: u8, tcp_flags: u8) -> u8 {
    if proto != PROTO_TCP {
        CT_STATE_ESTABLISHED
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 || state == CT_STATE_CLOSING {
        CT_STATE_CLOSING
    } else if tcp_flags & TCP_ACK != 0 && tcp_flags & TCP_SYN == 0 {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}

/// What one packet of a known flow does to its conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtStep {
    /// The entry's `CT_STATE_*` after the packet.
    pub state: u8,
    /// The entry's `CT_FIN_*` bits after the packet.
    pub fins: u8,
    /// The packet acknowledges the second FIN of a TCP close: once it is
    /// translated, the flow's entries can go.
    pub closes: bool,
}

/// Conntrack key: a packet's tuple as the tc program sees it arrive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address.
    pub saddr: Addr,
    /// Destination address.
    pub daddr: Addr,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding.
    pub pad: [u8; 3],
}
assert_layout!(CtKey, 40, { saddr: 0, daddr: 16, sport: 32, dport: 34, proto: 36, pad: 37 });

impl CtKey {
    /// The tuple of a packet from `saddr`:`sport` to `daddr`:`dport` (ports
    /// in network order; 0 for protocols without ports).
    #[inline(always)]
    pub const fn new(saddr: Addr, daddr: Addr, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }

    /// The tuple of packets flowing the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// Conntrack value: how to rewrite the packets matching the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// New source address, with [`CT_FLAG_REWRITE_SRC`].
    pub new_saddr: Addr,
    /// New destination address, with [`CT_FLAG_REWRITE_DST`].
    pub new_daddr: Addr,
    /// New source port (network byte order), with [`CT_FLAG_REWRITE_SRC`].
    pub new_sport: u16,
    /// New destination port (network byte order), with [`CT_FLAG_REWRITE_DST`].
    pub new_dport: u16,
    /// `CT_FLAG_*` bits.
    pub flags: u8,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_FIN_*`: the sides of a TCP flow that sent a FIN (both entries of a
    /// flow carry the same bits).
    pub fins: u8,
    /// `NEXT_HOP_*`: how the packets matching the entry leave once
    /// translated, as the last FIB lookup for them found; with
    /// `hop_ifindex` and `hop_macs`.
    pub hop: u8,
    /// Service id of the frontend.
    pub service_id: u32,
    /// Backend id chosen for the flow (checked against the backend map on
    /// every client packet, so a deleted backend's flows are re-balanced).
    pub backend_id: u32,
    /// `bpf_ktime_get_boot_ns` of the last packet in either direction.
    pub last_seen_ns: u64,
    /// The interface the packets are redirected to, with [`NEXT_HOP_REDIRECT`]
    /// or [`NEXT_HOP_PEER`].
    pub hop_ifindex: u32,
    /// Their destination and source MAC addresses there, in Ethernet header
    /// order.
    pub hop_macs: [u8; 12],
    /// TCP: the acknowledgment number (host order) of the last segment
    /// matching the entry, that is the next sequence number its sender
    /// expects from the other side; 0 until one was seen. A reset from the
    /// other side is believed only near it ([`reset_in_window`]).
    pub peer_ack: u32,
    /// Explicit padding.
    pub pad: u32,
}
assert_layout!(CtValue, 80, {
    new_saddr: 0, new_daddr: 16, new_sport: 32, new_dport: 34, flags: 36, state: 37, fins: 38,
    hop: 39, service_id: 40, backend_id: 44, last_seen_ns: 48, hop_ifindex: 56, hop_macs: 60,
    peer_ack: 72, pad: 76,
});

/// How far past the acknowledgment number its receiver last sent a reset's
/// sequence number may be: data in flight that the receiver has not
/// acknowledged yet (16 MiB: a 10 Gbit/s path with 13 ms of round trip). A
/// blind sender guessing a sequence number succeeds once in 256 tries, where
/// any reset used to do.
pub const RESET_WINDOW: u32 = 1 << 24;

/// Whether a TCP reset with sequence number `seq` (host order) may be real,
/// given the acknowledgment number `receiver_ack` its receiver last sent (0
/// when none was seen: nothing to check against).
#[inline(always)]
pub const fn reset_in_window(seq: u32, receiver_ack: u32) -> bool {
    receiver_ack == 0 || seq.wrapping_sub(receiver_ack) < RESET_WINDOW
}

/// The conntrack value of [`map_names::CONNTRACK_V2`]: a [`CtValue`]
/// without `peer_ack`. Read only by the agent, to carry an older agent's
/// flows over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValueV2 {
    /// As [`CtValue::new_saddr`].
    pub new_saddr: Addr,
    /// As [`CtValue::new_daddr`].
    pub new_daddr: Addr,
    /// As [`CtValue::new_sport`].
    pub new_sport: u16,
    /// As [`CtValue::new_dport`].
    pub new_dport: u16,
    /// As [`CtValue::flags`].
    pub flags: u8,
    /// As [`CtValue::state`].
    pub state: u8,
    /// As [`CtValue::fins`].
    pub fins: u8,
    /// As [`CtValue::hop`].
    pub hop: u8,
    /// As [`CtValue::service_id`].
    pub service_id: u32,
    /// As [`CtValue::backend_id`].
    pub backend_id: u32,
    /// As [`CtValue::last_seen_ns`].
    pub last_seen_ns: u64,
    /// As [`CtValue::hop_ifindex`].
    pub hop_ifindex: u32,
    /// As [`CtValue::hop_macs`].
    pub hop_macs: [u8; 12],
}
assert_layout!(CtValueV2, 72, {
    new_saddr: 0, new_daddr: 16, new_sport: 32, new_dport: 34, flags: 36, state: 37, fins: 38,
    hop: 39, service_id: 40, backend_id: 44, last_seen_ns: 48, hop_ifindex: 56, hop_macs: 60,
});

impl CtValueV2 {
    /// The same entry in the current layout; the flow's next segments
    /// record the acknowledgment numbers.
    pub const fn upgraded(&self) -> CtValue {
        CtValue {
            new_saddr: self.new_saddr,
            new_daddr: self.new_daddr,
            new_sport: self.new_sport,
            new_dport: self.new_dport,
            flags: self.flags,
            state: self.state,
            fins: self.fins,
            hop: self.hop,
            service_id: self.service_id,
            backend_id: self.backend_id,
            last_seen_ns: self.last_seen_ns,
            hop_ifindex: self.hop_ifindex,
            hop_macs: self.hop_macs,
            peer_ack: 0,
            pad: 0,
        }
    }
}

/// A flow not confirmed yet: its conntrack entry, and what confirms it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtPendingValue {
    /// The entry, with [`CT_FLAG_PENDING`]; first, so that a pointer to the
    /// value is a pointer to the entry.
    pub entry: CtValue,
    /// On the client's entry of a TCP flow, once `answered`: the
    /// acknowledgment number (host order) the client's ACK of the backend's
    /// SYN-ACK carries, its initial sequence number plus one.
    pub expected_ack: u32,
    /// 1 once the backend's SYN-ACK was seen and `expected_ack` set.
    pub answered: u32,
}
assert_layout!(CtPendingValue, 88, { entry: 0, expected_ack: 80, answered: 84 });

impl CtPendingValue {
    /// An unconfirmed flow's entry.
    #[inline(always)]
    pub const fn new(mut entry: CtValue) -> Self {
        entry.flags |= CT_FLAG_PENDING;
        Self {
            entry,
            expected_ack: 0,
            answered: 0,
        }
    }

    /// Whether a client packet with `tcp_flags` and acknowledgment number
    /// `ack` (host order) completes the handshake this entry waits for.
    #[inline(always)]
    pub const fn confirmed_by(&self, tcp_flags: u8, ack: u32) -> bool {
        self.answered == 1
            && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
            && ack == self.expected_ack
    }
}

/// [`CtValue::hop`]: not resolved; the next packet asks the FIB.
pub const NEXT_HOP_NONE: u8 = 0;
/// [`CtValue::hop`]: redirect to `hop_ifindex` (`bpf_redirect`).
pub const NEXT_HOP_REDIRECT: u8 = 1;
/// [`CtValue::hop`]: hand to the pod end of the veth or netkit pair whose
/// host end is `hop_ifindex` (`bpf_redirect_peer`).
pub const NEXT_HOP_PEER: u8 = 2;

impl CtValue {
    /// The entry after a packet with `tcp_flags` (0 for UDP) matched it. A FIN
    /// is recorded for the side the packet came from: the backend for a
    /// [`CT_FLAG_REPLY`] entry, else the client. A bare ACK once both sides
    /// sent a FIN is the last packet of the close (a retransmitted FIN
    /// after it finds no entry, goes untranslated and is answered by a RST,
    /// which ends the backend's socket as its timeout would).
    #[inline(always)]
    pub const fn step(&self, proto: u8, tcp_flags: u8) -> CtStep {
        step(
            self.state,
            self.fins,
            self.flags & CT_FLAG_REPLY != 0,
            proto,
            tcp_flags,
        )
    }

    /// How long the entry lives after its last packet, in nanoseconds.
    #[inline(always)]
    pub const fn lifetime_ns(&self, proto: u8) -> u64 {
        if self.flags & CT_FLAG_PENDING != 0 {
            CT_PENDING_TIMEOUT_S * 1_000_000_000
        } else {
            lifetime_ns(proto, self.state)
        }
    }

    /// The tuple a packet of `tuple` carries once this entry rewrote it.
    #[inline(always)]
    pub const fn apply(&self, tuple: &CtKey) -> CtKey {
        let mut out = *tuple;
        self.rewrite(&mut out);
        out
    }

    /// Rewrites `tuple` in place as [`apply`](Self::apply) does, without a
    /// second tuple on a short BPF stack.
    #[inline(always)]
    pub const fn rewrite(&self, tuple: &mut CtKey) {
        if self.flags & CT_FLAG_REWRITE_SRC != 0 {
            tuple.saddr = self.new_saddr;
            tuple.sport = self.new_sport;
        }
        if self.flags & CT_FLAG_REWRITE_DST != 0 {
            tuple.daddr = self.new_daddr;
            tuple.dport = self.new_dport;
        }
    }

    /// The entry translating the other direction of this entry's flow, whose
    /// packets of `tuple` it rewrites: keyed by `self.apply(tuple).reversed()`,
    /// it rewrites back to `tuple.reversed()`.
    #[inline(always)]
    pub const fn partner(&self, tuple: &CtKey, now_ns: u64) -> CtValue {
        let mut flags = ((self.flags & CT_FLAG_REPLY) ^ CT_FLAG_REPLY)
            | (self.flags & (CT_FLAG_AT_POD | CT_FLAG_PENDING));
        if self.flags & CT_FLAG_REWRITE_DST != 0 {
            flags |= CT_FLAG_REWRITE_SRC;
        }
        if self.flags & CT_FLAG_REWRITE_SRC != 0 {
            flags |= CT_FLAG_REWRITE_DST;
        }
        CtValue {
            new_saddr: tuple.daddr,
            new_daddr: tuple.saddr,
            new_sport: tuple.dport,
            new_dport: tuple.sport,
            flags,
            state: self.state,
            fins: self.fins,
            hop: NEXT_HOP_NONE,
            service_id: self.service_id,
            backend_id: self.backend_id,
            last_seen_ns: now_ns,
            hop_ifindex: 0,
            hop_macs: [0; 12],
            peer_ack: 0,
            pad: 0,
        }
    }

    /// Whether the entry has expired at `now_ns` (`CLOCK_BOOTTIME`). An entry
    /// seen "in the future" (a concurrent refresh) has not.
    #[inline(always)]
    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        outlived(self.last_seen_ns, now_ns, self.lifetime_ns(proto))
    }
}

/// What a packet with `tcp_flags` (0 for other protocols) does to a flow in
/// `state` with FIN bits `fins`: `from_backend` says it travels the way
/// replies do. A FIN is recorded for the side the packet came from; a bare
/// ACK once both sides sent a FIN is the last packet of the close.
#[inline(always)]
pub const fn step(state: u8, fins: u8, from_backend: bool, proto: u8, tcp_flags: u8) -> CtStep {
    let state = next_state(state, proto, tcp_flags);
    if proto != PROTO_TCP {
        return CtStep {
            state,
            fins,
            closes: false,
        };
    }
    let both = CT_FIN_CLIENT | CT_FIN_BACKEND;
    let bare_ack = tcp_flags & (TCP_ACK | TCP_SYN | TCP_FIN | TCP_RST) == TCP_ACK;
    let side = if from_backend {
        CT_FIN_BACKEND
    } else {
        CT_FIN_CLIENT
    };
    CtStep {
        state,
        fins: if tcp_flags & TCP_FIN != 0 {
            fins | side
        } else {
            fins
        },
        closes: bare_ack && fins == both,
    }
}

/// How long a flow of `proto` in `state` lives after its last packet, in
/// nanoseconds.
#[inline(always)]
pub const fn lifetime_ns(proto: u8, state: u8) -> u64 {
    let seconds = if proto != PROTO_TCP {
        CT_UDP_TIMEOUT_S
    } else if state == CT_STATE_ESTABLISHED {
        CT_TCP_ESTABLISHED_TIMEOUT_S
    } else if state == CT_STATE_CLOSING {
        CT_TCP_CLOSING_TIMEOUT_S
    } else {
        CT_TCP_SYN_TIMEOUT_S
    };
    seconds * 1_000_000_000
}

/// Whether a flow of `proto` in `state` last seen at `last_seen_ns` has
/// expired at `now_ns` (`CLOCK_BOOTTIME`).
#[inline(always)]
pub const fn expired(proto: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    outlived(last_seen_ns, now_ns, lifetime_ns(proto, state))
}

/// Whether more than `lifetime_ns` passed from `last_seen_ns` to `now_ns`.
/// An entry seen "in the future" (a concurrent refresh) has not expired.
#[inline(always)]
const fn outlived(last_seen_ns: u64, now_ns: u64, lifetime_ns: u64) -> bool {
    now_ns > last_seen_ns && now_ns - last_seen_ns > lifetime_ns
}

/// One conntrack garbage collection run by the `lb_ct_gc` program, over the
/// service conntrack and the policy conntrack: the agent writes `now_ns`,
/// runs the program, and reads the counts back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtGcState {
    /// Entries expired at this time (`CLOCK_BOOTTIME` ns) are deleted.
    pub now_ns: u64,
    /// Entries kept.
    pub live: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Policy conntrack entries kept.
    pub policy_live: u64,
    /// Policy conntrack entries deleted.
    pub policy_deleted: u64,
    /// Unconfirmed flows' entries kept.
    pub pending_live: u64,
    /// Unconfirmed flows' entries deleted.
    pub pending_deleted: u64,
}
assert_layout!(CtGcState, 56, {
    now_ns: 0, live: 8, deleted: 16, policy_live: 24, policy_deleted: 32, pending_live: 40,
    pending_deleted: 48,
});

#[cfg(feature = "user")]
crate::user_pod!(CtKey, CtValue, CtValueV2, CtPendingValue, CtGcState);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{v4_mapped, PROTO_UDP};

    #[test]
    fn partner_entries_translate_back() {
        let a = |last: u8| v4_mapped(u32::from_ne_bytes([10, 0, 0, last]));
        let client = CtKey {
            saddr: a(1),
            daddr: a(2),
            sport: 1000,
            dport: 80,
            proto: PROTO_TCP,
            pad: [0; 3],
        };
        // DNAT to a backend and SNAT to the node, as under ETP Cluster.
        let forward = CtValue {
            new_saddr: a(3),
            new_daddr: a(4),
            new_sport: 61000,
            new_dport: 8080,
            flags: CT_FLAG_REWRITE_SRC | CT_FLAG_REWRITE_DST,
            state: CT_STATE_ESTABLISHED,
            fins: 0,
            hop: NEXT_HOP_NONE,
            service_id: 7,
            backend_id: 9,
            last_seen_ns: 1,
            hop_ifindex: 0,
            hop_macs: [0; 12],
            peer_ack: 0,
            pad: 0,
        };
        let sent = forward.apply(&client);
        assert_eq!((sent.saddr, sent.sport), (a(3), 61000));
        assert_eq!((sent.daddr, sent.dport), (a(4), 8080));
        let reply = forward.partner(&client, 5);
        assert_eq!(reply.flags & CT_FLAG_REPLY, CT_FLAG_REPLY);
        // The backend's answer comes back to the client from the frontend.
        assert_eq!(reply.apply(&sent.reversed()), client.reversed());
        // And the partner of the partner is the forward entry again.
        let again = reply.partner(&sent.reversed(), 5);
        assert_eq!(again.apply(&client), sent);
        assert_eq!(again.flags, forward.flags);
        assert_eq!((again.service_id, again.backend_id), (7, 9));
    }

    fn entry(flags: u8) -> CtValue {
        CtValue {
            new_saddr: [0; 4],
            new_daddr: [0; 4],
            new_sport: 0,
            new_dport: 0,
            flags,
            state: CT_STATE_ESTABLISHED,
            fins: 0,
            hop: NEXT_HOP_NONE,
            service_id: 0,
            backend_id: 0,
            last_seen_ns: 0,
            hop_ifindex: 0,
            hop_macs: [0; 12],
            peer_ack: 0,
            pad: 0,
        }
    }

    /// Runs packets, each on the client's entry or the backend's, through
    /// both entries of a flow the way the datapath does (the step of the
    /// matching entry is written to both), and returns the packets' steps.
    fn close<const N: usize>(packets: [(bool, u8); N]) -> [CtStep; N] {
        let mut client = entry(CT_FLAG_REWRITE_DST);
        let mut backend = entry(CT_FLAG_REWRITE_SRC | CT_FLAG_REPLY);
        packets.map(|(from_backend, flags)| {
            let matched = if from_backend { backend } else { client };
            let step = matched.step(PROTO_TCP, flags);
            for e in [&mut client, &mut backend] {
                e.state = step.state;
                e.fins = step.fins;
            }
            step
        })
    }

    #[test]
    fn the_ack_of_the_second_fin_closes_a_flow() {
        const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
        // The client closes first; the backend's FIN rides on its ACK.
        let steps = close([(false, FIN_ACK), (true, FIN_ACK), (false, TCP_ACK)]);
        assert_eq!(steps.map(|s| s.closes), [false, false, true]);
        assert_eq!(steps[1].fins, CT_FIN_CLIENT | CT_FIN_BACKEND);
        assert!(steps.iter().all(|s| s.state == CT_STATE_CLOSING));
        // The backend closes first, with its ACK and FIN apart; data and
        // ACKs of the half-closed flow do not close it.
        let steps = close([
            (true, FIN_ACK),
            (false, TCP_ACK),
            (false, TCP_ACK | 0x08),
            (false, FIN_ACK),
            (true, TCP_ACK),
        ]);
        assert_eq!(steps.map(|s| s.closes), [false, false, false, false, true]);
        // A retransmitted FIN of one side, a RST, or UDP never close.
        assert!(
            !close([(false, FIN_ACK), (false, FIN_ACK), (false, TCP_ACK)])
                .iter()
                .any(|s| s.closes)
        );
        assert!(!close([(false, FIN_ACK), (true, TCP_RST), (false, TCP_ACK)])[2].closes);
        let udp = entry(0);
        assert_eq!(
            udp.step(PROTO_UDP, 0),
            CtStep {
                state: CT_STATE_ESTABLISHED,
                fins: 0,
                closes: false
            }
        );
    }

    #[test]
    fn tcp_state_machine() {
        let tcp = PROTO_TCP;
        assert_eq!(next_state(CT_STATE_NEW, tcp, TCP_SYN), CT_STATE_NEW);
        assert_eq!(
            next_state(CT_STATE_NEW, tcp, TCP_SYN | TCP_ACK),
            CT_STATE_NEW
        );
        assert_eq!(next_state(CT_STATE_NEW, tcp, TCP_ACK), CT_STATE_ESTABLISHED);
        assert_eq!(
            next_state(CT_STATE_ESTABLISHED, tcp, TCP_RST),
            CT_STATE_CLOSING
        );
        assert_eq!(next_state(CT_STATE_CLOSING, tcp, TCP_ACK), CT_STATE_CLOSING);
        assert_eq!(next_state(CT_STATE_NEW, PROTO_UDP, 0), CT_STATE_ESTABLISHED);
    }

    #[test]
    fn conntrack_expiry() {
        let mut v = CtValue {
            new_saddr: [0; 4],
            new_daddr: [0; 4],
            new_sport: 0,
            new_dport: 0,
            flags: 0,
            state: CT_STATE_NEW,
            fins: 0,
            hop: NEXT_HOP_NONE,
            service_id: 0,
            backend_id: 0,
            last_seen_ns: 1_000,
            hop_ifindex: 0,
            hop_macs: [0; 12],
            peer_ack: 0,
            pad: 0,
        };
        let s = 1_000_000_000;
        assert!(!v.expired(PROTO_TCP, 1_000 + 60 * s));
        assert!(v.expired(PROTO_TCP, 1_001 + 60 * s));
        assert!(!v.expired(PROTO_TCP, 0));
        v.state = CT_STATE_ESTABLISHED;
        assert!(!v.expired(PROTO_TCP, 1_001 + 60 * s));
        v.state = CT_STATE_CLOSING;
        assert!(v.expired(PROTO_TCP, 1_001 + 10 * s));
        assert!(v.expired(PROTO_UDP, 1_001 + 60 * s));
    }
}
