//! Services contesting one frontend or health port: the owner is a function
//! of the live claimants, never of the order updates arrived in.
use std::{net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use lb_common::{
    net::PROTO_TCP,
    service::{ServiceKey, SCOPE_EXTERNAL},
};
use proptest::prelude::*;

use super::*;
use crate::{
    addr::{addr_from_ip, port_to_be},
    yaml::parse_documents,
};

/// A ClusterIP Service `name` on `ip:80`, optionally created at `created`
/// (seconds) and with `external` as its externalIPs.
fn service(name: &str, ip: &str, created: Option<i64>, external: &[&str]) -> Sourced<Service> {
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {ip}\n  externalIPs: [{}]\n  ports: [{{name: http, port: 80}}]\n",
        external.join(", ")
    );
    let mut parsed = parse_documents(&format!("{name}.yaml"), &text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mut sourced = parsed.objects.services.remove(0);
    let mut object = (*sourced.object).clone();
    object.metadata.creation_timestamp =
        created.map(|s| Time(Timestamp::from_second(s).expect("in range")));
    sourced.object = Arc::new(object);
    sourced
}

fn objects(services: &[Sourced<Service>]) -> Objects {
    Objects {
        services: services.to_vec(),
        ..Objects::default()
    }
}

fn node() -> NodeContext {
    NodeContext {
        node_port_addresses: vec!["192.168.1.10".parse().expect("address")],
        external_ip_cidrs: vec!["10.96.0.0/16".parse().expect("cidr")],
        ..NodeContext::default()
    }
}

fn owner(compiler: &Compiler, ip: &str) -> Option<String> {
    let key = ServiceKey {
        addr: addr_from_ip(ip.parse::<IpAddr>().expect("address")),
        port: port_to_be(80),
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    };
    compiler
        .desired()
        .frontends
        .get(&key)
        .map(|f| f.name.clone())
}

#[test]
fn a_service_replaced_by_another_on_the_same_cluster_ip_in_one_update_takes_it() {
    let mut compiler = Compiler::new(node());
    compiler.update(&objects(&[service("old", "10.96.0.10", None, &[])]));
    let update = compiler.update(&objects(&[service("new", "10.96.0.10", None, &[])]));
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/new:http")
    );
}

#[test]
fn a_refused_claimant_takes_over_when_the_owner_goes_and_is_told_why_until_then() {
    let mut compiler = Compiler::new(node());
    let first = service("first", "10.96.0.10", Some(100), &[]);
    let second = service("second", "10.96.0.10", Some(200), &[]);
    let update = compiler.update(&objects(&[second.clone(), first]));
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/first:http")
    );
    assert_eq!(update.errors.len(), 1, "{:?}", update.errors);
    let error = &update.errors[0];
    assert_eq!(error.origin, "second.yaml");
    assert_eq!(error.object, "Service default/second");
    assert!(
        error.reason.contains("10.96.0.10:80/TCP") && error.reason.contains("default/first"),
        "{error:?}"
    );
    let update = compiler.update(&objects(&[second]));
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    assert!(update.changed.contains(&ServiceKey {
        addr: addr_from_ip("10.96.0.10".parse().expect("address")),
        port: port_to_be(80),
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    }));
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/second:http")
    );
}

#[test]
fn a_cluster_ip_outranks_an_older_services_external_ip_on_the_same_address() {
    let mut compiler = Compiler::new(node());
    let squatter = service("squatter", "10.96.0.99", Some(1), &["10.96.0.10"]);
    let update = compiler.update(&objects(std::slice::from_ref(&squatter)));
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/squatter:http")
    );
    let update = compiler.update(&objects(&[
        squatter,
        service("dns", "10.96.0.10", Some(500), &[]),
    ]));
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/dns:http")
    );
    assert_eq!(update.errors.len(), 1, "{:?}", update.errors);
    assert_eq!(update.errors[0].object, "Service default/squatter");
}

#[test]
fn without_creation_times_the_first_name_wins() {
    let mut compiler = Compiler::new(node());
    compiler.update(&objects(&[
        service("zeta", "10.96.0.10", None, &[]),
        service("alpha", "10.96.0.10", None, &[]),
    ]));
    assert_eq!(
        owner(&compiler, "10.96.0.10").as_deref(),
        Some("default/alpha:http")
    );
}

/// One of a few Services that contest two addresses through cluster IPs
/// and externalIPs.
fn arb_service() -> impl Strategy<Value = (usize, usize, Option<i64>, Vec<usize>)> {
    (
        0..5usize,
        0..2usize,
        prop::option::of(0..3i64),
        prop::collection::vec(0..2usize, 0..2),
    )
}

const ADDRESSES: [&str; 2] = ["10.96.0.1", "10.96.0.2"];

fn build(spec: &(usize, usize, Option<i64>, Vec<usize>)) -> Sourced<Service> {
    let (name, ip, created, external) = spec;
    let external: Vec<&str> = external.iter().map(|i| ADDRESSES[*i]).collect();
    service(&format!("s{name}"), ADDRESSES[*ip], *created, &external)
}

proptest! {
    /// After any sequence of snapshots, in any order within each, the
    /// incremental compiler holds what a fresh compile of the last
    /// snapshot in a canonical order gives, errors included.
    #[test]
    fn the_owner_depends_only_on_the_live_claimants(
        steps in prop::collection::vec(prop::collection::vec(arb_service(), 0..5), 1..6),
    ) {
        let mut compiler = Compiler::new(node());
        for step in &steps {
            // One Service per name: the last spec of a name stands.
            let mut by_name = std::collections::BTreeMap::new();
            for spec in step {
                by_name.insert(spec.0, spec.clone());
            }
            let mut emitted = std::collections::BTreeSet::new();
            let snapshot: Vec<Sourced<Service>> = step
                .iter()
                .filter(|spec| by_name[&spec.0] == **spec && emitted.insert(spec.0))
                .map(build)
                .collect();
            let update = compiler.update(&objects(&snapshot));
            let canonical: Vec<Sourced<Service>> = by_name.values().map(build).collect();
            let fresh = compile(&objects(&canonical), &node());
            prop_assert_eq!(compiler.desired(), &fresh.desired);
            prop_assert_eq!(format!("{:?}", update.errors), format!("{:?}", fresh.errors));
        }
    }
}

/// A name freed, then taken by a recycled entry while the entry it had
/// before is still free, stays with its new entry.
#[test]
fn a_recycled_name_stays_with_its_new_entry() {
    let mut compiler = Compiler::new(node());
    let s = |n: usize, ip: usize| build(&(n, ip, None, vec![]));
    for step in [
        vec![s(4, 0)],
        vec![s(0, 0), s(1, 0)],
        vec![],
        vec![s(4, 0)],
        vec![s(2, 1), s(0, 0), s(1, 0)],
    ] {
        compiler.update(&objects(&step));
    }
    let fresh = compile(&objects(&[s(0, 0), s(1, 0), s(2, 1)]), &node());
    assert_eq!(compiler.desired(), &fresh.desired);
    let update = compiler.update(&objects(&[s(2, 1), s(0, 0), s(1, 0)]));
    assert_eq!(update.errors, fresh.errors);
}
