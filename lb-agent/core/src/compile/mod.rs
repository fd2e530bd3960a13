//! The Service compiler: Kubernetes Service and EndpointSlice objects in,
//! the frontends and backends that should be in the datapath out
//! ([`DesiredState`]), incrementally. One module per concern, in pipeline
//! order: [`validation`] of Service fields, [`endpoints`] and kube-proxy's
//! choice among them, [`frontends`] (ClusterIP, NodePort, ExternalIP,
//! LoadBalancer), and the [`node`] facts they depend on.
//!
//! Invalid objects or fields are reported as [`ObjectError`]s and skipped;
//! they never affect other objects.

mod endpoints;
mod frontends;
mod node;
#[cfg(test)]
mod tests;
mod validation;

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::service::ServiceKey;
use rustc_hash::FxHashMap;

pub use validation::DEFAULT_AFFINITY_TIMEOUT_S;

use self::{
    endpoints::{borrowed_slice_service, slice_service},
    frontends::compile_service,
    node::{node_zone, opted_out_pods, Locality},
    validation::Reporter,
};
use crate::{
    desired::{DesiredState, Frontend, ServiceHealth},
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
    pub(super) health: Option<(u16, ServiceHealth)>,
    pub(super) errors: Vec<ObjectError>,
}

/// A compiled Service and the exact objects it was compiled from (held, so
/// its address cannot be reused by another object while cached).
struct Cached {
    service: Arc<Service>,
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
    owners: FxHashMap<ServiceKey, u32>,
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
            owners: FxHashMap::default(),
            update_count: 0,
            per_packet: false,
            desired: DesiredState::default(),
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
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
                };
                let mut output = compile_service(sourced, &id, &own_slices, &locality);
                self.install(index, &mut output, &mut update.changed);
                self.by_object
                    .insert(Arc::as_ptr(&sourced.object) as usize, index);
                self.entries[index as usize].cached = Some(Cached {
                    service: sourced.object.clone(),
                    fingerprint: fingerprints.get(&index).copied().unwrap_or_default(),
                    output,
                });
            }
        }

        // Services that left the snapshot; names nothing refers to any more.
        for index in 0..self.entries.len() as u32 {
            let entry = &self.entries[index as usize];
            if entry.seen != now && entry.cached.is_some() {
                self.forget(index, &mut update.changed);
            }
            let entry = &self.entries[index as usize];
            let unused = entry.seen != now && !fingerprints.contains_key(&index);
            if unused
                && self
                    .by_name
                    .remove(&format!("{}/{}", entry.id.0, entry.id.1))
                    .is_some()
            {
                self.free.push(index);
            }
        }

        update.errors.extend(
            self.entries
                .iter()
                .filter_map(|e| e.cached.as_ref())
                .flat_map(|c| c.output.errors.iter().cloned()),
        );
        update.errors.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field).cmp(&(&b.origin, &b.object, &b.field))
        });
        update
    }

    /// Removes a Service's contribution to the desired state.
    fn forget(&mut self, index: u32, changed: &mut BTreeSet<ServiceKey>) {
        let Some(cached) = self.entries[index as usize].cached.take() else {
            return;
        };
        self.by_object
            .remove(&(Arc::as_ptr(&cached.service) as usize));
        for (key, _) in &cached.output.frontends {
            if self.owners.get(key) == Some(&index) {
                self.owners.remove(key);
                self.desired.frontends.remove(key);
                changed.insert(*key);
            }
        }
        if let Some((port, _)) = &cached.output.health {
            let id = &self.entries[index as usize].id;
            let owned = self
                .desired
                .health_checks
                .get(port)
                .is_some_and(|h| h.namespace == id.0 && h.name == id.1);
            if owned {
                self.desired.health_checks.remove(port);
            }
        }
    }

    /// Adds a freshly compiled Service; frontends or health ports another
    /// Service already owns are reported and left to their owner.
    fn install(
        &mut self,
        index: u32,
        output: &mut ServiceOutput,
        changed: &mut BTreeSet<ServiceKey>,
    ) {
        let id = self.entries[index as usize].id.clone();
        let mut conflicts = Vec::new();
        output.frontends.retain(|(key, frontend)| {
            match self.owners.get(key).filter(|o| **o != index) {
                Some(owner) => {
                    let other = &self.entries[*owner as usize].id;
                    conflicts.push(format!(
                        "frontend of {} is already used by {}/{}",
                        frontend.name, other.0, other.1
                    ));
                    false
                }
                None => true,
            }
        });
        for (key, frontend) in &output.frontends {
            self.owners.insert(*key, index);
            self.desired.frontends.insert(*key, frontend.clone());
            changed.insert(*key);
        }
        if let Some((port, health)) = &output.health {
            match self.desired.health_checks.get(port) {
                Some(other)
                    if (other.namespace.as_str(), other.name.as_str())
                        != (id.0.as_str(), id.1.as_str()) =>
                {
                    conflicts.push(format!(
                        "healthCheckNodePort {port} is already used by {}/{}",
                        other.namespace, other.name
                    ));
                    output.health = None;
                }
                _ => {
                    self.desired.health_checks.insert(*port, health.clone());
                }
            }
        }
        for reason in conflicts {
            output.errors.push(ObjectError {
                origin: String::new(),
                object: format!("Service {}/{}", id.0, id.1),
                field: "spec".into(),
                reason,
            });
        }
    }
}

/// `(namespace, name)` of a Service.
pub(super) type ServiceId = (String, String);
