//! Policy sets: the entries of the policies that select a pod, expanded
//! to peer identities and port prefixes.
//!
//! Pods selected by the same policies (and, when an ingress rule names a
//! port, with the same named ports) get the same entries: a [`Recipe`],
//! computed once per update at most, and only when something it depends on
//! changed (a policy object, the members of a peer it names, the CIDRs, the
//! identities when it resolves ports by identity).

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use lb_common::policy::{DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY};
use lb_core::intent::ObjectError;
use rustc_hash::{FxHashMap, FxHasher};

use super::identities::Identities;
use crate::{
    desired::{isolation_flags, Entry, SetContent, L4},
    labels::{digest, Block, NamedPorts},
    numbers::Numbers,
    ports::port_prefixes,
    rules::{within, Namespaces, Peer, Policy, PolicyRef, PortMatch, Rule},
    selector::Selector,
};

/// A pod peer: the namespaces and the pod selector.
pub(super) type PeerKey = (Namespaces, Selector);

/// A validated policy with what the compiler derives from it once.
#[derive(Debug)]
pub(super) struct Compiled {
    pub policy: Policy,
    /// Every pod peer it names, each once.
    pub peers: Vec<PeerKey>,
    /// Every CIDR it names (blocks and exceptions).
    pub cidrs: Vec<IpNetwork>,
    /// Whether an egress rule to any peer or to an ipBlock names a port:
    /// its entries list identities by the ports they have.
    pub by_identity: bool,
    /// Whether an ingress rule names a port (resolved on the selected pod).
    pub ingress_named: bool,
}

impl Compiled {
    pub(super) fn new(policy: Policy) -> Self {
        let rules = || policy.ingress.iter().chain(&policy.egress).flatten();
        let mut peers: Vec<PeerKey> = rules()
            .flat_map(|rule| rule.peers.iter().flatten())
            .filter_map(|peer| match peer {
                Peer::Pods { namespaces, pods } => Some((namespaces.clone(), pods.clone())),
                Peer::Block { .. } => None,
            })
            .collect();
        peers.sort();
        peers.dedup();
        let mut cidrs: Vec<IpNetwork> = rules()
            .flat_map(|rule| rule.peers.iter().flatten())
            .flat_map(|peer| match peer {
                Peer::Block { cidr, except } => std::iter::once(*cidr)
                    .chain(except.iter().copied())
                    .collect(),
                Peer::Pods { .. } => Vec::new(),
            })
            .collect();
        cidrs.sort();
        cidrs.dedup();
        let named = |rule: &Rule| {
            rule.ports
                .iter()
                .flatten()
                .any(|p| matches!(p.port, PortMatch::Named(_)))
        };
        let by_identity = policy.egress.iter().flatten().any(|rule| {
            named(rule)
                && rule
                    .peers
                    .as_ref()
                    .is_none_or(|peers| peers.iter().any(|peer| matches!(peer, Peer::Block { .. })))
        });
        let ingress_named = policy.ingress.iter().flatten().any(named);
        Self {
            policy,
            peers,
            cidrs,
            by_identity,
            ingress_named,
        }
    }
}

/// A policy compared and hashed by the address of its `Arc` (which the
/// key holds, so the address is not reused while it is a key).
#[derive(Clone, Debug)]
pub(super) struct ByAddress(pub Arc<Compiled>);

impl PartialEq for ByAddress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ByAddress {}

impl Hash for ByAddress {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as usize).hash(state);
    }
}

/// What a pod's set is made of: the policies selecting it (in name order)
/// and, when one of them has an ingress rule on a named port, the pod's
/// named ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct RecipeKey {
    pub policies: Vec<ByAddress>,
    pub named_ports: NamedPorts,
}

/// A recipe's set, and what it was computed from.
#[derive(Clone, Debug)]
pub(super) struct Recipe {
    pub fingerprint: u64,
    pub flags: u32,
    /// `None` when the pods are not isolated.
    pub content: Option<Arc<SetContent>>,
}

/// A selector of pod peers, with the identities it matches.
#[derive(Debug)]
pub(super) struct Membership {
    pub identities: BTreeSet<u32>,
    /// The update in which they last changed.
    pub version: u64,
}

/// What recipes are computed from.
pub(super) struct Inputs<'a> {
    pub members: &'a FxHashMap<PeerKey, Membership>,
    /// The policy CIDRs and their identities.
    pub cidrs: &'a BTreeMap<IpNetwork, u32>,
    pub cidr_version: u64,
    pub identities: &'a Identities,
    /// Bumped when identities are numbered or released.
    pub identities_version: u64,
}

/// The rule name of a policy's rule.
pub(super) fn rule_name(policy: &PolicyRef, direction: u8, index: usize) -> String {
    let side = if direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    format!("{policy} {side}[{index}]")
}

impl RecipeKey {
    /// What the recipe's set depends on, as one number.
    pub(super) fn fingerprint(&self, inputs: &Inputs<'_>) -> u64 {
        let mut hasher = FxHasher::default();
        for policy in &self.policies {
            policy.hash(&mut hasher);
            for peer in &policy.0.peers {
                inputs
                    .members
                    .get(peer)
                    .map(|m| m.version)
                    .hash(&mut hasher);
            }
            if !policy.0.cidrs.is_empty() {
                inputs.cidr_version.hash(&mut hasher);
            }
            if policy.0.by_identity {
                inputs.identities_version.hash(&mut hasher);
            }
        }
        inputs.identities.retiring().hash(&mut hasher);
        hasher.finish()
    }

    /// Computes the recipe's set.
    pub(super) fn compute(
        &self,
        inputs: &Inputs<'_>,
        rules: &mut RuleNumbers,
        errors: &mut Vec<ObjectError>,
    ) -> Recipe {
        let fingerprint = self.fingerprint(inputs);
        let selecting = || self.policies.iter().map(|p| &p.0.policy);
        let ingress = selecting().any(|p| p.ingress.is_some());
        let egress = selecting().any(|p| p.egress.is_some());
        let flags = isolation_flags(ingress, egress);
        if flags == 0 {
            return Recipe {
                fingerprint,
                flags,
                content: None,
            };
        }
        let mut entries: Vec<(Entry, u32)> = Vec::new();
        for policy in selecting() {
            for (direction, list) in [
                (DIRECTION_INGRESS, &policy.ingress),
                (DIRECTION_EGRESS, &policy.egress),
            ] {
                for rule in list.iter().flatten() {
                    let Some(rule_id) = rules.number(&rule_name(&policy.id, direction, rule.index))
                    else {
                        errors.push(ObjectError {
                            origin: "policy".into(),
                            object: format!("NetworkPolicy {}", policy.id),
                            field: "spec".into(),
                            reason: "no rule number left; the rule matches nothing".into(),
                        });
                        continue;
                    };
                    let before = entries.len();
                    rule_entries(inputs, direction, rule, &self.named_ports, &mut entries);
                    for (_, rule) in &mut entries[before..] {
                        *rule = rule_id;
                    }
                }
            }
        }
        // Each entry once, with the lowest rule that gives it.
        entries.sort_unstable();
        entries.dedup_by_key(|(entry, _)| *entry);
        Recipe {
            fingerprint,
            flags,
            content: Some(Arc::new(set_content(entries.into_iter().collect()))),
        }
    }
}

/// Appends the entries of one rule (with rule 0) for pods with
/// `named_ports`. Retiring identities are left out: no address has them
/// once the update is written, and until then the sets judge them as the
/// transition says.
fn rule_entries(
    inputs: &Inputs<'_>,
    direction: u8,
    rule: &Rule,
    named_ports: &NamedPorts,
    out: &mut Vec<(Entry, u32)>,
) {
    let retiring = inputs.identities.retiring();
    // Peer identities; `None` stands for any peer. Pods are peers by their
    // label identity, and also by their CIDR identity in a block; a named
    // port resolves on pods only, by their label identity: `pod_peers`
    // are the label identities of the peers (`None`: every one).
    let mut pod_peers: Option<BTreeSet<u32>> = None;
    let peers: Vec<u32> = match &rule.peers {
        None => vec![IDENTITY_ANY],
        Some(peers) => {
            let mut ids = BTreeSet::new();
            let mut pod_ids = BTreeSet::new();
            for peer in peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        if let Some(m) = inputs.members.get(&(namespaces.clone(), pods.clone())) {
                            let current = m.identities.iter().filter(|id| !retiring.contains(id));
                            ids.extend(current.clone());
                            pod_ids.extend(current);
                        }
                    }
                    Peer::Block { cidr, except } => {
                        ids.extend(
                            inputs
                                .cidrs
                                .iter()
                                .filter(|(p, _)| {
                                    within(p, cidr) && !except.iter().any(|e| within(p, e))
                                })
                                .map(|(_, id)| *id),
                        );
                        if direction == DIRECTION_EGRESS {
                            let block = Block {
                                cidr: *cidr,
                                except: except.clone(),
                            };
                            pod_ids.extend(
                                inputs
                                    .identities
                                    .iter()
                                    .filter(|(id, labels)| {
                                        labels.blocks.contains(&block) && !retiring.contains(id)
                                    })
                                    .map(|(id, _)| id),
                            );
                        }
                    }
                }
            }
            pod_peers = Some(pod_ids);
            ids.into_iter().collect()
        }
    };
    let mut push = |identity: u32, l4: L4| {
        out.push((
            Entry {
                direction,
                identity,
                l4,
            },
            0,
        ))
    };
    let Some(ports) = &rule.ports else {
        for id in &peers {
            push(*id, L4::Any);
        }
        return;
    };
    for port in ports {
        match &port.port {
            PortMatch::Any => {
                for id in &peers {
                    push(*id, L4::Proto(port.proto));
                }
            }
            PortMatch::Range(first, last) => {
                for (start, prefix) in port_prefixes(*first, *last) {
                    for id in &peers {
                        push(
                            *id,
                            L4::Ports {
                                proto: port.proto,
                                port: start,
                                prefix,
                            },
                        );
                    }
                }
            }
            PortMatch::Named(name) => {
                let named = (name.clone(), port.proto);
                let single = |number: u16| L4::Ports {
                    proto: port.proto,
                    port: number,
                    prefix: 16,
                };
                if direction == DIRECTION_INGRESS {
                    // The port is the selected pod's.
                    if let Some(number) = named_ports.get(&named) {
                        for id in &peers {
                            push(*id, single(*number));
                        }
                    }
                    continue;
                }
                // Egress: the destination's, which its label identity
                // carries.
                match &pod_peers {
                    None => {
                        for (id, labels) in inputs.identities.iter() {
                            if let Some(number) = labels.named_ports.get(&named) {
                                if !retiring.contains(&id) {
                                    push(id, single(*number));
                                }
                            }
                        }
                    }
                    Some(ids) => {
                        for id in ids {
                            let labels = inputs.identities.labels(*id);
                            if let Some(number) = labels.and_then(|l| l.named_ports.get(&named)) {
                                push(*id, single(*number));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rule numbers, with the names they stand for.
pub(super) struct RuleNumbers {
    pub numbers: Numbers,
    pub names: FxHashMap<u32, String>,
}

impl RuleNumbers {
    /// The number of the rule named `name`, allocating one if needed.
    pub(super) fn number(&mut self, name: &str) -> Option<u32> {
        let number = self.numbers.number(digest(name)).ok()?;
        self.names.entry(number).or_insert_with(|| name.to_string());
        Some(number)
    }

    /// Frees every number but those of `used`.
    pub(super) fn keep(&mut self, used: &BTreeSet<u32>) {
        self.numbers.retain(|number, _| used.contains(&number));
        self.names.retain(|number, _| used.contains(number));
    }
}

/// 128-bit FNV-1a over bytes.
struct Fnv(u128);

impl Fnv {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u128::from(*b)).wrapping_mul(Self::PRIME);
        }
    }
}

/// A set of `entries`, with its digest: FNV-1a 128 over each entry in
/// order as direction, identity (4 bytes, big-endian), a kind byte (0 any,
/// 1 protocol, 2 ports), protocol, first port (2 bytes, big-endian) and
/// prefix length, and rule (4 bytes, big-endian). Stable across versions
/// and platforms: it names the set in the kernel across restarts.
pub(super) fn set_content(entries: BTreeMap<Entry, u32>) -> SetContent {
    let mut fnv = Fnv(Fnv::OFFSET);
    for (entry, rule) in &entries {
        let (kind, proto, port, prefix) = match entry.l4 {
            L4::Any => (0, 0, 0, 0),
            L4::Proto(proto) => (1, proto, 0, 0),
            L4::Ports {
                proto,
                port,
                prefix,
            } => (2, proto, port, prefix),
        };
        let id = entry.identity.to_be_bytes();
        let port = port.to_be_bytes();
        let rule = rule.to_be_bytes();
        fnv.write(&[
            entry.direction,
            id[0],
            id[1],
            id[2],
            id[3],
            kind,
            proto,
            port[0],
            port[1],
            prefix,
            rule[0],
            rule[1],
            rule[2],
            rule[3],
        ]);
    }
    SetContent {
        digest: fnv.0.to_be_bytes(),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_digests_are_stable_and_tell_entries_apart() {
        let entry = |identity| Entry {
            direction: DIRECTION_INGRESS,
            identity,
            l4: L4::Proto(6),
        };
        let one = set_content(BTreeMap::from([(entry(300), 1)]));
        let other = set_content(BTreeMap::from([(entry(300), 2)]));
        let empty = set_content(BTreeMap::new());
        assert_ne!(one.digest, other.digest);
        assert_eq!(u128::from_be_bytes(empty.digest), Fnv::OFFSET);
        // Pinned: a change renames every set in the kernel.
        assert_eq!(
            u128::from_be_bytes(one.digest),
            u128::from_be_bytes(set_content(BTreeMap::from([(entry(300), 1)])).digest)
        );
    }
}
