//! The tc programs (crate `ebpf/datapath`): NodePorts, ExternalIPs and
//! LoadBalancer IPs on node uplinks, and ClusterIPs per packet on pod
//! interfaces. Loaded with the same pin directory as the socket programs, so
//! the frontend and backend maps are shared; attached with tcx links pinned
//! in bpffs. Owns what only the tc path has: conntrack (and its garbage
//! collector), the node configuration, counters, drop events and the pod
//! interfaces packets are handed to directly. The map layouts are described
//! in `lb_common`.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use lb_common::{
    config::TcConfig,
    conntrack::{CtGcState, CtKey, CtPendingValue, CtValue, CtValueV2},
    events::{DropEvent, ReportBudget},
    maps::{self, MAX_CONNTRACK, MAX_CT_PENDING, MAX_MAGLEV_ENTRIES},
    net::Addr,
    outcome::{Counted, Outcome},
};
use tracing::info;

use super::{
    capacities::MapCapacities,
    ignore_missing, pins,
    policy_maps::AyaPolicyMaps,
    prefilter::{self, Attachment, DenyList},
    service_maps::{entries, MapSource, ServiceCapacities, TcMaps},
    socket_programs::counter_sums,
    KernelError, OnMap,
};

/// The tc programs, built by `build.rs`.
static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-datapath"));

/// A tc program of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// `lb_ingress`, for an uplink's ingress: frontends, replies of remote
    /// backends.
    Ingress,
    /// `lb_egress`, for an uplink's egress: replies of local backends.
    Egress,
    /// `lb_pod_ingress`, for the ingress of a pod interface's host end: the
    /// pod's packets (translation, policy, source check).
    PodIngress,
    /// `lb_pod_egress`, for the egress of a pod interface's host end:
    /// packets to the pod (policy, translation of replies).
    PodEgress,
}

impl TcHook {
    /// Every hook.
    pub const ALL: [TcHook; 4] = [
        TcHook::Ingress,
        TcHook::Egress,
        TcHook::PodIngress,
        TcHook::PodEgress,
    ];
    /// The hooks of an uplink, in attach order.
    pub const UPLINK: [TcHook; 2] = [TcHook::Ingress, TcHook::Egress];
    /// The hooks of a pod interface, in attach order: packets to the pod
    /// are checked before the pod's own are let out.
    pub const POD: [TcHook; 2] = [TcHook::PodEgress, TcHook::PodIngress];

    /// Name of the program in the object.
    pub fn program(self) -> &'static str {
        match self {
            TcHook::Ingress => "lb_ingress",
            TcHook::Egress => "lb_egress",
            TcHook::PodIngress => "lb_pod_ingress",
            TcHook::PodEgress => "lb_pod_egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            TcHook::Ingress | TcHook::PodIngress => TcAttachType::Ingress,
            TcHook::Egress | TcHook::PodEgress => TcAttachType::Egress,
        }
    }
}

/// The conntrack garbage collector, never attached: run with
/// `BPF_PROG_TEST_RUN`.
const GC_PROGRAM: &str = "lb_ct_gc";

/// The frame the garbage collector runs on: the kernel wants at least an
/// Ethernet header, the program ignores it.
const GC_FRAME: [u8; 14] = [0; 14];

/// `BPF_NOEXIST`: an update that only inserts.
const INSERT_ONLY: u64 = 1;

/// Options of [`TcPrograms::load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcOptions {
    /// Capacity of the conntrack LRU (two entries per flow). Only used when
    /// the map is created; a pinned map keeps its capacity.
    pub conntrack_capacity: u32,
    /// Capacity of the LRU of unconfirmed flows (two entries per flow), with
    /// the same rule.
    pub pending_capacity: u32,
    /// Capacity of the Maglev map (entries of every table together), with
    /// the same rule.
    pub maglev_capacity: u32,
    /// The frontend and backend maps shared with the socket programs,
    /// created by whichever object loads first.
    pub services: ServiceCapacities,
    /// Capacities of maps without a setting of their own, for both
    /// objects (`mapCapacities`).
    pub sized: MapCapacities,
}

impl Default for TcOptions {
    fn default() -> Self {
        Self {
            conntrack_capacity: MAX_CONNTRACK,
            pending_capacity: MAX_CT_PENDING,
            maglev_capacity: MAX_MAGLEV_ENTRIES,
            services: ServiceCapacities::default(),
            sized: MapCapacities::default(),
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
    /// Policy conntrack entries left.
    pub policy_live: usize,
    /// Expired policy conntrack entries deleted.
    pub policy_deleted: usize,
    /// Unconfirmed flows' entries left.
    pub pending_live: usize,
    /// Expired unconfirmed flows' entries deleted.
    pub pending_deleted: usize,
    /// Capacity of the map of unconfirmed flows.
    pub pending_capacity: u32,
}

/// The loaded tc programs and the maps only they use.
pub struct TcPrograms {
    ebpf: Ebpf,
    deny_list: DenyList,
    frontend_addresses: HashMap<MapData, Addr, u32>,
    /// What [`Self::frontend_addresses`] holds, as last read or written.
    frontend_addresses_known: BTreeSet<Addr>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    pending: HashMap<MapData, CtKey, CtPendingValue>,
    gc: Array<MapData, CtGcState>,
    config: Array<MapData, TcConfig>,
    stats: PerCpuArray<MapData, u64>,
    pod_interfaces: HashMap<MapData, u32, u32>,
    events: RingBuf<MapData>,
    report_budget: PerCpuArray<MapData, ReportBudget>,
    /// An older agent's conntrack, pinned under the older layout's name,
    /// until its flows are carried over (see [`TcPrograms::load`]).
    older_conntrack: Option<HashMap<MapData, CtKey, CtValueV2>>,
    conntrack_capacity: u32,
    pending_capacity: u32,
    maglev_capacity: u32,
    pin_dir: PathBuf,
}

/// The conntrack an older agent pinned under the previous layout, if any.
fn open_older_conntrack(
    pin_dir: &Path,
) -> Result<Option<HashMap<MapData, CtKey, CtValueV2>>, KernelError> {
    let name = maps::CONNTRACK_V2;
    match pins::open_map_if_pinned(pin_dir, name)? {
        Some(map) => HashMap::try_from(map).map(Some).on(name),
        None => Ok(None),
    }
}

/// Copies every entry of `older` missing from `conntrack`; returns how many.
fn carry_over(
    older: &HashMap<MapData, CtKey, CtValueV2>,
    conntrack: &mut HashMap<MapData, CtKey, CtValue>,
) -> Result<usize, KernelError> {
    let capacity = older.map().info().on(maps::CONNTRACK_V2)?.max_entries();
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
                return Err(KernelError::Map {
                    name: maps::CONNTRACK,
                    source,
                })
            }
        }
    }
    Ok(copied)
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, KernelError> {
    T::try_from(ebpf.open(name)?).on(name)
}

impl TcPrograms {
    /// Loads and verifies the tc programs, creating the maps or reusing the
    /// ones pinned in `pin_dir` (shared with the socket programs). Returns
    /// them with the maps plans write.
    ///
    /// An older agent's conntrack (`LB_CT_V2`, pinned) is copied into the
    /// new map here, while that agent's programs still run on it, and once
    /// more by [`finish_conntrack_carry_over`](Self::finish_conntrack_carry_over)
    /// after this agent's programs replaced them, for the flows that began
    /// in between: established flows, SNAT ports included, survive the
    /// upgrade.
    pub fn load(pin_dir: &Path, options: &TcOptions) -> Result<(Self, TcMaps), KernelError> {
        pins::prepare(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(maps::CONNTRACK, options.conntrack_capacity)
            .map_max_entries(maps::CT_PENDING, options.pending_capacity)
            .map_max_entries(maps::MAGLEV, options.maglev_capacity);
        options.services.apply(&mut loader);
        options.sized.apply(&mut loader);
        let mut ebpf = loader.load(TC_OBJECT).map_err(|source| KernelError::Load {
            object: "tc",
            source,
        })?;
        for name in TcHook::ALL
            .map(TcHook::program)
            .into_iter()
            .chain([GC_PROGRAM])
        {
            let program_err = |source| KernelError::Program { name, source };
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(program_err)?;
            program.load().map_err(program_err)?;
        }
        prefilter::load(&mut ebpf)?;
        let deny_list = DenyList::take(&mut ebpf)?;
        let service_maps = TcMaps::take(&mut ebpf)?;
        // A pinned map keeps the capacity it was made with.
        let maglev_capacity = service_maps.maglev_capacity()?;
        let conntrack: HashMap<MapData, CtKey, CtValue> = take(&mut ebpf, maps::CONNTRACK)?;
        let conntrack_capacity = conntrack
            .map()
            .info()
            .map(|info| info.max_entries())
            .on(maps::CONNTRACK)?;
        let pending: HashMap<MapData, CtKey, CtPendingValue> = take(&mut ebpf, maps::CT_PENDING)?;
        let pending_capacity = pending
            .map()
            .info()
            .map(|info| info.max_entries())
            .on(maps::CT_PENDING)?;
        let frontend_addresses: HashMap<MapData, Addr, u32> =
            take(&mut ebpf, maps::FRONTEND_ADDRS)?;
        let frontend_addresses_known = frontend_addresses
            .keys()
            .collect::<Result<_, _>>()
            .on(maps::FRONTEND_ADDRS)?;
        let mut tc = Self {
            deny_list,
            frontend_addresses,
            frontend_addresses_known,
            conntrack,
            pending,
            pending_capacity,
            maglev_capacity,
            gc: take(&mut ebpf, maps::CT_GC)?,
            config: take(&mut ebpf, maps::TC_CONFIG)?,
            stats: take(&mut ebpf, maps::TC_STATS)?,
            pod_interfaces: take(&mut ebpf, maps::POD_INTERFACES)?,
            events: take(&mut ebpf, maps::EVENTS)?,
            report_budget: take(&mut ebpf, maps::REPORT_BUDGET)?,
            ebpf,
            older_conntrack: open_older_conntrack(pin_dir)?,
            conntrack_capacity,
            pin_dir: pin_dir.to_path_buf(),
        };
        if let Some(older) = &tc.older_conntrack {
            let copied = carry_over(older, &mut tc.conntrack)?;
            info!(
                copied,
                from = %maps::CONNTRACK_V2,
                "carried conntrack entries over"
            );
        }
        Ok((tc, service_maps))
    }

    /// Copies the entries an older agent's programs added to its conntrack
    /// since [`load`](Self::load) (an entry this agent's programs made
    /// meanwhile is kept), then lets that conntrack go. Call it once this
    /// agent's programs are attached everywhere. Returns the entries copied.
    pub fn finish_conntrack_carry_over(&mut self) -> Result<usize, KernelError> {
        let Some(older) = self.older_conntrack.take() else {
            return Ok(0);
        };
        let copied = carry_over(&older, &mut self.conntrack)?;
        pins::remove(&self.pin_dir.join(maps::CONNTRACK_V2))?;
        info!(
            copied,
            from = %maps::CONNTRACK_V2,
            "carried the last conntrack entries over and removed the older map"
        );
        Ok(copied)
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, KernelError> {
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    /// Pin path of the link of `hook` on `interface`.
    fn link_pin(&self, interface: &str, hook: TcHook) -> PathBuf {
        pins::link_path(&self.pin_dir, &format!("tc_{interface}_{}", hook.program()))
    }

    /// Attaches the programs of `hooks` to `interface` with tcx links pinned
    /// in bpffs, so they outlive the agent, then detaches the other hooks'
    /// (left by an agent configured differently, or of an older layout). A
    /// link pinned by a previous agent is updated in place to the new
    /// program: no packet passes untranslated or unchecked during an
    /// upgrade.
    pub fn attach(&mut self, interface: &str, hooks: &[TcHook]) -> Result<(), KernelError> {
        for &hook in hooks {
            let pin = self.link_pin(interface, hook);
            let name = hook.program();
            let link_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| KernelError::Link { path, source }
            };
            let program_err = |source| KernelError::Program { name, source };
            match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(old)).map_err(link_err(&pin))?;
                    let program = self.program(name)?;
                    let id = program.attach_to_link(link).map_err(program_err)?;
                    // The pin keeps the (updated) link; release our handle so
                    // dropping the program does not detach it.
                    drop(program.take_link(id).map_err(program_err)?);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    let program = self.program(name)?;
                    let id = program
                        .attach_with_options(
                            interface,
                            hook.attach_type(),
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(program_err)?;
                    let link = program.take_link(id).map_err(program_err)?;
                    let link = FdLink::try_from(link).map_err(link_err(&pin))?;
                    link.pin(&pin).map_err(|source| KernelError::Pin {
                        path: pin.clone(),
                        source,
                    })?;
                }
                Err(source) => return Err(KernelError::Link { path: pin, source }),
            }
        }
        TcHook::ALL
            .iter()
            .filter(|hook| !hooks.contains(hook))
            .try_for_each(|&hook| pins::remove(&self.link_pin(interface, hook)))
    }

    /// Detaches the programs from `interface` by removing their link pins;
    /// the kernel releases the links shortly after (when bpffs frees the pins).
    pub fn detach(&self, interface: &str) -> Result<(), KernelError> {
        TcHook::ALL
            .iter()
            .try_for_each(|&hook| pins::remove(&self.link_pin(interface, hook)))
    }

    /// Attaches the XDP prefilter to `interface` (native mode where the
    /// driver has it, else generic), or updates a previous agent's link.
    pub fn attach_prefilter(&mut self, interface: &str) -> Result<Attachment, KernelError> {
        prefilter::attach(&mut self.ebpf, &self.pin_dir, interface)
    }

    /// Detaches the XDP prefilter from `interface`, if it was attached.
    pub fn detach_prefilter(&self, interface: &str) -> Result<(), KernelError> {
        prefilter::detach(&self.pin_dir, interface)
    }

    /// Makes the addresses that are nothing but frontends (LoadBalancer
    /// IPs, externalIPs) exactly `addresses`: a TCP or UDP packet to one
    /// that the programs cannot parse is dropped. Writes only what changed
    /// since the map was last read or written.
    pub fn set_frontend_addresses(
        &mut self,
        addresses: &BTreeSet<Addr>,
    ) -> Result<(), KernelError> {
        let name = maps::FRONTEND_ADDRS;
        let map = &mut self.frontend_addresses;
        let known = &mut self.frontend_addresses_known;
        let written = (|| {
            for addr in addresses.difference(known) {
                map.insert(addr, 1, 0).on(name)?;
            }
            for addr in known.difference(addresses) {
                ignore_missing(map.remove(addr)).on(name)?;
            }
            Ok(())
        })();
        // After a failure the map is read again, so the next call repairs it.
        *known = match written {
            Ok(()) => addresses.clone(),
            Err(_) => map.keys().filter_map(Result::ok).collect(),
        };
        written
    }

    /// The XDP prefilter's deny list.
    pub fn deny_list(&mut self) -> &mut DenyList {
        &mut self.deny_list
    }

    /// Runs the XDP prefilter on `frame` with `BPF_PROG_TEST_RUN`; returns
    /// its verdict (`XDP_*`).
    pub fn test_run_prefilter(&mut self, frame: &[u8]) -> Result<u32, KernelError> {
        let name = prefilter::PROGRAM;
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| KernelError::Program { name, source })?;
        Ok(result.return_value)
    }

    /// Writes the node configuration.
    pub fn set_config(&mut self, config: &TcConfig) -> Result<(), KernelError> {
        self.config.set(0, config, 0).on(maps::TC_CONFIG)
    }

    /// The policy maps of the loaded object.
    pub fn policy_maps(&mut self) -> Result<AyaPolicyMaps, KernelError> {
        AyaPolicyMaps::take(&mut self.ebpf)
    }

    /// Deletes the conntrack entries (service and policy) expired at
    /// `now_ns` (`CLOCK_BOOTTIME`) and reports the occupancy, for a metric.
    /// The walk runs in the kernel (the `lb_ct_gc` program), so a full table
    /// costs milliseconds, not a syscall pair per entry.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<CtOccupancy, KernelError> {
        let request = CtGcState {
            now_ns,
            ..CtGcState::default()
        };
        self.gc.set(0, request, 0).on(maps::CT_GC)?;
        self.run(GC_PROGRAM, &GC_FRAME)?;
        let result = self.gc.get(&0, 0).on(maps::CT_GC)?;
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(CtOccupancy {
            live: count(result.live),
            deleted: count(result.deleted),
            capacity: self.conntrack_capacity,
            policy_live: count(result.policy_live),
            policy_deleted: count(result.policy_deleted),
            pending_live: count(result.pending_live),
            pending_deleted: count(result.pending_deleted),
            pending_capacity: self.pending_capacity,
        })
    }

    /// Registers pod interface `ifindex` with `POD_INTERFACE_*` bits: a
    /// veth or netkit host end (packets forwarded to it go straight to the
    /// pod's end; the peer redirect drops packets to other kinds), a known
    /// pod's interface (its source addresses are checked).
    pub fn add_pod_interface(&mut self, ifindex: u32, flags: u32) -> Result<(), KernelError> {
        self.pod_interfaces
            .insert(ifindex, flags, 0)
            .on(maps::POD_INTERFACES)
    }

    /// Forgets a pod interface that went away.
    pub fn remove_pod_interface(&mut self, ifindex: u32) -> Result<(), KernelError> {
        ignore_missing(self.pod_interfaces.remove(&ifindex)).on(maps::POD_INTERFACES)
    }

    /// Every conntrack entry, for `lbctl` and tests.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, KernelError> {
        entries(&self.conntrack, maps::CONNTRACK)
    }

    /// The Maglev map's capacity, as created (a pinned map keeps its own).
    pub fn maglev_capacity(&self) -> u32 {
        self.maglev_capacity
    }

    /// Every entry of the unconfirmed flows, for `lbctl` and tests.
    pub fn pending_entries(&self) -> Result<Vec<(CtKey, CtPendingValue)>, KernelError> {
        entries(&self.pending, maps::CT_PENDING)
    }

    /// The counters of the tc path's outcomes, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Outcome, u64)>, KernelError> {
        let tc = Outcome::ALL
            .into_iter()
            .filter(|o| o.counted() == Counted::Tc);
        counter_sums(&self.stats, maps::TC_STATS, tc)
    }

    /// The drop events the programs wrote since the last call, oldest first
    /// (at most what the ring buffer holds).
    pub fn drain_drops(&mut self) -> Vec<DropEvent> {
        let mut drops = Vec::new();
        while let Some(item) = self.events.next() {
            drops.extend(DropEvent::from_bytes(&item));
        }
        drops
    }

    /// Drop reports not sent since the programs were loaded: over a CPU's
    /// budget or with the ring buffer full.
    pub fn drops_lost(&self) -> Result<u64, KernelError> {
        self.report_budget
            .get(&0, 0)
            .map(|budgets| budgets.iter().map(|b| b.lost).sum())
            .on(maps::REPORT_BUDGET)
    }

    /// Runs a program on one Ethernet frame with `BPF_PROG_TEST_RUN`, without
    /// any network: returns the tc verdict and the frame as the program left
    /// it. For tests and debugging; map side effects are real.
    pub fn test_run(&mut self, hook: TcHook, frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
        self.run(hook.program(), frame)
    }

    fn run(&mut self, name: &'static str, frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program(name)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| KernelError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }
}
