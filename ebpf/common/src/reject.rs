//! The budget of answers (TCP resets, ICMP port unreachables) the tc path
//! sends to packets for frontends without endpoints.

use crate::assert_layout;

/// Answers per second, after a burst of [`REJECT_BURST`]: the kernel's own
/// `icmp_msgs_per_sec` and `icmp_msgs_burst` defaults, so that a flood to
/// such a frontend, perhaps with a spoofed source, is not reflected as a
/// flood of answers.
pub const REJECT_RATE_PER_SEC: u64 = 1_000;
/// Answers sent at once before [`REJECT_RATE_PER_SEC`] applies.
pub const REJECT_BURST: u64 = 50;

/// The token bucket of answers, in nanoseconds of credit (one answer costs
/// `1e9 / REJECT_RATE_PER_SEC`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBudget {
    /// Credit left, at most [`REJECT_BURST`] answers' worth.
    pub credit_ns: u64,
    /// `bpf_ktime_get_boot_ns` of the last refill.
    pub last_ns: u64,
}
assert_layout!(RejectBudget, 16, { credit_ns: 0, last_ns: 8 });

impl RejectBudget {
    /// Credit of one answer.
    pub const COST_NS: u64 = 1_000_000_000 / REJECT_RATE_PER_SEC;

    /// Refills the bucket up to `now_ns` and takes one answer's credit if
    /// there is enough; whether the answer may be sent.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns;
        let full = REJECT_BURST * Self::COST_NS;
        let credit = self.credit_ns.saturating_add(elapsed);
        self.credit_ns = if credit > full { full } else { credit };
        if self.credit_ns < Self::COST_NS {
            return false;
        }
        self.credit_ns -= Self::COST_NS;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_budget_allows_a_burst_then_the_rate() {
        let mut budget = RejectBudget::default();
        let start = 10_000_000_000;
        let answered = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(answered as u64, REJECT_BURST);
        // 10 ms later: 10 more at 1,000 per second.
        let later = start + 10_000_000;
        let answered = (0..100).filter(|_| budget.take(later)).count();
        assert_eq!(answered, 10);
    }
}
