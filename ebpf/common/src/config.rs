//! Node-wide settings the agent writes before it attaches each program set.

use crate::{assert_layout, net::Addr};

/// [`SockConfig::flags`]: translate only sockets of the node's own network
/// namespace (host processes, hostNetwork pods); pods are translated per
/// packet on their interfaces.
pub const SOCK_CONFIG_NODE_NETNS_ONLY: u32 = 1 << 0;
/// [`SockConfig::flags`]: a pod's `connect()` of a UDP socket to a Service
/// leaves the socket on the Service's address when the pod's network
/// namespace is in `POD_NETNS` and the frontend has a per-packet twin: the
/// programs on the pod's interface translate each datagram, so the socket
/// moves to a live backend when its own leaves without the agent.
pub const SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET: u32 = 1 << 1;

/// How the socket programs serve this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// Cookie of the node's own network namespace, where 127.0.0.0/8
    /// reaches NodePorts; 0 when unknown.
    pub node_netns: u64,
    /// `SOCK_CONFIG_*` flags.
    pub flags: u32,
    /// Explicit padding.
    pub pad: u32,
}
assert_layout!(SockConfig, 16, { node_netns: 0, flags: 8, pad: 12 });

/// [`TcConfig::flags`]: forward every translated packet on ingress with
/// `bpf_fib_lookup` and `bpf_redirect` (or `bpf_redirect_neigh`) instead of
/// handing it to the stack. Packets whose source was rewritten (SNAT, replies
/// now from a node address) are always forwarded this way: the stack would
/// drop them as martians.
pub const TC_CONFIG_FIB_REDIRECT: u32 = 1 << 0;
/// [`TcConfig::flags`]: ClusterIPs are translated per packet on pod
/// interfaces (the socket path is off for some or all pods); without it the
/// pod programs only check policy.
pub const TC_CONFIG_POD_LB: u32 = 1 << 1;
/// [`TcConfig::flags`]: UDP ClusterIPs are translated per packet on pod
/// interfaces, for pods' connected UDP sockets that the socket programs
/// leave on the ClusterIP (see `SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET`);
/// implied by [`TC_CONFIG_POD_LB`].
pub const TC_CONFIG_POD_LB_UDP: u32 = 1 << 2;

/// Value bit of `POD_INTERFACES`: the interface is the host end of a veth
/// or netkit pair, so packets to it are handed to its peer directly.
pub const POD_INTERFACE_PEER: u32 = 1 << 0;
/// Value bit of `POD_INTERFACES`: the interface is a policy endpoint's (a
/// known pod's): only that pod's addresses may leave by it. A pod interface
/// without it is one the agent knows no pod of yet (its packets' sources
/// are not checked, their destinations' policies are).
pub const POD_INTERFACE_ENDPOINT: u32 = 1 << 1;

/// Node-wide settings of the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcConfig {
    /// Seed of [`crate::maglev::flow_hash`]; must be identical on every node.
    pub maglev_seed: u64,
    /// SNAT address for IPv4 flows (IPv4-mapped); all zero: none.
    pub snat_v4: Addr,
    /// SNAT address for IPv6 flows; all zero: none.
    pub snat_v6: Addr,
    /// `TC_CONFIG_*` bits.
    pub flags: u32,
    /// The packet mark bit the pod programs set on a packet whose flow's
    /// policy they checked for both of its pods, so that the destination
    /// pod's egress program, on the same node, skips it (0: never skip).
    /// The bit cannot come from a pod: a packet's mark is cleared when it
    /// leaves a network namespace.
    pub policy_mark: u32,
}
assert_layout!(TcConfig, 48, {
    maglev_seed: 0, snat_v4: 8, snat_v6: 24, flags: 40, policy_mark: 44,
});

#[cfg(feature = "user")]
crate::user_pod!(SockConfig, TcConfig);
