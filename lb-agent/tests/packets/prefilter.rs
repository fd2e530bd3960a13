//! The XDP prefilter: sources of the deny list and sources outside a
//! LoadBalancer IP's ranges are dropped and counted before the stack; the
//! rest, and frames it cannot read, pass.

use lb_common::{
    net::{PROTO_TCP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::Outcome,
};

use crate::{
    fixture::{backend4, node_with_local_backends, v4, CLIENT4, CLIENT6, NODE6, NODE_PORT},
    frames::Pkt,
    source_ranges::source_ranged_lb4,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

#[test]
fn denied_sources_are_dropped_at_the_edge() {
    let (mut node, fe) = node_with_local_backends();
    node.tc
        .deny_list()
        .set(&[
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8:bad::/48".parse().unwrap(),
        ])
        .unwrap();
    let mut run = |pkt: Pkt<'_>| node.tc.test_run_prefilter(&pkt.frame()).unwrap();
    assert_eq!(
        run(Pkt::tcp(v4(203, 0, 113, 9), 40000, fe.ip, NODE_PORT, SYN)),
        XDP_DROP
    );
    // Whatever it is sent to, and whatever it is.
    assert_eq!(
        run(Pkt::udp(
            v4(203, 0, 113, 200),
            53,
            v4(10, 9, 9, 9),
            53,
            b"x"
        )),
        XDP_DROP
    );
    assert_eq!(
        run(Pkt::tcp(
            "2001:db8:bad:1::7".parse().unwrap(),
            40000,
            NODE6.into(),
            NODE_PORT,
            ACK
        )),
        XDP_DROP
    );
    assert_eq!(
        run(Pkt::tcp(CLIENT4.into(), 40000, fe.ip, NODE_PORT, SYN)),
        XDP_PASS
    );
    assert_eq!(
        run(Pkt::tcp(
            CLIENT6.into(),
            40000,
            NODE6.into(),
            NODE_PORT,
            SYN
        )),
        XDP_PASS
    );
    assert_eq!(node.stat(Outcome::XdpDropDenied), 3);

    // The list is replaced, not appended to.
    node.tc
        .deny_list()
        .set(&["198.51.100.0/24".parse().unwrap()])
        .unwrap();
    assert_eq!(node.tc.deny_list().entries().unwrap().len(), 1);
    let verdict = node
        .tc
        .test_run_prefilter(&Pkt::tcp(v4(203, 0, 113, 9), 40000, fe.ip, NODE_PORT, SYN).frame())
        .unwrap();
    assert_eq!(verdict, XDP_PASS);
}

#[test]
fn load_balancer_source_ranges_are_enforced_at_the_edge() {
    let (mut node, _) = node_with_local_backends();
    let lb = source_ranged_lb4();
    node.add_backend(9, backend4(9), 8080, PROTO_TCP, true);
    node.set_frontend(&lb, 9, &[9]);
    node.maps
        .allow_source_range(lb.service_id, v4(198, 51, 100, 0), 24)
        .unwrap();
    let mut run = |pkt: Pkt<'_>| node.tc.test_run_prefilter(&pkt.frame()).unwrap();
    // Every packet from outside the ranges, not only the first of a flow.
    for flags in [SYN, ACK] {
        assert_eq!(
            run(Pkt::tcp(v4(192, 0, 2, 99), 41000, lb.ip, lb.port, flags)),
            XDP_DROP
        );
    }
    assert_eq!(
        run(Pkt::tcp(CLIENT4.into(), 41000, lb.ip, lb.port, SYN)),
        XDP_PASS
    );
    // Another port or protocol of the address is no such frontend.
    assert_eq!(
        run(Pkt::tcp(v4(192, 0, 2, 99), 41000, lb.ip, 80, SYN)),
        XDP_PASS
    );
    assert_eq!(
        run(Pkt::udp(v4(192, 0, 2, 99), 41000, lb.ip, lb.port, b"x")),
        XDP_PASS
    );
    assert_eq!(node.stat(Outcome::XdpDropSourceRange), 2);
}

#[test]
fn frames_it_cannot_read_pass() {
    let (mut node, fe) = node_with_local_backends();
    node.tc
        .deny_list()
        .set(&["0.0.0.0/0".parse().unwrap()])
        .unwrap();
    let frame = Pkt::tcp(CLIENT4.into(), 40000, fe.ip, NODE_PORT, SYN).frame();
    // An Ethernet header and part of an IPv4 header.
    assert_eq!(node.tc.test_run_prefilter(&frame[..20]).unwrap(), XDP_PASS);
    // ARP.
    let mut arp = frame.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(node.tc.test_run_prefilter(&arp).unwrap(), XDP_PASS);
    assert_eq!(node.tc.test_run_prefilter(&frame).unwrap(), XDP_DROP);
}
