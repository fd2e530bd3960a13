//! Every map's name and capacity, spelled once. The kernel crates declare
//! their maps with [`kernel_map!`](crate::kernel_map), which takes the name
//! from the table below; the agent and `lbctl` open pinned maps by the same
//! constants.
//!
//! A name carries the version of its map's layout (`_V1`, `_V2`...): a
//! change of key or value layout, or of the capacity of an array, gets a new
//! version, so a new agent never reuses a pinned map of the older layout; it
//! builds the new one, and removes the older pin once its own programs are
//! attached (carrying entries over where flows depend on them, as for
//! [`CONNTRACK_V2`]). The kernel limits names to 15 bytes.

use crate::{outcome::OUTCOME_SLOTS, socket::BACKEND_PORT_WORDS};

/// Declares the name constants, the list of them, and the
/// [`kernel_map!`](crate::kernel_map) macro that declares a kernel map under
/// one of them. `$d` is a `$` token: the nested macro needs metavariables of
/// its own.
macro_rules! map_names {
    ($d:tt $( $(#[$doc:meta])* $id:ident = $name:literal; )*) => {
        $( $(#[$doc])* pub const $id: &str = $name; )*

        /// Every map name of this version.
        pub const ALL: &[&str] = &[$($name),*];

        /// Declares a kernel map under the name of entry `NAME` of
        /// `lb_common::maps`, so that the name is spelled once:
        /// `kernel_map!(SERVICES, pub static SERVICES: HashMap<K, V> = HashMap::pinned(..););`
        /// (what aya's `#[map(name = "...")]` expands to).
        #[macro_export]
        macro_rules! kernel_map {
            $(
                ($id, $d(#[$d attr:meta])* $d vis:vis static $d item:ident : $d ty:ty = $d init:expr;) => {
                    $d(#[$d attr])*
                    #[unsafe(link_section = "maps")]
                    #[unsafe(export_name = $name)]
                    $d vis static $d item: $d ty = $d init;
                };
            )*
        }
    };
}

map_names! { $
    // Shared by the socket and tc programs.

    /// Frontends: [`ServiceKey`](crate::service::ServiceKey) ->
    /// [`ServiceValue`](crate::service::ServiceValue).
    SERVICES = "LB_SVC_V1";
    /// Backends by id: `u32` -> [`Backend`](crate::service::Backend).
    BACKENDS = "LB_BE_V1";

    // Socket programs.

    /// Backend slots: [`SlotKey`](crate::service::SlotKey) -> backend id.
    BACKEND_SLOTS = "LB_SLOT_V1";
    /// Reverse NAT by service id: `u32` -> [`RevNat`](crate::service::RevNat).
    REV_NAT = "LB_REVNAT_V1";
    /// Per-socket reverse translation of translated sockets (connected ones
    /// until they are released, and one entry per backend an unconnected UDP
    /// socket sent to): [`SockRevNatKey`](crate::socket::SockRevNatKey) ->
    /// [`RevNat`](crate::service::RevNat).
    SOCK_REV_NAT = "LB_SKNAT_V1";
    /// Every port a backend has had since the map was created, as a bitmap
    /// of [`BACKEND_PORT_WORDS`] `u64` words (see
    /// [`backend_port_bit`](crate::socket::backend_port_bit)). Only a socket
    /// whose peer port is in it can have a reverse translation, so the socket
    /// programs skip the [`SOCK_REV_NAT`] lookup for every other socket.
    /// Bits are never cleared: a socket keeps its reverse translation after
    /// its backend left the Service.
    BACKEND_PORTS = "LB_BEPORT_V1";
    /// Human-readable service names for `lbctl`: `u32` ->
    /// [`ServiceName`](crate::service::ServiceName).
    SERVICE_NAMES = "LB_SVCNAME_V1";
    /// Session affinity: [`AffinityKey`](crate::affinity::AffinityKey) ->
    /// [`AffinityValue`](crate::affinity::AffinityValue).
    AFFINITY = "LB_AFF_V1";
    /// Per-CPU round-robin position per service id.
    ROUND_ROBIN = "LB_RR_V1";
    /// cgroups whose sockets are not translated: cgroup id (`u64`) -> `u32` (1).
    OPT_OUT = "LB_OPTOUT_V1";
    /// How many entries [`OPT_OUT`] has: array of one `u32`. While it is 0
    /// the socket programs skip the opt-out lookup.
    OPT_OUT_COUNT = "LB_OPTCNT_V1";
    /// Network namespaces of this node's pods whose interface carries the
    /// pod programs, where a connected UDP socket is left on its ClusterIP
    /// and translated per datagram: netns cookie (`u64`) -> `u32` (1).
    POD_NETNS = "LB_PODNS_V1";
    /// Counters of the socket programs: per-CPU array of [`OUTCOME_SLOTS`]
    /// `u64`, indexed by [`Outcome::index`](crate::outcome::Outcome::index).
    /// Not pinned: the counters restart with the agent.
    SOCK_STATS = "LB_SKSTAT_V2";
    /// How the socket programs serve this node: array of one
    /// [`SockConfig`](crate::config::SockConfig). Not pinned: the agent
    /// writes it before attaching.
    SOCK_CONFIG = "LB_SKCFG_V1";

    // tc programs.

    /// Maglev tables: [`MaglevKey`](crate::maglev::MaglevKey) -> backend id (`u32`).
    MAGLEV = "LB_MAGLEV_V1";
    /// Conntrack: [`CtKey`](crate::conntrack::CtKey) ->
    /// [`CtValue`](crate::conntrack::CtValue).
    CONNTRACK = "LB_CT_V3";
    /// Conntrack of agents from before resets were checked against the
    /// acknowledgment numbers: [`CtKey`](crate::conntrack::CtKey) ->
    /// [`CtValueV2`](crate::conntrack::CtValueV2). A new agent carries its
    /// flows over into [`CONNTRACK`] and removes it.
    CONNTRACK_V2 = "LB_CT_V2";
    /// Flows not confirmed yet (see [`crate::conntrack`]): LRU of
    /// [`CtKey`](crate::conntrack::CtKey) ->
    /// [`CtPendingValue`](crate::conntrack::CtPendingValue).
    CT_PENDING = "LB_CTNEW_V1";
    /// Addresses that are nothing but tc frontends (LoadBalancer IPs and
    /// externalIPs, not node addresses): `Addr` -> `u32` (1). A TCP, UDP or
    /// SCTP packet to one whose headers the parser cannot read is dropped.
    FRONTEND_ADDRS = "LB_FEADDR_V1";
    /// Sources the XDP prefilter drops on the uplinks: LPM trie of `Addr`
    /// (IPv4-mapped for IPv4, so an IPv4 `/n` is a `/96+n`) -> `u32` (1).
    XDP_DENY = "LB_XDPDENY_V1";
    /// loadBalancerSourceRanges: LPM trie of
    /// [`SourceRangeKey`](crate::source_range::SourceRangeKey) -> `u32` (1).
    SOURCE_RANGES = "LB_SRCRANGE_V1";
    /// Node configuration: array of one [`TcConfig`](crate::config::TcConfig).
    TC_CONFIG = "LB_TCCFG_V1";
    /// Counters of the tc programs: per-CPU array of [`OUTCOME_SLOTS`] `u64`,
    /// indexed by [`Outcome::index`](crate::outcome::Outcome::index).
    TC_STATS = "LB_TCSTAT_V2";
    /// Session affinity of per-packet flows: LRU of
    /// [`TcAffinityKey`](crate::affinity::TcAffinityKey) ->
    /// [`AffinityValue`](crate::affinity::AffinityValue).
    TC_AFFINITY = "LB_TCAFF_V1";
    /// Conntrack garbage collection request and result: array of one
    /// [`CtGcState`](crate::conntrack::CtGcState). Not pinned: each loaded
    /// object has its own.
    CT_GC = "LB_CTGC_V1";
    /// Ports of fragmented datagrams: LRU of
    /// [`FragKey`](crate::fragment::FragKey) ->
    /// [`FragPorts`](crate::fragment::FragPorts). Not pinned.
    FRAGMENTS = "LB_FRAG_V1";
    /// The budget of answers to packets for frontends without endpoints:
    /// array of one [`RejectBudget`](crate::reject::RejectBudget). Not pinned.
    REJECT_BUDGET = "LB_RJBUDGET_V1";
    /// Why new flows were dropped or refused: a ring buffer of
    /// [`EVENTS_BYTES`](crate::events::EVENTS_BYTES) holding
    /// [`DropEvent`](crate::events::DropEvent)s, read by the agent. Not pinned.
    EVENTS = "LB_EVENTS_V1";
    /// Each CPU's drop report budget and the reports it could not send:
    /// per-CPU array of one [`ReportBudget`](crate::events::ReportBudget).
    /// Not pinned.
    REPORT_BUDGET = "LB_EVBUDGET_V1";
    /// Pod interfaces (host ends): ifindex (`u32`) -> `POD_INTERFACE_*`
    /// bits (see [`crate::config`]). A translated packet whose FIB egress is
    /// a veth or netkit host end is handed straight to the pod's side with
    /// `bpf_redirect_peer`. Not pinned: the agent fills each loaded object's
    /// own as it attaches to pod interfaces.
    POD_INTERFACES = "LB_PODIF_V1";

    // Policy (see crate::policy).

    /// Address or prefix to identities: LPM trie of
    /// [`IpcacheKey`](crate::policy::IpcacheKey) ->
    /// [`IpcacheValue`](crate::policy::IpcacheValue).
    IPCACHE = "LB_IPCACHE_V1";
    /// This node's pods by address: `Addr` ->
    /// [`EndpointValue`](crate::policy::EndpointValue).
    ENDPOINTS = "LB_EP_V1";
    /// What policy sets allow: LPM trie of
    /// [`PolicyKey`](crate::policy::PolicyKey) ->
    /// [`PolicyValue`](crate::policy::PolicyValue).
    POLICY = "LB_POLICY_V1";
    /// Flows' verdicts: LRU of [`CtKey`](crate::conntrack::CtKey) ->
    /// [`PolicyCtValue`](crate::policy::PolicyCtValue), two entries per flow.
    POLICY_CT = "LB_POLCT_V2";
    /// The policy revision: array of one
    /// [`PolicyState`](crate::policy::PolicyState).
    POLICY_STATE = "LB_POLSTATE_V1";
    /// Identities for adoption and display: `u32` ->
    /// [`IdentityValue`](crate::policy::IdentityValue).
    IDENTITIES = "LB_IDENT_V1";
    /// Policy sets for adoption: `u32` ->
    /// [`PolicySetValue`](crate::policy::PolicySetValue).
    POLICY_SETS = "LB_POLSET_V1";
    /// Rule names, for `lbctl`: `u32` ->
    /// [`PolicyName`](crate::policy::PolicyName).
    POLICY_RULES = "LB_POLRULE_V1";
    /// The names of the cluster's pods by address, for `lbctl`: `Addr` ->
    /// [`PolicyName`](crate::policy::PolicyName).
    POD_NAMES = "LB_PODNAME_V1";
    /// This node's pods by cgroup, for the socket programs' early refusal:
    /// cgroup id (`u64`) -> the pod's address (`Addr`).
    CGROUP_ENDPOINTS = "LB_CGEP_V1";
}

/// Declares the policy maps that both BPF objects read, with one
/// definition (the first object loaded creates the pins, the other reuses
/// them, so the definitions must agree): [`IPCACHE`], [`ENDPOINTS`],
/// [`POLICY`] and [`POLICY_STATE`]. Expands in a kernel crate, where
/// `aya_ebpf` is in scope.
#[macro_export]
macro_rules! shared_policy_maps {
    () => {
        $crate::kernel_map!(
            IPCACHE,
            /// Address or prefix to identities, every pod of the cluster included.
            pub static IPCACHE: aya_ebpf::maps::LpmTrie<
                $crate::policy::IpcacheKey,
                $crate::policy::IpcacheValue,
            > = aya_ebpf::maps::LpmTrie::pinned($crate::maps::MAX_IPCACHE, 0);
        );

        $crate::kernel_map!(
            ENDPOINTS,
            /// This node's pods by address.
            pub static ENDPOINTS: aya_ebpf::maps::HashMap<
                $crate::net::Addr,
                $crate::policy::EndpointValue,
            > = aya_ebpf::maps::HashMap::pinned($crate::maps::MAX_ENDPOINTS, 0);
        );

        $crate::kernel_map!(
            POLICY,
            /// What each policy set allows.
            pub static POLICY: aya_ebpf::maps::LpmTrie<
                $crate::policy::PolicyKey,
                $crate::policy::PolicyValue,
            > = aya_ebpf::maps::LpmTrie::pinned($crate::maps::MAX_POLICY_ENTRIES, 0);
        );

        $crate::kernel_map!(
            POLICY_STATE,
            /// The policy revision and flags (one entry).
            pub static POLICY_STATE: aya_ebpf::maps::Array<$crate::policy::PolicyState> =
                aya_ebpf::maps::Array::pinned(1, 0);
        );
    };
}

/// Capacity of [`SERVICES`], [`REV_NAT`], [`SERVICE_NAMES`] and [`ROUND_ROBIN`].
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of [`BACKENDS`].
pub const MAX_BACKENDS: u32 = 131_072;
/// Capacity of [`BACKEND_SLOTS`]. Sized for every service at 8 backends on
/// average plus a second generation of the largest services during a swap.
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
/// Capacity of [`SOCK_REV_NAT`].
pub const MAX_SOCK_REV_NAT: u32 = 262_144;
/// Capacity of [`BACKEND_PORTS`]: one bit per port.
pub const BACKEND_PORTS_LEN: u32 = BACKEND_PORT_WORDS;
/// Capacity of [`OPT_OUT`].
pub const MAX_OPT_OUT: u32 = 65_536;
/// Capacity of [`POD_NETNS`]: pods of one node (Kubernetes' own limit per
/// node is 110 by default, a few hundred in practice).
pub const MAX_POD_NETNS: u32 = 16_384;
/// Capacity of [`AFFINITY`] and [`TC_AFFINITY`].
pub const MAX_AFFINITY: u32 = 131_072;
/// Entries of [`SOCK_STATS`] and [`TC_STATS`].
pub const STATS_LEN: u32 = OUTCOME_SLOTS;
/// Capacity of [`MAGLEV`] (entries, all tables and generations together).
/// Allocated on demand (`BPF_F_NO_PREALLOC`): 256 tables at the default
/// M = 16381, or 16,000 tables of M = 251.
pub const MAX_MAGLEV_ENTRIES: u32 = 1 << 22;
/// Default capacity of [`CONNTRACK`] (two entries per flow); the agent may
/// create it with another.
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Default capacity of [`CT_PENDING`] (two entries per unconfirmed flow);
/// the agent may create it with another.
pub const MAX_CT_PENDING: u32 = 1 << 16;
/// Capacity of [`FRONTEND_ADDRS`].
pub const MAX_FRONTEND_ADDRS: u32 = 16_384;
/// Capacity of [`XDP_DENY`]: denied prefixes.
pub const MAX_XDP_DENY: u32 = 16_384;
/// Capacity of [`SOURCE_RANGES`].
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Capacity of [`FRAGMENTS`]: datagrams whose fragments are in flight.
pub const MAX_FRAGMENTS: u32 = 8_192;
/// Capacity of [`POD_INTERFACES`].
pub const MAX_POD_INTERFACES: u32 = 16_384;
/// Default capacity of [`IPCACHE`] and [`POD_NAMES`]: every pod address of
/// a 150,000-pod dual-stack cluster, node addresses and policy CIDRs.
pub const MAX_IPCACHE: u32 = 524_288;
/// Capacity of [`ENDPOINTS`]: addresses of this node's pods.
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Default capacity of [`POLICY`], all policy sets together.
pub const MAX_POLICY_ENTRIES: u32 = 524_288;
/// Default capacity of [`POLICY_CT`] (two entries per flow).
pub const MAX_POLICY_CT: u32 = 1 << 18;
/// Capacity of [`IDENTITIES`]: every 16-bit identity.
pub const MAX_IDENTITIES: u32 = 65_536;
/// Capacity of [`POLICY_SETS`].
pub const MAX_POLICY_SETS: u32 = 65_536;
/// Capacity of [`POLICY_RULES`].
pub const MAX_POLICY_RULES: u32 = 131_072;
/// Capacity of [`CGROUP_ENDPOINTS`].
pub const MAX_CGROUP_ENDPOINTS: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_the_kernel() {
        for (i, name) in ALL.iter().enumerate() {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
            assert!(
                name.starts_with("LB_"),
                "{name}: the agent's stale pin cleanup owns LB_*"
            );
            assert!(!ALL[i + 1..].contains(name), "{name} is listed twice");
        }
    }
}
