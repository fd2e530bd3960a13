//! Running the project's binaries against a lab node.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{Lab, Node};

/// Paths of the workspace binaries (built by `cargo build` before the tests).
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The node agent.
    pub agent: PathBuf,
    /// The CLI.
    pub lbctl: PathBuf,
    /// The in-pod test program.
    pub labpod: PathBuf,
}

impl Binaries {
    /// Finds the binaries next to the running executable (`target/<profile>/`,
    /// or its parent when running from `deps/`).
    pub fn locate() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut dir = exe
            .parent()
            .context("executable has no directory")?
            .to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let find = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if !path.exists() {
                bail!("{} is missing; run `cargo build` first", path.display());
            }
            Ok(path)
        };
        Ok(Self {
            agent: find("lb-agent")?,
            lbctl: find("lbctl")?,
            labpod: find("labpod")?,
        })
    }
}

/// An agent started for one node; killed on drop.
pub struct Agent {
    child: Child,
    /// Its log file (stderr).
    pub log: PathBuf,
    /// The manifest directory it watches.
    pub manifests: PathBuf,
    bpffs: PathBuf,
    lbctl: PathBuf,
}

impl Agent {
    /// Starts lb-agent for `node` in the node's network namespace (as a
    /// hostNetwork DaemonSet pod runs), watching a fresh manifest directory,
    /// and waits until its programs are attached.
    pub fn start(lab: &Lab, bins: &Binaries, node: &Node) -> Result<Self> {
        Self::start_with(lab, bins, node, &[])
    }

    /// [`Agent::start`] with extra command-line arguments.
    pub fn start_with(lab: &Lab, bins: &Binaries, node: &Node, extra: &[&str]) -> Result<Self> {
        let command = lab.command_in(node, &bins.agent)?;
        Self::start_command(command, lab, bins, node, extra)
    }

    /// [`Agent::start_with`] without the capability `capability` (as
    /// `setpriv` names it, e.g. `sys_ptrace`), as a DaemonSet that does not
    /// grant it runs the agent.
    pub fn start_without_capability(
        lab: &Lab,
        bins: &Binaries,
        node: &Node,
        capability: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut command = lab.command_in(node, "setpriv")?;
        let dropped = format!("-{capability}");
        command
            .args(["--bounding-set", &dropped, "--inh-caps", &dropped, "--"])
            .arg(&bins.agent);
        Self::start_command(command, lab, bins, node, extra)
    }

    /// Starts `command` (the agent, in the node's namespace) with a fresh
    /// manifest directory and `extra` arguments.
    fn start_command(
        mut command: Command,
        lab: &Lab,
        bins: &Binaries,
        node: &Node,
        extra: &[&str],
    ) -> Result<Self> {
        let manifests = lab.work_dir().join(format!("{}-manifests", node.name));
        fs::create_dir_all(&manifests)?;
        // The lab's probes ask for /metrics from pods: on every address, as
        // a cluster with Prometheus elsewhere configures it.
        command
            .arg("--manifests")
            .arg(&manifests)
            .args(["--metrics-address", "0.0.0.0:10249"])
            .args(extra);
        Self::spawn(command, lab, bins, node, manifests, Duration::from_secs(20))
    }

    /// Starts lb-agent for `node` with the Kubernetes API server of
    /// `kubeconfig` as its source of intent, and waits until the first
    /// snapshot from the API is reconciled and its programs are attached.
    ///
    /// The e2e control plane listens on 127.0.0.1 of the root network
    /// namespace, so this agent runs there (not in the node's namespace);
    /// what it programs still applies to the node's cgroup, where the node's
    /// pods run. Metrics and `/healthz` listen on ephemeral ports of
    /// 127.0.0.1 so that agents of parallel tests do not collide. `manifests`
    /// is empty: this agent reads no manifest directory.
    pub fn start_api(lab: &Lab, bins: &Binaries, node: &Node, kubeconfig: &Path) -> Result<Self> {
        Self::start_api_with(lab, bins, node, kubeconfig, &[])
    }

    /// [`Agent::start_api`] with extra command-line arguments.
    pub fn start_api_with(
        lab: &Lab,
        bins: &Binaries,
        node: &Node,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_api_ready_within(lab, bins, node, kubeconfig, extra, Duration::from_secs(30))
    }

    /// [`Agent::start_api_with`], waiting up to `ready_within` for it to be
    /// ready (a large cluster takes longer to list).
    pub fn start_api_ready_within(
        lab: &Lab,
        bins: &Binaries,
        node: &Node,
        kubeconfig: &Path,
        extra: &[&str],
        ready_within: Duration,
    ) -> Result<Self> {
        let mut command = Command::new(&bins.agent);
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", &node.name])
            .args(["--metrics-address", "127.0.0.1:0"])
            .args(["--healthz-address", "127.0.0.1:0"])
            .args(extra);
        Self::spawn(command, lab, bins, node, PathBuf::new(), ready_within)
    }

    /// Adds the node's cgroup and bpffs directory to `command`, starts it with
    /// its log in the lab's work directory, and waits for "ready:".
    fn spawn(
        mut command: Command,
        lab: &Lab,
        bins: &Binaries,
        node: &Node,
        manifests: PathBuf,
        ready_within: Duration,
    ) -> Result<Self> {
        let log = lab.work_dir().join(format!("{}-agent.log", node.name));
        let child = command
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpffs-dir")
            .arg(&node.bpffs)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting lb-agent")?;
        let agent = Self {
            child,
            log,
            manifests,
            bpffs: node.bpffs.clone(),
            lbctl: bins.lbctl.clone(),
        };
        agent.wait_for_log("ready:", ready_within)?;
        Ok(agent)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent log never showed {needle:?}:\n{}", self.log_text())
    }

    /// Writes a manifest file atomically (write then rename), as a tool should.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let staging = self.manifests.join(format!(".{name}.tmp"));
        fs::write(&staging, text)?;
        fs::rename(&staging, self.manifests.join(name))?;
        Ok(())
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        fs::remove_file(self.manifests.join(name))?;
        Ok(())
    }

    /// `lbctl service list` for this node.
    pub fn service_list(&self) -> Result<String> {
        lbctl(&self.lbctl, &self.bpffs, &["service", "list"])
    }

    /// `lbctl socket list`: the open sockets the socket path translated.
    pub fn socket_list(&self) -> Result<String> {
        lbctl(&self.lbctl, &self.bpffs, &["socket", "list"])
    }

    /// Waits until `lbctl service list` satisfies `check`.
    pub fn wait_for_services(
        &self,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let table = self.service_list()?;
            if check(&table) {
                return Ok(table);
            }
            if Instant::now() > deadline {
                bail!(
                    "services never reached the expected state:\n{table}\nagent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs lbctl against a bpffs directory.
pub fn lbctl(lbctl: &Path, bpffs: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(lbctl)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "lbctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
