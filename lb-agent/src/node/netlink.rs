//! Questions for the kernel over rtnetlink, in the agent's own network
//! namespace (sysfs may show another namespace's devices): the kind and
//! name of a network interface ("veth", "netkit", "bridge", ...) and the
//! namespace its peer lives in, the route that carries packets to an
//! address, and the id this namespace knows another namespace by. The
//! message building and parsing are plain functions over bytes; [`link`],
//! [`route_to`] and [`nsid_of`] are thin socket shells.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// Length of a netlink message header.
pub(crate) const NLMSG_HDR_LEN: usize = 16;
/// Message type of an error or acknowledgement.
pub(crate) const NLMSG_ERROR: u16 = 2;
/// Header flag of a request.
pub(crate) const NLM_F_REQUEST: u16 = 1;
const IFINFOMSG_LEN: usize = 16;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// The namespace id of a veth or netkit device's peer, when it lives in
/// another namespace.
const IFLA_LINK_NETNSID: u16 = 37;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
/// `struct rtgenmsg`, padded to the netlink alignment.
const RTGENMSG_LEN: usize = 4;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// `rtm_flags`: answer with the FIB entry that matched (its real prefix
/// length), not a route made up for the one address asked.
const RTM_F_FIB_MATCH: u32 = 0x2000;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Attribute types carry two flag bits (nested, network byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Appends a netlink message header (host order; port id 0, the kernel's).
pub(crate) fn push_header(buf: &mut Vec<u8>, len: usize, kind: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

/// The RTM_GETLINK request for interface `ifindex`.
fn get_link_request(ifindex: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + IFINFOMSG_LEN;
    let mut msg = Vec::with_capacity(len);
    push_header(&mut msg, len, RTM_GETLINK, NLM_F_REQUEST, seq);
    // ifinfomsg: family, pad, type, index, flags, change.
    msg.extend([0u8, 0]);
    msg.extend(0u16.to_ne_bytes());
    msg.extend(ifindex.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The payload of the first attribute of `kind` in a run of attributes.
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0)?);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if u16_at(attrs, 2)? & NLA_TYPE_MASK == kind {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// An interface, as an answer to [`get_link_request`] describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its kind; `None` for a device without one (a physical NIC).
    pub kind: Option<String>,
    /// The id (see [`nsid_of`]) of the namespace its peer lives in, for a
    /// pair device whose peer is in another namespace.
    pub peer_netnsid: Option<i32>,
}

/// A route, as an answer to [`get_route_request`] describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The prefix length of the FIB entry that matched.
    pub prefix_len: u8,
    /// The interface packets leave by, if the route names one.
    pub ifindex: Option<u32>,
}

/// What an answer says.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// An interface.
    Link(Link),
    /// A route.
    Route(Route),
    /// A namespace id; negative: none assigned.
    Nsid(i32),
    /// The kernel refused, with this errno.
    Error(i32),
}

/// A NUL-terminated string attribute.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn parse_answer(msg: &[u8]) -> Option<Answer> {
    let len = u32_at(msg, 0)? as usize;
    let msg = msg.get(..len)?;
    match u16_at(msg, 4)? {
        NLMSG_ERROR => Some(Answer::Error(-(u32_at(msg, NLMSG_HDR_LEN)? as i32))),
        RTM_NEWLINK => {
            let attrs = msg.get(NLMSG_HDR_LEN + IFINFOMSG_LEN..)?;
            let kind = attribute(attrs, IFLA_LINKINFO)
                .and_then(|info| attribute(info, IFLA_INFO_KIND))
                .map(text);
            let name = attribute(attrs, IFLA_IFNAME).map(text).unwrap_or_default();
            let peer_netnsid = attribute(attrs, IFLA_LINK_NETNSID)
                .and_then(|id| u32_at(id, 0))
                .map(|id| id as i32);
            Some(Answer::Link(Link {
                name,
                kind,
                peer_netnsid,
            }))
        }
        RTM_NEWNSID => {
            let attrs = msg.get(NLMSG_HDR_LEN + RTGENMSG_LEN..)?;
            let id = attribute(attrs, NETNSA_NSID).and_then(|id| u32_at(id, 0))?;
            Some(Answer::Nsid(id as i32))
        }
        RTM_NEWROUTE => {
            let prefix_len = *msg.get(NLMSG_HDR_LEN + 1)?;
            let attrs = msg.get(NLMSG_HDR_LEN + RTMSG_LEN..)?;
            let ifindex = attribute(attrs, RTA_OIF).and_then(|oif| u32_at(oif, 0));
            Some(Answer::Route(Route {
                prefix_len,
                ifindex,
            }))
        }
        _ => None,
    }
}

/// The RTM_GETROUTE request for the route to `addr`, answered with the FIB
/// entry that matched.
fn get_route_request(addr: IpAddr, seq: u32) -> Vec<u8> {
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(v4) => (AF_INET, v4.octets().to_vec()),
        IpAddr::V6(v6) => (AF_INET6, v6.octets().to_vec()),
    };
    let attr_len = 4 + bytes.len();
    let len = NLMSG_HDR_LEN + RTMSG_LEN + attr_len;
    let mut msg = Vec::with_capacity(len);
    push_header(&mut msg, len, RTM_GETROUTE, NLM_F_REQUEST, seq);
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    msg.extend([family, (bytes.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    msg.extend(RTM_F_FIB_MATCH.to_ne_bytes());
    msg.extend((attr_len as u16).to_ne_bytes());
    msg.extend(RTA_DST.to_ne_bytes());
    msg.extend(bytes);
    msg
}

/// The RTM_GETNSID request for the namespace open as `fd`.
fn get_nsid_request(fd: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + RTGENMSG_LEN + 8;
    let mut msg = Vec::with_capacity(len);
    push_header(&mut msg, len, RTM_GETNSID, NLM_F_REQUEST, seq);
    // rtgenmsg: family AF_UNSPEC, padding.
    msg.extend([0u8; RTGENMSG_LEN]);
    msg.extend(8u16.to_ne_bytes());
    msg.extend(NETNSA_FD.to_ne_bytes());
    msg.extend(fd.to_ne_bytes());
    msg
}

/// Sends one request and parses the one answer.
fn ask(request: &[u8]) -> io::Result<Answer> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let fd = sock.as_raw_fd();
    bind(fd, &NetlinkAddr::new(0, 0))?;
    send(fd, request, MsgFlags::empty())?;
    let mut buf = vec![0u8; 16 * 1024];
    let n = recv(fd, &mut buf, MsgFlags::empty())?;
    match parse_answer(&buf[..n]) {
        Some(Answer::Error(errno)) => Err(io::Error::from_raw_os_error(errno)),
        Some(answer) => Ok(answer),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected rtnetlink answer",
        )),
    }
}

fn unexpected() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unexpected rtnetlink answer")
}

/// Interface `ifindex` in the caller's network namespace: its name and
/// kind, e.g. `Some("veth")`.
pub fn link(ifindex: u32) -> io::Result<Link> {
    match ask(&get_link_request(ifindex, 1))? {
        Answer::Link(link) => Ok(link),
        _ => Err(unexpected()),
    }
}

/// The route the caller's network namespace takes to `addr`.
pub fn route_to(addr: IpAddr) -> io::Result<Route> {
    match ask(&get_route_request(addr, 1))? {
        Answer::Route(route) => Ok(route),
        _ => Err(unexpected()),
    }
}

/// The id the caller's namespace knows the namespace open as `netns` by,
/// as its pair devices' [`Link::peer_netnsid`] give it; `None` when it has
/// none (no device of the caller's has its peer there).
pub fn nsid_of(netns: &impl AsFd) -> io::Result<Option<i32>> {
    let fd = netns.as_fd().as_raw_fd() as u32;
    match ask(&get_nsid_request(fd, 1))? {
        Answer::Nsid(id) => Ok((id >= 0).then_some(id)),
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(((4 + payload.len()) as u16).to_ne_bytes());
        a.extend(kind.to_ne_bytes());
        a.extend(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn answer(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend(((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(body);
        msg
    }

    #[test]
    fn request_is_a_get_link_of_the_index() {
        let req = get_link_request(7, 3);
        assert_eq!(req.len(), 32);
        assert_eq!(u32_at(&req, 0), Some(32));
        assert_eq!(u16_at(&req, 4), Some(RTM_GETLINK));
        assert_eq!(u32_at(&req, 20), Some(7));
    }

    #[test]
    fn kind_is_read_from_the_nested_link_info() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(3, b"eth0\0"));
        let mut info = attr(IFLA_INFO_KIND, b"veth\0");
        info.extend(attr(2, &[1, 2, 3, 4]));
        // The nested flag bit is set on IFLA_LINKINFO by the kernel.
        body.extend(attr(IFLA_LINKINFO | 0x8000, &info));
        assert_eq!(
            parse_answer(&answer(RTM_NEWLINK, &body)),
            Some(Answer::Link(Link {
                name: "eth0".into(),
                kind: Some("veth".into()),
                peer_netnsid: None,
            }))
        );
        let plain = answer(RTM_NEWLINK, &[0u8; IFINFOMSG_LEN]);
        assert_eq!(parse_answer(&plain), Some(Answer::Link(Link::default())));
    }

    #[test]
    fn a_pair_device_names_its_peers_namespace_by_id() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_LINK_NETNSID, &3i32.to_ne_bytes()));
        let Some(Answer::Link(link)) = parse_answer(&answer(RTM_NEWLINK, &body)) else {
            panic!("not a link");
        };
        assert_eq!(link.peer_netnsid, Some(3));
    }

    #[test]
    fn an_nsid_request_carries_the_namespace_fd_and_its_answer_the_id() {
        let req = get_nsid_request(9, 2);
        assert_eq!(u32_at(&req, 0), Some(req.len() as u32));
        assert_eq!(u16_at(&req, 4), Some(RTM_GETNSID));
        let attrs = &req[NLMSG_HDR_LEN + RTGENMSG_LEN..];
        assert_eq!(attribute(attrs, NETNSA_FD), Some(&9u32.to_ne_bytes()[..]));
        let mut body = vec![0u8; RTGENMSG_LEN];
        body.extend(attr(NETNSA_NSID, &(-1i32).to_ne_bytes()));
        assert_eq!(
            parse_answer(&answer(RTM_NEWNSID, &body)),
            Some(Answer::Nsid(-1))
        );
    }

    #[test]
    fn errors_and_garbage() {
        let enodev = answer(NLMSG_ERROR, &(-19i32).to_ne_bytes());
        assert_eq!(parse_answer(&enodev), Some(Answer::Error(19)));
        assert_eq!(parse_answer(&[1, 2, 3]), None);
        let mut bad = vec![0u8; IFINFOMSG_LEN];
        bad.extend([200, 0, 1, 0]);
        assert_eq!(
            parse_answer(&answer(RTM_NEWLINK, &bad)),
            Some(Answer::Link(Link::default()))
        );
    }

    #[test]
    fn a_route_request_asks_for_the_matching_entry_and_its_answer_names_the_interface() {
        let req = get_route_request("10.1.2.3".parse().unwrap(), 5);
        assert_eq!(u16_at(&req, 4), Some(RTM_GETROUTE));
        assert_eq!(req[NLMSG_HDR_LEN], AF_INET);
        assert_eq!(u32_at(&req, NLMSG_HDR_LEN + 8), Some(RTM_F_FIB_MATCH));
        assert_eq!(&req[req.len() - 4..], &[10, 1, 2, 3]);
        let v6 = get_route_request("fd00::1".parse().unwrap(), 5);
        assert_eq!(v6[NLMSG_HDR_LEN + 1], 128);

        let mut body = vec![AF_INET, 32, 0, 0, 254, 0, 0, 1, 0, 0, 0, 0];
        body.extend(attr(RTA_DST, &[10, 1, 2, 3]));
        body.extend(attr(RTA_OIF, &9u32.to_ne_bytes()));
        assert_eq!(
            parse_answer(&answer(RTM_NEWROUTE, &body)),
            Some(Answer::Route(Route {
                prefix_len: 32,
                ifindex: Some(9)
            }))
        );
    }

    #[test]
    fn the_loopback_route_leaves_by_the_loopback_interface() {
        let route = route_to("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(route.ifindex, Some(1));
        assert_eq!(link(1).unwrap().name, "lo");
    }

    #[test]
    fn loopback_has_no_kind_and_a_missing_index_is_an_error() {
        assert_eq!(link(1).unwrap().kind, None);
        assert!(link(u32::MAX >> 1).is_err());
    }
}
