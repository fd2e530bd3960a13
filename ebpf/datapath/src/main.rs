//! tc programs for per-packet service translation and network policy.
//!
//! On the node's uplinks, traffic entering the node for NodePorts,
//! ExternalIPs and LoadBalancer IPs (frontends of scope `SCOPE_TC_EXTERNAL`)
//! is translated:
//!
//! - `lb_ingress` (uplink ingress): conntrack first; a new flow to a
//!   frontend gets a backend from the frontend's Maglev table, is DNATed to
//!   it and, under externalTrafficPolicy Cluster with a backend on another
//!   node, SNATed to the node address; replies of SNATed flows coming back
//!   from remote backends are translated back to the frontend and client.
//! - `lb_egress` (uplink egress): replies of local backends are translated
//!   back so they come from the frontend.
//!
//! On the host end of every local pod's interface, `lb_pod_ingress` (the
//! pod's packets) and `lb_pod_egress` (packets to the pod) translate
//! ClusterIP traffic of pods whose sockets are not translated (scope
//! `SCOPE_TC_CLUSTER`) and check [`policy`] on the tuple the pods see after
//! translation: one pass for routing and security.
//!
//! All of them also translate ICMP errors about the packets of translated
//! flows. Before them, `lb_xdp_prefilter` (XDP on the uplinks, when
//! enabled) drops denied sources and sources outside a LoadBalancer IP's
//! ranges ([`prefilter`]).
//!
//! The layout follows Cilium's bpf/lib: [`parse`] headers, [`lb`] frontends
//! and Maglev, [`conntrack`], [`nat`] rewriting with checksums, [`icmp`]
//! errors, [`reject`], [`fib`] forwarding, [`policy`], [`pod`] for the pod
//! programs, [`events`] for drops, [`maps`].
#![no_std]
#![no_main]
// A BPF program reads the kernel's context and packet, calls helpers and
// writes maps through raw pointers: unsafe, each block with its SAFETY.
#![allow(unsafe_code, reason = "BPF helpers, context and map pointers")]
// Map keys are passed by reference on purpose: a by-value key is one more
// copy on the 512-byte BPF stack.
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "a by-value key is one more copy on the 512-byte BPF stack"
)]

mod conntrack;
mod events;
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod pod;
mod policy;
mod prefilter;
mod reject;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    config::TC_CONFIG_FIB_REDIRECT,
    conntrack::{
        CtKey, CtPendingValue, CtValue, CT_FLAG_AT_POD, CT_FLAG_PENDING, CT_FLAG_REPLY,
        CT_FLAG_REWRITE_DST, CT_FLAG_REWRITE_SRC, NEXT_HOP_NONE,
    },
    maglev::flow_hash,
    nat::{SNAT_PORT_COUNT, SNAT_PORT_MIN},
    net::{is_v4_mapped, Addr, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN},
    outcome::Outcome,
    service::{
        BACKEND_FLAG_LOCAL, SERVICE_FLAG_EXTERNAL_LOCAL, SERVICE_FLAG_NO_LOCAL_BACKENDS,
        SERVICE_FLAG_PRESERVE_SOURCE, SERVICE_FLAG_SOURCE_RANGES,
    },
};

use crate::{
    conntrack::{blind_reset, forget, initial_state, lookup, next_hop_fresh, pending, touch},
    maps::{count, CONFIG, CONNTRACK, CT_PENDING},
    nat::rewrite,
    parse::{addr_eq, parse, Packet},
};

/// Ports tried for the SNAT of one new flow before taking one from an
/// unconfirmed flow.
const SNAT_ATTEMPTS: u32 = 8;

/// Where a program runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Uplink ingress: frontends and replies from remote backends.
    Ingress,
    /// Uplink egress: replies from local backends.
    Egress,
    /// A pod interface's ingress: the pod's packets.
    FromPod,
    /// A pod interface's egress: packets to the pod.
    ToPod,
}

impl Hook {
    /// Whether the hook is on a pod's interface, where policy is checked.
    #[inline(always)]
    pub const fn at_pod(self) -> bool {
        matches!(self, Hook::FromPod | Hook::ToPod)
    }
}

/// Uplink ingress.
#[classifier]
fn lb_ingress(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::Ingress)
}

/// Uplink egress.
#[classifier]
fn lb_egress(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::Egress)
}

/// A pod interface's ingress: the pod's packets.
#[classifier]
fn lb_pod_ingress(ctx: TcContext) -> i32 {
    pod::handle(&ctx, Hook::FromPod)
}

/// A pod interface's egress: packets to the pod.
#[classifier]
fn lb_pod_egress(ctx: TcContext) -> i32 {
    pod::handle(&ctx, Hook::ToPod)
}

/// The XDP prefilter on the uplinks (see [`prefilter`]).
#[xdp]
fn lb_xdp_prefilter(ctx: XdpContext) -> u32 {
    prefilter::handle(&ctx)
}

/// Conntrack garbage collection (service and policy conntrack), never
/// attached: the agent runs it with `BPF_PROG_TEST_RUN` on a dummy frame.
#[classifier]
fn lb_ct_gc(_ctx: TcContext) -> i32 {
    conntrack::collect();
    TC_ACT_OK
}

#[inline(always)]
fn handle(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(pkt) = parse(ctx) else {
        if hook == Hook::Ingress && lb::unparsed_for_frontend(ctx) {
            count(Outcome::DropUnparsed);
            return TC_ACT_SHOT;
        }
        return related_error(ctx, hook);
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    match service_entry(ctx, &pkt, hook, now) {
        // Only a reset pays for the call.
        Service::Translate(entry)
            if pkt.tcp_flags & TCP_RST != 0 && blind_reset(ctx, &pkt, entry) =>
        {
            TC_ACT_SHOT
        }
        Service::Translate(entry) => translate(TcContext::new(ctx.skb.skb), &pkt, entry, hook, now),
        Service::Untranslated => TC_ACT_OK,
        Service::Done(verdict) => verdict,
    }
}

/// What the service path does with a packet.
pub enum Service {
    /// Translate it with this conntrack entry.
    Translate(*mut CtValue),
    /// Not for a frontend nor of a translated flow (here).
    Untranslated,
    /// Dropped or answered: this verdict.
    Done(i32),
}

/// The conntrack entry translating `pkt` at `hook`, made if it is the first
/// packet of a flow to a frontend.
#[inline(always)]
pub fn service_entry(ctx: &TcContext, pkt: &Packet, hook: Hook, now: u64) -> Service {
    let found = match lookup(pkt, now) {
        Some(entry) => Some(entry),
        None => pending(ctx, pkt, now),
    };
    match found {
        // SAFETY: a pointer from a successful lookup.
        Some(entry) if applies_at(unsafe { (*entry).flags }, hook) => Service::Translate(entry),
        Some(_) => Service::Untranslated,
        None if matches!(hook, Hook::Egress | Hook::ToPod) => Service::Untranslated,
        // New flows and known ones take separate calls so that their stack
        // frames are not added up against the 512-byte limit.
        None => match new_flow(pkt, hook, now) {
            // Looked up again, so that the first packet remembers its next
            // hop on the entry as later ones do (one lookup instead of a
            // FIB lookup on the flow's second packet).
            NewFlow::Created => match CT_PENDING.get_ptr_mut(&pkt.tuple) {
                // The entry is the pending value's first field.
                Some(slot) => Service::Translate(slot.cast::<CtValue>()),
                None => {
                    count(Outcome::ConntrackInsertFailed);
                    Service::Done(TC_ACT_SHOT)
                }
            },
            NewFlow::Reject(service_id) => {
                Service::Done(reject::reject(TcContext::new(ctx.skb.skb), pkt, service_id))
            }
            // Counted and reported here, once new_flow's frame is gone: the
            // report's frame does not add to it against the 512-byte limit.
            NewFlow::Drop { reason, service_id } => {
                count(reason);
                events::report(reason, &pkt.tuple, service_id, 0, 0);
                Service::Done(TC_ACT_SHOT)
            }
            NewFlow::Untranslated => Service::Untranslated,
        },
    }
}

/// Whether an entry with `flags` translates packets at `hook`: the replies
/// of a flow translated at its client pod are translated back only as they
/// enter that pod.
#[inline(always)]
fn applies_at(flags: u8, hook: Hook) -> bool {
    let at_pod_reply = CT_FLAG_AT_POD | CT_FLAG_REPLY;
    flags & at_pod_reply != at_pod_reply || hook == Hook::ToPod
}

/// Rewrites a packet of the flow whose conntrack entry is `entry` and sends
/// it on.
#[inline(never)]
fn translate(ctx: TcContext, pkt: &Packet, entry: *mut CtValue, hook: Hook, now: u64) -> i32 {
    // SAFETY: a pointer from a successful lookup; a plain load and store,
    // the store only when the number moved (a sender's ACKs repeat it).
    unsafe {
        if pkt.tuple.proto == PROTO_TCP
            && pkt.tcp_flags & TCP_ACK != 0
            && (*entry).peer_ack != pkt.tcp_ack
        {
            (*entry).peer_ack = pkt.tcp_ack;
        }
    }
    // SAFETY: a pointer from a successful lookup; copied out at once.
    let value = &unsafe { *entry };
    let step = value.step(pkt.tuple.proto, pkt.tcp_flags);
    let Ok(rewritten) = rewrite(&ctx, pkt, value) else {
        return TC_ACT_SHOT;
    };
    if step.closes {
        forget(&pkt.tuple, &rewritten, value.flags);
    } else {
        touch(entry, value, &step, &rewritten, now);
    }
    count(if value.flags & CT_FLAG_REPLY != 0 {
        Outcome::Reply
    } else {
        Outcome::Forward
    });
    let source_rewritten = value.flags & CT_FLAG_REWRITE_SRC != 0;
    if !forwards(hook, source_rewritten) {
        return TC_ACT_OK;
    }
    if next_hop_fresh(value, now) {
        return fib::redirect(&ctx, pkt.v4, value.hop, value.hop_ifindex, &value.hop_macs);
    }
    // A closed flow's entry is gone: nothing to remember the answer in.
    let learn = if step.closes {
        core::ptr::null_mut()
    } else {
        entry
    };
    fib::forward(&ctx, &rewritten, pkt.v4, learn)
}

/// Whether a translated packet is forwarded here rather than handed to the
/// stack. One whose source became a node address (SNAT, a reply now coming
/// from a NodePort, an error now coming from a frontend) would be dropped by
/// the stack as a martian: on ingress hooks it is forwarded here, as every
/// packet is when the agent asks for FIB redirects.
#[inline(always)]
fn forwards(hook: Hook, source_rewritten: bool) -> bool {
    matches!(hook, Hook::Ingress | Hook::FromPod)
        && (source_rewritten
            || CONFIG
                .get(0)
                .is_some_and(|config| config.flags & TC_CONFIG_FIB_REDIRECT != 0))
}

/// A packet that is not TCP or UDP: an ICMP error about a translated flow
/// is translated and sent on, anything else passes.
#[inline(never)]
pub fn related_error(ctx: &TcContext, hook: Hook) -> i32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut error = icmp::Translated::NONE;
    if !icmp::translate(ctx, now, &mut error) {
        return TC_ACT_OK;
    }
    count(Outcome::IcmpError);
    send_error_on(ctx, hook, &error)
}

/// Sends a translated error on, in a call of its own: its FIB lookup frame
/// is not added to the translation's. Errors are rare: their next hop is
/// not remembered.
#[inline(never)]
fn send_error_on(ctx: &TcContext, hook: Hook, error: &icmp::Translated) -> i32 {
    if !forwards(hook, error.source_changed) {
        return TC_ACT_OK;
    }
    fib::forward(ctx, &error.outer, error.v4, core::ptr::null_mut())
}

/// The outcome of [`new_flow`].
enum NewFlow {
    /// Conntrack entries were created, with the state after this packet.
    Created,
    /// The frontend (this service id) has no endpoints: reject.
    Reject(u32),
    /// Drop it, counted as `reason`, and report why.
    Drop {
        /// The outcome.
        reason: Outcome,
        /// The frontend it was for.
        service_id: u32,
    },
    /// Not for a frontend.
    Untranslated,
}

/// A new flow for frontend `service_id` to drop, counted in `reason`.
#[inline(always)]
fn dropped(reason: Outcome, service_id: u32) -> NewFlow {
    NewFlow::Drop { reason, service_id }
}

/// First packet of a flow (or of a flow whose entry expired or whose backend
/// left): frontend lookup, checks, Maglev, conntrack entries, translation.
/// A flow from a pod of this node is never SNATed (its replies come back to
/// the node anyway) and is marked [`CT_FLAG_AT_POD`].
#[inline(never)]
fn new_flow(pkt: &Packet, hook: Hook, now: u64) -> NewFlow {
    let (key, service) = lb::frontend(pkt);
    let Some(service) = service else {
        return NewFlow::Untranslated;
    };
    if service.backend_count == 0 {
        if service.flags & SERVICE_FLAG_NO_LOCAL_BACKENDS != 0 {
            return dropped(Outcome::DropNoLocalEndpoints, service.service_id);
        }
        return NewFlow::Reject(service.service_id);
    }
    if service.flags & SERVICE_FLAG_SOURCE_RANGES != 0
        && !lb::source_allowed(service.service_id, &pkt.tuple.saddr)
    {
        return dropped(Outcome::DropSourceRange, service.service_id);
    }
    if pkt.tuple.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return dropped(Outcome::DropNoConnection, service.service_id);
    }
    // A one-entry array: index 0 always exists.
    let Some(config) = CONFIG.get(0) else {
        return NewFlow::Untranslated;
    };
    let t = &pkt.tuple;
    let hash = flow_hash(config.maglev_seed, &t.saddr, t.sport, t.dport, t.proto);
    let Some((backend_id, backend)) = lb::choose(&key, &service, &t.saddr, hash, now) else {
        return dropped(Outcome::DropNoBackend, service.service_id);
    };
    if is_v4_mapped(&backend.addr) != pkt.v4 {
        return dropped(Outcome::DropNoSnatAddress, service.service_id);
    }
    let keeps_source = SERVICE_FLAG_EXTERNAL_LOCAL | SERVICE_FLAG_PRESERVE_SOURCE;
    let from_pod = hook == Hook::FromPod;
    let snat =
        !from_pod && service.flags & keeps_source == 0 && backend.flags & BACKEND_FLAG_LOCAL == 0;
    let state = initial_state(t.proto, pkt.tcp_flags);
    let mut forward = CtValue {
        new_saddr: t.saddr,
        new_daddr: backend.addr,
        new_sport: t.sport,
        new_dport: backend.port,
        flags: if from_pod {
            CT_FLAG_REWRITE_DST | CT_FLAG_AT_POD | CT_FLAG_PENDING
        } else {
            CT_FLAG_REWRITE_DST | CT_FLAG_PENDING
        },
        state,
        fins: 0,
        hop: NEXT_HOP_NONE,
        service_id: service.service_id,
        backend_id,
        last_seen_ns: now,
        hop_ifindex: 0,
        hop_macs: [0; 12],
        peer_ack: 0,
        pad: 0,
    };
    let mut reply_key = CtKey::new(backend.addr, t.saddr, backend.port, t.sport, t.proto);
    if snat {
        let node: &Addr = if pkt.v4 {
            &config.snat_v4
        } else {
            &config.snat_v6
        };
        if addr_eq(node, &[0; 4]) {
            return dropped(Outcome::DropNoSnatAddress, service.service_id);
        }
        forward.flags |= CT_FLAG_REWRITE_SRC;
        forward.new_saddr = *node;
        reply_key.daddr = *node;
        // The reply entry does not depend on the port chosen.
        let reply = CtPendingValue::new(forward.partner(t, now));
        let Some(port) = claim_snat_port(&mut reply_key, &reply, hash) else {
            return dropped(Outcome::DropSnatPortsExhausted, service.service_id);
        };
        forward.new_sport = port;
    } else {
        // A closed flow's entries for the same tuples would shadow the new
        // flow's while it is unconfirmed.
        let _ = CONNTRACK.remove(&reply_key);
        if CT_PENDING
            .insert(&reply_key, &CtPendingValue::new(forward.partner(t, now)), 0)
            .is_err()
        {
            return dropped(Outcome::ConntrackInsertFailed, service.service_id);
        }
    }
    let _ = CONNTRACK.remove(&pkt.tuple);
    if CT_PENDING
        .insert(&pkt.tuple, &CtPendingValue::new(forward), 0)
        .is_err()
    {
        return dropped(Outcome::ConntrackInsertFailed, service.service_id);
    }
    count(Outcome::NewFlow);
    NewFlow::Created
}

/// Finds a free SNAT port for a flow and inserts its (unconfirmed) reply
/// entry with it (`reply_key.dport` is set to the port). The first port
/// tried derives from the flow hash, the next ones are random; a port is
/// free when no flow, confirmed or not, holds it. When every port tried is
/// held and the last one only by an unconfirmed flow, that flow gives it
/// up (its entries go; a real client's retransmitted SYN opens it again):
/// a flood of spoofed SYNs cannot starve confirmed flows nor new ones of
/// ports. Returns the port, network order.
#[inline(always)]
fn claim_snat_port(reply_key: &mut CtKey, reply: &CtPendingValue, hash: u32) -> Option<u16> {
    let mut seed = hash;
    for _ in 0..SNAT_ATTEMPTS {
        let port = (SNAT_PORT_MIN + (seed % SNAT_PORT_COUNT as u32) as u16).to_be();
        reply_key.dport = port;
        if CONNTRACK.get_ptr(&*reply_key).is_none()
            && CT_PENDING
                .insert(&*reply_key, reply, BPF_NOEXIST as u64)
                .is_ok()
        {
            return Some(port);
        }
        // SAFETY: a helper without arguments.
        seed = unsafe { bpf_get_prandom_u32() };
    }
    if CONNTRACK.get_ptr(&*reply_key).is_some() {
        return None;
    }
    let holder = CT_PENDING.get_ptr(&*reply_key)?;
    // SAFETY: a pointer from a successful lookup, read before the entry goes.
    let holder_client = unsafe { (*holder).entry.apply(reply_key) }.reversed();
    let _ = CT_PENDING.remove(&holder_client);
    CT_PENDING.insert(&*reply_key, reply, 0).ok()?;
    Some(reply_key.dport)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
