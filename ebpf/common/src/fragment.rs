//! Fragmented datagrams of the tc path: the first fragment, which carries
//! the ports, records them so that the later ones find their flow.

use crate::{assert_layout, net::Addr};

/// One fragmented datagram, as its IP headers name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address (IPv4-mapped for IPv4).
    pub saddr: Addr,
    /// Destination address.
    pub daddr: Addr,
    /// IPv4 identification or IPv6 fragment identification, host order.
    pub id: u32,
    /// The L4 protocol.
    pub proto: u8,
    /// Explicit padding.
    pub pad: [u8; 3],
}
assert_layout!(FragKey, 40, { saddr: 0, daddr: 16, id: 32, proto: 36, pad: 37 });

/// The ports of a fragmented datagram, from its first fragment, as loaded
/// from the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}
assert_layout!(FragPorts, 4, { sport: 0, dport: 2 });
