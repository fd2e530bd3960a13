//! Frontend lookup, loadBalancerSourceRanges, session affinity, Maglev
//! backend selection, and packets to frontends the parser gave up on.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use lb_common::{
    affinity::{AffinityValue, TcAffinityKey},
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    net::{v4_mapped, Addr},
    service::{
        Backend, ServiceKey, ServiceValue, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL,
        SERVICE_FLAG_AFFINITY,
    },
    source_range::{SourceRangeKey, SOURCE_RANGE_ID_BITS},
};

use crate::{
    maps::{BACKENDS, FRONTEND_ADDRS, MAGLEV, SERVICES, SOURCE_RANGES, TC_AFFINITY},
    parse::{has_ports, Ipv4Hdr, Ipv6Hdr, Packet, ETH_LEN, ETH_P_IP, ETH_P_IPV6},
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

/// Whether a packet the parser gave up on may be a TCP, UDP or SCTP packet
/// (or an IPv6 one behind extension headers) to an address that is nothing
/// but a frontend: passed on, it would reach the stack untranslated, past
/// the frontend's loadBalancerSourceRanges. A call of its own: rare.
#[inline(never)]
pub fn unparsed_for_frontend(ctx: &TcContext) -> bool {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return false;
    };
    let (daddr, maybe_flow) = match u16::from_be(ethertype) {
        ETH_P_IP => match ctx.load::<Ipv4Hdr>(ETH_LEN) {
            Ok(ip) => (v4_mapped(ip.daddr), has_ports(ip.proto)),
            Err(_) => return false,
        },
        ETH_P_IPV6 => match ctx.load::<Ipv6Hdr>(ETH_LEN) {
            // Hop-by-hop, routing, fragment, destination options.
            Ok(ip) => (
                ip.daddr,
                has_ports(ip.next_header) || matches!(ip.next_header, 0 | 43 | 44 | 60),
            ),
            Err(_) => return false,
        },
        _ => return false,
    };
    maybe_flow && FRONTEND_ADDRS.get_ptr(&daddr).is_some()
}

/// Whether `saddr` is in one of the source ranges of `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, saddr: &Addr) -> bool {
    let key = Key::new(
        SOURCE_RANGE_ID_BITS + 128,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: *saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend of a new flow from `client`. Under session affinity (ClientIP)
/// it is the backend this client got from the frontend within the timeout,
/// as kube-proxy's `recent` match does, and every pick is remembered;
/// otherwise, and for a client without a live entry, the Maglev pick.
#[inline(always)]
pub fn choose(
    key: &ServiceKey,
    service: &ServiceValue,
    client: &Addr,
    hash: u32,
    now: u64,
) -> Option<(u32, Backend)> {
    if service.flags & SERVICE_FLAG_AFFINITY == 0 {
        return select(key, service, hash);
    }
    let affinity = TcAffinityKey {
        client: *client,
        service_id: service.service_id,
    };
    if let Some(found) = affine_backend(&affinity, service, now) {
        return Some(found);
    }
    let found = select(key, service, hash)?;
    let value = AffinityValue {
        backend_id: found.0,
        pad: 0,
        last_used_ns: now,
    };
    // A full LRU evicts its oldest entry: that client just loses affinity.
    let _ = TC_AFFINITY.insert(&affinity, &value, 0);
    Some(found)
}

/// The backend `key`'s client used within the affinity timeout, refreshed.
/// The agent deletes entries whose backend left the service.
#[inline(always)]
fn affine_backend(key: &TcAffinityKey, service: &ServiceValue, now: u64) -> Option<(u32, Backend)> {
    let entry = TC_AFFINITY.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; entries are plain
    // data and concurrent flows of one client only race on a timestamp.
    let value = unsafe { *entry };
    if !value.holds(now, service.affinity_timeout_s) {
        return None;
    }
    let backend_id = value.backend_id;
    // SAFETY: copied out at once.
    let backend = unsafe { BACKENDS.get(&backend_id) }.copied()?;
    // SAFETY: as above; the timeout counts from the client's last new flow.
    unsafe { (*entry).last_used_ns = now };
    Some((backend_id, backend))
}

/// Picks the backend at `hash` in the frontend's current Maglev table.
///
/// The agent flips a frontend to a new table generation before deleting the
/// old one; a reader caught between its lookups re-reads the frontend once
/// and then sees the new generation.
#[inline(always)]
fn select(key: &ServiceKey, service: &ServiceValue, hash: u32) -> Option<(u32, Backend)> {
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
