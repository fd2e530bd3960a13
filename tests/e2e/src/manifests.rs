//! Kubernetes YAML for lab scenarios, written as users write it.

use std::fmt::Write as _;

use crate::lab::Pod;

/// A ServicePort: `(name, port, protocol, targetPort)`.
pub type PortSpec<'a> = (&'a str, u16, &'a str, &'a str);

/// A ClusterIP Service.
pub fn service(name: &str, cluster_ip: &str, ports: &[PortSpec<'_>]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  selector:\n    app: {name}\n  ports:\n"
    );
    for (port_name, port, protocol, target) in ports {
        let _ = writeln!(
            text,
            "  - name: {port_name}\n    port: {port}\n    protocol: {protocol}\n    targetPort: {target}"
        );
    }
    text
}

/// An EndpointSlice of `service` with ready endpoints on one port.
pub fn endpoint_slice(service: &str, name: &str, port: (&str, u16, &str), ips: &[&str]) -> String {
    let endpoints: Vec<Endpoint<'_>> = ips.iter().map(|ip| Endpoint::ready(ip)).collect();
    slice(service, name, &[port], &endpoints)
}

/// One endpoint of an EndpointSlice, with its conditions and topology.
#[derive(Clone, Debug)]
pub struct Endpoint<'a> {
    /// Address.
    pub ip: &'a str,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `nodeName`.
    pub node: Option<&'a str>,
    /// `hints.forZones[0].name`.
    pub zone_hint: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    /// A ready endpoint.
    pub fn ready(ip: &'a str) -> Self {
        Self {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            zone_hint: None,
        }
    }

    /// An endpoint whose pod is shutting down but still serving.
    pub fn terminating(ip: &'a str) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(ip)
        }
    }

    /// The same endpoint on a named node.
    pub fn on(self, node: &'a str) -> Self {
        Self {
            node: Some(node),
            ..self
        }
    }

    /// The same endpoint with a zone hint.
    pub fn hinted(self, zone: &'a str) -> Self {
        Self {
            zone_hint: Some(zone),
            ..self
        }
    }
}

/// An EndpointSlice with any ports and endpoints; the address type follows
/// the first endpoint's family.
pub fn slice(
    service: &str,
    slice: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[Endpoint<'_>],
) -> String {
    let address_type = if endpoints.first().is_some_and(|e| e.ip.contains(':')) {
        "IPv6"
    } else {
        "IPv4"
    };
    let mut text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {address_type}\nports:\n"
    );
    for (name, port, protocol) in ports {
        let _ = writeln!(
            text,
            "- name: {name}\n  port: {port}\n  protocol: {protocol}"
        );
    }
    text.push_str("endpoints:\n");
    for ep in endpoints {
        let _ = writeln!(
            text,
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}",
            ep.ip, ep.ready, ep.serving, ep.terminating
        );
        if let Some(node) = ep.node {
            let _ = writeln!(text, "  nodeName: {node}");
        }
        if let Some(zone) = ep.zone_hint {
            let _ = writeln!(text, "  hints: {{forZones: [{{name: {zone}}}]}}");
        }
    }
    text
}

/// A Pod object for a lab pod: labels, this node, its addresses, and the
/// container ports the servers listen on (named). Its UID is its name, as
/// the lab names pod cgroups `pod<name>`.
pub fn pod_object(pod: &Pod, labels: &[(&str, &str)]) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {name}\n  labels:\n{labels}spec:\n  nodeName: node1\n  containers:\n  - name: main\n    image: labpod\n    ports:\n    - name: http\n      containerPort: 8080\n    - name: admin\n      containerPort: 9090\n    - name: dns\n      containerPort: 8080\n      protocol: UDP\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  - ip: {ip6}\n",
        name = pod.name,
        ip = pod.ip,
        ip6 = pod.ip6,
    )
}
