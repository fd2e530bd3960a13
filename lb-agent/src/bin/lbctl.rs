//! lbctl: inspects the datapath through its pinned maps, and asks the agent
//! for its latest drop reports.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_agent::kernel::{AyaPolicyMaps, AyaServiceMaps, PolicyMaps, ServiceMaps};
use lb_core::{drops::DropRecord, tables};
use lb_policy::{
    explain::{self, FlowTarget},
    tables::PolicyTables,
};

/// How long `lbctl drops` waits for the agent.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Inspect the load balancer: its kernel state (read from the pinned maps,
/// not from the agent) and the agent's drop reports.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// bpffs directory where lb-agent pins its maps.
    #[arg(
        long,
        env = "LB_BPFFS_DIR",
        default_value = "/sys/fs/bpf/lb",
        global = true
    )]
    bpffs_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Services.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Sockets the socket path translated.
    Socket {
        #[command(subcommand)]
        command: SocketCommand,
    },
    /// Security identities.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Network policy as programmed in the kernel.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The latest new flows the tc path dropped or refused, and why (from
    /// the agent's `/drops`).
    Drops {
        /// The agent's metrics address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        agent: SocketAddr,
    },
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Print every frontend and its backends, as programmed in the kernel.
    List,
}

#[derive(Subcommand, Debug)]
enum SocketCommand {
    /// Print every open translated socket: its Service, the frontend it
    /// shows as its peer and the backend it was sent to.
    List,
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Print every identity: number, kind, addresses carrying it, labels.
    List,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Print a pod of this node as the policy maps hold it: identity,
    /// isolation, and every entry of its policy with the rule it came from.
    Get {
        /// The pod, `namespace/name`.
        pod: String,
    },
    /// Whether this node's maps allow a flow (after any service
    /// translation), and by which rules. The first line of the answer is
    /// `allowed` or `denied: <why>`; the exit status is 0 or 1 accordingly.
    Trace {
        /// The source: a pod (`namespace/name`) or an address.
        #[arg(long)]
        from: String,
        /// The destination: `<namespace/name|address>:<port>/<tcp|udp|sctp>`.
        #[arg(long)]
        to: FlowTarget,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Service {
            command: ServiceCommand::List,
        } => {
            let maps = AyaServiceMaps::open_pinned(&args.bpffs_dir)?;
            let dump = maps.dump().context("reading the maps")?;
            print!("{}", tables::service_table(&dump));
        }
        Command::Socket {
            command: SocketCommand::List,
        } => {
            let maps = AyaServiceMaps::open_pinned(&args.bpffs_dir)?;
            let names = maps.service_names().context("reading the service names")?;
            let translations = maps
                .socket_translations()
                .context("reading the socket translations")?;
            print!("{}", tables::socket_table(&names, &translations));
        }
        Command::Identity {
            command: IdentityCommand::List,
        } => print!(
            "{}",
            explain::identity_table(&policy_tables(&args.bpffs_dir)?)
        ),
        Command::Policy {
            command: PolicyCommand::Get { pod },
        } => print!(
            "{}",
            explain::endpoint_report(&policy_tables(&args.bpffs_dir)?, &pod)?
        ),
        Command::Policy {
            command: PolicyCommand::Trace { from, to },
        } => {
            let trace = explain::trace(&policy_tables(&args.bpffs_dir)?, &from, &to)?;
            print!("{}", trace.text);
            if !trace.allowed {
                std::process::exit(1);
            }
        }
        Command::Drops { agent } => {
            let records: Vec<DropRecord> = serde_json::from_str(&get(agent, "/drops")?)
                .context("reading the agent's drop reports")?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            print!("{}", tables::drop_table(&records, now));
        }
    }
    Ok(())
}

/// What the policy maps pinned in `dir` hold.
fn policy_tables(dir: &Path) -> Result<PolicyTables> {
    AyaPolicyMaps::open_pinned(dir)
        .and_then(|maps| maps.dump())
        .context("reading the policy maps")
}

/// The body of a 200 answer to `GET path` from the agent.
fn get(agent: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&agent, AGENT_TIMEOUT)
        .with_context(|| format!("connecting to the agent at {agent}"))?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {agent}\r\n\r\n")?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer of {agent}"))?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("{agent} sent no HTTP answer");
    };
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{agent} answered {status:?} to GET {path}");
    }
    Ok(body.to_string())
}
