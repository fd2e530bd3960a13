//! Intent as sources hand it over: the Kubernetes objects they currently
//! hold, where each came from, and where this agent runs. Every source (a
//! YAML directory, the Kubernetes API) produces the same [`Objects`]; the
//! compiler does not know which one did.

use std::{fmt, net::IpAddr, sync::Arc};

use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    networking::v1::NetworkPolicy,
};

use crate::{endpoint_slice::EndpointSlice, pod::Pod};

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
/// The taint the cluster autoscaler puts on a node it is about to delete;
/// kube-proxy then reports the node not eligible for new traffic.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A Kubernetes object together with where it came from, for error reports.
/// Shared (`Arc`) so snapshots of large clusters are cheap to take.
#[derive(Debug)]
pub struct Sourced<T> {
    /// Where the object was read: a file path, or `api:<Kind>` for the API server.
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
    /// Pods, for label-based security identities (what the agent keeps of
    /// them).
    pub pods: Vec<Sourced<Pod>>,
    /// Namespaces, for namespace selectors of policies.
    pub namespaces: Vec<Sourced<Namespace>>,
    /// NetworkPolicies.
    pub network_policies: Vec<Sourced<NetworkPolicy>>,
}

impl Objects {
    /// Appends every object of `other`.
    pub fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.nodes.extend(other.nodes);
        self.pods.extend(other.pods);
        self.namespaces.extend(other.namespaces);
        self.network_policies.extend(other.network_policies);
    }
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
    /// Also serve UDP ClusterIP ports per packet (tc on pod interfaces):
    /// pods' connected UDP sockets are left on the ClusterIP at `connect()`
    /// and each datagram is translated, so that a socket outlives its
    /// backend.
    pub per_packet_udp_cluster_ips: bool,
    /// The ranges `spec.externalIPs` may use; empty: none, as with the
    /// Kubernetes `DenyServiceExternalIPs` admission plugin (anyone who may
    /// create a Service could otherwise capture any address, CVE-2020-8554).
    pub external_ip_cidrs: Vec<IpNetwork>,
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
