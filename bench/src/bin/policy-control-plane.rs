//! Policy control-plane benchmark: 1,000 NetworkPolicies over 10,000 pods
//! (as many identities) on 50 nodes, from the moment the lists are in
//! memory to the policy maps programmed (cold start), then single pod label
//! changes to the kernel, and the resident memory. Real kernel maps (root,
//! bpffs); no program is attached.
//!
//! `cargo run --release -p lb-bench --bin policy-control-plane -- [--pods N] [--policies N] [--changes N]`

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use lb_agent::{
    kernel::tc_programs::{TcOptions, TcPrograms},
    policy_reconcile::PolicyReconciler,
};
use lb_bench::control_plane::{percentile, publish, rss_mib};
use lb_bench::policy_objects::Synthetic;
use lb_core::{intent::Objects, yaml::parse_documents};
use lb_policy::{
    compile::{Adopted, PolicyCompiler, PolicyConfig},
    plan::PolicyCapacity,
    tables::PolicyTarget,
};

#[derive(Parser)]
struct Args {
    /// Pods (each its own identity).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Nodes the pods are spread over; this node is the first.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Single pod label changes to time.
    #[arg(long, default_value_t = 300)]
    changes: usize,
    /// Markdown output file (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lbbench-pcp-{}", std::process::id()));
    let result = run(&args, &pin_dir);
    let _ = std::fs::remove_dir_all(&pin_dir);
    let report = result?;
    publish(&report, args.out.as_deref())?;
    Ok(())
}

fn run(args: &Args, pin_dir: &Path) -> Result<String> {
    let cluster = Synthetic {
        pods: args.pods,
        policies: args.policies,
        nodes: args.nodes,
    };
    let parse_started = Instant::now();
    let parsed = parse_documents("bench", &cluster.yaml());
    ensure!(parsed.errors.is_empty(), "{:?}", parsed.errors.first());
    let mut objects: Objects = parsed.objects;
    let parse_time = parse_started.elapsed();

    let (mut tc, _) =
        TcPrograms::load(pin_dir, &TcOptions::default()).context("needs root and bpffs")?;
    let capacity = PolicyCapacity::default();
    let mut reconciler = PolicyReconciler::adopt(tc.policy_maps()?, capacity)?;
    let config = PolicyConfig {
        node: Some(cluster.node_of(0)),
        ..PolicyConfig::default()
    };
    let mut compiler = PolicyCompiler::new(config, &Adopted::default());
    let program =
        |compiler: &mut PolicyCompiler, reconciler: &mut PolicyReconciler<_>, objects: &Objects| {
            let started = Instant::now();
            let update = compiler.update(objects);
            let compiled = started.elapsed();
            let target = PolicyTarget::new(compiler.desired(), |_| Some(1), true, true);
            let mut done = reconciler.reconcile(&target);
            if update.follow_up {
                compiler.update(objects);
                let target = PolicyTarget::new(compiler.desired(), |_| Some(1), true, true);
                let follow_up = reconciler.reconcile(&target);
                done.writes += follow_up.writes;
                done.errors.extend(follow_up.errors);
            }
            (compiled, started.elapsed(), done, update.errors.len())
        };

    let (compile_time, cold, done, invalid) = program(&mut compiler, &mut reconciler, &objects);
    ensure!(done.complete(), "{done:?}");
    ensure!(invalid == 0, "{invalid} invalid objects");
    let tables = reconciler.applied();
    let (identities, endpoints, entries, ipcache) = (
        tables.identities.len(),
        tables.endpoints.len(),
        tables.entry_count(),
        tables.ipcache.len(),
    );

    // Relabel pods of this node, back and forth between two apps.
    let local: Vec<usize> = (0..args.pods).step_by(args.nodes.max(1)).collect();
    let mut latencies = Vec::with_capacity(args.changes);
    let mut compile_latencies = Vec::with_capacity(args.changes);
    for change in 0..args.changes {
        let pod = local[change % local.len()];
        let index = objects
            .pods
            .iter()
            .position(|p| *p.object.name == *format!("f-{pod}"))
            .context("the pod")?;
        let mut relabeled = (*objects.pods[index].object).clone();
        let mut labels = (*relabeled.labels).clone();
        labels.insert("app".into(), format!("a-{}", (pod + change + 1) % 500));
        relabeled.labels = Arc::new(labels);
        objects.pods[index].object = Arc::new(relabeled);
        let (compiled, took, done, _) = program(&mut compiler, &mut reconciler, &objects);
        ensure!(done.complete() && done.writes > 0, "{done:?}");
        compile_latencies.push(compiled);
        latencies.push(took);
    }
    latencies.sort();
    compile_latencies.sort();
    drop(tc);

    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Policy control plane: {} NetworkPolicies over {} pods on {} nodes\n",
        args.policies, args.pods, args.nodes
    );
    let _ = writeln!(
        report,
        "This node runs {} of the pods; every pod has a label of its own, so there are as \
         many identities as pods (the compiler's worst case). Programmed: {identities} \
         identities, {ipcache} ipcache prefixes, {endpoints} endpoint addresses, {entries} \
         policy entries.\n",
        local.len()
    );
    let _ = writeln!(report, "| measure | value | target |");
    let _ = writeln!(report, "|---|---|---|");
    let _ = writeln!(
        report,
        "| parse manifests (not counted) | {parse_time:.2?} | |"
    );
    let _ = writeln!(report, "| cold start: compile | {compile_time:.2?} | |");
    let _ = writeln!(
        report,
        "| cold start: lists to programmed policy maps ({} map writes) | {cold:.2?} | < 1 s |",
        done.writes
    );
    let _ = writeln!(
        report,
        "| one pod label change to the kernel, p50 ({} changes) | {:.2?} | |",
        args.changes,
        percentile(&latencies, 0.5)
    );
    let _ = writeln!(
        report,
        "| one pod label change to the kernel, p99 | {:.2?} | < 10 ms |",
        percentile(&latencies, 0.99)
    );
    let _ = writeln!(
        report,
        "| of which compiling, p50 / p99 | {:.2?} / {:.2?} | |",
        percentile(&compile_latencies, 0.5),
        percentile(&compile_latencies, 0.99)
    );
    let _ = writeln!(report, "| resident memory after | {:.0} MiB | |", rss_mib());
    Ok(report)
}
