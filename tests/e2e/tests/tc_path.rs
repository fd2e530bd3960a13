//! North-south traffic through the tc programs: an external client reaches
//! NodePorts of two lab nodes, each running its agent with the tc path on its
//! uplink. Backends are chosen with Maglev and tracked in conntrack.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::{run, Lab, Node, Pod},
    manifests::{service, slice, Endpoint},
    probe::{http_get, metric_value, parse_attempts, per_backend, settled, Attempt},
    scenario::require_root,
};

/// Fields drop in order: agents stop before the lab is torn down.
struct TwoNodes {
    agents: Vec<Agent>,
    bins: Binaries,
    nodes: Vec<Node>,
    web: Vec<Pod>,
    client: Pod,
    lab: Lab,
}

const NODE_IPS: [&str; 2] = ["192.168.100.1", "192.168.100.2"];

/// Agent arguments of node1 with socket translation off and the tc programs
/// on its pod interfaces.
const PER_PACKET_NODE1: [&str; 6] = [
    "--node-name",
    "node1",
    "--socket-lb",
    "false",
    "--pod-interfaces",
    "p",
];

fn two_nodes() -> Result<TwoNodes> {
    two_nodes_with(&[])
}

/// A pod `name` on `node` serving TCP and UDP 8080 (answering with its name).
fn serve_web(lab: &mut Lab, bins: &Binaries, node: &Node, name: &str) -> Result<Pod> {
    let pod = lab.add_pod(node, name)?;
    lab.spawn_server(
        &pod,
        &bins.labpod,
        &["serve", "--name", name, "--tcp", "8080", "--udp", "8080"],
    )?;
    Ok(pod)
}

/// [`two_nodes`] with more agent flags.
fn two_nodes_with(extra_args: &[&str]) -> Result<TwoNodes> {
    require_root();
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let nodes = [lab.add_node("node1")?, lab.add_node("node2")?];
    let web = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| serve_web(&mut lab, &bins, node, &format!("web-{}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let client = lab.add_external_client("outside")?;
    let agents = nodes
        .iter()
        .map(|node| {
            Agent::start_with(
                &lab,
                &bins,
                node,
                &[
                    &[
                        "--node-name",
                        &node.name,
                        "--tc-interfaces",
                        "eth0",
                        "--external-ip-cidrs",
                        "192.0.2.0/24",
                    ],
                    extra_args,
                ]
                .concat(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TwoNodes {
        agents,
        bins,
        nodes: nodes.to_vec(),
        web,
        client,
        lab,
    })
}

impl TwoNodes {
    /// Writes a NodePort Service (TCP and UDP on nodePort 30080) to every
    /// agent, with `endpoints` (web index, node), and waits until programmed.
    fn publish(&self, extra_spec: &str, endpoints: &[(usize, &str)]) -> Result<()> {
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .map(|(i, node)| Endpoint::ready(&self.web[*i].ip).on(node))
            .collect();
        self.publish_endpoints(extra_spec, &eps)
    }

    /// As [`publish`](Self::publish), with endpoints in any condition.
    fn publish_endpoints(&self, extra_spec: &str, eps: &[Endpoint]) -> Result<()> {
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
        let text = format!(
            "{svc}---\n{}",
            slice(
                "web",
                "web-a",
                &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")],
                eps
            )
        );
        self.publish_text(&text, ":30080/UDP (external)")
    }

    /// Writes `text` to every agent and waits until each has reconciled it
    /// and lists a frontend containing `needle`.
    fn publish_text(&self, text: &str, needle: &str) -> Result<()> {
        for agent in &self.agents {
            let before = agent.log_text().matches("reconciled").count();
            agent.write_manifest("web.yaml", text)?;
            agent.wait_for_services(Duration::from_secs(10), |t| t.contains(needle))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while agent.log_text().matches("reconciled").count() <= before {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the agent never reconciled the new manifest:\n{}",
                    agent.log_text()
                );
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

    /// Waits until the node at `node_ip` counts translated ICMP errors
    /// (its tc counters reach the metrics within a second).
    fn wait_for_translated_icmp_errors(&self, node_ip: &str) -> Result<()> {
        let url = format!("http://{node_ip}:10249/metrics");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, metrics) = http_get(&self.client.netns, &url)?;
            let counted = metrics.lines().any(|l| {
                l.starts_with("lb_tc_packets{outcome=\"icmp_error\"}") && !l.ends_with(" 0")
            });
            if counted {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{node_ip} counted no translated ICMP error:\n{metrics}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Checks that the external client's connection (TCP) or datagram (UDP)
    /// to `target` is refused with ECONNREFUSED at once, not left to time out.
    fn assert_refused_at_once(&self, target: &str, proto: &str) -> Result<()> {
        let started = std::time::Instant::now();
        let attempts = self.connect(target, &["--proto", proto, "--timeout-ms", "3000"])?;
        assert!(!attempts[0].ok, "{target} {proto}: {attempts:?}");
        assert_eq!(
            attempts[0].errno,
            Some(libc::ECONNREFUSED),
            "{target} {proto}: {attempts:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{target} {proto}: refused only after {:?}",
            started.elapsed()
        );
        Ok(())
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

/// A restarted agent adopts the pinned Maglev tables as they are: its first
/// pass writes nothing (kube-proxy's restart leaves unchanged rules alone),
/// and the NodePort serves across the restart.
#[test]
fn a_restarted_agent_writes_nothing_when_nothing_changed() -> Result<()> {
    let mut t = two_nodes()?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let before = t.agents[0].service_list()?;
    t.agents[0].kill();
    all_ok(&t.connect(&format!("{}:30080", NODE_IPS[0]), &["--count", "10"])?);
    t.agents[0] = Agent::start_with(
        &t.lab,
        &t.bins,
        &t.nodes[0],
        &[
            "--node-name",
            "node1",
            "--tc-interfaces",
            "eth0",
            "--external-ip-cidrs",
            "192.0.2.0/24",
        ],
    )?;
    t.agents[0].wait_for_log("reconciled frontends=", Duration::from_secs(10))?;
    let log = t.agents[0].log_text();
    let first_pass = log
        .lines()
        .find(|l| l.contains("reconciled frontends="))
        .unwrap_or_default();
    assert!(first_pass.contains(" writes=0 "), "{log}");
    assert_eq!(t.agents[0].service_list()?, before);
    all_ok(&t.connect(&format!("{}:30080", NODE_IPS[0]), &["--count", "10"])?);
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

/// Upstream: network/service.go "should be able to preserve UDP traffic when
/// server pod cycles" (TCP analogue): established connections keep their
/// backend while other backends come and go, because conntrack is consulted
/// before Maglev.
#[test]
fn established_connections_survive_other_backends_changing() -> Result<()> {
    let mut t = two_nodes()?;
    let web3 = serve_web(&mut t.lab, &t.bins, &t.nodes[0], "web-3")?;
    t.web.push(web3);
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let held = hold_connections(&t, 8, 2500)?;
    std::thread::sleep(Duration::from_millis(700));
    t.publish("", &[(0, "node1"), (1, "node2"), (2, "node1")])?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    for child in held {
        let attempts = parse_attempts(&child.wait_with_output()?.stdout)?;
        all_ok(&attempts);
        assert_ne!(attempts[0].backend.as_deref(), Some("web-3"));
    }
    Ok(())
}

impl TwoNodes {
    /// Starts `labpod flood` from the outside client at `target`: spoofed
    /// SYNs and bare ACKs from 203.0.0.0/16 for `duration_ms`.
    fn start_flood(&self, target: &str, duration_ms: u64) -> Result<std::process::Child> {
        Ok(self
            .lab
            .command_in(&self.client, &self.bins.labpod)?
            .args([
                "flood",
                "--target",
                target,
                "--sources",
                "203.0.0.0/16",
                "--duration-ms",
                &duration_ms.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?)
    }
}

/// How many segments a flood sent, once it ends.
fn flood_sent(flood: std::process::Child) -> Result<f64> {
    let output = flood.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "the flood failed: {output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(report["sent"].as_f64().unwrap_or(0.0))
}

/// Holds `count` connections to the NodePorts (alternating nodes); each
/// answers once, waits `hold_ms`, then must echo a byte on the same backend.
fn hold_connections(t: &TwoNodes, count: usize, hold_ms: u64) -> Result<Vec<std::process::Child>> {
    (0..count)
        .map(|i| {
            let target = format!("{}:30080", NODE_IPS[i % 2]);
            t.lab
                .command_in(&t.client, &t.bins.labpod)?
                .args([
                    "connect",
                    "--target",
                    &target,
                    "--hold-ms",
                    &hold_ms.to_string(),
                    "--timeout-ms",
                    "3000",
                ])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// kube-proxy keeps the conntrack entries of a terminating endpoint, so a
/// rolling update does not reset long-lived connections (issue 22, item 3):
/// a NodePort connection whose pod starts terminating keeps working on that
/// pod while new connections go to the ready one, and ends only once the
/// endpoint leaves the slice.
#[test]
fn a_terminating_backend_keeps_its_connections_until_it_is_removed() -> Result<()> {
    let mut t = two_nodes()?;
    let web3 = serve_web(&mut t.lab, &t.bins, &t.nodes[0], "web-3")?;
    t.web.push(web3);
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let survivors = hold_connections(&t, 8, 2500)?;
    let ended = hold_connections(&t, 8, 6000)?;
    std::thread::sleep(Duration::from_millis(700));

    // Rolling update: web-1 and web-2 terminate, web-3 is ready.
    let (old1, old2, new) = (&t.web[0].ip, &t.web[1].ip, &t.web[2].ip);
    t.publish_endpoints(
        "",
        &[
            Endpoint::terminating(old1).on("node1"),
            Endpoint::terminating(old2).on("node2"),
            Endpoint::ready(new).on("node1"),
        ],
    )?;
    let fresh = t.connect(&format!("{}:30080", NODE_IPS[1]), &["--count", "4"])?;
    all_ok(&fresh);
    assert!(
        fresh.iter().all(|a| a.backend.as_deref() == Some("web-3")),
        "new connections go to the ready endpoint only: {fresh:?}"
    );
    for child in survivors {
        let attempts = parse_attempts(&child.wait_with_output()?.stdout)?;
        all_ok(&attempts);
        assert_ne!(attempts[0].backend.as_deref(), Some("web-3"));
    }

    // The terminating endpoints leave the slice: their connections end.
    t.publish_endpoints("", &[Endpoint::ready(new).on("node1")])?;
    for child in ended {
        let attempts = parse_attempts(&child.wait_with_output()?.stdout)?;
        assert!(
            attempts.iter().all(|a| !a.ok),
            "a connection outlived its endpoint: {attempts:?}"
        );
    }
    Ok(())
}

/// The value of `series` in the `/metrics` of the agent at `node_ip`, read
/// from the outside client.
fn agent_metric(t: &TwoNodes, node_ip: &str, series: &str) -> Result<f64> {
    let (_, metrics) = http_get(&t.client.netns, &format!("http://{node_ip}:10249/metrics"))?;
    metric_value(&metrics, series)
        .ok_or_else(|| anyhow::anyhow!("no {series} in /metrics:\n{metrics}"))
}

/// Hostile traffic from outside (issue 22, item 2): while the outside client
/// floods node1's NodePort with spoofed SYNs and bare ACKs, held
/// connections keep echoing on their backends and new connections, through
/// either backend (one of them SNATed to node2), get through. The ACKs open
/// no flow (`drop_no_connection`) and the SYNs stay in the table of
/// unconfirmed flows.
#[test]
fn a_spoofed_flood_breaks_no_connection_and_blocks_no_new_one() -> Result<()> {
    let t = two_nodes()?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let target = format!("{}:30080", NODE_IPS[0]);
    let held = hold_connections(&t, 4, 3500)?;
    std::thread::sleep(Duration::from_millis(300));
    let flood = t.start_flood(&target, 2500)?;
    std::thread::sleep(Duration::from_millis(500));
    let during = t.connect(&target, &["--count", "20"])?;
    let sent = flood_sent(flood)?;
    assert!(sent > 20_000.0, "the flood sent only {sent} segments");
    eprintln!("flood: {sent} spoofed segments in 2.5 s");
    all_ok(&during);
    let backends: BTreeSet<_> = during.iter().filter_map(|a| a.backend.clone()).collect();
    assert_eq!(backends.len(), 2, "both backends answer: {backends:?}");
    for child in held {
        all_ok(&parse_attempts(&child.wait_with_output()?.stdout)?);
    }
    let dropped = agent_metric(
        &t,
        NODE_IPS[0],
        "lb_tc_packets{outcome=\"drop_no_connection\"}",
    )?;
    assert!(dropped > 0.0, "no bare ACK was dropped");
    Ok(())
}

/// The XDP prefilter (issue 22): with `xdpPrefilter` on, a flood from a
/// denied prefix is dropped at the node's edge, counted, and never reaches
/// the tc programs (no bare ACK of it is seen there), while the outside
/// client, not denied, connects through the NodePort meanwhile.
#[test]
fn the_xdp_prefilter_drops_a_denied_flood_at_the_edge() -> Result<()> {
    let t = two_nodes_with(&[
        "--xdp-prefilter",
        "true",
        "--xdp-deny-cidrs",
        "203.0.0.0/16",
    ])?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let target = format!("{}:30080", NODE_IPS[0]);
    let flood = t.start_flood(&target, 1500)?;
    std::thread::sleep(Duration::from_millis(300));
    let during = t.connect(&target, &["--count", "10"])?;
    let sent = flood_sent(flood)?;
    all_ok(&during);
    let series = "lb_tc_packets{outcome=\"xdp_drop_denied\"}";
    let dropped = settled(|| agent_metric(&t, NODE_IPS[0], series))?;
    eprintln!("XDP prefilter: {dropped} of {sent} spoofed segments dropped at the edge");
    assert!(sent > 10_000.0, "the flood sent only {sent} segments");
    assert!(dropped >= 0.99 * sent, "{dropped} of {sent} dropped by XDP");
    let past_xdp = agent_metric(
        &t,
        NODE_IPS[0],
        "lb_tc_packets{outcome=\"drop_no_connection\"}",
    )?;
    assert_eq!(past_xdp, 0.0, "a denied segment reached the tc programs");
    Ok(())
}

/// A full Maglev map (issue 22, item 5): a Service with more external
/// addresses than fit gets the frontends that fit, the rest are reported per
/// frontend (`lb_frontend_not_programmed`), and a Service already
/// programmed still changes its backends, because new frontends leave room
/// for one table swap.
#[test]
fn a_full_maglev_map_refuses_new_frontends_and_keeps_the_others_changing() -> Result<()> {
    // Five tables of 251 slots and their size entries.
    let t = two_nodes_with(&["--maglev-table-size", "251", "--maglev-capacity", "1260"])?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let hog = service("hog", "10.96.0.20", &[("http", 80, "TCP", "8080")]).replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  externalIPs: [192.0.2.1, 192.0.2.2, 192.0.2.3]\n",
    );
    let hog = format!(
        "{hog}---\n{}",
        slice(
            "hog",
            "hog-a",
            &[("http", 8080, "TCP")],
            &[Endpoint::ready(&t.web[0].ip)]
        )
    );
    for agent in &t.agents {
        agent.write_manifest("hog.yaml", &hog)?;
        agent.wait_for_services(Duration::from_secs(10), |s| s.contains("192.0.2.2:80"))?;
    }
    let refused = "lb_frontend_not_programmed{frontend=\"default/hog:http\",map=\"Maglev table\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent_metric(&t, NODE_IPS[0], refused).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no frontend reported as not programmed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(agent_metric(&t, NODE_IPS[0], refused)?, 1.0);

    // The NodePort, programmed before, moves to one backend.
    t.publish("", &[(1, "node2")])?;
    let attempts = t.connect(&format!("{}:30080", NODE_IPS[0]), &["--count", "8"])?;
    all_ok(&attempts);
    assert!(
        attempts
            .iter()
            .all(|a| a.backend.as_deref() == Some("web-2")),
        "{attempts:?}"
    );
    Ok(())
}

/// Upstream: network/loadbalancer.go "should only allow access from service
/// loadbalancer source ranges": a LoadBalancer IP answers listed sources only.
#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() -> Result<()> {
    let t = two_nodes()?;
    // The load balancer (here: a route) sends 192.168.100.50 to node1.
    run(
        "ip",
        &[
            "-n",
            &t.client.netns,
            "route",
            "add",
            "192.168.100.50/32",
            "via",
            NODE_IPS[0],
        ],
    )?;
    let lb = |ranges: &str| {
        let svc = service("web", "10.96.0.10", &[("tcp", 80, "TCP", "8080")])
            .replace(
                "  type: ClusterIP\n",
                &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n"),
            )
            .replace(
                "    targetPort: 8080\n",
                "    targetPort: 8080\n    nodePort: 30081\n",
            );
        let eps = [
            Endpoint::ready(&t.web[0].ip).on("node1"),
            Endpoint::ready(&t.web[1].ip).on("node2"),
        ];
        format!(
            "{svc}status:\n  loadBalancer:\n    ingress: [{{ip: 192.168.100.50}}]\n---\n{}",
            slice("web", "web-a", &[("tcp", 8080, "TCP")], &eps)
        )
    };
    t.publish_text(
        &lb("192.168.100.200/32"),
        "192.168.100.50:80/TCP (external)",
    )?;
    let allowed = t.connect("192.168.100.50:80", &["--count", "10"])?;
    all_ok(&allowed);
    t.publish_text(&lb("10.0.0.0/8"), "192.168.100.50:80/TCP (external)")?;
    let blocked = t.connect(
        "192.168.100.50:80",
        &["--count", "2", "--timeout-ms", "500"],
    )?;
    assert!(blocked.iter().all(|a| !a.ok), "{blocked:?}");
    // node1 says whom it dropped and why: in its log and on /drops.
    t.agents[0].wait_for_log(
        "dropped: source address not in loadBalancerSourceRanges client=192.168.100.200:",
        Duration::from_secs(5),
    )?;
    let (status, body) = http_get(
        &t.client.netns,
        &format!("http://{}:10249/drops", NODE_IPS[0]),
    )?;
    assert_eq!(status, 200, "{body}");
    let drops: serde_json::Value = serde_json::from_str(&body)?;
    let ours: Vec<&serde_json::Value> = drops
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["reason"] == "drop_source_range")
        .collect();
    assert!(!ours.is_empty(), "{body}");
    for drop in ours {
        assert_eq!(drop["frontend"], "192.168.100.50:80", "{body}");
        assert_eq!(drop["service"], "default/web:tcp", "{body}");
        assert_eq!(drop["protocol"], "TCP", "{body}");
        assert!(
            drop["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{}:", t.client.ip))),
            "{body}"
        );
    }
    // lbctl asks the agent for the same reports and tabulates them.
    let agent = format!("{}:10249", NODE_IPS[0]);
    let table = t
        .lab
        .run_in(&t.client, &t.bins.lbctl, &["drops", "--agent", &agent])?;
    let table = String::from_utf8(table.stdout)?;
    assert!(table.starts_with("WHEN "), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("-> 192.168.100.50:80/TCP"))
        .collect();
    assert!(!rows.is_empty(), "{table}");
    assert!(
        rows.iter().all(|r| r.contains("default/web:tcp")
            && r.ends_with("dropped: source address not in loadBalancerSourceRanges")),
        "{table}"
    );
    Ok(())
}

/// Upstream: network/dual_stack.go "should function for service endpoints
/// using hostNetwork" family: NodePort over IPv6, from outside, reaching
/// backends on both nodes.
#[test]
fn node_port_works_over_ipv6() -> Result<()> {
    let t = two_nodes()?;
    let svc = service("web", "fd00:96::10", &[("tcp", 80, "TCP", "8080")])
        .replace(
            "  type: ClusterIP\n",
            "  type: NodePort\n  ipFamilies: [IPv6]\n",
        )
        .replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n    nodePort: 30082\n",
        );
    let eps = [
        Endpoint::ready(&t.web[0].ip6).on("node1"),
        Endpoint::ready(&t.web[1].ip6).on("node2"),
    ];
    let text = format!(
        "{svc}---\n{}",
        slice("web", "web-v6", &[("tcp", 8080, "TCP")], &eps)
    );
    t.publish_text(&text, ":30082/TCP (external)")?;
    let attempts = t.connect("[fd00:100::1]:30082", &["--count", "30"])?;
    all_ok(&attempts);
    assert_eq!(
        per_backend(&attempts).len(),
        2,
        "{:?}",
        per_backend(&attempts)
    );
    Ok(())
}

/// Writes `text` to a per-packet scenario's agent and waits until it lists
/// `frontend` and has taken the pod interfaces (within a second of its
/// loop; packets translated towards them skip the veth pairs' transmit
/// path).
fn apply_per_packet(
    s: &lb_e2e::scenario::Scenario,
    file: &str,
    text: &str,
    frontend: &str,
) -> Result<()> {
    s.apply(file, text, |t| t.contains(frontend))?;
    s.agent.wait_for_log(
        "packets to the pod interface are handed to its peer interface=p2 kind=veth",
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Pods whose sockets are not translated (the agent's socket path turned
/// off) reach ClusterIPs through the tc programs on their interfaces, with
/// the same backends and the pod's own address preserved; the node's own
/// processes, whose packets cross no pod interface, keep socket-level
/// translation.
#[test]
fn pods_without_socket_translation_reach_cluster_ips_per_packet() -> Result<()> {
    let s = lb_e2e::scenario::Scenario::new(2, &PER_PACKET_NODE1)?;
    s.wait_for_metric("lb_socket_path_scope 1", Duration::from_secs(5))?;
    let eps = [
        Endpoint::ready(s.ip(1)).on("node1"),
        Endpoint::ready(s.ip(2)).on("node1"),
    ];
    let text = format!(
        "{}---\n{}",
        service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")]),
        slice("web", "web-a", &[("http", 8080, "TCP")], &eps)
    );
    apply_per_packet(&s, "web.yaml", &text, "10.96.0.10:80/TCP (per packet)")?;
    let new_flows = r#"lb_tc_packets{outcome="new_flow"}"#;
    let before = s.metric(new_flows)?;
    let attempts = s.connect("10.96.0.10:80", 30, &[])?;
    all_ok(&attempts);
    assert_eq!(
        per_backend(&attempts).len(),
        2,
        "{:?}",
        per_backend(&attempts)
    );
    for a in &attempts {
        assert_eq!(a.peer.as_deref(), Some("10.96.0.10:80"));
        let seen = a.seen_source.as_deref().unwrap_or_default();
        assert!(seen.starts_with(&format!("{}:", s.client.ip)), "{seen}");
    }
    // The tc programs, not the socket programs, translated the pod's flows
    // (counters reach the metrics within a second).
    std::thread::sleep(Duration::from_millis(1500));
    let pod_flows = s.metric(new_flows)? - before;
    assert!(pod_flows >= 30.0, "{pod_flows} new flows on the tc path");

    let host = s.connect_from(&s.node, "10.96.0.10:80", &["--count", "10"])?;
    all_ok(&host);
    for a in &host {
        assert_eq!(a.peer.as_deref(), Some("10.96.0.10:80"), "{a:?}");
    }
    Ok(())
}

/// The per-packet ClusterIP path translates ICMP errors too: a pod without
/// socket translation sending to a ClusterIP whose backend has nothing on
/// the target port gets ECONNREFUSED at once (the backend's port
/// unreachable, translated on the backend's interface, handed to the
/// client pod as coming from the ClusterIP), not a timeout.
#[test]
fn a_closed_backend_port_refuses_udp_per_packet() -> Result<()> {
    let s = lb_e2e::scenario::Scenario::new(1, &PER_PACKET_NODE1)?;
    let eps = [Endpoint::ready(s.ip(1)).on("node1")];
    let text = format!(
        "{}---\n{}",
        service("closed", "10.96.0.12", &[("dns", 53, "UDP", "9")]),
        slice("closed", "closed-a", &[("dns", 9, "UDP")], &eps)
    );
    apply_per_packet(&s, "closed.yaml", &text, "10.96.0.12:53/UDP (per packet)")?;
    let started = std::time::Instant::now();
    let attempts = s.connect(
        "10.96.0.12:53",
        1,
        &["--proto", "udp", "--timeout-ms", "3000"],
    )?;
    assert_eq!(attempts[0].errno, Some(libc::ECONNREFUSED), "{attempts:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A pod annotated `lb.dev/socket-lb: disabled` is skipped by the socket
/// programs and served per packet on its interface, while the node's other
/// pods keep socket-level translation. Told apart by a Local Service without
/// local endpoints: the socket path fails at once (EHOSTUNREACH), the packet
/// path drops like kube-proxy.
#[test]
fn an_annotated_pod_opts_out_of_socket_translation() -> Result<()> {
    let mut s =
        lb_e2e::scenario::Scenario::new(2, &["--node-name", "node1", "--pod-interfaces", "p"])?;
    let node = s.node.clone();
    let other = s.lab.add_pod(&node, "other")?;
    let eps = [
        Endpoint::ready(s.ip(1)).on("node1"),
        Endpoint::ready(s.ip(2)).on("node1"),
    ];
    let remote = [Endpoint::ready(s.ip(1)).on("node2")];
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n  uid: client\n  annotations:\n    lb.dev/socket-lb: disabled\nspec:\n  nodeName: node1\n  containers: [{name: c, image: none}]\n";
    let text = [
        service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")]),
        slice("web", "web-a", &[("http", 8080, "TCP")], &eps),
        service("local", "10.96.0.11", &[("http", 80, "TCP", "8080")]).replace(
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  internalTrafficPolicy: Local\n",
        ),
        slice("local", "local-a", &[("http", 8080, "TCP")], &remote),
        pod.to_string(),
    ]
    .join("---\n");
    s.apply("all.yaml", &text, |t| {
        t.contains("10.96.0.10:80/TCP (per packet)")
    })?;
    s.agent.wait_for_log(
        "cgroups opted out of socket translation cgroups=1",
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(1500));

    let served = s.connect("10.96.0.10:80", 20, &[])?;
    all_ok(&served);
    assert_eq!(per_backend(&served).len(), 2);
    assert!(served
        .iter()
        .all(|a| a.peer.as_deref() == Some("10.96.0.10:80")));

    let dropped = s.connect("10.96.0.11:80", 1, &["--timeout-ms", "500"])?;
    assert!(!dropped[0].ok);
    assert_ne!(
        dropped[0].errno,
        Some(libc::EHOSTUNREACH),
        "the socket hook ran: {dropped:?}"
    );
    let refused = s.connect_from(&other, "10.96.0.11:80", &["--count", "1"])?;
    assert_eq!(refused[0].errno, Some(libc::EHOSTUNREACH), "{refused:?}");
    Ok(())
}

/// Upstream: network/service.go "should have session affinity work for
/// NodePort service" and "should have session affinity work for service with
/// type clusterIP", on the packet path: every connection of a client lands
/// on one backend (Maglev alone would spread its source ports), through a
/// NodePort from outside and through a ClusterIP from a pod without socket
/// translation; without affinity the same client is spread again.
#[test]
fn session_affinity_holds_on_the_packet_path() -> Result<()> {
    let t = two_nodes()?;
    let sticky = "  sessionAffinity: ClientIP\n";
    t.publish(sticky, &[(0, "node1"), (1, "node2")])?;
    for node_ip in NODE_IPS {
        let tcp = t.connect(&format!("{node_ip}:30080"), &["--count", "30"])?;
        all_ok(&tcp);
        assert_eq!(per_backend(&tcp).len(), 1, "via {node_ip}");
    }
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let spread = t.connect(&format!("{}:30080", NODE_IPS[0]), &["--count", "30"])?;
    all_ok(&spread);
    assert_eq!(per_backend(&spread).len(), 2);
    drop(t);

    let s = lb_e2e::scenario::Scenario::new(3, &PER_PACKET_NODE1)?;
    let eps: Vec<Endpoint> = (1..=3)
        .map(|i| Endpoint::ready(s.ip(i)).on("node1"))
        .collect();
    let endpoints = slice("web", "web-a", &[("http", 8080, "TCP")], &eps);
    let web = |extra: &str| {
        let svc = service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")]).replace(
            "  type: ClusterIP\n",
            &format!("  type: ClusterIP\n{extra}"),
        );
        format!("{svc}---\n{endpoints}")
    };
    s.apply("web.yaml", &web(sticky), |t| {
        t.contains("(affinity 10800s)")
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let pinned = s.connect("10.96.0.10:80", 30, &[])?;
    all_ok(&pinned);
    assert_eq!(per_backend(&pinned).len(), 1, "{:?}", per_backend(&pinned));
    s.apply("web.yaml", &web(""), |t| !t.contains("affinity"))?;
    let spread = s.connect("10.96.0.10:80", 30, &[])?;
    all_ok(&spread);
    assert_eq!(per_backend(&spread).len(), 3, "{:?}", per_backend(&spread));
    Ok(())
}

/// Upstream: network/service.go "should be rejected when no endpoints
/// exist" through a NodePort: the external client is refused at once, over
/// TCP by a reset and over UDP by an ICMP port unreachable, never left to
/// time out.
#[test]
fn node_port_without_endpoints_refuses_tcp_and_udp() -> Result<()> {
    let t = two_nodes()?;
    t.publish("", &[])?;
    let target = format!("{}:30080", NODE_IPS[0]);
    for proto in ["tcp", "udp"] {
        t.assert_refused_at_once(&target, proto)?;
    }
    Ok(())
}

/// ICMP errors about translated flows are translated too, as kube-proxy's
/// conntrack does for RELATED packets: a datagram to a NodePort whose
/// backend has nothing listening on the target port draws the backend's
/// port unreachable, which must reach the client's connected socket as
/// coming from the NodePort (ECONNREFUSED at once, not a timeout): from a
/// backend on the same node, and from one on the other node through SNAT;
/// over IPv4 and IPv6.
#[test]
fn a_closed_backend_port_refuses_udp_through_the_node_port() -> Result<()> {
    let t = two_nodes()?;
    for (cluster_ip, family, node_port, backend, node_ips) in [
        (
            "10.96.0.11",
            "IPv4",
            30084,
            t.web[1].ip.clone(),
            ["192.168.100.1", "192.168.100.2"].map(String::from),
        ),
        (
            "fd00:96::11",
            "IPv6",
            30085,
            t.web[1].ip6.clone(),
            ["[fd00:100::1]", "[fd00:100::2]"].map(String::from),
        ),
    ] {
        // Port 9 of the backend pod: nothing listens there.
        let svc = service("closed", cluster_ip, &[("udp", 80, "UDP", "9")])
            .replace(
                "  type: ClusterIP\n",
                &format!("  type: NodePort\n  ipFamilies: [{family}]\n"),
            )
            .replace(
                "    targetPort: 9\n",
                &format!("    targetPort: 9\n    nodePort: {node_port}\n"),
            );
        let eps = [Endpoint::ready(&backend).on("node2")];
        let text = format!(
            "{svc}---\n{}",
            slice("closed", "closed-a", &[("udp", 9, "UDP")], &eps)
        );
        t.publish_text(&text, &format!(":{node_port}/UDP (external)"))?;
        // Through node1 the backend is remote (SNAT), through node2 local.
        for node_ip in &node_ips {
            t.assert_refused_at_once(&format!("{node_ip}:{node_port}"), "udp")?;
        }
    }
    // Each node translated errors: node1 the remote backend's (on its
    // uplink's ingress), node2 its local backend's (on the uplink's egress).
    for node_ip in NODE_IPS {
        t.wait_for_translated_icmp_errors(node_ip)?;
    }
    Ok(())
}

/// Path MTU discovery through a NodePort: the client is a routed hop away
/// over a 1,280-byte link, the backend sends full-size segments, and the
/// router's "fragmentation needed" about them (sent to the node address
/// they left from) must reach the backend, translated, or the transfer
/// stalls: the black hole conntrack's RELATED NAT avoids under kube-proxy.
#[test]
fn path_mtu_discovery_works_through_a_node_port() -> Result<()> {
    let mut t = two_nodes()?;
    let far = t.lab.add_routed_client("far", 1280)?;
    t.lab.spawn_in(
        &t.web[0],
        "iperf3",
        &["-s", "-p", "5201", "--forceflush"],
        "Server listening",
    )?;
    let svc = service("bulk", "10.96.0.13", &[("iperf", 5201, "TCP", "5201")])
        .replace("  type: ClusterIP\n", "  type: NodePort\n")
        .replace(
            "    targetPort: 5201\n",
            "    targetPort: 5201\n    nodePort: 30086\n",
        );
    let eps = [Endpoint::ready(&t.web[0].ip).on("node1")];
    let text = format!(
        "{svc}---\n{}",
        slice("bulk", "bulk-a", &[("iperf", 5201, "TCP")], &eps)
    );
    t.publish_text(&text, ":30086/TCP (external)")?;
    // The server sends (-R) for 2 s; a stalled transfer still ends on time
    // through the control connection, whose messages are small.
    let output = t
        .lab
        .command_in(&far, "timeout")?
        .args([
            "30",
            "iperf3",
            "-c",
            NODE_IPS[0],
            "-p",
            "30086",
            "-R",
            "-t",
            "2",
            "-J",
        ])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| anyhow::anyhow!("iperf3 output ({e}): {output:?}"))?;
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        received > 10_000_000,
        "only {received} bytes arrived over the 1,280-byte hop: {report}"
    );
    t.wait_for_translated_icmp_errors(NODE_IPS[0])
}

/// UDP datagrams larger than the MTU reach a NodePort backend on the other
/// node: the sender fragments them, the later fragments (no UDP header)
/// follow the first one's translation, and the backend reassembles them.
#[test]
fn fragmented_udp_datagrams_reach_node_port_backends() -> Result<()> {
    let t = two_nodes()?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    for node_ip in NODE_IPS {
        let udp = t.connect(
            &format!("{node_ip}:30080"),
            &["--proto", "udp", "--count", "10", "--udp-size", "4000"],
        )?;
        all_ok(&udp);
        assert_eq!(per_backend(&udp).len(), 2, "via {node_ip}");
    }
    Ok(())
}

/// A pod without socket translation reaches a ClusterIP whose backend runs on
/// another node. The flow is translated as it leaves the pod and its replies
/// as they enter the pod (where policy sees them as the backend sent them),
/// not where they enter the node, so pod interfaces carry both pod programs.
#[test]
fn per_packet_cluster_ip_reaches_a_backend_on_another_node() -> Result<()> {
    require_root();
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let node1 = lab.add_node("node1")?;
    let node2 = lab.add_node("node2")?;
    let web = lab.add_pod(&node2, "web")?;
    lab.spawn_server(
        &web,
        &bins.labpod,
        &["serve", "--name", &web.name, "--tcp", "8080"],
    )?;
    let client = lab.add_pod(&node1, "client")?;
    let args = [&PER_PACKET_NODE1[..], &["--tc-interfaces", "eth0"]].concat();
    let agent = Agent::start_with(&lab, &bins, &node1, &args)?;
    let text = format!(
        "{}---\n{}",
        service("web", "10.96.0.10", &[("http", 80, "TCP", "8080")]),
        slice(
            "web",
            "web-a",
            &[("http", 8080, "TCP")],
            &[Endpoint::ready(&web.ip).on("node2")]
        )
    );
    agent.write_manifest("web.yaml", &text)?;
    agent.wait_for_services(Duration::from_secs(10), |t| {
        t.contains("10.96.0.10:80/TCP (per packet)")
    })?;
    agent.wait_for_log("pod programs attached", Duration::from_secs(5))?;
    let links: Vec<String> = std::fs::read_dir(node1.bpffs.join("links"))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    let pod_link = |hook: &str| {
        links
            .iter()
            .any(|l| l.starts_with("tc_p") && l.ends_with(hook))
    };
    assert!(pod_link("lb_pod_ingress"), "{links:?}");
    assert!(pod_link("lb_pod_egress"), "{links:?}");
    let output = lab.run_in(
        &client,
        &bins.labpod,
        &["connect", "--target", "10.96.0.10:80", "--count", "20"],
    )?;
    let attempts = parse_attempts(&output.stdout)?;
    all_ok(&attempts);
    for a in &attempts {
        assert_eq!(a.peer.as_deref(), Some("10.96.0.10:80"));
        assert_eq!(a.backend.as_deref(), Some(web.name.as_str()));
    }
    Ok(())
}

/// Upstream: network/service.go "should be able to create a functioning
/// NodePort service" reaches the NodePort from a pod too, and kube-proxy
/// serves this node's own clients (pods and host processes) on its NodePorts
/// and ExternalIPs with every endpoint, whatever externalTrafficPolicy says.
/// Here the only endpoint is on node2 and the policy is Local: from node1's
/// pod and from node1's host, node1's NodePort and the ExternalIP still
/// answer (translated at the socket, the peer shown as the address dialled),
/// over TCP and UDP.
#[test]
fn this_nodes_clients_reach_its_node_ports_and_external_ips() -> Result<()> {
    let t = two_nodes()?;
    t.publish(
        "  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.50]\n",
        &[(1, "node2")],
    )?;
    let pod: &dyn lb_e2e::lab::Place = &t.web[0];
    let host: &dyn lb_e2e::lab::Place = &t.nodes[0];
    for (who, place) in [("pod", pod), ("host", host)] {
        for target in [
            format!("{}:30080", NODE_IPS[0]),
            "192.0.2.50:80".to_string(),
        ] {
            for proto in ["tcp", "udp"] {
                let output = t.lab.run_in(
                    place,
                    &t.bins.labpod,
                    &[
                        "connect", "--target", &target, "--proto", proto, "--count", "4",
                    ],
                )?;
                let attempts = parse_attempts(&output.stdout)?;
                all_ok(&attempts);
                for a in &attempts {
                    assert_eq!(
                        a.backend.as_deref(),
                        Some("web-2"),
                        "{who} {target} {proto}"
                    );
                    assert_eq!(a.peer.as_deref(), Some(target.as_str()), "{who} {proto}");
                }
            }
        }
    }
    Ok(())
}

/// As with kube-proxy's iptables mode, the node's own processes reach
/// NodePorts on 127.0.0.0/8 (TCP and UDP, seeing the address they asked for
/// as the peer), while in a pod 127.0.0.1 stays the pod's own loopback.
#[test]
fn the_nodes_processes_reach_node_ports_on_localhost_and_pods_keep_their_loopback() -> Result<()> {
    let t = two_nodes()?;
    t.publish("", &[(0, "node1"), (1, "node2")])?;
    let (_, metrics) = http_get(
        &t.client.netns,
        &format!("http://{}:10249/metrics", NODE_IPS[0]),
    )?;
    assert!(
        metrics.lines().any(|l| l == "lb_localhost_node_ports 1"),
        "{metrics}"
    );
    let host: &dyn lb_e2e::lab::Place = &t.nodes[0];
    for target in ["127.0.0.1:30080", "127.0.0.2:30080"] {
        for proto in ["tcp", "udp"] {
            let output = t.lab.run_in(
                host,
                &t.bins.labpod,
                &[
                    "connect", "--target", target, "--proto", proto, "--count", "8",
                ],
            )?;
            let attempts = parse_attempts(&output.stdout)?;
            all_ok(&attempts);
            for a in &attempts {
                assert!(
                    matches!(a.backend.as_deref(), Some("web-1" | "web-2")),
                    "{target} {proto}: {a:?}"
                );
                assert_eq!(a.peer.as_deref(), Some(target), "{proto}");
            }
        }
    }
    let pod = &t.web[0];
    t.lab.spawn_in(
        pod,
        &t.bins.labpod,
        &[
            "serve",
            "--name",
            "web-1-loopback",
            "--bind",
            "127.0.0.1",
            "--tcp",
            "30080",
            "--udp",
            "30080",
        ],
        "ready",
    )?;
    for proto in ["tcp", "udp"] {
        let output = t.lab.run_in(
            pod,
            &t.bins.labpod,
            &[
                "connect",
                "--target",
                "127.0.0.1:30080",
                "--proto",
                proto,
                "--count",
                "4",
            ],
        )?;
        let attempts = parse_attempts(&output.stdout)?;
        all_ok(&attempts);
        for a in &attempts {
            assert_eq!(a.backend.as_deref(), Some("web-1-loopback"), "{proto}");
        }
    }
    Ok(())
}

/// CVE-2020-8554: whoever may create a Service must not capture traffic to
/// an address outside the ranges the operator allows for externalIPs (the
/// lab allows 192.0.2.0/24): such an address is reported and served
/// neither to pods and host processes nor from outside. (Loopback and other
/// special addresses are refused by the YAML source's admission, and by the
/// compiler for objects from the API: unit tests.)
#[test]
fn an_external_ip_outside_the_allowed_ranges_is_not_served() -> Result<()> {
    let t = two_nodes()?;
    t.publish(
        "  externalIPs: [192.0.2.50, 198.51.100.77]\n",
        &[(0, "node1"), (1, "node2")],
    )?;
    for agent in &t.agents {
        agent.wait_for_log(
            "object=Service default/web field=spec.externalIPs[1] reason=198.51.100.77 is outside externalIPCIDRs",
            Duration::from_secs(5),
        )?;
        let table = agent.service_list()?;
        assert!(table.contains("192.0.2.50:80"), "{table}");
        assert!(!table.contains("198.51.100.77"), "{table}");
    }
    // From a pod of the node: the allowed address is translated, the other
    // is left to the network (no backend answers it).
    let connect = |target: &str| -> Result<Vec<Attempt>> {
        let output = t.lab.run_in(
            &t.web[0],
            &t.bins.labpod,
            &[
                "connect",
                "--target",
                target,
                "--count",
                "3",
                "--timeout-ms",
                "300",
            ],
        )?;
        parse_attempts(&output.stdout)
    };
    all_ok(&connect("192.0.2.50:80")?);
    let captured = connect("198.51.100.77:80")?;
    assert!(
        captured.iter().all(|a| !a.ok && a.backend.is_none()),
        "{captured:?}"
    );
    Ok(())
}
