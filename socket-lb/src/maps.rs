//! The maps the socket programs read, pinned by name so the agent, `lbctl` and a
//! restarted agent all see the same kernel objects. Names must match
//! `lb_common::map_names` (the agent fails loudly if one is missing).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use lb_common::{
    backend_port_bit, AffinityKey, AffinityValue, Backend, RevNat, ServiceKey, ServiceName,
    ServiceValue, SlotKey, SockConfig, SockRevNatKey, BACKEND_PORT_WORDS, MAX_AFFINITY,
    MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_OPT_OUT, MAX_SERVICES, MAX_SOCK_REV_NAT, SOCK_STATS_LEN,
};

#[map(name = "LB_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "LB_SLOT_V1")]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_BACKEND_SLOTS, 0);

#[map(name = "LB_BE_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

#[map(name = "LB_REVNAT_V1")]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "LB_SKNAT_V1")]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, RevNat> =
    LruHashMap::pinned(MAX_SOCK_REV_NAT, 0);

/// Written by the agent before the backend of a new port becomes reachable.
#[map(name = "LB_BEPORT_V1")]
pub static BACKEND_PORTS: Array<u64> = Array::pinned(BACKEND_PORT_WORDS, 0);

/// Whether a socket whose peer has `port` may have been translated: false
/// spares [`SOCK_REV_NAT`] the lookup (an array read the verifier inlines).
#[inline(always)]
pub fn maybe_translated(port: u16) -> bool {
    let (word, bit) = backend_port_bit(port);
    BACKEND_PORTS
        .get(word)
        .is_some_and(|&ports| ports & bit != 0)
}

#[map(name = "LB_SVCNAME_V1")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "LB_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "LB_RR_V1")]
pub static ROUND_ROBIN: LruPerCpuHashMap<u32, u32> = LruPerCpuHashMap::pinned(MAX_SERVICES, 0);

#[map(name = "LB_OPTOUT_V1")]
pub static OPT_OUT: HashMap<u64, u32> = HashMap::pinned(MAX_OPT_OUT, 0);

/// Entries in [`OPT_OUT`], written by the agent after changing it.
#[map(name = "LB_OPTCNT_V1")]
pub static OPT_OUT_COUNT: Array<u32> = Array::pinned(1, 0);

/// Written by the agent before it attaches the programs.
#[map(name = "LB_SKCFG_V1")]
pub static SOCK_CONFIG: Array<SockConfig> = Array::with_max_entries(1, 0);

/// Refusals, indexed by `SOCK_STAT_*`.
#[map(name = "LB_SKSTAT_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SOCK_STATS_LEN, 0);

/// Adds one to counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of a successful lookup; programs do not
        // migrate between CPUs while they run.
        unsafe { *counter += 1 };
    }
}
