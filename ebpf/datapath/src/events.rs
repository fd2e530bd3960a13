//! Drop events: each new flow the programs drop or refuse is also reported
//! to the agent with its tuple and outcome, so an operator can ask why a
//! connection failed. Only the drop paths pay for it, and each CPU reports at
//! most `REPORTS_PER_SECOND` a second.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, helpers::bpf_ktime_get_boot_ns};
use lb_common::{conntrack::CtKey, events::DropEvent, outcome::Outcome};

use crate::maps::{EVENTS, REPORT_BUDGET};

/// Reports that a packet of `tuple` for frontend `service_id` (0: none) was
/// dropped or refused, counted as `outcome`; for policy drops, with the
/// identities of its source and destination (else 0). Over the budget, or with the ring buffer
/// full, the report is counted as lost instead. Not inlined: one copy serves
/// every drop site, so the new-flow path every connection takes does not
/// carry nine.
#[inline(never)]
pub fn report(
    outcome: Outcome,
    tuple: &CtKey,
    service_id: u32,
    src_identity: u32,
    dst_identity: u32,
) {
    let Some(budget) = REPORT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: this CPU's slot of a successful lookup; programs do not
    // migrate between CPUs while they run.
    let budget = unsafe { &mut *budget };
    if !budget.take(now) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        budget.lost += 1;
        return;
    };
    entry.write(DropEvent {
        tuple: *tuple,
        reason: outcome.index(),
        service_id,
        time_ns: now,
        src_identity,
        dst_identity,
    });
    // The agent polls; waking it per event would cost an interrupt each.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}
