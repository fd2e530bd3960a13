//! The maps of the tc programs. The frontend and backend maps are the socket
//! path's (same names, same pins), so one agent write serves both; the others
//! are described where their types live in `lb_common`. Names come from
//! `lb_common::maps` through [`kernel_map!`].

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    affinity::{AffinityValue, TcAffinityKey},
    config::TcConfig,
    conntrack::{CtGcState, CtKey, CtPendingValue, CtValue},
    events::{ReportBudget, EVENTS_BYTES},
    fragment::{FragKey, FragPorts},
    kernel_map,
    maglev::MaglevKey,
    maps::{
        MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_CT_PENDING, MAX_FRAGMENTS,
        MAX_FRONTEND_ADDRS, MAX_IDENTITIES, MAX_IPCACHE, MAX_MAGLEV_ENTRIES, MAX_POD_INTERFACES,
        MAX_POLICY_CT, MAX_POLICY_RULES, MAX_POLICY_SETS, MAX_SERVICES, MAX_SOURCE_RANGES,
        MAX_XDP_DENY, STATS_LEN,
    },
    net::Addr,
    outcome::Outcome,
    policy::{IdentityValue, PolicyCtValue, PolicyName, PolicySetValue},
    reject::RejectBudget,
    service::{Backend, ServiceKey, ServiceValue},
    source_range::SourceRangeKey,
};

kernel_map!(
    SERVICES,
    /// Frontends (shared with the socket path; the tc programs only look up
    /// tc scopes).
    pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
);

kernel_map!(
    BACKENDS,
    /// Backends by id (shared with the socket path).
    pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);
);

kernel_map!(
    MAGLEV,
    /// Maglev tables by generation, allocated on demand.
    pub static MAGLEV: HashMap<MaglevKey, u32> =
        HashMap::pinned(MAX_MAGLEV_ENTRIES, BPF_F_NO_PREALLOC);
);

kernel_map!(
    CONNTRACK,
    /// Conntrack: two entries per translated flow.
    pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);
);

kernel_map!(
    CT_PENDING,
    /// Flows not confirmed yet: two entries each, until the handshake
    /// completes or the backend answers.
    pub static CT_PENDING: LruHashMap<CtKey, CtPendingValue> =
        LruHashMap::pinned(MAX_CT_PENDING, 0);
);

kernel_map!(
    FRONTEND_ADDRS,
    /// Addresses that are nothing but tc frontends.
    pub static FRONTEND_ADDRS: HashMap<Addr, u32> = HashMap::pinned(MAX_FRONTEND_ADDRS, 0);
);

kernel_map!(
    XDP_DENY,
    /// Sources the XDP prefilter drops.
    pub static XDP_DENY: LpmTrie<Addr, u32> = LpmTrie::pinned(MAX_XDP_DENY, 0);
);

kernel_map!(
    FRAGMENTS,
    /// The ports of fragmented datagrams, recorded from their first fragment
    /// so that the later ones, which carry no L4 header, find their flow.
    pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
        LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);
);

kernel_map!(
    REJECT_BUDGET,
    /// The budget of answers to packets for frontends without endpoints.
    pub static REJECT_BUDGET: Array<RejectBudget> = Array::with_max_entries(1, 0);
);

kernel_map!(
    CT_GC,
    /// The conntrack garbage collector's request and result.
    pub static CT_GC: Array<CtGcState> = Array::with_max_entries(1, 0);
);

kernel_map!(
    TC_AFFINITY,
    /// Session affinity: the backend each client address last got per frontend.
    pub static TC_AFFINITY: LruHashMap<TcAffinityKey, AffinityValue> =
        LruHashMap::pinned(MAX_AFFINITY, 0);
);

kernel_map!(
    SOURCE_RANGES,
    /// loadBalancerSourceRanges by service id.
    pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);
);

kernel_map!(
    TC_CONFIG,
    /// Node configuration (one entry).
    pub static CONFIG: Array<TcConfig> = Array::pinned(1, 0);
);

kernel_map!(
    POD_INTERFACES,
    /// Host ends of pod veth pairs, by ifindex.
    pub static POD_INTERFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_POD_INTERFACES, 0);
);

kernel_map!(
    EVENTS,
    /// Drop events for the agent ([`crate::events`]).
    pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
);

kernel_map!(
    REPORT_BUDGET,
    /// Each CPU's drop report budget.
    pub static REPORT_BUDGET: PerCpuArray<ReportBudget> = PerCpuArray::with_max_entries(1, 0);
);

lb_common::shared_policy_maps!();

kernel_map!(
    POLICY_CT,
    /// Flows' policy verdicts: two entries per flow.
    pub static POLICY_CT: LruHashMap<CtKey, PolicyCtValue> = LruHashMap::pinned(MAX_POLICY_CT, 0);
);

kernel_map!(
    IDENTITIES,
    /// The agent's identities, for adoption after a restart and display;
    /// the programs do not read it.
    pub static IDENTITIES: HashMap<u32, IdentityValue> =
        HashMap::pinned(MAX_IDENTITIES, BPF_F_NO_PREALLOC);
);

kernel_map!(
    POLICY_SETS,
    /// The agent's policy sets, for adoption; the programs do not read it.
    pub static POLICY_SETS: HashMap<u32, PolicySetValue> =
        HashMap::pinned(MAX_POLICY_SETS, BPF_F_NO_PREALLOC);
);

kernel_map!(
    POLICY_RULES,
    /// Rule names, for `lbctl`; the programs do not read it.
    pub static POLICY_RULES: HashMap<u32, PolicyName> =
        HashMap::pinned(MAX_POLICY_RULES, BPF_F_NO_PREALLOC);
);

kernel_map!(
    POD_NAMES,
    /// The names of the cluster's pods by address, for `lbctl`; the
    /// programs do not read it.
    pub static POD_NAMES: HashMap<Addr, PolicyName> =
        HashMap::pinned(MAX_IPCACHE, BPF_F_NO_PREALLOC);
);

kernel_map!(
    TC_STATS,
    /// Counters, indexed by [`Outcome::index`].
    pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);
);

/// Counts one `outcome`.
#[inline(always)]
pub fn count(outcome: Outcome) {
    if let Some(counter) = STATS.get_ptr_mut(outcome.index()) {
        // SAFETY: a per-CPU slot of a successful lookup; programs do not
        // migrate between CPUs while they run.
        unsafe { *counter += 1 };
    }
}
