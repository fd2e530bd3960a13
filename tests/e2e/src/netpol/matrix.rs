//! Expected and observed reachability matrices, compared and printed.
//!
//! Pods are indexed in the catalogue's order (`x/a`..`z/c`); a pair is
//! `(from, to)`. Self pairs are never compared: upstream ignores them (a pod
//! reaching itself through its own Service is hairpin traffic, allowed or
//! not depending on the plugin).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
};

use anyhow::{bail, Result};

use super::cases::PodId;

/// Where a probe went, or how a pair was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The destination pod's own address.
    PodIp,
    /// The ClusterIP of the destination's Service `s-<ns>-<pod>` (what upstream probes).
    ClusterIp,
    /// No traffic: `lbctl policy trace` on the nodes of both pods.
    Trace,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PodIp => "pod IP",
            Self::ClusterIp => "ClusterIP of s-<ns>-<pod>",
            Self::Trace => "lbctl policy trace on the nodes of both pods",
        })
    }
}

/// What one check of a pair gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The destination answered (or the trace said allowed on every node).
    Allowed,
    /// Any failure: refused, timed out, no answer (or a trace said denied).
    Denied,
    /// A pod answered, but not the destination: a routing bug, never right.
    Misrouted,
}

/// One observed cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// The verdict.
    pub verdict: Verdict,
    /// Where the probe went and what happened, for error messages.
    pub detail: String,
}

/// The expected matrix: every non-self pair allowed but `denied`.
#[derive(Clone, Debug)]
pub struct Expected {
    pods: Vec<PodId>,
    denied: BTreeSet<(usize, usize)>,
}

impl Expected {
    /// Everything allowed but the `denied` pairs.
    pub fn new(pods: &[PodId], denied: &[(PodId, PodId)]) -> Result<Self> {
        let index = |pod: &PodId| -> Result<usize> {
            match pods.iter().position(|p| p == pod) {
                Some(i) => Ok(i),
                None => bail!("pod {pod} is not in the model"),
            }
        };
        let mut set = BTreeSet::new();
        for (from, to) in denied {
            set.insert((index(from)?, index(to)?));
        }
        Ok(Self {
            pods: pods.to_vec(),
            denied: set,
        })
    }

    /// Everything allowed.
    pub fn all_allowed(pods: &[PodId]) -> Self {
        Self {
            pods: pods.to_vec(),
            denied: BTreeSet::new(),
        }
    }

    /// Whether pair `(from, to)` should be allowed.
    pub fn allowed(&self, from: usize, to: usize) -> bool {
        !self.denied.contains(&(from, to))
    }

    /// The pods, in matrix order.
    pub fn pods(&self) -> &[PodId] {
        &self.pods
    }

    /// How many non-self pairs are expected denied.
    pub fn denied_count(&self) -> usize {
        self.denied.len()
    }
}

/// Observed cells by (target, from, to).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    cells: BTreeMap<(Target, usize, usize), Cell>,
}

impl Observed {
    /// Records one cell.
    pub fn insert(&mut self, target: Target, from: usize, to: usize, cell: Cell) {
        self.cells.insert((target, from, to), cell);
    }

    /// One cell, if it was checked.
    pub fn get(&self, target: Target, from: usize, to: usize) -> Option<&Cell> {
        self.cells.get(&(target, from, to))
    }
}

/// A pair whose observation differs from the expectation.
#[derive(Clone, Debug)]
pub struct Mismatch {
    /// How it was checked.
    pub target: Target,
    /// Source pod index.
    pub from: usize,
    /// Destination pod index.
    pub to: usize,
    /// Whether it should have been allowed.
    pub expected_allowed: bool,
    /// What was seen (`None`: not checked at all).
    pub cell: Option<Cell>,
}

/// The non-self pairs of `targets` where `observed` differs from `expected`.
pub fn mismatches(expected: &Expected, observed: &Observed, targets: &[Target]) -> Vec<Mismatch> {
    let n = expected.pods.len();
    let mut out = Vec::new();
    for &target in targets {
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                let want = expected.allowed(from, to);
                let cell = observed.get(target, from, to);
                let right = match cell.map(|c| c.verdict) {
                    Some(Verdict::Allowed) => want,
                    Some(Verdict::Denied) => !want,
                    Some(Verdict::Misrouted) | None => false,
                };
                if !right {
                    out.push(Mismatch {
                        target,
                        from,
                        to,
                        expected_allowed: want,
                        cell: cell.cloned(),
                    });
                }
            }
        }
    }
    out
}

/// At most this many differing checks are listed one by one.
const MAX_LISTED: usize = 40;

/// Expected and observed grids side by side for each of `targets`, then
/// every differing pair with what happened. `.` allowed, `X` denied, `W`
/// answered by the wrong pod, `?` not checked, `~` self (ignored); `!`
/// marks an observed cell that differs from the expected one.
pub fn render(title: &str, expected: &Expected, observed: &Observed, targets: &[Target]) -> String {
    let pods = &expected.pods;
    let n = pods.len();
    let wrong = mismatches(expected, observed, targets);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{title}: {} differing checks ({} of {} non-self pairs expected denied)",
        wrong.len(),
        expected.denied.len(),
        n * (n - 1)
    );
    let _ = writeln!(
        text,
        "legend: . allowed, X denied, W answered by the wrong pod, ? not checked, ~ self (ignored), ! differs from expected"
    );
    let header: String = pods
        .iter()
        .map(|p| format!("{:<4}", p.to_string()))
        .collect();
    for &target in targets {
        let _ = writeln!(text, "to the {target}:");
        let _ = writeln!(text, "  {:<9}{:<w$}   observed", "", "expected", w = 4 * n);
        let _ = writeln!(text, "  {:<9}{header}   {header}", "from\\to");
        for (from, pod) in pods.iter().enumerate() {
            let mut want = String::new();
            let mut seen = String::new();
            for to in 0..n {
                if from == to {
                    want.push_str("~   ");
                    seen.push_str("~   ");
                    continue;
                }
                let allowed = expected.allowed(from, to);
                want.push_str(if allowed { ".   " } else { "X   " });
                let (mark, right) = match observed.get(target, from, to).map(|c| c.verdict) {
                    Some(Verdict::Allowed) => ('.', allowed),
                    Some(Verdict::Denied) => ('X', !allowed),
                    Some(Verdict::Misrouted) => ('W', false),
                    None => ('?', false),
                };
                let _ = write!(seen, "{mark}{:<3}", if right { "" } else { "!" });
            }
            let _ = writeln!(text, "  {:<9}{want}   {seen}", pod.to_string());
        }
    }
    if !wrong.is_empty() {
        let _ = writeln!(text, "differences:");
        for m in wrong.iter().take(MAX_LISTED) {
            let _ = writeln!(
                text,
                "  {} -> {} ({}): expected {}, observed {}",
                pods[m.from],
                pods[m.to],
                m.target,
                if m.expected_allowed {
                    "allowed"
                } else {
                    "denied"
                },
                match &m.cell {
                    None => "nothing (not checked)".to_string(),
                    Some(cell) => format!(
                        "{}: {}",
                        match cell.verdict {
                            Verdict::Allowed => "allowed",
                            Verdict::Denied => "denied",
                            Verdict::Misrouted => "the wrong pod",
                        },
                        cell.detail
                    ),
                }
            );
        }
        if wrong.len() > MAX_LISTED {
            let _ = writeln!(
                text,
                "  ... and {} more (see the grids)",
                wrong.len() - MAX_LISTED
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<PodId> {
        ["x/a", "x/b", "y/a"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    fn cell(verdict: Verdict) -> Cell {
        Cell {
            verdict,
            detail: "d".into(),
        }
    }

    #[test]
    fn only_non_self_differences_count() {
        let pods = pods();
        let expected = Expected::new(&pods, &[(pods[2].clone(), pods[0].clone())]).unwrap();
        let mut observed = Observed::default();
        for from in 0..3 {
            for to in 0..3 {
                let verdict = if (from, to) == (2, 0) || from == to {
                    Verdict::Denied
                } else {
                    Verdict::Allowed
                };
                observed.insert(Target::ClusterIp, from, to, cell(verdict));
            }
        }
        assert!(mismatches(&expected, &observed, &[Target::ClusterIp]).is_empty());
        // The pod-IP matrix was never probed: every pair differs.
        assert_eq!(mismatches(&expected, &observed, &[Target::PodIp]).len(), 6);
        observed.insert(Target::ClusterIp, 0, 1, cell(Verdict::Misrouted));
        observed.insert(Target::ClusterIp, 2, 0, cell(Verdict::Allowed));
        let wrong = mismatches(&expected, &observed, &[Target::ClusterIp]);
        assert_eq!(
            wrong.iter().map(|m| (m.from, m.to)).collect::<Vec<_>>(),
            vec![(0, 1), (2, 0)]
        );
        let text = render("80/TCP", &expected, &observed, &[Target::ClusterIp]);
        assert!(text.contains("2 differing checks"), "{text}");
        assert!(
            text.contains(
                "y/a -> x/a (ClusterIP of s-<ns>-<pod>): expected denied, observed allowed: d"
            ),
            "{text}"
        );
        assert!(text.contains("W!"), "{text}");
        assert!(
            text.contains("  y/a      X   .   ~      .!  .   ~"),
            "{text}"
        );
        assert!(
            text.contains("  from\\to  x/a x/b y/a    x/a x/b y/a"),
            "{text}"
        );
    }

    #[test]
    fn unknown_pods_are_refused() {
        let pods = pods();
        let stray: PodId = "z/c".parse().unwrap();
        assert!(Expected::new(&pods, &[(pods[0].clone(), stray)]).is_err());
    }
}
