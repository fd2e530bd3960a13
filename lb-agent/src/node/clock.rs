//! `CLOCK_BOOTTIME`, the clock of the tc path's timestamps
//! (`bpf_ktime_get_boot_ns`), read from `/proc/uptime`: 10 ms resolution,
//! plenty for timeouts counted in seconds.

use std::{fs, io};

/// Why the boot-time clock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// `/proc/uptime` could not be read.
    #[error("/proc/uptime: {0}")]
    Io(#[from] io::Error),
    /// `/proc/uptime` holds something else than expected.
    #[error("unexpected /proc/uptime contents {0:?}")]
    Unexpected(String),
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_ns() -> Result<u64, ClockError> {
    let text = fs::read_to_string("/proc/uptime")?;
    parse_uptime(&text).ok_or(ClockError::Unexpected(text))
}

/// Parses the first field of `/proc/uptime` ("12345.67") into nanoseconds.
fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (seconds, fraction) = first.split_once('.').unwrap_or((first, "0"));
    let seconds: u64 = seconds.parse().ok()?;
    let digits = fraction.len().min(9);
    let fraction: u64 = fraction.get(..digits)?.parse().ok()?;
    let scale = 10u64.pow(9 - digits as u32);
    Some(seconds * 1_000_000_000 + fraction * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_parses() {
        assert_eq!(
            parse_uptime("350735.47 234388.90\n"),
            Some(350_735_470_000_000)
        );
        assert_eq!(parse_uptime("12 3"), Some(12_000_000_000));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("x.5"), None);
    }

    #[test]
    fn the_clock_moves_forward() {
        let first = boottime_ns().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(boottime_ns().unwrap() > first);
    }
}
