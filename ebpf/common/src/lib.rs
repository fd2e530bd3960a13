//! Map keys, values and constants shared by the kernel programs and user space.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that its layout is the
//! same in the BPF object and in the agent. Addresses are stored as 16 bytes in
//! network byte order, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one map
//! serves both families; ports are stored in network byte order, as the kernel
//! hands them to `sock_addr` programs.
//!
//! A change to any layout here must bump [`MAP_LAYOUT_VERSION`] and the suffix of
//! the map names, so a new agent never reads a pinned map of the old layout.
#![no_std]
#![warn(missing_docs)]

pub mod tc;

/// Version of the map layouts below; part of every pinned map name.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Pinned map names. The kernel limits names to 15 bytes.
pub mod map_names {
    /// Frontends: [`ServiceKey`](crate::ServiceKey) -> [`ServiceValue`](crate::ServiceValue).
    pub const SERVICES: &str = "LB_SVC_V1";
    /// Backend slots: [`SlotKey`](crate::SlotKey) -> backend id.
    pub const BACKEND_SLOTS: &str = "LB_SLOT_V1";
    /// Backends by id: `u32` -> [`Backend`](crate::Backend).
    pub const BACKENDS: &str = "LB_BE_V1";
    /// Reverse NAT by service id: `u32` -> [`RevNat`](crate::RevNat).
    pub const REV_NAT: &str = "LB_REVNAT_V1";
    /// Per-socket reverse translation of translated sockets (connected ones
    /// until they are released, and one entry per backend an unconnected UDP
    /// socket sent to):
    /// [`SockRevNatKey`](crate::SockRevNatKey) -> [`RevNat`](crate::RevNat).
    pub const SOCK_REV_NAT: &str = "LB_SKNAT_V1";
    /// Every port a backend has had since the map was created, as a bitmap
    /// of [`BACKEND_PORT_WORDS`](crate::BACKEND_PORT_WORDS) `u64` words (see
    /// [`backend_port_bit`](crate::backend_port_bit)). Only a socket whose peer
    /// port is in it can have a reverse translation, so the socket programs
    /// skip the [`SOCK_REV_NAT`] lookup for every other socket (accepted ones,
    /// connections to non-Service ports). Bits are never cleared: a socket
    /// keeps its reverse translation after its backend left the Service.
    pub const BACKEND_PORTS: &str = "LB_BEPORT_V1";
    /// Human-readable service names for `lbctl`: `u32` -> [`ServiceName`](crate::ServiceName).
    pub const SERVICE_NAMES: &str = "LB_SVCNAME_V1";
    /// Session affinity: [`AffinityKey`](crate::AffinityKey) -> [`AffinityValue`](crate::AffinityValue).
    pub const AFFINITY: &str = "LB_AFF_V1";
    /// Per-CPU round-robin position per service id.
    pub const ROUND_ROBIN: &str = "LB_RR_V1";
    /// cgroups whose sockets are not translated: cgroup id (`u64`) -> `u32` (1).
    pub const OPT_OUT: &str = "LB_OPTOUT_V1";
    /// How many entries [`OPT_OUT`] has: array of one `u32`. While it is 0
    /// the socket programs skip the opt-out lookup.
    pub const OPT_OUT_COUNT: &str = "LB_OPTCNT_V1";
    /// Connections the socket programs refused, by `SOCK_STAT_*`: per-CPU
    /// array of `u64`. Not pinned: the counters restart with the agent.
    pub const SOCK_STATS: &str = "LB_SKSTAT_V1";
    /// How the socket programs serve this node: array of one
    /// [`SockConfig`](crate::SockConfig). Not pinned: the agent writes it
    /// before attaching.
    pub const SOCK_CONFIG: &str = "LB_SKCFG_V1";
}

/// Capacity of the frontend map.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backend map.
pub const MAX_BACKENDS: u32 = 131_072;
/// Capacity of the backend slot map. Sized for every service at 8 backends on
/// average plus a second generation of the largest services during a swap.
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
/// Capacity of the per-socket reverse translation LRU.
pub const MAX_SOCK_REV_NAT: u32 = 262_144;
/// Words of [`map_names::BACKEND_PORTS`]: one bit per port.
pub const BACKEND_PORT_WORDS: u32 = 65_536 / 64;

/// The word of [`map_names::BACKEND_PORTS`] that holds `port` (network byte
/// order, as the socket hooks see it) and its bit in that word.
pub const fn backend_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Capacity of the opt-out cgroup map.
pub const MAX_OPT_OUT: u32 = 65_536;
/// Capacity of the session affinity LRU.
pub const MAX_AFFINITY: u32 = 131_072;
/// Longest service name kept for display, in bytes.
pub const SERVICE_NAME_LEN: usize = 128;

/// Entries of [`map_names::SOCK_STATS`].
pub const SOCK_STATS_LEN: u32 = 2;
/// Counter: connect/sendmsg refused with ECONNREFUSED, the Service has no
/// endpoints.
pub const SOCK_STAT_REFUSED_NO_ENDPOINTS: u32 = 0;
/// Counter: connect/sendmsg refused with EHOSTUNREACH, traffic policy Local
/// and no endpoint on this node.
pub const SOCK_STAT_REFUSED_NO_LOCAL: u32 = 1;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Frontend scope: reachable by every client.
pub const SCOPE_EXTERNAL: u8 = 0;

/// [`ServiceValue::flags`]: ClientIP session affinity.
pub const SERVICE_FLAG_AFFINITY: u32 = 1 << 0;
/// [`ServiceValue::flags`]: no usable backend on this node under a Local
/// traffic policy; kube-proxy drops such traffic instead of rejecting it.
pub const SERVICE_FLAG_NO_LOCAL_BACKENDS: u32 = 1 << 1;

/// An IPv6 address, or an IPv4-mapped one, as four words whose memory layout is
/// the address in network byte order (as the kernel's `user_ip6` is laid out).
pub type Addr = [u32; 4];

/// Builds the IPv4-mapped [`Addr`] of an IPv4 address given as the kernel's
/// `user_ip4` word (network byte order in memory).
#[inline(always)]
pub const fn v4_mapped(ip4_be_word: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be_word]
}

/// Whether an [`Addr`] is IPv4-mapped, and so its last word is the IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// [`SockConfig::flags`]: translate only sockets of the node's own network
/// namespace (host processes, hostNetwork pods); pods are translated per
/// packet on their interfaces.
pub const SOCK_CONFIG_NODE_NETNS_ONLY: u32 = 1 << 0;

/// How the socket programs serve this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// Cookie of the node's own network namespace, where 127.0.0.0/8
    /// reaches NodePorts; 0 when unknown.
    pub node_netns: u64,
    /// `SOCK_CONFIG_*` flags.
    pub flags: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// Whether an [`Addr`] is IPv4-mapped and in 127.0.0.0/8.
#[inline(always)]
pub const fn is_v4_loopback(addr: &Addr) -> bool {
    is_v4_mapped(addr) && addr[3].to_ne_bytes()[0] == 127
}

/// 127.0.0.1, IPv4-mapped: the address localhost NodePort frontends are keyed by.
pub const V4_LOOPBACK: Addr = v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));

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

/// A frontend's current backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of the ServicePort; keys [`map_names::REV_NAT`].
    pub service_id: u32,
    /// Generation of backend slots in use. A change writes a new generation and
    /// then flips this field, so a reader never sees a half-written set.
    pub slot_generation: u32,
    /// Number of slots `0..backend_count` in that generation; 0 means "reject".
    pub backend_count: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds, with [`SERVICE_FLAG_AFFINITY`].
    pub affinity_timeout_s: u32,
}

/// Key of a backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// The [`ServiceValue::slot_generation`] this slot belongs to.
    pub generation: u32,
    /// Slot index, `0..backend_count`.
    pub slot: u32,
}

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
    /// Option bits; none defined yet, kept so options do not change the layout.
    pub flags: u8,
}

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

/// Key of the per-socket reverse translation: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend address the socket was steered to.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding.
    pub pad: [u8; 6],
}

impl SockRevNatKey {
    /// The key of the socket with `cookie` sent to backend `addr`:`port`.
    pub const fn new(cookie: u64, addr: Addr, port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            pad: [0; 6],
        }
    }
}

/// Key of a session affinity entry: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client: its network namespace cookie. Each pod has its own network
    /// namespace, hence its own address, so this is kube-proxy's "ClientIP".
    pub client: u64,
    /// Service id of the frontend.
    pub service_id: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// Which backend a client was last sent to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend.
    pub backend_id: u32,
    /// Explicit padding.
    pub pad: u32,
    /// `bpf_ktime_get_ns` of the last connection.
    pub last_used_ns: u64,
}

impl AffinityValue {
    /// Whether the client still sticks to its backend at `now_ns` (same
    /// clock as `last_used_ns`) under a timeout of `timeout_s` seconds.
    #[inline(always)]
    pub const fn holds(&self, now_ns: u64, timeout_s: u32) -> bool {
        now_ns.wrapping_sub(self.last_used_ns) <= timeout_s as u64 * 1_000_000_000
    }
}

/// A NUL-padded UTF-8 name (`namespace/name:port`) for display.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// The bytes, NUL-padded.
    pub bytes: [u8; SERVICE_NAME_LEN],
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type below is repr(C), Copy, has no padding bytes left
    // implicit and is valid for any bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<RevNat>(), 24);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockConfig>(), 16);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let word = u32::from_ne_bytes([10, 96, 0, 1]);
        let addr = v4_mapped(word);
        assert!(is_v4_mapped(&addr));
        assert_eq!(addr[3], word);
        assert!(!is_v4_mapped(&[0, 0, 0, 1]));
    }

    #[test]
    fn v4_loopback_is_all_of_127_slash_8_and_nothing_else() {
        let mapped = |octets: [u8; 4]| v4_mapped(u32::from_ne_bytes(octets));
        assert!(is_v4_loopback(&V4_LOOPBACK));
        assert!(is_v4_loopback(&mapped([127, 1, 2, 3])));
        assert!(!is_v4_loopback(&mapped([10, 0, 0, 127])));
        assert!(!is_v4_loopback(&mapped([128, 0, 0, 1])));
        let v6_loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert!(!is_v4_loopback(&v6_loopback));
    }
}
