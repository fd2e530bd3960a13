//! The Service compiler: Kubernetes Service and EndpointSlice objects in,
//! the frontends and backends that should be in the datapath out
//! ([`DesiredState`]), incrementally. One module per concern, in pipeline
//! order: [`validation`] of Service fields, [`endpoints`] and kube-proxy's
//! choice among them, [`frontends`] (ClusterIP, NodePort, ExternalIP,
//! LoadBalancer), and the [`node`] facts they depend on.
//!
//! Invalid objects or fields are reported as [`ObjectError`]s and skipped;
//! they never affect other objects.

#[cfg(test)]
mod claim_tests;
mod endpoints;
mod frontends;
mod node;
#[cfg(test)]
mod tests;
mod validation;

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Time};
use lb_common::{net::Addr, service::ServiceKey};
use rustc_hash::FxHashMap;

pub(crate) use validation::Reporter;
pub use validation::DEFAULT_AFFINITY_TIMEOUT_S;

use self::{
    endpoints::{borrowed_slice_service, slice_service},
    frontends::compile_service,
    node::{node_eligible, node_zone, opted_out_pods, Locality},
};
use crate::{
    desired::{DesiredState, Frontend, ServiceHealth},
    endpoint_slice::EndpointSlice,
    intent::{NodeContext, ObjectError, Objects, Sourced},
};

/// Result of [`compile`]: the desired state plus everything that was skipped.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// What to program.
    pub desired: DesiredState,
    /// Objects or fields that were skipped, with reasons.
    pub errors: Vec<ObjectError>,
}

/// The Service (`namespace`, `name`) of a frontend's display name,
/// `namespace/name:port-name` or `namespace/name`.
pub fn service_of_frontend(frontend: &str) -> Option<(&str, &str)> {
    let (namespace, rest) = frontend.split_once('/')?;
    let name = rest.split(':').next()?;
    (!namespace.is_empty() && !name.is_empty()).then_some((namespace, name))
}

/// Compiles objects into the desired state for `node`, from scratch.
/// Invalid objects or fields are reported in [`Compiled::errors`] and skipped;
/// they never affect other objects.
pub fn compile(objects: &Objects, node: &NodeContext) -> Compiled {
    let mut compiler = Compiler::new(node.clone());
    let update = compiler.update(objects);
    Compiled {
        desired: compiler.desired,
        errors: update.errors,
    }
}

/// What compiling one Service produced.
#[derive(Default)]
pub(super) struct ServiceOutput {
    pub(super) frontends: Vec<(ServiceKey, Frontend)>,
    /// The Service's own cluster IPs: a claim on one of them outranks any
    /// external address claim on the same frontend.
    pub(super) cluster_addresses: Vec<Addr>,
    pub(super) health: Option<(u16, ServiceHealth)>,
    pub(super) errors: Vec<ObjectError>,
}

/// A compiled Service and the exact objects it was compiled from (held, so
/// its address cannot be reused by another object while cached).
struct Cached {
    service: Arc<Service>,
    /// Where the Service came from (file or API), for conflict reports.
    origin: Arc<str>,
    /// [`fingerprint_add`] over the Service's slices.
    fingerprint: (u64, u32),
    output: ServiceOutput,
}

/// A `namespace/name` the compiler has seen, as a Service or as the Service
/// an EndpointSlice names.
struct Entry {
    id: ServiceId,
    cached: Option<Cached>,
    /// The last update whose snapshot held the Service object.
    seen: u64,
}

/// An order-independent summary of a set of objects, by address: the sum of
/// mixed addresses and the count. Unchanged objects keep their `Arc`, so an
/// unchanged set has an unchanged fingerprint.
fn fingerprint_add(acc: &mut (u64, u32), address: usize) {
    // splitmix64 finaliser: spreads nearby addresses over all 64 bits.
    let mut z = (address as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    acc.0 = acc.0.wrapping_add(z ^ (z >> 31));
    acc.1 += 1;
}

/// What one [`Compiler::update`] changed.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Frontends added, changed or removed.
    pub changed: BTreeSet<ServiceKey>,
    /// UIDs of this node's pods that opted out of socket-level translation.
    pub opted_out_pods: BTreeSet<String>,
    /// Every invalid object or field in the current objects.
    pub errors: Vec<ObjectError>,
    /// Whether this node should get new load-balancer traffic (its Node
    /// is not being deleted).
    pub node_eligible: bool,
}

/// Compiles snapshots incrementally: a Service is recompiled only when it,
/// one of its EndpointSlices or the node's zone changed. Sources that keep
/// unchanged objects in the same `Arc` across snapshots (the API source does)
/// make a single change cost one Service plus a pass over object addresses,
/// not a recompilation of the cluster.
pub struct Compiler {
    node: NodeContext,
    zone: Option<String>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    by_name: FxHashMap<String, u32>,
    /// Cached Services by the address of the object they were compiled from.
    by_object: FxHashMap<usize, u32>,
    /// Which entry each EndpointSlice object (by address) of the last
    /// snapshot belongs to; holding the object keeps its address unique.
    slice_owner: FxHashMap<usize, (u32, Arc<EndpointSlice>)>,
    /// Every compiled Service claiming each frontend, the owner first.
    claims: FxHashMap<ServiceKey, Vec<u32>>,
    /// Every compiled Service claiming each healthCheckNodePort, the owner first.
    health_claims: FxHashMap<u16, Vec<u32>>,
    /// Frontends and health ports with more than one claimant.
    contested: BTreeSet<Claimed>,
    update_count: u64,
    /// Whether ClusterIPs are currently also served per packet.
    per_packet: bool,
    desired: DesiredState,
}

impl Compiler {
    /// A compiler for `node` with nothing compiled yet.
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            zone: None,
            entries: Vec::new(),
            free: Vec::new(),
            by_name: FxHashMap::default(),
            by_object: FxHashMap::default(),
            slice_owner: FxHashMap::default(),
            claims: FxHashMap::default(),
            health_claims: FxHashMap::default(),
            contested: BTreeSet::new(),
            update_count: 0,
            per_packet: false,
            desired: DesiredState::default(),
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The uid of the Service `namespace/name` as last compiled.
    pub fn service_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let index = self.by_name.get(&format!("{namespace}/{name}"))?;
        let cached = self.entries[*index as usize].cached.as_ref()?;
        cached.service.metadata.uid.clone()
    }

    fn entry_for(&mut self, namespace: &str, name: &str) -> u32 {
        let key = format!("{namespace}/{name}");
        if let Some(index) = self.by_name.get(&key) {
            return *index;
        }
        let entry = Entry {
            id: (namespace.to_owned(), name.to_owned()),
            cached: None,
            seen: 0,
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.entries[index as usize] = entry;
                index
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.by_name.insert(key, index);
        index
    }

    /// Brings the desired state up to date with `objects`.
    pub fn update(&mut self, objects: &Objects) -> Update {
        let mut update = Update::default();
        self.update_count += 1;
        let now = self.update_count;
        let zone = node_zone(objects, &self.node);
        update.node_eligible = node_eligible(objects, &self.node);
        update.opted_out_pods = opted_out_pods(objects, &self.node, &mut update.errors);
        // Per-packet ClusterIP frontends exist when the socket path is off,
        // or while a pod of this node opted out of it.
        let per_packet = self.node.per_packet_cluster_ips || !update.opted_out_pods.is_empty();
        let zone_changed = zone != self.zone || per_packet != self.per_packet;
        self.zone = zone;
        self.per_packet = per_packet;

        // Slices: owners by address, strings only for objects not seen before.
        let mut slice_owner =
            FxHashMap::with_capacity_and_hasher(objects.endpoint_slices.len(), Default::default());
        let mut fingerprints: FxHashMap<u32, (u64, u32)> = FxHashMap::default();
        for sourced in &objects.endpoint_slices {
            let address = Arc::as_ptr(&sourced.object) as usize;
            let owner = match self.slice_owner.get(&address) {
                Some((owner, _)) => *owner,
                None => match borrowed_slice_service(&sourced.object) {
                    Some((namespace, service)) => self.entry_for(namespace, service),
                    None => {
                        slice_service(sourced, &mut update.errors);
                        continue;
                    }
                },
            };
            slice_owner.insert(address, (owner, sourced.object.clone()));
            fingerprint_add(fingerprints.entry(owner).or_default(), address);
        }
        self.slice_owner = slice_owner;

        // Services: unchanged when the object and its slice set are the same.
        let mut dirty: Vec<(u32, &Sourced<Service>)> = Vec::new();
        for sourced in &objects.services {
            let address = Arc::as_ptr(&sourced.object) as usize;
            let index = match self.by_object.get(&address) {
                Some(index) => *index,
                None => {
                    let meta = &sourced.object.metadata;
                    let Some(name) = meta.name.as_deref() else {
                        Reporter::new(&sourced.origin, "Service", meta)
                            .require_identity(&mut update.errors);
                        continue;
                    };
                    self.entry_for(meta.namespace.as_deref().unwrap_or("default"), name)
                }
            };
            let entry = &mut self.entries[index as usize];
            if entry.seen == now {
                let report = Reporter::new(&sourced.origin, "Service", &sourced.object.metadata);
                update.errors.push(
                    report.error("metadata.name", "duplicate Service; the first one is used"),
                );
                continue;
            }
            entry.seen = now;
            let slices = fingerprints.get(&index).copied().unwrap_or_default();
            let unchanged = !zone_changed
                && entry.cached.as_ref().is_some_and(|c| {
                    Arc::ptr_eq(&c.service, &sourced.object) && c.fingerprint == slices
                });
            if !unchanged {
                dirty.push((index, sourced));
            }
        }

        // Services that left the snapshot go first, so that a Service
        // taking over an address in the same update finds it free; names
        // nothing refers to any more are recycled.
        for index in 0..self.entries.len() as u32 {
            let entry = &self.entries[index as usize];
            if entry.seen != now && entry.cached.is_some() {
                self.forget(index, &mut update.changed);
            }
            let entry = &self.entries[index as usize];
            let unused = entry.seen != now && !fingerprints.contains_key(&index);
            if unused {
                // A recycled entry keeps its old name, which a newer entry
                // may hold now: only the entry the name points to goes.
                let name = format!("{}/{}", entry.id.0, entry.id.1);
                if self.by_name.get(&name) == Some(&index) {
                    self.by_name.remove(&name);
                    self.free.push(index);
                }
            }
        }

        if !dirty.is_empty() {
            let wanted: FxHashMap<u32, usize> = dirty
                .iter()
                .enumerate()
                .map(|(i, (index, _))| (*index, i))
                .collect();
            let mut slices: Vec<Vec<&Sourced<EndpointSlice>>> = vec![Vec::new(); dirty.len()];
            for sourced in &objects.endpoint_slices {
                let address = Arc::as_ptr(&sourced.object) as usize;
                if let Some(i) = self
                    .slice_owner
                    .get(&address)
                    .and_then(|(owner, _)| wanted.get(owner))
                {
                    slices[*i].push(sourced);
                }
            }
            for ((index, sourced), own_slices) in dirty.into_iter().zip(slices) {
                self.forget(index, &mut update.changed);
                let id = self.entries[index as usize].id.clone();
                let locality = Locality {
                    node: self.node.name.as_deref(),
                    zone: self.zone.as_deref(),
                    node_port_addresses: &self.node.node_port_addresses,
                    localhost_node_ports: self.node.localhost_node_ports,
                    per_packet_cluster_ips: self.per_packet,
                    per_packet_udp_cluster_ips: self.node.per_packet_udp_cluster_ips,
                    external_ip_cidrs: &self.node.external_ip_cidrs,
                };
                let output = compile_service(sourced, &id, &own_slices, &locality);
                self.by_object
                    .insert(Arc::as_ptr(&sourced.object) as usize, index);
                self.entries[index as usize].cached = Some(Cached {
                    service: sourced.object.clone(),
                    origin: sourced.origin.clone(),
                    fingerprint: fingerprints.get(&index).copied().unwrap_or_default(),
                    output,
                });
                self.install(index, &mut update.changed);
            }
        }

        update.errors.extend(
            self.entries
                .iter()
                .filter_map(|e| e.cached.as_ref())
                .flat_map(|c| c.output.errors.iter().cloned()),
        );
        self.report_conflicts(&mut update.errors);
        update.errors.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field).cmp(&(&b.origin, &b.object, &b.field))
        });
        update
    }

    /// Removes a Service's contribution to the desired state; what it owned
    /// goes to the next claimant in rank.
    fn forget(&mut self, index: u32, changed: &mut BTreeSet<ServiceKey>) {
        let Some(cached) = self.entries[index as usize].cached.take() else {
            return;
        };
        self.by_object
            .remove(&(Arc::as_ptr(&cached.service) as usize));
        for (key, _) in &cached.output.frontends {
            self.release(Claimed::Frontend(*key), index, changed);
        }
        if let Some((port, _)) = &cached.output.health {
            self.release(Claimed::HealthPort(*port), index, changed);
        }
    }

    /// Adds a freshly compiled (and cached) Service's claims; each frontend
    /// or health port goes to it if it outranks the current owner.
    fn install(&mut self, index: u32, changed: &mut BTreeSet<ServiceKey>) {
        let Some(cached) = &self.entries[index as usize].cached else {
            return;
        };
        let mut claimed: Vec<Claimed> = cached
            .output
            .frontends
            .iter()
            .map(|(key, _)| Claimed::Frontend(*key))
            .collect();
        claimed.extend(
            cached
                .output
                .health
                .as_ref()
                .map(|(port, _)| Claimed::HealthPort(*port)),
        );
        for what in claimed {
            let claimants = self.claimants(what);
            if claimants.contains(&index) {
                // The same frontend twice in one Service (a cluster IP also
                // listed as an externalIP): the first one stands.
                continue;
            }
            claimants.push(index);
            let last = claimants.len() - 1;
            let owner = claimants[0];
            if last > 0 {
                self.contested.insert(what);
            }
            if last == 0
                || claim_rank(&self.entries, index, what) < claim_rank(&self.entries, owner, what)
            {
                self.claimants(what).swap(0, last);
                self.program(what, changed);
            }
        }
    }

    /// Withdraws one claim of `index`; when it was the owner, the best of
    /// the remaining claimants takes over.
    fn release(&mut self, what: Claimed, index: u32, changed: &mut BTreeSet<ServiceKey>) {
        let entries = &self.entries;
        let claimants = match what {
            Claimed::Frontend(key) => self.claims.get_mut(&key),
            Claimed::HealthPort(port) => self.health_claims.get_mut(&port),
        };
        let Some(claimants) = claimants else {
            return;
        };
        let Some(position) = claimants.iter().position(|c| *c == index) else {
            return;
        };
        claimants.swap_remove(position);
        if claimants.len() < 2 {
            self.contested.remove(&what);
        }
        if position != 0 {
            return;
        }
        let rank = |i: &usize| claim_rank(entries, claimants[*i], what);
        if let Some(best) = (0..claimants.len()).min_by(|a, b| rank(a).cmp(&rank(b))) {
            claimants.swap(0, best);
        }
        self.program(what, changed);
    }

    /// The claimants of `what`, created empty when there are none (only a
    /// new claim creates them; a release never does).
    fn claimants(&mut self, what: Claimed) -> &mut Vec<u32> {
        match what {
            Claimed::Frontend(key) => self.claims.entry(key).or_default(),
            Claimed::HealthPort(port) => self.health_claims.entry(port).or_default(),
        }
    }

    /// Writes the owner's version of `what` into the desired state, or
    /// removes it when nobody claims it any more.
    fn program(&mut self, what: Claimed, changed: &mut BTreeSet<ServiceKey>) {
        let entries = &self.entries;
        match what {
            Claimed::Frontend(key) => {
                changed.insert(key);
                let frontend = self
                    .claims
                    .get(&key)
                    .and_then(|c| c.first())
                    .and_then(|owner| entries[*owner as usize].cached.as_ref())
                    .and_then(|c| c.output.frontends.iter().find(|(k, _)| *k == key))
                    .map(|(_, frontend)| frontend.clone());
                match frontend {
                    Some(frontend) => {
                        self.desired.frontends.insert(key, frontend);
                    }
                    None => {
                        self.claims.remove(&key);
                        self.desired.frontends.remove(&key);
                    }
                }
            }
            Claimed::HealthPort(port) => {
                let health = self
                    .health_claims
                    .get(&port)
                    .and_then(|c| c.first())
                    .and_then(|owner| entries[*owner as usize].cached.as_ref())
                    .and_then(|c| c.output.health.clone());
                match health {
                    Some((_, health)) => {
                        self.desired.health_checks.insert(port, health);
                    }
                    None => {
                        self.health_claims.remove(&port);
                        self.desired.health_checks.remove(&port);
                    }
                }
            }
        }
    }

    /// One error per claim that lost to another Service, on the loser.
    fn report_conflicts(&self, errors: &mut Vec<ObjectError>) {
        for what in &self.contested {
            let claimants = match what {
                Claimed::Frontend(key) => self.claims.get(key),
                Claimed::HealthPort(port) => self.health_claims.get(port),
            };
            let Some((owner, losers)) = claimants.and_then(|c| c.split_first()) else {
                continue;
            };
            let winner = &self.entries[*owner as usize].id;
            for loser in losers {
                let entry = &self.entries[*loser as usize];
                let Some(cached) = &entry.cached else {
                    continue;
                };
                let reason = match what {
                    Claimed::Frontend(key) => {
                        let name = cached
                            .output
                            .frontends
                            .iter()
                            .find(|(k, _)| k == key)
                            .map_or("", |(_, f)| f.name.as_str());
                        format!(
                            "frontend {} of {name} is already used by {}/{}; it is programmed if that Service goes",
                            describe_key(key),
                            winner.0,
                            winner.1
                        )
                    }
                    Claimed::HealthPort(port) => format!(
                        "healthCheckNodePort {port} is already used by {}/{}; it is served if that Service goes",
                        winner.0, winner.1
                    ),
                };
                errors.push(ObjectError {
                    origin: cached.origin.to_string(),
                    object: format!("Service {}/{}", entry.id.0, entry.id.1),
                    field: "spec".into(),
                    reason,
                });
            }
        }
    }
}

/// Something only one Service can own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Claimed {
    Frontend(ServiceKey),
    HealthPort(u16),
}

/// The order among Services claiming one frontend or health port, lowest
/// first: a claim through the Service's own cluster IP (an external address
/// never shadows a ClusterIP), then the oldest Service, then namespace and
/// name. The owner is therefore the same whatever order the objects arrived
/// in, and a newcomer cannot take an address from a Service already serving it.
fn claim_rank(entries: &[Entry], index: u32, what: Claimed) -> (bool, Option<&Time>, &str, &str) {
    let entry = &entries[index as usize];
    let cached = entry.cached.as_ref();
    let external = match what {
        Claimed::Frontend(key) => {
            !cached.is_some_and(|c| c.output.cluster_addresses.contains(&key.addr))
        }
        Claimed::HealthPort(_) => false,
    };
    let created = cached.and_then(|c| c.service.metadata.creation_timestamp.as_ref());
    (external, created, &entry.id.0, &entry.id.1)
}

/// `address:port/protocol` of a frontend, for error messages.
fn describe_key(key: &ServiceKey) -> String {
    let protocol = match key.proto {
        lb_common::net::PROTO_TCP => "TCP",
        lb_common::net::PROTO_UDP => "UDP",
        _ => "other",
    };
    match crate::addr::ip_from_addr(&key.addr) {
        IpAddr::V4(ip) => format!("{ip}:{}/{protocol}", u16::from_be(key.port)),
        IpAddr::V6(ip) => format!("[{ip}]:{}/{protocol}", u16::from_be(key.port)),
    }
}

/// `(namespace, name)` of a Service.
pub(super) type ServiceId = (String, String);
