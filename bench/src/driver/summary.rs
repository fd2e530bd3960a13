//! The summary of the measurements: per service count and candidate, medians
//! over rounds and paired ratios to direct with their confidence intervals.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    config::CandidateKind,
    measure::{Cell, ClientSample},
};

/// One row of the table: medians over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Number of services.
    pub services: usize,
    /// Candidate.
    pub candidate: CandidateKind,
    /// Median CRR connections/s.
    pub crr_cps: f64,
    /// Median over rounds of CRR connections/s divided by direct's,
    /// measured together, taking turns.
    pub crr_ratio: Option<Ratio>,
    /// Median CRR p50 latency, µs.
    pub p50_us: f64,
    /// Median CRR p99 latency, µs.
    pub p99_us: f64,
    /// Median over rounds of p99 divided by direct's p99 in the same pair.
    pub p99_ratio: Option<Ratio>,
    /// Median RR transactions/s.
    pub rr_tps: f64,
    /// Median over rounds of RR transactions/s divided by direct's in the
    /// same pair.
    pub rr_ratio: Option<Ratio>,
    /// iperf3 Gbit/s (largest count only).
    pub bulk_gbps: Option<f64>,
    /// Time to program the services, seconds.
    pub program_s: Option<f64>,
    /// Failed CRR and RR transactions over all rounds.
    pub errors: u64,
}

/// A candidate's value over direct's: the median of the per-round ratios
/// and how far that median can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratio {
    /// Median of the per-round ratios.
    pub median: f64,
    /// A confidence interval of at least 95 % for that median
    /// ([`median_interval`]); `None` with fewer than 6 rounds, or for direct
    /// itself.
    pub interval: Option<(f64, f64)>,
}

/// A distribution-free confidence interval of at least 95 % for the median
/// of `sorted` samples (independent rounds): the k-th smallest and k-th
/// largest sample, with the largest k for which fewer than k of n samples fall
/// on one side of the true median with probability at most 2.5 % (that count
/// is Binomial(n, 1/2)). `None` for fewer than 6 samples, where even the
/// extremes cover less than 95 %.
pub fn median_interval(sorted: &[f64]) -> Option<(f64, f64)> {
    let n = sorted.len();
    let mut tail = 0.0;
    // ln P(Binomial(n, 1/2) = i), in logs so that large n does not underflow.
    let mut ln_term = -(n as f64) * std::f64::consts::LN_2;
    let mut k = 0;
    for i in 0..n / 2 {
        let term = ln_term.exp();
        if tail + term > 0.025 {
            break;
        }
        tail += term;
        k = i + 1;
        ln_term += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    (k > 0).then(|| (sorted[k - 1], sorted[n - k]))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The median of `field` of `samples` over `field` of the direct samples
/// paired with them, with its interval; exactly 1 for direct itself; `None`
/// without pairs.
fn paired_ratio(
    kind: CandidateKind,
    samples: &[ClientSample],
    direct: &[ClientSample],
    field: fn(&ClientSample) -> f64,
) -> Option<Ratio> {
    if kind == CandidateKind::Direct {
        return (!samples.is_empty()).then_some(Ratio {
            median: 1.0,
            interval: None,
        });
    }
    let mut ratios: Vec<f64> = samples
        .iter()
        .zip(direct)
        .filter(|(_, d)| field(d) > 0.0)
        .map(|(s, d)| field(s) / field(d))
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(Ratio {
        interval: median_interval(&ratios),
        median: median(ratios),
    })
}

/// The cost of policy enforcement at one service count: the per-round
/// ratio of `socket-lb+policy`'s value to `socket-lb`'s, each over the
/// direct value measured together with it in that round.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyCost {
    /// Number of services.
    pub services: usize,
    /// CRR connections/s, with policy over without.
    pub crr: Option<Ratio>,
    /// CRR p99 latency, with policy over without.
    pub p99: Option<Ratio>,
    /// RR transactions/s, with policy over without.
    pub rr: Option<Ratio>,
}

/// The median and interval of the per-round ratios of `with`'s ratio to
/// direct over `without`'s.
fn ratio_of_ratios(
    with: (&[ClientSample], &[ClientSample]),
    without: (&[ClientSample], &[ClientSample]),
    field: fn(&ClientSample) -> f64,
) -> Option<Ratio> {
    let per_round = |(samples, direct): (&[ClientSample], &[ClientSample])| {
        samples
            .iter()
            .zip(direct)
            .map(|(s, d)| (field(d) > 0.0).then(|| field(s) / field(d)))
            .collect::<Vec<_>>()
    };
    let mut ratios: Vec<f64> = per_round(with)
        .into_iter()
        .zip(per_round(without))
        .filter_map(|(w, o)| Some(w? / o.filter(|o| *o > 0.0)?))
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(Ratio {
        interval: median_interval(&ratios),
        median: median(ratios),
    })
}

/// What policy enforcement costs, per service count, when both
/// `socket-lb+policy` and `socket-lb` were measured (with direct).
pub(super) fn policy_cost(
    counts: &[usize],
    kinds: &[CandidateKind],
    cells: &BTreeMap<(usize, usize), Cell>,
) -> Vec<PolicyCost> {
    let position = |kind| kinds.iter().position(|k| *k == kind);
    let (Some(with), Some(without), true) = (
        position(CandidateKind::SocketLbPolicy),
        position(CandidateKind::SocketLb),
        kinds.contains(&CandidateKind::Direct),
    ) else {
        return Vec::new();
    };
    counts
        .iter()
        .filter_map(|&count| {
            let (w, o) = (cells.get(&(count, with))?, cells.get(&(count, without))?);
            Some(PolicyCost {
                services: count,
                crr: ratio_of_ratios((&w.crr, &w.crr_direct), (&o.crr, &o.crr_direct), |s| s.tps),
                p99: ratio_of_ratios((&w.crr, &w.crr_direct), (&o.crr, &o.crr_direct), |s| {
                    s.p99_us
                }),
                rr: ratio_of_ratios((&w.rr, &w.rr_direct), (&o.rr, &o.rr_direct), |s| s.tps),
            })
        })
        .collect()
}

/// Medians and paired ratios to direct.
pub(super) fn summarize(
    counts: &[usize],
    kinds: &[CandidateKind],
    cells: &BTreeMap<(usize, usize), Cell>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &count in counts {
        for (i, &kind) in kinds.iter().enumerate() {
            let Some(cell) = cells.get(&(count, i)) else {
                continue;
            };
            let has_direct = kinds.contains(&CandidateKind::Direct);
            let ratio = |samples: &[ClientSample],
                         direct: &[ClientSample],
                         field: fn(&ClientSample) -> f64| {
                paired_ratio(kind, samples, direct, field).filter(|_| has_direct)
            };
            rows.push(Row {
                services: count,
                candidate: kind,
                crr_cps: median(cell.crr.iter().map(|s| s.tps).collect()),
                crr_ratio: ratio(&cell.crr, &cell.crr_direct, |s| s.tps),
                p50_us: median(cell.crr.iter().map(|s| s.p50_us).collect()),
                p99_us: median(cell.crr.iter().map(|s| s.p99_us).collect()),
                p99_ratio: ratio(&cell.crr, &cell.crr_direct, |s| s.p99_us),
                rr_tps: median(cell.rr.iter().map(|s| s.tps).collect()),
                rr_ratio: ratio(&cell.rr, &cell.rr_direct, |s| s.tps),
                bulk_gbps: cell.bulk_gbps,
                program_s: cell.program_s,
                errors: cell.crr.iter().chain(&cell.rr).map(|s| s.errors).sum(),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_use_the_paired_direct_samples() {
        let sample = |tps: f64| ClientSample {
            tps,
            p50_us: 1.0,
            p99_us: 2.0,
            transactions: 1,
            errors: 0,
        };
        let samples = [sample(90.0), sample(50.0), sample(99.0)];
        let direct = [sample(100.0), sample(50.0), sample(100.0)];
        let r = paired_ratio(CandidateKind::Tc, &samples, &direct, |s| s.tps);
        assert_eq!(
            r,
            Some(Ratio {
                median: 0.99,
                interval: None
            })
        );
        assert_eq!(
            paired_ratio(CandidateKind::Direct, &direct, &[], |s| s.tps),
            Some(Ratio {
                median: 1.0,
                interval: None
            })
        );
        assert_eq!(
            paired_ratio(CandidateKind::Tc, &samples, &[], |s| s.tps),
            None
        );
    }

    #[test]
    fn the_policy_cost_divides_the_paired_ratios_of_each_round() {
        let sample = |tps: f64| ClientSample {
            tps,
            p50_us: 1.0,
            p99_us: 2.0,
            transactions: 1,
            errors: 0,
        };
        let with = [sample(90.0), sample(45.0)];
        let with_direct = [sample(100.0), sample(50.0)];
        let without = [sample(95.0), sample(60.0)];
        let without_direct = [sample(100.0), sample(60.0)];
        let r = ratio_of_ratios((&with, &with_direct), (&without, &without_direct), |s| {
            s.tps
        })
        .unwrap();
        // Rounds: 0.9 / 0.95 and 0.9 / 1.0.
        assert!((r.median - (0.9 / 0.95 + 0.9) / 2.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn median_intervals_are_order_statistics_covering_95_percent() {
        let sorted = |n: usize| (1..=n).map(|i| i as f64).collect::<Vec<_>>();
        // Fewer than 6 rounds: even the extremes cover less than 95 %.
        assert_eq!(median_interval(&sorted(5)), None);
        assert_eq!(median_interval(&[]), None);
        // 6 rounds: the extremes (1 - 2/64 = 96.9 %).
        assert_eq!(median_interval(&sorted(6)), Some((1.0, 6.0)));
        // 9 rounds: 2nd and 8th (1 - 2 * 10/512 = 96.1 %).
        assert_eq!(median_interval(&sorted(9)), Some((2.0, 8.0)));
        // 15 rounds: 4th and 12th (1 - 2 * 576/32768 = 96.5 %).
        assert_eq!(median_interval(&sorted(15)), Some((4.0, 12.0)));
        // 24 rounds (the full benchmark): 7th and 18th (1 - 2 * 190051/2^24 = 97.7 %).
        assert_eq!(median_interval(&sorted(24)), Some((7.0, 18.0)));
        // 100 rounds: 40th and 61st, the textbook values.
        assert_eq!(median_interval(&sorted(100)), Some((40.0, 61.0)));
        // Far beyond 0.5^n's range, about n/2 -/+ 1.96 sqrt(n)/2.
        let (low, high) = median_interval(&sorted(10_000)).unwrap();
        assert!((4900.0..=4903.0).contains(&low), "{low}");
        assert!((9999.0 - high - low).abs() <= 2.0, "{low} {high}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
