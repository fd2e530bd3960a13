//! Forwarding of translated packets: a FIB lookup on the rewritten tuple,
//! then a redirect to the egress interface with the next hop's MAC address,
//! so the packet skips the stack's routing. When that interface is the host
//! end of a pod's veth pair, `bpf_redirect_peer` hands the packet to the
//! pod's end directly, skipping the pair's transmit path and a second pass
//! through the receive queue. Without a neighbour entry yet,
//! `bpf_redirect_neigh` resolves it. Anything else the FIB does not forward
//! (local delivery, no route, forwarding disabled) goes to the stack.
//!
//! A flow's conntrack entry remembers the lookup's answer (interface, MAC
//! addresses, peer or not), so its later packets skip the FIB: see
//! [`crate::conntrack::next_hop_fresh`] for how long that answer is trusted.
//!
//! Only called on ingress hooks: `bpf_redirect_peer` works from there only.
//! While policy is enforced, translated packets for pods take the plain
//! redirect to the host end, whose egress program checks them against the
//! pod's policy: the peer redirect would skip it. A packet between two pods
//! of this node whose policy was checked for both where it left its pod
//! ([`to_checked_pod`]) takes the peer redirect.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
    EbpfContext,
};
use lb_common::{
    config::POD_INTERFACE_PEER,
    conntrack::{CtKey, CtValue, NEXT_HOP_PEER, NEXT_HOP_REDIRECT},
    outcome::Outcome,
};

use crate::{
    maps::{count, POD_INTERFACES},
    parse::ETH_LEN,
    policy::Verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Offsets of the IPv4 TTL (with the protocol, one checksummed word) and
/// header checksum, and of the IPv6 hop limit.
const IPV4_TTL_OFF: usize = ETH_LEN + 8;
const IPV4_CSUM_OFF: usize = ETH_LEN + 10;
const IPV6_HOP_LIMIT_OFF: usize = ETH_LEN + 7;

/// Decrements the TTL (hop limit) of a packet about to be redirected, as
/// the stack's forwarding would: it crosses this node as a router. False,
/// and the packet unchanged, when none is left (the stack then answers
/// with time exceeded) or the header cannot be written.
#[inline(always)]
fn count_hop(ctx: &TcContext, v4: bool) -> bool {
    if !v4 {
        return match ctx.load::<u8>(IPV6_HOP_LIMIT_OFF) {
            Ok(limit) if limit > 1 => ctx.store(IPV6_HOP_LIMIT_OFF, &(limit - 1), 0).is_ok(),
            _ => false,
        };
    }
    let Ok(word) = ctx.load::<[u8; 2]>(IPV4_TTL_OFF) else {
        return false;
    };
    if word[0] <= 1 {
        return false;
    }
    let new = [word[0] - 1, word[1]];
    // The checksum helper takes the words as they sit in the packet.
    ctx.store(IPV4_TTL_OFF, &new, 0).is_ok()
        && ctx
            .l3_csum_replace(
                IPV4_CSUM_OFF,
                u64::from(u16::from_ne_bytes(word)),
                u64::from(u16::from_ne_bytes(new)),
                2,
            )
            .is_ok()
}

/// Redirects the packet as its flow's entry remembers: `hop` a
/// `NEXT_HOP_*` other than none, to `ifindex` with the Ethernet addresses
/// `macs`. Returns the tc verdict.
#[inline(always)]
pub fn redirect(ctx: &TcContext, v4: bool, hop: u8, ifindex: u32, macs: &[u8; 12]) -> i32 {
    if !count_hop(ctx, v4) || ctx.store(0, macs, 0).is_err() {
        return TC_ACT_OK;
    }
    let peer = hop == NEXT_HOP_PEER && crate::policy::enforcing().is_none();
    // SAFETY: helpers available to tc programs; the peer redirect only
    // targets interfaces the agent found to be veth or netkit host ends.
    let verdict = unsafe {
        if peer {
            bpf_redirect_peer(ifindex, 0)
        } else {
            bpf_redirect(ifindex, 0)
        }
    };
    redirected(verdict)
}

/// Counts a redirect; returns the verdict as tc wants it.
#[inline(always)]
fn redirected(verdict: i64) -> i32 {
    if verdict == TC_ACT_REDIRECT as i64 {
        count(Outcome::FibRedirect);
    }
    verdict as i32
}

/// Asks the FIB for the next hop of `tuple` (a packet of `v4` or IPv6 on
/// the context's interface), filling `params` (all zeroes on entry, in the
/// caller's frame: a copy would not fit the stack); returns the helper's
/// answer.
#[inline(always)]
fn lookup(ctx: &TcContext, tuple: &CtKey, v4: bool, params: &mut bpf_fib_lookup) -> i64 {
    params.family = if v4 { AF_INET } else { AF_INET6 };
    params.l4_protocol = tuple.proto;
    params.sport = tuple.sport;
    params.dport = tuple.dport;
    params.__bindgen_anon_1.tot_len = (ctx.len() as usize).saturating_sub(ETH_LEN) as u16;
    // SAFETY: the context is the kernel's; `ifindex` is readable by tc programs.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if v4 {
        params.__bindgen_anon_3.ipv4_src = tuple.saddr[3];
        params.__bindgen_anon_4.ipv4_dst = tuple.daddr[3];
    } else {
        params.__bindgen_anon_3.ipv6_src = tuple.saddr;
        params.__bindgen_anon_4.ipv6_dst = tuple.daddr;
    }
    // SAFETY: a helper available to tc programs, given the context and a
    // stack buffer of the size passed.
    unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// The Ethernet header's addresses for the next hop a lookup found:
/// destination then source, as they sit in the frame.
#[inline(always)]
fn next_hop_macs(params: &bpf_fib_lookup) -> [u8; 12] {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    macs
}

/// Hands a packet whose policy was checked for both of its pods straight
/// to the destination pod of this node: the peer end of the interface the
/// FIB routes it to, with the next hop's Ethernet addresses, skipping the
/// node's routing and the program on that interface (which would only see
/// the checked mark). The flow's policy entry remembers the answer
/// (`verdict.hop_ifindex`), so later packets skip the FIB. `None` when the
/// FIB's answer is not a pod interface with a known neighbour: the stack
/// delivers the packet then. A call of its own: its frame is not added to
/// the policy check's.
#[inline(never)]
pub fn to_checked_pod(ctx: &TcContext, tuple: &CtKey, v4: bool, verdict: &Verdict) -> Option<i32> {
    if verdict.hop_ifindex != 0 {
        if !count_hop(ctx, v4) {
            return None;
        }
        ctx.store(0, &verdict.hop_macs, 0).ok()?;
        // SAFETY: as below; the remembered interface passed the same check.
        return Some(redirected(unsafe {
            bpf_redirect_peer(verdict.hop_ifindex, 0)
        }));
    }
    // SAFETY: a plain C struct for which all zeroes is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    if lookup(ctx, tuple, v4, &mut params) != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    // SAFETY: copied out at once.
    let interface = unsafe { POD_INTERFACES.get(&params.ifindex) }.copied()?;
    if interface & POD_INTERFACE_PEER == 0 {
        return None;
    }
    let macs = next_hop_macs(&params);
    crate::policy::learn_hop(tuple, params.ifindex, &macs);
    if !count_hop(ctx, v4) {
        return None;
    }
    ctx.store(0, &macs, 0).ok()?;
    // SAFETY: a helper available to tc programs on ingress hooks; the
    // target is an interface the agent found to be a veth or netkit host end.
    Some(redirected(unsafe { bpf_redirect_peer(params.ifindex, 0) }))
}

/// Redirects the packet towards `tuple.daddr`, or lets the stack route it.
/// A lookup that finds the next hop writes it to `learn`, the conntrack
/// entry of the packet's flow, unless that is null. Returns the tc verdict.
#[inline(always)]
pub fn forward(ctx: &TcContext, tuple: &CtKey, v4: bool, learn: *mut CtValue) -> i32 {
    // SAFETY: a plain C struct for which all zeroes is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let ret = lookup(ctx, tuple, v4, &mut params);
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let macs = next_hop_macs(&params);
        // SAFETY: copied out at once.
        let interface = unsafe { POD_INTERFACES.get(&params.ifindex) }.copied();
        let hop = if interface.is_some_and(|flags| flags & POD_INTERFACE_PEER != 0) {
            NEXT_HOP_PEER
        } else {
            NEXT_HOP_REDIRECT
        };
        if !learn.is_null() {
            // SAFETY: a pointer from a successful conntrack lookup in this
            // run, whose entry was not deleted; concurrent packets of the
            // flow write the same answer.
            unsafe {
                (*learn).hop_ifindex = params.ifindex;
                (*learn).hop_macs = macs;
                (*learn).hop = hop;
            }
        }
        return redirect(ctx, v4, hop, params.ifindex, &macs);
    }
    let verdict = if ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        if !count_hop(ctx, v4) {
            return TC_ACT_OK;
        }
        // The lookup left the egress interface and the next hop in `params`.
        let mut next_hop = if v4 {
            bpf_redir_neigh {
                nh_family: AF_INET as u32,
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    // SAFETY: the IPv4 member of a union the lookup filled
                    // for an IPv4 query.
                    ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
                },
            }
        } else {
            bpf_redir_neigh {
                nh_family: AF_INET6 as u32,
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    // SAFETY: the IPv6 member, for an IPv6 query.
                    ipv6_nh: unsafe { params.__bindgen_anon_4.ipv6_dst },
                },
            }
        };
        // SAFETY: a helper available to tc programs (kernel >= 5.10), given
        // a stack buffer of the size passed.
        unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut next_hop,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    } else {
        return TC_ACT_OK;
    };
    redirected(verdict)
}
