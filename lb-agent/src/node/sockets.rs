//! Terminates connected UDP sockets still aimed at a removed backend.
//!
//! A connected UDP socket was translated once, at `connect()`, and keeps
//! sending to its backend forever: a DNS client would never notice that its
//! server left. After a UDP backend is removed, the agent looks up which
//! sockets the datapath steered to it (their cookies are in the per-socket
//! reverse-translation map) and destroys exactly those with `SOCK_DESTROY`,
//! in every network namespace of the node; the application sees an error and
//! reconnects through the Service again.

use std::{collections::BTreeSet, fs, io, os::fd::AsRawFd};

use nix::{
    sched::{setns, CloneFlags},
    sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    },
};

use super::sockdiag::{destroy_request, dump_request, parse, DiagSocket, Message};

const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Errors while terminating sockets.
#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
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
    #[error("socket termination thread panicked")]
    Panicked,
}

/// Destroys the UDP sockets whose cookie is in `cookies`, in every network
/// namespace. Returns how many were destroyed.
pub fn destroy_udp_sockets(cookies: &BTreeSet<u64>) -> Result<usize, TerminateError> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let namespaces = super::netns::all()?;
    let cookies = cookies.clone();
    // setns changes the calling thread only: use a thread that ends afterwards.
    std::thread::spawn(move || {
        let mut destroyed = 0;
        for path in namespaces {
            let Ok(netns) = fs::File::open(&path) else {
                continue;
            };
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|source| TerminateError::Sys {
                context: format!("entering {}", path.display()),
                source,
            })?;
            destroyed += destroy_in_current_netns(&cookies)?;
        }
        Ok(destroyed)
    })
    .join()
    .map_err(|_| TerminateError::Panicked)?
}

fn sys(context: &str) -> impl FnOnce(nix::Error) -> TerminateError + '_ {
    move |source| TerminateError::Sys {
        context: context.to_string(),
        source,
    }
}

fn destroy_in_current_netns(cookies: &BTreeSet<u64>) -> Result<usize, TerminateError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(sys("opening a sock_diag socket"))?;
    let kernel = NetlinkAddr::new(0, 0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut destroyed = 0;
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        sendto(
            fd.as_raw_fd(),
            &dump_request(seq, family, IPPROTO_UDP),
            &kernel,
            MsgFlags::empty(),
        )
        .map_err(sys("requesting a UDP socket dump"))?;
        let mut targets: Vec<DiagSocket> = Vec::new();
        'dump: loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(sys("reading a UDP socket dump"))?;
            for message in parse(&buf[..n]) {
                match message {
                    Message::Socket(s) if cookies.contains(&s.id.cookie) => targets.push(s),
                    Message::Done => break 'dump,
                    Message::Error(errno) if errno < 0 => {
                        return Err(TerminateError::Sys {
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
        for (i, target) in targets.iter().enumerate() {
            let seq = 100 + i as u32;
            sendto(
                fd.as_raw_fd(),
                &destroy_request(seq, target, IPPROTO_UDP),
                &kernel,
                MsgFlags::empty(),
            )
            .map_err(sys("sending SOCK_DESTROY"))?;
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(sys("reading the SOCK_DESTROY answer"))?;
            match parse(&buf[..n]).first() {
                Some(Message::Error(0)) => destroyed += 1,
                // Closed by its owner meanwhile: nothing left to do.
                Some(Message::Error(errno)) if -errno == libc::ENOENT => {}
                Some(Message::Error(errno)) => {
                    return Err(TerminateError::Sys {
                        context: "destroying a UDP socket".into(),
                        source: nix::Error::from_raw(-errno),
                    })
                }
                _ => {}
            }
        }
    }
    Ok(destroyed)
}
