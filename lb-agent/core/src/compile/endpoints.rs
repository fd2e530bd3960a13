//! Endpoints: the addresses and conditions of a Service's EndpointSlices,
//! validated, and kube-proxy's choice among them for each frontend (ready,
//! local, topology hints, terminating endpoints as the last resort).

use std::{collections::BTreeSet, net::IpAddr};

use crate::endpoint_slice::EndpointSlice;
use lb_common::service::{Backend, BACKEND_FLAG_LOCAL};

use super::{
    node::Locality,
    validation::{parse_protocol, valid_port, PortSpec, Reporter},
    ServiceId,
};
use crate::{
    addr::{addr_from_ip, port_to_be},
    intent::{ObjectError, Sourced, SERVICE_NAME_LABEL},
};

/// A validated endpoint address with its conditions.
pub(super) struct EndpointSpec {
    pub(super) ip: IpAddr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) node_name: Option<String>,
    pub(super) zone_hints: BTreeSet<String>,
    pub(super) ports: Vec<EndpointPortSpec>,
}

#[derive(Clone)]
pub(super) struct EndpointPortSpec {
    pub(super) name: Option<String>,
    pub(super) port: u16,
    pub(super) proto: u8,
}

/// `(namespace, service)` of a slice, borrowed; `None` when it has no name or label.
pub(super) fn borrowed_slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    slice.metadata.name.as_ref()?;
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        service,
    ))
}

/// The Service a slice belongs to, or an error when it names none.
pub(super) fn slice_service(
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
pub(super) fn slice_endpoints(
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

/// The backends of one frontend: those new connections go to, and those
/// only their existing connections keep.
pub(super) struct Selected {
    /// kube-proxy's choice, for new connections.
    pub(super) backends: Vec<Backend>,
    /// The other endpoints still listed for the port (terminating or not
    /// ready): their established flows on the tc path carry on, as
    /// kube-proxy's conntrack entries do, until they leave the slice.
    pub(super) draining: Vec<Backend>,
}

/// kube-proxy's choice (pkg/proxy/topology.go): ready endpoints, narrowed to
/// this node's under a Local internal traffic policy, or to this zone's when
/// topology hints apply; when none is ready, the ones still serving while
/// terminating, so connections drain instead of failing.
pub(super) fn select_backends(
    endpoints: &[EndpointSpec],
    frontend_ip: &IpAddr,
    port: &PortSpec,
    local_only: bool,
    locality: &Locality<'_>,
) -> Selected {
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
    let draining = pick(&|_| true).difference(&chosen).copied().collect();
    Selected {
        backends: chosen.into_iter().collect(),
        draining,
    }
}

pub(super) fn is_local(ep: &EndpointSpec, locality: &Locality<'_>) -> bool {
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
