//! A packet fuzzer through `BPF_PROG_TEST_RUN`: valid frames of a NodePort's
//! flows (TCP, UDP, IPv6, ICMP errors about a flow) mutated at random
//! (truncated, bytes flipped in the headers, header lengths, versions and
//! protocols rewritten, garbage appended) and run through the uplink
//! programs. Whatever comes in, the program answers a verdict tc knows,
//! leaves alone any frame a strict parser written here cannot read as a
//! flow, never changes conntrack for an ICMP error, and counts every drop.
//! Seeded: a failure reproduces.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::{Counted, Outcome},
};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{
    fixture::{
        backend4, backend6, node_with_local_backends, nodeport, Node, CLIENT4, CLIENT6, NODE6,
        NODE_PORT, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    frames::Pkt,
    icmp_errors::icmp_error,
};

/// Mutated frames per seed.
const ROUNDS: usize = 4_000;
/// The fuzzer's seeds.
const SEEDS: [u64; 3] = [0x6c62_6675_7a7a, 7, 0x5eed];

/// Whether a strict reading of `frame` finds a TCP or UDP packet with its
/// whole header (IPv4, or IPv6 with at most four extension headers), or a
/// later fragment (translated as its first fragment was): only such a frame
/// may come out changed.
fn may_be_rewritten(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let (mut proto, mut l4, ip_end) = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        0x0800 => {
            let Some(ip) = frame.get(14..34) else {
                return false;
            };
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = match usize::from(u16::from_be_bytes([ip[2], ip[3]])) {
                0 => frame.len() - 14,
                total => total,
            };
            if ip[0] >> 4 != 4 || ihl < 20 {
                return false;
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return true;
            }
            (ip[9], 14 + ihl, 14 + total)
        }
        0x86dd => {
            let Some(ip) = frame.get(14..54) else {
                return false;
            };
            let payload = match usize::from(u16::from_be_bytes([ip[4], ip[5]])) {
                0 => frame.len() - 54,
                payload => payload,
            };
            (ip[6], 54, 54 + payload)
        }
        _ => return false,
    };
    for _ in 0..4 {
        let Some(header) = frame.get(l4..l4 + 8) else {
            return false;
        };
        match proto {
            0 | 43 | 60 => l4 += (usize::from(header[1]) + 1) * 8,
            44 if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 => return true,
            44 => l4 += 8,
            _ => break,
        }
        proto = header[0];
    }
    let header = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return false,
    };
    l4 + header <= ip_end && ip_end <= frame.len()
}

fn mutate(rng: &mut StdRng, frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..6) {
            0 => out.truncate(rng.random_range(0..=out.len())),
            1 if !out.is_empty() => {
                let at = rng.random_range(0..out.len().min(80));
                out[at] = rng.random();
            }
            // IPv4 version and header length.
            2 if out.len() > 14 => out[14] = rng.random(),
            // IPv4 protocol, or IPv6 next header.
            3 if out.len() > 23 => {
                let at = if out[12] == 0x86 { 20 } else { 23 };
                out[at] = [0, 1, 6, 17, 43, 44, 58, 60, 132][rng.random_range(0..9)];
            }
            // IPv4 total length / fragment bits, IPv6 payload length.
            4 if out.len() > 22 => {
                let at = rng.random_range(16..22);
                out[at] = rng.random();
            }
            _ => out.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        }
    }
    out
}

/// The tc path's drop counters, summed.
fn drops(node: &Node) -> u64 {
    node.tc
        .stats()
        .unwrap()
        .iter()
        .filter(|(o, _)| o.counted() == Counted::Tc && o.is_drop())
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn mutated_frames_are_left_alone_unless_parsed_and_drops_are_counted() {
    let (mut node, fe) = node_with_local_backends();
    node.add_backend(4, backend4(4), 5353, PROTO_UDP, true);
    let udp = nodeport(fe.ip, PROTO_UDP);
    node.set_frontend(&udp, 2, &[4]);
    node.add_backend(5, backend6(5), 8080, PROTO_TCP, true);
    let v6 = nodeport(NODE6.into(), PROTO_TCP);
    node.set_frontend(&v6, 3, &[5]);
    let flow = Pkt::tcp(CLIENT4.into(), 47000, fe.ip, NODE_PORT, SYN);
    let backend = node.handshake_local(&flow).dst;
    let seeds: Vec<(TcHook, Vec<u8>)> = vec![
        (TcHook::Ingress, flow.frame()),
        (
            TcHook::Ingress,
            Pkt::tcp(CLIENT4.into(), 47000, fe.ip, NODE_PORT, ACK).frame(),
        ),
        (
            TcHook::Ingress,
            Pkt::udp(CLIENT4.into(), 47001, fe.ip, NODE_PORT, b"query").frame(),
        ),
        (
            TcHook::Ingress,
            Pkt::tcp(CLIENT6.into(), 47002, NODE6.into(), NODE_PORT, SYN).frame(),
        ),
        (
            TcHook::Egress,
            Pkt::tcp(backend, 8080, CLIENT4.into(), 47000, ACK).frame(),
        ),
        (
            TcHook::Egress,
            icmp_error(
                backend,
                CLIENT4.into(),
                (3, 3),
                0,
                &Pkt::tcp(CLIENT4.into(), 47000, backend, 8080, ACK),
            ),
        ),
        (
            TcHook::Ingress,
            icmp_error(
                IpAddr::from([203, 0, 113, 1]),
                fe.ip,
                (3, 4),
                1400,
                &Pkt::tcp(fe.ip, NODE_PORT, CLIENT4.into(), 47000, ACK),
            ),
        ),
    ];
    for seed in SEEDS {
        fuzz(&mut node, &seeds, seed);
    }
    assert!(
        node.stat(Outcome::IcmpError) > 0,
        "no ICMP error was translated"
    );
}

fn fuzz(node: &mut Node, seeds: &[(TcHook, Vec<u8>)], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..ROUNDS {
        let (hook, base) = &seeds[round % seeds.len()];
        let frame = mutate(&mut rng, base);
        let flows_before = node.flow_entries();
        let drops_before = drops(node);
        let Ok((verdict, out)) = node.tc.test_run(*hook, &frame) else {
            // The kernel's test run refuses frames shorter than an Ethernet
            // header, or than the fixed IP header their ethertype names.
            let shortest = match frame.get(12..14) {
                Some([0x08, 0x00]) => 34,
                Some([0x86, 0xdd]) => 54,
                _ => 14,
            };
            assert!(
                frame.len() < shortest,
                "seed {seed} round {round}: {frame:02x?}"
            );
            continue;
        };
        assert!(
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict),
            "seed {seed} round {round}: verdict {verdict}"
        );
        if verdict == TC_ACT_SHOT {
            assert!(
                drops(node) > drops_before,
                "seed {seed} round {round}: dropped uncounted: {frame:02x?}"
            );
        }
        let changed = out.get(..frame.len()) != Some(&frame[..]);
        let icmp = match frame.get(12..14) {
            Some([0x08, 0x00]) => frame.get(23) == Some(&1),
            Some([0x86, 0xdd]) => frame.get(20) == Some(&58),
            _ => false,
        };
        if changed && !icmp {
            assert!(
                may_be_rewritten(&frame),
                "seed {seed} round {round}: an unparsable frame was rewritten: {frame:02x?}"
            );
        }
        if icmp {
            let mut before = flows_before;
            let mut after = node.flow_entries();
            before.sort_by_key(|(k, _)| format!("{k:?}"));
            after.sort_by_key(|(k, _)| format!("{k:?}"));
            assert_eq!(
                before, after,
                "seed {seed} round {round}: an ICMP error changed conntrack"
            );
        }
    }
}
