//! An update does the work of what changed, and no more: a pod relabel, a
//! namespace relabel, a new pod or a new policy, in a generated cluster
//! (the benchmark's, smaller), counted by [`PolicyStats`].

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Namespace;
use lb_core::intent::{Objects, Sourced};
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig, PolicyStats},
    desired::PolicyDesired,
};

#[path = "../benches/support/cluster.rs"]
mod cluster;

use cluster::{extra_policy, generate, namespace_name, pod_index, relabeled, Shape, THIS_NODE};

const SHAPE: Shape = Shape {
    namespaces: 12,
    workloads: 5,
    pods: 600,
    nodes: 6,
    policies: 120,
};

/// A compiler that has seen `objects` (and the follow-up).
fn settled(objects: &Objects) -> PolicyCompiler {
    let mut compiler = PolicyCompiler::new(
        PolicyConfig {
            node: Some(THIS_NODE.into()),
            ..PolicyConfig::default()
        },
        &Adopted::default(),
    );
    let update = compiler.update(objects);
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    compiler.update(objects);
    compiler
}

/// The number of sets with an entry for `identity`.
fn sets_with(desired: &PolicyDesired, identity: u32) -> usize {
    desired
        .sets
        .values()
        .filter(|set| set.entries.keys().any(|e| e.identity == identity))
        .count()
}

/// The pod peers the cluster's policies name, each once (a bound on the
/// selectors a new identity is matched against).
fn peer_count(objects: &Objects) -> usize {
    let mut peers: Vec<String> = objects
        .network_policies
        .iter()
        .flat_map(|p| {
            let spec = p.object.spec.clone().unwrap_or_default();
            let namespace = p.object.metadata.namespace.clone().unwrap_or_default();
            let from = spec
                .ingress
                .into_iter()
                .flatten()
                .flat_map(|r| r.from.into_iter().flatten());
            let to = spec
                .egress
                .into_iter()
                .flatten()
                .flat_map(|r| r.to.into_iter().flatten());
            from.chain(to)
                .filter(|peer| peer.ip_block.is_none())
                .map(move |peer| {
                    let own = peer.namespace_selector.is_none().then(|| namespace.clone());
                    format!(
                        "{own:?} {:?} {:?}",
                        peer.namespace_selector, peer.pod_selector
                    )
                })
        })
        .collect();
    peers.sort();
    peers.dedup();
    peers.len()
}

#[test]
fn an_update_without_changes_does_nothing() {
    let objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let update = compiler.update(&objects);
    assert!(!update.changed && !update.follow_up);
    assert_eq!(*compiler.stats(), PolicyStats::default());
}

#[test]
fn a_pod_relabel_reads_one_pod_and_patches_the_sets_of_its_new_identity() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let index = pod_index(&objects, "backend", false);
    objects.pods[index] = relabeled(&objects, index, "v3");
    let update = compiler.update(&objects);
    assert!(update.changed);
    let stats = compiler.stats().clone();
    let pod_ip = objects.pods[index].object.ips[0];
    let new = compiler.desired().ipcache[&format!("{pod_ip}/32").parse().unwrap()].identity;
    assert_eq!(stats.pods_read, 1);
    assert_eq!(stats.pods_relabeled, 0);
    assert_eq!(stats.policies_parsed, 0);
    assert_eq!(stats.identities_added, 1, "v3 is a new label set");
    assert_eq!(stats.ipcache_writes, 1, "its one address");
    assert!(
        stats.peer_matches <= peer_count(&objects),
        "the new identity is matched once per peer at most: {stats:?}"
    );
    assert_eq!(stats.sets_computed, 0, "no set computed whole: {stats:?}");
    assert!(
        sets_with(compiler.desired(), new) > 0,
        "some policy lets backends in"
    );
    assert_eq!(
        stats.sets_patched,
        sets_with(compiler.desired(), new),
        "exactly the sets that now allow the new identity"
    );
    assert_eq!(
        stats.endpoint_writes, 0,
        "a pod of another node: no endpoint moves"
    );

    // Back to its labels: the old identity is still in use (the other
    // replicas), v3 retires; nothing to patch until it is released.
    objects.pods[index] = relabeled(&objects, index, "v1");
    let update = compiler.update(&objects);
    assert!(update.follow_up);
    let stats = compiler.stats().clone();
    assert_eq!(
        (stats.identities_added, stats.sets_patched),
        (0, 0),
        "{stats:?}"
    );
    compiler.update(&objects);
    let stats = compiler.stats().clone();
    assert_eq!(stats.identities_released, 1);
    assert_eq!(stats.pods_read, 0);
    assert_eq!(sets_with(compiler.desired(), new), 0);
    assert!(
        stats.sets_patched > 0 && stats.sets_computed == 0,
        "{stats:?}"
    );
}

#[test]
fn a_local_pod_relabel_moves_its_endpoint_only() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let index = pod_index(&objects, "backend", true);
    objects.pods[index] = relabeled(&objects, index, "v3");
    compiler.update(&objects);
    let stats = compiler.stats().clone();
    assert_eq!(stats.pods_read, 1);
    assert_eq!(stats.endpoint_writes, 1, "{stats:?}");
    assert!(
        stats.sets_computed <= 1,
        "at most its own recipe is new: {stats:?}"
    );
}

#[test]
fn a_new_pod_with_known_labels_writes_its_address_and_nothing_else() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let index = pod_index(&objects, "frontend", false);
    let mut pod = (*objects.pods[index].object).clone();
    pod.name = Arc::from("frontend-extra");
    // An address in the pod CIDR, as its replicas': one outside the
    // ipBlock an egress rule names with a named port would tell it apart.
    pod.ips = Box::new(["10.244.250.1".parse().unwrap()]);
    objects.pods.push(Sourced {
        origin: Arc::from("test"),
        object: Arc::new(pod),
    });
    compiler.update(&objects);
    let stats = compiler.stats().clone();
    assert_eq!(
        stats,
        PolicyStats {
            pods_read: 1,
            ipcache_writes: 1,
            ..PolicyStats::default()
        }
    );
}

#[test]
fn a_namespace_relabel_works_out_the_labels_of_its_pods_only() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let name = namespace_name(5);
    let position = objects
        .namespaces
        .iter()
        .position(|n| n.object.metadata.name.as_deref() == Some(name.as_str()))
        .unwrap();
    let mut namespace: Namespace = (*objects.namespaces[position].object).clone();
    namespace
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("env".into(), "qa".into());
    objects.namespaces[position] = Sourced {
        origin: Arc::from("test"),
        object: Arc::new(namespace),
    };
    let in_namespace = objects
        .pods
        .iter()
        .filter(|p| *p.object.namespace == *name)
        .count();
    compiler.update(&objects);
    let stats = compiler.stats().clone();
    assert_eq!(stats.pods_relabeled, in_namespace);
    assert_eq!(stats.pods_read, 0);
    assert_eq!(stats.policies_parsed, 0);
    assert_eq!(
        stats.ipcache_writes, in_namespace,
        "each of its pods has a new identity"
    );
}

#[test]
fn a_new_policy_computes_the_sets_of_the_pods_it_selects_only() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let sets_before = compiler.desired().sets.clone();
    let namespace = 4;
    objects.network_policies.push(extra_policy(namespace));
    let local_in_namespace = objects
        .pods
        .iter()
        .filter(|p| {
            *p.object.namespace == *namespace_name(namespace)
                && p.object.node.as_deref() == Some(THIS_NODE)
        })
        .count();
    assert!(local_in_namespace > 0);
    compiler.update(&objects);
    let stats = compiler.stats().clone();
    assert_eq!(stats.policies_parsed, 1);
    assert_eq!((stats.pods_read, stats.pods_relabeled), (0, 0));
    assert_eq!(stats.ipcache_writes, 0);
    assert!(
        (1..=local_in_namespace).contains(&stats.sets_computed),
        "the recipes of the namespace's pods only: {stats:?}"
    );
    assert_eq!(stats.sets_patched, 0);
    assert!(stats.endpoint_writes <= local_in_namespace);
    // Every other set is as it was.
    let unchanged = compiler
        .desired()
        .sets
        .iter()
        .filter(|(n, s)| sets_before.get(n).is_some_and(|b| b.digest == s.digest))
        .count();
    assert!(unchanged + stats.sets_computed >= compiler.desired().sets.len());
}

#[test]
fn a_policy_naming_an_excluded_label_works_out_every_pod_again() {
    let mut objects = generate(&SHAPE);
    let mut compiler = settled(&objects);
    let mut policy = (*extra_policy(4).object).clone();
    policy.spec.as_mut().unwrap().pod_selector = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("pod-template-hash".to_string(), "x".to_string())].into()),
            match_expressions: None,
        },
    );
    objects.network_policies.push(Sourced {
        origin: Arc::from("test"),
        object: Arc::new(policy),
    });
    compiler.update(&objects);
    // pod-template-hash now tells identities apart, so every pod's
    // identity labels are worked out again (and most change).
    let stats = compiler.stats().clone();
    assert_eq!(stats.pods_relabeled, objects.pods.len());
    assert!(stats.identities_added > 0);
}
