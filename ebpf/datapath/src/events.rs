//! Drop events: each new flow the programs drop or refuse is also reported
//! to the agent with its tuple and reason, so an operator can ask why a
//! connection failed. Only the drop paths pay for it.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, helpers::bpf_ktime_get_boot_ns};
use lb_common::tc::{CtKey, DropEvent};

use crate::maps::{EVENTS, EVENTS_LOST};

/// Reports that a packet of `tuple` for frontend `service_id` was dropped or
/// refused, counted in `reason`. A full ring buffer counts the event as lost.
#[inline(always)]
pub fn report(reason: u32, tuple: &CtKey, service_id: u32) {
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a successful lookup; programs do
            // not migrate between CPUs while they run.
            unsafe { *lost += 1 };
        }
        return;
    };
    entry.write(DropEvent {
        tuple: *tuple,
        reason,
        service_id,
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
    });
    // The agent polls; waking it per event would cost an interrupt each.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}
