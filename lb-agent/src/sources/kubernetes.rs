//! The Kubernetes API source: watches with reflector stores, and a snapshot
//! of every store published after a quiet period (debounce), never a single
//! event. Watches restart with backoff; while the API is unreachable nothing
//! is published, so the datapath keeps serving the last known state.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt, TryFutureExt, TryStreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, NodeSpec, NodeStatus, Service, Taint},
        networking::v1::NetworkPolicy,
    },
    NamespaceResourceScope,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use lb_core::{
    endpoint_slice::EndpointSlice,
    intent::{
        Objects, Sourced, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, SOCKET_LB_ANNOTATION,
        TO_BE_DELETED_TAINT,
    },
    pod::PodInfo,
};

use super::pod_store::PodStore;
use tracing::{error, info, warn};

use super::{
    events::{self, EventSink},
    Latest, Snapshot,
};
use crate::serve::metrics::Metrics;

/// kube-proxy watches Services and EndpointSlices with this selector: objects
/// of other proxies, and headless ones, are not its business.
fn proxied_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

async fn client(kubeconfig: Option<PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config or kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// Which Pods are watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodScope {
    /// Every Pod of the cluster (policy: identities from labels).
    Cluster,
    /// The Pods bound to this node.
    Node(String),
}

/// Starts watching in a thread of its own; snapshots go to `out`. Returns
/// the sink of the Events the agent writes about Services (`node` names
/// the reporting instance).
pub fn watch(
    kubeconfig: Option<PathBuf>,
    debounce: Duration,
    out: Arc<Latest>,
    metrics: Metrics,
    node: Option<String>,
    pods: PodScope,
) -> Result<EventSink> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("k8s-source")
        .build()?;
    let client = runtime.block_on(client(kubeconfig))?;
    let events = {
        let _entered = runtime.enter();
        events::spawn(client.clone(), node)
    };
    std::thread::Builder::new()
        .name("k8s-source".into())
        .spawn(move || runtime.block_on(run(client, debounce, out, metrics, pods)))?;
    Ok(events)
}

/// Drives one watch into a store, counting restarts, waking `changed` on
/// every event. `strip` removes what the agent never reads from each object
/// before it is stored (kube-rs keeps every object of the cluster).
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
    strip: fn(&mut K),
    changed: Arc<Notify>,
    metrics: Metrics,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, config)
            .backoff(WatchBackoff::default())
            .modify(strip),
    );
    tokio::spawn(drive(stream, resource, changed, metrics));
    reader
}

/// Delays between watch restarts: 0.2 s doubling to 5 s. kube-rs's default
/// grows to 30 s, which would leave changes made right after an API server
/// outage unapplied for that long.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const LONGEST: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::LONGEST);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

async fn drive<S, E>(stream: S, resource: &'static str, changed: Arc<Notify>, metrics: Metrics)
where
    S: Stream<Item = Result<E, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => changed.notify_one(),
            Err(err) => {
                metrics.watch_restarts.with_label_values(&[resource]).inc();
                warn!(resource = %resource, error = %err, "watch failed; retrying with backoff, datapath unchanged");
            }
        }
    }
}

/// Keeps only an object's metadata the agent reads: no managed fields,
/// owners, finalizers or name prefix, no annotations but the pod opt-out.
fn strip_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == SOCKET_LB_ANNOTATION);
    }
}

/// What the agent reads of a Node: its name, labels (zone) and addresses.
fn strip_node(node: &mut Node) {
    strip_metadata(node);
    // Only the autoscaler's deletion taint is read (node eligibility).
    let taints: Vec<Taint> = node
        .spec
        .take()
        .and_then(|spec| spec.taints)
        .unwrap_or_default()
        .into_iter()
        .filter(|taint| taint.key == TO_BE_DELETED_TAINT)
        .collect();
    if !taints.is_empty() {
        node.spec = Some(NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        });
    }
    if let Some(status) = node.status.take() {
        node.status = Some(NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }
}

/// A Namespace's name and labels.
fn strip_namespace(namespace: &mut Namespace) {
    strip_metadata(namespace);
    namespace.spec = None;
    namespace.status = None;
}

fn namespaced<K>(client: &Client) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    Api::all(client.clone())
}

fn sourced<K>(store: &Store<K>) -> Vec<Sourced<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    from_api(&K::kind(&()), store.state())
}

/// `objects` of `kind`, as read from the API server.
fn from_api<T>(kind: &str, objects: Vec<Arc<T>>) -> Vec<Sourced<T>> {
    let origin: Arc<str> = Arc::from(format!("api:{kind}"));
    objects
        .into_iter()
        .map(|object| Sourced {
            origin: origin.clone(),
            object,
        })
        .collect()
}

async fn run(
    client: Client,
    debounce: Duration,
    out: Arc<Latest>,
    metrics: Metrics,
    pod_scope: PodScope,
) {
    let changed = Arc::new(Notify::new());
    let proxied = watcher::Config::default().labels(&proxied_selector());
    let services = spawn_reflector(
        namespaced::<Service>(&client),
        proxied.clone(),
        "services",
        strip_metadata,
        changed.clone(),
        metrics.clone(),
    );
    let slices = spawn_reflector(
        namespaced::<EndpointSlice>(&client),
        proxied,
        "endpointslices",
        strip_metadata,
        changed.clone(),
        metrics.clone(),
    );
    // Every node: this one for its zone, the others for the remote-node
    // identity of their addresses.
    let nodes = spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        "nodes",
        strip_node,
        changed.clone(),
        metrics.clone(),
    );
    let pods_config = match &pod_scope {
        PodScope::Cluster => watcher::Config::default(),
        PodScope::Node(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    };
    let pods = Arc::new(PodStore::new());
    let pod_events = {
        let pods = pods.clone();
        watcher(namespaced::<PodInfo>(&client), pods_config)
            .backoff(WatchBackoff::default())
            .map_ok(move |event| pods.apply(event))
            .try_filter(|changed| std::future::ready(*changed))
    };
    tokio::spawn(drive(pod_events, "pods", changed.clone(), metrics.clone()));
    let namespaces = spawn_reflector(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        "namespaces",
        strip_namespace,
        changed.clone(),
        metrics.clone(),
    );
    let policies = spawn_reflector(
        namespaced::<NetworkPolicy>(&client),
        watcher::Config::default(),
        "networkpolicies",
        strip_metadata,
        changed.clone(),
        metrics.clone(),
    );

    // An empty store before its first list would read as "delete everything".
    let ready = futures::try_join!(
        services.wait_until_ready().map_err(drop),
        slices.wait_until_ready().map_err(drop),
        nodes.wait_until_ready().map_err(drop),
        pods.wait_until_listed().map_err(drop),
        namespaces.wait_until_ready().map_err(drop),
        policies.wait_until_ready().map_err(drop),
    );
    if ready.is_err() {
        error!("a Kubernetes watch ended before its first list; no state published");
        return;
    }
    info!("initial lists received from the API server");
    loop {
        out.publish(Snapshot {
            objects: Objects {
                services: sourced(&services),
                endpoint_slices: sourced(&slices),
                nodes: sourced(&nodes),
                pods: from_api(&PodInfo::kind(&()), pods.pods()),
                namespaces: sourced(&namespaces),
                network_policies: sourced(&policies),
            },
            errors: Vec::new(),
        });
        changed.notified().await;
        // Let a burst of events settle into one snapshot.
        tokio::time::sleep(debounce).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_restarts_back_off_to_five_seconds_and_reset() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<u64> = backoff
            .by_ref()
            .take(7)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn the_selector_skips_what_kube_proxy_skips() {
        assert_eq!(
            proxied_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }
}
