//! The programs on the host end of each local pod's interface: per-packet
//! ClusterIP translation for pods whose sockets are not translated (when
//! the agent asks for it), then policy on what the pods see, for every
//! packet into or out of the pod.
//!
//! A packet that leaves a pod is checked as it is sent, after the
//! translation of its destination; a packet that enters a pod as it is
//! delivered, before the translation back of a reply. ICMP errors follow
//! the flow they quote; IPv6 neighbour and listener discovery is not
//! subject to policy (beyond the source address check).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_boot_ns,
    programs::TcContext,
};
use lb_common::{
    config::{TcConfig, TC_CONFIG_POD_LB, TC_CONFIG_POD_LB_UDP},
    conntrack::{CtKey, CtValue, CT_FLAG_REPLY},
    net::{PROTO_TCP, PROTO_UDP},
    outcome::Outcome,
};

use crate::{
    events, fib, icmp,
    maps::{count, CONFIG},
    parse::{parse_flow, Packet, ETH_P_IP, ETH_P_IPV6, PROTO_ICMP, PROTO_ICMPV6},
    policy::{self, Origin, Verdict},
    related_error, service_entry, translate, Hook, Service,
};

/// Runs the pod programs: `hook` is [`Hook::FromPod`] or [`Hook::ToPod`].
/// A packet between two pods of this node whose policy its source pod's
/// program checked for both of them (it carries the policy mark) is not
/// checked again at the destination.
#[inline(always)]
pub fn handle(ctx: &TcContext, hook: Hook) -> i32 {
    let config = CONFIG.get(0).copied().unwrap_or(NO_CONFIG);
    let checked = hook == Hook::ToPod && take_mark(ctx, config.policy_mark);
    if checked && config.flags & (TC_CONFIG_POD_LB | TC_CONFIG_POD_LB_UDP) == 0 {
        return TC_ACT_OK;
    }
    let Some(pkt) = parse_flow(ctx) else {
        return unparsed(ctx);
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if translates_services(&pkt, &config) {
        match service_entry(ctx, &pkt, hook, now) {
            Service::Translate(entry) => {
                if !checked && !police_translated(ctx, &pkt, entry, hook, now) {
                    return TC_ACT_SHOT;
                }
                return translate(TcContext::new(ctx.skb.skb), &pkt, entry, hook, now);
            }
            Service::Done(verdict) => return verdict,
            Service::Untranslated => {}
        }
    }
    if checked {
        return TC_ACT_OK;
    }
    police(ctx, &pkt, hook, now)
}

/// A configuration that translates nothing and marks nothing, should the
/// one-entry array ever be missing.
const NO_CONFIG: TcConfig = TcConfig {
    maglev_seed: 0,
    snat_v4: [0; 4],
    snat_v6: [0; 4],
    flags: 0,
    policy_mark: 0,
};

/// Whether the packet carries the policy mark `bit` (0: none), clearing it.
#[inline(always)]
fn take_mark(ctx: &TcContext, bit: u32) -> bool {
    // SAFETY: the context is the kernel's; `mark` is readable and writable
    // by tc programs.
    unsafe {
        let mark = (*ctx.skb.skb).mark;
        if bit == 0 || mark & bit == 0 {
            return false;
        }
        (*ctx.skb.skb).mark = mark & !bit;
    }
    true
}

/// Marks a packet whose policy was checked for both of its pods with the
/// policy mark `bit` (0: none), when the destination is a pod of this node
/// whose program would check it again.
#[inline(always)]
fn mark_checked(ctx: &TcContext, hook: Hook, verdict: &Verdict, bit: u32) {
    if hook != Hook::FromPod || !verdict.to_local_pod {
        return;
    }
    if bit != 0 {
        // SAFETY: as in `take_mark`.
        unsafe { (*ctx.skb.skb).mark |= bit };
    }
}

/// Policy for a packet the service path translates with `entry`, on the
/// tuple the pods see: a request as it reaches its backend, a reply as its
/// backend sent it. False when it is refused (counted and reported). A call
/// of its own: its frame is not added to the translation's.
#[inline(never)]
fn police_translated(
    ctx: &TcContext,
    pkt: &Packet,
    entry: *const CtValue,
    hook: Hook,
    now: u64,
) -> bool {
    // SAFETY: a pointer from a successful lookup in this run; plain data.
    let value = unsafe { &*entry };
    let pods_side = if value.flags & CT_FLAG_REPLY == 0 {
        value.apply(&pkt.tuple)
    } else {
        pkt.tuple
    };
    let verdict = policy::check(&pods_side, pkt.tcp_flags, origin(ctx, hook), now);
    if !verdict.allowed() {
        refuse(&verdict, &pods_side);
        return false;
    }
    // Its five arguments are the most a call may have: the mark is read here.
    let bit = CONFIG.get(0).map_or(0, |config| config.policy_mark);
    mark_checked(ctx, hook, &verdict, bit);
    true
}

/// Whether `pkt` may be for a ClusterIP translated per packet here.
#[inline(always)]
fn translates_services(pkt: &Packet, config: &TcConfig) -> bool {
    pkt.ports_known && translates_protocol(config.flags, pkt.tuple.proto)
}

/// Whether ClusterIPs of `proto` are translated per packet on pod
/// interfaces, with the configuration `flags`: TCP and UDP for pods
/// without socket translation, UDP alone for pods' connected UDP sockets.
#[inline(always)]
fn translates_protocol(flags: u32, proto: u8) -> bool {
    match proto {
        PROTO_TCP => flags & TC_CONFIG_POD_LB != 0,
        PROTO_UDP => flags & (TC_CONFIG_POD_LB | TC_CONFIG_POD_LB_UDP) != 0,
        _ => false,
    }
}

/// Where a packet at `hook` comes from: the pod, for its own packets; for
/// packets to it, the node itself when it arrived on no interface.
#[inline(always)]
pub fn origin(ctx: &TcContext, hook: Hook) -> Origin {
    // SAFETY: the context is the kernel's; both fields are readable by tc
    // programs.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    if hook == Hook::FromPod {
        Origin::pod(ifindex)
    } else if ingress_ifindex == 0 {
        Origin::NODE
    } else {
        Origin::FORWARDED
    }
}

/// Policy for a packet the service path does not translate here. (The
/// configuration is read once more here: passed in from [`handle`], it made
/// the verifier's combined stack of this call chain too large.)
#[inline(never)]
fn police(ctx: &TcContext, pkt: &Packet, hook: Hook, now: u64) -> i32 {
    if !pkt.ports_known {
        if policy::enforcing().is_none() {
            return TC_ACT_OK;
        }
        return refuse(&Verdict::refused(Outcome::PolicyUnparsed), &pkt.tuple);
    }
    let origin = origin(ctx, hook);
    if pkt.tuple.proto == PROTO_ICMP || pkt.tuple.proto == PROTO_ICMPV6 {
        if let Some(verdict) = control_message(ctx, pkt, hook, origin, now) {
            return verdict;
        }
    }
    let verdict = policy::check(&pkt.tuple, pkt.tcp_flags, origin, now);
    if !verdict.allowed() {
        return refuse(&verdict, &pkt.tuple);
    }
    // Straight to the destination pod, unless its program may have a reply
    // to translate back (per-packet ClusterIPs; of UDP alone, only UDP).
    let config = CONFIG.get(0).copied().unwrap_or(NO_CONFIG);
    let translating =
        config.flags & TC_CONFIG_POD_LB != 0 || translates_protocol(config.flags, pkt.tuple.proto);
    if hook == Hook::FromPod && verdict.to_local_pod && !translating {
        if let Some(redirected) = fib::to_checked_pod(ctx, &pkt.tuple, pkt.v4, &verdict) {
            return redirected;
        }
    }
    mark_checked(ctx, hook, &verdict, config.policy_mark);
    TC_ACT_OK
}

/// The verdict on an ICMP error of an allowed flow (translated with it when
/// the flow was; every error while policy is not enforced), or on IPv6
/// discovery; `None` for other ICMP messages, which policy checks as flows
/// of their own.
#[inline(always)]
fn control_message(
    ctx: &TcContext,
    pkt: &Packet,
    hook: Hook,
    origin: Origin,
    now: u64,
) -> Option<i32> {
    if !pkt.v4 {
        let kind = ctx.load::<u8>(pkt.l4_off).ok()?;
        if icmp::is_discovery_v6(kind) {
            if !policy::source_ok(&pkt.tuple.saddr, origin) {
                return Some(refuse(&policy::SPOOFED, &pkt.tuple));
            }
            return Some(TC_ACT_OK);
        }
    }
    let mut quoted = CtKey::new([0; 4], [0; 4], 0, 0, 0);
    if !icmp::quoted_flow(ctx, pkt, &mut quoted) {
        return None;
    }
    if policy::enforcing().is_some() && !policy::related(&quoted, now) {
        return None;
    }
    if !policy::source_ok(&pkt.tuple.saddr, origin) {
        return Some(refuse(&policy::SPOOFED, &pkt.tuple));
    }
    Some(related_error(ctx, hook))
}

/// Counts and reports a packet policy refuses; drops it.
#[inline(never)]
pub fn refuse(verdict: &Verdict, tuple: &CtKey) -> i32 {
    count(verdict.outcome);
    events::report(
        verdict.outcome,
        tuple,
        0,
        verdict.src_identity,
        verdict.dst_identity,
    );
    TC_ACT_SHOT
}

/// A packet [`parse_flow`] cannot read: anything but IP passes (ARP), an IP
/// packet too short or malformed to check is dropped while policy is
/// enforced.
#[inline(never)]
fn unparsed(ctx: &TcContext) -> i32 {
    let ethertype = ctx.load::<u16>(12).map(u16::from_be);
    let ip = matches!(ethertype, Ok(ETH_P_IP) | Ok(ETH_P_IPV6));
    if !ip || policy::enforcing().is_none() {
        return TC_ACT_OK;
    }
    count(Outcome::PolicyUnparsed);
    TC_ACT_SHOT
}
