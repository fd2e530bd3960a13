//! Hostile traffic from outside against conntrack and SNAT: segments that
//! open no flow, handshakes a blind sender cannot complete, a flood of
//! spoofed SYNs that evicts no established flow, and SNAT ports that a
//! flood cannot hold against new clients.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcOptions;
use lb_common::{
    conntrack::{CT_STATE_CLOSING, CT_STATE_ESTABLISHED, RESET_WINDOW},
    nat::SNAT_PORT_COUNT,
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN},
    outcome::Outcome,
};

use crate::{
    fixture::{
        backend4, node_with_local_backends, nodeport, v4, Node, CLIENT4, NODE4, NODE_PORT,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    frames::{Pkt, ISN},
};

/// The i-th spoofed source of a flood: addresses across a /16, varied ports.
fn spoofed(i: u32) -> (IpAddr, u16) {
    (
        v4(203, (i >> 8) as u8, i as u8, 1),
        1024 + (i % 60_000) as u16,
    )
}

#[test]
fn only_a_syn_opens_a_tcp_flow() {
    let (mut node, fe) = node_with_local_backends();
    for (sport, flags) in [
        (40001, ACK),
        (40002, FIN | ACK),
        (40003, RST),
        (40004, ACK | 0x08),
    ] {
        let (verdict, _) = node.ingress(&Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, flags));
        assert_eq!(verdict, TC_ACT_SHOT, "flags {flags:#x}");
    }
    assert_eq!(node.stat(Outcome::DropNoConnection), 4);
    assert_eq!(node.stat(Outcome::NewFlow), 0);
    assert!(node.flow_entries().is_empty());
    // A SYN-ACK is no opening either.
    let (verdict, _) = node.ingress(&Pkt::tcp(
        CLIENT4.into(),
        40005,
        fe.ip,
        NODE_PORT,
        SYN | ACK,
    ));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert!(node.flow_entries().is_empty());
}

#[test]
fn a_blind_ack_does_not_confirm_a_flow() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, SYN);
    let (_, forwarded) = node.ingress(&syn);
    // The backend picks its own initial sequence number; a sender who does
    // not see the SYN-ACK guesses the acknowledgment number wrong.
    let syn_ack = Pkt {
        seq: 0x5eed_0000,
        ..Pkt::tcp(forwarded.dst, 8080, CLIENT4.into(), 41000, SYN | ACK)
    };
    node.egress(&syn_ack);
    let guess = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, ACK);
    assert_eq!(guess.ack, ISN + 1);
    let (verdict, out) = node.ingress(&guess);
    // Still translated (it may be the real client's), never confirmed.
    assert_eq!((verdict, out.dst), (TC_ACT_OK, forwarded.dst));
    assert_eq!(node.stat(Outcome::FlowConfirmed), 0);
    assert!(node.tc.conntrack_entries().unwrap().is_empty());
    // The real client acknowledges what the backend sent.
    node.ingress(&Pkt {
        ack: 0x5eed_0001,
        ..guess
    });
    assert_eq!(node.stat(Outcome::FlowConfirmed), 1);
    assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
    assert!(node.tc.pending_entries().unwrap().is_empty());
}

#[test]
fn a_udp_flow_is_confirmed_by_its_backends_answer() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 5353, PROTO_UDP, true);
    let fe = nodeport(NODE4.into(), PROTO_UDP);
    node.set_frontend(&fe, 1, &[1]);
    let query = Pkt::udp(CLIENT4.into(), 42000, fe.ip, NODE_PORT, b"q");
    node.ingress(&query);
    node.ingress(&query);
    assert_eq!(node.tc.pending_entries().unwrap().len(), 2);
    let (verdict, answer) = node.egress(&Pkt::udp(backend4(1), 5353, CLIENT4.into(), 42000, b"a"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((answer.src, answer.sport), (fe.ip, NODE_PORT));
    assert_eq!(node.stat(Outcome::FlowConfirmed), 1);
    assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
}

/// The attack of issue 22, item 2: spoofed SYNs, each answered by a live
/// backend, then blind ACKs, far more than the table of unconfirmed flows
/// holds. The established flow keeps its entries and its backend, and a
/// new client still gets through.
#[test]
fn a_spoofed_flood_evicts_no_established_flow() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 64,
        pending_capacity: 256,
        ..TcOptions::default()
    });
    for i in 1..=3 {
        node.add_backend(u32::from(i), backend4(i), 8080, PROTO_TCP, true);
    }
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1, 2, 3]);
    let established = Pkt::tcp(CLIENT4.into(), 43000, fe.ip, NODE_PORT, SYN);
    let backend = node.handshake_local(&established).dst;

    for i in 0..2_000 {
        let (source, sport) = spoofed(i);
        let (_, forwarded) = node.ingress(&Pkt::tcp(source, sport, fe.ip, NODE_PORT, SYN));
        node.egress(&Pkt {
            seq: 0x7000_0000 ^ i,
            ..Pkt::tcp(forwarded.dst, 8080, source, sport, SYN | ACK)
        });
        node.ingress(&Pkt::tcp(source, sport, fe.ip, NODE_PORT, ACK));
    }
    assert_eq!(
        node.stat(Outcome::FlowConfirmed),
        1,
        "only the real handshake"
    );
    let entries = node.tc.conntrack_entries().unwrap();
    assert_eq!(entries.len(), 2, "the flood reached the conntrack table");
    let data = Pkt::tcp(CLIENT4.into(), 43000, fe.ip, NODE_PORT, ACK | 0x08);
    let (verdict, out) = node.ingress(&data);
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend));

    let newcomer = Pkt::tcp(v4(198, 51, 100, 99), 44000, fe.ip, NODE_PORT, SYN);
    node.handshake_local(&newcomer);
    assert_eq!(node.stat(Outcome::FlowConfirmed), 2);
}

/// SNAT ports towards a remote backend: a flood of spoofed SYNs holding more
/// unconfirmed flows than there are ports does not starve a new client.
#[test]
fn a_spoofed_flood_cannot_exhaust_snat_ports() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 4096,
        pending_capacity: 4 * u32::from(SNAT_PORT_COUNT),
        ..TcOptions::default()
    });
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1]);
    for i in 0..u32::from(SNAT_PORT_COUNT) + 500 {
        let (source, sport) = spoofed(i);
        let (verdict, _) = node.ingress(&Pkt::tcp(source, sport, fe.ip, NODE_PORT, SYN));
        assert_eq!(verdict, TC_ACT_OK, "spoofed SYN {i}");
    }
    assert_eq!(node.stat(Outcome::DropSnatPortsExhausted), 0);

    let client = |flags| Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, flags);
    let (verdict, forwarded) = node.ingress(&client(SYN));
    assert_eq!((verdict, forwarded.src), (TC_ACT_OK, IpAddr::from(NODE4)));
    let (verdict, reply) = node.ingress(&Pkt::tcp(
        backend4(1),
        8080,
        NODE4.into(),
        forwarded.sport,
        SYN | ACK,
    ));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((reply.dst, reply.dport), (IpAddr::from(CLIENT4), 45000));
    node.ingress(&client(ACK));
    assert_eq!(node.stat(Outcome::FlowConfirmed), 1);
}

/// A reset no endpoint sent (issue 22, item 2): its sequence number is far
/// from what the receiver acknowledged, so it is dropped and the flow keeps
/// its state; the endpoint's own reset still closes the flow.
#[test]
fn a_blind_reset_is_dropped_and_the_flow_kept() {
    let (mut node, fe) = node_with_local_backends();
    let client = |seq: u32| Pkt {
        seq,
        ..Pkt::tcp(CLIENT4.into(), 46000, fe.ip, NODE_PORT, RST)
    };
    let backend = node
        .handshake_local(&Pkt::tcp(CLIENT4.into(), 46000, fe.ip, NODE_PORT, SYN))
        .dst;
    let states = |node: &Node| -> Vec<u8> {
        node.tc
            .conntrack_entries()
            .unwrap()
            .iter()
            .map(|(_, v)| v.state)
            .collect()
    };
    assert_eq!(states(&node), [CT_STATE_ESTABLISHED; 2]);
    // The backend acknowledged ISN + 1: a blind guess far from it, either
    // way, is dropped, from the outside as from the backend's side.
    for seq in [ISN + 1 + RESET_WINDOW, ISN.wrapping_sub(1)] {
        let (verdict, _) = node.ingress(&client(seq));
        assert_eq!(verdict, TC_ACT_SHOT, "seq {seq}");
    }
    let from_backend = Pkt {
        seq: 0x4000_0000,
        ..Pkt::tcp(backend, 8080, CLIENT4.into(), 46000, RST)
    };
    assert_eq!(node.egress(&from_backend).0, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropResetOutOfWindow), 3);
    assert_eq!(states(&node), [CT_STATE_ESTABLISHED; 2]);
    // The client's real reset, at the sequence number the backend expects
    // (or a little ahead, with data in flight), closes the flow.
    let (verdict, out) = node.ingress(&client(ISN + 1 + 1_000));
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend));
    assert_eq!(states(&node), [CT_STATE_CLOSING; 2]);
}
