//! The fixture: one node's tc datapath in its own bpffs pin directory, the
//! frontends and backends the agent would write, and the addresses, verdicts
//! and helpers the feature tests share.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap, Map, MapData};
use lb_agent::kernel::{
    service_maps::TcMaps,
    tc_programs::{TcHook, TcOptions, TcPrograms},
};
use lb_common::{
    config::TcConfig,
    conntrack::{CtKey, CtValue},
    maglev::flow_hash,
    maps,
    net::{PROTO_TCP, TCP_ACK, TCP_SYN},
    outcome::Outcome,
    service::{
        Backend, ServiceKey, ServiceValue, BACKEND_FLAG_LOCAL, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL,
    },
};
use lb_core::{
    addr::addr_from_ip,
    maglev::{build_table, sorted_backends, MaglevBackend},
};

use crate::{
    frames::{parse, Parsed, Pkt},
    require_root,
};

pub(crate) const TC_ACT_OK: i32 = 0;
pub(crate) const TC_ACT_SHOT: i32 = 2;
pub(crate) const TC_ACT_REDIRECT: i32 = 7;

pub(crate) const SEED: u64 = 0x5eed;
pub(crate) const TABLE_SIZE: usize = 251;

pub(crate) const NODE4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub(crate) const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);
pub(crate) const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub(crate) const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
pub(crate) const NODE_PORT: u16 = 30080;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// One node's datapath in its own pin directory, removed on drop.
pub(crate) struct Node {
    pub(crate) tc: TcPrograms,
    pub(crate) maps: TcMaps,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(crate) backends: HashMap<MapData, u32, Backend>,
    pub(crate) dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    dir: &std::path::Path,
    name: &str,
) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// A frontend as the agent would write it.
#[derive(Clone, Copy)]
pub(crate) struct Frontend {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    pub(crate) proto: u8,
    pub(crate) service_id: u32,
    pub(crate) flags: u32,
    pub(crate) affinity_timeout_s: u32,
}

impl Frontend {
    fn key(&self, scope: u8) -> ServiceKey {
        ServiceKey {
            addr: addr_from_ip(self.ip),
            port: self.port.to_be(),
            proto: self.proto,
            scope,
        }
    }
}

/// A pin directory of this test process that does not exist yet. Every
/// test's node gets one here, so this first fails the test unless it runs
/// as root.
pub(crate) fn fresh_dir() -> PathBuf {
    require_root();
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbtc-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    dir
}

impl Node {
    pub(crate) fn new() -> Self {
        Self::with_options(&TcOptions {
            conntrack_capacity: 4096,
            pending_capacity: 4096,
            ..TcOptions::default()
        })
    }

    pub(crate) fn with_options(options: &TcOptions) -> Self {
        Self::load_in(fresh_dir(), options)
    }

    /// Loads the programs with the pins already in `dir`, if any.
    pub(crate) fn load_in(dir: PathBuf, options: &TcOptions) -> Self {
        let (mut tc, maps) = TcPrograms::load(&dir, options).unwrap_or_else(|e| {
            let _ = fs::remove_dir_all(&dir);
            panic!("load the tc programs: {e:?}")
        });
        tc.set_config(&TcConfig {
            maglev_seed: SEED,
            snat_v4: addr_from_ip(NODE4.into()),
            snat_v6: addr_from_ip(NODE6.into()),
            flags: 0,
            policy_mark: 0,
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

    pub(crate) fn add_backend(&mut self, id: u32, ip: IpAddr, port: u16, proto: u8, local: bool) {
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
    pub(crate) fn table(&self, ids: &[u32]) -> Vec<u32> {
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
    /// frontend (a NodePort, ExternalIP or LoadBalancer IP) at it, make
    /// before break.
    pub(crate) fn set_frontend(&mut self, fe: &Frontend, generation: u32, ids: &[u32]) {
        self.set_scoped_frontend(fe, SCOPE_TC_EXTERNAL, generation, ids);
    }

    /// [`Node::set_frontend`] for a ClusterIP translated per packet on pod
    /// interfaces.
    pub(crate) fn set_cluster_frontend(&mut self, fe: &Frontend, generation: u32, ids: &[u32]) {
        self.set_scoped_frontend(fe, SCOPE_TC_CLUSTER, generation, ids);
    }

    fn set_scoped_frontend(&mut self, fe: &Frontend, scope: u8, generation: u32, ids: &[u32]) {
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
        self.services.insert(fe.key(scope), value, 0).unwrap();
    }

    pub(crate) fn run(&mut self, hook: TcHook, pkt: &Pkt<'_>) -> (i32, Vec<u8>) {
        self.tc.test_run(hook, &pkt.frame()).expect("test run")
    }

    pub(crate) fn ingress(&mut self, pkt: &Pkt<'_>) -> (i32, Parsed) {
        let (verdict, out) = self.run(TcHook::Ingress, pkt);
        (verdict, parse(&out))
    }

    pub(crate) fn egress(&mut self, pkt: &Pkt<'_>) -> (i32, Parsed) {
        let (verdict, out) = self.run(TcHook::Egress, pkt);
        (verdict, parse(&out))
    }

    /// Every flow entry, confirmed or not.
    pub(crate) fn flow_entries(&self) -> Vec<(CtKey, CtValue)> {
        let mut all = self.tc.conntrack_entries().unwrap();
        all.extend(
            self.tc
                .pending_entries()
                .unwrap()
                .into_iter()
                .map(|(key, pending)| (key, pending.entry)),
        );
        all
    }

    /// Opens and confirms a flow to a local backend: the client's SYN, the
    /// backend's SYN-ACK leaving through the uplink, the client's ACK.
    /// Returns the SYN as the backend got it.
    pub(crate) fn handshake_local(&mut self, syn: &Pkt<'_>) -> Parsed {
        let (_, forwarded) = self.ingress(syn);
        let answer = Pkt::tcp(
            forwarded.dst,
            forwarded.dport,
            forwarded.src,
            forwarded.sport,
            TCP_SYN | TCP_ACK,
        );
        self.egress(&answer);
        self.ingress(&Pkt::tcp(syn.src, syn.sport, syn.dst, syn.dport, TCP_ACK));
        forwarded
    }

    pub(crate) fn stat(&self, outcome: Outcome) -> u64 {
        let counts = self.tc.stats().unwrap();
        counts
            .iter()
            .find(|(o, _)| *o == outcome)
            .expect("a tc outcome")
            .1
    }
}

pub(crate) fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub(crate) fn backend4(i: u8) -> IpAddr {
    v4(10, 244, 1, i)
}

pub(crate) fn backend6(i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, i))
}

pub(crate) fn nodeport(ip: IpAddr, proto: u8) -> Frontend {
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
pub(crate) fn node_with_local_backends() -> (Node, Frontend) {
    let mut node = Node::new();
    for i in 1..=3 {
        node.add_backend(u32::from(i), backend4(i), 8080, PROTO_TCP, true);
    }
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1, 2, 3]);
    (node, fe)
}

/// The backend Maglev gives a flow from `client`:`sport` to the NodePort.
pub(crate) fn maglev_pick(table: &[u32], client: IpAddr, sport: u16) -> u32 {
    let hash = flow_hash(
        SEED,
        &addr_from_ip(client),
        sport.to_be(),
        NODE_PORT.to_be(),
        PROTO_TCP,
    );
    table[hash as usize % TABLE_SIZE]
}

/// Runs `test` in a thread with a network namespace of its own:
/// `BPF_PROG_TEST_RUN` runs packets in the caller's namespace, whose routes
/// decide FIB lookups. A fresh one has no routes, so lookups fail and
/// packets go to the stack (`TC_ACT_OK`) whatever the host's routes are.
/// Unsharing needs root: this first fails the test unless it runs as root.
pub(crate) fn isolated(test: impl FnOnce() + Send + 'static) {
    require_root();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        test();
    })
    .join()
    .unwrap();
}
