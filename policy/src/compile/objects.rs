//! What the compiler takes from Pods and Namespaces, and what policies say
//! that changes what identities stand for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Namespace;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    policy::PROTO_SCTP,
};
use lb_core::pod::PodInfo;

use super::sets::Compiled;
use crate::{
    labels::{Block, IdentityConfig, IdentityLabels, NamedPorts, NAMESPACE_NAME_LABEL},
    rules::{Namespaces, Peer, PodPeer, PortMatch},
    selector::Selector,
};

/// A pod, as far as policy is concerned. Its labels and named ports are
/// read from the object it holds when they are needed, not copied: at
/// 150,000 pods a copy of each label map costs about 80 MB.
#[derive(Clone, Debug)]
pub(super) struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Its addresses; none when it has ended.
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub host_network: bool,
    pod: Arc<PodInfo>,
}

impl PodFacts {
    /// The pod's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.pod.labels()
    }

    /// The pod's named container ports (the first of a name and protocol
    /// wins).
    pub fn named_ports(&self) -> NamedPorts {
        let mut named_ports = NamedPorts::new();
        let containers = self.pod.spec.iter().flat_map(|s| &s.containers);
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                continue;
            };
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => PROTO_UDP,
                "SCTP" => PROTO_SCTP,
                _ => PROTO_TCP,
            };
            named_ports.entry((name.clone(), proto)).or_insert(number);
        }
        named_ports
    }
}

/// What policy needs of a pod.
pub(super) fn pod_facts(pod: &Arc<PodInfo>, namespace: &str) -> PodFacts {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let terminal = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let mut ips: Vec<IpAddr> = Vec::new();
    if !terminal {
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        for text in listed {
            if let Ok(ip) = text.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    PodFacts {
        namespace: namespace.to_string(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        pod: pod.clone(),
    }
}

/// A namespace's labels, with the name label the API server sets (also when
/// a YAML directory has no Namespace object for it).
pub(super) fn namespace_labels(
    name: &str,
    namespace: Option<&Namespace>,
) -> BTreeMap<String, String> {
    let mut labels = namespace
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    labels
}

/// The parts of policies that change what identities stand for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct IdentityInputs {
    /// Excluded label keys some selector names.
    pub selected: BTreeSet<String>,
    /// Named ports (name, protocol) some egress rule names.
    pub egress_named: BTreeSet<(String, u8)>,
    /// The ipBlocks of egress rules with named ports, with those ports.
    pub blocks: BTreeMap<Block, BTreeSet<(String, u8)>>,
}

impl IdentityInputs {
    /// The inputs of `policies`: excluded keys a selector names, the
    /// (name, protocol) of every named port in an egress rule, and the
    /// ipBlocks of egress rules with named ports.
    pub(super) fn of<'a>(
        config: &IdentityConfig,
        policies: impl Iterator<Item = &'a Compiled>,
    ) -> Self {
        let mut inputs = Self::default();
        for compiled in policies {
            let policy = &compiled.policy;
            let mut note = |selector: &Selector| {
                for key in selector.keys() {
                    if config.excluded.iter().any(|e| e == key) {
                        inputs.selected.insert(key.to_string());
                    }
                }
            };
            note(&policy.pod_selector);
            for peer in &compiled.peers {
                note(&peer.pods);
                if let Namespaces::Matching(selector) = &peer.namespaces {
                    note(selector);
                }
            }
            for rule in policy.egress.iter().flatten() {
                let names: BTreeSet<(String, u8)> = rule
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|port| match &port.port {
                        PortMatch::Named(name) => Some((name.clone(), port.proto)),
                        _ => None,
                    })
                    .collect();
                if names.is_empty() {
                    continue;
                }
                for peer in rule.peers.iter().flatten() {
                    if let Peer::Block { cidr, except } = peer {
                        let block = Block {
                            cidr: *cidr,
                            except: except.clone(),
                        };
                        inputs
                            .blocks
                            .entry(block)
                            .or_default()
                            .extend(names.iter().cloned());
                    }
                }
                inputs.egress_named.extend(names);
            }
        }
        inputs
    }

    /// The identity labels of each of a pod's addresses, in a namespace
    /// with `namespace_labels`.
    pub(super) fn labels_of(
        &self,
        config: &IdentityConfig,
        facts: &PodFacts,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Vec<Arc<IdentityLabels>> {
        let excluded = &config.excluded;
        let pod_labels = facts
            .labels()
            .iter()
            .filter(|(key, _)| !excluded.contains(key) || self.selected.contains(*key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let named_ports: NamedPorts = facts
            .named_ports()
            .into_iter()
            .filter(|(key, _)| self.egress_named.contains(key))
            .collect();
        // Only blocks of rules naming one of the pod's ports split it.
        let blocks: Vec<&Block> = self
            .blocks
            .iter()
            .filter(|(_, names)| names.iter().any(|n| named_ports.contains_key(n)))
            .map(|(block, _)| block)
            .collect();
        let base = Arc::new(IdentityLabels {
            namespace: facts.namespace.clone(),
            namespace_labels: namespace_labels.clone(),
            pod_labels,
            named_ports,
            blocks: BTreeSet::new(),
        });
        facts
            .ips
            .iter()
            .map(|ip| {
                let inside: BTreeSet<Block> = blocks
                    .iter()
                    .filter(|b| b.contains(*ip))
                    .map(|b| (*b).clone())
                    .collect();
                if inside.is_empty() {
                    base.clone()
                } else {
                    Arc::new(IdentityLabels {
                        blocks: inside,
                        ..(*base).clone()
                    })
                }
            })
            .collect()
    }
}

/// Whether an identity's pods are peers of a pod peer.
pub(super) fn peer_matches(peer: &PodPeer, labels: &IdentityLabels) -> bool {
    let namespace_ok = match &peer.namespaces {
        Namespaces::Own(namespace) => *namespace == labels.namespace,
        Namespaces::Matching(selector) => selector.matches(&labels.namespace_labels),
    };
    namespace_ok && peer.pods.matches(&labels.pod_labels)
}
