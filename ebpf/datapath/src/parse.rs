//! Header parsing: Ethernet, IPv4 or IPv6 (no extension headers), TCP or UDP.
//!
//! Headers are copied out with `bpf_skb_load_bytes` (through
//! [`TcContext::load`]) rather than read through packet pointers: every read
//! is bounds-checked by the helper, stays valid across the rewrites done
//! with `bpf_skb_store_bytes`, and works on non-linear skbs.

use aya_ebpf::programs::TcContext;
use lb_common::{tc::CtKey, v4_mapped, Addr, PROTO_TCP, PROTO_UDP};

/// Length of an Ethernet header.
pub const ETH_LEN: usize = 14;
/// Offset of the source MAC address in the Ethernet header.
pub const ETH_SRC_OFF: usize = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Length of an IPv6 header.
pub const IPV6_LEN: usize = 40;
/// Length of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;

/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// The IPv4 header (without options), fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version (4) and header length in words.
    pub version_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset.
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
}

/// The IPv6 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label.
    pub version_flow: u32,
    /// Payload length.
    pub payload_len: u16,
    /// Next header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub saddr: Addr,
    /// Destination address.
    pub daddr: Addr,
}

/// The TCP header without options, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack_seq: u32,
    /// Data offset (high nibble).
    pub doff: u8,
    /// Flags.
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Checksum.
    pub check: u16,
    /// Urgent pointer.
    pub urg_ptr: u16,
}

/// A parsed packet: its tuple and where its headers are.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Addresses (IPv4-mapped for IPv4), ports and protocol as they arrived.
    pub tuple: CtKey,
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// Offset of the TCP or UDP header.
    pub l4_off: usize,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

impl Packet {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.tuple.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// Parses the packet; `None` for anything the datapath does not translate
/// (other protocols, IPv4 fragments, IPv6 extension headers, truncation).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v4, saddr, daddr, proto, l4_off) = if ethertype == ETH_P_IP {
        let ip: Ipv4Hdr = ctx.load(ETH_LEN).ok()?;
        let ihl = (ip.version_ihl & 0x0f) as usize;
        // More fragments, or not the first fragment: no L4 header to use.
        if ip.version_ihl >> 4 != 4 || ihl < 5 || u16::from_be(ip.frag_off) & 0x3fff != 0 {
            return None;
        }
        (
            true,
            v4_mapped(ip.saddr),
            v4_mapped(ip.daddr),
            ip.proto,
            ETH_LEN + ihl * 4,
        )
    } else if ethertype == ETH_P_IPV6 {
        let ip: Ipv6Hdr = ctx.load(ETH_LEN).ok()?;
        (
            false,
            ip.saddr,
            ip.daddr,
            ip.next_header,
            ETH_LEN + IPV6_LEN,
        )
    } else {
        return None;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4_off).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + 13).ok()?
    } else {
        0
    };
    Some(Packet {
        tuple: CtKey {
            saddr,
            daddr,
            sport: ports[0],
            dport: ports[1],
            proto,
            pad: [0; 3],
        },
        v4,
        l4_off,
        tcp_flags,
    })
}

/// Whether two addresses are equal. Compares word by word: LLVM turns `==`
/// on `[u32; 4]` into 128-bit operations the BPF backend cannot lower.
#[inline(always)]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}
