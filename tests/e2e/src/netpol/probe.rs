//! What `labpod probe` reports, one JSON line per target.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The result of probing one target once.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The target's label, as given on the command line.
    pub label: String,
    /// Whether the target answered (TCP: connected and sent its greeting;
    /// UDP: answered the datagram).
    pub ok: bool,
    /// Name of the pod that answered.
    pub backend: Option<String>,
    /// The answering socket's own address (TCP: the pod's address and port).
    pub served_on: Option<String>,
    /// The failure, if any.
    pub error: Option<String>,
    /// How long the probe took, in milliseconds.
    pub ms: u64,
}

/// Parses the output of `labpod probe`.
pub fn parse_outcomes(stdout: &[u8]) -> Result<Vec<Outcome>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("labpod probe printed {line:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip() {
        let outcome = Outcome {
            label: "3/svc".into(),
            ok: true,
            backend: Some("a".into()),
            served_on: Some("10.244.1.2:80".into()),
            error: None,
            ms: 2,
        };
        let line = serde_json::to_string(&outcome).unwrap();
        assert_eq!(
            parse_outcomes(format!("{line}\n\n").as_bytes()).unwrap(),
            vec![outcome]
        );
    }
}
