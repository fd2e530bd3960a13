use std::sync::Arc;

use lb_common::policy::{
    DIRECTION_INGRESS, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, POLICY_NAME_LEN,
    POLICY_STATE_ENFORCING,
};

use super::*;
use crate::{
    desired::{PolicyLookup, SetContent, Verdict, L4},
    labels::digest,
};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn set(allowed: &[u32]) -> Arc<SetContent> {
    let entries: BTreeMap<Entry, u32> = allowed
        .iter()
        .map(|id| {
            (
                Entry {
                    direction: DIRECTION_INGRESS,
                    identity: *id,
                    l4: L4::Any,
                },
                1,
            )
        })
        .collect();
    Arc::new(SetContent {
        digest: digest(&format!("{allowed:?}")),
        entries,
    })
}

/// A node with one isolated endpoint (10.0.0.1, identity 300, set `set`)
/// and peers 10.0.1.1 (identity 301) and 10.0.1.2 (identity 302).
fn target(number: u32, content: Arc<SetContent>) -> PolicyTarget<'static> {
    let mut target = PolicyTarget {
        enforcing: true,
        ..PolicyTarget::default()
    };
    for (id, text) in [(300, "app=web"), (301, "app=a"), (302, "app=b")] {
        target.identities.to_mut().insert(
            id,
            IdentityInfo {
                digest: digest(text),
                text: text.into(),
            },
        );
    }
    target.rules.insert(1, "x/allow ingress[0]".into());
    target.sets.to_mut().insert(number, content);
    for (addr, id) in [("10.0.0.1", 300), ("10.0.1.1", 301), ("10.0.1.2", 302)] {
        target.ipcache.to_mut().insert(
            IpNetwork::from(ip(addr)),
            IpcacheValue {
                identity: id,
                cidr_identity: 2,
            },
        );
    }
    target.endpoints.insert(
        ip("10.0.0.1"),
        EndpointValue {
            ifindex: 7,
            set: number,
            identity: 300,
            flags: ENDPOINT_INGRESS_ISOLATED,
        },
    );
    target
        .pod_names
        .to_mut()
        .insert(ip("10.0.0.1"), "x/web".into());
    target
}

fn applied_after(start: &PolicyTables, plan: &PolicyPlan) -> PolicyTables {
    let mut tables = start.clone();
    for op in plan.ops() {
        tables.apply(op);
    }
    tables
}

fn allowed(tables: &PolicyTables, src: &str) -> bool {
    matches!(
        tables.verdict(ip(src), ip("10.0.0.1"), 6, 80, false),
        Verdict::Allowed { .. }
    )
}

#[test]
fn a_first_plan_writes_everything_in_order_and_then_nothing() {
    let target = target(5, set(&[301]));
    let plan = plan(
        &PolicyTables::default(),
        &target,
        &PolicyCapacity::default(),
        &BTreeSet::new(),
    );
    let kinds: Vec<&'static str> = plan
        .ops()
        .map(|op| match op {
            PolicyOp::PutIdentity(..) => "identity",
            PolicyOp::PutRule(..) => "rule",
            PolicyOp::PutEntry(..) => "entry",
            PolicyOp::PutSet(..) => "set",
            PolicyOp::PutEndpoint(..) => "endpoint",
            PolicyOp::PutPodName(..) => "name",
            PolicyOp::PutIpcache(..) => "ipcache",
            PolicyOp::PutState(..) => "state",
            _ => "delete",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "identity", "identity", "identity", "rule", "entry", "set", "ipcache", "ipcache",
            "ipcache", "endpoint", "name", "state"
        ]
    );
    let tables = applied_after(&PolicyTables::default(), &plan);
    assert_eq!(tables.state.flags, POLICY_STATE_ENFORCING);
    assert_eq!(tables.state.revision, 1);
    assert!(allowed(&tables, "10.0.1.1"));
    assert!(!allowed(&tables, "10.0.1.2"));
    let again = super::plan(
        &tables,
        &target,
        &PolicyCapacity::default(),
        &BTreeSet::new(),
    );
    assert!(again.groups.is_empty(), "{:?}", again.groups);
}

#[test]
fn a_set_change_is_make_before_break_and_bumps_the_revision_last() {
    let before = target(5, set(&[301]));
    let start = applied_after(
        &PolicyTables::default(),
        &plan(
            &PolicyTables::default(),
            &before,
            &PolicyCapacity::default(),
            &BTreeSet::new(),
        ),
    );
    // 301 stays allowed, 302 becomes allowed: a new set 6.
    let after = target(6, set(&[301, 302]));
    let plan = plan(&start, &after, &PolicyCapacity::default(), &BTreeSet::new());
    let mut tables = start.clone();
    for op in plan.ops() {
        tables.apply(op);
        assert!(allowed(&tables, "10.0.1.1"), "after {op:?}");
    }
    assert!(allowed(&tables, "10.0.1.2"));
    assert!(matches!(plan.ops().last(), Some(PolicyOp::PutState(s)) if s.revision == 2));
    let position = |wanted: fn(&PolicyOp) -> bool| plan.ops().position(wanted).unwrap();
    let set_done = position(|op| matches!(op, PolicyOp::PutSet(6, _)));
    let switched = position(|op| matches!(op, PolicyOp::PutEndpoint(..)));
    let old_gone = position(|op| matches!(op, PolicyOp::DeleteSet(5)));
    assert!(set_done < switched && switched < old_gone);
    assert!(!tables.sets.contains_key(&5), "the old set is deleted");
}

#[test]
fn a_set_that_does_not_fit_fails_its_endpoints_closed_only() {
    let before = target(5, set(&[301]));
    let start = applied_after(
        &PolicyTables::default(),
        &plan(
            &PolicyTables::default(),
            &before,
            &PolicyCapacity::default(),
            &BTreeSet::new(),
        ),
    );
    let mut after = target(6, set(&[301, 302, IDENTITY_ANY]));
    // A second endpoint whose set fits.
    after.sets.to_mut().insert(5, set(&[301]));
    after.endpoints.insert(
        ip("10.0.0.2"),
        EndpointValue {
            ifindex: 8,
            set: 5,
            identity: 300,
            flags: ENDPOINT_INGRESS_ISOLATED,
        },
    );
    let capacity = PolicyCapacity {
        entries: 2,
        ..PolicyCapacity::default()
    };
    let plan = plan(&start, &after, &capacity, &BTreeSet::new());
    assert_eq!(plan.unfit_sets, BTreeSet::from([6]));
    assert_eq!(plan.fail_closed, BTreeSet::from([ip("10.0.0.1")]));
    let tables = applied_after(&start, &plan);
    assert_eq!(
        tables.verdict(ip("10.0.1.1"), ip("10.0.0.1"), 6, 80, false),
        Verdict::FailClosed
    );
    assert!(matches!(
        tables.verdict(ip("10.0.1.1"), ip("10.0.0.2"), 6, 80, false),
        Verdict::Allowed { .. }
    ));
    assert!(tables.entry_count() <= 2);
}

#[test]
fn a_set_whose_writes_failed_is_retried_as_unfit_and_kept_while_used() {
    let before = target(5, set(&[301]));
    let start = applied_after(
        &PolicyTables::default(),
        &plan(
            &PolicyTables::default(),
            &before,
            &PolicyCapacity::default(),
            &BTreeSet::new(),
        ),
    );
    let after = target(6, set(&[302]));
    let plan = plan(
        &start,
        &after,
        &PolicyCapacity::default(),
        &BTreeSet::from([6]),
    );
    assert!(plan
        .ops()
        .all(|op| !matches!(op, PolicyOp::PutEntry(6, ..))));
    assert_eq!(plan.fail_closed, BTreeSet::from([ip("10.0.0.1")]));
    let delete = plan
        .groups
        .iter()
        .find(|g| g.deletes)
        .expect("set 5 is no longer wanted");
    assert_eq!(delete.set, Some(5));
}

#[test]
fn a_pod_name_is_shared_with_the_maps_mirror_and_a_long_one_written_as_kept() {
    let mut target = target(5, set(&[301]));
    let long = format!("x/{}", "a".repeat(2 * POLICY_NAME_LEN));
    target
        .pod_names
        .to_mut()
        .insert(ip("10.0.0.2"), long.as_str().into());
    let first = plan(
        &PolicyTables::default(),
        &target,
        &PolicyCapacity::default(),
        &BTreeSet::new(),
    );
    let applied = applied_after(&PolicyTables::default(), &first);
    let short = &applied.pod_names[&ip("10.0.0.1")];
    assert!(Arc::ptr_eq(short, &target.pod_names[&ip("10.0.0.1")]));
    assert_eq!(&*applied.pod_names[&ip("10.0.0.2")], name_kept(&long));
    assert!(name_kept(&long).len() < long.len());
    let again = plan(
        &applied,
        &target,
        &PolicyCapacity::default(),
        &BTreeSet::new(),
    );
    assert!(
        !again.ops().any(|op| matches!(op, PolicyOp::PutPodName(..))),
        "a name kept in part is not written again"
    );
}
