//! Raw frames: building Ethernet/IPv4/IPv6 frames with TCP, UDP or ICMP
//! payloads and valid checksums, and parsing what the programs leave
//! (checksums checked).

use std::net::IpAddr;

use lb_common::net::{PROTO_TCP, PROTO_UDP, TCP_ACK as ACK};

/// Ones' complement sum of big-endian 16-bit words.
pub(crate) fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

pub(crate) fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut pseudo = ip_bytes(src);
    pseudo.extend(ip_bytes(dst));
    match src {
        IpAddr::V4(_) => pseudo.extend([0, proto, (len >> 8) as u8, len as u8]),
        IpAddr::V6(_) => pseudo.extend([
            (len >> 24) as u8,
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0,
            proto,
        ]),
    }
    sum16(&pseudo)
}

/// A flow's packet: addresses, ports, protocol, TCP flags and payload.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pkt<'a> {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) flags: u8,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) payload: &'a [u8],
}

/// The initial sequence number of every TCP peer of the tests.
pub(crate) const ISN: u32 = 1000;

impl<'a> Pkt<'a> {
    /// A TCP segment; with ACK, it acknowledges the other side's SYN (both
    /// sides start at [`ISN`]), so a SYN, SYN-ACK, ACK exchange completes a
    /// handshake.
    pub(crate) fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: PROTO_TCP,
            flags,
            seq: ISN,
            ack: if flags & ACK != 0 { ISN + 1 } else { 0 },
            payload: &[],
        }
    }

    pub(crate) fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &'a [u8]) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto: PROTO_UDP,
            flags: 0,
            seq: 0,
            ack: 0,
            payload,
        }
    }

    /// The Ethernet frame, with valid checksums.
    pub(crate) fn frame(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend(self.seq.to_be_bytes());
            l4.extend(self.ack.to_be_bytes());
            l4.extend([5 << 4, self.flags]);
            l4.extend(64240u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(self.payload);
        let csum_off = if self.proto == PROTO_TCP { 16 } else { 6 };
        let csum = fold(pseudo_sum(self.src, self.dst, self.proto, l4.len()) + sum16(&l4));
        l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());

        ip_frame(self.src, self.dst, self.proto, &l4)
    }
}

/// An Ethernet frame carrying `payload` of protocol `proto` from `src` to
/// `dst`, with a valid IPv4 header checksum.
pub(crate) fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            frame.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend(((20 + payload.len()) as u16).to_be_bytes());
            ip.extend([0, 1, 0x40, 0, 64, proto, 0, 0]);
            ip.extend(src.octets());
            ip.extend(dst.octets());
            let csum = fold(sum16(&ip));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend(ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend([0x86, 0xdd]);
            frame.extend([0x60, 0, 0, 0]);
            frame.extend((payload.len() as u16).to_be_bytes());
            frame.extend([proto, 64]);
            frame.extend(src.octets());
            frame.extend(dst.octets());
        }
        _ => panic!("mixed families"),
    }
    frame.extend(payload);
    frame
}

/// What a test reads back from a frame the program left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) flags: u8,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) l4_csum: u16,
}

/// Parses a frame and checks its IPv4 header and L4 checksums.
pub(crate) fn parse(frame: &[u8]) -> Parsed {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let ip = &frame[14..34];
            assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (src, dst, ip[9], &frame[34..14 + total])
        }
        0x86dd => {
            let ip = &frame[14..54];
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (src, dst, ip[6], &frame[54..54 + len])
        }
        other => panic!("unexpected ethertype {other:#x}"),
    };
    let csum_off = if proto == PROTO_TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    if !(proto == PROTO_UDP && l4_csum == 0) {
        assert_eq!(
            fold(pseudo_sum(src, dst, proto, l4.len()) + sum16(l4)),
            0,
            "bad L4 checksum"
        );
    }
    let word = |at: usize| u32::from_be_bytes(l4[at..at + 4].try_into().unwrap());
    let tcp = proto == PROTO_TCP;
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        flags: if tcp { l4[13] } else { 0 },
        seq: if tcp { word(4) } else { 0 },
        ack: if tcp { word(8) } else { 0 },
        l4_csum,
    }
}

/// An ICMP or ICMPv6 error read back from a frame.
#[derive(Debug)]
pub(crate) struct IcmpError {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    /// TTL or hop limit.
    pub(crate) ttl: u8,
    pub(crate) kind: u8,
    pub(crate) code: u8,
    /// The header's second word: unused (0), or an MTU.
    pub(crate) rest: u32,
    /// What follows the 8-byte ICMP header: the offending packet's start.
    pub(crate) quote: Vec<u8>,
}

/// Parses a frame holding an ICMP or ICMPv6 error. Checks, from the bytes
/// alone: the frame ends where the IP packet does, the IPv4 header checksum
/// and the ICMP checksum (ICMPv6: over the pseudo-header too).
pub(crate) fn parse_icmp(frame: &[u8]) -> IcmpError {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, ttl, icmp) = match ethertype {
        0x0800 => {
            let ip = &frame[14..34];
            assert_eq!((ip[0], ip[9]), (0x45, 1), "IPv4 without options, ICMP");
            assert_eq!(fold(sum16(ip)), 0, "bad IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            assert_eq!(frame.len(), 14 + total, "frame length");
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            let icmp = &frame[34..];
            assert_eq!(fold(sum16(icmp)), 0, "bad ICMP checksum");
            (src, dst, ip[8], icmp)
        }
        0x86dd => {
            let ip = &frame[14..54];
            assert_eq!((ip[0] >> 4, ip[6]), (6, 58), "IPv6, ICMPv6");
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            assert_eq!(frame.len(), 54 + len, "frame length");
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let icmp = &frame[54..];
            assert_eq!(
                fold(pseudo_sum(src, dst, 58, icmp.len()) + sum16(icmp)),
                0,
                "bad ICMPv6 checksum"
            );
            (src, dst, ip[7], icmp)
        }
        other => panic!("unexpected ethertype {other:#x}"),
    };
    IcmpError {
        src,
        dst,
        ttl,
        kind: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
        quote: icmp[8..].to_vec(),
    }
}
