//! ICMP and ICMPv6 errors about a translated flow reach the other side
//! translated, for local and SNATed backends; errors about other flows pass
//! untouched.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::Outcome,
};

use crate::{
    fixture::{
        backend4, backend6, isolated, nodeport, v4, Node, CLIENT4, CLIENT6, NODE4, NODE6,
        NODE_PORT, TC_ACT_OK,
    },
    frames::{fold, ip_frame, parse_icmp, pseudo_sum, sum16, Pkt},
};

/// The start of `pkt` as an ICMP error quotes it: its IP header and the
/// first 8 bytes of its transport header.
fn quote_of(pkt: &Pkt<'_>) -> Vec<u8> {
    let ip_len = if pkt.src.is_ipv4() { 20 } else { 40 };
    pkt.frame()[14..14 + ip_len + 8].to_vec()
}

/// An ICMP (ICMPv6) error of `kind`/`code` from `src` to `dst` about
/// `about`, with `rest` as the header's second word and a valid checksum.
pub(crate) fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    (kind, code): (u8, u8),
    rest: u32,
    about: &Pkt<'_>,
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(quote_of(about));
    let (proto, sum) = if src.is_ipv4() {
        (1, sum16(&icmp))
    } else {
        (58, pseudo_sum(src, dst, 58, icmp.len()) + sum16(&icmp))
    };
    let csum = fold(sum);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    ip_frame(src, dst, proto, &icmp)
}

/// Runs an error through `hook` and checks it came out as `expected`
/// (verdict, outer addresses, quote of the packet as the receiver sent it,
/// kind, code and MTU kept, valid checksums).
fn assert_error_translated(
    node: &mut Node,
    hook: TcHook,
    error: &[u8],
    (src, dst): (IpAddr, IpAddr),
    quoted: &Pkt<'_>,
) {
    let before = parse_icmp(error);
    let (verdict, out) = node.tc.test_run(hook, error).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let after = parse_icmp(&out);
    assert_eq!((after.src, after.dst), (src, dst));
    assert_eq!(
        (after.kind, after.code, after.rest),
        (before.kind, before.code, before.rest)
    );
    assert_eq!(after.quote, quote_of(quoted), "quote of {quoted:?}");
}

/// Per family: a client, the node's address, a backend and a router
/// between the node and the client.
fn error_cases() -> [(IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (
            CLIENT4.into(),
            NODE4.into(),
            backend4(1),
            v4(203, 0, 113, 1),
        ),
        (
            CLIENT6.into(),
            NODE6.into(),
            backend6(1),
            "2001:db8:ff::1".parse().unwrap(),
        ),
    ]
}

/// ICMP errors about the packets of a translated flow reach the other side
/// translated (what conntrack's RELATED NAT does under kube-proxy): the
/// backend's port unreachable reaches the client from the NodePort, quoting
/// the datagram as the client sent it (its UDP checksum updated), and a
/// router's "fragmentation needed" / "packet too big" about a reply reaches
/// the backend, quoting the reply as the backend sent it. Errors about
/// other flows pass untouched.
#[test]
fn icmp_errors_about_a_flow_are_translated_for_the_other_side() {
    for (client, node_ip, backend, router) in error_cases() {
        let (unreachable, too_big) = if client.is_ipv4() {
            ((3, 3), ((3, 4), 1400))
        } else {
            ((1, 4), ((2, 0), 1400))
        };
        let mut node = Node::new();
        node.add_backend(1, backend, 5353, PROTO_UDP, true);
        let fe = nodeport(node_ip, PROTO_UDP);
        node.set_frontend(&fe, 1, &[1]);
        let query = Pkt::udp(client, 50000, fe.ip, NODE_PORT, b"hello");
        let (_, fwd) = node.ingress(&query);
        assert_eq!(fwd.dst, backend);

        let delivered = Pkt::udp(client, 50000, backend, 5353, b"hello");
        let closed = icmp_error(backend, client, unreachable, 0, &delivered);
        assert_error_translated(&mut node, TcHook::Egress, &closed, (fe.ip, client), &query);

        let reply = Pkt::udp(fe.ip, NODE_PORT, client, 50000, b"world");
        let (kind, mtu) = too_big;
        let big = icmp_error(router, fe.ip, kind, mtu, &reply);
        let sent = Pkt::udp(backend, 5353, client, 50000, b"world");
        assert_error_translated(&mut node, TcHook::Ingress, &big, (router, backend), &sent);
        assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");

        // About a flow the node never translated: untouched.
        let other = Pkt::udp(fe.ip, NODE_PORT, client, 50001, b"world");
        let unrelated = icmp_error(router, fe.ip, kind, mtu, &other);
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, &unrelated).unwrap();
        assert_eq!((verdict, out), (TC_ACT_OK, unrelated));
        assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");
    }
}

/// The same through SNAT (externalTrafficPolicy Cluster, backend on another
/// node): the remote backend's error, sent to the node's address, reaches
/// the client from the NodePort; a router's error about a reply reaches the
/// backend quoting the reply as it left the backend, to the SNAT port.
#[test]
fn icmp_errors_follow_snated_flows() {
    isolated(|| {
        for (client, node_ip, backend, router) in error_cases() {
            let (unreachable, time_exceeded) = if client.is_ipv4() {
                ((3, 1), (11, 0))
            } else {
                ((1, 3), (3, 0))
            };
            let mut node = Node::new();
            node.add_backend(1, backend, 8080, PROTO_TCP, false);
            let fe = nodeport(node_ip, PROTO_TCP);
            node.set_frontend(&fe, 1, &[1]);
            let syn = Pkt::tcp(client, 44000, fe.ip, NODE_PORT, SYN);
            let (_, fwd) = node.ingress(&syn);
            assert_eq!(fwd.src, node_ip);

            let at_backend = Pkt::tcp(node_ip, fwd.sport, backend, 8080, SYN);
            let error = icmp_error(backend, node_ip, unreachable, 0, &at_backend);
            assert_error_translated(&mut node, TcHook::Ingress, &error, (fe.ip, client), &syn);

            let reply = Pkt::tcp(fe.ip, NODE_PORT, client, 44000, SYN | ACK);
            let error = icmp_error(router, fe.ip, time_exceeded, 0, &reply);
            let sent = Pkt::tcp(backend, 8080, node_ip, fwd.sport, SYN | ACK);
            assert_error_translated(&mut node, TcHook::Ingress, &error, (router, backend), &sent);
            assert_eq!(node.stat(Outcome::IcmpError), 2, "{client}");
        }
    });
}
