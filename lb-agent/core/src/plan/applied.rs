//! What the maps hold: as the agent last wrote them, or as it reads them back
//! after a restart ([`Applied::adopt`]), with what nothing refers to any more
//! queued for deletion.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::{
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    service::{
        uses_maglev, Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey,
        SERVICE_NAME_LEN,
    },
};

use super::{maglev_table, MaglevSettings, Op};
use crate::maglev;

/// A loadBalancerSourceRanges entry: a source prefix allowed to reach the
/// frontends of a service id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    /// The frontend's service id.
    pub service_id: u32,
    /// The prefix's address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

/// The entries of every map the plan writes, as read from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Maglev table entries (empty without the tc path).
    pub maglev: Vec<(MaglevKey, u32)>,
    /// loadBalancerSourceRanges (empty without the tc path).
    pub source_ranges: Vec<SourceRange>,
}

/// A frontend as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedFrontend {
    /// Id keying reverse translation and names.
    pub service_id: u32,
    /// Slot or Maglev table generation in use.
    pub generation: u32,
    /// Backends: in slot order on the socket path, sorted on the tc path.
    pub backends: Vec<Backend>,
    /// Slots the frontend occupies: `backends.len()` on the socket path
    /// unless a dump found some of them missing; 0 on the tc path.
    pub slots: usize,
    /// Entries of its Maglev table, the size entry apart (0 without one).
    pub table: usize,
    /// Display name.
    pub name: String,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds.
    pub affinity_timeout_s: u32,
    /// Source ranges written for it (tc frontends).
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// Backends kept in the backend map for the frontend's established
    /// flows (its desired `draining` backends that were in the map), in no
    /// slot or table. Not stored in the maps: a restart finds them among
    /// the backends nothing refers to, and the first plan claims them.
    pub draining: Vec<Backend>,
    /// False when a dump found slots, backends or table entries missing, or
    /// a table other than the one its backends give: rewrite it.
    pub complete: bool,
}

impl AppliedFrontend {
    /// Its entry in the frontend map.
    pub fn value(&self) -> ServiceValue {
        ServiceValue {
            service_id: self.service_id,
            slot_generation: self.generation,
            backend_count: self.backends.len() as u32,
            flags: self.flags,
            affinity_timeout_s: self.affinity_timeout_s,
        }
    }
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

/// The state of the maps as the agent last wrote (or read) them.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Frontends by key.
    pub frontends: BTreeMap<ServiceKey, AppliedFrontend>,
    /// Backend ids by backend.
    pub backends: BTreeMap<Backend, u32>,
    /// How many frontends use each backend.
    pub(super) refs: HashMap<Backend, usize>,
    pub(super) slot_count: usize,
    /// Maglev map entries in use, size entries included.
    pub(super) maglev_entries: usize,
    pub(super) next_id: u32,
    pub(super) wrapped: bool,
    /// Deletions owed for entries found in a dump that nothing references.
    pub(super) orphans: Vec<Op>,
    /// Backends found in a dump that no slot or table uses: a frontend's
    /// draining backends before the restart, or leftovers. The next plan
    /// keeps those a desired frontend still drains and deletes the rest.
    pub(super) unclaimed: Vec<Backend>,
}

impl Applied {
    /// Adopts what the maps hold, e.g. after an agent restart. Entries nothing
    /// refers to are remembered and deleted by the next plan. A Maglev table
    /// is adopted as it is when it is complete and exactly the table its
    /// backends give under `maglev`; anything else is marked incomplete, so
    /// the next plan rewrites it.
    pub fn adopt(dump: &Dump, maglev: &MaglevSettings) -> Self {
        Self::read(dump, Some(maglev))
    }

    /// What the maps hold, for display: as [`Applied::adopt`], but Maglev
    /// tables are only checked to be whole, not rebuilt and compared.
    pub fn inspect(dump: &Dump) -> Self {
        Self::read(dump, None)
    }

    fn read(dump: &Dump, maglev: Option<&MaglevSettings>) -> Self {
        let backends_by_id: BTreeMap<u32, Backend> = dump.backends.iter().copied().collect();
        let slots: BTreeMap<SlotKey, u32> = dump.slots.iter().copied().collect();
        let names: BTreeMap<u32, String> = dump
            .names
            .iter()
            .map(|(id, name)| (*id, name_to_string(name)))
            .collect();
        let mut tables: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for (key, id) in &dump.maglev {
            tables
                .entry(key.generation)
                .or_default()
                .insert(key.index, *id);
        }
        let mut ranges: BTreeMap<u32, Vec<(IpAddr, u8)>> = BTreeMap::new();
        for range in &dump.source_ranges {
            ranges
                .entry(range.service_id)
                .or_default()
                .push((range.addr, range.len));
        }
        let mut applied = Applied::default();
        let mut used_generations = BTreeSet::new();
        let mut used_ids = BTreeSet::new();
        for (key, value) in &dump.services {
            used_ids.insert(value.service_id);
            used_generations.insert(value.slot_generation);
            let name = names.get(&value.service_id).cloned().unwrap_or_default();
            let source_ranges = ranges.remove(&value.service_id).unwrap_or_default();
            let mut frontend = AppliedFrontend {
                service_id: value.service_id,
                generation: value.slot_generation,
                backends: Vec::new(),
                slots: 0,
                table: 0,
                name,
                flags: value.flags,
                affinity_timeout_s: value.affinity_timeout_s,
                source_ranges,
                draining: Vec::new(),
                complete: true,
            };
            if uses_maglev(key.scope) {
                adopt_table(
                    &mut frontend,
                    value,
                    tables.get(&value.slot_generation),
                    &backends_by_id,
                    maglev,
                );
                applied.maglev_entries += table_entries(frontend.table);
            } else {
                for slot in 0..value.backend_count {
                    let backend = slots
                        .get(&SlotKey {
                            generation: value.slot_generation,
                            slot,
                        })
                        .and_then(|id| backends_by_id.get(id));
                    match backend {
                        Some(b) => frontend.backends.push(*b),
                        None => frontend.complete = false,
                    }
                }
                frontend.slots = value.backend_count as usize;
                applied.slot_count += frontend.slots;
            }
            applied.frontends.insert(*key, frontend);
        }
        for key in slots.keys() {
            if !used_generations.contains(&key.generation) {
                applied.orphans.push(Op::DeleteSlot(*key));
            }
        }
        for (generation, entries) in &tables {
            if !used_generations.contains(generation) {
                applied
                    .orphans
                    .push(Op::DeleteMaglevTable(*generation, found_size(entries)));
            }
        }
        for (service_id, orphaned) in ranges {
            applied.orphans.extend(
                orphaned
                    .into_iter()
                    .map(|(addr, len)| Op::DeleteSourceRange(service_id, addr, len)),
            );
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
            if applied.backends.contains_key(backend) {
                applied.orphans.push(Op::DeleteBackend(*id));
                continue;
            }
            applied.backends.insert(*backend, *id);
            if !applied.refs.contains_key(backend) {
                applied.unclaimed.push(*backend);
            }
        }
        // Ids of orphans count too: a fresh id equal to an orphan's would be
        // written by the next plan and then deleted by its cleanup.
        let max_id = [
            used_generations.iter().max(),
            used_ids.iter().max(),
            backends_by_id.keys().max(),
            slots.keys().map(|k| &k.generation).max(),
            tables.keys().max(),
            dump.rev_nat.iter().map(|(id, _)| id).max(),
            dump.names.iter().map(|(id, _)| id).max(),
            dump.source_ranges.iter().map(|r| &r.service_id).max(),
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

    /// Number of backend slots in use.
    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    /// Number of Maglev map entries in use, size entries included.
    pub fn maglev_entries(&self) -> usize {
        self.maglev_entries
    }

    /// Whether deletions of entries nothing refers to are still owed.
    pub fn has_orphans(&self) -> bool {
        !self.orphans.is_empty() || !self.unclaimed.is_empty()
    }

    /// Allocates a fresh id, never 0. Service ids, backend ids and generations
    /// share one counter, so an id is unique across kinds. Once the 32-bit
    /// counter has wrapped, ids still in use are skipped.
    pub(super) fn allocate_id(&mut self) -> u32 {
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

    /// Records a frontend, counting its slots, table and backend references.
    pub(super) fn insert_frontend(&mut self, key: ServiceKey, frontend: AppliedFrontend) {
        if let Some(old) = self.frontends.remove(&key) {
            self.forget_refs(&old);
        }
        self.slot_count += frontend.slots;
        self.maglev_entries += table_entries(frontend.table);
        for backend in frontend.backends.iter().chain(&frontend.draining) {
            *self.refs.entry(*backend).or_default() += 1;
        }
        self.frontends.insert(key, frontend);
    }

    /// Forgets a frontend, returning it.
    pub(super) fn remove_frontend(&mut self, key: &ServiceKey) -> Option<AppliedFrontend> {
        let old = self.frontends.remove(key)?;
        self.forget_refs(&old);
        Some(old)
    }

    /// Those of `wanted` the backend map holds: a draining backend is kept,
    /// never added (no flow can know one the map never had).
    pub(super) fn present(&self, wanted: &[Backend]) -> Vec<Backend> {
        wanted
            .iter()
            .filter(|b| self.backends.contains_key(b))
            .copied()
            .collect()
    }

    /// Whether a backend is still used (or drained) by some frontend.
    pub(super) fn is_referenced(&self, backend: &Backend) -> bool {
        self.refs.contains_key(backend)
    }

    fn forget_refs(&mut self, frontend: &AppliedFrontend) {
        self.slot_count -= frontend.slots;
        self.maglev_entries -= table_entries(frontend.table);
        for backend in frontend.backends.iter().chain(&frontend.draining) {
            if let Some(count) = self.refs.get_mut(backend) {
                *count -= 1;
                if *count == 0 {
                    self.refs.remove(backend);
                }
            }
        }
    }
}

/// Map entries a Maglev table of `size` slots takes: the slots and its size
/// entry.
pub(super) fn table_entries(size: usize) -> usize {
    if size == 0 {
        0
    } else {
        size + 1
    }
}

/// The size of a table found in a dump: its size entry, or the entries
/// present when a crash interrupted its writing before the size entry.
fn found_size(entries: &BTreeMap<u32, u32>) -> usize {
    match entries.get(&MAGLEV_SIZE_INDEX) {
        Some(size) => *size as usize,
        None => entries
            .keys()
            .next_back()
            .map_or(0, |last| *last as usize + 1),
    }
}

/// Reads a Maglev frontend's table into `frontend`: its distinct backends,
/// its size, and whether it is exactly the table those backends give.
fn adopt_table(
    frontend: &mut AppliedFrontend,
    value: &ServiceValue,
    entries: Option<&BTreeMap<u32, u32>>,
    backends_by_id: &BTreeMap<u32, Backend>,
    settings: Option<&MaglevSettings>,
) {
    let Some(entries) = entries.filter(|_| value.backend_count > 0) else {
        // No table: a frontend without endpoints, or one whose table is gone.
        frontend.complete = value.backend_count == 0;
        return;
    };
    frontend.table = found_size(entries);
    let ids: BTreeSet<u32> = entries
        .iter()
        .filter(|(index, _)| **index != MAGLEV_SIZE_INDEX)
        .map(|(_, id)| *id)
        .collect();
    let mut resolved = true;
    let mut backends = BTreeSet::new();
    for id in &ids {
        match backends_by_id.get(id) {
            Some(backend) => {
                backends.insert(*backend);
            }
            None => resolved = false,
        }
    }
    frontend.backends = backends.into_iter().collect();
    let whole = entries.contains_key(&MAGLEV_SIZE_INDEX)
        && entries.len() == frontend.table + 1
        && frontend.backends.len() == value.backend_count as usize;
    let Some(settings) = settings else {
        frontend.complete = resolved && whole;
        return;
    };
    frontend.complete =
        resolved && whole && frontend.table == settings.table_size(frontend.backends.len()) && {
            let ids_by_backend: BTreeMap<Backend, u32> = backends_by_id
                .iter()
                .filter(|(id, _)| ids.contains(id))
                .map(|(id, backend)| (*backend, *id))
                .collect();
            maglev_table(&frontend.backends, &ids_by_backend, settings).is_ok_and(|table| {
                table
                    .iter()
                    .enumerate()
                    .all(|(index, id)| entries.get(&(index as u32)) == Some(id))
            })
        };
}

/// Encodes a display name, truncated to the map's value size on a char boundary.
pub fn name_from_str(name: &str) -> ServiceName {
    let mut bytes = [0u8; SERVICE_NAME_LEN];
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
