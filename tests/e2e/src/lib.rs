//! The lab and helpers shared by the end-to-end tests, the demo and the
//! datapath benchmarks.
// The lab starts processes inside namespaces and cgroups (setns and a
// cgroup.procs write between fork and exec), kills the leftovers of crashed
// runs and stops its control plane at exit: raw system calls, each unsafe
// block with its SAFETY comment.
#![allow(unsafe_code, reason = "pre_exec, kill(2) and atexit(3) of the lab")]

pub mod agent;
pub mod controlplane;
pub mod flood;
pub mod kubelet;
pub mod lab;
pub mod manifests;
pub mod netpol;
pub mod probe;
pub mod scenario;
