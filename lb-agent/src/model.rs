//! Desired state: which frontends exist and which backends each one should use,
//! compiled from Kubernetes Service and EndpointSlice objects.
//!
//! Sans-IO: no kernel, network or clock. Every source of intent (a YAML
//! directory, the Kubernetes API) hands its objects to [`compile`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use lb_common::{
    tc::{
        BACKEND_FLAG_LOCAL, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL, SERVICE_FLAG_EXTERNAL_LOCAL,
        SERVICE_FLAG_PRESERVE_SOURCE, SERVICE_FLAG_SOURCE_RANGES,
    },
    Backend, ServiceKey, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY,
    SERVICE_FLAG_NO_LOCAL_BACKENDS,
};

use rustc_hash::FxHashMap;

use crate::addr::{addr_from_ip, port_to_be};

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless for proxies.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Pod annotation: `disabled` opts the pod out of socket-level translation;
/// its ClusterIP traffic is then translated per packet by the tc programs.
pub const SOCKET_LB_ANNOTATION: &str = "lb.dev/socket-lb";
/// Node label naming the node's zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A Kubernetes object together with where it came from, for error reports.
/// Shared (`Arc`) so snapshots of large clusters are cheap to take.
#[derive(Debug)]
pub struct Sourced<T> {
    /// Where the object was read: a file path, or `api` for the API server.
    pub origin: Arc<str>,
    /// The object.
    pub object: Arc<T>,
}

impl<T> Clone for Sourced<T> {
    fn clone(&self) -> Self {
        Self {
            origin: self.origin.clone(),
            object: self.object.clone(),
        }
    }
}

/// Every object a source currently holds.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Service objects.
    pub services: Vec<Sourced<Service>>,
    /// EndpointSlice objects.
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    /// Node objects (for this node's zone).
    pub nodes: Vec<Sourced<Node>>,
    /// Pods, for label-based security identities.
    pub pods: Vec<Sourced<Pod>>,
    /// Namespaces, for namespace selectors of policies.
    pub namespaces: Vec<Sourced<Namespace>>,
    /// NetworkPolicies.
    pub network_policies: Vec<Sourced<NetworkPolicy>>,
}

/// Which node the agent programs: endpoints on it are "local".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name, as in `Endpoint.nodeName`.
    pub name: Option<String>,
    /// Addresses NodePorts answer on; empty when the tc path (NodePort,
    /// ExternalIPs, LoadBalancer IPs) is disabled.
    pub node_port_addresses: Vec<IpAddr>,
    /// IPv4 NodePorts also answer on 127.0.0.0/8 to the node's own
    /// processes (socket path only; never on the tc path, where a packet
    /// from outside addressed to 127.0.0.1 must not reach a Service).
    pub localhost_node_ports: bool,
    /// Also serve ClusterIPs per packet (tc on pod interfaces), for pods
    /// whose sockets are not translated.
    pub per_packet_cluster_ips: bool,
}

/// An object, or part of one, that cannot be programmed; the rest still is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// Where the object was read.
    pub origin: String,
    /// `Kind namespace/name`, or the document index when the object has no name.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[0].port`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: field {}: {}",
            self.origin, self.object, self.field, self.reason
        )
    }
}

/// One frontend to program: a (VIP, port, protocol) and its chosen backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Display name, `namespace/name:port-name` (or `namespace/name` for an unnamed port).
    pub name: String,
    /// Backends in a stable order, without duplicates.
    pub backends: Vec<Backend>,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (with [`SERVICE_FLAG_AFFINITY`]).
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges of a LoadBalancer IP frontend: (prefix, length).
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// What a healthCheckNodePort answers for one Service
/// (externalTrafficPolicy Local): whether this node has endpoints for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The frontends that should be in the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Frontends by key.
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// healthCheckNodePort servers by port.
    pub health_checks: BTreeMap<u16, ServiceHealth>,
}

/// Result of [`compile`]: the desired state plus everything that was skipped.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// What to program.
    pub desired: DesiredState,
    /// Objects or fields that were skipped, with reasons.
    pub errors: Vec<ObjectError>,
}

/// A ServicePort that passed validation.
struct PortSpec {
    /// Position in `spec.ports`.
    index: usize,
    name: Option<String>,
    port: u16,
    proto: u8,
}

/// A validated endpoint address with its conditions.
struct EndpointSpec {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
    zone_hints: BTreeSet<String>,
    ports: Vec<EndpointPortSpec>,
}

/// The Service-level choices that shape endpoint selection.
struct Policy {
    internal_local: bool,
    affinity_timeout_s: Option<u32>,
}

#[derive(Clone)]
struct EndpointPortSpec {
    name: Option<String>,
    port: u16,
    proto: u8,
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
struct ServiceOutput {
    frontends: Vec<(ServiceKey, Frontend)>,
    health: Option<(u16, ServiceHealth)>,
    errors: Vec<ObjectError>,
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

/// Compiles one Service with its EndpointSlices.
fn compile_service(
    sourced: &Sourced<Service>,
    id: &ServiceId,
    slices: &[&Sourced<EndpointSlice>],
    locality: &Locality<'_>,
) -> ServiceOutput {
    let svc = &sourced.object;
    let report = Reporter::new(&sourced.origin, "Service", &svc.metadata);
    let mut output = ServiceOutput::default();
    let errors = &mut output.errors;
    let endpoints: Vec<EndpointSpec> = slices
        .iter()
        .flat_map(|slice| slice_endpoints(slice, errors))
        .collect();
    if !is_proxied(svc) {
        return output;
    }
    let Some(ips) = cluster_ips(svc, &report, errors) else {
        return output;
    };
    let ports = service_ports(svc, &report, errors);
    let policy = service_policy(svc, &report, errors);
    if let Some(port) = health_check_port(svc, &report, errors) {
        let local: BTreeSet<IpAddr> = endpoints
            .iter()
            .filter(|ep| ep.ready && is_local(ep, locality))
            .map(|ep| ep.ip)
            .collect();
        output.health = Some((
            port,
            ServiceHealth {
                namespace: id.0.clone(),
                name: id.1.clone(),
                local_endpoints: local.len(),
            },
        ));
    }
    for ip in &ips {
        for port in &ports {
            let key = ServiceKey {
                addr: addr_from_ip(*ip),
                port: port_to_be(port.port),
                proto: port.proto,
                scope: SCOPE_EXTERNAL,
            };
            let name = match &port.name {
                Some(port_name) => format!("{}/{}:{}", id.0, id.1, port_name),
                None => format!("{}/{}", id.0, id.1),
            };
            let backends = select_backends(&endpoints, ip, port, policy.internal_local, locality);
            let mut flags = 0;
            if policy.affinity_timeout_s.is_some() {
                flags |= SERVICE_FLAG_AFFINITY;
            }
            if policy.internal_local && backends.is_empty() {
                flags |= SERVICE_FLAG_NO_LOCAL_BACKENDS;
            }
            let frontend = Frontend {
                name,
                backends,
                flags,
                affinity_timeout_s: policy.affinity_timeout_s.unwrap_or(0),
                source_ranges: Vec::new(),
            };
            if locality.per_packet_cluster_ips {
                // The same choice, made per packet; pods keep their own
                // address whatever node the backend is on.
                let per_packet = Frontend {
                    flags: frontend.flags | SERVICE_FLAG_PRESERVE_SOURCE,
                    ..frontend.clone()
                };
                output.frontends.push((
                    ServiceKey {
                        scope: SCOPE_TC_CLUSTER,
                        ..key
                    },
                    per_packet,
                ));
            }
            output.frontends.push((key, frontend));
        }
    }
    if !locality.node_port_addresses.is_empty() {
        let families: BTreeSet<bool> = ips.iter().map(IpAddr::is_ipv4).collect();
        external_frontends(
            svc,
            id,
            &report,
            &families,
            &ports,
            &endpoints,
            policy.affinity_timeout_s,
            locality,
            &mut output,
        );
    }
    output
}

/// How a frontend address outside the cluster network reaches a Service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// A NodePort on a node address, or an ExternalIP.
    NodeOrExternalIp,
    /// A LoadBalancer ingress IP: loadBalancerSourceRanges apply.
    LoadBalancer,
    /// A NodePort on 127.0.0.1, for the node's own processes only.
    Localhost,
}

/// NodePort, ExternalIP and LoadBalancer IP frontends of a Service, served by
/// the tc programs (scope [`SCOPE_TC_EXTERNAL`]) and, for this node's own
/// clients, by the socket programs.
#[allow(clippy::too_many_arguments)]
fn external_frontends(
    svc: &Service,
    id: &ServiceId,
    report: &Reporter<'_>,
    families: &BTreeSet<bool>,
    ports: &[PortSpec],
    endpoints: &[EndpointSpec],
    affinity_timeout_s: Option<u32>,
    locality: &Locality<'_>,
    output: &mut ServiceOutput,
) {
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let node_ports = matches!(kind, "NodePort" | "LoadBalancer");
    // kube-proxy applies externalTrafficPolicy to NodePorts, LoadBalancer IPs
    // and ExternalIPs alike.
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut addresses: Vec<(IpAddr, Way)> = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) => addresses.push((ip, Way::NodeOrExternalIp)),
            Err(_) => output.errors.push(report.error(
                &format!("spec.externalIPs[{i}]"),
                format!("{text:?} is not an IP address"),
            )),
        }
    }
    if kind == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, entry) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer proxies and the node sees its address.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(text) = &entry.ip else { continue };
            match text.parse::<IpAddr>() {
                Ok(ip) => addresses.push((ip, Way::LoadBalancer)),
                Err(_) => output.errors.push(report.error(
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{text:?} is not an IP address"),
                )),
            }
        }
    }
    let mut ranges = Vec::new();
    for (i, text) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match parse_cidr(text) {
            Some(range) => ranges.push(range),
            None => output.errors.push(report.error(
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{text:?} is not a CIDR"),
            )),
        }
    }
    for (i, port) in ports.iter().enumerate() {
        let name = match &port.name {
            Some(port_name) => format!("{}/{}:{}", id.0, id.1, port_name),
            None => format!("{}/{}", id.0, id.1),
        };
        let mut frontend_for = |ip: IpAddr, number: u16, way: Way| {
            if !families.contains(&ip.is_ipv4()) {
                return;
            }
            let lb = way == Way::LoadBalancer;
            let backends = select_backends(endpoints, &ip, port, local, locality);
            let source_ranges: Vec<(IpAddr, u8)> = if lb {
                ranges
                    .iter()
                    .filter(|(r, _)| r.is_ipv4() == ip.is_ipv4())
                    .copied()
                    .collect()
            } else {
                Vec::new()
            };
            let mut flags = 0;
            if local {
                flags |= SERVICE_FLAG_EXTERNAL_LOCAL;
                if backends.is_empty() {
                    flags |= SERVICE_FLAG_NO_LOCAL_BACKENDS;
                }
            }
            if lb && !ranges.is_empty() {
                flags |= SERVICE_FLAG_SOURCE_RANGES;
            }
            // kube-proxy's ClientIP affinity holds for every way in.
            if affinity_timeout_s.is_some() {
                flags |= SERVICE_FLAG_AFFINITY;
            }
            let key = ServiceKey {
                addr: addr_from_ip(ip),
                port: port_to_be(number),
                proto: port.proto,
                scope: SCOPE_TC_EXTERNAL,
            };
            // Clients on this node (pods, host processes) reach the address
            // through the socket path, as kube-proxy serves them: every
            // endpoint whatever externalTrafficPolicy says (a pod's
            // traffic to a Local Service's external address must not black
            // hole on a node without endpoints). A source-ranged LoadBalancer
            // IP is left to the network path, where the ranges are checked.
            if !lb || ranges.is_empty() {
                let backends = select_backends(endpoints, &ip, port, false, locality);
                let flags = flags & SERVICE_FLAG_AFFINITY;
                output.frontends.push((
                    ServiceKey {
                        scope: SCOPE_EXTERNAL,
                        ..key
                    },
                    Frontend {
                        name: name.clone(),
                        backends,
                        flags,
                        affinity_timeout_s: affinity_timeout_s.unwrap_or(0),
                        source_ranges: Vec::new(),
                    },
                ));
            }
            if way == Way::Localhost {
                return;
            }
            output.frontends.push((
                key,
                Frontend {
                    name: name.clone(),
                    backends,
                    flags,
                    affinity_timeout_s: affinity_timeout_s.unwrap_or(0),
                    source_ranges,
                },
            ));
        };
        if node_ports {
            if let Some(number) = spec
                .ports
                .as_ref()
                .and_then(|p| p.get(port.index))
                .and_then(|p| p.node_port)
            {
                match valid_port(number) {
                    Some(number) => {
                        for address in locality.node_port_addresses {
                            frontend_for(*address, number, Way::NodeOrExternalIp);
                        }
                        if locality.localhost_node_ports {
                            frontend_for(Ipv4Addr::LOCALHOST.into(), number, Way::Localhost);
                        }
                    }
                    None => output.errors.push(report.error(
                        &format!("spec.ports[{i}].nodePort"),
                        format!("{number} is not a port number (1-65535)"),
                    )),
                }
            }
        }
        for (address, way) in &addresses {
            frontend_for(*address, port.port, *way);
        }
    }
}

/// Parses `a.b.c.d/n` or `x::/n`.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.trim().split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// UIDs of this node's pods annotated to opt out of socket-level translation.
/// A hostNetwork pod's annotation is reported and ignored: its packets cross
/// no pod interface, so the socket path is the only one that serves it.
fn opted_out_pods(
    objects: &Objects,
    node: &NodeContext,
    errors: &mut Vec<ObjectError>,
) -> BTreeSet<String> {
    let Some(name) = node.name.as_deref() else {
        return BTreeSet::new();
    };
    let mut uids = BTreeSet::new();
    for sourced in &objects.pods {
        let pod = &sourced.object;
        let spec = pod.spec.as_ref();
        let annotated = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOCKET_LB_ANNOTATION))
            .is_some_and(|v| v == "disabled");
        if !annotated || spec.and_then(|s| s.node_name.as_deref()) != Some(name) {
            continue;
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            errors.push(Reporter::new(&sourced.origin, "Pod", &pod.metadata).error(
                &format!("metadata.annotations[{SOCKET_LB_ANNOTATION}]"),
                "ignored on a hostNetwork pod: its packets cross no pod interface, \
                 so only socket-level translation serves it",
            ));
            continue;
        }
        uids.extend(pod.metadata.uid.clone());
    }
    uids
}

/// This node's zone, from its Node object's label.
fn node_zone(objects: &Objects, node: &NodeContext) -> Option<String> {
    let name = node.name.as_deref()?;
    objects
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(name))?
        .object
        .metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// Where this agent runs, for Local traffic policies and topology hints.
struct Locality<'a> {
    node: Option<&'a str>,
    zone: Option<&'a str>,
    node_port_addresses: &'a [IpAddr],
    localhost_node_ports: bool,
    per_packet_cluster_ips: bool,
}

fn service_policy(svc: &Service, report: &Reporter<'_>, errors: &mut Vec<ObjectError>) -> Policy {
    let spec = svc.spec.as_ref();
    let internal_local = spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local");
    let affinity_timeout_s = match spec.and_then(|s| s.session_affinity.as_deref()) {
        Some("ClientIP") => {
            let configured = spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match configured {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=86_400).contains(&t) => Some(t as u32),
                Some(t) => {
                    errors.push(report.error(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1-86400; using the default {DEFAULT_AFFINITY_TIMEOUT_S}"),
                    ));
                    Some(DEFAULT_AFFINITY_TIMEOUT_S)
                }
            }
        }
        _ => None,
    };
    Policy {
        internal_local,
        affinity_timeout_s,
    }
}

/// The healthCheckNodePort of a LoadBalancer Service with externalTrafficPolicy Local.
fn health_check_port(
    svc: &Service,
    report: &Reporter<'_>,
    errors: &mut Vec<ObjectError>,
) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let port = spec.health_check_node_port?;
    let valid = valid_port(port);
    if valid.is_none() {
        errors.push(report.error(
            "spec.healthCheckNodePort",
            format!("{port} is not a port number (1-65535)"),
        ));
    }
    valid
}

/// Whether kube-proxy would program this Service at all.
fn is_proxied(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    let has_label = |label: &str| labels.is_some_and(|l| l.contains_key(label));
    if has_label(SERVICE_PROXY_NAME_LABEL) || has_label(HEADLESS_LABEL) {
        return false;
    }
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    !matches!(spec.cluster_ip.as_deref(), None | Some("") | Some("None"))
}

/// The Service's cluster IPs, or `None` (with an error) when they are unusable.
fn cluster_ips(
    svc: &Service,
    report: &Reporter<'_>,
    errors: &mut Vec<ObjectError>,
) -> Option<Vec<IpAddr>> {
    let spec = svc.spec.as_ref()?;
    let (field, raw): (&str, Vec<&String>) = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => ("spec.clusterIPs", list.iter().collect()),
        _ => ("spec.clusterIP", spec.cluster_ip.iter().collect()),
    };
    let mut ips = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let path = if field == "spec.clusterIPs" {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => {
                errors.push(report.error(&path, format!("{text:?} is not a usable address")));
                return None;
            }
            Ok(ip) => ips.push(ip),
            Err(_) => {
                errors.push(report.error(&path, format!("{text:?} is not an IP address")));
                return None;
            }
        }
    }
    Some(ips)
}

fn service_ports(
    svc: &Service,
    report: &Reporter<'_>,
    errors: &mut Vec<ObjectError>,
) -> Vec<PortSpec> {
    let Some(ports) = svc.spec.as_ref().and_then(|s| s.ports.as_ref()) else {
        return Vec::new();
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, sp) in ports.iter().enumerate() {
        let Some(port) = valid_port(sp.port) else {
            errors.push(report.error(
                &format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", sp.port),
            ));
            continue;
        };
        let proto = match parse_protocol(sp.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(reason) => {
                errors.push(report.error(&format!("spec.ports[{i}].protocol"), reason));
                continue;
            }
        };
        if !seen.insert((port, proto)) {
            errors.push(report.error(
                &format!("spec.ports[{i}]"),
                format!("port {port} with this protocol is listed twice"),
            ));
            continue;
        }
        out.push(PortSpec {
            index: i,
            name: sp.name.clone().filter(|n| !n.is_empty()),
            port,
            proto,
        });
    }
    out
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Maps a Kubernetes protocol name to an IP protocol number.
fn parse_protocol(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => {
            Err("SCTP is not supported by this load balancer; the port is not proxied".into())
        }
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// `(namespace, name)` of a Service.
type ServiceId = (String, String);

/// `(namespace, service)` of a slice, borrowed; `None` when it has no name or label.
fn borrowed_slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    slice.metadata.name.as_ref()?;
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        service,
    ))
}

/// The Service a slice belongs to, or an error when it names none.
fn slice_service(
    sourced: &Sourced<EndpointSlice>,
    errors: &mut Vec<ObjectError>,
) -> Option<ServiceId> {
    let slice = &sourced.object;
    let report = Reporter::new(&sourced.origin, "EndpointSlice", &slice.metadata);
    let (namespace, _) = report.require_identity(errors)?;
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        errors.push(report.error(
            &format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "missing: the slice cannot be tied to a Service",
        ));
        return None;
    };
    Some((namespace, service.clone()))
}

/// The validated endpoints of one slice; invalid ones are reported and skipped.
fn slice_endpoints(
    sourced: &Sourced<EndpointSlice>,
    errors: &mut Vec<ObjectError>,
) -> Vec<EndpointSpec> {
    let slice = &sourced.object;
    let report = Reporter::new(&sourced.origin, "EndpointSlice", &slice.metadata);
    if slice.address_type == "FQDN" {
        return Vec::new();
    }
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        errors.push(report.error(
            "addressType",
            format!("{:?} is not IPv4, IPv6 or FQDN", slice.address_type),
        ));
        return Vec::new();
    }
    let Some(ports) = slice_ports(slice, &report, errors) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(slice.endpoints.len());
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // kube-proxy treats an unset condition as "ready", an unset serving
        // as equal to ready and an unset terminating as false.
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        // The API allows exactly one address per endpoint; consumers use the first.
        let Some(text) = endpoint.addresses.first() else {
            errors.push(report.error(&format!("endpoints[{i}].addresses"), "empty"));
            continue;
        };
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == (slice.address_type == "IPv4") => ip,
            _ => {
                errors.push(report.error(
                    &format!("endpoints[{i}].addresses[0]"),
                    format!("{text:?} is not an {} address", slice.address_type),
                ));
                continue;
            }
        };
        let zone_hints = endpoint
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default();
        out.push(EndpointSpec {
            ip,
            ready,
            serving,
            terminating,
            node_name: endpoint.node_name.clone(),
            zone_hints,
            ports: ports.clone(),
        });
    }
    out
}

fn slice_ports(
    slice: &EndpointSlice,
    report: &Reporter<'_>,
    errors: &mut Vec<ObjectError>,
) -> Option<Vec<EndpointPortSpec>> {
    let mut out = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = p.port else {
            continue;
        };
        let Some(port) = valid_port(number) else {
            errors.push(report.error(
                &format!("ports[{i}].port"),
                format!("{number} is not a port number (1-65535)"),
            ));
            return None;
        };
        let proto = match parse_protocol(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(reason) => {
                errors.push(report.error(&format!("ports[{i}].protocol"), reason));
                continue;
            }
        };
        out.push(EndpointPortSpec {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            proto,
        });
    }
    Some(out)
}

/// kube-proxy's choice (pkg/proxy/topology.go): ready endpoints, narrowed to
/// this node's under a Local internal traffic policy, or to this zone's when
/// topology hints apply; when none is ready, the ones still serving while
/// terminating, so connections drain instead of failing.
fn select_backends(
    endpoints: &[EndpointSpec],
    frontend_ip: &IpAddr,
    port: &PortSpec,
    local_only: bool,
    locality: &Locality<'_>,
) -> Vec<Backend> {
    let candidates: Vec<(&EndpointSpec, u16)> = endpoints
        .iter()
        .filter(|ep| ep.ip.is_ipv4() == frontend_ip.is_ipv4())
        .filter(|ep| !local_only || is_local(ep, locality))
        .filter_map(|ep| {
            let target = ep
                .ports
                .iter()
                .find(|p| p.name == port.name && p.proto == port.proto)?;
            Some((ep, target.port))
        })
        .collect();
    let use_topology = !local_only && can_use_topology(&candidates, locality);
    let pick = |keep: &dyn Fn(&EndpointSpec) -> bool| -> BTreeSet<Backend> {
        candidates
            .iter()
            .filter(|(ep, _)| keep(ep))
            .map(|(ep, target)| backend(ep.ip, *target, port.proto, is_local(ep, locality)))
            .collect()
    };
    let mut chosen = pick(&|ep| {
        ep.ready && (!use_topology || locality.zone.is_some_and(|z| ep.zone_hints.contains(z)))
    });
    if chosen.is_empty() {
        chosen = pick(&|ep| ep.serving && ep.terminating);
    }
    chosen.into_iter().collect()
}

fn is_local(ep: &EndpointSpec, locality: &Locality<'_>) -> bool {
    locality.node.is_some() && ep.node_name.as_deref() == locality.node
}

/// Hints are used only when every ready endpoint has zone hints and at least
/// one is hinted for this node's zone; otherwise all endpoints are used.
fn can_use_topology(candidates: &[(&EndpointSpec, u16)], locality: &Locality<'_>) -> bool {
    let Some(zone) = locality.zone else {
        return false;
    };
    let mut ready = candidates.iter().filter(|(ep, _)| ep.ready).peekable();
    if ready.peek().is_none() {
        return false;
    }
    let mut matches_zone = false;
    for (ep, _) in ready {
        if ep.zone_hints.is_empty() {
            return false;
        }
        matches_zone |= ep.zone_hints.contains(zone);
    }
    matches_zone
}

fn backend(ip: IpAddr, port: u16, proto: u8, local: bool) -> Backend {
    Backend {
        addr: addr_from_ip(ip),
        port: port_to_be(port),
        proto,
        flags: if local { BACKEND_FLAG_LOCAL } else { 0 },
    }
}

/// Builds [`ObjectError`]s for one object.
struct Reporter<'a> {
    origin: &'a str,
    object: String,
    identity: Option<ServiceId>,
}

impl<'a> Reporter<'a> {
    fn new(
        origin: &'a str,
        kind: &str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let identity = meta.name.clone().map(|name| (namespace.clone(), name));
        let object = match &identity {
            Some((ns, name)) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} (unnamed)"),
        };
        Self {
            origin,
            object,
            identity,
        }
    }

    fn error(&self, field: &str, reason: impl Into<String>) -> ObjectError {
        ObjectError {
            origin: self.origin.to_string(),
            object: self.object.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn require_identity(&self, errors: &mut Vec<ObjectError>) -> Option<ServiceId> {
        if self.identity.is_none() {
            errors.push(self.error("metadata.name", "missing"));
        }
        self.identity.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse_documents;

    fn compile_yaml(text: &str) -> Compiled {
        compile_on(text, None)
    }

    fn compile_on(text: &str, node: Option<&str>) -> Compiled {
        let parsed = parse_documents("test.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        compile(
            &parsed.objects,
            &NodeContext {
                name: node.map(str::to_owned),
                node_port_addresses: Vec::new(),
                localhost_node_ports: false,
                per_packet_cluster_ips: false,
            },
        )
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {ready: false, serving: true, terminating: true}
"#;

    fn key(ip: &str, port: u16, proto: u8) -> ServiceKey {
        ServiceKey {
            addr: addr_from_ip(ip.parse().unwrap()),
            port: port_to_be(port),
            proto,
            scope: SCOPE_EXTERNAL,
        }
    }

    fn ips(frontend: &Frontend) -> Vec<(IpAddr, u16)> {
        frontend
            .backends
            .iter()
            .map(|b| (crate::addr::ip_from_addr(&b.addr), u16::from_be(b.port)))
            .collect()
    }

    #[test]
    fn each_service_port_is_a_frontend_with_its_own_target_port() {
        let compiled = compile_yaml(WEB);
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(http.name, "default/web:http");
        assert_eq!(
            ips(http),
            vec![
                ("10.0.0.1".parse().unwrap(), 8080),
                ("10.0.0.2".parse().unwrap(), 8080)
            ]
        );
        let dns = &compiled.desired.frontends[&key("10.96.0.10", 53, PROTO_UDP)];
        assert_eq!(ips(dns).len(), 2);
        assert!(ips(dns).iter().all(|(_, port)| *port == 5353));
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let text = WEB.replace(
            "conditions: {ready: true}",
            "conditions: {ready: false}",
        )
        .replace("- addresses: [10.0.0.2]\n", "- addresses: [10.0.0.2]\n  conditions: {ready: false, serving: false, terminating: true}\n");
        let compiled = compile_yaml(&text);
        let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(ips(http), vec![("10.0.0.3".parse().unwrap(), 8080)]);
    }

    #[test]
    fn service_without_endpoints_is_a_frontend_with_no_backends() {
        let text = WEB.split("---").next().unwrap();
        let compiled = compile_yaml(text);
        let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert!(http.backends.is_empty());
    }

    #[test]
    fn headless_external_name_and_foreign_proxy_services_are_skipped() {
        for variant in [
            WEB.replace("clusterIP: 10.96.0.10", "clusterIP: None"),
            WEB.replace("clusterIP: 10.96.0.10", "type: ExternalName\n  externalName: example.com"),
            WEB.replace(
                "metadata: {name: web, namespace: default}",
                "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
            ),
            WEB.replace(
                "metadata: {name: web, namespace: default}",
                "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/headless: ''}}",
            ),
        ] {
            let compiled = compile_yaml(&variant);
            assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
            assert!(compiled.desired.frontends.is_empty(), "{variant}");
        }
    }

    #[test]
    fn invalid_fields_are_reported_with_their_path_and_skipped() {
        let text = format!(
            "{WEB}---\n{}",
            r#"
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: zero, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 0}, {port: 81, protocol: SCTP}, {port: 82}]
"#
        );
        let compiled = compile_yaml(&text);
        let fields: Vec<_> = compiled
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            vec![
                ("Service default/broken", "spec.clusterIP"),
                ("Service default/zero", "spec.ports[0].port"),
                ("Service default/zero", "spec.ports[1].protocol"),
            ]
        );
        assert!(compiled.errors[2].reason.contains("SCTP"));
        assert!(compiled
            .desired
            .frontends
            .contains_key(&key("10.96.0.10", 80, PROTO_TCP)));
        assert!(compiled
            .desired
            .frontends
            .contains_key(&key("10.96.0.11", 82, PROTO_TCP)));
        assert_eq!(compiled.desired.frontends.len(), 3);
    }

    #[test]
    fn endpoint_ports_are_matched_by_name_per_slice() {
        // Named targetPorts resolve per endpoint: the controller puts endpoints with
        // different numbers for the same name into different slices.
        let text = format!(
            "{WEB}---\n{}",
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints: [{addresses: [10.0.0.9]}]
"#
        );
        let compiled = compile_yaml(&text);
        let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert!(ips(http).contains(&("10.0.0.9".parse().unwrap(), 9090)));
        assert!(ips(http).contains(&("10.0.0.1".parse().unwrap(), 8080)));
    }

    #[test]
    fn dual_stack_service_matches_endpoints_by_family() {
        let text = WEB.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']",
        ) + r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ['fd00::1']}]
"#;
        let compiled = compile_yaml(&text);
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        let v6 = &compiled.desired.frontends[&key("fd00::10", 80, PROTO_TCP)];
        assert_eq!(ips(v6), vec![("fd00::1".parse().unwrap(), 8080)]);
        let v4 = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(ips(v4).len(), 2);
    }

    #[test]
    fn slice_without_service_label_is_reported() {
        let text = WEB.replace("  labels: {kubernetes.io/service-name: web}\n", "");
        let compiled = compile_yaml(&text);
        assert_eq!(compiled.errors.len(), 1);
        assert_eq!(compiled.errors[0].object, "EndpointSlice default/web-abc");
        let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert!(http.backends.is_empty());
    }

    const ZONED: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  nodeName: node1
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.0.0.2]
  nodeName: node2
  hints: {forZones: [{name: zone-b}]}
- addresses: [10.0.0.3]
  nodeName: node3
  hints: {forZones: [{name: zone-a}]}
"#;

    fn http_ips(compiled: &Compiled) -> Vec<IpAddr> {
        ips(&compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)])
            .into_iter()
            .map(|(ip, _)| ip)
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn topology_hints_apply_when_every_ready_endpoint_has_one_for_some_zone() {
        assert_eq!(
            http_ips(&compile_on(ZONED, Some("node1"))),
            vec![ip("10.0.0.1"), ip("10.0.0.3")]
        );
        // Without knowing its zone the node uses every endpoint.
        assert_eq!(http_ips(&compile_on(ZONED, None)).len(), 3);
        // One ready endpoint without hints disables hints for the service.
        let partial = ZONED.replace("  hints: {forZones: [{name: zone-b}]}\n", "");
        assert_eq!(http_ips(&compile_on(&partial, Some("node1"))).len(), 3);
        // No endpoint hinted for this zone: every endpoint.
        let elsewhere = ZONED.replace("zone-a}]}", "zone-c}]}");
        assert_eq!(http_ips(&compile_on(&elsewhere, Some("node1"))).len(), 3);
    }

    #[test]
    fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
        let local = ZONED.replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
        );
        let on_node2 = compile_on(&local, Some("node2"));
        assert_eq!(http_ips(&on_node2), vec![ip("10.0.0.2")]);
        let on_node9 = compile_on(&local, Some("node9"));
        let fe = &on_node9.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert!(fe.backends.is_empty());
        assert_eq!(fe.flags, SERVICE_FLAG_NO_LOCAL_BACKENDS);
    }

    #[test]
    fn unchanged_objects_are_not_recompiled_and_changes_are_reported() {
        let parsed = parse_documents("test.yaml", ZONED);
        let mut objects = parsed.objects;
        let mut compiler = Compiler::new(NodeContext::default());
        let first = compiler.update(&objects);
        assert_eq!(first.changed.len(), 1);
        assert!(compiler.update(&objects).changed.is_empty());
        // A new EndpointSlice object (as the API source delivers an update).
        let mut slice = (*objects.endpoint_slices[0].object).clone();
        slice.endpoints.truncate(1);
        objects.endpoint_slices[0].object = Arc::new(slice);
        let update = compiler.update(&objects);
        assert_eq!(update.changed.len(), 1);
        assert_eq!(http_ips_of(compiler.desired()), vec![ip("10.0.0.1")]);
        objects.services.clear();
        assert_eq!(compiler.update(&objects).changed.len(), 1);
        assert!(compiler.desired().frontends.is_empty());
    }

    fn http_ips_of(desired: &DesiredState) -> Vec<IpAddr> {
        ips(&desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)])
            .into_iter()
            .map(|(ip, _)| ip)
            .collect()
    }

    #[test]
    fn health_check_node_ports_count_local_ready_endpoints() {
        let lb = ZONED.replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        );
        let on_node1 = compile_on(&lb, Some("node1"));
        let health = &on_node1.desired.health_checks[&32000];
        assert_eq!((health.name.as_str(), health.local_endpoints), ("web", 1));
        assert_eq!(
            compile_on(&lb, Some("node9")).desired.health_checks[&32000].local_endpoints,
            0
        );
        assert!(compile_on(ZONED, Some("node1"))
            .desired
            .health_checks
            .is_empty());
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips_become_tc_and_local_client_frontends() {
        let lb = ZONED.replace(
            "  ports: [{name: http, port: 80}]\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.7]\n  loadBalancerSourceRanges: [10.1.0.0/16]\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}]\n",
        );
        let parsed = parse_documents("test.yaml", &lb);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let node = NodeContext {
            name: Some("node1".into()),
            node_port_addresses: vec![ip("192.168.100.1"), ip("fd00:100::1")],
            localhost_node_ports: true,
            per_packet_cluster_ips: false,
        };
        let compiled = compile(&parsed.objects, &node);
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        let tc = |addr: &str, port: u16| ServiceKey {
            scope: SCOPE_TC_EXTERNAL,
            ..key(addr, port, PROTO_TCP)
        };
        let frontends = &compiled.desired.frontends;
        // ClusterIP, NodePort on the IPv4 node address only (IPv4 Service),
        // the ExternalIP and the LoadBalancer IP without ipMode Proxy; the
        // NodePort (on 127.0.0.1 too) and the ExternalIP for this node's own
        // clients.
        assert_eq!(frontends.len(), 7, "{:?}", frontends.keys());
        let node_port = &frontends[&tc("192.168.100.1", 30080)];
        assert_eq!(node_port.flags, SERVICE_FLAG_EXTERNAL_LOCAL);
        assert_eq!(ips(node_port), vec![(ip("10.0.0.1"), 8080)]);
        assert_eq!(node_port.backends[0].flags, BACKEND_FLAG_LOCAL);
        assert!(node_port.source_ranges.is_empty());
        assert!(frontends.contains_key(&tc("192.0.2.7", 80)));
        let lb_ip = &frontends[&tc("198.51.100.1", 80)];
        assert_eq!(
            lb_ip.flags,
            SERVICE_FLAG_EXTERNAL_LOCAL | SERVICE_FLAG_SOURCE_RANGES
        );
        assert_eq!(lb_ip.source_ranges, vec![(ip("10.1.0.0"), 16)]);
        // The ClusterIP is not Local: it uses the zone's endpoints (hints).
        assert_eq!(ips(&frontends[&key("10.96.0.10", 80, PROTO_TCP)]).len(), 2);
        // This node's own clients get every endpoint (hints apply), as
        // kube-proxy serves them whatever externalTrafficPolicy says; the
        // source-ranged LoadBalancer IP is left to the network path.
        for (addr, port) in [
            ("192.168.100.1", 30080),
            ("127.0.0.1", 30080),
            ("192.0.2.7", 80),
        ] {
            let own = &frontends[&key(addr, port, PROTO_TCP)];
            assert_eq!(own.flags, 0, "{addr}");
            assert_eq!(ips(own).len(), 2, "{addr}");
            assert!(own.source_ranges.is_empty());
        }
        assert!(!frontends.contains_key(&key("198.51.100.1", 80, PROTO_TCP)));
        // A packet from outside addressed to 127.0.0.1 never reaches a Service.
        assert!(!frontends.contains_key(&tc("127.0.0.1", 30080)));

        let without_localhost = NodeContext {
            localhost_node_ports: false,
            ..node
        };
        let compiled = compile(&parsed.objects, &without_localhost);
        assert_eq!(compiled.desired.frontends.len(), 6);
        assert!(!compiled
            .desired
            .frontends
            .contains_key(&key("127.0.0.1", 30080, PROTO_TCP)));
    }

    #[test]
    fn annotated_pods_of_this_node_opt_out_except_host_network_ones() {
        let pod = |name: &str, node: &str, host_network: bool| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: uid-{name}\n  annotations: {{lb.dev/socket-lb: disabled}}\nspec:\n  nodeName: {node}\n  hostNetwork: {host_network}\n  containers: [{{name: c, image: i}}]\n"
            )
        };
        let text = [
            pod("mesh", "node1", false),
            pod("agent", "node1", true),
            pod("elsewhere", "node2", false),
        ]
        .join("---\n");
        let parsed = parse_documents("pods.yaml", &text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut compiler = Compiler::new(NodeContext {
            name: Some("node1".into()),
            ..NodeContext::default()
        });
        let update = compiler.update(&parsed.objects);
        assert_eq!(
            update.opted_out_pods,
            BTreeSet::from(["uid-mesh".to_string()])
        );
        assert_eq!(update.errors.len(), 1, "{:?}", update.errors);
        assert_eq!(update.errors[0].object, "Pod default/agent");
        assert!(update.errors[0].reason.contains("hostNetwork"));
    }

    #[test]
    fn client_ip_affinity_defaults_to_three_hours() {
        let sticky = WEB.replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n",
        );
        let fe = compile_yaml(&sticky).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
        assert_eq!(
            (fe.flags, fe.affinity_timeout_s),
            (SERVICE_FLAG_AFFINITY, 10_800)
        );
        let custom = sticky.replace(
            "  sessionAffinity: ClientIP\n",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n",
        );
        let fe = compile_yaml(&custom).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
        assert_eq!(fe.affinity_timeout_s, 5);
        let none = compile_yaml(WEB).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
        assert_eq!(none.flags, 0);

        // Every way in keeps the affinity: NodePorts and per-packet ClusterIPs.
        let node_port = custom
            .replace(
                "  sessionAffinity: ClientIP\n",
                "  type: NodePort\n  sessionAffinity: ClientIP\n",
            )
            .replace("targetPort: http}", "targetPort: http, nodePort: 30080}");
        assert!(node_port.contains("nodePort: 30080"), "{node_port}");
        let parsed = parse_documents("test.yaml", &node_port);
        let node = NodeContext {
            name: Some("node1".into()),
            node_port_addresses: vec![ip("192.168.100.1")],
            localhost_node_ports: false,
            per_packet_cluster_ips: true,
        };
        let compiled = compile(&parsed.objects, &node);
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let sticky_frontends: Vec<_> = compiled
            .desired
            .frontends
            .iter()
            .filter(|(k, _)| k.scope != SCOPE_EXTERNAL)
            .map(|(k, fe)| {
                (
                    k.scope,
                    fe.flags & SERVICE_FLAG_AFFINITY,
                    fe.affinity_timeout_s,
                )
            })
            .collect();
        // TCP and UDP per-packet ClusterIPs and the TCP NodePort.
        assert_eq!(
            sticky_frontends.len(),
            3,
            "{:?}",
            compiled.desired.frontends.keys()
        );
        assert!(sticky_frontends
            .iter()
            .all(|&(_, flag, timeout)| flag == SERVICE_FLAG_AFFINITY && timeout == 5));
    }
}
