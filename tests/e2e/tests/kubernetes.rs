//! The agent against a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager with the real EndpointSlice controller; see
//! `scripts/k8s-controlplane.sh`), with a lab kubelet running the Pods bound
//! to the lab node. Objects are written with kubectl, as users write them.
//!
//! The tests run one at a time (a process-wide lock): they measure latencies
//! against a 1 s budget on 2 cores, and a control plane starting next to a
//! measurement would distort it. All but the outage test share one control
//! plane, each in a namespace of its own; the outage test stops and restarts
//! its own. Needs root; `make test` runs as root.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_e2e::{
    agent::{Agent, Binaries},
    controlplane::ControlPlane,
    kubelet::Kubelet,
    lab::{Lab, Pod},
    probe::{parse_attempts, per_backend, Attempt},
    scenario::require_root,
};

/// The latency budget from a change in the API to the datapath.
const BUDGET: Duration = Duration::from_secs(1);

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one at a time (a failed test does not block the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Pod as a user writes it: label `app`, bound to `node` (there is no
/// scheduler), one container port 8080.
fn pod_yaml(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\n  containers:\n  - name: web\n    image: registry.example/labpod:1\n    ports:\n    - containerPort: 8080\n"
    )
}

/// A Service as a user writes it: no clusterIP, no type, nothing agent-specific.
fn service_yaml(name: &str, app: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    app: {app}\n  ports:\n  - name: http\n    port: {port}\n    targetPort: 8080\n"
    )
}

/// One frontend row of `lbctl service list`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Frontend {
    /// `namespace/name:port-name`.
    service: String,
    /// `ip:port/PROTO`.
    frontend: String,
    /// `ip:port` of each backend.
    backends: BTreeSet<String>,
}

/// Parses `lbctl service list`: a row per frontend, continuation rows with
/// one more backend each.
fn parse_frontends(table: &str) -> Vec<Frontend> {
    let mut frontends: Vec<Frontend> = Vec::new();
    let is_backend = |s: &str| s.parse::<std::net::SocketAddr>().is_ok();
    for line in table.lines().skip(1) {
        if line.starts_with(char::is_whitespace) {
            let cell = line.trim();
            if let (Some(last), true) = (frontends.last_mut(), is_backend(cell)) {
                last.backends.insert(cell.to_string());
            }
            continue;
        }
        let mut cells = line.split_whitespace().skip(1);
        let service = cells.next().unwrap_or_default().to_string();
        let mut frontend = cells.next().unwrap_or_default().to_string();
        if frontend == "(affinity" {
            cells.next();
            frontend = cells.next().unwrap_or_default().to_string();
        }
        let mut rest: Vec<&str> = cells.collect();
        // tc-path frontends are marked "(external)" or "(per packet)".
        match rest.as_slice() {
            ["(external)", ..] => {
                frontend.push_str(" (external)");
                rest.remove(0);
            }
            ["(per", "packet)", ..] => {
                frontend.push_str(" (per packet)");
                rest.drain(..2);
            }
            _ => {}
        }
        let backends = match rest.as_slice() {
            [one] if is_backend(one) => BTreeSet::from([one.to_string()]),
            _ => BTreeSet::new(),
        };
        frontends.push(Frontend {
            service,
            frontend,
            backends,
        });
    }
    frontends
}

/// A lab node with a kubelet, the agent (API source) and a client pod made
/// by the test itself, using a namespace of its own on a control plane.
/// Fields drop in order: the agent and kubelet stop before the lab goes.
struct Cluster<'a> {
    agent: Agent,
    kubelet: Kubelet,
    client: Pod,
    bins: Binaries,
    lab: Arc<Mutex<Lab>>,
    ns: String,
    cp: &'a ControlPlane,
}

impl<'a> Cluster<'a> {
    fn new(cp: &'a ControlPlane, ns: &str) -> Result<Self> {
        Self::with_agent_args(cp, ns, &[])
    }

    /// [`Cluster::new`] with more agent flags.
    fn with_agent_args(cp: &'a ControlPlane, ns: &str, extra: &[&str]) -> Result<Self> {
        require_root();
        let bins = Binaries::locate()?;
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1")?;
        let client = lab.add_pod(&node, "client")?;
        let lab = Arc::new(Mutex::new(lab));
        cp.create_namespace(ns)?;
        let kubelet = Kubelet::start(cp.kubeconfig(), lab.clone(), &node, &bins.labpod)?;
        let agent = Agent::start_api_with(&lock(&lab), &bins, &node, cp.kubeconfig(), extra)?;
        Ok(Self {
            agent,
            kubelet,
            client,
            bins,
            lab,
            ns: ns.into(),
            cp,
        })
    }

    /// kubectl in this cluster's namespace.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend(args);
        self.cp.kubectl(&all)
    }

    /// `kubectl apply -f -` in this cluster's namespace.
    fn apply(&self, yaml: &str) -> Result<String> {
        self.cp.apply(&self.ns, yaml)
    }

    /// The ClusterIP the API server allocated to Service `name`.
    fn cluster_ip(&self, name: &str) -> Result<String> {
        let ip = self.kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])?;
        ip.parse::<std::net::Ipv4Addr>()
            .with_context(|| format!("ClusterIP of {name}: {ip:?}"))?;
        Ok(ip)
    }

    /// Creates Pods web-1 and web-2 (label app=web, on node1) together with
    /// `extra` documents, and waits until both are Ready; their addresses.
    fn web_pods(&self, extra: &str) -> Result<(String, String)> {
        let mut yaml = format!(
            "{}---\n{}",
            pod_yaml("web-1", "web", "node1"),
            pod_yaml("web-2", "web", "node1")
        );
        if !extra.is_empty() {
            yaml = format!("{yaml}---\n{extra}");
        }
        self.apply(&yaml)?;
        Ok((self.pod_ip("web-1")?, self.pod_ip("web-2")?))
    }

    /// Waits until Pod `name` runs and is reported Ready; its address.
    fn pod_ip(&self, name: &str) -> Result<String> {
        Ok(self
            .kubelet
            .wait_for_pod(&self.ns, name, Duration::from_secs(30))?
            .pod
            .ip)
    }

    /// The frontends of Service `name` (of this namespace) in the datapath.
    fn frontends(&self, name: &str) -> Result<Vec<Frontend>> {
        let prefix = format!("{}/{name}:", self.ns);
        Ok(parse_frontends(&self.agent.service_list()?)
            .into_iter()
            .filter(|f| f.service.starts_with(&prefix))
            .collect())
    }

    /// Polls the datapath (every 5 ms) until the frontends of Service `name`
    /// satisfy `check`; returns when that was first seen.
    fn wait_datapath(
        &self,
        name: &str,
        timeout: Duration,
        check: impl Fn(&[Frontend]) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let frontends = self.frontends(name)?;
            if check(&frontends) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "the datapath never reached the expected state for {}/{name}: {frontends:#?}\nagent log:\n{}",
                    self.ns,
                    self.agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// `labpod connect` from the client pod, `count` times.
    fn connect(&self, target: &str, count: u32) -> Result<Vec<Attempt>> {
        connect(&self.lab, &self.client, &self.bins.labpod, target, count, 0)
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        // Best effort, so the next test on a shared control plane starts clean.
        let _ = self.kubectl(&["delete", "pods", "--all", "--grace-period=0", "--force"]);
        let _ = self
            .cp
            .kubectl(&["delete", "namespace", &self.ns, "--wait=false"]);
    }
}

fn lock(lab: &Mutex<Lab>) -> MutexGuard<'_, Lab> {
    lab.lock().unwrap_or_else(|e| e.into_inner())
}

/// `labpod connect` from `client`; the lab is locked only to build the command.
fn connect(
    lab: &Mutex<Lab>,
    client: &Pod,
    labpod: &Path,
    target: &str,
    count: u32,
    interval_ms: u32,
) -> Result<Vec<Attempt>> {
    let mut command = lock(lab).command_in(client, labpod)?;
    let output = command
        .args(["connect", "--target", target])
        .args(["--count", &count.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()])
        .output()?;
    if !output.status.success() {
        bail!(
            "labpod connect {target}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_attempts(&output.stdout)
}

fn endpoint(ip: &str) -> String {
    format!("{ip}:8080")
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Upstream: test/e2e/network/service.go "should serve a basic endpoint from
/// pods": plain Pod and Service YAML applied with kubectl; the API server
/// allocates the ClusterIP, the EndpointSlice controller publishes the Pods
/// the kubelet reports Ready, the agent programs the Service, and a client
/// pod (made by the test, not through the API) reaches both Pods through the
/// ClusterIP, with getpeername() showing the ClusterIP and the Pods seeing
/// the client's own address.
#[test]
fn service_created_with_kubectl_reaches_every_pod() -> Result<()> {
    let _serial = serial();
    let cp = ControlPlane::shared()?;
    let c = Cluster::new(cp, "svc-basic")?;
    let (ip1, ip2) = c.web_pods(&service_yaml("web", "web", 80))?;
    assert_eq!(
        c.kubectl(&["get", "pod", "web-1", "-o", "jsonpath={.status.podIP}"])?,
        ip1
    );
    let cluster_ip = c.cluster_ip("web")?;
    assert!(cluster_ip.starts_with("10.96."), "{cluster_ip}");

    let want = set(&[&endpoint(&ip1), &endpoint(&ip2)]);
    let frontend = format!("{cluster_ip}:80/TCP");
    c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].frontend == frontend && f[0].backends == want
    })?;
    let table = c.agent.service_list()?;
    assert!(table.contains("svc-basic/web:http"), "{table}");

    let attempts = c.connect(&format!("{cluster_ip}:80"), 60)?;
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let counts = per_backend(&attempts);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["web-1", "web-2"]),
        "{counts:?}"
    );
    for attempt in &attempts {
        assert_eq!(
            attempt.peer.as_deref(),
            Some(format!("{cluster_ip}:80").as_str()),
            "getpeername must show the ClusterIP"
        );
        let seen = attempt.seen_source.as_deref().unwrap_or_default();
        assert!(
            seen.starts_with(&format!("{}:", c.client.ip)),
            "the Pod saw {seen}, not the client pod"
        );
    }
    Ok(())
}

/// One measured change.
struct Measured {
    what: &'static str,
    from: &'static str,
    took: Duration,
}

/// Create, update and delete of Services and Pods reach the datapath within
/// 1 s. What is measured, for each change: from the moment the API server
/// has the change (kubectl returned; for a new Pod, the lab kubelet's status
/// write returned, since until a Pod reports Ready no kube-proxy would route
/// to it and the lab's pod start-up stands in for a container runtime) to the
/// first `lbctl service list` (polled every 5 ms, a few ms each) that shows
/// it in the kernel maps. This includes the real EndpointSlice controller
/// (for Pod changes), the agent's watch, its 100 ms debounce and the map
/// writes. For a new Pod the time from `kubectl apply` is reported as well.
#[test]
fn changes_reach_the_datapath_within_a_second() -> Result<()> {
    let _serial = serial();
    let cp = ControlPlane::shared()?;
    let c = Cluster::new(cp, "svc-timing")?;
    let mut measured = Vec::new();
    let mut measure = |what, from, took| {
        measured.push(Measured { what, from, took });
    };

    let (ip1, ip2) = c.web_pods("")?;

    // Service created (the ClusterIP is allocated by the API server, the
    // EndpointSlice made by the controller).
    c.apply(&service_yaml("web", "web", 80))?;
    let t0 = Instant::now();
    let both = set(&[&endpoint(&ip1), &endpoint(&ip2)]);
    let seen = c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].backends == both
    })?;
    measure("Service created", "kubectl apply returned", seen - t0);
    let cluster_ip = c.cluster_ip("web")?;
    assert_eq!(
        c.frontends("web")?[0].frontend,
        format!("{cluster_ip}:80/TCP")
    );

    // Pod added (scale up).
    c.apply(&pod_yaml("web-3", "web", "node1"))?;
    let t0 = Instant::now();
    let web3 = c
        .kubelet
        .wait_for_pod(&c.ns, "web-3", Duration::from_secs(30))?;
    let ip3 = web3.pod.ip.clone();
    let three = set(&[&endpoint(&ip1), &endpoint(&ip2), &endpoint(&ip3)]);
    let seen = c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].backends == three
    })?;
    let reported = web3.reported_at.expect("reported");
    measure(
        "Pod created",
        "kubelet wrote Ready",
        seen.saturating_duration_since(reported),
    );
    let from_apply = seen - t0;
    let counts = per_backend(&c.connect(&format!("{cluster_ip}:80"), 60)?);
    assert!(counts.contains_key("web-3"), "{counts:?}");

    // Pod deleted (scale down): gone from the datapath while the Pod is
    // still terminating, as kube-proxy drops terminating endpoints when
    // ready ones exist.
    c.kubectl(&["delete", "pod", "web-1", "--wait=false"])?;
    let t0 = Instant::now();
    let two = set(&[&endpoint(&ip2), &endpoint(&ip3)]);
    let seen = c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].backends == two
    })?;
    measure("Pod deleted", "kubectl delete returned", seen - t0);
    let attempts = c.connect(&format!("{cluster_ip}:80"), 40)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    assert!(!per_backend(&attempts).contains_key("web-1"));

    // Pod updated: relabelled out of the Service's selector.
    c.kubectl(&["label", "pod", "web-2", "app=other", "--overwrite"])?;
    let t0 = Instant::now();
    let one = set(&[&endpoint(&ip3)]);
    let seen = c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].backends == one
    })?;
    measure("Pod relabelled out", "kubectl label returned", seen - t0);

    // Service updated: port 80 -> 81.
    c.kubectl(&[
        "patch",
        "service",
        "web",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/ports/0/port", "value": 81}]"#,
    ])?;
    let t0 = Instant::now();
    let frontend81 = format!("{cluster_ip}:81/TCP");
    let seen = c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].frontend == frontend81 && f[0].backends == one
    })?;
    measure("Service port changed", "kubectl patch returned", seen - t0);
    let attempts = c.connect(&format!("{cluster_ip}:81"), 10)?;
    assert!(
        attempts
            .iter()
            .all(|a| a.backend.as_deref() == Some("web-3")),
        "{attempts:?}"
    );

    // Service deleted.
    c.kubectl(&["delete", "service", "web"])?;
    let t0 = Instant::now();
    let seen = c.wait_datapath("web", Duration::from_secs(10), <[Frontend]>::is_empty)?;
    measure("Service deleted", "kubectl delete returned", seen - t0);

    let mut report = String::from("API change -> datapath (lbctl shows it):\n");
    for m in &measured {
        let _ = writeln!(
            report,
            "  {:<22} {:>5} ms  from {}",
            m.what,
            m.took.as_millis(),
            m.from
        );
    }
    let _ = writeln!(
        report,
        "  (Pod created: {} ms from kubectl apply, including the lab kubelet's pod start-up)",
        from_apply.as_millis()
    );
    eprintln!("{report}");
    for m in &measured {
        assert!(
            m.took <= BUDGET,
            "{} took {:?} > {BUDGET:?}\n{report}",
            m.what,
            m.took
        );
    }
    Ok(())
}

/// Issue 22, item 5: a Service with more external addresses than the
/// Maglev map holds gets a Warning Event (`MapFull`) naming the frontend
/// and the map, where `kubectl describe service` shows it.
#[test]
fn a_service_a_full_map_refuses_gets_a_warning_event() -> Result<()> {
    let _serial = serial();
    let cp = ControlPlane::shared()?;
    // Three tables of 251 slots: two frontends and the swap reserve.
    let c = Cluster::with_agent_args(
        cp,
        "svc-full",
        &[
            "--tc-interfaces",
            "eth0",
            "--maglev-table-size",
            "251",
            "--maglev-capacity",
            "756",
            "--external-ip-cidrs",
            "203.0.113.0/24",
        ],
    )?;
    let service = service_yaml("web", "web", 80).replace(
        "spec:\n",
        "spec:\n  externalIPs: [203.0.113.1, 203.0.113.2, 203.0.113.3]\n",
    );
    c.web_pods(&service)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let described = c.kubectl(&["describe", "service", "web"])?;
        if described.contains("MapFull") {
            assert!(described.contains("Maglev table"), "{described}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no MapFull event on the Service:\n{described}\nagent:\n{}",
            c.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// `kubectl auth can-i VERB RESOURCE` as the agent's ServiceAccount.
fn agent_can(cp: &ControlPlane, verb: &str, resource: &str) -> Result<bool> {
    let output = cp.kubectl_output(&[
        "auth",
        "can-i",
        verb,
        resource,
        "--as=system:serviceaccount:lb-system:lb-agent",
    ])?;
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// deploy/manifests/ is accepted by the real API server (server-side dry
/// run, then for real), and its RBAC is least privilege yet sufficient: the
/// ServiceAccount can list and watch exactly what the agent watches and
/// nothing more, and an agent running with that ServiceAccount's token gets
/// every initial list and becomes ready. (No kubelet runs the DaemonSet's
/// Pods; the DaemonSet object itself is checked.)
#[test]
fn deploy_manifests_are_accepted_and_least_privilege() -> Result<()> {
    let _serial = serial();
    require_root();
    let cp = ControlPlane::shared()?;
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/manifests");
    let dir = manifests.to_str().context("path")?;
    let namespace_file = manifests.join("00-namespace.yaml");
    let namespace_file = namespace_file.to_str().context("path")?;

    // A server-side dry run of the namespaced objects needs their Namespace
    // to exist: dry-run it alone, create it, then dry-run everything.
    cp.kubectl(&["apply", "--dry-run=server", "-f", namespace_file])?;
    cp.kubectl(&["apply", "-f", namespace_file])?;
    let dry = cp.kubectl(&["apply", "--dry-run=server", "-f", dir])?;
    for kind in [
        "serviceaccount/lb-agent",
        "clusterrole.rbac.authorization.k8s.io/lb-agent",
        "clusterrolebinding.rbac.authorization.k8s.io/lb-agent",
        "configmap/lb-agent",
        "daemonset.apps/lb-agent",
        "service/lb-agent-metrics",
    ] {
        assert!(
            dry.contains(kind),
            "{kind} missing from the dry run:\n{dry}"
        );
    }
    cp.kubectl(&["apply", "-f", dir])?;
    let ds = cp.kubectl(&[
        "get",
        "daemonset",
        "-n",
        "lb-system",
        "lb-agent",
        "-o",
        "name",
    ])?;
    assert_eq!(ds.trim(), "daemonset.apps/lb-agent");
    cp.wait_for_service_account("lb-system", Duration::from_secs(30))?;

    let watched = [
        "services",
        "endpointslices.discovery.k8s.io",
        "nodes",
        "pods",
        "namespaces",
        "networkpolicies.networking.k8s.io",
    ];
    for resource in watched {
        for verb in ["list", "watch"] {
            assert!(agent_can(cp, verb, resource)?, "cannot {verb} {resource}");
        }
    }
    for verb in ["create", "patch"] {
        assert!(
            agent_can(cp, verb, "events.events.k8s.io")?,
            "cannot {verb} events"
        );
    }
    for (verb, resource) in [
        ("list", "events.events.k8s.io"),
        ("create", "services"),
        ("update", "services"),
        ("delete", "pods"),
        ("patch", "nodes"),
        ("create", "endpointslices.discovery.k8s.io"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "configmaps"),
    ] {
        assert!(!agent_can(cp, verb, resource)?, "may {verb} {resource}");
    }

    // The agent itself, with the ServiceAccount's credentials.
    let token = cp.kubectl(&["create", "token", "lb-agent", "-n", "lb-system"])?;
    let ca = cp.kubectl(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ])?;
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1")?;
    let kubeconfig = lab.work_dir().join("lb-agent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: lb-agent\n  user:\n    token: {}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: lb-agent}}\ncurrent-context: e2e\n",
            cp.server()?,
            token.trim()
        ),
    )?;
    let agent = Agent::start_api(&lab, &bins, &node, &kubeconfig)?;
    let log = agent.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
    Ok(())
}

/// Connections from the client pod in batches on a thread of its own, until stopped.
/// Stopped on drop, so that a failing test leaves no load behind.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Batch>>>>,
}

/// One `labpod connect` run of a [`Load`].
struct Batch {
    started: Instant,
    ended: Instant,
    attempts: Vec<Attempt>,
}

impl Load {
    fn start(lab: Arc<Mutex<Lab>>, client: Pod, labpod: PathBuf, target: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut batches = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                let attempts = connect(&lab, &client, &labpod, &target, 20, 20)?;
                batches.push(Batch {
                    started,
                    ended: Instant::now(),
                    attempts,
                });
            }
            Ok(batches)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Result<Vec<Batch>> {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("not finished yet");
        thread.join().expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An API server outage (etcd, kube-apiserver and kube-controller-manager
/// all stopped, then started again on the same data) while a client keeps
/// connecting to a Service: no connection fails, the datapath keeps the last
/// known state during the outage, and changes made after the restart (a new
/// Pod behind the Service, a new Service) are applied.
#[test]
fn api_server_outage_fails_no_connection_and_later_changes_apply() -> Result<()> {
    let _serial = serial();
    require_root();
    let cp = ControlPlane::start()?;
    let c = Cluster::new(&cp, "outage")?;
    let (ip1, ip2) = c.web_pods(&service_yaml("web", "web", 80))?;
    let both = set(&[&endpoint(&ip1), &endpoint(&ip2)]);
    c.wait_datapath("web", Duration::from_secs(10), |f| {
        f.len() == 1 && f[0].backends == both
    })?;
    let cluster_ip = c.cluster_ip("web")?;

    let load = Load::start(
        c.lab.clone(),
        c.client.clone(),
        c.bins.labpod.clone(),
        format!("{cluster_ip}:80"),
    );
    thread::sleep(Duration::from_secs(1));
    cp.stop()?;
    let down = Instant::now();
    assert!(
        c.kubectl(&["get", "pods"]).is_err(),
        "the API server still answers"
    );
    thread::sleep(Duration::from_secs(3));
    let during = c.frontends("web")?;
    assert!(
        during.len() == 1 && during[0].backends == both,
        "the datapath changed during the outage: {during:?}"
    );
    cp.resume()?;
    let up = Instant::now();

    c.apply(&format!(
        "{}---\n{}",
        pod_yaml("web-3", "web", "node1"),
        service_yaml("after", "web", 90)
    ))?;
    let ip3 = c.pod_ip("web-3")?;
    let three = set(&[&endpoint(&ip1), &endpoint(&ip2), &endpoint(&ip3)]);
    // The agent's watches reconnect with their backoff (up to 30 s in kube-rs).
    c.wait_datapath("web", Duration::from_secs(90), |f| {
        f.len() == 1 && f[0].backends == three
    })?;
    c.wait_datapath("after", Duration::from_secs(30), |f| {
        f.len() == 1 && f[0].backends == three
    })?;
    let recovered = up.elapsed();
    let after_ip = c.cluster_ip("after")?;
    let attempts = c.connect(&format!("{after_ip}:90"), 30)?;
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    thread::sleep(Duration::from_millis(500));

    let batches = load.finish()?;
    let total: usize = batches.iter().map(|b| b.attempts.len()).sum();
    let failed: Vec<&Attempt> = batches
        .iter()
        .flat_map(|b| &b.attempts)
        .filter(|a| !a.ok)
        .collect();
    let in_outage: usize = batches
        .iter()
        .filter(|b| b.started >= down && b.ended <= up)
        .map(|b| b.attempts.len())
        .sum();
    eprintln!(
        "outage {} ms; {total} connections ({in_outage} while the API server was down), \
         {} failed; changes made after the restart applied {} ms after it",
        (up - down).as_millis(),
        failed.len(),
        recovered.as_millis()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        in_outage >= 40,
        "too few connections during the outage: {in_outage}"
    );
    let seen = per_backend(
        &batches
            .iter()
            .flat_map(|b| b.attempts.clone())
            .collect::<Vec<_>>(),
    );
    assert!(seen.contains_key("web-3"), "{seen:?}");
    Ok(())
}

#[test]
fn lbctl_tables_parse() {
    let table = "ID  SERVICE        FRONTEND           BACKENDS\n\
                 5   ns/web:http    10.96.0.10:80/TCP  10.244.1.2:8080\n\
                 \x20                                   10.244.1.3:8080\n\
                 6   ns/none:http   10.96.0.11:80/TCP  (none: connections are refused)\n\
                 7   ns/np:http     192.168.100.1:30080/TCP (external)  2 backends in a Maglev table\n";
    let frontends = parse_frontends(table);
    assert_eq!(frontends.len(), 3);
    assert_eq!(frontends[0].service, "ns/web:http");
    assert_eq!(frontends[0].frontend, "10.96.0.10:80/TCP");
    assert_eq!(
        frontends[0].backends,
        set(&["10.244.1.2:8080", "10.244.1.3:8080"])
    );
    assert!(frontends[1].backends.is_empty());
    assert_eq!(frontends[2].frontend, "192.168.100.1:30080/TCP (external)");
    assert!(frontends[2].backends.is_empty());
}
