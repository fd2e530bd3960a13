//! Frontends: the (address, port, protocol) entries a Service answers on,
//! each with its backends and flags: ClusterIPs for the socket path (and per
//! packet when pods opted out of it), NodePorts, ExternalIPs and LoadBalancer
//! IPs for the tc path and for the node's own clients.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::Service;

use crate::endpoint_slice::EndpointSlice;
use lb_common::{
    net::PROTO_UDP,
    service::{
        ServiceKey, SCOPE_EXTERNAL, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL, SERVICE_FLAG_AFFINITY,
        SERVICE_FLAG_EXTERNAL_LOCAL, SERVICE_FLAG_NO_LOCAL_BACKENDS, SERVICE_FLAG_PRESERVE_SOURCE,
        SERVICE_FLAG_SOURCE_RANGES,
    },
};

use super::{
    endpoints::{is_local, select_backends, slice_endpoints, EndpointSpec, Selected},
    node::Locality,
    validation::{
        cluster_ips, health_check_port, is_proxied, parse_cidr, service_options, service_ports,
        valid_port, PortSpec, Reporter,
    },
    ServiceId, ServiceOutput,
};
use crate::{
    addr::{addr_from_ip, port_to_be},
    admission::special_address,
    desired::{Frontend, ServiceHealth},
    intent::Sourced,
};

/// Compiles one Service with its EndpointSlices.
pub(super) fn compile_service(
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
    output.cluster_addresses = ips.iter().map(|ip| addr_from_ip(*ip)).collect();
    let ports = service_ports(svc, &report, errors);
    let options = service_options(svc, &report, errors);
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
            let Selected { backends, draining } =
                select_backends(&endpoints, ip, port, options.internal_local, locality);
            let mut flags = 0;
            if options.affinity_timeout_s.is_some() {
                flags |= SERVICE_FLAG_AFFINITY;
            }
            if options.internal_local && backends.is_empty() {
                flags |= SERVICE_FLAG_NO_LOCAL_BACKENDS;
            }
            let frontend = Frontend {
                name,
                backends,
                draining,
                flags,
                affinity_timeout_s: options.affinity_timeout_s.unwrap_or(0),
                source_ranges: Vec::new(),
            };
            if locality.per_packet_cluster_ips
                || (locality.per_packet_udp_cluster_ips && port.proto == PROTO_UDP)
            {
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
            options.affinity_timeout_s,
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
        match external_ip(text, locality.external_ip_cidrs) {
            Ok(ip) => addresses.push((ip, Way::NodeOrExternalIp)),
            Err(reason) => output
                .errors
                .push(report.error(&format!("spec.externalIPs[{i}]"), reason)),
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
            let Selected { backends, draining } =
                select_backends(endpoints, &ip, port, local, locality);
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
                let Selected { backends, draining } =
                    select_backends(endpoints, &ip, port, false, locality);
                let flags = flags & SERVICE_FLAG_AFFINITY;
                output.frontends.push((
                    ServiceKey {
                        scope: SCOPE_EXTERNAL,
                        ..key
                    },
                    Frontend {
                        name: name.clone(),
                        backends,
                        draining,
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
                    draining,
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

/// An externalIP the node may serve: an address, not one the API server
/// refuses (unspecified, loopback, link-local, multicast, or their
/// IPv4-mapped forms), and inside the allowed `externalIPCIDRs`.
fn external_ip(text: &str, allowed: &[ipnetwork::IpNetwork]) -> Result<IpAddr, String> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    if let Some(kind) = special_address(ip) {
        return Err(format!("{ip} is a {kind} address; not served"));
    }
    if !allowed.iter().any(|cidr| cidr.contains(ip)) {
        return Err(format!(
            "{ip} is outside externalIPCIDRs (none are allowed unless set, as with the \
             DenyServiceExternalIPs admission plugin); not served"
        ));
    }
    Ok(ip)
}
