//! The difference between what the maps hold and what should be there, as an
//! ordered list of map writes that never shows a reader a half-written service.
//!
//! Sans-IO: [`plan`] takes the applied state (adopted from a map dump at start,
//! then kept in memory) and the desired state, and returns the operations plus
//! the applied state they lead to. The shell in `datapath` executes them.
//!
//! Order within a frontend is make-before-break: new backends, then the slots of
//! a new generation, then one write that flips the frontend to it, then the
//! deletion of the old generation. Unused backends are deleted last.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::net::IpAddr;

use lb_common::{
    tc::{uses_maglev, MAX_MAGLEV_ENTRIES},
    Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey,
};

use crate::maglev::{self, MaglevBackend};

use crate::model::DesiredState;

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
    /// Write a complete Maglev table (backend ids) under a fresh generation.
    PutMaglevTable(u32, Vec<u32>),
    /// Delete the Maglev table of a generation.
    DeleteMaglevTable(u32),
    /// Allow a source range for a service id (loadBalancerSourceRanges).
    PutSourceRange(u32, IpAddr, u8),
    /// Remove a source range of a service id.
    DeleteSourceRange(u32, IpAddr, u8),
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
}

/// How the tc path's Maglev tables are built; identical on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevSettings {
    /// Table size M, one of [`maglev::TABLE_SIZES`].
    pub size: usize,
    /// Seed of the table permutations.
    pub seed: u64,
}

impl Default for MaglevSettings {
    fn default() -> Self {
        Self {
            size: maglev::DEFAULT_TABLE_SIZE,
            seed: DEFAULT_MAGLEV_SEED,
        }
    }
}

/// The default Maglev seed ("lbmaglev").
pub const DEFAULT_MAGLEV_SEED: u64 = 0x6c62_6d61_676c_6576;

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: lb_common::MAX_SERVICES as usize,
            backends: lb_common::MAX_BACKENDS as usize,
            slots: lb_common::MAX_BACKEND_SLOTS as usize,
            maglev_entries: MAX_MAGLEV_ENTRIES as usize,
        }
    }
}

/// A frontend that could not be programmed because a map would overflow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {map} map full ({needed} entries needed, capacity {capacity}); the frontend keeps its previous state")]
pub struct CapacityError {
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

/// A frontend as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedFrontend {
    /// Id keying reverse translation and names.
    pub service_id: u32,
    /// Slot generation in use.
    pub generation: u32,
    /// Backends in slot order.
    pub backends: Vec<Backend>,
    /// Slots the frontend occupies: `backends.len()` unless a dump found
    /// some of them missing.
    pub slots: usize,
    /// Display name.
    pub name: String,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds.
    pub affinity_timeout_s: u32,
    /// Source ranges written for it (tc frontends).
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// False when slots or backends were missing in a dump: rewrite it.
    pub complete: bool,
}

impl AppliedFrontend {
    fn value(&self) -> ServiceValue {
        ServiceValue {
            service_id: self.service_id,
            slot_generation: self.generation,
            backend_count: self.backends.len() as u32,
            flags: self.flags,
            affinity_timeout_s: self.affinity_timeout_s,
        }
    }
}

/// The state of the maps as the agent last wrote (or read) them.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Frontends by key.
    pub frontends: BTreeMap<ServiceKey, AppliedFrontend>,
    /// Backend ids by backend.
    pub backends: BTreeMap<Backend, u32>,
    /// How many frontends use each backend.
    refs: HashMap<Backend, usize>,
    slot_count: usize,
    /// Maglev tables in use (each `size + 1` entries).
    maglev_tables: usize,
    next_id: u32,
    wrapped: bool,
    /// Deletions owed for entries found in a dump that nothing references.
    orphans: Vec<Op>,
}

/// A frontend whose Maglev table is too small for its backends: with fewer
/// than 100 slots per backend, shares drift from equal by more than 1 % (with
/// weights) and removing a backend moves more flows than it must.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndersizedTable {
    /// Display name of the frontend.
    pub name: String,
    /// Its backends.
    pub backends: usize,
    /// The smallest listed table size with 100 slots per backend.
    pub wanted_size: usize,
}

impl Applied {
    /// The Maglev frontends with more than `size / 100` backends, one entry
    /// per name (a Service's NodePort, ExternalIPs and LoadBalancer
    /// frontends share it), by name.
    pub fn undersized_maglev_tables(&self, size: usize) -> Vec<UndersizedTable> {
        let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (key, frontend) in &self.frontends {
            let backends = frontend.backends.len();
            if uses_maglev(key.scope) && backends.saturating_mul(100) > size {
                let most = by_name.entry(&frontend.name).or_default();
                *most = (*most).max(backends);
            }
        }
        by_name
            .into_iter()
            .map(|(name, backends)| UndersizedTable {
                name: name.to_owned(),
                backends,
                wanted_size: maglev::table_size_for(backends),
            })
            .collect()
    }
}

/// The entries of every map, as read from the kernel.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    /// Frontends.
    pub services: Vec<(ServiceKey, ServiceValue)>,
    /// Backend slots.
    pub slots: Vec<(SlotKey, u32)>,
    /// Backends by id.
    pub backends: Vec<(u32, Backend)>,
    /// Reverse translations by service id.
    pub rev_nat: Vec<(u32, RevNat)>,
    /// Display names by service id.
    pub names: Vec<(u32, ServiceName)>,
}

impl Applied {
    /// Adopts what the maps hold, e.g. after an agent restart. Entries nothing
    /// refers to are remembered and deleted by the next plan.
    pub fn adopt(dump: &Dump) -> Self {
        let backends_by_id: BTreeMap<u32, Backend> = dump.backends.iter().copied().collect();
        let slots: BTreeMap<SlotKey, u32> = dump
            .slots
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<BTreeMap<_, _>>();
        let names: BTreeMap<u32, String> = dump
            .names
            .iter()
            .map(|(id, name)| (*id, name_to_string(name)))
            .collect();
        let mut applied = Applied::default();
        let mut used_generations = BTreeSet::new();
        let mut used_ids = BTreeSet::new();
        for (key, value) in &dump.services {
            if uses_maglev(key.scope) {
                // Its table's backends are not in the dump: rewrite it. The
                // same seed and backends give the same table, and conntrack
                // keeps established flows meanwhile.
                used_ids.insert(value.service_id);
                used_generations.insert(value.slot_generation);
                let has_table = value.backend_count > 0;
                applied.maglev_tables += usize::from(has_table);
                applied.frontends.insert(
                    *key,
                    AppliedFrontend {
                        service_id: value.service_id,
                        generation: value.slot_generation,
                        backends: Vec::new(),
                        slots: 0,
                        name: names.get(&value.service_id).cloned().unwrap_or_default(),
                        flags: value.flags,
                        affinity_timeout_s: value.affinity_timeout_s,
                        source_ranges: Vec::new(),
                        complete: !has_table,
                    },
                );
                continue;
            }
            let mut complete = true;
            let mut backends = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let backend = slots
                    .get(&SlotKey {
                        generation: value.slot_generation,
                        slot,
                    })
                    .and_then(|id| backends_by_id.get(id));
                match backend {
                    Some(b) => backends.push(*b),
                    None => complete = false,
                }
            }
            used_generations.insert(value.slot_generation);
            used_ids.insert(value.service_id);
            applied.slot_count += value.backend_count as usize;
            applied.frontends.insert(
                *key,
                AppliedFrontend {
                    service_id: value.service_id,
                    generation: value.slot_generation,
                    backends,
                    slots: value.backend_count as usize,
                    name: names.get(&value.service_id).cloned().unwrap_or_default(),
                    flags: value.flags,
                    affinity_timeout_s: value.affinity_timeout_s,
                    source_ranges: Vec::new(),
                    complete,
                },
            );
        }
        for key in slots.keys() {
            if !used_generations.contains(&key.generation) {
                applied.orphans.push(Op::DeleteSlot(*key));
            }
        }
        for (id, _) in &dump.rev_nat {
            if !used_ids.contains(id) {
                applied.orphans.push(Op::DeleteRevNat(*id));
            }
        }
        for (id, _) in &dump.names {
            if !used_ids.contains(id) {
                applied.orphans.push(Op::DeleteName(*id));
            }
        }
        for frontend in applied.frontends.values() {
            for backend in &frontend.backends {
                *applied.refs.entry(*backend).or_default() += 1;
            }
        }
        for (id, backend) in &backends_by_id {
            let referenced = applied.refs.contains_key(backend);
            if !referenced || applied.backends.contains_key(backend) {
                applied.orphans.push(Op::DeleteBackend(*id));
            } else {
                applied.backends.insert(*backend, *id);
            }
        }
        let max_id = [
            used_generations.iter().max(),
            used_ids.iter().max(),
            backends_by_id.keys().max(),
            slots.keys().map(|k| &k.generation).max(),
        ]
        .into_iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or(0);
        applied.next_id = max_id.wrapping_add(1);
        applied.wrapped = applied.next_id == 0;
        applied
    }

    /// Allocates a fresh id, never 0. Service ids, backend ids and generations
    /// share one counter, so an id is unique across kinds. Once the 32-bit
    /// counter has wrapped, ids still in use are skipped.
    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = id.wrapping_add(1);
            if self.next_id == 0 {
                self.wrapped = true;
            }
            if id != 0 && !(self.wrapped && self.in_use(id)) {
                return id;
            }
        }
    }

    fn in_use(&self, id: u32) -> bool {
        self.frontends
            .values()
            .any(|f| f.service_id == id || f.generation == id)
            || self.backends.values().any(|b| *b == id)
    }

    /// Number of slots in use.
    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    /// Records a frontend, counting its slots and backend references.
    fn insert_frontend(&mut self, key: ServiceKey, frontend: AppliedFrontend) {
        if let Some(old) = self.frontends.remove(&key) {
            self.forget_refs(&old);
        }
        self.slot_count += frontend.slots;
        for backend in &frontend.backends {
            *self.refs.entry(*backend).or_default() += 1;
        }
        self.frontends.insert(key, frontend);
    }

    /// Forgets a frontend, returning it.
    fn remove_frontend(&mut self, key: &ServiceKey) -> Option<AppliedFrontend> {
        let old = self.frontends.remove(key)?;
        self.forget_refs(&old);
        Some(old)
    }

    fn forget_refs(&mut self, frontend: &AppliedFrontend) {
        self.slot_count -= frontend.slots;
        for backend in &frontend.backends {
            if let Some(count) = self.refs.get_mut(backend) {
                *count -= 1;
                if *count == 0 {
                    self.refs.remove(backend);
                }
            }
        }
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
    let mut touched: BTreeSet<Backend> = BTreeSet::new();

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
        ops.extend(retire_backend_set(applied, key, &old));
        ops.extend(
            old.source_ranges
                .iter()
                .map(|(addr, len)| Op::DeleteSourceRange(old.service_id, *addr, *len)),
        );
        ops.push(Op::DeleteRevNat(old.service_id));
        ops.push(Op::DeleteName(old.service_id));
        touched.extend(old.backends.iter().copied());
        replaced.push((*key, old));
        groups.push(Group {
            frontend: Some(*key),
            ops,
        });
    }

    for key in &candidates {
        let Some(frontend) = desired.frontends.get(key) else {
            continue;
        };
        let current = applied.frontends.get(key).cloned();
        if let Some(cur) = &current {
            if cur.complete && cur.backends == frontend.backends {
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
        let checks = [
            (
                "Maglev table",
                (applied.maglev_tables + usize::from(new_table)) * (maglev.size + 1),
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
        ];
        if let Some((map, needed, cap)) = checks.into_iter().find(|(_, n, c)| n > c) {
            errors.push(CapacityError {
                name: frontend.name.clone(),
                map,
                needed,
                capacity: cap,
            });
            continue;
        }

        let mut ops = Vec::new();
        for backend in &new_backends {
            let id = applied.allocate_id();
            applied.backends.insert(*backend, id);
            ops.push(Op::PutBackend(id, *backend));
        }
        let generation = if external {
            if new_table {
                let generation = applied.allocate_id();
                match maglev_table(&frontend.backends, &applied.backends, maglev) {
                    Ok(table) => {
                        applied.maglev_tables += 1;
                        ops.push(Op::PutMaglevTable(generation, table));
                    }
                    Err(err) => {
                        errors.push(CapacityError {
                            name: format!("{}: {err}", frontend.name),
                            map: "Maglev table",
                            needed: frontend.backends.len(),
                            capacity: maglev.size,
                        });
                        continue;
                    }
                }
                generation
            } else {
                0
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
        let entry = AppliedFrontend {
            service_id,
            generation,
            backends: frontend.backends.clone(),
            slots: if external { 0 } else { frontend.backends.len() },
            name: frontend.name.clone(),
            flags: frontend.flags,
            affinity_timeout_s: frontend.affinity_timeout_s,
            source_ranges: frontend.source_ranges.clone(),
            complete: true,
        };
        ops.push(Op::PutService(*key, entry.value()));
        if let Some(cur) = current {
            ops.extend(retire_backend_set(applied, key, &cur));
            touched.extend(cur.backends.iter().copied());
            replaced.push((*key, cur));
        }
        applied.insert_frontend(*key, entry);
        groups.push(Group {
            frontend: Some(*key),
            ops,
        });
    }

    for backend in touched {
        if !applied.refs.contains_key(&backend) {
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
fn retire_backend_set(applied: &mut Applied, key: &ServiceKey, old: &AppliedFrontend) -> Vec<Op> {
    if !uses_maglev(key.scope) {
        return slot_keys(old.generation, old.slots)
            .map(Op::DeleteSlot)
            .collect();
    }
    if old.generation == 0 {
        return Vec::new();
    }
    applied.maglev_tables = applied.maglev_tables.saturating_sub(1);
    vec![Op::DeleteMaglevTable(old.generation)]
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

/// The Maglev table of a backend set, as backend ids. Backends are keyed by
/// address and port, so every node builds the same table.
fn maglev_table(
    backends: &[Backend],
    ids: &BTreeMap<Backend, u32>,
    settings: &MaglevSettings,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let keyed: Vec<MaglevBackend<[u8; 18]>> = backends
        .iter()
        .map(|b| {
            let mut key = [0u8; 18];
            for (i, word) in b.addr.iter().enumerate() {
                key[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            key[16..].copy_from_slice(&b.port.to_ne_bytes());
            MaglevBackend::new(key, 1)
        })
        .collect();
    let by_key: BTreeMap<[u8; 18], u32> = keyed
        .iter()
        .zip(backends)
        .map(|(k, b)| (k.key, ids[b]))
        .collect();
    let sorted: Vec<u32> = maglev::sorted_backends(&keyed)
        .into_iter()
        .map(|k| by_key[&k.key])
        .collect();
    let table = maglev::build_table(&keyed, settings.size, settings.seed)?;
    Ok(table
        .into_iter()
        .map(|index| sorted[index as usize])
        .collect())
}

fn slot_keys(generation: u32, count: usize) -> impl Iterator<Item = SlotKey> {
    (0..count as u32).map(move |slot| SlotKey { generation, slot })
}

/// Encodes a display name, truncated to the map's value size on a char boundary.
pub fn name_from_str(name: &str) -> ServiceName {
    let mut bytes = [0u8; lb_common::SERVICE_NAME_LEN];
    let mut end = name.len().min(bytes.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
    ServiceName { bytes }
}

/// Decodes a display name.
pub fn name_to_string(name: &ServiceName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addr::{addr_from_ip, port_to_be},
        model::Frontend,
    };
    use lb_common::{PROTO_TCP, SCOPE_EXTERNAL};

    fn key(last: u8) -> ServiceKey {
        ServiceKey {
            addr: addr_from_ip(format!("10.96.0.{last}").parse().unwrap()),
            port: port_to_be(80),
            proto: PROTO_TCP,
            scope: SCOPE_EXTERNAL,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            addr: addr_from_ip(format!("10.0.0.{last}").parse().unwrap()),
            port: port_to_be(8080),
            proto: PROTO_TCP,
            flags: 0,
        }
    }

    fn desired(entries: &[(u8, &[u8])]) -> DesiredState {
        DesiredState {
            frontends: entries
                .iter()
                .map(|(k, bs)| {
                    (
                        key(*k),
                        Frontend {
                            name: format!("default/svc{k}"),
                            backends: bs.iter().map(|b| backend(*b)).collect(),
                            flags: 0,
                            affinity_timeout_s: 0,
                            source_ranges: Vec::new(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A fake map store that executes plans, to check the plan against a dump.
    #[derive(Default)]
    struct FakeMaps {
        dump: Dump,
        tables: BTreeMap<u32, Vec<u32>>,
        ranges: BTreeSet<(u32, IpAddr, u8)>,
    }

    impl FakeMaps {
        fn execute(&mut self, plan: &Plan) {
            fn put<K: PartialEq + Copy, V: Copy>(v: &mut Vec<(K, V)>, k: K, val: V) {
                v.retain(|(x, _)| *x != k);
                v.push((k, val));
            }
            fn del<K: PartialEq, V>(v: &mut Vec<(K, V)>, k: &K) {
                v.retain(|(x, _)| x != k);
            }
            for op in plan.groups.iter().flat_map(|g| &g.ops) {
                let d = &mut self.dump;
                match op {
                    Op::PutBackend(id, b) => put(&mut d.backends, *id, *b),
                    Op::PutSlot(k, id) => put(&mut d.slots, *k, *id),
                    Op::PutRevNat(id, r) => put(&mut d.rev_nat, *id, *r),
                    Op::PutName(id, n) => put(&mut d.names, *id, *n),
                    Op::PutMaglevTable(generation, table) => {
                        assert!(table
                            .iter()
                            .all(|id| d.backends.iter().any(|(b, _)| b == id)));
                        self.tables.insert(*generation, table.clone());
                    }
                    Op::DeleteMaglevTable(generation) => {
                        self.tables.remove(generation);
                    }
                    Op::PutSourceRange(id, addr, len) => {
                        self.ranges.insert((*id, *addr, *len));
                    }
                    Op::DeleteSourceRange(id, addr, len) => {
                        self.ranges.remove(&(*id, *addr, *len));
                    }
                    Op::PutService(k, v) if uses_maglev(k.scope) => {
                        if v.backend_count > 0 {
                            assert!(
                                self.tables.contains_key(&v.slot_generation),
                                "table written before flip"
                            );
                        }
                        put(&mut d.services, *k, *v)
                    }
                    Op::PutService(k, v) => {
                        // The flip must only point at slots and backends that exist.
                        for slot in 0..v.backend_count {
                            let sk = SlotKey {
                                generation: v.slot_generation,
                                slot,
                            };
                            let (_, id) = d
                                .slots
                                .iter()
                                .find(|(k, _)| *k == sk)
                                .expect("slot written before flip");
                            assert!(
                                d.backends.iter().any(|(b, _)| b == id),
                                "backend written before flip"
                            );
                        }
                        put(&mut d.services, *k, *v)
                    }
                    Op::DeleteSlot(k) => del(&mut d.slots, k),
                    Op::DeleteService(k) => del(&mut d.services, k),
                    Op::DeleteRevNat(id) => del(&mut d.rev_nat, id),
                    Op::DeleteName(id) => del(&mut d.names, id),
                    Op::DeleteBackend(id) => del(&mut d.backends, id),
                }
            }
        }
    }

    fn step(maps: &mut FakeMaps, applied: &Applied, d: &DesiredState) -> Applied {
        let mut next = applied.clone();
        let plan = plan(
            &mut next,
            d,
            &Capacity::default(),
            &MaglevSettings::default(),
            Scope::All,
        );
        assert!(plan.errors.is_empty());
        maps.execute(&plan);
        // What we think is applied must equal what a fresh adoption sees.
        let adopted = Applied::adopt(&maps.dump);
        assert_eq!(adopted.frontends, next.frontends);
        assert_eq!(adopted.backends, next.backends);
        assert_eq!(adopted.refs, next.refs);
        assert_eq!(adopted.slot_count, next.slot_count);
        assert!(adopted.orphans.is_empty(), "{:?}", adopted.orphans);
        next
    }

    fn plan_all(applied: &Applied, d: &DesiredState, capacity: &Capacity) -> (Plan, Applied) {
        let mut next = applied.clone();
        let p = plan(
            &mut next,
            d,
            capacity,
            &MaglevSettings::default(),
            Scope::All,
        );
        (p, next)
    }

    #[test]
    fn add_change_and_remove_leave_maps_exactly_as_desired() {
        let mut maps = FakeMaps::default();
        let a = step(
            &mut maps,
            &Applied::default(),
            &desired(&[(1, &[1, 2, 3]), (2, &[3])]),
        );
        let b = step(&mut maps, &a, &desired(&[(1, &[1, 3, 4]), (2, &[3])]));
        assert_eq!(
            b.frontends[&key(1)].service_id,
            a.frontends[&key(1)].service_id
        );
        assert_ne!(
            b.frontends[&key(1)].generation,
            a.frontends[&key(1)].generation
        );
        let c = step(&mut maps, &b, &desired(&[(2, &[])]));
        assert_eq!(maps.dump.backends.len(), 0);
        assert_eq!(maps.dump.slots.len(), 0);
        assert_eq!(maps.dump.services.len(), 1);
        assert_eq!(c.slot_count(), 0);
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let mut maps = FakeMaps::default();
        let d = desired(&[(1, &[1, 2]), (2, &[2, 3])]);
        let a = step(&mut maps, &Applied::default(), &d);
        assert!(plan_all(&a, &d, &Capacity::default()).0.is_empty());
        // Also after a restart that adopts the maps.
        let adopted = Applied::adopt(&maps.dump);
        assert!(plan_all(&adopted, &d, &Capacity::default()).0.is_empty());
    }

    #[test]
    fn adoption_deletes_orphans_and_repairs_incomplete_frontends() {
        let mut maps = FakeMaps::default();
        let d = desired(&[(1, &[1, 2])]);
        step(&mut maps, &Applied::default(), &d);
        maps.dump.slots.push((
            SlotKey {
                generation: 999,
                slot: 0,
            },
            1,
        ));
        maps.dump.rev_nat.push((555, maps.dump.rev_nat[0].1));
        maps.dump
            .slots
            .retain(|(k, _)| k.slot != 1 || k.generation == 999);
        let adopted = Applied::adopt(&maps.dump);
        assert!(!adopted.frontends[&key(1)].complete);
        step(&mut maps, &adopted, &d);
        assert_eq!(maps.dump.slots.len(), 2);
        assert_eq!(maps.dump.rev_nat.len(), 1);
    }

    #[test]
    fn capacity_errors_keep_the_previous_state() {
        let mut maps = FakeMaps::default();
        let a = step(&mut maps, &Applied::default(), &desired(&[(1, &[1])]));
        let cap = Capacity {
            services: 10,
            backends: 3,
            slots: 10,
            maglev_entries: 0,
        };
        let (p, next) = plan_all(&a, &desired(&[(1, &[1, 2, 3, 4]), (2, &[1])]), &cap);
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].map, "backend");
        assert_eq!(next.frontends[&key(1)].backends, vec![backend(1)]);
        assert!(next.frontends.contains_key(&key(2)));
    }

    #[test]
    fn turning_affinity_on_rewrites_only_the_frontend_entry() {
        let mut maps = FakeMaps::default();
        let d = desired(&[(1, &[1, 2])]);
        let a = step(&mut maps, &Applied::default(), &d);
        let mut with_affinity = d.clone();
        let fe = with_affinity.frontends.get_mut(&key(1)).unwrap();
        fe.flags = lb_common::SERVICE_FLAG_AFFINITY;
        fe.affinity_timeout_s = 30;
        let (p, _) = plan_all(&a, &with_affinity, &Capacity::default());
        assert_eq!(p.op_count(), 1);
        assert!(
            matches!(p.groups[0].ops[0], Op::PutService(_, v) if v.affinity_timeout_s == 30 && v.slot_generation == a.frontends[&key(1)].generation)
        );
        step(&mut maps, &a, &with_affinity);
    }

    #[test]
    fn a_scoped_plan_touches_only_the_listed_frontends() {
        let mut maps = FakeMaps::default();
        let a = step(
            &mut maps,
            &Applied::default(),
            &desired(&[(1, &[1, 2]), (2, &[2, 3])]),
        );
        // Frontend 1 changes and 2 disappears, but only 1 is in scope.
        let d = desired(&[(1, &[1])]);
        let mut next = a.clone();
        let only: BTreeSet<ServiceKey> = [key(1)].into();
        let p = plan(
            &mut next,
            &d,
            &Capacity::default(),
            &MaglevSettings::default(),
            Scope::Only(&only),
        );
        maps.execute(&p);
        assert!(next.frontends.contains_key(&key(2)));
        assert_eq!(next.frontends[&key(1)].backends, vec![backend(1)]);
        // Backend 2 is still used by frontend 2; nothing else is unused.
        assert!(next.backends.contains_key(&backend(2)));
        assert_eq!(Applied::adopt(&maps.dump).frontends, next.frontends);
    }

    fn external(last: u8) -> ServiceKey {
        ServiceKey {
            scope: lb_common::tc::SCOPE_TC_EXTERNAL,
            ..key(last)
        }
    }

    #[test]
    fn external_frontends_get_maglev_tables_made_before_broken() {
        let mut maps = FakeMaps::default();
        let backends: Vec<Backend> = (1..=3).map(backend).collect();
        let mut d = DesiredState::default();
        d.frontends.insert(
            external(1),
            Frontend {
                name: "default/np".into(),
                backends: backends.clone(),
                flags: 0,
                affinity_timeout_s: 0,
                source_ranges: vec![("10.1.0.0".parse().unwrap(), 16)],
            },
        );
        let mut applied = Applied::default();
        let settings = MaglevSettings { size: 251, seed: 7 };
        let apply = |maps: &mut FakeMaps, applied: &mut Applied, d: &DesiredState| {
            maps.execute(&plan(
                applied,
                d,
                &Capacity::default(),
                &settings,
                Scope::All,
            ));
        };
        apply(&mut maps, &mut applied, &d);
        let generation = applied.frontends[&external(1)].generation;
        let table = maps.tables[&generation].clone();
        assert_eq!(table.len(), 251);
        assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 3);
        assert_eq!(maps.ranges.len(), 1);
        // Another node with other ids and input order builds the same table
        // in terms of backends.
        let mut other = Applied {
            next_id: 1000,
            ..Default::default()
        };
        let mut reversed = d.clone();
        reversed
            .frontends
            .get_mut(&external(1))
            .unwrap()
            .backends
            .reverse();
        let p2 = plan(
            &mut other,
            &reversed,
            &Capacity::default(),
            &settings,
            Scope::All,
        );
        let Some(Op::PutMaglevTable(_, table2)) = p2.groups[0]
            .ops
            .iter()
            .find(|o| matches!(o, Op::PutMaglevTable(..)))
        else {
            panic!("no table")
        };
        let by_id = |a: &Applied, id: u32| *a.backends.iter().find(|(_, i)| **i == id).unwrap().0;
        assert!(table
            .iter()
            .zip(table2)
            .all(|(a, b)| by_id(&applied, *a) == by_id(&other, *b)));
        // Removing a backend writes a new table, flips, then deletes the old one.
        d.frontends.get_mut(&external(1)).unwrap().backends.pop();
        apply(&mut maps, &mut applied, &d);
        assert_eq!(maps.tables.len(), 1);
        assert!(!maps.tables.contains_key(&generation));
        d.frontends.clear();
        apply(&mut maps, &mut applied, &d);
        assert!(maps.tables.is_empty() && maps.ranges.is_empty());
    }

    #[test]
    fn maglev_frontends_with_under_100_slots_per_backend_are_reported_once() {
        let mut d = DesiredState::default();
        let frontend = |name: &str, backends: u8| Frontend {
            name: name.into(),
            backends: (1..=backends).map(backend).collect(),
            flags: 0,
            affinity_timeout_s: 0,
            source_ranges: Vec::new(),
        };
        // Two Maglev frontends of one Service (e.g. NodePort and ExternalIP).
        d.frontends.insert(external(1), frontend("default/big", 3));
        d.frontends.insert(external(2), frontend("default/big", 2));
        d.frontends
            .insert(external(3), frontend("default/small", 2));
        // Socket-path frontends have no Maglev table, whatever their size.
        d.frontends.insert(key(4), frontend("default/cluster", 9));
        let mut applied = Applied::default();
        let settings = MaglevSettings { size: 251, seed: 7 };
        let p = plan(
            &mut applied,
            &d,
            &Capacity::default(),
            &settings,
            Scope::All,
        );
        assert!(p.errors.is_empty());
        assert_eq!(
            applied.undersized_maglev_tables(settings.size),
            vec![UndersizedTable {
                name: "default/big".into(),
                backends: 3,
                wanted_size: 509,
            }]
        );
        assert!(applied.undersized_maglev_tables(509).is_empty());
    }

    #[test]
    fn names_are_truncated_on_char_boundaries() {
        let long = "é".repeat(100);
        let name = name_to_string(&name_from_str(&long));
        assert!(name.len() <= lb_common::SERVICE_NAME_LEN);
        assert!(long.starts_with(&name));
    }
}
