//! The socket programs' own state: per-socket reverse translations, the set
//! of backend ports that lets untranslated sockets skip them, and the cgroups
//! that opted out of socket-level translation.

use crate::{assert_layout, net::Addr};

/// Words of the backend port set ([`crate::maps::BACKEND_PORTS`]): one bit
/// per port.
pub const BACKEND_PORT_WORDS: u32 = 65_536 / 64;

/// The word of the backend port set that holds `port` (network byte order,
/// as the socket hooks see it) and its bit in that word.
pub const fn backend_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Key of the per-socket reverse translation: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend address the socket was steered to.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding.
    pub pad: [u8; 6],
}
assert_layout!(SockRevNatKey, 32, { cookie: 0, addr: 8, port: 24, pad: 26 });

impl SockRevNatKey {
    /// The key of the socket with `cookie` sent to backend `addr`:`port`.
    pub const fn new(cookie: u64, addr: Addr, port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            pad: [0; 6],
        }
    }
}

#[cfg(feature = "user")]
crate::user_pod!(SockRevNatKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_has_its_own_bit() {
        assert_eq!(backend_port_bit(0), (0, 1));
        assert_eq!(backend_port_bit(65), (1, 2));
        assert_eq!(
            backend_port_bit(u16::MAX),
            (BACKEND_PORT_WORDS - 1, 1 << 63)
        );
    }
}
