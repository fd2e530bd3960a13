//! Forwarding: the FIB lookup redirecting translated packets to the next
//! hop (and remembering it per flow), and attaching the programs with
//! pinned links a new agent adopts.

use std::fs;

use aya::maps::{HashMap, MapData};
use lb_agent::kernel::tc_programs::{TcHook, TcOptions, TcPrograms};
use lb_common::{
    config::{TcConfig, TC_CONFIG_FIB_REDIRECT},
    conntrack::{CtKey, CtValue, NEXT_HOP_NONE, NEXT_HOP_REDIRECT},
    maps,
    net::{PROTO_TCP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::Outcome,
};
use lb_core::addr::addr_from_ip;

use crate::{
    fixture::{
        backend4, isolated, maglev_pick, node_with_local_backends, pinned_hash, Node, CLIENT4,
        NODE4, NODE6, NODE_PORT, SEED, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    frames::{fold, parse, sum16, Pkt},
};

/// Runs `ip` with `args` in the calling thread's network namespace.
fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args}");
}

#[test]
fn fib_lookup_redirects_to_the_next_hop() {
    // BPF_PROG_TEST_RUN runs the packet in the caller's network namespace:
    // give this thread its own, with a route and a neighbour for the backend.
    isolated(|| {
        ip("link set lo up");
        ip("link add lbfib0 type veth peer name lbfib1");
        ip("link set lbfib0 address 02:00:00:00:00:01");
        ip("addr add 10.244.1.254/24 dev lbfib0");
        ip("link set lbfib0 up");
        ip("link set lbfib1 up");
        ip("neigh replace 10.244.1.1 lladdr 02:00:00:00:00:aa dev lbfib0 nud permanent");
        fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").unwrap();

        let (mut node, fe) = node_with_local_backends();
        node.tc
            .set_config(&TcConfig {
                maglev_seed: SEED,
                snat_v4: addr_from_ip(NODE4.into()),
                snat_v6: addr_from_ip(NODE6.into()),
                flags: TC_CONFIG_FIB_REDIRECT,
                policy_mark: 0,
            })
            .unwrap();
        // Only backend 1 has a neighbour: find flows Maglev sends there and
        // elsewhere.
        let table = node.table(&[1, 2, 3]);
        let backend_of = |sport: u16| maglev_pick(&table, CLIENT4.into(), sport);
        let sport = (52000..53000u16).find(|&p| backend_of(p) == 1).unwrap();
        let other_sport = (52000..53000u16).find(|&p| backend_of(p) != 1).unwrap();
        let syn = Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, SYN);
        let (verdict, out) = node.run(TcHook::Ingress, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], [2, 0, 0, 0, 0, 0xaa, 2, 0, 0, 0, 0, 1]);
        assert_eq!(parse(&out).dst, backend4(1));
        // Routed here, so it lost a hop, with a valid header checksum.
        assert_eq!(out[22], 63);
        assert_eq!(fold(sum16(&out[14..34])), 0);
        // Without a neighbour entry yet, bpf_redirect_neigh resolves it
        // (the MAC addresses are filled in on transmit).
        let other = Pkt::tcp(CLIENT4.into(), other_sport, fe.ip, NODE_PORT, SYN);
        let (verdict, out) = node.run(TcHook::Ingress, &other);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], other.frame()[..12]);
        assert_eq!(node.stat(Outcome::FibRedirect), 2);

        // The first flow's entry remembers the answer (a flow whose
        // neighbour was unresolved remembers nothing), so its next packets
        // skip the FIB: a changed neighbour reaches the flow only once its
        // entry is refreshed, at most a second of packets later.
        let hops = |node: &Node| -> Vec<(u8, u32, [u8; 12])> {
            let mut hops: Vec<_> = node
                .flow_entries()
                .into_iter()
                .filter(|(_, v)| v.hop != NEXT_HOP_NONE)
                .map(|(_, v)| (v.hop, v.hop_ifindex, v.hop_macs))
                .collect();
            hops.sort();
            hops
        };
        let lbfib0 = nix::net::if_::if_nametoindex("lbfib0").unwrap();
        let old_macs = [2, 0, 0, 0, 0, 0xaa, 2, 0, 0, 0, 0, 1];
        assert_eq!(hops(&node), [(NEXT_HOP_REDIRECT, lbfib0, old_macs)]);
        // The backend answers, so the client's ACK below confirms the flow;
        // its entries keep their next hop as they move.
        node.run(
            TcHook::Egress,
            &Pkt::tcp(backend4(1), 8080, CLIENT4.into(), sport, SYN | ACK),
        );
        ip("neigh replace 10.244.1.1 lladdr 02:00:00:00:00:bb dev lbfib0 nud permanent");
        let ack = Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, ACK);
        let (verdict, out) = node.run(TcHook::Ingress, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out[..12], old_macs);
        assert_eq!(node.stat(Outcome::FlowConfirmed), 1);
        // Due for a refresh: the packet asks the FIB again.
        let mut conntrack: HashMap<MapData, CtKey, CtValue> =
            pinned_hash(&node.dir, maps::CONNTRACK);
        let key = CtKey::new(
            addr_from_ip(CLIENT4.into()),
            addr_from_ip(fe.ip),
            sport.to_be(),
            NODE_PORT.to_be(),
            PROTO_TCP,
        );
        let mut value = conntrack.get(&key, 0).unwrap();
        value.last_seen_ns -= 2_000_000_000;
        conntrack.insert(key, value, 0).unwrap();
        let (verdict, out) = node.run(TcHook::Ingress, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let new_macs = [2, 0, 0, 0, 0, 0xbb, 2, 0, 0, 0, 0, 1];
        assert_eq!(out[..12], new_macs);
        assert_eq!(hops(&node), [(NEXT_HOP_REDIRECT, lbfib0, new_macs)]);
        assert_eq!(node.stat(Outcome::FibRedirect), 4);

        // A packet with no hop left goes to the stack (which answers it
        // with time exceeded) instead of being redirected.
        let mut last_hop = ack.frame();
        last_hop[22] = 1;
        last_hop[24..26].copy_from_slice(&[0, 0]);
        let csum = fold(sum16(&last_hop[14..34]));
        last_hop[24..26].copy_from_slice(&csum.to_be_bytes());
        let (verdict, out) = node.tc.test_run(TcHook::Ingress, &last_hop).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out[22], 1);
        assert_eq!(node.stat(Outcome::FibRedirect), 4);
    });
}

#[test]
fn attach_pins_links_and_a_new_agent_adopts_them() {
    use aya::programs::{SchedClassifier, TcAttachType};
    isolated(|| {
        ip("link add lbatt0 type veth peer name lbatt1");
        let attached = |kind| SchedClassifier::query_tcx("lbatt0", kind).unwrap().1.len();
        let mut node = Node::new();
        node.tc.attach("lbatt0", &TcHook::UPLINK).unwrap();
        assert!(node.dir.join("links/tc_lbatt0_lb_ingress").exists());
        assert!(node.dir.join("links/tc_lbatt0_lb_egress").exists());
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 1);
        // Unpinning releases a link when bpffs frees the inode, after an RCU
        // grace period: wait for it, boundedly.
        let settle = |ingress: usize, egress: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while (
                attached(TcAttachType::Ingress),
                attached(TcAttachType::Egress),
            ) != (ingress, egress)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        // A restarted agent updates the pinned links in place.
        let mut again = TcPrograms::load(&node.dir, &TcOptions::default())
            .unwrap()
            .0;
        again.attach("lbatt0", &TcHook::UPLINK).unwrap();
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 1);
        // One that finds a pod there instead attaches the pod programs and
        // drops the uplink's links.
        again.attach("lbatt0", &TcHook::POD).unwrap();
        drop(again);
        assert!(node.dir.join("links/tc_lbatt0_lb_pod_ingress").exists());
        assert!(node.dir.join("links/tc_lbatt0_lb_pod_egress").exists());
        assert!(!node.dir.join("links/tc_lbatt0_lb_ingress").exists());
        assert!(!node.dir.join("links/tc_lbatt0_lb_egress").exists());
        settle(1, 1);
        assert_eq!(attached(TcAttachType::Ingress), 1);
        assert_eq!(attached(TcAttachType::Egress), 1);
        node.tc.detach("lbatt0").unwrap();
        settle(0, 0);
        assert_eq!(attached(TcAttachType::Ingress), 0);
        assert_eq!(attached(TcAttachType::Egress), 0);
    });
}
