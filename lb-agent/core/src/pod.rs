//! A Pod as the agent keeps it ([`PodInfo`]): the fields policy, the
//! socket-translation opt-out and node facts read, with the paths and names
//! of the Kubernetes object, and nothing else. The full `Pod` type takes
//! over 4 KiB in memory before any of its strings (its spec alone 1.4 KiB,
//! each container 2.1 KiB), so a cluster of 150,000 Pods cost the agent
//! about a gigabyte; decoding straight into this type never allocates the
//! rest.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ContainerPort, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    NamespaceResourceScope,
};
use serde::{Deserialize, Serialize};

/// What the agent keeps of a Pod.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodInfo {
    /// Name, namespace, UID, labels, annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Where it runs and its named ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodInfoSpec>,
    /// Its phase and addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodInfoStatus>,
}

/// What the agent keeps of a Pod's spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoSpec {
    /// `spec.nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `spec.hostNetwork`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    /// `spec.containers`: their names and ports.
    #[serde(default)]
    pub containers: Vec<PodInfoContainer>,
}

/// What the agent keeps of a container: its named ports, for policies that
/// name a port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodInfoContainer {
    /// `name`.
    #[serde(default)]
    pub name: String,
    /// `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
}

/// What the agent keeps of a Pod's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodInfoStatus {
    /// `status.phase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `status.podIP`.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`.
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

impl k8s_openapi::Resource for PodInfo {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodInfo {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodInfo {
    /// The Pod's labels (none: empty).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.labels.as_ref().unwrap_or(&NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pod_decodes_into_what_the_agent_keeps() {
        let json = r#"{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1",
                         "labels": {"app": "web"}, "annotations": {"lb.dev/socket-lb": "disabled"}},
            "spec": {"nodeName": "node1", "hostNetwork": false, "restartPolicy": "Always",
                     "volumes": [{"name": "v", "emptyDir": {}}],
                     "containers": [{"name": "c", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }"#;
        let pod: PodInfo = serde_json::from_str(json).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(pod.labels()["app"], "web");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node1"));
        assert_eq!(spec.host_network, Some(false));
        let ports = spec.containers[0].ports.as_ref().unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].container_port),
            (Some("http"), 8080)
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(status.pod_ips.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn what_the_agent_keeps_is_a_fraction_of_a_pod() {
        let kept = std::mem::size_of::<PodInfo>();
        let full = std::mem::size_of::<k8s_openapi::api::core::v1::Pod>();
        assert!(kept * 3 < full, "{kept} of {full} bytes");
    }
}
