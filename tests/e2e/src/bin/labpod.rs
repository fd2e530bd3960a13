//! labpod: the program that runs inside lab pods. It serves TCP, UDP and HTTP
//! answering with its name and the source address it sees, and it acts as a
//! client that reports, per connection, which backend answered and what
//! `getpeername()` returned.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_e2e::{netpol::probe::Outcome, probe::Attempt};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve on the given ports until killed; prints "ready" once listening.
    Serve {
        /// Name reported to clients.
        #[arg(long)]
        name: String,
        /// Address to bind (IPv6 `::` also accepts IPv4).
        #[arg(long, default_value = "::")]
        bind: String,
        /// TCP ports: each connection gets "NAME SOURCE\n", then the server waits for EOF.
        #[arg(long)]
        tcp: Vec<u16>,
        /// UDP ports: each datagram gets "NAME SOURCE\n" back.
        #[arg(long)]
        udp: Vec<u16>,
        /// HTTP ports: every request gets 200 with body "NAME SOURCE\n".
        #[arg(long)]
        http: Vec<u16>,
    },
    /// Connect COUNT times and print one JSON line per attempt.
    Connect {
        /// Target address:port.
        #[arg(long)]
        target: SocketAddr,
        /// Number of connections (TCP) or datagrams (UDP).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Per-attempt timeout in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Send an HTTP GET and read the answer from the response body (TCP only).
        #[arg(long)]
        http: bool,
        /// UDP without connect(): sendto() each datagram and report the reply's
        /// source address as the peer.
        #[arg(long)]
        unconnected: bool,
        /// Keep one socket for every attempt (connected UDP), opening a new one
        /// only after an error, as a resilient DNS client does: shows whether
        /// a long-lived socket stays pinned to a backend.
        #[arg(long)]
        reuse_socket: bool,
        /// Keep one socket for every attempt (connected UDP), even after
        /// errors: shows whether the socket itself recovers.
        #[arg(long, conflicts_with = "reuse_socket")]
        one_socket: bool,
        /// Pause between attempts, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// TCP only: keep each connection open this long after the answer,
        /// then check that it still echoes and still shows the same peer
        /// (a long-lived connection).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// UDP only: send from this local port (the same flow every time).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
        /// UDP only: datagram size in bytes; above the path MTU the datagram
        /// leaves in fragments.
        #[arg(long, default_value_t = 4)]
        udp_size: usize,
    },
    /// Send spoofed TCP SYNs and bare ACKs to a target from random addresses
    /// of a prefix for a while (see `lb_e2e::flood`), then print
    /// `{"sent": N}`. Needs a raw socket (root in the pod's namespace).
    Flood {
        /// Target IPv4 address:port.
        #[arg(long)]
        target: std::net::SocketAddrV4,
        /// Prefix the spoofed sources are drawn from.
        #[arg(long)]
        sources: ipnetwork::Ipv4Network,
        /// How long to send, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
    },
    /// Probe every target once, all at the same time, and print one JSON
    /// line per target (see `lb_e2e::netpol::probe::Outcome`), in the order
    /// given. A TCP probe connects and reads the server's greeting; a UDP
    /// probe sends a datagram and waits for the answer. Any failure (refused,
    /// timed out, no answer) is reported, never fatal.
    Probe {
        /// tcp or udp.
        #[arg(long)]
        protocol: String,
        /// Timeout of each step (connect, read) in milliseconds.
        #[arg(long, default_value_t = 400)]
        timeout_ms: u64,
        /// LABEL=ADDRESS:PORT; the label is echoed back in the output line.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Serve {
            name,
            bind,
            tcp,
            udp,
            http,
        } => serve(&name, &bind, &tcp, &udp, &http),
        Command::Probe {
            protocol,
            timeout_ms,
            targets,
        } => probe(&protocol, Duration::from_millis(timeout_ms), &targets),
        Command::Flood {
            target,
            sources,
            duration_ms,
        } => {
            let sent = lb_e2e::flood::flood(target, sources, Duration::from_millis(duration_ms))
                .context("flooding")?;
            println!("{}", serde_json::json!({ "sent": sent }));
            Ok(())
        }
        Command::Connect {
            target,
            count,
            proto,
            timeout_ms,
            http,
            unconnected,
            reuse_socket,
            one_socket,
            interval_ms,
            source_port,
            hold_ms,
            udp_size,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let started = std::time::Instant::now();
            let mut udp = UdpClient::new(target, timeout, unconnected, source_port, udp_size);
            let mut last_failed = false;
            for i in 0..count {
                if i > 0 && interval_ms > 0 {
                    thread::sleep(Duration::from_millis(interval_ms));
                }
                let at_ms = started.elapsed().as_millis() as u64;
                let mut attempt = match proto.as_str() {
                    "tcp" => tcp_attempt(target, timeout, http, Duration::from_millis(hold_ms)),
                    "udp" => {
                        let reopen = !one_socket && (!reuse_socket || last_failed);
                        if i > 0 && reopen {
                            udp =
                                UdpClient::new(target, timeout, unconnected, source_port, udp_size);
                        }
                        udp.attempt()
                    }
                    other => anyhow::bail!("unknown protocol {other}"),
                };
                last_failed = !attempt.ok;
                attempt.at_ms = at_ms;
                writeln!(out, "{}", serde_json::to_string(&attempt)?)?;
                out.flush()?;
            }
            Ok(())
        }
    }
}

/// `labpod probe`: one thread per target, results printed in target order.
fn probe(protocol: &str, timeout: Duration, targets: &[String]) -> Result<()> {
    if protocol != "tcp" && protocol != "udp" {
        anyhow::bail!("unknown protocol {protocol} (tcp or udp)");
    }
    let mut parsed = Vec::new();
    for spec in targets {
        let (label, address) = spec
            .rsplit_once('=')
            .with_context(|| format!("target {spec:?} is not LABEL=ADDRESS:PORT"))?;
        let address: SocketAddr = address
            .parse()
            .with_context(|| format!("target {spec:?}: bad address"))?;
        parsed.push((label.to_string(), address));
    }
    let handles: Vec<_> = parsed
        .into_iter()
        .map(|(label, address)| {
            let protocol = protocol.to_string();
            thread::spawn(move || {
                let started = std::time::Instant::now();
                let attempt = if protocol == "tcp" {
                    tcp_attempt(address, timeout, false, Duration::ZERO)
                } else {
                    UdpClient::new(address, timeout, false, 0, 4).attempt()
                };
                Outcome {
                    label,
                    ok: attempt.ok,
                    backend: attempt.backend,
                    served_on: attempt.served_on,
                    error: attempt.error,
                    ms: started.elapsed().as_millis() as u64,
                }
            })
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for handle in handles {
        let outcome = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a probe thread panicked"))?;
        writeln!(out, "{}", serde_json::to_string(&outcome)?)?;
    }
    out.flush()?;
    Ok(())
}

fn serve(name: &str, bind: &str, tcp: &[u16], udp: &[u16], http: &[u16]) -> Result<()> {
    let mut handles = Vec::new();
    for &port in tcp.iter().chain(http) {
        let listener = TcpListener::bind((bind, port)).with_context(|| format!("tcp {port}"))?;
        let name = name.to_string();
        let is_http = http.contains(&port);
        handles.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || {
                    let _ = if is_http {
                        answer_http(&name, stream)
                    } else {
                        answer_tcp(&name, stream)
                    };
                });
            }
        }));
    }
    for &port in udp {
        let socket = UdpSocket::bind((bind, port)).with_context(|| format!("udp {port}"))?;
        let name = name.to_string();
        handles.push(thread::spawn(move || {
            // Room for any datagram: fragmented ones are tested too.
            let mut buf = vec![0u8; 65_536];
            let local = socket.local_addr().map(canonical).ok();
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let answer = format!("{name} {} {}\n", canonical(from), describe(local));
                let _ = socket.send_to(answer.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

/// IPv4 clients of a dual-stack socket appear as `::ffff:a.b.c.d`; report them as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn describe(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "?".into(), |a| a.to_string())
}

fn answer_tcp(name: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let peer = canonical(stream.peer_addr()?);
    let local = canonical(stream.local_addr()?);
    stream.write_all(format!("{name} {peer} {local}\n").as_bytes())?;
    // Echo whatever follows, and let the client close first so TIME_WAIT
    // stays on its side.
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn answer_http(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let peer = canonical(stream.peer_addr()?);
    let local = canonical(stream.local_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // Read the request head.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = format!("{name} {peer} {local}\n");
    let mut stream = stream;
    stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    stream.shutdown(Shutdown::Write)
}

fn failure(err: &std::io::Error) -> Attempt {
    Attempt {
        ok: false,
        backend: None,
        seen_source: None,
        served_on: None,
        peer: None,
        local: None,
        error: Some(err.to_string()),
        errno: err.raw_os_error(),
        at_ms: 0,
    }
}

/// "NAME SOURCE SERVED_ON" as the servers write it.
fn parse_answer(line: &str) -> (Option<String>, Option<String>, Option<String>) {
    let mut parts = line.split_whitespace().map(str::to_owned);
    (parts.next(), parts.next(), parts.next())
}

fn tcp_attempt(target: SocketAddr, timeout: Duration, http: bool, hold: Duration) -> Attempt {
    let run = || -> std::io::Result<Attempt> {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        let mut answer = String::new();
        if http {
            stream.write_all(
                format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            stream.read_to_string(&mut answer)?;
            if !answer.starts_with("HTTP/1.1 200") {
                return Err(std::io::Error::other(format!(
                    "unexpected response {answer:?}"
                )));
            }
            answer = answer
                .rsplit("\r\n\r\n")
                .next()
                .unwrap_or_default()
                .to_string();
        } else {
            BufReader::new(&stream).read_line(&mut answer)?;
            if !hold.is_zero() {
                thread::sleep(hold);
                stream.write_all(b"?")?;
                let mut echo = [0u8; 1];
                stream.read_exact(&mut echo)?;
                if &echo != b"?" {
                    return Err(std::io::Error::other(
                        "the held connection answered garbage",
                    ));
                }
                let later = stream.peer_addr()?;
                if later != peer {
                    return Err(std::io::Error::other(format!(
                        "getpeername showed {peer}, then {later}"
                    )));
                }
            }
        }
        let (backend, seen_source, served_on) = parse_answer(&answer);
        Ok(Attempt {
            ok: backend.is_some(),
            backend,
            seen_source,
            served_on,
            peer: Some(peer.to_string()),
            local: Some(local.to_string()),
            error: None,
            errno: None,
            at_ms: 0,
        })
    };
    run().unwrap_or_else(|err| failure(&err))
}

/// A UDP client socket, connected or not.
struct UdpClient {
    target: SocketAddr,
    timeout: Duration,
    unconnected: bool,
    payload: Vec<u8>,
    socket: std::io::Result<UdpSocket>,
}

impl UdpClient {
    fn new(
        target: SocketAddr,
        timeout: Duration,
        unconnected: bool,
        source_port: u16,
        size: usize,
    ) -> Self {
        let open = || -> std::io::Result<UdpSocket> {
            let bind: SocketAddr = if target.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], source_port))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, source_port))
            };
            let socket = UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(timeout))?;
            if !unconnected {
                socket.connect(target)?;
            }
            Ok(socket)
        };
        Self {
            target,
            timeout,
            unconnected,
            payload: b"ping".iter().copied().cycle().take(size).collect(),
            socket: open(),
        }
    }

    fn attempt(&self) -> Attempt {
        let run = || -> std::io::Result<Attempt> {
            let socket = self.socket.as_ref().map_err(clone_error)?;
            socket.set_read_timeout(Some(self.timeout))?;
            let mut buf = [0u8; 512];
            let (n, peer) = if self.unconnected {
                socket.send_to(&self.payload, self.target)?;
                socket.recv_from(&mut buf)?
            } else {
                socket.send(&self.payload)?;
                (socket.recv(&mut buf)?, socket.peer_addr()?)
            };
            let (backend, seen_source, served_on) =
                parse_answer(&String::from_utf8_lossy(&buf[..n]));
            Ok(Attempt {
                ok: backend.is_some(),
                backend,
                seen_source,
                served_on,
                peer: Some(peer.to_string()),
                local: Some(socket.local_addr()?.to_string()),
                error: None,
                errno: None,
                at_ms: 0,
            })
        };
        run().unwrap_or_else(|err| failure(&err))
    }
}

fn clone_error(err: &std::io::Error) -> std::io::Error {
    match err.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(err.kind(), err.to_string()),
    }
}
