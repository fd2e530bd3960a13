//! lb-agent: compiles Kubernetes Services and EndpointSlices into the eBPF maps
//! of the socket-level load balancer.
//!
//! The deciding parts ([`model`], [`plan`], [`view`]) are sans-IO and unit
//! tested without a kernel; [`datapath`] and [`yaml`] are the thin I/O shells.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod datapath;
pub mod maglev;
pub mod model;
pub mod mounts;
pub mod plan;
pub mod reconcile;
pub mod sockdiag;
pub mod terminate;
pub mod view;
pub mod yaml;
