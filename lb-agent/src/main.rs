//! lb-agent: the node daemon.

use anyhow::Result;
use clap::Parser;
use lb_agent::{config, daemon, logging};

fn main() -> Result<()> {
    let args = config::Args::parse();
    let file = config::load_file(&args)?;
    let settings = config::resolve(args, file)?;
    logging::init(settings.log_format, settings.log_level.as_deref())?;
    daemon::run(settings)
}
