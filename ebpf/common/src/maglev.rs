//! Maglev tables of the tc path: `(generation, index)` -> backend id, for
//! `index` in `0..M`, plus the table size `M` itself at index
//! [`MAGLEV_SIZE_INDEX`]. Make before break: the agent writes a complete
//! table under a fresh generation (size entry last), flips the frontend's
//! `slot_generation`, then deletes the old generation (size entry first). A
//! reader that loses a race with the delete retries once on the new
//! generation. A new flow is placed at `table[flow_hash(..) % M]`.

use crate::{assert_layout, net::Addr};

/// The [`MaglevKey::index`] whose value is the table size `M`.
pub const MAGLEV_SIZE_INDEX: u32 = u32::MAX;

/// Key of a Maglev table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// The table generation: the
    /// [`ServiceValue::slot_generation`](crate::service::ServiceValue::slot_generation)
    /// of the frontends using it.
    pub generation: u32,
    /// Slot `0..M`, or [`MAGLEV_SIZE_INDEX`] for the size entry.
    pub index: u32,
}
assert_layout!(MaglevKey, 8, { generation: 0, index: 4 });

/// The hash a new flow is placed with: `table[flow_hash(..) % M]`. Covers the
/// source address, both ports and the protocol but not the destination
/// address, so a flow reaching any node address (or any node) lands on the
/// same slot. Ports are the 16-bit values as loaded from the packet (network
/// byte order in memory). Stable across versions, like the Maglev table
/// builder: changing it moves flows between backends.
#[inline(always)]
pub const fn flow_hash(seed: u64, saddr: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let words = [
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        ((sport as u32) << 16) | dport as u32,
        proto as u32,
    ];
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < words.len() {
        h = (h ^ words[i] as u64).wrapping_mul(PRIME);
        i += 1;
    }
    // MurmurHash3 fmix64.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h ^ (h >> 32)) as u32
}

#[cfg(feature = "user")]
crate::user_pod!(MaglevKey);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{v4_mapped, PROTO_TCP, PROTO_UDP};

    #[test]
    fn flow_hash_ignores_nothing_but_the_destination() {
        let a = v4_mapped(u32::from_ne_bytes([192, 0, 2, 1]));
        let h = flow_hash(7, &a, 1000, 80, PROTO_TCP);
        assert_eq!(h, flow_hash(7, &a, 1000, 80, PROTO_TCP));
        assert_ne!(h, flow_hash(8, &a, 1000, 80, PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1001, 80, PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1000, 81, PROTO_TCP));
        assert_ne!(h, flow_hash(7, &a, 1000, 80, PROTO_UDP));
    }
}
