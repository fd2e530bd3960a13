//! loadBalancerSourceRanges: an LPM trie of (service id, source prefix),
//! consulted for new flows to frontends flagged
//! [`SERVICE_FLAG_SOURCE_RANGES`](crate::service::SERVICE_FLAG_SOURCE_RANGES).

use crate::{assert_layout, net::Addr};

/// Key data of the source range trie; the LPM key's prefix length counts
/// from the first bit of `service_id_be`: `32 + 96 + n` for an IPv4 `/n`
/// (IPv4-mapped), `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// Service id, **big-endian** so the trie matches it bit by bit first.
    pub service_id_be: u32,
    /// Source address (prefix), network byte order.
    pub addr: Addr,
}
assert_layout!(SourceRangeKey, 20, { service_id_be: 0, addr: 4 });

/// Bits of an LPM key before the address: the service id.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

#[cfg(feature = "user")]
crate::user_pod!(SourceRangeKey);
