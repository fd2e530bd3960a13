//! The node's network interfaces: their addresses, and which ones a set of
//! name prefixes names.

use std::{collections::BTreeSet, io, net::IpAddr};

/// Global unicast addresses of the named interfaces.
pub fn addresses_of(interfaces: &[String]) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        if !interfaces.contains(&ifaddr.interface_name) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip: IpAddr = if let Some(v4) = address.as_sockaddr_in() {
            v4.ip().into()
        } else if let Some(v6) = address.as_sockaddr_in6() {
            v6.ip().into()
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !link_local && !ip.is_loopback() {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Names of the interfaces that start with one of `prefixes`.
pub fn named(prefixes: &[String]) -> io::Result<BTreeSet<String>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .map(|a| a.interface_name)
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p.as_str())))
        .collect())
}

/// The index of interface `name`, if it exists.
pub fn index_of(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_prefix_and_has_no_global_address() {
        let names = named(&["lo".to_string()]).unwrap();
        assert!(names.contains("lo"), "{names:?}");
        assert!(addresses_of(&["lo".to_string()]).unwrap().is_empty());
        assert_eq!(index_of("lo"), Some(1));
    }
}
