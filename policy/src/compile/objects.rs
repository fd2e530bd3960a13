//! What the compiler takes from Pods and Namespaces, and what policies say
//! that changes what identities stand for.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Namespace;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    policy::PROTO_SCTP,
};
use lb_core::pod::Pod;

use super::sets::Compiled;
use crate::{
    labels::{Block, IdentityConfig, IdentityLabels, NamedPorts, NAMESPACE_NAME_LABEL},
    rules::{Namespaces, Peer, PodPeer, PortMatch},
    selector::Selector,
};

/// A pod's named container ports (the first of a name and protocol wins).
pub(super) fn named_ports(pod: &Pod) -> NamedPorts {
    let mut named_ports = NamedPorts::new();
    for port in pod.named_ports.iter() {
        let proto = match port.protocol.as_str() {
            "UDP" => PROTO_UDP,
            "SCTP" => PROTO_SCTP,
            _ => PROTO_TCP,
        };
        named_ports
            .entry((port.name.clone(), proto))
            .or_insert(port.number);
    }
    named_ports
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
        pod: &Pod,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Vec<Arc<IdentityLabels>> {
        let excluded = &config.excluded;
        let pod_labels = pod
            .labels
            .iter()
            .filter(|(key, _)| !excluded.contains(key) || self.selected.contains(*key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let named_ports: NamedPorts = named_ports(pod)
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
            namespace: pod.namespace.to_string(),
            namespace_labels: namespace_labels.clone(),
            pod_labels,
            named_ports,
            blocks: BTreeSet::new(),
        });
        pod.ips
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
