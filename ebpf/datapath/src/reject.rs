//! Rejection of traffic to frontends without endpoints, as kube-proxy's
//! REJECT does: a TCP segment is turned into a RST, a UDP datagram into an
//! ICMP (ICMPv6) port unreachable quoting its IP and UDP headers, sent back
//! out of the interface it came in on. Only TCP and UDP get here (see
//! [`parse`](crate::parse)), so an ICMP error is never answered by another.
//! Answers are rate-limited node-wide (a token bucket with the kernel's ICMP
//! defaults, `lb_common::reject::RejectBudget`).

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_boot_ns, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{
    net::{Addr, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    outcome::Outcome,
};

use crate::{
    events,
    maps::{count, REJECT_BUDGET},
    nat::{fold, sum_words},
    parse::{
        addr_eq, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, TcpHdr, ETH_LEN, ICMPV6_DEST_UNREACH,
        ICMP_DEST_UNREACH, ICMP_LEN, IPV4_LEN, IPV6_LEN, PROTO_ICMP, PROTO_ICMPV6,
    },
};

/// Length of a TCP header without options.
const TCP_LEN: usize = 20;
/// Length of a UDP header, all of which an ICMP error quotes.
const UDP_LEN: usize = 8;
const TTL: u8 = 64;

const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// The RST answering `tcp` whose payload is `payload` bytes long (RFC 9293
/// 3.10.7.1): from the addressed port to the sender, with the sequence
/// number it acknowledged, or acknowledging all it sent.
#[inline(always)]
fn rst_for(tcp: &TcpHdr, payload: u32) -> TcpHdr {
    let (seq, ack_seq, flags) = if tcp.flags & TCP_ACK != 0 {
        (tcp.ack_seq, 0, TCP_RST)
    } else {
        let mut len = payload;
        if tcp.flags & TCP_SYN != 0 {
            len += 1;
        }
        if tcp.flags & TCP_FIN != 0 {
            len += 1;
        }
        let ack = u32::from_be(tcp.seq).wrapping_add(len);
        (0, ack.to_be(), TCP_RST | TCP_ACK)
    };
    TcpHdr {
        sport: tcp.dport,
        dport: tcp.sport,
        seq,
        ack_seq,
        doff: ((TCP_LEN / 4) as u8) << 4,
        flags,
        window: 0,
        check: 0,
        urg_ptr: 0,
    }
}

/// Answers a packet to frontend `service_id`, which has no endpoints, out of
/// its ingress interface, or drops it if no answer is due or it cannot be
/// built (counted apart); reported either way. Returns the tc verdict.
#[inline(never)]
pub fn reject(ctx: TcContext, pkt: &Packet, service_id: u32) -> i32 {
    let verdict = if within_budget() {
        answer(&ctx, pkt)
    } else {
        TC_ACT_SHOT
    };
    let outcome = if verdict == TC_ACT_REDIRECT {
        Outcome::Reject
    } else {
        Outcome::DropNoEndpoints
    };
    count(outcome);
    events::report(outcome, &pkt.tuple, service_id, 0, 0);
    verdict
}

/// Whether the node-wide answer budget allows one more answer (and takes
/// it). Concurrent CPUs race on the bucket; the limit is approximate.
#[inline(always)]
fn within_budget() -> bool {
    let Some(budget) = REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: a pointer from a successful lookup of a one-entry array,
    // plain data for the duration of this program.
    unsafe { (*budget).take(now) }
}

/// Rewrites the packet into its answer and redirects it; the tc verdict.
#[inline(always)]
fn answer(ctx: &TcContext, pkt: &Packet) -> i32 {
    // The answers are built from headers at fixed offsets: fragments and
    // IPv6 extension headers are not answered.
    let plain = if pkt.v4 {
        pkt.l4
    } else {
        pkt.l4_off == ETH_LEN + IPV6_LEN
    };
    if !plain {
        return TC_ACT_SHOT;
    }
    let built = if pkt.tuple.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            None
        } else if pkt.v4 {
            build_v4(ctx)
        } else {
            build_v6(ctx)
        }
    } else if pkt.v4 {
        unreachable_v4(ctx)
    } else {
        unreachable_v6(ctx)
    };
    if built.is_none() {
        return TC_ACT_SHOT;
    }
    // Swap the MAC addresses.
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return TC_ACT_SHOT;
    };
    let swapped = [
        macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2], macs[3],
        macs[4], macs[5],
    ];
    if ctx.store(0, &swapped, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: the context is the kernel's; `ifindex` is readable by tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper available to tc programs; redirects to the egress of
    // the interface the packet arrived on.
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    if verdict == TC_ACT_REDIRECT as i64 {
        verdict as i32
    } else {
        TC_ACT_SHOT
    }
}

/// The IPv4 header of an answer to `ip`, carrying `payload` bytes of
/// protocol `proto`, with its checksum.
#[inline(always)]
fn answer_v4(ip: &Ipv4Hdr, payload: usize, proto: u8) -> Ipv4Hdr {
    let mut reply = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_LEN + payload) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: TTL,
        proto,
        check: 0,
        saddr: ip.daddr,
        daddr: ip.saddr,
    };
    reply.check = fold(sum_words(0, &reply));
    reply
}

/// The IPv6 header of an answer to `ip`, carrying `payload` bytes of
/// protocol `next_header`.
#[inline(always)]
fn answer_v6(ip: &Ipv6Hdr, payload: usize, next_header: u8) -> Ipv6Hdr {
    Ipv6Hdr {
        version_flow: (6u32 << 28).to_be(),
        payload_len: (payload as u16).to_be(),
        next_header,
        hop_limit: TTL,
        saddr: ip.daddr,
        daddr: ip.saddr,
    }
}

/// Trims the packet to `len` bytes.
#[inline(always)]
fn truncate(ctx: &TcContext, len: usize) -> Option<()> {
    // SAFETY: a helper available to tc programs; invalidates packet
    // pointers, of which there are none (headers are read by copy).
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    (ret == 0).then_some(())
}

/// Inserts `len` zero bytes between the Ethernet and the IP header: the
/// packet's own headers become the quote of the ICMP error written before
/// them. (`BPF_ADJ_ROOM_NET` would insert after the IP header instead.)
#[inline(always)]
fn grow(ctx: &TcContext, len: usize) -> Option<()> {
    ctx.adjust_room(len as i32, BPF_ADJ_ROOM_MAC, 0).ok()
}

/// Whether an IPv4 source names a single host, the only kind an ICMP error
/// may go to (RFC 1122 3.2.2): not 0/8, loopback, multicast, class E or
/// broadcast.
#[inline(always)]
fn single_host_v4(saddr: u32) -> bool {
    let first = u32::from_be(saddr) >> 24;
    first != 0 && first != 127 && first < 224
}

/// Whether an IPv6 source names a single node (RFC 4443 2.4 (e.6)): not
/// unspecified, not multicast.
#[inline(always)]
fn single_host_v6(saddr: &Addr) -> bool {
    u32::from_be(saddr[0]) >> 24 != 0xff && !addr_eq(saddr, &[0; 4])
}

/// Rewrites an IPv4 TCP packet into the RST answering it (not yet swapped at L2).
#[inline(always)]
fn build_v4(ctx: &TcContext) -> Option<()> {
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).ok()?;
    // Options would shift the TCP header: not answered.
    if ip.version_ihl != 0x45 {
        return None;
    }
    let tcp: TcpHdr = ctx.load(ETH_LEN + IPV4_LEN).ok()?;
    let header_len = IPV4_LEN as u32 + ((tcp.doff >> 4) as u32) * 4;
    let payload = (u16::from_be(ip.tot_len) as u32).saturating_sub(header_len);
    let mut rst = rst_for(&tcp, payload);
    let reply = answer_v4(&ip, TCP_LEN, PROTO_TCP);
    let pseudo = [
        reply.saddr,
        reply.daddr,
        (((PROTO_TCP as u32) << 16) | TCP_LEN as u32).to_be(),
    ];
    rst.check = fold(sum_words(sum_words(0, &pseudo), &rst));
    truncate(ctx, ETH_LEN + IPV4_LEN + TCP_LEN)?;
    ctx.store(ETH_LEN, &reply, 0).ok()?;
    ctx.store(ETH_LEN + IPV4_LEN, &rst, 0).ok()
}

/// Rewrites an IPv6 TCP packet into the RST answering it (not yet swapped at L2).
#[inline(always)]
fn build_v6(ctx: &TcContext) -> Option<()> {
    let ip: Ipv6Hdr = ctx.load(ETH_LEN).ok()?;
    let tcp: TcpHdr = ctx.load(ETH_LEN + IPV6_LEN).ok()?;
    let header_len = ((tcp.doff >> 4) as u32) * 4;
    let payload = (u16::from_be(ip.payload_len) as u32).saturating_sub(header_len);
    let mut rst = rst_for(&tcp, payload);
    let reply = answer_v6(&ip, TCP_LEN, PROTO_TCP);
    let pseudo = [(TCP_LEN as u32).to_be(), (PROTO_TCP as u32).to_be()];
    let sum = sum_words(sum_words(sum_words(0, &reply.saddr), &reply.daddr), &pseudo);
    rst.check = fold(sum_words(sum, &rst));
    truncate(ctx, ETH_LEN + IPV6_LEN + TCP_LEN)?;
    ctx.store(ETH_LEN, &reply, 0).ok()?;
    ctx.store(ETH_LEN + IPV6_LEN, &rst, 0).ok()
}

/// Rewrites an IPv4 UDP datagram into the ICMP port unreachable answering it
/// (not yet swapped at L2): a new IP and ICMP header followed by the quoted
/// IP header and UDP header (RFC 792).
#[inline(always)]
fn unreachable_v4(ctx: &TcContext) -> Option<()> {
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).ok()?;
    // Options would lengthen the quote: not answered, like a RST.
    if ip.version_ihl != 0x45 || !single_host_v4(ip.saddr) {
        return None;
    }
    let udp: [u16; UDP_LEN / 2] = ctx.load(ETH_LEN + IPV4_LEN).ok()?;
    let mut icmp = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        check: 0,
        unused: 0,
    };
    icmp.check = fold(sum_words(sum_words(sum_words(0, &icmp), &ip), &udp));
    let reply = answer_v4(&ip, ICMP_LEN + IPV4_LEN + UDP_LEN, PROTO_ICMP);
    grow(ctx, IPV4_LEN + ICMP_LEN)?;
    truncate(ctx, ETH_LEN + IPV4_LEN + ICMP_LEN + IPV4_LEN + UDP_LEN)?;
    ctx.store(ETH_LEN, &reply, 0).ok()?;
    ctx.store(ETH_LEN + IPV4_LEN, &icmp, 0).ok()
}

/// Rewrites an IPv6 UDP datagram into the ICMPv6 port unreachable answering
/// it (not yet swapped at L2), quoting the IPv6 and UDP headers: far below
/// the 1280 bytes an ICMPv6 error may take (RFC 4443 2.4 (c)).
#[inline(always)]
fn unreachable_v6(ctx: &TcContext) -> Option<()> {
    const LEN: usize = ICMP_LEN + IPV6_LEN + UDP_LEN;
    let ip: Ipv6Hdr = ctx.load(ETH_LEN).ok()?;
    if !single_host_v6(&ip.saddr) {
        return None;
    }
    let udp: [u16; UDP_LEN / 2] = ctx.load(ETH_LEN + IPV6_LEN).ok()?;
    let reply = answer_v6(&ip, LEN, PROTO_ICMPV6);
    let mut icmp = IcmpHdr {
        kind: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        check: 0,
        unused: 0,
    };
    let pseudo = [(LEN as u32).to_be(), (PROTO_ICMPV6 as u32).to_be()];
    let sum = sum_words(sum_words(sum_words(0, &reply.saddr), &reply.daddr), &pseudo);
    icmp.check = fold(sum_words(sum_words(sum_words(sum, &icmp), &ip), &udp));
    grow(ctx, IPV6_LEN + ICMP_LEN)?;
    truncate(ctx, ETH_LEN + IPV6_LEN + LEN)?;
    ctx.store(ETH_LEN, &reply, 0).ok()?;
    ctx.store(ETH_LEN + IPV6_LEN, &icmp, 0).ok()
}
