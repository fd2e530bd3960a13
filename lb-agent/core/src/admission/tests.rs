//! Objects the API server rejects are rejected whole, with their field;
//! objects it accepts pass untouched.
use super::*;
use crate::yaml::parse_documents;

fn admitted(text: &str, rules: &AdmissionRules) -> Parsed {
    let mut parsed = parse_documents("test.yaml", text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    admit(&mut parsed, rules);
    parsed
}

/// The fields reported for a Service whose `spec` is `spec`.
fn service_fields(spec: &str, rules: &AdmissionRules) -> Vec<String> {
    let text = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n");
    let parsed = admitted(&text, rules);
    let fields: Vec<String> = parsed.errors.iter().map(|e| e.field.clone()).collect();
    assert_eq!(
        parsed.objects.services.is_empty(),
        !fields.is_empty(),
        "a Service is dropped exactly when it has a violation"
    );
    fields
}

#[test]
fn services_the_api_server_rejects_are_dropped_with_the_field_at_fault() {
    let none = AdmissionRules::default();
    let cases: &[(&str, &[&str])] = &[
        (
            "{clusterIP: 10.96.0.1, ports: [{name: http, port: 80}, {name: http, port: 81}]}",
            &["spec.ports[1].name"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 81}]}",
            &["spec.ports[0].name", "spec.ports[1].name"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{name: a, port: 80}, {name: b, port: 80}]}",
            &["spec.ports[1].port"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{name: Http, port: 80}]}",
            &["spec.ports[0].name"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{port: 80, protocol: ICMP}]}",
            &["spec.ports[0].protocol"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 70000}]}",
            &["spec.ports[0].targetPort"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: not--valid}]}",
            &["spec.ports[0].targetPort"],
        ),
        (
            "{clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}",
            &["spec.ports[0].nodePort"],
        ),
        (
            "{type: NodePort, clusterIP: 10.96.0.1, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]}",
            &["spec.ports[1].nodePort"],
        ),
        ("{type: Internal, clusterIP: 10.96.0.1, ports: [{port: 80}]}", &["spec.type"]),
        ("{clusterIP: 10.96.0.1}", &["spec.ports"]),
        ("{clusterIP: 10.96.0.300, ports: [{port: 80}]}", &["spec.clusterIP"]),
        (
            "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]}",
            &["spec.clusterIPs[0]"],
        ),
        (
            "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}",
            &["spec.clusterIPs[1]"],
        ),
        (
            "{clusterIP: 10.96.0.1, externalIPs: [127.0.0.1, 0.0.0.0, 169.254.1.1, 224.0.0.1, '::ffff:127.0.0.1', 'fe80::1'], ports: [{port: 80}]}",
            &[
                "spec.externalIPs[0]",
                "spec.externalIPs[1]",
                "spec.externalIPs[2]",
                "spec.externalIPs[3]",
                "spec.externalIPs[4]",
                "spec.externalIPs[5]",
            ],
        ),
        (
            "{clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{port: 80}]}",
            &["spec.externalTrafficPolicy"],
        ),
        (
            "{clusterIP: 10.96.0.1, loadBalancerSourceRanges: [10.0.0.0/8], ports: [{port: 80}]}",
            &["spec.loadBalancerSourceRanges"],
        ),
        (
            "{type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerSourceRanges: [10.0.0.0/33], ports: [{port: 80}]}",
            &["spec.loadBalancerSourceRanges[0]"],
        ),
        (
            "{type: NodePort, clusterIP: 10.96.0.1, healthCheckNodePort: 30000, ports: [{port: 80}]}",
            &["spec.healthCheckNodePort"],
        ),
        (
            "{clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
            &["spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
        ),
        (
            "{clusterIP: 10.96.0.1, internalTrafficPolicy: Nearby, ports: [{port: 80}]}",
            &["spec.internalTrafficPolicy"],
        ),
    ];
    for (spec, expected) in cases {
        assert_eq!(&service_fields(spec, &none), expected, "spec {spec}");
    }
}

#[test]
fn services_the_api_server_accepts_pass() {
    let none = AdmissionRules::default();
    for spec in [
        "{clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        "{clusterIP: None}",
        "{type: ExternalName, externalName: example.com}",
        "{clusterIP: 10.96.0.1, ports: [{name: http, port: 80, targetPort: http-alt}, {name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], externalTrafficPolicy: Local, healthCheckNodePort: 30000, loadBalancerSourceRanges: [10.0.0.0/8], ports: [{port: 80, nodePort: 30080}]}",
        "{clusterIP: 10.96.0.1, externalIPs: [192.0.2.10], externalTrafficPolicy: Local, ports: [{port: 80}]}",
    ] {
        assert!(service_fields(spec, &none).is_empty(), "spec {spec}");
    }
}

#[test]
fn bad_names_are_rejected() {
    let parsed = admitted(
        "apiVersion: v1\nkind: Service\nmetadata: {name: 9web, namespace: Prod}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        &AdmissionRules::default(),
    );
    let fields: Vec<&str> = parsed.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["metadata.name", "metadata.namespace"]);
    assert_eq!(parsed.errors[0].object, "Service Prod/9web");
    assert_eq!(parsed.errors[0].origin, "test.yaml");
}

#[test]
fn a_cluster_ip_outside_the_configured_service_cidrs_is_rejected() {
    let rules = AdmissionRules {
        service_cidrs: vec![
            "10.96.0.0/16".parse().expect("cidr"),
            "fd00::/108".parse().expect("cidr"),
        ],
    };
    assert_eq!(
        service_fields("{clusterIP: 10.97.0.1, ports: [{port: 80}]}", &rules),
        ["spec.clusterIP"]
    );
    assert!(service_fields(
        "{clusterIP: 10.96.3.1, clusterIPs: [10.96.3.1, 'fd00::a'], ports: [{port: 80}]}",
        &rules
    )
    .is_empty());
    assert!(
        service_fields(
            "{clusterIP: 10.97.0.1, ports: [{port: 80}]}",
            &AdmissionRules::default()
        )
        .is_empty(),
        "no CIDR configured: any address"
    );
}

fn slice_fields(body: &str) -> Vec<String> {
    let text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n{body}\n"
    );
    let parsed = admitted(&text, &AdmissionRules::default());
    let fields: Vec<String> = parsed.errors.iter().map(|e| e.field.clone()).collect();
    assert_eq!(
        parsed.objects.endpoint_slices.is_empty(),
        !fields.is_empty()
    );
    fields
}

#[test]
fn endpoint_slices_the_api_server_rejects_are_dropped_with_the_field_at_fault() {
    let cases: &[(&str, &[&str])] = &[
        (
            "addressType: IPv4\nports: [{name: http, port: 80}, {name: http, port: 81}]\nendpoints: []",
            &["ports[1].name"],
        ),
        (
            "addressType: IPv4\nports: [{port: 80}, {port: 81}]\nendpoints: []",
            &["ports[1].name"],
        ),
        (
            "addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]",
            &["endpoints[0].addresses[0]"],
        ),
        ("addressType: IPv4\nendpoints: [{addresses: []}]", &["endpoints[0].addresses"]),
        ("addressType: IPX\nendpoints: []", &["addressType"]),
        (
            "addressType: IPv6\nports: [{name: dns, port: 53, protocol: DNS}]\nendpoints: [{addresses: ['fd00::1']}]",
            &["ports[0].protocol"],
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(&slice_fields(body), expected, "slice {body}");
    }
    assert!(slice_fields(
        "addressType: IPv4\nports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\nendpoints: [{addresses: [10.0.0.1]}]"
    )
    .is_empty());
}

#[test]
fn the_examples_pass() {
    for (name, text) in [
        ("dns.yaml", include_str!("../../../../examples/dns.yaml")),
        ("edge.yaml", include_str!("../../../../examples/edge.yaml")),
        ("web.yaml", include_str!("../../../../examples/web.yaml")),
    ] {
        let parsed = admitted(text, &AdmissionRules::default());
        assert!(parsed.errors.is_empty(), "{name}: {:?}", parsed.errors);
    }
}
