//! What the client is told and what it reports: the transaction mode, the
//! client configuration, the time slices of clients taking turns and the
//! schedule they give, and the report of a run.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::{DEFAULT_SIZE, DEFAULT_TIMEOUT};

/// Transaction pattern of the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Connect, request, response, close; a new connection per transaction.
    Crr,
    /// Request, response on one kept-open connection per thread.
    Rr,
    /// UDP request, response: each request a `sendto()` of an unconnected
    /// socket (one per thread), as a DNS resolver sends.
    Udp,
    /// UDP request, response on one connected socket per thread.
    #[serde(rename = "udp-connected")]
    #[value(name = "udp-connected")]
    UdpConnected,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
            Mode::Udp => "udp",
            Mode::UdpConnected => "udp-connected",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "crr" => Ok(Mode::Crr),
            "rr" => Ok(Mode::Rr),
            "udp" => Ok(Mode::Udp),
            "udp-connected" => Ok(Mode::UdpConnected),
            other => Err(format!(
                "unknown mode {other:?} (expected crr, rr, udp or udp-connected)"
            )),
        }
    }
}

/// What the client does.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Address to connect to (a service VIP or a pod IP).
    pub target: SocketAddr,
    /// Number of client threads, each running transactions back to back.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Request and response size in bytes (at least 1).
    pub size: usize,
    /// CRR or RR.
    pub mode: Mode,
    /// Connect/send/receive timeout set on each client socket
    /// (`SO_SNDTIMEO`, which also bounds a blocking connect, and
    /// `SO_RCVTIMEO`); `None` leaves the sockets fully blocking.
    pub timeout: Option<Duration>,
    /// Pin client thread `i` to the `i`-th CPU the process may run on
    /// (round robin). Unpinned threads wander between CPUs and share one
    /// now and then, which spreads repeated runs by ±15 % on a 2-CPU
    /// machine; pinned, by about ±3 %.
    pub pin: bool,
    /// Run only in this client's turns of time slices shared with other
    /// clients, `duration` being the total of its own slices; `None` runs
    /// `duration` at once from the start.
    pub turns: Option<Turns>,
}

impl ClientConfig {
    /// A CRR configuration with the defaults (1 byte, 5 s socket timeout).
    pub fn new(target: SocketAddr, threads: usize, duration: Duration) -> Self {
        ClientConfig {
            target,
            threads,
            duration,
            size: DEFAULT_SIZE,
            mode: Mode::Crr,
            timeout: Some(DEFAULT_TIMEOUT),
            pin: false,
            turns: None,
        }
    }
}

/// Time slices that clients to be compared take in turn, so that each sees
/// the same machine conditions as the others down to a slice: on shared
/// virtual machines the CPU available to a guest drifts by several percent
/// over seconds, which two runs one after the other would each see
/// differently.
///
/// From `epoch_ns` on, time is cut into slices of `slice`; slice `k` belongs
/// to the client whose `turn` is `k % of`. A client starts transactions only
/// in its own slices, so two clients taking turns never compete for the CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turns {
    /// When slice 0 starts, in nanoseconds of `CLOCK_MONOTONIC`, which every
    /// network namespace of the machine shares ([`monotonic_ns`]).
    pub epoch_ns: u64,
    /// Length of a slice.
    pub slice: Duration,
    /// This client's place in each cycle of `of` slices (0-based).
    pub turn: u32,
    /// Clients taking turns.
    pub of: u32,
}

/// The error a client taking turns reports when it starts after its first
/// slice began (its rate would count time it did not run).
pub const LATE_START: &str = "started after its first slice";

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid, and clock_gettime writes only
    // the one it is given.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The times a client may start transactions: `cycles` slices of
/// `slice_ns`, the `turn`-th of every `of`, from `epoch_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Schedule {
    epoch_ns: u64,
    slice_ns: u64,
    turn: u64,
    of: u64,
    cycles: u64,
}

/// Where a client stands in its [`Schedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// In one of its slices, which ends at this time.
    Running { until_ns: u64 },
    /// Between its slices; the next starts at this time.
    Waiting { until_ns: u64 },
    /// Past its last slice.
    Done,
}

impl Schedule {
    /// `duration` from `start_ns` in one slice, or, with `turns`, `duration`
    /// rounded to whole slices (at least one).
    pub(super) fn new(duration: Duration, start_ns: u64, turns: Option<Turns>) -> Self {
        let duration_ns = duration.as_nanos() as u64;
        match turns {
            None => Schedule {
                epoch_ns: start_ns,
                slice_ns: duration_ns.max(1),
                turn: 0,
                of: 1,
                cycles: 1,
            },
            Some(turns) => {
                let slice_ns = (turns.slice.as_nanos() as u64).max(1);
                Schedule {
                    epoch_ns: turns.epoch_ns,
                    slice_ns,
                    turn: u64::from(turns.turn),
                    of: u64::from(turns.of.max(1)),
                    cycles: ((duration_ns + slice_ns / 2) / slice_ns).max(1),
                }
            }
        }
    }

    /// The time this client runs in all.
    pub(super) fn running_time(&self) -> Duration {
        Duration::from_nanos(self.cycles * self.slice_ns)
    }

    pub(super) fn slice_start(&self, cycle: u64) -> u64 {
        self.epoch_ns + (cycle * self.of + self.turn) * self.slice_ns
    }

    pub(super) fn phase(&self, now_ns: u64) -> Phase {
        let Some(since_epoch) = now_ns.checked_sub(self.epoch_ns) else {
            return Phase::Waiting {
                until_ns: self.slice_start(0),
            };
        };
        let slice = since_epoch / self.slice_ns;
        let (cycle, place) = (slice / self.of, slice % self.of);
        let next_cycle = match place.cmp(&self.turn) {
            std::cmp::Ordering::Less => cycle,
            std::cmp::Ordering::Equal if cycle < self.cycles => {
                return Phase::Running {
                    until_ns: self.epoch_ns + (slice + 1) * self.slice_ns,
                }
            }
            _ => cycle + 1,
        };
        if next_cycle >= self.cycles {
            Phase::Done
        } else {
            Phase::Waiting {
                until_ns: self.slice_start(next_cycle),
            }
        }
    }
}

/// Result of one client run. Latencies are per transaction, in microseconds;
/// for CRR a transaction includes the connect and, for RR, it is one
/// request/response exchange.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Transaction pattern.
    pub mode: Mode,
    /// Address the client connected to.
    pub target: String,
    /// Client threads.
    pub threads: usize,
    /// Request and response size in bytes.
    pub size: usize,
    /// Time the client ran transactions (the total of its slices), seconds.
    pub duration_s: f64,
    /// Completed transactions.
    pub transactions: u64,
    /// Transactions per second (connections per second in CRR mode).
    pub tps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile latency, µs.
    pub p90_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Smallest latency, µs.
    pub min_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
    /// Failed transactions (`connect_errors + io_errors`).
    pub errors: u64,
    /// Failed connects (refused, timed out, no free local port, ...).
    pub connect_errors: u64,
    /// Failed writes or reads, including short responses and timeouts.
    pub io_errors: u64,
}

impl Report {
    /// One JSON object on one line, for drivers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} threads={} size={} duration={:.2}s transactions={} tps={:.0} \
             p50={:.1}us p90={:.1}us p99={:.1}us mean={:.1}us max={:.1}us errors={} \
             (connect={} io={})",
            self.mode,
            self.target,
            self.threads,
            self.size,
            self.duration_s,
            self.transactions,
            self.tps,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.mean_us,
            self.max_us,
            self.errors,
            self.connect_errors,
            self.io_errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_without_turns_runs_its_duration_once() {
        let schedule = Schedule::new(Duration::from_millis(1500), 1_000, None);
        assert_eq!(schedule.running_time(), Duration::from_millis(1500));
        assert_eq!(
            schedule.phase(1_000),
            Phase::Running {
                until_ns: 1_500_001_000
            }
        );
        assert_eq!(schedule.phase(1_500_000_999), schedule.phase(1_000));
        assert_eq!(schedule.phase(1_500_001_000), Phase::Done);
    }

    #[test]
    fn clients_taking_turns_run_in_disjoint_slices_of_equal_total() {
        let ms = 1_000_000;
        let turns = |turn| Turns {
            epoch_ns: 10 * ms,
            slice: Duration::from_millis(100),
            turn,
            of: 2,
        };
        let first = Schedule::new(Duration::from_millis(290), 0, Some(turns(0)));
        let second = Schedule::new(Duration::from_millis(290), 0, Some(turns(1)));
        for schedule in [first, second] {
            assert_eq!(schedule.running_time(), Duration::from_millis(300));
        }
        // Before the epoch both wait for their first slice.
        assert_eq!(first.phase(0), Phase::Waiting { until_ns: 10 * ms });
        assert_eq!(second.phase(0), Phase::Waiting { until_ns: 110 * ms });
        // Every millisecond of the six slices belongs to exactly one client.
        for t in (10..610).map(|t| t * ms) {
            let running = [first, second]
                .iter()
                .filter(|s| matches!(s.phase(t), Phase::Running { .. }))
                .count();
            assert_eq!(running, 1, "at {t} ns");
        }
        assert_eq!(first.phase(150 * ms), Phase::Waiting { until_ns: 210 * ms });
        assert_eq!(
            second.phase(350 * ms),
            Phase::Running { until_ns: 410 * ms }
        );
        assert_eq!(first.phase(510 * ms), Phase::Done);
        assert_eq!(
            second.phase(510 * ms),
            Phase::Running { until_ns: 610 * ms }
        );
        assert_eq!(second.phase(610 * ms), Phase::Done);
    }

    #[test]
    fn mode_parses_and_prints() {
        assert_eq!("CRR".parse::<Mode>().unwrap(), Mode::Crr);
        assert_eq!("rr".parse::<Mode>().unwrap(), Mode::Rr);
        assert!("stream".parse::<Mode>().is_err());
        assert_eq!(Mode::Rr.to_string(), "rr");
        for mode in [Mode::Udp, Mode::UdpConnected] {
            assert_eq!(mode.to_string().parse::<Mode>().unwrap(), mode);
        }
    }
}
