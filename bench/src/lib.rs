//! Benchmark support code.

pub mod crr;
pub mod driver;
pub mod kubeproxy;
