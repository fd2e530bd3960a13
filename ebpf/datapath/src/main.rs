//! tc programs for per-packet service translation (NodePort, ExternalIPs,
//! LoadBalancer IPs). Not built out yet: see the project issues.
#![no_std]
#![no_main]

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
