//! Applies desired states to the maps, keeping the applied state in step.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, PROTO_UDP, SERVICE_FLAG_AFFINITY};

use crate::{
    datapath::{DatapathError, Maps},
    model::DesiredState,
    plan::{plan, Applied, Capacity, MaglevSettings, Plan, Scope, UndersizedTable},
    tcpath::TcDatapath,
    terminate::destroy_udp_sockets,
};

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Map writes executed.
    pub writes: usize,
    /// Frontends in the maps afterwards.
    pub frontends: usize,
    /// Connected UDP sockets terminated because their backend left.
    pub terminated_sockets: usize,
    /// Problems: capacity errors and failed writes, as text for logs.
    pub errors: Vec<String>,
}

/// Keeps what the maps hold and moves them to each new desired state.
pub struct Reconciler {
    applied: Applied,
    capacity: Capacity,
    maglev: MaglevSettings,
    /// Set after adoption or a failed write: the next plan must look at every
    /// frontend, not only the ones the compiler reports changed.
    needs_full: bool,
}

impl Reconciler {
    /// Adopts what the maps already hold (a previous agent's work).
    pub fn adopt(
        maps: &Maps,
        capacity: Capacity,
        maglev: MaglevSettings,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            applied: Applied::adopt(&maps.dump()?),
            capacity,
            maglev,
            needs_full: true,
        })
    }

    /// What the maps hold, as last written or read.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Maglev frontends whose table is small for their backends.
    pub fn undersized_maglev_tables(&self) -> Vec<UndersizedTable> {
        self.applied.undersized_maglev_tables(self.maglev.size)
    }

    /// The capacities plans respect.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// Moves the maps to `desired` for the frontends in `scope`. On a failed
    /// write the applied state is re-read from the kernel, so the next call
    /// repairs whatever is left.
    /// `tc` is the tc datapath, when enabled, for Maglev tables and source ranges.
    pub fn reconcile(
        &mut self,
        maps: &mut Maps,
        mut tc: Option<&mut TcDatapath>,
        desired: &DesiredState,
        scope: Scope<'_>,
    ) -> Outcome {
        let scope = if self.needs_full { Scope::All } else { scope };
        self.needs_full = false;
        let plan = plan(
            &mut self.applied,
            desired,
            &self.capacity,
            &self.maglev,
            scope,
        );
        let mut errors: Vec<String> = plan.errors.iter().map(ToString::to_string).collect();
        let writes = plan.op_count();
        let affinity_touched = touches_affinity(&self.applied, &plan);
        let removed_udp = removed_udp_backends(&self.applied, &plan);
        let write_errors = maps.execute(&plan, tc.as_deref_mut());
        if !write_errors.is_empty() {
            self.needs_full = true;
            errors.extend(write_errors.iter().map(ToString::to_string));
            match maps.dump() {
                Ok(dump) => self.applied = Applied::adopt(&dump),
                Err(err) => errors.push(format!("re-reading maps after a failed write: {err}")),
            }
        }
        if affinity_touched {
            let valid = affine_backends(&self.applied);
            let keep = |service_id: u32, backend_id: u32| {
                valid
                    .get(&service_id)
                    .is_some_and(|ids| ids.contains(&backend_id))
            };
            if let Err(err) = maps.prune_affinity(|k, v| keep(k.service_id, v.backend_id)) {
                errors.push(format!("pruning session affinity: {err}"));
            }
            if let Some(tc) = tc {
                if let Err(err) = tc.prune_affinity(|k, v| keep(k.service_id, v.backend_id)) {
                    errors.push(format!("pruning per-packet session affinity: {err}"));
                }
            }
        }
        let mut terminated_sockets = 0;
        if !removed_udp.is_empty() {
            match maps
                .cookies_steered_to(&removed_udp)
                .map_err(|e| e.to_string())
                .and_then(|cookies| destroy_udp_sockets(&cookies).map_err(|e| e.to_string()))
            {
                Ok(count) => terminated_sockets = count,
                Err(err) => errors.push(format!(
                    "terminating UDP sockets of removed backends: {err}"
                )),
            }
        }
        Outcome {
            writes,
            frontends: self.applied.frontends.len(),
            terminated_sockets,
            errors,
        }
    }
}

/// `(service id, backend)` pairs of UDP frontends whose backend the plan removes.
fn removed_udp_backends(applied: &Applied, plan: &Plan) -> BTreeSet<(u32, Backend)> {
    let mut removed = BTreeSet::new();
    for (key, old) in plan.replaced.iter().filter(|(k, _)| k.proto == PROTO_UDP) {
        let kept: BTreeSet<&Backend> = applied
            .frontends
            .get(key)
            .map(|f| f.backends.iter().collect())
            .unwrap_or_default();
        for backend in old.backends.iter().filter(|b| !kept.contains(b)) {
            removed.insert((old.service_id, *backend));
        }
    }
    removed
}

/// Whether the plan changes a frontend that has or had session affinity;
/// `applied` is the state after the plan.
fn touches_affinity(applied: &Applied, plan: &Plan) -> bool {
    plan.replaced.iter().any(|(key, old)| {
        old.flags & SERVICE_FLAG_AFFINITY != 0
            || applied
                .frontends
                .get(key)
                .is_some_and(|f| f.flags & SERVICE_FLAG_AFFINITY != 0)
    })
}

/// For each frontend with affinity, the backend ids a client may stay on.
fn affine_backends(applied: &Applied) -> BTreeMap<u32, BTreeSet<u32>> {
    applied
        .frontends
        .values()
        .filter(|f| f.flags & SERVICE_FLAG_AFFINITY != 0)
        .map(|f| {
            let ids = f
                .backends
                .iter()
                .filter_map(|b| applied.backends.get(b).copied())
                .collect();
            (f.service_id, ids)
        })
        .collect()
}
