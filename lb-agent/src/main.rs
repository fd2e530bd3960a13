//! lb-agent: the node daemon.
#![allow(unsafe_code, reason = "mallopt(3), once, before any other thread")]

use anyhow::Result;
use clap::Parser;
use lb_agent::{config, daemon, logging};

/// Bytes from which an allocation gets pages of its own.
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Keeps freed memory from staying resident. glibc gives each thread that
/// allocates an arena of its own and, after a large block is freed, raises
/// the size from which blocks get pages of their own up to 32 MiB; the
/// agent's watch thread decodes lists of thousands of objects its main
/// loop then compiles, so both left freed memory resident in their heaps.
/// One arena, and blocks of 128 KiB and more always in pages of their own
/// (returned when freed), take about 15 % off the agent's resident memory
/// at 30,000 Pods (`agent-memory --pods 30000`); the agent allocates too
/// little, from too few threads, for one arena to be contended.
fn tune_allocator() {
    for (param, value) in [
        (libc::M_ARENA_MAX, 1),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, MMAP_THRESHOLD),
    ] {
        // SAFETY: mallopt(3) only changes allocator parameters; it runs
        // before any other thread exists, with values it documents. A
        // parameter it refuses (returns 0) leaves the default in place.
        unsafe { libc::mallopt(param, value) };
    }
}

fn main() -> Result<()> {
    tune_allocator();
    let args = config::Args::parse();
    let file = config::load_file(&args)?;
    let settings = config::resolve(args, file)?;
    logging::init(settings.log_format, settings.log_level.as_deref())?;
    daemon::run(settings)
}
