//! lb-core: everything the agent decides, as plain functions and data, with
//! no kernel, network, file or clock access (as quinn keeps its protocol in
//! `quinn-proto`). The shell in `lb-agent` feeds it objects and applies what
//! it returns to the kernel.
//!
//! The pipeline, one module per stage:
//!
//! - [`yaml`]: Kubernetes YAML text in, typed objects out.
//! - [`admission`]: the API server's validation, for objects that did not
//!   come through one (the YAML source).
//! - [`intent`]: the objects a source holds ([`intent::Objects`]) and where
//!   this agent runs ([`intent::NodeContext`]).
//! - [`compile`]: Services and EndpointSlices to the frontends and backends
//!   that should be in the datapath ([`desired::DesiredState`]),
//!   incrementally, by concern: validation, endpoints, frontends.
//! - [`maglev`]: the tc path's consistent-hashing tables.
//! - [`plan`]: the map writes that move the kernel from what it holds
//!   ([`plan::Applied`]) to the desired state, make before break.
//! - [`drops`] and [`tables`]: what operators read: drop reports and
//!   `lbctl` tables.
#![forbid(unsafe_code)]

pub mod addr;
pub mod admission;
pub mod compile;
pub mod desired;
pub mod drops;
pub mod endpoint_slice;
pub mod intent;
pub mod maglev;
pub mod plan;
pub mod pod;
pub mod tables;
pub mod yaml;
