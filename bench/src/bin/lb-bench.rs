//! `lb-bench`: the datapath benchmark on the lab.
//!
//! ```text
//! lb-bench [--quick] [--counts 1,1000,10000] [--rounds 15] [--duration SECS]
//!          [--threads 2] [--candidates direct,socket-lb,iptables,nftables]
//!          [--bulk-secs SECS] [--out DIR]
//! ```
//!
//! Measures every candidate side by side (rounds interleaved), prints one
//! markdown table and writes `latest.md`, `latest.json` and `crr.svg` into
//! `--out` (default `bench/results`; quick mode defaults to a temporary
//! directory). Needs root and the workspace binaries (`lb-agent`, `lbctl`,
//! `labpod`, `crr`) built next to this one. See `lb_bench::driver`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use lb_bench::driver::{self, CandidateKind, Config};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Datapath benchmark: direct, socket-LB, kube-proxy iptables and nftables, side by side",
    version
)]
struct Cli {
    /// Quick smoke run: 1 and 100 services, 1 round of 1 s, no iperf3,
    /// output in a temporary directory (each can still be overridden).
    #[arg(long)]
    quick: bool,
    /// Service counts, comma-separated.
    #[arg(long, value_delimiter = ',')]
    counts: Option<Vec<usize>>,
    /// Interleaved rounds per service count.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per CRR and per RR measurement (fractions allowed).
    #[arg(long)]
    duration: Option<f64>,
    /// Milliseconds per time slice in which the two runs of a pair take
    /// turns.
    #[arg(long)]
    slice_ms: Option<u64>,
    /// Client threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Candidates, comma-separated, in table order.
    #[arg(long, value_delimiter = ',')]
    candidates: Option<Vec<CandidateKind>>,
    /// Seconds of iperf3 per candidate at the largest count; 0 skips iperf3.
    #[arg(long)]
    bulk_secs: Option<u64>,
    /// Output directory for latest.md, latest.json and crr.svg.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut cfg = if cli.quick {
        Config::quick(cli.out.clone().unwrap_or_else(driver::temp_out_dir))
    } else {
        Config::full(cli.out.clone().unwrap_or_else(driver::default_out_dir))
    };
    if let Some(counts) = cli.counts {
        cfg.counts = counts;
    }
    if let Some(rounds) = cli.rounds {
        cfg.rounds = rounds;
    }
    if let Some(secs) = cli.duration {
        ensure!(
            secs.is_finite() && secs > 0.0,
            "--duration must be a positive number of seconds"
        );
        cfg.duration = Duration::from_secs_f64(secs);
    }
    if let Some(ms) = cli.slice_ms {
        ensure!(ms >= 1, "--slice-ms must be at least 1");
        cfg.slice = Duration::from_millis(ms);
    }
    if let Some(threads) = cli.threads {
        ensure!(threads >= 1, "--threads must be at least 1");
        cfg.threads = threads;
    }
    if let Some(candidates) = cli.candidates {
        cfg.candidates = candidates;
    }
    if let Some(secs) = cli.bulk_secs {
        cfg.bulk = (secs > 0).then(|| Duration::from_secs(secs));
    }
    let outcome = driver::run(&cfg)?;
    print!("{}", outcome.table);
    eprintln!(
        "lb-bench: wrote {}/latest.md, latest.json and crr.svg",
        outcome.out.display()
    );
    Ok(())
}
