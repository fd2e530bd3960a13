//! The agent's main loop: take the latest snapshot, compile it, reconcile the
//! maps, then publish health and metrics. Sources run on their own threads.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use prometheus::IntGaugeVec;

use lb_common::{
    tc::{TcConfig, TC_CONFIG_FIB_REDIRECT},
    SockConfig, SOCK_CONFIG_NODE_NETNS_ONLY,
};

use crate::{
    addr::addr_from_ip,
    config::{Settings, SourceKind},
    datapath::{Datapath, SOCK_REFUSAL_REASONS},
    drops::{DropLog, DropRecord, TC_OUTCOMES},
    health::{HealthCheckServers, Healthz},
    http::{Handler, Response, Server},
    k8s,
    metrics::Metrics,
    model::{Compiler, NodeContext},
    mounts,
    plan::{Capacity, Scope, UndersizedTable},
    podcgroups,
    reconcile::Reconciler,
    source::{self, Latest, Snapshot},
    tcpath::{boottime_ns, TcDatapath, TcHook, TcOptions},
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
    let drops = Arc::new(Mutex::new(DropLog::default()));
    let served_drops = drops.clone();
    let metrics_handler: Handler = Arc::new(move |path| match path {
        "/metrics" => Some(Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: exported.render(),
        }),
        "/drops" => Some(Response::json(
            200,
            served_drops
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .to_json(),
        )),
        _ => None,
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
    crate::maglev::check_table_size(settings.maglev.size)
        .context("maglevTableSize must be the same listed prime on every node")?;
    let (mut tc, node_port_addresses) = load_tc_path(&settings)?;
    let (socket_scope, node_netns_known) =
        configure_socket_path(settings.socket_lb, &mut datapath, &metrics)?;
    let localhost_node_ports = settings.localhost_node_ports
        && socket_scope != SocketScope::Off
        && node_netns_known
        && !node_port_addresses.is_empty();
    metrics
        .localhost_node_ports
        .set(i64::from(localhost_node_ports));
    let mut reconciler = Reconciler::adopt(&datapath.maps, Capacity::default(), settings.maglev)?;
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
        node_port_addresses,
        localhost_node_ports,
        per_packet_cluster_ips: !settings.socket_lb,
    });
    let mut pod_interfaces = PodInterfaces::default();
    // A pod's packets are translated as they leave it (ingress of its
    // interface). Replies of remote backends need the egress hook only when
    // no uplink program translates them as they enter the node; skipping it
    // saves a conntrack lookup on every packet delivered to a pod.
    let pod_hooks: &[TcHook] = if settings.tc_interfaces.is_empty() {
        &TcHook::ALL
    } else {
        &[TcHook::Ingress]
    };
    let mut opt_out = OptOut::default();
    let mut undersized = Vec::new();
    let mut health_checks = HealthCheckServers::new(all_node_addresses());
    let mut attached = false;
    let mut last_gc = Instant::now();
    loop {
        if let Some(tc) = tc
            .as_mut()
            .filter(|_| last_gc.elapsed() >= CONNTRACK_GC_PERIOD)
        {
            last_gc = Instant::now();
            collect_conntrack(tc, &metrics);
        }
        if let Some(tc) = tc.as_mut() {
            report_drops(tc, &reconciler, &drops);
            refresh_tc_counters(tc, &metrics);
        }
        match datapath.refusals() {
            Ok(counts) => set_counters(&metrics.socket_refused, &SOCK_REFUSAL_REASONS, counts),
            Err(err) => log::error!("reading socket refusal counters: {err}"),
        }
        if let Some(tc) = tc.as_mut().filter(|_| attached) {
            pod_interfaces.attach_new(tc, &settings.pod_interfaces, pod_hooks);
        }
        // Containers of opted-out pods may start after their pod's snapshot.
        opt_out.refresh(&cgroup, &mut datapath);
        let Some(snapshot) = latest.take(Duration::from_secs(1)) else {
            continue;
        };
        let outputs = Outputs {
            metrics: &metrics,
            healthz: &healthz,
            health_checks: &mut health_checks,
            opt_out: &mut opt_out,
            undersized: &mut undersized,
        };
        sync(
            &snapshot,
            &mut compiler,
            tc.as_mut(),
            &mut datapath,
            &mut reconciler,
            outputs,
        );
        if !attached {
            if socket_scope == SocketScope::Off {
                datapath.detach();
            } else {
                datapath
                    .attach(&cgroup)
                    .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
            }
            if let Some(tc) = tc.as_mut() {
                for interface in &settings.tc_interfaces {
                    tc.attach(interface, &TcHook::ALL)
                        .with_context(|| format!("attaching tc programs to {interface}"))?;
                }
                pod_interfaces.attach_new(tc, &settings.pod_interfaces, pod_hooks);
                // Every program an older agent attached is replaced now.
                if let Err(err) = tc.finish_conntrack_carry_over() {
                    log::error!("carrying the older agent's conntrack over: {err}");
                }
            }
            attached = true;
            log::info!("ready: programs attached to {}", cgroup.display());
        }
    }
}

/// Which sockets the socket programs translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketScope {
    /// Every socket of the cgroup (socketLb true).
    All,
    /// Those of the node's own network namespace (host processes,
    /// hostNetwork pods), which no pod interface carries; pods are translated
    /// per packet (socketLb false).
    NodeNetns,
    /// None: socketLb false on a kernel that cannot name the node's network
    /// namespace.
    Off,
}

/// Configures the socket programs before they are attached, and returns
/// their scope and whether they know the node's network namespace. A kernel
/// that cannot name it (`SO_NETNS_COOKIE` needs Linux 5.14) costs NodePorts
/// on 127.0.0.1 and, with socketLb false, the node's own processes' Service
/// translation: logged, and shown by `lb_socket_path_scope` and
/// `lb_localhost_node_ports`.
fn configure_socket_path(
    socket_lb: bool,
    datapath: &mut Datapath,
    metrics: &Metrics,
) -> Result<(SocketScope, bool)> {
    let node_netns = match crate::netns::own_cookie() {
        Ok(cookie) => Some(cookie),
        Err(err) => {
            let lost = if socket_lb {
                "NodePorts will not answer on 127.0.0.1"
            } else {
                "the node's own processes will not reach Services"
            };
            log::error!(
                "cannot name the node's network namespace (SO_NETNS_COOKIE): {err}; {lost}"
            );
            None
        }
    };
    let scope = match (socket_lb, node_netns) {
        (true, _) => SocketScope::All,
        (false, Some(_)) => SocketScope::NodeNetns,
        (false, None) => SocketScope::Off,
    };
    let flags = if scope == SocketScope::NodeNetns {
        log::info!(
            "socket programs translate the node's own network namespace only (socketLb false)"
        );
        SOCK_CONFIG_NODE_NETNS_ONLY
    } else {
        0
    };
    datapath
        .configure(SockConfig {
            node_netns: node_netns.unwrap_or(0),
            flags,
            pad: 0,
        })
        .context("configuring the socket programs")?;
    metrics.socket_path_scope.set(match scope {
        SocketScope::Off => 0,
        SocketScope::NodeNetns => 1,
        SocketScope::All => 2,
    });
    Ok((scope, node_netns.is_some()))
}

/// How often expired conntrack entries of the tc path are collected.
const CONNTRACK_GC_PERIOD: Duration = Duration::from_secs(10);

/// Loads the tc datapath when interfaces are configured, and returns it with
/// the addresses NodePorts answer on.
fn load_tc_path(settings: &Settings) -> Result<(Option<TcDatapath>, Vec<IpAddr>)> {
    // Pod interfaces serve pods without socket translation: the whole node's
    // (socketLb false) or annotated pods'.
    if settings.tc_interfaces.is_empty() && settings.pod_interfaces.is_empty() {
        anyhow::ensure!(
            settings.socket_lb,
            "with socketLb false, set podInterfaces so ClusterIPs are still served"
        );
        return Ok((None, Vec::new()));
    }
    let addresses = if settings.tc_interfaces.is_empty() {
        Vec::new()
    } else if settings.node_port_addresses.is_empty() {
        interface_addresses(&settings.tc_interfaces)?
    } else {
        settings.node_port_addresses.clone()
    };
    anyhow::ensure!(
        settings.tc_interfaces.is_empty() || !addresses.is_empty(),
        "no address on {:?} for NodePorts; set nodePortAddresses",
        settings.tc_interfaces
    );
    let mut tc = TcDatapath::load(&settings.bpffs_dir, &TcOptions::default())
        .context("loading the tc datapath")?;
    let snat = |v4: bool| {
        addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map_or([0; 4], |a| addr_from_ip(*a))
    };
    tc.set_config(&TcConfig {
        maglev_seed: settings.maglev.seed,
        snat_v4: snat(true),
        snat_v6: snat(false),
        flags: TC_CONFIG_FIB_REDIRECT,
        pad: 0,
    })?;
    log::info!(
        "tc path on {:?}; NodePorts on {addresses:?}",
        settings.tc_interfaces
    );
    Ok((Some(tc), addresses))
}

/// Pod interfaces the tc programs are attached to, by name, with the
/// ifindex of those registered for peer redirects.
#[derive(Default)]
struct PodInterfaces {
    attached: std::collections::BTreeMap<String, Option<u32>>,
}

impl PodInterfaces {
    /// Attaches `hooks` to interfaces whose name starts with one of
    /// `prefixes` and that appeared since the last call, registering veth and
    /// netkit ones for peer redirects; forgets the ones that went away.
    fn attach_new(&mut self, tc: &mut TcDatapath, prefixes: &[String], hooks: &[TcHook]) {
        if prefixes.is_empty() {
            return;
        }
        let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
            return;
        };
        let present: std::collections::BTreeSet<String> = addresses
            .map(|a| a.interface_name)
            .filter(|name| prefixes.iter().any(|p| name.starts_with(p.as_str())))
            .collect();
        self.attached.retain(|name, ifindex| {
            let keep = present.contains(name);
            if let (false, Some(ifindex)) = (keep, *ifindex) {
                if let Err(err) = tc.remove_pod_interface(ifindex) {
                    log::error!("forgetting pod interface {name}: {err}");
                }
            }
            keep
        });
        for name in present {
            if self.attached.contains_key(&name) {
                continue;
            }
            match tc.attach(&name, hooks) {
                Ok(()) => {
                    log::info!("tc programs attached to pod interface {name}");
                    let peer = peer_redirect_target(tc, &name);
                    self.attached.insert(name, peer);
                }
                Err(err) => log::error!("attaching tc programs to {name}: {err}"),
            }
        }
    }
}

/// Registers `name` for peer redirects if it is the host end of a veth or
/// netkit pair, returning its ifindex; packets to other interfaces keep the
/// plain redirect.
fn peer_redirect_target(tc: &mut TcDatapath, name: &str) -> Option<u32> {
    let ifindex = nix::net::if_::if_nametoindex(name).ok()?;
    let kind = match crate::netlink::link_kind(ifindex) {
        Ok(Some(kind)) if kind == "veth" || kind == "netkit" => kind,
        Ok(_) => return None,
        Err(err) => {
            log::warn!("kind of interface {name}: {err}; no peer redirect to it");
            return None;
        }
    };
    match tc.add_pod_interface(ifindex) {
        Ok(()) => {
            log::info!("packets to pod interface {name} ({kind}) are handed to its peer");
            Some(ifindex)
        }
        Err(err) => {
            log::error!("registering pod interface {name}: {err}");
            None
        }
    }
}

/// Global unicast addresses of the named interfaces.
fn interface_addresses(interfaces: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        if !interfaces.contains(&ifaddr.interface_name) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip: IpAddr = if let Some(v4) = address.as_sockaddr_in() {
            v4.ip().into()
        } else if let Some(v6) = address.as_sockaddr_in6() {
            v6.ip().into()
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !link_local && !ip.is_loopback() {
            out.push(ip);
        }
    }
    Ok(out)
}

fn collect_conntrack(tc: &mut TcDatapath, metrics: &Metrics) {
    let collected = boottime_ns().and_then(|now| tc.conntrack_gc(now));
    match collected {
        Ok(occupancy) => {
            metrics
                .map_entries
                .with_label_values(&["conntrack"])
                .set(occupancy.live as i64);
            metrics
                .map_capacity
                .with_label_values(&["conntrack"])
                .set(i64::from(occupancy.capacity));
        }
        Err(err) => log::error!("conntrack garbage collection: {err}"),
    }
}

/// Copies the tc programs' counters into the metrics (a per-CPU array read:
/// cheap enough for every pass of the loop).
fn refresh_tc_counters(tc: &TcDatapath, metrics: &Metrics) {
    match tc.stats() {
        Ok(counters) => set_counters(&metrics.tc_packets, &TC_OUTCOMES, counters),
        Err(err) => log::error!("reading tc counters: {err}"),
    }
    match tc.drops_lost() {
        Ok(lost) => metrics.tc_drop_events_lost.set(lost as i64),
        Err(err) => log::error!("reading lost drop events: {err}"),
    }
}

/// Sets one gauge per label to the kernel counter in the same position.
fn set_counters(gauges: &IntGaugeVec, labels: &[&str], counters: Vec<u64>) {
    for (label, value) in labels.iter().zip(counters) {
        gauges.with_label_values(&[label]).set(value as i64);
    }
}

/// Logs and keeps the drops the tc programs reported since the last call.
fn report_drops(tc: &mut TcDatapath, reconciler: &Reconciler, drops: &Mutex<DropLog>) {
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
            DropRecord::new(e, names.get(&e.service_id).copied(), unix_now - age)
        })
        .collect();
    let lines = drops
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(records);
    for line in lines {
        log::info!("tc path: {line}");
    }
}

/// What a reconciliation reports to.
struct Outputs<'a> {
    metrics: &'a Metrics,
    healthz: &'a Healthz,
    health_checks: &'a mut HealthCheckServers,
    opt_out: &'a mut OptOut,
    /// Undersized Maglev tables already warned about.
    undersized: &'a mut Vec<UndersizedTable>,
}

/// Pods that opted out of socket translation, and their cgroups in the map.
#[derive(Default)]
struct OptOut {
    pods: BTreeSet<String>,
    /// The map is known to be empty: nothing to walk or write while no pod
    /// opts out.
    cleared: bool,
}

impl OptOut {
    /// Writes the cgroup ids of the opted-out pods into the map.
    fn refresh(&mut self, cgroup_root: &Path, datapath: &mut Datapath) {
        if self.pods.is_empty() && self.cleared {
            return;
        }
        let ids = match podcgroups::cgroup_ids(cgroup_root, &self.pods) {
            Ok(ids) => ids,
            Err(err) => {
                log::error!("finding cgroups of opted-out pods: {err}");
                return;
            }
        };
        match datapath.maps.set_opt_out(&ids) {
            Ok(changed) => {
                if changed {
                    log::info!("{} cgroups opted out of socket translation", ids.len());
                }
                self.cleared = ids.is_empty();
            }
            Err(err) => log::error!("{err}"),
        }
    }
}

/// Warns once per Service port (and backend count) whose Maglev table is
/// small for its backends; the gauge counts them all.
fn warn_undersized(
    now: Vec<UndersizedTable>,
    reported: &mut Vec<UndersizedTable>,
    metrics: &Metrics,
) {
    for table in now.iter().filter(|t| !reported.contains(t)) {
        log::warn!(
            "{}: {} backends in a Maglev table of fewer than 100 slots each; \
             balance and disruption are worse than designed until maglevTableSize \
             is at least {} on every node",
            table.name,
            table.backends,
            table.wanted_size
        );
    }
    metrics.maglev_undersized.set(now.len() as i64);
    *reported = now;
}

fn sync(
    snapshot: &Snapshot,
    compiler: &mut Compiler,
    tc: Option<&mut TcDatapath>,
    datapath: &mut Datapath,
    reconciler: &mut Reconciler,
    outputs: Outputs<'_>,
) {
    let Outputs {
        metrics,
        healthz,
        health_checks,
        opt_out,
        undersized,
    } = outputs;
    let started = Instant::now();
    let update = compiler.update(&snapshot.objects);
    for error in snapshot.errors.iter().chain(&update.errors) {
        log::error!("skipped: {error}");
    }
    metrics
        .invalid_objects
        .set((snapshot.errors.len() + update.errors.len()) as i64);
    opt_out.pods = update.opted_out_pods.clone();
    let desired = compiler.desired();
    let outcome = reconciler.reconcile(
        &mut datapath.maps,
        tc,
        desired,
        Scope::Only(&update.changed),
    );
    let mut errors = outcome.errors;
    errors.extend(health_checks.update(&desired.health_checks));
    for error in &errors {
        log::error!("{error}");
    }
    let elapsed = started.elapsed();
    metrics.reconciles.inc();
    metrics.reconcile_seconds.observe(elapsed.as_secs_f64());
    metrics.observe_state(reconciler.applied(), reconciler.capacity());
    warn_undersized(reconciler.undersized_maglev_tables(), undersized, metrics);
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
