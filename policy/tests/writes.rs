//! What the writes of a plan can and cannot keep while they go in.

use std::net::IpAddr;

use lb_core::yaml::parse_documents;
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig},
    desired::{PolicyLookup, Verdict},
    plan::{plan, PolicyCapacity},
    tables::{PolicyTables, PolicyTarget},
};

const PODS: &str = r#"
kind: Namespace
metadata: {name: x}
---
kind: Node
metadata: {name: node1}
status: {addresses: [{type: InternalIP, address: 192.168.100.1}]}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}, uid: a}
spec: {nodeName: node1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}, uid: b}
spec: {nodeName: node1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.1.3, podIPs: [{ip: 10.244.1.3}]}
"#;

/// Whether a flow from pod a to pod b (both on this node) is allowed in
/// each state the writes from `before` to `after` pass through (each
/// update followed by its follow-up).
fn states(before: &str, after: &str) -> Vec<bool> {
    let mut compiler = PolicyCompiler::new(
        PolicyConfig {
            node: Some("node1".into()),
            ..PolicyConfig::default()
        },
        &Adopted::default(),
    );
    let mut tables = PolicyTables::default();
    let (a, b): (IpAddr, IpAddr) = ("10.244.1.2".parse().unwrap(), "10.244.1.3".parse().unwrap());
    let mut seen = Vec::new();
    for (i, text) in [before, after].into_iter().enumerate() {
        let parsed = parse_documents("t.yaml", &format!("{PODS}---\n{text}"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        for _ in 0..2 {
            compiler.update(&parsed.objects);
            let target = PolicyTarget::new(compiler.desired(), |_| Some(1), true, true);
            let plan = plan(
                &tables,
                &target,
                &PolicyCapacity::default(),
                &Default::default(),
            );
            for op in plan.ops() {
                tables.apply(op);
                if i == 1 {
                    let verdict = tables.verdict(a, b, 6, 80, false);
                    seen.push(matches!(verdict, Verdict::Allowed { .. }));
                }
            }
        }
    }
    seen
}

/// A flow between two pods of this node is checked on both: the source's
/// egress and the destination's ingress. Here the first denies it before
/// and the second after; the endpoints switch sets in two writes, and in
/// between neither denies it. Keeping the conjunction needs every
/// endpoint to switch at once (for instance endpoints double-buffered
/// behind one revision the datapath reads), which the maps do not offer
/// yet: the property tests check each side on its own.
#[test]
#[ignore = "endpoints switch sets one write at a time (needs an atomic switch in the datapath)"]
fn both_sides_switch_in_separate_writes() {
    let seen = states(
        "kind: NetworkPolicy\nmetadata: {name: e, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Egress]}\n",
        "kind: NetworkPolicy\nmetadata: {name: i, namespace: x}\nspec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}\n",
    );
    assert_eq!(seen.last(), Some(&false));
    assert!(seen.iter().all(|allowed| !allowed), "{seen:?}");
}
