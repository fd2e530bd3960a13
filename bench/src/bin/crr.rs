//! `crr`: TCP_CRR / TCP_RR load tool.
//!
//! ```text
//! crr server --listen ADDR:PORT [--size R] [--workers N]
//! crr client --target ADDR:PORT --threads N --duration SECS [--pin]
//!            [--size R] [--mode crr|rr] [--timeout-ms MS] [--json]
//!            [--turn K --of N --slice-ms MS --epoch-ns T]
//! ```
//!
//! With `--turn`, clients started together take turns in time slices (see
//! `lb_bench::crr::Turns`): each runs only in slice K of every N from
//! `CLOCK_MONOTONIC` time T, for `--duration` seconds of its own slices.
//!
//! The server prints `listening ADDR:PORT` once it accepts connections (so a
//! driver may pass port 0 and read the real port). The client prints one
//! summary line, or one JSON object on one line with `--json`, and exits with
//! status 1 when no transaction completed.
//!
//! Before a CRR run the driver must widen the client's local port range and
//! enable TIME_WAIT reuse (`net.ipv4.ip_local_port_range="1024 65535"`,
//! `net.ipv4.tcp_tw_reuse=1`); see `lb_bench::crr`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_bench::crr::{self, ClientConfig, Mode, Server, ServerConfig, Turns};

#[derive(Parser)]
#[command(
    name = "crr",
    about = "TCP connect/request/response load tool",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept connections and answer each R-byte request with R bytes,
    /// letting the client close first.
    Server {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
        /// Request and response size in bytes.
        #[arg(long, default_value_t = crr::DEFAULT_SIZE)]
        size: usize,
        /// Accepting threads (default: 4 per core, at least 8).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run transactions against a server and report rate and latency.
    Client {
        /// Address to connect to (service VIP or pod IP).
        #[arg(long)]
        target: SocketAddr,
        /// Client threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run time in seconds (fractions allowed).
        #[arg(long)]
        duration: f64,
        /// Request and response size in bytes.
        #[arg(long, default_value_t = crr::DEFAULT_SIZE)]
        size: usize,
        /// crr: a new connection per transaction; rr: one kept-open
        /// connection per thread.
        #[arg(long, value_enum, default_value_t = Mode::Crr)]
        mode: Mode,
        /// Connect/send/receive timeout per socket in milliseconds; 0 leaves
        /// sockets fully blocking.
        #[arg(long, default_value_t = crr::DEFAULT_TIMEOUT.as_millis() as u64)]
        timeout_ms: u64,
        /// Pin client thread i to the i-th allowed CPU (steadier results).
        #[arg(long)]
        pin: bool,
        /// Print one JSON object on one line instead of a summary.
        #[arg(long)]
        json: bool,
        /// Run only in slice K (0-based) of every `--of` slices.
        #[arg(long, requires_all = ["of", "slice_ms", "epoch_ns"])]
        turn: Option<u32>,
        /// Clients taking turns.
        #[arg(long, requires = "turn")]
        of: Option<u32>,
        /// Slice length in milliseconds.
        #[arg(long, requires = "turn")]
        slice_ms: Option<u64>,
        /// Start of slice 0 on CLOCK_MONOTONIC, nanoseconds.
        #[arg(long, requires = "turn")]
        epoch_ns: Option<u64>,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Server {
            listen,
            size,
            workers,
        } => {
            let mut cfg = ServerConfig {
                size,
                ..ServerConfig::default()
            };
            if let Some(w) = workers {
                cfg.workers = w;
            }
            let server =
                Server::bind(listen, cfg).with_context(|| format!("listening on {listen}"))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening {}", server.local_addr())?;
            out.flush()?;
            drop(out);
            server.wait();
            Ok(ExitCode::SUCCESS)
        }
        Command::Client {
            target,
            threads,
            duration,
            size,
            mode,
            timeout_ms,
            pin,
            json,
            turn,
            of,
            slice_ms,
            epoch_ns,
        } => {
            if !(duration.is_finite() && duration > 0.0) {
                bail!("--duration must be a positive number of seconds");
            }
            let turns = match (turn, of, slice_ms, epoch_ns) {
                (Some(turn), Some(of), Some(slice_ms), Some(epoch_ns)) => {
                    if turn >= of || slice_ms == 0 {
                        bail!("--turn must be below --of and --slice-ms above 0");
                    }
                    Some(Turns {
                        epoch_ns,
                        slice: Duration::from_millis(slice_ms),
                        turn,
                        of,
                    })
                }
                _ => None,
            };
            let cfg = ClientConfig {
                target,
                threads,
                duration: Duration::from_secs_f64(duration),
                size,
                mode,
                timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
                pin,
                turns,
            };
            let report = crr::run_client(&cfg).context("running client")?;
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            Ok(if report.transactions > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
