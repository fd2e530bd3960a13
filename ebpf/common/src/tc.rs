//! Map keys, values and constants of the tc datapath (NodePort, ExternalIPs
//! and LoadBalancer IPs, translated per packet on node uplinks).
//!
//! The tc programs share the frontend and backend maps of the socket path
//! ([`SERVICES`](crate::map_names::SERVICES), [`BACKENDS`](crate::map_names::BACKENDS))
//! and add their own:
//!
//! - **Frontends.** An external frontend is a [`ServiceKey`](crate::ServiceKey)
//!   with `scope` [`SCOPE_TC_EXTERNAL`]: a NodePort on each node address (and
//!   each address of a configured list), an ExternalIP or a LoadBalancer
//!   ingress IP, with the Service port (nodePort for NodePorts). The socket
//!   programs only look up `SCOPE_EXTERNAL` keys, so these entries never
//!   affect them, and the tc programs only look up `SCOPE_TC_EXTERNAL` keys.
//!   In such an entry's [`ServiceValue`](crate::ServiceValue):
//!   `slot_generation` is the generation of its Maglev table in
//!   [`map_names::MAGLEV`]; `backend_count` is the number of distinct backends
//!   in that table (0: no endpoints); `flags` may carry
//!   [`SERVICE_FLAG_NO_LOCAL_BACKENDS`](crate::SERVICE_FLAG_NO_LOCAL_BACKENDS)
//!   (drop instead of reject), [`SERVICE_FLAG_EXTERNAL_LOCAL`] and
//!   [`SERVICE_FLAG_SOURCE_RANGES`]; `affinity_timeout_s` is not used.
//! - **Maglev tables** ([`map_names::MAGLEV`]): `(generation, index)` ->
//!   backend id, for `index` in `0..M`, plus the table size `M` itself at
//!   index [`MAGLEV_SIZE_INDEX`]. Make before break: the agent writes a
//!   complete table under a fresh generation (size entry included), flips the
//!   frontend's `slot_generation`, then deletes the old generation. A reader
//!   that loses a race with the delete retries once on the new generation.
//! - **Conntrack** ([`map_names::CONNTRACK`]): an LRU of [`CtKey`] ->
//!   [`CtValue`], two entries per translated flow: one keyed by the tuple of
//!   the client's packets as they arrive, one keyed by the tuple of the
//!   backend's replies as they arrive. Each says how to rewrite the packets
//!   it matches, and where the rewritten packets go (the FIB lookup's
//!   answer, remembered by the flow's first forwarded packet and asked
//!   again when the entry is refreshed). Entries carry a last-seen
//!   timestamp and expire by
//!   [`CtValue::expired`]; the agent garbage-collects expired ones. A TCP
//!   flow whose close completes (a FIN from each side, then the ACK of the
//!   second) is deleted by that ACK, so connection churn does not fill the
//!   LRU with dead flows ([`CtValue::step`]).
//! - **Source ranges** ([`map_names::SOURCE_RANGES`]): an LPM trie of
//!   [`SourceRangeKey`] -> `u32` (1), consulted for new flows to frontends
//!   flagged [`SERVICE_FLAG_SOURCE_RANGES`].
//! - **Configuration** ([`map_names::CONFIG`]): an array of one [`TcConfig`].
//! - **Counters** ([`map_names::STATS`]): a per-CPU array of `u64`, indexed by
//!   the `STAT_*` constants.
//! - **Drop events** ([`map_names::EVENTS`]): a ring buffer of [`DropEvent`],
//!   one per new flow dropped or refused, read by the agent; each CPU sends
//!   at most [`REPORTS_PER_SECOND`] a second, and what is over that or does
//!   not fit is counted in [`map_names::REPORT_BUDGET`].
//!
//! Timestamps are `bpf_ktime_get_boot_ns` (`CLOCK_BOOTTIME`).

use crate::Addr;

/// Pinned map names of the tc datapath. The kernel limits names to 15 bytes.
pub mod map_names {
    /// Maglev tables: [`MaglevKey`](super::MaglevKey) -> backend id (`u32`).
    pub const MAGLEV: &str = "LB_MAGLEV_V1";
    /// Conntrack: [`CtKey`](super::CtKey) -> [`CtValue`](super::CtValue).
    pub const CONNTRACK: &str = "LB_CT_V2";
    /// Conntrack of agents from before next hops were remembered:
    /// [`CtKey`](super::CtKey) -> [`CtValueV1`](super::CtValueV1). A new
    /// agent carries its flows over into [`CONNTRACK`] and removes it.
    pub const CONNTRACK_V1: &str = "LB_CT_V1";
    /// loadBalancerSourceRanges: LPM trie of [`SourceRangeKey`](super::SourceRangeKey) -> `u32`.
    pub const SOURCE_RANGES: &str = "LB_SRCRANGE_V1";
    /// Node configuration: array of one [`TcConfig`](super::TcConfig).
    pub const CONFIG: &str = "LB_TCCFG_V1";
    /// Counters: per-CPU array of `u64` indexed by `STAT_*`.
    pub const STATS: &str = "LB_TCSTAT_V1";
    /// Session affinity of per-packet flows: LRU of
    /// [`TcAffinityKey`](super::TcAffinityKey) -> [`AffinityValue`](crate::AffinityValue)
    /// (`last_used_ns` is `bpf_ktime_get_boot_ns` here).
    pub const AFFINITY: &str = "LB_TCAFF_V1";
    /// Conntrack garbage collection request and result: array of one
    /// [`CtGcState`](super::CtGcState). Not pinned: each loaded object has its own.
    pub const CT_GC: &str = "LB_CTGC_V1";
    /// Ports of fragmented datagrams: LRU of [`FragKey`](super::FragKey) ->
    /// [`FragPorts`](super::FragPorts). Not pinned.
    pub const FRAGMENTS: &str = "LB_FRAG_V1";
    /// Why new flows were dropped or refused: a ring buffer of
    /// [`EVENTS_BYTES`](super::EVENTS_BYTES) holding
    /// [`DropEvent`](super::DropEvent)s, read by the agent. Not pinned.
    pub const EVENTS: &str = "LB_EVENTS_V1";
    /// Each CPU's drop report budget and the reports it could not send:
    /// per-CPU array of one [`ReportBudget`](super::ReportBudget). Not pinned.
    pub const REPORT_BUDGET: &str = "LB_EVBUDGET_V1";
    /// Host ends of pod veth (or netkit) pairs: ifindex (`u32`) -> 1. A
    /// translated packet whose FIB egress is one of them is handed straight
    /// to the pod's side with `bpf_redirect_peer`. Not pinned: the agent
    /// fills each loaded object's own as it attaches to pod interfaces.
    pub const POD_INTERFACES: &str = "LB_PODIF_V1";
}

/// Answers (RSTs and ICMP errors) to packets for frontends without endpoints,
/// per second, after a burst of [`REJECT_BURST`]: the kernel's own
/// `icmp_msgs_per_sec` and `icmp_msgs_burst` defaults, so that a flood to
/// such a frontend, perhaps with a spoofed source, is not reflected as a
/// flood of answers.
pub const REJECT_RATE_PER_SEC: u64 = 1_000;
/// Answers sent at once before [`REJECT_RATE_PER_SEC`] applies.
pub const REJECT_BURST: u64 = 50;

/// The token bucket of answers to packets for frontends without endpoints,
/// in nanoseconds of credit (one answer costs `1e9 / REJECT_RATE_PER_SEC`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBudget {
    /// Credit left, at most [`REJECT_BURST`] answers' worth.
    pub credit_ns: u64,
    /// `bpf_ktime_get_boot_ns` of the last refill.
    pub last_ns: u64,
}

impl RejectBudget {
    /// Credit of one answer.
    pub const COST_NS: u64 = 1_000_000_000 / REJECT_RATE_PER_SEC;

    /// Refills the bucket up to `now_ns` and takes one answer's credit if
    /// there is enough; whether the answer may be sent.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns;
        let full = REJECT_BURST * Self::COST_NS;
        let credit = self.credit_ns.saturating_add(elapsed);
        self.credit_ns = if credit > full { full } else { credit };
        if self.credit_ns < Self::COST_NS {
            return false;
        }
        self.credit_ns -= Self::COST_NS;
        true
    }
}

/// Capacity of the fragment map: datagrams whose fragments are in flight.
pub const MAX_FRAGMENTS: u32 = 8_192;

/// One fragmented datagram, as its IP headers name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address (IPv4-mapped for IPv4).
    pub saddr: Addr,
    /// Destination address.
    pub daddr: Addr,
    /// IPv4 identification or IPv6 fragment identification, host order.
    pub id: u32,
    /// The L4 protocol.
    pub proto: u8,
    /// Explicit padding.
    pub pad: [u8; 3],
}

/// The ports of a fragmented datagram, from its first fragment, as loaded
/// from the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// [`ServiceKey::scope`](crate::ServiceKey::scope) of a frontend served by the
/// tc programs for traffic entering the node: NodePort (keyed by each node
/// address and the nodePort), ExternalIPs and LoadBalancer ingress IPs.
pub const SCOPE_TC_EXTERNAL: u8 = 1;

/// [`ServiceKey::scope`](crate::ServiceKey::scope) of a ClusterIP frontend
/// translated per packet, for pods whose sockets are not translated (the
/// agent's socket path is off). Looked up after [`SCOPE_TC_EXTERNAL`]; same
/// value layout, with [`SERVICE_FLAG_PRESERVE_SOURCE`].
pub const SCOPE_TC_CLUSTER: u8 = 2;

/// [`ServiceValue::flags`](crate::ServiceValue::flags): never SNAT, whatever
/// node the backend is on (ClusterIP traffic keeps the pod's address, as
/// with kube-proxy on a routed pod network).
pub const SERVICE_FLAG_PRESERVE_SOURCE: u32 = 1 << 18;

/// Whether frontends of `scope` are served by Maglev tables (the tc path)
/// rather than backend slots (the socket path).
pub const fn uses_maglev(scope: u8) -> bool {
    scope == SCOPE_TC_EXTERNAL || scope == SCOPE_TC_CLUSTER
}

/// [`ServiceValue::flags`](crate::ServiceValue::flags): externalTrafficPolicy
/// Local. The Maglev table holds only this node's backends and the client
/// address is preserved (no SNAT).
pub const SERVICE_FLAG_EXTERNAL_LOCAL: u32 = 1 << 16;
/// [`ServiceValue::flags`](crate::ServiceValue::flags): loadBalancerSourceRanges
/// apply; new flows from sources outside [`map_names::SOURCE_RANGES`] for this
/// service id are dropped.
pub const SERVICE_FLAG_SOURCE_RANGES: u32 = 1 << 17;

/// [`Backend::flags`](crate::Backend::flags): the backend runs on this node.
/// Under externalTrafficPolicy Cluster, flows to backends without this flag
/// are SNATed to the node address so replies come back through this node.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 7;

/// The [`MaglevKey::index`] whose value is the table size `M`.
pub const MAGLEV_SIZE_INDEX: u32 = u32::MAX;

/// Capacity of the Maglev map (entries, all tables and generations together).
/// Allocated on demand (`BPF_F_NO_PREALLOC`): 256 tables at the default
/// M = 16381, or 16,000 tables of M = 251.
pub const MAX_MAGLEV_ENTRIES: u32 = 1 << 22;
/// Capacity of the conntrack LRU (two entries per flow).
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Capacity of the source range trie.
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Capacity of [`map_names::POD_INTERFACES`].
pub const MAX_POD_INTERFACES: u32 = 16_384;
/// Number of counters in [`map_names::STATS`].
pub const STATS_LEN: u32 = 13;

/// Counter: packets of a known flow rewritten towards a backend.
pub const STAT_FORWARD: u32 = 0;
/// Counter: reply packets rewritten back to the frontend.
pub const STAT_REPLY: u32 = 1;
/// Counter: new flows that got a backend.
pub const STAT_NEW_FLOW: u32 = 2;
/// Counter: packets to a frontend without endpoints answered like
/// kube-proxy's REJECT: TCP by a RST, UDP by an ICMP port unreachable.
pub const STAT_REJECT: u32 = 3;
/// Counter: packets to a frontend without endpoints dropped unanswered: a
/// TCP RST, a UDP datagram from a source that is not a single host, a
/// packet whose answer cannot be built (e.g. IPv4 options), or one over the
/// answer budget ([`RejectBudget`]).
pub const STAT_DROP_NO_ENDPOINTS: u32 = 4;
/// Counter: dropped under externalTrafficPolicy Local without local endpoints.
pub const STAT_DROP_NO_LOCAL: u32 = 5;
/// Counter: dropped by loadBalancerSourceRanges.
pub const STAT_DROP_SOURCE_RANGE: u32 = 6;
/// Counter: dropped because the Maglev table or backend vanished twice.
pub const STAT_DROP_NO_BACKEND: u32 = 7;
/// Counter: dropped because no SNAT port was free.
pub const STAT_DROP_SNAT_PORTS: u32 = 8;
/// Counter: dropped because SNAT was needed and no node address is configured
/// for the family, or the backend's family differs from the packet's.
pub const STAT_DROP_SNAT_ADDR: u32 = 9;
/// Counter: conntrack inserts that failed.
pub const STAT_CT_INSERT_FAILED: u32 = 10;
/// Counter: packets redirected to their next hop, found by a FIB lookup
/// for them or, remembered on their flow's entry, for an earlier packet.
pub const STAT_FIB_REDIRECT: u32 = 11;
/// Counter: ICMP errors about packets of translated flows, translated with
/// them.
pub const STAT_ICMP_ERROR: u32 = 12;

/// Size of the drop event ring buffer: 4,096 events (56 bytes each plus the
/// kernel's 8-byte record header); the agent drains it every second at least.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Drop reports each CPU may send per second: a flood of dropped packets
/// must not turn into a flood of ring buffer reservations, which all take
/// the ring buffer's lock.
pub const REPORTS_PER_SECOND: u64 = 100;

/// One CPU's drop report budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportBudget {
    /// Start of the current one-second window, `bpf_ktime_get_boot_ns`.
    pub window_start_ns: u64,
    /// Reports sent in the current window.
    pub sent: u64,
    /// Reports not sent since the programs were loaded: over the budget or
    /// the ring buffer full.
    pub lost: u64,
}

impl ReportBudget {
    /// Whether a report at `now_ns` is within the budget, taking it if so.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        if now_ns.wrapping_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now_ns;
            self.sent = 0;
        }
        if self.sent >= REPORTS_PER_SECOND {
            self.lost += 1;
            return false;
        }
        self.sent += 1;
        true
    }
}

/// A new flow the tc path dropped or refused, and why: what the agent logs
/// and serves on `/drops`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// The packet's tuple as it arrived.
    pub tuple: CtKey,
    /// The `STAT_*` counter it was counted in: a `STAT_DROP_*`,
    /// [`STAT_REJECT`] or [`STAT_CT_INSERT_FAILED`].
    pub reason: u32,
    /// Service id of the frontend it was for.
    pub service_id: u32,
    /// When, in `bpf_ktime_get_boot_ns` time.
    pub time_ns: u64,
}

/// TCP conntrack lifetime after a SYN until the handshake completes.
pub const CT_TCP_SYN_TIMEOUT_S: u64 = 60;
/// TCP conntrack lifetime of an established connection (Cilium's default).
pub const CT_TCP_ESTABLISHED_TIMEOUT_S: u64 = 21_600;
/// TCP conntrack lifetime after a FIN or RST.
pub const CT_TCP_CLOSING_TIMEOUT_S: u64 = 10;
/// UDP conntrack lifetime since the last packet of either direction.
pub const CT_UDP_TIMEOUT_S: u64 = 60;

/// First port used for SNAT: above Linux's default ephemeral range
/// (32768-60999), so the node's own sockets do not collide.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of ports used for SNAT from [`SNAT_PORT_MIN`] (up to 65535).
pub const SNAT_PORT_COUNT: u16 = 4_536;

/// [`CtValue::flags`]: rewrite the source to `new_saddr:new_sport`.
pub const CT_FLAG_REWRITE_SRC: u8 = 1 << 0;
/// [`CtValue::flags`]: rewrite the destination to `new_daddr:new_dport`.
pub const CT_FLAG_REWRITE_DST: u8 = 1 << 1;
/// [`CtValue::flags`]: the entry matches replies of a backend (else: packets
/// of a client).
pub const CT_FLAG_REPLY: u8 = 1 << 2;

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

/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// The state after a packet with `tcp_flags` (0 for UDP) in state `state`.
#[inline(always)]
pub const fn next_state(state: u8, proto: u8, tcp_flags: u8) -> u8 {
    if proto != crate::PROTO_TCP {
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

/// [`TcConfig::flags`]: forward every translated packet on ingress with
/// `bpf_fib_lookup` and `bpf_redirect` (or `bpf_redirect_neigh`) instead of
/// handing it to the stack. Packets whose source was rewritten (SNAT, replies
/// now from a node address) are always forwarded this way: the stack would
/// drop them as martians.
pub const TC_CONFIG_FIB_REDIRECT: u32 = 1 << 0;

/// Key of a Maglev table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// The table generation: [`ServiceValue::slot_generation`](crate::ServiceValue::slot_generation)
    /// of the `SCOPE_TC_EXTERNAL` frontends using it.
    pub generation: u32,
    /// Slot `0..M`, or [`MAGLEV_SIZE_INDEX`] for the size entry.
    pub index: u32,
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
}

/// The conntrack value of [`map_names::CONNTRACK_V1`]: a [`CtValue`]
/// without the next hop. Read only by the agent, to carry an older agent's
/// flows over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValueV1 {
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
    /// Explicit padding.
    pub pad: u8,
    /// As [`CtValue::service_id`].
    pub service_id: u32,
    /// As [`CtValue::backend_id`].
    pub backend_id: u32,
    /// As [`CtValue::last_seen_ns`].
    pub last_seen_ns: u64,
}

impl CtValueV1 {
    /// The same entry in the current layout; its next hop is found by its
    /// flow's next packet.
    pub const fn upgraded(&self) -> CtValue {
        CtValue {
            new_saddr: self.new_saddr,
            new_daddr: self.new_daddr,
            new_sport: self.new_sport,
            new_dport: self.new_dport,
            flags: self.flags,
            state: self.state,
            fins: self.fins,
            hop: NEXT_HOP_NONE,
            service_id: self.service_id,
            backend_id: self.backend_id,
            last_seen_ns: self.last_seen_ns,
            hop_ifindex: 0,
            hop_macs: [0; 12],
        }
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
        let state = next_state(self.state, proto, tcp_flags);
        if proto != crate::PROTO_TCP {
            return CtStep {
                state,
                fins: self.fins,
                closes: false,
            };
        }
        let both = CT_FIN_CLIENT | CT_FIN_BACKEND;
        let bare_ack = tcp_flags & (TCP_ACK | TCP_SYN | TCP_FIN | TCP_RST) == TCP_ACK;
        let side = if self.flags & CT_FLAG_REPLY != 0 {
            CT_FIN_BACKEND
        } else {
            CT_FIN_CLIENT
        };
        CtStep {
            state,
            fins: if tcp_flags & TCP_FIN != 0 {
                self.fins | side
            } else {
                self.fins
            },
            closes: bare_ack && self.fins == both,
        }
    }

    /// How long the entry lives after its last packet, in nanoseconds.
    #[inline(always)]
    pub const fn lifetime_ns(&self, proto: u8) -> u64 {
        let seconds = if proto != crate::PROTO_TCP {
            CT_UDP_TIMEOUT_S
        } else if self.state == CT_STATE_ESTABLISHED {
            CT_TCP_ESTABLISHED_TIMEOUT_S
        } else if self.state == CT_STATE_CLOSING {
            CT_TCP_CLOSING_TIMEOUT_S
        } else {
            CT_TCP_SYN_TIMEOUT_S
        };
        seconds * 1_000_000_000
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
        let mut flags = (self.flags & CT_FLAG_REPLY) ^ CT_FLAG_REPLY;
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
        }
    }

    /// Whether the entry has expired at `now_ns` (`CLOCK_BOOTTIME`). An entry
    /// seen "in the future" (a concurrent refresh) has not.
    #[inline(always)]
    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns > self.last_seen_ns && now_ns - self.last_seen_ns > self.lifetime_ns(proto)
    }
}

/// Key of a session affinity entry of the tc path: one client address of one
/// frontend, kube-proxy's `ClientIP` (the address the packet arrived with,
/// before any SNAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcAffinityKey {
    /// Client address (IPv4-mapped for IPv4), network byte order.
    pub client: Addr,
    /// Service id of the frontend.
    pub service_id: u32,
}

/// One conntrack garbage collection run by the `lb_ct_gc` program: the agent
/// writes `now_ns`, runs the program, and reads the counts back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtGcState {
    /// Entries expired at this time (`CLOCK_BOOTTIME` ns) are deleted.
    pub now_ns: u64,
    /// Entries kept.
    pub live: u64,
    /// Entries deleted.
    pub deleted: u64,
}

/// Key data of the source range trie; the LPM key's prefix length counts
/// from the first bit of `service_id`: `32 + 96 + n` for an IPv4 `/n`
/// (IPv4-mapped), `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// Service id, **big-endian** so the trie matches it bit by bit first.
    pub service_id_be: u32,
    /// Source address (prefix), network byte order.
    pub addr: Addr,
}

/// Node-wide settings of the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcConfig {
    /// Seed of [`flow_hash`]; must be identical on every node.
    pub maglev_seed: u64,
    /// SNAT address for IPv4 flows (IPv4-mapped); all zero: none.
    pub snat_v4: Addr,
    /// SNAT address for IPv6 flows; all zero: none.
    pub snat_v6: Addr,
    /// `TC_CONFIG_*` bits.
    pub flags: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// The hash a new flow is placed with: `table[flow_hash(..) % M]`. Covers the
/// source address, both ports and the protocol but not the destination
/// address, so a flow reaching any node address (or any node) lands on the
/// same slot. Ports are the 16-bit values as loaded from the packet (network
/// byte order in memory). Stable across versions, like the Maglev table
/// builder: changing it moves flows between backends.
#[inline(always)]
pub const fn flow_hash(seed: u64, saddr: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let words = [
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        ((sport as u32) << 16) | dport as u32,
        proto as u32,
    ];
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < words.len() {
        h = (h ^ words[i] as u64).wrapping_mul(PRIME);
        i += 1;
    }
    // MurmurHash3 fmix64.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h ^ (h >> 32)) as u32
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type below is repr(C), Copy, has no padding bytes left
    // implicit and is valid for any bit pattern.
    unsafe impl aya::Pod for MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DropEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReportBudget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValueV1 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcAffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtGcState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<MaglevKey>(), 8);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 72);
        assert_eq!(size_of::<CtValueV1>(), 56);
        assert_eq!(size_of::<SourceRangeKey>(), 20);
        assert_eq!(size_of::<TcConfig>(), 48);
        assert_eq!(size_of::<TcAffinityKey>(), 20);
        assert_eq!(size_of::<CtGcState>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<DropEvent>(), 56);
        assert_eq!(size_of::<ReportBudget>(), 24);
    }

    #[test]
    fn each_cpu_sends_a_bounded_number_of_reports_per_second() {
        let second = 1_000_000_000;
        let mut budget = ReportBudget::default();
        let start = 5 * second;
        let sent = (0..REPORTS_PER_SECOND + 30)
            .filter(|i| budget.take(start + i))
            .count() as u64;
        assert_eq!((sent, budget.lost), (REPORTS_PER_SECOND, 30));
        // A new window, a new budget; what was lost stays counted.
        assert!(budget.take(start + second));
        assert_eq!((budget.sent, budget.lost), (1, 30));
        assert!(budget.take(start + second + 1));
    }

    #[test]
    fn flow_hash_ignores_nothing_but_the_destination() {
        let a = crate::v4_mapped(u32::from_ne_bytes([192, 0, 2, 1]));
        let h = flow_hash(7, &a, 1000, 80, crate::PROTO_TCP);
        assert_eq!(h, flow_hash(7, &a, 1000, 80, crate::PROTO_TCP));
        assert_ne!(h, flow_hash(8, &a, 1000, 80, crate::PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1001, 80, crate::PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1000, 81, crate::PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1000, 80, crate::PROTO_UDP));
    }

    #[test]
    fn partner_entries_translate_back() {
        let a = |last: u8| crate::v4_mapped(u32::from_ne_bytes([10, 0, 0, last]));
        let client = CtKey {
            saddr: a(1),
            daddr: a(2),
            sport: 1000,
            dport: 80,
            proto: crate::PROTO_TCP,
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
            let step = matched.step(crate::PROTO_TCP, flags);
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
            udp.step(crate::PROTO_UDP, 0),
            CtStep {
                state: CT_STATE_ESTABLISHED,
                fins: 0,
                closes: false
            }
        );
    }

    #[test]
    fn tcp_state_machine() {
        let tcp = crate::PROTO_TCP;
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
        assert_eq!(
            next_state(CT_STATE_NEW, crate::PROTO_UDP, 0),
            CT_STATE_ESTABLISHED
        );
    }

    #[test]
    fn reject_budget_allows_a_burst_then_the_rate() {
        let mut budget = RejectBudget::default();
        let start = 10_000_000_000;
        let answered = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(answered as u64, REJECT_BURST);
        // 10 ms later: 10 more at 1,000 per second.
        let later = start + 10_000_000;
        let answered = (0..100).filter(|_| budget.take(later)).count();
        assert_eq!(answered, 10);
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
        };
        let s = 1_000_000_000;
        assert!(!v.expired(crate::PROTO_TCP, 1_000 + 60 * s));
        assert!(v.expired(crate::PROTO_TCP, 1_001 + 60 * s));
        assert!(!v.expired(crate::PROTO_TCP, 0));
        v.state = CT_STATE_ESTABLISHED;
        assert!(!v.expired(crate::PROTO_TCP, 1_001 + 60 * s));
        v.state = CT_STATE_CLOSING;
        assert!(v.expired(crate::PROTO_TCP, 1_001 + 10 * s));
        assert!(v.expired(crate::PROTO_UDP, 1_001 + 60 * s));
    }
}
