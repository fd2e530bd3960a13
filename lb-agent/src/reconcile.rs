//! Applies desired states to the maps, keeping the applied state in step.

use crate::{
    datapath::{DatapathError, Maps},
    model::DesiredState,
    plan::{plan, Applied, Capacity},
};

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Map writes executed.
    pub writes: usize,
    /// Frontends in the maps afterwards.
    pub frontends: usize,
    /// Problems: capacity errors and failed writes, as text for logs.
    pub errors: Vec<String>,
}

/// Keeps what the maps hold and moves them to each new desired state.
pub struct Reconciler {
    applied: Applied,
    capacity: Capacity,
}

impl Reconciler {
    /// Adopts what the maps already hold (a previous agent's work).
    pub fn adopt(maps: &Maps, capacity: Capacity) -> Result<Self, DatapathError> {
        Ok(Self {
            applied: Applied::adopt(&maps.dump()?),
            capacity,
        })
    }

    /// Moves the maps to `desired`. On a failed write the applied state is
    /// re-read from the kernel, so the next call repairs whatever is left.
    pub fn reconcile(&mut self, maps: &mut Maps, desired: &DesiredState) -> Outcome {
        let plan = plan(&self.applied, desired, &self.capacity);
        let mut errors: Vec<String> = plan.errors.iter().map(ToString::to_string).collect();
        let writes = plan.op_count();
        let write_errors = maps.execute(&plan);
        if write_errors.is_empty() {
            self.applied = plan.next;
        } else {
            errors.extend(write_errors.iter().map(ToString::to_string));
            match maps.dump() {
                Ok(dump) => self.applied = Applied::adopt(&dump),
                Err(err) => errors.push(format!("re-reading maps after a failed write: {err}")),
            }
        }
        Outcome {
            writes,
            frontends: self.applied.frontends.len(),
            errors,
        }
    }
}
