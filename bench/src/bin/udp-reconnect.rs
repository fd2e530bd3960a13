//! `udp-reconnect`: how long the agent's loop spends moving connected UDP
//! sockets off a removed backend, by how many sockets it moves.
//!
//! The bench process opens N UDP sockets connected to an "old backend"
//! (a local UDP socket) and hands them, with their cookies, to the agent's
//! own code (`lb_agent::node::sockets::move_udp_sockets`): a `sock_diag`
//! dump of every network namespace of the machine, a walk of `/proc` for a
//! process holding each socket, `pidfd_getfd` and a `connect()` to the
//! "frontend" (another local UDP socket; without the socket programs
//! attached the `connect()` reaches it untranslated, so what is timed is the
//! agent's part, not the hook's). Each round checks that every socket now
//! has the frontend as its peer. The table gives the median over rounds and
//! a 95 % interval, and the cost per socket.
//!
//! There is no baseline to compare with: kube-proxy clears conntrack
//! entries instead, and the agent before this destroyed the sockets.
//!
//! ```text
//! udp-reconnect [--rounds N] [--sockets N,N,...] [--out DIR]
//! ```
//! Run as root (the walk enters every network namespace).

use std::{
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::Instant,
};

use anyhow::{ensure, Result};
use clap::Parser;
use lb_agent::{node::sockets::move_udp_sockets, reconcile::StaleUdpSocket};
use lb_bench::{control_plane::publish, driver::median_interval};
use lb_e2e::scenario::require_root;

#[derive(Parser)]
#[command(
    name = "udp-reconnect",
    about = "Time the agent takes to connect stale connected UDP sockets again"
)]
struct Args {
    /// Rounds per socket count (at least 6 for intervals).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Socket counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 1000, 10000])]
    sockets: Vec<usize>,
    /// Where to write `udp-reconnect.md`; prints only without it.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One round: `count` sockets connected to `old`, moved to `frontend`.
/// Returns the seconds the move took.
fn round(count: usize, old: SocketAddr, frontend: SocketAddr) -> Result<f64> {
    let sockets = (0..count)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(old)?;
            Ok(socket)
        })
        .collect::<Result<Vec<_>>>()?;
    let stale = sockets
        .iter()
        .map(|socket| {
            Ok(StaleUdpSocket {
                cookie: rustix::net::sockopt::socket_cookie(socket)?,
                backend: old,
                frontend,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let moved = move_udp_sockets(&stale, 0)?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        moved.reconnected.len() == count && moved.destroyed.is_empty(),
        "{} of {count} sockets connected again, {} destroyed: {:?}",
        moved.reconnected.len(),
        moved.destroyed.len(),
        moved.destroyed.first()
    );
    for socket in &sockets {
        ensure!(
            socket.peer_addr()? == frontend,
            "a socket kept its old peer"
        );
    }
    Ok(seconds)
}

/// Processes and open descriptors on the machine: what the walk of `/proc`
/// reads.
fn proc_size() -> (usize, usize) {
    let mut processes = 0;
    let mut descriptors = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        processes += 1;
        descriptors += std::fs::read_dir(entry.path().join("fd"))
            .map(|fds| fds.count())
            .unwrap_or(0);
    }
    (processes, descriptors)
}

/// Raises the open-descriptor limit to its hard limit, and checks that the
/// largest round fits.
fn allow_descriptors(largest: usize) -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit)?;
    let allowed = limit.current.unwrap_or(u64::MAX);
    ensure!(
        largest as u64 + 64 <= allowed,
        "{largest} sockets do not fit the open-descriptor limit of {allowed}"
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root();
    allow_descriptors(args.sockets.iter().copied().max().unwrap_or(0))?;
    let old = UdpSocket::bind("127.0.0.1:0")?;
    let frontend = UdpSocket::bind("127.0.0.1:0")?;
    let (old, frontend) = (old.local_addr()?, frontend.local_addr()?);
    let (processes, descriptors) = proc_size();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Connecting stale connected UDP sockets again\n\n\
         `target/release/udp-reconnect --rounds {} --sockets {}` on a machine with {processes} \
         processes holding {descriptors} descriptors (before the bench's own sockets). Time of \
         `move_udp_sockets` (the agent's loop waits for it): median over rounds, 95 % interval.\n\n\
         | sockets | ms | 95 % interval | µs per socket |\n|---:|---:|---:|---:|",
        args.rounds,
        args.sockets
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    for &count in &args.sockets {
        let mut samples = (0..args.rounds)
            .map(|_| round(count, old, frontend))
            .collect::<Result<Vec<_>>>()?;
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        let interval = median_interval(&samples)
            .map(|(low, high)| format!("{:.1} – {:.1}", low * 1e3, high * 1e3))
            .unwrap_or_else(|| "(too few rounds)".into());
        let _ = writeln!(
            report,
            "| {count} | {:.1} | {interval} | {:.1} |",
            median * 1e3,
            median * 1e6 / count as f64
        );
    }
    publish(
        &report,
        args.out.map(|dir| dir.join("udp-reconnect.md")).as_deref(),
    )?;
    Ok(())
}
