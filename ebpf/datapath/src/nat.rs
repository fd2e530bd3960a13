//! Address and port rewriting with incremental checksum updates
//! (`bpf_l3_csum_replace` / `bpf_l4_csum_replace`), for both families.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{
    tc::{CtKey, CtValue},
    Addr, PROTO_UDP,
};

use crate::parse::{addr_eq, Packet, ETH_LEN};

/// Offset of the IPv4 header checksum.
const IPV4_CSUM_OFF: usize = ETH_LEN + 10;
/// Offsets of the IPv4 source and destination addresses.
const IPV4_SADDR_OFF: usize = ETH_LEN + 12;
const IPV4_DADDR_OFF: usize = ETH_LEN + 16;
/// Offsets of the IPv6 source and destination addresses.
const IPV6_SADDR_OFF: usize = ETH_LEN + 8;
const IPV6_DADDR_OFF: usize = ETH_LEN + 24;

/// A rewrite failed half-way (a helper error); the packet must be dropped.
pub struct RewriteFailed;

/// Flags for `bpf_l4_csum_replace`: UDP's "no checksum" (0) stays 0 and a
/// computed 0 becomes 0xffff.
#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    if pkt.tuple.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn check<E>(ret: Result<(), E>) -> Result<(), RewriteFailed> {
    ret.map_err(|_| RewriteFailed)
}

/// Replaces the source (`src`) or destination address.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    pkt: &Packet,
    src: bool,
    old: &Addr,
    new: &Addr,
) -> Result<(), RewriteFailed> {
    let csum = pkt.l4_csum_off();
    let flags = l4_flags(pkt) | BPF_F_PSEUDO_HDR as u64 | 4;
    // A later fragment has no L4 checksum: the first fragment's update
    // covers the whole datagram.
    if pkt.v4 {
        let off = if src { IPV4_SADDR_OFF } else { IPV4_DADDR_OFF };
        check(ctx.l3_csum_replace(IPV4_CSUM_OFF, old[3] as u64, new[3] as u64, 4))?;
        if pkt.l4 {
            check(ctx.l4_csum_replace(csum, old[3] as u64, new[3] as u64, flags))?;
        }
        check(ctx.store(off, &new[3], 0))
    } else {
        let off = if src { IPV6_SADDR_OFF } else { IPV6_DADDR_OFF };
        if pkt.l4 {
            for i in 0..4 {
                check(ctx.l4_csum_replace(csum, old[i] as u64, new[i] as u64, flags))?;
            }
        }
        check(ctx.store(off, new, 0))
    }
}

/// Replaces the source (`src`) or destination port.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    pkt: &Packet,
    src: bool,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if !pkt.l4 {
        return Ok(());
    }
    let off = if src { pkt.l4_off } else { pkt.l4_off + 2 };
    let flags = l4_flags(pkt) | 2;
    check(ctx.l4_csum_replace(pkt.l4_csum_off(), old as u64, new as u64, flags))?;
    check(ctx.store(off, &new, 0))
}

/// Rewrites the packet as `value` says; returns the tuple it now carries.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, value: &CtValue) -> Result<CtKey, RewriteFailed> {
    let from = &pkt.tuple;
    let to = value.apply(from);
    if !addr_eq(&to.saddr, &from.saddr) {
        set_addr(ctx, pkt, true, &from.saddr, &to.saddr)?;
    }
    if to.sport != from.sport {
        set_port(ctx, pkt, true, from.sport, to.sport)?;
    }
    if !addr_eq(&to.daddr, &from.daddr) {
        set_addr(ctx, pkt, false, &from.daddr, &to.daddr)?;
    }
    if to.dport != from.dport {
        set_port(ctx, pkt, false, from.dport, to.dport)?;
    }
    Ok(to)
}
