//! Packet-in/packet-out tests of the tc datapath with `BPF_PROG_TEST_RUN`:
//! each test loads the programs with its own bpffs pin directory, writes
//! frontends, backends and Maglev tables like the agent would, runs raw
//! Ethernet frames through the programs and checks verdicts, rewritten
//! headers and checksums. Needs root and bpffs at /sys/fs/bpf.
// Creating an older agent's pinned map takes a raw bpf(2) call.
#![allow(
    unsafe_code,
    reason = "raw bpf(2) calls to create an older layout's map"
)]

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap, Map, MapData};
use lb_agent::{
    kernel::{
        service_maps::TcMaps,
        tc_programs::{TcHook, TcOptions, TcPrograms},
    },
    node::clock::boottime_ns,
};
use lb_common::{
    config::{TcConfig, TC_CONFIG_FIB_REDIRECT},
    conntrack::{
        CtKey, CtValue, CtValueV1, CT_FLAG_REPLY, CT_FLAG_REWRITE_DST, CT_FLAG_REWRITE_SRC,
        CT_STATE_CLOSING, CT_STATE_ESTABLISHED, NEXT_HOP_NONE, NEXT_HOP_REDIRECT,
    },
    events::REPORTS_PER_SECOND,
    maglev::flow_hash,
    maps,
    nat::{SNAT_PORT_COUNT, SNAT_PORT_MIN},
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN},
    outcome::Outcome,
    reject::REJECT_BURST,
    service::{
        Backend, ServiceKey, ServiceValue, BACKEND_FLAG_LOCAL, SCOPE_TC_EXTERNAL,
        SERVICE_FLAG_AFFINITY, SERVICE_FLAG_EXTERNAL_LOCAL, SERVICE_FLAG_NO_LOCAL_BACKENDS,
        SERVICE_FLAG_SOURCE_RANGES,
    },
};
use lb_core::{
    addr::{addr_from_ip, ip_from_addr},
    maglev::{build_table, sorted_backends, MaglevBackend},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const SEED: u64 = 0x5eed;
const TABLE_SIZE: usize = 251;

const NODE4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const NODE_PORT: u16 = 30080;

// ---------------------------------------------------------------------------
// Frames

/// Ones' complement sum of big-endian 16-bit words.
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut pseudo = ip_bytes(src);
    pseudo.extend(ip_bytes(dst));
    match src {
        IpAddr::V4(_) => pseudo.extend([0, proto, (len >> 8) as u8, len as u8]),
        IpAddr::V6(_) => pseudo.extend([
            (len >> 24) as u8,
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0,
            proto,
        ]),
    }
    sum16(&pseudo)
}

/// A flow's packet: addresses, ports, protocol, TCP flags and payload.
#[derive(Clone, Copy, Debug)]
struct Pkt<'a> {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    flags: u8,
    seq: u32,
    payload: &'a [u8],
}

impl<'a> Pkt<'a> {
    fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: PROTO_TCP,
            flags,
            seq: 1000,
            payload: &[],
        }
    }

    fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &'a [u8]) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: PROTO_UDP,
            flags: 0,
            seq: 0,
            payload,
        }
    }

    /// The Ethernet frame, with valid checksums.
    fn frame(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend(self.seq.to_be_bytes());
            l4.extend(0u32.to_be_bytes());
            l4.extend([5 << 4, self.flags]);
            l4.extend(64240u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(self.payload);
        let csum_off = if self.proto == PROTO_TCP { 16 } else { 6 };
        let csum = fold(pseudo_sum(self.src, self.dst, self.proto, l4.len()) + sum16(&l4));
        l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());

        ip_frame(self.src, self.dst, self.proto, &l4)
    }
}

/// An Ethernet frame carrying `payload` of protocol `proto` from `src` to
/// `dst`, with a valid IPv4 header checksum.
fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            frame.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend(((20 + payload.len()) as u16).to_be_bytes());
            ip.extend([0, 1, 0x40, 0, 64, proto, 0, 0]);
            ip.extend(src.octets());
            ip.extend(dst.octets());
            let csum = fold(sum16(&ip));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend(ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend([0x86, 0xdd]);
            frame.extend([0x60, 0, 0, 0]);
            frame.extend((payload.len() as u16).to_be_bytes());
            frame.extend([proto, 64]);
            frame.extend(src.octets());
            frame.extend(dst.octets());
        }
        _ => panic!("mixed families"),
    }
    frame.extend(payload);
    frame
}

/// What a test reads back from a frame the program left.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    flags: u8,
    seq: u32,
    ack: u32,
    l4_csum: u16,
}

/// Parses a frame and checks its IPv4 header and L4 checksums.
fn parse(frame: &[u8]) -> Parsed {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let ip = &frame[14..34];
            assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (src, dst, ip[9], &frame[34..14 + total])
        }
        0x86dd => {
            let ip = &frame[14..54];
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (src, dst, ip[6], &frame[54..54 + len])
        }
        other => panic!("unexpected ethertype {other:#x}"),
    };
    let csum_off = if proto == PROTO_TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    if !(proto == PROTO_UDP && l4_csum == 0) {
        assert_eq!(
            fold(pseudo_sum(src, dst, proto, l4.len()) + sum16(l4)),
            0,
            "bad L4 checksum"
        );
    }
    let word = |at: usize| u32::from_be_bytes(l4[at..at + 4].try_into().unwrap());
    let tcp = proto == PROTO_TCP;
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        flags: if tcp { l4[13] } else { 0 },
        seq: if tcp { word(4) } else { 0 },
        ack: if tcp { word(8) } else { 0 },
        l4_csum,
    }
}

// ---------------------------------------------------------------------------
// Fixture

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// One node's datapath in its own pin directory, removed on drop.
struct Node {
    tc: TcPrograms,
    maps: TcMaps,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    dir: &std::path::Path,
    name: &str,
) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// A frontend as the agent would write it.
#[derive(Clone, Copy)]
struct Frontend {
    ip: IpAddr,
    port: u16,
    proto: u8,
    service_id: u32,
    flags: u32,
    affinity_timeout_s: u32,
}

impl Frontend {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: addr_from_ip(self.ip),
            port: self.port.to_be(),
            proto: self.proto,
            scope: SCOPE_TC_EXTERNAL,
        }
    }
}

/// A pin directory of this test process that does not exist yet.
fn fresh_dir() -> PathBuf {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbtc-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    dir
}

impl Node {
    fn new() -> Self {
        Self::with_options(&TcOptions {
            conntrack_capacity: 4096,
        })
    }

    fn with_options(options: &TcOptions) -> Self {
        Self::load_in(fresh_dir(), options)
    }

    /// Loads the programs with the pins already in `dir`, if any.
    fn load_in(dir: PathBuf, options: &TcOptions) -> Self {
        let (mut tc, maps) = TcPrograms::load(&dir, options).unwrap_or_else(|e| {
            let _ = fs::remove_dir_all(&dir);
            panic!("load the tc programs: {e:?}")
        });
        tc.set_config(&TcConfig {
            maglev_seed: SEED,
            snat_v4: addr_from_ip(NODE4.into()),
            snat_v6: addr_from_ip(NODE6.into()),
            flags: 0,
            pad: 0,
        })
        .unwrap();
        Self {
            tc,
            maps,
            services: pinned_hash(&dir, maps::SERVICES),
            backends: pinned_hash(&dir, maps::BACKENDS),
            dir,
        }
    }

    fn add_backend(&mut self, id: u32, ip: IpAddr, port: u16, proto: u8, local: bool) {
        let backend = Backend {
            addr: addr_from_ip(ip),
            port: port.to_be(),
            proto,
            flags: if local { BACKEND_FLAG_LOCAL } else { 0 },
        };
        self.backends.insert(id, backend, 0).unwrap();
    }

    /// The Maglev table of backend ids for `ids`, keyed by address and port
    /// like the agent would (so every node builds the same one).
    fn table(&self, ids: &[u32]) -> Vec<u32> {
        let backends: Vec<MaglevBackend<Vec<u8>>> = ids
            .iter()
            .map(|id| {
                let b = self.backends.get(id, 0).unwrap();
                let mut key: Vec<u8> = b.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
                key.extend(b.port.to_ne_bytes());
                MaglevBackend::new(key, 1)
            })
            .collect();
        let sorted: Vec<u32> = sorted_backends(&backends)
            .iter()
            .map(|s| ids[backends.iter().position(|b| b.key == s.key).unwrap()])
            .collect();
        build_table(&backends, TABLE_SIZE, SEED)
            .unwrap()
            .into_iter()
            .map(|i| sorted[i as usize])
            .collect()
    }

    /// Writes a Maglev table of `ids` under `generation` and points the
    /// frontend at it, make before break.
    fn set_frontend(&mut self, fe: &Frontend, generation: u32, ids: &[u32]) {
        if !ids.is_empty() {
            let table = self.table(ids);
            self.maps.write_table(generation, &table).unwrap();
        }
        let value = ServiceValue {
            service_id: fe.service_id,
            slot_generation: generation,
            backend_count: ids.len() as u32,
            flags: fe.flags,
            affinity_timeout_s: fe.affinity_timeout_s,
        };
        self.services.insert(fe.key(), value, 0).unwrap();
    }

    fn run(&mut self, hook: TcHook, pkt: &Pkt<'_>) -> (i32, Vec<u8>) {
        self.tc.test_run(hook, &pkt.frame()).expect("test run")
    }

    fn ingress(&mut self, pkt: &Pkt<'_>) -> (i32, Parsed) {
        let (verdict, out) = self.run(TcHook::Ingress, pkt);
        (verdict, parse(&out))
    }

    fn egress(&mut self, pkt: &Pkt<'_>) -> (i32, Parsed) {
        let (verdict, out) = self.run(TcHook::Egress, pkt);
        (verdict, parse(&out))
    }

    fn stat(&self, outcome: Outcome) -> u64 {
        let counts = self.tc.stats().unwrap();
        counts
            .iter()
            .find(|(o, _)| *o == outcome)
            .expect("a tc outcome")
            .1
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn backend4(i: u8) -> IpAddr {
    v4(10, 244, 1, i)
}

fn backend6(i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, i))
}

fn nodeport(ip: IpAddr, proto: u8) -> Frontend {
    Frontend {
        ip,
        port: NODE_PORT,
        proto,
        service_id: 7,
        flags: 0,
        affinity_timeout_s: 0,
    }
}

/// A node with a TCP NodePort on NODE4 and three local backends (ids 1-3).
fn node_with_local_backends() -> (Node, Frontend) {
    let mut node = Node::new();
    for i in 1..=3 {
        node.add_backend(u32::from(i), backend4(i), 8080, PROTO_TCP, true);
    }
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1, 2, 3]);
    (node, fe)
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn nodeport_tcp_syn_is_dnated_with_valid_checksums() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 40000, fe.ip, NODE_PORT, SYN);
    let (verdict, out) = node.ingress(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert!((1..=3).any(|i| out.dst == backend4(i)), "{out:?}");
    assert_eq!(out.dport, 8080);
    // Local backend: the client address is preserved.
    assert_eq!((out.src, out.sport), (syn.src, syn.sport));
    assert_eq!((out.proto, out.flags, out.seq), (PROTO_TCP, SYN, 1000));
    assert_eq!(node.stat(Outcome::NewFlow), 1);
}

#[test]
fn new_flow_follows_the_maglev_table() {
    let (mut node, fe) = node_with_local_backends();
    let table = node.table(&[1, 2, 3]);
    for sport in 40000..40032u16 {
        let syn = Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, SYN);
        let (_, out) = node.ingress(&syn);
        let id = maglev_pick(&table, syn.src, sport);
        assert_eq!(out.dst, backend4(id as u8), "source port {sport}");
    }
}

/// The backend Maglev gives a flow from `client`:`sport` to the NodePort.
fn maglev_pick(table: &[u32], client: IpAddr, sport: u16) -> u32 {
    let hash = flow_hash(
        SEED,
        &addr_from_ip(client),
        sport.to_be(),
        NODE_PORT.to_be(),
        PROTO_TCP,
    );
    table[hash as usize % TABLE_SIZE]
}

/// sessionAffinity ClientIP on the packet path: every new flow of a client
/// goes where its first flow went, whatever Maglev would pick; the binding
/// ends when the agent prunes it (its backend left) or after the timeout.
#[test]
fn client_ip_affinity_keeps_new_flows_of_a_client_on_one_backend() {
    let mut node = Node::new();
    for i in 1..=3 {
        node.add_backend(u32::from(i), backend4(i), 8080, PROTO_TCP, true);
    }
    let fe = Frontend {
        flags: SERVICE_FLAG_AFFINITY,
        affinity_timeout_s: 1,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    node.set_frontend(&fe, 1, &[1, 2, 3]);
    let table = node.table(&[1, 2, 3]);
    let client: IpAddr = CLIENT4.into();
    let syn = |sport| Pkt::tcp(client, sport, fe.ip, NODE_PORT, SYN);

    let (_, first) = node.ingress(&syn(40000));
    let bound = (1..=3u8).find(|&i| backend4(i) == first.dst).unwrap();
    // Source ports Maglev alone would send elsewhere still reach it.
    let elsewhere: Vec<u16> = (40001..41000u16)
        .filter(|&p| maglev_pick(&table, client, p) != u32::from(bound))
        .take(20)
        .collect();
    assert_eq!(elsewhere.len(), 20);
    for &sport in &elsewhere {
        let (verdict, out) = node.ingress(&syn(sport));
        assert_eq!((verdict, out.dst), (TC_ACT_OK, first.dst), "port {sport}");
    }
    let entries = node.maps.affinity_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0.client, addr_from_ip(client));
    assert_eq!(entries[0].0.service_id, fe.service_id);
    assert_eq!(entries[0].1.backend_id, u32::from(bound));

    // The backend leaves the service: the agent prunes the binding and the
    // client's next flow is placed by the new table.
    let rest: Vec<u32> = (1..=3).filter(|&i| i != u32::from(bound)).collect();
    node.set_frontend(&fe, 2, &rest);
    let pruned = node
        .maps
        .prune_affinity(&|_, backend_id| rest.contains(&backend_id))
        .unwrap();
    assert_eq!(pruned, 1);
    let (_, moved) = node.ingress(&syn(42000));
    let rebound = node.maps.affinity_entries().unwrap()[0].1.backend_id;
    assert_ne!(moved.dst, first.dst);
    assert_eq!(moved.dst, backend4(rebound as u8));

    // After the timeout without new flows, Maglev decides again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let table = node.table(&rest);
    let sport = (43000..44000u16)
        .find(|&p| maglev_pick(&table, client, p) != rebound)
        .unwrap();
    let (_, after) = node.ingress(&syn(sport));
    assert_eq!(
        after.dst,
        backend4(maglev_pick(&table, client, sport) as u8)
    );
}

#[test]
fn conntrack_keeps_a_flow_on_its_backend() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, SYN);
    let (_, first) = node.ingress(&syn);
    let (_, again) = node.ingress(&syn);
    assert_eq!(first.dst, again.dst);
    assert_eq!(node.stat(Outcome::NewFlow), 1);
    // Two entries: client side and backend side.
    let entries = node.tc.conntrack_entries().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries
            .iter()
            .filter(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
            .count(),
        1
    );

    // A new table generation without this flow's backend but with two new
    // ones: the established flow stays (conntrack before Maglev) as long as
    // its backend exists.
    node.add_backend(4, backend4(4), 8080, PROTO_TCP, true);
    node.add_backend(5, backend4(5), 8080, PROTO_TCP, true);
    let others: Vec<u32> = (1..=5u32)
        .filter(|&i| backend4(i as u8) != first.dst)
        .collect();
    node.set_frontend(&fe, 2, &others);
    node.maps.delete_table(1, TABLE_SIZE).unwrap();
    let ack = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, ACK);
    let (verdict, kept) = node.ingress(&ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(kept.dst, first.dst);

    // Once the backend is deleted, the flow moves to a backend of the table.
    let gone = (1..=3u32)
        .find(|&i| backend4(i as u8) == first.dst)
        .unwrap();
    node.backends.remove(&gone).unwrap();
    let (verdict, moved) = node.ingress(&ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_ne!(moved.dst, first.dst);
    assert!(others.iter().any(|&i| backend4(i as u8) == moved.dst));
}

#[test]
fn same_flow_same_backend_on_every_node() {
    let (mut a, fe) = node_with_local_backends();
    // Another node: same backends under different ids, written in another
    // order, and a different node address for the frontend.
    let mut b = Node::new();
    for i in (1..=3u8).rev() {
        b.add_backend(100 + u32::from(i), backend4(i), 8080, PROTO_TCP, true);
    }
    let fe_b = Frontend {
        ip: v4(192, 0, 2, 11),
        service_id: 99,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    b.set_frontend(&fe_b, 5, &[103, 101, 102]);
    let mut spread = std::collections::BTreeSet::new();
    for sport in 42000..42040u16 {
        let (_, on_a) = a.ingress(&Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, SYN));
        let (_, on_b) = b.ingress(&Pkt::tcp(CLIENT4.into(), sport, fe_b.ip, NODE_PORT, SYN));
        assert_eq!(on_a.dst, on_b.dst, "source port {sport}");
        spread.insert(on_a.dst);
    }
    assert_eq!(spread.len(), 3, "flows should spread over all backends");
}

#[test]
fn reply_of_a_local_backend_is_reverse_translated_on_egress() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 43000, fe.ip, NODE_PORT, SYN);
    let (_, fwd) = node.ingress(&syn);
    let syn_ack = Pkt {
        seq: 5000,
        ..Pkt::tcp(fwd.dst, 8080, CLIENT4.into(), 43000, SYN | ACK)
    };
    let (verdict, reply) = node.egress(&syn_ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));
    assert_eq!((reply.dst, reply.dport), (IpAddr::from(CLIENT4), 43000));
    assert_eq!((reply.flags, reply.seq), (SYN | ACK, 5000));
    // Unrelated traffic leaving the node is untouched.
    let other = Pkt::tcp(fwd.dst, 8080, v4(203, 0, 113, 1), 43000, ACK);
    let (verdict, out) = node.run(TcHook::Egress, &other);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, other.frame());
}

#[test]
fn remote_backend_is_snated_and_its_reply_restored() {
    isolated(|| {
        let mut node = Node::new();
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        let syn = Pkt::tcp(CLIENT4.into(), 44000, fe.ip, NODE_PORT, SYN);
        let (verdict, fwd) = node.ingress(&syn);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((fwd.dst, fwd.dport), (backend4(1), 8080));
        assert_eq!(fwd.src, IpAddr::from(NODE4));
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MIN + (SNAT_PORT_COUNT - 1)).contains(&fwd.sport));
        // The backend's reply arrives on the uplink, addressed to the node.
        let syn_ack = Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd.sport, SYN | ACK);
        let (verdict, reply) = node.ingress(&syn_ack);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));
        assert_eq!((reply.dst, reply.dport), (IpAddr::from(CLIENT4), 44000));

        // A second client flow with the same source port gets its own SNAT port
        // only if the first one is taken for this backend; either way replies
        // map back to the right client.
        let other_client = v4(198, 51, 100, 8);
        let (_, fwd2) = node.ingress(&Pkt::tcp(other_client, 44000, fe.ip, NODE_PORT, SYN));
        let (_, reply2) = node.ingress(&Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd2.sport, ACK));
        assert_eq!((reply2.dst, reply2.dport), (other_client, 44000));
    });
}

#[test]
fn a_completed_close_deletes_the_flow_and_a_reset_does_not() {
    isolated(|| {
        // A remote backend: the flow is SNATed, so both entries carry ports
        // the datapath chose and deleting them must find both.
        let mut node = Node::new();
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        let client =
            |sport: u16, flags: u8| Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, flags);

        let (_, fwd) = node.ingress(&client(45000, SYN));
        let backend = |flags: u8| Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd.sport, flags);
        node.ingress(&backend(SYN | ACK));
        node.ingress(&client(45000, ACK));
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        // The client closes, the backend's FIN rides on its ACK; the
        // client's last ACK is still translated, then the flow is gone.
        node.ingress(&client(45000, FIN | ACK));
        let (_, reply) = node.ingress(&backend(FIN | ACK));
        assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        let (verdict, last) = node.ingress(&client(45000, ACK));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            (last.dst, last.dport, last.sport),
            (backend4(1), 8080, fwd.sport)
        );
        assert!(node.tc.conntrack_entries().unwrap().is_empty());

        // A RST (which anyone on the path can forge) only starts the
        // closing timeout.
        node.ingress(&client(45001, SYN));
        node.ingress(&client(45001, RST));
        let entries = node.tc.conntrack_entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|(_, v)| v.state == CT_STATE_CLOSING));
    });
}

#[test]
fn external_traffic_policy_local_preserves_the_client() {
    let mut node = Node::new();
    // Under Local the agent only puts local backends in the table; even one
    // not flagged local is not SNATed.
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
    let fe = Frontend {
        flags: SERVICE_FLAG_EXTERNAL_LOCAL,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    node.set_frontend(&fe, 1, &[1]);
    let (verdict, fwd) = node.ingress(&Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, SYN));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((fwd.src, fwd.sport), (IpAddr::from(CLIENT4), 45000));

    // No local backend: dropped, not rejected.
    let empty = Frontend {
        port: NODE_PORT + 1,
        flags: SERVICE_FLAG_EXTERNAL_LOCAL | SERVICE_FLAG_NO_LOCAL_BACKENDS,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    node.set_frontend(&empty, 2, &[]);
    let syn = Pkt::tcp(CLIENT4.into(), 45001, empty.ip, NODE_PORT + 1, SYN);
    let (verdict, _) = node.run(TcHook::Ingress, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropNoLocalEndpoints), 1);
}

#[test]
fn udp_nodeport_is_translated_both_ways() {
    let mut node = Node::new();
    for i in 1..=2 {
        node.add_backend(u32::from(i), backend4(i), 5353, PROTO_UDP, true);
    }
    let fe = nodeport(NODE4.into(), PROTO_UDP);
    node.set_frontend(&fe, 1, &[1, 2]);
    let query = Pkt::udp(CLIENT4.into(), 50000, fe.ip, NODE_PORT, b"hello");
    let (verdict, fwd) = node.ingress(&query);
    assert_eq!(verdict, TC_ACT_OK);
    assert!(fwd.dst == backend4(1) || fwd.dst == backend4(2));
    assert_eq!((fwd.dport, fwd.proto), (5353, PROTO_UDP));
    assert_ne!(fwd.l4_csum, 0);
    let answer = Pkt::udp(fwd.dst, 5353, CLIENT4.into(), 50000, b"world");
    let (verdict, reply) = node.egress(&answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));

    // A datagram without checksum keeps none.
    let mut frame = Pkt::udp(CLIENT4.into(), 50001, fe.ip, NODE_PORT, b"x").frame();
    frame[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out) = node.tc.test_run(TcHook::Ingress, &frame).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(parse(&out).l4_csum, 0);
}

#[test]
fn ipv6_nodeport_is_translated_both_ways() {
    isolated(|| {
        let mut node = Node::new();
        for i in 1..=3 {
            node.add_backend(u32::from(i), backend6(i), 8080, PROTO_TCP, true);
        }
        node.add_backend(4, backend6(4), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE6.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1, 2, 3]);
        let syn = Pkt::tcp(CLIENT6.into(), 46000, fe.ip, NODE_PORT, SYN);
        let (verdict, fwd) = node.ingress(&syn);
        assert_eq!(verdict, TC_ACT_OK);
        assert!((1..=3).any(|i| fwd.dst == backend6(i)), "{fwd:?}");
        assert_eq!((fwd.src, fwd.dport), (IpAddr::from(CLIENT6), 8080));
        let syn_ack = Pkt::tcp(fwd.dst, 8080, CLIENT6.into(), 46000, SYN | ACK);
        let (_, reply) = node.egress(&syn_ack);
        assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));

        // A remote IPv6 backend is SNATed to the node's IPv6 address.
        let remote = Frontend {
            port: NODE_PORT + 1,
            ..nodeport(NODE6.into(), PROTO_TCP)
        };
        node.set_frontend(&remote, 2, &[4]);
        let syn = Pkt::tcp(CLIENT6.into(), 46001, remote.ip, NODE_PORT + 1, SYN);
        let (_, fwd) = node.ingress(&syn);
        assert_eq!((fwd.src, fwd.dst), (IpAddr::from(NODE6), backend6(4)));
        let (_, reply) = node.ingress(&Pkt::tcp(backend6(4), 8080, NODE6.into(), fwd.sport, ACK));
        assert_eq!((reply.src, reply.dst), (remote.ip, IpAddr::from(CLIENT6)));
        assert_eq!((reply.sport, reply.dport), (NODE_PORT + 1, 46001));
    });
}

#[test]
fn no_endpoints_rejects_tcp_with_a_reset() {
    let mut node = Node::new();
    let fe4 = nodeport(NODE4.into(), PROTO_TCP);
    let fe6 = nodeport(NODE6.into(), PROTO_TCP);
    node.set_frontend(&fe4, 1, &[]);
    node.set_frontend(&fe6, 1, &[]);
    for (client, fe) in [(IpAddr::from(CLIENT4), &fe4), (IpAddr::from(CLIENT6), &fe6)] {
        let syn = Pkt::tcp(client, 47000, fe.ip, NODE_PORT, SYN);
        let (verdict, out) = node.run(TcHook::Ingress, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{client}");
        // MAC addresses swapped.
        assert_eq!(out[..6], syn.frame()[6..12]);
        let rst = parse(&out);
        assert_eq!((rst.src, rst.sport), (fe.ip, NODE_PORT));
        assert_eq!((rst.dst, rst.dport), (client, 47000));
        assert_eq!(rst.flags, RST | ACK);
        assert_eq!((rst.seq, rst.ack), (0, syn.seq + 1));
    }
    assert_eq!(node.stat(Outcome::Reject), 2);
    // Refusals are reported like drops, as what they were counted in.
    let reasons: Vec<(u32, u32)> = node
        .tc
        .drain_drops()
        .iter()
        .map(|d| (d.reason, d.service_id))
        .collect();
    assert_eq!(reasons, [(Outcome::Reject.index(), fe4.service_id); 2]);
    // A segment with ACK gets a RST with its acknowledgment as sequence.
    let ack = Pkt::tcp(CLIENT4.into(), 47001, fe4.ip, NODE_PORT, ACK);
    let (verdict, out) = node.run(TcHook::Ingress, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse(&out).flags, RST);
    // Never a RST for a RST.
    let rst = Pkt::tcp(CLIENT4.into(), 47002, fe4.ip, NODE_PORT, RST);
    assert_eq!(node.run(TcHook::Ingress, &rst).0, TC_ACT_SHOT);
}

/// A LoadBalancer frontend (service 12) that admits listed sources only.
fn source_ranged_lb4() -> Frontend {
    Frontend {
        ip: v4(203, 0, 113, 50),
        port: 443,
        proto: PROTO_TCP,
        service_id: 12,
        flags: SERVICE_FLAG_SOURCE_RANGES,
        affinity_timeout_s: 0,
    }
}

#[test]
fn source_ranges_allow_listed_clients_only() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    node.add_backend(2, backend6(1), 8080, PROTO_TCP, true);
    let lb4 = source_ranged_lb4();
    let lb6 = Frontend {
        ip: "2001:db8:ffff::50".parse().unwrap(),
        ..lb4
    };
    node.set_frontend(&lb4, 1, &[1]);
    node.set_frontend(&lb6, 2, &[2]);
    node.maps
        .allow_source_range(12, v4(198, 51, 100, 0), 24)
        .unwrap();
    node.maps
        .allow_source_range(12, "2001:db8:c::".parse().unwrap(), 48)
        .unwrap();
    // Another service's range does not apply.
    node.maps
        .allow_source_range(13, v4(203, 0, 113, 0), 24)
        .unwrap();

    let allowed = Pkt::tcp(CLIENT4.into(), 48000, lb4.ip, 443, SYN);
    let (verdict, out) = node.ingress(&allowed);
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend4(1)));
    let allowed6 = Pkt::tcp(CLIENT6.into(), 48000, lb6.ip, 443, SYN);
    let (verdict, out) = node.ingress(&allowed6);
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend6(1)));

    let denied = Pkt::tcp(v4(203, 0, 113, 9), 48001, lb4.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &denied).0, TC_ACT_SHOT);
    let denied6 = Pkt::tcp("2001:db8:d::1".parse().unwrap(), 48001, lb6.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &denied6).0, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropSourceRange), 2);
    // Each drop is reported with its tuple, frontend and reason; the
    // admitted flows are not.
    let drops = node.tc.drain_drops();
    let reported: Vec<(IpAddr, u16, IpAddr, u16, u32, u32)> = drops
        .iter()
        .map(|d| {
            (
                ip_from_addr(&d.tuple.saddr),
                u16::from_be(d.tuple.sport),
                ip_from_addr(&d.tuple.daddr),
                u16::from_be(d.tuple.dport),
                d.reason,
                d.service_id,
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            (
                denied.src,
                48001,
                lb4.ip,
                443,
                Outcome::DropSourceRange.index(),
                12
            ),
            (
                denied6.src,
                48001,
                lb6.ip,
                443,
                Outcome::DropSourceRange.index(),
                12
            ),
        ]
    );
    assert!(drops
        .iter()
        .all(|d| d.tuple.proto == PROTO_TCP && d.time_ns > 0));
    assert!(node.tc.drain_drops().is_empty(), "drained once");

    node.maps
        .remove_source_range(12, v4(198, 51, 100, 0), 24)
        .unwrap();
    let new_flow = Pkt::tcp(CLIENT4.into(), 48002, lb4.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &new_flow).0, TC_ACT_SHOT);
    assert_eq!(node.tc.drain_drops().len(), 1);
    assert_eq!(node.tc.drops_lost().unwrap(), 0);
}

/// A flood of dropped packets sends a bounded number of reports per CPU and
/// second; the rest are counted, not queued.
#[test]
fn drop_reports_are_bounded_per_cpu_and_second() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    let lb = source_ranged_lb4();
    node.set_frontend(&lb, 1, &[1]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let flood = REPORTS_PER_SECOND * cpus + 50;
    for port in 0..flood {
        let syn = Pkt::tcp(CLIENT4.into(), 10_000 + port as u16, lb.ip, 443, SYN);
        assert_eq!(node.run(TcHook::Ingress, &syn).0, TC_ACT_SHOT);
    }
    assert_eq!(node.stat(Outcome::DropSourceRange), flood);
    let reported = node.tc.drain_drops().len() as u64;
    let lost = node.tc.drops_lost().unwrap();
    assert!(reported <= REPORTS_PER_SECOND * cpus, "{reported} reports");
    assert!(reported >= REPORTS_PER_SECOND, "{reported} reports");
    assert_eq!(reported + lost, flood);
}

#[test]
fn traffic_to_other_destinations_passes_untouched() {
    let (mut node, fe) = node_with_local_backends();
    for pkt in [
        Pkt::tcp(CLIENT4.into(), 49000, fe.ip, 22, SYN),
        Pkt::tcp(CLIENT4.into(), 49000, v4(192, 0, 2, 99), NODE_PORT, SYN),
        Pkt::udp(CLIENT4.into(), 49000, fe.ip, NODE_PORT, b"not tcp"),
    ] {
        let frame = pkt.frame();
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, &frame).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, frame);
    }
    assert!(node.tc.conntrack_entries().unwrap().is_empty());
}

#[test]
fn conntrack_gc_deletes_expired_entries() {
    let (mut node, fe) = node_with_local_backends();
    for sport in 0..5u16 {
        node.ingress(&Pkt::tcp(
            CLIENT4.into(),
            50000 + sport,
            fe.ip,
            NODE_PORT,
            SYN,
        ));
    }
    // One flow completes its handshake: established, long timeout.
    node.ingress(&Pkt::tcp(CLIENT4.into(), 50000, fe.ip, NODE_PORT, ACK));
    let now = boottime_ns().unwrap();
    let report = node.tc.conntrack_gc(now).unwrap();
    assert_eq!(
        (report.live, report.deleted, report.capacity),
        (10, 0, 4096)
    );
    // 61 s later the half-open flows (SYN timeout 60 s) are gone.
    let report = node.tc.conntrack_gc(now + 61_000_000_000).unwrap();
    assert_eq!((report.live, report.deleted), (2, 8));
    assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
}

#[test]
fn full_conntrack_evicts_instead_of_failing() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 64,
    });
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1]);
    for sport in 0..200u16 {
        let (verdict, out) = node.ingress(&Pkt::tcp(
            CLIENT4.into(),
            1000 + sport,
            fe.ip,
            NODE_PORT,
            SYN,
        ));
        assert_eq!((verdict, out.dst), (TC_ACT_OK, backend4(1)));
    }
    let report = node.tc.conntrack_gc(boottime_ns().unwrap()).unwrap();
    assert!(report.live <= 64, "{report:?}");
    assert_eq!(report.capacity, 64);
}

#[test]
fn reloading_reuses_pinned_maps_and_adopts_state() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 51000, fe.ip, NODE_PORT, SYN);
    let (_, first) = node.ingress(&syn);
    // A second load (an agent upgrade) sees the same frontends and flows.
    let mut again = TcPrograms::load(&node.dir, &TcOptions::default())
        .unwrap()
        .0;
    let (_, out) = again.test_run(TcHook::Ingress, &syn.frame()).unwrap();
    assert_eq!(parse(&out).dst, first.dst);
    assert_eq!(again.conntrack_entries().unwrap().len(), 2);
    assert_eq!(ip_from_addr(&addr_from_ip(first.dst)), first.dst);
}

/// The `bpf` system call with `attr`, a `union bpf_attr` for `command`.
fn bpf_syscall<T>(command: libc::c_long, attr: &[T]) -> libc::c_long {
    // SAFETY: the attribute buffer is at least as large as the kernel reads
    // for the commands used here, and it and what it points to outlive the
    // call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// Creates an LRU hash map pinned at `path`, as an older agent's object
/// would have: aya creates maps only from objects.
fn create_pinned_lru(path: &std::path::Path, key_size: u32, value_size: u32, max_entries: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    // For BPF_MAP_CREATE: type, key and value sizes, capacity, the rest zero.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_LRU_HASH, key_size, value_size, max_entries]);
    let fd = bpf_syscall(BPF_MAP_CREATE, &create);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // For BPF_OBJ_PIN: the path pointer, then the map's descriptor.
    let pin = [c_path.as_ptr() as u64, fd as u64, 0, 0];
    let ret = bpf_syscall(BPF_OBJ_PIN, &pin);
    assert_eq!(ret, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor this function owns; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// A conntrack value in the older layout.
fn older(value: &CtValue) -> CtValueV1 {
    CtValueV1 {
        new_saddr: value.new_saddr,
        new_daddr: value.new_daddr,
        new_sport: value.new_sport,
        new_dport: value.new_dport,
        flags: value.flags,
        state: value.state,
        fins: value.fins,
        pad: 0,
        service_id: value.service_id,
        backend_id: value.backend_id,
        last_seen_ns: value.last_seen_ns,
    }
}

/// An upgrade from an agent whose conntrack had the older layout keeps its
/// flows: a SNATed flow's reply is still restored to its client, and a flow
/// the older programs begin after the new agent loaded is carried over
/// once the new programs are attached.
#[test]
fn an_older_agents_conntrack_is_carried_over() {
    isolated(|| {
        let dir = fresh_dir();
        fs::create_dir_all(&dir).unwrap();
        create_pinned_lru(&dir.join(maps::CONNTRACK_V1), 40, 56, 1024);
        let mut older_map: HashMap<MapData, CtKey, CtValueV1> =
            pinned_hash(&dir, maps::CONNTRACK_V1);
        let now = boottime_ns().unwrap();
        // A flow of the older agent: client -> NodePort, SNATed to a remote
        // backend from port 61234.
        let flow = |sport: u16, snat_port: u16| {
            let key = CtKey::new(
                addr_from_ip(CLIENT4.into()),
                addr_from_ip(NODE4.into()),
                sport.to_be(),
                NODE_PORT.to_be(),
                PROTO_TCP,
            );
            let forward = CtValue {
                new_saddr: addr_from_ip(NODE4.into()),
                new_daddr: addr_from_ip(backend4(1)),
                new_sport: snat_port.to_be(),
                new_dport: 8080u16.to_be(),
                flags: CT_FLAG_REWRITE_SRC | CT_FLAG_REWRITE_DST,
                state: CT_STATE_ESTABLISHED,
                fins: 0,
                hop: NEXT_HOP_NONE,
                service_id: 7,
                backend_id: 1,
                last_seen_ns: now,
                hop_ifindex: 0,
                hop_macs: [0; 12],
            };
            let reply_key = forward.apply(&key).reversed();
            [(key, forward), (reply_key, forward.partner(&key, now))]
        };
        for (key, value) in flow(45000, 61234) {
            older_map.insert(key, older(&value), 0).unwrap();
        }

        let mut node = Node::load_in(dir, &TcOptions::default());
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        let reply = Pkt::tcp(backend4(1), 8080, NODE4.into(), 61234, ACK);
        let (verdict, restored) = node.ingress(&reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((restored.src, restored.sport), (fe.ip, NODE_PORT));
        assert_eq!(
            (restored.dst, restored.dport),
            (IpAddr::from(CLIENT4), 45000)
        );
        assert_eq!(node.stat(Outcome::NewFlow), 0);

        // The older programs start a flow before the new ones replace them.
        for (key, value) in flow(45001, 61235) {
            older_map.insert(key, older(&value), 0).unwrap();
        }
        assert_eq!(node.tc.finish_conntrack_carry_over().unwrap(), 2);
        assert!(!node.dir.join(maps::CONNTRACK_V1).exists());
        let reply = Pkt::tcp(backend4(1), 8080, NODE4.into(), 61235, ACK);
        let (_, restored) = node.ingress(&reply);
        assert_eq!(
            (restored.dst, restored.dport),
            (IpAddr::from(CLIENT4), 45001)
        );
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 4);
        // Once done, nothing more to carry.
        assert_eq!(node.tc.finish_conntrack_carry_over().unwrap(), 0);
    });
}

/// Runs `test` in a thread with a network namespace of its own:
/// `BPF_PROG_TEST_RUN` runs packets in the caller's namespace, whose routes
/// decide FIB lookups. A fresh one has no routes, so lookups fail and
/// packets go to the stack (`TC_ACT_OK`) whatever the host's routes are.
fn isolated(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        test();
    })
    .join()
    .unwrap();
}

/// Runs `ip` with `args` in the calling thread's network namespace.
fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args}");
}

#[test]
fn fib_lookup_redirects_to_the_next_hop() {
    // BPF_PROG_TEST_RUN runs the packet in the caller's network namespace:
    // give this thread its own, with a route and a neighbour for the backend.
    isolated(|| {
        ip("link set lo up");
        ip("link add lbfib0 type veth peer name lbfib1");
        ip("link set lbfib0 address 02:00:00:00:00:01");
        ip("addr add 10.244.1.254/24 dev lbfib0");
        ip("link set lbfib0 up");
        ip("link set lbfib1 up");
        ip("neigh replace 10.244.1.1 lladdr 02:00:00:00:00:aa dev lbfib0 nud permanent");
        fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").unwrap();

        let (mut node, fe) = node_with_local_backends();
        node.tc
            .set_config(&TcConfig {
                maglev_seed: SEED,
                snat_v4: addr_from_ip(NODE4.into()),
                snat_v6: addr_from_ip(NODE6.into()),
                flags: TC_CONFIG_FIB_REDIRECT,
                pad: 0,
            })
            .unwrap();
        // Only backend 1 has a neighbour: find flows Maglev sends there and
        // elsewhere.
        let table = node.table(&[1, 2, 3]);
        let backend_of = |sport: u16| maglev_pick(&table, CLIENT4.into(), sport);
        let sport = (52000..53000u16).find(|&p| backend_of(p) == 1).unwrap();
        let other_sport = (52000..53000u16).find(|&p| backend_of(p) != 1).unwrap();
        let syn = Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, SYN);
        let (verdict, out) = node.run(TcHook::Ingress, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], [2, 0, 0, 0, 0, 0xaa, 2, 0, 0, 0, 0, 1]);
        assert_eq!(parse(&out).dst, backend4(1));
        // Without a neighbour entry yet, bpf_redirect_neigh resolves it
        // (the MAC addresses are filled in on transmit).
        let other = Pkt::tcp(CLIENT4.into(), other_sport, fe.ip, NODE_PORT, SYN);
        let (verdict, out) = node.run(TcHook::Ingress, &other);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], other.frame()[..12]);
        assert_eq!(node.stat(Outcome::FibRedirect), 2);

        // The first flow's entry remembers the answer (a flow whose
        // neighbour was unresolved remembers nothing), so its next packets
        // skip the FIB: a changed neighbour reaches the flow only once its
        // entry is refreshed, at most a second of packets later.
        let hops = |node: &Node| -> Vec<(u8, u32, [u8; 12])> {
            let mut hops: Vec<_> = node
                .tc
                .conntrack_entries()
                .unwrap()
                .into_iter()
                .filter(|(_, v)| v.hop != NEXT_HOP_NONE)
                .map(|(_, v)| (v.hop, v.hop_ifindex, v.hop_macs))
                .collect();
            hops.sort();
            hops
        };
        let lbfib0 = nix::net::if_::if_nametoindex("lbfib0").unwrap();
        let old_macs = [2, 0, 0, 0, 0, 0xaa, 2, 0, 0, 0, 0, 1];
        assert_eq!(hops(&node), [(NEXT_HOP_REDIRECT, lbfib0, old_macs)]);
        ip("neigh replace 10.244.1.1 lladdr 02:00:00:00:00:bb dev lbfib0 nud permanent");
        let ack = Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, ACK);
        let (verdict, out) = node.run(TcHook::Ingress, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], old_macs);
        // Due for a refresh: the packet asks the FIB again.
        let mut conntrack: HashMap<MapData, CtKey, CtValue> =
            pinned_hash(&node.dir, maps::CONNTRACK);
        let key = CtKey::new(
            addr_from_ip(CLIENT4.into()),
            addr_from_ip(fe.ip),
            sport.to_be(),
            NODE_PORT.to_be(),
            PROTO_TCP,
        );
        let mut value = conntrack.get(&key, 0).unwrap();
        value.last_seen_ns -= 2_000_000_000;
        conntrack.insert(key, value, 0).unwrap();
        let (verdict, out) = node.run(TcHook::Ingress, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let new_macs = [2, 0, 0, 0, 0, 0xbb, 2, 0, 0, 0, 0, 1];
        assert_eq!(out[..12], new_macs);
        assert_eq!(hops(&node), [(NEXT_HOP_REDIRECT, lbfib0, new_macs)]);
        assert_eq!(node.stat(Outcome::FibRedirect), 4);
    });
}

#[test]
fn attach_pins_links_and_a_new_agent_adopts_them() {
    use aya::programs::{SchedClassifier, TcAttachType};
    isolated(|| {
        ip("link add lbatt0 type veth peer name lbatt1");
        let attached = |kind| SchedClassifier::query_tcx("lbatt0", kind).unwrap().1.len();
        let mut node = Node::new();
        node.tc.attach("lbatt0", &TcHook::ALL).unwrap();
        assert!(node.dir.join("links/tc_lbatt0_lb_ingress").exists());
        assert!(node.dir.join("links/tc_lbatt0_lb_egress").exists());
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 1);
        // Unpinning releases a link when bpffs frees the inode, after an RCU
        // grace period: wait for it, boundedly.
        let settle = |ingress: usize, egress: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while (
                attached(TcAttachType::Ingress),
                attached(TcAttachType::Egress),
            ) != (ingress, egress)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        // A restarted agent updates the pinned links in place.
        let mut again = TcPrograms::load(&node.dir, &TcOptions::default())
            .unwrap()
            .0;
        again.attach("lbatt0", &TcHook::ALL).unwrap();
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 1);
        // One that only wants ingress (pod interfaces behind translated
        // uplinks) drops the egress link.
        again.attach("lbatt0", &[TcHook::Ingress]).unwrap();
        drop(again);
        assert!(!node.dir.join("links/tc_lbatt0_lb_egress").exists());
        settle(1, 0);
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 0);
        node.tc.detach("lbatt0").unwrap();
        settle(0, 0);
        assert_eq!(attached(TcAttachType::Ingress), 0);
        assert_eq!(attached(TcAttachType::Egress), 0);
    });
}

// ---------------------------------------------------------------------------
// ICMP port unreachable

/// An ICMP or ICMPv6 error read back from a frame.
#[derive(Debug)]
struct IcmpError {
    src: IpAddr,
    dst: IpAddr,
    /// TTL or hop limit.
    ttl: u8,
    kind: u8,
    code: u8,
    /// The header's second word: unused (0), or an MTU.
    rest: u32,
    /// What follows the 8-byte ICMP header: the offending packet's start.
    quote: Vec<u8>,
}

/// Parses a frame holding an ICMP or ICMPv6 error. Checks, from the bytes
/// alone: the frame ends where the IP packet does, the IPv4 header checksum
/// and the ICMP checksum (ICMPv6: over the pseudo-header too).
fn parse_icmp(frame: &[u8]) -> IcmpError {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, ttl, icmp) = match ethertype {
        0x0800 => {
            let ip = &frame[14..34];
            assert_eq!((ip[0], ip[9]), (0x45, 1), "IPv4 without options, ICMP");
            assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            assert_eq!(frame.len(), 14 + total, "frame length");
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            let icmp = &frame[34..];
            assert_eq!(fold(sum16(icmp)), 0, "bad ICMP checksum");
            (src, dst, ip[8], icmp)
        }
        0x86dd => {
            let ip = &frame[14..54];
            assert_eq!((ip[0] >> 4, ip[6]), (6, 58), "IPv6, ICMPv6");
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            assert_eq!(frame.len(), 54 + len, "frame length");
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let icmp = &frame[54..];
            assert_eq!(
                fold(pseudo_sum(src, dst, 58, icmp.len()) + sum16(icmp)),
                0,
                "bad ICMPv6 checksum"
            );
            (src, dst, ip[7], icmp)
        }
        other => panic!("unexpected ethertype {other:#x}"),
    };
    IcmpError {
        src,
        dst,
        ttl,
        kind: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
        quote: icmp[8..].to_vec(),
    }
}

/// `frame` sent back the way it came: MAC and IP addresses swapped. The
/// checksums stay valid: a ones' complement sum ignores the words' order.
fn reflected(frame: &[u8]) -> Vec<u8> {
    let mut back = frame.to_vec();
    back[..6].copy_from_slice(&frame[6..12]);
    back[6..12].copy_from_slice(&frame[..6]);
    let (saddr, len) = if frame[12..14] == [0x08, 0x00] {
        (26, 4)
    } else {
        (22, 16)
    };
    let daddr = saddr + len;
    back[saddr..daddr].copy_from_slice(&frame[daddr..daddr + len]);
    back[daddr..daddr + len].copy_from_slice(&frame[saddr..daddr]);
    back
}

/// Sends a datagram from `client` to `fe`, a UDP frontend without
/// endpoints, and checks the answer: redirected back out with MAC and IP
/// addresses swapped, ICMP `kind`/`code`, TTL 64, valid checksums, the
/// datagram's IP header and UDP header quoted as they arrived, no more than
/// the IPv6 minimum MTU. The error itself, sent back to the frontend, is
/// not answered.
fn assert_port_unreachable(
    node: &mut Node,
    client: IpAddr,
    fe: &Frontend,
    payload: &[u8],
    (kind, code): (u8, u8),
) {
    let query = Pkt::udp(client, 47100, fe.ip, NODE_PORT, payload);
    let frame = query.frame();
    let (verdict, out) = node.run(TcHook::Ingress, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{client}");
    assert_eq!(out[..6], frame[6..12]);
    assert_eq!(out[6..12], frame[..6]);
    assert_eq!(out[12..14], frame[12..14]);
    let icmp = parse_icmp(&out);
    assert_eq!((icmp.src, icmp.dst), (fe.ip, client));
    assert_eq!((icmp.kind, icmp.code, icmp.ttl), (kind, code, 64));
    assert_eq!(icmp.rest, 0, "unused field");
    let ip_len = if client.is_ipv4() { 20 } else { 40 };
    assert_eq!(icmp.quote, frame[14..14 + ip_len + 8]);
    let udp = &icmp.quote[ip_len..];
    assert_eq!(
        udp[..4],
        [47100u16.to_be_bytes(), NODE_PORT.to_be_bytes()].concat()
    );
    assert!(out.len() - 14 <= 1280, "{} bytes", out.len() - 14);

    let back = reflected(&out);
    let (verdict, passed) = node.tc.test_run(TcHook::Ingress, &back).unwrap();
    assert_eq!((verdict, passed), (TC_ACT_OK, back));
}

#[test]
fn no_endpoints_answers_udp_with_port_unreachable() {
    let mut node = Node::new();
    let fe = nodeport(NODE4.into(), PROTO_UDP);
    node.set_frontend(&fe, 1, &[]);
    assert_port_unreachable(&mut node, CLIENT4.into(), &fe, b"anyone?", (3, 3));
    assert_eq!(node.stat(Outcome::Reject), 1);
    // Sources that are not one host get no answer (RFC 1122 3.2.2).
    for src in [v4(224, 0, 0, 251), v4(255, 255, 255, 255), v4(0, 0, 0, 0)] {
        let query = Pkt::udp(src, 5353, fe.ip, NODE_PORT, b"?");
        assert_eq!(node.run(TcHook::Ingress, &query).0, TC_ACT_SHOT, "{src}");
    }
    assert_eq!(node.stat(Outcome::Reject), 1);
    assert_eq!(node.stat(Outcome::DropNoEndpoints), 3);
}

#[test]
fn ipv6_no_endpoints_answers_udp_with_port_unreachable() {
    let mut node = Node::new();
    let fe = nodeport(NODE6.into(), PROTO_UDP);
    node.set_frontend(&fe, 1, &[]);
    // A datagram as large as the minimum MTU: the error is trimmed.
    let payload = [0xa5; 1280 - 40 - 8];
    assert_port_unreachable(&mut node, CLIENT6.into(), &fe, &payload, (1, 4));
    assert_eq!(node.stat(Outcome::Reject), 1);
    for src in ["ff02::fb", "::"] {
        let query = Pkt::udp(src.parse().unwrap(), 5353, fe.ip, NODE_PORT, b"?");
        assert_eq!(node.run(TcHook::Ingress, &query).0, TC_ACT_SHOT, "{src}");
    }
    assert_eq!(node.stat(Outcome::Reject), 1);
    assert_eq!(node.stat(Outcome::DropNoEndpoints), 2);
}

/// The start of `pkt` as an ICMP error quotes it: its IP header and the
/// first 8 bytes of its transport header.
fn quote_of(pkt: &Pkt<'_>) -> Vec<u8> {
    let ip_len = if pkt.src.is_ipv4() { 20 } else { 40 };
    pkt.frame()[14..14 + ip_len + 8].to_vec()
}

/// An ICMP (ICMPv6) error of `kind`/`code` from `src` to `dst` about
/// `about`, with `rest` as the header's second word and a valid checksum.
fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    (kind, code): (u8, u8),
    rest: u32,
    about: &Pkt<'_>,
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(quote_of(about));
    let (proto, sum) = if src.is_ipv4() {
        (1, sum16(&icmp))
    } else {
        (58, pseudo_sum(src, dst, 58, icmp.len()) + sum16(&icmp))
    };
    let csum = fold(sum);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    ip_frame(src, dst, proto, &icmp)
}

/// Runs an error through `hook` and checks it came out as `expected`
/// (verdict, outer addresses, quote of the packet as the receiver sent it,
/// kind, code and MTU kept, valid checksums).
fn assert_error_translated(
    node: &mut Node,
    hook: TcHook,
    error: &[u8],
    (src, dst): (IpAddr, IpAddr),
    quoted: &Pkt<'_>,
) {
    let before = parse_icmp(error);
    let (verdict, out) = node.tc.test_run(hook, error).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let after = parse_icmp(&out);
    assert_eq!((after.src, after.dst), (src, dst));
    assert_eq!(
        (after.kind, after.code, after.rest),
        (before.kind, before.code, before.rest)
    );
    assert_eq!(after.quote, quote_of(quoted), "quote of {quoted:?}");
}

/// Per family: a client, the node's address, a backend and a router
/// between the node and the client.
fn error_cases() -> [(IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (
            CLIENT4.into(),
            NODE4.into(),
            backend4(1),
            v4(203, 0, 113, 1),
        ),
        (
            CLIENT6.into(),
            NODE6.into(),
            backend6(1),
            "2001:db8:ff::1".parse().unwrap(),
        ),
    ]
}

/// ICMP errors about the packets of a translated flow reach the other side
/// translated (what conntrack's RELATED NAT does under kube-proxy): the
/// backend's port unreachable reaches the client from the NodePort, quoting
/// the datagram as the client sent it (its UDP checksum updated), and a
/// router's "fragmentation needed" / "packet too big" about a reply reaches
/// the backend, quoting the reply as the backend sent it. Errors about
/// other flows pass untouched.
#[test]
fn icmp_errors_about_a_flow_are_translated_for_the_other_side() {
    for (client, node_ip, backend, router) in error_cases() {
        let (unreachable, too_big) = if client.is_ipv4() {
            ((3, 3), ((3, 4), 1400))
        } else {
            ((1, 4), ((2, 0), 1400))
        };
        let mut node = Node::new();
        node.add_backend(1, backend, 5353, PROTO_UDP, true);
        let fe = nodeport(node_ip, PROTO_UDP);
        node.set_frontend(&fe, 1, &[1]);
        let query = Pkt::udp(client, 50000, fe.ip, NODE_PORT, b"hello");
        let (_, fwd) = node.ingress(&query);
        assert_eq!(fwd.dst, backend);

        let delivered = Pkt::udp(client, 50000, backend, 5353, b"hello");
        let closed = icmp_error(backend, client, unreachable, 0, &delivered);
        assert_error_translated(&mut node, TcHook::Egress, &closed, (fe.ip, client), &query);

        let reply = Pkt::udp(fe.ip, NODE_PORT, client, 50000, b"world");
        let (kind, mtu) = too_big;
        let big = icmp_error(router, fe.ip, kind, mtu, &reply);
        let sent = Pkt::udp(backend, 5353, client, 50000, b"world");
        assert_error_translated(&mut node, TcHook::Ingress, &big, (router, backend), &sent);
        assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");

        // About a flow the node never translated: untouched.
        let other = Pkt::udp(fe.ip, NODE_PORT, client, 50001, b"world");
        let unrelated = icmp_error(router, fe.ip, kind, mtu, &other);
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, &unrelated).unwrap();
        assert_eq!((verdict, out), (TC_ACT_OK, unrelated));
        assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");
    }
}

/// The same through SNAT (externalTrafficPolicy Cluster, backend on another
/// node): the remote backend's error, sent to the node's address, reaches
/// the client from the NodePort; a router's error about a reply reaches the
/// backend quoting the reply as it left the backend, to the SNAT port.
#[test]
fn icmp_errors_follow_snated_flows() {
    isolated(|| {
        for (client, node_ip, backend, router) in error_cases() {
            let (unreachable, time_exceeded) = if client.is_ipv4() {
                ((3, 1), (11, 0))
            } else {
                ((1, 3), (3, 0))
            };
            let mut node = Node::new();
            node.add_backend(1, backend, 8080, PROTO_TCP, false);
            let fe = nodeport(node_ip, PROTO_TCP);
            node.set_frontend(&fe, 1, &[1]);
            let syn = Pkt::tcp(client, 44000, fe.ip, NODE_PORT, SYN);
            let (_, fwd) = node.ingress(&syn);
            assert_eq!(fwd.src, node_ip);

            let at_backend = Pkt::tcp(node_ip, fwd.sport, backend, 8080, SYN);
            let error = icmp_error(backend, node_ip, unreachable, 0, &at_backend);
            assert_error_translated(&mut node, TcHook::Ingress, &error, (fe.ip, client), &syn);

            let reply = Pkt::tcp(fe.ip, NODE_PORT, client, 44000, SYN | ACK);
            let error = icmp_error(router, fe.ip, time_exceeded, 0, &reply);
            let sent = Pkt::tcp(backend, 8080, node_ip, fwd.sport, SYN | ACK);
            assert_error_translated(&mut node, TcHook::Ingress, &error, (router, backend), &sent);
            assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");
        }
    });
}

/// The collector walks the whole table in the kernel: with live and expired
/// entries mixed, exactly the expired ones go.
#[test]
fn conntrack_gc_deletes_only_expired_entries_of_a_large_table() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 65_536,
    });
    let mut conntrack: HashMap<MapData, CtKey, CtValue> = pinned_hash(&node.dir, maps::CONNTRACK);
    let now = boottime_ns().unwrap();
    let (live, expired) = (20_000u32, 40_000u32);
    for i in 0..live + expired {
        let key = CtKey {
            saddr: addr_from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
            daddr: addr_from_ip(NODE4.into()),
            sport: 1000u16.to_be(),
            dport: NODE_PORT.to_be(),
            proto: PROTO_UDP,
            pad: [0; 3],
        };
        let value = CtValue {
            new_saddr: key.saddr,
            new_daddr: addr_from_ip(backend4(1)),
            new_sport: key.sport,
            new_dport: 8080u16.to_be(),
            flags: 0,
            state: 0,
            fins: 0,
            hop: NEXT_HOP_NONE,
            service_id: 7,
            backend_id: 1,
            // UDP entries live 60 s after their last packet.
            last_seen_ns: if i < live { now } else { now - 61_000_000_000 },
            hop_ifindex: 0,
            hop_macs: [0; 12],
        };
        conntrack.insert(key, value, 0).unwrap();
    }
    let started = std::time::Instant::now();
    let report = node.tc.conntrack_gc(now).unwrap();
    eprintln!(
        "in-kernel conntrack GC over {} entries: {:?}",
        live + expired,
        started.elapsed()
    );
    assert_eq!(
        (report.live, report.deleted),
        (live as usize, expired as usize)
    );
    assert_eq!(conntrack.keys().count(), live as usize);
}

/// Splits `pkt` into two IPv4 fragments, the first with `split` bytes of
/// the L4 datagram (a multiple of 8).
fn fragments_v4(pkt: &Pkt<'_>, id: u16, split: usize) -> [Vec<u8>; 2] {
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..34], &full[34..]);
    let part = |offset: usize, data: &[u8], more: bool| {
        let mut header = ip.to_vec();
        header[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        header[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 };
        header[6..8].copy_from_slice(&(flags | (offset / 8) as u16).to_be_bytes());
        header[10..12].copy_from_slice(&[0, 0]);
        let csum = fold(sum16(&header));
        header[10..12].copy_from_slice(&csum.to_be_bytes());
        [eth, &header, data].concat()
    };
    [
        part(0, &l4[..split], true),
        part(split, &l4[split..], false),
    ]
}

/// Splits `pkt` into two IPv6 fragments (fragment header), the first with
/// `split` bytes of the L4 datagram (a multiple of 8).
fn fragments_v6(pkt: &Pkt<'_>, id: u32, split: usize) -> [Vec<u8>; 2] {
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..54], &full[54..]);
    let part = |offset: usize, data: &[u8], more: bool| {
        let mut header = ip.to_vec();
        header[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        header[6] = 44;
        let mut fragment = vec![pkt.proto, 0];
        fragment.extend((offset as u16 | u16::from(more)).to_be_bytes());
        fragment.extend(id.to_be_bytes());
        [eth, &header, &fragment, data].concat()
    };
    [
        part(0, &l4[..split], true),
        part(split, &l4[split..], false),
    ]
}

/// Addresses and L4 bytes of a fragment the program left (IPv4 header
/// checksum checked).
fn fragment_parts(frame: &[u8]) -> (IpAddr, IpAddr, Vec<u8>) {
    if frame[12..14] == [0x08, 0x00] {
        let ip = &frame[14..34];
        assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        (src, dst, frame[34..14 + total].to_vec())
    } else {
        let ip = &frame[14..54];
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        (src, dst, frame[62..54 + len].to_vec())
    }
}

/// Runs both fragments of a UDP datagram to a NodePort through ingress and
/// checks that both reach the backend and that the reassembled datagram has
/// the backend's port and a valid checksum.
fn assert_fragments_translated(node: &mut Node, fragments: [Vec<u8>; 2], backend: IpAddr) {
    let mut datagram = Vec::new();
    for (i, fragment) in fragments.iter().enumerate() {
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, fragment).unwrap();
        assert_eq!(verdict, TC_ACT_OK, "fragment {i}");
        let (src, dst, data) = fragment_parts(&out);
        assert_eq!(dst, backend, "fragment {i}");
        let client: IpAddr = if backend.is_ipv4() {
            CLIENT4.into()
        } else {
            CLIENT6.into()
        };
        assert_eq!(src, client, "fragment {i}");
        datagram.extend(data);
    }
    assert_eq!(u16::from_be_bytes([datagram[2], datagram[3]]), 8080);
    let client: IpAddr = if backend.is_ipv4() {
        CLIENT4.into()
    } else {
        CLIENT6.into()
    };
    assert_eq!(
        fold(pseudo_sum(client, backend, PROTO_UDP, datagram.len()) + sum16(&datagram)),
        0,
        "bad checksum of the reassembled datagram"
    );
}

/// A fragmented UDP datagram to a NodePort: the first fragment is
/// translated with its L4 header, the later one (no L4 header) follows it to
/// the same backend; a later fragment whose first was never seen passes
/// untouched.
#[test]
fn fragmented_udp_datagrams_follow_their_first_fragment() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_UDP, true);
    node.add_backend(2, backend6(1), 8080, PROTO_UDP, true);
    let fe4 = nodeport(NODE4.into(), PROTO_UDP);
    let fe6 = Frontend {
        service_id: 8,
        ..nodeport(NODE6.into(), PROTO_UDP)
    };
    node.set_frontend(&fe4, 1, &[1]);
    node.set_frontend(&fe6, 2, &[2]);
    let payload = [7u8; 64];

    let v4 = Pkt::udp(CLIENT4.into(), 43000, fe4.ip, NODE_PORT, &payload);
    assert_fragments_translated(&mut node, fragments_v4(&v4, 0x1234, 32), backend4(1));
    let v6 = Pkt::udp(CLIENT6.into(), 43000, fe6.ip, NODE_PORT, &payload);
    assert_fragments_translated(&mut node, fragments_v6(&v6, 0xabcd, 32), backend6(1));

    let [_, orphan] = fragments_v4(&v4, 0x9999, 32);
    let (verdict, out) = node.tc.test_run(TcHook::Ingress, &orphan).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, orphan);
}

/// IPv6 extension headers before the L4 header (here destination options)
/// are walked: the packet is translated like one without them.
#[test]
fn ipv6_extension_headers_are_walked() {
    let mut node = Node::new();
    node.add_backend(2, backend6(1), 8080, PROTO_UDP, true);
    let fe6 = nodeport(NODE6.into(), PROTO_UDP);
    node.set_frontend(&fe6, 1, &[2]);
    let payload = [9u8; 16];
    let pkt = Pkt::udp(CLIENT6.into(), 44000, fe6.ip, NODE_PORT, &payload);
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..54], &full[54..]);
    let mut header = ip.to_vec();
    header[4..6].copy_from_slice(&((8 + l4.len()) as u16).to_be_bytes());
    header[6] = 60;
    // Destination options: next header UDP, length 0 (8 bytes), PadN.
    let options = [PROTO_UDP, 0, 1, 4, 0, 0, 0, 0];
    let frame = [eth, &header, &options, l4].concat();
    let (verdict, out) = node.tc.test_run(TcHook::Ingress, &frame).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let dst = IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
    assert_eq!(dst, backend6(1));
    let datagram = &out[62..];
    assert_eq!(u16::from_be_bytes([datagram[2], datagram[3]]), 8080);
    assert_eq!(
        fold(pseudo_sum(CLIENT6.into(), backend6(1), PROTO_UDP, datagram.len()) + sum16(datagram)),
        0,
        "bad UDP checksum"
    );
}

/// An entry the LRU evicted under pressure while its partner lived on is put
/// back by the first packet of the flow a second or more later: here the
/// client's retransmitted SYN after the reply entry vanished, so the
/// server's answer is translated again instead of leaving the connection
/// stuck.
#[test]
fn an_evicted_partner_entry_is_restored() {
    let (mut node, fe) = node_with_local_backends();
    let mut conntrack: HashMap<MapData, CtKey, CtValue> = pinned_hash(&node.dir, maps::CONNTRACK);
    let syn = Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, SYN);
    let (_, forward) = node.ingress(&syn);
    let reply_key = conntrack
        .iter()
        .map(Result::unwrap)
        .find(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
        .unwrap()
        .0;
    let reply_value = conntrack.get(&reply_key, 0).unwrap();
    conntrack.remove(&reply_key).unwrap();

    std::thread::sleep(std::time::Duration::from_millis(1050));
    node.ingress(&syn);
    let restored = conntrack.get(&reply_key, 0).unwrap();
    assert_eq!(
        (
            restored.new_saddr,
            restored.new_sport,
            restored.new_daddr,
            restored.new_dport,
            restored.flags,
            restored.backend_id
        ),
        (
            reply_value.new_saddr,
            reply_value.new_sport,
            reply_value.new_daddr,
            reply_value.new_dport,
            reply_value.flags,
            reply_value.backend_id
        )
    );
    let answer = Pkt::tcp(forward.dst, 8080, CLIENT4.into(), 45000, SYN | ACK);
    let (verdict, out) = node.egress(&answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((out.src, out.sport), (fe.ip, NODE_PORT));
}

/// Answers to a frontend without endpoints are rate-limited like the
/// kernel's ICMP errors: a burst, then the rate; the rest is dropped and
/// counted, so a flood is not reflected.
#[test]
fn answers_to_a_flood_are_rate_limited() {
    let mut node = Node::new();
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[]);
    let flood = 200u16;
    let answered = (0..flood)
        .filter(|&i| {
            let syn = Pkt::tcp(CLIENT4.into(), 20000 + i, fe.ip, NODE_PORT, SYN);
            node.run(TcHook::Ingress, &syn).0 == TC_ACT_REDIRECT
        })
        .count() as u64;
    // The burst, plus what the rate refills while the test runs.
    assert!(
        (REJECT_BURST..REJECT_BURST + 40).contains(&answered),
        "{answered} of {flood} answered"
    );
    assert_eq!(node.stat(Outcome::Reject), answered);
    assert_eq!(
        node.stat(Outcome::DropNoEndpoints),
        u64::from(flood) - answered
    );
}
