//! Header parsing: Ethernet, IPv4 or IPv6 (with up to
//! [`MAX_IPV6_EXTENSIONS`] extension headers), TCP or UDP, fragments included:
//! the first fragment of a datagram records its ports in [`FRAGMENTS`] and
//! the later ones, which carry no L4 header, take them from there.
//!
//! Headers are copied out with `bpf_skb_load_bytes` (through
//! [`TcContext::load`]) rather than read through packet pointers: every read
//! is bounds-checked by the helper, stays valid across the rewrites done
//! with `bpf_skb_store_bytes`, and works on non-linear skbs.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use lb_common::{
    conntrack::CtKey,
    fragment::{FragKey, FragPorts},
    net::{v4_mapped, Addr, PROTO_TCP, PROTO_UDP},
    policy::PROTO_SCTP,
};

use crate::maps::FRAGMENTS;

/// Length of an Ethernet header.
pub const ETH_LEN: usize = 14;
/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Length of an IPv6 header.
pub const IPV6_LEN: usize = 40;
/// Length of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;

/// IPv6 extension headers walked before giving up on a packet.
pub const MAX_IPV6_EXTENSIONS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;
/// Length of the IPv6 fragment header.
const IPV6_FRAG_LEN: usize = 8;
/// IPv4 flags and offset: more fragments, offset.
pub const IPV4_MF_OFFSET: u16 = 0x3fff;
const IPV4_OFFSET: u16 = 0x1fff;
/// IPv6 fragment offset (the low 3 bits are flags).
const IPV6_OFFSET: u16 = 0xfff8;

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

/// The IPv6 fragment header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6FragHdr {
    next_header: u8,
    reserved: u8,
    /// Offset in 8-byte units (high 13 bits) and flags.
    frag_off: u16,
    id: u32,
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

/// Length of an ICMP (ICMPv6) error header.
pub const ICMP_LEN: usize = 8;
/// IP protocol numbers of ICMP and ICMPv6.
pub const PROTO_ICMP: u8 = 1;
/// See [`PROTO_ICMP`].
pub const PROTO_ICMPV6: u8 = 58;
/// ICMP destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv6 destination unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;

/// The header of an ICMP or ICMPv6 error message.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    /// Message type.
    pub kind: u8,
    /// Message code.
    pub code: u8,
    /// Checksum.
    pub check: u16,
    /// Zero, or the next hop MTU / pointer of some errors.
    pub unused: u32,
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
    /// Whether the packet carries the L4 header (not a later fragment).
    pub l4: bool,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TCP acknowledgment number, host order (0 for UDP).
    pub tcp_ack: u32,
    /// Whether the ports are known: false for a later fragment whose first
    /// fragment was not seen (only [`parse_flow`] returns such packets).
    pub ports_known: bool,
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

/// Whether and how a packet is a fragment. Plain fields, always
/// initialised: the verifier rejects reads of the undefined payload LLVM
/// leaves in a `None`.
#[derive(Clone, Copy)]
struct Fragment {
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    kind: u8,
    /// IPv4 identification or IPv6 fragment identification.
    id: u32,
}

const NOT_FRAGMENT: u8 = 0;
/// The fragment with the L4 header.
const FIRST_FRAGMENT: u8 = 1;
const LATER_FRAGMENT: u8 = 2;

impl Fragment {
    const NONE: Self = Self {
        kind: NOT_FRAGMENT,
        id: 0,
    };

    #[inline(always)]
    fn new(id: u32, first: bool) -> Self {
        Self {
            kind: if first {
                FIRST_FRAGMENT
            } else {
                LATER_FRAGMENT
            },
            id,
        }
    }
}

/// Parses the packet for service translation; `None` for anything the
/// datapath does not translate (other protocols, IPv4 options-only garbage,
/// more than [`MAX_IPV6_EXTENSIONS`] IPv6 extension headers, a later
/// fragment whose first fragment was not seen, truncation). Not inlined:
/// its frame is not part of the deepest call chain's 512-byte stack budget.
#[inline(never)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    parse_ip(ctx, false)
}

/// Parses any IP packet for policy: TCP, UDP and SCTP with their ports,
/// other protocols with ports 0, a later fragment whose first was not seen
/// with [`Packet::ports_known`] false. `None` for what is not IPv4 or IPv6.
#[inline(never)]
pub fn parse_flow(ctx: &TcContext) -> Option<Packet> {
    parse_ip(ctx, true)
}

/// Whether a protocol's header starts with 16-bit source and destination
/// ports.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP
}

/// Bytes from the ethertype to the TCP flags of the most common packet:
/// the ethertype, an IPv4 header without options and the first 14 bytes of
/// a TCP header (or a UDP header and 6 bytes of payload). Plain bytes: a
/// struct would have padding after the ethertype.
const V4_HEADERS_LEN: usize = 2 + IPV4_LEN + 14;
/// Offsets in those bytes.
const AT_VERSION_IHL: usize = 2;
const AT_TOT_LEN: usize = 4;
const AT_FRAG_OFF: usize = 8;
const AT_PROTO: usize = 11;
const AT_SADDR: usize = 14;
const AT_DADDR: usize = 18;
const AT_PORTS: usize = 22;
const AT_TCP_ACK: usize = 30;
const AT_TCP_FLAGS: usize = 35;

/// An unfragmented IPv4 TCP or UDP packet without IP options, long enough
/// for [`V4_HEADERS_LEN`] bytes: parsed from one load (the general path
/// takes one per header).
#[inline(always)]
fn parse_v4_common(ctx: &TcContext) -> Option<Packet> {
    let b: [u8; V4_HEADERS_LEN] = ctx.load(12).ok()?;
    let word = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let half = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let proto = b[AT_PROTO];
    let common = u16::from_be(half(0)) == ETH_P_IP
        && b[AT_VERSION_IHL] == 0x45
        && u16::from_be(half(AT_FRAG_OFF)) & IPV4_MF_OFFSET == 0
        && (proto == PROTO_TCP || proto == PROTO_UDP)
        && whole_l4_header(
            ctx,
            ETH_LEN + IPV4_LEN,
            proto,
            ip_end(ctx, ETH_LEN, u16::from_be(half(AT_TOT_LEN))),
        );
    if !common {
        return None;
    }
    Some(Packet {
        tuple: CtKey::new(
            v4_mapped(word(AT_SADDR)),
            v4_mapped(word(AT_DADDR)),
            half(AT_PORTS),
            half(AT_PORTS + 2),
            proto,
        ),
        v4: true,
        l4_off: ETH_LEN + IPV4_LEN,
        l4: true,
        tcp_flags: if proto == PROTO_TCP {
            b[AT_TCP_FLAGS]
        } else {
            0
        },
        tcp_ack: if proto == PROTO_TCP {
            u32::from_be(word(AT_TCP_ACK))
        } else {
            0
        },
        ports_known: true,
    })
}

#[inline(always)]
fn parse_ip(ctx: &TcContext, any_protocol: bool) -> Option<Packet> {
    if let Some(pkt) = parse_v4_common(ctx) {
        return Some(pkt);
    }
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v4, saddr, daddr, proto, l4_off, fragment, end) = if ethertype == ETH_P_IP {
        let ip: Ipv4Hdr = ctx.load(ETH_LEN).ok()?;
        let ihl = (ip.version_ihl & 0x0f) as usize;
        if ip.version_ihl >> 4 != 4 || ihl < 5 {
            return None;
        }
        let frag_off = u16::from_be(ip.frag_off);
        let fragment = if frag_off & IPV4_MF_OFFSET == 0 {
            Fragment::NONE
        } else {
            Fragment::new(u32::from(u16::from_be(ip.id)), frag_off & IPV4_OFFSET == 0)
        };
        (
            true,
            v4_mapped(ip.saddr),
            v4_mapped(ip.daddr),
            ip.proto,
            ETH_LEN + ihl * 4,
            fragment,
            ip_end(ctx, ETH_LEN, u16::from_be(ip.tot_len)),
        )
    } else if ethertype == ETH_P_IPV6 {
        let ip: Ipv6Hdr = ctx.load(ETH_LEN).ok()?;
        let (next, off, fragment) = ipv6_extensions(ctx, ip.next_header)?;
        let end = ip_end(ctx, ETH_LEN + IPV6_LEN, u16::from_be(ip.payload_len));
        (false, ip.saddr, ip.daddr, next, off, fragment, end)
    } else {
        return None;
    };
    let translatable = proto == PROTO_TCP || proto == PROTO_UDP;
    if !translatable && !any_protocol {
        return None;
    }
    let mut tuple = CtKey::new(saddr, daddr, 0, 0, proto);
    if !has_ports(proto) {
        return Some(Packet {
            tuple,
            v4,
            l4_off,
            l4: fragment.kind != LATER_FRAGMENT,
            tcp_flags: 0,
            tcp_ack: 0,
            ports_known: true,
        });
    }
    let frag_key = FragKey {
        saddr,
        daddr,
        id: fragment.id,
        proto,
        pad: [0; 3],
    };
    let l4 = fragment.kind != LATER_FRAGMENT;
    // A header cut short (a truncated packet, a tiny first fragment) cannot
    // be rewritten: not a flow.
    if l4 && !whole_l4_header(ctx, l4_off, proto, end) {
        return None;
    }
    let mut ports_known = true;
    let mut tcp_ack = 0;
    let tcp_flags = if l4 {
        let ports: [u16; 2] = ctx.load(l4_off).ok()?;
        tuple.sport = ports[0];
        tuple.dport = ports[1];
        if fragment.kind == FIRST_FRAGMENT {
            let ports = FragPorts {
                sport: ports[0],
                dport: ports[1],
            };
            // A full LRU evicts the oldest datagram: its later fragments
            // then pass untranslated, as they would without this map.
            let _ = FRAGMENTS.insert(&frag_key, &ports, 0);
        }
        if proto == PROTO_TCP {
            tcp_ack = u32::from_be(ctx.load::<u32>(l4_off + 8).ok()?);
            ctx.load::<u8>(l4_off + 13).ok()?
        } else {
            0
        }
    } else {
        // SAFETY: copied out at once.
        match unsafe { FRAGMENTS.get(&frag_key) }.copied() {
            Some(ports) => {
                tuple.sport = ports.sport;
                tuple.dport = ports.dport;
            }
            None if any_protocol => ports_known = false,
            None => return None,
        }
        0
    };
    Some(Packet {
        tuple,
        v4,
        l4_off,
        l4,
        tcp_flags,
        tcp_ack,
        ports_known,
    })
}

/// Where an IP packet whose header gives `length` bytes from `start` ends
/// in the frame: a length of 0 is a BIG TCP packet's (over 64 KiB, its
/// length in the skb only).
#[inline(always)]
fn ip_end(ctx: &TcContext, start: usize, length: u16) -> usize {
    if length == 0 {
        ctx.len() as usize
    } else {
        start + usize::from(length)
    }
}

/// Whether the IP packet, which its header says ends at `ip_end`, holds
/// the whole fixed header of `proto` (TCP 20 bytes, UDP 8, SCTP 12) at
/// `l4_off`, and the frame holds the IP packet: the rewrite touches the
/// transport checksum, and a packet whose lengths lie is not forwarded.
#[inline(always)]
fn whole_l4_header(ctx: &TcContext, l4_off: usize, proto: u8, ip_end: usize) -> bool {
    let header = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => 12,
    };
    l4_off + header <= ip_end && ip_end <= ctx.len() as usize
}

/// Walks the IPv6 extension headers after a fixed header whose next header
/// is `next`: the L4 protocol, its offset and the fragment header's data.
#[inline(always)]
fn ipv6_extensions(ctx: &TcContext, mut next: u8) -> Option<(u8, usize, Fragment)> {
    let mut off = ETH_LEN + IPV6_LEN;
    let mut fragment = Fragment::NONE;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let header: [u8; 2] = ctx.load(off).ok()?;
                next = header[0];
                off += (header[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let header: Ipv6FragHdr = ctx.load(off).ok()?;
                next = header.next_header;
                off += IPV6_FRAG_LEN;
                fragment = Fragment::new(
                    u32::from_be(header.id),
                    u16::from_be(header.frag_off) & IPV6_OFFSET == 0,
                );
            }
            _ => return Some((next, off, fragment)),
        }
    }
    // Still an extension header after the last one walked: given up.
    let walked = !matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DEST_OPTIONS
    );
    walked.then_some((next, off, fragment))
}

/// Loads `size_of::<T>()` bytes at `offset` straight into `dst`: unlike
/// [`TcContext::load`], no second copy on the stack, which matters where
/// the stack is short. False when out of the packet.
#[inline(always)]
pub fn load_into<T: Copy>(ctx: &TcContext, offset: usize, dst: &mut T) -> bool {
    // SAFETY: the helper writes exactly `size_of::<T>()` bytes to `dst`,
    // and callers pass plain integer arrays, valid for any bytes.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            offset as u32,
            (dst as *mut T).cast::<c_void>(),
            core::mem::size_of::<T>() as u32,
        ) == 0
    }
}

/// Whether two addresses are equal. Compares word by word: LLVM turns `==`
/// on `[u32; 4]` into 128-bit operations the BPF backend cannot lower.
#[inline(always)]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}
