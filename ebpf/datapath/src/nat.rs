//! Address and port rewriting with incremental checksum updates
//! (`bpf_l3_csum_replace` / `bpf_l4_csum_replace`), for both families, and
//! the ones' complement arithmetic of checksums built or updated in place.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{
    conntrack::{CtKey, CtValue},
    net::{Addr, PROTO_UDP},
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

/// Adds the 16-bit words of `value` (in memory order) to a ones' complement
/// sum. Summing native-endian words and storing the folded result natively
/// gives the right bytes on the wire whatever the host's byte order.
#[inline(always)]
pub fn sum_words<T>(sum: u32, value: &T) -> u32 {
    // SAFETY: `T` is one of the repr(C) headers of `parse`, or an
    // array of u16 or u32: no padding, an even size, at least 2-byte
    // aligned; read as a slice of u16 for its lifetime.
    let words = unsafe {
        core::slice::from_raw_parts(
            (value as *const T).cast::<u16>(),
            core::mem::size_of::<T>() / 2,
        )
    };
    let mut sum = sum;
    for word in words {
        sum += *word as u32;
    }
    sum
}

/// Folds a ones' complement sum and complements it: the checksum field.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A checksum field updated for covered data whose words summed to `old`
/// and now sum to `new` (RFC 1624, equation 3).
#[inline(always)]
pub fn replace(check: u16, old: u32, new: u32) -> u16 {
    fold(u32::from(!check) + u32::from(fold(old)) + u32::from(!fold(new)))
}

/// `seed` plus the ones' complement difference from `old` to `new` (a
/// multiple of 4 bytes), summed by the kernel (`bpf_csum_diff`); `None` on
/// a helper error. A partial sum for `bpf_l4_csum_replace` with size 0.
#[inline(always)]
pub fn csum_diff<T>(old: &T, new: &T, seed: u32) -> Option<u32> {
    let size = core::mem::size_of::<T>() as u32;
    // SAFETY: the helper only reads `size` bytes from each pointer, both
    // references to live values of that size.
    let diff = unsafe {
        bpf_csum_diff(
            (old as *const T).cast_mut().cast(),
            size,
            (new as *const T).cast_mut().cast(),
            size,
            seed,
        )
    };
    u32::try_from(diff).ok()
}
