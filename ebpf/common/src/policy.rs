//! Identity-based network policy, checked by the tc programs on every local
//! pod's interface after service translation.
//!
//! - **Identities** are numbers for sets of identity-relevant labels (a
//!   pod's labels, its namespace's labels and name), plus reserved ones and
//!   one per CIDR that a policy names. They fit in 16 bits and are
//!   node-local: no identity number leaves the node.
//! - **ipcache** ([`IpcacheKey`] -> [`IpcacheValue`]): an LPM trie from
//!   address or prefix to identity: every pod of the cluster, node addresses,
//!   and the CIDRs policies name. An address no prefix covers is
//!   [`IDENTITY_WORLD`].
//! - **Endpoints** ([`EndpointValue`], by pod address): this node's pods,
//!   with their interface, their policy set and whether they are isolated
//!   for ingress or egress.
//! - **Policy entries** ([`PolicyKey`] -> [`PolicyValue`]): an LPM trie of
//!   what a policy set allows: (set, direction, peer identity, protocol, port
//!   prefix). A wildcard peer is identity [`IDENTITY_ANY`]; a wildcard
//!   protocol or port is a shorter prefix. A flow is allowed in a direction
//!   if an entry matches the peer's identity, its CIDR identity, or any peer.
//! - **Policy conntrack** ([`PolicyCtValue`], by the tuple on the pod's side
//!   of any translation): each flow's verdict with the node's policy
//!   revision when it was made; a flow whose revision is older than the
//!   current one ([`PolicyState::revision`]) is checked again on its next
//!   packet, so a removed allow cuts established connections at once.

use crate::{
    assert_layout,
    conntrack::{expired, step, CtStep},
    net::Addr,
};

/// Peer identity of a policy entry that matches any peer; also "no
/// identity".
pub const IDENTITY_ANY: u32 = 0;
/// This node (its own addresses), for packets the node itself sent.
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside the cluster that no policy CIDR covers.
pub const IDENTITY_WORLD: u32 = 2;
/// The addresses of the cluster's other nodes.
pub const IDENTITY_REMOTE_NODE: u32 = 6;
/// The first identity for a set of labels.
pub const IDENTITY_FIRST_LABELS: u32 = 256;
/// The first identity for a CIDR a policy names; label identities end below.
pub const IDENTITY_FIRST_CIDR: u32 = 0x8000;
/// The largest identity: identities fit in 16 bits.
pub const IDENTITY_MAX: u32 = 0xffff;

/// [`PolicyKey::direction`]: traffic into the endpoint.
pub const DIRECTION_INGRESS: u8 = 0;
/// [`PolicyKey::direction`]: traffic out of the endpoint.
pub const DIRECTION_EGRESS: u8 = 1;

/// `IPPROTO_SCTP`: policies name it; the datapath reads its ports like
/// TCP's and UDP's.
pub const PROTO_SCTP: u8 = 132;

/// Prefix length of a [`PolicyKey`] that matches any protocol and port of
/// a peer: the set, direction and identity.
pub const POLICY_PREFIX_IDENTITY: u32 = 32 + 8 + 32;
/// Prefix length of a key that matches any port of one protocol.
pub const POLICY_PREFIX_PROTO: u32 = POLICY_PREFIX_IDENTITY + 8;
/// Prefix length of a key for one port.
pub const POLICY_PREFIX_FULL: u32 = POLICY_PREFIX_PROTO + 16;

/// Key data of the policy trie, most significant first: the set, the
/// direction, the peer identity, the protocol and the destination port, all
/// in network byte order so the trie matches them bit by bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The policy set, big-endian.
    pub set: [u8; 4],
    /// `DIRECTION_*`.
    pub direction: u8,
    /// The peer's identity, big-endian ([`IDENTITY_ANY`] for any peer).
    pub identity: [u8; 4],
    /// The IP protocol.
    pub proto: u8,
    /// The destination port, big-endian (network byte order).
    pub port: [u8; 2],
}
assert_layout!(PolicyKey, 12, { set: 0, direction: 4, identity: 5, proto: 9, port: 10 });

impl PolicyKey {
    /// The key of a flow to look up: `port` in network byte order, as
    /// loaded from the packet.
    #[inline(always)]
    pub const fn new(set: u32, direction: u8, identity: u32, proto: u8, port_be: u16) -> Self {
        Self {
            set: set.to_be_bytes(),
            direction,
            identity: identity.to_be_bytes(),
            proto,
            port: port_be.to_ne_bytes(),
        }
    }
}

/// [`PolicyValue::flags`]: the entry allows what it matches.
pub const POLICY_ALLOW: u32 = 1 << 0;

/// What an entry of the policy trie says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// `POLICY_*` bits.
    pub flags: u32,
    /// The rule that produced the entry (its name is in
    /// [`crate::maps::POLICY_RULES`]).
    pub rule: u32,
}
assert_layout!(PolicyValue, 8, { flags: 0, rule: 4 });

/// Key data of the ipcache trie: an address (IPv4-mapped for IPv4); the LPM
/// prefix length counts from its first bit (`96 + n` for an IPv4 `/n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    /// The address or prefix, network byte order.
    pub addr: Addr,
}
assert_layout!(IpcacheKey, 16, { addr: 0 });

/// The identities of an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    /// Its security identity: a pod's label identity, [`IDENTITY_HOST`] or
    /// [`IDENTITY_REMOTE_NODE`] for node addresses, a CIDR identity or
    /// [`IDENTITY_WORLD`] for the rest.
    pub identity: u32,
    /// The identity of the longest CIDR any policy names that covers the
    /// address ([`IDENTITY_WORLD`] when none does): what `ipBlock` peers
    /// match, pods included.
    pub cidr_identity: u32,
}
assert_layout!(IpcacheValue, 8, { identity: 0, cidr_identity: 4 });

/// [`EndpointValue::flags`]: a policy selects the endpoint for ingress:
/// traffic into it needs an allow.
pub const ENDPOINT_INGRESS_ISOLATED: u32 = 1 << 0;
/// [`EndpointValue::flags`]: a policy selects the endpoint for egress.
pub const ENDPOINT_EGRESS_ISOLATED: u32 = 1 << 1;
/// [`EndpointValue::flags`]: the endpoint's policy entries could not be
/// written (a full map): every new flow to or from it is dropped until they
/// are.
pub const ENDPOINT_FAIL_CLOSED: u32 = 1 << 2;

/// One of this node's pods, by address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// The host end of its interface: packets from the pod arrive there,
    /// and only packets with the pod's addresses may (0 while it is not
    /// known: the pod's packets pass nowhere).
    pub ifindex: u32,
    /// Its policy set: the key prefix of its entries.
    pub set: u32,
    /// Its identity, never [`IDENTITY_ANY`] (which marks "no endpoint" in
    /// the programs).
    pub identity: u32,
    /// `ENDPOINT_*` bits.
    pub flags: u32,
}
assert_layout!(EndpointValue, 16, { ifindex: 0, set: 4, identity: 8, flags: 12 });

/// Node-wide policy state: array of one, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Bumped by the agent after every change that can change a verdict:
    /// flows checked under an older revision are checked again.
    pub revision: u32,
    /// `POLICY_STATE_*` bits.
    pub flags: u32,
}
assert_layout!(PolicyState, 8, { revision: 0, flags: 4 });

/// [`PolicyState::flags`]: policy is enforced on this node's pod interfaces.
pub const POLICY_STATE_ENFORCING: u32 = 1 << 0;
/// [`PolicyState::flags`]: the socket programs refuse, at `connect()` and
/// `sendmsg()`, what the caller's egress policy denies (some pod of this
/// node is isolated for egress, and the agent asks for it).
pub const POLICY_STATE_AT_CONNECT: u32 = 1 << 1;

/// Whether a policy set allows `peer`, given whether the set has an entry
/// for an identity (on the flow's direction, protocol and port): for the
/// peer's identity, its CIDR identity, or any peer, the order the programs
/// ask the trie in.
#[inline(always)]
pub fn allowed_by(peer: IpcacheValue, mut has_entry: impl FnMut(u32) -> bool) -> bool {
    has_entry(peer.identity)
        || (peer.cidr_identity != peer.identity && has_entry(peer.cidr_identity))
        || has_entry(IDENTITY_ANY)
}

/// [`PolicyCtValue::flags`]: the entry matches the replies of a flow (the
/// reverse of the tuple that opened it).
pub const POLICY_CT_REPLY: u8 = 1 << 0;
/// [`PolicyCtValue::flags`]: the flow is allowed (else: it was allowed,
/// and a policy change cut it).
pub const POLICY_CT_ALLOWED: u8 = 1 << 1;
/// [`PolicyCtValue::flags`]: the node itself opened the flow (its host
/// identity counts when the flow is checked again).
pub const POLICY_CT_LOCAL_OPENER: u8 = 1 << 2;
/// [`PolicyCtValue::flags`]: the packets matching the entry go to a pod of
/// this node, whose egress program would check them again.
pub const POLICY_CT_TO_LOCAL_POD: u8 = 1 << 3;

/// A flow's policy verdict, kept with the revision it was made under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCtValue {
    /// [`PolicyState::revision`] when the verdict was made.
    pub revision: u32,
    /// The pod interface the packets matching the entry come from (its host
    /// end), or 0 when they come from elsewhere: a packet from a pod that
    /// matches another pod's entry is not that flow's.
    pub ifindex: u32,
    /// `POLICY_CT_*` bits.
    pub flags: u8,
    /// TCP state, as [`crate::conntrack::CtValue::state`].
    pub state: u8,
    /// FIN bits, as [`crate::conntrack::CtValue::fins`].
    pub fins: u8,
    /// Why the flow is refused ([`crate::outcome::Outcome::index`]) when
    /// [`POLICY_CT_ALLOWED`] is clear: a flow a policy change cut stays cut
    /// while its entries live, instead of coming back as a mid-stream
    /// pickup of the other direction.
    pub outcome: u8,
    /// The identity of the flow's source and destination when the verdict
    /// was made, for reports.
    pub src_identity: u16,
    /// See `src_identity`.
    pub dst_identity: u16,
    /// `bpf_ktime_get_boot_ns` of the last packet in either direction.
    pub last_seen_ns: u64,
    /// For packets going to a pod of this node: the host end of its
    /// interface, whose peer the packets are handed to, or 0 while not
    /// known (asked of the FIB again when the entry is refreshed).
    pub hop_ifindex: u32,
    /// The Ethernet destination and source addresses for `hop_ifindex`.
    pub hop_macs: [u8; 12],
}
assert_layout!(PolicyCtValue, 40, {
    revision: 0, ifindex: 4, flags: 8, state: 9, fins: 10, outcome: 11, src_identity: 12,
    dst_identity: 14, last_seen_ns: 16, hop_ifindex: 24, hop_macs: 28,
});

impl PolicyCtValue {
    /// The entry after a packet with `tcp_flags` (0 for other protocols).
    #[inline(always)]
    pub const fn step(&self, proto: u8, tcp_flags: u8) -> CtStep {
        step(
            self.state,
            self.fins,
            self.flags & POLICY_CT_REPLY != 0,
            proto,
            tcp_flags,
        )
    }

    /// Whether the entry has expired at `now_ns` (`CLOCK_BOOTTIME`).
    #[inline(always)]
    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        expired(proto, self.state, self.last_seen_ns, now_ns)
    }
}

/// Longest label set kept for display of an identity, in bytes.
pub const IDENTITY_LABELS_LEN: usize = 232;

/// An identity as the agent allocated it: a digest of its labels, to adopt
/// the same number after a restart, and the labels for display.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityValue {
    /// 128-bit digest of the canonical label set.
    pub digest: [u8; 16],
    /// The canonical label set (`k=v,...`), NUL-padded, truncated.
    pub labels: [u8; IDENTITY_LABELS_LEN],
}
assert_layout!(IdentityValue, 248, { digest: 0, labels: 16 });

/// A policy set as the agent allocated it: a digest of what it allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySetValue {
    /// 128-bit digest of the set's entries.
    pub digest: [u8; 16],
}
assert_layout!(PolicySetValue, 16, { digest: 0 });

/// Longest display name kept (rule and endpoint names), in bytes.
pub const POLICY_NAME_LEN: usize = 128;

/// A NUL-padded display name: `namespace/policy ingress[0]` for a rule,
/// `namespace/pod` for an endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyName {
    /// The bytes, NUL-padded.
    pub bytes: [u8; POLICY_NAME_LEN],
}
assert_layout!(PolicyName, POLICY_NAME_LEN, { bytes: 0 });

#[cfg(feature = "user")]
crate::user_pod!(
    PolicyKey,
    PolicyValue,
    IpcacheKey,
    IpcacheValue,
    EndpointValue,
    PolicyState,
    PolicyCtValue,
    IdentityValue,
    PolicySetValue,
    PolicyName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_wildcard_fields_last() {
        let key = PolicyKey::new(0x0102_0304, DIRECTION_EGRESS, 0x8001, 6, 80u16.to_be());
        assert_eq!(key.set, [1, 2, 3, 4]);
        assert_eq!(key.identity, [0, 0, 0x80, 1]);
        assert_eq!(key.port, [0, 80]);
        assert_eq!(POLICY_PREFIX_FULL, 96);
    }

    #[test]
    fn identity_ranges_fit_sixteen_bits() {
        const _: () = assert!(IDENTITY_FIRST_LABELS < IDENTITY_FIRST_CIDR);
        const _: () = assert!(IDENTITY_MAX == u16::MAX as u32);
        const _: () = assert!(IDENTITY_REMOTE_NODE < IDENTITY_FIRST_LABELS);
    }
}
