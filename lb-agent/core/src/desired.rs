//! What the compiler decides should be in the datapath.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    net::Addr,
    service::{Backend, ServiceKey, SCOPE_TC_EXTERNAL},
};

use crate::addr::addr_from_ip;

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

impl DesiredState {
    /// The addresses of the tc frontends that are not among
    /// `node_addresses` (LoadBalancer IPs, externalIPs): nothing but a
    /// frontend answers on them.
    pub fn frontend_only_addresses(&self, node_addresses: &[IpAddr]) -> BTreeSet<Addr> {
        let nodes: BTreeSet<Addr> = node_addresses.iter().map(|ip| addr_from_ip(*ip)).collect();
        self.frontends
            .keys()
            .filter(|key| key.scope == SCOPE_TC_EXTERNAL && !nodes.contains(&key.addr))
            .map(|key| key.addr)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{net::PROTO_TCP, service::SCOPE_EXTERNAL};

    use super::*;
    use crate::addr::port_to_be;

    #[test]
    fn frontend_only_addresses_leave_out_node_addresses_and_the_socket_path() {
        let key = |ip: &str, scope| ServiceKey {
            addr: addr_from_ip(ip.parse().unwrap()),
            port: port_to_be(80),
            proto: PROTO_TCP,
            scope,
        };
        let desired = DesiredState {
            frontends: [
                key("192.0.2.10", SCOPE_TC_EXTERNAL),
                key("198.51.100.7", SCOPE_TC_EXTERNAL),
                key("10.96.0.1", SCOPE_EXTERNAL),
            ]
            .into_iter()
            .map(|k| (k, Frontend::default()))
            .collect(),
            ..DesiredState::default()
        };
        let node: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(
            desired.frontend_only_addresses(&[node]),
            [addr_from_ip("198.51.100.7".parse().unwrap())].into()
        );
    }
}
