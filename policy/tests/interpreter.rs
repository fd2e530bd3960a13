//! Property tests: the compiled policy contents give every flow the verdict
//! a plain reading of the NetworkPolicy specification gives, for random
//! namespaces, pods and policies; and the result does not depend on the
//! order objects arrive in, nor on the updates that led to them.
//!
//! The interpreter below reads the Kubernetes objects directly and shares
//! no code with the compiler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

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
use lb_common::policy::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_FAIL_CLOSED,
    ENDPOINT_INGRESS_ISOLATED, IDENTITY_HOST, IDENTITY_WORLD,
};
// The Pods as the agent keeps them, under the names of the objects they
// come from.
use lb_core::intent::{Objects, Sourced};
use lb_core::pod::{
    PodInfo as Pod, PodInfoContainer as Container, PodInfoSpec as PodSpec,
    PodInfoStatus as PodStatus,
};
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig},
    desired::{PolicyDesired, PolicyLookup, Verdict},
    plan::{plan, PolicyCapacity},
    tables::{PolicyTables, PolicyTarget},
};
use proptest::prelude::*;

const NODE: &str = "node1";
const NODES: [(&str, &str); 2] = [("node1", "192.168.100.1"), ("node2", "192.168.100.2")];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const KEYS: [&str; 3] = ["app", "tier", "pod-template-hash"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 2] = ["http", "dns"];
const PROTOCOLS: [(&str, u8); 4] = [("TCP", 6), ("UDP", 17), ("SCTP", 132), ("ICMP", 1)];
const PORTS: [u16; 5] = [53, 80, 81, 5000, 5353];
/// Addresses outside the cluster, some inside the CIDRs below.
const EXTERNAL: [&str; 3] = ["192.0.2.10", "198.51.100.7", "2001:db8::7"];
/// ipBlocks, some with an exception, covering pods of both nodes, nodes
/// and outside hosts.
const BLOCKS: [(&str, Option<&str>); 10] = [
    ("10.244.0.0/16", Some("10.244.1.0/24")),
    ("10.244.0.0/16", Some("10.244.1.2/32")),
    ("10.244.1.0/24", Some("10.244.1.3/32")),
    ("10.244.1.2/32", None),
    ("0.0.0.0/0", Some("10.244.0.0/16")),
    ("0.0.0.0/0", Some("192.0.2.0/24")),
    ("192.0.2.0/24", None),
    ("192.168.100.0/24", Some("192.168.100.1/32")),
    ("2001:db8::/32", None),
    ("fd00:244::/32", Some("fd00:244:1::/48")),
];

// ---- The interpreter: the specification, read plainly -----------------

fn labels_match(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// Who is at an address, as the specification sees it.
struct Cluster<'a> {
    pods: &'a [Pod],
    namespaces: &'a [Namespace],
}

impl Cluster<'_> {
    fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|p| {
            p.status
                .iter()
                .flat_map(|s| s.pod_ips.iter().flatten())
                .any(|a| a.ip.parse::<IpAddr>().ok() == Some(ip))
        })
    }

    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), name.into());
        labels
    }

    fn selects(&self, policy: &NetworkPolicy, pod: &Pod) -> bool {
        policy.metadata.namespace == pod.metadata.namespace
            && labels_match(
                policy.spec.as_ref().unwrap().pod_selector.as_ref().unwrap(),
                pod.metadata.labels.as_ref().unwrap(),
            )
    }

    fn types(policy: &NetworkPolicy) -> (bool, bool) {
        let spec = policy.spec.as_ref().unwrap();
        match &spec.policy_types {
            Some(types) => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ),
            None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        }
    }

    fn peer_matches(&self, policy: &NetworkPolicy, peer: &NetworkPolicyPeer, ip: IpAddr) -> bool {
        if let Some(block) = &peer.ip_block {
            let inside = |cidr: &str| cidr.parse::<ipnetwork::IpNetwork>().unwrap().contains(ip);
            return inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e));
        }
        let Some(pod) = self.pod_at(ip) else {
            return false;
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap();
        let namespace_ok = match &peer.namespace_selector {
            Some(selector) => labels_match(selector, &self.namespace_labels(namespace)),
            None => policy.metadata.namespace.as_deref() == Some(namespace),
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|s| labels_match(s, pod.metadata.labels.as_ref().unwrap()));
        namespace_ok && pod_ok
    }

    fn port_matches(&self, port: &NetworkPolicyPort, proto: u8, number: u16, dst: IpAddr) -> bool {
        let wanted = PROTOCOLS
            .iter()
            .find(|(name, _)| *name == port.protocol.as_deref().unwrap_or("TCP"))
            .map(|(_, p)| *p);
        if wanted != Some(proto) {
            return false;
        }
        match &port.port {
            None => true,
            Some(IntOrString::Int(first)) => {
                let last = port.end_port.unwrap_or(*first);
                (*first..=last).contains(&i32::from(number))
            }
            Some(IntOrString::String(name)) => self.pod_at(dst).is_some_and(|pod| {
                pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
                    c.ports.iter().flatten().any(|p| {
                        p.name.as_deref() == Some(name)
                            && p.container_port == i32::from(number)
                            && p.protocol.as_deref().unwrap_or("TCP")
                                == port.protocol.as_deref().unwrap_or("TCP")
                    })
                })
            }),
        }
    }

    /// Whether `rule` (peers, ports) of `policy` matches a flow whose peer
    /// is `peer` and whose destination is `dst`.
    #[allow(clippy::too_many_arguments)]
    fn rule_matches(
        &self,
        policy: &NetworkPolicy,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        peer: IpAddr,
        dst: IpAddr,
        proto: u8,
        number: u16,
    ) -> bool {
        let peers_ok = match peers {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list.iter().any(|p| self.peer_matches(policy, p, peer)),
        };
        let ports_ok = match ports {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list
                .iter()
                .any(|p| self.port_matches(p, proto, number, dst)),
        };
        peers_ok && ports_ok
    }

    /// The verdict of node `NODE` for a flow.
    fn verdict(
        &self,
        policies: &[NetworkPolicy],
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        number: u16,
        from_host: bool,
    ) -> Verdict {
        let local = |pod: &Pod| pod.spec.as_ref().unwrap().node_name.as_deref() == Some(NODE);
        if let Some(pod) = self.pod_at(src).filter(|p| local(p)) {
            let selecting: Vec<&NetworkPolicy> = policies
                .iter()
                .filter(|p| self.selects(p, pod) && Self::types(p).1)
                .collect();
            if !selecting.is_empty()
                && !selecting.iter().any(|p| {
                    p.spec.as_ref().unwrap().egress.iter().flatten().any(|r| {
                        self.rule_matches(
                            p,
                            r.to.as_ref(),
                            r.ports.as_ref(),
                            dst,
                            dst,
                            proto,
                            number,
                        )
                    })
                })
            {
                return Verdict::DeniedEgress;
            }
        }
        if let Some(pod) = self.pod_at(dst).filter(|p| local(p)) {
            let selecting: Vec<&NetworkPolicy> = policies
                .iter()
                .filter(|p| self.selects(p, pod) && Self::types(p).0)
                .collect();
            // A pod cannot block its own node, whatever source address the
            // node's packet carries (kubelet probes).
            if !selecting.is_empty()
                && !from_host
                && !selecting.iter().any(|p| {
                    p.spec.as_ref().unwrap().ingress.iter().flatten().any(|r| {
                        self.rule_matches(
                            p,
                            r.from.as_ref(),
                            r.ports.as_ref(),
                            src,
                            dst,
                            proto,
                            number,
                        )
                    })
                })
            {
                return Verdict::DeniedIngress;
            }
        }
        Verdict::Allowed {
            egress: None,
            ingress: None,
        }
    }
}

// ---- Random clusters ---------------------------------------------------

fn label_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(str::to_string),
        prop::sample::select(&VALUES[..]).prop_map(str::to_string),
        0..3,
    )
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    let expression = (
        prop::sample::select(&KEYS[..]),
        prop::sample::select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
        prop::collection::btree_set(prop::sample::select(&VALUES[..]), 1..3),
    )
        .prop_map(|(key, operator, values)| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: matches!(operator, "In" | "NotIn")
                .then(|| values.into_iter().map(str::to_string).collect()),
        });
    (label_map(), prop::collection::vec(expression, 0..2)).prop_map(|(labels, expressions)| {
        LabelSelector {
            match_labels: (!labels.is_empty()).then_some(labels),
            match_expressions: (!expressions.is_empty()).then_some(expressions),
        }
    })
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        selector().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        selector().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        (selector(), selector()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..NetworkPolicyPeer::default()
        }),
        prop::sample::select(&BLOCKS[..]).prop_map(|(cidr, except)| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.into(),
                except: except.map(|e| vec![e.to_string()]),
            }),
            ..NetworkPolicyPeer::default()
        }),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = || prop::sample::select(&["TCP", "UDP", "SCTP"][..]);
    prop_oneof![
        protocol().prop_map(|p| NetworkPolicyPort {
            protocol: Some(p.into()),
            ..NetworkPolicyPort::default()
        }),
        (
            protocol(),
            prop::sample::select(&PORTS[..]),
            prop::option::of(0u16..10)
        )
            .prop_map(|(p, port, span)| NetworkPolicyPort {
                protocol: Some(p.into()),
                port: Some(IntOrString::Int(i32::from(port))),
                end_port: span.map(|s| i32::from(port + s)),
            }),
        (protocol(), prop::sample::select(&PORT_NAMES[..])).prop_map(|(p, name)| {
            NetworkPolicyPort {
                protocol: Some(p.into()),
                port: Some(IntOrString::String(name.into())),
                end_port: None,
            }
        }),
    ]
}

fn peers() -> impl Strategy<Value = Option<Vec<NetworkPolicyPeer>>> {
    prop::option::of(prop::collection::vec(peer(), 0..3))
}

fn ports() -> impl Strategy<Value = Option<Vec<NetworkPolicyPort>>> {
    prop::option::of(prop::collection::vec(port(), 0..3))
}

fn policy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
    let ingress = prop::option::of(prop::collection::vec(
        (peers(), ports()).prop_map(|(from, ports)| NetworkPolicyIngressRule { from, ports }),
        0..3,
    ));
    let egress = prop::option::of(prop::collection::vec(
        (peers(), ports()).prop_map(|(to, ports)| NetworkPolicyEgressRule { to, ports }),
        0..3,
    ));
    const TYPES: [&[&str]; 3] = [&["Ingress"], &["Egress"], &["Ingress", "Egress"]];
    let types = prop::option::of(prop::sample::select(&TYPES[..]));
    (
        prop::sample::select(&NAMESPACES[..]),
        selector(),
        ingress,
        egress,
        types,
    )
        .prop_map(
            move |(namespace, pod_selector, ingress, egress, types)| NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(format!("p{index}")),
                    namespace: Some(namespace.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(NetworkPolicySpec {
                    pod_selector: Some(pod_selector),
                    ingress,
                    egress,
                    policy_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                }),
            },
        )
}

fn pod(index: usize) -> impl Strategy<Value = Pod> {
    let named = prop::collection::btree_map(
        (
            prop::sample::select(&PORT_NAMES[..]),
            prop::sample::select(&["TCP", "UDP"][..]),
        ),
        prop::sample::select(&PORTS[..]),
        0..3,
    );
    (
        prop::sample::select(&NAMESPACES[..]),
        label_map(),
        prop::sample::select(&NODES[..]),
        any::<bool>(),
        named,
    )
        .prop_map(move |(namespace, labels, (node, _), v6, named)| {
            let node_index = if node == "node1" { 1 } else { 2 };
            let mut ips = vec![PodIP {
                ip: format!("10.244.{node_index}.{}", index + 2),
            }];
            if v6 {
                ips.push(PodIP {
                    ip: format!("fd00:244:{node_index}::{}", index + 2),
                });
            }
            let ports = named
                .into_iter()
                .map(|((name, proto), number)| ContainerPort {
                    name: Some(name.into()),
                    container_port: i32::from(number),
                    protocol: Some(proto.into()),
                    ..ContainerPort::default()
                })
                .collect();
            Pod {
                metadata: ObjectMeta {
                    name: Some(format!("pod{index}")),
                    namespace: Some(namespace.into()),
                    uid: Some(format!("uid-{index}")),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    node_name: Some(node.into()),
                    containers: vec![Container {
                        name: "c".into(),
                        ports: Some(ports),
                    }],
                    ..PodSpec::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(ips[0].ip.clone()),
                    pod_ips: Some(ips),
                    phase: Some("Running".into()),
                }),
            }
        })
}

fn namespace(name: &'static str) -> impl Strategy<Value = Namespace> {
    label_map().prop_map(move |labels| Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    })
}

#[derive(Clone, Debug)]
struct World {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
}

fn world() -> impl Strategy<Value = World> {
    let namespaces =
        (namespace("x"), namespace("y"), namespace("z")).prop_map(|(x, y, z)| vec![x, y, z]);
    let pods = (1usize..7).prop_flat_map(|n| (0..n).map(pod).collect::<Vec<_>>());
    let policies = (0usize..4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    (namespaces, pods, policies).prop_map(|(namespaces, pods, policies)| World {
        namespaces,
        pods,
        policies,
    })
}

fn nodes() -> Vec<Node> {
    NODES
        .iter()
        .map(|(name, ip)| Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.to_string(),
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        })
        .collect()
}

fn sourced<T>(objects: &[Arc<T>]) -> Vec<Sourced<T>> {
    objects
        .iter()
        .map(|o| Sourced {
            origin: Arc::from("test"),
            object: o.clone(),
        })
        .collect()
}

/// The objects of a world, as shared objects (so that unchanged ones keep
/// their address across updates, as the sources hand them over).
struct Shared {
    namespaces: Vec<Arc<Namespace>>,
    pods: Vec<Arc<lb_core::pod::Pod>>,
    policies: Vec<Arc<NetworkPolicy>>,
    nodes: Vec<Arc<Node>>,
}

impl Shared {
    fn new(world: &World) -> Self {
        Self {
            namespaces: world.namespaces.iter().cloned().map(Arc::new).collect(),
            pods: world
                .pods
                .iter()
                .map(|pod| Arc::new(pod.clone().into()))
                .collect(),
            policies: world.policies.iter().cloned().map(Arc::new).collect(),
            nodes: nodes().into_iter().map(Arc::new).collect(),
        }
    }

    fn objects(&self) -> Objects {
        Objects {
            namespaces: sourced(&self.namespaces),
            pods: sourced(&self.pods),
            network_policies: sourced(&self.policies),
            nodes: sourced(&self.nodes),
            ..Objects::default()
        }
    }
}

fn compile(objects: &Objects) -> PolicyDesired {
    let mut compiler = PolicyCompiler::new(
        PolicyConfig {
            node: Some(NODE.into()),
            ..PolicyConfig::default()
        },
        &Adopted::default(),
    );
    let update = compiler.update(objects);
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    compiler.desired().clone()
}

/// Every address a flow may have: pods, nodes, outside hosts.
fn addresses(world: &World) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = world
        .pods
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.pod_ips.iter().flatten()))
        .map(|a| a.ip.parse().unwrap())
        .collect();
    all.extend(NODES.iter().map(|(_, ip)| ip.parse::<IpAddr>().unwrap()));
    all.extend(EXTERNAL.iter().map(|ip| ip.parse::<IpAddr>().unwrap()));
    all
}

/// What an endpoint's set allows: (direction, peer's identity text, ports,
/// rule name).
type NamedEntries = BTreeSet<(u8, String, String, String)>;

/// A desired state with identities, sets and rules by what they stand for
/// rather than by number: identities, ipcache, endpoints (name, identity,
/// flags, entries), enforcing.
#[allow(clippy::type_complexity)]
fn normalized(
    desired: &PolicyDesired,
) -> (
    BTreeSet<String>,
    BTreeMap<String, (String, String)>,
    BTreeMap<IpAddr, (String, String, u32, NamedEntries)>,
    bool,
) {
    let text = |id: &u32| match desired.identities.get(id) {
        Some(info) => info.text.clone(),
        None => format!("reserved {id}"),
    };
    let identities = desired
        .identities
        .values()
        .map(|i| i.text.clone())
        .collect();
    let ipcache = desired
        .ipcache
        .iter()
        .map(|(prefix, v)| {
            (
                prefix.to_string(),
                (text(&v.identity), text(&v.cidr_identity)),
            )
        })
        .collect();
    let endpoints = desired
        .endpoints
        .iter()
        .map(|(ip, ep)| {
            let entries: NamedEntries = desired
                .sets
                .get(&ep.set)
                .iter()
                .flat_map(|set| &set.entries)
                .map(|(e, rule)| {
                    (
                        e.direction,
                        text(&e.identity),
                        format!("{:?}", e.l4),
                        desired.rules.get(rule).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            (
                *ip,
                (ep.name.clone(), text(&ep.identity), ep.flags, entries),
            )
        })
        .collect();
    (identities, ipcache, endpoints, desired.enforcing)
}

fn same_verdict(a: Verdict, b: Verdict) -> bool {
    matches!(
        (a, b),
        (Verdict::Allowed { .. }, Verdict::Allowed { .. })
            | (Verdict::DeniedEgress, Verdict::DeniedEgress)
            | (Verdict::DeniedIngress, Verdict::DeniedIngress)
    )
}

/// Checks every flow between `world`'s addresses against the interpreter.
fn check_all_flows(world: &World, desired: &PolicyDesired) -> Result<(), TestCaseError> {
    let cluster = Cluster {
        pods: &world.pods,
        namespaces: &world.namespaces,
    };
    let all = addresses(world);
    for &src in &all {
        for &dst in &all {
            if src == dst || src.is_ipv4() != dst.is_ipv4() {
                continue;
            }
            for (_, proto) in PROTOCOLS {
                for port in PORTS {
                    for from_host in [false, true] {
                        let expected =
                            cluster.verdict(&world.policies, src, dst, proto, port, from_host);
                        let actual = desired.verdict(src, dst, proto, port, from_host);
                        prop_assert!(
                            same_verdict(expected, actual),
                            "{src} -> {dst} proto {proto} port {port} from_host {from_host}: \
                             expected {expected}, compiled {actual}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn compiled_verdicts_equal_the_specification(world in world()) {
        let desired = compile(&Shared::new(&world).objects());
        check_all_flows(&world, &desired)?;
    }

    #[test]
    fn the_order_objects_arrive_in_changes_no_verdict(world in world(), seed in any::<u64>()) {
        let mut reversed = world.clone();
        reversed.pods.reverse();
        reversed.policies.reverse();
        // A rotation by `seed` as well: not only reversal.
        let turn = seed as usize % reversed.pods.len().max(1);
        reversed.pods.rotate_left(turn);
        let desired = compile(&Shared::new(&reversed).objects());
        check_all_flows(&world, &desired)?;
    }

    #[test]
    fn updates_reach_the_same_verdicts_as_a_fresh_compile(
        before in world(),
        after in world(),
        steps in 1usize..4,
    ) {
        // One compiler sees `before`, then pieces of `after` arriving over
        // a few updates, then `after` twice (the follow-up that releases
        // retired identities); its verdicts must be those of `after`.
        let mut compiler = PolicyCompiler::new(
            PolicyConfig { node: Some(NODE.into()), ..PolicyConfig::default() },
            &Adopted::default(),
        );
        let mut shared = Shared::new(&before);
        compiler.update(&shared.objects());
        let target = Shared::new(&after);
        let before_pods = shared.pods.clone();
        for step in 1..=steps {
            // The first pods of `after` replace those of `before` with the
            // same index (and so the same name); the rest keep their object.
            let taken = target.pods.len() * step / steps;
            shared.pods = target.pods[..taken].to_vec();
            if step < steps {
                shared.pods.extend(before_pods.iter().skip(taken).cloned());
            }
            if step == steps {
                shared.namespaces = target.namespaces.clone();
                shared.policies = target.policies.clone();
            }
            compiler.update(&shared.objects());
        }
        compiler.update(&shared.objects());
        let settled = compiler.update(&shared.objects());
        prop_assert!(!settled.follow_up, "one follow-up settles an update");
        check_all_flows(&after, compiler.desired())?;
        // Not only the verdicts: the same contents as a fresh compile,
        // numbers aside.
        prop_assert_eq!(
            normalized(compiler.desired()),
            normalized(&compile(&Shared::new(&after).objects()))
        );
    }

    #[test]
    fn every_write_of_a_plan_keeps_what_is_allowed_and_denied_on_both_sides(
        before in world(),
        after in world(),
    ) {
        let mut compiler = PolicyCompiler::new(
            PolicyConfig { node: Some(NODE.into()), ..PolicyConfig::default() },
            &Adopted::default(),
        );
        let mut tables = PolicyTables::default();
        let flows = sample_flows(&before, &after);
        for world in [&before, &after] {
            let objects = Shared::new(world).objects();
            // The update is planned and written like the agent does, and
            // then a follow-up releases what the update retired: the
            // writes of both keep every flow that has one verdict before
            // the first and after the second.
            let mut ops = Vec::new();
            let mut end = tables.clone();
            for _ in 0..2 {
                compiler.update(&objects);
                let target = PolicyTarget::new(compiler.desired(), |_| Some(1), true, true);
                let plan = plan(&end, &target, &PolicyCapacity::default(), &Default::default());
                for op in plan.ops() {
                    end.apply(op);
                    ops.push(op.clone());
                }
            }
            let mut midway = tables.clone();
            for op in &ops {
                midway.apply(op);
                for &(src, dst, proto, port) in &flows {
                    for (side, judge) in [("egress", egress_ok as Judge), ("ingress", ingress_ok)] {
                        let (first, last, now) = (
                            judge(&tables, src, dst, proto, port),
                            judge(&end, src, dst, proto, port),
                            judge(&midway, src, dst, proto, port),
                        );
                        prop_assert!(
                            now == first || first != last,
                            "{src} -> {dst} proto {proto} port {port}: {} by {side} before and \
                             after, but not after {op:?}",
                            if first { "allowed" } else { "denied" }
                        );
                    }
                }
            }
            tables = end;
        }
        check_all_flows(&after, compiler.desired())?;
    }
}

/// Whether one side of a flow lets it through.
type Judge = fn(&PolicyTables, IpAddr, IpAddr, u8, u16) -> bool;

/// The source pod's side of a flow: its egress policy. (The flow also
/// needs the destination's side: the two sides of a flow between two pods
/// of the node switch sets in separate writes, so only each side, not
/// their conjunction, is kept across the writes; see
/// `both_sides_switch_in_separate_writes`.)
fn egress_ok(tables: &PolicyTables, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
    match tables.endpoint(src) {
        Some((_, flags)) if flags & ENDPOINT_FAIL_CLOSED != 0 => false,
        Some((set, flags)) if flags & ENDPOINT_EGRESS_ISOLATED != 0 => tables
            .allows(set, DIRECTION_EGRESS, tables.identities(dst), proto, port)
            .is_some(),
        _ => true,
    }
}

/// The destination pod's side of a flow: its ingress policy.
fn ingress_ok(tables: &PolicyTables, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
    match tables.endpoint(dst) {
        Some((_, flags)) if flags & ENDPOINT_FAIL_CLOSED != 0 => false,
        Some((set, flags)) if flags & ENDPOINT_INGRESS_ISOLATED != 0 => {
            let mut peer = tables.identities(src);
            if peer.identity == IDENTITY_HOST {
                peer.identity = IDENTITY_WORLD;
            }
            tables
                .allows(set, DIRECTION_INGRESS, peer, proto, port)
                .is_some()
        }
        _ => true,
    }
}

/// Flows between the addresses both worlds have (a pod of only one of them
/// has no "before and after"), on a few protocols and ports.
fn sample_flows(a: &World, b: &World) -> Vec<(IpAddr, IpAddr, u8, u16)> {
    let in_b = addresses(b);
    let mut all: Vec<IpAddr> = addresses(a)
        .into_iter()
        .filter(|ip| in_b.contains(ip))
        .collect();
    all.sort();
    all.dedup();
    let mut flows = Vec::new();
    for &src in &all {
        for &dst in &all {
            if src == dst || src.is_ipv4() != dst.is_ipv4() {
                continue;
            }
            for (proto, port) in [(6, 80), (17, 53), (6, 5000)] {
                flows.push((src, dst, proto, port));
            }
        }
    }
    flows
}
