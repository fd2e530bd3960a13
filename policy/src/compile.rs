//! The policy compiler: Pods, Namespaces, Nodes and NetworkPolicies in,
//! [`PolicyDesired`] out, incrementally.
//!
//! - Every pod address of the cluster gets the identity of its
//!   [`IdentityLabels`] (those of a pod's addresses differ only when
//!   egress rules to an ipBlock on a named port tell them apart); every
//!   CIDR a policy names gets a CIDR identity.
//! - The ipcache maps each pod address to its identity and to the identity
//!   of the longest policy CIDR covering it, node addresses to the host or
//!   remote-node identity, and each policy CIDR to its own identity.
//! - Each of this node's pods gets a policy set: the entries of every
//!   policy selecting it, expanded to peer identities and port prefixes.
//!   Pods with the same identity and named ports share one set, and sets
//!   with the same entries are one set.
//!
//! Work is proportional to what changed: an unchanged object (the same
//! `Arc`) keeps its identity; a new identity is matched against the peer
//! selectors once; a pod's set is rebuilt only when a policy selecting it,
//! or the membership of a peer those policies name, changed.
//!
//! An update that moves addresses to other identities (a relabel, a CIDR
//! that comes or goes) is written in two: its sets judge the identities
//! that addresses leave or get partly as the old sets did (see
//! the `transition` module), and [`PolicyUpdate::follow_up`] asks for one more
//! update, which writes the final sets once the addresses have moved. A
//! label identity that nothing uses any more is kept for that one more
//! update as well, and so is a CIDR's identity (its prefix leaves the
//! ipcache at once). A relabeled pod therefore never loses, nor gains, a
//! verdict that is the same before and after, while the writes go in.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    policy::{
        IpcacheValue, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_FIRST_CIDR,
        IDENTITY_FIRST_LABELS, IDENTITY_HOST, IDENTITY_MAX, IDENTITY_REMOTE_NODE, IDENTITY_WORLD,
        PROTO_SCTP,
    },
};
use lb_core::intent::{ObjectError, Objects};
use rustc_hash::{FxHashMap, FxHasher};

mod transition;

use transition::Movement;

use crate::{
    desired::{isolation_flags, EndpointInfo, Entry, IdentityInfo, PolicyDesired, SetContent, L4},
    labels::{digest, Block, IdentityConfig, IdentityLabels, NamedPorts, NAMESPACE_NAME_LABEL},
    numbers::Numbers,
    ports::port_prefixes,
    rules::{parse_policy, within, Namespaces, Peer, Policy, PolicyRef, PortMatch},
    selector::Selector,
};

/// Where the compiler runs and how it groups pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// This node's name: its pods are the endpoints.
    pub node: Option<String>,
    /// Which labels count for identities.
    pub identity: IdentityConfig,
}

/// What one [`PolicyCompiler::update`] found.
#[derive(Clone, Debug, Default)]
pub struct PolicyUpdate {
    /// Invalid objects or fields; the rest is compiled.
    pub errors: Vec<ObjectError>,
    /// Whether the desired state changed.
    pub changed: bool,
    /// Whether this update's sets are for the transition (addresses moved
    /// to other identities) or an identity or CIDR left: another update
    /// (with the same objects), once this one is written, writes the final
    /// sets and releases what left.
    pub follow_up: bool,
}

/// A pod, as far as policy is concerned.
#[derive(Clone, Debug)]
struct PodFacts {
    namespace: String,
    name: String,
    uid: String,
    ips: Vec<IpAddr>,
    node: Option<String>,
    host_network: bool,
    labels: BTreeMap<String, String>,
    named_ports: NamedPorts,
}

/// A Namespace object, and its labels.
type CachedNamespace = (Arc<Namespace>, Arc<BTreeMap<String, String>>);

/// A NetworkPolicy object, and what it validated to.
type CachedPolicy = (Arc<NetworkPolicy>, Option<Arc<Policy>>, Vec<ObjectError>);

/// A pod the last update saw, by the address of its object.
struct PodCached {
    /// Held so that the object's address, which keys the cache, is not
    /// reused while cached.
    _held: Arc<Pod>,
    /// The address of its namespace's object when compiled.
    namespace: usize,
    facts: Arc<PodFacts>,
    /// The identity labels of each of its addresses (`facts.ips`).
    labels: Vec<Arc<IdentityLabels>>,
}

/// A selector of pod peers, with the identities it matches.
struct Membership {
    identities: BTreeSet<u32>,
    version: u64,
}

/// A group of this node's pods sharing a set: one identity, one set of
/// named ports (ingress named ports resolve on the pod).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    identity: u32,
    named_ports: NamedPorts,
}

struct ClassCached {
    fingerprint: u64,
    flags: u32,
    content: Option<Arc<SetContent>>,
}

/// The incremental policy compiler.
pub struct PolicyCompiler {
    config: PolicyConfig,
    pods: FxHashMap<usize, PodCached>,
    /// Namespaces by name: the object (held, so that its address is not
    /// reused while cached) and its labels.
    namespaces: FxHashMap<String, CachedNamespace>,
    /// Policies: the object (held), and what it validated to.
    policies: BTreeMap<PolicyRef, CachedPolicy>,
    /// Every node's addresses, by name.
    nodes: BTreeMap<String, Vec<IpAddr>>,
    /// What policies say that changes what identities stand for.
    identity_inputs: IdentityInputs,
    label_numbers: Numbers,
    cidr_numbers: Numbers,
    set_numbers: Numbers,
    rule_numbers: Numbers,
    /// Label identities in use or retiring, by number.
    identities: FxHashMap<u32, Arc<IdentityLabels>>,
    /// Label identities nothing used in the last update, released now
    /// unless used again; CIDRs the policies named until the last update,
    /// with their identity.
    retiring: (BTreeSet<u32>, BTreeMap<IpNetwork, u32>),
    /// Every CIDR the policies name, with its identity.
    cidrs: BTreeMap<IpNetwork, u32>,
    cidr_version: u64,
    /// Bumped when identities are added or released.
    identities_version: u64,
    members: FxHashMap<(Namespaces, Selector), Membership>,
    classes: FxHashMap<ClassKey, ClassCached>,
    desired: PolicyDesired,
    /// Whether some set of the desired state is one of transition.
    transitional: bool,
    version: u64,
}

/// The parts of policies that change what identities stand for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IdentityInputs {
    /// Excluded label keys some selector names.
    selected: BTreeSet<String>,
    /// Named ports (name, protocol) some egress rule names.
    egress_named: BTreeSet<(String, u8)>,
    /// The ipBlocks of egress rules with named ports, with those ports.
    blocks: BTreeMap<Block, BTreeSet<(String, u8)>>,
}

/// The numbers of what was found in the kernel after a restart.
#[derive(Clone, Debug, Default)]
pub struct Adopted {
    /// Identities and the digests of what they stand for.
    pub identities: Vec<(u32, [u8; 16])>,
    /// Policy sets and the digests of their entries.
    pub sets: Vec<(u32, [u8; 16])>,
    /// Rules and their names.
    pub rules: Vec<(u32, String)>,
}

/// The name of the rule of the entries that keep, for one update, what
/// endpoints allowed the identities that retire in it.
pub const TRANSITION_RULE: &str = "(allowed before, while identities change)";

/// The rule name of a policy's rule.
fn rule_name(policy: &PolicyRef, direction: u8, index: usize) -> String {
    let side = if direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    format!("{policy} {side}[{index}]")
}

/// What a CIDR identity stands for, as text.
fn cidr_text(cidr: &IpNetwork) -> String {
    format!("cidr:{cidr}")
}

fn object_address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

impl PolicyCompiler {
    /// A compiler for `config` that keeps the numbers a previous agent
    /// gave (`adopted`).
    pub fn new(config: PolicyConfig, adopted: &Adopted) -> Self {
        let mut label_numbers = Numbers::new(IDENTITY_FIRST_LABELS, IDENTITY_FIRST_CIDR - 1);
        let mut cidr_numbers = Numbers::new(IDENTITY_FIRST_CIDR, IDENTITY_MAX);
        label_numbers.adopt(adopted.identities.iter().copied());
        cidr_numbers.adopt(adopted.identities.iter().copied());
        let mut set_numbers = Numbers::new(1, u32::MAX);
        set_numbers.adopt(adopted.sets.iter().copied());
        let mut rule_numbers = Numbers::new(1, u32::MAX);
        rule_numbers.adopt(
            adopted
                .rules
                .iter()
                .map(|(number, name)| (*number, digest(name))),
        );
        Self {
            config,
            pods: FxHashMap::default(),
            namespaces: FxHashMap::default(),
            policies: BTreeMap::new(),
            nodes: BTreeMap::new(),
            identity_inputs: Default::default(),
            label_numbers,
            cidr_numbers,
            set_numbers,
            rule_numbers,
            identities: FxHashMap::default(),
            retiring: Default::default(),
            cidrs: BTreeMap::new(),
            cidr_version: 0,
            identities_version: 0,
            members: FxHashMap::default(),
            classes: FxHashMap::default(),
            desired: PolicyDesired::default(),
            transitional: false,
            version: 0,
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &PolicyDesired {
        &self.desired
    }

    /// The labels of a label identity, if it is in use.
    pub fn identity_labels(&self, identity: u32) -> Option<&IdentityLabels> {
        self.identities.get(&identity).map(|labels| &**labels)
    }

    /// Brings the desired state up to date with `objects`.
    pub fn update(&mut self, objects: &Objects) -> PolicyUpdate {
        self.version += 1;
        let mut errors = Vec::new();
        let namespaces_changed = self.update_namespaces(objects);
        let policies_changed = self.update_policies(objects);
        let inputs = identity_inputs(&self.config.identity, self.policies.values());
        let inputs_changed = inputs != self.identity_inputs;
        self.identity_inputs = inputs;
        self.update_pods(objects, &namespaces_changed, inputs_changed);
        self.nodes = objects
            .nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n.object.metadata.name.clone()?,
                    addresses_of_node(&n.object),
                ))
            })
            .collect();

        // Identities: those in use now, plus last update's leavers for one
        // more update; anything older is released.
        let (released_ids, _) = std::mem::take(&mut self.retiring);
        let mut in_use: FxHashMap<Arc<IdentityLabels>, u32> = FxHashMap::default();
        let mut exhausted = false;
        for cached in self.pods.values() {
            if cached.facts.host_network {
                continue;
            }
            for labels in &cached.labels {
                if in_use.contains_key(labels) {
                    continue;
                }
                match self.label_numbers.number(digest(&labels.canonical())) {
                    Ok(number) => {
                        in_use.insert(labels.clone(), number);
                    }
                    Err(full) => {
                        if !exhausted {
                            errors.push(ObjectError {
                                origin: "policy".into(),
                                object: format!(
                                    "Pod {}/{}",
                                    cached.facts.namespace, cached.facts.name
                                ),
                                field: "metadata.labels".into(),
                                reason: format!(
                                    "no identity left ({} label sets in use): the pod's \
                                     addresses count as the world for policy",
                                    full.capacity
                                ),
                            });
                        }
                        exhausted = true;
                    }
                }
            }
        }
        let numbers_in_use: BTreeSet<u32> = in_use.values().copied().collect();
        let leaving: BTreeSet<u32> = self
            .identities
            .keys()
            .copied()
            .filter(|id| !numbers_in_use.contains(id) && !released_ids.contains(id))
            .collect();
        let added: Vec<(u32, Arc<IdentityLabels>)> = in_use
            .iter()
            .filter(|(_, number)| !self.identities.contains_key(number))
            .map(|(labels, number)| (*number, labels.clone()))
            .collect();
        let released: Vec<u32> = self
            .identities
            .keys()
            .copied()
            .filter(|id| !numbers_in_use.contains(id) && !leaving.contains(id))
            .collect();
        for id in &released {
            self.identities.remove(id);
        }
        for (number, labels) in &added {
            self.identities.insert(*number, labels.clone());
        }
        if !added.is_empty() || !released.is_empty() {
            self.identities_version += 1;
        }
        self.label_numbers
            .retain(|number, _| self.identities.contains_key(&number));
        self.retiring.0 = leaving;

        // CIDRs named by policies, plus last update's leavers.
        let named: BTreeSet<IpNetwork> = self
            .policies
            .values()
            .filter_map(|(_, policy, _)| policy.as_ref())
            .flat_map(|policy| policy_cidrs(policy))
            .collect();
        // A CIDR that leaves goes from the ipcache at once: the sets judge
        // its identity as before for one more update, while addresses move
        // off it.
        let leaving_cidrs: BTreeMap<IpNetwork, u32> = self
            .cidrs
            .iter()
            .filter(|(c, _)| !named.contains(c))
            .map(|(c, n)| (*c, *n))
            .collect();
        let wanted = named;
        let before: BTreeSet<IpNetwork> = self.cidrs.keys().copied().collect();
        if wanted != before {
            self.cidr_version += 1;
            let mut cidrs = BTreeMap::new();
            for cidr in &wanted {
                match self.cidr_numbers.number(digest(&cidr_text(cidr))) {
                    Ok(number) => {
                        cidrs.insert(*cidr, number);
                    }
                    Err(full) => errors.push(ObjectError {
                        origin: "policy".into(),
                        object: format!("CIDR {cidr}"),
                        field: "ipBlock".into(),
                        reason: format!(
                            "no CIDR identity left ({} in use); rules naming it match nothing",
                            full.capacity
                        ),
                    }),
                }
            }
            self.cidrs = cidrs;
        }
        self.retiring.1 = leaving_cidrs;
        self.cidr_numbers.retain(|number, _| {
            self.cidrs.values().any(|n| *n == number)
                || self.retiring.1.values().any(|n| *n == number)
        });

        self.update_members(&added, &released);
        let desired = self.build(&mut errors);
        for (_, _, policy_errors) in self.policies.values() {
            errors.extend(policy_errors.iter().cloned());
        }
        errors.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field).cmp(&(&b.origin, &b.object, &b.field))
        });
        let changed = desired != self.desired || policies_changed;
        self.desired = desired;
        PolicyUpdate {
            errors,
            changed,
            follow_up: !self.retiring.0.is_empty()
                || !self.retiring.1.is_empty()
                || self.transitional,
        }
    }

    /// Takes the namespaces' labels; returns the names whose labels (object)
    /// changed, appeared or went.
    fn update_namespaces(&mut self, objects: &Objects) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let mut namespaces = FxHashMap::default();
        for sourced in &objects.namespaces {
            let Some(name) = sourced.object.metadata.name.clone() else {
                continue;
            };
            let labels = match self.namespaces.get(&name) {
                Some((old, labels)) if Arc::ptr_eq(old, &sourced.object) => labels.clone(),
                _ => {
                    changed.insert(name.clone());
                    Arc::new(namespace_labels(&name, Some(&sourced.object)))
                }
            };
            namespaces.insert(name, (sourced.object.clone(), labels));
        }
        for name in self.namespaces.keys() {
            if !namespaces.contains_key(name) {
                changed.insert(name.clone());
            }
        }
        self.namespaces = namespaces;
        changed
    }

    /// Parses new and changed policies; returns whether any changed.
    fn update_policies(&mut self, objects: &Objects) -> bool {
        let mut policies = BTreeMap::new();
        let mut changed = false;
        for sourced in &objects.network_policies {
            let meta = &sourced.object.metadata;
            let id = PolicyRef {
                namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                name: meta.name.clone().unwrap_or_default(),
            };
            let entry = match self.policies.remove(&id) {
                Some(cached) if Arc::ptr_eq(&cached.0, &sourced.object) => cached,
                _ => {
                    changed = true;
                    let mut errors = Vec::new();
                    let policy = parse_policy(&sourced.origin, &sourced.object, &mut errors);
                    (sourced.object.clone(), policy.map(Arc::new), errors)
                }
            };
            policies.insert(id, entry);
        }
        changed |= !self.policies.is_empty();
        self.policies = policies;
        changed
    }

    /// Recomputes the facts and identity labels of new and changed pods.
    fn update_pods(
        &mut self,
        objects: &Objects,
        namespaces_changed: &BTreeSet<String>,
        inputs_changed: bool,
    ) {
        let mut pods = FxHashMap::with_capacity_and_hasher(objects.pods.len(), Default::default());
        for sourced in &objects.pods {
            let address = object_address(&sourced.object);
            let namespace = sourced
                .object
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let namespace_address = self
                .namespaces
                .get(&namespace)
                .map_or(0, |(object, _)| object_address(object));
            let reusable = !inputs_changed && !namespaces_changed.contains(&namespace);
            let cached = match self.pods.remove(&address) {
                Some(cached) if reusable && cached.namespace == namespace_address => cached,
                _ => {
                    let facts = Arc::new(pod_facts(&sourced.object, &namespace));
                    let labels = self.identity_labels_of(&facts);
                    PodCached {
                        _held: sourced.object.clone(),
                        namespace: namespace_address,
                        facts,
                        labels,
                    }
                }
            };
            pods.insert(address, cached);
        }
        self.pods = pods;
    }

    /// The identity labels of each of a pod's addresses.
    fn identity_labels_of(&self, facts: &PodFacts) -> Vec<Arc<IdentityLabels>> {
        let IdentityInputs {
            selected,
            egress_named,
            blocks,
        } = &self.identity_inputs;
        let excluded = &self.config.identity.excluded;
        let pod_labels = facts
            .labels
            .iter()
            .filter(|(key, _)| !excluded.contains(key) || selected.contains(*key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let namespace_labels = match self.namespaces.get(&facts.namespace) {
            Some((_, labels)) => (**labels).clone(),
            None => namespace_labels(&facts.namespace, None),
        };
        let named_ports: NamedPorts = facts
            .named_ports
            .iter()
            .filter(|(key, _)| egress_named.contains(key))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        // Only blocks of rules naming one of the pod's ports split it.
        let blocks: Vec<&Block> = blocks
            .iter()
            .filter(|(_, names)| names.iter().any(|n| named_ports.contains_key(n)))
            .map(|(block, _)| block)
            .collect();
        let base = Arc::new(IdentityLabels {
            namespace: facts.namespace.clone(),
            namespace_labels,
            pod_labels,
            named_ports,
            blocks: BTreeSet::new(),
        });
        facts
            .ips
            .iter()
            .map(|ip| {
                let inside: BTreeSet<Block> = blocks
                    .iter()
                    .filter(|b| b.contains(*ip))
                    .map(|b| (*b).clone())
                    .collect();
                if inside.is_empty() {
                    base.clone()
                } else {
                    Arc::new(IdentityLabels {
                        blocks: inside,
                        ..(*base).clone()
                    })
                }
            })
            .collect()
    }

    /// Keeps peer memberships current: new identities are matched against
    /// every peer, released ones removed, new peers matched against every
    /// identity, peers no policy names dropped.
    fn update_members(&mut self, added: &[(u32, Arc<IdentityLabels>)], released: &[u32]) {
        let peers: BTreeSet<(Namespaces, Selector)> = self
            .policies
            .values()
            .filter_map(|(_, policy, _)| policy.as_ref())
            .flat_map(|policy| pod_peers(policy))
            .collect();
        self.members.retain(|peer, _| peers.contains(peer));
        let version = self.version;
        for peer in peers {
            match self.members.get_mut(&peer) {
                Some(membership) => {
                    let mut changed = false;
                    for id in released {
                        changed |= membership.identities.remove(id);
                    }
                    for (id, labels) in added {
                        if peer_matches(&peer, labels) {
                            changed |= membership.identities.insert(*id);
                        }
                    }
                    if changed {
                        membership.version = version;
                    }
                }
                None => {
                    let identities = self
                        .identities
                        .iter()
                        .filter(|(_, labels)| peer_matches(&peer, labels))
                        .map(|(id, _)| *id)
                        .collect();
                    self.members.insert(
                        peer,
                        Membership {
                            identities,
                            version,
                        },
                    );
                }
            }
        }
    }

    /// Builds the desired state from the caches.
    fn build(&mut self, errors: &mut Vec<ObjectError>) -> PolicyDesired {
        let mut desired = PolicyDesired {
            enforcing: self.policies.values().any(|(_, p, _)| p.is_some()),
            ..PolicyDesired::default()
        };
        for (id, labels) in &self.identities {
            let text = labels.canonical();
            desired.identities.insert(
                *id,
                IdentityInfo {
                    digest: digest(&text),
                    text,
                },
            );
        }
        for (cidr, id) in self.cidrs.iter().chain(&self.retiring.1) {
            let text = cidr_text(cidr);
            desired.identities.insert(
                *id,
                IdentityInfo {
                    digest: digest(&text),
                    text,
                },
            );
        }
        for (cidr, id) in &self.cidrs {
            desired.ipcache.insert(
                *cidr,
                IpcacheValue {
                    identity: *id,
                    cidr_identity: *id,
                },
            );
        }
        // Longest first, to find the CIDR identity of an address.
        let mut by_length: Vec<(&IpNetwork, &u32)> = self.cidrs.iter().collect();
        by_length.sort_by_key(|(cidr, _)| std::cmp::Reverse(cidr.prefix()));
        let cidr_identity = |ip: IpAddr| {
            by_length
                .iter()
                .find(|(cidr, _)| cidr.is_ipv4() == ip.is_ipv4() && cidr.contains(ip))
                .map_or(IDENTITY_WORLD, |(_, id)| **id)
        };
        let number_of: FxHashMap<&IdentityLabels, u32> = self
            .identities
            .iter()
            .map(|(id, labels)| (&**labels, *id))
            .collect();
        for cached in self.pods.values() {
            let facts = &cached.facts;
            if facts.host_network {
                continue;
            }
            for (ip, labels) in facts.ips.iter().zip(&cached.labels) {
                let identity = number_of.get(&**labels).copied().unwrap_or(IDENTITY_WORLD);
                desired.ipcache.insert(
                    IpNetwork::from(*ip),
                    IpcacheValue {
                        identity,
                        cidr_identity: cidr_identity(*ip),
                    },
                );
            }
        }
        // Node addresses last: a hostNetwork pod shares them.
        let this_node = self.config.node.clone();
        let this_node = this_node.as_deref();
        let mut nodes: Vec<(bool, IpAddr)> = Vec::new();
        for (name, addresses) in &self.nodes {
            let local = Some(name.as_str()) == this_node;
            nodes.extend(addresses.iter().map(|a| (local, *a)));
        }
        for (local, ip) in nodes {
            let identity = if local {
                IDENTITY_HOST
            } else {
                IDENTITY_REMOTE_NODE
            };
            desired.ipcache.insert(
                IpNetwork::from(ip),
                IpcacheValue {
                    identity,
                    cidr_identity: cidr_identity(ip),
                },
            );
        }

        // Endpoints: this node's pods, by class.
        let movement = Movement::between(&self.desired.ipcache, &desired.ipcache);
        self.transitional = false;
        let transition_rule = if movement.is_empty() {
            None
        } else {
            match self.rule_numbers.number(digest(TRANSITION_RULE)) {
                Ok(rule) => Some(rule),
                Err(_) => {
                    errors.push(ObjectError {
                        origin: "policy".into(),
                        object: "NetworkPolicy".into(),
                        field: "spec".into(),
                        reason: "no rule number left; pods whose identity changes may see \
                                 drops until the change is written"
                            .into(),
                    });
                    None
                }
            }
        };
        let mut classes = FxHashMap::default();
        let mut transitions: FxHashMap<(ClassKey, u32, u32), Arc<SetContent>> =
            FxHashMap::default();
        let mut used_sets: BTreeMap<u32, Arc<SetContent>> = BTreeMap::new();
        let mut used_rules: BTreeSet<u32> = BTreeSet::new();
        // Each address with its identity; an address without one (none
        // left) is no endpoint.
        type AddressIdentities = Vec<(IpAddr, u32)>;
        let local_pods: Vec<(Arc<PodFacts>, AddressIdentities)> = self
            .pods
            .values()
            .filter(|c| {
                let f = &c.facts;
                this_node.is_some() && f.node.as_deref() == this_node && !f.host_network
            })
            .map(|c| {
                let ips = c
                    .facts
                    .ips
                    .iter()
                    .zip(&c.labels)
                    .filter_map(|(ip, labels)| Some((*ip, *number_of.get(&**labels)?)))
                    .collect();
                (c.facts.clone(), ips)
            })
            .collect();
        drop(number_of);
        for (facts, ips) in local_pods {
            // The identities of a pod's addresses differ at most in their
            // blocks, which its set does not depend on: the first stands
            // for all.
            let Some(&(_, identity)) = ips.first() else {
                continue;
            };
            let key = ClassKey {
                identity,
                named_ports: facts.named_ports.clone(),
            };
            let class = match classes.get(&key) {
                Some(class) => class,
                None => {
                    let class = self.class(&key, errors);
                    classes.entry(key.clone()).or_insert(class)
                }
            };
            let (flags, class_content) = (class.flags, class.content.clone());
            for (ip, identity) in ips {
                // While addresses move, the endpoint's set judges their
                // identities as `transition` says.
                let old = self
                    .desired
                    .endpoints
                    .get(&ip)
                    .map(|ep| (ep.set, ep.flags))
                    .filter(|_| !movement.is_empty());
                let content = match (&class_content, old, transition_rule) {
                    (Some(content), Some((old_set, old_flags)), Some(rule)) => {
                        let transition_key = (key.clone(), old_set, old_flags);
                        let content = transitions.entry(transition_key).or_insert_with(|| {
                            let old = self.desired.sets.get(&old_set).map(|s| &**s);
                            let entries = movement.entries(
                                &content.entries,
                                Some((old, old_flags)),
                                flags,
                                rule,
                            );
                            if entries == content.entries {
                                content.clone()
                            } else {
                                Arc::new(set_content(entries))
                            }
                        });
                        self.transitional |=
                            !Arc::ptr_eq(content, class_content.as_ref().unwrap_or(content));
                        Some(content.clone())
                    }
                    (content, _, _) => content.clone(),
                };
                let set = match &content {
                    Some(content) => match self.set_numbers.number(content.digest) {
                        Ok(number) => {
                            used_sets.insert(number, content.clone());
                            used_rules.extend(content.entries.values().copied());
                            number
                        }
                        Err(_) => 0,
                    },
                    None => 0,
                };
                desired.endpoints.insert(
                    ip,
                    EndpointInfo {
                        name: format!("{}/{}", facts.namespace, facts.name),
                        uid: facts.uid.clone(),
                        identity,
                        set,
                        flags,
                    },
                );
            }
        }
        self.classes = classes;
        self.set_numbers
            .retain(|number, _| used_sets.contains_key(&number));
        desired.sets = used_sets;
        let names: BTreeMap<u32, String> = self
            .policies
            .iter()
            .filter_map(|(id, (_, policy, _))| Some((id, policy.as_ref()?)))
            .flat_map(|(id, policy)| {
                let ingress = policy
                    .ingress
                    .iter()
                    .flatten()
                    .map(move |r| (DIRECTION_INGRESS, r.index));
                let egress = policy
                    .egress
                    .iter()
                    .flatten()
                    .map(move |r| (DIRECTION_EGRESS, r.index));
                ingress
                    .chain(egress)
                    .map(move |(dir, index)| rule_name(id, dir, index))
            })
            .chain(std::iter::once(TRANSITION_RULE.to_string()))
            .filter_map(|name| Some((self.rule_numbers.get(&digest(&name))?, name)))
            .filter(|(number, _)| used_rules.contains(number))
            .collect();
        self.rule_numbers
            .retain(|number, _| used_rules.contains(&number));
        desired.rules = names;
        desired
    }

    /// The set of a class of endpoints: cached while nothing it depends on
    /// changed.
    fn class(&mut self, key: &ClassKey, errors: &mut Vec<ObjectError>) -> ClassCached {
        let labels = self.identities[&key.identity].clone();
        let selecting: Vec<Arc<Policy>> = self
            .policies
            .values()
            .filter_map(|(_, policy, _)| policy.as_ref())
            .filter(|p| {
                p.id.namespace == labels.namespace && p.pod_selector.matches(&labels.pod_labels)
            })
            .cloned()
            .collect();
        let mut hasher = FxHasher::default();
        for policy in &selecting {
            (Arc::as_ptr(policy) as usize).hash(&mut hasher);
            for peer in pod_peers(policy) {
                self.members.get(&peer).map(|m| m.version).hash(&mut hasher);
            }
            if !policy_cidrs(policy).is_empty() {
                self.cidr_version.hash(&mut hasher);
            }
            if names_ports_by_identity(policy) {
                self.identities_version.hash(&mut hasher);
            }
        }
        self.retiring.hash(&mut hasher);
        let fingerprint = hasher.finish();
        if let Some(cached) = self
            .classes
            .get(key)
            .filter(|c| c.fingerprint == fingerprint)
        {
            return ClassCached {
                fingerprint,
                flags: cached.flags,
                content: cached.content.clone(),
            };
        }
        let ingress = selecting.iter().any(|p| p.ingress.is_some());
        let egress = selecting.iter().any(|p| p.egress.is_some());
        let flags = isolation_flags(ingress, egress);
        if flags == 0 {
            return ClassCached {
                fingerprint,
                flags,
                content: None,
            };
        }
        let mut entries: BTreeMap<Entry, u32> = BTreeMap::new();
        for policy in &selecting {
            for (direction, rules) in [
                (DIRECTION_INGRESS, &policy.ingress),
                (DIRECTION_EGRESS, &policy.egress),
            ] {
                for rule in rules.iter().flatten() {
                    let name = rule_name(&policy.id, direction, rule.index);
                    let Ok(rule_id) = self.rule_numbers.number(digest(&name)) else {
                        errors.push(ObjectError {
                            origin: "policy".into(),
                            object: format!("NetworkPolicy {}", policy.id),
                            field: "spec".into(),
                            reason: "no rule number left; the rule matches nothing".into(),
                        });
                        continue;
                    };
                    for entry in self.rule_entries(direction, rule, key) {
                        entries
                            .entry(entry)
                            .and_modify(|r| *r = (*r).min(rule_id))
                            .or_insert(rule_id);
                    }
                }
            }
        }
        ClassCached {
            fingerprint,
            flags,
            content: Some(Arc::new(set_content(entries))),
        }
    }

    /// The entries of one rule for an endpoint of class `key`.
    ///
    /// Retiring identities are left out: no address has them once this
    /// update is written, and until then the sets judge them as the old
    /// sets did (see [`transition_entries`]).
    fn rule_entries(&self, direction: u8, rule: &crate::rules::Rule, key: &ClassKey) -> Vec<Entry> {
        let retiring = &self.retiring.0;
        // Peer identities; `None` stands for any peer. Pods are peers by
        // their label identity, and also by their CIDR identity in a block;
        // a named port resolves on pods only, by their label identity:
        // `pod_peers` are the label identities of the peers (`None`: every
        // one).
        let mut pod_peers: Option<BTreeSet<u32>> = None;
        let peers: Vec<u32> = match &rule.peers {
            None => vec![IDENTITY_ANY],
            Some(peers) => {
                let mut ids = BTreeSet::new();
                let mut pod_ids = BTreeSet::new();
                for peer in peers {
                    match peer {
                        Peer::Pods { namespaces, pods } => {
                            if let Some(m) = self.members.get(&(namespaces.clone(), pods.clone())) {
                                let current =
                                    m.identities.iter().filter(|id| !retiring.contains(id));
                                ids.extend(current.clone());
                                pod_ids.extend(current);
                            }
                        }
                        Peer::Block { cidr, except } => {
                            ids.extend(
                                self.cidrs
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
                                    self.identities
                                        .iter()
                                        .filter(|(id, labels)| {
                                            labels.blocks.contains(&block) && !retiring.contains(id)
                                        })
                                        .map(|(id, _)| *id),
                                );
                            }
                        }
                    }
                }
                pod_peers = Some(pod_ids);
                ids.into_iter().collect()
            }
        };
        let mut out = Vec::new();
        match &rule.ports {
            None => out.extend(peers.iter().map(|id| Entry {
                direction,
                identity: *id,
                l4: L4::Any,
            })),
            Some(ports) => {
                for port in ports {
                    match &port.port {
                        PortMatch::Any => out.extend(peers.iter().map(|id| Entry {
                            direction,
                            identity: *id,
                            l4: L4::Proto(port.proto),
                        })),
                        PortMatch::Range(first, last) => {
                            for (start, prefix) in port_prefixes(*first, *last) {
                                out.extend(peers.iter().map(|id| Entry {
                                    direction,
                                    identity: *id,
                                    l4: L4::Ports {
                                        proto: port.proto,
                                        port: start,
                                        prefix,
                                    },
                                }));
                            }
                        }
                        PortMatch::Named(name) => {
                            let named = (name.clone(), port.proto);
                            let entry = |identity: u32, number: u16| Entry {
                                direction,
                                identity,
                                l4: L4::Ports {
                                    proto: port.proto,
                                    port: number,
                                    prefix: 16,
                                },
                            };
                            if direction == DIRECTION_INGRESS {
                                // The port is this endpoint's.
                                if let Some(number) = key.named_ports.get(&named) {
                                    out.extend(peers.iter().map(|id| entry(*id, *number)));
                                }
                                continue;
                            }
                            // Egress: the destination's, which its label
                            // identity carries.
                            let number_of = |id: &u32| {
                                self.identities
                                    .get(id)
                                    .and_then(|l| l.named_ports.get(&named).copied())
                            };
                            match &pod_peers {
                                None => out.extend(
                                    self.identities
                                        .keys()
                                        .filter(|id| !retiring.contains(id))
                                        .filter_map(|id| {
                                            number_of(id).map(|number| entry(*id, number))
                                        }),
                                ),
                                Some(ids) => out.extend(ids.iter().filter_map(|id| {
                                    number_of(id).map(|number| entry(*id, number))
                                })),
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// A set of `entries`, with its digest.
fn set_content(entries: BTreeMap<Entry, u32>) -> SetContent {
    let mut text = String::new();
    for (entry, rule) in &entries {
        let _ = write!(text, "{entry:?}={rule};");
    }
    SetContent {
        digest: digest(&text),
        entries,
    }
}

/// The inputs identities depend on: excluded keys a selector names, the
/// (name, protocol) of every named port in an egress rule, and the ipBlocks
/// of egress rules with named ports.
fn identity_inputs<'a>(
    config: &IdentityConfig,
    policies: impl Iterator<Item = &'a CachedPolicy>,
) -> IdentityInputs {
    let mut selected = BTreeSet::new();
    let mut named = BTreeSet::new();
    let mut blocks: BTreeMap<Block, BTreeSet<(String, u8)>> = BTreeMap::new();
    for policy in policies.filter_map(|(_, p, _)| p.as_ref()) {
        let mut note = |selector: &Selector| {
            for key in selector.keys() {
                if config.excluded.iter().any(|e| e == key) {
                    selected.insert(key.to_string());
                }
            }
        };
        note(&policy.pod_selector);
        for (namespaces, pods) in pod_peers(policy) {
            note(&pods);
            if let Namespaces::Matching(selector) = namespaces {
                note(&selector);
            }
        }
        for rule in policy.egress.iter().flatten() {
            let names: BTreeSet<(String, u8)> = rule
                .ports
                .iter()
                .flatten()
                .filter_map(|port| match &port.port {
                    PortMatch::Named(name) => Some((name.clone(), port.proto)),
                    _ => None,
                })
                .collect();
            if names.is_empty() {
                continue;
            }
            for peer in rule.peers.iter().flatten() {
                if let Peer::Block { cidr, except } = peer {
                    let block = Block {
                        cidr: *cidr,
                        except: except.clone(),
                    };
                    blocks
                        .entry(block)
                        .or_default()
                        .extend(names.iter().cloned());
                }
            }
            named.extend(names);
        }
    }
    IdentityInputs {
        selected,
        egress_named: named,
        blocks,
    }
}

/// Whether a policy has an egress rule to any peer or to an ipBlock on a
/// named port: its entries list every identity that has the port (and is
/// in the block).
fn names_ports_by_identity(policy: &Policy) -> bool {
    policy.egress.iter().flatten().any(|rule| {
        rule.peers
            .as_ref()
            .is_none_or(|peers| peers.iter().any(|peer| matches!(peer, Peer::Block { .. })))
            && rule
                .ports
                .iter()
                .flatten()
                .any(|p| matches!(p.port, PortMatch::Named(_)))
    })
}

/// Every pod peer a policy names.
fn pod_peers(policy: &Policy) -> Vec<(Namespaces, Selector)> {
    policy
        .ingress
        .iter()
        .chain(&policy.egress)
        .flatten()
        .flat_map(|rule| rule.peers.iter().flatten())
        .filter_map(|peer| match peer {
            Peer::Pods { namespaces, pods } => Some((namespaces.clone(), pods.clone())),
            Peer::Block { .. } => None,
        })
        .collect()
}

/// Every CIDR a policy names, blocks and exceptions.
fn policy_cidrs(policy: &Policy) -> Vec<IpNetwork> {
    policy
        .ingress
        .iter()
        .chain(&policy.egress)
        .flatten()
        .flat_map(|rule| rule.peers.iter().flatten())
        .flat_map(|peer| match peer {
            Peer::Block { cidr, except } => {
                let mut all = vec![*cidr];
                all.extend(except.iter().copied());
                all
            }
            Peer::Pods { .. } => Vec::new(),
        })
        .collect()
}

/// Whether an identity's pods are peers of a pod peer.
fn peer_matches((namespaces, pods): &(Namespaces, Selector), labels: &IdentityLabels) -> bool {
    let namespace_ok = match namespaces {
        Namespaces::Own(namespace) => *namespace == labels.namespace,
        Namespaces::Matching(selector) => selector.matches(&labels.namespace_labels),
    };
    namespace_ok && pods.matches(&labels.pod_labels)
}

/// A namespace's labels, with the name label the API server sets (also when
/// a YAML directory has no Namespace object for it).
fn namespace_labels(name: &str, namespace: Option<&Namespace>) -> BTreeMap<String, String> {
    let mut labels = namespace
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    labels
}

/// What policy needs of a pod.
fn pod_facts(pod: &Pod, namespace: &str) -> PodFacts {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let terminal = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let mut ips: Vec<IpAddr> = Vec::new();
    if !terminal {
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        for text in listed {
            if let Ok(ip) = text.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    let mut named_ports = NamedPorts::new();
    for container in spec.into_iter().flat_map(|s| &s.containers) {
        for port in container.ports.iter().flatten() {
            let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                continue;
            };
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => PROTO_UDP,
                "SCTP" => PROTO_SCTP,
                _ => PROTO_TCP,
            };
            named_ports.entry((name.clone(), proto)).or_insert(number);
        }
    }
    PodFacts {
        namespace: namespace.to_string(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        named_ports,
    }
}

/// The InternalIP and ExternalIP addresses of a Node.
pub fn addresses_of_node(node: &Node) -> Vec<IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}
