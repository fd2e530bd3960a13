//! Packet-in/packet-out tests of the tc datapath with `BPF_PROG_TEST_RUN`:
//! each test loads the programs with its own bpffs pin directory, writes
//! frontends, backends and Maglev tables like the agent would, runs raw
//! Ethernet frames through the programs and checks verdicts, rewritten
//! headers and checksums. One module per feature; `frames` builds and
//! parses the frames, `fixture` holds a node's datapath.
//!
//! The tests load BPF programs and create network namespaces: they need
//! root and bpffs mounted at /sys/fs/bpf. Run as another user, every test
//! fails at once saying so.

mod connected_udp;
mod conntrack;
mod fixture;
mod flood;
mod forwarding;
mod fragments;
mod frames;
mod fuzz;
mod icmp_errors;
mod nodeport;
mod prefilter;
mod reject;
mod source_ranges;
mod traffic_policy;

/// Fails the calling test at once, with a message saying why, unless the
/// process runs as root (effective user id 0, from `/proc/self/status`).
pub(crate) fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    // "Uid:" is followed by the real, effective, saved and filesystem ids.
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    assert!(
        effective == Some("0"),
        "these tests load BPF programs and need root; run them as root (make test does)"
    );
}
