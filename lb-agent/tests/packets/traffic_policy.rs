//! externalTrafficPolicy: Cluster SNATs flows to a backend on another node
//! and restores its replies; Local keeps the client address and drops when
//! the node has no local backend.

use std::net::IpAddr;

use lb_agent::kernel::tc_programs::TcHook;
use lb_common::{
    nat::{SNAT_PORT_COUNT, SNAT_PORT_MIN},
    net::{PROTO_TCP, TCP_ACK as ACK, TCP_SYN as SYN},
    outcome::Outcome,
    service::{SERVICE_FLAG_EXTERNAL_LOCAL, SERVICE_FLAG_NO_LOCAL_BACKENDS},
};

use crate::{
    fixture::{
        backend4, isolated, nodeport, v4, Frontend, Node, CLIENT4, NODE4, NODE_PORT, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    frames::Pkt,
};

#[test]
fn remote_backend_is_snated_and_its_reply_restored() {
    isolated(|| {
        let mut node = Node::new();
        node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
        let fe = nodeport(NODE4.into(), PROTO_TCP);
        node.set_frontend(&fe, 1, &[1]);
        let syn = Pkt::tcp(CLIENT4.into(), 44000, fe.ip, NODE_PORT, SYN);
        let (verdict, fwd) = node.ingress(&syn);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((fwd.dst, fwd.dport), (backend4(1), 8080));
        assert_eq!(fwd.src, IpAddr::from(NODE4));
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MIN + (SNAT_PORT_COUNT - 1)).contains(&fwd.sport));
        // The backend's reply arrives on the uplink, addressed to the node.
        let syn_ack = Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd.sport, SYN | ACK);
        let (verdict, reply) = node.ingress(&syn_ack);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((reply.src, reply.sport), (fe.ip, NODE_PORT));
        assert_eq!((reply.dst, reply.dport), (IpAddr::from(CLIENT4), 44000));

        // A second client flow with the same source port gets its own SNAT port
        // only if the first one is taken for this backend; either way replies
        // map back to the right client.
        let other_client = v4(198, 51, 100, 8);
        let (_, fwd2) = node.ingress(&Pkt::tcp(other_client, 44000, fe.ip, NODE_PORT, SYN));
        let (_, reply2) = node.ingress(&Pkt::tcp(backend4(1), 8080, NODE4.into(), fwd2.sport, ACK));
        assert_eq!((reply2.dst, reply2.dport), (other_client, 44000));
    });
}

#[test]
fn external_traffic_policy_local_preserves_the_client() {
    let mut node = Node::new();
    // Under Local the agent only puts local backends in the table; even one
    // not flagged local is not SNATed.
    node.add_backend(1, backend4(1), 8080, PROTO_TCP, false);
    let fe = Frontend {
        flags: SERVICE_FLAG_EXTERNAL_LOCAL,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    node.set_frontend(&fe, 1, &[1]);
    let (verdict, fwd) = node.ingress(&Pkt::tcp(CLIENT4.into(), 45000, fe.ip, NODE_PORT, SYN));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((fwd.src, fwd.sport), (IpAddr::from(CLIENT4), 45000));

    // No local backend: dropped, not rejected.
    let empty = Frontend {
        port: NODE_PORT + 1,
        flags: SERVICE_FLAG_EXTERNAL_LOCAL | SERVICE_FLAG_NO_LOCAL_BACKENDS,
        ..nodeport(NODE4.into(), PROTO_TCP)
    };
    node.set_frontend(&empty, 2, &[]);
    let syn = Pkt::tcp(CLIENT4.into(), 45001, empty.ip, NODE_PORT + 1, SYN);
    let (verdict, _) = node.run(TcHook::Ingress, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.stat(Outcome::DropNoLocalEndpoints), 1);
}
