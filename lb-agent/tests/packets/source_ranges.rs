//! loadBalancerSourceRanges: only listed clients are admitted, and the drops
//! are reported with their tuple, boundedly per CPU and second.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    events::REPORTS_PER_SECOND,
    net::{PROTO_TCP, TCP_SYN as SYN},
    outcome::Outcome,
    service::SERVICE_FLAG_SOURCE_RANGES,
};
use lb_core::addr::{addr_from_ip, ip_from_addr};

use crate::{
    fixture::{backend4, backend6, v4, Frontend, Node, CLIENT4, CLIENT6, TC_ACT_OK, TC_ACT_SHOT},
    frames::{fold, ip_frame, sum16, Pkt},
};

/// A LoadBalancer frontend (service 12) that admits listed sources only.
pub(crate) fn source_ranged_lb4() -> Frontend {
    Frontend {
        ip: v4(203, 0, 113, 50),
        port: 443,
        proto: PROTO_TCP,
        service_id: 12,
        flags: SERVICE_FLAG_SOURCE_RANGES,
        affinity_timeout_s: 0,
    }
}

#[test]
fn source_ranges_allow_listed_clients_only() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    node.add_backend(2, backend6(1), 8080, PROTO_TCP, true);
    let lb4 = source_ranged_lb4();
    let lb6 = Frontend {
        ip: "2001:db8:ffff::50".parse().unwrap(),
        ..lb4
    };
    node.set_frontend(&lb4, 1, &[1]);
    node.set_frontend(&lb6, 2, &[2]);
    node.maps
        .allow_source_range(12, v4(198, 51, 100, 0), 24)
        .unwrap();
    node.maps
        .allow_source_range(12, "2001:db8:c::".parse().unwrap(), 48)
        .unwrap();
    // Another service's range does not apply.
    node.maps
        .allow_source_range(13, v4(203, 0, 113, 0), 24)
        .unwrap();

    let allowed = Pkt::tcp(CLIENT4.into(), 48000, lb4.ip, 443, SYN);
    let (verdict, out) = node.ingress(&allowed);
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend4(1)));
    let allowed6 = Pkt::tcp(CLIENT6.into(), 48000, lb6.ip, 443, SYN);
    let (verdict, out) = node.ingress(&allowed6);
    assert_eq!((verdict, out.dst), (TC_ACT_OK, backend6(1)));

    let denied = Pkt::tcp(v4(203, 0, 113, 9), 48001, lb4.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &denied).0, TC_ACT_SHOT);
    let denied6 = Pkt::tcp("2001:db8:d::1".parse().unwrap(), 48001, lb6.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &denied6).0, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropSourceRange), 2);
    // Each drop is reported with its tuple, frontend and reason; the
    // admitted flows are not.
    let drops = node.tc.drain_drops();
    let reported: Vec<(IpAddr, u16, IpAddr, u16, u32, u32)> = drops
        .iter()
        .map(|d| {
            (
                ip_from_addr(&d.tuple.saddr),
                u16::from_be(d.tuple.sport),
                ip_from_addr(&d.tuple.daddr),
                u16::from_be(d.tuple.dport),
                d.reason,
                d.service_id,
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            (
                denied.src,
                48001,
                lb4.ip,
                443,
                Outcome::DropSourceRange.index(),
                12
            ),
            (
                denied6.src,
                48001,
                lb6.ip,
                443,
                Outcome::DropSourceRange.index(),
                12
            ),
        ]
    );
    assert!(drops
        .iter()
        .all(|d| d.tuple.proto == PROTO_TCP && d.time_ns > 0));
    assert!(node.tc.drain_drops().is_empty(), "drained once");

    node.maps
        .remove_source_range(12, v4(198, 51, 100, 0), 24)
        .unwrap();
    let new_flow = Pkt::tcp(CLIENT4.into(), 48002, lb4.ip, 443, SYN);
    assert_eq!(node.run(TcHook::Ingress, &new_flow).0, TC_ACT_SHOT);
    assert_eq!(node.tc.drain_drops().len(), 1);
    assert_eq!(node.tc.drops_lost().unwrap(), 0);
}

/// A flood of dropped packets sends a bounded number of reports per CPU and
/// second; the rest are counted, not queued.
#[test]
fn drop_reports_are_bounded_per_cpu_and_second() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    let lb = source_ranged_lb4();
    node.set_frontend(&lb, 1, &[1]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let flood = REPORTS_PER_SECOND * cpus + 50;
    for port in 0..flood {
        let syn = Pkt::tcp(CLIENT4.into(), 10_000 + port as u16, lb.ip, 443, SYN);
        assert_eq!(node.run(TcHook::Ingress, &syn).0, TC_ACT_SHOT);
    }
    assert_eq!(node.stat(Outcome::DropSourceRange), flood);
    let reported = node.tc.drain_drops().len() as u64;
    let lost = node.tc.drops_lost().unwrap();
    assert!(reported <= REPORTS_PER_SECOND * cpus, "{reported} reports");
    assert!(reported >= REPORTS_PER_SECOND, "{reported} reports");
    assert_eq!(reported + lost, flood);
}

/// The IPv4 `frame` with its fragment offset field set to `frag_off` and
/// its header checksum fixed.
fn with_frag_off(mut frame: Vec<u8>, frag_off: u16) -> Vec<u8> {
    frame[20..22].copy_from_slice(&frag_off.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let csum = fold(sum16(&frame[14..34]));
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// Issue 22, item 9: a packet to a LoadBalancer IP whose headers the
/// parser cannot read (a later fragment whose first was not seen, a TCP
/// header cut short) would reach the stack untranslated, past the source
/// ranges: it is dropped and counted. The same to a node address, or ICMP
/// to the LoadBalancer IP, passes.
#[test]
fn unreadable_packets_to_a_load_balancer_ip_are_dropped() {
    let mut node = Node::new();
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    let lb = source_ranged_lb4();
    node.set_frontend(&lb, 1, &[1]);
    node.tc
        .set_frontend_addresses(&[addr_from_ip(lb.ip)].into())
        .unwrap();
    let later_fragment = with_frag_off(
        Pkt::udp(CLIENT4.into(), 48000, lb.ip, 443, &[0; 32]).frame(),
        0x0020,
    );
    let (verdict, _) = node.tc.test_run(TcHook::Ingress, &later_fragment).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    let mut cut = Pkt::tcp(CLIENT4.into(), 48000, lb.ip, 443, SYN).frame();
    cut.truncate(14 + 20 + 12);
    cut[16..18].copy_from_slice(&32u16.to_be_bytes());
    let (verdict, _) = node.tc.test_run(TcHook::Ingress, &cut).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropUnparsed), 2);

    let to_node = with_frag_off(
        Pkt::udp(CLIENT4.into(), 48000, v4(192, 0, 2, 10), 443, &[0; 32]).frame(),
        0x0020,
    );
    let (verdict, _) = node.tc.test_run(TcHook::Ingress, &to_node).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    let ping = ip_frame(CLIENT4.into(), lb.ip, 1, &[8, 0, 0, 0, 0, 1, 0, 1]);
    let (verdict, _) = node.tc.test_run(TcHook::Ingress, &ping).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(node.stat(Outcome::DropUnparsed), 2);
}

/// `mapCapacities` sizes maps without a setting of their own when they are
/// created, and the plans read the capacities back from the maps (a map an
/// earlier agent pinned keeps its own).
#[test]
fn map_capacities_size_new_maps_and_plans_read_them_back() {
    use lb_agent::kernel::{
        capacities::MapCapacities,
        tc_programs::{TcOptions, TcPrograms},
    };
    use lb_common::maps;
    let sized = MapCapacities::new(
        [
            (maps::SOURCE_RANGES.to_owned(), 64),
            (maps::IPCACHE.to_owned(), 1000),
            (maps::POLICY.to_owned(), 2000),
        ]
        .into(),
    )
    .unwrap();
    let mut node = Node::with_options(&TcOptions {
        sized: sized.clone(),
        ..TcOptions::default()
    });
    assert_eq!(node.maps.source_range_capacity().unwrap(), 64);
    let policy = node.tc.policy_maps().unwrap().capacity().unwrap();
    assert_eq!((policy.ipcache, policy.entries), (1000, 2000));

    // A new agent asking for other sizes adopts the pinned maps as they are.
    let bigger = MapCapacities::new([(maps::SOURCE_RANGES.to_owned(), 128)].into()).unwrap();
    let (_, again) = TcPrograms::load(
        &node.dir,
        &TcOptions {
            sized: bigger,
            ..TcOptions::default()
        },
    )
    .unwrap();
    assert_eq!(again.source_range_capacity().unwrap(), 64);
}
