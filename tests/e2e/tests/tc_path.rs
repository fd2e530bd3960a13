//! North-south traffic through the tc programs: an external client reaches
//! NodePorts of two lab nodes, each running its agent with the tc path on its
//! uplink. Backends are chosen with Maglev and tracked in conntrack.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::{Lab, Pod},
    manifests::{service, slice, Endpoint},
    probe::{parse_attempts, per_backend, Attempt},
    scenario::require_root,
};

/// Fields drop in order: agents stop before the lab is torn down.
struct TwoNodes {
    agents: Vec<Agent>,
    bins: Binaries,
    web: Vec<Pod>,
    client: Pod,
    lab: Lab,
}

const NODE_IPS: [&str; 2] = ["192.168.100.1", "192.168.100.2"];

fn two_nodes() -> Result<TwoNodes> {
    require_root();
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let nodes = [lab.add_node("node1")?, lab.add_node("node2")?];
    let mut web = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let pod = lab.add_pod(node, &format!("web-{}", i + 1))?;
        lab.spawn_server(
            &pod,
            &bins.labpod,
            &[
                "serve", "--name", &pod.name, "--tcp", "8080", "--udp", "8080",
            ],
        )?;
        web.push(pod);
    }
    let client = lab.add_external_client("outside")?;
    let agents = nodes
        .iter()
        .map(|node| {
            Agent::start_with(
                &lab,
                &bins,
                node,
                &["--node-name", &node.name, "--tc-interfaces", "eth0"],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TwoNodes {
        agents,
        bins,
        web,
        client,
        lab,
    })
}

impl TwoNodes {
    /// Writes a NodePort Service (TCP and UDP on nodePort 30080) to every
    /// agent, with `endpoints` (web index, node), and waits until programmed.
    fn publish(&self, extra_spec: &str, endpoints: &[(usize, &str)]) -> Result<()> {
        let svc = service(
            "web",
            "10.96.0.10",
            &[("tcp", 80, "TCP", "8080"), ("udp", 80, "UDP", "8080")],
        )
        .replace(
            "  type: ClusterIP\n",
            &format!("  type: NodePort\n{extra_spec}"),
        )
        .replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n    nodePort: 30080\n",
        );
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .map(|(i, node)| Endpoint::ready(&self.web[*i].ip).on(node))
            .collect();
        let text = format!(
            "{svc}---\n{}",
            slice(
                "web",
                "web-a",
                &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")],
                &eps
            )
        );
        for (agent, node_ip) in self.agents.iter().zip(NODE_IPS) {
            agent.write_manifest("web.yaml", &text)?;
            let before = agent.log_text().matches("reconciled").count();
            agent.wait_for_services(Duration::from_secs(10), |t| {
                t.contains(&format!("{node_ip}:30080/UDP (external)"))
            })?;
            // Wait for this write's reconciliation, not an earlier one.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while agent.log_text().matches("reconciled").count() <= before
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn connect(&self, target: &str, args: &[&str]) -> Result<Vec<Attempt>> {
        let mut all = vec!["connect", "--target", target];
        all.extend(args);
        let output = self.lab.run_in(&self.client, &self.bins.labpod, &all)?;
        parse_attempts(&output.stdout)
    }
}

fn all_ok(attempts: &[Attempt]) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
}

/// Upstream: network/service.go "should be able to create a functioning
/// NodePort service [Conformance]" and "should serve endpoints on same port
/// and different protocols": from outside the cluster, NodeIP:NodePort of
/// either node reaches backends on both nodes, over TCP and UDP; one flow
/// (same source address and port) lands on the same backend through either
/// node.
#[test]
fn node_port_reaches_backends_on_both_nodes_consistently() -> Result<()> {
    let t = two_nodes()?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    for node_ip in NODE_IPS {
        let tcp = t.connect(&format!("{node_ip}:30080"), &["--count", "40"])?;
        all_ok(&tcp);
        let names: BTreeSet<String> = per_backend(&tcp).into_keys().collect();
        assert_eq!(names.len(), 2, "via {node_ip}: {names:?}");
        let udp = t.connect(
            &format!("{node_ip}:30080"),
            &["--count", "20", "--proto", "udp"],
        )?;
        all_ok(&udp);
        assert_eq!(per_backend(&udp).len(), 2, "via {node_ip}");
    }
    // The same flow through either node: Maglev with one seed, hash without
    // the destination address.
    for source_port in 40_000..40_008u16 {
        let port = source_port.to_string();
        let args = ["--proto", "udp", "--unconnected", "--source-port", &port];
        let via1 = t.connect(&format!("{}:30080", NODE_IPS[0]), &args)?;
        let via2 = t.connect(&format!("{}:30080", NODE_IPS[1]), &args)?;
        all_ok(&via1);
        all_ok(&via2);
        assert_eq!(via1[0].backend, via2[0].backend, "flow from port {port}");
    }
    Ok(())
}

/// Upstream: network/loadbalancer.go "should only target nodes with
/// endpoints" and service.go "should work for type=NodePort" with
/// externalTrafficPolicy Local: each node uses only its own endpoints, the
/// backend sees the client's real address, and a node without local
/// endpoints drops.
#[test]
fn external_traffic_policy_local_preserves_the_client_and_drops_without_endpoints() -> Result<()> {
    let t = two_nodes()?;
    t.publish(
        "  externalTrafficPolicy: Local\n",
        &[(0, "node1"), (1, "node2")],
    )?;
    for (i, node_ip) in NODE_IPS.iter().enumerate() {
        let attempts = t.connect(&format!("{node_ip}:30080"), &["--count", "10"])?;
        all_ok(&attempts);
        for a in &attempts {
            assert_eq!(
                a.backend.as_deref(),
                Some(format!("web-{}", i + 1).as_str())
            );
            let seen = a.seen_source.as_deref().unwrap_or_default();
            assert!(
                seen.starts_with(&format!("{}:", t.client.ip)),
                "client address lost: {seen}"
            );
        }
    }
    t.publish("  externalTrafficPolicy: Local\n", &[(0, "node1")])?;
    let dropped = t.connect(
        &format!("{}:30080", NODE_IPS[1]),
        &["--count", "2", "--timeout-ms", "500"],
    )?;
    assert!(dropped.iter().all(|a| !a.ok), "{dropped:?}");
    let served = t.connect(&format!("{}:30080", NODE_IPS[0]), &["--count", "5"])?;
    all_ok(&served);
    Ok(())
}
