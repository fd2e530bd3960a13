//! cgroup `sock_addr` programs that translate Service VIPs at the socket layer:
//! `connect()` to a frontend is rewritten to a backend once per connection, and
//! `getpeername()` shows the frontend again, so applications never see a backend
//! address they did not ask for. A connection the caller's egress policy
//! denies fails at `connect()` ([`policy`]).
#![no_std]
#![no_main]
// A BPF program reads the kernel's context, calls helpers and writes maps
// through raw pointers: unsafe, each block with its SAFETY.
#![allow(unsafe_code, reason = "BPF helpers, context and map pointers")]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "a by-value key is one more copy on the 512-byte BPF stack"
)]

mod lb;
mod maps;
mod policy;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
