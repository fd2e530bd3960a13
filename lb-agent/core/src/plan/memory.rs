//! The maps a plan writes, as plain data: [`MemoryMaps`] executes [`Op`]s
//! with the kernel's capacity limits and checks that every flip points at a
//! complete backend set, so tests (and the agent's fake kernel) can run plans
//! and read back a [`Dump`] without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    service::{uses_maglev, Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey},
};

use super::{Capacity, Dump, Op, SourceRange};

/// Why [`MemoryMaps::write`] refused an operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The map holds its capacity and the key is new (the kernel answers
    /// E2BIG for hash maps, ENOSPC for LPM tries).
    #[error("{map} map full ({capacity} entries)")]
    Full {
        /// Which map.
        map: &'static str,
        /// Its capacity.
        capacity: usize,
    },
    /// A frontend would point at slots, backends or a Maglev table that are
    /// not (all) written: a reader would see a half-written service.
    #[error("{0:?} points at a backend set that is not complete")]
    Dangling(ServiceKey),
}

/// The plan's maps as ordered maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryMaps {
    /// Frontends.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Backend slots.
    pub slots: BTreeMap<SlotKey, u32>,
    /// Backends by id.
    pub backends: BTreeMap<u32, Backend>,
    /// Reverse translations.
    pub rev_nat: BTreeMap<u32, RevNat>,
    /// Display names.
    pub names: BTreeMap<u32, ServiceName>,
    /// Maglev table entries.
    pub maglev: BTreeMap<MaglevKey, u32>,
    /// Source ranges.
    pub source_ranges: BTreeSet<SourceRange>,
    capacity: Capacity,
}

/// Inserts `key` unless that would grow `map` past `capacity`.
fn put<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    name: &'static str,
    capacity: usize,
) -> Result<(), MemoryError> {
    if !map.contains_key(&key) && map.len() >= capacity {
        return Err(MemoryError::Full {
            map: name,
            capacity,
        });
    }
    map.insert(key, value);
    Ok(())
}

impl MemoryMaps {
    /// Empty maps with these capacities ([`Default`] gives the kernel
    /// maps' own).
    pub fn with_capacity(capacity: Capacity) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Executes one operation.
    pub fn write(&mut self, op: &Op) -> Result<(), MemoryError> {
        let capacity = self.capacity;
        match op {
            Op::PutBackend(id, backend) => put(
                &mut self.backends,
                *id,
                *backend,
                "backend",
                capacity.backends,
            ),
            Op::PutSlot(key, id) => put(&mut self.slots, *key, *id, "backend slot", capacity.slots),
            Op::PutRevNat(id, rev) => put(
                &mut self.rev_nat,
                *id,
                *rev,
                "reverse NAT",
                capacity.services,
            ),
            Op::PutName(id, name) => put(&mut self.names, *id, *name, "name", capacity.services),
            Op::PutService(key, value) => {
                if !self.complete(key, value) {
                    return Err(MemoryError::Dangling(*key));
                }
                put(
                    &mut self.services,
                    *key,
                    *value,
                    "service",
                    capacity.services,
                )
            }
            Op::DeleteSlot(key) => {
                self.slots.remove(key);
                Ok(())
            }
            Op::DeleteService(key) => {
                self.services.remove(key);
                Ok(())
            }
            Op::DeleteRevNat(id) => {
                self.rev_nat.remove(id);
                Ok(())
            }
            Op::DeleteName(id) => {
                self.names.remove(id);
                Ok(())
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(id);
                Ok(())
            }
            Op::PutMaglevTable(generation, table) => {
                for (index, id) in table.iter().enumerate() {
                    let key = MaglevKey {
                        generation: *generation,
                        index: index as u32,
                    };
                    put(
                        &mut self.maglev,
                        key,
                        *id,
                        "Maglev table",
                        capacity.maglev_entries,
                    )?;
                }
                let size_key = MaglevKey {
                    generation: *generation,
                    index: MAGLEV_SIZE_INDEX,
                };
                put(
                    &mut self.maglev,
                    size_key,
                    table.len() as u32,
                    "Maglev table",
                    capacity.maglev_entries,
                )
            }
            Op::DeleteMaglevTable(generation, size) => {
                let indices = (0..*size as u32).chain([MAGLEV_SIZE_INDEX]);
                for index in indices {
                    self.maglev.remove(&MaglevKey {
                        generation: *generation,
                        index,
                    });
                }
                Ok(())
            }
            Op::PutSourceRange(service_id, addr, len) => {
                let range = SourceRange {
                    service_id: *service_id,
                    addr: *addr,
                    len: *len,
                };
                if !self.source_ranges.contains(&range)
                    && self.source_ranges.len() >= capacity.source_ranges
                {
                    return Err(MemoryError::Full {
                        map: "source range",
                        capacity: capacity.source_ranges,
                    });
                }
                self.source_ranges.insert(range);
                Ok(())
            }
            Op::DeleteSourceRange(service_id, addr, len) => {
                self.source_ranges.remove(&SourceRange {
                    service_id: *service_id,
                    addr: *addr,
                    len: *len,
                });
                Ok(())
            }
        }
    }

    /// Whether the backend set `value` points at is complete: every slot and
    /// its backend, or the whole Maglev table with every backend it names.
    fn complete(&self, key: &ServiceKey, value: &ServiceValue) -> bool {
        if value.backend_count == 0 {
            return true;
        }
        if uses_maglev(key.scope) {
            let generation = value.slot_generation;
            let size_key = MaglevKey {
                generation,
                index: MAGLEV_SIZE_INDEX,
            };
            let Some(size) = self.maglev.get(&size_key) else {
                return false;
            };
            return (0..*size).all(|index| {
                self.maglev
                    .get(&MaglevKey { generation, index })
                    .is_some_and(|id| self.backends.contains_key(id))
            });
        }
        (0..value.backend_count).all(|slot| {
            self.slots
                .get(&SlotKey {
                    generation: value.slot_generation,
                    slot,
                })
                .is_some_and(|id| self.backends.contains_key(id))
        })
    }

    /// Everything, as the kernel shell's dump would read it.
    pub fn dump(&self) -> Dump {
        Dump {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
            names: self.names.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: self.maglev.iter().map(|(k, v)| (*k, *v)).collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        }
    }

    /// The Maglev table of `generation`, slot by slot.
    pub fn table(&self, generation: u32) -> Vec<u32> {
        self.maglev
            .range(
                MaglevKey {
                    generation,
                    index: 0,
                }..MaglevKey {
                    generation,
                    index: MAGLEV_SIZE_INDEX,
                },
            )
            .map(|(_, id)| *id)
            .collect()
    }

    /// The generations that have Maglev table entries.
    pub fn table_generations(&self) -> BTreeSet<u32> {
        self.maglev.keys().map(|k| k.generation).collect()
    }

    /// The ranges allowed for a service id.
    pub fn ranges_of(&self, service_id: u32) -> Vec<(IpAddr, u8)> {
        self.source_ranges
            .iter()
            .filter(|r| r.service_id == service_id)
            .map(|r| (r.addr, r.len))
            .collect()
    }
}
