//! The API server's validation of Services and EndpointSlices, for the YAML
//! source: with no API server in front of it, an object the API server would
//! reject must be rejected whole here, with its file, object and field, and
//! never half-programmed. Objects from the API server have passed these
//! rules already and do not go through this stage.
//!
//! The rules follow `ValidateService` and `ValidateEndpointSlice` of
//! `k8s.io/kubernetes/pkg/apis/{core,discovery}/validation`, for the fields
//! the agent reads.

use std::{collections::BTreeSet, net::IpAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::{
    compile::Reporter,
    endpoint_slice::EndpointSlice,
    intent::{ObjectError, Sourced},
    yaml::Parsed,
};

/// What the API server's configuration adds to its validation.
#[derive(Clone, Debug, Default)]
pub struct AdmissionRules {
    /// The service CIDRs (`--service-cluster-ip-range`); when set, a
    /// `clusterIP` outside them is rejected.
    pub service_cidrs: Vec<IpNetwork>,
}

/// Removes from `parsed` every Service and EndpointSlice the API server
/// would reject, reporting each violation.
pub fn admit(parsed: &mut Parsed, rules: &AdmissionRules) {
    let errors = &mut parsed.errors;
    parsed.objects.services.retain(|sourced| {
        let found = service_violations(sourced, rules);
        let admitted = found.is_empty();
        errors.extend(found);
        admitted
    });
    parsed.objects.endpoint_slices.retain(|sourced| {
        let found = endpoint_slice_violations(sourced);
        let admitted = found.is_empty();
        errors.extend(found);
        admitted
    });
}

/// Collects the violations of one object.
struct Violations<'a> {
    report: Reporter<'a>,
    found: Vec<ObjectError>,
}

impl<'a> Violations<'a> {
    fn new(origin: &'a str, kind: &str, meta: &ObjectMeta) -> Self {
        Self {
            report: Reporter::new(origin, kind, meta),
            found: Vec::new(),
        }
    }

    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        let reason = format!(
            "{}; the API server rejects this object, so none of it is programmed",
            reason.into()
        );
        self.found.push(self.report.error(&field.into(), reason));
    }

    /// `metadata.name` (checked by `name_rule`) and `metadata.namespace`.
    fn metadata(&mut self, meta: &ObjectMeta, name_rule: NameRule) {
        match meta.name.as_deref() {
            None | Some("") => self.add("metadata.name", "missing"),
            Some(name) if !name_rule.accepts(name) => self.add(
                "metadata.name",
                format!("{name:?} {}", name_rule.expected()),
            ),
            Some(_) => {}
        }
        if let Some(namespace) = meta.namespace.as_deref() {
            if !NameRule::Dns1123Label.accepts(namespace) {
                self.add(
                    "metadata.namespace",
                    format!("{namespace:?} {}", NameRule::Dns1123Label.expected()),
                );
            }
        }
    }
}

/// The name formats of Kubernetes objects and fields.
#[derive(Clone, Copy)]
enum NameRule {
    /// RFC 1123 label: lowercase alphanumerics and '-', at most 63.
    Dns1123Label,
    /// RFC 1035 label: as a 1123 label, starting with a letter.
    Dns1035Label,
    /// RFC 1123 subdomain: 1123 labels joined by '.', at most 253.
    Dns1123Subdomain,
    /// A named port: at most 15 characters, lowercase alphanumerics and
    /// '-', at least one letter, no '--', no '-' at either end.
    IanaServiceName,
}

impl NameRule {
    fn accepts(self, text: &str) -> bool {
        let label = |part: &str, max: usize| {
            !part.is_empty()
                && part.len() <= max
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        };
        match self {
            Self::Dns1123Label => label(text, 63),
            Self::Dns1035Label => {
                label(text, 63) && text.starts_with(|c: char| c.is_ascii_lowercase())
            }
            Self::Dns1123Subdomain => text.len() <= 253 && text.split('.').all(|p| label(p, 63)),
            Self::IanaServiceName => {
                label(text, 15)
                    && !text.contains("--")
                    && text.bytes().any(|b| b.is_ascii_lowercase())
            }
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Self::Dns1123Label => {
                "is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)"
            }
            Self::Dns1035Label => {
                "is not a DNS-1035 label (a lowercase letter, then lowercase letters, digits and '-', at most 63)"
            }
            Self::Dns1123Subdomain => {
                "is not a DNS-1123 subdomain (labels joined by '.', at most 253)"
            }
            Self::IanaServiceName => {
                "is not a port name (at most 15 lowercase letters, digits and '-', with a letter)"
            }
        }
    }
}

const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

fn service_violations(sourced: &Sourced<Service>, rules: &AdmissionRules) -> Vec<ObjectError> {
    let svc = &sourced.object;
    let mut v = Violations::new(&sourced.origin, "Service", &svc.metadata);
    v.metadata(&svc.metadata, NameRule::Dns1035Label);
    let Some(spec) = &svc.spec else {
        v.add("spec", "missing");
        return v.found;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !SERVICE_TYPES.contains(&kind) {
        v.add(
            "spec.type",
            format!("{kind:?} is not one of {SERVICE_TYPES:?}"),
        );
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless && kind != "ExternalName" {
        v.add("spec.ports", "at least one port is required");
    }
    service_ports(&mut v, kind, ports);
    cluster_ips(&mut v, spec, rules);
    external_ips(&mut v, spec);
    traffic_options(&mut v, spec, kind);
    v.found
}

fn service_ports(v: &mut Violations<'_>, kind: &str, ports: &[ServicePort]) {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    let mut node_ports = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        match port.name.as_deref().filter(|n| !n.is_empty()) {
            None if ports.len() > 1 => {
                v.add(at("name"), "required when a Service has more than one port")
            }
            None => {}
            Some(name) if !NameRule::Dns1123Label.accepts(name) => v.add(
                at("name"),
                format!("{name:?} {}", NameRule::Dns1123Label.expected()),
            ),
            Some(name) if !names.insert(name) => {
                v.add(at("name"), format!("{name:?} is used by another port"))
            }
            Some(_) => {}
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&protocol) {
            v.add(
                at("protocol"),
                format!("{protocol:?} is not one of {PROTOCOLS:?}"),
            );
        }
        if !(1..=65535).contains(&port.port) {
            v.add(
                at("port"),
                format!("{} is not a port number (1-65535)", port.port),
            );
        } else if !numbers.insert((port.port, protocol)) {
            v.add(
                at("port"),
                format!("{}/{protocol} is listed twice", port.port),
            );
        }
        match &port.target_port {
            Some(IntOrString::Int(number)) if !(1..=65535).contains(number) => v.add(
                at("targetPort"),
                format!("{number} is not a port number (1-65535)"),
            ),
            Some(IntOrString::String(name)) if !NameRule::IanaServiceName.accepts(name) => v.add(
                at("targetPort"),
                format!("{name:?} {}", NameRule::IanaServiceName.expected()),
            ),
            _ => {}
        }
        match port.node_port {
            None | Some(0) => {}
            Some(_) if kind == "ClusterIP" || kind == "ExternalName" => v.add(
                at("nodePort"),
                format!("may not be used when the type is {kind}"),
            ),
            Some(number) if !(1..=65535).contains(&number) => v.add(
                at("nodePort"),
                format!("{number} is not a port number (1-65535)"),
            ),
            Some(number) if !node_ports.insert((number, protocol)) => v.add(
                at("nodePort"),
                format!("{number}/{protocol} is used by another port"),
            ),
            Some(_) => {}
        }
    }
}

fn cluster_ips(v: &mut Violations<'_>, spec: &ServiceSpec, rules: &AdmissionRules) {
    let list = spec.cluster_ips.as_deref().unwrap_or_default();
    if let (Some(first), Some(single)) = (list.first(), spec.cluster_ip.as_deref()) {
        if first != single {
            v.add(
                "spec.clusterIPs[0]",
                format!("{first:?} must equal spec.clusterIP {single:?}"),
            );
        }
    }
    if list.len() > 2 {
        v.add("spec.clusterIPs", "at most two addresses, one per family");
    }
    let mut families = BTreeSet::new();
    let fields = spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip))
        .chain(
            list.iter()
                .enumerate()
                .skip(usize::from(spec.cluster_ip.is_some()))
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
        );
    for (field, text) in fields {
        if text.is_empty() || text == "None" {
            continue;
        }
        let Ok(ip) = text.parse::<IpAddr>() else {
            v.add(field, format!("{text:?} is not an IP address"));
            continue;
        };
        if !families.insert(ip.is_ipv4()) {
            v.add(
                field.clone(),
                format!("{ip} is a second address of its family"),
            );
        }
        let in_range = rules.service_cidrs.is_empty()
            || rules.service_cidrs.iter().any(|cidr| cidr.contains(ip));
        if !in_range {
            let ranges: Vec<String> = rules.service_cidrs.iter().map(|c| c.to_string()).collect();
            v.add(
                field,
                format!("{ip} is outside the service CIDRs ({})", ranges.join(", ")),
            );
        }
    }
}

/// Addresses the API server refuses as externalIPs: they would capture the
/// node's own or special-purpose traffic.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    } {
        Some("link-local")
    } else {
        None
    }
}

fn external_ips(v: &mut Violations<'_>, spec: &ServiceSpec) {
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        match text.parse::<IpAddr>() {
            Err(_) => v.add(field, format!("{text:?} is not an IP address")),
            Ok(ip) => {
                if let Some(kind) = special_address(ip) {
                    v.add(field, format!("{ip} is a {kind} address"));
                }
            }
        }
    }
}

fn traffic_options(v: &mut Violations<'_>, spec: &ServiceSpec, kind: &str) {
    let externally_accessible = matches!(kind, "NodePort" | "LoadBalancer")
        || (kind == "ClusterIP" && spec.external_ips.as_ref().is_some_and(|e| !e.is_empty()));
    match spec.external_traffic_policy.as_deref() {
        None | Some("") => {}
        Some(_) if !externally_accessible => v.add(
            "spec.externalTrafficPolicy",
            "may only be set on a Service reachable from outside (NodePort, LoadBalancer, externalIPs)",
        ),
        Some("Cluster" | "Local") => {}
        Some(other) => v.add(
            "spec.externalTrafficPolicy",
            format!("{other:?} is not Cluster or Local"),
        ),
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref() {
        if !matches!(policy, "Cluster" | "Local") {
            v.add(
                "spec.internalTrafficPolicy",
                format!("{policy:?} is not Cluster or Local"),
            );
        }
    }
    if spec.health_check_node_port.is_some_and(|p| p != 0)
        && (kind != "LoadBalancer" || spec.external_traffic_policy.as_deref() != Some("Local"))
    {
        v.add(
            "spec.healthCheckNodePort",
            "may only be set on a LoadBalancer Service with externalTrafficPolicy Local",
        );
    }
    let ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    if !ranges.is_empty() && kind != "LoadBalancer" {
        v.add(
            "spec.loadBalancerSourceRanges",
            "may only be set on a LoadBalancer Service",
        );
    }
    for (i, text) in ranges.iter().enumerate() {
        if text.trim().parse::<IpNetwork>().is_err() {
            v.add(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{text:?} is not a CIDR"),
            );
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout.filter(|t| !(1..=86_400).contains(t)) {
                v.add(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is outside 1-86400"),
                );
            }
        }
        Some(other) => v.add(
            "spec.sessionAffinity",
            format!("{other:?} is not None or ClientIP"),
        ),
    }
}

fn endpoint_slice_violations(sourced: &Sourced<EndpointSlice>) -> Vec<ObjectError> {
    let slice = &sourced.object;
    let mut v = Violations::new(&sourced.origin, "EndpointSlice", &slice.metadata);
    v.metadata(&slice.metadata, NameRule::Dns1123Subdomain);
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            v.add(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            );
            None
        }
    };
    if slice.endpoints.len() > 1000 {
        v.add("endpoints", "at most 1000 endpoints per slice");
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}].addresses");
        match endpoint.addresses.len() {
            0 => v.add(field.clone(), "at least one address is required"),
            1..=100 => {}
            _ => v.add(field.clone(), "at most 100 addresses"),
        }
        let Some(ipv4) = family else { continue };
        for (j, text) in endpoint.addresses.iter().enumerate() {
            let wanted = if ipv4 { "IPv4" } else { "IPv6" };
            match text.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == ipv4 => {}
                _ => v.add(
                    format!("{field}[{j}]"),
                    format!("{text:?} is not an {wanted} address"),
                ),
            }
        }
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    if ports.len() > 100 {
        v.add("ports", "at most 100 ports per slice");
    }
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = |field: &str| format!("ports[{i}].{field}");
        let name = port.name.as_deref().unwrap_or_default();
        if !name.is_empty() && !NameRule::Dns1123Label.accepts(name) {
            v.add(
                at("name"),
                format!("{name:?} {}", NameRule::Dns1123Label.expected()),
            );
        }
        if !names.insert(name) {
            v.add(at("name"), format!("{name:?} is used by another port"));
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&protocol) {
            v.add(
                at("protocol"),
                format!("{protocol:?} is not one of {PROTOCOLS:?}"),
            );
        }
        if let Some(number) = port.port.filter(|p| !(1..=65535).contains(p)) {
            v.add(
                at("port"),
                format!("{number} is not a port number (1-65535)"),
            );
        }
    }
    v.found
}

#[cfg(test)]
mod tests;
