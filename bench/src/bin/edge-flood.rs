//! `edge-flood`: where a flood from outside is cheapest to drop. One lab
//! node with the tc path serves a NodePort (a `crr server` pod behind it)
//! to an outside client, and a LoadBalancer IP whose
//! `loadBalancerSourceRanges` exclude 203.0.0.0/16. From the same client,
//! `labpod flood` sends spoofed SYNs and bare ACKs from that /16 to the
//! LoadBalancer IP, as fast as one thread can, and they are dropped
//! - `xdp`: by the XDP prefilter (the agent runs with `xdpPrefilter`),
//! - `tc`: by the tc program (source ranges are checked there too),
//! - `iptables`: by an iptables `raw` PREROUTING DROP rule (the agent is
//!   not told of the LoadBalancer Service, so tc passes the packets on).
//!
//! Each round measures, per dropper, TCP connections per second through the
//! NodePort without the flood and then during it (`crr client`, one
//! thread), and how many flood packets per second the dropper counted. The
//! table gives the medians over rounds of the ratio (during / without) with
//! a 95 % interval, and of the drop rate.
//!
//! ```text
//! edge-flood [--rounds N] [--duration SECS] [--out DIR]
//! ```
//! Run as root, after `cargo build --release` (it runs the release
//! `lb-agent`, `labpod` and `crr` next to it).

use std::{fmt::Write as _, path::PathBuf, process::Stdio, thread, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_bench::{control_plane::publish, crr_stand::CrrStand, driver::median_interval};
use lb_e2e::{
    agent::Agent,
    lab::{run, sysctl, Pod},
    manifests::{service, slice, Endpoint},
    probe::{http_get, metric_value, settled},
    scenario::require_root,
};

#[derive(Parser)]
#[command(
    name = "edge-flood",
    about = "Cost of a spoofed flood by where it is dropped"
)]
struct Args {
    /// Rounds (at least 6 for intervals).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Where to write `edge-flood.md`; prints only without it.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Where the flood is dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dropper {
    Xdp,
    Tc,
    Iptables,
}

impl Dropper {
    const ALL: [Dropper; 3] = [Dropper::Xdp, Dropper::Tc, Dropper::Iptables];

    fn name(self) -> &'static str {
        match self {
            Dropper::Xdp => "xdp",
            Dropper::Tc => "tc",
            Dropper::Iptables => "iptables",
        }
    }
}

const LB_IP: &str = "192.168.100.50";
const FLOOD_SOURCES: &str = "203.0.0.0/16";

/// The lab: one node, its server pod, the outside client.
struct Stand {
    base: CrrStand,
    client: Pod,
}

impl Stand {
    fn new() -> Result<Self> {
        let mut base = CrrStand::new("web")?;
        let client = base.lab.add_external_client("outside")?;
        sysctl(&client.netns, "net.ipv4.ip_local_port_range", "1024 65535")?;
        sysctl(&client.netns, "net.ipv4.tcp_tw_reuse", "1")?;
        run(
            "ip",
            &[
                "-n",
                &client.netns,
                "route",
                "add",
                &format!("{LB_IP}/32"),
                "via",
                &base.node.ip,
            ],
        )?;
        Ok(Self { base, client })
    }

    /// The NodePort Service, and the LoadBalancer one unless `iptables`
    /// is to drop its traffic.
    fn manifests(&self, with_lb: bool) -> String {
        let eps = [Endpoint::ready(&self.base.server.ip).on("node1")];
        let web = service("web", "10.96.0.10", &[("tcp", 80, "TCP", "8080")])
            .replace("  type: ClusterIP\n", "  type: NodePort\n")
            .replace(
                "    targetPort: 8080\n",
                "    targetPort: 8080\n    nodePort: 30080\n",
            );
        let mut text = format!(
            "{web}---\n{}",
            slice("web", "web-a", &[("tcp", 8080, "TCP")], &eps)
        );
        if with_lb {
            let lb = service("lb", "10.96.0.11", &[("tcp", 443, "TCP", "8080")])
                .replace(
                    "  type: ClusterIP\n",
                    "  type: LoadBalancer\n  loadBalancerSourceRanges: [192.168.100.0/24]\n",
                )
                .replace(
                    "    targetPort: 8080\n",
                    "    targetPort: 8080\n    nodePort: 30443\n",
                );
            let _ = write!(
                text,
                "---\n{lb}status:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n---\n{}",
                slice("lb", "lb-a", &[("tcp", 8080, "TCP")], &eps)
            );
        }
        text
    }

    fn start_agent(&self, dropper: Dropper) -> Result<Agent> {
        let mut args = vec!["--node-name", "node1", "--tc-interfaces", "eth0"];
        if dropper == Dropper::Xdp {
            args.extend(["--xdp-prefilter", "true"]);
        }
        let agent = Agent::start_with(&self.base.lab, &self.base.bins, &self.base.node, &args)?;
        let with_lb = dropper != Dropper::Iptables;
        agent.write_manifest("web.yaml", &self.manifests(with_lb))?;
        agent.wait_for_services(Duration::from_secs(10), |s| {
            s.contains(":30080/TCP (external)") && (!with_lb || s.contains(&format!("{LB_IP}:443")))
        })?;
        Ok(agent)
    }

    /// Connections per second through the NodePort for `seconds`.
    fn crr(&self, seconds: f64) -> Result<f64> {
        let target = format!("{}:30080", self.base.node.ip);
        let seconds = seconds.to_string();
        self.base.rate(
            &self.client,
            &target,
            &["--threads", "1", "--duration", &seconds],
        )
    }

    /// Flood packets the dropper has counted so far.
    fn dropped(&self, dropper: Dropper) -> Result<f64> {
        if dropper == Dropper::Iptables {
            let out = self.iptables_raw(&["-L", "PREROUTING", "-v", "-x", "-n"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.contains(FLOOD_SOURCES))
                .context("no flood rule in raw PREROUTING")?;
            return line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("unreadable packet count");
        }
        let (_, metrics) = http_get(
            &self.client.netns,
            &format!("http://{}:10249/metrics", self.base.node.ip),
        )?;
        let series: &[&str] = match dropper {
            Dropper::Xdp => &["xdp_drop_source_range"],
            _ => &["drop_source_range", "drop_no_connection"],
        };
        Ok(series
            .iter()
            .filter_map(|outcome| {
                metric_value(&metrics, &format!("lb_tc_packets{{outcome=\"{outcome}\"}}"))
            })
            .sum())
    }

    /// `iptables -t raw ARGS` in the node's network namespace.
    fn iptables_raw(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut all = vec![
            "netns",
            "exec",
            &self.base.node.netns,
            "iptables",
            "-t",
            "raw",
        ];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Inserts (`-I`) or deletes (`-D`) the rule dropping the flood.
    fn iptables(&self, action: &str) -> Result<()> {
        self.iptables_raw(&[action, "PREROUTING", "-s", FLOOD_SOURCES, "-j", "DROP"])?;
        Ok(())
    }

    /// Starts the flood for `seconds`.
    fn flood(&self, seconds: f64) -> Result<std::process::Child> {
        Ok(self
            .base
            .lab
            .command_in(&self.client, &self.base.bins.labpod)?
            .args([
                "flood",
                "--target",
                &format!("{LB_IP}:443"),
                "--sources",
                FLOOD_SOURCES,
                "--duration-ms",
                &((seconds * 1000.0) as u64).to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()?)
    }

    /// One measurement of `dropper`.
    fn measure(&self, dropper: Dropper, seconds: f64) -> Result<Sample> {
        let _agent = self.start_agent(dropper)?;
        if dropper == Dropper::Iptables {
            self.iptables("-I")?;
        }
        let result = (|| {
            // The flood alone: the softirq time it costs, over an idle
            // period of the same length, per packet dropped.
            let idle_start = softirq_seconds()?;
            thread::sleep(Duration::from_secs_f64(seconds));
            let idle = softirq_seconds()? - idle_start;
            let before = settled(|| self.dropped(dropper))?;
            let soft_start = softirq_seconds()?;
            let flood = self.flood(seconds)?.wait_with_output()?;
            let soft = softirq_seconds()? - soft_start;
            if !flood.status.success() {
                bail!("the flood failed: {flood:?}");
            }
            let sent: serde_json::Value = serde_json::from_slice(&flood.stdout)?;
            let sent = sent["sent"].as_f64().unwrap_or(0.0);
            let dropped = settled(|| self.dropped(dropper))? - before;
            // Connections through the NodePort without, then during, a flood.
            self.crr(0.5)?;
            let quiet = self.crr(seconds)?;
            let flood = self.flood(seconds + 0.4)?;
            thread::sleep(Duration::from_millis(200));
            let loud = self.crr(seconds)?;
            flood.wait_with_output()?;
            Ok(Sample {
                ns_per_drop: (soft - idle).max(0.0) * 1e9 / dropped.max(1.0),
                dropped_share: dropped / sent.max(1.0),
                sent_per_second: sent / seconds,
                crr_ratio: loud / quiet,
            })
        })();
        if dropper == Dropper::Iptables {
            self.iptables("-D")?;
        }
        result
    }
}

/// One measurement of a dropper.
#[derive(Clone, Copy)]
struct Sample {
    /// softirq time per dropped flood packet, ns.
    ns_per_drop: f64,
    /// Flood packets the dropper counted over those sent.
    dropped_share: f64,
    /// Flood packets sent per second.
    sent_per_second: f64,
    /// Connections per second through the NodePort during the flood over
    /// without it.
    crr_ratio: f64,
}

/// The machine's softirq time so far, seconds (`/proc/stat`, all CPUs; the
/// flood's receive path runs there, in the node's network namespace or not).
fn softirq_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let ticks: f64 = cpu
        .split_whitespace()
        .nth(7)
        .and_then(|t| t.parse().ok())
        .context("no softirq column in /proc/stat")?;
    // /proc/stat counts in USER_HZ, 100 per second in Linux's ABI.
    Ok(ticks / 100.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root();
    let stand = Stand::new()?;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Dropper::ALL.len()];
    for round in 0..args.rounds {
        for (i, dropper) in Dropper::ALL.into_iter().enumerate() {
            let sample = stand.measure(dropper, args.duration)?;
            eprintln!(
                "round {round} {}: {:.0} ns softirq per drop, {:.3} of {:.0}/s dropped, CRR ratio {:.3}",
                dropper.name(),
                sample.ns_per_drop,
                sample.dropped_share,
                sample.sent_per_second,
                sample.crr_ratio
            );
            samples[i].push(sample);
        }
    }
    let mut report = String::from(
        "# A spoofed flood from outside, by where it is dropped\n\n\
         One lab node (veth uplink); a single-threaded raw-socket sender in the \
         outside client floods a LoadBalancer IP with spoofed SYNs and bare ACKs \
         from 203.0.0.0/16, dropped by the XDP prefilter, by the tc program \
         (loadBalancerSourceRanges) or by an iptables raw PREROUTING DROP rule. \
         Cost: the machine's softirq time during the flood, less that of an \
         idle period as long, per packet the dropper counted (the receive path \
         runs in softirq; the sender's cost is in its own system time, not \
         here). CRR: connections per second through a NodePort of the node \
         (`crr client`, 1 thread) during the flood over without it. Medians \
         of rounds, with a 95 % interval. Command: \
         `target/release/edge-flood --rounds N --duration S --out bench/results` \
         (run by `make bench`).\n\n\
         | dropped by | softirq ns per drop | 95 % interval | counted / sent | sent per second | CRR during / without flood | 95 % interval |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let interval = |values: &[f64], digits: usize| {
        median_interval(values).map_or("n/a (fewer than 6 rounds)".to_owned(), |(lo, hi)| {
            format!("{lo:.digits$} to {hi:.digits$}")
        })
    };
    for (dropper, rows) in Dropper::ALL.into_iter().zip(&samples) {
        let column = |f: fn(&Sample) -> f64| {
            let mut values: Vec<f64> = rows.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let cost = column(|s| s.ns_per_drop);
        let share = column(|s| s.dropped_share);
        let sent = column(|s| s.sent_per_second);
        let crr = column(|s| s.crr_ratio);
        let mid = |v: &[f64]| v[v.len() / 2];
        let _ = writeln!(
            report,
            "| {} | {:.0} | {} | {:.3} | {:.0} | {:.3} | {} |",
            dropper.name(),
            mid(&cost),
            interval(&cost, 0),
            mid(&share),
            mid(&sent),
            mid(&crr),
            interval(&crr, 3),
        );
    }
    let _ = writeln!(
        report,
        "\nRounds: {}, {} s each.",
        args.rounds, args.duration
    );
    publish(
        &report,
        args.out
            .as_deref()
            .map(|d| d.join("edge-flood.md"))
            .as_deref(),
    )?;
    Ok(())
}
