//! Egress policy at `connect()` and `sendmsg()`: a pod whose egress policy
//! denies the (translated) destination gets EPERM at once, instead of a SYN
//! the tc program drops and a connect that times out. The tc program stays
//! the authority: this is an early answer, not the enforcement.
//!
//! While no pod of the node is isolated for egress (or the agent was told
//! not to), one array read is all it costs ([`POLICY_STATE_AT_CONNECT`]).

use aya_ebpf::{helpers::bpf_get_current_cgroup_id, maps::lpm_trie::Key};
use lb_common::{
    net::Addr,
    policy::{
        allowed_by, IpcacheKey, IpcacheValue, PolicyKey, DIRECTION_EGRESS,
        ENDPOINT_EGRESS_ISOLATED, ENDPOINT_FAIL_CLOSED, IDENTITY_WORLD, POLICY_PREFIX_FULL,
        POLICY_STATE_AT_CONNECT,
    },
};

use crate::maps::{CGROUP_ENDPOINTS, ENDPOINTS, IPCACHE, POLICY, POLICY_STATE};

/// Whether the calling pod's egress policy denies `proto` to `daddr` and
/// `port` (network order).
#[inline(always)]
pub fn denies(daddr: &Addr, port: u16, proto: u8) -> bool {
    if POLICY_STATE
        .get(0)
        .is_none_or(|state| state.flags & POLICY_STATE_AT_CONNECT == 0)
    {
        return false;
    }
    // SAFETY: a helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { CGROUP_ENDPOINTS.get(&cgroup) }).copied() else {
        return false;
    };
    // SAFETY: copied out at once; the agent replaces whole entries.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&pod) }).copied() else {
        return false;
    };
    if endpoint.flags & ENDPOINT_FAIL_CLOSED != 0 {
        return true;
    }
    if endpoint.flags & ENDPOINT_EGRESS_ISOLATED == 0 {
        return false;
    }
    let peer = IPCACHE
        .get(&Key::new(128, IpcacheKey { addr: *daddr }))
        .copied()
        .unwrap_or(IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        });
    !allowed_by(peer, |identity| {
        let key = PolicyKey::new(endpoint.set, DIRECTION_EGRESS, identity, proto, port);
        POLICY.get(&Key::new(POLICY_PREFIX_FULL, key)).is_some()
    })
}
