//! lb-agent: compiles Kubernetes Services and EndpointSlices into the eBPF maps
//! of the socket-level load balancer.
//!
//! The deciding parts ([`model`], [`plan`], [`maglev`], [`view`],
//! [`sockdiag`], [`config`], [`drops`]) are sans-IO and unit tested without a kernel; the
//! I/O shells are thin: [`datapath`] (maps and programs), [`yaml`], [`k8s`] and
//! [`source`] (intent), [`terminate`] (sockets), [`netns`] (the node's
//! network namespace cookie), [`netlink`] (interface
//! kinds), [`http`], [`health`],
//! [`metrics`], and [`daemon`] (the main loop).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod drops;
pub mod health;
pub mod http;
pub mod k8s;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod plan;
pub mod podcgroups;
pub mod reconcile;
pub mod sockdiag;
pub mod source;
pub mod tcpath;
pub mod terminate;
pub mod view;
pub mod yaml;
