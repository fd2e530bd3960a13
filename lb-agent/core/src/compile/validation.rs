//! Validation of Service fields, as the API server's rules and kube-proxy's
//! reading of them require: ports, protocols, cluster IPs, the Service-level
//! options that shape endpoint selection, and the error reports that name the
//! object and field at fault.

use std::{collections::BTreeSet, net::IpAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use lb_common::net::{PROTO_TCP, PROTO_UDP};

use super::ServiceId;
use crate::intent::{ObjectError, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A ServicePort that passed validation.
pub(super) struct PortSpec {
    /// Position in `spec.ports`.
    pub(super) index: usize,
    pub(super) name: Option<String>,
    pub(super) port: u16,
    pub(super) proto: u8,
}

/// The Service-level choices that shape endpoint selection.
pub(super) struct ServiceOptions {
    pub(super) internal_local: bool,
    pub(super) affinity_timeout_s: Option<u32>,
}

/// Session affinity and internal traffic policy of a Service; an
/// affinity timeout out of range is reported and replaced by the default.
pub(super) fn service_options(
    svc: &Service,
    report: &Reporter<'_>,
    errors: &mut Vec<ObjectError>,
) -> ServiceOptions {
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
    ServiceOptions {
        internal_local,
        affinity_timeout_s,
    }
}

/// The healthCheckNodePort of a LoadBalancer Service with externalTrafficPolicy Local.
pub(super) fn health_check_port(
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
pub(super) fn is_proxied(svc: &Service) -> bool {
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
pub(super) fn cluster_ips(
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

pub(super) fn service_ports(
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

pub(super) fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Maps a Kubernetes protocol name to an IP protocol number.
pub(super) fn parse_protocol(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => {
            Err("SCTP is not supported by this load balancer; the port is not proxied".into())
        }
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// Parses `a.b.c.d/n` or `x::/n` into its address and prefix length.
pub(super) fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let network: IpNetwork = text.trim().parse().ok()?;
    Some((network.ip(), network.prefix()))
}

/// Builds [`ObjectError`]s for one object.
pub(crate) struct Reporter<'a> {
    origin: &'a str,
    object: String,
    identity: Option<ServiceId>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(origin: &'a str, kind: &str, meta: &ObjectMeta) -> Self {
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        Self::named(origin, kind, namespace, meta.name.as_deref())
    }

    /// Reports about the object `name` of `namespace` (unnamed: none).
    pub(crate) fn named(origin: &'a str, kind: &str, namespace: &str, name: Option<&str>) -> Self {
        let identity = name.map(|name| (namespace.to_string(), name.to_string()));
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

    pub(crate) fn error(&self, field: &str, reason: impl Into<String>) -> ObjectError {
        ObjectError {
            origin: self.origin.to_string(),
            object: self.object.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    pub(super) fn require_identity(&self, errors: &mut Vec<ObjectError>) -> Option<ServiceId> {
        if self.identity.is_none() {
            errors.push(self.error("metadata.name", "missing"));
        }
        self.identity.clone()
    }
}
