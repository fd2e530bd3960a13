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
    // The agent flips a frontend to a new slot generation before deleting the
    // old one; a reader caught between its two lookups retries once and then
    // sees the new generation.
    match select_once(key) {
        Some(lookup) => lookup,
        None => select_once(key).unwrap_or(Lookup::NoBackends),
    }
}

/// One attempt; `None` when a slot or backend vanished under a concurrent update.
#[inline(always)]
fn select_once(key: &ServiceKey) -> Option<Lookup> {
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Some(Lookup::NotAService);
    };
    if service.backend_count == 0 {
        return Some(Lookup::NoBackends);
    }
    // SAFETY: a BPF helper without arguments or side effects on memory.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        generation: service.slot_generation,
        slot: random % service.backend_count,
    };
    // SAFETY: as above, values are copied out immediately.
    let backend_id = (unsafe { BACKEND_SLOTS.get(&slot) }).copied()?;
    // SAFETY: as above.
    let backend = (unsafe { BACKENDS.get(&backend_id) }).copied()?;
    Some(Lookup::Backend {
        service_id: service.service_id,
        backend,
    })
}
