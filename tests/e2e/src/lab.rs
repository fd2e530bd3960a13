//! The lab: nodes and pods as network namespaces on one kernel.
//!
//! - A "fabric" namespace holds a bridge that every node's uplink joins.
//! - A node is a namespace with an uplink on the fabric, IP forwarding on, and
//!   a cgroup of its own where its pods' processes run.
//! - A pod is a namespace joined to its node by a veth pair: the pod has a /32
//!   address and a default route via a link-local gateway, the node has a /32
//!   route to the pod (routed pod networking, like Calico or Cilium native
//!   routing).
//!
//! Every resource is named after the lab id (`<pid>-<n>`), so labs in parallel
//! never collide; dropping the lab removes everything, and [`Lab::new`] first
//! removes what labs of dead processes left behind.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// Prefix of every lab resource name.
const PREFIX: &str = "lbt";
/// Gateway address every pod routes through; the node side of each pod veth holds it.
const POD_GATEWAY: &str = "169.254.1.1";
const POD_GATEWAY6: &str = "fe80::1";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A node of the lab.
#[derive(Clone, Debug)]
pub struct Node {
    /// Short name, e.g. `node1`.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Address on the fabric.
    pub ip: String,
    /// cgroup v2 directory of the node: its pods' processes run below it and
    /// its socket-level programs attach to it.
    pub cgroup: PathBuf,
    /// bpffs directory for this node's agent.
    pub bpffs: PathBuf,
    index: u8,
}

/// Somewhere a process can run: a network namespace plus a cgroup.
pub trait Place {
    /// Display name.
    fn name(&self) -> &str;
    /// Network namespace name.
    fn netns(&self) -> &str;
    /// cgroup v2 directory for the process.
    fn cgroup(&self) -> PathBuf;
}

impl Place for Pod {
    fn name(&self) -> &str {
        &self.name
    }
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> PathBuf {
        self.cgroup.clone()
    }
}

/// A node's own processes (host network namespace) run in its `host` cgroup,
/// below the node cgroup, so the node's programs apply to them too.
impl Place for Node {
    fn name(&self) -> &str {
        &self.name
    }
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> PathBuf {
        self.cgroup.join("host")
    }
}

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short name, e.g. `web-1`.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// IPv4 address.
    pub ip: String,
    /// IPv6 address.
    pub ip6: String,
    /// cgroup of the pod (below its node's).
    pub cgroup: PathBuf,
}

/// A lab; everything it created is removed on drop.
pub struct Lab {
    id: String,
    fabric: String,
    cgroup_dir: PathBuf,
    bpffs_dir: PathBuf,
    work_dir: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    pods_per_node: BTreeMap<u8, u8>,
    children: Mutex<Vec<Child>>,
    /// Tells the relays of [`Lab::forward_to_root`] to stop.
    relays_stop: Arc<AtomicBool>,
}

/// Spawns `command` and waits until a line of its output contains `needle`;
/// the rest of its output is drained in the background.
pub fn spawn_until(mut command: Command, what: &str, needle: &str) -> Result<Child> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut reader = BufReader::new(child.stdout.take().expect("piped"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} exited before printing {needle:?}: {seen:?}");
        }
        seen.push_str(&line);
        if line.contains(needle) {
            break;
        }
    }
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    Ok(child)
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs a batch of `ip` commands in one namespace.
fn ip_batch(netns: &str, commands: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ip")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(commands.join("\n").as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "ip -n {netns} batch failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr).trim(),
            commands.join("\n")
        );
    }
    Ok(())
}

/// Writes a sysctl inside a namespace.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )?;
    Ok(())
}

fn cgroup_root() -> Result<PathBuf> {
    lb_agent::node::mounts::cgroup2_root()?.context("no cgroup v2 mount")
}

/// Makes sure bpffs is mounted at /sys/fs/bpf.
pub fn ensure_bpffs() -> Result<()> {
    if !lb_agent::node::mounts::is_on_fs(Path::new("/sys/fs/bpf"), "bpf")? {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid a lab resource name was made by, if it is a lab name.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Kills every process of a cgroup tree and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // Killed processes take a moment to leave the cgroup.
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn delete_netns(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) with a pid read from the kernel; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// Removes what labs of processes that no longer exist left behind.
fn clean_stale() -> Result<()> {
    let output = run("ip", &["netns", "list"])?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) {
            delete_netns(name);
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    for base in [
        cgroup_root()?.join(PREFIX),
        PathBuf::from("/sys/fs/bpf").join(PREFIX),
    ] {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = format!("{PREFIX}-{}", entry.file_name().to_string_lossy());
            if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                if base.starts_with("/sys/fs/bpf") {
                    let _ = fs::remove_dir_all(entry.path());
                } else {
                    remove_cgroup_tree(&entry.path());
                }
            }
        }
    }
    Ok(())
}

impl Lab {
    /// Creates an empty lab (the fabric), after cleaning up crashed runs.
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        clean_stale()?;
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::SeqCst)
        );
        let fabric = format!("{PREFIX}-{id}-fabric");
        let cgroup_dir = cgroup_root()?.join(PREFIX).join(&id);
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(PREFIX).join(&id);
        let work_dir = std::env::temp_dir().join(format!("{PREFIX}-{id}"));
        let lab = Self {
            id,
            fabric: fabric.clone(),
            cgroup_dir,
            bpffs_dir,
            work_dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            pods_per_node: BTreeMap::new(),
            children: Mutex::new(Vec::new()),
            relays_stop: Arc::new(AtomicBool::new(false)),
        };
        run("ip", &["netns", "add", &fabric])?;
        ip_batch(
            &fabric,
            &[
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
                "link set lo up".into(),
            ],
        )?;
        fs::create_dir_all(&lab.cgroup_dir)?;
        fs::create_dir_all(&lab.work_dir)?;
        Ok(lab)
    }

    /// A scratch directory (manifests, logs) removed with the lab.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The lab's unique id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Adds a node with address 192.168.100.N on the fabric.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        let index = u8::try_from(self.nodes.len() + 1).context("too many nodes")?;
        let netns = format!("{PREFIX}-{}-{name}", self.id);
        let ip = format!("192.168.100.{index}");
        run("ip", &["netns", "add", &netns])?;
        let uplink = format!("n{index}");
        ip_batch(
            &self.fabric,
            &[
                format!("link add {uplink} type veth peer name eth0 netns {netns}"),
                format!("link set {uplink} master br0 up"),
            ],
        )?;
        ip_batch(
            &netns,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {ip}/24 dev eth0"),
                format!("addr add fd00:100::{index}/64 dev eth0 nodad"),
            ],
        )?;
        sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
        // Routed pod networking: every node reaches every other node's pod
        // range through that node's fabric address.
        for other in &self.nodes {
            ip_batch(
                &netns,
                &[
                    format!("route add 10.244.{}.0/24 via {}", other.index, other.ip),
                    format!(
                        "route add fd00:244:{}::/64 via fd00:100::{}",
                        other.index, other.index
                    ),
                ],
            )?;
            ip_batch(
                &other.netns,
                &[
                    format!("route add 10.244.{index}.0/24 via {ip}"),
                    format!("route add fd00:244:{index}::/64 via fd00:100::{index}"),
                ],
            )?;
        }
        let cgroup = self.cgroup_dir.join(name);
        fs::create_dir_all(cgroup.join("host"))?;
        let bpffs = self.bpffs_dir.join(name);
        let node = Node {
            name: name.into(),
            netns,
            ip,
            cgroup,
            bpffs,
            index,
        };
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Adds a pod on `node` with addresses 10.244.<node>.<n> and fd00:244:<node>::<n>.
    pub fn add_pod(&mut self, node: &Node, name: &str) -> Result<Pod> {
        let count = self.pods_per_node.entry(node.index).or_insert(1);
        *count += 1;
        let n = *count;
        let netns = format!("{PREFIX}-{}-{}-{name}", self.id, node.name);
        let ip = format!("10.244.{}.{n}", node.index);
        let ip6 = format!("fd00:244:{}::{n}", node.index);
        let host_if = format!("p{n}");
        run("ip", &["netns", "add", &netns])?;
        ip_batch(
            &node.netns,
            &[
                format!("link add {host_if} type veth peer name eth0 netns {netns}"),
                format!("link set {host_if} up"),
                format!("addr add {POD_GATEWAY}/32 dev {host_if}"),
                format!("addr add {POD_GATEWAY6}/64 dev {host_if} nodad"),
                format!("route add {ip}/32 dev {host_if}"),
                format!("route add {ip6}/128 dev {host_if}"),
            ],
        )?;
        let addresses = [
            format!("addr add {ip}/32 dev eth0"),
            format!("addr add {ip6}/128 dev eth0 nodad"),
            format!("route add {POD_GATEWAY} dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
            format!("route add ::/0 via {POD_GATEWAY6} dev eth0"),
        ];
        // Named like the kubelet's pod cgroups (pod<uid>), with the pod name
        // standing in for the UID.
        let cgroup = node.cgroup.join(format!("pod{name}"));
        self.finish_host(name, netns, (ip, ip6), &addresses, cgroup)
    }

    /// Brings up a host's `eth0` with `addresses` (ip commands), creates its
    /// cgroup and records it.
    fn finish_host(
        &mut self,
        name: &str,
        netns: String,
        (ip, ip6): (String, String),
        addresses: &[String],
        cgroup: PathBuf,
    ) -> Result<Pod> {
        let mut commands = vec!["link set lo up".to_string(), "link set eth0 up".to_string()];
        commands.extend_from_slice(addresses);
        ip_batch(&netns, &commands)?;
        fs::create_dir_all(&cgroup)?;
        let pod = Pod {
            name: name.into(),
            netns,
            ip,
            ip6,
            cgroup,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds a host outside the cluster on the fabric (192.168.100.200,
    /// fd00:100::200): it reaches node addresses only, and no node's programs
    /// apply to its sockets.
    pub fn add_external_client(&mut self, name: &str) -> Result<Pod> {
        let netns = format!("{PREFIX}-{}-{name}", self.id);
        run("ip", &["netns", "add", &netns])?;
        ip_batch(
            &self.fabric,
            &[
                format!(
                    "link add x{} type veth peer name eth0 netns {netns}",
                    self.pods.len()
                ),
                format!("link set x{} master br0 up", self.pods.len()),
            ],
        )?;
        let (ip, ip6) = ("192.168.100.200".to_string(), "fd00:100::200".to_string());
        let addresses = [
            format!("addr add {ip}/24 dev eth0"),
            format!("addr add {ip6}/64 dev eth0 nodad"),
        ];
        let cgroup = self.cgroup_dir.join(name);
        self.finish_host(name, netns, (ip, ip6), &addresses, cgroup)
    }

    /// Adds a host outside the cluster one routed hop away (198.51.100.7):
    /// the fabric routes between the nodes' subnet (as 192.168.100.254) and
    /// the client's, over a link whose MTU towards the client is `mtu`, so a
    /// larger packet for the client draws "fragmentation needed" from the
    /// fabric, as from a router on the way. Every node added so far gets a
    /// route to the client's subnet (IPv4 only).
    pub fn add_routed_client(&mut self, name: &str, mtu: u32) -> Result<Pod> {
        let netns = format!("{PREFIX}-{}-{name}", self.id);
        run("ip", &["netns", "add", &netns])?;
        let link = format!("r{}", self.pods.len());
        ip_batch(
            &self.fabric,
            &[
                format!("link add {link} type veth peer name eth0 netns {netns}"),
                format!("link set {link} mtu {mtu} up"),
                format!("addr add 198.51.100.1/24 dev {link}"),
                "addr add 192.168.100.254/24 dev br0".to_string(),
            ],
        )?;
        sysctl(&self.fabric, "net.ipv4.ip_forward", "1")?;
        for node in &self.nodes {
            ip_batch(
                &node.netns,
                &["route add 198.51.100.0/24 via 192.168.100.254".to_string()],
            )?;
        }
        let addresses = [
            "addr add 198.51.100.7/24 dev eth0".to_string(),
            "route add default via 198.51.100.1".to_string(),
        ];
        let cgroup = self.cgroup_dir.join(name);
        self.finish_host(
            name,
            netns,
            ("198.51.100.7".to_string(), String::new()),
            &addresses,
            cgroup,
        )
    }

    /// A command that runs inside a place's network namespace and cgroup.
    pub fn command_in(
        &self,
        place: &dyn Place,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let netns = fs::File::open(format!("/var/run/netns/{}", place.netns()))
            .with_context(|| format!("netns of {}", place.name()))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(place.cgroup().join("cgroup.procs"))
            .with_context(|| format!("cgroup of {}", place.name()))?;
        let mut command = Command::new(program);
        // SAFETY: between fork and exec the closure only makes raw syscalls
        // (write, setns) on descriptors opened before the fork, which stay valid
        // because the closure owns them; no allocation, no locks.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts a long-running program in a place and waits until it prints
    /// "ready". The lab kills it on drop.
    pub fn spawn_server(&self, place: &dyn Place, program: &Path, args: &[&str]) -> Result<()> {
        self.spawn_in(place, program, args, "ready")
    }

    /// Starts a long-running program in a place and waits until a line of
    /// its output contains `needle`. The lab kills it on drop.
    pub fn spawn_in(
        &self,
        place: &dyn Place,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        needle: &str,
    ) -> Result<()> {
        let what = format!("{} in {}", program.as_ref().to_string_lossy(), place.name());
        let mut command = self.command_in(place, program)?;
        command.args(args);
        let child = spawn_until(command, &what, needle)?;
        self.children.lock().expect("not poisoned").push(child);
        Ok(())
    }

    /// Runs a program in a place to completion and returns its output.
    pub fn run_in(&self, place: &dyn Place, program: &Path, args: &[&str]) -> Result<Output> {
        let output = self.command_in(place, program)?.args(args).output()?;
        if !output.status.success() {
            bail!(
                "{} {} in {}: {}",
                program.display(),
                args.join(" "),
                place.name(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }
}

/// Copies one direction of a relayed connection, then closes the other
/// side's writing half so that the peer sees the end.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Lab {
    /// Runs `f` on a thread of its own in `place`'s network namespace
    /// (setns(2) changes the calling thread only); the sockets it makes stay
    /// in that namespace.
    fn in_netns<T: Send + 'static>(
        place: &dyn Place,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let netns = fs::File::open(format!("/var/run/netns/{}", place.netns()))
            .with_context(|| format!("netns of {}", place.name()))?;
        std::thread::spawn(move || -> std::io::Result<T> {
            // SAFETY: setns(2) on a descriptor this closure owns, for this
            // short-lived thread only; no memory is involved.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {}'s namespace panicked", place.name()))?
        .with_context(|| format!("in {}", place.name()))
    }

    /// Opens a TCP connection from `place`'s network namespace to `target`,
    /// as a process there would.
    pub fn tcp_connect_from(&self, place: &dyn Place, target: SocketAddr) -> Result<TcpStream> {
        Self::in_netns(place, move || {
            TcpStream::connect_timeout(&target, std::time::Duration::from_secs(3))
        })
    }

    /// Makes `target`, an address of this process's own network namespace
    /// (such as the e2e API server on 127.0.0.1 of the root namespace),
    /// reachable from `place`: returns the address of a listener on
    /// 127.0.0.1 in `place`'s network namespace whose connections are
    /// relayed to `target`. A process of a node (an agent running there
    /// as a hostNetwork DaemonSet pod does) then reaches the API server as
    /// on a real node. Relays until the lab is dropped.
    pub fn forward_to_root(&self, place: &dyn Place, target: SocketAddr) -> Result<SocketAddr> {
        let listener = Self::in_netns(place, || TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = self.relays_stop.clone();
        std::thread::Builder::new()
            .name(format!("relay-{}", place.name()))
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((inbound, _)) => {
                            let Ok(outbound) = TcpStream::connect(target) else {
                                continue;
                            };
                            let (Ok(()), Ok(in2), Ok(out2)) = (
                                inbound.set_nonblocking(false),
                                inbound.try_clone(),
                                outbound.try_clone(),
                            ) else {
                                continue;
                            };
                            std::thread::spawn(move || pump(inbound, outbound));
                            std::thread::spawn(move || pump(out2, in2));
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => return,
                    }
                }
            })?;
        Ok(address)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.relays_stop.store(true, Ordering::SeqCst);
        for child in self.children.get_mut().expect("not poisoned").iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            delete_netns(&pod.netns);
        }
        for node in &self.nodes {
            delete_netns(&node.netns);
        }
        delete_netns(&self.fabric);
        remove_cgroup_tree(&self.cgroup_dir);
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_carry_their_owner_pid() {
        assert_eq!(owner_pid("lbt-1234-0-fabric"), Some(1234));
        assert_eq!(owner_pid("lbt-77-3-node1-web-1"), Some(77));
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(owner_pid("lbtx-1"), None);
    }
}
