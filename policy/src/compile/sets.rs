//! Policy sets: the entries of the policies that select a pod, expanded
//! to peer identities and port prefixes.
//!
//! Pods selected by the same policies (and, when an ingress rule names a
//! port, with the same named ports) get the same entries: a [`Recipe`].
//! A recipe in use is computed once; after that, an update patches the
//! entries of the identities that came, went or changed membership in it
//! (what a peer selector matches only changes with those), and computes it
//! again only when the CIDRs change under one of its ipBlocks.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use super::transition::of;

use ipnetwork::IpNetwork;
use lb_common::policy::{DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY};
use lb_core::intent::ObjectError;
use rustc_hash::FxHashMap;

use super::identities::Identities;
use crate::{
    desired::{isolation_flags, Entry, SetContent, L4},
    labels::{digest, Block, NamedPorts},
    numbers::Numbers,
    ports::port_prefixes,
    rules::{within, Peer, PodPeer, Policy, PolicyRef, PortMatch, Rule},
};

/// A validated policy with what the compiler derives from it once.
#[derive(Debug)]
pub(super) struct Compiled {
    pub policy: Policy,
    /// Every pod peer it names, each once.
    pub peers: Vec<PodPeer>,
    /// Every CIDR it names (blocks and exceptions).
    pub cidrs: Vec<IpNetwork>,
    /// Whether an ingress rule names a port (resolved on the selected pod).
    pub ingress_named: bool,
}

impl Compiled {
    pub(super) fn new(policy: Policy) -> Self {
        let rules = || policy.ingress.iter().chain(&policy.egress).flatten();
        let mut peers: Vec<PodPeer> = rules()
            .flat_map(|rule| rule.peers.iter().flatten())
            .filter_map(|peer| match peer {
                Peer::Pods(pods) => Some(pods.clone()),
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
                Peer::Pods(_) => Vec::new(),
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
        let ingress_named = policy.ingress.iter().flatten().any(named);
        Self {
            policy,
            peers,
            cidrs,
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

/// A recipe's set, when it was brought up to date, and its number.
#[derive(Clone, Debug)]
pub(super) struct Recipe {
    /// The update it was last brought up to date in.
    pub as_of: u64,
    /// The CIDRs' version it was computed with.
    pub cidr_version: u64,
    pub flags: u32,
    /// `None` when the pods are not isolated.
    pub content: Option<Arc<SetContent>>,
    /// The number its set has in the kernel, once used.
    pub number: Option<u32>,
    /// Its key in the allocator of recipe set numbers.
    pub owner: [u8; 16],
}

/// A selector of pod peers, with the active identities it matches.
#[derive(Debug)]
pub(super) struct Membership {
    pub identities: BTreeSet<u32>,
    /// The policies that name it.
    pub users: u32,
}

/// What recipes are computed from.
pub(super) struct Inputs<'a> {
    pub members: &'a FxHashMap<PodPeer, Membership>,
    /// The policy CIDRs and their identities.
    pub cidrs: &'a BTreeMap<IpNetwork, u32>,
    pub cidr_version: u64,
    pub identities: &'a Identities,
    /// This update.
    pub version: u64,
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
    /// Whether one of its policies names a CIDR.
    fn has_blocks(&self) -> bool {
        self.policies.iter().any(|p| !p.0.cidrs.is_empty())
    }

    /// Whether `recipe`, up to date as of the last update, can be patched
    /// (else it is computed again).
    pub(super) fn patchable(&self, recipe: &Recipe, inputs: &Inputs<'_>) -> bool {
        recipe.as_of + 1 == inputs.version
            && (recipe.cidr_version == inputs.cidr_version || !self.has_blocks())
    }

    /// The flags of its pods.
    fn flags(&self) -> u32 {
        let selecting = || self.policies.iter().map(|p| &p.0.policy);
        let ingress = selecting().any(|p| p.ingress.is_some());
        let egress = selecting().any(|p| p.egress.is_some());
        isolation_flags(ingress, egress)
    }

    /// Calls `each` with every rule of its policies, its direction and its
    /// number.
    fn rules(
        &self,
        rules: &mut RuleNumbers,
        errors: &mut Vec<ObjectError>,
        mut each: impl FnMut(u8, &Rule, u32),
    ) {
        for policy in self.policies.iter().map(|p| &p.0.policy) {
            for (direction, list) in [
                (DIRECTION_INGRESS, &policy.ingress),
                (DIRECTION_EGRESS, &policy.egress),
            ] {
                for rule in list.iter().flatten() {
                    match rules.number(&rule_name(&policy.id, direction, rule.index)) {
                        Some(number) => each(direction, rule, number),
                        None => errors.push(ObjectError {
                            origin: "policy".into(),
                            object: format!("NetworkPolicy {}", policy.id),
                            field: "spec".into(),
                            reason: "no rule number left; the rule matches nothing".into(),
                        }),
                    }
                }
            }
        }
    }

    /// Computes the recipe's set.
    pub(super) fn compute(
        &self,
        inputs: &Inputs<'_>,
        rules: &mut RuleNumbers,
        errors: &mut Vec<ObjectError>,
    ) -> Recipe {
        let flags = self.flags();
        let mut recipe = Recipe {
            as_of: inputs.version,
            cidr_version: inputs.cidr_version,
            flags,
            content: None,
            number: None,
            owner: [0; 16],
        };
        if flags == 0 {
            return recipe;
        }
        let mut entries: Vec<(Entry, u32)> = Vec::new();
        self.rules(rules, errors, |direction, rule, number| {
            let before = entries.len();
            rule_entries(inputs, direction, rule, &self.named_ports, &mut entries);
            for (_, rule) in &mut entries[before..] {
                *rule = number;
            }
        });
        // Each entry once, with the first rule that gives it (policies in
        // name order, ingress before egress): the same however it came.
        entries.sort_by_key(|(entry, _)| *entry);
        entries.dedup_by_key(|(entry, _)| *entry);
        recipe.content = Some(Arc::new(set_content(entries.into_iter().collect())));
        recipe
    }

    /// Brings `recipe` up to date where `identities` changed: their entries
    /// are worked out again (in place, unless the set is shared). Returns
    /// whether its set changed.
    pub(super) fn patch(
        &self,
        recipe: &mut Recipe,
        identities: &BTreeSet<u32>,
        inputs: &Inputs<'_>,
        rules: &mut RuleNumbers,
        errors: &mut Vec<ObjectError>,
    ) -> bool {
        recipe.as_of = inputs.version;
        let Some(content) = &mut recipe.content else {
            return false;
        };
        if identities.is_empty() {
            return false;
        }
        let mut fresh: Vec<(Entry, u32)> = Vec::new();
        self.rules(rules, errors, |direction, rule, number| {
            for id in identities {
                let before = fresh.len();
                identity_entries(inputs, direction, rule, &self.named_ports, *id, &mut fresh);
                for (_, rule) in &mut fresh[before..] {
                    *rule = number;
                }
            }
        });
        fresh.sort_by_key(|(entry, _)| *entry);
        fresh.dedup_by_key(|(entry, _)| *entry);
        let current = identities.iter().flat_map(|id| {
            of(&content.entries, DIRECTION_INGRESS, *id).chain(of(
                &content.entries,
                DIRECTION_EGRESS,
                *id,
            ))
        });
        let mut sorted: Vec<(Entry, u32)> = current.map(|(e, r)| (*e, *r)).collect();
        sorted.sort_unstable();
        if sorted == fresh {
            return false;
        }
        patch_content(Arc::make_mut(content), &sorted, fresh);
        true
    }
}

/// Appends the entries one rule gives label identity `id` (with rule 0),
/// for pods with `named_ports`: those [`rule_entries`] gives it.
fn identity_entries(
    inputs: &Inputs<'_>,
    direction: u8,
    rule: &Rule,
    named_ports: &NamedPorts,
    id: u32,
    out: &mut Vec<(Entry, u32)>,
) {
    let Some(labels) = inputs.identities.labels(id) else {
        return;
    };
    if inputs.identities.retiring().contains(&id) {
        return;
    }
    // Whether it is a peer by its label identity, and whether a named port
    // resolves on it.
    let (peer, resolves) = match &rule.peers {
        None => (false, true),
        Some(peers) => {
            let (mut peer, mut resolves) = (false, false);
            for p in peers {
                match p {
                    Peer::Pods(pods) => {
                        if inputs
                            .members
                            .get(pods)
                            .is_some_and(|m| m.identities.contains(&id))
                        {
                            peer = true;
                            resolves = true;
                        }
                    }
                    Peer::Block { cidr, except } => {
                        if direction == DIRECTION_EGRESS
                            && labels
                                .blocks
                                .iter()
                                .any(|b| b.cidr == *cidr && b.except == *except)
                        {
                            resolves = true;
                        }
                    }
                }
            }
            (peer, resolves)
        }
    };
    let mut push = |l4: L4| {
        out.push((
            Entry {
                direction,
                identity: id,
                l4,
            },
            0,
        ))
    };
    let Some(ports) = &rule.ports else {
        if peer {
            push(L4::Any);
        }
        return;
    };
    for port in ports {
        match &port.port {
            PortMatch::Any if peer => push(L4::Proto(port.proto)),
            PortMatch::Range(first, last) if peer => {
                for (start, prefix) in port_prefixes(*first, *last) {
                    push(L4::Ports {
                        proto: port.proto,
                        port: start,
                        prefix,
                    });
                }
            }
            PortMatch::Named(name) => {
                let named = (name.clone(), port.proto);
                let number = if direction == DIRECTION_INGRESS {
                    named_ports.get(&named).filter(|_| peer)
                } else {
                    labels.named_ports.get(&named).filter(|_| resolves)
                };
                if let Some(number) = number {
                    push(L4::Ports {
                        proto: port.proto,
                        port: *number,
                        prefix: 16,
                    });
                }
            }
            _ => {}
        }
    }
}

/// Appends the entries of one rule (with rule 0) for pods with
/// `named_ports`. Only active identities count (memberships hold no
/// others): no address has a retiring one once the update is written, and
/// until then the sets judge it as the transition says.
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
                    Peer::Pods(pods) => {
                        if let Some(m) = inputs.members.get(pods) {
                            ids.extend(m.identities.iter().copied());
                            pod_ids.extend(m.identities.iter().copied());
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

    /// Frees the numbers of the rules named `names`.
    pub(super) fn forget(&mut self, names: &BTreeSet<String>) {
        self.names.retain(|number, name| {
            let keep = !names.contains(name);
            if !keep {
                self.numbers.free(*number);
            }
            keep
        });
    }
}

/// 64-bit finalizer of SplitMix64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash of one entry and its rule, of which a set's digest is the sum.
/// The entry is packed into two words, `a` = direction, kind (0 any,
/// 1 protocol, 2 ports), protocol and prefix length in its top bytes and
/// the identity in its low 32 bits, `b` = first port above the rule; the
/// hash is `mix(a * P ^ b) << 64 | mix(b * Q ^ rotl(a, 32))` (wrapping,
/// `mix` the SplitMix64 finalizer).
fn entry_hash(entry: &Entry, rule: u32) -> u128 {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    const Q: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let (kind, proto, port, prefix) = match entry.l4 {
        L4::Any => (0u64, 0u64, 0u64, 0u64),
        L4::Proto(proto) => (1, u64::from(proto), 0, 0),
        L4::Ports {
            proto,
            port,
            prefix,
        } => (2, u64::from(proto), u64::from(port), u64::from(prefix)),
    };
    let a = u64::from(entry.direction) << 56
        | kind << 48
        | proto << 40
        | prefix << 32
        | u64::from(entry.identity);
    let b = port << 32 | u64::from(rule);
    let high = mix(a.wrapping_mul(P) ^ b);
    let low = mix(b.wrapping_mul(Q) ^ a.rotate_left(32));
    u128::from(high) << 64 | u128::from(low)
}

/// A set of `entries`, with its digest: the wrapping sum of the entries'
/// [`entry_hash`], big-endian. Stable across versions and platforms (it
/// names the set in the kernel across restarts), and kept up to date entry
/// by entry when a set is patched.
pub(super) fn set_content(entries: BTreeMap<Entry, u32>) -> SetContent {
    let sum = entries
        .iter()
        .fold(0u128, |sum, (e, r)| sum.wrapping_add(entry_hash(e, *r)));
    SetContent {
        digest: sum.to_be_bytes(),
        entries,
    }
}

/// Takes `removed` (which it has) out of `content` and puts `added` (which
/// it then has not) in, working its digest out from the change.
fn patch_content(content: &mut SetContent, removed: &[(Entry, u32)], added: Vec<(Entry, u32)>) {
    let mut sum = u128::from_be_bytes(content.digest);
    for (entry, rule) in removed {
        content.entries.remove(entry);
        sum = sum.wrapping_sub(entry_hash(entry, *rule));
    }
    for (entry, rule) in added {
        sum = sum.wrapping_add(entry_hash(&entry, rule));
        content.entries.insert(entry, rule);
    }
    content.digest = sum.to_be_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_digests_are_stable_tell_entries_apart_and_follow_patches() {
        let entry = |identity| Entry {
            direction: DIRECTION_INGRESS,
            identity,
            l4: L4::Proto(6),
        };
        let one = set_content(BTreeMap::from([(entry(300), 1)]));
        let other = set_content(BTreeMap::from([(entry(300), 2)]));
        let both = set_content(BTreeMap::from([(entry(300), 1), (entry(301), 1)]));
        assert_ne!(one.digest, other.digest);
        assert_eq!(set_content(BTreeMap::new()).digest, [0; 16]);
        // Pinned: a change renames every set in the kernel.
        assert_eq!(
            u128::from_be_bytes(one.digest),
            0xcebf_703e_67cc_1cad_13e1_1fd4_d1f6_8ab8
        );
        let mut patched = one.clone();
        patch_content(&mut patched, &[], vec![(entry(301), 1)]);
        assert_eq!(patched, both);
        patch_content(&mut patched, &[(entry(301), 1)], vec![]);
        assert_eq!(patched, one);
    }
}
