//! The labels an identity stands for: a pod's identity-relevant labels, its
//! namespace's name and labels, and the numbers of the named ports that
//! egress rules refer to. Pod addresses with equal [`IdentityLabels`]
//! share one identity.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::IpAddr,
};

use ipnetwork::IpNetwork;

/// The label the API server puts on every namespace, with its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Pod labels left out of identities by default: they change with every
/// rollout (or differ per replica) while the pods' role does not, so a
/// Deployment's pods keep sharing one identity. A label in this list that a
/// policy selector names is kept after all (see [`IdentityConfig`]).
pub const DEFAULT_EXCLUDED_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

/// Which pod labels count for identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// Label keys left out, unless a selector names them.
    pub excluded: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            excluded: DEFAULT_EXCLUDED_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// A named port's number, for a protocol.
pub type NamedPorts = BTreeMap<(String, u8), u16>;

/// An ipBlock: the addresses in `cidr` but in none of `except`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    /// The block.
    pub cidr: IpNetwork,
    /// Blocks inside it that are left out, sorted.
    pub except: Vec<IpNetwork>,
}

impl Block {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let inside = |net: &IpNetwork| net.is_ipv4() == ip.is_ipv4() && net.contains(ip);
        inside(&self.cidr) && !self.except.iter().any(inside)
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        for except in &self.except {
            write!(f, "!{except}")?;
        }
        Ok(())
    }
}

/// Everything a label identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// The namespace's labels, [`NAMESPACE_NAME_LABEL`] included.
    pub namespace_labels: BTreeMap<String, String>,
    /// The pod's identity-relevant labels.
    pub pod_labels: BTreeMap<String, String>,
    /// The pod's named ports that some egress rule refers to: egress to
    /// a named port resolves on the destination pod, so pods that resolve
    /// it differently must not share an identity.
    pub named_ports: NamedPorts,
    /// The ipBlocks holding the address, of egress rules to one of the
    /// pod's [`named_ports`](Self::named_ports): such a rule matches the
    /// pods in the block on the port of that name, and the datapath finds
    /// the entry by one identity, so addresses in and out of the block must
    /// not share one. Empty unless such rules exist.
    pub blocks: BTreeSet<Block>,
}

impl IdentityLabels {
    /// The canonical text of the labels: equal labels, equal text.
    pub fn canonical(&self) -> String {
        let mut out = format!("ns={}", self.namespace);
        for (key, value) in &self.pod_labels {
            let _ = write!(out, ",{key}={value}");
        }
        for (key, value) in &self.namespace_labels {
            if key != NAMESPACE_NAME_LABEL {
                let _ = write!(out, ",ns:{key}={value}");
            }
        }
        for ((name, proto), number) in &self.named_ports {
            let _ = write!(out, ",port:{name}/{proto}={number}");
        }
        for block in &self.blocks {
            let _ = write!(out, ",block:{block}");
        }
        out
    }
}

/// The 128-bit FNV-1a digest of `text`: stable across versions and
/// platforms, so a restarted agent finds the identities it allocated.
pub fn digest(text: &str) -> [u8; 16] {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let hash = text
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    hash.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn canonical_text_orders_everything_and_names_each_part() {
        let id = IdentityLabels {
            namespace: "x".into(),
            namespace_labels: labels(&[(NAMESPACE_NAME_LABEL, "x"), ("team", "a")]),
            pod_labels: labels(&[("pod", "b"), ("app", "web")]),
            named_ports: [(("http".to_string(), 6), 8080)].into(),
            blocks: [Block {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            }]
            .into(),
        };
        assert_eq!(
            id.canonical(),
            "ns=x,app=web,pod=b,ns:team=a,port:http/6=8080,block:10.0.0.0/8!10.1.0.0/16"
        );
        assert_ne!(digest(&id.canonical()), digest("ns=x"));
        // FNV-1a 128 of the empty string is its offset basis.
        assert_eq!(
            u128::from_be_bytes(digest("")),
            0x6c62_272e_07bb_0142_62b8_2175_6295_c58d
        );
    }
}
