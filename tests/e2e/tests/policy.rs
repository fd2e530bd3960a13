//! NetworkPolicy in the real datapath: the attacker's tests (spoofed
//! sources, IPv6, the socket path, NodePorts, a restart window) and the
//! behaviours of enforcement that the upstream cases (tests/netpol.rs) do
//! not show: verdicts through a ClusterIP and the pod IP alike, established
//! connections cut when an allow is removed, policy kept while the agent is
//! away, and the explanations (`lbctl`, drop reports, metrics).
//!
//! One node (`node1`) whose agent reads a manifest directory with Pods
//! (their status says where they run and their addresses), Services,
//! EndpointSlices and NetworkPolicies, as a user's YAML would.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_e2e::{
    lab::{run, Pod},
    manifests::{endpoint_slice, service},
    probe::Attempt,
    scenario::{Scenario, SERVER_ARGS},
};

const VIP: &str = "10.96.0.10";

/// A Pod object for a lab pod: labels, this node, its addresses, and the
/// container ports the servers listen on (named).
fn pod_yaml(pod: &Pod, labels: &[(&str, &str)]) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: uid-{name}\n  labels:\n{labels}spec:\n  nodeName: node1\n  containers:\n  - name: main\n    image: labpod\n    ports:\n    - name: http\n      containerPort: 8080\n    - name: admin\n      containerPort: 9090\n    - name: dns\n      containerPort: 8080\n      protocol: UDP\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  - ip: {ip6}\n",
        name = pod.name,
        ip = pod.ip,
        ip6 = pod.ip6,
    )
}

/// A lab with web-1 and web-2 (app=web), the client (app=client) and an
/// intruder (app=intruder) on node1, all known to the agent as Pods, and
/// Service `web` (10.96.0.10:80 -> 8080) in front of the web pods.
struct PolicyLab {
    s: Scenario,
    intruder: Pod,
}

impl PolicyLab {
    fn new(agent_args: &[&str]) -> Result<Self> {
        let mut args = vec!["--node-name", "node1"];
        args.extend(agent_args);
        let mut s = Scenario::new(2, &args)?;
        let intruder = s.lab.add_pod(&s.node, "intruder")?;
        for pod in [&s.client, &intruder] {
            let mut serve = vec!["serve", "--name", pod.name.as_str()];
            serve.extend(SERVER_ARGS);
            s.lab.spawn_server(pod, &s.bins.labpod, &serve)?;
        }
        let lab = Self { s, intruder };
        let mut objects = vec![
            pod_yaml(&lab.s.servers[0], &[("app", "web")]),
            pod_yaml(&lab.s.servers[1], &[("app", "web")]),
            pod_yaml(&lab.s.client, &[("app", "client")]),
            pod_yaml(&lab.intruder, &[("app", "intruder")]),
            service("web", VIP, &[("http", 80, "TCP", "8080")]),
        ];
        objects.push(endpoint_slice(
            "web",
            "web-1",
            ("http", 8080, "TCP"),
            &[lab.s.ip(1), lab.s.ip(2)],
        ));
        lab.s.apply("objects.yaml", &objects.join("---\n"), |t| {
            t.contains("10.96.0.10:80")
        })?;
        lab.wait_for_endpoints(4)?;
        Ok(lab)
    }

    /// Waits until the policy maps hold `count` endpoints of this node with
    /// their interfaces found (each pod has two addresses).
    fn wait_for_endpoints(&self, count: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = self.s.metrics()?;
            let value = |name: &str| {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            };
            if value("lb_policy_endpoints") == Some(2.0 * count as f64)
                && value("lb_policy_endpoints_without_interface") == Some(0.0)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent never programmed {count} endpoints:\n{}",
                    self.s.agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Applies NetworkPolicies and waits until the agent programmed them.
    fn policies(&self, yaml: &str) -> Result<()> {
        let before = self.revision()?;
        self.s.agent.write_manifest("policies.yaml", yaml)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.revision()? == before {
            if Instant::now() > deadline {
                bail!(
                    "the policy revision never moved:\n{}",
                    self.s.agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn revision(&self) -> Result<f64> {
        self.s.metric("lb_policy_revision")
    }

    /// One TCP connection (or UDP exchange) from `from` to `target`, with a
    /// short timeout: denied flows are dropped.
    fn attempt(&self, from: &Pod, target: &str, proto: &str) -> Result<Attempt> {
        let attempts =
            self.s
                .connect_from(from, target, &["--proto", proto, "--timeout-ms", "400"])?;
        Ok(attempts.into_iter().next().unwrap_or_default())
    }

    /// `lbctl policy trace`: whether this node's maps allow the flow.
    fn trace(&self, from: &str, to: &str) -> Result<(bool, String)> {
        let output = Command::new(&self.s.bins.lbctl)
            .arg("--bpffs-dir")
            .arg(&self.s.node.bpffs)
            .args(["policy", "trace", "--from", from, "--to", to])
            .output()?;
        let text = String::from_utf8(output.stdout)?;
        Ok((output.status.success(), text))
    }
}

/// Only the client may reach the web pods, on TCP 8080.
const WEB_FROM_CLIENT: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-client
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - port: http
";

#[test]
fn ingress_policy_gives_the_same_verdict_through_a_cluster_ip_and_the_pod_ip() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    let s = &lab.s;
    let web1 = format!("{}:8080", s.ip(1));
    let web1_v6 = format!("[{}]:8080", s.ip6(1));
    // Before any policy, everyone reaches everything.
    for target in [web1.as_str(), "10.96.0.10:80", web1_v6.as_str()] {
        assert!(lab.attempt(&lab.intruder, target, "tcp")?.ok, "{target}");
    }
    lab.policies(WEB_FROM_CLIENT)?;
    for target in [web1.as_str(), "10.96.0.10:80", web1_v6.as_str()] {
        assert!(
            lab.attempt(&s.client, target, "tcp")?.ok,
            "client -> {target}"
        );
        let denied = lab.attempt(&lab.intruder, target, "tcp")?;
        assert!(!denied.ok, "intruder -> {target}: {denied:?}");
    }
    // Other ports and protocols of the isolated pods are closed to all.
    assert!(
        !lab.attempt(&s.client, &format!("{}:9090", s.ip(1)), "tcp")?
            .ok
    );
    assert!(!lab.attempt(&s.client, &web1, "udp")?.ok);
    // The client itself is not isolated: the intruder reaches it.
    let client_port = format!("{}:8080", s.client.ip);
    assert!(lab.attempt(&lab.intruder, &client_port, "tcp")?.ok);

    // The explanations agree.
    let (allowed, text) = lab.trace("default/client", "default/web-1:8080/tcp")?;
    assert!(allowed, "{text}");
    assert!(
        text.contains("allowed by default/web-from-client ingress[0]"),
        "{text}"
    );
    let (allowed, text) = lab.trace("default/intruder", "default/web-1:8080/tcp")?;
    assert!(!allowed && text.starts_with("denied"), "{text}");
    let drops = s.agent.log_text();
    assert!(
        drops.contains("policy_denied_ingress"),
        "no drop report in the log:\n{drops}"
    );
    assert!(s.metric("lb_tc_packets{outcome=\"policy_denied_ingress\"}")? >= 3.0);
    Ok(())
}
