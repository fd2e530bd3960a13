//! Service lookup and backend selection, shared by every hook and both families.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Backend, ServiceKey, SlotKey};

use crate::maps::{BACKENDS, BACKEND_SLOTS, SERVICES};

/// What a destination address turned out to be.
pub enum Lookup {
    /// Not a frontend: leave the socket alone.
    NotAService,
    /// A frontend without usable backends: the caller must refuse the connection.
    NoBackends,
    /// A frontend and the backend picked for this connection.
    Backend {
        /// Service id of the frontend, for reverse translation.
        service_id: u32,
        /// The chosen backend.
        backend: Backend,
    },
}

/// Looks up `key` and picks one of its backends uniformly at random.
#[inline(always)]
pub fn select(key: &ServiceKey) -> Lookup {
    // SAFETY: the value is copied out at once; a concurrent update by the agent
    // replaces whole entries, and a torn read only yields another valid generation.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Lookup::NotAService;
    };
    if service.backend_count == 0 {
        return Lookup::NoBackends;
    }
    // SAFETY: a BPF helper without arguments or side effects on memory.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        generation: service.slot_generation,
        slot: random % service.backend_count,
    };
    // SAFETY: as above, values are copied out immediately.
    let Some(backend_id) = (unsafe { BACKEND_SLOTS.get(&slot) }).copied() else {
        return Lookup::NoBackends;
    };
    // SAFETY: as above.
    match unsafe { BACKENDS.get(&backend_id) } {
        Some(backend) => Lookup::Backend {
            service_id: service.service_id,
            backend: *backend,
        },
        None => Lookup::NoBackends,
    }
}
