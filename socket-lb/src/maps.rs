//! The maps the socket programs read, pinned by name so the agent, `lbctl` and a
//! restarted agent all see the same kernel objects. Names must match
//! `lb_common::maps`, which [`kernel_map!`] takes them from.

use aya_ebpf::maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray};
use lb_common::{
    affinity::{AffinityKey, AffinityValue},
    config::SockConfig,
    kernel_map,
    maps::{
        BACKEND_PORTS_LEN, MAX_AFFINITY, MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_CGROUP_ENDPOINTS,
        MAX_OPT_OUT, MAX_POD_NETNS, MAX_SERVICES, MAX_SOCK_REV_NAT, STATS_LEN,
    },
    net::Addr,
    outcome::Outcome,
    service::{Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey},
    socket::{backend_port_bit, SockRevNatKey},
};

kernel_map!(
    SERVICES,
    pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
);

kernel_map!(
    BACKEND_SLOTS,
    pub static BACKEND_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_BACKEND_SLOTS, 0);
);

kernel_map!(
    BACKENDS,
    pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);
);

kernel_map!(
    REV_NAT,
    pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(MAX_SERVICES, 0);
);

kernel_map!(
    SOCK_REV_NAT,
    pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, RevNat> =
        LruHashMap::pinned(MAX_SOCK_REV_NAT, 0);
);

kernel_map!(
    BACKEND_PORTS,
    /// Written by the agent before the backend of a new port becomes reachable.
    pub static BACKEND_PORTS: Array<u64> = Array::pinned(BACKEND_PORTS_LEN, 0);
);

/// Whether a socket whose peer has `port` may have been translated: false
/// spares [`SOCK_REV_NAT`] the lookup (an array read the verifier inlines).
#[inline(always)]
pub fn maybe_translated(port: u16) -> bool {
    let (word, bit) = backend_port_bit(port);
    BACKEND_PORTS
        .get(word)
        .is_some_and(|&ports| ports & bit != 0)
}

kernel_map!(
    SERVICE_NAMES,
    pub static SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(MAX_SERVICES, 0);
);

kernel_map!(
    AFFINITY,
    pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
        LruHashMap::pinned(MAX_AFFINITY, 0);
);

kernel_map!(
    ROUND_ROBIN,
    pub static ROUND_ROBIN: LruPerCpuHashMap<u32, u32> = LruPerCpuHashMap::pinned(MAX_SERVICES, 0);
);

kernel_map!(
    OPT_OUT,
    pub static OPT_OUT: HashMap<u64, u32> = HashMap::pinned(MAX_OPT_OUT, 0);
);

kernel_map!(
    OPT_OUT_COUNT,
    /// Entries in [`OPT_OUT`], written by the agent after changing it.
    pub static OPT_OUT_COUNT: Array<u32> = Array::pinned(1, 0);
);

kernel_map!(
    POD_NETNS,
    /// Pods' network namespaces whose connected UDP sockets are translated
    /// per datagram on their interface, by cookie.
    pub static POD_NETNS: HashMap<u64, u32> = HashMap::pinned(MAX_POD_NETNS, 0);
);

kernel_map!(
    SOCK_CONFIG,
    /// Written by the agent before it attaches the programs.
    pub static SOCK_CONFIG: Array<SockConfig> = Array::with_max_entries(1, 0);
);

kernel_map!(
    SOCK_STATS,
    /// Refusals, indexed by [`Outcome::index`].
    pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);
);

lb_common::shared_policy_maps!();

kernel_map!(
    CGROUP_ENDPOINTS,
    /// The address of the pod each cgroup of this node's pods belongs to,
    /// for the refusal at `connect()` of what its egress policy denies.
    pub static CGROUP_ENDPOINTS: HashMap<u64, Addr> = HashMap::pinned(MAX_CGROUP_ENDPOINTS, 0);
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
