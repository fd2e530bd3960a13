//! The thin shell around the kernel: loads the programs, pins maps and links in
//! bpffs, attaches to a cgroup, executes plans and dumps the maps.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    pin::PinError,
    programs::{
        links::{CgroupAttachMode, FdLink, LinkError},
        CgroupSock, CgroupSockAddr, ProgramError,
    },
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use lb_common::{
    backend_port_bit, map_names, AffinityKey, AffinityValue, Backend, RevNat, ServiceKey,
    ServiceName, ServiceValue, SlotKey, SockConfig, SockRevNatKey, BACKEND_PORT_WORDS,
    SOCK_STATS_LEN,
};

use crate::{
    plan::{Dump, Op, Plan},
    tcpath::TcDatapath,
};

/// Labels of the socket programs' refusal counters
/// (`lb_socket_refused{reason}`), in `lb_common::SOCK_STAT_*` order.
pub const SOCK_REFUSAL_REASONS: [&str; SOCK_STATS_LEN as usize] =
    ["no_endpoints", "no_local_endpoints"];

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

/// Map pins this version owns; other `LB_*` pins in the directory belong to
/// older layouts and are removed once this version's programs are attached.
const MAP_PINS: [&str; 11] = [
    map_names::SERVICES,
    map_names::BACKEND_SLOTS,
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::SOCK_REV_NAT,
    map_names::BACKEND_PORTS,
    map_names::SERVICE_NAMES,
    map_names::AFFINITY,
    map_names::ROUND_ROBIN,
    map_names::OPT_OUT,
    map_names::OPT_OUT_COUNT,
];

/// Errors of the kernel shell.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The BPF object could not be loaded (verifier, missing kernel feature...).
    #[error("loading the BPF object: {0}")]
    Load(#[from] EbpfError),
    /// A directory under bpffs could not be prepared.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The pin directory cannot be used.
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    /// A map the object should define is missing, or has another layout.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
    /// A map expected in the pin directory is not there (is the agent running?).
    #[error("map {0} is not pinned; is lb-agent running with this --bpffs-dir?")]
    NotPinned(PathBuf),
    /// A program is missing from the object.
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The underlying error.
        source: ProgramError,
    },
    /// A program's link cannot be taken over for pinning.
    #[error("link of program {name}: {source}")]
    Link {
        /// Program name.
        name: &'static str,
        /// The underlying error.
        source: LinkError,
    },
    /// A link could not be pinned.
    #[error("pinning {path}: {source}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// The underlying error.
        source: PinError,
    },
}

/// Why a map write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    /// A socket-path map refused the write.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A tc-path map refused the write.
    #[error(transparent)]
    Tc(#[from] crate::tcpath::TcPathError),
    /// The plan holds tc-path writes but the tc datapath is not loaded.
    #[error("the tc datapath is not enabled (set --tc-interfaces)")]
    TcDisabled,
}

/// Why a bpffs pin directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    /// The directory (or mountinfo) could not be read or created.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The directory is not on a bpffs mount.
    #[error("{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs(PathBuf),
}

/// Creates `pin_dir` (and its `links/`) and checks it is on bpffs, where pins
/// outlive the agent.
pub(crate) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), PinDirError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PinDirError::Io { path, source }
    };
    fs::create_dir_all(pin_dir.join("links")).map_err(io_err(pin_dir))?;
    if !crate::mounts::is_on_fs(pin_dir, "bpf")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?
    {
        return Err(PinDirError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

/// A map write that failed while executing a plan.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", describe(op))]
pub struct WriteError {
    /// The operation.
    pub op: Op,
    /// The underlying error.
    pub source: WriteFailure,
}

/// An operation without its (possibly large) payload, for logs.
fn describe(op: &Op) -> String {
    match op {
        Op::PutMaglevTable(generation, table) => {
            format!("PutMaglevTable({generation}, {} entries)", table.len())
        }
        other => format!("{other:?}"),
    }
}

/// The agent's maps.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    names: HashMap<MapData, u32, ServiceName>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_rev_nat: HashMap<MapData, SockRevNatKey, RevNat>,
    backend_ports: BackendPorts,
    opt_out: HashMap<MapData, u64, u32>,
    opt_out_count: Array<MapData, u32>,
}

fn typed<K: Pod, V: Pod>(
    name: &'static str,
    map: Map,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Every entry of a hash map.
fn all<K: Pod, V: Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, DatapathError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| DatapathError::Map { name, source })
}

/// The first `len` counters of a per-CPU array, each summed over CPUs.
pub(crate) fn counter_sums(
    counters: &PerCpuArray<MapData, u64>,
    len: u32,
) -> Result<Vec<u64>, MapError> {
    (0..len)
        .map(|index| counters.get(&index, 0).map(|values| values.iter().sum()))
        .collect()
}

fn array<V: Pod>(name: &'static str, map: Map) -> Result<Array<MapData, V>, DatapathError> {
    Array::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// [`map_names::BACKEND_PORTS`] and the agent's copy of it, so that only the
/// first backend on a port costs a write.
struct BackendPorts {
    map: Array<MapData, u64>,
    words: Vec<u64>,
}

impl BackendPorts {
    fn new(map: Map) -> Result<Self, DatapathError> {
        let name = map_names::BACKEND_PORTS;
        let map = array(name, map)?;
        let words = (0..BACKEND_PORT_WORDS)
            .map(|index| map.get(&index, 0))
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map, words })
    }

    /// Adds `port` (network byte order) to the set.
    fn add(&mut self, port: u16) -> Result<(), MapError> {
        let (index, bit) = backend_port_bit(port);
        let word = &mut self.words[index as usize];
        if *word & bit == 0 {
            self.map.set(index, *word | bit, 0)?;
            *word |= bit;
        }
        Ok(())
    }
}

fn pinned(dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotPinned(path));
    }
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

impl Maps {
    /// Opens the maps pinned in `dir` by a running (or past) agent.
    pub fn open_pinned(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            services: typed(map_names::SERVICES, pinned(dir, map_names::SERVICES)?)?,
            slots: typed(
                map_names::BACKEND_SLOTS,
                pinned(dir, map_names::BACKEND_SLOTS)?,
            )?,
            backends: typed(map_names::BACKENDS, pinned(dir, map_names::BACKENDS)?)?,
            rev_nat: typed(map_names::REV_NAT, pinned(dir, map_names::REV_NAT)?)?,
            names: typed(
                map_names::SERVICE_NAMES,
                pinned(dir, map_names::SERVICE_NAMES)?,
            )?,
            affinity: typed(map_names::AFFINITY, pinned(dir, map_names::AFFINITY)?)?,
            sock_rev_nat: typed(
                map_names::SOCK_REV_NAT,
                pinned(dir, map_names::SOCK_REV_NAT)?,
            )?,
            backend_ports: BackendPorts::new(pinned(dir, map_names::BACKEND_PORTS)?)?,
            opt_out: typed(map_names::OPT_OUT, pinned(dir, map_names::OPT_OUT)?)?,
            opt_out_count: array(
                map_names::OPT_OUT_COUNT,
                pinned(dir, map_names::OPT_OUT_COUNT)?,
            )?,
        })
    }

    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            })
        };
        Ok(Self {
            services: typed(map_names::SERVICES, take(map_names::SERVICES)?)?,
            slots: typed(map_names::BACKEND_SLOTS, take(map_names::BACKEND_SLOTS)?)?,
            backends: typed(map_names::BACKENDS, take(map_names::BACKENDS)?)?,
            rev_nat: typed(map_names::REV_NAT, take(map_names::REV_NAT)?)?,
            names: typed(map_names::SERVICE_NAMES, take(map_names::SERVICE_NAMES)?)?,
            affinity: typed(map_names::AFFINITY, take(map_names::AFFINITY)?)?,
            sock_rev_nat: typed(map_names::SOCK_REV_NAT, take(map_names::SOCK_REV_NAT)?)?,
            backend_ports: BackendPorts::new(take(map_names::BACKEND_PORTS)?)?,
            opt_out: typed(map_names::OPT_OUT, take(map_names::OPT_OUT)?)?,
            opt_out_count: array(map_names::OPT_OUT_COUNT, take(map_names::OPT_OUT_COUNT)?)?,
        })
    }

    /// Reads every entry of every map.
    pub fn dump(&self) -> Result<Dump, DatapathError> {
        Ok(Dump {
            services: all(map_names::SERVICES, &self.services)?,
            slots: all(map_names::BACKEND_SLOTS, &self.slots)?,
            backends: all(map_names::BACKENDS, &self.backends)?,
            rev_nat: all(map_names::REV_NAT, &self.rev_nat)?,
            names: self.service_names()?,
        })
    }

    /// Executes a plan group by group. A failed write skips the rest of its
    /// group, leaving that frontend as it was; other groups still run.
    pub fn execute(&mut self, plan: &Plan, mut tc: Option<&mut TcDatapath>) -> Vec<WriteError> {
        let mut errors = Vec::new();
        for group in &plan.groups {
            for op in &group.ops {
                if let Err(source) = self.write(op, tc.as_deref_mut()) {
                    errors.push(WriteError {
                        op: op.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        errors
    }

    /// Deletes the session affinity entries `keep` rejects, e.g. ones whose
    /// backend left the service. Returns how many were deleted.
    pub fn prune_affinity(
        &mut self,
        keep: impl Fn(&AffinityKey, &AffinityValue) -> bool,
    ) -> Result<usize, DatapathError> {
        prune(&mut self.affinity, keep).map_err(|source| DatapathError::Map {
            name: map_names::AFFINITY,
            source,
        })
    }

    /// Makes the set of cgroups whose sockets are not translated exactly
    /// `wanted` (cgroup ids). Returns whether anything changed.
    pub fn set_opt_out(&mut self, wanted: &BTreeSet<u64>) -> Result<bool, DatapathError> {
        let err = |source| DatapathError::Map {
            name: map_names::OPT_OUT,
            source,
        };
        let present: BTreeSet<u64> = self.opt_out.keys().collect::<Result<_, _>>().map_err(err)?;
        for id in wanted.difference(&present) {
            self.opt_out.insert(id, 1, 0).map_err(err)?;
        }
        for id in present.difference(wanted) {
            ignore_missing(self.opt_out.remove(id)).map_err(err)?;
        }
        let changed = &present != wanted;
        if changed {
            // Last: a count above the entries only costs the programs a
            // lookup that misses; one below them would skip opted-out
            // cgroups. Unchanged sets keep the count written before (or
            // synced at load).
            self.write_opt_out_count(wanted.len())?;
        }
        Ok(changed)
    }

    /// Tells the programs how many cgroups opted out (0: skip the lookup).
    fn write_opt_out_count(&mut self, count: usize) -> Result<(), DatapathError> {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        self.opt_out_count
            .set(0, count, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::OPT_OUT_COUNT,
                source,
            })
    }

    /// Sets the opt-out count from the entries a previous agent left, before
    /// any program of this agent runs.
    fn sync_opt_out_count(&mut self) -> Result<(), DatapathError> {
        let entries = self
            .opt_out
            .keys()
            .try_fold(0, |n, key| key.map(|_| n + 1))
            .map_err(|source| DatapathError::Map {
                name: map_names::OPT_OUT,
                source,
            })?;
        self.write_opt_out_count(entries)
    }

    /// Adds the ports of the backends already in the map to the backend
    /// ports, for a map created by an agent that predates it (or lost).
    fn sync_backend_ports(&mut self) -> Result<(), DatapathError> {
        for (_, backend) in all(map_names::BACKENDS, &self.backends)? {
            self.backend_ports
                .add(backend.port)
                .map_err(|source| DatapathError::Map {
                    name: map_names::BACKEND_PORTS,
                    source,
                })?;
        }
        Ok(())
    }

    /// The display names of the services, by service id.
    pub fn service_names(&self) -> Result<Vec<(u32, ServiceName)>, DatapathError> {
        all(map_names::SERVICE_NAMES, &self.names)
    }

    /// The reverse translations of the sockets the socket programs steered
    /// to a backend and that are still open: the socket (its cookie) and the
    /// backend it was sent to, and the frontend it shows.
    pub fn socket_translations(&self) -> Result<Vec<(SockRevNatKey, RevNat)>, DatapathError> {
        all(map_names::SOCK_REV_NAT, &self.sock_rev_nat)
    }

    /// Cookies of the sockets the datapath steered from frontend `service_id`
    /// to a backend of `targets`, as `(service_id, backend)` pairs.
    pub fn cookies_steered_to(
        &self,
        targets: &BTreeSet<(u32, Backend)>,
    ) -> Result<BTreeSet<u64>, DatapathError> {
        let mut cookies = BTreeSet::new();
        for (key, rev) in self.socket_translations()? {
            let hit = targets.iter().any(|(service_id, backend)| {
                *service_id == rev.service_id
                    && backend.addr == key.addr
                    && backend.port == key.port
            });
            if hit {
                cookies.insert(key.cookie);
            }
        }
        Ok(cookies)
    }

    fn write(&mut self, op: &Op, tc: Option<&mut TcDatapath>) -> Result<(), WriteFailure> {
        match op {
            Op::PutBackend(id, b) => {
                // Before the backend: a socket steered to it must find its port set.
                self.backend_ports.add(b.port)?;
                self.backends.insert(id, b, 0)?
            }
            Op::PutSlot(k, id) => self.slots.insert(k, id, 0)?,
            Op::PutRevNat(id, r) => self.rev_nat.insert(id, r, 0)?,
            Op::PutName(id, n) => self.names.insert(id, n, 0)?,
            Op::PutService(k, v) => self.services.insert(k, v, 0)?,
            Op::DeleteSlot(k) => ignore_missing(self.slots.remove(k))?,
            Op::DeleteService(k) => ignore_missing(self.services.remove(k))?,
            Op::DeleteRevNat(id) => ignore_missing(self.rev_nat.remove(id))?,
            Op::DeleteName(id) => ignore_missing(self.names.remove(id))?,
            Op::DeleteBackend(id) => ignore_missing(self.backends.remove(id))?,
            Op::PutMaglevTable(generation, table) => {
                enabled(tc)?.write_maglev_table(*generation, table)?
            }
            Op::DeleteMaglevTable(generation) => enabled(tc)?.delete_maglev_table(*generation)?,
            Op::PutSourceRange(id, addr, len) => {
                enabled(tc)?.allow_source_range(*id, *addr, *len)?
            }
            Op::DeleteSourceRange(id, addr, len) => {
                enabled(tc)?.remove_source_range(*id, *addr, *len)?
            }
        }
        Ok(())
    }
}

fn enabled(tc: Option<&mut TcDatapath>) -> Result<&mut TcDatapath, WriteFailure> {
    tc.ok_or(WriteFailure::TcDisabled)
}

/// Deleting what is already gone is success: the goal state is reached.
/// Deletes the entries of `map` that `keep` rejects; returns how many.
pub(crate) fn prune<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keep: impl Fn(&K, &V) -> bool,
) -> Result<usize, MapError> {
    let stale: Vec<K> = map
        .iter()
        .filter_map(|entry| match entry {
            Ok((k, v)) if !keep(&k, &v) => Some(Ok(k)),
            Ok(_) => None,
            // An entry evicted or deleted while iterating.
            Err(MapError::KeyNotFound) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()?;
    for key in &stale {
        ignore_missing(map.remove(key))?;
    }
    Ok(stale.len())
}

pub(crate) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The loaded socket-level datapath: programs plus their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// The maps, for reconciliation.
    pub maps: Maps,
    /// Refusals by `lb_common::SOCK_STAT_*` (not pinned: they count from load).
    refusal_counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the programs, creating the maps or reusing the ones pinned in
    /// `pin_dir` by a previous agent, so an upgrade keeps every entry.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        prepare_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(SOCKET_LB_OBJECT)?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.sync_opt_out_count()?;
        maps.sync_backend_ports()?;
        let name = map_names::SOCK_STATS;
        let counters = ebpf.take_map(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let refusal_counters = PerCpuArray::try_from(counters)
            .map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self {
            ebpf,
            maps,
            refusal_counters,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Tells the programs which network namespace is the node's and which
    /// sockets they translate; before they are attached.
    pub fn configure(&mut self, config: SockConfig) -> Result<(), DatapathError> {
        let name = map_names::SOCK_CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let mut configs: Array<&mut MapData, SockConfig> =
            Array::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        configs
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The refusal counters summed over CPUs, in `lb_common::SOCK_STAT_*`
    /// order (labelled by [`SOCK_REFUSAL_REASONS`]).
    pub fn refusals(&self) -> Result<Vec<u64>, DatapathError> {
        counter_sums(&self.refusal_counters, SOCK_STATS_LEN).map_err(|source| DatapathError::Map {
            name: map_names::SOCK_STATS,
            source,
        })
    }

    /// Attaches every program to `cgroup` and pins the links, replacing links a
    /// previous agent pinned. The new programs attach before the old links go
    /// away, so no connection is ever left untranslated; while both are
    /// attached the second sees an already translated address and passes it.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let cgroup_file = fs::File::open(cgroup).map_err(|source| DatapathError::Io {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // With bpf_link (kernel >= 5.7) the kernel rejects attach flags and
        // always attaches in multi mode, so "Single" here still coexists with
        // other programs on the cgroup.
        let mode = CgroupAttachMode::Single;
        // The two program kinds share no trait in aya; the steps are the same.
        macro_rules! attach_all {
            ($kind:ty, $names:expr) => {
                for name in $names {
                    let program_err = |source| DatapathError::Program { name, source };
                    let program: &mut $kind = self
                        .ebpf
                        .program_mut(name)
                        .ok_or(DatapathError::MissingProgram(name))?
                        .try_into()
                        .map_err(program_err)?;
                    program.load().map_err(program_err)?;
                    let link_id = program.attach(&cgroup_file, mode).map_err(program_err)?;
                    let link = program.take_link(link_id).map_err(program_err)?;
                    self.pin_link(name, link.try_into())?;
                }
            };
        }
        attach_all!(CgroupSockAddr, SOCK_ADDR_PROGRAMS);
        attach_all!(CgroupSock, SOCK_PROGRAMS);
        self.remove_stale_pins();
        Ok(())
    }

    /// Pins a program's new link in place of the previous agent's: the pin is
    /// staged and renamed over the old one, whose link then detaches.
    fn pin_link(
        &self,
        name: &'static str,
        link: Result<FdLink, LinkError>,
    ) -> Result<(), DatapathError> {
        let link = link.map_err(|source| DatapathError::Link { name, source })?;
        let final_path = self.pin_dir.join("links").join(name);
        // bpffs rejects names with dots.
        let staging = self.pin_dir.join("links").join(format!("{name}_staging"));
        let _ = fs::remove_file(&staging);
        let pinned = link.pin(&staging).map_err(|source| DatapathError::Pin {
            path: staging.clone(),
            source,
        })?;
        fs::rename(&staging, &final_path).map_err(|source| DatapathError::Io {
            path: final_path.clone(),
            source,
        })?;
        // The pin now holds the link; our descriptor may go.
        drop(pinned);
        Ok(())
    }

    /// Detaches the socket programs a previous agent attached (their pinned
    /// links), for a node where the socket path is turned off.
    pub fn detach(&self) {
        for name in SOCK_ADDR_PROGRAMS.iter().chain(&SOCK_PROGRAMS) {
            let pin = self.pin_dir.join("links").join(name);
            if fs::remove_file(&pin).is_ok() {
                log::info!("detached socket program {name}");
            }
        }
    }

    /// Removes map pins of older layouts (`LB_*` names this version does not use).
    fn remove_stale_pins(&self) {
        let Ok(entries) = fs::read_dir(&self.pin_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let current = MAP_PINS.contains(&name.as_ref())
                || crate::tcpath::MAP_PINS.contains(&name.as_ref());
            if name.starts_with("LB_") && !current {
                match fs::remove_file(entry.path()) {
                    Ok(()) => log::info!("removed map pin {name} of an older layout"),
                    Err(err) => log::warn!("cannot remove stale pin {name}: {err}"),
                }
            }
        }
    }
}
