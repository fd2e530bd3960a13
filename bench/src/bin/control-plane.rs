//! Control-plane scale benchmark: 10,000 Services with 10 endpoints each, from
//! the moment the lists are in memory to fully programmed maps (cold start),
//! then single EndpointSlice changes to map update latency, and the resident
//! memory; then the same Services as a YAML directory (one file per
//! Service), and one small file changed to map update latency. Real kernel
//! maps (root, bpffs); no programs are attached.
//!
//! `cargo run --release -p lb-bench --bin control-plane -- [--services N] [--endpoints N] [--changes N]`

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use lb_agent::{
    kernel::{socket_programs::SocketPrograms, AyaServiceMaps},
    reconcile::{Reconciled, Reconciler},
    sources::files::ManifestDir,
};
use lb_bench::control_plane::{percentile, publish, rss_mib};
use lb_core::{
    admission::AdmissionRules,
    compile::Compiler,
    intent::{NodeContext, Objects},
    plan::{Capacity, MaglevSettings},
    yaml::parse_documents,
};

#[derive(Parser)]
struct Args {
    /// Services.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Single-endpoint changes to time.
    #[arg(long, default_value_t = 300)]
    changes: usize,
    /// Markdown output file (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn manifests(services: usize, endpoints: usize) -> String {
    let mut text = String::with_capacity(services * 900);
    for i in 0..services {
        text.push_str(&manifest(i, endpoints));
    }
    text
}

/// Service `svc-{i}` and its EndpointSlice.
fn manifest(i: usize, endpoints: usize) -> String {
    let mut text = String::with_capacity(900);
    let (hi, lo) = (i / 250, i % 250 + 1);
    let _ = write!(
        text,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: 10.96.{hi}.{lo}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-abc, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for e in 0..endpoints {
        let _ = writeln!(text, "- addresses: [\"10.{}.{}.{}\"]", 100 + e, hi, lo);
    }
    text.push_str("---\n");
    text
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lbbench-cp-{}", std::process::id()));
    let result = run(&args, &pin_dir);
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut report = result?;
    let yaml_pins = PathBuf::from(format!("/sys/fs/bpf/lbbench-yaml-{}", std::process::id()));
    let yaml_dir = std::env::temp_dir().join(format!("lbbench-yaml-{}", std::process::id()));
    let result = run_yaml(&args, &yaml_pins, &yaml_dir);
    let _ = std::fs::remove_dir_all(&yaml_pins);
    let _ = std::fs::remove_dir_all(&yaml_dir);
    report.push_str(&result?);
    publish(&report, args.out.as_deref())?;
    Ok(())
}

/// The socket path's maps with a compiler and a reconciler in front, as
/// the agent drives them (no programs attached).
struct Stand {
    _programs: SocketPrograms,
    maps: AyaServiceMaps,
    reconciler: Reconciler,
    compiler: Compiler,
}

impl Stand {
    fn load(pin_dir: &std::path::Path) -> Result<Self> {
        let (programs, socket_maps) =
            SocketPrograms::load(pin_dir, &Default::default(), &Default::default())
                .context("needs root and bpffs")?;
        let maps = AyaServiceMaps::new(socket_maps, None);
        let reconciler = Reconciler::adopt(&maps, Capacity::default(), MaglevSettings::default())?;
        Ok(Self {
            _programs: programs,
            maps,
            reconciler,
            compiler: Compiler::new(NodeContext::default()),
        })
    }

    /// Compiles `objects` and programs the result; returns the time the
    /// compiler took and the pass's outcome.
    fn apply(&mut self, objects: &Objects) -> (Duration, Reconciled) {
        let started = Instant::now();
        let update = self.compiler.update(objects);
        let compiled = started.elapsed();
        let outcome =
            self.reconciler
                .reconcile(&mut self.maps, self.compiler.desired(), &update.changed);
        (compiled, outcome)
    }
}

fn run(args: &Args, pin_dir: &std::path::Path) -> Result<String> {
    let parse_started = Instant::now();
    let parsed = parse_documents("bench", &manifests(args.services, args.endpoints));
    anyhow::ensure!(parsed.errors.is_empty(), "{:?}", parsed.errors.first());
    let mut objects: Objects = parsed.objects;
    let parse_time = parse_started.elapsed();

    let mut stand = Stand::load(pin_dir)?;

    let cold_started = Instant::now();
    let (compile_time, outcome) = stand.apply(&objects);
    let cold = cold_started.elapsed();
    anyhow::ensure!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    anyhow::ensure!(
        outcome.frontends == args.services,
        "programmed {}",
        outcome.frontends
    );

    let mut latencies = Vec::with_capacity(args.changes);
    let mut compile_latencies = Vec::with_capacity(args.changes);
    for change in 0..args.changes {
        let index = change * 7919 % args.services;
        let slice = &mut objects.endpoint_slices[index];
        let mut updated = (*slice.object).clone();
        let endpoint = &mut updated.endpoints[0];
        endpoint.addresses[0] = format!("10.99.{}.{}", change / 250 % 250, change % 250 + 1);
        slice.object = Arc::new(updated);
        let started = Instant::now();
        let (compile_time, outcome) = stand.apply(&objects);
        compile_latencies.push(compile_time);
        latencies.push(started.elapsed());
        anyhow::ensure!(
            outcome.errors.is_empty() && outcome.writes > 0,
            "{outcome:?}"
        );
    }
    latencies.sort();
    compile_latencies.sort();
    let entries = args.services * args.endpoints;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Control plane: {} Services x {} endpoints\n",
        args.services, args.endpoints
    );
    let _ = writeln!(report, "| measure | value | target |");
    let _ = writeln!(report, "|---|---|---|");
    let _ = writeln!(
        report,
        "| parse manifests (not counted) | {parse_time:.2?} | |"
    );
    let _ = writeln!(report, "| cold start: compile | {compile_time:.2?} | |");
    let _ = writeln!(report, "| cold start: lists to programmed maps ({entries} endpoints, {} map writes) | {cold:.2?} | < 2 s |", outcome.writes);
    let _ = writeln!(
        report,
        "| one endpoint change, p50 ({} changes) | {:.2?} | |",
        args.changes,
        percentile(&latencies, 0.5)
    );
    let _ = writeln!(
        report,
        "| one endpoint change, p99 | {:.2?} | < 5 ms |",
        percentile(&latencies, 0.99)
    );
    let _ = writeln!(
        report,
        "| of which compiling the snapshot, p50 / p99 | {:.2?} / {:.2?} | |",
        percentile(&compile_latencies, 0.5),
        percentile(&compile_latencies, 0.99)
    );
    let _ = writeln!(
        report,
        "| resident memory after | {:.0} MiB | < 150 MB |",
        rss_mib()
    );
    Ok(report)
}

/// The YAML source at the same scale: one file per Service, then one
/// Service file rewritten (a changed endpoint) at a time, timed from the
/// write to the programmed maps: re-read, compile, reconcile.
fn run_yaml(args: &Args, pin_dir: &std::path::Path, dir: &std::path::Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    for i in 0..args.services {
        std::fs::write(
            dir.join(format!("svc-{i}.yaml")),
            manifest(i, args.endpoints),
        )?;
    }
    let mut stand = Stand::load(pin_dir)?;
    let mut source = ManifestDir::new(dir.to_owned(), AdmissionRules::default());

    let cold_started = Instant::now();
    source.refresh()?;
    let snapshot = source.snapshot();
    anyhow::ensure!(snapshot.errors.is_empty(), "{:?}", snapshot.errors.first());
    let (_, outcome) = stand.apply(&snapshot.objects);
    let cold = cold_started.elapsed();
    anyhow::ensure!(
        outcome.frontends == args.services,
        "programmed {}",
        outcome.frontends
    );

    let changes = args.changes.min(100);
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let index = change * 7919 % args.services;
        let text = manifest(index, args.endpoints).replacen(
            "- addresses: [\"",
            &format!(
                "- addresses: [\"10.98.{}.{}\"]\n- addresses: [\"",
                change / 250 % 250,
                change % 250 + 1
            ),
            1,
        );
        let path = dir.join(format!("svc-{index}.yaml"));
        let staging = dir.join(".staging");
        let started = Instant::now();
        std::fs::write(&staging, text)?;
        std::fs::rename(&staging, &path)?;
        anyhow::ensure!(source.refresh()?, "the change was not seen");
        let (_, outcome) = stand.apply(&source.snapshot().objects);
        latencies.push(started.elapsed());
        anyhow::ensure!(
            outcome.errors.is_empty() && outcome.writes > 0,
            "{outcome:?}"
        );
    }
    latencies.sort();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n## YAML source: {} Services in {} files\n",
        args.services, args.services
    );
    let _ = writeln!(report, "| measure | value |");
    let _ = writeln!(report, "|---|---|");
    let _ = writeln!(
        report,
        "| cold start: read, parse, compile, program | {cold:.2?} |"
    );
    let _ = writeln!(
        report,
        "| one file changed to programmed maps, p50 ({changes} changes) | {:.2?} |",
        percentile(&latencies, 0.5)
    );
    let _ = writeln!(
        report,
        "| one file changed to programmed maps, p99 | {:.2?} |",
        percentile(&latencies, 0.99)
    );
    Ok(report)
}
