//! The XDP prefilter on the node's uplinks: before the stack (or the tc
//! programs) spends anything on a packet, drop those from sources in the
//! configured deny list, and those to a LoadBalancer IP with
//! loadBalancerSourceRanges from a source outside them (the tc path checks
//! the same ranges for new flows; here every packet is checked). Reads the
//! headers in place, with the bounds checks the verifier asks for; anything
//! it cannot read passes on to the tc programs.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    net::{v4_mapped, Addr, PROTO_TCP, PROTO_UDP},
    outcome::Outcome,
    service::{ServiceKey, SCOPE_TC_EXTERNAL, SERVICE_FLAG_SOURCE_RANGES},
};

use crate::{
    lb::source_allowed,
    maps::{count, SERVICES, XDP_DENY},
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPV4_LEN, IPV6_LEN},
};

/// What the prefilter reads of a packet.
struct Headers {
    saddr: Addr,
    daddr: Addr,
    proto: u8,
    /// Destination port, network order; 0 when unknown (a later fragment,
    /// IPv6 extension headers, another protocol).
    dport: u16,
}

/// A pointer to `len` bytes at `offset` of the packet, if it has them.
#[inline(always)]
fn at(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data() + offset;
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *const u8)
}

/// Reads a big-endian `u16` at `p`.
///
/// # Safety
///
/// `p` and the byte after it are inside the packet.
#[inline(always)]
unsafe fn be16(p: *const u8) -> u16 {
    // SAFETY: see the function's contract.
    unsafe { u16::from_be_bytes([*p, *p.add(1)]) }
}

/// Copies 4 bytes at `p` as a word in network order.
///
/// # Safety
///
/// `p` and the 3 bytes after it are inside the packet.
#[inline(always)]
unsafe fn word(p: *const u8) -> u32 {
    // SAFETY: see the function's contract.
    unsafe { u32::from_ne_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]) }
}

#[inline(always)]
fn read(ctx: &XdpContext) -> Option<Headers> {
    let eth = at(ctx, 0, ETH_LEN)?;
    // SAFETY: the Ethernet header is inside the packet.
    let ethertype = unsafe { be16(eth.add(12)) };
    if ethertype == ETH_P_IP {
        let ip = at(ctx, ETH_LEN, IPV4_LEN)?;
        // SAFETY: the fixed IPv4 header is inside the packet.
        let (ihl, frag, proto, saddr, daddr) = unsafe {
            (
                usize::from(*ip & 0x0f) * 4,
                be16(ip.add(6)) & 0x1fff,
                *ip.add(9),
                word(ip.add(12)),
                word(ip.add(16)),
            )
        };
        let dport = if frag == 0 && ihl >= IPV4_LEN {
            ports_dst(ctx, ETH_LEN + ihl, proto)
        } else {
            0
        };
        return Some(Headers {
            saddr: v4_mapped(saddr),
            daddr: v4_mapped(daddr),
            proto,
            dport,
        });
    }
    if ethertype == ETH_P_IPV6 {
        let ip = at(ctx, ETH_LEN, IPV6_LEN)?;
        let mut saddr = [0u32; 4];
        let mut daddr = [0u32; 4];
        for i in 0..4 {
            // SAFETY: the fixed IPv6 header is inside the packet.
            unsafe {
                saddr[i] = word(ip.add(8 + 4 * i));
                daddr[i] = word(ip.add(24 + 4 * i));
            }
        }
        // SAFETY: as above.
        let proto = unsafe { *ip.add(6) };
        return Some(Headers {
            saddr,
            daddr,
            proto,
            dport: ports_dst(ctx, ETH_LEN + IPV6_LEN, proto),
        });
    }
    None
}

/// The destination port of a TCP or UDP header at `l4_off`, network order;
/// 0 for other protocols or a header cut short.
#[inline(always)]
fn ports_dst(ctx: &XdpContext, l4_off: usize, proto: u8) -> u16 {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return 0;
    }
    match at(ctx, l4_off, 4) {
        // SAFETY: the 4 port bytes are inside the packet.
        Some(ports) => unsafe { u16::from_ne_bytes([*ports.add(2), *ports.add(3)]) },
        None => 0,
    }
}

/// Whether `saddr` is in the deny list.
#[inline(always)]
fn denied(saddr: &Addr) -> bool {
    XDP_DENY.get(&Key::new(128, *saddr)).is_some()
}

/// The prefilter's verdict on a packet.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let Some(headers) = read(ctx) else {
        return XDP_PASS;
    };
    if denied(&headers.saddr) {
        count(Outcome::XdpDropDenied);
        return XDP_DROP;
    }
    if headers.dport == 0 {
        return XDP_PASS;
    }
    let key = ServiceKey {
        addr: headers.daddr,
        port: headers.dport,
        proto: headers.proto,
        scope: SCOPE_TC_EXTERNAL,
    };
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(&key) }).copied() else {
        return XDP_PASS;
    };
    if service.flags & SERVICE_FLAG_SOURCE_RANGES != 0
        && !source_allowed(service.service_id, &headers.saddr)
    {
        count(Outcome::XdpDropSourceRange);
        return XDP_DROP;
    }
    XDP_PASS
}
