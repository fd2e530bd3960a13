//! The services a candidate programs: the measured service after N-1
//! fillers, as kube-proxy's iptables and nftables rules and as manifests for
//! lb-agent.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_e2e::manifests;

use crate::kubeproxy::{
    self, IptablesOptions, NftablesOptions, Protocol, ServicePort, SyntheticServices,
};

/// ClusterIP of the measured service.
pub(super) const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Service port of the CRR/RR server (target port [`CRR_TARGET_PORT`]).
pub(super) const CRR_SERVICE_PORT: u16 = 80;
/// Port `crr server` listens on in the server pod.
pub(super) const CRR_TARGET_PORT: u16 = 8080;
/// Service port and target port of the iperf3 server.
pub(super) const IPERF_PORT: u16 = 5201;
/// First address of the filler services' fake endpoints (never routed).
const FILLER_ENDPOINTS: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Namespace of every benchmark service.
const NAMESPACE: &str = "default";
/// Name of the measured service.
const MEASURED: &str = "measured";

/// The N services one candidate programs: N-1 filler services with fake
/// endpoints, then the measured service (two ports, CRR and iperf3, whose
/// only endpoint is the candidate's server pod), last.
#[derive(Clone, Debug)]
pub(super) struct ServiceSet {
    /// Number of services (the measured one included).
    count: usize,
    /// Every service port, fillers first, the measured CRR port last.
    ports: Vec<ServicePort>,
}

impl ServiceSet {
    /// `count` services (at least 1) whose measured one points at `server`.
    pub(super) fn new(count: usize, endpoints_per_service: usize, server: Ipv4Addr) -> Self {
        let mut ports = SyntheticServices {
            count: count.saturating_sub(1),
            endpoints_per_service,
            namespace: NAMESPACE.into(),
            first_endpoint_ip: FILLER_ENDPOINTS,
            ..SyntheticServices::default()
        }
        .build();
        let measured = |port_name: &str, port: u16, target: u16| ServicePort {
            namespace: NAMESPACE.into(),
            name: MEASURED.into(),
            port_name: port_name.into(),
            protocol: Protocol::Tcp,
            cluster_ip: MEASURED_VIP,
            port,
            endpoints: vec![SocketAddrV4::new(server, target)],
        };
        ports.push(measured("iperf", IPERF_PORT, IPERF_PORT));
        ports.push(measured("crr", CRR_SERVICE_PORT, CRR_TARGET_PORT));
        ServiceSet {
            count: count.max(1),
            ports,
        }
    }

    /// Number of frontends (service ports) the set holds.
    pub(super) fn frontends(&self) -> usize {
        self.ports.len()
    }

    /// kube-proxy's iptables-restore input, measured service last in
    /// `KUBE-SERVICES`.
    pub(super) fn iptables(&self) -> String {
        kubeproxy::iptables_restore(
            &self.ports,
            &IptablesOptions {
                last_service: Some(self.ports.len() - 1),
                ..IptablesOptions::default()
            },
        )
    }

    /// kube-proxy's nft -f input.
    pub(super) fn nft(&self) -> String {
        kubeproxy::nft_script(&self.ports, &NftablesOptions::default())
    }

    /// The same services as Kubernetes YAML (Service + EndpointSlice each),
    /// for lb-agent.
    pub(super) fn yaml(&self) -> String {
        let mut docs: Vec<String> = Vec::with_capacity(2 * self.count);
        let mut measured: Vec<&ServicePort> = Vec::new();
        for port in &self.ports {
            if port.name == MEASURED {
                measured.push(port);
                continue;
            }
            let target = port.endpoints.first().map_or(CRR_TARGET_PORT, |e| e.port());
            let target_s = target.to_string();
            docs.push(manifests::service(
                &port.name,
                &port.cluster_ip.to_string(),
                &[(&port.port_name, port.port, "TCP", &target_s)],
            ));
            let ips: Vec<String> = port.endpoints.iter().map(|e| e.ip().to_string()).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            docs.push(manifests::endpoint_slice(
                &port.name,
                &format!("{}-1", port.name),
                (&port.port_name, target, "TCP"),
                &ips,
            ));
        }
        let targets: Vec<String> = measured
            .iter()
            .map(|p| p.endpoints[0].port().to_string())
            .collect();
        let specs: Vec<manifests::PortSpec<'_>> = measured
            .iter()
            .zip(&targets)
            .map(|(p, t)| (p.port_name.as_str(), p.port, "TCP", t.as_str()))
            .collect();
        docs.push(manifests::service(
            MEASURED,
            &MEASURED_VIP.to_string(),
            &specs,
        ));
        let slice_ports: Vec<(&str, u16, &str)> = measured
            .iter()
            .map(|p| (p.port_name.as_str(), p.endpoints[0].port(), "TCP"))
            .collect();
        let server = measured[0].endpoints[0].ip().to_string();
        docs.push(manifests::slice(
            MEASURED,
            "measured-1",
            &slice_ports,
            &[manifests::Endpoint::ready(&server)],
        ));
        docs.join("---\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_set_puts_the_measured_port_last() {
        let set = ServiceSet::new(5, 3, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(set.count, 5);
        // 4 fillers + the measured service's two ports.
        assert_eq!(set.frontends(), 6);
        let last = set.ports.last().unwrap();
        assert_eq!(
            (last.cluster_ip, last.port),
            (MEASURED_VIP, CRR_SERVICE_PORT)
        );
        assert_eq!(
            last.endpoints,
            vec![SocketAddrV4::new(
                Ipv4Addr::new(10, 244, 1, 2),
                CRR_TARGET_PORT
            )]
        );
        let ipt = set.iptables();
        let dispatch: Vec<&str> = ipt
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains("cluster IP"))
            .collect();
        assert_eq!(dispatch.len(), 6);
        assert!(dispatch[5].contains("-d 10.96.0.10 --dport 80 "));
        // Fillers' endpoints stay out of the lab's pod addresses.
        assert!(set.ports[0].endpoints[0].ip().octets()[1] == 250);
        let yaml = set.yaml();
        assert_eq!(yaml.matches("kind: Service\n").count(), 5);
        assert_eq!(yaml.matches("kind: EndpointSlice\n").count(), 5);
        assert!(yaml.contains("clusterIP: 10.96.0.10"));
        assert!(yaml.contains("10.244.1.2"));
        assert_eq!(ServiceSet::new(1, 3, Ipv4Addr::LOCALHOST).frontends(), 2);
    }
}
