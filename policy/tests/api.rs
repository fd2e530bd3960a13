//! Each part of the NetworkPolicy API, compiled from small hand-written
//! objects: the entries and flags it gives this node's pods, and the
//! verdicts those give flows.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::policy::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    IDENTITY_ANY, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, PROTO_SCTP,
};
use lb_core::yaml::parse_documents;
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig},
    desired::{PolicyDesired, PolicyLookup, Verdict, L4},
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const IN: u8 = DIRECTION_INGRESS;
const OUT: u8 = DIRECTION_EGRESS;

/// Two nodes; the compiler runs on node1.
const NODES: &str = r#"
kind: Node
metadata: {name: node1}
status: {addresses: [{type: InternalIP, address: 192.168.100.1}]}
---
kind: Node
metadata: {name: node2}
status: {addresses: [{type: InternalIP, address: 192.168.100.2}, {type: InternalIP, address: "fd00::2"}]}
"#;

/// A namespace with labels (`"team: a"`).
fn namespace(name: &str, labels: &str) -> String {
    format!("kind: Namespace\nmetadata: {{name: \"{name}\", labels: {{{labels}}}}}\n")
}

/// A running pod: `labels` and `ports` in YAML flow style, `ips` its
/// addresses (the first is `podIP`).
fn pod_with(
    namespace: &str,
    name: &str,
    labels: &str,
    node: &str,
    ips: &[&str],
    ports: &str,
    extra_spec: &str,
) -> String {
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    format!(
        "kind: Pod\nmetadata: {{name: {name}, namespace: \"{namespace}\", uid: {name}-uid, \
         labels: {{{labels}}}}}\nspec: {{nodeName: {node}, {extra_spec} containers: [{{name: c, \
         ports: [{ports}]}}]}}\nstatus: {{phase: Running, podIP: \"{}\", podIPs: [{}]}}\n",
        ips[0],
        pod_ips.join(", ")
    )
}

/// A running pod on `node` with one address and no ports.
fn pod(namespace: &str, name: &str, labels: &str, node: &str, ip: &str) -> String {
    pod_with(namespace, name, labels, node, &[ip], "", "")
}

/// A NetworkPolicy with the spec in YAML (block style, indented by 2).
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "kind: NetworkPolicy\nmetadata: {{name: {name}, namespace: \"{namespace}\"}}\nspec:\n{spec}\n"
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn tcp(port: u16) -> L4 {
    L4::Ports {
        proto: TCP,
        port,
        prefix: 16,
    }
}

/// A compiled cluster.
struct Cluster {
    desired: PolicyDesired,
}

impl Cluster {
    /// Compiles `documents` (with [`NODES`]) on node1; no errors allowed.
    fn new(documents: &[String]) -> Self {
        let text = format!("{NODES}---\n{}", documents.join("---\n"));
        let parsed = parse_documents("test.yaml", &text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut compiler = PolicyCompiler::new(
            PolicyConfig {
                node: Some("node1".into()),
                ..PolicyConfig::default()
            },
            &Adopted::default(),
        );
        let update = compiler.update(&parsed.objects);
        assert!(update.errors.is_empty(), "{:?}", update.errors);
        Self {
            desired: compiler.desired().clone(),
        }
    }

    /// The label identity of an address.
    fn id(&self, addr: &str) -> u32 {
        self.desired.identities(ip(addr)).identity
    }

    /// The identity of a policy CIDR.
    fn cidr(&self, cidr: &str) -> u32 {
        let text = format!("cidr:{cidr}");
        let found = self.desired.identities.iter().find(|(_, i)| i.text == text);
        *found.unwrap_or_else(|| panic!("no identity for {text}")).0
    }

    /// The isolation flags of an endpoint.
    fn flags(&self, addr: &str) -> u32 {
        self.desired.endpoints[&ip(addr)].flags
    }

    /// The entries (direction, identity, ports) of an endpoint's set.
    fn entries(&self, addr: &str) -> BTreeSet<(u8, u32, L4)> {
        let set = self.desired.endpoints[&ip(addr)].set;
        self.desired.sets[&set]
            .entries
            .keys()
            .map(|e| (e.direction, e.identity, e.l4))
            .collect()
    }

    /// Whether a flow is allowed.
    fn allowed(&self, src: &str, dst: &str, proto: u8, port: u16) -> bool {
        matches!(
            self.desired.verdict(ip(src), ip(dst), proto, port, false),
            Verdict::Allowed { .. }
        )
    }
}

fn set(entries: &[(u8, u32, L4)]) -> BTreeSet<(u8, u32, L4)> {
    entries.iter().copied().collect()
}

// ---- Which pods a policy selects -----------------------------------------

#[test]
fn match_labels_select_pods_of_the_policy_namespace_only() {
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("y", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "db", "app: db", "node1", "10.0.1.2"),
        pod("y", "web", "app: web", "node1", "10.0.1.3"),
        policy("x", "p", "  podSelector: {matchLabels: {app: web}}"),
    ]);
    assert_eq!(c.flags("10.0.1.1"), ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(c.entries("10.0.1.1"), set(&[]), "isolated, nothing allowed");
    assert_eq!(c.flags("10.0.1.2"), 0, "other labels");
    assert_eq!(c.flags("10.0.1.3"), 0, "other namespace");
    assert_eq!(c.desired.endpoints[&ip("10.0.1.2")].set, 0);
    assert!(!c.allowed("10.0.1.2", "10.0.1.1", TCP, 80));
    assert!(c.allowed("10.0.1.1", "10.0.1.2", TCP, 80));
}

#[test]
fn match_expressions_in_not_in_exists_and_does_not_exist() {
    let pods = [
        pod("x", "a", "tier: front", "node1", "10.0.1.1"),
        pod("x", "b", "tier: back", "node1", "10.0.1.2"),
        pod("x", "c", "tier: cache, legacy: 'yes'", "node1", "10.0.1.3"),
        pod("x", "d", "app: d", "node1", "10.0.1.4"),
    ];
    let selected = |expression: &str| -> Vec<&str> {
        let mut documents = vec![namespace("x", "")];
        documents.extend(pods.iter().cloned());
        documents.push(policy(
            "x",
            "p",
            &format!("  podSelector: {{matchExpressions: [{expression}]}}"),
        ));
        let c = Cluster::new(&documents);
        ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]
            .into_iter()
            .filter(|addr| c.flags(addr) != 0)
            .collect()
    };
    assert_eq!(
        selected("{key: tier, operator: In, values: [front, back]}"),
        ["10.0.1.1", "10.0.1.2"]
    );
    assert_eq!(
        selected("{key: tier, operator: NotIn, values: [front]}"),
        ["10.0.1.2", "10.0.1.3", "10.0.1.4"],
        "NotIn holds where the key is absent"
    );
    assert_eq!(
        selected("{key: tier, operator: Exists}"),
        ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    );
    assert_eq!(
        selected("{key: legacy, operator: DoesNotExist}"),
        ["10.0.1.1", "10.0.1.2", "10.0.1.4"]
    );
    assert_eq!(
        selected("{key: tier, operator: Exists}, {key: legacy, operator: DoesNotExist}"),
        ["10.0.1.1", "10.0.1.2"],
        "every expression must hold"
    );
}

#[test]
fn match_labels_and_match_expressions_together() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "a", "app: web, tier: front", "node1", "10.0.1.1"),
        pod("x", "b", "app: web, tier: back", "node1", "10.0.1.2"),
        pod("x", "c", "app: db, tier: front", "node1", "10.0.1.3"),
        policy(
            "x",
            "p",
            "  podSelector:\n    matchLabels: {app: web}\n    matchExpressions: [{key: tier, operator: In, values: [front]}]",
        ),
    ]);
    assert_ne!(c.flags("10.0.1.1"), 0);
    assert_eq!(c.flags("10.0.1.2"), 0);
    assert_eq!(c.flags("10.0.1.3"), 0);
}

// ---- policyTypes -----------------------------------------------------------

#[test]
fn policy_types_given_or_inferred_decide_the_isolated_directions() {
    let flags = |spec: &str| {
        let c = Cluster::new(&[
            namespace("x", ""),
            pod("x", "a", "app: a", "node1", "10.0.1.1"),
            policy("x", "p", spec),
        ]);
        c.flags("10.0.1.1")
    };
    // Inferred: Ingress always, Egress when there are egress rules.
    assert_eq!(flags("  podSelector: {}"), ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(
        flags("  podSelector: {}\n  egress: [{}]"),
        ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(
        flags("  podSelector: {}\n  egress: []"),
        ENDPOINT_INGRESS_ISOLATED,
        "an empty egress list is no egress rule"
    );
    // Given.
    assert_eq!(
        flags("  podSelector: {}\n  policyTypes: [Egress]"),
        ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(
        flags("  podSelector: {}\n  policyTypes: [Ingress, Egress]"),
        ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED
    );
    // Rules of a type that is not listed are ignored.
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "a", "app: a", "node1", "10.0.1.1"),
        pod("x", "b", "app: b", "node1", "10.0.1.2"),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  ingress: [{}]",
        ),
    ]);
    assert_eq!(c.flags("10.0.1.1"), ENDPOINT_EGRESS_ISOLATED);
    assert_eq!(c.entries("10.0.1.1"), set(&[]));
    assert!(c.allowed("10.0.1.2", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.1.1", "10.0.1.2", TCP, 80));
}

#[test]
fn isolation_without_rules_denies_everything_in_that_direction() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "a", "app: a", "node1", "10.0.1.1"),
        pod("x", "b", "app: b", "node2", "10.0.2.1"),
        policy(
            "x",
            "deny",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
        ),
    ]);
    assert_eq!(c.entries("10.0.1.1"), set(&[]));
    assert!(!c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.1.1", "10.0.2.1", UDP, 53));
    assert!(!c.allowed("203.0.113.9", "10.0.1.1", TCP, 443));
    // The node itself still reaches its pods (kubelet probes).
    assert!(matches!(
        c.desired
            .verdict(ip("192.168.100.1"), ip("10.0.1.1"), TCP, 8080, true),
        Verdict::Allowed { .. }
    ));
}

#[test]
fn an_empty_rule_allows_everything_in_its_direction() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "a", "app: a", "node1", "10.0.1.1"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress: [{}]\n  egress: [{}]",
        ),
    ]);
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[(IN, IDENTITY_ANY, L4::Any), (OUT, IDENTITY_ANY, L4::Any)])
    );
    assert!(c.allowed("203.0.113.9", "10.0.1.1", 132, 9));
    assert!(c.allowed("10.0.1.1", "203.0.113.9", UDP, 53));
}

// ---- Peers -------------------------------------------------------------------

#[test]
fn a_pod_selector_peer_is_the_matching_pods_of_the_policy_namespace() {
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("y", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "client", "role: client", "node2", "10.0.2.1"),
        pod("x", "other", "role: other", "node2", "10.0.2.2"),
        pod("y", "client", "role: client", "node2", "10.0.2.3"),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]",
        ),
    ]);
    let client = c.id("10.0.2.1");
    assert_ne!(
        client,
        c.id("10.0.2.3"),
        "namespaces are part of identities"
    );
    assert_eq!(c.entries("10.0.1.1"), set(&[(IN, client, L4::Any)]));
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.2.2", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.2.3", "10.0.1.1", TCP, 80));
}

#[test]
fn a_namespace_selector_peer_is_every_pod_of_the_matching_namespaces() {
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("mon", "team: ops"),
        namespace("log", "team: ops"),
        namespace("dev", "team: dev"),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("mon", "prom", "app: prom", "node2", "10.0.2.1"),
        pod("log", "agent", "app: agent", "node2", "10.0.2.2"),
        pod("dev", "tool", "app: prom", "node2", "10.0.2.3"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]",
        ),
    ]);
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[
            (IN, c.id("10.0.2.1"), L4::Any),
            (IN, c.id("10.0.2.2"), L4::Any)
        ])
    );
    assert!(!c.allowed("10.0.2.3", "10.0.1.1", TCP, 80));
    // The name label every namespace has selects by name.
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("mon", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("mon", "prom", "app: prom", "node2", "10.0.2.1"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: mon}}}]",
        ),
    ]);
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
}

#[test]
fn both_selectors_in_one_peer_must_both_match() {
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("mon", "team: ops"),
        namespace("dev", "team: dev"),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("mon", "prom", "app: prom", "node2", "10.0.2.1"),
        pod("mon", "other", "app: other", "node2", "10.0.2.2"),
        pod("dev", "prom", "app: prom", "node2", "10.0.2.3"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: ops}}\n      podSelector: {matchLabels: {app: prom}}",
        ),
    ]);
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[(IN, c.id("10.0.2.1"), L4::Any)])
    );
    // Two peers instead of one: either matches.
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("mon", "team: ops"),
        namespace("dev", "team: dev"),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("mon", "prom", "app: prom", "node2", "10.0.2.1"),
        pod("mon", "other", "app: other", "node2", "10.0.2.2"),
        pod("dev", "prom", "app: prom", "node2", "10.0.2.3"),
        pod("x", "prom", "app: prom", "node2", "10.0.2.4"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: ops}}\n    - podSelector: {matchLabels: {app: prom}}",
        ),
    ]);
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(c.allowed("10.0.2.2", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.2.3", "10.0.1.1", TCP, 80));
    assert!(c.allowed("10.0.2.4", "10.0.1.1", TCP, 80));
}

#[test]
fn empty_selectors_mean_all_pods_of_the_namespace_or_all_namespaces() {
    let documents = |peer: &str| {
        vec![
            namespace("x", ""),
            namespace("y", ""),
            pod("x", "web", "app: web", "node1", "10.0.1.1"),
            pod("x", "a", "app: a", "node2", "10.0.2.1"),
            pod("y", "b", "app: b", "node2", "10.0.2.2"),
            policy(
                "x",
                "p",
                &format!(
                    "  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{peer}]"
                ),
            ),
        ]
    };
    let c = Cluster::new(&documents("{podSelector: {}}"));
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.2.2", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("203.0.113.9", "10.0.1.1", TCP, 80), "pods only");
    let c = Cluster::new(&documents("{namespaceSelector: {}}"));
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(c.allowed("10.0.2.2", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("203.0.113.9", "10.0.1.1", TCP, 80), "pods only");
    assert!(
        !c.allowed("192.168.100.2", "10.0.1.1", TCP, 80),
        "nodes are no pods"
    );
}

#[test]
fn an_ip_block_with_exceptions_matches_its_addresses_pods_included_ipv4() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "in", "app: in", "node2", "10.0.2.1"),
        pod("x", "out", "app: out", "node2", "10.0.3.1"),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.3.0/24]}}, {ipBlock: {cidr: 203.0.113.0/24}}]",
        ),
    ]);
    let (wide, hole, outside) = (
        c.cidr("10.0.0.0/8"),
        c.cidr("10.0.3.0/24"),
        c.cidr("203.0.113.0/24"),
    );
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[(IN, wide, L4::Any), (IN, outside, L4::Any)]),
        "the exception's own identity is not allowed"
    );
    // Prefixes are in the ipcache; pods carry the longest covering one.
    assert_eq!(c.desired.identities(ip("10.0.2.1")).cidr_identity, wide);
    assert_eq!(c.desired.identities(ip("10.0.3.1")).cidr_identity, hole);
    assert_eq!(c.desired.identities(ip("10.9.9.9")).identity, wide);
    assert!(
        c.allowed("10.0.2.1", "10.0.1.1", TCP, 80),
        "a pod in the block"
    );
    assert!(
        !c.allowed("10.0.3.1", "10.0.1.1", TCP, 80),
        "a pod in the exception"
    );
    assert!(
        c.allowed("10.9.9.9", "10.0.1.1", TCP, 80),
        "an address in the block"
    );
    assert!(!c.allowed("10.0.3.7", "10.0.1.1", TCP, 80));
    assert!(c.allowed("203.0.113.9", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("198.51.100.1", "10.0.1.1", TCP, 80));
    assert!(
        !c.allowed("192.168.100.2", "10.0.1.1", TCP, 80),
        "a node outside the blocks"
    );
}

#[test]
fn an_ip_block_with_exceptions_matches_its_addresses_pods_included_ipv6() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod_with("x", "web", "app: web", "node1", &["10.0.1.1", "fd00:1::1"], "", ""),
        pod_with("x", "in", "app: in", "node2", &["10.0.2.1", "fd00:2::1"], "", ""),
        pod_with("x", "out", "app: out", "node2", &["10.0.3.1", "fd00:3::1"], "", ""),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 'fd00::/16', except: ['fd00:3::/32']}}]",
        ),
    ]);
    assert_eq!(c.flags("fd00:1::1"), ENDPOINT_EGRESS_ISOLATED);
    assert_eq!(
        c.flags("10.0.1.1"),
        ENDPOINT_EGRESS_ISOLATED,
        "both addresses"
    );
    assert_eq!(
        c.entries("fd00:1::1"),
        set(&[(OUT, c.cidr("fd00::/16"), L4::Any)])
    );
    assert!(c.allowed("fd00:1::1", "fd00:2::1", TCP, 80));
    assert!(!c.allowed("fd00:1::1", "fd00:3::1", TCP, 80));
    assert!(c.allowed("fd00:1::1", "fd00:9::9", TCP, 80));
    assert!(
        c.allowed("fd00:1::1", "fd00::2", TCP, 80),
        "node2's IPv6 address"
    );
    assert!(!c.allowed("fd00:1::1", "2001:db8::1", TCP, 80));
    assert!(!c.allowed("10.0.1.1", "10.0.2.1", TCP, 80), "an IPv6 block");
}

// ---- Ports -------------------------------------------------------------------

#[test]
fn numeric_ports_ranges_and_protocols() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n    - {protocol: UDP, port: 5000, endPort: 5010}\n    - {protocol: SCTP, port: 9}\n    - {protocol: UDP}",
        ),
    ]);
    let udp = |port, prefix| L4::Ports {
        proto: UDP,
        port,
        prefix,
    };
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[
            (IN, IDENTITY_ANY, tcp(80)),
            (IN, IDENTITY_ANY, udp(5000, 13)),
            (IN, IDENTITY_ANY, udp(5008, 15)),
            (IN, IDENTITY_ANY, udp(5010, 16)),
            (
                IN,
                IDENTITY_ANY,
                L4::Ports {
                    proto: PROTO_SCTP,
                    port: 9,
                    prefix: 16
                }
            ),
            (IN, IDENTITY_ANY, L4::Proto(UDP)),
        ])
    );
    let peer = "203.0.113.9";
    assert!(c.allowed(peer, "10.0.1.1", TCP, 80));
    assert!(!c.allowed(peer, "10.0.1.1", TCP, 81));
    assert!(!c.allowed(peer, "10.0.1.1", TCP, 5000), "the range is UDP");
    assert!(c.allowed(peer, "10.0.1.1", UDP, 5010));
    assert!(c.allowed(peer, "10.0.1.1", UDP, 61000), "any UDP port");
    assert!(c.allowed(peer, "10.0.1.1", PROTO_SCTP, 9));
    assert!(!c.allowed(peer, "10.0.1.1", PROTO_SCTP, 10));
}

#[test]
fn peers_and_ports_of_one_rule_must_both_match() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "a", "app: a", "node2", "10.0.2.1"),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{port: 443}]",
        ),
    ]);
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[(IN, c.id("10.0.2.1"), tcp(443))])
    );
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 443));
    assert!(!c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("203.0.113.9", "10.0.1.1", TCP, 443));
}

#[test]
fn an_ingress_named_port_resolves_on_the_selected_pod() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod_with(
            "x",
            "a",
            "app: web",
            "node1",
            &["10.0.1.1"],
            "{name: http, containerPort: 8080}",
            "",
        ),
        pod_with(
            "x",
            "b",
            "app: web",
            "node1",
            &["10.0.1.2"],
            "{name: http, containerPort: 9090}",
            "",
        ),
        pod_with(
            "x",
            "c",
            "app: web",
            "node1",
            &["10.0.1.3"],
            "{name: http, containerPort: 8080, protocol: UDP}",
            "",
        ),
        policy(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: http}]",
        ),
    ]);
    // One identity (ingress named ports do not split it), three sets.
    assert_eq!(c.id("10.0.1.1"), c.id("10.0.1.2"));
    assert_eq!(c.entries("10.0.1.1"), set(&[(IN, IDENTITY_ANY, tcp(8080))]));
    assert_eq!(c.entries("10.0.1.2"), set(&[(IN, IDENTITY_ANY, tcp(9090))]));
    assert_eq!(
        c.entries("10.0.1.3"),
        set(&[]),
        "the UDP port of that name is another port"
    );
    assert!(c.allowed("203.0.113.9", "10.0.1.2", TCP, 9090));
    assert!(!c.allowed("203.0.113.9", "10.0.1.2", TCP, 8080));
}

#[test]
fn an_egress_named_port_resolves_on_the_destination_pod() {
    let c = Cluster::new(&[
        namespace("x", ""),
        namespace("kube-system", ""),
        pod("x", "client", "app: client", "node1", "10.0.1.1"),
        pod_with(
            "kube-system",
            "dns1",
            "k8s-app: dns",
            "node2",
            &["10.0.2.1"],
            "{name: dns, containerPort: 53, protocol: UDP}",
            "",
        ),
        pod_with(
            "kube-system",
            "dns2",
            "k8s-app: dns",
            "node2",
            &["10.0.2.2"],
            "{name: dns, containerPort: 5353, protocol: UDP}",
            "",
        ),
        pod("kube-system", "dns3", "k8s-app: dns", "node2", "10.0.2.3"),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {k8s-app: dns}}}]\n    ports: [{protocol: UDP, port: dns}]",
        ),
    ]);
    // The destinations' port numbers tell their identities apart.
    let (dns1, dns2, dns3) = (c.id("10.0.2.1"), c.id("10.0.2.2"), c.id("10.0.2.3"));
    assert!(dns1 != dns2 && dns2 != dns3 && dns1 != dns3);
    let udp = |port| L4::Ports {
        proto: UDP,
        port,
        prefix: 16,
    };
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[(OUT, dns1, udp(53)), (OUT, dns2, udp(5353))])
    );
    assert!(c.allowed("10.0.1.1", "10.0.2.1", UDP, 53));
    assert!(!c.allowed("10.0.1.1", "10.0.2.1", UDP, 5353));
    assert!(c.allowed("10.0.1.1", "10.0.2.2", UDP, 5353));
    assert!(
        !c.allowed("10.0.1.1", "10.0.2.3", UDP, 53),
        "no port of that name"
    );
}

#[test]
fn an_egress_named_port_to_any_peer_or_an_ip_block_matches_pods_only() {
    let documents = |to: &str| {
        vec![
            namespace("x", ""),
            pod("x", "client", "app: client", "node1", "10.0.1.1"),
            pod_with("x", "in", "app: srv", "node2", &["10.0.2.1"], "{name: web, containerPort: 8080}", ""),
            pod_with("x", "in2", "app: srv", "node2", &["10.0.2.2"], "{name: web, containerPort: 8080}", ""),
            pod_with("x", "out", "app: srv", "node2", &["10.0.3.1"], "{name: web, containerPort: 8080}", ""),
            policy(
                "x",
                "p",
                &format!("  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n  - {to}ports: [{{port: web}}]"),
            ),
        ]
    };
    // To any peer: every pod with the port.
    let c = Cluster::new(&documents(""));
    assert!(c.allowed("10.0.1.1", "10.0.2.1", TCP, 8080));
    assert!(c.allowed("10.0.1.1", "10.0.3.1", TCP, 8080));
    assert!(!c.allowed("10.0.1.1", "203.0.113.9", TCP, 8080), "no pod");
    assert_eq!(c.id("10.0.2.1"), c.id("10.0.3.1"));
    // To an ipBlock: the pods in the block (but not in its exception).
    let c = Cluster::new(&documents(
        "to: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}]\n    ",
    ));
    assert!(c.allowed("10.0.1.1", "10.0.2.1", TCP, 8080));
    assert!(!c.allowed("10.0.1.1", "10.0.2.1", TCP, 8081));
    assert!(
        !c.allowed("10.0.1.1", "10.0.2.2", TCP, 8080),
        "the exception"
    );
    assert!(
        !c.allowed("10.0.1.1", "10.0.3.1", TCP, 8080),
        "outside the block"
    );
    assert!(!c.allowed("10.0.1.1", "10.0.9.9", TCP, 8080), "no pod");
    // Pods with the port in and out of the block differ in identity.
    assert_ne!(c.id("10.0.2.1"), c.id("10.0.3.1"));
    assert_ne!(c.id("10.0.2.1"), c.id("10.0.2.2"));
    let labels = &c.desired.identities[&c.id("10.0.2.1")].text;
    assert!(
        labels.ends_with(",block:10.0.2.0/24!10.0.2.2/32"),
        "{labels}"
    );
    // A pod without the port is not split.
    assert_eq!(
        c.desired.identities[&c.id("10.0.1.1")].text,
        "ns=x,app=client"
    );
}

// ---- Several policies, and the pods that count -------------------------------

#[test]
fn policies_selecting_a_pod_add_up() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "a", "app: a", "node2", "10.0.2.1"),
        pod("x", "b", "app: b", "node2", "10.0.2.2"),
        policy(
            "x",
            "allow-a",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{port: 80}]",
        ),
        policy(
            "x",
            "allow-b",
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]",
        ),
        policy("x", "egress-dns", "  podSelector: {}\n  egress:\n  - ports: [{protocol: UDP, port: 53}]"),
    ]);
    assert_eq!(
        c.flags("10.0.1.1"),
        ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[
            (IN, c.id("10.0.2.1"), tcp(80)),
            (IN, c.id("10.0.2.2"), L4::Any),
            (
                OUT,
                IDENTITY_ANY,
                L4::Ports {
                    proto: UDP,
                    port: 53,
                    prefix: 16
                }
            ),
        ])
    );
    // Every entry names the rule that allows it.
    let set = c.desired.endpoints[&ip("10.0.1.1")].set;
    let rules: BTreeSet<&str> = c.desired.sets[&set]
        .entries
        .values()
        .map(|rule| c.desired.rules[rule].as_str())
        .collect();
    assert_eq!(
        rules,
        BTreeSet::from([
            "x/allow-a ingress[0]",
            "x/allow-b ingress[0]",
            "x/egress-dns egress[0]"
        ])
    );
    assert!(c.allowed("10.0.2.1", "10.0.1.1", TCP, 80));
    assert!(!c.allowed("10.0.2.1", "10.0.1.1", TCP, 81));
    assert!(c.allowed("10.0.2.2", "10.0.1.1", TCP, 81));
}

#[test]
fn host_network_pods_are_neither_endpoints_nor_identities() {
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod_with(
            "x",
            "agent",
            "app: agent",
            "node1",
            &["192.168.100.1"],
            "",
            "hostNetwork: true,",
        ),
        pod_with(
            "x",
            "agent2",
            "app: agent",
            "node2",
            &["192.168.100.2"],
            "",
            "hostNetwork: true,",
        ),
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: agent}}}]",
        ),
    ]);
    assert!(!c.desired.endpoints.contains_key(&ip("192.168.100.1")));
    assert_eq!(c.id("192.168.100.1"), IDENTITY_HOST);
    assert_eq!(c.id("192.168.100.2"), IDENTITY_REMOTE_NODE);
    assert_eq!(c.desired.identities.len(), 1, "only web's");
    assert_eq!(
        c.entries("10.0.1.1"),
        set(&[]),
        "the selector matches no pod"
    );
    assert!(!c.allowed("192.168.100.2", "10.0.1.1", TCP, 80));
}

#[test]
fn terminal_pods_are_ignored_and_pods_on_other_nodes_are_no_endpoints() {
    let mut done = pod("x", "job", "app: a", "node1", "10.0.1.2");
    done = done.replace("phase: Running", "phase: Succeeded");
    let mut failed = pod("x", "failed", "app: a", "node2", "10.0.2.2");
    failed = failed.replace("phase: Running", "phase: Failed");
    let c = Cluster::new(&[
        namespace("x", ""),
        pod("x", "web", "app: web", "node1", "10.0.1.1"),
        pod("x", "remote", "app: web", "node2", "10.0.2.1"),
        done,
        failed,
        policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]",
        ),
    ]);
    assert!(!c.desired.endpoints.contains_key(&ip("10.0.1.2")));
    assert!(
        !c.desired.endpoints.contains_key(&ip("10.0.2.1")),
        "node2's"
    );
    assert_eq!(c.id("10.0.1.2"), IDENTITY_WORLD);
    assert_eq!(c.id("10.0.2.2"), IDENTITY_WORLD);
    assert_eq!(c.entries("10.0.1.1"), set(&[]), "no pod has app=a");
    // A remote pod is in the ipcache, with its identity.
    assert_eq!(c.id("10.0.2.1"), c.id("10.0.1.1"));
}
