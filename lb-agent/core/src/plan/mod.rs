//! The difference between what the maps hold and what should be there, as an
//! ordered list of map writes that never shows a reader a half-written service.
//!
//! [`plan`] takes the applied state (adopted from a map dump at start, then
//! kept in memory) and the desired state, and returns the operations plus
//! the applied state they lead to. The kernel shell executes them;
//! [`memory::MemoryMaps`] executes them on plain data, for tests and dry runs.
//!
//! Order within a frontend is make-before-break: new backends, then the slots
//! (or Maglev table) of a new generation, then one write that flips the
//! frontend to it, then the deletion of the old generation. Unused backends
//! are deleted last.

mod applied;
#[cfg(test)]
mod crash_tests;
pub mod memory;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    maps::{MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_MAGLEV_ENTRIES, MAX_SERVICES, MAX_SOURCE_RANGES},
    service::{uses_maglev, Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey},
};

pub use applied::{
    name_from_str, name_to_string, Applied, AppliedFrontend, Dump, SourceRange, UndersizedTable,
};

use self::applied::table_entries;
use crate::{
    desired::DesiredState,
    maglev::{self, MaglevBackend},
};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace a backend.
    PutBackend(u32, Backend),
    /// Insert a backend slot.
    PutSlot(SlotKey, u32),
    /// Insert or replace a frontend's reverse translation.
    PutRevNat(u32, RevNat),
    /// Insert or replace a frontend's display name.
    PutName(u32, ServiceName),
    /// Insert or replace a frontend: the atomic flip.
    PutService(ServiceKey, ServiceValue),
    /// Delete a backend slot.
    DeleteSlot(SlotKey),
    /// Delete a frontend.
    DeleteService(ServiceKey),
    /// Delete a reverse translation.
    DeleteRevNat(u32),
    /// Delete a display name.
    DeleteName(u32),
    /// Delete a backend.
    DeleteBackend(u32),
    /// Write a complete Maglev table (backend ids) under a fresh generation:
    /// the slots first, the size entry last.
    PutMaglevTable(u32, Vec<u32>),
    /// Delete the Maglev table of a generation, of this many slots: the size
    /// entry first, then every slot (those already gone are skipped).
    DeleteMaglevTable(u32, usize),
    /// Allow a source range for a service id (loadBalancerSourceRanges).
    PutSourceRange(u32, IpAddr, u8),
    /// Remove a source range of a service id.
    DeleteSourceRange(u32, IpAddr, u8),
}

impl Op {
    /// The operation in words for a log line, without a Maglev table's
    /// (large) payload.
    pub fn describe(&self) -> String {
        match self {
            Op::PutMaglevTable(generation, table) => {
                format!("PutMaglevTable({generation}, {} entries)", table.len())
            }
            other => format!("{other:?}"),
        }
    }
}

/// Operations that belong together: if one fails, the rest of the group is
/// skipped so the frontend keeps its previous, complete state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The frontend this group changes; `None` for the final cleanup.
    pub frontend: Option<ServiceKey>,
    /// The writes, in order.
    pub ops: Vec<Op>,
}

/// Map capacities the plan must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends.
    pub services: usize,
    /// Backends.
    pub backends: usize,
    /// Backend slots, including a second generation during a swap.
    pub slots: usize,
    /// Maglev table entries, including a second table during a swap.
    pub maglev_entries: usize,
    /// Source ranges.
    pub source_ranges: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES as usize,
            backends: MAX_BACKENDS as usize,
            slots: MAX_BACKEND_SLOTS as usize,
            maglev_entries: MAX_MAGLEV_ENTRIES as usize,
            source_ranges: MAX_SOURCE_RANGES as usize,
        }
    }
}

/// How the tc path's Maglev tables are built; identical on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevSettings {
    /// Table size M, one of [`maglev::TABLE_SIZES`].
    pub size: usize,
    /// Seed of the table permutations.
    pub seed: u64,
}

/// The default Maglev seed ("lbmaglev").
pub const DEFAULT_MAGLEV_SEED: u64 = 0x6c62_6d61_676c_6576;

impl MaglevSettings {
    /// The table size of a frontend with `backends` backends: 100 slots per
    /// backend (the smallest listed size with `M >= 100 * N`), at most
    /// `size`. Small Services take small tables, so the map holds the
    /// tables of thousands of them; every node sizes a table alike.
    pub fn table_size(&self, backends: usize) -> usize {
        maglev::table_size_for(backends).min(self.size)
    }
}

impl Default for MaglevSettings {
    fn default() -> Self {
        Self {
            size: maglev::DEFAULT_TABLE_SIZE,
            seed: DEFAULT_MAGLEV_SEED,
        }
    }
}

/// A frontend that could not be programmed because a map would overflow (or
/// its table cannot be built); it keeps its previous state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {map} map full ({needed} entries needed, capacity {capacity}); the frontend keeps its previous state")]
pub struct CapacityError {
    /// The frontend.
    pub key: ServiceKey,
    /// Display name of the frontend.
    pub name: String,
    /// Which map.
    pub map: &'static str,
    /// Entries it would have needed.
    pub needed: usize,
    /// The map's capacity.
    pub capacity: usize,
}

/// What [`plan`] returns; the applied state it was given already describes
/// the maps as they will be once every group has been executed.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Groups in execution order.
    pub groups: Vec<Group>,
    /// Frontends left as they were because of capacity.
    pub errors: Vec<CapacityError>,
    /// The previous state of every frontend the plan removes or changes.
    pub replaced: Vec<(ServiceKey, AppliedFrontend)>,
}

/// Which frontends a plan considers.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every frontend, applied or desired.
    All,
    /// Only these (e.g. the ones an incremental compile reported changed).
    Only(&'a BTreeSet<ServiceKey>),
}

impl Plan {
    /// Whether executing the plan would change nothing.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.ops.is_empty())
    }

    /// Number of map writes.
    pub fn op_count(&self) -> usize {
        self.groups.iter().map(|g| g.ops.len()).sum()
    }
}

/// Computes the operations that turn the maps described by `applied` into
/// `desired` (for the frontends in `scope`), and updates `applied` to what
/// the maps will hold once they have run.
pub fn plan(
    applied: &mut Applied,
    desired: &DesiredState,
    capacity: &Capacity,
    maglev: &MaglevSettings,
    scope: Scope<'_>,
) -> Plan {
    let mut groups = Vec::new();
    let mut errors = Vec::new();
    let mut replaced = Vec::new();
    let mut cleanup = std::mem::take(&mut applied.orphans);
    // Backends whose last user may be going away.
    let mut touched: BTreeSet<Backend> =
        std::mem::take(&mut applied.unclaimed).into_iter().collect();

    let candidates: Vec<ServiceKey> = match scope {
        Scope::All => applied
            .frontends
            .keys()
            .chain(desired.frontends.keys())
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        Scope::Only(keys) => keys.iter().copied().collect(),
    };
    // Removals first: they free capacity for what follows.
    for key in candidates
        .iter()
        .filter(|k| !desired.frontends.contains_key(k))
    {
        let Some(old) = applied.remove_frontend(key) else {
            continue;
        };
        let mut ops = vec![Op::DeleteService(*key)];
        ops.extend(retire_backend_set(key, &old));
        ops.extend(
            old.source_ranges
                .iter()
                .map(|(addr, len)| Op::DeleteSourceRange(old.service_id, *addr, *len)),
        );
        ops.push(Op::DeleteRevNat(old.service_id));
        ops.push(Op::DeleteName(old.service_id));
        touched.extend(old.backends.iter().chain(&old.draining).copied());
        replaced.push((*key, old));
        groups.push(Group {
            frontend: Some(*key),
            ops,
        });
    }
    let mut source_ranges: usize = applied
        .frontends
        .values()
        .map(|f| f.source_ranges.len())
        .sum();

    for key in &candidates {
        let Some(frontend) = desired.frontends.get(key) else {
            continue;
        };
        let current = applied.frontends.get(key).cloned();
        let draining = applied.present(&frontend.draining);
        if let Some(cur) = &current {
            if cur.complete && cur.backends == frontend.backends {
                if cur.draining != draining {
                    touched.extend(cur.draining.iter().copied());
                    let mut entry = cur.clone();
                    entry.draining = draining;
                    applied.insert_frontend(*key, entry);
                }
                let mut ops = Vec::new();
                let entry = applied.frontends.get_mut(key).expect("present");
                if cur.name != frontend.name {
                    ops.push(Op::PutName(cur.service_id, name_from_str(&frontend.name)));
                    entry.name = frontend.name.clone();
                }
                if cur.source_ranges != frontend.source_ranges {
                    ops.extend(range_changes(
                        cur.service_id,
                        &cur.source_ranges,
                        &frontend.source_ranges,
                    ));
                    source_ranges =
                        source_ranges + frontend.source_ranges.len() - cur.source_ranges.len();
                    entry.source_ranges = frontend.source_ranges.clone();
                }
                if (cur.flags, cur.affinity_timeout_s)
                    != (frontend.flags, frontend.affinity_timeout_s)
                {
                    entry.flags = frontend.flags;
                    entry.affinity_timeout_s = frontend.affinity_timeout_s;
                    ops.push(Op::PutService(*key, entry.value()));
                }
                if !ops.is_empty() {
                    replaced.push((*key, cur.clone()));
                    groups.push(Group {
                        frontend: Some(*key),
                        ops,
                    });
                }
                continue;
            }
        }

        // Capacity: both generations exist between the flip and the cleanup.
        let new_backends: BTreeSet<Backend> = frontend
            .backends
            .iter()
            .filter(|b| !applied.backends.contains_key(b))
            .copied()
            .collect();
        let external = uses_maglev(key.scope);
        let new_table = external && !frontend.backends.is_empty();
        let table_size = maglev.table_size(frontend.backends.len());
        // A frontend getting its first table must leave room for the swap
        // of a largest table: however many frontends one Service adds, the
        // ones already holding a table can still change.
        let swap_reserve = if current.as_ref().is_none_or(|c| c.table == 0) {
            table_entries(maglev.size)
        } else {
            0
        };
        let old_ranges = current.as_ref().map_or(0, |c| c.source_ranges.len());
        let checks = [
            (
                "Maglev table",
                applied.maglev_entries
                    + if new_table {
                        table_entries(table_size) + swap_reserve
                    } else {
                        0
                    },
                capacity.maglev_entries,
            ),
            (
                "service",
                applied.frontends.len() + usize::from(current.is_none()),
                capacity.services,
            ),
            (
                "backend",
                applied.backends.len() + new_backends.len(),
                capacity.backends,
            ),
            (
                "backend slot",
                applied.slot_count + if external { 0 } else { frontend.backends.len() },
                capacity.slots,
            ),
            (
                "source range",
                source_ranges + frontend.source_ranges.len().saturating_sub(old_ranges),
                capacity.source_ranges,
            ),
        ];
        if let Some((map, needed, cap)) = checks.into_iter().find(|(_, n, c)| n > c) {
            errors.push(CapacityError {
                key: *key,
                name: frontend.name.clone(),
                map,
                needed,
                capacity: cap,
            });
            continue;
        }
        // Built before any id is allocated: a table that cannot be built
        // leaves the frontend, and the id counter, as they were.
        let table = if new_table {
            match maglev::build_table(&maglev_keys(&frontend.backends), table_size, maglev.seed) {
                Ok(table) => Some(table),
                Err(err) => {
                    errors.push(CapacityError {
                        key: *key,
                        name: format!("{}: {err}", frontend.name),
                        map: "Maglev table",
                        needed: frontend.backends.len(),
                        capacity: table_size,
                    });
                    continue;
                }
            }
        } else {
            None
        };

        let mut ops = Vec::new();
        for backend in &new_backends {
            let id = applied.allocate_id();
            applied.backends.insert(*backend, id);
            ops.push(Op::PutBackend(id, *backend));
        }
        let generation = if external {
            match table {
                Some(table) => {
                    let generation = applied.allocate_id();
                    let sorted = sorted_ids(&frontend.backends, &applied.backends);
                    ops.push(Op::PutMaglevTable(
                        generation,
                        table.into_iter().map(|i| sorted[i as usize]).collect(),
                    ));
                    generation
                }
                None => 0,
            }
        } else {
            let generation = applied.allocate_id();
            for (slot, backend) in frontend.backends.iter().enumerate() {
                ops.push(Op::PutSlot(
                    SlotKey {
                        generation,
                        slot: slot as u32,
                    },
                    applied.backends[backend],
                ));
            }
            generation
        };
        let service_id = match &current {
            Some(cur) => cur.service_id,
            None => {
                let id = applied.allocate_id();
                ops.push(Op::PutRevNat(
                    id,
                    RevNat {
                        addr: key.addr,
                        port: key.port,
                        pad: 0,
                        service_id: id,
                    },
                ));
                id
            }
        };
        if current.as_ref().is_none_or(|c| c.name != frontend.name) {
            ops.push(Op::PutName(service_id, name_from_str(&frontend.name)));
        }
        let old_ranges = current.as_ref().map_or(&[][..], |c| &c.source_ranges[..]);
        ops.extend(range_changes(
            service_id,
            old_ranges,
            &frontend.source_ranges,
        ));
        source_ranges = source_ranges + frontend.source_ranges.len() - old_ranges.len();
        let entry = AppliedFrontend {
            service_id,
            generation,
            backends: frontend.backends.clone(),
            slots: if external { 0 } else { frontend.backends.len() },
            table: if external && generation != 0 {
                table_size
            } else {
                0
            },
            name: frontend.name.clone(),
            flags: frontend.flags,
            affinity_timeout_s: frontend.affinity_timeout_s,
            source_ranges: frontend.source_ranges.clone(),
            draining,
            complete: true,
        };
        ops.push(Op::PutService(*key, entry.value()));
        if let Some(cur) = current {
            ops.extend(retire_backend_set(key, &cur));
            touched.extend(cur.backends.iter().chain(&cur.draining).copied());
            replaced.push((*key, cur));
        }
        applied.insert_frontend(*key, entry);
        groups.push(Group {
            frontend: Some(*key),
            ops,
        });
    }

    for backend in touched {
        if !applied.is_referenced(&backend) {
            if let Some(id) = applied.backends.remove(&backend) {
                cleanup.push(Op::DeleteBackend(id));
            }
        }
    }
    if !cleanup.is_empty() {
        groups.push(Group {
            frontend: None,
            ops: cleanup,
        });
    }
    Plan {
        groups,
        errors,
        replaced,
    }
}

/// Deletions of a replaced or removed frontend's backend set: its slots, or
/// its Maglev table.
fn retire_backend_set(key: &ServiceKey, old: &AppliedFrontend) -> Vec<Op> {
    if !uses_maglev(key.scope) {
        return (0..old.slots as u32)
            .map(|slot| {
                Op::DeleteSlot(SlotKey {
                    generation: old.generation,
                    slot,
                })
            })
            .collect();
    }
    if old.table == 0 {
        return Vec::new();
    }
    vec![Op::DeleteMaglevTable(old.generation, old.table)]
}

/// Source range writes that turn `old` into `new` for a service id.
fn range_changes(service_id: u32, old: &[(IpAddr, u8)], new: &[(IpAddr, u8)]) -> Vec<Op> {
    let added = new
        .iter()
        .filter(|r| !old.contains(r))
        .map(|(addr, len)| Op::PutSourceRange(service_id, *addr, *len));
    let removed = old
        .iter()
        .filter(|r| !new.contains(r))
        .map(|(addr, len)| Op::DeleteSourceRange(service_id, *addr, *len));
    added.chain(removed).collect()
}

/// The key a backend is placed in Maglev tables by: its address and port,
/// so that every node builds the same table whatever ids it gave.
fn maglev_keys(backends: &[Backend]) -> Vec<MaglevBackend<[u8; 18]>> {
    backends
        .iter()
        .map(|b| {
            let mut key = [0u8; 18];
            for (i, word) in b.addr.iter().enumerate() {
                key[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            key[16..].copy_from_slice(&b.port.to_ne_bytes());
            MaglevBackend::new(key, 1)
        })
        .collect()
}

/// The ids of `backends` in the order the Maglev builder numbers them.
fn sorted_ids(backends: &[Backend], ids: &BTreeMap<Backend, u32>) -> Vec<u32> {
    let keyed = maglev_keys(backends);
    let by_key: BTreeMap<[u8; 18], u32> = keyed
        .iter()
        .zip(backends)
        .map(|(k, b)| (k.key, ids[b]))
        .collect();
    maglev::sorted_backends(&keyed)
        .into_iter()
        .map(|k| by_key[&k.key])
        .collect()
}

/// The Maglev table of a backend set, as backend ids.
fn maglev_table(
    backends: &[Backend],
    ids: &BTreeMap<Backend, u32>,
    settings: &MaglevSettings,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let sorted = sorted_ids(backends, ids);
    let size = settings.table_size(backends.len());
    let table = maglev::build_table(&maglev_keys(backends), size, settings.seed)?;
    Ok(table
        .into_iter()
        .map(|index| sorted[index as usize])
        .collect())
}
