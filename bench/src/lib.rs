//! Benchmark support code.
// Clients pin their threads to CPUs and read CLOCK_MONOTONIC, and the driver
// enters network namespaces between fork and exec: raw system calls, each
// unsafe block with its SAFETY comment.
#![allow(
    unsafe_code,
    reason = "sched_setaffinity, clock_gettime and setns in the benchmark harness"
)]

pub mod control_plane;
pub mod crr;
pub mod crr_stand;
pub mod driver;
pub mod kubeproxy;
pub mod policy_objects;
