//! Pods' connected UDP sockets left on a ClusterIP by the socket programs:
//! with `TC_CONFIG_POD_LB_UDP` the pod programs translate each UDP datagram
//! to a per-packet ClusterIP and its answers back, a flow whose backend left
//! picks a live one on its next datagram, and TCP is left to the socket
//! programs (it never reaches the pod programs addressed to a ClusterIP).

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    config::{TcConfig, TC_CONFIG_POD_LB_UDP},
    net::{PROTO_TCP, PROTO_UDP, TCP_SYN as SYN},
};
use lb_core::addr::addr_from_ip;

use crate::{
    fixture::{backend4, isolated, v4, Frontend, Node, NODE4, NODE6, SEED, TC_ACT_OK},
    frames::{parse, Pkt},
};

const POD: [u8; 4] = [10, 244, 0, 5];

fn cluster_ip() -> IpAddr {
    v4(10, 96, 0, 10)
}

fn frontend(port: u16, proto: u8, service_id: u32) -> Frontend {
    Frontend {
        ip: cluster_ip(),
        port,
        proto,
        service_id,
        flags: 0,
        affinity_timeout_s: 0,
    }
}

/// A node whose pod programs translate UDP ClusterIPs (`flags`), with DNS
/// (UDP 53 -> 5353 on backends 1 and 2) and web (TCP 80 -> 8080 on
/// backend 3) as per-packet ClusterIPs.
fn cluster_node(flags: u32) -> Node {
    let mut node = Node::new();
    node.tc
        .set_config(&TcConfig {
            maglev_seed: SEED,
            snat_v4: addr_from_ip(NODE4.into()),
            snat_v6: addr_from_ip(NODE6.into()),
            flags,
            policy_mark: 0,
        })
        .unwrap();
    node.add_backend(1, backend4(1), 5353, PROTO_UDP, true);
    node.add_backend(2, backend4(2), 5353, PROTO_UDP, true);
    node.add_backend(3, backend4(3), 8080, PROTO_TCP, true);
    node.set_cluster_frontend(&frontend(53, PROTO_UDP, 9), 1, &[1, 2]);
    node.set_cluster_frontend(&frontend(80, PROTO_TCP, 10), 2, &[3]);
    node
}

#[test]
fn each_datagram_is_translated_and_a_flow_moves_when_its_backend_leaves() {
    isolated(|| {
        let mut node = cluster_node(TC_CONFIG_POD_LB_UDP);
        let pod = IpAddr::from(POD);
        let query = Pkt::udp(pod, 40000, cluster_ip(), 53, b"query");
        let (verdict, out) = node.run(TcHook::PodIngress, &query);
        assert_eq!(verdict, TC_ACT_OK);
        let first = parse(&out);
        assert!([backend4(1), backend4(2)].contains(&first.dst), "{first:?}");
        assert_eq!((first.src, first.sport, first.dport), (pod, 40000, 5353));

        let answer = Pkt::udp(first.dst, 5353, pod, 40000, b"answer");
        let (verdict, out) = node.run(TcHook::PodEgress, &answer);
        assert_eq!(verdict, TC_ACT_OK);
        let back = parse(&out);
        assert_eq!((back.src, back.sport), (cluster_ip(), 53), "{back:?}");

        // The socket keeps sending to the ClusterIP: the same backend.
        let (_, out) = node.run(TcHook::PodIngress, &query);
        assert_eq!(parse(&out).dst, first.dst);

        // Its backend leaves: the next datagram reaches the other one.
        let (gone, other) = if first.dst == backend4(1) {
            (1, 2)
        } else {
            (2, 1)
        };
        node.backends.remove(&gone).unwrap();
        node.set_cluster_frontend(&frontend(53, PROTO_UDP, 9), 3, &[other]);
        let (_, out) = node.run(TcHook::PodIngress, &query);
        let moved = parse(&out);
        assert_eq!(moved.dst, backend4(other as u8), "{moved:?}");
        let answer = Pkt::udp(moved.dst, 5353, pod, 40000, b"answer");
        let (_, out) = node.run(TcHook::PodEgress, &answer);
        assert_eq!(parse(&out).src, cluster_ip());
    });
}

#[test]
fn tcp_and_every_protocol_without_the_flag_are_left_alone() {
    isolated(|| {
        let pod = IpAddr::from(POD);
        let mut node = cluster_node(TC_CONFIG_POD_LB_UDP);
        let syn = Pkt::tcp(pod, 40001, cluster_ip(), 80, SYN);
        let (verdict, out) = node.run(TcHook::PodIngress, &syn);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(parse(&out).dst, cluster_ip());

        let mut node = cluster_node(0);
        let query = Pkt::udp(pod, 40000, cluster_ip(), 53, b"query");
        let (verdict, out) = node.run(TcHook::PodIngress, &query);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(parse(&out).dst, cluster_ip());
    });
}
