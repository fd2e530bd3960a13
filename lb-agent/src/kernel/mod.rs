//! The kernel shell: the only code that talks to the kernel's BPF objects
//! (through aya). One module per kernel object kind:
//!
//! - [`pins`]: the bpffs directory where maps and links outlive the agent.
//! - [`capacities`]: the capacities users may give maps (`mapCapacities`).
//! - [`socket_programs`]: the cgroup `sock_addr` programs (socket path).
//! - [`tc_programs`]: the tc programs (per-packet path), conntrack and drop
//!   events.
//! - [`service_maps`]: the maps plans write, behind the [`ServiceMaps`]
//!   trait, with the aya implementation ([`AyaServiceMaps`]), an in-memory
//!   one ([`fake::FakeServiceMaps`]) and one that injects failures
//!   ([`faulty::FaultyServiceMaps`]) for the reconciler's tests.
//! - [`policy_maps`]: the policy maps, behind the [`PolicyMaps`] trait
//!   ([`AyaPolicyMaps`]; in memory and failing on purpose in
//!   [`fake_policy`]).
//!
//! Every failure is a [`KernelError`] naming the map, program, link or path
//! involved.

pub mod capacities;
pub mod fake;
pub mod fake_policy;
pub mod faulty;
pub mod pins;
pub mod policy_maps;
pub mod prefilter;
pub mod service_maps;
pub mod socket_programs;
pub mod tc_programs;

use std::{io, net::IpAddr, path::PathBuf};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{links::LinkError, ProgramError},
    sys::SyscallError,
    EbpfError,
};

pub use policy_maps::{AyaPolicyMaps, PolicyMaps};
pub use service_maps::{AyaServiceMaps, ServiceMaps};

/// Errors of the kernel shell.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A BPF object could not be loaded (verifier, missing kernel feature...).
    #[error("loading the {object} BPF object: {source}")]
    Load {
        /// Which object: `socket` or `tc`.
        object: &'static str,
        /// The underlying error.
        source: EbpfError,
    },
    /// A file under bpffs, cgroupfs or procfs could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The pin directory is not on a bpffs mount.
    #[error(
        "{0} is not on a bpffs mount in this mount namespace; mount one with \
         `mount -t bpf bpf /sys/fs/bpf`. `ip netns exec` mounts a fresh /sys without \
         it: enter a network namespace with `nsenter --net=/run/netns/NAME` instead"
    )]
    NotBpffs(PathBuf),
    /// The pin directory is not a directory the agent owns.
    #[error(
        "{path} is owned by uid {uid} (or is not a directory): another user could \
         replace the agent's pins; remove it, or `chown root` and `chmod 700` it"
    )]
    PinDirNotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// The cgroup to attach to is not a cgroup v2 directory.
    #[error(
        "{0} is not a cgroup v2 directory; pass --cgroup a directory under the \
         cgroup2 mount (e.g. /sys/fs/cgroup), or mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NotCgroup2(PathBuf),
    /// A map is missing from an object, has another layout, or an operation
    /// on it failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
    /// A map expected in the pin directory is not there.
    #[error("map {0} is not pinned; is lb-agent running with this --bpffs-dir?")]
    NotPinned(PathBuf),
    /// A program is missing from an object.
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded, attached or run.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The underlying error.
        source: ProgramError,
    },
    /// A socket program could not be loaded or attached to its cgroup
    /// hook; an older kernel lacks the hook.
    #[error(
        "program {name}: the kernel refused the cgroup/{name} hook, which needs \
         Linux {since} or later (this kernel: {running}): {source}"
    )]
    Hook {
        /// Program name, also the hook's.
        name: &'static str,
        /// The first kernel release with the hook.
        since: &'static str,
        /// The running kernel's release.
        running: String,
        /// The underlying error.
        source: Box<ProgramError>,
    },
    /// A link could not be taken over or adopted.
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
    /// A plan holds tc-path writes but the tc programs are not loaded.
    #[error("the tc datapath is not enabled (set --tc-interfaces)")]
    TcDisabled,
}

impl KernelError {
    /// The errno of a failed map operation, if that is what failed.
    pub fn map_errno(&self) -> Option<i32> {
        match self {
            KernelError::Map {
                source: MapError::SyscallError(SyscallError { io_error, .. }),
                ..
            } => io_error.raw_os_error(),
            _ => None,
        }
    }

    /// Whether a map refused a new entry because it is full (E2BIG from a
    /// hash map, ENOSPC from an LPM trie).
    pub fn is_map_full(&self) -> bool {
        matches!(self.map_errno(), Some(libc::E2BIG | libc::ENOSPC))
    }
}

/// Names the map of a failed map operation: `map.get(..).on(NAME)?`.
pub(crate) trait OnMap<T> {
    /// The result, its error a [`KernelError::Map`] of map `name`.
    fn on(self, name: &'static str) -> Result<T, KernelError>;
}

impl<T> OnMap<T> for Result<T, MapError> {
    fn on(self, name: &'static str) -> Result<T, KernelError> {
        self.map_err(|source| KernelError::Map { name, source })
    }
}

/// A failed map system call with `errno`, as the kernel reports it.
pub(crate) fn syscall_error(call: &'static str, errno: i32) -> MapError {
    MapError::SyscallError(SyscallError {
        call,
        io_error: io::Error::from_raw_os_error(errno),
    })
}

/// Deleting what is already gone is success: the goal state is reached.
pub(crate) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
