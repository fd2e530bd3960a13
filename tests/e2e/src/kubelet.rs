//! A lab "kubelet": runs the Pods that the API server binds to one lab node.
//!
//! Every [`PERIOD`] it lists the Pods with `spec.nodeName` = the node (kube-rs,
//! one persistent connection). For a new Pod it creates a lab pod (a network
//! namespace with its own address, in a cgroup below the node's), starts
//! `labpod serve` there on the Pod's container ports, and writes the Pod's
//! status (Running, podIP/podIPs, Ready and ContainersReady, container
//! statuses) so the real EndpointSlice controller publishes the Pod. For a
//! Pod being deleted (deletionTimestamp set) it stops the program and
//! finishes the deletion with grace period 0, as a kubelet does once the
//! containers have exited; a Pod that vanished from the list is stopped too.
//! The lab has no API to remove a pod's namespace, so a stopped Pod leaves an
//! idle namespace (no process, nothing listening) until the lab is dropped.
//!
//! While the API server cannot be reached the kubelet keeps every Pod running
//! as it is and retries at the next period, as a real kubelet does.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::{
    api::core::v1::{Node as NodeObject, Pod as PodObject, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::lab::{Lab, Node, Pod};

/// How often the kubelet lists its Pods.
pub const PERIOD: Duration = Duration::from_millis(100);

/// A kube-rs client for a kubeconfig, with short timeouts so that an
/// unreachable API server is noticed at once rather than after minutes.
pub async fn client(kubeconfig: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(5));
    config.write_timeout = Some(Duration::from_secs(5));
    Ok(Client::try_from(config)?)
}

/// What the kubelet did with one Pod.
#[derive(Clone, Debug)]
pub struct PodRecord {
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod's name.
    pub name: String,
    /// The Pod's UID.
    pub uid: String,
    /// The lab pod it runs in (its `ip` is the Pod's podIP).
    pub pod: Pod,
    /// When its program was listening.
    pub started_at: Instant,
    /// When the API server accepted the Running/Ready status.
    pub reported_at: Option<Instant>,
    /// When its program was stopped (Pod deleted).
    pub stopped_at: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    records: Mutex<Vec<PodRecord>>,
}

impl Shared {
    fn records(&self) -> MutexGuard<'_, Vec<PodRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The kubelet of one lab node; stops its Pods' programs when dropped.
pub struct Kubelet {
    node_name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Kubelet {
    /// Registers `node` as a Node object (InternalIP = the lab node's
    /// address; an existing Node of that name is updated), waits until Pods
    /// can be created (the `default` ServiceAccount exists), then starts
    /// running the node's Pods with `labpod`.
    pub fn start(
        kubeconfig: &Path,
        lab: Arc<Mutex<Lab>>,
        node: &Node,
        labpod: &Path,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(client(kubeconfig))?;
        runtime.block_on(register_node(&client, node))?;
        runtime.block_on(wait_for_default_service_account(&client))?;
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            pods: Api::all(client.clone()),
            client,
            runtime,
            list: ListParams::default().fields(&format!("spec.nodeName={}", node.name)),
            lab,
            node: node.clone(),
            labpod: labpod.to_path_buf(),
            shared: shared.clone(),
            running: BTreeMap::new(),
            finalized: BTreeSet::new(),
            failed: BTreeSet::new(),
            next: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("kubelet-{}", node.name))
            .spawn(move || worker.run())?;
        Ok(Self {
            node_name: node.name.clone(),
            shared,
            thread: Some(thread),
        })
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The latest record of Pod `namespace/name`, if the kubelet started it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        self.shared
            .records()
            .iter()
            .rev()
            .find(|r| r.namespace == namespace && r.name == name)
            .cloned()
    }

    /// Waits until Pod `namespace/name` runs and its Ready status is written.
    pub fn wait_for_pod(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<PodRecord> {
        self.wait(namespace, name, timeout, |r| {
            r.reported_at.is_some() && r.stopped_at.is_none()
        })
        .with_context(|| format!("Pod {namespace}/{name} never ran on {}", self.node_name))
    }

    /// Waits until the program of Pod `namespace/name` has been stopped.
    pub fn wait_for_stop(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<PodRecord> {
        self.wait(namespace, name, timeout, |r| r.stopped_at.is_some())
            .with_context(|| format!("Pod {namespace}/{name} was never stopped"))
    }

    fn wait(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        done: impl Fn(&PodRecord) -> bool,
    ) -> Result<PodRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(record) = self.pod(namespace, name).filter(|r| done(r)) {
                return Ok(record);
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn register_node(client: &Client, node: &Node) -> Result<()> {
    let nodes: Api<NodeObject> = Api::all(client.clone());
    let object = NodeObject {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_string(), node.name.clone()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..NodeObject::default()
    };
    match nodes.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {}
        Err(err) => return Err(err).context(format!("creating Node {}", node.name)),
    }
    let now = now();
    let status = json!({
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ip},
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "lab kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }
    });
    nodes
        .patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("writing the status of Node {}", node.name))?;
    Ok(())
}

async fn wait_for_default_service_account(client: &Client) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match accounts.get_opt("default").await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(None) => bail!("no default ServiceAccount in namespace default"),
            Err(err) => return Err(err).context("reading ServiceAccount default/default"),
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// A Pod the kubelet runs.
struct Running {
    /// Index into the shared records.
    record: usize,
    child: Option<Child>,
    pod: Pod,
    reported: bool,
}

/// The kubelet thread's state.
struct Worker {
    client: Client,
    pods: Api<PodObject>,
    runtime: Runtime,
    list: ListParams,
    lab: Arc<Mutex<Lab>>,
    node: Node,
    labpod: PathBuf,
    shared: Arc<Shared>,
    /// By Pod UID.
    running: BTreeMap<String, Running>,
    /// Pods whose deletion was finished (grace period 0).
    finalized: BTreeSet<String>,
    /// Pods that could not be started (reported once, not retried).
    failed: BTreeSet<String>,
    next: u32,
}

fn is_status(err: &kube::Error, codes: &[u16]) -> bool {
    matches!(err, kube::Error::Api(status) if codes.contains(&status.code))
}

impl Worker {
    fn run(mut self) {
        let mut last_error = String::new();
        while !self.shared.stop.load(Ordering::SeqCst) {
            match self.runtime.block_on(self.pods.list(&self.list)) {
                Ok(list) => {
                    last_error.clear();
                    self.sync(list.items);
                }
                Err(err) => {
                    // Once per distinct error: an outage would repeat it every period.
                    let text = err.to_string();
                    if text != last_error {
                        eprintln!(
                            "kubelet {}: listing Pods: {text}; keeping Pods as they are",
                            self.node.name
                        );
                        last_error = text;
                    }
                }
            }
            std::thread::sleep(PERIOD);
        }
        for uid in self.running.keys().cloned().collect::<Vec<_>>() {
            self.stop_program(&uid);
        }
    }

    fn sync(&mut self, pods: Vec<PodObject>) {
        let mut listed = BTreeSet::new();
        for pod in pods {
            let (Some(uid), Some(namespace), Some(name)) = (
                pod.metadata.uid.clone(),
                pod.metadata.namespace.clone(),
                pod.metadata.name.clone(),
            ) else {
                continue;
            };
            listed.insert(uid.clone());
            if pod.metadata.deletion_timestamp.is_some() {
                self.stop_program(&uid);
                if !self.finalized.contains(&uid) && self.finish_deletion(&namespace, &name, &uid) {
                    self.finalized.insert(uid);
                }
                continue;
            }
            if self.failed.contains(&uid) {
                continue;
            }
            if !self.running.contains_key(&uid) {
                match self.start_pod(&pod, &namespace, &name, &uid) {
                    Ok(running) => {
                        self.running.insert(uid.clone(), running);
                    }
                    Err(err) => {
                        eprintln!(
                            "kubelet {}: cannot run Pod {namespace}/{name}: {err:#}",
                            self.node.name
                        );
                        self.failed.insert(uid);
                        continue;
                    }
                }
            }
            if !self.running[&uid].reported {
                match self.report(&pod, &namespace, &name, &uid) {
                    Ok(()) => {
                        let running = self.running.get_mut(&uid).expect("present");
                        running.reported = true;
                        self.shared.records()[running.record].reported_at = Some(Instant::now());
                    }
                    Err(err) => eprintln!(
                        "kubelet {}: writing the status of Pod {namespace}/{name}: {err:#}",
                        self.node.name
                    ),
                }
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.stop_program(&uid);
            self.running.remove(&uid);
        }
        self.finalized.retain(|uid| listed.contains(uid));
        self.failed.retain(|uid| listed.contains(uid));
    }

    /// Creates the lab pod and starts `labpod serve` on the containers' ports.
    fn start_pod(
        &mut self,
        pod: &PodObject,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Running> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for container in pod.spec.iter().flat_map(|s| &s.containers) {
            for port in container.ports.iter().flatten() {
                match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => tcp.push(port.container_port),
                    "UDP" => udp.push(port.container_port),
                    _ => {}
                }
            }
        }
        if tcp.is_empty() && udp.is_empty() {
            tcp.push(8080);
        }
        tcp.sort_unstable();
        tcp.dedup();
        udp.sort_unstable();
        udp.dedup();
        let mut args = vec!["serve".to_string(), "--name".into(), name.into()];
        for port in tcp {
            args.extend(["--tcp".into(), port.to_string()]);
        }
        for port in udp {
            args.extend(["--udp".into(), port.to_string()]);
        }

        // Lab names are unique per node; Pod names are only unique per
        // namespace and may come back after a deletion.
        self.next += 1;
        let lab_name = format!("k{}-{name}", self.next);
        let (lab_pod, mut command) = {
            let mut lab = self.lab.lock().unwrap_or_else(|e| e.into_inner());
            let lab_pod = lab.add_pod(&self.node, &lab_name)?;
            let command = lab.command_in(&lab_pod, &self.labpod)?;
            (lab_pod, command)
        };
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting labpod")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("labpod {} did not start: {line:?}", args.join(" "));
        }
        let mut records = self.shared.records();
        records.push(PodRecord {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            pod: lab_pod.clone(),
            started_at: Instant::now(),
            reported_at: None,
            stopped_at: None,
        });
        Ok(Running {
            record: records.len() - 1,
            child: Some(child),
            pod: lab_pod,
            reported: false,
        })
    }

    /// Writes Running and Ready with the pod's addresses.
    fn report(&self, pod: &PodObject, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let running = &self.running[uid];
        let now = now();
        let containers: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": "lab://labpod",
                    "containerID": format!("lab://{uid}/{}", c.name),
                    "ready": true,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                })
            })
            .collect();
        let condition =
            |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now});
        let status = json!({
            "status": {
                "phase": "Running",
                "hostIP": self.node.ip,
                "hostIPs": [{"ip": self.node.ip}],
                "podIP": running.pod.ip,
                "podIPs": [{"ip": running.pod.ip}, {"ip": running.pod.ip6}],
                "startTime": now,
                "conditions": [
                    condition("PodReadyToStartContainers"),
                    condition("Initialized"),
                    condition("ContainersReady"),
                    condition("Ready"),
                    condition("PodScheduled"),
                ],
                "containerStatuses": containers,
            }
        });
        let pods: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
        self.runtime.block_on(pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        ))?;
        Ok(())
    }

    /// Deletes the Pod object with grace period 0 (only this incarnation of
    /// it: UID precondition). Returns whether nothing is left to do.
    fn finish_deletion(&self, namespace: &str, name: &str, uid: &str) -> bool {
        let pods: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams::default()
            .grace_period(0)
            .preconditions(Preconditions {
                uid: Some(uid.into()),
                resource_version: None,
            });
        match self.runtime.block_on(pods.delete(name, &params)) {
            Ok(_) => true,
            Err(err) if is_status(&err, &[404, 409]) => true,
            Err(err) => {
                eprintln!(
                    "kubelet {}: finishing the deletion of Pod {namespace}/{name}: {err}",
                    self.node.name
                );
                false
            }
        }
    }

    /// Kills the Pod's program, if it still runs.
    fn stop_program(&mut self, uid: &str) {
        let Some(running) = self.running.get_mut(uid) else {
            return;
        };
        if let Some(mut child) = running.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.shared.records()[running.record].stopped_at = Some(Instant::now());
        }
    }
}
