//! A generated cluster shaped like a real one, for benchmarks: namespaces
//! of teams and environments, Deployments and StatefulSets with the labels
//! their controllers put on pods (`app`, `tier`, `version`,
//! `pod-template-hash`, `controller-revision-hash`, ...), named container
//! ports, pods spread over nodes with per-node pod CIDRs, and
//! NetworkPolicies as clusters write them: default deny, allow from the
//! same namespace, from monitoring, from the ingress controller and load
//! balancer ranges, DNS and internet egress, backend to database on named
//! ports, matchExpressions, endPort ranges, cross-team rules, and ipBlocks
//! with named ports.

#![allow(dead_code)]

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{ContainerPort, Namespace, Node, NodeAddress, NodeStatus, PodIP},
        networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
            NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use lb_core::{
    intent::{Objects, Sourced},
    // The Pods as the agent decodes them, under the names of the objects
    // they come from, and as it keeps them.
    pod::{
        Pod as KeptPod, PodInfo as Pod, PodInfoContainer as Container, PodInfoSpec as PodSpec,
        PodInfoStatus as PodStatus, PodInterner,
    },
};

/// The size of a generated cluster.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Namespaces (at least 3: kube-system, monitoring, ingress).
    pub namespaces: usize,
    /// Deployments (or StatefulSets) per namespace.
    pub workloads: usize,
    /// Pods, spread over the namespaces' workloads.
    pub pods: usize,
    /// Nodes; the first is the one the compiler runs on.
    pub nodes: usize,
    /// NetworkPolicies, spread over the namespaces.
    pub policies: usize,
}

impl Shape {
    /// 100 namespaces, 10,000 pods on 50 nodes, 1,000 policies.
    pub const ISSUE: Shape = Shape {
        namespaces: 100,
        workloads: 10,
        pods: 10_000,
        nodes: 50,
        policies: 1_000,
    };
}

/// The node the compiler runs on.
pub const THIS_NODE: &str = "node-000";

const TIERS: [&str; 5] = ["frontend", "backend", "cache", "db", "worker"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

/// A small deterministic generator (SplitMix64).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn hash(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char)
            .collect()
    }
}

fn meta(name: &str, namespace: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        uid: Some(format!("{}-{name}-uid", namespace.unwrap_or(""))),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The name of namespace `n`.
pub fn namespace_name(n: usize) -> String {
    match n {
        0 => "kube-system".into(),
        1 => "monitoring".into(),
        2 => "ingress".into(),
        n => format!("team{:02}-{}-{n:03}", n % 20, ENVS[n % 3]),
    }
}

fn namespace(n: usize) -> Namespace {
    let name = namespace_name(n);
    let team = format!("team{:02}", n % 20);
    Namespace {
        metadata: meta(
            &name,
            None,
            labels(&[("team", &team), ("env", ENVS[n % 3])]),
        ),
        ..Namespace::default()
    }
}

fn node(i: usize) -> Node {
    Node {
        metadata: meta(&format!("node-{i:03}"), None, BTreeMap::new()),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: format!("192.168.{}.{}", i / 250, i % 250 + 1),
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn port(name: &str, number: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

/// The pod labels of workload `w` of namespace `n`, at `version`.
pub fn workload_labels(
    n: usize,
    w: usize,
    version: &str,
    hash: &str,
) -> (BTreeMap<String, String>, Vec<ContainerPort>) {
    let tier = TIERS[w % TIERS.len()];
    let app = if n == 0 && w == 0 {
        "kube-dns".to_string()
    } else if n == 1 && w == 0 {
        "prometheus".to_string()
    } else if n == 2 && w == 0 {
        "ingress-nginx".to_string()
    } else {
        format!("{tier}-{w}")
    };
    let mut pod_labels = labels(&[("app", &app), ("tier", tier), ("version", version)]);
    if n == 0 && w == 0 {
        pod_labels.insert("k8s-app".into(), "kube-dns".into());
    }
    let mut ports = vec![port("metrics", 9090, "TCP")];
    match tier {
        "frontend" => ports.push(port("http", 8080, "TCP")),
        "backend" => {
            ports.push(port("http", 8080, "TCP"));
            ports.push(port("grpc", 9000 + (w % 3) as i32, "TCP"));
        }
        "cache" => ports.push(port("redis", 6379, "TCP")),
        "db" => ports.push(port("postgres", 5432, "TCP")),
        _ => {}
    }
    if n == 0 && w == 0 {
        ports.push(port("dns", 53, "UDP"));
        ports.push(port("dns-tcp", 53, "TCP"));
    }
    // Deployments' pods carry the template hash, StatefulSets' (db) the
    // revision hash and their own name.
    if tier == "db" {
        pod_labels.insert("controller-revision-hash".into(), format!("{app}-{hash}"));
    } else {
        pod_labels.insert("pod-template-hash".into(), hash.to_string());
    }
    (pod_labels, ports)
}

/// Pod `i` of the cluster.
fn pod(
    shape: &Shape,
    i: usize,
    hashes: &BTreeMap<(usize, usize, bool), String>,
    slots: &mut [usize],
) -> Pod {
    let n = i % shape.namespaces;
    let w = (i / shape.namespaces) % shape.workloads;
    // One pod in ten is of a newer version, as during rollouts.
    let canary = (i / (shape.namespaces * shape.workloads)) % 10 == 9;
    let version = if canary { "v2" } else { "v1" };
    let (mut pod_labels, ports) = workload_labels(n, w, version, &hashes[&(n, w, canary)]);
    let name = format!("{}-{}", pod_labels["app"], i);
    if pod_labels.contains_key("controller-revision-hash") {
        pod_labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
    }
    // Spread every namespace's pods over the nodes (the scheduler does).
    let node = (n + i / shape.namespaces) % shape.nodes;
    let slot = slots[node];
    slots[node] += 1;
    let ip = format!("10.{}.{}.{}", 244 + node / 200, node % 200, slot % 250 + 2);
    Pod {
        metadata: meta(&name, Some(&namespace_name(n)), pod_labels),
        spec: Some(PodSpec {
            node_name: Some(format!("node-{node:03}")),
            containers: vec![Container {
                name: "main".into(),
                ports: Some(ports),
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
        }),
    }
}

fn selector(pairs: &[(&str, &str)]) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    })
}

fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    }
}

fn pods(pairs: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: selector(pairs),
        ..NetworkPolicyPeer::default()
    }
}

fn namespaced(
    namespaces: &[(&str, &str)],
    pod_pairs: Option<&[(&str, &str)]>,
) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: selector(namespaces),
        pod_selector: pod_pairs.and_then(selector),
        ip_block: None,
    }
}

fn block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: (!except.is_empty()).then(|| except.iter().map(|e| e.to_string()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn numbered(protocol: &str, number: i32, end: Option<i32>) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(number)),
        end_port: end,
    }
}

fn named(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::String(name.into())),
        end_port: None,
    }
}

fn ingress(
    from: Vec<NetworkPolicyPeer>,
    ports: Vec<NetworkPolicyPort>,
) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        from: (!from.is_empty()).then_some(from),
        ports: (!ports.is_empty()).then_some(ports),
    }
}

fn egress(to: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: (!to.is_empty()).then_some(to),
        ports: (!ports.is_empty()).then_some(ports),
    }
}

/// Policy `k` of namespace `n` (`k` in 0..10 gives ten kinds; more repeat
/// them with other selectors).
pub fn policy(n: usize, k: usize) -> NetworkPolicy {
    let namespace = namespace_name(n);
    let w = k / 10;
    let backend = format!("backend-{}", 1 + 5 * (w % 2));
    let mut spec = NetworkPolicySpec::default();
    let name = match k % 10 {
        0 => {
            spec.pod_selector = Some(LabelSelector::default());
            spec.policy_types = Some(vec!["Ingress".into()]);
            "default-deny-ingress"
        }
        1 => {
            spec.pod_selector = selector(&[("tier", "backend")]);
            spec.ingress = Some(vec![ingress(
                vec![pods(&[("tier", "frontend")])],
                vec![named("http")],
            )]);
            "frontend-to-backend"
        }
        2 => {
            spec.pod_selector = Some(LabelSelector::default());
            spec.ingress = Some(vec![ingress(
                vec![namespaced(
                    &[("kubernetes.io/metadata.name", "monitoring")],
                    Some(&[("app", "prometheus")]),
                )],
                vec![named("metrics")],
            )]);
            "allow-monitoring"
        }
        3 => {
            spec.pod_selector = selector(&[("tier", "frontend")]);
            spec.ingress = Some(vec![
                ingress(
                    vec![namespaced(
                        &[("kubernetes.io/metadata.name", "ingress")],
                        None,
                    )],
                    vec![numbered("TCP", 8080, None)],
                ),
                ingress(
                    vec![block("203.0.113.0/24", &[]), block("198.51.100.0/24", &[])],
                    vec![numbered("TCP", 443, None)],
                ),
            ]);
            "allow-ingress"
        }
        4 => {
            spec.pod_selector = Some(LabelSelector::default());
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(vec![egress(
                vec![namespaced(
                    &[("kubernetes.io/metadata.name", "kube-system")],
                    Some(&[("k8s-app", "kube-dns")]),
                )],
                vec![numbered("UDP", 53, None), numbered("TCP", 53, None)],
            )]);
            "allow-dns"
        }
        5 => {
            spec.pod_selector = selector(&[("tier", "frontend")]);
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(vec![egress(
                vec![block(
                    "0.0.0.0/0",
                    &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
                )],
                vec![numbered("TCP", 443, None)],
            )]);
            "allow-internet"
        }
        6 => {
            spec.pod_selector = selector(&[("tier", "backend")]);
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(vec![
                egress(vec![pods(&[("tier", "db")])], vec![named("postgres")]),
                egress(vec![pods(&[("tier", "cache")])], vec![named("redis")]),
            ]);
            "backend-to-stores"
        }
        7 => {
            spec.pod_selector = Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![expression("tier", "In", &["backend", "cache"])]),
            });
            spec.ingress = Some(vec![ingress(
                vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: None,
                        match_expressions: Some(vec![expression("env", "NotIn", &["dev"])]),
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: None,
                        match_expressions: Some(vec![
                            expression("tier", "Exists", &[]),
                            expression("version", "NotIn", &["v0"]),
                        ]),
                    }),
                    ip_block: None,
                }],
                vec![numbered("TCP", 9000, Some(9010))],
            )]);
            "allow-grpc-from-non-dev"
        }
        8 => {
            let team = format!("team{:02}", (n + 1) % 20);
            spec.pod_selector = selector(&[("app", &backend)]);
            spec.ingress = Some(vec![ingress(
                vec![namespaced(
                    &[("team", &team)],
                    Some(&[("tier", "frontend")]),
                )],
                vec![named("grpc")],
            )]);
            "cross-team"
        }
        _ => {
            spec.pod_selector = selector(&[("tier", "worker")]);
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(if n.is_multiple_of(10) {
                // Named ports to an ipBlock: pods in it on their port.
                vec![egress(
                    vec![block("10.244.0.0/16", &[])],
                    vec![named("http")],
                )]
            } else {
                vec![egress(
                    vec![block("10.96.0.0/12", &[])],
                    vec![numbered("TCP", 443, None)],
                )]
            });
            "worker-egress"
        }
    };
    NetworkPolicy {
        metadata: meta(&format!("{name}-{k}"), Some(&namespace), BTreeMap::new()),
        spec: Some(spec),
    }
}

fn sourced<T>(object: T) -> Sourced<T> {
    Sourced {
        origin: Arc::from("generated"),
        object: Arc::new(object),
    }
}

/// The objects of a cluster of `shape`.
pub fn generate(shape: &Shape) -> Objects {
    let mut random = Random(0x5eed);
    let mut hashes = BTreeMap::new();
    for n in 0..shape.namespaces {
        for w in 0..shape.workloads {
            for canary in [false, true] {
                hashes.insert((n, w, canary), random.hash(10));
            }
        }
    }
    let per_namespace = shape.policies.div_ceil(shape.namespaces);
    let mut slots = vec![0; shape.nodes];
    let mut interner = PodInterner::default();
    Objects {
        namespaces: (0..shape.namespaces)
            .map(|n| sourced(namespace(n)))
            .collect(),
        nodes: (0..shape.nodes).map(|i| sourced(node(i))).collect(),
        pods: (0..shape.pods)
            .map(|i| {
                sourced(KeptPod::keep(
                    pod(shape, i, &hashes, &mut slots),
                    &mut interner,
                ))
            })
            .collect(),
        network_policies: (0..shape.policies)
            .map(|i| {
                sourced(policy(
                    i % shape.namespaces,
                    i / shape.namespaces % per_namespace.max(1),
                ))
            })
            .collect(),
        ..Objects::default()
    }
}

/// Pod `index` of `objects` with its `version` label set to `version`
/// (a new object, as a watch hands it over).
pub fn relabeled(objects: &Objects, index: usize, version: &str) -> Sourced<KeptPod> {
    let mut pod = (*objects.pods[index].object).clone();
    let mut labels = (*pod.labels).clone();
    labels.insert("version".into(), version.into());
    pod.labels = Arc::new(labels);
    sourced(pod)
}

/// A policy that is not in a generated cluster, in namespace `n`: every
/// pod of it lets in the frontends of another team on its metrics port.
pub fn extra_policy(n: usize) -> Sourced<NetworkPolicy> {
    let mut policy = policy(n, 8);
    policy.metadata.name = Some("extra-cross-team".into());
    if let Some(spec) = policy.spec.as_mut() {
        spec.pod_selector = Some(LabelSelector::default());
        for rule in spec.ingress.iter_mut().flatten() {
            rule.ports = Some(vec![named("metrics")]);
        }
    }
    sourced(policy)
}

/// The first pod of tier `tier` that is (or is not) on this node.
pub fn pod_index(objects: &Objects, tier: &str, local: bool) -> usize {
    objects
        .pods
        .iter()
        .position(|p| {
            p.object.labels.get("tier").map(String::as_str) == Some(tier)
                && (p.object.node.as_deref() == Some(THIS_NODE)) == local
        })
        .expect("a pod of the tier")
}
