//! The lab and helpers shared by the end-to-end tests, the demo and the
//! datapath benchmarks.

pub mod agent;
pub mod controlplane;
pub mod kubelet;
pub mod lab;
pub mod manifests;
pub mod probe;
pub mod scenario;
