//! The agent's main loop: take the latest snapshot, compile it, reconcile the
//! maps, then publish health and metrics. Sources run on their own threads.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use crate::{
    config::{Settings, SourceKind},
    datapath::Datapath,
    health::{HealthCheckServers, Healthz},
    http::{Handler, Response, Server},
    k8s,
    metrics::Metrics,
    model::{Compiler, NodeContext},
    mounts,
    plan::{Capacity, Scope},
    reconcile::Reconciler,
    source::{self, Latest, Snapshot},
};

/// The address healthCheckNodePorts listen on: every address of the node,
/// IPv6 and IPv4 when the kernel allows a dual-stack socket.
fn all_node_addresses() -> IpAddr {
    match TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)) {
        Ok(_) => Ipv6Addr::UNSPECIFIED.into(),
        Err(_) => IpAddr::from([0, 0, 0, 0]),
    }
}

/// Runs the agent until the process is killed.
pub fn run(settings: Settings) -> Result<()> {
    let cgroup = match &settings.cgroup {
        Some(path) => path.clone(),
        None => mounts::cgroup2_root()?.context("no cgroup v2 mount found; pass --cgroup")?,
    };
    let metrics = Metrics::new();
    let healthz = Healthz::default();
    let exported = metrics.clone();
    let metrics_handler: Handler = Arc::new(move |path| {
        (path == "/metrics").then(|| Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: exported.render(),
        })
    });
    let _metrics_server = Server::start(settings.metrics_address, metrics_handler)
        .with_context(|| format!("serving metrics on {}", settings.metrics_address))?;
    let _healthz_server = Server::start(settings.healthz_address, healthz.handler(None))
        .with_context(|| format!("serving /healthz on {}", settings.healthz_address))?;

    let mut datapath = Datapath::load(&settings.bpffs_dir).with_context(|| {
        format!(
            "loading the datapath with pins in {}",
            settings.bpffs_dir.display()
        )
    })?;
    let mut reconciler = Reconciler::adopt(&datapath.maps, Capacity::default())?;
    metrics.observe_state(reconciler.applied(), reconciler.capacity());
    log::info!(
        "adopted {} frontends from {}",
        reconciler.applied().frontends.len(),
        settings.bpffs_dir.display()
    );

    let latest = Arc::new(Latest::default());
    let period = Duration::from_millis(settings.debounce_ms);
    match &settings.source {
        SourceKind::Manifests(dir) => source::watch_manifests(dir.clone(), period, latest.clone()),
        SourceKind::Kubernetes(kubeconfig) => k8s::watch(
            kubeconfig.clone(),
            settings.node_name.clone(),
            period,
            latest.clone(),
            metrics.clone(),
        )?,
    }

    let mut compiler = Compiler::new(NodeContext {
        name: settings.node_name.clone(),
    });
    let mut health_checks = HealthCheckServers::new(all_node_addresses());
    let mut attached = false;
    loop {
        let Some(snapshot) = latest.take(Duration::from_secs(1)) else {
            continue;
        };
        sync(
            &snapshot,
            &mut compiler,
            &mut datapath,
            &mut reconciler,
            &metrics,
            &healthz,
            &mut health_checks,
        );
        if !attached {
            datapath
                .attach(&cgroup)
                .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
            attached = true;
            log::info!("ready: programs attached to {}", cgroup.display());
        }
    }
}

fn sync(
    snapshot: &Snapshot,
    compiler: &mut Compiler,
    datapath: &mut Datapath,
    reconciler: &mut Reconciler,
    metrics: &Metrics,
    healthz: &Healthz,
    health_checks: &mut HealthCheckServers,
) {
    let started = Instant::now();
    let update = compiler.update(&snapshot.objects);
    for error in snapshot.errors.iter().chain(&update.errors) {
        log::error!("skipped: {error}");
    }
    metrics
        .invalid_objects
        .set((snapshot.errors.len() + update.errors.len()) as i64);
    let desired = compiler.desired();
    let outcome = reconciler.reconcile(&mut datapath.maps, desired, Scope::Only(&update.changed));
    let mut errors = outcome.errors;
    errors.extend(health_checks.update(&desired.health_checks));
    for error in &errors {
        log::error!("{error}");
    }
    let elapsed = started.elapsed();
    metrics.reconciles.inc();
    metrics.reconcile_seconds.observe(elapsed.as_secs_f64());
    metrics.observe_state(reconciler.applied(), reconciler.capacity());
    metrics
        .udp_sockets_terminated
        .inc_by(outcome.terminated_sockets as u64);
    // The datapath was brought as close to the snapshot as it can be; what
    // could not be programmed is in the log and the error counter.
    healthz.updated();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    metrics.last_sync_seconds.set(now as i64);
    if !errors.is_empty() {
        metrics.reconcile_errors.inc();
    }
    if outcome.terminated_sockets > 0 {
        log::info!(
            "terminated {} connected UDP sockets of removed backends",
            outcome.terminated_sockets
        );
    }
    log::info!(
        "reconciled {} frontends with {} map writes in {:?}",
        outcome.frontends,
        outcome.writes,
        elapsed
    );
}
