//! Conversions between std addresses and the datapath's [`Addr`] layout,
//! ports in network byte order, and protocol names.

use std::net::{IpAddr, Ipv6Addr};

use lb_common::net::{Addr, PROTO_TCP, PROTO_UDP};

/// The datapath form of an address: IPv6 as is, IPv4 as IPv4-mapped IPv6.
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The std form of a datapath address; IPv4-mapped addresses become IPv4.
pub fn ip_from_addr(addr: &Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A port in the network byte order the maps use.
pub const fn port_to_be(port: u16) -> u16 {
    port.to_be()
}

/// A port from the maps' network byte order.
pub const fn port_from_be(port: u16) -> u16 {
    u16::from_be(port)
}

/// `TCP`, `UDP` or the protocol number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_match_the_kernel_layout() {
        let v4: IpAddr = "10.96.0.1".parse().unwrap();
        let addr = addr_from_ip(v4);
        assert!(lb_common::net::is_v4_mapped(&addr));
        assert_eq!(addr[3], u32::from_ne_bytes([10, 96, 0, 1]));
        assert_eq!(
            addr,
            lb_common::net::v4_mapped(u32::from_ne_bytes([10, 96, 0, 1]))
        );
        assert_eq!(ip_from_addr(&addr), v4);
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        assert_eq!(ip_from_addr(&addr_from_ip(v6)), v6);
        assert_eq!(port_from_be(port_to_be(8080)), 8080);
    }
}
