//! The policy maps' contents as plain data, and the map keys and values
//! they are written as.
//!
//! [`PolicyTables`] is what the kernel holds (read back from the pinned
//! maps after a restart, then kept in memory as writes succeed);
//! [`PolicyTarget`] is what it should hold, built from the compiler's
//! [`PolicyDesired`] and the interfaces the agent found for its pods.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use lb_common::{
    net::{v4_mapped, Addr},
    policy::{
        EndpointValue, IdentityValue, IpcacheKey, IpcacheValue, PolicyKey, PolicyName,
        PolicySetValue, PolicyState, PolicyValue, ENDPOINT_EGRESS_ISOLATED, IDENTITY_ANY,
        IDENTITY_LABELS_LEN, POLICY_ALLOW, POLICY_NAME_LEN, POLICY_PREFIX_IDENTITY,
        POLICY_PREFIX_PROTO, POLICY_STATE_AT_CONNECT, POLICY_STATE_ENFORCING,
    },
};

use crate::desired::{
    longest_match, Entry, IdentityInfo, PolicyDesired, PolicyLookup, SetContent, L4,
};

/// A policy set as the kernel holds it: its entries, and its digest once
/// they are all written (a set without one is incomplete).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedSet {
    /// The digest of its entries, written after them.
    pub digest: Option<[u8; 16]>,
    /// Its entries and the rules they came from.
    pub entries: BTreeMap<Entry, u32>,
}

/// What the policy maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// Identities: digests and (possibly truncated) labels.
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// Rule names (possibly truncated).
    pub rules: BTreeMap<u32, String>,
    /// Policy sets.
    pub sets: BTreeMap<u32, AppliedSet>,
    /// Addresses and prefixes to identities.
    pub ipcache: BTreeMap<IpNetwork, IpcacheValue>,
    /// This node's pods by address.
    pub endpoints: BTreeMap<IpAddr, EndpointValue>,
    /// The cluster's pods' names by address (possibly truncated).
    pub pod_names: BTreeMap<IpAddr, Arc<str>>,
    /// The revision and flags.
    pub state: PolicyState,
}

impl PolicyTables {
    /// Policy entries of every set together.
    pub fn entry_count(&self) -> usize {
        self.sets.values().map(|set| set.entries.len()).sum()
    }
}

/// The verdicts the maps' contents give, as the tc programs compute them.
impl PolicyLookup for PolicyTables {
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
        let entries = &self.sets.get(&set)?.entries;
        [peer.identity, peer.cidr_identity, IDENTITY_ANY]
            .into_iter()
            .find_map(|identity| {
                entries
                    .iter()
                    .filter(|(entry, _)| {
                        entry.direction == direction
                            && entry.identity == identity
                            && entry.l4.matches(proto, port)
                    })
                    // The trie answers with the longest matching prefix.
                    .max_by_key(|(entry, _)| entry.l4.key_prefix())
                    .map(|(_, rule)| *rule)
            })
    }
}

/// What the policy maps should hold. The cluster-wide parts borrow the
/// compiler's state (no copy per pass); tests build them owned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTarget<'a> {
    /// Identities.
    pub identities: Cow<'a, BTreeMap<u32, IdentityInfo>>,
    /// Rule names, truncated as the map keeps them.
    pub rules: BTreeMap<u32, String>,
    /// Policy sets.
    pub sets: Cow<'a, BTreeMap<u32, Arc<SetContent>>>,
    /// Addresses and prefixes to identities.
    pub ipcache: Cow<'a, BTreeMap<IpNetwork, IpcacheValue>>,
    /// This node's pods by address.
    pub endpoints: BTreeMap<IpAddr, EndpointValue>,
    /// The cluster's pods' names by address (the map keeps them truncated:
    /// see [`name_value`]).
    pub pod_names: Cow<'a, BTreeMap<IpAddr, Arc<str>>>,
    /// Whether policy is enforced on this node's pod interfaces.
    pub enforcing: bool,
    /// Whether the socket programs refuse at `connect()` what a pod's egress
    /// policy denies.
    pub at_connect: bool,
}

impl<'a> PolicyTarget<'a> {
    /// The target for `desired`, with the host end of each endpoint's
    /// interface as `interface` finds it (0 while unknown).
    pub fn new(
        desired: &'a PolicyDesired,
        interface: impl Fn(IpAddr) -> Option<u32>,
        enforcing: bool,
        at_connect: bool,
    ) -> Self {
        let endpoints = desired
            .endpoints
            .iter()
            .map(|(ip, ep)| {
                let value = EndpointValue {
                    ifindex: interface(*ip).unwrap_or(0),
                    set: ep.set,
                    identity: ep.identity,
                    flags: ep.flags,
                };
                (*ip, value)
            })
            .collect();
        Self {
            identities: Cow::Borrowed(&desired.identities),
            rules: desired
                .rules
                .iter()
                .map(|(id, name)| (*id, name_kept(name).to_string()))
                .collect(),
            sets: Cow::Borrowed(&desired.sets),
            ipcache: Cow::Borrowed(&desired.ipcache),
            endpoints,
            pod_names: Cow::Borrowed(&desired.pod_names),
            enforcing,
            at_connect,
        }
    }

    /// The state flags this target asks for: refusal at `connect()` only
    /// where some endpoint is isolated for egress.
    pub fn state_flags(&self) -> u32 {
        if !self.enforcing {
            return 0;
        }
        let egress = self
            .endpoints
            .values()
            .any(|ep| ep.flags & ENDPOINT_EGRESS_ISOLATED != 0);
        if self.at_connect && egress {
            POLICY_STATE_ENFORCING | POLICY_STATE_AT_CONNECT
        } else {
            POLICY_STATE_ENFORCING
        }
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A display name as the maps keep it (NUL-terminated in
/// [`POLICY_NAME_LEN`] bytes).
pub fn name_kept(name: &str) -> &str {
    truncated(name, POLICY_NAME_LEN - 1)
}

/// An address as the maps store it (IPv4-mapped for IPv4).
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [word(0), word(4), word(8), word(12)]
        }
    }
}

/// The address an [`Addr`] holds.
pub fn ip_of(addr: &Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The LPM key of an ipcache prefix: its length counted over the mapped
/// 128-bit address, and the key data.
pub fn ipcache_key(prefix: &IpNetwork) -> (u32, IpcacheKey) {
    let length = match prefix {
        IpNetwork::V4(v4) => 96 + u32::from(v4.prefix()),
        IpNetwork::V6(v6) => u32::from(v6.prefix()),
    };
    (
        length,
        IpcacheKey {
            addr: addr_of(prefix.network()),
        },
    )
}

/// The prefix of an ipcache key read back; `None` for one no agent writes.
pub fn ipcache_prefix(length: u32, key: &IpcacheKey) -> Option<IpNetwork> {
    match ip_of(&key.addr) {
        IpAddr::V4(v4) if length >= 96 => {
            IpNetwork::new(IpAddr::V4(v4), u8::try_from(length - 96).ok()?).ok()
        }
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => IpNetwork::new(IpAddr::V6(v6), u8::try_from(length).ok()?).ok(),
    }
}

/// The LPM key of a set's entry: prefix length and key data, the bits past
/// the prefix zero.
pub fn entry_key(set: u32, entry: &Entry) -> (u32, PolicyKey) {
    let (proto, port) = match entry.l4 {
        L4::Any => (0, 0),
        L4::Proto(proto) => (proto, 0),
        L4::Ports { proto, port, .. } => (proto, port),
    };
    (
        entry.l4.key_prefix(),
        PolicyKey::new(set, entry.direction, entry.identity, proto, port.to_be()),
    )
}

/// The set and entry of a policy trie key read back; `None` for a key no
/// agent writes.
pub fn entry_of(length: u32, key: &PolicyKey) -> Option<(u32, Entry)> {
    let set = u32::from_be_bytes(key.set);
    let identity = u32::from_be_bytes(key.identity);
    let l4 = match length {
        POLICY_PREFIX_IDENTITY => L4::Any,
        POLICY_PREFIX_PROTO => L4::Proto(key.proto),
        n if n > POLICY_PREFIX_PROTO && n <= POLICY_PREFIX_PROTO + 16 => L4::Ports {
            proto: key.proto,
            port: u16::from_be_bytes(key.port),
            prefix: (n - POLICY_PREFIX_PROTO) as u8,
        },
        _ => return None,
    };
    Some((
        set,
        Entry {
            direction: key.direction,
            identity,
            l4,
        },
    ))
}

/// The value of an entry allowed by `rule`.
pub fn entry_value(rule: u32) -> PolicyValue {
    PolicyValue {
        flags: POLICY_ALLOW,
        rule,
    }
}

/// The map value of an identity.
pub fn identity_value(info: &IdentityInfo) -> IdentityValue {
    let mut labels = [0u8; IDENTITY_LABELS_LEN];
    let text = truncated(&info.text, IDENTITY_LABELS_LEN);
    labels[..text.len()].copy_from_slice(text.as_bytes());
    IdentityValue {
        digest: info.digest,
        labels,
    }
}

/// An identity read back.
pub fn identity_info(value: &IdentityValue) -> IdentityInfo {
    IdentityInfo {
        digest: value.digest,
        text: text_of(&value.labels),
    }
}

/// The map value of a set's digest.
pub fn set_value(digest: [u8; 16]) -> PolicySetValue {
    PolicySetValue { digest }
}

/// A display name as the maps keep it.
pub fn name_value(name: &str) -> PolicyName {
    let mut bytes = [0u8; POLICY_NAME_LEN];
    let text = name_kept(name);
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    PolicyName { bytes }
}

/// A display name read back.
pub fn name_text(name: &PolicyName) -> String {
    text_of(&name.bytes)
}

fn text_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::policy::{DIRECTION_EGRESS, POLICY_PREFIX_FULL};

    #[test]
    fn keys_round_trip() {
        for prefix in [
            "10.244.1.0/24",
            "10.0.0.7/32",
            "0.0.0.0/0",
            "fd00::/8",
            "::/0",
        ] {
            let prefix: IpNetwork = prefix.parse().unwrap();
            let (length, key) = ipcache_key(&prefix);
            assert_eq!(ipcache_prefix(length, &key), Some(prefix), "{prefix}");
        }
        let entries = [
            L4::Any,
            L4::Proto(17),
            L4::Ports {
                proto: 6,
                port: 8080,
                prefix: 16,
            },
            L4::Ports {
                proto: 132,
                port: 1024,
                prefix: 6,
            },
        ];
        for l4 in entries {
            let entry = Entry {
                direction: DIRECTION_EGRESS,
                identity: 300,
                l4,
            };
            let (length, key) = entry_key(7, &entry);
            assert_eq!(entry_of(length, &key), Some((7, entry)));
        }
        let (length, key) = entry_key(
            1,
            &Entry {
                direction: 0,
                identity: 1,
                l4: L4::Ports {
                    proto: 6,
                    port: 80,
                    prefix: 16,
                },
            },
        );
        assert_eq!(length, POLICY_PREFIX_FULL);
        assert_eq!(key.port, [0, 80]);
    }

    #[test]
    fn addresses_map_both_families() {
        for ip in ["10.1.2.3", "fd00::1", "::ffff:0:1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = ip_of(&addr_of(ip));
            match ip {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    assert!(back.is_ipv4())
                }
                _ => assert_eq!(back, ip),
            }
        }
    }

    #[test]
    fn names_are_truncated_at_character_boundaries() {
        assert_eq!(truncated("héllo", 2), "h");
        let long = "ns/".to_string() + &"é".repeat(100);
        let value = name_value(&long);
        assert!(name_text(&value).len() < POLICY_NAME_LEN);
        assert!(long.starts_with(&name_text(&value)));
    }
}
