//! Plans executed on [`MemoryMaps`], checked against what a fresh adoption
//! of the resulting maps sees.

use std::collections::BTreeSet;

use lb_common::{
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    net::PROTO_TCP,
    service::{Backend, ServiceKey, SCOPE_EXTERNAL, SCOPE_TC_EXTERNAL, SERVICE_FLAG_AFFINITY},
};

use super::{memory::MemoryMaps, *};
use crate::{
    addr::{addr_from_ip, port_to_be},
    desired::{DesiredState, Frontend},
};

fn key(last: u8) -> ServiceKey {
    ServiceKey {
        addr: addr_from_ip(format!("10.96.0.{last}").parse().unwrap()),
        port: port_to_be(80),
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    }
}

fn external(last: u8) -> ServiceKey {
    ServiceKey {
        scope: SCOPE_TC_EXTERNAL,
        ..key(last)
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

fn frontend(name: &str, backends: &[u8]) -> Frontend {
    Frontend {
        name: name.into(),
        backends: backends.iter().map(|b| backend(*b)).collect(),
        ..Frontend::default()
    }
}

fn desired(entries: &[(u8, &[u8])]) -> DesiredState {
    DesiredState {
        frontends: entries
            .iter()
            .map(|(k, bs)| (key(*k), frontend(&format!("default/svc{k}"), bs)))
            .collect(),
        ..Default::default()
    }
}

const SETTINGS: MaglevSettings = MaglevSettings { size: 251, seed: 7 };

fn execute(maps: &mut MemoryMaps, plan: &Plan) {
    for op in plan.groups.iter().flat_map(|g| &g.ops) {
        maps.write(op)
            .unwrap_or_else(|e| panic!("{}: {e}", op.describe()));
    }
}

/// Plans `d` over `applied`, executes it, and checks that what the planner
/// believes is applied is what a fresh adoption of the maps sees.
fn step(maps: &mut MemoryMaps, applied: &Applied, d: &DesiredState) -> Applied {
    let mut next = applied.clone();
    let plan = plan(&mut next, d, &Capacity::default(), &SETTINGS, Scope::All);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    execute(maps, &plan);
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert_eq!(adopted.frontends, next.frontends);
    assert_eq!(adopted.backends, next.backends);
    assert_eq!(adopted.refs, next.refs);
    assert_eq!(adopted.slot_count, next.slot_count);
    assert_eq!(adopted.maglev_entries, next.maglev_entries);
    assert!(adopted.orphans.is_empty(), "{:?}", adopted.orphans);
    next
}

fn plan_all(applied: &Applied, d: &DesiredState, capacity: &Capacity) -> (Plan, Applied) {
    let mut next = applied.clone();
    let p = plan(&mut next, d, capacity, &SETTINGS, Scope::All);
    (p, next)
}

#[test]
fn add_change_and_remove_leave_maps_exactly_as_desired() {
    let mut maps = MemoryMaps::default();
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
    assert!(maps.backends.is_empty());
    assert!(maps.slots.is_empty());
    assert_eq!(maps.services.len(), 1);
    assert_eq!(c.slot_count(), 0);
}

#[test]
fn unchanged_state_plans_nothing() {
    let mut maps = MemoryMaps::default();
    let d = desired(&[(1, &[1, 2]), (2, &[2, 3])]);
    let a = step(&mut maps, &Applied::default(), &d);
    assert!(plan_all(&a, &d, &Capacity::default()).0.is_empty());
    // Also after a restart that adopts the maps.
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert!(plan_all(&adopted, &d, &Capacity::default()).0.is_empty());
}

#[test]
fn adoption_deletes_orphans_and_repairs_incomplete_frontends() {
    let mut maps = MemoryMaps::default();
    let d = desired(&[(1, &[1, 2])]);
    step(&mut maps, &Applied::default(), &d);
    maps.slots.insert(
        SlotKey {
            generation: 999,
            slot: 0,
        },
        1,
    );
    let rev = *maps.rev_nat.values().next().unwrap();
    maps.rev_nat.insert(555, rev);
    maps.slots.retain(|k, _| k.slot != 1 || k.generation == 999);
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert!(!adopted.frontends[&key(1)].complete);
    step(&mut maps, &adopted, &d);
    assert_eq!(maps.slots.len(), 2);
    assert_eq!(maps.rev_nat.len(), 1);
}

#[test]
fn capacity_errors_keep_the_previous_state() {
    let mut maps = MemoryMaps::default();
    let a = step(&mut maps, &Applied::default(), &desired(&[(1, &[1])]));
    let cap = Capacity {
        services: 10,
        backends: 3,
        slots: 10,
        ..Capacity::default()
    };
    let (p, next) = plan_all(&a, &desired(&[(1, &[1, 2, 3, 4]), (2, &[1])]), &cap);
    assert_eq!(p.errors.len(), 1);
    assert_eq!((p.errors[0].map, p.errors[0].key), ("backend", key(1)));
    assert_eq!(next.frontends[&key(1)].backends, vec![backend(1)]);
    assert!(next.frontends.contains_key(&key(2)));
}

#[test]
fn turning_affinity_on_rewrites_only_the_frontend_entry() {
    let mut maps = MemoryMaps::default();
    let d = desired(&[(1, &[1, 2])]);
    let a = step(&mut maps, &Applied::default(), &d);
    let mut with_affinity = d.clone();
    let fe = with_affinity.frontends.get_mut(&key(1)).unwrap();
    fe.flags = SERVICE_FLAG_AFFINITY;
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
    let mut maps = MemoryMaps::default();
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
        &SETTINGS,
        Scope::Only(&only),
    );
    execute(&mut maps, &p);
    assert!(next.frontends.contains_key(&key(2)));
    assert_eq!(next.frontends[&key(1)].backends, vec![backend(1)]);
    // Backend 2 is still used by frontend 2; nothing else is unused.
    assert!(next.backends.contains_key(&backend(2)));
    assert_eq!(
        Applied::adopt(&maps.dump(), &SETTINGS).frontends,
        next.frontends
    );
}

fn ranged(backends: &[u8], ranges: &[(&str, u8)]) -> Frontend {
    Frontend {
        source_ranges: ranges
            .iter()
            .map(|(addr, len)| (addr.parse().unwrap(), *len))
            .collect(),
        ..frontend("default/np", backends)
    }
}

#[test]
fn external_frontends_get_maglev_tables_made_before_broken() {
    let mut maps = MemoryMaps::default();
    let mut d = DesiredState::default();
    d.frontends
        .insert(external(1), ranged(&[1, 2, 3], &[("10.1.0.0", 16)]));
    let mut applied = step(&mut maps, &Applied::default(), &d);
    let generation = applied.frontends[&external(1)].generation;
    let table = maps.table(generation);
    assert_eq!(table.len(), 251);
    assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 3);
    assert_eq!(maps.source_ranges.len(), 1);
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
        &SETTINGS,
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
    applied = step(&mut maps, &applied, &d);
    assert_eq!(maps.table_generations().len(), 1);
    assert!(!maps.table_generations().contains(&generation));
    d.frontends.clear();
    step(&mut maps, &applied, &d);
    assert!(maps.maglev.is_empty() && maps.source_ranges.is_empty());
}

#[test]
fn a_restart_adopts_identical_maglev_tables_and_writes_nothing() {
    let mut maps = MemoryMaps::default();
    let mut d = DesiredState::default();
    d.frontends
        .insert(external(1), ranged(&[1, 2, 3], &[("10.1.0.0", 16)]));
    d.frontends.insert(external(2), ranged(&[], &[]));
    step(&mut maps, &Applied::default(), &d);
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert!(adopted.frontends.values().all(|f| f.complete));
    assert!(plan_all(&adopted, &d, &Capacity::default()).0.is_empty());
    // Another table size or seed than the tables were built with: rewritten.
    for settings in [
        MaglevSettings {
            size: 509,
            ..SETTINGS
        },
        MaglevSettings {
            seed: 8,
            ..SETTINGS
        },
    ] {
        let adopted = Applied::adopt(&maps.dump(), &settings);
        assert!(!adopted.frontends[&external(1)].complete);
        let mut next = adopted.clone();
        let p = plan(&mut next, &d, &Capacity::default(), &settings, Scope::All);
        assert!(p
            .groups
            .iter()
            .flat_map(|g| &g.ops)
            .any(|op| matches!(op, Op::PutMaglevTable(_, t) if t.len() == settings.size)));
    }
}

#[test]
fn a_table_half_written_before_a_crash_is_deleted_and_a_damaged_one_rewritten() {
    let mut maps = MemoryMaps::default();
    let mut d = DesiredState::default();
    d.frontends.insert(external(1), ranged(&[1, 2], &[]));
    let applied = step(&mut maps, &Applied::default(), &d);
    let generation = applied.frontends[&external(1)].generation;
    // A crash while a new table was written: no size entry, no flip.
    for index in 0..100 {
        maps.maglev.insert(
            MaglevKey {
                generation: 4242,
                index,
            },
            1,
        );
    }
    // And a slot of the table in use lost.
    maps.maglev.remove(&MaglevKey {
        generation,
        index: 7,
    });
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert!(!adopted.frontends[&external(1)].complete);
    assert!(adopted.has_orphans());
    step(&mut maps, &adopted, &d);
    assert_eq!(maps.table_generations().len(), 1);
    assert!(!maps.table_generations().contains(&4242));
    assert_eq!(
        maps.maglev.len(),
        SETTINGS.size + 1,
        "one complete table and its size entry"
    );
}

#[test]
fn source_ranges_found_after_a_restart_are_read_back() {
    let mut maps = MemoryMaps::default();
    let mut d = DesiredState::default();
    d.frontends.insert(
        external(1),
        ranged(&[1], &[("10.1.0.0", 16), ("192.0.2.0", 24)]),
    );
    let applied = step(&mut maps, &Applied::default(), &d);
    let service_id = applied.frontends[&external(1)].service_id;
    // While the agent was down, one range was removed from the Service and
    // a range of a service id nothing uses was left behind.
    d.frontends
        .get_mut(&external(1))
        .unwrap()
        .source_ranges
        .pop();
    maps.source_ranges.insert(SourceRange {
        service_id: 77_777,
        addr: "0.0.0.0".parse().unwrap(),
        len: 0,
    });
    let adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    step(&mut maps, &adopted, &d);
    assert_eq!(
        maps.ranges_of(service_id),
        vec![("10.1.0.0".parse().unwrap(), 16)]
    );
    assert!(maps.ranges_of(77_777).is_empty());
}

#[test]
fn maglev_frontends_with_under_100_slots_per_backend_are_reported_once() {
    let mut d = DesiredState::default();
    // Two Maglev frontends of one Service (e.g. NodePort and ExternalIP).
    d.frontends
        .insert(external(1), frontend("default/big", &[1, 2, 3]));
    d.frontends
        .insert(external(2), frontend("default/big", &[1, 2]));
    d.frontends
        .insert(external(3), frontend("default/small", &[1, 2]));
    // Socket-path frontends have no Maglev table, whatever their size.
    d.frontends.insert(
        key(4),
        frontend("default/cluster", &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
    );
    let mut applied = Applied::default();
    let p = plan(
        &mut applied,
        &d,
        &Capacity::default(),
        &SETTINGS,
        Scope::All,
    );
    assert!(p.errors.is_empty());
    assert_eq!(
        applied.undersized_maglev_tables(SETTINGS.size),
        vec![UndersizedTable {
            name: "default/big".into(),
            backends: 3,
            wanted_size: 509,
        }]
    );
    assert!(applied.undersized_maglev_tables(509).is_empty());
}

#[test]
fn a_full_maglev_map_is_a_capacity_error_for_that_frontend_only() {
    let mut d = DesiredState::default();
    d.frontends.insert(external(1), frontend("default/a", &[1]));
    d.frontends.insert(external(2), frontend("default/b", &[2]));
    d.frontends.insert(key(3), frontend("default/c", &[3]));
    // Room for one table and the swap reserve of a largest table, not for
    // a second new frontend.
    let table = SETTINGS.size + 1;
    let capacity = Capacity {
        maglev_entries: 3 * table - 1,
        ..Capacity::default()
    };
    let (p, next) = plan_all(&Applied::default(), &d, &capacity);
    assert_eq!(p.errors.len(), 1);
    assert_eq!(
        (p.errors[0].map, p.errors[0].key),
        ("Maglev table", external(2))
    );
    assert!(next.frontends.contains_key(&external(1)));
    assert!(next.frontends.contains_key(&key(3)));
    assert!(!next.frontends.contains_key(&external(2)));

    // The reserve keeps the programmed frontend changeable: its new table
    // is written before the old one goes.
    let mut changed = d.clone();
    changed.frontends.remove(&external(2));
    changed
        .frontends
        .insert(external(1), frontend("default/a", &[1, 4]));
    let (p, after) = plan_all(&next, &changed, &capacity);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(after.frontends[&external(1)].backends.len(), 2);

    // Frontends first programmed without endpoints (no table) are held to
    // the same reserve when their endpoints arrive.
    let mut empty = d.clone();
    for key in [external(1), external(2)] {
        empty.frontends.insert(key, frontend("default/a", &[]));
    }
    let (p, without) = plan_all(&Applied::default(), &empty, &capacity);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let (p, _) = plan_all(&without, &d, &capacity);
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
}

#[test]
fn tables_take_100_slots_per_backend_up_to_the_configured_size() {
    let settings = MaglevSettings {
        size: 16381,
        ..SETTINGS
    };
    let mut d = DesiredState::default();
    let many: Vec<u8> = (1..=120).collect();
    d.frontends
        .insert(external(1), frontend("default/a", &[1, 2]));
    d.frontends
        .insert(external(2), frontend("default/b", &[1, 2, 3]));
    d.frontends
        .insert(external(3), frontend("default/c", &many));
    let mut next = Applied::default();
    let p = plan(&mut next, &d, &Capacity::default(), &settings, Scope::All);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let sizes: Vec<usize> = (1..=3)
        .map(|i| next.frontends[&external(i)].table)
        .collect();
    assert_eq!(sizes, [251, 509, 16381]);
    // Every node builds the same tables; a restart adopts them as they are.
    let mut maps = MemoryMaps::default();
    execute(&mut maps, &p);
    let adopted = Applied::adopt(&maps.dump(), &settings);
    assert!((1..=3).all(|i| adopted.frontends[&external(i)].complete));
}

#[test]
fn names_are_truncated_on_char_boundaries() {
    let long = "é".repeat(100);
    let name = name_to_string(&name_from_str(&long));
    assert!(name.len() <= lb_common::service::SERVICE_NAME_LEN);
    assert!(long.starts_with(&name));
}

#[test]
fn memory_maps_refuse_flips_to_incomplete_sets() {
    let mut maps = MemoryMaps::default();
    let value = ServiceValue {
        service_id: 1,
        slot_generation: 2,
        backend_count: 1,
        flags: 0,
        affinity_timeout_s: 0,
    };
    assert_eq!(
        maps.write(&Op::PutService(external(1), value)),
        Err(memory::MemoryError::Dangling(external(1)))
    );
    maps.write(&Op::PutBackend(9, backend(1))).unwrap();
    maps.write(&Op::PutMaglevTable(2, vec![9; 3])).unwrap();
    maps.write(&Op::PutService(external(1), value)).unwrap();
    assert_eq!(
        maps.maglev.get(&MaglevKey {
            generation: 2,
            index: MAGLEV_SIZE_INDEX
        }),
        Some(&3)
    );
}

/// `desired` with the first frontend's backends split: `serving` take new
/// connections, `draining` only keep theirs.
fn draining(serving: &[u8], draining: &[u8]) -> DesiredState {
    let mut d = desired(&[(1, serving)]);
    let fe = d.frontends.get_mut(&key(1)).unwrap();
    fe.draining = draining.iter().map(|b| backend(*b)).collect();
    d
}

fn backend_id(maps: &MemoryMaps, last: u8) -> Option<u32> {
    maps.backends
        .iter()
        .find(|(_, b)| **b == backend(last))
        .map(|(id, _)| *id)
}

fn run(maps: &mut MemoryMaps, applied: &mut Applied, d: &DesiredState) -> Plan {
    let p = plan(applied, d, &Capacity::default(), &SETTINGS, Scope::All);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    execute(maps, &p);
    p
}

#[test]
fn a_draining_backend_stays_in_the_map_until_its_endpoint_leaves() {
    let mut maps = MemoryMaps::default();
    let mut applied = step(&mut maps, &Applied::default(), &desired(&[(1, &[1, 2])]));
    let id = backend_id(&maps, 2).expect("backend 2 programmed");

    // Backend 2's endpoint starts terminating: out of the slots, same id in
    // the backend map, so conntrack still finds its flows' backend.
    run(&mut maps, &mut applied, &draining(&[1], &[2]));
    assert_eq!(maps.slots.len(), 1);
    assert_eq!(backend_id(&maps, 2), Some(id));

    // A restart in the middle of the drain keeps it too.
    let mut adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    assert!(
        adopted.has_orphans(),
        "an unreferenced backend is owed a decision"
    );
    let p = run(&mut maps, &mut adopted, &draining(&[1], &[2]));
    assert!(p.is_empty(), "{:?}", p.groups);
    assert_eq!(backend_id(&maps, 2), Some(id));

    // A draining backend the map never had is not added.
    run(&mut maps, &mut adopted, &draining(&[1], &[2, 9]));
    assert_eq!(backend_id(&maps, 9), None);

    // The endpoint leaves the slice: the backend goes.
    run(&mut maps, &mut adopted, &draining(&[1], &[]));
    assert_eq!(backend_id(&maps, 2), None);
    assert_eq!(maps.backends.len(), 1);
}

#[test]
fn a_restart_deletes_backends_no_frontend_drains() {
    let mut maps = MemoryMaps::default();
    let mut applied = step(&mut maps, &Applied::default(), &desired(&[(1, &[1, 2])]));
    run(&mut maps, &mut applied, &draining(&[1], &[2]));
    // The agent restarts after the endpoint left the slice.
    let mut adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    run(&mut maps, &mut adopted, &draining(&[1], &[]));
    assert_eq!(backend_id(&maps, 2), None);
    assert!(!adopted.has_orphans());
}

#[test]
fn a_draining_backend_that_is_ready_again_keeps_its_id() {
    let mut maps = MemoryMaps::default();
    let mut applied = step(&mut maps, &Applied::default(), &desired(&[(1, &[1, 2])]));
    let id = backend_id(&maps, 2);
    run(&mut maps, &mut applied, &draining(&[1], &[2]));
    run(&mut maps, &mut applied, &draining(&[1, 2], &[]));
    assert_eq!(backend_id(&maps, 2), id);
    assert_eq!(maps.slots.len(), 2);
}

#[test]
fn a_restart_never_gives_a_new_frontend_the_id_of_an_orphan_it_then_deletes() {
    let mut maps = MemoryMaps::default();
    // Without endpoints: no slot or backend written carries an id.
    let d = desired(&[(1, &[])]);
    let (p, _) = plan_all(&Applied::default(), &d, &Capacity::default());
    // The agent dies right after writing the reverse translation.
    for op in p.groups.iter().flat_map(|g| &g.ops) {
        maps.write(op).unwrap();
        if matches!(op, Op::PutRevNat(..)) {
            break;
        }
    }
    let mut adopted = Applied::adopt(&maps.dump(), &SETTINGS);
    run(&mut maps, &mut adopted, &d);
    let service_id = maps.services[&key(1)].service_id;
    assert!(maps.rev_nat.contains_key(&service_id));
    assert!(maps.names.contains_key(&service_id));
    assert_eq!(maps.rev_nat.len(), 1);
}
