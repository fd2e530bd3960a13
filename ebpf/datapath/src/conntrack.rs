//! Conntrack: two LRU entries per translated flow (client side and backend
//! side), each saying how to rewrite the packets it matches. Both are
//! refreshed by the packets of either direction, so they age together. A
//! flow's entries start in [`CT_PENDING`] and move to [`CONNTRACK`] once the
//! flow is confirmed (see `lb_common::conntrack`).

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_for_each_map_elem, programs::TcContext};
use lb_common::{
    conntrack::{
        next_state, reset_in_window, CtGcState, CtKey, CtPendingValue, CtStep, CtValue,
        CT_FLAG_PENDING, CT_FLAG_REPLY, CT_STATE_CLOSING, CT_STATE_NEW, NEXT_HOP_NONE,
    },
    net::{PROTO_TCP, TCP_ACK, TCP_SYN},
    outcome::Outcome,
};

use crate::{
    events,
    maps::{count, BACKENDS, CONNTRACK, CT_GC, CT_PENDING},
    parse::{addr_eq, Packet},
};

/// Offset of the sequence number in a TCP header.
const TCP_SEQ_OFF: usize = 4;
/// Offset of the acknowledgment number in a TCP header.
const TCP_ACK_OFF: usize = 8;

/// The state of a new flow's entries after its first packet.
#[inline(always)]
pub fn initial_state(proto: u8, tcp_flags: u8) -> u8 {
    next_state(CT_STATE_NEW, proto, tcp_flags)
}

/// Whether an entry still applies to a packet: not expired, not a closed
/// TCP connection whose tuple a new SYN reuses, and, for a client entry,
/// its backend still present with the same address and port (a deleted
/// backend's flows pick a new one).
#[inline(always)]
fn applies(value: &CtValue, pkt: &Packet, now: u64) -> bool {
    if value.expired(pkt.tuple.proto, now) {
        return false;
    }
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if value.state == CT_STATE_CLOSING && syn_only {
        return false;
    }
    if value.flags & CT_FLAG_REPLY != 0 {
        return true;
    }
    // SAFETY: copied out at once.
    match unsafe { BACKENDS.get(value.backend_id) } {
        Some(backend) => {
            addr_eq(&backend.addr, &value.new_daddr) && backend.port == value.new_dport
        }
        None => false,
    }
}

/// The conntrack entry for this packet's tuple, if it still applies (see
/// [`applies`]). When the entry is due for a refresh (see [`touch`]) its
/// partner is checked too: one the LRU evicted under pressure is put back,
/// so that the other direction of a live flow is translated again.
///
/// A call of its own, returning a pointer: its frame is not added to the
/// new-flow path's share of the 512-byte stack.
#[inline(never)]
pub fn lookup(pkt: &Packet, now: u64) -> Option<*mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(&pkt.tuple)?;
    // SAFETY: a pointer from a successful lookup; the value is plain data,
    // copied out at once.
    let value = unsafe { *entry };
    if !applies(&value, pkt, now) {
        return None;
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

/// The unconfirmed flow's entry for this packet, if it still applies. The
/// backend's SYN-ACK records the acknowledgment number that completes the
/// handshake on the client's entry; the client's ACK carrying it, or a UDP
/// flow's first answer, confirms the flow ([`confirm`]). Called when
/// [`lookup`] found nothing, not from it: their frames do not add up.
#[inline(never)]
pub fn pending(ctx: &TcContext, pkt: &Packet, now: u64) -> Option<*mut CtValue> {
    let slot = CT_PENDING.get_ptr_mut(&pkt.tuple)?;
    // SAFETY: a pointer from a successful lookup, read in this program run;
    // not copied: this frame is on the deepest call chain.
    let value = unsafe { &(*slot).entry };
    if !applies(value, pkt, now) {
        return None;
    }
    let tcp = pkt.tuple.proto == PROTO_TCP;
    if value.flags & CT_FLAG_REPLY != 0 {
        if !tcp {
            return confirm(&pkt.tuple, value, now);
        }
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            let seq = ctx.load::<u32>(pkt.l4_off + TCP_SEQ_OFF).ok()?;
            let client_key = value.apply(&pkt.tuple).reversed();
            if let Some(client) = CT_PENDING.get_ptr_mut(&client_key) {
                // SAFETY: a pointer from a successful lookup; plain stores.
                unsafe {
                    (*client).expected_ack = u32::from_be(seq).wrapping_add(1);
                    (*client).answered = 1;
                }
            }
        }
    } else if tcp {
        // SAFETY: as above.
        let answered = unsafe { (*slot).answered } == 1;
        if answered {
            let ack = ctx.load::<u32>(pkt.l4_off + TCP_ACK_OFF).ok()?;
            // SAFETY: as above.
            if unsafe { (*slot).confirmed_by(pkt.tcp_flags, u32::from_be(ack)) } {
                return confirm(&pkt.tuple, value, now);
            }
        }
    }
    Some(slot.cast::<CtValue>())
}

/// Moves a confirmed flow's entries, `value` of `tuple` and its partner,
/// from the unconfirmed flows to the conntrack table; returns the one of
/// `tuple` there.
#[inline(never)]
fn confirm(tuple: &CtKey, value: &CtValue, now: u64) -> Option<*mut CtValue> {
    let partner_key = value.apply(tuple).reversed();
    // One buffer for both entries: this frame is on the deepest call chain.
    let mut moved = match CT_PENDING.get_ptr(&partner_key) {
        // SAFETY: a pointer from a successful lookup; copied out at once.
        Some(found) => unsafe { (*found).entry },
        None => value.partner(tuple, now),
    };
    moved.flags &= !CT_FLAG_PENDING;
    let partner_moved = CONNTRACK.insert(&partner_key, &moved, 0).is_ok();
    moved = *value;
    moved.flags &= !CT_FLAG_PENDING;
    if !partner_moved || CONNTRACK.insert(tuple, &moved, 0).is_err() {
        count(Outcome::ConntrackInsertFailed);
        return None;
    }
    let _ = CT_PENDING.remove(&partner_key);
    let _ = CT_PENDING.remove(tuple);
    count(Outcome::FlowConfirmed);
    CONNTRACK.get_ptr_mut(tuple)
}

/// Whether `pkt` is a TCP reset of the confirmed flow of `entry` that no
/// endpoint sent: its sequence number is not near the acknowledgment number
/// the other side last sent (recorded on the partner entry, see
/// [`CtValue::peer_ack`]). Such a reset is counted and reported, and must be
/// dropped: the flow keeps its state. A call of its own, off the
/// translation's frame, made for packets with the RST flag only.
#[inline(never)]
pub fn blind_reset(ctx: &TcContext, pkt: &Packet, entry: *mut CtValue) -> bool {
    if pkt.tuple.proto != PROTO_TCP {
        return false;
    }
    // SAFETY: a pointer from a successful lookup; fields read at once.
    let value = unsafe { &*entry };
    if value.flags & CT_FLAG_PENDING != 0 {
        return false;
    }
    let Ok(seq) = ctx.load::<u32>(pkt.l4_off + TCP_SEQ_OFF) else {
        return false;
    };
    let receiver = value.apply(&pkt.tuple).reversed();
    let Some(partner) = CONNTRACK.get_ptr(&receiver) else {
        return false;
    };
    // SAFETY: as above.
    if reset_in_window(u32::from_be(seq), unsafe { (*partner).peer_ack }) {
        return false;
    }
    count(Outcome::DropResetOutOfWindow);
    events::report(
        Outcome::DropResetOutOfWindow,
        &pkt.tuple,
        value.service_id,
        0,
        0,
    );
    true
}

/// The pointer to an entry of the table `flags` says it is in.
#[inline(always)]
fn entry_in_its_table(key: &CtKey, flags: u8) -> Option<*mut CtValue> {
    if flags & CT_FLAG_PENDING != 0 {
        CT_PENDING.get_ptr_mut(key).map(|p| p.cast::<CtValue>())
    } else {
        CONNTRACK.get_ptr_mut(key)
    }
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
    if let Some(partner) = entry_in_its_table(&rewritten.reversed(), seen.flags) {
        // SAFETY: as above.
        unsafe {
            (*partner).last_seen_ns = now;
            (*partner).state = step.state;
            (*partner).fins = step.fins;
        }
    }
}

/// Deletes a closed flow's entries (with `flags`): the one of `tuple` and
/// its partner, keyed by the `rewritten` tuple reversed.
#[inline(always)]
pub fn forget(tuple: &CtKey, rewritten: &CtKey, flags: u8) {
    if flags & CT_FLAG_PENDING != 0 {
        let _ = CT_PENDING.remove(tuple);
        let _ = CT_PENDING.remove(&rewritten.reversed());
    } else {
        let _ = CONNTRACK.remove(tuple);
        let _ = CONNTRACK.remove(&rewritten.reversed());
    }
}

/// Deletes the entries expired at the time the agent put in [`CT_GC`], of
/// the service conntrack, the unconfirmed flows and the policy conntrack,
/// and writes back how many
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
    // SAFETY: as above, for the unconfirmed flows.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::addr_of!(CT_PENDING) as *mut c_void,
            visit_pending as *const () as *mut c_void,
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

/// One entry of the unconfirmed flows in a [`collect`] walk; 0 continues.
///
/// # Safety
///
/// As [`visit`], for the map of unconfirmed flows.
unsafe extern "C" fn visit_pending(
    _map: *mut c_void,
    key: *const CtKey,
    value: *const CtPendingValue,
    walk: *mut CtGcState,
) -> u64 {
    // SAFETY: see the function's contract; copied to the stack.
    let (key, entry) = unsafe { (*key, (*value).entry) };
    // SAFETY: as above.
    let walk = unsafe { &mut *walk };
    if entry.expired(key.proto, walk.now_ns) {
        if CT_PENDING.remove(&key).is_ok() {
            walk.pending_deleted += 1;
        }
    } else {
        walk.pending_live += 1;
    }
    0
}
