//! The agent's main loop, wiring only: load the program sets, start a source
//! of intent, then take the latest snapshot, compile it, reconcile the maps,
//! and publish health and metrics. What each step does lives in its module.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use lb_common::{maps::MAX_POLICY_CT, service::ServiceKey};
use lb_core::{
    admission::AdmissionRules,
    compile::{service_of_frontend, Compiler},
    drops::{DropLog, DropRecord},
    intent::{NodeContext, Objects},
    maglev,
    plan::{Capacity, CapacityError, UndersizedTable},
};
use lb_policy::{compile::PolicyConfig, labels::IdentityConfig};
use tracing::{error, info, warn};

use crate::{
    config::{Settings, SourceKind},
    kernel::{
        pins,
        socket_programs::SocketPrograms,
        tc_programs::{TcHook, TcPrograms},
        AyaServiceMaps, ServiceMaps,
    },
    node::{clock::boottime_ns, mounts, sockets::move_udp_sockets},
    opt_out::OptOut,
    pod_interfaces::PodInterfaces,
    policy::PolicyAgent,
    reconcile::{ReconcileError, Reconciler, StaleUdpSocket, WaitingUdpSockets},
    serve::{
        health::{HealthCheckServers, Healthz},
        http::{Handler, Response, Server},
        metrics::Metrics,
    },
    sources::{
        events::{EventSink, ServiceEvent},
        files,
        kubernetes::{self, PodScope},
        Latest, Snapshot,
    },
    startup::{configure_socket_path, load_tc_path, SocketScope},
};

/// How often expired conntrack entries of the tc path are collected.
const CONNTRACK_GC_PERIOD: Duration = Duration::from_secs(10);
/// The first wait before a pass retries what a previous one could not do.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const LONGEST_RETRY: Duration = Duration::from_secs(30);
/// Connected UDP sockets of removed backends that may wait for their
/// Service to have a backend again; those beyond are destroyed.
const WAITING_UDP_SOCKETS: usize = 4096;

/// The address healthCheckNodePorts listen on: every address of the node,
/// IPv6 and IPv4 when the kernel allows a dual-stack socket.
fn all_node_addresses() -> IpAddr {
    match TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)) {
        Ok(_) => Ipv6Addr::UNSPECIFIED.into(),
        Err(_) => IpAddr::from([0, 0, 0, 0]),
    }
}

/// The handler of the metrics port: `/metrics` and `/drops`.
fn metrics_handler(metrics: Metrics, drops: Arc<Mutex<DropLog>>) -> Handler {
    Arc::new(move |path| match path {
        "/metrics" => Some(Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics.render(),
        }),
        "/drops" => Some(Response::json(
            200,
            drops
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .to_json(),
        )),
        _ => None,
    })
}

/// Everything the loop publishes to.
struct Outputs {
    metrics: Metrics,
    healthz: Healthz,
    health_checks: HealthCheckServers,
    drops: Arc<Mutex<DropLog>>,
    /// Undersized Maglev tables already warned about.
    undersized: Vec<UndersizedTable>,
    /// Kubernetes Events, with the API server as the source.
    events: Option<EventSink>,
    /// Frontends a full map kept out at the last pass (an Event is written
    /// when one joins).
    not_programmed: BTreeSet<String>,
    /// Connected UDP sockets of removed backends still to be connected again.
    waiting_udp: WaitingUdpSockets,
}

/// The agent's kernel side.
struct Kernel {
    socket: SocketPrograms,
    tc: Option<TcPrograms>,
    maps: AyaServiceMaps,
    /// Network policy, with the tc programs.
    policy: Option<PolicyAgent>,
    /// The addresses NodePorts answer on (none without the tc path).
    node_port_addresses: Vec<IpAddr>,
}

/// When to retry a pass that could not do everything, doubling the wait
/// while passes keep failing.
struct Retry {
    next: Instant,
    wait: Duration,
}

impl Retry {
    fn new() -> Self {
        Self {
            next: Instant::now(),
            wait: FIRST_RETRY,
        }
    }

    /// Records a pass: clean ones reset the wait, others double it.
    fn after(&mut self, clean: bool) {
        self.wait = if clean {
            FIRST_RETRY
        } else {
            (self.wait * 2).min(LONGEST_RETRY)
        };
        self.next = Instant::now() + self.wait;
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next
    }
}

/// Runs the agent until the process is killed.
pub fn run(settings: Settings) -> Result<()> {
    let cgroup: PathBuf = match &settings.cgroup {
        Some(path) => path.clone(),
        None => mounts::cgroup2_root()?.context(
            "no cgroup v2 mount in this mount namespace; pass --cgroup, or mount one with \
             `mount -t cgroup2 none /sys/fs/cgroup`. `ip netns exec` mounts a fresh /sys \
             without it: enter a network namespace with `nsenter --net=/run/netns/NAME` instead",
        )?,
    };
    pins::check_cgroup(&cgroup)?;
    let mut out = Outputs {
        metrics: Metrics::new(),
        healthz: Healthz::default(),
        health_checks: HealthCheckServers::new(all_node_addresses()),
        drops: Arc::new(Mutex::new(DropLog::default())),
        undersized: Vec::new(),
        events: None,
        not_programmed: BTreeSet::new(),
        waiting_udp: WaitingUdpSockets::new(WAITING_UDP_SOCKETS),
    };
    let _metrics_server = Server::start(
        settings.metrics_address,
        metrics_handler(out.metrics.clone(), out.drops.clone()),
    )
    .with_context(|| format!("serving metrics on {}", settings.metrics_address))?;
    let _healthz_server = Server::start(settings.healthz_address, out.healthz.handler(None))
        .with_context(|| format!("serving /healthz on {}", settings.healthz_address))?;

    maglev::check_table_size(settings.maglev.size)
        .context("maglevTableSize must be the same listed prime on every node")?;
    settings.check()?;
    let (mut socket, socket_maps) = SocketPrograms::load(
        &settings.bpffs_dir,
        &settings.tc.services,
        &settings.tc.sized,
    )
    .with_context(|| {
        format!(
            "loading the socket programs with pins in {}",
            settings.bpffs_dir.display()
        )
    })?;
    let tc_path = load_tc_path(&settings)?;
    let node_port_addresses = tc_path
        .as_ref()
        .map(|tc| tc.node_port_addresses.clone())
        .unwrap_or_default();
    let (tc, tc_maps) = match tc_path {
        Some(path) => (Some(path.programs), Some(path.maps)),
        None => (None, None),
    };
    let socket_path = configure_socket_path(&settings, &mut socket, &out.metrics)?;
    let socket_scope = socket_path.scope;
    let localhost_node_ports = settings.localhost_node_ports
        && socket_scope != SocketScope::Off
        && socket_path.node_netns_known
        && !node_port_addresses.is_empty();
    out.metrics
        .localhost_node_ports
        .set(i64::from(localhost_node_ports));
    let mut tc = tc;
    let policy = match tc.as_mut() {
        Some(tc) => Some(start_policy(&settings, tc)?),
        None => None,
    };
    let mut kernel = Kernel {
        socket,
        tc,
        maps: AyaServiceMaps::new(socket_maps, tc_maps),
        policy,
        node_port_addresses: node_port_addresses.clone(),
    };
    let shared = kernel.maps.capacities()?;
    let capacity = Capacity {
        services: shared.services as usize,
        backends: shared.backends as usize,
        slots: shared.backend_slots as usize,
        maglev_entries: kernel
            .tc
            .as_ref()
            .map_or(Capacity::default().maglev_entries, |tc| {
                tc.maglev_capacity() as usize
            }),
        source_ranges: kernel
            .maps
            .source_range_capacity()?
            .map_or(Capacity::default().source_ranges, |n| n as usize),
    };
    let mut reconciler = Reconciler::adopt(&kernel.maps, capacity, settings.maglev)?;
    out.metrics
        .observe_state(reconciler.applied(), reconciler.capacity());
    info!(
        frontends = reconciler.applied().frontends.len(),
        pins = %settings.bpffs_dir.display(),
        "adopted the maps a previous agent left"
    );

    let latest = Arc::new(Latest::default());
    let period = Duration::from_millis(settings.debounce_ms);
    match &settings.source {
        SourceKind::Manifests(dir) => files::watch(
            dir.clone(),
            AdmissionRules {
                service_cidrs: settings.service_cidrs.clone(),
            },
            period,
            latest.clone(),
        ),
        SourceKind::Kubernetes(kubeconfig) => {
            out.events = Some(kubernetes::watch(
                kubeconfig.clone(),
                period,
                latest.clone(),
                out.metrics.clone(),
                settings.node_name.clone(),
                pod_scope(&settings),
            )?);
        }
    }

    let mut compiler = Compiler::new(NodeContext {
        name: settings.node_name.clone(),
        node_port_addresses,
        localhost_node_ports,
        per_packet_cluster_ips: !settings.socket_lb,
        per_packet_udp_cluster_ips: socket_path.pod_connected_udp_per_packet,
        external_ip_cidrs: settings.external_ip_cidrs.clone(),
    });
    let mut pod_interfaces = PodInterfaces::new(socket_path.pod_connected_udp_per_packet);
    let mut opt_out = OptOut::default();
    let mut attached = false;
    let mut last_gc = Instant::now();
    let mut retry = Retry::new();
    loop {
        out.healthz.turned();
        if let Some(tc) = kernel.tc.as_mut() {
            if last_gc.elapsed() >= CONNTRACK_GC_PERIOD {
                last_gc = Instant::now();
                collect_conntrack(tc, &out.metrics);
            }
            report_drops(tc, &reconciler, kernel.policy.as_ref(), &out.drops);
            refresh_tc_counters(tc, &out.metrics);
        }
        if attached {
            sync_pod_interfaces(&settings, &mut kernel, &mut pod_interfaces);
        }
        match kernel.socket.refusals() {
            Ok(counts) => out.metrics.set_outcomes(&counts),
            Err(err) => error!(error = %err, "reading the socket path's refusal counters"),
        }
        // Containers of opted-out pods may start after their pod's snapshot.
        opt_out.refresh(&cgroup, &mut kernel.socket);
        if let Some(policy) = kernel.policy.as_mut() {
            policy.refresh_cgroups(&cgroup, &mut kernel.socket);
        }
        let policy_retry = kernel.policy.as_ref().is_some_and(PolicyAgent::needs_retry);
        let changed = match latest.take(Duration::from_secs(1)) {
            Some(snapshot) => Some(compile(
                &snapshot,
                &mut compiler,
                kernel.policy.as_mut().filter(|_| settings.network_policy),
                &mut opt_out,
                &out,
            )),
            None if attached && (reconciler.needs_retry() || policy_retry) && retry.due() => {
                Some(BTreeSet::new())
            }
            None => None,
        };
        let Some(changed) = changed else {
            continue;
        };
        let mut clean = reconcile(&mut kernel, &mut reconciler, &compiler, &changed, &mut out);
        // Endpoints are written before the pod programs are attached to
        // their interfaces: a pod's packets pass its source check at once.
        if let Some(policy) = kernel.policy.as_mut() {
            clean &= policy.reconcile(&out.metrics);
        }
        retry.after(clean);
        if !attached {
            attach(
                &settings,
                socket_scope,
                &cgroup,
                &mut kernel,
                &mut pod_interfaces,
            )?;
            attached = true;
            info!(cgroup = %cgroup.display(), "ready: programs attached");
        } else {
            sync_pod_interfaces(&settings, &mut kernel, &mut pod_interfaces);
        }
    }
}

/// Attaches the pod programs to new pod interfaces (and detaches them from
/// those gone), then tells the socket programs which pods' namespaces the
/// pod programs now serve.
fn sync_pod_interfaces(
    settings: &Settings,
    kernel: &mut Kernel,
    pod_interfaces: &mut PodInterfaces,
) {
    let Some(tc) = kernel.tc.as_mut() else {
        return;
    };
    let found = policy_interfaces(kernel.policy.as_ref());
    pod_interfaces.sync(tc, &settings.pod_interfaces, &found);
    if let Some(namespaces) = pod_interfaces.pod_netns_change() {
        if let Err(err) = kernel.socket.set_pod_netns(&namespaces) {
            error!(error = %err, "writing the pods' network namespaces");
            pod_interfaces.netns_not_written();
        }
    }
}

/// The policy agent, adopting what the policy maps hold. With policy off
/// it only empties them and stops enforcement, so that an earlier agent's
/// policy does not outlive the setting.
fn start_policy(settings: &Settings, tc: &mut TcPrograms) -> Result<PolicyAgent> {
    let config = PolicyConfig {
        node: settings.node_name.clone(),
        identity: IdentityConfig {
            excluded: settings.identity_excluded_labels.clone(),
        },
    };
    let maps = tc.policy_maps().context("opening the policy maps")?;
    let mut policy = PolicyAgent::adopt(
        maps,
        config,
        settings.tc_interfaces.clone(),
        settings.network_policy,
        settings.policy_at_connect,
    )
    .context("adopting the policy maps")?;
    if !settings.network_policy {
        policy.compile(&Objects::default());
        info!("network policy is off (networkPolicy false)");
    }
    Ok(policy)
}

/// Which Pods the agent watches: every Pod while policy needs their labels
/// and addresses for identities, else only this node's (the opt-out and
/// pods' interfaces read no other).
fn pod_scope(settings: &Settings) -> PodScope {
    match &settings.node_name {
        Some(node) if !settings.network_policy => PodScope::Node(node.clone()),
        _ => PodScope::Cluster,
    }
}

/// The interfaces of this node's pods that policy found.
fn policy_interfaces(policy: Option<&PolicyAgent>) -> BTreeSet<String> {
    policy.map(PolicyAgent::interface_names).unwrap_or_default()
}

/// Attaches every program after the first reconciliation, so no program
/// runs on empty maps.
fn attach(
    settings: &Settings,
    socket_scope: SocketScope,
    cgroup: &std::path::Path,
    kernel: &mut Kernel,
    pod_interfaces: &mut PodInterfaces,
) -> Result<()> {
    if socket_scope == SocketScope::Off {
        kernel.socket.detach()?;
    } else {
        kernel
            .socket
            .attach(cgroup)
            .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    }
    if let Some(tc) = kernel.tc.as_mut() {
        tc.deny_list()
            .set(&settings.xdp_deny_cidrs)
            .context("writing the XDP deny list")?;
        for interface in &settings.tc_interfaces {
            tc.attach(interface, &TcHook::UPLINK)
                .with_context(|| format!("attaching tc programs to {interface}"))?;
            if settings.xdp_prefilter {
                let mode = tc
                    .attach_prefilter(interface)
                    .with_context(|| format!("attaching the XDP prefilter to {interface}"))?;
                info!(interface = %interface, mode = ?mode, "XDP prefilter attached");
            } else {
                tc.detach_prefilter(interface)?;
            }
        }
    }
    sync_pod_interfaces(settings, kernel, pod_interfaces);
    // Every program an older agent attached is replaced now.
    if let Some(tc) = kernel.tc.as_mut() {
        if let Err(err) = tc.finish_conntrack_carry_over() {
            error!(error = %err, "carrying the older agent's conntrack over");
        }
    }
    Ok(())
}

/// Compiles a snapshot (and its policy, when enforced); returns the
/// frontends it changed.
fn compile(
    snapshot: &Snapshot,
    compiler: &mut Compiler,
    policy: Option<&mut PolicyAgent>,
    opt_out: &mut OptOut,
    out: &Outputs,
) -> BTreeSet<ServiceKey> {
    out.healthz.queued();
    let update = compiler.update(&snapshot.objects);
    out.healthz.set_node_eligible(update.node_eligible);
    let policy_errors = policy
        .map(|policy| policy.compile(&snapshot.objects))
        .unwrap_or_default();
    let errors: Vec<_> = snapshot
        .errors
        .iter()
        .chain(&update.errors)
        .chain(&policy_errors)
        .collect();
    for error in &errors {
        error!(
            origin = %error.origin,
            object = %error.object,
            field = %error.field,
            reason = %error.reason,
            "skipped invalid object or field"
        );
    }
    out.metrics.invalid_objects.set(errors.len() as i64);
    opt_out.pods = update.opted_out_pods;
    update.changed
}

/// Connects the connected UDP sockets of removed backends (and those that
/// waited for their frontend to have a backend) to a live backend; returns
/// whether every socket could be handled.
fn move_stale_udp_sockets(
    maps: &mut AyaServiceMaps,
    stale: Vec<StaleUdpSocket>,
    out: &mut Outputs,
) -> bool {
    let room = out.waiting_udp.room_for(stale.len(), maps);
    let moved = match move_udp_sockets(&stale, room) {
        Ok(moved) => moved,
        Err(err) => {
            error!(error = %err, "moving connected UDP sockets off removed backends");
            // Tried again at the next pass.
            out.waiting_udp.add(stale);
            return false;
        }
    };
    let mut clean = true;
    for socket in &moved.reconnected {
        // The socket's new backend has an entry of its own; the old one
        // would otherwise stay until the LRU evicts it.
        if let Err(err) = maps.forget_socket_translation(&socket.translation_key()) {
            clean = false;
            error!(error = %err, "forgetting a re-connected socket's old translation");
        }
    }
    let metrics = &out.metrics;
    if !moved.reconnected.is_empty() {
        metrics
            .udp_sockets_reconnected
            .inc_by(moved.reconnected.len() as u64);
        info!(
            sockets = moved.reconnected.len(),
            "re-connected UDP sockets of removed backends to a live backend of their Service"
        );
    }
    if !moved.waiting.is_empty() {
        info!(
            sockets = moved.waiting.len(),
            "UDP sockets of removed backends wait for their Service to have a backend"
        );
    }
    if let Some((_, reason)) = moved.destroyed.first() {
        metrics
            .udp_sockets_terminated
            .inc_by(moved.destroyed.len() as u64);
        warn!(
            sockets = moved.destroyed.len(),
            %reason,
            "terminated connected UDP sockets of removed backends"
        );
    }
    out.waiting_udp.add(moved.waiting);
    clean
}

/// Moves the maps to the compiler's desired state and publishes the result.
/// Returns whether the pass did everything it was asked to.
fn reconcile(
    kernel: &mut Kernel,
    reconciler: &mut Reconciler,
    compiler: &Compiler,
    changed: &BTreeSet<ServiceKey>,
    out: &mut Outputs,
) -> bool {
    let started = Instant::now();
    let desired = compiler.desired();
    let pass = reconciler.reconcile(&mut kernel.maps, desired, changed);
    let mut clean = pass.errors.is_empty();
    if let Some(tc) = kernel.tc.as_mut() {
        let addresses = desired.frontend_only_addresses(&kernel.node_port_addresses);
        if let Err(err) = tc.set_frontend_addresses(&addresses) {
            clean = false;
            error!(error = %err, "writing the frontend addresses");
        }
    }
    for err in &pass.errors {
        error!(error = %err, "reconciling");
    }
    for err in out.health_checks.update(&desired.health_checks) {
        clean = false;
        error!(error = %err, "serving a healthCheckNodePort");
    }
    let served = out.waiting_udp.take_served(reconciler);
    let mut stale = pass.stale_udp_sockets;
    stale.extend(served);
    if !stale.is_empty() {
        clean &= move_stale_udp_sockets(&mut kernel.maps, stale, out);
    }
    out.metrics
        .udp_sockets_waiting
        .set(out.waiting_udp.len() as i64);
    let elapsed = started.elapsed();
    let metrics = &out.metrics;
    metrics.reconciles.inc();
    metrics.reconcile_seconds.observe(elapsed.as_secs_f64());
    metrics.observe_state(reconciler.applied(), reconciler.capacity());
    metrics.frontends_pending.set(reconciler.pending() as i64);
    // Every pass plans the frontends still waiting, so this lists them all.
    metrics.frontends_not_programmed.reset();
    let mut not_programmed = BTreeSet::new();
    for err in &pass.errors {
        if let ReconcileError::Capacity(full) = err {
            metrics
                .frontends_not_programmed
                .with_label_values(&[full.name.as_str(), full.map])
                .set(1);
            if !out.not_programmed.contains(&full.name) {
                report_not_programmed(compiler, full, out.events.as_ref());
            }
            not_programmed.insert(full.name.clone());
        }
    }
    out.not_programmed = not_programmed;
    warn_undersized(reconciler.undersized_maglev_tables(), out);
    // The datapath was brought as close to the snapshot as it can be; what
    // could not be programmed is in the log and the error counter.
    out.healthz.updated();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    out.metrics.last_sync_seconds.set(now as i64);
    if !clean {
        out.metrics.reconcile_errors.inc();
    }
    info!(
        frontends = pass.frontends,
        writes = pass.writes,
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "reconciled"
    );
    clean
}

/// Writes a Warning Event on the Service of a frontend a full map keeps out.
fn report_not_programmed(compiler: &Compiler, full: &CapacityError, events: Option<&EventSink>) {
    let (Some(events), Some((namespace, name))) = (events, service_of_frontend(&full.name)) else {
        return;
    };
    events.send(ServiceEvent {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: compiler.service_uid(namespace, name),
        reason: "MapFull",
        note: full.to_string(),
    });
}

fn collect_conntrack(tc: &mut TcPrograms, metrics: &Metrics) {
    let now = match boottime_ns() {
        Ok(now) => now,
        Err(err) => {
            error!(error = %err, "reading the boot-time clock for conntrack expiry");
            return;
        }
    };
    match tc.conntrack_gc(now) {
        Ok(occupancy) => {
            metrics
                .map_entries
                .with_label_values(&["conntrack"])
                .set(occupancy.live as i64);
            metrics
                .map_capacity
                .with_label_values(&["conntrack"])
                .set(i64::from(occupancy.capacity));
            metrics
                .map_entries
                .with_label_values(&["conntrack_unconfirmed"])
                .set(occupancy.pending_live as i64);
            metrics
                .map_capacity
                .with_label_values(&["conntrack_unconfirmed"])
                .set(i64::from(occupancy.pending_capacity));
            metrics
                .map_entries
                .with_label_values(&["policy_conntrack"])
                .set(occupancy.policy_live as i64);
            metrics
                .map_capacity
                .with_label_values(&["policy_conntrack"])
                .set(i64::from(MAX_POLICY_CT));
        }
        Err(err) => error!(error = %err, "conntrack garbage collection"),
    }
}

/// Copies the tc programs' counters into the metrics (a per-CPU array read:
/// cheap enough for every pass of the loop).
fn refresh_tc_counters(tc: &TcPrograms, metrics: &Metrics) {
    match tc.stats() {
        Ok(counters) => metrics.set_outcomes(&counters),
        Err(err) => error!(error = %err, "reading the tc counters"),
    }
    match tc.drops_lost() {
        Ok(lost) => metrics.tc_drop_events_lost.set(lost as i64),
        Err(err) => error!(error = %err, "reading the lost drop reports"),
    }
}

/// Logs and keeps the drops the tc programs reported since the last call.
fn report_drops(
    tc: &mut TcPrograms,
    reconciler: &Reconciler,
    policy: Option<&PolicyAgent>,
    drops: &Mutex<DropLog>,
) {
    let events = tc.drain_drops();
    if events.is_empty() {
        return;
    }
    let names: HashMap<u32, &str> = reconciler
        .applied()
        .frontends
        .values()
        .map(|f| (f.service_id, f.name.as_str()))
        .collect();
    let boot_now = boottime_ns().unwrap_or(0);
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let records = events
        .iter()
        .map(|e| {
            let age = boot_now.saturating_sub(e.time_ns) as f64 / 1e9;
            let record = DropRecord::new(e, names.get(&e.service_id).copied(), unix_now - age);
            match policy {
                Some(policy) => record.with_identities(e, |id| policy.identity_text(id)),
                None => record,
            }
        })
        .collect();
    let (logged, more) = drops
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(records);
    for drop in logged {
        let identities = drop
            .source_identity
            .as_deref()
            .zip(drop.destination_identity.as_deref());
        match identities {
            Some((source, destination)) => info!(
                client = %drop.client,
                destination = %drop.frontend,
                protocol = %drop.protocol,
                source_identity = %source,
                destination_identity = %destination,
                reason = %drop.reason,
                "{}",
                drop.explanation
            ),
            None => info!(
                client = %drop.client,
                frontend = %drop.frontend,
                protocol = %drop.protocol,
                service = %drop.service,
                reason = %drop.reason,
                "{}",
                drop.explanation
            ),
        }
    }
    if more > 0 {
        info!(
            more,
            "more drops not logged one by one (see /drops and lb_tc_packets)"
        );
    }
}

/// Warns once per Service port (and backend count) whose Maglev table is
/// small for its backends; the gauge counts them all.
fn warn_undersized(now: Vec<UndersizedTable>, out: &mut Outputs) {
    for table in now.iter().filter(|t| !out.undersized.contains(t)) {
        warn!(
            service = %table.name,
            backends = table.backends,
            wanted_size = table.wanted_size,
            "fewer than 100 Maglev slots per backend: balance and disruption are worse than \
             designed; raise maglevTableSize to wanted_size on every node"
        );
    }
    out.metrics.maglev_undersized.set(now.len() as i64);
    out.undersized = now;
}
