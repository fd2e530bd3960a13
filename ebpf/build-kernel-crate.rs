//! Build script of both kernel crates (`socket-lb`, `ebpf/datapath`).

use which::which;

/// Rebuild the programs when bpf-linker changes: a new linker can change the
/// object. Let LLVM expand small memset/memcpy calls into plain stores:
/// bpf-linker's default (`--bpf-expand-memcpy-in-order`) leaves every memset
/// a call to a byte-at-a-time loop, which zeroing a FIB lookup's parameters
/// on every packet paid for.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker is not installed; run `make bootstrap`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
