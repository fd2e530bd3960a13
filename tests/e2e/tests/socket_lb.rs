//! kube-proxy parity of the socket-level path, one test per behaviour, with
//! real TCP, UDP and IPv6 sockets in the lab. Each test names the upstream
//! Kubernetes e2e test it corresponds to (test/e2e/network/...); the mapping
//! is also tabulated in docs/parity.md.

use std::{collections::BTreeSet, thread, time::Duration};

use anyhow::Result;
use lb_e2e::{
    agent::Agent,
    lab::Place,
    manifests::{pod_object, service, slice, Endpoint},
    probe::{per_backend, Attempt},
    scenario::Scenario,
};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
/// The DNS Service of the connected UDP tests.
const DNS: &str = "10.96.0.10:53";

fn all_ok(attempts: &[Attempt]) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed attempts: {failed:?}");
}

fn backends(attempts: &[Attempt]) -> BTreeSet<String> {
    per_backend(attempts).into_keys().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Service `web` with the given ports and extra spec lines, plus one slice.
fn web(ports: &[(&str, u16, &str, &str)], spec_extra: &str, slice_text: &str) -> String {
    let svc = service("web", VIP, ports).replace(
        "  type: ClusterIP\n",
        &format!("  type: ClusterIP\n{spec_extra}"),
    );
    format!("{svc}---\n{slice_text}")
}

/// A Service on VIP made dual-stack, on VIP6 too.
fn dual_stack(svc: &str) -> String {
    svc.replace(
        "  clusterIP: 10.96.0.10\n",
        &format!(
            "  clusterIP: {VIP}\n  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n"
        ),
    )
}

/// Upstream: network/dual_stack.go "should be able to reach pod on ipv4 and
/// ipv6 ip" and "should create service with ipv6 cluster ip"; IPv4-mapped
/// addresses on IPv6 sockets are how dual-stack applications reach IPv4 VIPs.
#[test]
fn dual_stack_service_translates_ipv4_ipv6_and_mapped_addresses() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    let svc = dual_stack(&service("web", VIP, &[("http", 80, "TCP", "8080")]));
    let v4 = slice(
        "web",
        "web-v4",
        &[("http", 8080, "TCP")],
        &[Endpoint::ready(s.ip(1)), Endpoint::ready(s.ip(2))],
    );
    let v6 = slice(
        "web",
        "web-v6",
        &[("http", 8080, "TCP")],
        &[Endpoint::ready(s.ip6(1)), Endpoint::ready(s.ip6(2))],
    );
    s.apply("web.yaml", &format!("{svc}---\n{v4}---\n{v6}"), |t| {
        t.contains(&format!("[{VIP6}]:80/TCP")) && t.contains(&format!("[{}]:8080", s.ip6(2)))
    })?;

    let over_v6 = s.connect(&format!("[{VIP6}]:80"), 20, &[])?;
    all_ok(&over_v6);
    assert_eq!(backends(&over_v6), set(&["web-1", "web-2"]));
    for a in &over_v6 {
        assert_eq!(a.peer.as_deref(), Some("[fd00:96::10]:80"));
        let seen = a.seen_source.as_deref().unwrap_or_default();
        assert!(seen.starts_with(&format!("[{}]:", s.client.ip6)), "{seen}");
    }

    let mapped = s.connect(&format!("[::ffff:{VIP}]:80"), 10, &[])?;
    all_ok(&mapped);
    for a in &mapped {
        assert_eq!(a.peer.as_deref(), Some("[::ffff:10.96.0.10]:80"));
        let seen = a.seen_source.as_deref().unwrap_or_default();
        assert!(seen.starts_with(&format!("{}:", s.client.ip)), "{seen}");
    }

    let over_v4 = s.connect(&format!("{VIP}:80"), 10, &[])?;
    all_ok(&over_v4);
    assert!(over_v4
        .iter()
        .all(|a| a.peer.as_deref() == Some("10.96.0.10:80")));
    Ok(())
}

/// Upstream: network/service.go "should serve endpoints on same port and
/// different protocols" and conntrack.go "should be able to preserve UDP
/// traffic when server pod cycles for a ClusterIP service": TCP and UDP on the
/// same port, connected and unconnected UDP, replies showing the VIP.
#[test]
fn same_port_on_tcp_and_udp_with_connected_and_unconnected_sockets() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    let eps = [Endpoint::ready(s.ip(1)), Endpoint::ready(s.ip(2))];
    let text = format!(
        "{}---\n{}",
        service(
            "web",
            VIP,
            &[("tcp", 80, "TCP", "8080"), ("udp", 80, "UDP", "8080")]
        ),
        slice(
            "web",
            "web-1",
            &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")],
            &eps
        )
    );
    s.apply("web.yaml", &text, |t| {
        t.contains("80/UDP") && t.contains("80/TCP")
    })?;

    let tcp = s.connect(&format!("{VIP}:80"), 10, &[])?;
    all_ok(&tcp);
    let connected = s.connect(&format!("{VIP}:80"), 20, &["--proto", "udp"])?;
    all_ok(&connected);
    assert_eq!(backends(&connected), set(&["web-1", "web-2"]));
    assert!(connected
        .iter()
        .all(|a| a.peer.as_deref() == Some("10.96.0.10:80")));
    let unconnected = s.connect(
        &format!("{VIP}:80"),
        20,
        &["--proto", "udp", "--unconnected", "--reuse-socket"],
    )?;
    all_ok(&unconnected);
    assert_eq!(backends(&unconnected), set(&["web-1", "web-2"]));
    // recvmsg shows the VIP as the source of every reply.
    assert!(
        unconnected
            .iter()
            .all(|a| a.peer.as_deref() == Some("10.96.0.10:80")),
        "{unconnected:?}"
    );
    for a in &unconnected {
        let seen = a.seen_source.as_deref().unwrap_or_default();
        assert!(seen.starts_with(&format!("{}:", s.client.ip)), "{seen}");
    }
    Ok(())
}

/// Upstream: network/service.go "should serve multiport endpoints from pods
/// [Conformance]": each ServicePort independent, and a named targetPort
/// resolved per endpoint from the EndpointSlice port of that name.
#[test]
fn multiple_ports_and_named_target_ports_resolve_per_endpoint() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    // web-1 serves "http" on 8080, web-2 on 9090 (one slice per port number,
    // as the EndpointSlice controller writes them); "admin" is 9090 on both.
    let slice_1 = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP"), ("admin", 9090, "TCP")],
        &[Endpoint::ready(s.ip(1))],
    );
    let slice_2 = slice(
        "web",
        "web-b",
        &[("http", 9090, "TCP"), ("admin", 9090, "TCP")],
        &[Endpoint::ready(s.ip(2))],
    );
    let text = format!(
        "{}---\n{slice_1}---\n{slice_2}",
        service(
            "web",
            VIP,
            &[("http", 80, "TCP", "http"), ("admin", 81, "TCP", "admin")]
        ),
    );
    s.apply("web.yaml", &text, |t| {
        t.contains("10.96.0.10:81/TCP") && t.contains(&format!("{}:9090", s.ip(2)))
    })?;
    let http = s.connect(&format!("{VIP}:80"), 30, &[])?;
    all_ok(&http);
    assert_eq!(backends(&http), set(&["web-1", "web-2"]));
    for a in &http {
        let expected_port = if a.backend.as_deref() == Some("web-1") {
            ":8080"
        } else {
            ":9090"
        };
        assert!(
            a.served_on
                .as_deref()
                .unwrap_or_default()
                .ends_with(expected_port),
            "{a:?}"
        );
    }
    let admin = s.connect(&format!("{VIP}:81"), 10, &[])?;
    all_ok(&admin);
    assert!(admin.iter().all(|a| a
        .served_on
        .as_deref()
        .unwrap_or_default()
        .ends_with(":9090")));
    Ok(())
}

/// Upstream: network/service.go "should allow creating a basic SCTP service
/// with pod and endpoints": we refuse SCTP ports loudly instead.
#[test]
fn sctp_ports_are_refused_with_a_clear_message() -> Result<()> {
    let s = Scenario::new(1, &[])?;
    let text = web(
        &[("http", 80, "TCP", "8080"), ("sctp", 90, "SCTP", "9090")],
        "",
        &slice(
            "web",
            "web-a",
            &[("http", 8080, "TCP")],
            &[Endpoint::ready(s.ip(1))],
        ),
    );
    s.apply("web.yaml", &text, |t| t.contains("10.96.0.10:80/TCP"))?;
    s.agent.wait_for_log(
        "object=Service default/web field=spec.ports[1].protocol reason=SCTP is not supported",
        Duration::from_secs(5),
    )?;
    assert!(!s.agent.service_list()?.contains(":90/"));
    all_ok(&s.connect(&format!("{VIP}:80"), 3, &[])?);
    Ok(())
}

/// Upstream: network/service.go "should be rejected when no endpoints exist"
/// (UDP flavour): connect() and sendto() fail at once.
#[test]
fn udp_to_a_service_without_endpoints_fails_at_once() -> Result<()> {
    let s = Scenario::new(1, &[])?;
    let text = web(
        &[("dns", 53, "UDP", "8080")],
        "",
        &slice("web", "web-a", &[("dns", 8080, "UDP")], &[]),
    );
    s.apply("web.yaml", &text, |t| t.contains("connections are refused"))?;
    for mode in [
        &["--proto", "udp"][..],
        &["--proto", "udp", "--unconnected"][..],
    ] {
        let attempts = s.connect(&format!("{VIP}:53"), 3, mode)?;
        for a in attempts {
            assert_eq!(a.errno, Some(libc::ECONNREFUSED), "{mode:?}: {a:?}");
        }
    }
    // Counted, so an operator sees refusals kube-proxy's REJECT rules would
    // have counted: 3 connect() and 3 sendto() calls.
    s.wait_for_metric(
        "lb_socket_refused{reason=\"no_endpoints\"} 6",
        Duration::from_secs(3),
    )?;
    Ok(())
}

/// Upstream: network/service.go "should have session affinity work for
/// service with type clusterIP [Conformance]", "should have session affinity
/// timeout work for service with type clusterIP" and "should be able to
/// switch session affinity for service with type clusterIP [Conformance]".
#[test]
fn client_ip_affinity_holds_until_timeout_and_can_be_switched() -> Result<()> {
    let s = Scenario::new(3, &[])?;
    let eps: Vec<Endpoint> = (1..=3).map(|i| Endpoint::ready(s.ip(i))).collect();
    let endpoints = slice("web", "web-a", &[("http", 8080, "TCP")], &eps);
    let ports = [("http", 80, "TCP", "8080")];
    let sticky = web(
        &ports,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 1\n",
        &endpoints,
    );
    s.apply("web.yaml", &sticky, |t| t.contains("(affinity 1s)"))?;
    let mut chosen = BTreeSet::new();
    for _ in 0..3 {
        let round = s.connect(&format!("{VIP}:80"), 15, &[])?;
        all_ok(&round);
        let used = backends(&round);
        assert_eq!(
            used.len(),
            1,
            "affinity must hold within the timeout: {used:?}"
        );
        chosen.extend(used);
        thread::sleep(Duration::from_millis(1300));
    }
    assert!(
        chosen.len() >= 2,
        "after the timeout a client is balanced again: {chosen:?}"
    );

    // Switching affinity off spreads the same client again, and on pins it.
    s.apply("web.yaml", &web(&ports, "", &endpoints), |t| {
        !t.contains("affinity")
    })?;
    let spread = s.connect(&format!("{VIP}:80"), 30, &[])?;
    assert_eq!(backends(&spread).len(), 3);
    let default_timeout = web(&ports, "  sessionAffinity: ClientIP\n", &endpoints);
    s.apply("web.yaml", &default_timeout, |t| {
        t.contains("(affinity 10800s)")
    })?;
    let pinned = s.connect(&format!("{VIP}:80"), 30, &[])?;
    assert_eq!(backends(&pinned).len(), 1);
    Ok(())
}

/// Upstream: network/service.go "should fallback to terminating endpoints
/// when there are no ready endpoints with internalTrafficPolicy=Cluster" and
/// "should be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is true" (the EndpointSlice controller marks such
/// endpoints ready, which is what the agent reads).
#[test]
fn endpoint_conditions_choose_ready_then_terminating_endpoints() -> Result<()> {
    let s = Scenario::new(3, &[])?;
    let unready = Endpoint {
        ready: false,
        serving: false,
        ..Endpoint::ready(s.ip(3))
    };
    let ports = [("http", 80, "TCP", "8080")];
    let mixed = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP")],
        &[
            Endpoint::ready(s.ip(1)),
            Endpoint::terminating(s.ip(2)),
            unready.clone(),
        ],
    );
    s.apply("web.yaml", &web(&ports, "", &mixed), |t| {
        t.contains(&format!("{}:8080", s.ip(1)))
    })?;
    let ready_only = s.connect(&format!("{VIP}:80"), 20, &[])?;
    all_ok(&ready_only);
    assert_eq!(backends(&ready_only), set(&["web-1"]));

    let draining = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP")],
        &[Endpoint::terminating(s.ip(2)), unready],
    );
    s.apply("web.yaml", &web(&ports, "", &draining), |t| {
        t.contains(&format!("{}:8080", s.ip(2)))
    })?;
    let fallback = s.connect(&format!("{VIP}:80"), 20, &[])?;
    all_ok(&fallback);
    assert_eq!(backends(&fallback), set(&["web-2"]));
    Ok(())
}

/// Upstream: network/service.go "should implement service.kubernetes.io/service-proxy-name"
/// and "should implement service.kubernetes.io/headless"; headless and
/// ExternalName Services have no VIP to proxy.
#[test]
fn unproxied_services_are_left_alone() -> Result<()> {
    let s = Scenario::new(1, &[])?;
    let eps = [Endpoint::ready(s.ip(1))];
    let labelled = |name: &str, vip: &str, label: &str| {
        format!(
            "{}---\n{}",
            service(name, vip, &[("http", 80, "TCP", "8080")]).replace(
                "  namespace: default\n",
                &format!("  namespace: default\n  labels:\n    {label}\n"),
            ),
            slice(name, &format!("{name}-a"), &[("http", 8080, "TCP")], &eps)
        )
    };
    let text = [
        labelled("other-proxy", "10.96.0.21", "service.kubernetes.io/service-proxy-name: someone-else"),
        labelled("headless-label", "10.96.0.22", "service.kubernetes.io/headless: \"\""),
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: default}\nspec: {clusterIP: None, ports: [{port: 80}]}\n".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: external, namespace: default}\nspec: {type: ExternalName, externalName: example.com}\n".into(),
        web(&[("http", 80, "TCP", "8080")], "", &slice("web", "web-a", &[("http", 8080, "TCP")], &eps)),
    ]
    .join("---\n");
    let table = s.apply("all.yaml", &text, |t| t.contains("default/web:http"))?;
    assert_eq!(table.lines().count(), 2, "only web is proxied:\n{table}");
    for vip in ["10.96.0.21", "10.96.0.22"] {
        let attempts = s.connect(&format!("{vip}:80"), 1, &["--timeout-ms", "300"])?;
        assert!(
            !attempts[0].ok,
            "{vip} must not be translated: {attempts:?}"
        );
    }
    Ok(())
}

/// Upstream: network/service.go "should respect internalTrafficPolicy=Local
/// Pod to Pod": only this node's endpoints; with none, the traffic fails
/// (kube-proxy drops it; a socket cannot drop a SYN, so connect() fails with
/// EHOSTUNREACH at once, distinct from the ECONNREFUSED of "no endpoints").
#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() -> Result<()> {
    let s = Scenario::new(2, &["--node-name", "node1"])?;
    let ports = [("http", 80, "TCP", "8080")];
    let local = "  internalTrafficPolicy: Local\n";
    let spread = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP")],
        &[
            Endpoint::ready(s.ip(1)).on("node1"),
            Endpoint::ready(s.ip(2)).on("node2"),
        ],
    );
    s.apply("web.yaml", &web(&ports, local, &spread), |t| {
        t.contains(&format!("{}:8080", s.ip(1)))
    })?;
    let attempts = s.connect(&format!("{VIP}:80"), 20, &[])?;
    all_ok(&attempts);
    assert_eq!(backends(&attempts), set(&["web-1"]));

    let remote_only = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP")],
        &[Endpoint::ready(s.ip(2)).on("node2")],
    );
    s.apply("web.yaml", &web(&ports, local, &remote_only), |t| {
        t.contains("none on this node")
    })?;
    let attempts = s.connect(&format!("{VIP}:80"), 3, &[])?;
    for a in attempts {
        assert_eq!(a.errno, Some(libc::EHOSTUNREACH), "{a:?}");
    }
    s.wait_for_metric(
        "lb_socket_refused{reason=\"no_local_endpoints\"} 3",
        Duration::from_secs(3),
    )?;
    Ok(())
}

/// Upstream: network/topology_hints.go "should distribute endpoints evenly"
/// (kube-proxy side): hints are used when every ready endpoint has one and
/// one matches this node's zone.
#[test]
fn topology_hints_keep_traffic_in_this_zone() -> Result<()> {
    let s = Scenario::new(3, &["--node-name", "node1"])?;
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    topology.kubernetes.io/zone: zone-a\n";
    let hinted = slice(
        "web",
        "web-a",
        &[("http", 8080, "TCP")],
        &[
            Endpoint::ready(s.ip(1)).hinted("zone-a"),
            Endpoint::ready(s.ip(2)).hinted("zone-a"),
            Endpoint::ready(s.ip(3)).hinted("zone-b"),
        ],
    );
    let text = format!(
        "{node}---\n{}",
        web(&[("http", 80, "TCP", "8080")], "", &hinted)
    );
    s.apply("web.yaml", &text, |t| {
        t.contains(&format!("{}:8080", s.ip(2)))
    })?;
    let attempts = s.connect(&format!("{VIP}:80"), 30, &[])?;
    all_ok(&attempts);
    assert_eq!(backends(&attempts), set(&["web-1", "web-2"]));
    Ok(())
}

/// No single upstream test: kube-proxy's statistic probabilities give an even
/// spread, checked in its unit tests. Over 3,000 connections to 5 backends
/// each backend gets its fair share within +/-10%.
#[test]
fn connections_spread_evenly_over_five_backends() -> Result<()> {
    let s = Scenario::new(5, &[])?;
    let eps: Vec<Endpoint> = (1..=5).map(|i| Endpoint::ready(s.ip(i))).collect();
    let text = web(
        &[("http", 80, "TCP", "8080")],
        "",
        &slice("web", "web-a", &[("http", 8080, "TCP")], &eps),
    );
    s.apply("web.yaml", &text, |t| {
        t.contains(&format!("{}:8080", s.ip(5)))
    })?;
    let attempts = s.connect(&format!("{VIP}:80"), 3000, &[])?;
    all_ok(&attempts);
    let counts = per_backend(&attempts);
    assert_eq!(counts.len(), 5, "{counts:?}");
    for (backend, count) in &counts {
        assert!(
            (540..=660).contains(count),
            "{backend}: {count} of 3000 (fair share 600): {counts:?}"
        );
    }
    Ok(())
}

/// Upstream: network/service.go "should allow pods to hairpin back to
/// themselves through services".
#[test]
fn a_pod_reaches_itself_through_its_own_service() -> Result<()> {
    let s = Scenario::new(1, &[])?;
    let text = web(
        &[("http", 80, "TCP", "8080")],
        "",
        &slice(
            "web",
            "web-a",
            &[("http", 8080, "TCP")],
            &[Endpoint::ready(s.ip(1))],
        ),
    );
    s.apply("web.yaml", &text, |t| {
        t.contains(&format!("{}:8080", s.ip(1)))
    })?;
    let attempts = s.connect_from(&s.servers[0], &format!("{VIP}:80"), &["--count", "5"])?;
    all_ok(&attempts);
    for a in attempts {
        assert_eq!(a.backend.as_deref(), Some("web-1"));
        let seen = a.seen_source.unwrap_or_default();
        assert!(seen.starts_with(&format!("{}:", s.ip(1))), "{seen}");
        assert_eq!(a.peer.as_deref(), Some("10.96.0.10:80"));
    }
    Ok(())
}

/// Upstream: network/networking.go "Granular Checks: Services should function
/// for node-Service: http": processes in the node's own network namespace
/// are translated too.
#[test]
fn host_network_processes_are_translated() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    let eps = [Endpoint::ready(s.ip(1)), Endpoint::ready(s.ip(2))];
    let text = web(
        &[("http", 80, "TCP", "8080")],
        "",
        &slice("web", "web-a", &[("http", 8080, "TCP")], &eps),
    );
    s.apply("web.yaml", &text, |t| {
        t.contains(&format!("{}:8080", s.ip(2)))
    })?;
    let attempts = s.connect_from(&s.node, &format!("{VIP}:80"), &["--count", "20"])?;
    all_ok(&attempts);
    assert_eq!(backends(&attempts), set(&["web-1", "web-2"]));
    assert!(attempts
        .iter()
        .all(|a| a.peer.as_deref() == Some("10.96.0.10:80")));
    Ok(())
}

/// Service `web` on VIP:53/UDP and [VIP6]:53/UDP whose slices hold the
/// servers `endpoints` (1-based).
fn dns_service(s: &Scenario, endpoints: &[usize]) -> String {
    let ports = [("dns", 8080, "UDP")];
    let v4: Vec<Endpoint> = endpoints
        .iter()
        .map(|&i| Endpoint::ready(s.ip(i)))
        .collect();
    let v6: Vec<Endpoint> = endpoints
        .iter()
        .map(|&i| Endpoint::ready(s.ip6(i)))
        .collect();
    let svc = dual_stack(&service("web", VIP, &[("dns", 53, "UDP", "8080")]));
    let v4 = slice("web", "web-a", &ports, &v4);
    let v6 = slice("web", "web-v6", &ports, &v6);
    format!("{svc}---\n{v4}---\n{v6}")
}

/// Publishes the DNS Service on `web-1` and starts the client of
/// [`connected_udp_client`]; returns it and when it started.
fn spawn_connected_udp_client(
    s: &Scenario,
    from: &dyn Place,
    target: &str,
    socket: &str,
    count: u32,
) -> Result<(std::process::Child, std::time::Instant)> {
    s.apply("web.yaml", &dns_service(s, &[1]), |t| {
        t.contains(&format!("{}:8080", s.ip(1)))
    })?;
    let client = s
        .lab
        .command_in(from, &s.bins.labpod)?
        .args(["connect", "--target", target, "--proto", "udp"])
        .args([socket, "--count", &count.to_string()])
        .args(["--interval-ms", "100", "--timeout-ms", "300"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    Ok((client, std::time::Instant::now()))
}

/// A client in `from` that keeps one connected UDP socket to VIP:53 and
/// sends a query every 100 ms, `count` in all, while the Service's
/// endpoints change: `changes` lists when (ms after the client started)
/// the slice gets which servers. `socket` says when the client opens a new
/// socket: `--reuse-socket` after an error, `--one-socket` never. Returns
/// its attempts and when (ms after it started) each change was written.
fn connected_udp_client(
    s: &Scenario,
    from: &dyn Place,
    target: &str,
    socket: &str,
    count: u32,
    changes: &[(u64, &[usize])],
) -> Result<(Vec<Attempt>, Vec<u64>)> {
    let (client, started) = spawn_connected_udp_client(s, from, target, socket, count)?;
    let mut written = Vec::new();
    for &(at_ms, endpoints) in changes {
        thread::sleep(Duration::from_millis(at_ms).saturating_sub(started.elapsed()));
        s.agent
            .write_manifest("web.yaml", &dns_service(s, endpoints))?;
        written.push(started.elapsed().as_millis() as u64);
    }
    let output = client.wait_with_output()?;
    Ok((lb_e2e::probe::parse_attempts(&output.stdout)?, written))
}

/// [`connected_udp_client`] (a new socket after an error) over 4 s while
/// the Service's only endpoint moves from `web-1` to `web-2` 1.2 s in.
/// Checks that answers came from `web-1` before and only from `web-2` from
/// 1 s after the change.
fn connected_udp_client_across_a_backend_change(
    s: &Scenario,
    from: &dyn Place,
    target: &str,
) -> Result<Vec<Attempt>> {
    let (attempts, written) =
        connected_udp_client(s, from, target, "--reuse-socket", 40, &[(1200, &[2])])?;
    assert_moved_to_web_2(&attempts, written[0]);
    Ok(attempts)
}

/// Answers came from `web-1` before `changed_ms` and only from `web-2`
/// from 1 s after it.
fn assert_moved_to_web_2(attempts: &[Attempt], changed_ms: u64) {
    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.at_ms < changed_ms).collect();
    assert!(
        before.iter().any(|a| a.backend.as_deref() == Some("web-1")),
        "{attempts:?}"
    );
    let settled: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.at_ms > changed_ms + 1000)
        .collect();
    assert!(!settled.is_empty());
    assert!(
        settled
            .iter()
            .all(|a| a.backend.as_deref() == Some("web-2")),
        "the long-lived socket stayed pinned: {settled:?}"
    );
}

/// Every answered query came on one socket (one local port) that showed
/// `target` (the Service address it was connected to) as its peer.
fn assert_one_socket_on(attempts: &[Attempt], target: &str) {
    let answered: Vec<&Attempt> = attempts.iter().filter(|a| a.ok).collect();
    let locals: BTreeSet<_> = answered.iter().map(|a| a.local.clone()).collect();
    assert_eq!(
        locals.len(),
        1,
        "the client had to open a new socket: {attempts:?}"
    );
    assert!(
        answered.iter().all(|a| a.peer.as_deref() == Some(target)),
        "{attempts:?}"
    );
}

/// The socket of `from` connected to `target` survived the move of its
/// backend untouched: every query answered, on one socket showing `target`.
fn connected_udp_socket_survives(s: &Scenario, from: &dyn Place, target: &str) -> Result<()> {
    let attempts = connected_udp_client_across_a_backend_change(s, from, target)?;
    all_ok(&attempts);
    assert_one_socket_on(&attempts, target);
    Ok(())
}

/// Upstream: network/conntrack.go "should be able to preserve UDP traffic when
/// server pod cycles for a ClusterIP service": kube-proxy clears the flow's
/// conntrack entry and the next datagram of a connected UDP socket picks a
/// live backend; the application does nothing. Where no pod program sees
/// the socket's datagrams (here: no `podInterfaces`, no network policy
/// objects), the socket is translated at `connect()`: after its backend is
/// removed the agent connects it again through the VIP, for a pod and for
/// a host process alike. Every query is answered, all on one socket that
/// always shows the VIP, from the new backend within 1 s of the change;
/// nothing is destroyed.
#[test]
fn connected_udp_socket_is_not_pinned_to_a_removed_backend() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    connected_udp_socket_survives(&s, &s.client, DNS)?;
    connected_udp_socket_survives(&s, &s.node, DNS)?;
    let log = s.agent.log_text();
    assert_eq!(
        log.matches("re-connected UDP sockets of removed backends to a live backend of their Service sockets=1")
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("terminated connected UDP sockets"), "{log}");
    assert_eq!(s.metric("lb_udp_sockets_reconnected_total")?, 2.0);
    assert_eq!(s.metric("lb_udp_sockets_terminated_total")?, 0.0);
    Ok(())
}

/// [`connected_udp_socket_is_not_pinned_to_a_removed_backend`] for IPv6
/// sockets: connected to the IPv6 VIP, and to the IPv4 VIP as an
/// IPv4-mapped address (a dual-stack application's socket). Each is
/// connected again in its own family and keeps showing the address it was
/// connected to.
#[test]
fn ipv6_and_ipv4_mapped_connected_udp_sockets_are_connected_again() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    let v6 = format!("[{VIP6}]:53");
    let mapped = format!("[::ffff:{VIP}]:53");
    for target in [&v6, &mapped] {
        connected_udp_socket_survives(&s, &s.client, target)?;
        connected_udp_socket_survives(&s, &s.node, target)?;
    }
    assert_eq!(s.metric("lb_udp_sockets_reconnected_total")?, 4.0);
    assert_eq!(s.metric("lb_udp_sockets_terminated_total")?, 0.0);
    Ok(())
}

/// kube-proxy, as above. With the pod programs on the client's interface
/// the pod's socket stays on the VIP and each datagram is translated there
/// (new flows on the tc path, no re-connect); a host process's socket,
/// whose datagrams cross no pod interface, is translated at `connect()` and
/// connected again by the agent. Both survive untouched.
fn connected_udp_sockets_survive_backend_changes(s: &Scenario) -> Result<()> {
    connected_udp_socket_survives(s, &s.client, DNS)?;
    assert!(s.metric(r#"lb_tc_packets{outcome="new_flow"}"#)? >= 2.0);
    assert_eq!(s.metric("lb_udp_sockets_reconnected_total")?, 0.0);
    connected_udp_socket_survives(s, &s.node, DNS)?;
    assert_eq!(s.metric("lb_udp_sockets_reconnected_total")?, 1.0);
    let log = s.agent.log_text();
    assert!(
        !log.contains("terminated connected UDP sockets"),
        "a socket was destroyed: {log}"
    );
    Ok(())
}

/// [`connected_udp_sockets_survive_backend_changes`] with the pod programs
/// on every interface named `p...` (`podInterfaces`).
#[test]
fn a_pods_connected_udp_socket_moves_to_a_live_backend_by_itself() -> Result<()> {
    let s = Scenario::new(2, &["--node-name", "node1", "--pod-interfaces", "p"])?;
    connected_udp_sockets_survive_backend_changes(&s)
}

/// [`connected_udp_sockets_survive_backend_changes`] with the default
/// settings: network policy attaches the pod programs to the interfaces of
/// the node's known Pods, and the agent finds their namespaces.
#[test]
fn with_default_settings_a_pods_connected_udp_socket_moves_by_itself() -> Result<()> {
    let s = Scenario::new(2, &["--node-name", "node1"])?;
    let pods: Vec<String> = s
        .servers
        .iter()
        .chain([&s.client])
        .map(|pod| pod_object(pod, &[("app", &pod.name)]))
        .collect();
    s.agent.write_manifest("pods.yaml", &pods.join("---\n"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let needle = "pod's connected UDP translated per datagram";
    while s.agent.log_text().matches(needle).count() < pods.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pods' namespaces were not all found:\n{}",
            s.agent.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    connected_udp_sockets_survive_backend_changes(&s)
}

/// kube-proxy rejects a connected UDP socket's datagrams while its Service
/// has no endpoints and serves them again once it has one, on the same
/// socket. Here the socket of a removed backend waits, still connected to
/// it, while the Service has none, and is connected again through the VIP
/// as soon as an endpoint comes back: the client never opens a new socket
/// and its queries reach the new endpoint within 1 s.
#[test]
fn a_connected_udp_socket_waits_for_its_service_to_have_an_endpoint_again() -> Result<()> {
    let s = Scenario::new(2, &[])?;
    let (attempts, written) = connected_udp_client(
        &s,
        &s.client,
        DNS,
        "--one-socket",
        50,
        &[(1200, &[]), (2400, &[2])],
    )?;
    assert_moved_to_web_2(&attempts, written[1]);
    assert_one_socket_on(&attempts, DNS);
    let log = s.agent.log_text();
    let waited = log
        .find("UDP sockets of removed backends wait for their Service to have a backend sockets=1")
        .unwrap_or_else(|| panic!("the socket never waited: {log}"));
    let moved = log
        .find("re-connected UDP sockets of removed backends to a live backend of their Service sockets=1")
        .unwrap_or_else(|| panic!("the socket was never connected again: {log}"));
    assert!(waited < moved, "{log}");
    assert_eq!(s.metric("lb_udp_sockets_waiting")?, 0.0);
    assert_eq!(s.metric("lb_udp_sockets_terminated_total")?, 0.0);
    Ok(())
}

/// A socket that waits for its Service to have an endpoint again when the
/// agent stops is not forgotten: the restarted agent looks at every socket
/// translation on its first pass (not only at the backends its own passes
/// remove, which would not include one removed before it started) and
/// connects it again once the Service has an endpoint. The client never
/// opens a new socket and reaches the new endpoint within 1 s of the agent
/// being back.
#[test]
fn a_restarted_agent_moves_a_socket_that_was_waiting_for_an_endpoint() -> Result<()> {
    let mut s = Scenario::new(2, &[])?;
    let (client, started) = spawn_connected_udp_client(&s, &s.client, DNS, "--one-socket", 45)?;
    thread::sleep(Duration::from_millis(800));
    s.agent.write_manifest("web.yaml", &dns_service(&s, &[]))?;
    s.agent.wait_for_log(
        "UDP sockets of removed backends wait for their Service to have a backend sockets=1",
        Duration::from_secs(2),
    )?;
    s.agent.kill();
    s.agent.write_manifest("web.yaml", &dns_service(&s, &[2]))?;
    s.agent = Agent::start(&s.lab, &s.bins, &s.node)?;
    let back_ms = started.elapsed().as_millis() as u64;
    let attempts = lb_e2e::probe::parse_attempts(&client.wait_with_output()?.stdout)?;
    assert_moved_to_web_2(&attempts, back_ms);
    assert_one_socket_on(&attempts, DNS);
    s.agent.wait_for_log(
        "re-connected UDP sockets of removed backends to a live backend of their Service sockets=1",
        Duration::from_secs(1),
    )?;
    Ok(())
}

/// Without `CAP_SYS_PTRACE` the agent cannot borrow another process's
/// socket to connect it again: it falls back to destroying the socket (the
/// application sees an error and opens a new one), and says why.
#[test]
fn without_cap_sys_ptrace_a_stale_connected_udp_socket_is_destroyed() -> Result<()> {
    let s = Scenario::new_with_agent(2, |lab, bins, node| {
        Agent::start_without_capability(lab, bins, node, "sys_ptrace", &[])
    })?;
    let attempts = connected_udp_client_across_a_backend_change(&s, &s.node, DNS)?;
    assert!(
        attempts.iter().any(|a| !a.ok),
        "the host's socket never failed: {attempts:?}"
    );
    s.agent.wait_for_log(
        "terminated connected UDP sockets of removed backends sockets=1",
        Duration::from_secs(2),
    )?;
    assert!(
        s.agent.log_text().contains("needs CAP_SYS_PTRACE"),
        "{}",
        s.agent.log_text()
    );
    assert_eq!(s.metric("lb_udp_sockets_terminated_total")?, 1.0);
    assert_eq!(s.metric("lb_udp_sockets_reconnected_total")?, 0.0);
    Ok(())
}
