//! The capacities a user may give the maps that have no setting of their
//! own (`mapCapacities`, by pinned map name). The frontend, backend, slot,
//! Maglev, conntrack and unconfirmed-flow maps have settings of their own
//! (`serviceCapacity`, ...), which plans also read. A capacity only applies
//! when the agent creates the map: a map pinned by an earlier agent keeps
//! the capacity it was made with (delete its pin to resize it; its entries
//! go with it).

use std::collections::BTreeMap;

use aya::EbpfLoader;
use lb_common::maps::{self, *};

/// Every map `mapCapacities` may size: its pinned name, its default
/// capacity and what one entry is.
pub const SIZABLE: [(&str, u32, &str); 19] = [
    (
        maps::SOCK_REV_NAT,
        MAX_SOCK_REV_NAT,
        "a socket translated at the socket layer (and a UDP peer of an unconnected one)",
    ),
    (
        maps::AFFINITY,
        MAX_AFFINITY,
        "a client's session affinity on the socket path",
    ),
    (
        maps::TC_AFFINITY,
        MAX_AFFINITY,
        "a client's session affinity on the tc path",
    ),
    (
        maps::OPT_OUT,
        MAX_OPT_OUT,
        "a cgroup of a pod opted out of socket translation",
    ),
    (
        maps::POD_NETNS,
        MAX_POD_NETNS,
        "a pod network namespace whose connected UDP is translated per datagram",
    ),
    (
        maps::CGROUP_ENDPOINTS,
        MAX_CGROUP_ENDPOINTS,
        "a cgroup of one of this node's pods",
    ),
    (
        maps::FRONTEND_ADDRS,
        MAX_FRONTEND_ADDRS,
        "a LoadBalancer IP or externalIP",
    ),
    (maps::XDP_DENY, MAX_XDP_DENY, "a prefix of xdpDenyCIDRs"),
    (
        maps::SOURCE_RANGES,
        MAX_SOURCE_RANGES,
        "a loadBalancerSourceRanges prefix of a frontend",
    ),
    (
        maps::FRAGMENTS,
        MAX_FRAGMENTS,
        "a fragmented datagram in flight",
    ),
    (
        maps::POD_INTERFACES,
        MAX_POD_INTERFACES,
        "a pod interface with the pod programs",
    ),
    (
        maps::IPCACHE,
        MAX_IPCACHE,
        "a pod address or policy CIDR with its identity",
    ),
    (
        maps::POD_NAMES,
        MAX_IPCACHE,
        "a pod address's name, for lbctl",
    ),
    (
        maps::ENDPOINTS,
        MAX_ENDPOINTS,
        "a pod of this node under policy",
    ),
    (
        maps::POLICY,
        MAX_POLICY_ENTRIES,
        "a (policy set, peer, port) entry",
    ),
    (
        maps::POLICY_CT,
        MAX_POLICY_CT,
        "a direction of a flow policy allowed",
    ),
    (maps::IDENTITIES, MAX_IDENTITIES, "a security identity"),
    (
        maps::POLICY_SETS,
        MAX_POLICY_SETS,
        "a set of policies some pod selects",
    ),
    (
        maps::POLICY_RULES,
        MAX_POLICY_RULES,
        "a policy rule of a set",
    ),
];

/// The largest capacity accepted: 64 Mi entries.
pub const LARGEST: u32 = 1 << 26;

/// A `mapCapacities` entry that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// The name is not one of [`SIZABLE`].
    #[error(
        "mapCapacities: {0} is not a map it can size (maps with settings of their own, \
         such as serviceCapacity, are sized there; see the README for the list)"
    )]
    UnknownMap(String),
    /// The capacity is 0 or above [`LARGEST`].
    #[error("mapCapacities: {name} must hold 1 to {LARGEST} entries, not {capacity}")]
    OutOfRange {
        /// The map.
        name: String,
        /// The capacity asked for.
        capacity: u32,
    },
}

/// Capacities asked for, by map name; checked against [`SIZABLE`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapCapacities(BTreeMap<String, u32>);

impl MapCapacities {
    /// Checks every entry of `asked`.
    pub fn new(asked: BTreeMap<String, u32>) -> Result<Self, CapacityError> {
        for (name, &capacity) in &asked {
            if !SIZABLE.iter().any(|(sizable, ..)| sizable == name) {
                return Err(CapacityError::UnknownMap(name.clone()));
            }
            if capacity == 0 || capacity > LARGEST {
                return Err(CapacityError::OutOfRange {
                    name: name.clone(),
                    capacity,
                });
            }
        }
        Ok(Self(asked))
    }

    /// Gives the loader every capacity asked for; a map the object does not
    /// have is left alone.
    pub(crate) fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        for (name, &capacity) in &self.0 {
            loader.map_max_entries(name, capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sizable_maps_and_sane_capacities_are_accepted() {
        let asked = |name: &str, capacity| MapCapacities::new([(name.to_owned(), capacity)].into());
        assert!(asked(maps::SOCK_REV_NAT, 1 << 20).is_ok());
        assert!(asked(maps::IPCACHE, LARGEST).is_ok());
        assert_eq!(
            asked(maps::SERVICES, 10),
            Err(CapacityError::UnknownMap(maps::SERVICES.into()))
        );
        assert_eq!(
            asked("LB_NOPE", 10),
            Err(CapacityError::UnknownMap("LB_NOPE".into()))
        );
        assert!(matches!(
            asked(maps::POLICY_CT, 0),
            Err(CapacityError::OutOfRange { .. })
        ));
        assert!(matches!(
            asked(maps::POLICY_CT, LARGEST + 1),
            Err(CapacityError::OutOfRange { .. })
        ));
    }

    #[test]
    fn every_sizable_map_is_named_once() {
        let names: std::collections::BTreeSet<&str> = SIZABLE.iter().map(|(n, ..)| *n).collect();
        assert_eq!(names.len(), SIZABLE.len());
    }
}
