//! Log lines with `tracing`: structured fields (service, frontend, backend,
//! reason, counts) as human-readable text or one JSON object per line, at
//! the level a flag or `RUST_LOG` names.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::{fmt, EnvFilter};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    /// `2026-12-06T18:04:08Z INFO message key=value`.
    #[default]
    Text,
    /// `{"timestamp":...,"level":"INFO","fields":{"message":...,"key":...}}`.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level is not a valid filter.
    #[error("log level {level:?}: {source}")]
    BadFilter {
        /// The filter given.
        level: String,
        /// What is wrong with it.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Install(String),
}

/// The filter: `level` when given, else `RUST_LOG`, else `info`.
fn filter(level: Option<&str>) -> Result<EnvFilter, LoggingError> {
    match level {
        Some(level) => EnvFilter::try_new(level).map_err(|source| LoggingError::BadFilter {
            level: level.to_string(),
            source,
        }),
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// Installs the process's log subscriber, writing to stderr.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), LoggingError> {
    let filter = filter(level)?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| LoggingError::Install(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_level_is_an_error_naming_it() {
        let err = filter(Some("lb_agent=loud")).unwrap_err();
        assert!(err.to_string().contains("lb_agent=loud"), "{err}");
        assert!(filter(Some("debug,kube=warn")).is_ok());
    }
}
