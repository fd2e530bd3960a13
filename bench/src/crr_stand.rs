//! What the lab benchmarks besides `lb-bench` stand on (`edge-flood`,
//! `connected-udp`): one lab node with a `crr server` pod, and `crr client`
//! runs from any place of the lab.

use std::{
    path::PathBuf,
    process::{Child, Command},
};

use anyhow::{Context, Result};
use lb_e2e::{
    agent::Binaries,
    lab::{spawn_until, Lab, Node, Place, Pod},
};

/// A lab node (`node1`) with a pod serving `crr server` on 0.0.0.0:8080
/// (TCP and UDP). The server stops when the stand is dropped.
pub struct CrrStand {
    /// The lab.
    pub lab: Lab,
    /// The workspace binaries (the release build's, next to the benchmark).
    pub bins: Binaries,
    /// The `crr` binary next to the running benchmark.
    pub crr: PathBuf,
    /// The node.
    pub node: Node,
    /// The server pod.
    pub server: Pod,
    server_process: Child,
}

impl Drop for CrrStand {
    fn drop(&mut self) {
        let _ = self.server_process.kill();
        let _ = self.server_process.wait();
    }
}

impl CrrStand {
    /// The lab with its node and the server pod `server_name`.
    pub fn new(server_name: &str) -> Result<Self> {
        let bins = Binaries::locate()?;
        let crr = std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("crr");
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1")?;
        let server = lab.add_pod(&node, server_name)?;
        let mut command = lab.command_in(&server, &crr)?;
        command.args(["server", "--listen", "0.0.0.0:8080"]);
        let server_process = spawn_until(command, "crr server", "listening")?;
        Ok(Self {
            lab,
            bins,
            crr,
            node,
            server,
            server_process,
        })
    }

    /// `crr client` in `from`.
    pub fn client(&self, from: &dyn Place) -> Result<Command> {
        self.lab.command_in(from, &self.crr)
    }

    /// Transactions per second of `crr client --target TARGET ARGS... --json`
    /// run in `from`.
    pub fn rate(&self, from: &dyn Place, target: &str, args: &[&str]) -> Result<f64> {
        let output = self
            .client(from)?
            .args(["client", "--target", target])
            .args(args)
            .arg("--json")
            .output()
            .context("running crr client")?;
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("crr client said {output:?}"))?;
        report["tps"].as_f64().context("no tps in the crr report")
    }
}
