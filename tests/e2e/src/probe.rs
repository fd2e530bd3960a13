//! What the in-pod client reports per attempt, and helpers to read it.

use std::{collections::BTreeMap, process::Command};

use anyhow::{bail, Result};

use serde::{Deserialize, Serialize};

/// One client attempt (a TCP connection or a UDP request/response).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    /// Whether a backend answered.
    pub ok: bool,
    /// Name of the backend that answered.
    pub backend: Option<String>,
    /// The source address the backend saw.
    pub seen_source: Option<String>,
    /// The backend's own address:port that answered.
    pub served_on: Option<String>,
    /// What getpeername() returned on the client socket.
    pub peer: Option<String>,
    /// The client socket's own address.
    pub local: Option<String>,
    /// The failure, if any.
    pub error: Option<String>,
    /// errno of the failure, when there is one.
    pub errno: Option<i32>,
    /// Milliseconds since the client started (wall clock), when the attempt began.
    pub at_ms: u64,
}

/// Parses the JSON lines printed by `labpod connect`.
pub fn parse_attempts(stdout: &[u8]) -> anyhow::Result<Vec<Attempt>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}

/// Successful attempts per backend name.
pub fn per_backend(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for attempt in attempts {
        if let Some(backend) = &attempt.backend {
            *counts.entry(backend.clone()).or_default() += 1;
        }
    }
    counts
}

/// `curl` from inside a network namespace: (status, body).
pub fn http_get(netns: &str, url: &str) -> Result<(u16, String)> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-s",
            "-m",
            "3",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()?;
    let text = String::from_utf8(output.stdout)?;
    let Some((body, status)) = text.rsplit_once('\n') else {
        bail!("no answer from {url}: {text:?}");
    };
    Ok((status.parse()?, body.to_string()))
}

/// The value of `series` (a metric name with its labels, as exposed) in a
/// Prometheus text exposition.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Reads a counter the agent copies from the kernel on its loop until two
/// reads 700 ms apart agree, and returns it.
pub fn settled(mut read: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut last = read()?;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(700));
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}
