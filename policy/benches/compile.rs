//! The policy compiler at the issue's scale: 1,000 policies over 10,000
//! pods (100 namespaces, 50 nodes, ~200 pods on this node), compiled and
//! planned cold; one pod relabel, and one new policy, reaching the maps.
//!
//! `cargo bench -p lb-policy --bench compile`. Each incremental case also
//! prints the median and 99th percentile of its individual iterations
//! (criterion reports the mean of batches), and of the follow-up updates
//! (not in criterion's figures: the change is in the maps before them).
#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented entry point"
)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use lb_core::intent::Objects;
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig, PolicyUpdate},
    plan::{plan, PolicyCapacity},
    tables::{PolicyTables, PolicyTarget},
};

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{extra_policy, generate, pod_index, relabeled, Shape, THIS_NODE};

/// The compiler and what the maps hold, as the agent keeps them.
struct Agent {
    compiler: PolicyCompiler,
    tables: PolicyTables,
}

impl Agent {
    fn new() -> Self {
        Self {
            compiler: PolicyCompiler::new(
                PolicyConfig {
                    node: Some(THIS_NODE.into()),
                    ..PolicyConfig::default()
                },
                &Adopted::default(),
            ),
            tables: PolicyTables::default(),
        }
    }

    /// One update: compile, plan from what the maps hold, and record the
    /// writes as done. Returns the update and the number of writes.
    fn sync(&mut self, objects: &Objects) -> (PolicyUpdate, usize) {
        let update = self.compiler.update(objects);
        let target = PolicyTarget::new(self.compiler.desired(), |_| Some(1), true, true);
        let plan = plan(
            &self.tables,
            &target,
            &PolicyCapacity::default(),
            &Default::default(),
        );
        let mut writes = 0;
        for op in plan.ops() {
            self.tables.apply(op);
            writes += 1;
        }
        (update, writes)
    }

    /// An update and, if it asks for one, its follow-up.
    fn settle(&mut self, objects: &Objects) {
        let (update, _) = self.sync(objects);
        assert!(update.errors.is_empty(), "{:?}", update.errors);
        if update.follow_up {
            self.sync(objects);
        }
    }
}

fn percentiles(name: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        println!("{name}: none");
        return;
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name}: {} iterations, median {:.3?}, p99 {:.3?}, max {:.3?}",
        samples.len(),
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}

fn bench(c: &mut Criterion) {
    let objects = generate(&Shape::ISSUE);
    let mut agent = Agent::new();
    agent.settle(&objects);
    let desired = agent.compiler.desired();
    println!(
        "cluster: {} pods, {} policies; {} identities, {} ipcache entries, {} endpoints, \
         {} sets, {} entries",
        objects.pods.len(),
        objects.network_policies.len(),
        desired.identities.len(),
        desired.ipcache.len(),
        desired.endpoints.len(),
        desired.sets.len(),
        agent.tables.entry_count()
    );

    let mut group = c.benchmark_group("policy");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("cold compile and plan", |b| {
        // (The agent is dropped untimed.)
        b.iter_with_large_drop(|| {
            let mut agent = Agent::new();
            agent.sync(&objects);
            agent
        })
    });
    drop(group);

    // A pod relabel (its `version` label, so it gets a new identity), on
    // another node and on this one: the update that brings it to the
    // maps is timed, its follow-up is not.
    let mut group = c.benchmark_group("policy");
    group.sample_size(50);
    let pods = [
        ("relabel remote pod", pod_index(&objects, "backend", false)),
        ("relabel local pod", pod_index(&objects, "backend", true)),
    ];
    for (name, index) in pods {
        let mut objects = objects.clone();
        let original = objects.pods[index].clone();
        let mut agent = Agent::new();
        agent.settle(&objects);
        let (mut samples, mut follow_ups) = (Vec::new(), Vec::new());
        let mut flip = false;
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    flip = !flip;
                    objects.pods[index] = if flip {
                        relabeled(&objects, index, "v3")
                    } else {
                        original.clone()
                    };
                    let start = Instant::now();
                    let (update, _) = agent.sync(&objects);
                    let took = start.elapsed();
                    total += took;
                    samples.push(took);
                    if update.follow_up {
                        let start = Instant::now();
                        agent.sync(&objects);
                        follow_ups.push(start.elapsed());
                    }
                }
                total
            })
        });
        percentiles(name, &mut samples);
        percentiles(&format!("{name}, its follow-up"), &mut follow_ups);
    }

    // A policy added (and, every other iteration, removed again).
    let mut objects = objects.clone();
    let mut agent = Agent::new();
    agent.settle(&objects);
    let (mut samples, mut follow_ups) = (Vec::new(), Vec::new());
    group.bench_function("add or remove a policy", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                if objects.network_policies.len() == Shape::ISSUE.policies {
                    objects.network_policies.push(extra_policy(7));
                } else {
                    objects.network_policies.pop();
                }
                let start = Instant::now();
                let (update, _) = agent.sync(&objects);
                let took = start.elapsed();
                total += took;
                samples.push(took);
                if update.follow_up {
                    let start = Instant::now();
                    agent.sync(&objects);
                    follow_ups.push(start.elapsed());
                }
            }
            total
        })
    });
    percentiles("add or remove a policy", &mut samples);
    if !follow_ups.is_empty() {
        percentiles("add or remove a policy, its follow-up", &mut follow_ups);
    }
    drop(group);
}

criterion_group!(benches, bench);
criterion_main!(benches);
