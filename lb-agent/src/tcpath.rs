//! The thin shell around the tc datapath (NodePort, ExternalIPs,
//! LoadBalancer IPs): loads the `lb-datapath` object with the same pin
//! directory as the socket programs, so the frontend and backend maps are
//! shared; attaches its programs to node uplinks with tcx links pinned in
//! bpffs; writes Maglev tables, source ranges and the node configuration;
//! garbage-collects conntrack. The map layouts are described in
//! [`lb_common::tc`].

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
        RingBuf,
    },
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
    },
    sys::SyscallError,
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use lb_common::{
    tc::{
        map_names, CtGcState, CtKey, CtValue, CtValueV1, DropEvent, MaglevKey, ReportBudget,
        SourceRangeKey, TcAffinityKey, TcConfig, MAGLEV_SIZE_INDEX, MAX_CONNTRACK, STATS_LEN,
    },
    AffinityValue,
};

use crate::addr::addr_from_ip;
use crate::datapath::{counter_sums, ignore_missing, prune};

/// The tc programs, built by `build.rs`.
static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-datapath"));

/// Map pins of the tc object besides the socket path's shared ones; the
/// socket shell's stale-pin cleanup must keep them.
pub const MAP_PINS: [&str; 6] = [
    map_names::MAGLEV,
    map_names::CONNTRACK,
    map_names::SOURCE_RANGES,
    map_names::CONFIG,
    map_names::STATS,
    map_names::AFFINITY,
];

/// A tc program of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// `lb_ingress`, for an uplink's ingress: frontends, replies of remote
    /// backends.
    Ingress,
    /// `lb_egress`, for an uplink's egress: replies of local backends.
    Egress,
}

impl TcHook {
    /// Both hooks, in attach order.
    pub const ALL: [TcHook; 2] = [TcHook::Ingress, TcHook::Egress];

    /// Name of the program in the object.
    pub fn program(self) -> &'static str {
        match self {
            TcHook::Ingress => "lb_ingress",
            TcHook::Egress => "lb_egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            TcHook::Ingress => TcAttachType::Ingress,
            TcHook::Egress => TcAttachType::Egress,
        }
    }
}

/// The conntrack garbage collector, never attached: run with
/// `BPF_PROG_TEST_RUN`.
const GC_PROGRAM: &str = "lb_ct_gc";

/// The frame the garbage collector runs on: the kernel wants at least an
/// Ethernet header, the program ignores it.
const GC_FRAME: [u8; 14] = [0; 14];

/// Errors of the tc shell.
#[derive(Debug, thiserror::Error)]
pub enum TcPathError {
    /// The BPF object could not be loaded.
    #[error("loading the tc BPF object: {0}")]
    Load(#[from] EbpfError),
    /// A file under bpffs or procfs could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The pin directory cannot be used.
    #[error(transparent)]
    PinDir(#[from] crate::datapath::PinDirError),
    /// A map is missing from the object, has another layout, or an
    /// operation on it failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
    /// A program is missing from the object.
    #[error("program {0} is missing from the tc BPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded, attached or run.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The underlying error.
        source: ProgramError,
    },
    /// A link could not be taken over, adopted or pinned.
    #[error("link {path}: {source}")]
    Link {
        /// Pin path of the link.
        path: PathBuf,
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
    /// A Maglev table is empty or larger than a `u32` index allows.
    #[error("Maglev table of {0} entries cannot be written")]
    BadTableSize(usize),
    /// A source range prefix is longer than its address.
    #[error("prefix length {len} is invalid for {addr}")]
    BadPrefix {
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        len: u8,
    },
    /// `/proc/uptime` could not be parsed.
    #[error("unexpected /proc/uptime contents {0:?}")]
    BadUptime(String),
}

/// Options of [`TcDatapath::load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcOptions {
    /// Capacity of the conntrack LRU (two entries per flow). Only used when
    /// the map is created; a pinned map keeps its capacity.
    pub conntrack_capacity: u32,
}

impl Default for TcOptions {
    fn default() -> Self {
        Self {
            conntrack_capacity: MAX_CONNTRACK,
        }
    }
}

/// What a conntrack garbage collection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtOccupancy {
    /// Entries left after the collection.
    pub live: usize,
    /// Expired entries deleted.
    pub deleted: usize,
    /// Capacity of the map.
    pub capacity: u32,
}

/// The loaded tc datapath: programs plus their maps.
pub struct TcDatapath {
    ebpf: Ebpf,
    maglev: HashMap<MapData, MaglevKey, u32>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    affinity: HashMap<MapData, TcAffinityKey, AffinityValue>,
    gc: Array<MapData, CtGcState>,
    config: Array<MapData, TcConfig>,
    stats: PerCpuArray<MapData, u64>,
    pod_interfaces: HashMap<MapData, u32, u32>,
    events: RingBuf<MapData>,
    report_budget: PerCpuArray<MapData, ReportBudget>,
    /// An older agent's conntrack, pinned under the older layout's name,
    /// until its flows are carried over (see [`TcDatapath::load`]).
    older_conntrack: Option<HashMap<MapData, CtKey, CtValueV1>>,
    conntrack_capacity: u32,
    pin_dir: PathBuf,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> TcPathError {
    move |source| TcPathError::Map { name, source }
}

/// Every entry of a hash map, for tests and debugging.
fn entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, TcPathError> {
    map.iter().collect::<Result<_, _>>().map_err(map_err(name))
}

/// The conntrack an older agent pinned under the previous layout, if any.
fn open_older_conntrack(
    pin_dir: &Path,
) -> Result<Option<HashMap<MapData, CtKey, CtValueV1>>, TcPathError> {
    let name = map_names::CONNTRACK_V1;
    let data = match MapData::from_pin(pin_dir.join(name)) {
        Ok(data) => data,
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(source) => return Err(TcPathError::Map { name, source }),
    };
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    HashMap::try_from(map).map(Some).map_err(map_err(name))
}

/// Removes the bpffs pin `path`; one already gone is not an error.
fn remove_pin(path: PathBuf) -> Result<(), TcPathError> {
    match fs::remove_file(&path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => {
            Err(TcPathError::Io { path, source })
        }
        _ => Ok(()),
    }
}

/// `BPF_NOEXIST`: an update that only inserts.
const INSERT_ONLY: u64 = 1;

/// Copies every entry of `older` missing from `conntrack`; returns how many.
fn carry_over(
    older: &HashMap<MapData, CtKey, CtValueV1>,
    conntrack: &mut HashMap<MapData, CtKey, CtValue>,
) -> Result<usize, TcPathError> {
    let name = map_names::CONNTRACK_V1;
    let capacity = older.map().info().map_err(map_err(name))?.max_entries();
    let mut copied = 0;
    // A walk that loses its place (the entry it stood on was deleted by a
    // packet) starts over from the first key: bounded, duplicates are
    // skipped by the insert-only update.
    for entry in older.iter().take(2 * capacity as usize) {
        // An entry deleted between the key and its value: its flow ended.
        let Ok((key, value)) = entry else { continue };
        match conntrack.insert(key, value.upgraded(), INSERT_ONLY) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(TcPathError::Map {
                    name: map_names::CONNTRACK,
                    source,
                })
            }
        }
    }
    Ok(copied)
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, TcPathError> {
    let map = ebpf.take_map(name).ok_or(TcPathError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(map_err(name))
}

impl TcDatapath {
    /// Loads and verifies the tc programs, creating the maps or reusing the
    /// ones pinned in `pin_dir` (shared with the socket programs).
    ///
    /// An older agent's conntrack (`LB_CT_V1`, pinned) is copied into the
    /// new map here, while that agent's programs still run on it, and once
    /// more by [`finish_conntrack_carry_over`](Self::finish_conntrack_carry_over)
    /// after this agent's programs replaced them, for the flows that began
    /// in between: established flows, SNAT ports included, survive the
    /// upgrade.
    pub fn load(pin_dir: &Path, options: &TcOptions) -> Result<Self, TcPathError> {
        crate::datapath::prepare_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(map_names::CONNTRACK, options.conntrack_capacity)
            .load(TC_OBJECT)?;
        for name in TcHook::ALL
            .map(TcHook::program)
            .into_iter()
            .chain([GC_PROGRAM])
        {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(TcPathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| TcPathError::Program { name, source })?;
            program
                .load()
                .map_err(|source| TcPathError::Program { name, source })?;
        }
        let conntrack: HashMap<MapData, CtKey, CtValue> = take(&mut ebpf, map_names::CONNTRACK)?;
        let conntrack_capacity = conntrack
            .map()
            .info()
            .map(|info| info.max_entries())
            .map_err(map_err(map_names::CONNTRACK))?;
        let older_conntrack = open_older_conntrack(pin_dir)?;
        let mut tc = Self {
            maglev: take(&mut ebpf, map_names::MAGLEV)?,
            conntrack,
            source_ranges: take(&mut ebpf, map_names::SOURCE_RANGES)?,
            affinity: take(&mut ebpf, map_names::AFFINITY)?,
            gc: take(&mut ebpf, map_names::CT_GC)?,
            config: take(&mut ebpf, map_names::CONFIG)?,
            stats: take(&mut ebpf, map_names::STATS)?,
            pod_interfaces: take(&mut ebpf, map_names::POD_INTERFACES)?,
            events: take(&mut ebpf, map_names::EVENTS)?,
            report_budget: take(&mut ebpf, map_names::REPORT_BUDGET)?,
            ebpf,
            older_conntrack,
            conntrack_capacity,
            pin_dir: pin_dir.to_path_buf(),
        };
        if let Some(older) = &tc.older_conntrack {
            let copied = carry_over(older, &mut tc.conntrack)?;
            log::info!(
                "carried {copied} conntrack entries over from {}",
                map_names::CONNTRACK_V1
            );
        }
        Ok(tc)
    }

    /// Copies the entries an older agent's programs added to its conntrack
    /// since [`load`](Self::load) (an entry this agent's programs made
    /// meanwhile is kept), then lets that conntrack go. Call it once this
    /// agent's programs are attached everywhere. Returns the entries copied.
    pub fn finish_conntrack_carry_over(&mut self) -> Result<usize, TcPathError> {
        let Some(older) = self.older_conntrack.take() else {
            return Ok(0);
        };
        let copied = carry_over(&older, &mut self.conntrack)?;
        remove_pin(self.pin_dir.join(map_names::CONNTRACK_V1))?;
        log::info!(
            "carried {copied} more conntrack entries over from {}, now removed",
            map_names::CONNTRACK_V1
        );
        Ok(copied)
    }

    fn program(&mut self, hook: TcHook) -> Result<&mut SchedClassifier, TcPathError> {
        self.program_named(hook.program())
    }

    fn program_named(&mut self, name: &'static str) -> Result<&mut SchedClassifier, TcPathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(TcPathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| TcPathError::Program { name, source })
    }

    /// Pin path of the link of `hook` on `interface`. bpffs rejects dots in
    /// names, which interface names may contain.
    fn link_pin(&self, interface: &str, hook: TcHook) -> PathBuf {
        let interface = interface.replace('.', "_");
        self.pin_dir
            .join("links")
            .join(format!("tc_{interface}_{}", hook.program()))
    }

    /// Attaches the programs of `hooks` to `interface` with tcx links pinned
    /// in bpffs, so they outlive the agent, and detaches the other hook's
    /// (left by an agent configured differently). A link pinned by a
    /// previous agent is updated in place to the new program: no packet
    /// passes untranslated during an upgrade.
    pub fn attach(&mut self, interface: &str, hooks: &[TcHook]) -> Result<(), TcPathError> {
        for hook in TcHook::ALL {
            if !hooks.contains(&hook) {
                self.detach_hook(interface, hook)?;
                continue;
            }
            let name = hook.program();
            let pin = self.link_pin(interface, hook);
            let link_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| TcPathError::Link { path, source }
            };
            let program_err = |source| TcPathError::Program { name, source };
            match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(old)).map_err(link_err(&pin))?;
                    let program = self.program(hook)?;
                    let id = program.attach_to_link(link).map_err(program_err)?;
                    // The pin keeps the (updated) link; release our handle so
                    // dropping the program does not detach it.
                    drop(program.take_link(id).map_err(program_err)?);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    let program = self.program(hook)?;
                    let id = program
                        .attach_with_options(
                            interface,
                            hook.attach_type(),
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(program_err)?;
                    let link = program.take_link(id).map_err(program_err)?;
                    let link = FdLink::try_from(link).map_err(link_err(&pin))?;
                    link.pin(&pin).map_err(|source| TcPathError::Pin {
                        path: pin.clone(),
                        source,
                    })?;
                }
                Err(source) => return Err(TcPathError::Link { path: pin, source }),
            }
        }
        Ok(())
    }

    /// Detaches both programs from `interface` by removing their link pins;
    /// the kernel releases the links shortly after (when bpffs frees the pins).
    pub fn detach(&self, interface: &str) -> Result<(), TcPathError> {
        TcHook::ALL
            .iter()
            .try_for_each(|&hook| self.detach_hook(interface, hook))
    }

    fn detach_hook(&self, interface: &str, hook: TcHook) -> Result<(), TcPathError> {
        remove_pin(self.link_pin(interface, hook))
    }

    /// Writes the node configuration.
    pub fn set_config(&mut self, config: &TcConfig) -> Result<(), TcPathError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Writes a complete Maglev table of backend ids under `generation`: the
    /// slots first, the size entry last, so the generation is usable only
    /// once complete. Then point the frontends at it (`slot_generation`) and
    /// delete the previous generation with [`Self::delete_maglev_table`].
    pub fn write_maglev_table(
        &mut self,
        generation: u32,
        backend_ids: &[u32],
    ) -> Result<(), TcPathError> {
        let size = u32::try_from(backend_ids.len())
            .ok()
            .filter(|&size| size != 0 && size != MAGLEV_SIZE_INDEX)
            .ok_or(TcPathError::BadTableSize(backend_ids.len()))?;
        let err = map_err(map_names::MAGLEV);
        for (index, id) in (0..size).zip(backend_ids) {
            self.maglev
                .insert(MaglevKey { generation, index }, id, 0)
                .map_err(&err)?;
        }
        let size_key = MaglevKey {
            generation,
            index: MAGLEV_SIZE_INDEX,
        };
        self.maglev.insert(size_key, size, 0).map_err(err)
    }

    /// Deletes the Maglev table of `generation`: the size entry first, so a
    /// reader never uses a partly deleted table.
    pub fn delete_maglev_table(&mut self, generation: u32) -> Result<(), TcPathError> {
        let err = map_err(map_names::MAGLEV);
        let size_key = MaglevKey {
            generation,
            index: MAGLEV_SIZE_INDEX,
        };
        let size = match self.maglev.get(&size_key, 0) {
            Ok(size) => size,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        ignore_missing(self.maglev.remove(&size_key)).map_err(&err)?;
        for index in 0..size {
            ignore_missing(self.maglev.remove(&MaglevKey { generation, index })).map_err(&err)?;
        }
        Ok(())
    }

    fn source_range_key(
        service_id: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<Key<SourceRangeKey>, TcPathError> {
        let (max, offset) = match addr {
            IpAddr::V4(_) => (32, 96),
            IpAddr::V6(_) => (128, 0),
        };
        if prefix_len > max {
            return Err(TcPathError::BadPrefix {
                addr,
                len: prefix_len,
            });
        }
        Ok(Key::new(
            32 + offset + u32::from(prefix_len),
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr: addr_from_ip(addr),
            },
        ))
    }

    /// Allows `addr/prefix_len` to reach the frontends of `service_id` that
    /// carry `SERVICE_FLAG_SOURCE_RANGES`.
    pub fn allow_source_range(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), TcPathError> {
        let key = Self::source_range_key(service_id, addr, prefix_len)?;
        self.source_ranges
            .insert(&key, 1, 0)
            .map_err(map_err(map_names::SOURCE_RANGES))
    }

    /// Removes a range added by [`Self::allow_source_range`].
    pub fn remove_source_range(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), TcPathError> {
        let key = Self::source_range_key(service_id, addr, prefix_len)?;
        ignore_missing(self.source_ranges.remove(&key)).map_err(map_err(map_names::SOURCE_RANGES))
    }

    /// Deletes the session affinity entries `keep` rejects, e.g. ones whose
    /// backend left the service. Returns how many were deleted.
    pub fn prune_affinity(
        &mut self,
        keep: impl Fn(&TcAffinityKey, &AffinityValue) -> bool,
    ) -> Result<usize, TcPathError> {
        prune(&mut self.affinity, keep).map_err(map_err(map_names::AFFINITY))
    }

    /// The session affinity entries, for tests and debugging.
    pub fn affinity_entries(&self) -> Result<Vec<(TcAffinityKey, AffinityValue)>, TcPathError> {
        entries(&self.affinity, map_names::AFFINITY)
    }

    /// Deletes the conntrack entries expired at `now_ns` (`CLOCK_BOOTTIME`,
    /// see [`boottime_ns`]) and reports the occupancy, for a metric. The
    /// walk runs in the kernel (the `lb_ct_gc` program), so a full table
    /// costs milliseconds, not a syscall pair per entry.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<CtOccupancy, TcPathError> {
        let request = CtGcState {
            now_ns,
            ..CtGcState::default()
        };
        self.gc
            .set(0, request, 0)
            .map_err(map_err(map_names::CT_GC))?;
        self.run(GC_PROGRAM, &GC_FRAME)?;
        let result = self.gc.get(&0, 0).map_err(map_err(map_names::CT_GC))?;
        Ok(CtOccupancy {
            live: usize::try_from(result.live).unwrap_or(usize::MAX),
            deleted: usize::try_from(result.deleted).unwrap_or(usize::MAX),
            capacity: self.conntrack_capacity,
        })
    }

    /// Marks `ifindex` as the host end of a pod's veth (or netkit) pair:
    /// packets forwarded to it go straight to the pod's end. Only for
    /// interfaces of such kinds: the peer redirect drops packets to others.
    pub fn add_pod_interface(&mut self, ifindex: u32) -> Result<(), TcPathError> {
        self.pod_interfaces
            .insert(ifindex, 1, 0)
            .map_err(map_err(map_names::POD_INTERFACES))
    }

    /// Forgets a pod interface that went away.
    pub fn remove_pod_interface(&mut self, ifindex: u32) -> Result<(), TcPathError> {
        ignore_missing(self.pod_interfaces.remove(&ifindex))
            .map_err(map_err(map_names::POD_INTERFACES))
    }

    /// Every conntrack entry, for `lbctl` and tests.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, TcPathError> {
        entries(&self.conntrack, map_names::CONNTRACK)
    }

    /// The counters summed over CPUs, indexed by `lb_common::tc::STAT_*`.
    pub fn stats(&self) -> Result<Vec<u64>, TcPathError> {
        counter_sums(&self.stats, STATS_LEN).map_err(map_err(map_names::STATS))
    }

    /// The drop events the programs wrote since the last call, oldest first
    /// (at most what the ring buffer holds).
    pub fn drain_drops(&mut self) -> Vec<DropEvent> {
        let mut drops = Vec::new();
        while let Some(item) = self.events.next() {
            drops.extend(crate::drops::decode(&item));
        }
        drops
    }

    /// Drop reports not sent since the programs were loaded: over a CPU's
    /// budget or with the ring buffer full.
    pub fn drops_lost(&self) -> Result<u64, TcPathError> {
        self.report_budget
            .get(&0, 0)
            .map(|budgets| budgets.iter().map(|b| b.lost).sum())
            .map_err(map_err(map_names::REPORT_BUDGET))
    }

    /// Runs a program on one Ethernet frame with `BPF_PROG_TEST_RUN`, without
    /// any network: returns the tc verdict and the frame as the program left
    /// it. For tests and debugging; map side effects are real.
    pub fn test_run(&mut self, hook: TcHook, frame: &[u8]) -> Result<(i32, Vec<u8>), TcPathError> {
        self.run(hook.program(), frame)
    }

    fn run(&mut self, name: &'static str, frame: &[u8]) -> Result<(i32, Vec<u8>), TcPathError> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program_named(name)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| TcPathError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds, the clock of conntrack timestamps
/// (`bpf_ktime_get_boot_ns`), read from `/proc/uptime` (10 ms resolution,
/// plenty for timeouts counted in seconds).
pub fn boottime_ns() -> Result<u64, TcPathError> {
    let path = Path::new("/proc/uptime");
    let text = fs::read_to_string(path).map_err(|source| TcPathError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_uptime(&text).ok_or(TcPathError::BadUptime(text))
}

/// Parses the first field of `/proc/uptime` ("12345.67") into nanoseconds.
fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (seconds, fraction) = first.split_once('.').unwrap_or((first, "0"));
    let seconds: u64 = seconds.parse().ok()?;
    let digits = fraction.len().min(9);
    let fraction: u64 = fraction.get(..digits)?.parse().ok()?;
    let scale = 10u64.pow(9 - digits as u32);
    Some(seconds * 1_000_000_000 + fraction * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_parses() {
        assert_eq!(
            parse_uptime("350735.47 234388.90\n"),
            Some(350_735_470_000_000)
        );
        assert_eq!(parse_uptime("12 3"), Some(12_000_000_000));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("x.5"), None);
    }
}
