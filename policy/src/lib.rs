//! lb-policy: security identities from labels, and Kubernetes
//! NetworkPolicy compiled into what the datapath looks up. Pure: no kernel,
//! network, file or clock access; the agent feeds it objects and writes what
//! it returns.
//!
//! - [`labels`]: what an identity stands for; [`numbers`]: stable numbers.
//! - [`selector`] and [`rules`]: validated label selectors and policies.
//! - [`compile`]: the incremental compiler, objects to [`desired`] contents
//!   (identities, ipcache, endpoints, policy sets), with [`ports`] ranges
//!   as trie prefixes.
//! - [`desired::PolicyLookup::verdict`]: the verdict those contents give a
//!   flow, as the datapath computes it.
//! - [`tables`]: the maps' contents as data; [`plan`]: the ordered,
//!   make-before-break writes from what they hold to what they should;
//!   [`explain`]: what they hold, in words.
#![forbid(unsafe_code)]

pub mod compile;
pub mod desired;
pub mod explain;
pub mod labels;
pub mod numbers;
pub mod plan;
pub mod ports;
pub mod rules;
pub mod selector;
pub mod tables;
