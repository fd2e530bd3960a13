//! Conntrack: flows kept on their backend, a completed close deleting the
//! flow, garbage collection, a full table evicting, an evicted partner entry
//! restored, and state kept across a reload or carried over from an older
//! agent's layout.

// Creating an older agent's pinned map takes a raw bpf(2) call.
#![allow(
    unsafe_code,
    reason = "raw bpf(2) calls to create an older layout's map"
)]

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{HashMap, MapData};
use lb_agent::{
    kernel::tc_programs::{TcHook, TcOptions, TcPrograms},
    node::clock::boottime_ns,
};
use lb_common::{
    conntrack::{
        CtKey, CtValue, CtValueV2, CT_FLAG_REPLY, CT_FLAG_REWRITE_DST, CT_FLAG_REWRITE_SRC,
        CT_STATE_CLOSING, CT_STATE_ESTABLISHED, NEXT_HOP_NONE,
    },
    maps,
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN},
    outcome::Outcome,
};
use lb_core::addr::{addr_from_ip, ip_from_addr};

use crate::{
    fixture::{
        backend4, fresh_dir, isolated, node_with_local_backends, nodeport, pinned_hash, Node,
        CLIENT4, NODE4, NODE_PORT, TABLE_SIZE, TC_ACT_OK, TC_ACT_SHOT,
    },
    frames::{parse, Pkt},
};

#[test]
fn conntrack_keeps_a_flow_on_its_backend() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, SYN);
    let (_, first) = node.ingress(&syn);
    let (_, again) = node.ingress(&syn);
    assert_eq!(first.dst, again.dst);
    assert_eq!(node.stat(Outcome::NewFlow), 1);
    // Two entries, client side and backend side, unconfirmed until the
    // handshake completes.
    assert_eq!(node.tc.pending_entries().unwrap().len(), 2);
    assert!(node.tc.conntrack_entries().unwrap().is_empty());
    node.handshake_local(&syn);
    assert_eq!(node.stat(Outcome::FlowConfirmed), 1);
    assert!(node.tc.pending_entries().unwrap().is_empty());
    let entries = node.tc.conntrack_entries().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries
            .iter()
            .filter(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
            .count(),
        1
    );

    // A new table generation without this flow's backend but with two new
    // ones: the established flow stays (conntrack before Maglev) as long as
    // its backend exists.
    node.add_backend(4, backend4(4), 8080, PROTO_TCP, true);
    node.add_backend(5, backend4(5), 8080, PROTO_TCP, true);
    let others: Vec<u32> = (1..=5u32)
        .filter(|&i| backend4(i as u8) != first.dst)
        .collect();
    node.set_frontend(&fe, 2, &others);
    node.maps.delete_table(1, TABLE_SIZE).unwrap();
    let ack = Pkt::tcp(CLIENT4.into(), 41000, fe.ip, NODE_PORT, ACK);
    let (verdict, kept) = node.ingress(&ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(kept.dst, first.dst);

    // Once the backend is deleted (its endpoint left the slice), the flow
    // ends: its next segment is dropped, not sent mid-stream to a backend
    // that never saw the handshake; a new SYN on the same tuple gets a
    // backend of the table.
    let gone = (1..=3u32)
        .find(|&i| backend4(i as u8) == first.dst)
        .unwrap();
    node.backends.remove(&gone).unwrap();
    let (verdict, _) = node.ingress(&ack);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropNoConnection), 1);
    let (verdict, moved) = node.ingress(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert!(others.iter().any(|&i| backend4(i as u8) == moved.dst));
}

#[test]
fn a_completed_close_deletes_the_flow_and_a_reset_does_not() {
    isolated(|| {
        // A remote backend: the flow is SNATed, so both entries carry ports
        // the datapath chose and deleting them must find both.
        let mut node = Node::new();
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        let client =
            |sport: u16, flags: u8| Pkt::tcp(CLIENT4.into(), sport, fe.ip, NODE_PORT, flags);

        let (_, fwd) = node.ingress(&client(45000, SYN));
        let backend = |flags: u8| Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd.sport, flags);
        node.ingress(&backend(SYN | ACK));
        node.ingress(&client(45000, ACK));
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        // The client closes, the backend's FIN rides on its ACK; the
        // client's last ACK is still translated, then the flow is gone.
        node.ingress(&client(45000, FIN | ACK));
        let (_, reply) = node.ingress(&backend(FIN | ACK));
        assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        let (verdict, last) = node.ingress(&client(45000, ACK));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            (last.dst, last.dport, last.sport),
            (backend4(1), 8080, fwd.sport)
        );
        assert!(node.tc.conntrack_entries().unwrap().is_empty());

        // A RST (which anyone on the path can forge) only starts the
        // closing timeout.
        node.ingress(&client(45001, SYN));
        node.ingress(&client(45001, RST));
        let entries = node.flow_entries();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|(_, v)| v.state == CT_STATE_CLOSING));
    });
}

#[test]
fn conntrack_gc_deletes_expired_entries() {
    let (mut node, fe) = node_with_local_backends();
    for sport in 0..5u16 {
        node.ingress(&Pkt::tcp(
            CLIENT4.into(),
            50000 + sport,
            fe.ip,
            NODE_PORT,
            SYN,
        ));
    }
    // One flow completes its handshake: established, long timeout.
    node.handshake_local(&Pkt::tcp(CLIENT4.into(), 50000, fe.ip, NODE_PORT, SYN));
    let now = boottime_ns().unwrap();
    let report = node.tc.conntrack_gc(now).unwrap();
    assert_eq!(
        (report.live, report.pending_live, report.deleted),
        (2, 8, 0)
    );
    assert_eq!((report.capacity, report.pending_capacity), (4096, 4096));
    // 11 s later the unconfirmed flows (10 s without a packet) are gone.
    let report = node.tc.conntrack_gc(now + 11_000_000_000).unwrap();
    assert_eq!(
        (report.live, report.pending_live, report.pending_deleted),
        (2, 0, 8)
    );
    // 6 hours later the established one is too.
    let report = node.tc.conntrack_gc(now + 21_601_000_000_000).unwrap();
    assert_eq!((report.live, report.deleted), (0, 2));
}

/// The collector walks the whole table in the kernel: with live and expired
/// entries mixed, exactly the expired ones go.
#[test]
fn conntrack_gc_deletes_only_expired_entries_of_a_large_table() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 65_536,
        pending_capacity: 4096,
        ..TcOptions::default()
    });
    let mut conntrack: HashMap<MapData, CtKey, CtValue> = pinned_hash(&node.dir, maps::CONNTRACK);
    let now = boottime_ns().unwrap();
    let (live, expired) = (20_000u32, 40_000u32);
    for i in 0..live + expired {
        let key = CtKey {
            saddr: addr_from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
            daddr: addr_from_ip(NODE4.into()),
            sport: 1000u16.to_be(),
            dport: NODE_PORT.to_be(),
            proto: PROTO_UDP,
            pad: [0; 3],
        };
        let value = CtValue {
            new_saddr: key.saddr,
            new_daddr: addr_from_ip(backend4(1)),
            new_sport: key.sport,
            new_dport: 8080u16.to_be(),
            flags: 0,
            state: 0,
            fins: 0,
            hop: NEXT_HOP_NONE,
            service_id: 7,
            backend_id: 1,
            // UDP entries live 60 s after their last packet.
            last_seen_ns: if i < live { now } else { now - 61_000_000_000 },
            hop_ifindex: 0,
            hop_macs: [0; 12],
            peer_ack: 0,
            pad: 0,
        };
        conntrack.insert(key, value, 0).unwrap();
    }
    let started = std::time::Instant::now();
    let report = node.tc.conntrack_gc(now).unwrap();
    eprintln!(
        "in-kernel conntrack GC over {} entries: {:?}",
        live + expired,
        started.elapsed()
    );
    assert_eq!(
        (report.live, report.deleted),
        (live as usize, expired as usize)
    );
    assert_eq!(conntrack.keys().count(), live as usize);
}

#[test]
fn a_full_table_of_unconfirmed_flows_evicts_instead_of_failing() {
    let mut node = Node::with_options(&TcOptions {
        conntrack_capacity: 64,
        pending_capacity: 64,
        ..TcOptions::default()
    });
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, true);
    let fe = nodeport(NODE4.into(), PROTO_TCP);
    node.set_frontend(&fe, 1, &[1]);
    for sport in 0..200u16 {
        let (verdict, out) = node.ingress(&Pkt::tcp(
            CLIENT4.into(),
            1000 + sport,
            fe.ip,
            NODE_PORT,
            SYN,
        ));
        assert_eq!((verdict, out.dst), (TC_ACT_OK, backend4(1)));
    }
    let report = node.tc.conntrack_gc(boottime_ns().unwrap()).unwrap();
    assert!(report.pending_live <= 64, "{report:?}");
    assert_eq!(report.pending_capacity, 64);
}

/// An entry the LRU evicted under pressure while its partner lived on is put
/// back by the first packet of the flow a second or more later: here the
/// client's next segment after the reply entry vanished, so the server's
/// answer is translated again instead of leaving the connection stuck.
#[test]
fn an_evicted_partner_entry_is_restored() {
    let (mut node, fe) = node_with_local_backends();
    let mut conntrack: HashMap<MapData, CtKey, CtValue> = pinned_hash(&node.dir, maps::CONNTRACK);
    let syn = Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, SYN);
    let forward = node.handshake_local(&syn);
    let reply_key = conntrack
        .iter()
        .map(Result::unwrap)
        .find(|(_, v)| v.flags & CT_FLAG_REPLY != 0)
        .unwrap()
        .0;
    let reply_value = conntrack.get(&reply_key, 0).unwrap();
    conntrack.remove(&reply_key).unwrap();

    std::thread::sleep(std::time::Duration::from_millis(1050));
    node.ingress(&Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, ACK));
    let restored = conntrack.get(&reply_key, 0).unwrap();
    assert_eq!(
        (
            restored.new_saddr,
            restored.new_sport,
            restored.new_daddr,
            restored.new_dport,
            restored.flags,
            restored.backend_id
        ),
        (
            reply_value.new_saddr,
            reply_value.new_sport,
            reply_value.new_daddr,
            reply_value.new_dport,
            reply_value.flags,
            reply_value.backend_id
        )
    );
    let answer = Pkt::tcp(forward.dst, 8080, CLIENT4.into(), 45000, ACK);
    let (verdict, out) = node.egress(&answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((out.src, out.sport), (fe.ip, NODE_PORT));
}

#[test]
fn reloading_reuses_pinned_maps_and_adopts_state() {
    let (mut node, fe) = node_with_local_backends();
    let syn = Pkt::tcp(CLIENT4.into(), 51000, fe.ip, NODE_PORT, SYN);
    let (_, first) = node.ingress(&syn);
    // A second load (an agent upgrade) sees the same frontends and flows.
    let mut again = TcPrograms::load(&node.dir, &TcOptions::default())
        .unwrap()
        .0;
    let (_, out) = again.test_run(TcHook::Ingress, &syn.frame()).unwrap();
    assert_eq!(parse(&out).dst, first.dst);
    assert_eq!(again.pending_entries().unwrap().len(), 2);
    assert_eq!(ip_from_addr(&addr_from_ip(first.dst)), first.dst);
}

/// The `bpf` system call with `attr`, a `union bpf_attr` for `command`.
fn bpf_syscall<T>(command: libc::c_long, attr: &[T]) -> libc::c_long {
    // SAFETY: the attribute buffer is at least as large as the kernel reads
    // for the commands used here, and it and what it points to outlive the
    // call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// Creates an LRU hash map pinned at `path`, as an older agent's object
/// would have: aya creates maps only from objects.
fn create_pinned_lru(path: &std::path::Path, key_size: u32, value_size: u32, max_entries: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    // For BPF_MAP_CREATE: type, key and value sizes, capacity, the rest zero.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_LRU_HASH, key_size, value_size, max_entries]);
    let fd = bpf_syscall(BPF_MAP_CREATE, &create);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // For BPF_OBJ_PIN: the path pointer, then the map's descriptor.
    let pin = [c_path.as_ptr() as u64, fd as u64, 0, 0];
    let ret = bpf_syscall(BPF_OBJ_PIN, &pin);
    assert_eq!(ret, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor this function owns; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// A conntrack value in the older layout.
fn older(value: &CtValue) -> CtValueV2 {
    CtValueV2 {
        new_saddr: value.new_saddr,
        new_daddr: value.new_daddr,
        new_sport: value.new_sport,
        new_dport: value.new_dport,
        flags: value.flags,
        state: value.state,
        fins: value.fins,
        hop: value.hop,
        service_id: value.service_id,
        backend_id: value.backend_id,
        last_seen_ns: value.last_seen_ns,
        hop_ifindex: value.hop_ifindex,
        hop_macs: value.hop_macs,
    }
}

/// An upgrade from an agent whose conntrack had the older layout keeps its
/// flows: a SNATed flow's reply is still restored to its client, and a flow
/// the older programs begin after the new agent loaded is carried over
/// once the new programs are attached.
#[test]
fn an_older_agents_conntrack_is_carried_over() {
    isolated(|| {
        let dir = fresh_dir();
        fs::create_dir_all(&dir).unwrap();
        create_pinned_lru(&dir.join(maps::CONNTRACK_V2), 40, 72, 1024);
        let mut older_map: HashMap<MapData, CtKey, CtValueV2> =
            pinned_hash(&dir, maps::CONNTRACK_V2);
        let now = boottime_ns().unwrap();
        // A flow of the older agent: client -> NodePort, SNATed to a remote
        // backend from port 61234.
        let flow = |sport: u16, snat_port: u16| {
            let key = CtKey::new(
                addr_from_ip(CLIENT4.into()),
                addr_from_ip(NODE4.into()),
                sport.to_be(),
                NODE_PORT.to_be(),
                PROTO_TCP,
            );
            let forward = CtValue {
                new_saddr: addr_from_ip(NODE4.into()),
                new_daddr: addr_from_ip(backend4(1)),
                new_sport: snat_port.to_be(),
                new_dport: 8080u16.to_be(),
                flags: CT_FLAG_REWRITE_SRC | CT_FLAG_REWRITE_DST,
                state: CT_STATE_ESTABLISHED,
                fins: 0,
                hop: NEXT_HOP_NONE,
                service_id: 7,
                backend_id: 1,
                last_seen_ns: now,
                hop_ifindex: 0,
                hop_macs: [0; 12],
                peer_ack: 0,
                pad: 0,
            };
            let reply_key = forward.apply(&key).reversed();
            [(key, forward), (reply_key, forward.partner(&key, now))]
        };
        for (key, value) in flow(45000, 61234) {
            older_map.insert(key, older(&value), 0).unwrap();
        }

        let mut node = Node::load_in(dir, &TcOptions::default());
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 2);
        let reply = Pkt::tcp(backend4(1), 8080, NODE4.into(), 61234, ACK);
        let (verdict, restored) = node.ingress(&reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((restored.src, restored.sport), (fe.ip, NODE_PORT));
        assert_eq!(
            (restored.dst, restored.dport),
            (IpAddr::from(CLIENT4), 45000)
        );
        assert_eq!(node.stat(Outcome::NewFlow), 0);

        // The older programs start a flow before the new ones replace them.
        for (key, value) in flow(45001, 61235) {
            older_map.insert(key, older(&value), 0).unwrap();
        }
        assert_eq!(node.tc.finish_conntrack_carry_over().unwrap(), 2);
        assert!(!node.dir.join(maps::CONNTRACK_V2).exists());
        let reply = Pkt::tcp(backend4(1), 8080, NODE4.into(), 61235, ACK);
        let (_, restored) = node.ingress(&reply);
        assert_eq!(
            (restored.dst, restored.dport),
            (IpAddr::from(CLIENT4), 45001)
        );
        assert_eq!(node.tc.conntrack_entries().unwrap().len(), 4);
        // Once done, nothing more to carry.
        assert_eq!(node.tc.finish_conntrack_carry_over().unwrap(), 0);
    });
}
