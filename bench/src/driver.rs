//! The datapath benchmark driver behind `lb-bench`: every candidate measured
//! side by side on the lab, rounds interleaved, medians and ratios to the
//! direct path.
//!
//! # Layout
//!
//! Each candidate gets a lab node of its own (a network namespace with its
//! own netfilter tables and its own cgroup), with one server pod (`crr
//! server`, plus `iperf3 -s` when bulk throughput is measured) and one client
//! pod. Candidates are therefore isolated from each other: kube-proxy's rules
//! in the iptables node do not slow down the direct node (they would: every
//! new connection forwarded through that node walks `KUBE-SERVICES`), and the
//! socket-level programs attach only to the socket-LB node's cgroup.
//!
//! | candidate | node setup | the client connects to |
//! |---|---|---|
//! | `direct` | nothing | the server pod's IP |
//! | `socket-lb` | `lb-agent` on the node cgroup, N services in its manifest directory | the Service VIP |
//! | `tc` | `lb-agent` with socket translation off, tc programs on the pod interfaces and the uplink | the Service VIP |
//! | `iptables` | kube-proxy's `iptables-restore` input for N services, loaded in the node netns | the Service VIP |
//! | `nftables` | kube-proxy's `nft -f` input for N services, loaded in the node netns | the Service VIP |
//!
//! A new candidate is one more [`CandidateKind`] variant and one
//! [`Candidate`] implementation.
//!
//! # Procedure
//!
//! For every service count: each candidate programs the N services (timed:
//! agent manifest write to its `reconciled N frontends` log line,
//! `iptables-restore` and `nft -f` wall time, each from an empty state);
//! then a short unrecorded CRR warm-up per candidate, then `rounds` rounds.
//! In each round every candidate is paired with direct, CRR then RR (the
//! visiting order rotates by one per round): the two clients of a pair run
//! together, taking turns in slices of [`Config::slice`] ([`crr::Turns`]),
//! `duration` each, direct taking the first slice in every other round. At
//! the largest count, one `iperf3` bulk run per candidate follows. Netfilter
//! candidates have their conntrack table flushed before every measurement.
//!
//! Reported per (count, candidate): medians over rounds of connections/s,
//! p50/p99 latency and RR transactions/s, and ratios to direct computed per
//! pair and then taken the median of: the turns cancel the drift of a shared
//! machine down to a slice.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::{spawn_until, sysctl, Lab, Node, Pod},
    manifests,
};
use serde::{Deserialize, Serialize};

use crate::crr::{self, Turns};
use crate::kubeproxy::{
    self, IptablesOptions, NftablesOptions, Protocol, ServicePort, SyntheticServices,
};

/// ClusterIP of the measured service.
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Service port of the CRR/RR server (target port [`CRR_TARGET_PORT`]).
pub const CRR_SERVICE_PORT: u16 = 80;
/// Port `crr server` listens on in the server pod.
pub const CRR_TARGET_PORT: u16 = 8080;
/// Service port and target port of the iperf3 server.
pub const IPERF_PORT: u16 = 5201;
/// First address of the filler services' fake endpoints (never routed).
pub const FILLER_ENDPOINTS: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Namespace of every benchmark service.
const NAMESPACE: &str = "default";
/// Name of the measured service.
const MEASURED: &str = "measured";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The candidates this driver knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CandidateKind {
    /// Client to the server pod's IP, no service layer: the physical limit.
    Direct,
    /// Our socket-level path: lb-agent's cgroup connect hooks.
    SocketLb,
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
    pub const ALL: [CandidateKind; 5] = [
        CandidateKind::Direct,
        CandidateKind::SocketLb,
        CandidateKind::Tc,
        CandidateKind::Iptables,
        CandidateKind::Nftables,
    ];

    /// Short name, as in the table and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CandidateKind::Direct => "direct",
            CandidateKind::SocketLb => "socket-lb",
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
    /// of this length ([`crr::Turns`]).
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
}

/// Slices of 200 ms: the CPU a shared 2-vCPU guest gets drifts over
/// seconds, so pairs interleaved this finely see the same machine; the work
/// the kernel defers after a connection (RCU frees, timers) mostly runs
/// within the slice of the client that caused it.
pub const DEFAULT_SLICE: Duration = Duration::from_millis(200);

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

// ---------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------

/// The N services one candidate programs: N-1 filler services with fake
/// endpoints, then the measured service (two ports, CRR and iperf3, whose
/// only endpoint is the candidate's server pod), last.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    /// Number of services (the measured one included).
    pub count: usize,
    /// Every service port, fillers first, the measured CRR port last.
    pub ports: Vec<ServicePort>,
}

impl ServiceSet {
    /// `count` services (at least 1) whose measured one points at `server`.
    pub fn new(count: usize, endpoints_per_service: usize, server: Ipv4Addr) -> Self {
        let mut ports = SyntheticServices {
            count: count.saturating_sub(1),
            endpoints_per_service,
            namespace: NAMESPACE.into(),
            first_endpoint_ip: FILLER_ENDPOINTS,
            ..SyntheticServices::default()
        }
        .build();
        let measured = |port_name: &str, port: u16, target: u16| ServicePort {
            namespace: NAMESPACE.into(),
            name: MEASURED.into(),
            port_name: port_name.into(),
            protocol: Protocol::Tcp,
            cluster_ip: MEASURED_VIP,
            port,
            endpoints: vec![SocketAddrV4::new(server, target)],
        };
        ports.push(measured("iperf", IPERF_PORT, IPERF_PORT));
        ports.push(measured("crr", CRR_SERVICE_PORT, CRR_TARGET_PORT));
        ServiceSet {
            count: count.max(1),
            ports,
        }
    }

    /// Number of frontends (service ports) the set holds.
    pub fn frontends(&self) -> usize {
        self.ports.len()
    }

    /// kube-proxy's iptables-restore input, measured service last in
    /// `KUBE-SERVICES`.
    pub fn iptables(&self) -> String {
        kubeproxy::iptables_restore(
            &self.ports,
            &IptablesOptions {
                last_service: Some(self.ports.len() - 1),
                ..IptablesOptions::default()
            },
        )
    }

    /// kube-proxy's nft -f input.
    pub fn nft(&self) -> String {
        kubeproxy::nft_script(&self.ports, &NftablesOptions::default())
    }

    /// The same services as Kubernetes YAML (Service + EndpointSlice each),
    /// for lb-agent.
    pub fn yaml(&self) -> String {
        let mut docs: Vec<String> = Vec::with_capacity(2 * self.count);
        let mut measured: Vec<&ServicePort> = Vec::new();
        for port in &self.ports {
            if port.name == MEASURED {
                measured.push(port);
                continue;
            }
            let target = port.endpoints.first().map_or(CRR_TARGET_PORT, |e| e.port());
            let target_s = target.to_string();
            docs.push(manifests::service(
                &port.name,
                &port.cluster_ip.to_string(),
                &[(&port.port_name, port.port, "TCP", &target_s)],
            ));
            let ips: Vec<String> = port.endpoints.iter().map(|e| e.ip().to_string()).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            docs.push(manifests::endpoint_slice(
                &port.name,
                &format!("{}-1", port.name),
                (&port.port_name, target, "TCP"),
                &ips,
            ));
        }
        let targets: Vec<String> = measured
            .iter()
            .map(|p| p.endpoints[0].port().to_string())
            .collect();
        let specs: Vec<manifests::PortSpec<'_>> = measured
            .iter()
            .zip(&targets)
            .map(|(p, t)| (p.port_name.as_str(), p.port, "TCP", t.as_str()))
            .collect();
        docs.push(manifests::service(
            MEASURED,
            &MEASURED_VIP.to_string(),
            &specs,
        ));
        let slice_ports: Vec<(&str, u16, &str)> = measured
            .iter()
            .map(|p| (p.port_name.as_str(), p.endpoints[0].port(), "TCP"))
            .collect();
        let server = measured[0].endpoints[0].ip().to_string();
        docs.push(manifests::slice(
            MEASURED,
            "measured-1",
            &slice_ports,
            &[manifests::Endpoint::ready(&server)],
        ));
        docs.join("---\n")
    }
}

// ---------------------------------------------------------------------------
// Processes and namespaces
// ---------------------------------------------------------------------------

/// Runs `command` with `input` on stdin; fails with its stderr.
fn run_with_input(command: &mut Command, what: &str, input: String) -> Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output()?;
    let written = writer.join().expect("writer does not panic");
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.with_context(|| format!("writing to {what}"))?;
    Ok(())
}

/// Flushes the IPv4 conntrack table of a network namespace (what
/// `conntrack -F` does), over ctnetlink from a thread that joined the
/// namespace.
pub fn flush_conntrack(netns: &str) -> Result<()> {
    let ns = fs::File::open(format!("/var/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                // SAFETY: setns(2) on a namespace descriptor we own; it only
                // changes this short-lived thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                // SAFETY: plain socket(2) call; the result is checked below.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_NETLINK,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        libc::NETLINK_NETFILTER,
                    )
                };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink socket");
                }
                // SAFETY: fd is a fresh descriptor that nothing else owns.
                let sock = unsafe { OwnedFd::from_raw_fd(fd) };
                // nlmsghdr (len, type, flags, seq, pid) + nfgenmsg (family,
                // version, res_id): IPCTNL_MSG_CT_DELETE without attributes
                // flushes the table.
                const NFNL_SUBSYS_CTNETLINK: u16 = 1;
                const IPCTNL_MSG_CT_DELETE: u16 = 2;
                let mut msg = Vec::with_capacity(20);
                msg.extend_from_slice(&20u32.to_ne_bytes());
                msg.extend_from_slice(
                    &((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes(),
                );
                msg.extend_from_slice(
                    &((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes(),
                );
                msg.extend_from_slice(&1u32.to_ne_bytes());
                msg.extend_from_slice(&0u32.to_ne_bytes());
                msg.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
                // SAFETY: msg is a live buffer of msg.len() bytes.
                let sent =
                    unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
                if sent < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink send");
                }
                let mut buf = [0u8; 1024];
                // SAFETY: buf is a live, writable buffer of buf.len() bytes.
                let got =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if got < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink recv");
                }
                let got = got as usize;
                ensure!(got >= 20, "short netlink answer ({got} bytes)");
                let kind = u16::from_ne_bytes([buf[4], buf[5]]);
                if kind == libc::NLMSG_ERROR as u16 {
                    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                    // ENOENT: the table was already empty.
                    if errno != 0 && errno != -libc::ENOENT {
                        return Err(std::io::Error::from_raw_os_error(-errno))
                            .context("conntrack flush");
                    }
                }
                Ok(())
            })
            .join()
            .expect("flush thread does not panic")
    })
}

// ---------------------------------------------------------------------------
// Stands and candidates
// ---------------------------------------------------------------------------

/// One candidate's node with its server and client pods; the servers are
/// killed on drop.
pub struct Stand {
    /// The node (its own netns, netfilter tables and cgroup).
    pub node: Node,
    /// The server pod (`crr server` on [`CRR_TARGET_PORT`], iperf3 on
    /// [`IPERF_PORT`]).
    pub server: Pod,
    /// The client pod (port range widened, `tcp_tw_reuse` on).
    pub client: Pod,
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
    pub fn server_ip(&self) -> Ipv4Addr {
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
pub trait Candidate {
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
    /// Writes `yaml` and waits for the agent to log `reconciled N frontends`.
    fn apply(&self, yaml: &str, frontends: usize) -> Result<Duration> {
        let offset = self.agent.log_text().len();
        let needle = format!("reconciled {frontends} frontends");
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
fn build_candidate(
    kind: CandidateKind,
    lab: &mut Lab,
    bins: &Binaries,
    crr: &Path,
    iperf: bool,
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

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// One `crr client` run, as parsed from its JSON line.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClientSample {
    /// Transactions (connections in CRR) per second.
    pub tps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Completed transactions.
    pub transactions: u64,
    /// Failed transactions.
    pub errors: u64,
}

/// Transaction pattern of one measurement.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Crr,
    Rr,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
        }
    }
}

/// A `crr client` through `cand`, taking its turn of `turns` when given.
fn client_command(
    lab: &Lab,
    crr: &Path,
    cand: &dyn Candidate,
    mode: Mode,
    cfg: &Config,
    turns: Option<Turns>,
) -> Result<Command> {
    let target = cand.target(CRR_SERVICE_PORT, CRR_TARGET_PORT);
    let mut command = lab.command_in(&cand.stand().client, crr)?;
    command.args([
        "client",
        "--target",
        &target.to_string(),
        "--threads",
        &cfg.threads.to_string(),
        "--duration",
        &cfg.duration.as_secs_f64().to_string(),
        "--mode",
        mode.name(),
        "--pin",
        "--json",
    ]);
    if let Some(turns) = turns {
        command.args([
            "--turn",
            &turns.turn.to_string(),
            "--of",
            &turns.of.to_string(),
            "--slice-ms",
            &turns.slice.as_millis().to_string(),
            "--epoch-ns",
            &turns.epoch_ns.to_string(),
        ]);
    }
    Ok(command)
}

/// One `crr client` run through `cand` on its own.
fn run_client(
    lab: &Lab,
    crr: &Path,
    cand: &dyn Candidate,
    mode: Mode,
    cfg: &Config,
) -> Result<ClientSample> {
    let output = client_command(lab, crr, cand, mode, cfg, None)?
        .output()
        .context("running crr client")?;
    client_sample(cand, mode, &output)
}

/// How long before the first slice the clients of a pair are started: they
/// are up within milliseconds; a client that still misses its first slice
/// reports it, and the pair is measured again with [`LATE_START_MARGIN`].
const START_MARGIN: Duration = Duration::from_millis(150);
/// The margin of the second attempt.
const LATE_START_MARGIN: Duration = Duration::from_secs(2);

/// The candidates of one pair measured together, taking turns in slices of
/// `cfg.slice` (`cands[k]` has turn k), so that each sees the same machine
/// conditions as the other down to a slice. Samples in `cands` order.
fn run_taking_turns(
    lab: &Lab,
    crr: &Path,
    cands: &[&dyn Candidate],
    mode: Mode,
    cfg: &Config,
) -> Result<Vec<ClientSample>> {
    let mut late = None;
    for margin in [START_MARGIN, LATE_START_MARGIN] {
        for cand in cands {
            cand.before_measurement()?;
        }
        let epoch_ns = crr::monotonic_ns() + margin.as_nanos() as u64;
        let children = cands
            .iter()
            .enumerate()
            .map(|(turn, cand)| {
                let turns = Turns {
                    epoch_ns,
                    slice: cfg.slice,
                    turn: turn as u32,
                    of: cands.len() as u32,
                };
                client_command(lab, crr, *cand, mode, cfg, Some(turns))?
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting crr client")
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = children
            .into_iter()
            .map(|child| child.wait_with_output().context("running crr client"))
            .collect::<Result<Vec<_>>>()?;
        if let Some(output) = outputs
            .iter()
            .find(|o| String::from_utf8_lossy(&o.stderr).contains(crr::LATE_START))
        {
            late = Some(String::from_utf8_lossy(&output.stderr).trim().to_string());
            continue;
        }
        return cands
            .iter()
            .zip(&outputs)
            .map(|(cand, output)| client_sample(*cand, mode, output))
            .collect();
    }
    bail!(
        "crr clients missed their first slice twice: {}",
        late.unwrap_or_default()
    )
}

/// The sample a `crr client --json` run printed.
fn client_sample(cand: &dyn Candidate, mode: Mode, output: &Output) -> Result<ClientSample> {
    let target = cand.target(CRR_SERVICE_PORT, CRR_TARGET_PORT);
    let mode_s = mode.name();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let sample: ClientSample = serde_json::from_str(line).with_context(|| {
        format!(
            "{} {mode_s} to {target}: no report ({}): {}{}",
            cand.kind().name(),
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    ensure!(
        sample.transactions > 0,
        "{} {mode_s} to {target}: no transaction completed ({} errors)",
        cand.kind().name(),
        sample.errors
    );
    Ok(sample)
}

/// One iperf3 run through the candidate; Gbit/s received.
fn run_iperf(lab: &Lab, cand: &dyn Candidate, secs: Duration) -> Result<f64> {
    let target = cand.target(IPERF_PORT, IPERF_PORT);
    let secs = secs.as_secs().max(1).to_string();
    let mut last_err = None;
    // The server takes one test at a time and may still be closing the last.
    for _ in 0..3 {
        let output = lab
            .command_in(&cand.stand().client, "iperf3")?
            .args([
                "-c",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
                "-t",
                &secs,
                "-J",
            ])
            .output()
            .context("running iperf3")?;
        let parsed: Result<f64> = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .context("iperf3 JSON")
            .and_then(|v| {
                v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .with_context(|| format!("iperf3 gave no result: {}", v["error"]))
            });
        match parsed {
            Ok(bps) if output.status.success() => return Ok(bps / 1e9),
            Ok(_) => last_err = Some(anyhow::anyhow!("iperf3 failed: {}", output.status)),
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last_err.expect("at least one attempt"))
}

/// Everything measured for one (service count, candidate).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cell {
    /// CRR samples, one per round (direct: one per pair it was measured in).
    pub crr: Vec<ClientSample>,
    /// RR samples, likewise.
    pub rr: Vec<ClientSample>,
    /// Direct's CRR sample taken together with each of `crr`, the two
    /// taking turns (empty for direct itself, or when direct is not
    /// measured).
    pub crr_direct: Vec<ClientSample>,
    /// Direct's RR sample taken together with each of `rr`.
    pub rr_direct: Vec<ClientSample>,
    /// Time to program the services, seconds.
    pub program_s: Option<f64>,
    /// iperf3 throughput, Gbit/s.
    pub bulk_gbps: Option<f64>,
}

impl Cell {
    fn samples_mut(&mut self, mode: Mode) -> &mut Vec<ClientSample> {
        match mode {
            Mode::Crr => &mut self.crr,
            Mode::Rr => &mut self.rr,
        }
    }

    fn baselines_mut(&mut self, mode: Mode) -> &mut Vec<ClientSample> {
        match mode {
            Mode::Crr => &mut self.crr_direct,
            Mode::Rr => &mut self.rr_direct,
        }
    }
}

/// Two measurements taken back to back: a candidate and the direct path,
/// so that the ratio of the two sees the same machine conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pair {
    /// The candidate's index.
    candidate: usize,
    /// Direct's index, when direct is measured and is not the candidate.
    baseline: Option<usize>,
    /// Whether direct goes first.
    baseline_first: bool,
}

impl Pair {
    /// Candidate indices in measurement order.
    fn order(&self) -> Vec<usize> {
        match (self.baseline, self.baseline_first) {
            (Some(b), true) => vec![b, self.candidate],
            (Some(b), false) => vec![self.candidate, b],
            (None, _) => vec![self.candidate],
        }
    }
}

/// The measurements of one round: every candidate but direct paired with
/// direct, in an order rotating with the round, direct first in every other
/// round so that a drift over the pair does not favour either side. Without
/// direct, every candidate alone.
fn measurement_pairs(candidates: usize, direct: Option<usize>, round: usize) -> Vec<Pair> {
    let others: Vec<usize> = (0..candidates).filter(|&i| Some(i) != direct).collect();
    if others.is_empty() {
        return direct
            .map(|d| Pair {
                candidate: d,
                baseline: None,
                baseline_first: false,
            })
            .into_iter()
            .collect();
    }
    (0..others.len())
        .map(|k| {
            let candidate = others[(k + round) % others.len()];
            Pair {
                candidate,
                baseline: direct,
                baseline_first: (round + candidate).is_multiple_of(2),
            }
        })
        .collect()
}

/// One row of the table: medians over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Number of services.
    pub services: usize,
    /// Candidate.
    pub candidate: CandidateKind,
    /// Median CRR connections/s.
    pub crr_cps: f64,
    /// Median over rounds of CRR connections/s divided by direct's,
    /// measured together, taking turns.
    pub crr_ratio: Option<Ratio>,
    /// Median CRR p50 latency, µs.
    pub p50_us: f64,
    /// Median CRR p99 latency, µs.
    pub p99_us: f64,
    /// Median over rounds of p99 divided by direct's p99 in the same pair.
    pub p99_ratio: Option<Ratio>,
    /// Median RR transactions/s.
    pub rr_tps: f64,
    /// Median over rounds of RR transactions/s divided by direct's in the
    /// same pair.
    pub rr_ratio: Option<Ratio>,
    /// iperf3 Gbit/s (largest count only).
    pub bulk_gbps: Option<f64>,
    /// Time to program the services, seconds.
    pub program_s: Option<f64>,
    /// Failed CRR and RR transactions over all rounds.
    pub errors: u64,
}

/// A candidate's value over direct's: the median of the per-round ratios
/// and how far that median can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratio {
    /// Median of the per-round ratios.
    pub median: f64,
    /// A confidence interval of at least 95 % for that median
    /// ([`median_interval`]); `None` with fewer than 6 rounds, or for direct
    /// itself.
    pub interval: Option<(f64, f64)>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Table rows, by count then candidate.
    pub rows: Vec<Row>,
    /// The markdown table.
    pub table: String,
    /// Where `latest.md`, `latest.json` and `crr.svg` were written.
    pub out: PathBuf,
}

/// A distribution-free confidence interval of at least 95 % for the median
/// of `sorted` samples (independent rounds): the k-th smallest and k-th
/// largest sample, with the largest k for which fewer than k of n samples fall
/// on one side of the true median with probability at most 2.5 % (that count
/// is Binomial(n, 1/2)). `None` for fewer than 6 samples, where even the
/// extremes cover less than 95 %.
fn median_interval(sorted: &[f64]) -> Option<(f64, f64)> {
    let n = sorted.len();
    let mut tail = 0.0;
    // ln P(Binomial(n, 1/2) = i), in logs so that large n does not underflow.
    let mut ln_term = -(n as f64) * std::f64::consts::LN_2;
    let mut k = 0;
    for i in 0..n / 2 {
        let term = ln_term.exp();
        if tail + term > 0.025 {
            break;
        }
        tail += term;
        k = i + 1;
        ln_term += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    (k > 0).then(|| (sorted[k - 1], sorted[n - k]))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Whether this process runs as root.
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Runs the benchmark described by `cfg`, writes `latest.md`, `latest.json`
/// and `crr.svg` into `cfg.out` and returns the rows and the table.
pub fn run(cfg: &Config) -> Result<Outcome> {
    ensure!(
        is_root(),
        "the benchmark needs root (network namespaces, cgroups, BPF)"
    );
    ensure!(!cfg.counts.is_empty(), "no service counts");
    ensure!(
        cfg.counts.iter().all(|&c| c >= 1),
        "service counts start at 1"
    );
    ensure!(cfg.rounds >= 1, "at least one round");
    ensure!(!cfg.candidates.is_empty(), "no candidates");
    let bins = Binaries::locate()?;
    let crr = match &cfg.crr {
        Some(path) => path.clone(),
        None => {
            let path = bins.agent.with_file_name("crr");
            ensure!(
                path.exists(),
                "{} is missing; build it (`cargo build -p lb-bench --bins`)",
                path.display()
            );
            path
        }
    };
    let started = Instant::now();

    // The lab is declared first so that it is dropped last.
    let mut lab = Lab::new()?;
    let mut candidates: Vec<Box<dyn Candidate>> = Vec::new();
    for &kind in &cfg.candidates {
        candidates.push(build_candidate(
            kind,
            &mut lab,
            &bins,
            &crr,
            cfg.bulk.is_some(),
        )?);
    }
    let lab = &lab;
    let max_count = *cfg.counts.iter().max().expect("not empty");
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();

    for &count in &cfg.counts {
        for (i, cand) in candidates.iter_mut().enumerate() {
            let services =
                ServiceSet::new(count, cfg.endpoints_per_service, cand.stand().server_ip());
            let took = cand.program(lab, &services).with_context(|| {
                format!("programming {count} services for {}", cand.kind().name())
            })?;
            if let Some(took) = took {
                eprintln!(
                    "lb-bench: {count} services: {} programmed in {:.3} s",
                    cand.kind().name(),
                    took.as_secs_f64()
                );
            }
            cells.entry((count, i)).or_default().program_s = took.map(|d| d.as_secs_f64());
        }
        // A short unrecorded CRR run per candidate warms caches, the
        // conntrack and route lookups and the servers' threads.
        let warmup = Config {
            duration: (cfg.duration / 4).min(Duration::from_millis(500)),
            ..cfg.clone()
        };
        for cand in &candidates {
            cand.before_measurement()?;
            run_client(lab, &crr, cand.as_ref(), Mode::Crr, &warmup)?;
        }
        let direct = candidates
            .iter()
            .position(|c| c.kind() == CandidateKind::Direct);
        for round in 0..cfg.rounds {
            for mode in [Mode::Crr, Mode::Rr] {
                for pair in measurement_pairs(candidates.len(), direct, round) {
                    let order = pair.order();
                    let cands: Vec<&dyn Candidate> =
                        order.iter().map(|&i| candidates[i].as_ref()).collect();
                    let samples = run_taking_turns(lab, &crr, &cands, mode, cfg)?;
                    let mut measured = Vec::with_capacity(2);
                    for ((i, cand), sample) in order.into_iter().zip(cands).zip(samples) {
                        eprintln!(
                            "lb-bench: {count} services, round {}/{}: {:<10} {} {:>8.0}/s p50 {:>7.1} us p99 {:>7.1} us{}",
                            round + 1,
                            cfg.rounds,
                            cand.kind().name(),
                            mode.name(),
                            sample.tps,
                            sample.p50_us,
                            sample.p99_us,
                            if sample.errors > 0 {
                                format!(" ({} errors)", sample.errors)
                            } else {
                                String::new()
                            }
                        );
                        measured.push((i, sample));
                    }
                    let baseline = pair
                        .baseline
                        .and_then(|b| measured.iter().find(|(i, _)| *i == b))
                        .map(|(_, sample)| sample.clone());
                    for (i, sample) in measured {
                        let cell = cells.entry((count, i)).or_default();
                        cell.samples_mut(mode).push(sample);
                        if let (Some(baseline), false) = (&baseline, Some(i) == pair.baseline) {
                            cell.baselines_mut(mode).push(baseline.clone());
                        }
                    }
                }
            }
        }
        if let (Some(secs), true) = (cfg.bulk, count == max_count) {
            for (i, cand) in candidates.iter().enumerate() {
                cand.before_measurement()?;
                let gbps = run_iperf(lab, cand.as_ref(), secs)
                    .with_context(|| format!("iperf3 through {}", cand.kind().name()))?;
                eprintln!(
                    "lb-bench: {count} services: {} iperf3 {gbps:.2} Gbit/s",
                    cand.kind().name()
                );
                cells.entry((count, i)).or_default().bulk_gbps = Some(gbps);
            }
        }
    }
    let kinds: Vec<CandidateKind> = candidates.iter().map(|c| c.kind()).collect();
    drop(candidates);
    let elapsed = started.elapsed();

    let rows = summarize(&cfg.counts, &kinds, &cells);
    let table = render_table(&rows);
    fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let machine = Machine::probe();
    fs::write(
        cfg.out.join("latest.md"),
        render_report(cfg, &machine, &table, &rows, elapsed),
    )?;
    let raw = serde_json::json!({
        "machine": machine,
        "config": {
            "counts": cfg.counts,
            "rounds": cfg.rounds,
            "duration_s": cfg.duration.as_secs_f64(),
            "slice_ms": cfg.slice.as_millis(),
            "threads": cfg.threads,
            "endpoints_per_service": cfg.endpoints_per_service,
            "bulk_s": cfg.bulk.map(|d| d.as_secs_f64()),
            "quick": cfg.quick,
        },
        "rows": rows,
        "cells": cells.iter().map(|((count, i), cell)| serde_json::json!({
            "services": count,
            "candidate": kinds[*i],
            "cell": cell,
        })).collect::<Vec<_>>(),
    });
    fs::write(
        cfg.out.join("latest.json"),
        serde_json::to_string_pretty(&raw)? + "\n",
    )?;
    fs::write(
        cfg.out.join("crr.svg"),
        render_svg(&cfg.counts, &kinds, &rows),
    )?;
    Ok(Outcome {
        rows,
        table,
        out: cfg.out.clone(),
    })
}

/// The median of `field` of `samples` over `field` of the direct samples
/// paired with them, with its interval; exactly 1 for direct itself; `None`
/// without pairs.
fn paired_ratio(
    kind: CandidateKind,
    samples: &[ClientSample],
    direct: &[ClientSample],
    field: fn(&ClientSample) -> f64,
) -> Option<Ratio> {
    if kind == CandidateKind::Direct {
        return (!samples.is_empty()).then_some(Ratio {
            median: 1.0,
            interval: None,
        });
    }
    let mut ratios: Vec<f64> = samples
        .iter()
        .zip(direct)
        .filter(|(_, d)| field(d) > 0.0)
        .map(|(s, d)| field(s) / field(d))
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(Ratio {
        interval: median_interval(&ratios),
        median: median(ratios),
    })
}

/// Medians and paired ratios to direct.
fn summarize(
    counts: &[usize],
    kinds: &[CandidateKind],
    cells: &BTreeMap<(usize, usize), Cell>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &count in counts {
        for (i, &kind) in kinds.iter().enumerate() {
            let Some(cell) = cells.get(&(count, i)) else {
                continue;
            };
            let has_direct = kinds.contains(&CandidateKind::Direct);
            let ratio = |samples: &[ClientSample],
                         direct: &[ClientSample],
                         field: fn(&ClientSample) -> f64| {
                paired_ratio(kind, samples, direct, field).filter(|_| has_direct)
            };
            rows.push(Row {
                services: count,
                candidate: kind,
                crr_cps: median(cell.crr.iter().map(|s| s.tps).collect()),
                crr_ratio: ratio(&cell.crr, &cell.crr_direct, |s| s.tps),
                p50_us: median(cell.crr.iter().map(|s| s.p50_us).collect()),
                p99_us: median(cell.crr.iter().map(|s| s.p99_us).collect()),
                p99_ratio: ratio(&cell.crr, &cell.crr_direct, |s| s.p99_us),
                rr_tps: median(cell.rr.iter().map(|s| s.tps).collect()),
                rr_ratio: ratio(&cell.rr, &cell.rr_direct, |s| s.tps),
                bulk_gbps: cell.bulk_gbps,
                program_s: cell.program_s,
                errors: cell.crr.iter().chain(&cell.rr).map(|s| s.errors).sum(),
            });
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// `12345.6` -> `12,346`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio_cell(r: Option<Ratio>) -> String {
    match r {
        None => "–".into(),
        Some(Ratio {
            median,
            interval: None,
        }) => format!("{median:.2}x"),
        Some(Ratio {
            median,
            interval: Some((low, high)),
        }) => format!("{median:.2}x ({low:.2}–{high:.2})"),
    }
}

fn seconds_cell(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

/// The markdown table of `rows`.
pub fn render_table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| services | candidate | CRR conn/s | CRR vs direct | p50 µs | p99 µs | p99 vs direct \
         | RR trans/s | RR vs direct | bulk Gbit/s | time to program |\n",
    );
    t.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let errors = if r.errors > 0 {
            format!(" ({} errors)", r.errors)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {}{} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            thousands(r.services as f64),
            r.candidate.name(),
            errors,
            thousands(r.crr_cps),
            ratio_cell(r.crr_ratio),
            r.p50_us,
            r.p99_us,
            ratio_cell(r.p99_ratio),
            thousands(r.rr_tps),
            ratio_cell(r.rr_ratio),
            r.bulk_gbps
                .map_or_else(|| "–".into(), |g| format!("{g:.2}")),
            seconds_cell(r.program_s),
        );
    }
    t
}

/// Facts about the machine a run came from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// Kernel release.
    pub kernel: String,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// UTC date and time of the run.
    pub date: String,
    /// `iptables --version`.
    pub iptables: String,
    /// `nft --version`.
    pub nft: String,
}

impl Machine {
    /// Reads the facts from /proc and the tools.
    pub fn probe() -> Self {
        let tool = |program: &str, args: &[&str]| -> String {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
            cpu,
            date: tool("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            iptables: tool("iptables", &["--version"]),
            nft: tool("nft", &["--version"]),
        }
    }
}

fn render_report(
    cfg: &Config,
    machine: &Machine,
    table: &str,
    rows: &[Row],
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    md.push_str("# Datapath benchmark: latest run\n\n");
    if cfg.quick {
        md.push_str(
            "**Quick mode** (a smoke test of the benchmark code; the numbers mean little).\n\n",
        );
    }
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}, {}, {}. Run on {} (took {:.0} s).\n",
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.iptables,
        machine.nft,
        machine.date,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Settings: service counts {}, {} interleaved round(s), {:.1} s per CRR and RR \
         measurement, {} client thread(s), 1-byte request and response, {} fake endpoints \
         per filler service{}.\n",
        cfg.counts
            .iter()
            .map(|&c| thousands(c as f64))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.rounds,
        cfg.duration.as_secs_f64(),
        cfg.threads,
        cfg.endpoints_per_service,
        match cfg.bulk {
            Some(d) => format!(
                ", iperf3 for {} s per candidate at the largest count",
                d.as_secs()
            ),
            None => ", no iperf3".into(),
        }
    );
    md.push_str(table);
    let _ = write!(
        md,
        "\nValues are medians over rounds; \"vs direct\" is the median over rounds of the \
         candidate's value divided by direct's value measured together with it, the two \
         clients taking turns in {slice} ms slices (client threads pinned one per CPU); in \
         parentheses, a confidence interval of at least 95 % \
         for that median (order statistics of the per-round ratios, from 6 rounds on). \
         p50/p99 are CRR transaction latencies (connect, request, response). Time to program: \
         socket-lb and tc from writing the manifest to the agent's `reconciled N frontends` \
         log line (the agent's manifest poll/debounce period set to 10 ms); iptables and \
         nftables the wall time of `iptables-restore` and `nft -f` loading the rules into an \
         empty table.\n\n",
        slice = cfg.slice.as_millis()
    );
    md.push_str(
        "Candidates (each on a lab node of its own, client and server pods on that node):\n\n",
    );
    let mut seen = Vec::new();
    for r in rows {
        if !seen.contains(&r.candidate) {
            seen.push(r.candidate);
            let _ = writeln!(
                md,
                "- `{}`: {}",
                r.candidate.name(),
                r.candidate.description()
            );
        }
    }
    md.push_str("\n![connections per second by service count](crr.svg)\n\n");
    md.push_str(
        "Raw per-round samples: `latest.json`. Reproduce: see README.md in this directory.\n",
    );
    md
}

/// Colours of the plot's series, by candidate position.
const COLORS: [&str; 6] = [
    "#4d4d4d", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd",
];

/// A line plot (SVG) of median CRR connections/s against service count, one
/// line per candidate; counts are evenly spaced on the x axis.
pub fn render_svg(counts: &[usize], kinds: &[CandidateKind], rows: &[Row]) -> String {
    let (w, h) = (720.0_f64, 440.0_f64);
    let (left, right, top, bottom) = (80.0, 170.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let mut counts: Vec<usize> = counts.to_vec();
    counts.sort_unstable();
    counts.dedup();
    let max = rows.iter().map(|r| r.crr_cps).fold(0.0, f64::max);
    let step = nice_step(max / 5.0);
    let ymax = ((max / step).ceil() * step).max(step);
    let x = |i: usize| {
        if counts.len() == 1 {
            left + pw / 2.0
        } else {
            left + pw * i as f64 / (counts.len() - 1) as f64
        }
    };
    let y = |v: f64| top + ph * (1.0 - v / ymax);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">TCP CRR connections/s by number of services (median)</text>"#,
        left + pw / 2.0
    );
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 8.0,
            yy + 4.0,
            thousands(v)
        );
        v += step;
    }
    for (i, &c) in counts.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(i),
            top + ph + 20.0,
            thousands(c as f64)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">services</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">connections/s</text>"#,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    for (k, &kind) in kinds.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<(f64, f64)> = counts
            .iter()
            .enumerate()
            .filter_map(|(i, &c)| {
                rows.iter()
                    .find(|r| r.candidate == kind && r.services == c)
                    .map(|r| (x(i), y(r.crr_cps)))
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let dash = if kind == CandidateKind::Direct {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for (px, py) in &points {
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = top + 10.0 + 22.0 * k as f64;
        let lx = left + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            kind.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A round step (1, 2 or 5 times a power of ten) at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread inside network namespace `netns`.
    fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
        let ns = fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) with a namespace descriptor we own; it
                    // only moves this test thread.
                    assert_eq!(
                        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                        0
                    );
                    f()
                })
                .join()
                .unwrap()
        })
    }

    #[test]
    fn conntrack_flush_empties_the_namespace_table() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let netns = format!("lbbench-ct-{}", std::process::id());
        lb_e2e::lab::run("ip", &["netns", "add", &netns]).unwrap();
        let result = std::panic::catch_unwind(|| {
            lb_e2e::lab::run("ip", &["-n", &netns, "link", "set", "lo", "up"]).unwrap();
            run_with_input(
                Command::new("ip").args(["netns", "exec", &netns, "nft", "-f", "-"]),
                "nft",
                "add table ip t\nadd chain ip t out { type filter hook output priority 0 ; }\n\
                 add rule ip t out ct state new counter\n"
                    .into(),
            )
            .unwrap();
            let count = || {
                in_netns(&netns, || {
                    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
                        .unwrap()
                        .trim()
                        .parse::<u64>()
                        .unwrap()
                })
            };
            in_netns(&netns, || {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                for _ in 0..5 {
                    let _c = std::net::TcpStream::connect(addr).unwrap();
                    let _ = listener.accept().unwrap();
                }
            });
            assert!(count() >= 5, "conntrack saw the connections");
            flush_conntrack(&netns).unwrap();
            assert_eq!(count(), 0);
            // Flushing an empty table is fine too.
            flush_conntrack(&netns).unwrap();
        });
        let _ = lb_e2e::lab::run("ip", &["netns", "del", &netns]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn every_candidate_is_paired_with_direct_in_alternating_order() {
        // Direct is candidate 0 of 4.
        for round in 0..4 {
            let pairs = measurement_pairs(4, Some(0), round);
            let mut seen: Vec<usize> = pairs.iter().map(|p| p.candidate).collect();
            seen.sort();
            assert_eq!(seen, [1, 2, 3]);
            assert!(pairs.iter().all(|p| p.baseline == Some(0)));
            assert_eq!(pairs[0].candidate, 1 + round % 3, "rotating order");
        }
        // Over two rounds each candidate has direct once before, once after.
        for candidate in 1..4 {
            let first: Vec<bool> = (0..2)
                .map(|round| {
                    measurement_pairs(4, Some(0), round)
                        .into_iter()
                        .find(|p| p.candidate == candidate)
                        .unwrap()
                        .baseline_first
                })
                .collect();
            assert_ne!(first[0], first[1], "candidate {candidate}");
        }
        let order = measurement_pairs(2, Some(1), 0)[0].order();
        assert_eq!(order, [1, 0]);
        // Without direct, or with direct alone: single measurements.
        assert!(measurement_pairs(2, None, 0)
            .iter()
            .all(|p| p.order().len() == 1));
        assert_eq!(measurement_pairs(1, Some(0), 0)[0].order(), [0]);
    }

    #[test]
    fn ratios_use_the_paired_direct_samples() {
        let sample = |tps: f64| ClientSample {
            tps,
            p50_us: 1.0,
            p99_us: 2.0,
            transactions: 1,
            errors: 0,
        };
        let samples = [sample(90.0), sample(50.0), sample(99.0)];
        let direct = [sample(100.0), sample(50.0), sample(100.0)];
        let r = paired_ratio(CandidateKind::Tc, &samples, &direct, |s| s.tps);
        assert_eq!(
            r,
            Some(Ratio {
                median: 0.99,
                interval: None
            })
        );
        assert_eq!(
            paired_ratio(CandidateKind::Direct, &direct, &[], |s| s.tps),
            Some(Ratio {
                median: 1.0,
                interval: None
            })
        );
        assert_eq!(
            paired_ratio(CandidateKind::Tc, &samples, &[], |s| s.tps),
            None
        );
    }

    #[test]
    fn median_intervals_are_order_statistics_covering_95_percent() {
        let sorted = |n: usize| (1..=n).map(|i| i as f64).collect::<Vec<_>>();
        // Fewer than 6 rounds: even the extremes cover less than 95 %.
        assert_eq!(median_interval(&sorted(5)), None);
        assert_eq!(median_interval(&[]), None);
        // 6 rounds: the extremes (1 - 2/64 = 96.9 %).
        assert_eq!(median_interval(&sorted(6)), Some((1.0, 6.0)));
        // 9 rounds: 2nd and 8th (1 - 2 * 10/512 = 96.1 %).
        assert_eq!(median_interval(&sorted(9)), Some((2.0, 8.0)));
        // 15 rounds: 4th and 12th (1 - 2 * 576/32768 = 96.5 %).
        assert_eq!(median_interval(&sorted(15)), Some((4.0, 12.0)));
        // 24 rounds (the full benchmark): 7th and 18th (1 - 2 * 190051/2^24 = 97.7 %).
        assert_eq!(median_interval(&sorted(24)), Some((7.0, 18.0)));
        // 100 rounds: 40th and 61st, the textbook values.
        assert_eq!(median_interval(&sorted(100)), Some((40.0, 61.0)));
        // Far beyond 0.5^n's range, about n/2 -/+ 1.96 sqrt(n)/2.
        let (low, high) = median_interval(&sorted(10_000)).unwrap();
        assert!((4900.0..=4903.0).contains(&low), "{low}");
        assert!((9999.0 - high - low).abs() <= 2.0, "{low} {high}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(1800.0), 2000.0);
        assert_eq!(nice_step(10_000.0), 10_000.0);
    }

    #[test]
    fn candidates_parse_by_name() {
        for k in CandidateKind::ALL {
            assert_eq!(k.name().parse::<CandidateKind>().unwrap(), k);
        }
        assert!("ipvs".parse::<CandidateKind>().is_err());
    }

    #[test]
    fn service_set_puts_the_measured_port_last() {
        let set = ServiceSet::new(5, 3, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(set.count, 5);
        // 4 fillers + the measured service's two ports.
        assert_eq!(set.frontends(), 6);
        let last = set.ports.last().unwrap();
        assert_eq!(
            (last.cluster_ip, last.port),
            (MEASURED_VIP, CRR_SERVICE_PORT)
        );
        assert_eq!(
            last.endpoints,
            vec![SocketAddrV4::new(
                Ipv4Addr::new(10, 244, 1, 2),
                CRR_TARGET_PORT
            )]
        );
        let ipt = set.iptables();
        let dispatch: Vec<&str> = ipt
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains("cluster IP"))
            .collect();
        assert_eq!(dispatch.len(), 6);
        assert!(dispatch[5].contains("-d 10.96.0.10 --dport 80 "));
        // Fillers' endpoints stay out of the lab's pod addresses.
        assert!(set.ports[0].endpoints[0].ip().octets()[1] == 250);
        let yaml = set.yaml();
        assert_eq!(yaml.matches("kind: Service\n").count(), 5);
        assert_eq!(yaml.matches("kind: EndpointSlice\n").count(), 5);
        assert!(yaml.contains("clusterIP: 10.96.0.10"));
        assert!(yaml.contains("10.244.1.2"));
        assert_eq!(ServiceSet::new(1, 3, Ipv4Addr::LOCALHOST).frontends(), 2);
    }

    #[test]
    fn table_and_plot_render() {
        let sample = |tps: f64| ClientSample {
            tps,
            p50_us: 50.0,
            p99_us: 200.0,
            transactions: 10,
            errors: 0,
        };
        let mut cells = BTreeMap::new();
        for (i, tps) in [(0usize, 1000.0), (1, 900.0)] {
            for count in [1usize, 1000] {
                cells.insert(
                    (count, i),
                    Cell {
                        crr: vec![sample(tps), sample(tps * 1.1)],
                        rr: vec![sample(tps * 3.0)],
                        crr_direct: if i == 0 {
                            Vec::new()
                        } else {
                            vec![sample(1000.0), sample(1100.0)]
                        },
                        rr_direct: if i == 0 {
                            Vec::new()
                        } else {
                            vec![sample(3000.0)]
                        },
                        program_s: (i == 1).then_some(0.25),
                        bulk_gbps: None,
                    },
                );
            }
        }
        let kinds = [CandidateKind::Direct, CandidateKind::Iptables];
        let rows = summarize(&[1, 1000], &kinds, &cells);
        assert_eq!(rows.len(), 4);
        assert!((rows[1].crr_ratio.unwrap().median - 0.9).abs() < 1e-9);
        assert!((rows[1].crr_cps - 945.0).abs() < 1e-9);
        let table = render_table(&rows);
        assert!(
            table.contains("| 1,000 | iptables | 945 | 0.90x |"),
            "{table}"
        );
        assert!(table.contains("250 ms"));
        let svg = render_svg(&[1, 1000], &kinds, &rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
