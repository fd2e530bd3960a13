//! The datapath benchmark driver behind `lb-bench`: every candidate measured
//! side by side on the lab, rounds interleaved, medians and ratios to the
//! direct path.
//!
//! # Layout
//!
//! Each candidate gets a lab node of its own (a network namespace with its
//! own netfilter tables and its own cgroup), with one server pod (`crr
//! server`, plus `iperf3 -s` when bulk throughput is measured) and one client
//! pod. Candidates are therefore isolated from each other: kube-proxy's rules
//! in the iptables node do not slow down the direct node (they would: every
//! new connection forwarded through that node walks `KUBE-SERVICES`), and the
//! socket-level programs attach only to the socket-LB node's cgroup.
//!
//! | candidate | node setup | the client connects to |
//! |---|---|---|
//! | `direct` | nothing | the server pod's IP |
//! | `socket-lb` | `lb-agent` on the node cgroup, N services in its manifest directory | the Service VIP |
//! | `tc` | `lb-agent` with socket translation off, tc programs on the pod interfaces and the uplink | the Service VIP |
//! | `socket-lb+policy` | as `socket-lb`, with NetworkPolicy enforced on the pods (the flow allowed by one rule) and a synthetic cluster's policies and identities loaded | the Service VIP |
//! | `iptables` | kube-proxy's `iptables-restore` input for N services, loaded in the node netns | the Service VIP |
//! | `nftables` | kube-proxy's `nft -f` input for N services, loaded in the node netns | the Service VIP |
//!
//! A new candidate is one more [`CandidateKind`] variant and one
//! `Candidate` implementation (`stands.rs`).
//!
//! # Procedure
//!
//! For every service count: each candidate programs the N services (timed:
//! agent manifest write to its `reconciled frontends=N` log line,
//! `iptables-restore` and `nft -f` wall time, each from an empty state);
//! then a short unrecorded CRR warm-up per candidate, then `rounds` rounds.
//! In each round every candidate is paired with direct, CRR then RR (the
//! visiting order rotates by one per round): the two clients of a pair run
//! together, taking turns in slices of [`Config::slice`] ([`crr::Turns`]),
//! `duration` each, direct taking the first slice in every other round. At
//! the largest count, one `iperf3` bulk run per candidate follows. Netfilter
//! candidates have their conntrack table flushed before every measurement.
//!
//! Reported per (count, candidate): medians over rounds of connections/s,
//! p50/p99 latency and RR transactions/s, and ratios to direct computed per
//! pair and then taken the median of: the turns cancel the drift of a shared
//! machine down to a slice.
//!
//! [`crr::Turns`]: crate::crr::Turns

mod config;
mod measure;
mod processes;
mod render;
mod services;
mod stands;
mod summary;

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_e2e::{agent::Binaries, lab::Lab};

pub use config::{default_out_dir, temp_out_dir, CandidateKind, Config};
pub use summary::{median_interval, Ratio, Row};

use lb_e2e::scenario::is_root;
use measure::{measurement_pairs, run_client, run_iperf, run_taking_turns, Cell, Mode};
use render::{render_policy_cost, render_report, render_svg, render_table, Machine};
use services::ServiceSet;
use stands::{build_candidate, Candidate};
use summary::{policy_cost, summarize};

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Table rows, by count then candidate.
    pub rows: Vec<Row>,
    /// The markdown table.
    pub table: String,
    /// Where `latest.md`, `latest.json` and `crr.svg` were written.
    pub out: PathBuf,
}

/// Runs the benchmark described by `cfg`, writes `latest.md`, `latest.json`
/// and `crr.svg` into `cfg.out` and returns the rows and the table.
pub fn run(cfg: &Config) -> Result<Outcome> {
    ensure!(
        is_root(),
        "the benchmark needs root (network namespaces, cgroups, BPF)"
    );
    ensure!(!cfg.counts.is_empty(), "no service counts");
    ensure!(
        cfg.counts.iter().all(|&c| c >= 1),
        "service counts start at 1"
    );
    ensure!(cfg.rounds >= 1, "at least one round");
    ensure!(!cfg.candidates.is_empty(), "no candidates");
    let bins = Binaries::locate()?;
    let crr = match &cfg.crr {
        Some(path) => path.clone(),
        None => {
            let path = bins.agent.with_file_name("crr");
            ensure!(
                path.exists(),
                "{} is missing; build it (`cargo build -p lb-bench --bins`)",
                path.display()
            );
            path
        }
    };
    let started = Instant::now();

    // The lab is declared first so that it is dropped last.
    let mut lab = Lab::new()?;
    let mut candidates: Vec<Box<dyn Candidate>> = Vec::new();
    for &kind in &cfg.candidates {
        candidates.push(build_candidate(
            kind,
            &mut lab,
            &bins,
            &crr,
            cfg.bulk.is_some(),
            cfg.policy_scale,
        )?);
    }
    let lab = &lab;
    let max_count = *cfg.counts.iter().max().expect("not empty");
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();

    for &count in &cfg.counts {
        for (i, cand) in candidates.iter_mut().enumerate() {
            let services =
                ServiceSet::new(count, cfg.endpoints_per_service, cand.stand().server_ip());
            let took = cand.program(lab, &services).with_context(|| {
                format!("programming {count} services for {}", cand.kind().name())
            })?;
            if let Some(took) = took {
                eprintln!(
                    "lb-bench: {count} services: {} programmed in {:.3} s",
                    cand.kind().name(),
                    took.as_secs_f64()
                );
            }
            cells.entry((count, i)).or_default().program_s = took.map(|d| d.as_secs_f64());
        }
        // A short unrecorded CRR run per candidate warms caches, the
        // conntrack and route lookups and the servers' threads.
        let warmup = Config {
            duration: (cfg.duration / 4).min(Duration::from_millis(500)),
            ..cfg.clone()
        };
        for cand in &candidates {
            cand.before_measurement()?;
            run_client(lab, &crr, cand.as_ref(), Mode::Crr, &warmup)?;
        }
        let direct = candidates
            .iter()
            .position(|c| c.kind() == CandidateKind::Direct);
        for round in 0..cfg.rounds {
            for mode in [Mode::Crr, Mode::Rr] {
                for pair in measurement_pairs(candidates.len(), direct, round) {
                    let order = pair.order();
                    let cands: Vec<&dyn Candidate> =
                        order.iter().map(|&i| candidates[i].as_ref()).collect();
                    let samples = run_taking_turns(lab, &crr, &cands, mode, cfg)?;
                    let mut measured = Vec::with_capacity(2);
                    for ((i, cand), sample) in order.into_iter().zip(cands).zip(samples) {
                        eprintln!(
                            "lb-bench: {count} services, round {}/{}: {:<10} {} {:>8.0}/s p50 {:>7.1} us p99 {:>7.1} us{}",
                            round + 1,
                            cfg.rounds,
                            cand.kind().name(),
                            mode.name(),
                            sample.tps,
                            sample.p50_us,
                            sample.p99_us,
                            if sample.errors > 0 {
                                format!(" ({} errors)", sample.errors)
                            } else {
                                String::new()
                            }
                        );
                        measured.push((i, sample));
                    }
                    let baseline = pair
                        .baseline
                        .and_then(|b| measured.iter().find(|(i, _)| *i == b))
                        .map(|(_, sample)| sample.clone());
                    for (i, sample) in measured {
                        let cell = cells.entry((count, i)).or_default();
                        cell.samples_mut(mode).push(sample);
                        if let (Some(baseline), false) = (&baseline, Some(i) == pair.baseline) {
                            cell.baselines_mut(mode).push(baseline.clone());
                        }
                    }
                }
            }
        }
        if let (Some(secs), true) = (cfg.bulk, count == max_count) {
            for (i, cand) in candidates.iter().enumerate() {
                cand.before_measurement()?;
                let gbps = run_iperf(lab, cand.as_ref(), secs)
                    .with_context(|| format!("iperf3 through {}", cand.kind().name()))?;
                eprintln!(
                    "lb-bench: {count} services: {} iperf3 {gbps:.2} Gbit/s",
                    cand.kind().name()
                );
                cells.entry((count, i)).or_default().bulk_gbps = Some(gbps);
            }
        }
    }
    let kinds: Vec<CandidateKind> = candidates.iter().map(|c| c.kind()).collect();
    drop(candidates);
    let elapsed = started.elapsed();

    let rows = summarize(&cfg.counts, &kinds, &cells);
    let costs = policy_cost(&cfg.counts, &kinds, &cells);
    let table = render_table(&rows);
    let with_cost = table.clone() + &render_policy_cost(&costs, &cfg.policy_scale);
    fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let machine = Machine::probe();
    fs::write(
        cfg.out.join("latest.md"),
        render_report(cfg, &machine, &with_cost, &rows, elapsed),
    )?;
    let raw = serde_json::json!({
        "machine": machine,
        "config": {
            "counts": cfg.counts,
            "rounds": cfg.rounds,
            "duration_s": cfg.duration.as_secs_f64(),
            "slice_ms": cfg.slice.as_millis(),
            "threads": cfg.threads,
            "endpoints_per_service": cfg.endpoints_per_service,
            "bulk_s": cfg.bulk.map(|d| d.as_secs_f64()),
            "quick": cfg.quick,
        },
        "rows": rows,
        "policy_cost": costs,
        "cells": cells.iter().map(|((count, i), cell)| serde_json::json!({
            "services": count,
            "candidate": kinds[*i],
            "cell": cell,
        })).collect::<Vec<_>>(),
    });
    fs::write(
        cfg.out.join("latest.json"),
        serde_json::to_string_pretty(&raw)? + "\n",
    )?;
    fs::write(
        cfg.out.join("crr.svg"),
        render_svg(&cfg.counts, &kinds, &rows),
    )?;
    Ok(Outcome {
        rows,
        table,
        out: cfg.out.clone(),
    })
}
