//! The reconciler against in-memory maps: adoption after a restart, and what
//! full maps, refused writes and a crash in the middle of a table leave
//! behind, repaired by later passes.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    net::{PROTO_TCP, PROTO_UDP},
    service::{
        Backend, RevNat, ServiceKey, SCOPE_EXTERNAL, SCOPE_TC_EXTERNAL, SERVICE_FLAG_AFFINITY,
        SERVICE_FLAG_SOURCE_RANGES,
    },
    socket::SockRevNatKey,
};
use lb_core::{
    addr::{addr_from_ip, port_to_be},
    desired::{DesiredState, Frontend},
    plan::{Capacity, MaglevSettings, Op},
};

use super::{ReconcileError, Reconciler, StaleUdpSocket, WaitingUdpSockets};
use crate::kernel::{
    fake::FakeServiceMaps,
    faulty::{Fault, FaultyServiceMaps},
    ServiceMaps,
};

const MAGLEV: MaglevSettings = MaglevSettings { size: 251, seed: 7 };

fn key(last: u8, scope: u8, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: addr_from_ip(format!("10.96.0.{last}").parse().unwrap()),
        port: port_to_be(80),
        proto,
        scope,
    }
}

fn cluster(last: u8) -> ServiceKey {
    key(last, SCOPE_EXTERNAL, PROTO_TCP)
}

fn external(last: u8) -> ServiceKey {
    key(last, SCOPE_TC_EXTERNAL, PROTO_TCP)
}

fn backend(last: u8) -> Backend {
    Backend {
        addr: addr_from_ip(format!("10.0.0.{last}").parse().unwrap()),
        port: port_to_be(8080),
        proto: PROTO_TCP,
        flags: 0,
    }
}

fn frontend(backends: &[u8]) -> Frontend {
    Frontend {
        name: "default/svc".into(),
        backends: backends.iter().map(|b| backend(*b)).collect(),
        ..Frontend::default()
    }
}

/// A UDP frontend on `backends` (see [`backend`]).
fn udp_frontend(backends: &[u8]) -> Frontend {
    Frontend {
        backends: backends
            .iter()
            .map(|b| Backend {
                proto: PROTO_UDP,
                ..backend(*b)
            })
            .collect(),
        ..frontend(&[])
    }
}

/// The socket translation of socket `cookie` connected to `frontend` and
/// steered to backend `last` (see [`backend`]).
fn socket_translation(
    maps: &FakeServiceMaps,
    cookie: u64,
    frontend: ServiceKey,
    last: u8,
) -> (SockRevNatKey, RevNat) {
    let b = backend(last);
    (
        SockRevNatKey::new(cookie, b.addr, b.port),
        RevNat {
            addr: frontend.addr,
            port: frontend.port,
            pad: 0,
            service_id: maps.maps.services[&frontend].service_id,
        },
    )
}

fn state(frontends: impl IntoIterator<Item = (ServiceKey, Frontend)>) -> DesiredState {
    DesiredState {
        frontends: frontends.into_iter().collect(),
        ..DesiredState::default()
    }
}

fn ranges(list: &[(&str, u8)]) -> Vec<(IpAddr, u8)> {
    list.iter()
        .map(|(addr, len)| (addr.parse().unwrap(), *len))
        .collect()
}

fn adopt(maps: &impl ServiceMaps, capacity: Capacity) -> Reconciler {
    Reconciler::adopt(maps, capacity, MAGLEV).expect("an in-memory dump")
}

fn nothing() -> BTreeSet<ServiceKey> {
    BTreeSet::new()
}

fn keys(list: &[ServiceKey]) -> BTreeSet<ServiceKey> {
    list.iter().copied().collect()
}

/// One of each kind of frontend: socket path, Maglev with source ranges,
/// and one without endpoints.
fn mixed() -> DesiredState {
    state([
        (cluster(1), frontend(&[1, 2])),
        (
            external(2),
            Frontend {
                flags: SERVICE_FLAG_SOURCE_RANGES,
                source_ranges: ranges(&[("192.0.2.0", 24), ("198.51.100.0", 24)]),
                ..frontend(&[2, 3, 4])
            },
        ),
        (cluster(3), frontend(&[])),
    ])
}

#[test]
fn a_restarted_agent_adopts_everything_and_writes_nothing() {
    let mut maps = FakeServiceMaps::default();
    let desired = mixed();
    let first = adopt(&maps, Capacity::default()).reconcile(&mut maps, &desired, &nothing());
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.frontends, 3);
    let written = maps.writes.len();
    assert!(written > 0);
    // A new agent: it reads the maps back, Maglev tables and source ranges
    // included, and finds nothing to change.
    let mut restarted = adopt(&maps, Capacity::default());
    assert!(
        restarted.needs_retry(),
        "the first pass after adoption is full"
    );
    let second = restarted.reconcile(&mut maps, &desired, &nothing());
    assert!(second.errors.is_empty(), "{:?}", second.errors);
    assert_eq!(second.writes, 0);
    assert_eq!(maps.writes.len(), written);
    assert!(!restarted.needs_retry());
}

#[test]
fn a_frontend_that_did_not_fit_is_retried_on_the_next_pass() {
    let capacity = Capacity {
        services: 1,
        ..Capacity::default()
    };
    let mut maps = FakeServiceMaps::with_capacity(capacity);
    let mut reconciler = adopt(&maps, capacity);
    let both = state([
        (cluster(1), frontend(&[1, 2])),
        (cluster(2), frontend(&[3])),
    ]);
    let pass = reconciler.reconcile(&mut maps, &both, &nothing());
    assert!(matches!(
        pass.errors.as_slice(),
        [ReconcileError::Capacity(e)] if e.key == cluster(2)
    ));
    assert!(reconciler.needs_retry());
    // Service 1 leaves; the compiler reports only its frontend changed, and
    // service 2 now fits without having changed itself.
    let only_second = state([(cluster(2), frontend(&[3]))]);
    let pass = reconciler.reconcile(&mut maps, &only_second, &keys(&[cluster(1)]));
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert!(maps.maps.services.contains_key(&cluster(2)));
    assert!(!maps.maps.services.contains_key(&cluster(1)));
    assert!(!reconciler.needs_retry());
}

#[test]
fn a_full_kernel_map_is_reported_and_repaired_when_it_has_room() {
    let mut maps = FaultyServiceMaps::new(FakeServiceMaps::default());
    let mut reconciler = adopt(&maps, Capacity::default());
    maps.inject(Fault::matching(
        |op| matches!(op, Op::PutSlot(..)),
        libc::E2BIG,
        1,
    ));
    let desired = state([(cluster(1), frontend(&[1])), (cluster(2), frontend(&[2]))]);
    let pass = reconciler.reconcile(&mut maps, &desired, &nothing());
    let [ReconcileError::Write { source, .. }] = pass.errors.as_slice() else {
        panic!("{:?}", pass.errors)
    };
    assert!(source.is_map_full(), "{source}");
    // The other frontend is programmed; the refused one is not half there.
    assert_eq!(maps.inner.maps.services.len(), 1);
    assert!(reconciler.needs_retry());
    let pass = reconciler.reconcile(&mut maps, &desired, &nothing());
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(maps.inner.maps.services.len(), 2);
    assert!(maps.exhausted());
}

#[test]
fn a_refused_write_leaves_the_frontend_as_it_was_until_the_next_pass() {
    let mut maps = FaultyServiceMaps::new(FakeServiceMaps::default());
    let mut reconciler = adopt(&maps, Capacity::default());
    let before = state([(cluster(1), frontend(&[1, 2]))]);
    reconciler.reconcile(&mut maps, &before, &nothing());
    let old = maps.inner.maps.services[&cluster(1)];
    // EPERM (a lost capability) on the flip of the changed frontend.
    maps.inject(Fault::matching(
        |op| matches!(op, Op::PutService(..)),
        libc::EPERM,
        1,
    ));
    let after = state([(cluster(1), frontend(&[2, 3]))]);
    let pass = reconciler.reconcile(&mut maps, &after, &keys(&[cluster(1)]));
    assert_eq!(pass.errors.len(), 1, "{:?}", pass.errors);
    assert_eq!(
        maps.inner.maps.services[&cluster(1)],
        old,
        "still the old set"
    );
    // The next pass, with nothing changed, finishes the job and removes the
    // slots the failed attempt left.
    let pass = reconciler.reconcile(&mut maps, &after, &nothing());
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    let new = maps.inner.maps.services[&cluster(1)];
    assert_ne!(new.slot_generation, old.slot_generation);
    let generations: BTreeSet<u32> = maps.inner.maps.slots.keys().map(|k| k.generation).collect();
    assert_eq!(generations, [new.slot_generation].into());
    assert_eq!(maps.inner.maps.backends.len(), 2);
}

#[test]
fn a_table_cut_off_half_way_is_cleaned_up_by_the_next_pass_and_after_a_restart() {
    for restart in [false, true] {
        let mut maps = FaultyServiceMaps::new(FakeServiceMaps::default());
        let mut reconciler = adopt(&maps, Capacity::default());
        maps.inject(Fault::half_table(libc::ENOSPC));
        let desired = state([(external(1), frontend(&[1, 2, 3]))]);
        let pass = reconciler.reconcile(&mut maps, &desired, &nothing());
        assert_eq!(pass.errors.len(), 1);
        let leftover = maps.inner.maps.table_generations();
        assert_eq!(leftover.len(), 1, "half a table, under no frontend");
        assert!(!maps.inner.maps.services.contains_key(&external(1)));
        if restart {
            // The agent is SIGKILLed here; a new one adopts the maps.
            reconciler = adopt(&maps, Capacity::default());
        }
        let pass = reconciler.reconcile(&mut maps, &desired, &nothing());
        assert!(pass.errors.is_empty(), "{:?}", pass.errors);
        let generation = maps.inner.maps.services[&external(1)].slot_generation;
        assert_eq!(maps.inner.maps.table_generations(), [generation].into());
        assert!(leftover.is_disjoint(&[generation].into()));
        assert_eq!(maps.inner.maps.maglev.len(), MAGLEV.size + 1);
    }
}

#[test]
fn a_source_range_removed_while_the_agent_was_down_is_removed_at_restart() {
    let mut maps = FakeServiceMaps::default();
    let desired = mixed();
    adopt(&maps, Capacity::default()).reconcile(&mut maps, &desired, &nothing());
    let service_id = maps.maps.services[&external(2)].service_id;
    assert_eq!(maps.maps.ranges_of(service_id).len(), 2);
    // Edited while the agent was away: one range less.
    let mut edited = desired.clone();
    let lb = edited.frontends.get_mut(&external(2)).unwrap();
    lb.source_ranges = ranges(&[("192.0.2.0", 24)]);
    let mut restarted = adopt(&maps, Capacity::default());
    let pass = restarted.reconcile(&mut maps, &edited, &nothing());
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(
        maps.maps.ranges_of(service_id),
        ranges(&[("192.0.2.0", 24)])
    );
    // Only the range was written: the table is the one already there.
    assert_eq!(pass.writes, 1);
}

#[test]
fn a_maglev_table_damaged_while_the_agent_was_down_is_rewritten() {
    let mut maps = FakeServiceMaps::default();
    let desired = mixed();
    adopt(&maps, Capacity::default()).reconcile(&mut maps, &desired, &nothing());
    let generation = maps.maps.services[&external(2)].slot_generation;
    maps.maps.maglev.remove(&MaglevKey {
        generation,
        index: MAGLEV_SIZE_INDEX,
    });
    let mut restarted = adopt(&maps, Capacity::default());
    let pass = restarted.reconcile(&mut maps, &desired, &nothing());
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    let now = maps.maps.services[&external(2)].slot_generation;
    assert_ne!(now, generation);
    assert_eq!(maps.maps.table_generations(), [now].into());
}

#[test]
fn affinity_to_a_removed_backend_is_pruned() {
    let mut maps = FakeServiceMaps::default();
    let mut reconciler = adopt(&maps, Capacity::default());
    let sticky = |backends: &[u8]| Frontend {
        flags: SERVICE_FLAG_AFFINITY,
        affinity_timeout_s: 60,
        ..frontend(backends)
    };
    reconciler.reconcile(
        &mut maps,
        &state([(cluster(1), sticky(&[1, 2]))]),
        &nothing(),
    );
    maps.add_affinity_clients();
    assert_eq!(maps.affinity.len(), 2);
    let gone = reconciler.applied().backends[&backend(2)];
    reconciler.reconcile(
        &mut maps,
        &state([(cluster(1), sticky(&[1]))]),
        &keys(&[cluster(1)]),
    );
    assert_eq!(maps.affinity.len(), 1);
    assert!(maps.affinity.values().all(|(_, id)| *id != gone));
}

#[test]
fn sockets_of_a_removed_udp_backend_are_returned_to_be_moved() {
    let mut maps = FakeServiceMaps::default();
    let mut reconciler = adopt(&maps, Capacity::default());
    let dns = key(9, SCOPE_EXTERNAL, PROTO_UDP);
    reconciler.reconcile(
        &mut maps,
        &state([(dns, udp_frontend(&[1, 2]))]),
        &nothing(),
    );
    let socket = |cookie, last| socket_translation(&maps, cookie, dns, last);
    maps.sockets = vec![socket(10, 1), socket(20, 2), socket(21, 2)];
    let frontend: SocketAddr = "10.96.0.9:80".parse().unwrap();
    assert!(reconciler.serves_udp(frontend));
    let pass = reconciler.reconcile(
        &mut maps,
        &state([(dns, udp_frontend(&[1]))]),
        &keys(&[dns]),
    );
    let cookies: Vec<u64> = pass.stale_udp_sockets.iter().map(|s| s.cookie).collect();
    assert_eq!(cookies, [20, 21]);
    for stale in &pass.stale_udp_sockets {
        assert_eq!(stale.frontend, frontend);
        assert_eq!(
            stale.translation_key(),
            socket_translation(&maps, stale.cookie, dns, 2).0
        );
    }
    assert!(reconciler.serves_udp(frontend));
    reconciler.reconcile(&mut maps, &state([(dns, udp_frontend(&[]))]), &keys(&[dns]));
    assert!(!reconciler.serves_udp(frontend));
    assert!(!reconciler.serves_udp("10.96.0.9:81".parse().unwrap()));
}

#[test]
fn a_restarted_agent_returns_the_sockets_of_backends_removed_before_it_started() {
    let mut maps = FakeServiceMaps::default();
    let dns = key(9, SCOPE_EXTERNAL, PROTO_UDP);
    let web = cluster(1);
    let desired = state([(dns, udp_frontend(&[1])), (web, frontend(&[3]))]);
    adopt(&maps, Capacity::default()).reconcile(&mut maps, &desired, &nothing());
    // Socket 20's backend left while no agent ran (or it was waiting for
    // one); 21 is on a live backend; 22 is a TCP socket on a backend its
    // frontend no longer has (TCP is never moved).
    let socket = |cookie, frontend, last| socket_translation(&maps, cookie, frontend, last);
    maps.sockets = vec![socket(20, dns, 2), socket(21, dns, 1), socket(22, web, 4)];
    let mut restarted = adopt(&maps, Capacity::default());
    let pass = restarted.reconcile(&mut maps, &desired, &nothing());
    let cookies: Vec<u64> = pass.stale_udp_sockets.iter().map(|s| s.cookie).collect();
    assert_eq!(cookies, [20]);
    assert_eq!(
        pass.stale_udp_sockets[0].frontend,
        "10.96.0.9:80".parse().unwrap()
    );
    let again = restarted.reconcile(&mut maps, &desired, &nothing());
    assert!(again.stale_udp_sockets.is_empty(), "{again:?}");
}

#[test]
fn waiting_sockets_are_bounded_forget_closed_ones_and_leave_once_served() {
    let mut maps = FakeServiceMaps::default();
    let mut reconciler = adopt(&maps, Capacity::default());
    let dns = key(9, SCOPE_EXTERNAL, PROTO_UDP);
    reconciler.reconcile(&mut maps, &state([(dns, udp_frontend(&[]))]), &nothing());
    let stale = |cookie| StaleUdpSocket {
        cookie,
        backend: "10.0.0.1:8080".parse().unwrap(),
        frontend: "10.96.0.9:80".parse().unwrap(),
    };
    let mut waiting = WaitingUdpSockets::new(2);
    waiting.add([stale(1), stale(2), stale(3)]);
    assert_eq!(waiting.len(), 2, "bounded");
    // Both still open: no room is made.
    let open: Vec<_> = [1, 2]
        .map(|cookie| socket_translation(&maps, cookie, dns, 1))
        .into();
    maps.sockets = open.clone();
    assert_eq!(waiting.room_for(1, &maps), 0);
    // Socket 1 closed: its place is free again.
    maps.sockets = open[1..].to_vec();
    assert_eq!(waiting.room_for(1, &maps), 1);
    waiting.add([stale(4)]);
    assert!(
        waiting.take_served(&reconciler).is_empty(),
        "no backend yet"
    );
    reconciler.reconcile(
        &mut maps,
        &state([(dns, udp_frontend(&[1]))]),
        &keys(&[dns]),
    );
    let served: Vec<u64> = waiting
        .take_served(&reconciler)
        .iter()
        .map(|s| s.cookie)
        .collect();
    assert_eq!(served, [2, 4]);
    assert!(waiting.is_empty());
}
