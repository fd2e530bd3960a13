//! Session affinity (`sessionAffinity: ClientIP`): which backend a client
//! last got from a frontend, and when. The socket path keys clients by
//! network namespace, the tc path by address.

use crate::{assert_layout, net::Addr};

/// Key of a session affinity entry of the socket path: one client of one
/// frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client: its network namespace cookie. Each pod has its own network
    /// namespace, hence its own address, so this is kube-proxy's "ClientIP".
    pub client: u64,
    /// Service id of the frontend.
    pub service_id: u32,
    /// Explicit padding.
    pub pad: u32,
}
assert_layout!(AffinityKey, 16, { client: 0, service_id: 8, pad: 12 });

/// Key of a session affinity entry of the tc path: one client address of one
/// frontend, kube-proxy's `ClientIP` (the address the packet arrived with,
/// before any SNAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcAffinityKey {
    /// Client address (IPv4-mapped for IPv4), network byte order.
    pub client: Addr,
    /// Service id of the frontend.
    pub service_id: u32,
}
assert_layout!(TcAffinityKey, 20, { client: 0, service_id: 16 });

/// Which backend a client was last sent to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend.
    pub backend_id: u32,
    /// Explicit padding.
    pub pad: u32,
    /// `bpf_ktime_get_ns` (socket path) or `bpf_ktime_get_boot_ns` (tc path)
    /// of the client's last new connection.
    pub last_used_ns: u64,
}
assert_layout!(AffinityValue, 16, { backend_id: 0, pad: 4, last_used_ns: 8 });

impl AffinityValue {
    /// Whether the client still sticks to its backend at `now_ns` (same
    /// clock as `last_used_ns`) under a timeout of `timeout_s` seconds.
    #[inline(always)]
    pub const fn holds(&self, now_ns: u64, timeout_s: u32) -> bool {
        now_ns.wrapping_sub(self.last_used_ns) <= timeout_s as u64 * 1_000_000_000
    }
}

#[cfg(feature = "user")]
crate::user_pod!(AffinityKey, TcAffinityKey, AffinityValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_holds_until_the_timeout() {
        let second = 1_000_000_000;
        let value = AffinityValue {
            backend_id: 1,
            pad: 0,
            last_used_ns: 10 * second,
        };
        assert!(value.holds(10 * second, 5));
        assert!(value.holds(15 * second, 5));
        assert!(!value.holds(15 * second + 1, 5));
    }
}
