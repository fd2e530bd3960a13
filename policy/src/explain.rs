//! Policy in words, from what the policy maps hold: the tables `lbctl`
//! prints (identities, an endpoint's entries) and the verdict of a flow
//! with the rules that decide it.

use std::{fmt::Write as _, net::IpAddr, str::FromStr};

use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    policy::{
        DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_FAIL_CLOSED,
        ENDPOINT_INGRESS_ISOLATED, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABELS, PROTO_SCTP,
    },
};

use crate::{
    desired::{reserved_identity_name, PolicyLookup, Verdict, L4},
    tables::PolicyTables,
};

/// What cannot be explained.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// No pod of that name has an address in the maps.
    #[error("no pod {0} in the policy maps (give `namespace/name` or an address)")]
    UnknownPod(String),
    /// The pod is not one of this node's.
    #[error("{0} is not a pod of this node; ask the agent of its node")]
    NotLocal(String),
    /// A flow target could not be read.
    #[error("{0:?}: expected <namespace/pod|address>:<port>/<tcp|udp|sctp>")]
    BadTarget(String),
    /// The two ends have no addresses of one family.
    #[error("{0} and {1} have no addresses of the same family")]
    NoCommonFamily(String, String),
}

/// The protocol number of a name (`tcp`, `udp`, `sctp`).
fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "sctp" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// The name of a protocol number.
fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// The destination of a traced flow: `ns/pod:80/tcp`, `10.0.0.1:53/udp`,
/// `[fd00::1]:80/tcp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowTarget {
    /// A pod (`namespace/name`) or an address.
    pub peer: String,
    /// The destination port.
    pub port: u16,
    /// The protocol number.
    pub proto: u8,
}

impl FromStr for FlowTarget {
    type Err = ExplainError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ExplainError::BadTarget(text.to_string());
        let (rest, proto) = text.rsplit_once('/').ok_or_else(bad)?;
        let proto = protocol_number(proto).ok_or_else(bad)?;
        let (peer, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let peer = peer.trim_start_matches('[').trim_end_matches(']');
        if peer.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            peer: peer.to_string(),
            port,
            proto,
        })
    }
}

/// An identity in words: its number and what it stands for.
pub fn identity_text(tables: &PolicyTables, identity: u32) -> String {
    match tables.identities.get(&identity) {
        Some(info) => format!("{identity} ({})", info.text),
        None => match reserved_identity_name(identity) {
            Some(name) => format!("{identity} ({name})"),
            None => identity.to_string(),
        },
    }
}

fn identity_kind(identity: u32) -> &'static str {
    if identity >= IDENTITY_FIRST_CIDR {
        "cidr"
    } else if identity >= IDENTITY_FIRST_LABELS {
        "labels"
    } else {
        "reserved"
    }
}

/// Every identity in the maps: number, kind, how many addresses carry it,
/// and what it stands for.
pub fn identity_table(tables: &PolicyTables) -> String {
    let mut out = format!(
        "{:<7} {:<9} {:>9}  {}\n",
        "ID", "KIND", "ADDRESSES", "LABELS"
    );
    for (id, info) in &tables.identities {
        let addresses = tables
            .ipcache
            .values()
            .filter(|v| v.identity == *id)
            .count();
        let _ = writeln!(
            out,
            "{:<7} {:<9} {:>9}  {}",
            id,
            identity_kind(*id),
            addresses,
            info.text
        );
    }
    out
}

/// The addresses of a pod (`namespace/name`) or an address itself.
fn addresses_of(tables: &PolicyTables, peer: &str) -> Result<Vec<IpAddr>, ExplainError> {
    if let Ok(ip) = peer.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let found: Vec<IpAddr> = tables
        .pod_names
        .iter()
        .filter(|(_, name)| ***name == *peer)
        .map(|(ip, _)| *ip)
        .collect();
    if found.is_empty() {
        return Err(ExplainError::UnknownPod(peer.to_string()));
    }
    Ok(found)
}

fn l4_text(l4: &L4) -> (String, String) {
    match *l4 {
        L4::Any => ("any".into(), "any".into()),
        L4::Proto(proto) => (protocol_name(proto), "any".into()),
        L4::Ports {
            proto,
            port,
            prefix,
        } => {
            let last = port | (u16::MAX.checked_shr(u32::from(prefix)).unwrap_or(0));
            let ports = if last == port {
                port.to_string()
            } else {
                format!("{port}-{last}")
            };
            (protocol_name(proto), ports)
        }
    }
}

fn flags_text(flags: u32) -> String {
    let mut parts = Vec::new();
    if flags & ENDPOINT_INGRESS_ISOLATED != 0 {
        parts.push("ingress isolated");
    }
    if flags & ENDPOINT_EGRESS_ISOLATED != 0 {
        parts.push("egress isolated");
    }
    if flags & ENDPOINT_FAIL_CLOSED != 0 {
        parts.push("FAIL-CLOSED (its policy could not be programmed)");
    }
    if parts.is_empty() {
        "not isolated".into()
    } else {
        parts.join(", ")
    }
}

/// A pod of this node as the maps hold it: addresses, interface, identity,
/// isolation and every entry of its policy set with the rule it came from.
pub fn endpoint_report(tables: &PolicyTables, pod: &str) -> Result<String, ExplainError> {
    let addresses = addresses_of(tables, pod)?;
    let local: Vec<(IpAddr, _)> = addresses
        .iter()
        .filter_map(|ip| Some((*ip, tables.endpoints.get(ip)?)))
        .collect();
    let Some((_, endpoint)) = local.first() else {
        return Err(ExplainError::NotLocal(pod.to_string()));
    };
    let mut out = String::new();
    let list: Vec<String> = local.iter().map(|(ip, _)| ip.to_string()).collect();
    let _ = writeln!(out, "pod:       {pod}");
    let _ = writeln!(out, "addresses: {}", list.join(", "));
    let _ = writeln!(out, "interface: ifindex {}", endpoint.ifindex);
    let _ = writeln!(
        out,
        "identity:  {}",
        identity_text(tables, endpoint.identity)
    );
    let _ = writeln!(out, "policy:    {}", flags_text(endpoint.flags));
    let Some(set) = tables.sets.get(&endpoint.set) else {
        return Ok(out);
    };
    let _ = writeln!(
        out,
        "set:       {} ({} entries)",
        endpoint.set,
        set.entries.len()
    );
    let _ = writeln!(
        out,
        "\n{:<9} {:<40} {:<9} {:<12} RULE",
        "DIRECTION", "PEER", "PROTOCOL", "PORTS"
    );
    for (entry, rule) in &set.entries {
        let direction = if entry.direction == DIRECTION_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        let peer = if entry.identity == 0 {
            "any".to_string()
        } else {
            identity_text(tables, entry.identity)
        };
        let (proto, ports) = l4_text(&entry.l4);
        let rule = tables.rules.get(rule).map_or("?", String::as_str);
        let _ = writeln!(
            out,
            "{direction:<9} {peer:<40} {proto:<9} {ports:<12} {rule}"
        );
    }
    Ok(out)
}

/// A flow's verdict on this node, and the report of why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// Whether the flow is allowed.
    pub allowed: bool,
    /// The report: its first line is `allowed` or `denied ...`.
    pub text: String,
}

/// The verdict this node's maps give a flow from `from` (a pod or an
/// address) to `to`, after any service translation, and why.
pub fn trace(tables: &PolicyTables, from: &str, to: &FlowTarget) -> Result<Trace, ExplainError> {
    let sources = addresses_of(tables, from)?;
    let destinations = addresses_of(tables, &to.peer)?;
    let (src, dst) = sources
        .iter()
        .find_map(|s| {
            destinations
                .iter()
                .find(|d| d.is_ipv4() == s.is_ipv4())
                .map(|d| (*s, *d))
        })
        .ok_or_else(|| ExplainError::NoCommonFamily(from.to_string(), to.peer.clone()))?;
    let verdict = tables.verdict(src, dst, to.proto, to.port, false);
    let rule = |rule: Option<u32>| {
        rule.and_then(|r| tables.rules.get(&r)).map_or_else(
            || "not isolated".to_string(),
            |name| format!("allowed by {name}"),
        )
    };
    let (allowed, first) = match verdict {
        Verdict::Allowed { .. } => (true, "allowed".to_string()),
        other => (false, format!("denied: {other}")),
    };
    let side = |ip: IpAddr, name: &str| {
        let identity = tables.identities(ip).identity;
        let local = match tables.endpoints.get(&ip) {
            Some(ep) => flags_text(ep.flags),
            None => "not a pod of this node (its own node checks its side)".to_string(),
        };
        format!(
            "{name} {ip}, identity {}, {local}",
            identity_text(tables, identity)
        )
    };
    let mut text = format!("{first}\n");
    let _ = writeln!(text, "  from: {}", side(src, from));
    let _ = writeln!(
        text,
        "  to:   {} port {}/{}",
        side(dst, &to.peer),
        to.port,
        protocol_name(to.proto)
    );
    if let Verdict::Allowed { egress, ingress } = verdict {
        let _ = writeln!(text, "  egress of the source:       {}", rule(egress));
        let _ = writeln!(text, "  ingress of the destination: {}", rule(ingress));
    }
    Ok(Trace { allowed, text })
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use ipnetwork::IpNetwork;
    use lb_common::policy::{EndpointValue, IpcacheValue};

    use super::*;
    use crate::{
        desired::{Entry, IdentityInfo},
        labels::digest,
        plan::{plan, PolicyCapacity},
        tables::{AppliedSet, PolicyTarget},
    };

    fn tables() -> PolicyTables {
        let mut t = PolicyTables::default();
        for (id, text) in [(300, "x: pod=a"), (301, "y: pod=b")] {
            t.identities.insert(
                id,
                IdentityInfo {
                    digest: digest(text),
                    text: text.into(),
                },
            );
        }
        t.rules.insert(4, "x/allow-b ingress[0]".into());
        for (ip, id, name) in [("10.0.0.1", 300, "x/a"), ("10.0.1.1", 301, "y/b")] {
            let ip: IpAddr = ip.parse().unwrap();
            t.ipcache.insert(
                IpNetwork::from(ip),
                IpcacheValue {
                    identity: id,
                    cidr_identity: 2,
                },
            );
            t.pod_names.insert(ip, name.into());
        }
        t.endpoints.insert(
            "10.0.0.1".parse().unwrap(),
            EndpointValue {
                ifindex: 9,
                set: 1,
                identity: 300,
                flags: ENDPOINT_INGRESS_ISOLATED,
            },
        );
        let mut set = AppliedSet::default();
        set.entries.insert(
            Entry {
                direction: DIRECTION_INGRESS,
                identity: 301,
                l4: L4::Ports {
                    proto: PROTO_TCP,
                    port: 80,
                    prefix: 16,
                },
            },
            4,
        );
        t.sets.insert(1, set);
        t
    }

    #[test]
    fn targets_parse_with_names_and_both_families() {
        let t: FlowTarget = "y/b:80/tcp".parse().unwrap();
        assert_eq!((t.peer.as_str(), t.port, t.proto), ("y/b", 80, PROTO_TCP));
        let t: FlowTarget = "[fd00::1]:53/UDP".parse().unwrap();
        assert_eq!(
            (t.peer.as_str(), t.port, t.proto),
            ("fd00::1", 53, PROTO_UDP)
        );
        assert!("y/b:80".parse::<FlowTarget>().is_err());
        assert!("y/b:http/tcp".parse::<FlowTarget>().is_err());
    }

    #[test]
    fn a_trace_names_the_rule_that_allows_and_says_why_it_denies() {
        let t = tables();
        let allowed = trace(&t, "y/b", &"x/a:80/tcp".parse().unwrap()).unwrap();
        assert!(allowed.allowed);
        assert!(allowed.text.starts_with("allowed\n"));
        assert!(
            allowed.text.contains("allowed by x/allow-b ingress[0]"),
            "{}",
            allowed.text
        );
        let denied = trace(&t, "y/b", &"x/a:81/tcp".parse().unwrap()).unwrap();
        assert!(!denied.allowed);
        assert!(denied
            .text
            .starts_with("denied: denied by the destination's ingress policy"));
        assert_eq!(
            trace(&t, "z/c", &"x/a:80/tcp".parse().unwrap()),
            Err(ExplainError::UnknownPod("z/c".into()))
        );
    }

    #[test]
    fn an_endpoint_report_lists_its_entries_with_their_rules() {
        let t = tables();
        let report = endpoint_report(&t, "x/a").unwrap();
        assert!(report.contains("ingress isolated"));
        assert!(report.contains("301 (y: pod=b)"));
        assert!(report.contains("x/allow-b ingress[0]"));
        assert_eq!(
            endpoint_report(&t, "y/b"),
            Err(ExplainError::NotLocal("y/b".into()))
        );
        let identities = identity_table(&t);
        assert!(identities.contains("labels"), "{identities}");
    }

    #[test]
    fn reports_work_on_planned_tables() {
        // Tables that a plan wrote read the same as hand-made ones.
        let t = tables();
        let mut target = PolicyTarget {
            identities: Cow::Owned(t.identities.clone()),
            rules: t.rules.clone(),
            ipcache: Cow::Owned(t.ipcache.clone()),
            endpoints: t.endpoints.clone(),
            pod_names: Cow::Owned(t.pod_names.clone()),
            enforcing: true,
            ..PolicyTarget::default()
        };
        target.sets.to_mut().insert(
            1,
            Arc::new(crate::desired::SetContent {
                entries: t.sets[&1].entries.clone(),
                digest: digest("set"),
            }),
        );
        let planned = plan(
            &PolicyTables::default(),
            &target,
            &PolicyCapacity::default(),
            &Default::default(),
        );
        let mut written = PolicyTables::default();
        for op in planned.ops() {
            written.apply(op);
        }
        assert!(
            trace(&written, "y/b", &"x/a:80/tcp".parse().unwrap())
                .unwrap()
                .allowed
        );
    }
}
