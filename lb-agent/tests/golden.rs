//! Golden tests: every `examples/*.yaml` compiled for a node and reconciled
//! into in-memory maps, whose contents must equal `tests/golden/<name>.maps`.
//! No kernel, no root. A change in what the agent writes shows up as a diff
//! of these files; `UPDATE_GOLDEN=1 cargo test -p lb-agent --test golden`
//! rewrites them after a deliberate change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use lb_agent::{kernel::fake::FakeServiceMaps, reconcile::Reconciler};
use lb_common::{
    maglev::{MaglevKey, MAGLEV_SIZE_INDEX},
    service::{uses_maglev, Backend, ServiceKey, BACKEND_FLAG_LOCAL, SCOPE_TC_CLUSTER},
};
use lb_core::{
    addr::{ip_from_addr, port_from_be, protocol_name},
    compile::compile,
    intent::NodeContext,
    plan::{name_to_string, Capacity, MaglevSettings},
    yaml::parse_documents,
};

/// The node the examples are compiled for: `node1` of a two-node cluster,
/// serving NodePorts on one IPv4 and one IPv6 address.
fn node() -> NodeContext {
    NodeContext {
        name: Some("node1".into()),
        node_port_addresses: vec![
            "192.168.100.1".parse().unwrap(),
            "fd00:100::1".parse().unwrap(),
        ],
        localhost_node_ports: true,
        per_packet_cluster_ips: false,
        per_packet_udp_cluster_ips: false,
        external_ip_cidrs: Vec::new(),
    }
}

/// Small tables keep the golden files readable; the seed is the default.
const MAGLEV: MaglevSettings = MaglevSettings {
    size: 251,
    seed: lb_core::plan::DEFAULT_MAGLEV_SEED,
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn endpoint(addr: &lb_common::net::Addr, port: u16) -> String {
    std::net::SocketAddr::new(ip_from_addr(addr), port_from_be(port)).to_string()
}

fn scope(key: &ServiceKey) -> &'static str {
    match (uses_maglev(key.scope), key.scope == SCOPE_TC_CLUSTER) {
        (false, _) => "socket",
        (true, false) => "tc-external",
        (true, true) => "tc-cluster",
    }
}

fn backend(backend: &Backend) -> String {
    let local = if backend.flags & BACKEND_FLAG_LOCAL != 0 {
        " local"
    } else {
        ""
    };
    format!(
        "{}/{}{local}",
        endpoint(&backend.addr, backend.port),
        protocol_name(backend.proto)
    )
}

/// FNV-1a of a table's backend ids: equal digests, equal tables.
fn digest(ids: &[u32]) -> u64 {
    ids.iter().fold(0xcbf2_9ce4_8422_2325, |h, id| {
        id.to_le_bytes()
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    })
}

/// The maps' contents as text, in key order.
fn render(maps: &FakeServiceMaps) -> String {
    let m = &maps.maps;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# frontends: key -> service id, generation, backends, flags, affinity"
    );
    for (key, value) in &m.services {
        let _ = writeln!(
            out,
            "{}/{} {} -> id {} gen {} backends {} flags {:#x} affinity {}s",
            endpoint(&key.addr, key.port),
            protocol_name(key.proto),
            scope(key),
            value.service_id,
            value.slot_generation,
            value.backend_count,
            value.flags,
            value.affinity_timeout_s
        );
    }
    let _ = writeln!(out, "# backends: id -> address");
    for (id, b) in &m.backends {
        let _ = writeln!(out, "{id} -> {}", backend(b));
    }
    let _ = writeln!(
        out,
        "# backend slots: generation -> backend ids in slot order"
    );
    let mut slots: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (key, id) in &m.slots {
        slots.entry(key.generation).or_default().push(*id);
    }
    for (generation, ids) in &slots {
        let _ = writeln!(out, "{generation} -> {ids:?}");
    }
    let _ = writeln!(
        out,
        "# Maglev tables: generation -> size, slots per backend id, digest"
    );
    for generation in m.table_generations() {
        let table = m.table(generation);
        let mut shares: BTreeMap<u32, usize> = BTreeMap::new();
        for id in &table {
            *shares.entry(*id).or_default() += 1;
        }
        let size = m
            .maglev
            .get(&MaglevKey {
                generation,
                index: MAGLEV_SIZE_INDEX,
            })
            .map_or("missing".to_string(), u32::to_string);
        let _ = writeln!(
            out,
            "{generation} -> size {size} shares {shares:?} digest {:016x}",
            digest(&table)
        );
    }
    let _ = writeln!(out, "# source ranges: service id -> prefix");
    for range in &m.source_ranges {
        let _ = writeln!(out, "{} -> {}/{}", range.service_id, range.addr, range.len);
    }
    let _ = writeln!(out, "# reverse NAT and names: service id -> frontend, name");
    let names: BTreeMap<u32, String> = m
        .names
        .iter()
        .map(|(id, name)| (*id, name_to_string(name)))
        .collect();
    for (id, rev) in &m.rev_nat {
        let _ = writeln!(
            out,
            "{id} -> {} {}",
            endpoint(&rev.addr, rev.port),
            names.get(id).map_or("(no name)", String::as_str)
        );
    }
    out
}

/// Compiles and reconciles one example file into fresh in-memory maps.
fn maps_of(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let parsed = parse_documents(&path.display().to_string(), &text);
    assert!(
        parsed.errors.is_empty(),
        "{}: {:?}",
        path.display(),
        parsed.errors
    );
    let compiled = compile(&parsed.objects, &node());
    assert!(
        compiled.errors.is_empty(),
        "{}: {:?}",
        path.display(),
        compiled.errors
    );
    let mut maps = FakeServiceMaps::default();
    let mut reconciler = Reconciler::adopt(&maps, Capacity::default(), MAGLEV).unwrap();
    let pass = reconciler.reconcile(&mut maps, &compiled.desired, &BTreeSet::new());
    assert!(
        pass.errors.is_empty(),
        "{}: {:?}",
        path.display(),
        pass.errors
    );
    render(&maps)
}

#[test]
fn examples_program_the_golden_map_contents() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut files: Vec<PathBuf> = fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/*.yaml");
    let mut mismatched = Vec::new();
    for path in &files {
        let stem = path.file_stem().unwrap().to_string_lossy();
        let golden = golden_dir().join(format!("{stem}.maps"));
        let actual = maps_of(path);
        if update {
            fs::write(&golden, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
        if expected != actual {
            mismatched.push(format!(
                "{} differs from {}:\n--- expected\n{expected}--- actual\n{actual}",
                path.display(),
                golden.display()
            ));
        }
    }
    assert!(mismatched.is_empty(), "{}", mismatched.join("\n"));
    // Every golden file belongs to an example.
    for entry in fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let stem = name.trim_end_matches(".maps");
        assert!(
            examples().join(format!("{stem}.yaml")).exists(),
            "tests/golden/{name} has no example"
        );
    }
}

#[test]
fn a_second_agent_reading_the_same_examples_writes_the_same_maps() {
    for entry in fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            assert_eq!(maps_of(&path), maps_of(&path), "{}", path.display());
        }
    }
}
