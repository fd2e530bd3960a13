//! `make demo`: a lab node with three server pods and a client pod, the
//! Service in `examples/` applied, and requests from the client to the
//! ClusterIP answered by every backend through socket-level translation.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_e2e::{
    agent::{Agent, Binaries},
    lab::Lab,
    probe::{parse_attempts, per_backend},
};

#[derive(Parser)]
struct Args {
    /// Directory of example manifests to apply.
    #[arg(long, default_value = "examples")]
    examples: PathBuf,
    /// Frontend to send requests to.
    #[arg(long, default_value = "10.96.0.10:80")]
    target: String,
    /// Number of requests (30 make a miss of any backend a 1-in-60,000 event).
    #[arg(long, default_value_t = 30)]
    requests: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bins = Binaries::locate()?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1")?;
    println!("== lab {}: node1 ({})", lab.id(), node.ip);
    for i in 1..=3 {
        let pod = lab.add_pod(&node, &format!("web-{i}"))?;
        lab.spawn_server(
            &pod,
            &bins.labpod,
            &["serve", "--name", &pod.name, "--http", "8080"],
        )?;
        println!("   pod {:<6} {:<12} HTTP server on :8080", pod.name, pod.ip);
    }
    let client = lab.add_pod(&node, "client")?;
    println!("   pod {:<6} {:<12} client", client.name, client.ip);

    let agent = Agent::start(&lab, &bins, &node)?;
    println!(
        "== lb-agent running: programs attached to {}",
        node.cgroup.display()
    );
    for entry in
        fs::read_dir(&args.examples).with_context(|| args.examples.display().to_string())?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .expect("file")
                .to_string_lossy()
                .into_owned();
            agent.write_manifest(&name, &fs::read_to_string(&path)?)?;
            println!("== applied {}", path.display());
        }
    }
    agent.wait_for_services(Duration::from_secs(10), |table| table.lines().count() > 3)?;

    println!(
        "== {} requests from {} to http://{}/",
        args.requests, client.name, args.target
    );
    let output = lab.run_in(
        &client,
        &bins.labpod,
        &[
            "connect",
            "--http",
            "--target",
            &args.target,
            "--count",
            &args.requests.to_string(),
        ],
    )?;
    let attempts = parse_attempts(&output.stdout)?;
    for (i, attempt) in attempts.iter().enumerate() {
        match &attempt.backend {
            Some(backend) => println!(
                "   request {:>2}: answered by {backend} (client's peer {}, backend saw {})",
                i + 1,
                attempt.peer.as_deref().unwrap_or("?"),
                attempt.seen_source.as_deref().unwrap_or("?"),
            ),
            None => println!(
                "   request {:>2}: failed: {}",
                i + 1,
                attempt.error.as_deref().unwrap_or("?")
            ),
        }
    }
    println!("== lbctl service list (read from the pinned maps)");
    print!("{}", agent.service_list()?);

    let counts = per_backend(&attempts);
    drop(agent);
    drop(lab);
    println!("== lab torn down");
    if counts.len() != 3 || attempts.iter().any(|a| !a.ok) {
        bail!("expected answers from all three backends, got {counts:?}");
    }
    println!("== every backend answered: {counts:?}");
    Ok(())
}
