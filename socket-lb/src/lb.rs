//! Service lookup and backend selection, shared by every hook and both families.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    affinity::{AffinityKey, AffinityValue},
    service::{
        Backend, ServiceKey, ServiceValue, SlotKey, SERVICE_FLAG_AFFINITY,
        SERVICE_FLAG_NO_LOCAL_BACKENDS,
    },
};

use crate::maps::{AFFINITY, BACKENDS, BACKEND_SLOTS, ROUND_ROBIN, SERVICES};

/// What a destination address turned out to be.
pub enum Lookup {
    /// Not a frontend: leave the socket alone.
    NotAService,
    /// A frontend without any endpoint: refuse, as kube-proxy's REJECT does.
    NoBackends,
    /// A frontend whose endpoints are all on other nodes while its traffic
    /// policy is Local: kube-proxy drops such traffic.
    NoLocalBackends,
    /// A frontend and the backend picked for this connection.
    Backend {
        /// Service id of the frontend, for reverse translation.
        service_id: u32,
        /// The chosen backend.
        backend: Backend,
    },
}

/// Looks up `key` and picks a backend for a connection of `client` (its
/// network namespace cookie, asked for only under session affinity): the
/// affine backend when session affinity holds, otherwise the next one in
/// per-CPU round-robin order.
#[inline(always)]
pub fn select(key: &ServiceKey, client: impl Fn() -> u64) -> Lookup {
    // The agent flips a frontend to a new slot generation before deleting the
    // old one; a reader caught between its lookups retries once and then sees
    // the new generation.
    match select_once(key, &client) {
        Some(lookup) => lookup,
        None => select_once(key, &client).unwrap_or(Lookup::NoBackends),
    }
}

/// One attempt; `None` when a slot or backend vanished under a concurrent update.
#[inline(always)]
fn select_once(key: &ServiceKey, client: &impl Fn() -> u64) -> Option<Lookup> {
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Some(Lookup::NotAService);
    };
    if service.backend_count == 0 {
        if service.flags & SERVICE_FLAG_NO_LOCAL_BACKENDS != 0 {
            return Some(Lookup::NoLocalBackends);
        }
        return Some(Lookup::NoBackends);
    }
    if service.flags & SERVICE_FLAG_AFFINITY == 0 {
        let (_, backend) = next_backend(&service)?;
        return Some(Lookup::Backend {
            service_id: service.service_id,
            backend,
        });
    }
    let affinity = AffinityKey {
        client: client(),
        service_id: service.service_id,
        pad: 0,
    };
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(backend) = affine_backend(&affinity, &service, now) {
        return Some(backend);
    }
    let (backend_id, backend) = next_backend(&service)?;
    let value = AffinityValue {
        backend_id,
        pad: 0,
        last_used_ns: now,
    };
    // A full LRU evicts its oldest entry: that client just loses affinity.
    let _ = AFFINITY.insert(&affinity, &value, 0);
    Some(Lookup::Backend {
        service_id: service.service_id,
        backend,
    })
}

/// The backend at this CPU's next round-robin position of `service`.
#[inline(always)]
fn next_backend(service: &ServiceValue) -> Option<(u32, Backend)> {
    let slot = SlotKey {
        generation: service.slot_generation,
        slot: next_position(service.service_id) % service.backend_count,
    };
    // SAFETY: values are copied out immediately.
    let backend_id = (unsafe { BACKEND_SLOTS.get(&slot) }).copied()?;
    // SAFETY: as above.
    let backend = (unsafe { BACKENDS.get(&backend_id) }).copied()?;
    Some((backend_id, backend))
}

/// The backend this client used within the affinity timeout, refreshed.
/// The agent deletes entries whose backend left the service.
#[inline(always)]
fn affine_backend(key: &AffinityKey, service: &ServiceValue, now: u64) -> Option<Lookup> {
    let entry = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; entries are plain data
    // and a concurrent update of the same client only races on a timestamp.
    let value = unsafe { *entry };
    if !value.holds(now, service.affinity_timeout_s) {
        return None;
    }
    let backend_id = value.backend_id;
    // SAFETY: copied out at once.
    let backend = (unsafe { BACKENDS.get(&backend_id) }).copied()?;
    // SAFETY: as above; kube-proxy's `recent` match also refreshes on every use.
    unsafe { (*entry).last_used_ns = now };
    Some(Lookup::Backend {
        service_id: service.service_id,
        backend,
    })
}

/// This CPU's next round-robin position for a service, starting at a random
/// point so CPUs and agents restarts do not all begin on the same backend.
#[inline(always)]
fn next_position(service_id: u32) -> u32 {
    if let Some(position) = ROUND_ROBIN.get_ptr_mut(&service_id) {
        // SAFETY: per-CPU value of a successful lookup; BPF programs do not
        // migrate between CPUs while they run.
        unsafe {
            let current = *position;
            *position = current.wrapping_add(1);
            return current;
        }
    }
    // SAFETY: a BPF helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    let _ = ROUND_ROBIN.insert(&service_id, &start.wrapping_add(1), 0);
    start
}
