//! NodePort translation: DNAT of new flows to the backend Maglev picks, the
//! same backend for a flow on every node, ClientIP affinity, replies
//! translated back, UDP and IPv6, and traffic to other destinations left
//! alone.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::Outcome,
    service::SERVICE_FLAG_AFFINITY,
};
use lb_core::addr::addr_from_ip;

use crate::{
    fixture::{
        backend4, backend6, isolated, maglev_pick, node_with_local_backends, nodeport, v4,
        Frontend, Node, CLIENT4, CLIENT6, NODE4, NODE6, NODE_PORT, TC_ACT_OK,
    },
    frames::{parse, Pkt},
};

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
