//! Conntrack: two LRU entries per translated flow (client side and backend
//! side), each saying how to rewrite the packets it matches. Both are
//! refreshed by the packets of either direction, so they age together.

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_for_each_map_elem};
use lb_common::{
    conntrack::{
        next_state, CtGcState, CtKey, CtStep, CtValue, CT_FLAG_REPLY, CT_STATE_CLOSING,
        CT_STATE_NEW, NEXT_HOP_NONE,
    },
    net::{TCP_ACK, TCP_SYN},
};

use crate::{
    maps::{BACKENDS, CONNTRACK, CT_GC},
    parse::{addr_eq, Packet},
};

/// The state of a new flow's entries after its first packet.
#[inline(always)]
pub fn initial_state(proto: u8, tcp_flags: u8) -> u8 {
    next_state(CT_STATE_NEW, proto, tcp_flags)
}

/// The entry for this packet's tuple, if it still applies: not expired, not
/// a closed TCP connection whose tuple a new SYN reuses, and, for a client
/// entry, its backend still present with the same address and port (a
/// deleted backend's flows pick a new one). When the entry is due for a
/// refresh (see [`touch`]) its partner is checked too: one the LRU evicted
/// under pressure is put back, so that the other direction of a live flow
/// (the SYN-ACK of a retransmitted SYN, say) is translated again.
///
/// A call of its own, returning a pointer: its frame is not added to the
/// new-flow path's share of the 512-byte stack.
#[inline(never)]
pub fn lookup(pkt: &Packet, now: u64) -> Option<*mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(&pkt.tuple)?;
    // SAFETY: a pointer from a successful lookup; the value is plain data,
    // copied out at once.
    let value = unsafe { *entry };
    if value.expired(pkt.tuple.proto, now) {
        return None;
    }
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if value.state == CT_STATE_CLOSING && syn_only {
        return None;
    }
    if value.flags & CT_FLAG_REPLY == 0 {
        // SAFETY: copied out at once.
        let backend = unsafe { BACKENDS.get(value.backend_id) }.copied()?;
        if !addr_eq(&backend.addr, &value.new_daddr) || backend.port != value.new_dport {
            return None;
        }
    }
    if now.wrapping_sub(value.last_seen_ns) >= REFRESH_INTERVAL_NS {
        let partner_key = value.apply(&pkt.tuple).reversed();
        if CONNTRACK.get_ptr_mut(&partner_key).is_none() {
            let partner = value.partner(&pkt.tuple, now);
            // Never over another flow's entry (an SNAT port taken since).
            let _ = CONNTRACK.insert(&partner_key, &partner, BPF_NOEXIST as u64);
        }
    }
    Some(entry)
}

/// Whether the next hop `value` remembers may be used at `now`: one was
/// found, and the entry is not due for a refresh. The packet that refreshes
/// an entry asks the FIB again, so a changed route or neighbour reaches a
/// flow within [`REFRESH_INTERVAL_NS`] of its packets.
#[inline(always)]
pub fn next_hop_fresh(value: &CtValue, now: u64) -> bool {
    value.hop != NEXT_HOP_NONE && now.wrapping_sub(value.last_seen_ns) < REFRESH_INTERVAL_NS
}

/// How stale an entry's timestamp may get before a packet refreshes it.
/// Timeouts count in seconds; writing both entries on every packet would
/// cost a second lookup and bounce their cache lines between the CPUs of
/// the two directions.
const REFRESH_INTERVAL_NS: u64 = 1_000_000_000;

/// Records a packet on an entry (`seen` is its value as looked up) and on
/// its partner, the entry of the other direction, whose key is the
/// rewritten tuple reversed: at once on a change of state or FIN bits, else
/// at most once per [`REFRESH_INTERVAL_NS`].
#[inline(always)]
pub fn touch(entry: *mut CtValue, seen: &CtValue, step: &CtStep, rewritten: &CtKey, now: u64) {
    if step.state == seen.state
        && step.fins == seen.fins
        && now.wrapping_sub(seen.last_seen_ns) < REFRESH_INTERVAL_NS
    {
        return;
    }
    // SAFETY: a pointer from a successful lookup; concurrent packets of the
    // same flow only race on the timestamp, state and FIN bits, all plain
    // stores.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).state = step.state;
        (*entry).fins = step.fins;
    }
    if let Some(partner) = CONNTRACK.get_ptr_mut(&rewritten.reversed()) {
        // SAFETY: as above.
        unsafe {
            (*partner).last_seen_ns = now;
            (*partner).state = step.state;
            (*partner).fins = step.fins;
        }
    }
}

/// Deletes a closed flow's entries: the one of `tuple` and its partner,
/// keyed by the `rewritten` tuple reversed.
#[inline(always)]
pub fn forget(tuple: &CtKey, rewritten: &CtKey) {
    let _ = CONNTRACK.remove(tuple);
    let _ = CONNTRACK.remove(&rewritten.reversed());
}

/// Deletes the entries expired at the time the agent put in [`CT_GC`], of
/// the service conntrack and the policy conntrack, and writes back how many
/// were kept and deleted. Walking the table in the
/// kernel costs a fraction of what a walk with two syscalls per entry
/// costs the agent.
#[inline(always)]
pub fn collect() {
    let Some(state) = CT_GC.get_ptr_mut(0) else {
        return;
    };
    let mut walk = CtGcState {
        // SAFETY: a pointer from a successful lookup of a one-entry array.
        now_ns: unsafe { (*state).now_ns },
        ..CtGcState::default()
    };
    // SAFETY: the map pointer is the address of a map definition (the
    // loader relocates it), the callback has the signature the kernel calls
    // it with, and `walk` outlives the call.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::addr_of!(CONNTRACK) as *mut c_void,
            visit as *const () as *mut c_void,
            (&mut walk as *mut CtGcState).cast(),
            0,
        );
    }
    crate::policy::collect(&mut walk);
    // SAFETY: as above.
    unsafe { *state = walk };
}

/// One conntrack entry of a [`collect`] walk; 0 continues the walk.
///
/// # Safety
///
/// Called by the kernel only, with valid key and value pointers of the
/// conntrack map and the `CtGcState` passed to `bpf_for_each_map_elem`.
unsafe extern "C" fn visit(
    _map: *mut c_void,
    key: *const CtKey,
    value: *const CtValue,
    walk: *mut CtGcState,
) -> u64 {
    // SAFETY: see the function's contract; both are copied to the stack.
    let (key, value) = unsafe { (*key, *value) };
    // SAFETY: as above.
    let walk = unsafe { &mut *walk };
    if value.expired(key.proto, walk.now_ns) {
        // Deleting the visited element is allowed for hash maps.
        if CONNTRACK.remove(&key).is_ok() {
            walk.deleted += 1;
        }
    } else {
        walk.live += 1;
    }
    0
}
