use which::which;

/// Rebuild the programs when bpf-linker changes: a new linker can change the object.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker is not installed; run `make bootstrap`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
}
