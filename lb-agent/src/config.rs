//! Agent settings: command-line flags over a YAML config file over defaults.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::Parser;
use serde::Deserialize;

use ipnetwork::IpNetwork;
use lb_core::plan::MaglevSettings;
use lb_policy::labels::IdentityConfig;

use crate::{
    kernel::{
        capacities::{CapacityError, MapCapacities},
        service_maps::ServiceCapacities,
        tc_programs::TcOptions,
    },
    logging::LogFormat,
};

/// Default address of the Prometheus metrics endpoint (kube-proxy's port).
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10249";
/// Default address of `/healthz` (kube-proxy's port).
pub const DEFAULT_HEALTHZ_ADDRESS: &str = "0.0.0.0:10256";
/// Default bpffs directory.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";

/// Socket-level Service load balancer for Kubernetes: programs eBPF maps from
/// Service and EndpointSlice objects so that connect() to a ClusterIP reaches
/// a backend directly. Intent comes from the Kubernetes API (in-cluster, or
/// --kubeconfig) or, with --manifests, from a directory of YAML.
///
/// Every flag can also be set in the --config file (YAML, the camelCase key
/// shown in brackets); a flag given on the command line wins.
#[derive(Parser, Debug, Default)]
#[command(version, about, long_about)]
pub struct Args {
    /// YAML config file with any of the settings below.
    #[arg(long, env = "LB_CONFIG")]
    pub config: Option<PathBuf>,
    /// [nodeName] This node's name: endpoints with this nodeName are local
    /// (internalTrafficPolicy Local), its Node object's zone label selects topology hints.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// [manifests] Read Services, EndpointSlices and Nodes from this directory
    /// of Kubernetes YAML instead of the API server (multi-document files and
    /// `kind: List` accepted; re-read when a file changes).
    #[arg(long, env = "LB_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// [kubeconfig] kubeconfig for the API server; default: in-cluster
    /// service account, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// [cgroup] cgroup v2 directory whose processes get translated; default:
    /// the cgroup v2 mount (the whole node).
    #[arg(long, env = "LB_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// [bpffsDir] bpffs directory for pinned maps and links [default: /sys/fs/bpf/lb].
    #[arg(long, env = "LB_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// [metricsAddress] Prometheus metrics and `/drops` (which carry client
    /// addresses) address; kube-proxy's default, this node only
    /// [default: 127.0.0.1:10249].
    #[arg(long)]
    pub metrics_address: Option<SocketAddr>,
    /// [healthzAddress] /healthz address [default: 0.0.0.0:10256].
    #[arg(long)]
    pub healthz_address: Option<SocketAddr>,
    /// [debounceMs] Quiet time after a change before reconciling, in
    /// milliseconds; also the manifest directory's poll period [default: 100].
    #[arg(long)]
    pub debounce_ms: Option<u64>,
    /// [tcInterfaces] Node interfaces (uplinks) where the tc programs serve
    /// NodePorts, ExternalIPs and LoadBalancer IPs; none: the tc path is off.
    #[arg(long, value_delimiter = ',')]
    pub tc_interfaces: Vec<String>,
    /// [nodePortAddresses] Addresses NodePorts answer on [default: the
    /// addresses of the tc interfaces].
    #[arg(long, value_delimiter = ',')]
    pub node_port_addresses: Vec<IpAddr>,
    /// [serviceCIDRs] The cluster's service CIDRs (the API server's
    /// `--service-cluster-ip-range`); with --manifests, a Service whose
    /// clusterIP is outside them is rejected, as the API server would
    /// [default: any address].
    #[arg(long = "service-cidrs", value_delimiter = ',')]
    pub service_cidrs: Vec<IpNetwork>,
    /// [externalIPCIDRs] The ranges Services' `spec.externalIPs` may use;
    /// others are reported and not served (anyone who may create a Service
    /// could otherwise capture traffic to any address, CVE-2020-8554)
    /// [default: none, as Kubernetes' DenyServiceExternalIPs].
    #[arg(long = "external-ip-cidrs", value_delimiter = ',')]
    pub external_ip_cidrs: Vec<IpNetwork>,
    /// [localhostNodePorts] Processes in the node's network namespace also
    /// reach IPv4 NodePorts on 127.0.0.0/8, as with kube-proxy's iptables
    /// mode (socket path only) [default: true].
    #[arg(long)]
    pub localhost_node_ports: Option<bool>,
    /// [socketLb] Translate Services at the socket layer (cgroup programs)
    /// [default: true]. With false, pods' ClusterIP traffic is translated per
    /// packet by the tc programs on their interfaces (see --pod-interfaces),
    /// and the socket programs translate only the node's own network
    /// namespace (host processes, hostNetwork pods).
    #[arg(long)]
    pub socket_lb: Option<bool>,
    /// [podInterfaces] Name prefixes of the node's pod interfaces (e.g. cali,
    /// lxc, veth) where tc programs translate ClusterIP traffic when the
    /// socket path is off.
    #[arg(long, value_delimiter = ',')]
    pub pod_interfaces: Vec<String>,
    /// [podConnectedUdpPerPacket] Leave pods' connected UDP sockets on the
    /// ClusterIP at connect() and translate each datagram on the pod's
    /// interface (pod programs: podInterfaces, or network policy), so that a
    /// socket keeps working when its backend leaves [default: true]. False:
    /// translated at connect() and connected again by the agent when their
    /// backend leaves.
    #[arg(long)]
    pub pod_connected_udp_per_packet: Option<bool>,
    /// [maglevTableSize] Maglev table size, a prime of 251, 509, 1021, 2039,
    /// 4093, 8191, 16381, 32749, 65537 or 131071; identical on every node [default: 16381].
    #[arg(long)]
    pub maglev_table_size: Option<usize>,
    /// [xdpPrefilter] Attach the XDP prefilter to the tc interfaces (native
    /// mode where the driver supports it, generic otherwise): it drops
    /// sources of xdpDenyCIDRs, and sources outside a LoadBalancer IP's
    /// loadBalancerSourceRanges, before the stack sees them [default: false].
    #[arg(long)]
    pub xdp_prefilter: Option<bool>,
    /// [xdpDenyCIDRs] Source prefixes the XDP prefilter drops (IPv4 and
    /// IPv6) [default: none].
    #[arg(long, value_delimiter = ',')]
    pub xdp_deny_cidrs: Vec<IpNetwork>,
    /// [maglevCapacity] Entries of the Maglev map, every table together
    /// (each Service port on the tc path takes 100 per endpoint, at least
    /// 252, at most maglevTableSize + 1); only used when the map is created
    /// [default: 4194304].
    #[arg(long)]
    pub maglev_capacity: Option<u32>,
    /// [serviceCapacity] Frontends (VIP, port, protocol) the maps hold;
    /// only used when the maps are created [default: 65536].
    #[arg(long)]
    pub service_capacity: Option<u32>,
    /// [backendCapacity] Distinct backends the maps hold; only used when
    /// the maps are created [default: 131072].
    #[arg(long)]
    pub backend_capacity: Option<u32>,
    /// [backendSlotCapacity] Backend slots of the socket path (a frontend
    /// takes one per backend, twice while it changes); only used when the
    /// maps are created [default: 524288].
    #[arg(long)]
    pub backend_slot_capacity: Option<u32>,
    /// [mapCapacities] NAME=N: the capacity of a map without a setting of
    /// its own (its pinned name, e.g. LB_SKNAT_V1=524288; the README lists
    /// them); repeatable; only used when the map is created.
    #[arg(long = "map-capacity", value_parser = parse_map_capacity)]
    pub map_capacities: Vec<(String, u32)>,
    /// [conntrackCapacity] Entries of the tc path's conntrack, two per
    /// connection; only used when the map is created [default: 262144].
    #[arg(long)]
    pub conntrack_capacity: Option<u32>,
    /// [unconfirmedFlowCapacity] Entries of the tc path's table of flows
    /// whose handshake has not completed, two per flow; only used when the
    /// map is created [default: 65536].
    #[arg(long)]
    pub unconfirmed_flow_capacity: Option<u32>,
    /// [maglevSeed] Maglev seed; identical on every node so a flow reaches the
    /// same backend through any node [default: built in].
    #[arg(long)]
    pub maglev_seed: Option<u64>,
    /// [networkPolicy] Enforce Kubernetes NetworkPolicy on this node's pods
    /// (tc programs on each pod's host interface, label identities)
    /// [default: true].
    #[arg(long)]
    pub network_policy: Option<bool>,
    /// [policyAtConnect] Refuse, at connect() (EPERM), connections that the
    /// pod's egress policy denies, instead of letting their SYN be dropped
    /// and time out; the tc check stays the authority [default: true].
    #[arg(long)]
    pub policy_at_connect: Option<bool>,
    /// [policyMark] A packet mark bit for the pod programs: set on a packet
    /// between two pods of this node once its policy was checked where it
    /// left its pod, so the destination's program skips it; 0 checks every
    /// packet at both pods. Pick a bit no other component of the node uses
    /// [default: 0x10].
    #[arg(long, value_parser = parse_mark)]
    pub policy_mark: Option<u32>,
    /// [identityExcludedLabels] Pod label keys left out of security
    /// identities (unless a policy selector names them) [default: the
    /// rollout labels: pod-template-hash, controller-revision-hash, ...].
    #[arg(long, value_delimiter = ',')]
    pub identity_excluded_labels: Vec<String>,
    /// [logFormat] Log lines as human-readable text or as one JSON object
    /// per line [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// [logLevel] Which log lines to write, as a `tracing` filter (`info`,
    /// `debug`, `lb_agent=debug,kube=warn`...); without it, `RUST_LOG`
    /// [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
}

/// The config file's content: the same settings as [`Args`].
#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Args::node_name`].
    pub node_name: Option<String>,
    /// See [`Args::manifests`].
    pub manifests: Option<PathBuf>,
    /// See [`Args::kubeconfig`].
    pub kubeconfig: Option<PathBuf>,
    /// See [`Args::cgroup`].
    pub cgroup: Option<PathBuf>,
    /// See [`Args::bpffs_dir`].
    pub bpffs_dir: Option<PathBuf>,
    /// See [`Args::metrics_address`].
    pub metrics_address: Option<SocketAddr>,
    /// See [`Args::healthz_address`].
    pub healthz_address: Option<SocketAddr>,
    /// See [`Args::debounce_ms`].
    pub debounce_ms: Option<u64>,
    /// See [`Args::tc_interfaces`].
    #[serde(default)]
    pub tc_interfaces: Vec<String>,
    /// See [`Args::node_port_addresses`].
    #[serde(default)]
    pub node_port_addresses: Vec<IpAddr>,
    /// See [`Args::service_cidrs`].
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<IpNetwork>,
    /// See [`Args::external_ip_cidrs`].
    #[serde(default, rename = "externalIPCIDRs")]
    pub external_ip_cidrs: Vec<IpNetwork>,
    /// See [`Args::localhost_node_ports`].
    pub localhost_node_ports: Option<bool>,
    /// See [`Args::socket_lb`].
    pub socket_lb: Option<bool>,
    /// See [`Args::pod_interfaces`].
    #[serde(default)]
    pub pod_interfaces: Vec<String>,
    /// See [`Args::pod_connected_udp_per_packet`].
    pub pod_connected_udp_per_packet: Option<bool>,
    /// See [`Args::maglev_table_size`].
    pub maglev_table_size: Option<usize>,
    /// See [`Args::xdp_prefilter`].
    pub xdp_prefilter: Option<bool>,
    /// See [`Args::xdp_deny_cidrs`].
    #[serde(default, rename = "xdpDenyCIDRs")]
    pub xdp_deny_cidrs: Vec<IpNetwork>,
    /// See [`Args::maglev_capacity`].
    pub maglev_capacity: Option<u32>,
    /// See [`Args::service_capacity`].
    pub service_capacity: Option<u32>,
    /// See [`Args::backend_capacity`].
    pub backend_capacity: Option<u32>,
    /// See [`Args::backend_slot_capacity`].
    pub backend_slot_capacity: Option<u32>,
    /// See [`Args::map_capacities`]: map name -> capacity.
    #[serde(default)]
    pub map_capacities: BTreeMap<String, u32>,
    /// See [`Args::conntrack_capacity`].
    pub conntrack_capacity: Option<u32>,
    /// See [`Args::unconfirmed_flow_capacity`].
    pub unconfirmed_flow_capacity: Option<u32>,
    /// See [`Args::maglev_seed`].
    pub maglev_seed: Option<u64>,
    /// See [`Args::network_policy`].
    pub network_policy: Option<bool>,
    /// See [`Args::policy_at_connect`].
    pub policy_at_connect: Option<bool>,
    /// See [`Args::policy_mark`].
    pub policy_mark: Option<u32>,
    /// See [`Args::identity_excluded_labels`].
    pub identity_excluded_labels: Option<Vec<String>>,
    /// See [`Args::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`Args::log_level`].
    pub log_level: Option<String>,
}

/// Where intent comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A directory of YAML.
    Manifests(PathBuf),
    /// The Kubernetes API, with an optional kubeconfig path.
    Kubernetes(Option<PathBuf>),
}

/// Resolved settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This node's name.
    pub node_name: Option<String>,
    /// The source of intent.
    pub source: SourceKind,
    /// cgroup to attach to; `None` means the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory.
    pub bpffs_dir: PathBuf,
    /// Metrics address.
    pub metrics_address: SocketAddr,
    /// `/healthz` address.
    pub healthz_address: SocketAddr,
    /// Debounce and poll period in milliseconds.
    pub debounce_ms: u64,
    /// tc interfaces; empty: tc path off.
    pub tc_interfaces: Vec<String>,
    /// Explicit NodePort addresses; empty: those of the tc interfaces.
    pub node_port_addresses: Vec<IpAddr>,
    /// Service CIDRs YAML-mode clusterIPs must be in; empty: any.
    pub service_cidrs: Vec<IpNetwork>,
    /// Ranges externalIPs may use; empty: none.
    pub external_ip_cidrs: Vec<IpNetwork>,
    /// Whether NodePorts also answer on 127.0.0.0/8 in the node's namespace.
    pub localhost_node_ports: bool,
    /// Whether the socket programs are attached.
    pub socket_lb: bool,
    /// Pod interface name prefixes for per-packet ClusterIP translation.
    pub pod_interfaces: Vec<String>,
    /// See [`Args::pod_connected_udp_per_packet`].
    pub pod_connected_udp_per_packet: bool,
    /// Maglev settings.
    pub maglev: MaglevSettings,
    /// Capacities of the tc path's own maps.
    pub tc: TcOptions,
    /// Whether the XDP prefilter runs on the tc interfaces.
    pub xdp_prefilter: bool,
    /// Sources the XDP prefilter drops.
    pub xdp_deny_cidrs: Vec<IpNetwork>,
    /// Whether NetworkPolicy is enforced.
    pub network_policy: bool,
    /// Whether denied connections fail at connect().
    pub policy_at_connect: bool,
    /// The mark bit of packets checked at their source pod.
    pub policy_mark: u32,
    /// Pod label keys left out of identities.
    pub identity_excluded_labels: Vec<String>,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The log filter; `None`: `RUST_LOG`, else `info`.
    pub log_level: Option<String>,
}

impl Settings {
    /// Whether pods' connected UDP sockets are translated per datagram:
    /// asked for, with the socket path on (with it off every pod is served
    /// per packet anyway) and pod programs on pod interfaces (those the
    /// `podInterfaces` prefixes name, and with network policy those of
    /// known pods). The socket programs still translate at `connect()` in
    /// any namespace the agent has not found behind such an interface.
    pub fn pods_connected_udp_per_packet(&self) -> bool {
        self.pod_connected_udp_per_packet
            && self.socket_lb
            && (!self.pod_interfaces.is_empty() || self.network_policy)
    }

    /// Refuses settings the agent cannot work with: a Maglev map without
    /// room for one largest table and the swap of another, a conntrack
    /// table without room for a flow, an XDP prefilter without interfaces.
    /// Warns of a deny list that has no prefilter to use it.
    pub fn check(&self) -> anyhow::Result<()> {
        let largest_table = self.maglev.size as u64 + 1;
        anyhow::ensure!(
            u64::from(self.tc.maglev_capacity) >= 2 * largest_table,
            "maglevCapacity {} is below twice a table of maglevTableSize {} (and its size \
             entry): no Service could change its backends",
            self.tc.maglev_capacity,
            self.maglev.size
        );
        anyhow::ensure!(
            self.tc.conntrack_capacity >= 2 && self.tc.pending_capacity >= 2,
            "conntrackCapacity and unconfirmedFlowCapacity hold two entries per flow: at least 2"
        );
        anyhow::ensure!(
            !self.xdp_prefilter || !self.tc_interfaces.is_empty(),
            "xdpPrefilter attaches to the tc interfaces: set tcInterfaces too"
        );
        if !self.xdp_prefilter && !self.xdp_deny_cidrs.is_empty() {
            tracing::warn!("xdpDenyCIDRs has no effect while xdpPrefilter is off");
        }
        Ok(())
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for the settings.
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, with its location.
        source: Box<serde_saphyr::Error>,
    },
    /// A `mapCapacities` entry names a map it cannot size or an
    /// impossible capacity.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
}

/// Parses `--map-capacity NAME=N`.
fn parse_map_capacity(text: &str) -> Result<(String, u32), String> {
    let (name, capacity) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=N"))?;
    let capacity = capacity
        .parse()
        .map_err(|err| format!("{text:?}: capacity {capacity:?}: {err}"))?;
    Ok((name.to_owned(), capacity))
}

/// Parses a config file's text.
pub fn parse_file(text: &str) -> Result<FileConfig, serde_saphyr::Error> {
    serde_saphyr::from_str(text)
}

/// Reads the config file named by `args`, if any.
pub fn load_file(args: &Args) -> Result<FileConfig, ConfigError> {
    let Some(path) = &args.config else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::Parse {
        path: path.clone(),
        source: Box::new(source),
    })
}

/// Flags win over the file, the file over defaults. Fails on capacities
/// no map can take.
pub fn resolve(args: Args, file: FileConfig) -> Result<Settings, ConfigError> {
    let mut map_capacities = file.map_capacities;
    map_capacities.extend(args.map_capacities);
    let sized = MapCapacities::new(map_capacities)?;
    let manifests = args.manifests.or(file.manifests);
    let source = match manifests {
        Some(dir) => SourceKind::Manifests(dir),
        None => SourceKind::Kubernetes(args.kubeconfig.or(file.kubeconfig)),
    };
    Ok(Settings {
        node_name: args.node_name.or(file.node_name),
        source,
        cgroup: args.cgroup.or(file.cgroup),
        bpffs_dir: args
            .bpffs_dir
            .or(file.bpffs_dir)
            .unwrap_or_else(|| DEFAULT_BPFFS_DIR.into()),
        metrics_address: args
            .metrics_address
            .or(file.metrics_address)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.parse().expect("valid default")),
        healthz_address: args
            .healthz_address
            .or(file.healthz_address)
            .unwrap_or_else(|| DEFAULT_HEALTHZ_ADDRESS.parse().expect("valid default")),
        debounce_ms: args.debounce_ms.or(file.debounce_ms).unwrap_or(100),
        tc_interfaces: non_empty_or(args.tc_interfaces, file.tc_interfaces),
        node_port_addresses: non_empty_or(args.node_port_addresses, file.node_port_addresses),
        service_cidrs: non_empty_or(args.service_cidrs, file.service_cidrs),
        external_ip_cidrs: non_empty_or(args.external_ip_cidrs, file.external_ip_cidrs),
        localhost_node_ports: args
            .localhost_node_ports
            .or(file.localhost_node_ports)
            .unwrap_or(true),
        socket_lb: args.socket_lb.or(file.socket_lb).unwrap_or(true),
        pod_interfaces: non_empty_or(args.pod_interfaces, file.pod_interfaces),
        pod_connected_udp_per_packet: args
            .pod_connected_udp_per_packet
            .or(file.pod_connected_udp_per_packet)
            .unwrap_or(true),
        maglev: MaglevSettings {
            size: args
                .maglev_table_size
                .or(file.maglev_table_size)
                .unwrap_or(MaglevSettings::default().size),
            seed: args
                .maglev_seed
                .or(file.maglev_seed)
                .unwrap_or(MaglevSettings::default().seed),
        },
        tc: TcOptions {
            conntrack_capacity: args
                .conntrack_capacity
                .or(file.conntrack_capacity)
                .unwrap_or(TcOptions::default().conntrack_capacity),
            pending_capacity: args
                .unconfirmed_flow_capacity
                .or(file.unconfirmed_flow_capacity)
                .unwrap_or(TcOptions::default().pending_capacity),
            maglev_capacity: args
                .maglev_capacity
                .or(file.maglev_capacity)
                .unwrap_or(TcOptions::default().maglev_capacity),
            services: ServiceCapacities {
                services: args
                    .service_capacity
                    .or(file.service_capacity)
                    .unwrap_or(ServiceCapacities::default().services),
                backends: args
                    .backend_capacity
                    .or(file.backend_capacity)
                    .unwrap_or(ServiceCapacities::default().backends),
                backend_slots: args
                    .backend_slot_capacity
                    .or(file.backend_slot_capacity)
                    .unwrap_or(ServiceCapacities::default().backend_slots),
            },
            sized,
        },
        xdp_prefilter: args.xdp_prefilter.or(file.xdp_prefilter).unwrap_or(false),
        xdp_deny_cidrs: non_empty_or(args.xdp_deny_cidrs, file.xdp_deny_cidrs),
        network_policy: args.network_policy.or(file.network_policy).unwrap_or(true),
        policy_at_connect: args
            .policy_at_connect
            .or(file.policy_at_connect)
            .unwrap_or(true),
        policy_mark: args.policy_mark.or(file.policy_mark).unwrap_or(0x10),
        identity_excluded_labels: if args.identity_excluded_labels.is_empty() {
            file.identity_excluded_labels
                .unwrap_or_else(|| IdentityConfig::default().excluded)
        } else {
            args.identity_excluded_labels
        },
        log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        log_level: args.log_level.or(file.log_level),
    })
}

/// A mark bit: one bit, in decimal or `0x` hexadecimal, or 0 for none.
fn parse_mark(text: &str) -> Result<u32, String> {
    let value = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| e.to_string())?;
    if value.count_ones() > 1 {
        return Err(format!("{text} is more than one bit"));
    }
    Ok(value)
}

/// A list flag given on the command line replaces the file's list.
fn non_empty_or<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() {
        file
    } else {
        flag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig = parse_file(
            "nodeName: from-file\nbpffsDir: /sys/fs/bpf/x\nmetricsAddress: 127.0.0.1:9000\nmanifests: /etc/lb\n",
        )
        .unwrap();
        let args = Args::parse_from(["lb-agent", "--node-name", "from-flag"]);
        let settings = resolve(args, file).unwrap();
        assert_eq!(settings.node_name.as_deref(), Some("from-flag"));
        assert_eq!(settings.bpffs_dir, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(settings.metrics_address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(settings.healthz_address, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(settings.source, SourceKind::Manifests("/etc/lb".into()));
    }

    #[test]
    fn other_maps_are_sized_by_name_and_unknown_names_are_refused() {
        let file =
            parse_file("mapCapacities:\n  LB_SKNAT_V1: 1048576\n  LB_IPCACHE_V1: 100\n").unwrap();
        let args = Args::parse_from(["lb-agent", "--map-capacity", "LB_IPCACHE_V1=2000000"]);
        let expected = MapCapacities::new(
            [
                ("LB_SKNAT_V1".to_owned(), 1 << 20),
                ("LB_IPCACHE_V1".to_owned(), 2_000_000),
            ]
            .into(),
        )
        .unwrap();
        assert_eq!(resolve(args, file).unwrap().tc.sized, expected);
        let args = Args::parse_from(["lb-agent", "--map-capacity", "LB_SVC_V1=10"]);
        let refused = resolve(args, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("LB_SVC_V1"), "{refused}");
        assert!(Args::try_parse_from(["lb-agent", "--map-capacity", "LB_SKNAT_V1"]).is_err());
    }

    #[test]
    fn map_capacities_come_from_the_file_or_flags() {
        let file = parse_file("maglevCapacity: 1048576\nconntrackCapacity: 524288\n").unwrap();
        let args = Args::parse_from(["lb-agent", "--unconfirmed-flow-capacity", "131072"]);
        let tc = resolve(args, file).unwrap().tc;
        assert_eq!(
            (
                tc.maglev_capacity,
                tc.conntrack_capacity,
                tc.pending_capacity
            ),
            (1_048_576, 524_288, 131_072)
        );
        let file = parse_file("serviceCapacity: 100000\n").unwrap();
        let args = Args::parse_from(["lb-agent", "--backend-capacity", "200000"]);
        let shared = resolve(args, file).unwrap().tc.services;
        assert_eq!((shared.services, shared.backends), (100_000, 200_000));
        let defaults = resolve(Args::parse_from(["lb-agent"]), FileConfig::default())
            .unwrap()
            .tc;
        assert_eq!(defaults, TcOptions::default());
    }

    #[test]
    fn without_manifests_the_source_is_the_api_server() {
        let settings = resolve(Args::parse_from(["lb-agent"]), FileConfig::default()).unwrap();
        assert_eq!(settings.source, SourceKind::Kubernetes(None));
        assert_eq!(settings.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
        assert!(settings.localhost_node_ports, "kube-proxy's default");
        assert_eq!(
            settings.metrics_address,
            "127.0.0.1:10249".parse().unwrap(),
            "metrics and drop reports (client addresses) stay on the node, as kube-proxy's"
        );
    }

    #[test]
    fn service_and_external_ip_cidrs_come_from_the_file_or_flags() {
        let file = parse_file(
            "serviceCIDRs: [10.96.0.0/12, 'fd00:10:96::/112']\nexternalIPCIDRs: [192.0.2.0/24]\n",
        )
        .unwrap();
        let settings = resolve(Args::parse_from(["lb-agent"]), file).unwrap();
        assert_eq!(settings.service_cidrs.len(), 2);
        assert_eq!(
            settings.external_ip_cidrs,
            ["192.0.2.0/24".parse().unwrap()]
        );
        let defaults = resolve(Args::parse_from(["lb-agent"]), FileConfig::default()).unwrap();
        assert!(
            defaults.external_ip_cidrs.is_empty(),
            "no externalIP is allowed by default"
        );
        let args = Args::parse_from(["lb-agent", "--service-cidrs", "10.0.0.0/16"]);
        let settings = resolve(args, FileConfig::default()).unwrap();
        assert_eq!(settings.service_cidrs, ["10.0.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn localhost_node_ports_can_be_turned_off_in_the_file_and_back_on_by_flag() {
        let file = || parse_file("localhostNodePorts: false\n").unwrap();
        let off = resolve(Args::parse_from(["lb-agent"]), file()).unwrap();
        assert!(!off.localhost_node_ports);
        let args = Args::parse_from(["lb-agent", "--localhost-node-ports", "true"]);
        assert!(resolve(args, file()).unwrap().localhost_node_ports);
    }

    #[test]
    fn policy_is_on_by_default_and_its_settings_come_from_the_file() {
        let defaults = resolve(Args::parse_from(["lb-agent"]), FileConfig::default()).unwrap();
        assert!(defaults.network_policy && defaults.policy_at_connect);
        assert!(defaults
            .identity_excluded_labels
            .contains(&"pod-template-hash".to_string()));
        assert_eq!(defaults.policy_mark, 0x10);
        assert_eq!(parse_mark("0x400"), Ok(0x400));
        assert!(parse_mark("0x3").is_err());
        let file = parse_file(
            "networkPolicy: false\npolicyAtConnect: false\nidentityExcludedLabels: [build]\n",
        )
        .unwrap();
        let settings = resolve(Args::parse_from(["lb-agent"]), file).unwrap();
        assert!(!settings.network_policy && !settings.policy_at_connect);
        assert_eq!(settings.identity_excluded_labels, ["build"]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse_file("nodename: x\n").unwrap_err();
        assert!(err.to_string().contains("nodename"), "{err}");
    }
}
