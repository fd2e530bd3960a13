//! The hooks: translation on `connect`, reverse translation on `getpeername`.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{v4_mapped, RevNat, ServiceKey, SockRevNatKey, SCOPE_EXTERNAL};

use crate::{
    lb::{select, Lookup},
    maps::SOCK_REV_NAT,
};

/// Let the system call proceed.
const ALLOW: i32 = 1;
/// Fail the system call with the error set by `bpf_set_retval` (EPERM by default).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the one the kernel passed to this program.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    // SAFETY: `sa` is the kernel's context; these fields are readable in connect4.
    let (ip4, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr: v4_mapped(ip4),
        port: port as u16,
        proto: proto as u8,
        scope: SCOPE_EXTERNAL,
    };
    match select(&key) {
        Lookup::NotAService => ALLOW,
        Lookup::NoBackends => {
            // SAFETY: helper available to cgroup programs; sets the syscall's error.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Lookup::Backend {
            service_id,
            backend,
        } => {
            let rev_key = SockRevNatKey {
                cookie: socket_cookie(&ctx),
                addr: backend.addr,
                port: backend.port,
                pad: [0; 6],
            };
            let rev = RevNat {
                addr: key.addr,
                port: key.port,
                pad: 0,
                service_id,
            };
            // A full LRU evicts the oldest entry; only getpeername of that old
            // socket would then show the backend, so the connect goes ahead.
            let _ = SOCK_REV_NAT.insert(&rev_key, &rev, 0);
            // SAFETY: user_ip4/user_port are writable in connect4.
            unsafe {
                (*sa).user_ip4 = backend.addr[3];
                (*sa).user_port = backend.port as u32;
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    // SAFETY: readable in getpeername4.
    let (ip4, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevNatKey {
        cookie: socket_cookie(&ctx),
        addr: v4_mapped(ip4),
        port: port as u16,
        pad: [0; 6],
    };
    // SAFETY: the value is copied before use.
    if let Some(rev) = unsafe { SOCK_REV_NAT.get(&key) }.copied() {
        // SAFETY: user_ip4/user_port are writable in getpeername4.
        unsafe {
            (*sa).user_ip4 = rev.addr[3];
            (*sa).user_port = rev.port as u32;
        }
    }
    ALLOW
}
