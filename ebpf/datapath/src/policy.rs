//! Network policy, checked on the tuple a flow has on the pods' side of any
//! service translation (the backend pod's address and target port).
//!
//! A flow's verdict is made once per policy revision: its first packet (or
//! the first after the agent changed anything that can change a verdict) is
//! checked against the source pod's egress policy and the destination pod's
//! ingress policy, whichever of them are pods of this node, and the verdict
//! is kept in the policy conntrack for both directions. Every later packet
//! costs that one lookup; replies of allowed flows pass. A flow a policy
//! change cuts keeps entries that say so, so that it cannot come back as
//! "replies" of the other direction.
//!
//! A packet from a pod must carry one of the pod's addresses: no pod can
//! borrow another's identity. Traffic the node itself sends to its pods is
//! allowed (kubelet probes); a packet claiming a node address that arrived
//! from an interface counts as the world.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_for_each_map_elem, maps::lpm_trie::Key};
use lb_common::{
    config::POD_INTERFACE_ENDPOINT,
    conntrack::{CtGcState, CtKey, CT_STATE_CLOSING, CT_STATE_NEW},
    net::{is_v4_mapped, Addr, PROTO_TCP, TCP_ACK, TCP_SYN},
    outcome::Outcome,
    policy::{
        allowed_by, EndpointValue, IpcacheKey, IpcacheValue, PolicyCtValue, PolicyKey, PolicyState,
        DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_FAIL_CLOSED,
        ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, POLICY_CT_ALLOWED,
        POLICY_CT_LOCAL_OPENER, POLICY_CT_REPLY, POLICY_CT_TO_LOCAL_POD, POLICY_PREFIX_FULL,
        POLICY_STATE_ENFORCING,
    },
};

use crate::maps::{count, ENDPOINTS, IPCACHE, POD_INTERFACES, POLICY, POLICY_CT, POLICY_STATE};

/// How stale an entry's timestamp may get before a packet refreshes it (as
/// the service conntrack does).
const REFRESH_INTERVAL_NS: u64 = 1_000_000_000;

/// A verdict: [`Outcome::PolicyAllowed`] or why not, and who the flow is
/// between. Plain fields, always initialised: the verifier rejects reads of
/// the undefined payloads LLVM leaves in an `Ok` or `Err`.
#[derive(Clone, Copy)]
pub struct Verdict {
    /// [`Outcome::PolicyAllowed`], or why the packet is refused.
    pub outcome: Outcome,
    /// The source's identity (0: not looked up).
    pub src_identity: u32,
    /// The destination's identity (0: not looked up).
    pub dst_identity: u32,
    /// For an allowed flow, the host end of the destination pod's
    /// interface (its replies come from there), or 0.
    reply_ifindex: u32,
    /// Allowed, and the packet goes to a pod of this node whose egress
    /// program need not check it again.
    pub to_local_pod: bool,
    /// The flow's remembered hand-over to that pod (see
    /// [`PolicyCtValue::hop_ifindex`]), 0 when not known.
    pub hop_ifindex: u32,
    /// The Ethernet addresses for `hop_ifindex`.
    pub hop_macs: [u8; 12],
}

impl Verdict {
    /// Whether the packet may pass.
    #[inline(always)]
    pub fn allowed(&self) -> bool {
        self.outcome == Outcome::PolicyAllowed
    }

    /// A refusal, between identities not looked up.
    #[inline(always)]
    pub const fn refused(outcome: Outcome) -> Self {
        Self {
            outcome,
            src_identity: 0,
            dst_identity: 0,
            reply_ifindex: 0,
            to_local_pod: false,
            hop_ifindex: 0,
            hop_macs: [0; 12],
        }
    }

    /// The verdict as seen from the other direction of the flow.
    #[inline(always)]
    const fn reversed(self) -> Self {
        Self {
            src_identity: self.dst_identity,
            dst_identity: self.src_identity,
            ..self
        }
    }
}

/// Passing without a check (policy not enforced).
const PASS: Verdict = Verdict::refused(Outcome::PolicyAllowed);

/// Where a packet comes from, as far as policy cares: the host end of the
/// pod interface it left its pod by, the node itself, or elsewhere (another
/// pod's interface, an uplink).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Origin(u32);

impl Origin {
    /// Forwarded from another interface.
    pub const FORWARDED: Self = Self(0);
    /// Sent by the node itself.
    pub const NODE: Self = Self(u32::MAX);

    /// Sent by the pod whose interface's host end is `ifindex`.
    #[inline(always)]
    pub const fn pod(ifindex: u32) -> Self {
        Self(ifindex)
    }

    /// The host end of the pod interface the packet came by, or 0.
    #[inline(always)]
    const fn pod_ifindex(self) -> u32 {
        if self.0 == Self::NODE.0 {
            0
        } else {
            self.0
        }
    }
}

/// The node's policy state, when policy is enforced.
#[inline(always)]
pub fn enforcing() -> Option<PolicyState> {
    POLICY_STATE
        .get(0)
        .copied()
        .filter(|state| state.flags & POLICY_STATE_ENFORCING != 0)
}

/// The identities of an address: the world when the ipcache has none.
#[inline(always)]
fn identities(addr: &Addr) -> IpcacheValue {
    let key = Key::new(128, IpcacheKey { addr: *addr });
    IPCACHE.get(&key).copied().unwrap_or(IpcacheValue {
        identity: IDENTITY_WORLD,
        cidr_identity: IDENTITY_WORLD,
    })
}

/// Whether an entry of `set` allows `direction` from or to `peer` on
/// `proto` and `port` (network order).
#[inline(always)]
fn allows(set: u32, direction: u8, peer: IpcacheValue, proto: u8, port: u16) -> bool {
    allowed_by(peer, |identity| {
        let key = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey::new(set, direction, identity, proto, port),
        );
        POLICY.get(&key).is_some()
    })
}

/// The endpoint at `addr`: one of this node's pods, or all zeroes (identity
/// [`IDENTITY_ANY`], no flags) for any other address. Not an `Option`: the verifier
/// rejects the spills of the undefined payload LLVM leaves in a `None`.
#[inline(always)]
fn endpoint(addr: &Addr) -> EndpointValue {
    // SAFETY: copied out at once; the agent replaces whole entries.
    match unsafe { ENDPOINTS.get(addr) } {
        Some(ep) => *ep,
        None => EndpointValue::default(),
    }
}

/// The verdict of this node for a flow opened by `tuple`; `local` says
/// whether the node itself opened it. Identities are looked up only where
/// a check needs them.
#[inline(always)]
fn evaluate(tuple: &CtKey, local: bool) -> Verdict {
    let src_ep = endpoint(&tuple.saddr);
    let dst_ep = endpoint(&tuple.daddr);
    let mut verdict = Verdict {
        outcome: Outcome::PolicyAllowed,
        // An unknown address's identity is looked up only if needed.
        src_identity: if local {
            IDENTITY_HOST
        } else {
            src_ep.identity
        },
        dst_identity: dst_ep.identity,
        reply_ifindex: dst_ep.ifindex,
        to_local_pod: dst_ep.ifindex != 0,
        hop_ifindex: 0,
        hop_macs: [0; 12],
    };
    if (src_ep.flags | dst_ep.flags) & ENDPOINT_FAIL_CLOSED != 0 {
        verdict.outcome = Outcome::PolicyFailClosed;
        return verdict;
    }
    if src_ep.flags & ENDPOINT_EGRESS_ISOLATED != 0 {
        let peer = identities(&tuple.daddr);
        verdict.dst_identity = peer.identity;
        if !allows(src_ep.set, DIRECTION_EGRESS, peer, tuple.proto, tuple.dport) {
            verdict.outcome = Outcome::PolicyDeniedEgress;
            return verdict;
        }
    }
    if !local && dst_ep.flags & ENDPOINT_INGRESS_ISOLATED != 0 {
        let mut peer = identities(&tuple.saddr);
        // A node address on a packet the node did not send is forged.
        if peer.identity == IDENTITY_HOST {
            peer.identity = IDENTITY_WORLD;
        }
        verdict.src_identity = peer.identity;
        if !allows(
            dst_ep.set,
            DIRECTION_INGRESS,
            peer,
            tuple.proto,
            tuple.dport,
        ) {
            verdict.outcome = Outcome::PolicyDeniedIngress;
        }
    }
    verdict
}

/// Whether a source address may leave the pod at `pod_ifindex`: one of
/// the pod's, or an IPv6 link-local or unspecified one (neighbour
/// discovery; the node does not forward them). Another known pod's address
/// never may; an unknown address only from an interface of no known pod.
#[inline(always)]
fn source_allowed(saddr: &Addr, pod_ifindex: u32) -> bool {
    let ep = endpoint(saddr);
    if ep.identity != IDENTITY_ANY {
        return ep.ifindex == pod_ifindex;
    }
    if !is_v4_mapped(saddr) {
        let link_local = u32::from_be(saddr[0]) >> 22 == 0x3fa;
        if link_local || (saddr[0] | saddr[1] | saddr[2] | saddr[3]) == 0 {
            return true;
        }
    }
    // SAFETY: copied out at once.
    let interface = unsafe { POD_INTERFACES.get(&pod_ifindex) }.copied();
    interface.is_none_or(|flags| flags & POD_INTERFACE_ENDPOINT == 0)
}

/// Whether a packet from `origin` may carry the source `saddr` (only one
/// from a pod is checked, and only while policy is enforced).
#[inline(always)]
pub fn source_ok(saddr: &Addr, origin: Origin) -> bool {
    let pod_ifindex = origin.pod_ifindex();
    pod_ifindex == 0 || enforcing().is_none() || source_allowed(saddr, pod_ifindex)
}

/// A spoofed packet's refusal.
pub const SPOOFED: Verdict = Verdict::refused(Outcome::PolicySpoofed);

/// Writes an allowed flow's verdict for both directions: `tuple` opened
/// it, from `origin`; its replies come from the destination pod's
/// interface when the destination is one of this node's pods.
#[inline(always)]
fn remember(
    tuple: &CtKey,
    origin: Origin,
    verdict: &Verdict,
    revision: u32,
    tcp_flags: u8,
    now: u64,
) {
    let opener = if origin == Origin::NODE {
        POLICY_CT_ALLOWED | POLICY_CT_LOCAL_OPENER
    } else {
        POLICY_CT_ALLOWED
    };
    let to_local_pod = |local: bool| if local { POLICY_CT_TO_LOCAL_POD } else { 0 };
    let mut value = PolicyCtValue {
        revision,
        ifindex: origin.pod_ifindex(),
        flags: opener | to_local_pod(verdict.reply_ifindex != 0),
        state: CT_STATE_NEW,
        fins: 0,
        outcome: 0,
        src_identity: verdict.src_identity as u16,
        dst_identity: verdict.dst_identity as u16,
        last_seen_ns: now,
        hop_ifindex: 0,
        hop_macs: [0; 12],
    };
    value.state = value.step(tuple.proto, tcp_flags).state;
    // A full LRU evicts its oldest entry: that flow is checked again.
    let _ = POLICY_CT.insert(tuple, &value, 0);
    value.ifindex = verdict.reply_ifindex;
    value.flags = opener | POLICY_CT_REPLY | to_local_pod(origin.pod_ifindex() != 0);
    let _ = POLICY_CT.insert(&tuple.reversed(), &value, 0);
}

/// Records the verdict of a flow checked again under `revision` on its
/// entry and its partner (identities as the flow's opener sees them).
#[inline(always)]
fn settle(entry: *mut PolicyCtValue, tuple: &CtKey, revision: u32, verdict: &Verdict) {
    let (flags, outcome) = if verdict.allowed() {
        (POLICY_CT_ALLOWED, 0)
    } else {
        (0, verdict.outcome.index() as u8)
    };
    let write = |entry: *mut PolicyCtValue| {
        // SAFETY: a pointer from a successful lookup; concurrent packets of
        // the flow write the same verdict with plain stores.
        unsafe {
            (*entry).revision = revision;
            (*entry).flags = ((*entry).flags & !POLICY_CT_ALLOWED) | flags;
            (*entry).outcome = outcome;
            (*entry).src_identity = verdict.src_identity as u16;
            (*entry).dst_identity = verdict.dst_identity as u16;
        }
    };
    write(entry);
    if let Some(partner) = POLICY_CT.get_ptr_mut(&tuple.reversed()) {
        write(partner);
    }
}

/// The refusal an entry of a cut flow records, for a packet of its
/// direction.
#[inline(always)]
fn recorded_denial(value: &PolicyCtValue) -> Verdict {
    let outcome = if u32::from(value.outcome) == Outcome::PolicyDeniedEgress.index() {
        Outcome::PolicyDeniedEgress
    } else if u32::from(value.outcome) == Outcome::PolicyFailClosed.index() {
        Outcome::PolicyFailClosed
    } else {
        Outcome::PolicyDeniedIngress
    };
    let verdict = Verdict {
        src_identity: u32::from(value.src_identity),
        dst_identity: u32::from(value.dst_identity),
        ..Verdict::refused(outcome)
    };
    if value.flags & POLICY_CT_REPLY != 0 {
        verdict.reversed()
    } else {
        verdict
    }
}

/// Checks a packet of `tuple` (on the pods' side of any translation)
/// against policy, keeping and refreshing its flow's verdict.
#[inline(never)]
pub fn check(tuple: &CtKey, tcp_flags: u8, origin: Origin, now: u64) -> Verdict {
    let Some(state) = enforcing() else {
        return PASS;
    };
    let pod_ifindex = origin.pod_ifindex();
    let syn_only = tuple.proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(entry) = POLICY_CT.get_ptr_mut(tuple) {
        // SAFETY: a pointer from a successful lookup; plain data copied at once.
        let value = unsafe { *entry };
        // A SYN on a closed flow's tuple, or one claiming to open a flow
        // whose entries say it was opened the other way, is a new flow.
        let reopened =
            syn_only && (value.state == CT_STATE_CLOSING || value.flags & POLICY_CT_REPLY != 0);
        if !value.expired(tuple.proto, now) && !reopened {
            // The source was checked when the entry was made from this
            // interface; a packet of the flow from another pod is not.
            if pod_ifindex != 0
                && value.ifindex != pod_ifindex
                && !source_allowed(&tuple.saddr, pod_ifindex)
            {
                return SPOOFED;
            }
            if value.revision != state.revision {
                return recheck(entry, &value, tuple, tcp_flags, state.revision, now);
            }
            if value.flags & POLICY_CT_ALLOWED == 0 {
                return recorded_denial(&value);
            }
            touch(entry, &value, tuple, tcp_flags, now);
            return Verdict {
                to_local_pod: value.flags & POLICY_CT_TO_LOCAL_POD != 0,
                hop_ifindex: value.hop_ifindex,
                hop_macs: value.hop_macs,
                ..PASS
            };
        }
    }
    if pod_ifindex != 0 && !source_allowed(&tuple.saddr, pod_ifindex) {
        return SPOOFED;
    }
    new_flow(tuple, tcp_flags, origin, state.revision, now)
}

/// Checks a flow again under `revision`, as the direction that opened it,
/// and records the new verdict on both entries.
#[inline(always)]
fn recheck(
    entry: *mut PolicyCtValue,
    value: &PolicyCtValue,
    tuple: &CtKey,
    tcp_flags: u8,
    revision: u32,
    now: u64,
) -> Verdict {
    let reply = value.flags & POLICY_CT_REPLY != 0;
    let opened = if reply { tuple.reversed() } else { *tuple };
    let verdict = evaluate(&opened, value.flags & POLICY_CT_LOCAL_OPENER != 0);
    settle(entry, tuple, revision, &verdict);
    if verdict.allowed() {
        touch(entry, value, tuple, tcp_flags, now);
    }
    let verdict = Verdict {
        to_local_pod: value.flags & POLICY_CT_TO_LOCAL_POD != 0,
        ..verdict
    };
    if reply {
        verdict.reversed()
    } else {
        verdict
    }
}

/// The first packet of a flow this node has no entry for. A TCP packet that
/// is not a SYN continues a connection opened before its entries existed
/// (the first start of policy, an LRU eviction): it may be a reply of a
/// flow allowed the other way. Such a pickup can only pass packets the
/// receiving socket already has a connection for.
#[inline(always)]
fn new_flow(tuple: &CtKey, tcp_flags: u8, origin: Origin, revision: u32, now: u64) -> Verdict {
    let verdict = evaluate(tuple, origin == Origin::NODE);
    if verdict.allowed() {
        count(Outcome::PolicyAllowed);
        remember(tuple, origin, &verdict, revision, tcp_flags, now);
        return verdict;
    }
    let midstream = tuple.proto == PROTO_TCP && tcp_flags & TCP_SYN == 0;
    if !midstream {
        return verdict;
    }
    let opened = tuple.reversed();
    let reply = evaluate(&opened, false);
    if !reply.allowed() {
        return verdict;
    }
    count(Outcome::PolicyAllowed);
    remember(&opened, Origin::FORWARDED, &reply, revision, 0, now);
    Verdict {
        to_local_pod: false,
        ..reply.reversed()
    }
}

/// Records a packet on a flow's entry and its partner: at once on a change
/// of state or FIN bits, else at most once per [`REFRESH_INTERVAL_NS`]; a
/// completed TCP close deletes both.
#[inline(always)]
fn touch(entry: *mut PolicyCtValue, seen: &PolicyCtValue, tuple: &CtKey, tcp_flags: u8, now: u64) {
    let step = seen.step(tuple.proto, tcp_flags);
    if step.closes {
        let _ = POLICY_CT.remove(tuple);
        let _ = POLICY_CT.remove(&tuple.reversed());
        return;
    }
    let stale = now.wrapping_sub(seen.last_seen_ns) >= REFRESH_INTERVAL_NS;
    if step.state == seen.state && step.fins == seen.fins && !stale {
        return;
    }
    let write = |entry: *mut PolicyCtValue| {
        // SAFETY: a pointer from a successful lookup; concurrent packets of
        // the flow only race on these plain stores.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).state = step.state;
            (*entry).fins = step.fins;
            // A remembered hand-over is asked of the FIB again once a
            // refresh interval passed (a pod's neighbour entry may change).
            if stale {
                (*entry).hop_ifindex = 0;
            }
        }
    };
    write(entry);
    if let Some(partner) = POLICY_CT.get_ptr_mut(&tuple.reversed()) {
        write(partner);
    }
}

/// Remembers on the entry of `tuple` the hand-over the FIB gave for its
/// packets: the host end `ifindex` of the destination pod's interface and
/// the Ethernet addresses `macs`.
#[inline(always)]
pub fn learn_hop(tuple: &CtKey, ifindex: u32, macs: &[u8; 12]) {
    if let Some(entry) = POLICY_CT.get_ptr_mut(tuple) {
        // SAFETY: a pointer from a successful lookup; concurrent packets of
        // the flow write the same answer with plain stores.
        unsafe {
            (*entry).hop_macs = *macs;
            (*entry).hop_ifindex = ifindex;
        }
    }
}

/// Whether an ICMP error about the packet `quoted` (its tuple as the error
/// carries it) belongs to a flow policy allowed: errors of allowed flows
/// pass as their packets do (path MTU, port unreachable).
#[inline(never)]
pub fn related(quoted: &CtKey, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(value) = (unsafe { POLICY_CT.get(quoted) }).copied() else {
        return false;
    };
    value.flags & POLICY_CT_ALLOWED != 0 && !value.expired(quoted.proto, now)
}

/// Deletes the policy conntrack entries expired at `walk.now_ns`, counting
/// them in `walk`.
#[inline(always)]
pub fn collect(walk: &mut CtGcState) {
    // SAFETY: the map pointer is the address of a map definition (the
    // loader relocates it), the callback has the signature the kernel calls
    // it with, and `walk` outlives the call.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::addr_of!(POLICY_CT) as *mut c_void,
            visit as *const () as *mut c_void,
            (walk as *mut CtGcState).cast(),
            0,
        );
    }
}

/// One policy conntrack entry of a [`collect`] walk; 0 continues the walk.
///
/// # Safety
///
/// Called by the kernel only, with valid key and value pointers of the
/// policy conntrack map and the `CtGcState` passed to
/// `bpf_for_each_map_elem`.
unsafe extern "C" fn visit(
    _map: *mut c_void,
    key: *const CtKey,
    value: *const PolicyCtValue,
    walk: *mut CtGcState,
) -> u64 {
    // SAFETY: see the function's contract; both are copied to the stack.
    let (key, value) = unsafe { (*key, *value) };
    // SAFETY: as above.
    let walk = unsafe { &mut *walk };
    if value.expired(key.proto, walk.now_ns) {
        // Deleting the visited element is allowed for hash maps.
        if POLICY_CT.remove(&key).is_ok() {
            walk.policy_deleted += 1;
        }
    } else {
        walk.policy_live += 1;
    }
    0
}
