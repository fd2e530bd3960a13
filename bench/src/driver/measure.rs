//! Measurements: `crr client` runs, alone or in pairs taking turns, iperf3
//! runs, the pairs of each round and the samples they give.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_e2e::lab::Lab;
use serde::{Deserialize, Serialize};

use super::{
    config::Config,
    services::{CRR_SERVICE_PORT, CRR_TARGET_PORT, IPERF_PORT},
    stands::Candidate,
};
use crate::crr::{self, Turns};

/// One `crr client` run, as parsed from its JSON line.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(super) struct ClientSample {
    /// Transactions (connections in CRR) per second.
    pub(super) tps: f64,
    /// Median latency, µs.
    pub(super) p50_us: f64,
    /// 99th percentile latency, µs.
    pub(super) p99_us: f64,
    /// Completed transactions.
    pub(super) transactions: u64,
    /// Failed transactions.
    pub(super) errors: u64,
}

/// Transaction pattern of one measurement.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    Crr,
    Rr,
}

impl Mode {
    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
        }
    }
}

/// A `crr client` through `cand`, taking its turn of `turns` when given.
fn client_command(
    lab: &Lab,
    crr: &Path,
    cand: &dyn Candidate,
    mode: Mode,
    cfg: &Config,
    turns: Option<Turns>,
) -> Result<Command> {
    let target = cand.target(CRR_SERVICE_PORT, CRR_TARGET_PORT);
    let mut command = lab.command_in(&cand.stand().client, crr)?;
    command.args([
        "client",
        "--target",
        &target.to_string(),
        "--threads",
        &cfg.threads.to_string(),
        "--duration",
        &cfg.duration.as_secs_f64().to_string(),
        "--mode",
        mode.name(),
        "--pin",
        "--json",
    ]);
    if let Some(turns) = turns {
        command.args([
            "--turn",
            &turns.turn.to_string(),
            "--of",
            &turns.of.to_string(),
            "--slice-ms",
            &turns.slice.as_millis().to_string(),
            "--epoch-ns",
            &turns.epoch_ns.to_string(),
        ]);
    }
    Ok(command)
}

/// One `crr client` run through `cand` on its own.
pub(super) fn run_client(
    lab: &Lab,
    crr: &Path,
    cand: &dyn Candidate,
    mode: Mode,
    cfg: &Config,
) -> Result<ClientSample> {
    let output = client_command(lab, crr, cand, mode, cfg, None)?
        .output()
        .context("running crr client")?;
    client_sample(cand, mode, &output)
}

/// How long before the first slice the clients of a pair are started: they
/// are up within milliseconds; a client that still misses its first slice
/// reports it, and the pair is measured again with [`LATE_START_MARGIN`].
const START_MARGIN: Duration = Duration::from_millis(150);
/// The margin of the second attempt.
const LATE_START_MARGIN: Duration = Duration::from_secs(2);

/// The candidates of one pair measured together, taking turns in slices of
/// `cfg.slice` (`cands[k]` has turn k), so that each sees the same machine
/// conditions as the other down to a slice. Samples in `cands` order.
pub(super) fn run_taking_turns(
    lab: &Lab,
    crr: &Path,
    cands: &[&dyn Candidate],
    mode: Mode,
    cfg: &Config,
) -> Result<Vec<ClientSample>> {
    let mut late = None;
    for margin in [START_MARGIN, LATE_START_MARGIN] {
        for cand in cands {
            cand.before_measurement()?;
        }
        let epoch_ns = crr::monotonic_ns() + margin.as_nanos() as u64;
        let children = cands
            .iter()
            .enumerate()
            .map(|(turn, cand)| {
                let turns = Turns {
                    epoch_ns,
                    slice: cfg.slice,
                    turn: turn as u32,
                    of: cands.len() as u32,
                };
                client_command(lab, crr, *cand, mode, cfg, Some(turns))?
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting crr client")
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = children
            .into_iter()
            .map(|child| child.wait_with_output().context("running crr client"))
            .collect::<Result<Vec<_>>>()?;
        if let Some(output) = outputs
            .iter()
            .find(|o| String::from_utf8_lossy(&o.stderr).contains(crr::LATE_START))
        {
            late = Some(String::from_utf8_lossy(&output.stderr).trim().to_string());
            continue;
        }
        return cands
            .iter()
            .zip(&outputs)
            .map(|(cand, output)| client_sample(*cand, mode, output))
            .collect();
    }
    bail!(
        "crr clients missed their first slice twice: {}",
        late.unwrap_or_default()
    )
}

/// The sample a `crr client --json` run printed.
fn client_sample(cand: &dyn Candidate, mode: Mode, output: &Output) -> Result<ClientSample> {
    let target = cand.target(CRR_SERVICE_PORT, CRR_TARGET_PORT);
    let mode_s = mode.name();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let sample: ClientSample = serde_json::from_str(line).with_context(|| {
        format!(
            "{} {mode_s} to {target}: no report ({}): {}{}",
            cand.kind().name(),
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    ensure!(
        sample.transactions > 0,
        "{} {mode_s} to {target}: no transaction completed ({} errors)",
        cand.kind().name(),
        sample.errors
    );
    Ok(sample)
}

/// One iperf3 run through the candidate; Gbit/s received.
pub(super) fn run_iperf(lab: &Lab, cand: &dyn Candidate, secs: Duration) -> Result<f64> {
    let target = cand.target(IPERF_PORT, IPERF_PORT);
    let secs = secs.as_secs().max(1).to_string();
    let mut last_err = None;
    // The server takes one test at a time and may still be closing the last.
    for _ in 0..3 {
        let output = lab
            .command_in(&cand.stand().client, "iperf3")?
            .args([
                "-c",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
                "-t",
                &secs,
                "-J",
            ])
            .output()
            .context("running iperf3")?;
        let parsed: Result<f64> = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .context("iperf3 JSON")
            .and_then(|v| {
                v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .with_context(|| format!("iperf3 gave no result: {}", v["error"]))
            });
        match parsed {
            Ok(bps) if output.status.success() => return Ok(bps / 1e9),
            Ok(_) => last_err = Some(anyhow::anyhow!("iperf3 failed: {}", output.status)),
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last_err.expect("at least one attempt"))
}

/// Everything measured for one (service count, candidate).
#[derive(Clone, Debug, Default, Serialize)]
pub(super) struct Cell {
    /// CRR samples, one per round (direct: one per pair it was measured in).
    pub(super) crr: Vec<ClientSample>,
    /// RR samples, likewise.
    pub(super) rr: Vec<ClientSample>,
    /// Direct's CRR sample taken together with each of `crr`, the two
    /// taking turns (empty for direct itself, or when direct is not
    /// measured).
    pub(super) crr_direct: Vec<ClientSample>,
    /// Direct's RR sample taken together with each of `rr`.
    pub(super) rr_direct: Vec<ClientSample>,
    /// Time to program the services, seconds.
    pub(super) program_s: Option<f64>,
    /// iperf3 throughput, Gbit/s.
    pub(super) bulk_gbps: Option<f64>,
}

impl Cell {
    pub(super) fn samples_mut(&mut self, mode: Mode) -> &mut Vec<ClientSample> {
        match mode {
            Mode::Crr => &mut self.crr,
            Mode::Rr => &mut self.rr,
        }
    }

    pub(super) fn baselines_mut(&mut self, mode: Mode) -> &mut Vec<ClientSample> {
        match mode {
            Mode::Crr => &mut self.crr_direct,
            Mode::Rr => &mut self.rr_direct,
        }
    }
}

/// Two measurements taken back to back: a candidate and the direct path,
/// so that the ratio of the two sees the same machine conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pair {
    /// The candidate's index.
    pub(super) candidate: usize,
    /// Direct's index, when direct is measured and is not the candidate.
    pub(super) baseline: Option<usize>,
    /// Whether direct goes first.
    pub(super) baseline_first: bool,
}

impl Pair {
    /// Candidate indices in measurement order.
    pub(super) fn order(&self) -> Vec<usize> {
        match (self.baseline, self.baseline_first) {
            (Some(b), true) => vec![b, self.candidate],
            (Some(b), false) => vec![self.candidate, b],
            (None, _) => vec![self.candidate],
        }
    }
}

/// The measurements of one round: every candidate but direct paired with
/// direct, in an order rotating with the round, direct first in every other
/// round so that a drift over the pair does not favour either side. Without
/// direct, every candidate alone.
pub(super) fn measurement_pairs(
    candidates: usize,
    direct: Option<usize>,
    round: usize,
) -> Vec<Pair> {
    let others: Vec<usize> = (0..candidates).filter(|&i| Some(i) != direct).collect();
    if others.is_empty() {
        return direct
            .map(|d| Pair {
                candidate: d,
                baseline: None,
                baseline_first: false,
            })
            .into_iter()
            .collect();
    }
    (0..others.len())
        .map(|k| {
            let candidate = others[(k + round) % others.len()];
            Pair {
                candidate,
                baseline: direct,
                baseline_first: (round + candidate).is_multiple_of(2),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_is_paired_with_direct_in_alternating_order() {
        // Direct is candidate 0 of 4.
        for round in 0..4 {
            let pairs = measurement_pairs(4, Some(0), round);
            let mut seen: Vec<usize> = pairs.iter().map(|p| p.candidate).collect();
            seen.sort();
            assert_eq!(seen, [1, 2, 3]);
            assert!(pairs.iter().all(|p| p.baseline == Some(0)));
            assert_eq!(pairs[0].candidate, 1 + round % 3, "rotating order");
        }
        // Over two rounds each candidate has direct once before, once after.
        for candidate in 1..4 {
            let first: Vec<bool> = (0..2)
                .map(|round| {
                    measurement_pairs(4, Some(0), round)
                        .into_iter()
                        .find(|p| p.candidate == candidate)
                        .unwrap()
                        .baseline_first
                })
                .collect();
            assert_ne!(first[0], first[1], "candidate {candidate}");
        }
        let order = measurement_pairs(2, Some(1), 0)[0].order();
        assert_eq!(order, [1, 0]);
        // Without direct, or with direct alone: single measurements.
        assert!(measurement_pairs(2, None, 0)
            .iter()
            .all(|p| p.order().len() == 1));
        assert_eq!(measurement_pairs(1, Some(0), 0)[0].order(), [0]);
    }
}
