//! The cases: `tests/e2e/netpol/cases.json`, made by
//! `tests/e2e/netpol/convert.py` from a catalogue of the upstream cases
//! (kubernetes v1.34.4 `test/e2e/network/netpol/network_policy.go`).

use std::{collections::BTreeMap, fmt, str::FromStr};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The data file, compiled in.
const CASES_JSON: &str = include_str!("../../netpol/cases.json");

/// A pod of the model, by its logical namespace (`x`, `y`, `z`) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId {
    /// Logical namespace: `x`, `y` or `z`.
    pub ns: String,
    /// Pod name: `a`, `b` or `c` (also its `pod` label).
    pub name: String,
}

impl FromStr for PodId {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (ns, name) = s
            .split_once('/')
            .with_context(|| format!("pod {s:?} is not NS/NAME"))?;
        if ns.is_empty() || name.is_empty() {
            bail!("pod {s:?} is not NS/NAME");
        }
        Ok(Self {
            ns: ns.into(),
            name: name.into(),
        })
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

/// A transport protocol of a probe or a served port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// `tcp`, `udp` or `sctp`, as labpod and lbctl spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A port and protocol, written `80/TCP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProto {
    /// The port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl FromStr for PortProto {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (port, protocol) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not PORT/PROTO"))?;
        Ok(Self {
            port: port.parse().with_context(|| format!("port of {s:?}"))?,
            protocol: serde_json::from_value(serde_json::Value::String(protocol.into()))
                .with_context(|| format!("protocol of {s:?}"))?,
        })
    }
}

impl fmt::Display for PortProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// A probe step: the whole matrix on one port and protocol.
#[derive(Clone, Debug, Deserialize)]
pub struct ProbeStep {
    /// The port probed on every target.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// Pairs `from->to` expected to fail; every other pair but the self
    /// pairs (ignored, as upstream ignores them) is expected to succeed.
    pub denied: Vec<String>,
}

impl ProbeStep {
    /// The step's port and protocol.
    pub fn port_proto(&self) -> PortProto {
        PortProto {
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The denied pairs, parsed.
    pub fn denied_pairs(&self) -> Result<Vec<(PodId, PodId)>> {
        self.denied
            .iter()
            .map(|pair| {
                let (from, to) = pair
                    .split_once("->")
                    .with_context(|| format!("pair {pair:?} is not FROM->TO"))?;
                Ok((from.parse()?, to.parse()?))
            })
            .collect()
    }
}

/// One step of a case, in order.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Create a NetworkPolicy (an object with `${...}` placeholders).
    Create(serde_json::Value),
    /// Replace an existing NetworkPolicy with this one.
    Update(serde_json::Value),
    /// Probe the matrix.
    Probe(ProbeStep),
    /// Add (or overwrite) labels of a namespace.
    LabelNamespace {
        /// The namespace, possibly a placeholder (`${NS_Y}`).
        namespace: String,
        /// Labels to set.
        labels: BTreeMap<String, String>,
    },
    /// Add (or overwrite) labels of a pod.
    LabelPod {
        /// The pod, `x/b`.
        pod: String,
        /// Labels to set.
        labels: BTreeMap<String, String>,
    },
    /// Delete every NetworkPolicy.
    DeleteAllPolicies {},
    /// Upstream sleeps this long before its next probe.
    SleepSeconds(u64),
}

/// The context (Describe/Context block) a case belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum CaseContext {
    /// "NetworkPolicy between server and client" (TCP).
    #[serde(rename = "TCP")]
    Tcp,
    /// "... using UDP".
    #[serde(rename = "UDP")]
    Udp,
    /// "... using SCTP".
    #[serde(rename = "SCTP")]
    Sctp,
}

/// One upstream case.
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    /// Upstream order, 1-based.
    pub id: u32,
    /// Its context.
    pub context: CaseContext,
    /// The upstream `It` text.
    pub name: String,
    /// The Rust test function that runs it.
    pub test: String,
    /// Ports and protocols the case's pods serve (`80/TCP`).
    pub served: Vec<String>,
    /// What the case exercises.
    pub features: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Case {
    /// The served ports and protocols, parsed.
    pub fn served(&self) -> Result<Vec<PortProto>> {
        self.served.iter().map(|s| s.parse()).collect()
    }
}

/// The whole data file.
#[derive(Clone, Debug, Deserialize)]
pub struct Catalogue {
    /// Where the cases come from.
    pub source: String,
    /// Placeholder (`NS_X`) to namespace name.
    pub namespaces: BTreeMap<String, String>,
    /// The pods of the model, `x/a`..`z/c`, in matrix order.
    pub pods: Vec<String>,
    /// The cases, in upstream order.
    pub cases: Vec<Case>,
}

impl Catalogue {
    /// Parses the compiled-in data file.
    pub fn load() -> Result<Self> {
        serde_json::from_str(CASES_JSON).context("parsing tests/e2e/netpol/cases.json")
    }

    /// The case run by test function `test`.
    pub fn case(&self, test: &str) -> Result<&Case> {
        self.cases
            .iter()
            .find(|c| c.test == test)
            .with_context(|| format!("no case for test {test} in cases.json"))
    }

    /// The pods of the model, parsed.
    pub fn pod_ids(&self) -> Result<Vec<PodId>> {
        self.pods.iter().map(|p| p.parse()).collect()
    }

    /// The real name of logical namespace `ns` (`x` -> the `NS_X` entry).
    pub fn namespace(&self, ns: &str) -> Result<&str> {
        self.namespaces
            .get(&format!("NS_{}", ns.to_uppercase()))
            .map(String::as_str)
            .with_context(|| format!("no namespace for {ns}"))
    }
}

/// Replaces every `${KEY}` in `text` by `vars[KEY]`; an unknown key is an error.
pub fn fill(text: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .with_context(|| format!("unterminated placeholder in {text:?}"))?;
        let key = &after[..end];
        let value = vars
            .get(key)
            .with_context(|| format!("unknown placeholder ${{{key}}}"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `/4` network holding an IPv4 address, as upstream's
/// `makeLargeCIDRForIP` makes it (`10.244.1.12` -> `0.0.0.0/4`).
pub fn cidr4(ip: std::net::Ipv4Addr) -> String {
    let first = ip.octets()[0] & 0xf0;
    format!("{first}.0.0.0/4")
}

/// Checks that `tests` (the test functions of `tests/netpol.rs`) are
/// exactly the cases' test names, each once.
pub fn check_test_names(tests: &[&str]) -> Result<()> {
    let catalogue = Catalogue::load()?;
    let want: std::collections::BTreeSet<&str> =
        catalogue.cases.iter().map(|c| c.test.as_str()).collect();
    let have: std::collections::BTreeSet<&str> = tests.iter().copied().collect();
    if have.len() != tests.len() {
        bail!("a test name is listed twice");
    }
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    if !missing.is_empty() || !extra.is_empty() {
        bail!("cases without a test: {missing:?}; tests without a case: {extra:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_file_has_all_48_cases_with_valid_steps() {
        let catalogue = Catalogue::load().unwrap();
        assert_eq!(catalogue.cases.len(), 48);
        let pods = catalogue.pod_ids().unwrap();
        assert_eq!(pods.len(), 9);
        let contexts = |c: CaseContext| catalogue.cases.iter().filter(|x| x.context == c).count();
        assert_eq!(
            (
                contexts(CaseContext::Tcp),
                contexts(CaseContext::Udp),
                contexts(CaseContext::Sctp)
            ),
            (42, 3, 3)
        );
        for case in &catalogue.cases {
            let served = case.served().unwrap();
            for step in &case.steps {
                if let Step::Probe(probe) = step {
                    assert!(served.contains(&probe.port_proto()), "case {}", case.id);
                    for (from, to) in probe.denied_pairs().unwrap() {
                        assert_ne!(from, to, "case {}: a self pair", case.id);
                        assert!(pods.contains(&from) && pods.contains(&to));
                    }
                }
            }
        }
    }

    #[test]
    fn the_doc_maps_every_case_to_its_test() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/netpol-cases.md");
        let doc = std::fs::read_to_string(path).unwrap();
        for case in Catalogue::load().unwrap().cases {
            let row = format!("| {} | {:?} | ", case.id, case.context).to_uppercase();
            let line = doc
                .lines()
                .find(|l| l.to_uppercase().starts_with(&row))
                .unwrap_or_else(|| panic!("no row for case {} in {path}", case.id));
            assert!(line.contains(&format!("`{}`", case.test)), "{line}");
        }
    }

    #[test]
    fn placeholders_are_filled_or_refused() {
        let vars = BTreeMap::from([
            ("NS_X".to_string(), "x".to_string()),
            ("IP_y_b".to_string(), "10.244.2.3".to_string()),
        ]);
        assert_eq!(
            fill("${NS_X}: ${IP_y_b}/32", &vars).unwrap(),
            "x: 10.244.2.3/32"
        );
        assert!(fill("${NS_Q}", &vars).is_err());
        assert!(fill("${NS_X", &vars).is_err());
        assert_eq!(cidr4("10.244.1.12".parse().unwrap()), "0.0.0.0/4");
        assert_eq!(cidr4("192.168.1.1".parse().unwrap()), "192.0.0.0/4");
    }

    #[test]
    fn ports_and_pairs_parse() {
        let p: PortProto = "81/UDP".parse().unwrap();
        assert_eq!((p.port, p.protocol), (81, Protocol::Udp));
        assert_eq!(p.to_string(), "81/UDP");
        assert!("81".parse::<PortProto>().is_err());
        assert!("x".parse::<PodId>().is_err());
    }
}
