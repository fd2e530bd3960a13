//! `agent-memory`: the agent's resident memory in a cluster at the
//! Kubernetes scalability envelope's Pod and Service counts. A real control
//! plane (etcd, kube-apiserver) holds 150,000 Pods on 1,500 nodes (100 on
//! this node), each with its address in its status as a kubelet writes it,
//! 10,000 Services with an EndpointSlice of 10 endpoints each, and 100
//! NetworkPolicies. The agent then starts in API mode, once with network
//! policy on (it keeps every Pod's labels and addresses for identities) and
//! once with it off (it keeps only this node's Pods); each run reads its
//! resident memory (`VmRSS`) once it is ready and after a settling period,
//! and the most it ever had resident (`VmHWM`).
//!
//! ```text
//! agent-memory [--pods N] [--services N] [--settle-secs S] [--out DIR]
//! ```
//! Run as root, after `cargo build --release` (it runs the release
//! `lb-agent` next to it). Creating the objects takes minutes.

use std::{fmt::Write as _, path::PathBuf, thread, time::Duration, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    NamespaceResourceScope,
};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    Api, Client, Resource,
};
use lb_bench::control_plane::{memory_mib, publish};
use lb_e2e::{
    agent::{Agent, Binaries},
    controlplane::ControlPlane,
    lab::Lab,
    scenario::require_root,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "agent-memory",
    about = "The agent's memory with 150,000 Pods and 10,000 Services"
)]
struct Args {
    /// Pods, spread over `--nodes` nodes; this node (`node1`) gets its share.
    #[arg(long, default_value_t = 150_000)]
    pods: usize,
    /// Nodes.
    #[arg(long, default_value_t = 1_500)]
    nodes: usize,
    /// Services, each with one EndpointSlice of 10 endpoints.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// Seconds to let the agent settle after it is ready.
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Where to write `agent-memory.md`; prints only without it.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Namespaces the objects are spread over.
const NAMESPACES: usize = 100;
/// Requests in flight while creating objects.
const IN_FLIGHT: usize = 32;
/// The budget the issue sets (300 MB).
const BUDGET_MIB: f64 = 300.0 * 1e6 / (1024.0 * 1024.0);

fn namespace(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

/// Pod `i`'s address: 10.64.0.0/10 in order.
fn pod_ip(i: usize) -> String {
    let n = (10u32 << 24 | 64 << 16) + i as u32;
    std::net::Ipv4Addr::from(n).to_string()
}

fn node_of(i: usize, nodes: usize) -> String {
    match i % nodes {
        0 => "node1".to_owned(),
        k => format!("node-{k}"),
    }
}

/// Attempts per request: a loaded API server (or this machine's two cores)
/// may drop one now and then.
const ATTEMPTS: u32 = 5;

/// Runs `request` until it succeeds, at most [`ATTEMPTS`] times, waiting
/// 0.2 s, 0.4 s, ... between attempts. An object that already exists (an
/// attempt whose answer was lost) counts as created.
async fn with_retry<F, Fut>(mut request: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<()>>,
{
    let mut wait = Duration::from_millis(200);
    for attempt in 1.. {
        match request().await {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => return Ok(()),
            Err(err) if attempt >= ATTEMPTS => return Err(err.into()),
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    unreachable!("the loop returns")
}

/// A client with timeouts long enough for an API server under load.
async fn client(kubeconfig: &std::path::Path) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    config.read_timeout = Some(Duration::from_secs(60));
    config.write_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(config)?)
}

/// Runs `request` for every item, [`IN_FLIGHT`] at a time; the first
/// failure (after its retries) ends the run.
async fn for_each_item<T, Fut>(
    items: impl IntoIterator<Item = T>,
    request: impl FnMut(T) -> Fut,
) -> Result<()>
where
    Fut: std::future::Future<Output = Result<()>>,
{
    stream::iter(items)
        .map(request)
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// Creates every object of `objects` (namespace, JSON) through `client`.
async fn create_all<K>(client: &Client, objects: Vec<(String, Value)>) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    for_each_item(objects, |(ns, value)| {
        let api: Api<K> = Api::namespaced(client.clone(), &ns);
        async move {
            let object: K = serde_json::from_value(value)?;
            with_retry(|| async { api.create(&PostParams::default(), &object).await.map(drop) })
                .await
        }
    })
    .await
}

/// Fills the API server; returns how long it took.
async fn populate(client: &Client, args: &Args) -> Result<Duration> {
    let started = Instant::now();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for i in 0..NAMESPACES {
        let object: Namespace = serde_json::from_value(json!({
            "metadata": {"name": namespace(i), "labels": {"team": format!("team-{}", i % 10)}}
        }))?;
        namespaces.create(&PostParams::default(), &object).await?;
    }
    // Pods are admitted only once their namespace's default ServiceAccount
    // exists; the controller makes them shortly.
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = accounts.list(&ListParams::default()).await?;
        let ready = listed
            .items
            .iter()
            .filter(|a| a.metadata.name.as_deref() == Some("default"))
            .filter(|a| {
                a.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with("ns-"))
            })
            .count();
        if ready == NAMESPACES {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {ready} of {NAMESPACES} namespaces got their ServiceAccount"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods: Vec<(String, Value)> = (0..args.pods)
        .map(|i| {
            let value = json!({
                "metadata": {
                    "name": format!("pod-{i}"),
                    "namespace": namespace(i),
                    "labels": {"app": format!("app-{}", i % 1000), "tier": format!("tier-{}", i % 3)},
                },
                "spec": {
                    "nodeName": node_of(i, args.nodes),
                    "containers": [{"name": "c", "image": "registry.invalid/app:1"}],
                },
            });
            (namespace(i), value)
        })
        .collect();
    create_all::<Pod>(client, pods).await?;
    eprintln!("{} pods created in {:?}", args.pods, started.elapsed());
    for_each_item(0..args.pods, |i| {
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace(i));
        async move {
            let ip = pod_ip(i);
            let status = json!({"status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }});
            let name = format!("pod-{i}");
            with_retry(|| async {
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .map(drop)
            })
            .await
        }
    })
    .await?;
    eprintln!("pod addresses written after {:?}", started.elapsed());
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..args.services {
        let ns = namespace(i);
        services.push((
            ns.clone(),
            json!({
                "metadata": {"name": format!("svc-{i}"), "namespace": ns},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            }),
        ));
        let endpoints: Vec<Value> = (0..10)
            .map(|k| {
                let pod = (i * 10 + k) % args.pods.max(1);
                // As the EndpointSlice controller writes an endpoint.
                json!({
                    "addresses": [pod_ip(pod)],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": node_of(pod, args.nodes),
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": namespace(pod),
                        "name": format!("pod-{pod}"),
                        "uid": format!("{:08x}-0000-4000-8000-{:012x}", pod, pod),
                    },
                })
            })
            .collect();
        slices.push((
            ns.clone(),
            json!({
                "metadata": {
                    "name": format!("svc-{i}-abcde"),
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }),
        ));
    }
    create_all::<Service>(client, services).await?;
    create_all::<EndpointSlice>(client, slices).await?;
    let policies = (0..args.policies)
        .map(|i| {
            let ns = namespace(i);
            let value = json!({
                "metadata": {"name": format!("allow-{i}"), "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app-{i}")}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{
                            "namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 10)}},
                            "podSelector": {"matchLabels": {"tier": "tier-0"}},
                        }],
                        "ports": [{"port": 8080, "protocol": "TCP"}],
                    }],
                },
            });
            (ns, value)
        })
        .collect();
    create_all::<NetworkPolicy>(client, policies).await?;
    Ok(started.elapsed())
}

/// One run of the agent: resident MiB when ready, after settling, at most.
struct Run {
    ready_after: Duration,
    ready_mib: f64,
    settled_mib: f64,
    peak_mib: f64,
}

fn run_agent(plane: &ControlPlane, network_policy: bool, settle: Duration) -> Result<Run> {
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1")?;
    let started = Instant::now();
    let agent = Agent::start_api_ready_within(
        &lab,
        &bins,
        &node,
        plane.kubeconfig(),
        &["--network-policy", &network_policy.to_string()],
        Duration::from_secs(600),
    )?;
    let ready_after = started.elapsed();
    let pid = agent.pid().to_string();
    let ready_mib = memory_mib(&pid, "VmRSS");
    thread::sleep(settle);
    Ok(Run {
        ready_after,
        ready_mib,
        settled_mib: memory_mib(&pid, "VmRSS"),
        peak_mib: memory_mib(&pid, "VmHWM"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root();
    // Only the controllers the control plane needs to serve: the others
    // (garbage collector, ...) would watch every Pod too, on the same cores.
    // Set before any thread starts.
    std::env::set_var("K8S_KCM_CONTROLLERS", "serviceaccount,serviceaccount-token");
    let plane = ControlPlane::start().context("starting the control plane")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let filled = runtime.block_on(async {
        let client = client(plane.kubeconfig()).await?;
        populate(&client, &args).await
    })?;
    eprintln!("API server filled in {filled:?}");
    let settle = Duration::from_secs(args.settle_secs);
    let with_policy = run_agent(&plane, true, settle)?;
    let without_policy = run_agent(&plane, false, settle)?;

    let mut report = format!(
        "# The agent's memory at the scalability envelope\n\n\
         A real control plane (etcd, kube-apiserver) holds {} Pods on {} nodes \
         (each with its address in its status), {} Services with one \
         EndpointSlice of 10 endpoints each, and {} NetworkPolicies. The agent \
         (release build) starts in API mode on one lab node; resident memory \
         (`VmRSS`) when it logs `ready:` and after {} s more, and the most it \
         had resident (`VmHWM`). Budget: 300 MB ({BUDGET_MIB:.0} MiB). \
         Command: `target/release/agent-memory --out bench/results` (run by \
         `make bench`); filling the API server took {:.0} s.\n\n\
         | network policy | ready after | RSS when ready | RSS settled | peak RSS | within budget |\n\
         |---|---|---|---|---|---|\n",
        args.pods,
        args.nodes,
        args.services,
        args.policies,
        args.settle_secs,
        filled.as_secs_f64(),
    );
    for (name, run) in [("on", &with_policy), ("off", &without_policy)] {
        let _ = writeln!(
            report,
            "| {name} | {:.1} s | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} |",
            run.ready_after.as_secs_f64(),
            run.ready_mib,
            run.settled_mib,
            run.peak_mib,
            if run.peak_mib <= BUDGET_MIB {
                "yes"
            } else {
                "no"
            },
        );
    }
    publish(
        &report,
        args.out
            .as_deref()
            .map(|d| d.join("agent-memory.md"))
            .as_deref(),
    )?;
    Ok(())
}
