//! Moves connected UDP sockets off removed backends.
//!
//! A UDP socket translated at `connect()` keeps sending to its backend: a
//! connected socket's `send()` runs no socket hook. kube-proxy lets the next
//! datagram of such a socket reach a live backend by clearing the flow's
//! conntrack entry. Here, after a UDP backend is removed, the agent connects
//! each socket still connected to it again, to the frontend its application
//! asked for, and the socket programs pick a live backend: the same socket,
//! local port and shown peer (`getpeername()` gives the frontend), and the
//! application sees nothing.
//!
//! The sockets are those whose cookie the socket programs recorded with the
//! removed backend and that are still connected to it (an unconnected
//! socket picks a backend per datagram and is left alone), found with
//! `sock_diag` in every network namespace of the node. The `connect()` runs
//! on a descriptor borrowed from a process holding the socket ([`owners`]),
//! once its peer is checked again: a socket its application connected
//! elsewhere meanwhile is left alone.
//!
//! - A socket whose frontend has no backend left keeps its peer and waits
//!   (its datagrams fail meanwhile, as kube-proxy rejects them); the caller
//!   tries it again once the frontend has a backend.
//! - A socket that cannot be connected again (no process found holding it,
//!   no `CAP_SYS_PTRACE`, no room left to wait) is destroyed with
//!   `SOCK_DESTROY`: its application sees `ECONNABORTED` and must connect
//!   again.

use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use nix::{
    errno::Errno,
    sched::{setns, CloneFlags},
    sys::socket::{
        connect, getpeername, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
    },
};

use super::{
    owners::{self, Holder},
    sockdiag::{destroy_request, dump_request, parse, DiagSocket, Message, UDP_CONNECTED},
};
use crate::reconcile::StaleUdpSocket;

const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Errors while moving sockets; the sockets not yet handled are untouched.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    /// `/proc` could not be read to find network namespaces.
    #[error("listing network namespaces: {0}")]
    Proc(#[from] io::Error),
    /// A netlink or namespace system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: String,
        /// The errno.
        source: nix::Error,
    },
    /// The worker thread panicked.
    #[error("socket worker thread panicked")]
    Panicked,
}

/// What became of the stale sockets.
#[derive(Debug, Default)]
pub struct Moved {
    /// Connected again through their frontend, to a live backend.
    pub reconnected: Vec<StaleUdpSocket>,
    /// Still connected to their backend: their frontend has none left.
    pub waiting: Vec<StaleUdpSocket>,
    /// Destroyed, each with why it could not be connected again.
    pub destroyed: Vec<(StaleUdpSocket, String)>,
}

/// A stale socket as a dump found it, in the namespace at `netns`.
struct Found {
    stale: StaleUdpSocket,
    socket: DiagSocket,
    netns: usize,
}

/// Moves the connected sockets of `stale` to a live backend of their
/// frontend (see the module documentation); at most `waiting_room` of them
/// may wait for a backend, the others are destroyed.
pub fn move_udp_sockets(
    stale: &[StaleUdpSocket],
    waiting_room: usize,
) -> Result<Moved, SocketsError> {
    if stale.is_empty() {
        return Ok(Moved::default());
    }
    let paths = super::netns::all()?;
    let stale: HashMap<(u64, SocketAddr), StaleUdpSocket> =
        stale.iter().map(|s| ((s.cookie, s.backend), *s)).collect();
    // setns changes the calling thread only: use a thread that ends afterwards.
    std::thread::spawn(move || {
        let mut namespaces = Vec::new();
        let mut found = Vec::new();
        for path in paths {
            let Ok(netns) = fs::File::open(&path) else {
                continue;
            };
            enter(&netns, &path)?;
            for socket in dump_udp_sockets()? {
                if let Some(stale) = connected_to_its_backend(&stale, &socket) {
                    found.push(Found {
                        stale: *stale,
                        socket,
                        netns: namespaces.len(),
                    });
                }
            }
            namespaces.push((netns, path));
        }
        let inodes: BTreeSet<u64> = found.iter().map(|f| u64::from(f.socket.inode)).collect();
        let holders = owners::find_holders(Path::new("/proc"), &inodes);
        let mut moved = Moved::default();
        let mut to_destroy = Vec::new();
        for f in found {
            let inode = u64::from(f.socket.inode);
            let holder = holders
                .found
                .get(&inode)
                .copied()
                .ok_or_else(|| holders.why_missing());
            match reconnect(holder, inode, f.socket.family, &f.stale) {
                Ok(()) => moved.reconnected.push(f.stale),
                Err(NotMoved::Elsewhere) => {}
                Err(NotMoved::WhenServed) if moved.waiting.len() < waiting_room => {
                    moved.waiting.push(f.stale)
                }
                Err(NotMoved::WhenServed) => {
                    to_destroy.push((f, "no room left to wait for a backend".to_string()))
                }
                Err(NotMoved::Never(why)) => to_destroy.push((f, why)),
            }
        }
        for (f, why) in to_destroy {
            let (netns, path) = &namespaces[f.netns];
            enter(netns, path)?;
            if destroy(&f.socket)? {
                moved.destroyed.push((f.stale, why));
            }
        }
        Ok(moved)
    })
    .join()
    .map_err(|_| SocketsError::Panicked)?
}

/// The stale socket `socket` is, if it is still connected to the backend
/// the socket programs gave it; `stale` is keyed by cookie and backend.
fn connected_to_its_backend<'a>(
    stale: &'a HashMap<(u64, SocketAddr), StaleUdpSocket>,
    socket: &DiagSocket,
) -> Option<&'a StaleUdpSocket> {
    if socket.state != UDP_CONNECTED {
        return None;
    }
    stale.get(&(socket.id.cookie, peer_of(socket)?))
}

/// The peer of a dumped socket; IPv4-mapped IPv6 as IPv4, as the maps
/// keep it.
fn peer_of(socket: &DiagSocket) -> Option<SocketAddr> {
    let dst = socket.id.dst;
    let ip = match socket.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3])),
        AF_INET6 => Ipv6Addr::from(dst).to_canonical(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, socket.id.dst_port))
}

/// Why a socket was not connected again.
#[derive(Debug, PartialEq, Eq)]
enum NotMoved {
    /// Its frontend has no backend: try again once it has one.
    WhenServed,
    /// Its application connected it elsewhere meanwhile: leave it alone.
    Elsewhere,
    /// It cannot be: destroy it, for this reason.
    Never(String),
}

/// Connects the socket `stale` of `family` (inode `inode`, held by
/// `holder`, or why none was found) to its frontend.
fn reconnect(
    holder: Result<Holder, String>,
    inode: u64,
    family: u8,
    stale: &StaleUdpSocket,
) -> Result<(), NotMoved> {
    let holder = holder.map_err(NotMoved::Never)?;
    let fd = owners::borrow(holder, inode).map_err(|e| NotMoved::Never(e.to_string()))?;
    // The peer as its application sees it: the frontend while the socket
    // programs still know the translation, the backend if they forgot it.
    let peer = getpeername::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|peer| std_addr(&peer));
    if peer.is_none_or(|peer| peer != stale.frontend && peer != stale.backend) {
        return Err(NotMoved::Elsewhere);
    }
    match connect_to(&fd, family, stale.frontend) {
        Ok(()) => Ok(()),
        // What the socket programs answer for a frontend without endpoints
        // (or without local ones): the socket keeps its peer.
        Err(Errno::ECONNREFUSED | Errno::EHOSTUNREACH) => Err(NotMoved::WhenServed),
        Err(errno) => Err(NotMoved::Never(format!(
            "connecting it to {}: {errno}",
            stale.frontend
        ))),
    }
}

/// A socket address as std writes it, IPv4-mapped IPv6 as IPv4.
fn std_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::new(IpAddr::V4(v4.ip()), v4.port()));
    }
    let v6 = addr.as_sockaddr_in6()?;
    Some(SocketAddr::new(v6.ip().to_canonical(), v6.port()))
}

/// `connect()` of a socket of `family` to `frontend`, IPv4-mapped for an
/// IPv6 socket, as its application would have written it.
fn connect_to(fd: &OwnedFd, family: u8, frontend: SocketAddr) -> nix::Result<()> {
    match (family, frontend) {
        (AF_INET, SocketAddr::V4(v4)) => connect(fd.as_raw_fd(), &SockaddrIn::from(v4)),
        (AF_INET6, SocketAddr::V4(v4)) => {
            let mapped = SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0);
            connect(fd.as_raw_fd(), &SockaddrIn6::from(mapped))
        }
        (AF_INET6, SocketAddr::V6(v6)) => connect(fd.as_raw_fd(), &SockaddrIn6::from(v6)),
        _ => Err(Errno::EAFNOSUPPORT),
    }
}

fn sys(context: &str) -> impl FnOnce(nix::Error) -> SocketsError + '_ {
    move |source| SocketsError::Sys {
        context: context.to_string(),
        source,
    }
}

fn enter(netns: &fs::File, path: &Path) -> Result<(), SocketsError> {
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(|source| SocketsError::Sys {
        context: format!("entering {}", path.display()),
        source,
    })
}

fn sock_diag() -> Result<OwnedFd, SocketsError> {
    socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(sys("opening a sock_diag socket"))
}

/// Every UDP socket, IPv4 and IPv6, of the current network namespace.
fn dump_udp_sockets() -> Result<Vec<DiagSocket>, SocketsError> {
    let fd = sock_diag()?;
    let kernel = NetlinkAddr::new(0, 0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sockets = Vec::new();
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        sendto(
            fd.as_raw_fd(),
            &dump_request(seq, family, IPPROTO_UDP),
            &kernel,
            MsgFlags::empty(),
        )
        .map_err(sys("requesting a UDP socket dump"))?;
        'dump: loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(sys("reading a UDP socket dump"))?;
            for message in parse(&buf[..n]) {
                match message {
                    Message::Socket(s) => sockets.push(s),
                    Message::Done => break 'dump,
                    Message::Error(errno) if errno < 0 => {
                        return Err(SocketsError::Sys {
                            context: "dumping UDP sockets".into(),
                            source: nix::Error::from_raw(-errno),
                        })
                    }
                    _ => {}
                }
            }
            if n == 0 {
                break;
            }
        }
    }
    Ok(sockets)
}

/// Destroys one socket of the current network namespace; false when it
/// was closed meanwhile.
fn destroy(target: &DiagSocket) -> Result<bool, SocketsError> {
    let fd = sock_diag()?;
    let mut buf = [0u8; 1024];
    sendto(
        fd.as_raw_fd(),
        &destroy_request(100, target, IPPROTO_UDP),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(sys("sending SOCK_DESTROY"))?;
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(sys("reading the SOCK_DESTROY answer"))?;
    match parse(&buf[..n]).first() {
        Some(Message::Error(0)) => Ok(true),
        Some(Message::Error(errno)) if -errno == libc::ENOENT => Ok(false),
        Some(Message::Error(errno)) => Err(SocketsError::Sys {
            context: "destroying a UDP socket".into(),
            source: nix::Error::from_raw(-errno),
        }),
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::sockdiag::SockId;

    fn dumped(family: u8, state: u8, cookie: u64, dst: [u8; 16], port: u16) -> DiagSocket {
        DiagSocket {
            family,
            state,
            id: SockId {
                src_port: 40000,
                dst_port: port,
                src: [0; 16],
                dst,
                interface: 0,
                cookie,
            },
            inode: 7,
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut dst = [0; 16];
        dst[..4].copy_from_slice(&a);
        dst
    }

    #[test]
    fn only_sockets_still_connected_to_the_removed_backend_are_moved() {
        let stale: HashMap<_, _> = [
            StaleUdpSocket {
                cookie: 5,
                backend: "10.244.1.7:8053".parse().unwrap(),
                frontend: "10.96.0.10:53".parse().unwrap(),
            },
            StaleUdpSocket {
                cookie: 6,
                backend: "[fd00::7]:8053".parse().unwrap(),
                frontend: "[fd00:96::10]:53".parse().unwrap(),
            },
        ]
        .map(|s| ((s.cookie, s.backend), s))
        .into();
        let found = |s: &DiagSocket| connected_to_its_backend(&stale, s).map(|s| s.cookie);
        let backend = v4([10, 244, 1, 7]);
        assert_eq!(
            found(&dumped(AF_INET, UDP_CONNECTED, 5, backend, 8053)),
            Some(5)
        );
        // An IPv6 socket connected to the IPv4-mapped backend.
        let mapped = Ipv4Addr::new(10, 244, 1, 7).to_ipv6_mapped().octets();
        assert_eq!(
            found(&dumped(AF_INET6, UDP_CONNECTED, 5, mapped, 8053)),
            Some(5)
        );
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        assert_eq!(
            found(&dumped(AF_INET6, UDP_CONNECTED, 6, v6.octets(), 8053)),
            Some(6)
        );
        // Unconnected (it picks a backend per datagram), connected to
        // another peer since, another socket, another port.
        assert_eq!(found(&dumped(AF_INET, 7, 5, backend, 8053)), None);
        assert_eq!(
            found(&dumped(
                AF_INET,
                UDP_CONNECTED,
                5,
                v4([10, 244, 1, 8]),
                8053
            )),
            None
        );
        assert_eq!(
            found(&dumped(AF_INET, UDP_CONNECTED, 9, backend, 8053)),
            None
        );
        assert_eq!(found(&dumped(AF_INET, UDP_CONNECTED, 5, backend, 53)), None);
    }

    #[test]
    fn a_socket_its_application_connected_elsewhere_is_left_alone() {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        let old = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let frontend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let elsewhere = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = nix::sys::stat::fstat(&socket).unwrap().st_ino;
        let me = Ok(Holder {
            pid: std::process::id() as i32,
            fd: socket.as_raw_fd(),
        });
        let stale = StaleUdpSocket {
            cookie: 1,
            backend: old.local_addr().unwrap(),
            frontend: frontend.local_addr().unwrap(),
        };
        socket.connect(elsewhere.local_addr().unwrap()).unwrap();
        assert_eq!(
            reconnect(me.clone(), inode, AF_INET6, &stale),
            Err(NotMoved::Elsewhere)
        );
        // Still on its backend (IPv4-mapped on this IPv6 socket): moved.
        socket.connect(old.local_addr().unwrap()).unwrap();
        assert_eq!(reconnect(me.clone(), inode, AF_INET6, &stale), Ok(()));
        let peer = socket.peer_addr().unwrap();
        assert_eq!(
            SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            stale.frontend
        );
        // Showing its frontend (as getpeername does with the socket
        // programs): moved again.
        assert_eq!(reconnect(me, inode, AF_INET6, &stale), Ok(()));
        assert_eq!(
            reconnect(Err("gone".into()), inode, AF_INET6, &stale),
            Err(NotMoved::Never("gone".into()))
        );
    }

    #[test]
    fn a_socket_is_connected_again_in_its_own_family() {
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::UdpSocket::bind("[::]:0").unwrap();
        let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = target.local_addr().unwrap();
        let fd = |s: &std::net::UdpSocket| OwnedFd::from(s.try_clone().unwrap());
        connect_to(&fd(&v4), AF_INET, to).unwrap();
        assert_eq!(v4.peer_addr().unwrap(), to);
        connect_to(&fd(&v6), AF_INET6, to).unwrap();
        let SocketAddr::V6(peer) = v6.peer_addr().unwrap() else {
            panic!("an IPv6 socket's peer is IPv6")
        };
        assert_eq!(peer.ip().to_ipv4_mapped(), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(
            connect_to(&fd(&v4), AF_INET, "[::1]:53".parse().unwrap()),
            Err(Errno::EAFNOSUPPORT)
        );
    }
}
