//! Port ranges as the prefixes of a trie: `endPort` ranges become the
//! fewest aligned blocks that cover them exactly.

/// The (first port, prefix length in bits of 16) blocks covering
/// `first..=last` exactly, in order.
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // The largest aligned block starting at `start` that fits.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros() as u8));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_ports_whole_ranges_and_odd_ranges() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(
            port_prefixes(5000, 5010),
            vec![(5000, 13), (5008, 15), (5010, 16)]
        );
        assert_eq!(port_prefixes(1, 65535).len(), 16);
    }

    proptest! {
        #[test]
        fn blocks_cover_the_range_exactly(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = port_prefixes(first, last);
            let covered: u32 = blocks.iter().map(|(_, len)| 1u32 << (16 - len)).sum();
            prop_assert_eq!(covered, u32::from(last) - u32::from(first) + 1);
            let mut next = u32::from(first);
            for (start, len) in blocks {
                prop_assert_eq!(u32::from(start), next);
                let size = 1u32 << (16 - len);
                prop_assert_eq!(u32::from(start) % size, 0, "aligned");
                next += size;
            }
            prop_assert_eq!(next, u32::from(last) + 1);
        }
    }
}
