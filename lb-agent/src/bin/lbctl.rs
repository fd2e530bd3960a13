//! lbctl: inspects the datapath through its pinned maps, and asks the agent
//! for its latest drop reports.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_agent::kernel::{AyaServiceMaps, ServiceMaps};
use lb_core::{drops::DropRecord, tables};

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
