//! Addresses as the maps store them, protocol numbers and TCP flags.

/// An IPv6 address, or an IPv4-mapped one, as four words whose memory layout is
/// the address in network byte order (as the kernel's `user_ip6` is laid out).
pub type Addr = [u32; 4];

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// Builds the IPv4-mapped [`Addr`] of an IPv4 address given as the kernel's
/// `user_ip4` word (network byte order in memory).
#[inline(always)]
pub const fn v4_mapped(ip4_be_word: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be_word]
}

/// Whether an [`Addr`] is IPv4-mapped, and so its last word is the IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Whether an [`Addr`] is IPv4-mapped and in 127.0.0.0/8.
#[inline(always)]
pub const fn is_v4_loopback(addr: &Addr) -> bool {
    is_v4_mapped(addr) && addr[3].to_ne_bytes()[0] == 127
}

/// 127.0.0.1, IPv4-mapped: the address localhost NodePort frontends are keyed by.
pub const V4_LOOPBACK: Addr = v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let word = u32::from_ne_bytes([10, 96, 0, 1]);
        let addr = v4_mapped(word);
        assert!(is_v4_mapped(&addr));
        assert_eq!(addr[3], word);
        assert!(!is_v4_mapped(&[0, 0, 0, 1]));
    }

    #[test]
    fn v4_loopback_is_all_of_127_slash_8_and_nothing_else() {
        let mapped = |octets: [u8; 4]| v4_mapped(u32::from_ne_bytes(octets));
        assert!(is_v4_loopback(&V4_LOOPBACK));
        assert!(is_v4_loopback(&mapped([127, 1, 2, 3])));
        assert!(!is_v4_loopback(&mapped([10, 0, 0, 127])));
        assert!(!is_v4_loopback(&mapped([128, 0, 0, 1])));
        let v6_loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert!(!is_v4_loopback(&v6_loopback));
    }
}
