//! Facts about the node and what the agent does to it outside BPF: mounts,
//! the node's network namespace, pod cgroups, interfaces, the boot-time
//! clock, and moving connected UDP sockets off removed backends (`sock_diag`
//! and descriptors borrowed from their processes).

pub mod cgroups;
pub mod clock;
pub mod interfaces;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod owners;
pub mod sockdiag;
pub mod sockets;
