//! lbctl: inspects the datapath through its pinned maps.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_agent::{datapath::Maps, view};

/// Inspect the load balancer's kernel state (read from the pinned maps, not
/// from the agent).
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
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Print every frontend and its backends, as programmed in the kernel.
    List,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Service {
            command: ServiceCommand::List,
        } => {
            let maps = Maps::open_pinned(&args.bpffs_dir)?;
            let dump = maps.dump().context("reading the maps")?;
            print!("{}", view::service_table(&dump));
        }
    }
    Ok(())
}
