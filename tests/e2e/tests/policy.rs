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
    manifests::{endpoint_slice, pod_object, service, slice, Endpoint},
    probe::Attempt,
    scenario::{Scenario, SERVER_ARGS},
};

const VIP: &str = "10.96.0.10";

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
            pod_object(&lab.s.servers[0], &[("app", "web")]),
            pod_object(&lab.s.servers[1], &[("app", "web")]),
            pod_object(&lab.s.client, &[("app", "client")]),
            pod_object(&lab.intruder, &[("app", "intruder")]),
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
        let passes = || self.s.agent.log_text().matches("policy reconciled").count();
        let before = passes();
        self.s.agent.write_manifest("policies.yaml", yaml)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while passes() == before {
            if Instant::now() > deadline {
                bail!(
                    "the agent never reconciled the policies:\n{}",
                    self.s.agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
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
    // Checked for both pods where they left the client, the allowed
    // packets were handed straight to the server's side of its interface.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s
        .metric("lb_tc_packets{outcome=\"fib_redirect\"}")
        .unwrap_or(0.0)
        == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "no packet between the pods was redirected:\n{}",
            s.metrics()?
        );
        std::thread::sleep(Duration::from_millis(200));
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

/// The web pods accept no one.
const WEB_FROM_NOBODY: &str = "apiVersion: networking.k8s.io/v1
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
          app: nobody
";

/// Runs `run` on a thread; its result when it is joined.
fn background<T: Send + 'static>(
    run: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(run)
}

/// `labpod connect` from `from` with `args`, on a thread of its own.
fn connect_in_background(
    lab: &PolicyLab,
    from: &Pod,
    target: &str,
    args: &[&str],
) -> Result<thread::JoinHandle<Result<Vec<Attempt>>>> {
    let mut command = lab.s.lab.command_in(from, &lab.s.bins.labpod)?;
    command.args(["connect", "--target", target]).args(args);
    Ok(background(move || {
        let output = command.output()?;
        lb_e2e::probe::parse_attempts(&output.stdout)
    }))
}

/// Removing an allow cuts a connection that was established under it at
/// its next packet (the flow is checked again after the revision bump),
/// while a change that keeps it allowed does not disturb it.
#[test]
fn removing_an_allow_cuts_established_connections_and_keeping_it_does_not() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    lab.policies(WEB_FROM_CLIENT)?;
    let target = format!("{}:8080", lab.s.ip(1));
    let held = ["--hold-ms", "1500", "--timeout-ms", "700"];

    // A change that keeps the client allowed: the held connection lives.
    let kept = connect_in_background(&lab, &lab.s.client, &target, &held)?;
    thread::sleep(Duration::from_millis(400));
    lab.policies(&format!(
        "{WEB_FROM_CLIENT}---\n{}",
        WEB_FROM_CLIENT
            .replace("name: web-from-client", "name: web-from-intruder")
            .replace("app: client", "app: intruder")
    ))?;
    let kept = kept.join().expect("no panic")?;
    assert!(
        kept[0].ok,
        "a still-allowed connection was disturbed: {kept:?}"
    );

    // The allow goes: the held connection is cut.
    lab.policies(WEB_FROM_CLIENT)?;
    let cut = connect_in_background(&lab, &lab.s.client, &target, &held)?;
    thread::sleep(Duration::from_millis(400));
    lab.policies(WEB_FROM_NOBODY)?;
    let cut = cut.join().expect("no panic")?;
    assert!(!cut[0].ok, "the connection outlived its allow: {cut:?}");
    assert!(!lab.attempt(&lab.s.client, &target, "tcp")?.ok);
    Ok(())
}

/// Replaces `pod`'s source address by `stolen` for everything it sends.
fn steal_address(pod: &Pod, stolen: &str, v6: bool) -> Result<()> {
    let in_pod = |args: &[&str]| {
        let mut all = vec!["netns", "exec", pod.netns.as_str(), "ip"];
        all.extend(args);
        run("ip", &all).map(|_| ())
    };
    if v6 {
        in_pod(&[
            "addr",
            "add",
            &format!("{stolen}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        in_pod(&[
            "-6", "route", "replace", "::/0", "via", "fe80::1", "dev", "eth0", "src", stolen,
        ])
    } else {
        in_pod(&["addr", "add", &format!("{stolen}/32"), "dev", "eth0"])?;
        in_pod(&[
            "route",
            "replace",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "src",
            stolen,
        ])
    }
}

/// The attacker's test: a pod that sends with another pod's address (to
/// borrow its identity and its allows) is dropped at its own interface,
/// over IPv4 and IPv6, counted and reported as spoofed.
#[test]
fn a_pod_cannot_borrow_another_pods_address() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    lab.policies(WEB_FROM_CLIENT)?;
    let s = &lab.s;
    let before = s.metric("lb_tc_packets{outcome=\"policy_spoofed_source\"}")?;
    steal_address(&lab.intruder, &s.client.ip, false)?;
    steal_address(&lab.intruder, &s.client.ip6, true)?;
    for target in [
        format!("{}:8080", s.ip(1)),
        format!("[{}]:8080", s.ip6(1)),
        "10.96.0.10:80".to_string(),
    ] {
        let attempt = lab.attempt(&lab.intruder, &target, "tcp")?;
        assert!(
            !attempt.ok,
            "a spoofed connection to {target} went through: {attempt:?}"
        );
    }
    assert!(
        !lab.attempt(&lab.intruder, &format!("{}:8080", s.ip(1)), "udp")?
            .ok
    );
    let after = s.metric("lb_tc_packets{outcome=\"policy_spoofed_source\"}")?;
    assert!(after >= before + 3.0, "spoofed drops {before} -> {after}");
    // Nor can a pod forge the mark that spares a checked packet the second
    // check: the mark is cleared as the packet leaves the pod's namespace.
    let forged = [
        "netns",
        "exec",
        &lab.intruder.netns,
        "iptables",
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-j",
        "MARK",
        "--set-mark",
        "0x10",
    ];
    run("ip", &forged)?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.intruder.netns,
            "ip",
            "route",
            "replace",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "src",
            &lab.intruder.ip,
        ],
    )?;
    let marked = lab.attempt(&lab.intruder, &format!("{}:8080", s.ip(1)), "tcp")?;
    assert!(!marked.ok, "a forged mark got through: {marked:?}");
    // The real client is unaffected.
    assert!(
        lab.attempt(&s.client, &format!("{}:8080", s.ip(1)), "tcp")?
            .ok
    );
    Ok(())
}

/// IPv6 is enforced exactly as IPv4: the same policy, the same verdicts.
#[test]
fn ipv6_flows_get_the_verdicts_of_ipv4_flows() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    lab.policies(WEB_FROM_CLIENT)?;
    let s = &lab.s;
    for (from, ok) in [(&s.client, true), (&lab.intruder, false)] {
        for (target, proto) in [
            (format!("{}:8080", s.ip(2)), "tcp"),
            (format!("[{}]:8080", s.ip6(2)), "tcp"),
            (format!("{}:9090", s.ip(2)), "tcp"),
            (format!("[{}]:9090", s.ip6(2)), "tcp"),
            (format!("{}:8080", s.ip(2)), "udp"),
            (format!("[{}]:8080", s.ip6(2)), "udp"),
        ] {
            let allowed = ok && proto == "tcp" && target.ends_with(":8080");
            let attempt = lab.attempt(from, &target, proto)?;
            assert_eq!(
                attempt.ok, allowed,
                "{} -> {target}/{proto}: {attempt:?}",
                from.name
            );
        }
    }
    let (allowed, text) = lab.trace("default/client", &format!("[{}]:8080/tcp", s.ip6(2)))?;
    assert!(allowed, "{text}");
    Ok(())
}

/// Pods whose sockets are not translated (here the whole node: socketLb
/// false, ClusterIPs translated per packet on the pods' interfaces) get the
/// verdicts of the socket path.
#[test]
fn per_packet_translation_gets_the_verdicts_of_the_socket_path() -> Result<()> {
    let lab = PolicyLab::new(&["--socket-lb", "false"])?;
    lab.policies(WEB_FROM_CLIENT)?;
    for _ in 0..5 {
        assert!(lab.attempt(&lab.s.client, "10.96.0.10:80", "tcp")?.ok);
        assert!(!lab.attempt(&lab.intruder, "10.96.0.10:80", "tcp")?.ok);
    }
    Ok(())
}

/// Traffic from the node itself reaches isolated pods (kubelet probes), and
/// NodePort traffic from outside is checked after DNAT against the backend's
/// ingress policy, with the client's address: an ipBlock can allow it.
#[test]
fn the_node_reaches_isolated_pods_and_nodeports_are_checked_after_dnat() -> Result<()> {
    let mut lab = PolicyLab::new(&["--tc-interfaces", "eth0"])?;
    let outside = lab.s.lab.add_external_client("outside")?;
    let node_port = service("web", VIP, &[("http", 80, "TCP", "8080")])
        .replace("  type: ClusterIP\n", "  type: NodePort\n")
        .replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n    nodePort: 30080\n",
        );
    let objects = [
        pod_object(&lab.s.servers[0], &[("app", "web")]),
        pod_object(&lab.s.servers[1], &[("app", "web")]),
        pod_object(&lab.s.client, &[("app", "client")]),
        pod_object(&lab.intruder, &[("app", "intruder")]),
        node_port,
        // Local backends (nodeName): the NodePort does not masquerade.
        slice(
            "web",
            "web-1",
            &[("http", 8080, "TCP")],
            &[
                Endpoint::ready(lab.s.ip(1)).on("node1"),
                Endpoint::ready(lab.s.ip(2)).on("node1"),
            ],
        ),
    ];
    lab.s.apply("objects.yaml", &objects.join("---\n"), |t| {
        t.contains(":30080")
    })?;
    lab.policies(WEB_FROM_CLIENT)?;
    let node_port_target = format!("{}:30080", lab.s.node.ip);
    // From the node's own network namespace: allowed (the node itself).
    let from_node = lab.s.connect_from(
        &lab.s.node,
        &format!("{}:8080", lab.s.ip(1)),
        &["--timeout-ms", "400"],
    )?;
    assert!(from_node[0].ok, "{from_node:?}");
    // From outside through the NodePort: denied, then allowed by an ipBlock.
    assert!(!lab.attempt(&outside, &node_port_target, "tcp")?.ok);
    let from_outside = format!(
        "{WEB_FROM_CLIENT}    - ipBlock:\n        cidr: 192.168.100.0/24\n        except:\n        - 192.168.100.0/30\n"
    );
    let from_outside = from_outside.replace(
        "    - podSelector:\n        matchLabels:\n          app: client\n    ports:\n    - port: http\n    - ipBlock:",
        "    - podSelector:\n        matchLabels:\n          app: client\n    - ipBlock:",
    );
    lab.policies(&from_outside)?;
    for _ in 0..5 {
        let attempt = lab.attempt(&outside, &node_port_target, "tcp")?;
        let trace = lab.trace("192.168.100.200", "default/web-1:8080/tcp")?;
        assert!(
            attempt.ok,
            "{attempt:?}\n{from_outside}\n{trace:?}\n{}",
            lab.s.agent.log_text()
        );
    }
    assert!(!lab.attempt(&lab.intruder, &node_port_target, "tcp")?.ok);
    let _ = &mut lab;
    Ok(())
}

/// Policy keeps being enforced while the agent is away (SIGKILL), and a new
/// agent adopts the maps: identities keep their numbers and nothing that
/// did not change is written again.
#[test]
fn policy_is_enforced_while_the_agent_is_away_and_adopted_by_the_next() -> Result<()> {
    let mut lab = PolicyLab::new(&[])?;
    lab.policies(WEB_FROM_CLIENT)?;
    let lbctl = |args: &[&str]| lb_e2e::agent::lbctl(&lab.s.bins.lbctl, &lab.s.node.bpffs, args);
    let identities = lbctl(&["identity", "list"])?;
    let target = format!("{}:8080", lab.s.ip(1));
    let held = connect_in_background(
        &lab,
        &lab.s.client,
        &target,
        &["--hold-ms", "2500", "--timeout-ms", "700"],
    )?;
    thread::sleep(Duration::from_millis(300));
    lab.s.agent.kill();
    for _ in 0..3 {
        assert!(lab.attempt(&lab.s.client, &target, "tcp")?.ok);
        assert!(!lab.attempt(&lab.intruder, &target, "tcp")?.ok);
    }
    let held = held.join().expect("no panic")?;
    assert!(
        held[0].ok,
        "an allowed connection broke while the agent was away: {held:?}"
    );

    lab.s.agent = lb_e2e::agent::Agent::start_with(
        &lab.s.lab,
        &lab.s.bins,
        &lab.s.node,
        &["--node-name", "node1"],
    )?;
    lab.s
        .agent
        .wait_for_log("policy reconciled", Duration::from_secs(10))?;
    assert_eq!(lbctl(&["identity", "list"])?, identities);
    let log = lab.s.agent.log_text();
    let first = log
        .lines()
        .find(|l| l.contains("policy reconciled"))
        .unwrap_or_default();
    assert!(
        first.contains("writes=0"),
        "the new agent rewrote policy: {first}"
    );
    assert!(lab.attempt(&lab.s.client, &target, "tcp")?.ok);
    assert!(!lab.attempt(&lab.intruder, &target, "tcp")?.ok);
    Ok(())
}

/// Policy changes under connection churn: every connection of a flow that
/// stays allowed succeeds, and no connection of a flow that stays denied
/// gets through, while policies are added, replaced and removed.
#[test]
fn policy_changes_under_connection_churn_keep_both_sides() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    lab.policies(WEB_FROM_CLIENT)?;
    let target = "10.96.0.10:80";
    // Allowed connections every 5 ms; denied ones time out after 200 ms.
    let allowed = connect_in_background(
        &lab,
        &lab.s.client,
        target,
        &[
            "--count",
            "500",
            "--interval-ms",
            "5",
            "--timeout-ms",
            "1000",
        ],
    )?;
    let denied = connect_in_background(
        &lab,
        &lab.intruder,
        target,
        &["--count", "15", "--timeout-ms", "200"],
    )?;
    let other = WEB_FROM_CLIENT
        .replace("name: web-from-client", "name: other")
        .replace("app: web", "app: intruder");
    let relabeled = WEB_FROM_CLIENT.replace(
        "          app: client\n",
        "          app: client\n    - podSelector:\n        matchExpressions:\n        - {key: app, operator: In, values: [client, nobody]}\n",
    );
    for round in 0..6 {
        let yaml = match round % 3 {
            0 => format!("{WEB_FROM_CLIENT}---\n{other}"),
            1 => relabeled.clone(),
            _ => WEB_FROM_CLIENT.to_string(),
        };
        lab.policies(&yaml)?;
        thread::sleep(Duration::from_millis(150));
    }
    let allowed = allowed.join().expect("no panic")?;
    let denied = denied.join().expect("no panic")?;
    let failed: Vec<&Attempt> = allowed.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{} allowed connections failed: {failed:?}",
        failed.len()
    );
    let through: Vec<&Attempt> = denied.iter().filter(|a| a.ok).collect();
    assert!(
        through.is_empty(),
        "{} denied connections got through",
        through.len()
    );
    assert!(allowed.len() == 500 && denied.len() == 15);
    Ok(())
}

/// The client may only reach the web pods on 8080.
const CLIENT_EGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: client-egress
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: client
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector:
        matchLabels:
          app: web
    ports:
    - port: 8080
";

/// A connection the client's egress policy denies fails at `connect()`
/// with EPERM at once (not after a timeout), through a ClusterIP or to a
/// pod address; allowed ones are untouched. With policyAtConnect false the
/// same connection is dropped by the tc program and times out instead.
#[test]
fn denied_connections_fail_at_connect_unless_turned_off() -> Result<()> {
    let lab = PolicyLab::new(&[])?;
    let s = &lab.s;
    // (The metrics are read from the client pod, which is about to lose
    // its way there.)
    let refusals = || s.metric("lb_socket_refused{reason=\"policy_denied\"}");
    let before = refusals()?;
    lab.policies(CLIENT_EGRESS)?;
    // The agent writes the client's cgroups on its next loop pass.
    let deadline = Instant::now() + Duration::from_secs(5);
    let intruder = format!("{}:8080", lab.intruder.ip);
    let refused = loop {
        let attempt = lab.attempt(&s.client, &intruder, "tcp")?;
        if attempt.errno == Some(1) || Instant::now() > deadline {
            break attempt;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        refused.errno,
        Some(1),
        "not refused with EPERM: {refused:?}"
    );
    let started = Instant::now();
    for target in [intruder.as_str(), &format!("{}:9090", s.ip(1))] {
        let attempt = lab.attempt(&s.client, target, "tcp")?;
        assert_eq!(attempt.errno, Some(1), "{target}: {attempt:?}");
    }
    let udp = lab.attempt(&s.client, &format!("{}:8080", s.ip(1)), "udp")?;
    assert!(!udp.ok, "{udp:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "refusals were slow"
    );
    assert!(lab.attempt(&s.client, "10.96.0.10:80", "tcp")?.ok);
    assert!(
        lab.attempt(&s.client, &format!("{}:8080", s.ip(2)), "tcp")?
            .ok
    );
    lab.policies("")?;
    assert!(refusals()? >= before + 3.0);

    let off = PolicyLab::new(&["--policy-at-connect", "false"])?;
    off.policies(CLIENT_EGRESS)?;
    thread::sleep(Duration::from_millis(1200));
    let dropped = off.attempt(&off.s.client, &format!("{}:8080", off.intruder.ip), "tcp")?;
    assert!(!dropped.ok && dropped.errno != Some(1), "{dropped:?}");
    assert!(off.attempt(&off.s.client, "10.96.0.10:80", "tcp")?.ok);
    Ok(())
}
