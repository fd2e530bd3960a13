//! The upstream Kubernetes NetworkPolicy e2e cases (kubernetes v1.34.4,
//! `test/e2e/network/netpol`) against the agent, in the lab, with a real
//! kube-apiserver: the data ([`cases`]), the matrices ([`matrix`]), the
//! cluster they run on ([`cluster`]) and the runner ([`run_case`]) used by
//! `tests/netpol.rs`. See `docs/netpol-cases.md`.
//!
//! Every case runs against one cluster shared by the test process, started
//! by the first case and stopped at process exit; cases run one at a time
//! (the cluster's lock) and each leaves the cluster as it found it (no
//! policy, original labels), even when it fails.

pub mod cases;
pub mod cluster;
pub mod matrix;
pub mod probe;

use std::{
    ops::{Deref, DerefMut},
    sync::{Mutex, MutexGuard, TryLockError},
    time::Instant,
};

use anyhow::{bail, Result};

pub use self::cases::check_test_names;
use self::{
    cases::{Case, CaseContext, Catalogue, PodId, PortProto, Protocol, Step},
    cluster::{Cluster, MATRIX_DEADLINE},
    matrix::Expected,
};
use crate::scenario::require_root;

/// The shared cluster's state.
enum State {
    NotStarted,
    Running(Box<Cluster>),
    Failed(String),
}

static STATE: Mutex<State> = Mutex::new(State::NotStarted);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the shared cluster (agents, kubelets, lab) at process exit, before
/// the shared control plane (registered earlier, so stopped later).
extern "C" fn stop_cluster() {
    let mut state = match STATE.try_lock() {
        Ok(state) => state,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        // A case still runs (the process is exiting under it): leave it.
        Err(TryLockError::WouldBlock) => return,
    };
    *state = State::NotStarted;
}

/// The cluster, started (and checked all-allowed) on first use.
fn cluster(state: &mut State) -> Result<&mut Cluster> {
    if matches!(state, State::NotStarted) {
        let started = Instant::now();
        eprintln!("netpol: starting the cluster (2 nodes, 9 pods, 9 Services)");
        let result = Cluster::start().and_then(|cluster| {
            eprintln!(
                "netpol: cluster up in {:.1} s:\n{}",
                started.elapsed().as_secs_f64(),
                cluster.describe()
            );
            // SAFETY: registers a plain function without arguments, run at
            // process exit (libtest exits through exit(3)).
            unsafe { libc::atexit(stop_cluster) };
            if let Err(err) = cluster.check_baseline() {
                let logs = cluster.agent_logs();
                return Err(err.context(format!("the all-allowed baseline failed\n{logs}")));
            }
            eprintln!(
                "netpol: baseline all-allowed after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(cluster)
        });
        *state = match result {
            Ok(cluster) => State::Running(Box::new(cluster)),
            Err(err) => State::Failed(format!("{err:#}")),
        };
    }
    match state {
        State::Running(cluster) => Ok(cluster),
        State::Failed(err) => bail!("the shared netpol cluster could not start: {err}"),
        State::NotStarted => unreachable!("started above"),
    }
}

/// Whether this kernel opens SCTP sockets: `Err` with the reason if not.
pub fn sctp_support() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; no memory is involved.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: closes the descriptor opened just above, owned by nobody else.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Undoes a case's policies and labels when dropped, even on failure or
/// panic; what cannot be undone stays pending and is retried (and fails
/// loudly) before the next case.
struct Restore<'a>(&'a mut Cluster);

impl Deref for Restore<'_> {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        self.0
    }
}

impl DerefMut for Restore<'_> {
    fn deref_mut(&mut self) -> &mut Cluster {
        self.0
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.0.restore() {
            eprintln!("netpol: restoring the cluster after the case failed: {err:#}");
        }
    }
}

/// Runs case `id`, whose test function is `test`, against the shared cluster.
pub fn run_case(id: u32, test: &str) -> Result<()> {
    require_root();
    let catalogue = Catalogue::load()?;
    let case = catalogue.case(test)?.clone();
    if case.id != id {
        bail!("test {test} is case {} in cases.json, not {id}", case.id);
    }
    let mut state = state();
    let cluster = cluster(&mut state)?;
    cluster.restore()?;
    let started = Instant::now();
    eprintln!(
        "netpol case {}: {:?} ({:?} context) serves {}",
        case.id,
        case.name,
        case.context,
        case.served.join(" ")
    );
    let result = run_steps(&mut Restore(cluster), &case);
    eprintln!(
        "netpol case {}: {} in {:.1} s",
        case.id,
        if result.is_ok() { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result
}

fn run_steps(cluster: &mut Cluster, case: &Case) -> Result<()> {
    let served = case.served()?;
    if case.context == CaseContext::Sctp || served.iter().any(|p| p.protocol == Protocol::Sctp) {
        match sctp_support() {
            Err(err) => eprintln!(
                "  SCTP is unavailable in this kernel (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {err}): \
                 no SCTP traffic is sent; each pair is checked in the kernel maps with \
                 `lbctl policy trace` on the node of the source pod and of the destination pod"
            ),
            Ok(()) => eprintln!(
                "  this kernel has SCTP, but the lab has no SCTP server or prober: \
                 each pair is checked in the kernel maps with `lbctl policy trace` on \
                 the node of the source pod and of the destination pod instead"
            ),
        }
    }
    let pods = cluster.pod_ids();
    // Upstream's readiness gate: all allowed on what the case serves, before
    // any policy (this also proves the previous case left nothing behind).
    for pp in &served {
        cluster.expect(
            &format!("before any policy, {pp}"),
            *pp,
            &Expected::all_allowed(&pods),
            MATRIX_DEADLINE,
        )?;
    }
    for (n, step) in case.steps.iter().enumerate() {
        let n = n + 1;
        match step {
            Step::Create(policy) => {
                let out = cluster.write_policy("create", policy)?;
                eprintln!("  step {n}: {out}");
            }
            Step::Update(policy) => {
                let out = cluster.write_policy("replace", policy)?;
                eprintln!("  step {n}: {out}");
            }
            Step::Probe(probe) => {
                let pp = probe.port_proto();
                let expected = Expected::new(&pods, &probe.denied_pairs()?)?;
                cluster.expect(
                    &format!("step {n}: probe {pp}"),
                    pp,
                    &expected,
                    MATRIX_DEADLINE,
                )?;
            }
            Step::LabelNamespace { namespace, labels } => {
                let ns = cases::fill(namespace, &cluster.vars()?)?;
                cluster.label("namespace", None, &ns, labels)?;
                eprintln!("  step {n}: namespace {ns} labelled {labels:?}");
            }
            Step::LabelPod { pod, labels } => {
                let id: PodId = pod.parse()?;
                let ns = cluster.catalogue.namespace(&id.ns)?.to_string();
                cluster.label("pod", Some(&ns), &id.name, labels)?;
                eprintln!("  step {n}: pod {ns}/{} labelled {labels:?}", id.name);
            }
            Step::DeleteAllPolicies {} => {
                cluster.delete_policies()?;
                eprintln!("  step {n}: every NetworkPolicy deleted");
            }
            Step::SleepSeconds(seconds) => eprintln!(
                "  step {n}: upstream sleeps {seconds} s here; not needed: the next probe \
                 polls until the matrix is the expected one"
            ),
        }
    }
    Ok(())
}

/// The nftables table the harness check adds to two pods.
const CHECK_TABLE: &str = "lb_netpol_harness_check";

/// Removes the harness check's nftables tables when dropped.
struct Unfilter<'a>(&'a Cluster, Vec<usize>);

impl Drop for Unfilter<'_> {
    fn drop(&mut self) {
        for &pod in &self.1 {
            if let Err(err) = self
                .0
                .nft_in_pod(pod, &format!("delete table inet {CHECK_TABLE}\n"))
            {
                eprintln!("netpol: removing the harness check's filter: {err:#}");
            }
        }
    }
}

/// Not an upstream case: checks the harness itself against filtering done
/// without the agent. nftables in x/a drops, and in y/b rejects (TCP reset,
/// ICMP port unreachable), what arrives on port 80; the matrix on 80/TCP
/// and 80/UDP must then show every pair to those two pods denied (pod IP
/// and ClusterIP), and 81/TCP must stay allowed. So a failing case is the
/// datapath's doing, not the prober's.
pub fn check_harness() -> Result<()> {
    require_root();
    let mut state = state();
    let cluster = cluster(&mut state)?;
    cluster.restore()?;
    let pods = cluster.pod_ids();
    let index = |name: &str| -> Result<usize> {
        let id: PodId = name.parse()?;
        pods.iter()
            .position(|p| *p == id)
            .ok_or_else(|| anyhow::anyhow!("no pod {id}"))
    };
    let (x_a, y_b) = (index("x/a")?, index("y/b")?);
    let started = Instant::now();
    let guard = Unfilter(cluster, vec![x_a, y_b]);
    for (pod, verdict) in [(x_a, "drop"), (y_b, "reject")] {
        let tcp = if verdict == "reject" {
            "reject with tcp reset"
        } else {
            "drop"
        };
        guard.0.nft_in_pod(
            pod,
            &format!(
                "table inet {CHECK_TABLE} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp dport 80 {tcp}\n  udp dport 80 {verdict}\n }}\n}}\n"
            ),
        )?;
    }
    let mut denied = Vec::new();
    for from in &pods {
        for to in [x_a, y_b] {
            if pods[to] != *from {
                denied.push((from.clone(), pods[to].clone()));
            }
        }
    }
    let filtered = Expected::new(&pods, &denied)?;
    let all = Expected::all_allowed(&pods);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let pp = PortProto { port: 80, protocol };
        guard.0.expect(
            &format!("{pp} filtered by nftables in x/a and y/b"),
            pp,
            &filtered,
            MATRIX_DEADLINE,
        )?;
    }
    let pp = PortProto {
        port: 81,
        protocol: Protocol::Tcp,
    };
    guard
        .0
        .expect(&format!("{pp}, not filtered"), pp, &all, MATRIX_DEADLINE)?;
    drop(guard);
    let pp = PortProto {
        port: 80,
        protocol: Protocol::Tcp,
    };
    cluster.expect(&format!("{pp}, filters removed"), pp, &all, MATRIX_DEADLINE)?;
    eprintln!(
        "netpol: harness check passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
