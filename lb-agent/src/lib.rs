//! lb-agent: the shell around `lb-core`. It reads intent from the
//! Kubernetes API or a YAML directory ([`sources`]), lets `lb-core` compile
//! and plan, applies the plans to the kernel ([`kernel`], the only module
//! that talks to BPF, through [`reconcile`]), and serves health, metrics and
//! drop reports ([`serve`]). Network policy is compiled by `lb-policy` and
//! applied through [`policy_reconcile`]. Facts about the node live in [`node`];
//! [`daemon`] wires it all into the main loop.
#![forbid(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod kernel;
pub mod logging;
pub mod node;
pub mod opt_out;
pub mod pod_interfaces;
pub mod policy;
pub mod policy_reconcile;
pub mod reconcile;
pub mod serve;
pub mod sources;
pub mod startup;
