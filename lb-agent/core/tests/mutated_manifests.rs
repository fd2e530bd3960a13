//! A bounded fuzzer of the YAML parser, admission and the Service compiler,
//! run by `make test`: the examples' manifests mutated (lines deleted,
//! duplicated or cut, values replaced by hostile ones, bytes inserted) and
//! fed through the whole pure pipeline. Nothing may panic, and every error
//! names its file, object and field.

use std::{net::IpAddr, sync::Arc};

use lb_core::{
    admission::{admit, AdmissionRules},
    compile::{compile, Compiler},
    intent::{NodeContext, ObjectError},
    yaml::parse_documents,
};
use proptest::{prelude::*, sample::Index};

const EXAMPLES: [&str; 3] = [
    include_str!("../../../examples/web.yaml"),
    include_str!("../../../examples/dns.yaml"),
    include_str!("../../../examples/edge.yaml"),
];

/// Values a hostile or careless author writes where another was expected.
const HOSTILE: [&str; 22] = [
    "-1",
    "0",
    "65536",
    "4294967296",
    "99999999999999999999",
    "\"\"",
    "null",
    "[]",
    "{}",
    "[[[[]]]]",
    "abc",
    "10.0.0.300",
    "0.0.0.0",
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "169.254.0.1",
    "224.0.0.1",
    "fe80::1",
    "1e309",
    "\"\\u0000\"",
    "&a [*a]",
];

/// One edit of a manifest's lines.
#[derive(Clone, Debug)]
enum Mutation {
    Delete(Index),
    Duplicate(Index),
    /// Replaces the value after the line's first `: ` (or the line).
    Replace(Index, Index),
    Truncate(Index),
    Insert(Index, Vec<u8>),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), any::<Index>()).prop_map(|(l, v)| Mutation::Replace(l, v)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
    ]
}

fn mutate(text: &str, mutation: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if lines.is_empty() {
        return String::new();
    }
    match mutation {
        Mutation::Delete(at) => {
            lines.remove(at.index(lines.len()));
        }
        Mutation::Duplicate(at) => {
            let i = at.index(lines.len());
            lines.insert(i, lines[i].clone());
        }
        Mutation::Replace(at, value) => {
            let i = at.index(lines.len());
            let hostile = HOSTILE[value.index(HOSTILE.len())];
            lines[i] = match lines[i].split_once(": ") {
                Some((key, _)) => format!("{key}: {hostile}"),
                None => hostile.to_owned(),
            };
        }
        Mutation::Truncate(at) => {
            let joined = lines.join("\n");
            let mut end = at.index(joined.len() + 1);
            while !joined.is_char_boundary(end) {
                end -= 1;
            }
            return joined[..end].to_owned();
        }
        Mutation::Insert(at, bytes) => {
            let i = at.index(lines.len());
            lines[i].push_str(&String::from_utf8_lossy(bytes));
        }
    }
    lines.join("\n")
}

fn node() -> NodeContext {
    NodeContext {
        name: Some("node-a".into()),
        node_port_addresses: vec![IpAddr::from([192, 168, 1, 10])],
        localhost_node_ports: true,
        per_packet_cluster_ips: true,
        per_packet_udp_cluster_ips: true,
        external_ip_cidrs: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
    }
}

fn well_formed(err: &ObjectError) -> bool {
    !err.origin.is_empty() && !err.object.is_empty() && !err.field.is_empty()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_manifests_never_panic_and_errors_name_object_and_field(
        example in 0..EXAMPLES.len(),
        mutations in prop::collection::vec(arb_mutation(), 1..6),
    ) {
        let text = mutations
            .iter()
            .fold(EXAMPLES[example].to_owned(), |text, m| mutate(&text, m));
        let mut parsed = parse_documents("mutated.yaml", &text);
        let rules = AdmissionRules {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        };
        admit(&mut parsed, &rules);
        prop_assert!(parsed.errors.iter().all(well_formed), "{:?}", parsed.errors);
        let compiled = compile(&parsed.objects, &node());
        prop_assert!(compiled.errors.iter().all(well_formed), "{:?}", compiled.errors);
        // The incremental compiler, fed the original then the mutation,
        // agrees with the fresh compile.
        let original = parse_documents("mutated.yaml", EXAMPLES[example]);
        let mut compiler = Compiler::new(node());
        compiler.update(&original.objects);
        compiler.update(&parsed.objects);
        prop_assert_eq!(compiler.desired(), &compiled.desired);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let parsed = parse_documents("random.yaml", &text);
        prop_assert!(parsed.errors.iter().all(well_formed), "{:?}", parsed.errors);
        let _ = compile(&parsed.objects, &node());
    }
}

/// The same object twice in one snapshot (an `Arc` shared by two entries,
/// as a buggy source could hand over) is reported, not a panic.
#[test]
fn a_repeated_object_is_reported() {
    let parsed = parse_documents("web.yaml", EXAMPLES[0]);
    let mut objects = parsed.objects;
    let first = objects.services[0].clone();
    objects.services.push(first);
    assert!(Arc::strong_count(&objects.services[0].object) >= 2);
    let compiled = compile(&objects, &node());
    assert!(compiled
        .errors
        .iter()
        .any(|e| e.reason.contains("duplicate")));
}
