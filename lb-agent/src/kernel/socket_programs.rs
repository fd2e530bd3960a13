//! The socket path's programs (cgroup `sock_addr` and `sock` hooks, crate
//! `socket-lb`): loaded with their maps pinned in bpffs, configured, attached
//! to a cgroup with pinned links, and the cgroups that opted out of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{links::CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError},
    Ebpf, EbpfLoader,
};
use lb_common::{
    config::SockConfig,
    maps,
    net::Addr,
    outcome::{Counted, Outcome},
};
use tracing::info;

use super::{
    capacities::MapCapacities,
    ignore_missing, pins,
    service_maps::{MapSource, ServiceCapacities, SocketMaps},
    KernelError, OnMap,
};

/// The socket-level programs, built by `build.rs`.
static SOCKET_LB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-socket"));

/// `cgroup/sock_addr` programs of the socket object.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];
/// `cgroup/sock` programs of the socket object.
const SOCK_PROGRAMS: [&str; 1] = ["sock_release"];

/// The first Linux release with the cgroup hook of the socket program
/// `name`.
fn hook_since(name: &str) -> &'static str {
    match name {
        "connect4" | "connect6" => "4.17",
        "sendmsg4" | "sendmsg6" => "4.18",
        "recvmsg4" | "recvmsg6" => "5.2",
        "getpeername4" | "getpeername6" => "5.8",
        _ => "5.9",
    }
}

/// A load or attach failure of the socket program `name`, with the kernel
/// its hook needs and the running one's release.
fn hook_error(name: &'static str, source: ProgramError) -> KernelError {
    let running = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    KernelError::Hook {
        name,
        since: hook_since(name),
        running,
        source: Box::new(source),
    }
}

/// The first `len` counters of a per-CPU array, each summed over CPUs.
pub(crate) fn counter_sums(
    counters: &PerCpuArray<MapData, u64>,
    name: &'static str,
    outcomes: impl Iterator<Item = Outcome>,
) -> Result<Vec<(Outcome, u64)>, KernelError> {
    outcomes
        .map(|outcome| {
            counters
                .get(&outcome.index(), 0)
                .map(|values| (outcome, values.iter().sum()))
                .on(name)
        })
        .collect()
}

/// The loaded socket programs.
pub struct SocketPrograms {
    ebpf: Ebpf,
    /// Refusals by outcome (not pinned: they count from load).
    counters: PerCpuArray<MapData, u64>,
    opt_out: HashMap<MapData, u64, u32>,
    opt_out_count: Array<MapData, u32>,
    cgroup_endpoints: HashMap<MapData, u64, Addr>,
    pod_netns: HashMap<MapData, u64, u32>,
    pin_dir: std::path::PathBuf,
}

impl SocketPrograms {
    /// Loads the programs, creating the maps or reusing the ones pinned in
    /// `pin_dir` by a previous agent, so an upgrade keeps every entry.
    /// Returns them with the maps plans write.
    pub fn load(
        pin_dir: &Path,
        capacities: &ServiceCapacities,
        sized: &MapCapacities,
    ) -> Result<(Self, SocketMaps), KernelError> {
        pins::prepare(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        capacities.apply(&mut loader);
        sized.apply(&mut loader);
        let mut ebpf = loader
            .load(SOCKET_LB_OBJECT)
            .map_err(|source| KernelError::Load {
                object: "socket",
                source,
            })?;
        let service_maps = SocketMaps::take(&mut ebpf)?;
        let counters = PerCpuArray::try_from(ebpf.open(maps::SOCK_STATS)?).on(maps::SOCK_STATS)?;
        let opt_out = HashMap::try_from(ebpf.open(maps::OPT_OUT)?).on(maps::OPT_OUT)?;
        let opt_out_count =
            Array::try_from(ebpf.open(maps::OPT_OUT_COUNT)?).on(maps::OPT_OUT_COUNT)?;
        let cgroup_endpoints =
            HashMap::try_from(ebpf.open(maps::CGROUP_ENDPOINTS)?).on(maps::CGROUP_ENDPOINTS)?;
        let pod_netns = HashMap::try_from(ebpf.open(maps::POD_NETNS)?).on(maps::POD_NETNS)?;
        let mut programs = Self {
            ebpf,
            counters,
            opt_out,
            opt_out_count,
            cgroup_endpoints,
            pod_netns,
            pin_dir: pin_dir.to_path_buf(),
        };
        programs.sync_opt_out_count()?;
        Ok((programs, service_maps))
    }

    /// Tells the programs which network namespace is the node's and which
    /// sockets they translate; before they are attached.
    pub fn configure(&mut self, config: SockConfig) -> Result<(), KernelError> {
        let name = maps::SOCK_CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(KernelError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let mut configs: Array<&mut MapData, SockConfig> = Array::try_from(map).on(name)?;
        configs.set(0, config, 0).on(name)
    }

    /// The refusal counters, summed over CPUs.
    pub fn refusals(&self) -> Result<Vec<(Outcome, u64)>, KernelError> {
        let socket = Outcome::ALL
            .into_iter()
            .filter(|o| o.counted() == Counted::Socket);
        counter_sums(&self.counters, maps::SOCK_STATS, socket)
    }

    /// Attaches every program to `cgroup` and pins the links, replacing links
    /// a previous agent pinned. The new programs attach before the old links
    /// go away, so no connection is ever left untranslated; while both are
    /// attached the second sees an already translated address and passes it.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let cgroup_file = fs::File::open(cgroup).map_err(|source| KernelError::Io {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // With bpf_link (kernel >= 5.7) the kernel rejects attach flags and
        // always attaches in multi mode, so "Single" here still coexists with
        // other programs on the cgroup.
        let mode = CgroupAttachMode::Single;
        let link_err = |pin_dir: &Path, name: &str| {
            let path = pins::link_path(pin_dir, name);
            move |source| KernelError::Link { path, source }
        };
        // The two program kinds share no trait in aya; the steps are the same.
        macro_rules! attach_all {
            ($kind:ty, $names:expr) => {
                for name in $names {
                    let program_err = |source| KernelError::Program { name, source };
                    let program: &mut $kind = self
                        .ebpf
                        .program_mut(name)
                        .ok_or(KernelError::MissingProgram(name))?
                        .try_into()
                        .map_err(program_err)?;
                    program.load().map_err(|source| hook_error(name, source))?;
                    let link_id = program
                        .attach(&cgroup_file, mode)
                        .map_err(|source| hook_error(name, source))?;
                    let link = program.take_link(link_id).map_err(program_err)?;
                    let link = link.try_into().map_err(link_err(&self.pin_dir, name))?;
                    pins::replace_link(&self.pin_dir, name, link)?;
                }
            };
        }
        attach_all!(CgroupSockAddr, SOCK_ADDR_PROGRAMS);
        attach_all!(CgroupSock, SOCK_PROGRAMS);
        pins::remove_stale_maps(&self.pin_dir);
        Ok(())
    }

    /// Detaches the socket programs a previous agent attached (their pinned
    /// links), for a node where the socket path is turned off.
    pub fn detach(&self) -> Result<(), KernelError> {
        for name in SOCK_ADDR_PROGRAMS.iter().chain(&SOCK_PROGRAMS) {
            let pin = pins::link_path(&self.pin_dir, name);
            if pin.exists() {
                pins::remove(&pin)?;
                info!(program = %name, "detached socket program");
            }
        }
        Ok(())
    }

    /// Makes the set of cgroups whose sockets are not translated exactly
    /// `wanted` (cgroup ids). Returns whether anything changed.
    pub fn set_opt_out(&mut self, wanted: &BTreeSet<u64>) -> Result<bool, KernelError> {
        let changed = sync_set(&mut self.opt_out, maps::OPT_OUT, wanted)?;
        if changed {
            // Last: a count above the entries only costs the programs a
            // lookup that misses; one below them would skip opted-out
            // cgroups. Unchanged sets keep the count written before (or
            // synced at load).
            self.write_opt_out_count(wanted.len())?;
        }
        Ok(changed)
    }

    /// Makes the set of pods' network namespaces whose connected UDP
    /// sockets are translated per datagram exactly `wanted` (cookies).
    /// Returns whether anything changed.
    pub fn set_pod_netns(&mut self, wanted: &BTreeSet<u64>) -> Result<bool, KernelError> {
        sync_set(&mut self.pod_netns, maps::POD_NETNS, wanted)
    }

    /// Makes the map of this node's pods by cgroup hold exactly `wanted`
    /// (cgroup id -> the pod's address); returns whether anything changed.
    pub fn set_cgroup_endpoints(
        &mut self,
        wanted: &BTreeMap<u64, Addr>,
    ) -> Result<bool, KernelError> {
        let name = maps::CGROUP_ENDPOINTS;
        let present: BTreeMap<u64, Addr> = self
            .cgroup_endpoints
            .iter()
            .filter(|entry| !matches!(entry, Err(MapError::KeyNotFound)))
            .collect::<Result<_, _>>()
            .on(name)?;
        for (id, addr) in wanted {
            if present.get(id) != Some(addr) {
                self.cgroup_endpoints.insert(id, addr, 0).on(name)?;
            }
        }
        for id in present.keys().filter(|id| !wanted.contains_key(id)) {
            ignore_missing(self.cgroup_endpoints.remove(id)).on(name)?;
        }
        Ok(&present != wanted)
    }

    /// Tells the programs how many cgroups opted out (0: skip the lookup).
    fn write_opt_out_count(&mut self, count: usize) -> Result<(), KernelError> {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        self.opt_out_count.set(0, count, 0).on(maps::OPT_OUT_COUNT)
    }

    /// Sets the opt-out count from the entries a previous agent left, before
    /// any program of this agent runs.
    fn sync_opt_out_count(&mut self) -> Result<(), KernelError> {
        let entries = self
            .opt_out
            .keys()
            .try_fold(0, |n, key| key.map(|_| n + 1))
            .on(maps::OPT_OUT)?;
        self.write_opt_out_count(entries)
    }
}

/// Makes the set map `name` (key -> 1) hold exactly `wanted`; returns
/// whether anything changed.
fn sync_set(
    map: &mut HashMap<MapData, u64, u32>,
    name: &'static str,
    wanted: &BTreeSet<u64>,
) -> Result<bool, KernelError> {
    let present: BTreeSet<u64> = map.keys().collect::<Result<_, _>>().on(name)?;
    for key in wanted.difference(&present) {
        map.insert(key, 1, 0).on(name)?;
    }
    for key in present.difference(wanted) {
        ignore_missing(map.remove(key)).on(name)?;
    }
    Ok(&present != wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_hook_names_the_kernel_it_needs() {
        let refused = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_prog_load",
            io_error: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
        let message = hook_error("getpeername4", refused).to_string();
        assert!(
            message.contains("cgroup/getpeername4 hook, which needs Linux 5.8 or later"),
            "{message}"
        );
        assert!(message.contains("this kernel: "), "{message}");
        for name in SOCK_ADDR_PROGRAMS.iter().chain(&SOCK_PROGRAMS) {
            assert!(!hook_since(name).is_empty());
        }
        assert_eq!(hook_since("sock_release"), "5.9");
    }
}
