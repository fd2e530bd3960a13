//! Pods as the agent keeps them. [`PodInfo`] is what is decoded from the
//! API server or a YAML file: the fields policy, the socket-translation
//! opt-out and node facts read, and nothing else (the full `Pod` type takes
//! over 4 KiB in memory before any of its strings). [`Pod`] is what is
//! kept: the same facts parsed once, with the parts thousands of Pods have
//! in common (namespace, node, label set, named ports) shared through a
//! [`PodInterner`]. At 150,000 Pods a kept Pod costs a few hundred bytes,
//! where a stored `PodInfo` with its metadata cost over 1.5 KiB.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashSet},
    fmt,
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{ContainerPort, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::intent::SOCKET_LB_ANNOTATION;

/// What the agent keeps of a Pod.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodInfo {
    /// Name, namespace, UID, labels, annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Where it runs and its named ports.
    #[serde(default)]
    pub spec: Option<PodInfoSpec>,
    /// Its phase and addresses.
    #[serde(default)]
    pub status: Option<PodInfoStatus>,
}

/// What the agent keeps of a Pod's spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoSpec {
    /// `spec.nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `spec.hostNetwork`.
    #[serde(default)]
    pub host_network: Option<bool>,
    /// `spec.containers`: their names and ports.
    #[serde(default)]
    pub containers: Vec<PodInfoContainer>,
}

/// What the agent keeps of a container: its named ports, for policies that
/// name a port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodInfoContainer {
    /// `name`.
    #[serde(default)]
    pub name: String,
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
}

/// What the agent keeps of a Pod's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodInfoStatus {
    /// `status.phase`.
    #[serde(default)]
    pub phase: Option<String>,
    /// `status.podIP`.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`.
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

slim_resource!(PodInfo, api_version: "v1", group: "", kind: "Pod", plural: "pods");

impl PodInfo {
    /// Its namespace (`default` when not given) and name.
    pub fn names(&self) -> (&str, &str) {
        let metadata = &self.metadata;
        let namespace = metadata.namespace.as_deref().unwrap_or("default");
        (namespace, metadata.name.as_deref().unwrap_or_default())
    }
}

/// A Pod's labels.
pub type Labels = BTreeMap<String, String>;

/// A named container port, for policies that name a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// `TCP`, `UDP` or `SCTP` (`TCP` when not given).
    pub protocol: String,
    /// The container port.
    pub number: u16,
}

/// What the agent keeps of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.namespace` (`default` when not given).
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Arc<str>,
    /// `metadata.uid`.
    pub uid: Uid,
    /// `metadata.labels`.
    pub labels: Arc<Labels>,
    /// `spec.nodeName`.
    pub node: Option<Arc<str>>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// Whether it is annotated to opt out of socket-level translation.
    pub socket_lb_disabled: bool,
    /// Its addresses (`status.podIPs`, then `status.podIP`), parsed, each
    /// once; none once it has ended (`Succeeded` or `Failed`), as its
    /// addresses may already be another Pod's.
    pub ips: Box<[IpAddr]>,
    /// Its named container ports, the first of a name and protocol first.
    pub named_ports: Arc<[NamedPort]>,
}

impl Pod {
    /// Keeps what the agent reads of `info`, sharing common parts through
    /// `interner`.
    pub fn keep(info: PodInfo, interner: &mut PodInterner) -> Self {
        interner.prune_when_grown();
        let namespace = share(&mut interner.strings, info.names().0);
        let PodInfo {
            metadata,
            spec,
            status,
        } = info;
        let socket_lb_disabled = metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOCKET_LB_ANNOTATION))
            .is_some_and(|v| v == "disabled");
        let spec = spec.unwrap_or_default();
        let mut named_ports = Vec::new();
        for port in spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
        {
            let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                continue;
            };
            named_ports.push(NamedPort {
                name: name.clone(),
                protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                number,
            });
        }
        Self {
            namespace,
            name: Arc::from(metadata.name.unwrap_or_default()),
            uid: Uid::new(metadata.uid.unwrap_or_default()),
            labels: share(&mut interner.labels, metadata.labels.unwrap_or_default()),
            node: spec
                .node_name
                .map(|node| share(&mut interner.strings, node.as_str())),
            host_network: spec.host_network.unwrap_or(false),
            socket_lb_disabled,
            ips: addresses(status.as_ref()).into_boxed_slice(),
            named_ports: share(&mut interner.named_ports, named_ports),
        }
    }
}

impl From<PodInfo> for Pod {
    /// Keeps `info` on its own, sharing nothing (tests, small YAML sets).
    fn from(info: PodInfo) -> Self {
        Self::keep(info, &mut PodInterner::default())
    }
}

/// A Pod's UID. The API server assigns a UUID, kept as its 16 bytes
/// (a boxed string of its 36 characters took 64 bytes a Pod); other text,
/// as a YAML file may hold, is kept as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uid {
    /// A UUID in its canonical form (lowercase, hyphenated).
    Uuid([u8; 16]),
    /// Any other text (none: empty).
    Text(Box<str>),
}

impl Uid {
    /// Byte offsets of the hyphens of a canonical UUID.
    const HYPHENS: [usize; 4] = [8, 13, 18, 23];

    /// The UID written as `text`.
    pub fn new(text: String) -> Self {
        Self::parse_uuid(&text).map_or_else(|| Self::Text(text.into_boxed_str()), Self::Uuid)
    }

    fn parse_uuid(text: &str) -> Option<[u8; 16]> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 || Self::HYPHENS.iter().any(|&at| bytes[at] != b'-') {
            return None;
        }
        let lower_hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut digits = bytes.iter().filter(|&&c| c != b'-');
        let mut uuid = [0u8; 16];
        for byte in &mut uuid {
            let high = lower_hex(*digits.next()?)?;
            let low = lower_hex(*digits.next()?)?;
            *byte = high << 4 | low;
        }
        Some(uuid)
    }

    /// Whether the Pod had no UID.
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Text(text) if text.is_empty())
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => f.write_str(text),
            Self::Uuid(uuid) => {
                for (index, byte) in uuid.iter().enumerate() {
                    if matches!(index, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// A Pod's addresses, none once it has ended.
fn addresses(status: Option<&PodInfoStatus>) -> Vec<IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed.filter_map(|text| text.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// Shares the parts many Pods have in common: namespace and node names,
/// label sets (the replicas of a Deployment have one), named ports. Parts
/// no kept Pod holds any more are forgotten once the interner has doubled
/// since it last looked, so its cost stays proportional to what is kept.
#[derive(Debug, Default)]
pub struct PodInterner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Arc<Labels>>,
    named_ports: HashSet<Arc<[NamedPort]>>,
    /// Entries after the last pruning.
    kept: usize,
}

impl PodInterner {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.strings.len() + self.labels.len() + self.named_ports.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn prune_when_grown(&mut self) {
        const FLOOR: usize = 1024;
        if self.len() < FLOOR.max(2 * self.kept) {
            return;
        }
        // An entry only the interner holds belongs to no kept Pod.
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.labels.retain(|l| Arc::strong_count(l) > 1);
        self.named_ports.retain(|p| Arc::strong_count(p) > 1);
        self.kept = self.len();
    }
}

/// The entry of `shared` equal to `value`, made from it if there is none.
fn share<T, V>(shared: &mut HashSet<Arc<T>>, value: V) -> Arc<T>
where
    T: Eq + Hash + ?Sized,
    V: Borrow<T> + Into<Arc<T>>,
{
    if let Some(entry) = shared.get(value.borrow()) {
        return entry.clone();
    }
    let entry: Arc<T> = value.into();
    shared.insert(entry.clone());
    entry
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
        let pod = Pod::from(serde_json::from_str::<PodInfo>(json).unwrap());
        assert_eq!((&*pod.namespace, &*pod.name), ("shop", "web-1"));
        assert_eq!(pod.uid, Uid::Text("u1".into()));
        assert_eq!(pod.labels["app"], "web");
        assert_eq!(pod.node.as_deref(), Some("node1"));
        assert!(!pod.host_network);
        assert!(pod.socket_lb_disabled);
        assert_eq!(
            &*pod.ips,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            &*pod.named_ports,
            [NamedPort {
                name: "http".into(),
                protocol: "TCP".into(),
                number: 8080
            }]
        );
    }

    #[test]
    fn a_uuid_is_kept_as_its_bytes_and_written_back_as_it_came() {
        let text = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let uid = Uid::new(text.into());
        assert!(matches!(uid, Uid::Uuid(bytes) if bytes[0] == 0x0f && bytes[15] == 0xf0));
        assert_eq!(uid.to_string(), text);
        for other in [
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "not-a-uuid",
            "",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
        ] {
            let uid = Uid::new(other.into());
            assert_eq!(uid, Uid::Text(other.into()), "{other}");
            assert_eq!(uid.to_string(), other);
        }
        assert!(Uid::new(String::new()).is_empty());
        assert!(!Uid::new(text.into()).is_empty());
    }

    fn info(name: &str, labels: &[(&str, &str)], phase: &str) -> PodInfo {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().copied().collect::<BTreeMap<&str, &str>>()},
            "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
            "status": {"phase": phase, "podIP": "10.0.0.7"},
        }))
        .unwrap()
    }

    #[test]
    fn an_ended_pod_holds_no_address_and_no_namespace_means_default() {
        let running = Pod::from(info("a", &[], "Running"));
        assert_eq!(&*running.namespace, "default");
        assert_eq!(running.ips.len(), 1);
        for phase in ["Succeeded", "Failed"] {
            assert!(Pod::from(info("a", &[], phase)).ips.is_empty(), "{phase}");
        }
    }

    #[test]
    fn replicas_share_their_label_set_namespace_and_node() {
        let mut interner = PodInterner::default();
        let a = Pod::keep(info("a", &[("app", "web")], "Running"), &mut interner);
        let b = Pod::keep(info("b", &[("app", "web")], "Running"), &mut interner);
        let c = Pod::keep(info("c", &[("app", "db")], "Running"), &mut interner);
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert!(!Arc::ptr_eq(&a.labels, &c.labels));
        assert!(Arc::ptr_eq(&a.namespace, &c.namespace));
        assert!(Arc::ptr_eq(
            a.node.as_ref().unwrap(),
            c.node.as_ref().unwrap()
        ));
    }

    #[test]
    fn the_interner_forgets_what_no_pod_holds() {
        let mut interner = PodInterner::default();
        let kept = Pod::keep(info("kept", &[("app", "kept")], "Running"), &mut interner);
        for i in 0..5_000 {
            let label = format!("v{i}");
            drop(Pod::keep(
                info("gone", &[("app", &label)], "Running"),
                &mut interner,
            ));
        }
        assert!(interner.len() < 1_100, "{} entries held", interner.len());
        let again = Pod::keep(info("again", &[("app", "kept")], "Running"), &mut interner);
        assert!(Arc::ptr_eq(&kept.labels, &again.labels));
    }

    #[test]
    fn what_the_agent_keeps_is_a_fraction_of_a_pod() {
        let kept = std::mem::size_of::<Pod>();
        let decoded = std::mem::size_of::<PodInfo>();
        let full = std::mem::size_of::<k8s_openapi::api::core::v1::Pod>();
        assert!(decoded * 3 < full, "{decoded} of {full} bytes decoded");
        assert!(kept <= 128, "{kept} bytes kept");
    }
}
