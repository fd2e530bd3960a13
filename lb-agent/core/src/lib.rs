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

/// Makes `$slim`, a type decoded from objects of a Kubernetes kind with
/// only the fields the agent reads, a resource kube-rs can list and watch:
/// its API coordinates, and its `metadata` field as the object's metadata.
macro_rules! slim_resource {
    ($slim:ty, api_version: $api_version:literal, group: $group:literal, kind: $kind:literal, plural: $plural:literal) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

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
