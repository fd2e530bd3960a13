//! Stands and candidates: one lab node per candidate with its server and
//! client pods, and each datapath's way of programming the services.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::{spawn_until, sysctl, Lab, Node, Pod},
};

use super::{
    config::CandidateKind,
    processes::{flush_conntrack, run_with_input},
    services::{ServiceSet, CRR_SERVICE_PORT, CRR_TARGET_PORT, IPERF_PORT, MEASURED_VIP},
};
use crate::{kubeproxy, policy_objects::Synthetic};

/// One candidate's node with its server and client pods; the servers are
/// killed on drop.
pub(super) struct Stand {
    /// The node (its own netns, netfilter tables and cgroup).
    node: Node,
    /// The server pod (`crr server` on [`CRR_TARGET_PORT`], iperf3 on
    /// [`IPERF_PORT`]).
    server: Pod,
    /// The client pod (port range widened, `tcp_tw_reuse` on).
    pub(super) client: Pod,
    children: Vec<Child>,
}

impl Stand {
    /// Builds node `name` with its pods and starts the servers.
    fn new(lab: &mut Lab, name: &str, crr: &Path, iperf: bool) -> Result<Self> {
        let node = lab.add_node(name)?;
        let server = lab.add_pod(&node, "server")?;
        let client = lab.add_pod(&node, "client")?;
        sysctl(&client.netns, "net.ipv4.ip_local_port_range", "1024 65535")?;
        sysctl(&client.netns, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(&client.netns, "net.ipv4.tcp_max_tw_buckets", "4096")?;
        let mut stand = Stand {
            node,
            server,
            client,
            children: Vec::new(),
        };
        let mut command = lab.command_in(&stand.server, crr)?;
        command.args(["server", "--listen", &format!("0.0.0.0:{CRR_TARGET_PORT}")]);
        let what = format!("crr server in {}", stand.node.name);
        stand
            .children
            .push(spawn_until(command, &what, "listening")?);
        if iperf {
            let mut command = lab.command_in(&stand.server, "iperf3")?;
            command.args(["-s", "-p", &IPERF_PORT.to_string(), "--forceflush"]);
            let what = format!("iperf3 server in {}", stand.node.name);
            stand
                .children
                .push(spawn_until(command, &what, "Server listening")?);
        }
        Ok(stand)
    }

    /// The server pod's address as an `Ipv4Addr`.
    pub(super) fn server_ip(&self) -> Ipv4Addr {
        self.server.ip.parse().expect("lab pod addresses parse")
    }
}

impl Drop for Stand {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A datapath under test, on its own [`Stand`].
pub(super) trait Candidate {
    /// Which candidate this is.
    fn kind(&self) -> CandidateKind;
    /// Its node and pods.
    fn stand(&self) -> &Stand;
    /// Programs `services` (replacing what an earlier count programmed,
    /// starting from an empty state) and returns how long programming took;
    /// `None` when the candidate has nothing to program.
    fn program(&mut self, lab: &Lab, services: &ServiceSet) -> Result<Option<Duration>>;
    /// Where the client connects for the measured service port `service_port`
    /// whose target port is `target_port`.
    fn target(&self, service_port: u16, _target_port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(MEASURED_VIP, service_port)
    }
    /// Called before every measurement (e.g. to flush conntrack).
    fn before_measurement(&self) -> Result<()> {
        Ok(())
    }
}

/// No service layer.
struct Direct {
    stand: Stand,
}

impl Candidate for Direct {
    fn kind(&self) -> CandidateKind {
        CandidateKind::Direct
    }
    fn stand(&self) -> &Stand {
        &self.stand
    }
    fn program(&mut self, _lab: &Lab, _services: &ServiceSet) -> Result<Option<Duration>> {
        Ok(None)
    }
    fn target(&self, _service_port: u16, target_port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.stand.server_ip(), target_port)
    }
}

/// lb-agent attached to the node's cgroup.
/// An lb-agent candidate: the socket path, or the tc path with the socket
/// path off.
struct SocketLb {
    kind: CandidateKind,
    agent: Agent,
    stand: Stand,
    /// Frontends the agent programs per Service port (the tc path adds a
    /// per-packet frontend next to each ClusterIP one).
    frontends_per_port: usize,
}

/// The agent's manifest poll and debounce period: it bounds the detection
/// delay included in our time to program.
const AGENT_DEBOUNCE: [&str; 2] = ["--debounce-ms", "10"];

/// The agent's manifest file in its directory.
const MANIFEST: &str = "services.yaml";

impl SocketLb {
    /// Writes `yaml` and waits for the agent to log `reconciled frontends=N`.
    fn apply(&self, yaml: &str, frontends: usize) -> Result<Duration> {
        let offset = self.agent.log_text().len();
        let needle = format!("reconciled frontends={frontends} ");
        let started = Instant::now();
        self.agent.write_manifest(MANIFEST, yaml)?;
        let deadline = started + Duration::from_secs(600);
        loop {
            let log = self.agent.log_text();
            if log.get(offset..).is_some_and(|new| new.contains(&needle)) {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("agent never logged {needle:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The pods of the policy candidate's stand, as Pod objects.
fn stand_pod(pod: &Pod, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {name}\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: x\n    ports:\n    - {{name: crr, containerPort: {CRR_TARGET_PORT}}}\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]\n",
        name = pod.name,
        ip = pod.ip,
        ip6 = pod.ip6,
    )
}

/// The one rule that allows the measured flow: the server accepts the
/// client on the CRR port (iperf3 too).
const SERVER_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: crr-server\n  namespace: default\nspec:\n  podSelector:\n    matchLabels: {app: crr-server}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: crr-client}\n    ports:\n    - port: crr\n    - {port: 5201}\n";

impl SocketLb {
    /// Writes the stand's pods, the server's policy and the synthetic
    /// cluster's (`scale`: pods elsewhere, other policies), and waits until
    /// both pods are programmed endpoints with their interfaces found.
    fn enforce_policy(&self, scale: Synthetic) -> Result<()> {
        let node = &self.stand.node.name;
        let mut yaml = scale.yaml();
        yaml.push_str(&stand_pod(&self.stand.server, node, "crr-server"));
        yaml.push_str("---\n");
        yaml.push_str(&stand_pod(&self.stand.client, node, "crr-client"));
        yaml.push_str("---\n");
        yaml.push_str(SERVER_POLICY);
        self.agent.write_manifest("policy.yaml", &yaml)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let log = self.agent.log_text();
            let programmed = log.lines().any(|l| {
                l.contains("policy reconciled")
                    && l.contains(" endpoints=4 ")
                    && l.contains(" entries=")
            });
            if programmed && !log.contains("no interface of its own") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent never programmed the stand's policy:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Candidate for SocketLb {
    fn kind(&self) -> CandidateKind {
        self.kind
    }
    fn stand(&self) -> &Stand {
        &self.stand
    }
    fn program(&mut self, _lab: &Lab, services: &ServiceSet) -> Result<Option<Duration>> {
        self.apply("", 0)?;
        let yaml = services.yaml();
        let took = self.apply(&yaml, services.frontends() * self.frontends_per_port)?;
        let frontend = format!("{MEASURED_VIP}:{CRR_SERVICE_PORT}");
        let table = self.agent.service_list()?;
        ensure!(
            table.contains(&frontend),
            "lbctl does not show {frontend} after programming:\n{}",
            table.lines().take(20).collect::<Vec<_>>().join("\n")
        );
        Ok(Some(took))
    }
}

/// kube-proxy's iptables rules in the node netns.
struct Iptables {
    stand: Stand,
}

impl Candidate for Iptables {
    fn kind(&self) -> CandidateKind {
        CandidateKind::Iptables
    }
    fn stand(&self) -> &Stand {
        &self.stand
    }
    fn program(&mut self, lab: &Lab, services: &ServiceSet) -> Result<Option<Duration>> {
        let node = &self.stand.node;
        run_with_input(
            &mut lab.command_in(node, "iptables-restore")?,
            "iptables-restore (flush)",
            kubeproxy::IPTABLES_FLUSH.into(),
        )?;
        let rules = services.iptables();
        let started = Instant::now();
        run_with_input(
            &mut lab.command_in(node, "iptables-restore")?,
            "iptables-restore",
            rules,
        )?;
        Ok(Some(started.elapsed()))
    }
    fn before_measurement(&self) -> Result<()> {
        flush_conntrack(&self.stand.node.netns)
    }
}

/// kube-proxy's nftables rules in the node netns.
struct Nftables {
    stand: Stand,
}

impl Candidate for Nftables {
    fn kind(&self) -> CandidateKind {
        CandidateKind::Nftables
    }
    fn stand(&self) -> &Stand {
        &self.stand
    }
    fn program(&mut self, lab: &Lab, services: &ServiceSet) -> Result<Option<Duration>> {
        let node = &self.stand.node;
        // Start empty: `add table` then `delete table` works whether or not
        // an earlier count left the table behind.
        run_with_input(
            lab.command_in(node, "nft")?.args(["-f", "-"]),
            "nft (delete)",
            format!("add table ip kube-proxy\n{}", kubeproxy::NFT_DELETE),
        )?;
        let script = services.nft();
        let started = Instant::now();
        run_with_input(
            lab.command_in(node, "nft")?.args(["-f", "-"]),
            "nft -f",
            script,
        )?;
        Ok(Some(started.elapsed()))
    }
    fn before_measurement(&self) -> Result<()> {
        flush_conntrack(&self.stand.node.netns)
    }
}

/// Builds the node, pods and datapath of one candidate.
pub(super) fn build_candidate(
    kind: CandidateKind,
    lab: &mut Lab,
    bins: &Binaries,
    crr: &Path,
    iperf: bool,
    policy_scale: Synthetic,
) -> Result<Box<dyn Candidate>> {
    let stand = Stand::new(lab, kind.name(), crr, iperf)?;
    Ok(match kind {
        CandidateKind::Direct => Box::new(Direct { stand }),
        CandidateKind::SocketLb => {
            let agent = Agent::start_with(lab, bins, &stand.node, &AGENT_DEBOUNCE)?;
            Box::new(SocketLb {
                kind,
                agent,
                stand,
                frontends_per_port: 1,
            })
        }
        CandidateKind::SocketLbPolicy => {
            let mut args = AGENT_DEBOUNCE.to_vec();
            args.extend(["--node-name", stand.node.name.as_str()]);
            let agent = Agent::start_with(lab, bins, &stand.node, &args)?;
            let candidate = SocketLb {
                kind,
                agent,
                stand,
                frontends_per_port: 1,
            };
            candidate.enforce_policy(policy_scale)?;
            Box::new(candidate)
        }
        CandidateKind::Tc => {
            let mut args = AGENT_DEBOUNCE.to_vec();
            // The smallest table keeps 10,000 per-packet Services within the
            // Maglev map; the filler Services have 3 endpoints each. The
            // uplink is translated too, as on a node serving NodePorts, so
            // pod interfaces carry only the ingress program.
            args.extend([
                "--socket-lb",
                "false",
                "--pod-interfaces",
                "p",
                "--tc-interfaces",
                "eth0",
                "--maglev-table-size",
                "251",
            ]);
            let agent = Agent::start_with(lab, bins, &stand.node, &args)?;
            Box::new(SocketLb {
                kind,
                agent,
                stand,
                frontends_per_port: 2,
            })
        }
        CandidateKind::Iptables => Box::new(Iptables { stand }),
        CandidateKind::Nftables => Box::new(Nftables { stand }),
    })
}
