//! What the control-plane benchmarks (`control-plane`, `policy-control-plane`)
//! and `agent-memory` share: latency percentiles, resident memory and the
//! report.

use std::{path::Path, time::Duration};

/// The `p` quantile (0 to 1) of `sorted`, which must not be empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// This process's resident memory in MiB (0 when `/proc` cannot tell).
pub fn rss_mib() -> f64 {
    memory_mib("self", "VmRSS")
}

/// A memory figure of process `pid` (a number or `self`) in MiB, from
/// `/proc/PID/status`: `VmRSS` (resident now) or `VmHWM` (resident at
/// most); 0 when `/proc` cannot tell.
pub fn memory_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Prints a Markdown report and writes it to `out`, if given.
pub fn publish(report: &str, out: Option<&Path>) -> std::io::Result<()> {
    print!("{report}");
    match out {
        Some(out) => std::fs::write(out, report),
        None => Ok(()),
    }
}
