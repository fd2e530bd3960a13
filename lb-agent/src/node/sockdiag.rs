//! The netlink `sock_diag` messages used to find and destroy sockets, encoded
//! and decoded without I/O (see `sockets` for the shell that sends them).
//!
//! Layouts follow `linux/inet_diag.h` and `linux/netlink.h`; netlink headers
//! are host-endian, ports and addresses in `inet_diag_sockid` network-endian.

use super::netlink::{push_header, NLMSG_ERROR, NLMSG_HDR_LEN as HEADER_LEN, NLM_F_REQUEST};

/// `SOCK_DIAG_BY_FAMILY`: dump sockets of one family and protocol.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`: abort one socket (needs `CONFIG_INET_DIAG_DESTROY`).
pub const SOCK_DESTROY: u16 = 21;
/// The state a connected UDP socket reports (`TCP_ESTABLISHED`); an
/// unconnected one reports `TCP_CLOSE`.
pub const UDP_CONNECTED: u8 = 1;
const NLMSG_DONE: u16 = 3;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const SOCKID_LEN: usize = 48;
const REQUEST_LEN: usize = HEADER_LEN + 8 + SOCKID_LEN;
/// `inet_diag_msg` up to and including `idiag_inode`.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// `inet_diag_sockid`: identifies one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockId {
    /// Local port, host order.
    pub src_port: u16,
    /// Remote port, host order.
    pub dst_port: u16,
    /// Local address, 16 bytes (IPv4 in the first 4).
    pub src: [u8; 16],
    /// Remote address, 16 bytes (IPv4 in the first 4).
    pub dst: [u8; 16],
    /// Bound interface.
    pub interface: u32,
    /// Socket cookie, as `bpf_get_socket_cookie` returns it.
    pub cookie: u64,
}

/// One socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Its state ([`UDP_CONNECTED`] for a connected UDP socket).
    pub state: u8,
    /// Its identity.
    pub id: SockId,
    /// Its inode number, as `/proc/PID/fd` links name it (`socket:[N]`).
    pub inode: u32,
}

/// A decoded netlink message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A socket of a dump.
    Socket(DiagSocket),
    /// The end of a dump.
    Done,
    /// An acknowledgement (0) or an error (a negative errno).
    Error(i32),
    /// Anything else (skipped).
    Other,
}

fn request(kind: u16, flags: u16, seq: u32, family: u8, protocol: u8, id: &SockId) -> Vec<u8> {
    let mut buf = Vec::with_capacity(REQUEST_LEN);
    push_header(&mut buf, REQUEST_LEN, kind, flags, seq);
    buf.extend_from_slice(&[family, protocol, 0, 0]);
    // idiag_states: every TCP state bit; UDP sockets report ESTABLISHED or CLOSE.
    buf.extend_from_slice(&u32::MAX.to_ne_bytes());
    buf.extend_from_slice(&id.src_port.to_be_bytes());
    buf.extend_from_slice(&id.dst_port.to_be_bytes());
    buf.extend_from_slice(&id.src);
    buf.extend_from_slice(&id.dst);
    buf.extend_from_slice(&id.interface.to_ne_bytes());
    // The kernel splits the cookie into two u32: low word first.
    buf.extend_from_slice(&(id.cookie as u32).to_ne_bytes());
    buf.extend_from_slice(&((id.cookie >> 32) as u32).to_ne_bytes());
    buf
}

/// A request to dump every socket of `family` and `protocol`.
pub fn dump_request(seq: u32, family: u8, protocol: u8) -> Vec<u8> {
    let any = SockId {
        src_port: 0,
        dst_port: 0,
        src: [0; 16],
        dst: [0; 16],
        interface: 0,
        // INET_DIAG_NOCOOKIE: match any cookie.
        cookie: u64::MAX,
    };
    request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        protocol,
        &any,
    )
}

/// A request to destroy one socket found by a dump.
pub fn destroy_request(seq: u32, socket: &DiagSocket, protocol: u8) -> Vec<u8> {
    request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        socket.family,
        protocol,
        &socket.id,
    )
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn parse_sockid(b: &[u8]) -> SockId {
    let mut src = [0; 16];
    let mut dst = [0; 16];
    src.copy_from_slice(&b[4..20]);
    dst.copy_from_slice(&b[20..36]);
    SockId {
        src_port: u16::from_be_bytes([b[0], b[1]]),
        dst_port: u16::from_be_bytes([b[2], b[3]]),
        src,
        dst,
        interface: u32_at(b, 36),
        cookie: u64::from(u32_at(b, 40)) | (u64::from(u32_at(b, 44)) << 32),
    }
}

/// Decodes every message of one datagram. Truncated messages end the list.
pub fn parse(buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < HEADER_LEN || at + len > buf.len() {
            break;
        }
        let body = &buf[at + HEADER_LEN..at + len];
        let message = match u16_at(buf, at + 4) {
            NLMSG_DONE => Message::Done,
            NLMSG_ERROR if body.len() >= 4 => Message::Error(u32_at(body, 0) as i32),
            SOCK_DIAG_BY_FAMILY if body.len() >= DIAG_MSG_LEN => Message::Socket(DiagSocket {
                family: body[0],
                state: body[1],
                id: parse_sockid(&body[4..4 + SOCKID_LEN]),
                inode: u32_at(body, DIAG_MSG_LEN - 4),
            }),
            _ => Message::Other,
        };
        out.push(message);
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag_reply(family: u8, id: &SockId, inode: u32) -> Vec<u8> {
        // A reply is laid out like a request's id, after family/state/timer/retrans,
        // then expires, queues, uid and inode.
        let req = request(SOCK_DIAG_BY_FAMILY, 2, 1, family, 17, id);
        let mut body = vec![family, UDP_CONNECTED, 0, 0];
        body.extend_from_slice(&req[HEADER_LEN + 8..]);
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&inode.to_ne_bytes());
        let mut msg = Vec::new();
        push_header(&mut msg, HEADER_LEN + body.len(), SOCK_DIAG_BY_FAMILY, 2, 1);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let dump = dump_request(7, 2, 17);
        assert_eq!(dump.len(), 72);
        assert_eq!(u32_at(&dump, 0), 72);
        assert_eq!(u16_at(&dump, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16_at(&dump, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(&dump[16..18], &[2, 17]);
        assert_eq!(u32_at(&dump, 64), u32::MAX);
        assert_eq!(u32_at(&dump, 68), u32::MAX);
    }

    #[test]
    fn dumped_sockets_round_trip_into_destroy_requests() {
        let id = SockId {
            src_port: 40000,
            dst_port: 8080,
            src: [10, 244, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 244, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            interface: 0,
            cookie: 0x1234_5678_9abc,
        };
        let mut datagram = diag_reply(2, &id, 4711);
        datagram.extend(diag_reply(2, &SockId { cookie: 1, ..id }, 4712));
        let mut done = Vec::new();
        push_header(&mut done, HEADER_LEN + 4, NLMSG_DONE, 2, 1);
        done.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend(done);
        let messages = parse(&datagram);
        assert_eq!(messages.len(), 3);
        let Message::Socket(socket) = messages[0] else {
            panic!("{messages:?}")
        };
        assert_eq!(socket.id, id);
        assert_eq!((socket.state, socket.inode), (UDP_CONNECTED, 4711));
        assert_eq!(messages[2], Message::Done);
        let destroy = destroy_request(9, &socket, 17);
        assert_eq!(u16_at(&destroy, 4), SOCK_DESTROY);
        assert_eq!(&destroy[HEADER_LEN + 8..], &dump_reply_id(&datagram));
    }

    fn dump_reply_id(datagram: &[u8]) -> Vec<u8> {
        datagram[HEADER_LEN + 4..HEADER_LEN + 4 + SOCKID_LEN].to_vec()
    }

    #[test]
    fn errors_and_truncation_are_handled() {
        let mut ack = Vec::new();
        push_header(&mut ack, HEADER_LEN + 4, NLMSG_ERROR, 0, 1);
        ack.extend_from_slice(&(-2i32).to_ne_bytes());
        assert_eq!(parse(&ack), vec![Message::Error(-2)]);
        assert!(parse(&ack[..10]).is_empty());
    }
}
