//! lb-agent: the node daemon.

use anyhow::Result;
use clap::Parser;
use lb_agent::{config, daemon};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = config::Args::parse();
    let file = config::load_file(&args)?;
    daemon::run(config::resolve(args, file))
}
