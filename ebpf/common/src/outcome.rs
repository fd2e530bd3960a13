//! Every outcome the datapath counts, in one place: its counter index (the
//! enum's value, which is also the code a drop event carries), the program
//! set that counts it, its metric label and what it means for the client.
//! The kernel programs count with [`Outcome::index`]; the agent labels
//! metrics with [`Outcome::label`], and drop reports and `lbctl` explain
//! with [`Outcome::explanation`].
//!
//! Values are never reused or renumbered: a pinned counter array and a drop
//! event decoded by a newer agent keep their meaning. New outcomes take the
//! next value; [`OUTCOME_SLOTS`] leaves room for them without a new counter
//! map layout.

/// Counters in each program set's counter array: room for outcomes added
/// later without a new map layout.
pub const OUTCOME_SLOTS: u32 = 64;

/// Which program set counts an outcome, and so which counter array and
/// metric it appears in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// The tc programs (`lb_tc_packets{outcome}`), per packet.
    Tc,
    /// The socket programs (`lb_socket_refused{reason}`), per system call.
    Socket,
}

/// What the datapath did with a packet (tc path) or a system call (socket
/// path).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// A packet of a known flow rewritten towards its backend.
    Forward = 0,
    /// A reply packet rewritten back to come from the frontend.
    Reply = 1,
    /// A new flow got a backend.
    NewFlow = 2,
    /// A packet to a frontend without endpoints answered as kube-proxy's
    /// REJECT does: TCP by a reset, UDP by an ICMP port unreachable.
    Reject = 3,
    /// A packet to a frontend without endpoints dropped unanswered: a TCP
    /// reset, a UDP datagram from a source that is not a single host, a
    /// packet whose answer cannot be built (e.g. IPv4 options), or one over
    /// the answer budget.
    DropNoEndpoints = 4,
    /// Dropped under externalTrafficPolicy Local without a local endpoint.
    DropNoLocalEndpoints = 5,
    /// Dropped by loadBalancerSourceRanges.
    DropSourceRange = 6,
    /// Dropped because the Maglev table or backend vanished twice.
    DropNoBackend = 7,
    /// Dropped because no SNAT port was free.
    DropSnatPortsExhausted = 8,
    /// Dropped because SNAT was needed and no node address is configured for
    /// the family, or the backend's family differs from the packet's.
    DropNoSnatAddress = 9,
    /// A conntrack insert failed; the packet was dropped.
    ConntrackInsertFailed = 10,
    /// A packet redirected to its next hop, found by a FIB lookup for it or,
    /// remembered on its flow's entry, for an earlier packet.
    FibRedirect = 11,
    /// An ICMP error about a packet of a translated flow, translated with it.
    IcmpError = 12,
    /// `connect()`/`sendmsg()` refused with ECONNREFUSED: the Service has no
    /// endpoints.
    SocketNoEndpoints = 13,
    /// `connect()`/`sendmsg()` refused with EHOSTUNREACH: traffic policy
    /// Local and no endpoint on this node.
    SocketNoLocalEndpoints = 14,
    /// A new flow allowed by network policy (or not subject to it).
    PolicyAllowed = 15,
    /// Dropped: the source pod's egress policy does not allow the flow.
    PolicyDeniedEgress = 16,
    /// Dropped: the destination pod's ingress policy does not allow the flow.
    PolicyDeniedIngress = 17,
    /// Dropped: a packet from a pod with a source address that is not one of
    /// the pod's.
    PolicySpoofed = 18,
    /// Dropped: the pod's policy could not be programmed (a full map), so
    /// its new flows are refused until it is.
    PolicyFailClosed = 19,
    /// Dropped: a packet to or from an isolated pod whose ports could not be
    /// read (a later fragment whose first was not seen).
    PolicyUnparsed = 20,
    /// `connect()`/`sendmsg()` refused with EPERM: the pod's egress policy
    /// does not allow the (translated) destination.
    SocketPolicyDenied = 21,
    /// Dropped: a TCP segment other than a SYN, to a frontend, of no known
    /// connection (only a SYN opens a flow: a spoofed ACK flood creates no
    /// state, and a flow whose entry is gone is not moved to another backend
    /// mid-stream).
    DropNoConnection = 22,
    /// A flow's handshake completed (TCP) or its backend answered (UDP): it
    /// moved from the table of unconfirmed flows to the conntrack table.
    FlowConfirmed = 23,
    /// Dropped: a TCP reset of a confirmed flow whose sequence number is not
    /// near the acknowledgment number its receiver last sent (a blind
    /// reset; the flow keeps its state).
    DropResetOutOfWindow = 24,
    /// Dropped by the XDP prefilter: the source is in the configured deny
    /// list.
    XdpDropDenied = 25,
    /// Dropped by the XDP prefilter: the source is outside the
    /// loadBalancerSourceRanges of the LoadBalancer IP it is sent to.
    XdpDropSourceRange = 26,
    /// Dropped: a TCP, UDP or SCTP packet to a LoadBalancer IP or externalIP
    /// whose headers the datapath cannot read (a later fragment whose first
    /// was not seen, a header cut short, more than 4 IPv6 extension headers).
    DropUnparsed = 27,
}

impl Outcome {
    /// Every outcome, in counter order.
    pub const ALL: [Outcome; 28] = [
        Outcome::Forward,
        Outcome::Reply,
        Outcome::NewFlow,
        Outcome::Reject,
        Outcome::DropNoEndpoints,
        Outcome::DropNoLocalEndpoints,
        Outcome::DropSourceRange,
        Outcome::DropNoBackend,
        Outcome::DropSnatPortsExhausted,
        Outcome::DropNoSnatAddress,
        Outcome::ConntrackInsertFailed,
        Outcome::FibRedirect,
        Outcome::IcmpError,
        Outcome::SocketNoEndpoints,
        Outcome::SocketNoLocalEndpoints,
        Outcome::PolicyAllowed,
        Outcome::PolicyDeniedEgress,
        Outcome::PolicyDeniedIngress,
        Outcome::PolicySpoofed,
        Outcome::PolicyFailClosed,
        Outcome::PolicyUnparsed,
        Outcome::SocketPolicyDenied,
        Outcome::DropNoConnection,
        Outcome::FlowConfirmed,
        Outcome::DropResetOutOfWindow,
        Outcome::XdpDropDenied,
        Outcome::XdpDropSourceRange,
        Outcome::DropUnparsed,
    ];

    /// Its counter's index in its program set's counter array, and its code
    /// in drop events.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The outcome of a counter index or drop event code.
    pub const fn from_index(index: u32) -> Option<Self> {
        if (index as usize) < Self::ALL.len() {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }

    /// The program set that counts it.
    pub const fn counted(self) -> Counted {
        match self {
            Outcome::SocketNoEndpoints
            | Outcome::SocketNoLocalEndpoints
            | Outcome::SocketPolicyDenied => Counted::Socket,
            _ => Counted::Tc,
        }
    }

    /// Whether the packet or system call was refused or dropped (and, on the
    /// tc path, reported as a drop event).
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Outcome::Forward
                | Outcome::Reply
                | Outcome::NewFlow
                | Outcome::FibRedirect
                | Outcome::IcmpError
                | Outcome::PolicyAllowed
                | Outcome::FlowConfirmed
        )
    }

    /// The metric label: `lb_tc_packets{outcome}` or `lb_socket_refused{reason}`.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Forward => "forward",
            Outcome::Reply => "reply",
            Outcome::NewFlow => "new_flow",
            Outcome::Reject => "reject",
            Outcome::DropNoEndpoints => "drop_no_endpoints",
            Outcome::DropNoLocalEndpoints => "drop_no_local_endpoints",
            Outcome::DropSourceRange => "drop_source_range",
            Outcome::DropNoBackend => "drop_no_backend",
            Outcome::DropSnatPortsExhausted => "drop_snat_ports_exhausted",
            Outcome::DropNoSnatAddress => "drop_no_snat_address",
            Outcome::ConntrackInsertFailed => "conntrack_insert_failed",
            Outcome::FibRedirect => "fib_redirect",
            Outcome::IcmpError => "icmp_error",
            Outcome::SocketNoEndpoints => "no_endpoints",
            Outcome::SocketNoLocalEndpoints => "no_local_endpoints",
            Outcome::PolicyAllowed => "policy_allowed",
            Outcome::PolicyDeniedEgress => "policy_denied_egress",
            Outcome::PolicyDeniedIngress => "policy_denied_ingress",
            Outcome::PolicySpoofed => "policy_spoofed_source",
            Outcome::PolicyFailClosed => "policy_fail_closed",
            Outcome::PolicyUnparsed => "policy_unparsed",
            Outcome::SocketPolicyDenied => "policy_denied",
            Outcome::DropNoConnection => "drop_no_connection",
            Outcome::FlowConfirmed => "flow_confirmed",
            Outcome::DropResetOutOfWindow => "drop_reset_out_of_window",
            Outcome::XdpDropDenied => "xdp_drop_denied",
            Outcome::XdpDropSourceRange => "xdp_drop_source_range",
            Outcome::DropUnparsed => "drop_unparsed",
        }
    }

    /// What it means for the client, in words.
    pub const fn explanation(self) -> &'static str {
        match self {
            Outcome::Forward => "forwarded to the flow's backend",
            Outcome::Reply => "a reply, translated back to come from the frontend",
            Outcome::NewFlow => "a new flow, given a backend",
            Outcome::Reject => {
                "refused: the Service has no endpoints (answered with a TCP reset or ICMP unreachable)"
            }
            Outcome::DropNoEndpoints => {
                "dropped: the Service has no endpoints and the node's answer rate limit was reached"
            }
            Outcome::DropNoLocalEndpoints => {
                "dropped: traffic policy Local and no endpoint on this node"
            }
            Outcome::DropSourceRange => "dropped: source address not in loadBalancerSourceRanges",
            Outcome::DropNoBackend => {
                "dropped: the chosen backend was being replaced (a retry succeeds)"
            }
            Outcome::DropSnatPortsExhausted => {
                "dropped: no free SNAT port towards the chosen backend"
            }
            Outcome::DropNoSnatAddress => {
                "dropped: no node address (or backend) of the packet's IP family to translate to"
            }
            Outcome::ConntrackInsertFailed => "dropped: the conntrack table could not take the flow",
            Outcome::FibRedirect => "redirected to its next hop",
            Outcome::IcmpError => "an ICMP error about a translated flow, translated with it",
            Outcome::SocketNoEndpoints => {
                "refused at connect(): the Service has no endpoints (ECONNREFUSED)"
            }
            Outcome::SocketNoLocalEndpoints => {
                "refused at connect(): traffic policy Local and no endpoint on this node \
                 (EHOSTUNREACH)"
            }
            Outcome::PolicyAllowed => "a new flow, allowed by network policy",
            Outcome::PolicyDeniedEgress => {
                "dropped: the source pod's egress network policy does not allow the destination"
            }
            Outcome::PolicyDeniedIngress => {
                "dropped: the destination pod's ingress network policy does not allow the source"
            }
            Outcome::PolicySpoofed => {
                "dropped: the source address is not one of the sending pod's addresses"
            }
            Outcome::PolicyFailClosed => {
                "dropped: the pod's network policy could not be programmed (a map is full), \
                 so its new flows are refused"
            }
            Outcome::PolicyUnparsed => {
                "dropped: a fragment to or from an isolated pod whose ports could not be read"
            }
            Outcome::SocketPolicyDenied => {
                "refused at connect(): the pod's egress network policy does not allow the \
                 destination (EPERM)"
            }
            Outcome::DropNoConnection => {
                "dropped: a TCP segment other than a SYN for a frontend, of no known connection"
            }
            Outcome::FlowConfirmed => {
                "a flow's handshake completed or its backend answered: confirmed"
            }
            Outcome::DropResetOutOfWindow => {
                "dropped: a TCP reset with a sequence number out of the receiver's window"
            }
            Outcome::XdpDropDenied => {
                "dropped at the node's edge (XDP): the source is in the deny list"
            }
            Outcome::XdpDropSourceRange => {
                "dropped at the node's edge (XDP): source address not in loadBalancerSourceRanges"
            }
            Outcome::DropUnparsed => {
                "dropped: a packet to a LoadBalancer IP or externalIP whose headers cannot be read"
            }
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Outcome::ALL.len() {
        // Counter order is value order, and every value fits the arrays.
        assert!(Outcome::ALL[i] as usize == i);
        i += 1;
    }
    assert!(Outcome::ALL.len() <= OUTCOME_SLOTS as usize);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_explanations_are_distinct() {
        for (i, a) in Outcome::ALL.iter().enumerate() {
            for b in &Outcome::ALL[i + 1..] {
                assert_ne!(a.explanation(), b.explanation());
                if a.counted() == b.counted() {
                    assert_ne!(a.label(), b.label());
                }
            }
            assert_eq!(Outcome::from_index(a.index()), Some(*a));
        }
        assert_eq!(Outcome::from_index(Outcome::ALL.len() as u32), None);
    }

    #[test]
    fn drops_are_explained_as_refusals_or_drops() {
        for outcome in Outcome::ALL {
            let words = outcome.explanation();
            assert_eq!(
                outcome.is_drop(),
                words.starts_with("dropped") || words.starts_with("refused"),
                "{outcome:?}: {words}"
            );
        }
    }
}
