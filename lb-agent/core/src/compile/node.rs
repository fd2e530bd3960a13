//! What the compiler needs to know about this node: where it runs
//! ([`Locality`]), its zone, and which of its pods opted out of socket-level
//! translation.

use std::{collections::BTreeSet, net::IpAddr};

use super::validation::Reporter;
use crate::intent::{
    NodeContext, ObjectError, Objects, SOCKET_LB_ANNOTATION, TO_BE_DELETED_TAINT, ZONE_LABEL,
};

/// Where this agent runs, for Local traffic policies and topology hints.
pub(super) struct Locality<'a> {
    pub(super) node: Option<&'a str>,
    pub(super) zone: Option<&'a str>,
    pub(super) node_port_addresses: &'a [IpAddr],
    pub(super) localhost_node_ports: bool,
    pub(super) per_packet_cluster_ips: bool,
    pub(super) per_packet_udp_cluster_ips: bool,
    pub(super) external_ip_cidrs: &'a [ipnetwork::IpNetwork],
}

/// UIDs of this node's pods annotated to opt out of socket-level translation.
/// A hostNetwork pod's annotation is reported and ignored: its packets cross
/// no pod interface, so the socket path is the only one that serves it.
pub(super) fn opted_out_pods(
    objects: &Objects,
    node: &NodeContext,
    errors: &mut Vec<ObjectError>,
) -> BTreeSet<String> {
    let Some(name) = node.name.as_deref() else {
        return BTreeSet::new();
    };
    let mut uids = BTreeSet::new();
    for sourced in &objects.pods {
        let pod = &sourced.object;
        if !pod.socket_lb_disabled || pod.node.as_deref() != Some(name) {
            continue;
        }
        if pod.host_network {
            let name = (!pod.name.is_empty()).then_some(&*pod.name);
            let report = Reporter::named(&sourced.origin, "Pod", &pod.namespace, name);
            errors.push(report.error(
                &format!("metadata.annotations[{SOCKET_LB_ANNOTATION}]"),
                "ignored on a hostNetwork pod: its packets cross no pod interface, \
                 so only socket-level translation serves it",
            ));
            continue;
        }
        if !pod.uid.is_empty() {
            uids.insert(pod.uid.to_string());
        }
    }
    uids
}

/// This node's zone, from its Node object's label.
pub(super) fn node_zone(objects: &Objects, node: &NodeContext) -> Option<String> {
    let name = node.name.as_deref()?;
    objects
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(name))?
        .object
        .metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// Whether this node should get new load-balancer traffic, as kube-proxy's
/// `/healthz` reports it (`nodeEligible`): not once its Node object is being
/// deleted or the cluster autoscaler has tainted it for deletion. Without a
/// Node object (a YAML directory without one) it is.
pub(super) fn node_eligible(objects: &Objects, node: &NodeContext) -> bool {
    let Some(name) = node.name.as_deref() else {
        return true;
    };
    let Some(found) = objects
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(name))
    else {
        return true;
    };
    let object = &found.object;
    let tainted = object
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    object.metadata.deletion_timestamp.is_none() && !tainted
}
