//! ICMP errors about translated flows, translated with them (RFC 5508
//! section 4, what conntrack's RELATED NAT does under kube-proxy). An error
//! quotes the packet it is about, and that packet carried one side's view of
//! a translated flow: a reply leaving as the frontend, or a request
//! delivered to a backend. The quote is rewritten to the other side's view,
//! and the outer source or destination that was the quoted packet's
//! destination or source with it, so the error reaches the socket that sent
//! the packet: a backend learns the smaller path MTU towards its client
//! (fragmentation needed, packet too big), a client's connected UDP socket
//! learns that the backend's port is closed.
//!
//! Handled: the outer and quoted headers without IPv4 options or IPv6
//! extension headers, a quoted TCP or UDP header (the 8 bytes every error
//! carries). A quoted TCP checksum lies beyond them and is left as it is,
//! as Linux NAT does; receivers match errors on addresses and ports.

use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, programs::TcContext};
use lb_common::{
    conntrack::{CtKey, CtValue},
    net::{v4_mapped, Addr, PROTO_TCP, PROTO_UDP},
};

use crate::{
    maps::{CONNTRACK, CT_PENDING},
    nat::{csum_diff, replace, sum_words},
    parse::{
        addr_eq, has_ports, load_into, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, ETH_LEN, ETH_P_IP,
        ETH_P_IPV6, ICMPV6_DEST_UNREACH, ICMP_DEST_UNREACH, ICMP_LEN, IPV4_LEN, IPV4_MF_OFFSET,
        IPV6_LEN, PROTO_ICMP, PROTO_ICMPV6,
    },
};

const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// The quoted transport header: ports, then UDP's length and checksum (the
/// TCP sequence number).
type QuotedL4 = [u16; 4];
/// Index of the UDP checksum in [`QuotedL4`].
const UDP_CHECK: usize = 3;

/// An error rewritten for its flow.
pub struct Translated {
    /// Its outer addresses now (ICMP protocol, no ports), to forward it by.
    pub outer: CtKey,
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// Whether its source changed: it now comes from a frontend, an address
    /// of this node the stack would drop as a martian source.
    pub source_changed: bool,
}

impl Translated {
    /// Before anything was translated.
    pub const NONE: Self = Self {
        outer: CtKey::new([0; 4], [0; 4], 0, 0, 0),
        v4: false,
        source_changed: false,
    };
}

/// Rewrites an ICMP or ICMPv6 error about a packet of a translated flow
/// and describes it in `out`; false (packet untouched) for anything else.
/// The result goes through `out` because a BPF function cannot return a
/// pointer to its own stack, which a returned struct would be; each family
/// has a call of its own so that only one frame is on the stack.
#[inline(always)]
pub fn translate(ctx: &TcContext, now: u64, out: &mut Translated) -> bool {
    match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(ETH_P_IP) => translate_v4(ctx, now, out),
        Ok(ETH_P_IPV6) => translate_v6(ctx, now, out),
        _ => false,
    }
}

/// The live entry of the flow for `key` (the quoted packet's tuple
/// reversed): its translation of `key`, reversed again, is the quoted
/// packet as the flow's other side sees it.
#[inline(always)]
fn flow_entry(key: &CtKey, now: u64) -> Option<&'static CtValue> {
    // An unconfirmed flow's entry is the first field of its pending value.
    let value = match CONNTRACK.get_ptr(key) {
        Some(value) => value,
        None => CT_PENDING.get_ptr(key)?.cast::<CtValue>(),
    };
    // SAFETY: a pointer from a successful lookup; the value is plain data
    // read at once, in this program run.
    let value = unsafe { &*value };
    (!value.expired(key.proto, now)).then_some(value)
}

/// The quoted transport header with the ports of `to` (the quoted packet
/// as the other side sees it, reversed) and, for UDP with a checksum, that
/// checksum updated for the new ports and addresses (its pseudo header),
/// whose words sum to `old_addrs` and `new_addrs`.
#[inline(always)]
fn quoted_l4(l4: &QuotedL4, proto: u8, old_addrs: u32, to: &CtKey, new_addrs: u32) -> QuotedL4 {
    let ports = [to.dport, to.sport];
    let mut new = [ports[0], ports[1], l4[2], l4[UDP_CHECK]];
    if proto == PROTO_UDP && l4[UDP_CHECK] != 0 {
        let check = replace(
            l4[UDP_CHECK],
            sum_words(old_addrs, &[l4[0], l4[1]]),
            sum_words(new_addrs, &ports),
        );
        // 0 means "no checksum" in UDP: a computed 0 is sent as all ones.
        new[UDP_CHECK] = if check == 0 { 0xffff } else { check };
    }
    new
}

#[inline(always)]
fn is_error_v4(kind: u8) -> bool {
    matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

#[inline(always)]
fn is_error_v6(kind: u8) -> bool {
    matches!(
        kind,
        ICMPV6_DEST_UNREACH
            | ICMPV6_PACKET_TOO_BIG
            | ICMPV6_TIME_EXCEEDED
            | ICMPV6_PARAMETER_PROBLEM
    )
}

/// The reversed tuple of a quoted packet.
#[inline(always)]
fn reversed_quote(saddr: &Addr, daddr: &Addr, l4: &QuotedL4, proto: u8) -> CtKey {
    CtKey::new(*daddr, *saddr, l4[1], l4[0], proto)
}

// Both rewrites store only the fields that change and update every
// checksum incrementally: copies of whole headers would not fit the stack
// left under the programs' main frame.

#[inline(never)]
fn translate_v4(ctx: &TcContext, now: u64, out: &mut Translated) -> bool {
    const ICMP_OFF: usize = ETH_LEN + IPV4_LEN;
    const QUOTE_OFF: usize = ICMP_OFF + ICMP_LEN;
    const L4_OFF: usize = QUOTE_OFF + IPV4_LEN;
    /// Offsets of the checksum and the addresses in an IPv4 header.
    const CHECK: usize = 10;
    const ADDRS: usize = 12;
    let Ok(outer) = ctx.load::<Ipv4Hdr>(ETH_LEN) else {
        return false;
    };
    if outer.version_ihl != 0x45
        || outer.proto != PROTO_ICMP
        || u16::from_be(outer.frag_off) & IPV4_MF_OFFSET != 0
    {
        return false;
    }
    let Ok(icmp) = ctx.load::<IcmpHdr>(ICMP_OFF) else {
        return false;
    };
    let Ok(quote) = ctx.load::<Ipv4Hdr>(QUOTE_OFF) else {
        return false;
    };
    let Ok(l4) = ctx.load::<QuotedL4>(L4_OFF) else {
        return false;
    };
    if !is_error_v4(icmp.kind)
        || quote.version_ihl != 0x45
        || !matches!(quote.proto, PROTO_TCP | PROTO_UDP)
    {
        return false;
    }
    let key = reversed_quote(
        &v4_mapped(quote.saddr),
        &v4_mapped(quote.daddr),
        &l4,
        quote.proto,
    );
    let Some(entry) = flow_entry(&key, now) else {
        return false;
    };
    let to = entry.apply(&key);
    // The quoted packet becomes `to` reversed.
    let new_quote = [to.daddr[3], to.saddr[3]];
    let old_addrs = sum_words(0, &[quote.saddr, quote.daddr]);
    let new_addrs = sum_words(0, &new_quote);
    let quote_check = replace(quote.check, old_addrs, new_addrs);
    let new_l4 = quoted_l4(&l4, quote.proto, old_addrs, &to, new_addrs);
    let new_outer = [
        if outer.saddr == quote.daddr {
            new_quote[1]
        } else {
            outer.saddr
        },
        if outer.daddr == quote.saddr {
            new_quote[0]
        } else {
            outer.daddr
        },
    ];
    let outer_check = replace(
        outer.check,
        sum_words(0, &[outer.saddr, outer.daddr]),
        sum_words(0, &new_outer),
    );
    // ICMP's checksum covers the quote, not the outer header.
    let icmp_check = replace(
        icmp.check,
        sum_words(old_addrs + u32::from(quote.check), &l4),
        sum_words(new_addrs + u32::from(quote_check), &new_l4),
    );
    if ctx.store(ETH_LEN + CHECK, &outer_check, 0).is_err()
        || ctx.store(ETH_LEN + ADDRS, &new_outer, 0).is_err()
        || ctx.store(ICMP_OFF + 2, &icmp_check, 0).is_err()
        || ctx.store(QUOTE_OFF + CHECK, &quote_check, 0).is_err()
        || ctx.store(QUOTE_OFF + ADDRS, &new_quote, 0).is_err()
        || ctx.store(L4_OFF, &new_l4, 0).is_err()
    {
        return false;
    }
    *out = Translated {
        outer: CtKey::new(
            v4_mapped(new_outer[0]),
            v4_mapped(new_outer[1]),
            0,
            0,
            PROTO_ICMP,
        ),
        v4: true,
        source_changed: new_outer[0] != outer.saddr,
    };
    true
}

/// The IPv6 addresses take many registers: the checksum differences are
/// left to the kernel (`bpf_csum_diff`), so that no sum is spilled to the
/// stack, and applied with `bpf_l4_csum_replace`.
#[inline(never)]
fn translate_v6(ctx: &TcContext, now: u64, out: &mut Translated) -> bool {
    const ICMP_OFF: usize = ETH_LEN + IPV6_LEN;
    const QUOTE_OFF: usize = ICMP_OFF + ICMP_LEN;
    const L4_OFF: usize = QUOTE_OFF + IPV6_LEN;
    /// Offsets of the next header and the addresses in an IPv6 header.
    const NEXT: usize = 6;
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    if ctx.load::<u8>(ETH_LEN + NEXT) != Ok(PROTO_ICMPV6) {
        return false;
    }
    let Ok(icmp) = ctx.load::<IcmpHdr>(ICMP_OFF) else {
        return false;
    };
    let Ok(quoted_next) = ctx.load::<u8>(QUOTE_OFF + NEXT) else {
        return false;
    };
    if !is_error_v6(icmp.kind) || !matches!(quoted_next, PROTO_TCP | PROTO_UDP) {
        return false;
    }
    let mut outer: [Addr; 2] = [[0; 4]; 2];
    let mut quote: [Addr; 2] = [[0; 4]; 2];
    let mut l4: QuotedL4 = [0; 4];
    if !load_into(ctx, ETH_LEN + SADDR, &mut outer)
        || !load_into(ctx, QUOTE_OFF + SADDR, &mut quote)
        || !load_into(ctx, L4_OFF, &mut l4)
    {
        return false;
    }
    let mut to = reversed_quote(&quote[0], &quote[1], &l4, quoted_next);
    let Some(entry) = flow_entry(&to, now) else {
        return false;
    };
    // The quoted packet becomes `to` reversed.
    entry.rewrite(&mut to);
    let ports = [to.dport, to.sport];
    let Some(quote_diff) =
        csum_diff(&quote[0], &to.daddr, 0).and_then(|d| csum_diff(&quote[1], &to.saddr, d))
    else {
        return false;
    };
    let mut new_l4 = l4;
    if quoted_next == PROTO_UDP {
        // The UDP checksum covers a pseudo header with the addresses.
        let Some(udp_diff) = csum_diff(&[l4[0], l4[1]], &ports, quote_diff) else {
            return false;
        };
        let flags = BPF_F_MARK_MANGLED_0 as u64;
        if ctx
            .l4_csum_replace(L4_OFF + 6, 0, u64::from(udp_diff), flags)
            .is_err()
            || !load_into(ctx, L4_OFF, &mut new_l4)
        {
            return false;
        }
    }
    new_l4[0] = ports[0];
    new_l4[1] = ports[1];
    let source_changed = addr_eq(&outer[0], &quote[1]);
    let new_saddr = if source_changed { &to.saddr } else { &outer[0] };
    let new_daddr = if addr_eq(&outer[1], &quote[0]) {
        &to.daddr
    } else {
        &outer[1]
    };
    // ICMPv6's checksum covers a pseudo header with the outer addresses,
    // the quote's addresses and its transport header.
    let Some(icmp_diff) = csum_diff(&outer[0], new_saddr, quote_diff)
        .and_then(|d| csum_diff(&outer[1], new_daddr, d))
        .and_then(|d| csum_diff(&l4, &new_l4, d))
    else {
        return false;
    };
    if ctx.store(ETH_LEN + SADDR, new_saddr, 0).is_err()
        || ctx.store(ETH_LEN + DADDR, new_daddr, 0).is_err()
        || ctx.store(QUOTE_OFF + SADDR, &to.daddr, 0).is_err()
        || ctx.store(QUOTE_OFF + DADDR, &to.saddr, 0).is_err()
        || ctx.store(L4_OFF, &ports, 0).is_err()
        || ctx
            .l4_csum_replace(ICMP_OFF + 2, 0, u64::from(icmp_diff), 0)
            .is_err()
    {
        return false;
    }
    *out = Translated {
        outer: CtKey::new(*new_saddr, *new_daddr, 0, 0, PROTO_ICMPV6),
        v4: false,
        source_changed,
    };
    true
}

/// Writes to `out` the tuple of the packet an ICMP or ICMPv6 error quotes,
/// when `pkt` is such an error about a TCP, UDP or SCTP packet whose quote
/// has no IPv4 options or IPv6 extension headers: policy lets errors of
/// allowed flows through as their packets go.
#[inline(never)]
pub fn quoted_flow(ctx: &TcContext, pkt: &Packet, out: &mut CtKey) -> bool {
    let Ok(icmp) = ctx.load::<IcmpHdr>(pkt.l4_off) else {
        return false;
    };
    let quote_off = pkt.l4_off + ICMP_LEN;
    if pkt.v4 {
        let Ok(quote) = ctx.load::<Ipv4Hdr>(quote_off) else {
            return false;
        };
        if pkt.tuple.proto != PROTO_ICMP || !is_error_v4(icmp.kind) || quote.version_ihl != 0x45 {
            return false;
        }
        let Ok(ports) = ctx.load::<[u16; 2]>(quote_off + IPV4_LEN) else {
            return false;
        };
        *out = CtKey::new(
            v4_mapped(quote.saddr),
            v4_mapped(quote.daddr),
            ports[0],
            ports[1],
            quote.proto,
        );
    } else {
        let Ok(quote) = ctx.load::<Ipv6Hdr>(quote_off) else {
            return false;
        };
        if pkt.tuple.proto != PROTO_ICMPV6 || !is_error_v6(icmp.kind) {
            return false;
        }
        let Ok(ports) = ctx.load::<[u16; 2]>(quote_off + IPV6_LEN) else {
            return false;
        };
        *out = CtKey::new(
            quote.saddr,
            quote.daddr,
            ports[0],
            ports[1],
            quote.next_header,
        );
    }
    has_ports(out.proto)
}

/// Whether an ICMPv6 message of type `kind` is neighbour discovery or
/// multicast listener discovery, which IPv6 needs to work at all (RFC 4861,
/// RFC 3810): policy does not apply to it.
#[inline(always)]
pub fn is_discovery_v6(kind: u8) -> bool {
    matches!(kind, 130..=137 | 143)
}
