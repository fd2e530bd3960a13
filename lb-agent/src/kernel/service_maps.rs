//! The maps plans write: frontends, backends, slots, reverse translations
//! and names (shared by both program sets), Maglev tables and source ranges
//! (tc path), and the session affinity and socket translations the
//! reconciler prunes and reads. [`ServiceMaps`] is what the reconciler needs
//! of them; [`AyaServiceMaps`] is the kernel's, and the `fake` and `faulty`
//! modules are in-memory ones for tests.

use std::{net::IpAddr, path::Path};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError},
    EbpfLoader, Pod,
};
use lb_common::{
    affinity::{AffinityKey, AffinityValue, TcAffinityKey},
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    maps,
    service::{Backend, RevNat, ServiceKey, ServiceName, ServiceValue, SlotKey},
    socket::{backend_port_bit, SockRevNatKey, BACKEND_PORT_WORDS},
    source_range::{SourceRangeKey, SOURCE_RANGE_ID_BITS},
};
use lb_core::{
    addr::{addr_from_ip, ip_from_addr},
    plan::{Dump, Op, SourceRange},
};

use super::{ignore_missing, pins, KernelError, OnMap};

/// Capacities of the frontend and backend maps both program sets share,
/// used when the maps are created (a pinned map keeps its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCapacities {
    /// Frontends (and their reverse translations, names, round-robin
    /// positions).
    pub services: u32,
    /// Backends.
    pub backends: u32,
    /// Backend slots of the socket path.
    pub backend_slots: u32,
}

impl Default for ServiceCapacities {
    fn default() -> Self {
        Self {
            services: maps::MAX_SERVICES,
            backends: maps::MAX_BACKENDS,
            backend_slots: maps::MAX_BACKEND_SLOTS,
        }
    }
}

impl ServiceCapacities {
    /// Sets them on a loader (names an object lacks are ignored).
    pub(crate) fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for name in [
            maps::SERVICES,
            maps::REV_NAT,
            maps::SERVICE_NAMES,
            maps::ROUND_ROBIN,
        ] {
            loader.map_max_entries(name, self.services);
        }
        loader.map_max_entries(maps::BACKENDS, self.backends);
        loader.map_max_entries(maps::BACKEND_SLOTS, self.backend_slots);
    }
}

/// A map's capacity (`max_entries`), as it was created.
pub(crate) fn capacity_of(map: &MapData, name: &'static str) -> Result<u32, KernelError> {
    map.info().map(|info| info.max_entries()).on(name)
}

/// What the reconciler reads and writes.
pub trait ServiceMaps {
    /// Every entry of every map a plan writes.
    fn dump(&self) -> Result<Dump, KernelError>;
    /// Executes one map write of a plan.
    fn write(&mut self, op: &Op) -> Result<(), KernelError>;
    /// Deletes the session affinity entries, of both paths, whose
    /// (service id, backend id) `keep` rejects. Returns how many.
    fn prune_affinity(&mut self, keep: &dyn Fn(u32, u32) -> bool) -> Result<usize, KernelError>;
    /// The reverse translations of open translated sockets: the socket (its
    /// cookie) and the backend it was sent to, and the frontend it shows.
    fn socket_translations(&self) -> Result<Vec<(SockRevNatKey, RevNat)>, KernelError>;
    /// Whether a socket's reverse translation is still there.
    fn has_socket_translation(&self, key: &SockRevNatKey) -> Result<bool, KernelError>;
    /// Deletes one socket's reverse translation (gone already is fine).
    fn forget_socket_translation(&mut self, key: &SockRevNatKey) -> Result<(), KernelError>;
}

/// Every entry of a hash map; entries evicted or deleted during the walk
/// are skipped.
pub(crate) fn entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, KernelError> {
    map.iter()
        .filter(|entry| !matches!(entry, Err(MapError::KeyNotFound)))
        .collect::<Result<Vec<_>, _>>()
        .on(name)
}

/// Deletes the entries of `map` that `keep` rejects; returns how many.
pub(crate) fn prune<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    keep: impl Fn(&K, &V) -> bool,
) -> Result<usize, KernelError> {
    let stale: Vec<K> = entries(map, name)?
        .into_iter()
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k)
        .collect();
    for key in &stale {
        ignore_missing(map.remove(key)).on(name)?;
    }
    Ok(stale.len())
}

fn hash_map<K: Pod, V: Pod>(
    map: Map,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, KernelError> {
    HashMap::try_from(map).on(name)
}

/// Where the maps come from: an object just loaded, or the pins of a
/// running agent (for `lbctl`).
pub(crate) trait MapSource {
    /// The map of this name.
    fn open(&mut self, name: &'static str) -> Result<Map, KernelError>;
}

impl MapSource for aya::Ebpf {
    fn open(&mut self, name: &'static str) -> Result<Map, KernelError> {
        self.take_map(name).ok_or(KernelError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })
    }
}

impl MapSource for &Path {
    fn open(&mut self, name: &'static str) -> Result<Map, KernelError> {
        pins::open_map(self, name)
    }
}

/// [`maps::BACKEND_PORTS`] and the agent's copy of it, so that only the
/// first backend on a port costs a write.
struct BackendPorts {
    map: Array<MapData, u64>,
    words: Vec<u64>,
}

impl BackendPorts {
    fn new(map: Map) -> Result<Self, KernelError> {
        let name = maps::BACKEND_PORTS;
        let map = Array::try_from(map).on(name)?;
        let words = (0..BACKEND_PORT_WORDS)
            .map(|index| map.get(&index, 0))
            .collect::<Result<_, _>>()
            .on(name)?;
        Ok(Self { map, words })
    }

    /// Adds `port` (network byte order) to the set.
    fn add(&mut self, port: u16) -> Result<(), KernelError> {
        let (index, bit) = backend_port_bit(port);
        let word = &mut self.words[index as usize];
        if *word & bit == 0 {
            self.map
                .set(index, *word | bit, 0)
                .on(maps::BACKEND_PORTS)?;
            *word |= bit;
        }
        Ok(())
    }
}

/// The maps of the socket object that plans write.
pub struct SocketMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    names: HashMap<MapData, u32, ServiceName>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_rev_nat: HashMap<MapData, SockRevNatKey, RevNat>,
    backend_ports: BackendPorts,
}

impl SocketMaps {
    pub(crate) fn take(from: &mut impl MapSource) -> Result<Self, KernelError> {
        let mut maps = Self {
            services: hash_map(from.open(maps::SERVICES)?, maps::SERVICES)?,
            slots: hash_map(from.open(maps::BACKEND_SLOTS)?, maps::BACKEND_SLOTS)?,
            backends: hash_map(from.open(maps::BACKENDS)?, maps::BACKENDS)?,
            rev_nat: hash_map(from.open(maps::REV_NAT)?, maps::REV_NAT)?,
            names: hash_map(from.open(maps::SERVICE_NAMES)?, maps::SERVICE_NAMES)?,
            affinity: hash_map(from.open(maps::AFFINITY)?, maps::AFFINITY)?,
            sock_rev_nat: hash_map(from.open(maps::SOCK_REV_NAT)?, maps::SOCK_REV_NAT)?,
            backend_ports: BackendPorts::new(from.open(maps::BACKEND_PORTS)?)?,
        };
        maps.sync_backend_ports()?;
        Ok(maps)
    }

    /// Adds the ports of the backends already in the map to the backend
    /// ports, for a map created by an agent that predates it (or lost).
    fn sync_backend_ports(&mut self) -> Result<(), KernelError> {
        for (_, backend) in entries(&self.backends, maps::BACKENDS)? {
            self.backend_ports.add(backend.port)?;
        }
        Ok(())
    }

    /// The display names of the services, by service id.
    pub fn service_names(&self) -> Result<Vec<(u32, ServiceName)>, KernelError> {
        entries(&self.names, maps::SERVICE_NAMES)
    }

    /// The capacities of the frontend, backend and slot maps, as created.
    pub fn capacities(&self) -> Result<ServiceCapacities, KernelError> {
        Ok(ServiceCapacities {
            services: capacity_of(IterableMap::map(&self.services), maps::SERVICES)?,
            backends: capacity_of(IterableMap::map(&self.backends), maps::BACKENDS)?,
            backend_slots: capacity_of(IterableMap::map(&self.slots), maps::BACKEND_SLOTS)?,
        })
    }
}

/// The maps of the tc object that plans write.
pub struct TcMaps {
    maglev: HashMap<MapData, MaglevKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    affinity: HashMap<MapData, TcAffinityKey, AffinityValue>,
}

impl TcMaps {
    pub(crate) fn take(from: &mut impl MapSource) -> Result<Self, KernelError> {
        Ok(Self {
            maglev: hash_map(from.open(maps::MAGLEV)?, maps::MAGLEV)?,
            source_ranges: LpmTrie::try_from(from.open(maps::SOURCE_RANGES)?)
                .on(maps::SOURCE_RANGES)?,
            affinity: hash_map(from.open(maps::TC_AFFINITY)?, maps::TC_AFFINITY)?,
        })
    }

    /// The Maglev map's capacity, as it was created.
    pub fn maglev_capacity(&self) -> Result<u32, KernelError> {
        capacity_of(IterableMap::map(&self.maglev), maps::MAGLEV)
    }

    /// The source range map's capacity, as it was created.
    pub fn source_range_capacity(&self) -> Result<u32, KernelError> {
        capacity_of(IterableMap::map(&self.source_ranges), maps::SOURCE_RANGES)
    }

    /// Writes a complete Maglev table of backend ids under `generation`: the
    /// slots first, the size entry last, so the generation is usable only
    /// once complete.
    pub fn write_table(&mut self, generation: u32, backend_ids: &[u32]) -> Result<(), KernelError> {
        let size = u32::try_from(backend_ids.len())
            .ok()
            .filter(|&size| size != 0 && size != MAGLEV_SIZE_INDEX)
            .ok_or(KernelError::BadTableSize(backend_ids.len()))?;
        for (index, id) in (0..size).zip(backend_ids) {
            self.maglev
                .insert(MaglevKey { generation, index }, id, 0)
                .on(maps::MAGLEV)?;
        }
        let size_key = MaglevKey {
            generation,
            index: MAGLEV_SIZE_INDEX,
        };
        self.maglev.insert(size_key, size, 0).on(maps::MAGLEV)
    }

    /// Deletes the table of `generation`: the size entry first, so a reader
    /// never uses a partly deleted table, then every slot.
    pub fn delete_table(&mut self, generation: u32, size: usize) -> Result<(), KernelError> {
        let indices = [MAGLEV_SIZE_INDEX].into_iter().chain(0..size as u32);
        for index in indices {
            ignore_missing(self.maglev.remove(&MaglevKey { generation, index }))
                .on(maps::MAGLEV)?;
        }
        Ok(())
    }

    /// Allows `addr/len` to reach the frontends of `service_id` that carry
    /// `SERVICE_FLAG_SOURCE_RANGES`.
    pub fn allow_source_range(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        len: u8,
    ) -> Result<(), KernelError> {
        let key = Self::range_key(service_id, addr, len)?;
        self.source_ranges
            .insert(&key, 1, 0)
            .on(maps::SOURCE_RANGES)
    }

    /// Removes a range [`allow_source_range`](Self::allow_source_range) added.
    pub fn remove_source_range(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        len: u8,
    ) -> Result<(), KernelError> {
        let key = Self::range_key(service_id, addr, len)?;
        ignore_missing(self.source_ranges.remove(&key)).on(maps::SOURCE_RANGES)
    }

    /// Deletes the tc path's session affinity entries whose (service id,
    /// backend id) `keep` rejects; returns how many.
    pub fn prune_affinity(
        &mut self,
        keep: &dyn Fn(u32, u32) -> bool,
    ) -> Result<usize, KernelError> {
        prune(&mut self.affinity, maps::TC_AFFINITY, |k, v| {
            keep(k.service_id, v.backend_id)
        })
    }

    /// The session affinity entries of the tc path, for tests and debugging.
    pub fn affinity_entries(&self) -> Result<Vec<(TcAffinityKey, AffinityValue)>, KernelError> {
        entries(&self.affinity, maps::TC_AFFINITY)
    }

    fn range_key(
        service_id: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<Key<SourceRangeKey>, KernelError> {
        let (max, offset) = match addr {
            IpAddr::V4(_) => (32, 96),
            IpAddr::V6(_) => (128, 0),
        };
        if prefix_len > max {
            return Err(KernelError::BadPrefix {
                addr,
                len: prefix_len,
            });
        }
        Ok(Key::new(
            SOURCE_RANGE_ID_BITS + offset + u32::from(prefix_len),
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr: addr_from_ip(addr),
            },
        ))
    }

    /// The range a trie key holds.
    fn range_of(key: &Key<SourceRangeKey>) -> SourceRange {
        let data = key.data();
        let bits = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
        let addr = ip_from_addr(&data.addr);
        let len = match addr {
            IpAddr::V4(_) => bits.saturating_sub(96),
            IpAddr::V6(_) => bits,
        };
        SourceRange {
            service_id: u32::from_be(data.service_id_be),
            addr,
            len: len as u8,
        }
    }

    fn dump_into(&self, dump: &mut Dump) -> Result<(), KernelError> {
        dump.maglev = entries(&self.maglev, maps::MAGLEV)?;
        dump.source_ranges = self
            .source_ranges
            .keys()
            .filter(|key| !matches!(key, Err(MapError::KeyNotFound)))
            .map(|key| key.map(|k| Self::range_of(&k)))
            .collect::<Result<_, _>>()
            .on(maps::SOURCE_RANGES)?;
        Ok(())
    }
}

/// The kernel's maps: the socket object's, and the tc object's when the tc
/// path is enabled.
pub struct AyaServiceMaps {
    socket: SocketMaps,
    tc: Option<TcMaps>,
}

impl AyaServiceMaps {
    /// The maps of freshly loaded objects.
    pub fn new(socket: SocketMaps, tc: Option<TcMaps>) -> Self {
        Self { socket, tc }
    }

    /// The capacities of the frontend, backend and slot maps, as created.
    pub fn capacities(&self) -> Result<ServiceCapacities, KernelError> {
        self.socket.capacities()
    }

    /// The source range map's capacity, as it was created; `None` without
    /// the tc path.
    pub fn source_range_capacity(&self) -> Result<Option<u32>, KernelError> {
        self.tc
            .as_ref()
            .map(TcMaps::source_range_capacity)
            .transpose()
    }

    /// Opens the maps pinned in `dir` by a running (or past) agent; the tc
    /// maps only if the tc path pinned them.
    pub fn open_pinned(dir: &Path) -> Result<Self, KernelError> {
        let mut source = dir;
        let socket = SocketMaps::take(&mut source)?;
        let tc = match pins::open_map_if_pinned(dir, maps::MAGLEV)? {
            Some(_) => Some(TcMaps::take(&mut source)?),
            None => None,
        };
        Ok(Self { socket, tc })
    }

    /// The display names of the services, by service id.
    pub fn service_names(&self) -> Result<Vec<(u32, ServiceName)>, KernelError> {
        self.socket.service_names()
    }

    fn tc(&mut self) -> Result<&mut TcMaps, KernelError> {
        self.tc.as_mut().ok_or(KernelError::TcDisabled)
    }
}

impl ServiceMaps for AyaServiceMaps {
    fn dump(&self) -> Result<Dump, KernelError> {
        let s = &self.socket;
        let mut dump = Dump {
            services: entries(&s.services, maps::SERVICES)?,
            slots: entries(&s.slots, maps::BACKEND_SLOTS)?,
            backends: entries(&s.backends, maps::BACKENDS)?,
            rev_nat: entries(&s.rev_nat, maps::REV_NAT)?,
            names: s.service_names()?,
            ..Dump::default()
        };
        if let Some(tc) = &self.tc {
            tc.dump_into(&mut dump)?;
        }
        Ok(dump)
    }

    fn write(&mut self, op: &Op) -> Result<(), KernelError> {
        let s = &mut self.socket;
        match op {
            Op::PutBackend(id, b) => {
                // Before the backend: a socket steered to it must find its port set.
                s.backend_ports.add(b.port)?;
                s.backends.insert(id, b, 0).on(maps::BACKENDS)
            }
            Op::PutSlot(k, id) => s.slots.insert(k, id, 0).on(maps::BACKEND_SLOTS),
            Op::PutRevNat(id, r) => s.rev_nat.insert(id, r, 0).on(maps::REV_NAT),
            Op::PutName(id, n) => s.names.insert(id, n, 0).on(maps::SERVICE_NAMES),
            Op::PutService(k, v) => s.services.insert(k, v, 0).on(maps::SERVICES),
            Op::DeleteSlot(k) => ignore_missing(s.slots.remove(k)).on(maps::BACKEND_SLOTS),
            Op::DeleteService(k) => ignore_missing(s.services.remove(k)).on(maps::SERVICES),
            Op::DeleteRevNat(id) => ignore_missing(s.rev_nat.remove(id)).on(maps::REV_NAT),
            Op::DeleteName(id) => ignore_missing(s.names.remove(id)).on(maps::SERVICE_NAMES),
            Op::DeleteBackend(id) => ignore_missing(s.backends.remove(id)).on(maps::BACKENDS),
            Op::PutMaglevTable(generation, table) => self.tc()?.write_table(*generation, table),
            Op::DeleteMaglevTable(generation, size) => self.tc()?.delete_table(*generation, *size),
            Op::PutSourceRange(id, addr, len) => self.tc()?.allow_source_range(*id, *addr, *len),
            Op::DeleteSourceRange(id, addr, len) => {
                self.tc()?.remove_source_range(*id, *addr, *len)
            }
        }
    }

    fn prune_affinity(&mut self, keep: &dyn Fn(u32, u32) -> bool) -> Result<usize, KernelError> {
        let mut pruned = prune(&mut self.socket.affinity, maps::AFFINITY, |k, v| {
            keep(k.service_id, v.backend_id)
        })?;
        if let Some(tc) = &mut self.tc {
            pruned += tc.prune_affinity(keep)?;
        }
        Ok(pruned)
    }

    fn socket_translations(&self) -> Result<Vec<(SockRevNatKey, RevNat)>, KernelError> {
        entries(&self.socket.sock_rev_nat, maps::SOCK_REV_NAT)
    }

    fn has_socket_translation(&self, key: &SockRevNatKey) -> Result<bool, KernelError> {
        match self.socket.sock_rev_nat.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(err) => Err(err).on(maps::SOCK_REV_NAT),
        }
    }

    fn forget_socket_translation(&mut self, key: &SockRevNatKey) -> Result<(), KernelError> {
        ignore_missing(self.socket.sock_rev_nat.remove(key)).on(maps::SOCK_REV_NAT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_range_keys_read_back_as_written() {
        for (addr, len) in [("10.1.0.0", 16), ("0.0.0.0", 0), ("fd00::", 8), ("::", 0)] {
            let addr: IpAddr = addr.parse().unwrap();
            let key = TcMaps::range_key(77, addr, len).unwrap();
            assert_eq!(
                TcMaps::range_of(&key),
                SourceRange {
                    service_id: 77,
                    addr,
                    len
                }
            );
        }
        assert!(TcMaps::range_key(1, "10.0.0.0".parse().unwrap(), 33).is_err());
    }
}
