use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnetwork::IpNetwork;
use lb_common::policy::{
    EndpointValue, IpcacheValue, DIRECTION_INGRESS, ENDPOINT_FAIL_CLOSED, ENDPOINT_INGRESS_ISOLATED,
};
use lb_policy::{
    desired::{Entry, PolicyLookup, SetContent, Verdict, L4},
    labels::digest,
    plan::PolicyOp,
};

use super::*;
use crate::kernel::fake_policy::{FakePolicyMaps, FaultyPolicyMaps};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn set(allowed: &[u32]) -> Arc<SetContent> {
    let entries: BTreeMap<Entry, u32> = allowed
        .iter()
        .map(|id| {
            let entry = Entry {
                direction: DIRECTION_INGRESS,
                identity: *id,
                l4: L4::Any,
            };
            (entry, 1)
        })
        .collect();
    Arc::new(SetContent {
        digest: digest(&format!("{allowed:?}")),
        entries,
    })
}

/// Two isolated endpoints: 10.0.0.1 (set `first`) and 10.0.0.2 (set 9,
/// allowing 301); a peer 10.0.1.1 with identity 301.
fn target(first: (u32, Arc<SetContent>)) -> PolicyTarget<'static> {
    let mut target = PolicyTarget {
        enforcing: true,
        ..PolicyTarget::default()
    };
    target.sets.to_mut().insert(first.0, first.1);
    target.sets.to_mut().insert(9, set(&[301]));
    target.ipcache.to_mut().insert(
        IpNetwork::from(ip("10.0.1.1")),
        IpcacheValue {
            identity: 301,
            cidr_identity: 2,
        },
    );
    for (addr, number) in [("10.0.0.1", first.0), ("10.0.0.2", 9)] {
        let value = EndpointValue {
            ifindex: 7,
            set: number,
            identity: 300,
            flags: ENDPOINT_INGRESS_ISOLATED,
        };
        target.endpoints.insert(ip(addr), value);
        target.pod_names.to_mut().insert(ip(addr), addr.into());
    }
    target
}

fn verdict(tables: &PolicyTables, dst: &str) -> Verdict {
    tables.verdict(ip("10.0.1.1"), ip(dst), 6, 80, false)
}

#[test]
fn a_target_is_written_once_and_adopted_after_a_restart() {
    let target = target((5, set(&[301])));
    let mut reconciler =
        PolicyReconciler::adopt(FakePolicyMaps::default(), PolicyCapacity::default()).unwrap();
    let done = reconciler.reconcile(&target);
    assert!(done.complete(), "{done:?}");
    assert!(done.writes > 0);
    assert!(matches!(
        verdict(reconciler.applied(), "10.0.0.1"),
        Verdict::Allowed { .. }
    ));
    assert_eq!(reconciler.reconcile(&target).writes, 0);

    // A new agent finds the same contents and writes nothing.
    let kernel = reconciler.maps().clone();
    let mut restarted = PolicyReconciler::adopt(kernel, PolicyCapacity::default()).unwrap();
    assert_eq!(restarted.applied(), reconciler.applied());
    assert_eq!(restarted.reconcile(&target).writes, 0);
}

#[test]
fn a_failed_set_write_fails_its_endpoints_closed_and_the_next_pass_repairs_it() {
    let mut reconciler =
        PolicyReconciler::adopt(FakePolicyMaps::default(), PolicyCapacity::default()).unwrap();
    assert!(reconciler.reconcile(&target((5, set(&[301])))).complete());

    let new_set = target((6, set(&[301, 302])));
    let faulty = FaultyPolicyMaps::new(
        reconciler.maps().clone(),
        |op| matches!(op, PolicyOp::PutEntry(6, ..)),
        libc::ENOMEM,
        1,
    );
    let mut reconciler = PolicyReconciler::adopt(faulty, PolicyCapacity::default()).unwrap();
    let done = reconciler.reconcile(&new_set);
    assert!(!done.complete());
    assert_eq!(done.errors.len(), 1, "{done:?}");
    assert_eq!(done.fail_closed, [ip("10.0.0.1")].into());
    let tables = reconciler.applied();
    assert_eq!(verdict(tables, "10.0.0.1"), Verdict::FailClosed);
    assert!(tables.endpoints[&ip("10.0.0.1")].flags & ENDPOINT_FAIL_CLOSED != 0);
    assert!(matches!(
        verdict(tables, "10.0.0.2"),
        Verdict::Allowed { .. }
    ));
    assert_eq!(
        reconciler.maps().inner.tables,
        *tables,
        "the maps hold what is recorded"
    );

    // The fault is used up: the next pass writes the set and reopens.
    let done = reconciler.reconcile(&new_set);
    assert!(done.complete(), "{done:?}");
    assert!(matches!(
        verdict(reconciler.applied(), "10.0.0.1"),
        Verdict::Allowed { .. }
    ));
}

#[test]
fn a_full_policy_map_fails_closed_only_the_endpoints_that_need_more_room() {
    let capacity = PolicyCapacity {
        entries: 2,
        ..PolicyCapacity::default()
    };
    let maps = FakePolicyMaps::with_capacity(capacity);
    let mut reconciler = PolicyReconciler::adopt(maps, capacity).unwrap();
    let done = reconciler.reconcile(&target((5, set(&[301, 302, 303]))));
    assert!(done.errors.is_empty(), "planned, not discovered: {done:?}");
    assert_eq!(done.unfit_sets, [5].into());
    assert_eq!(
        verdict(reconciler.applied(), "10.0.0.1"),
        Verdict::FailClosed
    );
    assert!(matches!(
        verdict(reconciler.applied(), "10.0.0.2"),
        Verdict::Allowed { .. }
    ));
    // Room again (the set shrank): it opens.
    let done = reconciler.reconcile(&target((6, set(&[301]))));
    assert!(done.complete(), "{done:?}");
    assert!(matches!(
        verdict(reconciler.applied(), "10.0.0.1"),
        Verdict::Allowed { .. }
    ));
}
