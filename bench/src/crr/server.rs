//! The server: worker threads accepting on one listener, answering each
//! request and handing RR connections to threads of their own.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::DEFAULT_SIZE;

/// Listen backlog of the server socket.
const LISTEN_BACKLOG: i32 = 4096;

/// Stack size of server threads: they only hold a small buffer.
const SERVER_THREAD_STACK: usize = 256 * 1024;

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Request and response size in bytes (at least 1); must match the client.
    pub size: usize,
    /// Threads blocked in `accept()` on the shared listener. Each serves one
    /// CRR connection at a time (including the wait for the client's close),
    /// so it should be at least the number of client threads.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        ServerConfig {
            size: DEFAULT_SIZE,
            workers: (4 * cores).max(8),
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Request/response exchanges served.
    pub transactions: AtomicU64,
    /// Connections that kept sending after their first exchange and were
    /// handed to a dedicated thread (RR clients).
    pub kept_open: AtomicU64,
    /// Connections that ended with an error (reset, short request, ...).
    pub errors: AtomicU64,
}

/// A running CRR/RR server: a pool of worker threads accepting on one
/// listening socket.
///
/// For each connection a worker reads `size` bytes, writes `size` bytes and
/// then reads again: end-of-file means the client closed (CRR), so the
/// worker closes its side and goes back to `accept()`; more data means an RR
/// client, and the connection moves to a thread of its own that keeps
/// answering until end-of-file.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and starts the workers.
    pub fn bind(addr: SocketAddr, cfg: ServerConfig) -> io::Result<Server> {
        if cfg.size == 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "size must be at least 1 byte",
            ));
        }
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener: TcpListener = socket.into();
        let local = listener.local_addr()?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let mut workers = Vec::with_capacity(cfg.workers.max(1) + 1);
        // UDP on the same port: each datagram answered with `size` bytes.
        let udp = UdpSocket::bind(local)?;
        udp.set_read_timeout(Some(UDP_STOP_CHECK))?;
        {
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(&stats);
            let size = cfg.size;
            workers.push(
                thread::Builder::new()
                    .name("crr-server-udp".into())
                    .stack_size(SERVER_THREAD_STACK)
                    .spawn(move || answer_udp(&udp, size, &stop, &stats))?,
            );
        }
        for i in 0..cfg.workers.max(1) {
            let listener = listener.try_clone()?;
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(&stats);
            let size = cfg.size;
            let h = thread::Builder::new()
                .name(format!("crr-server-{i}"))
                .stack_size(SERVER_THREAD_STACK)
                .spawn(move || accept_loop(&listener, size, &stop, &stats))?;
            workers.push(h);
        }
        Ok(Server {
            addr: local,
            stop,
            stats,
            workers,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Blocks forever (until the process is killed); for the CLI.
    pub fn wait(self) {
        for h in self.workers {
            let _ = h.join();
        }
    }

    /// Stops accepting and joins the accept workers. Connections already
    /// handed to RR threads finish when their clients close.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake every worker blocked in accept() with a throwaway connection.
        let wake = match self.addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
            }
            a => a,
        };
        for _ in 0..self.workers.len() {
            let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        }
        for h in self.workers {
            let _ = h.join();
        }
    }
}

/// How often the UDP thread, blocked in `recv_from()`, looks at the stop flag.
const UDP_STOP_CHECK: Duration = Duration::from_millis(100);

fn answer_udp(socket: &UdpSocket, size: usize, stop: &AtomicBool, stats: &ServerStats) {
    let response = vec![b'r'; size];
    let mut buf = vec![0u8; size.max(1)];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if socket.send_to(&response, peer).is_ok() {
                    stats.transactions.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, size: usize, stop: &AtomicBool, stats: &Arc<ServerStats>) {
    let response = vec![b'r'; size];
    let mut buf = vec![0u8; size];
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                // Out of descriptors or memory: back off instead of spinning.
                if e.kind() != ErrorKind::Interrupted && e.kind() != ErrorKind::ConnectionAborted {
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if serve_first(stream, &mut buf, &response, stats).is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads exactly `buf.len()` bytes after the first `filled` already there.
/// `Ok(false)` on a clean end-of-file before any byte of this request.
fn read_request(stream: &mut TcpStream, buf: &mut [u8], mut filled: usize) -> io::Result<bool> {
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Serves the first exchange of a connection on the accepting thread, then
/// either sees the client's close or hands the connection to an RR thread.
fn serve_first(
    mut stream: TcpStream,
    buf: &mut [u8],
    response: &[u8],
    stats: &Arc<ServerStats>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    if !read_request(&mut stream, buf, 0)? {
        return Ok(());
    }
    stream.write_all(response)?;
    stats.transactions.fetch_add(1, Ordering::Relaxed);
    // Wait for the client to close first (CRR) or send its next request (RR).
    let n = loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    if n == 0 {
        return Ok(()); // Client closed: close our side; TIME_WAIT is theirs.
    }
    stats.kept_open.fetch_add(1, Ordering::Relaxed);
    let mut first = buf.to_vec();
    let response = response.to_vec();
    let stats = Arc::clone(stats);
    let spawned = thread::Builder::new()
        .name("crr-server-rr".into())
        .stack_size(SERVER_THREAD_STACK)
        .spawn(move || {
            if serve_rr(stream, &mut first, n, &response, &stats).is_err() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    spawned.map(|_| ())
}

fn serve_rr(
    mut stream: TcpStream,
    buf: &mut [u8],
    mut filled: usize,
    response: &[u8],
    stats: &ServerStats,
) -> io::Result<()> {
    loop {
        if !read_request(&mut stream, buf, filled)? {
            return Ok(());
        }
        filled = 0;
        stream.write_all(response)?;
        stats.transactions.fetch_add(1, Ordering::Relaxed);
    }
}
