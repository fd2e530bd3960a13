//! Frontend lookup, loadBalancerSourceRanges and Maglev backend selection.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    tc::{MaglevKey, SourceRangeKey, MAGLEV_SIZE_INDEX, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL},
    Addr, Backend, ServiceKey, ServiceValue,
};

use crate::{
    maps::{BACKENDS, MAGLEV, SERVICES, SOURCE_RANGES},
    parse::Packet,
};

/// The frontend this packet is addressed to: an external one (NodePort,
/// ExternalIP, LoadBalancer IP), else a ClusterIP served per packet.
#[inline(always)]
pub fn frontend(pkt: &Packet) -> (ServiceKey, Option<ServiceValue>) {
    let mut key = ServiceKey {
        addr: pkt.tuple.daddr,
        port: pkt.tuple.dport,
        proto: pkt.tuple.proto,
        scope: SCOPE_TC_EXTERNAL,
    };
    // SAFETY: copied out at once; the agent replaces whole entries.
    if let Some(value) = unsafe { SERVICES.get(&key) }.copied() {
        return (key, Some(value));
    }
    key.scope = SCOPE_TC_CLUSTER;
    // SAFETY: as above.
    let value = unsafe { SERVICES.get(&key) }.copied();
    (key, value)
}

/// Whether `saddr` is in one of the source ranges of `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, saddr: &Addr) -> bool {
    let key = Key::new(
        32 + 128,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: *saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Picks the backend at `hash` in the frontend's current Maglev table.
///
/// The agent flips a frontend to a new table generation before deleting the
/// old one; a reader caught between its lookups re-reads the frontend once
/// and then sees the new generation.
#[inline(always)]
pub fn select(key: &ServiceKey, service: &ServiceValue, hash: u32) -> Option<(u32, Backend)> {
    if let Some(found) = select_once(service.slot_generation, hash) {
        return Some(found);
    }
    // SAFETY: copied out at once.
    let service = unsafe { SERVICES.get(key) }.copied()?;
    select_once(service.slot_generation, hash)
}

/// One attempt on one table generation.
#[inline(always)]
fn select_once(generation: u32, hash: u32) -> Option<(u32, Backend)> {
    let size_key = MaglevKey {
        generation,
        index: MAGLEV_SIZE_INDEX,
    };
    // SAFETY: values are copied out at once.
    let size = unsafe { MAGLEV.get(&size_key) }.copied()?;
    if size == 0 {
        return None;
    }
    let slot = MaglevKey {
        generation,
        index: hash % size,
    };
    // SAFETY: as above.
    let backend_id = unsafe { MAGLEV.get(&slot) }.copied()?;
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(&backend_id) }.copied()?;
    Some((backend_id, backend))
}
