//! Benchmark support code.

pub mod crr;
pub mod kubeproxy;
