//! Frontends without endpoints: TCP refused with a reset, UDP answered with
//! ICMP or ICMPv6 port unreachable, and the answers to a flood rate-limited.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_RST as RST, TCP_SYN as SYN},
    outcome::Outcome,
    reject::REJECT_BURST,
};

use crate::{
    fixture::{
        nodeport, v4, Frontend, Node, CLIENT4, CLIENT6, NODE4, NODE6, NODE_PORT, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    frames::{parse, parse_icmp, Pkt},
};

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
