//! What to measure: the candidates, the run's configuration and where its
//! results go.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Serialize;

use crate::policy_objects::Synthetic;

/// The candidates this driver knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CandidateKind {
    /// Client to the server pod's IP, no service layer: the physical limit.
    Direct,
    /// Our socket-level path: lb-agent's cgroup connect hooks.
    SocketLb,
    /// The socket-level path with NetworkPolicy enforced on the pods'
    /// interfaces: the flow allowed by one rule, many other policies and
    /// identities loaded.
    SocketLbPolicy,
    /// Our tc path: socket translation off, ClusterIPs translated per packet
    /// by the tc programs on the pod interfaces.
    Tc,
    /// kube-proxy iptables mode (rules generated exactly, iptables-restore).
    Iptables,
    /// kube-proxy nftables mode (rules generated exactly, nft -f).
    Nftables,
}

impl CandidateKind {
    /// Every candidate, in table order.
    pub const ALL: [CandidateKind; 6] = [
        CandidateKind::Direct,
        CandidateKind::SocketLb,
        CandidateKind::SocketLbPolicy,
        CandidateKind::Tc,
        CandidateKind::Iptables,
        CandidateKind::Nftables,
    ];

    /// Short name, as in the table and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CandidateKind::Direct => "direct",
            CandidateKind::SocketLb => "socket-lb",
            CandidateKind::SocketLbPolicy => "socket-lb+policy",
            CandidateKind::Tc => "tc",
            CandidateKind::Iptables => "iptables",
            CandidateKind::Nftables => "nftables",
        }
    }

    /// One line on what is measured.
    pub fn description(self) -> &'static str {
        match self {
            CandidateKind::Direct => "client to the server pod IP, no service layer (physical limit)",
            CandidateKind::SocketLb => {
                "lb-agent's cgroup connect4 translation, client to the Service VIP"
            }
            CandidateKind::SocketLbPolicy => {
                "socket-lb with NetworkPolicy enforced: the server pod isolated for ingress \
                 and the flow allowed by one rule; the pod programs run on both pods' \
                 interfaces, each packet checked at the pod it leaves; other policies and \
                 identities (pods on other nodes) loaded, see below"
            }
            CandidateKind::Tc => {
                "lb-agent with socket translation off: tc programs on the pod interfaces \
                 (ingress) and the uplink (Maglev, conntrack, DNAT), client to the Service VIP"
            }
            CandidateKind::Iptables => {
                "kube-proxy iptables-mode rules (iptables-restore, measured service last in \
                 KUBE-SERVICES), client to the Service VIP"
            }
            CandidateKind::Nftables => {
                "kube-proxy nftables-mode rules (nft -f, service-ips vmap), client to the Service VIP"
            }
        }
    }
}

impl FromStr for CandidateKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CandidateKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown candidate {s:?} (expected one of {})",
                    CandidateKind::ALL.map(CandidateKind::name).join(", ")
                )
            })
    }
}

/// What to measure and where to write it.
#[derive(Clone, Debug)]
pub struct Config {
    /// Service counts to sweep.
    pub counts: Vec<usize>,
    /// Interleaved rounds per count.
    pub rounds: usize,
    /// Length of each CRR and RR measurement.
    pub duration: Duration,
    /// The two measurements of a pair run together, taking turns in slices
    /// of this length ([`crr::Turns`](crate::crr::Turns)).
    pub slice: Duration,
    /// Client threads.
    pub threads: usize,
    /// Fake endpoints per filler service.
    pub endpoints_per_service: usize,
    /// Candidates, in table order; ratios need [`CandidateKind::Direct`].
    pub candidates: Vec<CandidateKind>,
    /// Length of the iperf3 bulk run per candidate at the largest count;
    /// `None` skips iperf3.
    pub bulk: Option<Duration>,
    /// Directory for `latest.md`, `latest.json` and `crr.svg`.
    pub out: PathBuf,
    /// The `crr` binary; `None` looks next to the running executable.
    pub crr: Option<PathBuf>,
    /// Whether this is the quick mode (recorded in the report).
    pub quick: bool,
    /// The synthetic cluster loaded next to the policy candidate's own
    /// rule: pods elsewhere (as many identities) and policies.
    pub policy_scale: Synthetic,
}

/// Slices of 200 ms: the CPU a shared 2-vCPU guest gets drifts over
/// seconds, so pairs interleaved this finely see the same machine; the work
/// the kernel defers after a connection (RCU frees, timers) mostly runs
/// within the slice of the client that caused it.
const DEFAULT_SLICE: Duration = Duration::from_millis(200);

impl Config {
    /// The full benchmark: 1, 1,000 and 10,000 services, 24 rounds of 1.5 s
    /// pairs (many short paired samples: the median of the pairs' ratios is
    /// steadier than a few long runs), 2 pinned client threads, a 5 s iperf3
    /// run, results in `out`.
    pub fn full(out: PathBuf) -> Self {
        Config {
            counts: vec![1, 1_000, 10_000],
            rounds: 24,
            duration: Duration::from_millis(1500),
            slice: DEFAULT_SLICE,
            threads: 2,
            endpoints_per_service: 3,
            candidates: CandidateKind::ALL.to_vec(),
            bulk: Some(Duration::from_secs(5)),
            out,
            crr: None,
            quick: false,
            policy_scale: Synthetic {
                pods: 10_000,
                policies: 1_000,
                nodes: 50,
            },
        }
    }

    /// The quick mode: 1 and 100 services, 1 round of 1 s, no iperf3.
    pub fn quick(out: PathBuf) -> Self {
        Config {
            counts: vec![1, 100],
            rounds: 1,
            duration: Duration::from_secs(1),
            bulk: None,
            quick: true,
            policy_scale: Synthetic {
                pods: 100,
                policies: 10,
                nodes: 5,
            },
            ..Config::full(out)
        }
    }
}

/// The default output directory of full runs: `bench/results`.
pub fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// A fresh temporary output directory (for quick runs).
pub fn temp_out_dir() -> PathBuf {
    std::env::temp_dir().join(format!("lb-bench-quick-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_parse_by_name() {
        for k in CandidateKind::ALL {
            assert_eq!(k.name().parse::<CandidateKind>().unwrap(), k);
        }
        assert!("ipvs".parse::<CandidateKind>().is_err());
    }
}
