//! Facts about the node and what the agent does to it outside BPF: mounts,
//! the node's network namespace, pod cgroups, interfaces, the boot-time
//! clock, and terminating sockets through `sock_diag`.

pub mod cgroups;
pub mod clock;
pub mod interfaces;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod sockdiag;
pub mod sockets;
