//! The maps of the tc programs, pinned by name. The frontend and backend maps
//! are the socket path's (same definitions, same pinned names), so one agent
//! write serves both; the others are described in `lb_common::tc`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    tc::{
        CtGcState, CtKey, CtValue, FragKey, FragPorts, MaglevKey, RejectBudget, ReportBudget,
        SourceRangeKey, TcAffinityKey, TcConfig, EVENTS_BYTES, MAX_CONNTRACK, MAX_FRAGMENTS,
        MAX_MAGLEV_ENTRIES, MAX_POD_INTERFACES, MAX_SOURCE_RANGES, STATS_LEN,
    },
    AffinityValue, Backend, ServiceKey, ServiceValue, MAX_AFFINITY, MAX_BACKENDS, MAX_SERVICES,
};

/// Frontends (shared with the socket path; the tc programs only look up
/// `SCOPE_TC_EXTERNAL` keys).
#[map(name = "LB_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

/// Backends by id (shared with the socket path).
#[map(name = "LB_BE_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

/// Maglev tables by generation, allocated on demand.
#[map(name = "LB_MAGLEV_V1")]
pub static MAGLEV: HashMap<MaglevKey, u32> = HashMap::pinned(MAX_MAGLEV_ENTRIES, BPF_F_NO_PREALLOC);

/// Conntrack: two entries per translated flow.
#[map(name = "LB_CT_V2")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);

/// The ports of fragmented datagrams, recorded from their first fragment so
/// that the later ones, which carry no L4 header, find their flow.
#[map(name = "LB_FRAG_V1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// The budget of answers to packets for frontends without endpoints.
#[map(name = "LB_RJBUDGET_V1")]
pub static REJECT_BUDGET: Array<RejectBudget> = Array::with_max_entries(1, 0);

/// The conntrack garbage collector's request and result.
#[map(name = "LB_CTGC_V1")]
pub static CT_GC: Array<CtGcState> = Array::with_max_entries(1, 0);

/// Session affinity: the backend each client address last got per frontend.
#[map(name = "LB_TCAFF_V1")]
pub static AFFINITY: LruHashMap<TcAffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// loadBalancerSourceRanges by service id.
#[map(name = "LB_SRCRANGE_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

/// Node configuration (one entry).
#[map(name = "LB_TCCFG_V1")]
pub static CONFIG: Array<TcConfig> = Array::pinned(1, 0);

/// Host ends of pod veth pairs, by ifindex.
#[map(name = "LB_PODIF_V1")]
pub static POD_INTERFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_POD_INTERFACES, 0);

/// Drop events for the agent ([`crate::events`]).
#[map(name = "LB_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Each CPU's drop report budget.
#[map(name = "LB_EVBUDGET_V1")]
pub static REPORT_BUDGET: PerCpuArray<ReportBudget> = PerCpuArray::with_max_entries(1, 0);

/// Counters, indexed by `STAT_*`.
#[map(name = "LB_TCSTAT_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

/// Adds one to counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of a successful lookup; programs do not
        // migrate between CPUs while they run.
        unsafe { *counter += 1 };
    }
}
