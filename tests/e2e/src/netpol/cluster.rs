//! The cluster every case runs against: two lab nodes, each with a lab
//! kubelet and the agent (Kubernetes API source), namespaces x, y and z with
//! pods a, b and c each, and one ClusterIP Service per pod.
//!
//! Pods are spread over the nodes in model order (x/a on node1, x/b on
//! node2, x/c on node1, ...), so that same-node and cross-node pairs occur,
//! within a namespace and across namespaces. Every pod serves 80 and 81 over
//! TCP and UDP (named container ports `serve-<port>-<proto>`) and declares
//! 80 and 81 over SCTP too (not served: the lab has no SCTP server), as
//! upstream's pods name their ports.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    cases::{cidr4, fill, Catalogue, PodId, PortProto, Protocol},
    matrix::{mismatches, render, Cell, Expected, Observed, Target, Verdict},
    probe::{parse_outcomes, Outcome},
};
use crate::{
    agent::Binaries,
    controlplane::ControlPlane,
    kubelet::Kubelet,
    lab::{Lab, Node, Pod},
};

/// Per-probe timeout (TCP connect, then the greeting; UDP answer): the lab
/// has no latency, an allowed probe answers within milliseconds.
pub const PROBE_TIMEOUT_MS: u64 = 400;
/// How long a matrix may take to reach the expected state after a change.
pub const MATRIX_DEADLINE: Duration = Duration::from_secs(15);
/// How long the first all-allowed matrix may take after the cluster starts
/// (the agents program 9 Services while the EndpointSlices appear).
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two rounds of a matrix that is not there yet.
const ROUND_PAUSE: Duration = Duration::from_millis(100);
/// The ports every pod serves, over TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];
/// Names of the lab nodes.
const NODES: [&str; 2] = ["node1", "node2"];

/// A pod of the model as it runs in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterPod {
    /// Logical id (`x/a`).
    pub id: PodId,
    /// Real namespace name.
    pub namespace: String,
    /// Index of its node.
    pub node: usize,
    /// The lab pod the kubelet runs it in (its `ip` is the podIP).
    pub lab: Pod,
    /// ClusterIP of its Service `s-<ns>-<pod>`.
    pub cluster_ip: String,
}

/// The agent of one node, started in the node's network namespace and
/// cgroup as a hostNetwork DaemonSet pod runs, with the Kubernetes API as
/// its source (reached through [`Lab::forward_to_root`]); killed on drop.
///
/// Not [`crate::agent::Agent::start_api`]: that one runs the agent in the root network
/// namespace (where the e2e API server listens), where the routes to the
/// node's pods, and so their interfaces, cannot be seen.
pub struct NodeAgent {
    child: Child,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl NodeAgent {
    /// Starts lb-agent for `node` with `kubeconfig` and waits until it is ready.
    pub fn start(lab: &Lab, bins: &Binaries, node: &Node, kubeconfig: &Path) -> Result<Self> {
        let log = lab.work_dir().join(format!("{}-agent.log", node.name));
        let mut command = lab.command_in(node, &bins.agent)?;
        let child = command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", &node.name])
            .args(["--metrics-address", "127.0.0.1:0"])
            .args(["--healthz-address", "127.0.0.1:0"])
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpffs-dir")
            .arg(&node.bpffs)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting lb-agent")?;
        let agent = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.log_text().contains("ready:") {
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} never became ready:\n{}",
                    node.name,
                    agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the control plane's kubeconfig for processes of `node`, whose
/// API server address is a relay in the node's network namespace.
fn node_kubeconfig(lab: &Lab, cp: &ControlPlane, node: &Node) -> Result<PathBuf> {
    let server = cp.server()?;
    let target: SocketAddr = server
        .strip_prefix("https://")
        .with_context(|| format!("API server URL {server}"))?
        .parse()
        .with_context(|| format!("API server URL {server}"))?;
    let relay = lab.forward_to_root(node, target)?;
    let text = fs::read_to_string(cp.kubeconfig())?;
    if !text.contains(&server) {
        bail!("{} does not name {server}", cp.kubeconfig().display());
    }
    let path = lab.work_dir().join(format!("{}-kubeconfig", node.name));
    fs::write(&path, text.replace(&server, &format!("https://{relay}")))?;
    Ok(path)
}

/// A label change to undo: `kubectl label KIND NAME [-n NS] ARGS --overwrite`.
#[derive(Clone, Debug)]
struct Undo {
    kind: &'static str,
    namespace: Option<String>,
    name: String,
    args: Vec<String>,
    /// Every label before the change, checked after the undo.
    original: BTreeMap<String, String>,
}

/// The shared cluster. Fields drop in order: the agents and kubelets stop
/// before the lab is torn down.
pub struct Cluster {
    agents: Vec<NodeAgent>,
    kubelets: Vec<Kubelet>,
    nodes: Vec<Node>,
    /// The 9 pods, in the catalogue's order.
    pub pods: Vec<ClusterPod>,
    /// The cases and the namespace names.
    pub catalogue: Catalogue,
    bins: Binaries,
    lab: Arc<Mutex<Lab>>,
    cp: &'static ControlPlane,
    /// Label changes not undone yet (last first).
    pending: Vec<Undo>,
    /// Whether a policy may exist (created since the last clean-up).
    policies_dirty: bool,
}

fn lock(lab: &Mutex<Lab>) -> MutexGuard<'_, Lab> {
    lab.lock().unwrap_or_else(|e| e.into_inner())
}

/// The container ports of every pod: (port, protocol), SCTP declared but not served.
fn container_ports() -> Vec<(u16, Protocol)> {
    let mut ports = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        for port in PORTS {
            ports.push((port, protocol));
        }
    }
    ports
}

/// A Pod as upstream's model makes it: label `pod: <name>`, one container
/// per (port, protocol) with port name `serve-<port>-<proto>`, bound to
/// `node` (the lab has no scheduler).
fn pod_yaml(namespace: &str, name: &str, node: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{name}\"\n  namespace: \"{namespace}\"\n  labels:\n    pod: \"{name}\"\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers:\n"
    );
    for (port, protocol) in container_ports() {
        let lower = protocol.lower();
        let _ = write!(
            yaml,
            "  - name: cont-{port}-{lower}\n    image: registry.example/labpod:1\n    ports:\n    - containerPort: {port}\n      name: serve-{port}-{lower}\n      protocol: {protocol}\n"
        );
    }
    yaml
}

/// The Service `s-<ns>-<pod>` selecting one pod, on 80 and 81 over TCP and
/// UDP (no SCTP: the agent refuses SCTP Service ports).
fn service_yaml(namespace: &str, name: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s-{namespace}-{name}\n  namespace: \"{namespace}\"\nspec:\n  selector:\n    pod: \"{name}\"\n  ports:\n"
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in PORTS {
            let _ = write!(
                yaml,
                "  - name: service-port-{}-{port}\n    port: {port}\n    protocol: {protocol}\n",
                protocol.lower()
            );
        }
    }
    yaml
}

impl Cluster {
    /// Starts the control plane (shared by the process), the nodes, kubelets
    /// and agents, and creates the namespaces, Pods and Services; waits until
    /// every Pod runs. Does not probe (see [`Cluster::check_baseline`]).
    pub fn start() -> Result<Self> {
        let catalogue = Catalogue::load()?;
        let cp = ControlPlane::shared()?;
        let bins = Binaries::locate()?;
        let mut lab = Lab::new()?;
        let nodes = NODES
            .iter()
            .map(|name| lab.add_node(name))
            .collect::<Result<Vec<_>>>()?;
        let lab = Arc::new(Mutex::new(lab));
        let kubelets = nodes
            .iter()
            .map(|node| Kubelet::start(cp.kubeconfig(), lab.clone(), node, &bins.labpod))
            .collect::<Result<Vec<_>>>()?;
        let agents = nodes
            .iter()
            .map(|node| {
                let lab = lock(&lab);
                let kubeconfig = node_kubeconfig(&lab, cp, node)?;
                NodeAgent::start(&lab, &bins, node, &kubeconfig)
            })
            .collect::<Result<Vec<_>>>()?;

        let ids = catalogue.pod_ids()?;
        let mut namespaces = BTreeSet::new();
        let mut yaml = String::new();
        for (i, id) in ids.iter().enumerate() {
            let ns = catalogue.namespace(&id.ns)?.to_string();
            if namespaces.insert(ns.clone()) {
                cp.create_namespace(&ns)?;
            }
            let _ = write!(
                yaml,
                "{}---\n{}---\n",
                pod_yaml(&ns, &id.name, NODES[i % NODES.len()]),
                service_yaml(&ns, &id.name)
            );
        }
        cp.kubectl_with_input(&["apply", "-f", "-"], Some(&yaml))?;

        let services: Value =
            serde_json::from_str(&cp.kubectl(&["get", "services", "-A", "-o", "json"])?)?;
        let mut cluster_ips = BTreeMap::new();
        for item in services["items"].as_array().into_iter().flatten() {
            let meta = &item["metadata"];
            if let (Some(ns), Some(name), Some(ip)) = (
                meta["namespace"].as_str(),
                meta["name"].as_str(),
                item["spec"]["clusterIP"].as_str(),
            ) {
                cluster_ips.insert((ns.to_string(), name.to_string()), ip.to_string());
            }
        }
        let mut pods = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let node = i % NODES.len();
            let namespace = catalogue.namespace(&id.ns)?.to_string();
            let record =
                kubelets[node].wait_for_pod(&namespace, &id.name, Duration::from_secs(60))?;
            let service = format!("s-{namespace}-{}", id.name);
            let cluster_ip = cluster_ips
                .get(&(namespace.clone(), service.clone()))
                .with_context(|| format!("Service {namespace}/{service} has no ClusterIP"))?
                .clone();
            cluster_ip
                .parse::<Ipv4Addr>()
                .with_context(|| format!("ClusterIP of {service}: {cluster_ip:?}"))?;
            pods.push(ClusterPod {
                id: id.clone(),
                namespace,
                node,
                lab: record.pod,
                cluster_ip,
            });
        }
        Ok(Self {
            agents,
            kubelets,
            nodes,
            pods,
            catalogue,
            bins,
            lab,
            cp,
            pending: Vec::new(),
            policies_dirty: false,
        })
    }

    /// A line per pod: namespace, name, node, pod IP, ClusterIP.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for pod in &self.pods {
            let _ = writeln!(
                text,
                "  {:<5} {:<6} pod IP {:<12} ClusterIP {}",
                pod.id.to_string(),
                self.nodes[pod.node].name,
                pod.lab.ip,
                pod.cluster_ip
            );
        }
        text
    }

    /// The pod ids in matrix order.
    pub fn pod_ids(&self) -> Vec<PodId> {
        self.pods.iter().map(|p| p.id.clone()).collect()
    }

    /// Upstream's readiness gate, on every port and protocol the pods serve:
    /// the whole matrix allowed, through pod IPs and ClusterIPs.
    pub fn check_baseline(&self) -> Result<()> {
        let all = Expected::all_allowed(&self.pod_ids());
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for port in PORTS {
                let pp = PortProto { port, protocol };
                self.expect(
                    &format!("baseline {pp}, no policy"),
                    pp,
                    &all,
                    STARTUP_DEADLINE,
                )?;
            }
        }
        Ok(())
    }

    /// The placeholder values: `NS_X`.., `IP_<ns>_<pod>` and `CIDR4_<ns>_<pod>`.
    pub fn vars(&self) -> Result<BTreeMap<String, String>> {
        let mut vars = self.catalogue.namespaces.clone();
        for pod in &self.pods {
            let ip: Ipv4Addr = pod.lab.ip.parse()?;
            vars.insert(format!("IP_{}_{}", pod.id.ns, pod.id.name), ip.to_string());
            vars.insert(format!("CIDR4_{}_{}", pod.id.ns, pod.id.name), cidr4(ip));
        }
        Ok(vars)
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cp.kubectl(args)
    }

    /// Creates (`create`) or replaces (`replace`) a NetworkPolicy given as
    /// an object with placeholders.
    pub fn write_policy(&mut self, verb: &str, policy: &Value) -> Result<String> {
        let text = fill(&serde_json::to_string(policy)?, &self.vars()?)?;
        self.policies_dirty = true;
        self.cp
            .kubectl_with_input(&[verb, "-f", "-"], Some(&text))
            .map(|out| out.trim().to_string())
    }

    /// Deletes every NetworkPolicy of the cluster.
    pub fn delete_policies(&mut self) -> Result<()> {
        self.policies_dirty = true;
        self.cp
            .kubectl(&["delete", "networkpolicies", "--all", "--all-namespaces"])?;
        self.policies_dirty = false;
        Ok(())
    }

    /// Sets `labels` on a namespace (`namespace` None) or pod, remembering
    /// how to undo it.
    pub fn label(
        &mut self,
        kind: &'static str,
        namespace: Option<&str>,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let current = self.labels_of(kind, namespace, name)?;
        let undo = labels
            .keys()
            .map(|key| match current.get(key) {
                Some(value) => format!("{key}={value}"),
                None => format!("{key}-"),
            })
            .collect();
        self.pending.push(Undo {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.into(),
            args: undo,
            original: current,
        });
        let set: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.run_label(kind, namespace, name, &set)
    }

    /// The labels of a namespace (`namespace` None) or pod.
    fn labels_of(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<BTreeMap<String, String>> {
        let mut get = vec!["get", kind, name, "-o", "jsonpath={.metadata.labels}"];
        if let Some(ns) = namespace {
            get.extend(["-n", ns]);
        }
        let labels = self.cp.kubectl(&get)?;
        if labels.trim().is_empty() {
            return Ok(BTreeMap::new());
        }
        serde_json::from_str(&labels)
            .with_context(|| format!("labels of {kind} {name}: {labels:?}"))
    }

    fn run_label(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        args: &[String],
    ) -> Result<()> {
        let mut all = vec!["label", kind, name, "--overwrite"];
        if let Some(ns) = namespace {
            all.extend(["-n", ns]);
        }
        all.extend(args.iter().map(String::as_str));
        self.cp.kubectl(&all)?;
        Ok(())
    }

    /// Deletes the policies and undoes the label changes of the cases so
    /// far. What fails stays pending for the next call.
    pub fn restore(&mut self) -> Result<()> {
        if self.policies_dirty {
            self.delete_policies()?;
        }
        while let Some(undo) = self.pending.last().cloned() {
            let ns = undo.namespace.as_deref();
            self.run_label(undo.kind, ns, &undo.name, &undo.args)?;
            let now = self.labels_of(undo.kind, ns, &undo.name)?;
            if now != undo.original {
                bail!(
                    "{} {} has labels {now:?} after the undo, not {:?}",
                    undo.kind,
                    undo.name,
                    undo.original
                );
            }
            self.pending.pop();
        }
        Ok(())
    }

    /// Probes (or, for SCTP, traces) the matrix on `pp` until it equals
    /// `expected` or `deadline` passes; on failure the error shows the last
    /// round's matrices.
    pub fn expect(
        &self,
        title: &str,
        pp: PortProto,
        expected: &Expected,
        deadline: Duration,
    ) -> Result<()> {
        let targets: &[Target] = if pp.protocol == Protocol::Sctp {
            &[Target::Trace]
        } else {
            &[Target::PodIp, Target::ClusterIp]
        };
        let started = Instant::now();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let observed = if pp.protocol == Protocol::Sctp {
                self.trace_round(pp)?
            } else {
                self.probe_round(pp)?
            };
            let wrong = mismatches(expected, &observed, targets);
            if wrong.is_empty() {
                eprintln!(
                    "  {title}: as expected ({} pairs denied) after {rounds} round(s), {:.2} s",
                    expected.denied_count(),
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if started.elapsed() >= deadline {
                bail!(
                    "{title}: the matrix did not reach the expected state within {deadline:?} ({rounds} rounds); last round:\n{}\npods:\n{}{}",
                    render(&format!("{pp}"), expected, &observed, targets),
                    self.describe(),
                    self.agent_problems()
                );
            }
            thread::sleep(ROUND_PAUSE);
        }
    }

    /// One round of probes: from every pod to every other pod, to its pod
    /// IP and to its ClusterIP, on `pp`; one `labpod probe` per source pod,
    /// all at once.
    pub fn probe_round(&self, pp: PortProto) -> Result<Observed> {
        let mut children: Vec<(usize, Child)> = Vec::new();
        for (i, from) in self.pods.iter().enumerate() {
            let mut args = vec![
                "probe".to_string(),
                "--protocol".into(),
                pp.protocol.lower().into(),
                "--timeout-ms".into(),
                PROBE_TIMEOUT_MS.to_string(),
            ];
            for (j, to) in self.pods.iter().enumerate().filter(|(j, _)| *j != i) {
                args.push("--target".into());
                args.push(format!("{j}/pod={}:{}", to.lab.ip, pp.port));
                args.push("--target".into());
                args.push(format!("{j}/svc={}:{}", to.cluster_ip, pp.port));
            }
            let mut command = lock(&self.lab).command_in(&from.lab, &self.bins.labpod)?;
            command
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = command
                .spawn()
                .with_context(|| format!("starting labpod probe in {}", from.id))?;
            children.push((i, child));
        }
        let mut observed = Observed::default();
        for (i, child) in children {
            let output = child.wait_with_output()?;
            if !output.status.success() {
                bail!(
                    "labpod probe in {}: {}",
                    self.pods[i].id,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            for outcome in parse_outcomes(&output.stdout)? {
                let (to, kind) = outcome
                    .label
                    .split_once('/')
                    .with_context(|| format!("label {:?}", outcome.label))?;
                let to: usize = to.parse()?;
                let target = match kind {
                    "pod" => Target::PodIp,
                    "svc" => Target::ClusterIp,
                    other => bail!("unknown target kind {other}"),
                };
                let cell = self.judge(to, target, pp, &outcome);
                observed.insert(target, i, to, cell);
            }
        }
        Ok(observed)
    }

    /// What a probe's outcome means: allowed only if the destination pod
    /// itself answered (TCP: on its own address and the probed port).
    fn judge(&self, to: usize, target: Target, pp: PortProto, outcome: &Outcome) -> Cell {
        let pod = &self.pods[to];
        let address = match target {
            Target::ClusterIp => format!("{}:{}", pod.cluster_ip, pp.port),
            _ => format!("{}:{}", pod.lab.ip, pp.port),
        };
        if !outcome.ok {
            return Cell {
                verdict: Verdict::Denied,
                detail: format!(
                    "{address}/{}: {} after {} ms",
                    pp.protocol,
                    outcome.error.as_deref().unwrap_or("no answer"),
                    outcome.ms
                ),
            };
        }
        let backend = outcome.backend.as_deref().unwrap_or("?");
        let served_on = outcome.served_on.as_deref().unwrap_or("?");
        let own = format!("{}:{}", pod.lab.ip, pp.port);
        let right_pod =
            backend == pod.id.name && (pp.protocol != Protocol::Tcp || served_on == own);
        Cell {
            verdict: if right_pod {
                Verdict::Allowed
            } else {
                Verdict::Misrouted
            },
            detail: format!(
                "{address}/{}: answered by {backend:?} on {served_on} in {} ms",
                pp.protocol, outcome.ms
            ),
        }
    }

    /// One round of `lbctl policy trace` (no traffic): for every pair, on
    /// the node of the source pod and on the node of the destination pod;
    /// the pair is allowed if every node says allowed. A failing lbctl is an
    /// error at once (no polling).
    pub fn trace_round(&self, pp: PortProto) -> Result<Observed> {
        let mut jobs: Vec<(usize, usize, usize, Vec<String>, Child)> = Vec::new();
        for (i, from) in self.pods.iter().enumerate() {
            for (j, to) in self.pods.iter().enumerate().filter(|(j, _)| *j != i) {
                let nodes: BTreeSet<usize> = [from.node, to.node].into();
                for node in nodes {
                    let args = vec![
                        "--bpffs-dir".to_string(),
                        self.nodes[node].bpffs.to_string_lossy().into_owned(),
                        "policy".into(),
                        "trace".into(),
                        "--from".into(),
                        format!("{}/{}", from.namespace, from.id.name),
                        "--to".into(),
                        format!(
                            "{}/{}:{}/{}",
                            to.namespace,
                            to.id.name,
                            pp.port,
                            pp.protocol.lower()
                        ),
                    ];
                    let child = std::process::Command::new(&self.bins.lbctl)
                        .args(&args)
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .context("starting lbctl")?;
                    jobs.push((i, j, node, args, child));
                }
            }
        }
        let mut verdicts: BTreeMap<(usize, usize), (bool, Vec<String>)> = BTreeMap::new();
        let mut failure = None;
        for (i, j, node, args, child) in jobs {
            let output = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let first = stdout.lines().next().unwrap_or_default().trim().to_string();
            // The first line says allowed or denied (exit status 0 or 1);
            // anything else is lbctl failing.
            let allowed = if first.starts_with("allowed") && output.status.success() {
                true
            } else if first.starts_with("denied") {
                false
            } else {
                failure.get_or_insert_with(|| {
                    format!(
                        "`lbctl {}` ({}) printed neither allowed nor denied first: {}{}",
                        args.join(" "),
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim(),
                        stdout.trim()
                    )
                });
                false
            };
            let entry = verdicts.entry((i, j)).or_insert((true, Vec::new()));
            entry.0 &= allowed;
            entry.1.push(format!("{}: {first}", self.nodes[node].name));
        }
        if let Some(failure) = failure {
            bail!("{failure}");
        }
        let mut observed = Observed::default();
        for ((i, j), (allowed, lines)) in verdicts {
            observed.insert(
                Target::Trace,
                i,
                j,
                Cell {
                    verdict: if allowed {
                        Verdict::Allowed
                    } else {
                        Verdict::Denied
                    },
                    detail: format!("{}/{}: {}", pp.port, pp.protocol, lines.join("; ")),
                },
            );
        }
        Ok(observed)
    }

    /// The agents' logs, for error messages.
    pub fn agent_logs(&self) -> String {
        let mut text = String::new();
        for (agent, node) in self.agents.iter().zip(&self.nodes) {
            let log = agent.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            let _ = writeln!(
                text,
                "--- agent of {} (last lines of {}):\n{}",
                node.name,
                agent.log.display(),
                tail.join("\n")
            );
        }
        text
    }

    /// Loads an nftables script in the network namespace of pod `index`
    /// (the harness check: filtering without the agent).
    pub fn nft_in_pod(&self, index: usize, script: &str) -> Result<()> {
        use std::io::Write as _;
        let netns = &self.pods[index].lab.netns;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "nft in {}: {}",
                self.pods[index].id,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// The last warnings and errors of each agent's log, for error messages.
    pub fn agent_problems(&self) -> String {
        let mut text = String::new();
        for (agent, node) in self.agents.iter().zip(&self.nodes) {
            let log = agent.log_text();
            let problems: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            let tail = &problems[problems.len().saturating_sub(10)..];
            let _ = writeln!(
                text,
                "agent of {}: {} warnings and errors in its log{}",
                node.name,
                problems.len(),
                if tail.is_empty() { "" } else { ", the last:" }
            );
            for line in tail {
                let _ = writeln!(text, "  {line}");
            }
        }
        text
    }

    /// The kubelet of node `index`.
    pub fn kubelet(&self, index: usize) -> &Kubelet {
        &self.kubelets[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_name_their_ports_as_upstream() {
        let yaml = pod_yaml("x", "a", "node1");
        for name in [
            "serve-80-tcp",
            "serve-81-tcp",
            "serve-80-udp",
            "serve-81-udp",
            "serve-80-sctp",
        ] {
            assert!(yaml.contains(&format!("name: {name}\n")), "{yaml}");
        }
        assert!(yaml.contains("labels:\n    pod: \"a\"\n"), "{yaml}");
        let service = service_yaml("y", "b");
        assert!(service.contains("name: s-y-b\n"), "{service}");
        assert!(service.contains("name: service-port-udp-81\n    port: 81\n    protocol: UDP\n"));
        assert!(!service.contains("SCTP"));
    }
}
