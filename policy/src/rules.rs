//! NetworkPolicy objects, validated into [`Policy`]: the pods it selects,
//! the directions it isolates and its rules. An invalid part is reported
//! with its field and narrows what the policy allows, never widens it: an
//! invalid peer or port matches nothing, and a policy whose pod selector is
//! invalid is left out whole (the API server would have refused it).

use std::{fmt, net::IpAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    policy::PROTO_SCTP,
};
use lb_core::intent::ObjectError;

use crate::selector::Selector;

/// `namespace/name` of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which namespaces a pod peer's pods come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespaces {
    /// The policy's own namespace (a peer with only a pod selector).
    Own(String),
    /// Every namespace whose labels match.
    Matching(Selector),
}

/// Pods matching `pods` in the namespaces `namespaces` names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPeer {
    /// The namespaces.
    pub namespaces: Namespaces,
    /// The pod selector.
    pub pods: Selector,
}

/// Who a rule lets in (ingress) or out to (egress).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods of some namespaces.
    Pods(PodPeer),
    /// Addresses in `cidr` but in none of `except`.
    Block {
        /// The block.
        cidr: IpNetwork,
        /// Blocks inside it that are left out.
        except: Vec<IpNetwork>,
    },
}

/// Which destination ports of a protocol a rule allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port.
    Any,
    /// `first..=last`.
    Range(u16, u16),
    /// A named container port, resolved on the destination pod.
    Named(String),
}

/// A port entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    /// The IP protocol.
    pub proto: u8,
    /// The ports.
    pub port: PortMatch,
}

/// One ingress or egress rule: peers and ports, both must match. `None`
/// matches everything; an empty list matches nothing (every entry was
/// invalid).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// Its position in the policy's list, for reports.
    pub index: usize,
    /// `from` (ingress) or `to` (egress).
    pub peers: Option<Vec<Peer>>,
    /// `ports`.
    pub ports: Option<Vec<Port>>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    /// `namespace/name`.
    pub id: PolicyRef,
    /// The pods of its namespace it applies to.
    pub pod_selector: Selector,
    /// Ingress rules, when it isolates its pods for ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules, when it isolates its pods for egress.
    pub egress: Option<Vec<Rule>>,
}

/// Builds the errors of one policy.
struct Reporter<'a> {
    origin: &'a str,
    object: String,
    errors: &'a mut Vec<ObjectError>,
}

impl Reporter<'_> {
    fn error(&mut self, field: String, reason: impl Into<String>) {
        self.errors.push(ObjectError {
            origin: self.origin.to_string(),
            object: self.object.clone(),
            field,
            reason: reason.into(),
        });
    }
}

/// Validates a NetworkPolicy; `None` when it cannot be used at all. Every
/// problem is reported in `errors` with the field.
pub fn parse_policy(
    origin: &str,
    policy: &NetworkPolicy,
    errors: &mut Vec<ObjectError>,
) -> Option<Policy> {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut report = Reporter {
        origin,
        object: format!(
            "NetworkPolicy {namespace}/{}",
            policy.metadata.name.as_deref().unwrap_or("(unnamed)")
        ),
        errors,
    };
    let Some(name) = policy.metadata.name.clone() else {
        report.error("metadata.name".into(), "missing");
        return None;
    };
    let Some(spec) = &policy.spec else {
        report.error("spec".into(), "missing");
        return None;
    };
    let pod_selector = match spec.pod_selector.as_ref().map(Selector::parse) {
        None => Selector::everything(),
        Some(Ok(selector)) => selector,
        Some(Err(e)) => {
            report.error(
                format!("spec.podSelector.{}", e.field),
                format!("{}; the policy is not applied", e.reason),
            );
            return None;
        }
    };
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut ingress_isolated, mut egress_isolated) = (true, has_egress);
    if let Some(types) = &spec.policy_types {
        ingress_isolated = false;
        egress_isolated = false;
        for (i, kind) in types.iter().enumerate() {
            match kind.as_str() {
                "Ingress" => ingress_isolated = true,
                "Egress" => egress_isolated = true,
                other => report.error(
                    format!("spec.policyTypes[{i}]"),
                    format!("{other:?} is not Ingress or Egress"),
                ),
            }
        }
    }
    let id = PolicyRef { namespace, name };
    let ingress = ingress_isolated.then(|| {
        spec.ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, rule)| {
                let field = format!("spec.ingress[{i}]");
                parse_rule(
                    i,
                    &field,
                    "from",
                    rule.from.as_deref(),
                    rule.ports.as_deref(),
                    &id,
                    &mut report,
                )
            })
            .collect()
    });
    let egress = egress_isolated.then(|| {
        spec.egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, rule)| {
                let field = format!("spec.egress[{i}]");
                parse_rule(
                    i,
                    &field,
                    "to",
                    rule.to.as_deref(),
                    rule.ports.as_deref(),
                    &id,
                    &mut report,
                )
            })
            .collect()
    });
    Some(Policy {
        id,
        pod_selector,
        ingress,
        egress,
    })
}

fn parse_rule(
    index: usize,
    field: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    id: &PolicyRef,
    report: &mut Reporter<'_>,
) -> Rule {
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers
            .iter()
            .enumerate()
            .filter_map(|(i, peer)| {
                parse_peer(peer, &format!("{field}.{peers_field}[{i}]"), id, report)
            })
            .collect()
    });
    let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
        ports
            .iter()
            .enumerate()
            .filter_map(|(i, port)| parse_port(port, &format!("{field}.ports[{i}]"), report))
            .collect()
    });
    Rule {
        index,
        peers,
        ports,
    }
}

fn parse_peer(
    peer: &NetworkPolicyPeer,
    field: &str,
    id: &PolicyRef,
    report: &mut Reporter<'_>,
) -> Option<Peer> {
    let selector = |selector: &Option<_>, part: &str, report: &mut Reporter<'_>| {
        selector
            .as_ref()
            .map(Selector::parse)
            .transpose()
            .map_err(|e| {
                report.error(
                    format!("{field}.{part}.{}", e.field),
                    format!("{}; the peer matches nothing", e.reason),
                );
            })
    };
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            report.error(
                format!("{field}.ipBlock"),
                "ipBlock cannot be combined with a selector; the peer matches nothing",
            );
            return None;
        }
        return parse_block(&block.cidr, block.except.as_deref(), field, report);
    }
    let pods = selector(&peer.pod_selector, "podSelector", report).ok()?;
    let namespaces = selector(&peer.namespace_selector, "namespaceSelector", report).ok()?;
    match (pods, namespaces) {
        (None, None) => {
            report.error(
                field.to_string(),
                "a peer needs a podSelector, a namespaceSelector or an ipBlock; it matches nothing",
            );
            None
        }
        (pods, None) => Some(Peer::Pods(PodPeer {
            namespaces: Namespaces::Own(id.namespace.clone()),
            pods: pods.unwrap_or_default(),
        })),
        (pods, Some(namespaces)) => Some(Peer::Pods(PodPeer {
            namespaces: Namespaces::Matching(namespaces),
            pods: pods.unwrap_or_default(),
        })),
    }
}

/// Parses a CIDR as the API server accepts it: an address and a prefix
/// length (host bits are masked off).
fn parse_cidr(text: &str) -> Result<IpNetwork, String> {
    let network: IpNetwork = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR"))?;
    if !text.contains('/') {
        return Err(format!("{text:?} is not a CIDR (no prefix length)"));
    }
    IpNetwork::new(network.network(), network.prefix()).map_err(|e| e.to_string())
}

fn parse_block(
    cidr: &str,
    except: Option<&[String]>,
    field: &str,
    report: &mut Reporter<'_>,
) -> Option<Peer> {
    let cidr = match parse_cidr(cidr) {
        Ok(cidr) => cidr,
        Err(reason) => {
            report.error(
                format!("{field}.ipBlock.cidr"),
                format!("{reason}; the peer matches nothing"),
            );
            return None;
        }
    };
    let mut excepts = Vec::new();
    for (i, text) in except.iter().copied().flatten().enumerate() {
        let part = format!("{field}.ipBlock.except[{i}]");
        match parse_cidr(text) {
            Ok(except) if within(&except, &cidr) => excepts.push(except),
            Ok(_) => {
                report.error(
                    part,
                    format!("{text:?} is not within {cidr}; the peer matches nothing"),
                );
                return None;
            }
            Err(reason) => {
                report.error(part, format!("{reason}; the peer matches nothing"));
                return None;
            }
        }
    }
    excepts.sort();
    excepts.dedup();
    Some(Peer::Block {
        cidr,
        except: excepts,
    })
}

/// Whether `inner` lies within `outer` (same family, no shorter prefix).
pub fn within(inner: &IpNetwork, outer: &IpNetwork) -> bool {
    let same_family = matches!(
        (inner.ip(), outer.ip()),
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
    );
    same_family && inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

fn parse_port(port: &NetworkPolicyPort, field: &str, report: &mut Reporter<'_>) -> Option<Port> {
    let proto = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        other => {
            report.error(
                format!("{field}.protocol"),
                format!("{other:?} is not TCP, UDP or SCTP; the entry matches nothing"),
            );
            return None;
        }
    };
    let number = |value: i32, part: &str, report: &mut Reporter<'_>| {
        u16::try_from(value).ok().filter(|p| *p != 0).or_else(|| {
            report.error(
                format!("{field}.{part}"),
                format!("{value} is not a port number (1-65535); the entry matches nothing"),
            );
            None
        })
    };
    let matching = match (&port.port, port.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => {
            report.error(
                format!("{field}.endPort"),
                "endPort needs a numeric port; the entry matches nothing",
            );
            return None;
        }
        (Some(IntOrString::Int(first)), end) => {
            let first = number(*first, "port", report)?;
            let last = match end {
                Some(end) => number(end, "endPort", report)?,
                None => first,
            };
            if last < first {
                report.error(
                    format!("{field}.endPort"),
                    format!("{last} is below port {first}; the entry matches nothing"),
                );
                return None;
            }
            PortMatch::Range(first, last)
        }
        (Some(IntOrString::String(name)), None) => PortMatch::Named(name.clone()),
        (Some(IntOrString::String(_)), Some(_)) => {
            report.error(
                format!("{field}.endPort"),
                "endPort cannot follow a named port; the entry matches nothing",
            );
            return None;
        }
    };
    Some(Port {
        proto,
        port: matching,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::yaml::parse_documents;

    fn parse(text: &str) -> (Option<Policy>, Vec<ObjectError>) {
        let parsed = parse_documents("p.yaml", text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut errors = Vec::new();
        let policy = parse_policy(
            "p.yaml",
            &parsed.objects.network_policies[0].object,
            &mut errors,
        );
        (policy, errors)
    }

    #[test]
    fn policy_types_are_inferred_from_the_rules_present() {
        let (policy, errors) = parse(
            "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: [{}]\n",
        );
        assert!(errors.is_empty());
        let policy = policy.unwrap();
        assert_eq!(policy.ingress, Some(vec![]));
        assert_eq!(
            policy.egress,
            Some(vec![Rule {
                index: 0,
                peers: None,
                ports: None
            }])
        );
        let (policy, _) = parse(
            "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
        );
        let policy = policy.unwrap();
        assert!(
            policy.ingress.is_none(),
            "rules of an unlisted type are ignored"
        );
        assert_eq!(policy.egress, Some(vec![]));
    }

    #[test]
    fn peers_and_ports_of_every_kind_parse() {
        let (policy, errors) = parse(
            r#"
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {}
    - ipBlock: {cidr: 10.0.0.7/8, except: [10.1.0.0/16]}
    ports:
    - port: 80
    - {protocol: UDP, port: 5000, endPort: 5010}
    - port: serve-81-tcp
    - {protocol: SCTP}
"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let rule = &policy.unwrap().ingress.unwrap()[0];
        let peers = rule.peers.as_ref().unwrap();
        assert!(
            matches!(&peers[0], Peer::Pods(PodPeer { namespaces: Namespaces::Own(ns), .. }) if ns == "x")
        );
        assert!(matches!(
            &peers[1],
            Peer::Pods(PodPeer {
                namespaces: Namespaces::Matching(_),
                pods
            }) if pods.is_everything()
        ));
        assert_eq!(
            peers[2],
            Peer::Block {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()]
            }
        );
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports[0].port, PortMatch::Range(80, 80));
        assert_eq!(ports[1].port, PortMatch::Range(5000, 5010));
        assert_eq!(ports[2].port, PortMatch::Named("serve-81-tcp".into()));
        assert_eq!(
            (ports[3].proto, &ports[3].port),
            (PROTO_SCTP, &PortMatch::Any)
        );
    }

    #[test]
    fn invalid_parts_narrow_the_rule_and_are_reported_with_their_field() {
        let (policy, errors) = parse(
            r#"
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/33}
    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}
    - {}
    ports:
    - {protocol: ICMP}
    - {port: 0}
    - {port: 90, endPort: 80}
"#,
        );
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ingress[0].from[0].ipBlock.cidr",
                "spec.ingress[0].from[1].ipBlock.except[0]",
                "spec.ingress[0].from[2]",
                "spec.ingress[0].ports[0].protocol",
                "spec.ingress[0].ports[1].port",
                "spec.ingress[0].ports[2].endPort",
            ]
        );
        let rule = &policy.unwrap().ingress.unwrap()[0];
        // Nothing valid is left: the rule matches nothing (not everything).
        assert_eq!(rule.peers, Some(vec![]));
        assert_eq!(rule.ports, Some(vec![]));
        let (policy, errors) = parse(
            "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
        );
        assert!(policy.is_none());
        assert_eq!(
            errors[0].field,
            "spec.podSelector.matchExpressions[0].values"
        );
    }
}
