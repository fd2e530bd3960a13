//! The policy maps of the tc object (see `lb_common::policy`), behind the
//! [`PolicyMaps`] trait: the aya implementation here, an in-memory one and
//! one that fails on purpose in [`super::fake_policy`].

use std::{net::IpAddr, path::Path};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap, MapData, MapError,
};
use lb_common::{
    conntrack::CtKey,
    maps,
    net::Addr,
    policy::{
        EndpointValue, IdentityValue, IpcacheKey, IpcacheValue, PolicyCtValue, PolicyKey,
        PolicyName, PolicySetValue, PolicyState, PolicyValue,
    },
};
use lb_policy::{
    plan::{PolicyCapacity, PolicyOp},
    tables::{
        addr_of, entry_key, entry_of, entry_value, identity_info, identity_value, ip_of,
        ipcache_key, ipcache_prefix, name_text, name_value, set_value, PolicyTables,
    },
};

use super::{
    ignore_missing,
    service_maps::{capacity_of, entries, MapSource},
    KernelError, OnMap,
};

/// The policy maps, as plans write them.
pub trait PolicyMaps {
    /// Everything the maps hold.
    fn dump(&self) -> Result<PolicyTables, KernelError>;
    /// Executes one write of a plan.
    fn write(&mut self, op: &PolicyOp) -> Result<(), KernelError>;
}

/// The policy maps of a loaded tc object, or of a running agent's pins.
pub struct AyaPolicyMaps {
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    endpoints: HashMap<MapData, Addr, EndpointValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    conntrack: HashMap<MapData, CtKey, PolicyCtValue>,
    state: Array<MapData, PolicyState>,
    identities: HashMap<MapData, u32, IdentityValue>,
    sets: HashMap<MapData, u32, PolicySetValue>,
    rules: HashMap<MapData, u32, PolicyName>,
    pod_names: HashMap<MapData, Addr, PolicyName>,
}

fn lpm<K: aya::Pod, V: aya::Pod>(
    from: &mut impl MapSource,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, V>, KernelError> {
    LpmTrie::try_from(from.open(name)?).on(name)
}

fn hash<K: aya::Pod, V: aya::Pod>(
    from: &mut impl MapSource,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, KernelError> {
    HashMap::try_from(from.open(name)?).on(name)
}

/// Every entry of an LPM trie.
fn trie_entries<K: aya::Pod, V: aya::Pod>(
    map: &LpmTrie<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(Key<K>, V)>, KernelError> {
    map.iter()
        .filter(|entry| !matches!(entry, Err(MapError::KeyNotFound)))
        .collect::<Result<Vec<_>, _>>()
        .on(name)
}

impl AyaPolicyMaps {
    pub(crate) fn take(from: &mut impl MapSource) -> Result<Self, KernelError> {
        Ok(Self {
            ipcache: lpm(from, maps::IPCACHE)?,
            endpoints: hash(from, maps::ENDPOINTS)?,
            policy: lpm(from, maps::POLICY)?,
            conntrack: hash(from, maps::POLICY_CT)?,
            state: Array::try_from(from.open(maps::POLICY_STATE)?).on(maps::POLICY_STATE)?,
            identities: hash(from, maps::IDENTITIES)?,
            sets: hash(from, maps::POLICY_SETS)?,
            rules: hash(from, maps::POLICY_RULES)?,
            pod_names: hash(from, maps::POD_NAMES)?,
        })
    }

    /// The policy maps a running agent pinned in `dir`, for `lbctl`.
    pub fn open_pinned(dir: &Path) -> Result<Self, KernelError> {
        Self::take(&mut { dir })
    }

    /// The capacities of the maps policy plans fill, as they were created.
    pub fn capacity(&self) -> Result<PolicyCapacity, KernelError> {
        Ok(PolicyCapacity {
            entries: capacity_of(IterableMap::map(&self.policy), maps::POLICY)? as usize,
            ipcache: capacity_of(IterableMap::map(&self.ipcache), maps::IPCACHE)? as usize,
            endpoints: capacity_of(IterableMap::map(&self.endpoints), maps::ENDPOINTS)? as usize,
        })
    }

    /// The policy conntrack: every flow's verdict, for `lbctl` and tests.
    pub fn flows(&self) -> Result<Vec<(CtKey, PolicyCtValue)>, KernelError> {
        entries(&self.conntrack, maps::POLICY_CT)
    }
}

impl PolicyMaps for AyaPolicyMaps {
    fn dump(&self) -> Result<PolicyTables, KernelError> {
        let mut tables = PolicyTables {
            state: self.state.get(&0, 0).on(maps::POLICY_STATE)?,
            ..PolicyTables::default()
        };
        for (key, value) in trie_entries(&self.ipcache, maps::IPCACHE)? {
            if let Some(prefix) = ipcache_prefix(key.prefix_len(), &key.data()) {
                tables.ipcache.insert(prefix, value);
            }
        }
        for (addr, value) in entries(&self.endpoints, maps::ENDPOINTS)? {
            tables.endpoints.insert(ip_of(&addr), value);
        }
        for (addr, name) in entries(&self.pod_names, maps::POD_NAMES)? {
            tables
                .pod_names
                .insert(ip_of(&addr), name_text(&name).into());
        }
        for (key, value) in trie_entries(&self.policy, maps::POLICY)? {
            if let Some((set, entry)) = entry_of(key.prefix_len(), &key.data()) {
                tables
                    .sets
                    .entry(set)
                    .or_default()
                    .entries
                    .insert(entry, value.rule);
            }
        }
        for (set, value) in entries(&self.sets, maps::POLICY_SETS)? {
            tables.sets.entry(set).or_default().digest = Some(value.digest);
        }
        for (id, value) in entries(&self.identities, maps::IDENTITIES)? {
            tables.identities.insert(id, identity_info(&value));
        }
        for (id, name) in entries(&self.rules, maps::POLICY_RULES)? {
            tables.rules.insert(id, name_text(&name));
        }
        Ok(tables)
    }

    fn write(&mut self, op: &PolicyOp) -> Result<(), KernelError> {
        let addr = |ip: &IpAddr| addr_of(*ip);
        match op {
            PolicyOp::PutIdentity(id, info) => self
                .identities
                .insert(id, identity_value(info), 0)
                .on(maps::IDENTITIES),
            PolicyOp::PutRule(id, name) => self
                .rules
                .insert(id, name_value(name), 0)
                .on(maps::POLICY_RULES),
            PolicyOp::PutEntry(set, entry, rule) => {
                let (length, key) = entry_key(*set, entry);
                self.policy
                    .insert(&Key::new(length, key), entry_value(*rule), 0)
                    .on(maps::POLICY)
            }
            PolicyOp::PutSet(set, digest) => self
                .sets
                .insert(set, set_value(*digest), 0)
                .on(maps::POLICY_SETS),
            PolicyOp::PutEndpoint(ip, value) => self
                .endpoints
                .insert(addr(ip), value, 0)
                .on(maps::ENDPOINTS),
            PolicyOp::PutPodName(ip, name) => self
                .pod_names
                .insert(addr(ip), name_value(name), 0)
                .on(maps::POD_NAMES),
            PolicyOp::PutIpcache(prefix, value) => {
                let (length, key) = ipcache_key(prefix);
                self.ipcache
                    .insert(&Key::new(length, key), value, 0)
                    .on(maps::IPCACHE)
            }
            PolicyOp::PutState(state) => self.state.set(0, state, 0).on(maps::POLICY_STATE),
            PolicyOp::DeleteEndpoint(ip) => {
                ignore_missing(self.endpoints.remove(&addr(ip))).on(maps::ENDPOINTS)
            }
            PolicyOp::DeletePodName(ip) => {
                ignore_missing(self.pod_names.remove(&addr(ip))).on(maps::POD_NAMES)
            }
            PolicyOp::DeleteIpcache(prefix) => {
                let (length, key) = ipcache_key(prefix);
                ignore_missing(self.ipcache.remove(&Key::new(length, key))).on(maps::IPCACHE)
            }
            PolicyOp::DeleteSet(set) => ignore_missing(self.sets.remove(set)).on(maps::POLICY_SETS),
            PolicyOp::DeleteEntry(set, entry) => {
                let (length, key) = entry_key(*set, entry);
                ignore_missing(self.policy.remove(&Key::new(length, key))).on(maps::POLICY)
            }
            PolicyOp::DeleteRule(id) => {
                ignore_missing(self.rules.remove(id)).on(maps::POLICY_RULES)
            }
            PolicyOp::DeleteIdentity(id) => {
                ignore_missing(self.identities.remove(id)).on(maps::IDENTITIES)
            }
        }
    }
}
