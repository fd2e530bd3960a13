//! The policy CIDRs, indexed for the longest match of an address.

use std::{collections::BTreeMap, net::IpAddr};

use ipnetwork::IpNetwork;
use rustc_hash::FxHashMap;

/// An address as a number, and the bits it has.
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// `value` (of `width` bits) with only its first `prefix` bits.
fn masked(value: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        value & (u128::MAX << (width - prefix)) & (u128::MAX >> (128 - width))
    }
}

/// CIDRs with their identities, by family and prefix length.
#[derive(Clone, Debug, Default)]
pub(super) struct CidrIndex {
    /// Per family (IPv4, IPv6): prefix lengths, longest first, each with
    /// its CIDRs by masked address.
    families: [Vec<(u8, FxHashMap<u128, u32>)>; 2],
}

impl CidrIndex {
    /// The index of `cidrs`.
    pub(super) fn new(cidrs: &BTreeMap<IpNetwork, u32>) -> Self {
        let mut index = Self::default();
        for (cidr, id) in cidrs {
            let (value, width) = bits(cidr.network());
            let family = &mut index.families[usize::from(width == 128)];
            let prefix = cidr.prefix();
            let position = match family.iter().position(|(p, _)| *p <= prefix) {
                Some(i) if family[i].0 == prefix => i,
                Some(i) => {
                    family.insert(i, (prefix, FxHashMap::default()));
                    i
                }
                None => {
                    family.push((prefix, FxHashMap::default()));
                    family.len() - 1
                }
            };
            family[position].1.insert(masked(value, width, prefix), *id);
        }
        index
    }

    /// The identity of the longest CIDR holding `ip`.
    pub(super) fn longest(&self, ip: IpAddr) -> Option<u32> {
        self.longest_within(ip, u8::MAX)
    }

    /// The identity of the longest CIDR holding `ip` that is not longer
    /// than `at_most` bits.
    pub(super) fn longest_within(&self, ip: IpAddr, at_most: u8) -> Option<u32> {
        let (value, width) = bits(ip);
        self.families[usize::from(width == 128)]
            .iter()
            .filter(|(prefix, _)| *prefix <= at_most)
            .find_map(|(prefix, map)| map.get(&masked(value, width, *prefix)).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_cidr_of_the_family_wins() {
        let cidrs: BTreeMap<IpNetwork, u32> = [
            ("0.0.0.0/0", 1),
            ("10.0.0.0/8", 2),
            ("10.1.0.0/16", 3),
            ("10.1.2.3/32", 4),
            ("::/0", 5),
            ("fd00::/8", 6),
        ]
        .into_iter()
        .map(|(c, id)| (c.parse().unwrap(), id))
        .collect();
        let index = CidrIndex::new(&cidrs);
        let at = |ip: &str| index.longest(ip.parse().unwrap());
        assert_eq!(at("10.1.2.3"), Some(4));
        assert_eq!(at("10.1.2.4"), Some(3));
        assert_eq!(at("10.2.0.1"), Some(2));
        assert_eq!(at("192.0.2.1"), Some(1));
        assert_eq!(at("fd00::1"), Some(6));
        assert_eq!(at("2001:db8::1"), Some(5));
        assert_eq!(
            index.longest_within("10.1.2.3".parse().unwrap(), 16),
            Some(3)
        );
        assert_eq!(
            CidrIndex::default().longest("10.0.0.1".parse().unwrap()),
            None
        );
    }
}
