//! What the compiler decides should be in the datapath.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::service::{Backend, ServiceKey};

/// One frontend to program: a (VIP, port, protocol) and its chosen backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Display name, `namespace/name:port-name` (or `namespace/name` for an unnamed port).
    pub name: String,
    /// Backends in a stable order, without duplicates: where new
    /// connections go.
    pub backends: Vec<Backend>,
    /// Backends whose endpoints are still listed but no longer chosen
    /// (terminating or not ready), sorted: kept in the backend map so that
    /// their established tc-path flows finish where they started; never
    /// given a new flow.
    pub draining: Vec<Backend>,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (with `SERVICE_FLAG_AFFINITY`).
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
