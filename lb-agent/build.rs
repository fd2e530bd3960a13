//! Builds the kernel crates for the BPF target so that `cargo build` alone yields
//! an agent with its programs embedded.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).parent().expect("workspace root");
    let socket_lb = root.join("socket-lb");
    let datapath = root.join("ebpf/datapath");
    let common = root.join("ebpf/common");
    println!("cargo:rerun-if-changed={}", common.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ebpf/build-kernel-crate.rs").display()
    );
    // The Makefile picks the machine's nightly or a pinned one (scripts/ebpf-toolchain.sh).
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    aya_build::build_ebpf(
        [
            aya_build::Package {
                name: "lb-socket-ebpf",
                root_dir: socket_lb.to_str().expect("utf-8 path"),
                ..Default::default()
            },
            aya_build::Package {
                name: "lb-datapath-ebpf",
                root_dir: datapath.to_str().expect("utf-8 path"),
                ..Default::default()
            },
        ],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
