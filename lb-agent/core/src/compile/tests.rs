//! The compiler from YAML to desired state, end to end.
use std::net::IpAddr;

use lb_common::{
    net::{PROTO_TCP, PROTO_UDP},
    service::{
        ServiceKey, BACKEND_FLAG_LOCAL, SCOPE_EXTERNAL, SCOPE_TC_CLUSTER, SCOPE_TC_EXTERNAL,
        SERVICE_FLAG_AFFINITY, SERVICE_FLAG_EXTERNAL_LOCAL, SERVICE_FLAG_NO_LOCAL_BACKENDS,
        SERVICE_FLAG_SOURCE_RANGES,
    },
};

use super::*;
use crate::{
    addr::{addr_from_ip, port_to_be},
    yaml::parse_documents,
};

fn compile_yaml(text: &str) -> Compiled {
    compile_on(text, None)
}

fn compile_on(text: &str, node: Option<&str>) -> Compiled {
    let parsed = parse_documents("test.yaml", text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    compile(
        &parsed.objects,
        &NodeContext {
            name: node.map(str::to_owned),
            node_port_addresses: Vec::new(),
            localhost_node_ports: false,
            per_packet_cluster_ips: false,
            per_packet_udp_cluster_ips: false,
            external_ip_cidrs: Vec::new(),
        },
    )
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {ready: false, serving: true, terminating: true}
"#;

fn key(ip: &str, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: addr_from_ip(ip.parse().unwrap()),
        port: port_to_be(port),
        proto,
        scope: SCOPE_EXTERNAL,
    }
}

fn ips(frontend: &Frontend) -> Vec<(IpAddr, u16)> {
    frontend
        .backends
        .iter()
        .map(|b| (crate::addr::ip_from_addr(&b.addr), u16::from_be(b.port)))
        .collect()
}

#[test]
fn each_service_port_is_a_frontend_with_its_own_target_port() {
    let compiled = compile_yaml(WEB);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert_eq!(http.name, "default/web:http");
    assert_eq!(
        ips(http),
        vec![
            ("10.0.0.1".parse().unwrap(), 8080),
            ("10.0.0.2".parse().unwrap(), 8080)
        ]
    );
    let dns = &compiled.desired.frontends[&key("10.96.0.10", 53, PROTO_UDP)];
    assert_eq!(ips(dns).len(), 2);
    assert!(ips(dns).iter().all(|(_, port)| *port == 5353));
}

/// Pods' connected UDP sockets are translated per datagram: every UDP
/// ClusterIP port gets a per-packet frontend with the same backends, TCP
/// ports none (their sockets are translated once, at `connect()`).
#[test]
fn udp_cluster_ip_ports_are_also_served_per_packet_when_asked() {
    let parsed = parse_documents("test.yaml", WEB);
    let node = NodeContext {
        per_packet_udp_cluster_ips: true,
        ..NodeContext::default()
    };
    let compiled = compile(&parsed.objects, &node);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let per_packet: Vec<&ServiceKey> = compiled
        .desired
        .frontends
        .keys()
        .filter(|k| k.scope == SCOPE_TC_CLUSTER)
        .collect();
    let dns = key("10.96.0.10", 53, PROTO_UDP);
    assert_eq!(
        per_packet,
        [&ServiceKey {
            scope: SCOPE_TC_CLUSTER,
            ..dns
        }]
    );
    let frontends = &compiled.desired.frontends;
    assert_eq!(
        ips(&frontends[per_packet[0]]),
        ips(&frontends[&dns]),
        "the same backends either way"
    );
}

#[test]
fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
    let text = WEB.replace(
        "conditions: {ready: true}",
        "conditions: {ready: false}",
    )
    .replace("- addresses: [10.0.0.2]\n", "- addresses: [10.0.0.2]\n  conditions: {ready: false, serving: false, terminating: true}\n");
    let compiled = compile_yaml(&text);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert_eq!(ips(http), vec![("10.0.0.3".parse().unwrap(), 8080)]);
}

#[test]
fn endpoints_listed_but_not_chosen_drain() {
    let compiled = compile_yaml(WEB);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    let draining: Vec<IpAddr> = http
        .draining
        .iter()
        .map(|b| crate::addr::ip_from_addr(&b.addr))
        .collect();
    assert_eq!(draining, ["10.0.0.3".parse::<IpAddr>().unwrap()]);
    assert_eq!(u16::from_be(http.draining[0].port), 8080);
    // Once the terminating pod left the slice, nothing drains.
    let gone = WEB.replace(
        "- addresses: [10.0.0.3]\n  conditions: {ready: false, serving: true, terminating: true}\n",
        "",
    );
    let compiled = compile_yaml(&gone);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert!(http.draining.is_empty());
}

#[test]
fn service_without_endpoints_is_a_frontend_with_no_backends() {
    let text = WEB.split("---").next().unwrap();
    let compiled = compile_yaml(text);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert!(http.backends.is_empty());
}

#[test]
fn headless_external_name_and_foreign_proxy_services_are_skipped() {
    for variant in [
        WEB.replace("clusterIP: 10.96.0.10", "clusterIP: None"),
        WEB.replace("clusterIP: 10.96.0.10", "type: ExternalName\n  externalName: example.com"),
        WEB.replace(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
        ),
        WEB.replace(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/headless: ''}}",
        ),
    ] {
        let compiled = compile_yaml(&variant);
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        assert!(compiled.desired.frontends.is_empty(), "{variant}");
    }
}

#[test]
fn invalid_fields_are_reported_with_their_path_and_skipped() {
    let text = format!(
        "{WEB}---\n{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: zero, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 0}, {port: 81, protocol: SCTP}, {port: 82}]
"#
    );
    let compiled = compile_yaml(&text);
    let fields: Vec<_> = compiled
        .errors
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("Service default/broken", "spec.clusterIP"),
            ("Service default/zero", "spec.ports[0].port"),
            ("Service default/zero", "spec.ports[1].protocol"),
        ]
    );
    assert!(compiled.errors[2].reason.contains("SCTP"));
    assert!(compiled
        .desired
        .frontends
        .contains_key(&key("10.96.0.10", 80, PROTO_TCP)));
    assert!(compiled
        .desired
        .frontends
        .contains_key(&key("10.96.0.11", 82, PROTO_TCP)));
    assert_eq!(compiled.desired.frontends.len(), 3);
}

#[test]
fn endpoint_ports_are_matched_by_name_per_slice() {
    // Named targetPorts resolve per endpoint: the controller puts endpoints with
    // different numbers for the same name into different slices.
    let text = format!(
        "{WEB}---\n{}",
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints: [{addresses: [10.0.0.9]}]
"#
    );
    let compiled = compile_yaml(&text);
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert!(ips(http).contains(&("10.0.0.9".parse().unwrap(), 9090)));
    assert!(ips(http).contains(&("10.0.0.1".parse().unwrap(), 8080)));
}

#[test]
fn dual_stack_service_matches_endpoints_by_family() {
    let text = WEB.replace(
        "clusterIP: 10.96.0.10",
        "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']",
    ) + r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ['fd00::1']}]
"#;
    let compiled = compile_yaml(&text);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let v6 = &compiled.desired.frontends[&key("fd00::10", 80, PROTO_TCP)];
    assert_eq!(ips(v6), vec![("fd00::1".parse().unwrap(), 8080)]);
    let v4 = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert_eq!(ips(v4).len(), 2);
}

#[test]
fn slice_without_service_label_is_reported() {
    let text = WEB.replace("  labels: {kubernetes.io/service-name: web}\n", "");
    let compiled = compile_yaml(&text);
    assert_eq!(compiled.errors.len(), 1);
    assert_eq!(compiled.errors[0].object, "EndpointSlice default/web-abc");
    let http = &compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert!(http.backends.is_empty());
}

const ZONED: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  nodeName: node1
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.0.0.2]
  nodeName: node2
  hints: {forZones: [{name: zone-b}]}
- addresses: [10.0.0.3]
  nodeName: node3
  hints: {forZones: [{name: zone-a}]}
"#;

fn http_ips(compiled: &Compiled) -> Vec<IpAddr> {
    ips(&compiled.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)])
        .into_iter()
        .map(|(ip, _)| ip)
        .collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn topology_hints_apply_when_every_ready_endpoint_has_one_for_some_zone() {
    assert_eq!(
        http_ips(&compile_on(ZONED, Some("node1"))),
        vec![ip("10.0.0.1"), ip("10.0.0.3")]
    );
    // Without knowing its zone the node uses every endpoint.
    assert_eq!(http_ips(&compile_on(ZONED, None)).len(), 3);
    // One ready endpoint without hints disables hints for the service.
    let partial = ZONED.replace("  hints: {forZones: [{name: zone-b}]}\n", "");
    assert_eq!(http_ips(&compile_on(&partial, Some("node1"))).len(), 3);
    // No endpoint hinted for this zone: every endpoint.
    let elsewhere = ZONED.replace("zone-a}]}", "zone-c}]}");
    assert_eq!(http_ips(&compile_on(&elsewhere, Some("node1"))).len(), 3);
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let local = ZONED.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
    );
    let on_node2 = compile_on(&local, Some("node2"));
    assert_eq!(http_ips(&on_node2), vec![ip("10.0.0.2")]);
    let on_node9 = compile_on(&local, Some("node9"));
    let fe = &on_node9.desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
    assert!(fe.backends.is_empty());
    assert_eq!(fe.flags, SERVICE_FLAG_NO_LOCAL_BACKENDS);
}

#[test]
fn unchanged_objects_are_not_recompiled_and_changes_are_reported() {
    let parsed = parse_documents("test.yaml", ZONED);
    let mut objects = parsed.objects;
    let mut compiler = Compiler::new(NodeContext::default());
    let first = compiler.update(&objects);
    assert_eq!(first.changed.len(), 1);
    assert!(compiler.update(&objects).changed.is_empty());
    // A new EndpointSlice object (as the API source delivers an update).
    let mut slice = (*objects.endpoint_slices[0].object).clone();
    slice.endpoints.truncate(1);
    objects.endpoint_slices[0].object = Arc::new(slice);
    let update = compiler.update(&objects);
    assert_eq!(update.changed.len(), 1);
    assert_eq!(http_ips_of(compiler.desired()), vec![ip("10.0.0.1")]);
    objects.services.clear();
    assert_eq!(compiler.update(&objects).changed.len(), 1);
    assert!(compiler.desired().frontends.is_empty());
}

fn http_ips_of(desired: &DesiredState) -> Vec<IpAddr> {
    ips(&desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)])
        .into_iter()
        .map(|(ip, _)| ip)
        .collect()
}

#[test]
fn health_check_node_ports_count_local_ready_endpoints() {
    let lb = ZONED.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
    );
    let on_node1 = compile_on(&lb, Some("node1"));
    let health = &on_node1.desired.health_checks[&32000];
    assert_eq!((health.name.as_str(), health.local_endpoints), ("web", 1));
    assert_eq!(
        compile_on(&lb, Some("node9")).desired.health_checks[&32000].local_endpoints,
        0
    );
    assert!(compile_on(ZONED, Some("node1"))
        .desired
        .health_checks
        .is_empty());
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_become_tc_and_local_client_frontends() {
    let lb = ZONED.replace(
        "  ports: [{name: http, port: 80}]\n",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.7]\n  loadBalancerSourceRanges: [10.1.0.0/16]\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}]\n",
    );
    let parsed = parse_documents("test.yaml", &lb);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let node = NodeContext {
        name: Some("node1".into()),
        node_port_addresses: vec![ip("192.168.100.1"), ip("fd00:100::1")],
        localhost_node_ports: true,
        per_packet_cluster_ips: false,
        per_packet_udp_cluster_ips: false,
        external_ip_cidrs: vec!["192.0.2.0/24".parse().expect("cidr")],
    };
    let compiled = compile(&parsed.objects, &node);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let tc = |addr: &str, port: u16| ServiceKey {
        scope: SCOPE_TC_EXTERNAL,
        ..key(addr, port, PROTO_TCP)
    };
    let frontends = &compiled.desired.frontends;
    // ClusterIP, NodePort on the IPv4 node address only (IPv4 Service),
    // the ExternalIP and the LoadBalancer IP without ipMode Proxy; the
    // NodePort (on 127.0.0.1 too) and the ExternalIP for this node's own
    // clients.
    assert_eq!(frontends.len(), 7, "{:?}", frontends.keys());
    let node_port = &frontends[&tc("192.168.100.1", 30080)];
    assert_eq!(node_port.flags, SERVICE_FLAG_EXTERNAL_LOCAL);
    assert_eq!(ips(node_port), vec![(ip("10.0.0.1"), 8080)]);
    assert_eq!(node_port.backends[0].flags, BACKEND_FLAG_LOCAL);
    assert!(node_port.source_ranges.is_empty());
    assert!(frontends.contains_key(&tc("192.0.2.7", 80)));
    let lb_ip = &frontends[&tc("198.51.100.1", 80)];
    assert_eq!(
        lb_ip.flags,
        SERVICE_FLAG_EXTERNAL_LOCAL | SERVICE_FLAG_SOURCE_RANGES
    );
    assert_eq!(lb_ip.source_ranges, vec![(ip("10.1.0.0"), 16)]);
    // The ClusterIP is not Local: it uses the zone's endpoints (hints).
    assert_eq!(ips(&frontends[&key("10.96.0.10", 80, PROTO_TCP)]).len(), 2);
    // This node's own clients get every endpoint (hints apply), as
    // kube-proxy serves them whatever externalTrafficPolicy says; the
    // source-ranged LoadBalancer IP is left to the network path.
    for (addr, port) in [
        ("192.168.100.1", 30080),
        ("127.0.0.1", 30080),
        ("192.0.2.7", 80),
    ] {
        let own = &frontends[&key(addr, port, PROTO_TCP)];
        assert_eq!(own.flags, 0, "{addr}");
        assert_eq!(ips(own).len(), 2, "{addr}");
        assert!(own.source_ranges.is_empty());
    }
    assert!(!frontends.contains_key(&key("198.51.100.1", 80, PROTO_TCP)));
    // A packet from outside addressed to 127.0.0.1 never reaches a Service.
    assert!(!frontends.contains_key(&tc("127.0.0.1", 30080)));

    let without_localhost = NodeContext {
        localhost_node_ports: false,
        ..node
    };
    let compiled = compile(&parsed.objects, &without_localhost);
    assert_eq!(compiled.desired.frontends.len(), 6);
    assert!(!compiled
        .desired
        .frontends
        .contains_key(&key("127.0.0.1", 30080, PROTO_TCP)));
}

#[test]
fn annotated_pods_of_this_node_opt_out_except_host_network_ones() {
    let pod = |name: &str, node: &str, host_network: bool| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: uid-{name}\n  annotations: {{lb.dev/socket-lb: disabled}}\nspec:\n  nodeName: {node}\n  hostNetwork: {host_network}\n  containers: [{{name: c, image: i}}]\n"
        )
    };
    let text = [
        pod("mesh", "node1", false),
        pod("agent", "node1", true),
        pod("elsewhere", "node2", false),
    ]
    .join("---\n");
    let parsed = parse_documents("pods.yaml", &text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mut compiler = Compiler::new(NodeContext {
        name: Some("node1".into()),
        ..NodeContext::default()
    });
    let update = compiler.update(&parsed.objects);
    assert_eq!(
        update.opted_out_pods,
        BTreeSet::from(["uid-mesh".to_string()])
    );
    assert_eq!(update.errors.len(), 1, "{:?}", update.errors);
    assert_eq!(update.errors[0].object, "Pod default/agent");
    assert!(update.errors[0].reason.contains("hostNetwork"));
}

#[test]
fn client_ip_affinity_defaults_to_three_hours() {
    let sticky = WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n",
    );
    let fe = compile_yaml(&sticky).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
    assert_eq!(
        (fe.flags, fe.affinity_timeout_s),
        (SERVICE_FLAG_AFFINITY, 10_800)
    );
    let custom = sticky.replace(
        "  sessionAffinity: ClientIP\n",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n",
    );
    let fe = compile_yaml(&custom).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
    assert_eq!(fe.affinity_timeout_s, 5);
    let none = compile_yaml(WEB).desired.frontends[&key("10.96.0.10", 80, PROTO_TCP)].clone();
    assert_eq!(none.flags, 0);

    // Every way in keeps the affinity: NodePorts and per-packet ClusterIPs.
    let node_port = custom
        .replace(
            "  sessionAffinity: ClientIP\n",
            "  type: NodePort\n  sessionAffinity: ClientIP\n",
        )
        .replace("targetPort: http}", "targetPort: http, nodePort: 30080}");
    assert!(node_port.contains("nodePort: 30080"), "{node_port}");
    let parsed = parse_documents("test.yaml", &node_port);
    let node = NodeContext {
        name: Some("node1".into()),
        node_port_addresses: vec![ip("192.168.100.1")],
        localhost_node_ports: false,
        per_packet_cluster_ips: true,
        per_packet_udp_cluster_ips: false,
        external_ip_cidrs: Vec::new(),
    };
    let compiled = compile(&parsed.objects, &node);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let sticky_frontends: Vec<_> = compiled
        .desired
        .frontends
        .iter()
        .filter(|(k, _)| k.scope != SCOPE_EXTERNAL)
        .map(|(k, fe)| {
            (
                k.scope,
                fe.flags & SERVICE_FLAG_AFFINITY,
                fe.affinity_timeout_s,
            )
        })
        .collect();
    // TCP and UDP per-packet ClusterIPs and the TCP NodePort.
    assert_eq!(
        sticky_frontends.len(),
        3,
        "{:?}",
        compiled.desired.frontends.keys()
    );
    assert!(sticky_frontends
        .iter()
        .all(|&(_, flag, timeout)| flag == SERVICE_FLAG_AFFINITY && timeout == 5));
}

#[test]
fn a_node_being_deleted_is_not_eligible_for_new_traffic() {
    let eligible = |node_yaml: &str| {
        let parsed = parse_documents("test.yaml", node_yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut compiler = Compiler::new(NodeContext {
            name: Some("node1".into()),
            ..NodeContext::default()
        });
        compiler.update(&parsed.objects).node_eligible
    };
    assert!(eligible(""), "no Node object: eligible");
    assert!(eligible(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n"
    ));
    assert!(eligible(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node2, deletionTimestamp: '2026-12-06T10:00:00Z'}\n"
    ));
    assert!(!eligible(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1, deletionTimestamp: '2026-12-06T10:00:00Z'}\n"
    ));
    assert!(!eligible(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1733480000', effect: NoSchedule}]\n"
    ));
}

#[test]
fn external_ips_are_served_only_inside_the_allowed_ranges_and_never_special_ones() {
    let text = WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  externalIPs: [192.0.2.7, 203.0.113.9, 127.0.0.1, 169.254.169.254, 0.0.0.0, 224.0.0.5, '::ffff:127.0.0.1']\n",
    );
    let parsed = parse_documents("test.yaml", &text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let served = |allowed: &[&str]| {
        let node = NodeContext {
            node_port_addresses: vec![ip("192.168.100.1")],
            external_ip_cidrs: allowed.iter().map(|c| c.parse().expect("cidr")).collect(),
            ..NodeContext::default()
        };
        let compiled = compile(&parsed.objects, &node);
        let addresses: std::collections::BTreeSet<IpAddr> = compiled
            .desired
            .frontends
            .keys()
            .filter(|k| k.scope == SCOPE_TC_EXTERNAL)
            .map(|k| crate::addr::ip_from_addr(&k.addr))
            .collect();
        let fields: Vec<String> = compiled.errors.iter().map(|e| e.field.clone()).collect();
        (addresses, fields)
    };
    let (none, errors) = served(&[]);
    assert!(none.is_empty(), "none allowed by default: {none:?}");
    assert_eq!(errors.len(), 7, "{errors:?}");
    let (some, errors) = served(&["192.0.2.0/24"]);
    assert_eq!(some.into_iter().collect::<Vec<_>>(), vec![ip("192.0.2.7")]);
    assert_eq!(errors.len(), 6, "{errors:?}");
    let (all, errors) = served(&["0.0.0.0/0", "::/0"]);
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        vec![ip("192.0.2.7"), ip("203.0.113.9")],
        "special addresses are never served"
    );
    assert_eq!(
        errors,
        [
            "spec.externalIPs[2]",
            "spec.externalIPs[3]",
            "spec.externalIPs[4]",
            "spec.externalIPs[5]",
            "spec.externalIPs[6]"
        ]
    );
}
