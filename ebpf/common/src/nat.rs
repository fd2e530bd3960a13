//! Source NAT of the tc path: flows to backends on other nodes (under
//! externalTrafficPolicy Cluster) leave with a node address and a port from
//! this range, claimed as the key of the flow's reply conntrack entry.

/// First port used for SNAT: above Linux's default ephemeral range
/// (32768-60999), so the node's own sockets do not collide.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of ports used for SNAT from [`SNAT_PORT_MIN`] (up to 65535).
pub const SNAT_PORT_COUNT: u16 = 4_536;

const _: () = assert!(SNAT_PORT_MIN as u32 + SNAT_PORT_COUNT as u32 <= 65_536);
