//! Drop events: each new flow the tc programs drop or refuse is reported to
//! the agent through a ring buffer with its tuple and outcome, so an operator
//! can ask why a connection failed. Each CPU sends at most
//! [`REPORTS_PER_SECOND`] a second; what is over that or does not fit is
//! counted in its [`ReportBudget`].

use crate::{assert_layout, conntrack::CtKey, outcome::Outcome};

/// Size of the drop event ring buffer: 3,640 events (64 bytes each plus the
/// kernel's 8-byte record header); the agent drains it every second at least.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Drop reports each CPU may send per second: a flood of dropped packets
/// must not turn into a flood of ring buffer reservations, which all take
/// the ring buffer's lock.
pub const REPORTS_PER_SECOND: u64 = 100;

/// One CPU's drop report budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportBudget {
    /// Start of the current one-second window, `bpf_ktime_get_boot_ns`.
    pub window_start_ns: u64,
    /// Reports sent in the current window.
    pub sent: u64,
    /// Reports not sent since the programs were loaded: over the budget or
    /// the ring buffer full.
    pub lost: u64,
}
assert_layout!(ReportBudget, 24, { window_start_ns: 0, sent: 8, lost: 16 });

impl ReportBudget {
    /// Whether a report at `now_ns` is within the budget, taking it if so.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        if now_ns.wrapping_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now_ns;
            self.sent = 0;
        }
        if self.sent >= REPORTS_PER_SECOND {
            self.lost += 1;
            return false;
        }
        self.sent += 1;
        true
    }
}

/// A new flow the tc path dropped or refused, and why: what the agent logs
/// and serves on `/drops`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// The packet's tuple as it arrived.
    pub tuple: CtKey,
    /// The [`Outcome`] it was counted as, by [`Outcome::index`].
    pub reason: u32,
    /// Service id of the frontend it was for.
    pub service_id: u32,
    /// When, in `bpf_ktime_get_boot_ns` time.
    pub time_ns: u64,
    /// The source's identity, for policy drops (else 0).
    pub src_identity: u32,
    /// The destination's identity, for policy drops (else 0).
    pub dst_identity: u32,
}
assert_layout!(DropEvent, 64, {
    tuple: 0, reason: 40, service_id: 44, time_ns: 48, src_identity: 56, dst_identity: 60,
});

impl DropEvent {
    /// The event a ring buffer record holds; `None` if it is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the slice holds at least `size_of::<DropEvent>()` bytes,
        // the type is repr(C) with explicit padding and valid for any bit
        // pattern, and the unaligned read copes with the record's alignment.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The outcome it reports, unless the code is unknown to this version.
    pub const fn outcome(&self) -> Option<Outcome> {
        Outcome::from_index(self.reason)
    }
}

#[cfg(feature = "user")]
crate::user_pod!(ReportBudget, DropEvent);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{v4_mapped, PROTO_TCP};

    #[test]
    fn each_cpu_sends_a_bounded_number_of_reports_per_second() {
        let second = 1_000_000_000;
        let mut budget = ReportBudget::default();
        let start = 5 * second;
        let sent = (0..REPORTS_PER_SECOND + 30)
            .filter(|i| budget.take(start + i))
            .count() as u64;
        assert_eq!((sent, budget.lost), (REPORTS_PER_SECOND, 30));
        // A new window, a new budget; what was lost stays counted.
        assert!(budget.take(start + second));
        assert_eq!((budget.sent, budget.lost), (1, 30));
        assert!(budget.take(start + second + 1));
    }

    #[test]
    fn events_decode_from_the_bytes_the_kernel_wrote() {
        let event = DropEvent {
            tuple: CtKey::new(
                v4_mapped(u32::from_ne_bytes([192, 0, 2, 1])),
                v4_mapped(u32::from_ne_bytes([192, 0, 2, 2])),
                1234u16.to_be(),
                80u16.to_be(),
                PROTO_TCP,
            ),
            reason: Outcome::DropSourceRange.index(),
            service_id: 7,
            time_ns: 99,
            src_identity: 300,
            dst_identity: 2,
        };
        // SAFETY: a live value viewed as its own bytes.
        let bytes: [u8; 64] = unsafe { core::mem::transmute(event) };
        // A record at an odd offset, as a ring buffer may hand it over.
        let mut shifted = [0u8; 65];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(DropEvent::from_bytes(&shifted[1..]), Some(event));
        assert_eq!(DropEvent::from_bytes(&bytes[..63]), None);
        assert_eq!(event.outcome(), Some(Outcome::DropSourceRange));
    }
}
