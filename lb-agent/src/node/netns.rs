//! The agent's own network namespace, as the socket programs identify it:
//! its cookie (`SO_NETNS_COOKIE`, Linux 5.14), the value
//! `bpf_get_netns_cookie` returns for a socket in it.

use std::io;

use nix::{
    getsockopt_impl, sockopt_impl,
    sys::socket::{getsockopt, socket, AddressFamily, SockFlag, SockType},
};

sockopt_impl!(
    /// `SO_NETNS_COOKIE`: the cookie of the socket's network namespace.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

/// The cookie of the calling thread's network namespace.
pub fn own_cookie() -> io::Result<u64> {
    let probe = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(getsockopt(&probe, NetnsCookie)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_stable_and_not_zero() {
        let cookie = own_cookie().expect("SO_NETNS_COOKIE (Linux 5.14)");
        assert_ne!(cookie, 0);
        assert_eq!(own_cookie().unwrap(), cookie);
    }
}
