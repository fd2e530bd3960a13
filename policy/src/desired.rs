//! What the policy compiler decides the kernel should hold, and the
//! verdict those contents give a flow: the same lookups the tc programs
//! make, for tests, `lbctl` and reports.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnetwork::IpNetwork;
use lb_common::policy::{
    IpcacheValue, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED,
    ENDPOINT_FAIL_CLOSED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_REMOTE_NODE, IDENTITY_WORLD, POLICY_PREFIX_IDENTITY, POLICY_PREFIX_PROTO,
};

/// Which protocols and destination ports an entry matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// Every protocol and port.
    Any,
    /// Every port of one protocol (and protocols without ports).
    Proto(u8),
    /// A block of ports of one protocol: `port` with its first `prefix`
    /// bits significant.
    Ports {
        /// The protocol.
        proto: u8,
        /// The first port of the block.
        port: u16,
        /// Significant bits of `port` (16: one port).
        prefix: u8,
    },
}

impl L4 {
    /// Whether a packet of `proto` to `port` matches.
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        match *self {
            L4::Any => true,
            L4::Proto(p) => p == proto,
            L4::Ports {
                proto: p,
                port: first,
                prefix,
            } => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u16::MAX << (16 - prefix)
                };
                p == proto && port & mask == first & mask
            }
        }
    }

    /// The trie prefix length of an entry with this L4 part.
    pub fn key_prefix(&self) -> u32 {
        match self {
            L4::Any => POLICY_PREFIX_IDENTITY,
            L4::Proto(_) => POLICY_PREFIX_PROTO,
            L4::Ports { prefix, .. } => POLICY_PREFIX_PROTO + u32::from(*prefix),
        }
    }
}

/// One entry of a policy set: a peer identity allowed in a direction on
/// some protocols and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    /// `DIRECTION_*`.
    pub direction: u8,
    /// The peer identity, or `IDENTITY_ANY`.
    pub identity: u32,
    /// Protocols and ports.
    pub l4: L4,
}

/// What a policy set allows: entries, each with the rule that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetContent {
    /// The entries and their rules.
    pub entries: BTreeMap<Entry, u32>,
    /// 128-bit digest of the entries, which names the set across restarts.
    pub digest: [u8; 16],
}

impl SetContent {
    /// The rule of the entry that allows a packet in `direction` from or to
    /// a peer with identities `peer`, of `proto` to `port`, if any.
    pub fn allows(&self, direction: u8, peer: IpcacheValue, proto: u8, port: u16) -> Option<u32> {
        [peer.identity, peer.cidr_identity, IDENTITY_ANY]
            .into_iter()
            .find_map(|identity| {
                self.entries.iter().find_map(|(entry, rule)| {
                    (entry.direction == direction
                        && entry.identity == identity
                        && entry.l4.matches(proto, port))
                    .then_some(*rule)
                })
            })
    }
}

/// An identity as allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Digest of its canonical labels (or CIDR).
    pub digest: [u8; 16],
    /// Its canonical labels, or `cidr:<prefix>`.
    pub text: String,
}

/// One of this node's pods, as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `namespace/name`.
    pub name: String,
    /// The pod's UID, to find its cgroups.
    pub uid: String,
    /// Its identity.
    pub identity: u32,
    /// Its policy set (0: none, not isolated).
    pub set: u32,
    /// `ENDPOINT_*` bits.
    pub flags: u32,
}

/// Everything the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDesired {
    /// Identities by number.
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// Addresses and prefixes to identities.
    pub ipcache: BTreeMap<IpNetwork, IpcacheValue>,
    /// This node's pods by address.
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    /// The names (`namespace/name`) of the cluster's pods by address, for
    /// display.
    pub pod_names: BTreeMap<IpAddr, Arc<str>>,
    /// Policy sets by number.
    pub sets: BTreeMap<u32, Arc<SetContent>>,
    /// Rule names by number: `namespace/policy ingress[0]`.
    pub rules: BTreeMap<u32, String>,
    /// Whether any policy exists: pod interfaces are then enforced (an
    /// isolated pod elsewhere may trust this node's pods' addresses).
    pub enforcing: bool,
}

/// The verdict for a flow, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; the rules that allowed each side, when a side is isolated.
    Allowed {
        /// The source pod's egress rule.
        egress: Option<u32>,
        /// The destination pod's ingress rule.
        ingress: Option<u32>,
    },
    /// The source pod is isolated for egress and nothing allows the flow.
    DeniedEgress,
    /// The destination pod is isolated for ingress and nothing allows it.
    DeniedIngress,
    /// A pod of the flow has no programmed policy: refused.
    FailClosed,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allowed { .. } => write!(f, "allowed"),
            Verdict::DeniedEgress => write!(f, "denied by the source's egress policy"),
            Verdict::DeniedIngress => write!(f, "denied by the destination's ingress policy"),
            Verdict::FailClosed => write!(f, "refused: the pod's policy is not programmed"),
        }
    }
}

/// What a verdict needs to know: the same three lookups the tc programs
/// make, over the compiler's desired state or over the kernel's maps.
pub trait PolicyLookup {
    /// The policy set and `ENDPOINT_*` flags of the endpoint at `addr`,
    /// when it is one of this node's pods.
    fn endpoint(&self, addr: IpAddr) -> Option<(u32, u32)>;
    /// The identities of `addr` (the longest ipcache prefix covering it,
    /// else the world).
    fn identities(&self, addr: IpAddr) -> IpcacheValue;
    /// The rule of the entry of `set` that allows `direction` for `peer` on
    /// `proto` to `port`, if one does.
    fn allows(
        &self,
        set: u32,
        direction: u8,
        peer: IpcacheValue,
        proto: u8,
        port: u16,
    ) -> Option<u32>;

    /// The verdict of this node for a flow from `src` to `dst`, `proto` to
    /// `port`, after any service translation. `from_host` says the packet
    /// was sent by this node itself (its ingress is then not checked, as
    /// for kubelet probes).
    fn verdict(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16, from_host: bool) -> Verdict {
        let src_ep = self.endpoint(src);
        let dst_ep = self.endpoint(dst);
        if [src_ep, dst_ep]
            .iter()
            .flatten()
            .any(|(_, flags)| flags & ENDPOINT_FAIL_CLOSED != 0)
        {
            return Verdict::FailClosed;
        }
        let mut egress = None;
        if let Some((set, _)) = src_ep.filter(|(_, flags)| flags & ENDPOINT_EGRESS_ISOLATED != 0) {
            match self.allows(set, DIRECTION_EGRESS, self.identities(dst), proto, port) {
                Some(rule) => egress = Some(rule),
                None => return Verdict::DeniedEgress,
            }
        }
        let mut ingress = None;
        if let Some((set, _)) = dst_ep.filter(|(_, flags)| flags & ENDPOINT_INGRESS_ISOLATED != 0) {
            if !from_host {
                let mut peer = self.identities(src);
                if peer.identity == IDENTITY_HOST {
                    peer.identity = IDENTITY_WORLD;
                }
                match self.allows(set, DIRECTION_INGRESS, peer, proto, port) {
                    Some(rule) => ingress = Some(rule),
                    None => return Verdict::DeniedIngress,
                }
            }
        }
        Verdict::Allowed { egress, ingress }
    }
}

/// The identities of `addr` among `prefixes`: the longest that covers it.
pub fn longest_match<'a>(
    prefixes: impl Iterator<Item = (&'a IpNetwork, &'a IpcacheValue)>,
    addr: IpAddr,
) -> IpcacheValue {
    prefixes
        .filter(|(prefix, _)| prefix.contains(addr) && prefix.is_ipv4() == addr.is_ipv4())
        .max_by_key(|(prefix, _)| prefix.prefix())
        .map_or(
            IpcacheValue {
                identity: IDENTITY_WORLD,
                cidr_identity: IDENTITY_WORLD,
            },
            |(_, value)| *value,
        )
}

impl PolicyLookup for PolicyDesired {
    fn endpoint(&self, addr: IpAddr) -> Option<(u32, u32)> {
        self.endpoints.get(&addr).map(|ep| (ep.set, ep.flags))
    }

    fn identities(&self, addr: IpAddr) -> IpcacheValue {
        longest_match(self.ipcache.iter(), addr)
    }

    fn allows(
        &self,
        set: u32,
        direction: u8,
        peer: IpcacheValue,
        proto: u8,
        port: u16,
    ) -> Option<u32> {
        self.sets.get(&set)?.allows(direction, peer, proto, port)
    }
}

/// The name of a reserved identity (`host`, `world`, ...).
pub fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    match identity {
        IDENTITY_ANY => Some("any"),
        IDENTITY_HOST => Some("host"),
        IDENTITY_WORLD => Some("world"),
        IDENTITY_REMOTE_NODE => Some("remote-node"),
        _ => None,
    }
}

/// Flags of an endpoint isolated for `ingress` and `egress`.
pub fn isolation_flags(ingress: bool, egress: bool) -> u32 {
    let mut flags = 0;
    if ingress {
        flags |= ENDPOINT_INGRESS_ISOLATED;
    }
    if egress {
        flags |= ENDPOINT_EGRESS_ISOLATED;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::net::{PROTO_TCP, PROTO_UDP};

    #[test]
    fn l4_parts_match_what_their_prefix_covers() {
        assert!(L4::Any.matches(1, 0));
        assert!(L4::Proto(PROTO_UDP).matches(PROTO_UDP, 53));
        assert!(!L4::Proto(PROTO_UDP).matches(PROTO_TCP, 53));
        let block = L4::Ports {
            proto: PROTO_TCP,
            port: 5000,
            prefix: 13,
        };
        assert!(block.matches(PROTO_TCP, 5007));
        assert!(!block.matches(PROTO_TCP, 5008));
        assert_eq!(block.key_prefix(), 93);
        assert_eq!(L4::Any.key_prefix(), 72);
    }
}
