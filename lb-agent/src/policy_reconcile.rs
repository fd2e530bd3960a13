//! Applies policy targets to the policy maps, keeping the applied tables in
//! step: plans (from `lb-policy`), executes the plan through any
//! [`PolicyMaps`], and repairs on a later pass what failed.
//!
//! - A set that does not fit (planned) or whose writes fail (the kernel
//!   says so) is not used: the endpoints that need it are written
//!   fail-closed in the same pass, so they refuse new flows with a drop
//!   reason instead of enforcing a partial set. Every other endpoint is
//!   unaffected, and the set is tried again on every pass until it fits.
//! - A set's deletion is skipped while an endpoint in the maps still uses
//!   it (its move failed).
//! - Any other failed write is reported and retried on the next pass, which
//!   plans from what the maps then hold.

use std::{collections::BTreeSet, net::IpAddr};

use lb_policy::{
    plan::{plan, PolicyCapacity, PolicyGroup, PolicyOp},
    tables::{PolicyTables, PolicyTarget},
};

use crate::kernel::{KernelError, PolicyMaps};

/// Passes of planning within one reconciliation: each failed set write
/// costs one more, and then the set counts as unfit.
const MAX_PLANS: usize = 4;

/// A write that failed; everything else of the pass was done.
#[derive(Debug, thiserror::Error)]
#[error("{op:?}: {source}")]
pub struct PolicyWriteError {
    /// The write.
    pub op: PolicyOp,
    /// What the kernel answered.
    pub source: KernelError,
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct PolicyReconciled {
    /// Map writes executed.
    pub writes: usize,
    /// Endpoints written fail-closed: their set does not fit or could not
    /// be written.
    pub fail_closed: BTreeSet<IpAddr>,
    /// Sets not written.
    pub unfit_sets: BTreeSet<u32>,
    /// ipcache prefixes and endpoints left out for lack of room.
    pub left_out: usize,
    /// Writes that failed.
    pub errors: Vec<PolicyWriteError>,
}

impl PolicyReconciled {
    /// Whether the maps now hold the whole target.
    pub fn complete(&self) -> bool {
        self.unfit_sets.is_empty() && self.left_out == 0 && self.errors.is_empty()
    }
}

/// Keeps what the policy maps hold and moves them to each new target.
pub struct PolicyReconciler<M> {
    maps: M,
    applied: PolicyTables,
    capacity: PolicyCapacity,
}

impl<M: PolicyMaps> PolicyReconciler<M> {
    /// Adopts what `maps` hold (a previous agent's identities, sets and
    /// entries keep enforcing until a plan changes them).
    pub fn adopt(maps: M, capacity: PolicyCapacity) -> Result<Self, KernelError> {
        let applied = maps.dump()?;
        Ok(Self {
            maps,
            applied,
            capacity,
        })
    }

    /// What the maps hold, as far as this reconciler knows.
    pub fn applied(&self) -> &PolicyTables {
        &self.applied
    }

    /// The maps.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Moves the maps to `target`.
    pub fn reconcile(&mut self, target: &PolicyTarget) -> PolicyReconciled {
        let mut out = PolicyReconciled::default();
        let mut unwritable = BTreeSet::new();
        for _ in 0..MAX_PLANS {
            let plan = plan(&self.applied, target, &self.capacity, &unwritable);
            out.fail_closed = plan.fail_closed.clone();
            out.unfit_sets = plan.unfit_sets.clone();
            out.left_out = plan.left_out;
            match self.execute(&plan.groups, &mut out) {
                Some(failed_set) => {
                    unwritable.insert(failed_set);
                }
                None => return out,
            }
        }
        out
    }

    /// Executes groups in order; stops at the first set whose writes fail
    /// and returns it, so that the caller plans again without it.
    fn execute(&mut self, groups: &[PolicyGroup], out: &mut PolicyReconciled) -> Option<u32> {
        for group in groups {
            if let (Some(set), true) = (group.set, group.deletes) {
                if self.applied.endpoints.values().any(|ep| ep.set == set) {
                    continue;
                }
            }
            for op in &group.ops {
                match self.maps.write(op) {
                    Ok(()) => {
                        self.applied.apply(op);
                        out.writes += 1;
                    }
                    Err(source) => {
                        out.errors.push(PolicyWriteError {
                            op: op.clone(),
                            source,
                        });
                        match (group.set, group.deletes) {
                            (Some(set), false) => return Some(set),
                            _ => break,
                        }
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
