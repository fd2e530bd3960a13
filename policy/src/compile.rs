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
//!   Pods selected by the same policies share one set (see the `sets`
//!   module). A set keeps its number while its policies select pods here,
//!   and changes in place: the plan writes only the entries that changed.
//!
//! Work is proportional to what changed. Objects are compared by their
//! `Arc` (the sources hand over unchanged objects as they were): only new
//! objects are read. Identities are counted by the addresses that have
//! them; the ipcache is rewritten where an address's claims changed; an
//! identity that becomes active is matched against the peer selectors
//! once, a new peer against the active identities of its namespace (or
//! all, for a namespace selector); a set is patched where identities came
//! or went, and computed whole only when new or when the CIDRs change
//! under its ipBlocks. [`PolicyStats`] counts that work.
//!
//! An update that moves addresses to other identities (a relabel, a CIDR
//! that comes or goes) is written in two: its sets judge the identities
//! that addresses leave or get partly as the old sets did (see the
//! `transition` module), and [`PolicyUpdate::follow_up`] asks for one more
//! update, which writes the final sets once the addresses have moved. A
//! label identity that nothing uses any more is kept for that one more
//! update as well, and so is a CIDR's identity (its prefix leaves the
//! ipcache at once). A relabeled pod therefore never loses, nor gains, a
//! verdict that is the same before and after, while the writes go in.

mod cidrs;
mod identities;
mod objects;
mod sets;
mod transition;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::NetworkPolicy,
};
use lb_common::policy::{
    IpcacheValue, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABELS,
    IDENTITY_HOST, IDENTITY_MAX, IDENTITY_REMOTE_NODE, IDENTITY_WORLD,
};
use lb_core::{
    intent::{ObjectError, Objects, Sourced},
    pod::Pod,
};
use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

use self::{
    cidrs::CidrIndex,
    identities::{Identities, Slot},
    objects::{named_ports, namespace_labels, peer_matches, IdentityInputs},
    sets::{rule_name, ByAddress, Compiled, Inputs, Membership, Recipe, RecipeKey, RuleNumbers},
    transition::{Movement, WORLD},
};
use crate::{
    desired::{EndpointInfo, IdentityInfo, PolicyDesired, SetContent},
    labels::{digest, IdentityConfig, IdentityLabels},
    numbers::Numbers,
    rules::{parse_policy, Namespaces, PodPeer, PolicyRef},
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

/// The work one update did: what it read, matched and recomputed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Pod objects read (new or changed).
    pub pods_read: usize,
    /// Pods whose identity labels were worked out again for a namespace
    /// or policy change (their objects unchanged).
    pub pods_relabeled: usize,
    /// NetworkPolicy objects parsed (new or changed).
    pub policies_parsed: usize,
    /// Identities numbered.
    pub identities_added: usize,
    /// Identities released.
    pub identities_released: usize,
    /// Peer selectors matched against an identity's labels.
    pub peer_matches: usize,
    /// ipcache entries written or deleted.
    pub ipcache_writes: usize,
    /// Policy sets computed whole (new recipes, or CIDRs changed).
    pub sets_computed: usize,
    /// Policy sets patched where identities changed.
    pub sets_patched: usize,
    /// Endpoints written or deleted.
    pub endpoint_writes: usize,
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
/// endpoints allowed the identities that addresses leave in it.
pub const TRANSITION_RULE: &str = "(allowed before, while identities change)";

/// The first set number of sets that are not a recipe's.
const FIRST_OTHER_SET: u32 = 0x8000_0000;

/// What a CIDR identity stands for, as text.
fn cidr_text(cidr: &IpNetwork) -> String {
    format!("cidr:{cidr}")
}

fn object_address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

/// Whether `objects` are the objects of `addresses`, in order.
fn same_objects<T>(objects: &[Sourced<T>], addresses: &[usize]) -> bool {
    objects.len() == addresses.len()
        && objects
            .iter()
            .zip(addresses)
            .all(|(o, a)| object_address(&o.object) == *a)
}

/// A Namespace object (held, so that its address is not reused while
/// cached), and its labels.
struct CachedNamespace {
    _object: Arc<Namespace>,
    labels: Arc<BTreeMap<String, String>>,
}

/// A NetworkPolicy object (held), what it validated to, and its errors.
struct CachedPolicy {
    object: Arc<NetworkPolicy>,
    compiled: Option<Arc<Compiled>>,
    errors: Vec<ObjectError>,
}

/// A pod the compiler holds, by the address of its object.
struct PodCached {
    /// The last update that saw the object.
    seen: u64,
    /// The update that worked out its identity labels last.
    claimed: u64,
    /// The pod (held, so that its address, which keys the cache, is not
    /// reused).
    pod: Arc<Pod>,
    /// The identity slot of each of its addresses (`pod.ips`), inline for
    /// the one or two a pod has; none for a hostNetwork pod.
    slots: SmallVec<[Slot; 2]>,
    /// The identity labels of its first address (a pod's addresses differ
    /// only in their blocks).
    labels: Option<Arc<IdentityLabels>>,
    /// The recipe of its set, and the version of its namespace's policies
    /// it was found with: only this node's pods have one, so it is boxed
    /// to keep the other entries small.
    recipe: Option<Box<(u64, RecipeKey)>>,
}

/// A pod that claims an address.
struct Owner {
    pod: usize,
    slot: Slot,
    object: Arc<Pod>,
}

/// The incremental policy compiler.
pub struct PolicyCompiler {
    config: PolicyConfig,
    /// Counts updates.
    version: u64,
    stats: PolicyStats,

    namespace_objects: Vec<usize>,
    namespaces: FxHashMap<String, CachedNamespace>,
    policy_objects: Vec<usize>,
    policies: BTreeMap<PolicyRef, CachedPolicy>,
    /// Per namespace, the update in which its policies last changed.
    policy_versions: FxHashMap<String, u64>,
    inputs: IdentityInputs,
    pod_objects: Vec<usize>,
    pods: FxHashMap<usize, PodCached>,
    /// This node's pods (not hostNetwork).
    local_pods: FxHashSet<usize>,
    node_objects: Vec<usize>,
    /// Node addresses, and whether they are this node's.
    node_addresses: FxHashMap<IpAddr, bool>,

    identities: Identities,
    /// Pod addresses and the pods that claim them (normally one, kept
    /// inline).
    pod_addresses: FxHashMap<IpAddr, SmallVec<[Owner; 1]>>,
    cidr_numbers: Numbers,
    /// Every CIDR the policies name, with its identity.
    cidrs: BTreeMap<IpNetwork, u32>,
    cidr_index: CidrIndex,
    /// CIDRs the policies named until the last update, with their identity.
    retiring_cidrs: BTreeMap<IpNetwork, u32>,
    cidr_version: u64,

    members: FxHashMap<PodPeer, Membership>,
    recipes: FxHashMap<RecipeKey, Recipe>,
    /// Numbers of the sets of recipes (each recipe keeps its number while
    /// in use, and its set changes in place), by an owner key per recipe;
    /// sets found in the kernel at start are keyed by their digest until a
    /// recipe with that content takes them.
    recipe_sets: Numbers,
    /// Gives each recipe its owner key.
    recipe_serial: u64,
    /// Numbers of the sets of the transition that are not a recipe's, by
    /// digest.
    other_sets: Numbers,
    rules: RuleNumbers,
    desired: PolicyDesired,
    /// Whether some set of the desired state is one of transition.
    transitional: bool,
}

/// The valid policies that came and went in an update.
#[derive(Default)]
struct PolicyDelta {
    came: Vec<Arc<Compiled>>,
    gone: Vec<Arc<Compiled>>,
}

/// The ipcache writes of one update: the keys to work out again, and the
/// value each changed key had before the update.
#[derive(Default)]
struct Writes {
    dirty: FxHashSet<IpNetwork>,
    before: FxHashMap<IpNetwork, Option<IpcacheValue>>,
}

impl PolicyCompiler {
    /// A compiler for `config` that keeps the numbers a previous agent
    /// gave (`adopted`).
    pub fn new(config: PolicyConfig, adopted: &Adopted) -> Self {
        let mut label_numbers = Numbers::new(IDENTITY_FIRST_LABELS, IDENTITY_FIRST_CIDR - 1);
        let mut cidr_numbers = Numbers::new(IDENTITY_FIRST_CIDR, IDENTITY_MAX);
        label_numbers.adopt(adopted.identities.iter().copied());
        cidr_numbers.adopt(adopted.identities.iter().copied());
        let mut recipe_sets = Numbers::new(1, FIRST_OTHER_SET - 1);
        recipe_sets.adopt(adopted.sets.iter().copied());
        let mut other_sets = Numbers::new(FIRST_OTHER_SET, u32::MAX);
        other_sets.adopt(adopted.sets.iter().copied());
        let mut rule_numbers = Numbers::new(1, u32::MAX);
        rule_numbers.adopt(
            adopted
                .rules
                .iter()
                .map(|(number, name)| (*number, digest(name))),
        );
        Self {
            config,
            version: 0,
            stats: PolicyStats::default(),
            namespace_objects: Vec::new(),
            namespaces: FxHashMap::default(),
            policy_objects: Vec::new(),
            policies: BTreeMap::new(),
            policy_versions: FxHashMap::default(),
            inputs: IdentityInputs::default(),
            pod_objects: Vec::new(),
            pods: FxHashMap::default(),
            local_pods: FxHashSet::default(),
            node_objects: Vec::new(),
            node_addresses: FxHashMap::default(),
            identities: Identities::new(label_numbers),
            pod_addresses: FxHashMap::default(),
            cidr_numbers,
            cidrs: BTreeMap::new(),
            cidr_index: CidrIndex::default(),
            retiring_cidrs: BTreeMap::new(),
            cidr_version: 0,
            members: FxHashMap::default(),
            recipes: FxHashMap::default(),
            recipe_sets,
            recipe_serial: 0,
            other_sets,
            rules: RuleNumbers {
                numbers: rule_numbers,
                names: FxHashMap::default(),
            },
            desired: PolicyDesired::default(),
            transitional: false,
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &PolicyDesired {
        &self.desired
    }

    /// The labels of a label identity, if it is in use.
    pub fn identity_labels(&self, identity: u32) -> Option<&IdentityLabels> {
        self.identities.labels(identity).map(|labels| &**labels)
    }

    /// The work the last update did.
    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    /// Brings the desired state up to date with `objects`.
    pub fn update(&mut self, objects: &Objects) -> PolicyUpdate {
        self.version += 1;
        self.stats = PolicyStats::default();
        let mut errors = Vec::new();
        let mut writes = Writes::default();
        let mut changed = false;

        let namespaces_changed = self.update_namespaces(objects);
        let policy_delta = self.update_policies(objects);
        let policies_changed = policy_delta.is_some();
        let mut inputs_changed = false;
        if policies_changed {
            let inputs = IdentityInputs::of(&self.config.identity, self.compiled());
            inputs_changed = inputs != self.inputs;
            self.inputs = inputs;
        }
        self.update_pods(objects, &namespaces_changed, inputs_changed, &mut writes);

        // Identities: number the new, retire the unused, release the
        // retired.
        let settled = self.identities.settle(&mut errors);
        self.stats.identities_added = settled.added.len();
        self.stats.identities_released = settled.released.len();
        if !settled.added.is_empty() || !settled.released.is_empty() {
            changed = true;
        }
        for number in &settled.released {
            self.desired.identities.remove(number);
        }
        for (number, labels) in &settled.added {
            let text = labels.canonical();
            self.desired.identities.insert(
                *number,
                IdentityInfo {
                    digest: digest(&text),
                    text,
                },
            );
        }
        if settled.late {
            // Identities that waited for a number: their addresses change.
            writes
                .dirty
                .extend(self.pod_addresses.keys().map(|ip| IpNetwork::from(*ip)));
        }

        let (old_cidr_index, cidrs_changed) =
            self.update_cidrs(policies_changed, &mut writes, &mut errors);
        changed |= cidrs_changed;
        self.update_nodes(objects, &mut writes);
        self.write_ipcache(&mut writes);
        changed |= !writes.before.is_empty();
        let gone: Vec<u32> = settled
            .deactivated
            .iter()
            .chain(&settled.released)
            .copied()
            .collect();
        self.update_members(policy_delta.as_ref(), &settled.activated, &gone);
        // The identities whose entries may differ in the sets. Those that
        // retire keep theirs until they are released (or active again): no
        // address has them meanwhile, and the sets of the transition judge
        // them as before anyway.
        let touched: BTreeSet<u32> = settled
            .activated
            .iter()
            .map(|(id, _)| *id)
            .chain(settled.released.iter().copied())
            .collect();
        if let Some(delta) = &policy_delta {
            changed |= self.prune_rules(delta);
        }

        // The value of the longest CIDR strictly holding a prefix.
        let covering = |index: &CidrIndex, prefix: &IpNetwork| {
            let at_most = prefix.prefix().checked_sub(1)?;
            let id = index.longest_within(prefix.network(), at_most)?;
            Some(IpcacheValue {
                identity: id,
                cidr_identity: id,
            })
        };
        let old_index = old_cidr_index.as_ref().unwrap_or(&self.cidr_index);
        let movement = Movement::from_changes(
            writes
                .before
                .iter()
                .map(|(key, before)| (key, *before, self.desired.ipcache.get(key).copied())),
            |p| covering(old_index, p).unwrap_or(WORLD),
            |p| covering(&self.cidr_index, p).unwrap_or(WORLD),
        );
        changed |= self.update_endpoints(&movement, &touched, &mut errors);

        let enforcing = self.policies.values().any(|p| p.compiled.is_some());
        changed |= enforcing != self.desired.enforcing;
        self.desired.enforcing = enforcing;

        for policy in self.policies.values() {
            errors.extend(policy.errors.iter().cloned());
        }
        errors.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field).cmp(&(&b.origin, &b.object, &b.field))
        });
        PolicyUpdate {
            errors,
            changed: changed || policies_changed,
            follow_up: !self.identities.retiring().is_empty()
                || !self.retiring_cidrs.is_empty()
                || self.transitional,
        }
    }

    /// The valid policies.
    fn compiled(&self) -> impl Iterator<Item = &Compiled> + '_ {
        self.policies.values().filter_map(|p| p.compiled.as_deref())
    }

    /// Takes the namespaces' labels; returns the names whose labels (object)
    /// changed, appeared or went.
    fn update_namespaces(&mut self, objects: &Objects) -> FxHashSet<String> {
        let mut changed = FxHashSet::default();
        if same_objects(&objects.namespaces, &self.namespace_objects) {
            return changed;
        }
        let mut namespaces = FxHashMap::default();
        for sourced in &objects.namespaces {
            let Some(name) = sourced.object.metadata.name.clone() else {
                continue;
            };
            let labels = match self.namespaces.remove(&name) {
                Some(cached) if Arc::ptr_eq(&cached._object, &sourced.object) => cached.labels,
                _ => {
                    changed.insert(name.clone());
                    Arc::new(namespace_labels(&name, Some(&sourced.object)))
                }
            };
            namespaces.insert(
                name,
                CachedNamespace {
                    _object: sourced.object.clone(),
                    labels,
                },
            );
        }
        changed.extend(self.namespaces.drain().map(|(name, _)| name));
        self.namespaces = namespaces;
        self.namespace_objects = objects
            .namespaces
            .iter()
            .map(|s| object_address(&s.object))
            .collect();
        changed
    }

    /// Parses new and changed policies; returns the valid ones that came
    /// and went (a changed one does both), or `None` when none changed.
    fn update_policies(&mut self, objects: &Objects) -> Option<PolicyDelta> {
        if same_objects(&objects.network_policies, &self.policy_objects) {
            return None;
        }
        let mut delta = PolicyDelta::default();
        let mut policies = BTreeMap::new();
        let mut touched: FxHashSet<String> = FxHashSet::default();
        for sourced in &objects.network_policies {
            let meta = &sourced.object.metadata;
            let id = PolicyRef {
                namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                name: meta.name.clone().unwrap_or_default(),
            };
            let entry = match self.policies.remove(&id) {
                Some(cached) if Arc::ptr_eq(&cached.object, &sourced.object) => cached,
                old => {
                    touched.insert(id.namespace.clone());
                    self.stats.policies_parsed += 1;
                    delta.gone.extend(old.and_then(|old| old.compiled));
                    let mut errors = Vec::new();
                    let policy = parse_policy(&sourced.origin, &sourced.object, &mut errors);
                    let compiled = policy.map(|p| Arc::new(Compiled::new(p)));
                    delta.came.extend(compiled.clone());
                    CachedPolicy {
                        object: sourced.object.clone(),
                        compiled,
                        errors,
                    }
                }
            };
            // (A later object of the same name wins.)
            if let Some(displaced) = policies.insert(id, entry) {
                delta.gone.extend(displaced.compiled);
            }
        }
        for (id, cached) in std::mem::replace(&mut self.policies, policies) {
            touched.insert(id.namespace);
            delta.gone.extend(cached.compiled);
        }
        self.policy_objects = objects
            .network_policies
            .iter()
            .map(|s| object_address(&s.object))
            .collect();
        for namespace in &touched {
            self.policy_versions.insert(namespace.clone(), self.version);
        }
        (!touched.is_empty()).then_some(delta)
    }

    /// Takes new and changed pods, drops those that went, and works out the
    /// identity labels again where namespaces or policies changed them.
    fn update_pods(
        &mut self,
        objects: &Objects,
        namespaces_changed: &FxHashSet<String>,
        inputs_changed: bool,
        writes: &mut Writes,
    ) {
        if !same_objects(&objects.pods, &self.pod_objects) {
            let seen = self.version;
            let mut added: Vec<&Sourced<Pod>> = Vec::new();
            for sourced in &objects.pods {
                match self.pods.get_mut(&object_address(&sourced.object)) {
                    Some(cached) => cached.seen = seen,
                    None => added.push(sourced),
                }
            }
            let gone: Vec<usize> = self
                .pods
                .iter()
                .filter(|(_, cached)| cached.seen != seen)
                .map(|(address, _)| *address)
                .collect();
            for address in gone {
                let cached = self.pods.remove(&address).expect("pod held");
                self.unclaim(address, &cached, writes);
                self.local_pods.remove(&address);
            }
            for sourced in added {
                let address = object_address(&sourced.object);
                if self.pods.contains_key(&address) {
                    continue; // listed twice
                }
                self.stats.pods_read += 1;
                let pod = &sourced.object;
                let local = self.config.node.is_some()
                    && pod.node.as_deref() == self.config.node.as_deref()
                    && !pod.host_network;
                let mut cached = PodCached {
                    seen,
                    claimed: 0,
                    pod: pod.clone(),
                    slots: SmallVec::new(),
                    labels: None,
                    recipe: None,
                };
                self.claim(address, &mut cached, writes);
                self.pods.insert(address, cached);
                if local {
                    self.local_pods.insert(address);
                }
            }
            self.pod_objects = objects
                .pods
                .iter()
                .map(|s| object_address(&s.object))
                .collect();
        }
        if inputs_changed || !namespaces_changed.is_empty() {
            // (Pods read in this update have their labels as they are now.)
            let affected: Vec<usize> = self
                .pods
                .iter()
                .filter(|(_, c)| c.claimed != self.version)
                .filter(|(_, c)| inputs_changed || namespaces_changed.contains(&*c.pod.namespace))
                .map(|(address, _)| *address)
                .collect();
            for address in affected {
                let mut cached = self.pods.remove(&address).expect("pod held");
                self.unclaim(address, &cached, writes);
                self.claim(address, &mut cached, writes);
                self.pods.insert(address, cached);
                self.stats.pods_relabeled += 1;
            }
        }
    }

    /// Counts a pod's addresses with their identity labels.
    fn claim(&mut self, address: usize, cached: &mut PodCached, writes: &mut Writes) {
        cached.claimed = self.version;
        cached.slots.clear();
        cached.labels = None;
        cached.recipe = None;
        let pod = cached.pod.clone();
        if pod.host_network || pod.ips.is_empty() {
            return;
        }
        let namespace = match self.namespaces.get(&*pod.namespace) {
            Some(cached) => cached.labels.clone(),
            None => Arc::new(namespace_labels(&pod.namespace, None)),
        };
        let labels = self
            .inputs
            .labels_of(&self.config.identity, &pod, &namespace);
        for (ip, labels) in pod.ips.iter().zip(labels) {
            let (slot, labels) = self
                .identities
                .hold(labels, || format!("Pod {}/{}", pod.namespace, pod.name));
            cached.labels.get_or_insert(labels);
            cached.slots.push(slot);
            self.pod_addresses.entry(*ip).or_default().push(Owner {
                pod: address,
                slot,
                object: pod.clone(),
            });
            writes.dirty.insert(IpNetwork::from(*ip));
        }
    }

    /// Stops counting a pod's addresses.
    fn unclaim(&mut self, address: usize, cached: &PodCached, writes: &mut Writes) {
        for (ip, slot) in cached.pod.ips.iter().zip(&cached.slots) {
            self.identities.release(*slot);
            if let Some(owners) = self.pod_addresses.get_mut(ip) {
                owners.retain(|o| o.pod != address);
                if owners.is_empty() {
                    self.pod_addresses.remove(ip);
                }
            }
            writes.dirty.insert(IpNetwork::from(*ip));
        }
    }

    /// Takes the CIDRs the policies name when they changed, and releases
    /// the retired ones. Returns the index of the CIDRs before, when they
    /// changed, and whether CIDR identities changed.
    fn update_cidrs(
        &mut self,
        policies_changed: bool,
        writes: &mut Writes,
        errors: &mut Vec<ObjectError>,
    ) -> (Option<CidrIndex>, bool) {
        let released = std::mem::take(&mut self.retiring_cidrs);
        let mut old_index = None;
        if policies_changed {
            let named: BTreeSet<IpNetwork> = self
                .compiled()
                .flat_map(|policy| policy.cidrs.iter().copied())
                .collect();
            if !named.iter().eq(self.cidrs.keys()) {
                self.cidr_version += 1;
                let mut cidrs = BTreeMap::new();
                for cidr in &named {
                    match self.cidr_numbers.number(digest(&cidr_text(cidr))) {
                        Ok(number) => {
                            cidrs.insert(*cidr, number);
                        }
                        Err(full) => errors.push(ObjectError {
                            origin: "policy".into(),
                            object: format!("CIDR {cidr}"),
                            field: "ipBlock".into(),
                            reason: format!(
                                "no CIDR identity left ({} in use); rules naming it match \
                                 nothing",
                                full.capacity
                            ),
                        }),
                    }
                }
                // A CIDR that goes leaves the ipcache at once: the sets
                // judge its identity as before for one more update, while
                // addresses move off it.
                let old = std::mem::replace(&mut self.cidrs, cidrs);
                for (cidr, number) in &old {
                    if !self.cidrs.contains_key(cidr) {
                        self.retiring_cidrs.insert(*cidr, *number);
                    }
                }
                for (cidr, number) in &self.cidrs {
                    if !old.contains_key(cidr) {
                        let text = cidr_text(cidr);
                        self.desired.identities.insert(
                            *number,
                            IdentityInfo {
                                digest: digest(&text),
                                text,
                            },
                        );
                    }
                }
                writes.dirty.extend(old.keys().chain(self.cidrs.keys()));
                writes
                    .dirty
                    .extend(self.pod_addresses.keys().map(|ip| IpNetwork::from(*ip)));
                writes
                    .dirty
                    .extend(self.node_addresses.keys().map(|ip| IpNetwork::from(*ip)));
                old_index = Some(std::mem::replace(
                    &mut self.cidr_index,
                    CidrIndex::new(&self.cidrs),
                ));
            }
        }
        let mut changed = old_index.is_some();
        for (cidr, number) in released {
            if !self.cidrs.contains_key(&cidr) && !self.retiring_cidrs.contains_key(&cidr) {
                self.cidr_numbers.free(number);
                self.desired.identities.remove(&number);
                changed = true;
            }
        }
        (old_index, changed)
    }

    /// Takes the nodes' addresses.
    fn update_nodes(&mut self, objects: &Objects, writes: &mut Writes) {
        if same_objects(&objects.nodes, &self.node_objects) {
            return;
        }
        let mut addresses: FxHashMap<IpAddr, bool> = FxHashMap::default();
        for node in &objects.nodes {
            let Some(name) = node.object.metadata.name.as_deref() else {
                continue;
            };
            let local = self.config.node.as_deref() == Some(name);
            for ip in addresses_of_node(&node.object) {
                *addresses.entry(ip).or_default() |= local;
            }
        }
        for (ip, local) in &addresses {
            if self.node_addresses.get(ip) != Some(local) {
                writes.dirty.insert(IpNetwork::from(*ip));
            }
        }
        for ip in self.node_addresses.keys() {
            if !addresses.contains_key(ip) {
                writes.dirty.insert(IpNetwork::from(*ip));
            }
        }
        self.node_addresses = addresses;
        self.node_objects = objects
            .nodes
            .iter()
            .map(|s| object_address(&s.object))
            .collect();
    }

    /// The ipcache value of `key`: a node address, else a pod address,
    /// else a policy CIDR.
    fn ipcache_value(&self, key: &IpNetwork) -> Option<IpcacheValue> {
        let host = u8::try_from(if key.is_ipv4() { 32 } else { 128 }).unwrap_or(128);
        if key.prefix() == host {
            let ip = key.ip();
            let cidr_identity = self.cidr_index.longest(ip).unwrap_or(IDENTITY_WORLD);
            if let Some(local) = self.node_addresses.get(&ip) {
                let identity = if *local {
                    IDENTITY_HOST
                } else {
                    IDENTITY_REMOTE_NODE
                };
                return Some(IpcacheValue {
                    identity,
                    cidr_identity,
                });
            }
            if let Some(owner) = self.owner(ip) {
                return Some(IpcacheValue {
                    identity: self.identities.number(owner.slot).unwrap_or(IDENTITY_WORLD),
                    cidr_identity,
                });
            }
        }
        self.cidrs.get(key).map(|id| IpcacheValue {
            identity: *id,
            cidr_identity: *id,
        })
    }

    /// The pod an address is of (the first by name when several claim it).
    fn owner(&self, ip: IpAddr) -> Option<&Owner> {
        self.pod_addresses.get(&ip)?.iter().min_by(|a, b| {
            (&a.object.namespace, &a.object.name, a.pod).cmp(&(
                &b.object.namespace,
                &b.object.name,
                b.pod,
            ))
        })
    }

    /// Writes the ipcache entries (and pod names) of the dirty keys.
    fn write_ipcache(&mut self, writes: &mut Writes) {
        for key in std::mem::take(&mut writes.dirty) {
            let host = if key.is_ipv4() { 32 } else { 128 };
            let name = (key.prefix() == host)
                .then(|| self.owner(key.ip()))
                .flatten()
                .map(|owner| format!("{}/{}", owner.object.namespace, owner.object.name));
            match name {
                Some(name) => {
                    if self.desired.pod_names.get(&key.ip()).map(|n| &**n) != Some(&*name) {
                        self.desired.pod_names.insert(key.ip(), Arc::from(name));
                    }
                }
                None => {
                    self.desired.pod_names.remove(&key.ip());
                }
            }
            let value = self.ipcache_value(&key);
            let before = self.desired.ipcache.get(&key).copied();
            if value == before {
                continue;
            }
            writes.before.entry(key).or_insert(before);
            self.stats.ipcache_writes += 1;
            match value {
                Some(value) => self.desired.ipcache.insert(key, value),
                None => self.desired.ipcache.remove(&key),
            };
        }
        writes
            .before
            .retain(|key, before| self.desired.ipcache.get(key) != before.as_ref());
    }

    /// Keeps peer memberships current: identities that became active are
    /// matched against every peer that may hold them, inactive ones
    /// removed, new peers matched against the active identities that may be
    /// theirs, peers no policy names dropped.
    fn update_members(
        &mut self,
        policies: Option<&PolicyDelta>,
        activated: &[(u32, Arc<IdentityLabels>)],
        gone: &[u32],
    ) {
        // Peers are counted by the policies that name them.
        let mut new_peers: Vec<PodPeer> = Vec::new();
        for policy in policies.iter().flat_map(|d| &d.came) {
            for peer in &policy.peers {
                match self.members.get_mut(peer) {
                    Some(membership) => membership.users += 1,
                    None => {
                        self.members.insert(
                            peer.clone(),
                            Membership {
                                identities: BTreeSet::new(),
                                users: 1,
                            },
                        );
                        new_peers.push(peer.clone());
                    }
                }
            }
        }
        for policy in policies.iter().flat_map(|d| &d.gone) {
            for peer in &policy.peers {
                if let Some(membership) = self.members.get_mut(peer) {
                    membership.users -= 1;
                    if membership.users == 0 {
                        self.members.remove(peer);
                    }
                }
            }
        }
        new_peers.retain(|peer| self.members.contains_key(peer));
        // Known peers: the identities that came and went.
        if !activated.is_empty() || !gone.is_empty() {
            let mut matches = 0;
            for (peer, membership) in &mut self.members {
                if new_peers.contains(peer) {
                    continue;
                }
                for id in gone {
                    membership.identities.remove(id);
                }
                for (id, labels) in activated {
                    if let Namespaces::Own(namespace) = &peer.namespaces {
                        if *namespace != labels.namespace {
                            continue;
                        }
                    }
                    matches += 1;
                    if peer_matches(peer, labels) {
                        membership.identities.insert(*id);
                    }
                }
            }
            self.stats.peer_matches += matches;
        }
        // New peers: every active identity that may be theirs.
        if !new_peers.is_empty() {
            let retiring = self.identities.retiring();
            let mut by_namespace: FxHashMap<&str, Vec<(u32, &IdentityLabels)>> =
                FxHashMap::default();
            for (id, labels) in self.identities.iter() {
                if !retiring.contains(&id) {
                    by_namespace
                        .entry(labels.namespace.as_str())
                        .or_default()
                        .push((id, labels));
                }
            }
            let all: Vec<(u32, &IdentityLabels)> =
                by_namespace.values().flatten().copied().collect();
            for peer in new_peers {
                let candidates = match &peer.namespaces {
                    Namespaces::Own(namespace) => by_namespace
                        .get(namespace.as_str())
                        .map_or(&[][..], |v| &v[..]),
                    Namespaces::Matching(_) => &all[..],
                };
                self.stats.peer_matches += candidates.len();
                let identities = candidates
                    .iter()
                    .filter(|(_, labels)| peer_matches(&peer, labels))
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(membership) = self.members.get_mut(&peer) {
                    membership.identities = identities;
                }
            }
        }
    }

    /// Frees the numbers of the rules of policies that went or changed,
    /// that the policies now have no more; returns whether the rule names
    /// changed.
    fn prune_rules(&mut self, delta: &PolicyDelta) -> bool {
        let mut gone: BTreeSet<String> = BTreeSet::new();
        for policy in &delta.gone {
            let policy = &policy.policy;
            let now = self
                .policies
                .get(&policy.id)
                .and_then(|p| p.compiled.as_ref());
            for (direction, rules, kept) in [
                (
                    DIRECTION_INGRESS,
                    &policy.ingress,
                    now.and_then(|p| p.policy.ingress.as_ref()),
                ),
                (
                    DIRECTION_EGRESS,
                    &policy.egress,
                    now.and_then(|p| p.policy.egress.as_ref()),
                ),
            ] {
                for rule in rules.iter().flatten() {
                    if !kept.is_some_and(|k| k.iter().any(|r| r.index == rule.index)) {
                        gone.insert(rule_name(&policy.id, direction, rule.index));
                    }
                }
            }
        }
        if gone.is_empty() {
            return false;
        }
        self.rules.forget(&gone);
        self.sync_rule_names()
    }

    /// Makes the desired rule names those of the numbered rules; returns
    /// whether they changed.
    fn sync_rule_names(&mut self) -> bool {
        if self.rules.names.len() == self.desired.rules.len()
            && self
                .rules
                .names
                .iter()
                .all(|(n, name)| self.desired.rules.get(n) == Some(name))
        {
            return false;
        }
        self.desired.rules = self
            .rules
            .names
            .iter()
            .map(|(n, name)| (*n, name.clone()))
            .collect();
        true
    }

    /// The recipe of a local pod's set.
    fn recipe_key(&self, cached: &PodCached) -> Option<RecipeKey> {
        let labels = cached.labels.as_ref()?;
        let namespace = &*cached.pod.namespace;
        let start = PolicyRef {
            namespace: namespace.to_string(),
            name: String::new(),
        };
        let policies: Vec<ByAddress> = self
            .policies
            .range(start..)
            .take_while(|(id, _)| id.namespace == *namespace)
            .filter_map(|(_, p)| p.compiled.clone())
            .filter(|p| p.policy.pod_selector.matches(&labels.pod_labels))
            .map(ByAddress)
            .collect();
        let named_ports = if policies.iter().any(|p| p.0.ingress_named) {
            named_ports(&cached.pod)
        } else {
            Default::default()
        };
        Some(RecipeKey {
            policies,
            named_ports,
        })
    }

    /// Brings the endpoints (this node's pods), their sets and the rules
    /// up to date; returns whether they changed.
    fn update_endpoints(
        &mut self,
        movement: &Movement,
        touched: &BTreeSet<u32>,
        errors: &mut Vec<ObjectError>,
    ) -> bool {
        // Each local pod's recipe, found again where its namespace's
        // policies changed.
        let mut locals: Vec<usize> = self.local_pods.iter().copied().collect();
        locals.sort_by(|a, b| {
            let (a, b) = (&self.pods[a].pod, &self.pods[b].pod);
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        });
        for address in &locals {
            let cached = &self.pods[address];
            let version = self
                .policy_versions
                .get(&*cached.pod.namespace)
                .copied()
                .unwrap_or(0);
            if cached
                .recipe
                .as_ref()
                .is_some_and(|recipe| recipe.0 == version)
            {
                continue;
            }
            let key = self.recipe_key(cached);
            if let Some(cached) = self.pods.get_mut(address) {
                cached.recipe = key.map(|key| Box::new((version, key)));
            }
        }

        // What the sets held before, as far as the transition needs it (the
        // entries of the identities that move, and the wildcard's), and
        // their digests; the sets themselves are let go, so that recipes
        // patch theirs in place.
        let old_digests: Vec<(u32, [u8; 16])> = self
            .desired
            .sets
            .iter()
            .map(|(number, content)| (*number, content.digest))
            .collect();
        let old_sets: FxHashMap<u32, SetContent> = if movement.is_empty() {
            FxHashMap::default()
        } else {
            self.desired
                .sets
                .iter()
                .map(|(number, content)| (*number, movement.relevant(content)))
                .collect()
        };
        self.desired.sets.clear();

        // The recipes in use, patched where identities changed, computed
        // when new or when CIDRs changed under them.
        let mut recipes: FxHashMap<RecipeKey, Recipe> = FxHashMap::default();
        {
            let inputs = Inputs {
                members: &self.members,
                cidrs: &self.cidrs,
                cidr_version: self.cidr_version,
                identities: &self.identities,
                version: self.version,
            };
            for address in &locals {
                let Some(recipe) = &self.pods[address].recipe else {
                    continue;
                };
                let key = &recipe.1;
                if recipes.contains_key(key) {
                    continue;
                }
                let recipe = match self.recipes.remove(key) {
                    Some(mut recipe) if key.patchable(&recipe, &inputs) => {
                        if key.patch(&mut recipe, touched, &inputs, &mut self.rules, errors) {
                            self.stats.sets_patched += 1;
                        }
                        recipe
                    }
                    old => {
                        self.stats.sets_computed += 1;
                        let mut recipe = key.compute(&inputs, &mut self.rules, errors);
                        match old {
                            Some(old) => (recipe.owner, recipe.number) = (old.owner, old.number),
                            None => {
                                self.recipe_serial += 1;
                                recipe.owner[..8]
                                    .copy_from_slice(&self.recipe_serial.to_be_bytes());
                                recipe.owner[8..].copy_from_slice(b"recipe\0\0");
                            }
                        }
                        recipe
                    }
                };
                recipes.insert(key.clone(), recipe);
            }
        }
        for (_, gone) in std::mem::replace(&mut self.recipes, recipes) {
            if let Some(number) = gone.number {
                self.recipe_sets.free(number);
            }
        }

        // Endpoints, with the sets of the transition while addresses move.
        self.transitional = false;
        let transition_rule = if movement.is_empty() {
            None
        } else {
            let rule = self.rules.number(TRANSITION_RULE);
            if rule.is_none() {
                errors.push(ObjectError {
                    origin: "policy".into(),
                    object: "NetworkPolicy".into(),
                    field: "spec".into(),
                    reason: "no rule number left; pods whose identity changes may see drops \
                             until the change is written"
                        .into(),
                });
            }
            rule
        };
        // Each endpoint's content: its recipe's set, or one of the
        // transition.
        struct Planned<'a> {
            ip: IpAddr,
            key: &'a RecipeKey,
            content: Option<Arc<SetContent>>,
            info: EndpointInfo,
        }
        let mut transitions: FxHashMap<(&RecipeKey, u32, u32), Arc<SetContent>> =
            FxHashMap::default();
        let mut planned: Vec<Planned<'_>> = Vec::new();
        // The content each recipe's number carries in this update: that of
        // the endpoints that had it (they all had the same), else its set.
        let mut carried: FxHashMap<&RecipeKey, Arc<SetContent>> = FxHashMap::default();
        for address in &locals {
            let cached = &self.pods[address];
            let Some(recipe) = &cached.recipe else {
                continue;
            };
            let key = &recipe.1;
            let recipe = &self.recipes[key];
            let pod = &cached.pod;
            for (ip, slot) in pod.ips.iter().zip(&cached.slots) {
                let Some(identity) = self.identities.number(*slot) else {
                    continue; // no identity: no endpoint
                };
                if self.owner(*ip).is_some_and(|o| o.pod != *address) {
                    continue; // another pod's address
                }
                let old = self.desired.endpoints.get(ip).map(|ep| (ep.set, ep.flags));
                let content = match (&recipe.content, old, transition_rule) {
                    (Some(content), Some((old_set, old_flags)), Some(rule)) => {
                        let content = transitions
                            .entry((key, old_set, old_flags))
                            .or_insert_with(|| {
                                let old = old_sets.get(&old_set);
                                match movement.entries(
                                    &content.entries,
                                    Some((old, old_flags)),
                                    recipe.flags,
                                    rule,
                                    |r| self.rules.names.contains_key(&r),
                                ) {
                                    Some(entries) => Arc::new(sets::set_content(entries)),
                                    None => content.clone(),
                                }
                            })
                            .clone();
                        self.transitional |=
                            !Arc::ptr_eq(&content, recipe.content.as_ref().unwrap_or(&content));
                        Some(content)
                    }
                    (content, _, _) => content.clone(),
                };
                if let (Some(content), Some((old_set, _))) = (&content, old) {
                    if recipe.number == Some(old_set) {
                        carried.entry(key).or_insert_with(|| content.clone());
                    }
                }
                planned.push(Planned {
                    ip: *ip,
                    key,
                    content,
                    info: EndpointInfo {
                        name: format!("{}/{}", pod.namespace, pod.name),
                        uid: pod.uid.to_string(),
                        identity,
                        set: 0,
                        flags: recipe.flags,
                    },
                });
            }
        }
        drop(transitions);

        // Numbers: a recipe's number for the content it carries (in place:
        // the plan writes what changed), another by digest for the rest.
        let mut endpoints: BTreeMap<IpAddr, EndpointInfo> = BTreeMap::new();
        let mut used: BTreeMap<u32, Arc<SetContent>> = BTreeMap::new();
        let mut numbers: FxHashMap<&RecipeKey, Option<u32>> = FxHashMap::default();
        for Planned {
            ip,
            key,
            content,
            mut info,
        } in planned
        {
            if let Some(content) = content {
                let recipe = &self.recipes[key];
                let own = carried
                    .get(key)
                    .or(recipe.content.as_ref())
                    .is_some_and(|c| c.digest == content.digest);
                let number = if own {
                    *numbers.entry(key).or_insert_with(|| {
                        let recipe = &self.recipes[key];
                        recipe.number.or_else(|| {
                            // A set found in the kernel with this content,
                            // else a new number.
                            if let Some(adopted) = self.recipe_sets.get(&content.digest) {
                                self.recipe_sets.free(adopted);
                                self.recipe_sets.claim(adopted, recipe.owner);
                            }
                            self.recipe_sets.number(recipe.owner).ok()
                        })
                    })
                } else {
                    self.other_sets.number(content.digest).ok()
                };
                if let Some(number) = number {
                    used.entry(number).or_insert(content);
                    info.set = number;
                }
            }
            endpoints.insert(ip, info);
        }
        for (key, number) in numbers {
            if let Some(recipe) = self.recipes.get_mut(key) {
                recipe.number = number;
            }
        }

        let mut changed = false;
        if endpoints != self.desired.endpoints {
            self.stats.endpoint_writes = endpoints
                .iter()
                .filter(|(ip, ep)| self.desired.endpoints.get(ip) != Some(ep))
                .count()
                + self
                    .desired
                    .endpoints
                    .keys()
                    .filter(|ip| !endpoints.contains_key(ip))
                    .count();
            self.desired.endpoints = endpoints;
            changed = true;
        }
        let same_sets = used.len() == old_digests.len()
            && used
                .iter()
                .zip(&old_digests)
                .all(|((a, x), (b, y))| a == b && x.digest == *y);
        if !same_sets {
            self.other_sets
                .retain(|number, _| used.contains_key(&number));
            changed = true;
        }
        self.desired.sets = used;
        changed |= self.sync_rule_names();
        changed
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
