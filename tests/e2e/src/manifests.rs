//! Kubernetes YAML for lab scenarios, written as users write it.

use std::fmt::Write as _;

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
pub fn endpoint_slice(service: &str, slice: &str, port: (&str, u16, &str), ips: &[&str]) -> String {
    let (port_name, number, protocol) = port;
    let mut text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: {port_name}\n  port: {number}\n  protocol: {protocol}\nendpoints:\n"
    );
    for ip in ips {
        let _ = writeln!(
            text,
            "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true"
        );
    }
    text
}
