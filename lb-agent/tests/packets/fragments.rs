//! IPv4 and IPv6 fragments following their first fragment's translation,
//! and IPv6 extension headers walked to the L4 header.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::net::PROTO_UDP;

use crate::{
    fixture::{
        backend4, backend6, nodeport, Frontend, Node, CLIENT4, CLIENT6, NODE4, NODE6, NODE_PORT,
        TC_ACT_OK,
    },
    frames::{fold, pseudo_sum, sum16, Pkt},
};

/// Splits `pkt` into two IPv4 fragments, the first with `split` bytes of
/// the L4 datagram (a multiple of 8).
fn fragments_v4(pkt: &Pkt<'_>, id: u16, split: usize) -> [Vec<u8>; 2] {
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..34], &full[34..]);
    let part = |offset: usize, data: &[u8], more: bool| {
        let mut header = ip.to_vec();
        header[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        header[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 };
        header[6..8].copy_from_slice(&(flags | (offset / 8) as u16).to_be_bytes());
        header[10..12].copy_from_slice(&[0, 0]);
        let csum = fold(sum16(&header));
        header[10..12].copy_from_slice(&csum.to_be_bytes());
        [eth, &header, data].concat()
    };
    [
        part(0, &l4[..split], true),
        part(split, &l4[split..], false),
    ]
}

/// Splits `pkt` into two IPv6 fragments (fragment header), the first with
/// `split` bytes of the L4 datagram (a multiple of 8).
fn fragments_v6(pkt: &Pkt<'_>, id: u32, split: usize) -> [Vec<u8>; 2] {
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..54], &full[54..]);
    let part = |offset: usize, data: &[u8], more: bool| {
        let mut header = ip.to_vec();
        header[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        header[6] = 44;
        let mut fragment = vec![pkt.proto, 0];
        fragment.extend((offset as u16 | u16::from(more)).to_be_bytes());
        fragment.extend(id.to_be_bytes());
        [eth, &header, &fragment, data].concat()
    };
    [
        part(0, &l4[..split], true),
        part(split, &l4[split..], false),
    ]
}

/// Addresses and L4 bytes of a fragment the program left (IPv4 header
/// checksum checked).
fn fragment_parts(frame: &[u8]) -> (IpAddr, IpAddr, Vec<u8>) {
    if frame[12..14] == [0x08, 0x00] {
        let ip = &frame[14..34];
        assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        (src, dst, frame[34..14 + total].to_vec())
    } else {
        let ip = &frame[14..54];
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        (src, dst, frame[62..54 + len].to_vec())
    }
}

/// Runs both fragments of a UDP datagram to a NodePort through ingress and
/// checks that both reach the backend and that the reassembled datagram has
/// the backend's port and a valid checksum.
fn assert_fragments_translated(node: &mut Node, fragments: [Vec<u8>; 2], backend: IpAddr) {
    let mut datagram = Vec::new();
    for (i, fragment) in fragments.iter().enumerate() {
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, fragment).unwrap();
        assert_eq!(verdict, TC_ACT_OK, "fragment {i}");
        let (src, dst, data) = fragment_parts(&out);
        assert_eq!(dst, backend, "fragment {i}");
        let client: IpAddr = if backend.is_ipv4() {
            CLIENT4.into()
        } else {
            CLIENT6.into()
        };
        assert_eq!(src, client, "fragment {i}");
        datagram.extend(data);
    }
    assert_eq!(u16::from_be_bytes([datagram[2], datagram[3]]), 8080);
    let client: IpAddr = if backend.is_ipv4() {
        CLIENT4.into()
    } else {
        CLIENT6.into()
    };
    assert_eq!(
        fold(pseudo_sum(client, backend, PROTO_UDP, datagram.len()) + sum16(&datagram)),
        0,
        "bad checksum of the reassembled datagram"
    );
}

/// A fragmented UDP datagram to a NodePort: the first fragment is
/// translated with its L4 header, the later one (no L4 header) follows it to
/// the same backend; a later fragment whose first was never seen passes
/// untouched.
#[test]
fn fragmented_udp_datagrams_follow_their_first_fragment() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_UDP, true);
    node.add_backend(2, backend6(1), 8080, PROTO_UDP, true);
    let fe4 = nodeport(NODE4.into(), PROTO_UDP);
    let fe6 = Frontend {
        service_id: 8,
        ..nodeport(NODE6.into(), PROTO_UDP)
    };
    node.set_frontend(&fe4, 1, &[1]);
    node.set_frontend(&fe6, 2, &[2]);
    let payload = [7u8; 64];

    let v4 = Pkt::udp(CLIENT4.into(), 43000, fe4.ip, NODE_PORT, &payload);
    assert_fragments_translated(&mut node, fragments_v4(&v4, 0x1234, 32), backend4(1));
    let v6 = Pkt::udp(CLIENT6.into(), 43000, fe6.ip, NODE_PORT, &payload);
    assert_fragments_translated(&mut node, fragments_v6(&v6, 0xabcd, 32), backend6(1));

    let [_, orphan] = fragments_v4(&v4, 0x9999, 32);
    let (verdict, out) = node.tc.test_run(TcHook::Ingress, &orphan).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, orphan);
}

/// IPv6 extension headers before the L4 header (here destination options)
/// are walked: the packet is translated like one without them.
#[test]
fn ipv6_extension_headers_are_walked() {
    let mut node = Node::new();
    node.add_backend(2, backend6(1), 8080, PROTO_UDP, true);
    let fe6 = nodeport(NODE6.into(), PROTO_UDP);
    node.set_frontend(&fe6, 1, &[2]);
    let payload = [9u8; 16];
    let pkt = Pkt::udp(CLIENT6.into(), 44000, fe6.ip, NODE_PORT, &payload);
    let full = pkt.frame();
    let (eth, ip, l4) = (&full[..14], &full[14..54], &full[54..]);
    let mut header = ip.to_vec();
    header[4..6].copy_from_slice(&((8 + l4.len()) as u16).to_be_bytes());
    header[6] = 60;
    // Destination options: next header UDP, length 0 (8 bytes), PadN.
    let options = [PROTO_UDP, 0, 1, 4, 0, 0, 0, 0];
    let frame = [eth, &header, &options, l4].concat();
    let (verdict, out) = node.tc.test_run(TcHook::Ingress, &frame).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let dst = IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
    assert_eq!(dst, backend6(1));
    let datagram = &out[62..];
    assert_eq!(u16::from_be_bytes([datagram[2], datagram[3]]), 8080);
    assert_eq!(
        fold(pseudo_sum(CLIENT6.into(), backend6(1), PROTO_UDP, datagram.len()) + sum16(datagram)),
        0,
        "bad UDP checksum"
    );
}
