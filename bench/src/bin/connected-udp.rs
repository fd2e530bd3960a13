//! `connected-udp`: what serving pods' connected UDP sockets per datagram
//! costs. One lab node runs the agent with its default settings (network
//! policy on: the pod programs run on the interfaces of the node's known
//! Pods), a `crr server` pod behind a ClusterIP (UDP 53 -> 8080) and a
//! client pod, both known as Pod objects, in two arms:
//! - `per-datagram`: `podConnectedUdpPerPacket` true (the default): a
//!   connected socket stays on the ClusterIP and the pod programs translate
//!   each datagram;
//! - `at-connect`: false: every socket is translated by the socket
//!   programs (connected ones at `connect()`, and connected again by the
//!   agent when their backend leaves).
//!
//! Each round measures both arms, in alternating order, with `crr client`
//! in two modes: `udp` (a `sendto()` per request on an unconnected socket,
//! as a DNS resolver sends: the traffic whose cost must not grow) and
//! `udp-connected` (one connected socket per thread: the traffic that moves
//! to the pod programs). The table gives, per mode, the median over rounds
//! of the per-datagram arm's transactions per second over the at-connect
//! arm's, with a 95 % interval.
//!
//! ```text
//! connected-udp [--rounds N] [--duration SECS] [--out DIR]
//! ```
//! Run as root, after `cargo build --release` (it runs the release
//! `lb-agent`, `labpod` and `crr` next to it).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Parser;
use lb_bench::{control_plane::publish, crr_stand::CrrStand, driver::median_interval};
use lb_e2e::{
    agent::Agent,
    lab::Pod,
    manifests::{pod_object, service, slice, Endpoint},
    scenario::require_root,
};

#[derive(Parser)]
#[command(
    name = "connected-udp",
    about = "Cost of translating pods' connected UDP sockets per datagram"
)]
struct Args {
    /// Rounds (at least 6 for intervals).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where to write `connected-udp.md`; prints only without it.
    #[arg(long)]
    out: Option<PathBuf>,
}

const VIP: &str = "10.96.0.10";

/// The client's socket use.
const MODES: [&str; 2] = ["udp", "udp-connected"];

/// The lab: one node, its server pod, a client pod.
struct Stand {
    base: CrrStand,
    client: Pod,
}

impl Stand {
    fn new() -> Result<Self> {
        let mut base = CrrStand::new("dns")?;
        let client = base.lab.add_pod(&base.node, "client")?;
        Ok(Self { base, client })
    }

    /// The agent with connected UDP served per datagram or not.
    fn start_agent(&self, per_datagram: bool) -> Result<Agent> {
        let base = &self.base;
        let agent = Agent::start_with(
            &base.lab,
            &base.bins,
            &base.node,
            &[
                "--node-name",
                "node1",
                "--pod-connected-udp-per-packet",
                &per_datagram.to_string(),
            ],
        )?;
        let eps = [Endpoint::ready(&base.server.ip).on("node1")];
        let text = [
            service("dns", VIP, &[("dns", 53, "UDP", "8080")]),
            slice("dns", "dns-a", &[("dns", 8080, "UDP")], &eps),
            pod_object(&base.server, &[("app", "dns")]),
            pod_object(&self.client, &[("app", "client")]),
        ]
        .join("---\n");
        agent.write_manifest("dns.yaml", &text)?;
        agent.wait_for_services(Duration::from_secs(10), |s| {
            s.contains(&format!("{VIP}:53/UDP")) && s.contains("(per packet)") == per_datagram
        })?;
        if per_datagram {
            agent.wait_for_log(
                "pod's connected UDP translated per datagram",
                Duration::from_secs(10),
            )?;
        }
        Ok(agent)
    }

    /// Transactions per second of `crr client --mode MODE` for `seconds`.
    fn rate(&self, mode: &str, threads: usize, seconds: f64) -> Result<f64> {
        let (threads, seconds) = (threads.to_string(), seconds.to_string());
        self.base.rate(
            &self.client,
            &format!("{VIP}:53"),
            &[
                "--mode",
                mode,
                "--threads",
                &threads,
                "--duration",
                &seconds,
                "--timeout-ms",
                "200",
            ],
        )
    }

    /// Both modes' rates under one arm.
    fn measure(&self, per_datagram: bool, args: &Args) -> Result<[f64; 2]> {
        let _agent = self.start_agent(per_datagram)?;
        self.rate("udp", args.threads, 0.3)?;
        let mut rates = [0.0; 2];
        for (rate, mode) in rates.iter_mut().zip(MODES) {
            *rate = self.rate(mode, args.threads, args.duration)?;
        }
        Ok(rates)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root();
    let stand = Stand::new()?;
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        // Alternating order: neither arm always runs on a warmer machine.
        let (per_datagram, at_connect) = if round % 2 == 0 {
            let first = stand.measure(true, &args)?;
            (first, stand.measure(false, &args)?)
        } else {
            let first = stand.measure(false, &args)?;
            (stand.measure(true, &args)?, first)
        };
        for i in 0..MODES.len() {
            ratios[i].push(per_datagram[i] / at_connect[i]);
            rates[i].push(at_connect[i]);
            eprintln!(
                "round {round} {}: per-datagram {:.0}/s, at-connect {:.0}/s",
                MODES[i], per_datagram[i], at_connect[i]
            );
        }
    }
    let mut report = String::from(
        "# Pods' connected UDP sockets translated per datagram: the cost\n\n\
         One lab node, the agent with its default settings (network policy on, \
         so the pod programs run on both pods' interfaces); a client pod \
         sends 1-byte UDP requests to a ClusterIP (one `crr server` pod behind \
         it) and waits for each answer. Arms: `podConnectedUdpPerPacket` true \
         (a connected socket stays on the ClusterIP and the pod programs \
         translate each datagram, so the socket survives its backend's \
         removal) over false (every socket translated by the socket programs). \
         `udp`: a `sendto()` per request on an unconnected socket, as DNS \
         resolvers send (translated by the socket programs in both arms); \
         `udp-connected`: one connected socket per thread. Medians over \
         rounds of the ratio of transactions per second, with a 95 % \
         interval. Command: `target/release/connected-udp --rounds N \
         --duration S --out bench/results` (run by `make bench`).\n\n\
         | client sockets | per-datagram / at-connect | 95 % interval | at-connect transactions/s |\n\
         |---|---|---|---|\n",
    );
    for (i, mode) in MODES.into_iter().enumerate() {
        let mut sorted = ratios[i].clone();
        sorted.sort_by(f64::total_cmp);
        let mut base = rates[i].clone();
        base.sort_by(f64::total_cmp);
        let interval = median_interval(&sorted)
            .map_or("n/a (fewer than 6 rounds)".to_owned(), |(lo, hi)| {
                format!("{lo:.3} to {hi:.3}")
            });
        let _ = writeln!(
            report,
            "| {mode} | {:.3} | {interval} | {:.0} |",
            sorted[sorted.len() / 2],
            base[base.len() / 2],
        );
    }
    let _ = writeln!(
        report,
        "\nRounds: {}, {} s per measurement, {} client threads.",
        args.rounds, args.duration, args.threads
    );
    publish(
        &report,
        args.out
            .as_deref()
            .map(|d| d.join("connected-udp.md"))
            .as_deref(),
    )?;
    Ok(())
}
