//! A ready-made lab for scenario tests: one node running the agent, server
//! pods and a client pod.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    agent::{Agent, Binaries},
    lab::{Lab, Node, Place, Pod},
    probe::{http_get, metric_value, parse_attempts, Attempt},
};

/// Ports every server pod listens on: TCP 8080 and 9090, UDP 8080.
pub const SERVER_ARGS: [&str; 6] = ["--tcp", "8080", "--tcp", "9090", "--udp", "8080"];

/// Fields drop in order: the agent stops before the lab is torn down.
pub struct Scenario {
    /// The node's agent.
    pub agent: Agent,
    /// The workspace binaries.
    pub bins: Binaries,
    /// The node.
    pub node: Node,
    /// Server pods `web-1`..`web-N`.
    pub servers: Vec<Pod>,
    /// The client pod.
    pub client: Pod,
    /// The lab itself.
    pub lab: Lab,
}

/// Whether this process runs as root; the scenarios need it and say so.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, cgroups, BPF); run it as root, \
         as `make test` does"
    );
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

impl Scenario {
    /// One node (`node1`), `servers` server pods and a client pod, with the
    /// agent started with `agent_args`.
    pub fn new(servers: usize, agent_args: &[&str]) -> Result<Self> {
        Self::new_with_agent(servers, |lab, bins, node| {
            Agent::start_with(lab, bins, node, agent_args)
        })
    }

    /// [`Scenario::new`] with the agent started by `start`.
    pub fn new_with_agent(
        servers: usize,
        start: impl FnOnce(&Lab, &Binaries, &Node) -> Result<Agent>,
    ) -> Result<Self> {
        require_root();
        let bins = Binaries::locate()?;
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1")?;
        let mut pods = Vec::new();
        for i in 1..=servers {
            let pod = lab.add_pod(&node, &format!("web-{i}"))?;
            let mut args = vec!["serve", "--name", &pod.name];
            args.extend(SERVER_ARGS);
            lab.spawn_server(&pod, &bins.labpod, &args)?;
            pods.push(pod);
        }
        let client = lab.add_pod(&node, "client")?;
        let agent = start(&lab, &bins, &node)?;
        Ok(Self {
            agent,
            bins,
            node,
            servers: pods,
            client,
            lab,
        })
    }

    /// Runs `labpod connect --target TARGET ARGS...` from `from`.
    pub fn connect_from(
        &self,
        from: &dyn Place,
        target: &str,
        args: &[&str],
    ) -> Result<Vec<Attempt>> {
        let mut all = vec!["connect", "--target", target];
        all.extend(args);
        let output = self.lab.run_in(from, &self.bins.labpod, &all)?;
        parse_attempts(&output.stdout)
    }

    /// Runs `labpod connect` from the client pod, `count` times.
    pub fn connect(&self, target: &str, count: u32, args: &[&str]) -> Result<Vec<Attempt>> {
        let count = count.to_string();
        let mut all = vec!["--count", count.as_str()];
        all.extend(args);
        self.connect_from(&self.client, target, &all)
    }

    /// Writes manifests and waits until `lbctl service list` satisfies `check`.
    pub fn apply(&self, file: &str, text: &str, check: impl Fn(&str) -> bool) -> Result<String> {
        self.agent.write_manifest(file, text)?;
        self.agent.wait_for_services(Duration::from_secs(10), check)
    }

    /// The agent's `/metrics` (port 10249 on the node, fetched from the
    /// client pod).
    pub fn metrics(&self) -> Result<String> {
        let url = format!("http://{}:10249/metrics", self.node.ip);
        Ok(http_get(&self.client.netns, &url)?.1)
    }

    /// The value of the agent's metric `series` (name and labels, e.g.
    /// `lb_tc_packets{outcome="new_flow"}`).
    pub fn metric(&self, series: &str) -> Result<f64> {
        let metrics = self.metrics()?;
        metric_value(&metrics, series)
            .with_context(|| format!("no {series} in /metrics:\n{metrics}"))
    }

    /// Waits until the agent's `/metrics` has the exact line `line`.
    pub fn wait_for_metric(&self, line: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = self.metrics()?;
            if metrics.lines().any(|l| l == line) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no line {line:?} in /metrics:\n{metrics}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The IPv4 address of server `web-i` (1-based).
    pub fn ip(&self, i: usize) -> &str {
        &self.servers[i - 1].ip
    }

    /// The IPv6 address of server `web-i` (1-based).
    pub fn ip6(&self, i: usize) -> &str {
        &self.servers[i - 1].ip6
    }
}
