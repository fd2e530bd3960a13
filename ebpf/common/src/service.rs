//! Frontends and backends: the maps both program sets read to translate a
//! Service address to a backend.
//!
//! A frontend is a [`ServiceKey`] (address, port, protocol, scope) with a
//! [`ServiceValue`]. The socket programs look up [`SCOPE_EXTERNAL`] keys and
//! pick among the frontend's backend slots; the tc programs look up
//! [`SCOPE_TC_EXTERNAL`] keys (NodePorts, ExternalIPs, LoadBalancer IPs) and
//! then [`SCOPE_TC_CLUSTER`] keys (ClusterIPs translated per packet), and
//! pick from the frontend's Maglev table (see [`crate::maglev`]): in such an
//! entry `slot_generation` is the generation of its table, `backend_count`
//! the number of distinct backends in it and `affinity_timeout_s` is used as
//! on the socket path.

use crate::{assert_layout, net::Addr};

/// Longest service name kept for display, in bytes.
pub const SERVICE_NAME_LEN: usize = 128;

/// Frontend scope: reachable by every client of the socket path.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Frontend scope of the tc programs for traffic entering the node:
/// NodePort (keyed by each node address and the nodePort), ExternalIPs and
/// LoadBalancer ingress IPs.
pub const SCOPE_TC_EXTERNAL: u8 = 1;
/// Frontend scope of a ClusterIP translated per packet, for pods whose
/// sockets are not translated. Looked up after [`SCOPE_TC_EXTERNAL`], with
/// [`SERVICE_FLAG_PRESERVE_SOURCE`].
pub const SCOPE_TC_CLUSTER: u8 = 2;

/// Whether frontends of `scope` are served by Maglev tables (the tc path)
/// rather than backend slots (the socket path).
pub const fn uses_maglev(scope: u8) -> bool {
    scope == SCOPE_TC_EXTERNAL || scope == SCOPE_TC_CLUSTER
}

/// [`ServiceValue::flags`]: ClientIP session affinity.
pub const SERVICE_FLAG_AFFINITY: u32 = 1 << 0;
/// [`ServiceValue::flags`]: no usable backend on this node under a Local
/// traffic policy; kube-proxy drops such traffic instead of rejecting it.
pub const SERVICE_FLAG_NO_LOCAL_BACKENDS: u32 = 1 << 1;
/// [`ServiceValue::flags`]: externalTrafficPolicy Local. The Maglev table
/// holds only this node's backends and the client address is preserved (no
/// SNAT).
pub const SERVICE_FLAG_EXTERNAL_LOCAL: u32 = 1 << 16;
/// [`ServiceValue::flags`]: loadBalancerSourceRanges apply; new flows from
/// sources outside the ranges of this service id (see
/// [`crate::source_range`]) are dropped.
pub const SERVICE_FLAG_SOURCE_RANGES: u32 = 1 << 17;
/// [`ServiceValue::flags`]: never SNAT, whatever node the backend is on
/// (ClusterIP traffic keeps the pod's address, as with kube-proxy on a
/// routed pod network).
pub const SERVICE_FLAG_PRESERVE_SOURCE: u32 = 1 << 18;

/// [`Backend::flags`]: the backend runs on this node. Under
/// externalTrafficPolicy Cluster, flows to backends without this flag are
/// SNATed to the node address so replies come back through this node.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 7;

/// Key of a frontend: one (address, port, protocol) a Service answers on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address.
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Which clients this frontend applies to (see `SCOPE_*`).
    pub scope: u8,
}
assert_layout!(ServiceKey, 20, { addr: 0, port: 16, proto: 18, scope: 19 });

/// A frontend's current backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of the ServicePort; keys the reverse translation.
    pub service_id: u32,
    /// Generation of backend slots (or of the Maglev table) in use. A change
    /// writes a new generation and then flips this field, so a reader never
    /// sees a half-written set.
    pub slot_generation: u32,
    /// Number of slots `0..backend_count` in that generation; 0 means "reject".
    pub backend_count: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds, with [`SERVICE_FLAG_AFFINITY`].
    pub affinity_timeout_s: u32,
}
assert_layout!(ServiceValue, 20, {
    service_id: 0, slot_generation: 4, backend_count: 8, flags: 12, affinity_timeout_s: 16,
});

/// Key of a backend slot of the socket path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// The [`ServiceValue::slot_generation`] this slot belongs to.
    pub generation: u32,
    /// Slot index, `0..backend_count`.
    pub slot: u32,
}
assert_layout!(SlotKey, 8, { generation: 0, slot: 4 });

/// A backend endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend address.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
}
assert_layout!(Backend, 20, { addr: 0, port: 16, proto: 18, flags: 19 });

/// Where replies of a translated flow must appear to come from: the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    /// Frontend address.
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Explicit padding.
    pub pad: u16,
    /// Service id of the frontend.
    pub service_id: u32,
}
assert_layout!(RevNat, 24, { addr: 0, port: 16, pad: 18, service_id: 20 });

/// A NUL-padded UTF-8 name (`namespace/name:port`) for display.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// The bytes, NUL-padded.
    pub bytes: [u8; SERVICE_NAME_LEN],
}
assert_layout!(ServiceName, SERVICE_NAME_LEN, { bytes: 0 });

#[cfg(feature = "user")]
crate::user_pod!(
    ServiceKey,
    ServiceValue,
    SlotKey,
    Backend,
    RevNat,
    ServiceName
);
