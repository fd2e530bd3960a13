//! cgroup `sock_addr` programs that translate Service VIPs at the socket layer:
//! `connect()` to a frontend is rewritten to a backend once per connection, and
//! `getpeername()` shows the frontend again, so applications never see a backend
//! address they did not ask for.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
