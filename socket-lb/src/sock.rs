//! The hooks: translation on `connect` and `sendmsg`, reverse translation on
//! `getpeername` and `recvmsg`, and cleanup on socket release. Each comes in an
//! IPv4 and an IPv6 flavour sharing one implementation; IPv4 addresses are
//! IPv4-mapped in the maps, so an IPv6 socket connecting to `::ffff:VIP`
//! finds the IPv4 service.
//!
//! Every translated socket keeps its reverse translation in the
//! [`SOCK_REV_NAT`] LRU, keyed by socket cookie and backend (an unconnected
//! UDP socket has one peer per datagram), until it is released. Socket-local
//! storage would spare the hash insert, but creating it on connect and its
//! RCU-deferred free on close cost about 4 % of a short connection's rate
//! (bench, 1-byte CRR), against about 2.5 % for the LRU's preallocated
//! entries (insert, lookup on accept, delete on release);
//! the agent also finds connected UDP sockets in the LRU to connect them
//! again when their backend goes (those the node leaves to the pod
//! programs, translated per datagram, are not in it and need nothing). The
//! reverse hooks and release look the LRU up only for peers on a port some
//! backend had ([`maybe_translated`]): the server side of a connection, the
//! most common other socket, pays one array read instead of a cookie and a
//! hash lookup.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use lb_common::{
    config::{SOCK_CONFIG_NODE_NETNS_ONLY, SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET},
    net::{is_v4_loopback, is_v4_mapped, v4_mapped, Addr, PROTO_UDP, V4_LOOPBACK},
    outcome::Outcome,
    service::{RevNat, ServiceKey, SCOPE_EXTERNAL, SCOPE_TC_CLUSTER},
    socket::SockRevNatKey,
};

use crate::{
    lb::{select, Lookup},
    maps::{
        count, maybe_translated, OPT_OUT, OPT_OUT_COUNT, POD_NETNS, SERVICES, SOCK_CONFIG,
        SOCK_REV_NAT,
    },
    policy,
};

/// Let the system call proceed.
const ALLOW: i32 = 1;
/// Fail the system call with the error set by `bpf_set_retval` (EPERM by default).
const REJECT: i32 = 0;
const EPERM: i32 = 1;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const AF_INET: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// The system call a translation hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `connect()`: the socket keeps the address it is given.
    Connect,
    /// `sendmsg()` of an unconnected UDP socket: one datagram.
    Sendmsg,
}

/// The socket's protocol.
#[inline(always)]
fn protocol(sa: *const bpf_sock_addr) -> u8 {
    // SAFETY: `protocol` is readable in every sock_addr hook.
    unsafe { (*sa).protocol as u8 }
}

/// The user-supplied address of the system call, as (address, port).
#[inline(always)]
fn user_addr(sa: *const bpf_sock_addr, family: Family) -> (Addr, u16) {
    // SAFETY: `sa` is the kernel's context; user_ip4/user_ip6/user_port are
    // readable by every sock_addr hook, with 4-byte loads as done here.
    unsafe {
        let addr = match family {
            Family::V4 => v4_mapped((*sa).user_ip4),
            Family::V6 => [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
        };
        (addr, (*sa).user_port as u16)
    }
}

/// Replaces the user-supplied address. Returns false when an IPv4 hook would
/// have to carry an IPv6 address.
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, family: Family, addr: &Addr, port: u16) -> bool {
    // SAFETY: the address fields are writable in connect, sendmsg, getpeername
    // and recvmsg hooks, with 4-byte stores as done here.
    unsafe {
        match family {
            Family::V4 => {
                if !is_v4_mapped(addr) {
                    return false;
                }
                (*sa).user_ip4 = addr[3];
            }
            Family::V6 => {
                (*sa).user_ip6[0] = addr[0];
                (*sa).user_ip6[1] = addr[1];
                (*sa).user_ip6[2] = addr[2];
                (*sa).user_ip6[3] = addr[3];
            }
        }
        (*sa).user_port = port as u32;
    }
    true
}

#[inline(always)]
fn fail_with(errno: i32) -> i32 {
    // SAFETY: helper available to cgroup programs; sets the syscall's error.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// Whether the calling process's cgroup opted out of socket translation.
/// While no cgroup did, one array read (always the same cache line) replaces
/// the cgroup id and the hash lookup.
#[inline(always)]
fn opted_out() -> bool {
    if OPT_OUT_COUNT.get(0).is_none_or(|&count| count == 0) {
        return false;
    }
    // SAFETY: a helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    OPT_OUT.get_ptr(&cgroup).is_some()
}

/// connect/sendmsg: steer a frontend address to a backend, unless the
/// socket's traffic is translated per packet: its cgroup opted out, the
/// node translates only its own network namespace and the socket is a pod's,
/// or it is a pod's connected UDP socket and the node asks for those to be
/// translated per datagram (checked once the Service is known to have a
/// backend, so that a Service without endpoints still fails `connect()`).
#[inline(always)]
fn translate(ctx: &SockAddrContext, family: Family, call: Call) -> i32 {
    let config = SOCK_CONFIG.get(0).copied().unwrap_or_default();
    // In a pod's namespace 127.0.0.0/8 is the pod's own loopback; in the
    // node's it reaches NodePorts, as with kube-proxy.
    let in_node_netns = || {
        // SAFETY: the context is the one the kernel passed to this program.
        config.node_netns != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == config.node_netns
    };
    if config.flags & SOCK_CONFIG_NODE_NETNS_ONLY != 0 && !in_node_netns() {
        return ALLOW;
    }
    if opted_out() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let (addr, port) = user_addr(sa, family);
    let frontend_addr = if !is_v4_loopback(&addr) {
        addr
    } else if in_node_netns() {
        V4_LOOPBACK
    } else {
        return ALLOW;
    };
    let proto = protocol(sa);
    let refused = || {
        count(Outcome::SocketPolicyDenied);
        fail_with(EPERM)
    };
    let key = ServiceKey {
        addr: frontend_addr,
        port,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: the context is the one the kernel passed to this program.
    let client = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match select(&key, client) {
        Lookup::NotAService if policy::denies(&addr, port, proto) => refused(),
        Lookup::NotAService => ALLOW,
        Lookup::NoBackends => {
            count(Outcome::SocketNoEndpoints);
            fail_with(ECONNREFUSED)
        }
        Lookup::NoLocalBackends => {
            count(Outcome::SocketNoLocalEndpoints);
            fail_with(EHOSTUNREACH)
        }
        Lookup::Backend { backend, .. } if policy::denies(&backend.addr, backend.port, proto) => {
            refused()
        }
        Lookup::Backend { .. }
            if call == Call::Connect
                && proto == PROTO_UDP
                && config.flags & SOCK_CONFIG_POD_CONNECTED_UDP_PER_PACKET != 0
                && POD_NETNS.get_ptr(&client()).is_some()
                && served_per_packet(&key) =>
        {
            ALLOW
        }
        Lookup::Backend {
            service_id,
            backend,
        } => {
            let rev = RevNat {
                addr,
                port,
                pad: 0,
                service_id,
            };
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let rev_key = SockRevNatKey::new(cookie, backend.addr, backend.port);
            // A full LRU evicts its oldest entry; only that old socket
            // would then see the backend address in getpeername/recvmsg.
            let _ = SOCK_REV_NAT.insert(&rev_key, &rev, 0);
            if set_user_addr(sa, family, &backend.addr, backend.port) {
                ALLOW
            } else {
                fail_with(ECONNREFUSED)
            }
        }
    }
}

/// Whether the pod programs translate packets to the frontend `key`: its
/// per-packet twin is programmed. A socket left on a frontend without one
/// would send its datagrams nowhere (a full map, a frontend not written
/// yet): such a socket is translated here instead, as is one whose network
/// namespace is not in [`POD_NETNS`] (a host process's, or a new pod's
/// before the agent attached the pod programs to its interface).
#[inline(always)]
fn served_per_packet(key: &ServiceKey) -> bool {
    let per_packet = ServiceKey {
        scope: SCOPE_TC_CLUSTER,
        ..*key
    };
    SERVICES.get_ptr(&per_packet).is_some()
}

/// getpeername/recvmsg: show the frontend instead of the backend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = user_addr(sa, family);
    if !maybe_translated(port) {
        return ALLOW;
    }
    // SAFETY: the context is the one the kernel passed to this program.
    let key = SockRevNatKey::new(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, addr, port);
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REV_NAT.get(&key) }.copied() {
        set_user_addr(sa, family, &rev.addr, rev.port);
    }
    ALLOW
}

/// `connect()` of an IPv4 socket: steer a frontend to a backend.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, Call::Connect)
}

/// `connect()` of an IPv6 socket: steer a frontend to a backend.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, Call::Connect)
}

/// `sendmsg()` of an unconnected IPv4 UDP socket: steer each datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, Call::Sendmsg)
}

/// `sendmsg()` of an unconnected IPv6 UDP socket: steer each datagram.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, Call::Sendmsg)
}

/// `getpeername()` of an IPv4 socket: show the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

/// `getpeername()` of an IPv6 socket: show the frontend.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

/// `recvmsg()` of an IPv4 UDP socket: answers appear to come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

/// `recvmsg()` of an IPv6 UDP socket: answers appear to come from the frontend.
#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

/// Frees the reverse translation of a connected socket when it closes, so
/// that short connections do not evict the entries of long ones. Unconnected
/// UDP sockets have no single peer: their entries age out of the LRU.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: `sk` is the kernel's context and these fields are readable in
    // sock_release. Every field is loaded unconditionally with a volatile
    // read: loads under a branch get merged into one load through a computed
    // context pointer, which the verifier rejects.
    let (port, addr) = unsafe {
        let port = read_volatile(&(*sk).dst_port);
        let family = read_volatile(&(*sk).family);
        let ip4 = read_volatile(&(*sk).dst_ip4);
        let ip6 = [
            read_volatile(&(*sk).dst_ip6[0]),
            read_volatile(&(*sk).dst_ip6[1]),
            read_volatile(&(*sk).dst_ip6[2]),
            read_volatile(&(*sk).dst_ip6[3]),
        ];
        let addr = if family == AF_INET {
            v4_mapped(ip4)
        } else {
            ip6
        };
        (port, addr)
    };
    if port != 0 && maybe_translated(port) {
        // SAFETY: the context is the one the kernel passed to this program.
        let key = SockRevNatKey::new(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, addr, port);
        let _ = SOCK_REV_NAT.remove(&key);
    }
    ALLOW
}
