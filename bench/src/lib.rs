//! Benchmark support code.

pub mod crr;
