//! The plan's crash safety as a property: whatever desired states an agent
//! applied, and wherever it was killed in the middle of the last plan, a
//! restarted agent that adopts the maps and applies that last state leaves
//! the maps a fresh agent leaves applying it to empty maps (ids aside), but
//! for the backends it keeps for draining flows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    maglev::MAGLEV_SIZE_INDEX,
    net::PROTO_TCP,
    service::{
        uses_maglev, Backend, ServiceKey, SlotKey, SCOPE_EXTERNAL, SCOPE_TC_EXTERNAL,
        SERVICE_FLAG_AFFINITY,
    },
};
use proptest::{prelude::*, sample::Index};

use super::{memory::MemoryMaps, plan, Applied, Capacity, MaglevSettings, Scope};
use crate::{
    addr::{addr_from_ip, port_to_be},
    desired::{DesiredState, Frontend},
};

const SETTINGS: MaglevSettings = MaglevSettings { size: 509, seed: 3 };

/// Frontend `i` of a pool of four: two on the socket path, two on the tc
/// path.
fn key(i: usize) -> ServiceKey {
    ServiceKey {
        addr: addr_from_ip(IpAddr::from([10, 96, 0, i as u8 + 1])),
        port: port_to_be(80),
        proto: PROTO_TCP,
        scope: if i < 2 {
            SCOPE_EXTERNAL
        } else {
            SCOPE_TC_EXTERNAL
        },
    }
}

/// Backend `i` of a pool of six.
fn backend(i: usize) -> Backend {
    Backend {
        addr: addr_from_ip(IpAddr::from([10, 244, 0, i as u8 + 1])),
        port: port_to_be(8080),
        proto: PROTO_TCP,
        flags: 0,
    }
}

/// A frontend: its backends, its draining ones (disjoint), affinity, and
/// source ranges (tc frontends only).
fn arb_frontend() -> impl Strategy<Value = (BTreeSet<usize>, BTreeSet<usize>, bool, Vec<u8>)> {
    (
        prop::collection::btree_set(0..6usize, 0..5),
        prop::collection::btree_set(0..6usize, 0..3),
        any::<bool>(),
        prop::collection::vec(8..32u8, 0..3),
    )
}

fn arb_desired() -> impl Strategy<Value = DesiredState> {
    prop::collection::btree_map(0..4usize, arb_frontend(), 0..4).prop_map(|frontends| {
        DesiredState {
            frontends: frontends
                .into_iter()
                .map(|(i, (backends, draining, affinity, ranges))| {
                    let key = key(i);
                    let frontend = Frontend {
                        name: format!("default/svc{i}"),
                        backends: backends.iter().map(|b| backend(*b)).collect(),
                        draining: draining
                            .difference(&backends)
                            .map(|b| backend(*b))
                            .collect(),
                        flags: if affinity { SERVICE_FLAG_AFFINITY } else { 0 },
                        affinity_timeout_s: if affinity { 60 } else { 0 },
                        source_ranges: if uses_maglev(key.scope) {
                            ranges
                                .iter()
                                .map(|len| (IpAddr::from([192, 0, 2, 0]), *len))
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .collect()
                        } else {
                            Vec::new()
                        },
                    };
                    (key, frontend)
                })
                .collect(),
            ..DesiredState::default()
        }
    })
}

/// A frontend's flags, affinity timeout, name, source ranges and backend
/// sequence.
type FrontendMeaning = (u32, u32, String, Vec<(IpAddr, u8)>, Vec<Backend>);

/// What the maps mean, without the ids that name their entries: each
/// frontend's flags, name, reverse translation, source ranges and backend
/// sequence (slot order, or the Maglev table slot by slot), the backends
/// present, and the number of entries (no leftovers).
#[derive(Debug, PartialEq, Eq)]
struct Meaning {
    frontends: BTreeMap<ServiceKey, FrontendMeaning>,
    backends: BTreeSet<Backend>,
    entries: [usize; 6],
}

fn meaning(maps: &MemoryMaps) -> Meaning {
    let resolve = |id: &u32| maps.backends[id];
    let frontends = maps
        .services
        .iter()
        .map(|(key, value)| {
            let sequence: Vec<Backend> = if uses_maglev(key.scope) {
                maps.table(value.slot_generation)
                    .iter()
                    .map(resolve)
                    .collect()
            } else {
                (0..value.backend_count)
                    .map(|slot| {
                        resolve(
                            &maps.slots[&SlotKey {
                                generation: value.slot_generation,
                                slot,
                            }],
                        )
                    })
                    .collect()
            };
            let rev = maps.rev_nat[&value.service_id];
            assert_eq!((rev.addr, rev.port), (key.addr, key.port));
            (
                *key,
                (
                    value.flags,
                    value.affinity_timeout_s,
                    super::name_to_string(&maps.names[&value.service_id]),
                    maps.ranges_of(value.service_id),
                    sequence,
                ),
            )
        })
        .collect();
    Meaning {
        frontends,
        backends: maps.backends.values().copied().collect(),
        entries: [
            maps.services.len(),
            maps.slots.len(),
            maps.rev_nat.len(),
            maps.names.len(),
            maps.maglev.len(),
            maps.source_ranges.len(),
        ],
    }
}

fn apply(maps: &mut MemoryMaps, applied: &mut Applied, desired: &DesiredState) {
    let p = plan(
        applied,
        desired,
        &Capacity::default(),
        &SETTINGS,
        Scope::All,
    );
    for op in p.groups.iter().flat_map(|g| &g.ops) {
        maps.write(op).expect("room in the default capacities");
    }
}

proptest! {
    #[test]
    fn a_restart_after_a_kill_at_any_write_converges(
        steps in prop::collection::vec(arb_desired(), 1..5),
        kill_at in any::<Index>(),
    ) {
        let (last, before) = steps.split_last().expect("one step at least");
        let mut maps = MemoryMaps::default();
        let mut applied = Applied::default();
        for desired in before {
            apply(&mut maps, &mut applied, desired);
        }
        // The agent dies after some writes of the last plan.
        let p = plan(&mut applied, last, &Capacity::default(), &SETTINGS, Scope::All);
        let ops: Vec<_> = p.groups.iter().flat_map(|g| &g.ops).collect();
        for op in &ops[..kill_at.index(ops.len() + 1)] {
            maps.write(op).expect("room in the default capacities");
        }
        // A new agent adopts what it finds and applies the same state.
        let mut adopted = Applied::adopt(&maps.dump(), &SETTINGS);
        apply(&mut maps, &mut adopted, last);

        let mut fresh = MemoryMaps::default();
        apply(&mut fresh, &mut Applied::default(), last);
        let (restarted, expected) = (meaning(&maps), meaning(&fresh));
        prop_assert_eq!(&restarted.frontends, &expected.frontends);
        prop_assert_eq!(restarted.entries, expected.entries);
        // Kept backends beyond the fresh agent's are draining ones only.
        let draining: BTreeSet<Backend> =
            last.frontends.values().flat_map(|f| f.draining.iter().copied()).collect();
        prop_assert!(expected.backends.is_subset(&restarted.backends));
        prop_assert!(restarted.backends.difference(&expected.backends).all(|b| draining.contains(b)));
        // And a second pass has nothing left to do.
        let again = plan(&mut adopted, last, &Capacity::default(), &SETTINGS, Scope::All);
        prop_assert!(again.is_empty(), "{:?}", again.groups);
        prop_assert!(maps.maglev.keys().all(|k| k.index != MAGLEV_SIZE_INDEX || maps.services.values().any(|v| v.slot_generation == k.generation)));
    }
}
