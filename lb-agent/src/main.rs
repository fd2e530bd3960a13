//! lb-agent: the node daemon.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use lb_agent::{datapath::Datapath, model, mounts, plan::Capacity, reconcile::Reconciler, yaml};

/// Socket-level Service load balancer: programs eBPF maps from Kubernetes
/// Service and EndpointSlice objects so that connect() to a ClusterIP reaches a
/// backend directly.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory of Kubernetes YAML (Service and EndpointSlice objects,
    /// multi-document files and `kind: List` accepted); re-read when it changes.
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: PathBuf,
    /// cgroup v2 directory whose processes get translated; default: the cgroup v2 root.
    #[arg(long, env = "LB_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links; must be on a bpf mount.
    #[arg(long, env = "LB_BPFFS_DIR", default_value = "/sys/fs/bpf/lb")]
    bpffs_dir: PathBuf,
    /// This node's name: endpoints with this `nodeName` are local (internal
    /// traffic policy Local), and its Node object's zone label selects topology hints.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// How often the manifest directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let cgroup = match &args.cgroup {
        Some(path) => path.clone(),
        None => mounts::cgroup2_root()?.context("no cgroup v2 mount found; pass --cgroup")?,
    };

    let mut datapath = Datapath::load(&args.bpffs_dir).with_context(|| {
        format!(
            "loading the datapath with pins in {}",
            args.bpffs_dir.display()
        )
    })?;
    let mut reconciler = Reconciler::adopt(&datapath.maps, Capacity::default())?;
    let mut last_seen: Option<yaml::Fingerprint> = None;
    let mut attached = false;
    loop {
        match yaml::fingerprint(&args.manifests) {
            Ok(fingerprint) if last_seen.as_ref() != Some(&fingerprint) => {
                sync(&args, &mut datapath, &mut reconciler);
                last_seen = Some(fingerprint);
            }
            Ok(_) => {}
            // Keep serving the last state: a vanished directory is not an
            // instruction to delete every service.
            Err(err) => log::error!(
                "reading {}: {err}; keeping the current state",
                args.manifests.display()
            ),
        }
        if !attached {
            datapath
                .attach(&cgroup)
                .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
            attached = true;
            log::info!("ready: programs attached to {}", cgroup.display());
        }
        thread::sleep(Duration::from_millis(args.poll_ms));
    }
}

/// Reads the manifests and reconciles the maps with them.
fn sync(args: &Args, datapath: &mut Datapath, reconciler: &mut Reconciler) {
    let started = Instant::now();
    let parsed = match yaml::read_dir(&args.manifests) {
        Ok(parsed) => parsed,
        Err(err) => {
            log::error!(
                "reading {}: {err}; keeping the current state",
                args.manifests.display()
            );
            return;
        }
    };
    let node = model::NodeContext {
        name: args.node_name.clone(),
    };
    let compiled = model::compile(&parsed.objects, &node);
    for error in parsed.errors.iter().chain(&compiled.errors) {
        log::error!("skipped: {error}");
    }
    let outcome = reconciler.reconcile(&mut datapath.maps, &compiled.desired);
    for error in &outcome.errors {
        log::error!("{error}");
    }
    if outcome.terminated_sockets > 0 {
        log::info!(
            "terminated {} connected UDP sockets of removed backends",
            outcome.terminated_sockets
        );
    }
    log::info!(
        "reconciled {} frontends with {} map writes in {:?}",
        outcome.frontends,
        outcome.writes,
        started.elapsed()
    );
}
