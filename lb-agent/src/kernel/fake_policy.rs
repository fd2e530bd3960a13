//! Policy maps in memory with the kernel's capacities and errors
//! ([`FakePolicyMaps`]), and maps that fail as scripted
//! ([`FaultyPolicyMaps`]): for the policy reconciler's tests and dry runs.

use lb_common::maps;
use lb_policy::{
    plan::{PolicyCapacity, PolicyOp},
    tables::PolicyTables,
};

use super::{syscall_error, KernelError, PolicyMaps};

/// The map a write goes to.
pub fn map_of(op: &PolicyOp) -> &'static str {
    match op {
        PolicyOp::PutIdentity(..) | PolicyOp::DeleteIdentity(_) => maps::IDENTITIES,
        PolicyOp::PutRule(..) | PolicyOp::DeleteRule(_) => maps::POLICY_RULES,
        PolicyOp::PutEntry(..) | PolicyOp::DeleteEntry(..) => maps::POLICY,
        PolicyOp::PutSet(..) | PolicyOp::DeleteSet(_) => maps::POLICY_SETS,
        PolicyOp::PutEndpoint(..) | PolicyOp::DeleteEndpoint(_) => maps::ENDPOINTS,
        PolicyOp::PutPodName(..) | PolicyOp::DeletePodName(_) => maps::POD_NAMES,
        PolicyOp::PutIpcache(..) | PolicyOp::DeleteIpcache(_) => maps::IPCACHE,
        PolicyOp::PutState(_) => maps::POLICY_STATE,
    }
}

/// The policy maps as plain data.
#[derive(Clone, Debug, Default)]
pub struct FakePolicyMaps {
    /// What the maps hold.
    pub tables: PolicyTables,
    /// Their capacities: a write past them fails with `E2BIG`, as a full
    /// BPF map's insert does.
    pub capacity: PolicyCapacity,
    /// Every write executed, in order.
    pub writes: Vec<PolicyOp>,
}

impl FakePolicyMaps {
    /// Empty maps with these capacities.
    pub fn with_capacity(capacity: PolicyCapacity) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    fn full(&self, op: &PolicyOp) -> bool {
        let t = &self.tables;
        match op {
            PolicyOp::PutEntry(set, entry, _) => {
                let present = t
                    .sets
                    .get(set)
                    .is_some_and(|s| s.entries.contains_key(entry));
                !present && t.entry_count() >= self.capacity.entries
            }
            PolicyOp::PutIpcache(prefix, _) => {
                !t.ipcache.contains_key(prefix) && t.ipcache.len() >= self.capacity.ipcache
            }
            PolicyOp::PutEndpoint(ip, _) => {
                !t.endpoints.contains_key(ip) && t.endpoints.len() >= self.capacity.endpoints
            }
            _ => false,
        }
    }
}

impl PolicyMaps for FakePolicyMaps {
    fn dump(&self) -> Result<PolicyTables, KernelError> {
        Ok(self.tables.clone())
    }

    fn write(&mut self, op: &PolicyOp) -> Result<(), KernelError> {
        if self.full(op) {
            return Err(KernelError::Map {
                name: map_of(op),
                source: syscall_error("bpf_map_update_elem", libc::E2BIG),
            });
        }
        self.tables.apply(op);
        self.writes.push(op.clone());
        Ok(())
    }
}

/// Policy maps whose writes `matching` accepts fail with `errno` (`times`
/// of them), and otherwise pass through to `inner`.
#[derive(Debug)]
pub struct FaultyPolicyMaps<M> {
    /// The maps that writes which do not fail reach.
    pub inner: M,
    matching: fn(&PolicyOp) -> bool,
    errno: i32,
    /// Faults left.
    pub times: usize,
}

impl<M: PolicyMaps> FaultyPolicyMaps<M> {
    /// `inner`, with the next `times` writes `matching` accepts failing
    /// with `errno`.
    pub fn new(inner: M, matching: fn(&PolicyOp) -> bool, errno: i32, times: usize) -> Self {
        Self {
            inner,
            matching,
            errno,
            times,
        }
    }
}

impl<M: PolicyMaps> PolicyMaps for FaultyPolicyMaps<M> {
    fn dump(&self) -> Result<PolicyTables, KernelError> {
        self.inner.dump()
    }

    fn write(&mut self, op: &PolicyOp) -> Result<(), KernelError> {
        if self.times > 0 && (self.matching)(op) {
            self.times -= 1;
            return Err(KernelError::Map {
                name: map_of(op),
                source: syscall_error("bpf_map_update_elem", self.errno),
            });
        }
        self.inner.write(op)
    }
}
