//! Rendering: the markdown table, the report around it with the machine's
//! facts, and the SVG plot.

use std::{fmt::Write as _, fs, process::Command, time::Duration};

use serde::Serialize;

use crate::policy_objects::Synthetic;

use super::{
    config::{CandidateKind, Config},
    summary::{PolicyCost, Ratio, Row},
};

/// `12345.6` -> `12,346`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio_cell(r: Option<Ratio>) -> String {
    match r {
        None => "–".into(),
        Some(Ratio {
            median,
            interval: None,
        }) => format!("{median:.2}x"),
        Some(Ratio {
            median,
            interval: Some((low, high)),
        }) => format!("{median:.2}x ({low:.2}–{high:.2})"),
    }
}

fn seconds_cell(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

/// The markdown table of `rows`.
pub(super) fn render_table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| services | candidate | CRR conn/s | CRR vs direct | p50 µs | p99 µs | p99 vs direct \
         | RR trans/s | RR vs direct | bulk Gbit/s | time to program |\n",
    );
    t.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let errors = if r.errors > 0 {
            format!(" ({} errors)", r.errors)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {}{} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            thousands(r.services as f64),
            r.candidate.name(),
            errors,
            thousands(r.crr_cps),
            ratio_cell(r.crr_ratio),
            r.p50_us,
            r.p99_us,
            ratio_cell(r.p99_ratio),
            thousands(r.rr_tps),
            ratio_cell(r.rr_ratio),
            r.bulk_gbps
                .map_or_else(|| "–".into(), |g| format!("{g:.2}")),
            seconds_cell(r.program_s),
        );
    }
    t
}

/// The table of what policy enforcement costs (empty without both
/// socket-lb candidates).
pub(super) fn render_policy_cost(costs: &[PolicyCost], scale: &Synthetic) -> String {
    if costs.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "\n### Cost of NetworkPolicy enforcement\n\n`socket-lb+policy` over `socket-lb`: in \
         each round, the ratio of the two candidates' ratios to the direct value measured with \
         each; median over rounds, in parentheses a confidence interval of at least 95 %. \
         Target: CRR and RR at least 0.97x, p99 within 5 %. Loaded besides the measured \
         flow's rule: {} policies, {} pods on other nodes ({} identities).\n\n",
        thousands(scale.policies as f64),
        thousands(scale.pods as f64),
        thousands(scale.pods as f64),
    );
    t.push_str("| services | CRR | p99 | RR |\n|---:|---:|---:|---:|\n");
    for c in costs {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |",
            thousands(c.services as f64),
            ratio_cell(c.crr),
            ratio_cell(c.p99),
            ratio_cell(c.rr)
        );
    }
    t
}

/// Facts about the machine a run came from.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Machine {
    /// Online CPUs.
    nproc: usize,
    /// Kernel release.
    kernel: String,
    /// CPU model from /proc/cpuinfo.
    cpu: String,
    /// UTC date and time of the run.
    date: String,
    /// `iptables --version`.
    iptables: String,
    /// `nft --version`.
    nft: String,
}

impl Machine {
    /// Reads the facts from /proc and the tools.
    pub(super) fn probe() -> Self {
        let tool = |program: &str, args: &[&str]| -> String {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
            cpu,
            date: tool("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            iptables: tool("iptables", &["--version"]),
            nft: tool("nft", &["--version"]),
        }
    }
}

pub(super) fn render_report(
    cfg: &Config,
    machine: &Machine,
    table: &str,
    rows: &[Row],
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    md.push_str("# Datapath benchmark: latest run\n\n");
    if cfg.quick {
        md.push_str(
            "**Quick mode** (a smoke test of the benchmark code; the numbers mean little).\n\n",
        );
    }
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}, {}, {}. Run on {} (took {:.0} s).\n",
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.iptables,
        machine.nft,
        machine.date,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Settings: service counts {}, {} interleaved round(s), {:.1} s per CRR and RR \
         measurement, {} client thread(s), 1-byte request and response, {} fake endpoints \
         per filler service{}.\n",
        cfg.counts
            .iter()
            .map(|&c| thousands(c as f64))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.rounds,
        cfg.duration.as_secs_f64(),
        cfg.threads,
        cfg.endpoints_per_service,
        match cfg.bulk {
            Some(d) => format!(
                ", iperf3 for {} s per candidate at the largest count",
                d.as_secs()
            ),
            None => ", no iperf3".into(),
        }
    );
    md.push_str(table);
    let _ = write!(
        md,
        "\nValues are medians over rounds; \"vs direct\" is the median over rounds of the \
         candidate's value divided by direct's value measured together with it, the two \
         clients taking turns in {slice} ms slices (client threads pinned one per CPU); in \
         parentheses, a confidence interval of at least 95 % \
         for that median (order statistics of the per-round ratios, from 6 rounds on). \
         p50/p99 are CRR transaction latencies (connect, request, response). Time to program: \
         socket-lb and tc from writing the manifest to the agent's `reconciled frontends=N` \
         log line (the agent's manifest poll/debounce period set to 10 ms); iptables and \
         nftables the wall time of `iptables-restore` and `nft -f` loading the rules into an \
         empty table.\n\n",
        slice = cfg.slice.as_millis()
    );
    md.push_str(
        "Candidates (each on a lab node of its own, client and server pods on that node):\n\n",
    );
    let mut seen = Vec::new();
    for r in rows {
        if !seen.contains(&r.candidate) {
            seen.push(r.candidate);
            let _ = writeln!(
                md,
                "- `{}`: {}",
                r.candidate.name(),
                r.candidate.description()
            );
        }
    }
    md.push_str("\n![connections per second by service count](crr.svg)\n\n");
    md.push_str(
        "Raw per-round samples: `latest.json`. Reproduce: see README.md in this directory.\n",
    );
    md
}

/// Colours of the plot's series, by candidate position.
const COLORS: [&str; 6] = [
    "#4d4d4d", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd",
];

/// A line plot (SVG) of median CRR connections/s against service count, one
/// line per candidate; counts are evenly spaced on the x axis.
pub(super) fn render_svg(counts: &[usize], kinds: &[CandidateKind], rows: &[Row]) -> String {
    let (w, h) = (720.0_f64, 440.0_f64);
    let (left, right, top, bottom) = (80.0, 170.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let mut counts: Vec<usize> = counts.to_vec();
    counts.sort_unstable();
    counts.dedup();
    let max = rows.iter().map(|r| r.crr_cps).fold(0.0, f64::max);
    let step = nice_step(max / 5.0);
    let ymax = ((max / step).ceil() * step).max(step);
    let x = |i: usize| {
        if counts.len() == 1 {
            left + pw / 2.0
        } else {
            left + pw * i as f64 / (counts.len() - 1) as f64
        }
    };
    let y = |v: f64| top + ph * (1.0 - v / ymax);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">TCP CRR connections/s by number of services (median)</text>"#,
        left + pw / 2.0
    );
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 8.0,
            yy + 4.0,
            thousands(v)
        );
        v += step;
    }
    for (i, &c) in counts.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(i),
            top + ph + 20.0,
            thousands(c as f64)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">services</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">connections/s</text>"#,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    for (k, &kind) in kinds.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<(f64, f64)> = counts
            .iter()
            .enumerate()
            .filter_map(|(i, &c)| {
                rows.iter()
                    .find(|r| r.candidate == kind && r.services == c)
                    .map(|r| (x(i), y(r.crr_cps)))
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let dash = if kind == CandidateKind::Direct {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for (px, py) in &points {
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = top + 10.0 + 22.0 * k as f64;
        let lx = left + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            kind.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A round step (1, 2 or 5 times a power of ten) at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::driver::{
        measure::{Cell, ClientSample},
        summary::summarize,
    };

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(1800.0), 2000.0);
        assert_eq!(nice_step(10_000.0), 10_000.0);
    }

    #[test]
    fn table_and_plot_render() {
        let sample = |tps: f64| ClientSample {
            tps,
            p50_us: 50.0,
            p99_us: 200.0,
            transactions: 10,
            errors: 0,
        };
        let mut cells = BTreeMap::new();
        for (i, tps) in [(0usize, 1000.0), (1, 900.0)] {
            for count in [1usize, 1000] {
                cells.insert(
                    (count, i),
                    Cell {
                        crr: vec![sample(tps), sample(tps * 1.1)],
                        rr: vec![sample(tps * 3.0)],
                        crr_direct: if i == 0 {
                            Vec::new()
                        } else {
                            vec![sample(1000.0), sample(1100.0)]
                        },
                        rr_direct: if i == 0 {
                            Vec::new()
                        } else {
                            vec![sample(3000.0)]
                        },
                        program_s: (i == 1).then_some(0.25),
                        bulk_gbps: None,
                    },
                );
            }
        }
        let kinds = [CandidateKind::Direct, CandidateKind::Iptables];
        let rows = summarize(&[1, 1000], &kinds, &cells);
        assert_eq!(rows.len(), 4);
        assert!((rows[1].crr_ratio.unwrap().median - 0.9).abs() < 1e-9);
        assert!((rows[1].crr_cps - 945.0).abs() < 1e-9);
        let table = render_table(&rows);
        assert!(
            table.contains("| 1,000 | iptables | 945 | 0.90x |"),
            "{table}"
        );
        assert!(table.contains("250 ms"));
        let svg = render_svg(&[1, 1000], &kinds, &rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
