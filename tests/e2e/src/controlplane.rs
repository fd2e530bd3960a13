//! A real Kubernetes control plane for end-to-end tests: etcd,
//! kube-apiserver and kube-controller-manager (with the real EndpointSlice
//! controller) on 127.0.0.1 of the root network namespace, started by
//! `scripts/k8s-controlplane.sh` from the binary it builds and caches.
//!
//! Each control plane lives in a directory `lbt-k8s-<pid>-<n>` in the temp
//! dir (certificates, etcd data, logs, `kubeconfig`, `bin/kubectl`). Ports are
//! picked by the script, so control planes of parallel tests do not collide.
//! [`ControlPlane`] stops its processes on drop; the one of
//! [`ControlPlane::shared`] when the process exits. The components run
//! detached (they outlive a crashed test), so [`ControlPlane::start`] first
//! stops and removes the control planes of test processes that no longer
//! exist. (The directory name is deliberately not of the lab's
//! `lbt-<pid>-...` form: the lab's own clean-up would delete the directory,
//! with the list of pids to stop, before this module could stop them.)

use std::{
    ffi::OsStr,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Directory-name prefix of control planes started by this module.
const PREFIX: &str = "lbt-k8s-";

static NEXT: AtomicU32 = AtomicU32::new(0);
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// `scripts/k8s-controlplane.sh` of this workspace.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/k8s-controlplane.sh")
}

/// The script needs `go` for its build key even when the binary is cached;
/// Go lives in /usr/local/go on these machines, which is not always on PATH.
fn script_command() -> Command {
    let mut command = Command::new(script());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let has_go = std::env::split_paths(&path).any(|dir| dir.join("go").is_file());
    if !has_go && Path::new("/usr/local/go/bin/go").is_file() {
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.push("/usr/local/go/bin".into());
        if let Ok(joined) = std::env::join_paths(dirs) {
            command.env("PATH", joined);
        }
    }
    command
}

/// Runs the script with `args`; fails with its output when it fails.
fn run_script(args: &[&OsStr]) -> Result<Output> {
    let output = script_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running scripts/k8s-controlplane.sh")?;
    if !output.status.success() {
        bail!(
            "k8s-controlplane.sh {}: {}{}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// The pid a control-plane directory name was made by.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Stops and removes the control planes of test processes that are gone.
fn clean_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = run_script(&["stop".as_ref(), entry.path().as_os_str()]);
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// A running control plane; stopped (and its directory removed) on drop.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane of its own in a fresh directory and waits until
    /// it serves (kube-apiserver ready, the `default` ServiceAccount exists).
    /// Takes about 10-20 s; builds the binary first if it is not cached (minutes).
    pub fn start() -> Result<Self> {
        clean_stale();
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir)?;
        let plane = Self {
            kubeconfig: dir.join("kubeconfig"),
            kubectl: dir.join("bin/kubectl"),
            dir,
        };
        // On failure `plane` drops here: whatever started is stopped.
        plane.resume()?;
        Ok(plane)
    }

    /// One control plane shared by every test of this process that asks for
    /// it, started on first use and stopped when the process exits. Tests
    /// sharing it must keep to their own namespaces (and Node names), and
    /// must not stop it.
    pub fn shared() -> Result<&'static Self> {
        let shared = SHARED.get_or_init(|| {
            let plane = Self::start().map_err(|e| format!("{e:#}"))?;
            // SAFETY: registers a plain function without arguments; it runs
            // at process exit (libtest exits through exit(3) on success and
            // on failure).
            unsafe { libc::atexit(stop_shared) };
            Ok(plane)
        });
        shared
            .as_ref()
            .map_err(|e| anyhow::anyhow!("starting the shared control plane: {e}"))
    }

    /// The control plane's directory (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin (system:masters) kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// kubectl of the same release.
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> Result<String> {
        let env = fs::read_to_string(self.dir.join("env"))?;
        env.lines()
            .find_map(|l| l.strip_prefix("K8S_API_SERVER="))
            .map(str::to_owned)
            .context("no K8S_API_SERVER in the control plane's env file")
    }

    /// Stops every component (an API server outage); data, certificates and
    /// ports are kept for [`ControlPlane::resume`].
    pub fn stop(&self) -> Result<()> {
        run_script(&["stop".as_ref(), self.dir.as_os_str()])?;
        Ok(())
    }

    /// Starts the components again on the same data (and the same ports if
    /// they are still free) and waits until the API server is ready.
    pub fn resume(&self) -> Result<()> {
        run_script(&["start".as_ref(), self.dir.as_os_str()])
            .map_err(|err| err.context(self.log_tails()))?;
        Ok(())
    }

    /// The last lines of each component's log, for error messages.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        let Ok(entries) = fs::read_dir(self.dir.join("logs")) else {
            return text;
        };
        for entry in entries.flatten() {
            let log = fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            text.push_str(&format!(
                "--- {}:\n{}\n",
                entry.file_name().to_string_lossy(),
                tail.join("\n")
            ));
        }
        text
    }

    /// Runs kubectl with the admin kubeconfig; returns its stdout, fails with
    /// its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// Runs kubectl with the admin kubeconfig and returns its output,
    /// whatever its exit status (`kubectl auth can-i` answers "no" with 1).
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// [`ControlPlane::kubectl`] with `input` on stdin (for `apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// `kubectl apply -f -` of `yaml` in `namespace`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> Result<String> {
        self.kubectl_with_input(&["apply", "-n", namespace, "-f", "-"], Some(yaml))
    }

    /// Creates a namespace and waits until Pods can be created in it (its
    /// `default` ServiceAccount exists).
    pub fn create_namespace(&self, namespace: &str) -> Result<()> {
        self.kubectl(&["create", "namespace", namespace])?;
        self.wait_for_service_account(namespace, Duration::from_secs(60))
    }

    /// Waits until the ServiceAccount controller made `namespace/default`.
    pub fn wait_for_service_account(&self, namespace: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.kubectl(&["get", "serviceaccount", "default", "-n", namespace]) {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() > deadline => {
                    return Err(err.context(format!("no default ServiceAccount in {namespace}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Stops the components and removes the directory (kept, with its logs,
    /// when a test is failing: the next run removes it).
    fn shutdown(&self) {
        let _ = run_script(&["stop".as_ref(), self.dir.as_os_str()]);
        if std::thread::panicking() {
            eprintln!(
                "control plane logs kept in {}",
                self.dir.join("logs").display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

extern "C" fn stop_shared() {
    if let Some(Ok(plane)) = SHARED.get() {
        plane.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_dirs_carry_their_owner_pid() {
        assert_eq!(owner_pid("lbt-k8s-1234-0"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-0"), None);
        assert_eq!(owner_pid("lbt-k8s-x"), None);
    }
}
